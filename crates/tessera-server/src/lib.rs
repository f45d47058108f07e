//! Tessera's control plane: the REST API, authentication, the scheduling
//! loop, agent handling and metrics, and `tessera up`, which runs all of it
//! with a local agent in one process.
//!
//! This crate owns the in-memory working state ([`state::ClusterState`]) and
//! the order of effects: memory, then the store, then agents. It calls the
//! pure scheduler, the store through its trait and agents through protocol
//! messages; it does no scheduling, SQL or process management of its own.

pub mod api;
pub mod auth;
pub mod control;
pub mod error;
pub mod fleet;
pub mod job_data;
pub mod lake_api;
pub mod logs;
pub mod metrics;
pub mod pool_engines;
pub mod pools;
pub mod service_api;
pub mod services;
pub mod state;
pub mod tls;
pub mod ui;
pub mod usage;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tessera_agent::{Agent, AgentConfig};
use tessera_core::auth::{Role, Team, ADMIN_TEAM};
use tessera_core::node::NodeState;
use tessera_core::protocol::ToAgent;
use tessera_store::{commit, SqliteStore, Store, Write};
use tokio::sync::{mpsc, watch, Notify};
use tracing::info;

use crate::metrics::Metrics;
use crate::state::ClusterState;

/// Milliseconds since the Unix epoch: the only clock the control plane reads.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Everything the handlers and loops share.
pub struct Shared {
    pub store: Arc<dyn Store>,
    pub state: Mutex<ClusterState>,
    /// Wakes the scheduling loop.
    pub wake: Notify,
    /// Bumped whenever jobs change, for log followers.
    pub changes: watch::Sender<u64>,
    /// Connected agents by node name.
    pub agents: Mutex<HashMap<String, mpsc::UnboundedSender<ToAgent>>>,
    pub metrics: Metrics,
    /// `$TESSERA_HOME`: logs live under it.
    pub home: PathBuf,
    pub next_id: AtomicU64,
    pub kill_grace_ms: u64,
    /// Serialises rare admin writes that check-then-insert (teams).
    pub admin_lock: tokio::sync::Mutex<()>,
    /// Set on shutdown: nothing new is placed, stopped replicas count as lost.
    pub shutting_down: std::sync::atomic::AtomicBool,
    /// The scheduling policy.
    pub policy: tessera_scheduler::Policy,
    /// What nodes cost per resource-hour: the local node's price, and every
    /// remote node's, set when it registers.
    pub prices: tessera_core::node::Prices,
    /// How often agents heartbeat, and how long the server waits without
    /// one before it declares a node lost.
    pub heartbeat_ms: u64,
    pub node_lease_ms: u64,
    /// Services: replicas, readiness, routes, autoscaling.
    pub services: services::Services,
    /// The gateway serving `/s/<service>/`, when this process runs one.
    pub gateway: Option<Arc<tessera_gateway::Gateway>>,
    /// Reports from remote agents (and pools), to the report loop.
    pub reports: mpsc::UnboundedSender<control::AgentReport>,
    /// What each pool's task last saw (health, capacity, jobs in the engine).
    pub pools: pools::Pools,
    /// The data lake, when this server has one (`lake_api`).
    pub lake: Option<Arc<dyn tessera_core::lake::Lake>>,
    /// How long a staged input no unfinished job reads is kept after its
    /// last use ([`job_data::staged_inputs_loop`]).
    pub staged_inputs_idle: Duration,
    reports_rx: Mutex<Option<mpsc::UnboundedReceiver<control::AgentReport>>>,
    /// Jobs whose outputs are to be written, to the output writer.
    pub outputs: mpsc::UnboundedSender<tessera_core::JobId>,
    outputs_rx: Mutex<Option<mpsc::UnboundedReceiver<tessera_core::JobId>>>,
    /// The dashboard's history (`/ui`).
    pub ui: ui::UiState,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("home", &self.home).finish()
    }
}

