//! `tessera bench`: the scheduler in-process on a synthetic cluster, the
//! submit path of a running server, and submit-to-finish end to end.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use serde::Deserialize;
use serde_json::{json, Value};
use tessera_core::{Job, JobState, Resources};
use tessera_scheduler::{NodeView, PendingJob, Snapshot};

use crate::client::Client;
use crate::output::{self, key_values, percentiles, Output};
use crate::Globals;

const GIB: u64 = 1 << 30;
const BENCH_GPU_MODEL: &str = "NVIDIA H100 80GB HBM3";

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time one scheduling cycle over a synthetic cluster and queue (no server needed)
    #[command(alias = "schedule")]
    Scheduler {
        /// Nodes, each with 64 CPUs and 512Gi
        #[arg(long, default_value_t = 1000)]
        nodes: u32,
        /// GPUs per node (NVIDIA H100 80GB HBM3)
        #[arg(long, default_value_t = 8)]
        gpus_per_node: u32,
        /// Queued jobs
        #[arg(long, default_value_t = 100_000)]
        jobs: u32,
        /// Seed for the job mix
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Timed runs, after one warm-up run
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// Teams the jobs belong to; each is guaranteed an equal share of the
        /// GPUs and may borrow up to twice that
        #[arg(long, default_value_t = 3)]
        teams: u32,
        /// Scheduling policy
        #[arg(long, default_value = "tessera")]
        policy: String,
    },
    /// Submit jobs to the running server as fast as it acknowledges them.
    /// A blocker job holds every CPU of the largest node first, so the
    /// submitted jobs stay queued and the measure is the durable submission
    /// path alone; afterwards the blocker and the jobs are cancelled.
    Submit {
        /// Jobs to submit
        #[arg(long, default_value_t = 20_000)]
        jobs: usize,
        /// Requests in flight
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Submit-to-finished latency and throughput of real jobs on the running server
    E2e {
        /// Jobs in the bulk phase
        #[arg(long, default_value_t = 1000)]
        jobs: usize,
        /// Jobs in the serial phase, one at a time
        #[arg(long, default_value_t = 50)]
        serial: usize,
        /// Requests in flight in the bulk phase
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Give up when the jobs have not finished after this long
        #[arg(long, value_parser = crate::duration_ms, default_value = "10m", value_name = "DURATION")]
        timeout: u64,
    },
    /// Simulated agents heartbeating to a `tessera server` child: its CPU and memory
    Agents(crate::bench_fleet::AgentsArgs),
    /// Trivial jobs on a real remote agent, submit to started and finished, against `tessera up`
    Remote(crate::bench_fleet::RemoteArgs),
    /// Time the dashboard's pages (`/ui`) on a synthetic cluster in memory (no server needed)
    Ui {
        /// Nodes, each with 8 GPUs
        #[arg(long, default_value_t = 1000)]
        nodes: u32,
        /// Jobs: about 6 running per node, 4% queued, the rest finished
        #[arg(long, default_value_t = 100_000)]
        jobs: u32,
        /// Timed runs per page, after one warm-up run
        #[arg(long, default_value_t = 20)]
        runs: u32,
    },
}

pub async fn bench(g: &Globals, command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Scheduler {
            nodes,
            gpus_per_node,
            jobs,
            seed,
            runs,
            teams,
            policy,
        } => {
            let policy = tessera_scheduler::Policy::named(&policy).ok_or_else(|| {
                anyhow!(
                    "unknown policy `{policy}`; use one of {}",
                    tessera_scheduler::Policy::NAMES.join(", ")
                )
            })?;
            scheduler(
                g.output,
                nodes,
                gpus_per_node,
                jobs,
                seed,
                runs,
                teams.max(1),
                policy,
            )
        }
        BenchCommand::Submit { jobs, concurrency } => submit(g, jobs, concurrency).await,
        BenchCommand::E2e {
            jobs,
            serial,
            concurrency,
            timeout,
        } => e2e(g, jobs, serial, concurrency, Duration::from_millis(timeout)).await,
        BenchCommand::Agents(args) => crate::bench_fleet::agents(g, args).await,
        BenchCommand::Remote(args) => crate::bench_fleet::remote(g, args).await,
        BenchCommand::Ui { nodes, jobs, runs } => {
            let r = tessera_server::ui::bench::run(nodes, jobs, runs).await?;
            match g.output {
                Output::Json => output::print(&serde_json::to_string_pretty(&r)?)?,
                Output::Table | Output::Csv => {
                    output::print(tessera_server::ui::bench::table(&r).trim_end())?
                }
            }
            Ok(())
        }
    }
}

