//! The REST API under `/v1/`, the seed API (`POST /tasks`), `/healthz`,
//! `/metrics` and the OpenAPI document, generated from these handlers.
//!
//! Only this module knows the wire format of requests and responses.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tessera_core::auth::{ResourceAmounts, Role, Team, TeamQuota, TokenKind};
use tessera_core::node::GpuInfo;
use tessera_core::protocol::{ReplicaKey, ToAgent};
use tessera_core::spec::{validate_name, validate_team_name, JobSpec, Quantity, ResourcesSpec};
use tessera_core::{Event, Job, JobId, JobState};
use tessera_store::{commit, Write};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::auth::{mint, Caller};
use crate::error::{ApiError, ErrorBody};
use crate::{now_ms, Shared};

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;

pub fn router(shared: Arc<Shared>) -> Router {
    let gateway = shared.gateway.clone();
    let api = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/whoami", get(whoami))
        .route("/v1/teams", get(list_teams).post(create_team))
        .route("/v1/teams/{name}", axum::routing::put(update_team))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}", delete(delete_token))
        .route("/v1/jobs", get(list_jobs).post(submit_job))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/jobs/{id}/events", get(job_events))
        .route("/v1/jobs/{id}/logs", get(job_logs))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/usage", get(crate::usage::get_usage))
        .route("/v1/nodes/{name}", delete(crate::fleet::remove))
        .route("/v1/nodes/{name}/cordon", post(crate::fleet::cordon))
        .route("/v1/nodes/{name}/uncordon", post(crate::fleet::uncordon))
        .route("/v1/nodes/{name}/drain", post(crate::fleet::drain))
        .route(
            "/v1/services",
            get(crate::service_api::list).post(crate::service_api::serve),
        )
        .route(
            "/v1/services/{name}",
            get(crate::service_api::detail).delete(crate::service_api::delete),
        )
        .route("/v1/services/{name}/scale", post(crate::service_api::scale))
        .route(
            "/v1/services/{name}/keys",
            post(crate::service_api::create_key),
        )
        .route("/v1/gateway/routes", get(crate::service_api::routes))
        .route("/v1/gateway/load", post(crate::service_api::load))
        .route("/v1/join-tokens", post(crate::fleet::create_join_token))
        .route("/v1/agents/join", post(crate::fleet::join))
        .route("/v1/agents/connect", get(crate::fleet::connect))
        .route(
            "/v1/agents/inputs/{job}/{index}",
            get(crate::job_data::agent_input),
        )
        .route(
            "/v1/agents/outputs/{job}/{attempt}",
            axum::routing::put(crate::job_data::agent_outputs)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/tasks", post(seed_create_task))
        .merge(crate::lake_api::routes())
        .merge(crate::ui::routes())
        .merge(crate::pools::routes())
        .fallback(|| async { ApiError::not_found("no such endpoint; see /v1/openapi.json") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            crate::metrics::track_http,
        ))
        .with_state(shared);
    // The gateway takes `/s/...` (and, with a domain, its `Host`s) before
    // any API route; it streams bodies of any size (no body limit).
    match gateway {
        Some(gw) => api.layer(axum::middleware::from_fn_with_state(gw, to_gateway)),
        None => api,
    }
}

