//! Failure tests of a real fleet: `tessera server` and several `tessera
//! agent`s, each in its own Docker container on a private Docker network,
//! driven from outside the way an operator would — `docker kill`, `docker
//! network disconnect`, `kill -9` — and checked from outside: the jobs'
//! events through the CLI, and the run interval of every copy of every job,
//! which the jobs themselves record in a directory shared by all agents.
//!
//! No image is pulled: the tests import a tiny base image (empty directories
//! and the host's symlinks) and bind-mount the host's `/usr` (and `/lib*`
//! where they are not symlinks) read-only, with the `tessera` binary under
//! test. Every container and network name carries a random suffix, and a
//! guard removes them all, even when a test fails. Should the test process
//! itself be killed, its containers end by themselves within 15 minutes,
//! and `docker network prune --filter label=tessera-fleet-test` removes its
//! networks.
//!
//! These tests need Docker; without it they fail and say so.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_tessera");
const IMAGE: &str = "tessera-fleet-base:test";
/// Short leases, so that node loss takes seconds: agents stop their work
/// 4 s after they last heard from the server; the server declares a node
/// lost 6 s after it last heard from it.
const SERVER_FLAGS: &str = "--heartbeat 500ms --node-lease 6s --kill-grace 500ms";

// ---------- docker ----------

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `docker` ({e}): the fleet tests need Docker (a daemon this user may use)"
            )
        })
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "`docker {}` failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Top-level directories of the host that the containers need: each is
/// either a symlink (recreated in the image) or a directory (bind-mounted
/// read-only).
const HOST_DIRS: &[&str] = &["usr", "bin", "lib", "lib32", "lib64", "libx32"];
/// Single files of the host's /etc that the binaries may read.
const HOST_ETC: &[&str] = &["ld.so.cache", "passwd", "group", "nsswitch.conf"];

/// Makes sure Docker answers and the base image exists (once per process).
fn base_image() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        let info = Command::new("docker")
            .args(["info", "--format", "{{.ServerVersion}}"])
            .stdin(Stdio::null())
            .output();
        match info {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "the fleet tests need Docker, and `docker info` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => panic!("the fleet tests need Docker, and `docker` cannot be run: {e}"),
        }
        if docker(&["image", "inspect", IMAGE]).status.success() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        for d in [
            "etc",
            "proc",
            "sys",
            "dev",
            "data",
            "shared",
            "opt/tessera",
            "sbin",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
        for d in HOST_DIRS {
            let host = Path::new("/").join(d);
            match std::fs::symlink_metadata(&host) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(&host).unwrap();
                    std::os::unix::fs::symlink(target, root.join(d)).unwrap();
                }
                Ok(m) if m.is_dir() => std::fs::create_dir_all(root.join(d)).unwrap(),
                _ => {}
            }
        }
        let tar = dir.path().join("base.tar");
        let ok = Command::new("tar")
            .arg("--numeric-owner")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .expect("run tar");
        assert!(ok.success(), "tar failed");
        docker_ok(&["import", tar.to_str().unwrap(), IMAGE]);
    });
}

fn unique() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{:05x}{:04x}{}",
        nanos >> 12,
        std::process::id() & 0xffff,
        N.fetch_add(1, Ordering::SeqCst)
    )
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------- the fleet ----------

/// A server and agents in containers on their own network; removed on drop.
struct Fleet {
    tag: String,
    net: String,
    dir: tempfile::TempDir,
    containers: Vec<String>,
    url: String,
    token: String,
    join_token: String,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for name in
                std::iter::once("server").chain(self.agent_names().iter().map(|s| s.as_str()))
            {
                for log in ["server.log", "agent.log"] {
                    let path = self.dir.path().join(name).join(log);
                    if let Ok(text) = std::fs::read_to_string(&path) {
                        let tail: Vec<&str> = text.lines().rev().take(40).collect();
                        eprintln!("---- {name}/{log} (last lines) ----");
                        for l in tail.iter().rev() {
                            eprintln!("{l}");
                        }
                    }
                }
            }
        }
        if !self.containers.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(self.containers.iter().map(|s| s.as_str()));
            let _ = docker(&args);
        }
        let _ = docker(&["network", "rm", &self.net]);
    }
}

