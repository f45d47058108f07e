//! The Kubernetes pool: a Kubernetes cluster behind Tessera's
//! [`PoolDriver`], through kube-rs. It owns the translation between a
//! Tessera job attempt and a `batch/v1` Job, and nothing else: no state of
//! its own, no scheduling (the cluster's scheduler places the pods), no
//! retries (Tessera retries a failed attempt as a new attempt).
//!
//! One attempt is one Indexed Job named by the attempt's key
//! (`tessera-<job>-<attempt>`), with `completions = parallelism = replicas`
//! and `backoffLimit: 0`, so that one failed replica fails the whole gang
//! and the Job controller stops the others. Each replica is one pod with
//! one container `main`: the job's image (or the pool's default image for
//! jobs without one), its argv as `command`, its env plus
//! `TESSERA_JOB_ID` / `TESSERA_ATTEMPT` / `TESSERA_NUM_REPLICAS` /
//! `TESSERA_REPLICA` (the completion index), CPU, memory and
//! `nvidia.com/gpu` as equal requests and limits, the job's node selector,
//! GPU models as node affinity on `nvidia.com/gpu.product`, and
//! `activeDeadlineSeconds` from `max_runtime`. Labels carry the key, so a
//! create that meets `409 AlreadyExists` returns the existing Job.
//!
//! Status comes from one list of Jobs and one list of Pods (by label
//! selector) per call, whatever the number of jobs asked about; exit codes
//! and reasons (`OOMKilled`, `DeadlineExceeded`, evictions, unschedulable
//! pods) from the pods' container statuses. Logs are the pods' logs;
//! cancel deletes the Job with background propagation (its pods go too);
//! capacity is the nodes' allocatable minus the requests of the pods bound
//! to them.
//!
//! Not yet met a real cluster: it is tested against a wire-level fake of
//! the API server (`tests/fake_apiserver`) that checks every request
//! against the Job/Pod schemas of `k8s-openapi`. Kubernetes does not
//! gang-schedule pods by itself: a gang whose pods do not all fit waits
//! with some pods pending (Kueue or Volcano fix this in the cluster).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use async_trait::async_trait;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Container, EnvVar, EnvVarSource, Node, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, ObjectFieldSelector, Pod, PodSpec, PodTemplateSpec,
    ResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tessera_pools::{
    Capacity, Failure, GpuCount, LogChunk, PoolDriver, PoolError, PoolJob, RemoteId, RemoteState,
};

pub mod quantity;

/// The label every object Tessera creates carries (`tessera`).
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The label that holds the attempt's key on the Job and its pods.
pub const KEY_LABEL: &str = "tessera.dev/key";
pub const JOB_ID_LABEL: &str = "tessera.dev/job-id";
pub const ATTEMPT_LABEL: &str = "tessera.dev/attempt";
pub const TEAM_LABEL: &str = "tessera.dev/team";
/// The annotation with the job's name as the user wrote it.
pub const NAME_ANNOTATION: &str = "tessera.dev/name";
/// The node label NVIDIA's GPU feature discovery sets to the GPU model.
pub const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
/// The extended resource of NVIDIA's device plugin.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// The one container of each replica's pod.
pub const CONTAINER: &str = "main";
/// The image of jobs that name none, unless the pool says otherwise.
pub const DEFAULT_IMAGE: &str = "python:3.12-slim";

/// A namespace of a Kubernetes cluster, reached through kube-rs.
#[derive(Clone)]
pub struct KubeDriver {
    client: Client,
    namespace: String,
    default_image: String,
}

impl std::fmt::Debug for KubeDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeDriver")
            .field("namespace", &self.namespace)
            .field("default_image", &self.default_image)
            .finish()
    }
}

impl KubeDriver {
    /// A driver over an existing client, in `namespace`.
    pub fn new(client: Client, namespace: impl Into<String>) -> Self {
        KubeDriver {
            client,
            namespace: namespace.into(),
            default_image: DEFAULT_IMAGE.to_string(),
        }
    }

