//! Replicas of jobs with an `image:` run as Docker containers, through the
//! Docker Engine API (the local socket, or `DOCKER_HOST=unix://…`).
//!
//! A replica's container is named `tessera-<job>.<attempt>.<replica>-<home>`
//! (`<home>`: eight hex digits naming the agent's home, so that two agents
//! sharing one engine never collide) and labelled `tessera.job`,
//! `tessera.attempt`, `tessera.replica` and `tessera.home` (the agent's home
//! path), so each agent finds only its own containers; `tessera.deadline`
//! carries the `max_runtime` deadline (ms since the epoch) for an agent that
//! adopts the container after a restart.
//!
//! Inside, the replica sees what a process replica sees: the spec's
//! environment plus `TESSERA_JOB_ID`, `TESSERA_REPLICA`,
//! `TESSERA_NUM_REPLICAS`, `TESSERA_ATTEMPT`, `CUDA_DEVICE_ORDER` and
//! `CUDA_VISIBLE_DEVICES`; its working directory (the same host directory a
//! process would get) bind-mounted at the same path and current. Its GPUs
//! are handed over by a device request to the `nvidia` driver, so inside the
//! container they are numbered from 0 and `CUDA_VISIBLE_DEVICES` counts
//! `0..n`. CPU and memory limits are the engine's (`NanoCpus`, `Memory` with
//! no swap). `docker-init` runs as PID 1, so a stop's SIGTERM reaches the
//! program. `command`/`script` replace the image's entrypoint; with neither,
//! the image's entrypoint and command run. An image that is not on the node
//! is pulled first.
//!
//! The executor sends the same messages as the process executor: `Started`
//! (with the host pid of the container's init) and exactly one `Exited`.
//! Output (stdout and stderr) is appended to the same log file. The
//! container is always removed once it has ended.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, ContainerStateStatusEnum, DeviceRequest, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, KillContainerOptions, ListContainersOptions,
    LogsOptions, RemoveContainerOptions,
};
use bollard::Docker;
use futures::StreamExt;
use tessera_core::protocol::{ExitCause, FromAgent, ReplicaKey, StartReplica};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::{log_path, now_ms, workdir_of, ReplicaCtx};

pub const LABEL_JOB: &str = "tessera.job";
pub const LABEL_ATTEMPT: &str = "tessera.attempt";
pub const LABEL_REPLICA: &str = "tessera.replica";
pub const LABEL_HOME: &str = "tessera.home";
pub const LABEL_DEADLINE: &str = "tessera.deadline";

/// How long to wait for the engine to answer the first request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the log copy may trail the container's exit.
const LOG_DRAIN: Duration = Duration::from_secs(5);

/// Connects to the local Docker engine and agrees on an API version. The
/// error reads `docker is not available: …`.
pub async fn connect() -> Result<Docker, String> {
    let unavailable = |e: &dyn std::fmt::Display| format!("docker is not available: {e}");
    let docker = Docker::connect_with_local_defaults().map_err(|e| unavailable(&e))?;
    match tokio::time::timeout(CONNECT_TIMEOUT, docker.negotiate_version()).await {
        Ok(Ok(docker)) => Ok(docker),
        Ok(Err(e)) => Err(unavailable(&e)),
        Err(_) => Err(unavailable(&"the engine did not answer in time")),
    }
}

/// The `tessera.home` label of the agent whose home is `home`.
pub fn home_label(home: &Path) -> String {
    std::fs::canonicalize(home)
        .unwrap_or_else(|_| home.to_path_buf())
        .display()
        .to_string()
}

/// The name of `key`'s container for the agent whose home is `home`.
pub fn container_name(home: &Path, key: ReplicaKey) -> String {
    // FNV-1a: stable across builds, unlike std's hasher.
    let hash = home_label(home).bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    });
    format!("tessera-{key}-{hash:08x}")
}

