//! What a run reports, and the table that shows several side by side.
//!
//! Definitions (all times in seconds of virtual time):
//! - JCT: finish − submit. Queueing: JCT − run time, i.e. the time a job
//!   was not running (before it first started and while preempted).
//! - makespan: last finish − first submit.
//! - GPU utilisation: GPU-time the jobs ran (GPUs held × run time) ÷
//!   (cluster GPUs × makespan).
//! - slowdown: JCT ÷ run time, the run time counted as at least 1 s and
//!   the slowdown as at least 1. `slowdown_by_gpus` averages it per bucket
//!   of the GPUs a whole job holds (rounded up): 1, 2-4, 5-8, >8 (and 0 for
//!   CPU-only jobs, when there are any).
//! - teams: per team, finished jobs, GPU-hours run, that as a share of all
//!   GPU-hours, average JCT and average slowdown.
//! - Jain's fairness index over the teams' average slowdowns,
//!   (Σx)² ÷ (n·Σx²): 1 when every team's jobs are slowed down alike,
//!   1/n when one team bears all of it.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::engine::EventRun;
use crate::packing::PackRun;
use crate::trace::SimJob;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bucket {
    pub jobs: usize,
    pub avg_slowdown: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TeamStats {
    pub jobs: usize,
    pub gpu_hours: f64,
    pub gpu_share: f64,
    pub avg_jct_s: f64,
    pub avg_slowdown: f64,
}

/// Metrics of an event-driven replay.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventReport {
    pub policy: String,
    pub mode: &'static str,
    /// Jobs that finished.
    pub jobs: usize,
    /// Jobs dropped at load because no set of nodes could ever hold them.
    pub infeasible: usize,
    /// Jobs still waiting when no event was left.
    pub unfinished: usize,
    pub avg_jct_s: f64,
    pub p50_jct_s: f64,
    pub p99_jct_s: f64,
    pub avg_queue_s: f64,
    pub p99_queue_s: f64,
    pub makespan_s: f64,
    pub gpu_utilization: f64,
    pub preemptions: u64,
    /// Jobs preempted at least once, and the most times one job was.
    pub preempted_jobs: usize,
    pub max_preemptions_per_job: u32,
    /// Preempted jobs started again at the very time they were stopped,
    /// and preemptions whose beneficiary had not started by the end of
    /// that event time: both are work stopped for nothing.
    pub restarted_at_once: u64,
    pub preemptions_without_start: u64,
    pub slowdown_by_gpus: BTreeMap<String, Bucket>,
    pub teams: BTreeMap<String, TeamStats>,
    pub jain_fairness: f64,
    /// Calls to the scheduler, the time spent in them, the longest queue
    /// one saw, and event times that hit the pass cap.
    pub schedule_calls: u64,
    /// Event times with only arrivals that could not start, where no pass
    /// was needed.
    pub skipped_passes: u64,
    /// Passes after one that only placed jobs that were sure to change
    /// nothing, and were not run.
    pub skipped_confirmations: u64,
    pub schedule_s: f64,
    pub max_queue: usize,
    pub pass_cap_hits: u64,
    /// Passes after the first at one event time that still placed or
    /// preempted something.
    pub changing_confirmations: u64,
    pub sim_wall_s: f64,
}

/// One seed of a packing run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeedResult {
    pub seed: Option<u64>,
    pub pods: usize,
    pub placed: usize,
    pub failed: usize,
    pub allocation_ratio_at_100: Option<f64>,
    pub allocation_ratio_at_130: Option<f64>,
    pub final_allocation_ratio: f64,
}

