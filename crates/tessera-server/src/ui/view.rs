//! What each page shows, as plain structs built from the cluster state for
//! one caller. Building takes the state lock briefly and copies only what a
//! page renders (one page of jobs, never all of them); rendering happens
//! after the lock is released.
//!
//! Visibility follows the API exactly: jobs, queues, services and teams of
//! other teams are left out for a caller who could not read them through
//! `/v1`; nodes are visible to every signed-in caller, as `/v1/nodes` is.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Deserialize;
use tessera_core::auth::{Principal, ResourceAmounts, TeamQuota};
use tessera_core::node::{Node, NodeState};
use tessera_core::{Event, Job, JobId, JobState};

use super::history::{per_minute, Sample};
use crate::state::ClusterState;

/// The pool a node belongs to: its `pool` label, else `nodes` (machines
/// running `tessera agent`). One place to change when pools arrive.
pub fn pool_of(node: &Node) -> &str {
    node.inventory
        .labels
        .get("pool")
        .map(String::as_str)
        .unwrap_or("nodes")
}

/// What a job has cost so far: earlier attempts plus the running one.
pub fn cost_now(state: &ClusterState, j: &Job, now: u64) -> f64 {
    j.cost
        + if j.state.is_active() {
            state.attempt_cost(j.id, now)
        } else {
            0.0
        }
}

