//! Tessera's scheduler: a pure, deterministic function from a snapshot of
//! the cluster, its queue, what runs and the policy (and the time, passed in)
//! to a [`Plan`]: placements, preemptions, and a reason for every job left
//! waiting.
//!
//! This crate owns scheduling policy. It does no I/O, reads no clock, draws
//! no random numbers and knows nothing of tokio, HTTP or the store: the
//! server's control loop builds a [`Snapshot`], calls [`schedule`], checks
//! the plan against current state and applies it; `tessera sim` replays
//! traces through the same function in virtual time.
//!
//! One pass:
//! 1. order the queue: priority classes, then (under fair share) the team
//!    with the smallest weighted dominant share, then the policy's order
//!    within ([`policy::Within`]); or, with
//!    [`Policy::level_before_share`], the policy's level before the
//!    teams' shares;
//! 2. walk it, placing each job whole (all replicas of a gang or none) with
//!    the policy's packing; the first job that cannot start gets a
//!    reservation under backfill, and later jobs may use only what it does
//!    not need (or what they give back before it could start); under strict
//!    FIFO nothing passes it;
//! 3. under preemption, for jobs still waiting, pick running jobs later in
//!    the order whose eviction makes room where the walk would place the
//!    job (outside the reservation, as in 2), and name them in the plan
//!    (the waiting job starts on a later pass, once they are gone).

pub mod frag;
mod order;
mod place;
pub mod policy;

use std::collections::BTreeMap;
use std::sync::Arc;

use rustc_hash::FxHashMap as HashMap;

pub use order::Key as QueueKey;
pub use policy::{Packing, Policy, Within};
use tessera_core::quantity::{format_cpu, format_memory};
use tessera_core::{JobId, Resources};

use crate::order::{Key, Orderer};
use crate::place::{Cluster, Demand};

/// One GPU device slot on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuSlot {
    pub index: u32,
    pub model: String,
    pub healthy: bool,
    /// Thousandths of the device not held by any replica (1000 = all free).
    pub free_milli: u32,
}

/// A node as the scheduler sees it: capacity, what is free right now, and
/// its price.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub name: String,
    /// False for cordoned, draining or lost nodes.
    pub schedulable: bool,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub free_cpu_milli: u64,
    pub free_memory_bytes: u64,
    /// Of the free CPU and memory, how much lies beyond what the node can
    /// run now: room in an engine's own queue (a pool's queue-ahead), where
    /// a job placed there waits for the engine to start it. Placement takes
    /// such room only where no node can start the replica now (a replica
    /// that can start at once does not queue behind an engine's jobs to
    /// save a price). 0 for an agent's node.
    pub ahead_cpu_milli: u64,
    pub ahead_memory_bytes: u64,
    pub gpus: Vec<GpuSlot>,
    /// Per hour: one CPU core, one GiB of memory, one GPU.
    pub price_per_hour: [f64; 3],
    /// The node's labels, which jobs' node selectors match.
    pub labels: BTreeMap<String, String>,
}

impl NodeView {
    /// An empty, schedulable node (handy for tests, benchmarks, simulation).
    pub fn new(name: impl Into<String>, cpu_milli: u64, memory_bytes: u64) -> NodeView {
        NodeView {
            name: name.into(),
            schedulable: true,
            cpu_milli,
            memory_bytes,
            free_cpu_milli: cpu_milli,
            free_memory_bytes: memory_bytes,
            ahead_cpu_milli: 0,
            ahead_memory_bytes: 0,
            gpus: Vec::new(),
            price_per_hour: [0.0; 3],
            labels: BTreeMap::new(),
        }
    }

    /// Adds a label.
    pub fn with_label(mut self, key: &str, value: &str) -> NodeView {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    /// Adds `n` free, healthy GPUs of `model`.
    pub fn with_gpus(mut self, n: u32, model: &str) -> NodeView {
        let start = self.gpus.len() as u32;
        for i in 0..n {
            self.gpus.push(GpuSlot {
                index: start + i,
                model: model.to_string(),
                healthy: true,
                free_milli: 1000,
            });
        }
        self
    }
}

/// A job waiting to be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingJob {
    pub id: JobId,
    pub team: String,
    pub priority: i32,
    pub submitted_at: u64,
    /// Per replica.
    pub resources: Resources,
    pub replicas: u32,
    /// The job's own limit, when it declares one.
    pub max_runtime_ms: Option<u64>,
    /// Known run time (simulations) — read only by the oracle policies.
    pub expected_runtime_ms: Option<u64>,
    /// Wall time this job has already run over earlier attempts.
    pub attained_ms: u64,
    /// The job keeps its progress when stopped (it checkpoints, or the
    /// simulation assumes so). Only such jobs are preempted for the policy's
    /// order (attained service, remaining time); any preemptible job can be
    /// preempted for a higher priority.
    pub resumable: bool,
    /// May running jobs be preempted to make room for it (for its priority
    /// or the policy's order)? Guaranteed quota is reclaimed for it either way.
    pub may_preempt: bool,
}

impl PendingJob {
    pub fn new(
        id: JobId,
        team: impl Into<String>,
        priority: i32,
        submitted_at: u64,
        resources: Resources,
        replicas: u32,
    ) -> PendingJob {
        PendingJob {
            id,
            team: team.into(),
            priority,
            submitted_at,
            resources,
            replicas,
            max_runtime_ms: None,
            expected_runtime_ms: None,
            attained_ms: 0,
            resumable: false,
            may_preempt: true,
        }
    }

    /// GPUs the job holds while it runs, in thousandths (a CPU-only job
    /// counts as one GPU's worth for attained service).
    fn service_weight_milli(&self) -> u64 {
        (self.resources.gpu_demand_milli() * self.replicas as u64).max(1000)
    }
}

/// A job that holds resources now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningJob {
    /// Its request; `attained_ms` counts earlier attempts only.
    pub job: PendingJob,
    pub started_at: u64,
    pub assignments: Vec<Assignment>,
    /// Whether the policy may preempt it.
    pub preemptible: bool,
}

/// Amounts of the three scheduled resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amounts {
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    /// Thousandths of a GPU.
    pub gpu_milli: u64,
}

impl Amounts {
    pub const ZERO: Amounts = Amounts {
        cpu_milli: 0,
        memory_bytes: 0,
        gpu_milli: 0,
    };
    pub const UNLIMITED: Amounts = Amounts {
        cpu_milli: u64::MAX,
        memory_bytes: u64::MAX,
        gpu_milli: u64::MAX,
    };

    fn as_array(&self) -> [u64; 3] {
        [self.cpu_milli, self.memory_bytes, self.gpu_milli]
    }
}

