//! The fleet: remote agents joining with a join token, their one long-lived
//! connection each (a WebSocket the agent opens, so machines behind NAT can
//! join), leases, and node administration (cordon, drain, remove).
//!
//! Guarantees (see ARCHITECTURE.md, "Failures"):
//! - a node is declared lost only after `node_lease` without a word from its
//!   agent, and the agent — told its own, shorter lease in `Welcome` — has
//!   stopped its replicas by then, so a requeued job never runs beside its
//!   old copy;
//! - the attempt number is the placement's epoch: reports about any other
//!   attempt are refused and such replicas are stopped;
//! - on every (re)connection the agent sends what it runs (`Sync`) and the
//!   server reconciles: expected but missing replicas are lost (and requeued
//!   per the job's node-loss policy), unwanted ones are stopped.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::BytesRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tessera_core::auth::TokenKind;
use tessera_core::node::NodeState;
use tessera_core::protocol::{FromAgent, ReplicaKey, ToAgent};
use tessera_core::quantity::parse_duration as parse_duration_ms;
use tessera_core::spec::validate_name;
use tessera_core::{Event, JobId, JobState};
use tessera_store::{commit, Write};
use tokio::sync::mpsc;
use tracing::{info, warn};
use utoipa::ToSchema;

use crate::api::{body_bytes, parse_json};
use crate::auth::{hash_token, mint_kind, Caller};
use crate::control::{self, AgentReport};
use crate::error::ApiError;
use crate::state::ClusterState;
use crate::{now_ms, Shared};

/// The lease an agent is held to: it stops its work after this long without
/// hearing from the server. Chosen so the agent has stopped (lease, then
/// the kill grace) before the server declares the node lost (`node_lease`
/// after the last heartbeat, which is at most one heartbeat older than the
/// last message the agent heard).
pub fn agent_lease_ms(node_lease_ms: u64, heartbeat_ms: u64, kill_grace_ms: u64) -> Option<u64> {
    // The margin covers the replicas' watchdogs, which work in whole
    // seconds and check once a second (up to two seconds late).
    let margin = 2000.max(heartbeat_ms) + 1000;
    node_lease_ms
        .checked_sub(heartbeat_ms + kill_grace_ms + margin)
        .filter(|l| *l >= 3 * heartbeat_ms)
}

// ---------- join tokens ----------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenCreate {
    /// A name for people, e.g. `lab-servers`.
    pub name: Option<String>,
    /// How long the token admits nodes, e.g. `1h`; none: until revoked.
    pub expires: Option<String>,
    /// How many nodes it may admit; none: any number.
    pub uses: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JoinTokenCreated {
    pub id: String,
    /// The secret, shown once.
    pub token: String,
    pub expires_at: Option<u64>,
    pub uses: Option<u32>,
}

#[utoipa::path(post, path = "/v1/join-tokens", request_body = JoinTokenCreate,
    responses((status = 201, body = JoinTokenCreated), (status = 403, body = crate::error::ErrorBody)))]
