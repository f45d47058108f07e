//! Fleet benchmarks, with the control plane (and the agent) as child
//! processes so that their CPU time and memory can be read from `/proc`:
//!
//! - `tessera bench agents`: a `tessera server` and many simulated agents in
//!   this process (tokio tasks, each with its own WebSocket: join, Register,
//!   Sync, then a heartbeat every interval with jitter); the server's CPU
//!   and RSS while it holds them, against the same server idle.
//! - `tessera bench remote`: a `tessera server` and one real `tessera agent`;
//!   trivial jobs one at a time, submit to started and to finished, against
//!   `tessera up` (the agent in the server's process).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tessera_core::node::{GpuInfo, GpuUsage, Inventory, NodeUsage};
use tessera_core::protocol::{FromAgent, ToAgent};
use tessera_core::Job;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::bench::XorShift;
use crate::client::{Client, ClientConfig};
use crate::output::{self, key_values, now_ms, percentiles, Output};
use crate::Globals;

const GIB: u64 = 1 << 30;

#[derive(Debug, Args)]
pub struct AgentsArgs {
    /// Simulated agents
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    /// How often the agents heartbeat (the server's --heartbeat)
    #[arg(long, value_parser = crate::duration_ms, default_value = "5s", value_name = "DURATION")]
    pub heartbeat: u64,
    /// The measurement window; the idle server is measured as long first
    #[arg(long, value_parser = crate::duration_ms, default_value = "60s", value_name = "DURATION")]
    pub duration: u64,
    /// The `tessera` binary to run the server with [default: this one]
    #[arg(long, value_name = "PATH")]
    pub server_bin: Option<PathBuf>,
    /// Agents joining and connecting at once while they come up
    #[arg(long, default_value_t = 32)]
    pub connect_concurrency: usize,
    /// Send heartbeats alone, without the live usage report (CPU, memory,
    /// 8 GPUs) that agents send with every heartbeat
    #[arg(long)]
    pub no_usage: bool,
}

#[derive(Debug, Args)]
pub struct RemoteArgs {
    /// Jobs to time, one at a time, on each setup
    #[arg(long, default_value_t = 200)]
    pub jobs: usize,
    /// Untimed jobs first, on each setup
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// The `tessera` binary to run the server and the agent with [default: this one]
    #[arg(long, value_name = "PATH")]
    pub server_bin: Option<PathBuf>,
    /// Skip the `tessera up` baseline
    #[arg(long)]
    pub no_baseline: bool,
}

// ---------- /proc ----------

/// utime + stime, in clock ticks, from the text of `/proc/<pid>/stat`. The
/// command name (field 2) may hold spaces and parentheses, so fields are
/// counted from the last `)`: utime and stime are fields 14 and 15.
pub fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `kB` field of `/proc/<pid>/status` (e.g. `VmRSS`), in MiB.
pub fn status_mib(status: &str, field: &str) -> Option<f64> {
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// CPU time as a percentage of one core over a wall-clock interval.
pub fn cpu_percent(ticks: u64, clk_tck: u64, wall: Duration) -> f64 {
    let secs = wall.as_secs_f64();
    if secs <= 0.0 || clk_tck == 0 {
        return 0.0;
    }
    ticks as f64 / clk_tck as f64 / secs * 100.0
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 where that fails).
fn clk_tck() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

fn proc_ticks(pid: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    stat_cpu_ticks(&text).ok_or_else(|| anyhow!("cannot parse {path}"))
}

fn proc_mib(pid: &str, field: &str) -> Option<f64> {
    status_mib(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        field,
    )
}

/// What a process used over a window.
#[derive(Debug, Clone, Copy)]
struct Usage {
    cpu_percent: f64,
    cpu_seconds: f64,
    rss_mb: f64,
    peak_rss_mb: f64,
    /// The same for this process (the benchmark's own side).
    own_cpu_percent: f64,
}

/// Measures `pid` (and this process) over `window`.
async fn measure(pid: u32, window: Duration, hz: u64) -> Result<Usage> {
    let pid = pid.to_string();
    let (t0, own0, start) = (proc_ticks(&pid)?, proc_ticks("self")?, Instant::now());
    tokio::time::sleep(window).await;
    let (t1, own1, wall) = (proc_ticks(&pid)?, proc_ticks("self")?, start.elapsed());
    Ok(Usage {
        cpu_percent: cpu_percent(t1 - t0, hz, wall),
        cpu_seconds: (t1 - t0) as f64 / hz as f64,
        rss_mb: proc_mib(&pid, "VmRSS").unwrap_or(0.0),
        peak_rss_mb: proc_mib(&pid, "VmHWM").unwrap_or(0.0),
        own_cpu_percent: cpu_percent(own1 - own0, hz, wall),
    })
}

// ---------- child processes ----------

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Result<Scratch> {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "tessera-bench-{tag}-{}-{nanos:x}",
            std::process::id()
        ));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch(dir))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `tessera` child process with its own home; killed if dropped.