/// A team's quota: what it is guaranteed, and how far it may go by
/// borrowing what other teams leave idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub guaranteed: Amounts,
    pub limit: Amounts,
}

/// A team's fair-share weight and quota.
#[derive(Debug, Clone, PartialEq)]
pub struct TeamView {
    pub name: String,
    pub weight: f64,
    /// `None`: no guarantee and no limit (everything it uses is borrowed).
    pub quota: Option<Quota>,
    /// The team's weighted dominant share averaged over the recent past
    /// (the caller keeps the average; see [`weighted_shares`]). Under fair
    /// share, among teams whose current shares lie within one job of each
    /// other, the one that has recently had less goes first, so that over
    /// time shares follow the weights even where whole jobs cannot split
    /// the cluster in their ratio. 0 for all teams: no history.
    pub recent_share: f64,
}

impl TeamView {
    /// A team with a weight, no quota and no history.
    pub fn new(name: impl Into<String>, weight: f64) -> TeamView {
        TeamView {
            name: name.into(),
            weight,
            quota: None,
            recent_share: 0.0,
        }
    }
}

/// Everything the scheduler looks at.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub nodes: Vec<NodeView>,
    /// In any order; the scheduler orders it.
    pub queue: Vec<PendingJob>,
    /// Jobs holding resources (their usage is already out of the nodes'
    /// free capacity).
    pub running: Vec<RunningJob>,
    /// Fair-share weights; teams not listed weigh 1.
    pub teams: Vec<TeamView>,
    pub policy: Policy,
}

/// Where one replica goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub replica: u32,
    /// Index into [`Snapshot::nodes`].
    pub node: usize,
    /// GPU indices on that node (one, shared, for a fractional request).
    pub gpus: Vec<u32>,
}

/// A job placed whole: one assignment per replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub job_id: JobId,
    pub assignments: Vec<Assignment>,
}

/// A job left in the queue, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub job_id: JobId,
    /// Shared between the jobs that wait for the same reason.
    pub reason: Arc<str>,
}

/// A running job to stop and requeue so that `for_job` can start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preemption {
    pub job_id: JobId,
    pub for_job: JobId,
    pub reason: String,
}

/// The scheduler's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// In scheduling order.
    pub placements: Vec<Placement>,
    pub waiting: Vec<Waiting>,
    pub preemptions: Vec<Preemption>,
}

/// A request shape: within one pass, jobs of the same shape fit or fail
/// together while free capacity only shrinks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Shape<'a> {
    cpu: u64,
    mem: u64,
    gpu: u32,
    gpu_milli: u32,
    models: &'a [String],
    selector: &'a BTreeMap<String, String>,
    replicas: u32,
}

