//! Free capacity while a plan is built, and placing replicas on it: fits,
//! node scoring (best fit or fragmentation gradient), GPU choice within a
//! node, reservations for backfill, and making room by preemption.

use std::cell::{OnceCell, RefCell};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::hash::{Hash, Hasher};

use rustc_hash::{FxHashMap as HashMap, FxHasher};

use tessera_core::Resources;

use crate::frag::Workload;
use crate::policy::Packing;
use crate::{Assignment, NodeView, PendingJob, RunningJob};

const WHOLE: u32 = 1000;

/// A node's score for a replica: (packing quality, best fit, price).
type Score = (f64, f64, f64);

/// Added to the packing quality of a placement where the replica would wait
/// in an engine's queue: larger than any quality (fit and fragmentation
/// scores stay far below it), so such a placement ranks after every one
/// that starts now and, among themselves, as before.
const WAITS: f64 = 1e12;

/// GPU slots held inline up to this many per node (nodes rarely have more),
/// so free capacity is copied and compared without allocating.
const INLINE_GPUS: usize = 8;

/// Per GPU slot, thousandths free: inline for nodes with up to
/// [`INLINE_GPUS`] slots, on the heap beyond.
#[derive(Debug)]
enum Slots {
    Inline { len: u8, milli: [u32; INLINE_GPUS] },
    Heap(Vec<u32>),
}

impl Default for Slots {
    fn default() -> Slots {
        Slots::Inline {
            len: 0,
            milli: [0; INLINE_GPUS],
        }
    }
}

impl std::ops::Deref for Slots {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        match self {
            Slots::Inline { len, milli } => &milli[..*len as usize],
            Slots::Heap(v) => v,
        }
    }
}

impl std::ops::DerefMut for Slots {
    fn deref_mut(&mut self) -> &mut [u32] {
        match self {
            Slots::Inline { len, milli } => &mut milli[..*len as usize],
            Slots::Heap(v) => v,
        }
    }
}

impl Clone for Slots {
    fn clone(&self) -> Slots {
        match self {
            Slots::Inline { len, milli } => Slots::Inline {
                len: *len,
                milli: *milli,
            },
            Slots::Heap(v) => Slots::Heap(v.clone()),
        }
    }

    fn clone_from(&mut self, source: &Slots) {
        match (self, source) {
            (Slots::Heap(a), Slots::Heap(b)) => a.clone_from(b),
            (me, other) => *me = other.clone(),
        }
    }
}

impl PartialEq for Slots {
    fn eq(&self, other: &Slots) -> bool {
        **self == **other
    }
}

impl Eq for Slots {}

impl Hash for Slots {
    fn hash<H: Hasher>(&self, h: &mut H) {
        (**self).hash(h);
    }
}

/// Free capacity of one node.
#[derive(Debug, Default, Clone)]
struct Free {
    cpu: u64,
    mem: u64,
    /// Per GPU slot, thousandths free (0 for an unhealthy device).
    gpu: Slots,
    /// Slots entirely free.
    whole: u32,
}

impl Free {
    fn of(n: &NodeView) -> Free {
        let milli = |g: &crate::GpuSlot| {
            if g.healthy {
                g.free_milli.min(WHOLE)
            } else {
                0
            }
        };
        let gpu = if n.gpus.len() <= INLINE_GPUS {
            let mut a = [0; INLINE_GPUS];
            for (m, g) in a.iter_mut().zip(&n.gpus) {
                *m = milli(g);
            }
            Slots::Inline {
                len: n.gpus.len() as u8,
                milli: a,
            }
        } else {
            Slots::Heap(n.gpus.iter().map(milli).collect())
        };
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

    /// What is left of it once what a reservation holds on its node is set
    /// aside (as [`Cluster::fits`] counts it with that hold).
    fn less(&self, held: &(u64, u64, Vec<u32>)) -> Free {
        let mut f = self.clone();
        f.cpu = f.cpu.saturating_sub(held.0);
        f.mem = f.mem.saturating_sub(held.1);
        for (m, h) in f.gpu.iter_mut().zip(&held.2) {
            *m = m.saturating_sub(*h);
        }
        f.whole = f.gpu.iter().filter(|m| **m == WHOLE).count() as u32;
        f
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
    /// Labels a node must carry; empty: any node.
    selector: Vec<(String, String)>,
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
            selector: r
                .node_selector
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            replicas,
        }
    }

    fn wants_gpu(&self) -> bool {
        self.whole > 0 || self.milli > 0
    }

    /// Thousandths of a GPU slot that each slot a replica uses takes (a
    /// whole device, or its share).
    fn per_slot(&self) -> u32 {
        if self.whole > 0 {
            WHOLE
        } else {
            self.milli
        }
    }
}

/// The least any one replica of a queue asks for, each resource on its own
/// (a GPU request as the thousandths it needs of one device: 1000 for
/// whole devices): a replica fits no node that lacks this much.
#[derive(Debug, Clone, Copy)]
pub struct Smallest {
    cpu: u64,
    mem: u64,
    gpu_milli: u32,
}

