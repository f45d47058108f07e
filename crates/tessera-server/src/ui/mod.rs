//! The web dashboard at `/ui`: server-rendered pages (Overview, Jobs, a job
//! page with live logs, Nodes, Teams, Services) with a little inline
//! JavaScript, and no asset from anywhere else.
//!
//! Sign-in takes an API token and keeps it in an `HttpOnly`,
//! `SameSite=Strict` cookie scoped to `/ui`; the [`Caller`] extractor
//! accepts that cookie on `/ui` paths only, so every page sees exactly what
//! the API shows the token. Every form that changes something carries a
//! per-session token (a hash of the session's secret) and is refused when
//! its `Origin` is another site's. Buttons call the API's own handlers
//! (cancel, cordon, drain), so the rules are the API's.
//!
//! `view` builds plain structs from the state under its lock; `pages`
//! renders them after the lock is released; `history` keeps the Overview's
//! samples and draws its charts; `bench` times the pages on a synthetic
//! 1,000-node, 100,000-job cluster.

pub mod bench;
pub mod history;
pub mod html;
pub mod pages;
pub mod view;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tessera_core::spec::JobSpec;

use crate::auth::{principal_for, Caller};
use crate::error::ApiError;
use crate::{now_ms, Shared};
use history::{History, Sample, SAMPLE_EVERY};
use html::Session;

/// The session cookie's name.
pub const COOKIE: &str = "tessera_session";
/// How long a browser keeps a sign-in.
const SESSION_SECS: u64 = 12 * 3600;

/// The dashboard's own state: the Overview's history.
#[derive(Debug, Default)]
pub struct UiState {
    pub history: History,
}

/// Whether a request path belongs to the dashboard (where the session
/// cookie counts).
pub fn is_ui_path(path: &str) -> bool {
    path == "/ui" || path.starts_with("/ui/")
}

/// The API token in the request's session cookie, if any.
pub fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The form token of a session: derived from its secret, so it cannot be
/// guessed without the cookie, and needs no storage.
pub fn csrf_for(secret: &str) -> String {
    let d = Sha256::digest(format!("tessera-ui-form:{secret}").as_bytes());
    hex::encode(&d[..16])
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(|s| s.trim().to_string())
}

fn session(headers: &HeaderMap, caller: &Caller) -> Session {
    let secret = bearer(headers)
        .or_else(|| session_token(headers))
        .unwrap_or_default();
    Session {
        principal: caller.0.clone(),
        csrf: csrf_for(&secret),
    }
}

/// Takes the sampler's first sample (and, on a fresh start, rebuilds the
/// window from job records), then one every [`SAMPLE_EVERY`].
pub async fn sampler(shared: Arc<Shared>) {
    {
        let now = now_ms();
        let state = shared.state.lock().expect("state lock");
        if shared.ui.history.is_empty() {
            let step = SAMPLE_EVERY.as_millis() as u64;
            for s in history::backfill(&state, now, history::KEEP_MS, step) {
                shared.ui.history.push(s);
            }
        }
    }
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let s = {
            let state = shared.state.lock().expect("state lock");
            Sample::take(&state, now_ms())
        };
        shared.ui.history.push(s);
    }
}

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/ui", get(overview))
        .route("/ui/", get(|| async { see_other("/ui") }))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/jobs", get(jobs).post(submit))
        .route("/ui/jobs/new", get(new_job))
        .route("/ui/jobs/{id}", get(job))
        .route("/ui/jobs/{id}/cancel", post(cancel))
        .route("/ui/jobs/{id}/logs", get(logs))
        .route("/ui/nodes", get(nodes))
        .route("/ui/nodes/{name}/{action}", post(node_action))
        .route("/ui/teams", get(teams))
        .route("/ui/services", get(services))
        .route("/ui/pools", get(pools))
        .route("/ui/datasets", get(datasets))
        .route("/ui/{*rest}", get(not_found))
}

// ---------- responses ----------

fn see_other(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_string())]).into_response()
}

