//! A Ray pool through the built binary, as README.md tells a user: `tessera
//! up`, `tessera pool add ray NAME --address URL`, jobs pinned with
//! `pool: NAME` run in a real Ray cluster (named by
//! `TESSERA_TEST_RAY_ADDRESS`, which `.ci/run` starts), and their output,
//! exit codes and cancellation show through `tessera`. Without a Ray head
//! it prints SKIPPED, unless `TESSERA_REQUIRE_RAY=1`.

mod common;

use std::time::{Duration, Instant};

use common::Up;
use serde_json::Value;

fn ray_address() -> Option<String> {
    match std::env::var("TESSERA_TEST_RAY_ADDRESS") {
        Ok(a) if !a.is_empty() => Some(a),
        _ => {
            if std::env::var("TESSERA_REQUIRE_RAY").as_deref() == Ok("1") {
                panic!("TESSERA_REQUIRE_RAY=1 but TESSERA_TEST_RAY_ADDRESS names no Ray head");
            }
            eprintln!("SKIPPED: set TESSERA_TEST_RAY_ADDRESS to a Ray dashboard URL to run");
            None
        }
    }
}

fn wait_state(up: &Up, id: u64, want: &[&str], secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v = up.cli_json(&["job", &id.to_string()]);
        let job = &v["job"];
        if want.contains(&job["state"].as_str().unwrap_or("")) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} never reached {want:?}: {job}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn submit(up: &Up, yaml: &str) -> u64 {
    let path = up.home().join(format!("job-{}.yaml", yaml.len()));
    std::fs::write(&path, yaml).unwrap();
    let v = up.cli_json(&["submit", path.to_str().unwrap()]);
    v["id"].as_u64().unwrap_or_else(|| panic!("no id in {v}"))
}

/// `wait_state` answers `tessera job ID -o json`: `{"job": ..., "events": [...]}`.
fn events(v: &Value) -> String {
    v["events"].to_string()
}

/// Every Ray job's submission id, and its Tessera job id where it has one.
fn ray_jobs(address: &str) -> Vec<(String, Option<String>)> {
    let hostport = address.trim_start_matches("http://").trim_end_matches('/');
    let (code, body) = common::get(hostport, "/api/jobs/", None);
    assert_eq!(code, 200, "{body}");
    let all: Value = serde_json::from_str(&body).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .map(|j| {
            (
                j["submission_id"].as_str().unwrap_or_default().to_string(),
                j["metadata"]["tessera_job_id"].as_str().map(str::to_string),
            )
        })
        .collect()
}

/// The Ray job this test's Tessera made for job `id` (one Ray did not
/// have before the test), from Ray's own API.
fn ray_job(address: &str, before: &[(String, Option<String>)], id: u64) -> Value {
    let mine: Vec<String> = ray_jobs(address)
        .into_iter()
        .filter(|j| !before.contains(j) && j.1 == Some(id.to_string()))
        .map(|j| j.0)
        .collect();
    assert_eq!(mine.len(), 1, "one Ray job for Tessera job {id}: {mine:?}");
    assert!(mine[0].starts_with("tessera-") && mine[0].ends_with(&format!("-{id}-1")));
    let hostport = address.trim_start_matches("http://").trim_end_matches('/');
    let (code, body) = common::get(hostport, &format!("/api/jobs/{}", mine[0]), None);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn jobs_pinned_to_a_ray_pool_run_in_ray_with_their_logs_and_exit_codes() {
    let Some(address) = ray_address() else {
        return;
    };
    let before = ray_jobs(&address);
    let up = Up::start();

    // Adding a pool checks its options and names the one at fault.
    let out = up.cli(&["pool", "add", "ray", "lab"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("options.address"), "{err}");
    let out = up.cli(&["pool", "add", "ray", "lab", "--address", "ftp://x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("options.address"));

    let added = up.cli_json(&["pool", "add", "ray", "lab", "--address", &address]);
    assert_eq!(added["kind"], "ray", "{added}");
    assert!(added["cpu_milli"].as_u64().unwrap() >= 1000, "{added}");
    let pools = up.cli_json(&["pools"]);
    let lab = &pools[0];
    assert_eq!(lab["name"], "lab", "{pools}");
    assert_eq!(lab["healthy"], true, "{pools}");

    // A job that succeeds: its output comes back through `tessera logs`.
    let ok = submit(
        &up,
        "name: hello-ray\npool: lab\nresources: {cpu: 0.1, memory: 64Mi}\n\
         command: [sh, -c, 'echo \"hello from ray at $RAY_ADDRESS, job $TESSERA_JOB_ID\"']\n",
    );
    // A job that fails with its own exit code.
    let bad = submit(
        &up,
        "name: failing-ray\npool: lab\nresources: {cpu: 0.1, memory: 64Mi}\n\
         script: 'echo about to fail >&2; exit 3'\n",
    );
    // A job cancelled while it runs.
    let long = submit(
        &up,
        "name: long-ray\npool: lab\nresources: {cpu: 0.1, memory: 64Mi}\n\
         command: [sleep, '300']\n",
    );

    let v = wait_state(&up, ok, &["succeeded", "failed"], 120);
    assert_eq!(v["job"]["state"], "succeeded", "{v}");
    assert_eq!(v["job"]["exit_code"], 0, "{v}");
    let logs = String::from_utf8(up.cli(&["logs", &ok.to_string()]).stdout).unwrap();
    assert!(
        logs.contains("hello from ray at 127.0.0.1:") && logs.contains(&format!(", job {ok}\n")),
        "{logs}"
    );
    // It really is Ray's job, under the attempt's key, naming the Tessera job.
    let rj = ray_job(&address, &before, ok);
    assert_eq!(rj["status"], "SUCCEEDED", "{rj}");
    assert_eq!(rj["metadata"]["tessera_job_id"], ok.to_string(), "{rj}");

    let v = wait_state(&up, bad, &["succeeded", "failed"], 120);
    assert_eq!(v["job"]["state"], "failed", "{v}");
    assert_eq!(v["job"]["exit_code"], 3, "{v}");
    let ev = events(&v);
    assert!(
        ev.contains("JOB_ENTRYPOINT_COMMAND_ERROR") && ev.contains("exit code 3"),
        "Ray's words are in the events: {ev}"
    );
    let logs = String::from_utf8(up.cli(&["logs", &bad.to_string()]).stdout).unwrap();
    assert!(logs.contains("about to fail"), "{logs}");

    wait_state(&up, long, &["running"], 120);
    let out = up.cli(&["cancel", &long.to_string()]);
    assert!(out.status.success(), "{out:?}");
    wait_state(&up, long, &["cancelled"], 60);
    let deadline = Instant::now() + Duration::from_secs(30);
    while ray_job(&address, &before, long)["status"] != "STOPPED" {
        assert!(
            Instant::now() < deadline,
            "{}",
            ray_job(&address, &before, long)
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A job too big for any Ray node is refused at submission.
    let path = up.home().join("big.yaml");
    std::fs::write(&path, "pool: lab\nresources: {cpu: 64}\ncommand: [true]\n").unwrap();
    let out = up.cli(&["submit", path.to_str().unwrap()]);
    assert!(!out.status.success(), "{out:?}");
}
