//! The Slurm driver against a real Slurm (slurmctld, slurmd and munge on
//! this machine; `.ci/slurm-up.sh` starts a single node). Without one the
//! tests print `SKIPPED` and pass, unless `TESSERA_REQUIRE_SLURM=1` (set by
//! `.ci/run`), which makes a missing Slurm a failure.
//!
//! Every job gets a fresh key, so runs do not find each other's jobs (Slurm
//! keeps ended jobs for `MinJobAge`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tessera_pools::slurm::{SlurmConfig, SlurmDriver};
use tessera_pools::{Failure, PoolDriver, PoolError, PoolJob, RemoteId, RemoteState};

fn slurm_up() -> bool {
    let answers = std::process::Command::new("sinfo")
        .args(["-h", "-o", "%T"])
        .output()
        .map(|o| o.status.success() && !o.stdout.is_empty())
        .unwrap_or(false);
    if !answers {
        if std::env::var("TESSERA_REQUIRE_SLURM").as_deref() == Ok("1") {
            panic!("TESSERA_REQUIRE_SLURM=1 but no Slurm answers `sinfo` here (start one with .ci/slurm-up.sh)");
        }
        eprintln!("SKIPPED: no Slurm answers `sinfo` here (start one with .ci/slurm-up.sh)");
    }
    answers
}

fn driver() -> (SlurmDriver, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("tessera-slurm-test")
        .tempdir()
        .unwrap();
    let d = SlurmDriver::with_path(SlurmConfig {
        partition: None,
        output_dir: dir.path().to_path_buf(),
    });
    (d, dir)
}

/// A job id no other run has used.
fn fresh_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    1_000_000_000 + (nanos / 1000) % 1_000_000_000
}

fn job(script: &str) -> PoolJob {
    let id = fresh_id();
    PoolJob {
        key: PoolJob::key_for(id, 1),
        job_id: id,
        attempt: 1,
        name: "test".into(),
        team: "ml".into(),
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        image: None,
        env: vec![("GREETING".into(), "hello, it's me".into())],
        workdir: None,
        replicas: 1,
        cpu_milli: 1000,
        memory_bytes: 64 << 20,
        gpus: 0,
        gpu_models: vec![],
        max_runtime_ms: None,
        node_selector: Default::default(),
    }
}

