//! Executor tests: real processes, real signals, real files.

use super::*;
use std::time::Duration;

struct Harness {
    _dir: tempfile::TempDir,
    home: PathBuf,
    cmd: mpsc::UnboundedSender<ToAgent>,
    events: mpsc::UnboundedReceiver<FromAgent>,
}

impl Drop for Harness {
    /// A test that fails midway must not leave its replicas running:
    /// stop them the way a restarted agent would.
    fn drop(&mut self) {
        reap_orphans(&self.home, &Cgroups::disabled("test"));
    }
}

fn harness(cgroups: bool) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().to_path_buf();
    let mut config = AgentConfig::new(&home);
    config.kill_grace = Duration::from_millis(300);
    config.cgroups = cgroups;
    config.name = Some("test-node".into());
    let (etx, events) = mpsc::unbounded_channel();
    let (cmd, crx) = mpsc::unbounded_channel();
    let agent = Agent::new(config, etx).unwrap();
    tokio::spawn(agent.run(crx));
    Harness {
        _dir: dir,
        home,
        cmd,
        events,
    }
}

fn start(job: u64, argv: &[&str]) -> StartReplica {
    StartReplica {
        key: ReplicaKey {
            job_id: job,
            attempt: 1,
            replica: 0,
        },
        num_replicas: 1,
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![("GREETING".into(), "hello".into())],
        workdir: None,
        gpus: vec![],
        cpu_milli: 1000,
        memory_bytes: 256 << 20,
        max_runtime_ms: None,
        image: None,
        inputs: Vec::new(),
        outputs: Vec::new(),
    }
}

/// [`start`] with a memory limit.
fn start_limited(job: u64, argv: &[&str], memory_bytes: u64) -> StartReplica {
    StartReplica {
        memory_bytes,
        ..start(job, argv)
    }
}

/// Whether cgroup limits can be set here (else the test says it skips).
fn cgroups_here() -> bool {
    let cg = Cgroups::detect();
    if !cg.enforced() {
        eprintln!("skipping: {}", cg.note());
    }
    cg.enforced()
}

impl Harness {
    /// The next event other than a heartbeat: heartbeats tick on their own
    /// clock (the first one right after registering), so tests that expect
    /// a sequence of replica events must not race them.
    async fn next(&mut self) -> FromAgent {
        loop {
            let event = tokio::time::timeout(Duration::from_secs(20), self.events.recv())
                .await
                .expect("agent event in time")
                .expect("agent alive");
            if !matches!(event, FromAgent::Heartbeat { .. } | FromAgent::Usage { .. }) {
                return event;
            }
        }
    }

    /// Waits for the exit of `job`, skipping other events.
    async fn exit_of(&mut self, job: u64) -> (Option<i32>, Option<i32>, ExitCause) {
        loop {
            if let FromAgent::Exited {
                key,
                code,
                signal,
                cause,
                ..
            } = self.next().await
            {
                if key.job_id == job {
                    return (code, signal, cause);
                }
            }
        }
    }

    fn log(&self, job: u64) -> String {
        std::fs::read_to_string(log_path(
            &self.home,
            ReplicaKey {
                job_id: job,
                attempt: 1,
                replica: 0,
            },
        ))
        .unwrap_or_default()
    }
}

#[tokio::test]
async fn registers_then_runs_with_env_and_logs() {
    let mut h = harness(false);
    match h.next().await {
        FromAgent::Register(inv) => {
            assert_eq!(inv.name, "test-node");
            assert!(inv.cpu_milli >= 1000);
            assert!(inv.memory_bytes > 0);
            assert!(!inv.limits_enforced);
            assert!(inv.limits_note.contains("NOT enforced"));
        }
        other => panic!("expected Register, got {other:?}"),
    }
    let mut s = start(1, &["/bin/sh", "-c", "echo out $GREETING $TESSERA_JOB_ID $TESSERA_REPLICA $TESSERA_NUM_REPLICAS [$CUDA_VISIBLE_DEVICES] $(pwd); echo err >&2; exit 3"]);
    s.gpus = vec![];
    h.cmd.send(ToAgent::Start(s)).unwrap();
    assert!(matches!(h.next().await, FromAgent::Started { pid, .. } if pid > 0));
    let (code, signal, cause) = h.exit_of(1).await;
    assert_eq!((code, signal, cause), (Some(3), None, ExitCause::Exited));
    let log = h.log(1);
    let workdir = h.home.join("work").join("1.1.0");
    assert!(
        log.contains(&format!("out hello 1 0 1 [] {}", workdir.display())),
        "{log}"
    );
    assert!(log.contains("err"), "stderr goes to the log too: {log}");
}

