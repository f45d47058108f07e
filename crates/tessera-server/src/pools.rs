//! Pools in the control plane: capacity that another engine manages (a
//! Slurm cluster; Ray and Kubernetes through the same trait), placed onto
//! by the one scheduler like any node.
//!
//! A pool is one node in the cluster state, `pool-<name>`, whose inventory
//! is the pool's capacity as its engine reports it (refreshed every few
//! seconds), whose prices are the pool's, and whose labels are
//! `pool=<name>`, `pool.kind=<kind>` and the pool's own. A task per pool
//! plays that node's agent: it is registered in [`Shared::agents`], takes
//! `Start`/`Stop`/`StopAll`, calls the [`PoolDriver`], and reports
//! `Started`/`Exited` through the same path remote agents' reports take —
//! so epochs, retries, fair share, quotas and cost accounting apply
//! unchanged. A gang's replicas arrive as separate `Start`s of one attempt
//! and go to the engine as one job with `replicas = n`.
//!
//! The status of all of a pool's jobs is read in one call, every 100 ms
//! while a job is waiting to start or was handed over in the last 30 s,
//! and every second otherwise; capacity every 5 s. In between, every
//! 10 ms, the driver says which jobs it knows have ended without calling
//! the engine ([`PoolDriver::ended_locally`]; Slurm: the exit markers its
//! batch scripts leave), so that a slot freed by a short job is refilled
//! at once rather than at the next status call. A pool whose engine does
//! not answer is marked unhealthy and gets no new work (its node leaves [`ClusterState::connected`]); its jobs
//! keep their state until the engine answers again. Output is copied into
//! the job's log file (`$TESSERA_HOME/logs/<job>/<attempt>/<replica>.log`,
//! all of a gang's output under its first replica), so `tessera logs`
//! works for pool jobs.
//!
//! Pools are stored in the store's `meta` table (`pool/<name>`). Work in a
//! pool outlives the server: on start, each pool's task finds its active
//! jobs again by their key (`submit` is idempotent), including one whose
//! placement was committed but whose submission never happened.
//!
//! New kinds are registered in [`driver_for`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tessera_core::error::FieldError;
use tessera_core::job::ReplicaState;
use tessera_core::node::{GpuInfo, Inventory, Node, NodeState, Prices};
use tessera_core::protocol::{ExitCause, FromAgent, ReplicaKey, ToAgent};
use tessera_core::{Event, Job, JobId};
use tessera_pools::{Capacity, Failure, PoolDriver, PoolError, PoolJob, RemoteId, RemoteState};
use tessera_store::{commit, Write};
use tokio::sync::mpsc;
use tracing::{info, warn};
use utoipa::ToSchema;

use crate::api::{body_bytes, parse_json};
use crate::auth::Caller;
use crate::control::AgentReport;
use crate::error::ApiError;
use crate::state::ClusterState;
use crate::{now_ms, Shared};

/// A pool's node is named `pool-<name>`.
pub const NODE_PREFIX: &str = "pool-";
const META_PREFIX: &str = "pool/";
/// How often a pool's capacity (and health) is read.
const CAPACITY_EVERY: Duration = Duration::from_secs(5);
/// How often job status is read while some job waits to start, and otherwise.
const POLL_FAST: Duration = Duration::from_millis(100);
const POLL_SLOW: Duration = Duration::from_millis(1000);
/// A job handed to the engine this recently is polled fast: short jobs end
/// soon, and their end frees capacity for the next.
const YOUNG: Duration = Duration::from_secs(30);
/// How often the driver is asked which jobs it knows have ended without
/// calling the engine (Slurm: the exit markers batch scripts leave; one
/// directory listing), while the pool has jobs in the engine.
const LOCAL_EVERY: Duration = Duration::from_millis(10);

/// A pool as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PoolConfig {
    pub name: String,
    /// `slurm` (and the kinds [`driver_for`] knows).
    pub kind: String,
    /// Kind-specific settings (Slurm: `partition`, `output_dir`).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    #[serde(default)]
    pub prices: Prices,
    /// The pool's own labels; `pool` and `pool.kind` are added.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub created_at: u64,
    /// Made when the pool is added and part of every job's key in the
    /// engine, so that another installation's (or an earlier one's) jobs
    /// are never taken for this one's.
    #[serde(default)]
    pub key_prefix: String,
}

/// The node that stands for pool `name`.
pub fn node_name(pool: &str) -> String {
    format!("{NODE_PREFIX}{pool}")
}

pub fn meta_key(pool: &str) -> String {
    format!("{META_PREFIX}{pool}")
}

/// Loads pools from the store's `meta` rows.
pub fn load(meta: &BTreeMap<String, String>) -> BTreeMap<String, PoolConfig> {
    meta.iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix(META_PREFIX)?;
            match serde_json::from_str::<PoolConfig>(v) {
                Ok(p) => Some((name.to_string(), p)),
                Err(e) => {
                    warn!(pool = name, error = %e, "unreadable stored pool; ignored");
                    None
                }
            }
        })
        .collect()
}

/// Whether `node` stands for a pool (its work lives in another engine and
/// outlives this process).
pub fn is_pool_node(state: &ClusterState, node: &str) -> bool {
    node.strip_prefix(NODE_PREFIX)
        .is_some_and(|p| state.pools.contains_key(p))
}

/// Options every pool kind takes (the server's, not the driver's).
pub const GENERIC_OPTIONS: &[&str] = &["backlog", "queue_ahead"];

/// The most of Tessera's jobs that may wait in a pool's engine beyond its
/// capacity, unless the pool's `queue_ahead` option says otherwise.
pub const DEFAULT_QUEUE_AHEAD: u32 = 32;
/// The most `queue_ahead` may be set to.
pub const MAX_QUEUE_AHEAD: u32 = 1000;
/// The window over which a pool's job ends are counted.
const ENDS_WINDOW: Duration = Duration::from_secs(5);
/// About how long an engine takes to start a job submitted to it while it
/// has room: Slurm starts one at its next scheduling pass, about once a
/// second, but a job already waiting the moment another ends.
const ENGINE_START_LATENCY: Duration = Duration::from_secs(1);

/// The pool's `queue_ahead` option: the most of Tessera's jobs that may
/// wait in the engine's own queue beyond its capacity (0 to 1000; default
/// [`DEFAULT_QUEUE_AHEAD`]; 0 turns it off). How many may wait at a time
/// follows the pool's pace ([`effective_queue_ahead`]): as many as end in
/// it in about a second, so the engine starts the next job the moment one
/// ends instead of at its next pass, while a job handed ahead waits about
/// as long as a pass would have kept it. Those jobs are placed (they count
/// for fair share and quotas: they run next) and show as `scheduled` with
/// the reason "queued in <engine>".
pub fn queue_ahead(config: &PoolConfig) -> Result<u32, FieldError> {
    match config.options.get("queue_ahead") {
        None => Ok(DEFAULT_QUEUE_AHEAD),
        Some(v) => match v.parse::<u32>() {
            Ok(n) if n <= MAX_QUEUE_AHEAD => Ok(n),
            _ => Err(FieldError::new(
                "options.queue_ahead",
                format!(
                    "`{v}` is not a number of jobs: use a whole number from 0 (off) to {MAX_QUEUE_AHEAD}"
                ),
            )),
        },
    }
}