async fn to_gateway(
    State(gw): State<Arc<tessera_gateway::Gateway>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    if path == "/s"
        || path.starts_with("/s/")
        || gw.host_service(req.headers(), req.uri()).is_some()
    {
        return gw.proxy(req).await;
    }
    next.run(req).await
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Tessera API", description = "Pool compute, schedule jobs fairly, follow them."),
    paths(
        healthz, whoami, list_teams, create_team, update_team, list_tokens, create_token, delete_token,
        list_jobs, submit_job, get_job, cancel_job, job_events, job_logs, list_nodes,
        seed_create_task, crate::fleet::create_join_token, crate::fleet::join,
        crate::fleet::cordon, crate::fleet::uncordon, crate::fleet::drain, crate::fleet::remove,
        crate::service_api::serve, crate::service_api::list, crate::service_api::detail,
        crate::service_api::scale, crate::service_api::delete, crate::service_api::create_key,
        crate::service_api::routes, crate::service_api::load,
        crate::usage::get_usage,
        crate::pools::list, crate::pools::add, crate::pools::remove
    ),
    components(schemas(
        ErrorBody, Job, Event, JobSpec, ResourcesSpec, Quantity, Team, TeamQuota, ResourceAmounts,
        TeamUpdate, QuotaSpec, QuotaPair, TokenCreate,
        TokenCreated, TokenInfo, TeamCreate, JobList, EventList, NodeList, NodeView, NodeGpu,
        SeedTask, SeedCreated, WhoAmI, GpuInfo, crate::fleet::JoinTokenCreate,
        tessera_core::node::NodeUsage, tessera_core::node::GpuUsage,
        crate::fleet::JoinTokenCreated, crate::fleet::JoinRequest, crate::fleet::Joined,
        crate::fleet::DrainRequest, crate::fleet::NodeStateChanged,
        tessera_core::service::ServiceSpec, tessera_core::service::ReplicasSpec,
        tessera_core::service::ReadinessSpec, tessera_core::service::AutoscaleSpec,
        tessera_core::service::Service, tessera_core::service::ServiceTemplate,
        tessera_core::service::Readiness, tessera_core::service::Autoscale,
        crate::service_api::ServiceSummary, crate::service_api::ServiceList,
        crate::service_api::ServiceDetail, crate::service_api::ScaleRequest,
        crate::service_api::ServiceKeyCreated, crate::services::ReplicaView,
        crate::services::ServiceEvent, crate::services::Published,
        crate::service_api::RouteTable, crate::service_api::LoadReport,
        crate::service_api::ServiceLoad,
        crate::usage::UsageReport, crate::usage::UsageRow, crate::usage::Amounts,
        crate::usage::GroupBy, tessera_core::job::AttemptUsage, tessera_core::job::NodeShare,
        tessera_core::node::Prices,
        crate::pools::PoolAdd, crate::pools::PoolPrices, crate::pools::PoolView,
        crate::pools::PoolList
    )),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

// ---------- helpers ----------

pub(crate) fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the request body is larger than {} bytes (1 MiB)", MAX_BODY),
            )
        } else {
            ApiError::bad_request(format!("cannot read the request body: {e}"))
        }
    })
}

fn body_text(body: &Bytes) -> Result<&str, ApiError> {
    std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("the request body is not UTF-8 text"))
}

pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("invalid JSON: {}", e.inner()),
        )
        .with_field(if path == "." { String::new() } else { path })
    })
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))
}

fn parse_job_id(raw: &str) -> Result<JobId, ApiError> {
    raw.parse::<JobId>().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            format!("`{raw}` is not a job id (a positive number)"),
        )
        .with_field("id")
    })
}

/// A job the caller may read, or the reason it may not.
fn readable_job(shared: &Shared, caller: &Caller, id: JobId) -> Result<Job, ApiError> {
    let state = shared.state.lock().expect("state lock");
    let job = state
        .jobs
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("no job with id {id}")))?;
    caller.require_read(job.team())?;
    Ok(job.clone())
}

// ---------- health, metrics, docs ----------

#[utoipa::path(get, path = "/healthz", security(()), responses((status = 200, description = "The server is up")))]
async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let text = {
        let state = shared.state.lock().expect("state lock");
        shared.metrics.render(&state, now_ms())
    };
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}

async fn openapi() -> impl IntoResponse {
    Json(ApiDoc::openapi().merge_from(crate::lake_api::LakeDoc::openapi()))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WhoAmI {
    pub token_id: String,
    pub team: String,
    pub role: Role,
}

#[utoipa::path(get, path = "/v1/whoami", responses((status = 200, body = WhoAmI), (status = 401, body = ErrorBody)))]
async fn whoami(caller: Caller) -> Json<WhoAmI> {
    Json(WhoAmI {
        token_id: caller.0.token_id,
        team: caller.0.team,
        role: caller.0.role,
    })
}

// ---------- teams and tokens ----------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TeamCreate {
    pub name: String,
    /// Fair-share weight, default 1.
    pub weight: Option<f64>,
    /// Guaranteed amounts and borrowing limits per resource.
    pub quota: Option<QuotaSpec>,
}

