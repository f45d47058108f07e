//! The Ray pool: a Ray cluster behind [`PoolDriver`], through Ray's Jobs
//! REST API on the head node's dashboard (`http://HEAD:8265`).
//!
//! One Tessera job attempt is one Ray job whose `submission_id` is the
//! attempt's key (`tessera-<job>-<attempt>`). Ray refuses a second job
//! under an id it knows, so a resubmission after a crash finds the first
//! one instead of running twice. The entrypoint is the job's argv, quoted
//! for the shell Ray runs it with; the environment goes into
//! `runtime_env.env_vars`; CPU, GPU and memory per replica become
//! `entrypoint_num_cpus`, `entrypoint_num_gpus` and `entrypoint_memory`
//! (Ray reserves them for the entrypoint process itself); one allowed GPU
//! model becomes the `accelerator_type:<model>` resource Ray gives such
//! nodes. `max_runtime` is enforced inside the cluster by running the
//! entrypoint under `timeout` (exit 124 is reported as a timeout).
//!
//! What Ray cannot do as Tessera asks is refused at submission with the
//! field named: a gang (`replicas` > 1: a Ray job is one entrypoint, whose
//! own Ray tasks spread over the cluster), a container `image`, several
//! GPU models, node selectors, and a replica larger than the cluster's
//! largest node (Ray would otherwise leave it pending without end).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    Capacity, Failure, GpuCount, LogChunk, PoolDriver, PoolError, PoolJob, RemoteId, RemoteState,
};

/// A Ray cluster reached through its dashboard's Jobs REST API.
#[derive(Clone)]
pub struct RayDriver {
    base: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for RayDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RayDriver")
            .field("address", &self.base)
            .finish()
    }
}

/// One job as Ray's `GET /api/jobs/` describes it (the fields Tessera reads).
#[derive(Debug, Clone, Deserialize)]
pub struct RayJobDetails {
    pub submission_id: Option<String>,
    pub status: String,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub error_type: Option<String>,
    #[serde(default)]
    pub driver_exit_code: Option<i32>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub entrypoint: Option<String>,
    #[serde(default)]
    pub runtime_env: Option<Value>,
}

/// The exit code `timeout` gives a program it stopped.
const TIMEOUT_EXIT: i32 = 124;
/// How long a timed-out entrypoint gets between SIGTERM and SIGKILL.
const KILL_AFTER_S: u64 = 10;

impl RayDriver {
    /// `address` is the dashboard's URL, e.g. `http://127.0.0.1:8265`.
    pub fn new(address: &str) -> Result<Self, PoolError> {
        let base = address.trim_end_matches('/').to_string();
        if base.starts_with("https://") {
            return Err(PoolError::Rejected(format!(
                "address: {address:?}: HTTPS dashboards are not supported yet; give the \
                 dashboard's http:// URL"
            )));
        }
        if !base.starts_with("http://") || base.len() <= "http://".len() {
            return Err(PoolError::Rejected(format!(
                "address: {address:?} is not the http:// URL of a Ray dashboard"
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| PoolError::Unavailable(format!("http client: {e}")))?;
        Ok(RayDriver { base, http })
    }

    pub fn address(&self) -> &str {
        &self.base
    }

    /// The Ray version the cluster runs (`GET /api/version`); a cheap
    /// check that the address is a Ray dashboard.
    pub async fn version(&self) -> Result<String, PoolError> {
        let v: Value = self.get_json("/api/version").await?;
        v.get("ray_version")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| {
                PoolError::Unavailable(format!(
                    "{} does not answer like a Ray dashboard",
                    self.base
                ))
            })
    }

    /// Every job the cluster knows, in one call.
    pub async fn list(&self) -> Result<Vec<RayJobDetails>, PoolError> {
        self.get_json("/api/jobs/").await
    }

    /// Follows a job's output as Ray produces it (the dashboard's
    /// `logs/tail` WebSocket): chunks of text until the job ends.
    pub async fn tail(
        &self,
        id: &RemoteId,
    ) -> Result<impl Stream<Item = Result<String, PoolError>>, PoolError> {
        use tokio_tungstenite::tungstenite::Message;
        let ws_base = format!("ws://{}", self.base.trim_start_matches("http://"));
        let url = format!("{ws_base}/api/jobs/{}/logs/tail", path_segment(&id.0));
        // A job Ray does not know closes the socket at once; say so instead.
        self.details(id).await?;
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .map_err(|e| PoolError::Unavailable(format!("{url}: {e}")))?;
        Ok(ws.filter_map(|m| async move {
            match m {
                Ok(Message::Text(t)) => Some(Ok(t.to_string())),
                Ok(Message::Binary(b)) => Some(Ok(String::from_utf8_lossy(&b).into_owned())),
                Ok(_) => None,
                Err(e) => Some(Err(PoolError::Unavailable(format!("log stream: {e}")))),
            }
        }))
    }

    async fn details(&self, id: &RemoteId) -> Result<RayJobDetails, PoolError> {
        let path = format!("/api/jobs/{}", path_segment(&id.0));
        match self.get_json(&path).await {
            Err(PoolError::NotFound(_)) => Err(PoolError::NotFound(id.0.clone())),
            other => other,
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, PoolError> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| unavailable(&url, e))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(PoolError::NotFound(path.to_string()));
        }
        let body = resp.bytes().await.map_err(|e| unavailable(&url, e))?;
        if !status.is_success() {
            return Err(PoolError::Unavailable(format!(
                "{url}: HTTP {status}: {}",
                last_line(&body)
            )));
        }
        serde_json::from_slice(&body)
            .map_err(|e| PoolError::Unavailable(format!("{url}: unexpected answer: {e}")))
    }
}

#[async_trait]
impl PoolDriver for RayDriver {
    fn kind(&self) -> &'static str {
        "ray"
    }

