//! Accounting through the control plane in one process: the router called
//! without a socket, the in-memory store, and the test playing the agent.
//! Retried attempts are recorded and counted, the usage API scopes members
//! to their team and names bad fields, and nodes are priced at the control
//! plane's rate when they register.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{json, Value};
use tessera_core::auth::{Role, Team};
use tessera_core::node::{Inventory, Node, NodeState, Prices};
use tessera_core::protocol::{ExitCause, FromAgent, ToAgent};
use tessera_server::state::ClusterState;
use tessera_server::{api, auth, control, Shared};
use tessera_store::{MemStore, Store};
use tokio::sync::mpsc;
use tower::ServiceExt;

const PRICES: Prices = Prices {
    cpu_core_hour: 0.5,
    memory_gib_hour: 0.25,
    gpu_hour: 0.0,
};

fn inventory(name: &str) -> Inventory {
    Inventory {
        name: name.into(),
        cpu_milli: 4000,
        memory_bytes: 16 << 30,
        gpus: vec![],
        gpu_source: "test".into(),
        limits_enforced: false,
        limits_note: "test".into(),
        labels: BTreeMap::from([("pool".to_string(), "lab".to_string())]),
        agent_version: "test".into(),
    }
}

struct World {
    shared: Arc<Shared>,
    tokens: BTreeMap<&'static str, String>,
    to_agent: mpsc::UnboundedReceiver<ToAgent>,
    from_agent: mpsc::UnboundedSender<FromAgent>,
}

fn world() -> World {
    let store = Arc::new(MemStore::new());
    let mut state = ClusterState::from_loaded(store.load().unwrap());
    let mut tokens = BTreeMap::new();
    for (team, role, who) in [
        ("admin", Role::Admin, "admin"),
        ("ml", Role::Member, "ml"),
        ("ads", Role::Viewer, "ads-viewer"),
    ] {
        state.teams.insert(
            team.into(),
            Team {
                name: team.into(),
                weight: 1.0,
                created_at: 0,
                quota: None,
            },
        );
        let (secret, rec) = auth::mint(who, team, role, 0);
        state.tokens.insert(rec.hash.clone(), rec);
        tokens.insert(who, secret);
    }
    let node = Node {
        inventory: inventory("a"),
        prices: PRICES,
        state: NodeState::Ready,
        registered_at: 0,
        last_heartbeat: 0,
        drain_deadline: None,
    };
    state.nodes.insert("a".into(), node);
    state.connected.insert("a".into());
    let mut shared = Shared::new(
        store,
        state,
        std::env::temp_dir(),
        Duration::from_millis(100),
    );
    shared.prices = PRICES;
    let shared = Arc::new(shared);
    let (tx, to_agent) = mpsc::unbounded_channel();
    shared.agents.lock().unwrap().insert("a".into(), tx);
    let (from_agent, rx) = mpsc::unbounded_channel();
    tokio::spawn(control::agent_events_loop(shared.clone(), rx));
    tokio::spawn(control::scheduling_loop(shared.clone()));
    World {
        shared,
        tokens,
        to_agent,
        from_agent,
    }
}