impl<'a> Shape<'a> {
    fn of(j: &'a PendingJob) -> Shape<'a> {
        Shape {
            cpu: j.resources.cpu_milli,
            mem: j.resources.memory_bytes,
            gpu: j.resources.gpu,
            gpu_milli: j.resources.gpu_milli,
            models: &j.resources.gpu_models,
            selector: &j.resources.node_selector,
            replicas: j.replicas,
        }
    }
}

/// Teams and request shapes, numbered once per pass, so that the walk over
/// the queue indexes small arrays instead of hashing names and requests for
/// every job.
struct Index<'a> {
    snapshot: &'a Snapshot,
    /// Whether some queued job has a run-time bound ([`bound`]), where the
    /// queue was read for teams anyway (see [`Index::any_bound`]).
    bounded: Option<bool>,
    /// Team names: the queued jobs' teams first, in order of first
    /// appearance in the queue (fair share breaks ties by it), then the
    /// running jobs' and the listed teams'.
    names: Vec<&'a str>,
    /// How many teams have queued jobs (`0..queued_teams`).
    queued_teams: usize,
    /// Per queued job, its team and its shape.
    team_of: Vec<u32>,
    shape_of: Vec<u32>,
    shapes: HashMap<Shape<'a>, u32>,
    /// The shape numbered last, and its number.
    last_shape: Option<(Shape<'a>, u32)>,
    /// Per running job, its team.
    running_team: Vec<u32>,
    /// Per team: its quota (the last listed with one), its weight (the first
    /// listed; 1 when not listed).
    quota: Vec<Option<&'a Quota>>,
    weight: Vec<f64>,
    /// Per team, its recent weighted share (the first listed; 0 when not
    /// listed).
    recent: Vec<f64>,
    /// Per shape, a job's total demand ([`job_amounts`]), its first job and
    /// how many jobs ask for it.
    amounts: Vec<[u64; 3]>,
    shape_job: Vec<u32>,
    shape_count: Vec<u64>,
}

/// A shape not numbered yet (see [`Index::lazy_shapes`]).
pub(crate) const NO_SHAPE: u32 = u32::MAX;

impl<'a> Index<'a> {
    fn new(snapshot: &'a Snapshot) -> Index<'a> {
        let policy = &snapshot.policy;
        let n = snapshot.queue.len();
        // Teams matter only to fair share and quotas; without them every job
        // counts as one team's.
        let by_team = policy.fair_share || snapshot.teams.iter().any(|t| t.quota.is_some());
        let mut ids: HashMap<&'a str, u32> = HashMap::default();
        let mut names: Vec<&'a str> = Vec::new();
        // The team interned last: jobs in a row are often of one team, and
        // comparing a name is cheaper than looking it up.
        let mut last: Option<(&'a str, u32)> = None;
        let mut intern = |name: &'a str| {
            if !by_team {
                if names.is_empty() {
                    names.push("");
                }
                return 0;
            }
            if let Some((n, id)) = last {
                if n == name {
                    return id;
                }
            }
            let id = *ids.entry(name).or_insert_with(|| {
                names.push(name);
                names.len() as u32 - 1
            });
            last = Some((name, id));
            id
        };
        let mut bounded = None;
        let (team_of, queued_teams) = if by_team {
            // Whether a job has a run-time bound is noted on the way (the
            // walk then need not read each job for one).
            let mut any = false;
            let team_of: Vec<u32> = snapshot
                .queue
                .iter()
                .map(|j| {
                    any |= bound(j, policy).is_some();
                    intern(j.team.as_str())
                })
                .collect();
            bounded = Some(any);
            let queued = team_of.iter().max().map_or(0, |t| *t as usize + 1);
            (team_of, queued)
        } else if n > 0 {
            intern("");
            (vec![0; n], 1)
        } else {
            (Vec::new(), 0)
        };
        let running_team = snapshot
            .running
            .iter()
            .map(|r| intern(r.job.team.as_str()))
            .collect();
        let listed: Vec<u32> = snapshot
            .teams
            .iter()
            .map(|t| intern(t.name.as_str()))
            .collect();
        let mut quota = vec![None; names.len()];
        let mut weight: Vec<Option<f64>> = vec![None; names.len()];
        let mut recent: Vec<Option<f64>> = vec![None; names.len()];
        if by_team {
            for (t, id) in snapshot.teams.iter().zip(&listed) {
                if let Some(q) = &t.quota {
                    quota[*id as usize] = Some(q);
                }
                weight[*id as usize].get_or_insert(t.weight);
                recent[*id as usize].get_or_insert(t.recent_share);
            }
        }
        let mut ix = Index {
            snapshot,
            bounded,
            names,
            queued_teams,
            team_of,
            shape_of: vec![NO_SHAPE; n],
            shapes: HashMap::default(),
            last_shape: None,
            running_team,
            quota,
            weight: weight.into_iter().map(|w| w.unwrap_or(1.0)).collect(),
            recent: recent.into_iter().map(|r| r.unwrap_or(0.0)).collect(),
            amounts: Vec::new(),
            shape_job: Vec::new(),
            shape_count: Vec::new(),
        };
        if !ix.lazy_shapes() {
            ix.number_all_shapes();
        }
        ix
    }

    /// Under best-fit packing no scoring reads the queue's mix of requests,
    /// and a walk that stops early (strict FIFO behind the first job that
    /// cannot start, or once nothing more can fit) never looks at the
    /// shapes of the jobs after it: shapes are numbered when first needed.
    fn lazy_shapes(&self) -> bool {
        self.snapshot.policy.packing == Packing::BestFit
    }

    /// Whether some queued job has a run-time bound: when none has, no job
    /// is in time for a reservation, and the walk reads no job to ask.
    fn any_bound(&self) -> bool {
        self.bounded.unwrap_or_else(|| {
            let policy = &self.snapshot.policy;
            self.snapshot
                .queue
                .iter()
                .any(|j| bound(j, policy).is_some())
        })
    }

    /// Queued job `qi`'s shape, numbered on first sight.
    fn shape(&mut self, qi: usize) -> u32 {
        let s = self.shape_of[qi];
        if s != NO_SHAPE {
            return s;
        }
        let j = &self.snapshot.queue[qi];
        let shape = Shape::of(j);
        // Jobs in a row often ask for the same: compare before hashing.
        let s = match &self.last_shape {
            Some((last, s)) if *last == shape => *s,
            _ => {
                let next = self.amounts.len() as u32;
                let s = *self.shapes.entry(shape.clone()).or_insert(next);
                if s == next {
                    self.amounts.push(job_amounts(j));
                    self.shape_job.push(qi as u32);
                    self.shape_count.push(0);
                }
                self.last_shape = Some((shape, s));
                s
            }
        };
        self.shape_count[s as usize] += 1;
        self.shape_of[qi] = s;
        s
    }

    fn number_all_shapes(&mut self) {
        for qi in 0..self.shape_of.len() {
            self.shape(qi);
        }
    }

    /// What each team's running jobs hold.
    fn usage(&self, snapshot: &Snapshot) -> Vec<[u64; 3]> {
        let mut usage = vec![[0u64; 3]; self.names.len()];
        for (r, t) in snapshot.running.iter().zip(&self.running_team) {
            let d = job_amounts(&r.job);
            let u = &mut usage[*t as usize];
            for k in 0..3 {
                u[k] += d[k];
            }
        }
        usage
    }
}

/// Computes a plan. Pure: the same snapshot and time give the same plan.
pub fn schedule(snapshot: &Snapshot, now: u64) -> Plan {
    schedule_with(snapshot, now, true).0
}

/// [`schedule`] for a caller that discards the reasons of waiting jobs (the
/// simulator): the same placements and preemptions (victims and the jobs
/// they make room for), in the same order, and an empty [`Plan::waiting`].
/// No reason is written, preemptions' included, and under strict FIFO
/// (without preemption or quotas, which look at the jobs left waiting) the
/// walk stops at the first job that cannot start, since nothing behind it
/// may start either.
pub fn schedule_without_reasons(snapshot: &Snapshot, now: u64) -> Plan {
    schedule_with(snapshot, now, false).0
}

/// [`schedule_without_reasons`], and whether the plan is sure to settle the
/// snapshot: once it is applied (its jobs started where it says, nothing
/// else changed), a pass at the same time would place and preempt nothing.
/// `false` claims nothing. A caller that repeats passes until one changes
/// nothing (the simulator) may stop after a settling plan.
///
/// A plan settles when it places jobs, preempts none, and (not under strict
/// FIFO or quotas):
/// - every job it leaves waiting fails to fit the capacity left, whatever
///   reservation the next pass makes: a job that failed before any
///   reservation, or with one but in time for it, failed on at least that
///   capacity without one (capacity only shrinks during a walk); a job
///   kept out of a reservation is checked here to fit nowhere at all, since
///   the next pass may reserve elsewhere or for another job (under fair
///   share the jobs placed move the teams' turns);
/// - under preemption, no waiting job can make room in the next pass: its
///   victims would be the same running jobs (the jobs just placed have not
///   run the policy's minimum, or rank before every waiting job), with the
///   same keys at the same time, eligible for the same reasons (which do
///   not read the teams' shares: no fair share, or levels before shares),
///   on the same capacity, and this pass found that releasing all of them
///   does not let it fit — without a reservation to keep out of, or with
///   one but checked to fit nowhere even then. Which waiting job asks first
///   does not matter when none takes a victim.
pub fn schedule_and_settle(snapshot: &Snapshot, now: u64) -> (Plan, bool) {
    schedule_with(snapshot, now, false)
}

fn schedule_with(snapshot: &Snapshot, now: u64, reasons: bool) -> (Plan, bool) {
    let policy = &snapshot.policy;
    let mut ix = Index::new(snapshot);
    // The workload fragmentation scoring expects: the queue, one shape at a
    // time, and what runs.
    let queued = ix.shape_job.iter().zip(&ix.shape_count).map(|(i, n)| {
        let j = &snapshot.queue[*i as usize];
        (&j.resources, j.replicas, *n)
    });
    let running = snapshot
        .running
        .iter()
        .map(|r| (&r.job.resources, r.job.replicas, 1));
    let mut cluster =
        Cluster::with_workload(&snapshot.nodes, policy.packing, queued.chain(running));
    let mut orderer = Orderer::new(
        snapshot,
        now,
        &ix.team_of,
        &ix.shape_of,
        &ix.shape_job,
        &ix.running_team,
        ix.queued_teams,
        &ix.weight,
        &ix.recent,
    );
    let mut plan = Plan {
        waiting: Vec::with_capacity(if reasons { snapshot.queue.len() } else { 0 }),
        ..Plan::default()
    };
    let quotas = snapshot.teams.iter().any(|t| t.quota.is_some());
    // Whether the jobs left waiting are looked at after the walk.
    let keep_waiting = reasons || policy.preempt || quotas;
    // Stands for every reason when none is wanted.
    let no_reason: Arc<str> = Arc::from("");
    // Per shape, the reason it failed, by (reservation made, in time).
    let mut failed: Vec<[Option<Arc<str>>; 4]> = vec![Default::default(); ix.amounts.len()];
    let lazy = ix.lazy_shapes();
    // Per (team, shape), the last quota reason and the usage it was for.
    let mut quota_reasons: HashMap<(u32, u32), ([u64; 3], Arc<str>)> = HashMap::default();
    // The reservation of the first job that could not start (backfill), or
    // the job that blocks all others (strict FIFO).
    let mut reservation: Option<place::Reservation> = None;
    let mut blocked_by: Option<Arc<str>> = None;
    let mut tried_reservation = false;
    // Whether a queued job has a run-time bound, once a reservation asks.
    let mut any_bound = false;
    let mut waiting_jobs: Vec<u32> = Vec::with_capacity(snapshot.queue.len());
    let mut usage = ix.usage(snapshot);
    // When nothing after the walk looks at the jobs left waiting, the walk
    // ends once no queued job could fit anywhere: each job left would fail,
    // whatever the order, and a failure changes nothing but the plan's
    // reasons (a reservation or a cached failure only stops later jobs).
    // (Under strict FIFO the walk ends at the first job that cannot start
    // anyway.)
    let smallest = if keep_waiting || policy.strict {
        None
    } else {
        Some(place::Smallest::of(&snapshot.queue))
    };
    if smallest.as_ref().is_some_and(|s| !cluster.might_hold(s)) {
        return (plan, false);
    }
    // The worst-ordered job placed (whether the next pass could take it as
    // a victim, see [`schedule_and_settle`]).
    let mut worst_placed: Option<Key> = None;

    // The walk reads queued jobs themselves only to place them: the job id
    // comes with its key, the rest from the index (a queue of a million
    // jobs does not fit in any cache).
    while let Some(entry) = orderer.next() {
        let job_id = entry.key.job_id();
        let qi = entry.qi as usize;
        let team = entry.team;
        let t = team as usize;
        let mut shape = entry.shape;
        if let Some(q) = ix.quota[t] {
            if shape == NO_SHAPE {
                shape = ix.shape(qi);
            }
            let need = ix.amounts[shape as usize];
            let used = usage[t];
            let limit = q.limit.as_array();
            if let Some(r) =
                (0..3).find(|r| need[*r] > 0 && used[*r].saturating_add(need[*r]) > limit[*r])
            {
                if !reasons {
                    if keep_waiting {
                        waiting_jobs.push(qi as u32);
                    }
                    continue;
                }
                let cached = quota_reasons
                    .get(&(team, shape))
                    .filter(|(u, _)| *u == used)
                    .map(|(_, reason)| reason.clone());
                let reason = cached.unwrap_or_else(|| {
                    let reason: Arc<str> =
                        quota_reason(&snapshot.queue[qi].team, r, used[r], need[r], q).into();
                    quota_reasons.insert((team, shape), (used, reason.clone()));
                    reason
                });
                plan.waiting.push(Waiting { job_id, reason });
                waiting_jobs.push(qi as u32);
                continue;
            }
        }
        if let Some(reason) = &blocked_by {
            if !keep_waiting {
                // Strict FIFO: nothing behind the blocked job starts.
                break;
            }
            if !reasons {
                waiting_jobs.push(qi as u32);
                continue;
            }
            plan.waiting.push(Waiting {
                job_id,
                reason: reason.clone(),
            });
            waiting_jobs.push(qi as u32);
            continue;
        }
        // Whether this job would be gone before the reserved one could start.
        let in_time = reservation.as_ref().is_some_and(|r| {
            any_bound
                && bound(&snapshot.queue[qi], policy)
                    .is_some_and(|b| now.saturating_add(b) <= r.start_at)
        });
        if shape == NO_SHAPE {
            shape = ix.shape(qi);
        }
        if failed.len() < ix.amounts.len() {
            failed.resize(ix.amounts.len(), Default::default());
        }
        // Same shape, same outcome within a pass (free capacity only shrinks,
        // the reservation does not change once made).
        let slot = usize::from(reservation.is_some()) * 2 + usize::from(in_time);
        if let Some(reason) = &failed[shape as usize][slot] {
            if reasons {
                plan.waiting.push(Waiting {
                    job_id,
                    reason: reason.clone(),
                });
            }
            waiting_jobs.push(qi as u32);
            continue;
        }
        let job = &snapshot.queue[qi];
        let demand = Demand::of(job);
        let placed = match &reservation {
            None => cluster.place(&demand, None),
            // Outside what the reserved job needs, or anywhere when this job
            // is sure to be gone before that job could start.
            Some(r) => cluster.place(&demand, Some(r)).or_else(|| {
                if in_time {
                    cluster.place(&demand, None)
                } else {
                    None
                }
            }),
        };
        match placed {
            Some(assignments) => {
                orderer.placed(qi, t);
                worst_placed = worst_placed.max(Some(entry.key));
                let d = ix.amounts[shape as usize];
                for r in 0..3 {
                    usage[t][r] += d[r];
                }
                plan.placements.push(Placement {
                    job_id: job.id,
                    assignments,
                });
                if smallest.as_ref().is_some_and(|s| !cluster.might_hold(s)) {
                    break;
                }
            }
            None => {
                let mut reason = if reasons {
                    explain(&snapshot.nodes, &cluster, &job.resources, job.replicas)
                } else {
                    String::new()
                };
                if let Some(r) = reservation.as_ref().filter(|_| reasons) {
                    reason.push_str(&format!(
                        "; capacity it could use is held for job {}, which waits ahead of it",
                        r.job_id
                    ));
                }
                if policy.strict {
                    blocked_by = Some(if reasons {
                        Arc::from(format!(
                            "behind job {}: under strict FIFO no job passes the first one waiting",
                            job.id
                        ))
                    } else {
                        no_reason.clone()
                    });
                } else if policy.backfill && !tried_reservation {
                    tried_reservation = true;
                    any_bound = ix.any_bound();
                    reservation =
                        cluster.reserve(job, &demand, &snapshot.running, now, |j| bound(j, policy));
                    if reasons && reservation.is_some() {
                        reason.push_str("; capacity is held for it as running jobs end");
                    }
                }
                let reason: Arc<str> = if reasons {
                    reason.into()
                } else {
                    no_reason.clone()
                };
                failed[shape as usize][slot] = Some(reason.clone());
                if reasons {
                    plan.waiting.push(Waiting {
                        job_id: job.id,
                        reason,
                    });
                }
                waiting_jobs.push(qi as u32);
            }
        }
    }

    let mut used = vec![false; snapshot.running.len()];
    if lazy && (policy.preempt || quotas) && !snapshot.running.is_empty() {
        ix.number_all_shapes();
    }
    let mut unfenced_room = false;
    if policy.preempt && !snapshot.running.is_empty() {
        preempt(
            snapshot,
            now,
            &ix,
            &mut cluster,
            &orderer,
            &waiting_jobs,
            reservation.as_ref(),
            &usage,
            &mut used,
            &mut plan,
            reasons,
            &mut unfenced_room,
        );
    }
    if quotas && !snapshot.running.is_empty() {
        reclaim(
            snapshot,
            now,
            &ix,
            &mut cluster,
            &waiting_jobs,
            &mut usage,
            &mut used,
            &mut plan,
        );
    }
    // See [`schedule_and_settle`] for why these suffice.
    let settled = !reasons
        && !plan.placements.is_empty()
        && plan.preemptions.is_empty()
        && !policy.strict
        && !quotas
        && (!policy.preempt
            || ((!policy.fair_share || policy.level_before_share)
                && !unfenced_room
                && (policy.min_run_before_preempt_ms > 0
                    || worst_placed.is_none_or(|p| {
                        waiting_jobs
                            .iter()
                            .all(|qi| !p.ranks_after(&orderer.key(*qi as usize)))
                    }))))
        && failed.iter().enumerate().all(|(s, f)| {
            f[2].is_none()
                || !cluster.fits_now(&Demand::of(&snapshot.queue[ix.shape_job[s] as usize]))
        });
    (plan, settled)
}

const RESOURCE_NAMES: [&str; 3] = ["CPU", "memory", "GPU"];

/// A job's total demand: CPU millicores, memory bytes, GPU thousandths.
fn job_amounts(job: &PendingJob) -> [u64; 3] {
    let n = job.replicas as u64;
    [
        job.resources.cpu_milli * n,
        job.resources.memory_bytes * n,
        job.resources.gpu_demand_milli() * n,
    ]
}

fn show_amount(r: usize, v: u64) -> String {
    if v == u64::MAX {
        return "unlimited".into();
    }
    match r {
        1 => format_memory(v),
        // CPU millicores and GPU thousandths read the same way.
        _ => format_cpu(v),
    }
}

/// Why placing a job that needs `need` more of resource `r` would take its
/// team, which holds `used`, past its borrowing limit.
fn quota_reason(team: &str, r: usize, used: u64, need: u64, q: &Quota) -> String {
    format!(
        "team quota: team `{}` holds {} {} and this job needs {} more; its limit is {} (guaranteed {})",
        team,
        show_amount(r, used),
        RESOURCE_NAMES[r],
        show_amount(r, need),
        show_amount(r, q.limit.as_array()[r]),
        show_amount(r, q.guaranteed.as_array()[r]),
    )
}

/// Reclaims guaranteed quota: a waiting job whose team stays within its
/// guarantee (counting the job) and has waited past the grace period gets
/// room by preempting jobs of teams that borrow beyond their guarantee —
/// lowest priority first, then the most recently started.
#[allow(clippy::too_many_arguments)]
fn reclaim(
    snapshot: &Snapshot,
    now: u64,
    ix: &Index,
    cluster: &mut Cluster,
    waiting: &[u32],
    usage: &mut [[u64; 3]],
    used: &mut [bool],
    plan: &mut Plan,
) {
    let grace = snapshot.policy.reclaim_after_ms;
    let already: std::collections::HashSet<JobId> =
        plan.preemptions.iter().map(|p| p.for_job).collect();
    let mut reasons: HashMap<JobId, String> = HashMap::default();
    for qi in waiting {
        let qi = *qi as usize;
        let job = &snapshot.queue[qi];
        if already.contains(&job.id) || now.saturating_sub(job.submitted_at) < grace {
            continue;
        }
        let team = ix.team_of[qi] as usize;
        let Some(q) = ix.quota[team] else {
            continue;
        };
        let need = ix.amounts[ix.shape_of[qi] as usize];
        let mine = usage[team];
        let guaranteed = q.guaranteed.as_array();
        if (0..3).any(|r| need[r] > 0 && mine[r] + need[r] > guaranteed[r]) {
            continue;
        }
        // Borrowers: teams above their guarantee in a resource this job needs.
        let borrowing = |t: usize| {
            let u = usage[t];
            let g = ix.quota[t]
                .map(|q| q.guaranteed.as_array())
                .unwrap_or([0; 3]);
            (0..3).any(|r| need[r] > 0 && u[r] > g[r])
        };
        let mut pool: Vec<usize> = (0..snapshot.running.len())
            .filter(|i| {
                let r = &snapshot.running[*i];
                let t = ix.running_team[*i] as usize;
                !used[*i] && r.preemptible && t != team && borrowing(t)
            })
            .collect();
        if pool.is_empty() {
            continue;
        }
        pool.sort_unstable_by_key(|i| {
            let r = &snapshot.running[*i];
            (r.job.priority, std::cmp::Reverse(r.started_at), r.job.id)
        });
        let demand = Demand::of(job);
        let Ok(chosen) = cluster.make_room(&demand, pool, &snapshot.running, None) else {
            continue;
        };
        let mut names = Vec::new();
        for i in chosen {
            used[i] = true;
            let v = &snapshot.running[i];
            let d = job_amounts(&v.job);
            let u = &mut usage[ix.running_team[i] as usize];
            for r in 0..3 {
                u[r] = u[r].saturating_sub(d[r]);
            }
            names.push(v.job.id.to_string());
            plan.preemptions.push(Preemption {
                job_id: v.job.id,
                for_job: job.id,
                reason: format!(
                    "reclaimed: team `{}` borrows beyond its guaranteed quota, and team `{}` needs its guarantee for job {}",
                    v.job.team, job.team, job.id
                ),
            });
        }
        let u = &mut usage[team];
        for r in 0..3 {
            u[r] += need[r];
        }
        reasons.insert(
            job.id,
            format!(
                "reclaiming team `{}`'s guaranteed quota: starting once job(s) {} of borrowing teams have stopped",
                job.team,
                names.join(", ")
            ),
        );
    }
    if reasons.is_empty() {
        return;
    }
    for w in plan.waiting.iter_mut() {
        if let Some(r) = reasons.remove(&w.job_id) {
            w.reason = r.into();
        }
    }
}

/// A job's run-time bound: its `max_runtime`, or (oracle policies) its
/// known duration less what it has run.
fn bound(job: &PendingJob, policy: &Policy) -> Option<u64> {
    job.max_runtime_ms.or(if policy.oracle_bounds {
        job.expected_runtime_ms
            .map(|e| e.saturating_sub(job.attained_ms))
    } else {
        None
    })
}

/// Running jobs that may be preempted, worst-ordered first, sorted only as
/// far as they are read (most waiting jobs read a few).
struct Victims {
    /// The jobs (key, index into `running`), and how many lead sorted.
    v: std::cell::RefCell<(Vec<(Key, usize)>, usize)>,
}

impl Victims {
    fn new(v: Vec<(Key, usize)>) -> Victims {
        Victims {
            v: std::cell::RefCell::new((v, 0)),
        }
    }