/// How many jobs may wait in the engine beyond its capacity now: as many
/// as ended in the pool per [`ENGINE_START_LATENCY`] over the last
/// [`ENDS_WINDOW`] (rounded to the nearest whole job), at most `most` (the
/// `queue_ahead` option). Long jobs end rarely and get none: for them a
/// second's start-up is nothing; short ones get about one per slot that
/// frees in a second.
pub fn effective_queue_ahead(most: u32, ends_in_window: usize) -> u32 {
    let window = ENDS_WINDOW.as_millis() as u64;
    let latency = ENGINE_START_LATENCY.as_millis() as u64;
    let n = (ends_in_window as u64 * latency + window / 2) / window;
    n.min(most as u64) as u32
}

/// The pool's `backlog` option: the engine is handed up to this many times
/// its capacity (1 to 10; default 1). What does not fit waits in the
/// engine's own queue, so the engine starts the next job the moment one
/// ends instead of waiting for Tessera to notice the end and hand it one —
/// at the price that fair share and quotas count the waiting jobs as placed.
pub fn backlog(config: &PoolConfig) -> Result<f64, FieldError> {
    match config.options.get("backlog") {
        None => Ok(1.0),
        Some(v) => match v.parse::<f64>() {
            Ok(f) if (1.0..=10.0).contains(&f) => Ok(f),
            _ => Err(FieldError::new(
                "options.backlog",
                format!("`{v}` is not a backlog factor: use a number from 1 to 10"),
            )),
        },
    }
}

/// The pool kinds [`driver_for`] builds.
pub const KINDS: &[&str] = &["slurm", "ray", "kubernetes"];

/// Builds the driver for a pool: the one place a pool kind is registered.
/// Checks the kind's options; errors name the field.
pub fn driver_for(config: &PoolConfig, home: &Path) -> Result<Arc<dyn PoolDriver>, FieldError> {
    backlog(config)?;
    queue_ahead(config)?;
    let allow = |known: &[&str]| -> Result<(), FieldError> {
        match config
            .options
            .keys()
            .filter(|k| !GENERIC_OPTIONS.contains(&k.as_str()))
            .find(|k| !known.contains(&k.as_str()))
        {
            Some(k) => Err(FieldError::new(
                format!("options.{k}"),
                format!(
                    "a {} pool has no option `{k}`; it takes: {}",
                    config.kind,
                    known.join(", ")
                ),
            )),
            None => Ok(()),
        }
    };
    match config.kind.as_str() {
        "slurm" => {
            allow(&["partition", "output_dir"])?;
            let partition = config.options.get("partition").cloned();
            if let Some(p) = &partition {
                if p.is_empty() || p.contains(|c: char| c.is_whitespace() || c == ',') {
                    return Err(FieldError::new(
                        "options.partition",
                        format!("`{p}` is not a partition name"),
                    ));
                }
            }
            let output_dir = match config.options.get("output_dir") {
                Some(d) if Path::new(d).is_absolute() => d.into(),
                Some(d) => {
                    return Err(FieldError::new(
                        "options.output_dir",
                        format!("`{d}` must be an absolute path"),
                    ))
                }
                None => home.join("pools").join(&config.name),
            };
            Ok(Arc::new(tessera_pools::slurm::SlurmDriver::with_path(
                tessera_pools::slurm::SlurmConfig {
                    partition,
                    output_dir,
                },
            )))
        }
        "ray" => crate::pool_engines::ray(config),
        "kubernetes" => crate::pool_engines::kubernetes(config),
        other => Err(FieldError::new(
            "kind",
            format!(
                "unknown pool kind `{other}`; this server knows: {}",
                KINDS.join(", ")
            ),
        )),
    }
}

/// What each pool's task last saw, for `tessera pools`.
#[derive(Debug, Default)]
pub struct Pools {
    status: Mutex<BTreeMap<String, PoolHealth>>,
}

#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct PoolHealth {
    pub healthy: bool,
    /// Why the pool is unhealthy (the engine's or the driver's words).
    pub message: Option<String>,
    /// Jobs Tessera handed to the engine that wait inside it.
    pub queued_in_engine: u32,
    /// Jobs Tessera handed to the engine that run there.
    pub running_in_engine: u32,
    /// What the engine reported last (used includes work that is not Tessera's).
    #[schema(value_type = Object)]
    pub capacity: Option<Capacity>,
    /// When the engine last answered (ms since the Unix epoch).
    pub checked_at: u64,
}

impl Pools {
    fn set(&self, pool: &str, f: impl FnOnce(&mut PoolHealth)) {
        f(self
            .status
            .lock()
            .expect("pools lock")
            .entry(pool.to_string())
            .or_default());
    }

    fn get(&self, pool: &str) -> PoolHealth {
        self.status
            .lock()
            .expect("pools lock")
            .get(pool)
            .cloned()
            .unwrap_or_default()
    }

    fn forget(&self, pool: &str) {
        self.status.lock().expect("pools lock").remove(pool);
    }
}

/// The node that stands for a pool with capacity `c`.
fn inventory(config: &PoolConfig, c: &Capacity) -> Inventory {
    let node = node_name(&config.name);
    let mut labels = c.labels.clone();
    labels.extend(config.labels.clone());
    labels.insert(tessera_core::spec::POOL_LABEL.into(), config.name.clone());
    labels.insert("pool.kind".into(), config.kind.clone());
    let factor = backlog(config).unwrap_or(1.0);
    let mut gpus = Vec::new();
    for g in &c.gpus {
        for _ in 0..(g.count as f64 * factor).floor() as u32 {
            let index = gpus.len() as u32;
            gpus.push(GpuInfo {
                index,
                uuid: format!("{node}-gpu{index}"),
                model: g.model.clone(),
                memory_bytes: 0,
                healthy: true,
            });
        }
    }
    Inventory {
        name: node,
        cpu_milli: (c.cpu_milli as f64 * factor) as u64,
        memory_bytes: (c.memory_bytes as f64 * factor) as u64,
        gpus,
        gpu_source: config.kind.clone(),
        limits_enforced: true,
        limits_note: format!(
            "a {} pool of {} node(s); the engine places and limits each job (largest node: {} CPU, {} memory, {} GPU){}{}",
            config.kind,
            c.nodes,
            c.largest_node.0 as f64 / 1000.0,
            tessera_core::quantity::format_memory(c.largest_node.1),
            c.largest_node.2,
            if factor > 1.0 {
                format!("; offered {factor}× its capacity (backlog), the rest waits in the engine")
            } else {
                String::new()
            },
            match queue_ahead(config).unwrap_or(0) {
                0 => String::new(),
                n => format!("; as many jobs as end in it per second (at most {n}) may wait in the engine's queue beyond that"),
            }
        ),
        labels,
        agent_version: format!("pool/{}", config.kind),
    }
}