    async fn submit(&self, job: &PoolJob) -> Result<RemoteId, PoolError> {
        let body = submit_body(job)?;
        // Refuse what no node of the cluster can hold: Ray would keep it
        // pending for ever. Without an answer from the autoscaler's
        // status (an unusual deployment), leave the judgement to Ray.
        if let Ok(cap) = self.capacity().await {
            check_fits(job, &cap)?;
        }
        let url = format!("{}/api/jobs/", self.base);
        let resp = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .map_err(|e| unavailable(&url, e))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| unavailable(&url, e))?;
        if status.is_success() {
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| PoolError::Unavailable(format!("{url}: unexpected answer: {e}")))?;
            let id = v
                .get("submission_id")
                .and_then(Value::as_str)
                .unwrap_or(&job.key);
            return Ok(RemoteId(id.to_string()));
        }
        // Ray refuses a submission id it already has (HTTP 500 with a
        // ValueError, or 400 in other versions): the attempt was submitted
        // before, which is exactly what idempotency wants — if it is this
        // job. Keys are unique within one Tessera installation only, so a
        // job another installation (or an earlier, since reset one) left
        // under the same key is not taken for it.
        if text.contains("already exists") && text.contains(&job.key) {
            let id = RemoteId(job.key.clone());
            let existing = self.details(&id).await?;
            return if same_job(&body, &existing) {
                Ok(id)
            } else {
                Err(PoolError::Rejected(format!(
                    "key: the Ray cluster already holds a different job under {} (left by \
                     another Tessera installation sharing the cluster?); delete it there, or \
                     retry the job as a new attempt",
                    job.key
                )))
            };
        }
        let why = last_line(text.as_bytes());
        if status.is_client_error() {
            Err(PoolError::Rejected(format!("Ray refused the job: {why}")))
        } else {
            Err(PoolError::Unavailable(format!(
                "{url}: HTTP {status}: {why}"
            )))
        }
    }

    async fn status(&self, ids: &[RemoteId]) -> Result<HashMap<RemoteId, RemoteState>, PoolError> {
        let mut out: HashMap<RemoteId, RemoteState> = ids
            .iter()
            .map(|id| (id.clone(), RemoteState::NotFound))
            .collect();
        if ids.is_empty() {
            return Ok(out);
        }
        for d in self.list().await? {
            let Some(sid) = d.submission_id.clone() else {
                continue;
            };
            let id = RemoteId(sid);
            if let Some(slot) = out.get_mut(&id) {
                *slot = map_state(&d);
            }
        }
        Ok(out)
    }

    async fn cancel(&self, id: &RemoteId) -> Result<(), PoolError> {
        let url = format!("{}/api/jobs/{}/stop", self.base, path_segment(&id.0));
        let resp = self
            .http
            .post(&url)
            .send()
            .await
            .map_err(|e| unavailable(&url, e))?;
        let status = resp.status();
        if status.is_success() || status == reqwest::StatusCode::NOT_FOUND {
            // `{"stopped": false}` means it had already ended: not an error.
            return Ok(());
        }
        let body = resp.bytes().await.unwrap_or_default();
        Err(PoolError::Unavailable(format!(
            "{url}: HTTP {status}: {}",
            last_line(&body)
        )))
    }

    async fn logs(&self, id: &RemoteId, offset: u64) -> Result<LogChunk, PoolError> {
        // State first: if the job had ended before the logs were read,
        // what is read is all there will be.
        let ended = map_state(&self.details(id).await?).is_terminal();
        #[derive(Deserialize)]
        struct Logs {
            logs: String,
        }
        let path = format!("/api/jobs/{}/logs", path_segment(&id.0));
        let logs: Logs = match self.get_json(&path).await {
            Err(PoolError::NotFound(_)) => return Err(PoolError::NotFound(id.0.clone())),
            other => other?,
        };
        let all = logs.logs.into_bytes();
        let start = (offset as usize).min(all.len());
        Ok(LogChunk {
            data: all[start..].to_vec(),
            next_offset: all.len() as u64,
            complete: ended,
        })
    }

    async fn capacity(&self) -> Result<Capacity, PoolError> {
        let v: Value = self.get_json("/api/cluster_status?format=0").await?;
        capacity_from_cluster_status(&v).ok_or_else(|| {
            PoolError::Unavailable(format!(
                "{}: the cluster status has no per-node resource usage",
                self.base
            ))
        })
    }
}

