//! Prometheus metrics at `GET /metrics` (OpenMetrics text).
//!
//! Counters and histograms are updated where things happen (submissions,
//! placements, preemptions, API requests); gauges that describe state (jobs
//! by team and state, pending jobs by reason class, nodes, capacity and
//! allocation, GPU telemetry) and the accounting counters (GPU-, CPU-seconds
//! and cost per team) are recomputed from state at scrape time, so they can
//! never drift from it.
//!
//! Names carry the `tessera_` prefix and their unit (`_seconds`, `_bytes`,
//! `_cores`, `_ratio`, `_celsius`, `_watts`; counters end in `_total`).
//! Labels are bounded: teams, nodes, pools, GPU indices and models, job
//! states, reason classes, HTTP methods, route templates (never raw paths
//! or job ids) and status classes. Capacity carries a `pool` label (a
//! node's `pool` label, `nodes` without one) so it splits by pool.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tessera_core::node::NodeState;
use tessera_core::JobState;

use crate::state::ClusterState;
use crate::usage::{attempt_record, node_pool};
use crate::Shared;

type GaugeF = Gauge<f64, AtomicU64>;
type CounterF = Counter<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TeamLabel {
    pub team: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TeamStateLabel {
    pub team: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PendingLabel {
    pub team: String,
    /// One of [`REASON_CLASSES`].
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolStateLabel {
    pub pool: String,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    pub node: String,
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabel {
    pub node: String,
    pub pool: String,
    pub gpu: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub method: String,
    /// The route template (`/v1/jobs/{id}`), or `unmatched` (the gateway's
    /// `/s/...` requests are counted by the gateway's own series).
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatusLabel {
    pub method: String,
    pub route: String,
    /// `2xx`, `4xx`, ...
    pub status: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn http_histogram() -> Histogram {
    Histogram::new(buckets(0.0001, 2.0, 18))
}

/// The reason classes of `tessera_jobs_pending`: what a waiting job waits
/// for, from the scheduler's reason.
pub const REASON_CLASSES: [&str; 10] = [
    "new",
    "capacity",
    "unschedulable",
    "no_nodes",
    "quota",
    "reservation",
    "preemption",
    "fifo_order",
    "requeued",
    "other",
];

/// The class of a waiting job's reason (see [`REASON_CLASSES`]).
pub fn reason_class(reason: Option<&str>) -> &'static str {
    let Some(r) = reason else { return "new" };
    if r.starts_with("team quota") || r.starts_with("reclaiming") {
        "quota"
    } else if r.contains("held for job") {
        "reservation"
    } else if r.starts_with("starting once preempted") {
        "preemption"
    } else if r.starts_with("waiting for capacity") {
        "capacity"
    } else if r.starts_with("cannot run on the schedulable nodes") {
        "unschedulable"
    } else if r.starts_with("no schedulable node") {
        "no_nodes"
    } else if r.starts_with("behind job") {
        "fifo_order"
    } else if r.starts_with("requeued") {
        "requeued"
    } else {
        "other"
    }
}

pub struct Metrics {
    registry: Registry,
    pub jobs: Family<TeamStateLabel, Gauge>,
    pub pending: Family<PendingLabel, Gauge>,
    pub queue_length: Family<TeamLabel, Gauge>,
    pub nodes: Family<PoolStateLabel, Gauge>,
    pub allocatable_cpu: Family<NodeLabel, GaugeF>,
    pub allocatable_memory: Family<NodeLabel, GaugeF>,
    pub allocatable_gpus: Family<NodeLabel, GaugeF>,
    pub allocated_cpu: Family<NodeLabel, GaugeF>,
    pub allocated_memory: Family<NodeLabel, GaugeF>,
    pub allocated_gpus: Family<NodeLabel, GaugeF>,
    pub used_cpu: Family<NodeLabel, GaugeF>,
    pub used_memory: Family<NodeLabel, GaugeF>,
    pub gpu_utilization: Family<GpuLabel, GaugeF>,
    pub gpu_memory_used: Family<GpuLabel, GaugeF>,
    pub gpu_memory_total: Family<GpuLabel, GaugeF>,
    pub gpu_temperature: Family<GpuLabel, GaugeF>,
    pub gpu_power: Family<GpuLabel, GaugeF>,
    pub gpu_ecc_errors: Family<GpuLabel, GaugeF>,
    pub gpu_healthy: Family<GpuLabel, GaugeF>,
    pub team_gpu_seconds: Family<TeamLabel, CounterF>,
    pub team_cpu_seconds: Family<TeamLabel, CounterF>,
    pub team_cost: Family<TeamLabel, CounterF>,
    pub cycle_seconds: Histogram,
    pub submit_to_start_seconds: Histogram,
    pub submitted: Family<TeamLabel, Counter>,
    pub placements: Counter,
    pub preemptions: Counter,
    pub finished: Family<TeamStateLabel, Counter>,
    pub agent_connections: Counter,
    pub nodes_lost: Counter,
    pub stale_reports: Counter,
    pub http_requests: Family<RouteStatusLabel, Counter>,
    pub http_duration: HistogramFamily<RouteLabel>,
    /// Per team: GPU-seconds, CPU-seconds and cost of every ended attempt.
    /// Computed from the job records when first needed, then kept up to
    /// date by [`Metrics::attempt_ended`], so a scrape adds only the running
    /// attempts instead of reading every job's history.
    ended: std::sync::Mutex<Option<HashMap<String, [f64; 3]>>>,
}

fn amounts_array(a: &crate::usage::Amounts) -> [f64; 3] {
    [a.gpu_hours * 3600.0, a.cpu_hours * 3600.0, a.cost]
}

fn add(into: &mut [f64; 3], v: [f64; 3]) {
    for (x, y) in into.iter_mut().zip(v) {
        *x += y;
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn buckets(start: f64, factor: f64, n: u16) -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(start, factor, n)
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("tessera");
        let m = Metrics {
            jobs: Family::default(),
            pending: Family::default(),
            queue_length: Family::default(),
            nodes: Family::default(),
            allocatable_cpu: Family::default(),
            allocatable_memory: Family::default(),
            allocatable_gpus: Family::default(),
            allocated_cpu: Family::default(),
            allocated_memory: Family::default(),
            allocated_gpus: Family::default(),
            used_cpu: Family::default(),
            used_memory: Family::default(),
            gpu_utilization: Family::default(),
            gpu_memory_used: Family::default(),
            gpu_memory_total: Family::default(),
            gpu_temperature: Family::default(),
            gpu_power: Family::default(),
            gpu_ecc_errors: Family::default(),
            gpu_healthy: Family::default(),
            team_gpu_seconds: Family::default(),
            team_cpu_seconds: Family::default(),
            team_cost: Family::default(),
            cycle_seconds: Histogram::new(buckets(0.0001, 2.0, 18)),
            submit_to_start_seconds: Histogram::new(buckets(0.001, 2.0, 22)),
            submitted: Family::default(),
            placements: Counter::default(),
            preemptions: Counter::default(),
            finished: Family::default(),
            agent_connections: Counter::default(),
            nodes_lost: Counter::default(),
            stale_reports: Counter::default(),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(http_histogram),
            ended: std::sync::Mutex::new(None),
            registry: Registry::default(),
        };
        // Jobs and the scheduler.
        r.register("jobs", "Jobs by team and state", m.jobs.clone());
        r.register(
            "jobs_pending",
            "Queued jobs by team and the class of what they wait for (new: not yet looked at; capacity, unschedulable, no_nodes, quota, reservation, preemption, fifo_order, requeued, other)",
            m.pending.clone(),
        );
        r.register(
            "queue_length",
            "Queued jobs per team",
            m.queue_length.clone(),
        );
        r.register(
            "jobs_submitted",
            "Jobs accepted, by team",
            m.submitted.clone(),
        );
        r.register(
            "jobs_finished",
            "Jobs that reached a final state, by team and state",
            m.finished.clone(),
        );
        r.register_with_unit(
            "scheduler_cycle_duration",
            "Time to compute one scheduling plan (one pass)",
            Unit::Seconds,
            m.cycle_seconds.clone(),
        );
        r.register_with_unit(
            "job_submit_to_start",
            "Time from submission to the first replica running",
            Unit::Seconds,
            m.submit_to_start_seconds.clone(),
        );
        r.register(
            "scheduler_placements",
            "Jobs placed by the scheduler",
            m.placements.clone(),
        );
        r.register(
            "scheduler_preemptions",
            "Jobs preempted by the scheduler",
            m.preemptions.clone(),
        );
        // Nodes and capacity.
        r.register(
            "nodes",
            "Nodes by pool and state (ready, draining, cordoned, lost)",
            m.nodes.clone(),
        );
        let cores = || Unit::Other("cores".into());
        r.register_with_unit(
            "node_allocatable_cpu",
            "CPU a node offers to jobs",
            cores(),
            m.allocatable_cpu.clone(),
        );
        r.register_with_unit(
            "node_allocatable_memory",
            "Memory a node offers to jobs",
            Unit::Bytes,
            m.allocatable_memory.clone(),
        );
        r.register(
            "node_allocatable_gpus",
            "GPUs a node offers to jobs (healthy or not)",
            m.allocatable_gpus.clone(),
        );
        r.register_with_unit(
            "node_allocated_cpu",
            "CPU held by jobs placed on a node",
            cores(),
            m.allocated_cpu.clone(),
        );
        r.register_with_unit(
            "node_allocated_memory",
            "Memory held by jobs placed on a node",
            Unit::Bytes,
            m.allocated_memory.clone(),
        );
        r.register(
            "node_allocated_gpus",
            "GPUs held (whole or in part) by jobs placed on a node",
            m.allocated_gpus.clone(),
        );
        r.register_with_unit(
            "node_used_cpu",
            "CPU in use on the whole machine, from agent heartbeats",
            cores(),
            m.used_cpu.clone(),
        );
        r.register_with_unit(
            "node_used_memory",
            "Memory in use on the whole machine, from agent heartbeats",
            Unit::Bytes,
            m.used_memory.clone(),
        );
        // GPUs, per node and device, from agent heartbeats.
        r.register(
            "gpu_utilization_ratio",
            "Fraction of time a kernel ran on the GPU, from agent heartbeats",
            m.gpu_utilization.clone(),
        );
        r.register_with_unit(
            "gpu_memory_used",
            "GPU memory in use, from agent heartbeats",
            Unit::Bytes,
            m.gpu_memory_used.clone(),
        );
        r.register_with_unit(
            "gpu_memory_total",
            "GPU memory, from the node's inventory",
            Unit::Bytes,
            m.gpu_memory_total.clone(),
        );
        r.register_with_unit(
            "gpu_temperature",
            "GPU temperature, from agent heartbeats",
            Unit::Other("celsius".into()),
            m.gpu_temperature.clone(),
        );
        r.register_with_unit(
            "gpu_power",
            "GPU power draw, from agent heartbeats",
            Unit::Other("watts".into()),
            m.gpu_power.clone(),
        );
        r.register(
            "gpu_ecc_uncorrected_errors",
            "Volatile uncorrectable ECC errors since the GPU driver loaded",
            m.gpu_ecc_errors.clone(),
        );
        r.register(
            "gpu_healthy",
            "1 while the GPU reports no errors, 0 once it does (then it is not scheduled)",
            m.gpu_healthy.clone(),
        );
        // Accounting, from the durable job records (see `usage`).
        r.register_with_unit(
            "team_gpu",
            "GPU-seconds held by each team's jobs, all attempts, running ones up to now",
            Unit::Seconds,
            m.team_gpu_seconds.clone(),
        );
        r.register_with_unit(
            "team_cpu",
            "CPU core-seconds held by each team's jobs, all attempts, running ones up to now",
            Unit::Seconds,
            m.team_cpu_seconds.clone(),
        );
        r.register(
            "team_cost",
            "What each team's jobs cost at their nodes' prices per resource-hour, all attempts",
            m.team_cost.clone(),
        );
        // Agents.
        r.register(
            "agent_connections",
            "Agent connections accepted (first connections and reconnections)",
            m.agent_connections.clone(),
        );
        r.register(
            "nodes_lost",
            "Nodes declared lost after missing heartbeats past their lease",
            m.nodes_lost.clone(),
        );
        r.register(
            "agent_stale_reports",
            "Agent reports refused because they named an attempt that is not current",
            m.stale_reports.clone(),
        );
        // The API.
        r.register(
            "http_requests",
            "API requests by method, route template and status class",
            m.http_requests.clone(),
        );
        r.register_with_unit(
            "http_request_duration",
            "API request time until the response head (streamed bodies not included), by method and route template",
            Unit::Seconds,
            m.http_duration.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// Lets another part (the gateway) register its series.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Counts an accepted job.
    pub fn job_submitted(&self, team: &str) {
        self.submitted
            .get_or_create(&TeamLabel { team: team.into() })
            .inc();
    }

    /// Counts a job that reached a final state.
    pub fn job_finished(&self, team: &str, state: JobState) {
        self.finished
            .get_or_create(&TeamStateLabel {
                team: team.into(),
                state: state.as_str().into(),
            })
            .inc();
    }

    /// Counts one API request.
    pub fn http_request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let class = ["1xx", "2xx", "3xx", "4xx", "5xx"][(status / 100).clamp(1, 5) as usize - 1];
        self.http_requests
            .get_or_create(&RouteStatusLabel {
                method: method.into(),
                route: route.into(),
                status: class,
            })
            .inc();
        self.http_duration
            .get_or_create(&RouteLabel {
                method: method.into(),
                route: route.into(),
            })
            .observe(seconds);
    }

    /// Recomputes state gauges and renders the text format.
    pub fn render(&self, state: &ClusterState, now: u64) -> String {
        self.render_jobs(state);
        self.render_nodes(state);
        self.render_accounting(state, now);
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }

    fn render_jobs(&self, state: &ClusterState) {
        let mut by: HashMap<(&str, JobState), i64> = HashMap::new();
        for j in state.jobs.values() {
            *by.entry((j.team(), j.state)).or_insert(0) += 1;
        }
        self.jobs.clear();
        for t in state.teams.keys() {
            for s in JobState::ALL {
                let n = by.remove(&(t.as_str(), s)).unwrap_or(0);
                self.jobs
                    .get_or_create(&TeamStateLabel {
                        team: t.clone(),
                        state: s.as_str().into(),
                    })
                    .set(n);
            }
        }
        // Jobs of teams that no longer exist.
        for ((t, s), n) in by {
            self.jobs
                .get_or_create(&TeamStateLabel {
                    team: t.into(),
                    state: s.as_str().into(),
                })
                .set(n);
        }
        self.queue_length.clear();
        self.pending.clear();
        // Count locally first: one family lookup per label set, not per job.
        let mut queued: HashMap<&str, i64> = state.teams.keys().map(|t| (t.as_str(), 0)).collect();
        let mut pending: HashMap<(&str, &'static str), i64> = HashMap::new();
        for id in &state.queued {
            let Some(j) = state.jobs.get(id) else {
                continue;
            };
            *queued.entry(j.team()).or_default() += 1;
            *pending
                .entry((j.team(), reason_class(j.reason.as_deref())))
                .or_default() += 1;
        }
        for (team, n) in queued {
            self.queue_length
                .get_or_create(&TeamLabel { team: team.into() })
                .set(n);
        }
        for ((team, reason), n) in pending {
            self.pending
                .get_or_create(&PendingLabel {
                    team: team.into(),
                    reason,
                })
                .set(n);
        }
    }

    fn render_nodes(&self, state: &ClusterState) {
        for f in [
            &self.allocatable_cpu,
            &self.allocatable_memory,
            &self.allocatable_gpus,
            &self.allocated_cpu,
            &self.allocated_memory,
            &self.allocated_gpus,
            &self.used_cpu,
            &self.used_memory,
        ] {
            f.clear();
        }
        for f in [
            &self.gpu_utilization,
            &self.gpu_memory_used,
            &self.gpu_memory_total,
            &self.gpu_temperature,
            &self.gpu_power,
            &self.gpu_ecc_errors,
            &self.gpu_healthy,
        ] {
            f.clear();
        }
        self.nodes.clear();
        let alloc = state.allocations();
        for (name, n) in &state.nodes {
            let pool = node_pool(n);
            for s in [
                NodeState::Ready,
                NodeState::Draining,
                NodeState::Cordoned,
                NodeState::Lost,
            ] {
                let g = self.nodes.get_or_create(&PoolStateLabel {
                    pool: pool.clone(),
                    state: s.as_str(),
                });
                if n.state == s {
                    g.inc();
                }
            }
            if n.state == NodeState::Lost {
                continue;
            }
            let label = NodeLabel {
                node: name.clone(),
                pool: pool.clone(),
            };
            let inv = &n.inventory;
            let a = alloc.get(name).cloned().unwrap_or_default();
            self.allocatable_cpu
                .get_or_create(&label)
                .set(inv.cpu_milli as f64 / 1000.0);
            self.allocatable_memory
                .get_or_create(&label)
                .set(inv.memory_bytes as f64);
            self.allocatable_gpus
                .get_or_create(&label)
                .set(inv.gpus.len() as f64);
            self.allocated_cpu
                .get_or_create(&label)
                .set(a.cpu_milli as f64 / 1000.0);
            self.allocated_memory
                .get_or_create(&label)
                .set(a.memory_bytes as f64);
            self.allocated_gpus
                .get_or_create(&label)
                .set(a.gpus_in_use() as f64);
            let usage = state.usage.get(name);
            if let Some(u) = usage {
                self.used_cpu
                    .get_or_create(&label)
                    .set(u.cpu_used_milli as f64 / 1000.0);
                self.used_memory
                    .get_or_create(&label)
                    .set(u.memory_used_bytes as f64);
            }
            for g in &inv.gpus {
                let l = GpuLabel {
                    node: name.clone(),
                    pool: pool.clone(),
                    gpu: g.index.to_string(),
                    model: g.model.clone(),
                };
                self.gpu_memory_total
                    .get_or_create(&l)
                    .set(g.memory_bytes as f64);
                let live = usage.and_then(|u| u.gpus.iter().find(|x| x.index == g.index));
                let healthy = live.map_or(g.healthy, |x| x.healthy && g.healthy);
                self.gpu_healthy
                    .get_or_create(&l)
                    .set(if healthy { 1.0 } else { 0.0 });
                let Some(x) = live else { continue };
                if let Some(v) = x.utilization_percent {
                    self.gpu_utilization.get_or_create(&l).set(v as f64 / 100.0);
                }
                if let Some(v) = x.memory_used_bytes {
                    self.gpu_memory_used.get_or_create(&l).set(v as f64);
                }
                if let Some(v) = x.temperature_celsius {
                    self.gpu_temperature.get_or_create(&l).set(v as f64);
                }
                if let Some(v) = x.power_watts {
                    self.gpu_power.get_or_create(&l).set(v);
                }
                if let Some(v) = x.ecc_uncorrected_volatile {
                    self.gpu_ecc_errors.get_or_create(&l).set(v as f64);
                }
            }
        }
    }

    /// The ended attempts' totals per team, computed from `state` the first
    /// time (callers hold the state lock, so no attempt ends meanwhile).
    fn ended_totals<'a>(
        &'a self,
        state: &ClusterState,
    ) -> std::sync::MutexGuard<'a, Option<HashMap<String, [f64; 3]>>> {
        let mut guard = self.ended.lock().expect("accounting lock");
        if guard.is_none() {
            let mut totals: HashMap<String, [f64; 3]> = HashMap::new();
            for job in state.jobs.values() {
                for a in &job.attempts {
                    let v = amounts_array(&crate::usage::attempt_amounts(a));
                    add(totals.entry(job.team().to_string()).or_default(), v);
                }
            }
            *guard = Some(totals);
        }
        guard
    }

    /// Counts an attempt that ended (before it is added to its job in
    /// `state`).
    pub fn attempt_ended(
        &self,
        state: &ClusterState,
        team: &str,
        a: &tessera_core::job::AttemptUsage,
    ) {
        let mut guard = self.ended_totals(state);
        let totals = guard.as_mut().expect("computed");
        let v = amounts_array(&crate::usage::attempt_amounts(a));
        add(totals.entry(team.to_string()).or_default(), v);
    }

    /// Brings the per-team accounting counters up to the ended attempts'
    /// totals plus the running attempts up to `now` (they only grow:
    /// attempts are never removed, and a running attempt's share moves to
    /// the ended totals when it ends, at a later time).
    fn render_accounting(&self, state: &ClusterState, now: u64) {
        let mut totals = self.ended_totals(state).clone().expect("computed");
        for t in state.teams.keys() {
            totals.entry(t.clone()).or_default();
        }
        for id in &state.active {
            let Some(job) = state.jobs.get(id) else {
                continue;
            };
            if let Some(a) = attempt_record(state, job, now, "running") {
                let v = amounts_array(&crate::usage::attempt_amounts(&a));
                add(totals.entry(job.team().to_string()).or_default(), v);
            }
        }
        for (team, v) in totals {
            let label = TeamLabel { team };
            for (f, v) in [
                (&self.team_gpu_seconds, v[0]),
                (&self.team_cpu_seconds, v[1]),
                (&self.team_cost, v[2]),
            ] {
                let c = f.get_or_create(&label);
                let delta = v - c.get();
                if delta > 0.0 {
                    c.inc_by(delta);
                }
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Middleware: counts every API request by method, route template and
/// status class, and times it to the response head.
pub async fn track_http(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().as_str().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let resp = next.run(req).await;
    shared.metrics.http_request(
        &method,
        &route,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_fall_into_their_classes() {
        for (reason, class) in [
            (None, "new"),
            (Some("waiting for capacity: needs 1 cpu, 1Gi; not enough free cpu on any node"), "capacity"),
            (Some("waiting for capacity: needs 8 gpu; no single node has all of it free at once; capacity it could use is held for job 7, which waits ahead of it"), "reservation"),
            (Some("team quota: team `ml` holds 8 gpu and this job needs 1 more; its limit is 8 (guaranteed 4)"), "quota"),
            (Some("reclaiming team `ml`'s guaranteed quota: starting once job(s) 3 of borrowing teams have stopped"), "quota"),
            (Some("starting once preempted job(s) 4, 5 have stopped"), "preemption"),
            (Some("cannot run on the schedulable nodes: needs GPU model A100"), "unschedulable"),
            (Some("no schedulable node: all 2 node(s) are cordoned, draining or lost"), "no_nodes"),
            (Some("behind job 3: under strict FIFO no job passes the first one waiting"), "fifo_order"),
            (Some("requeued after failure: exited with code 3"), "requeued"),
            (Some("something new"), "other"),
        ] {
            assert_eq!(reason_class(reason), class, "{reason:?}");
            assert!(REASON_CLASSES.contains(&class));
        }
    }

    fn sample(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn accounting_counters_match_the_usage_report_as_attempts_end() {
        use crate::usage::{usage, GroupBy, UsageQuery};
        use tessera_core::job::{AttemptUsage, NodeShare};
        const H: u64 = 3_600_000;
        let attempt = |start: u64, end: u64| AttemptUsage {
            attempt: 1,
            start,
            end,
            cpu_milli: 2000,
            memory_bytes: 0,
            gpu_milli: 500,
            nodes: vec![NodeShare {
                node: "a".into(),
                pool: "nodes".into(),
                replicas: 2,
                prices: tessera_core::node::Prices {
                    cpu_core_hour: 1.0,
                    memory_gib_hour: 0.0,
                    gpu_hour: 10.0,
                },
            }],
            outcome: "succeeded".into(),
        };
        let mut state = ClusterState::default();
        let spec: tessera_core::JobSpec =
            serde_json::from_value(serde_json::json!({"command": ["x"]})).unwrap();
        let mut job = tessera_core::Job::new(1, spec.validate("ml").unwrap(), "t".into(), 0);
        job.attempts.push(attempt(0, H));
        state.jobs.insert(1, job);
        let m = Metrics::new();
        let text = m.render(&state, 10 * H);
        // 2 replicas × 2 cores × 1 h; 2 × 0.5 GPU × 1 h; cost 2 × (2 + 5).
        assert_eq!(
            sample(&text, "tessera_team_cpu_seconds_total{team=\"ml\"}"),
            4.0 * 3600.0
        );
        assert_eq!(
            sample(&text, "tessera_team_gpu_seconds_total{team=\"ml\"}"),
            3600.0
        );
        assert_eq!(sample(&text, "tessera_team_cost_total{team=\"ml\"}"), 14.0);
        // An attempt that ends is counted once, as it is added to its job.
        let second = attempt(2 * H, 4 * H);
        m.attempt_ended(&state, "ml", &second);
        state.jobs.get_mut(&1).unwrap().attempts.push(second);
        let text = m.render(&state, 10 * H);
        let all = usage(
            &state,
            &UsageQuery {
                team: None,
                since: 0,
                until: 10 * H,
                by: GroupBy::Team,
            },
            10 * H,
        );
        assert_eq!(sample(&text, "tessera_team_cost_total{team=\"ml\"}"), 42.0);
        assert_eq!(all.total.cost, 42.0);
    }

    #[test]
    fn every_series_has_help_and_units_follow_the_conventions() {
        let m = Metrics::new();
        m.job_submitted("ml");
        m.job_finished("ml", JobState::Succeeded);
        m.http_request("GET", "/v1/jobs/{id}", 404, 0.002);
        let text = m.render(&ClusterState::default(), 0);
        let mut families = 0;
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            families += 1;
            assert!(name.starts_with("tessera_"), "{line}");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no HELP"
            );
            if kind == "counter" {
                assert!(
                    !text.lines().any(|l| l.starts_with(&format!("{name}{{"))
                        || l.starts_with(&format!("{name} "))),
                    "counter {name} has a series without _total"
                );
            }
        }
        assert!(families >= 30, "{text}");
        assert!(text.contains(
            "tessera_http_requests_total{method=\"GET\",route=\"/v1/jobs/{id}\",status=\"4xx\"} 1"
        ));
        assert!(text.contains("tessera_jobs_finished_total{team=\"ml\",state=\"succeeded\"} 1"));
        assert!(text.contains("# UNIT tessera_node_allocatable_cpu_cores cores"));
        assert!(text.contains("# UNIT tessera_gpu_temperature_celsius celsius"));
        assert!(text.ends_with("# EOF\n"));
    }
}