/// A team's changes: only the fields given change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TeamUpdate {
    pub weight: Option<f64>,
    /// The new quota; `{}` removes every guarantee and limit.
    pub quota: Option<QuotaSpec>,
}

/// Quota per resource, e.g. `{"gpu": {"guaranteed": 4, "limit": 8},
/// "memory": {"guaranteed": "64Gi"}}`. A resource left out has no guarantee
/// and no limit; a missing `limit` means the team may borrow without cap.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaSpec {
    pub cpu: Option<QuotaPair>,
    pub memory: Option<QuotaPair>,
    pub gpu: Option<QuotaPair>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaPair {
    #[schema(value_type = Option<String>)]
    pub guaranteed: Option<Quantity>,
    #[schema(value_type = Option<String>)]
    pub limit: Option<Quantity>,
}

fn quantity_text(q: &Quantity) -> String {
    match q {
        Quantity::Number(n) => n.to_string(),
        Quantity::Text(t) => t.clone(),
    }
}

type ParseFn = dyn Fn(&str) -> Result<u64, tessera_core::quantity::QuantityError>;

/// Validates a quota into plain units; errors name `quota.<resource>.<field>`.
fn parse_quota(spec: &QuotaSpec) -> Result<Option<TeamQuota>, tessera_core::FieldError> {
    use tessera_core::quantity::{parse_cpu, parse_memory};
    use tessera_core::FieldError;
    let unlimited = ResourceAmounts {
        cpu_milli: u64::MAX,
        memory_bytes: u64::MAX,
        gpu_milli: u64::MAX,
    };
    let mut guaranteed = ResourceAmounts {
        cpu_milli: 0,
        memory_bytes: 0,
        gpu_milli: 0,
    };
    let mut limit = unlimited;
    let gpu = |t: &str| -> Result<u64, tessera_core::quantity::QuantityError> {
        parse_cpu(t) // GPUs read like cores: `4`, `0.5`, `500m`
    };
    let parsers: [(&str, &Option<QuotaPair>, &ParseFn); 3] = [
        ("cpu", &spec.cpu, &parse_cpu),
        ("memory", &spec.memory, &parse_memory),
        ("gpu", &spec.gpu, &gpu),
    ];
    for (i, (name, pair, parse)) in parsers.into_iter().enumerate() {
        let Some(pair) = pair else { continue };
        let read = |field: &str, q: &Option<Quantity>| -> Result<Option<u64>, FieldError> {
            q.as_ref()
                .map(|q| {
                    parse(&quantity_text(q))
                        .map_err(|e| FieldError::new(format!("quota.{name}.{field}"), e.0))
                })
                .transpose()
        };
        let g = read("guaranteed", &pair.guaranteed)?.unwrap_or(0);
        let l = read("limit", &pair.limit)?.unwrap_or(u64::MAX);
        if l < g {
            return Err(FieldError::new(
                format!("quota.{name}.limit"),
                "must not be below `guaranteed`",
            ));
        }
        match i {
            0 => (guaranteed.cpu_milli, limit.cpu_milli) = (g, l),
            1 => (guaranteed.memory_bytes, limit.memory_bytes) = (g, l),
            _ => (guaranteed.gpu_milli, limit.gpu_milli) = (g, l),
        }
    }
    if guaranteed
        == (ResourceAmounts {
            cpu_milli: 0,
            memory_bytes: 0,
            gpu_milli: 0,
        })
        && limit == unlimited
    {
        return Ok(None);
    }
    Ok(Some(TeamQuota { guaranteed, limit }))
}

