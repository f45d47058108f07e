//! The `tessera` binary.
//!
//! This crate owns the command line: argument parsing and dispatch (here),
//! client configuration and the HTTP client for the REST API
//! ([`client`]), human and JSON output ([`output`]), the API subcommands
//! ([`commands`], [`run`]) and the benchmarks ([`bench`]). `tessera up`
//! hands over to [`tessera_server::run_up`]; everything else talks to a
//! running server over HTTP, except `tessera bench scheduler`, which calls
//! the scheduler in-process.
//!
//! Exit codes: 0 on success, 1 when the server or the network reports an
//! error, 2 on usage errors; `tessera run --follow` exits with the job's
//! exit code.

mod bench;
mod bench_fleet;
mod client;
mod commands;
mod data;
mod fleet;
mod gateway_cmd;
mod output;
mod pools;
mod run;
mod serving;
mod usage;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tessera_core::quantity::{parse_cpu, parse_duration, parse_memory};

use crate::client::{Client, ClientConfig};
use crate::output::Output;

#[derive(Debug, Parser)]
#[command(
    name = "tessera",
    version,
    about = "Tessera: run batch jobs on a pool of GPU and CPU machines",
    propagate_version = true
)]
struct Cli {
    /// Server URL [default: `url` in $TESSERA_HOME/config, else http://127.0.0.1:7700]
    #[arg(
        long,
        env = "TESSERA_URL",
        global = true,
        help_heading = "Global options",
        value_name = "URL"
    )]
    url: Option<String>,
    /// API token [default: the contents of $TESSERA_HOME/admin.token]
    #[arg(
        long,
        env = "TESSERA_TOKEN",
        help_heading = "Global options",
        global = true,
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
    /// Tessera's home directory [default: ~/.tessera]
    #[arg(
        long,
        env = "TESSERA_HOME",
        global = true,
        help_heading = "Global options",
        value_name = "DIR"
    )]
    home: Option<PathBuf>,
    /// Output format
    #[arg(short, long, global = true, help_heading = "Global options", value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the control plane and a local agent on this machine (runs until Ctrl-C)
    Up(UpArgs),
    /// Start the control plane alone; remote agents bring the machines
    Server(fleet::ServerArgs),
    /// Run this machine as a node of a remote control plane
    Agent(fleet::AgentArgs),
    /// Datasets: create, upload, ls, show, head, query, clean, export, grant
    Data {
        #[command(subcommand)]
        command: data::DataCommand,
    },
    /// Mint join tokens for new nodes
    #[command(name = "join-token")]
    JoinToken {
        #[command(subcommand)]
        command: fleet::JoinTokenCommand,
    },
    /// Create or update a service from its spec (YAML or JSON; `-` reads stdin)
    Serve {
        /// The spec file, or with --delete the service's name
        #[arg(value_name = "FILE")]
        file: String,
        /// Delete the service named FILE (its replicas are stopped)
        #[arg(long)]
        delete: bool,
    },
    /// List services: version, ready/wanted replicas, URL
    Services,
    /// Run the service gateway alone (routes come from the control plane)
    Gateway(gateway_cmd::GatewayArgs),
    /// Show one service: replicas, placements, events and autoscaler decisions
    Service {
        /// Service name
        name: String,
    },
    /// Set a service's replica bounds
    Scale {
        /// Service name
        name: String,
        #[arg(long)]
        min: Option<i64>,
        #[arg(long)]
        max: Option<i64>,
    },
    /// Mint keys that may call a service through the gateway
    #[command(name = "service-key")]
    ServiceKey {
        #[command(subcommand)]
        command: serving::ServiceKeyCommand,
    },
    /// Drain, cordon, uncordon or remove a node
    Node {
        #[command(subcommand)]
        command: fleet::NodeCommand,
    },
    /// Run a command as a job: `tessera run [FLAGS] -- CMD ARGS...`
    Run(run::RunArgs),
    /// Submit a job spec file (YAML or JSON; `-` reads stdin)
    Submit {
        /// The spec file, or `-` for stdin
        #[arg(value_name = "FILE")]
        file: String,
    },
    /// List jobs, newest first
    Jobs(JobsArgs),
    /// Show one job in detail, with its events
    Job {
        /// Job id
        id: u64,
    },
    /// Print a job's logs (combined stdout and stderr) as they arrive
    Logs(LogsArgs),
    /// Cancel a job
    Cancel {
        /// Job id
        id: u64,
    },
    /// List nodes with their capacity and what is allocated
    Nodes,
    /// Add or remove a pool: an engine (Slurm) Tessera hands work to
    Pool {
        #[command(subcommand)]
        command: pools::PoolCommand,
    },
    /// List pools: capacity, in use, queued, price, health
    Pools,
    /// Manage teams (no subcommand: list them)
    #[command(visible_alias = "teams")]
    Team {
        #[command(subcommand)]
        command: Option<TeamCommand>,
    },
    /// Manage API tokens (no subcommand: list them)
    #[command(visible_alias = "tokens")]
    Token {
        #[command(subcommand)]
        command: Option<TokenCommand>,
    },
    /// GPU-hours, CPU-hours and cost per team, pool or job over a time range
    Usage(usage::UsageArgs),
    /// Replay a GPU-cluster trace through the scheduler in virtual time
    Sim(tessera_sim::SimArgs),
    /// Measure the scheduler, the API or the whole path
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