/// xorshift64*: tiny, deterministic, good enough for a job mix.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        // splitmix64 of the seed, so that 0 and nearby seeds are fine.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        XorShift((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// A synthetic cluster and queue: 70% single-replica GPU jobs (1–8 GPUs,
/// a quarter pinned to H100), 25% CPU-only jobs, 5% gangs of 2–4 replicas
/// with 8 GPUs each; one job in ten has a higher priority. Jobs belong to
/// `teams` teams, each guaranteed an equal share of the GPUs
/// and allowed to borrow up to twice that.
pub fn synthetic_snapshot_for(
    nodes: u32,
    gpus_per_node: u32,
    jobs: u32,
    seed: u64,
    teams: u32,
) -> Snapshot {
    let nodes: Vec<NodeView> = (0..nodes)
        .map(|i| {
            NodeView::new(format!("node-{i:05}"), 64_000, 512 * GIB)
                .with_gpus(gpus_per_node, BENCH_GPU_MODEL)
        })
        .collect();
    let mut rng = XorShift::new(seed);
    let queue = (0..jobs)
        .map(|i| {
            let kind = rng.range(0, 99);
            let (resources, replicas) = if kind < 70 {
                let gpu = [1, 1, 1, 2, 2, 4, 8][rng.range(0, 6) as usize];
                let models = if rng.range(0, 3) == 0 {
                    vec!["H100".to_string()]
                } else {
                    vec![]
                };
                (
                    Resources {
                        cpu_milli: u64::from(gpu) * 6_000,
                        memory_bytes: u64::from(gpu) * 48 * GIB,
                        gpu,
                        gpu_milli: 0,
                        gpu_models: models,
                        node_selector: Default::default(),
                    },
                    1,
                )
            } else if kind < 95 {
                (
                    Resources {
                        cpu_milli: rng.range(1, 16) * 1000,
                        memory_bytes: rng.range(2, 64) * GIB,
                        gpu: 0,
                        gpu_milli: 0,
                        gpu_models: vec![],
                        node_selector: Default::default(),
                    },
                    1,
                )
            } else {
                (
                    Resources {
                        cpu_milli: 48_000,
                        memory_bytes: 384 * GIB,
                        gpu: 8,
                        gpu_milli: 0,
                        gpu_models: vec![],
                        node_selector: Default::default(),
                    },
                    rng.range(2, 4) as u32,
                )
            };
            PendingJob::new(
                u64::from(i) + 1,
                format!("team-{}", rng.range(0, u64::from(teams) - 1)),
                if rng.range(0, 9) == 0 { 10 } else { 0 },
                u64::from(i),
                resources,
                replicas,
            )
        })
        .collect();
    let total_gpu_milli: u64 = nodes.iter().map(|n| n.gpus.len() as u64 * 1000).sum();
    let share = total_gpu_milli / u64::from(teams);
    let quota = |g: u64, l: u64| tessera_scheduler::Quota {
        guaranteed: tessera_scheduler::Amounts {
            gpu_milli: g,
            ..tessera_scheduler::Amounts::ZERO
        },
        limit: tessera_scheduler::Amounts {
            gpu_milli: l,
            ..tessera_scheduler::Amounts::UNLIMITED
        },
    };
    let teams = (0..teams)
        .map(|t| tessera_scheduler::TeamView {
            name: format!("team-{t}"),
            weight: 1.0,
            quota: Some(quota(share, share * 2)),
            recent_share: 0.0,
        })
        .collect();
    Snapshot {
        nodes,
        queue,
        teams,
        ..Snapshot::default()
    }
}

