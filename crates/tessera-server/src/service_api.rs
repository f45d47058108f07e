//! The REST API of services: `/v1/services` (create or update, list),
//! `/v1/services/{name}` (detail, delete), `/scale` and `/keys`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use tessera_core::auth::TokenKind;
use tessera_core::service::{Service, ServiceSpec};
use tessera_store::{commit, Write};
use utoipa::ToSchema;

use crate::api::{body_bytes, parse_json};
use crate::auth::{mint_kind, Caller};
use crate::error::ApiError;
use crate::services::{meta_key, ReplicaView, ServiceEvent};
use crate::{now_ms, Shared};

#[derive(Debug, Serialize, ToSchema)]
pub struct ServiceSummary {
    pub name: String,
    pub team: String,
    pub version: u32,
    pub min: u32,
    pub max: u32,
    pub desired: u32,
    /// Ready replicas of the current version.
    pub ready: usize,
    /// Requests per second through this server's gateway (last 10 s).
    pub requests_per_s: f64,
    /// 99th percentile latency through this server's gateway over the last
    /// 10 s (the upper bound of its histogram bucket), milliseconds.
    pub p99_ms: Option<f64>,
    /// Path of the service on the gateway.
    pub url: String,
    pub created_at: u64,
    pub updated_at: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ServiceList {
    pub services: Vec<ServiceSummary>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ServiceDetail {
    pub summary: ServiceSummary,
    pub service: Service,
    pub replicas: Vec<ReplicaView>,
    pub events: Vec<ServiceEvent>,
}

pub(crate) fn summary(shared: &Shared, s: &Service) -> ServiceSummary {
    let t = &s.template;
    ServiceSummary {
        name: t.name.clone(),
        team: t.team.clone(),
        version: s.version,
        min: t.min,
        max: t.max,
        desired: s.desired,
        ready: shared.services.ready_count(&t.name),
        requests_per_s: (shared.services.request_rate(&t.name) * 10.0).round() / 10.0,
        p99_ms: shared.services.p99_ms(&t.name),
        url: format!("/s/{}/", t.name),
        created_at: s.created_at,
        updated_at: s.updated_at,
    }
}

fn readable(shared: &Shared, caller: &Caller, name: &str) -> Result<Service, ApiError> {
    let state = shared.state.lock().expect("state lock");
    state
        .services
        .get(name)
        .filter(|s| caller.0.can_read_team(&s.template.team))
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no service named `{name}`")))
}

/// Makes a service durable, then current (and runs the service loop).
async fn save(shared: &Shared, s: &Service) -> Result<(), ApiError> {
    commit(
        shared.store.as_ref(),
        vec![Write::Meta(
            meta_key(&s.template.name),
            serde_json::to_string(s).expect("serialisable"),
        )],
    )
    .await?;
    shared
        .state
        .lock()
        .expect("state lock")
        .services
        .insert(s.template.name.clone(), s.clone());
    shared.services.poke();
    Ok(())
}

/// Creates a service, or updates it: a changed replica (command, image,
/// resources, env, port or readiness) is rolled out as a new version; a
/// change of replicas or autoscaling alone is applied in place.
#[utoipa::path(post, path = "/v1/services",
    request_body(content = ServiceSpec, description = "A service spec, as JSON or YAML", content_type = "application/json"),
    responses((status = 201, body = ServiceSummary), (status = 200, body = ServiceSummary),
        (status = 422, body = crate::error::ErrorBody)))]