#[tokio::test]
async fn gpus_are_passed_as_cuda_visible_devices() {
    let mut h = harness(false);
    let mut s = start(2, &["/bin/sh", "-c", "echo [$CUDA_VISIBLE_DEVICES]"]);
    s.gpus = vec![1, 3];
    h.cmd.send(ToAgent::Start(s)).unwrap();
    assert_eq!(h.exit_of(2).await.0, Some(0));
    assert!(h.log(2).contains("[1,3]"));
}

#[tokio::test]
async fn max_runtime_kills_the_whole_group() {
    let mut h = harness(false);
    let marker = h.home.join("grandchild-alive");
    let script = format!(
        "(trap '' TERM; sleep 30; touch {}) & trap '' TERM; sleep 30",
        marker.display()
    );
    let mut s = start(3, &["/bin/sh", "-c", &script]);
    s.max_runtime_ms = Some(300);
    let began = std::time::Instant::now();
    h.cmd.send(ToAgent::Start(s)).unwrap();
    let (_, signal, cause) = h.exit_of(3).await;
    assert_eq!(cause, ExitCause::TimedOut);
    assert_eq!(
        signal,
        Some(9),
        "TERM was ignored, so KILL after the grace period"
    );
    assert!(began.elapsed() < Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!marker.exists());
    // No process of the group survives.
    let out = std::process::Command::new("pgrep")
        .arg("-f")
        .arg(marker.to_str().unwrap())
        .output();
    if let Ok(out) = out {
        assert!(out.stdout.is_empty(), "a process of the group survived");
    }
}

#[tokio::test]
async fn stop_sends_term_first() {
    let mut h = harness(false);
    h.cmd
        .send(ToAgent::Start(start(
            4,
            &[
                "/bin/sh",
                "-c",
                "trap 'echo got-term; exit 0' TERM; while true; do sleep 0.05; done",
            ],
        )))
        .unwrap();
    assert!(matches!(h.next().await, FromAgent::Register(_)));
    assert!(matches!(h.next().await, FromAgent::Started { .. }));
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.cmd
        .send(ToAgent::Stop {
            key: ReplicaKey {
                job_id: 4,
                attempt: 1,
                replica: 0,
            },
            grace_ms: 5000,
            reason: "cancel".into(),
        })
        .unwrap();
    let (code, _, cause) = h.exit_of(4).await;
    assert_eq!(cause, ExitCause::Stopped);
    assert_eq!(code, Some(0));
    assert!(h.log(4).contains("got-term"));
}

#[tokio::test]
async fn missing_program_is_a_spawn_failure_with_a_reason() {
    let mut h = harness(false);
    h.cmd
        .send(ToAgent::Start(start(5, &["no-such-program-xyz"])))
        .unwrap();
    match h.exit_of(5).await.2 {
        ExitCause::SpawnFailed(msg) => assert!(msg.contains("not found in PATH"), "{msg}"),
        other => panic!("{other:?}"),
    }
    assert!(h.log(5).contains("not found"));
}

