//! The order in which queued jobs are considered: priority classes, then
//! (under fair share) the team with the smallest weighted dominant share,
//! then the policy's order within; under [`Policy::level_before_share`],
//! the level of the policy's order comes before the teams' shares. Fair
//! share is dynamic: a team's share grows with each job placed in the pass.
//!
//! Whole jobs cannot split a cluster in every ratio (four one-CPU slots
//! cannot go 1:2), so the instantaneous shares can only come within one
//! job of the weights. Two things keep that rounding from always falling
//! the same way: a team's recent share ([`crate::TeamView::recent_share`])
//! moves its turn by up to one job's worth — earlier when it has recently
//! had less than the others, weighted, later when more — so that over time
//! the shares follow the weights; and between teams whose turns tie, the
//! one whose share after its next job would be smaller goes first (the
//! split nearer the weights), not simply the one that queued first.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::policy::{Policy, Within};
use crate::{PendingJob, RunningJob, Snapshot};

/// A job's place in the order; smaller comes first. Comparable between
/// queued and running jobs (for preemption).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    class: i64,
    primary: u64,
    /// Orders jobs of the same `primary` before submit time, and like it
    /// is no reason to preempt ([`Within::AttainedTime`]: the time run).
    fine: u64,
    submitted_at: u64,
    id: u64,
}

impl Key {
    /// The job it is the key of.
    pub fn job_id(&self) -> u64 {
        self.id
    }

    /// The priority class (smaller is a higher priority).
    pub fn class(&self) -> i64 {
        self.class
    }

    /// Whether this job ranks strictly after `other` on what the policy
    /// orders by (priority class, then the policy's criterion, as a level
    /// under [`Within::AttainedTime`]), ignoring the tie-breaks within (time
    /// run within a level, submit time): a tie-break is no reason to
    /// preempt.
    pub fn ranks_after(&self, other: &Key) -> bool {
        (self.class, self.primary) > (other.class, other.primary)
    }
}

pub struct Orderer<'a> {
    snapshot: &'a Snapshot,
    now: u64,
    mode: Mode,
}

/// A queued job as the walk needs it: its key (which carries its id), where
/// it is in the queue, its team and its request shape — so that walking a
/// long queue reads one array in order instead of the jobs themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub key: Key,
    pub qi: u32,
    pub team: u32,
    pub shape: u32,
}

enum Mode {
    Static {
        order: Vec<Entry>,
        next: usize,
    },
    /// The queue is in order already: entries are made as the walk asks
    /// for them (a walk that stops early never makes the rest).
    InQueueOrder {
        team_of: Vec<u32>,
        next: usize,
    },
    Fair {
        /// Per team, its queued jobs best first, and a cursor.
        teams: Vec<(Vec<Entry>, usize)>,
        /// Per numbered request shape, a job's demand ([`demand`]): the
        /// walk reads a job's demand for its team's turn from here, not
        /// from the job (in a queue of a million, a cache miss per job).
        shape_demand: Vec<[f64; 3]>,
        heap: BinaryHeap<TeamTurn>,
        usage: Vec<[f64; 3]>,
        weight: Vec<f64>,
        /// Per team, how far its recent share lies above the queued teams'
        /// mean, scaled by [`HISTORY_GAIN`] (clamped to one job per turn).
        history: Vec<f64>,
        total: [f64; 3],
        last: Option<usize>,
    },
}

/// How strongly a team's recent share, relative to the other queued
/// teams', moves its turn (before the move is clamped to one job's worth).
/// High, so that a small lasting imbalance already decides the rounding;
/// the clamp keeps any one pass within one job of the current shares.
pub(crate) const HISTORY_GAIN: f64 = 10.0;

/// A team's turn; the heap pops the best (highest class, lowest level when
/// levels come before shares, smallest share, then the smallest share
/// after the job).
#[derive(Debug, PartialEq)]
struct TeamTurn {
    class: i64,
    /// Its next job's level under [`Policy::level_before_share`], else 0.
    level: u64,
    /// The current weighted dominant share, moved by history.
    share: f64,
    /// The weighted dominant share once its next job is placed.
    after: f64,
    team: usize,
}

