//! The messages between the control plane and a node agent.
//!
//! The local agent of `tessera up` exchanges them over in-process channels;
//! remote agents will exchange the same messages over a connection. Add new
//! variants rather than changing old ones.

use serde::{Deserialize, Serialize};

use crate::job::JobId;
use crate::node::Inventory;

/// Names one replica of one attempt of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReplicaKey {
    pub job_id: JobId,
    pub attempt: u32,
    pub replica: u32,
}

impl std::fmt::Display for ReplicaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.job_id, self.attempt, self.replica)
    }
}

/// Everything an agent needs to start one replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartReplica {
    pub key: ReplicaKey,
    pub num_replicas: u32,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub gpus: Vec<u32>,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub max_runtime_ms: Option<u64>,
    /// Run the replica in a container of this image instead of as a process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToAgent {
    Start(StartReplica),
    /// Stop a replica: SIGTERM to its process group, SIGKILL after `grace_ms`.
    Stop {
        key: ReplicaKey,
        grace_ms: u64,
        reason: String,
    },
}

/// Why a replica ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitCause {
    /// The process exited by itself (or was killed by something else).
    Exited,
    /// It ran past `max_runtime` and was stopped.
    TimedOut,
    /// It was stopped on request (cancel).
    Stopped,
    /// The memory limit was hit and the kernel killed it.
    OutOfMemory,
    /// It could not be started at all.
    SpawnFailed(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromAgent {
    Register(Inventory),
    Started {
        key: ReplicaKey,
        pid: u32,
        at: u64,
    },
    Exited {
        key: ReplicaKey,
        code: Option<i32>,
        signal: Option<i32>,
        cause: ExitCause,
        at: u64,
    },
    /// The agent is alive; sent periodically.
    Heartbeat {
        node: String,
        at: u64,
    },
}
