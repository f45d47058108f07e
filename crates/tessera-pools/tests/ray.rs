//! The Ray driver against a real Ray head (`ray start --head`, from PyPI's
//! `ray[default]`), named by `TESSERA_TEST_RAY_ADDRESS` (the dashboard's
//! URL). Without it these tests print SKIPPED and pass, unless
//! `TESSERA_REQUIRE_RAY=1` (as `.ci/run` sets, after starting a head), when
//! they fail.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use tessera_pools::ray::RayDriver;
use tessera_pools::{Failure, PoolDriver, PoolError, PoolJob, RemoteId, RemoteState};

fn ray() -> Option<RayDriver> {
    match std::env::var("TESSERA_TEST_RAY_ADDRESS") {
        Ok(addr) if !addr.is_empty() => Some(RayDriver::new(&addr).expect("a valid address")),
        _ => {
            if std::env::var("TESSERA_REQUIRE_RAY").as_deref() == Ok("1") {
                panic!("TESSERA_REQUIRE_RAY=1 but TESSERA_TEST_RAY_ADDRESS names no Ray head");
            }
            eprintln!("SKIPPED: set TESSERA_TEST_RAY_ADDRESS to a Ray dashboard URL to run");
            None
        }
    }
}

/// A job id no earlier run against the same (long-lived) head has used.
fn fresh_id() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    ms * 100 + N.fetch_add(1, Ordering::Relaxed)
}

fn job(argv: &[&str]) -> PoolJob {
    let job_id = fresh_id();
    PoolJob {
        key: PoolJob::key_for(job_id, 1),
        job_id,
        attempt: 1,
        name: "ray-test".into(),
        team: "ml".into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        image: None,
        env: vec![],
        workdir: None,
        replicas: 1,
        cpu_milli: 100,
        memory_bytes: 64 << 20,
        gpus: 0,
        gpu_models: vec![],
        max_runtime_ms: None,
        node_selector: BTreeMap::new(),
    }
}

