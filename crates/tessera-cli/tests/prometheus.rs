//! Monitoring with a real Prometheus: `tessera up` (with GPUs read from a
//! real `nvidia-smi -q -x` capture) and the `prometheus` binary on loopback,
//! configured from `deploy/prometheus.yml` with only the target and the
//! scrape interval changed. The test asserts through Prometheus's HTTP API
//! that PromQL sees what it should: the jobs it ran and their states, a job
//! waiting for capacity, node capacity and allocation, GPU telemetry, cost
//! per team, API requests by route template — and that every PromQL
//! expression in `deploy/grafana/tessera.json` is valid and returns series.
//!
//! Without `prometheus` on PATH (or `TESSERA_PROMETHEUS`) the test says
//! SKIPPED and passes, except where `TESSERA_REQUIRE_PROMETHEUS` is set
//! (`.ci/run` sets it).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{get, Up};
use serde_json::Value;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared")
        .join(rel)
}

/// The Prometheus binary, or None (the test is skipped) when there is none
/// and it is not required.
fn prometheus_bin() -> Option<String> {
    let bin = std::env::var("TESSERA_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
    let found = Command::new(&bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(bin);
    }
    assert!(
        std::env::var_os("TESSERA_REQUIRE_PROMETHEUS").is_none(),
        "no Prometheus ({bin}); install Debian's `prometheus` package (.ci/run does)"
    );
    eprintln!("SKIPPED: no Prometheus ({bin}); install Debian's `prometheus` package");
    None
}

struct Prometheus {
    child: Child,
    addr: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `deploy/prometheus.yml`, scraping `target` every second.
fn config_for(target: &str) -> String {
    let text = std::fs::read_to_string(repo("deploy/prometheus.yml")).unwrap();
    let mut cfg: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    cfg["global"]["scrape_interval"] = "1s".into();
    cfg["global"]["evaluation_interval"] = "1s".into();
    let jobs = cfg["scrape_configs"].as_sequence_mut().unwrap();
    let job = jobs
        .iter_mut()
        .find(|j| j["job_name"] == "tessera")
        .expect("a `tessera` scrape job in deploy/prometheus.yml");
    assert_eq!(job["metrics_path"], "/metrics");
    job["static_configs"][0]["targets"] = serde_yaml::Value::Sequence(vec![target.into()]);
    serde_yaml::to_string(&cfg).unwrap()
}

fn start_prometheus(bin: &str, dir: &Path, target: &str) -> Prometheus {
    let config = dir.join("prometheus.yml");
    std::fs::write(&config, config_for(target)).unwrap();
    let promtool = Path::new(bin).with_file_name("promtool");
    if let Ok(out) = Command::new(&promtool)
        .args(["check", "config"])
        .arg(&config)
        .output()
    {
        assert!(out.status.success(), "promtool check config: {out:?}");
    }
    let addr = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new(bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    let p = Prometheus { child, addr };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if std::net::TcpStream::connect(&p.addr).is_ok() && get(&p.addr, "/-/ready", None).0 == 200
        {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus did not become ready: {}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn encode(q: &str) -> String {
    let mut out = String::new();
    for b in q.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The body of an HTTP/1.1 response as sent: de-chunked when it came in
/// chunks (Prometheus chunks larger answers).
fn dechunk(body: &str) -> String {
    if body.starts_with('{') {
        return body.to_string();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

impl Prometheus {
    /// An instant query: Err with Prometheus's error when the PromQL is bad.
    fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let (status, body) = get(
            &self.addr,
            &format!("/api/v1/query?query={}", encode(promql)),
            None,
        );
        let body = dechunk(&body);
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if status != 200 || v["status"] != "success" {
            return Err(format!("{promql}: {status} {body}"));
        }
        let data = &v["data"];
        Ok(match data["resultType"].as_str() {
            Some("vector") | Some("matrix") => data["result"].as_array().unwrap().clone(),
            _ => vec![data["result"].clone()],
        })
    }

    /// The single value of an instant query (None while it has no series).
    fn value(&self, promql: &str) -> Option<f64> {
        let r = self.query(promql).unwrap();
        assert!(r.len() <= 1, "{promql}: {r:?}");
        r.first()
            .map(|s| s["value"][1].as_str().unwrap().parse().unwrap())
    }

    /// Waits until `promql` returns `want`.
    fn wait_for(&self, promql: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let got = self.value(promql);
            if got.is_some_and(|g| (g - want).abs() < 1e-9) {
                return;
            }
            assert!(Instant::now() < deadline, "{promql}: {got:?}, want {want}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// The PromQL of every panel target of the Grafana dashboard, with the
/// panel's title, and the dashboard's variables replaced as Grafana does
/// with "All" selected.
fn grafana_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo("deploy/grafana/tessera.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            let expr = expr
                .replace("$__rate_interval", "1m")
                .replace("$__range", "5m")
                .replace("$pool", ".*")
                .replace("$team", ".*")
                .replace("$node", ".*");
            assert!(!expr.contains('$'), "an unknown variable in {expr}");
            out.push((p["title"].as_str().unwrap().to_string(), expr));
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" {
            // label_values(METRIC, LABEL): the metric must exist.
            let q = v["query"]["query"].as_str().unwrap();
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .map(|(m, _)| m.replace("$pool", ".*"))
                .expect("label_values(METRIC, LABEL)");
            out.push((format!("variable {}", v["name"]), inner));
        }
    }
    out
}

#[test]
fn prometheus_scrapes_tessera_and_the_dashboard_queries_return_series() {
    let Some(bin) = prometheus_bin() else { return };
    let xml = fixture("fixtures/gpu/h100/nvidia-smi-q-busy.xml");
    let up = Up::start_with(&[
        "--cpu",
        "3",
        "--memory",
        "4Gi",
        "--gpu-xml",
        xml.to_str().unwrap(),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let prom = start_prometheus(&bin, dir.path(), &up.addr);
    prom.wait_for("up{job=\"tessera\"}", 1.0);

    // Two jobs that finish, one in another team that holds every core, and
    // one that must wait for capacity.
    assert!(up.cli(&["team", "create", "ads"]).status.success());
    let run = |args: &[&str]| {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        up.cli_json(&all)["id"].as_u64().unwrap()
    };
    for _ in 0..2 {
        run(&["--cpu", "1", "--gpu", "1", "--", "true"]);
    }
    prom.wait_for("tessera_jobs{team=\"admin\",state=\"succeeded\"}", 2.0);
    run(&[
        "--team", "ads", "--cpu", "3", "--memory", "1Gi", "--", "sleep", "60",
    ]);
    let waiting = run(&["--cpu", "1", "--", "true"]);

    prom.wait_for("tessera_jobs{team=\"ads\",state=\"running\"}", 1.0);
    prom.wait_for(
        "sum(tessera_jobs_pending{team=\"admin\",reason=\"capacity\"})",
        1.0,
    );
    prom.wait_for("sum(tessera_queue_length)", 1.0);
    prom.wait_for("tessera_jobs_submitted_total{team=\"admin\"}", 3.0);
    prom.wait_for("tessera_jobs_submitted_total{team=\"ads\"}", 1.0);
    prom.wait_for(
        "tessera_jobs_finished_total{team=\"admin\",state=\"succeeded\"}",
        2.0,
    );
    // Capacity and allocation, split by pool.
    prom.wait_for(
        "sum by (pool) (tessera_node_allocatable_cpu_cores{pool=\"nodes\"})",
        3.0,
    );
    prom.wait_for(
        "sum(tessera_node_allocatable_memory_bytes)",
        (4u64 << 30) as f64,
    );
    prom.wait_for("sum(tessera_node_allocated_cpu_cores)", 3.0);
    prom.wait_for(
        "sum(tessera_node_allocated_memory_bytes)",
        (1u64 << 30) as f64,
    );
    prom.wait_for("tessera_nodes{pool=\"nodes\",state=\"ready\"}", 1.0);
    let gpus = prom
        .value("sum(tessera_node_allocatable_gpus)")
        .expect("GPU capacity");
    assert!(gpus >= 1.0);
    prom.wait_for("count(tessera_gpu_memory_total_bytes)", gpus);
    prom.wait_for("count(tessera_gpu_healthy == 1)", gpus);
    // GPU telemetry from the agent's heartbeats (the busy capture).
    prom.wait_for("count(tessera_gpu_temperature_celsius > 0)", gpus);
    prom.wait_for("count(tessera_gpu_utilization_ratio > 0)", gpus);
    prom.wait_for(
        "count(tessera_gpu_memory_used_bytes / tessera_gpu_memory_total_bytes > 0)",
        gpus,
    );
    // Cost per team grows while the `ads` job runs (default prices).
    prom.wait_for("count(tessera_team_cost_total{team=\"ads\"} > 0)", 1.0);
    prom.wait_for(
        "count(tessera_team_cpu_seconds_total{team=\"ads\"} > 0)",
        1.0,
    );
    prom.wait_for(
        "count(tessera_team_gpu_seconds_total{team=\"admin\"} > 0)",
        1.0,
    );
    // API requests by route template, never by raw path.
    prom.wait_for(
        "count(tessera_http_requests_total{route=\"/v1/jobs\",method=\"POST\",status=\"2xx\"})",
        1.0,
    );
    let waiting_path = format!("/v1/jobs/{waiting}");
    let raw = prom
        .query(&format!(
            "tessera_http_requests_total{{route=\"{waiting_path}\"}}"
        ))
        .unwrap();
    assert!(raw.is_empty(), "a raw path became a label: {raw:?}");
    // The scheduler's pass histogram.
    assert!(prom
        .value("sum(tessera_scheduler_cycle_duration_seconds_count)")
        .is_some_and(|n| n >= 1.0));

    // Let rate() over 1m windows see at least two samples of each series.
    std::thread::sleep(Duration::from_secs(3));
    let mut empty = Vec::new();
    for (title, expr) in grafana_queries() {
        let result = prom
            .query(&expr)
            .unwrap_or_else(|e| panic!("panel `{title}`: invalid PromQL: {e}"));
        // No service runs here, so the gateway's panels have no series.
        if result.is_empty() && !title.starts_with("Gateway") {
            empty.push(format!("{title}: {expr}"));
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without series:\n{}",
        empty.join("\n")
    );
}
