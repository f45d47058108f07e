//! Tables: Delta Lake tables under `datasets/<team>/<name>/table/`.
//!
//! Tessera's version N is the table's Delta version N-1: the Delta log is
//! the only record of versions, and each commit carries its origin
//! (operation, detail, inputs, job) under the `tessera` key of its
//! `commitInfo`, written in the same atomic put as the version itself.

use std::collections::HashMap;
use std::path::Path as FsPath;
use std::sync::{Arc, Once};

use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::datafusion::dataframe::DataFrame;
use deltalake::datafusion::execution::context::SessionContext;
use deltalake::datafusion::prelude::{
    cast, ident, CsvReadOptions, JsonReadOptions, ParquetReadOptions,
};
use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::write::SchemaMode;
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};
use tessera_core::lake::{Column, Dataset, LakeError, Upload, UploadFormat, Version, WriteMode};
use tessera_core::FieldError;

use crate::storage::{internal, Storage};

/// What made a version; stored in its commit.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Origin {
    pub operation: String,
    pub detail: String,
    pub inputs: Vec<String>,
    pub job: Option<u64>,
}

pub(crate) fn table_rel(team: &str, name: &str) -> String {
    format!("datasets/{team}/{name}/table")
}

/// Delta's default log store (commits by put-if-absent) over the store
/// the lake hands it, for `s3://` tables.
struct PutIfAbsentLogStores;

impl deltalake::logstore::LogStoreFactory for PutIfAbsentLogStores {
    fn with_options(
        &self,
        prefixed_store: deltalake::logstore::ObjectStoreRef,
        root_store: deltalake::logstore::ObjectStoreRef,
        location: &url::Url,
        options: &deltalake::logstore::StorageConfig,
    ) -> deltalake::DeltaResult<deltalake::logstore::LogStoreRef> {
        Ok(deltalake::logstore::default_logstore(
            prefixed_store,
            root_store,
            location,
            options,
        ))
    }
}

/// Lets the Delta log store work on an S3 store handed to it.
fn register_schemes() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        deltalake::logstore::logstore_factories().insert(
            url::Url::parse("s3://").expect("a URL"),
            Arc::new(PutIfAbsentLogStores),
        );
    });
}

/// The table handle (not loaded).
pub(crate) fn handle(storage: &Storage, team: &str, name: &str) -> Result<DeltaTable, LakeError> {
    builder(storage, team, name)?
        .build()
        .map_err(|e| internal("opening the table", e))
}

fn builder(storage: &Storage, team: &str, name: &str) -> Result<DeltaTableBuilder, LakeError> {
    register_schemes();
    let url = storage.url(&table_rel(team, name));
    Ok(DeltaTableBuilder::from_url(url.clone())
        .map_err(|e| internal("opening the table", e))?
        .with_storage_backend(storage.store.clone(), url))
}

/// The table at Tessera version `version` (the latest when `None`); `None`
/// when the table has no commit yet.
pub(crate) async fn load(
    storage: &Storage,
    team: &str,
    name: &str,
    version: Option<u64>,
) -> Result<Option<DeltaTable>, LakeError> {
    if !storage
        .any_under(&format!("{}/_delta_log", table_rel(team, name)))
        .await?
    {
        return Ok(None);
    }
    let mut b = builder(storage, team, name)?;
    if let Some(v) = version {
        b = b.with_version(v - 1);
    }
    match b.load().await {
        Ok(t) => Ok(Some(t)),
        Err(DeltaTableError::NotATable(_)) => Ok(None),
        Err(e) => Err(internal(&format!("loading {team}.{name}"), e)),
    }
}

/// One commit of the log, as read from its JSON file.
struct Commit {
    delta_version: u64,
    timestamp: u64,
    origin: Origin,
    added: Vec<(String, u64, Option<u64>)>,
    removed: Vec<String>,
}