async fn wait_until(
    ray: &RayDriver,
    id: &RemoteId,
    within: Duration,
    done: impl Fn(&RemoteState) -> bool,
) -> RemoteState {
    let start = Instant::now();
    loop {
        let states = ray.status(std::slice::from_ref(id)).await.unwrap();
        let st = states[id].clone();
        if done(&st) {
            return st;
        }
        assert!(
            start.elapsed() < within,
            "{id} still {st:?} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn all_logs(ray: &RayDriver, id: &RemoteId) -> String {
    let chunk = ray.logs(id, 0).await.unwrap();
    String::from_utf8(chunk.data).unwrap()
}

#[tokio::test]
async fn a_job_runs_with_its_argv_and_env_and_its_output_is_readable() {
    let Some(ray) = ray() else { return };
    let mut j = job(&[
        "sh",
        "-c",
        "echo \"arg=$1 env=$GREETING job=$TESSERA_JOB_ID\"",
        "x",
        "it's $HOME",
    ]);
    j.env = vec![("GREETING".into(), "hello there".into())];
    j.workdir = Some("/tmp".into());
    let id = ray.submit(&j).await.unwrap();
    assert_eq!(id.0, j.key, "the Ray submission id is the attempt's key");
    let st = wait_until(
        &ray,
        &id,
        Duration::from_secs(120),
        RemoteState::is_terminal,
    )
    .await;
    assert_eq!(st, RemoteState::Succeeded);
    let want = format!("arg=it's $HOME env=hello there job={}", j.job_id);
    let chunk = ray.logs(&id, 0).await.unwrap();
    let text = String::from_utf8(chunk.data.clone()).unwrap();
    assert!(text.contains(&want), "logs lack {want:?}: {text}");
    assert!(chunk.complete, "an ended job's logs are complete");
    // Reading on from where the last read stopped gives nothing new.
    let rest = ray.logs(&id, chunk.next_offset).await.unwrap();
    assert!(rest.data.is_empty() && rest.complete);
    // Reading from the middle gives the tail.
    let mid = ray.logs(&id, chunk.next_offset - 5).await.unwrap();
    assert_eq!(mid.data, chunk.data[chunk.data.len() - 5..]);
}

#[tokio::test]
async fn submitting_the_same_attempt_twice_runs_it_once() {
    let Some(ray) = ray() else { return };
    let j = job(&["sh", "-c", "echo once-$TESSERA_ATTEMPT"]);
    let first = ray.submit(&j).await.unwrap();
    let again = ray.submit(&j).await.unwrap();
    assert_eq!(first, again);
    let same = ray
        .list()
        .await
        .unwrap()
        .into_iter()
        .filter(|d| d.submission_id.as_deref() == Some(j.key.as_str()))
        .count();
    assert_eq!(same, 1, "Ray holds exactly one job under the key");
    wait_until(
        &ray,
        &first,
        Duration::from_secs(120),
        RemoteState::is_terminal,
    )
    .await;
    // And after it ended, a retry of the submit still finds it.
    assert_eq!(ray.submit(&j).await.unwrap(), first);
    let logs = all_logs(&ray, &first).await;
    assert_eq!(logs.matches("once-1\n").count(), 1, "{logs}");

    // A different job under the same key (another Tessera installation
    // sharing the cluster) is not taken for this one.
    let mut other = j.clone();
    other.argv = vec!["echo".into(), "someone else".into()];
    match ray.submit(&other).await {
        Err(PoolError::Rejected(m)) => assert!(m.starts_with("key:"), "{m}"),
        res => panic!("expected a refusal, got {res:?}"),
    }
}

#[tokio::test]
async fn a_cancelled_job_stops() {
    let Some(ray) = ray() else { return };
    let j = job(&["sh", "-c", "echo started; sleep 120; echo not-reached"]);
    let id = ray.submit(&j).await.unwrap();
    wait_until(&ray, &id, Duration::from_secs(120), |s| {
        *s == RemoteState::Running || s.is_terminal()
    })
    .await;
    let asked = Instant::now();
    ray.cancel(&id).await.unwrap();
    let st = wait_until(&ray, &id, Duration::from_secs(60), RemoteState::is_terminal).await;
    assert_eq!(st, RemoteState::Cancelled);
    assert!(asked.elapsed() < Duration::from_secs(60));
    // (Ray's log also quotes the entrypoint, so look for the line itself.)
    let logs = all_logs(&ray, &id).await;
    assert!(logs.lines().any(|l| l == "started"), "{logs}");
    assert!(!logs.lines().any(|l| l == "not-reached"), "{logs}");
    // Cancelling an ended job, or one Ray never had, is not an error.
    ray.cancel(&id).await.unwrap();
    ray.cancel(&RemoteId("tessera-0-0-unknown".into()))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_failing_job_reports_its_exit_code_and_rays_words() {
    let Some(ray) = ray() else { return };
    let j = job(&["sh", "-c", "echo disk-on-fire >&2; exit 3"]);
    let id = ray.submit(&j).await.unwrap();
    let st = wait_until(
        &ray,
        &id,
        Duration::from_secs(120),
        RemoteState::is_terminal,
    )
    .await;
    match st {
        RemoteState::Failed {
            failure,
            exit_code,
            message,
        } => {
            assert_eq!(failure, Failure::Exited);
            assert_eq!(exit_code, Some(3));
            assert!(message.contains("exit code 3"), "{message}");
            assert!(message.contains("disk-on-fire"), "{message}");
        }
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test]
async fn a_job_past_its_max_runtime_is_stopped_as_timed_out() {
    let Some(ray) = ray() else { return };
    let mut j = job(&["sleep", "60"]);
    j.max_runtime_ms = Some(2_000);
    let id = ray.submit(&j).await.unwrap();
    let started = Instant::now();
    let st = wait_until(
        &ray,
        &id,
        Duration::from_secs(120),
        RemoteState::is_terminal,
    )
    .await;
    assert!(
        matches!(
            st,
            RemoteState::Failed {
                failure: Failure::TimedOut,
                exit_code: Some(124),
                ..
            }
        ),
        "{st:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(55));
}

#[tokio::test]
async fn a_job_larger_than_any_node_is_refused_and_nothing_is_submitted() {
    let Some(ray) = ray() else { return };
    let cap = ray.capacity().await.unwrap();
    let mut j = job(&["true"]);
    j.cpu_milli = cap.largest_node.0 + 64_000;
    match ray.submit(&j).await {
        Err(PoolError::Rejected(m)) => assert!(m.starts_with("resources.cpu:"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let mut j2 = job(&["true"]);
    j2.gpus = cap.largest_node.2 + 1;
    assert!(
        matches!(ray.submit(&j2).await, Err(PoolError::Rejected(m)) if m.starts_with("resources.gpu:"))
    );
    let states = ray
        .status(&[RemoteId(j.key.clone()), RemoteId(j2.key.clone())])
        .await
        .unwrap();
    assert!(states.values().all(|s| *s == RemoteState::NotFound));
}

#[tokio::test]
async fn the_state_of_many_jobs_comes_in_one_call() {
    let Some(ray) = ray() else { return };
    let ok = ray.submit(&job(&["true"])).await.unwrap();
    let bad = ray.submit(&job(&["false"])).await.unwrap();
    let slow = ray.submit(&job(&["sleep", "60"])).await.unwrap();
    let unknown = RemoteId(PoolJob::key_for(fresh_id(), 9));
    let ids = [ok.clone(), bad.clone(), slow.clone(), unknown.clone()];
    let start = Instant::now();
    loop {
        let states = ray.status(&ids).await.unwrap();
        assert_eq!(states.len(), 4);
        assert_eq!(states[&unknown], RemoteState::NotFound);
        assert!(!states[&slow].is_terminal(), "{:?}", states[&slow]);
        if states[&ok].is_terminal() && states[&bad].is_terminal() {
            assert_eq!(states[&ok], RemoteState::Succeeded);
            assert!(
                matches!(
                    states[&bad],
                    RemoteState::Failed {
                        exit_code: Some(1),
                        ..
                    }
                ),
                "{:?}",
                states[&bad]
            );
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{states:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    ray.cancel(&slow).await.unwrap();
}

#[tokio::test]
async fn following_a_job_streams_its_output_as_it_comes() {
    let Some(ray) = ray() else { return };
    let j = job(&["sh", "-c", "for i in 1 2 3; do echo tick-$i; sleep 1; done"]);
    let id = ray.submit(&j).await.unwrap();
    let mut stream = Box::pin(ray.tail(&id).await.unwrap());
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline.into(), stream.next()).await {
        seen.push_str(&chunk.unwrap());
    }
    // The stream ends by itself once the job has ended, holding every line.
    for i in 1..=3 {
        assert!(seen.contains(&format!("tick-{i}\n")), "{seen}");
    }
    assert!(matches!(
        ray.tail(&RemoteId("tessera-0-0-unknown".into())).await,
        Err(PoolError::NotFound(_))
    ));
}

#[tokio::test]
async fn capacity_reports_the_clusters_nodes() {
    let Some(ray) = ray() else { return };
    let cap = ray.capacity().await.unwrap();
    assert!(cap.nodes >= 1);
    assert!(cap.cpu_milli >= 1000, "{cap:?}");
    assert!(cap.memory_bytes > 0, "{cap:?}");
    assert!(cap.largest_node.0 <= cap.cpu_milli && cap.largest_node.0 > 0);
    assert_eq!(cap.labels.get("engine").map(String::as_str), Some("ray"));
    assert!(ray.version().await.unwrap().starts_with('2'));
}