// ---------- overview ----------

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CapacityRow {
    pub pool: String,
    /// GPU model, or empty for machines without GPUs.
    pub model: String,
    pub nodes: u32,
    pub gpus: u32,
    pub gpus_healthy: u32,
    pub gpu_alloc_milli: u64,
    pub gpu_util: Option<f64>,
    pub cpu_milli: u64,
    pub cpu_alloc: u64,
    pub memory: u64,
    pub memory_alloc: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TeamQueue {
    pub team: String,
    pub queued: u64,
    pub running: u64,
    /// GPUs the queued jobs ask for, in thousandths.
    pub queued_gpu_milli: u64,
    /// How long the longest-waiting queued job has waited.
    pub oldest_wait_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Overview {
    pub now: u64,
    pub current: Sample,
    pub nodes_by_state: BTreeMap<&'static str, u32>,
    pub capacity: Vec<CapacityRow>,
    pub queues: Vec<TeamQueue>,
    /// Jobs started and finished per minute, the last hour.
    pub per_minute: Vec<(u64, u64)>,
    pub history: Vec<Sample>,
    pub window_ms: u64,
}

pub fn overview(
    state: &ClusterState,
    who: &Principal,
    history: Vec<Sample>,
    window_ms: u64,
    now: u64,
) -> Overview {
    let alloc = state.allocations();
    let current = Sample::take_with(state, &alloc, now);
    let mut nodes_by_state = BTreeMap::new();
    let mut rows: BTreeMap<(String, String), CapacityRow> = BTreeMap::new();
    let mut util: HashMap<(String, String), (u64, u64)> = HashMap::new();
    for n in state.nodes.values() {
        *nodes_by_state.entry(n.state.as_str()).or_insert(0) += 1;
        if n.state == NodeState::Lost {
            continue;
        }
        let inv = &n.inventory;
        let pool = pool_of(n).to_string();
        let a = alloc.get(&inv.name);
        let usage = state.usage.get(&inv.name);
        let first_model = inv
            .gpus
            .first()
            .map(|g| g.model.clone())
            .unwrap_or_default();
        {
            let row = rows
                .entry((pool.clone(), first_model.clone()))
                .or_insert_with(|| CapacityRow {
                    pool: pool.clone(),
                    model: first_model.clone(),
                    ..Default::default()
                });
            row.nodes += 1;
            row.cpu_milli += inv.cpu_milli;
            row.memory += inv.memory_bytes;
            if let Some(a) = a {
                row.cpu_alloc += a.cpu_milli.min(inv.cpu_milli);
                row.memory_alloc += a.memory_bytes.min(inv.memory_bytes);
            }
        }
        for g in &inv.gpus {
            let key = (pool.clone(), g.model.clone());
            let row = rows.entry(key.clone()).or_insert_with(|| CapacityRow {
                pool: pool.clone(),
                model: g.model.clone(),
                ..Default::default()
            });
            row.gpus += 1;
            row.gpus_healthy += g.healthy as u32;
            row.gpu_alloc_milli += a
                .and_then(|a| a.gpus.get(&g.index))
                .map(|u| u.0.min(1000) as u64)
                .unwrap_or(0);
            if let Some(p) = usage
                .and_then(|u| u.gpus.iter().find(|x| x.index == g.index))
                .and_then(|x| x.utilization_percent)
            {
                let e = util.entry(key).or_default();
                e.0 += p as u64;
                e.1 += 1;
            }
        }
    }
    for (k, (sum, n)) in util {
        if let Some(r) = rows.get_mut(&k) {
            r.gpu_util = Some(sum as f64 / n as f64);
        }
    }
    // Queue per team: only teams the caller may read.
    let mut queues: BTreeMap<String, TeamQueue> = BTreeMap::new();
    for t in state.teams.keys().filter(|t| who.can_read_team(t)) {
        queues.insert(
            t.clone(),
            TeamQueue {
                team: t.clone(),
                ..Default::default()
            },
        );
    }
    for id in &state.queued {
        let Some(j) = state.jobs.get(id) else {
            continue;
        };
        if let Some(q) = queues.get_mut(j.team()) {
            q.queued += 1;
            q.queued_gpu_milli += j.spec.resources.gpu_demand_milli() * j.spec.replicas as u64;
            let waited = now.saturating_sub(j.submitted_at);
            q.oldest_wait_ms = Some(q.oldest_wait_ms.unwrap_or(0).max(waited));
        }
    }
    for id in &state.active {
        let Some(j) = state.jobs.get(id) else {
            continue;
        };
        if let Some(q) = queues.get_mut(j.team()) {
            q.running += 1;
        }
    }
    Overview {
        now,
        current,
        nodes_by_state,
        capacity: rows.into_values().collect(),
        queues: queues.into_values().collect(),
        per_minute: per_minute(state, now, 60, |t| who.can_read_team(t)),
        history,
        window_ms,
    }
}

// ---------- jobs ----------

/// The Jobs page's filters, from the query string.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsQuery {
    pub team: Option<String>,
    pub state: Option<String>,
    pub pool: Option<String>,
    /// Part of the job's name (case-insensitive).
    pub name: Option<String>,
    /// Jobs with ids below this (the next page).
    pub before: Option<JobId>,
}

impl JobsQuery {
    fn get(v: &Option<String>) -> Option<&str> {
        v.as_deref().map(str::trim).filter(|s| !s.is_empty())
    }
    pub fn team(&self) -> Option<&str> {
        Self::get(&self.team)
    }
    pub fn state(&self) -> Option<&str> {
        Self::get(&self.state)
    }
    pub fn pool(&self) -> Option<&str> {
        Self::get(&self.pool)
    }
    pub fn name(&self) -> Option<&str> {
        Self::get(&self.name)
    }
}

pub const JOBS_PER_PAGE: usize = 50;

#[derive(Debug, Clone)]
pub struct JobRow {
    pub job: Job,
    pub cost: f64,
}

#[derive(Debug, Clone)]
pub struct Jobs {
    pub now: u64,
    pub query: JobsQuery,
    /// Teams the caller may filter by (all for a superuser, else its own).
    pub teams: Vec<String>,
    pub pools: Vec<String>,
    pub rows: Vec<JobRow>,
    /// `before` for the next page, when there is one.
    pub next: Option<JobId>,
    /// Jobs matching the filters, all pages.
    pub matched: usize,
    pub can_submit: bool,
}

/// A filter the caller got wrong: (field, message).
pub type BadFilter = (&'static str, String);

pub fn jobs(
    state: &ClusterState,
    who: &Principal,
    q: JobsQuery,
    now: u64,
) -> Result<Jobs, BadFilter> {
    let state_filter = match q.state() {
        None => None,
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            (
                "state",
                format!("`{s}` is not a job state; use queued, scheduled, running, succeeded, failed, cancelled or lost"),
            )
        })?),
    };
    if let Some(t) = q.team() {
        if !who.can_read_team(t) {
            return Err((
                "team",
                format!(
                    "this token belongs to team `{}` and cannot see team `{t}`",
                    who.team
                ),
            ));
        }
    }
    // Like the API: a caller who is not a superuser sees its own team.
    let team = q
        .team()
        .map(str::to_string)
        .or_else(|| (!who.is_superuser()).then(|| who.team.clone()));
    let pool_nodes: Option<std::collections::HashSet<&str>> = q.pool().map(|p| {
        state
            .nodes
            .values()
            .filter(|n| pool_of(n) == p)
            .map(|n| n.inventory.name.as_str())
            .collect()
    });
    let name = q.name().map(str::to_lowercase);
    let before = q.before.unwrap_or(JobId::MAX);
    // Without filters the count is known, and the scan stops after a page.
    let unfiltered =
        team.is_none() && state_filter.is_none() && name.is_none() && pool_nodes.is_none();
    let mut rows = Vec::new();
    let mut next = None;
    let mut matched = 0usize;
    let keep = |j: &Job| -> bool {
        team.as_deref().is_none_or(|t| j.team() == t)
            && state_filter.is_none_or(|s| j.state == s)
            && name.as_deref().is_none_or(|n| contains_ci(&j.spec.name, n))
            && pool_nodes
                .as_ref()
                .is_none_or(|ns| j.placement.iter().any(|p| ns.contains(p.node.as_str())))
    };
    for (_, j) in state.jobs.range(..before).rev() {
        if unfiltered && next.is_some() {
            break;
        }
        if !keep(j) {
            continue;
        }
        matched += 1;
        if rows.len() < JOBS_PER_PAGE {
            rows.push(JobRow {
                cost: cost_now(state, j, now),
                job: j.clone(),
            });
        } else if next.is_none() {
            next = rows.last().map(|r| r.job.id);
        }
    }
    if unfiltered {
        matched = state.jobs.len();
    } else {
        // Matches newer than this page were not scanned: count them too.
        matched += state.jobs.range(before..).filter(|(_, j)| keep(j)).count();
    }
    let teams = state
        .teams
        .keys()
        .filter(|t| who.can_read_team(t))
        .cloned()
        .collect();
    let pools: BTreeSet<String> = state
        .nodes
        .values()
        .map(|n| pool_of(n).to_string())
        .collect();
    Ok(Jobs {
        now,
        query: q,
        teams,
        pools: pools.into_iter().collect(),
        rows,
        next,
        matched,
        can_submit: who.role >= tessera_core::auth::Role::Member,
    })
}

