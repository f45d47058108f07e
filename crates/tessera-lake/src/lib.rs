//! The data lake: versioned datasets on object storage, queried with SQL.
//!
//! This crate owns everything behind the [`tessera_core::lake::Lake`] trait:
//! the storage layout on an `object_store` (a directory under
//! `$TESSERA_HOME` by default, or any S3-compatible bucket), tables kept as
//! Delta Lake tables (the `deltalake` crate, so Spark, DuckDB, Polars and
//! pandas read them as they are), file sets kept by content with one
//! manifest per version, ingest of CSV, Parquet and JSON lines, SQL with
//! DataFusion, and cleaning operations that record their lineage.
//!
//! It owns no HTTP and no job state: the server calls it through the trait
//! and checks nothing about data itself. A version exists exactly when its
//! commit exists — the Delta log entry of a table, the manifest of a file
//! set — and each is written last, with put-if-absent, after all of its
//! data; a failed or interrupted upload leaves only unreferenced objects.
//!
//! Layout, under the lake's root:
//!
//! ```text
//! datasets/<team>/<name>/dataset.json     team, name, kind, labels, grants
//! datasets/<team>/<name>/table/           the Delta table (Tessera version N = Delta version N-1)
//! datasets/<team>/<name>/files/<N>.json   a file set's manifest of version N
//! objects/sha256/<hex>                     file contents, by hash
//! ```

mod catalog;
mod clean;
mod files;
mod jobs;
mod query;
mod storage;
mod table;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_core::auth::Principal;
use tessera_core::lake::{
    ByteStream, CleanRequest, CreateDataset, Dataset, DatasetDetail, DatasetKind, GrantRequest,
    JobOutputWrite, Lake, LakeError, Pruned, QueryRequest, QueryResult, StagedInput, Upload,
    UploadFormat, Version,
};
use tessera_core::FieldError;

pub use storage::Location;

/// How the lake is set up.
#[derive(Debug, Clone)]
pub struct LakeConfig {
    /// Where datasets live.
    pub location: Location,
    /// A local directory for uploads in flight (always on local disk).
    pub scratch: PathBuf,
    /// The most rows a JSON query result holds (and the default); CSV and
    /// Parquet results are not capped.
    pub max_rows: u64,
    /// The longest a query may run (and the default).
    pub max_query_time: Duration,
    /// Where versions are staged for jobs to read (always on local disk).
    pub staging: PathBuf,
}

impl LakeConfig {
    /// The default: datasets in `<home>/lake`, uploads spooled in `<home>/lake-tmp`.
    pub fn local(home: &std::path::Path) -> LakeConfig {
        LakeConfig {
            location: Location::Local(home.join("lake")),
            scratch: home.join("lake-tmp"),
            staging: home.join("lake-inputs"),
            max_rows: 1_000_000,
            max_query_time: Duration::from_secs(300),
        }
    }
}

/// The lake: implements [`Lake`].
pub struct DataLake {
    storage: Arc<storage::Storage>,
    config: LakeConfig,
    /// One writer per dataset at a time (this process is the only writer:
    /// one control plane per home).
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Staging (shared) against pruning the staged inputs (exclusive).
    staging: tokio::sync::RwLock<()>,
}

impl std::fmt::Debug for DataLake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataLake")
            .field("location", &self.config.location)
            .finish()
    }
}

impl DataLake {
    /// Opens (creating when needed) the lake. Uploads an earlier process
    /// left half-done are discarded: they never became versions.
    pub fn open(config: LakeConfig) -> anyhow::Result<DataLake> {
        let storage = Arc::new(storage::Storage::open(&config.location)?);
        if config.scratch.exists() {
            std::fs::remove_dir_all(&config.scratch)?;
        }
        std::fs::create_dir_all(&config.scratch)?;
        Ok(DataLake {
            storage,
            config,
            locks: Mutex::new(HashMap::new()),
            staging: tokio::sync::RwLock::new(()),
        })
    }