impl Shared {
    pub fn new(
        store: Arc<dyn Store>,
        state: ClusterState,
        home: PathBuf,
        kill_grace: Duration,
    ) -> Shared {
        let next = state.max_job_id() + 1;
        let (reports, reports_rx) = mpsc::unbounded_channel();
        let (outputs, outputs_rx) = mpsc::unbounded_channel();
        Shared {
            outputs,
            outputs_rx: Mutex::new(Some(outputs_rx)),
            heartbeat_ms: tessera_agent::HEARTBEAT.as_millis() as u64,
            node_lease_ms: DEFAULT_NODE_LEASE.as_millis() as u64,
            reports,
            lake: None,
            staged_inputs_idle: DEFAULT_STAGED_INPUTS_IDLE,
            reports_rx: Mutex::new(Some(reports_rx)),
            pools: pools::Pools::default(),
            services: services::Services::new(Arc::new(services::NoRoutes)),
            gateway: None,
            store,
            state: Mutex::new(state),
            wake: Notify::new(),
            changes: watch::channel(0).0,
            agents: Mutex::new(HashMap::new()),
            metrics: Metrics::new(),
            home,
            next_id: AtomicU64::new(next),
            kill_grace_ms: kill_grace.as_millis() as u64,
            admin_lock: tokio::sync::Mutex::new(()),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            policy: tessera_scheduler::Policy::tessera(),
            ui: ui::UiState::default(),
            prices: tessera_core::node::Prices::default(),
        }
    }

    /// Embeds a gateway: services are published to it and it serves
    /// `/s/<service>/` on the API's listener. Call before sharing.
    /// With `domain`, `Host: <service>.<domain>` reaches the service too.
    pub fn with_gateway(&mut self, domain: Option<String>) {
        let gateway = tessera_gateway::Gateway::new(tessera_gateway::GatewayConfig {
            domain,
            ..tessera_gateway::GatewayConfig::default()
        });
        gateway.register_metrics(self.metrics.registry_mut());
        self.services = services::Services::new(Arc::new(services::GatewayRoutes {
            gateway: gateway.clone(),
        }));
        self.gateway = Some(gateway);
    }

    /// Starts the loops every control plane runs: scheduling, reports from
    /// remote agents, leases.
    pub fn spawn_loops(self: &Arc<Self>) {
        if let Some(rx) = self.reports_rx.lock().expect("reports lock").take() {
            tokio::spawn(control::agent_events_loop(self.clone(), rx));
        }
        tokio::spawn(control::scheduling_loop(self.clone()));
        if let Some(rx) = self.outputs_rx.lock().expect("outputs lock").take() {
            job_data::resume(self);
            tokio::spawn(job_data::outputs_loop(self.clone(), rx));
        }
        tokio::spawn(fleet::lease_loop(self.clone()));
        if self.lake.is_some() {
            tokio::spawn(job_data::staged_inputs_loop(self.clone()));
        }
        services::recover(self);
        if let Some(gw) = &self.gateway {
            // A request waiting for a first replica: scale from zero.
            let (tx, mut rx) = mpsc::unbounded_channel::<String>();
            gw.set_demand_hook(Arc::new(move |name: &str| {
                let _ = tx.send(name.to_string());
            }));
            let shared = self.clone();
            tokio::spawn(async move {
                while let Some(name) = rx.recv().await {
                    shared.services.demand(&name);
                }
            });
        }
        tokio::spawn(services::services_loop(self.clone()));
        tokio::spawn(ui::sampler(self.clone()));
        pools::start_all(self);
    }

    /// Tells log followers that jobs changed.
    pub fn changed(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Hands `writes` to the store. Call it while still holding the state
    /// lock that made the changes: the store then applies changes in the
    /// order memory did (whole job rows are written, so order matters). Wait
    /// for durability with [`Staged::durable`] after releasing the lock.
    pub fn stage(&self, writes: Vec<Write>) -> Staged {
        Staged((!writes.is_empty()).then(|| self.store.submit(writes)))
    }
}

/// Writes handed to the store, not yet known to be durable.
#[derive(Debug)]
#[must_use = "wait for the writes to be durable before acting on them"]
pub struct Staged(Option<tokio::sync::oneshot::Receiver<Result<(), tessera_store::StoreError>>>);

impl Staged {
    /// Waits until the writes are durable. Memory already holds these
    /// changes, so a store that cannot take them would leave memory and disk
    /// apart: the process stops instead (fail-stop), and the next start
    /// recovers from what is on disk.
    pub async fn durable(self) {
        let Some(rx) = self.0 else { return };
        let result = match rx.await {
            Ok(r) => r,
            Err(_) => Err(tessera_store::StoreError::Closed),
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "the store failed; stopping so that a restart recovers from disk");
            eprintln!("tessera: fatal: the store failed ({e}); stopping so that a restart recovers from disk");
            std::process::exit(70);
        }
    }
}

/// How long a node may be silent before it is declared lost, by default.
/// (Longer when the heartbeat and kill grace need it; see [`min_node_lease`].)
pub const DEFAULT_NODE_LEASE: Duration = Duration::from_secs(40);

/// How long a staged input that no unfinished job reads is kept after its
/// last use, by default.
pub const DEFAULT_STAGED_INPUTS_IDLE: Duration = Duration::from_secs(3600);

