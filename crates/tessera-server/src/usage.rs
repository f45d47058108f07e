//! Accounting: GPU-hours, CPU-hours, memory GiB-hours and cost per team,
//! per pool or per job over any time range.
//!
//! Usage is derived from durable job records only: every ended attempt is
//! kept on its job as an [`AttemptUsage`] (written with the job row when the
//! attempt ends — finished, failed, preempted, lost or requeued), and the
//! current attempt is read from the job's placement. So usage survives a
//! restart, and every attempt counts, retried and preempted ones included.
//! An attempt that crosses a boundary of the range counts only for its
//! overlap with the range. Cost is each node's price per resource-hour at
//! the time (on-premises nodes at their configured rate, never free).
//!
//! [`usage`] is a plain function of the state, so the API (`GET /v1/usage`)
//! and the dashboard compute exactly the same numbers.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use tessera_core::job::{AttemptUsage, NodeShare};
use tessera_core::node::Node;
use tessera_core::{Job, JobId};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::state::ClusterState;
use crate::{now_ms, Shared};

/// The pool of a node that names none in its `pool` label.
pub const DEFAULT_POOL: &str = "nodes";

/// How long back a query looks when it gives no `since`.
pub const DEFAULT_SINCE_MS: u64 = 30 * 86_400_000;

const MS_PER_HOUR: f64 = 3_600_000.0;

/// The pool a node belongs to: its `pool` label, else [`DEFAULT_POOL`].
pub fn node_pool(node: &Node) -> String {
    pool_name(node).to_string()
}

/// [`node_pool`] without the copy.
pub fn pool_name(node: &Node) -> &str {
    node.inventory
        .labels
        .get(tessera_core::spec::POOL_LABEL)
        .map(String::as_str)
        .unwrap_or(DEFAULT_POOL)
}

/// How many milliseconds of `[start, end)` fall within `[since, until)`.
pub fn overlap_ms(start: u64, end: u64, since: u64, until: u64) -> u64 {
    end.min(until).saturating_sub(start.max(since))
}

/// The record of a job's current attempt as if it ended at `end`: where its
/// replicas run, at which pools and prices. None when it holds no placement.
pub fn attempt_record(
    state: &ClusterState,
    job: &Job,
    end: u64,
    outcome: &str,
) -> Option<AttemptUsage> {
    if job.placement.is_empty() {
        return None;
    }
    let start = job.started_at.or(job.scheduled_at).unwrap_or(end);
    let mut nodes: Vec<NodeShare> = Vec::new();
    for p in &job.placement {
        if let Some(share) = nodes.iter_mut().find(|s| s.node == p.node) {
            share.replicas += 1;
            continue;
        }
        let (pool, prices) = match state.nodes.get(&p.node) {
            Some(n) => (node_pool(n), n.prices),
            None => (DEFAULT_POOL.to_string(), Default::default()),
        };
        nodes.push(NodeShare {
            node: p.node.clone(),
            pool,
            replicas: 1,
            prices,
        });
    }
    let r = &job.spec.resources;
    Some(AttemptUsage {
        attempt: job.attempt,
        start: start.min(end),
        end,
        cpu_milli: r.cpu_milli,
        memory_bytes: r.memory_bytes,
        gpu_milli: r.gpu_demand_milli(),
        nodes,
        outcome: outcome.to_string(),
    })
}

/// The record of the current attempt of job `id`, ending now, for
/// [`Job::attempts`]. Call it before the job's placement is cleared.
pub fn ended_attempt(
    state: &ClusterState,
    id: JobId,
    now: u64,
    outcome: &str,
) -> Option<AttemptUsage> {
    attempt_record(state, state.jobs.get(&id)?, now, outcome)
}

/// [`ended_attempt`], also counted in the metrics' accounting totals. Call
/// it before the record is added to the job.
pub fn end_attempt(
    shared: &Shared,
    state: &ClusterState,
    id: JobId,
    now: u64,
    outcome: &str,
) -> Option<AttemptUsage> {
    let a = ended_attempt(state, id, now, outcome)?;
    shared
        .metrics
        .attempt_ended(state, state.jobs[&id].team(), &a);
    Some(a)
}

