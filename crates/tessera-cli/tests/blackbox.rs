//! Black-box tests of the `tessera` binary: what README.md promises, done the
//! way a user does it — `tessera up` in its own process, the CLI and plain
//! HTTP against it, `kill -9` for crashes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

struct Up {
    child: Option<Child>,
    home: PathBuf,
    _dir: Option<tempfile::TempDir>,
    url: String,
    token: String,
    args: Vec<String>,
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared")
        .join(rel)
}

fn spawn_up(home: &Path, args: &[String]) -> Child {
    let _ = std::fs::remove_file(home.join("config"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(home.with_extension("server.log"))
        .unwrap();
    Command::new(BIN)
        .arg("up")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .args(args)
        .env("TESSERA_HOME", home)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start tessera up")
}

fn wait_ready(home: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(cfg) = std::fs::read_to_string(home.join("config")) {
            if let Some(url) = cfg.lines().find_map(|l| l.strip_prefix("url = ")) {
                return url.trim().to_string();
            }
        }
        assert!(Instant::now() < deadline, "tessera up did not become ready");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Up {
    fn start(args: &[&str]) -> Up {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let child = spawn_up(&home, &args);
        let url = wait_ready(&home);
        let token = std::fs::read_to_string(home.join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        Up {
            child: Some(child),
            home,
            _dir: Some(dir),
            url,
            token,
            args,
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }

    /// SIGTERM, as Ctrl-C or a service manager would; waits for the exit.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "tessera up did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start_again(&mut self) {
        let child = spawn_up(&self.home, &self.args);
        self.url = wait_ready(&self.home);
        self.child = Some(child);
    }

    fn restart(&mut self) {
        self.kill9();
        let child = spawn_up(&self.home, &self.args);
        self.url = wait_ready(&self.home);
        self.child = Some(child);
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("TESSERA_HOME", &self.home)
            .env_remove("TESSERA_URL")
            .env_remove("TESSERA_TOKEN")
            .output()
            .unwrap()
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "tessera {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// One team as `tessera team list -o json` shows it.
    fn team(&self, name: &str) -> Value {
        let teams: Value =
            serde_json::from_str(&self.cli_ok(&["team", "list", "-o", "json"])).unwrap();
        teams
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("no team {name} in {teams}"))
            .clone()
    }

    fn http(&self) -> Http {
        Http {
            url: self.url.clone(),
            token: Some(self.token.clone()),
        }
    }

    fn wait_state(&self, id: u64, want: &[&str], secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let (_, job) = self.http().get(&format!("/v1/jobs/{id}"));
            if want.contains(&job["state"].as_str().unwrap_or("")) {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} never reached {want:?}: {job}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A tiny blocking HTTP client over reqwest, enough for tests.
struct Http {
    url: String,
    token: Option<String>,
}

impl Http {
    fn send(&self, method: &str, path: &str, body: Option<(&str, Vec<u8>)>) -> (u16, Value) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client = reqwest::Client::new();
            let mut req = client.request(method.parse().unwrap(), format!("{}{path}", self.url));
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            if let Some((ct, b)) = body {
                req = req.header("content-type", ct).body(b);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            (
                status,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            )
        })
    }

    fn get(&self, path: &str) -> (u16, Value) {
        self.send("GET", path, None)
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(
            "POST",
            path,
            Some(("application/json", body.to_string().into_bytes())),
        )
    }

    fn post_raw(&self, path: &str, ct: &str, body: &str) -> (u16, Value) {
        self.send("POST", path, Some((ct, body.as_bytes().to_vec())))
    }
}

/// Whether a process is still alive (a zombie left to a parent that does not
/// reap it counts as gone: it runs nothing and holds nothing).
fn alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let after = &stat[stat.rfind(')').unwrap() + 2..];
            !after.starts_with('Z') && !after.starts_with('X')
        }
    }
}

fn job_id(json_out: &str) -> u64 {
    let v: Value = serde_json::from_str(json_out.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {json_out}"));
    v["id"].as_u64().unwrap_or_else(|| panic!("no id in {v}"))
}

#[test]
fn first_start_writes_a_private_token_and_the_readme_flow_works() {
    let up = Up::start(&[]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(up.home.join("admin.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(up.token.starts_with("tsr_"));

    let out = up.cli_ok(&[
        "run",
        "--output",
        "json",
        "--cpu",
        "1",
        "--mem",
        "256Mi",
        "--",
        "python3",
        "-c",
        "print('hello')",
    ]);
    let id = job_id(&out);
    let logs = up.cli_ok(&["logs", &id.to_string(), "-f"]);
    assert_eq!(logs, "hello\n");
    let job = up.wait_state(id, &["succeeded"], 20);
    assert_eq!(job["exit_code"], 0);

    let table = up.cli_ok(&["jobs"]);
    assert!(
        table.contains("ID") && table.contains("succeeded") && table.contains(&id.to_string()),
        "{table}"
    );
    let detail = up.cli_ok(&["job", &id.to_string()]);
    for word in ["submitted", "scheduled", "started", "succeeded"] {
        assert!(detail.contains(word), "missing event {word} in:\n{detail}");
    }
    let nodes: Value = serde_json::from_str(&up.cli_ok(&["nodes", "--output", "json"])).unwrap();
    let list = nodes
        .as_array()
        .cloned()
        .or_else(|| nodes["nodes"].as_array().cloned())
        .unwrap();
    assert_eq!(list.len(), 1);
    assert!(list[0]["cpu_milli"].as_u64().unwrap() >= 1000);

    // YAML spec through `tessera submit`, with env, script and a gang.
    let spec = up.home.join("job.yaml");
    std::fs::write(
        &spec,
        "name: gang\nscript: echo \"$GREETING from $TESSERA_REPLICA of $TESSERA_NUM_REPLICAS\"\nenv: {GREETING: hi}\nreplicas: 2\nresources: {cpu: 0.5, memory: 64Mi}\n",
    )
    .unwrap();
    let id = job_id(&up.cli_ok(&["submit", "--output", "json", spec.to_str().unwrap()]));
    up.wait_state(id, &["succeeded"], 20);
    let r1 = up.cli_ok(&["logs", &id.to_string(), "--replica", "1"]);
    assert_eq!(r1, "hi from 1 of 2\n");
}

#[test]
fn logs_follow_live_output_until_the_job_ends() {
    let up = Up::start(&[]);
    let id = job_id(&up.cli_ok(&[
        "run",
        "-o",
        "json",
        "--",
        "/bin/sh",
        "-c",
        "for i in 1 2 3; do echo line$i; sleep 0.3; done",
    ]));
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(["logs", &id.to_string(), "-f"])
        .env("TESSERA_HOME", &up.home)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Read;
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 6];
    stdout.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"line1\n");
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "first line arrived only after {:?}",
        started.elapsed()
    );
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "line2\nline3\n");
    assert!(child.wait().unwrap().success());
}

#[test]
fn cancel_and_max_runtime_stop_jobs() {
    let up = Up::start(&["--kill-grace", "1s"]);
    let id = job_id(&up.cli_ok(&["run", "-o", "json", "--", "sleep", "60"]));
    let job = up.wait_state(id, &["running"], 20);
    let pid = job["replicas"][0]["pid"].as_u64().unwrap();
    up.cli_ok(&["cancel", &id.to_string()]);
    let job = up.wait_state(id, &["cancelled"], 20);
    assert!(job["reason"].as_str().unwrap().contains("cancel"), "{job}");
    assert!(!alive(pid), "the process survived the cancel");
    let out = up.cli(&["cancel", &id.to_string()]);
    assert!(
        !out.status.success(),
        "cancelling a finished job is an error"
    );

    let id = job_id(&up.cli_ok(&[
        "run",
        "-o",
        "json",
        "--max-runtime",
        "1s",
        "--",
        "sleep",
        "60",
    ]));
    let job = up.wait_state(id, &["failed"], 20);
    assert!(
        job["reason"].as_str().unwrap().contains("max_runtime"),
        "{job}"
    );

    let id = job_id(&up.cli_ok(&["run", "-o", "json", "--", "/bin/sh", "-c", "exit 7"]));
    let job = up.wait_state(id, &["failed"], 20);
    assert_eq!(job["exit_code"], 7);
    assert!(job["reason"].as_str().unwrap().contains("code 7"));
}

#[test]
fn retries_on_failure_run_the_job_again() {
    let up = Up::start(&[]);
    let marker = up.home.join("tried-once");
    let script = format!(
        "if [ -e {m} ]; then echo second; else touch {m}; exit 1; fi",
        m = marker.display()
    );
    let spec = json!({"name": "flaky", "script": script, "retries": {"on_failure": 1}});
    let (status, job) = up.http().post("/v1/jobs", spec);
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_u64().unwrap();
    let job = up.wait_state(id, &["succeeded"], 20);
    assert_eq!(job["attempt"], 2);
    assert_eq!(job["failures"], 1);
    let (_, events) = up.http().get(&format!("/v1/jobs/{id}/events"));
    assert!(events["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "requeued"));
}

#[test]
fn kill_9_loses_nothing_acknowledged() {
    let mut up = Up::start(&["--cpu", "2"]);
    let http = up.http();
    // Finished before the crash.
    let (_, done) = http.post(
        "/v1/jobs",
        json!({"name": "done", "command": ["echo", "finished-output"], "resources": {"cpu": 1}}),
    );
    let done_id = done["id"].as_u64().unwrap();
    up.wait_state(done_id, &["succeeded"], 20);
    // Running at the crash, no retries on node loss: marked lost.
    let (_, a) = http.post("/v1/jobs", json!({"name": "a", "command": ["sleep", "60"], "resources": {"cpu": 1}, "retries": {"on_node_loss": 0}}));
    let a_id = a["id"].as_u64().unwrap();
    // Running at the crash with the default policy: retried.
    let (_, d) = http.post(
        "/v1/jobs",
        json!({"name": "d", "script": "sleep 2; echo d-done", "resources": {"cpu": 1}}),
    );
    let d_id = d["id"].as_u64().unwrap();
    let a_pid = up.wait_state(a_id, &["running"], 20)["replicas"][0]["pid"]
        .as_u64()
        .unwrap();
    up.wait_state(d_id, &["running"], 20);
    // Queued at the crash: the node is full.
    let (_, b) = http.post(
        "/v1/jobs",
        json!({"name": "b", "command": ["echo", "b-ran"], "resources": {"cpu": 2}}),
    );
    let b_id = b["id"].as_u64().unwrap();
    assert_eq!(up.wait_state(b_id, &["queued"], 5)["state"], "queued");

    up.restart();

    let a = up.wait_state(a_id, &["lost"], 20);
    assert!(
        a["reason"].as_str().unwrap().contains("server restarted"),
        "{a}"
    );
    assert!(!alive(a_pid), "the orphaned replica was not stopped");
    let d = up.wait_state(d_id, &["succeeded"], 30);
    assert_eq!(d["attempt"], 2);
    assert_eq!(d["node_losses"], 1);
    let b = up.wait_state(b_id, &["succeeded"], 30);
    assert_eq!(b["exit_code"], 0);
    let done = up.wait_state(done_id, &["succeeded"], 5);
    assert_eq!(done["exit_code"], 0);
    assert_eq!(
        up.cli_ok(&["logs", &done_id.to_string()]),
        "finished-output\n"
    );
    assert_eq!(up.cli_ok(&["logs", &b_id.to_string()]), "b-ran\n");
    // Ids keep counting after a restart.
    let (_, e) = up.http().post("/v1/jobs", json!({"command": ["true"]}));
    assert!(e["id"].as_u64().unwrap() > b_id);
}

#[test]
fn bad_input_gets_a_clear_error_and_creates_nothing() {
    let up = Up::start(&[]);
    let http = up.http();
    let cases: Vec<(&str, &str, u16, &str)> = vec![
        ("application/yaml", "command: [true\n", 400, ""),
        (
            "application/json",
            "{\"command\": [\"true\"], \"bogus\": 1}",
            400,
            "bogus",
        ),
        ("application/json", "{\"command\": []}", 400, "command"),
        (
            "application/json",
            "{\"command\": [\"true\"], \"resources\": {\"cpu\": 0}}",
            400,
            "resources.cpu",
        ),
        (
            "application/json",
            "{\"command\": [\"true\"], \"resources\": {\"cpu\": -1}}",
            400,
            "resources.cpu",
        ),
        (
            "application/json",
            "{\"command\": [\"true\"], \"resources\": {\"memory\": \"12Qi\"}}",
            400,
            "resources.memory",
        ),
        (
            "application/json",
            "{\"command\": [\"true\"], \"resources\": {\"gpu\": 1000000}}",
            400,
            "resources.gpu",
        ),
        (
            "application/json",
            "{\"command\": [\"true\"], \"max_runtime\": \"soon\"}",
            400,
            "max_runtime",
        ),
        (
            "application/json",
            "{\"command\": [\"true\"], \"name\": \"has space\"}",
            400,
            "name",
        ),
        (
            "application/json",
            "{\"command\": [\"true\"], \"replicas\": 0}",
            400,
            "replicas",
        ),
        (
            "application/json",
            "{\"command\": [\"true\"], \"resources\": {\"cpu\": 100000}}",
            422,
            "resources",
        ),
        (
            "application/json",
            "{\"command\": [\"true\"], \"team\": \"nosuchteam\"}",
            422,
            "team",
        ),
    ];
    for (ct, body, status, field) in cases {
        let (got, err) = http.post_raw("/v1/jobs", ct, body);
        assert_eq!(got, status, "{body} -> {err}");
        assert!(
            err["error"]["code"].is_string() && err["error"]["message"].is_string(),
            "{err}"
        );
        if !field.is_empty() {
            let f = err["error"]["field"].as_str().unwrap_or("");
            assert!(
                f.starts_with(field),
                "{body}: field {f:?}, want {field:?}: {err}"
            );
        }
    }
    let huge = format!(
        "{{\"command\": [\"true\"], \"script_pad\": \"{}\"}}",
        "x".repeat(1 << 21)
    );
    let (got, err) = http.post_raw("/v1/jobs", "application/json", &huge);
    assert_eq!(got, 413, "{err}");
    assert_eq!(err["error"]["code"], "payload_too_large");
    let (got, err) = http.get("/v1/jobs/999999");
    assert_eq!(got, 404);
    assert_eq!(err["error"]["code"], "not_found");
    let (got, _) = http.get("/v1/jobs/abc");
    assert_eq!(got, 400);
    let (_, list) = http.get("/v1/jobs");
    assert_eq!(
        list["jobs"].as_array().unwrap().len(),
        0,
        "a rejected submission created a job"
    );
    let out = up.cli(&["run", "--cpu", "5000", "--", "true"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fits no node"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn tokens_roles_and_teams_are_enforced() {
    let up = Up::start(&[]);
    let admin = up.http();
    let anon = Http {
        url: up.url.clone(),
        token: None,
    };
    let (s, e) = anon.get("/v1/jobs");
    assert_eq!(s, 401);
    assert!(e["error"]["message"].as_str().unwrap().contains("token"));
    let (s, _) = Http {
        url: up.url.clone(),
        token: Some("tsr_wrong".into()),
    }
    .get("/v1/jobs");
    assert_eq!(s, 401);

    for team in ["ads", "vision"] {
        let (s, t) = admin.post("/v1/teams", json!({"name": team}));
        assert_eq!(s, 201, "{t}");
    }
    let token = |team: &str, role: &str| {
        let (s, t) = admin.post("/v1/tokens", json!({"team": team, "role": role}));
        assert_eq!(s, 201, "{t}");
        Http {
            url: up.url.clone(),
            token: Some(t["token"].as_str().unwrap().to_string()),
        }
    };
    let ads = token("ads", "member");
    let ads_viewer = token("ads", "viewer");
    let vision = token("vision", "member");

    let (s, job) = ads.post("/v1/jobs", json!({"command": ["sleep", "30"]}));
    assert_eq!(s, 201);
    assert_eq!(job["spec"]["team"], "ads");
    let id = job["id"].as_u64().unwrap();
    let (s, _) = ads_viewer.get(&format!("/v1/jobs/{id}"));
    assert_eq!(s, 200);
    let (s, e) = ads_viewer.post("/v1/jobs", json!({"command": ["true"]}));
    assert_eq!(s, 403, "{e}");
    let (s, _) = ads_viewer.post(&format!("/v1/jobs/{id}/cancel"), json!({}));
    assert_eq!(s, 403);
    let (s, e) = vision.get(&format!("/v1/jobs/{id}"));
    assert_eq!(s, 403, "{e}");
    let (s, _) = vision.post(&format!("/v1/jobs/{id}/cancel"), json!({}));
    assert_eq!(s, 403);
    let (_, list) = vision.get("/v1/jobs");
    assert_eq!(list["jobs"].as_array().unwrap().len(), 0);
    let (s, _) = vision.post("/v1/jobs", json!({"command": ["true"], "team": "ads"}));
    assert_eq!(s, 403);
    let (s, _) = ads.post("/v1/teams", json!({"name": "mine"}));
    assert_eq!(s, 403);
    let (s, _) = ads.post(&format!("/v1/jobs/{id}/cancel"), json!({}));
    assert_eq!(s, 200);
    // Tokens are stored hashed: the secret is nowhere in the database.
    let db = std::fs::read(up.home.join("tessera.db")).unwrap();
    let wal = std::fs::read(up.home.join("tessera.db-wal")).unwrap_or_default();
    let secret = up.token.as_bytes();
    assert!(
        !db.windows(secret.len()).any(|w| w == secret)
            && !wal.windows(secret.len()).any(|w| w == secret)
    );
}

#[test]
fn seed_api_metrics_and_openapi() {
    let up = Up::start(&[]);
    let http = up.http();
    let (s, created) = http.post(
        "/tasks",
        json!({"task_name": "seed", "cpu_count": 1, "memory_size": "256Mi", "command": ["echo", "hi"]}),
    );
    assert_eq!(s, 201, "{created}");
    let id = created["id"].as_u64().unwrap();
    up.wait_state(id, &["succeeded"], 20);
    let (s, _) = Http {
        url: up.url.clone(),
        token: None,
    }
    .post("/tasks", json!({"task_name": "x", "command": ["true"]}));
    assert_eq!(s, 401);

    let (s, m) = Http {
        url: up.url.clone(),
        token: None,
    }
    .get("/metrics");
    assert_eq!(s, 200);
    let m = m.as_str().unwrap().to_string();
    for name in [
        "tessera_jobs{state=\"succeeded\"} 1",
        "tessera_queue_length{team=\"admin\"} 0",
        "tessera_scheduler_cycle_duration_seconds_bucket",
        "tessera_job_submit_to_start_seconds_count 1",
        "tessera_node_capacity{",
        "tessera_node_allocated{",
    ] {
        assert!(m.contains(name), "metrics lack {name}:\n{m}");
    }
    let (s, doc) = Http {
        url: up.url.clone(),
        token: None,
    }
    .get("/v1/openapi.json");
    assert_eq!(s, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/jobs",
        "/v1/jobs/{id}/logs",
        "/v1/nodes",
        "/v1/teams",
        "/v1/tokens",
        "/tasks",
    ] {
        assert!(doc["paths"][path].is_object(), "OpenAPI lacks {path}");
    }
    let (s, _) = Http {
        url: up.url.clone(),
        token: None,
    }
    .get("/healthz");
    assert_eq!(s, 200);
}

#[test]
fn gpus_from_nvidia_smi_output_are_scheduled_and_isolated() {
    let xml = fixture("fixtures/gpu/h100/nvidia-smi-q.xml");
    let up = Up::start(&["--gpu-xml", xml.to_str().unwrap()]);
    let nodes = up.cli_ok(&["nodes"]);
    assert!(nodes.contains("H100"), "{nodes}");
    let id = job_id(&up.cli_ok(&[
        "run",
        "-o",
        "json",
        "--gpu",
        "1",
        "--",
        "/bin/sh",
        "-c",
        "echo gpus=$CUDA_VISIBLE_DEVICES",
    ]));
    up.wait_state(id, &["succeeded"], 20);
    assert_eq!(up.cli_ok(&["logs", &id.to_string()]), "gpus=0\n");
    let id = job_id(&up.cli_ok(&[
        "run",
        "-o",
        "json",
        "--",
        "/bin/sh",
        "-c",
        "echo gpus=[$CUDA_VISIBLE_DEVICES]",
    ]));
    up.wait_state(id, &["succeeded"], 20);
    assert_eq!(up.cli_ok(&["logs", &id.to_string()]), "gpus=[]\n");
    let out = up.cli(&["run", "--gpu", "2", "--", "true"]);
    assert!(!out.status.success());
    let (s, e) = up.http().post(
        "/v1/jobs",
        json!({"command": ["true"], "resources": {"gpu": 1, "gpu_models": ["A100"]}}),
    );
    assert_eq!(s, 422, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("A100"));
}

#[test]
fn sigterm_stops_running_work_and_requeues_it() {
    let mut up = Up::start(&["--kill-grace", "1s"]);
    let id = job_id(&up.cli_ok(&["run", "-o", "json", "--", "sleep", "60"]));
    let pid = up.wait_state(id, &["running"], 20)["replicas"][0]["pid"]
        .as_u64()
        .unwrap();
    let began = Instant::now();
    assert!(up.terminate().success());
    assert!(began.elapsed() < Duration::from_secs(10));
    assert!(!alive(pid), "a replica outlived the server");
    up.start_again();
    let job = up.wait_state(id, &["running"], 20);
    assert_eq!(job["attempt"], 2);
    assert_eq!(job["node_losses"], 1);
    let (_, events) = up.http().get(&format!("/v1/jobs/{id}/events"));
    let text = events.to_string();
    assert!(text.contains("server shut down"), "{text}");
    up.cli_ok(&["cancel", &id.to_string()]);
    up.wait_state(id, &["cancelled"], 20);
}

#[test]
fn a_second_control_plane_on_the_same_home_is_refused_and_changes_nothing() {
    let up = Up::start(&["--node-name", "first"]);
    let id = job_id(&up.cli_ok(&["run", "-o", "json", "--", "sleep", "30"]));
    let pid = up.wait_state(id, &["running"], 20)["replicas"][0]["pid"]
        .as_u64()
        .unwrap();
    let out = Command::new(BIN)
        .args(["up", "--listen", "127.0.0.1:0"])
        .env("TESSERA_HOME", &up.home)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another Tessera control plane is running"),
        "{err}"
    );
    assert!(
        alive(pid),
        "the second start killed the first one's replica"
    );
    assert_eq!(up.wait_state(id, &["running"], 5)["attempt"], 1);
    up.cli_ok(&["cancel", &id.to_string()]);
    up.wait_state(id, &["cancelled"], 20);
}

#[test]
fn a_node_renamed_between_runs_leaves_the_old_name_lost() {
    let mut up = Up::start(&["--node-name", "old-name"]);
    up.terminate();
    up.args = vec!["--node-name".into(), "new-name".into()];
    up.start_again();
    let nodes: Value = serde_json::from_str(&up.cli_ok(&["nodes", "-o", "json"])).unwrap();
    let list = nodes
        .as_array()
        .cloned()
        .or_else(|| nodes["nodes"].as_array().cloned())
        .unwrap();
    let state_of = |name: &str| {
        list.iter()
            .find(|n| n["name"] == name)
            .map(|n| n["state"].clone())
    };
    assert_eq!(state_of("old-name"), Some(json!("lost")));
    assert_eq!(state_of("new-name"), Some(json!("ready")));
    for _ in 0..5 {
        let id = job_id(&up.cli_ok(&["run", "-o", "json", "--", "true"]));
        let job = up.wait_state(id, &["succeeded"], 20);
        assert_eq!(job["placement"][0]["node"], "new-name");
    }
}

#[test]
fn sigterm_completes_while_someone_follows_logs() {
    let mut up = Up::start(&["--kill-grace", "1s"]);
    let id = job_id(&up.cli_ok(&["run", "-o", "json", "--", "sleep", "60"]));
    up.wait_state(id, &["running"], 20);
    let mut follower = Command::new(BIN)
        .args(["logs", &id.to_string(), "-f"])
        .env("TESSERA_HOME", &up.home)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(up.terminate().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while follower.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the follower never ended");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn policy_prices_and_team_quotas_from_the_cli() {
    let out = Command::new(BIN)
        .args(["up", "--policy", "nope"])
        .env(
            "TESSERA_HOME",
            std::env::temp_dir().join("tessera-never-used"),
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown policy"));

    let up = Up::start(&["--policy", "drf", "--price-cpu-hour", "3600"]);
    let id = job_id(&up.cli_ok(&["run", "-o", "json", "--cpu", "1", "--", "sleep", "0.2"]));
    let job = up.wait_state(id, &["succeeded"], 20);
    // One core at 3,600 per hour is 1 per second: about 0.2 for 0.2 s.
    let cost = job["cost"].as_f64().unwrap();
    assert!(cost > 0.1 && cost < 2.0, "{job}");

    up.cli_ok(&[
        "team",
        "create",
        "ads",
        "--quota",
        "gpu=4:8",
        "--quota",
        "memory=64Gi",
    ]);
    let ads = up.team("ads");
    assert_eq!(ads["quota"]["guaranteed"]["gpu_milli"], 4000);
    assert_eq!(ads["quota"]["limit"]["gpu_milli"], 8000);
    assert_eq!(ads["quota"]["guaranteed"]["memory_bytes"], 64u64 << 30);
    let out = up.cli(&["team", "set", "ads", "--quota", "gpu=8:4"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("quota.gpu.limit"));
    up.cli_ok(&["team", "set", "ads", "--quota", "none", "--weight", "3"]);
    let ads = up.team("ads");
    assert!(ads["quota"].is_null(), "{ads}");
    assert_eq!(ads["weight"], 3.0);
}

#[test]
fn node_selectors_and_pools_pin_jobs_to_labelled_nodes() {
    let up = Up::start(&["--labels", "region=eu,pool=lab"]);
    // Selected labels the node has: the job runs.
    let id = job_id(&up.cli_ok(&[
        "run",
        "-o",
        "json",
        "--selector",
        "region=eu",
        "--pool",
        "lab",
        "--",
        "true",
    ]));
    let job = up.wait_state(id, &["succeeded"], 20);
    assert_eq!(
        job["spec"]["resources"]["node_selector"]["region"], "eu",
        "{job}"
    );
    assert_eq!(
        job["spec"]["resources"]["node_selector"]["pool"], "lab",
        "{job}"
    );
    // Labels no node has: refused at submission, naming them; nothing queued.
    let out = up.cli(&["run", "--selector", "region=us", "--", "true"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("region=us"), "{err}");
    let (code, body) = up.http().post(
        "/v1/jobs",
        json!({"command": ["true"], "pool": "elsewhere"}),
    );
    assert_eq!(code, 422, "{body}");
    assert!(body.to_string().contains("pool=elsewhere"), "{body}");
    // A contradiction between `pool` and the selector names the field.
    let (code, body) = up.http().post(
        "/v1/jobs",
        json!({"command": ["true"], "pool": "lab", "node_selector": {"pool": "x"}}),
    );
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["error"]["field"], "pool", "{body}");
    let (_, jobs) = up.http().get("/v1/jobs");
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 1, "{jobs}");
}
