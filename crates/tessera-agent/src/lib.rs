//! Tessera's node agent: it reports what a machine has and runs replicas on it.
//!
//! This crate owns inventory (CPU cores, memory, GPUs through NVML or
//! `nvidia-smi`), the process executor (one process group per replica, its
//! own working directory, logs to files that outlive restarts, SIGTERM then
//! SIGKILL on cancel or timeout) and cgroup limits. It speaks only the
//! messages of [`tessera_core::protocol`]: it receives [`ToAgent`] and sends
//! [`FromAgent`]. It knows nothing of HTTP, the store or scheduling.
//!
//! Files under the agent's home:
//! - `logs/<job>/<attempt>/<replica>.log` — combined stdout and stderr;
//! - `work/<job>.<attempt>.<replica>/` — the default working directory;
//! - `agent/running/<job>.<attempt>.<replica>` — pid and start time of live
//!   replicas, so a restarted agent can find what an earlier one left behind.

pub mod cgroup;
pub mod container;
mod fetch;
pub mod gpu;
pub mod remote;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tessera_core::node::Inventory;
use tessera_core::protocol::{ExitCause, FromAgent, ReplicaKey, StartReplica, ToAgent};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

pub use cgroup::Cgroups;

/// How often an agent says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// How an agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Node name; defaults to the host name.
    pub name: Option<String>,
    /// Where logs, working directories and agent state live.
    pub home: PathBuf,
    /// Time between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    pub labels: BTreeMap<String, String>,
    /// Override the detected CPU count (millicores) or memory (bytes).
    pub cpu_milli: Option<u64>,
    pub memory_bytes: Option<u64>,
    /// Read GPUs from this `nvidia-smi -q -x` output instead of probing.
    pub gpu_xml: Option<PathBuf>,
    /// Enforce limits with cgroups where possible.
    pub cgroups: bool,
    /// How often to say it is alive.
    pub heartbeat: Duration,
    /// Give every replica a watchdog that stops it once the lease in
    /// [`lease_path`] has run out — so work stops on time even if this
    /// agent process has died (a remote agent; see [`remote`]).
    pub watchdog: bool,
}

impl AgentConfig {
    pub fn new(home: impl Into<PathBuf>) -> AgentConfig {
        AgentConfig {
            name: None,
            home: home.into(),
            kill_grace: Duration::from_secs(10),
            labels: BTreeMap::new(),
            cpu_milli: None,
            memory_bytes: None,
            gpu_xml: None,
            cgroups: true,
            heartbeat: HEARTBEAT,
            watchdog: false,
        }
    }
}

/// Writes `text` to `path` with mode 0600, atomically (a temporary file,
/// synced, then renamed): tokens, credentials.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Path of one replica's log file under `home`.
pub fn log_path(home: &Path, key: ReplicaKey) -> PathBuf {
    home.join("logs")
        .join(key.job_id.to_string())
        .join(key.attempt.to_string())
        .join(format!("{}.log", key.replica))
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn total_memory() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Discovers what this machine has.
pub fn inventory(config: &AgentConfig, cgroups: &Cgroups) -> Inventory {
    let cpu_milli = config.cpu_milli.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1)
            * 1000
    });
    let (gpus, source) = match &config.gpu_xml {
        Some(path) => match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|x| gpu::parse_nvidia_smi_xml(&x).map_err(|e| e.to_string()))
        {
            Ok(g) => (g, "nvidia-smi"),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot read GPU inventory file");
                (Vec::new(), "none")
            }
        },
        None => gpu::discover(),
    };
    Inventory {
        name: config.name.clone().unwrap_or_else(hostname),
        cpu_milli,
        memory_bytes: config.memory_bytes.unwrap_or_else(total_memory),
        gpus,
        gpu_source: source.to_string(),
        limits_enforced: cgroups.enforced(),
        limits_note: cgroups.note(),
        labels: config.labels.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// Start time of a process in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`), to tell a process from a later one with the same pid.
fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    // A zombie has ended; only its parent's `wait` is missing.
    if after.starts_with('Z') || after.starts_with('X') {
        return None;
    }
    after.split_whitespace().nth(19)?.parse().ok()
}