struct Proc {
    what: String,
    child: tokio::process::Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(bin: &Path, args: &[&str], home: &Path, env: &[(&str, &str)]) -> Result<Proc> {
        let what = format!("tessera {}", args.first().copied().unwrap_or(""));
        let log = home.with_extension("log");
        let out = std::fs::File::create(&log)?;
        let mut cmd = tokio::process::Command::new(bin);
        cmd.args(args)
            .env("TESSERA_HOME", home)
            .env_remove("TESSERA_URL")
            .env_remove("TESSERA_TOKEN")
            .env_remove("TESSERA_JOIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Proc { what, child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Fails, with the end of its log, if the process has exited.
    fn check(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("{} exited ({status}):\n{}", self.what, tail.join("\n"));
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 10 s.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.kill().await;
            }
        }
    }
}

/// A control plane started as a child process, and a client for it.
struct Server {
    proc: Proc,
    url: String,
    client: Client,
}

impl Server {
    /// Starts `tessera <args>` on `home` and waits until it writes its URL.
    async fn start(bin: &Path, home: &Path, args: &[&str]) -> Result<Server> {
        let mut proc = Proc::spawn(bin, args, home, &[])?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = loop {
            proc.check()?;
            let config = std::fs::read_to_string(home.join("config")).unwrap_or_default();
            if let Some(url) = config
                .lines()
                .find_map(|l| l.strip_prefix("url"))
                .map(|r| r.trim_start().trim_start_matches('=').trim().to_string())
                .filter(|u| !u.is_empty())
            {
                break url;
            }
            if Instant::now() > deadline {
                bail!("{} did not start within 30 s", proc.what);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let token = std::fs::read_to_string(home.join("admin.token"))
            .context("reading the server's admin token")?
            .trim()
            .to_string();
        let client = Client::new(ClientConfig {
            url: url.clone(),
            token,
        })?;
        Ok(Server { proc, url, client })
    }

    async fn join_token(&self, uses: usize) -> Result<String> {
        let created: Value = self
            .client
            .post_json(
                "/v1/join-tokens",
                &json!({ "name": "bench", "uses": uses as u64 }),
            )
            .await?;
        created["token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no token in {created}"))
    }

    /// Names of the nodes in state `ready`.
    async fn ready_nodes(&self) -> Result<Vec<String>> {
        let nodes: Value = self.client.get("/v1/nodes", &[]).await?;
        Ok(nodes["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["state"] == "ready")
            .filter_map(|n| n["name"].as_str().map(str::to_string))
            .collect())
    }
}

fn bin_of(server_bin: Option<PathBuf>) -> Result<PathBuf> {
    match server_bin {
        Some(p) => Ok(p),
        None => std::env::current_exe().context("finding this binary"),
    }
}

// ---------- tessera bench agents ----------

#[derive(Default)]
struct SimStats {
    connected: AtomicU64,
    heartbeats: AtomicU64,
    commands: AtomicU64,
    disconnects: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

struct Sim {
    base: String,
    ws_url: String,
    token: String,
    http: reqwest::Client,
    gate: tokio::sync::Semaphore,
    stats: SimStats,
    stop: tokio::sync::watch::Receiver<bool>,
    usage: bool,
}

/// A machine as a real agent would report it: 64 cores, 512 GiB, 8 H100s.
fn sim_inventory(i: usize, node: &str) -> Inventory {
    let mut rng = XorShift::new(0x7e55_e4a0 ^ i as u64);
    let gpus = (0..8)
        .map(|index| GpuInfo {
            index,
            uuid: format!(
                "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                rng.next_u64() as u32,
                rng.next_u64() as u16,
                rng.next_u64() as u16,
                rng.next_u64() as u16,
                rng.next_u64() & 0xffff_ffff_ffff
            ),
            model: "NVIDIA H100 80GB HBM3".into(),
            memory_bytes: 81_559 << 20,
            healthy: true,
        })
        .collect();
    Inventory {
        name: node.to_string(),
        cpu_milli: 64_000,
        memory_bytes: 512 * GIB,
        gpus,
        gpu_source: "nvml".into(),
        limits_enforced: true,
        limits_note: "cgroup v2 (cpu.max, memory.max)".into(),
        labels: [
            ("rack".to_string(), format!("r{:03}", i / 40)),
            ("zone".to_string(), "bench".to_string()),
        ]
        .into(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
    }
}

fn frame(msg: &FromAgent) -> Message {
    Message::Text(
        serde_json::to_string(msg)
            .expect("protocol messages serialise")
            .into(),
    )
}

/// A usage report as a real agent sends it with every heartbeat: the whole
/// machine's CPU and memory in use and each GPU's telemetry.
fn usage_frame(node: &str, rng: &mut XorShift) -> Message {
    let gpus = (0..8)
        .map(|index| GpuUsage {
            index,
            utilization_percent: Some(rng.range(0, 100) as u32),
            memory_used_bytes: Some(rng.range(0, 80) * GIB),
            temperature_celsius: Some(rng.range(30, 80) as u32),
            power_watts: Some(rng.range(60, 700) as f64),
            ecc_uncorrected_volatile: Some(0),
            healthy: true,
        })
        .collect();
    frame(&FromAgent::Usage {
        node: node.to_string(),
        usage: NodeUsage {
            at: now_ms(),
            cpu_used_milli: rng.range(0, 64_000),
            memory_used_bytes: rng.range(1, 512) * GIB,
            gpus,
        },
    })
}

async fn sim_agent(sim: Arc<Sim>, i: usize) {
    if let Err(e) = sim_agent_run(&sim, i).await {
        sim.stats.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = sim.stats.first_error.lock().expect("stats lock");
        first.get_or_insert_with(|| format!("agent {i}: {e:#}"));
    }
}

/// One simulated agent: the real protocol, no executor.
async fn sim_agent_run(sim: &Sim, i: usize) -> Result<()> {
    let node = format!("sim-{i:05}");
    let gate = sim.gate.acquire().await?;
    let resp = sim
        .http
        .post(format!("{}/v1/agents/join", sim.base))
        .json(&json!({ "token": sim.token, "node": node }))
        .send()
        .await
        .context("joining")?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("joining failed ({status}): {body}");
    }
    let credential = body["credential"]
        .as_str()
        .ok_or_else(|| anyhow!("no credential in {body}"))?;
    let mut req = sim.ws_url.as_str().into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {credential}").parse()?);
    // Small buffers keep a thousand connections cheap on this side.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(config), true)
        .await
        .context("connecting")?;
    let heartbeat = match ws.next().await {
        Some(Ok(Message::Text(t))) => match serde_json::from_str::<ToAgent>(t.as_str())? {
            ToAgent::Welcome { heartbeat_ms, .. } => Duration::from_millis(heartbeat_ms.max(1)),
            other => bail!("expected a welcome, got {other:?}"),
        },
        other => bail!("expected a welcome, got {other:?}"),
    };
    ws.send(frame(&FromAgent::Register(sim_inventory(i, &node))))
        .await?;
    ws.send(frame(&FromAgent::Sync {
        node: node.clone(),
        running: Vec::new(),
    }))
    .await?;
    drop(gate);
    sim.stats.connected.fetch_add(1, Ordering::Relaxed);
    // The first heartbeat at a random point of the interval, so that a
    // thousand agents do not beat in step; then every interval ±5%.
    let mut rng = XorShift::new(i as u64 + 1);
    let mut next =
        tokio::time::Instant::now() + heartbeat.mul_f64(rng.range(0, 1000) as f64 / 1000.0);
    let mut stop = sim.stop.clone();
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(_))) => {
                    sim.stats.commands.fetch_add(1, Ordering::Relaxed);
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    sim.stats.disconnects.fetch_add(1, Ordering::Relaxed);
                    bail!("the server closed the connection");
                }
                // Pings: tungstenite answers them itself.
                Some(Ok(_)) => {}
            },
            _ = tokio::time::sleep_until(next) => {
                ws.send(frame(&FromAgent::Heartbeat { node: node.clone(), at: now_ms() })).await?;
                if sim.usage {
                    ws.send(usage_frame(&node, &mut rng)).await?;
                }
                sim.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                next += heartbeat.mul_f64(0.95 + rng.range(0, 100) as f64 / 1000.0);
            }
            _ = stop.changed() => {
                let _ = ws.close(None).await;
                return Ok(());
            }
        }
    }
}