#[tokio::test]
async fn orphans_of_an_earlier_agent_are_reaped() {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    std::fs::create_dir_all(running_dir(home)).unwrap();
    // A leader recorded with its pid and start time.
    let mut leader = std::process::Command::new("sleep")
        .arg("30")
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = leader.id();
    let st = proc_start_time(pid).unwrap();
    std::fs::write(running_dir(home).join("9.1.0"), format!("{pid} {st}\n")).unwrap();
    // A replica the crash caught between record and spawn: found by its tags,
    // even in a process group of its own.
    // (`sleep 30` carrying a replica's tags, as its agent on `home` sets them.)
    let tagged_sleep = |home: &Path| {
        std::process::Command::new("sleep")
            .arg("30")
            .env("TESSERA_AGENT_HOME", home)
            .env("TESSERA_JOB_ID", "9")
            .env("TESSERA_ATTEMPT", "1")
            .env("TESSERA_REPLICA", "1")
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let mut tagged = tagged_sleep(home);
    std::fs::write(running_dir(home).join("9.1.1"), "starting\n").unwrap();
    // A stale record whose pid is long gone.
    std::fs::write(running_dir(home).join("9.1.2"), "999999 1\n").unwrap();
    // Someone else's process with other tags is left alone.
    let mut other = std::process::Command::new("sleep")
        .arg("30")
        .env("TESSERA_JOB_ID", "10")
        .env("TESSERA_ATTEMPT", "1")
        .env("TESSERA_REPLICA", "0")
        .spawn()
        .unwrap();
    // Another agent's replica (another home on this machine) with the same
    // tags is left alone too.
    let mut neighbour = tagged_sleep(&home.join("elsewhere"));
    let mut reaped = reap_orphans(home, &Cgroups::disabled("test"));
    reaped.sort();
    assert_eq!(
        reaped.iter().map(|k| k.replica).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert_eq!(leader.wait().unwrap().signal(), Some(9));
    assert_eq!(tagged.wait().unwrap().signal(), Some(9));
    assert!(
        other.try_wait().unwrap().is_none(),
        "an unrelated process was killed"
    );
    assert!(
        neighbour.try_wait().unwrap().is_none(),
        "another agent's replica was killed"
    );
    for mut p in [other, neighbour] {
        p.kill().unwrap();
        let _ = p.wait();
    }
    assert!(std::fs::read_dir(running_dir(home))
        .unwrap()
        .next()
        .is_none());
}

#[tokio::test]
async fn cgroup_limits_apply_where_writable() {
    if !cgroups_here() {
        return;
    }
    let mut h = harness(true);
    // 64 MiB limit; the replica tries to hold 256 MiB.
    let hog = [
        "python3",
        "-c",
        "b = bytearray(256 << 20); print('survived')",
    ];
    h.cmd
        .send(ToAgent::Start(start_limited(6, &hog, 64 << 20)))
        .unwrap();
    let (code, signal, cause) = h.exit_of(6).await;
    assert!(
        !h.log(6).contains("survived"),
        "memory limit not enforced: {code:?} {signal:?}"
    );
    assert!(
        cause == ExitCause::OutOfMemory || code != Some(0),
        "{cause:?} {code:?}"
    );
    let fine = ["/bin/sh", "-c", "echo fine"];
    h.cmd
        .send(ToAgent::Start(start_limited(7, &fine, 64 << 20)))
        .unwrap();
    assert_eq!(h.exit_of(7).await.0, Some(0));
    assert!(h.log(7).contains("fine"));
}

/// Two agents on one machine (two `tessera up`, say) both count their jobs
/// from 1, so their replicas carry the same names; each keeps its cgroups
/// apart, so one's limits never apply to the other's replica.
#[tokio::test]
async fn agents_on_one_machine_keep_their_replicas_limits_apart() {
    if !cgroups_here() {
        return;
    }
    let (mut a, mut b) = (harness(true), harness(true));
    // b's job 8 may hold 512 MiB and takes 128 MiB once a's job 8, limited
    // to 32 MiB, has started.
    let big = "import time; time.sleep(0.8); b = bytearray(128 << 20); print('survived')";
    b.cmd
        .send(ToAgent::Start(start_limited(
            8,
            &["python3", "-c", big],
            512 << 20,
        )))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let small = ["/bin/sh", "-c", "sleep 2"];
    a.cmd
        .send(ToAgent::Start(start_limited(8, &small, 32 << 20)))
        .unwrap();
    let (code, signal, cause) = b.exit_of(8).await;
    assert_eq!(
        (code, signal, cause),
        (Some(0), None, ExitCause::Exited),
        "the other agent's limit applied: {}",
        b.log(8)
    );
    assert!(b.log(8).contains("survived"));
    assert_eq!(a.exit_of(8).await.0, Some(0));
}

/// An agent that crashes leaves its replicas running; the next agent on the
/// same home adopts them, can stop them, and reports how they ended — with
/// the real exit code, although it never was their parent.
#[tokio::test]
async fn a_restarted_agent_adopts_running_replicas_and_reports_their_exit() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().to_path_buf();
    let mut config = AgentConfig::new(&home);
    config.kill_grace = Duration::from_millis(300);
    config.cgroups = false;
    config.name = Some("n".into());
    // What a crashed agent leaves behind: live replicas and their pidfiles
    // (started exactly as the agent starts them, then never waited for).
    let (etx, _old_events) = mpsc::unbounded_channel();
    let ctx = ReplicaCtx {
        watchdog: false,
        home: home.clone(),
        grace: config.kill_grace,
        cgroups: Cgroups::disabled("test"),
        events: etx,
    };
    std::fs::create_dir_all(running_dir(&home)).unwrap();
    for (job, script) in [(21, "sleep 1; exit 7"), (22, "sleep 30"), (24, "exit 3")] {
        let s = start(job, &["/bin/sh", "-c", script]);
        let (child, _) = spawn_replica(&ctx, &s).unwrap();
        write_pidfile(&home, s.key, child.id().unwrap(), now_ms(), None);
        drop(child);
    }
    // Let the quick one end before the new agent looks.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (etx, mut events) = mpsc::unbounded_channel();
    let mut agent = Agent::new(config.clone(), etx).unwrap();
    let adopted = agent.adopt_orphans();
    assert_eq!(
        adopted.iter().map(|k| k.job_id).collect::<Vec<_>>(),
        vec![21, 22]
    );
    assert_eq!(agent.running(), adopted);
    let (cmd, crx) = mpsc::unbounded_channel();
    tokio::spawn(agent.run(crx));
    cmd.send(ToAgent::Stop {
        key: ReplicaKey {
            job_id: 22,
            attempt: 1,
            replica: 0,
        },
        grace_ms: 200,
        reason: "test".into(),
    })
    .unwrap();
    let mut exits = std::collections::BTreeMap::new();
    while exits.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Some(FromAgent::Exited {
                key, code, cause, ..
            })) => {
                exits.insert(key.job_id, (code, cause));
            }
            Ok(Some(_)) => {}
            other => panic!("expected Exited, got {other:?}"),
        }
    }
    assert_eq!(exits[&24], (Some(3), ExitCause::Exited), "ended unwatched");
    assert_eq!(exits[&21], (Some(7), ExitCause::Exited), "adopted, ran out");
    assert_eq!(exits[&22].1, ExitCause::Stopped, "adopted, then stopped");
    // Nothing is left to adopt.
    let (etx, _events) = mpsc::unbounded_channel();
    assert!(Agent::new(config, etx).unwrap().adopt_orphans().is_empty());
}

