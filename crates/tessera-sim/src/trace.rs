//! Trace formats: Microsoft Philly (as flattened by Pollux), Alibaba's GPU
//! trace v2023 ("openb": pods and nodes) and Tessera's own JSON lines. Each
//! parser turns its rows into [`SimJob`]s; [`prepare`] sorts them by submit
//! time, applies `--time-scale` and `--limit`, and numbers them.
//!
//! The CSV files are simple (no quoting, no embedded commas), so they are
//! read by hand, columns looked up by header name.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use tessera_core::{JobId, JobSpec, Resources};
use tessera_scheduler::NodeView;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// One job (or pod) of a trace, in plain units.
#[derive(Debug, Clone, PartialEq)]
pub struct SimJob {
    /// Position in arrival order, from 0 (set by [`prepare`]).
    pub id: JobId,
    /// 0-based data row in the trace file, for messages.
    pub row: usize,
    pub team: String,
    pub priority: i32,
    pub submit_ms: u64,
    /// How long it runs once started (its whole run, over all attempts).
    pub duration_ms: u64,
    /// Per replica.
    pub resources: Resources,
    pub replicas: u32,
    /// The job's own limit (Tessera specs only).
    pub max_runtime_ms: Option<u64>,
}

impl SimJob {
    /// GPU thousandths the whole job holds while it runs.
    pub fn gpu_milli(&self) -> u64 {
        self.resources.gpu_demand_milli() * self.replicas as u64
    }

    /// How long it actually runs: its duration, cut at its `max_runtime`.
    pub fn run_ms(&self) -> u64 {
        match self.max_runtime_ms {
            Some(m) => self.duration_ms.min(m),
            None => self.duration_ms,
        }
    }
}

/// A CSV file's header, for looking columns up by name.
struct Columns {
    index: HashMap<String, usize>,
    file: String,
}

impl Columns {
    fn new(header: &str, file: &str) -> Columns {
        Columns {
            index: header
                .split(',')
                .enumerate()
                .map(|(i, c)| (c.trim().to_string(), i))
                .collect(),
            file: file.to_string(),
        }
    }

    fn find(&self, name: &str) -> Result<usize> {
        self.index
            .get(name)
            .copied()
            .ok_or_else(|| anyhow!("{}: no column `{name}` in the header", self.file))
    }
}

fn field<'a>(cells: &[&'a str], i: usize, what: &str) -> Result<&'a str> {
    cells
        .get(i)
        .map(|c| c.trim())
        .ok_or_else(|| anyhow!("missing column `{what}`"))
}

fn num<T: std::str::FromStr>(cells: &[&str], i: usize, what: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    let s = field(cells, i, what)?;
    s.parse::<T>()
        .map_err(|e| anyhow!("column `{what}`: `{s}` is not a number ({e})"))
}

/// Data lines of a CSV text, with their 0-based data row numbers.
fn data_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .enumerate()
}

