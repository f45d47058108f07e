//! Black-box: `tessera up`, `tessera pool add slurm ...`, jobs pinned with
//! `pool:` run in a real Slurm (started by `.ci/slurm-up.sh`), and their
//! logs, exit codes and cost show in `tessera`; pool jobs survive a restart
//! of `tessera up`. Without a Slurm the test prints `SKIPPED` and passes,
//! unless `TESSERA_REQUIRE_SLURM=1` (set by `.ci/run`).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Up, BIN};
use serde_json::Value;

fn slurm_up() -> bool {
    let answers = Command::new("sinfo")
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

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn submit(up: &Up, yaml: &str) -> u64 {
    let path = up.dir.path().join(format!("job-{}.yaml", rand_suffix()));
    std::fs::write(&path, yaml).unwrap();
    let v = up.cli_json(&["submit", path.to_str().unwrap()]);
    v["id"].as_u64().unwrap_or_else(|| panic!("{v}"))
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn job(up: &Up, id: u64) -> Value {
    up.cli_json(&["job", &id.to_string()])
}

fn wait_state(up: &Up, id: u64, want: &[&str], secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let j = job(up, id);
        let state = j["job"]["state"].as_str().unwrap_or("").to_string();
        if want.contains(&state.as_str()) {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} not {want:?}: {j:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Stops `tessera up` with `signal` (`TERM`, as Ctrl-C; `KILL`, a crash)
/// and starts it again on the same home.
fn restart(up: &mut Up, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(up.child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while up.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "tessera up did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    let home = up.home();
    let _ = std::fs::remove_file(home.join("config"));
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(up.dir.path().join("up.log"))
        .unwrap();
    up.child = Command::new(BIN)
        .args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--no-cgroups",
            "--kill-grace",
            "1s",
        ])
        .env("TESSERA_HOME", &home)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(cfg) = std::fs::read_to_string(home.join("config")) {
            if let Some(u) = cfg.lines().find_map(|l| l.strip_prefix("url = ")) {
                up.addr = u.trim().trim_start_matches("http://").to_string();
                return;
            }
        }
        assert!(Instant::now() < deadline, "tessera up did not start again");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn jobs_pinned_to_a_slurm_pool_run_in_slurm_and_show_in_tessera() {
    if !slurm_up() {
        return;
    }
    let mut up = Up::start();

    // Bad input is refused, names its field, and adds nothing.
    let out = up.cli(&[
        "pool",
        "add",
        "slurm",
        "bad",
        "--partition",
        "no-such-partition",
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no-such-partition"), "{}", text(&out));
    let out = up.cli(&["pool", "add", "mesos", "m"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("kind"), "{}", text(&out));
    let out = up.cli(&["pool", "add", "slurm", "x", "--label", "pool=other"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("labels.pool"), "{}", text(&out));
    assert_eq!(up.cli_json(&["pools"]), serde_json::json!([]));

    // A price that makes cost easy to check: one CPU-second costs 1.
    let out = up.cli(&[
        "pool",
        "add",
        "slurm",
        "hpc",
        "--price-cpu-hour",
        "3600",
        "--label",
        "site=lab",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let pools = up.cli_json(&["pools"]);
    let p = &pools[0];
    assert_eq!(p["name"], "hpc");
    assert_eq!(p["healthy"], true, "{p}");
    assert!(p["cpu_milli"].as_u64().unwrap() >= 1000, "{p}");
    assert_eq!(p["labels"]["site"], "lab");
    assert_eq!(p["labels"]["pool.kind"], "slurm");
    let table = text(&up.cli(&["pools"]));
    assert!(
        table.contains("hpc") && table.contains("healthy"),
        "{table}"
    );
    let out = up.cli(&["pool", "add", "slurm", "hpc"]);
    assert!(!out.status.success(), "a second pool of the same name");

    // A job pinned to the pool runs in Slurm; logs, exit code and cost show.
    let ok = submit(
        &up,
        "name: in-slurm\npool: hpc\nscript: echo \"hello from job $TESSERA_JOB_ID in slurm job $SLURM_JOB_ID\"; sleep 3\nresources: {cpu: 1, memory: 64Mi}\n",
    );
    let j = wait_state(&up, ok, &["succeeded", "failed", "lost"], 120);
    assert_eq!(j["job"]["state"], "succeeded", "{j:#}");
    assert_eq!(j["job"]["exit_code"], 0);
    assert_eq!(j["job"]["placement"][0]["node"], "pool-hpc", "{j:#}");
    let logs = text(&up.cli(&["logs", &ok.to_string()]));
    assert!(
        logs.contains(&format!("hello from job {ok} in slurm job ")),
        "{logs}"
    );
    let cost = j["job"]["cost"].as_f64().unwrap();
    assert!(
        (2.0..10.0).contains(&cost),
        "ran ~3 s at 1 per CPU-second, cost {cost}"
    );

    // A failing job: its exit code, and Slurm's own words as an event.
    let bad = submit(
        &up,
        "name: fails\npool: hpc\nscript: echo failing; exit 3\nresources: {cpu: 1, memory: 64Mi}\n",
    );
    let j = wait_state(&up, bad, &["succeeded", "failed", "lost"], 120);
    assert_eq!(j["job"]["state"], "failed", "{j:#}");
    assert_eq!(j["job"]["exit_code"], 3, "{j:#}");
    let events = j["events"].to_string();
    assert!(events.contains("NonZeroExitCode"), "{events}");

    // A gang larger than the pool is refused at submission, with the reason.
    let path = up.dir.path().join("big.yaml");
    std::fs::write(
        &path,
        "name: big\npool: hpc\nscript: 'true'\nresources: {cpu: 1, memory: 64Mi}\nreplicas: 64\n",
    )
    .unwrap();
    let out = up.cli(&["submit", path.to_str().unwrap()]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("fits no node"), "{}", text(&out));

    // Pool jobs outlive a crash of `tessera up`: found again by key, not run twice.
    let long = submit(
        &up,
        "name: survives\npool: hpc\nscript: echo before; sleep 10; echo after\nresources: {cpu: 1, memory: 64Mi}\n",
    );
    wait_state(&up, long, &["running"], 60);
    let out = up.cli(&["pool", "remove", "hpc"]);
    assert!(
        !out.status.success(),
        "a pool running a job cannot be removed"
    );
    restart(&mut up, "KILL");
    let j = job(&up, long);
    assert_eq!(
        j["job"]["state"], "running",
        "still running after the crash: {j:#}"
    );
    // Ctrl-C stops local work, but a pool job runs on in its engine.
    restart(&mut up, "TERM");
    let j = job(&up, long);
    assert_eq!(
        j["job"]["state"], "running",
        "still running after Ctrl-C: {j:#}"
    );
    let j = wait_state(&up, long, &["succeeded", "failed", "lost"], 120);
    assert_eq!(j["job"]["state"], "succeeded", "{j:#}");
    assert_eq!(j["job"]["attempt"], 1, "found again, not run again: {j:#}");
    let logs = text(&up.cli(&["logs", &long.to_string()]));
    assert_eq!(logs, "before\nafter\n");
    assert_eq!(up.cli_json(&["pools"])[0]["healthy"], true);

    // Removed, it is gone from pools and nodes, and stays gone after a restart.
    let out = up.cli(&["pool", "remove", "hpc"]);
    assert!(out.status.success(), "{}", text(&out));
    restart(&mut up, "TERM");
    assert_eq!(up.cli_json(&["pools"]), serde_json::json!([]));
    let nodes = up.cli_json(&["nodes"]).to_string();
    assert!(!nodes.contains("pool-hpc"), "{nodes}");
}