    /// The `i`-th worst-ordered (keys are unique, so the order is that of a
    /// full sort).
    fn get(&self, i: usize) -> Option<(Key, usize)> {
        let mut b = self.v.borrow_mut();
        let (v, sorted) = &mut *b;
        if i >= v.len() {
            return None;
        }
        if i >= *sorted {
            // Sort the next stretch, twice as long as what is sorted; the
            // worst alone first (most passes read only it: one scan).
            let upto = if i == 0 {
                1
            } else {
                (i + 1).max(*sorted * 2).max(32).min(v.len())
            };
            let rest = &mut v[*sorted..];
            let k = upto - *sorted;
            if k < rest.len() {
                rest.select_nth_unstable_by_key(k - 1, |e| std::cmp::Reverse(e.0));
            }
            rest[..k].sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
            *sorted = upto;
        }
        Some(v[i])
    }

    /// Every one, in no particular order.
    fn each(&self, mut f: impl FnMut(&Key, usize)) {
        for (k, i) in self.v.borrow().0.iter() {
            f(k, *i);
        }
    }

    fn iter(&self) -> impl Iterator<Item = (Key, usize)> + '_ {
        (0..).map_while(|i| self.get(i))
    }
}

/// Chooses victims for waiting jobs, best-ordered waiting job first. A
/// victim must come later in the order than the job it makes room for, be
/// preemptible and have run long enough; each is used once. Without
/// `reasons`, preemptions carry no reason (the same victims, for the same
/// jobs, in the same order).
///
/// `waiting` is in the walk's order, so a team's jobs come in key order, and
/// jobs of one team and request shape in non-decreasing key. The jobs a
/// later one of them may take are then a subset of those an earlier one may
/// take: a victim must rank after the job (and a later job ranks no better),
/// the fair-share condition depends only on team and shape, and victims are
/// only ever used up. So once a (shape, team) finds no eligible victim, or
/// none that make room, every later job of that shape and team finds none
/// either and is skipped. (Under fair share the walk's order is not key
/// order across teams, so a skipped job must still reach the stop on the
/// worst victim left where it did before: a job whose shape found no
/// eligible victim is skipped only after that check.)
#[allow(clippy::too_many_arguments)]
fn preempt(
    snapshot: &Snapshot,
    now: u64,
    ix: &Index,
    cluster: &mut Cluster,
    orderer: &Orderer,
    waiting: &[u32],
    reservation: Option<&place::Reservation>,
    usage: &[[u64; 3]],
    used: &mut [bool],
    plan: &mut Plan,
    reasons_wanted: bool,
    unfenced_room: &mut bool,
) {
    let policy = &snapshot.policy;
    // Under fair share, a job may take room from another team only while its
    // own team, room included, stays below that team's weighted dominant
    // share; otherwise the next pass would hand the room straight back.
    let mut total = [0u64; 3];
    for n in snapshot.nodes.iter().filter(|n| n.schedulable) {
        total[0] += n.cpu_milli;
        total[1] += n.memory_bytes;
        total[2] += n.gpus.iter().filter(|g| g.healthy).count() as u64 * 1000;
    }
    let weight = |team: usize| ix.weight[team].max(1e-9);
    let share = |team: usize, extra: [u64; 3]| {
        let u = usage[team];
        let mut s: f64 = 0.0;
        for r in 0..3 {
            if total[r] > 0 {
                s = s.max((u[r] + extra[r]) as f64 / total[r] as f64);
            }
        }
        s / weight(team)
    };
    // Each team's share as it stands (usage does not change here).
    let share_now: Vec<f64> = if policy.fair_share {
        (0..usage.len()).map(|t| share(t, [0; 3])).collect()
    } else {
        Vec::new()
    };
    // Sized up front: a filtered collect would grow it step by step.
    let mut candidates = Vec::with_capacity(snapshot.running.len());
    candidates.extend(
        snapshot
            .running
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                r.preemptible
                    && now.saturating_sub(r.started_at) >= policy.min_run_before_preempt_ms
            })
            .map(|(i, r)| (orderer.running_key(r), i)),
    );
    let victims = Victims::new(candidates);
    // Per node, what the victims of the job at hand hold there.
    let mut released: Vec<[u64; 3]> = Vec::new();
    let mut reasons: HashMap<JobId, String> = HashMap::default();
    // A shape that could not make room cannot for a later job either: later
    // jobs are worse-ordered, so fewer running jobs may yield to them.
    // Keyed by whether the job must keep out of the reservation too, and by
    // team only where the team decides which victims are eligible (fair
    // share with shares before levels): otherwise the walk comes in
    // non-decreasing (class, level) whatever the team, so a later job's
    // eligible victims are a subset of an earlier one's, of any team.
    let team_decides = policy.fair_share && !policy.level_before_share;
    let mut no_room: rustc_hash::FxHashSet<(u32, u32, bool)> = Default::default();
    // A shape and team that found no eligible victim (see above); checked
    // after the stop on the worst victim left, which it must not bypass.
    let mut no_victim: rustc_hash::FxHashSet<(u32, u32)> = Default::default();
    for qi in waiting {
        let qi = *qi as usize;
        let job = &snapshot.queue[qi];
        if !job.may_preempt {
            continue;
        }
        let key = &orderer.key(qi);
        let (team, shape) = (ix.team_of[qi], ix.shape_of[qi]);
        // As the walk places it: outside what the reservation holds unless
        // it is the reserved job or sure to be gone before that one could
        // start. Room made where the next pass would not place it would only
        // go back to the victim.
        let excluding = reservation.filter(|r| {
            r.job_id != job.id
                && bound(job, policy).is_none_or(|b| now.saturating_add(b) > r.start_at)
        });
        let fenced = excluding.is_some();
        let room_key = (shape, if team_decides { team } else { u32::MAX }, fenced);
        if no_room.contains(&room_key) {
            continue;
        }
        let mine_after = share(team as usize, ix.amounts[shape as usize]);
        // A victim comes later in the order; unless it is of a lower
        // priority class, it must also keep its progress when stopped, and
        // under fair share belong to this team or to a team that would
        // still hold more than this one — unless levels come before shares:
        // then a victim that ranks after is at a higher level, and the next
        // pass ranks this job first whatever the shares.
        let eligible = |k: &Key, i: usize| {
            let v = &snapshot.running[i].job;
            let vt = ix.running_team[i];
            !used[i]
                && k.ranks_after(key)
                && (k.class() > key.class()
                    || (v.resumable
                        && (!policy.fair_share
                            || policy.level_before_share
                            || vt == team
                            || mine_after < share_now[vt as usize])))
        };
        // The worst-ordered victim not taken yet: when it does not rank after
        // this job, no victim does, nor for any job after it (victims only
        // get better-ordered from here on).
        if victims
            .iter()
            .find(|(_, i)| !used[*i])
            .is_none_or(|(k, _)| !k.ranks_after(key))
        {
            break;
        }
        if no_victim.contains(&(shape, team)) {
            continue;
        }
        // The victims this job may take, worst first, read only as far as
        // making room needs. Those that rank after this job lead the list
        // (worst first is by key, and ranking after compares a key's
        // leading part), and only they are eligible: the reading stops at
        // the first that does not.
        let mut pool = victims
            .iter()
            .take_while(|(k, _)| k.ranks_after(key))
            .filter(|(k, i)| eligible(k, *i))
            .map(|(_, i)| i)
            .peekable();
        if pool.peek().is_none() {
            no_victim.insert((shape, team));
            continue;
        }
        let demand = Demand::of(job);
        // Most attempts that find no room fail on every node even with
        // all eligible victims gone: ruled out in one look at the victims,
        // unsorted, and the nodes (no room is found without the
        // reservation then either).
        released.clear();
        released.resize(snapshot.nodes.len(), [0; 3]);
        victims.each(|k, i| {
            if k.ranks_after(key) && eligible(k, i) {
                cluster.add_held(&mut released, &snapshot.running[i]);
            }
        });
        if !cluster.might_fit_releasing(&demand, &released) {
            no_room.insert(room_key);
            continue;
        }
        let made = cluster.make_room(&demand, pool, &snapshot.running, excluding);
        if let Err(no) = made {
            no_room.insert(room_key);
            *unfenced_room |= no.unfenced;
        }
        if let Ok(chosen) = made {
            let reason = if reasons_wanted {
                format!(
                    "preempted for job {} ({}), which comes first under policy `{}`",
                    job.id,
                    orderer.describe(job),
                    policy.name
                )
            } else {
                String::new()
            };
            for i in &chosen {
                used[*i] = true;
                let v = &snapshot.running[*i];
                plan.preemptions.push(Preemption {
                    job_id: v.job.id,
                    for_job: job.id,
                    reason: reason.clone(),
                });
            }
            if !reasons_wanted {
                continue;
            }
            let names: Vec<String> = chosen
                .iter()
                .map(|i| snapshot.running[*i].job.id.to_string())
                .collect();
            reasons.insert(
                job.id,
                format!(
                    "starting once preempted job(s) {} have stopped",
                    names.join(", ")
                ),
            );
        }
    }
    if reasons.is_empty() {
        return;
    }
    for w in plan.waiting.iter_mut() {
        if let Some(r) = reasons.remove(&w.job_id) {
            w.reason = r.into();
        }
    }
}