pub async fn agents(g: &Globals, a: AgentsArgs) -> Result<()> {
    if a.heartbeat == 0 || a.duration == 0 {
        bail!("--heartbeat and --duration must be more than zero");
    }
    let bin = bin_of(a.server_bin.clone())?;
    let hz = clk_tck();
    let window = Duration::from_millis(a.duration);
    let heartbeat = Duration::from_millis(a.heartbeat);
    let scratch = Scratch::new("agents")?;
    let hb_arg = format!("{}ms", a.heartbeat);
    let server = Server::start(
        &bin,
        &scratch.path("server"),
        &["server", "--listen", "127.0.0.1:0", "--heartbeat", &hb_arg],
    )
    .await?;
    match agents_with(&server, &a, hz, window, heartbeat).await {
        Ok((report, stop)) => {
            // Let the agents go first, so the server sees them leave.
            stop.send_replace(true);
            tokio::time::sleep(Duration::from_millis(500)).await;
            server.proc.stop().await;
            print_agents(g.output, &report)
        }
        Err(e) => {
            server.proc.stop().await;
            Err(e)
        }
    }
}

async fn agents_with(
    server: &Server,
    a: &AgentsArgs,
    hz: u64,
    window: Duration,
    heartbeat: Duration,
) -> Result<(Value, tokio::sync::watch::Sender<bool>)> {
    let pid = server.proc.pid();
    eprintln!(
        "server {} (pid {pid}); measuring it idle for {:.0} s",
        server.url,
        window.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = measure(pid, window, hz).await?;

    let token = server.join_token(a.agents.max(1)).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sim = Arc::new(Sim {
        base: server.url.clone(),
        ws_url: format!(
            "ws://{}/v1/agents/connect",
            server.url.trim_start_matches("http://")
        ),
        token,
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(a.connect_concurrency.max(1))
            .build()?,
        gate: tokio::sync::Semaphore::new(a.connect_concurrency.max(1)),
        stats: SimStats::default(),
        stop: stop_rx,
        usage: !a.no_usage,
    });
    eprintln!("connecting {} simulated agents", a.agents);
    let start = Instant::now();
    let cpu0 = proc_ticks(&pid.to_string())?;
    for i in 0..a.agents {
        tokio::spawn(sim_agent(sim.clone(), i));
    }
    // Until the API shows every node ready, or every agent connected or failed.
    let deadline = start + Duration::from_secs(60) + Duration::from_millis(100 * a.agents as u64);
    let mut ready;
    let connect_all = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        ready = server
            .ready_nodes()
            .await?
            .iter()
            .filter(|n| n.starts_with("sim-"))
            .count();
        if ready >= a.agents {
            break Some(start.elapsed());
        }
        let errors = sim.stats.errors.load(Ordering::Relaxed) as usize;
        let connected = sim.stats.connected.load(Ordering::Relaxed) as usize;
        if errors > 0 && errors + connected >= a.agents {
            eprintln!(
                "{errors} agents failed; first: {}",
                sim.stats
                    .first_error
                    .lock()
                    .expect("stats lock")
                    .as_deref()
                    .unwrap_or("?")
            );
            break None;
        }
        if Instant::now() > deadline {
            eprintln!("not every agent was ready in time: {ready} of {}", a.agents);
            break None;
        }
    };
    let connect_cpu_s = (proc_ticks(&pid.to_string())? - cpu0) as f64 / hz as f64;
    if let Some(t) = connect_all {
        eprintln!(
            "{} agents ready in {:.2} s; letting heartbeats settle for {:.0} s, then measuring for {:.0} s",
            a.agents,
            t.as_secs_f64(),
            heartbeat.as_secs_f64(),
            window.as_secs_f64()
        );
    }
    tokio::time::sleep(heartbeat).await;
    let beats0 = sim.stats.heartbeats.load(Ordering::Relaxed);
    let disc0 = sim.stats.disconnects.load(Ordering::Relaxed);
    let busy = measure(pid, window, hz).await?;
    let beats = sim.stats.heartbeats.load(Ordering::Relaxed) - beats0;
    let disconnects = sim.stats.disconnects.load(Ordering::Relaxed) - disc0;
    let ready_after = server
        .ready_nodes()
        .await?
        .iter()
        .filter(|n| n.starts_with("sim-"))
        .count();
    let secs = window.as_secs_f64();
    let over_idle_s = (busy.cpu_seconds - idle.cpu_seconds).max(0.0);
    let n = a.agents.max(1) as f64;
    let report = json!({
        "agents": a.agents,
        "heartbeat_s": heartbeat.as_secs_f64(),
        "usage_with_heartbeat": !a.no_usage,
        "duration_s": secs,
        "connect_all_s": connect_all.map(|d| d.as_secs_f64()),
        "agents_ready": ready,
        "server_cpu_percent_of_one_core": busy.cpu_percent,
        "server_rss_mb": busy.rss_mb,
        "server_peak_rss_mb": busy.peak_rss_mb,
        "idle": {
            "server_cpu_percent_of_one_core": idle.cpu_percent,
            "server_rss_mb": idle.rss_mb,
        },
        "cpu_percent_over_idle": busy.cpu_percent - idle.cpu_percent,
        "cpu_ratio_to_idle": if idle.cpu_percent > 0.0 { Some(busy.cpu_percent / idle.cpu_percent) } else { None },
        "rss_mb_over_idle": busy.rss_mb - idle.rss_mb,
        "rss_kib_per_agent": (busy.rss_mb - idle.rss_mb) * 1024.0 / n,
        "heartbeats_in_window": beats,
        "heartbeats_per_s": beats as f64 / secs,
        "server_cpu_us_per_heartbeat": if beats > 0 { Some(over_idle_s * 1e6 / beats as f64) } else { None },
        "server_cpu_s_while_connecting": connect_cpu_s,
        "agents_ready_after_window": ready_after,
        "disconnects_in_window": disconnects,
        "agent_errors": sim.stats.errors.load(Ordering::Relaxed),
        "first_error": sim.stats.first_error.lock().expect("stats lock").clone(),
        "commands_received": sim.stats.commands.load(Ordering::Relaxed),
        "client_cpu_percent_of_one_core": busy.own_cpu_percent,
        "clk_tck": hz,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "target_cpu_percent_of_one_core": 10.0,
        "target_met": connect_all.is_some() && ready_after == a.agents && busy.cpu_percent < 10.0,
    });
    Ok((report, stop_tx))
}

