//! The job spec as users write it (YAML or JSON, one schema) and its
//! validated, normalised form [`JobTemplate`].
//!
//! Parsing is two-stage, as in ripgrep: serde reads the raw [`JobSpec`]
//! (unknown fields are errors), then [`JobSpec::validate`] checks every value
//! and produces a [`JobTemplate`] in plain units (millicores, bytes, ms).
//! Every error names the offending field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::FieldError;
use crate::quantity::{self, QuantityError};

/// A number or a string such as `"500m"`, `"1.5Gi"` or `"90s"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Quantity {
    Number(f64),
    Text(String),
}

/// Resources each replica needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourcesSpec {
    /// CPU cores: `1`, `0.5` or `"500m"`. Default 1.
    #[schema(value_type = Option<String>, example = "1")]
    pub cpu: Option<Quantity>,
    /// Memory: `"512Mi"`, `"1.5Gi"`, `"2G"` or bytes. Default 512Mi.
    #[schema(value_type = Option<String>, example = "512Mi")]
    pub memory: Option<Quantity>,
    /// Whole GPUs per replica. Default 0.
    pub gpu: Option<i64>,
    /// Allowed GPU models (substring match, case-insensitive, e.g. `H100`).
    #[serde(default)]
    pub gpu_models: Vec<String>,
}

/// How often a job is tried again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum RetriesSpec {
    /// `retries: 2` retries twice on failure (and on node loss, the default 3).
    Count(i64),
    /// `retries: {on_failure: 2, on_node_loss: 5}`.
    Policy(RetryPolicySpec),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicySpec {
    pub on_failure: Option<i64>,
    pub on_node_loss: Option<i64>,
}

/// A batch job as a user submits it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Job name: letters, digits, `.`, `_`, `-`; at most 63 characters.
    pub name: Option<String>,
    /// Owning team; defaults to the caller's team.
    pub team: Option<String>,
    /// The program and its arguments (argv). Give `command` or `script`
    /// (with an `image`, neither: the image's own entrypoint and command run).
    pub command: Option<Vec<String>>,
    /// A shell script run by `/bin/sh -c`. Give `command` or `script`.
    pub script: Option<String>,
    /// Container image (e.g. `python:3.12-slim`): each replica runs in a
    /// Docker container of it; `command` or `script`, when given, replace
    /// the image's entrypoint. The image must be on the node or pullable.
    pub image: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Absolute working directory; default: a fresh directory per replica.
    pub workdir: Option<String>,
    /// Resources per replica.
    #[serde(default)]
    pub resources: ResourcesSpec,
    /// Number of replicas, started together or not at all (a gang). Default 1.
    pub replicas: Option<i64>,
    /// Higher runs first. Default 0.
    pub priority: Option<i64>,
    /// Longest run time, e.g. `"90s"`, `"2h"`; the job is stopped after it.
    #[schema(value_type = Option<String>, example = "2h")]
    pub max_runtime: Option<Quantity>,
    /// Retry policy: a count of retries on failure, or `{on_failure, on_node_loss}`.
    pub retries: Option<RetriesSpec>,
    /// Node labels a node must carry, every one of them, to run this job
    /// (e.g. `{region: eu}`).
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Run only in this pool: shorthand for `node_selector: {pool: NAME}`.
    pub pool: Option<String>,
    /// Whether this job may preempt running jobs of a lower priority (or,
    /// under the policy, later in its order) to start. Default true; with
    /// false it waits for free capacity. Its team's guaranteed quota is
    /// reclaimed from borrowers for it either way.
    pub preempt: Option<bool>,
    /// Dataset versions the job reads: each appears read-only in every
    /// replica's working directory under its `as` name.
    #[serde(default)]
    pub inputs: Vec<InputSpec>,
    /// Directories of replica 0's working directory that become new
    /// dataset versions when, and only when, the job succeeds.
    #[serde(default)]
    pub outputs: Vec<OutputSpec>,
}

/// `inputs[i]` of a job spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// `name`, `team.name`, or either with `@version`.
    pub dataset: String,
    /// The version to read [default: the latest when the job is submitted;
    /// the job's record names the one it got].
    pub version: Option<i64>,
    /// The name of the directory in the working directory [default: the
    /// dataset's name].
    #[serde(rename = "as")]
    pub mount: Option<String>,
}

