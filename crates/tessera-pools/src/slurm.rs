//! The Slurm pool: jobs go to a Slurm cluster through its command-line
//! tools (`sbatch`, `scontrol`, `squeue`, `scancel`), run by a
//! [`CommandRunner`] so that the parsing is tested on captured output.
//!
//! - **Submit**: `sbatch --parsable --job-name=<key>` with the batch script
//!   on stdin. Idempotent: `squeue --name=<key> --states=all` first, and an
//!   existing job under the key is returned instead of a second submission
//!   (`submit_new`, for attempts the caller knows are new, skips the lookup).
//!   Resources: `--cpus-per-task` (whole CPUs, rounded up), `--mem` (MiB,
//!   rounded up; `--mem-per-cpu` for gangs, so each task gets its share
//!   wherever Slurm puts it), `--gres=gpu[:model]:N` (`--gpus-per-task` for
//!   gangs), `--ntasks` for a gang (the script runs the command once per
//!   task with `srun`, `TESSERA_REPLICA` = `SLURM_PROCID`), `--time` from
//!   `max_runtime` (Slurm counts whole minutes, so it is rounded up),
//!   `--partition`, `--chdir`. The job's environment is exported by the
//!   script itself (`export K='V'`, quoted), so values may hold any
//!   character. Output and errors go to one file,
//!   `<output_dir>/slurm-<id>.out`, which [`SlurmDriver::logs`] reads back:
//!   the directory must be visible to the Slurm nodes and to Tessera (on one
//!   machine it is; on a cluster, a shared file system).
//! - **Status**: one `squeue --jobs=<ids> --states=all -O
//!   JobID,State,Reason,exit_code` for all of the pool's jobs (only those:
//!   the cost does not grow with the cluster's other work). A minimal Slurm
//!   has no accounting database, so `sacct` may not answer; the controller
//!   keeps ended jobs, with their exit status and reason, for `MinJobAge`
//!   seconds (the CI configuration sets an hour), and `squeue --states=all`
//!   shows them. A job it does not list is [`RemoteState::NotFound`].
//! - **Cancel**: `scancel`; a job that already ended is not an error.
//! - **Capacity**: `scontrol show node -o` over the partition's usable nodes
//!   (down, drained and failing nodes are left out).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;

use crate::{
    Capacity, Failure, GpuCount, LogChunk, PoolDriver, PoolError, PoolJob, RemoteId, RemoteState,
};

/// What a command printed and how it ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandOutput {
    /// The exit code; none when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the engine's command-line tools. The real one starts processes;
/// tests hand back captured output.
#[async_trait]
pub trait CommandRunner: Send + Sync + 'static {
    async fn run(
        &self,
        program: &str,
        args: &[String],
        stdin: Option<&[u8]>,
    ) -> std::io::Result<CommandOutput>;
}

/// Runs commands as processes, from `bin_dir` when one is given (else from
/// `PATH`). A command that has not ended after [`COMMAND_TIMEOUT`] is
/// killed and counts as the engine not answering.
#[derive(Debug, Clone, Default)]
pub struct ProcessRunner {
    pub bin_dir: Option<PathBuf>,
}

/// Longest a Slurm command may take (Slurm's own `MessageTimeout` is 10 s
/// by default, and a command may retry once).
pub const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[async_trait]
impl CommandRunner for ProcessRunner {
    async fn run(
        &self,
        program: &str,
        args: &[String],
        stdin: Option<&[u8]>,
    ) -> std::io::Result<CommandOutput> {
        use tokio::io::AsyncWriteExt;
        let path = match &self.bin_dir {
            Some(dir) => dir.join(program),
            None => PathBuf::from(program),
        };
        let mut cmd = tokio::process::Command::new(path);
        cmd.args(args)
            .stdin(if stdin.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(data).await?;
            drop(pipe);
        }
        let out = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {} s", COMMAND_TIMEOUT.as_secs()),
                )
            })??;
        Ok(CommandOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// Where and how a Slurm pool submits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmConfig {
    /// `--partition`; none uses the cluster's default partition.
    pub partition: Option<String>,
    /// Where job output files and default working directories go.
    pub output_dir: PathBuf,
}