    /// Reads a kubeconfig file (its current context, or `context`); the
    /// namespace is `namespace`, else the context's, else `default`.
    pub async fn from_kubeconfig(
        path: &Path,
        context: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<Self, PoolError> {
        let kubeconfig = Kubeconfig::read_from(path).map_err(|e| {
            PoolError::Rejected(format!("kubeconfig: cannot read {}: {e}", path.display()))
        })?;
        let options = KubeConfigOptions {
            context: context.map(str::to_string),
            ..KubeConfigOptions::default()
        };
        let config = Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .map_err(|e| PoolError::Rejected(format!("kubeconfig: {}: {e}", path.display())))?;
        let ns = namespace
            .map(str::to_string)
            .unwrap_or_else(|| config.default_namespace.clone());
        check_dns_label("namespace", &ns)?;
        Ok(Self::new(client_for(config)?, ns))
    }

    /// The image for jobs that name none.
    pub fn with_default_image(mut self, image: impl Into<String>) -> Self {
        self.default_image = image.into();
        self
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The output of one replica (its pod's container `main`) from byte
    /// `offset` on. [`PoolDriver::logs`] reads replica 0.
    pub async fn replica_logs(
        &self,
        id: &RemoteId,
        replica: u32,
        offset: u64,
    ) -> Result<LogChunk, PoolError> {
        let job = match self.jobs().get_opt(&id.0).await.map_err(api_error)? {
            Some(job) => job,
            None => return Err(PoolError::NotFound(id.0.clone())),
        };
        let pods = self
            .pods()
            .list(&ListParams::default().labels(&format!("{KEY_LABEL}={}", id.0)))
            .await
            .map_err(api_error)?;
        let job_ended = job_condition(&job).is_some();
        // The newest pod of the replica (a replaced pod leaves its
        // predecessor behind until the Job goes).
        let pod = pods
            .items
            .into_iter()
            .filter(|p| completion_index(p) == Some(replica))
            .max_by(|a, b| {
                a.metadata
                    .creation_timestamp
                    .cmp(&b.metadata.creation_timestamp)
            });
        let Some(pod) = pod else {
            return Ok(LogChunk {
                data: vec![],
                next_offset: offset,
                complete: job_ended,
            });
        };
        let ended = job_ended || pod_terminated(&pod);
        let started = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    c.state
                        .as_ref()
                        .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
                })
            });
        if !started {
            return Ok(LogChunk {
                data: vec![],
                next_offset: offset,
                complete: ended,
            });
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        let params = LogParams {
            container: Some(CONTAINER.to_string()),
            ..LogParams::default()
        };
        let text = self.pods().logs(&name, &params).await.map_err(api_error)?;
        let all = text.into_bytes();
        let start = (offset as usize).min(all.len());
        Ok(LogChunk {
            data: all[start..].to_vec(),
            next_offset: all.len() as u64,
            complete: ended,
        })
    }
}

#[async_trait]
impl PoolDriver for KubeDriver {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    async fn submit(&self, job: &PoolJob) -> Result<RemoteId, PoolError> {
        let manifest = job_manifest(job, &self.default_image)?;
        match self.jobs().create(&PostParams::default(), &manifest).await {
            Ok(_) => Ok(RemoteId(job.key.clone())),
            Err(kube::Error::Api(status)) if status.is_already_exists() => {
                // Submitted before (a retry after a crash): the existing Job
                // is this attempt, as long as it carries this attempt's key.
                // Keys are unique within one Tessera installation only.
                let existing = self.jobs().get(&job.key).await.map_err(api_error)?;
                if same_job(&manifest, &existing) {
                    Ok(RemoteId(job.key.clone()))
                } else {
                    Err(PoolError::Rejected(format!(
                        "name: a Job named {} exists in namespace {} but is not this attempt \
                         (made by someone else, or by another Tessera installation sharing \
                         the namespace)",
                        job.key, self.namespace
                    )))
                }
            }
            Err(kube::Error::Api(status)) if status.is_invalid() || status.code == 400 => {
                Err(PoolError::Rejected(format!(
                    "the Kubernetes API server refused the Job: {}",
                    status.message
                )))
            }
            Err(kube::Error::Api(status)) if status.is_forbidden() => {
                Err(PoolError::Rejected(format!(
                    "forbidden in namespace {}: {}",
                    self.namespace, status.message
                )))
            }
            Err(e) => Err(api_error(e)),
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
        let selector = format!("{MANAGED_BY}=tessera");
        let lp = ListParams::default().labels(&selector);
        let (jobs_api, pods_api) = (self.jobs(), self.pods());
        let (jobs, pods) =
            futures::try_join!(jobs_api.list(&lp), pods_api.list(&lp)).map_err(api_error)?;
        let mut pods_by_key: HashMap<String, Vec<Pod>> = HashMap::new();
        for pod in pods.items {
            if let Some(key) = pod.metadata.labels.as_ref().and_then(|l| l.get(KEY_LABEL)) {
                pods_by_key.entry(key.clone()).or_default().push(pod);
            }
        }
        for job in jobs.items {
            let Some(name) = job.metadata.name.clone() else {
                continue;
            };
            let id = RemoteId(name);
            if let Some(slot) = out.get_mut(&id) {
                let pods = pods_by_key.remove(&id.0).unwrap_or_default();
                *slot = job_state(&job, &pods);
            }
        }
        Ok(out)
    }

