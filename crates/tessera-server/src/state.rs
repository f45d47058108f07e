//! The control plane's working state, in memory, written through to the
//! store. Every job state change goes through [`ClusterState::update_job`],
//! which keeps the queued/active indexes right and returns the store write.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tessera_core::auth::{Team, TokenRecord};
use tessera_core::node::{Node, NodeState};
use tessera_core::{Event, Job, JobId, JobState};
use tessera_scheduler::{
    Amounts, Assignment, GpuSlot, NodeView, PendingJob, Policy, Quota, RunningJob, Snapshot,
    TeamView,
};
use tessera_store::{Loaded, Write};

#[derive(Debug, Default)]
pub struct ClusterState {
    pub jobs: BTreeMap<JobId, Job>,
    pub events: HashMap<JobId, Vec<Event>>,
    pub queued: BTreeSet<JobId>,
    pub active: BTreeSet<JobId>,
    pub nodes: BTreeMap<String, Node>,
    pub teams: BTreeMap<String, Team>,
    /// By token hash.
    pub tokens: HashMap<String, TokenRecord>,
    /// Jobs queued since the last scheduling pass.
    pub fresh: BTreeSet<JobId>,
    /// Whether capacity may have grown since the last scheduling pass (a job
    /// left a node, a node joined or changed). When it has not, jobs that
    /// waited in the last pass still cannot fit, and only `fresh` jobs need
    /// a look.
    pub capacity_changed: bool,
    /// Nodes whose agent is connected now (in memory only). Work is placed
    /// only there: a node between connections keeps its running work until
    /// its lease runs out, but gets nothing new.
    pub connected: std::collections::HashSet<String>,
    /// Services by name (stored in the `meta` table).
    pub services: BTreeMap<String, tessera_core::service::Service>,
    /// The latest usage each node's agent reported (in memory only).
    pub usage: HashMap<String, tessera_core::node::NodeUsage>,
    /// Pools by name (stored in the `meta` table); each is node `pool-<name>`.
    pub pools: BTreeMap<String, crate::pools::PoolConfig>,
    /// Each team's weighted share of the cluster averaged over the last
    /// minutes, updated at every scheduling pass (in memory only: after a
    /// restart it starts again from nothing). Fair share lets it decide
    /// which way whole jobs round (see `TeamView::recent_share`).
    pub recent_shares: tessera_scheduler::RecentShares,
    /// Per pool, how many of Tessera's jobs may wait in its engine's queue
    /// beyond its capacity now (set by the pool's task from the pool's pace,
    /// in memory only; none for a pool not listed). See
    /// [`ClusterState::node_views`].
    pub pool_ahead: HashMap<String, u32>,
}

/// What is allocated on one node.
#[derive(Debug, Default, Clone)]
pub struct Allocation {
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    /// GPU index → thousandths held and the jobs holding them.
    pub gpus: BTreeMap<u32, (u32, Vec<JobId>)>,
    pub replicas: u32,
}

impl Allocation {
    /// GPUs held at all (whole or in part).
    pub fn gpus_in_use(&self) -> usize {
        self.gpus.values().filter(|(m, _)| *m > 0).count()
    }
}

impl ClusterState {
    pub fn from_loaded(l: Loaded) -> ClusterState {
        let mut s = ClusterState {
            capacity_changed: true,
            ..ClusterState::default()
        };
        for t in l.teams {
            s.teams.insert(t.name.clone(), t);
        }
        for t in l.tokens {
            s.tokens.insert(t.hash.clone(), t);
        }
        for n in l.nodes {
            s.nodes.insert(n.inventory.name.clone(), n);
        }
        for e in l.events {
            s.events.entry(e.job_id).or_default().push(e);
        }
        s.services = crate::services::load(&l.meta);
        s.pools = crate::pools::load(&l.meta);
        for j in l.jobs {
            s.index(&j);
            s.jobs.insert(j.id, j);
        }
        s
    }

