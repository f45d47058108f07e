//! `tessera bench ui`: builds a synthetic cluster in memory (nodes with
//! GPUs and live usage, teams with quotas, a history of finished jobs,
//! running and queued ones with events) and times each dashboard page
//! through the real router — authentication, the state lock, building the
//! view, rendering — against the JSON API answering for the same data.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tessera_core::auth::{ResourceAmounts, Role, Team, TeamQuota, ADMIN_TEAM};
use tessera_core::job::{ReplicaPlacement, ReplicaState, ReplicaStatus};
use tessera_core::node::{GpuInfo, GpuUsage, Inventory, Node, NodeState, NodeUsage, Prices};
use tessera_core::spec::JobSpec;
use tessera_core::{Event, Job, JobState};

use crate::state::ClusterState;
use crate::Shared;

const GIB: u64 = 1 << 30;

/// xorshift64*: deterministic and small.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The secrets of the tokens the synthetic state holds.
#[derive(Debug, Clone)]
pub struct Tokens {
    pub admin: String,
    /// A member of `team-3`.
    pub member: String,
}

/// A cluster of `nodes` nodes (8 GPUs each, in two pools and two models)
/// and `jobs` jobs: about 6 running per node (one GPU each) up to the
/// total, 4% queued, the rest finished over the last 30 days.
pub fn synthetic(nodes: u32, jobs: u32, now: u64) -> (ClusterState, Tokens) {
    let mut s = ClusterState::default();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let teams = 8;
    let mut team_names = vec![ADMIN_TEAM.to_string()];
    for t in 0..teams {
        team_names.push(format!("team-{t}"));
    }
    for (i, name) in team_names.iter().enumerate() {
        let gpus = (nodes as u64 * 8 * 1000) / teams;
        s.teams.insert(
            name.clone(),
            Team {
                name: name.clone(),
                weight: 1.0 + (i % 3) as f64,
                created_at: now - 40 * 86_400_000,
                quota: (i > 0).then_some(TeamQuota {
                    guaranteed: ResourceAmounts {
                        cpu_milli: 0,
                        memory_bytes: 0,
                        gpu_milli: gpus,
                    },
                    limit: ResourceAmounts {
                        cpu_milli: u64::MAX,
                        memory_bytes: u64::MAX,
                        gpu_milli: gpus * 2,
                    },
                }),
            },
        );
    }
    let (admin, rec) = crate::auth::mint("admin", ADMIN_TEAM, Role::Admin, now);
    s.tokens.insert(rec.hash.clone(), rec);
    let (member, rec) = crate::auth::mint("member", "team-3", Role::Member, now);
    s.tokens.insert(rec.hash.clone(), rec);

    for n in 0..nodes {
        let name = format!("node-{n:04}");
        let model = if n % 10 < 7 {
            "NVIDIA H100 80GB HBM3"
        } else {
            "NVIDIA A100-SXM4-80GB"
        };
        let mut labels = BTreeMap::new();
        labels.insert(
            "pool".to_string(),
            if n % 2 == 0 { "dc-east" } else { "dc-west" }.to_string(),
        );
        labels.insert("rack".to_string(), format!("r{}", n / 40));
        let gpus: Vec<GpuInfo> = (0..8)
            .map(|g| GpuInfo {
                index: g,
                uuid: format!("GPU-{n:04}-{g}"),
                model: model.to_string(),
                memory_bytes: 80 * GIB,
                healthy: !(n == 7 && g == 3),
            })
            .collect();
        s.usage.insert(
            name.clone(),
            NodeUsage {
                at: now - 1000,
                cpu_used_milli: rng.below(64_000),
                memory_used_bytes: rng.below(400) * GIB,
                gpus: (0..8)
                    .map(|g| GpuUsage {
                        index: g,
                        utilization_percent: Some(rng.below(101) as u32),
                        memory_used_bytes: Some(rng.below(80) * GIB),
                        temperature_celsius: Some(35 + rng.below(45) as u32),
                        power_watts: Some(100.0 + rng.below(500) as f64),
                        ecc_uncorrected_volatile: Some(0),
                        healthy: true,
                    })
                    .collect(),
            },
        );
        s.connected.insert(name.clone());
        s.nodes.insert(
            name.clone(),
            Node {
                inventory: Inventory {
                    name,
                    cpu_milli: 64_000,
                    memory_bytes: 512 * GIB,
                    gpus,
                    gpu_source: "nvml".into(),
                    limits_enforced: true,
                    limits_note: String::new(),
                    labels,
                    agent_version: env!("CARGO_PKG_VERSION").into(),
                },
                prices: Prices {
                    cpu_core_hour: 0.04,
                    memory_gib_hour: 0.005,
                    gpu_hour: 2.5,
                },
                state: match n % 100 {
                    97 => NodeState::Cordoned,
                    98 => NodeState::Draining,
                    99 => NodeState::Lost,
                    _ => NodeState::Ready,
                },
                registered_at: now - 30 * 86_400_000,
                last_heartbeat: now - rng.below(5000),
                drain_deadline: None,
            },
        );
    }

    let base = JobSpec::parse(
        "name: train\ncommand: [python3, train.py, --epochs, '3']\nresources: {cpu: 8, memory: 64Gi, gpu: 1}\n\
         env: {LR: '0.001'}\nretries: {on_failure: 1, on_node_loss: 3}\n",
    )
    .and_then(|spec| spec.validate("team-0"))
    .expect("the benchmark's job spec is valid");
    let running_max = (nodes as u64 * 6).min(jobs as u64);
    let queued = jobs as u64 / 25;
    let finished = (jobs as u64).saturating_sub(running_max + queued);
    let mut id = 0u64;
    let push = |s: &mut ClusterState, mut j: Job, events: Vec<Event>| {
        if j.state == JobState::Queued {
            s.queued.insert(j.id);
        } else if j.state.is_active() {
            s.active.insert(j.id);
        }
        j.replicas = j
            .placement
            .iter()
            .map(|p| ReplicaStatus {
                replica: p.replica,
                state: if j.state.is_terminal() {
                    ReplicaState::Exited
                } else {
                    ReplicaState::Running
                },
                pid: Some(1000 + j.id as u32),
                exit_code: j.exit_code,
                signal: None,
            })
            .collect();
        s.events.insert(j.id, events);
        s.jobs.insert(j.id, j);
    };
    let month = 30 * 86_400_000u64;
    for k in 0..finished {
        id += 1;
        let mut t = base.clone();
        t.name = format!("train-{}", rng.below(5000));
        t.team = format!("team-{}", rng.below(teams));
        // Spread over the month, all ended before now.
        let submitted = now - month + k * ((month - 5 * 3_600_000) / finished.max(1));
        let started = submitted + rng.below(600_000);
        let ended = started + 60_000 + rng.below(4 * 3_600_000);
        let mut j = Job::new(id, t, "tok-bench".into(), submitted);
        let (st, code) = match rng.below(20) {
            0 | 1 => (JobState::Failed, 1),
            2 => (JobState::Cancelled, 143),
            _ => (JobState::Succeeded, 0),
        };
        j.state = st;
        j.attempt = 1;
        j.scheduled_at = Some(started);
        j.started_at = Some(started);
        j.finished_at = Some(ended);
        j.exit_code = Some(code);
        j.reason = Some(format!("exited with code {code}"));
        let node = rng.below(nodes as u64);
        j.placement = vec![ReplicaPlacement {
            replica: 0,
            node: format!("node-{node:04}"),
            gpus: vec![rng.below(8) as u32],
        }];
        j.cost = (ended - started) as f64 / 3_600_000.0 * (2.5 + 8.0 * 0.04 + 64.0 * 0.005);
        let ev = vec![
            Event::new(id, submitted, "submitted", "submitted by tok-bench"),
            Event::new(
                id,
                started,
                "scheduled",
                format!("placed on node-{node:04}"),
            ),
            Event::new(id, started + 50, "started", "replica 0 started"),
            Event::new(id, ended, st.as_str(), format!("exited with code {code}")),
        ];
        push(&mut s, j, ev);
    }
    for k in 0..running_max {
        id += 1;
        let mut t = base.clone();
        t.name = format!("train-{}", rng.below(5000));
        t.team = format!("team-{}", rng.below(teams));
        let node = k % nodes as u64;
        let gpu = (k / nodes as u64) as u32;
        let started = now - rng.below(6 * 3_600_000);
        let mut j = Job::new(id, t, "tok-bench".into(), started - 30_000);
        j.state = JobState::Running;
        j.attempt = 1;
        j.scheduled_at = Some(started);
        j.started_at = Some(started);
        j.placement = vec![ReplicaPlacement {
            replica: 0,
            node: format!("node-{node:04}"),
            gpus: vec![gpu],
        }];
        let ev = vec![
            Event::new(id, started - 30_000, "submitted", "submitted by tok-bench"),
            Event::new(id, started, "started", "replica 0 started"),
        ];
        push(&mut s, j, ev);
    }
    for k in 0..queued {
        id += 1;
        let mut t = base.clone();
        t.name = format!("sweep-{}", rng.below(5000));
        t.team = format!("team-{}", k % teams);
        t.resources.gpu = 8;
        t.replicas = 2;
        let submitted = now - rng.below(3_600_000);
        let mut j = Job::new(id, t, "tok-bench".into(), submitted);
        j.reason = Some(
            "needs 2 replicas of 8 GPUs on one node each; 2 nodes have 8 free GPUs; 3 jobs ahead"
                .into(),
        );
        let ev = vec![Event::new(
            id,
            submitted,
            "submitted",
            "submitted by tok-bench",
        )];
        push(&mut s, j, ev);
    }
    (s, Tokens { admin, member })
}