pub async fn serve(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<ServiceSummary>), ApiError> {
    let body = body_bytes(body)?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::bad_request("the service spec is not UTF-8 text"))?;
    let spec = ServiceSpec::parse(text)?;
    let template = spec.validate(&caller.0.team)?;
    caller.require_write(&template.team)?;
    let now = now_ms();
    let _guard = shared.admin_lock.lock().await;
    let (service, created) = {
        let state = shared.state.lock().expect("state lock");
        if !state.teams.contains_key(&template.team) {
            return Err(ApiError::invalid(
                "team",
                format!("team `{}` does not exist", template.team),
            ));
        }
        let mut nodes = state.live_node_views();
        for g in nodes.iter_mut().flat_map(|n| n.gpus.iter_mut()) {
            g.healthy = true;
        }
        if let Some(why) =
            tessera_scheduler::infeasible_reason(&nodes, &template.replica.resources, 1)
        {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unschedulable",
                format!("a replica of this service fits no node in the cluster: {why}"),
            )
            .with_field("resources"));
        }
        match state.services.get(&template.name) {
            Some(old) => {
                caller.require_write(&old.template.team)?;
                let changed = old.template.replica != template.replica
                    || old.template.port != template.port
                    || old.template.readiness != template.readiness;
                let mut s = old.clone();
                s.version += changed as u32;
                s.desired = s.desired.clamp(template.min, template.max);
                s.template = template;
                s.updated_at = now;
                (s, false)
            }
            None => (
                Service {
                    desired: template.min.max(1).min(template.max),
                    template,
                    version: 1,
                    created_at: now,
                    updated_at: now,
                },
                true,
            ),
        }
    };
    save(&shared, &service).await?;
    let name = service.template.name.clone();
    let version = service.version;
    shared.services.event(
        &name,
        if created { "created" } else { "updated" },
        format!(
            "{} by {} (version {version}, replicas {}..{})",
            if created { "created" } else { "updated" },
            caller.0.token_id,
            service.template.min,
            service.template.max
        ),
    );
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(summary(&shared, &service))))
}

#[utoipa::path(get, path = "/v1/services", responses((status = 200, body = ServiceList)))]
pub async fn list(State(shared): State<Arc<Shared>>, caller: Caller) -> Json<ServiceList> {
    let services: Vec<Service> = {
        let state = shared.state.lock().expect("state lock");
        state
            .services
            .values()
            .filter(|s| caller.0.can_read_team(&s.template.team))
            .cloned()
            .collect()
    };
    Json(ServiceList {
        services: services.iter().map(|s| summary(&shared, s)).collect(),
    })
}

#[utoipa::path(get, path = "/v1/services/{name}", params(("name" = String, Path)),
    responses((status = 200, body = ServiceDetail), (status = 404, body = crate::error::ErrorBody)))]