/// Docker's message for an error, without the status-code preamble.
fn docker_message(e: &DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

fn status_of(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// What the engine is asked to create for `start`.
fn create_body(home: &Path, start: &StartReplica, workdir: &str) -> ContainerCreateBody {
    let key = start.key;
    let image = start.image.clone().unwrap_or_default();
    let mut env: Vec<String> = start.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let cuda = (0..start.gpus.len())
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    env.extend([
        format!("TESSERA_JOB_ID={}", key.job_id),
        format!("TESSERA_REPLICA={}", key.replica),
        format!("TESSERA_NUM_REPLICAS={}", start.num_replicas),
        format!("TESSERA_ATTEMPT={}", key.attempt),
        "CUDA_DEVICE_ORDER=PCI_BUS_ID".to_string(),
        format!("CUDA_VISIBLE_DEVICES={cuda}"),
    ]);
    let mut labels = HashMap::from([
        (LABEL_JOB.to_string(), key.job_id.to_string()),
        (LABEL_ATTEMPT.to_string(), key.attempt.to_string()),
        (LABEL_REPLICA.to_string(), key.replica.to_string()),
        (LABEL_HOME.to_string(), home_label(home)),
    ]);
    if let Some(max) = start.max_runtime_ms {
        labels.insert(LABEL_DEADLINE.to_string(), (now_ms() + max).to_string());
    }
    let (entrypoint, cmd) = match start.argv.split_first() {
        Some((program, args)) => (Some(vec![program.clone()]), Some(args.to_vec())),
        None => (None, None),
    };
    let device_requests = (!start.gpus.is_empty()).then(|| {
        vec![DeviceRequest {
            driver: Some("nvidia".into()),
            device_ids: Some(start.gpus.iter().map(|g| g.to_string()).collect()),
            capabilities: Some(vec![vec!["gpu".into()]]),
            ..Default::default()
        }]
    });
    let memory = i64::try_from(start.memory_bytes).unwrap_or(i64::MAX);
    ContainerCreateBody {
        image: Some(image),
        entrypoint,
        cmd,
        env: Some(env),
        labels: Some(labels),
        working_dir: Some(workdir.to_string()),
        attach_stdin: Some(false),
        open_stdin: Some(false),
        tty: Some(false),
        host_config: Some(HostConfig {
            // The working directory, and each input's staged directory
            // read-only at the same path, so its link resolves inside.
            binds: Some(
                std::iter::once(format!("{workdir}:{workdir}"))
                    .chain(start.inputs.iter().map(|i| format!("{0}:{0}:ro", i.path)))
                    .collect(),
            ),
            nano_cpus: Some(start.cpu_milli.saturating_mul(1_000_000) as i64),
            memory: Some(memory),
            memory_swap: Some(memory),
            device_requests,
            init: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A reference that names one tag: pulling a bare name would pull them all.
fn pull_reference(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.contains(':') {
        image.to_string()
    } else {
        format!("{image}:latest")
    }
}

async fn pull(docker: &Docker, image: &str) -> Result<(), String> {
    let failed = |e: String| {
        format!("image `{image}` is not present on this node and could not be pulled: {e}")
    };
    info!(%image, "pulling image");
    let options = CreateImageOptions {
        from_image: Some(pull_reference(image)),
        ..Default::default()
    };
    let mut progress = docker.create_image(Some(options), None, None);
    while let Some(item) = progress.next().await {
        match item {
            Ok(info) => {
                if let Some(e) = info.error_detail {
                    return Err(failed(e.message.unwrap_or_else(|| "unknown error".into())));
                }
            }
            Err(e) => return Err(failed(docker_message(&e))),
        }
    }
    Ok(())
}

async fn remove(docker: &Docker, id: &str) {
    let options = RemoveContainerOptions {
        force: true,
        ..Default::default()
    };
    match docker.remove_container(id, Some(options)).await {
        Ok(()) => {}
        Err(e) if status_of(&e) == Some(404) => {}
        Err(e) => warn!(container = %id, error = %e, "cannot remove container"),
    }
}

/// Creates `start`'s container (pulling its image if needed), removing a
/// leftover of the same replica of this home first.
async fn create(docker: &Docker, home: &Path, start: &StartReplica) -> Result<String, String> {
    let image = start.image.as_deref().unwrap_or_default();
    let workdir = workdir_of(home, start);
    std::fs::create_dir_all(&workdir)
        .map_err(|e| format!("cannot create working directory {}: {e}", workdir.display()))?;
    let workdir = std::fs::canonicalize(&workdir).unwrap_or(workdir);
    crate::link_inputs(&workdir, &start.inputs)?;
    let _ = std::fs::write(
        crate::workdir_note(home, start.key),
        workdir.display().to_string(),
    );
    let log = log_path(home, start.key);
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create log directory {}: {e}", parent.display()))?;
    }
    let name = container_name(home, start.key);
    let body = create_body(home, start, &workdir.display().to_string());
    let options = || CreateContainerOptions {
        name: Some(name.clone()),
        ..Default::default()
    };
    let mut pulled = false;
    let mut cleared = false;
    loop {
        match docker.create_container(Some(options()), body.clone()).await {
            Ok(created) => return Ok(created.id),
            Err(e) if status_of(&e) == Some(404) && !pulled => {
                pull(docker, image).await?;
                pulled = true;
            }
            Err(e) if status_of(&e) == Some(409) && !cleared => {
                // The name is taken: a leftover of this very replica (this
                // home's label) goes; anyone else's is an error.
                let ours = docker
                    .inspect_container(&name, None)
                    .await
                    .ok()
                    .and_then(|c| c.config?.labels?.remove(LABEL_HOME))
                    .is_some_and(|h| h == home_label(home));
                if !ours {
                    return Err(format!(
                        "cannot create container {name}: {}",
                        docker_message(&e)
                    ));
                }
                remove(docker, &name).await;
                cleared = true;
            }
            Err(e) => {
                return Err(format!(
                    "cannot create a container of image `{image}`: {}",
                    docker_message(&e)
                ))
            }
        }
    }
}

/// Creates and starts `start`'s container; returns its id and host pid.
pub(crate) async fn launch(
    docker: &Docker,
    home: &Path,
    start: &StartReplica,
) -> Result<(String, u32), String> {
    let id = create(docker, home, start).await?;
    if let Err(e) = docker.start_container(&id, None).await {
        remove(docker, &id).await;
        return Err(format!(
            "cannot start the container of image `{}`: {}",
            start.image.as_deref().unwrap_or_default(),
            docker_message(&e)
        ));
    }
    let pid = docker
        .inspect_container(&id, None)
        .await
        .ok()
        .and_then(|c| c.state?.pid)
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or(0);
    Ok((id, pid))
}

/// Runs one replica in a container, as [`crate`]'s `run_replica` runs a
/// process: `Started`, then exactly one `Exited`.
pub(crate) async fn run(
    ctx: ReplicaCtx,
    start: StartReplica,
    mut stop_rx: oneshot::Receiver<(u64, String)>,
) {
    let key = start.key;
    let workdir = workdir_of(&ctx.home, &start).display().to_string();
    let exited = |code: Option<i32>, cause| FromAgent::Exited {
        key,
        code,
        signal: None,
        cause,
        at: now_ms(),
        workdir: Some(workdir.clone()),
    };
    let spawn_failed = |msg: String| {
        warn!(%key, error = %msg, "replica could not start");
        let log = log_path(&ctx.home, key);
        if let Some(parent) = log.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::write(&log, format!("tessera: cannot start replica: {msg}\n"));
        let _ = ctx.events.send(exited(None, ExitCause::SpawnFailed(msg)));
    };
    let docker = match connect().await {
        Ok(d) => d,
        Err(msg) => return spawn_failed(msg),
    };
    // Creating may mean pulling an image, which can take long: a stop
    // meanwhile ends it.
    let launched = tokio::select! {
        launched = launch(&docker, &ctx.home, &start) => launched,
        _ = &mut stop_rx => {
            remove(&docker, &container_name(&ctx.home, key)).await;
            let _ = ctx.events.send(exited(None, ExitCause::Stopped));
            return;
        }
    };
    let (id, pid) = match launched {
        Ok(started) => started,
        Err(msg) => return spawn_failed(msg),
    };
    let _ = ctx.events.send(FromAgent::Started {
        key,
        pid,
        at: now_ms(),
    });
    let deadline = start
        .max_runtime_ms
        .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
    let watch = Watch {
        docker,
        id,
        key,
        home: ctx.home,
        grace: ctx.grace,
        events: ctx.events,
    };
    watch.supervise(deadline, None, stop_rx).await;
}

/// Containers of the agent whose home is `home` (label `tessera.home`) that
/// have not been removed, as `(replica, container id)`, sorted by replica.
///
/// Meant for an agent that starts again on the same home and takes over
/// what its predecessor ran (see [`adopt`]): besides the running ones, the
/// list holds those that ended while no agent watched them (their exit
/// status is still there for [`adopt`] to report) and any that were created
/// but never started. Empty when the engine cannot be reached.
pub async fn running_containers(home: &Path) -> Vec<(ReplicaKey, String)> {
    let docker = match connect().await {
        Ok(d) => d,
        Err(e) => {
            debug!(error = %e, "no containers to look for");
            return Vec::new();
        }
    };
    list(&docker, home).await
}

async fn list(docker: &Docker, home: &Path) -> Vec<(ReplicaKey, String)> {
    let options = ListContainersOptions {
        all: true,
        filters: Some(HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_HOME}={}", home_label(home))],
        )])),
        ..Default::default()
    };
    let containers = match docker.list_containers(Some(options)).await {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot list containers");
            return Vec::new();
        }
    };
    let mut found: Vec<(ReplicaKey, String)> = containers
        .into_iter()
        .filter_map(|c| {
            let labels = c.labels?;
            let key = ReplicaKey {
                job_id: labels.get(LABEL_JOB)?.parse().ok()?,
                attempt: labels.get(LABEL_ATTEMPT)?.parse().ok()?,
                replica: labels.get(LABEL_REPLICA)?.parse().ok()?,
            };
            Some((key, c.id?))
        })
        .collect();
    found.sort();
    found
}