    async fn cancel(&self, id: &RemoteId) -> Result<(), PoolError> {
        match self.jobs().delete(&id.0, &DeleteParams::background()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
            Err(e) => Err(api_error(e)),
        }
    }

    async fn logs(&self, id: &RemoteId, offset: u64) -> Result<LogChunk, PoolError> {
        self.replica_logs(id, 0, offset).await
    }

    async fn capacity(&self) -> Result<Capacity, PoolError> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let pods: Api<Pod> = Api::all(self.client.clone());
        let live = ListParams::default().fields("status.phase!=Succeeded,status.phase!=Failed");
        let all = ListParams::default();
        let (nodes, pods) =
            futures::try_join!(nodes.list(&all), pods.list(&live)).map_err(api_error)?;
        Ok(capacity_of(&nodes.items, &pods.items))
    }
}

/// A client for `config` that answers within bounded time: kube's own
/// retries (up to 15, minutes apart) are off, since the pool loop asks
/// again on its next pass anyway, and no call waits more than 30 s.
pub fn client_for(mut config: Config) -> Result<Client, PoolError> {
    config.default_retry = false;
    config.connect_timeout = Some(std::time::Duration::from_secs(10));
    config.read_timeout = Some(std::time::Duration::from_secs(30));
    // kube builds its TLS configuration with rustls's process-wide
    // provider; where more than one provider is compiled in (a dependency
    // elsewhere in the binary enables aws-lc-rs), rustls cannot pick one by
    // itself, so name the project's, ring, unless one is set already.
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    Client::try_from(config).map_err(|e| PoolError::Unavailable(format!("kubernetes client: {e}")))
}

/// A Kubernetes pool as a server configures it: the kubeconfig is checked
/// when the pool is made, and the client is built on first use (building
/// one needs the async runtime, and may run a kubeconfig's credential
/// plugin).
pub struct KubePool {
    kubeconfig: std::path::PathBuf,
    context: Option<String>,
    namespace: Option<String>,
    default_image: Option<String>,
    driver: tokio::sync::OnceCell<KubeDriver>,
}

impl std::fmt::Debug for KubePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubePool")
            .field("kubeconfig", &self.kubeconfig)
            .field("context", &self.context)
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl KubePool {
    /// Checks that `kubeconfig` reads as one and names `context` (when
    /// given), and that `namespace` is a valid name; errors name the
    /// option (`kubeconfig:`, `context:`, `namespace:`).
    pub fn new(
        kubeconfig: &Path,
        context: Option<&str>,
        namespace: Option<&str>,
        default_image: Option<&str>,
    ) -> Result<Self, PoolError> {
        let kc = Kubeconfig::read_from(kubeconfig).map_err(|e| {
            PoolError::Rejected(format!(
                "kubeconfig: cannot read {}: {e}",
                kubeconfig.display()
            ))
        })?;
        match context {
            Some(c) if !kc.contexts.iter().any(|n| n.name == c) => {
                return Err(PoolError::Rejected(format!(
                    "context: {} has no context `{c}`",
                    kubeconfig.display()
                )))
            }
            None if kc.current_context.is_none() => {
                return Err(PoolError::Rejected(format!(
                    "context: {} sets no current-context; name one",
                    kubeconfig.display()
                )))
            }
            _ => {}
        }
        if let Some(ns) = namespace {
            check_dns_label("namespace", ns)?;
        }
        if let Some(image) = default_image {
            if image.is_empty() || image.contains(char::is_whitespace) {
                return Err(PoolError::Rejected(format!(
                    "image: `{image}` is not an image reference"
                )));
            }
        }
        Ok(KubePool {
            kubeconfig: kubeconfig.to_path_buf(),
            context: context.map(str::to_string),
            namespace: namespace.map(str::to_string),
            default_image: default_image.map(str::to_string),
            driver: tokio::sync::OnceCell::new(),
        })
    }

    async fn driver(&self) -> Result<&KubeDriver, PoolError> {
        self.driver
            .get_or_try_init(|| async {
                let d = KubeDriver::from_kubeconfig(
                    &self.kubeconfig,
                    self.context.as_deref(),
                    self.namespace.as_deref(),
                )
                .await?;
                Ok(match &self.default_image {
                    Some(i) => d.with_default_image(i.clone()),
                    None => d,
                })
            })
            .await
    }
}

