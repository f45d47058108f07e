//! The dashboard through its router, without a socket: sign-in, what each
//! role sees, escaping, form tokens and origins, buttons that change state.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use tessera_core::auth::Role;
use tessera_core::node::NodeState;
use tessera_core::JobState;
use tower::ServiceExt;

use super::bench::{synthetic, Tokens};
use super::csrf_for;
use crate::{now_ms, Shared};

struct Fx {
    shared: Arc<Shared>,
    router: Router,
    tokens: Tokens,
    viewer: String,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fx {
    let now = now_ms();
    let (mut state, tokens) = synthetic(6, 300, now);
    let (viewer, rec) = crate::auth::mint("viewer", "team-3", Role::Viewer, now);
    state.tokens.insert(rec.hash.clone(), rec);
    let dir = tempfile::tempdir().unwrap();
    let shared = Arc::new(Shared::new(
        Arc::new(tessera_store::MemStore::new()),
        state,
        dir.path().to_path_buf(),
        Duration::from_secs(1),
    ));
    Fx {
        router: crate::api::router(shared.clone()),
        shared,
        tokens,
        viewer,
        _dir: dir,
    }
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Fx {
    async fn call(&self, req: Request<Body>) -> Resp {
        let r = self.router.clone().oneshot(req).await.unwrap();
        let status = r.status();
        let headers = r.headers().clone();
        let body = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        Resp {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Resp {
        let mut b = Request::get(path).header(header::HOST, "localhost");
        if let Some(t) = token {
            b = b.header(header::COOKIE, format!("other=1; tessera_session={t}"));
        }
        self.call(b.body(Body::empty()).unwrap()).await
    }

    async fn post(&self, path: &str, token: Option<&str>, origin: &str, form: &str) -> Resp {
        let mut b = Request::post(path)
            .header(header::HOST, "localhost")
            .header(header::ORIGIN, origin)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(t) = token {
            b = b.header(header::COOKIE, format!("tessera_session={t}"));
        }
        self.call(b.body(Body::from(form.to_string())).unwrap())
            .await
    }

    fn job_of_team(&self, team: &str, state: JobState) -> u64 {
        let s = self.shared.state.lock().unwrap();
        s.jobs
            .values()
            .find(|j| j.team() == team && j.state == state)
            .map(|j| j.id)
            .unwrap()
    }
}

const HERE: &str = "http://localhost";

#[tokio::test]
async fn pages_redirect_to_sign_in_and_back() {
    let fx = fixture();
    let r = fx.get("/ui/jobs?state=queued", None).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(
        r.headers[header::LOCATION],
        "/ui/login?next=%2Fui%2Fjobs%3Fstate%3Dqueued"
    );
    let r = fx.get("/ui/login?next=/ui/jobs", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.contains("name=\"next\" value=\"/ui/jobs\""));
    // No open redirect through `next`.
    let r = fx
        .post(
            "/ui/login",
            None,
            HERE,
            &format!("token={}&next=%2F%2Fevil.example", fx.tokens.admin),
        )
        .await;
    assert_eq!(r.headers[header::LOCATION], "/ui");
}

#[tokio::test]
async fn sign_in_sets_a_strict_http_only_cookie_for_ui_only() {
    let fx = fixture();
    let r = fx
        .post("/ui/login", None, HERE, "token=tsr_nope&next=%2Fui%2Fnodes")
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        r.body.contains("token: unknown or revoked token"),
        "{}",
        r.body
    );
    assert!(r.headers.get(header::SET_COOKIE).is_none());

    let r = fx
        .post(
            "/ui/login",
            None,
            HERE,
            &format!("token={}&next=%2Fui%2Fnodes", fx.tokens.member),
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.headers[header::LOCATION], "/ui/nodes");
    let cookie = r.headers[header::SET_COOKIE].to_str().unwrap();
    assert!(cookie.starts_with(&format!("tessera_session={};", fx.tokens.member)));
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    // The cookie opens pages...
    let r = fx.get("/ui/nodes", Some(&fx.tokens.member)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .contains("default-src 'none'"));
    assert!(r.headers.contains_key("server-timing"));
    // ...but never the API.
    let r = fx.get("/v1/jobs", Some(&fx.tokens.member)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // A sign-in from another site is refused.
    let r = fx
        .post(
            "/ui/login",
            None,
            "http://evil.example",
            &format!("token={}", fx.tokens.member),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.headers.get(header::SET_COOKIE).is_none());
}

#[tokio::test]
async fn a_member_sees_only_its_team_as_the_api_does() {
    let fx = fixture();
    let m = fx.tokens.member.clone();
    let r = fx.get("/ui/jobs", Some(&m)).await;
    assert_eq!(r.status, StatusCode::OK);
    let teams: std::collections::BTreeSet<&str> = r
        .body
        .split("<tr data-job=")
        .skip(1)
        .filter_map(|row| row.split("</a></td><td>").nth(2))
        .filter_map(|cell| cell.split("</td>").next())
        .collect();
    assert_eq!(teams.into_iter().collect::<Vec<_>>(), vec!["team-3"]);
    // Another team's job and job list: refused, as the API refuses them.
    let other = fx.job_of_team("team-1", JobState::Succeeded);
    let r = fx.get(&format!("/ui/jobs/{other}"), Some(&m)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.body.contains("cannot see team `team-1`"));
    let r = fx.get("/ui/jobs?team=team-1", Some(&m)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // Teams page: its own team only. Admin: all nine.
    let r = fx.get("/ui/teams", Some(&m)).await;
    assert_eq!(r.body.matches("<tr data-team=").count(), 1);
    let r = fx.get("/ui/teams?period=7d", Some(&fx.tokens.admin)).await;
    assert_eq!(r.body.matches("<tr data-team=").count(), 9);
    let r = fx.get("/ui/teams?period=2d", Some(&fx.tokens.admin)).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body.contains("period: `2d` is not a period"));
    // Overview queue: only its own team.
    let r = fx.get("/ui", Some(&m)).await;
    let queues = r.body.split("id=\"queues\"").nth(1).unwrap();
    assert!(queues.contains("team-3") && !queues.contains("team-1"));
    // No admin buttons on the Nodes page for a member; a viewer gets no
    // submit button.
    assert!(!fx
        .get("/ui/nodes", Some(&m))
        .await
        .body
        .contains("/cordon\""));
    assert!(fx
        .get("/ui/nodes", Some(&fx.tokens.admin))
        .await
        .body
        .contains("/cordon\""));
    assert!(!fx
        .get("/ui/jobs", Some(&fx.viewer))
        .await
        .body
        .contains("id=\"new-job\""));
}

#[tokio::test]
async fn everything_rendered_is_escaped() {
    let fx = fixture();
    let admin = fx.tokens.admin.clone();
    let s = session_form(&admin);
    let spec = "name: esc\nteam: team-3\nscript: echo '<script>alert(1)</script>'\nenv: {X: '\"><img src=x>'}\n";
    let r = fx
        .post(
            "/ui/jobs",
            Some(&admin),
            HERE,
            &format!("{s}&spec={}", super::html::url_enc(spec)),
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let loc = r.headers[header::LOCATION].to_str().unwrap().to_string();
    let r = fx.get(&loc, Some(&admin)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!r.body.contains("<script>alert"));
    assert!(!r.body.contains("<img src=x>"));
    assert!(r.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(r.body.contains("&quot;&gt;&lt;img src=x&gt;"));
}

fn session_form(secret: &str) -> String {
    format!("csrf={}", csrf_for(secret))
}

#[tokio::test]
async fn forms_need_the_session_token_and_this_origin() {
    let fx = fixture();
    let m = fx.tokens.member.clone();
    let id = fx.job_of_team("team-3", JobState::Queued);
    let path = format!("/ui/jobs/{id}/cancel");
    // Without the form token, with another session's, or from another
    // site: refused, and the job is untouched.
    for (origin, form) in [
        (HERE, String::new()),
        (HERE, session_form(&fx.tokens.admin)),
        ("http://evil.example", session_form(&m)),
    ] {
        let r = fx.post(&path, Some(&m), origin, &form).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{origin} {form}");
        assert_eq!(
            fx.shared.state.lock().unwrap().jobs[&id].state,
            JobState::Queued
        );
    }
    // A viewer may not cancel: the API's rule, the API's words.
    let r = fx
        .post(&path, Some(&fx.viewer), HERE, &session_form(&fx.viewer))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.body.contains("role `viewer`"), "{}", r.body);
    // The member, from its page: cancelled.
    let r = fx.post(&path, Some(&m), HERE, &session_form(&m)).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(
        fx.shared.state.lock().unwrap().jobs[&id].state,
        JobState::Cancelled
    );
    // Signing out clears the cookie.
    let r = fx
        .post("/ui/logout", Some(&m), HERE, &session_form(&m))
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert!(r.headers[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
}

#[tokio::test]
async fn admins_cordon_and_drain_from_the_nodes_page() {
    let fx = fixture();
    let a = fx.tokens.admin.clone();
    let m = fx.tokens.member.clone();
    let r = fx
        .post(
            "/ui/nodes/node-0001/cordon",
            Some(&m),
            HERE,
            &session_form(&m),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.body.contains("needs an admin token"));
    let state_of = |n: &str| fx.shared.state.lock().unwrap().nodes[n].state;
    assert_eq!(state_of("node-0001"), NodeState::Ready);
    for (action, want) in [
        ("cordon", NodeState::Cordoned),
        ("uncordon", NodeState::Ready),
        ("drain", NodeState::Draining),
    ] {
        let r = fx
            .post(
                &format!("/ui/nodes/node-0001/{action}"),
                Some(&a),
                HERE,
                &session_form(&a),
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{action}: {}", r.body);
        assert_eq!(state_of("node-0001"), want);
    }
    let r = fx.get("/ui/nodes?state=draining", Some(&a)).await;
    assert!(r.body.contains("data-node=\"node-0001\""));
    let r = fx
        .post(
            "/ui/nodes/node-0001/reboot",
            Some(&a),
            HERE,
            &session_form(&a),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_bad_spec_names_its_field_and_creates_nothing() {
    let fx = fixture();
    let m = fx.tokens.member.clone();
    let before = fx.shared.state.lock().unwrap().jobs.len();
    let spec = "name: x\ncommand: [true]\nresources: {memory: lots}\n";
    let r = fx
        .post(
            "/ui/jobs",
            Some(&m),
            HERE,
            &format!("{}&spec={}", session_form(&m), super::html::url_enc(spec)),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.body.contains("<code>resources.memory</code>"),
        "{}",
        r.body
    );
    // The spec is kept in the form for fixing.
    assert!(r.body.contains("memory: lots"));
    let spec = "name: x\ncommand: [true]\nresources: {gpu: 64}\n";
    let r = fx
        .post(
            "/ui/jobs",
            Some(&m),
            HERE,
            &format!("{}&spec={}", session_form(&m), super::html::url_enc(spec)),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body.contains("fits no node"));
    assert_eq!(fx.shared.state.lock().unwrap().jobs.len(), before);
}

#[tokio::test]
async fn jobs_page_filters_and_pages() {
    let fx = fixture();
    let a = fx.tokens.admin.clone();
    let r = fx.get("/ui/jobs", Some(&a)).await;
    assert_eq!(r.body.matches("<tr data-job=").count(), 50);
    assert!(r.body.contains("300 jobs match"));
    // The newest first; the next page continues below the last id shown.
    assert!(r.body.contains("<tr data-job=\"300\">"));
    assert!(r.body.contains("href=\"/ui/jobs?before=251\""));
    let r = fx.get("/ui/jobs?before=251", Some(&a)).await;
    assert!(r.body.contains("<tr data-job=\"250\">"));
    assert!(!r.body.contains("<tr data-job=\"251\">"));
    let r = fx.get("/ui/jobs?state=queued&team=team-3", Some(&a)).await;
    let n = {
        let s = fx.shared.state.lock().unwrap();
        s.jobs
            .values()
            .filter(|j| j.state == JobState::Queued && j.team() == "team-3")
            .count()
    };
    assert_eq!(r.body.matches("<tr data-job=").count(), n);
    let r = fx.get("/ui/jobs?state=sleeping", Some(&a)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body.contains("state: `sleeping` is not a job state"));
    let r = fx.get("/ui/jobs?colour=red", Some(&a)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body.contains("colour"));
    // Pool filter: only jobs placed in that pool.
    let r = fx
        .get("/ui/jobs?pool=dc-west&state=running", Some(&a))
        .await;
    let west: Vec<String> = (0..6)
        .filter(|n| n % 2 == 1)
        .map(|n| format!("node-{n:04}"))
        .collect();
    let rows: Vec<&str> = r.body.split("<tr data-job=").skip(1).collect();
    assert!(!rows.is_empty());
    assert!(rows.iter().all(|row| west.iter().any(|w| row.contains(w))));
}

#[tokio::test]
async fn job_page_shows_reason_placement_events_and_log_source() {
    let fx = fixture();
    let a = fx.tokens.admin.clone();
    let q = fx.job_of_team("team-3", JobState::Queued);
    let r = fx.get(&format!("/ui/jobs/{q}"), Some(&a)).await;
    assert!(r.body.contains("Why it waits"));
    assert!(r.body.contains("2 nodes have 8 free GPUs"));
    assert!(r.body.contains(&format!(
        "data-src=\"/ui/jobs/{q}/logs?replica=0\" data-active=\"true\""
    )));
    // Two replicas: a log per replica.
    assert!(r.body.contains(&format!("/ui/jobs/{q}?replica=1")));
    let r = fx.get(&format!("/ui/jobs/{q}?replica=2"), Some(&a)).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let done = fx.job_of_team("team-3", JobState::Succeeded);
    let r = fx.get(&format!("/ui/jobs/{done}"), Some(&a)).await;
    assert!(r.body.contains("id=\"job-exit\">0<"));
    assert!(r.body.contains("<span class=\"kind\">succeeded</span>"));
    assert!(r.body.contains("NVIDIA"));
    let r = fx.get("/ui/jobs/abc", Some(&a)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = fx.get("/ui/jobs/99999", Some(&a)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn overview_draws_its_charts() {
    let fx = fixture();
    let a = fx.tokens.admin.clone();
    let r = fx.get("/ui?window=1h", Some(&a)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.contains("id=\"util-chart\""));
    assert!(r.body.contains("class=\"ln gpu\"") || r.body.contains("class=\"dot gpu\""));
    assert!(r.body.contains("id=\"rate-chart\""));
    // Capacity rows per pool and model.
    let cap = r.body.split("id=\"capacity\"").nth(1).unwrap();
    assert!(cap.contains("dc-east") && cap.contains("dc-west"));
    assert!(cap.contains("NVIDIA H100 80GB HBM3"));
    let r = fx.get("/ui?window=3d", Some(&a)).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn bench_builds_and_times_every_page() {
    let r = super::bench::run(20, 2_000, 1).await.unwrap();
    assert_eq!(r.pages.len(), 14);
    assert!(r.pages.iter().all(|p| p.bytes > 1000));
    let t = super::bench::table(&r);
    assert!(t.contains("Overview"));
}

/// An engine that only reports capacity (the Pools page reads nothing else).
struct IdleEngine;

#[async_trait::async_trait]
impl tessera_pools::PoolDriver for IdleEngine {
    fn kind(&self) -> &'static str {
        "slurm"
    }
    async fn submit(
        &self,
        _: &tessera_pools::PoolJob,
    ) -> Result<tessera_pools::RemoteId, tessera_pools::PoolError> {
        Err(tessera_pools::PoolError::Rejected("idle".into()))
    }
    async fn status(
        &self,
        _: &[tessera_pools::RemoteId],
    ) -> Result<
        std::collections::HashMap<tessera_pools::RemoteId, tessera_pools::RemoteState>,
        tessera_pools::PoolError,
    > {
        Ok(Default::default())
    }
    async fn cancel(&self, _: &tessera_pools::RemoteId) -> Result<(), tessera_pools::PoolError> {
        Ok(())
    }
    async fn logs(
        &self,
        _: &tessera_pools::RemoteId,
        _: u64,
    ) -> Result<tessera_pools::LogChunk, tessera_pools::PoolError> {
        Ok(Default::default())
    }
    async fn capacity(&self) -> Result<tessera_pools::Capacity, tessera_pools::PoolError> {
        Ok(tessera_pools::Capacity {
            nodes: 3,
            cpu_milli: 96_000,
            memory_bytes: 384 << 30,
            largest_node: (32_000, 128 << 30, 0),
            ..Default::default()
        })
    }
}

#[tokio::test]
async fn pools_and_datasets_pages_list_what_the_api_lists() {
    let fx = fixture();
    let a = fx.tokens.admin.clone();
    let r = fx.get("/ui/pools", Some(&a)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.contains("No pools."), "{}", r.body);
    assert!(r.body.contains("href=\"/ui/datasets\""));
    let config = crate::pools::PoolConfig {
        name: "hpc".into(),
        kind: "slurm".into(),
        options: Default::default(),
        prices: Default::default(),
        labels: Default::default(),
        created_at: now_ms(),
        key_prefix: "t1".into(),
    };
    crate::pools::register(&fx.shared, config, Arc::new(IdleEngine))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = fx.get("/ui/pools", Some(&a)).await;
        let row = r.body.split("data-pool=\"hpc\"").nth(1).unwrap_or("");
        if row.contains("96 / 96") || row.contains(">3<") {
            assert!(row.contains("slurm"), "{row}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pool's capacity never showed: {row}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // This server has no lake: the page says so instead of failing.
    let r = fx.get("/ui/datasets", Some(&fx.viewer)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.contains("without a data lake"), "{}", r.body);
    // Signed out: to the sign-in page, as every page.
    assert_eq!(
        fx.get("/ui/pools", None).await.status,
        StatusCode::SEE_OTHER
    );
}
