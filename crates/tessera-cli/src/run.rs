//! `tessera run`: a job spec from flags, submitted, and optionally followed
//! to the end with the job's exit code.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use tessera_core::spec::{JobSpec, Quantity, ResourcesSpec, RetriesSpec};
use tessera_core::{Job, JobState};

use crate::client::{ApiError, Client};
use crate::output::{self, Output};
use crate::{Globals, UsageError};

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Job name [default: the program's name]
    #[arg(long)]
    pub name: Option<String>,
    /// Owning team [default: the token's team]
    #[arg(long)]
    pub team: Option<String>,
    /// CPU cores per replica: `1`, `0.5`, `500m`
    #[arg(long, default_value = "1", value_parser = checked(crate::cpu_milli))]
    pub cpu: String,
    /// Memory per replica: `256Mi`, `1.5Gi`, `2G`
    #[arg(long, visible_alias = "memory", default_value = "512Mi", value_parser = checked(crate::memory_bytes))]
    pub mem: String,
    /// Whole GPUs per replica
    #[arg(long, default_value_t = 0)]
    pub gpu: u32,
    /// Allowed GPU model (substring, e.g. `H100`); repeat to allow several
    #[arg(long = "gpu-model", value_name = "MODEL")]
    pub gpu_models: Vec<String>,
    /// Replicas, started together or not at all
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    /// Higher runs first
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i64>,
    /// Stop the job after this long: `90s`, `2h`, `1h30m`
    #[arg(long, value_parser = checked(crate::duration_ms), value_name = "DURATION")]
    pub max_runtime: Option<String>,
    /// Retries on failure
    #[arg(long)]
    pub retries: Option<u32>,
    /// An environment variable; repeat for more
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = env_pair)]
    pub env: Vec<(String, String)>,
    /// Working directory (a relative path is taken from the current directory)
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// Run as a container of this image (without CMD, the image's own entrypoint runs)
    #[arg(long)]
    pub image: Option<String>,
    /// Run only on nodes with this label (repeatable; all must match)
    #[arg(long = "selector", value_name = "KEY=VALUE", value_parser = env_pair)]
    pub node_selector: Vec<(String, String)>,
    /// Run only in this pool (same as --selector pool=NAME)
    #[arg(long, value_name = "NAME")]
    pub pool: Option<String>,
    /// Never preempt other jobs to start; wait for free capacity
    #[arg(long)]
    pub no_preempt: bool,
    /// Print replica 0's logs until the job ends, then exit with its exit code
    #[arg(short, long)]
    pub follow: bool,
    /// The program and its arguments
    #[arg(
        required_unless_present = "image",
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

/// A value parser that checks a quantity but keeps the text the user wrote.
fn checked(
    parse: fn(&str) -> Result<u64, String>,
) -> impl Fn(&str) -> Result<String, String> + Clone + Send + Sync + 'static {
    move |s: &str| parse(s).map(|_| s.to_string())
}

/// `--env KEY=VALUE`.
pub fn env_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        Some(_) => Err(format!("`{s}` has no name before `=`; write KEY=VALUE")),
        None => Err(format!("`{s}` has no `=`; write KEY=VALUE")),
    }
}

/// The flag a spec field came from, for error messages.
fn flag_for(field: &str) -> &'static str {
    let head = field
        .split(['.', '['])
        .take(if field.starts_with("resources.") {
            2
        } else {
            1
        })
        .collect::<Vec<_>>()
        .join(".");
    match head.as_str() {
        "name" => "--name",
        "team" => "--team",
        "image" => "--image",
        "env" => "--env",
        "workdir" => "--workdir",
        "resources.cpu" => "--cpu",
        "resources.memory" => "--mem",
        "resources.gpu" => "--gpu",
        "resources.gpu_models" => "--gpu-model",
        "replicas" => "--replicas",
        "priority" => "--priority",
        "max_runtime" => "--max-runtime",
        "retries" => "--retries",
        "node_selector" => "--selector",
        "pool" => "--pool",
        _ => "CMD",
    }
}