fn running_dir(home: &Path) -> PathBuf {
    home.join("agent").join("running")
}

/// The replica a process belongs to, from the `TESSERA_*` variables its
/// agent gave it (`/proc/<pid>/environ`) — only when that agent's home is
/// `home`: agents on one machine number
/// their replicas alike. (A process tagged before homes were part of the
/// tags counts as any home's.)
fn replica_of_process(pid: u32, home: &Path) -> Option<ReplicaKey> {
    use std::os::unix::ffi::OsStrExt;
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let (mut job, mut attempt, mut replica) = (None, None, None);
    for var in env.split(|b| *b == 0) {
        if let Some(v) = var.strip_prefix(b"TESSERA_AGENT_HOME=") {
            if v != home.as_os_str().as_bytes() {
                return None;
            }
            continue;
        }
        let Ok(var) = std::str::from_utf8(var) else {
            continue;
        };
        if let Some(v) = var.strip_prefix("TESSERA_JOB_ID=") {
            job = v.parse().ok();
        } else if let Some(v) = var.strip_prefix("TESSERA_ATTEMPT=") {
            attempt = v.parse().ok();
        } else if let Some(v) = var.strip_prefix("TESSERA_REPLICA=") {
            replica = v.parse().ok();
        }
    }
    Some(ReplicaKey {
        job_id: job?,
        attempt: attempt?,
        replica: replica?,
    })
}

fn parse_key(name: &str) -> Option<ReplicaKey> {
    let mut parts = name.split('.').map(|p| p.parse::<u64>().ok());
    let (job_id, attempt, replica) = (parts.next()??, parts.next()??, parts.next()??);
    if parts.next().is_some() {
        return None;
    }
    Some(ReplicaKey {
        job_id,
        attempt: u32::try_from(attempt).ok()?,
        replica: u32::try_from(replica).ok()?,
    })
}

/// Kills replicas that an earlier agent on this home left running (after a
/// crash of the process that hosted it) and forgets them. A replica is found
/// three ways, so none escapes: its recorded process group (when the leader
/// is still the same process), every process carrying its `TESSERA_*` tags
/// (children that left the group too), and its cgroup. Returns the keys.
pub fn reap_orphans(home: &Path, cgroups: &Cgroups) -> Vec<ReplicaKey> {
    let dir = running_dir(home);
    // Containers carry their replica in labels and need no record.
    let mut reaped = container::reap(home);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return reaped;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let body = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let mut parts = body.split_whitespace();
        let pid = parts.next().and_then(|p| p.parse::<u32>().ok());
        let start = parts.next().and_then(|p| p.parse::<u64>().ok());
        if let (Some(pid), Some(start)) = (pid, start) {
            if proc_start_time(pid) == Some(start) {
                info!(replica = %name, pid, "stopping a replica left running by an earlier agent");
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        if let Some(key) = parse_key(&name) {
            cgroups.kill_all(&name);
            reaped.push(key);
        }
    }
    if !reaped.is_empty() {
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if replica_of_process(pid, home).is_some_and(|k| reaped.contains(&k)) {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
            }
        }
        for key in &reaped {
            cgroups.remove(&key.to_string());
        }
    }
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let _ = std::fs::remove_file(entry.path());
    }
    reaped
}

/// Finds `program` the way `execvp` would, so a missing program is reported
/// as such rather than as an exit code.
fn resolve_program(program: &str, env_path: Option<&str>) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return if executable(&p) {
            Ok(p)
        } else {
            Err(format!(
                "program `{program}` does not exist or is not executable"
            ))
        };
    }
    let path = env_path
        .map(str::to_string)
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(program);
        if executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(format!(
        "program `{program}` was not found in PATH ({path})"
    ))
}