/// What a whole attempt held and cost, from its start to its end.
pub fn attempt_amounts(a: &AttemptUsage) -> Amounts {
    let mut sum = Amounts {
        attempts: 1,
        ..Amounts::default()
    };
    for share in &a.nodes {
        sum.add_share(a, share, a.end.saturating_sub(a.start));
    }
    sum
}

/// How usage is grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    Team,
    Pool,
    Job,
}

impl GroupBy {
    pub fn parse(s: &str) -> Option<GroupBy> {
        match s {
            "team" => Some(GroupBy::Team),
            "pool" => Some(GroupBy::Pool),
            "job" => Some(GroupBy::Job),
            _ => None,
        }
    }
}

/// A validated usage query: `[since, until)` in ms since the Unix epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageQuery {
    /// Only this team's jobs; all teams when none.
    pub team: Option<String>,
    pub since: u64,
    pub until: u64,
    pub by: GroupBy,
}

/// Resource-hours and cost of one group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Amounts {
    /// GPU-hours (a half GPU for two hours is one GPU-hour).
    pub gpu_hours: f64,
    /// CPU core-hours.
    pub cpu_hours: f64,
    /// Memory GiB-hours.
    pub memory_gib_hours: f64,
    /// At the nodes' prices per resource-hour.
    pub cost: f64,
    /// Jobs with run time in the range.
    pub jobs: u64,
    /// Attempts with run time in the range (retries and preempted ones too).
    pub attempts: u64,
}

impl Amounts {
    fn add_share(&mut self, a: &AttemptUsage, share: &NodeShare, ms: u64) {
        let replica_hours = share.replicas as f64 * ms as f64 / MS_PER_HOUR;
        self.gpu_hours += a.gpu_milli as f64 / 1000.0 * replica_hours;
        self.cpu_hours += a.cpu_milli as f64 / 1000.0 * replica_hours;
        self.memory_gib_hours += a.memory_bytes as f64 / (1u64 << 30) as f64 * replica_hours;
        self.cost += share.replicas as f64
            * share
                .prices
                .cost(a.cpu_milli, a.memory_bytes, a.gpu_milli, ms);
    }
}

/// One row of a usage report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageRow {
    /// With `by=team`, and with `by=job` (the job's team).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// With `by=pool`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// With `by=job`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
    /// With `by=job`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    #[serde(flatten)]
    pub amounts: Amounts,
}

/// Usage over `[since, until)`, grouped, with the total.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageReport {
    /// Milliseconds since the Unix epoch.
    pub since: u64,
    pub until: u64,
    pub by: GroupBy,
    /// The team the report is limited to; none: all teams.
    pub team: Option<String>,
    /// By team: every team (in the filter), with or without usage, by name.
    /// By pool: pools with usage, by name. By job: jobs with usage, by id.
    pub rows: Vec<UsageRow>,
    pub total: Amounts,
}