async fn read_log(storage: &Storage, team: &str, name: &str) -> Result<Vec<Commit>, LakeError> {
    let prefix = storage.path(&format!("{}/_delta_log", table_rel(team, name)));
    let mut files: Vec<(u64, object_store::path::Path)> = storage
        .store
        .list(Some(&prefix))
        .try_filter_map(|m| async move {
            let f = m.location.filename().unwrap_or("").to_string();
            let v = f
                .strip_suffix(".json")
                .filter(|s| s.len() == 20)
                .and_then(|s| s.parse::<u64>().ok());
            Ok(v.map(|v| (v, m.location)))
        })
        .try_collect()
        .await
        .map_err(|e| internal("reading the table's log", e))?;
    files.sort();
    let mut out = Vec::new();
    for (v, path) in files {
        let bytes = storage
            .store
            .get(&path)
            .await
            .map_err(|e| internal("reading the table's log", e))?
            .bytes()
            .await
            .map_err(|e| internal("reading the table's log", e))?;
        let mut c = Commit {
            delta_version: v,
            timestamp: 0,
            origin: Origin::default(),
            added: Vec::new(),
            removed: Vec::new(),
        };
        for line in bytes.split(|b| *b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let action: serde_json::Value =
                serde_json::from_slice(line).map_err(|e| internal("reading the table's log", e))?;
            if let Some(info) = action.get("commitInfo") {
                c.timestamp = info.get("timestamp").and_then(|t| t.as_u64()).unwrap_or(0);
                if let Some(o) = info.get("tessera") {
                    c.origin = serde_json::from_value(o.clone()).unwrap_or_default();
                } else {
                    c.origin.operation = info
                        .get("operation")
                        .and_then(|o| o.as_str())
                        .unwrap_or("")
                        .to_lowercase();
                }
            } else if let Some(add) = action.get("add") {
                let path = add.get("path").and_then(|p| p.as_str()).unwrap_or("");
                let size = add.get("size").and_then(|s| s.as_u64()).unwrap_or(0);
                let rows = add
                    .get("stats")
                    .and_then(|s| s.as_str())
                    .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
                    .and_then(|s| s.get("numRecords").and_then(|n| n.as_u64()));
                c.added.push((path.to_string(), size, rows));
            } else if let Some(rm) = action.get("remove") {
                let path = rm.get("path").and_then(|p| p.as_str()).unwrap_or("");
                c.removed.push(path.to_string());
            }
        }
        out.push(c);
    }
    Ok(out)
}

/// Every version, oldest first, with rows, files and bytes as of each.
pub(crate) async fn versions(
    storage: &Storage,
    team: &str,
    name: &str,
) -> Result<Vec<Version>, LakeError> {
    let mut live: HashMap<String, (u64, Option<u64>)> = HashMap::new();
    let mut out = Vec::new();
    for c in read_log(storage, team, name).await? {
        for p in &c.removed {
            live.remove(p);
        }
        for (p, size, rows) in &c.added {
            live.insert(p.clone(), (*size, *rows));
        }
        let rows = live
            .values()
            .try_fold(0u64, |acc, (_, r)| r.map(|r| acc + r));
        out.push(Version {
            version: c.delta_version + 1,
            created_at: c.timestamp,
            operation: c.origin.operation,
            detail: c.origin.detail,
            rows,
            files: live.len() as u64,
            bytes: live.values().map(|(s, _)| s).sum(),
            inputs: c.origin.inputs,
            job: c.origin.job,
        });
    }
    Ok(out)
}

/// The data files (paths relative to the table's directory) that make up
/// Tessera version `version`.
pub(crate) async fn live_files(
    storage: &Storage,
    team: &str,
    name: &str,
    version: u64,
) -> Result<Vec<String>, LakeError> {
    let mut live = std::collections::BTreeSet::new();
    let mut found = false;
    for c in read_log(storage, team, name).await? {
        if c.delta_version + 1 > version {
            break;
        }
        found = c.delta_version + 1 == version;
        for p in &c.removed {
            live.remove(p);
        }
        for (p, _, _) in &c.added {
            live.insert(p.clone());
        }
    }
    if !found {
        return Err(LakeError::NotFound(format!(
            "{team}.{name} has no version {version}"
        )));
    }
    Ok(live.into_iter().collect())
}

