//! The data lake, black-box: `tessera up` in a scratch home, `tessera data
//! ...` as README.md shows it, raw HTTP for a cut-off upload, and real
//! peers — Python `deltalake` and `duckdb` reading the tables Tessera
//! wrote, and a real S3-compatible server (`moto` in server mode) as the
//! lake's storage.
//!
//! The peers come from `TESSERA_TEST_PYTHON` (`.ci/run` makes a venv with
//! them); without them those parts print `SKIPPED`, except where
//! `TESSERA_REQUIRE_LAKE_PEERS` is set, as in CI.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Up, BIN};
use serde_json::Value;

const CLICKS: &str = "\
user_id,country,amount,day,active
1,fr,2.5,2024-01-03,true
2,de,1.25,2024-01-04,false
3,fr,4.0,2024-02-01,true
4,it,0.5,2024-02-02,true
5,de,3.75,2024-03-09,false
";

/// Appended to every Python script: print, flush, and leave without the
/// interpreter's teardown, which some builds of the deltalake/duckdb/pyarrow
/// wheels abort in ("terminate called without an active exception") after
/// the script has done its work.
const EXIT_CLEANLY: &str = "\nimport os as _os, sys as _sys\n_sys.stdout.flush()\n_os._exit(0)\n";

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn fails(out: &std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// A Python with the lake's peers, or None (and a note) where they are missing.
fn peers_python(check: &str, what: &str) -> Option<String> {
    let py = std::env::var("TESSERA_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let found = Command::new(&py)
        .args(["-c", &format!("{check}{EXIT_CLEANLY}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(py);
    }
    assert!(
        std::env::var_os("TESSERA_REQUIRE_LAKE_PEERS").is_none(),
        "no Python with {what} (set TESSERA_TEST_PYTHON; .ci/run makes one)"
    );
    eprintln!("SKIPPED: no Python with {what}; set TESSERA_TEST_PYTHON");
    None
}

/// The query's rows as JSON values.
fn query(up: &Up, sql: &str) -> Vec<Value> {
    let out = ok(&up.cli(&["-o", "json", "data", "query", sql]));
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn upload_show_query_export_and_real_readers_agree() {
    let up = Up::start();
    let dir = up.dir.path();
    std::fs::write(dir.join("clicks.csv"), CLICKS).unwrap();
    ok(&up.cli(&["data", "create", "clicks", "--label", "region=eu"]));
    let v: Value = serde_json::from_str(&ok(&up.cli(&[
        "-o",
        "json",
        "data",
        "upload",
        "clicks",
        dir.join("clicks.csv").to_str().unwrap(),
    ])))
    .unwrap();
    assert_eq!(v["version"], 1);
    assert_eq!(v["rows"], 5);

    // More rows as version 2; version 1 stays as it was.
    std::fs::write(
        dir.join("more.jsonl"),
        "{\"user_id\": 6, \"country\": \"fr\", \"amount\": 1.0, \"day\": \"2024-04-01\", \"active\": true}\n",
    )
    .unwrap();
    ok(&up.cli(&[
        "data",
        "upload",
        "admin.clicks",
        dir.join("more.jsonl").to_str().unwrap(),
    ]));
    let show = up.cli_json(&["data", "show", "clicks"]);
    let versions = show["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[0]["rows"], 5);
    assert_eq!(versions[1]["rows"], 6);
    assert_eq!(versions[1]["detail"], "more.jsonl (jsonl, append)");
    assert_eq!(show["dataset"]["labels"]["region"], "eu");
    let types: Vec<(String, String)> = show["schema"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        types,
        [
            ("user_id", "bigint"),
            ("country", "string"),
            ("amount", "double"),
            ("day", "date"),
            ("active", "boolean")
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    let (status, doc) = common::get(&up.addr, "/v1/openapi.json", None);
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    for path in ["/v1/datasets", "/v1/datasets/{dataset}/data", "/v1/query"] {
        assert!(doc["paths"][path].is_object(), "OpenAPI lacks {path}");
    }
    let human = ok(&up.cli(&["data", "show", "clicks"]));
    assert!(human.contains("more.jsonl"), "{human}");

    let rows = query(
        &up,
        "SELECT country, count(*) AS n FROM admin.clicks GROUP BY 1 ORDER BY 1",
    );
    assert_eq!(
        rows,
        vec![
            serde_json::json!({"country": "de", "n": 2}),
            serde_json::json!({"country": "fr", "n": 3}),
            serde_json::json!({"country": "it", "n": 1}),
        ]
    );
    assert_eq!(
        query(&up, "SELECT count(*) AS n FROM admin.clicks@1"),
        vec![serde_json::json!({"n": 5})]
    );
    let head = ok(&up.cli(&["data", "head", "clicks@1", "-n", "2"]));
    assert!(
        head.starts_with("user_id") && head.contains("(2 rows"),
        "{head}"
    );
    // Column names beyond ASCII reach the table's header.
    let t = ok(&up.cli(&["data", "query", "SELECT 1 AS \"größe\""]));
    assert!(t.starts_with("größe\n1\n"), "{t}");
    let csv = ok(&up.cli(&[
        "data",
        "query",
        "SELECT user_id FROM clicks ORDER BY user_id",
        "--format",
        "csv",
        "--max-rows",
        "3",
    ]));
    assert_eq!(csv, "user_id\n1\n2\n3\n");
    let out = dir.join("v1.parquet");
    ok(&up.cli(&[
        "data",
        "export",
        "clicks@1",
        "--format",
        "parquet",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(std::fs::read(&out).unwrap().starts_with(b"PAR1"));

    // Real readers: Python deltalake reads the Delta table as it is on
    // disk, and DuckDB reads the Parquet files that table names and the
    // exported file; all three give the CSV's rows with its schema.
    let Some(py) = peers_python(
        "import deltalake, duckdb, pyarrow",
        "deltalake, duckdb and pyarrow",
    ) else {
        return;
    };
    let table = up.home().join("lake/datasets/admin/clicks/table");
    let script = r#"
import json, sys, deltalake, duckdb
path, exported = sys.argv[1], sys.argv[2]
dt = deltalake.DeltaTable(path, version=0)
t = dt.to_pyarrow_table()
schema = [(f.name, str(f.type)) for f in t.schema]
rows = sorted(tuple(str(v) for v in r.values()) for r in t.to_pylist())
files = dt.file_uris()
con = duckdb.connect()
d = con.execute("SELECT * FROM read_parquet(?)", [files]).fetchall()
drows = sorted(tuple(str(v) for v in r) for r in d)
e = con.execute("SELECT * FROM read_parquet(?)", [exported]).fetchall()
erows = sorted(tuple(str(v) for v in r) for r in e)
dschema = [(c[0], c[1]) for c in con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [files]).fetchall()]
latest = deltalake.DeltaTable(path)
print(json.dumps({"version": latest.version(), "schema": schema, "rows": rows, "duckdb": drows,
                  "exported": erows, "duckdb_schema": dschema, "latest_rows": latest.to_pyarrow_table().num_rows}))
"#;
    let out = Command::new(&py)
        .args([
            "-c",
            &format!("{script}{EXIT_CLEANLY}"),
            table.to_str().unwrap(),
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let got: Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(got["version"], 1, "Delta version 1 is Tessera's version 2");
    assert_eq!(got["latest_rows"], 6);
    assert_eq!(
        got["schema"],
        serde_json::json!([
            ["user_id", "int64"],
            ["country", "string"],
            ["amount", "double"],
            ["day", "date32[day]"],
            ["active", "bool"]
        ])
    );
    assert_eq!(
        got["duckdb_schema"],
        serde_json::json!([
            ["user_id", "BIGINT"],
            ["country", "VARCHAR"],
            ["amount", "DOUBLE"],
            ["day", "DATE"],
            ["active", "BOOLEAN"]
        ])
    );
    let mut expected: Vec<Vec<String>> = CLICKS
        .lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .map(|c| match c {
                    "true" => "True".to_string(),
                    "false" => "False".to_string(),
                    c => c.to_string(),
                })
                .collect()
        })
        .collect();
    expected.sort();
    let expected = serde_json::to_value(&expected).unwrap();
    assert_eq!(got["rows"], expected);
    assert_eq!(got["duckdb"], expected);
    assert_eq!(got["exported"], expected);
}

#[test]
fn bad_input_is_refused_whole_with_the_reason() {
    let up = Up::start();
    let dir = up.dir.path();
    std::fs::write(dir.join("clicks.csv"), CLICKS).unwrap();
    ok(&up.cli(&[
        "data",
        "upload",
        "clicks",
        dir.join("clicks.csv").to_str().unwrap(),
    ]));

    // A ragged CSV.
    std::fs::write(
        dir.join("ragged.csv"),
        "user_id,country,amount,day,active\n7,fr,1.0,2024-01-01,true,extra\n",
    )
    .unwrap();
    let err = fails(&up.cli(&[
        "data",
        "upload",
        "clicks",
        dir.join("ragged.csv").to_str().unwrap(),
    ]));
    assert!(
        err.contains("number of fields") && err.contains("no version was created"),
        "{err}"
    );
    // A wrong type in a column.
    std::fs::write(
        dir.join("wrong.csv"),
        "user_id,country,amount,day,active\n7,fr,plenty,2024-01-01,true\n",
    )
    .unwrap();
    let err = fails(&up.cli(&[
        "data",
        "upload",
        "clicks",
        dir.join("wrong.csv").to_str().unwrap(),
    ]));
    assert!(err.contains("plenty"), "{err}");
    // A query with a syntax error.
    let err = fails(&up.cli(&["data", "query", "SELEKT * FROM clicks"]));
    assert!(
        err.contains("SELEKT") || err.contains("syntax") || err.contains("Expected"),
        "{err}"
    );
    // A query on another team's dataset.
    ok(&up.cli(&["team", "create", "vision"]));
    let tok = up.cli_json(&["token", "create", "--team", "vision", "--role", "member"]);
    let vision_token = tok["token"].as_str().unwrap();
    let as_vision = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("TESSERA_HOME", up.home())
            .env("TESSERA_TOKEN", vision_token)
            .output()
            .unwrap()
    };
    let err = fails(&as_vision(&["data", "query", "SELECT * FROM admin.clicks"]));
    assert!(err.contains("has no grant"), "{err}");
    ok(&up.cli(&["data", "grant", "clicks", "--team", "vision"]));
    let rows = ok(&as_vision(&[
        "data",
        "query",
        "SELECT count(*) AS n FROM admin.clicks",
        "--format",
        "csv",
    ]));
    assert_eq!(rows, "n\n5\n");

    // An upload cut off halfway: the connection closes before the body ends.
    let half = &CLICKS.as_bytes()[..CLICKS.len() / 2];
    let mut s = TcpStream::connect(&up.addr).unwrap();
    write!(
        s,
        "PUT /v1/datasets/cut/data?format=csv HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
        up.token,
        CLICKS.len()
    )
    .unwrap();
    s.write_all(half).unwrap();
    s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(!answer.contains(" 201 "), "{answer}");

    // None of it made a version.
    let show = up.cli_json(&["data", "show", "clicks"]);
    assert_eq!(show["versions"].as_array().unwrap().len(), 1, "{show:#}");
    let err = fails(&up.cli(&["data", "show", "cut"]));
    assert!(err.contains("no dataset admin.cut"), "{err}");
    let spool = up.home().join("lake-tmp");
    assert_eq!(std::fs::read_dir(spool).unwrap().count(), 0);
}

#[test]
fn clean_and_file_sets_from_the_command_line() {
    let up = Up::start();
    let dir = up.dir.path();
    std::fs::write(
        dir.join("raw.csv"),
        "user_id,ts,amount\n1,2024-02-01,2.5\n1,2024-02-01,2.5\n,2024-03-01,1.0\n3,2023-12-01,4.0\n",
    )
    .unwrap();
    ok(&up.cli(&[
        "data",
        "upload",
        "raw",
        dir.join("raw.csv").to_str().unwrap(),
    ]));
    let c = up.cli_json(&[
        "data",
        "clean",
        "raw@1",
        "--dedupe",
        "--drop-nulls",
        "user_id",
        "--filter",
        "ts > '2024-01-01'",
        "--rename",
        "amount:eur",
    ]);
    assert_eq!(c["version"]["version"], 2);
    assert_eq!(c["version"]["rows"], 1);
    assert_eq!(c["version"]["inputs"], serde_json::json!(["admin.raw@1"]));
    assert_eq!(
        query(&up, "SELECT user_id, eur FROM raw"),
        vec![serde_json::json!({"user_id": 1, "eur": 2.5})]
    );
    let err = fails(&up.cli(&["data", "clean", "raw", "--filter", "ts >>> 3"]));
    assert!(err.contains("filter"), "{err}");

    // A directory is a file set.
    let ckpt = dir.join("ckpt");
    std::fs::create_dir_all(ckpt.join("tok")).unwrap();
    std::fs::write(ckpt.join("model.bin"), vec![1u8; 300_000]).unwrap();
    std::fs::write(ckpt.join("tok/vocab.txt"), "a\nb\n").unwrap();
    let v = up.cli_json(&["data", "upload", "weights", ckpt.to_str().unwrap()]);
    assert_eq!(v["files"], 2);
    assert_eq!(v["bytes"], 300_004);
    let show = up.cli_json(&["data", "show", "weights"]);
    assert_eq!(show["dataset"]["kind"], "files");
    assert_eq!(show["files"][0]["path"], "model.bin");
    let ls = ok(&up.cli(&["data", "ls"]));
    assert!(ls.contains("admin.weights") && ls.contains("files"), "{ls}");
    let err = fails(&up.cli(&["data", "query", "SELECT * FROM weights"]));
    assert!(err.contains("file set"), "{err}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A moto S3 server on a free port, stopped when dropped.
struct Moto {
    child: std::process::Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_s3_compatible_server_holds_the_lake() {
    let Some(py) = peers_python(
        "import moto.server, boto3, deltalake",
        "moto[server], boto3 and deltalake",
    ) else {
        return;
    };
    let port = free_port();
    let child = Command::new(&py)
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let moto = Moto { child, port };
    let endpoint = format!("http://127.0.0.1:{}", moto.port);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", moto.port)).is_err() {
        assert!(Instant::now() < deadline, "moto did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let s3 = |code: &str| {
        let out = Command::new(&py)
            .args(["-c", &format!("{code}{EXIT_CLEANLY}")])
            .env("ENDPOINT", &endpoint)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .output()
            .unwrap();
        ok(&out)
    };
    s3("import boto3, os; boto3.client('s3', endpoint_url=os.environ['ENDPOINT']).create_bucket(Bucket='lake')");

    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let log = std::fs::File::create(dir.path().join("up.log")).unwrap();
    let child = Command::new(BIN)
        .args(["up", "--listen", "127.0.0.1:0", "--no-cgroups"])
        .env("TESSERA_HOME", &home)
        .env("TESSERA_LAKE", "s3://lake/tessera")
        .env("AWS_ENDPOINT_URL", &endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .status();
            let _ = self.0.wait();
        }
    }
    let _up = Stop(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !home.join("config").exists() {
        assert!(Instant::now() < deadline, "tessera up did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let cli = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("TESSERA_HOME", &home)
            .output()
            .unwrap()
    };
    std::fs::write(dir.path().join("clicks.csv"), CLICKS).unwrap();
    ok(&cli(&[
        "data",
        "upload",
        "clicks",
        dir.path().join("clicks.csv").to_str().unwrap(),
    ]));
    ok(&cli(&[
        "data",
        "upload",
        "clicks",
        dir.path().join("clicks.csv").to_str().unwrap(),
    ]));
    let n = ok(&cli(&[
        "data",
        "query",
        "SELECT count(*) AS n FROM clicks@2",
        "--format",
        "csv",
    ]));
    assert_eq!(n, "n\n10\n");
    // The objects are in the bucket, and Python deltalake reads the table there.
    let listing = s3("import boto3, os
c = boto3.client('s3', endpoint_url=os.environ['ENDPOINT'])
print('\\n'.join(o['Key'] for o in c.list_objects_v2(Bucket='lake')['Contents']))");
    assert!(
        listing
            .contains("tessera/datasets/admin/clicks/table/_delta_log/00000000000000000001.json"),
        "{listing}"
    );
    let rows = s3("import deltalake, os
dt = deltalake.DeltaTable('s3://lake/tessera/datasets/admin/clicks/table', storage_options={
  'AWS_ENDPOINT_URL': os.environ['ENDPOINT'], 'AWS_ALLOW_HTTP': 'true', 'AWS_REGION': 'us-east-1',
  'AWS_ACCESS_KEY_ID': 'test', 'AWS_SECRET_ACCESS_KEY': 'test', 'AWS_S3_ALLOW_UNSAFE_RENAME': 'true'})
print(dt.version(), dt.to_pyarrow_table().num_rows)");
    assert_eq!(rows.trim(), "1 10");
}

#[test]
fn a_crash_mid_upload_leaves_no_version_and_no_spool() {
    let mut up = Up::start();
    let home = up.home();
    // An upload in flight: half of its body sent.
    let body = CLICKS.repeat(2000);
    let mut s = TcpStream::connect(&up.addr).unwrap();
    write!(
        s,
        "PUT /v1/datasets/crashy/data?format=csv HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
        up.token,
        body.len()
    )
    .unwrap();
    s.write_all(&body.as_bytes()[..body.len() / 2]).unwrap();
    s.flush().unwrap();
    let spool = home.join("lake-tmp");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&spool).unwrap().count() == 0 {
        assert!(
            Instant::now() < deadline,
            "the upload never reached the spool"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The server dies mid-upload.
    up.child.kill().unwrap();
    up.child.wait().unwrap();
    drop(s);
    // The next start empties the spool, and no version (no dataset) exists.
    std::fs::remove_file(home.join("config")).unwrap();
    let log = std::fs::File::create(up.dir.path().join("up2.log")).unwrap();
    up.child = Command::new(BIN)
        .args(["up", "--listen", "127.0.0.1:0", "--no-cgroups"])
        .env("TESSERA_HOME", &home)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !home.join("config").exists() {
        assert!(Instant::now() < deadline, "tessera up did not restart");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
    let err = fails(&up.cli(&["data", "show", "crashy"]));
    assert!(err.contains("no dataset admin.crashy"), "{err}");
    let ls = up.cli_json(&["data", "ls"]);
    assert_eq!(ls["datasets"], serde_json::json!([]));
}