    fn index(&mut self, j: &Job) {
        let was_queued = self.queued.remove(&j.id);
        let was_active = self.active.remove(&j.id);
        if j.state == JobState::Queued {
            self.queued.insert(j.id);
            if !was_queued {
                self.fresh.insert(j.id);
            }
        } else {
            self.fresh.remove(&j.id);
            if j.state.is_active() {
                self.active.insert(j.id);
            }
        }
        if was_active && !j.state.is_active() {
            self.capacity_changed = true;
        }
    }

    pub fn insert_job(&mut self, job: Job, event: Event) {
        self.index(&job);
        self.events.entry(job.id).or_default().push(event);
        self.jobs.insert(job.id, job);
    }

    /// Changes a job, keeps indexes, appends the writes to `writes`.
    pub fn update_job(
        &mut self,
        id: JobId,
        writes: &mut Vec<Write>,
        f: impl FnOnce(&mut Job) -> Option<Event>,
    ) -> Option<&Job> {
        let job = self.jobs.get_mut(&id)?;
        let event = f(job);
        let snapshot = job.clone();
        self.index(&snapshot);
        writes.push(Write::Job(Box::new(snapshot)));
        if let Some(e) = event {
            self.events.entry(id).or_default().push(e.clone());
            writes.push(Write::Event(e));
        }
        self.jobs.get(&id)
    }

    /// Appends an event without changing the job.
    pub fn add_event(&mut self, e: Event, writes: &mut Vec<Write>) {
        self.events.entry(e.job_id).or_default().push(e.clone());
        writes.push(Write::Event(e));
    }

    /// What active jobs hold on each node.
    pub fn allocations(&self) -> HashMap<String, Allocation> {
        let mut out: HashMap<String, Allocation> = HashMap::new();
        for id in &self.active {
            let Some(job) = self.jobs.get(id) else {
                continue;
            };
            let r = &job.spec.resources;
            for p in &job.placement {
                let a = out.entry(p.node.clone()).or_default();
                a.cpu_milli += r.cpu_milli;
                a.memory_bytes += r.memory_bytes;
                a.replicas += 1;
                let milli = if r.gpu > 0 { 1000 } else { r.gpu_milli };
                for g in &p.gpus {
                    let e = a.gpus.entry(*g).or_default();
                    e.0 += milli;
                    e.1.push(job.id);
                }
            }
        }
        out
    }

    /// Node views for the scheduler (in name order), with what is free now.
    /// A pool's node also offers room for a few jobs beyond its engine's
    /// capacity (its queue-ahead, [`ClusterState::pool_headroom`]): they wait
    /// in the engine's own queue, so that the engine starts the next job the
    /// moment one ends.
    pub fn node_views(&self) -> Vec<NodeView> {
        self.views(true)
    }

    /// Per pool node, the CPU and memory it offers beyond its capacity: `n`
    /// times the smallest CPU and the smallest memory that any queued job
    /// the pool could run asks of one replica, where `n` is how many jobs
    /// may wait in the engine ([`ClusterState::pool_ahead`]). Every job
    /// needs at least those amounts, so at
    /// most `n` jobs ever wait in the engine beyond its capacity, whatever
    /// their sizes; with nothing queued for the pool it offers nothing extra.
    /// GPUs are not offered ahead (GPU jobs wait in Tessera's queue).
    pub fn pool_headroom(&self) -> HashMap<String, (u64, u64)> {
        let mut out = HashMap::new();
        for name in self.pools.keys() {
            let n = self.pool_ahead.get(name).copied().unwrap_or(0);
            if n == 0 {
                continue;
            }
            let node = crate::pools::node_name(name);
            let Some(labels) = self.nodes.get(&node).map(|n| &n.inventory.labels) else {
                continue;
            };
            let mut least: Option<(u64, u64)> = None;
            for j in self.queued.iter().filter_map(|id| self.jobs.get(id)) {
                let r = &j.spec.resources;
                if !r.selects(labels) {
                    continue;
                }
                least = Some(match least {
                    None => (r.cpu_milli, r.memory_bytes),
                    Some((c, m)) => (c.min(r.cpu_milli), m.min(r.memory_bytes)),
                });
            }
            if let Some((c, m)) = least {
                out.insert(
                    node,
                    (c.saturating_mul(n as u64), m.saturating_mul(n as u64)),
                );
            }
        }
        out
    }