/// The latest Tessera version, if any.
pub(crate) async fn latest(
    storage: &Storage,
    team: &str,
    name: &str,
) -> Result<Option<u64>, LakeError> {
    if !storage
        .any_under(&format!("{}/_delta_log", table_rel(team, name)))
        .await?
    {
        return Ok(None);
    }
    let t = handle(storage, team, name)?;
    match t.get_latest_version().await {
        Ok(v) => Ok(Some(v + 1)),
        Err(DeltaTableError::NotATable(_)) => Ok(None),
        Err(DeltaTableError::InvalidVersion(_)) => Ok(None),
        Err(e) => Err(internal("reading the table's version", e)),
    }
}

/// The columns of a version.
pub(crate) async fn schema(
    storage: &Storage,
    team: &str,
    name: &str,
    version: u64,
) -> Result<Vec<Column>, LakeError> {
    let Some(t) = load(storage, team, name, Some(version)).await? else {
        return Ok(Vec::new());
    };
    Ok(columns(arrow_schema(&t).await?.as_ref()))
}

pub(crate) fn columns(schema: &Schema) -> Vec<Column> {
    schema
        .fields()
        .iter()
        .map(|f| Column {
            name: f.name().clone(),
            data_type: type_name(f.data_type()),
            nullable: f.is_nullable(),
        })
        .collect()
}