/// A Slurm cluster behind [`PoolDriver`].
pub struct SlurmDriver {
    config: SlurmConfig,
    runner: Box<dyn CommandRunner>,
    /// Jobs seen ended by [`SlurmDriver::status`], so that `logs` can say
    /// when output is complete. Only a hint: losing it costs a poll.
    ended: Mutex<HashSet<RemoteId>>,
}

impl std::fmt::Debug for SlurmDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlurmDriver")
            .field("config", &self.config)
            .finish()
    }
}

const MIB: u64 = 1 << 20;

impl SlurmDriver {
    pub fn new(config: SlurmConfig, runner: Box<dyn CommandRunner>) -> SlurmDriver {
        SlurmDriver {
            config,
            runner,
            ended: Mutex::new(HashSet::new()),
        }
    }

    /// A driver that runs the Slurm tools found on `PATH`.
    pub fn with_path(config: SlurmConfig) -> SlurmDriver {
        SlurmDriver::new(config, Box::new(ProcessRunner::default()))
    }

    /// The file a job's output and errors go to.
    pub fn output_path(&self, id: &RemoteId) -> PathBuf {
        self.config.output_dir.join(format!("slurm-{id}.out"))
    }

    /// Where each job's batch script leaves its command's exit status,
    /// in a file named by the Slurm job id, when the command ends.
    pub fn ended_dir(&self) -> PathBuf {
        self.config.output_dir.join("ended")
    }

    async fn run(
        &self,
        program: &str,
        args: Vec<String>,
        stdin: Option<&[u8]>,
    ) -> Result<CommandOutput, PoolError> {
        self.runner
            .run(program, &args, stdin)
            .await
            .map_err(|e| PoolError::Unavailable(format!("cannot run {program}: {e}")))
    }

    /// The id of the job submitted under `key`, if Slurm still knows one.
    pub async fn find(&self, key: &str) -> Result<Option<RemoteId>, PoolError> {
        let out = self
            .run(
                "squeue",
                vec![
                    format!("--name={key}"),
                    "--states=all".into(),
                    "--noheader".into(),
                    "--format=%i".into(),
                ],
                None,
            )
            .await?;
        if out.code != Some(0) {
            return Err(unavailable("squeue", &out));
        }
        Ok(out
            .stdout
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(|l| RemoteId(l.to_string())))
    }
}

/// An error from a Slurm command that says the controller did not answer.
fn unavailable(what: &str, out: &CommandOutput) -> PoolError {
    PoolError::Unavailable(format!("{what} failed: {}", first_words(out)))
}

fn first_words(out: &CommandOutput) -> String {
    let text = if out.stderr.trim().is_empty() {
        out.stdout.trim()
    } else {
        out.stderr.trim()
    };
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        format!("exit code {:?}", out.code)
    } else {
        lines.join("; ")
    }
}

/// Whether an `sbatch` failure is Slurm refusing the job (as opposed to
/// Slurm being unreachable).
fn sbatch_refused(stderr: &str) -> bool {
    let unreachable = [
        "Unable to contact slurm controller",
        "Socket timed out",
        "Connection refused",
        "Zero Bytes were transmitted",
        "Communication connection failure",
        "Could not establish a configuration source",
    ];
    !unreachable.iter().any(|u| stderr.contains(u))
}

/// Quotes a word for `/bin/sh`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The batch script for a job: exports its environment, runs its command
/// (once per task under `srun` for a gang), then writes the command's exit
/// status to `<ended_dir>/<slurm job id>` (see [`SlurmDriver::ended_locally`])
/// and exits with it.
pub fn batch_script(job: &PoolJob, ended_dir: &Path) -> String {
    let mut s = String::from("#!/bin/sh\n");
    s.push_str(&format!(
        "# Tessera job {}, attempt {} ({}, team {})\n",
        job.job_id,
        job.attempt,
        job.name.replace('\n', " "),
        job.team.replace('\n', " ")
    ));
    for (k, v) in &job.env {
        s.push_str(&format!("export {k}={}\n", shell_quote(v)));
    }
    let argv: Vec<String> = job.argv.iter().map(|a| shell_quote(a)).collect();
    if job.replicas > 1 {
        s.push_str(&format!(
            "srun --ntasks={} --kill-on-bad-exit=1 /bin/sh -c 'TESSERA_REPLICA=$SLURM_PROCID; export TESSERA_REPLICA; exec \"$@\"' tessera-replica {}\n",
            job.replicas,
            argv.join(" ")
        ));
    } else {
        s.push_str(&format!("{}\n", argv.join(" ")));
    }
    // The marker is written in one write and read only when it parses, so a
    // half-written one is never taken for an exit status; a job that Slurm
    // kills (cancel, time limit) leaves none.
    s.push_str("rc=$?\n");
    s.push_str(&format!(
        "printf '%s\\n' \"$rc\" > {}/\"$SLURM_JOB_ID\" 2>/dev/null\n",
        shell_quote(&ended_dir.display().to_string())
    ));
    s.push_str("exit \"$rc\"\n");
    s
}