/// Usage and cost over the query's range, from the job records in `state`;
/// the attempts running at `now` count up to `now`.
pub fn usage(state: &ClusterState, q: &UsageQuery, now: u64) -> UsageReport {
    // Keys borrow from the state: no allocation per job or attempt.
    let mut by_team: BTreeMap<&str, Amounts> = BTreeMap::new();
    let mut by_pool: BTreeMap<String, Amounts> = BTreeMap::new();
    let mut by_job: BTreeMap<JobId, Amounts> = BTreeMap::new();
    if q.by == GroupBy::Team {
        for t in state.teams.keys() {
            if q.team.as_deref().is_none_or(|f| f == t) {
                by_team.insert(t, Amounts::default());
            }
        }
    }
    let mut total = Amounts::default();
    let until = q.until.min(now.max(q.since));
    let mut job_pools: Vec<String> = Vec::new();
    for job in state.jobs.values() {
        let active = job.state.is_active();
        if (job.attempts.is_empty() && !active)
            || job.submitted_at >= until
            || q.team.as_deref().is_some_and(|t| job.team() != t)
        {
            continue;
        }
        let live = if active {
            attempt_record(state, job, now, "running")
        } else {
            None
        };
        let mut job_counted = false;
        job_pools.clear();
        for a in job.attempts.iter().chain(live.as_ref()) {
            let ms = overlap_ms(a.start, a.end, q.since, until);
            if ms == 0 {
                continue;
            }
            let mut attempt = Amounts::default();
            for share in &a.nodes {
                attempt.add_share(a, share, ms);
                if q.by == GroupBy::Pool {
                    if !by_pool.contains_key(&share.pool) {
                        by_pool.insert(share.pool.clone(), Amounts::default());
                    }
                    let p = by_pool.get_mut(&share.pool).expect("inserted");
                    p.add_share(a, share, ms);
                    if !job_pools.contains(&share.pool) {
                        job_pools.push(share.pool.clone());
                        p.jobs += 1;
                    }
                    p.attempts += 1;
                }
            }
            attempt.attempts = 1;
            attempt.jobs = u64::from(!job_counted);
            job_counted = true;
            let group = match q.by {
                GroupBy::Team => Some(by_team.entry(job.team()).or_default()),
                GroupBy::Job => Some(by_job.entry(job.id).or_default()),
                GroupBy::Pool => None,
            };
            for sum in group.into_iter().chain([&mut total]) {
                sum.gpu_hours += attempt.gpu_hours;
                sum.cpu_hours += attempt.cpu_hours;
                sum.memory_gib_hours += attempt.memory_gib_hours;
                sum.cost += attempt.cost;
                sum.jobs += attempt.jobs;
                sum.attempts += attempt.attempts;
            }
        }
    }
    let rows = match q.by {
        GroupBy::Team => by_team
            .into_iter()
            .map(|(team, amounts)| UsageRow {
                team: Some(team.to_string()),
                pool: None,
                job_id: None,
                job_name: None,
                amounts,
            })
            .collect(),
        GroupBy::Pool => by_pool
            .into_iter()
            .map(|(pool, amounts)| UsageRow {
                team: None,
                pool: Some(pool),
                job_id: None,
                job_name: None,
                amounts,
            })
            .collect(),
        GroupBy::Job => by_job
            .into_iter()
            .map(|(id, amounts)| {
                let job = &state.jobs[&id];
                UsageRow {
                    team: Some(job.spec.team.clone()),
                    pool: None,
                    job_id: Some(id),
                    job_name: Some(job.spec.name.clone()),
                    amounts,
                }
            })
            .collect(),
    };
    UsageReport {
        since: q.since,
        until: q.until,
        by: q.by,
        team: q.team.clone(),
        rows,
        total,
    }
}

// ---------- times ----------