impl World {
    async fn call(&self, who: &str, method: &str, path: &str, body: Value) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {}", self.tokens[who]))
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = api::router(self.shared.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn next_start(&mut self) -> tessera_core::protocol::ReplicaKey {
        let cmd = tokio::time::timeout(Duration::from_secs(5), self.to_agent.recv())
            .await
            .expect("a command")
            .unwrap();
        let ToAgent::Start(s) = cmd else {
            panic!("expected Start, got {cmd:?}")
        };
        s.key
    }

    async fn job(&self, id: u64) -> Value {
        self.call("admin", "GET", &format!("/v1/jobs/{id}"), Value::Null)
            .await
            .1
    }

    async fn wait_state(&self, id: u64, want: &str) -> Value {
        for _ in 0..300 {
            let j = self.job(id).await;
            if j["state"] == want {
                return j;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("job {id} never became {want}: {}", self.job(id).await);
    }

    /// Runs one attempt of a replica: started `ms` before now, then exits.
    async fn run_attempt(&mut self, ms: u64, code: i32) {
        let key = self.next_start().await;
        let now = tessera_server::now_ms();
        self.from_agent
            .send(FromAgent::Started {
                key,
                pid: 100,
                at: now - ms,
            })
            .unwrap();
        self.from_agent
            .send(FromAgent::Exited {
                key,
                code: Some(code),
                signal: None,
                cause: ExitCause::Exited,
                at: now,
                workdir: None,
            })
            .unwrap();
    }
}

#[tokio::test]
async fn every_attempt_of_a_retried_job_is_recorded_and_counted() {
    let mut w = world();
    let (s, job) = w
        .call(
            "ml",
            "POST",
            "/v1/jobs",
            json!({"command": ["x"], "resources": {"cpu": 2, "memory": "4Gi"},
                   "retries": {"on_failure": 1}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{job}");
    let id = job["id"].as_u64().unwrap();
    // Two attempts of an hour each: one fails, one succeeds.
    w.run_attempt(3_600_000, 1).await;
    w.run_attempt(3_600_000, 0).await;
    let job = w.wait_state(id, "succeeded").await;
    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{job}");
    assert_eq!(attempts[0]["outcome"], "requeued");
    assert_eq!(attempts[1]["outcome"], "succeeded");
    assert_eq!(attempts[0]["nodes"][0]["pool"], "lab");
    assert_eq!(attempts[0]["nodes"][0]["prices"]["cpu_core_hour"], 0.5);

    let (s, r) = w
        .call("ml", "GET", "/v1/usage?by=job&since=1d", Value::Null)
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let row = &r["rows"][0];
    assert_eq!(row["job_id"], id);
    assert_eq!(row["attempts"], 2);
    // Two hours of 2 cores and 4 GiB: 4 core-hours, 8 GiB-hours, and a cost
    // of 4 × 0.5 + 8 × 0.25 = 4 — the same as the job recorded.
    let near = |v: &Value, want: f64| (v.as_f64().unwrap() - want).abs() < 0.01;
    assert!(near(&row["cpu_hours"], 4.0), "{row}");
    assert!(near(&row["memory_gib_hours"], 8.0), "{row}");
    assert!(near(&row["cost"], 4.0), "{row}");
    assert!(
        near(&row["cost"], job["cost"].as_f64().unwrap()),
        "{row} {job}"
    );
    let (_, by_pool) = w
        .call("ml", "GET", "/v1/usage?by=pool&since=1d", Value::Null)
        .await;
    assert_eq!(by_pool["rows"][0]["pool"], "lab", "{by_pool}");
    assert!(near(&by_pool["total"]["cost"], 4.0), "{by_pool}");
}

#[tokio::test]
async fn the_usage_api_scopes_members_to_their_team_and_names_bad_fields() {
    let w = world();
    // An admin sees every team; a member or viewer only their own.
    let (s, r) = w.call("admin", "GET", "/v1/usage", Value::Null).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let teams: Vec<&str> = r["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["team"].as_str().unwrap())
        .collect();
    assert_eq!(teams, ["admin", "ads", "ml"]);
    assert!(r["team"].is_null());
    let (s, r) = w.call("ads-viewer", "GET", "/v1/usage", Value::Null).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["team"], "ads");
    assert_eq!(r["rows"].as_array().unwrap().len(), 1);
    let (s, r) = w.call("ml", "GET", "/v1/usage?team=ads", Value::Null).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{r}");
    let (s, r) = w
        .call("admin", "GET", "/v1/usage?team=nope", Value::Null)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{r}");
    assert_eq!(r["error"]["field"], "team");
    for (query, field) in [
        ("by=node", "by"),
        ("since=2026-13-01", "since"),
        ("until=tomorrow", "until"),
        ("since=1h&until=2h", "until"),
    ] {
        let (s, r) = w
            .call("admin", "GET", &format!("/v1/usage?{query}"), Value::Null)
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{query}: {r}");
        assert_eq!(r["error"]["field"], field, "{query}: {r}");
    }
    let (s, r) = w
        .call("admin", "GET", "/v1/usage?group=team", Value::Null)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("group"));
    let (_, doc) = w
        .call("admin", "GET", "/v1/openapi.json", Value::Null)
        .await;
    assert!(doc["paths"]["/v1/usage"]["get"].is_object());
}

#[tokio::test]
async fn nodes_are_priced_at_the_control_planes_rate_when_they_register() {
    let w = world();
    // A new node, and one an earlier run knew at another price.
    w.shared.state.lock().unwrap().nodes.insert(
        "old".into(),
        Node {
            inventory: inventory("old"),
            prices: Prices::default(),
            state: NodeState::Lost,
            registered_at: 0,
            last_heartbeat: 0,
            drain_deadline: None,
        },
    );
    for name in ["new", "old"] {
        w.from_agent
            .send(FromAgent::Register(inventory(name)))
            .unwrap();
    }
    for _ in 0..300 {
        let priced = {
            let state = w.shared.state.lock().unwrap();
            ["new", "old"]
                .iter()
                .all(|n| state.nodes.get(*n).is_some_and(|n| n.prices == PRICES))
        };
        if priced {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("nodes were not priced at the control plane's rate");
}