/// The shortest node lease that lets a cut-off agent stop its work (its own
/// lease of at least three heartbeats, then the kill grace, with a margin
/// for replica watchdogs) before the server reschedules it.
pub fn min_node_lease(heartbeat: Duration, kill_grace: Duration) -> Duration {
    let hb = heartbeat.as_millis() as u64;
    Duration::from_millis(4 * hb + kill_grace.as_millis() as u64 + 2000.max(hb) + 1000)
}

/// Settings of `tessera up`.
#[derive(Debug, Clone)]
pub struct UpConfig {
    pub home: PathBuf,
    pub listen: SocketAddr,
    pub agent_cpu_milli: Option<u64>,
    pub agent_memory_bytes: Option<u64>,
    pub agent_gpu_xml: Option<PathBuf>,
    /// Labels of the local node.
    pub agent_labels: std::collections::BTreeMap<String, String>,
    pub agent_name: Option<String>,
    pub cgroups: bool,
    pub kill_grace: Duration,
    /// Scheduling policy (one of `tessera_scheduler::Policy::NAMES`).
    pub policy: tessera_scheduler::Policy,
    /// What nodes cost per resource-hour (the local node, and remote nodes
    /// when they register).
    pub prices: tessera_core::node::Prices,
    /// Run a local agent in this process (`tessera up`); without one, the
    /// process is the control plane alone (`tessera server`) and remote
    /// agents bring the capacity.
    pub local_agent: bool,
    /// How often agents heartbeat.
    pub heartbeat: Duration,
    /// Route `Host: <service>.<domain>` to services at the embedded gateway.
    pub gateway_domain: Option<String>,
    /// How long a node may be silent before it is declared lost [default:
    /// [`DEFAULT_NODE_LEASE`] or [`min_node_lease`], whichever is longer].
    pub node_lease: Option<Duration>,
    /// Serve HTTPS with this certificate; plain HTTP without.
    pub tls: Option<tls::TlsSource>,
    /// Opens the data lake in the (locked) home; none: no lake.
    pub lake: Option<LakeOpener>,
    /// How long a staged input no unfinished job reads is kept after its
    /// last use [default: [`DEFAULT_STAGED_INPUTS_IDLE`]].
    pub staged_inputs_idle: Duration,
}

/// Opens a data lake given `$TESSERA_HOME` (after the home is locked).
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct LakeOpener(
    pub Arc<dyn Fn(&Path) -> anyhow::Result<Arc<dyn tessera_core::lake::Lake>> + Send + Sync>,
);

impl std::fmt::Debug for LakeOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LakeOpener")
    }
}

impl UpConfig {
    pub fn new(home: PathBuf, listen: SocketAddr) -> UpConfig {
        UpConfig {
            home,
            listen,
            agent_cpu_milli: None,
            agent_memory_bytes: None,
            agent_gpu_xml: None,
            agent_labels: Default::default(),
            agent_name: None,
            cgroups: true,
            kill_grace: Duration::from_secs(10),
            policy: tessera_scheduler::Policy::tessera(),
            prices: tessera_core::node::Prices::default(),
            local_agent: true,
            heartbeat: tessera_agent::HEARTBEAT,
            node_lease: None,
            tls: None,
            gateway_domain: None,
            lake: None,
            staged_inputs_idle: DEFAULT_STAGED_INPUTS_IDLE,
        }
    }
}

/// Creates the `admin` team and an admin token on first start; writes the
/// token to `admin.token` (mode 0600). Returns whether it did.
async fn bootstrap(
    store: &dyn Store,
    state: &mut ClusterState,
    home: &Path,
) -> anyhow::Result<bool> {
    if state.teams.contains_key(ADMIN_TEAM) {
        return Ok(false);
    }
    let now = now_ms();
    let team = Team {
        name: ADMIN_TEAM.into(),
        weight: 1.0,
        created_at: now,
        quota: None,
    };
    let (secret, record) = auth::mint("admin", ADMIN_TEAM, Role::Admin, now);
    // The token file first: if we crash before the commit, the next start
    // bootstraps again and overwrites it.
    write_private(&home.join("admin.token"), &format!("{secret}\n"))?;
    commit(
        store,
        vec![Write::Team(team.clone()), Write::Token(record.clone())],
    )
    .await
    .context("storing the admin team")?;
    state.teams.insert(team.name.clone(), team);
    state.tokens.insert(record.hash.clone(), record);
    Ok(true)
}

