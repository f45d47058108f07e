//! Black-box tests of a fleet on loopback: `tessera server` and several
//! `tessera agent` processes, each with its own home, joined with a join
//! token — then agents and the server killed with SIGKILL and restarted.
//! (Network partitions need separate network stacks; they are tested with
//! containers in `fleet.rs`.)

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

/// Fast timings: heartbeat 500 ms, node lease 6 s (the agents' own lease
/// is then 2 s), kill grace 500 ms.
const SERVER_FLAGS: &[&str] = &[
    "--heartbeat",
    "500ms",
    "--node-lease",
    "6s",
    "--kill-grace",
    "500ms",
];

struct Fleet {
    dir: tempfile::TempDir,
    port: u16,
    server: Option<Child>,
    agents: Vec<(String, Option<Child>)>,
    token: String,
    join: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn log_file(path: PathBuf) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

impl Fleet {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn server_home(&self) -> PathBuf {
        self.dir.path().join("server")
    }

    fn agent_home(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start(agents: &[&str]) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Fleet {
            dir,
            port: free_port(),
            server: None,
            agents: Vec::new(),
            token: String::new(),
            join: String::new(),
        };
        f.start_server();
        f.token = std::fs::read_to_string(f.server_home().join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        let created = f.cli_json(&["join-token", "create", "--uses", "10"]);
        f.join = created["token"].as_str().unwrap().to_string();
        for a in agents {
            f.agents.push((a.to_string(), None));
            f.start_agent(a);
        }
        f.wait_nodes_ready(agents.len());
        f
    }

    fn start_server(&mut self) {
        let home = self.server_home();
        std::fs::create_dir_all(&home).unwrap();
        let _ = std::fs::remove_file(home.join("config"));
        let child = Command::new(BIN)
            .arg("server")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(SERVER_FLAGS)
            .env("TESSERA_HOME", &home)
            .stdin(Stdio::null())
            .stdout(log_file(self.dir.path().join("server.log")))
            .stderr(log_file(self.dir.path().join("server.log")))
            .spawn()
            .unwrap();
        self.server = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !home.join("config").exists() {
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start_agent(&mut self, name: &str) {
        self.start_agent_with(name, &[]);
    }

    fn start_agent_with(&mut self, name: &str, extra: &[&str]) {
        if !self.agents.iter().any(|(n, _)| n == name) {
            self.agents.push((name.to_string(), None));
        }
        let home = self.agent_home(name);
        std::fs::create_dir_all(&home).unwrap();
        let child = Command::new(BIN)
            .arg("agent")
            .arg("--server")
            .arg(self.url())
            .arg("--join-token")
            .arg(&self.join)
            .arg("--name")
            .arg(name)
            .arg("--labels")
            .arg(format!("rack={name}"))
            .args(["--no-cgroups", "--kill-grace", "500ms", "--cpu", "2"])
            .args(extra)
            .env("TESSERA_HOME", &home)
            .stdin(Stdio::null())
            .stdout(log_file(self.dir.path().join(format!("{name}.log"))))
            .stderr(log_file(self.dir.path().join(format!("{name}.log"))))
            .spawn()
            .unwrap();
        let slot = self.agents.iter_mut().find(|(n, _)| n == name).unwrap();
        slot.1 = Some(child);
    }

    fn kill_agent(&mut self, name: &str) {
        let slot = self.agents.iter_mut().find(|(n, _)| n == name).unwrap();
        if let Some(mut c) = slot.1.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn kill_server(&mut self) {
        if let Some(mut c) = self.server.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .env("TESSERA_URL", self.url())
            .env("TESSERA_TOKEN", &self.token)
            .env("TESSERA_HOME", self.dir.path().join("client"))
            .output()
            .unwrap()
    }

    fn cli_json(&self, args: &[&str]) -> Value {
        let mut all: Vec<&str> = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "tessera {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn nodes(&self) -> Vec<Value> {
        self.cli_json(&["nodes"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn wait_nodes_ready(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = self
                .nodes()
                .iter()
                .filter(|n| n["state"] == "ready")
                .count();
            if ready >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nodes not ready: {:?}",
                self.nodes()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn submit(&self, script: &str, extra: &[&str]) -> u64 {
        let mut args = vec!["run"];
        if !extra.contains(&"--cpu") {
            args.extend(["--cpu", "1.5"]);
        }
        if !extra.contains(&"--retries") {
            args.extend(["--retries", "0"]);
        }
        args.extend_from_slice(extra);
        args.extend(["--", "/bin/sh", "-c", script]);
        let v = self.cli_json(&args);
        v["id"].as_u64().unwrap_or_else(|| panic!("no id in {v}"))
    }

    fn job(&self, id: u64) -> Value {
        self.cli_json(&["job", &id.to_string()])
    }

    fn wait_state(&self, id: u64, states: &[&str], secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let j = self.job(id);
            let s = j["job"]["state"].as_str().unwrap_or("").to_string();
            if states.contains(&s.as_str()) {
                return j;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} never reached {states:?}: {j:#}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn node_of(&self, id: u64) -> String {
        self.job(id)["job"]["placement"][0]["node"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let names: Vec<String> = self.agents.iter().map(|(n, _)| n.clone()).collect();
        for n in names {
            self.kill_agent(&n);
            // Replicas the agents left behind.
            let _ = Command::new("pkill")
                .arg("-KILL")
                .arg("-f")
                .arg(self.agent_home(&n).display().to_string())
                .status();
        }
        self.kill_server();
    }
}

/// The intervals each copy of a job ran, from the marker files its script
/// wrote: `<dir>/<job>.<attempt>.<node>` holds `start end` in nanoseconds
/// (`end` absent while running or when it was killed without a chance).
fn intervals(dir: &Path, job: u64) -> Vec<(String, u128, Option<u128>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with(&format!("{job}.")) {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap();
        let mut parts = text.split_whitespace().map(|p| p.parse::<u128>().unwrap());
        out.push((name, parts.next().unwrap(), parts.next()));
    }
    out.sort_by_key(|(_, s, _)| *s);
    out
}

/// A script that records its run interval (also when it is stopped).
fn recording_script(dir: &Path, secs: u32) -> String {
    let f = format!(
        "{}/$TESSERA_JOB_ID.$TESSERA_ATTEMPT.$(basename $(dirname $(dirname $PWD)))",
        dir.display()
    );
    format!(
        "f={f}; date +%s%N > $f; trap 'echo $(date +%s%N) >> $f; exit 143' TERM; \
         i=0; while [ $i -lt {} ]; do sleep 0.1; i=$((i+1)); done; date +%s%N >> $f",
        secs * 10
    )
}

#[test]
fn agents_join_run_jobs_and_ship_their_logs() {
    let f = Fleet::start(&["a1", "a2"]);
    let nodes = f.nodes();
    assert_eq!(nodes.len(), 2);
    assert!(
        nodes.iter().any(|n| n["labels"]["rack"] == "a1"),
        "{nodes:?}"
    );
    let out = f.cli(&[
        "run",
        "-f",
        "--cpu",
        "0.5",
        "--",
        "sh",
        "-c",
        "echo hello from $TESSERA_JOB_ID",
    ]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("hello from 1"),
        "logs reach the server: {text}"
    );
    // A job too big for one node but not the pool runs as a gang over two.
    let id = f.submit("echo replica $TESSERA_REPLICA", &["--replicas", "2"]);
    let j = f.wait_state(id, &["succeeded"], 20);
    let placed: Vec<&str> = j["job"]["placement"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap())
        .collect();
    assert_eq!(placed.len(), 2);
    assert_ne!(placed[0], placed[1], "1.5 cpu each on 2-cpu nodes");
    let logs = f.cli(&["logs", &id.to_string(), "--replica", "1"]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains("replica 1"));
}

#[test]
fn bad_join_tokens_are_refused_and_a_removed_node_cannot_come_back() {
    let mut f = Fleet::start(&["a1"]);
    // A wrong token: the agent exits with the reason.
    let home = f.agent_home("intruder");
    std::fs::create_dir_all(&home).unwrap();
    let out = Command::new(BIN)
        .args([
            "agent",
            "--server",
            &f.url(),
            "--join-token",
            "tsj_nope",
            "--name",
            "x",
        ])
        .env("TESSERA_HOME", &home)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown or revoked join token"), "{err}");
    // A used-up token.
    let once = f.cli_json(&["join-token", "create", "--uses", "1"]);
    let once = once["token"].as_str().unwrap().to_string();
    let join = |name: &str| {
        Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
            .arg(format!("{}/v1/agents/join", f.url()))
            .args(["-H", "content-type: application/json", "-d"])
            .arg(format!("{{\"token\":\"{once}\",\"node\":\"{name}\"}}"))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    };
    if Command::new("curl").arg("--version").output().is_ok() {
        assert_eq!(join("n1"), "201");
        assert_eq!(join("n2"), "401");
    }
    // Removing a node revokes its credential: its agent cannot reconnect.
    let out = f.cli(&["node", "remove", "a1"]);
    assert!(out.status.success(), "{out:?}");
    assert!(f.nodes().iter().all(|n| n["name"] != "a1"));
    f.kill_agent("a1");
    let out = Command::new(BIN)
        .args(["agent", "--server", &f.url(), "--no-cgroups"])
        .env("TESSERA_HOME", f.agent_home("a1"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("credential"), "{err}");
}

/// An agent killed with SIGKILL and started again within its lease adopts
/// the replica it was running: the job succeeds on its first attempt.
#[test]
fn a_restarted_agent_adopts_its_running_job() {
    let mut f = Fleet::start(&["a1"]);
    let marks = f.dir.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let id = f.submit(&recording_script(&marks, 3), &[]);
    f.wait_state(id, &["running"], 20);
    std::thread::sleep(Duration::from_millis(500));
    f.kill_agent("a1");
    std::thread::sleep(Duration::from_millis(300));
    f.start_agent("a1");
    let j = f.wait_state(id, &["succeeded", "failed", "lost"], 30);
    assert_eq!(j["job"]["state"], "succeeded", "{j:#}");
    assert_eq!(j["job"]["attempt"], 1, "not run again: {j:#}");
    let iv = intervals(&marks, id);
    assert_eq!(iv.len(), 1, "{iv:?}");
    assert!(iv[0].2.is_some(), "ran to its end");
}

/// An agent that dies for good: its replica's watchdog stops the work once
/// the lease has run out, the server declares the node lost only after
/// that, and the job runs again elsewhere — the two copies never overlap.
#[test]
fn a_dead_agents_work_stops_before_it_runs_elsewhere() {
    let mut f = Fleet::start(&["a1", "a2"]);
    let marks = f.dir.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let id = f.submit(&recording_script(&marks, 3), &["--retries", "0"]);
    f.wait_state(id, &["running"], 20);
    let first = f.node_of(id);
    f.kill_agent(&first);
    let j = f.wait_state(id, &["succeeded", "failed", "lost"], 60);
    assert_eq!(j["job"]["state"], "succeeded", "{j:#}");
    assert_eq!(j["job"]["attempt"], 2, "{j:#}");
    assert_ne!(f.node_of(id), first);
    let iv = intervals(&marks, id);
    assert_eq!(iv.len(), 2, "{iv:?}");
    let (_, _, first_end) = &iv[0];
    let first_end = first_end.expect("the watchdog stopped the first copy (TERM trap recorded it)");
    assert!(
        first_end < iv[1].1,
        "copies overlap: the first ended at {first_end}, the second started at {}",
        iv[1].1
    );
    let events = j["events"].as_array().unwrap();
    assert!(
        events.iter().any(|e| e["kind"] == "lost"),
        "the loss is recorded: {events:?}"
    );
}

/// The server killed with SIGKILL mid-run and started again: the agent
/// reconnects, reports what it runs, and the job finishes once, on its
/// first attempt.
#[test]
fn a_server_restart_loses_nothing() {
    let mut f = Fleet::start(&["a1", "a2"]);
    let marks = f.dir.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let a = f.submit(&recording_script(&marks, 3), &[]);
    let b = f.submit(&recording_script(&marks, 3), &[]);
    f.wait_state(a, &["running"], 20);
    f.wait_state(b, &["running"], 20);
    f.kill_server();
    std::thread::sleep(Duration::from_millis(700));
    f.start_server();
    for id in [a, b] {
        let j = f.wait_state(id, &["succeeded", "failed", "lost"], 30);
        assert_eq!(j["job"]["state"], "succeeded", "{j:#}");
        assert_eq!(j["job"]["attempt"], 1, "{j:#}");
        let terminal = j["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| {
                ["succeeded", "failed", "lost", "cancelled"]
                    .contains(&e["kind"].as_str().unwrap_or(""))
            })
            .count();
        assert_eq!(terminal, 1, "{j:#}");
        assert_eq!(intervals(&marks, id).len(), 1);
    }
    // And the fleet still takes new work.
    let c = f.submit("true", &[]);
    f.wait_state(c, &["succeeded"], 20);
}

/// Cordon keeps new work off a node; drain with a deadline requeues what
/// still runs there; uncordon brings it back.
#[test]
fn cordon_and_drain() {
    let f = Fleet::start(&["a1", "a2"]);
    let v = f.cli_json(&["node", "cordon", "a1"]);
    assert_eq!(v["state"], "cordoned");
    for _ in 0..3 {
        let id = f.submit("true", &["--cpu", "0.1"]);
        f.wait_state(id, &["succeeded"], 20);
        assert_eq!(f.node_of(id), "a2");
    }
    f.cli_json(&["node", "uncordon", "a1"]);
    let long = f.submit("sleep 30", &["--cpu", "1.5"]);
    f.wait_state(long, &["running"], 20);
    let node = f.node_of(long);
    let v = f.cli_json(&["node", "drain", &node, "--deadline", "1s"]);
    assert_eq!(v["state"], "draining");
    assert_eq!(v["running_replicas"], 1);
    // Requeued (a preemption, not a failure) and run on the other node.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let j = f.job(long);
        if j["job"]["attempt"] == 2 && j["job"]["state"] == "running" {
            assert_ne!(f.node_of(long), node);
            assert_eq!(j["job"]["preemptions"], 1, "{j:#}");
            break;
        }
        assert!(Instant::now() < deadline, "not requeued: {j:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = f.cli(&["node", "drain", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node named `nope`"));
    f.cli(&["cancel", &long.to_string()]);
}

/// Heartbeats carry live usage; a GPU that starts reporting uncorrectable
/// ECC errors leaves scheduling until it reports healthy again.
#[test]
fn heartbeats_carry_usage_and_an_unhealthy_gpu_is_not_scheduled() {
    let mut f = Fleet::start(&[]);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/gpu/h100/nvidia-smi-q-busy.xml");
    let healthy = std::fs::read_to_string(&fixture).expect("GPU fixture");
    let xml = f.dir.path().join("gpu.xml");
    std::fs::write(&xml, &healthy).unwrap();
    f.start_agent_with("g1", &["--gpu-xml", xml.to_str().unwrap()]);
    f.wait_nodes_ready(1);
    let usage_of = |f: &Fleet| {
        f.nodes()
            .into_iter()
            .find(|n| n["name"] == "g1")
            .map(|n| n["usage"].clone())
            .unwrap_or(Value::Null)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while usage_of(&f).is_null() {
        assert!(Instant::now() < deadline, "no usage reported");
        std::thread::sleep(Duration::from_millis(100));
    }
    let usage = usage_of(&f);
    assert!(usage["memory_used_bytes"].as_u64().unwrap() > 0, "{usage}");
    assert!(
        usage["gpus"][0]["utilization_percent"].as_u64().is_some(),
        "{usage}"
    );
    // ECC errors appear.
    let block = healthy.find("<volatile>").unwrap();
    let tag = "<dram_uncorrectable>";
    let start = block + healthy[block..].find(tag).unwrap() + tag.len();
    let end = start + healthy[start..].find('<').unwrap();
    let broken = format!("{}2{}", &healthy[..start], &healthy[end..]);
    std::fs::write(&xml, broken).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = f.nodes().into_iter().find(|n| n["name"] == "g1").unwrap();
        if n["gpus"][0]["healthy"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "GPU never marked unhealthy: {n}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = f.cli(&["nodes"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("UNHEALTHY"),
        "{out:?}"
    );
    let id = f.submit("true", &["--gpu", "1", "--cpu", "0.5"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        f.job(id)["job"]["state"],
        "queued",
        "not placed on a sick GPU"
    );
    // Healthy again: the job runs.
    std::fs::write(&xml, &healthy).unwrap();
    f.wait_state(id, &["succeeded"], 20);
}