/// One timed request.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub name: String,
    pub path: String,
    pub role: &'static str,
    pub bytes: usize,
    pub median_ms: f64,
    pub p90_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub nodes: u32,
    pub jobs: u32,
    pub runs: u32,
    /// Building the synthetic state (not part of any page).
    pub build_ms: f64,
    /// Rebuilding the Overview's 6-hour history from the job records, as
    /// a start does.
    pub backfill_ms: f64,
    pub pages: Vec<Timing>,
    /// The JSON API for comparable data, timed the same way.
    pub baselines: Vec<Timing>,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn time(
    router: &axum::Router,
    token: &str,
    name: &str,
    path: &str,
    role: &'static str,
    runs: u32,
) -> anyhow::Result<Timing> {
    use tower::ServiceExt;
    let mut samples = Vec::new();
    let mut bytes = 0;
    for i in 0..runs + 1 {
        let req = axum::http::Request::get(path)
            .header("authorization", format!("Bearer {token}"))
            .body(axum::body::Body::empty())?;
        let t = Instant::now();
        let resp = router.clone().oneshot(req).await?;
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        anyhow::ensure!(
            status.is_success(),
            "{path} answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
        bytes = body.len();
        if i > 0 {
            samples.push(ms); // the first run warms up
        }
    }
    samples.sort_by(f64::total_cmp);
    Ok(Timing {
        name: name.into(),
        path: path.into(),
        role,
        bytes,
        median_ms: pct(&samples, 0.5),
        p90_ms: pct(&samples, 0.9),
        max_ms: samples.last().copied().unwrap_or(0.0),
    })
}

/// Builds the state and times every page `runs` times (after one warm-up).
pub async fn run(nodes: u32, jobs: u32, runs: u32) -> anyhow::Result<Report> {
    let now = crate::now_ms();
    let t = Instant::now();
    let (state, tokens) = synthetic(nodes, jobs, now);
    let build_ms = t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    let samples = super::history::backfill(
        &state,
        now,
        super::history::KEEP_MS,
        super::history::SAMPLE_EVERY.as_millis() as u64,
    );
    let backfill_ms = t.elapsed().as_secs_f64() * 1000.0;
    let home = std::env::temp_dir().join(format!("tessera-bench-ui-{}", std::process::id()));
    let shared = Arc::new(Shared::new(
        Arc::new(tessera_store::MemStore::new()),
        state,
        home,
        Duration::from_secs(1),
    ));
    for s in samples {
        shared.ui.history.push(s);
    }
    let router = crate::api::router(shared.clone());
    let last = jobs as u64;
    let deep = (last / 2).max(1);
    let job_page = format!("/ui/jobs/{}", last.max(1));
    let deep_page = format!("/ui/jobs?before={deep}");
    let pages: Vec<(&str, &str, &str)> = vec![
        ("Overview", "/ui", "admin"),
        ("Overview, 1 hour", "/ui?window=1h", "admin"),
        ("Jobs, newest page", "/ui/jobs", "admin"),
        ("Jobs, deep page", &deep_page, "admin"),
        (
            "Jobs, team + state filter",
            "/ui/jobs?team=team-3&state=failed",
            "admin",
        ),
        ("Jobs, pool filter", "/ui/jobs?pool=dc-west", "admin"),
        ("Jobs, name matching none", "/ui/jobs?name=zzz", "admin"),
        ("Job page", &job_page, "admin"),
        ("Nodes, first 100", "/ui/nodes", "admin"),
        ("Nodes, page 10", "/ui/nodes?page=10", "admin"),
        ("Teams, 30 days", "/ui/teams?period=30d", "admin"),
        ("Services", "/ui/services", "admin"),
        ("Overview", "/ui", "member"),
        ("Jobs, newest page", "/ui/jobs", "member"),
    ];
    let mut out = Vec::new();
    for (name, path, role) in pages {
        let (token, role) = if role == "admin" {
            (&tokens.admin, "admin")
        } else {
            (&tokens.member, "member")
        };
        out.push(time(&router, token, name, path, role, runs).await?);
    }
    let mut baselines = Vec::new();
    for (name, path) in [
        ("GET /healthz", "/healthz"),
        ("GET /v1/jobs?limit=50 (JSON)", "/v1/jobs?limit=50"),
        ("GET /v1/nodes (JSON, all nodes)", "/v1/nodes"),
    ] {
        baselines.push(time(&router, &tokens.admin, name, path, "admin", runs).await?);
    }
    Ok(Report {
        nodes,
        jobs,
        runs,
        build_ms,
        backfill_ms,
        pages: out,
        baselines,
    })
}

/// The report as a table, with each page's median over the JSON jobs
/// page's median.
pub fn table(r: &Report) -> String {
    use std::fmt::Write;
    let base = r
        .baselines
        .iter()
        .find(|b| b.path.starts_with("/v1/jobs"))
        .map(|b| b.median_ms)
        .unwrap_or(0.0);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "dashboard pages on {} nodes and {} jobs ({} runs each after a warm-up; server time through the router)",
        r.nodes, r.jobs, r.runs
    );
    let _ = writeln!(
        o,
        "state built in {:.0} ms; 6-hour history rebuilt from job records in {:.1} ms\n",
        r.build_ms, r.backfill_ms
    );
    let _ = writeln!(
        o,
        "{:<34} {:<7} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "page", "token", "median", "p90", "max", "KiB", "x JSON"
    );
    for t in r.pages.iter().chain(r.baselines.iter()) {
        let _ = writeln!(
            o,
            "{:<34} {:<7} {:>6.2} ms {:>6.2} ms {:>6.2} ms {:>9.1} {:>10}",
            t.name,
            t.role,
            t.median_ms,
            t.p90_ms,
            t.max_ms,
            t.bytes as f64 / 1024.0,
            if base > 0.0 {
                format!("{:.2}", t.median_ms / base)
            } else {
                "-".into()
            }
        );
    }
    let worst = r.pages.iter().map(|t| t.max_ms).fold(0.0, f64::max);
    let _ = writeln!(
        o,
        "\nslowest page, worst run: {worst:.1} ms (budget 300 ms): {}",
        if worst <= 300.0 { "within" } else { "OVER" }
    );
    o
}