impl Smallest {
    /// Over `jobs` (with none, every amount is at its largest and no node
    /// holds it).
    pub fn of(jobs: &[PendingJob]) -> Smallest {
        let mut s = Smallest {
            cpu: u64::MAX,
            mem: u64::MAX,
            gpu_milli: u32::MAX,
        };
        for j in jobs {
            let r = &j.resources;
            s.cpu = s.cpu.min(r.cpu_milli);
            s.mem = s.mem.min(r.memory_bytes);
            let g = if r.gpu > 0 {
                WHOLE
            } else {
                r.gpu_milli.min(WHOLE)
            };
            s.gpu_milli = s.gpu_milli.min(g);
        }
        s
    }
}

/// Why [`Cluster::make_room`] made none: even with every victim offered
/// released the job does not fit outside the reservation it must keep out
/// of. `unfenced`: it would fit were that reservation not there (always
/// false without one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoRoom {
    pub unfenced: bool,
}

/// Capacity held for a waiting job under backfill.
#[derive(Debug, Clone)]
pub struct Reservation {
    pub job_id: u64,
    /// When the job could start at the latest, from run-time bounds
    /// (`u64::MAX` when some needed job has none).
    pub start_at: u64,
    /// Per node in `held_nodes`: CPU, memory and per-slot GPU thousandths
    /// held.
    held: Vec<(u64, u64, Vec<u32>)>,
    /// Nodes where something is held, in index order.
    held_nodes: Vec<usize>,
}

impl Reservation {
    /// What is held on `node`, if anything.
    fn held_on(&self, node: usize) -> Option<&(u64, u64, Vec<u32>)> {
        self.held_nodes
            .binary_search(&node)
            .ok()
            .map(|k| &self.held[k])
    }
}

pub struct Cluster<'a> {
    nodes: &'a [NodeView],
    /// Per node, whether it takes work: read for every node a placement
    /// looks at, so kept apart from the (large) node views.
    schedulable: Vec<bool>,
    free: Vec<Free>,
    /// Nodes grouped by GPU models and by labels, once needed (by a job
    /// that names GPU models, or for classes).
    groups: OnceCell<Groups>,
    packing: Packing,
    workload: Workload,
    /// Per group of alike GPU model lists, which slots each shape of the
    /// workload may use, once needed (only when some shape names models).
    allowed_slots: RefCell<Vec<Option<Box<[bool]>>>>,
    /// Classes of alike nodes, built once scanning every node for
    /// placements has cost about as much as building them would
    /// ([`SCANS_BEFORE_CLASSES`]); until then a placement scans the nodes.
    classes: Option<Classes>,
    /// Nodes scanned for placements while there were no classes.
    scanned: usize,
    /// Scratch copies of `free` for trials, reused between them.
    scratch: RefCell<Vec<Free>>,
}

/// Nodes grouped by what they share besides capacity.
struct Groups {
    /// Per node, its group of alike GPU model lists and of alike label sets.
    model_group: Vec<usize>,
    label_group: Vec<usize>,
    /// Per group of alike GPU model lists, its first node and the models
    /// lowercased, once needed (nodes mostly share one list, lowercased once).
    group_models: Vec<(usize, OnceCell<Vec<String>>)>,
}

impl Groups {
    fn of(nodes: &[NodeView]) -> Groups {
        // Nodes whose GPU model lists are equal ignoring ASCII case share a
        // group (found by a hash of the lowercased names, without building
        // them); each group's lowercased names are made when first needed.
        let mut groups: HashMap<u64, Vec<usize>> = HashMap::default();
        let mut group_models: Vec<(usize, OnceCell<Vec<String>>)> = Vec::new();
        let mut model_group = Vec::with_capacity(nodes.len());
        let same_models = |a: &NodeView, b: &NodeView| {
            a.gpus.len() == b.gpus.len()
                && a.gpus
                    .iter()
                    .zip(&b.gpus)
                    .all(|(x, y)| x.model.eq_ignore_ascii_case(&y.model))
        };
        for (i, n) in nodes.iter().enumerate() {
            let same_as_previous = i > 0 && {
                let p = &nodes[i - 1];
                p.gpus.len() == n.gpus.len()
                    && p.gpus.iter().zip(&n.gpus).all(|(a, b)| a.model == b.model)
            };
            if same_as_previous {
                model_group.push(model_group[i - 1]);
                continue;
            }
            let mut h = FxHasher::default();
            n.gpus.len().hash(&mut h);
            for g in &n.gpus {
                g.model.len().hash(&mut h);
                for b in g.model.bytes() {
                    b.to_ascii_lowercase().hash(&mut h);
                }
            }
            let candidates = groups.entry(h.finish()).or_default();
            let g = match candidates
                .iter()
                .copied()
                .find(|g| same_models(&nodes[group_models[*g].0], n))
            {
                Some(g) => g,
                None => {
                    group_models.push((i, OnceCell::new()));
                    candidates.push(group_models.len() - 1);
                    group_models.len() - 1
                }
            };
            model_group.push(g);
        }
        let mut label_groups: HashMap<&BTreeMap<String, String>, usize> = HashMap::default();
        let mut label_group = Vec::with_capacity(nodes.len());
        for (i, n) in nodes.iter().enumerate() {
            if i > 0 && nodes[i - 1].labels == n.labels {
                label_group.push(label_group[i - 1]);
                continue;
            }
            let next = label_groups.len();
            label_group.push(*label_groups.entry(&n.labels).or_insert(next));
        }
        Groups {
            model_group,
            label_group,
            group_models,
        }
    }
}

