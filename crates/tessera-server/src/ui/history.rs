//! The Overview's memory: a small ring of cluster samples (allocation,
//! live GPU utilisation, queue, jobs started and finished) taken every
//! [`SAMPLE_EVERY`], and the inline SVG charts drawn from it.
//!
//! Kept in memory only: after a restart the chart starts over, seeded with
//! what the job records say was allocated over the window ([`backfill`]).

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use super::html::{hhmm, Esc};
use crate::state::ClusterState;

/// How often the sampler runs.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(30);
/// How much history is kept: 6 hours at one sample every 30 s.
pub const KEEP_MS: u64 = 6 * 3_600_000;

/// One sample of the whole cluster.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at: u64,
    pub cpu_total: u64,
    pub cpu_alloc: u64,
    pub mem_total: u64,
    pub mem_alloc: u64,
    /// Thousandths of a GPU.
    pub gpu_total: u64,
    pub gpu_alloc: u64,
    /// Mean utilisation of the GPUs whose agents report it, 0..=100.
    pub gpu_util: Option<f64>,
    pub queued: u64,
    pub running: u64,
}

impl Sample {
    /// The cluster as it is now: capacity of every node that is not lost.
    pub fn take(state: &ClusterState, now: u64) -> Sample {
        Sample::take_with(state, &state.allocations(), now)
    }

    /// [`Sample::take`] with the allocations already computed.
    pub fn take_with(
        state: &ClusterState,
        alloc: &std::collections::HashMap<String, crate::state::Allocation>,
        now: u64,
    ) -> Sample {
        let mut s = Sample {
            at: now,
            cpu_total: 0,
            cpu_alloc: 0,
            mem_total: 0,
            mem_alloc: 0,
            gpu_total: 0,
            gpu_alloc: 0,
            gpu_util: None,
            queued: state.queued.len() as u64,
            running: state.active.len() as u64,
        };
        let (mut util_sum, mut util_n) = (0u64, 0u64);
        for n in state.nodes.values() {
            if n.state == tessera_core::node::NodeState::Lost {
                continue;
            }
            let inv = &n.inventory;
            s.cpu_total += inv.cpu_milli;
            s.mem_total += inv.memory_bytes;
            s.gpu_total += inv.gpus.len() as u64 * 1000;
            if let Some(a) = alloc.get(&inv.name) {
                s.cpu_alloc += a.cpu_milli.min(inv.cpu_milli);
                s.mem_alloc += a.memory_bytes.min(inv.memory_bytes);
                s.gpu_alloc += a.gpus.values().map(|g| g.0.min(1000) as u64).sum::<u64>();
            }
            if let Some(u) = state.usage.get(&inv.name) {
                for g in &u.gpus {
                    if let Some(p) = g.utilization_percent {
                        util_sum += p as u64;
                        util_n += 1;
                    }
                }
            }
        }
        s.gpu_util = (util_n > 0).then(|| util_sum as f64 / util_n as f64);
        s
    }

    pub fn cpu_frac(&self) -> Option<f64> {
        frac(self.cpu_alloc, self.cpu_total)
    }
    pub fn mem_frac(&self) -> Option<f64> {
        frac(self.mem_alloc, self.mem_total)
    }
    pub fn gpu_frac(&self) -> Option<f64> {
        frac(self.gpu_alloc, self.gpu_total)
    }
}

fn frac(a: u64, t: u64) -> Option<f64> {
    (t > 0).then(|| a as f64 / t as f64)
}

