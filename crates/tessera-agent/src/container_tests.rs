//! Container executor tests against the real Docker engine, with a tiny
//! image built offline from this machine's own `sh` and coreutils.
//!
//! They fail when no engine is reachable, unless
//! `TESSERA_SKIP_DOCKER_TESTS=1` says to skip them.

use super::*;
use crate::{Agent, AgentConfig, ToAgent};
use std::sync::OnceLock;
use std::time::Instant;

/// The test image: `/bin/sh` (whatever the host's is) and a few programs.
const IMAGE: &str = "tessera-test-sh:1";
const PROGRAMS: &[&str] = &["sh", "sleep", "cat", "dd", "touch", "env", "true"];

/// Whether the tests can run; panics when they cannot and are not told to
/// skip.
async fn docker_ready() -> bool {
    if let Err(e) = connect().await {
        if std::env::var("TESSERA_SKIP_DOCKER_TESTS").as_deref() == Ok("1") {
            eprintln!("skipping: {e} (TESSERA_SKIP_DOCKER_TESTS=1)");
            return false;
        }
        panic!(
            "these tests need a Docker engine, and {e}. Start one, or set \
             TESSERA_SKIP_DOCKER_TESTS=1 to skip them."
        );
    }
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(e) = BUILT.get_or_init(build_image) {
        panic!("cannot build the test image {IMAGE}: {e}");
    }
    true
}

fn docker_cli(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run docker: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `docker import`s a root file system holding the host's `sh`, a few
/// programs and the libraries `ldd` names for them. Nothing is pulled.
fn build_image() -> Result<(), String> {
    if docker_cli(&["image", "inspect", IMAGE]).is_ok() {
        return Ok(());
    }
    let root = tempfile::tempdir().map_err(|e| e.to_string())?;
    let copy = |from: &Path, to: &str| -> Result<(), String> {
        let dest = root.path().join(to.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).map_err(|e| e.to_string())?;
        std::fs::copy(from, &dest).map_err(|e| format!("{}: {e}", from.display()))?;
        Ok(())
    };
    let mut libs = std::collections::BTreeSet::new();
    for program in PROGRAMS {
        let path = resolve_on_host(program)?;
        copy(&path, &format!("bin/{program}"))?;
        let ldd = std::process::Command::new("ldd")
            .arg(&path)
            .output()
            .map_err(|e| format!("cannot run ldd: {e}"))?;
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or
            // `/lib64/ld-linux-x86-64.so.2 (0x…)`.
            let lib = line
                .split("=>")
                .last()
                .and_then(|s| s.split_whitespace().next())
                .filter(|s| s.starts_with('/'));
            if let Some(lib) = lib {
                libs.insert(lib.to_string());
            }
        }
    }
    for lib in &libs {
        copy(Path::new(lib), lib)?;
    }
    let tar = root.path().with_extension("tar");
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(root.path())
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .map_err(|e| format!("cannot run tar: {e}"))?;
    if !status.success() {
        return Err("tar failed".into());
    }
    let dirs: std::collections::BTreeSet<String> = libs
        .iter()
        .filter_map(|l| Some(Path::new(l).parent()?.display().to_string()))
        .collect();
    let env = format!(
        "ENV PATH=/bin LD_LIBRARY_PATH={}",
        dirs.into_iter().collect::<Vec<_>>().join(":")
    );
    let result = docker_cli(&[
        "import",
        "--change",
        &env,
        "--change",
        r#"CMD ["/bin/sh", "-c", "echo image-default-command"]"#,
        tar.to_str().unwrap(),
        IMAGE,
    ]);
    let _ = std::fs::remove_file(&tar);
    result.map(|_| ())
}

fn resolve_on_host(program: &str) -> Result<PathBuf, String> {
    let path = crate::resolve_program(program, Some("/usr/bin:/bin"))?;
    std::fs::canonicalize(&path).map_err(|e| format!("{}: {e}", path.display()))
}

struct Harness {
    _dir: tempfile::TempDir,
    home: PathBuf,
    cmd: mpsc::UnboundedSender<ToAgent>,
    events: mpsc::UnboundedReceiver<FromAgent>,
}