/// Parses a point in time for `since`/`until`: a duration (`30d`, `12h`,
/// `1h30m`) means that long before `now`; `now`; a date `2026-11-01` or a
/// UTC time `2026-11-01T12:00:00Z` (RFC 3339, `Z` or an offset); a bare
/// integer is milliseconds since the Unix epoch.
pub fn parse_time(s: &str, now: u64) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("is empty; write e.g. `30d`, `2026-11-01` or `2026-11-01T12:00:00Z`".into());
    }
    if t == "now" {
        return Ok(now);
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return t
            .parse::<u64>()
            .map_err(|_| format!("`{t}` is too large for milliseconds since the Unix epoch"));
    }
    if t.len() >= 10 && t.as_bytes()[4] == b'-' {
        return parse_rfc3339(t).ok_or_else(|| {
            format!("`{t}` is not a date; write `2026-11-01` or `2026-11-01T12:00:00Z`")
        });
    }
    match tessera_core::quantity::parse_duration(t) {
        Ok(ago) => Ok(now.saturating_sub(ago)),
        Err(_) => Err(format!(
            "`{t}` is neither a duration before now (`30d`, `12h`) nor a date (`2026-11-01`, `2026-11-01T12:00:00Z`)"
        )),
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

fn parse_rfc3339(s: &str) -> Option<u64> {
    let num = |r: &str| -> Option<i64> {
        (!r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
            .then(|| r.parse().ok())
            .flatten()
    };
    let (date, time) = match s.find(['T', 't', ' ']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let mut parts = date.split('-');
    let (y, m, d) = (
        num(parts.next()?)?,
        num(parts.next()?)?,
        num(parts.next()?)?,
    );
    if parts.next().is_some() || !(1..=12).contains(&m) || d < 1 || d > days_in_month(y, m) {
        return None;
    }
    let mut ms = days_from_civil(y, m, d) * 86_400_000;
    if let Some(time) = time {
        let (clock, offset_min) = if let Some(c) = time.strip_suffix(['Z', 'z']) {
            (c, 0)
        } else {
            let i = time.rfind(['+', '-'])?;
            let (c, off) = time.split_at(i);
            let sign = if off.starts_with('-') { -1 } else { 1 };
            let (oh, om) = off[1..].split_once(':')?;
            let (oh, om) = (num(oh)?, num(om)?);
            if oh > 23 || om > 59 {
                return None;
            }
            (c, sign * (oh * 60 + om))
        };
        let (hms, frac) = match clock.split_once('.') {
            Some((a, f)) => (a, Some(f)),
            None => (clock, None),
        };
        let mut f = hms.split(':');
        let (h, mi, sec) = (num(f.next()?)?, num(f.next()?)?, num(f.next()?)?);
        if f.next().is_some() || h > 23 || mi > 59 || sec > 60 {
            return None;
        }
        let frac_ms = match frac {
            Some(fr) => {
                num(fr)?;
                let padded = format!("{fr:0<3}");
                padded[..3].parse::<i64>().ok()?
            }
            None => 0,
        };
        ms += ((h * 60 + mi - offset_min) * 60 + sec) * 1000 + frac_ms;
    }
    u64::try_from(ms).ok()
}

// ---------- the API ----------

/// `GET /v1/usage` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UsageParams {
    /// Only this team (members and viewers: their own, the default).
    pub team: Option<String>,
    /// Start of the range: a duration before now (`30d`), a date
    /// (`2026-11-01`), an RFC 3339 time, or ms since the Unix epoch
    /// [default: 30d].
    pub since: Option<String>,
    /// End of the range, in the same forms [default: now].
    pub until: Option<String>,
    /// `team` (default), `pool` or `job`.
    pub by: Option<String>,
}

/// Validates the parameters against the caller: members and viewers see
/// their own team only.
pub fn query_for(caller: &Caller, p: &UsageParams, now: u64) -> Result<UsageQuery, ApiError> {
    let field = |name: &str, msg: String| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            format!("{name}: {msg}"),
        )
        .with_field(name)
    };
    let since = match &p.since {
        Some(s) => parse_time(s, now).map_err(|e| field("since", e))?,
        None => now.saturating_sub(DEFAULT_SINCE_MS),
    };
    let until = match &p.until {
        Some(s) => parse_time(s, now).map_err(|e| field("until", e))?,
        None => now,
    };
    if until < since {
        return Err(field(
            "until",
            "is before `since`; the range must not end before it starts".into(),
        ));
    }
    let by = match &p.by {
        Some(b) => GroupBy::parse(b).ok_or_else(|| {
            field(
                "by",
                format!("`{b}` is not a grouping; use team, pool or job"),
            )
        })?,
        None => GroupBy::Team,
    };
    let team = match &p.team {
        Some(t) => {
            caller.require_read(t)?;
            Some(t.clone())
        }
        None => (!caller.0.is_superuser()).then(|| caller.0.team.clone()),
    };
    Ok(UsageQuery {
        team,
        since,
        until,
        by,
    })
}

