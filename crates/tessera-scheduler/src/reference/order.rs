//! The order in which queued jobs are considered: priority classes, then
//! (under fair share) the team with the smallest weighted dominant share,
//! then the policy's order within. Fair share is dynamic: a team's share
//! grows with each job placed in the pass.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rustc_hash::FxHashMap as HashMap;

use crate::policy::Within;
use crate::{PendingJob, RunningJob, Snapshot};

/// A job's place in the order; smaller comes first. Comparable between
/// queued and running jobs (for preemption).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    class: i64,
    primary: u64,
    fine: u64,
    submitted_at: u64,
    id: u64,
}

impl Key {
    /// The priority class (smaller is a higher priority).
    pub fn class(&self) -> i64 {
        self.class
    }

    /// Whether this job ranks strictly after `other` on what the policy
    /// orders by (priority class, then the policy's criterion), ignoring
    /// the submit-time tie-break: a tie-break is no reason to preempt.
    pub fn ranks_after(&self, other: &Key) -> bool {
        (self.class, self.primary) > (other.class, other.primary)
    }
}

pub struct Orderer<'a> {
    snapshot: &'a Snapshot,
    now: u64,
    keys: Vec<Key>,
    mode: Mode,
}

enum Mode {
    Static {
        order: Vec<usize>,
        next: usize,
    },
    Fair {
        /// Per team, queue indices best first, and a cursor.
        teams: Vec<(Vec<usize>, usize)>,
        team_of: Vec<usize>,
        heap: BinaryHeap<TeamTurn>,
        usage: Vec<[f64; 3]>,
        weight: Vec<f64>,
        history: Vec<f64>,
        total: [f64; 3],
        last: Option<usize>,
    },
}

/// A team's turn; the heap pops the best (highest class, smallest share
/// moved by history, smallest share after the job).
#[derive(Debug, PartialEq)]
struct TeamTurn {
    class: i64,
    level: u64,
    share: f64,
    after: f64,
    team: usize,
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
    ((wall as u128 * job.service_weight_milli() as u128) / 1000) as u64
}

fn key_of(snapshot: &Snapshot, job: &PendingJob, running_for_ms: u64) -> Key {
    let policy = &snapshot.policy;
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
            crate::order::time_level(fine)
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

fn dominant(usage: &[f64; 3], total: &[f64; 3], weight: f64) -> f64 {
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

impl<'a> Orderer<'a> {
    pub fn new(snapshot: &'a Snapshot, now: u64) -> Orderer<'a> {
        let keys: Vec<Key> = snapshot
            .queue
            .iter()
            .map(|j| key_of(snapshot, j, 0))
            .collect();
        let mode = if snapshot.policy.fair_share {
            let mut index: HashMap<&str, usize> = HashMap::default();
            let mut teams: Vec<(Vec<usize>, usize)> = Vec::new();
            let mut team_of = Vec::with_capacity(snapshot.queue.len());
            let mut names: Vec<&str> = Vec::new();
            for (i, j) in snapshot.queue.iter().enumerate() {
                let t = *index.entry(j.team.as_str()).or_insert_with(|| {
                    teams.push((Vec::new(), 0));
                    names.push(j.team.as_str());
                    teams.len() - 1
                });
                teams[t].0.push(i);
                team_of.push(t);
            }
            for (list, _) in teams.iter_mut() {
                list.sort_unstable_by_key(|i| keys[*i]);
            }
            let weight: Vec<f64> = names
                .iter()
                .map(|n| {
                    snapshot
                        .teams
                        .iter()
                        .find(|t| t.name == *n)
                        .map(|t| t.weight)
                        .unwrap_or(1.0)
                })
                .collect();
            let recent: Vec<f64> = names
                .iter()
                .map(|n| {
                    snapshot
                        .teams
                        .iter()
                        .find(|t| t.name == *n)
                        .map(|t| t.recent_share)
                        .unwrap_or(0.0)
                })
                .collect();
            let history = crate::order::history_terms(&recent);
            let mut usage = vec![[0.0; 3]; teams.len()];
            for r in &snapshot.running {
                if let Some(t) = index.get(r.job.team.as_str()) {
                    let d = demand(&r.job);
                    for k in 0..3 {
                        usage[*t][k] += d[k];
                    }
                }
            }
            let mut total = [0.0; 3];
            for n in snapshot.nodes.iter().filter(|n| n.schedulable) {
                total[0] += n.cpu_milli as f64;
                total[1] += n.memory_bytes as f64;
                total[2] += n.gpus.iter().filter(|g| g.healthy).count() as f64 * 1000.0;
            }
            let mut heap = BinaryHeap::new();
            for (t, (list, _)) in teams.iter().enumerate() {
                let (share, after) = crate::order::team_turn_shares(
                    &usage[t],
                    &demand(&snapshot.queue[list[0]]),
                    &total,
                    weight[t],
                    history[t],
                );
                heap.push(TeamTurn {
                    class: keys[list[0]].class,
                    level: if snapshot.policy.level_before_share {
                        keys[list[0]].primary
                    } else {
                        0
                    },
                    share,
                    after,
                    team: t,
                });
            }
            Mode::Fair {
                teams,
                team_of,
                heap,
                usage,
                weight,
                history,
                total,
                last: None,
            }
        } else {
            let mut order: Vec<usize> = (0..snapshot.queue.len()).collect();
            order.sort_unstable_by_key(|i| keys[*i]);
            Mode::Static { order, next: 0 }
        };
        Orderer {
            snapshot,
            now,
            keys,
            mode,
        }
    }

    /// The next job to consider, with its key.
    pub fn next(&mut self) -> Option<(usize, Key)> {
        match &mut self.mode {
            Mode::Static { order, next } => {
                let i = *order.get(*next)?;
                *next += 1;
                Some((i, self.keys[i]))
            }
            Mode::Fair {
                teams,
                heap,
                usage,
                weight,
                history,
                total,
                last,
                ..
            } => {
                if let Some(t) = last.take() {
                    let (list, cursor) = &teams[t];
                    if let Some(i) = list.get(*cursor) {
                        let (share, after) = crate::order::team_turn_shares(
                            &usage[t],
                            &demand(&self.snapshot.queue[*i]),
                            total,
                            weight[t],
                            history[t],
                        );
                        heap.push(TeamTurn {
                            class: self.keys[*i].class,
                            level: if self.snapshot.policy.level_before_share {
                                self.keys[*i].primary
                            } else {
                                0
                            },
                            share,
                            after,
                            team: t,
                        });
                    }
                }
                let turn = heap.pop()?;
                let (list, cursor) = &mut teams[turn.team];
                let i = list[*cursor];
                *cursor += 1;
                *last = Some(turn.team);
                Some((i, self.keys[i]))
            }
        }
    }

    /// The job just returned by `next` was placed: its team's share grows.
    pub fn placed(&mut self, qi: usize) {
        if let Mode::Fair { usage, team_of, .. } = &mut self.mode {
            let d = demand(&self.snapshot.queue[qi]);
            let t = team_of[qi];
            for k in 0..3 {
                usage[t][k] += d[k];
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
            Within::AttainedTime => parts.push(format!(
                "level {} after {} s run",
                key_of(self.snapshot, job, 0).primary,
                job.attained_ms / 1000
            )),
            Within::Levels(_) => parts.push(format!(
                "level {} after {gpu_min} GPU-minutes received",
                key_of(self.snapshot, job, 0).primary
            )),
        }
        parts.join(", ")
    }
}