/// `outputs[i]` of a job spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// `name` or `team.name` (a team the submitter may write to); created
    /// when missing.
    pub dataset: String,
    /// A directory relative to replica 0's working directory, e.g. `out/`.
    pub from: String,
    /// `files` (a versioned file set: checkpoints, weights), or `csv`,
    /// `parquet`, `jsonl` (the directory's files of that type become a
    /// table version) [default: the dataset's kind; `files` for a new one].
    pub format: Option<String>,
    /// For tables: `append` to the previous version or `overwrite` it
    /// [default: overwrite].
    pub mode: Option<String>,
}

/// A validated input: which dataset version, under which name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobInput {
    /// `team.name`.
    pub dataset: String,
    /// Pinned when the job is accepted: the exact version it reads.
    pub version: Option<u64>,
    /// The directory name in the working directory.
    #[serde(rename = "as")]
    pub mount: String,
    /// Where the control plane staged it, read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// A validated output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobOutput {
    /// `team.name`.
    pub dataset: String,
    pub from: String,
    /// The upload format; none: the dataset's kind decides.
    pub format: Option<crate::lake::UploadFormat>,
    pub mode: crate::lake::WriteMode,
}

/// Validated resources per replica, in plain units.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub struct Resources {
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    /// Whole GPUs per replica.
    pub gpu: u32,
    /// A fraction of one GPU in thousandths (1..=999), shared with other
    /// replicas on the same device; 0 when `gpu` counts whole GPUs.
    #[serde(default)]
    pub gpu_milli: u32,
    pub gpu_models: Vec<String>,
    /// Labels a node must carry (every one, with these values) to run a
    /// replica; empty: any node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

impl Resources {
    /// Whether the replica needs any GPU (whole or a share of one).
    pub fn wants_gpu(&self) -> bool {
        self.gpu > 0 || self.gpu_milli > 0
    }

    /// GPU demand in thousandths of a device.
    pub fn gpu_demand_milli(&self) -> u64 {
        self.gpu as u64 * 1000 + self.gpu_milli as u64
    }

    /// One line for tables: `1 cpu, 256Mi, 1 gpu (H100)`.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} cpu, {}",
            quantity::format_cpu(self.cpu_milli),
            quantity::format_memory(self.memory_bytes)
        );
        if self.gpu_milli > 0 {
            s.push_str(&format!(", {} gpu", self.gpu_milli as f64 / 1000.0));
            if !self.gpu_models.is_empty() {
                s.push_str(&format!(" ({})", self.gpu_models.join("|")));
            }
        }
        if self.gpu > 0 {
            s.push_str(&format!(", {} gpu", self.gpu));
            if !self.gpu_models.is_empty() {
                s.push_str(&format!(" ({})", self.gpu_models.join("|")));
            }
        }
        s
    }

    /// Whether a node with these labels may run a replica.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.node_selector
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
    }

    /// The selector as `k=v, k=v` (for reasons and tables).
    pub fn selector_summary(&self) -> String {
        self.node_selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether a GPU of this model is allowed for the job.
    pub fn gpu_model_allowed(&self, model: &str) -> bool {
        self.gpu_models.is_empty()
            || self
                .gpu_models
                .iter()
                .any(|m| model.to_ascii_lowercase().contains(&m.to_ascii_lowercase()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RetryPolicy {
    pub on_failure: u32,
    pub on_node_loss: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            on_failure: 0,
            on_node_loss: DEFAULT_NODE_LOSS_RETRIES,
        }
    }
}

/// Retries on node loss when a spec does not say.
pub const DEFAULT_NODE_LOSS_RETRIES: u32 = 3;
pub const DEFAULT_CPU_MILLI: u64 = 1000;
pub const DEFAULT_MEMORY_BYTES: u64 = 512 << 20;
pub const MAX_REPLICAS: u32 = 10_000;
pub const MAX_GPUS: u32 = 1024;
pub const MAX_PRIORITY: i64 = 1_000_000;
pub const MAX_RETRIES: u32 = 100;

/// A validated job spec: what the scheduler and the agent work from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobTemplate {
    pub name: String,
    pub team: String,
    /// The argv to run (a `script` becomes `["/bin/sh", "-c", script]`);
    /// empty only with an `image`, whose own entrypoint and command run.
    pub argv: Vec<String>,
    pub script: Option<String>,
    /// Container image the replicas run in; none: they run as processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub resources: Resources,
    pub replicas: u32,
    pub priority: i32,
    pub max_runtime_ms: Option<u64>,
    pub retries: RetryPolicy,
    /// May preempt other jobs to start (see [`JobSpec::preempt`]).
    #[serde(default = "yes")]
    pub preempt: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<JobInput>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<JobOutput>,
}

fn qerr(field: &str) -> impl Fn(QuantityError) -> FieldError + '_ {
    move |e| FieldError::new(field, e.0)
}