#[utoipa::path(get, path = "/v1/usage", params(UsageParams),
    responses((status = 200, body = UsageReport), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn get_usage(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    q: Result<Query<UsageParams>, QueryRejection>,
) -> Result<Json<UsageReport>, ApiError> {
    let Query(p) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    let now = now_ms();
    let query = query_for(&caller, &p, now)?;
    let state = shared.state.lock().expect("state lock");
    if let Some(t) = &query.team {
        if !state.teams.contains_key(t) {
            return Err(ApiError::not_found(format!("no team named `{t}`")).with_field("team"));
        }
    }
    Ok(Json(usage(&state, &query, now)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_core::job::ReplicaPlacement;
    use tessera_core::node::{Inventory, NodeState, Prices};
    use tessera_core::JobState;

    const H: u64 = 3_600_000;

    #[test]
    fn overlap_counts_only_the_part_inside_the_range() {
        // Entirely inside, entirely outside, across each boundary, around both.
        assert_eq!(overlap_ms(10, 20, 0, 100), 10);
        assert_eq!(overlap_ms(10, 20, 30, 100), 0);
        assert_eq!(overlap_ms(10, 20, 0, 5), 0);
        assert_eq!(overlap_ms(10, 20, 15, 100), 5);
        assert_eq!(overlap_ms(10, 20, 0, 12), 2);
        assert_eq!(overlap_ms(10, 20, 12, 18), 6);
        // Touching boundaries share nothing; empty attempts count nothing.
        assert_eq!(overlap_ms(10, 20, 20, 30), 0);
        assert_eq!(overlap_ms(10, 20, 0, 10), 0);
        assert_eq!(overlap_ms(10, 10, 0, 100), 0);
        assert_eq!(overlap_ms(20, 10, 0, 100), 0);
    }

    fn node(name: &str, pool: Option<&str>, gpu_hour: f64) -> Node {
        let mut labels = BTreeMap::new();
        if let Some(p) = pool {
            labels.insert("pool".to_string(), p.to_string());
        }
        Node {
            inventory: Inventory {
                name: name.into(),
                cpu_milli: 64_000,
                memory_bytes: 256 << 30,
                gpus: vec![],
                gpu_source: "none".into(),
                limits_enforced: false,
                limits_note: String::new(),
                labels,
                agent_version: "test".into(),
            },
            prices: Prices {
                cpu_core_hour: 0.5,
                memory_gib_hour: 0.0,
                gpu_hour,
            },
            state: NodeState::Ready,
            registered_at: 0,
            last_heartbeat: 0,
            drain_deadline: None,
        }
    }

    fn job(id: JobId, team: &str, gpus: u32, cpu: u64) -> Job {
        let spec: tessera_core::JobSpec = serde_json::from_value(serde_json::json!({
            "name": format!("j{id}"),
            "team": team,
            "command": ["true"],
            "resources": {"cpu": cpu, "memory": "1Gi", "gpu": gpus},
        }))
        .unwrap();
        let template = spec.validate(team).unwrap();
        Job::new(id, template, "t".into(), 0)
    }

    fn share(node: &str, pool: &str, replicas: u32, gpu_hour: f64) -> NodeShare {
        NodeShare {
            node: node.into(),
            pool: pool.into(),
            replicas,
            prices: Prices {
                cpu_core_hour: 0.5,
                memory_gib_hour: 0.0,
                gpu_hour,
            },
        }
    }

    fn attempt(n: u32, start: u64, end: u64, gpu: u64, nodes: Vec<NodeShare>) -> AttemptUsage {
        AttemptUsage {
            attempt: n,
            start,
            end,
            cpu_milli: 1000,
            memory_bytes: 1 << 30,
            gpu_milli: gpu * 1000,
            nodes,
            outcome: "requeued".into(),
        }
    }

    fn world() -> ClusterState {
        let mut s = ClusterState::default();
        for (name, pool, price) in [("a", None, 2.0), ("b", Some("lab"), 1.0)] {
            s.nodes.insert(name.into(), node(name, pool, price));
        }
        for t in ["ml", "ads", "idle"] {
            s.teams.insert(
                t.into(),
                tessera_core::auth::Team {
                    name: t.into(),
                    weight: 1.0,
                    created_at: 0,
                    quota: None,
                },
            );
        }
        // Job 1 (ml, 2 GPUs): preempted after 2 h on `a`, then 3 h on `a`
        // and `b` with one replica each, then succeeded.
        let mut j1 = job(1, "ml", 2, 1);
        j1.attempts = vec![
            attempt(1, 0, 2 * H, 2, vec![share("a", "nodes", 1, 2.0)]),
            attempt(
                2,
                2 * H,
                5 * H,
                2,
                vec![share("a", "nodes", 1, 2.0), share("b", "lab", 1, 1.0)],
            ),
        ];
        j1.state = JobState::Succeeded;
        s.jobs.insert(1, j1);
        // Job 2 (ads, CPU only): running on `b` since hour 4.
        let mut j2 = job(2, "ads", 0, 4);
        j2.state = JobState::Running;
        j2.attempt = 1;
        j2.started_at = Some(4 * H);
        j2.placement = vec![ReplicaPlacement {
            replica: 0,
            node: "b".into(),
            gpus: vec![],
        }];
        s.active.insert(2);
        s.jobs.insert(2, j2);
        s
    }

    fn q(team: Option<&str>, since: u64, until: u64, by: GroupBy) -> UsageQuery {
        UsageQuery {
            team: team.map(String::from),
            since,
            until,
            by,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn every_attempt_counts_and_running_ones_up_to_now() {
        let s = world();
        let r = usage(&s, &q(None, 0, 10 * H, GroupBy::Team), 6 * H);
        let row = |t: &str| {
            r.rows
                .iter()
                .find(|r| r.team.as_deref() == Some(t))
                .unwrap()
        };
        // ml: 2 GPUs × 2 h + 2 GPUs × 3 h × 2 replicas = 16 GPU-hours.
        let ml = &row("ml").amounts;
        assert!(close(ml.gpu_hours, 16.0), "{ml:?}");
        assert!(close(ml.cpu_hours, 2.0 + 6.0), "{ml:?}");
        assert!(close(ml.memory_gib_hours, 8.0), "{ml:?}");
        // Cost: attempt 1 on `a`: 2 h × (0.5 + 2×2); attempt 2: 3 h × (0.5 +
        // 2×2) on `a` and 3 h × (0.5 + 2×1) on `b`.
        assert!(close(ml.cost, 2.0 * 4.5 + 3.0 * 4.5 + 3.0 * 2.5), "{ml:?}");
        assert_eq!((ml.jobs, ml.attempts), (1, 2));
        // ads: 4 cores running from hour 4 until now (hour 6).
        let ads = &row("ads").amounts;
        assert!(close(ads.cpu_hours, 8.0), "{ads:?}");
        assert!(close(ads.cost, 8.0 * 0.5), "{ads:?}");
        assert_eq!(ads.gpu_hours, 0.0);
        // A team without usage is listed with zeros.
        assert_eq!(row("idle").amounts, Amounts::default());
        assert!(close(r.total.cost, ml.cost + ads.cost));
        assert_eq!((r.total.jobs, r.total.attempts), (2, 3));
    }

    #[test]
    fn a_range_boundary_cuts_attempts_to_their_overlap() {
        let s = world();
        // Hours 1..3: half of attempt 1 (1 h) and 1 h of attempt 2.
        let r = usage(&s, &q(Some("ml"), H, 3 * H, GroupBy::Job), 6 * H);
        assert_eq!(r.rows.len(), 1);
        let j = &r.rows[0];
        assert_eq!(j.job_id, Some(1));
        assert_eq!(j.job_name.as_deref(), Some("j1"));
        assert!(close(j.amounts.gpu_hours, 2.0 + 4.0), "{j:?}");
        assert!(close(j.amounts.cost, 4.5 + 4.5 + 2.5), "{j:?}");
        assert_eq!(j.amounts.attempts, 2);
        // The running job counts only up to now, even when the range goes on.
        let r = usage(&s, &q(Some("ads"), 5 * H, 100 * H, GroupBy::Team), 6 * H);
        assert!(close(r.total.cpu_hours, 4.0), "{r:?}");
        // A range before anything ran is empty.
        let r = usage(&s, &q(None, 100 * H, 200 * H, GroupBy::Job), 6 * H);
        assert!(r.rows.is_empty() && r.total == Amounts::default(), "{r:?}");
    }

    #[test]
    fn by_pool_splits_an_attempt_across_its_nodes_pools() {
        let s = world();
        let r = usage(&s, &q(None, 0, 10 * H, GroupBy::Pool), 6 * H);
        let pools: Vec<&str> = r.rows.iter().map(|r| r.pool.as_deref().unwrap()).collect();
        assert_eq!(pools, ["lab", "nodes"]);
        let (lab, nodes) = (&r.rows[0].amounts, &r.rows[1].amounts);
        assert!(close(nodes.gpu_hours, 4.0 + 6.0), "{nodes:?}");
        assert!(close(lab.gpu_hours, 6.0), "{lab:?}");
        assert!(close(lab.cpu_hours, 3.0 + 8.0), "{lab:?}");
        assert_eq!((lab.jobs, nodes.jobs), (2, 1));
        assert!(close(lab.cost + nodes.cost, r.total.cost));
    }

    #[test]
    fn the_record_of_a_current_attempt_groups_replicas_by_node() {
        let mut s = world();
        let j = s.jobs.get_mut(&2).unwrap();
        j.placement.push(ReplicaPlacement {
            replica: 1,
            node: "b".into(),
            gpus: vec![],
        });
        j.placement.push(ReplicaPlacement {
            replica: 2,
            node: "a".into(),
            gpus: vec![],
        });
        let a = ended_attempt(&s, 2, 5 * H, "preempted").unwrap();
        assert_eq!((a.start, a.end, a.attempt), (4 * H, 5 * H, 1));
        assert_eq!(a.nodes.len(), 2);
        assert_eq!((a.nodes[0].node.as_str(), a.nodes[0].replicas), ("b", 2));
        assert_eq!(a.nodes[0].pool, "lab");
        assert_eq!(a.nodes[1].pool, DEFAULT_POOL);
        assert_eq!(a.nodes[1].prices.gpu_hour, 2.0);
        assert!(ended_attempt(&s, 1, 5 * H, "x").is_none(), "no placement");
    }

    #[test]
    fn times_parse_as_durations_dates_and_epoch_milliseconds() {
        let now = 1_800_000_000_000;
        assert_eq!(parse_time("30d", now), Ok(now - 30 * 86_400_000));
        assert_eq!(parse_time("1h30m", now), Ok(now - 5_400_000));
        assert_eq!(parse_time("now", now), Ok(now));
        assert_eq!(parse_time("1700000000000", now), Ok(1_700_000_000_000));
        assert_eq!(parse_time("1970-01-01", now), Ok(0));
        assert_eq!(parse_time("2026-11-01", now), Ok(1_793_491_200_000));
        assert_eq!(
            parse_time("2026-11-01T12:30:00Z", now),
            Ok(1_793_491_200_000 + 45_000_000)
        );
        assert_eq!(
            parse_time("2026-11-01T14:30:00.250+02:00", now),
            Ok(1_793_491_200_000 + 45_000_250)
        );
        assert_eq!(parse_time("2024-02-29", now), Ok(1_709_164_800_000));
        for bad in [
            "",
            "yesterday",
            "2026-13-01",
            "2023-02-29",
            "2026-11-01T25:00:00Z",
        ] {
            assert!(parse_time(bad, now).is_err(), "{bad}");
        }
        assert!(parse_time("soon", now).unwrap_err().contains("`soon`"));
    }
}
