//! A wire-level fake of the Kubernetes API server, for the endpoints the
//! driver uses, over real HTTP on loopback (no Kubernetes API server can
//! run where these tests run).
//!
//! It checks what it is sent the way the API server would: a created Job
//! must deserialize into `k8s-openapi`'s `batch/v1` Job (right `apiVersion`
//! and `kind`), must carry no field the schema lacks (the parsed Job,
//! written back, must equal the body), and must pass the validation the
//! real server applies to the fields the driver sets (names, labels,
//! restart policy, containers, quantities, requests vs limits). It answers
//! with the real JSON shapes: objects, lists without per-item `kind`,
//! `Status` errors (`AlreadyExists` 409, `NotFound` 404, `Invalid` 422),
//! plain-text pod logs.
//!
//! In place of the Job controller and the kubelet, a test moves pods and
//! Jobs through their states with the helpers below, as a cluster would.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, Node, NodeCondition, NodeSpec, NodeStatus, Pod, PodCondition, PodSpec,
    PodStatus,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{DeleteOptions, ObjectMeta, Time};
use serde_json::{json, Value};

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub authorization: Option<String>,
    pub body: Value,
}

#[derive(Default)]
pub struct World {
    /// (namespace, name) → Job.
    pub jobs: BTreeMap<(String, String), Job>,
    pub pods: Vec<Pod>,
    pub nodes: Vec<Node>,
    /// Pod name → its container's output.
    pub logs: HashMap<String, String>,
    pub seen: Vec<Seen>,
    /// Refuse the next Job creations with this (code, reason, message).
    pub refuse_create: Option<(u16, String, String)>,
    clock: i64,
}

#[derive(Clone)]
pub struct Fake {
    pub world: Arc<Mutex<World>>,
    pub url: String,
}

impl Fake {
    pub async fn start() -> Fake {
        let world = Arc::new(Mutex::new(World::default()));
        let app = Router::new()
            .route(
                "/apis/batch/v1/namespaces/{ns}/jobs",
                get(list_jobs).post(create_job),
            )
            .route(
                "/apis/batch/v1/namespaces/{ns}/jobs/{name}",
                get(get_job).delete(delete_job),
            )
            .route("/api/v1/namespaces/{ns}/pods", get(list_pods_ns))
            .route("/api/v1/namespaces/{ns}/pods/{name}/log", get(pod_log))
            .route("/api/v1/pods", get(list_pods_all))
            .route("/api/v1/nodes", get(list_nodes))
            .fallback(unknown)
            .layer(axum::middleware::from_fn_with_state(world.clone(), record))
            .with_state(world.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Fake { world, url }
    }

    /// A client for this fake, as the driver makes one from a kubeconfig
    /// without credentials.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url.parse::<http::Uri>().unwrap());
        tessera_pool_k8s::client_for(config).unwrap()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.world.lock().unwrap().seen.clone()
    }

    pub fn clear_seen(&self) {
        self.world.lock().unwrap().seen.clear();
    }

    pub fn job(&self, ns: &str, name: &str) -> Option<Job> {
        self.world
            .lock()
            .unwrap()
            .jobs
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    pub fn pods_of(&self, job: &str) -> Vec<Pod> {
        self.world
            .lock()
            .unwrap()
            .pods
            .iter()
            .filter(|p| label(p, "job-name") == Some(job))
            .cloned()
            .collect()
    }

    /// As the kubelet: the replica's pod runs, with this output so far.
    pub fn run_pod(&self, job: &str, index: u32, output: &str) {
        self.with_pod(job, index, |pod, logs| {
            let st = pod.status.get_or_insert_with(PodStatus::default);
            st.phase = Some("Running".into());
            st.conditions = Some(vec![cond("PodScheduled", "True", None, None)]);
            st.container_statuses = Some(vec![container_status(ContainerState {
                running: Some(ContainerStateRunning::default()),
                ..ContainerState::default()
            })]);
            pod.spec.as_mut().unwrap().node_name = Some("node-a".into());
            *logs = output.to_string();
        });
    }

    /// As the kubelet: the replica's container ended with `code`
    /// (`reason` as the kubelet gives it: `Completed`, `Error`, `OOMKilled`).
    pub fn end_pod(&self, job: &str, index: u32, code: i32, reason: &str, output: &str) {
        self.with_pod(job, index, |pod, logs| {
            let st = pod.status.get_or_insert_with(PodStatus::default);
            st.phase = Some(if code == 0 { "Succeeded" } else { "Failed" }.into());
            st.container_statuses = Some(vec![container_status(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: code,
                    reason: Some(reason.into()),
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            })]);
            pod.spec.as_mut().unwrap().node_name = Some("node-a".into());
            *logs = output.to_string();
        });
    }