#[async_trait]
impl PoolDriver for KubePool {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    async fn submit(&self, job: &PoolJob) -> Result<RemoteId, PoolError> {
        self.driver().await?.submit(job).await
    }

    async fn status(&self, ids: &[RemoteId]) -> Result<HashMap<RemoteId, RemoteState>, PoolError> {
        self.driver().await?.status(ids).await
    }

    async fn cancel(&self, id: &RemoteId) -> Result<(), PoolError> {
        self.driver().await?.cancel(id).await
    }

    async fn logs(&self, id: &RemoteId, offset: u64) -> Result<LogChunk, PoolError> {
        self.driver().await?.logs(id, offset).await
    }

    async fn capacity(&self) -> Result<Capacity, PoolError> {
        self.driver().await?.capacity().await
    }
}

fn api_error(e: kube::Error) -> PoolError {
    match e {
        kube::Error::Api(status) if status.is_not_found() => PoolError::NotFound(status.message),
        kube::Error::Api(status) => PoolError::Unavailable(format!(
            "Kubernetes API: {} ({} {})",
            status.message, status.code, status.reason
        )),
        other => PoolError::Unavailable(format!("Kubernetes API: {other}")),
    }
}

/// A DNS-1123 label: what Kubernetes accepts as a namespace or a Job name.
fn check_dns_label(field: &str, s: &str) -> Result<(), PoolError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(PoolError::Rejected(format!(
            "{field}: {s:?} is not a valid Kubernetes name (lower-case letters, digits and '-', \
             at most 63)"
        )))
    }
}

/// A label value Kubernetes accepts: at most 63 of `[A-Za-z0-9._-]`,
/// starting and ending alphanumeric. Anything else is replaced by `_`.
pub fn label_value(s: &str) -> String {
    let mut v: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    while v.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        v.pop();
    }
    while v.starts_with(|c: char| !c.is_ascii_alphanumeric()) {
        v.remove(0);
    }
    v
}

