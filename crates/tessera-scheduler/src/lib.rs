//! Tessera's scheduler: a pure, deterministic function from a snapshot of
//! the cluster and its queue (and the time, passed in) to a [`Plan`].
//!
//! This crate owns placement policy. It does no I/O, reads no clock, draws no
//! random numbers and knows nothing of tokio, HTTP or the store: the server's
//! control loop builds a [`Snapshot`], calls [`schedule`], checks the plan
//! against current state and applies it; the benchmarks (and the simulator)
//! call the same function.
//!
//! Policy v1:
//! - order: priority (high first), then submit time, then id;
//! - gangs: all replicas of a job are placed in the same plan or none is;
//! - packing: each replica goes to the node where it fits most tightly
//!   (best fit over CPU, memory and GPUs); jobs without GPUs avoid nodes with
//!   free GPUs when another node fits;
//! - GPUs are whole devices, restricted to the allowed models and to healthy
//!   devices;
//! - every job left waiting gets a reason a person can act on.

use std::collections::HashMap;

use tessera_core::quantity::{format_cpu, format_memory};
use tessera_core::{JobId, Resources};

/// One GPU device slot on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuSlot {
    pub index: u32,
    pub model: String,
    pub healthy: bool,
    /// Not held by any scheduled or running replica.
    pub free: bool,
}

/// A node as the scheduler sees it: capacity and what is free right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    /// False for cordoned, draining or lost nodes.
    pub schedulable: bool,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub free_cpu_milli: u64,
    pub free_memory_bytes: u64,
    pub gpus: Vec<GpuSlot>,
}

impl NodeView {
    /// An empty, schedulable node (handy for tests and benchmarks).
    pub fn new(name: impl Into<String>, cpu_milli: u64, memory_bytes: u64) -> NodeView {
        NodeView {
            name: name.into(),
            schedulable: true,
            cpu_milli,
            memory_bytes,
            free_cpu_milli: cpu_milli,
            free_memory_bytes: memory_bytes,
            gpus: Vec::new(),
        }
    }

    /// Adds `n` free, healthy GPUs of `model`.
    pub fn with_gpus(mut self, n: u32, model: &str) -> NodeView {
        let start = self.gpus.len() as u32;
        for i in 0..n {
            self.gpus.push(GpuSlot {
                index: start + i,
                model: model.to_string(),
                healthy: true,
                free: true,
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
}

/// Everything the scheduler looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub nodes: Vec<NodeView>,
    /// In any order; the scheduler orders it.
    pub queue: Vec<PendingJob>,
}

/// Where one replica goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub replica: u32,
    /// Index into [`Snapshot::nodes`].
    pub node: usize,
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
    pub reason: String,
}

/// The scheduler's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// In scheduling order.
    pub placements: Vec<Placement>,
    pub waiting: Vec<Waiting>,
}

/// Free capacity of one node while a plan is being built.
#[derive(Debug, Clone)]
struct Free {
    cpu: u64,
    mem: u64,
    /// Per GPU slot: free and healthy.
    gpu_free: Vec<bool>,
    /// Count of `true` in `gpu_free`.
    free_gpus: u32,
    /// GPU models, lowercased once per pass for model matching.
    models_lower: Vec<String>,
}

/// Allowed GPU models of one job, lowercased once.
struct Models(Vec<String>);

impl Models {
    fn of(r: &Resources) -> Models {
        Models(
            r.gpu_models
                .iter()
                .map(|m| m.to_ascii_lowercase())
                .collect(),
        )
    }

    fn allow(&self, model_lower: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|m| model_lower.contains(m.as_str()))
    }
}

/// A request shape: jobs with the same shape fit or fail together within one
/// cycle, because free capacity only shrinks while a plan is built.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Shape {
    cpu: u64,
    mem: u64,
    gpu: u32,
    models: Vec<String>,
    replicas: u32,
}