    /// As the scheduler: the replica's pod cannot be placed.
    pub fn unschedulable(&self, job: &str, index: u32, message: &str) {
        self.with_pod(job, index, |pod, _| {
            let st = pod.status.get_or_insert_with(PodStatus::default);
            st.phase = Some("Pending".into());
            st.conditions = Some(vec![cond(
                "PodScheduled",
                "False",
                Some("Unschedulable"),
                Some(message),
            )]);
        });
    }

    /// As the kubelet: the replica's container waits (`ErrImagePull`, ...).
    pub fn waiting(&self, job: &str, index: u32, reason: &str, message: &str) {
        self.with_pod(job, index, |pod, _| {
            let st = pod.status.get_or_insert_with(PodStatus::default);
            st.phase = Some("Pending".into());
            st.container_statuses = Some(vec![container_status(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.into()),
                    message: Some(message.into()),
                }),
                ..ContainerState::default()
            })]);
        });
    }

    /// As the Job controller: the Job ends with a condition
    /// (`Complete`, or `Failed` with `BackoffLimitExceeded` / `DeadlineExceeded`).
    pub fn finish_job(&self, ns: &str, name: &str, type_: &str, reason: &str, message: &str) {
        let mut w = self.world.lock().unwrap();
        let job = w
            .jobs
            .get_mut(&(ns.to_string(), name.to_string()))
            .expect("no such job");
        let st = job.status.get_or_insert_with(JobStatus::default);
        st.conditions = Some(vec![JobCondition {
            type_: type_.into(),
            status: "True".into(),
            reason: Some(reason.into()),
            message: Some(message.into()),
            ..JobCondition::default()
        }]);
        st.active = Some(0);
    }

    pub fn add_node(&self, node: Node) {
        self.world.lock().unwrap().nodes.push(node);
    }

    pub fn add_pod(&self, pod: Pod) {
        self.world.lock().unwrap().pods.push(pod);
    }

    fn with_pod(&self, job: &str, index: u32, f: impl FnOnce(&mut Pod, &mut String)) {
        let mut w = self.world.lock().unwrap();
        let World { pods, logs, .. } = &mut *w;
        let pod = pods
            .iter_mut()
            .find(|p| {
                label(p, "job-name") == Some(job)
                    && label(p, "batch.kubernetes.io/job-completion-index")
                        == Some(index.to_string().as_str())
            })
            .expect("no such pod");
        let name = pod.metadata.name.clone().unwrap();
        let log = logs.entry(name).or_default();
        f(pod, log);
    }
}

/// A node as the kubelet registers it.
pub fn node(name: &str, cpu: &str, memory: &str, gpus: u32, labels: &[(&str, &str)]) -> Node {
    let mut alloc = BTreeMap::from([
        ("cpu".to_string(), Quantity(cpu.into())),
        ("memory".to_string(), Quantity(memory.into())),
        ("pods".to_string(), Quantity("110".into())),
    ]);
    if gpus > 0 {
        alloc.insert("nvidia.com/gpu".into(), Quantity(gpus.to_string()));
    }
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .chain([("kubernetes.io/hostname".to_string(), name.to_string())])
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec::default()),
        status: Some(NodeStatus {
            capacity: Some(alloc.clone()),
            allocatable: Some(alloc),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..NodeCondition::default()
            }]),
            ..NodeStatus::default()
        }),
    }
}