/// Starts the tasks of every stored pool (at start-up).
pub fn start_all(shared: &Arc<Shared>) {
    let configs: Vec<PoolConfig> = shared
        .state
        .lock()
        .expect("state lock")
        .pools
        .values()
        .cloned()
        .collect();
    for c in configs {
        match driver_for(&c, &shared.home) {
            Ok(driver) => start(shared, c, driver),
            Err(e) => {
                warn!(pool = %c.name, error = %e, "cannot build the pool's driver");
                shared.pools.set(&c.name, |h| {
                    h.healthy = false;
                    h.message = Some(format!("{}: {}", e.field, e.message));
                });
            }
        }
    }
}

/// Registers a pool's node as connected to an agent (its task) and starts
/// the task. The task ends when the pool is removed (its channel closes).
pub fn start(shared: &Arc<Shared>, config: PoolConfig, driver: Arc<dyn PoolDriver>) {
    let node = node_name(&config.name);
    let (tx, rx) = mpsc::unbounded_channel();
    shared.agents.lock().expect("agents lock").insert(node, tx);
    tokio::spawn(PoolTask::new(shared.clone(), config, driver).run(rx));
}

/// One attempt of one job handed to the pool.
#[derive(Debug)]
struct Tracked {
    job: PoolJob,
    replicas: Vec<u32>,
    remote: Option<RemoteId>,
    started: bool,
    stop_asked: bool,
    cancel_sent: bool,
    log_offset: u64,
    /// Why the engine keeps the job waiting, as last recorded on the job.
    queued: Option<String>,
    /// When this process took the job on.
    seen: Instant,
    /// Placed by this process and never handed to the engine: it cannot be
    /// there, so submitting skips the lookup by key.
    fresh: bool,
}

struct PoolTask {
    shared: Arc<Shared>,
    config: PoolConfig,
    node: Arc<str>,
    driver: Arc<dyn PoolDriver>,
    jobs: BTreeMap<(JobId, u32), Tracked>,
    /// Largest node (CPU, memory, GPUs), once known.
    largest: Option<(u64, u64, u32)>,
    /// When the pool's recent jobs ended (the last [`ENDS_WINDOW`]).
    ends: std::collections::VecDeque<Instant>,
    /// The queue-ahead last published to the cluster state.
    ahead: Option<u32>,
}

/// How a pool job ended, in the terms of agent reports.
enum End {
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
        cause: ExitCause,
    },
    /// Lost with its node (or the engine forgot it): requeued per the job's
    /// node-loss policy.
    Lost(String),
}