fn contains_ci(hay: &str, needle_lower: &str) -> bool {
    if hay.is_ascii() && needle_lower.is_ascii() {
        hay.as_bytes()
            .windows(needle_lower.len().max(1))
            .any(|w| w.eq_ignore_ascii_case(needle_lower.as_bytes()))
            || needle_lower.is_empty()
    } else {
        hay.to_lowercase().contains(needle_lower)
    }
}

#[derive(Debug, Clone)]
pub struct JobPage {
    pub now: u64,
    pub job: Job,
    pub events: Vec<Event>,
    pub cost: f64,
    pub can_cancel: bool,
    /// GPU models of the GPUs each replica holds, by replica.
    pub gpu_models: BTreeMap<u32, Vec<String>>,
}

/// The job page, or why the caller may not see it (an API error).
pub fn job_page(
    state: &ClusterState,
    who: &Principal,
    id: JobId,
    now: u64,
) -> Result<JobPage, crate::error::ApiError> {
    let j = state
        .jobs
        .get(&id)
        .ok_or_else(|| crate::error::ApiError::not_found(format!("no job with id {id}")))?;
    if !who.can_read_team(j.team()) {
        return Err(crate::error::ApiError::forbidden(format!(
            "this token belongs to team `{}` and cannot see team `{}`",
            who.team,
            j.team()
        )));
    }
    let mut gpu_models = BTreeMap::new();
    for p in &j.placement {
        if let Some(n) = state.nodes.get(&p.node) {
            let models = p
                .gpus
                .iter()
                .filter_map(|i| n.inventory.gpus.iter().find(|g| g.index == *i))
                .map(|g| g.model.clone())
                .collect();
            gpu_models.insert(p.replica, models);
        }
    }
    Ok(JobPage {
        now,
        cost: cost_now(state, j, now),
        events: state.events.get(&id).cloned().unwrap_or_default(),
        can_cancel: who.can_write_team(j.team()) && !j.state.is_terminal(),
        job: j.clone(),
        gpu_models,
    })
}

// ---------- nodes ----------