fn cond(type_: &str, status: &str, reason: Option<&str>, message: Option<&str>) -> PodCondition {
    PodCondition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.map(Into::into),
        message: message.map(Into::into),
        ..PodCondition::default()
    }
}

fn container_status(state: ContainerState) -> ContainerStatus {
    ContainerStatus {
        name: "main".into(),
        image: "img".into(),
        image_id: String::new(),
        ready: state.running.is_some(),
        restart_count: 0,
        state: Some(state),
        ..ContainerStatus::default()
    }
}

fn label<'a>(p: &'a Pod, k: &str) -> Option<&'a str> {
    p.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(k))
        .map(String::as_str)
}

type W = Arc<Mutex<World>>;

async fn record(
    State(world): State<W>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let seen = Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        authorization: parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    };
    world.lock().unwrap().seen.push(seen);
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

fn status_error(code: u16, reason: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        Json(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code,
        })),
    )
        .into_response()
}

async fn unknown(method: Method, uri: Uri) -> Response {
    status_error(
        404,
        "NotFound",
        &format!("the fake API server does not serve {method} {uri}"),
    )
}

fn query_param(q: &Option<String>, key: &str) -> Option<String> {
    let q = q.as_deref()?;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else if b[i] == b'+' {
            out.push(b' ');
            i += 1;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// `a=b,c!=d,e`: the label selector syntax the driver uses.
fn matches_labels(labels: Option<&BTreeMap<String, String>>, selector: &str) -> bool {
    let empty = BTreeMap::new();
    let labels = labels.unwrap_or(&empty);
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels.get(k).map(String::as_str) != Some(v)
        } else if let Some((k, v)) = term.split_once('=') {
            labels.get(k).map(String::as_str) == Some(v.trim_start_matches('='))
        } else {
            labels.contains_key(term)
        }
    })
}

/// `status.phase!=Succeeded,spec.nodeName=x`: the field selectors pods support.
fn matches_fields(pod: &Pod, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (k, v, eq) = match term.split_once("!=") {
            Some((k, v)) => (k, v, false),
            None => {
                let (k, v) = term.split_once('=').expect("a field selector term");
                (k, v.trim_start_matches('='), true)
            }
        };
        let actual = match k {
            "status.phase" => pod
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default(),
            "spec.nodeName" => pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
            other => panic!("the API server rejects field selector {other}"),
        };
        (actual == v) == eq
    })
}

fn list(kind: &str, api_version: &str, items: Vec<Value>) -> Response {
    // Items of a list carry no kind/apiVersion on the wire.
    let items: Vec<Value> = items
        .into_iter()
        .map(|mut v| {
            let o = v.as_object_mut().unwrap();
            o.remove("kind");
            o.remove("apiVersion");
            v
        })
        .collect();
    Json(json!({
        "kind": kind, "apiVersion": api_version,
        "metadata": {"resourceVersion": "1"}, "items": items,
    }))
    .into_response()
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn label_value_ok(v: &str) -> bool {
    v.len() <= 63
        && (v.is_empty()
            || (v.starts_with(|c: char| c.is_ascii_alphanumeric())
                && v.ends_with(|c: char| c.is_ascii_alphanumeric())
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))))
}

fn label_key_ok(k: &str) -> bool {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    prefix.is_none_or(|p| p.split('.').all(dns_label) && p.len() <= 253)
        && !name.is_empty()
        && label_value_ok(name)
}

