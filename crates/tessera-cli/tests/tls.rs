//! Black-box tests of TLS between the control plane, its agents and the
//! command line, on loopback: a self-signed certificate made by
//! `tessera server --tls` and pinned by agents, a given certificate
//! (`--tls-cert`/`--tls-key`) trusted through its CA, and the refusals when
//! the certificate is not trusted.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

const SERVER_FLAGS: &[&str] = &[
    "--heartbeat",
    "500ms",
    "--node-lease",
    "6s",
    "--kill-grace",
    "500ms",
];

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

fn config_value(home: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(home.join("config")).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

struct Pool {
    dir: tempfile::TempDir,
    port: u16,
    server: Option<Child>,
    agents: Vec<Child>,
}

impl Pool {
    fn new() -> Pool {
        Pool {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            server: None,
            agents: Vec::new(),
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn server_home(&self) -> PathBuf {
        self.path("server")
    }

    fn start_server(&mut self, tls: &[&str]) {
        let home = self.server_home();
        std::fs::create_dir_all(&home).unwrap();
        let _ = std::fs::remove_file(home.join("config"));
        let child = Command::new(BIN)
            .arg("server")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(SERVER_FLAGS)
            .args(tls)
            .env("TESSERA_HOME", &home)
            .stdin(Stdio::null())
            .stdout(log_file(self.path("server.log")))
            .stderr(log_file(self.path("server.log")))
            .spawn()
            .unwrap();
        self.server = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !home.join("config").exists() {
            assert!(
                Instant::now() < deadline,
                "server did not start: {}",
                std::fs::read_to_string(self.path("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The config is written just before serving begins.
        std::thread::sleep(Duration::from_millis(100));
    }

    fn stop_server(&mut self) {
        if let Some(mut c) = self.server.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Starts `tessera agent` with `args` after the common ones.
    fn spawn_agent(&mut self, name: &str, args: &[&str]) -> Child {
        let home = self.path(name);
        std::fs::create_dir_all(&home).unwrap();
        Command::new(BIN)
            .arg("agent")
            .arg("--server")
            .arg(self.url())
            .arg("--name")
            .arg(name)
            .args(["--no-cgroups", "--kill-grace", "500ms", "--cpu", "2"])
            .args(args)
            .env("TESSERA_HOME", &home)
            .stdin(Stdio::null())
            .stdout(log_file(self.path(&format!("{name}.log"))))
            .stderr(log_file(self.path(&format!("{name}.log"))))
            .spawn()
            .unwrap()
    }

    fn start_agent(&mut self, name: &str, args: &[&str]) {
        let child = self.spawn_agent(name, args);
        self.agents.push(child);
    }

    /// The command line with `TESSERA_HOME=home` and `env` set.
    fn cli_in(&self, home: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("TESSERA_HOME", home)
            .env_remove("TESSERA_URL")
            .env_remove("TESSERA_TOKEN")
            .env_remove("TESSERA_PIN")
            .env_remove("TESSERA_CA");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    /// The command line as on the server machine: its home's config and token.
    fn cli_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.cli_in(&self.server_home(), &[], &all);
        assert!(
            out.status.success(),
            "tessera {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn join_token(&self) -> String {
        let created = self.cli_json(&["join-token", "create", "--uses", "10"]);
        created["token"].as_str().unwrap().to_string()
    }

    fn wait_ready(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let nodes = self.cli_json(&["nodes"]);
            let ready = nodes
                .as_array()
                .map(|a| a.iter().filter(|n| n["state"] == "ready").count())
                .unwrap_or(0);
            if ready >= n {
                return;
            }
            assert!(Instant::now() < deadline, "nodes not ready: {nodes}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a job with `--follow` and returns what it printed.
    fn run_job(&self, script: &str) -> String {
        let out = self.cli_in(
            &self.server_home(),
            &[],
            &["run", "-f", "--cpu", "0.5", "--", "sh", "-c", script],
        );
        assert!(
            out.status.success(),
            "job failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn wait_log(&self, name: &str, needle: &str, times: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text =
                std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default();
            if text.matches(needle).count() >= times {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "`{needle}` not {times}x in {name}'s log: {text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for mut a in self.agents.drain(..) {
            let _ = a.kill();
            let _ = a.wait();
        }
        self.stop_server();
    }
}

/// Waits for a process to exit by itself and returns its log.
fn exits(mut child: Child, log: &Path) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, std::fs::read_to_string(log).unwrap_or_default());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "did not exit: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_self_signed_server_is_pinned_by_agents_and_the_command_line() {
    let mut p = Pool::new();
    p.start_server(&["--tls"]);
    let home = p.server_home();
    assert_eq!(config_value(&home, "url"), Some(p.url()));
    let pin = config_value(&home, "tls_fingerprint").expect("fingerprint in the config");
    assert!(pin.starts_with("sha256:") && pin.len() == 7 + 64, "{pin}");
    let cert = home.join("tls").join("cert.pem");
    assert_eq!(
        config_value(&home, "ca").map(PathBuf::from),
        Some(cert.clone())
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(home.join("tls").join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let log = std::fs::read_to_string(p.path("server.log")).unwrap();
    assert!(log.contains(&pin), "the fingerprint is printed: {log}");

    // join-token create shows the agent command with the pin.
    let out = p.cli_in(&home, &[], &["join-token", "create"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("--server {} --pin {pin} --join-token", p.url())),
        "{}",
        text(&out)
    );

    let join = p.join_token();
    // An agent with the wrong pin is refused before it sends its token.
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let child = p.spawn_agent("bad", &["--pin", &wrong, "--join-token", &join]);
    let (status, log) = exits(child, &p.path("bad.log"));
    assert!(!status.success());
    assert!(
        log.contains("does not match the pinned") && log.contains(&pin),
        "a clear refusal: {log}"
    );
    assert!(!p.path("bad").join("agent").join("credential.json").exists());

    // The right pin: the agent joins, runs a job and ships its logs.
    p.start_agent("a1", &["--pin", &pin, "--join-token", &join]);
    p.wait_ready(1);
    let out = p.run_job("echo hello over tls from $TESSERA_JOB_ID");
    assert!(out.contains("hello over tls from"), "{out}");
    let cred = std::fs::read_to_string(p.path("a1").join("agent").join("credential.json")).unwrap();
    assert!(cred.contains(&pin), "the pin is kept: {cred}");

    // A restarted agent needs no flags: the pin came with the credential.
    let mut a = p.agents.pop().unwrap();
    a.kill().unwrap();
    a.wait().unwrap();
    p.start_agent("a1", &[]);
    p.wait_log("a1", "connected", 2);
    let out = p.run_job("echo again");
    assert!(out.contains("again"), "{out}");

    // The command line elsewhere: the pin from the environment works;
    // without trust, or with the wrong pin, a clear error.
    let token = std::fs::read_to_string(home.join("admin.token")).unwrap();
    let elsewhere = p.path("client");
    let url = p.url();
    let base = [
        ("TESSERA_URL", url.as_str()),
        ("TESSERA_TOKEN", token.trim()),
    ];
    let with = |extra: &[(&str, &str)]| {
        let mut env = base.to_vec();
        env.extend_from_slice(extra);
        p.cli_in(&elsewhere, &env, &["nodes"])
    };
    let out = with(&[("TESSERA_PIN", &pin)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("a1"), "{}", text(&out));
    let ca = cert.display().to_string();
    let out = with(&[("TESSERA_CA", &ca)]);
    assert!(
        out.status.success(),
        "the certificate as CA: {}",
        text(&out)
    );
    let out = with(&[]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no server certificate is trusted")
            && text(&out).contains("TESSERA_PIN"),
        "{}",
        text(&out)
    );
    let out = with(&[("TESSERA_PIN", &wrong)]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("TLS") && text(&out).contains("does not match the pinned"),
        "{}",
        text(&out)
    );

    // A restart keeps the certificate, so pins stay valid.
    p.stop_server();
    p.start_server(&["--tls"]);
    assert_eq!(config_value(&home, "tls_fingerprint"), Some(pin));
    p.wait_log("a1", "connected", 3);
    // SIGTERM stops the HTTPS server promptly, with the agent connected.
    let server = p.server.take().unwrap();
    nix_kill(server.id(), "TERM");
    let (status, _) = exits(server, &p.path("server.log"));
    assert!(status.success(), "{status:?}");
}

fn nix_kill(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[test]
fn a_given_certificate_is_trusted_through_its_ca() {
    let mut p = Pool::new();
    // A CA and a server certificate it signed.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let (ca_file, cert_file, key_file) = (p.path("ca.pem"), p.path("cert.pem"), p.path("key.pem"));
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let (cert_arg, key_arg) = (
        cert_file.display().to_string(),
        key_file.display().to_string(),
    );
    p.start_server(&["--tls-cert", &cert_arg, "--tls-key", &key_arg]);
    let home = p.server_home();
    let pin = config_value(&home, "tls_fingerprint").unwrap();
    assert!(!home.join("tls").exists(), "nothing self-signed is made");
    assert_eq!(config_value(&home, "ca"), None);

    let join = p.join_token();
    // An agent that trusts another CA is refused.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(p.path("other.pem"), other.cert.pem()).unwrap();
    let other_arg = p.path("other.pem").display().to_string();
    let child = p.spawn_agent("bad", &["--ca", &other_arg, "--join-token", &join]);
    let (status, log) = exits(child, &p.path("bad.log"));
    assert!(!status.success());
    assert!(log.contains("certificate"), "{log}");

    // One with the CA joins and runs a job.
    let ca_arg = ca_file.display().to_string();
    p.start_agent("a1", &["--ca", &ca_arg, "--join-token", &join]);
    p.wait_ready(1);
    let out = p.run_job("echo signed by a ca");
    assert!(out.contains("signed by a ca"), "{out}");

    // The command line with the CA, or with the server's pin.
    let token = std::fs::read_to_string(home.join("admin.token")).unwrap();
    let url = p.url();
    for trust in [
        ("TESSERA_CA", ca_arg.as_str()),
        ("TESSERA_PIN", pin.as_str()),
    ] {
        let out = p.cli_in(
            &p.path("client"),
            &[
                ("TESSERA_URL", &url),
                ("TESSERA_TOKEN", token.trim()),
                trust,
            ],
            &["nodes"],
        );
        assert!(out.status.success(), "{trust:?}: {}", text(&out));
    }
}
