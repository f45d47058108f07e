//! The fragmentation measure behind fragmentation-aware packing: how much
//! of a node's free GPU capacity the jobs that typically arrive could not
//! use.
//!
//! It extends the measure of fragmentation gradient descent (Weng et al.,
//! "Beware of Fragmentation", ATC'23). The typical jobs are the ones the
//! scheduler sees (queued and running), each kind of request weighted by how
//! many replicas ask for it, learned afresh on every pass. For one kind of
//! job, a node's free GPU thousandths count as unusable:
//! - all of them, if not one such job fits its GPUs (too few whole devices
//!   of an allowed model, or no allowed device with enough free for a share);
//! - otherwise those on devices of a model it does not allow, those on
//!   devices with less free than one of its GPUs takes (any partly used
//!   device, for a job of whole GPUs), whole devices left over once they are
//!   grouped by the job's GPU count, and — beyond the paper, which only asks
//!   whether one more job fits — the devices that the node's free CPU and
//!   memory cannot feed: filled with jobs of this kind, the node runs out of
//!   CPU or memory after `k` of them, and GPUs beyond those `k` jobs stay
//!   idle. A GPU stranded because its node's CPU is spent is as lost as a
//!   sliver of a shared one.
//!
//! A node's fragmentation is the sum of that amount over the jobs seen (the
//! paper's expectation, times the number of jobs). A placement is scored by
//! how much it grows its node's fragmentation: the smaller the growth, the
//! more of what stays free the workload can still use.
//!
//! Everything is counted in whole numbers (replicas times thousandths), so
//! the measure is exact and the same whatever order the jobs are seen in.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;

use tessera_core::Resources;

const WHOLE: u32 = 1000;

/// The kinds of GPU requests in a workload, grouped by their GPU part.
#[derive(Debug, Clone, Default)]
pub(crate) struct Workload {
    shapes: Vec<GpuShape>,
    /// Whether some shape allows only some GPU models.
    constrained: bool,
}

/// Jobs that ask for the same GPUs (count, or share of one, and models).
#[derive(Debug, Clone)]
struct GpuShape {
    /// Whole GPUs per replica (0 for a share).
    whole: u32,
    /// Thousandths of one GPU, for a share.
    milli: u32,
    /// Allowed models, lowercased; empty allows any.
    models: Vec<String>,
    /// Replicas seen with this GPU request.
    count: u64,
    /// What replicas of this shape need besides GPUs: (CPU thousandths,
    /// memory bytes, replicas).
    needs: Vec<(u64, u64, u64)>,
}