impl Drop for Harness {
    /// A failing test leaves no container behind.
    fn drop(&mut self) {
        reap(&self.home);
    }
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().to_path_buf();
    let mut config = AgentConfig::new(&home);
    config.kill_grace = Duration::from_millis(300);
    config.cgroups = false;
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

fn key(job: u64) -> ReplicaKey {
    ReplicaKey {
        job_id: job,
        attempt: 1,
        replica: 0,
    }
}

fn start(job: u64, argv: &[&str]) -> StartReplica {
    StartReplica {
        key: key(job),
        num_replicas: 1,
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![("GREETING".into(), "hello".into())],
        workdir: None,
        gpus: vec![],
        cpu_milli: 500,
        memory_bytes: 256 << 20,
        max_runtime_ms: None,
        image: Some(IMAGE.into()),
        inputs: Vec::new(),
        outputs: Vec::new(),
    }
}

impl Harness {
    async fn next(&mut self) -> FromAgent {
        next_event(&mut self.events).await
    }

    async fn started(&mut self, job: u64) -> u32 {
        loop {
            match self.next().await {
                FromAgent::Started { key, pid, .. } if key.job_id == job => return pid,
                FromAgent::Exited { key, cause, .. } if key.job_id == job => {
                    panic!(
                        "{job} ended before it started: {cause:?}: {}",
                        self.log(job)
                    )
                }
                _ => {}
            }
        }
    }

    async fn exit_of(&mut self, job: u64) -> (Option<i32>, ExitCause) {
        exit_of(&mut self.events, job).await
    }

    fn log(&self, job: u64) -> String {
        std::fs::read_to_string(log_path(&self.home, key(job))).unwrap_or_default()
    }

    fn stop(&self, job: u64, grace_ms: u64) {
        self.cmd
            .send(ToAgent::Stop {
                key: key(job),
                grace_ms,
                reason: "cancel".into(),
            })
            .unwrap();
    }
}

async fn next_event(events: &mut mpsc::UnboundedReceiver<FromAgent>) -> FromAgent {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .expect("agent event in time")
            .expect("agent alive");
        if !matches!(event, FromAgent::Heartbeat { .. }) {
            return event;
        }
    }
}

async fn exit_of(
    events: &mut mpsc::UnboundedReceiver<FromAgent>,
    job: u64,
) -> (Option<i32>, ExitCause) {
    loop {
        if let FromAgent::Exited {
            key, code, cause, ..
        } = next_event(events).await
        {
            if key.job_id == job {
                return (code, cause);
            }
        }
    }
}

/// Containers of `home`, whatever their state, as the engine lists them.
fn containers_of(home: &Path) -> Vec<String> {
    docker_cli(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label={LABEL_HOME}={}", home_label(home)),
    ])
    .unwrap()
    .split_whitespace()
    .map(str::to_string)
    .collect()
}

#[tokio::test]
async fn runs_with_env_logs_workdir_and_exit_code() {
    if !docker_ready().await {
        return;
    }
    let mut h = harness();
    let script = "echo out $GREETING $TESSERA_JOB_ID $TESSERA_REPLICA $TESSERA_NUM_REPLICAS \
                  $TESSERA_ATTEMPT [$CUDA_VISIBLE_DEVICES] $(pwd); echo err >&2; \
                  echo made-inside > made.txt; exit 3";
    h.cmd
        .send(ToAgent::Start(start(1, &["/bin/sh", "-c", script])))
        .unwrap();
    h.started(1).await;
    let (code, cause) = h.exit_of(1).await;
    assert_eq!((code, cause), (Some(3), ExitCause::Exited), "{}", h.log(1));
    let workdir = std::fs::canonicalize(h.home.join("work").join("1.1.0")).unwrap();
    let log = h.log(1);
    assert!(
        log.contains(&format!("out hello 1 0 1 1 [] {}", workdir.display())),
        "{log}"
    );
    assert!(log.contains("err"), "stderr goes to the log too: {log}");
    assert_eq!(
        std::fs::read_to_string(workdir.join("made.txt")).unwrap(),
        "made-inside\n",
        "the working directory is the host's"
    );
    assert!(
        containers_of(&h.home).is_empty(),
        "the container is removed"
    );
}