/// Builds the spec `tessera run` submits and checks it the way the server
/// will, so that mistakes name the flag rather than a spec field.
pub fn build_spec(args: &RunArgs, cwd: Option<&std::path::Path>) -> Result<JobSpec, UsageError> {
    let workdir = args.workdir.as_ref().map(|w| match cwd {
        Some(cwd) if !w.starts_with('/') => cwd.join(w).display().to_string(),
        _ => w.clone(),
    });
    let spec = JobSpec {
        name: args.name.clone(),
        team: args.team.clone(),
        command: (!args.command.is_empty()).then(|| args.command.clone()),
        script: None,
        image: args.image.clone(),
        env: args.env.iter().cloned().collect::<BTreeMap<_, _>>(),
        workdir,
        resources: ResourcesSpec {
            cpu: Some(Quantity::Text(args.cpu.clone())),
            memory: Some(Quantity::Text(args.mem.clone())),
            gpu: (args.gpu > 0).then_some(i64::from(args.gpu)),
            gpu_models: args.gpu_models.clone(),
        },
        replicas: (args.replicas != 1).then_some(i64::from(args.replicas)),
        priority: args.priority,
        max_runtime: args.max_runtime.clone().map(Quantity::Text),
        retries: args.retries.map(|n| RetriesSpec::Count(i64::from(n))),
        node_selector: args.node_selector.iter().cloned().collect(),
        pool: args.pool.clone(),
        preempt: args.no_preempt.then_some(false),
        inputs: Vec::new(),
        outputs: Vec::new(),
    };
    // The default team only stands in for the server's choice here.
    if let Err(e) = spec.validate("default") {
        let flag = match e.field.strip_prefix("env.") {
            Some(key) => format!("--env {key}"),
            None => flag_for(&e.field).to_string(),
        };
        return Err(UsageError(format!("{flag}: {}", e.message)));
    }
    Ok(spec)
}

/// The spec as JSON without `null`s, as a person would write it.
pub fn spec_json(spec: &JobSpec) -> serde_json::Value {
    fn strip(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => map
                .into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip(v)))
                .collect(),
            other => other,
        }
    }
    strip(serde_json::to_value(spec).unwrap_or_default())
}

/// The process exit code for a finished job: its own exit code, 128+signal
/// when a signal ended it, 1 for any other failure.
pub fn job_exit_code(job: &Job) -> u8 {
    if job.state == JobState::Succeeded {
        return 0;
    }
    if let Some(code) = job.exit_code.filter(|c| *c != 0) {
        return u8::try_from(code).unwrap_or(1);
    }
    if let Some(sig) = job.replicas.iter().find_map(|r| r.signal) {
        return u8::try_from(128 + sig).unwrap_or(1);
    }
    1
}

pub async fn run(g: &Globals, args: RunArgs) -> Result<u8> {
    let cwd = std::env::current_dir().ok();
    let spec = build_spec(&args, cwd.as_deref())?;
    let client = g.client()?;
    let job: serde_json::Value = client.post_json("/v1/jobs", &spec_json(&spec)).await?;
    let id = job.get("id").and_then(|v| v.as_u64()).unwrap_or_default();
    if !args.follow {
        match g.output {
            Output::Json => output::print_json(&job)?,
            Output::Table | Output::Csv => output::print(&format!("job {id} submitted"))?,
        }
        return Ok(0);
    }
    eprintln!("job {id} submitted; following replica 0's logs");
    let job = follow(&client, id).await?;
    let code = job_exit_code(&job);
    let mut summary = format!("job {id} {}", job.state.as_str());
    if let Some(c) = job.exit_code {
        summary.push_str(&format!(" (exit code {c})"));
    }
    let reason = job.reason.as_deref().filter(|r| !r.is_empty());
    if let Some(r) = reason.filter(|_| job.state != JobState::Succeeded) {
        summary.push_str(&format!(": {r}"));
    }
    eprintln!("{summary}");
    Ok(code)
}