fn unavailable(url: &str, e: reqwest::Error) -> PoolError {
    PoolError::Unavailable(format!("{url}: {e}"))
}

/// The last non-empty line of an error body (Ray answers errors with a
/// Python traceback whose last line is the reason).
fn last_line(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let line = text
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && *l != ".")
        .unwrap_or("(empty answer)");
    line.chars().take(500).collect()
}

/// Keys are `tessera-<job>-<attempt>`; anything else is escaped.
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Quotes one word for a POSIX shell: bare when it is plainly safe,
/// otherwise in single quotes (a single quote becomes `'\''`).
pub fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'_' | b'.' | b'/' | b':' | b'=' | b'+' | b',' | b'@' | b'%'
                )
        });
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The shell command Ray runs for a job: its argv quoted word by word,
/// under `timeout` when the job has a maximum run time, after a `cd` into
/// its working directory when it names one.
pub fn entrypoint(job: &PoolJob) -> String {
    let mut cmd: Vec<String> = Vec::new();
    if let Some(ms) = job.max_runtime_ms {
        let secs = ms.div_ceil(1000).max(1);
        cmd.extend([
            "timeout".into(),
            format!("--kill-after={KILL_AFTER_S}"),
            secs.to_string(),
        ]);
    }
    cmd.extend(job.argv.iter().map(|w| shell_quote(w)));
    let cmd = cmd.join(" ");
    match &job.workdir {
        Some(dir) => format!("cd {} && exec {cmd}", shell_quote(dir)),
        None => format!("exec {cmd}"),
    }
}

/// The body of `POST /api/jobs/` for one attempt, or the field Ray cannot
/// honour.
pub fn submit_body(job: &PoolJob) -> Result<Value, PoolError> {
    if job.argv.is_empty() {
        return Err(PoolError::Rejected(
            "command: a Ray pool needs a command or script to run".into(),
        ));
    }
    if job.replicas != 1 {
        return Err(PoolError::Rejected(format!(
            "replicas: a Ray pool runs one entrypoint per job (its Ray tasks spread over the \
             cluster), not a gang of {}",
            job.replicas
        )));
    }
    if let Some(image) = &job.image {
        return Err(PoolError::Rejected(format!(
            "image: a Ray pool runs the entrypoint in the cluster's own environment, not in \
             the container {image:?}"
        )));
    }
    if job.gpu_models.len() > 1 {
        return Err(PoolError::Rejected(format!(
            "resources.gpu_models: a Ray pool can require one GPU model, not any of {:?}",
            job.gpu_models
        )));
    }
    if !job.node_selector.is_empty() {
        return Err(PoolError::Rejected(
            "node_selector: a Ray pool does not place by node labels".into(),
        ));
    }
    let mut env: BTreeMap<String, String> = job.env.iter().cloned().collect();
    env.insert("TESSERA_JOB_ID".into(), job.job_id.to_string());
    env.insert("TESSERA_ATTEMPT".into(), job.attempt.to_string());
    env.insert("TESSERA_REPLICA".into(), "0".into());
    env.insert("TESSERA_NUM_REPLICAS".into(), "1".into());
    let mut body = json!({
        "entrypoint": entrypoint(job),
        "submission_id": job.key,
        "runtime_env": {"env_vars": env},
        "metadata": {
            "tessera_key": job.key,
            "tessera_job_id": job.job_id.to_string(),
            "tessera_attempt": job.attempt.to_string(),
            "tessera_name": job.name,
            "tessera_team": job.team,
        },
        "entrypoint_num_cpus": job.cpu_milli as f64 / 1000.0,
    });
    if job.gpus > 0 {
        body["entrypoint_num_gpus"] = json!(job.gpus);
    }
    if job.memory_bytes > 0 {
        body["entrypoint_memory"] = json!(job.memory_bytes);
    }
    if let Some(model) = job.gpu_models.first() {
        body["entrypoint_resources"] = json!({ format!("accelerator_type:{model}"): 0.001 });
    }
    Ok(body)
}