/// Checks a name (job or token): 1–63 of letters, digits, `.`, `_`, `-`,
/// starting with a letter or digit.
pub fn validate_name(field: &str, name: &str) -> Result<(), FieldError> {
    if name.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if name.len() > 63 {
        return Err(FieldError::new(field, "must be at most 63 characters"));
    }
    let first = name.chars().next().unwrap_or(' ');
    if !first.is_ascii_alphanumeric() {
        return Err(FieldError::new(
            field,
            format!("`{name}` must start with a letter or digit"),
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(FieldError::new(
            field,
            format!("`{name}` contains `{bad}`; use letters, digits, `.`, `_` and `-`"),
        ));
    }
    Ok(())
}

/// Checks a team name: 1–32 of lowercase letters, digits and `-`, starting
/// with a letter.
pub fn validate_team_name(field: &str, name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("`{name}` is not a valid team name: use 1-32 lowercase letters, digits and `-`, starting with a letter"),
        ))
    }
}

fn quantity_str(q: &Quantity) -> String {
    match q {
        Quantity::Number(n) => n.to_string(),
        Quantity::Text(s) => s.clone(),
    }
}

fn check_count(field: &str, v: i64, min: i64, max: i64) -> Result<i64, FieldError> {
    if v < min {
        return Err(FieldError::new(
            field,
            format!("must be at least {min}, got {v}"),
        ));
    }
    if v > max {
        return Err(FieldError::new(
            field,
            format!("must be at most {max}, got {v}"),
        ));
    }
    Ok(v)
}