#[derive(Debug, Clone, PartialEq)]
pub struct GpuRow {
    pub index: u32,
    pub model: String,
    pub memory_bytes: u64,
    pub healthy: bool,
    pub alloc_milli: u32,
    pub jobs: Vec<JobId>,
    pub util: Option<u32>,
    pub memory_used: Option<u64>,
    pub temperature: Option<u32>,
    pub power_watts: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct NodeRow {
    pub name: String,
    pub state: &'static str,
    pub pool: String,
    pub connected: bool,
    pub cpu_milli: u64,
    pub cpu_alloc: u64,
    pub memory: u64,
    pub memory_alloc: u64,
    pub cpu_used: Option<u64>,
    pub memory_used: Option<u64>,
    pub gpus: Vec<GpuRow>,
    pub last_heartbeat: u64,
    pub replicas: u32,
    pub labels: BTreeMap<String, String>,
    pub limits_enforced: bool,
    pub drain_deadline: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodesQuery {
    /// Part of the node's name.
    pub name: Option<String>,
    pub state: Option<String>,
    pub pool: Option<String>,
    /// Page number, from 1.
    pub page: Option<usize>,
}

pub const NODES_PER_PAGE: usize = 100;

#[derive(Debug, Clone)]
pub struct Nodes {
    pub now: u64,
    pub query: NodesQuery,
    pub rows: Vec<NodeRow>,
    pub matched: usize,
    pub page: usize,
    pub pages: usize,
    pub by_state: BTreeMap<&'static str, u32>,
    pub pools: Vec<String>,
    pub admin: bool,
}

pub fn nodes(state: &ClusterState, who: &Principal, q: NodesQuery, now: u64) -> Nodes {
    let alloc = state.allocations();
    let name = q
        .name
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_lowercase);
    let want_state = q.state.as_deref().filter(|s| !s.is_empty());
    let want_pool = q.pool.as_deref().filter(|s| !s.is_empty());
    let page = q.page.unwrap_or(1).max(1);
    let mut by_state = BTreeMap::new();
    let mut pools = BTreeSet::new();
    let mut rows = Vec::new();
    let mut matched = 0;
    for n in state.nodes.values() {
        *by_state.entry(n.state.as_str()).or_insert(0) += 1;
        pools.insert(pool_of(n).to_string());
        let inv = &n.inventory;
        if name.as_deref().is_some_and(|s| !contains_ci(&inv.name, s))
            || want_state.is_some_and(|s| n.state.as_str() != s)
            || want_pool.is_some_and(|p| pool_of(n) != p)
        {
            continue;
        }
        matched += 1;
        if matched <= (page - 1) * NODES_PER_PAGE || rows.len() >= NODES_PER_PAGE {
            continue;
        }
        let a = alloc.get(&inv.name);
        let usage = state.usage.get(&inv.name);
        rows.push(NodeRow {
            name: inv.name.clone(),
            state: n.state.as_str(),
            pool: pool_of(n).to_string(),
            connected: state.connected.contains(&inv.name),
            cpu_milli: inv.cpu_milli,
            cpu_alloc: a.map(|a| a.cpu_milli).unwrap_or(0),
            memory: inv.memory_bytes,
            memory_alloc: a.map(|a| a.memory_bytes).unwrap_or(0),
            cpu_used: usage.map(|u| u.cpu_used_milli),
            memory_used: usage.map(|u| u.memory_used_bytes),
            gpus: inv
                .gpus
                .iter()
                .map(|g| {
                    let held = a.and_then(|a| a.gpus.get(&g.index));
                    let live = usage.and_then(|u| u.gpus.iter().find(|x| x.index == g.index));
                    GpuRow {
                        index: g.index,
                        model: g.model.clone(),
                        memory_bytes: g.memory_bytes,
                        healthy: g.healthy && live.is_none_or(|l| l.healthy),
                        alloc_milli: held.map(|h| h.0.min(1000)).unwrap_or(0),
                        jobs: held.map(|h| h.1.clone()).unwrap_or_default(),
                        util: live.and_then(|l| l.utilization_percent),
                        memory_used: live.and_then(|l| l.memory_used_bytes),
                        temperature: live.and_then(|l| l.temperature_celsius),
                        power_watts: live.and_then(|l| l.power_watts),
                    }
                })
                .collect(),
            last_heartbeat: n.last_heartbeat,
            replicas: a.map(|a| a.replicas).unwrap_or(0),
            labels: inv.labels.clone(),
            limits_enforced: inv.limits_enforced,
            drain_deadline: n.drain_deadline,
        });
    }
    Nodes {
        now,
        query: q,
        rows,
        pages: matched.div_ceil(NODES_PER_PAGE).max(1),
        matched,
        page,
        by_state,
        pools: pools.into_iter().collect(),
        admin: who.is_superuser(),
    }
}

// ---------- teams ----------

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub gpu_hours: f64,
    pub cpu_hours: f64,
    pub cost: f64,
}