    fn lock_for(&self, team: &str, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("lake locks")
            .entry(format!("{team}.{name}"))
            .or_default()
            .clone()
    }

    /// The dataset, if the caller may read it.
    async fn readable(
        &self,
        who: &Principal,
        team: &str,
        name: &str,
    ) -> Result<Dataset, LakeError> {
        let ds = catalog::get(&self.storage, team, name)
            .await?
            .ok_or_else(|| not_found(team, name))?;
        check_read(who, &ds)?;
        Ok(ds)
    }

    /// The newest version of a dataset, if any.
    async fn latest(&self, ds: &Dataset) -> Result<Option<u64>, LakeError> {
        match ds.kind {
            None => Ok(None),
            Some(DatasetKind::Table) => table::latest(&self.storage, &ds.team, &ds.name).await,
            Some(DatasetKind::Files) => files::latest(&self.storage, &ds.team, &ds.name).await,
        }
    }

    async fn with_latest(&self, mut ds: Dataset) -> Result<Dataset, LakeError> {
        ds.latest = self.latest(&ds).await?;
        Ok(ds)
    }

    /// Creates a dataset for `upload`, `clean` or a job's output when it
    /// does not exist; `who` must be allowed to (none: a job's output,
    /// checked when the job was submitted).
    async fn get_or_create(
        &self,
        who: Option<&Principal>,
        team: &str,
        name: &str,
        labels: std::collections::BTreeMap<String, String>,
    ) -> Result<Dataset, LakeError> {
        if let Some(ds) = catalog::get(&self.storage, team, name).await? {
            return Ok(ds);
        }
        if let Some(who) = who {
            check_write_team(who, team)?;
        }
        let ds = Dataset {
            team: team.to_string(),
            name: name.to_string(),
            kind: None,
            labels,
            grants: Vec::new(),
            description: None,
            created_at: now_ms(),
            latest: None,
        };
        match catalog::create(&self.storage, &ds).await {
            Ok(()) => Ok(ds),
            // Created by someone else just now: use theirs.
            Err(LakeError::Conflict(_)) => catalog::get(&self.storage, team, name)
                .await?
                .ok_or_else(|| not_found(team, name)),
            Err(e) => Err(e),
        }
    }

    /// Fixes a dataset's kind at its first upload; refuses the other kind after.
    async fn settle_kind(&self, ds: &mut Dataset, kind: DatasetKind) -> Result<(), LakeError> {
        match ds.kind {
            Some(k) if k == kind => Ok(()),
            Some(k) => Err(LakeError::Invalid(FieldError::new(
                "format",
                format!(
                    "{}.{} is a {}; upload {}",
                    ds.team,
                    ds.name,
                    kind_name(k),
                    match k {
                        DatasetKind::Table => "CSV, Parquet or JSON lines to it",
                        DatasetKind::Files => "a directory to it",
                    }
                ),
            ))),
            None => {
                ds.kind = Some(kind);
                catalog::put(&self.storage, ds).await
            }
        }
    }

    /// The lake's local scratch directory.
    pub fn scratch(&self) -> &std::path::Path {
        &self.config.scratch
    }
}