/// Takes over container `id`, replica `key`'s, that an earlier agent on
/// `home` started (from [`running_containers`]), and watches it to its end
/// exactly as the executor watches the containers it starts: its output is
/// appended to the replica's log from where the earlier agent left off (the
/// log file's last write; nothing is copied twice), a stop request on
/// `stop_rx` stops it (SIGTERM, then SIGKILL after the grace it carries, or
/// `grace` if the sender is dropped), its `max_runtime` deadline still holds,
/// and when it has ended it is removed and exactly one `Exited` is sent on
/// `events`, with its exit code and cause (`OutOfMemory`, `TimedOut`,
/// `Stopped` or `Exited`). No `Started` is sent. A container that had
/// already ended is reported at once; one that was created but never
/// started is removed and reported as `SpawnFailed`; one that cannot be
/// watched (the engine is gone) is reported as `Exited` with no code.
pub async fn adopt(
    home: PathBuf,
    grace: Duration,
    key: ReplicaKey,
    id: String,
    stop_rx: oneshot::Receiver<(u64, String)>,
    events: mpsc::UnboundedSender<FromAgent>,
) {
    let workdir = crate::take_workdir_note(&home, key);
    let report = |cause| {
        let _ = events.send(FromAgent::Exited {
            key,
            code: None,
            signal: None,
            cause,
            at: now_ms(),
            workdir: workdir.clone(),
        });
    };
    let docker = match connect().await {
        Ok(d) => d,
        Err(e) => {
            warn!(%key, container = %id, error = %e, "cannot adopt a container");
            return report(ExitCause::Exited);
        }
    };
    let info = match docker.inspect_container(&id, None).await {
        Ok(info) => info,
        Err(e) => {
            warn!(%key, container = %id, error = %e, "cannot adopt a container");
            return report(ExitCause::Exited);
        }
    };
    let state = info.state.and_then(|s| s.status);
    if state == Some(ContainerStateStatusEnum::CREATED) {
        remove(&docker, &id).await;
        return report(ExitCause::SpawnFailed(
            "the container was created but its agent restarted before starting it".into(),
        ));
    }
    info!(%key, container = %id, ?state, "adopting a container an earlier agent started");
    let deadline = info
        .config
        .and_then(|c| c.labels?.get(LABEL_DEADLINE)?.parse::<u64>().ok())
        .map(|d| tokio::time::Instant::now() + Duration::from_millis(d.saturating_sub(now_ms())));
    // What the earlier agent copied ends at the log file's last write.
    let log = log_path(&home, key);
    let cutoff = std::fs::metadata(&log)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| SystemTime::now());
    let cutoff = cutoff
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let watch = Watch {
        docker,
        id,
        key,
        home,
        grace,
        events,
    };
    watch.supervise(deadline, Some(cutoff), stop_rx).await;
}