/// Peak resident memory of this process, in MiB (Linux).
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[allow(clippy::too_many_arguments)]
fn scheduler(
    out: Output,
    nodes: u32,
    gpus_per_node: u32,
    jobs: u32,
    seed: u64,
    runs: u32,
    teams: u32,
    policy: tessera_scheduler::Policy,
) -> Result<()> {
    let runs = runs.max(1);
    if cfg!(debug_assertions) {
        eprintln!("note: this is a debug build; build with --release for numbers worth quoting");
    }
    let mut snapshot = synthetic_snapshot_for(nodes, gpus_per_node, jobs, seed, teams);
    snapshot.policy = policy;
    eprintln!("scheduling {jobs} jobs on {nodes} nodes: 1 warm-up run, {runs} timed");
    let plan = tessera_scheduler::schedule(&snapshot, 0);
    let mut times = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        let p = tessera_scheduler::schedule(&snapshot, 0);
        times.push(ms(start.elapsed()));
        if p.placements.len() != plan.placements.len() {
            bail!("the scheduler gave different plans for the same snapshot");
        }
    }
    let [median, min, max, p99] = percentiles(&times, &[50.0, 0.0, 100.0, 99.0])[..] else {
        unreachable!("four percentiles asked for")
    };
    let placed_replicas: usize = plan.placements.iter().map(|p| p.assignments.len()).sum();
    let per_sec = plan.placements.len() as f64 / (median / 1000.0).max(1e-9);
    let report = json!({
        "nodes": nodes, "gpus_per_node": gpus_per_node, "jobs": jobs, "seed": seed, "runs": runs,
        "placements": plan.placements.len(), "placed_replicas": placed_replicas,
        "waiting": plan.waiting.len(),
        "cycle_ms": { "median": median, "min": min, "max": max },
        "p99_cycle_ms": p99,
        "placements_per_s": per_sec,
        "teams": teams, "policy": snapshot.policy.name,
        "peak_rss_mb": peak_rss_mb(),
    });
    if out == Output::Json {
        return output::print_json(&report);
    }
    output::print(&key_values(&[
        (
            "Cluster",
            format!("{nodes} nodes x (64 cpu, 512Gi, {gpus_per_node} GPUs)"),
        ),
        ("Queue", format!("{jobs} jobs (seed {seed})")),
        (
            "Placements",
            format!("{} jobs, {placed_replicas} replicas", plan.placements.len()),
        ),
        ("Waiting", plan.waiting.len().to_string()),
        (
            "Cycle time",
            format!("{median:.2} ms median ({min:.2} min, {max:.2} max over {runs} runs)"),
        ),
        ("Throughput", format!("{per_sec:.0} placements/s")),
        (
            "Policy",
            format!("{} ({teams} teams with quotas)", snapshot.policy.name),
        ),
        (
            "Peak memory",
            peak_rss_mb()
                .map(|m| format!("{m:.0} MiB"))
                .unwrap_or_else(|| "unknown".into()),
        ),
    ]))?;
    Ok(())
}

#[derive(Debug, Deserialize)]
struct Created {
    id: u64,
}

/// What a batch of concurrent submissions did.
struct Submitted {
    ids: Vec<u64>,
    latencies_ms: Vec<f64>,
    errors: usize,
    first_error: Option<String>,
    elapsed: Duration,
}

