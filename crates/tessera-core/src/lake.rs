//! The data lake's interface: dataset names and references, the wire types
//! of `/v1/datasets` and `/v1/query`, and the [`Lake`] trait the server calls.
//!
//! The implementation (object storage, Delta Lake tables, DataFusion) lives
//! in `tessera-lake`; the server only knows this trait, so it neither links
//! nor rebuilds the query engine.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Principal;
use crate::FieldError;

/// A stream of bytes in or out of the lake (an upload, a query result).
pub type ByteStream = BoxStream<'static, Result<Bytes, std::io::Error>>;

/// Checks a dataset or team name as it appears in SQL: a lowercase letter,
/// then lowercase letters, digits and `_`, at most 63 characters.
pub fn validate_name(field: &str, name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("{name:?} is not a dataset name: use a lowercase letter, then lowercase letters, digits or '_' (at most 63)"),
        ))
    }
}

/// `[team.]name[@version]`: which dataset, and which version of it (the
/// latest when none is named).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DatasetRef {
    pub team: Option<String>,
    pub name: String,
    pub version: Option<u64>,
}

impl DatasetRef {
    /// Parses `name`, `team.name`, `name@3` or `team.name@3`.
    pub fn parse(field: &str, text: &str) -> Result<DatasetRef, FieldError> {
        let (path, version) = match text.split_once('@') {
            Some((p, v)) => {
                let n: u64 = v.parse().map_err(|_| {
                    FieldError::new(
                        field,
                        format!("{text:?}: the version after '@' must be a number"),
                    )
                })?;
                if n == 0 {
                    return Err(FieldError::new(
                        field,
                        format!("{text:?}: versions count from 1"),
                    ));
                }
                (p, Some(n))
            }
            None => (text, None),
        };
        let (team, name) = match path.split_once('.') {
            Some((t, n)) => {
                validate_name(field, t)?;
                (Some(t.to_string()), n)
            }
            None => (None, path),
        };
        validate_name(field, name)?;
        Ok(DatasetRef {
            team,
            name: name.to_string(),
            version,
        })
    }

    /// The team, defaulting to `team`.
    pub fn team_or<'a>(&'a self, team: &'a str) -> &'a str {
        self.team.as_deref().unwrap_or(team)
    }
}

impl fmt::Display for DatasetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(t) = &self.team {
            write!(f, "{t}.")?;
        }
        f.write_str(&self.name)?;
        if let Some(v) = self.version {
            write!(f, "@{v}")?;
        }
        Ok(())
    }
}

/// What a dataset holds; fixed by its first upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    /// A Delta Lake table.
    Table,
    /// A set of files, stored by content with a manifest per version.
    Files,
}

/// `POST /v1/datasets`
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDataset {
    pub name: String,
    /// Default: the caller's team.
    #[serde(default)]
    pub team: Option<String>,
    /// Labels, e.g. `region: eu`: jobs reading the dataset run only where
    /// nodes carry the same labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub description: Option<String>,
}

/// A dataset, without its versions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Dataset {
    pub team: String,
    pub name: String,
    /// `null` until the first upload.
    pub kind: Option<DatasetKind>,
    pub labels: BTreeMap<String, String>,
    /// Other teams that may read it.
    pub grants: Vec<String>,
    pub description: Option<String>,
    pub created_at: u64,
    /// The newest version, if any.
    pub latest: Option<u64>,
}

/// One immutable version of a dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Version {
    pub version: u64,
    pub created_at: u64,
    /// What made it: `upload`, `clean`, `job`.
    pub operation: String,
    /// The operation's details (`upload clicks.csv (csv, append)`,
    /// `dedupe; drop-nulls user_id`).
    pub detail: String,
    /// Rows (tables) in this version.
    pub rows: Option<u64>,
    /// Files in this version (data files of a table, or the file set's files).
    pub files: u64,
    pub bytes: u64,
    /// The exact versions it was made from, `team.name@version`.
    pub inputs: Vec<String>,
    /// The job that wrote it, if a job did.
    pub job: Option<u64>,
}

/// A column of a table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Column {
    pub name: String,
    #[serde(rename = "type")]
    pub data_type: String,
    pub nullable: bool,
}

/// `GET /v1/datasets/{team}/{name}`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DatasetDetail {
    pub dataset: Dataset,
    /// Oldest first.
    pub versions: Vec<Version>,
    /// The latest version's columns (tables).
    pub schema: Vec<Column>,
    /// The latest version's files (file sets): path, size and SHA-256.
    pub files: Vec<FileEntry>,
}

/// A file of a file set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// The format of an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum UploadFormat {
    Csv,
    Parquet,
    /// JSON lines: one object a line.
    Jsonl,
    /// A tar stream of a directory: a file set.
    Tar,
}