impl PoolTask {
    fn new(shared: Arc<Shared>, config: PoolConfig, driver: Arc<dyn PoolDriver>) -> PoolTask {
        PoolTask {
            node: node_name(&config.name).into(),
            shared,
            config,
            driver,
            jobs: BTreeMap::new(),
            largest: None,
            ends: std::collections::VecDeque::new(),
            ahead: None,
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<ToAgent>) {
        info!(pool = %self.config.name, kind = %self.config.kind, "pool task started");
        self.refresh_capacity().await;
        self.adopt();
        self.publish_ahead();
        self.submit_pending().await;
        let mut next_capacity = Instant::now() + CAPACITY_EVERY;
        let mut next_poll = Instant::now();
        let mut next_local = Instant::now() + LOCAL_EVERY;
        loop {
            let wake = if self.jobs.values().any(|t| t.remote.is_some()) {
                next_poll.min(next_capacity).min(next_local)
            } else {
                next_poll.min(next_capacity)
            };
            tokio::select! {
                msg = rx.recv() => {
                    let Some(first) = msg else { break };
                    let mut msgs = vec![first];
                    while let Ok(m) = rx.try_recv() {
                        msgs.push(m);
                    }
                    self.handle(msgs).await;
                    self.submit_pending().await;
                    next_poll = next_poll.min(Instant::now() + POLL_FAST);
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    if Instant::now() >= next_local {
                        next_local = Instant::now() + LOCAL_EVERY;
                        if self.poll_local().await {
                            // A slot freed: what the scheduler places there
                            // arrives as a message and is submitted then.
                            self.publish_ahead();
                            self.submit_pending().await;
                        }
                    }
                    if Instant::now() >= next_capacity {
                        self.refresh_capacity().await;
                        next_capacity = Instant::now() + CAPACITY_EVERY;
                    }
                    if Instant::now() >= next_poll {
                        self.heartbeat();
                        self.submit_pending().await;
                        self.poll().await;
                        self.publish_ahead();
                        let fast = self.jobs.values().any(|t| {
                            !t.started
                                || t.stop_asked
                                || t.seen.elapsed() < YOUNG
                        });
                        next_poll = Instant::now() + if fast { POLL_FAST } else { POLL_SLOW };
                    }
                }
            }
        }
        info!(pool = %self.config.name, "pool removed; its task ends");
    }

    /// The pool's node is alive as long as its task runs.
    fn heartbeat(&self) {
        let mut state = self.shared.state.lock().expect("state lock");
        if let Some(n) = state.nodes.get_mut(&*self.node) {
            n.last_heartbeat = now_ms();
        }
    }

    /// Tells the scheduler how many jobs may wait in the engine beyond its
    /// capacity now ([`effective_queue_ahead`]), when that changed.
    fn publish_ahead(&mut self) {
        let now = Instant::now();
        while self
            .ends
            .front()
            .is_some_and(|t| now.duration_since(*t) > ENDS_WINDOW)
        {
            self.ends.pop_front();
        }
        let n = effective_queue_ahead(queue_ahead(&self.config).unwrap_or(0), self.ends.len());
        if self.ahead == Some(n) {
            return;
        }
        let grew = self.ahead.is_some_and(|a| n > a);
        self.ahead = Some(n);
        {
            let mut state = self.shared.state.lock().expect("state lock");
            state.pool_ahead.insert(self.config.name.clone(), n);
            if grew {
                state.capacity_changed = true;
            }
        }
        if grew {
            self.shared.wake.notify_one();
        }
    }

    fn set_health(&self, healthy: bool, message: Option<String>) {
        let was = {
            let mut state = self.shared.state.lock().expect("state lock");
            let was = state.connected.contains(&*self.node);
            if healthy && !was {
                state.connected.insert(self.node.to_string());
                state.capacity_changed = true;
            } else if !healthy && was {
                state.connected.remove(&*self.node);
            }
            was
        };
        if healthy != was {
            if healthy {
                info!(pool = %self.config.name, "pool is healthy");
                self.shared.wake.notify_one();
            } else {
                warn!(pool = %self.config.name, error = ?message, "pool is unhealthy: no new work goes to it");
            }
        }
        self.shared.pools.set(&self.config.name, |h| {
            h.healthy = healthy;
            h.message = message;
            if healthy {
                h.checked_at = now_ms();
            }
        });
    }

    async fn refresh_capacity(&mut self) {
        match self.driver.capacity().await {
            Ok(c) => {
                self.largest = Some(c.largest_node);
                let inv = inventory(&self.config, &c);
                let staged = {
                    let mut state = self.shared.state.lock().expect("state lock");
                    let now = now_ms();
                    let mut writes = Vec::new();
                    match state.nodes.get_mut(&*self.node) {
                        Some(n) => {
                            n.last_heartbeat = now;
                            if n.state == NodeState::Lost {
                                n.state = NodeState::Ready;
                                writes.push(Write::Node(Box::new(n.clone())));
                            }
                            if n.inventory != inv {
                                n.inventory = inv;
                                writes.push(Write::Node(Box::new(n.clone())));
                                state.capacity_changed = true;
                            }
                        }
                        // Removed meanwhile: the task ends with its channel.
                        None => return,
                    }
                    self.shared.stage(writes)
                };
                staged.durable().await;
                self.shared.pools.set(&self.config.name, |h| {
                    h.capacity = Some(c);
                });
                self.set_health(true, None);
            }
            Err(e) => self.set_health(false, Some(e.to_string())),
        }
    }

    /// Takes over the pool's active jobs (after a restart): each is found
    /// again in the engine by its key when submitted again.
    fn adopt(&mut self) {
        let state = self.shared.state.lock().expect("state lock");
        let ids: Vec<JobId> = state.active.iter().copied().collect();
        for id in ids {
            let job = &state.jobs[&id];
            let here: Vec<u32> = job
                .placement
                .iter()
                .filter(|p| *p.node == *self.node)
                .map(|p| p.replica)
                .collect();
            if here.is_empty() {
                continue;
            }
            let exited = job
                .replicas
                .iter()
                .filter(|r| here.contains(&r.replica))
                .all(|r| r.state == ReplicaState::Exited);
            if exited {
                continue;
            }
            info!(job = id, attempt = job.attempt, pool = %self.config.name, "finding a pool job again");
            self.jobs.insert(
                (id, job.attempt),
                Tracked {
                    job: engine_job(&state, &self.config, job, &here),
                    replicas: here,
                    remote: None,
                    started: job.started_at.is_some(),
                    stop_asked: job.cancel_requested || job.preempting.is_some(),
                    cancel_sent: false,
                    log_offset: 0,
                    queued: None,
                    seen: Instant::now(),
                    fresh: false,
                },
            );
        }
    }

    async fn handle(&mut self, msgs: Vec<ToAgent>) {
        let mut starts: BTreeMap<(JobId, u32), Vec<u32>> = BTreeMap::new();
        let mut stops: Vec<(JobId, u32)> = Vec::new();
        for m in msgs {
            match m {
                ToAgent::Start(s) => starts
                    .entry((s.key.job_id, s.key.attempt))
                    .or_default()
                    .push(s.key.replica),
                ToAgent::Stop { key, .. } => stops.push((key.job_id, key.attempt)),
                ToAgent::StopAll { .. } => stops.extend(self.jobs.keys().copied()),
                ToAgent::Welcome { .. } => {}
            }
        }
        let mut refused = Vec::new();
        {
            let state = self.shared.state.lock().expect("state lock");
            for ((id, attempt), replicas) in starts {
                if self.jobs.contains_key(&(id, attempt)) {
                    continue;
                }
                let Some(job) = state.jobs.get(&id) else {
                    continue;
                };
                if job.attempt != attempt || !job.state.is_active() {
                    continue;
                }
                let here: Vec<u32> = job
                    .placement
                    .iter()
                    .filter(|p| *p.node == *self.node)
                    .map(|p| p.replica)
                    .collect();
                let keys: Vec<ReplicaKey> = replicas
                    .iter()
                    .map(|&replica| ReplicaKey {
                        job_id: id,
                        attempt,
                        replica,
                    })
                    .collect();
                if here.len() as u32 != job.spec.replicas {
                    refused.push((
                        keys,
                        format!(
                            "a gang runs inside one pool, but {} of its {} replicas were placed on {}; pin the job to the pool with `pool: {}`",
                            here.len(),
                            job.spec.replicas,
                            self.node,
                            self.config.name
                        ),
                    ));
                    continue;
                }
                let pj = engine_job(&state, &self.config, job, &here);
                if let Some(why) = self.too_big(&pj) {
                    refused.push((keys, why));
                    continue;
                }
                self.jobs.insert(
                    (id, attempt),
                    Tracked {
                        job: pj,
                        replicas: here,
                        remote: None,
                        started: false,
                        stop_asked: false,
                        cancel_sent: false,
                        log_offset: 0,
                        queued: None,
                        seen: Instant::now(),
                        fresh: true,
                    },
                );
            }
        }
        for (keys, why) in refused {
            self.report_keys(&keys, spawn_failed(why));
        }
        for key in stops {
            let Some(t) = self.jobs.get_mut(&key) else {
                continue;
            };
            t.stop_asked = true;
            match &t.remote {
                None => {
                    let t = self.jobs.remove(&key).expect("tracked");
                    self.end(&t, End::stopped()).await;
                }
                Some(id) if !t.cancel_sent => {
                    let id = id.clone();
                    match self.driver.cancel(&id).await {
                        Ok(()) => {
                            if let Some(t) = self.jobs.get_mut(&key) {
                                t.cancel_sent = true;
                            }
                        }
                        Err(e) => {
                            warn!(pool = %self.config.name, remote = %id, error = %e, "cannot cancel; trying again")
                        }
                    }
                }
                Some(_) => {}
            }
        }
    }

    /// Why a replica cannot fit the pool's largest node, if it cannot.
    fn too_big(&self, j: &PoolJob) -> Option<String> {
        let (cpu, mem, gpus) = self.largest?;
        if j.cpu_milli > cpu || j.memory_bytes > mem || j.gpus > gpus {
            return Some(format!(
                "a replica needs {} CPU, {} memory and {} GPU, but the largest node of pool {} has {} CPU, {} memory and {} GPU",
                j.cpu_milli as f64 / 1000.0,
                tessera_core::quantity::format_memory(j.memory_bytes),
                j.gpus,
                self.config.name,
                cpu as f64 / 1000.0,
                tessera_core::quantity::format_memory(mem),
                gpus
            ));
        }
        None
    }

    /// Hands jobs not yet submitted to the engine.
    async fn submit_pending(&mut self) {
        let pending: Vec<(JobId, u32)> = self
            .jobs
            .iter()
            .filter(|(_, t)| t.remote.is_none())
            .map(|(k, _)| *k)
            .collect();
        for key in pending {
            let (job, fresh) = (self.jobs[&key].job.clone(), self.jobs[&key].fresh);
            // Any answer but an id (a timeout too) may hide a submission
            // that happened: from then on, look the key up first.
            if let Some(t) = self.jobs.get_mut(&key) {
                t.fresh = false;
            }
            let submitted = if fresh {
                self.driver.submit_new(&job).await
            } else {
                self.driver.submit(&job).await
            };
            match submitted {
                Ok(id) => {
                    if let Some(t) = self.jobs.get_mut(&key) {
                        t.remote = Some(id.clone());
                        // A stop that came while submitting.
                        if t.stop_asked && !t.cancel_sent {
                            t.cancel_sent = self.driver.cancel(&id).await.is_ok();
                        }
                    }
                }
                Err(PoolError::Rejected(why)) => {
                    let t = self.jobs.remove(&key).expect("tracked");
                    self.end(&t, End::spawn_failed(why)).await;
                }
                Err(e) => {
                    self.set_health(false, Some(e.to_string()));
                    break;
                }
            }
        }
    }

    /// One status call for all the pool's jobs; reports what changed.
    async fn poll(&mut self) {
        let ids: Vec<RemoteId> = self
            .jobs
            .values()
            .filter_map(|t| t.remote.clone())
            .collect();
        if ids.is_empty() {
            self.count();
            return;
        }
        let states = match self.driver.status(&ids).await {
            Ok(s) => s,
            Err(e) => {
                self.set_health(false, Some(e.to_string()));
                return;
            }
        };
        self.apply(states).await;
        self.count();
    }

    /// Ends the jobs the driver knows have ended without asking the engine
    /// (see [`PoolDriver::ended_locally`]). Whether any did.
    async fn poll_local(&mut self) -> bool {
        let ids: Vec<RemoteId> = self
            .jobs
            .values()
            .filter_map(|t| t.remote.clone())
            .collect();
        if ids.is_empty() {
            return false;
        }
        let states = self.driver.ended_locally(&ids);
        if states.is_empty() {
            return false;
        }
        self.apply(states).await;
        self.count();
        true
    }

    /// Reports what changed in the states the engine gave.
    async fn apply(&mut self, states: std::collections::HashMap<RemoteId, RemoteState>) {
        let keys: Vec<(JobId, u32)> = self.jobs.keys().copied().collect();
        for key in keys {
            let Some(remote) = self.jobs[&key].remote.clone() else {
                continue;
            };
            let Some(s) = states.get(&remote).cloned() else {
                continue;
            };
            match s {
                RemoteState::Queued { reason } => {
                    let kind = &self.config.kind;
                    let text = match reason {
                        Some(r) => format!("queued in {kind} (reason: {r})"),
                        None => format!("queued in {kind}"),
                    };
                    let Some(t) = self.jobs.get_mut(&key) else {
                        continue;
                    };
                    if t.queued.as_deref() != Some(text.as_str()) {
                        let first = t.queued.is_none();
                        t.queued = Some(text.clone());
                        self.note_queued(key, text, first);
                    }
                }
                RemoteState::Running => {
                    self.mark_started(key);
                    self.copy_logs(key, false).await;
                }
                terminal => {
                    self.ends.push_back(Instant::now());
                    self.mark_started(key);
                    self.copy_logs(key, true).await;
                    let t = self.jobs.remove(&key).expect("tracked");
                    let end = self.end_of(&t, &remote, terminal).await;
                    self.end(&t, end).await;
                }
            }
        }
    }

    fn count(&self) {
        let queued = self
            .jobs
            .values()
            .filter(|t| !t.started && t.remote.is_some())
            .count() as u32;
        let running = self.jobs.values().filter(|t| t.started).count() as u32;
        self.shared.pools.set(&self.config.name, |h| {
            h.queued_in_engine = queued;
            h.running_in_engine = running;
        });
    }

    fn mark_started(&mut self, key: (JobId, u32)) {
        let Some(t) = self.jobs.get_mut(&key) else {
            return;
        };
        t.queued = None;
        if t.started {
            return;
        }
        t.started = true;
        let pid = t
            .remote
            .as_ref()
            .and_then(|r| r.0.parse::<u32>().ok())
            .unwrap_or(0);
        let at = now_ms();
        let reports: Vec<FromAgent> = t
            .replicas
            .iter()
            .map(|&replica| FromAgent::Started {
                key: ReplicaKey {
                    job_id: key.0,
                    attempt: key.1,
                    replica,
                },
                pid,
                at,
            })
            .collect();
        for r in reports {
            self.report(r);
        }
    }

    /// Copies new output into the job's log file; with `to_end`, until the
    /// engine has no more.
    async fn copy_logs(&mut self, key: (JobId, u32), to_end: bool) {
        use std::os::unix::fs::FileExt;
        let Some(t) = self.jobs.get(&key) else {
            return;
        };
        let Some(remote) = t.remote.clone() else {
            return;
        };
        let path = tessera_agent::log_path(
            &self.shared.home,
            ReplicaKey {
                job_id: key.0,
                attempt: key.1,
                replica: t.replicas.first().copied().unwrap_or(0),
            },
        );
        let mut offset = t.log_offset;
        for _ in 0..64 {
            let chunk = match self.driver.logs(&remote, offset).await {
                Ok(c) => c,
                Err(e) => {
                    warn!(pool = %self.config.name, %remote, error = %e, "cannot read the job's output");
                    break;
                }
            };
            if !chunk.data.is_empty() {
                if let Some(dir) = path.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                let written = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.write_all_at(&chunk.data, offset));
                if let Err(e) = written {
                    warn!(path = %path.display(), error = %e, "cannot write a pool job's log");
                    break;
                }
            }
            offset = chunk.next_offset;
            if chunk.data.is_empty() || chunk.complete || !to_end {
                break;
            }
        }
        if let Some(t) = self.jobs.get_mut(&key) {
            t.log_offset = offset;
        }
    }

