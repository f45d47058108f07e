//! `tessera sim`: a deterministic discrete-event simulator that replays
//! GPU-cluster traces in virtual time through Tessera's real scheduler
//! ([`tessera_scheduler::schedule`], the same function the server calls).
//!
//! This crate owns trace parsing ([`trace`]: Philly, Alibaba openb pods and
//! nodes, Tessera JSON lines), the event loop that keeps a cluster's state
//! and applies the scheduler's plans ([`engine`]), the FGD-style packing
//! experiment ([`packing`]), the metrics and their tables ([`metrics`]) and
//! the `tessera sim` command line ([`SimArgs`], [`run_cli`]). It reads no
//! clock except to time itself, draws no randomness but its own seeded
//! [`rng`], and does no I/O beyond reading the trace files and printing.
//!
//! Modelling choices (see each module for detail):
//! - a job runs for its trace duration; a preempted job is requeued with
//!   its submit time kept and later needs only what it has not run yet
//!   (checkpoint and resume);
//! - at each distinct event time, completions, then arrivals, then
//!   scheduling passes until one neither places nor preempts; the
//!   scheduler is not consulted between events;
//! - Philly jobs wider than a node become gangs of whole nodes' worth of
//!   GPUs ([`trace::philly_shape`]);
//! - jobs no set of nodes could ever hold are dropped at load and counted.

pub mod engine;
pub mod metrics;
pub mod packing;
pub mod rng;
pub mod trace;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use tessera_scheduler::{infeasible_reason, NodeView, Packing, Policy};

pub use metrics::{EventReport, PackReport, Report};
use trace::SimJob;

/// Trace formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Microsoft Philly as flattened by Pollux (timestamp,duration,num_gpus,gpu_time,cluster)
    Philly,
    /// Alibaba GPU trace v2023 pod list (nodes from --node-file)
    Openb,
    /// JSON lines of {submit_s, duration_s, team, priority, spec}
    Tessera,
}

/// How the trace is replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Jobs arrive, wait, run for their duration and leave
    Events,
    /// Pods arrive in order and never leave; unplaceable pods are dropped (the FGD experiment)
    Packing,
}

/// `tessera sim`: replay a trace through the scheduler in virtual time.
/// Use the global `--output json` for machine-readable results.
#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// The trace file
    #[arg(long, value_name = "FILE")]
    pub trace: PathBuf,
    /// Trace format
    #[arg(long, value_enum, default_value_t = Format::Philly)]
    pub format: Format,
    /// Replay mode [default: packing for openb, events otherwise]
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Identical nodes to simulate (without --node-file)
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub nodes: u32,
    /// GPUs per node (without --node-file); also how Philly jobs are split into gangs
    #[arg(long, default_value_t = 8, value_name = "G")]
    pub gpus_per_node: u32,
    /// Nodes from a CSV (sn,cpu_milli,memory_mib,gpu,model) [default for openb:
    /// openb_node_list_gpu_node.csv beside the trace]
    #[arg(long, value_name = "FILE")]
    pub node_file: Option<PathBuf>,
    /// Scheduling policy; repeat or comma-separate for several, `all` for every one
    #[arg(
        long = "policy",
        value_name = "NAME",
        value_delimiter = ',',
        default_value = "tessera"
    )]
    pub policies: Vec<String>,
    /// Multiplies job durations and the gaps between arrivals (>1 slows the trace down, lowering load)
    #[arg(long, default_value_t = 1.0, value_name = "F")]
    pub time_scale: f64,
    /// Only the first N jobs (by submit time)
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Packing mode: shuffle the pods with this seed (default: trace order)
    #[arg(long)]
    pub seed: Option<u64>,
    /// Packing mode: run this many seeds (from --seed, default 42) and report the mean
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub seeds: u32,
    /// Packing mode: arrivals continue until the requested GPUs reach this multiple of capacity
    #[arg(long, default_value_t = 1.3, value_name = "X")]
    pub inflate: f64,
    /// Also write the JSON report to this file (whatever is printed)
    #[arg(long, value_name = "FILE")]
    pub save: Option<PathBuf>,
}

impl SimArgs {
    /// Arguments with defaults for a trace (handy in tests and scripts).
    pub fn new(trace: impl Into<PathBuf>, format: Format) -> SimArgs {
        SimArgs {
            trace: trace.into(),
            format,
            mode: None,
            nodes: 64,
            gpus_per_node: 8,
            node_file: None,
            policies: vec!["tessera".into()],
            time_scale: 1.0,
            limit: None,
            seed: None,
            seeds: 1,
            inflate: 1.3,
            save: None,
        }
    }

    fn mode(&self) -> Mode {
        self.mode.unwrap_or(match self.format {
            Format::Openb => Mode::Packing,
            _ => Mode::Events,
        })
    }
}

