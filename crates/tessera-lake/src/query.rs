//! SQL over the datasets a caller may read, streamed back as JSON lines,
//! CSV or Parquet, within a row limit and a time limit.
//!
//! Each team is a schema (`ads.clicks`); a version is a table name with
//! `@N` (`ads.clicks@3`, rewritten to `ads."clicks@3"` before parsing).
//! Tables load lazily, so a query opens only what it names, and a table
//! of another team that has not granted the caller's team is an error
//! saying so, not a missing table.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deltalake::arrow::array::RecordBatch;
use deltalake::datafusion::catalog::{SchemaProvider, TableProvider};
use deltalake::datafusion::error::DataFusionError;
use deltalake::datafusion::execution::context::SessionContext;
use deltalake::datafusion::execution::SendableRecordBatchStream;
use deltalake::parquet::arrow::ArrowWriter;
use futures::StreamExt;
use tessera_core::auth::Principal;
use tessera_core::lake::{Dataset, DatasetKind, LakeError, QueryResult, ResultFormat};

use crate::storage::Storage;
use crate::table;

/// One team's datasets, as a DataFusion schema.
#[derive(Debug)]
struct TeamSchema {
    storage: StorageRef,
    who: Principal,
    datasets: BTreeMap<String, Dataset>,
}

#[derive(Clone)]
struct StorageRef(Arc<Storage>);

impl std::fmt::Debug for StorageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.base_url.as_str())
    }
}

/// A lake error carried through DataFusion, to come back out unchanged.
#[derive(Debug)]
struct Carried(LakeError);

