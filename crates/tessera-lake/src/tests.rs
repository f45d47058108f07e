//! The lake on a local directory, called through its trait the way the
//! server calls it.

use bytes::Bytes;
use futures::StreamExt;
use tessera_core::auth::{Principal, Role};
use tessera_core::lake::{
    ByteStream, CleanRequest, CreateDataset, DatasetKind, GrantRequest, Lake, LakeError,
    QueryRequest, ResultFormat, Upload, UploadFormat, WriteMode,
};

use super::{DataLake, LakeConfig};

fn member(team: &str) -> Principal {
    Principal {
        token_id: format!("tok-{team}"),
        team: team.into(),
        role: Role::Member,
    }
}

fn open() -> (tempfile::TempDir, DataLake) {
    let dir = tempfile::tempdir().unwrap();
    let lake = DataLake::open(LakeConfig::local(dir.path())).unwrap();
    (dir, lake)
}

fn body(text: &str) -> ByteStream {
    let b = Bytes::from(text.to_string());
    futures::stream::iter(vec![Ok(b)]).boxed()
}

fn csv(source: &str, mode: WriteMode) -> Upload {
    Upload {
        format: UploadFormat::Csv,
        mode,
        source: source.into(),
    }
}

async fn rows(
    lake: &DataLake,
    who: &Principal,
    sql: &str,
) -> Result<Vec<serde_json::Value>, LakeError> {
    let r = lake
        .query(
            who,
            QueryRequest {
                sql: sql.into(),
                format: ResultFormat::Json,
                max_rows: None,
                timeout_ms: None,
            },
        )
        .await?;
    let bytes: Vec<Bytes> = r.body.map(|b| b.unwrap()).collect().await;
    let all: Vec<u8> = bytes.concat();
    Ok(all
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect())
}