/// A team's turn for its next job (`demand`), holding `usage`.
pub(crate) fn team_turn_shares(
    usage: &[f64; 3],
    demand: &[f64; 3],
    total: &[f64; 3],
    weight: f64,
    history: f64,
) -> (f64, f64) {
    let now = dominant(usage, total, weight);
    let job = dominant(demand, total, weight);
    let mut after_usage = *usage;
    for k in 0..3 {
        after_usage[k] += demand[k];
    }
    let after = dominant(&after_usage, total, weight);
    (now + history.clamp(-job, job), after)
}

/// Per team, its history term: [`HISTORY_GAIN`] × (its recent share − the
/// mean recent share of the teams listed). All zero when no team has any.
pub(crate) fn history_terms(recent: &[f64]) -> Vec<f64> {
    if recent.is_empty() || recent.iter().all(|r| *r == 0.0) {
        return vec![0.0; recent.len()];
    }
    let mean = recent.iter().sum::<f64>() / recent.len() as f64;
    recent.iter().map(|r| HISTORY_GAIN * (r - mean)).collect()
}

/// What a team's turn compares after the priority class: its next job's
/// level when levels come before shares.
fn turn_level(policy: &Policy, key: &Key) -> u64 {
    if policy.level_before_share {
        key.primary
    } else {
        0
    }
}

impl Eq for TeamTurn {}

impl Ord for TeamTurn {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: reverse so the smallest pops first.
        other
            .class
            .cmp(&self.class)
            .then(other.level.cmp(&self.level))
            .then(other.share.total_cmp(&self.share))
            .then(other.after.total_cmp(&self.after))
            .then(other.team.cmp(&self.team))
    }
}