impl Workload {
    /// The workload of the jobs seen: (resources, replicas, how many jobs
    /// ask for it). Jobs without GPUs do not count: no GPU placement changes
    /// what they can use (their CPU and memory count where they run).
    pub(crate) fn of<'r>(jobs: impl Iterator<Item = (&'r Resources, u32, u64)>) -> Workload {
        // Gathered first by the request as given (cheap to hash: numbers and
        // the models' slice), the last one compared before hashing (jobs in
        // a row often ask for the same); models are normalised only once
        // per distinct request, below.
        type Raw<'r> = (u32, u32, &'r [String], u64, u64);
        let mut raw: FxHashMap<Raw<'r>, u64> = FxHashMap::default();
        let mut last: Option<(Raw<'r>, u64)> = None;
        for (r, replicas, jobs) in jobs {
            if !r.wants_gpu() {
                continue;
            }
            let n = u64::from(replicas) * jobs;
            if n == 0 {
                continue;
            }
            let (whole, milli) = if r.gpu > 0 {
                (r.gpu, 0)
            } else {
                (0, r.gpu_milli.min(WHOLE))
            };
            let key: Raw<'r> = (whole, milli, &r.gpu_models, r.cpu_milli, r.memory_bytes);
            match &mut last {
                Some((k, m)) if *k == key => *m += n,
                _ => {
                    if let Some((k, m)) = last.take() {
                        *raw.entry(k).or_default() += m;
                    }
                    last = Some((key, n));
                }
            }
        }
        if let Some((k, m)) = last {
            *raw.entry(k).or_default() += m;
        }
        type Key = (u32, u32, Vec<String>);
        let mut shapes: BTreeMap<Key, BTreeMap<(u64, u64), u64>> = BTreeMap::new();
        for ((whole, milli, models, cpu, mem), n) in raw {
            let mut models: Vec<String> = models.iter().map(|m| m.to_ascii_lowercase()).collect();
            models.sort_unstable();
            models.dedup();
            *shapes
                .entry((whole, milli, models))
                .or_default()
                .entry((cpu, mem))
                .or_default() += n;
        }
        let shapes: Vec<GpuShape> = shapes
            .into_iter()
            .map(|((whole, milli, models), needs)| {
                let needs: Vec<(u64, u64, u64)> =
                    needs.into_iter().map(|((c, m), n)| (c, m, n)).collect();
                GpuShape {
                    whole,
                    milli,
                    count: needs.iter().map(|n| n.2).sum(),
                    models,
                    needs,
                }
            })
            .collect();
        Workload {
            constrained: shapes.iter().any(|s| !s.models.is_empty()),
            shapes,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.shapes.is_empty()
    }

    /// Whether which slots a shape may use depends on the node's GPU models
    /// (else [`Workload::unusable`] takes an empty `allowed`).
    pub(crate) fn constrained(&self) -> bool {
        self.constrained
    }

    /// For a node whose GPU slots carry `models` (lowercased), per shape and
    /// slot (shape-major) whether the shape may use the slot (a model it
    /// names is part of the slot's, as placement matches them); empty when
    /// no shape names models.
    pub(crate) fn allowed_slots(&self, models: &[String]) -> Vec<bool> {
        if !self.constrained {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(self.shapes.len() * models.len());
        for s in &self.shapes {
            for m in models {
                out.push(s.models.is_empty() || s.models.iter().any(|a| m.contains(a.as_str())));
            }
        }
        out
    }

    /// The free GPU thousandths of a node with `cpu`, `mem` and per-slot
    /// `gpu` free that the workload could not use, summed over its replicas
    /// (compare it only with values of the same workload). `allowed` is
    /// [`Workload::allowed_slots`] for the node.
    pub(crate) fn unusable(&self, allowed: &[bool], cpu: u64, mem: u64, gpu: &[u32]) -> u64 {
        let total: u64 = gpu.iter().map(|m| u64::from(*m)).sum();
        if total == 0 {
            return 0;
        }
        let mut frag = 0u64;
        let whole_free = gpu.iter().filter(|m| **m == WHOLE).count() as u64;
        for (k, s) in self.shapes.iter().enumerate() {
            let any_model = allowed.is_empty() || s.models.is_empty();
            let ok = |slot: usize| any_model || allowed[k * gpu.len() + slot];
            // What replicas of this shape could take of the free GPUs, were
            // CPU and memory plenty, and what one replica takes.
            let (room, per) = if s.whole > 0 {
                let usable = if any_model {
                    whole_free
                } else {
                    (0..gpu.len())
                        .filter(|slot| gpu[*slot] == WHOLE && ok(*slot))
                        .count() as u64
                };
                let per = u64::from(s.whole);
                (
                    (usable / per) * per * u64::from(WHOLE),
                    per * u64::from(WHOLE),
                )
            } else {
                let room: u64 = (0..gpu.len())
                    .filter(|slot| gpu[*slot] >= s.milli && ok(*slot))
                    .map(|slot| u64::from(gpu[slot]))
                    .sum();
                (room, u64::from(s.milli))
            };
            if room == 0 {
                frag += s.count * total;
                continue;
            }
            // Replicas it takes to use all of `room`: a job kind with CPU
            // and memory for that many loses nothing more (checked with
            // products, sparing most divisions).
            let enough = room.div_ceil(per);
            for (c, m, n) in &s.needs {
                let used = if c.saturating_mul(enough) <= cpu && m.saturating_mul(enough) <= mem {
                    room
                } else {
                    let by_cpu = cpu.checked_div(*c).unwrap_or(u64::MAX);
                    let by_mem = mem.checked_div(*m).unwrap_or(u64::MAX);
                    room.min(by_cpu.min(by_mem).saturating_mul(per))
                };
                frag += n * (total - used);
            }
        }
        frag
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GI: u64 = 1 << 30;

    fn res(cpu: u64, mem: u64, gpu: u32, milli: u32, models: &[&str]) -> Resources {
        Resources {
            cpu_milli: cpu,
            memory_bytes: mem,
            gpu,
            gpu_milli: milli,
            gpu_models: models.iter().map(|m| m.to_string()).collect(),
            node_selector: Default::default(),
        }
    }

    fn workload(jobs: &[(Resources, u64)]) -> Workload {
        Workload::of(jobs.iter().map(|(r, n)| (r, 1, *n)))
    }

    #[test]
    fn a_partly_used_gpu_is_lost_to_whole_gpu_jobs_but_not_to_shares_that_fit() {
        let whole = workload(&[(res(1000, GI, 1, 0, &[]), 1)]);
        let shares = workload(&[(res(1000, GI, 0, 400, &[]), 1)]);
        let gpu = [1000, 500];
        assert_eq!(whole.unusable(&[], 64_000, 64 * GI, &gpu), 500);
        assert_eq!(shares.unusable(&[], 64_000, 64 * GI, &gpu), 0);
        // Nothing fits at all: everything free is lost.
        assert_eq!(shares.unusable(&[], 64_000, 64 * GI, &[300, 300]), 600);
    }

    #[test]
    fn gpus_the_free_cpu_cannot_feed_are_lost() {
        // Four free GPUs but CPU for only one 8-CPU job: three stay idle.
        let w = workload(&[(res(8000, GI, 1, 0, &[]), 1)]);
        let gpu = [1000; 4];
        assert_eq!(w.unusable(&[], 10_000, 64 * GI, &gpu), 3000);
        assert_eq!(w.unusable(&[], 32_000, 64 * GI, &gpu), 0);
        // Memory counts the same way; no CPU at all loses everything.
        assert_eq!(w.unusable(&[], 32_000, 2 * GI, &gpu), 2000);
        assert_eq!(w.unusable(&[], 0, 64 * GI, &gpu), 4000);
    }

    #[test]
    fn whole_gpus_left_over_from_a_gang_size_are_lost_to_it() {
        let w = workload(&[(res(0, 0, 2, 0, &[]), 1)]);
        assert_eq!(w.unusable(&[], 0, 0, &[1000, 1000, 1000]), 1000);
        assert_eq!(w.unusable(&[], 0, 0, &[1000, 0, 0]), 1000);
    }

    #[test]
    fn jobs_count_by_how_often_they_come_and_models_they_allow() {
        let w = workload(&[(res(0, 0, 1, 0, &["H100"]), 3), (res(0, 0, 0, 500, &[]), 1)]);
        assert!(w.constrained());
        let allowed = w.allowed_slots(&["a100".to_string(), "h100".to_string()]);
        let gpu = [1000, 1000];
        // The H100-only jobs (3 of them) can use one of the two GPUs.
        assert_eq!(w.unusable(&allowed, 0, 0, &gpu), 3 * 1000);
        // On an A100-only node they can use nothing.
        let a100 = w.allowed_slots(&["a100".to_string(), "a100".to_string()]);
        assert_eq!(w.unusable(&a100, 0, 0, &gpu), 3 * 2000);
    }

    #[test]
    fn the_measure_does_not_depend_on_the_order_jobs_are_seen_in() {
        let jobs = [
            (res(3000, GI, 1, 0, &[]), 2),
            (res(5000, 2 * GI, 0, 300, &[]), 1),
            (res(3000, GI, 1, 0, &[]), 1),
            (res(1000, GI, 0, 0, &[]), 7),
        ];
        let mut reversed = jobs.clone();
        reversed.reverse();
        let (a, b) = (workload(&jobs), workload(&reversed));
        for cpu in [0, 2000, 4000, 9000] {
            let gpu = [1000, 700, 200];
            assert_eq!(
                a.unusable(&[], cpu, 4 * GI, &gpu),
                b.unusable(&[], cpu, 4 * GI, &gpu)
            );
        }
    }
}