const CLICKS: &str = "user_id,country,amount\n1,fr,2.5\n2,de,1.0\n3,fr,4.0\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_query_and_versions() {
    let (_dir, lake) = open();
    let ads = member("ads");
    let v1 = lake
        .upload(
            &ads,
            "ads",
            "clicks",
            csv("a.csv", WriteMode::Append),
            body(CLICKS),
        )
        .await
        .unwrap();
    assert_eq!(v1.version, 1);
    assert_eq!(v1.rows, Some(3));
    assert_eq!(v1.operation, "upload");
    let v2 = lake
        .upload(
            &ads,
            "ads",
            "clicks",
            csv("b.csv", WriteMode::Append),
            body("user_id,country,amount\n4,it,3.0\n"),
        )
        .await
        .unwrap();
    assert_eq!((v2.version, v2.rows), (2, Some(4)));
    let r = rows(
        &lake,
        &ads,
        "SELECT country, count(*) AS n FROM ads.clicks GROUP BY 1 ORDER BY 1",
    )
    .await
    .unwrap();
    assert_eq!(
        r,
        vec![
            serde_json::json!({"country": "de", "n": 1}),
            serde_json::json!({"country": "fr", "n": 2}),
            serde_json::json!({"country": "it", "n": 1}),
        ]
    );
    // An old version stays as it was; bare names are the caller's team's.
    let r = rows(&lake, &ads, "SELECT count(*) AS n FROM clicks@1")
        .await
        .unwrap();
    assert_eq!(r, vec![serde_json::json!({"n": 3})]);
    let detail = lake.show(&ads, "ads", "clicks").await.unwrap();
    assert_eq!(detail.dataset.kind, Some(DatasetKind::Table));
    assert_eq!(detail.versions.len(), 2);
    assert_eq!(
        detail
            .schema
            .iter()
            .map(|c| (c.name.as_str(), c.data_type.as_str()))
            .collect::<Vec<_>>(),
        vec![
            ("user_id", "bigint"),
            ("country", "string"),
            ("amount", "double")
        ]
    );
    // Overwrite replaces the rows.
    let v3 = lake
        .upload(
            &ads,
            "ads",
            "clicks",
            csv("c.csv", WriteMode::Overwrite),
            body(CLICKS),
        )
        .await
        .unwrap();
    assert_eq!((v3.version, v3.rows), (3, Some(3)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_creates_no_version() {
    let (dir, lake) = open();
    let ads = member("ads");
    // A ragged CSV.
    let e = lake
        .upload(
            &ads,
            "ads",
            "clicks",
            csv("r.csv", WriteMode::Append),
            body("a,b\n1,2\n3,4,5\n"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, LakeError::BadData(m) if m.contains("line") && m.contains("no version")),
        "{e}"
    );
    lake.upload(
        &ads,
        "ads",
        "clicks",
        csv("a.csv", WriteMode::Append),
        body(CLICKS),
    )
    .await
    .unwrap();
    // A wrong type in a column.
    let e = lake
        .upload(
            &ads,
            "ads",
            "clicks",
            csv("w.csv", WriteMode::Append),
            body("user_id,country,amount\n5,fr,lots\n"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, LakeError::BadData(m) if m.contains("lots")),
        "{e}"
    );
    // An upload cut off halfway.
    let cut: ByteStream = futures::stream::iter(vec![
        Ok(Bytes::from_static(b"user_id,country,amount\n6,fr,")),
        Err(std::io::Error::other("connection reset")),
    ])
    .boxed();
    let e = lake
        .upload(&ads, "ads", "clicks", csv("x.csv", WriteMode::Append), cut)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, LakeError::BadData(m) if m.contains("cut off")),
        "{e}"
    );
    let detail = lake.show(&ads, "ads", "clicks").await.unwrap();
    assert_eq!(detail.versions.len(), 1, "{:?}", detail.versions);
    assert_eq!(detail.dataset.latest, Some(1));
    // Nothing of the failed uploads stays in the spool.
    assert_eq!(
        std::fs::read_dir(dir.path().join("lake-tmp"))
            .unwrap()
            .count(),
        0
    );
    // A query with a syntax error.
    let e = rows(&lake, &ads, "SELEC * FROM clicks").await.unwrap_err();
    assert!(matches!(&e, LakeError::Query(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teams_read_only_what_they_are_granted() {
    let (_dir, lake) = open();
    let ads = member("ads");
    let vision = member("vision");
    lake.upload(
        &ads,
        "ads",
        "clicks",
        csv("a.csv", WriteMode::Append),
        body(CLICKS),
    )
    .await
    .unwrap();
    let e = rows(&lake, &vision, "SELECT * FROM ads.clicks")
        .await
        .unwrap_err();
    assert!(
        matches!(&e, LakeError::Forbidden(m) if m.contains("team vision")),
        "{e}"
    );
    assert!(lake.list(&vision).await.unwrap().is_empty());
    let e = lake
        .upload(
            &vision,
            "ads",
            "clicks",
            csv("a.csv", WriteMode::Append),
            body(CLICKS),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, LakeError::Forbidden(_)));
    lake.grant(
        &ads,
        "ads",
        "clicks",
        GrantRequest {
            team: "vision".into(),
            revoke: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        rows(&lake, &vision, "SELECT * FROM ads.clicks")
            .await
            .unwrap()
            .len(),
        3
    );
    assert_eq!(lake.list(&vision).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleaning_writes_a_version_with_lineage() {
    let (_dir, lake) = open();
    let ads = member("ads");
    lake.create(
        &ads,
        CreateDataset {
            name: "clicks".into(),
            labels: [("region".to_string(), "eu".to_string())].into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let raw = "user_id,ts,amount\n1,2024-02-01,2.5\n1,2024-02-01,2.5\n,2024-03-01,1.0\n3,2023-12-01,4.0\n4,2024-05-01,x\n";
    let e = lake
        .upload(
            &ads,
            "ads",
            "clicks",
            csv("raw.csv", WriteMode::Append),
            body(raw),
        )
        .await;
    // `x` makes amount a string column; casting it is a cleaning step.
    assert!(e.is_ok(), "{e:?}");
    let req = CleanRequest {
        dedupe: true,
        drop_nulls: vec!["user_id".into()],
        filter: Some("ts > '2024-01-01'".into()),
        into: Some("clicks_clean".into()),
        ..Default::default()
    };
    let (ds, v) = lake.clean(&ads, "ads", "clicks", req).await.unwrap();
    assert_eq!(ds.name, "clicks_clean");
    assert_eq!(ds.labels.get("region").map(String::as_str), Some("eu"));
    assert_eq!(v.version, 1);
    assert_eq!(v.rows, Some(2));
    assert_eq!(v.inputs, vec!["ads.clicks@1".to_string()]);
    assert_eq!(v.operation, "clean");
    assert!(
        v.detail.contains("dedupe") && v.detail.contains("drop-nulls user_id"),
        "{}",
        v.detail
    );
    // A cast that does not fit the data fails whole.
    let e = lake
        .clean(
            &ads,
            "ads",
            "clicks",
            CleanRequest {
                cast: vec!["amount:double".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, LakeError::BadData(_) | LakeError::Query(_)),
        "{e}"
    );
    assert_eq!(
        lake.show(&ads, "ads", "clicks")
            .await
            .unwrap()
            .versions
            .len(),
        1
    );
    // A column that does not exist is named.
    let e = lake
        .clean(
            &ads,
            "ads",
            "clicks",
            CleanRequest {
                drop_nulls: vec!["nope".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, LakeError::Invalid(f) if f.field == "drop_nulls[0]"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sets_are_versioned_by_content() {
    let (dir, lake) = open();
    let ads = member("ads");
    let src = dir.path().join("ckpt");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("weights.bin"), vec![7u8; 100_000]).unwrap();
    std::fs::write(src.join("sub/tokenizer.json"), b"{}").unwrap();
    let tar = dir.path().join("ckpt.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&tar).unwrap());
        b.append_dir_all(".", &src).unwrap();
        b.finish().unwrap();
    }
    let bytes = Bytes::from(std::fs::read(&tar).unwrap());
    let up = || Upload {
        format: UploadFormat::Tar,
        mode: WriteMode::Append,
        source: "ckpt".into(),
    };
    let v1 = lake
        .upload(
            &ads,
            "ads",
            "weights",
            up(),
            futures::stream::iter(vec![Ok(bytes.clone())]).boxed(),
        )
        .await
        .unwrap();
    assert_eq!((v1.version, v1.files, v1.bytes), (1, 2, 100_002));
    let v2 = lake
        .upload(
            &ads,
            "ads",
            "weights",
            up(),
            futures::stream::iter(vec![Ok(bytes.clone())]).boxed(),
        )
        .await
        .unwrap();
    assert_eq!(v2.version, 2);
    let detail = lake.show(&ads, "ads", "weights").await.unwrap();
    assert_eq!(detail.dataset.kind, Some(DatasetKind::Files));
    assert_eq!(
        detail
            .files
            .iter()
            .map(|f| f.path.as_str())
            .collect::<Vec<_>>(),
        vec!["sub/tokenizer.json", "weights.bin"]
    );
    // Two versions, one copy of each content.
    let objects = std::fs::read_dir(dir.path().join("lake/objects/sha256"))
        .unwrap()
        .count();
    assert_eq!(objects, 2);
    // A half archive is refused whole.
    let half = bytes.slice(..bytes.len() / 3);
    let e = lake
        .upload(
            &ads,
            "ads",
            "weights",
            up(),
            futures::stream::iter(vec![Ok(half)]).boxed(),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, LakeError::BadData(_)), "{e}");
    assert_eq!(
        lake.show(&ads, "ads", "weights")
            .await
            .unwrap()
            .versions
            .len(),
        2
    );
    // A table upload to a file set is refused, naming the field.
    let e = lake
        .upload(
            &ads,
            "ads",
            "weights",
            csv("a.csv", WriteMode::Append),
            body(CLICKS),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, LakeError::Invalid(f) if f.field == "format"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_read_staged_versions_and_write_outputs_once() {
    use std::os::unix::fs::PermissionsExt;
    use tessera_core::lake::JobOutputWrite;
    let (dir, lake) = open();
    let ads = member("ads");
    lake.upload(
        &ads,
        "ads",
        "clicks",
        csv("a.csv", WriteMode::Append),
        body(CLICKS),
    )
    .await
    .unwrap();
    lake.upload(
        &ads,
        "ads",
        "clicks",
        csv("b.csv", WriteMode::Overwrite),
        body("user_id,country,amount\n9,it,1.0\n"),
    )
    .await
    .unwrap();
    // Version 1 staged: its one data file, read-only; version 2 has another.
    let s1 = lake
        .stage_input(&ads, "ads", "clicks", Some(1))
        .await
        .unwrap();
    assert_eq!(s1.version, 1);
    let files: Vec<_> = std::fs::read_dir(&s1.path).unwrap().flatten().collect();
    assert_eq!(files.len(), 1);
    let mode = files[0].metadata().unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o444);
    assert_eq!(
        std::fs::metadata(&s1.path).unwrap().permissions().mode() & 0o777,
        0o555
    );
    let latest = lake.stage_input(&ads, "ads", "clicks", None).await.unwrap();
    assert_eq!(latest.version, 2);
    assert_ne!(latest.path, s1.path);
    // Staging again reuses the directory.
    let again = lake
        .stage_input(&ads, "ads", "clicks", Some(1))
        .await
        .unwrap();
    assert_eq!(again.path, s1.path);
    // Another team may not read it; a version that does not exist is named.
    let e = lake
        .stage_input(&member("ml"), "ads", "clicks", None)
        .await
        .unwrap_err();
    assert!(matches!(e, LakeError::Forbidden(_)), "{e}");
    let e = lake
        .stage_input(&ads, "ads", "clicks", Some(3))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, LakeError::Invalid(f) if f.field == "version"),
        "{e}"
    );

    // A job's directory becomes a file-set version, once.
    let out = dir.path().join("work/out");
    std::fs::create_dir_all(out.join("sub")).unwrap();
    std::fs::write(out.join("model.bin"), b"weights").unwrap();
    std::fs::write(out.join("sub/vocab.txt"), b"a b c").unwrap();
    let write = JobOutputWrite {
        team: "ads".into(),
        name: "model".into(),
        dir: out.clone(),
        from: "out".into(),
        format: None,
        mode: WriteMode::Overwrite,
        job: 42,
        inputs: vec!["ads.clicks@1".into()],
    };
    let v = lake.write_output(write.clone()).await.unwrap();
    assert_eq!((v.version, v.files, v.job), (1, 2, Some(42)));
    assert_eq!(v.inputs, vec!["ads.clicks@1".to_string()]);
    // Written again by the same job (a restart mid-way): the same version.
    let again = lake.write_output(write.clone()).await.unwrap();
    assert_eq!(again.version, 1);
    let staged = lake.stage_input(&ads, "ads", "model", None).await.unwrap();
    assert_eq!(
        std::fs::read(staged.path.join("sub/vocab.txt")).unwrap(),
        b"a b c"
    );
    // A table output from a directory of CSV files.
    let t = dir.path().join("work/t");
    std::fs::create_dir_all(&t).unwrap();
    std::fs::write(t.join("a.csv"), "k,v\n1,x\n").unwrap();
    std::fs::write(t.join("b.csv"), "k,v\n2,y\n3,z\n").unwrap();
    let v = lake
        .write_output(JobOutputWrite {
            name: "kv".into(),
            dir: t,
            format: Some(UploadFormat::Csv),
            job: 43,
            ..write.clone()
        })
        .await
        .unwrap();
    assert_eq!(v.rows, Some(3));
    // A missing directory writes nothing.
    let e = lake
        .write_output(JobOutputWrite {
            name: "nothing".into(),
            dir: dir.path().join("work/none"),
            job: 44,
            ..write.clone()
        })
        .await
        .unwrap_err();
    assert!(matches!(e, LakeError::BadData(_)), "{e}");
    // Checked before a job runs: the kind, and the team's right to write.
    let e = lake
        .check_output(&ads, "ads", "clicks", Some(UploadFormat::Tar))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, LakeError::Invalid(f) if f.field == "format"),
        "{e}"
    );
    let e = lake
        .check_output(&member("ml"), "ads", "model", None)
        .await
        .unwrap_err();
    assert!(matches!(e, LakeError::Forbidden(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_inputs_no_job_needs_are_pruned_and_staged_again_on_demand() {
    use std::collections::HashSet;
    use std::time::Duration;
    let (_dir, lake) = open();
    let ads = member("ads");
    for (source, text) in [
        ("a.csv", CLICKS),
        ("b.csv", "user_id,country,amount\n9,it,1.0\n"),
    ] {
        lake.upload(
            &ads,
            "ads",
            "clicks",
            csv(source, WriteMode::Overwrite),
            body(text),
        )
        .await
        .unwrap();
    }
    let v1 = lake
        .stage_input(&ads, "ads", "clicks", Some(1))
        .await
        .unwrap();
    let v2 = lake
        .stage_input(&ads, "ads", "clicks", Some(2))
        .await
        .unwrap();
    let files = |p: &std::path::Path| std::fs::read_dir(p).unwrap().count();
    assert_eq!((files(&v1.path), files(&v2.path)), (1, 1));
    // What a staging cut short by a crash left behind.
    let leftover = v1.path.parent().unwrap().join(".staging-3-00ff");
    std::fs::create_dir_all(leftover.join("sub")).unwrap();
    std::fs::write(leftover.join("sub/part.parquet"), b"half").unwrap();

    // Used within the idle time: nothing goes, needed or not.
    let none = HashSet::new();
    let pruned = lake
        .prune_staged(&none, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(pruned.dirs, 0);
    assert!(v1.path.is_dir() && v2.path.is_dir() && leftover.is_dir());

    // Idle: what a job still needs stays, the rest goes, files and all.
    let keep = HashSet::from([v2.path.clone()]);
    let pruned = lake.prune_staged(&keep, Duration::ZERO).await.unwrap();
    assert_eq!(pruned.dirs, 2, "{pruned:?}");
    assert!(pruned.bytes > 4, "{pruned:?}");
    assert!(!v1.path.exists() && !leftover.exists());
    assert_eq!(files(&v2.path), 1);

    // A job asking for the pruned version gets it staged again, the same.
    let again = lake
        .stage_input(&ads, "ads", "clicks", Some(1))
        .await
        .unwrap();
    assert_eq!(again.path, v1.path);
    assert_eq!(files(&again.path), 1);

    // Reusing a staged version makes it recent again: of two left idle,
    // the one a job reused stays.
    std::thread::sleep(Duration::from_millis(50));
    lake.stage_input(&ads, "ads", "clicks", Some(2))
        .await
        .unwrap();
    let pruned = lake
        .prune_staged(&none, Duration::from_millis(40))
        .await
        .unwrap();
    assert_eq!(pruned.dirs, 1, "{pruned:?}");
    assert!(v2.path.is_dir() && !v1.path.exists());
}
