//! Fleet commands: `tessera server` (the control plane alone), `tessera
//! agent` (a remote node), join tokens and node administration.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::output::{self, format_time, key_values, Output};
use crate::{cpu_milli, duration_ms, memory_bytes, policy_name, Globals};

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address the API and agent connections listen on
    #[arg(long, default_value = "127.0.0.1:7700", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Scheduling policy: fifo, fifo-backfill, sjf-oracle, srtf-oracle, las, tiresias, drf, tessera
    #[arg(long, default_value = "tessera", value_parser = policy_name)]
    pub policy: String,
    /// How often agents heartbeat
    #[arg(long, value_parser = duration_ms, default_value = "5s", value_name = "DURATION")]
    pub heartbeat: u64,
    /// How long a node may be silent before it is declared lost and its work
    /// rescheduled [default: 40s, or longer when --heartbeat and --kill-grace need it]
    #[arg(long, value_parser = duration_ms, value_name = "DURATION")]
    pub node_lease: Option<u64>,
    /// Route `Host: <service>.<DOMAIN>` to services at the built-in gateway
    #[arg(long, value_name = "DOMAIN")]
    pub gateway_domain: Option<String>,
    /// Time between SIGTERM and SIGKILL when a replica is stopped
    #[arg(long, value_parser = duration_ms, default_value = "10s", value_name = "DURATION")]
    pub kill_grace: u64,
    /// How long a dataset version staged for jobs is kept on disk after its
    /// last use once no unfinished job reads it
    #[arg(long, value_parser = duration_ms, default_value = "1h", value_name = "DURATION")]
    pub staged_inputs_idle: u64,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub prices: crate::usage::PriceArgs,
}

/// HTTPS for the control plane (`tessera server`, `tessera up`).
#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// Serve HTTPS with a self-signed certificate made on first start
    /// ($TESSERA_HOME/tls/cert.pem) and reused after
    #[arg(long)]
    pub tls: bool,
    /// Serve HTTPS with this PEM certificate (chain, leaf first) instead
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Another name (DNS name or IP address) for the self-signed certificate,
    /// besides localhost, 127.0.0.1 and the host name; repeatable
    #[arg(
        long = "tls-san",
        value_name = "NAME",
        requires = "tls",
        conflicts_with = "tls_cert"
    )]
    pub tls_san: Vec<String>,
}

impl TlsArgs {
    pub fn source(&self) -> Option<tessera_server::tls::TlsSource> {
        use tessera_server::tls::TlsSource;
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => self.tls.then(|| TlsSource::SelfSigned {
                extra_names: self.tls_san.clone(),
            }),
        }
    }
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The control plane's URL, e.g. http://10.0.0.5:7700
    #[arg(long, value_name = "URL")]
    pub server: String,
    /// Join token (first start only; later starts use the node credential kept under the home)
    #[arg(
        long,
        env = "TESSERA_JOIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub join_token: Option<String>,
    /// Labels as k=v,k=v
    #[arg(long, value_name = "K=V,...", value_parser = labels)]
    pub labels: Option<BTreeMap<String, String>>,
    /// Node name [default: the host name]
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// CPU cores offered [default: all]
    #[arg(long, value_parser = cpu_milli, value_name = "CORES")]
    pub cpu: Option<u64>,
    /// Memory offered, e.g. `8Gi` [default: all]
    #[arg(long, value_parser = memory_bytes, value_name = "SIZE")]
    pub memory: Option<u64>,
    /// Read GPUs from this `nvidia-smi -q -x` output instead of probing
    #[arg(long, value_name = "FILE")]
    pub gpu_xml: Option<PathBuf>,
    /// Do not enforce CPU and memory limits with cgroups
    #[arg(long)]
    pub no_cgroups: bool,
    /// Time between SIGTERM and SIGKILL when a replica is stopped
    #[arg(long, value_parser = duration_ms, default_value = "10s", value_name = "DURATION")]
    pub kill_grace: u64,
    /// Keep replicas running when the server is unreachable past the lease
    /// (by default they are stopped, so a rescheduled copy never overlaps them)
    #[arg(long)]
    pub keep_running_when_disconnected: bool,
    /// For an https server: accept exactly the certificate with this
    /// fingerprint (printed by the server on start; kept after joining)
    #[arg(long, value_name = "sha256:HEX", conflicts_with = "ca")]
    pub pin: Option<String>,
    /// For an https server: trust the CA (or self-signed certificate) in
    /// this PEM file (kept after joining)
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

pub(crate) fn labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    use tessera_core::spec::{validate_label_key, validate_label_value};
    let mut out = BTreeMap::new();
    for pair in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("`{pair}` is not k=v"))?;
        validate_label_key("labels", k).map_err(|e| e.message)?;
        validate_label_value("labels", v).map_err(|e| e.message)?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

