//! The pool task in one process, against an in-memory engine behind the
//! `PoolDriver` trait. The real Slurm is exercised in
//! `tessera-pools/tests/slurm.rs` and the black-box `tessera-cli/tests/pools.rs`;
//! this fake is for what a real single-node Slurm here cannot be made to do
//! on demand: a node failure, an out-of-memory kill (no cgroup plugin here),
//! an engine that stops answering. It also counts calls, to show that the
//! status of all of a pool's jobs is one call.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{json, Value};
use tessera_core::auth::{Role, Team};
use tessera_pools::{
    Capacity, Failure, LogChunk, PoolDriver, PoolError, PoolJob, RemoteId, RemoteState,
};
use tessera_server::pools::{register, PoolConfig};
use tessera_server::state::ClusterState;
use tessera_server::{api, auth, Shared};
use tessera_store::{MemStore, Store};
use tower::ServiceExt;

#[derive(Default)]
struct Engine {
    jobs: Mutex<BTreeMap<RemoteId, (PoolJob, RemoteState)>>,
    down: AtomicBool,
    next: AtomicU32,
    /// Ids asked for in each status call.
    status_calls: Mutex<Vec<usize>>,
    cancels: Mutex<Vec<RemoteId>>,
}

struct Fake(Arc<Engine>);

impl Engine {
    fn check(&self) -> Result<(), PoolError> {
        if self.down.load(Ordering::SeqCst) {
            Err(PoolError::Unavailable("connection refused".into()))
        } else {
            Ok(())
        }
    }

    fn by_key(&self, key: &str) -> Option<(RemoteId, PoolJob)> {
        self.jobs
            .lock()
            .unwrap()
            .iter()
            .find(|(_, (j, _))| j.key == key)
            .map(|(id, (j, _))| (id.clone(), j.clone()))
    }

    fn set(&self, key: &str, s: RemoteState) {
        let (id, _) = self.by_key(key).expect("submitted");
        self.jobs.lock().unwrap().get_mut(&id).unwrap().1 = s;
    }

    fn submitted(&self) -> Vec<PoolJob> {
        self.jobs
            .lock()
            .unwrap()
            .values()
            .map(|(j, _)| j.clone())
            .collect()
    }
}

#[async_trait]
impl PoolDriver for Fake {
    fn kind(&self) -> &'static str {
        "fake"
    }

    async fn submit(&self, job: &PoolJob) -> Result<RemoteId, PoolError> {
        self.0.check()?;
        if let Some((id, _)) = self.0.by_key(&job.key) {
            return Ok(id);
        }
        if job.argv.first().map(String::as_str) == Some("refuse-me") {
            return Err(PoolError::Rejected("partition limits: too long".into()));
        }
        let id = RemoteId(format!(
            "{}",
            100 + self.0.next.fetch_add(1, Ordering::SeqCst)
        ));
        self.0.jobs.lock().unwrap().insert(
            id.clone(),
            (job.clone(), RemoteState::Queued { reason: None }),
        );
        Ok(id)
    }

    async fn status(&self, ids: &[RemoteId]) -> Result<HashMap<RemoteId, RemoteState>, PoolError> {
        self.0.check()?;
        self.0.status_calls.lock().unwrap().push(ids.len());
        let jobs = self.0.jobs.lock().unwrap();
        Ok(ids
            .iter()
            .map(|id| {
                (
                    id.clone(),
                    jobs.get(id)
                        .map(|(_, s)| s.clone())
                        .unwrap_or(RemoteState::NotFound),
                )
            })
            .collect())
    }

    async fn cancel(&self, id: &RemoteId) -> Result<(), PoolError> {
        self.0.check()?;
        self.0.cancels.lock().unwrap().push(id.clone());
        if let Some(j) = self.0.jobs.lock().unwrap().get_mut(id) {
            j.1 = RemoteState::Cancelled;
        }
        Ok(())
    }

    async fn logs(&self, id: &RemoteId, offset: u64) -> Result<LogChunk, PoolError> {
        let text = format!("output of {id}\n");
        let data = text.as_bytes()[(offset as usize).min(text.len())..].to_vec();
        Ok(LogChunk {
            next_offset: offset + data.len() as u64,
            complete: data.is_empty(),
            data,
        })
    }

    async fn capacity(&self) -> Result<Capacity, PoolError> {
        self.0.check()?;
        Ok(Capacity {
            nodes: 2,
            cpu_milli: 8000,
            memory_bytes: 32 << 30,
            largest_node: (4000, 16 << 30, 0),
            ..Capacity::default()
        })
    }
}