/// Full scans of the nodes for placements after which a cluster builds its
/// classes of alike nodes. Building costs about as much per node as this
/// many scans (a scan mostly rejects a node on a first comparison; building
/// hashes, compares and files every node), so a pass that places little
/// never pays for classes, and one that places much pays at most about
/// twice what it would have with classes from the start.
const SCANS_BEFORE_CLASSES: usize = 8;

/// What makes two nodes interchangeable for placement: the same capacity,
/// GPU models, price, state and free capacity. Nodes of one class score
/// alike, so a placement scores each class once instead of each node —
/// the difference between thousands of nodes and a handful of classes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sig {
    schedulable: bool,
    capacity: (u64, u64, usize),
    model_group: usize,
    label_group: usize,
    price: [u64; 3],
    ahead: (u64, u64),
    cpu: u64,
    mem: u64,
    gpu: Slots,
}

#[derive(Debug, Default)]
struct Classes {
    /// Classes by the hash of their signature (looked up without building
    /// a signature: a node changes class at every placement).
    by_hash: HashMap<u64, Vec<usize>>,
    /// Per class, its signature and its nodes in index order.
    sigs: Vec<Sig>,
    members: Vec<BTreeSet<usize>>,
    class_of: Vec<usize>,
    model_group: Vec<usize>,
    /// Per node, its group of alike label sets (nodes mostly share one).
    label_group: Vec<usize>,
}

impl Classes {
    fn build(
        nodes: &[NodeView],
        free: &[Free],
        model_group: Vec<usize>,
        label_group: Vec<usize>,
    ) -> Classes {
        let mut c = Classes {
            model_group,
            label_group,
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
            label_group: self.label_group[i],
            price: n.price_per_hour.map(f64::to_bits),
            ahead: (n.ahead_cpu_milli, n.ahead_memory_bytes),
            cpu: free[i].cpu,
            mem: free[i].mem,
            gpu: free[i].gpu.clone(),
        }
    }

    /// The hash of node `i`'s signature (as [`Sig`]'s fields, in order).
    fn sig_hash(&self, nodes: &[NodeView], free: &[Free], i: usize) -> u64 {
        let n = &nodes[i];
        let mut h = FxHasher::default();
        n.schedulable.hash(&mut h);
        (n.cpu_milli, n.memory_bytes, n.gpus.len()).hash(&mut h);
        self.model_group[i].hash(&mut h);
        self.label_group[i].hash(&mut h);
        n.price_per_hour.map(f64::to_bits).hash(&mut h);
        (n.ahead_cpu_milli, n.ahead_memory_bytes).hash(&mut h);
        free[i].cpu.hash(&mut h);
        free[i].mem.hash(&mut h);
        free[i].gpu.hash(&mut h);
        h.finish()
    }

    /// Whether node `i` now has class `c`'s signature.
    fn matches(&self, nodes: &[NodeView], free: &[Free], i: usize, c: usize) -> bool {
        let (n, s) = (&nodes[i], &self.sigs[c]);
        s.schedulable == n.schedulable
            && s.capacity == (n.cpu_milli, n.memory_bytes, n.gpus.len())
            && s.model_group == self.model_group[i]
            && s.label_group == self.label_group[i]
            && s.price == n.price_per_hour.map(f64::to_bits)
            && s.ahead == (n.ahead_cpu_milli, n.ahead_memory_bytes)
            && s.cpu == free[i].cpu
            && s.mem == free[i].mem
            && s.gpu == free[i].gpu
    }

    /// Puts node `i` in the class its free capacity now belongs to.
    fn refresh(&mut self, nodes: &[NodeView], free: &[Free], i: usize) {
        let old = self.class_of[i];
        if old != usize::MAX && self.matches(nodes, free, i, old) {
            return;
        }
        let h = self.sig_hash(nodes, free, i);
        let found = self.by_hash.get(&h).and_then(|cs| {
            cs.iter()
                .copied()
                .find(|c| self.matches(nodes, free, i, *c))
        });
        let c = match found {
            Some(c) => c,
            None => {
                let c = self.sigs.len();
                self.sigs.push(self.sig(nodes, free, i));
                self.members.push(BTreeSet::new());
                self.by_hash.entry(h).or_default().push(c);
                c
            }
        };
        if old != usize::MAX {
            self.members[old].remove(&i);
        }
        self.members[c].insert(i);
        self.class_of[i] = c;
    }
}