/// What the API server's validation says about a Job, for the fields the
/// driver sets; each problem as the server words its causes.
fn validate_job(job: &Job) -> Vec<String> {
    let mut errs = Vec::new();
    let meta = &job.metadata;
    match meta.name.as_deref() {
        Some(n) if dns_label(n) => {}
        other => errs.push(format!("metadata.name: Invalid value: {other:?}")),
    }
    let check_labels =
        |what: &str, labels: &Option<BTreeMap<String, String>>, errs: &mut Vec<String>| {
            for (k, v) in labels.iter().flatten() {
                if !label_key_ok(k) {
                    errs.push(format!("{what}.labels: Invalid value: {k:?}"));
                }
                if !label_value_ok(v) {
                    errs.push(format!("{what}.labels: Invalid value: {v:?}"));
                }
            }
        };
    check_labels("metadata", &meta.labels, &mut errs);
    let Some(spec) = &job.spec else {
        errs.push("spec: Required value".into());
        return errs;
    };
    if spec.completion_mode.as_deref() == Some("Indexed") && spec.completions.is_none() {
        errs.push("spec.completions: Required value: when completion mode is Indexed".into());
    }
    if let (Some(p), Some(c)) = (spec.parallelism, spec.completions) {
        if p < 0 || c < 0 {
            errs.push("spec.parallelism: must be non-negative".into());
        }
    }
    if spec.active_deadline_seconds.is_some_and(|s| s <= 0) {
        errs.push("spec.activeDeadlineSeconds: must be positive".into());
    }
    check_labels(
        "spec.template.metadata",
        &spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone()),
        &mut errs,
    );
    let Some(pod) = &spec.template.spec else {
        errs.push("spec.template.spec: Required value".into());
        return errs;
    };
    match pod.restart_policy.as_deref() {
        Some("Never" | "OnFailure") => {}
        other => errs.push(format!(
            "spec.template.spec.restartPolicy: Unsupported value: {other:?}: supported values: \"OnFailure\", \"Never\""
        )),
    }
    if pod.containers.is_empty() {
        errs.push("spec.template.spec.containers: Required value".into());
    }
    for (i, c) in pod.containers.iter().enumerate() {
        let at = format!("spec.template.spec.containers[{i}]");
        if !dns_label(&c.name) {
            errs.push(format!("{at}.name: Invalid value: {:?}", c.name));
        }
        if c.image.as_deref().is_none_or(str::is_empty) {
            errs.push(format!("{at}.image: Required value"));
        }
        for e in c.env.iter().flatten() {
            if e.value.is_some() && e.value_from.is_some() {
                errs.push(format!(
                    "{at}.env[{}]: may not have both value and valueFrom",
                    e.name
                ));
            }
        }
        let res = c.resources.clone().unwrap_or_default();
        let req = res.requests.unwrap_or_default();
        let lim = res.limits.unwrap_or_default();
        for (k, q) in req.iter().chain(lim.iter()) {
            if tessera_pool_k8s::quantity::value(&q.0).is_none() {
                errs.push(format!("{at}.resources: Invalid value: {k}={:?}: quantities must match the regular expression", q.0));
            }
        }
        for (k, q) in &req {
            let r = tessera_pool_k8s::quantity::value(&q.0).unwrap_or(0.0);
            match lim.get(k).and_then(|l| tessera_pool_k8s::quantity::value(&l.0)) {
                Some(l) if r > l => errs.push(format!("{at}.resources.requests: Invalid value: {k} must be less than or equal to the limit")),
                None if k.contains('/') => errs.push(format!("{at}.resources.limits: Required value: limit must be set for {k}")),
                _ => {}
            }
            if k.contains('/') && lim.get(k) != Some(q) {
                errs.push(format!(
                    "{at}.resources.requests[{k}]: Invalid value: must be equal to {k} limit"
                ));
            }
        }
    }
    errs
}

