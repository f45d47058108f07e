//! The Kubernetes driver against a wire-level fake of the API server
//! (`fake_apiserver`): real HTTP, real JSON shapes, every created Job
//! checked against the `batch/v1` schema. No Kubernetes API server can run
//! where these tests run, so the driver has not met a real cluster.

mod fake_apiserver;

use std::collections::BTreeMap;

use fake_apiserver::{node, Fake};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, PodStatus, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tessera_pool_k8s::{KubeDriver, KubePool};
use tessera_pools::{Failure, PoolDriver, PoolError, PoolJob, RemoteId, RemoteState};

const NS: &str = "ml-jobs";

fn job(job_id: u64, replicas: u32) -> PoolJob {
    PoolJob {
        key: PoolJob::key_for(job_id, 1),
        job_id,
        attempt: 1,
        name: "Train small (v2)".into(),
        team: "ml".into(),
        argv: vec!["python3".into(), "-c".into(), "print('hi')".into()],
        image: None,
        env: vec![("LR".into(), "0.001".into())],
        workdir: None,
        replicas,
        cpu_milli: 500,
        memory_bytes: 256 << 20,
        gpus: 0,
        gpu_models: vec![],
        max_runtime_ms: None,
        node_selector: BTreeMap::new(),
    }
}

async fn setup() -> (Fake, KubeDriver) {
    let fake = Fake::start().await;
    let driver = KubeDriver::new(fake.client(), NS);
    (fake, driver)
}

fn posted_jobs(fake: &Fake) -> Vec<Job> {
    fake.seen()
        .into_iter()
        .filter(|s| s.method == "POST")
        .map(|s| serde_json::from_value(s.body).unwrap())
        .collect()
}

#[tokio::test]
async fn a_gang_becomes_one_indexed_job_with_its_resources_and_placement() {
    let (fake, driver) = setup().await;
    let mut j = job(41, 3);
    j.image = Some("pytorch/pytorch:2.4".into());
    j.gpus = 2;
    j.gpu_models = vec!["NVIDIA-H100-80GB-HBM3".into()];
    j.cpu_milli = 1500;
    j.memory_bytes = 16 << 30;
    j.max_runtime_ms = Some(90_500);
    j.workdir = Some("/workspace".into());
    j.node_selector = BTreeMap::from([("zone".into(), "lab".into())]);
    let id = driver.submit(&j).await.unwrap();
    assert_eq!(id, RemoteId("tessera-41-1".into()));

    let seen = fake.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, format!("/apis/batch/v1/namespaces/{NS}/jobs?"));
    let sent: Job = serde_json::from_value(seen[0].body.clone()).unwrap();
    assert_eq!(sent.metadata.name.as_deref(), Some("tessera-41-1"));
    let labels = sent.metadata.labels.clone().unwrap();
    assert_eq!(labels["tessera.dev/key"], "tessera-41-1");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "tessera");
    assert_eq!(labels["tessera.dev/team"], "ml");
    assert_eq!(
        sent.metadata.annotations.unwrap()["tessera.dev/name"],
        "Train small (v2)"
    );
    let spec = sent.spec.unwrap();
    assert_eq!(spec.completion_mode.as_deref(), Some("Indexed"));
    assert_eq!(spec.completions, Some(3));
    assert_eq!(spec.parallelism, Some(3));
    assert_eq!(
        spec.backoff_limit,
        Some(0),
        "a failed replica fails the gang"
    );
    assert_eq!(spec.active_deadline_seconds, Some(91));
    let tlabels = spec.template.metadata.unwrap().labels.unwrap();
    assert_eq!(
        tlabels["tessera.dev/key"], "tessera-41-1",
        "pods are found by key"
    );
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    assert_eq!(pod.node_selector.unwrap()["zone"], "lab");
    let terms = pod
        .affinity
        .unwrap()
        .node_affinity
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .unwrap()
        .node_selector_terms;
    let req = &terms[0].match_expressions.as_ref().unwrap()[0];
    assert_eq!(req.key, "nvidia.com/gpu.product");
    assert_eq!(req.operator, "In");
    assert_eq!(req.values.as_deref().unwrap(), ["NVIDIA-H100-80GB-HBM3"]);
    let c = &pod.containers[0];
    assert_eq!(c.name, "main");
    assert_eq!(c.image.as_deref(), Some("pytorch/pytorch:2.4"));
    assert_eq!(c.command.as_deref().unwrap(), j.argv.as_slice());
    assert_eq!(c.working_dir.as_deref(), Some("/workspace"));
    let res = c.resources.clone().unwrap();
    let want = BTreeMap::from([
        ("cpu".to_string(), Quantity("1500m".into())),
        ("memory".to_string(), Quantity((16u64 << 30).to_string())),
        ("nvidia.com/gpu".to_string(), Quantity("2".into())),
    ]);
    assert_eq!(res.requests.unwrap(), want);
    assert_eq!(res.limits.unwrap(), want);
    let env: BTreeMap<_, _> = c
        .env
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| (e.name.clone(), e))
        .collect();
    assert_eq!(env["LR"].value.as_deref(), Some("0.001"));
    assert_eq!(env["TESSERA_JOB_ID"].value.as_deref(), Some("41"));
    assert_eq!(env["TESSERA_NUM_REPLICAS"].value.as_deref(), Some("3"));
    let idx = env["TESSERA_REPLICA"].value_from.clone().unwrap();
    assert_eq!(
        idx.field_ref.unwrap().field_path,
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    );
    // The fake's Job controller made one pod per replica.
    assert_eq!(fake.pods_of("tessera-41-1").len(), 3);
}