/// An HTML page with the dashboard's headers; `Server-Timing` says how
/// long the server took to build it.
fn page(status: StatusCode, html: String, started: Instant) -> Response {
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut r = (status, html).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&html::CSP) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&format!("render;dur={ms:.2}")) {
        h.insert("server-timing", v);
    }
    r
}

fn error_page(session: Option<&Session>, e: &ApiError, started: Instant) -> Response {
    let mut msg = e.message.clone();
    if let Some(f) = &e.field {
        if !msg.starts_with(f.as_str()) {
            msg = format!("{f}: {msg}");
        }
    }
    page(
        e.status,
        pages::error(session, e.status.as_u16(), &msg),
        started,
    )
}

/// Where an unsigned-in visitor goes: the sign-in page, then back here.
fn to_login(uri: &Uri) -> Response {
    let next = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/ui");
    see_other(&format!("/ui/login?next={}", html::url_enc(next)))
}

/// A page's caller, or the sign-in page.
macro_rules! signed_in {
    ($caller:expr, $uri:expr) => {
        match $caller {
            Ok(c) => c,
            Err(_) => return to_login(&$uri),
        }
    };
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))
}

/// A `next` that stays on the dashboard (no open redirects).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if is_ui_path(n.split('?').next().unwrap_or("")) && !n.contains("//") => {
            n.to_string()
        }
        _ => "/ui".to_string(),
    }
}

/// Refuses a form posted from another site: its `Origin` (or, without
/// one, its `Referer`) must be this server as the browser reached it.
fn same_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let from = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .and_then(|h| h.to_str().ok());
    let Some(from) = from else {
        // Not a browser: the form token alone decides.
        return Ok(());
    };
    let rest = from
        .strip_prefix("http://")
        .or_else(|| from.strip_prefix("https://"))
        .unwrap_or("");
    let origin_host = rest.split('/').next().unwrap_or("");
    if !host.is_empty() && origin_host.eq_ignore_ascii_case(host) {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "this form was sent from another site; open the dashboard and try again",
        ))
    }
}