fn check_weight(weight: f64) -> Result<f64, ApiError> {
    if weight.is_finite() && weight > 0.0 && weight <= 1e6 {
        Ok(weight)
    } else {
        Err(ApiError::from(tessera_core::FieldError::new(
            "weight",
            "must be a number in (0, 1000000]",
        )))
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TeamList {
    pub teams: Vec<Team>,
}

#[utoipa::path(get, path = "/v1/teams", responses((status = 200, body = inline(TeamList))))]
async fn list_teams(State(shared): State<Arc<Shared>>, caller: Caller) -> Json<TeamList> {
    let state = shared.state.lock().expect("state lock");
    Json(TeamList {
        teams: state
            .teams
            .values()
            .filter(|t| caller.0.can_read_team(&t.name))
            .cloned()
            .collect(),
    })
}

#[utoipa::path(post, path = "/v1/teams", request_body = TeamCreate,
    responses((status = 201, body = Team), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_team(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Team>), ApiError> {
    caller.require_superuser("creating a team")?;
    let req: TeamCreate = parse_json(&body_bytes(body)?)?;
    validate_team_name("name", &req.name)?;
    let weight = check_weight(req.weight.unwrap_or(1.0))?;
    let quota = match &req.quota {
        Some(q) => parse_quota(q)?,
        None => None,
    };
    let team = Team {
        name: req.name.clone(),
        weight,
        created_at: now_ms(),
        quota,
    };
    let _guard = shared.admin_lock.lock().await;
    if shared
        .state
        .lock()
        .expect("state lock")
        .teams
        .contains_key(&team.name)
    {
        return Err(
            ApiError::conflict(format!("team `{}` already exists", team.name)).with_field("name"),
        );
    }
    commit(shared.store.as_ref(), vec![Write::Team(team.clone())]).await?;
    shared
        .state
        .lock()
        .expect("state lock")
        .teams
        .insert(team.name.clone(), team.clone());
    Ok((StatusCode::CREATED, Json(team)))
}

#[utoipa::path(put, path = "/v1/teams/{name}", params(("name" = String, Path)), request_body = TeamUpdate,
    responses((status = 200, body = Team), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn update_team(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Team>, ApiError> {
    caller.require_superuser("changing a team")?;
    let req: TeamUpdate = parse_json(&body_bytes(body)?)?;
    let weight = req.weight.map(check_weight).transpose()?;
    let quota = req.quota.as_ref().map(parse_quota).transpose()?;
    let _guard = shared.admin_lock.lock().await;
    let mut team = shared
        .state
        .lock()
        .expect("state lock")
        .teams
        .get(&name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no team `{name}`")))?;
    if let Some(w) = weight {
        team.weight = w;
    }
    if let Some(q) = quota {
        team.quota = q;
    }
    commit(shared.store.as_ref(), vec![Write::Team(team.clone())]).await?;
    {
        let mut state = shared.state.lock().expect("state lock");
        state.teams.insert(team.name.clone(), team.clone());
        // A new quota or weight can change what may run.
        state.capacity_changed = true;
    }
    shared.wake.notify_one();
    Ok(Json(team))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    pub team: String,
    /// `admin`, `member` or `viewer`.
    pub role: String,
    pub name: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenCreated {
    pub id: String,
    /// The secret. It is shown once and stored only as a hash.
    pub token: String,
    pub name: String,
    pub team: String,
    pub role: Role,
    pub created_at: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub team: String,
    pub role: Role,
    pub created_at: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenInfo>,
}

#[utoipa::path(post, path = "/v1/tokens", request_body = TokenCreate,
    responses((status = 201, body = TokenCreated), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn create_token(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    let req: TokenCreate = parse_json(&body_bytes(body)?)?;
    let role = Role::parse(&req.role).ok_or_else(|| {
        ApiError::from(tessera_core::FieldError::new(
            "role",
            format!("`{}` is not a role; use admin, member or viewer", req.role),
        ))
    })?;
    validate_team_name("team", &req.team)?;
    // Team admins mint tokens for their own team; the admin team for all.
    if !(caller.0.is_superuser() || (caller.0.role == Role::Admin && caller.0.team == req.team)) {
        return Err(ApiError::forbidden(format!(
            "creating a token for team `{}` needs an admin token of that team or of the `admin` team",
            req.team
        )));
    }
    let name = req
        .name
        .unwrap_or_else(|| format!("{}-{}", req.team, role.as_str()));
    validate_name("name", &name)?;
    if !shared
        .state
        .lock()
        .expect("state lock")
        .teams
        .contains_key(&req.team)
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_team",
            format!(
                "team `{}` does not exist; create it with `tessera team create {}`",
                req.team, req.team
            ),
        )
        .with_field("team"));
    }
    let (secret, record) = mint(&name, &req.team, role, now_ms());
    commit(shared.store.as_ref(), vec![Write::Token(record.clone())]).await?;
    shared
        .state
        .lock()
        .expect("state lock")
        .tokens
        .insert(record.hash.clone(), record.clone());
    Ok((
        StatusCode::CREATED,
        Json(TokenCreated {
            id: record.id,
            token: secret,
            name: record.name,
            team: record.team,
            role,
            created_at: record.created_at,
        }),
    ))
}

#[utoipa::path(get, path = "/v1/tokens", responses((status = 200, body = inline(TokenList))))]
async fn list_tokens(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
) -> Result<Json<TokenList>, ApiError> {
    if caller.0.role != Role::Admin {
        return Err(ApiError::forbidden("listing tokens needs an admin token"));
    }
    let state = shared.state.lock().expect("state lock");
    let mut tokens: Vec<TokenInfo> = state
        .tokens
        .values()
        .filter(|t| caller.0.can_read_team(&t.team) && t.kind == TokenKind::Api)
        .map(|t| TokenInfo {
            id: t.id.clone(),
            name: t.name.clone(),
            team: t.team.clone(),
            role: t.role,
            created_at: t.created_at,
        })
        .collect();
    tokens.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok(Json(TokenList { tokens }))
}

#[utoipa::path(delete, path = "/v1/tokens/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn delete_token(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let record = {
        let state = shared.state.lock().expect("state lock");
        state.tokens.values().find(|t| t.id == id).cloned()
    }
    // Another team's token ids are not disclosed: they look missing.
    .filter(|t| caller.0.is_superuser() || caller.0.team == t.team)
    .ok_or_else(|| ApiError::not_found(format!("no token with id `{id}`")))?;
    if !(caller.0.is_superuser() || (caller.0.role == Role::Admin && caller.0.team == record.team))
    {
        return Err(ApiError::forbidden(
            "revoking a token needs an admin token of its team",
        ));
    }
    commit(
        shared.store.as_ref(),
        vec![Write::DeleteToken(record.id.clone())],
    )
    .await?;
    shared
        .state
        .lock()
        .expect("state lock")
        .tokens
        .remove(&record.hash);
    Ok(StatusCode::NO_CONTENT)
}

// ---------- jobs ----------

/// Validates, checks rights and feasibility, makes the job durable, then
/// makes it visible to the scheduler. Nothing is created on any error.
pub(crate) async fn create_job(
    shared: &Shared,
    caller: &Caller,
    spec: JobSpec,
) -> Result<Job, ApiError> {
    let mut template = spec.validate(&caller.0.team)?;
    caller.require_write(&template.team)?;
    if !shared
        .state
        .lock()
        .expect("state lock")
        .teams
        .contains_key(&template.team)
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_team",
            format!("team `{}` does not exist", template.team),
        )
        .with_field("team"));
    }
    crate::job_data::bind(shared, &caller.0, &mut template).await?;
    let now = now_ms();
    {
        let state = shared.state.lock().expect("state lock");
        // A GPU that is unhealthy now may recover: it still counts here.
        let mut nodes = state.live_node_views();
        for g in nodes.iter_mut().flat_map(|n| n.gpus.iter_mut()) {
            g.healthy = true;
        }
        if let Some(why) =
            tessera_scheduler::infeasible_reason(&nodes, &template.resources, template.replicas)
        {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unschedulable",
                format!("this job fits no node in the cluster: {why}"),
            )
            .with_field("resources"));
        }
    }
    insert_new_job(shared, template, &caller.0.token_id, now).await
}