impl std::fmt::Display for Carried {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Carried {}

fn carry(e: LakeError) -> DataFusionError {
    DataFusionError::External(Box::new(Carried(e)))
}

#[async_trait::async_trait]
impl SchemaProvider for TeamSchema {
    fn table_names(&self) -> Vec<String> {
        self.datasets.keys().cloned().collect()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        let (base, version) = match name.split_once('@') {
            Some((b, v)) => match v.parse::<u64>() {
                Ok(n) if n > 0 => (b, Some(n)),
                _ => {
                    return Err(carry(LakeError::Query(format!(
                        "{name:?}: the version after '@' must be a number from 1"
                    ))))
                }
            },
            None => (name, None),
        };
        let Some(ds) = self.datasets.get(base) else {
            return Ok(None);
        };
        crate::check_read(&self.who, ds).map_err(carry)?;
        let full = format!("{}.{}", ds.team, ds.name);
        match ds.kind {
            Some(DatasetKind::Table) => {}
            Some(DatasetKind::Files) => {
                return Err(carry(LakeError::Query(format!(
                    "{full} is a file set; SQL reads tables"
                ))))
            }
            None => {
                return Err(carry(LakeError::Query(format!(
                    "{full} has no versions yet; upload data to it first"
                ))))
            }
        }
        let storage = &self.storage.0;
        let latest = table::latest(storage, &ds.team, &ds.name)
            .await
            .map_err(carry)?;
        let Some(latest) = latest else {
            return Err(carry(LakeError::Query(format!(
                "{full} has no versions yet; upload data to it first"
            ))));
        };
        if let Some(v) = version {
            if v > latest {
                return Err(carry(LakeError::Query(format!(
                    "{full} has versions 1 to {latest}, not {v}"
                ))));
            }
        }
        let t = table::load(storage, &ds.team, &ds.name, version)
            .await
            .map_err(carry)?
            .ok_or_else(|| carry(LakeError::Query(format!("{full} has no versions yet"))))?;
        let provider = t
            .table_provider()
            .await
            .map_err(|e| carry(LakeError::Internal(format!("opening {full}: {e}"))))?;
        Ok(Some(provider))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.datasets
            .contains_key(name.split_once('@').map(|(b, _)| b).unwrap_or(name))
    }
}

/// A session whose schemas are the teams' datasets, with the caller's
/// team as the default schema.
pub(crate) fn session_for(
    storage: &Arc<Storage>,
    who: &Principal,
    datasets: Vec<Dataset>,
) -> SessionContext {
    let config = table::session_config()
        .with_default_catalog_and_schema("tessera", who.team.clone())
        .with_create_default_catalog_and_schema(false);
    let ctx = table::session_with(config);
    let catalog = Arc::new(deltalake::datafusion::catalog::MemoryCatalogProvider::new());
    let mut by_team: HashMap<String, BTreeMap<String, Dataset>> = HashMap::new();
    by_team.entry(who.team.clone()).or_default();
    for ds in datasets {
        by_team
            .entry(ds.team.clone())
            .or_default()
            .insert(ds.name.clone(), ds);
    }
    for (team, datasets) in by_team {
        let schema = TeamSchema {
            storage: StorageRef(storage.clone()),
            who: who.clone(),
            datasets,
        };
        let _ = deltalake::datafusion::catalog::CatalogProvider::register_schema(
            catalog.as_ref(),
            &team,
            Arc::new(schema),
        );
    }
    ctx.register_catalog("tessera", catalog);
    ctx
}

/// `team.name@3` → `team."name@3"`, and `name@3` → `"name@3"`, outside
/// string literals and quoted identifiers.
pub(crate) fn rewrite_versions(sql: &str) -> String {
    let re = regex::Regex::new(r"\b([a-z][a-z0-9_]*)@([0-9]+)\b").expect("a regex");
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while !rest.is_empty() {
        // The next quoted part, either kind.
        let next = rest.find(['\'', '"']);
        let (plain, quoted) = match next {
            Some(i) => {
                let q = rest.as_bytes()[i] as char;
                let end = rest[i + 1..]
                    .find(q)
                    .map(|j| i + 1 + j + 1)
                    .unwrap_or(rest.len());
                (&rest[..i], &rest[i..end])
            }
            None => (rest, ""),
        };
        out.push_str(&re.replace_all(plain, "\"$1@$2\""));
        out.push_str(quoted);
        rest = &rest[plain.len() + quoted.len()..];
    }
    out
}

/// Plans and starts a query; the first rows (or the error) come before the
/// answer, so a failing query answers with an error, not a broken stream.
pub(crate) async fn run(
    storage: &Arc<Storage>,
    who: &Principal,
    datasets: Vec<Dataset>,
    sql: &str,
    format: ResultFormat,
    max_rows: u64,
    limit: Duration,
) -> Result<QueryResult, LakeError> {
    if sql.trim().is_empty() {
        return Err(LakeError::Invalid(tessera_core::FieldError::new(
            "sql",
            "the query is empty",
        )));
    }
    let deadline = tokio::time::Instant::now() + limit;
    let ctx = session_for(storage, who, datasets);
    let sql = rewrite_versions(sql);
    let work = async {
        let opts = deltalake::datafusion::execution::context::SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let df = ctx
            .sql_with_options(&sql, opts)
            .await
            .map_err(query_error)?;
        let df = if max_rows == u64::MAX {
            df
        } else {
            df.limit(0, Some(max_rows as usize)).map_err(query_error)?
        };
        let columns = table::columns(df.schema().as_arrow());
        let mut stream = df.execute_stream().await.map_err(query_error)?;
        let first = match stream.next().await {
            Some(Ok(b)) => Some(b),
            Some(Err(e)) => return Err(query_error(e)),
            None => None,
        };
        Ok::<_, LakeError>((columns, stream, first))
    };
    let (columns, stream, first) =
        tokio::time::timeout_at(deadline, work)
            .await
            .map_err(|_| {
                LakeError::Timeout(format!(
                    "the query ran past its time limit of {} s and was stopped",
                    limit.as_secs_f64()
                ))
            })??;
    Ok(QueryResult {
        columns,
        format,
        max_rows,
        body: encode(stream, first, format, deadline, limit),
    })
}

/// Turns DataFusion's errors into the lake's, keeping carried ones.
fn query_error(e: DataFusionError) -> LakeError {
    let mut err: &DataFusionError = &e;
    loop {
        match err {
            DataFusionError::External(inner) => {
                if let Some(c) = inner.downcast_ref::<Carried>() {
                    return c.0.clone();
                }
                break;
            }
            DataFusionError::Context(_, inner) => err = inner,
            DataFusionError::Shared(inner) => err = inner,
            _ => break,
        }
    }
    let text = e.to_string();
    match e.find_root() {
        DataFusionError::SQL(..) | DataFusionError::Plan(..) | DataFusionError::SchemaError(..) => {
            LakeError::Query(format!("the query cannot run: {text}"))
        }
        DataFusionError::NotImplemented(..) => {
            LakeError::Query(format!("the query cannot run: {text}"))
        }
        DataFusionError::ArrowError(..) | DataFusionError::Execution(..) => {
            LakeError::Query(format!("the query failed: {text}"))
        }
        _ => {
            if let Some(c) = find_carried(&e) {
                return c;
            }
            LakeError::Query(format!("the query failed: {text}"))
        }
    }
}

fn find_carried(e: &DataFusionError) -> Option<LakeError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(c) = s.downcast_ref::<Carried>() {
            return Some(c.0.clone());
        }
        source = s.source();
    }
    None
}