struct World {
    shared: Arc<Shared>,
    engine: Arc<Engine>,
    token: String,
    _home: tempfile::TempDir,
}

async fn world() -> World {
    world_with(&[]).await
}

/// A world whose pool has these options.
async fn world_with(options: &[(&str, &str)]) -> World {
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
    let home = tempfile::tempdir().unwrap();
    let shared = Arc::new(Shared::new(
        store,
        state,
        home.path().to_path_buf(),
        Duration::from_millis(100),
    ));
    shared.spawn_loops();
    let engine = Arc::new(Engine::default());
    let config = PoolConfig {
        name: "hpc".into(),
        kind: "fake".into(),
        options: options
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        prices: tessera_core::node::Prices {
            cpu_core_hour: 3600.0,
            ..Default::default()
        },
        labels: BTreeMap::new(),
        created_at: 0,
        key_prefix: "t1".into(),
    };
    register(&shared, config, Arc::new(Fake(engine.clone())))
        .await
        .unwrap();
    World {
        shared,
        engine,
        token: secret,
        _home: home,
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

    async fn job(&self, id: u64) -> Value {
        self.call("GET", &format!("/v1/jobs/{id}"), Value::Null)
            .await
            .1
    }

    async fn wait(&self, id: u64, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let j = self.job(id).await;
            if f(&j) {
                return j;
            }
            assert!(Instant::now() < deadline, "job {id} never {what}: {j:#}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn wait_state(&self, id: u64, state: &str) -> Value {
        self.wait(id, state, |j| j["state"] == state).await
    }

    async fn wait_submitted(&self, key: &str) -> PoolJob {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some((_, j)) = self.engine.by_key(key) {
                return j;
            }
            assert!(
                Instant::now() < deadline,
                "{key} never submitted; engine has {:?}",
                self.engine.submitted()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn pool(&self) -> Value {
        let (s, v) = self.call("GET", "/v1/pools", Value::Null).await;
        assert_eq!(s, StatusCode::OK);
        v["pools"][0].clone()
    }
}

fn spec(extra: Value) -> Value {
    let mut s = json!({"command": ["python3", "train.py"], "pool": "hpc",
        "resources": {"cpu": 2, "memory": "1Gi"}, "env": {"LR": "0.1"}});
    for (k, v) in extra.as_object().unwrap() {
        s[k] = v.clone();
    }
    s
}

#[tokio::test]
async fn a_pool_job_is_submitted_once_runs_and_ends_with_the_engines_exit() {
    let w = world().await;
    let p = w.pool().await;
    assert_eq!(p["healthy"], true, "{p}");
    assert_eq!(p["cpu_milli"], 8000);
    assert_eq!(p["labels"]["pool"], "hpc");
    let (_, doc) = w.call("GET", "/v1/openapi.json", Value::Null).await;
    assert!(
        doc["paths"]["/v1/pools"]["post"].is_object(),
        "OpenAPI lacks /v1/pools"
    );

    let id = w.submit(spec(json!({}))).await;
    let key = format!("tessera-t1-{id}-1");
    let pj = w.wait_submitted(&key).await;
    assert_eq!(pj.replicas, 1);
    assert_eq!(pj.cpu_milli, 2000);
    assert_eq!(pj.argv, ["python3", "train.py"]);
    let env: BTreeMap<_, _> = pj.env.iter().cloned().collect();
    assert_eq!(env["LR"], "0.1");
    assert_eq!(env["TESSERA_JOB_ID"], id.to_string());
    assert_eq!(env["TESSERA_REPLICA"], "0");
    // Waiting inside the engine: scheduled in Tessera, queued in the pool,
    // and the job says so.
    let j = w
        .wait(id, "shown as queued in the engine", |j| {
            j["reason"] == "queued in fake"
        })
        .await;
    assert_eq!(j["state"], "scheduled", "{j}");
    let p = w.pool().await;
    assert_eq!(p["queued_in_engine"], 1, "{p}");
    assert_eq!(p["allocated_cpu_milli"], 2000, "{p}");

    w.engine.set(&key, RemoteState::Running);
    let j = w.wait_state(id, "running").await;
    assert!(j["reason"].is_null(), "no longer queued: {j}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.engine.set(
        &key,
        RemoteState::Failed {
            failure: Failure::OutOfMemory,
            exit_code: Some(137),
            message: "OUT_OF_MEMORY".into(),
        },
    );
    let j = w.wait_state(id, "failed").await;
    assert!(
        j["reason"].as_str().unwrap().contains("ran out of memory"),
        "{j}"
    );
    assert_eq!(j["exit_code"], 137);
    assert!(j["cost"].as_f64().unwrap() > 0.0, "priced: {j}");
    // Its output was copied where `tessera logs` reads.
    let log = std::fs::read_to_string(w.shared.home.join(format!("logs/{id}/1/0.log"))).unwrap();
    assert!(log.starts_with("output of "), "{log}");
    assert_eq!(w.engine.submitted().len(), 1, "submitted exactly once");
}

#[tokio::test]
async fn a_node_failure_requeues_the_job_as_a_new_attempt_with_a_new_key() {
    let w = world().await;
    let id = w.submit(spec(json!({}))).await;
    let first = format!("tessera-t1-{id}-1");
    w.wait_submitted(&first).await;
    w.engine.set(&first, RemoteState::Running);
    w.wait_state(id, "running").await;
    w.engine.set(
        &first,
        RemoteState::Failed {
            failure: Failure::NodeFailure,
            exit_code: None,
            message: "NODE_FAIL".into(),
        },
    );
    let second = format!("tessera-t1-{id}-2");
    w.wait_submitted(&second).await;
    let j = w.wait(id, "on attempt 2", |j| j["attempt"] == 2).await;
    assert_eq!(j["node_losses"], 1, "{j}");
    assert_eq!(j["failures"], 0, "{j}");
    w.engine.set(&second, RemoteState::Succeeded);
    let j = w.wait_state(id, "succeeded").await;
    assert_eq!(j["exit_code"], 0);
}

#[tokio::test]
async fn a_gang_goes_to_the_engine_as_one_job_and_status_is_one_call() {
    let w = world().await;
    let gang = w
        .submit(spec(
            json!({"replicas": 2, "resources": {"cpu": 1, "memory": "1Gi"}}),
        ))
        .await;
    let solo = w
        .submit(spec(json!({"resources": {"cpu": 1, "memory": "1Gi"}})))
        .await;
    let pj = w.wait_submitted(&format!("tessera-t1-{gang}-1")).await;
    assert_eq!(pj.replicas, 2);
    assert!(!pj.env.iter().any(|(k, _)| k == "TESSERA_REPLICA"));
    w.wait_submitted(&format!("tessera-t1-{solo}-1")).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let calls = w.engine.status_calls.lock().unwrap().clone();
    assert!(
        calls.contains(&2),
        "both jobs in one status call: {calls:?}"
    );
    assert!(calls.iter().all(|&n| n <= 2), "{calls:?}");
    w.engine
        .set(&format!("tessera-t1-{gang}-1"), RemoteState::Succeeded);
    let j = w.wait_state(gang, "succeeded").await;
    assert_eq!(j["replicas"].as_array().unwrap().len(), 2, "{j}");

    // Cancel reaches the engine; the job ends cancelled.
    let (s, _) = w
        .call("POST", &format!("/v1/jobs/{solo}/cancel"), Value::Null)
        .await;
    assert_eq!(s, StatusCode::OK);
    w.wait_state(solo, "cancelled").await;
    assert_eq!(w.engine.cancels.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn an_engine_refusal_fails_the_job_with_the_engines_reason() {
    let w = world().await;
    let id = w
        .submit(spec(
            json!({"command": ["refuse-me"], "retries": {"on_failure": 0}}),
        ))
        .await;
    let j = w.wait_state(id, "failed").await;
    assert!(
        j["reason"]
            .as_str()
            .unwrap()
            .contains("partition limits: too long"),
        "{j}"
    );
    // A replica larger than the pool's largest node never reaches the engine.
    let big = w
        .submit(spec(
            json!({"resources": {"cpu": 6, "memory": "1Gi"}, "retries": 0}),
        ))
        .await;
    let j = w.wait_state(big, "failed").await;
    assert!(
        j["reason"].as_str().unwrap().contains("largest node"),
        "{j}"
    );
    assert_eq!(w.engine.submitted().len(), 0);
}

#[tokio::test]
async fn an_unreachable_engine_makes_the_pool_unhealthy_and_work_waits() {
    let w = world().await;
    w.engine.down.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let p = w.pool().await;
        if p["healthy"] == false {
            assert!(
                p["message"]
                    .as_str()
                    .unwrap()
                    .contains("connection refused"),
                "{p}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "never unhealthy: {p}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let id = w.submit(spec(json!({}))).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let j = w.job(id).await;
    assert_eq!(
        j["state"], "queued",
        "no new work for an unhealthy pool: {j}"
    );
    w.engine.down.store(false, Ordering::SeqCst);
    w.wait_submitted(&format!("tessera-t1-{id}-1")).await;
    assert_eq!(w.pool().await["healthy"], true);
}

/// Jobs that the engine has not started yet, by the engine's state.
fn waiting_in_engine(w: &World) -> Vec<String> {
    w.engine
        .jobs
        .lock()
        .unwrap()
        .values()
        .filter(|(_, s)| matches!(s, RemoteState::Queued { .. }))
        .map(|(j, _)| j.key.clone())
        .collect()
}

/// Ends `n` jobs in the engine as they arrive there, one every ~50 ms.
async fn end_jobs(w: &World, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut ended = 0;
    while ended < n {
        if let Some(key) = waiting_in_engine(w).first() {
            w.engine.set(key, RemoteState::Succeeded);
            ended += 1;
        }
        assert!(Instant::now() < deadline, "only {ended} of {n} ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "never {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn while_jobs_end_fast_a_few_wait_in_the_engine_beyond_its_capacity_and_no_more() {
    // 8 CPUs in the engine, 2-CPU jobs: 4 fit.
    let w = world().await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(w.submit(spec(json!({}))).await);
    }
    wait_until("4 submitted", || w.engine.submitted().len() >= 4).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        w.engine.submitted().len(),
        4,
        "nothing has ended: capacity only"
    );
    assert_eq!(w.pool().await["queue_ahead"], 0);

    // Ten end within a few seconds (about two a second): about two jobs
    // end per second, so two may wait in the engine beyond its capacity.
    end_jobs(&w, 10).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while w.pool().await["queue_ahead"] != 2 {
        assert!(Instant::now() < deadline, "{}", w.pool().await);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    wait_until("6 in the engine", || waiting_in_engine(&w).len() >= 6).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiting = waiting_in_engine(&w);
    assert_eq!(waiting.len(), 6, "4 that fit and 2 ahead: {waiting:?}");
    let p = w.pool().await;
    assert_eq!(p["allocated_cpu_milli"], 12000, "{p}");
    assert_eq!(p["cpu_milli"], 8000, "capacity stays the engine's: {p}");
    let last = w.job(ids[19]).await;
    assert_eq!(last["state"], "queued", "the rest wait in Tessera: {last}");

    // Four start; two still wait in the engine, and say so.
    for key in &waiting[..4] {
        w.engine.set(key, RemoteState::Running);
    }
    let ahead: Vec<u64> = waiting[4..]
        .iter()
        .map(|k| k.rsplit('-').nth(1).unwrap().parse().unwrap())
        .collect();
    for id in &ahead {
        let j = w
            .wait(*id, "queued in the engine", |j| {
                j["reason"] == "queued in fake"
            })
            .await;
        assert_eq!(j["state"], "scheduled", "{j}");
        let events = w
            .call("GET", &format!("/v1/jobs/{id}/events"), Value::Null)
            .await
            .1;
        assert!(
            events.to_string().contains("queued in fake"),
            "an event says so: {events}"
        );
    }
}

#[tokio::test]
async fn queue_ahead_zero_hands_the_engine_only_its_capacity() {
    let w = world_with(&[("queue_ahead", "0")]).await;
    for _ in 0..20 {
        w.submit(spec(json!({}))).await;
    }
    wait_until("4 submitted", || w.engine.submitted().len() >= 4).await;
    end_jobs(&w, 10).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(w.pool().await["queue_ahead"], 0);
    assert_eq!(waiting_in_engine(&w).len(), 4);
}