/// The running agent: receives commands, runs replicas, reports back.
pub struct Agent {
    config: AgentConfig,
    cgroups: Cgroups,
    events: mpsc::UnboundedSender<FromAgent>,
    stops: HashMap<ReplicaKey, oneshot::Sender<(u64, String)>>,
    done_tx: mpsc::UnboundedSender<ReplicaKey>,
    done_rx: mpsc::UnboundedReceiver<ReplicaKey>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.cgroups.release_scope();
    }
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("home", &self.config.home)
            .finish()
    }
}

impl Agent {
    /// Prepares an agent: detects cgroups and makes directories. Call
    /// [`Agent::reap_orphans`] before giving it work.
    pub fn new(
        config: AgentConfig,
        events: mpsc::UnboundedSender<FromAgent>,
    ) -> std::io::Result<Agent> {
        // The home exists before its cgroup scope is named from its path.
        std::fs::create_dir_all(running_dir(&config.home))?;
        std::fs::create_dir_all(config.home.join("logs"))?;
        std::fs::create_dir_all(config.home.join("work"))?;
        let cgroups = if config.cgroups {
            Cgroups::detect_for(&config.home)
        } else {
            Cgroups::disabled("disabled by configuration")
        };
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Ok(Agent {
            config,
            cgroups,
            events,
            stops: HashMap::new(),
            done_tx,
            done_rx,
        })
    }

    pub fn inventory(&self) -> Inventory {
        inventory(&self.config, &self.cgroups)
    }

    /// Stops what an earlier agent on the same home left running.
    pub fn reap_orphans(&self) -> Vec<ReplicaKey> {
        reap_orphans(&self.config.home, &self.cgroups)
    }

