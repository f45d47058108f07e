//! The control plane in one process with a fake agent: the router is called
//! without a socket, the store is the in-memory fake, and the test plays the
//! agent by reading `ToAgent` and answering with `FromAgent`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{json, Value};
use tessera_core::auth::{Role, Team};
use tessera_core::node::{GpuInfo, Inventory, Node, NodeState};
use tessera_core::protocol::{ExitCause, FromAgent, ToAgent};
use tessera_server::state::ClusterState;
use tessera_server::{api, auth, control, Shared};
use tessera_store::{MemStore, Store};
use tokio::sync::mpsc;
use tower::ServiceExt;

struct World {
    shared: Arc<Shared>,
    token: String,
    to_agent: mpsc::UnboundedReceiver<ToAgent>,
    from_agent: mpsc::UnboundedSender<FromAgent>,
    store: Arc<MemStore>,
}

fn node(name: &str, cpu: u64, gpus: u32) -> Node {
    Node {
        inventory: Inventory {
            name: name.into(),
            cpu_milli: cpu * 1000,
            memory_bytes: 16 << 30,
            gpus: (0..gpus)
                .map(|i| GpuInfo {
                    index: i,
                    uuid: format!("GPU-{i}"),
                    model: "NVIDIA H100 80GB HBM3".into(),
                    memory_bytes: 80 << 30,
                    healthy: true,
                })
                .collect(),
            gpu_source: "test".into(),
            limits_enforced: false,
            limits_note: "test".into(),
            labels: BTreeMap::new(),
            agent_version: "test".into(),
        },
        prices: Default::default(),
        state: NodeState::Ready,
        registered_at: 0,
        last_heartbeat: 0,
        drain_deadline: None,
    }
}

fn world(nodes: &[Node]) -> World {
    let store = Arc::new(MemStore::new());
    let mut state = ClusterState::from_loaded(store.load().unwrap());
    state.teams.insert(
        "ml".into(),
        Team {
            name: "ml".into(),
            weight: 1.0,
            created_at: 0,
            quota: None,
        },
    );
    let (secret, rec) = auth::mint("t", "ml", Role::Member, 0);
    state.tokens.insert(rec.hash.clone(), rec);
    for n in nodes {
        state.nodes.insert(n.inventory.name.clone(), n.clone());
        state.connected.insert(n.inventory.name.clone());
    }
    let dir = std::env::temp_dir();
    let shared = Arc::new(Shared::new(
        store.clone(),
        state,
        dir,
        Duration::from_millis(100),
    ));
    let (tx, to_agent) = mpsc::unbounded_channel();
    for n in nodes {
        shared
            .agents
            .lock()
            .unwrap()
            .insert(n.inventory.name.clone(), tx.clone());
    }
    let (from_agent, rx) = mpsc::unbounded_channel();
    tokio::spawn(control::agent_events_loop(shared.clone(), rx));
    tokio::spawn(control::scheduling_loop(shared.clone()));
    World {
        shared,
        token: secret,
        to_agent,
        from_agent,
        store,
    }
}

impl World {
    async fn call(&self, method: &str, path: &str, body: Value) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {}", self.token))
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

    async fn submit(&self, spec: Value) -> u64 {
        let (s, job) = self.call("POST", "/v1/jobs", spec).await;
        assert_eq!(s, StatusCode::CREATED, "{job}");
        job["id"].as_u64().unwrap()
    }

    async fn next_command(&mut self) -> ToAgent {
        tokio::time::timeout(Duration::from_secs(5), self.to_agent.recv())
            .await
            .expect("a command")
            .unwrap()
    }

    async fn job(&self, id: u64) -> Value {
        self.call("GET", &format!("/v1/jobs/{id}"), Value::Null)
            .await
            .1
    }