#[tokio::test]
async fn without_a_command_the_image_default_runs() {
    if !docker_ready().await {
        return;
    }
    let mut h = harness();
    h.cmd.send(ToAgent::Start(start(2, &[]))).unwrap();
    assert_eq!(h.exit_of(2).await, (Some(0), ExitCause::Exited));
    assert!(h.log(2).contains("image-default-command"), "{}", h.log(2));
}

#[tokio::test]
async fn gpus_are_renumbered_inside_the_container() {
    if !docker_ready().await {
        return;
    }
    let body = create_body(
        Path::new("/tmp/h"),
        &StartReplica {
            gpus: vec![1, 3],
            max_runtime_ms: Some(1000),
            ..start(3, &["python3", "train.py"])
        },
        "/tmp/h/work/3.1.0",
    );
    let env = body.env.unwrap();
    assert!(
        env.contains(&"CUDA_VISIBLE_DEVICES=0,1".to_string()),
        "{env:?}"
    );
    assert!(env.contains(&"GREETING=hello".to_string()));
    let host = body.host_config.unwrap();
    let req = &host.device_requests.unwrap()[0];
    assert_eq!(req.driver.as_deref(), Some("nvidia"));
    assert_eq!(req.device_ids, Some(vec!["1".into(), "3".into()]));
    assert_eq!(host.nano_cpus, Some(500_000_000));
    assert_eq!(host.memory, Some(256 << 20));
    assert_eq!(host.binds.unwrap(), ["/tmp/h/work/3.1.0:/tmp/h/work/3.1.0"]);
    assert_eq!(body.entrypoint.unwrap(), ["python3"]);
    assert_eq!(body.cmd.unwrap(), ["train.py"]);
    assert!(body.labels.unwrap().contains_key(LABEL_DEADLINE));
    // No GPUs: no device request, so no GPU runtime is needed.
    let body = create_body(Path::new("/tmp/h"), &start(3, &["x"]), "/tmp/h");
    assert!(body.host_config.unwrap().device_requests.is_none());
}