/// Whether Ray's job `existing` is the one `body` submits: the same
/// entrypoint, environment and Tessera metadata.
fn same_job(body: &Value, existing: &RayJobDetails) -> bool {
    let meta: BTreeMap<String, String> = body["metadata"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    existing.entrypoint.as_deref() == body["entrypoint"].as_str()
        && existing.metadata.as_ref() == Some(&meta)
        && existing
            .runtime_env
            .as_ref()
            .map(|r| r.get("env_vars").cloned().unwrap_or(Value::Null))
            == Some(body["runtime_env"]["env_vars"].clone())
}

/// Refuses a replica that no node of the cluster can hold.
pub fn check_fits(job: &PoolJob, cap: &Capacity) -> Result<(), PoolError> {
    let (cpu, mem, gpus) = cap.largest_node;
    if job.cpu_milli > cpu {
        return Err(PoolError::Rejected(format!(
            "resources.cpu: {} CPUs per replica, but the largest node of the Ray cluster has {}",
            job.cpu_milli as f64 / 1000.0,
            cpu as f64 / 1000.0
        )));
    }
    if job.memory_bytes > mem {
        return Err(PoolError::Rejected(format!(
            "resources.memory: {} bytes per replica, but the largest node of the Ray cluster \
             offers {mem} bytes to tasks",
            job.memory_bytes
        )));
    }
    if job.gpus > gpus {
        return Err(PoolError::Rejected(format!(
            "resources.gpu: {} GPUs per replica, but the largest node of the Ray cluster has {gpus}",
            job.gpus
        )));
    }
    if let Some(model) = job.gpu_models.first() {
        if job.gpus > 0 && !cap.gpus.iter().any(|g| &g.model == model) {
            return Err(PoolError::Rejected(format!(
                "resources.gpu_models: the Ray cluster has no {model} GPUs"
            )));
        }
    }
    Ok(())
}

/// Ray's job status in Tessera's terms.
pub fn map_state(d: &RayJobDetails) -> RemoteState {
    let message = d.message.clone().unwrap_or_default();
    match d.status.as_str() {
        "PENDING" => RemoteState::Queued {
            reason: d.message.clone(),
        },
        "RUNNING" => RemoteState::Running,
        "SUCCEEDED" => RemoteState::Succeeded,
        "STOPPED" => RemoteState::Cancelled,
        "FAILED" => {
            let exit_code = d.driver_exit_code;
            let timed_out = exit_code == Some(TIMEOUT_EXIT)
                && d.entrypoint
                    .as_deref()
                    .is_some_and(|e| e.contains("timeout --kill-after="));
            let failure = if timed_out {
                Failure::TimedOut
            } else {
                match d.error_type.as_deref() {
                    Some("JOB_ENTRYPOINT_COMMAND_ERROR") => Failure::Exited,
                    Some(t) if t.contains("UNSCHEDULABLE") || t.contains("RUNTIME_ENV") => {
                        Failure::Rejected
                    }
                    Some(t) if t.contains("NODE") => Failure::NodeFailure,
                    _ if exit_code.is_some() => Failure::Exited,
                    _ => Failure::NodeFailure,
                }
            };
            let message = match &d.error_type {
                Some(t) => format!("{t}: {message}"),
                None => message,
            };
            RemoteState::Failed {
                failure,
                exit_code,
                message,
            }
        }
        other => RemoteState::Queued {
            reason: Some(format!("Ray reports {other}: {message}")),
        },
    }
}

/// Reads capacity from the dashboard's `GET /api/cluster_status?format=0`:
/// per node, `[used, total]` of each resource.
pub fn capacity_from_cluster_status(v: &Value) -> Option<Capacity> {
    let report = v
        .pointer("/data/clusterStatus/loadMetricsReport")
        .filter(|r| !r.is_null())?;
    let by_node = report.get("usageByNode")?.as_object()?;
    let mut cap = Capacity {
        labels: BTreeMap::from([("engine".to_string(), "ray".to_string())]),
        ..Capacity::default()
    };
    let mut models: BTreeMap<String, u32> = BTreeMap::new();
    for usage in by_node.values() {
        let pair = |name: &str| -> (f64, f64) {
            usage
                .get(name)
                .and_then(Value::as_array)
                .map(|a| {
                    (
                        a.first().and_then(Value::as_f64).unwrap_or(0.0),
                        a.get(1).and_then(Value::as_f64).unwrap_or(0.0),
                    )
                })
                .unwrap_or((0.0, 0.0))
        };
        let (cpu_used, cpu_total) = pair("CPU");
        let (mem_used, mem_total) = pair("memory");
        let (gpu_used, gpu_total) = pair("GPU");
        cap.nodes += 1;
        let cpu_milli = (cpu_total * 1000.0).round() as u64;
        let mem = mem_total as u64;
        let gpus = gpu_total.floor() as u32;
        cap.cpu_milli += cpu_milli;
        cap.memory_bytes += mem;
        cap.used_cpu_milli += (cpu_used * 1000.0).round() as u64;
        cap.used_memory_bytes += mem_used as u64;
        cap.used_gpus += gpu_used.ceil() as u32;
        let (lc, lm, lg) = cap.largest_node;
        cap.largest_node = (lc.max(cpu_milli), lm.max(mem), lg.max(gpus));
        if gpus > 0 {
            let model = usage
                .as_object()
                .and_then(|o| {
                    o.keys()
                        .find_map(|k| k.strip_prefix("accelerator_type:"))
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "unknown".to_string());
            *models.entry(model).or_default() += gpus;
        }
    }
    cap.gpus = models
        .into_iter()
        .map(|(model, count)| GpuCount { model, count })
        .collect();
    Some(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> PoolJob {
        PoolJob {
            key: PoolJob::key_for(7, 2),
            job_id: 7,
            attempt: 2,
            name: "n".into(),
            team: "t".into(),
            argv: vec!["echo".into(), "it's a $HOME".into()],
            image: None,
            env: vec![("A".into(), "1".into())],
            workdir: None,
            replicas: 1,
            cpu_milli: 500,
            memory_bytes: 0,
            gpus: 0,
            gpu_models: vec![],
            max_runtime_ms: None,
            node_selector: BTreeMap::new(),
        }
    }

    #[test]
    fn argv_is_quoted_so_the_shell_passes_it_unchanged() {
        assert_eq!(entrypoint(&job()), r"exec echo 'it'\''s a $HOME'");
        let mut j = job();
        j.workdir = Some("/data/my runs".into());
        j.max_runtime_ms = Some(1500);
        assert_eq!(
            entrypoint(&j),
            r"cd '/data/my runs' && exec timeout --kill-after=10 2 echo 'it'\''s a $HOME'"
        );
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn an_address_must_be_a_plain_http_url() {
        assert!(RayDriver::new("http://head:8265/").is_ok());
        for bad in ["head:8265", "https://head:8265", "http://", "ftp://x"] {
            assert!(
                matches!(RayDriver::new(bad), Err(PoolError::Rejected(m)) if m.starts_with("address:")),
                "{bad}"
            );
        }
    }

    #[test]
    fn what_ray_cannot_do_is_refused_with_the_field_named() {
        let mut j = job();
        j.replicas = 2;
        assert!(
            matches!(submit_body(&j), Err(PoolError::Rejected(m)) if m.starts_with("replicas:"))
        );
        let mut j = job();
        j.image = Some("python:3".into());
        assert!(matches!(submit_body(&j), Err(PoolError::Rejected(m)) if m.starts_with("image:")));
        let mut j = job();
        j.cpu_milli = 4000;
        let cap = Capacity {
            largest_node: (2000, 1 << 30, 0),
            ..Capacity::default()
        };
        assert!(
            matches!(check_fits(&j, &cap), Err(PoolError::Rejected(m)) if m.starts_with("resources.cpu:"))
        );
    }

    #[test]
    fn a_timeout_is_told_from_an_ordinary_failure() {
        let d = RayJobDetails {
            submission_id: Some("k".into()),
            status: "FAILED".into(),
            message: Some("Job entrypoint command failed with exit code 124".into()),
            error_type: Some("JOB_ENTRYPOINT_COMMAND_ERROR".into()),
            driver_exit_code: Some(124),
            metadata: None,
            entrypoint: Some("exec timeout --kill-after=10 1 sleep 5".into()),
            runtime_env: None,
        };
        assert!(matches!(
            map_state(&d),
            RemoteState::Failed {
                failure: Failure::TimedOut,
                ..
            }
        ));
        let d = RayJobDetails {
            entrypoint: Some("exec sh -c 'exit 124'".into()),
            ..d
        };
        assert!(matches!(
            map_state(&d),
            RemoteState::Failed {
                failure: Failure::Exited,
                ..
            }
        ));
    }
}