#[derive(Debug, Subcommand)]
pub enum JoinTokenCommand {
    /// Mint a join token; its secret is shown once
    Create {
        /// How long it admits nodes, e.g. `1h` [default: until revoked]
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
        /// How many nodes it may admit [default: any number]
        #[arg(long, value_name = "N")]
        uses: Option<u32>,
        /// A name to recognise it by
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Start nothing new on the node; running work finishes (or is requeued after --deadline)
    Drain {
        name: String,
        /// After this long, stop and requeue what still runs, e.g. `10m`
        #[arg(long, value_name = "DURATION")]
        deadline: Option<String>,
    },
    /// Start nothing new on the node; running work is left alone
    Cordon { name: String },
    /// Make a cordoned or drained node schedulable again
    Uncordon { name: String },
    /// Remove the node: revoke its credential, requeue its work, forget it
    Remove { name: String },
}

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn private_dir(home: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(home)
        .with_context(|| format!("cannot create Tessera's home {}", home.display()))
}

pub async fn server(g: &Globals, args: ServerArgs) -> Result<()> {
    init_logging();
    let home = g.home()?;
    private_dir(&home)?;
    let mut config = tessera_server::UpConfig::new(home, args.listen);
    config.local_agent = false;
    config.kill_grace = Duration::from_millis(args.kill_grace);
    config.heartbeat = Duration::from_millis(args.heartbeat);
    config.node_lease = args.node_lease.map(Duration::from_millis);
    config.gateway_domain = args.gateway_domain;
    config.policy = tessera_scheduler::Policy::named(&args.policy).expect("checked by clap");
    config.tls = args.tls.source();
    config.prices = args.prices.prices()?;
    config.lake = Some(crate::data::lake_opener());
    config.staged_inputs_idle = Duration::from_millis(args.staged_inputs_idle);
    tessera_server::run_up(config).await
}

pub async fn agent(g: &Globals, args: AgentArgs) -> Result<()> {
    init_logging();
    let home = g.home()?;
    private_dir(&home)?;
    let home = home.canonicalize()?;
    let mut config = tessera_agent::AgentConfig::new(&home);
    config.name = args.name;
    config.labels = args.labels.unwrap_or_default();
    config.cpu_milli = args.cpu;
    config.memory_bytes = args.memory;
    config.gpu_xml = args.gpu_xml;
    config.cgroups = !args.no_cgroups;
    config.kill_grace = Duration::from_millis(args.kill_grace);
    // One agent per home: a second would adopt the first one's replicas.
    let lock_path = home.join("agent.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| {
            anyhow::anyhow!(
                "another agent is running on {} ({e}); use another --home",
                home.display()
            )
        })?;
    let remote = tessera_agent::remote::RemoteConfig {
        server: crate::client::normalize_url(&args.server),
        join_token: args.join_token,
        keep_running_when_disconnected: args.keep_running_when_disconnected,
        trust: tessera_agent::tls::Trust {
            pin: args.pin,
            ca: args.ca.map(|ca| std::path::absolute(&ca).unwrap_or(ca)),
        },
    };
    tokio::select! {
        r = tessera_agent::remote::run(config, remote) => r,
        _ = shutdown_signal() => {
            // Replicas keep running: a restarted agent adopts them.
            tracing::info!("agent stopping; its replicas keep running and the next start adopts them");
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub async fn join_token(g: &Globals, command: JoinTokenCommand) -> Result<()> {
    let JoinTokenCommand::Create {
        expires,
        uses,
        name,
    } = command;
    let client = g.client()?;
    let created: Value = client
        .post_json(
            "/v1/join-tokens",
            &json!({ "expires": expires, "uses": uses, "name": name }),
        )
        .await?;
    if g.output == Output::Json {
        return output::print_json(&created);
    }
    let token = created["token"].as_str().unwrap_or_default();
    let expires = created["expires_at"]
        .as_u64()
        .map(|t| format_time(t, false))
        .unwrap_or_else(|| "never".into());
    let uses = created["uses"]
        .as_u64()
        .map(|u| u.to_string())
        .unwrap_or_else(|| "unlimited".into());
    output::print(&key_values(&[
        ("id", created["id"].as_str().unwrap_or_default().to_string()),
        ("token", token.to_string()),
        ("expires", expires),
        ("uses", uses),
    ]))?;
    output::print(&format!(
        "\nOn each machine: tessera agent --server {}{} --join-token {token}\n",
        client.url(),
        client.agent_trust_flags()
    ))?;
    Ok(())
}

pub async fn node(g: &Globals, command: NodeCommand) -> Result<()> {
    let client = g.client()?;
    let (name, result): (String, Option<Value>) = match command {
        NodeCommand::Drain { name, deadline } => {
            let v = client
                .post_json(
                    &format!("/v1/nodes/{name}/drain"),
                    &json!({ "deadline": deadline }),
                )
                .await?;
            (name, Some(v))
        }
        NodeCommand::Cordon { name } => {
            let v = client
                .post_json(&format!("/v1/nodes/{name}/cordon"), &json!({}))
                .await?;
            (name, Some(v))
        }
        NodeCommand::Uncordon { name } => {
            let v = client
                .post_json(&format!("/v1/nodes/{name}/uncordon"), &json!({}))
                .await?;
            (name, Some(v))
        }
        NodeCommand::Remove { name } => {
            client.delete(&format!("/v1/nodes/{name}")).await?;
            (name, None)
        }
    };
    match (g.output, result) {
        (Output::Json, Some(v)) => output::print_json(&v),
        (Output::Json, None) => output::print_json(&json!({ "node": name, "removed": true })),
        (_, Some(v)) => Ok(output::print(&format!(
            "node {name}: {} ({} replicas still running)\n",
            v["state"].as_str().unwrap_or("?"),
            v["running_replicas"].as_u64().unwrap_or(0)
        ))?),
        (_, None) => Ok(output::print(&format!("node {name} removed\n"))?),
    }
}