fn kind_name(k: DatasetKind) -> &'static str {
    match k {
        DatasetKind::Table => "table",
        DatasetKind::Files => "file set",
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn not_found(team: &str, name: &str) -> LakeError {
    LakeError::NotFound(format!("no dataset {team}.{name}"))
}

pub(crate) fn may_read(who: &Principal, ds: &Dataset) -> bool {
    who.can_read_team(&ds.team) || ds.grants.iter().any(|t| t == &who.team)
}

pub(crate) fn check_read(who: &Principal, ds: &Dataset) -> Result<(), LakeError> {
    if may_read(who, ds) {
        Ok(())
    } else {
        Err(LakeError::Forbidden(format!(
            "dataset {}.{} belongs to team {}, and team {} has no grant to read it (the owner can run `tessera data grant {}.{} --team {}`)",
            ds.team, ds.name, ds.team, who.team, ds.team, ds.name, who.team
        )))
    }
}

pub(crate) fn check_write_team(who: &Principal, team: &str) -> Result<(), LakeError> {
    if who.can_write_team(team) {
        Ok(())
    } else {
        Err(LakeError::Forbidden(format!(
            "only members of team {team} may change its datasets (you are a {:?} of team {})",
            who.role, who.team
        )))
    }
}

#[async_trait::async_trait]
impl Lake for DataLake {
    async fn create(&self, who: &Principal, req: CreateDataset) -> Result<Dataset, LakeError> {
        let team = req.team.clone().unwrap_or_else(|| who.team.clone());
        tessera_core::lake::validate_name("team", &team)?;
        tessera_core::lake::validate_name("name", &req.name)?;
        for (k, v) in &req.labels {
            if k.is_empty() || v.is_empty() || k.contains(['=', ',']) || v.contains(',') {
                return Err(LakeError::Invalid(FieldError::new(
                    format!("labels.{k}"),
                    "labels are non-empty key=value pairs without ',' or a second '='",
                )));
            }
        }
        check_write_team(who, &team)?;
        let ds = Dataset {
            team,
            name: req.name,
            kind: None,
            labels: req.labels,
            grants: Vec::new(),
            description: req.description,
            created_at: now_ms(),
            latest: None,
        };
        catalog::create(&self.storage, &ds).await?;
        Ok(ds)
    }

    async fn list(&self, who: &Principal) -> Result<Vec<Dataset>, LakeError> {
        let mut out = Vec::new();
        for ds in catalog::list(&self.storage).await? {
            if may_read(who, &ds) {
                out.push(self.with_latest(ds).await?);
            }
        }
        Ok(out)
    }

    async fn show(
        &self,
        who: &Principal,
        team: &str,
        name: &str,
    ) -> Result<DatasetDetail, LakeError> {
        let ds = self.readable(who, team, name).await?;
        let ds = self.with_latest(ds).await?;
        let (versions, schema, files) = match ds.kind {
            None => (Vec::new(), Vec::new(), Vec::new()),
            Some(DatasetKind::Table) => {
                let versions = table::versions(&self.storage, team, name).await?;
                let schema = match ds.latest {
                    Some(v) => table::schema(&self.storage, team, name, v).await?,
                    None => Vec::new(),
                };
                (versions, schema, Vec::new())
            }
            Some(DatasetKind::Files) => {
                let versions = files::versions(&self.storage, team, name).await?;
                let list = match ds.latest {
                    Some(v) => files::manifest(&self.storage, team, name, v).await?.files,
                    None => Vec::new(),
                };
                (versions, Vec::new(), list)
            }
        };
        Ok(DatasetDetail {
            dataset: ds,
            versions,
            schema,
            files,
        })
    }

    async fn upload(
        &self,
        who: &Principal,
        team: &str,
        name: &str,
        upload: Upload,
        body: ByteStream,
    ) -> Result<Version, LakeError> {
        tessera_core::lake::validate_name("team", team)?;
        tessera_core::lake::validate_name("name", name)?;
        check_write_team(who, team)?;
        // Receive the whole body first: a cut-off upload stops here, before
        // anything is written to the lake.
        let spool = storage::spool(&self.config.scratch, body, &upload).await?;
        let lock = self.lock_for(team, name);
        let _guard = lock.lock().await;
        let mut ds = self
            .get_or_create(Some(who), team, name, Default::default())
            .await?;
        let kind = match upload.format {
            UploadFormat::Tar => DatasetKind::Files,
            _ => DatasetKind::Table,
        };
        self.settle_kind(&mut ds, kind).await?;
        let detail = format!(
            "{} ({}{})",
            upload.source,
            format_name(upload.format),
            match (kind, upload.mode) {
                (DatasetKind::Files, _) => "",
                (_, tessera_core::lake::WriteMode::Append) => ", append",
                (_, tessera_core::lake::WriteMode::Overwrite) => ", overwrite",
            }
        );
        let origin = table::Origin {
            operation: "upload".into(),
            detail,
            inputs: Vec::new(),
            job: None,
        };
        let result = match kind {
            DatasetKind::Table => {
                table::ingest(&self.storage, &ds, spool.path(), &upload, origin).await
            }
            DatasetKind::Files => files::ingest(&self.storage, &ds, spool.path(), origin).await,
        };
        drop(spool);
        result
    }

    async fn query(&self, who: &Principal, req: QueryRequest) -> Result<QueryResult, LakeError> {
        // Rows shown to people (JSON) are capped; exports to files (CSV,
        // Parquet) are whole unless the caller asks for fewer.
        let cap = match req.format {
            tessera_core::lake::ResultFormat::Json => self.config.max_rows,
            _ => u64::MAX,
        };
        let max_rows = req.max_rows.unwrap_or(cap).min(cap);
        let limit = req
            .timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(self.config.max_query_time)
            .min(self.config.max_query_time);
        let datasets = catalog::list(&self.storage).await?;
        query::run(
            &self.storage,
            who,
            datasets,
            &req.sql,
            req.format,
            max_rows,
            limit,
        )
        .await
    }

    async fn clean(
        &self,
        who: &Principal,
        team: &str,
        name: &str,
        req: CleanRequest,
    ) -> Result<(Dataset, Version), LakeError> {
        let source = self.readable(who, team, name).await?;
        let source = self.with_latest(source).await?;
        if source.kind != Some(DatasetKind::Table) {
            return Err(LakeError::Invalid(FieldError::new(
                "dataset",
                format!(
                    "{team}.{name} is {}; cleaning works on tables",
                    match source.kind {
                        None => "empty",
                        _ => "a file set",
                    }
                ),
            )));
        }
        let latest = source.latest.ok_or_else(|| {
            LakeError::Invalid(FieldError::new(
                "dataset",
                format!("{team}.{name} has no versions yet"),
            ))
        })?;
        let version = req.version.unwrap_or(latest);
        if version == 0 || version > latest {
            return Err(LakeError::Invalid(FieldError::new(
                "version",
                format!("{team}.{name} has versions 1 to {latest}, not {version}"),
            )));
        }
        let target = match &req.into {
            Some(n) => {
                tessera_core::lake::validate_name("into", n)?;
                n.clone()
            }
            None => name.to_string(),
        };
        check_write_team(who, team)?;
        if req.describe().is_empty() {
            return Err(LakeError::Invalid(FieldError::new(
                "",
                "name at least one operation (dedupe, drop_nulls, filter, cast, rename, select, sql)",
            )));
        }
        let df = clean::plan(&self.storage, &source, version, &req).await?;
        let lock = self.lock_for(team, &target);
        let _guard = lock.lock().await;
        // Cleaned data keeps its source's residency.
        let mut ds = self
            .get_or_create(Some(who), team, &target, source.labels.clone())
            .await?;
        self.settle_kind(&mut ds, DatasetKind::Table).await?;
        let origin = table::Origin {
            operation: "clean".into(),
            detail: req.describe(),
            inputs: vec![format!("{team}.{name}@{version}")],
            job: None,
        };
        let v = table::write_frame(&self.storage, &ds, df, true, origin).await?;
        let ds = self.with_latest(ds).await?;
        Ok((ds, v))
    }

    async fn grant(
        &self,
        who: &Principal,
        team: &str,
        name: &str,
        req: GrantRequest,
    ) -> Result<Dataset, LakeError> {
        tessera_core::lake::validate_name("team", &req.team)?;
        let lock = self.lock_for(team, name);
        let _guard = lock.lock().await;
        let mut ds = self.readable(who, team, name).await?;
        check_write_team(who, team)?;
        ds.grants.retain(|t| t != &req.team);
        if !req.revoke && req.team != ds.team {
            ds.grants.push(req.team.clone());
            ds.grants.sort();
        }
        catalog::put(&self.storage, &ds).await?;
        self.with_latest(ds).await
    }

    async fn stage_input(
        &self,
        who: &Principal,
        team: &str,
        name: &str,
        version: Option<u64>,
    ) -> Result<StagedInput, LakeError> {
        let ds = self.readable(who, team, name).await?;
        let ds = self.with_latest(ds).await?;
        let latest = ds.latest.ok_or_else(|| {
            LakeError::Invalid(FieldError::new(
                "dataset",
                format!("{team}.{name} has no versions yet"),
            ))
        })?;
        let version = version.unwrap_or(latest);
        if version == 0 || version > latest {
            return Err(LakeError::Invalid(FieldError::new(
                "version",
                format!("{team}.{name} has versions 1 to {latest}, not {version}"),
            )));
        }
        let path = {
            let _staging = self.staging.read().await;
            jobs::stage(&self.storage, &self.config.staging, &ds, version).await?
        };
        Ok(StagedInput {
            dataset: ds,
            version,
            path,
        })
    }

    async fn prune_staged(
        &self,
        keep: &std::collections::HashSet<std::path::PathBuf>,
        idle: std::time::Duration,
    ) -> Result<Pruned, LakeError> {
        let _pruning = self.staging.write().await;
        let root = self.config.staging.clone();
        let keep = keep.clone();
        tokio::task::spawn_blocking(move || jobs::prune(&root, &keep, idle))
            .await
            .map_err(|e| LakeError::Internal(format!("pruning staged inputs: {e}")))
    }

    async fn check_output(
        &self,
        who: &Principal,
        team: &str,
        name: &str,
        format: Option<UploadFormat>,
    ) -> Result<(), LakeError> {
        tessera_core::lake::validate_name("team", team)?;
        tessera_core::lake::validate_name("dataset", name)?;
        check_write_team(who, team)?;
        if let (Some(ds), Some(f)) = (catalog::get(&self.storage, team, name).await?, format) {
            let wanted = jobs::kind_for(Some(f));
            if let Some(k) = ds.kind.filter(|k| *k != wanted) {
                return Err(LakeError::Invalid(FieldError::new(
                    "format",
                    format!(
                        "{team}.{name} is a {}, and format {} would make it a {}",
                        kind_name(k),
                        format_name(f),
                        kind_name(wanted)
                    ),
                )));
            }
        }
        Ok(())
    }

    async fn write_output(&self, out: JobOutputWrite) -> Result<Version, LakeError> {
        tessera_core::lake::validate_name("team", &out.team)?;
        tessera_core::lake::validate_name("dataset", &out.name)?;
        let lock = self.lock_for(&out.team, &out.name);
        let _guard = lock.lock().await;
        let mut ds = self
            .get_or_create(None, &out.team, &out.name, Default::default())
            .await?;
        if let Some(v) = jobs::written_by(&self.storage, &ds, out.job).await? {
            return Ok(v);
        }
        let kind = match (ds.kind, out.format) {
            (Some(k), None) => k,
            (_, f) => jobs::kind_for(f),
        };
        self.settle_kind(&mut ds, kind).await?;
        jobs::write(&self.storage, &self.config.scratch, &ds, &out).await
    }
}

pub(crate) fn format_name(f: UploadFormat) -> &'static str {
    match f {
        UploadFormat::Csv => "csv",
        UploadFormat::Parquet => "parquet",
        UploadFormat::Jsonl => "jsonl",
        UploadFormat::Tar => "files",
    }
}

#[cfg(test)]
mod tests;