    /// Takes over the replicas an earlier agent on the same home left
    /// running (a remote agent that crashed or was restarted): each live one
    /// is watched to its end, can be stopped, and keeps its `max_runtime`
    /// deadline; each that ended while no agent watched is reported with the
    /// exit status its wrapper recorded ([`ExitCause::Unknown`] when none
    /// was). Returns the replicas still running. Call before [`Agent::run`].
    pub fn adopt_orphans(&mut self) -> Vec<ReplicaKey> {
        let dir = running_dir(&self.config.home);
        let mut running = Vec::new();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return running;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(key) = parse_key(&name) else {
                continue;
            };
            let body = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let mut parts = body.split_whitespace();
            let pid = parts.next().and_then(|p| p.parse::<u32>().ok());
            let start = parts.next().and_then(|p| p.parse::<u64>().ok());
            let deadline = parts.nth(1).and_then(|p| p.parse::<u64>().ok());
            let alive =
                matches!((pid, start), (Some(pid), Some(st)) if proc_start_time(pid) == Some(st));
            if let (true, Some(pid), Some(start)) = (alive, pid, start) {
                info!(replica = %key, pid, "adopting a replica an earlier agent started");
                self.supervise(key, move |ctx, stop_rx| {
                    watch_adopted(ctx, key, pid, start, deadline, stop_rx)
                });
                running.push(key);
            } else {
                let (code, signal, cause) = recorded_exit(&self.config.home, key);
                info!(replica = %key, ?code, "a replica ended while no agent watched it");
                self.cgroups.kill_all(&key.to_string());
                self.cgroups.remove(&key.to_string());
                let _ = std::fs::remove_file(entry.path());
                let _ = std::fs::remove_file(status_path(&self.config.home, key));
                let workdir = take_workdir_note(&self.config.home, key);
                let _ = self.events.send(FromAgent::Exited {
                    key,
                    code,
                    signal,
                    cause,
                    at: now_ms(),
                    workdir,
                });
            }
        }
        // Containers of this home, running or ended while no agent watched.
        for (key, id) in container::running_containers_blocking(&self.config.home) {
            if self.stops.contains_key(&key) {
                continue;
            }
            info!(replica = %key, container = %id, "adopting a container an earlier agent started");
            self.supervise(key, move |ctx, stop_rx| {
                container::adopt(ctx.home, ctx.grace, key, id, stop_rx, ctx.events)
            });
            running.push(key);
        }
        running.sort();
        running
    }

    /// The replicas this agent runs now (started or adopted, not yet ended).
    pub fn running(&self) -> Vec<ReplicaKey> {
        let mut keys: Vec<ReplicaKey> = self.stops.keys().copied().collect();
        keys.sort();
        keys
    }

    /// Registers, then serves commands until the command channel closes.
    pub async fn run(mut self, mut commands: mpsc::UnboundedReceiver<ToAgent>) {
        let inventory = self.inventory();
        let node = inventory.name.clone();
        let gpu_source = inventory.gpu_source.clone();
        let _ = self.events.send(FromAgent::Register(inventory));
        let usage = tokio::spawn(usage_loop(
            node.clone(),
            gpu_source,
            self.config.gpu_xml.clone(),
            self.config.heartbeat,
            self.events.clone(),
        ));
        let mut heartbeat = tokio::time::interval(self.config.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {
                    let _ = self.events.send(FromAgent::Heartbeat { node: node.clone(), at: now_ms() });
                }
                cmd = commands.recv() => match cmd {
                    Some(ToAgent::Start(start)) => self.start(start),
                    Some(ToAgent::Stop { key, grace_ms, reason }) => {
                        if let Some(stop) = self.stops.remove(&key) {
                            let _ = stop.send((grace_ms, reason));
                        } else {
                            debug!(%key, "stop for a replica that is not running");
                        }
                    }
                    Some(ToAgent::StopAll { grace_ms, reason }) => {
                        for (_, stop) in self.stops.drain() {
                            let _ = stop.send((grace_ms, reason.clone()));
                        }
                    }
                    Some(ToAgent::Welcome { .. }) => {}
                    None => break,
                },
                Some(key) = self.done_rx.recv() => {
                    self.stops.remove(&key);
                }
            }
        }
        usage.abort();
        // The control plane is gone: stop everything we run.
        for (_, stop) in self.stops.drain() {
            let _ = stop.send((
                self.config.kill_grace.as_millis() as u64,
                "agent shutting down".into(),
            ));
        }
    }

    fn start(&mut self, start: StartReplica) {
        self.supervise(start.key, move |ctx, stop_rx| {
            run_replica(ctx, start, stop_rx)
        });
    }

    /// Runs `watch` for replica `key` on its own task: it can be stopped
    /// through `stops`, and is forgotten when `watch` returns.
    fn supervise<F, Fut>(&mut self, key: ReplicaKey, watch: F)
    where
        F: FnOnce(ReplicaCtx, oneshot::Receiver<(u64, String)>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (stop_tx, stop_rx) = oneshot::channel();
        self.stops.insert(key, stop_tx);
        let ctx = ReplicaCtx {
            watchdog: self.config.watchdog,
            home: self.config.home.clone(),
            grace: self.config.kill_grace,
            cgroups: self.cgroups.clone(),
            events: self.events.clone(),
        };
        let done = self.done_tx.clone();
        let fut = watch(ctx, stop_rx);
        tokio::spawn(async move {
            fut.await;
            let _ = done.send(key);
        });
    }
}

struct ReplicaCtx {
    watchdog: bool,
    home: PathBuf,
    grace: Duration,
    cgroups: Cgroups,
    events: mpsc::UnboundedSender<FromAgent>,
}

/// Every replica runs under this small `sh` wrapper, the leader of the
/// replica's process group. It joins the replica's cgroups (when there are
/// any), runs the program in the foreground and writes its exit status to
/// the status file, so that an agent restarted while the replica ran can
/// still learn how it ended. It survives SIGTERM (a handler, not an ignore,
/// so the program keeps the default disposition) and waits for the program
/// to finish its own shutdown; when the program died of a signal, the
/// wrapper re-raises it, so the agent sees what the program saw.
const REPLICA_WRAPPER: &str = r#"s=$TESSERA_STATUS_FILE
if [ -n "$TESSERA_CGROUP_PROCS" ]; then IFS=:; for p in $TESSERA_CGROUP_PROCS; do echo $$ > "$p" || exit 125; done; unset IFS; fi
w=
if [ -n "$TESSERA_LEASE_FILE" ]; then
  lf=$TESSERA_LEASE_FILE; lg=$TESSERA_LEASE_GRACE
  ( trap '' TERM INT HUP
    while sleep 1; do
      d=$(cat "$lf" 2>/dev/null)
      [ "$(date +%s)" -le "${d:-0}" ] && continue
      echo lease > "$s.lease"; kill -TERM 0; sleep "$lg"; kill -KILL 0; exit 0
    done ) </dev/null >/dev/null 2>&1 &
  w=$!
