//! Prometheus metrics. Counters and histograms are updated where things
//! happen; gauges that describe state (jobs by state, queue length per team,
//! node capacity and allocation) are recomputed from state at scrape time, so
//! they can never drift.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tessera_core::JobState;

use crate::state::ClusterState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TeamLabel {
    pub team: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeResourceLabel {
    pub node: String,
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabel {
    pub node: String,
    pub gpu: String,
}

pub struct Metrics {
    registry: Registry,
    pub node_used: Family<NodeResourceLabel, Gauge<f64, AtomicU64>>,
    pub gpu_utilization: Family<GpuLabel, Gauge<f64, AtomicU64>>,
    pub gpu_memory_used: Family<GpuLabel, Gauge<f64, AtomicU64>>,
    pub gpu_temperature: Family<GpuLabel, Gauge<f64, AtomicU64>>,
    pub gpu_healthy: Family<GpuLabel, Gauge<f64, AtomicU64>>,
    pub jobs: Family<StateLabel, Gauge>,
    pub queue_length: Family<TeamLabel, Gauge>,
    pub node_capacity: Family<NodeResourceLabel, Gauge<f64, AtomicU64>>,
    pub node_allocated: Family<NodeResourceLabel, Gauge<f64, AtomicU64>>,
    pub cycle_seconds: Histogram,
    pub submit_to_start_seconds: Histogram,
    pub submitted: Counter,
    pub placements: Counter,
    pub preemptions: Counter,
    pub finished: Family<StateLabel, Counter>,
    pub agent_connections: Counter,
    pub nodes_lost: Counter,
    pub stale_reports: Counter,
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
        let mut registry = Registry::with_prefix("tessera");
        let jobs = Family::<StateLabel, Gauge>::default();
        registry.register("jobs", "Jobs by state", jobs.clone());
        let queue_length = Family::<TeamLabel, Gauge>::default();
        registry.register("queue_length", "Queued jobs per team", queue_length.clone());
        let node_capacity = Family::<NodeResourceLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "node_capacity",
            "Node capacity by resource (cpu in cores, memory in bytes, gpu in devices)",
            node_capacity.clone(),
        );
        let node_allocated = Family::<NodeResourceLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "node_allocated",
            "Node allocation by resource (cpu in cores, memory in bytes, gpu in devices)",
            node_allocated.clone(),
        );
        let cycle_seconds = Histogram::new(buckets(0.0001, 2.0, 18));
        registry.register_with_unit(
            "scheduler_cycle_duration",
            "Time to compute one scheduling plan",
            Unit::Seconds,
            cycle_seconds.clone(),
        );
        let submit_to_start_seconds = Histogram::new(buckets(0.001, 2.0, 22));
        registry.register_with_unit(
            "job_submit_to_start",
            "Time from submission to the first replica running",
            Unit::Seconds,
            submit_to_start_seconds.clone(),
        );
        let submitted = Counter::default();
        registry.register("jobs_submitted", "Jobs accepted", submitted.clone());
        let placements = Counter::default();
        registry.register(
            "scheduler_placements",
            "Jobs placed by the scheduler",
            placements.clone(),
        );
        let preemptions = Counter::default();
        registry.register(
            "scheduler_preemptions",
            "Jobs preempted by the scheduler",
            preemptions.clone(),
        );
        let finished = Family::<StateLabel, Counter>::default();
        registry.register(
            "jobs_finished",
            "Jobs that reached a final state",
            finished.clone(),
        );
        let agent_connections = Counter::default();
        registry.register(
            "agent_connections",
            "Agent connections accepted (first connections and reconnections)",
            agent_connections.clone(),
        );
        let nodes_lost = Counter::default();
        registry.register(
            "nodes_lost",
            "Nodes declared lost after missing heartbeats past their lease",
            nodes_lost.clone(),
        );
        let stale_reports = Counter::default();
        registry.register(
            "agent_stale_reports",
            "Agent reports refused because they named an attempt that is not current",
            stale_reports.clone(),
        );
        let node_used = Family::<NodeResourceLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "node_used",
            "Live node usage from agent heartbeats (cpu in cores, memory in bytes)",
            node_used.clone(),
        );
        let gpu_utilization = Family::<GpuLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "gpu_utilization_ratio",
            "Fraction of time a kernel ran on the GPU, from agent heartbeats",
            gpu_utilization.clone(),
        );
        let gpu_memory_used = Family::<GpuLabel, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "gpu_memory_used",
            "GPU memory in use, from agent heartbeats",
            Unit::Bytes,
            gpu_memory_used.clone(),
        );
        let gpu_temperature = Family::<GpuLabel, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "gpu_temperature",
            "GPU temperature, from agent heartbeats",
            Unit::Other("celsius".into()),
            gpu_temperature.clone(),
        );
        let gpu_healthy = Family::<GpuLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "gpu_healthy",
            "1 while the GPU reports no errors, 0 once it does (then it is not scheduled)",
            gpu_healthy.clone(),
        );
        Metrics {
            node_used,
            gpu_utilization,
            gpu_memory_used,
            gpu_temperature,
            gpu_healthy,
            agent_connections,
            nodes_lost,
            stale_reports,
            registry,
            jobs,
            queue_length,
            node_capacity,
            node_allocated,
            cycle_seconds,
            submit_to_start_seconds,
            submitted,
            placements,
            preemptions,
            finished,
        }
    }

    /// Lets another part (the gateway) register its series.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Recomputes state gauges and renders the text format.
    pub fn render(&self, state: &ClusterState) -> String {
        let mut by_state = std::collections::HashMap::new();
        for j in state.jobs.values() {
            *by_state.entry(j.state).or_insert(0i64) += 1;
        }
        for s in JobState::ALL {
            self.jobs
                .get_or_create(&StateLabel {
                    state: s.as_str().into(),
                })
                .set(by_state.get(&s).copied().unwrap_or(0));
        }
        self.queue_length.clear();
        for t in state.teams.keys() {
            self.queue_length
                .get_or_create(&TeamLabel { team: t.clone() })
                .set(0);
        }
        for id in &state.queued {
            if let Some(j) = state.jobs.get(id) {
                self.queue_length
                    .get_or_create(&TeamLabel {
                        team: j.spec.team.clone(),
                    })
                    .inc();
            }
        }
        self.node_capacity.clear();
        self.node_allocated.clear();
        let alloc = state.allocations();
        for (name, n) in &state.nodes {
            let inv = &n.inventory;
            let a = alloc.get(name).cloned().unwrap_or_default();
            let label = |r: &str| NodeResourceLabel {
                node: name.clone(),
                resource: r.into(),
            };
            self.node_capacity
                .get_or_create(&label("cpu"))
                .set(inv.cpu_milli as f64 / 1000.0);
            self.node_capacity
                .get_or_create(&label("memory"))
                .set(inv.memory_bytes as f64);
            self.node_capacity
                .get_or_create(&label("gpu"))
                .set(inv.gpus.len() as f64);
            self.node_allocated
                .get_or_create(&label("cpu"))
                .set(a.cpu_milli as f64 / 1000.0);
            self.node_allocated
                .get_or_create(&label("memory"))
                .set(a.memory_bytes as f64);
            self.node_allocated
                .get_or_create(&label("gpu"))
                .set(a.gpus_in_use() as f64);
        }
        self.node_used.clear();
        self.gpu_utilization.clear();
        self.gpu_memory_used.clear();
        self.gpu_temperature.clear();
        self.gpu_healthy.clear();
        for (name, u) in &state.usage {
            if state
                .nodes
                .get(name)
                .is_none_or(|n| n.state == tessera_core::node::NodeState::Lost)
            {
                continue;
            }
            let label = |r: &str| NodeResourceLabel {
                node: name.clone(),
                resource: r.into(),
            };
            self.node_used
                .get_or_create(&label("cpu"))
                .set(u.cpu_used_milli as f64 / 1000.0);
            self.node_used
                .get_or_create(&label("memory"))
                .set(u.memory_used_bytes as f64);
            for g in &u.gpus {
                let l = GpuLabel {
                    node: name.clone(),
                    gpu: g.index.to_string(),
                };
                if let Some(v) = g.utilization_percent {
                    self.gpu_utilization.get_or_create(&l).set(v as f64 / 100.0);
                }
                if let Some(v) = g.memory_used_bytes {
                    self.gpu_memory_used.get_or_create(&l).set(v as f64);
                }
                if let Some(v) = g.temperature_celsius {
                    self.gpu_temperature.get_or_create(&l).set(v as f64);
                }
                self.gpu_healthy
                    .get_or_create(&l)
                    .set(if g.healthy { 1.0 } else { 0.0 });
            }
        }
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