/// Computes a plan. Pure: the same snapshot and time give the same plan.
pub fn schedule(snapshot: &Snapshot, _now: u64) -> Plan {
    let nodes = &snapshot.nodes;
    let mut free: Vec<Free> = nodes
        .iter()
        .map(|n| {
            let gpu_free: Vec<bool> = n.gpus.iter().map(|g| g.free && g.healthy).collect();
            Free {
                cpu: n.free_cpu_milli,
                mem: n.free_memory_bytes,
                free_gpus: gpu_free.iter().filter(|f| **f).count() as u32,
                gpu_free,
                models_lower: n
                    .gpus
                    .iter()
                    .map(|g| g.model.to_ascii_lowercase())
                    .collect(),
            }
        })
        .collect();
    let mut order: Vec<&PendingJob> = snapshot.queue.iter().collect();
    order.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.submitted_at.cmp(&b.submitted_at))
            .then(a.id.cmp(&b.id))
    });

    let mut plan = Plan::default();
    let mut failed: HashMap<Shape, String> = HashMap::new();
    // Once nothing is free anywhere, every remaining job waits for the same reason.
    for job in order {
        let shape = Shape {
            cpu: job.resources.cpu_milli,
            mem: job.resources.memory_bytes,
            gpu: job.resources.gpu,
            models: job.resources.gpu_models.clone(),
            replicas: job.replicas,
        };
        let ahead = plan.waiting.len();
        if let Some(reason) = failed.get(&shape) {
            plan.waiting.push(Waiting {
                job_id: job.id,
                reason: with_ahead(reason, ahead),
            });
            continue;
        }
        match place_gang(nodes, &mut free, job) {
            Some(assignments) => plan.placements.push(Placement {
                job_id: job.id,
                assignments,
            }),
            None => {
                let reason = explain(nodes, &free, &job.resources, job.replicas);
                plan.waiting.push(Waiting {
                    job_id: job.id,
                    reason: with_ahead(&reason, ahead),
                });
                failed.insert(shape, reason);
            }
        }
    }
    plan
}

fn with_ahead(reason: &str, ahead: usize) -> String {
    match ahead {
        0 => reason.to_string(),
        1 => format!("{reason}; 1 job ahead in the queue"),
        n => format!("{reason}; {n} jobs ahead in the queue"),
    }
}

/// Number of GPUs on a node that are free, healthy and of an allowed model.
fn usable_gpus(free: &Free, r: &Resources, models: &Models) -> u32 {
    if r.gpu == 0 {
        return 0;
    }
    if models.0.is_empty() {
        return free.free_gpus;
    }
    free.gpu_free
        .iter()
        .zip(&free.models_lower)
        .filter(|(f, m)| **f && models.allow(m))
        .count() as u32
}

fn fits(node: &NodeView, free: &Free, r: &Resources, models: &Models) -> bool {
    node.schedulable
        && free.cpu >= r.cpu_milli
        && free.mem >= r.memory_bytes
        && (r.gpu == 0 || (free.free_gpus >= r.gpu && usable_gpus(free, r, models) >= r.gpu))
}

/// Lower is a tighter fit.
fn fit_score(node: &NodeView, free: &Free, r: &Resources) -> f64 {
    let cpu_left = (free.cpu - r.cpu_milli) as f64 / node.cpu_milli.max(1) as f64;
    let mem_left = (free.mem - r.memory_bytes) as f64 / node.memory_bytes.max(1) as f64;
    let free_gpus = free.free_gpus as f64;
    let total_gpus = node.gpus.len().max(1) as f64;
    let gpu_left = (free_gpus - r.gpu as f64) / total_gpus;
    let mut score = cpu_left + mem_left + 4.0 * gpu_left;
    if r.gpu == 0 && free_gpus > 0.0 {
        // Keep GPU nodes for GPU work when a CPU-only node will do.
        score += 8.0;
    }
    score
}

/// Places every replica of `job` or none; on success `free` is updated.
fn place_gang(nodes: &[NodeView], free: &mut [Free], job: &PendingJob) -> Option<Vec<Assignment>> {
    let r = &job.resources;
    let models = Models::of(r);
    let mut assignments: Vec<Assignment> = Vec::with_capacity(job.replicas as usize);
    for replica in 0..job.replicas {
        let mut best: Option<(usize, f64)> = None;
        for (i, node) in nodes.iter().enumerate() {
            if !fits(node, &free[i], r, &models) {
                continue;
            }
            let score = fit_score(node, &free[i], r);
            if best.is_none_or(|(_, s)| score < s) {
                best = Some((i, score));
            }
        }
        let Some((i, _)) = best else {
            // Roll back the replicas placed so far: a gang is all or nothing.
            for a in &assignments {
                release(&nodes[a.node], &mut free[a.node], r, &a.gpus);
            }
            return None;
        };
        let f = &mut free[i];
        f.cpu -= r.cpu_milli;
        f.mem -= r.memory_bytes;
        let mut gpus = Vec::with_capacity(r.gpu as usize);
        if r.gpu > 0 {
            for (slot, g) in nodes[i].gpus.iter().enumerate() {
                if gpus.len() as u32 == r.gpu {
                    break;
                }
                if f.gpu_free[slot] && models.allow(&f.models_lower[slot]) {
                    f.gpu_free[slot] = false;
                    f.free_gpus -= 1;
                    gpus.push(g.index);
                }
            }
        }
        assignments.push(Assignment {
            replica,
            node: i,
            gpus,
        });
    }
    Some(assignments)
}