/// The `batch/v1` Job for one attempt, or the field Kubernetes cannot
/// honour.
pub fn job_manifest(job: &PoolJob, default_image: &str) -> Result<Job, PoolError> {
    check_dns_label("key", &job.key)?;
    if job.replicas == 0 {
        return Err(PoolError::Rejected("replicas: must be at least 1".into()));
    }
    if job.argv.is_empty() && job.image.is_none() {
        return Err(PoolError::Rejected(
            "command: a job without an image needs a command or script".into(),
        ));
    }
    let mut labels = BTreeMap::from([
        (MANAGED_BY.to_string(), "tessera".to_string()),
        (KEY_LABEL.to_string(), job.key.clone()),
        (JOB_ID_LABEL.to_string(), job.job_id.to_string()),
        (ATTEMPT_LABEL.to_string(), job.attempt.to_string()),
    ]);
    let team = label_value(&job.team);
    if !team.is_empty() {
        labels.insert(TEAM_LABEL.to_string(), team);
    }
    let mut env = vec![
        env_var("TESSERA_JOB_ID", &job.job_id.to_string()),
        env_var("TESSERA_ATTEMPT", &job.attempt.to_string()),
        env_var("TESSERA_NUM_REPLICAS", &job.replicas.to_string()),
        EnvVar {
            name: "TESSERA_REPLICA".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    // Written out: the API server would default it, and a
                    // resubmission compares what it sends with what is stored.
                    api_version: Some("v1".into()),
                    field_path: "metadata.annotations['batch.kubernetes.io/job-completion-index']"
                        .into(),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
    ];
    for (k, v) in &job.env {
        env.retain(|e| &e.name != k);
        env.push(env_var(k, v));
    }
    let mut amounts = BTreeMap::new();
    if job.cpu_milli > 0 {
        amounts.insert("cpu".to_string(), Quantity(format!("{}m", job.cpu_milli)));
    }
    if job.memory_bytes > 0 {
        amounts.insert("memory".to_string(), Quantity(job.memory_bytes.to_string()));
    }
    if job.gpus > 0 {
        amounts.insert(GPU_RESOURCE.to_string(), Quantity(job.gpus.to_string()));
    }
    let resources = (!amounts.is_empty()).then(|| ResourceRequirements {
        requests: Some(amounts.clone()),
        limits: Some(amounts),
        ..ResourceRequirements::default()
    });
    let affinity = (!job.gpu_models.is_empty()).then(|| Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: GPU_PRODUCT_LABEL.into(),
                        operator: "In".into(),
                        values: Some(job.gpu_models.clone()),
                    }]),
                    ..NodeSelectorTerm::default()
                }],
            }),
            ..NodeAffinity::default()
        }),
        ..Affinity::default()
    });
    let container = Container {
        name: CONTAINER.into(),
        image: Some(
            job.image
                .clone()
                .unwrap_or_else(|| default_image.to_string()),
        ),
        command: (!job.argv.is_empty()).then(|| job.argv.clone()),
        env: Some(env),
        working_dir: job.workdir.clone(),
        resources,
        ..Container::default()
    };
    let pod_labels = labels.clone();
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(job.key.clone()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                NAME_ANNOTATION.to_string(),
                job.name.clone(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            completion_mode: Some("Indexed".into()),
            completions: Some(job.replicas as i32),
            parallelism: Some(job.replicas as i32),
            backoff_limit: Some(0),
            active_deadline_seconds: job.max_runtime_ms.map(|ms| ms.div_ceil(1000).max(1) as i64),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    containers: vec![container],
                    node_selector: (!job.node_selector.is_empty())
                        .then(|| job.node_selector.clone()),
                    affinity,
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        ..Job::default()
    })
}

/// Whether the cluster's Job `existing` is the one `manifest` creates:
/// the same Tessera labels and name, and the same command, image and
/// environment (the API server fills in defaults elsewhere).
fn same_job(manifest: &Job, existing: &Job) -> bool {
    let main = |j: &Job| {
        j.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers.iter().find(|c| c.name == CONTAINER))
            .map(|c| (c.command.clone(), c.image.clone(), c.env.clone()))
    };
    let tessera = |j: &Job| {
        let labels: BTreeMap<String, String> = j
            .metadata
            .labels
            .iter()
            .flatten()
            .filter(|(k, _)| k.starts_with("tessera.dev/"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let name = j
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(NAME_ANNOTATION))
            .cloned();
        (labels, name)
    };
    tessera(manifest) == tessera(existing) && main(manifest) == main(existing)
}