async fn create_job(State(world): State<W>, Path(ns): Path<String>, body: Bytes) -> Response {
    let raw: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return status_error(400, "BadRequest", &format!("not JSON: {e}")),
    };
    let job: Job = match serde_json::from_value(raw.clone()) {
        Ok(j) => j,
        Err(e) => return status_error(400, "BadRequest", &format!("not a batch/v1 Job: {e}")),
    };
    // Strict field validation: nothing outside the schema.
    let back = serde_json::to_value(&job).unwrap();
    if back != raw {
        return status_error(
            400,
            "BadRequest",
            &format!("unknown or malformed fields: sent {raw}, schema keeps {back}"),
        );
    }
    let errs = validate_job(&job);
    if !errs.is_empty() {
        return status_error(
            422,
            "Invalid",
            &format!("Job.batch is invalid: {}", errs.join(", ")),
        );
    }
    let mut w = world.lock().unwrap();
    if let Some((code, reason, message)) = w.refuse_create.clone() {
        return status_error(code, &reason, &message);
    }
    let name = job.metadata.name.clone().unwrap();
    if w.jobs.contains_key(&(ns.clone(), name.clone())) {
        return status_error(
            409,
            "AlreadyExists",
            &format!("jobs.batch \"{name}\" already exists"),
        );
    }
    w.clock += 1;
    let now = Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + w.clock).unwrap());
    let mut stored = job.clone();
    // Defaults the API server fills in, as a client reading the Job back sees them.
    if let Some(pod) = stored.spec.as_mut().and_then(|s| s.template.spec.as_mut()) {
        for c in &mut pod.containers {
            c.termination_message_path
                .get_or_insert("/dev/termination-log".into());
            c.image_pull_policy.get_or_insert("IfNotPresent".into());
            for e in c.env.iter_mut().flatten() {
                if let Some(f) = e.value_from.as_mut().and_then(|v| v.field_ref.as_mut()) {
                    f.api_version.get_or_insert("v1".into());
                }
            }
        }
        pod.dns_policy.get_or_insert("ClusterFirst".into());
        pod.scheduler_name.get_or_insert("default-scheduler".into());
    }
    stored.metadata.namespace = Some(ns.clone());
    stored.metadata.uid = Some(format!("uid-{}", w.clock));
    stored.metadata.resource_version = Some(w.clock.to_string());
    stored.metadata.creation_timestamp = Some(now.clone());
    stored.status = Some(JobStatus {
        active: stored.spec.as_ref().and_then(|s| s.parallelism),
        ..JobStatus::default()
    });
    // As the Job controller: one pod per completion index.
    let spec = stored.spec.clone().unwrap();
    let template = spec.template.clone();
    for i in 0..spec.completions.unwrap_or(1) {
        let mut labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        labels.insert("job-name".into(), name.clone());
        labels.insert("batch.kubernetes.io/job-name".into(), name.clone());
        labels.insert(
            "batch.kubernetes.io/job-completion-index".into(),
            i.to_string(),
        );
        let pod_spec: PodSpec = template.spec.clone().unwrap();
        let pod_name = format!("{name}-{i}-x{}", w.clock);
        w.pods.push(Pod {
            metadata: ObjectMeta {
                name: Some(pod_name),
                namespace: Some(ns.clone()),
                labels: Some(labels),
                annotations: Some(BTreeMap::from([(
                    "batch.kubernetes.io/job-completion-index".into(),
                    i.to_string(),
                )])),
                creation_timestamp: Some(now.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(pod_spec),
            status: Some(PodStatus {
                phase: Some("Pending".into()),
                ..PodStatus::default()
            }),
        });
    }
    w.jobs.insert((ns, name), stored.clone());
    (StatusCode::CREATED, Json(stored)).into_response()
}

async fn list_jobs(
    State(world): State<W>,
    Path(ns): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let selector = query_param(&q, "labelSelector").unwrap_or_default();
    let w = world.lock().unwrap();
    let items = w
        .jobs
        .iter()
        .filter(|((n, _), j)| *n == ns && matches_labels(j.metadata.labels.as_ref(), &selector))
        .map(|(_, j)| serde_json::to_value(j).unwrap())
        .collect();
    list("JobList", "batch/v1", items)
}

async fn get_job(State(world): State<W>, Path((ns, name)): Path<(String, String)>) -> Response {
    let w = world.lock().unwrap();
    match w.jobs.get(&(ns, name.clone())) {
        Some(j) => Json(j.clone()).into_response(),
        None => status_error(404, "NotFound", &format!("jobs.batch \"{name}\" not found")),
    }
}

async fn delete_job(
    State(world): State<W>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let opts: DeleteOptions = if body.is_empty() {
        DeleteOptions::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(o) => o,
            Err(e) => return status_error(400, "BadRequest", &format!("not DeleteOptions: {e}")),
        }
    };
    if let Some(p) = opts.propagation_policy.as_deref() {
        if !matches!(p, "Orphan" | "Background" | "Foreground") {
            return status_error(
                422,
                "Invalid",
                &format!("propagationPolicy: Unsupported value: {p:?}"),
            );
        }
    }
    let mut w = world.lock().unwrap();
    let Some(job) = w.jobs.remove(&(ns.clone(), name.clone())) else {
        return status_error(404, "NotFound", &format!("jobs.batch \"{name}\" not found"));
    };
    // Without propagation a Job's pods are orphaned (the API's default for
    // Jobs); with it the garbage collector removes them.
    if opts.propagation_policy.as_deref() != Some("Orphan") && opts.propagation_policy.is_some() {
        w.pods
            .retain(|p| label(p, "job-name") != Some(name.as_str()));
    }
    Json(json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
        "details": {"name": name, "group": "batch", "kind": "jobs",
                    "uid": job.metadata.uid},
    }))
    .into_response()
}