pub async fn create_join_token(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<JoinTokenCreated>), ApiError> {
    caller.require_superuser("minting join tokens")?;
    let req: JoinTokenCreate = parse_json(&body_bytes(body)?)?;
    let now = now_ms();
    let expires_at = match &req.expires {
        Some(e) => {
            let ms = parse_duration_ms(e).map_err(|m| ApiError::invalid("expires", m))?;
            if ms == 0 {
                return Err(ApiError::invalid("expires", "must be more than zero"));
            }
            Some(now + ms)
        }
        None => None,
    };
    if req.uses == Some(0) {
        return Err(ApiError::invalid("uses", "must be at least 1"));
    }
    let (secret, record) = mint_kind(
        req.name.as_deref().unwrap_or("join"),
        tessera_core::auth::ADMIN_TEAM,
        TokenKind::Join {
            expires_at,
            uses_left: req.uses,
        },
        now,
    );
    commit(shared.store.as_ref(), vec![Write::Token(record.clone())]).await?;
    shared
        .state
        .lock()
        .expect("state lock")
        .tokens
        .insert(record.hash.clone(), record.clone());
    Ok((
        StatusCode::CREATED,
        Json(JoinTokenCreated {
            id: record.id,
            token: secret,
            expires_at,
            uses: req.uses,
        }),
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The join token.
    pub token: String,
    /// The node's name (unique in the pool).
    pub node: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Joined {
    pub node: String,
    /// The node's own credential for its agent connection; revoked by
    /// `DELETE /v1/nodes/{name}`.
    pub credential: String,
}

/// Admits a node: spends one use of a join token and mints the node's own
/// credential. The join token authenticates this request, so it carries no
/// `Authorization` header.
#[utoipa::path(post, path = "/v1/agents/join", request_body = JoinRequest,
    responses((status = 201, body = Joined), (status = 401, body = crate::error::ErrorBody),
        (status = 409, body = crate::error::ErrorBody)), security(()))]
pub async fn join(
    State(shared): State<Arc<Shared>>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Joined>), ApiError> {
    let req: JoinRequest = parse_json(&body_bytes(body)?)?;
    validate_name("node", &req.node)?;
    let now = now_ms();
    let _guard = shared.admin_lock.lock().await;
    let (writes, record, secret) = {
        let state = shared.state.lock().expect("state lock");
        let Some(join) = state.tokens.get(&hash_token(req.token.trim())).cloned() else {
            return Err(ApiError::unauthorized("unknown or revoked join token"));
        };
        let TokenKind::Join {
            expires_at,
            uses_left,
        } = join.kind
        else {
            return Err(ApiError::unauthorized("this is not a join token"));
        };
        if expires_at.is_some_and(|e| now >= e) {
            return Err(ApiError::unauthorized("this join token has expired"));
        }
        if uses_left == Some(0) {
            return Err(ApiError::unauthorized("this join token has been used up"));
        }
        if state.tokens.values().any(|t| {
            t.kind
                == (TokenKind::Node {
                    node: req.node.clone(),
                })
        }) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "node_exists",
                format!(
                    "a node named `{}` has already joined; remove it first (`tessera node remove {}`) or join under another name",
                    req.node, req.node
                ),
            )
            .with_field("node"));
        }
        let mut writes = Vec::new();
        if let Some(n) = uses_left {
            let mut spent = join.clone();
            spent.kind = TokenKind::Join {
                expires_at,
                uses_left: Some(n - 1),
            };
            writes.push(Write::Token(spent));
        }
        let (secret, record) = mint_kind(
            &format!("node {}", req.node),
            tessera_core::auth::ADMIN_TEAM,
            TokenKind::Node {
                node: req.node.clone(),
            },
            now,
        );
        writes.push(Write::Token(record.clone()));
        (writes, record, secret)
    };
    commit(shared.store.as_ref(), writes.clone()).await?;
    {
        let mut state = shared.state.lock().expect("state lock");
        for w in writes {
            if let Write::Token(t) = w {
                state.tokens.insert(t.hash.clone(), t);
            }
        }
    }
    info!(node = %req.node, credential = %record.id, "a node joined");
    Ok((
        StatusCode::CREATED,
        Json(Joined {
            node: req.node,
            credential: secret,
        }),
    ))
}

// ---------- the agent connection ----------

/// The node a node credential belongs to.
pub(crate) fn node_of(shared: &Shared, headers: &HeaderMap) -> Result<String, ApiError> {
    let secret = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::unauthorized("agents connect with `Authorization: Bearer <node credential>`")
        })?;
    let state = shared.state.lock().expect("state lock");
    match state
        .tokens
        .get(&hash_token(secret.trim()))
        .map(|t| &t.kind)
    {
        Some(TokenKind::Node { node }) => Ok(node.clone()),
        Some(_) => Err(ApiError::unauthorized(
            "this is not a node credential; join first with a join token",
        )),
        None => Err(ApiError::unauthorized(
            "unknown or revoked node credential (was the node removed?)",
        )),
    }
}

