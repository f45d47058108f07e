//! The REST API of the data lake: `/v1/datasets` (create, list),
//! `/v1/datasets/{dataset}` (show), `/data` (streamed upload), `/clean`,
//! `/grants`, and `/v1/query` (streamed results).
//!
//! The lake itself is behind [`tessera_core::lake::Lake`], set on
//! [`Shared::lake`] by whoever builds the server (the CLI's `tessera up` and
//! `tessera server`); this module only speaks HTTP. `{dataset}` is `name`
//! (the caller's team) or `team.name`.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use tessera_core::lake::{
    CleanRequest, Column, CreateDataset, Dataset, DatasetDetail, DatasetRef, FileEntry,
    GrantRequest, Lake, LakeError, QueryRequest, ResultFormat, Upload, UploadFormat, Version,
    WriteMode,
};
use tessera_core::FieldError;
use utoipa::{OpenApi, ToSchema};

use crate::api::{body_bytes, parse_json};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::Shared;

/// The lake's routes, merged into the API router.
pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/datasets", get(list).post(create))
        .route("/v1/datasets/{dataset}", get(show))
        .route(
            "/v1/datasets/{dataset}/data",
            // Uploads are streamed to the lake, of any size.
            put(upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/datasets/{dataset}/clean", post(clean))
        .route("/v1/datasets/{dataset}/grants", post(grant))
        .route("/v1/datasets/{dataset}/files", get(files))
        .route("/v1/query", post(query))
}

#[derive(OpenApi)]
#[openapi(
    paths(list, create, show, upload, clean, grant, query, files),
    components(schemas(
        Dataset,
        DatasetDetail,
        Version,
        Column,
        FileEntry,
        CreateDataset,
        CleanRequest,
        GrantRequest,
        QueryRequest,
        ResultFormat,
        UploadFormat,
        WriteMode,
        DatasetList,
        Cleaned,
        tessera_core::lake::DatasetKind
    ))
)]
pub struct LakeDoc;

impl From<LakeError> for ApiError {
    fn from(e: LakeError) -> ApiError {
        match e {
            LakeError::Invalid(fe) => ApiError::invalid(&fe.field, fe.message),
            LakeError::BadData(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_data", m),
            LakeError::Query(m) => ApiError::new(StatusCode::BAD_REQUEST, "bad_query", m),
            LakeError::NotFound(m) => ApiError::not_found(m),
            LakeError::Forbidden(m) => ApiError::forbidden(m),
            LakeError::Conflict(m) => ApiError::conflict(m),
            LakeError::Timeout(m) => ApiError::new(StatusCode::REQUEST_TIMEOUT, "timeout", m),
            LakeError::Internal(m) => {
                tracing::error!(error = %m, "lake storage error");
                ApiError::internal(
                    "the lake's storage failed; nothing was changed (see the server's log)",
                )
            }
        }
    }
}

fn lake(shared: &Shared) -> Result<Arc<dyn Lake>, ApiError> {
    shared.lake.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_lake",
            "this server runs without a data lake",
        )
    })
}

/// `name` or `team.name` (no version) → (team, name).
fn target(caller: &Caller, text: &str) -> Result<(String, String), ApiError> {
    let r = DatasetRef::parse("dataset", text).map_err(invalid)?;
    if r.version.is_some() {
        return Err(ApiError::invalid(
            "dataset",
            format!("{text:?}: name a dataset here, not a version"),
        ));
    }
    Ok((r.team_or(&caller.0.team).to_string(), r.name))
}

fn invalid(e: FieldError) -> ApiError {
    ApiError::invalid(&e.field, e.message)
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DatasetList {
    pub datasets: Vec<Dataset>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Cleaned {
    pub dataset: Dataset,
    pub version: Version,
}

#[utoipa::path(get, path = "/v1/datasets", responses((status = 200, body = DatasetList)))]
pub async fn list(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
) -> Result<Json<DatasetList>, ApiError> {
    let datasets = lake(&shared)?.list(&caller.0).await?;
    Ok(Json(DatasetList { datasets }))
}

#[utoipa::path(post, path = "/v1/datasets", request_body = CreateDataset,
    responses((status = 201, body = Dataset), (status = 409, body = crate::error::ErrorBody),
        (status = 422, body = crate::error::ErrorBody)))]