/// Checks a POST from a page: same origin, signed in, and the form token
/// of this session. Returns the caller's session.
fn check_form(
    headers: &HeaderMap,
    caller: &Result<Caller, ApiError>,
    csrf: &str,
) -> Result<Session, ApiError> {
    same_origin(headers)?;
    let caller = caller.as_ref().map_err(|e| e.clone())?;
    let secret = session_token(headers)
        .ok_or_else(|| ApiError::unauthorized("sign in first: this needs a dashboard session"))?;
    let expected = csrf_for(&secret);
    let ok = expected.len() == csrf.len()
        && expected
            .bytes()
            .zip(csrf.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !ok {
        return Err(ApiError::forbidden(
            "this form's session token does not match; reload the page and try again",
        ));
    }
    Ok(Session {
        principal: caller.0.clone(),
        csrf: expected,
    })
}

// ---------- sign-in ----------

#[derive(Debug, Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

async fn login_page(q: Result<Query<LoginQuery>, QueryRejection>) -> Response {
    let started = Instant::now();
    let next = q.ok().and_then(|Query(q)| q.next);
    page(
        StatusCode::OK,
        pages::login(&safe_next(next.as_deref()), None),
        started,
    )
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

async fn login(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    let started = Instant::now();
    if let Err(e) = same_origin(&headers) {
        return error_page(None, &e, started);
    }
    let Ok(Form(form)) = form else {
        return page(
            StatusCode::BAD_REQUEST,
            pages::login("/ui", Some("token: missing; paste an API token")),
            started,
        );
    };
    let next = safe_next(form.next.as_deref());
    let token = form.token.trim();
    if token.is_empty() {
        return page(
            StatusCode::BAD_REQUEST,
            pages::login(&next, Some("token: must not be empty")),
            started,
        );
    }
    if let Err(e) = principal_for(&shared, token) {
        return page(
            StatusCode::UNAUTHORIZED,
            pages::login(&next, Some(&format!("token: {}", e.message))),
            started,
        );
    }
    let secure = headers
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .is_some_and(|o| o.starts_with("https://"));
    let cookie = format!(
        "{COOKIE}={token}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={SESSION_SECS}{}",
        if secure { "; Secure" } else { "" }
    );
    let mut r = see_other(&next);
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

#[derive(Debug, Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    headers: HeaderMap,
    caller: Result<Caller, ApiError>,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    let started = Instant::now();
    let csrf = form.map(|Form(f)| f.csrf).unwrap_or_default();
    // A session that is already gone (revoked token) may still sign out.
    if caller.is_ok() {
        if let Err(e) = check_form(&headers, &caller, &csrf) {
            return error_page(None, &e, started);
        }
    }
    let mut r = see_other("/ui/login");
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "tessera_session=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    r
}

// ---------- pages ----------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OverviewQuery {
    window: Option<String>,
}

async fn overview(
    State(shared): State<Arc<Shared>>,
    caller: Result<Caller, ApiError>,
    uri: Uri,
    headers: HeaderMap,
    q: Result<Query<OverviewQuery>, QueryRejection>,
) -> Response {
    let started = Instant::now();
    let caller = signed_in!(caller, uri);
    let s = session(&headers, &caller);
    let q = match query(q) {
        Ok(q) => q,
        Err(e) => return error_page(Some(&s), &e, started),
    };
    let window_ms = match q.window.as_deref() {
        None | Some("6h") => 6 * 3_600_000,
        Some("1h") => 3_600_000,
        Some(w) => {
            let e = ApiError::invalid("window", format!("`{w}` is not a window; use 1h or 6h"));
            return error_page(Some(&s), &e, started);
        }
    };
    let now = now_ms();
    let mut hist = shared.ui.history.since(now.saturating_sub(window_ms));
    let v = {
        let state = shared.state.lock().expect("state lock");
        let v = view::overview(&state, &caller.0, Vec::new(), window_ms, now);
        hist.push(v.current);
        v
    };
    let v = view::Overview { history: hist, ..v };
    page(StatusCode::OK, pages::overview(&s, &v), started)
}

async fn jobs(
    State(shared): State<Arc<Shared>>,
    caller: Result<Caller, ApiError>,
    uri: Uri,
    headers: HeaderMap,
    q: Result<Query<view::JobsQuery>, QueryRejection>,
) -> Response {
    let started = Instant::now();
    let caller = signed_in!(caller, uri);
    let s = session(&headers, &caller);
    let q = match query(q) {
        Ok(q) => q,
        Err(e) => return error_page(Some(&s), &e, started),
    };
    let v = {
        let state = shared.state.lock().expect("state lock");
        view::jobs(&state, &caller.0, q, now_ms())
    };
    match v {
        Ok(v) => page(StatusCode::OK, pages::jobs(&s, &v), started),
        Err((field, msg)) => {
            let status = if field == "team" {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::BAD_REQUEST
            };
            let e = ApiError::new(status, "invalid_field", msg).with_field(field);
            error_page(Some(&s), &e, started)
        }
    }
}

async fn new_job(caller: Result<Caller, ApiError>, uri: Uri, headers: HeaderMap) -> Response {
    let started = Instant::now();
    let caller = signed_in!(caller, uri);
    let s = session(&headers, &caller);
    page(
        StatusCode::OK,
        pages::new_job(&s, pages::EXAMPLE_SPEC, None),
        started,
    )
}

#[derive(Debug, Deserialize)]
struct SubmitForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    spec: String,
}