/// `GET /v1/agents/connect`: upgrades to the agent's WebSocket.
pub async fn connect(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let node = node_of(&shared, &headers)?;
    // A small read buffer: the default (128 KiB) is zero-filled on every
    // read, so each idle agent connection would hold 128 KiB of resident
    // memory; agents' messages are small, and a larger one (a log frame)
    // still arrives whole.
    Ok(ws
        .max_message_size(16 << 20)
        .read_buffer_size(8 << 10)
        .on_upgrade(move |socket| serve_agent(shared, node, socket)))
}

fn text(msg: &ToAgent) -> Message {
    Message::Text(
        serde_json::to_string(msg)
            .expect("protocol messages serialise")
            .into(),
    )
}

/// How long an agent may take between connecting and its `Sync`.
const HANDSHAKE: Duration = Duration::from_secs(30);

async fn serve_agent(shared: Arc<Shared>, node: String, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let lease_ms = agent_lease_ms(
        shared.node_lease_ms,
        shared.heartbeat_ms,
        shared.kill_grace_ms,
    )
    .unwrap_or(shared.heartbeat_ms);
    let welcome = ToAgent::Welcome {
        node: node.clone(),
        heartbeat_ms: shared.heartbeat_ms,
        lease_ms,
        grace_ms: shared.kill_grace_ms,
    };
    if sink.send(text(&welcome)).await.is_err() {
        return;
    }
    // The handshake: Register, reports held back while disconnected, Sync.
    let mut handshake = Vec::new();
    let deadline = tokio::time::Instant::now() + HANDSHAKE;
    loop {
        let msg = match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(m))) => m,
            _ => {
                warn!(%node, "agent connection ended during the handshake");
                return;
            }
        };
        let t = match msg {
            Message::Text(t) => t,
            Message::Binary(b) => {
                write_log_frame(&shared, &node, &b);
                continue;
            }
            _ => continue,
        };
        let ev: FromAgent = match serde_json::from_str(t.as_str()) {
            Ok(ev) => ev,
            Err(e) => {
                warn!(%node, error = %e, "unreadable message from an agent");
                let _ = sink.send(Message::Close(None)).await;
                return;
            }
        };
        let done = matches!(ev, FromAgent::Sync { .. });
        let wrong_node = match &ev {
            FromAgent::Register(inv) => inv.name != node,
            FromAgent::Sync { node: n, .. } | FromAgent::Heartbeat { node: n, .. } => *n != node,
            _ => false,
        };
        if wrong_node {
            warn!(%node, "an agent spoke for another node; closing its connection");
            let _ = sink.send(Message::Close(None)).await;
            return;
        }
        handshake.push(ev);
        if done {
            break;
        }
    }
    if !matches!(handshake.first(), Some(FromAgent::Register(_))) {
        warn!(%node, "an agent did not register first; closing its connection");
        return;
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<ToAgent>();
    let from: Arc<str> = Arc::from(node.as_str());
    control::apply_reports(
        &shared,
        handshake
            .into_iter()
            .map(|event| AgentReport {
                from: Some(from.clone()),
                event,
            })
            .collect(),
        Some((node.clone(), tx.clone())),
    )
    .await;
    shared.metrics.agent_connections.inc();
    info!(%node, "agent connected");
    let reports = shared.reports.clone();
    let mut ping = tokio::time::interval(Duration::from_millis(shared.heartbeat_ms));
    ping.tick().await;
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<FromAgent>(t.as_str()) {
                    Ok(event) => {
                        let _ = reports.send(AgentReport { from: Some(from.clone()), event });
                    }
                    Err(e) => warn!(%node, error = %e, "unreadable message from an agent"),
                },
                Some(Ok(Message::Binary(b))) => write_log_frame(&shared, &node, &b),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            cmd = rx.recv() => match cmd {
                Some(cmd) => {
                    if sink.send(text(&cmd)).await.is_err() {
                        break;
                    }
                }
                // The server let go of this node (lost, removed, replaced).
                None => break,
            },
            _ = ping.tick() => {
                if sink.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = sink.send(Message::Close(None)).await;
    drop(tx);
    disconnected(&shared, &node, &mut rx);
    info!(%node, "agent disconnected");
}

/// Writes a piece of a replica's log, shipped by its node's agent, into the
/// server's copy (where `tessera logs` reads). Only the node the replica was
/// placed on may write it.
fn write_log_frame(shared: &Shared, node: &str, frame: &[u8]) {
    use std::os::unix::fs::FileExt;
    let Some((key, offset, data)) = tessera_agent::remote::decode_log_frame(frame) else {
        warn!(%node, "malformed log frame");
        return;
    };
    let allowed = {
        let state = shared.state.lock().expect("state lock");
        state.jobs.get(&key.job_id).is_some_and(|j| {
            key.attempt < j.attempt
                || (key.attempt == j.attempt
                    && j.placement
                        .iter()
                        .any(|p| p.replica == key.replica && p.node == node))
        })
    };
    if !allowed {
        return;
    }
    let path = tessera_agent::log_path(&shared.home, key);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let result = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .and_then(|f| f.write_all_at(data, offset));
    if let Err(e) = result {
        warn!(%node, replica = %key, error = %e, "cannot write a shipped log");
    }
}

/// Forgets a connection, unless a newer one has replaced it.
fn disconnected(shared: &Shared, node: &str, rx: &mut mpsc::UnboundedReceiver<ToAgent>) {
    rx.close();
    let mut state = shared.state.lock().expect("state lock");
    let mut agents = shared.agents.lock().expect("agents lock");
    if agents.get(node).is_some_and(|tx| tx.is_closed()) {
        agents.remove(node);
        state.connected.remove(node);
    }
}

// ---------- leases and drains ----------

/// Declares nodes lost whose agents have been silent past the lease, and
/// stops what is still running on draining nodes past their deadline.
pub async fn lease_loop(shared: Arc<Shared>) {
    let tick = Duration::from_millis((shared.heartbeat_ms / 2).clamp(50, 1000));
    loop {
        tokio::time::sleep(tick).await;
        let now = now_ms();
        let mut writes = Vec::new();
        let mut stops = Vec::new();
        let staged = {
            let mut state = shared.state.lock().expect("state lock");
            let expired: Vec<String> = state
                .nodes
                .values()
                .filter(|n| {
                    n.state != NodeState::Lost
                        && now.saturating_sub(n.last_heartbeat) > shared.node_lease_ms
                })
                .map(|n| n.inventory.name.clone())
                .collect();
            for name in expired {
                let silent = now.saturating_sub(state.nodes[&name].last_heartbeat);
                warn!(node = %name, silent_ms = silent, "node lost: no heartbeat within its lease");
                let node = state.nodes.get_mut(&name).expect("node exists");
                node.state = NodeState::Lost;
                node.drain_deadline = None;
                writes.push(Write::Node(Box::new(node.clone())));
                state.connected.remove(&name);
                shared.agents.lock().expect("agents lock").remove(&name);
                shared.metrics.nodes_lost.inc();
                lose_replicas_on(
                    &shared,
                    &mut state,
                    &name,
                    &format!(
                        "node {name} lost: no heartbeat for {}",
                        tessera_core::quantity::format_duration(silent)
                    ),
                    now,
                    &mut writes,
                    &mut stops,
                );
            }
            let overdue: Vec<String> = state
                .nodes
                .values()
                .filter(|n| {
                    n.state == NodeState::Draining && n.drain_deadline.is_some_and(|d| now >= d)
                })
                .map(|n| n.inventory.name.clone())
                .collect();
            for name in overdue {
                preempt_on(&shared, &mut state, &name, now, &mut writes, &mut stops);
            }
            let staged = shared.stage(writes);
            send_all(&shared, stops);
            staged
        };
        staged.durable().await;
        shared.changed();
    }
}

/// Sends messages to connected agents (dropped for nodes without one).
pub fn send_all(shared: &Shared, msgs: Vec<(String, ToAgent)>) {
    if msgs.is_empty() {
        return;
    }
    let agents = shared.agents.lock().expect("agents lock");
    for (node, msg) in msgs {
        if let Some(tx) = agents.get(&node) {
            let _ = tx.send(msg);
        }
    }
}

/// Active jobs with a replica on `node` that has not exited.
fn jobs_on(state: &ClusterState, node: &str) -> Vec<JobId> {
    state
        .active
        .iter()
        .copied()
        .filter(|id| {
            let j = &state.jobs[id];
            j.placement.iter().any(|p| {
                p.node == node
                    && j.replicas
                        .iter()
                        .find(|r| r.replica == p.replica)
                        .is_none_or(|r| r.state != tessera_core::job::ReplicaState::Exited)
            })
        })
        .collect()
}

/// The current attempt of `id` is lost with `node`: its replicas elsewhere
/// are stopped, and the job is requeued per its node-loss policy (a job
/// being cancelled ends cancelled).
#[allow(clippy::too_many_arguments)]
pub fn lose_job(
    shared: &Shared,
    state: &mut ClusterState,
    id: JobId,
    node: &str,
    reason: &str,
    now: u64,
    writes: &mut Vec<Write>,
    stops: &mut Vec<(String, ToAgent)>,
) {
    let job = &state.jobs[&id];
    for p in &job.placement {
        if p.node != node {
            stops.push((
                p.node.clone(),
                ToAgent::Stop {
                    key: ReplicaKey {
                        job_id: id,
                        attempt: job.attempt,
                        replica: p.replica,
                    },
                    grace_ms: shared.kill_grace_ms,
                    reason: reason.to_string(),
                },
            ));
        }
    }
    let (outcome, why) = if job.cancel_requested {
        (JobState::Cancelled, format!("cancelled; {reason}"))
    } else {
        (JobState::Lost, format!("lost: {reason}"))
    };
    state.add_event(Event::new(id, now, "lost", reason), writes);
    control::finish(state, id, outcome, None, why, now, writes, shared);
}

fn lose_replicas_on(
    shared: &Shared,
    state: &mut ClusterState,
    node: &str,
    reason: &str,
    now: u64,
    writes: &mut Vec<Write>,
    stops: &mut Vec<(String, ToAgent)>,
) {
    for id in jobs_on(state, node) {
        lose_job(shared, state, id, node, reason, now, writes, stops);
    }
    state.capacity_changed = true;
    shared.wake.notify_one();
}

/// Stops what still runs on a drained node; the jobs go back to the queue
/// without using up retries, as after a preemption.
fn preempt_on(
    shared: &Shared,
    state: &mut ClusterState,
    node: &str,
    now: u64,
    writes: &mut Vec<Write>,
    stops: &mut Vec<(String, ToAgent)>,
) {
    for id in jobs_on(state, node) {
        let job = &state.jobs[&id];
        if job.preempting.is_some() || job.cancel_requested {
            continue;
        }
        let why = format!("node {node} was drained and its deadline passed");
        for p in &job.placement {
            stops.push((
                p.node.clone(),
                ToAgent::Stop {
                    key: ReplicaKey {
                        job_id: id,
                        attempt: job.attempt,
                        replica: p.replica,
                    },
                    grace_ms: shared.kill_grace_ms,
                    reason: why.clone(),
                },
            ));
        }
        state.update_job(id, writes, |j| {
            j.preempting = Some(why.clone());
            Some(Event::new(id, now, "preempting", why.clone()))
        });
    }
}

// ---------- node administration ----------

#[derive(Debug, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// After this long (e.g. `10m`), work still running is stopped and
    /// requeued; none: running work may finish, however long it takes.
    pub deadline: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeStateChanged {
    pub node: String,
    pub state: NodeState,
    pub drain_deadline: Option<u64>,
    /// Replicas still running on the node.
    pub running_replicas: usize,
}

async fn set_node_state(
    shared: &Shared,
    caller: &Caller,
    name: &str,
    to: NodeState,
    deadline: Option<u64>,
) -> Result<Json<NodeStateChanged>, ApiError> {
    caller.require_superuser("changing a node's state")?;
    let (staged, out) = {
        let mut state = shared.state.lock().expect("state lock");
        let Some(node) = state.nodes.get_mut(name) else {
            return Err(ApiError::not_found(format!("no node named `{name}`")));
        };
        if node.state == NodeState::Lost {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "node_lost",
                format!("node `{name}` is lost; it becomes ready again when its agent reconnects"),
            ));
        }
        node.state = to;
        node.drain_deadline = deadline;
        let write = Write::Node(Box::new(node.clone()));
        let out = NodeStateChanged {
            node: name.to_string(),
            state: to,
            drain_deadline: deadline,
            running_replicas: 0,
        };
        state.capacity_changed = true;
        let running = jobs_on(&state, name).len();
        (
            shared.stage(vec![write]),
            NodeStateChanged {
                running_replicas: running,
                ..out
            },
        )
    };
    staged.durable().await;
    shared.wake.notify_one();
    Ok(Json(out))
}