fn header(text: &str, file: &str) -> Result<Columns> {
    let first = text
        .lines()
        .next()
        .ok_or_else(|| anyhow!("{file}: the file is empty"))?;
    Ok(Columns::new(first, file))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400; // 0..=399
    let mp = (month as i64 + 9) % 12; // March = 0
    let doy = (153 * mp + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Seconds since the Unix epoch of `YYYY-MM-DD HH:MM:SS` (read as UTC).
pub fn parse_timestamp(s: &str) -> Result<i64> {
    let bad = || anyhow!("`{s}` is not a YYYY-MM-DD HH:MM:SS timestamp");
    let (date, time) = s.trim().split_once(' ').ok_or_else(bad)?;
    let d: Vec<&str> = date.split('-').collect();
    let t: Vec<&str> = time.split(':').collect();
    if d.len() != 3 || t.len() != 3 {
        return Err(bad());
    }
    let p = |x: &str| x.parse::<i64>().map_err(|_| bad());
    let (year, month, day) = (p(d[0])?, p(d[1])?, p(d[2])?);
    let (h, m, sec) = (p(t[0])?, p(t[1])?, p(t[2])?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return Err(bad());
    }
    Ok(days_from_civil(year, month as u32, day as u32) * 86_400 + h * 3600 + m * 60 + sec)
}

fn secs_to_ms(s: f64, what: &str) -> Result<u64> {
    if !s.is_finite() || s < 0.0 {
        bail!("{what} must be a non-negative number of seconds, got {s}");
    }
    Ok((s * 1000.0).round() as u64)
}

/// How a Philly job of `num_gpus` GPUs is shaped on nodes of
/// `gpus_per_node`: one replica when it fits a node, else a gang of
/// `ceil(num_gpus / gpus_per_node)` replicas with the GPUs split evenly
/// (rounded up): 16 → 2 × 8, 12 → 2 × 6, 24 → 3 × 8 on 8-GPU nodes.
/// Each replica gets 1 core and 1 GiB of memory per GPU (at least one of
/// each), so GPUs are the binding resource.
pub fn philly_shape(num_gpus: u32, gpus_per_node: u32) -> (Resources, u32) {
    let g = gpus_per_node.max(1);
    let (replicas, per) = if num_gpus <= g {
        (1, num_gpus)
    } else {
        let r = num_gpus.div_ceil(g);
        (r, num_gpus.div_ceil(r))
    };
    let res = Resources {
        cpu_milli: 1000 * per.max(1) as u64,
        memory_bytes: GIB * per.max(1) as u64,
        gpu: per,
        gpu_milli: 0,
        gpu_models: Vec::new(),
        node_selector: Default::default(),
    };
    (res, replicas)
}

/// Parses `philly.csv` (`timestamp,duration,num_gpus,gpu_time,cluster`).
/// Submit times count from the earliest job; the virtual cluster is the team.
pub fn parse_philly(text: &str, gpus_per_node: u32) -> Result<Vec<SimJob>> {
    let cols = header(text, "philly")?;
    let (c_ts, c_dur, c_gpus, c_team) = (
        cols.find("timestamp")?,
        cols.find("duration")?,
        cols.find("num_gpus")?,
        cols.find("cluster")?,
    );
    let mut rows = Vec::new();
    for (row, line) in data_lines(text) {
        let cells: Vec<&str> = line.split(',').collect();
        let parsed = (|| -> Result<(i64, f64, u32, String)> {
            Ok((
                parse_timestamp(field(&cells, c_ts, "timestamp")?)?,
                num::<f64>(&cells, c_dur, "duration")?,
                num::<u32>(&cells, c_gpus, "num_gpus")?,
                field(&cells, c_team, "cluster")?.to_string(),
            ))
        })()
        .with_context(|| format!("philly data row {}", row + 1))?;
        rows.push((row, parsed));
    }
    let first = rows.iter().map(|(_, p)| p.0).min().unwrap_or(0);
    rows.into_iter()
        .map(|(row, (ts, dur, gpus, team))| {
            let (resources, replicas) = philly_shape(gpus, gpus_per_node);
            Ok(SimJob {
                id: 0,
                row,
                team,
                priority: 0,
                submit_ms: (ts - first) as u64 * 1000,
                duration_ms: secs_to_ms(dur, "duration")
                    .with_context(|| format!("philly data row {}", row + 1))?,
                resources,
                replicas,
                max_runtime_ms: None,
            })
        })
        .collect()
}

/// Parses an openb pod list
/// (`name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time`).
///
/// `num_gpu = 1` with `0 < gpu_milli < 1000` is a share of one GPU;
/// `num_gpu ≥ 1` otherwise is whole GPUs; `num_gpu = 0` is CPU-only.
/// `gpu_spec` (`A|B`) lists allowed models. The QoS class stands in for the
/// team. Submit time is `creation_time`; the run time (used only outside
/// packing mode) is from `scheduled_time` (or `creation_time` for pods never
/// scheduled) to `deletion_time`.
pub fn parse_openb_pods(text: &str) -> Result<Vec<SimJob>> {
    let cols = header(text, "openb pods")?;
    let c = |n: &str| cols.find(n);
    let (c_cpu, c_mem, c_num, c_milli, c_spec, c_qos, c_created, c_deleted, c_sched) = (
        c("cpu_milli")?,
        c("memory_mib")?,
        c("num_gpu")?,
        c("gpu_milli")?,
        c("gpu_spec")?,
        c("qos")?,
        c("creation_time")?,
        c("deletion_time")?,
        c("scheduled_time")?,
    );
    let mut out = Vec::new();
    for (row, line) in data_lines(text) {
        let cells: Vec<&str> = line.split(',').collect();
        let job = (|| -> Result<SimJob> {
            let num_gpu = num::<u32>(&cells, c_num, "num_gpu")?;
            let milli = num::<u32>(&cells, c_milli, "gpu_milli")?;
            let (gpu, gpu_milli) = if num_gpu == 0 {
                (0, 0)
            } else if num_gpu == 1 && milli > 0 && milli < 1000 {
                (0, milli)
            } else if milli == 0 || milli == 1000 {
                (num_gpu, 0)
            } else {
                bail!("{num_gpu} GPUs of {milli} thousandths each: a share must be of one GPU");
            };
            let gpu_models: Vec<String> = field(&cells, c_spec, "gpu_spec")?
                .split('|')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(String::from)
                .collect();
            let created = num::<u64>(&cells, c_created, "creation_time")?;
            let sched = field(&cells, c_sched, "scheduled_time")?;
            let start = if sched.is_empty() {
                created
            } else {
                num::<u64>(&cells, c_sched, "scheduled_time")?
            };
            let deleted = field(&cells, c_deleted, "deletion_time")?;
            let end = if deleted.is_empty() {
                start
            } else {
                num::<u64>(&cells, c_deleted, "deletion_time")?
            };
            Ok(SimJob {
                id: 0,
                row,
                team: field(&cells, c_qos, "qos")?.to_string(),
                priority: 0,
                submit_ms: created * 1000,
                duration_ms: end.saturating_sub(start) * 1000,
                resources: Resources {
                    cpu_milli: num::<u64>(&cells, c_cpu, "cpu_milli")?,
                    memory_bytes: num::<u64>(&cells, c_mem, "memory_mib")? * MIB,
                    gpu,
                    gpu_milli,
                    gpu_models,
                    node_selector: Default::default(),
                },
                replicas: 1,
                max_runtime_ms: None,
            })
        })()
        .with_context(|| format!("openb pod data row {}", row + 1))?;
        out.push(job);
    }
    Ok(out)
}

/// Parses a node list (`sn,cpu_milli,memory_mib,gpu,model`), openb's
/// format; usable with any trace through `--node-file`.
pub fn parse_nodes(text: &str) -> Result<Vec<NodeView>> {
    let cols = header(text, "node file")?;
    let (c_sn, c_cpu, c_mem, c_gpu, c_model) = (
        cols.find("sn")?,
        cols.find("cpu_milli")?,
        cols.find("memory_mib")?,
        cols.find("gpu")?,
        cols.find("model")?,
    );
    let mut out = Vec::new();
    for (row, line) in data_lines(text) {
        let cells: Vec<&str> = line.split(',').collect();
        let node = (|| -> Result<NodeView> {
            Ok(NodeView::new(
                field(&cells, c_sn, "sn")?,
                num::<u64>(&cells, c_cpu, "cpu_milli")?,
                num::<u64>(&cells, c_mem, "memory_mib")? * MIB,
            )
            .with_gpus(
                num::<u32>(&cells, c_gpu, "gpu")?,
                field(&cells, c_model, "model")?,
            ))
        })()
        .with_context(|| format!("node file data row {}", row + 1))?;
        out.push(node);
    }
    Ok(out)
}

/// `count` identical nodes of `gpus_per_node` V100s, with CPU and memory to
/// spare (64 cores and 512 GiB, or 2 cores and 2 GiB per GPU if more).
pub fn uniform_nodes(count: u32, gpus_per_node: u32) -> Vec<NodeView> {
    let cpu = 64_000u64.max(2000 * gpus_per_node as u64);
    let mem = (512 * GIB).max(2 * GIB * gpus_per_node as u64);
    (0..count)
        .map(|i| {
            NodeView::new(format!("node-{i:04}"), cpu, mem).with_gpus(gpus_per_node, "NVIDIA V100")
        })
        .collect()
}

/// One line of a Tessera trace.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TesseraLine {
    submit_s: f64,
    duration_s: f64,
    team: Option<String>,
    priority: Option<i32>,
    spec: serde_json::Value,
}

/// Parses a Tessera trace: JSON lines of
/// `{"submit_s", "duration_s", "team", "priority", "spec"}` where `spec` is
/// a job spec as `tessera submit` takes it, validated the same way (the
/// line's `team` is the submitter's team; its `priority`, when given,
/// overrides the spec's). Blank lines and lines starting with `#` are
/// skipped.
pub fn parse_tessera(text: &str) -> Result<Vec<SimJob>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let job = (|| -> Result<SimJob> {
            let l: TesseraLine = serde_json::from_str(t)?;
            let team = l.team.unwrap_or_else(|| "default".to_string());
            let spec = JobSpec::parse(&l.spec.to_string()).map_err(|e| anyhow!("spec: {e}"))?;
            let tpl = spec.validate(&team).map_err(|e| anyhow!("spec: {e}"))?;
            Ok(SimJob {
                id: 0,
                row: n,
                team: tpl.team,
                priority: l.priority.unwrap_or(tpl.priority),
                submit_ms: secs_to_ms(l.submit_s, "submit_s")?,
                duration_ms: secs_to_ms(l.duration_s, "duration_s")?,
                resources: tpl.resources,
                replicas: tpl.replicas,
                max_runtime_ms: tpl.max_runtime_ms,
            })
        })()
        .with_context(|| format!("line {}", n + 1))?;
        out.push(job);
    }
    Ok(out)
}

/// Sorts jobs by submit time (file order on ties), scales times by
/// `time_scale` (durations and the gaps between arrivals; the first arrival
/// stays at its time), keeps the first `limit` and numbers them 0, 1, ...
pub fn prepare(
    mut jobs: Vec<SimJob>,
    time_scale: f64,
    limit: Option<usize>,
) -> Result<Vec<SimJob>> {
    if !(time_scale.is_finite() && time_scale > 0.0) {
        bail!("--time-scale must be a positive number, got {time_scale}");
    }
    jobs.sort_by_key(|j| (j.submit_ms, j.row));
    if let Some(n) = limit {
        jobs.truncate(n);
    }
    let first = jobs.first().map(|j| j.submit_ms).unwrap_or(0);
    for (i, j) in jobs.iter_mut().enumerate() {
        j.id = i as JobId;
        if time_scale != 1.0 {
            let scale = |ms: u64| (ms as f64 * time_scale).round() as u64;
            j.submit_ms = first + scale(j.submit_ms - first);
            j.duration_ms = scale(j.duration_ms);
            j.max_runtime_ms = j.max_runtime_ms.map(scale);
        }
    }
    Ok(jobs)
}

/// Reads a whole file as text, naming it on error.
pub fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}