fn env_var(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// The Job's final condition (`Complete` or `Failed`, status True), with
/// its reason and message.
fn job_condition(job: &Job) -> Option<(&str, String, String)> {
    let conds = job.status.as_ref()?.conditions.as_ref()?;
    conds
        .iter()
        .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        .map(|c| {
            (
                c.type_.as_str(),
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        })
}

fn completion_index(pod: &Pod) -> Option<u32> {
    let from = |m: &BTreeMap<String, String>| {
        m.get("batch.kubernetes.io/job-completion-index")
            .and_then(|v| v.parse().ok())
    };
    pod.metadata
        .labels
        .as_ref()
        .and_then(from)
        .or_else(|| pod.metadata.annotations.as_ref().and_then(from))
}

fn pod_terminated(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// A failed pod's account of why: the failure, the first non-zero exit
/// code, and words for a person.
fn pod_failure(pod: &Pod) -> Option<(Failure, Option<i32>, String)> {
    let status = pod.status.as_ref()?;
    let name = pod.metadata.name.as_deref().unwrap_or("?");
    // Evicted, or removed from a failed node.
    if let Some(conds) = &status.conditions {
        if let Some(c) = conds
            .iter()
            .find(|c| c.type_ == "DisruptionTarget" && c.status == "True")
        {
            return Some((
                Failure::NodeFailure,
                None,
                format!(
                    "pod {name}: {}: {}",
                    c.reason.as_deref().unwrap_or("disrupted"),
                    c.message.as_deref().unwrap_or_default()
                ),
            ));
        }
    }
    if status.reason.as_deref() == Some("Evicted") {
        return Some((
            Failure::NodeFailure,
            None,
            format!(
                "pod {name}: Evicted: {}",
                status.message.as_deref().unwrap_or_default()
            ),
        ));
    }
    for cs in status.container_statuses.iter().flatten() {
        let Some(t) = cs.state.as_ref().and_then(|s| s.terminated.as_ref()) else {
            continue;
        };
        if t.exit_code == 0 {
            continue;
        }
        let reason = t.reason.clone().unwrap_or_else(|| "Error".into());
        let failure = match reason.as_str() {
            "OOMKilled" => Failure::OutOfMemory,
            "DeadlineExceeded" => Failure::TimedOut,
            "ContainerCannotRun" | "StartError" => Failure::Rejected,
            _ => Failure::Exited,
        };
        let mut message = format!(
            "pod {name}: container {}: {reason}, exit code {}",
            cs.name, t.exit_code
        );
        if let Some(m) = t.message.as_deref().filter(|m| !m.is_empty()) {
            message.push_str(": ");
            message.push_str(m);
        }
        return Some((failure, Some(t.exit_code), message));
    }
    if status.phase.as_deref() == Some("Failed") {
        return Some((
            Failure::NodeFailure,
            None,
            format!(
                "pod {name} failed: {} {}",
                status.reason.as_deref().unwrap_or_default(),
                status.message.as_deref().unwrap_or_default()
            ),
        ));
    }
    None
}

/// Why a pending pod waits, or a reason it will never start.
fn pod_waiting(pod: &Pod) -> Option<(bool, String)> {
    let status = pod.status.as_ref()?;
    let name = pod.metadata.name.as_deref().unwrap_or("?");
    for cs in status.container_statuses.iter().flatten() {
        if let Some(w) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = w.reason.clone().unwrap_or_default();
            let fatal = matches!(
                reason.as_str(),
                "InvalidImageName" | "CreateContainerConfigError" | "CreateContainerError"
            );
            return Some((
                fatal,
                format!(
                    "pod {name}: {reason}: {}",
                    w.message.as_deref().unwrap_or_default()
                ),
            ));
        }
    }
    for c in status.conditions.iter().flatten() {
        if c.type_ == "PodScheduled" && c.status == "False" {
            return Some((
                false,
                format!(
                    "pod {name}: {}: {}",
                    c.reason.as_deref().unwrap_or("not scheduled"),
                    c.message.as_deref().unwrap_or_default()
                ),
            ));
        }
    }
    None
}

/// One Job and its pods in Tessera's terms.
pub fn job_state(job: &Job, pods: &[Pod]) -> RemoteState {
    let replicas = job
        .spec
        .as_ref()
        .and_then(|s| s.completions)
        .unwrap_or(1)
        .max(1) as usize;
    match job_condition(job) {
        Some(("Complete", _, _)) => return RemoteState::Succeeded,
        Some((_, reason, message)) => {
            // The pods know more than the Job (which container, which code).
            let from_pod = pods.iter().find_map(pod_failure);
            let (failure, exit_code, pod_words) = match (reason.as_str(), from_pod) {
                ("DeadlineExceeded", p) => (
                    Failure::TimedOut,
                    p.as_ref().and_then(|p| p.1),
                    p.map(|p| p.2).unwrap_or_default(),
                ),
                (_, Some(p)) => p,
                (_, None) => (Failure::Exited, None, String::new()),
            };
            let mut words = format!("Job {reason}: {message}");
            if !pod_words.is_empty() {
                words.push_str("; ");
                words.push_str(&pod_words);
            }
            return RemoteState::Failed {
                failure,
                exit_code,
                message: words,
            };
        }
        None => {}
    }
    // Not ended yet. A failed pod fails the Job within moments
    // (`backoffLimit: 0`), so its condition is awaited; but a pod that can
    // never start (a malformed image name) would wait until the deadline.
    if let Some(message) = pods
        .iter()
        .filter_map(pod_waiting)
        .find_map(|(fatal, m)| fatal.then_some(m))
    {
        return RemoteState::Failed {
            failure: Failure::Rejected,
            exit_code: None,
            message,
        };
    }
    if job.spec.as_ref().and_then(|s| s.suspend) == Some(true) {
        return RemoteState::Queued {
            reason: Some("the Job is suspended in the cluster".into()),
        };
    }
    let running = pods
        .iter()
        .filter(|p| {
            matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Running" | "Succeeded")
            )
        })
        .count();
    if running >= replicas {
        return RemoteState::Running;
    }
    let reason = pods
        .iter()
        .filter_map(pod_waiting)
        .map(|(_, m)| m)
        .next()
        .or_else(|| {
            Some(format!(
                "{running} of {replicas} replicas running; waiting for the cluster to start the rest"
            ))
        });
    RemoteState::Queued { reason }
}

/// Sums what nodes can give and what bound pods ask for.
pub fn capacity_of(nodes: &[Node], pods: &[Pod]) -> Capacity {
    use quantity::{bytes, cpu_milli};
    let mut cap = Capacity {
        labels: BTreeMap::from([("engine".to_string(), "kubernetes".to_string())]),
        ..Capacity::default()
    };
    let mut by_model: BTreeMap<String, u32> = BTreeMap::new();
    let mut usable: HashMap<String, ()> = HashMap::new();
    let mut regions: Vec<Option<String>> = Vec::new();
    for node in nodes {
        let name = node.metadata.name.clone().unwrap_or_default();
        let unschedulable = node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if unschedulable || !ready {
            continue;
        }
        let Some(alloc) = node.status.as_ref().and_then(|s| s.allocatable.as_ref()) else {
            continue;
        };
        let cpu = alloc.get("cpu").and_then(cpu_milli).unwrap_or(0);
        let mem = alloc.get("memory").and_then(bytes).unwrap_or(0);
        let gpus = alloc
            .get(GPU_RESOURCE)
            .and_then(quantity::integer)
            .unwrap_or(0) as u32;
        cap.nodes += 1;
        cap.cpu_milli += cpu;
        cap.memory_bytes += mem;
        let (lc, lm, lg) = cap.largest_node;
        cap.largest_node = (lc.max(cpu), lm.max(mem), lg.max(gpus));
        let labels = node.metadata.labels.clone().unwrap_or_default();
        if gpus > 0 {
            let model = labels
                .get(GPU_PRODUCT_LABEL)
                .cloned()
                .unwrap_or_else(|| "unknown".into());
            *by_model.entry(model).or_default() += gpus;
        }
        regions.push(labels.get("topology.kubernetes.io/region").cloned());
        usable.insert(name, ());
    }
    for pod in pods {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_ref()) else {
            continue;
        };
        if !usable.contains_key(node) || pod_terminated(pod) {
            continue;
        }
        let (c, m, g) = pod_requests(pod);
        cap.used_cpu_milli += c;
        cap.used_memory_bytes += m;
        cap.used_gpus += g;
    }
    cap.gpus = by_model
        .into_iter()
        .map(|(model, count)| GpuCount { model, count })
        .collect();
    if let Some(Some(region)) = regions.first() {
        if regions.iter().all(|r| r.as_ref() == Some(region)) {
            cap.labels.insert("region".into(), region.clone());
        }
    }
    cap
}

