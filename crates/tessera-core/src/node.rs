//! Nodes: machines that run replicas, with their inventory and state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One GPU as the agent discovered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GpuInfo {
    /// Index as CUDA and `nvidia-smi` number it (minor number).
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub memory_bytes: u64,
    /// False when the GPU reports errors; unhealthy GPUs are not scheduled.
    #[serde(default = "yes")]
    pub healthy: bool,
}

fn yes() -> bool {
    true
}

/// What an agent reports about its machine when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Inventory {
    pub name: String,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub gpus: Vec<GpuInfo>,
    /// Where the GPU list came from: `nvml`, `nvidia-smi` or `none`.
    pub gpu_source: String,
    /// Whether CPU and memory limits are enforced (cgroups writable).
    pub limits_enforced: bool,
    /// Why limits are or are not enforced, for people.
    pub limits_note: String,
    pub labels: BTreeMap<String, String>,
    pub agent_version: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Ready,
    Draining,
    Cordoned,
    Lost,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Draining => "draining",
            NodeState::Cordoned => "cordoned",
            NodeState::Lost => "lost",
        }
    }

    /// Whether new work may be placed on a node in this state.
    pub fn schedulable(self) -> bool {
        matches!(self, NodeState::Ready)
    }
}

/// What a node costs per hour of each resource it gives a job (on-premises
/// machines too: their configured rate, so they never look free).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Prices {
    pub cpu_core_hour: f64,
    pub memory_gib_hour: f64,
    pub gpu_hour: f64,
}

impl Prices {
    /// Cost of holding these resources for `ms` milliseconds.
    pub fn cost(&self, cpu_milli: u64, memory_bytes: u64, gpu_milli: u64, ms: u64) -> f64 {
        let hours = ms as f64 / 3_600_000.0;
        hours
            * (cpu_milli as f64 / 1000.0 * self.cpu_core_hour
                + memory_bytes as f64 / (1u64 << 30) as f64 * self.memory_gib_hour
                + gpu_milli as f64 / 1000.0 * self.gpu_hour)
    }
}

/// A node as the control plane records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Node {
    pub inventory: Inventory,
    #[serde(default)]
    pub prices: Prices,
    pub state: NodeState,
    /// Milliseconds since the Unix epoch.
    pub registered_at: u64,
    pub last_heartbeat: u64,
    /// While draining: when work still running is stopped and requeued
    /// (milliseconds since the Unix epoch); none waits for it to finish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_deadline: Option<u64>,
}

/// Live usage of a node, sent by its agent with every heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeUsage {
    /// Milliseconds since the Unix epoch (the agent's clock).
    pub at: u64,
    /// CPU in use on the whole machine, in thousandths of a core.
    pub cpu_used_milli: u64,
    /// Memory in use on the whole machine (total minus available), bytes.
    pub memory_used_bytes: u64,
    pub gpus: Vec<GpuUsage>,
}

/// Live telemetry of one GPU. Measurements a GPU does not report are absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GpuUsage {
    pub index: u32,
    pub utilization_percent: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub temperature_celsius: Option<u32>,
    pub power_watts: Option<f64>,
    /// Volatile uncorrectable ECC errors since the driver loaded.
    pub ecc_uncorrected_volatile: Option<u64>,
    /// False once the GPU reports errors; it is then taken out of scheduling.
    pub healthy: bool,
}