impl JobSpec {
    /// Parses YAML or JSON (JSON is YAML) into a spec; unknown fields and
    /// wrong types are errors naming the field.
    pub fn parse(text: &str) -> Result<JobSpec, FieldError> {
        if text.trim().is_empty() {
            return Err(FieldError::new("", "the job spec is empty"));
        }
        let trimmed = text.trim_start();
        if trimmed.starts_with('{') {
            let de = &mut serde_json::Deserializer::from_str(text);
            return serde_path_to_error::deserialize(de).map_err(|e| {
                let path = e.path().to_string();
                FieldError::new(clean_path(&path), format!("invalid JSON: {}", e.inner()))
            });
        }
        let de = serde_yaml::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            FieldError::new(clean_path(&path), format!("invalid YAML: {}", e.inner()))
        })
    }

    /// Validates every field and normalises units. `default_team` is the
    /// caller's team, used when the spec names none.
    pub fn validate(&self, default_team: &str) -> Result<JobTemplate, FieldError> {
        let name = match &self.name {
            Some(n) => {
                validate_name("name", n)?;
                n.clone()
            }
            None => match (&self.command, &self.script, &self.image) {
                (Some(argv), _, _) if !argv.is_empty() => default_name(&argv[0]),
                (None, None, Some(image)) => default_name(image_name(image)),
                _ => "job".to_string(),
            },
        };
        let team = match &self.team {
            Some(t) => {
                validate_team_name("team", t)?;
                t.clone()
            }
            None => default_team.to_string(),
        };
        if let Some(image) = &self.image {
            validate_image(image)?;
        }
        let argv = match (&self.command, &self.script) {
            (Some(_), Some(_)) => {
                return Err(FieldError::new(
                    "command",
                    "give either `command` or `script`, not both",
                ))
            }
            (None, None) if self.image.is_some() => Vec::new(),
            (None, None) => {
                return Err(FieldError::new(
                    "command",
                    "a job needs a `command` (argv list), a `script` or an `image`",
                ))
            }
            (Some(argv), None) => {
                if argv.is_empty() {
                    return Err(FieldError::new("command", "must not be empty"));
                }
                if argv[0].trim().is_empty() {
                    return Err(FieldError::new(
                        "command[0]",
                        "the program must not be empty",
                    ));
                }
                if let Some(i) = argv.iter().position(|a| a.contains('\0')) {
                    return Err(FieldError::new(
                        format!("command[{i}]"),
                        "must not contain NUL bytes",
                    ));
                }
                argv.clone()
            }
            (None, Some(script)) => {
                if script.trim().is_empty() {
                    return Err(FieldError::new("script", "must not be empty"));
                }
                if script.contains('\0') {
                    return Err(FieldError::new("script", "must not contain NUL bytes"));
                }
                vec!["/bin/sh".into(), "-c".into(), script.clone()]
            }
        };
        for (k, v) in &self.env {
            let field = format!("env.{k}");
            let valid = !k.is_empty()
                && k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(FieldError::new(
                    field,
                    "is not a valid variable name (letters, digits, `_`; not starting with a digit)",
                ));
            }
            if k.starts_with("TESSERA_") {
                return Err(FieldError::new(
                    field,
                    "TESSERA_* variables are set by Tessera",
                ));
            }
            if v.contains('\0') {
                return Err(FieldError::new(field, "must not contain NUL bytes"));
            }
        }
        if let Some(w) = &self.workdir {
            if !w.starts_with('/') {
                return Err(FieldError::new(
                    "workdir",
                    format!("`{w}` must be an absolute path"),
                ));
            }
        }
        let r = &self.resources;
        let cpu_milli = match &r.cpu {
            None => DEFAULT_CPU_MILLI,
            Some(Quantity::Number(n)) => {
                quantity::cpu_from_f64(*n).map_err(qerr("resources.cpu"))?
            }
            Some(Quantity::Text(s)) => quantity::parse_cpu(s).map_err(qerr("resources.cpu"))?,
        };
        if cpu_milli == 0 {
            return Err(FieldError::new(
                "resources.cpu",
                "must be greater than zero",
            ));
        }
        let memory_bytes = match &r.memory {
            None => DEFAULT_MEMORY_BYTES,
            Some(Quantity::Number(n)) => {
                if n.fract() != 0.0 {
                    return Err(FieldError::new(
                        "resources.memory",
                        "a plain number is bytes and must be whole; write e.g. `1.5Gi`",
                    ));
                }
                quantity::parse_memory(&n.to_string()).map_err(qerr("resources.memory"))?
            }
            Some(Quantity::Text(s)) => {
                quantity::parse_memory(s).map_err(qerr("resources.memory"))?
            }
        };
        if memory_bytes == 0 {
            return Err(FieldError::new(
                "resources.memory",
                "must be greater than zero",
            ));
        }
        let gpu = check_count("resources.gpu", r.gpu.unwrap_or(0), 0, MAX_GPUS as i64)? as u32;
        for (i, m) in r.gpu_models.iter().enumerate() {
            if m.trim().is_empty() {
                return Err(FieldError::new(
                    format!("resources.gpu_models[{i}]"),
                    "must not be empty",
                ));
            }
        }
        if gpu == 0 && !r.gpu_models.is_empty() {
            return Err(FieldError::new(
                "resources.gpu_models",
                "names GPU models but `gpu` is 0",
            ));
        }
        let replicas = check_count(
            "replicas",
            self.replicas.unwrap_or(1),
            1,
            MAX_REPLICAS as i64,
        )? as u32;
        let priority = check_count(
            "priority",
            self.priority.unwrap_or(0),
            -MAX_PRIORITY,
            MAX_PRIORITY,
        )? as i32;
        let max_runtime_ms = match &self.max_runtime {
            None => None,
            Some(q) => {
                let ms = match q {
                    Quantity::Number(n) => quantity::parse_duration(&n.to_string()),
                    Quantity::Text(s) => quantity::parse_duration(s),
                }
                .map_err(qerr("max_runtime"))?;
                if ms == 0 {
                    return Err(FieldError::new(
                        "max_runtime",
                        format!("`{}` must be greater than zero", quantity_str(q)),
                    ));
                }
                Some(ms)
            }
        };
        let retries = match &self.retries {
            None => RetryPolicy::default(),
            Some(RetriesSpec::Count(n)) => RetryPolicy {
                on_failure: check_count("retries", *n, 0, MAX_RETRIES as i64)? as u32,
                on_node_loss: DEFAULT_NODE_LOSS_RETRIES,
            },
            Some(RetriesSpec::Policy(p)) => RetryPolicy {
                on_failure: check_count(
                    "retries.on_failure",
                    p.on_failure.unwrap_or(0),
                    0,
                    MAX_RETRIES as i64,
                )? as u32,
                on_node_loss: check_count(
                    "retries.on_node_loss",
                    p.on_node_loss.unwrap_or(DEFAULT_NODE_LOSS_RETRIES as i64),
                    0,
                    MAX_RETRIES as i64,
                )? as u32,
            },
        };
        let node_selector = validate_selector(&self.node_selector, self.pool.as_deref())?;
        let (inputs, outputs) = validate_data(&self.inputs, &self.outputs, &team)?;
        Ok(JobTemplate {
            name,
            team,
            argv,
            script: self.script.clone(),
            image: self.image.clone(),
            env: self.env.clone(),
            workdir: self.workdir.clone(),
            resources: Resources {
                cpu_milli,
                memory_bytes,
                gpu,
                gpu_milli: 0,
                gpu_models: r.gpu_models.clone(),
                node_selector,
            },
            replicas,
            priority,
            max_runtime_ms,
            retries,
            preempt: self.preempt.unwrap_or(true),
            inputs,
            outputs,
        })
    }
}