#[tokio::test]
async fn a_job_without_an_image_runs_in_the_pools_default_image() {
    let fake = Fake::start().await;
    let driver = KubeDriver::new(fake.client(), NS).with_default_image("debian:12-slim");
    driver.submit(&job(5, 1)).await.unwrap();
    let sent = &posted_jobs(&fake)[0];
    let c = &sent
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    assert_eq!(c.image.as_deref(), Some("debian:12-slim"));
    // No GPUs asked, so no GPU resource and no GPU affinity.
    assert!(!c
        .resources
        .as_ref()
        .unwrap()
        .limits
        .as_ref()
        .unwrap()
        .contains_key("nvidia.com/gpu"));
}

#[tokio::test]
async fn submitting_the_same_attempt_twice_creates_one_job() {
    let (fake, driver) = setup().await;
    let j = job(7, 2);
    let first = driver.submit(&j).await.unwrap();
    let again = driver.submit(&j).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(posted_jobs(&fake).len(), 2, "the second create met 409");
    assert_eq!(fake.world.lock().unwrap().jobs.len(), 1);
    assert_eq!(fake.pods_of("tessera-7-1").len(), 2);

    // A Job of the same name that is not this attempt (another Tessera
    // installation's, or anyone's) is not taken for it.
    let mut other = j.clone();
    other.argv = vec!["echo".into(), "someone else".into()];
    match driver.submit(&other).await {
        Err(PoolError::Rejected(m)) => assert!(m.starts_with("name:"), "{m}"),
        res => panic!("expected a refusal, got {res:?}"),
    }
    let mut foreign = fake.job(NS, "tessera-7-1").unwrap();
    foreign
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("tessera.dev/key".into(), "someone-else".into());
    fake.world
        .lock()
        .unwrap()
        .jobs
        .insert((NS.into(), "tessera-7-1".into()), foreign);
    match driver.submit(&j).await {
        Err(PoolError::Rejected(m)) => assert!(m.starts_with("name:"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn the_state_of_many_jobs_comes_from_two_list_calls() {
    let (fake, driver) = setup().await;
    let mut ids = Vec::new();
    for n in 1..=7 {
        let mut j = job(n, if n == 1 { 2 } else { 1 });
        if n == 4 {
            j.max_runtime_ms = Some(60_000);
        }
        ids.push(driver.submit(&j).await.unwrap());
    }
    // 1: a gang of two, both running.
    fake.run_pod("tessera-1-1", 0, "");
    fake.run_pod("tessera-1-1", 1, "");
    // 2: done.
    fake.end_pod("tessera-2-1", 0, 0, "Completed", "ok\n");
    fake.finish_job(
        NS,
        "tessera-2-1",
        "Complete",
        "CompletionsReached",
        "Reached expected number of succeeded pods",
    );
    // 3: killed for memory.
    fake.end_pod("tessera-3-1", 0, 137, "OOMKilled", "");
    fake.finish_job(
        NS,
        "tessera-3-1",
        "Failed",
        "BackoffLimitExceeded",
        "Job has reached the specified backoff limit",
    );
    // 4: past its deadline.
    fake.run_pod("tessera-4-1", 0, "");
    fake.finish_job(
        NS,
        "tessera-4-1",
        "Failed",
        "DeadlineExceeded",
        "Job was active longer than specified deadline",
    );
    // 5: no node has the GPUs.
    fake.unschedulable(
        "tessera-5-1",
        0,
        "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
    );
    // 6: an image name Kubernetes cannot even parse.
    fake.waiting(
        "tessera-6-1",
        0,
        "InvalidImageName",
        "couldn't parse image name \"Bad Image\"",
    );
    // 7: an ordinary failure with its exit code.
    fake.end_pod("tessera-7-1", 0, 3, "Error", "");
    fake.finish_job(
        NS,
        "tessera-7-1",
        "Failed",
        "BackoffLimitExceeded",
        "Job has reached the specified backoff limit",
    );

    let unknown = RemoteId("tessera-99-1".into());
    let mut ask = ids.clone();
    ask.push(unknown.clone());
    fake.clear_seen();
    let states = driver.status(&ask).await.unwrap();
    let seen = fake.seen();
    assert_eq!(seen.len(), 2, "one list of Jobs and one of Pods: {seen:?}");
    assert!(seen.iter().all(|s| s.method == "GET"
        && s.uri
            .contains("labelSelector=app.kubernetes.io%2Fmanaged-by%3Dtessera")));

    assert_eq!(states.len(), 8);
    assert_eq!(states[&ids[0]], RemoteState::Running);
    assert_eq!(states[&ids[1]], RemoteState::Succeeded);
    match &states[&ids[2]] {
        RemoteState::Failed {
            failure,
            exit_code,
            message,
        } => {
            assert_eq!(*failure, Failure::OutOfMemory);
            assert_eq!(*exit_code, Some(137));
            assert!(message.contains("OOMKilled"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    match &states[&ids[3]] {
        RemoteState::Failed {
            failure, message, ..
        } => {
            assert_eq!(*failure, Failure::TimedOut);
            assert!(message.contains("DeadlineExceeded"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    match &states[&ids[4]] {
        RemoteState::Queued { reason: Some(r) } => {
            assert!(r.contains("Insufficient nvidia.com/gpu"), "{r}")
        }
        other => panic!("{other:?}"),
    }
    match &states[&ids[5]] {
        RemoteState::Failed {
            failure, message, ..
        } => {
            assert_eq!(*failure, Failure::Rejected);
            assert!(message.contains("InvalidImageName"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(
            &states[&ids[6]],
            RemoteState::Failed {
                failure: Failure::Exited,
                exit_code: Some(3),
                ..
            }
        ),
        "{:?}",
        states[&ids[6]]
    );
    assert_eq!(states[&unknown], RemoteState::NotFound);
}

#[tokio::test]
async fn a_gang_with_a_replica_still_pending_is_queued_not_running() {
    let (fake, driver) = setup().await;
    let id = driver.submit(&job(8, 2)).await.unwrap();
    fake.run_pod("tessera-8-1", 0, "");
    let st = driver.status(std::slice::from_ref(&id)).await.unwrap();
    assert!(
        matches!(&st[&id], RemoteState::Queued { reason: Some(r) } if r.contains("1 of 2")),
        "{st:?}"
    );
}

#[tokio::test]
async fn logs_come_from_the_replicas_pods() {
    let (fake, driver) = setup().await;
    let id = driver.submit(&job(9, 2)).await.unwrap();
    // Not started: nothing yet, and more to come.
    let c = driver.logs(&id, 0).await.unwrap();
    assert!(c.data.is_empty() && !c.complete);
    fake.run_pod("tessera-9-1", 0, "epoch 1\n");
    fake.run_pod("tessera-9-1", 1, "worker one\n");
    let c = driver.logs(&id, 0).await.unwrap();
    assert_eq!(c.data, b"epoch 1\n");
    assert!(!c.complete);
    fake.end_pod("tessera-9-1", 0, 0, "Completed", "epoch 1\nepoch 2\n");
    fake.end_pod("tessera-9-1", 1, 0, "Completed", "worker one\n");
    fake.finish_job(NS, "tessera-9-1", "Complete", "CompletionsReached", "");
    let rest = driver.logs(&id, c.next_offset).await.unwrap();
    assert_eq!(rest.data, b"epoch 2\n");
    assert!(rest.complete, "the Job has ended");
    let other = driver.replica_logs(&id, 1, 0).await.unwrap();
    assert_eq!(other.data, b"worker one\n");
    assert!(fake
        .seen()
        .iter()
        .any(|s| s.uri.contains("/log?") && s.uri.contains("container=main")));
    assert!(matches!(
        driver.logs(&RemoteId("tessera-404-1".into()), 0).await,
        Err(PoolError::NotFound(_))
    ));
}

#[tokio::test]
async fn cancel_deletes_the_job_and_its_pods() {
    let (fake, driver) = setup().await;
    let id = driver.submit(&job(10, 2)).await.unwrap();
    fake.run_pod("tessera-10-1", 0, "");
    driver.cancel(&id).await.unwrap();
    let del = fake
        .seen()
        .into_iter()
        .find(|s| s.method == "DELETE")
        .expect("a DELETE");
    assert_eq!(
        del.uri,
        format!("/apis/batch/v1/namespaces/{NS}/jobs/tessera-10-1?")
    );
    assert_eq!(del.body["propagationPolicy"], "Background");
    assert!(fake.job(NS, "tessera-10-1").is_none());
    assert!(
        fake.pods_of("tessera-10-1").is_empty(),
        "the pods went with it"
    );
    let st = driver.status(std::slice::from_ref(&id)).await.unwrap();
    assert_eq!(st[&id], RemoteState::NotFound);
    // Cancelling again (or something never submitted) is not an error.
    driver.cancel(&id).await.unwrap();
}

fn bound_pod(name: &str, node: &str, cpu: &str, mem: &str, gpus: u32, phase: &str) -> Pod {
    let mut req = BTreeMap::from([
        ("cpu".to_string(), Quantity(cpu.into())),
        ("memory".to_string(), Quantity(mem.into())),
    ]);
    if gpus > 0 {
        req.insert("nvidia.com/gpu".into(), Quantity(gpus.to_string()));
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("other-team".into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            containers: vec![Container {
                name: "c".into(),
                image: Some("x".into()),
                resources: Some(ResourceRequirements {
                    requests: Some(req.clone()),
                    limits: Some(req),
                    ..ResourceRequirements::default()
                }),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some(phase.into()),
            ..PodStatus::default()
        }),
    }
}

#[tokio::test]
async fn capacity_is_allocatable_minus_what_bound_pods_request() {
    let (fake, driver) = setup().await;
    let region = ("topology.kubernetes.io/region", "eu-1");
    fake.add_node(node("cpu-1", "3800m", "15Gi", 0, &[region]));
    fake.add_node(node(
        "gpu-1",
        "63",
        "500Gi",
        8,
        &[region, ("nvidia.com/gpu.product", "NVIDIA-H100-80GB-HBM3")],
    ));
    let mut cordoned = node("gpu-2", "63", "500Gi", 8, &[region]);
    cordoned.spec.as_mut().unwrap().unschedulable = Some(true);
    fake.add_node(cordoned);
    let mut not_ready = node("cpu-2", "8", "32Gi", 0, &[region]);
    not_ready
        .status
        .as_mut()
        .unwrap()
        .conditions
        .as_mut()
        .unwrap()[0]
        .status = "False".into();
    fake.add_node(not_ready);
    fake.add_pod(bound_pod("a", "cpu-1", "500m", "1Gi", 0, "Running"));
    fake.add_pod(bound_pod("b", "gpu-1", "8", "64Gi", 2, "Running"));
    fake.add_pod(bound_pod("done", "gpu-1", "8", "64Gi", 4, "Succeeded"));
    fake.add_pod(bound_pod("elsewhere", "gpu-2", "8", "64Gi", 4, "Running"));

    let cap = driver.capacity().await.unwrap();
    assert_eq!(cap.nodes, 2, "cordoned and not-ready nodes take no work");
    assert_eq!(cap.cpu_milli, 3800 + 63_000);
    assert_eq!(cap.memory_bytes, (15u64 << 30) + (500u64 << 30));
    assert_eq!(cap.used_cpu_milli, 500 + 8000);
    assert_eq!(cap.used_memory_bytes, (1u64 << 30) + (64u64 << 30));
    assert_eq!(cap.used_gpus, 2);
    assert_eq!(cap.largest_node, (63_000, 500u64 << 30, 8));
    assert_eq!(cap.gpus.len(), 1);
    assert_eq!(cap.gpus[0].model, "NVIDIA-H100-80GB-HBM3");
    assert_eq!(cap.gpus[0].count, 8);
    assert_eq!(cap.labels["engine"], "kubernetes");
    assert_eq!(cap.labels["region"], "eu-1");
    let pods_call = fake
        .seen()
        .into_iter()
        .find(|s| s.uri.starts_with("/api/v1/pods"))
        .unwrap();
    assert!(
        pods_call
            .uri
            .contains("fieldSelector=status.phase%21%3DSucceeded%2Cstatus.phase%21%3DFailed"),
        "{}",
        pods_call.uri
    );
}

#[tokio::test]
async fn refusals_of_the_api_server_name_their_reason() {
    let (fake, driver) = setup().await;
    fake.world.lock().unwrap().refuse_create = Some((
        403,
        "Forbidden".into(),
        "jobs.batch \"tessera-12-1\" is forbidden: exceeded quota: gpu-quota".into(),
    ));
    match driver.submit(&job(12, 1)).await {
        Err(PoolError::Rejected(m)) => assert!(m.contains("exceeded quota"), "{m}"),
        other => panic!("{other:?}"),
    }
    fake.world.lock().unwrap().refuse_create =
        Some((503, "ServiceUnavailable".into(), "etcd down".into()));
    assert!(matches!(
        driver.submit(&job(12, 1)).await,
        Err(PoolError::Unavailable(_))
    ));
    // What the driver can tell is wrong never reaches the server.
    let mut j = job(13, 1);
    j.argv.clear();
    assert!(
        matches!(driver.submit(&j).await, Err(PoolError::Rejected(m)) if m.starts_with("command:"))
    );
}

#[tokio::test]
async fn a_kubeconfig_names_the_server_the_credentials_and_the_namespace() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster:
    server: {url}
users:
- name: tessera
  user:
    token: s3cret-token
contexts:
- name: lab
  context:
    cluster: lab
    user: tessera
    namespace: team-a
current-context: lab
",
            url = fake.url
        ),
    )
    .unwrap();
    let driver = KubeDriver::from_kubeconfig(&path, None, None)
        .await
        .unwrap();
    assert_eq!(driver.namespace(), "team-a");
    driver.submit(&job(20, 1)).await.unwrap();
    let post = fake.seen().pop().unwrap();
    assert_eq!(post.uri, "/apis/batch/v1/namespaces/team-a/jobs?");
    assert_eq!(post.authorization.as_deref(), Some("Bearer s3cret-token"));
    // --namespace wins over the context's.
    let driver = KubeDriver::from_kubeconfig(&path, None, Some("team-b"))
        .await
        .unwrap();
    assert_eq!(driver.namespace(), "team-b");
    // Errors name what is wrong.
    let missing = dir.path().join("nope");
    match KubeDriver::from_kubeconfig(&missing, None, None).await {
        Err(PoolError::Rejected(m)) => assert!(m.starts_with("kubeconfig:"), "{m}"),
        other => panic!("{other:?}"),
    }
    match KubeDriver::from_kubeconfig(&path, None, Some("Team_B")).await {
        Err(PoolError::Rejected(m)) => assert!(m.starts_with("namespace:"), "{m}"),
        other => panic!("{other:?}"),
    }

    // As a server makes a pool: checked at once, connected on first use.
    let err = KubePool::new(&path, Some("nope"), None, None).unwrap_err();
    assert!(
        matches!(&err, PoolError::Rejected(m) if m.starts_with("context:")),
        "{err:?}"
    );
    let err = KubePool::new(&missing, None, None, None).unwrap_err();
    assert!(
        matches!(&err, PoolError::Rejected(m) if m.starts_with("kubeconfig:")),
        "{err:?}"
    );
    let pool = KubePool::new(&path, Some("lab"), Some("team-c"), Some("busybox:1.36")).unwrap();
    assert_eq!(pool.kind(), "kubernetes");
    pool.submit(&job(21, 1)).await.unwrap();
    let post = fake.seen().pop().unwrap();
    assert_eq!(post.uri, "/apis/batch/v1/namespaces/team-c/jobs?");
    let sent: Job = serde_json::from_value(post.body).unwrap();
    let image = sent.spec.unwrap().template.spec.unwrap().containers[0]
        .image
        .clone();
    assert_eq!(image.as_deref(), Some("busybox:1.36"));
}