/// Whether queued job `a` comes before queued job `b` in the order `policy`
/// gives the queue apart from fair share (priority class, the policy's
/// criterion, submit time, id). Under a policy without fair share, this is
/// the order in which a pass considers them.
pub fn ranks_before(policy: &Policy, a: &PendingJob, b: &PendingJob) -> bool {
    queue_key(policy, a) < queue_key(policy, b)
}

/// Queued job `job`'s place in the order of [`ranks_before`]: `a` ranks
/// before `b` exactly when its key is smaller. Keys are unique (they end
/// with the job id) and do not change while a job waits. A queue kept
/// sorted by it is walked as it stands, without sorting, by policies
/// without fair share.
pub fn queue_key(policy: &Policy, job: &PendingJob) -> QueueKey {
    order::key_for(policy, job)
}

/// Each team's weighted dominant share of the schedulable capacity that its
/// running jobs for which `counts` holds have now (what fair share
/// compares), by team name: the input a caller averages over time into
/// [`TeamView::recent_share`]. The server counts only jobs that have
/// started, so that the average follows what accounting will bill (a
/// pool's job placed but still being launched by its engine holds
/// capacity, but uses none yet). Teams not listed weigh 1; teams holding
/// nothing are left out.
pub fn weighted_shares(
    snapshot: &Snapshot,
    counts: impl Fn(&RunningJob) -> bool,
) -> BTreeMap<String, f64> {
    let mut total = [0.0f64; 3];
    for n in snapshot.nodes.iter().filter(|n| n.schedulable) {
        total[0] += n.cpu_milli as f64;
        total[1] += n.memory_bytes as f64;
        total[2] += n.gpus.iter().filter(|g| g.healthy).count() as f64 * 1000.0;
    }
    let mut usage: BTreeMap<&str, [f64; 3]> = BTreeMap::new();
    for r in snapshot.running.iter().filter(|r| counts(r)) {
        let d = job_amounts(&r.job);
        let u = usage.entry(r.job.team.as_str()).or_default();
        for k in 0..3 {
            u[k] += d[k] as f64;
        }
    }
    usage
        .into_iter()
        .map(|(team, u)| {
            let weight = snapshot
                .teams
                .iter()
                .find(|t| t.name == team)
                .map_or(1.0, |t| t.weight);
            (team.to_string(), order::dominant(&u, &total, weight))
        })
        .collect()
}