#[derive(Debug, Args)]
struct UpArgs {
    /// Address the API listens on
    #[arg(long, default_value = "127.0.0.1:7700", value_name = "ADDR")]
    listen: SocketAddr,
    /// Route `Host: <service>.<DOMAIN>` to services at the built-in gateway
    #[arg(long, value_name = "DOMAIN")]
    gateway_domain: Option<String>,
    /// CPU cores the local agent offers [default: all]
    #[arg(long, value_parser = cpu_milli, value_name = "CORES")]
    cpu: Option<u64>,
    /// Memory the local agent offers, e.g. `8Gi` [default: all]
    #[arg(long, value_parser = memory_bytes, value_name = "SIZE")]
    memory: Option<u64>,
    /// Read GPUs from this `nvidia-smi -q -x` output instead of probing
    #[arg(long, value_name = "FILE")]
    gpu_xml: Option<PathBuf>,
    /// Name of the local node [default: the host name]
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    /// Labels of the local node as k=v,k=v (jobs select nodes by them)
    #[arg(long, value_name = "K=V,...", value_parser = fleet::labels)]
    labels: Option<std::collections::BTreeMap<String, String>>,
    /// Do not enforce CPU and memory limits with cgroups
    #[arg(long)]
    no_cgroups: bool,
    /// Time between SIGTERM and SIGKILL when a replica is stopped
    #[arg(long, value_parser = duration_ms, default_value = "10s", value_name = "DURATION")]
    kill_grace: u64,
    /// Scheduling policy: fifo, fifo-backfill, sjf-oracle, srtf-oracle, las, tiresias, drf, tessera
    #[arg(long, default_value = "tessera", value_parser = policy_name)]
    policy: String,
    /// How long a dataset version staged for jobs is kept on disk after its
    /// last use once no unfinished job reads it
    #[arg(long, value_parser = duration_ms, default_value = "1h", value_name = "DURATION")]
    staged_inputs_idle: u64,
    #[command(flatten)]
    prices: usage::PriceArgs,
    #[command(flatten)]
    tls: fleet::TlsArgs,
}

pub(crate) fn policy_name(s: &str) -> Result<String, String> {
    if tessera_scheduler::Policy::named(s).is_some() {
        Ok(s.to_string())
    } else {
        Err(format!(
            "unknown policy; use one of {}",
            tessera_scheduler::Policy::NAMES.join(", ")
        ))
    }
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    /// Only this team's jobs
    #[arg(long)]
    pub team: Option<String>,
    /// Only jobs in this state (queued, scheduled, running, succeeded, failed, cancelled, lost)
    #[arg(long, value_parser = job_state)]
    pub state: Option<String>,
    /// Only jobs with this name
    #[arg(long)]
    pub name: Option<String>,
    /// Jobs per page
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Fetch every page, not just the first
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Job id
    pub id: u64,
    /// Keep printing until the job ends
    #[arg(short, long)]
    pub follow: bool,
    /// Which replica of a gang
    #[arg(long, default_value_t = 0)]
    pub replica: u32,
    /// Which attempt [default: the latest]
    #[arg(long)]
    pub attempt: Option<u32>,
}