pub async fn detail(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<ServiceDetail>, ApiError> {
    let service = readable(&shared, &caller, &name)?;
    let mut replicas = shared.services.replicas(&name);
    {
        let state = shared.state.lock().expect("state lock");
        for r in &mut replicas {
            r.node = state
                .jobs
                .get(&r.job_id)
                .and_then(|j| j.placement.first())
                .map(|p| p.node.clone());
        }
    }
    Ok(Json(ServiceDetail {
        summary: summary(&shared, &service),
        replicas,
        events: shared.services.events(&name),
        service,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    pub min: Option<i64>,
    pub max: Option<i64>,
}

#[utoipa::path(post, path = "/v1/services/{name}/scale", params(("name" = String, Path)),
    request_body = ScaleRequest,
    responses((status = 200, body = ServiceSummary), (status = 422, body = crate::error::ErrorBody)))]
pub async fn scale(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ServiceSummary>, ApiError> {
    let req: ScaleRequest = parse_json(&body_bytes(body)?)?;
    let mut service = readable(&shared, &caller, &name)?;
    caller.require_write(&service.template.team)?;
    let t = &mut service.template;
    let min = req.min.unwrap_or(t.min as i64);
    let max = req.max.unwrap_or((t.max as i64).max(min));
    let limit = tessera_core::service::MAX_SERVICE_REPLICAS;
    if !(0..=limit).contains(&min) {
        return Err(ApiError::invalid(
            "min",
            format!("must be between 0 and {limit}"),
        ));
    }
    if !(1..=limit).contains(&max) || max < min {
        return Err(ApiError::invalid(
            "max",
            format!("must be between max(1, min) and {limit}"),
        ));
    }
    if min > 0 {
        t.autoscale.scale_to_zero_after_ms = None;
    }
    t.min = min as u32;
    t.max = max as u32;
    service.desired = service.desired.clamp(t.min, t.max);
    service.updated_at = now_ms();
    save(&shared, &service).await?;
    shared.services.event(
        &name,
        "scale",
        format!("replicas {min}..{max} set by {}", caller.0.token_id),
    );
    Ok(Json(summary(&shared, &service)))
}

#[utoipa::path(delete, path = "/v1/services/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = crate::error::ErrorBody)))]
pub async fn delete(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let service = readable(&shared, &caller, &name)?;
    caller.require_write(&service.template.team)?;
    let now = now_ms();
    let replicas: Vec<u64> = shared
        .services
        .replicas(&name)
        .iter()
        .map(|r| r.job_id)
        .collect();
    let staged = {
        let mut state = shared.state.lock().expect("state lock");
        let mut writes = vec![Write::DeleteMeta(meta_key(&name))];
        let keys: Vec<(String, String)> = state
            .tokens
            .values()
            .filter(|t| {
                t.kind
                    == (TokenKind::Service {
                        service: name.clone(),
                    })
            })
            .map(|t| (t.hash.clone(), t.id.clone()))
            .collect();
        for (hash, id) in keys {
            state.tokens.remove(&hash);
            writes.push(Write::DeleteToken(id));
        }
        for id in replicas {
            crate::api::cancel_in_state(
                &shared,
                &mut state,
                id,
                format!("service {name} deleted"),
                now,
                &mut writes,
            );
        }
        state.services.remove(&name);
        shared.stage(writes)
    };
    staged.durable().await;
    shared.services.forget(&name);
    shared.changed();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ServiceKeyCreated {
    pub id: String,
    /// The key, shown once: `Authorization: Bearer <key>` at the gateway.
    pub key: String,
    pub service: String,
}

#[utoipa::path(post, path = "/v1/services/{name}/keys", params(("name" = String, Path)),
    responses((status = 201, body = ServiceKeyCreated), (status = 404, body = crate::error::ErrorBody)))]
pub async fn create_key(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<ServiceKeyCreated>), ApiError> {
    let service = readable(&shared, &caller, &name)?;
    caller.require_write(&service.template.team)?;
    let (secret, record) = mint_kind(
        &format!("service {name}"),
        &service.template.team,
        TokenKind::Service {
            service: name.clone(),
        },
        now_ms(),
    );
    commit(shared.store.as_ref(), vec![Write::Token(record.clone())]).await?;
    shared
        .state
        .lock()
        .expect("state lock")
        .tokens
        .insert(record.hash.clone(), record.clone());
    shared.services.poke();
    shared.services.event(
        &name,
        "key",
        format!("key {} created by {}", record.id, caller.0.token_id),
    );
    Ok((
        StatusCode::CREATED,
        Json(ServiceKeyCreated {
            id: record.id,
            key: secret,
            service: name,
        }),
    ))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RouteTable {
    pub services: std::collections::BTreeMap<String, crate::services::Published>,
}

/// What a standalone gateway serves: each service's ready replicas and the
/// hashes of the keys that may call it. Admins only.
#[utoipa::path(get, path = "/v1/gateway/routes", responses((status = 200, body = RouteTable)))]
pub async fn routes(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
) -> Result<Json<RouteTable>, ApiError> {
    caller.require_superuser("reading gateway routes")?;
    Ok(Json(RouteTable {
        services: shared.services.published(),
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadReport {
    /// The reporting gateway (any stable name).
    pub gateway: String,
    /// Per service: requests in flight or held now, and milliseconds since
    /// its last request (none: never).
    pub services: std::collections::BTreeMap<String, ServiceLoad>,
    /// Services a request is waiting for (scale from zero).
    #[serde(default)]
    pub demand: Vec<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceLoad {
    pub load: u32,
    pub idle_ms: Option<u64>,
}

/// A standalone gateway's load, for the autoscaler, and its waiting
/// requests (scale from zero). Admins only.
#[utoipa::path(post, path = "/v1/gateway/load", request_body = LoadReport,
    responses((status = 200, description = "`{\"services\": N}`: how many loads were taken")))]
pub async fn load(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require_superuser("reporting gateway load")?;
    let report: LoadReport = parse_json(&body_bytes(body)?)?;
    for (name, l) in &report.services {
        shared.services.report_load(
            &report.gateway,
            name,
            l.load,
            l.idle_ms.map(std::time::Duration::from_millis),
        );
    }
    for name in &report.demand {
        shared.services.demand(name);
    }
    Ok(Json(
        serde_json::json!({ "services": report.services.len() }),
    ))
}