/// A column type as SQL users know it.
pub(crate) fn type_name(t: &DataType) -> String {
    match t {
        DataType::Int8 => "tinyint".into(),
        DataType::Int16 => "smallint".into(),
        DataType::Int32 => "int".into(),
        DataType::Int64 => "bigint".into(),
        DataType::Float32 => "float".into(),
        DataType::Float64 => "double".into(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "string".into(),
        DataType::Boolean => "boolean".into(),
        DataType::Date32 | DataType::Date64 => "date".into(),
        DataType::Timestamp(_, Some(_)) => "timestamp".into(),
        DataType::Timestamp(_, None) => "timestamp_ntz".into(),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => "binary".into(),
        DataType::Decimal128(p, s) => format!("decimal({p},{s})"),
        other => other.to_string().to_lowercase(),
    }
}

pub(crate) async fn arrow_schema(t: &DeltaTable) -> Result<SchemaRef, LakeError> {
    let provider = t
        .table_provider()
        .await
        .map_err(|e| internal("reading the table's schema", e))?;
    Ok(provider.schema())
}

/// The settings every lake session shares: plain string types (Delta
/// keeps `string`), no information schema.
pub(crate) fn session_config() -> deltalake::datafusion::prelude::SessionConfig {
    deltalake::datafusion::prelude::SessionConfig::new()
        .with_information_schema(false)
        .set_bool(
            "datafusion.execution.parquet.schema_force_view_types",
            false,
        )
        .set_bool("datafusion.sql_parser.map_string_types_to_utf8view", false)
}

/// A session with Delta's planner, which its writes need.
pub(crate) fn session_with(
    config: deltalake::datafusion::prelude::SessionConfig,
) -> SessionContext {
    let state = deltalake::datafusion::execution::SessionStateBuilder::new()
        .with_default_features()
        .with_config(config)
        .with_query_planner(deltalake::delta_datafusion::planner::DeltaPlanner::new())
        .build();
    SessionContext::new_with_state(state)
}

/// A session for reading and writing the lake's tables.
pub(crate) fn session() -> SessionContext {
    session_with(session_config())
}

/// Ingests a received file as the next version of the table.
pub(crate) async fn ingest(
    storage: &Storage,
    ds: &Dataset,
    file: &FsPath,
    upload: &Upload,
    origin: Origin,
) -> Result<Version, LakeError> {
    let started = std::time::Instant::now();
    let existing = load(storage, &ds.team, &ds.name, None).await?;
    let expected = match &existing {
        Some(t) => Some(arrow_schema(t).await?),
        None => None,
    };
    let ctx = session();
    let path = file
        .to_str()
        .ok_or_else(|| internal("the spool path", "not UTF-8"))?;
    let df = match upload.format {
        UploadFormat::Csv => {
            let header = check_csv_header(&first_file(file, "csv")?, expected.as_deref())?;
            let mut opts = CsvReadOptions::new()
                .has_header(true)
                .schema_infer_max_records(100_000)
                .file_extension(".csv");
            let schema;
            if let Some(s) = &expected {
                // Read by the table's types, under the file's header names.
                schema = Schema::new(
                    s.fields()
                        .iter()
                        .zip(&header)
                        .map(|(f, h)| Field::new(h, file_type(f.data_type()), true))
                        .collect::<Vec<_>>(),
                );
                opts = opts.schema(&schema);
            }
            ctx.read_csv(path, opts).await
        }
        UploadFormat::Jsonl => {
            let schema;
            let mut opts = JsonReadOptions::default()
                .file_extension(".json")
                .schema_infer_max_records(100_000);
            if let Some(s) = &expected {
                schema = Schema::new(
                    s.fields()
                        .iter()
                        .map(|f| Field::new(f.name(), file_type(f.data_type()), true))
                        .collect::<Vec<_>>(),
                );
                opts = opts.schema(&schema);
            }
            ctx.read_json(path, opts).await
        }
        UploadFormat::Parquet => {
            ctx.read_parquet(
                path,
                ParquetReadOptions::default().file_extension(".parquet"),
            )
            .await
        }
        UploadFormat::Tar => unreachable!("file sets are not tables"),
    }
    .map_err(|e| bad_data(upload.format, &e.to_string()))?;
    let df = normalize(df, expected.as_deref(), upload.format)?;
    let version = write_frame_mode(
        storage,
        ds,
        existing,
        df,
        upload.mode == WriteMode::Overwrite,
        false,
        origin,
    )
    .await
    .map_err(|e| match e {
        LakeError::Internal(m) => bad_data(upload.format, &m),
        other => other,
    })?;
    tracing::info!(
        dataset = %format!("{}.{}", ds.team, ds.name),
        version = version.version,
        rows = version.rows,
        files = version.files,
        seconds = started.elapsed().as_secs_f64(),
        "upload ingested"
    );
    Ok(version)
}

/// Writes a DataFrame as the next version; `overwrite` replaces the rows
/// and the schema.
pub(crate) async fn write_frame(
    storage: &Storage,
    ds: &Dataset,
    df: DataFrame,
    overwrite: bool,
    origin: Origin,
) -> Result<Version, LakeError> {
    let existing = load(storage, &ds.team, &ds.name, None).await?;
    let df = normalize(df, None, UploadFormat::Parquet)?;
    write_frame_mode(storage, ds, existing, df, overwrite, overwrite, origin).await
}

async fn write_frame_mode(
    storage: &Storage,
    ds: &Dataset,
    existing: Option<DeltaTable>,
    df: DataFrame,
    overwrite: bool,
    new_schema: bool,
    origin: Origin,
) -> Result<Version, LakeError> {
    let table = match existing {
        Some(t) => t,
        None => {
            storage.ensure_dir(&table_rel(&ds.team, &ds.name))?;
            handle(storage, &ds.team, &ds.name)?
        }
    };
    if !overwrite && parallel_writable(&table, df.schema().as_arrow()) {
        write_parallel(&table, df, origin).await?;
        return versions(storage, &ds.team, &ds.name)
            .await?
            .pop()
            .ok_or_else(|| internal("reading the new version", "no commit"));
    }
    let (state, plan) = df.into_parts();
    let metadata = serde_json::to_value(&origin).expect("an origin serializes");
    let mut write = table
        .write(Vec::new())
        .with_input_plan(plan)
        .with_session_state(Arc::new(state))
        .with_save_mode(if overwrite {
            SaveMode::Overwrite
        } else {
            SaveMode::Append
        })
        .with_commit_properties(
            CommitProperties::default().with_metadata([("tessera".to_string(), metadata)]),
        );
    if new_schema {
        write = write.with_schema_mode(SchemaMode::Overwrite);
    }
    write.await.map_err(|e| match e {
        DeltaTableError::Arrow { source } => LakeError::BadData(source.to_string()),
        DeltaTableError::GenericError { source } => LakeError::BadData(source.to_string()),
        other => LakeError::Internal(other.to_string()),
    })?;
    versions(storage, &ds.team, &ds.name)
        .await?
        .pop()
        .ok_or_else(|| internal("reading the new version", "no commit"))
}

/// Rows handed to the Parquet writer at a time: whole batches, so the
/// writer does not re-slice them (Delta's default is 1,024 rows).
const WRITE_BATCH_ROWS: usize = 64 * 1024;

/// The Parquet settings of the files the lake writes: Delta's (Snappy,
/// row groups of up to 1 Mi rows). Smaller row groups were tried: 256 Ki
/// rows made the benchmark's files 22 % larger (a high-cardinality column
/// starts a new dictionary page in every row group) for no faster query.
fn writer_properties() -> deltalake::parquet::file::properties::WriterProperties {
    use deltalake::parquet::basic::Compression;
    deltalake::parquet::file::properties::WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build()
}

/// Whether rows of `schema` can be appended (or start the table) through
/// [`write_parallel`]: plain column types that need no conversion for
/// Delta, every column nullable, and — for a table that has a schema —
/// exactly the table's columns. Anything else takes Delta's own write,
/// which converts, validates and explains.
fn parallel_writable(table: &DeltaTable, schema: &Schema) -> bool {
    let plain = schema.fields().iter().all(|f| {
        f.is_nullable()
            && matches!(
                f.data_type(),
                DataType::Boolean
                    | DataType::Int8
                    | DataType::Int16
                    | DataType::Int32
                    | DataType::Int64
                    | DataType::Float32
                    | DataType::Float64
                    | DataType::Utf8
                    | DataType::Binary
                    | DataType::Date32
                    | DataType::Decimal128(_, _)
                    | DataType::Timestamp(TimeUnit::Microsecond, Some(_))
            )
    });
    if !plain || schema.fields().is_empty() {
        return false;
    }
    match table.snapshot() {
        // A new table: its schema is the data's.
        Err(_) => true,
        Ok(snapshot) => {
            // Tables as the lake makes them: no partitions, no table
            // properties, no writer features (constraints, generated
            // columns, column mapping) that Delta's write would enforce.
            if !snapshot.metadata().partition_columns().is_empty()
                || !snapshot.metadata().configuration().is_empty()
                || snapshot.protocol().min_writer_version() > 2
            {
                return false;
            }
            let current = snapshot.snapshot().arrow_schema();
            current.fields().len() == schema.fields().len()
                && current.fields().iter().zip(schema.fields()).all(|(a, b)| {
                    a.name() == b.name() && a.data_type() == b.data_type() && a.is_nullable()
                })
        }
    }
}

/// Appends a DataFrame's rows as one new version, every partition of its
/// plan encoding its own Parquet files at once (Delta's own write funnels
/// an unpartitioned table's rows through a single Parquet encoder, one
/// core however many the machine has). The files are committed together
/// in one log entry; a failure leaves only unreferenced files behind.
async fn write_parallel(
    table: &DeltaTable,
    df: DataFrame,
    origin: Origin,
) -> Result<(), LakeError> {
    use deltalake::datafile::writer::{DeltaWriter, WriterConfig};
    use deltalake::datafusion::physical_plan::execute_stream_partitioned;
    use deltalake::kernel::transaction::{CommitBuilder, TableReference};
    use deltalake::kernel::Action;
    use deltalake::protocol::DeltaOperation;
    use deltalake::table::config::TablePropertiesExt;
    use std::sync::atomic::{AtomicBool, Ordering};

    let failed_to =
        |what: &str, e: &dyn std::fmt::Display| LakeError::Internal(format!("{what}: {e}"));
    let (state, plan) = df.into_parts();
    let plan = state
        .create_physical_plan(&plan)
        .await
        .map_err(|e| failed_to("planning the write", &e))?;
    let schema = plan.schema();
    let snapshot = table.snapshot().ok();
    let config = WriterConfig::new(
        schema.clone(),
        Vec::new(),
        Some(writer_properties()),
        Some(
            snapshot
                .map(|s| s.table_config().target_file_size())
                .unwrap_or(deltalake::table::config::DEFAULT_TARGET_FILE_SIZE),
        ),
        Some(WRITE_BATCH_ROWS),
        snapshot
            .map(|s| s.table_config().num_indexed_cols())
            .unwrap_or_default(),
        None,
    );
    let store = table.log_store().object_store(None);
    let streams = execute_stream_partitioned(plan, state.task_ctx())
        .map_err(|e| failed_to("starting the write", &e))?;
    // One task per partition; the first failure stops the others, and
    // each aborts its open upload.
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for mut stream in streams {
        let mut writer = DeltaWriter::new(store.clone(), config.clone());
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut result = Ok(());
            while let Some(batch) = futures::StreamExt::next(&mut stream).await {
                if stop.load(Ordering::Relaxed) {
                    result = Err(None);
                    break;
                }
                let written = match batch {
                    Ok(b) => writer.write(&b).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = written {
                    stop.store(true, Ordering::Relaxed);
                    result = Err(Some(e));
                    break;
                }
            }
            match result {
                Ok(()) => writer.close().await.map_err(|e| Some(e.to_string())),
                Err(e) => {
                    let _ = writer.abort().await;
                    Err(e)
                }
            }
        });
    }
    let mut adds = Vec::new();
    let mut error: Option<String> = None;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(a)) => adds.extend(a.into_iter().map(Action::Add)),
            Ok(Err(Some(e))) => {
                error.get_or_insert(e);
            }
            Ok(Err(None)) => {}
            Err(e) => {
                error.get_or_insert(e.to_string());
            }
        }
    }
    if let Some(e) = error {
        return Err(LakeError::Internal(e));
    }
    let metadata = serde_json::to_value(&origin).expect("an origin serializes");
    let properties = CommitProperties::default().with_metadata([("tessera".to_string(), metadata)]);
    match snapshot {
        Some(snapshot) => {
            CommitBuilder::from(properties)
                .with_actions(adds)
                .build(
                    Some(snapshot as &dyn TableReference),
                    table.log_store(),
                    DeltaOperation::Write {
                        mode: SaveMode::Append,
                        partition_by: None,
                        predicate: None,
                    },
                )
                .await
                .map_err(|e| failed_to("committing the version", &e))?;
        }
        None => {
            use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
            let columns: deltalake::kernel::StructType = schema
                .as_ref()
                .try_into_kernel()
                .map_err(|e| failed_to("the table's schema", &e))?;
            deltalake::operations::create::CreateBuilder::new()
                .with_log_store(table.log_store())
                .with_columns(columns.fields().cloned())
                .with_save_mode(SaveMode::ErrorIfExists)
                .with_actions(adds)
                .with_commit_properties(properties)
                .await
                .map_err(|e| failed_to("committing the version", &e))?;
        }
    }
    Ok(())
}

