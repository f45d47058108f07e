//! What the black-box tests of services share: `tessera up` in a scratch
//! home (`Up`), a stand-in replica server, a one-shot HTTP GET, and finding
//! a Python with the packages a test's real clients need.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_tessera");

/// A small model-server stand-in: `/` answers `ok <version>`, `/health`
/// answers 200, `/stream` sends three server-sent events 300 ms apart.
pub const SERVER_PY: &str = r#"
import os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
V = os.environ.get("V", "1")
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(3):
                data = ("data: token%d\n\n" % i).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                time.sleep(0.3)
            self.wfile.write(b"0\r\n\r\n")
            return
        body = ("ok %s %s" % (V, self.path)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

pub struct Up {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub addr: String,
    pub token: String,
}

impl Up {
    pub fn start() -> Up {
        Up::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Up {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(dir.path().join("server.py"), SERVER_PY).unwrap();
        let (child, addr, token) = Up::spawn(dir.path(), extra);
        Up {
            child,
            addr,
            dir,
            token,
        }
    }

    /// `kill -9` of the server, then `tessera up` again on the same home.
    pub fn kill9_and_restart(&mut self, extra: &[&str]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(self.home().join("config"));
        let (child, addr, token) = Up::spawn(self.dir.path(), extra);
        self.child = child;
        self.addr = addr;
        self.token = token;
    }

    fn spawn(dir: &std::path::Path, extra: &[&str]) -> (Child, String, String) {
        let home = dir.join("home");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("up.log"))
            .unwrap();
        let child = Command::new(BIN)
            .args([
                "up",
                "--listen",
                "127.0.0.1:0",
                "--no-cgroups",
                "--kill-grace",
                "1s",
            ])
            .args(extra)
            .env("TESSERA_HOME", &home)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let url = loop {
            if let Ok(cfg) = std::fs::read_to_string(home.join("config")) {
                if let Some(u) = cfg.lines().find_map(|l| l.strip_prefix("url = ")) {
                    break u.trim().to_string();
                }
            }
            assert!(Instant::now() < deadline, "tessera up did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        let token = std::fs::read_to_string(home.join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        (child, url.trim_start_matches("http://").to_string(), token)
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .env("TESSERA_HOME", self.home())
            .output()
            .unwrap()
    }

    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        assert!(out.status.success(), "{args:?}: {out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn serve(&self, yaml: &str) -> Value {
        let path = self.dir.path().join("svc.yaml");
        std::fs::write(&path, yaml).unwrap();
        self.cli_json(&["serve", path.to_str().unwrap()])
    }

    pub fn script(&self) -> String {
        format!(
            "exec python3 {}",
            self.dir.path().join("server.py").display()
        )
    }

    pub fn detail(&self, name: &str) -> Value {
        self.cli_json(&["service", name])
    }

    pub fn wait_ready(&self, name: &str, n: u64, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let d = self.detail(name);
            if d["summary"]["ready"].as_u64() == Some(n) {
                return;
            }
            assert!(Instant::now() < deadline, "not {n} ready: {d:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
    }
}

/// One HTTP/1.1 GET; returns (status, body).
pub fn get(addr: &str, path: &str, key: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// A Python (`TESSERA_TEST_PYTHON`, else `python3`) for which `check`
/// runs: `.ci/run` makes one. Without it the test says so (`what` is
/// missing) and passes, except where `TESSERA_REQUIRE_PYTHON_CLIENTS` is set.
pub fn python_with(check: &str, what: &str) -> Option<String> {
    let py = std::env::var("TESSERA_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", check])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(py);
    }
    assert!(
        std::env::var_os("TESSERA_REQUIRE_PYTHON_CLIENTS").is_none(),
        "no Python with {what} (set TESSERA_TEST_PYTHON; .ci/run makes one)"
    );
    eprintln!("SKIPPED: no Python with {what}; set TESSERA_TEST_PYTHON");
    None
}
