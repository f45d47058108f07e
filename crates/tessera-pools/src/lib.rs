//! Pools: capacity that another engine manages — a Slurm cluster, a Ray
//! cluster, a Kubernetes cluster — behind one narrow trait, [`PoolDriver`].
//!
//! The scheduler sees a pool as capacity with labels and prices and decides
//! *which* pool runs a job; the pool's own engine decides on which of its
//! machines. A driver only translates: submit (idempotent, keyed by the
//! job's attempt, so a retry after a crash never submits twice), the status
//! of many jobs in one call, cancel, logs, and capacity. It keeps no state
//! of its own that matters: everything it needs to find a job again is in
//! the engine, under the job's key.

pub mod ray;

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tessera_core::job::JobId;

pub mod slurm;

/// One attempt of one job, as a pool is asked to run it. All replicas of a
/// gang go to one pool together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolJob {
    /// The idempotency key, `tessera-<job>-<attempt>` (the server puts a
    /// pool-unique part in between, [`PoolJob::key_in`], so that two Tessera
    /// installations, or a fresh one, never take each other's jobs for
    /// their own): the same attempt always has the same key, and a driver
    /// asked to submit a key the engine already knows returns the existing
    /// job.
    pub key: String,
    pub job_id: JobId,
    pub attempt: u32,
    pub name: String,
    pub team: String,
    /// What to run (a `script` arrives as `["/bin/sh", "-c", script]`).
    pub argv: Vec<String>,
    pub image: Option<String>,
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    /// Replicas of a gang; all or nothing.
    pub replicas: u32,
    /// Per replica.
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub gpus: u32,
    /// Allowed GPU models; empty allows any.
    pub gpu_models: Vec<String>,
    pub max_runtime_ms: Option<u64>,
    /// Labels the engine's nodes must carry, where the engine knows labels.
    pub node_selector: BTreeMap<String, String>,
}

impl PoolJob {
    /// The idempotency key of one attempt of one job.
    pub fn key_for(job_id: JobId, attempt: u32) -> String {
        format!("tessera-{job_id}-{attempt}")
    }

    /// The key of one attempt of one job in a pool whose jobs carry
    /// `prefix` (`tessera-<prefix>-<job>-<attempt>`).
    pub fn key_in(prefix: &str, job_id: JobId, attempt: u32) -> String {
        if prefix.is_empty() {
            return PoolJob::key_for(job_id, attempt);
        }
        format!("tessera-{prefix}-{job_id}-{attempt}")
    }
}

/// The engine's own name for a submitted job (a Slurm job id, a Ray
/// submission id, a Kubernetes Job name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RemoteId(pub String);

impl std::fmt::Display for RemoteId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a job ended without success, in Tessera's terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Failure {
    /// The program exited non-zero (or was killed by a signal).
    Exited,
    /// Killed for exceeding its memory.
    OutOfMemory,
    /// Ran past its time limit.
    TimedOut,
    /// A node under it failed.
    NodeFailure,
    /// Cancelled inside the engine (not by Tessera).
    Cancelled,
    /// The engine refused or could not start it (bad request, no such
    /// partition, an image that cannot be pulled).
    Rejected,
}

/// A job's state as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteState {
    /// Accepted, waiting inside the engine; the engine's reason if it gives one.
    Queued {
        reason: Option<String>,
    },
    Running,
    Succeeded,
    Failed {
        failure: Failure,
        exit_code: Option<i32>,
        /// The engine's own words (a Slurm reason, a Ray message, a pod's status).
        message: String,
    },
    /// Stopped at Tessera's request.
    Cancelled,
    /// The engine no longer knows the job (purged, or never submitted).
    NotFound,
}

impl RemoteState {
    /// Whether the job will not change state again.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            RemoteState::Succeeded
                | RemoteState::Failed { .. }
                | RemoteState::Cancelled
                | RemoteState::NotFound
        )
    }
}

/// GPUs of one model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuCount {
    pub model: String,
    pub count: u32,
}

/// What a pool has and what of it is in use (by anyone, not only Tessera).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    pub nodes: u32,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub gpus: Vec<GpuCount>,
    pub used_cpu_milli: u64,
    pub used_memory_bytes: u64,
    pub used_gpus: u32,
    /// The largest single node (CPU, memory, GPUs), so that a replica that
    /// fits the pool in sum but no node of it is refused.
    pub largest_node: (u64, u64, u32),
    /// Labels every node of the pool shares (region, engine, ...).
    pub labels: BTreeMap<String, String>,
}

/// Output of a job from `offset` on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogChunk {
    pub data: Vec<u8>,
    /// Where the next read starts.
    pub next_offset: u64,
    /// No more output will come (the job has ended and all of it was read).
    pub complete: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// The engine cannot be reached or failed; try again later.
    #[error("pool unavailable: {0}")]
    Unavailable(String),
    /// The engine will never run this job as asked; the message says why
    /// (and names the field where one is to blame).
    #[error("rejected by the pool: {0}")]
    Rejected(String),
    #[error("no such job in the pool: {0}")]
    NotFound(String),
}

/// One engine behind Tessera. Implementations talk to the engine only;
/// the server's pool loop turns their answers into job state.
#[async_trait]
pub trait PoolDriver: Send + Sync + 'static {
    /// `slurm`, `ray`, `kubernetes`.
    fn kind(&self) -> &'static str;

    /// Submits one attempt. Idempotent: if the engine already has a job
    /// under `job.key`, returns that job's id and submits nothing.
    async fn submit(&self, job: &PoolJob) -> Result<RemoteId, PoolError>;

    /// Submits an attempt the caller knows was never submitted (it made the
    /// placement itself and has not tried before), so a driver may skip
    /// looking the key up. By default the same as [`PoolDriver::submit`].
    async fn submit_new(&self, job: &PoolJob) -> Result<RemoteId, PoolError> {
        self.submit(job).await
    }

    /// The state of many jobs in one call to the engine. Ids the engine
    /// does not know come back as [`RemoteState::NotFound`].
    async fn status(&self, ids: &[RemoteId]) -> Result<HashMap<RemoteId, RemoteState>, PoolError>;

    /// Jobs among `ids` known to have ended without asking the engine (a
    /// marker the job left on a file system Tessera sees), for a pool loop
    /// that looks far more often than it may call the engine. Cheap and
    /// never blocking for long; what it does not know, [`PoolDriver::status`]
    /// tells. By default nothing.
    fn ended_locally(&self, ids: &[RemoteId]) -> HashMap<RemoteId, RemoteState> {
        let _ = ids;
        HashMap::new()
    }

    /// Stops a job (all its replicas). Cancelling an ended job is not an error.
    async fn cancel(&self, id: &RemoteId) -> Result<(), PoolError>;

    /// The job's output from byte `offset` on.
    async fn logs(&self, id: &RemoteId, offset: u64) -> Result<LogChunk, PoolError>;

    /// What the pool has and uses now.
    async fn capacity(&self) -> Result<Capacity, PoolError>;
}