fn print_agents(out: Output, r: &Value) -> Result<()> {
    if out == Output::Json {
        return output::print_json(r);
    }
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    output::print(&key_values(&[
        (
            "Agents",
            format!(
                "{} ({} ready after the window, {} errors), heartbeat every {} s",
                r["agents"],
                r["agents_ready_after_window"],
                r["agent_errors"],
                f("heartbeat_s")
            ),
        ),
        (
            "Connect all",
            r["connect_all_s"]
                .as_f64()
                .map(|s| format!("{s:.2} s"))
                .unwrap_or_else(|| "not all connected".into()),
        ),
        (
            "Server CPU",
            format!(
                "{:.2}% of one core ({:.2}% idle, +{:.2}%); {:.0} µs per heartbeat",
                f("server_cpu_percent_of_one_core"),
                r["idle"]["server_cpu_percent_of_one_core"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
                f("cpu_percent_over_idle"),
                f("server_cpu_us_per_heartbeat")
            ),
        ),
        (
            "Server RSS",
            format!(
                "{:.1} MiB ({:.1} MiB idle; {:.0} KiB per agent)",
                f("server_rss_mb"),
                r["idle"]["server_rss_mb"].as_f64().unwrap_or(f64::NAN),
                f("rss_kib_per_agent")
            ),
        ),
        (
            "Heartbeats",
            format!(
                "{} in {} s ({:.0}/s)",
                r["heartbeats_in_window"],
                f("duration_s"),
                f("heartbeats_per_s")
            ),
        ),
        (
            "Bench side CPU",
            format!("{:.2}% of one core", f("client_cpu_percent_of_one_core")),
        ),
    ]))?;
    Ok(())
}

// ---------- tessera bench remote ----------

/// Per-job times of trivial jobs run one at a time.
struct Serial {
    scheduled_ms: Vec<f64>,
    started_ms: Vec<f64>,
    finished_ms: Vec<f64>,
    client_ms: Vec<f64>,
    failed: usize,
}

/// Submits `true` one at a time and polls each job every 2 ms until it ends.
async fn serial_jobs(client: &Client, jobs: usize, warmup: usize) -> Result<Serial> {
    let spec = json!({
        "name": "bench-remote", "command": ["true"],
        "resources": {"cpu": "100m", "memory": "16Mi"},
    });
    let mut s = Serial {
        scheduled_ms: Vec::new(),
        started_ms: Vec::new(),
        finished_ms: Vec::new(),
        client_ms: Vec::new(),
        failed: 0,
    };
    for i in 0..warmup + jobs {
        let t0 = Instant::now();
        let created: Value = client.post_json("/v1/jobs", &spec).await?;
        let id = created["id"]
            .as_u64()
            .ok_or_else(|| anyhow!("no job id in {created}"))?;
        let path = format!("/v1/jobs/{id}");
        let job = loop {
            let job: Job = client.get(&path, &[]).await?;
            if job.state.is_terminal() {
                break job;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!(
                    "job {id} did not finish in 30 s (still {})",
                    job.state.as_str()
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let wall = t0.elapsed().as_secs_f64() * 1000.0;
        if i < warmup {
            continue;
        }
        let since = |t: Option<u64>| t.map(|t| t.saturating_sub(job.submitted_at) as f64);
        if job.state != tessera_core::JobState::Succeeded {
            s.failed += 1;
        }
        s.scheduled_ms.extend(since(job.scheduled_at));
        s.started_ms.extend(since(job.started_at));
        s.finished_ms.extend(since(job.finished_at));
        s.client_ms.push(wall);
    }
    Ok(s)
}

fn lat(xs: &[f64]) -> Value {
    let p = percentiles(xs, &[50.0, 90.0, 99.0, 100.0]);
    json!({ "p50": p[0], "p90": p[1], "p99": p[2], "max": p[3], "n": xs.len() })
}

fn serial_json(s: &Serial) -> Value {
    json!({
        "failed": s.failed,
        "submit_to_scheduled_ms": lat(&s.scheduled_ms),
        "submit_to_started_ms": lat(&s.started_ms),
        "submit_to_finished_ms": lat(&s.finished_ms),
        "client_post_to_seen_finished_ms": lat(&s.client_ms),
    })
}

/// Waits until `want` nodes are ready, minding the given processes.
async fn wait_nodes(server: &mut Server, want: usize, agent: Option<&mut Proc>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut agent = agent;
    loop {
        server.proc.check()?;
        if let Some(a) = agent.as_mut() {
            a.check()?;
        }
        if server.ready_nodes().await?.len() >= want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no node became ready within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn remote_setup(bin: &Path, scratch: &Scratch, a: &RemoteArgs) -> Result<Value> {
    let mut server = Server::start(
        bin,
        &scratch.path("server"),
        &["server", "--listen", "127.0.0.1:0"],
    )
    .await?;
    let run = async {
        let token = server.join_token(1).await?;
        let mut agent = Proc::spawn(
            bin,
            &[
                "agent",
                "--server",
                &server.url,
                "--name",
                "bench-remote",
                "--no-cgroups",
            ],
            &scratch.path("agent"),
            &[("TESSERA_JOIN_TOKEN", &token)],
        )?;
        let r = async {
            wait_nodes(&mut server, 1, Some(&mut agent)).await?;
            eprintln!(
                "remote: {} jobs (after {} untimed), one at a time",
                a.jobs, a.warmup
            );
            serial_jobs(&server.client, a.jobs, a.warmup).await
        }
        .await;
        agent.stop().await;
        r
    };
    let r = run.await;
    server.proc.stop().await;
    Ok(serial_json(&r?))
}

async fn local_setup(bin: &Path, scratch: &Scratch, a: &RemoteArgs) -> Result<Value> {
    let mut server = Server::start(
        bin,
        &scratch.path("up"),
        &["up", "--listen", "127.0.0.1:0", "--no-cgroups"],
    )
    .await?;
    let r = async {
        wait_nodes(&mut server, 1, None).await?;
        eprintln!(
            "baseline (tessera up): {} jobs (after {} untimed), one at a time",
            a.jobs, a.warmup
        );
        serial_jobs(&server.client, a.jobs, a.warmup).await
    }
    .await;
    server.proc.stop().await;
    Ok(serial_json(&r?))
}

pub async fn remote(g: &Globals, a: RemoteArgs) -> Result<()> {
    if a.jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    let bin = bin_of(a.server_bin.clone())?;
    let scratch = Scratch::new("remote")?;
    let remote = remote_setup(&bin, &scratch, &a).await?;
    let local = if a.no_baseline {
        Value::Null
    } else {
        local_setup(&bin, &scratch, &a).await?
    };
    let p50 = |v: &Value, k: &str| v[k]["p50"].as_f64();
    let ratio = |k: &str| match (p50(&remote, k), p50(&local, k)) {
        (Some(r), Some(l)) if l > 0.0 => Some(r / l),
        _ => None,
    };
    let started = p50(&remote, "submit_to_started_ms");
    let report = json!({
        "jobs": a.jobs,
        "remote": remote,
        "local": local,
        "p50_ratio_remote_to_local": {
            "submit_to_started": ratio("submit_to_started_ms"),
            "submit_to_finished": ratio("submit_to_finished_ms"),
            "client_post_to_seen_finished": ratio("client_post_to_seen_finished_ms"),
        },
        "target_submit_to_started_p50_ms": 20.0,
        "target_met": started.is_some_and(|p| p < 20.0),
    });
    if g.output == Output::Json {
        return output::print_json(&report);
    }
    let line = |v: &Value, k: &str| {
        format!(
            "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms",
            v[k]["p50"].as_f64().unwrap_or(f64::NAN),
            v[k]["p90"].as_f64().unwrap_or(f64::NAN),
            v[k]["p99"].as_f64().unwrap_or(f64::NAN)
        )
    };
    let mut pairs = vec![
        (
            "Remote: submit to started",
            line(&report["remote"], "submit_to_started_ms"),
        ),
        (
            "Remote: submit to finished",
            line(&report["remote"], "submit_to_finished_ms"),
        ),
        (
            "Remote: POST to seen finished",
            line(&report["remote"], "client_post_to_seen_finished_ms"),
        ),
    ];
    if !a.no_baseline {
        pairs.extend([
            (
                "Local: submit to started",
                line(&report["local"], "submit_to_started_ms"),
            ),
            (
                "Local: submit to finished",
                line(&report["local"], "submit_to_finished_ms"),
            ),
            (
                "Local: POST to seen finished",
                line(&report["local"], "client_post_to_seen_finished_ms"),
            ),
        ]);
    }
    output::print(&key_values(&pairs))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_is_read_past_the_command_name() {
        // Field 2 may hold spaces and parentheses.
        let stat = "4242 (tessera (x) y) S 1 4242 4242 0 -1 4194560 1200 0 0 0 \
                    250 75 3 4 20 0 9 0 123456 1000000 5000 18446744073709551615";
        assert_eq!(stat_cpu_ticks(stat), Some(325));
        assert_eq!(stat_cpu_ticks("4242 (short) S 1"), None);
        assert_eq!(stat_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn status_fields_are_read_in_mib() {
        let status = "Name:\ttessera\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(status_mib(status, "VmRSS"), Some(10.0));
        assert_eq!(status_mib(status, "VmHWM"), Some(20.0));
        assert_eq!(status_mib(status, "VmSwap"), None);
    }

    #[test]
    fn cpu_percent_is_of_one_core() {
        // 600 ticks at 100 Hz over 60 s: 6 s of CPU, 10% of one core.
        assert!((cpu_percent(600, 100, Duration::from_secs(60)) - 10.0).abs() < 1e-9);
        assert_eq!(cpu_percent(5, 100, Duration::ZERO), 0.0);
    }

    #[test]
    fn simulated_inventories_look_real_and_differ() {
        let a = sim_inventory(0, "sim-00000");
        let b = sim_inventory(1, "sim-00001");
        assert_eq!(a.gpus.len(), 8);
        assert_eq!(a.cpu_milli, 64_000);
        assert_eq!(a.gpus[0].uuid.len(), "GPU-".len() + 36);
        assert_ne!(a.gpus[0].uuid, b.gpus[0].uuid);
        assert_ne!(a.gpus[0].uuid, a.gpus[1].uuid);
    }
}
