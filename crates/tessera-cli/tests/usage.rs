//! Accounting, black-box: `tessera up` with a known price, real jobs
//! (one retried), then `tessera usage` as a user runs it — CSV, JSON and
//! the table — over whole and cut ranges, per team and per job, with a
//! member's view, and the same numbers after a restart.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Up, BIN};
use serde_json::Value;

/// One CPU core costs 3,600 an hour (1 a second); memory and GPUs nothing,
/// so a job's cost is its core-seconds.
const PRICES: &[&str] = &[
    "--price-cpu-hour",
    "3600",
    "--price-memory-gib-hour",
    "0",
    "--price-gpu-hour",
    "0",
];

fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn run_job(up: &Up, args: &[&str]) -> u64 {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    up.cli_json(&all)["id"].as_u64().unwrap()
}

fn wait_done(up: &Up, id: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job = up.cli_json(&["job", &id.to_string()])["job"].clone();
        if matches!(job["state"].as_str(), Some("succeeded" | "failed")) {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} did not end: {job}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// CSV lines as maps from the header's names to the cells.
fn parse_csv(text: &str) -> Vec<std::collections::BTreeMap<String, String>> {
    let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
    let header: Vec<&str> = lines.next().expect("a header line").split(',').collect();
    lines
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            assert_eq!(cells.len(), header.len(), "{l}");
            header
                .iter()
                .zip(cells)
                .map(|(h, c)| (h.to_string(), c.to_string()))
                .collect()
        })
        .collect()
}

fn num(row: &std::collections::BTreeMap<String, String>, col: &str) -> f64 {
    row[col]
        .parse()
        .unwrap_or_else(|_| panic!("{col} in {row:?}"))
}

/// Stops `up` with SIGTERM and starts it again on the same home.
fn restart(up: &mut Up) {
    Command::new("kill")
        .args(["-TERM", &up.child.id().to_string()])
        .status()
        .unwrap();
    up.child.wait().unwrap();
    let home = up.home();
    std::fs::remove_file(home.join("config")).unwrap();
    let log = std::fs::File::create(up.dir.path().join("up2.log")).unwrap();
    up.child = Command::new(BIN)
        .args(["up", "--listen", "127.0.0.1:0", "--no-cgroups"])
        .args(PRICES)
        .env("TESSERA_HOME", &home)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !home.join("config").exists() {
        assert!(Instant::now() < deadline, "tessera up did not start again");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn usage_reports_hours_and_cost_per_team_and_job_as_csv_and_survives_a_restart() {
    let mut up = Up::start_with(PRICES);
    ok(up.cli(&["team", "create", "ads"]));
    // Two cores for ~1 s in `ads`; one core, failing once and retried, in
    // `admin`: two attempts of ~0.5 s each.
    let ads = run_job(&up, &["--team", "ads", "--cpu", "2", "--", "sleep", "1"]);
    let retried = run_job(
        &up,
        &[
            "--cpu",
            "1",
            "--retries",
            "1",
            "--",
            "sh",
            "-c",
            "sleep 0.5; exit 3",
        ],
    );
    let ads_job = wait_done(&up, ads);
    let retried_job = wait_done(&up, retried);
    assert_eq!(retried_job["state"], "failed");
    assert_eq!(retried_job["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(ads_job["attempts"][0]["nodes"][0]["pool"], "nodes");

    // Per team, CSV: every team is listed; cost is core-seconds at these
    // prices, and equals what each job recorded it cost.
    let text = ok(up.cli(&["usage", "--since", "1h", "--output", "csv"]));
    assert!(
        text.starts_with("team,gpu_hours,cpu_hours,memory_gib_hours,cost,jobs,attempts\r\n"),
        "{text}"
    );
    let rows = parse_csv(&text);
    let team = |t: &str| rows.iter().find(|r| r["team"] == t).unwrap().clone();
    let (ads_row, admin_row) = (team("ads"), team("admin"));
    let ads_cost = ads_job["cost"].as_f64().unwrap();
    assert!((1.9..5.0).contains(&ads_cost), "{ads_job}");
    assert!(
        (num(&ads_row, "cost") - ads_cost).abs() < 1e-3,
        "{ads_row:?}"
    );
    assert!((num(&ads_row, "cpu_hours") * 3600.0 - ads_cost).abs() < 1e-3);
    assert_eq!(num(&ads_row, "gpu_hours"), 0.0);
    assert!(num(&ads_row, "memory_gib_hours") > 0.0);
    assert_eq!((&*ads_row["jobs"], &*ads_row["attempts"]), ("1", "1"));
    let retried_cost = retried_job["cost"].as_f64().unwrap();
    assert!((0.9..5.0).contains(&retried_cost), "{retried_job}");
    assert!((num(&admin_row, "cost") - retried_cost).abs() < 1e-3);
    assert_eq!((&*admin_row["jobs"], &*admin_row["attempts"]), ("1", "2"));

    // Per job, and a range that starts halfway through the first attempt
    // counts only the rest of it.
    let first = &retried_job["attempts"][0];
    let (start, end) = (
        first["start"].as_u64().unwrap(),
        first["end"].as_u64().unwrap(),
    );
    let mid = (start + end) / 2;
    let by_job = |since: u64, until: u64| {
        parse_csv(&ok(up.cli(&[
            "usage",
            "--by",
            "job",
            "--team",
            "admin",
            "--since",
            &since.to_string(),
            "--until",
            &until.to_string(),
            "-o",
            "csv",
        ])))
    };
    let rows = by_job(mid, end);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["job"], retried.to_string());
    assert_eq!(rows[0]["attempts"], "1");
    let want = (end - mid) as f64 / 1000.0;
    assert!(
        (num(&rows[0], "cost") - want).abs() < 1e-3,
        "{rows:?} want {want}"
    );
    assert!(by_job(start - 10_000, start).is_empty());

    // A member sees their own team, and no other.
    let token = up.cli_json(&["token", "create", "--team", "ads", "--role", "member"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    let member = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("TESSERA_HOME", up.home())
            .env("TESSERA_TOKEN", &token)
            .output()
            .unwrap()
    };
    let mine: Value =
        serde_json::from_str(&ok(member(&["usage", "--since", "1h", "-o", "json"]))).unwrap();
    assert_eq!(mine["team"], "ads");
    assert_eq!(mine["rows"].as_array().unwrap().len(), 1, "{mine}");
    let out = member(&["usage", "--team", "admin"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot see team `admin`"));

    // Bad input names the field; CSV is only for `usage`.
    let out = up.cli(&["usage", "--since", "yesterday"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("since") && err.contains("`yesterday`"),
        "{err}"
    );
    let out = up.cli(&["usage", "--since", "1h", "--until", "2h"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("until"),
        "{out:?}"
    );
    let out = up.cli(&["jobs", "-o", "csv"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // The table: a row per team and the total.
    let table = ok(up.cli(&["usage", "--since", "1h"]));
    assert!(
        table.contains("GPU-HOURS") && table.contains("TOTAL"),
        "{table}"
    );

    // Usage comes from durable records: the same after a restart.
    let before = ok(up.cli(&["usage", "--by", "job", "--since", "1h", "-o", "csv"]));
    restart(&mut up);
    let after = ok(up.cli(&["usage", "--by", "job", "--since", "1h", "-o", "csv"]));
    assert_eq!(parse_csv(&before), parse_csv(&after));
    assert_eq!(parse_csv(&after).len(), 2);
}