    async fn end_of(&self, t: &Tracked, remote: &RemoteId, s: RemoteState) -> End {
        let kind = &self.config.kind;
        match s {
            RemoteState::Succeeded => End::Exit {
                code: Some(0),
                signal: None,
                cause: ExitCause::Exited,
            },
            RemoteState::Cancelled | RemoteState::NotFound if t.stop_asked => End::stopped(),
            RemoteState::Cancelled => {
                self.note(
                    t,
                    format!("{kind} job {remote} was cancelled inside {kind}, not by Tessera"),
                )
                .await;
                End::Exit {
                    code: None,
                    signal: Some(15),
                    cause: ExitCause::Exited,
                }
            }
            RemoteState::NotFound => End::Lost(format!(
                "{kind} no longer knows job {remote} of pool {}",
                self.config.name
            )),
            RemoteState::Failed {
                failure,
                exit_code,
                message,
            } => {
                self.note(t, format!("{kind} job {remote}: {message}"))
                    .await;
                match failure {
                    Failure::Exited => End::Exit {
                        code: exit_code,
                        signal: None,
                        cause: ExitCause::Exited,
                    },
                    Failure::OutOfMemory => End::Exit {
                        code: exit_code,
                        signal: None,
                        cause: ExitCause::OutOfMemory,
                    },
                    Failure::TimedOut => End::Exit {
                        code: exit_code,
                        signal: None,
                        cause: ExitCause::TimedOut,
                    },
                    Failure::Cancelled if t.stop_asked => End::stopped(),
                    Failure::Cancelled => End::Exit {
                        code: exit_code,
                        signal: Some(15),
                        cause: ExitCause::Exited,
                    },
                    Failure::NodeFailure => End::Lost(format!(
                        "{kind} reported a node failure under job {remote} of pool {}: {message}",
                        self.config.name
                    )),
                    Failure::Rejected => {
                        // It may still wait inside the engine: take it out.
                        let _ = self.driver.cancel(remote).await;
                        End::spawn_failed(message)
                    }
                }
            }
            RemoteState::Queued { .. } | RemoteState::Running => End::stopped(),
        }
    }