fi
unset TESSERA_CGROUP_PROCS TESSERA_STATUS_FILE TESSERA_LEASE_FILE TESSERA_LEASE_GRACE
trap : TERM INT HUP
"$@"
c=$?
[ -n "$w" ] && kill -KILL $w 2>/dev/null
echo $c > "$s"
trap - TERM INT HUP
if [ $c -gt 128 ] && [ $c -lt 160 ]; then kill -$((c - 128)) $$; fi
exit $c"#;

/// The lease file of a remote agent: the Unix second until which the
/// server's lease holds. Replicas' watchdogs stop them once it has passed.
pub fn lease_path(home: &Path) -> PathBuf {
    home.join("agent").join("lease")
}

/// Where the wrapper of `key` writes the program's exit status.
fn status_path(home: &Path, key: ReplicaKey) -> PathBuf {
    running_dir(home).join(format!("{key}.status"))
}

/// Where the working directory of a live replica is noted, so that an agent
/// that adopts it can still report where its outputs are.
pub(crate) fn workdir_note(home: &Path, key: ReplicaKey) -> PathBuf {
    running_dir(home).join(format!("{key}.workdir"))
}

/// The working directory a replica runs in: the spec's, or a fresh one
/// under the agent's home.
pub fn workdir_of(home: &Path, start: &StartReplica) -> PathBuf {
    match &start.workdir {
        Some(w) => PathBuf::from(w),
        None => home.join("work").join(start.key.to_string()),
    }
}

/// Makes each input appear in `workdir` as a link to its staged, read-only
/// directory. An input this node cannot see is an error naming it.
pub fn link_inputs(
    workdir: &Path,
    inputs: &[tessera_core::protocol::InputMount],
) -> Result<(), String> {
    for input in inputs {
        let target = Path::new(&input.path);
        if !target.is_dir() {
            return Err(format!(
                "input `{}`: its data ({}) is not visible on this node; inputs need a disk shared with the control plane",
                input.name, input.path
            ));
        }
        let link = workdir.join(&input.name);
        match std::fs::read_link(&link) {
            Ok(existing) if existing == target => continue,
            Ok(_) => std::fs::remove_file(&link).map_err(|e| {
                format!(
                    "input `{}`: cannot replace {}: {e}",
                    input.name,
                    link.display()
                )
            })?,
            Err(_) if link.exists() => {
                return Err(format!(
                    "input `{}`: {} already exists in the working directory",
                    input.name,
                    link.display()
                ))
            }
            Err(_) => {}
        }
        std::os::unix::fs::symlink(target, &link).map_err(|e| {
            format!(
                "input `{}`: cannot link {}: {e}",
                input.name,
                link.display()
            )
        })?;
    }
    Ok(())
}

/// The working directory noted for `key`, if any (removing the note).
pub(crate) fn take_workdir_note(home: &Path, key: ReplicaKey) -> Option<String> {
    let path = workdir_note(home, key);
    let dir = std::fs::read_to_string(&path).ok();
    let _ = std::fs::remove_file(&path);
    dir.map(|d| d.trim_end_matches('\n').to_string())
        .filter(|d| !d.is_empty())
}