#[utoipa::path(post, path = "/v1/nodes/{name}/cordon", params(("name" = String, Path)),
    responses((status = 200, body = NodeStateChanged), (status = 404, body = crate::error::ErrorBody)))]
pub async fn cordon(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<NodeStateChanged>, ApiError> {
    set_node_state(&shared, &caller, &name, NodeState::Cordoned, None).await
}

#[utoipa::path(post, path = "/v1/nodes/{name}/uncordon", params(("name" = String, Path)),
    responses((status = 200, body = NodeStateChanged), (status = 404, body = crate::error::ErrorBody)))]
pub async fn uncordon(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<NodeStateChanged>, ApiError> {
    set_node_state(&shared, &caller, &name, NodeState::Ready, None).await
}

#[utoipa::path(post, path = "/v1/nodes/{name}/drain", params(("name" = String, Path)),
    request_body = DrainRequest,
    responses((status = 200, body = NodeStateChanged), (status = 404, body = crate::error::ErrorBody)))]
pub async fn drain(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(name): Path<String>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Json<NodeStateChanged>, ApiError> {
    let bytes = body_bytes(body)?;
    let req: DrainRequest = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        DrainRequest::default()
    } else {
        parse_json(&bytes)?
    };
    let deadline = match &req.deadline {
        Some(d) => {
            Some(now_ms() + parse_duration_ms(d).map_err(|m| ApiError::invalid("deadline", m))?)
        }
        None => None,
    };
    set_node_state(&shared, &caller, &name, NodeState::Draining, deadline).await
}

