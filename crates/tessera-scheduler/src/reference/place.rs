//! Free capacity while a plan is built, and placing replicas on it: fits,
//! node scoring (best fit or fragmentation gradient), GPU choice within a
//! node, reservations for backfill, and making room by preemption.

use std::collections::BTreeSet;

use rustc_hash::FxHashMap as HashMap;

use tessera_core::Resources;

use crate::frag::Workload;
use crate::policy::Packing;
use crate::{Assignment, NodeView, PendingJob, RunningJob};

const WHOLE: u32 = 1000;

/// A node's score for a replica: (packing quality, best fit, price).
type Score = (f64, f64, f64);

/// Free capacity of one node.
#[derive(Debug, Clone)]
struct Free {
    cpu: u64,
    mem: u64,
    /// Per GPU slot, thousandths free (0 for an unhealthy device).
    gpu: Vec<u32>,
    /// Slots entirely free.
    whole: u32,
}

impl Free {
    fn of(n: &NodeView) -> Free {
        let gpu: Vec<u32> = n
            .gpus
            .iter()
            .map(|g| {
                if g.healthy {
                    g.free_milli.min(WHOLE)
                } else {
                    0
                }
            })
            .collect();
        Free {
            cpu: n.free_cpu_milli,
            mem: n.free_memory_bytes,
            whole: gpu.iter().filter(|m| **m == WHOLE).count() as u32,
            gpu,
        }
    }

    fn give_gpu(&mut self, slot: usize, milli: u32) {
        let before = self.gpu[slot];
        self.gpu[slot] = (before + milli).min(WHOLE);
        if before < WHOLE && self.gpu[slot] == WHOLE {
            self.whole += 1;
        }
    }

    fn take_gpu(&mut self, slot: usize, milli: u32) {
        let before = self.gpu[slot];
        self.gpu[slot] = before.saturating_sub(milli);
        if before == WHOLE && self.gpu[slot] < WHOLE {
            self.whole -= 1;
        }
    }
}

/// What one replica needs, prepared for matching.
#[derive(Debug, Clone)]
pub struct Demand {
    cpu: u64,
    mem: u64,
    whole: u32,
    milli: u32,
    /// Allowed models, lowercased; empty allows any.
    models: Vec<String>,
    replicas: u32,
}

impl Demand {
    pub fn of(job: &PendingJob) -> Demand {
        Demand::from_resources(&job.resources, job.replicas)
    }

    fn from_resources(r: &Resources, replicas: u32) -> Demand {
        Demand {
            cpu: r.cpu_milli,
            mem: r.memory_bytes,
            whole: r.gpu,
            milli: if r.gpu == 0 { r.gpu_milli } else { 0 },
            models: r
                .gpu_models
                .iter()
                .map(|m| m.to_ascii_lowercase())
                .collect(),
            replicas,
        }
    }

    fn wants_gpu(&self) -> bool {
        self.whole > 0 || self.milli > 0
    }
}

/// Capacity held for a waiting job under backfill.
#[derive(Debug, Clone)]
pub struct Reservation {
    pub job_id: u64,
    /// When the job could start at the latest, from run-time bounds
    /// (`u64::MAX` when some needed job has none).
    pub start_at: u64,
    /// Per node: CPU, memory and per-slot GPU thousandths held.
    held: Vec<(u64, u64, Vec<u32>)>,
    /// Nodes where something is held, in index order.
    held_nodes: Vec<usize>,
}

pub struct Cluster<'a> {
    nodes: &'a [NodeView],
    free: Vec<Free>,
    models_lower: Vec<Vec<String>>,
    packing: Packing,
    workload: Workload,
    classes: Classes,
}

/// What makes two nodes interchangeable for placement: the same capacity,
/// GPU models, price, state and free capacity. Nodes of one class score
/// alike, so a placement scores each class once instead of each node —
/// the difference between thousands of nodes and a handful of classes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Sig {
    schedulable: bool,
    capacity: (u64, u64, usize),
    model_group: usize,
    price: [u64; 3],
    cpu: u64,
    mem: u64,
    gpu: Vec<u32>,
}