/// Metrics of a packing run (the mean over its seeds).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PackReport {
    pub policy: String,
    pub mode: &'static str,
    /// The policy's GPU packing: `best-fit` or `fragmentation`.
    pub packing: String,
    pub total_gpus: u64,
    pub allocation_ratio_at_100: Option<f64>,
    pub allocation_ratio_at_130: Option<f64>,
    pub seeds: Vec<SeedResult>,
    pub schedule_s: f64,
    pub sim_wall_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Report {
    Events(EventReport),
    Packing(PackReport),
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn mean(v: impl IntoIterator<Item = f64>) -> f64 {
    let (mut s, mut n) = (0.0, 0usize);
    for x in v {
        s += x;
        n += 1;
    }
    if n == 0 {
        0.0
    } else {
        s / n as f64
    }
}

/// Jain's fairness index of non-negative values (1 for none or all zero).
pub fn jain(x: &[f64]) -> f64 {
    let s: f64 = x.iter().sum();
    let sq: f64 = x.iter().map(|v| v * v).sum();
    if x.is_empty() || sq == 0.0 {
        1.0
    } else {
        s * s / (x.len() as f64 * sq)
    }
}

fn bucket(gpu_milli: u64) -> &'static str {
    match gpu_milli.div_ceil(1000) {
        0 => "0",
        1 => "1",
        2..=4 => "2-4",
        5..=8 => "5-8",
        _ => ">8",
    }
}

/// Slowdown of one job: JCT ÷ run time (run time at least 1 s), at least 1.
pub fn slowdown(jct_ms: u64, run_ms: u64) -> f64 {
    (jct_ms as f64 / run_ms.max(1000) as f64).max(1.0)
}

/// Metrics of an event run over the jobs it replayed.
pub fn event_report(
    run: &EventRun,
    jobs: &[SimJob],
    total_gpus: u64,
    infeasible: usize,
    wall_s: f64,
) -> EventReport {
    let s = |ms: u64| ms as f64 / 1000.0;
    let mut jct: Vec<f64> = Vec::with_capacity(run.outcomes.len());
    let mut queue: Vec<f64> = Vec::with_capacity(run.outcomes.len());
    let mut buckets: BTreeMap<String, (usize, f64)> = BTreeMap::new();
    let mut teams: BTreeMap<String, (usize, f64, f64, f64)> = BTreeMap::new();
    let mut gpu_ms_total = 0.0;
    let (mut first, mut last) = (u64::MAX, 0u64);
    for o in &run.outcomes {
        let job = &jobs[o.id as usize];
        let j = o.finish_ms - o.submit_ms;
        jct.push(s(j));
        queue.push(s(j.saturating_sub(o.run_ms)));
        let sd = slowdown(j, o.run_ms);
        let b = buckets.entry(bucket(o.gpu_milli).to_string()).or_default();
        b.0 += 1;
        b.1 += sd;
        let gpu_ms = o.gpu_milli as f64 / 1000.0 * o.run_ms as f64;
        gpu_ms_total += gpu_ms;
        let t = teams.entry(job.team.clone()).or_default();
        t.0 += 1;
        t.1 += gpu_ms;
        t.2 += s(j);
        t.3 += sd;
        first = first.min(o.submit_ms);
        last = last.max(o.finish_ms);
    }
    let makespan = if run.outcomes.is_empty() {
        0.0
    } else {
        s(last - first)
    };
    let team_stats: BTreeMap<String, TeamStats> = teams
        .into_iter()
        .map(|(name, (n, gpu_ms, jct_sum, sd_sum))| {
            (
                name,
                TeamStats {
                    jobs: n,
                    gpu_hours: gpu_ms / 3_600_000.0,
                    gpu_share: if gpu_ms_total > 0.0 {
                        gpu_ms / gpu_ms_total
                    } else {
                        0.0
                    },
                    avg_jct_s: jct_sum / n as f64,
                    avg_slowdown: sd_sum / n as f64,
                },
            )
        })
        .collect();
    let team_slowdowns: Vec<f64> = team_stats.values().map(|t| t.avg_slowdown).collect();
    let avg_jct = mean(jct.iter().copied());
    let avg_queue = mean(queue.iter().copied());
    jct.sort_by(f64::total_cmp);
    queue.sort_by(f64::total_cmp);
    EventReport {
        policy: run.policy.clone(),
        mode: "events",
        jobs: run.outcomes.len(),
        infeasible,
        unfinished: run.unfinished,
        avg_jct_s: avg_jct,
        p50_jct_s: percentile(&jct, 50.0),
        p99_jct_s: percentile(&jct, 99.0),
        avg_queue_s: avg_queue,
        p99_queue_s: percentile(&queue, 99.0),
        makespan_s: makespan,
        gpu_utilization: if makespan > 0.0 && total_gpus > 0 {
            gpu_ms_total / 1000.0 / (total_gpus as f64 * makespan)
        } else {
            0.0
        },
        preemptions: run.preemptions,
        preempted_jobs: run.outcomes.iter().filter(|o| o.preemptions > 0).count(),
        max_preemptions_per_job: run
            .outcomes
            .iter()
            .map(|o| o.preemptions)
            .max()
            .unwrap_or(0),
        restarted_at_once: run.restarted_at_once,
        preemptions_without_start: run.preemptions_without_start,
        slowdown_by_gpus: buckets
            .into_iter()
            .map(|(k, (n, sum))| {
                (
                    k,
                    Bucket {
                        jobs: n,
                        avg_slowdown: sum / n as f64,
                    },
                )
            })
            .collect(),
        teams: team_stats,
        jain_fairness: jain(&team_slowdowns),
        schedule_calls: run.schedule_calls,
        skipped_passes: run.skipped_passes,
        skipped_confirmations: run.skipped_confirmations,
        schedule_s: run.schedule_time.as_secs_f64(),
        max_queue: run.max_queue,
        pass_cap_hits: run.pass_cap_hits,
        changing_confirmations: run.changing_confirmations,
        sim_wall_s: wall_s,
    }
}

