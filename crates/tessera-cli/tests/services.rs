//! Black-box tests of services: `tessera up`, a real Python HTTP server as
//! the service's replicas, and requests through the gateway at `/s/<name>/`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{get, python_with, Up, BIN};

fn kinds(detail: &Value) -> Vec<String> {
    detail["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_service_answers_through_the_gateway_with_keys_and_scales_from_zero() {
    let up = Up::start();
    let v = up.serve(&format!(
        "name: echo\nscript: {}\nresources: {{cpu: 0.2, memory: 128Mi}}\n\
         replicas: {{min: 0, max: 2}}\nreadiness: {{path: /health, interval: 200ms}}\n\
         autoscale: {{scale_to_zero_after: 2s}}\n",
        up.script()
    ));
    assert_eq!(v["name"], "echo");
    up.wait_ready("echo", 1, 20);
    // Paths and queries reach the replica without the /s/<name> prefix.
    let (code, body) = get(&up.addr, "/s/echo/hello?x=1", Some(&up.token));
    assert_eq!((code, body.as_str()), (200, "ok 1 /hello?x=1"));
    // Keys: none → 401; a service key works; a key of another service not.
    assert_eq!(get(&up.addr, "/s/echo/", None).0, 401);
    let key = up.cli_json(&["service-key", "create", "echo"]);
    let key = key["key"].as_str().unwrap().to_string();
    // Keys take effect within a moment of their creation.
    let deadline = Instant::now() + Duration::from_secs(3);
    while get(&up.addr, "/s/echo/", Some(&key)).0 != 200 {
        assert!(Instant::now() < deadline, "the new key never worked");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(&up.addr, "/s/nope/", Some(&key)).0, 404);
    // Idle past scale_to_zero_after: no replica left.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d = up.detail("echo");
        if d["summary"]["desired"] == 0 && d["replicas"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "never scaled to zero: {d:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The first request after that is held while a replica starts: no error.
    let started = Instant::now();
    let (code, body) = get(&up.addr, "/s/echo/again", Some(&key));
    assert_eq!((code, body.as_str()), (200, "ok 1 /again"));
    assert!(started.elapsed() < Duration::from_secs(15));
    let k = kinds(&up.detail("echo"));
    assert!(k.iter().filter(|k| *k == "scale").count() >= 2, "{k:?}");
    // The CLI shows it, with the request rate and p99 latency of the last
    // 10 s.
    let out = up.cli(&["services"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("/s/echo/"));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let list = up.cli_json(&["services"]);
        let s = &list[0];
        if s["p99_ms"].as_f64().is_some_and(|p| p > 0.0) && s["requests_per_s"].as_f64() > Some(0.0)
        {
            break;
        }
        assert!(Instant::now() < deadline, "no rate or p99: {list}");
        get(&up.addr, "/s/echo/", Some(&key));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Metrics carry the gateway's series.
    let (_, metrics) = get(&up.addr, "/metrics", None);
    assert!(
        metrics.contains("tessera_gateway_requests_total"),
        "{metrics}"
    );
}

#[test]
fn server_sent_events_stream_token_by_token() {
    let up = Up::start();
    up.serve(&format!(
        "name: chat\nscript: {}\nresources: {{cpu: 0.2, memory: 128Mi}}\n\
         readiness: {{path: /health, interval: 200ms}}\n",
        up.script()
    ));
    up.wait_ready("chat", 1, 20);
    let mut s = TcpStream::connect(&up.addr).unwrap();
    write!(
        s,
        "GET /s/chat/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        up.token
    )
    .unwrap();
    let started = Instant::now();
    let mut reader = BufReader::new(s);
    let mut first = None;
    let mut tokens = 0;
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap() > 0 {
        if line.starts_with("data: token") {
            tokens += 1;
            first.get_or_insert(started.elapsed());
        }
        line.clear();
    }
    let total = started.elapsed();
    assert_eq!(tokens, 3);
    let first = first.unwrap();
    assert!(
        first + Duration::from_millis(400) < total,
        "the first token ({first:?}) came long before the last ({total:?}): not buffered"
    );
}

#[test]
fn a_rolling_update_under_load_fails_no_request_and_a_dead_replica_is_replaced() {
    let up = Up::start();
    let spec = |v: u32| {
        format!(
            "name: roll\nscript: {}\nenv: {{V: \"{v}\"}}\nresources: {{cpu: 0.2, memory: 128Mi}}\n\
             replicas: {{min: 2, max: 2}}\nreadiness: {{path: /health, interval: 200ms}}\n",
            up.script()
        )
    };
    up.serve(&spec(1));
    up.wait_ready("roll", 2, 30);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, v2) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (stop, ok, failed, v2) = (stop.clone(), ok.clone(), failed.clone(), v2.clone());
            let (addr, token) = (up.addr.clone(), up.token.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (code, body) = get(&addr, "/s/roll/", Some(&token));
                    if code == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if body.starts_with("ok 2") {
                            v2.fetch_add(1, Ordering::Relaxed);
                        }
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let v = up.serve(&spec(2));
    assert_eq!(v["version"], 2);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let d = up.detail("roll");
        let reps = d["replicas"].as_array().unwrap().clone();
        if reps.len() == 2
            && reps
                .iter()
                .all(|r| r["version"] == 2 && r["state"] == "ready")
        {
            break;
        }
        assert!(Instant::now() < deadline, "update never finished: {d:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed");
    assert!(ok.load(Ordering::Relaxed) > 20);
    assert!(v2.load(Ordering::Relaxed) > 0, "traffic moved to version 2");

    // A replica that dies is replaced.
    let d = up.detail("roll");
    let victim = d["replicas"][0]["job_id"].as_u64().unwrap();
    up.cli(&["cancel", &victim.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = up.detail("roll");
        let ids: Vec<u64> = d["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["state"] == "ready")
            .map(|r| r["job_id"].as_u64().unwrap())
            .collect();
        if ids.len() == 2 && !ids.contains(&victim) {
            break;
        }
        assert!(Instant::now() < deadline, "not replaced: {d:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Deleting the service stops its replicas.
    assert!(up.cli(&["serve", "--delete", "roll"]).status.success());
    assert_eq!(get(&up.addr, "/s/roll/", Some(&up.token)).0, 404);
}

/// An OpenAI-compatible stand-in: `/v1/chat/completions` streams one chunk
/// per word of its answer, 150 ms apart, as the real servers do.
const OPENAI_PY: &str = r#"
import json, os, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def chunk(self, obj):
        data = ("data: %s\n\n" % (obj if isinstance(obj, str) else json.dumps(obj))).encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data)); self.wfile.flush()
    def do_GET(self):
        body = b'{"object":"list","data":[{"id":"tiny","object":"model","created":0,"owned_by":"test"}]}'
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        words = ["Hello", " from", " a", " replica", "."]
        if not req.get("stream"):
            body = json.dumps({"id": "c1", "object": "chat.completion", "created": 0, "model": req["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "".join(words)}}]}).encode()
            self.send_response(200); self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body); return
        self.send_response(200); self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked"); self.end_headers()
        for w in words:
            self.chunk({"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": req["model"],
                "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]})
            time.sleep(0.15)
        self.chunk({"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": req["model"],
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        self.chunk("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

/// The client side: the official `openai` package, streaming.
const CLIENT_PY: &str = r#"
import sys, time, json, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2])
full = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
t0 = time.time(); times = []; text = ""
for ch in c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True):
    if ch.choices and ch.choices[0].delta.content:
        times.append(time.time() - t0); text += ch.choices[0].delta.content
print(json.dumps({"full": full.choices[0].message.content, "text": text, "times": times}))
"#;

/// Python with the `openai` package (see `common::python_with`).
fn python_with_openai() -> Option<String> {
    python_with("import openai", "the openai package")
}

#[test]
fn the_openai_client_streams_chat_completions_through_the_gateway() {
    let Some(python) = python_with_openai() else {
        return;
    };
    let up = Up::start();
    let server = up.dir.path().join("openai_server.py");
    std::fs::write(&server, OPENAI_PY).unwrap();
    up.serve(&format!(
        "name: llm\nscript: exec python3 {}\nresources: {{cpu: 0.2, memory: 128Mi}}\n\
         readiness: {{path: /v1/models, interval: 200ms}}\n",
        server.display()
    ));
    up.wait_ready("llm", 1, 20);
    let key = up.cli_json(&["service-key", "create", "llm"]);
    let key = key["key"].as_str().unwrap().to_string();
    let client = up.dir.path().join("client.py");
    std::fs::write(&client, CLIENT_PY).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let out = loop {
        let out = Command::new(&python)
            .arg(&client)
            .arg(format!("http://{}/s/llm/v1", up.addr))
            .arg(&key)
            .output()
            .unwrap();
        // The key may take a moment to reach the gateway.
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["full"], "Hello from a replica.");
    assert_eq!(v["text"], "Hello from a replica.");
    let times: Vec<f64> = v["times"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap())
        .collect();
    assert_eq!(times.len(), 5);
    assert!(
        times[4] - times[0] > 0.45,
        "tokens arrived one by one, not all at the end: {times:?}"
    );
}

/// `tessera gateway` alone: routes from the control plane, `Host`-based
/// routing, and scale from zero through it.
#[test]
fn a_standalone_gateway_serves_routes_from_the_control_plane() {
    let up = Up::start();
    up.serve(&format!(
        "name: solo\nscript: {}\nresources: {{cpu: 0.2, memory: 128Mi}}\n\
         replicas: {{min: 0, max: 1}}\nreadiness: {{path: /health, interval: 200ms}}\n\
         autoscale: {{scale_to_zero_after: 1s}}\n",
        up.script()
    ));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let log = std::fs::File::create(up.dir.path().join("gateway.log")).unwrap();
    let _gw = KillOnDrop(
        Command::new(BIN)
            .args(["gateway", "--listen", &addr, "--domain", "svc.test"])
            .env("TESSERA_HOME", up.home())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "gateway did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Idle: scaled to zero; the request through the standalone gateway is
    // held, reported as demand, and answered once a replica is up.
    let deadline = Instant::now() + Duration::from_secs(20);
    while up.detail("solo")["summary"]["desired"] != 0 {
        assert!(Instant::now() < deadline, "never scaled to zero");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, body) = get(&addr, "/s/solo/x", Some(&up.token));
    assert_eq!((code, body.as_str()), (200, "ok 1 /x"));
    // Host routing: the path is passed unchanged.
    let mut s = TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "GET /y HTTP/1.1\r\nHost: solo.svc.test\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        up.token
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("ok 1 /y"), "{text}");
}

/// A child process stopped when the test ends, passed or not.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Until a replica is first ready it is probed every 20 ms, failed probes
/// included (not only at the loop's 250 ms tick): a replica that says 503
/// for its first 0.6 s logs the probes it gets.
#[test]
fn a_starting_replica_is_probed_often_until_ready() {
    let up = Up::start();
    let server = up.dir.path().join("slow_ready.py");
    let log = up.dir.path().join("probes.log");
    std::fs::write(
        &server,
        format!(
            r#"
import os, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
t0 = time.time()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        open({log:?}, "a").write("%f\n" % time.time())
        self.send_response(200 if time.time() - t0 > 0.6 else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#
        ),
    )
    .unwrap();
    up.serve(&format!(
        "name: slow\nscript: exec python3 {}\nresources: {{cpu: 0.2, memory: 128Mi}}\n\
         readiness: {{path: /health, interval: 5s}}\n",
        server.display()
    ));
    up.wait_ready("slow", 1, 20);
    let times: Vec<f64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let mut gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort_by(f64::total_cmp);
    assert!(gaps.len() >= 4, "probes at {times:?}");
    let median = gaps[gaps.len() / 2];
    assert!(
        median < 0.15,
        "a starting replica was probed every {median:.3}s, not every 20 ms: {times:?}"
    );
}

/// A rolling update under load from a real load generator (`wrk`, which
/// `.ci/run` installs): not one error or non-2xx answer while version 2
/// replaces version 1.
#[test]
fn a_rolling_update_under_wrk_load_fails_no_request() {
    let have_wrk = Command::new("wrk").arg("--version").output().is_ok();
    if !have_wrk {
        assert!(
            std::env::var_os("TESSERA_REQUIRE_PYTHON_CLIENTS").is_none(),
            "wrk is not installed"
        );
        eprintln!("SKIPPED: wrk is not installed");
        return;
    }
    let up = Up::start();
    let spec = |v: u32| {
        format!(
            "name: wrk\nscript: {}\nenv: {{V: \"{v}\"}}\nresources: {{cpu: 0.2, memory: 128Mi}}\n\
             replicas: {{min: 2, max: 2}}\nreadiness: {{path: /health, interval: 200ms}}\n",
            up.script()
        )
    };
    up.serve(&spec(1));
    up.wait_ready("wrk", 2, 30);
    let load = Command::new("wrk")
        .args(["-t1", "-c4", "-d8s", "-H"])
        .arg(format!("Authorization: Bearer {}", up.token))
        .arg(format!("http://{}/s/wrk/", up.addr))
        .output();
    let load = std::thread::spawn(move || load);
    std::thread::sleep(Duration::from_secs(1));
    up.serve(&spec(2));
    let out = load.join().unwrap().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("Non-2xx"),
        "failed requests during the update: {text}"
    );
    assert!(
        !text.contains("Socket errors"),
        "socket errors during the update: {text}"
    );
    let requests: u64 = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(requests > 100, "{text}");
    // The update finished: both replicas run version 2.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = up.detail("wrk");
        let reps = d["replicas"].as_array().unwrap().clone();
        if reps.len() == 2
            && reps
                .iter()
                .all(|r| r["version"] == 2 && r["state"] == "ready")
        {
            break;
        }
        assert!(Instant::now() < deadline, "update never finished: {d:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `tessera up --gateway-domain`: `Host: <service>.<domain>` reaches the
/// service through the built-in gateway, the path unchanged; other hosts
/// reach the API.
#[test]
fn the_built_in_gateway_routes_by_host() {
    let up = Up::start_with(&["--gateway-domain", "svc.test"]);
    up.serve(&format!(
        "name: hosted\nscript: {}\nresources: {{cpu: 0.2, memory: 128Mi}}\n\
         readiness: {{path: /health, interval: 200ms}}\n",
        up.script()
    ));
    up.wait_ready("hosted", 1, 20);
    let mut s = TcpStream::connect(&up.addr).unwrap();
    write!(
        s,
        "GET /z?q=1 HTTP/1.1\r\nHost: hosted.svc.test\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        up.token
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("ok 1 /z?q=1"), "{text}");
    // The API still answers on its own host.
    assert_eq!(get(&up.addr, "/healthz", None).0, 200);
}