    /// Shows on a job that its engine keeps it waiting, and why: its reason
    /// (while `scheduled`) and, the first time, an event. The job stays
    /// placed (it runs next there); accounting bills it from its start.
    /// Not waited on: the pool's loop does not stall on the store for it.
    fn note_queued(&self, key: (JobId, u32), text: String, first: bool) {
        let staged = {
            let mut state = self.shared.state.lock().expect("state lock");
            let current = state.jobs.get(&key.0).is_some_and(|j| {
                j.attempt == key.1 && j.state == tessera_core::JobState::Scheduled
            });
            if !current {
                return;
            }
            let mut writes = Vec::new();
            let now = now_ms();
            state.update_job(key.0, &mut writes, |j| {
                j.reason = Some(text.clone());
                first.then(|| Event::new(j.id, now, "pool", text))
            });
            self.shared.stage(writes)
        };
        tokio::spawn(staged.durable());
    }

    /// Records the engine's own words about a job on it (as an event).
    async fn note(&self, t: &Tracked, message: String) {
        let staged = {
            let mut state = self.shared.state.lock().expect("state lock");
            if state.jobs.get(&t.job.job_id).map(|j| j.attempt) != Some(t.job.attempt) {
                return;
            }
            let mut writes = Vec::new();
            state.add_event(
                Event::new(t.job.job_id, now_ms(), "pool", message),
                &mut writes,
            );
            self.shared.stage(writes)
        };
        staged.durable().await;
    }

    async fn end(&self, t: &Tracked, end: End) {
        let keys: Vec<ReplicaKey> = t
            .replicas
            .iter()
            .map(|&replica| ReplicaKey {
                job_id: t.job.job_id,
                attempt: t.job.attempt,
                replica,
            })
            .collect();
        match end {
            End::Exit {
                code,
                signal,
                cause,
            } => self.report_keys(
                &keys,
                End::Exit {
                    code,
                    signal,
                    cause,
                },
            ),
            End::Lost(reason) => {
                let staged = {
                    let mut state = self.shared.state.lock().expect("state lock");
                    let current = state
                        .jobs
                        .get(&t.job.job_id)
                        .is_some_and(|j| j.attempt == t.job.attempt && j.state.is_active());
                    if !current {
                        return;
                    }
                    let mut writes = Vec::new();
                    let mut stops = Vec::new();
                    crate::fleet::lose_job(
                        &self.shared,
                        &mut state,
                        t.job.job_id,
                        &self.node,
                        &reason,
                        now_ms(),
                        &mut writes,
                        &mut stops,
                    );
                    let staged = self.shared.stage(writes);
                    crate::fleet::send_all(&self.shared, stops);
                    staged
                };
                staged.durable().await;
                self.shared.changed();
            }
        }
    }

    fn report_keys(&self, keys: &[ReplicaKey], end: End) {
        let End::Exit {
            code,
            signal,
            cause,
        } = end
        else {
            return;
        };
        let at = now_ms();
        for key in keys {
            self.report(FromAgent::Exited {
                key: *key,
                code,
                signal,
                cause: cause.clone(),
                at,
                workdir: None,
            });
        }
    }

    fn report(&self, event: FromAgent) {
        let _ = self.shared.reports.send(AgentReport {
            from: Some(self.node.clone()),
            event,
        });
    }
}

impl End {
    fn stopped() -> End {
        End::Exit {
            code: None,
            signal: None,
            cause: ExitCause::Stopped,
        }
    }

    fn spawn_failed(why: String) -> End {
        End::Exit {
            code: None,
            signal: None,
            cause: ExitCause::SpawnFailed(why),
        }
    }
}

fn spawn_failed(why: String) -> End {
    End::spawn_failed(why)
}

/// [`pool_job`] as the engine behind `pool` gets it: the
/// selector labels that the pool's node carries were met by placing the
/// job in this pool (`pool`, `pool.kind`, the pool's labels), so the
/// engine is not asked to find them on its own nodes too.
fn engine_job(state: &ClusterState, pool: &PoolConfig, job: &Job, here: &[u32]) -> PoolJob {
    let mut pj = pool_job(pool, job, here);
    if let Some(n) = state.nodes.get(&node_name(&pool.name)) {
        pj.node_selector
            .retain(|k, v| n.inventory.labels.get(k) != Some(v));
    }
    pj
}

/// The pool's view of one attempt of a job whose replicas `here` it runs.
pub fn pool_job(pool: &PoolConfig, job: &Job, here: &[u32]) -> PoolJob {
    let spec = &job.spec;
    let mut env: Vec<(String, String)> = spec
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    env.extend(crate::job_data::input_env(job));
    env.push(("TESSERA_JOB_ID".into(), job.id.to_string()));
    env.push(("TESSERA_ATTEMPT".into(), job.attempt.to_string()));
    env.push(("TESSERA_NUM_REPLICAS".into(), spec.replicas.to_string()));
    if here.len() == 1 {
        env.push(("TESSERA_REPLICA".into(), here[0].to_string()));
    }
    let r = &spec.resources;
    PoolJob {
        key: PoolJob::key_in(&pool.key_prefix, job.id, job.attempt),
        job_id: job.id,
        attempt: job.attempt,
        name: spec.name.clone(),
        team: spec.team.clone(),
        argv: spec.argv.clone(),
        image: spec.image.clone(),
        env,
        workdir: spec.workdir.clone(),
        replicas: here.len() as u32,
        cpu_milli: r.cpu_milli,
        memory_bytes: r.memory_bytes,
        gpus: if r.gpu > 0 {
            r.gpu
        } else {
            (r.gpu_milli > 0) as u32
        },
        gpu_models: r.gpu_models.clone(),
        max_runtime_ms: spec.max_runtime_ms,
        node_selector: r.node_selector.clone(),
    }
}

// ---------- the REST API: /v1/pools ----------

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/pools", get(list).post(add))
        .route("/v1/pools/{name}", delete(remove))
}

/// Prices per resource-hour of a pool.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolPrices {
    pub cpu_core_hour: Option<f64>,
    pub memory_gib_hour: Option<f64>,
    pub gpu_hour: Option<f64>,
}