/// Each team's weighted dominant share averaged over the recent past: an
/// exponential moving average of [`weighted_shares`], kept by the caller
/// across passes and handed back as [`TeamView::recent_share`]. Pure: the
/// caller passes the time.
#[derive(Debug, Clone, PartialEq)]
pub struct RecentShares {
    /// The average's time constant: a share held this long counts 63 %.
    pub time_constant_ms: u64,
    /// The first observation, and the last.
    since: Option<u64>,
    at: Option<u64>,
    values: BTreeMap<String, f64>,
}

impl RecentShares {
    /// The server's time constant: five minutes.
    pub const DEFAULT_TIME_CONSTANT_MS: u64 = 300_000;

    pub fn new(time_constant_ms: u64) -> RecentShares {
        RecentShares {
            time_constant_ms: time_constant_ms.max(1),
            since: None,
            at: None,
            values: BTreeMap::new(),
        }
    }

    /// Adds the interval since the last call, during which each team held
    /// `shares` (teams not named held nothing).
    pub fn observe(&mut self, now: u64, shares: &BTreeMap<String, f64>) {
        let dt = match self.at {
            Some(at) if now > at => now - at,
            Some(_) => return,
            None => {
                self.since = Some(now);
                self.at = Some(now);
                return;
            }
        };
        self.at = Some(now);
        let keep = (-(dt as f64) / self.time_constant_ms as f64).exp();
        for v in self.values.values_mut() {
            *v *= keep;
        }
        for (team, s) in shares {
            *self.values.entry(team.clone()).or_default() += (1.0 - keep) * s;
        }
        self.values.retain(|_, v| *v > 1e-9);
    }