#[tokio::test]
async fn stop_sends_term_then_kills_after_the_grace() {
    if !docker_ready().await {
        return;
    }
    let mut h = harness();
    let polite = "trap 'echo got-term; exit 0' TERM; while true; do sleep 0.05; done";
    h.cmd
        .send(ToAgent::Start(start(4, &["/bin/sh", "-c", polite])))
        .unwrap();
    assert!(
        h.started(4).await > 0,
        "Started carries the container's pid"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.stop(4, 5000);
    assert_eq!(h.exit_of(4).await, (Some(0), ExitCause::Stopped));
    assert!(h.log(4).contains("got-term"), "{}", h.log(4));

    let stubborn = "trap '' TERM; echo ready; while true; do sleep 0.05; done";
    h.cmd
        .send(ToAgent::Start(start(5, &["/bin/sh", "-c", stubborn])))
        .unwrap();
    h.started(5).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let began = Instant::now();
    h.stop(5, 300);
    let (code, cause) = h.exit_of(5).await;
    assert_eq!(cause, ExitCause::Stopped);
    assert_eq!(code, Some(137), "killed after the grace period");
    assert!(began.elapsed() >= Duration::from_millis(300));
    assert!(began.elapsed() < Duration::from_secs(5));
    assert!(containers_of(&h.home).is_empty());
}

#[tokio::test]
async fn max_runtime_times_out() {
    if !docker_ready().await {
        return;
    }
    let mut h = harness();
    let mut s = start(6, &["sleep", "30"]);
    s.max_runtime_ms = Some(300);
    let began = Instant::now();
    h.cmd.send(ToAgent::Start(s)).unwrap();
    let (code, cause) = h.exit_of(6).await;
    assert_eq!(cause, ExitCause::TimedOut);
    assert!(code.is_some_and(|c| c != 0), "{code:?}");
    assert!(began.elapsed() < Duration::from_secs(10));
    assert!(containers_of(&h.home).is_empty());
}

#[tokio::test]
async fn memory_limit_ends_in_out_of_memory() {
    if !docker_ready().await {
        return;
    }
    let mut h = harness();
    // 64 MiB limit; `dd` wants a 256 MiB buffer and touches all of it.
    let mut s = start(
        7,
        &[
            "/bin/sh",
            "-c",
            "dd if=/dev/zero of=/dev/null bs=256M count=1 && echo survived",
        ],
    );
    s.memory_bytes = 64 << 20;
    h.cmd.send(ToAgent::Start(s)).unwrap();
    let (code, cause) = h.exit_of(7).await;
    if h.log(7).contains("survived") {
        let enforced = docker_cli(&["info", "--format", "{{.MemoryLimit}}"]).unwrap_or_default();
        assert_eq!(enforced.trim(), "false", "the limit was not enforced");
        eprintln!("skipping: this engine does not enforce memory limits");
        return;
    }
    assert_eq!(cause, ExitCause::OutOfMemory, "{code:?}: {}", h.log(7));
    assert_eq!(code, Some(137));
}

#[tokio::test]
async fn a_missing_image_is_a_spawn_failure_naming_it() {
    if !docker_ready().await {
        return;
    }
    let mut h = harness();
    let mut s = start(8, &["true"]);
    s.image = Some("tessera-no-such-image:0".into());
    h.cmd.send(ToAgent::Start(s)).unwrap();
    match h.exit_of(8).await {
        (None, ExitCause::SpawnFailed(msg)) => {
            assert!(
                msg.contains("image `tessera-no-such-image:0` is not present on this node"),
                "{msg}"
            );
            assert!(h.log(8).contains(&msg), "{}", h.log(8));
        }
        other => panic!("{other:?}"),
    }
    assert!(containers_of(&h.home).is_empty());
}

/// Removes a home's containers when dropped, so a failing test leaves none.
struct Reaper<'a>(&'a Path);

impl Drop for Reaper<'_> {
    fn drop(&mut self) {
        reap(self.0);
    }
}

/// Starts a container for `home` the way the executor does, but leaves it
/// unwatched, as an agent that died would.
async fn orphan(home: &Path, s: &StartReplica) -> String {
    let docker = connect().await.unwrap();
    launch(&docker, home, s).await.unwrap().0
}