impl UploadFormat {
    pub fn parse(field: &str, text: &str) -> Result<UploadFormat, FieldError> {
        match text {
            "csv" => Ok(UploadFormat::Csv),
            "parquet" => Ok(UploadFormat::Parquet),
            "jsonl" | "json" | "ndjson" => Ok(UploadFormat::Jsonl),
            "tar" => Ok(UploadFormat::Tar),
            other => Err(FieldError::new(
                field,
                format!("unknown format {other:?}: use csv, parquet, jsonl or tar"),
            )),
        }
    }

    /// The format a file name implies, by its extension.
    pub fn from_path(path: &str) -> Option<UploadFormat> {
        let ext = path.rsplit_once('.')?.1.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(UploadFormat::Csv),
            "parquet" | "pq" => Some(UploadFormat::Parquet),
            "jsonl" | "ndjson" | "json" => Some(UploadFormat::Jsonl),
            "tar" => Some(UploadFormat::Tar),
            _ => None,
        }
    }
}

/// How a table upload relates to the previous version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    /// The new version is the previous one plus these rows.
    #[default]
    Append,
    /// The new version holds only these rows.
    Overwrite,
}

/// Options of `PUT /v1/datasets/{team}/{name}/data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub format: UploadFormat,
    pub mode: WriteMode,
    /// The file or directory name the user gave, for the version's detail.
    pub source: String,
}

/// Formats of query results.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ResultFormat {
    /// JSON lines: one object per row.
    #[default]
    Json,
    Csv,
    Parquet,
}

impl ResultFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            ResultFormat::Json => "application/x-ndjson",
            ResultFormat::Csv => "text/csv",
            ResultFormat::Parquet => "application/vnd.apache.parquet",
        }
    }
}

/// `POST /v1/query`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    /// SQL over `team.dataset` and `team.dataset@version` (bare names are
    /// the caller's team's).
    pub sql: String,
    #[serde(default)]
    pub format: ResultFormat,
    /// At most this many rows come back [default and ceiling: the server's].
    #[serde(default)]
    pub max_rows: Option<u64>,
    /// The query is stopped after this long [default and ceiling: the server's].
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// A query's answer: its columns, then its rows as a stream.
pub struct QueryResult {
    pub columns: Vec<Column>,
    pub format: ResultFormat,
    /// The row limit that applied.
    pub max_rows: u64,
    pub body: ByteStream,
}

impl fmt::Debug for QueryResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueryResult")
            .field("columns", &self.columns)
            .field("format", &self.format)
            .finish()
    }
}

/// `POST /v1/datasets/{team}/{name}/clean`: operations applied in this
/// order — sql, select, rename, cast, drop-nulls, filter, dedupe — to one
/// version, written as a new version (of this dataset, or of `into`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CleanRequest {
    /// The version to clean [default: the latest].
    #[serde(default)]
    pub version: Option<u64>,
    /// Write the result to this dataset of the same team instead (created
    /// if missing).
    #[serde(default)]
    pub into: Option<String>,
    /// A SELECT over the table `input`.
    #[serde(default)]
    pub sql: Option<String>,
    #[serde(default)]
    pub select: Vec<String>,
    /// `old:new` pairs.
    #[serde(default)]
    pub rename: Vec<String>,
    /// `column:type` pairs (SQL types: `bigint`, `double`, `varchar`, `date`, `timestamp`).
    #[serde(default)]
    pub cast: Vec<String>,
    #[serde(default)]
    pub drop_nulls: Vec<String>,
    /// A SQL condition rows must meet.
    #[serde(default)]
    pub filter: Option<String>,
    #[serde(default)]
    pub dedupe: bool,
}

impl CleanRequest {
    /// `dedupe; drop-nulls user_id; filter ts > '2024-01-01'`
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(s) = &self.sql {
            parts.push(format!("sql {s}"));
        }
        if !self.select.is_empty() {
            parts.push(format!("select {}", self.select.join(",")));
        }
        if !self.rename.is_empty() {
            parts.push(format!("rename {}", self.rename.join(",")));
        }
        if !self.cast.is_empty() {
            parts.push(format!("cast {}", self.cast.join(",")));
        }
        if !self.drop_nulls.is_empty() {
            parts.push(format!("drop-nulls {}", self.drop_nulls.join(",")));
        }
        if let Some(f) = &self.filter {
            parts.push(format!("filter {f}"));
        }
        if self.dedupe {
            parts.push("dedupe".into());
        }
        parts.join("; ")
    }
}

/// `POST /v1/datasets/{team}/{name}/grants`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    pub team: String,
    /// Take the grant away instead.
    #[serde(default)]
    pub revoke: bool,
}

/// What went wrong in the lake, in words a user can act on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LakeError {
    /// Bad input naming its field (422).
    #[error("{0}")]
    Invalid(FieldError),
    /// The data itself is malformed: a ragged CSV, a wrong type (422).
    #[error("{0}")]
    BadData(String),
    /// A query that does not parse or plan (400).
    #[error("{0}")]
    Query(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    /// The query ran past its time limit.
    #[error("{0}")]
    Timeout(String),
    /// Storage failed; nothing was committed.
    #[error("{0}")]
    Internal(String),
}