fn ceil_div(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}

/// `sbatch` arguments for a job, or why Slurm cannot take it as asked.
pub fn sbatch_args(
    config: &SlurmConfig,
    job: &PoolJob,
    workdir: &Path,
) -> Result<Vec<String>, PoolError> {
    if job.image.is_some() {
        return Err(PoolError::Rejected(
            "image: a Slurm pool runs commands, not container images; leave image out or use another pool".into(),
        ));
    }
    if job.argv.is_empty() {
        return Err(PoolError::Rejected(
            "command: a Slurm pool needs a command or script".into(),
        ));
    }
    if job.gpu_models.len() > 1 {
        return Err(PoolError::Rejected(format!(
            "gpu_models: a Slurm pool asks for one GPU model (a GRES type) per job, not {}",
            job.gpu_models.join(" or ")
        )));
    }
    let cpus = ceil_div(job.cpu_milli, 1000).max(1);
    let mut args = vec![
        "--parsable".to_string(),
        format!("--job-name={}", job.key),
        format!(
            "--output={}",
            config.output_dir.join("slurm-%j.out").display()
        ),
        format!("--chdir={}", workdir.display()),
        format!("--cpus-per-task={cpus}"),
    ];
    if let Some(p) = &config.partition {
        args.push(format!("--partition={p}"));
    }
    let mem_mib = ceil_div(job.memory_bytes, MIB);
    if job.replicas > 1 {
        args.push(format!("--ntasks={}", job.replicas));
        if mem_mib > 0 {
            args.push(format!("--mem-per-cpu={}M", ceil_div(mem_mib, cpus).max(1)));
        }
        if job.gpus > 0 {
            args.push(match job.gpu_models.first() {
                Some(m) => format!("--gpus-per-task={m}:{}", job.gpus),
                None => format!("--gpus-per-task={}", job.gpus),
            });
        }
    } else {
        if mem_mib > 0 {
            args.push(format!("--mem={mem_mib}M"));
        }
        if job.gpus > 0 {
            args.push(match job.gpu_models.first() {
                Some(m) => format!("--gres=gpu:{m}:{}", job.gpus),
                None => format!("--gres=gpu:{}", job.gpus),
            });
        }
    }
    if let Some(ms) = job.max_runtime_ms {
        args.push(format!("--time={}", ceil_div(ms, 60_000).max(1)));
    }
    Ok(args)
}

/// One line of `scontrol show ... -o`: its `Key=Value` fields. Values hold
/// no spaces except in a few fields Tessera does not read.
pub fn parse_fields(line: &str) -> HashMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