/// GPU-hours, CPU-hours and cost per team in `[from, to]`, from the job
/// records: each job's current attempt's run time within the window, its
/// cost prorated over the same share of its run time. Earlier attempts'
/// times are not recorded per attempt; their cost is counted with the
/// current attempt's window share.
pub fn usage_by_team(state: &ClusterState, from: u64, to: u64) -> HashMap<String, Usage> {
    let mut out: HashMap<String, Usage> = HashMap::new();
    for j in state.jobs.values() {
        let Some(start) = j.started_at.or(j.scheduled_at) else {
            continue;
        };
        let end = match j.finished_at {
            Some(f) => f,
            None if j.state.is_active() => to,
            None => continue,
        };
        let (a, b) = (start.max(from), end.min(to));
        if b <= a {
            continue;
        }
        let hours = (b - a) as f64 / 3_600_000.0;
        let replicas = j.placement.len().max(1) as f64;
        let r = &j.spec.resources;
        let total = cost_now(state, j, to);
        let share = (b - a) as f64 / end.saturating_sub(start).max(1) as f64;
        let u = out.entry(j.team().to_string()).or_default();
        u.gpu_hours += hours * replicas * r.gpu_demand_milli() as f64 / 1000.0;
        u.cpu_hours += hours * replicas * r.cpu_milli as f64 / 1000.0;
        u.cost += total * share.min(1.0);
    }
    out
}

#[derive(Debug, Clone)]
pub struct TeamRow {
    pub name: String,
    pub weight: f64,
    /// Weight over the weights of the teams with work (queued or running);
    /// none while the team has none.
    pub fair_share: Option<f64>,
    /// The team's dominant share of the cluster (largest of its CPU, memory
    /// and GPU fractions), as the fair-share policy counts it.
    pub actual_share: f64,
    pub queued: u64,
    pub running: u64,
    pub used: ResourceAmounts,
    pub quota: Option<TeamQuota>,
    pub usage: Usage,
}

#[derive(Debug, Clone)]
pub struct Teams {
    pub now: u64,
    pub period: &'static str,
    pub rows: Vec<TeamRow>,
}

/// Periods the Teams page offers: (name, milliseconds).
pub const PERIODS: &[(&str, u64)] = &[
    ("1h", 3_600_000),
    ("24h", 86_400_000),
    ("7d", 7 * 86_400_000),
    ("30d", 30 * 86_400_000),
];

pub fn teams(
    state: &ClusterState,
    who: &Principal,
    period: &str,
    now: u64,
) -> Result<Teams, BadFilter> {
    let &(period, period_ms) = PERIODS.iter().find(|p| p.0 == period).ok_or_else(|| {
        (
            "period",
            format!("`{period}` is not a period; use 1h, 24h, 7d or 30d"),
        )
    })?;
    let cap = Sample::take(state, now);
    let mut used: HashMap<&str, ResourceAmounts> = HashMap::new();
    let mut counts: HashMap<&str, (u64, u64)> = HashMap::new();
    for id in &state.queued {
        if let Some(j) = state.jobs.get(id) {
            counts.entry(j.team()).or_default().0 += 1;
        }
    }
    for id in &state.active {
        if let Some(j) = state.jobs.get(id) {
            counts.entry(j.team()).or_default().1 += 1;
            let k = j.placement.len() as u64;
            let r = &j.spec.resources;
            let u = used.entry(j.team()).or_insert(ResourceAmounts {
                cpu_milli: 0,
                memory_bytes: 0,
                gpu_milli: 0,
            });
            u.cpu_milli += r.cpu_milli * k;
            u.memory_bytes += r.memory_bytes * k;
            u.gpu_milli += r.gpu_demand_milli() * k;
        }
    }
    let active_weight: f64 = state
        .teams
        .values()
        .filter(|t| counts.contains_key(t.name.as_str()))
        .map(|t| t.weight)
        .sum();
    let usage = usage_by_team(state, now.saturating_sub(period_ms), now);
    let zero = ResourceAmounts {
        cpu_milli: 0,
        memory_bytes: 0,
        gpu_milli: 0,
    };
    let rows = state
        .teams
        .values()
        .filter(|t| who.can_read_team(&t.name))
        .map(|t| {
            let u = used.get(t.name.as_str()).copied().unwrap_or(zero);
            let share = |a: u64, total: u64| {
                if total > 0 {
                    a as f64 / total as f64
                } else {
                    0.0
                }
            };
            let (q, r) = counts.get(t.name.as_str()).copied().unwrap_or((0, 0));
            TeamRow {
                name: t.name.clone(),
                weight: t.weight,
                fair_share: (q + r > 0 && active_weight > 0.0).then(|| t.weight / active_weight),
                actual_share: share(u.cpu_milli, cap.cpu_total)
                    .max(share(u.memory_bytes, cap.mem_total))
                    .max(share(u.gpu_milli, cap.gpu_total)),
                queued: q,
                running: r,
                used: u,
                quota: t.quota,
                usage: usage.get(&t.name).copied().unwrap_or_default(),
            }
        })
        .collect();
    Ok(Teams { now, period, rows })
}