    /// A team's recent weighted share (0 for a team not seen lately): the
    /// average over the time observed so far when that is shorter than a
    /// few time constants. The moving average starts from nothing, so
    /// early on it holds only the weight `1 − e^(−observed/τ)`; dividing by
    /// that weight makes it the mean of what was seen instead of a value
    /// pulled towards 0, so that a lasting imbalance counts from the first
    /// minutes after a start, not only after five.
    pub fn get(&self, team: &str) -> f64 {
        let Some(v) = self.values.get(team).copied() else {
            return 0.0;
        };
        let observed = match (self.since, self.at) {
            (Some(since), Some(at)) if at > since => (at - since) as f64,
            _ => return 0.0,
        };
        let weight = 1.0 - (-observed / self.time_constant_ms as f64).exp();
        if weight > 0.0 {
            v / weight
        } else {
            0.0
        }
    }
}

impl Default for RecentShares {
    fn default() -> Self {
        RecentShares::new(RecentShares::DEFAULT_TIME_CONSTANT_MS)
    }
}

/// Why a job that fits no node *that exists* can never run, or `None` when
/// some set of nodes could hold it once they are empty. Used to refuse such
/// jobs at submit time instead of queueing them forever.
pub fn infeasible_reason(nodes: &[NodeView], r: &Resources, replicas: u32) -> Option<String> {
    if !nodes.is_empty() && !nodes.iter().any(|n| r.selects(&n.labels)) {
        return Some(no_node_selected(r));
    }
    let all: Vec<(&NodeView, u64)> = nodes
        .iter()
        .filter(|n| r.selects(&n.labels))
        .map(|n| (n, 1))
        .collect();
    infeasible_among(&all, r, replicas)
}