impl PartialOrd for TeamTurn {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Attained service in GPU-milliseconds (a CPU-only job counts as one GPU).
fn attained_gpu_ms(job: &PendingJob, extra_run_ms: u64) -> u64 {
    let wall = job.attained_ms.saturating_add(extra_run_ms);
    let weight = job.service_weight_milli();
    // The same quotient in 64 bits when the product fits (a 128-bit
    // division is a library call).
    match wall.checked_mul(weight) {
        Some(p) => p / 1000,
        None => ((wall as u128 * weight as u128) / 1000) as u64,
    }
}

fn key_of(snapshot: &Snapshot, job: &PendingJob, running_for_ms: u64) -> Key {
    key_with(&snapshot.policy, job, running_for_ms)
}

/// A queued job's key under `policy`.
pub fn key_for(policy: &Policy, job: &PendingJob) -> Key {
    key_with(policy, job, 0)
}

/// The level of a job that has run `ms` over all its attempts: 0 below one
/// second, then one level per doubling (1 s, 2 s, 4 s, ...).
pub(crate) fn time_level(ms: u64) -> u64 {
    (64 - (ms / 1000).leading_zeros()) as u64
}

#[inline]
fn key_with(policy: &Policy, job: &PendingJob, running_for_ms: u64) -> Key {
    let mut fine = 0;
    let primary = match &policy.within {
        Within::Fifo => 0,
        Within::ShortestJob => job.expected_runtime_ms.unwrap_or(u64::MAX),
        Within::ShortestRemaining => job
            .expected_runtime_ms
            .map(|e| e.saturating_sub(job.attained_ms + running_for_ms))
            .unwrap_or(u64::MAX),
        Within::LeastAttained => attained_gpu_ms(job, running_for_ms),
        Within::Levels(thresholds) => {
            let gpu_s = attained_gpu_ms(job, running_for_ms) / 1000;
            thresholds.iter().filter(|t| gpu_s >= **t).count() as u64
        }
        Within::AttainedTime => {
            fine = job.attained_ms.saturating_add(running_for_ms);
            time_level(fine)
        }
    };
    Key {
        class: if policy.priority_first {
            -(job.priority as i64)
        } else {
            0
        },
        primary,
        fine,
        submitted_at: job.submitted_at,
        id: job.id,
    }
}

pub(crate) fn dominant(usage: &[f64; 3], total: &[f64; 3], weight: f64) -> f64 {
    let mut s: f64 = 0.0;
    for r in 0..3 {
        if total[r] > 0.0 {
            s = s.max(usage[r] / total[r]);
        }
    }
    s / weight.max(1e-9)
}

fn demand(job: &PendingJob) -> [f64; 3] {
    let n = job.replicas as f64;
    [
        job.resources.cpu_milli as f64 * n,
        job.resources.memory_bytes as f64 * n,
        job.resources.gpu_demand_milli() as f64 * n,
    ]
}

/// Whether the queue is in key order already (keys are unique: they end
/// with the job id).
fn in_order(snapshot: &Snapshot) -> bool {
    let mut keys = snapshot.queue.iter().map(|j| key_of(snapshot, j, 0));
    let Some(mut prev) = keys.next() else {
        return true;
    };
    for k in keys {
        if k <= prev {
            return false;
        }
        prev = k;
    }
    true
}

/// Sorts entries by key. The queue usually arrives in submit order and keys
/// take few distinct (class, primary) values, so the entries are first
/// spread over those values (stably) and each run is sorted only when it is
/// not sorted already. Equal to a plain sort: an entry's position depends
/// only on its (unique) value.
fn sort_entries(v: &mut Vec<Entry>) {
    if v.is_sorted() {
        return;
    }
    let mut buckets: Vec<(i64, u64)> = Vec::new();
    for Entry { key: k, .. } in v.iter() {
        let b = (k.class, k.primary);
        if !buckets.contains(&b) {
            if buckets.len() == 8 {
                v.sort_unstable();
                return;
            }
            buckets.push(b);
        }
    }
    buckets.sort_unstable();
    let mut start = vec![0usize; buckets.len() + 1];
    let bucket = |k: &Key| {
        buckets
            .iter()
            .position(|b| *b == (k.class, k.primary))
            .unwrap_or(0)
    };
    for e in v.iter() {
        start[bucket(&e.key) + 1] += 1;
    }
    for b in 0..buckets.len() {
        start[b + 1] += start[b];
    }
    let mut out = vec![v[0]; v.len()];
    let mut at = start.clone();
    for e in v.iter() {
        let b = bucket(&e.key);
        out[at[b]] = *e;
        at[b] += 1;
    }
    for b in 0..buckets.len() {
        let run = &mut out[start[b]..start[b + 1]];
        if !run.is_sorted() {
            run.sort_unstable();
        }
    }
    *v = out;
}

impl<'a> Orderer<'a> {
    /// `team_of` gives each queued job's team, numbered by first appearance
    /// in the queue (`0..teams`), `shape_of` its request shape (or
    /// [`crate::NO_SHAPE`]), `shape_job` a job of each numbered shape,
    /// `running_team` each running job's team (teams with nothing queued
    /// come after), `weight` each team's fair-share weight, `recent` its
    /// recent weighted share.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        snapshot: &'a Snapshot,
        now: u64,
        team_of: &[u32],
        shape_of: &[u32],
        shape_job: &[u32],
        running_team: &[u32],
        teams: usize,
        weight: &[f64],
        recent: &[f64],
    ) -> Orderer<'a> {
        let entries = snapshot.queue.iter().enumerate().map(|(i, j)| Entry {
            key: key_of(snapshot, j, 0),
            qi: i as u32,
            team: team_of[i],
            shape: shape_of[i],
        });
        let mode = if snapshot.policy.fair_share {
            let mut sizes = vec![0usize; teams];
            for t in &team_of[..snapshot.queue.len()] {
                sizes[*t as usize] += 1;
            }
            let mut lists: Vec<(Vec<Entry>, usize)> = sizes
                .into_iter()
                .map(|n| (Vec::with_capacity(n), 0))
                .collect();
            for e in entries {
                lists[e.team as usize].0.push(e);
            }
            for (list, _) in lists.iter_mut() {
                sort_entries(list);
            }
            let weight: Vec<f64> = weight[..teams].to_vec();
            let mut usage = vec![[0.0; 3]; teams];
            for (r, t) in snapshot.running.iter().zip(running_team) {
                let t = *t as usize;
                if t < teams {
                    let d = demand(&r.job);
                    for k in 0..3 {
                        usage[t][k] += d[k];
                    }
                }
            }
            let mut total = [0.0; 3];
            for n in snapshot.nodes.iter().filter(|n| n.schedulable) {
                total[0] += n.cpu_milli as f64;
                total[1] += n.memory_bytes as f64;
                total[2] += n.gpus.iter().filter(|g| g.healthy).count() as f64 * 1000.0;
            }
            let history = history_terms(&recent[..teams]);
            let mut heap = BinaryHeap::new();
            for (t, (list, _)) in lists.iter().enumerate() {
                let job = &snapshot.queue[list[0].qi as usize];
                let (share, after) =
                    team_turn_shares(&usage[t], &demand(job), &total, weight[t], history[t]);
                heap.push(TeamTurn {
                    class: list[0].key.class,
                    level: turn_level(&snapshot.policy, &list[0].key),
                    share,
                    after,
                    team: t,
                });
            }
            Mode::Fair {
                teams: lists,
                shape_demand: shape_job
                    .iter()
                    .map(|qi| demand(&snapshot.queue[*qi as usize]))
                    .collect(),
                heap,
                usage,
                weight,
                history,
                total,
                last: None,
            }
        } else if in_order(snapshot) {
            Mode::InQueueOrder {
                team_of: team_of.to_vec(),
                next: 0,
            }
        } else {
            let mut order: Vec<Entry> = entries.collect();
            sort_entries(&mut order);
            Mode::Static { order, next: 0 }
        };
        Orderer {
            snapshot,
            now,
            mode,
        }
    }

    /// The key of queued job `qi`.
    pub fn key(&self, qi: usize) -> Key {
        key_of(self.snapshot, &self.snapshot.queue[qi], 0)
    }

    /// The next job to consider.
    pub fn next(&mut self) -> Option<Entry> {
        match &mut self.mode {
            Mode::Static { order, next } => {
                let e = *order.get(*next)?;
                *next += 1;
                Some(e)
            }
            Mode::InQueueOrder { team_of, next } => {
                let qi = *next;
                let job = self.snapshot.queue.get(qi)?;
                *next += 1;
                Some(Entry {
                    key: key_of(self.snapshot, job, 0),
                    qi: qi as u32,
                    team: team_of[qi],
                    // Numbered by the walk when it needs it.
                    shape: crate::NO_SHAPE,
                })
            }
            Mode::Fair {
                teams,
                shape_demand,
                heap,
                usage,
                weight,
                history,
                total,
                last,
            } => {
                if let Some(t) = last.take() {
                    let (list, cursor) = &mut teams[t];
                    if let Some(&e) = list.get(*cursor) {
                        let d = match shape_demand.get(e.shape as usize) {
                            Some(d) => *d,
                            None => demand(&self.snapshot.queue[e.qi as usize]),
                        };
                        let (share, after) =
                            team_turn_shares(&usage[t], &d, total, weight[t], history[t]);
                        let turn = TeamTurn {
                            class: e.key.class,
                            level: turn_level(&self.snapshot.policy, &e.key),
                            share,
                            after,
                            team: t,
                        };
                        // Pushing the turn and popping the best would give
                        // it straight back when it beats every other team
                        // (turns are distinct: they name their team).
                        if heap.peek().is_none_or(|top| turn > *top) {
                            *cursor += 1;
                            *last = Some(t);
                            return Some(e);
                        }
                        heap.push(turn);
                    }
                }
                let turn = heap.pop()?;
                let (list, cursor) = &mut teams[turn.team];
                let e = list[*cursor];
                *cursor += 1;
                *last = Some(turn.team);
                Some(e)
            }
        }
    }

    /// The job just returned by `next` was placed: its team's share grows.
    pub fn placed(&mut self, qi: usize, team: usize) {
        if let Mode::Fair { usage, .. } = &mut self.mode {
            let d = demand(&self.snapshot.queue[qi]);
            for k in 0..3 {
                usage[team][k] += d[k];
            }
        }
    }

    /// A running job's key, as if it were queued now.
    pub fn running_key(&self, r: &RunningJob) -> Key {
        key_of(self.snapshot, &r.job, self.now.saturating_sub(r.started_at))
    }

    /// Why a job ranks where it does, for preemption reasons.
    pub fn describe(&self, job: &PendingJob) -> String {
        let mut parts = Vec::new();
        if self.snapshot.policy.priority_first {
            parts.push(format!("priority {}", job.priority));
        }
        let gpu_min = attained_gpu_ms(job, 0) / 60_000;
        match &self.snapshot.policy.within {
            Within::Fifo => parts.push("submitted earlier".into()),
            Within::ShortestJob | Within::ShortestRemaining => parts.push(format!(
                "{}s expected",
                job.expected_runtime_ms.unwrap_or(0) / 1000
            )),
            Within::LeastAttained => parts.push(format!("{gpu_min} GPU-minutes received")),
            Within::Levels(_) => parts.push(format!(
                "level {} after {gpu_min} GPU-minutes received",
                key_of(self.snapshot, job, 0).primary
            )),
            Within::AttainedTime => parts.push(format!(
                "level {} after {} s run",
                key_of(self.snapshot, job, 0).primary,
                job.attained_ms / 1000
            )),
        }
        parts.join(", ")
    }
}