/// Makes a validated job durable, then visible to the scheduler.
pub(crate) async fn insert_new_job(
    shared: &Shared,
    template: tessera_core::JobTemplate,
    submitted_by: &str,
    now: u64,
) -> Result<Job, ApiError> {
    let id = shared
        .next_id
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let job = Job::new(id, template, submitted_by.to_string(), now);
    let mut msg = format!("submitted by {} (team {})", submitted_by, job.team());
    if let Some(image) = &job.spec.image {
        msg.push_str(&format!("; runs as a container of image `{image}`"));
    }
    let event = Event::new(id, now, "submitted", msg);
    commit(
        shared.store.as_ref(),
        vec![
            Write::Job(Box::new(job.clone())),
            Write::Event(event.clone()),
        ],
    )
    .await?;
    shared
        .state
        .lock()
        .expect("state lock")
        .insert_job(job.clone(), event);
    shared.metrics.job_submitted(&job.spec.team);
    shared.wake.notify_one();
    Ok(job)
}

#[utoipa::path(post, path = "/v1/jobs",
    request_body(content = JobSpec, description = "A job spec, as JSON or YAML", content_type = "application/json"),
    responses((status = 201, body = Job), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, body = ErrorBody, description = "fits no node")))]
async fn submit_job(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    let body = body_bytes(body)?;
    let spec = JobSpec::parse(body_text(&body)?)?;
    let job = create_job(&shared, &caller, spec).await?;
    Ok((StatusCode::CREATED, Json(job)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct JobFilter {
    pub team: Option<String>,
    /// One of queued, scheduled, running, succeeded, failed, cancelled, lost.
    pub state: Option<String>,
    pub name: Option<String>,
    /// Page size, 1..=1000 (default 100).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<Job>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/jobs", params(JobFilter),
    responses((status = 200, body = JobList), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn list_jobs(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    q: Result<Query<JobFilter>, QueryRejection>,
) -> Result<Json<JobList>, ApiError> {
    let f = query(q)?;
    let limit = f.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::from(tessera_core::FieldError::new(
            "limit",
            "must be between 1 and 1000",
        )));
    }
    let state_filter = match &f.state {
        None => None,
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            ApiError::from(tessera_core::FieldError::new(
                "state",
                format!("`{s}` is not a job state; use queued, scheduled, running, succeeded, failed, cancelled or lost"),
            ))
        })?),
    };
    if let Some(t) = &f.team {
        caller.require_read(t)?;
    }
    let before: JobId = match &f.cursor {
        None => JobId::MAX,
        Some(c) => c.parse().map_err(|_| {
            ApiError::from(tessera_core::FieldError::new(
                "cursor",
                "is not a cursor from a previous page",
            ))
        })?,
    };
    let team = f
        .team
        .clone()
        .or_else(|| (!caller.0.is_superuser()).then(|| caller.0.team.clone()));
    let state = shared.state.lock().expect("state lock");
    let mut jobs = Vec::with_capacity(limit.min(256));
    let mut next_cursor = None;
    for (id, job) in state.jobs.range(..before).rev() {
        if team.as_deref().is_some_and(|t| job.team() != t)
            || state_filter.is_some_and(|s| job.state != s)
            || f.name.as_deref().is_some_and(|n| job.spec.name != n)
        {
            continue;
        }
        if jobs.len() == limit {
            next_cursor = Some((id + 1).to_string());
            break;
        }
        jobs.push(job.clone());
    }
    Ok(Json(JobList { jobs, next_cursor }))
}