/// Slurm's job state, reason and `ExitCode=code:signal` in Tessera's terms.
pub fn map_state(state: &str, reason: &str, exit: &str) -> RemoteState {
    let (code, signal) = exit
        .split_once(':')
        .map(|(c, s)| (c.parse::<i32>().ok(), s.parse::<i32>().unwrap_or(0)))
        .unwrap_or((None, 0));
    let exit_code = if signal != 0 {
        Some(128 + signal)
    } else {
        code
    };
    let reason_text = (!reason.is_empty() && reason != "None").then(|| reason.to_string());
    let failed = |failure: Failure, message: String| RemoteState::Failed {
        failure,
        exit_code,
        message,
    };
    // A state may carry flags (`CANCELLED+`, `COMPLETING`); the base state
    // is the first word.
    let base = state.split(['+', ' ']).next().unwrap_or(state);
    match base {
        "PENDING" | "CONFIGURING" | "REQUEUED" | "REQUEUE_FED" | "REQUEUE_HOLD" | "SUSPENDED"
        | "RESV_DEL_HOLD" | "SPECIAL_EXIT" => {
            // Reasons that mean "never, as asked" on a Slurm that does not
            // enforce partition limits at submission.
            if matches!(
                reason,
                "PartitionConfig" | "BadConstraints" | "PartitionNodeLimit" | "InvalidQOS"
            ) {
                return failed(
                    Failure::Rejected,
                    format!("Slurm will never start the job as asked (pending, reason {reason})"),
                );
            }
            RemoteState::Queued {
                reason: reason_text,
            }
        }
        "RUNNING" | "COMPLETING" | "STAGE_OUT" | "SIGNALING" | "RESIZING" => RemoteState::Running,
        "COMPLETED" if exit_code.unwrap_or(0) == 0 => RemoteState::Succeeded,
        "COMPLETED" | "FAILED" => failed(
            Failure::Exited,
            format!("Slurm: {base}, exit code {exit}{}", reason_suffix(reason)),
        ),
        "OUT_OF_MEMORY" => failed(
            Failure::OutOfMemory,
            format!("Slurm: OUT_OF_MEMORY{}", reason_suffix(reason)),
        ),
        "TIMEOUT" | "DEADLINE" => failed(
            Failure::TimedOut,
            format!("Slurm: {base}{}", reason_suffix(reason)),
        ),
        "NODE_FAIL" | "BOOT_FAIL" | "PREEMPTED" => failed(
            Failure::NodeFailure,
            format!("Slurm: {base}{}", reason_suffix(reason)),
        ),
        "CANCELLED" => RemoteState::Cancelled,
        other => failed(
            Failure::Exited,
            format!("Slurm: {other}{}", reason_suffix(reason)),
        ),
    }
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() || reason == "None" {
        String::new()
    } else {
        format!(" ({reason})")
    }
}

/// The `-O` format of the status call: id, state, reason, raw exit status.
pub const SQUEUE_FORMAT: &str = "JobID:|,State:|,Reason:|,exit_code:|";

/// `squeue -O JobID:|,State:|,Reason:|,exit_code:|` output → each job's
/// state. The exit status is the raw wait status (`code << 8 | signal`).
pub fn parse_squeue(text: &str) -> HashMap<RemoteId, RemoteState> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.trim().split('|');
            let id = f.next()?.trim();
            if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
                return None;
            }
            let state = f.next()?.trim();
            let reason = f.next().unwrap_or("").trim();
            let raw: i32 = f.next().unwrap_or("0").trim().parse().unwrap_or(0);
            let exit = format!("{}:{}", (raw >> 8) & 0xff, raw & 0x7f);
            Some((RemoteId(id.to_string()), map_state(state, reason, &exit)))
        })
        .collect()
}

/// GPUs in a node's `Gres=` field (`gpu:a100:4(S:0-1),gpu:2`; `(null)`).
fn parse_gres(gres: &str) -> Vec<GpuCount> {
    gres.split(',')
        .filter_map(|g| {
            let g = g.split('(').next()?.trim();
            let mut parts = g.split(':');
            if parts.next()? != "gpu" {
                return None;
            }
            let rest: Vec<&str> = parts.collect();
            match rest.as_slice() {
                [n] => Some(GpuCount {
                    model: "gpu".into(),
                    count: n.parse().ok()?,
                }),
                [model, n, ..] => Some(GpuCount {
                    model: model.to_string(),
                    count: n.parse().ok()?,
                }),
                _ => None,
            }
        })
        .collect()
}

/// `gres/gpu=N` in an `AllocTRES=` field.
fn alloc_gpus(tres: &str) -> u32 {
    tres.split(',')
        .filter_map(|t| t.strip_prefix("gres/gpu="))
        .filter_map(|n| n.parse::<u32>().ok())
        .max()
        .unwrap_or(0)
}