impl Fleet {
    /// Starts a server and the named agents, and waits until every agent's
    /// node is ready.
    fn start(agents: &[&str]) -> Fleet {
        base_image();
        let tag = format!("tessera-test-{}", unique());
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("shared")).unwrap();
        std::fs::create_dir_all(dir.path().join("cli")).unwrap();
        docker_ok(&["network", "create", "--label", "tessera-fleet-test", &tag]);
        let mut fleet = Fleet {
            net: tag.clone(),
            tag,
            dir,
            containers: Vec::new(),
            url: String::new(),
            token: String::new(),
            join_token: String::new(),
        };
        fleet.container("server", true);
        fleet.start_server();
        let port = docker_ok(&["port", &fleet.cname("server"), "7700/tcp"]);
        let port = port
            .lines()
            .next()
            .expect("a published port")
            .trim()
            .to_string();
        fleet.url = format!("http://{port}");
        fleet.token = std::fs::read_to_string(fleet.home("server").join("admin.token"))
            .expect("admin token")
            .trim()
            .to_string();
        wait_for(Duration::from_secs(20), "the server to answer", || {
            fleet.try_cli(&["nodes"]).ok()
        });
        let created = fleet.cli(&["join-token", "create", "--uses", "100"]);
        fleet.join_token = created["token"].as_str().expect("a join token").to_string();
        for a in agents {
            fleet.container(a, false);
            fleet.start_agent(a);
        }
        for a in agents {
            fleet.wait_node_ready(a);
        }
        fleet
    }

    fn cname(&self, name: &str) -> String {
        format!("{}-{name}", self.tag)
    }

    fn home(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn shared(&self) -> PathBuf {
        self.dir.path().join("shared")
    }

    fn agent_names(&self) -> Vec<String> {
        let prefix = format!("{}-", self.tag);
        self.containers
            .iter()
            .filter_map(|c| c.strip_prefix(&prefix))
            .filter(|n| *n != "server")
            .map(|n| n.to_string())
            .collect()
    }

    /// A container that idles under `docker-init` (which reaps orphans), so
    /// processes started in it with `docker exec` can die without taking the
    /// container (and their children) with them. It removes itself when
    /// stopped, and stops by itself after 15 minutes.
    fn container(&mut self, name: &str, publish: bool) {
        let home = self.home(name);
        std::fs::create_dir_all(&home).unwrap();
        let meta = std::fs::metadata(&home).unwrap();
        let user = format!("{}:{}", meta.uid(), meta.gid());
        let bin = std::fs::canonicalize(BIN).unwrap();
        let cname = self.cname(name);
        let mut args: Vec<String> = [
            "run",
            "-d",
            "--rm",
            "--init",
            "--label",
            "tessera-fleet-test",
            "--name",
            &cname,
            "--hostname",
            name,
            "--network",
            &self.net,
            "--user",
            &user,
            "-e",
            "TESSERA_HOME=/data",
            "-e",
            "RUST_LOG=info",
            "-e",
            "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut mount = |host: &Path, inside: &str, mode: &str| {
            args.push("-v".into());
            args.push(format!("{}:{inside}:{mode}", host.display()));
        };
        for d in HOST_DIRS {
            let host = Path::new("/").join(d);
            if std::fs::symlink_metadata(&host).is_ok_and(|m| m.is_dir()) {
                mount(&host, &format!("/{d}"), "ro");
            }
        }
        for f in HOST_ETC {
            let host = Path::new("/etc").join(f);
            if host.is_file() {
                mount(&host, &format!("/etc/{f}"), "ro");
            }
        }
        mount(&bin, "/opt/tessera/tessera", "ro");
        mount(&home, "/data", "rw");
        mount(&self.shared(), "/shared", "rw");
        if publish {
            args.push("-p".into());
            args.push("127.0.0.1::7700".into());
        }
        args.push(IMAGE.into());
        args.extend(["/bin/sh", "-c", "exec sleep 900"].map(String::from));
        let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        self.containers.push(cname);
        docker_ok(&argv);
    }

    /// Starts `tessera ROLE ...` in the container `name` in the background,
    /// its pid in `/data/ROLE.pid`, its output in `/data/ROLE.log`.
    fn spawn(&self, name: &str, role: &str, args: &str) {
        let script = format!(
            "echo $$ > /data/{role}.pid; exec /opt/tessera/tessera {role} {args} >> /data/{role}.log 2>&1"
        );
        docker_ok(&["exec", "-d", &self.cname(name), "/bin/sh", "-c", &script]);
    }

    fn start_server(&self) {
        let home = self.home("server");
        let _ = std::fs::remove_file(home.join("config"));
        let _ = std::fs::remove_file(home.join("server.pid"));
        self.spawn(
            "server",
            "server",
            &format!("--listen 0.0.0.0:7700 {SERVER_FLAGS}"),
        );
        wait_for(Duration::from_secs(20), "the server to start", || {
            home.join("config").exists().then_some(())
        });
    }

    fn start_agent(&self, name: &str) {
        let _ = std::fs::remove_file(self.home(name).join("agent.pid"));
        self.spawn(
            name,
            "agent",
            &format!(
                "--server http://{}:7700 --join-token {} --name {name} --no-cgroups --kill-grace 500ms",
                self.cname("server"),
                self.join_token
            ),
        );
    }

    /// `kill -9` of the server or agent process in container `name`; returns
    /// once the process is gone.
    fn kill9(&self, name: &str, role: &str) {
        let pidfile = self.home(name).join(format!("{role}.pid"));
        let pid = wait_for(Duration::from_secs(10), "a pid file", || {
            std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
        });
        let script = format!(
            "kill -9 {pid}; while [ -e /proc/{pid} ] && ! grep -q '^State:[[:space:]]*Z' /proc/{pid}/status 2>/dev/null; do sleep 0.05; done"
        );
        docker_ok(&["exec", &self.cname(name), "/bin/sh", "-c", &script]);
    }

    /// `docker kill` of a whole container; returns the time by which every
    /// process in it was dead.
    fn kill_container(&self, name: &str) -> u128 {
        let c = self.cname(name);
        docker_ok(&["kill", &c]);
        wait_for(Duration::from_secs(20), "the container to stop", || {
            // It removes itself once stopped.
            let out = docker(&["inspect", "-f", "{{.State.Running}}", &c]);
            let running =
                out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "true";
            (!running).then_some(())
        });
        now_ns()
    }

    fn try_cli(&self, args: &[&str]) -> Result<Value, String> {
        let out = Command::new(BIN)
            .args(args)
            .args(["-o", "json"])
            .env("TESSERA_URL", &self.url)
            .env("TESSERA_TOKEN", &self.token)
            .env("TESSERA_HOME", self.dir.path().join("cli"))
            .stdin(Stdio::null())
            .output()
            .expect("run the tessera CLI");
        if !out.status.success() {
            return Err(format!(
                "tessera {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("tessera {}: {e}", args.join(" ")))
    }

    fn cli(&self, args: &[&str]) -> Value {
        self.try_cli(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Submits a job that records its run interval under /shared: it sleeps
    /// `first` seconds on its first attempt and `later` on the others, and
    /// records SIGTERM too.
    fn submit(&self, name: &str, first: f64, later: f64) -> u64 {
        let script = format!(
            r#"f=/shared/$TESSERA_JOB_ID.$TESSERA_ATTEMPT.$TESSERA_REPLICA.$(cat /etc/hostname)
trap 'echo "term $(date +%s%N)" >> "$f"; exit 143' TERM
echo "start $(date +%s%N)" >> "$f"
if [ "$TESSERA_ATTEMPT" = 1 ]; then s={first}; else s={later}; fi
sleep $s & wait $!
echo "end $(date +%s%N)" >> "$f"
"#
        );
        let spec = serde_json::json!({
            "name": name,
            "script": script,
            "resources": {"cpu": "0.1", "memory": "16Mi"},
            "retries": {"on_failure": 0, "on_node_loss": 3},
        });
        let path = self.dir.path().join(format!("{name}.json"));
        std::fs::write(&path, spec.to_string()).unwrap();
        let job = self.cli(&["submit", path.to_str().unwrap()]);
        job["id"].as_u64().expect("a job id")
    }

    /// `{job, events}`, retried while the server does not answer.
    fn job(&self, id: u64) -> Value {
        let id = id.to_string();
        wait_for(Duration::from_secs(30), "the server to answer", || {
            self.try_cli(&["job", &id]).ok()
        })
    }

    fn wait_state(&self, id: u64, states: &[&str], timeout: Duration) -> Value {
        wait_for(timeout, &format!("job {id} to be {states:?}"), || {
            let j = self.job(id);
            states
                .contains(&j["job"]["state"].as_str().unwrap_or(""))
                .then_some(j)
        })
    }

    fn wait_terminal(&self, id: u64, timeout: Duration) -> Value {
        self.wait_state(id, &["succeeded", "failed", "cancelled", "lost"], timeout)
    }

    /// Waits until attempt `attempt` of job `id` has recorded its start;
    /// returns the node it runs on.
    fn wait_copy_started(&self, id: u64, attempt: u32) -> String {
        let prefix = format!("{id}.{attempt}.0.");
        wait_for(
            Duration::from_secs(30),
            &format!("job {id} attempt {attempt} to start"),
            || {
                std::fs::read_dir(self.shared())
                    .ok()?
                    .flatten()
                    .find_map(|e| {
                        let n = e.file_name().to_string_lossy().to_string();
                        n.strip_prefix(&prefix).map(|h| h.to_string())
                    })
            },
        )
    }

    fn node_state(&self, name: &str) -> Option<String> {
        let nodes = self.try_cli(&["nodes"]).ok()?;
        nodes.as_array()?.iter().find_map(|n| {
            let this = n["name"]
                .as_str()
                .or_else(|| n["inventory"]["name"].as_str())?;
            (this == name).then(|| n["state"].as_str().unwrap_or("").to_string())
        })
    }

    fn wait_node_ready(&self, name: &str) {
        wait_for(
            Duration::from_secs(30),
            &format!("node {name} to be ready"),
            || (self.node_state(name).as_deref() == Some("ready")).then_some(()),
        );
    }
}

// ---------- what the jobs recorded ----------

/// One copy of a job: one attempt of one replica on one host.
#[derive(Debug, Clone)]
struct Copy {
    attempt: u32,
    host: String,
    start: u128,
    /// When it ended, by its own record: `end` or `term`.
    end: Option<(u128, String)>,
}

/// Every copy of every job, by job id.
fn copies(shared: &Path) -> BTreeMap<u64, Vec<Copy>> {
    let mut out: BTreeMap<u64, Vec<Copy>> = BTreeMap::new();
    for e in std::fs::read_dir(shared).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let mut parts = name.splitn(4, '.');
        let (Some(job), Some(attempt), Some(_replica), Some(host)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (Ok(job), Ok(attempt)) = (job.parse::<u64>(), attempt.parse::<u32>()) else {
            continue;
        };
        let text = std::fs::read_to_string(e.path()).unwrap();
        let mut start = Vec::new();
        let mut end = None;
        for line in text.lines() {
            let (what, t) = line.split_once(' ').expect("`what time` lines");
            let t: u128 = t.trim().parse().expect("a time in ns");
            match what {
                "start" => start.push(t),
                "end" | "term" => {
                    assert!(end.is_none(), "{name}: two ends recorded:\n{text}");
                    end = Some((t, what.to_string()));
                }
                other => panic!("{name}: unexpected record `{other}`"),
            }
        }
        assert_eq!(
            start.len(),
            1,
            "{name}: one copy ran more than once:\n{text}"
        );
        out.entry(job).or_default().push(Copy {
            attempt,
            host: host.to_string(),
            start: start[0],
            end,
        });
    }
    for v in out.values_mut() {
        v.sort_by_key(|c| c.start);
    }
    out
}

/// Checks that no two copies of the same job ran at the same time. A copy
/// that recorded no end counts as running until its container was killed
/// (`killed`: host → when every process in it was dead); a copy with
/// neither is an error, since nothing shows it stopped.
fn assert_no_overlap(all: &BTreeMap<u64, Vec<Copy>>, killed: &[(&str, u128)]) {
    for (job, copies) in all {
        let intervals: Vec<(u128, u128, &Copy)> = copies
            .iter()
            .map(|c| {
                let end = match &c.end {
                    Some((t, _)) => *t,
                    None => killed
                        .iter()
                        .filter(|(h, t)| *h == c.host && *t >= c.start)
                        .map(|(_, t)| *t)
                        .min()
                        .unwrap_or_else(|| {
                            panic!("job {job}: copy {c:?} recorded no end and its container was not killed")
                        }),
                };
                (c.start, end, c)
            })
            .collect();
        for w in copies.windows(2) {
            assert!(
                w[0].attempt < w[1].attempt,
                "job {job}: a later copy carries no later attempt: {copies:?}"
            );
        }
        for (i, a) in intervals.iter().enumerate() {
            for b in &intervals[i + 1..] {
                assert!(
                    a.1 < b.0 || b.1 < a.0,
                    "job {job}: two copies overlap: {:?} and {:?}",
                    a.2,
                    b.2
                );
            }
        }
    }
}

fn kinds(job: &Value) -> Vec<String> {
    job["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The job reached exactly one terminal state, `succeeded`, and nothing
/// happened to it after that.
fn assert_succeeded_once(job: &Value) {
    let id = &job["job"]["id"];
    assert_eq!(job["job"]["state"], "succeeded", "job {id}: {job:#}");
    let k = kinds(job);
    let terminal: Vec<usize> = k
        .iter()
        .enumerate()
        .filter(|(_, k)| matches!(k.as_str(), "succeeded" | "failed" | "cancelled"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(terminal.len(), 1, "job {id} ended more than once: {k:?}");
    assert_eq!(k[terminal[0]], "succeeded", "job {id}: {k:?}");
    let after: Vec<&String> = k[terminal[0] + 1..]
        .iter()
        .filter(|k| matches!(k.as_str(), "scheduled" | "started" | "requeued" | "lost"))
        .collect();
    assert!(
        after.is_empty(),
        "job {id} went on after it succeeded: {k:?}"
    );
}

fn event_time(job: &Value, kind: &str) -> Option<u64> {
    job["events"]
        .as_array()?
        .iter()
        .find(|e| e["kind"] == kind)
        .and_then(|e| e["time"].as_u64())
}

// ---------- the tests ----------

/// `docker kill` of the agent's container while the job runs: the node is
/// declared lost, the job runs again on the other agent, after the first
/// copy was dead, and succeeds exactly once.
#[test]
fn agent_container_killed_mid_job() {
    let fleet = Fleet::start(&["a1", "a2"]);
    let id = fleet.submit("killed", 3.0, 3.0);
    let first = fleet.wait_copy_started(id, 1);
    std::thread::sleep(Duration::from_millis(800));
    let killed_at = fleet.kill_container(&first);
    let job = fleet.wait_terminal(id, Duration::from_secs(45));
    assert_succeeded_once(&job);
    assert_eq!(job["job"]["attempt"], 2, "{job:#}");
    assert!(kinds(&job).contains(&"lost".to_string()), "{job:#}");
    let all = copies(&fleet.shared());
    let mine = &all[&id];
    assert_eq!(mine.len(), 2, "{mine:?}");
    assert_eq!(mine[0].host, first);
    assert!(
        mine[0].end.is_none(),
        "the killed copy recorded an end: {mine:?}"
    );
    assert_ne!(mine[1].host, first, "{mine:?}");
    assert_eq!(
        mine[1].end.as_ref().map(|e| e.1.as_str()),
        Some("end"),
        "{mine:?}"
    );
    assert_no_overlap(&all, &[(first.as_str(), killed_at)]);
}

/// The agent's container is cut off the network while the job runs: the
/// agent stops its copy when its lease runs out, and only after that does
/// the server declare the node lost and run the job elsewhere. Reconnected,
/// the agent's stale report is refused and its node is ready again; the job
/// ends once.
#[test]
fn agent_cut_off_mid_job() {
    cut_off_mid_job(None);
}

/// As above, but the cut comes when the server has not heard from the
/// agent for a while (the agent's last report is 4.45-4.75 s old, though the
/// server pings it every 500 ms): the server's lease on the node runs from
/// that last report, so the agent must report often enough for its own,
/// shorter lease to run out first. Where the agent reports more often than
/// that, the cut comes after 10 s and the test is the one above.
#[test]
fn agent_cut_off_long_after_its_last_report() {
    cut_off_mid_job(Some((4450, 4750)));
}

/// Cuts off the agent running a job: 800 ms after the job started, or, with
/// `quiet`, once the server has not heard from the node for a time in that
/// window (in ms; at most 10 s after the start).
fn cut_off_mid_job(quiet: Option<(u64, u64)>) {
    let fleet = Fleet::start(&["a1", "a2"]);
    let id = fleet.submit("cut", 30.0, 2.0);
    let first = fleet.wait_copy_started(id, 1);
    match quiet {
        None => std::thread::sleep(Duration::from_millis(800)),
        Some((from, to)) => {
            let give_up = Instant::now() + Duration::from_secs(10);
            while Instant::now() < give_up {
                let nodes = fleet.cli(&["nodes"]);
                let last = nodes
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|n| n["name"] == first.as_str())
                    .and_then(|n| n["last_heartbeat"].as_u64())
                    .expect("the node's last heartbeat");
                let silent = (now_ns() / 1_000_000) as u64 - last;
                if (from..to).contains(&silent) {
                    eprintln!("cutting {first} off {silent} ms after its last report");
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    docker_ok(&["network", "disconnect", &fleet.net, &fleet.cname(&first)]);
    let cut_at = now_ns();
    let second = fleet.wait_copy_started(id, 2);
    assert_ne!(second, first);
    let requeued = fleet.job(id);
    docker_ok(&["network", "connect", &fleet.net, &fleet.cname(&first)]);
    let job = fleet.wait_terminal(id, Duration::from_secs(30));
    assert_succeeded_once(&job);
    assert_eq!(job["job"]["attempt"], 2, "{job:#}");

    let all = copies(&fleet.shared());
    let mine = &all[&id];
    assert_eq!(mine.len(), 2, "{mine:?}");
    let (stopped, how) = mine[0]
        .end
        .clone()
        .expect("the cut-off copy recorded its stop");
    assert_eq!(how, "term", "the cut-off copy was not stopped: {mine:?}");
    assert!(stopped > cut_at, "{mine:?}");
    // The server requeued only after the cut-off copy had stopped.
    let lost_ms = event_time(&requeued, "requeued").expect("a requeued event") as u128;
    assert!(
        lost_ms * 1_000_000 >= stopped,
        "requeued at {lost_ms} ms, before the cut-off copy stopped at {} ms: {requeued:#}",
        stopped / 1_000_000
    );
    eprintln!(
        "cut-off copy stopped {} ms after the cut; job requeued {} ms after the cut",
        (stopped - cut_at) / 1_000_000,
        (lost_ms * 1_000_000).saturating_sub(cut_at) / 1_000_000
    );
    assert_no_overlap(&all, &[]);

    // Reconnected: the node comes back, and its report about the old
    // attempt is refused.
    fleet.wait_node_ready(&first);
    let job = wait_for(Duration::from_secs(15), "a refused stale report", || {
        let j = fleet.job(id);
        kinds(&j).contains(&"refused".to_string()).then_some(j)
    });
    assert_succeeded_once(&job);
}

/// `kill -9` of the server while jobs run, then a restart on the same
/// home: every job still finishes, once, and no job runs beside itself.
#[test]
fn server_killed_mid_run() {
    let fleet = Fleet::start(&["a1", "a2"]);
    let ids: Vec<u64> = (0..6)
        .map(|i| fleet.submit(&format!("s{i}"), 3.0, 3.0))
        .collect();
    for id in &ids[..3] {
        fleet.wait_copy_started(*id, 1);
    }
    fleet.kill9("server", "server");
    std::thread::sleep(Duration::from_millis(700));
    fleet.start_server();
    let more: Vec<u64> = (0..2)
        .map(|i| fleet.submit(&format!("t{i}"), 1.0, 1.0))
        .collect();
    let mut reruns = 0;
    for id in ids.iter().chain(&more) {
        let job = fleet.wait_terminal(*id, Duration::from_secs(60));
        assert_succeeded_once(&job);
        reruns += job["job"]["attempt"].as_u64().unwrap() - 1;
    }
    let all = copies(&fleet.shared());
    assert_no_overlap(&all, &[]);
    for id in ids.iter().chain(&more) {
        let mine = &all[id];
        let last = mine.last().unwrap();
        assert_eq!(
            last.end.as_ref().map(|e| e.1.as_str()),
            Some("end"),
            "job {id}: {mine:?}"
        );
    }
    eprintln!(
        "server restart: {} jobs, {reruns} re-runs",
        ids.len() + more.len()
    );
}

/// `kill -9` of the agent process (not its container) while the job runs,
/// then a restart: the new agent adopts the still-running replica, and the
/// job succeeds on its first attempt.
#[test]
fn agent_process_restarted_adopts_its_replica() {
    let fleet = Fleet::start(&["a1"]);
    let id = fleet.submit("adopted", 4.0, 4.0);
    fleet.wait_copy_started(id, 1);
    std::thread::sleep(Duration::from_millis(800));
    fleet.kill9("a1", "agent");
    std::thread::sleep(Duration::from_millis(500));
    fleet.start_agent("a1");
    let job = fleet.wait_terminal(id, Duration::from_secs(30));
    assert_succeeded_once(&job);
    assert_eq!(job["job"]["attempt"], 1, "the job ran again: {job:#}");
    let k = kinds(&job);
    assert!(!k.contains(&"lost".to_string()), "{k:?}");
    let all = copies(&fleet.shared());
    let mine = &all[&id];
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(
        mine[0].end.as_ref().map(|e| e.1.as_str()),
        Some("end"),
        "{mine:?}"
    );
}

/// An agent on a machine that does not share the server's disk: it fetches
/// a job's inputs over HTTP with its node credential (they appear in the
/// working directory as on any node), and uploads replica 0's outputs
/// before it reports the exit, so they become versions all the same.
#[test]
fn a_remote_agent_fetches_inputs_and_uploads_outputs() {
    let fleet = Fleet::start(&["a1"]);
    let src = fleet.dir.path().join("weights");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("tok.txt"), "hello tokens\n").unwrap();
    std::fs::write(src.join("sub/layer.bin"), [3u8; 5000]).unwrap();
    fleet.cli(&["data", "upload", "weights", src.to_str().unwrap()]);
    let spec = serde_json::json!({
        "name": "trains",
        "script": "test \"$(cat w/tok.txt)\" = 'hello tokens' && test $(wc -c < w/sub/layer.bin) = 5000 && mkdir -p out/deep && cp w/tok.txt out/deep/tok.txt && echo done > out/model",
        "resources": {"cpu": "0.1", "memory": "16Mi"},
        "inputs": [{"dataset": "weights", "as": "w"}],
        "outputs": [{"dataset": "trained", "from": "out"}],
    });
    let path = fleet.dir.path().join("trains.json");
    std::fs::write(&path, spec.to_string()).unwrap();
    let id = fleet.cli(&["submit", path.to_str().unwrap()])["id"]
        .as_u64()
        .unwrap();
    let job = fleet.wait_terminal(id, Duration::from_secs(60));
    assert_eq!(job["job"]["state"], "succeeded", "{job:#}");
    assert_eq!(job["job"]["wrote"], serde_json::json!(["admin.trained@1"]));
    // The input's copy is kept on the agent's disk, by version.
    assert!(fleet
        .home("a1")
        .join("inputs/admin/weights/1/sub/layer.bin")
        .is_file());
    // The version holds what the job left in out/, and names its lineage.
    let dl = fleet.dir.path().join("dl");
    fleet.cli(&["data", "download", "trained", "--out", dl.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(dl.join("deep/tok.txt")).unwrap(),
        "hello tokens\n"
    );
    assert_eq!(std::fs::read_to_string(dl.join("model")).unwrap(), "done\n");
    let show = fleet.cli(&["data", "show", "trained"]);
    assert_eq!(
        show["versions"][0]["inputs"],
        serde_json::json!(["admin.weights@1"])
    );
    // The server's copy of the upload is gone once written.
    let left = std::fs::read_dir(fleet.home("server").join("job-outputs"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0);
}