/// Metrics of the packing runs of one policy (one per seed).
pub fn pack_report(runs: &[PackRun], packing: &str, wall_s: f64) -> PackReport {
    let seeds: Vec<SeedResult> = runs
        .iter()
        .map(|r| SeedResult {
            seed: r.seed,
            pods: r.pods,
            placed: r.placed,
            failed: r.failed,
            allocation_ratio_at_100: r.allocation_ratio_at(100),
            allocation_ratio_at_130: r.allocation_ratio_at(130),
            final_allocation_ratio: if r.total_gpus > 0 {
                r.allocated_milli as f64 / (r.total_gpus * 1000) as f64
            } else {
                0.0
            },
        })
        .collect();
    let avg = |f: fn(&SeedResult) -> Option<f64>| {
        let v: Option<Vec<f64>> = seeds.iter().map(f).collect();
        v.filter(|v| !v.is_empty()).map(mean)
    };
    PackReport {
        policy: runs.first().map(|r| r.policy.clone()).unwrap_or_default(),
        mode: "packing",
        packing: packing.to_string(),
        total_gpus: runs.first().map(|r| r.total_gpus).unwrap_or(0),
        allocation_ratio_at_100: avg(|s| s.allocation_ratio_at_100),
        allocation_ratio_at_130: avg(|s| s.allocation_ratio_at_130),
        schedule_s: runs.iter().map(|r| r.schedule_time.as_secs_f64()).sum(),
        seeds,
        sim_wall_s: wall_s,
    }
}