/// Checks `inputs` and `outputs` (their datasets are checked against the
/// lake when the job is submitted).
fn validate_data(
    inputs: &[InputSpec],
    outputs: &[OutputSpec],
    team: &str,
) -> Result<(Vec<JobInput>, Vec<JobOutput>), FieldError> {
    use crate::lake::{DatasetRef, UploadFormat, WriteMode};
    let mut ins = Vec::with_capacity(inputs.len());
    for (i, spec) in inputs.iter().enumerate() {
        let field = format!("inputs[{i}].dataset");
        let r = DatasetRef::parse(&field, &spec.dataset)?;
        let version = match (spec.version, r.version) {
            (Some(v), _) if v < 1 => {
                return Err(FieldError::new(
                    format!("inputs[{i}].version"),
                    format!("versions count from 1, got {v}"),
                ))
            }
            (Some(v), Some(w)) if v as u64 != w => {
                return Err(FieldError::new(
                    format!("inputs[{i}].version"),
                    format!("{v} contradicts the @{w} in `dataset`"),
                ))
            }
            (Some(v), _) => Some(v as u64),
            (None, w) => w,
        };
        let mount = spec.mount.clone().unwrap_or_else(|| r.name.clone());
        let mfield = format!("inputs[{i}].as");
        let ok = !mount.is_empty()
            && mount.len() <= 63
            && mount != "."
            && mount != ".."
            && mount
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !ok {
            return Err(FieldError::new(
                mfield,
                format!(
                    "`{mount}` is not a directory name: use 1-63 letters, digits, `.`, `_`, `-`"
                ),
            ));
        }
        if ins.iter().any(|x: &JobInput| x.mount == mount) {
            return Err(FieldError::new(
                mfield,
                format!("two inputs are both named `{mount}`; give one another `as`"),
            ));
        }
        ins.push(JobInput {
            dataset: format!("{}.{}", r.team_or(team), r.name),
            version,
            mount,
            path: None,
        });
    }
    let mut outs = Vec::with_capacity(outputs.len());
    for (i, spec) in outputs.iter().enumerate() {
        let field = format!("outputs[{i}].dataset");
        let r = DatasetRef::parse(&field, &spec.dataset)?;
        if r.version.is_some() {
            return Err(FieldError::new(
                field,
                "an output becomes the next version; name no `@version`",
            ));
        }
        let dataset = format!("{}.{}", r.team_or(team), r.name);
        if outs.iter().any(|o: &JobOutput| o.dataset == dataset) {
            return Err(FieldError::new(
                field,
                format!("{dataset} is named by two outputs"),
            ));
        }
        let from = spec.from.trim_end_matches('/');
        let ffield = format!("outputs[{i}].from");
        if from.is_empty()
            || from.starts_with('/')
            || from.split('/').any(|c| c == ".." || c.is_empty())
            || from.contains('\0')
        {
            return Err(FieldError::new(
                ffield,
                format!(
                    "`{}` must be a directory inside the working directory, e.g. `out/` (relative, no `..`)",
                    spec.from
                ),
            ));
        }
        let format = match spec.format.as_deref() {
            None => None,
            Some("files") => Some(UploadFormat::Tar),
            Some(f @ ("csv" | "parquet" | "jsonl")) => {
                Some(UploadFormat::parse(&format!("outputs[{i}].format"), f)?)
            }
            Some(other) => {
                return Err(FieldError::new(
                    format!("outputs[{i}].format"),
                    format!("unknown format `{other}`: use files, csv, parquet or jsonl"),
                ))
            }
        };
        let mode = match spec.mode.as_deref() {
            None | Some("overwrite") => WriteMode::Overwrite,
            Some("append") => WriteMode::Append,
            Some(other) => {
                return Err(FieldError::new(
                    format!("outputs[{i}].mode"),
                    format!("unknown mode `{other}`: use append or overwrite"),
                ))
            }
        };
        if spec.mode.is_some() && format == Some(UploadFormat::Tar) {
            return Err(FieldError::new(
                format!("outputs[{i}].mode"),
                "file sets take no mode: each version is the directory as it is",
            ));
        }
        outs.push(JobOutput {
            dataset,
            from: from.to_string(),
            format,
            mode,
        });
    }
    Ok((ins, outs))
}