#[utoipa::path(get, path = "/v1/jobs/{id}", params(("id" = u64, Path)),
    responses((status = 200, body = Job), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_job(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    Ok(Json(readable_job(&shared, &caller, parse_job_id(&id)?)?))
}

#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", params(("id" = u64, Path)),
    responses((status = 200, body = Job), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn cancel_job(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    let id = parse_job_id(&id)?;
    let job = readable_job(&shared, &caller, id)?;
    caller.require_write(job.team())?;
    let now = now_ms();
    let mut writes = Vec::new();
    let updated = {
        let mut state = shared.state.lock().expect("state lock");
        let job = state
            .jobs
            .get(&id)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no job with id {id}")))?;
        if job.state.is_terminal() {
            return Err(ApiError::conflict(format!(
                "job {id} has already finished ({})",
                job.state.as_str()
            )));
        }
        let by = format!("cancelled by {}", caller.0.token_id);
        cancel_in_state(&shared, &mut state, id, by, now, &mut writes);
        (state.jobs[&id].clone(), shared.stage(writes))
    };
    let (updated, staged) = updated;
    staged.durable().await;
    shared.changed();
    Ok(Json(updated))
}

/// Cancels an active job: a queued one ends at once; a placed one is
/// stopped (its agent reports the end). Call under the state lock.
pub(crate) fn cancel_in_state(
    shared: &Shared,
    state: &mut crate::state::ClusterState,
    id: JobId,
    by: String,
    now: u64,
    writes: &mut Vec<Write>,
) {
    let Some(job) = state.jobs.get(&id).cloned() else {
        return;
    };
    if job.state == JobState::Queued {
        crate::control::finish(
            state,
            id,
            JobState::Cancelled,
            None,
            by,
            now,
            writes,
            shared,
        );
    } else if crate::job_data::writing(&job) {
        // Its processes are done; only the output writer is at work.
        crate::control::finish(
            state,
            id,
            JobState::Cancelled,
            Some(0),
            format!("{by}, while its outputs were being written (an output it had finished writing stays a version)"),
            now,
            writes,
            shared,
        );
    } else if job.state.is_active() && !job.cancel_requested {
        state.update_job(id, writes, |j| {
            j.cancel_requested = true;
            Some(Event::new(
                id,
                now,
                "cancelling",
                format!("{by}; stopping its replicas"),
            ))
        });
        let agents = shared.agents.lock().expect("agents lock");
        for p in &job.placement {
            if let Some(tx) = agents.get(&p.node) {
                let _ = tx.send(ToAgent::Stop {
                    key: ReplicaKey {
                        job_id: id,
                        attempt: job.attempt,
                        replica: p.replica,
                    },
                    grace_ms: shared.kill_grace_ms,
                    reason: "cancelled".into(),
                });
            }
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    pub events: Vec<Event>,
}

#[utoipa::path(get, path = "/v1/jobs/{id}/events", params(("id" = u64, Path)),
    responses((status = 200, body = EventList), (status = 404, body = ErrorBody)))]
async fn job_events(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<EventList>, ApiError> {
    let id = parse_job_id(&id)?;
    readable_job(&shared, &caller, id)?;
    let state = shared.state.lock().expect("state lock");
    Ok(Json(EventList {
        events: state.events.get(&id).cloned().unwrap_or_default(),
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    /// Replica number, default 0.
    pub replica: Option<u32>,
    /// Attempt, default the latest.
    pub attempt: Option<u32>,
    /// Keep the stream open until the job ends.
    pub follow: Option<bool>,
}

#[utoipa::path(get, path = "/v1/jobs/{id}/logs", params(("id" = u64, Path), LogQuery),
    responses((status = 200, description = "The replica's combined stdout and stderr", content_type = "text/plain"),
        (status = 404, body = ErrorBody)))]
pub(crate) async fn job_logs(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(id): Path<String>,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = parse_job_id(&id)?;
    let q = query(q)?;
    let job = readable_job(&shared, &caller, id)?;
    let replica = q.replica.unwrap_or(0);
    if replica >= job.spec.replicas {
        return Err(ApiError::from(tessera_core::FieldError::new(
            "replica",
            format!(
                "job {id} has {} replica(s), numbered from 0",
                job.spec.replicas
            ),
        )));
    }
    if let Some(a) = q.attempt {
        if a == 0 || a > job.attempt {
            return Err(ApiError::from(tessera_core::FieldError::new(
                "attempt",
                format!(
                    "job {id} has had {} attempt(s), numbered from 1",
                    job.attempt
                ),
            )));
        }
    }
    let stream = crate::logs::stream(
        shared.clone(),
        id,
        replica,
        q.attempt,
        q.follow.unwrap_or(false),
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        "text/plain; charset=utf-8".parse().expect("static header"),
    );
    headers.insert(
        "x-content-type-options",
        "nosniff".parse().expect("static header"),
    );
    Ok((headers, Body::from_stream(stream)).into_response())
}

// ---------- nodes ----------

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeGpu {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub memory_bytes: u64,
    pub healthy: bool,
    /// The (first) job holding this GPU, if any.
    pub job_id: Option<JobId>,
    /// Every job holding part of this GPU (fractional requests share one).
    pub job_ids: Vec<JobId>,
    /// Thousandths of the GPU held (1000 = all of it).
    pub allocated_milli: u32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeView {
    pub name: String,
    /// ready, draining, cordoned or lost.
    pub state: String,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub allocated_cpu_milli: u64,
    pub allocated_memory_bytes: u64,
    pub gpus: Vec<NodeGpu>,
    /// nvml, nvidia-smi or none.
    pub gpu_source: String,
    /// Whether CPU and memory limits are enforced with cgroups.
    pub limits_enforced: bool,
    pub limits_note: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub last_heartbeat: u64,
    pub running_replicas: u32,
    /// Live usage from the node's last heartbeat, when it sent one.
    pub usage: Option<tessera_core::node::NodeUsage>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeList {
    pub nodes: Vec<NodeView>,
}

#[utoipa::path(get, path = "/v1/nodes", responses((status = 200, body = NodeList)))]
async fn list_nodes(State(shared): State<Arc<Shared>>, _caller: Caller) -> Json<NodeList> {
    let state = shared.state.lock().expect("state lock");
    let alloc = state.allocations();
    let nodes = state
        .nodes
        .values()
        .map(|n| {
            let inv = &n.inventory;
            let a = alloc.get(&inv.name).cloned().unwrap_or_default();
            NodeView {
                name: inv.name.clone(),
                state: n.state.as_str().into(),
                cpu_milli: inv.cpu_milli,
                memory_bytes: inv.memory_bytes,
                allocated_cpu_milli: a.cpu_milli,
                allocated_memory_bytes: a.memory_bytes,
                gpus: inv
                    .gpus
                    .iter()
                    .map(|g| NodeGpu {
                        index: g.index,
                        uuid: g.uuid.clone(),
                        model: g.model.clone(),
                        memory_bytes: g.memory_bytes,
                        healthy: g.healthy,
                        job_id: a.gpus.get(&g.index).and_then(|u| u.1.first().copied()),
                        job_ids: a
                            .gpus
                            .get(&g.index)
                            .map(|u| u.1.clone())
                            .unwrap_or_default(),
                        allocated_milli: a.gpus.get(&g.index).map(|u| u.0.min(1000)).unwrap_or(0),
                    })
                    .collect(),
                gpu_source: inv.gpu_source.clone(),
                limits_enforced: inv.limits_enforced,
                limits_note: inv.limits_note.clone(),
                labels: inv.labels.clone(),
                last_heartbeat: n.last_heartbeat,
                running_replicas: a.replicas,
                usage: state.usage.get(&inv.name).cloned(),
            }
        })
        .collect();
    Json(NodeList { nodes })
}

// ---------- the seed API ----------

/// The smallest client's request: `POST /tasks`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SeedTask {
    pub task_name: String,
    pub cpu_count: Option<f64>,
    /// e.g. `256Mi`
    pub memory_size: Option<String>,
    pub image: Option<String>,
    pub command: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SeedCreated {
    pub id: JobId,
    pub task_name: String,
    pub state: JobState,
}

#[utoipa::path(post, path = "/tasks", request_body = SeedTask,
    responses((status = 201, body = SeedCreated), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn seed_create_task(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<SeedCreated>), ApiError> {
    let task: SeedTask = parse_json(&body_bytes(body)?)?;
    let spec = JobSpec {
        name: Some(task.task_name.clone()),
        command: Some(task.command),
        image: task.image,
        resources: ResourcesSpec {
            cpu: task.cpu_count.map(Quantity::Number),
            memory: task.memory_size.map(Quantity::Text),
            ..Default::default()
        },
        ..Default::default()
    };
    let job = create_job(&shared, &caller, spec).await.map_err(|mut e| {
        // Name the seed API's fields, not the job spec's.
        e.field = e.field.map(|f| match f.as_str() {
            "name" => "task_name".to_string(),
            "resources.cpu" => "cpu_count".to_string(),
            "resources.memory" => "memory_size".to_string(),
            _ if f.starts_with("command") => f,
            _ => f,
        });
        e
    })?;
    Ok((
        StatusCode::CREATED,
        Json(SeedCreated {
            id: job.id,
            task_name: task.task_name,
            state: job.state,
        }),
    ))
}