    fn views(&self, ahead: bool) -> Vec<NodeView> {
        let alloc = self.allocations();
        let headroom = if ahead && !self.pools.is_empty() {
            self.pool_headroom()
        } else {
            HashMap::new()
        };
        self.nodes
            .values()
            .map(|n| {
                let inv = &n.inventory;
                let a = alloc.get(&inv.name).cloned().unwrap_or_default();
                let (extra_cpu, extra_mem) = headroom.get(&inv.name).copied().unwrap_or((0, 0));
                NodeView {
                    name: inv.name.clone(),
                    schedulable: n.state.schedulable() && self.connected.contains(&inv.name),
                    cpu_milli: inv.cpu_milli,
                    memory_bytes: inv.memory_bytes,
                    free_cpu_milli: inv
                        .cpu_milli
                        .saturating_add(extra_cpu)
                        .saturating_sub(a.cpu_milli),
                    free_memory_bytes: (inv.memory_bytes.saturating_add(extra_mem))
                        .saturating_sub(a.memory_bytes),
                    ahead_cpu_milli: extra_cpu,
                    ahead_memory_bytes: extra_mem,
                    gpus: inv
                        .gpus
                        .iter()
                        .map(|g| GpuSlot {
                            index: g.index,
                            model: g.model.clone(),
                            healthy: g.healthy,
                            free_milli: 1000u32
                                .saturating_sub(a.gpus.get(&g.index).map(|u| u.0).unwrap_or(0)),
                        })
                        .collect(),
                    price_per_hour: [
                        n.prices.cpu_core_hour,
                        n.prices.memory_gib_hour,
                        n.prices.gpu_hour,
                    ],
                    labels: inv.labels.clone(),
                }
            })
            .collect()
    }

    /// Nodes that exist (not lost), for refusing jobs that can never fit.
    /// Capacity as it is (a pool's queue-ahead is not room a job could
    /// ever run in).
    pub fn live_node_views(&self) -> Vec<NodeView> {
        let mut views = self.views(false);
        views.retain(|v| {
            self.nodes
                .get(&v.name)
                .is_some_and(|n| n.state != NodeState::Lost)
        });
        views
    }

    /// The scheduler's input: every queued job, every running one, team
    /// weights and recent shares, and the policy. Resets the change
    /// tracking; under fair share, adds the time since the last pass to the
    /// recent shares (counting what has started and runs now as held since
    /// then).
    pub fn take_snapshot(&mut self, policy: &Policy, now: u64) -> Snapshot {
        self.capacity_changed = false;
        self.fresh.clear();
        let mut snapshot = self.snapshot(policy);
        if policy.fair_share {
            // Only started jobs: the average follows what accounting bills.
            let started = |r: &RunningJob| {
                self.jobs
                    .get(&r.job.id)
                    .is_some_and(|j| j.started_at.is_some())
            };
            let shares = tessera_scheduler::weighted_shares(&snapshot, started);
            self.recent_shares.observe(now, &shares);
            for t in snapshot.teams.iter_mut() {
                t.recent_share = self.recent_shares.get(&t.name);
            }
            // Teams that are not listed weigh 1; they have a history too.
            let unlisted: BTreeSet<&str> = snapshot
                .queue
                .iter()
                .map(|j| j.team.as_str())
                .filter(|t| !self.teams.contains_key(*t))
                .collect();
            let extra: Vec<TeamView> = unlisted
                .into_iter()
                .map(|t| TeamView {
                    recent_share: self.recent_shares.get(t),
                    ..TeamView::new(t, 1.0)
                })
                .collect();
            snapshot.teams.extend(extra);
        }
        snapshot
    }