async fn submit(
    State(shared): State<Arc<Shared>>,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    form: Result<Form<SubmitForm>, FormRejection>,
) -> Response {
    let started = Instant::now();
    let form = match form {
        Ok(Form(f)) => f,
        Err(e) => {
            let e = ApiError::bad_request(format!("cannot read the form: {}", e.body_text()));
            return error_page(None, &e, started);
        }
    };
    let s = match check_form(&headers, &caller, &form.csrf) {
        Ok(s) => s,
        Err(e) => return error_page(None, &e, started),
    };
    let caller = Caller(s.principal.clone());
    let fail = |e: &ApiError| {
        page(
            e.status,
            pages::new_job(&s, &form.spec, Some((&e.message, e.field.as_deref()))),
            started,
        )
    };
    let spec = match JobSpec::parse(&form.spec) {
        Ok(spec) => spec,
        Err(e) => return fail(&ApiError::from(e)),
    };
    match crate::api::create_job(&shared, &caller, spec).await {
        Ok(job) => see_other(&format!("/ui/jobs/{}", job.id)),
        Err(e) => fail(&e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobQuery {
    replica: Option<u32>,
}

fn job_id(raw: &str) -> Result<tessera_core::JobId, ApiError> {
    raw.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            format!("`{raw}` is not a job id (a positive number)"),
        )
        .with_field("id")
    })
}

async fn job(
    State(shared): State<Arc<Shared>>,
    caller: Result<Caller, ApiError>,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
    q: Result<Query<JobQuery>, QueryRejection>,
) -> Response {
    let started = Instant::now();
    let caller = signed_in!(caller, uri);
    let s = session(&headers, &caller);
    let res = (|| {
        let q = query(q)?;
        let id = job_id(&id)?;
        let v = {
            let state = shared.state.lock().expect("state lock");
            view::job_page(&state, &caller.0, id, now_ms())?
        };
        let replica = q.replica.unwrap_or(0);
        if replica >= v.job.spec.replicas {
            return Err(ApiError::invalid(
                "replica",
                format!(
                    "job {id} has {} replica(s), numbered from 0",
                    v.job.spec.replicas
                ),
            ));
        }
        Ok(pages::job(&s, &v, replica))
    })();
    match res {
        Ok(html) => page(StatusCode::OK, html, started),
        Err(e) => error_page(Some(&s), &e, started),
    }
}

async fn cancel(
    State(shared): State<Arc<Shared>>,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    Path(id): Path<String>,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    let started = Instant::now();
    let csrf = form.map(|Form(f)| f.csrf).unwrap_or_default();
    let s = match check_form(&headers, &caller, &csrf) {
        Ok(s) => s,
        Err(e) => return error_page(None, &e, started),
    };
    let caller = Caller(s.principal.clone());
    match crate::api::cancel_job(State(shared), caller, Path(id.clone())).await {
        Ok(_) => see_other(&format!("/ui/jobs/{}", html::url_enc(&id))),
        Err(e) => error_page(Some(&s), &e, started),
    }
}