fn yes() -> bool {
    true
}

/// The node label that names a node's pool; `pool: NAME` in a job spec
/// selects it.
pub const POOL_LABEL: &str = "pool";

/// Checks a label key: 1–63 of letters, digits, `.`, `_`, `-`, `/`,
/// starting with a letter or digit.
pub fn validate_label_key(field: &str, key: &str) -> Result<(), FieldError> {
    let ok = !key.is_empty()
        && key.len() <= 63
        && key.starts_with(|c: char| c.is_ascii_alphanumeric())
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("label key `{key}` must be 1-63 letters, digits, `.`, `_`, `-` or `/`, starting with a letter or digit"),
        ))
    }
}

/// Checks a label value: at most 63 of letters, digits, `.`, `_`, `-`.
pub fn validate_label_value(field: &str, value: &str) -> Result<(), FieldError> {
    let ok = value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("label value `{value}` must be at most 63 letters, digits, `.`, `_` or `-`"),
        ))
    }
}

/// The validated node selector of a spec: `node_selector` plus `pool`.
fn validate_selector(
    selector: &BTreeMap<String, String>,
    pool: Option<&str>,
) -> Result<BTreeMap<String, String>, FieldError> {
    for (k, v) in selector {
        validate_label_key("node_selector", k)?;
        validate_label_value(&format!("node_selector.{k}"), v)?;
    }
    let mut out = selector.clone();
    if let Some(p) = pool {
        validate_name("pool", p)?;
        if let Some(other) = selector.get(POOL_LABEL).filter(|o| *o != p) {
            return Err(FieldError::new(
                "pool",
                format!("`{p}` contradicts node_selector.{POOL_LABEL} = `{other}`"),
            ));
        }
        out.insert(POOL_LABEL.to_string(), p.to_string());
    }
    Ok(out)
}

/// Checks an image reference: not empty, no whitespace or control
/// characters. Whether it exists is for the node's container engine to say.
pub fn validate_image(image: &str) -> Result<(), FieldError> {
    if image.is_empty() {
        return Err(FieldError::new("image", "must not be empty"));
    }
    if image.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err(FieldError::new(
            "image",
            format!(
                "`{}` is not an image reference: it contains whitespace or control characters (write e.g. `python:3.12-slim`)",
                image.escape_debug()
            ),
        ));
    }
    Ok(())
}

/// The name part of an image reference: `pytorch` for
/// `nvcr.io/nvidia/pytorch:24.01-py3` or `pytorch@sha256:…`.
fn image_name(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    last.split(':').next().unwrap_or(last)
}

/// A job name derived from the program: `python3` for `/usr/bin/python3`.
fn default_name(program: &str) -> String {
    let base = program.rsplit('/').next().unwrap_or(program);
    let cleaned: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let cleaned = cleaned.trim_start_matches(['.', '_', '-']).to_string();
    if cleaned.is_empty() {
        "job".into()
    } else {
        cleaned
    }
}

