//! The control plane's working state, in memory, written through to the
//! store. Every job state change goes through [`ClusterState::update_job`],
//! which keeps the queued/active indexes right and returns the store write.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tessera_core::auth::{Team, TokenRecord};
use tessera_core::node::{Node, NodeState};
use tessera_core::{Event, Job, JobId, JobState};
use tessera_scheduler::{GpuSlot, NodeView, PendingJob, Snapshot};
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
}

/// What is allocated on one node.
#[derive(Debug, Default, Clone)]
pub struct Allocation {
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    /// GPU index → job holding it.
    pub gpus: BTreeMap<u32, JobId>,
    pub replicas: u32,
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
                for g in &p.gpus {
                    a.gpus.insert(*g, job.id);
                }
            }
        }
        out
    }

    /// Node views for the scheduler (in name order), with what is free now.
    pub fn node_views(&self) -> Vec<NodeView> {
        let alloc = self.allocations();
        self.nodes
            .values()
            .map(|n| {
                let inv = &n.inventory;
                let a = alloc.get(&inv.name).cloned().unwrap_or_default();
                NodeView {
                    name: inv.name.clone(),
                    schedulable: n.state.schedulable(),
                    cpu_milli: inv.cpu_milli,
                    memory_bytes: inv.memory_bytes,
                    free_cpu_milli: inv.cpu_milli.saturating_sub(a.cpu_milli),
                    free_memory_bytes: inv.memory_bytes.saturating_sub(a.memory_bytes),
                    gpus: inv
                        .gpus
                        .iter()
                        .map(|g| GpuSlot {
                            index: g.index,
                            model: g.model.clone(),
                            healthy: g.healthy,
                            free: !a.gpus.contains_key(&g.index),
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// Nodes that exist (not lost), for refusing jobs that can never fit.
    pub fn live_node_views(&self) -> Vec<NodeView> {
        let mut views = self.node_views();
        views.retain(|v| {
            self.nodes
                .get(&v.name)
                .is_some_and(|n| n.state != NodeState::Lost)
        });
        views
    }

    /// The scheduler's input for the next pass: every queued job when
    /// capacity may have grown, else only the jobs queued since the last
    /// pass. Resets the change tracking.
    pub fn take_snapshot(&mut self) -> Snapshot {
        let ids: Vec<JobId> = if self.capacity_changed {
            self.queued.iter().copied().collect()
        } else {
            self.fresh.iter().copied().collect()
        };
        self.capacity_changed = false;
        self.fresh.clear();
        self.snapshot_of(&ids)
    }

    /// A snapshot with every queued job.
    pub fn snapshot(&self) -> Snapshot {
        let ids: Vec<JobId> = self.queued.iter().copied().collect();
        self.snapshot_of(&ids)
    }

    fn snapshot_of(&self, ids: &[JobId]) -> Snapshot {
        Snapshot {
            nodes: self.node_views(),
            queue: ids
                .iter()
                .filter_map(|id| self.jobs.get(id))
                .map(|j| PendingJob {
                    id: j.id,
                    team: j.spec.team.clone(),
                    priority: j.spec.priority,
                    submitted_at: j.submitted_at,
                    resources: j.spec.resources.clone(),
                    replicas: j.spec.replicas,
                })
                .collect(),
        }
    }

    pub fn max_job_id(&self) -> JobId {
        self.jobs.keys().next_back().copied().unwrap_or(0)
    }
}