/// A replica's log, followed until the job ends: the API's own logs
/// handler, reached with the session cookie.
async fn logs(
    State(shared): State<Arc<Shared>>,
    caller: Result<Caller, ApiError>,
    Path(id): Path<String>,
    q: Result<Query<JobQuery>, QueryRejection>,
) -> Response {
    let caller = match caller {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let replica = match query(q) {
        Ok(q) => q.replica,
        Err(e) => return e.into_response(),
    };
    let q = crate::api::LogQuery {
        replica,
        attempt: None,
        follow: Some(true),
    };
    match crate::api::job_logs(State(shared), caller, Path(id), Ok(Query(q))).await {
        Ok(mut r) => {
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(e) => e.into_response(),
    }
}

async fn nodes(
    State(shared): State<Arc<Shared>>,
    caller: Result<Caller, ApiError>,
    uri: Uri,
    headers: HeaderMap,
    q: Result<Query<view::NodesQuery>, QueryRejection>,
) -> Response {
    let started = Instant::now();
    let caller = signed_in!(caller, uri);
    let s = session(&headers, &caller);
    let q = match query(q) {
        Ok(q) => q,
        Err(e) => return error_page(Some(&s), &e, started),
    };
    let v = {
        let state = shared.state.lock().expect("state lock");
        view::nodes(&state, &caller.0, q, now_ms())
    };
    page(StatusCode::OK, pages::nodes(&s, &v), started)
}

async fn node_action(
    State(shared): State<Arc<Shared>>,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    let started = Instant::now();
    let csrf = form.map(|Form(f)| f.csrf).unwrap_or_default();
    let s = match check_form(&headers, &caller, &csrf) {
        Ok(s) => s,
        Err(e) => return error_page(None, &e, started),
    };
    let caller = Caller(s.principal.clone());
    let path = Path(name);
    let res = match action.as_str() {
        "cordon" => crate::fleet::cordon(State(shared), caller, path).await,
        "uncordon" => crate::fleet::uncordon(State(shared), caller, path).await,
        "drain" => crate::fleet::drain(State(shared), caller, path, Ok(Bytes::new())).await,
        other => Err(ApiError::not_found(format!(
            "`{other}` is not a node action; use cordon, uncordon or drain"
        ))),
    };
    match res {
        Ok(_) => see_other("/ui/nodes"),
        Err(e) => error_page(Some(&s), &e, started),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TeamsQuery {
    period: Option<String>,
}

async fn teams(
    State(shared): State<Arc<Shared>>,
    caller: Result<Caller, ApiError>,
    uri: Uri,
    headers: HeaderMap,
    q: Result<Query<TeamsQuery>, QueryRejection>,
) -> Response {
    let started = Instant::now();
    let caller = signed_in!(caller, uri);
    let s = session(&headers, &caller);
    let period = match query(q) {
        Ok(q) => q.period.unwrap_or_else(|| "24h".into()),
        Err(e) => return error_page(Some(&s), &e, started),
    };
    let v = {
        let state = shared.state.lock().expect("state lock");
        view::teams(&state, &caller.0, &period, now_ms())
    };
    match v {
        Ok(v) => page(StatusCode::OK, pages::teams(&s, &v), started),
        Err((field, msg)) => {
            let e = ApiError::invalid(field, msg);
            error_page(Some(&s), &e, started)
        }
    }
}

async fn services(
    State(shared): State<Arc<Shared>>,
    caller: Result<Caller, ApiError>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let caller = signed_in!(caller, uri);
    let s = session(&headers, &caller);
    let list: Vec<tessera_core::service::Service> = {
        let state = shared.state.lock().expect("state lock");
        state
            .services
            .values()
            .filter(|svc| caller.0.can_read_team(&svc.template.team))
            .cloned()
            .collect()
    };
    let rows: Vec<_> = list
        .iter()
        .map(|svc| crate::service_api::summary(&shared, svc))
        .collect();
    page(StatusCode::OK, pages::services(&s, &rows), started)
}

async fn pools(
    State(shared): State<Arc<Shared>>,
    caller: Result<Caller, ApiError>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let caller = signed_in!(caller, uri);
    let s = session(&headers, &caller);
    let rows = crate::pools::views(&shared);
    page(StatusCode::OK, pages::pools(&s, &rows, now_ms()), started)
}

async fn datasets(
    State(shared): State<Arc<Shared>>,
    caller: Result<Caller, ApiError>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let caller = signed_in!(caller, uri);
    let s = session(&headers, &caller);
    // What `GET /v1/datasets` lists for this caller.
    let list = match &shared.lake {
        None => None,
        Some(lake) => match lake.list(&caller.0).await {
            Ok(list) => Some(list),
            Err(e) => return error_page(Some(&s), &ApiError::from(e), started),
        },
    };
    page(
        StatusCode::OK,
        pages::datasets(&s, list.as_deref(), now_ms()),
        started,
    )
}

async fn not_found(caller: Result<Caller, ApiError>, uri: Uri, headers: HeaderMap) -> Response {
    let started = Instant::now();
    let caller = signed_in!(caller, uri);
    let s = session(&headers, &caller);
    let e = ApiError::not_found(format!("no dashboard page at {}", uri.path()));
    error_page(Some(&s), &e, started)
}