#[derive(Debug, Subcommand)]
enum TeamCommand {
    /// Create a team
    Create {
        /// Team name: lowercase letters, digits and `-`
        name: String,
        /// Fair-share weight
        #[arg(long, default_value_t = 1.0)]
        weight: f64,
        /// Quota as RESOURCE=GUARANTEED[:LIMIT], e.g. `gpu=4:8`, `memory=64Gi`; repeat per resource
        #[arg(long = "quota", value_name = "RESOURCE=G[:L]")]
        quota: Vec<String>,
    },
    /// Change a team's weight or quota (a given quota replaces the old one)
    Set {
        name: String,
        #[arg(long)]
        weight: Option<f64>,
        /// Quota as RESOURCE=GUARANTEED[:LIMIT]; `--quota none` removes it
        #[arg(long = "quota", value_name = "RESOURCE=G[:L]")]
        quota: Vec<String>,
    },
    /// List teams
    List,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token; its secret is shown once
    Create {
        /// The token's team
        #[arg(long)]
        team: String,
        /// What the token may do
        #[arg(long, value_parser = ["admin", "member", "viewer"])]
        role: String,
        /// A name to recognise the token by
        #[arg(long)]
        name: Option<String>,
    },
    /// List tokens (secrets are never shown again)
    List,
    /// Delete a token
    Delete {
        /// Token id
        id: String,
    },
}

/// `--cpu`: cores as millicores.
pub fn cpu_milli(s: &str) -> Result<u64, String> {
    parse_cpu(s).map_err(|e| e.0)
}

/// `--memory`: bytes.
pub fn memory_bytes(s: &str) -> Result<u64, String> {
    parse_memory(s).map_err(|e| e.0)
}

/// A duration in milliseconds.
pub fn duration_ms(s: &str) -> Result<u64, String> {
    parse_duration(s).map_err(|e| e.0)
}

fn job_state(s: &str) -> Result<String, String> {
    match tessera_core::JobState::parse(s) {
        Some(state) => Ok(state.as_str().to_string()),
        None => {
            let all: Vec<&str> = tessera_core::JobState::ALL
                .iter()
                .map(|s| s.as_str())
                .collect();
            Err(format!("unknown state; use one of {}", all.join(", ")))
        }
    }
}

/// A mistake in what the user typed that clap cannot see (exit code 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// What every command may need: where the server is and how to print.
pub struct Globals {
    url: Option<String>,
    token: Option<String>,
    home: Option<PathBuf>,
    pub output: Output,
}

impl Globals {
    pub(crate) fn home(&self) -> Result<PathBuf> {
        match &self.home {
            Some(h) => Ok(h.clone()),
            None => client::default_home(),
        }
    }

    /// A client for the configured server; fails when there is no token.
    pub fn client(&self) -> Result<Client> {
        let home = self.home()?;
        let config = ClientConfig::resolve(self.url.as_deref(), self.token.as_deref(), &home)?;
        let trust = client::resolve_trust(&config.url, &home)?;
        Client::with_trust(config, trust)
    }
}

async fn up(globals: &Globals, args: UpArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let home = globals.home()?;
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&home)
            .with_context(|| format!("cannot create Tessera's home {}", home.display()))?;
    }
    let mut config = tessera_server::UpConfig::new(home, args.listen);
    config.agent_cpu_milli = args.cpu;
    config.agent_memory_bytes = args.memory;
    config.agent_gpu_xml = args.gpu_xml;
    config.agent_labels = args.labels.unwrap_or_default();
    config.agent_name = args.node_name;
    config.cgroups = !args.no_cgroups;
    config.kill_grace = Duration::from_millis(args.kill_grace);
    config.policy = tessera_scheduler::Policy::named(&args.policy).expect("checked by clap");
    config.gateway_domain = args.gateway_domain;
    config.tls = args.tls.source();
    config.prices = args.prices.prices()?;
    config.lake = Some(data::lake_opener());
    config.staged_inputs_idle = Duration::from_millis(args.staged_inputs_idle);
    tessera_server::run_up(config).await
}