/// What a pod asks of its node: the sum over its containers, or its
/// largest init container if that is more (the scheduler's rule).
fn pod_requests(pod: &Pod) -> (u64, u64, u32) {
    use quantity::{bytes, cpu_milli};
    let Some(spec) = pod.spec.as_ref() else {
        return (0, 0, 0);
    };
    let of = |c: &Container| {
        let req = c.resources.as_ref().and_then(|r| r.requests.as_ref());
        let lim = c.resources.as_ref().and_then(|r| r.limits.as_ref());
        let get = |k: &str| {
            req.and_then(|r| r.get(k))
                .or_else(|| lim.and_then(|l| l.get(k)))
        };
        (
            get("cpu").and_then(cpu_milli).unwrap_or(0),
            get("memory").and_then(bytes).unwrap_or(0),
            get(GPU_RESOURCE).and_then(quantity::integer).unwrap_or(0) as u32,
        )
    };
    let mut sum = (0u64, 0u64, 0u32);
    for c in &spec.containers {
        let (a, b, g) = of(c);
        sum = (sum.0 + a, sum.1 + b, sum.2 + g);
    }
    for c in spec.init_containers.iter().flatten() {
        let (a, b, g) = of(c);
        sum = (sum.0.max(a), sum.1.max(b), sum.2.max(g));
    }
    sum
}