/// The type a file column is read as for a table column of type `t`.
fn file_type(t: &DataType) -> DataType {
    match t {
        DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
        other => other.clone(),
    }
}

/// `path` itself, or, for a directory of files, its first `.ext` file.
fn first_file(path: &FsPath, ext: &str) -> Result<std::path::PathBuf, LakeError> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let mut files: Vec<_> = std::fs::read_dir(path)
        .map_err(|e| internal("reading the upload", e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    files
        .into_iter()
        .next()
        .ok_or_else(|| LakeError::BadData(format!("no .{ext} file to read")))
}

/// Checks a CSV's header: non-empty, unique names and — for a table that
/// has columns — the table's columns in the table's order.
fn check_csv_header(file: &FsPath, expected: Option<&Schema>) -> Result<Vec<String>, LakeError> {
    use std::io::BufRead;
    let f = std::fs::File::open(file).map_err(|e| internal("reading the upload", e))?;
    let mut line = String::new();
    std::io::BufReader::new(f)
        .read_line(&mut line)
        .map_err(|e| LakeError::BadData(format!("the CSV's first line is not text: {e}")))?;
    let header: Vec<String> = line
        .trim_end_matches(['\n', '\r'])
        .split(',')
        .map(|h| h.trim().trim_matches('"').to_string())
        .collect();
    if let Some(i) = header.iter().position(|h| h.is_empty()) {
        return Err(LakeError::BadData(format!(
            "line 1: column {} of the CSV header has no name (the first line must name every column)",
            i + 1
        )));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(d) = header.iter().find(|h| !seen.insert(h.as_str())) {
        return Err(LakeError::BadData(format!(
            "line 1: the CSV header names column {d:?} twice"
        )));
    }
    if let Some(s) = expected {
        let names: Vec<&str> = s.fields().iter().map(|f| f.name().as_str()).collect();
        if header.iter().map(String::as_str).ne(names.iter().copied()) {
            return Err(LakeError::BadData(format!(
                "line 1: the CSV's columns ({}) are not the table's ({}); upload with --mode overwrite to a new dataset to change columns",
                header.join(", "),
                names.join(", ")
            )));
        }
    }
    Ok(header)
}

/// Delta keeps microsecond timestamps; finer or coarser ones are cast.
fn normalize(
    df: DataFrame,
    expected: Option<&Schema>,
    format: UploadFormat,
) -> Result<DataFrame, LakeError> {
    let schema = df.schema().as_arrow().clone();
    let mut exprs = Vec::new();
    let mut changed = false;
    for (i, f) in schema.fields().iter().enumerate() {
        let target = match (expected, f.data_type()) {
            (Some(s), _)
                if i < s.fields().len() && file_type(s.field(i).data_type()) != *f.data_type() =>
            {
                Some(file_type(s.field(i).data_type()))
            }
            (_, DataType::Timestamp(unit, tz)) if *unit != TimeUnit::Microsecond => {
                Some(DataType::Timestamp(TimeUnit::Microsecond, tz.clone()))
            }
            (_, DataType::Utf8View) => Some(DataType::Utf8),
            _ => None,
        };
        match target {
            Some(t) => {
                changed = true;
                exprs.push(cast(ident(f.name()), t).alias(f.name()));
            }
            None => exprs.push(ident(f.name())),
        }
    }
    if !changed {
        return Ok(df);
    }
    df.select(exprs)
        .map_err(|e| bad_data(format, &e.to_string()))
}

/// A user-facing message for data that cannot be read.
pub(crate) fn bad_data(format: UploadFormat, raw: &str) -> LakeError {
    let what = match format {
        UploadFormat::Csv => "the CSV",
        UploadFormat::Jsonl => "the JSON lines",
        UploadFormat::Parquet => "the Parquet file",
        UploadFormat::Tar => "the archive",
    };
    // DataFusion and Arrow nest their context; the innermost line says it.
    let msg = raw
        .trim()
        .trim_start_matches("External error: ")
        .trim_start_matches("Arrow error: ")
        .to_string();
    let msg = msg.replace(
        "Csv error: incorrect number of fields",
        "incorrect number of fields",
    );
    LakeError::BadData(format!(
        "{what} cannot be stored: {msg}; no version was created"
    ))
}

/// Used by the clean and query modules to name a wrong field.
pub(crate) fn no_column(field: &str, column: &str, schema: &Schema) -> LakeError {
    LakeError::Invalid(FieldError::new(
        field,
        format!(
            "no column {column:?}; the columns are {}",
            schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}