/// Removes a node: revokes its credential, stops and requeues its work,
/// closes its connection and forgets it.
#[utoipa::path(delete, path = "/v1/nodes/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = crate::error::ErrorBody)))]
pub async fn remove(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_superuser("removing a node")?;
    let now = now_ms();
    let staged = {
        let mut state = shared.state.lock().expect("state lock");
        let credentials: Vec<(String, String)> = state
            .tokens
            .values()
            .filter(|t| t.kind == (TokenKind::Node { node: name.clone() }))
            .map(|t| (t.hash.clone(), t.id.clone()))
            .collect();
        if !state.nodes.contains_key(&name) && credentials.is_empty() {
            return Err(ApiError::not_found(format!("no node named `{name}`")));
        }
        let mut writes = Vec::new();
        let mut stops = Vec::new();
        for (hash, id) in credentials {
            state.tokens.remove(&hash);
            writes.push(Write::DeleteToken(id));
        }
        lose_replicas_on(
            &shared,
            &mut state,
            &name,
            &format!("node {name} was removed from the pool"),
            now,
            &mut writes,
            &mut stops,
        );
        stops.push((
            name.clone(),
            ToAgent::StopAll {
                grace_ms: shared.kill_grace_ms,
                reason: "the node was removed from the pool".into(),
            },
        ));
        state.nodes.remove(&name);
        state.connected.remove(&name);
        writes.push(Write::DeleteNode(name.clone()));
        let staged = shared.stage(writes);
        send_all(&shared, stops);
        shared.agents.lock().expect("agents lock").remove(&name);
        staged
    };
    staged.durable().await;
    shared.changed();
    info!(node = %name, "node removed");
    Ok(StatusCode::NO_CONTENT)
}