#[derive(Debug, Default)]
struct Classes {
    by_sig: HashMap<Sig, usize>,
    /// Per class, its nodes in index order.
    members: Vec<BTreeSet<usize>>,
    class_of: Vec<usize>,
    model_group: Vec<usize>,
}

impl Classes {
    fn build(nodes: &[NodeView], free: &[Free], models_lower: &[Vec<String>]) -> Classes {
        let mut groups: HashMap<&[String], usize> = HashMap::default();
        let model_group = models_lower
            .iter()
            .map(|m| {
                let n = groups.len();
                *groups.entry(m.as_slice()).or_insert(n)
            })
            .collect();
        let mut c = Classes {
            model_group,
            class_of: vec![usize::MAX; nodes.len()],
            ..Classes::default()
        };
        for i in 0..nodes.len() {
            c.refresh(nodes, free, i);
        }
        c
    }

    fn sig(&self, nodes: &[NodeView], free: &[Free], i: usize) -> Sig {
        let n = &nodes[i];
        Sig {
            schedulable: n.schedulable,
            capacity: (n.cpu_milli, n.memory_bytes, n.gpus.len()),
            model_group: self.model_group[i],
            price: n.price_per_hour.map(f64::to_bits),
            cpu: free[i].cpu,
            mem: free[i].mem,
            gpu: free[i].gpu.clone(),
        }
    }

    /// Puts node `i` in the class its free capacity now belongs to.
    fn refresh(&mut self, nodes: &[NodeView], free: &[Free], i: usize) {
        let sig = self.sig(nodes, free, i);
        let next = self.members.len();
        let c = *self.by_sig.entry(sig).or_insert(next);
        if c == next {
            self.members.push(BTreeSet::new());
        }
        let old = self.class_of[i];
        if old == c {
            return;
        }
        if old != usize::MAX {
            self.members[old].remove(&i);
        }
        self.members[c].insert(i);
        self.class_of[i] = c;
    }
}