async fn run_replica(
    ctx: ReplicaCtx,
    start: StartReplica,
    stop_rx: oneshot::Receiver<(u64, String)>,
) {
    if start.image.is_some() {
        return container::run(ctx, start, stop_rx).await;
    }
    let key = start.key;
    let workdir = workdir_of(&ctx.home, &start).display().to_string();
    let exited = |code, signal, cause| FromAgent::Exited {
        key,
        code,
        signal,
        cause,
        at: now_ms(),
        workdir: Some(workdir.clone()),
    };
    // Recorded before the process exists, so a crash at any moment leaves
    // a trace for the next agent to reap by.
    let pidfile = running_dir(&ctx.home).join(key.to_string());
    let _ = std::fs::write(&pidfile, "starting\n");
    match spawn_replica(&ctx, &start) {
        Err(msg) => {
            let _ = std::fs::remove_file(&pidfile);
            warn!(%key, error = %msg, "replica could not start");
            let log = log_path(&ctx.home, key);
            let _ = std::fs::write(&log, format!("tessera: cannot start replica: {msg}\n"));
            let _ = ctx
                .events
                .send(exited(None, None, ExitCause::SpawnFailed(msg)));
        }
        Ok((mut child, cg_name)) => {
            let pid = child.id().unwrap_or(0);
            write_pidfile(&ctx.home, key, pid, now_ms(), start.max_runtime_ms);
            let _ = ctx.events.send(FromAgent::Started {
                key,
                pid,
                at: now_ms(),
            });
            let pgid = Pid::from_raw(pid as i32);
            let deadline = start.max_runtime_ms.map(Duration::from_millis);
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            let mut cause = ExitCause::Exited;
            let status = tokio::select! {
                status = child.wait() => status,
                _ = timer => {
                    cause = ExitCause::TimedOut;
                    terminate(&mut child, pgid, ctx.grace).await
                }
                stop = stop_rx => {
                    let grace = match stop {
                        Ok((grace_ms, reason)) => {
                            debug!(%key, %reason, "stopping replica");
                            Duration::from_millis(grace_ms)
                        }
                        Err(_) => ctx.grace,
                    };
                    cause = ExitCause::Stopped;
                    terminate(&mut child, pgid, grace).await
                }
            };
            // Whatever the leader left behind in its group goes with it.
            let _ = killpg(pgid, Signal::SIGKILL);
            let (code, signal) = match status {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    (s.code(), s.signal())
                }
                Err(e) => {
                    warn!(%key, error = %e, "cannot wait for replica");
                    (None, None)
                }
            };
            if let Some(name) = cg_name {
                if cause == ExitCause::Exited && signal == Some(9) && ctx.cgroups.oom_killed(&name)
                {
                    cause = ExitCause::OutOfMemory;
                }
                let cg = ctx.cgroups.clone();
                let _ = tokio::task::spawn_blocking(move || cg.remove(&name)).await;
            }
            if lease_stopped(&ctx.home, key) {
                cause = ExitCause::Disconnected;
            }
            let _ = std::fs::remove_file(&pidfile);
            let _ = std::fs::remove_file(status_path(&ctx.home, key));
            let _ =
                std::fs::remove_file(status_path(&ctx.home, key).with_extension("status.lease"));
            let _ = std::fs::remove_file(workdir_note(&ctx.home, key));
            let _ = ctx.events.send(exited(code, signal, cause));
        }
    }
}

/// Records a started replica: leader pid, its start time (to tell it from a
/// later process with the same pid), when it started and its deadline.
fn write_pidfile(
    home: &Path,
    key: ReplicaKey,
    pid: u32,
    started_at: u64,
    max_runtime: Option<u64>,
) {
    if let Some(st) = proc_start_time(pid) {
        let deadline = max_runtime
            .map(|m| (started_at + m).to_string())
            .unwrap_or_else(|| "-".into());
        let _ = std::fs::write(
            running_dir(home).join(key.to_string()),
            format!("{pid} {st} {started_at} {deadline}\n"),
        );
    }
}

/// CPU time counters from `/proc/stat`: (busy, total) jiffies.
fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// Memory in use: `MemTotal - MemAvailable`, bytes.
fn memory_used() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    field("MemTotal:").saturating_sub(field("MemAvailable:"))
}