/// Takes an exclusive lock on `$TESSERA_HOME/lock` for the life of the process.
fn lock_home(home: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let path = home.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "another Tessera control plane is running on {} ({e}); stop it first or use another TESSERA_HOME",
            home.display()
        )
    })
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    tessera_agent::write_private(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Runs the control plane — with a local agent for `tessera up` — until
/// SIGINT or SIGTERM.
pub async fn run_up(config: UpConfig) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let heartbeat_ms = config.heartbeat.as_millis() as u64;
    let node_lease_ms = config
        .node_lease
        .unwrap_or_else(|| {
            DEFAULT_NODE_LEASE.max(min_node_lease(config.heartbeat, config.kill_grace))
        })
        .as_millis() as u64;
    let kill_grace_ms = config.kill_grace.as_millis() as u64;
    if heartbeat_ms == 0 {
        anyhow::bail!("--heartbeat must be more than zero");
    }
    if fleet::agent_lease_ms(node_lease_ms, heartbeat_ms, kill_grace_ms).is_none() {
        anyhow::bail!(
            "--node-lease ({}) is too short for --heartbeat {} and --kill-grace {}: it must be at least {}, so that a cut-off agent stops its work before the server reschedules it",
            tessera_core::quantity::format_duration(node_lease_ms),
            tessera_core::quantity::format_duration(heartbeat_ms),
            tessera_core::quantity::format_duration(kill_grace_ms),
            tessera_core::quantity::format_duration(
                min_node_lease(config.heartbeat, config.kill_grace).as_millis() as u64
            )
        );
    }
    let home = config.home.clone();
    std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
    let home = home.canonicalize()?;
    // One control plane per home: a second one would reap the first one's
    // replicas and run its jobs again.
    let _home_lock = lock_home(&home)?;
    // Bind before touching any state, so a start that cannot serve changes nothing.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let tls = match &config.tls {
        Some(source) => Some(tls::load(&home, source)?),
        None => None,
    };
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(home.join("tessera.db")).context("opening the database")?);
    let loaded = store.load().context("loading state")?;
    let mut state = ClusterState::from_loaded(loaded);
    let first = bootstrap(store.as_ref(), &mut state, &home).await?;

    let mut shared = Shared::new(store.clone(), state, home.clone(), config.kill_grace);
    shared.policy = config.policy.clone();
    shared.prices = config.prices;
    shared.heartbeat_ms = heartbeat_ms;
    shared.node_lease_ms = node_lease_ms;
    shared.staged_inputs_idle = config.staged_inputs_idle;
    shared.with_gateway(config.gateway_domain.clone());
    if let Some(open) = &config.lake {
        shared.lake = Some((open.0)(&home).context("opening the data lake")?);
    }
    let shared = Arc::new(shared);
    if !config.local_agent {
        // The control plane alone. Work placed on remote agents survives a
        // restart of the server: each node gets a whole lease from now to
        // reconnect and report what it runs before it is declared lost.
        let now = now_ms();
        for n in shared.state.lock().expect("state lock").nodes.values_mut() {
            n.last_heartbeat = now;
        }
        shared.spawn_loops();
        let url = write_client_config(&home, listener.local_addr()?, tls.as_ref())?;
        info!(%url, home = %home.display(), ready_ms = started.elapsed().as_millis() as u64,
            first_start = first, "Tessera control plane is up");
        eprintln!(
            "Tessera control plane is up at {url} (no local agent; state in {}; admin token in {})",
            home.display(),
            home.join("admin.token").display()
        );
        return serve(listener, shared, tls, async {
            shutdown_signal().await;
            info!("shutting down; agents keep their work running and reconnect to the next start");
        })
        .await;
    }

    let mut agent_config = AgentConfig::new(&home);
    agent_config.name = config.agent_name.clone();
    agent_config.cpu_milli = config.agent_cpu_milli;
    agent_config.memory_bytes = config.agent_memory_bytes;
    agent_config.gpu_xml = config.agent_gpu_xml.clone();
    agent_config.labels = config.agent_labels.clone();
    agent_config.cgroups = config.cgroups;
    agent_config.kill_grace = config.kill_grace;
    agent_config.heartbeat = config.heartbeat;
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let agent = Agent::new(agent_config, events_tx).context("starting the local agent")?;
    // Stop what an earlier run left running before its jobs are requeued.
    let reaped = agent.reap_orphans();
    if !reaped.is_empty() {
        info!(
            count = reaped.len(),
            "stopped replicas left running by an earlier run"
        );
    }
    let inventory = agent.inventory();
    let node_name = inventory.name.clone();
    // Recover jobs the last run was running, and register the local node
    // before the API answers, so submissions are checked against it.
    let writes = {
        let mut writes = Vec::new();
        let mut state = shared.state.lock().expect("state lock");
        writes.extend(control::recover_interrupted(&shared, &mut state, now_ms()));
        let now = now_ms();
        // The local agent of an earlier run is gone with it: nodes an earlier
        // run knew under other names (another host name, `--node-name`) and
        // that joined no other way are gone, and nothing may be placed on
        // them. Joined remote nodes get a lease to reconnect.
        let joined: std::collections::HashSet<String> = state
            .tokens
            .values()
            .filter_map(|t| match &t.kind {
                tessera_core::auth::TokenKind::Node { node } => Some(node.clone()),
                _ => None,
            })
            .collect();
        for n in state.nodes.values_mut() {
            n.last_heartbeat = now;
        }
        let stale: Vec<String> = state
            .nodes
            .values()
            .filter(|n| {
                n.inventory.name != node_name
                    && n.state != NodeState::Lost
                    && !joined.contains(&n.inventory.name)
                    && !pools::is_pool_node(&state, &n.inventory.name)
            })
            .map(|n| n.inventory.name.clone())
            .collect();
        for name in stale {
            if let Some(n) = state.nodes.get_mut(&name) {
                n.state = NodeState::Lost;
                writes.push(Write::Node(Box::new(n.clone())));
            }
        }
        let prev = state.nodes.get(&node_name).cloned();
        let node = tessera_core::node::Node {
            inventory,
            prices: config.prices,
            state: prev
                .as_ref()
                .map(|n| n.state)
                .filter(|s| *s != NodeState::Lost)
                .unwrap_or(NodeState::Ready),
            registered_at: prev.as_ref().map(|n| n.registered_at).unwrap_or(now),
            last_heartbeat: now,
            drain_deadline: prev.and_then(|n| n.drain_deadline),
        };
        writes.push(Write::Node(Box::new(node.clone())));
        state.nodes.insert(node_name.clone(), node);
        state.connected.insert(node_name.clone());
        writes
    };
    commit(store.as_ref(), writes)
        .await
        .context("recovering state")?;
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    shared
        .agents
        .lock()
        .expect("agents lock")
        .insert(node_name.clone(), cmd_tx);
    tokio::spawn(agent.run(cmd_rx));
    tokio::spawn(control::agent_events_loop(shared.clone(), events_rx));
    shared.spawn_loops();

    let url = write_client_config(&home, listener.local_addr()?, tls.as_ref())?;
    shared.wake.notify_one();
    info!(
        %url,
        node = %node_name,
        home = %home.display(),
        ready_ms = started.elapsed().as_millis() as u64,
        first_start = first,
        "Tessera is up"
    );
    eprintln!(
        "Tessera is up at {url} (node {node_name}; state in {}; admin token in {})",
        home.display(),
        home.join("admin.token").display()
    );
    let on_signal = {
        let shared = shared.clone();
        async move {
            shutdown_signal().await;
            // Stop the work first, so log followers see their jobs end and
            // their connections close.
            info!("shutting down: stopping running replicas");
            control::stop_all(&shared, config.kill_grace + Duration::from_secs(2)).await;
        }
    };
    serve(listener, shared, tls, on_signal).await
}