/// `POST /v1/pools`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolAdd {
    /// `slurm`.
    pub kind: String,
    pub name: String,
    /// Kind-specific settings (Slurm: `partition`, `output_dir`).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    #[serde(default)]
    pub prices: PoolPrices,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PoolView {
    pub name: String,
    pub kind: String,
    /// The node that stands for the pool in `tessera nodes`.
    pub node: String,
    pub options: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub prices: Prices,
    pub healthy: bool,
    pub message: Option<String>,
    pub nodes: u32,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub gpus: u32,
    /// What Tessera's jobs hold in the pool.
    pub allocated_cpu_milli: u64,
    pub allocated_memory_bytes: u64,
    pub allocated_gpus: u32,
    /// Tessera's jobs running in the pool.
    pub running: u32,
    /// Tessera's jobs handed to the engine and waiting inside it.
    pub queued_in_engine: u32,
    /// How many of Tessera's jobs may wait in the engine beyond its
    /// capacity now: about as many as end there per second, at most the
    /// `queue_ahead` option.
    pub queue_ahead: u32,
    /// What the engine reports in use (anyone's work).
    pub engine_used_cpu_milli: u64,
    pub engine_used_memory_bytes: u64,
    pub engine_used_gpus: u32,
    pub created_at: u64,
    pub checked_at: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PoolList {
    pub pools: Vec<PoolView>,
}

fn view(shared: &Shared, state: &ClusterState, c: &PoolConfig) -> PoolView {
    let node = node_name(&c.name);
    let h = shared.pools.get(&c.name);
    let alloc = state.allocations().remove(&node).unwrap_or_default();
    let inv = state.nodes.get(&node).map(|n| &n.inventory);
    let cap = h.capacity.clone().unwrap_or_default();
    PoolView {
        name: c.name.clone(),
        kind: c.kind.clone(),
        node,
        options: c.options.clone(),
        labels: inv.map(|i| i.labels.clone()).unwrap_or_default(),
        prices: c.prices,
        healthy: h.healthy,
        message: h.message.clone(),
        nodes: cap.nodes,
        cpu_milli: inv.map(|i| i.cpu_milli).unwrap_or(0),
        memory_bytes: inv.map(|i| i.memory_bytes).unwrap_or(0),
        gpus: inv.map(|i| i.gpus.len() as u32).unwrap_or(0),
        allocated_cpu_milli: alloc.cpu_milli,
        allocated_memory_bytes: alloc.memory_bytes,
        allocated_gpus: alloc.gpus_in_use() as u32,
        running: h.running_in_engine,
        queued_in_engine: h.queued_in_engine,
        queue_ahead: state.pool_ahead.get(&c.name).copied().unwrap_or(0),
        engine_used_cpu_milli: cap.used_cpu_milli,
        engine_used_memory_bytes: cap.used_memory_bytes,
        engine_used_gpus: cap.used_gpus,
        created_at: c.created_at,
        checked_at: h.checked_at,
    }
}

/// Pools with their capacity, what Tessera holds in them, and health.
#[utoipa::path(get, path = "/v1/pools", responses((status = 200, body = PoolList)))]
pub async fn list(State(shared): State<Arc<Shared>>, _caller: Caller) -> Json<PoolList> {
    Json(PoolList {
        pools: views(&shared),
    })
}

/// Every pool as `tessera pools` shows it (the API and the dashboard).
pub(crate) fn views(shared: &Shared) -> Vec<PoolView> {
    let state = shared.state.lock().expect("state lock");
    state
        .pools
        .values()
        .map(|c| view(shared, &state, c))
        .collect()
}

fn check_price(field: &str, v: Option<f64>) -> Result<f64, ApiError> {
    match v {
        None => Ok(0.0),
        Some(p) if p.is_finite() && p >= 0.0 => Ok(p),
        Some(p) => Err(ApiError::invalid(
            field,
            format!("{p} is not a price: use a number of at least 0"),
        )),
    }
}

fn check_label(k: &str, v: &str) -> Result<(), ApiError> {
    tessera_core::spec::validate_label_key("labels", k)?;
    if k == tessera_core::spec::POOL_LABEL || k == "pool.kind" {
        return Err(ApiError::invalid(
            &format!("labels.{k}"),
            format!("`{k}` is set by Tessera (the pool's name and kind)"),
        ));
    }
    tessera_core::spec::validate_label_value(&format!("labels.{k}"), v)?;
    Ok(())
}

fn engine_error(e: PoolError) -> ApiError {
    match e {
        PoolError::Rejected(m) => {
            let field = m
                .split_once(':')
                .map(|(f, _)| f)
                .filter(|f| !f.contains(' '))
                .map(|f| format!("options.{f}"));
            let err = ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "pool_rejected", m.clone());
            match field {
                Some(f) => err.with_field(f),
                None => err,
            }
        }
        other => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "pool_unavailable",
            format!("the pool's engine did not answer, so the pool was not added: {other}"),
        ),
    }
}

/// Adds a pool. Its engine must answer (its capacity is read first); a
/// pool that cannot be reached is not added, and nothing is written.
#[utoipa::path(post, path = "/v1/pools", request_body = PoolAdd,
    responses((status = 201, body = PoolView), (status = 409, body = crate::error::ErrorBody),
        (status = 422, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn add(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<PoolView>), ApiError> {
    caller.require_superuser("adding a pool")?;
    let body = body_bytes(body)?;
    let req: PoolAdd = parse_json(&body)?;
    tessera_core::spec::validate_name("name", &req.name)?;
    if req.name.len() > 63 - NODE_PREFIX.len() {
        return Err(ApiError::invalid(
            "name",
            format!("must be at most {} characters", 63 - NODE_PREFIX.len()),
        ));
    }
    let prices = Prices {
        cpu_core_hour: check_price("prices.cpu_core_hour", req.prices.cpu_core_hour)?,
        memory_gib_hour: check_price("prices.memory_gib_hour", req.prices.memory_gib_hour)?,
        gpu_hour: check_price("prices.gpu_hour", req.prices.gpu_hour)?,
    };
    for (k, v) in &req.labels {
        check_label(k, v)?;
    }
    let config = PoolConfig {
        name: req.name.clone(),
        kind: req.kind.clone(),
        options: req.options,
        prices,
        labels: req.labels,
        created_at: now_ms(),
        key_prefix: format!("{:08x}", rand::random::<u32>()),
    };
    let driver = driver_for(&config, &shared.home)?;
    let v = register(&shared, config, driver).await?;
    Ok((StatusCode::CREATED, Json(v)))
}

/// Adds a pool with its driver: checks the name is free, reads the
/// engine's capacity (an engine that does not answer adds nothing), stores
/// the pool and its node, and starts the pool's task. `POST /v1/pools`
/// comes here with the driver [`driver_for`] built; tests bring their own.
pub async fn register(
    shared: &Arc<Shared>,
    config: PoolConfig,
    driver: Arc<dyn PoolDriver>,
) -> Result<PoolView, ApiError> {
    let prices = config.prices;
    let _guard = shared.admin_lock.lock().await;
    let node = node_name(&config.name);
    {
        let state = shared.state.lock().expect("state lock");
        if state.pools.contains_key(&config.name) {
            return Err(ApiError::conflict(format!(
                "pool `{}` exists; remove it first to change it",
                config.name
            ))
            .with_field("name"));
        }
        if state.nodes.contains_key(&node) {
            return Err(ApiError::conflict(format!(
                "a node named `{node}` exists; the pool's node would take its name"
            ))
            .with_field("name"));
        }
    }
    let capacity = driver.capacity().await.map_err(engine_error)?;
    let now = now_ms();
    let n = Node {
        inventory: inventory(&config, &capacity),
        prices,
        state: NodeState::Ready,
        registered_at: now,
        last_heartbeat: now,
        drain_deadline: None,
    };
    let json = serde_json::to_string(&config).map_err(|e| ApiError::internal(e.to_string()))?;
    commit(
        shared.store.as_ref(),
        vec![
            Write::Meta(meta_key(&config.name), json),
            Write::Node(Box::new(n.clone())),
        ],
    )
    .await?;
    shared.pools.set(&config.name, |h| {
        h.healthy = true;
        h.capacity = Some(capacity);
        h.checked_at = now;
    });
    {
        let mut state = shared.state.lock().expect("state lock");
        state.nodes.insert(node.clone(), n);
        state.pools.insert(config.name.clone(), config.clone());
    }
    // The task takes the node's commands before any work can be placed there.
    start(shared, config.clone(), driver);
    let v = {
        let mut state = shared.state.lock().expect("state lock");
        state.connected.insert(node.clone());
        state.capacity_changed = true;
        view(shared, &state, &config)
    };
    info!(pool = %config.name, kind = %config.kind, "pool added");
    shared.wake.notify_one();
    Ok(v)
}

/// Removes a pool that runs no Tessera job.
#[utoipa::path(delete, path = "/v1/pools/{name}",
    responses((status = 204), (status = 404, body = crate::error::ErrorBody),
        (status = 409, body = crate::error::ErrorBody)))]