/// The policies named, `all` expanded, in order, without repeats.
pub fn policies(names: &[String]) -> Result<Vec<Policy>> {
    let mut out: Vec<Policy> = Vec::new();
    for n in names {
        let n = n.trim();
        let expanded: Vec<&str> = if n == "all" {
            Policy::NAMES.to_vec()
        } else {
            vec![n]
        };
        for name in expanded {
            let Some(p) = Policy::named(name) else {
                bail!(
                    "unknown policy `{name}`; use one of {}, or all",
                    Policy::NAMES.join(", ")
                );
            };
            if !out.iter().any(|q| q.name == p.name) {
                out.push(p);
            }
        }
    }
    if out.is_empty() {
        bail!("no policy given");
    }
    Ok(out)
}

/// A loaded trace: jobs in arrival order and the nodes.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub jobs: Vec<SimJob>,
    pub nodes: Vec<NodeView>,
    /// Jobs dropped because no set of nodes could ever hold them.
    pub infeasible: usize,
}

fn default_node_file(args: &SimArgs) -> Option<PathBuf> {
    if let Some(f) = &args.node_file {
        return Some(f.clone());
    }
    if args.format == Format::Openb {
        let dir = args.trace.parent().unwrap_or(Path::new("."));
        return Some(dir.join("openb_node_list_gpu_node.csv"));
    }
    None
}

/// Reads the trace and the nodes, sorts, scales and limits the jobs; in
/// events mode, drops those that could never run (in packing mode they
/// arrive and fail like any pod that does not fit).
pub fn load(args: &SimArgs) -> Result<Loaded> {
    let text = trace::read(&args.trace)?;
    let raw = match args.format {
        Format::Philly => trace::parse_philly(&text, args.gpus_per_node),
        Format::Openb => trace::parse_openb_pods(&text),
        Format::Tessera => trace::parse_tessera(&text),
    }
    .with_context(|| format!("cannot parse {}", args.trace.display()))?;
    let nodes = match default_node_file(args) {
        Some(f) => trace::parse_nodes(&trace::read(&f)?)
            .with_context(|| format!("cannot parse {}", f.display()))?,
        None => {
            if args.nodes == 0 {
                bail!("--nodes must be at least 1");
            }
            trace::uniform_nodes(args.nodes, args.gpus_per_node)
        }
    };
    let jobs = trace::prepare(raw, args.time_scale, args.limit)?;
    if args.mode() == Mode::Packing {
        return Ok(Loaded {
            jobs,
            nodes,
            infeasible: 0,
        });
    }
    let before = jobs.len();
    let mut kept: Vec<SimJob> = jobs
        .into_iter()
        .filter(|j| infeasible_reason(&nodes, &j.resources, j.replicas).is_none())
        .collect();
    for (i, j) in kept.iter_mut().enumerate() {
        j.id = i as u64;
    }
    Ok(Loaded {
        infeasible: before - kept.len(),
        jobs: kept,
        nodes,
    })
}

fn packing_name(p: &Policy) -> &'static str {
    match p.packing {
        Packing::BestFit => "best-fit",
        Packing::Fragmentation => "fragmentation",
    }
}

/// Runs every policy asked for (one after another) and returns a report
/// per policy.
pub fn run(args: &SimArgs) -> Result<Vec<Report>> {
    let policies = policies(&args.policies)?;
    let loaded = load(args)?;
    let total_gpus: u64 = loaded
        .nodes
        .iter()
        .map(|n| n.gpus.iter().filter(|g| g.healthy).count() as u64)
        .sum();
    let mut reports = Vec::new();
    match args.mode() {
        Mode::Events => {
            for p in policies {
                let t0 = Instant::now();
                let r = engine::simulate(&loaded.jobs, &loaded.nodes, p)?;
                let wall = t0.elapsed().as_secs_f64();
                reports.push(Report::Events(metrics::event_report(
                    &r,
                    &loaded.jobs,
                    total_gpus,
                    loaded.infeasible,
                    wall,
                )));
            }
        }
        Mode::Packing => {
            if args.seeds == 0 {
                bail!("--seeds must be at least 1");
            }
            let seeds: Vec<Option<u64>> = if args.seeds == 1 {
                vec![args.seed]
            } else {
                let base = args.seed.unwrap_or(42);
                (0..args.seeds as u64).map(|i| Some(base + i)).collect()
            };
            let capacity = total_gpus * 1000;
            for p in policies {
                let t0 = Instant::now();
                let packing = packing_name(&p);
                let mut runs = Vec::new();
                for seed in &seeds {
                    let arrivals = packing::arrivals(&loaded.jobs, capacity, args.inflate, *seed);
                    runs.push(packing::pack(&arrivals, &loaded.nodes, p.clone(), *seed)?);
                }
                let wall = t0.elapsed().as_secs_f64();
                reports.push(Report::Packing(metrics::pack_report(&runs, packing, wall)));
            }
        }
    }
    Ok(reports)
}

/// `tessera sim`: runs and prints a table (or, with `json`, a JSON array
/// with one object per policy).
pub fn run_cli(args: SimArgs, json: bool) -> Result<()> {
    let reports = run(&args)?;
    let json_text = serde_json::to_string_pretty(&reports)?;
    if let Some(path) = &args.save {
        std::fs::write(path, format!("{json_text}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let text = if json {
        json_text
    } else {
        metrics::render(&reports)
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests;