impl<'a> Cluster<'a> {
    pub fn new(
        nodes: &'a [NodeView],
        queue: &[PendingJob],
        running: &[RunningJob],
        packing: Packing,
    ) -> Cluster<'a> {
        let workload = if packing == Packing::Fragmentation {
            Workload::of(
                queue
                    .iter()
                    .chain(running.iter().map(|r| &r.job))
                    .map(|j| (&j.resources, j.replicas, 1)),
            )
        } else {
            Workload::default()
        };
        let free: Vec<Free> = nodes.iter().map(Free::of).collect();
        let models_lower: Vec<Vec<String>> = nodes
            .iter()
            .map(|n| {
                n.gpus
                    .iter()
                    .map(|g| g.model.to_ascii_lowercase())
                    .collect()
            })
            .collect();
        let classes = Classes::build(nodes, &free, &models_lower);
        Cluster {
            nodes,
            free,
            models_lower,
            packing,
            workload,
            classes,
        }
    }

    fn allowed(&self, node: usize, slot: usize, d: &Demand) -> bool {
        d.models.is_empty()
            || d.models
                .iter()
                .any(|m| self.models_lower[node][slot].contains(m.as_str()))
    }

    /// Whether one replica fits on `node` given `free` (and what a
    /// reservation holds there).
    fn fits(
        &self,
        node: usize,
        free: &Free,
        d: &Demand,
        held: Option<&(u64, u64, Vec<u32>)>,
    ) -> bool {
        if !self.nodes[node].schedulable {
            return false;
        }
        let (hc, hm) = held.map(|h| (h.0, h.1)).unwrap_or((0, 0));
        if free.cpu.saturating_sub(hc) < d.cpu || free.mem.saturating_sub(hm) < d.mem {
            return false;
        }
        if !d.wants_gpu() {
            return true;
        }
        let avail = |slot: usize| {
            let h = held.map(|h| h.2[slot]).unwrap_or(0);
            free.gpu[slot].saturating_sub(h)
        };
        if d.whole > 0 {
            if held.is_none() && d.models.is_empty() {
                return free.whole >= d.whole;
            }
            if free.whole < d.whole {
                return false;
            }
            let n = (0..free.gpu.len())
                .filter(|s| avail(*s) == WHOLE && self.allowed(node, *s, d))
                .count() as u32;
            n >= d.whole
        } else {
            (0..free.gpu.len()).any(|s| avail(s) >= d.milli && self.allowed(node, s, d))
        }
    }

    /// GPU slots a replica would take on a node (assumes it fits).
    fn choose_gpus(
        &self,
        node: usize,
        free: &Free,
        d: &Demand,
        held: Option<&(u64, u64, Vec<u32>)>,
    ) -> Vec<usize> {
        let avail =
            |slot: usize| free.gpu[slot].saturating_sub(held.map(|h| h.2[slot]).unwrap_or(0));
        if d.whole > 0 {
            (0..free.gpu.len())
                .filter(|s| avail(*s) == WHOLE && self.allowed(node, *s, d))
                .take(d.whole as usize)
                .collect()
        } else if d.milli > 0 {
            if self.packing == Packing::Fragmentation && !self.workload.is_empty() {
                // The device whose use leaves the node least fragmented,
                // the fullest such, then the first.
                return (0..free.gpu.len())
                    .filter(|s| avail(*s) >= d.milli && self.allowed(node, *s, d))
                    .min_by_key(|s| {
                        let mut after = free.clone();
                        after.cpu -= d.cpu;
                        after.mem -= d.mem;
                        after.take_gpu(*s, d.milli);
                        (self.fragmentation(node, &after), avail(*s), *s)
                    })
                    .into_iter()
                    .collect();
            }
            // The fullest device that still fits: shares pack together.
            (0..free.gpu.len())
                .filter(|s| avail(*s) >= d.milli && self.allowed(node, *s, d))
                .min_by_key(|s| (avail(*s), *s))
                .into_iter()
                .collect()
        } else {
            Vec::new()
        }
    }

    /// Lower is a tighter fit.
    fn best_fit_score(&self, node: usize, free: &Free, d: &Demand) -> f64 {
        let n = &self.nodes[node];
        let cpu_left = (free.cpu - d.cpu) as f64 / n.cpu_milli.max(1) as f64;
        let mem_left = (free.mem - d.mem) as f64 / n.memory_bytes.max(1) as f64;
        let total_gpu = (n.gpus.len().max(1) * WHOLE as usize) as f64;
        let free_gpu: u32 = free.gpu.iter().sum();
        let gpu_left = (free_gpu as f64 - (d.whole * WHOLE + d.milli) as f64) / total_gpu;
        let mut score = cpu_left + mem_left + 4.0 * gpu_left;
        if !d.wants_gpu() && free_gpu > 0 {
            // Keep GPU nodes for GPU work when a CPU-only node will do.
            score += 8.0;
        }
        score
    }

    /// Free GPU thousandths on `node` that the workload could not use (the
    /// measure itself is shared with the current scheduler: this oracle
    /// checks how candidates are found and compared, not the measure).
    fn fragmentation(&self, node: usize, free: &Free) -> u64 {
        let allowed = self.workload.allowed_slots(&self.models_lower[node]);
        self.workload
            .unusable(&allowed, free.cpu, free.mem, &free.gpu)
    }

    /// What one replica costs per hour on a node.
    fn price(&self, node: usize, d: &Demand) -> f64 {
        let p = &self.nodes[node].price_per_hour;
        d.cpu as f64 / 1000.0 * p[0]
            + d.mem as f64 / (1u64 << 30) as f64 * p[1]
            + (d.whole * WHOLE + d.milli) as f64 / 1000.0 * p[2]
    }

    /// (packing quality, best fit, price): lower is better, in that order, so
    /// among placements of equal quality the cheaper wins.
    fn score(&self, node: usize, free: &Free, d: &Demand, gpus: &[usize]) -> Score {
        let fit = self.best_fit_score(node, free, d);
        let price = self.price(node, d);
        if self.packing == Packing::BestFit || self.workload.is_empty() {
            return (fit, 0.0, price);
        }
        let mut after = free.clone();
        after.cpu -= d.cpu;
        after.mem -= d.mem;
        for s in gpus {
            after.take_gpu(*s, if d.whole > 0 { WHOLE } else { d.milli });
        }
        let delta = self.fragmentation(node, &after) as f64 - self.fragmentation(node, free) as f64;
        (delta, fit, price)
    }

    /// Places every replica of a job or none; on success the capacity is
    /// taken. With `excluding`, capacity the reservation holds is off limits.
    pub fn place(
        &mut self,
        d: &Demand,
        excluding: Option<&Reservation>,
    ) -> Option<Vec<Assignment>> {
        let mut out: Vec<Assignment> = Vec::with_capacity(d.replicas as usize);
        let mut before: Vec<(usize, Free)> = Vec::new();
        for replica in 0..d.replicas {
            let Some((node, slots)) = self.best_node(d, excluding) else {
                // A gang is all or nothing: give back what earlier replicas took.
                for (node, f) in before.into_iter().rev() {
                    self.free[node] = f;
                    self.classes.refresh(self.nodes, &self.free, node);
                }
                return None;
            };
            before.push((node, self.free[node].clone()));
            let mut f = self.free[node].clone();
            out.push(self.take(&mut f, node, d, &slots, replica));
            self.free[node] = f;
            self.classes.refresh(self.nodes, &self.free, node);
        }
        Some(out)
    }

    /// The best node for one replica, scoring each class of alike nodes once
    /// (its lowest-numbered node stands for it) and nodes a reservation
    /// holds capacity on one by one. Ties go to the lowest node index, as a
    /// scan of every node would choose.
    fn best_node(
        &self,
        d: &Demand,
        excluding: Option<&Reservation>,
    ) -> Option<(usize, Vec<usize>)> {
        let held_nodes: &[usize] = excluding.map(|r| r.held_nodes.as_slice()).unwrap_or(&[]);
        let mut best: Option<(Score, usize, Vec<usize>)> = None;
        let consider = |node: usize,
                        held: Option<&(u64, u64, Vec<u32>)>,
                        best: &mut Option<(Score, usize, Vec<usize>)>| {
            let f = &self.free[node];
            if !self.fits(node, f, d, held) {
                return;
            }
            let gpus = self.choose_gpus(node, f, d, held);
            let score = self.score(node, f, d, &gpus);
            let better = match best {
                None => true,
                Some((s, n, _)) => {
                    score.0 < s.0
                        || (score.0 == s.0 && score.1 < s.1)
                        || (score.0 == s.0 && score.1 == s.1 && score.2 < s.2)
                        || (score == *s && node < *n)
                }
            };
            if better {
                *best = Some((score, node, gpus));
            }
        };
        for members in &self.classes.members {
            if let Some(&node) = members
                .iter()
                .find(|n| held_nodes.binary_search(n).is_err())
            {
                consider(node, None, &mut best);
            }
        }
        if let Some(r) = excluding {
            for &node in held_nodes {
                consider(node, Some(&r.held[node]), &mut best);
            }
        }
        best.map(|(_, node, gpus)| (node, gpus))
    }

    fn place_on(
        &self,
        free: &mut [Free],
        d: &Demand,
        excluding: Option<&Reservation>,
    ) -> Option<Vec<Assignment>> {
        let mut out: Vec<Assignment> = Vec::with_capacity(d.replicas as usize);
        for replica in 0..d.replicas {
            let mut best: Option<(usize, Score, Vec<usize>)> = None;
            for (node, f) in free.iter().enumerate() {
                let held = excluding.map(|r| &r.held[node]);
                if !self.fits(node, f, d, held) {
                    continue;
                }
                let gpus = self.choose_gpus(node, f, d, held);
                let score = self.score(node, f, d, &gpus);
                let better = match &best {
                    None => true,
                    Some((_, s, _)) => {
                        score.0 < s.0
                            || (score.0 == s.0 && score.1 < s.1)
                            || (score.0 == s.0 && score.1 == s.1 && score.2 < s.2)
                    }
                };
                if better {
                    best = Some((node, score, gpus));
                }
            }
            let Some((node, _, slots)) = best else {
                for a in &out {
                    self.release_into(&mut free[a.node], a.node, d, &a.gpus);
                }
                return None;
            };
            out.push(self.take(&mut free[node], node, d, &slots, replica));
        }
        Some(out)
    }

    /// Takes one replica's capacity on a node (GPU slots as chosen).
    fn take(
        &self,
        f: &mut Free,
        node: usize,
        d: &Demand,
        slots: &[usize],
        replica: u32,
    ) -> Assignment {
        f.cpu -= d.cpu;
        f.mem -= d.mem;
        for s in slots {
            f.take_gpu(*s, if d.whole > 0 { WHOLE } else { d.milli });
        }
        Assignment {
            replica,
            node,
            gpus: slots
                .iter()
                .map(|s| self.nodes[node].gpus[*s].index)
                .collect(),
        }
    }

    fn slot_of(&self, node: usize, index: u32) -> Option<usize> {
        self.nodes[node].gpus.iter().position(|g| g.index == index)
    }

    fn release_into(&self, f: &mut Free, node: usize, d: &Demand, gpus: &[u32]) {
        f.cpu += d.cpu;
        f.mem += d.mem;
        for g in gpus {
            if let Some(s) = self.slot_of(node, *g) {
                f.give_gpu(s, if d.whole > 0 { WHOLE } else { d.milli });
            }
        }
    }

    fn release_running(&self, free: &mut [Free], r: &RunningJob) {
        let d = Demand::of(&r.job);
        for a in &r.assignments {
            if a.node < free.len() {
                self.release_into(&mut free[a.node], a.node, &d, &a.gpus);
            }
        }
    }

    /// The reservation for a job that cannot start now: where and when it
    /// could start as running jobs end (those with a run-time bound first,
    /// in end order; the others at an unknown time).
    pub fn reserve(
        &self,
        job: &PendingJob,
        d: &Demand,
        running: &[RunningJob],
        now: u64,
        bound: impl Fn(&PendingJob) -> Option<u64>,
    ) -> Option<Reservation> {
        let mut ends: Vec<(u64, usize)> = running
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let end = bound(&r.job)
                    .map(|b| r.started_at.saturating_add(b).max(now))
                    .unwrap_or(u64::MAX);
                (end, i)
            })
            .collect();
        ends.sort();
        let order: Vec<usize> = ends.iter().map(|(_, i)| *i).collect();
        // Whether the job fits only grows with each job released (a gang of
        // alike replicas fits exactly when the nodes' slots for it add up),
        // so the first end at which it fits is found by bisection.
        let k = self.fewest_releases(d, &order, running, None)?;
        let end = ends[k - 1].0;
        {
            let mut trial = self.free.clone();
            for i in &order[..k] {
                self.release_running(&mut trial, &running[*i]);
            }
            if let Some(assignments) = self.place_on(&mut trial, d, None) {
                let mut held: Vec<(u64, u64, Vec<u32>)> = self
                    .nodes
                    .iter()
                    .map(|n| (0, 0, vec![0; n.gpus.len()]))
                    .collect();
                for a in &assignments {
                    let h = &mut held[a.node];
                    h.0 += d.cpu;
                    h.1 += d.mem;
                    for g in &a.gpus {
                        if let Some(s) = self.slot_of(a.node, *g) {
                            h.2[s] += if d.whole > 0 { WHOLE } else { d.milli };
                        }
                    }
                }
                let mut held_nodes: Vec<usize> = assignments.iter().map(|a| a.node).collect();
                held_nodes.sort_unstable();
                held_nodes.dedup();
                return Some(Reservation {
                    job_id: job.id,
                    start_at: end,
                    held,
                    held_nodes,
                });
            }
        }
        None
    }

    /// The fewest of `order` (taken from the front) whose release lets the
    /// job fit outside what `excluding` holds, or `None` when even all of
    /// them do not.
    fn fewest_releases(
        &self,
        d: &Demand,
        order: &[usize],
        running: &[RunningJob],
        excluding: Option<&Reservation>,
    ) -> Option<usize> {
        let fits_after = |k: usize| {
            let mut trial = self.free.clone();
            for i in &order[..k] {
                self.release_running(&mut trial, &running[*i]);
            }
            self.place_on(&mut trial, d, excluding).is_some()
        };
        if order.is_empty() || !fits_after(order.len()) {
            return None;
        }
        let (mut lo, mut hi) = (1, order.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if fits_after(mid) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Some(lo)
    }

    /// Frees the fewest victims (taken in the given order, worst first)
    /// that let the job fit outside what `excluding` holds, then takes the
    /// job's capacity there so later calls do not count it twice. Returns the victims (indices into
    /// `running`).
    pub fn make_room(
        &mut self,
        d: &Demand,
        pool: &[usize],
        running: &[RunningJob],
        excluding: Option<&Reservation>,
    ) -> Option<Vec<usize>> {
        let k = self.fewest_releases(d, pool, running, excluding)?;
        let mut chosen: Vec<usize> = pool[..k].to_vec();
        // Spare the victims that turned out not to be needed.
        let mut i = 0;
        while i + 1 < chosen.len() {
            let mut trial = self.free.clone();
            for (k, v) in chosen.iter().enumerate() {
                if k != i {
                    self.release_running(&mut trial, &running[*v]);
                }
            }
            if self.place_on(&mut trial, d, excluding).is_some() {
                chosen.remove(i);
            } else {
                i += 1;
            }
        }
        let mut free = std::mem::take(&mut self.free);
        for v in &chosen {
            self.release_running(&mut free, &running[*v]);
        }
        let _ = self.place_on(&mut free, d, excluding);
        self.free = free;
        self.classes = Classes::build(self.nodes, &self.free, &self.models_lower);
        Some(chosen)
    }

    /// Nodes where one replica of `r` fits now.
    pub fn nodes_fitting(&self, r: &Resources) -> usize {
        let d = Demand::from_resources(r, 1);
        self.classes()
            .filter(|(n, _)| self.fits(*n, &self.free[*n], &d, None))
            .map(|(_, count)| count)
            .sum()
    }

    /// Each class of alike nodes once: its lowest-numbered node and its size.
    pub fn classes(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.classes
            .members
            .iter()
            .filter_map(|m| m.first().map(|n| (*n, m.len())))
    }

    /// Which resources no schedulable node has enough of, free, for one replica.
    pub fn short_of(&self, r: &Resources) -> Vec<&'static str> {
        let d = Demand::from_resources(r, 1);
        let live = || {
            self.classes()
                .map(|(n, _)| n)
                .filter(|n| self.nodes[*n].schedulable)
        };
        let mut short = Vec::new();
        if !live().any(|n| self.free[n].cpu >= d.cpu) {
            short.push("CPU");
        }
        if !live().any(|n| self.free[n].mem >= d.mem) {
            short.push("memory");
        }
        if d.wants_gpu() {
            let cpu_mem_free = Demand {
                cpu: 0,
                mem: 0,
                ..d.clone()
            };
            if !live().any(|n| self.fits(n, &self.free[n], &cpu_mem_free, None)) {
                short.push(if d.models.is_empty() {
                    "GPUs"
                } else {
                    "GPUs of the allowed models"
                });
            }
        }
        short
    }
}

/// How many replicas of `r` an empty node holds.
pub fn slots_when_empty(n: &NodeView, r: &Resources) -> u64 {
    let by_cpu = n.cpu_milli / r.cpu_milli.max(1);
    let by_mem = n.memory_bytes / r.memory_bytes.max(1);
    let gpus = n
        .gpus
        .iter()
        .filter(|g| g.healthy && r.gpu_model_allowed(&g.model))
        .count() as u64;
    let by_gpu = if r.gpu > 0 {
        gpus / r.gpu as u64
    } else if r.gpu_milli > 0 {
        gpus * (WHOLE / r.gpu_milli.max(1)) as u64
    } else {
        u64::MAX
    };
    by_cpu.min(by_mem).min(by_gpu)
}