/// A program that handles SIGTERM gets the whole grace period to finish:
/// the wrapper waits for it rather than dying first.
#[tokio::test]
async fn a_program_handling_term_gets_its_grace_period() {
    let mut h = harness(false);
    let marker = h.home.join("cleaned-up");
    let ready = h.home.join("ready");
    let script = format!(
        "trap 'sleep 0.1; touch {}; exit 0' TERM; touch {}; sleep 30 & wait",
        marker.display(),
        ready.display()
    );
    h.cmd
        .send(ToAgent::Start(start(23, &["/bin/sh", "-c", &script])))
        .unwrap();
    assert!(matches!(h.next().await, FromAgent::Register(_)));
    assert!(matches!(h.next().await, FromAgent::Started { .. }));
    while !ready.exists() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.cmd
        .send(ToAgent::Stop {
            key: ReplicaKey {
                job_id: 23,
                attempt: 1,
                replica: 0,
            },
            grace_ms: 5000,
            reason: "test".into(),
        })
        .unwrap();
    let (_, _, cause) = h.exit_of(23).await;
    assert_eq!(cause, ExitCause::Stopped);
    assert!(marker.exists(), "the TERM handler ran to completion");
}

#[test]
fn inputs_appear_as_links_in_the_working_directory() {
    use tessera_core::protocol::InputMount;
    let dir = tempfile::tempdir().unwrap();
    let staged = dir.path().join("staged/clicks/3");
    std::fs::create_dir_all(&staged).unwrap();
    std::fs::write(staged.join("part-0.parquet"), b"PAR1").unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let inputs = vec![InputMount {
        name: "train".into(),
        path: staged.display().to_string(),
    }];
    crate::link_inputs(&work, &inputs).unwrap();
    assert_eq!(
        std::fs::read(work.join("train/part-0.parquet")).unwrap(),
        b"PAR1"
    );
    // Again (a retry in the same directory): fine.
    crate::link_inputs(&work, &inputs).unwrap();
    // A file of the job's own in the way, or data this node cannot see:
    // the replica does not start, and the message names the input.
    std::fs::write(work.join("w"), b"mine").unwrap();
    let e = crate::link_inputs(
        &work,
        &[InputMount {
            name: "w".into(),
            path: staged.display().to_string(),
        }],
    )
    .unwrap_err();
    assert!(
        e.contains("input `w`") && e.contains("already exists"),
        "{e}"
    );
    let e = crate::link_inputs(
        &work,
        &[InputMount {
            name: "far".into(),
            path: "/nonexistent/staged".into(),
        }],
    )
    .unwrap_err();
    assert!(
        e.contains("input `far`") && e.contains("not visible"),
        "{e}"
    );
}