    pub fn snapshot(&self, policy: &Policy) -> Snapshot {
        let nodes = self.node_views();
        let index: HashMap<&str, usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.as_str(), i))
            .collect();
        let running = self
            .active
            .iter()
            .filter_map(|id| self.jobs.get(id))
            // A job being preempted is already on its way out.
            .filter(|j| j.preempting.is_none() && !j.cancel_requested)
            .filter_map(|j| {
                let assignments = j
                    .placement
                    .iter()
                    .map(|p| {
                        Some(Assignment {
                            replica: p.replica,
                            node: *index.get(p.node.as_str())?,
                            gpus: p.gpus.clone(),
                        })
                    })
                    .collect::<Option<Vec<_>>>()?;
                Some(RunningJob {
                    job: pending(j),
                    started_at: j.started_at.or(j.scheduled_at).unwrap_or(j.submitted_at),
                    assignments,
                    preemptible: true,
                })
            })
            .collect();
        Snapshot {
            queue: self
                .queued
                .iter()
                .filter_map(|id| self.jobs.get(id))
                .map(pending)
                .collect(),
            running,
            teams: self
                .teams
                .values()
                .map(|t| TeamView {
                    name: t.name.clone(),
                    weight: t.weight,
                    quota: t.quota.map(|q| Quota {
                        guaranteed: amounts(q.guaranteed),
                        limit: amounts(q.limit),
                    }),
                    recent_share: 0.0,
                })
                .collect(),
            policy: policy.clone(),
            nodes,
        }
    }

    /// What the current attempt of a job has cost up to `now`, at the
    /// prices of the nodes it runs on.
    pub fn attempt_cost(&self, id: JobId, now: u64) -> f64 {
        let Some(j) = self.jobs.get(&id) else {
            return 0.0;
        };
        let ms = j.run_ms(now);
        let r = &j.spec.resources;
        j.placement
            .iter()
            .filter_map(|p| self.nodes.get(&p.node))
            .map(|n| {
                n.prices
                    .cost(r.cpu_milli, r.memory_bytes, r.gpu_demand_milli(), ms)
            })
            .sum()
    }

    /// Whether a pass could do anything for the jobs queued since the last
    /// one, when no capacity has been freed since: one of them fits some
    /// node's free capacity now, or outranks a running job by priority (and
    /// so might preempt it). If not, a pass would place and preempt nothing
    /// new — the jobs that waited before still cannot fit — and the
    /// periodic pass gives the new jobs their reasons.
    pub fn fresh_can_matter(&self) -> bool {
        let views = self.node_views();
        let lowest_running = self
            .active
            .iter()
            .filter_map(|id| self.jobs.get(id))
            .map(|j| j.spec.priority)
            .min();
        self.fresh
            .iter()
            .filter_map(|id| self.jobs.get(id))
            .any(|j| {
                let r = &j.spec.resources;
                lowest_running.is_some_and(|p| j.spec.priority > p)
                    || views.iter().any(|n| {
                        n.schedulable
                            && n.free_cpu_milli >= r.cpu_milli
                            && n.free_memory_bytes >= r.memory_bytes
                            && (r.gpu == 0
                                || n.gpus
                                    .iter()
                                    .filter(|g| g.healthy && g.free_milli == 1000)
                                    .count() as u32
                                    >= r.gpu)
                            && (r.gpu_milli == 0
                                || n.gpus
                                    .iter()
                                    .any(|g| g.healthy && g.free_milli >= r.gpu_milli))
                    })
            })
    }

    pub fn max_job_id(&self) -> JobId {
        self.jobs.keys().next_back().copied().unwrap_or(0)
    }
}

fn amounts(a: tessera_core::auth::ResourceAmounts) -> Amounts {
    Amounts {
        cpu_milli: a.cpu_milli,
        memory_bytes: a.memory_bytes,
        gpu_milli: a.gpu_milli,
    }
}

/// A job as the scheduler sees it.
fn pending(j: &Job) -> PendingJob {
    let mut p = PendingJob::new(
        j.id,
        j.spec.team.clone(),
        j.spec.priority,
        j.submitted_at,
        j.spec.resources.clone(),
        j.spec.replicas,
    );
    p.max_runtime_ms = j.spec.max_runtime_ms;
    p.attained_ms = j.attained_ms;
    p.may_preempt = j.spec.preempt;
    p
}
