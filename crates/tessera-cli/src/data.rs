//! `tessera data ...`: datasets in the lake — create, upload (streamed; a
//! directory goes as a tar stream and becomes a file set), ls, show, head,
//! query, clean, export, grant — and the lake `tessera up` and `tessera
//! server` open (`TESSERA_LAKE`: a directory, or `s3://bucket/prefix` with
//! the `AWS_*` variables for endpoint and credentials).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use futures::StreamExt;
use reqwest::Method;
use tessera_core::lake::{
    CleanRequest, Column, CreateDataset, Dataset, DatasetDetail, DatasetRef, GrantRequest,
    QueryRequest, ResultFormat, UploadFormat, Version,
};

use crate::client::Client;
use crate::output::{format_age, now_ms, print, print_json, Output, Table};
use crate::Globals;

/// The lake `tessera up` and `tessera server` open in their home.
pub fn lake_opener() -> tessera_server::LakeOpener {
    tessera_server::LakeOpener(Arc::new(|home: &Path| {
        let mut config = tessera_lake::LakeConfig::local(home);
        if let Ok(loc) = std::env::var("TESSERA_LAKE") {
            if !loc.is_empty() {
                config.location = tessera_lake::Location::parse(&loc);
            }
        }
        let lake = tessera_lake::DataLake::open(config)?;
        Ok(Arc::new(lake) as Arc<dyn tessera_core::lake::Lake>)
    }))
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Create an empty dataset
    Create {
        /// Dataset name (lowercase letters, digits, '_')
        name: String,
        /// Owning team [default: your token's team]
        #[arg(long)]
        team: Option<String>,
        /// A label, KEY=VALUE (repeatable); e.g. region=eu keeps jobs that read it on nodes labelled region=eu
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Upload a file (CSV, Parquet, JSON lines) or a directory (a file set) as a new version
    Upload {
        /// [TEAM.]NAME (created when missing)
        dataset: String,
        /// The file or directory
        path: PathBuf,
        /// The file's format [default: by its extension]
        #[arg(long, value_parser = ["csv", "parquet", "jsonl"])]
        format: Option<String>,
        /// Add to the latest version's rows (append) or replace them (overwrite)
        #[arg(long, default_value = "append", value_parser = ["append", "overwrite"])]
        mode: String,
    },
    /// List the datasets you may read
    Ls,
    /// A dataset's versions, schema, rows, bytes and lineage
    Show {
        /// [TEAM.]NAME
        dataset: String,
    },
    /// The first rows of a table
    Head {
        /// [TEAM.]NAME[@VERSION]
        dataset: String,
        #[arg(short = 'n', long, default_value_t = 10)]
        rows: u64,
    },
    /// Run SQL over datasets (`team.name`, `team.name@3`; bare names are your team's)
    Query(QueryArgs),
    /// Clean a table into a new version (operations apply in the order sql, select, rename, cast, drop-nulls, filter, dedupe)
    Clean(CleanArgs),
    /// Write a table version to a file
    Export {
        /// [TEAM.]NAME[@VERSION]
        dataset: String,
        #[arg(long, value_enum, default_value_t = ExportFormat::Parquet)]
        format: ExportFormat,
        /// The file to write
        #[arg(long = "out", value_name = "FILE")]
        out: PathBuf,
    },
    /// Download a version's files into a new directory (a file set's files,
    /// or a table's Parquet files)
    Download {
        /// [TEAM.]NAME[@VERSION]
        dataset: String,
        /// The directory to create (it must not exist, or be empty)
        #[arg(long = "out", value_name = "DIR")]
        out: PathBuf,
    },
    /// Let another team read a dataset (or take that back with --revoke)
    Grant {
        /// [TEAM.]NAME
        dataset: String,
        #[arg(long)]
        team: String,
        #[arg(long)]
        revoke: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    Parquet,
    Csv,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueryFormat {
    Table,
    Json,
    Csv,
    Parquet,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The SQL
    pub sql: String,
    /// Result format [default: a table; JSON lines with --output json]
    #[arg(long, value_enum)]
    pub format: Option<QueryFormat>,
    /// Write the result to this file instead of stdout
    #[arg(long = "out", value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// At most this many rows [default: the server's limit]
    #[arg(long)]
    pub max_rows: Option<u64>,
    /// Stop the query after this long, e.g. 30s [default: the server's limit]
    #[arg(long, value_parser = crate::duration_ms)]
    pub timeout: Option<u64>,
}

#[derive(Debug, Args)]
pub struct CleanArgs {
    /// [TEAM.]NAME[@VERSION] to clean [default version: the latest]
    pub dataset: String,
    /// Drop duplicate rows
    #[arg(long)]
    pub dedupe: bool,
    /// Drop rows where this column is null (repeatable, or comma-separated)
    #[arg(long = "drop-nulls", value_delimiter = ',', value_name = "COLUMN")]
    pub drop_nulls: Vec<String>,
    /// Keep rows meeting this SQL condition
    #[arg(long)]
    pub filter: Option<String>,
    /// Cast a column, COLUMN:TYPE (bigint, int, double, string, boolean, date, timestamp)
    #[arg(long, value_name = "COLUMN:TYPE")]
    pub cast: Vec<String>,
    /// Rename a column, OLD:NEW
    #[arg(long, value_name = "OLD:NEW")]
    pub rename: Vec<String>,
    /// Keep only these columns (comma-separated)
    #[arg(long, value_delimiter = ',', value_name = "COLUMN")]
    pub select: Vec<String>,
    /// An arbitrary transform: a SELECT over the table `input`
    #[arg(long)]
    pub sql: Option<String>,
    /// Write the result to this dataset of the same team instead
    #[arg(long)]
    pub into: Option<String>,
}

pub async fn data(g: &Globals, command: DataCommand) -> Result<()> {
    let client = g.client()?;
    match command {
        DataCommand::Create {
            name,
            team,
            labels,
            description,
        } => {
            let mut map = BTreeMap::new();
            for l in labels {
                let (k, v) = l
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--label {l:?}: write KEY=VALUE"))?;
                map.insert(k.to_string(), v.to_string());
            }
            let req = CreateDataset {
                name,
                team,
                labels: map,
                description,
            };
            let ds: Dataset = client.post_json("/v1/datasets", &req).await?;
            if g.output == Output::Json {
                print_json(&ds)?;
            } else {
                print(&format!("created dataset {}.{}", ds.team, ds.name))?;
            }
        }
        DataCommand::Upload {
            dataset,
            path,
            format,
            mode,
        } => upload(g, &client, &dataset, &path, format.as_deref(), &mode).await?,
        DataCommand::Ls => {
            #[derive(serde::Deserialize, serde::Serialize)]
            struct List {
                datasets: Vec<Dataset>,
            }
            let list: List = client.get("/v1/datasets", &[]).await?;
            if g.output == Output::Json {
                return print_json(&list);
            }
            let now = now_ms();
            let mut t = Table::new(&["DATASET", "KIND", "LATEST", "LABELS", "GRANTS", "AGE"]);
            for d in &list.datasets {
                t.row(vec![
                    format!("{}.{}", d.team, d.name),
                    kind(d),
                    d.latest.map(|v| v.to_string()).unwrap_or("-".into()),
                    labels(&d.labels),
                    if d.grants.is_empty() {
                        "-".into()
                    } else {
                        d.grants.join(",")
                    },
                    format_age(now, d.created_at),
                ]);
            }
            print(&t.render())?;
        }
        DataCommand::Show { dataset } => {
            let d: DatasetDetail = client
                .get(&format!("/v1/datasets/{}", plain(&dataset)?), &[])
                .await?;
            if g.output == Output::Json {
                return print_json(&d);
            }
            show(&d)?;
        }
        DataCommand::Head { dataset, rows } => {
            let sql = format!("SELECT * FROM {} LIMIT {rows}", sql_name(&dataset)?);
            let args = QueryArgs {
                sql,
                format: None,
                out: None,
                max_rows: Some(rows),
                timeout: None,
            };
            query(g, &client, args).await?;
        }
        DataCommand::Query(args) => query(g, &client, args).await?,
        DataCommand::Clean(args) => clean(g, &client, args).await?,
        DataCommand::Export {
            dataset,
            format,
            out,
        } => {
            let sql = format!("SELECT * FROM {}", sql_name(&dataset)?);
            let args = QueryArgs {
                sql,
                format: Some(match format {
                    ExportFormat::Parquet => QueryFormat::Parquet,
                    ExportFormat::Csv => QueryFormat::Csv,
                    ExportFormat::Json => QueryFormat::Json,
                }),
                out: Some(out.clone()),
                max_rows: None,
                timeout: None,
            };
            query(g, &client, args).await?;
        }
        DataCommand::Download { dataset, out } => {
            download(g, &client, &dataset, &out).await?;
        }
        DataCommand::Grant {
            dataset,
            team,
            revoke,
        } => {
            let ds: Dataset = client
                .post_json(
                    &format!("/v1/datasets/{}/grants", plain(&dataset)?),
                    &GrantRequest { team, revoke },
                )
                .await?;
            if g.output == Output::Json {
                return print_json(&ds);
            }
            print(&format!(
                "{}.{} may be read by: {}",
                ds.team,
                ds.name,
                std::iter::once(format!("team {}", ds.team))
                    .chain(ds.grants.iter().map(|t| format!("team {t}")))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))?;
        }
    }
    Ok(())
}

fn kind(d: &Dataset) -> String {
    match d.kind {
        Some(tessera_core::lake::DatasetKind::Table) => "table".into(),
        Some(tessera_core::lake::DatasetKind::Files) => "files".into(),
        None => "-".into(),
    }
}

fn labels(l: &BTreeMap<String, String>) -> String {
    if l.is_empty() {
        return "-".into();
    }
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `[team.]name` without a version, as the URL wants it.
fn plain(text: &str) -> Result<String> {
    let r = DatasetRef::parse("dataset", text).map_err(|e| anyhow!("{e}"))?;
    if r.version.is_some() {
        bail!("{text}: name the dataset without a version here");
    }
    Ok(text.to_string())
}

/// `[team.]name[@v]` as SQL: `team."name@v"`.
fn sql_name(text: &str) -> Result<String> {
    let r = DatasetRef::parse("dataset", text).map_err(|e| anyhow!("{e}"))?;
    let table = match r.version {
        Some(v) => format!("\"{}@{v}\"", r.name),
        None => format!("\"{}\"", r.name),
    };
    Ok(match r.team {
        Some(t) => format!("\"{t}\".{table}"),
        None => table,
    })
}

fn human_bytes(n: u64) -> String {
    tessera_core::quantity::format_memory(n)
}

fn show(d: &DatasetDetail) -> Result<()> {
    let ds = &d.dataset;
    let mut head = vec![
        ("Dataset", format!("{}.{}", ds.team, ds.name)),
        ("Kind", kind(ds)),
        ("Labels", labels(&ds.labels)),
        (
            "Readers",
            std::iter::once(ds.team.clone())
                .chain(ds.grants.iter().cloned())
                .collect::<Vec<_>>()
                .join(", "),
        ),
    ];
    if let Some(desc) = &ds.description {
        head.push(("Description", desc.clone()));
    }
    let mut text = crate::output::key_values(&head);
    if !d.schema.is_empty() {
        text.push_str("\nColumns:\n");
        let mut t = Table::new(&["NAME", "TYPE", "NULLABLE"]);
        for c in &d.schema {
            t.row(vec![
                c.name.clone(),
                c.data_type.clone(),
                if c.nullable { "yes" } else { "no" }.into(),
            ]);
        }
        text.push_str(&t.render());
    }
    if !d.files.is_empty() {
        text.push_str("\nFiles:\n");
        let mut t = Table::new(&["PATH", "SIZE", "SHA256"]);
        for f in &d.files {
            t.row(vec![
                f.path.clone(),
                human_bytes(f.size),
                f.sha256[..16].to_string(),
            ]);
        }
        text.push_str(&t.render());
    }
    text.push_str("\nVersions:\n");
    let now = now_ms();
    let mut t = Table::new(&[
        "VERSION", "AGE", "ROWS", "FILES", "BYTES", "MADE BY", "FROM",
    ]);
    for v in &d.versions {
        t.row(vec![
            v.version.to_string(),
            format_age(now, v.created_at),
            v.rows.map(|r| r.to_string()).unwrap_or("-".into()),
            v.files.to_string(),
            human_bytes(v.bytes),
            match v.job {
                Some(j) => format!("job {j}: {}", v.detail),
                None => format!("{}: {}", v.operation, v.detail),
            },
            if v.inputs.is_empty() {
                "-".into()
            } else {
                v.inputs.join(", ")
            },
        ]);
    }
    text.push_str(&t.render());
    print(&text)?;
    Ok(())
}

async fn upload(
    g: &Globals,
    client: &Client,
    dataset: &str,
    path: &Path,
    format: Option<&str>,
    mode: &str,
) -> Result<()> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let source = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let (format, body) = if meta.is_dir() {
        ("tar".to_string(), tar_stream(path.to_path_buf()))
    } else {
        let format = match format {
            Some(f) => f.to_string(),
            None => match UploadFormat::from_path(&path.to_string_lossy()) {
                Some(UploadFormat::Csv) => "csv".into(),
                Some(UploadFormat::Parquet) => "parquet".into(),
                Some(UploadFormat::Jsonl) => "jsonl".into(),
                _ => bail!(
                    "cannot tell the format of {} from its name: add --format csv|parquet|jsonl",
                    path.display()
                ),
            },
        };
        let file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("cannot open {}", path.display()))?;
        (format, file_stream(file))
    };
    let rb = client
        .builder(
            Method::PUT,
            &format!("/v1/datasets/{}/data", plain(dataset)?),
        )
        .query(&[
            ("format", format.as_str()),
            ("mode", mode),
            ("source", source.as_str()),
        ])
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(body);
    let v: Version = client.send_json(rb).await?;
    if g.output == Output::Json {
        return print_json(&v);
    }
    print(&format!(
        "{dataset}@{}: {}{} files, {}",
        v.version,
        v.rows.map(|r| format!("{r} rows, ")).unwrap_or_default(),
        v.files,
        human_bytes(v.bytes)
    ))?;
    Ok(())
}

fn file_stream(file: tokio::fs::File) -> reqwest::Body {
    use tokio::io::AsyncReadExt;
    let stream = futures::stream::unfold(file, |mut f| async move {
        let mut buf = vec![0u8; 1 << 20];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    reqwest::Body::wrap_stream(stream)
}

/// A directory as a tar stream, built on a thread as it is sent.
fn tar_stream(dir: PathBuf) -> reqwest::Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(8);
    struct ChanWriter(tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>);
    impl std::io::Write for ChanWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .blocking_send(Ok(bytes::Bytes::copy_from_slice(buf)))
                .map_err(|_| std::io::Error::other("the upload stopped"))?;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    std::thread::spawn(move || {
        let w = std::io::BufWriter::with_capacity(1 << 20, ChanWriter(tx.clone()));
        let mut b = tar::Builder::new(w);
        b.follow_symlinks(true);
        let result = b
            .append_dir_all(".", &dir)
            .and_then(|_| b.into_inner())
            .and_then(|mut w| std::io::Write::flush(&mut w));
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(std::io::Error::other(format!(
                "reading {}: {e}",
                dir.display()
            ))));
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    reqwest::Body::wrap_stream(stream)
}

async fn query(g: &Globals, client: &Client, args: QueryArgs) -> Result<()> {
    let shown = match args.format {
        Some(f) => f,
        None if g.output == Output::Json => QueryFormat::Json,
        None => QueryFormat::Table,
    };
    let wire = match shown {
        QueryFormat::Table | QueryFormat::Json => ResultFormat::Json,
        QueryFormat::Csv => ResultFormat::Csv,
        QueryFormat::Parquet => ResultFormat::Parquet,
    };
    if shown == QueryFormat::Parquet && args.out.is_none() {
        bail!("Parquet goes to a file: add --out FILE");
    }
    let req = QueryRequest {
        sql: args.sql,
        format: wire,
        max_rows: args.max_rows,
        timeout_ms: args.timeout,
    };
    let rb = client.builder(Method::POST, "/v1/query").json(&req);
    let resp = client.send_stream(rb).await?;
    let columns: Vec<Column> = resp
        .headers()
        .get("x-tessera-columns")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default();
    let max_rows: Option<u64> = resp
        .headers()
        .get("x-tessera-max-rows")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    if shown != QueryFormat::Table {
        match &args.out {
            Some(path) => {
                // Written beside the target, then renamed: a broken stream leaves no file.
                let tmp = path.with_extension("partial");
                let mut f = std::fs::File::create(&tmp)
                    .with_context(|| format!("cannot write {}", tmp.display()))?;
                let r = client.copy_body(resp, &mut f).await;
                if let Err(e) = r {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
                std::fs::rename(&tmp, path)?;
            }
            None => {
                let mut out = std::io::stdout().lock();
                client.copy_body(resp, &mut out).await?;
            }
        }
        return Ok(());
    }
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| anyhow!("the query's answer broke off: {e}"))?;
        buf.extend_from_slice(&chunk);
    }
    let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
    let mut t = Table::new(&names);
    let mut n = 0u64;
    for line in buf.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let row: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(line)?;
        t.row(
            names
                .iter()
                .map(|c| match row.get(*c) {
                    None | Some(serde_json::Value::Null) => "null".to_string(),
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(v) => v.to_string(),
                })
                .collect(),
        );
        n += 1;
    }
    let mut text = t.render();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!("({n} row{})", if n == 1 { "" } else { "s" }));
    if Some(n) == max_rows {
        text.push_str(&format!(
            "; stopped at the row limit of {n}: raise --max-rows or export to a file"
        ));
    }
    print(&text)?;
    Ok(())
}

async fn clean(g: &Globals, client: &Client, args: CleanArgs) -> Result<()> {
    let r = DatasetRef::parse("dataset", &args.dataset).map_err(|e| anyhow!("{e}"))?;
    let target = match &r.team {
        Some(t) => format!("{t}.{}", r.name),
        None => r.name.clone(),
    };
    let req = CleanRequest {
        version: r.version,
        into: args.into,
        sql: args.sql,
        select: args.select,
        rename: args.rename,
        cast: args.cast,
        drop_nulls: args.drop_nulls,
        filter: args.filter,
        dedupe: args.dedupe,
    };
    #[derive(serde::Deserialize, serde::Serialize)]
    struct Cleaned {
        dataset: Dataset,
        version: Version,
    }
    let c: Cleaned = client
        .post_json(&format!("/v1/datasets/{target}/clean"), &req)
        .await?;
    if g.output == Output::Json {
        return print_json(&c);
    }
    print(&format!(
        "{}.{}@{}: {} rows (from {}: {})",
        c.dataset.team,
        c.dataset.name,
        c.version.version,
        c.version.rows.unwrap_or(0),
        c.version.inputs.join(", "),
        c.version.detail
    ))?;
    Ok(())
}

/// `tessera data download`: the version's tar stream, unpacked into a new
/// directory; nothing is left behind if the stream breaks.
async fn download(g: &Globals, client: &Client, dataset: &str, out: &Path) -> Result<()> {
    DatasetRef::parse("dataset", dataset).map_err(|e| anyhow!("{e}"))?;
    if out.exists() && std::fs::read_dir(out)?.next().is_some() {
        bail!("{} exists and is not empty", out.display());
    }
    let resp = client
        .stream(&format!("/v1/datasets/{dataset}/files"), &[])
        .await?;
    let version = resp
        .headers()
        .get("x-tessera-version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_string();
    let tmp = out.with_extension("partial.tar");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    if let Err(e) = client.copy_body(resp, &mut f).await {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    drop(f);
    let unpacked = (|| -> Result<usize> {
        std::fs::create_dir_all(out)?;
        let mut ar = tar::Archive::new(std::fs::File::open(&tmp)?);
        let mut n = 0;
        for entry in ar.entries()? {
            let mut entry = entry?;
            if entry.header().entry_type().is_file() {
                n += 1;
            }
            entry.unpack_in(out)?;
        }
        Ok(n)
    })();
    let _ = std::fs::remove_file(&tmp);
    let n = unpacked.with_context(|| format!("cannot unpack into {}", out.display()))?;
    if g.output == Output::Json {
        return print_json(&serde_json::json!({
            "dataset": dataset, "version": version.parse::<u64>().ok(), "files": n, "dir": out,
        }));
    }
    print(&format!(
        "{n} files of version {version} in {}",
        out.display()
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::sql_name;

    #[test]
    fn dataset_names_become_sql() {
        assert_eq!(sql_name("ads.clicks@3").unwrap(), "\"ads\".\"clicks@3\"");
        assert_eq!(sql_name("clicks").unwrap(), "\"clicks\"");
        assert!(sql_name("Clicks").is_err());
    }
}
