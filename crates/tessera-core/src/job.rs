//! Jobs: the durable record, its lifecycle and its events.
//!
//! Lifecycle: `queued → scheduled → running → succeeded | failed | cancelled`.
//! A replica lost with its node (or with the server that ran it) sends the
//! job back to `queued` while `retries.on_node_loss` remain, else to `lost`.
//! A failure sends it back to `queued` while `retries.on_failure` remain.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::spec::JobTemplate;

pub type JobId = u64;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Scheduled,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Lost,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Scheduled,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Scheduled => "scheduled",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Lost
        )
    }

    /// Holds resources on a node (placed and not yet finished).
    pub fn is_active(self) -> bool {
        matches!(self, JobState::Scheduled | JobState::Running)
    }
}

/// Where one replica of the current attempt runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReplicaPlacement {
    pub replica: u32,
    pub node: String,
    /// GPU indices on that node, given to the replica as CUDA_VISIBLE_DEVICES.
    pub gpus: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    Pending,
    Running,
    Exited,
}

/// The state of one replica of the current attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReplicaStatus {
    pub replica: u32,
    pub state: ReplicaState,
    pub pid: Option<u32>,
    pub exit_code: Option<i32>,
    /// Signal that ended it, when it was killed.
    pub signal: Option<i32>,
}

/// The durable record of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub id: JobId,
    pub spec: JobTemplate,
    pub state: JobState,
    /// Token id of the submitter.
    pub submitted_by: String,
    /// All times are milliseconds since the Unix epoch.
    pub submitted_at: u64,
    /// Counts placements: 0 until first scheduled, then 1, 2, ... per try.
    pub attempt: u32,
    pub failures: u32,
    pub node_losses: u32,
    pub placement: Vec<ReplicaPlacement>,
    pub replicas: Vec<ReplicaStatus>,
    pub scheduled_at: Option<u64>,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    /// Exit code of the job: the first non-zero replica exit code, else 0.
    pub exit_code: Option<i32>,
    /// Why the job waits (while queued) or why it ended (when terminal).
    pub reason: Option<String>,
    /// Set when a cancel was asked for while replicas were running.
    #[serde(default)]
    pub cancel_requested: bool,
    /// Set while the scheduler is preempting the job: why.
    #[serde(default)]
    pub preempting: Option<String>,
    /// Times the job was preempted and sent back to the queue.
    #[serde(default)]
    pub preemptions: u32,
    /// Run time of earlier attempts, in ms (attained service).
    #[serde(default)]
    pub attained_ms: u64,
    /// Run time thrown away by preemptions (work redone), in ms.
    #[serde(default)]
    pub preempted_ms: u64,
    /// What the job has cost so far, all attempts, at its nodes' prices.
    #[serde(default)]
    pub cost: f64,
    /// Every attempt that has ended: where it ran, for how long, at what
    /// prices (accounting reads these; the current attempt is `placement`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<AttemptUsage>,
    /// The dataset versions the job wrote, `team.name@version`, in the
    /// order of its `outputs` (set when it succeeded). What it read is
    /// `spec.inputs`, whose versions were pinned at submission.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wrote: Vec<String>,
    /// Where replica 0 of the current attempt ran, as its node reported:
    /// the outputs are read from here. Once every replica has exited 0 the
    /// job stays `running` while its outputs are written, and succeeds when
    /// every output is a version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs_dir: Option<String>,
}

/// What one ended attempt of a job held, from when it was placed (or
/// started) until it ended: the durable record usage and cost are
/// computed from over any time range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AttemptUsage {
    pub attempt: u32,
    /// Milliseconds since the Unix epoch: when the attempt began to hold
    /// its placement (its start, or its placement while it had not started).
    pub start: u64,
    /// When it ended (finished, failed, was preempted or lost).
    pub end: u64,
    /// What each replica held.
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    /// Thousandths of a GPU (1000 per whole GPU).
    pub gpu_milli: u64,
    /// The nodes its replicas ran on, with each node's pool and prices
    /// at the time.
    pub nodes: Vec<NodeShare>,
    /// How it ended: `succeeded`, `failed`, `cancelled`, `lost`,
    /// `requeued` or `preempted`.
    pub outcome: String,
}

/// The replicas of one attempt on one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeShare {
    pub node: String,
    /// The node's pool (its `pool` label; `nodes` without one).
    pub pool: String,
    pub replicas: u32,
    pub prices: crate::node::Prices,
}

impl Job {
    pub fn new(id: JobId, spec: JobTemplate, submitted_by: String, now: u64) -> Job {
        Job {
            id,
            spec,
            state: JobState::Queued,
            submitted_by,
            submitted_at: now,
            attempt: 0,
            failures: 0,
            node_losses: 0,
            placement: Vec::new(),
            replicas: Vec::new(),
            scheduled_at: None,
            started_at: None,
            finished_at: None,
            exit_code: None,
            reason: None,
            cancel_requested: false,
            preempting: None,
            preemptions: 0,
            attained_ms: 0,
            preempted_ms: 0,
            cost: 0.0,
            attempts: Vec::new(),
            wrote: Vec::new(),
            outputs_dir: None,
        }
    }

    pub fn team(&self) -> &str {
        &self.spec.team
    }

    /// How long the current attempt has held its placement at `now` (from
    /// its start, or from its placement while it has not started), in ms.
    pub fn run_ms(&self, now: u64) -> u64 {
        now.saturating_sub(self.started_at.or(self.scheduled_at).unwrap_or(now))
    }

    /// Nodes the current attempt runs on, comma-separated, for tables.
    pub fn nodes_summary(&self) -> String {
        let mut nodes: Vec<&str> = self.placement.iter().map(|p| p.node.as_str()).collect();
        nodes.dedup();
        nodes.join(",")
    }
}

/// One transition or notable fact in a job's life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub job_id: JobId,
    /// Milliseconds since the Unix epoch.
    pub time: u64,
    /// `submitted`, `scheduled`, `started`, `exited`, `succeeded`, `failed`,
    /// `cancelled`, `lost`, `requeued`, `warning`.
    pub kind: String,
    pub message: String,
}

impl Event {
    pub fn new(job_id: JobId, time: u64, kind: &str, message: impl Into<String>) -> Event {
        Event {
            job_id,
            time,
            kind: kind.to_string(),
            message: message.into(),
        }
    }
}