/// The ring of samples.
#[derive(Debug, Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    pub fn push(&self, s: Sample) {
        let mut q = self.samples.lock().expect("history lock");
        // Keep time order: a sample older than the newest replaces nothing.
        if q.back().is_some_and(|b| b.at > s.at) {
            return;
        }
        q.push_back(s);
        while q.front().is_some_and(|f| f.at + KEEP_MS < s.at) {
            q.pop_front();
        }
    }

    /// Samples taken since `from`, oldest first.
    pub fn since(&self, from: u64) -> Vec<Sample> {
        let q = self.samples.lock().expect("history lock");
        let start = q.partition_point(|s| s.at < from);
        q.range(start..).copied().collect()
    }

    pub fn len(&self) -> usize {
        self.samples.lock().expect("history lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Samples for the window before `now`, rebuilt from the job records: what
/// each job held while it ran (its current attempt; earlier attempts are
/// not recorded), against today's capacity. Live GPU utilisation is not
/// recorded, so it is absent here.
pub fn backfill(state: &ClusterState, now: u64, window: u64, step: u64) -> Vec<Sample> {
    let current = Sample::take(state, now);
    let from = now.saturating_sub(window);
    let n = (window / step) as usize;
    // Allocation deltas at each step boundary, then a prefix sum.
    let mut delta = vec![(0i64, 0i64, 0i64); n + 2];
    let slot = |t: u64| -> usize { (t.saturating_sub(from) / step).min(n as u64 + 1) as usize };
    for j in state.jobs.values() {
        let Some(start) = j.started_at.or(j.scheduled_at) else {
            continue;
        };
        let end = match j.finished_at {
            Some(f) => f,
            None if j.state.is_active() => now,
            None => continue,
        };
        if end <= from || start >= now {
            continue;
        }
        let r = &j.spec.resources;
        let k = j.placement.len().max(1) as i64;
        let (c, m, g) = (
            r.cpu_milli as i64 * k,
            r.memory_bytes as i64 * k,
            r.gpu_demand_milli() as i64 * k,
        );
        // Held at every step boundary in [start, end).
        let a = slot(start.max(from) + step - 1);
        let b = slot(end + step - 1);
        if a < b {
            delta[a].0 += c;
            delta[a].1 += m;
            delta[a].2 += g;
            delta[b].0 -= c;
            delta[b].1 -= m;
            delta[b].2 -= g;
        }
    }
    let mut out = Vec::with_capacity(n);
    let (mut c, mut m, mut g) = (0i64, 0i64, 0i64);
    for (i, d) in delta.iter().enumerate().take(n) {
        c += d.0;
        m += d.1;
        g += d.2;
        out.push(Sample {
            at: from + i as u64 * step,
            cpu_alloc: (c.max(0) as u64).min(current.cpu_total),
            mem_alloc: (m.max(0) as u64).min(current.mem_total),
            gpu_alloc: (g.max(0) as u64).min(current.gpu_total),
            gpu_util: None,
            queued: 0,
            running: 0,
            ..current
        });
    }
    out
}

/// Jobs started and finished in each minute of the last `minutes` before
/// `now` (oldest first), among the jobs `visible` lets through.
pub fn per_minute(
    state: &ClusterState,
    now: u64,
    minutes: usize,
    visible: impl Fn(&str) -> bool,
) -> Vec<(u64, u64)> {
    let mut out = vec![(0u64, 0u64); minutes];
    let from = now.saturating_sub(minutes as u64 * 60_000);
    let bucket = |t: u64| -> Option<usize> {
        (t >= from && t < now).then(|| ((t - from) / 60_000) as usize)
    };
    for j in state.jobs.values() {
        if !visible(j.team()) {
            continue;
        }
        if let Some(i) = j.started_at.and_then(bucket) {
            out[i.min(minutes - 1)].0 += 1;
        }
        if j.state.is_terminal() {
            if let Some(i) = j.finished_at.and_then(bucket) {
                out[i.min(minutes - 1)].1 += 1;
            }
        }
    }
    out
}

const W: f64 = 1200.0;
const H: f64 = 260.0;
const PAD_L: f64 = 40.0;
const PAD_R: f64 = 12.0;
const PAD_T: f64 = 12.0;
const PAD_B: f64 = 26.0;

/// The utilisation chart: CPU, memory and GPU allocated, and live GPU
/// utilisation, as percentages over `[from, now]`.
pub fn utilisation_svg(out: &mut String, samples: &[Sample], from: u64, now: u64) {
    let span = now.saturating_sub(from).max(1) as f64;
    let x = |t: u64| PAD_L + (t.saturating_sub(from)) as f64 / span * (W - PAD_L - PAD_R);
    let y = |f: f64| PAD_T + (1.0 - f.clamp(0.0, 1.0)) * (H - PAD_T - PAD_B);
    let _ = write!(
        out,
        "<svg class=\"chart\" id=\"util-chart\" viewBox=\"0 0 {W} {H}\" role=\"img\" \
         aria-label=\"Allocation and GPU utilisation over time\">"
    );
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let _ = write!(
            out,
            "<line class=\"grid\" x1=\"{PAD_L}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
             <text class=\"ax\" x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}%</text>",
            W - PAD_R,
            PAD_L - 6.0,
            y(f) + 4.0,
            i * 25,
            y = y(f)
        );
    }
    for i in 0..=6 {
        let t = from + (span as u64) * i / 6;
        let anchor = match i {
            0 => "start",
            6 => "end",
            _ => "middle",
        };
        let _ = write!(
            out,
            "<text class=\"ax\" x=\"{:.1}\" y=\"{}\" text-anchor=\"{anchor}\">{}</text>",
            x(t),
            H - 8.0,
            hhmm(t)
        );
    }
    type Pick = fn(&Sample) -> Option<f64>;
    let series: [(&str, &str, Pick); 4] = [
        ("cpu", "CPU allocated", Sample::cpu_frac),
        ("mem", "Memory allocated", Sample::mem_frac),
        ("gpu", "GPU allocated", Sample::gpu_frac),
        ("util", "GPU utilisation", |s| s.gpu_util.map(|u| u / 100.0)),
    ];
    for (class, label, pick) in series {
        let mut pts = String::new();
        let mut n = 0;
        for s in samples {
            if let Some(v) = pick(s) {
                let _ = write!(pts, "{:.1},{:.1} ", x(s.at), y(v));
                n += 1;
            }
        }
        if n == 0 {
            continue;
        }
        let _ = write!(
            out,
            "<polyline class=\"ln {class}\" points=\"{}\"><title>{}</title></polyline>",
            pts.trim_end(),
            Esc(label)
        );
        if n == 1 {
            // A single sample still shows, as a dot.
            let (cx, cy) = pts.trim().split_once(',').unwrap_or(("0", "0"));
            let _ = write!(
                out,
                "<circle class=\"dot {class}\" cx=\"{cx}\" cy=\"{cy}\" r=\"3\"/>"
            );
        }
    }
    out.push_str("</svg>");
}

/// Jobs started and finished per minute, as paired bars.
pub fn per_minute_svg(out: &mut String, buckets: &[(u64, u64)], now: u64) {
    let h = 200.0;
    let w = 640.0;
    let max = buckets
        .iter()
        .map(|b| b.0.max(b.1))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let n = buckets.len().max(1) as f64;
    let bw = (w - PAD_L - PAD_R) / n;
    let y = |v: f64| PAD_T + (1.0 - v / max) * (h - PAD_T - PAD_B);
    let _ = write!(
        out,
        "<svg class=\"chart\" id=\"rate-chart\" viewBox=\"0 0 {w} {h}\" role=\"img\" \
         aria-label=\"Jobs started and finished per minute\">"
    );
    for i in 0..=2 {
        let v = max * i as f64 / 2.0;
        let _ = write!(
            out,
            "<line class=\"grid\" x1=\"{PAD_L}\" x2=\"{}\" y1=\"{yv:.1}\" y2=\"{yv:.1}\"/>\
             <text class=\"ax\" x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text>",
            w - PAD_R,
            PAD_L - 6.0,
            y(v) + 4.0,
            yv = y(v)
        );
    }
    let from = now.saturating_sub(buckets.len() as u64 * 60_000);
    for (i, (started, finished)) in buckets.iter().enumerate() {
        let x0 = PAD_L + i as f64 * bw;
        let t = from + i as u64 * 60_000;
        for (k, (v, class)) in [(*started, "started"), (*finished, "finished")]
            .into_iter()
            .enumerate()
        {
            if v == 0 {
                continue;
            }
            let _ = write!(
                out,
                "<rect class=\"{class}\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\">\
                 <title>{} {v} {class}</title></rect>",
                x0 + 1.0 + k as f64 * (bw - 2.0) / 2.0,
                y(v as f64),
                ((bw - 2.0) / 2.0).max(0.5),
                h - PAD_B - y(v as f64),
                hhmm(t)
            );
        }
        if i % 10 == 0 {
            let _ = write!(
                out,
                "<text class=\"ax\" x=\"{x0:.1}\" y=\"{}\">{}</text>",
                h - 8.0,
                hhmm(t)
            );
        }
    }
    out.push_str("</svg>");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: u64) -> Sample {
        Sample {
            at,
            cpu_total: 1000,
            cpu_alloc: 500,
            mem_total: 10,
            mem_alloc: 1,
            gpu_total: 0,
            gpu_alloc: 0,
            gpu_util: None,
            queued: 0,
            running: 0,
        }
    }

    #[test]
    fn history_keeps_six_hours_in_order() {
        let h = History::default();
        for i in 0..(KEEP_MS / 30_000 + 100) {
            h.push(sample(i * 30_000));
        }
        let all = h.since(0);
        assert_eq!(all.len() as u64, KEEP_MS / 30_000 + 1);
        assert!(all.windows(2).all(|w| w[0].at < w[1].at));
        // An out-of-order sample is ignored.
        let before = h.len();
        h.push(sample(1));
        assert_eq!(h.len(), before);
    }

    #[test]
    fn chart_draws_only_series_with_data() {
        let mut out = String::new();
        utilisation_svg(&mut out, &[sample(0), sample(60_000)], 0, 60_000);
        assert!(out.contains("class=\"ln cpu\""));
        assert!(out.contains("class=\"ln mem\""));
        // No GPUs: no GPU lines.
        assert!(!out.contains("class=\"ln gpu\""));
        assert!(!out.contains("class=\"ln util\""));
        // 50% CPU sits halfway down the plot area.
        let mid = PAD_T + 0.5 * (H - PAD_T - PAD_B);
        assert!(out.contains(&format!(",{mid:.1}")), "{out}");
    }
    /// One node of 8 GPUs; one job that held 2 GPUs from 10 to 5 minutes
    /// ago, and one that started 90 s ago and still runs with 1.
    fn two_jobs(now: u64) -> ClusterState {
        let (mut s, _) = crate::ui::bench::synthetic(1, 0, now);
        let spec = tessera_core::spec::JobSpec::parse(
            "name: a\ncommand: [true]\nresources: {cpu: 1, memory: 1Gi, gpu: 2}\n",
        )
        .unwrap()
        .validate("team-0")
        .unwrap();
        let place = |gpus: Vec<u32>| {
            vec![tessera_core::job::ReplicaPlacement {
                replica: 0,
                node: "node-0000".into(),
                gpus,
            }]
        };
        let mut done = tessera_core::Job::new(1, spec.clone(), "t".into(), now - 700_000);
        done.state = tessera_core::JobState::Succeeded;
        done.started_at = Some(now - 600_000);
        done.finished_at = Some(now - 300_000);
        done.placement = place(vec![0, 1]);
        let mut one = spec;
        one.resources.gpu = 1;
        let mut run = tessera_core::Job::new(2, one, "t".into(), now - 100_000);
        run.state = tessera_core::JobState::Running;
        run.started_at = Some(now - 90_000);
        run.placement = place(vec![2]);
        s.active.insert(2);
        s.jobs.insert(1, done);
        s.jobs.insert(2, run);
        s
    }

    #[test]
    fn backfill_rebuilds_allocation_from_job_records() {
        let now = 1_800_000_000_000;
        let s = two_jobs(now);
        let samples = backfill(&s, now, 3_600_000, 30_000);
        assert_eq!(samples.len(), 120);
        let at = |ago: u64| {
            samples
                .iter()
                .find(|x| x.at == now - ago)
                .map(|x| x.gpu_alloc)
                .unwrap()
        };
        assert_eq!(at(900_000), 0);
        assert_eq!(at(600_000), 2000);
        assert_eq!(at(330_000), 2000);
        assert_eq!(at(300_000), 0);
        assert_eq!(at(60_000), 1000);
        assert!(samples.iter().all(|x| x.gpu_total == 8000));
    }

    #[test]
    fn jobs_started_and_finished_fall_in_their_minutes() {
        let now = 1_800_000_000_000;
        let s = two_jobs(now);
        let b = per_minute(&s, now, 60, |_| true);
        assert_eq!(b.len(), 60);
        // Started 10 min and 90 s ago; finished 5 min ago.
        assert_eq!(b[50], (1, 0));
        assert_eq!(b[58], (1, 0));
        assert_eq!(b[55], (0, 1));
        assert_eq!(b.iter().map(|x| x.0 + x.1).sum::<u64>(), 3);
        // Another team's caller counts nothing.
        let none = per_minute(&s, now, 60, |t| t == "team-1");
        assert!(none.iter().all(|x| *x == (0, 0)));
    }
}
