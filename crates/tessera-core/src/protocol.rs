//! The messages between the control plane and a node agent.
//!
//! The local agent of `tessera up` exchanges them over in-process channels;
//! remote agents exchange the same messages as JSON text frames over one
//! WebSocket they open to the server. Add new variants rather than changing
//! old ones.
//!
//! The attempt number in [`ReplicaKey`] is the placement's epoch: every
//! requeue starts a new attempt, and the server refuses reports about any
//! attempt but the current one (and stops such replicas), so a copy left
//! behind by a partitioned node can never be mistaken for the live one.

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
    /// Dataset versions to show read-only in the working directory: each
    /// becomes `<workdir>/<name>`, a link to `path` (a directory the
    /// control plane staged, on a disk this node shares with it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<InputMount>,
    /// Replica 0 of a job with outputs: the directories (relative to the
    /// working directory) the control plane writes as versions once the
    /// job succeeds. A remote agent uploads them before it reports the
    /// replica's exit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
}

/// A staged dataset version and the name it has in a replica's working
/// directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputMount {
    pub name: String,
    pub path: String,
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
    /// The first message on a remote agent's connection: the terms the
    /// server holds the agent to. The agent heartbeats every `heartbeat_ms`
    /// and, unless configured otherwise, stops all its work once it has
    /// heard nothing from the server for `lease_ms` — which the server
    /// chooses so that this happens before it declares the node lost.
    Welcome {
        node: String,
        heartbeat_ms: u64,
        lease_ms: u64,
        /// SIGTERM-to-SIGKILL grace for replicas stopped when the lease runs out.
        grace_ms: u64,
    },
    /// Stop every replica this agent runs.
    StopAll {
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
    /// The agent stopped it because it lost contact with the server for
    /// longer than its lease (the server treats the node as lost).
    Disconnected,
    /// It was running when its agent restarted and ended while no agent
    /// watched it; its exit status could not be recovered.
    Unknown,
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
        /// The replica's working directory, where a job's outputs are
        /// read from (none: the node has no directory to offer, as pools).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workdir: Option<String>,
    },
    /// The agent is alive; sent periodically.
    Heartbeat {
        node: String,
        at: u64,
    },
    /// Live usage, sent with every heartbeat. A GPU reported unhealthy
    /// here is taken out of scheduling until it reports healthy again.
    Usage {
        node: String,
        usage: crate::node::NodeUsage,
    },
    /// Sent by a remote agent after `Register` and any reports it held back
    /// while disconnected: the replicas it runs right now. The server
    /// reconciles against it — replicas it expected there but that are not
    /// running are lost; replicas running there that it no longer wants
    /// (a stale attempt, a cancelled job) are stopped.
    Sync {
        node: String,
        running: Vec<ReplicaKey>,
    },
}