fn no_node_selected(r: &Resources) -> String {
    format!(
        "no node has the labels the job selects ({})",
        r.selector_summary()
    )
}

/// Over nodes with a multiplicity (alike nodes counted once, weighted).
fn infeasible_among(live: &[(&NodeView, u64)], r: &Resources, replicas: u32) -> Option<String> {
    if live.is_empty() {
        return Some("the cluster has no nodes".into());
    }
    let slots: u64 = live
        .iter()
        .map(|(n, count)| place::slots_when_empty(n, r).saturating_mul(*count))
        .fold(0u64, |a, b| a.saturating_add(b));
    if slots == 0 {
        return Some(format!(
            "no node can ever fit one replica: each needs {}; {}",
            describe(r),
            largest_node(live, r)
        ));
    }
    if slots < replicas as u64 {
        return Some(format!(
            "the cluster can hold at most {slots} of the {replicas} replicas at once (each needs {}), and a gang starts all replicas together",
            describe(r)
        ));
    }
    None
}

fn describe(r: &Resources) -> String {
    let mut s = format!(
        "{} CPU, {} memory",
        format_cpu(r.cpu_milli),
        format_memory(r.memory_bytes)
    );
    if r.gpu > 0 {
        s.push_str(&format!(", {} GPU", r.gpu));
    } else if r.gpu_milli > 0 {
        s.push_str(&format!(", {} of a GPU", r.gpu_milli as f64 / 1000.0));
    }
    if r.wants_gpu() && !r.gpu_models.is_empty() {
        s.push_str(&format!(" ({})", r.gpu_models.join(" or ")));
    }
    s
}

fn largest_node(nodes: &[(&NodeView, u64)], r: &Resources) -> String {
    let max_cpu = nodes.iter().map(|(n, _)| n.cpu_milli).max().unwrap_or(0);
    let max_mem = nodes.iter().map(|(n, _)| n.memory_bytes).max().unwrap_or(0);
    let max_gpu = nodes
        .iter()
        .map(|(n, _)| {
            n.gpus
                .iter()
                .filter(|g| g.healthy && r.gpu_model_allowed(&g.model))
                .count()
        })
        .max()
        .unwrap_or(0);
    let mut s = format!(
        "the largest node has {} CPU, {} memory",
        format_cpu(max_cpu),
        format_memory(max_mem)
    );
    if r.wants_gpu() {
        if r.gpu_models.is_empty() {
            s.push_str(&format!(", {max_gpu} GPU"));
        } else {
            s.push_str(&format!(
                ", {max_gpu} GPU of model {}",
                r.gpu_models.join(" or ")
            ));
        }
    }
    s
}

/// A reason for a job that did not fit in this pass.
fn explain(nodes: &[NodeView], cluster: &Cluster, r: &Resources, replicas: u32) -> String {
    // Alike nodes answer alike: look at one node of each class, weighted.
    let live: Vec<(&NodeView, u64)> = cluster
        .classes()
        .filter(|(n, _)| nodes[*n].schedulable && r.selects(&nodes[*n].labels))
        .map(|(n, count)| (&nodes[n], count as u64))
        .collect();
    let schedulable: u64 = live.iter().map(|(_, c)| c).sum();
    if schedulable == 0 && !r.node_selector.is_empty() {
        return format!(
            "no schedulable node has the labels the job selects ({})",
            r.selector_summary()
        );
    }
    if schedulable == 0 {
        return format!(
            "no schedulable node: all {} node(s) are cordoned, draining or lost",
            nodes.len()
        );
    }
    if let Some(why) = infeasible_among(&live, r, replicas) {
        return format!("cannot run on the schedulable nodes: {why}");
    }
    let need = describe(r);
    let short = cluster.short_of(r);
    let fit_now = cluster.nodes_fitting(r);
    let binding = if short.is_empty() && fit_now > 0 {
        "not enough room for all replicas at once".to_string()
    } else if short.is_empty() {
        "no single node has all of it free at once".to_string()
    } else {
        format!("not enough free {} on any node", short.join(" and "))
    };
    if replicas > 1 {
        format!(
            "waiting for capacity: a gang of {replicas} replicas, each needing {need}, starts all together; {fit_now} of {schedulable} schedulable nodes fit a replica now ({binding})"
        )
    } else {
        format!("waiting for capacity: needs {need}; {binding}")
    }
}

#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;