/// `scontrol show node -o` output → the usable capacity of the nodes in
/// `partition` (all nodes when none is named).
pub fn parse_capacity(text: &str, partition: Option<&str>) -> Capacity {
    let mut c = Capacity::default();
    let mut models: BTreeMap<String, u32> = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("NodeName=")) {
        let f = parse_fields(line);
        if let Some(p) = partition {
            let parts = f.get("Partitions").copied().unwrap_or("");
            if !parts.split(',').any(|x| x == p) {
                continue;
            }
        }
        let state = f.get("State").copied().unwrap_or("");
        if [
            "DOWN",
            "DRAIN",
            "FAIL",
            "NOT_RESPONDING",
            "POWERED_DOWN",
            "FUTURE",
        ]
        .iter()
        .any(|s| state.contains(s))
            || state.ends_with('*')
        {
            continue;
        }
        let num = |k: &str| {
            f.get(k)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_default()
        };
        let cpus = if f.contains_key("CPUEfctv") {
            num("CPUEfctv")
        } else {
            num("CPUTot")
        };
        let mem = num("RealMemory") * MIB;
        let gpus = parse_gres(f.get("Gres").copied().unwrap_or(""));
        let ngpu: u32 = gpus.iter().map(|g| g.count).sum();
        for g in gpus {
            *models.entry(g.model).or_default() += g.count;
        }
        c.nodes += 1;
        c.cpu_milli += cpus * 1000;
        c.memory_bytes += mem;
        c.used_cpu_milli += num("CPUAlloc") * 1000;
        c.used_memory_bytes += num("AllocMem") * MIB;
        c.used_gpus += alloc_gpus(f.get("AllocTRES").copied().unwrap_or(""));
        let (lc, lm, lg) = c.largest_node;
        c.largest_node = (lc.max(cpus * 1000), lm.max(mem), lg.max(ngpu));
    }
    c.gpus = models
        .into_iter()
        .map(|(model, count)| GpuCount { model, count })
        .collect();
    if let Some(p) = partition {
        c.labels.insert("slurm.partition".into(), p.to_string());
    }
    c
}