async fn list_pods_ns(
    State(world): State<W>,
    Path(ns): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let selector = query_param(&q, "labelSelector").unwrap_or_default();
    let fields = query_param(&q, "fieldSelector").unwrap_or_default();
    let w = world.lock().unwrap();
    let items = w
        .pods
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(ns.as_str()))
        .filter(|p| {
            matches_labels(p.metadata.labels.as_ref(), &selector) && matches_fields(p, &fields)
        })
        .map(|p| serde_json::to_value(p).unwrap())
        .collect();
    list("PodList", "v1", items)
}

async fn list_pods_all(State(world): State<W>, RawQuery(q): RawQuery) -> Response {
    let selector = query_param(&q, "labelSelector").unwrap_or_default();
    let fields = query_param(&q, "fieldSelector").unwrap_or_default();
    let w = world.lock().unwrap();
    let items = w
        .pods
        .iter()
        .filter(|p| {
            matches_labels(p.metadata.labels.as_ref(), &selector) && matches_fields(p, &fields)
        })
        .map(|p| serde_json::to_value(p).unwrap())
        .collect();
    list("PodList", "v1", items)
}

async fn list_nodes(State(world): State<W>) -> Response {
    let w = world.lock().unwrap();
    let items = w
        .nodes
        .iter()
        .map(|n| serde_json::to_value(n).unwrap())
        .collect();
    list("NodeList", "v1", items)
}

async fn pod_log(
    State(world): State<W>,
    Path((ns, name)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    _headers: HeaderMap,
) -> Response {
    let w = world.lock().unwrap();
    let Some(pod) = w.pods.iter().find(|p| {
        p.metadata.name.as_deref() == Some(name.as_str())
            && p.metadata.namespace.as_deref() == Some(ns.as_str())
    }) else {
        return status_error(404, "NotFound", &format!("pods \"{name}\" not found"));
    };
    let container = query_param(&q, "container");
    let names: Vec<&str> = pod
        .spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    match container.as_deref() {
        Some(c) if names.contains(&c) => {}
        Some(c) => {
            return status_error(
                400,
                "BadRequest",
                &format!("container {c} is not valid for pod {name}"),
            )
        }
        None if names.len() > 1 => {
            return status_error(400, "BadRequest", "a container name must be specified")
        }
        None => {}
    }
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
        return status_error(
            400,
            "BadRequest",
            &format!("container \"main\" in pod \"{name}\" is waiting to start: ContainerCreating"),
        );
    }
    let text = w.logs.get(&name).cloned().unwrap_or_default();
    (StatusCode::OK, [("content-type", "text/plain")], text).into_response()
}