impl From<FieldError> for LakeError {
    fn from(e: FieldError) -> Self {
        LakeError::Invalid(e)
    }
}

/// The data lake, as the control plane uses it. Every call names the
/// caller; the lake checks what the caller's team may read and write.
#[async_trait::async_trait]
pub trait Lake: Send + Sync {
    async fn create(&self, who: &Principal, req: CreateDataset) -> Result<Dataset, LakeError>;
    /// Every dataset the caller may read.
    async fn list(&self, who: &Principal) -> Result<Vec<Dataset>, LakeError>;
    async fn show(
        &self,
        who: &Principal,
        team: &str,
        name: &str,
    ) -> Result<DatasetDetail, LakeError>;
    /// Ingests `body` as the next version: committed whole, or not at all.
    /// Creates the dataset (in `team`) when it does not exist yet.
    async fn upload(
        &self,
        who: &Principal,
        team: &str,
        name: &str,
        upload: Upload,
        body: ByteStream,
    ) -> Result<Version, LakeError>;
    async fn query(&self, who: &Principal, req: QueryRequest) -> Result<QueryResult, LakeError>;
    async fn clean(
        &self,
        who: &Principal,
        team: &str,
        name: &str,
        req: CleanRequest,
    ) -> Result<(Dataset, Version), LakeError>;
    async fn grant(
        &self,
        who: &Principal,
        team: &str,
        name: &str,
        req: GrantRequest,
    ) -> Result<Dataset, LakeError>;

    /// Stages a version (the latest when `None`) for jobs to read: a
    /// read-only directory on this machine's disk, made once per version.
    /// Checks that `who` may read it.
    async fn stage_input(
        &self,
        who: &Principal,
        team: &str,
        name: &str,
        version: Option<u64>,
    ) -> Result<StagedInput, LakeError>;

    /// Removes staged inputs that no job needs any more: every staged
    /// version whose directory is not in `keep` (the inputs of jobs that
    /// have not ended) and that was last staged or reused longer than
    /// `idle` ago, and what stagings that never finished left behind, as
    /// old. A removed version is staged again when a job asks for it.
    async fn prune_staged(
        &self,
        keep: &std::collections::HashSet<std::path::PathBuf>,
        idle: std::time::Duration,
    ) -> Result<Pruned, LakeError>;

    /// Checks, before a job runs, that `who` may write the job's output to
    /// `team.name` in `format` (none: whatever the dataset holds).
    async fn check_output(
        &self,
        who: &Principal,
        team: &str,
        name: &str,
        format: Option<UploadFormat>,
    ) -> Result<(), LakeError>;

    /// Writes the directory `dir` as the next version of `team.name`, made
    /// by job `job` from `inputs` (creating the dataset if needed). If a
    /// version made by this job already exists — the write was done
    /// before a restart — that version is returned and nothing is written.
    async fn write_output(&self, out: JobOutputWrite) -> Result<Version, LakeError>;
}

/// A dataset version staged on local disk for jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct StagedInput {
    pub dataset: Dataset,
    pub version: u64,
    /// The staged, read-only directory: a table's Parquet files, or a file
    /// set's files under their paths.
    pub path: std::path::PathBuf,
}

/// What [`Lake::prune_staged`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Staged versions (and unfinished stagings) removed.
    pub dirs: usize,
    /// The bytes of their files.
    pub bytes: u64,
}

/// What [`Lake::write_output`] writes.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutputWrite {
    pub team: String,
    pub name: String,
    pub dir: std::path::PathBuf,
    /// `from` as the job named it, for the version's detail.
    pub from: String,
    pub format: Option<UploadFormat>,
    pub mode: WriteMode,
    pub job: u64,
    /// The versions the job read, `team.name@version`.
    pub inputs: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_and_print() {
        let r = DatasetRef::parse("d", "ads.clicks@3").unwrap();
        assert_eq!(r.team.as_deref(), Some("ads"));
        assert_eq!(r.name, "clicks");
        assert_eq!(r.version, Some(3));
        assert_eq!(r.to_string(), "ads.clicks@3");
        assert_eq!(DatasetRef::parse("d", "clicks").unwrap().team, None);
        let e = DatasetRef::parse("inputs[0].dataset", "ads.clicks@x").unwrap_err();
        assert_eq!(e.field, "inputs[0].dataset");
        assert!(e.message.contains("must be a number"), "{e}");
        assert!(DatasetRef::parse("d", "Ads.clicks").is_err());
        assert!(DatasetRef::parse("d", "clicks@0").is_err());
        assert!(DatasetRef::parse("d", "a.b.c").is_err());
    }
}
