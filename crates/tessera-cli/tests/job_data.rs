//! Jobs that read and write datasets, black-box: `tessera up` in a scratch
//! home, datasets uploaded with `tessera data upload`, and job specs with
//! `inputs:` and `outputs:` submitted with `tessera submit`, as README.md
//! shows them.

mod common;

use std::time::{Duration, Instant};

use common::Up;
use serde_json::Value;

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn submit(up: &Up, yaml: &str) -> std::process::Output {
    let path = up.dir.path().join("job.yaml");
    std::fs::write(&path, yaml).unwrap();
    up.cli(&["-o", "json", "submit", path.to_str().unwrap()])
}

fn submit_ok(up: &Up, yaml: &str) -> u64 {
    let out = ok(&submit(up, yaml));
    let job: Value = serde_json::from_str(&out).unwrap();
    job["id"].as_u64().unwrap()
}

/// Waits until job `id` has ended; returns its record.
fn wait_end(up: &Up, id: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = up.cli_json(&["job", &id.to_string()]);
        let state = v["job"]["state"].as_str().unwrap().to_string();
        if !matches!(state.as_str(), "queued" | "scheduled" | "running") {
            return v["job"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "job {id} did not end: {:#}",
            v["job"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn upload_inputs(up: &Up) {
    let dir = up.dir.path();
    std::fs::write(dir.join("v1.csv"), "user_id,amount\n1,2.5\n2,1.0\n").unwrap();
    std::fs::write(dir.join("v2.csv"), "user_id,amount\n3,4.0\n").unwrap();
    ok(&up.cli(&[
        "data",
        "upload",
        "clicks",
        dir.join("v1.csv").to_str().unwrap(),
    ]));
    ok(&up.cli(&[
        "data",
        "upload",
        "clicks",
        dir.join("v2.csv").to_str().unwrap(),
    ]));
    std::fs::create_dir_all(dir.join("weights/sub")).unwrap();
    std::fs::write(dir.join("weights/tokenizer.txt"), "hello tokens\n").unwrap();
    std::fs::write(dir.join("weights/sub/layer.bin"), [7u8; 300]).unwrap();
    ok(&up.cli(&[
        "data",
        "upload",
        "weights",
        dir.join("weights").to_str().unwrap(),
    ]));
}

#[test]
fn a_job_reads_pinned_versions_and_its_outputs_become_versions() {
    let up = Up::start();
    upload_inputs(&up);
    let id = submit_ok(
        &up,
        r#"
name: train
script: |
  set -e
  ls train > seen-train.txt
  test "$(ls train | grep -c '\.parquet$')" -ge 1
  test "$(cat w/tokenizer.txt)" = "hello tokens"
  test "$(stat -c %a w/tokenizer.txt)" = 444
  test "$(stat -c %a w/sub)" = 555
  test -d "$TESSERA_INPUT_TRAIN"
  mkdir -p out/nested metrics
  cp w/tokenizer.txt out/tokenizer.txt
  echo trained > out/nested/model.bin
  printf 'epoch,loss\n1,0.5\n2,0.25\n3,0.125\n' > metrics/loss.csv
inputs:
  - {dataset: clicks, version: 1, as: train}
  - {dataset: admin.weights, as: w}
outputs:
  - {dataset: ckpt, from: out/}
  - {dataset: losses, from: metrics, format: csv}
"#,
    );
    let job = wait_end(&up, id);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    // The record names exactly what it read and wrote.
    assert_eq!(job["spec"]["inputs"][0]["dataset"], "admin.clicks");
    assert_eq!(job["spec"]["inputs"][0]["version"], 1);
    assert_eq!(job["spec"]["inputs"][1]["version"], 1, "latest, pinned");
    assert_eq!(
        job["wrote"],
        serde_json::json!(["admin.ckpt@1", "admin.losses@1"])
    );
    assert!(
        job["reason"]
            .as_str()
            .unwrap()
            .contains("wrote admin.ckpt@1"),
        "{job:#}"
    );
    // Lineage on the versions, and the files as the job left them.
    let ckpt = up.cli_json(&["data", "show", "ckpt"]);
    let v = &ckpt["versions"][0];
    assert_eq!(v["operation"], "job");
    assert_eq!(v["job"], id);
    assert_eq!(
        v["inputs"],
        serde_json::json!(["admin.clicks@1", "admin.weights@1"])
    );
    let paths: Vec<&str> = ckpt["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["nested/model.bin", "tokenizer.txt"]);
    assert_eq!(ckpt["dataset"]["kind"], "files");
    // And they come back out as they went in.
    let dl = up.dir.path().join("dl");
    ok(&up.cli(&["data", "download", "ckpt@1", "--out", dl.to_str().unwrap()]));
    assert_eq!(
        std::fs::read_to_string(dl.join("tokenizer.txt")).unwrap(),
        "hello tokens\n"
    );
    assert_eq!(
        std::fs::read_to_string(dl.join("nested/model.bin")).unwrap(),
        "trained\n"
    );
    let again = up.cli(&["data", "download", "ckpt", "--out", dl.to_str().unwrap()]);
    assert!(!again.status.success(), "downloaded into a full directory");
    let losses = up.cli_json(&["data", "show", "losses"]);
    assert_eq!(losses["dataset"]["kind"], "table");
    assert_eq!(losses["versions"][0]["rows"], 3);
    let out = ok(&up.cli(&[
        "-o",
        "json",
        "data",
        "query",
        "SELECT sum(loss) AS s FROM losses",
    ]));
    let row: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(row["s"], 0.875);
    // Version 1 of clicks is the one the job saw: one data file, 2 rows.
    let log = ok(&up.cli(&["logs", &id.to_string()]));
    assert!(log.is_empty(), "{log}");

    // A second run appends to the table and adds a file-set version.
    let id2 = submit_ok(
        &up,
        r#"
script: "mkdir -p out m && echo v2 > out/model.bin && printf 'epoch,loss\n4,0.1\n' > m/more.csv"
inputs: [{dataset: ckpt}]
outputs:
  - {dataset: ckpt, from: out}
  - {dataset: losses, from: m, mode: append}
"#,
    );
    let job2 = wait_end(&up, id2);
    assert_eq!(job2["state"], "succeeded", "{job2:#}");
    assert_eq!(
        job2["wrote"],
        serde_json::json!(["admin.ckpt@2", "admin.losses@2"])
    );
    let losses = up.cli_json(&["data", "show", "losses"]);
    assert_eq!(losses["versions"][1]["rows"], 4);
    assert_eq!(
        losses["versions"][1]["inputs"],
        serde_json::json!(["admin.ckpt@1"])
    );
}

#[test]
fn failed_jobs_and_bad_outputs_write_no_version() {
    let up = Up::start();
    upload_inputs(&up);
    // The job fails after writing its output directory: nothing is kept.
    let id = submit_ok(
        &up,
        "script: 'mkdir -p out && echo x > out/a && exit 3'\noutputs: [{dataset: never, from: out}]\n",
    );
    let job = wait_end(&up, id);
    assert_eq!(job["state"], "failed");
    assert!(job.get("wrote").is_none(), "{job:#}");
    assert!(!up.cli(&["data", "show", "never"]).status.success());

    // It succeeds but leaves no such directory: it fails, naming the output.
    let id = submit_ok(
        &up,
        "command: ['true']\noutputs: [{dataset: missing, from: out}]\n",
    );
    let job = wait_end(&up, id);
    assert_eq!(job["state"], "failed", "{job:#}");
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.contains("outputs[0]") && reason.contains("no directory out"),
        "{reason}"
    );
    let ds = up.cli_json(&["data", "show", "missing"]);
    assert!(ds["versions"].as_array().unwrap().is_empty(), "{ds:#}");

    // A table output whose files do not parse: failed, no version.
    let id = submit_ok(
        &up,
        "script: \"mkdir -p t && printf 'a,b\\\\n1\\\\n1,2,3\\\\n' > t/x.csv\"\noutputs: [{dataset: ragged, from: t, format: csv}]\n",
    );
    let job = wait_end(&up, id);
    assert_eq!(job["state"], "failed", "{job:#}");
    let ds = up.cli_json(&["data", "show", "ragged"]);
    assert!(ds["versions"].as_array().unwrap().is_empty(), "{ds:#}");

    // Refused at submission, each naming its field; no job is created.
    let before = up.cli_json(&["jobs"]);
    for (spec, field, words) in [
        (
            "command: ['true']\ninputs: [{dataset: nosuch}]\n",
            "inputs[0].dataset",
            "no dataset admin.nosuch",
        ),
        (
            "command: ['true']\ninputs: [{dataset: clicks, version: 9}]\n",
            "inputs[0].version",
            "versions 1 to 2",
        ),
        (
            "command: ['true']\ninputs: [{dataset: clicks, as: ../up}]\n",
            "inputs[0].as",
            "not a directory name",
        ),
        (
            "command: ['true']\noutputs: [{dataset: x, from: /etc}]\n",
            "outputs[0].from",
            "inside the working directory",
        ),
        (
            "command: ['true']\noutputs: [{dataset: clicks, from: out, format: files}]\n",
            "outputs[0].format",
            "is a table",
        ),
    ] {
        let out = submit(&up, spec);
        assert!(!out.status.success(), "{spec} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field) && err.contains(words), "{spec}: {err}");
    }
    assert_eq!(up.cli_json(&["jobs"]), before);
}

#[test]
fn residency_labels_decide_where_a_reading_job_may_run() {
    let up = Up::start();
    let dir = up.dir.path();
    std::fs::write(dir.join("p.csv"), "id,name\n1,anna\n").unwrap();
    ok(&up.cli(&["data", "create", "people", "--label", "region=eu"]));
    ok(&up.cli(&[
        "data",
        "upload",
        "people",
        dir.join("p.csv").to_str().unwrap(),
    ]));
    // This machine's node is not in the EU: a job reading the data fits nowhere.
    let out = submit(&up, "command: ['true']\ninputs: [{dataset: people}]\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("region=eu") || err.contains("region"), "{err}");
    // Nor may it ask for another region.
    let out = submit(
        &up,
        "command: ['true']\nnode_selector: {region: us}\ninputs: [{dataset: people}]\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("inputs[0].dataset") && err.contains("region=eu"),
        "{err}"
    );
    drop(up);

    // On a node labelled region=eu it runs, and the record says why.
    let up = Up::start_with(&["--labels", "region=eu"]);
    let dir = up.dir.path();
    std::fs::write(dir.join("p.csv"), "id,name\n1,anna\n").unwrap();
    ok(&up.cli(&["data", "create", "people", "--label", "region=eu"]));
    ok(&up.cli(&[
        "data",
        "upload",
        "people",
        dir.join("p.csv").to_str().unwrap(),
    ]));
    let id = submit_ok(
        &up,
        "command: ['ls', 'people']\ninputs: [{dataset: people}]\n",
    );
    let job = wait_end(&up, id);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["spec"]["resources"]["node_selector"]["region"], "eu");
}

#[test]
fn outputs_cut_off_by_a_crash_are_written_once_after_the_restart() {
    let mut up = Up::start();
    // The job kills the server (-9) a moment after it exits, while its
    // 64 MiB output is being written (from its own session, which outlives
    // the replica's process group). The job waits until the killer is in
    // that session: until then it is in the group, which goes with the job.
    let server = up.child.id();
    let id = submit_ok(
        &up,
        &format!(
            "script: 'mkdir -p out && head -c 67108864 /dev/urandom > out/big.bin && setsid -f sh -c \"echo \\$\\$ > detached; sleep 0.3; kill -9 {server}\" >/dev/null 2>&1; until [ -e detached ]; do sleep 0.01; done'\noutputs: [{{dataset: big, from: out}}]\n"
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while up.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the job did not kill the server: {:#}",
            up.cli_json(&["job", &id.to_string()])
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    up.kill9_and_restart(&[]);
    let job = wait_end(&up, id);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["wrote"], serde_json::json!(["admin.big@1"]));
    let events = up.cli_json(&["job", &id.to_string()])["events"].clone();
    let resumed = events.as_array().unwrap().iter().any(|e| {
        e["message"]
            .as_str()
            .unwrap_or("")
            .contains("restarted while the outputs")
    });
    assert!(resumed, "the write was not cut off: {events:#}");
    let show = up.cli_json(&["data", "show", "big"]);
    let versions = show["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1, "{show:#}");
    assert_eq!(versions[0]["job"], id);
    assert_eq!(versions[0]["bytes"], 67108864);
}

#[test]
fn staged_inputs_are_removed_once_no_job_needs_them_and_staged_again_on_demand() {
    let up = Up::start_with(&["--staged-inputs-idle", "1s"]);
    upload_inputs(&up);
    // The job reads its input only after the idle time has passed twice:
    // what a job that has not ended reads stays.
    let id = submit_ok(
        &up,
        "command: ['sh', '-c', 'sleep 3; cat clicks/*.parquet > /dev/null && ls clicks']\ninputs: [{dataset: clicks, version: 1}]\n",
    );
    let job = wait_end(&up, id);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let staged = std::path::PathBuf::from(job["spec"]["inputs"][0]["path"].as_str().unwrap());
    assert!(
        staged.starts_with(up.home()),
        "staged under the home: {}",
        staged.display()
    );
    // Once it has ended, its input goes after the idle time.
    let deadline = Instant::now() + Duration::from_secs(20);
    while staged.exists() {
        assert!(
            Instant::now() < deadline,
            "{} is still staged",
            staged.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A later job asking for the same version gets it staged again.
    let id = submit_ok(
        &up,
        "command: ['sh', '-c', 'cat clicks/*.parquet > /dev/null && ls clicks']\ninputs: [{dataset: clicks, version: 1}]\n",
    );
    let job = wait_end(&up, id);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(
        job["spec"]["inputs"][0]["path"],
        staged.display().to_string()
    );
}