/// serde_path_to_error writes `.` for the root and `resources.cpu` otherwise;
/// an unknown field is reported at its parent, so we keep what it says.
pub(crate) fn clean_path(p: &str) -> String {
    if p == "." {
        String::new()
    } else {
        p.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(y: &str) -> JobTemplate {
        JobSpec::parse(y).unwrap().validate("ml").unwrap()
    }

    fn parse_err(y: &str) -> FieldError {
        match JobSpec::parse(y) {
            Err(e) => e,
            Ok(spec) => spec.validate("ml").unwrap_err(),
        }
    }

    #[test]
    fn inputs_and_outputs() {
        let t = parse_ok(
            "command: [true]\ninputs:\n  - {dataset: clicks@2, as: train}\n  - {dataset: ads.weights}\noutputs:\n  - {dataset: model, from: out/}\n  - {dataset: ads.metrics, from: m, format: csv, mode: append}",
        );
        assert_eq!(t.inputs[0].dataset, "ml.clicks");
        assert_eq!(t.inputs[0].version, Some(2));
        assert_eq!(t.inputs[0].mount, "train");
        assert_eq!(t.inputs[1].dataset, "ads.weights");
        assert_eq!(t.inputs[1].version, None);
        assert_eq!(t.inputs[1].mount, "weights");
        assert_eq!(t.outputs[0].dataset, "ml.model");
        assert_eq!(t.outputs[0].from, "out");
        assert_eq!(t.outputs[0].format, None);
        assert_eq!(t.outputs[1].format, Some(crate::lake::UploadFormat::Csv));
        assert_eq!(t.outputs[1].mode, crate::lake::WriteMode::Append);
        for (spec, field) in [
            ("inputs: [{dataset: 'Bad Name'}]", "inputs[0].dataset"),
            ("inputs: [{dataset: a, version: 0}]", "inputs[0].version"),
            ("inputs: [{dataset: a@2, version: 3}]", "inputs[0].version"),
            ("inputs: [{dataset: a, as: ..}]", "inputs[0].as"),
            (
                "inputs: [{dataset: a}, {dataset: b, as: a}]",
                "inputs[1].as",
            ),
            ("outputs: [{dataset: m@2, from: out}]", "outputs[0].dataset"),
            ("outputs: [{dataset: m, from: ../x}]", "outputs[0].from"),
            ("outputs: [{dataset: m, from: /abs}]", "outputs[0].from"),
            (
                "outputs: [{dataset: m, from: o, format: xml}]",
                "outputs[0].format",
            ),
            (
                "outputs: [{dataset: m, from: o, mode: merge}]",
                "outputs[0].mode",
            ),
            (
                "outputs: [{dataset: m, from: o, format: files, mode: append}]",
                "outputs[0].mode",
            ),
            (
                "outputs: [{dataset: m, from: o}, {dataset: ml.m, from: p}]",
                "outputs[1].dataset",
            ),
            ("inputs: [{dataset: a, path: /x}]", "inputs[0]"),
        ] {
            let e = parse_err(&format!("command: [true]\n{spec}"));
            assert!(e.field.starts_with(field), "{spec}: {e}");
        }
    }

    #[test]
    fn node_selector_and_pool() {
        let t = parse_ok("command: [true]\npool: lab\nnode_selector: {region: eu, zone: a-1}");
        let sel: Vec<(&str, &str)> = t
            .resources
            .node_selector
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(sel, [("pool", "lab"), ("region", "eu"), ("zone", "a-1")]);
        assert!(parse_ok("command: [true]")
            .resources
            .node_selector
            .is_empty());
        let e = parse_err("command: [true]\nnode_selector: {\"bad key\": x}");
        assert_eq!(e.field, "node_selector");
        assert!(e.message.contains("bad key"), "{}", e.message);
        let e = parse_err("command: [true]\nnode_selector: {region: \"e u\"}");
        assert_eq!(e.field, "node_selector.region");
        let e = parse_err("command: [true]\npool: lab\nnode_selector: {pool: other}");
        assert_eq!(e.field, "pool");
        assert!(e.message.contains("contradicts"), "{}", e.message);
        let e = parse_err("command: [true]\npool: \"no/slash\"");
        assert_eq!(e.field, "pool");
    }

    #[test]
    fn full_yaml_spec() {
        let t = parse_ok(
            r#"
name: train-1
team: ads
command: ["python3", "train.py"]
env: {LR: "0.1"}
workdir: /tmp/x
resources: {cpu: 2, memory: 1.5Gi, gpu: 1, gpu_models: [H100]}
replicas: 2
priority: 5
max_runtime: 2h
retries: {on_failure: 1, on_node_loss: 2}
"#,
        );
        assert_eq!(t.name, "train-1");
        assert_eq!(t.team, "ads");
        assert_eq!(t.resources.cpu_milli, 2000);
        assert_eq!(t.resources.memory_bytes, 3 << 29);
        assert_eq!(t.resources.gpu, 1);
        assert_eq!(t.replicas, 2);
        assert_eq!(t.max_runtime_ms, Some(7_200_000));
        assert_eq!(
            t.retries,
            RetryPolicy {
                on_failure: 1,
                on_node_loss: 2
            }
        );
    }

    #[test]
    fn json_and_yaml_share_a_schema() {
        let j =
            parse_ok(r#"{"script": "echo hi", "resources": {"cpu": "500m", "memory": 1048576}}"#);
        assert_eq!(j.argv, vec!["/bin/sh", "-c", "echo hi"]);
        assert_eq!(j.resources.cpu_milli, 500);
        assert_eq!(j.resources.memory_bytes, 1 << 20);
        assert_eq!(j.team, "ml");
        assert_eq!(j.name, "job");
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = parse_err("command: [true]\nresources: {cpus: 2}\n");
        assert_eq!(e.field, "resources.cpus");
        assert!(e.message.contains("cpus"), "{}", e.message);
        let e = parse_err(r#"{"command": ["true"], "colour": 1}"#);
        assert!(e.message.contains("colour"), "{}", e.message);
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            ("command: []", "command"),
            ("script: '  '", "script"),
            ("name: 'bad name'\ncommand: [x]", "name"),
            ("command: [x]\nresources: {cpu: 0}", "resources.cpu"),
            ("command: [x]\nresources: {cpu: -2}", "resources.cpu"),
            (
                "command: [x]\nresources: {memory: 12Qi}",
                "resources.memory",
            ),
            ("command: [x]\nresources: {memory: 0}", "resources.memory"),
            ("command: [x]\nresources: {gpu: -1}", "resources.gpu"),
            ("command: [x]\nresources: {gpu: 100000}", "resources.gpu"),
            ("command: [x]\nreplicas: 0", "replicas"),
            ("command: [x]\nmax_runtime: 10x", "max_runtime"),
            ("command: [x]\nmax_runtime: 0s", "max_runtime"),
            ("command: [x]\nteam: Bad_Team", "team"),
            ("command: [x]\nenv: {'1A': b}", "env.1A"),
            ("command: [x]\nworkdir: relative/dir", "workdir"),
            ("command: [x]\nretries: -1", "retries"),
            ("command: [x]\nscript: y", "command"),
            ("command: [x]\nreplicas: many", "replicas"),
            ("command: [x]\nimage: ''", "image"),
            ("command: [x]\nimage: 'python 3'", "image"),
            ("command: [x]\nimage: \"py\\tthon\"", "image"),
            ("command: [x]\nimage: [python]", "image"),
            ("env: {A: b}", "command"),
        ];
        for (y, field) in cases {
            let e = parse_err(y);
            assert_eq!(e.field, field, "spec {y:?} gave {e:?}");
            assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn image_makes_the_command_optional() {
        let t = parse_ok("image: nvcr.io/nvidia/pytorch:24.01-py3\n");
        assert_eq!(t.image.as_deref(), Some("nvcr.io/nvidia/pytorch:24.01-py3"));
        assert!(t.argv.is_empty(), "the image's entrypoint runs");
        assert_eq!(t.name, "pytorch");
        assert_eq!(parse_ok("image: 'py@sha256:abc'").name, "py");
        assert_eq!(parse_ok("image: localhost:5000/app").name, "app");
        let t = parse_ok("image: python:3.12\ncommand: [python3, -c, 'print(1)']");
        assert_eq!(t.argv, ["python3", "-c", "print(1)"]);
        assert_eq!(t.name, "python3");
        let t = parse_ok("image: alpine\nscript: echo hi");
        assert_eq!(t.argv, ["/bin/sh", "-c", "echo hi"]);
        let e = parse_err("image: 'python 3'");
        assert_eq!(e.field, "image");
        assert!(e.message.contains("whitespace"), "{}", e.message);
        let e = parse_err("image: ''\ncommand: [x]");
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("image", "must not be empty")
        );
        // Without an image, a command or a script is still required.
        let e = parse_err("name: x");
        assert!(e.message.contains("`image`"), "{}", e.message);
    }

    #[test]
    fn templates_without_an_image_load_and_omit_it() {
        let t = parse_ok("command: [x]");
        let json = serde_json::to_value(&t).unwrap();
        assert!(json.get("image").is_none(), "{json}");
        let back: JobTemplate = serde_json::from_value(json).unwrap();
        assert_eq!(back, t);
        let t = parse_ok("image: alpine");
        let back: JobTemplate = serde_json::from_value(serde_json::to_value(&t).unwrap()).unwrap();
        assert_eq!(back.image.as_deref(), Some("alpine"));
    }

    #[test]
    fn default_names_come_from_the_program() {
        assert_eq!(
            parse_ok("command: [/usr/bin/python3, -c, x]").name,
            "python3"
        );
    }
}