pub async fn create(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Dataset>), ApiError> {
    let req: CreateDataset = parse_json(&body_bytes(body)?)?;
    if let Some(t) = &req.team {
        team_exists(&shared, "team", t)?;
    }
    let ds = lake(&shared)?.create(&caller.0, req).await?;
    Ok((StatusCode::CREATED, Json(ds)))
}

fn team_exists(shared: &Shared, field: &str, team: &str) -> Result<(), ApiError> {
    if shared
        .state
        .lock()
        .expect("state lock")
        .teams
        .contains_key(team)
    {
        Ok(())
    } else {
        Err(ApiError::invalid(field, format!("no team {team:?}")))
    }
}

#[utoipa::path(get, path = "/v1/datasets/{dataset}", params(("dataset" = String, Path)),
    responses((status = 200, body = DatasetDetail), (status = 404, body = crate::error::ErrorBody)))]
pub async fn show(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(dataset): Path<String>,
) -> Result<Json<DatasetDetail>, ApiError> {
    let (team, name) = target(&caller, &dataset)?;
    Ok(Json(lake(&shared)?.show(&caller.0, &team, &name).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadParams {
    /// csv, parquet, jsonl or tar (a directory: a file set).
    pub format: String,
    /// append (default) or overwrite.
    #[serde(default)]
    pub mode: Option<String>,
    /// The file or directory the data came from, for the version's record.
    #[serde(default)]
    pub source: Option<String>,
}

#[utoipa::path(put, path = "/v1/datasets/{dataset}/data",
    params(("dataset" = String, Path), ("format" = String, Query), ("mode" = Option<String>, Query),
        ("source" = Option<String>, Query)),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "The file (CSV, Parquet, JSON lines) or a tar stream of a directory, streamed"),
    responses((status = 201, body = Version), (status = 422, body = crate::error::ErrorBody)))]
pub async fn upload(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(dataset): Path<String>,
    Query(params): Query<UploadParams>,
    body: Body,
) -> Result<(StatusCode, Json<Version>), ApiError> {
    let (team, name) = target(&caller, &dataset)?;
    let format = UploadFormat::parse("format", &params.format).map_err(invalid)?;
    let mode = match params.mode.as_deref() {
        None | Some("append") => WriteMode::Append,
        Some("overwrite") => WriteMode::Overwrite,
        Some(other) => {
            return Err(ApiError::invalid(
                "mode",
                format!("{other:?}: use append or overwrite"),
            ))
        }
    };
    let lake = lake(&shared)?;
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let upload = Upload {
        format,
        mode,
        source: params.source.unwrap_or_else(|| "upload".into()),
    };
    let v = lake
        .upload(&caller.0, &team, &name, upload, Box::pin(stream))
        .await?;
    Ok((StatusCode::CREATED, Json(v)))
}

#[utoipa::path(post, path = "/v1/datasets/{dataset}/clean", params(("dataset" = String, Path)),
    request_body = CleanRequest,
    responses((status = 201, body = Cleaned), (status = 422, body = crate::error::ErrorBody)))]
pub async fn clean(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(dataset): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Cleaned>), ApiError> {
    let (team, name) = target(&caller, &dataset)?;
    let req: CleanRequest = parse_json(&body_bytes(body)?)?;
    let (dataset, version) = lake(&shared)?.clean(&caller.0, &team, &name, req).await?;
    Ok((StatusCode::CREATED, Json(Cleaned { dataset, version })))
}