impl<'a> Cluster<'a> {
    #[cfg(test)]
    pub fn new(
        nodes: &'a [NodeView],
        queue: &[PendingJob],
        running: &[RunningJob],
        packing: Packing,
    ) -> Cluster<'a> {
        let jobs = queue.iter().chain(running.iter().map(|r| &r.job));
        Cluster::with_workload(nodes, packing, jobs.map(|j| (&j.resources, j.replicas, 1)))
    }

    /// With classes of alike nodes from the start.
    #[cfg(test)]
    fn with_classes(mut self) -> Cluster<'a> {
        let g = self.groups();
        let (model_group, label_group) = (g.model_group.clone(), g.label_group.clone());
        self.classes = Some(Classes::build(
            self.nodes,
            &self.free,
            model_group,
            label_group,
        ));
        self
    }

    /// Free capacity as the nodes report it. `jobs` are the requests seen
    /// (resources, replicas, how many jobs ask for it) that fragmentation
    /// scoring expects to arrive.
    pub fn with_workload<'r>(
        nodes: &'a [NodeView],
        packing: Packing,
        jobs: impl Iterator<Item = (&'r Resources, u32, u64)>,
    ) -> Cluster<'a> {
        let workload = if packing == Packing::Fragmentation {
            Workload::of(jobs)
        } else {
            Workload::default()
        };
        let free: Vec<Free> = nodes.iter().map(Free::of).collect();
        Cluster {
            nodes,
            schedulable: nodes.iter().map(|n| n.schedulable).collect(),
            free,
            groups: OnceCell::new(),
            packing,
            workload,
            allowed_slots: RefCell::new(Vec::new()),
            classes: None,
            scanned: 0,
            scratch: RefCell::new(Vec::new()),
        }
    }

    fn groups(&self) -> &Groups {
        self.groups.get_or_init(|| Groups::of(self.nodes))
    }

    /// Whether `node` may run `d` at all: schedulable, with the labels
    /// `d` selects.
    fn eligible(&self, node: usize, d: &Demand) -> bool {
        self.schedulable[node]
            && (d.selector.is_empty() || {
                let labels = &self.nodes[node].labels;
                d.selector
                    .iter()
                    .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
            })
    }

    fn allowed(&self, node: usize, slot: usize, d: &Demand) -> bool {
        if d.models.is_empty() {
            return true;
        }
        let groups = self.groups();
        let (first, lower) = &groups.group_models[groups.model_group[node]];
        let lower = lower.get_or_init(|| {
            self.nodes[*first]
                .gpus
                .iter()
                .map(|g| g.model.to_ascii_lowercase())
                .collect()
        });
        d.models.iter().any(|m| lower[slot].contains(m.as_str()))
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
        if !self.eligible(node, d) {
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
                return self.least_fragmenting_share(node, free, d, held);
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

    /// For a share under fragmentation-aware packing: the device whose use
    /// leaves the node least fragmented, the fullest such, then the first.
    /// Devices with the same free thousandths and model are alike, so each
    /// such kind is tried once.
    fn least_fragmenting_share(
        &self,
        node: usize,
        free: &Free,
        d: &Demand,
        held: Option<&(u64, u64, Vec<u32>)>,
    ) -> Vec<usize> {
        let avail =
            |slot: usize| free.gpu[slot].saturating_sub(held.map(|h| h.2[slot]).unwrap_or(0));
        let gpus = &self.nodes[node].gpus;
        let mut after = free.gpu.to_vec();
        let mut best: Option<((u64, u32), usize)> = None;
        for s in 0..free.gpu.len() {
            if avail(s) < d.milli || !self.allowed(node, s, d) {
                continue;
            }
            let alike = (0..s).any(|t| {
                free.gpu[t] == free.gpu[s] && avail(t) == avail(s) && gpus[t].model == gpus[s].model
            });
            if alike {
                continue;
            }
            after[s] -= d.milli;
            let frag = self.fragmentation(node, free.cpu - d.cpu, free.mem - d.mem, &after);
            after[s] += d.milli;
            let key = (frag, avail(s));
            if best.as_ref().is_none_or(|(b, _)| key < *b) {
                best = Some((key, s));
            }
        }
        best.map(|(_, s)| s).into_iter().collect()
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

    /// Free GPU thousandths on `node` (with `cpu`, `mem` and `gpu` free)
    /// that the workload could not use (see [`Workload::unusable`]).
    fn fragmentation(&self, node: usize, cpu: u64, mem: u64, gpu: &[u32]) -> u64 {
        if !self.workload.constrained() {
            return self.workload.unusable(&[], cpu, mem, gpu);
        }
        let groups = self.groups();
        let group = groups.model_group[node];
        let known = self
            .allowed_slots
            .borrow()
            .get(group)
            .is_some_and(Option::is_some);
        if !known {
            let models: Vec<String> = self.nodes[node]
                .gpus
                .iter()
                .map(|g| g.model.to_ascii_lowercase())
                .collect();
            let mut cache = self.allowed_slots.borrow_mut();
            if cache.len() <= group {
                cache.resize(groups.group_models.len().max(group + 1), None);
            }
            cache[group] = Some(self.workload.allowed_slots(&models).into());
        }
        let cache = self.allowed_slots.borrow();
        let allowed = cache[group].as_deref().unwrap_or(&[]);
        self.workload.unusable(allowed, cpu, mem, gpu)
    }

    /// What one replica costs per hour on a node.
    fn price(&self, node: usize, d: &Demand) -> f64 {
        let p = &self.nodes[node].price_per_hour;
        d.cpu as f64 / 1000.0 * p[0]
            + d.mem as f64 / (1u64 << 30) as f64 * p[1]
            + (d.whole * WHOLE + d.milli) as f64 / 1000.0 * p[2]
    }

    /// Whether a replica placed on `node` (with `free` left) would wait in
    /// an engine's queue rather than start: it takes room beyond what the
    /// node can run now ([`NodeView::ahead_cpu_milli`]).
    fn waits(&self, node: usize, free: &Free, d: &Demand) -> bool {
        let n = &self.nodes[node];
        (n.ahead_cpu_milli > 0 || n.ahead_memory_bytes > 0)
            && (d.cpu > free.cpu.saturating_sub(n.ahead_cpu_milli)
                || d.mem > free.mem.saturating_sub(n.ahead_memory_bytes))
    }

    /// (packing quality, best fit, price): lower is better, in that order, so
    /// among placements of equal quality the cheaper wins. A placement where
    /// the replica would wait in an engine's queue ranks after every one
    /// where it starts now.
    fn score(&self, node: usize, free: &Free, d: &Demand, gpus: &[usize]) -> Score {
        let (quality, fit, price) = self.placement_score(node, free, d, gpus);
        if self.waits(node, free, d) {
            return (quality + WAITS, fit, price);
        }
        (quality, fit, price)
    }

    fn placement_score(&self, node: usize, free: &Free, d: &Demand, gpus: &[usize]) -> Score {
        let fit = self.best_fit_score(node, free, d);
        let price = self.price(node, d);
        if self.packing == Packing::BestFit || self.workload.is_empty() {
            return (fit, 0.0, price);
        }
        let per = d.per_slot();
        let mut buf = [0u32; 16];
        let mut heap = Vec::new();
        let gpu_after: &mut [u32] = if free.gpu.len() <= buf.len() {
            &mut buf[..free.gpu.len()]
        } else {
            heap.extend_from_slice(&free.gpu);
            &mut heap
        };
        gpu_after.copy_from_slice(&free.gpu);
        for s in gpus {
            gpu_after[*s] = gpu_after[*s].saturating_sub(per);
        }
        let after = self.fragmentation(node, free.cpu - d.cpu, free.mem - d.mem, gpu_after);
        let before = self.fragmentation(node, free.cpu, free.mem, &free.gpu);
        (after as f64 - before as f64, fit, price)
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
            if self.classes.is_none() {
                if self.scanned >= SCANS_BEFORE_CLASSES * self.nodes.len() {
                    let g = self.groups();
                    let (model_group, label_group) = (g.model_group.clone(), g.label_group.clone());
                    self.classes = Some(Classes::build(
                        self.nodes,
                        &self.free,
                        model_group,
                        label_group,
                    ));
                } else {
                    self.scanned += self.nodes.len();
                }
            }
            let Some((node, slots)) = self.best_node(d, excluding) else {
                // A gang is all or nothing: give back what earlier replicas took.
                for (node, f) in before.into_iter().rev() {
                    self.free[node] = f;
                    self.refresh(node);
                }
                return None;
            };
            before.push((node, self.free[node].clone()));
            let mut f = std::mem::take(&mut self.free[node]);
            out.push(self.take(&mut f, node, d, &slots, replica));
            self.free[node] = f;
            self.refresh(node);
        }
        Some(out)
    }

    /// Files node `node` in the class its free capacity now belongs to
    /// (when there are classes).
    fn refresh(&mut self, node: usize) {
        if let Some(c) = &mut self.classes {
            c.refresh(self.nodes, &self.free, node);
        }
    }

    /// The best node for one replica, scoring each class of alike nodes once
    /// (its lowest-numbered node stands for it) and nodes a reservation
    /// holds capacity on one by one, or, before there are classes, every
    /// node. Ties go to the lowest node index, as a scan of every node would
    /// choose.
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
        let Some(classes) = &self.classes else {
            for node in 0..self.nodes.len() {
                consider(node, excluding.and_then(|r| r.held_on(node)), &mut best);
            }
            return best.map(|(_, node, gpus)| (node, gpus));
        };
        for members in &classes.members {
            if let Some(&node) = members
                .iter()
                .find(|n| held_nodes.binary_search(n).is_err())
            {
                consider(node, None, &mut best);
            }
        }
        if let Some(r) = excluding {
            for (&node, held) in held_nodes.iter().zip(&r.held) {
                consider(node, Some(held), &mut best);
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
                let held = excluding.and_then(|r| r.held_on(node));
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
            f.take_gpu(*s, d.per_slot());
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
                f.give_gpu(s, d.per_slot());
            }
        }
    }

    fn release_running(&self, free: &mut [Free], r: &RunningJob) {
        let d = released_demand(r);
        for a in &r.assignments {
            if a.node < free.len() {
                self.release_into(&mut free[a.node], a.node, &d, &a.gpus);
            }
        }
    }

    /// [`Cluster::release_running`] restricted to `nodes` (sorted), whose
    /// free capacity `free` holds in that order.
    fn release_on(&self, free: &mut [Free], nodes: &[usize], r: &RunningJob) {
        let d = released_demand(r);
        for a in &r.assignments {
            if let Ok(k) = nodes.binary_search(&a.node) {
                self.release_into(&mut free[k], a.node, &d, &a.gpus);
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
        // Running jobs by (end, index), taken from a heap one at a time:
        // the job usually fits long before the last one ends.
        let mut ends: BinaryHeap<Reverse<(u64, usize)>> = running
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let end = bound(&r.job)
                    .map(|b| r.started_at.saturating_add(b).max(now))
                    .unwrap_or(u64::MAX);
                Reverse((end, i))
            })
            .collect();
        let mut end = 0;
        let order = std::iter::from_fn(|| {
            let Reverse((e, i)) = ends.pop()?;
            end = e;
            Some(i)
        });
        // Whether the job fits only grows with each job released (a gang of
        // alike replicas fits exactly when the nodes' slots for it add up),
        // so the first end at which it fits is the first release after
        // which the slots suffice; the scratch copy holds the capacity then.
        self.fewest_releases(d, order, running, None, |_| {}).ok()?;
        let mut trial = self.scratch.borrow_mut();
        let assignments = self.place_on(&mut trial, d, None)?;
        let mut held_nodes: Vec<usize> = assignments.iter().map(|a| a.node).collect();
        held_nodes.sort_unstable();
        held_nodes.dedup();
        let mut held: Vec<(u64, u64, Vec<u32>)> = held_nodes
            .iter()
            .map(|n| (0, 0, vec![0; self.nodes[*n].gpus.len()]))
            .collect();
        for a in &assignments {
            let k = held_nodes.binary_search(&a.node).expect("listed above");
            let h = &mut held[k];
            h.0 += d.cpu;
            h.1 += d.mem;
            for g in &a.gpus {
                if let Some(s) = self.slot_of(a.node, *g) {
                    h.2[s] += d.per_slot();
                }
            }
        }
        Some(Reservation {
            job_id: job.id,
            start_at: end,
            held,
            held_nodes,
        })
    }

    /// How many replicas of `d` fit on `node` given `free`, one after another.
    fn slots(&self, node: usize, free: &Free, d: &Demand) -> u64 {
        if !self.eligible(node, d) {
            return 0;
        }
        let mut n = u64::MAX;
        if let Some(by_cpu) = free.cpu.checked_div(d.cpu) {
            n = n.min(by_cpu);
        }
        if let Some(by_mem) = free.mem.checked_div(d.mem) {
            n = n.min(by_mem);
        }
        if d.whole > 0 {
            let whole = if d.models.is_empty() {
                u64::from(free.whole)
            } else {
                (0..free.gpu.len())
                    .filter(|s| free.gpu[*s] == WHOLE && self.allowed(node, *s, d))
                    .count() as u64
            };
            n = n.min(whole / u64::from(d.whole));
        } else if d.milli > 0 {
            let shares: u64 = (0..free.gpu.len())
                .filter(|s| self.allowed(node, *s, d))
                .map(|s| u64::from(free.gpu[s] / d.milli))
                .sum();
            n = n.min(shares);
        }
        n
    }

    /// [`Cluster::slots`] on what `excluding` leaves free on `node`.
    fn slots_outside(
        &self,
        node: usize,
        free: &Free,
        d: &Demand,
        excluding: Option<&Reservation>,
    ) -> u64 {
        match excluding.and_then(|r| r.held_on(node)) {
            None => self.slots(node, free, d),
            Some(h) => self.slots(node, &free.less(h), d),
        }
    }

    /// Whether every replica of `d` fits `free` — exactly when
    /// [`Cluster::place_on`] would place them all: each replica placed takes
    /// one of its node's slots and leaves other nodes' slots as they were,
    /// whichever node the scoring picks.
    fn fits_all(&self, free: &[Free], d: &Demand) -> bool {
        let mut total = 0u64;
        for (node, f) in free.iter().enumerate() {
            total = total.saturating_add(self.slots(node, f, d));
            if total >= u64::from(d.replicas) {
                return true;
            }
        }
        d.replicas == 0
    }

    /// The fewest of `order` (taken from the front, at least one) whose
    /// release lets the job fit outside what `excluding` holds, or
    /// [`NoRoom`] when even all of them do not. Releases them one by one into the
    /// scratch copy of free capacity, which holds the capacity after the
    /// last release on return, and keeps the sum of the nodes' slots for a
    /// replica current (only the nodes a released job held change): the
    /// job fits exactly when the slots add up to its replicas (as
    /// `fits_all` counts them), and only more so with each release.
    fn fewest_releases(
        &self,
        d: &Demand,
        order: impl IntoIterator<Item = usize>,
        running: &[RunningJob],
        excluding: Option<&Reservation>,
        mut taken: impl FnMut(usize),
    ) -> Result<usize, NoRoom> {
        let mut trial = self.scratch.borrow_mut();
        trial.clone_from(&self.free);
        let mut slots: Vec<u64> = trial
            .iter()
            .enumerate()
            .map(|(node, f)| self.slots_outside(node, f, d, excluding))
            .collect();
        // Wide enough that a sum of `u64::MAX`s cannot overflow.
        let mut total: u128 = slots.iter().map(|s| u128::from(*s)).sum();
        let want = u128::from(d.replicas);
        for (k, i) in order.into_iter().enumerate() {
            taken(i);
            let r = &running[i];
            self.release_running(&mut trial, r);
            for a in &r.assignments {
                if a.node < trial.len() {
                    let now = self.slots_outside(a.node, &trial[a.node], d, excluding);
                    total = total - u128::from(slots[a.node]) + u128::from(now);
                    slots[a.node] = now;
                }
            }
            if total >= want {
                return Ok(k + 1);
            }
        }
        // With every one of them released, would it fit were nothing
        // excluded? (A reservation elsewhere could not keep it out then.)
        let unfenced = excluding.is_some() && self.fits_all(&trial, d);
        Err(NoRoom { unfenced })
    }

    /// Whether every replica of `d` fits the free capacity now, ignoring
    /// any reservation: exactly when [`Cluster::place`] without one would
    /// place it.
    pub fn fits_now(&self, d: &Demand) -> bool {
        self.fits_all(&self.free, d)
    }

    /// Adds what running job `r` holds on each node to `per_node` (CPU
    /// thousandths, memory bytes, GPU thousandths), sized to the nodes.
    pub fn add_held(&self, per_node: &mut [[u64; 3]], r: &RunningJob) {
        // As `release_running` gives it back.
        let d = released_demand(r);
        for a in &r.assignments {
            if let Some(h) = per_node.get_mut(a.node) {
                h[0] = h[0].saturating_add(d.cpu);
                h[1] = h[1].saturating_add(d.mem);
                h[2] = h[2].saturating_add(u64::from(d.per_slot()) * a.gpus.len() as u64);
            }
        }
    }

    /// Whether every replica of `d` could fit were `released` (per node,
    /// as [`Cluster::add_held`] counts it) freed on top of what is free
    /// now: a bound, true whenever releasing those jobs lets it fit. A node
    /// counts as many replicas as its CPU, memory and GPU thousandths
    /// (free plus released, over one replica's) allow; models, labels and
    /// reservations are left aside.
    pub fn might_fit_releasing(&self, d: &Demand, released: &[[u64; 3]]) -> bool {
        let per_gpu = if d.whole > 0 {
            u64::from(d.whole) * u64::from(WHOLE)
        } else {
            u64::from(d.milli)
        };
        let want = u64::from(d.replicas);
        let mut total = 0u64;
        for (f, r) in self.free.iter().zip(released) {
            let mut n = u64::MAX;
            if let Some(k) = f.cpu.saturating_add(r[0]).checked_div(d.cpu) {
                n = n.min(k);
            }
            if let Some(k) = f.mem.saturating_add(r[1]).checked_div(d.mem) {
                n = n.min(k);
            }
            let gpu: u64 = f.gpu.iter().map(|m| u64::from(*m)).sum();
            if let Some(k) = gpu.saturating_add(r[2]).checked_div(per_gpu) {
                n = n.min(k);
            }
            total = total.saturating_add(n);
            if total >= want {
                return true;
            }
        }
        want == 0
    }

    /// Frees the fewest victims (taken in the given order, worst first)
    /// that let the job fit outside what `excluding` holds, then takes the
    /// job's capacity there, as the next pass would place it, so later calls
    /// do not count it twice.
    /// Returns the victims (indices into `running`). The pool is read only
    /// as far as needed.
    pub fn make_room(
        &mut self,
        d: &Demand,
        pool: impl IntoIterator<Item = usize>,
        running: &[RunningJob],
        excluding: Option<&Reservation>,
    ) -> Result<Vec<usize>, NoRoom> {
        let mut chosen: Vec<usize> = Vec::new();
        self.fewest_releases(d, pool, running, excluding, |i| chosen.push(i))?;
        // Spare the victims that turned out not to be needed, first to last:
        // a victim is spared when the job still fits with the others
        // released. The scratch copy holds the capacity with every victim
        // still chosen released; sparing one changes only its nodes, which
        // are recomputed from the free capacity and the other victims' releases,
        // in their order.
        if chosen.len() > 1 {
            let mut trial = self.scratch.borrow_mut();
            let mut slots: Vec<u64> = trial
                .iter()
                .enumerate()
                .map(|(node, f)| self.slots_outside(node, f, d, excluding))
                .collect();
            let mut total: u128 = slots.iter().map(|s| u128::from(*s)).sum();
            let want = u128::from(d.replicas);
            let mut i = 0;
            while i + 1 < chosen.len() {
                let mut nodes: Vec<usize> = running[chosen[i]]
                    .assignments
                    .iter()
                    .map(|a| a.node)
                    .filter(|n| *n < trial.len())
                    .collect();
                nodes.sort_unstable();
                nodes.dedup();
                let mut without: Vec<Free> = nodes.iter().map(|n| self.free[*n].clone()).collect();
                for (k, v) in chosen.iter().enumerate() {
                    if k == i {
                        continue;
                    }
                    self.release_on(&mut without, &nodes, &running[*v]);
                }
                let slots_without: Vec<u64> = nodes
                    .iter()
                    .zip(&without)
                    .map(|(n, f)| self.slots_outside(*n, f, d, excluding))
                    .collect();
                let total_without = nodes.iter().zip(&slots_without).fold(total, |t, (n, s)| {
                    t - u128::from(slots[*n]) + u128::from(*s)
                });
                if total_without >= want {
                    chosen.remove(i);
                    for ((n, f), s) in nodes.iter().zip(without).zip(slots_without) {
                        trial[*n] = f;
                        slots[*n] = s;
                    }
                    total = total_without;
                } else {
                    i += 1;
                }
            }
        }
        let mut free = std::mem::take(&mut self.free);
        let mut touched: Vec<usize> = Vec::new();
        for v in &chosen {
            self.release_running(&mut free, &running[*v]);
            touched.extend(running[*v].assignments.iter().map(|a| a.node));
        }
        if let Some(placed) = self.place_on(&mut free, d, excluding) {
            touched.extend(placed.iter().map(|a| a.node));
        }
        self.free = free;
        // Only the nodes whose free capacity changed can change class.
        touched.sort_unstable();
        touched.dedup();
        for node in touched.into_iter().filter(|n| *n < self.nodes.len()) {
            self.refresh(node);
        }
        Ok(chosen)
    }

    /// Whether some schedulable node has free at least what `s` says every
    /// replica needs (labels, models and reservations aside): when none
    /// has, no replica of those jobs fits anywhere.
    pub fn might_hold(&self, s: &Smallest) -> bool {
        self.free.iter().zip(self.nodes).any(|(f, n)| {
            n.schedulable
                && f.cpu >= s.cpu
                && f.mem >= s.mem
                && (s.gpu_milli == 0 || f.gpu.iter().any(|m| *m >= s.gpu_milli))
        })
    }

    /// Nodes where one replica of `r` fits now.
    pub fn nodes_fitting(&self, r: &Resources) -> usize {
        let d = Demand::from_resources(r, 1);
        self.classes()
            .filter(|(n, _)| self.fits(*n, &self.free[*n], &d, None))
            .map(|(_, count)| count)
            .sum()
    }

    /// Each class of alike nodes once: its lowest-numbered node and its size
    /// (before there are classes, each node on its own).
    pub fn classes(&self) -> Box<dyn Iterator<Item = (usize, usize)> + '_> {
        match &self.classes {
            Some(c) => Box::new(
                c.members
                    .iter()
                    .filter_map(|m| m.first().map(|n| (*n, m.len()))),
            ),
            None => Box::new((0..self.nodes.len()).map(|n| (n, 1))),
        }
    }

    /// Which resources no schedulable node has enough of, free, for one replica.
    pub fn short_of(&self, r: &Resources) -> Vec<&'static str> {
        let d = Demand::from_resources(r, 1);
        let live = || {
            self.classes()
                .map(|(n, _)| n)
                .filter(|n| self.eligible(*n, &d))
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

/// What [`Cluster::release_into`] reads of a running job's demand (the model
/// list and selector are not needed to give its resources back).
fn released_demand(r: &RunningJob) -> Demand {
    let res = &r.job.resources;
    Demand {
        cpu: res.cpu_milli,
        mem: res.memory_bytes,
        whole: res.gpu,
        milli: if res.gpu == 0 { res.gpu_milli } else { 0 },
        models: Vec::new(),
        selector: Vec::new(),
        replicas: r.job.replicas,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_nodes() -> impl Strategy<Value = Vec<NodeView>> {
        proptest::collection::vec((0u8..3, 0u32..3, any::<bool>(), 0u8..2), 1..40).prop_map(
            |spec| {
                spec.into_iter()
                    .enumerate()
                    .map(|(i, (used, shares, h100, price))| {
                        let mut n = NodeView::new(format!("n{i}"), 8000, 64 << 30)
                            .with_gpus(4, if h100 { "H100" } else { "A100" });
                        n.free_cpu_milli -= used as u64 * 2000;
                        for g in n.gpus.iter_mut().take(shares as usize) {
                            g.free_milli = 500;
                        }
                        n.price_per_hour = [0.0, 0.0, 1.0 + price as f64];
                        n
                    })
                    .collect()
            },
        )
    }

    proptest! {
        /// Scoring classes of alike nodes chooses exactly what scoring every
        /// node would, for every packing, request and gang size; counting
        /// each node's slots tells whether a job fits at all.
        #[test]
        fn classes_choose_what_a_full_scan_would(
            nodes in arb_nodes(),
            jobs in proptest::collection::vec((1u64..4, 0u32..3, 0u32..3, 1u32..4, any::<bool>()), 1..20),
            fragmentation in any::<bool>(),
        ) {
            let packing = if fragmentation { Packing::Fragmentation } else { Packing::BestFit };
            let queue: Vec<PendingJob> = jobs
                .iter()
                .enumerate()
                .map(|(i, (cpu, gpu, share, replicas, h100))| {
                    let r = Resources {
                        cpu_milli: cpu * 1000,
                        memory_bytes: 1 << 30,
                        gpu: if *share == 0 { *gpu } else { 0 },
                        gpu_milli: if *share == 0 { 0 } else { 300 * share },
                        gpu_models: if *h100 { vec!["h100".into()] } else { vec![] },
                        node_selector: Default::default(),
                    };
                    PendingJob::new(i as u64, "t", 0, 0, r, *replicas)
                })
                .collect();
            let mut fast = Cluster::new(&nodes, &queue, &[], packing).with_classes();
            let mut scan = Cluster::new(&nodes, &queue, &[], packing);
            let slow = Cluster::new(&nodes, &queue, &[], packing);
            let mut slow_free = slow.free.clone();
            for j in &queue {
                let d = Demand::of(j);
                // Counting slots answers whether a placement exists.
                let fits = slow.fits_all(&slow_free, &d);
                let a = fast.place(&d, None);
                let c = scan.place(&d, None);
                let b = slow.place_on(&mut slow_free, &d, None);
                prop_assert_eq!(fits, b.is_some());
                prop_assert_eq!(&a, &b);
                prop_assert_eq!(c, b);
            }
        }
    }
}