#[tokio::test]
async fn adopted_containers_are_watched_to_their_end() {
    if !docker_ready().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let other = tempfile::tempdir().unwrap();
    let _reapers = (Reaper(home), Reaper(other.path()));
    let script = "echo before; touch said-before; \
                  while [ ! -e go ]; do sleep 0.05; done; echo after; exit 4";
    let id = orphan(home, &start(9, &["/bin/sh", "-c", script])).await;
    let stranger = orphan(other.path(), &start(9, &["sleep", "30"])).await;
    // The earlier agent had copied the first line before it died.
    let workdir = home.join("work").join("9.1.0");
    while !workdir.join("said-before").exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::write(log_path(home, key(9)), "before\n").unwrap();

    let found = running_containers(home).await;
    assert_eq!(found, vec![(key(9), id.clone())], "only this home's");
    let (events, mut rx) = mpsc::unbounded_channel();
    let (_stop, stop_rx) = oneshot::channel();
    tokio::spawn(adopt(
        home.to_path_buf(),
        Duration::from_millis(300),
        key(9),
        id,
        stop_rx,
        events,
    ));
    std::fs::write(workdir.join("go"), "").unwrap();
    assert_eq!(exit_of(&mut rx, 9).await, (Some(4), ExitCause::Exited));
    assert_eq!(
        std::fs::read_to_string(log_path(home, key(9))).unwrap(),
        "before\nafter\n",
        "output is neither lost nor copied twice"
    );
    assert!(containers_of(home).is_empty());
    assert!(running_containers(home).await.is_empty());

    // A stop request reaches an adopted container.
    let id = orphan(home, &start(10, &["sleep", "30"])).await;
    let (events, mut rx) = mpsc::unbounded_channel();
    let (stop, stop_rx) = oneshot::channel();
    tokio::spawn(adopt(
        home.to_path_buf(),
        Duration::from_millis(300),
        key(10),
        id,
        stop_rx,
        events,
    ));
    stop.send((200, "cancel".into())).unwrap();
    let (_, cause) = exit_of(&mut rx, 10).await;
    assert_eq!(cause, ExitCause::Stopped);

    // One that ended while no agent watched it is reported with its code.
    let id = orphan(home, &start(11, &["/bin/sh", "-c", "exit 7"])).await;
    let docker = connect().await.unwrap();
    assert_eq!(wait_exit(&docker, &id).await, Some(7));
    assert_eq!(running_containers(home).await, vec![(key(11), id.clone())]);
    assert_eq!(
        running_containers_blocking(home),
        vec![(key(11), id.clone())]
    );
    let (events, mut rx) = mpsc::unbounded_channel();
    let (_stop, stop_rx) = oneshot::channel();
    adopt(
        home.to_path_buf(),
        Duration::ZERO,
        key(11),
        id,
        stop_rx,
        events,
    )
    .await;
    assert_eq!(exit_of(&mut rx, 11).await, (Some(7), ExitCause::Exited));

    // An adopted container keeps its max_runtime deadline.
    let mut s = start(12, &["sleep", "30"]);
    s.max_runtime_ms = Some(500);
    let id = orphan(home, &s).await;
    let (events, mut rx) = mpsc::unbounded_channel();
    let (_stop, stop_rx) = oneshot::channel();
    let began = Instant::now();
    tokio::spawn(adopt(
        home.to_path_buf(),
        Duration::from_millis(200),
        key(12),
        id,
        stop_rx,
        events,
    ));
    assert_eq!(exit_of(&mut rx, 12).await.1, ExitCause::TimedOut);
    assert!(began.elapsed() < Duration::from_secs(5));

    assert!(containers_of(home).is_empty());
    assert_eq!(containers_of(other.path()), [stranger[..12].to_string()]);
}

#[tokio::test]
async fn reaping_removes_this_homes_containers_only() {
    if !docker_ready().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let _reapers = (Reaper(dir.path()), Reaper(other.path()));
    orphan(dir.path(), &start(13, &["sleep", "30"])).await;
    orphan(dir.path(), &start(14, &["/bin/sh", "-c", "exit 0"])).await;
    orphan(other.path(), &start(13, &["sleep", "30"])).await;
    let mut reaped = crate::reap_orphans(dir.path(), &crate::Cgroups::disabled("test"));
    reaped.sort();
    assert_eq!(reaped, [key(13), key(14)]);
    assert!(containers_of(dir.path()).is_empty());
    assert_eq!(containers_of(other.path()).len(), 1, "another home's stays");
    assert_eq!(reap(other.path()), [key(13)]);
    assert!(containers_of(other.path()).is_empty());
}

#[test]
fn docker_timestamps_parse() {
    assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
    assert_eq!(
        parse_rfc3339("2024-02-29T12:34:56.5Z"),
        Some(1_709_210_096_500_000_000)
    );
    assert_eq!(
        parse_rfc3339("2026-11-27T05:46:17.123456789Z"),
        Some(1_795_758_377_123_456_789)
    );
    assert_eq!(parse_rfc3339("2024-02-29 12:34:56Z"), None);
    assert_eq!(parse_rfc3339("garbage"), None);
}

#[test]
fn names_and_references() {
    let a = container_name(Path::new("/tmp/a"), key(1));
    assert!(a.starts_with("tessera-1.1.0-"), "{a}");
    assert_ne!(a, container_name(Path::new("/tmp/b"), key(1)));
    assert_eq!(pull_reference("python"), "python:latest");
    assert_eq!(pull_reference("python:3.12"), "python:3.12");
    assert_eq!(
        pull_reference("localhost:5000/app"),
        "localhost:5000/app:latest"
    );
    assert_eq!(pull_reference("app@sha256:ab"), "app@sha256:ab");
}