#[utoipa::path(post, path = "/v1/datasets/{dataset}/grants", params(("dataset" = String, Path)),
    request_body = GrantRequest,
    responses((status = 200, body = Dataset), (status = 403, body = crate::error::ErrorBody)))]
pub async fn grant(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(dataset): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Dataset>, ApiError> {
    let (team, name) = target(&caller, &dataset)?;
    let req: GrantRequest = parse_json(&body_bytes(body)?)?;
    team_exists(&shared, "team", &req.team)?;
    Ok(Json(
        lake(&shared)?.grant(&caller.0, &team, &name, req).await?,
    ))
}

/// Header of a query's answer: its columns, as JSON.
pub const COLUMNS_HEADER: &str = "x-tessera-columns";
/// Header of a query's answer: the row limit that applied.
pub const MAX_ROWS_HEADER: &str = "x-tessera-max-rows";

#[utoipa::path(post, path = "/v1/query", request_body = QueryRequest,
    responses((status = 200, description = "Rows as JSON lines, CSV or Parquet, streamed; the columns in the x-tessera-columns header"),
        (status = 400, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
        (status = 408, body = crate::error::ErrorBody)))]
pub async fn query(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: QueryRequest = parse_json(&body_bytes(body)?)?;
    let result = lake(&shared)?.query(&caller.0, req).await?;
    // Header values are ASCII: other characters travel as JSON escapes.
    let columns: String = serde_json::to_string(&result.columns)
        .expect("columns serialize")
        .encode_utf16()
        .map(|u| match u {
            0x20..=0x7e => (u as u8 as char).to_string(),
            _ => format!("\\u{u:04x}"),
        })
        .collect();
    let mut resp = Body::from_stream(result.body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(result.format.content_type()),
    );
    if let Ok(v) = HeaderValue::from_str(&columns) {
        h.insert(COLUMNS_HEADER, v);
    }
    h.insert(MAX_ROWS_HEADER, HeaderValue::from(result.max_rows));
    Ok(resp)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesParams {
    /// The version [default: the one in the path, else the latest].
    #[serde(default)]
    pub version: Option<u64>,
}

/// Bytes written to it go, in chunks, to an async receiver.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    const CHUNK: usize = 256 << 10;

    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(Self::CHUNK),
        ));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::other("the client went away"))
    }
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= Self::CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

#[utoipa::path(get, path = "/v1/datasets/{dataset}/files",
    params(("dataset" = String, Path, description = "[team.]name[@version]"),
        ("version" = Option<u64>, Query)),
    responses((status = 200, content_type = "application/x-tar",
            description = "A tar stream of the version's files: a file set's files under their paths, or a table's Parquet data files"),
        (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn files(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(dataset): Path<String>,
    q: Result<Query<FilesParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid("version", e.body_text()))?;
    let r = DatasetRef::parse("dataset", &dataset).map_err(invalid)?;
    let team = r.team_or(&caller.0.team).to_string();
    let staged = lake(&shared)?
        .stage_input(&caller.0, &team, &r.name, q.version.or(r.version))
        .await?;
    Ok(tar_response(staged.path, staged.version))
}

/// A tar stream of the files under `dir` (a staged version), as it is
/// read; `x-tessera-version` names the version.
pub(crate) fn tar_response(dir: std::path::PathBuf, version: u64) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let writer = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(ChannelWriter::CHUNK),
        };
        let mut b = tar::Builder::new(writer);
        // Plain modes and times: the staged copy is read-only, the
        // download need not be.
        b.mode(tar::HeaderMode::Deterministic);
        let result = b
            .append_dir_all(".", &dir)
            .and_then(|()| b.into_inner())
            .and_then(|mut w| std::io::Write::flush(&mut w));
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(e));
        }
    });
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let mut resp = body.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-tar"),
    );
    if let Ok(v) = HeaderValue::from_str(&version.to_string()) {
        resp.headers_mut().insert("x-tessera-version", v);
    }
    resp
}