/// Prints replica 0's logs until the job ends and returns the finished job.
pub async fn follow(client: &Client, id: u64) -> Result<Job> {
    let path = format!("/v1/jobs/{id}/logs");
    let query = [("replica", "0".to_string()), ("follow", "true".to_string())];
    loop {
        match client.stream(&path, &query).await {
            Ok(resp) => {
                client.copy_body(resp, &mut std::io::stdout()).await?;
                break;
            }
            // No logs yet (say, still queued): wait, unless it has ended.
            Err(e) if e.downcast_ref::<ApiError>().is_some() => {
                let job: Job = client.get(&format!("/v1/jobs/{id}"), &[]).await?;
                if job.state.is_terminal() {
                    return Ok(job);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
    // The stream ends when the job does; the record may lag by a moment.
    loop {
        let job: Job = client.get(&format!("/v1/jobs/{id}"), &[]).await?;
        if job.state.is_terminal() {
            return Ok(job);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Wrap {
        #[command(flatten)]
        run: RunArgs,
    }

    fn args(argv: &[&str]) -> Result<RunArgs, clap::Error> {
        Wrap::try_parse_from(std::iter::once("run").chain(argv.iter().copied())).map(|w| w.run)
    }

    #[test]
    fn flags_become_a_spec() {
        let a = args(&[
            "--name",
            "train",
            "--cpu",
            "2",
            "--mem",
            "1Gi",
            "--gpu",
            "1",
            "--gpu-model",
            "H100",
            "--replicas",
            "2",
            "--priority",
            "-5",
            "--max-runtime",
            "90s",
            "--retries",
            "3",
            "--env",
            "A=1",
            "--env",
            "B=x=y",
            "--",
            "python3",
            "-u",
            "train.py",
            "--lr",
            "0.1",
        ])
        .unwrap();
        let spec = build_spec(&a, None).unwrap();
        let t = spec.validate("ml").unwrap();
        assert_eq!(t.argv, ["python3", "-u", "train.py", "--lr", "0.1"]);
        assert_eq!(t.resources.cpu_milli, 2000);
        assert_eq!(t.resources.memory_bytes, 1 << 30);
        assert_eq!(t.resources.gpu, 1);
        assert_eq!(t.resources.gpu_models, ["H100"]);
        assert_eq!(t.replicas, 2);
        assert_eq!(t.priority, -5);
        assert_eq!(t.max_runtime_ms, Some(90_000));
        assert_eq!(t.retries.on_failure, 3);
        assert_eq!(t.env.get("B").map(String::as_str), Some("x=y"));
        // What goes over the wire is the spec a person would write.
        let json = spec_json(&spec);
        assert_eq!(json["resources"]["memory"], "1Gi");
        assert!(json.get("script").is_none());
        assert_eq!(JobSpec::parse(&json.to_string()).unwrap(), spec);
    }

    #[test]
    fn defaults_and_no_double_dash() {
        let a = args(&["echo", "hi", "--name", "x"]).unwrap();
        assert_eq!(a.command, ["echo", "hi", "--name", "x"]);
        assert_eq!(a.name, None);
        let t = build_spec(&a, None).unwrap().validate("ml").unwrap();
        assert_eq!(t.resources.cpu_milli, 1000);
        assert_eq!(
            t.resources.memory_bytes,
            tessera_core::spec::DEFAULT_MEMORY_BYTES
        );
        assert_eq!(t.replicas, 1);
        assert!(args(&[]).is_err());
    }

    #[test]
    fn env_without_equals_names_the_flag() {
        let e = args(&["--env", "FOO", "--", "true"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let text = e.to_string();
        assert!(
            text.contains("--env") && text.contains("KEY=VALUE"),
            "{text}"
        );
        assert!(args(&["--env", "=x", "true"]).is_err());
    }

    #[test]
    fn bad_quantities_name_the_flag() {
        let e = args(&["--mem", "12Qi", "true"]).unwrap_err().to_string();
        assert!(
            e.contains("--mem") && e.contains("unknown memory unit"),
            "{e}"
        );
        let e = args(&["--max-runtime", "soon", "true"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--max-runtime"), "{e}");
    }

    #[test]
    fn spec_errors_name_the_flag() {
        let cases: [(&[&str], &str); 5] = [
            (&["--env", "1A=b", "true"], "--env 1A:"),
            (&["--name", "bad name", "true"], "--name"),
            (&["--gpu-model", "H100", "true"], "--gpu-model"),
            (&["--replicas", "0", "true"], "--replicas"),
            (&["--cpu", "0", "true"], "--cpu"),
        ];
        for (argv, flag) in cases {
            let e = build_spec(&args(argv).unwrap(), None).unwrap_err();
            assert!(e.0.starts_with(flag), "{argv:?} gave {}", e.0);
        }
    }

    #[test]
    fn relative_workdirs_are_resolved() {
        let a = args(&["--workdir", "data", "true"]).unwrap();
        let spec = build_spec(&a, Some(std::path::Path::new("/home/u"))).unwrap();
        assert_eq!(spec.workdir.as_deref(), Some("/home/u/data"));
    }

    #[test]
    fn exit_codes_follow_the_job() {
        let spec = JobSpec {
            command: Some(vec!["x".into()]),
            ..JobSpec::default()
        };
        let mut job = Job::new(1, spec.validate("ml").unwrap(), "t".into(), 0);
        job.state = JobState::Succeeded;
        job.exit_code = Some(0);
        assert_eq!(job_exit_code(&job), 0);
        job.state = JobState::Failed;
        job.exit_code = Some(3);
        assert_eq!(job_exit_code(&job), 3);
        job.exit_code = None;
        job.replicas = vec![tessera_core::job::ReplicaStatus {
            replica: 0,
            state: tessera_core::job::ReplicaState::Exited,
            pid: None,
            exit_code: None,
            signal: Some(9),
        }];
        assert_eq!(job_exit_code(&job), 137);
        job.state = JobState::Cancelled;
        job.replicas.clear();
        assert_eq!(job_exit_code(&job), 1);
    }
}