/// Left-aligns the first column and right-aligns the others.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c == 0 {
                let _ = write!(line, "{cell:<w$}", w = widths[c]);
            } else {
                let _ = write!(line, "  {cell:>w$}", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn pct(x: Option<f64>) -> String {
    x.map(|v| format!("{:.1}%", v * 100.0))
        .unwrap_or_else(|| "-".into())
}

/// Human-readable tables: one row per report.
pub fn render(reports: &[Report]) -> String {
    let events: Vec<&EventReport> = reports
        .iter()
        .filter_map(|r| match r {
            Report::Events(e) => Some(e),
            _ => None,
        })
        .collect();
    let packs: Vec<&PackReport> = reports
        .iter()
        .filter_map(|r| match r {
            Report::Packing(p) => Some(p),
            _ => None,
        })
        .collect();
    let mut out = String::new();
    if !events.is_empty() {
        let mut rows = vec![[
            "POLICY",
            "JOBS",
            "AVG JCT s",
            "P50 JCT s",
            "P99 JCT s",
            "AVG QUEUE s",
            "P99 QUEUE s",
            "MAKESPAN s",
            "GPU UTIL",
            "PREEMPT",
            "JAIN",
            "SCHED s",
            "WALL s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()];
        for e in &events {
            rows.push(vec![
                e.policy.clone(),
                e.jobs.to_string(),
                format!("{:.0}", e.avg_jct_s),
                format!("{:.0}", e.p50_jct_s),
                format!("{:.0}", e.p99_jct_s),
                format!("{:.0}", e.avg_queue_s),
                format!("{:.0}", e.p99_queue_s),
                format!("{:.0}", e.makespan_s),
                format!("{:.1}%", e.gpu_utilization * 100.0),
                e.preemptions.to_string(),
                format!("{:.3}", e.jain_fairness),
                format!("{:.2}", e.schedule_s),
                format!("{:.2}", e.sim_wall_s),
            ]);
        }
        out.push_str(&table(&rows));
        let keys: Vec<String> = {
            let mut k: Vec<String> = events
                .iter()
                .flat_map(|e| e.slowdown_by_gpus.keys().cloned())
                .collect();
            k.sort();
            k.dedup();
            k
        };
        out.push('\n');
        let mut head = vec!["AVG SLOWDOWN BY GPUS".to_string()];
        head.extend(keys.iter().map(|k| {
            let n = events
                .first()
                .and_then(|e| e.slowdown_by_gpus.get(k))
                .map(|b| b.jobs)
                .unwrap_or(0);
            format!("{k} ({n} jobs)")
        }));
        let mut rows = vec![head];
        for e in &events {
            let mut r = vec![e.policy.clone()];
            r.extend(keys.iter().map(|k| {
                e.slowdown_by_gpus
                    .get(k)
                    .map(|b| format!("{:.2}", b.avg_slowdown))
                    .unwrap_or_else(|| "-".into())
            }));
            rows.push(r);
        }
        out.push_str(&table(&rows));
        let notes: Vec<String> = events
            .iter()
            .filter(|e| e.infeasible > 0 || e.unfinished > 0 || e.pass_cap_hits > 0)
            .map(|e| {
                format!(
                    "note: {}: {} infeasible job(s) dropped, {} never finished, {} event time(s) hit the pass cap",
                    e.policy, e.infeasible, e.unfinished, e.pass_cap_hits
                )
            })
            .collect();
        for n in notes {
            out.push_str(&n);
            out.push('\n');
        }
    }
    if !packs.is_empty() {
        if !out.is_empty() {
            out.push('\n');
        }
        let mut rows = vec![[
            "POLICY",
            "PACKING",
            "SEEDS",
            "PODS",
            "FAILED",
            "ALLOC @100%",
            "ALLOC @130%",
            "SCHED s",
            "WALL s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()];
        for p in &packs {
            let n = p.seeds.len().max(1) as f64;
            rows.push(vec![
                p.policy.clone(),
                p.packing.clone(),
                p.seeds.len().to_string(),
                format!(
                    "{:.0}",
                    p.seeds.iter().map(|s| s.pods as f64).sum::<f64>() / n
                ),
                format!(
                    "{:.0}",
                    p.seeds.iter().map(|s| s.failed as f64).sum::<f64>() / n
                ),
                pct(p.allocation_ratio_at_100),
                pct(p.allocation_ratio_at_130),
                format!("{:.2}", p.schedule_s),
                format!("{:.2}", p.sim_wall_s),
            ]);
        }
        out.push_str(&table(&rows));
    }
    out
}