/// Removes every container of the agent whose home is `home`, running or
/// not, and returns their replicas. Blocking; used by
/// [`crate::reap_orphans`] when one process hosts the control plane and
/// its agent, so that nothing an earlier run started survives a restart.
pub fn reap(home: &Path) -> Vec<ReplicaKey> {
    let home = home.to_path_buf();
    block_on_own_thread(async move {
        let docker = connect().await.ok()?;
        let found = list(&docker, &home).await;
        for (key, id) in &found {
            info!(replica = %key, container = %id, "removing a container left by an earlier agent");
            remove(&docker, id).await;
        }
        Some(found.into_iter().map(|(key, _)| key).collect())
    })
    .unwrap_or_default()
}

/// [`running_containers`] for callers that cannot `.await` (blocking; works
/// inside a runtime or outside one).
pub fn running_containers_blocking(home: &Path) -> Vec<(ReplicaKey, String)> {
    let home = home.to_path_buf();
    block_on_own_thread(async move { Some(running_containers(&home).await) }).unwrap_or_default()
}

/// Runs `future` to its end on a runtime of its own, on a thread of its
/// own, so that a caller may or may not be inside a runtime.
fn block_on_own_thread<T, F>(future: F) -> Option<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = Option<T>> + Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?
            .block_on(future)
    })
    .join()
    .ok()
    .flatten()
}