async fn wait_for(
    d: &SlurmDriver,
    id: &RemoteId,
    timeout: Duration,
    done: impl Fn(&RemoteState) -> bool,
) -> RemoteState {
    let start = Instant::now();
    loop {
        let s: HashMap<RemoteId, RemoteState> = d.status(std::slice::from_ref(id)).await.unwrap();
        let s = s[id].clone();
        if done(&s) {
            return s;
        }
        assert!(
            start.elapsed() < timeout,
            "job {id} still {s:?} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn all_logs(d: &SlurmDriver, id: &RemoteId) -> String {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let c = d.logs(id, offset).await.unwrap();
        out.extend_from_slice(&c.data);
        offset = c.next_offset;
        if c.complete {
            return String::from_utf8_lossy(&out).into_owned();
        }
        if c.data.is_empty() {
            d.status(std::slice::from_ref(id)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn submit_runs_the_job_and_its_output_reads_back_as_logs() {
    if !slurm_up() {
        return;
    }
    let (d, _dir) = driver();
    let j = job("echo \"$GREETING from job $TESSERA_TEST_X\"; echo to-stderr >&2; pwd");
    let mut j = j;
    j.env.push(("TESSERA_TEST_X".into(), "x".into()));
    let id = d.submit(&j).await.unwrap();
    // Idempotent: the same key again is the same job, not a second one.
    assert_eq!(d.submit(&j).await.unwrap(), id);
    let s = wait_for(&d, &id, Duration::from_secs(60), RemoteState::is_terminal).await;
    assert_eq!(s, RemoteState::Succeeded);
    let logs = all_logs(&d, &id).await;
    assert!(logs.contains("hello, it's me from job x\n"), "{logs}");
    assert!(logs.contains("to-stderr\n"), "{logs}");
    // The default working directory: one per attempt, under the output dir.
    assert!(logs.contains(&format!("/work/{}", j.key)), "{logs}");
    // Still the same job once it has ended.
    assert_eq!(d.submit(&j).await.unwrap(), id);
}

#[tokio::test]
async fn a_failing_job_reports_its_exit_code() {
    if !slurm_up() {
        return;
    }
    let (d, _dir) = driver();
    let id = d.submit(&job("echo failing; exit 7")).await.unwrap();
    let s = wait_for(&d, &id, Duration::from_secs(60), RemoteState::is_terminal).await;
    match s {
        RemoteState::Failed {
            failure: Failure::Exited,
            exit_code: Some(7),
            message,
        } => assert!(message.contains("FAILED"), "{message}"),
        other => panic!("exit 7 should be a failure with code 7, not {other:?}"),
    }
    assert_eq!(all_logs(&d, &id).await, "failing\n");
}

#[tokio::test]
async fn cancel_stops_a_running_job() {
    if !slurm_up() {
        return;
    }
    let (d, _dir) = driver();
    let id = d.submit(&job("echo started; sleep 300")).await.unwrap();
    wait_for(&d, &id, Duration::from_secs(60), |s| {
        *s == RemoteState::Running
    })
    .await;
    d.cancel(&id).await.unwrap();
    let s = wait_for(&d, &id, Duration::from_secs(30), RemoteState::is_terminal).await;
    assert_eq!(s, RemoteState::Cancelled);
    // Cancelling again, once it has ended, is not an error.
    d.cancel(&id).await.unwrap();
}

#[tokio::test]
async fn a_job_past_its_max_runtime_times_out() {
    if !slurm_up() {
        return;
    }
    let (d, _dir) = driver();
    let mut j = job("echo going; sleep 600");
    // Slurm counts whole minutes: a 1 s limit becomes 1 minute.
    j.max_runtime_ms = Some(1000);
    let id = d.submit(&j).await.unwrap();
    let start = Instant::now();
    let s = wait_for(&d, &id, Duration::from_secs(150), RemoteState::is_terminal).await;
    match s {
        RemoteState::Failed {
            failure: Failure::TimedOut,
            ..
        } => {}
        other => panic!("should have timed out, not {other:?}"),
    }
    assert!(
        start.elapsed() >= Duration::from_secs(50),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_job_too_big_for_the_partition_is_refused_with_slurms_reason() {
    if !slurm_up() {
        return;
    }
    let (d, dir) = driver();
    let mut j = job("true");
    j.cpu_milli = 4096 * 1000;
    match d.submit(&j).await {
        Err(PoolError::Rejected(m)) => assert!(m.contains("Slurm refused the job"), "{m}"),
        other => panic!("4096 CPUs should be refused, not {other:?}"),
    }
    let mut j = job("true");
    j.memory_bytes = 1 << 50;
    match d.submit(&j).await {
        Err(PoolError::Rejected(m)) => assert!(m.contains("Slurm refused the job"), "{m}"),
        other => panic!("a PiB of memory should be refused, not {other:?}"),
    }
    // No partition of that name: the driver says which exist.
    let bad = SlurmDriver::with_path(SlurmConfig {
        partition: Some("no-such-partition".into()),
        output_dir: PathBuf::from(dir.path()),
    });
    match bad.capacity().await {
        Err(PoolError::Rejected(m)) => assert!(m.starts_with("partition:"), "{m}"),
        other => panic!("{other:?}"),
    }
    let c = d.capacity().await.unwrap();
    assert!(c.nodes >= 1 && c.cpu_milli >= 1000, "{c:?}");
}

#[tokio::test]
async fn a_gang_runs_as_one_job_of_n_tasks() {
    if !slurm_up() {
        return;
    }
    let (d, _dir) = driver();
    let mut j = job("echo replica $TESSERA_REPLICA of $TESSERA_NUM_REPLICAS");
    j.replicas = 2;
    j.env.push(("TESSERA_NUM_REPLICAS".into(), "2".into()));
    let id = d.submit(&j).await.unwrap();
    let s = wait_for(&d, &id, Duration::from_secs(150), RemoteState::is_terminal).await;
    assert_eq!(s, RemoteState::Succeeded);
    let logs = all_logs(&d, &id).await;
    let mut lines: Vec<&str> = logs.lines().collect();
    lines.sort();
    assert_eq!(lines, ["replica 0 of 2", "replica 1 of 2"], "{logs}");
}