/// Runs one command; the number is the process exit code.
async fn dispatch(cli: Cli) -> Result<u8> {
    let globals = Globals {
        url: cli.url,
        token: cli.token,
        home: cli.home,
        output: cli.output,
    };
    let g = &globals;
    if g.output == Output::Csv && !matches!(cli.command, Command::Usage(_)) {
        return Err(
            UsageError("`--output csv` is for `tessera usage`; use table or json".into()).into(),
        );
    }
    match cli.command {
        Command::Up(args) => up(g, args).await?,
        Command::Server(args) => fleet::server(g, args).await?,
        Command::Agent(args) => fleet::agent(g, args).await?,
        Command::Data { command } => data::data(g, command).await?,
        Command::JoinToken { command } => fleet::join_token(g, command).await?,
        Command::Node { command } => fleet::node(g, command).await?,
        Command::Serve { file, delete } => serving::serve(g, &file, delete).await?,
        Command::Services => serving::services(g).await?,
        Command::Gateway(args) => gateway_cmd::gateway(g, args).await?,
        Command::Service { name } => serving::service(g, &name).await?,
        Command::Scale { name, min, max } => serving::scale(g, &name, min, max).await?,
        Command::ServiceKey { command } => serving::service_key(g, command).await?,
        Command::Run(args) => return run::run(g, args).await,
        Command::Submit { file } => commands::submit(g, &file).await?,
        Command::Jobs(args) => commands::jobs(g, &args).await?,
        Command::Job { id } => commands::job(g, id).await?,
        Command::Logs(args) => commands::logs(g, &args).await?,
        Command::Cancel { id } => commands::cancel(g, id).await?,
        Command::Nodes => commands::nodes(g).await?,
        Command::Pool { command } => pools::pool(g, command).await?,
        Command::Pools => pools::pools(g).await?,
        Command::Team { command } => match command {
            Some(TeamCommand::Create {
                name,
                weight,
                quota,
            }) => commands::team_create(g, &name, weight, &quota).await?,
            Some(TeamCommand::Set {
                name,
                weight,
                quota,
            }) => commands::team_set(g, &name, weight, &quota).await?,
            Some(TeamCommand::List) | None => commands::team_list(g).await?,
        },
        Command::Token { command } => match command {
            Some(TokenCommand::Create { team, role, name }) => {
                commands::token_create(g, &team, &role, name.as_deref()).await?
            }
            Some(TokenCommand::List) | None => commands::token_list(g).await?,
            Some(TokenCommand::Delete { id }) => commands::token_delete(g, &id).await?,
        },
        Command::Bench { command } => bench::bench(g, command).await?,
        Command::Usage(args) => usage::usage(g, &args).await?,
        Command::Sim(args) => tessera_sim::run_cli(args, g.output == Output::Json)?,
    }
    Ok(0)
}

/// Whether the error is stdout going away (`tessera logs 1 | head`).
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tessera").chain(args.iter().copied()))
    }

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli = parse(&["jobs", "-o", "json", "--url", "http://x:1", "--all"]).unwrap();
        assert_eq!(cli.output, Output::Json);
        assert_eq!(cli.url.as_deref(), Some("http://x:1"));
        assert!(matches!(
            cli.command,
            Command::Jobs(JobsArgs { all: true, .. })
        ));
    }

    #[test]
    fn up_flags_are_parsed_into_units() {
        let cli = parse(&[
            "up",
            "--cpu",
            "2",
            "--memory",
            "8Gi",
            "--kill-grace",
            "1m",
            "--no-cgroups",
        ])
        .unwrap();
        let Command::Up(a) = cli.command else {
            panic!("not up")
        };
        assert_eq!(a.cpu, Some(2000));
        assert_eq!(a.memory, Some(8 << 30));
        assert_eq!(a.kill_grace, 60_000);
        assert!(a.no_cgroups);
        assert_eq!(a.listen, "127.0.0.1:7700".parse().unwrap());
        let e = parse(&["up", "--memory", "8Qi"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("--memory"), "{e}");
    }

    #[test]
    fn teams_alias_lists() {
        let cli = parse(&["teams"]).unwrap();
        assert!(matches!(cli.command, Command::Team { command: None }));
        let cli = parse(&["team", "create", "ml", "--weight", "2"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Team {
                command: Some(TeamCommand::Create { .. })
            }
        ));
    }

    #[test]
    fn bad_states_and_roles_are_usage_errors() {
        let e = parse(&["jobs", "--state", "done"]).unwrap_err();
        assert!(e.to_string().contains("queued"), "{e}");
        let e = parse(&["token", "create", "--team", "ml", "--role", "owner"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }
}