/// Encodes batches as they come; a stream that passes the deadline is cut.
fn encode(
    stream: SendableRecordBatchStream,
    first: Option<RecordBatch>,
    format: ResultFormat,
    deadline: tokio::time::Instant,
    limit: Duration,
) -> tessera_core::lake::ByteStream {
    let schema = stream.schema();
    let state = Encoder::new(format, schema);
    let batches = futures::stream::iter(first.map(Ok))
        .chain(stream)
        .map(Some)
        .chain(futures::stream::once(async { None }));
    // An error ends the body (the client sees it cut short); nothing follows it.
    batches
        .scan((state, false), move |(enc, failed), item| {
            if *failed {
                return futures::future::ready(None);
            }
            let out = if tokio::time::Instant::now() > deadline {
                Err(std::io::Error::other(format!(
                    "the query ran past its time limit of {} s and was stopped",
                    limit.as_secs_f64()
                )))
            } else {
                match item {
                    Some(Ok(batch)) => enc.batch(&batch),
                    Some(Err(e)) => Err(std::io::Error::other(e.to_string())),
                    None => enc.finish(),
                }
            };
            *failed = out.is_err();
            futures::future::ready(Some(out))
        })
        .filter(|r| futures::future::ready(!matches!(r, Ok(b) if b.is_empty())))
        .boxed()
}

enum Encoder {
    Json,
    Csv { header: bool },
    Parquet(Option<Box<ArrowWriter<Vec<u8>>>>),
}

impl Encoder {
    fn new(format: ResultFormat, schema: deltalake::arrow::datatypes::SchemaRef) -> Encoder {
        match format {
            ResultFormat::Json => Encoder::Json,
            ResultFormat::Csv => Encoder::Csv { header: true },
            ResultFormat::Parquet => Encoder::Parquet(
                ArrowWriter::try_new(Vec::new(), schema, None)
                    .ok()
                    .map(Box::new),
            ),
        }
    }

    fn batch(&mut self, batch: &RecordBatch) -> std::io::Result<Bytes> {
        match self {
            Encoder::Json => {
                let mut w = deltalake::arrow::json::LineDelimitedWriter::new(Vec::new());
                w.write(batch).map_err(std::io::Error::other)?;
                w.finish().map_err(std::io::Error::other)?;
                Ok(Bytes::from(w.into_inner()))
            }
            Encoder::Csv { header } => {
                let mut buf = Vec::new();
                {
                    let mut w = deltalake::arrow::csv::WriterBuilder::new()
                        .with_header(*header)
                        .build(&mut buf);
                    w.write(batch).map_err(std::io::Error::other)?;
                }
                *header = false;
                Ok(Bytes::from(buf))
            }
            Encoder::Parquet(w) => {
                let w = w
                    .as_mut()
                    .ok_or_else(|| std::io::Error::other("the result cannot be Parquet"))?;
                w.write(batch).map_err(std::io::Error::other)?;
                if w.in_progress_size() > 64 << 20 {
                    w.flush().map_err(std::io::Error::other)?;
                }
                Ok(Bytes::from(std::mem::take(w.inner_mut())))
            }
        }
    }

    fn finish(&mut self) -> std::io::Result<Bytes> {
        match self {
            Encoder::Parquet(w) => {
                let Some(mut w) = w.take() else {
                    return Ok(Bytes::new());
                };
                w.finish().map_err(std::io::Error::other)?;
                Ok(Bytes::from(std::mem::take(w.inner_mut())))
            }
            _ => Ok(Bytes::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::rewrite_versions;

    #[test]
    fn versions_become_quoted_names_outside_quotes() {
        assert_eq!(
            rewrite_versions("SELECT * FROM ads.clicks@3 JOIN users@12 ON 'a@1' = \"b@2\""),
            "SELECT * FROM ads.\"clicks@3\" JOIN \"users@12\" ON 'a@1' = \"b@2\""
        );
        assert_eq!(rewrite_versions("SELECT 1"), "SELECT 1");
    }
}