/// One container being watched to its end.
struct Watch {
    docker: Docker,
    id: String,
    key: ReplicaKey,
    home: PathBuf,
    grace: Duration,
    events: mpsc::UnboundedSender<FromAgent>,
}

impl Watch {
    /// Copies its output, waits for its exit (stopping it at `deadline` or
    /// on request), removes it and reports `Exited`. `log_cutoff`: copy only
    /// output stamped after this (ns since the epoch); none: all of it.
    async fn supervise(
        self,
        deadline: Option<tokio::time::Instant>,
        log_cutoff: Option<u128>,
        stop_rx: oneshot::Receiver<(u64, String)>,
    ) {
        let key = self.key;
        let logs = tokio::spawn(copy_logs(
            self.docker.clone(),
            self.id.clone(),
            log_path(&self.home, key),
            log_cutoff,
        ));
        let timer = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let mut cause = ExitCause::Exited;
        let code = tokio::select! {
            code = wait_exit(&self.docker, &self.id) => code,
            _ = timer => {
                cause = ExitCause::TimedOut;
                self.terminate(self.grace).await
            }
            stop = stop_rx => {
                let grace = match stop {
                    Ok((grace_ms, reason)) => {
                        debug!(%key, %reason, "stopping container");
                        Duration::from_millis(grace_ms)
                    }
                    Err(_) => self.grace,
                };
                cause = ExitCause::Stopped;
                self.terminate(grace).await
            }
        };
        let state = self
            .docker
            .inspect_container(&self.id, None)
            .await
            .ok()
            .and_then(|c| c.state);
        let oom = state.as_ref().and_then(|s| s.oom_killed) == Some(true);
        if cause == ExitCause::Exited && oom {
            cause = ExitCause::OutOfMemory;
        }
        let code = code.or_else(|| state.and_then(|s| s.exit_code));
        // The log stream ends with the container; give it a moment to
        // deliver the last of the output.
        let mut logs = logs;
        if tokio::time::timeout(LOG_DRAIN, &mut logs).await.is_err() {
            logs.abort();
        }
        remove(&self.docker, &self.id).await;
        let _ = self.events.send(FromAgent::Exited {
            key,
            code: code.and_then(|c| i32::try_from(c).ok()),
            signal: None,
            cause,
            at: now_ms(),
            workdir: crate::take_workdir_note(&self.home, key),
        });
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the exit code.
    async fn terminate(&self, grace: Duration) -> Option<i64> {
        let signal = |s: &str| KillContainerOptions { signal: s.into() };
        let _ = self
            .docker
            .kill_container(&self.id, Some(signal("SIGTERM")))
            .await;
        match tokio::time::timeout(grace, wait_exit(&self.docker, &self.id)).await {
            Ok(code) => code,
            Err(_) => {
                let _ = self
                    .docker
                    .kill_container(&self.id, Some(signal("SIGKILL")))
                    .await;
                wait_exit(&self.docker, &self.id).await
            }
        }
    }
}

/// Waits until container `id` is not running and returns its exit code;
/// none when it is gone or the engine stays unreachable.
async fn wait_exit(docker: &Docker, id: &str) -> Option<i64> {
    let mut failures = 0;
    loop {
        match docker.wait_container(id, None).next().await {
            Some(Ok(r)) => return Some(r.status_code),
            Some(Err(DockerError::DockerContainerWaitError { code, .. })) => return Some(code),
            other => {
                debug!(container = %id, result = ?other.map(|r| r.map(|_| ())), "waiting for a container failed");
            }
        }
        match docker.inspect_container(id, None).await {
            Ok(info) => {
                let state = info.state.unwrap_or_default();
                if state.running != Some(true) {
                    return state.exit_code;
                }
                failures = 0;
            }
            Err(e) if status_of(&e) == Some(404) => return None,
            Err(e) => {
                failures += 1;
                if failures > 60 {
                    warn!(container = %id, error = %e, "giving up on an unreachable engine");
                    return None;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Appends the container's stdout and stderr to `path` until it ends.
async fn copy_logs(docker: Docker, id: String, path: PathBuf, cutoff: Option<u128>) {
    let mut file = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot open log");
            return;
        }
    };
    let options = LogsOptions {
        follow: true,
        stdout: true,
        stderr: true,
        timestamps: cutoff.is_some(),
        since: cutoff
            .map(|ns| i32::try_from(ns / 1_000_000_000).unwrap_or(0))
            .unwrap_or(0),
        ..Default::default()
    };
    let mut stream = docker.logs(&id, Some(options));
    while let Some(item) = stream.next().await {
        let bytes = match item {
            Ok(output) => output.into_bytes(),
            Err(e) => {
                debug!(container = %id, error = %e, "log stream ended");
                break;
            }
        };
        let mut chunk: &[u8] = &bytes;
        if let Some(cutoff) = cutoff {
            // `<RFC 3339 time> <output>`: keep only what came after.
            let Some(space) = chunk.iter().position(|b| *b == b' ') else {
                continue;
            };
            let stamp = std::str::from_utf8(&chunk[..space])
                .ok()
                .and_then(parse_rfc3339);
            if stamp.is_some_and(|t| t <= cutoff) {
                continue;
            }
            chunk = &chunk[space + 1..];
        }
        if let Err(e) = file.write_all(chunk) {
            warn!(path = %path.display(), error = %e, "cannot write log");
            break;
        }
    }
}

/// `2024-05-01T12:00:00.123456789Z` as nanoseconds since the epoch (UTC
/// only, as Docker writes it).
fn parse_rfc3339(s: &str) -> Option<u128> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (h, min, sec) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || frac.len() > 9 {
        return None;
    }
    let nanos: u128 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().ok()?
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + min * 60 + sec;
    Some(u128::try_from(secs).ok()? * 1_000_000_000 + nanos)
}

#[cfg(test)]
#[path = "container_tests.rs"]
mod tests;