#[async_trait]
impl PoolDriver for SlurmDriver {
    fn kind(&self) -> &'static str {
        "slurm"
    }

    async fn submit(&self, job: &PoolJob) -> Result<RemoteId, PoolError> {
        sbatch_args(&self.config, job, Path::new("/"))?;
        if let Some(id) = self.find(&job.key).await? {
            return Ok(id);
        }
        self.submit_new(job).await
    }

    async fn submit_new(&self, job: &PoolJob) -> Result<RemoteId, PoolError> {
        let workdir = match &job.workdir {
            Some(w) => PathBuf::from(w),
            None => self.config.output_dir.join("work").join(&job.key),
        };
        let args = sbatch_args(&self.config, job, &workdir)?;
        std::fs::create_dir_all(self.ended_dir())
            .and_then(|_| std::fs::create_dir_all(&workdir))
            .map_err(|e| {
                PoolError::Unavailable(format!(
                    "cannot create {} for the job's output: {e}",
                    workdir.display()
                ))
            })?;
        let script = batch_script(job, &self.ended_dir());
        let out = self.run("sbatch", args, Some(script.as_bytes())).await?;
        if out.code != Some(0) {
            let words = first_words(&out);
            return Err(if sbatch_refused(&out.stderr) {
                PoolError::Rejected(format!("Slurm refused the job: {words}"))
            } else {
                PoolError::Unavailable(format!("sbatch failed: {words}"))
            });
        }
        let id = out
            .stdout
            .trim()
            .split(';')
            .next()
            .unwrap_or("")
            .to_string();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
            return Err(PoolError::Unavailable(format!(
                "sbatch answered {:?}, not a job id",
                out.stdout.trim()
            )));
        }
        Ok(RemoteId(id))
    }

    async fn status(&self, ids: &[RemoteId]) -> Result<HashMap<RemoteId, RemoteState>, PoolError> {
        let mut all = HashMap::new();
        // One call (a few for thousands of jobs, to keep the command line short).
        for chunk in ids.chunks(1000) {
            let list: Vec<&str> = chunk.iter().map(|i| i.0.as_str()).collect();
            let out = self
                .run(
                    "squeue",
                    vec![
                        format!("--jobs={}", list.join(",")),
                        "--states=all".into(),
                        "--noheader".into(),
                        "-O".into(),
                        SQUEUE_FORMAT.into(),
                    ],
                    None,
                )
                .await?;
            // Asked only about jobs Slurm has forgotten: none of them is listed.
            let forgotten = out.code == Some(1) && out.stderr.contains("Invalid job id");
            if out.code != Some(0) && !forgotten {
                return Err(unavailable("squeue", &out));
            }
            all.extend(parse_squeue(&out.stdout));
        }
        let answer: HashMap<RemoteId, RemoteState> = ids
            .iter()
            .map(|id| (id.clone(), all.remove(id).unwrap_or(RemoteState::NotFound)))
            .collect();
        let mut ended = self.ended.lock().expect("ended lock");
        for (id, s) in &answer {
            if s.is_terminal() {
                ended.insert(id.clone());
                // Its exit marker, if the script left one, is not needed now.
                let _ = std::fs::remove_file(self.ended_dir().join(&id.0));
            }
        }
        Ok(answer)
    }

    /// Jobs whose command has ended with status 0, from the markers their
    /// batch scripts leave in [`SlurmDriver::ended_dir`]: one directory
    /// listing, no call to Slurm, so the pool can look every few
    /// milliseconds and start the next job as soon as a slot frees — before
    /// Slurm itself has finished the job off. Any other status is left to
    /// [`PoolDriver::status`], where Slurm says what happened (a time limit,
    /// memory, a cancel). A marker read is removed.
    fn ended_locally(&self, ids: &[RemoteId]) -> HashMap<RemoteId, RemoteState> {
        let mut out = HashMap::new();
        let dir = self.ended_dir();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return out;
        };
        let names: HashSet<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        if names.is_empty() {
            return out;
        }
        let mut ended = self.ended.lock().expect("ended lock");
        for id in ids.iter().filter(|id| names.contains(&id.0)) {
            let path = dir.join(&id.0);
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            // Only a whole line counts: the script may be writing it now.
            if text.ends_with('\n') && text.trim() == "0" {
                let _ = std::fs::remove_file(&path);
                ended.insert(id.clone());
                out.insert(id.clone(), RemoteState::Succeeded);
            }
        }
        out
    }

    async fn cancel(&self, id: &RemoteId) -> Result<(), PoolError> {
        let out = self.run("scancel", vec![id.0.clone()], None).await?;
        if out.code == Some(0) {
            return Ok(());
        }
        let words = first_words(&out);
        if words.contains("already") || words.contains("Invalid job id") {
            return Ok(());
        }
        Err(PoolError::Unavailable(format!("scancel failed: {words}")))
    }

    async fn logs(&self, id: &RemoteId, offset: u64) -> Result<LogChunk, PoolError> {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.output_path(id);
        let ended = self.ended.lock().expect("ended lock").contains(id);
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(LogChunk {
                    data: Vec::new(),
                    next_offset: offset,
                    complete: ended,
                })
            }
            Err(e) => {
                return Err(PoolError::Unavailable(format!(
                    "cannot read {}: {e}",
                    path.display()
                )))
            }
        };
        let mut data = Vec::new();
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.take(1 << 20).read_to_end(&mut data))
            .map_err(|e| PoolError::Unavailable(format!("cannot read {}: {e}", path.display())))?;
        let next_offset = offset + data.len() as u64;
        Ok(LogChunk {
            complete: ended && data.is_empty(),
            data,
            next_offset,
        })
    }

    async fn capacity(&self) -> Result<Capacity, PoolError> {
        let out = self
            .run(
                "scontrol",
                vec!["show".into(), "node".into(), "-o".into()],
                None,
            )
            .await?;
        if out.code != Some(0) {
            return Err(unavailable("scontrol show node", &out));
        }
        let c = parse_capacity(&out.stdout, self.config.partition.as_deref());
        if c.nodes == 0 {
            if let Some(p) = &self.config.partition {
                let parts = self
                    .run("sinfo", vec!["-h".into(), "-o".into(), "%R".into()], None)
                    .await?;
                if parts.code == Some(0) && !parts.stdout.lines().any(|l| l.trim() == p) {
                    return Err(PoolError::Rejected(format!(
                        "partition: Slurm has no partition {p:?} (it has: {})",
                        parts
                            .stdout
                            .lines()
                            .map(str::trim)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests;