fn release(node: &NodeView, free: &mut Free, r: &Resources, gpus: &[u32]) {
    free.cpu += r.cpu_milli;
    free.mem += r.memory_bytes;
    for (slot, g) in node.gpus.iter().enumerate() {
        if gpus.contains(&g.index) {
            free.gpu_free[slot] = true;
            free.free_gpus += 1;
        }
    }
}

/// Whether a replica could fit on this node if it were empty.
fn could_ever_fit(node: &NodeView, r: &Resources) -> bool {
    node.cpu_milli >= r.cpu_milli
        && node.memory_bytes >= r.memory_bytes
        && node
            .gpus
            .iter()
            .filter(|g| g.healthy && r.gpu_model_allowed(&g.model))
            .count() as u32
            >= r.gpu
}

fn describe(r: &Resources) -> String {
    let mut s = format!(
        "{} CPU, {} memory",
        format_cpu(r.cpu_milli),
        format_memory(r.memory_bytes)
    );
    if r.gpu > 0 {
        s.push_str(&format!(", {} GPU", r.gpu));
        if !r.gpu_models.is_empty() {
            s.push_str(&format!(" ({})", r.gpu_models.join(" or ")));
        }
    }
    s
}

/// Why a job that fits no node *that exists* can never run, or `None` when
/// some set of nodes could hold it once they are empty. Used to refuse such
/// jobs at submit time instead of queueing them forever.
pub fn infeasible_reason(nodes: &[NodeView], r: &Resources, replicas: u32) -> Option<String> {
    let all: Vec<&NodeView> = nodes.iter().collect();
    infeasible_among(&all, r, replicas)
}

fn infeasible_among(live: &[&NodeView], r: &Resources, replicas: u32) -> Option<String> {
    if live.is_empty() {
        return Some("the cluster has no nodes".into());
    }
    let mut slots: u64 = 0;
    for n in live {
        if could_ever_fit(n, r) {
            slots += replica_slots(n, r);
        }
    }
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

/// How many replicas of `r` an empty node holds.
fn replica_slots(n: &NodeView, r: &Resources) -> u64 {
    let by_cpu = n.cpu_milli / r.cpu_milli.max(1);
    let by_mem = n.memory_bytes / r.memory_bytes.max(1);
    let by_gpu = if r.gpu == 0 {
        u64::MAX
    } else {
        n.gpus
            .iter()
            .filter(|g| g.healthy && r.gpu_model_allowed(&g.model))
            .count() as u64
            / r.gpu as u64
    };
    by_cpu.min(by_mem).min(by_gpu)
}

fn largest_node(nodes: &[&NodeView], r: &Resources) -> String {
    let max_cpu = nodes.iter().map(|n| n.cpu_milli).max().unwrap_or(0);
    let max_mem = nodes.iter().map(|n| n.memory_bytes).max().unwrap_or(0);
    let max_gpu = nodes
        .iter()
        .map(|n| {
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
    if r.gpu > 0 {
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

/// A reason for a job that did not fit in this cycle.
fn explain(nodes: &[NodeView], free: &[Free], r: &Resources, replicas: u32) -> String {
    let models = Models::of(r);
    let schedulable = nodes.iter().filter(|n| n.schedulable).count();
    if schedulable == 0 {
        return format!(
            "no schedulable node: all {} node(s) are cordoned, draining or lost",
            nodes.len()
        );
    }
    let need = describe(r);
    let live: Vec<&NodeView> = nodes.iter().filter(|n| n.schedulable).collect();
    if let Some(why) = infeasible_among(&live, r, replicas) {
        return format!("cannot run on the schedulable nodes: {why}");
    }
    let fit_now = nodes
        .iter()
        .zip(free)
        .filter(|(n, f)| fits(n, f, r, &models))
        .count();
    // Find the binding resource across schedulable nodes.
    let cpu_ok = nodes
        .iter()
        .zip(free)
        .any(|(n, f)| n.schedulable && f.cpu >= r.cpu_milli);
    let mem_ok = nodes
        .iter()
        .zip(free)
        .any(|(n, f)| n.schedulable && f.mem >= r.memory_bytes);
    let gpu_ok = r.gpu == 0
        || nodes
            .iter()
            .zip(free)
            .any(|(n, f)| n.schedulable && usable_gpus(f, r, &models) >= r.gpu);
    let mut short = Vec::new();
    if !cpu_ok {
        short.push("CPU");
    }
    if !mem_ok {
        short.push("memory");
    }
    if !gpu_ok {
        short.push(if r.gpu_models.is_empty() {
            "GPUs"
        } else {
            "GPUs of the allowed models"
        });
    }
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
mod tests;