    async fn wait_state(&self, id: u64, want: &str) -> Value {
        for _ in 0..200 {
            let j = self.job(id).await;
            if j["state"] == want {
                return j;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("job {id} never became {want}: {}", self.job(id).await);
    }

    fn started(&self, cmd: &ToAgent) {
        let ToAgent::Start(s) = cmd else {
            panic!("expected Start, got {cmd:?}")
        };
        self.from_agent
            .send(FromAgent::Started {
                key: s.key,
                pid: 100 + s.key.replica,
                at: 1,
            })
            .unwrap();
    }

    fn exited(&self, cmd: &ToAgent, code: i32, cause: ExitCause) {
        let key = match cmd {
            ToAgent::Start(s) => s.key,
            ToAgent::Stop { key, .. } => *key,
            other => panic!("no replica in {other:?}"),
        };
        self.from_agent
            .send(FromAgent::Exited {
                key,
                code: Some(code),
                signal: None,
                cause,
                at: 2,
                workdir: None,
            })
            .unwrap();
    }
}

#[tokio::test]
async fn a_job_is_placed_started_and_finished_and_stored() {
    let mut w = world(&[node("a", 4, 2)]);
    let id = w
        .submit(json!({"command": ["train"], "resources": {"cpu": 2, "gpu": 1}}))
        .await;
    let start = w.next_command().await;
    let ToAgent::Start(s) = &start else { panic!() };
    assert_eq!(s.gpus, vec![0]);
    assert_eq!(s.argv, vec!["train"]);
    w.wait_state(id, "scheduled").await;
    w.started(&start);
    w.wait_state(id, "running").await;
    w.exited(&start, 0, ExitCause::Exited);
    let job = w.wait_state(id, "succeeded").await;
    assert_eq!(job["exit_code"], 0);
    let stored = w.store.load().unwrap();
    assert_eq!(stored.jobs[0].state, tessera_core::JobState::Succeeded);
    let kinds: Vec<String> = stored.events.iter().map(|e| e.kind.clone()).collect();
    assert_eq!(kinds, ["submitted", "scheduled", "started", "succeeded"]);
}

#[tokio::test]
async fn a_failing_replica_stops_its_gang_and_the_job_fails_whole() {
    let mut w = world(&[node("a", 2, 0), node("b", 2, 0)]);
    let id = w
        .submit(json!({"command": ["x"], "replicas": 2, "resources": {"cpu": 2}}))
        .await;
    let s0 = w.next_command().await;
    let s1 = w.next_command().await;
    w.started(&s0);
    w.started(&s1);
    w.wait_state(id, "running").await;
    w.exited(&s1, 3, ExitCause::Exited);
    let stop = w.next_command().await;
    match (&stop, &s0) {
        (ToAgent::Stop { key, .. }, ToAgent::Start(s)) => assert_eq!(*key, s.key),
        other => panic!("expected a stop of the other replica: {other:?}"),
    }
    w.exited(&stop, 143, ExitCause::Stopped);
    let job = w.wait_state(id, "failed").await;
    assert_eq!(job["exit_code"], 3);
    assert!(
        job["reason"]
            .as_str()
            .unwrap()
            .contains("replica 1 exited with code 3"),
        "{job}"
    );
}

#[tokio::test]
async fn gangs_wait_whole_and_start_whole() {
    let mut w = world(&[node("a", 2, 0), node("b", 2, 0)]);
    let blocker = w
        .submit(json!({"command": ["x"], "resources": {"cpu": 2}}))
        .await;
    let b = w.next_command().await;
    w.started(&b);
    let gang = w
        .submit(json!({"command": ["y"], "replicas": 2, "resources": {"cpu": 2}}))
        .await;
    let job = w.wait_state(gang, "queued").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        w.to_agent.try_recv().is_err(),
        "no replica of the gang may start alone"
    );
    let job = if job["reason"].is_null() {
        w.job(gang).await
    } else {
        job
    };
    assert!(
        job["reason"].as_str().unwrap_or("").contains("gang of 2"),
        "{job}"
    );
    w.exited(&b, 0, ExitCause::Exited);
    w.wait_state(blocker, "succeeded").await;
    let a = w.next_command().await;
    let c = w.next_command().await;
    assert!(matches!((&a, &c), (ToAgent::Start(_), ToAgent::Start(_))));
}

#[tokio::test]
async fn cancel_of_a_running_job_stops_it_and_a_queued_one_ends_at_once() {
    let mut w = world(&[node("a", 1, 0)]);
    let running = w
        .submit(json!({"command": ["x"], "resources": {"cpu": 1}}))
        .await;
    let start = w.next_command().await;
    w.started(&start);
    w.wait_state(running, "running").await;
    let queued = w
        .submit(json!({"command": ["y"], "resources": {"cpu": 1}}))
        .await;
    let (s, job) = w
        .call("POST", &format!("/v1/jobs/{queued}/cancel"), json!({}))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(job["state"], "cancelled");
    let (s, job) = w
        .call("POST", &format!("/v1/jobs/{running}/cancel"), json!({}))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(job["cancel_requested"], true);
    let stop = w.next_command().await;
    assert!(matches!(stop, ToAgent::Stop { .. }));
    w.exited(&stop, 143, ExitCause::Stopped);
    w.wait_state(running, "cancelled").await;
    let (s, e) = w
        .call("POST", &format!("/v1/jobs/{running}/cancel"), json!({}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
}

#[tokio::test]
async fn failures_are_retried_per_policy_with_a_new_attempt() {
    let mut w = world(&[node("a", 1, 0)]);
    let id = w.submit(json!({"command": ["x"], "retries": 1})).await;
    let first = w.next_command().await;
    w.started(&first);
    w.exited(&first, 1, ExitCause::Exited);
    let second = w.next_command().await;
    let (ToAgent::Start(a), ToAgent::Start(b)) = (&first, &second) else {
        panic!()
    };
    assert_eq!((a.key.attempt, b.key.attempt), (1, 2));
    w.started(&second);
    w.exited(&second, 1, ExitCause::Exited);
    let job = w.wait_state(id, "failed").await;
    assert_eq!(job["failures"], 2);
    assert_eq!(job["attempt"], 2);
}

#[tokio::test]
async fn reports_about_an_old_attempt_are_ignored() {
    let mut w = world(&[node("a", 1, 0)]);
    let id = w.submit(json!({"command": ["x"], "retries": 1})).await;
    let first = w.next_command().await;
    w.started(&first);
    w.exited(&first, 1, ExitCause::Exited);
    let second = w.next_command().await;
    w.started(&second);
    w.wait_state(id, "running").await;
    // A late duplicate about attempt 1 changes nothing.
    w.exited(&first, 0, ExitCause::Exited);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(w.job(id).await["state"], "running");
}

#[tokio::test]
async fn a_higher_priority_job_preempts_and_the_victim_keeps_its_place() {
    let mut w = world(&[node("a", 2, 0)]);
    let low = w
        .submit(json!({"command": ["low"], "resources": {"cpu": 2}}))
        .await;
    let start = w.next_command().await;
    w.started(&start);
    w.wait_state(low, "running").await;
    let high = w
        .submit(json!({"command": ["high"], "priority": 10, "resources": {"cpu": 2}}))
        .await;
    let stop = w.next_command().await;
    match (&stop, &start) {
        (ToAgent::Stop { key, reason, .. }, ToAgent::Start(s)) => {
            assert_eq!(*key, s.key);
            assert!(reason.contains(&format!("job {high}")), "{reason}");
        }
        other => panic!("expected the low job to be stopped: {other:?}"),
    }
    w.exited(&stop, 143, ExitCause::Stopped);
    let job = w.wait_state(low, "queued").await;
    assert_eq!(job["preemptions"], 1);
    assert_eq!(job["failures"], 0, "a preemption is not a failure");
    let next = w.next_command().await;
    let ToAgent::Start(s) = &next else {
        panic!("{next:?}")
    };
    assert_eq!(s.key.job_id, high);
    w.started(&next);
    w.exited(&next, 0, ExitCause::Exited);
    w.wait_state(high, "succeeded").await;
    // The preempted job runs again, as attempt 2.
    let again = w.next_command().await;
    let ToAgent::Start(s) = &again else {
        panic!("{again:?}")
    };
    assert_eq!((s.key.job_id, s.key.attempt), (low, 2));
    let (_, events) = w
        .call("GET", &format!("/v1/jobs/{low}/events"), Value::Null)
        .await;
    let kinds: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"preempting") && kinds.contains(&"preempted"),
        "{kinds:?}"
    );
}

#[tokio::test]
async fn team_quotas_are_set_over_the_api_and_hold() {
    let mut w = world(&[node("a", 4, 0)]);
    // Only admins of the admin team change teams.
    let (s, _) = w
        .call(
            "PUT",
            "/v1/teams/ml",
            json!({"quota": {"cpu": {"limit": 2}}}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let admin = {
        let (secret, rec) = auth::mint("root", "admin", Role::Admin, 0);
        w.shared
            .state
            .lock()
            .unwrap()
            .tokens
            .insert(rec.hash.clone(), rec);
        secret
    };
    let member = std::mem::replace(&mut w.token, admin);
    let (s, e) = w
        .call(
            "PUT",
            "/v1/teams/ml",
            json!({"quota": {"gpu": {"guaranteed": 4, "limit": 2}}}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(e["error"]["field"], "quota.gpu.limit");
    let (s, e) = w
        .call(
            "PUT",
            "/v1/teams/ml",
            json!({"quota": {"cpu": {"guaranteed": "1", "limit": "2"}}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{e}");
    assert_eq!(e["quota"]["limit"]["cpu_milli"], 2000);
    w.token = member;
    let first = w
        .submit(json!({"command": ["x"], "resources": {"cpu": 2}}))
        .await;
    let start = w.next_command().await;
    w.started(&start);
    w.wait_state(first, "running").await;
    let second = w
        .submit(json!({"command": ["y"], "resources": {"cpu": 1}}))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let job = w.job(second).await;
    assert_eq!(job["state"], "queued");
    assert!(
        job["reason"].as_str().unwrap().contains("team quota"),
        "{job}"
    );
}

#[tokio::test]
async fn every_job_records_what_it_cost() {
    let mut priced = node("a", 4, 1);
    priced.prices = tessera_core::node::Prices {
        cpu_core_hour: 0.5,
        memory_gib_hour: 0.0,
        gpu_hour: 3.0,
    };
    let mut w = world(&[priced]);
    let id = w
        .submit(json!({"command": ["x"], "resources": {"cpu": 2, "gpu": 1, "memory": "1Gi"}}))
        .await;
    let start = w.next_command().await;
    // Started "long ago" (the fake agent reports at=1 ms): the cost covers
    // the time until the exit is handled.
    w.started(&start);
    w.exited(&start, 0, ExitCause::Exited);
    let job = w.wait_state(id, "succeeded").await;
    let hours = (job["finished_at"].as_u64().unwrap() - 1) as f64 / 3_600_000.0;
    let want = hours * (2.0 * 0.5 + 3.0);
    let cost = job["cost"].as_f64().unwrap();
    assert!(
        (cost - want).abs() / want < 1e-6,
        "cost {cost}, want {want}"
    );
}