/// Samples the machine's usage every heartbeat and reports it.
async fn usage_loop(
    node: String,
    gpu_source: String,
    gpu_xml: Option<PathBuf>,
    every: Duration,
    events: mpsc::UnboundedSender<FromAgent>,
) {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1);
    let mut prev = cpu_times();
    // GPUs that reported a fatal Xid stay unhealthy in every report.
    let sick: gpu::XidRecord = Default::default();
    if gpu_source == gpu::SOURCE_NVML {
        gpu::watch_xids(sick.clone());
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = cpu_times();
        let cpu_used_milli = match (prev, now) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                (b1.saturating_sub(b0) as f64 / (t1 - t0) as f64 * cores as f64 * 1000.0) as u64
            }
            _ => 0,
        };
        prev = now;
        let (source, xml) = (gpu_source.clone(), gpu_xml.clone());
        let gpus = if source == gpu::SOURCE_NONE && xml.is_none() {
            Vec::new()
        } else {
            tokio::task::spawn_blocking(move || gpu::sample_telemetry(&source, xml.as_deref()))
                .await
                .unwrap_or_default()
        };
        let xids = sick.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let usage = tessera_core::node::NodeUsage {
            at: now_ms(),
            cpu_used_milli,
            memory_used_bytes: memory_used(),
            gpus: gpus
                .into_iter()
                .map(|g| tessera_core::node::GpuUsage {
                    index: g.index,
                    utilization_percent: g.utilization_percent,
                    memory_used_bytes: g.memory_used_bytes,
                    temperature_celsius: g.temperature_celsius,
                    power_watts: g.power_watts,
                    ecc_uncorrected_volatile: g.ecc_uncorrected_volatile,
                    healthy: g.healthy && !xids.contains_key(&g.index),
                })
                .collect(),
        };
        if events
            .send(FromAgent::Usage {
                node: node.clone(),
                usage,
            })
            .is_err()
        {
            return;
        }
    }
}

/// How a replica that ended unwatched ended, from its wrapper's status file.
fn recorded_exit(home: &Path, key: ReplicaKey) -> (Option<i32>, Option<i32>, ExitCause) {
    if lease_stopped(home, key) {
        return (None, Some(15), ExitCause::Disconnected);
    }
    let code = std::fs::read_to_string(status_path(home, key))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    match code {
        Some(c) if c > 128 && c < 160 => (None, Some(c - 128), ExitCause::Exited),
        Some(c) => (Some(c), None, ExitCause::Exited),
        None => (None, None, ExitCause::Unknown),
    }
}

/// Whether the replica's watchdog stopped it because the lease ran out.
fn lease_stopped(home: &Path, key: ReplicaKey) -> bool {
    status_path(home, key)
        .with_extension("status.lease")
        .exists()
}