pub async fn remove(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    UrlPath(name): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_superuser("removing a pool")?;
    let _guard = shared.admin_lock.lock().await;
    let node = node_name(&name);
    let staged = {
        let mut state = shared.state.lock().expect("state lock");
        if !state.pools.contains_key(&name) {
            return Err(ApiError::not_found(format!("no pool `{name}`")));
        }
        let busy: Vec<String> = state
            .active
            .iter()
            .filter(|id| state.jobs[id].placement.iter().any(|p| p.node == node))
            .map(|id| id.to_string())
            .collect();
        if !busy.is_empty() {
            return Err(ApiError::conflict(format!(
                "pool `{name}` runs job(s) {}; cancel them or let them finish first",
                busy.join(", ")
            )));
        }
        state.pools.remove(&name);
        state.pool_ahead.remove(&name);
        state.nodes.remove(&node);
        state.connected.remove(&node);
        shared.agents.lock().expect("agents lock").remove(&node);
        shared.stage(vec![
            Write::DeleteMeta(meta_key(&name)),
            Write::DeleteNode(node),
        ])
    };
    staged.durable().await;
    shared.pools.forget(&name);
    info!(pool = %name, "pool removed");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(options: &[(&str, &str)]) -> PoolConfig {
        PoolConfig {
            name: "hpc".into(),
            kind: "slurm".into(),
            options: options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            prices: Prices::default(),
            labels: BTreeMap::new(),
            created_at: 0,
            key_prefix: "x".into(),
        }
    }

    #[test]
    fn backlog_offers_a_multiple_of_the_engines_capacity_and_is_checked() {
        let c = Capacity {
            nodes: 1,
            cpu_milli: 2000,
            memory_bytes: 4 << 30,
            gpus: vec![tessera_pools::GpuCount {
                model: "H100".into(),
                count: 2,
            }],
            largest_node: (2000, 4 << 30, 2),
            ..Capacity::default()
        };
        let plain = inventory(&config(&[]), &c);
        assert_eq!((plain.cpu_milli, plain.gpus.len()), (2000, 2));
        let twice = inventory(&config(&[("backlog", "2")]), &c);
        assert_eq!(twice.cpu_milli, 4000);
        assert_eq!(twice.memory_bytes, 8 << 30);
        assert_eq!(twice.gpus.len(), 4);
        assert_eq!(twice.labels["pool"], "hpc");
        let home = std::path::Path::new("/nonexistent");
        assert!(driver_for(&config(&[("backlog", "2")]), home).is_ok());
        for bad in ["0.5", "11", "lots"] {
            let e = driver_for(&config(&[("backlog", bad)]), home)
                .err()
                .unwrap();
            assert_eq!(e.field, "options.backlog", "{bad}");
        }
        let e = driver_for(&config(&[("queue", "1")]), home).err().unwrap();
        assert_eq!(e.field, "options.queue");
    }

    #[test]
    fn queue_ahead_is_bounded_can_be_turned_off_and_is_checked() {
        let home = std::path::Path::new("/nonexistent");
        assert_eq!(queue_ahead(&config(&[])).unwrap(), DEFAULT_QUEUE_AHEAD);
        assert_eq!(queue_ahead(&config(&[("queue_ahead", "0")])).unwrap(), 0);
        assert_eq!(queue_ahead(&config(&[("queue_ahead", "16")])).unwrap(), 16);
        assert!(driver_for(&config(&[("queue_ahead", "0"), ("backlog", "2")]), home).is_ok());
        for bad in ["-1", "1.5", "1001", "many"] {
            let e = driver_for(&config(&[("queue_ahead", bad)]), home)
                .err()
                .unwrap();
            assert_eq!(e.field, "options.queue_ahead", "{bad}");
        }
        // The capacity offered stays the engine's: jobs waiting ahead are
        // not room a job could run in (the scheduler's view adds them).
        let c = Capacity {
            nodes: 1,
            cpu_milli: 2000,
            memory_bytes: 4 << 30,
            largest_node: (2000, 4 << 30, 0),
            ..Capacity::default()
        };
        let inv = inventory(&config(&[]), &c);
        assert_eq!((inv.cpu_milli, inv.memory_bytes), (2000, 4 << 30));
        assert!(
            inv.limits_note.contains("at most 32"),
            "{}",
            inv.limits_note
        );
        let off = inventory(&config(&[("queue_ahead", "0")]), &c);
        assert!(!off.limits_note.contains("at most"), "{}", off.limits_note);
    }

    #[test]
    fn the_queue_ahead_follows_how_many_jobs_end_per_second_within_bounds() {
        // Ends over the last 5 s: one per second's worth, rounded.
        assert_eq!(effective_queue_ahead(32, 0), 0, "nothing ends: none ahead");
        assert_eq!(effective_queue_ahead(32, 2), 0, "long jobs: none ahead");
        assert_eq!(effective_queue_ahead(32, 3), 1);
        assert_eq!(effective_queue_ahead(32, 10), 2, "2 slots of 1-s jobs");
        assert_eq!(effective_queue_ahead(32, 5000), 32, "at most the option");
        assert_eq!(effective_queue_ahead(0, 5000), 0, "off stays off");
    }
}