/// Submits `jobs` copies of `spec` with `concurrency` requests in flight.
async fn submit_many(client: &Client, spec: &Value, jobs: usize, concurrency: usize) -> Submitted {
    let body = Arc::new(serde_json::to_vec(spec).unwrap_or_default());
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.clamp(1, jobs.max(1)) {
        let (client, body, next) = (client.clone(), body.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut lat = Vec::new();
            let mut errors = 0;
            let mut first_error = None;
            while next.fetch_add(1, Ordering::Relaxed) < jobs {
                let t0 = Instant::now();
                match client
                    .post_raw::<Created>("/v1/jobs", body.as_ref().clone(), "application/json")
                    .await
                {
                    Ok(c) => {
                        lat.push(ms(t0.elapsed()));
                        ids.push(c.id);
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            (ids, lat, errors, first_error)
        }));
    }
    let mut s = Submitted {
        ids: Vec::new(),
        latencies_ms: Vec::new(),
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
    };
    for t in tasks {
        match t.await {
            Ok((ids, lat, errors, first)) => {
                s.ids.extend(ids);
                s.latencies_ms.extend(lat);
                s.errors += errors;
                if s.first_error.is_none() {
                    s.first_error = first;
                }
            }
            Err(e) => {
                s.errors += 1;
                s.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    s.elapsed = start.elapsed();
    s
}

/// Cancels jobs with `concurrency` requests in flight; errors (a job that
/// already finished) are ignored.
async fn cancel_all(client: &Client, ids: &[u64], concurrency: usize) {
    let ids = Arc::new(ids.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, ids, next) = (client.clone(), ids.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else { break };
                let _: Result<Value> = client
                    .post_json(&format!("/v1/jobs/{id}/cancel"), &json!({}))
                    .await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Checks the server answers (and the token works) before a benchmark.
async fn preflight(client: &Client) -> Result<()> {
    let _: Value = client
        .get("/v1/jobs", &[("limit", "1".to_string())])
        .await?;
    Ok(())
}

fn latency_json(samples: &[f64]) -> Value {
    let p = percentiles(samples, &[50.0, 90.0, 99.0, 100.0]);
    json!({ "p50": p[0], "p90": p[1], "p99": p[2], "max": p[3] })
}

async fn submit(g: &Globals, jobs: usize, concurrency: usize) -> Result<()> {
    let client = g.client()?;
    preflight(&client).await?;
    let nodes: Value = client.get("/v1/nodes", &[]).await?;
    let node_cpu = nodes["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["cpu_milli"].as_u64())
        .max()
        .ok_or_else(|| anyhow!("the cluster has no nodes"))?;
    let cpu = format!("{node_cpu}m");
    let blocker: Created = client
        .post_json(
            "/v1/jobs",
            &json!({"name": "bench-blocker", "command": ["sleep", "3600"], "resources": {"cpu": cpu, "memory": "1Mi"}}),
        )
        .await?;
    eprintln!(
        "submitting {jobs} jobs to {} with {concurrency} in flight (they stay queued behind job {})",
        client.url(),
        blocker.id
    );
    let spec =
        json!({"command": ["true"], "resources": {"cpu": cpu, "memory": "1Mi"}, "name": "bench"});
    let s = submit_many(&client, &spec, jobs, concurrency).await;
    // Clean up: the queue first, so none of it starts when the blocker goes.
    cancel_all(&client, &s.ids, concurrency).await;
    let _: Value = client
        .post_json(&format!("/v1/jobs/{}/cancel", blocker.id), &json!({}))
        .await?;
    if s.ids.is_empty() {
        return Err(anyhow!(s
            .first_error
            .unwrap_or_else(|| "no job was submitted".into())));
    }
    let secs = s.elapsed.as_secs_f64();
    let rate = s.ids.len() as f64 / secs.max(1e-9);
    let p = percentiles(&s.latencies_ms, &[50.0, 99.0, 100.0]);
    if g.output == Output::Json {
        return output::print_json(&json!({
            "jobs": jobs, "concurrency": concurrency, "acknowledged": s.ids.len(), "errors": s.errors,
            "first_error": s.first_error, "seconds": secs, "submissions_per_sec": rate,
            "latency_ms": latency_json(&s.latencies_ms),
        }));
    }
    let mut pairs = vec![
        (
            "Acknowledged",
            format!(
                "{} of {jobs} ({} errors) in {secs:.2}s",
                s.ids.len(),
                s.errors
            ),
        ),
        (
            "Throughput",
            format!("{rate:.0} submissions/s with {concurrency} in flight"),
        ),
        (
            "Latency",
            format!("p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms", p[0], p[1], p[2]),
        ),
    ];
    if let Some(e) = s.first_error {
        pairs.push(("First error", e));
    }
    output::print(&key_values(&pairs))?;
    Ok(())
}

/// A finished job's server-side times.
#[derive(Debug, Clone, Copy)]
struct Finished {
    submitted_at: u64,
    finished_at: u64,
    succeeded: bool,
}

impl Finished {
    fn of(job: &Job) -> Finished {
        Finished {
            submitted_at: job.submitted_at,
            finished_at: job.finished_at.unwrap_or(job.submitted_at),
            succeeded: job.state == JobState::Succeeded,
        }
    }
}

fn e2e_spec() -> Value {
    json!({"command": ["true"], "resources": {"cpu": "100m", "memory": "16Mi"}, "name": "bench-e2e"})
}

/// Submits one job and polls it every 2 ms until it ends.
async fn one_serial(client: &Client, deadline: Instant) -> Result<(Finished, f64)> {
    let start = Instant::now();
    let created: Created = client.post_json("/v1/jobs", &e2e_spec()).await?;
    let path = format!("/v1/jobs/{}", created.id);
    loop {
        let job: Job = client.get(&path, &[]).await?;
        if job.state.is_terminal() {
            return Ok((Finished::of(&job), ms(start.elapsed())));
        }
        if Instant::now() > deadline {
            bail!(
                "job {} did not finish in time (still {})",
                job.id,
                job.state.as_str()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[derive(Debug, Deserialize)]
struct JobPage {
    jobs: Vec<Job>,
    #[serde(default)]
    next_cursor: Option<String>,
}

/// Polls job list pages until every id has ended.
async fn wait_all(
    client: &Client,
    ids: &[u64],
    deadline: Instant,
) -> Result<HashMap<u64, Finished>> {
    let mut pending: HashSet<u64> = ids.iter().copied().collect();
    let mut done = HashMap::new();
    while !pending.is_empty() {
        let mut seen = 0;
        let mut cursor: Option<String> = None;
        let want = pending.len();
        loop {
            let mut q = vec![("limit", "1000".to_string())];
            if let Some(c) = cursor.take() {
                q.push(("cursor", c));
            }
            let page: JobPage = client.get("/v1/jobs", &q).await?;
            for job in &page.jobs {
                if pending.contains(&job.id) {
                    seen += 1;
                    if job.state.is_terminal() {
                        pending.remove(&job.id);
                        done.insert(job.id, Finished::of(job));
                    }
                }
            }
            cursor = page.next_cursor.filter(|c| !c.is_empty());
            // Ours are the newest jobs: stop paging once all were seen.
            if cursor.is_none() || seen >= want {
                break;
            }
        }
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{} of {} jobs had not finished in time",
                pending.len(),
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(done)
}

async fn e2e(
    g: &Globals,
    jobs: usize,
    serial: usize,
    concurrency: usize,
    timeout: Duration,
) -> Result<()> {
    let client = g.client()?;
    preflight(&client).await?;
    let deadline = Instant::now() + timeout;

    eprintln!("serial: {serial} jobs, one at a time, polling every 2 ms");
    let mut server_ms = Vec::new();
    let mut client_ms = Vec::new();
    let mut serial_failed = 0;
    for _ in 0..serial {
        let (f, wall) = one_serial(&client, deadline).await?;
        server_ms.push(f.finished_at.saturating_sub(f.submitted_at) as f64);
        client_ms.push(wall);
        serial_failed += usize::from(!f.succeeded);
    }

    eprintln!("bulk: {jobs} jobs, {concurrency} submissions in flight");
    let start = Instant::now();
    let s = submit_many(&client, &e2e_spec(), jobs, concurrency).await;
    if s.errors > 0 {
        eprintln!(
            "{} submissions failed; first: {}",
            s.errors,
            s.first_error.as_deref().unwrap_or("?")
        );
    }
    let done = wait_all(&client, &s.ids, deadline).await?;
    let wall = start.elapsed().as_secs_f64();
    let first = done.values().map(|f| f.submitted_at).min().unwrap_or(0);
    let last = done.values().map(|f| f.finished_at).max().unwrap_or(0);
    let span = last.saturating_sub(first) as f64 / 1000.0;
    let bulk_failed = done.values().filter(|f| !f.succeeded).count();
    let rate = done.len() as f64 / span.max(1e-3);
    let bulk_server_ms: Vec<f64> = done
        .values()
        .map(|f| f.finished_at.saturating_sub(f.submitted_at) as f64)
        .collect();

    if g.output == Output::Json {
        return output::print_json(&json!({
            "serial": {
                "jobs": serial, "failed": serial_failed,
                "server_ms": latency_json(&server_ms), "client_ms": latency_json(&client_ms),
            },
            "bulk": {
                "jobs": jobs, "concurrency": concurrency, "submitted": s.ids.len(), "submit_errors": s.errors,
                "submit_seconds": s.elapsed.as_secs_f64(), "finished": done.len(), "failed": bulk_failed,
                "span_seconds": span, "jobs_per_sec": rate, "client_wall_seconds": wall,
                "server_ms": latency_json(&bulk_server_ms),
            },
        }));
    }
    let p3 = |xs: &[f64]| {
        let p = percentiles(xs, &[50.0, 90.0, 100.0]);
        format!("p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms", p[0], p[1], p[2])
    };
    let submit_rate = s.ids.len() as f64 / s.elapsed.as_secs_f64().max(1e-9);
    let text = format!(
        "Serial ({serial} jobs, {serial_failed} failed)\n{}\nBulk ({jobs} jobs, {concurrency} in flight)\n{}",
        key_values(&[
            ("  Server (submitted_at to finished_at)", p3(&server_ms)),
            ("  Client (POST to terminal state seen)", p3(&client_ms)),
        ]),
        key_values(&[
            ("  Submitted", format!("{} in {:.2}s ({submit_rate:.0}/s, {} errors)", s.ids.len(), s.elapsed.as_secs_f64(), s.errors)),
            ("  Finished", format!("{} ({bulk_failed} failed) in {span:.2}s: {rate:.0} jobs/s", done.len())),
            ("  Latency (server)", p3(&bulk_server_ms)),
            ("  Client wall time", format!("{wall:.2}s from first submit to all seen finished")),
        ]),
    );
    output::print(&text)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rng_is_deterministic_and_seeded() {
        let a: Vec<u64> = (0..5)
            .scan(XorShift::new(1), |r, _| Some(r.next_u64()))
            .collect();
        let b: Vec<u64> = (0..5)
            .scan(XorShift::new(1), |r, _| Some(r.next_u64()))
            .collect();
        let c: Vec<u64> = (0..5)
            .scan(XorShift::new(2), |r, _| Some(r.next_u64()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut r = XorShift::new(0);
        assert!((0..1000)
            .map(|_| r.range(2, 4))
            .all(|x| (2..=4).contains(&x)));
    }

    #[test]
    fn the_synthetic_mix_has_every_shape_and_schedules() {
        let snap = synthetic_snapshot_for(20, 8, 2000, 7, 3);
        assert_eq!(snap.nodes.len(), 20);
        assert_eq!(snap.nodes[0].gpus.len(), 8);
        let gangs = snap.queue.iter().filter(|j| j.replicas > 1).count();
        let cpu_only = snap.queue.iter().filter(|j| j.resources.gpu == 0).count();
        assert!(gangs > 20 && gangs < 200, "{gangs} gangs");
        assert!(cpu_only > 300 && cpu_only < 700, "{cpu_only} cpu-only");
        assert_eq!(snap, synthetic_snapshot_for(20, 8, 2000, 7, 3));
        let plan = tessera_scheduler::schedule(&snap, 0);
        assert!(!plan.placements.is_empty());
        assert_eq!(plan.placements.len() + plan.waiting.len(), 2000);
    }
}