/// Watches a replica this agent did not start (it cannot `wait` for it):
/// polls its leader until it is gone, stops it on request or at its
/// deadline, then reports how it ended.
async fn watch_adopted(
    ctx: ReplicaCtx,
    key: ReplicaKey,
    pid: u32,
    start: u64,
    deadline_ms: Option<u64>,
    mut stop_rx: oneshot::Receiver<(u64, String)>,
) {
    let pgid = Pid::from_raw(pid as i32);
    let alive = move || proc_start_time(pid) == Some(start);
    let mut cause = ExitCause::Exited;
    let mut stopping: Option<std::time::Instant> = None;
    let mut grace = ctx.grace;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while alive() {
        tokio::select! {
            _ = tick.tick() => {}
            stop = &mut stop_rx, if stopping.is_none() => {
                if let Ok((grace_ms, reason)) = stop {
                    debug!(%key, %reason, "stopping an adopted replica");
                    grace = Duration::from_millis(grace_ms);
                }
                cause = ExitCause::Stopped;
                let _ = killpg(pgid, Signal::SIGTERM);
                stopping = Some(std::time::Instant::now());
            }
        }
        if stopping.is_none() && deadline_ms.is_some_and(|d| now_ms() >= d) {
            cause = ExitCause::TimedOut;
            let _ = killpg(pgid, Signal::SIGTERM);
            stopping = Some(std::time::Instant::now());
        }
        if stopping.is_some_and(|t| t.elapsed() >= grace) {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
    let _ = killpg(pgid, Signal::SIGKILL);
    let (code, signal, recorded) = recorded_exit(&ctx.home, key);
    if cause == ExitCause::Exited {
        cause = recorded;
    }
    let name = key.to_string();
    ctx.cgroups.kill_all(&name);
    ctx.cgroups.remove(&name);
    let _ = std::fs::remove_file(running_dir(&ctx.home).join(&name));
    let _ = std::fs::remove_file(status_path(&ctx.home, key));
    let _ = std::fs::remove_file(status_path(&ctx.home, key).with_extension("status.lease"));
    let workdir = take_workdir_note(&ctx.home, key);
    let _ = ctx.events.send(FromAgent::Exited {
        key,
        code,
        signal,
        cause,
        at: now_ms(),
        workdir,
    });
}

/// SIGTERM to the group, then SIGKILL after `grace`.
async fn terminate(
    child: &mut tokio::process::Child,
    pgid: Pid,
    grace: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    let _ = killpg(pgid, Signal::SIGTERM);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            let _ = killpg(pgid, Signal::SIGKILL);
            child.wait().await
        }
    }
}

fn spawn_replica(
    ctx: &ReplicaCtx,
    start: &StartReplica,
) -> Result<(tokio::process::Child, Option<String>), String> {
    let key = start.key;
    let workdir = workdir_of(&ctx.home, start);
    std::fs::create_dir_all(&workdir)
        .map_err(|e| format!("cannot create working directory {}: {e}", workdir.display()))?;
    link_inputs(&workdir, &start.inputs)?;
    let _ = std::fs::write(workdir_note(&ctx.home, key), workdir.display().to_string());
    let log = log_path(&ctx.home, key);
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create log directory {}: {e}", parent.display()))?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| format!("cannot open log {}: {e}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("cannot open log: {e}"))?;
    let env_path = start
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str());
    let program = resolve_program(&start.argv[0], env_path)?;

    let cg_name = key.to_string();
    let procs = ctx
        .cgroups
        .create(&cg_name, start.cpu_milli, start.memory_bytes)
        .map_err(|e| format!("cannot set up cgroup limits: {e}"))?;
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(REPLICA_WRAPPER)
        .arg("tessera-replica")
        .arg(&program)
        .args(&start.argv[1..]);
    let joined: Vec<String> = procs.iter().map(|p| p.display().to_string()).collect();
    cmd.env("TESSERA_CGROUP_PROCS", joined.join(":"))
        .env("TESSERA_STATUS_FILE", status_path(&ctx.home, key));
    if ctx.watchdog {
        cmd.env("TESSERA_LEASE_FILE", lease_path(&ctx.home)).env(
            "TESSERA_LEASE_GRACE",
            ctx.grace.as_secs_f64().ceil().max(1.0).to_string(),
        );
    }
    let cuda = start
        .gpus
        .iter()
        .map(|g| g.to_string())
        .collect::<Vec<_>>()
        .join(",");
    cmd.current_dir(&workdir)
        .envs(start.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("TESSERA_AGENT_HOME", &ctx.home)
        .env("TESSERA_JOB_ID", key.job_id.to_string())
        .env("TESSERA_REPLICA", key.replica.to_string())
        .env("TESSERA_NUM_REPLICAS", start.num_replicas.to_string())
        .env("TESSERA_ATTEMPT", key.attempt.to_string())
        .env("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        .env("CUDA_VISIBLE_DEVICES", cuda)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(false);
    let child = cmd.spawn().map_err(|e| {
        if !procs.is_empty() {
            ctx.cgroups.remove(&cg_name);
        }
        format!("cannot start `{}`: {e}", program.display())
    })?;
    Ok((child, (!procs.is_empty()).then_some(cg_name)))
}

#[cfg(test)]
mod tests;