/// Writes `$TESSERA_HOME/config` for the command line: the URL and, for
/// TLS, the certificate's fingerprint (and the self-signed certificate's
/// file). Returns the URL.
fn write_client_config(
    home: &Path,
    addr: SocketAddr,
    tls: Option<&tls::ServerTls>,
) -> anyhow::Result<String> {
    let Some(tls) = tls else {
        let url = format!("http://{addr}");
        std::fs::write(home.join("config"), format!("url = {url}\n"))
            .context("writing the config file")?;
        return Ok(url);
    };
    let url = format!("https://{addr}");
    let mut text = format!("url = {url}\ntls_fingerprint = {}\n", tls.fingerprint);
    if let Some(ca) = &tls.self_signed {
        text.push_str(&format!("ca = {}\n", ca.display()));
    }
    std::fs::write(home.join("config"), text).context("writing the config file")?;
    info!(fingerprint = %tls.fingerprint, "serving HTTPS");
    eprintln!(
        "TLS certificate fingerprint: {} (agents: --pin {})",
        tls.fingerprint, tls.fingerprint
    );
    Ok(url)
}

async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    tls: Option<tls::ServerTls>,
    on_signal: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if let Some(tls) = tls {
        tls::serve(listener, api::router(shared), tls.acceptor, on_signal)
            .await
            .context("serving HTTPS")?;
        info!("stopped");
        return Ok(());
    }
    // Small streamed writes (log lines) must not wait for delayed ACKs.
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, api::router(shared))
        .with_graceful_shutdown(on_signal)
        .await
        .context("serving HTTP")?;
    info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
