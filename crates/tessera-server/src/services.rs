//! Services: long-running replicas behind the gateway.
//!
//! Each replica is a one-replica job placed by the same scheduler as batch
//! work, listening on the port it is given in `$PORT`. The service loop
//! (every 250 ms) keeps each service's replicas at the number wanted —
//! replacing replicas that died — probes their readiness, publishes the
//! ready ones to the gateway through the narrow [`Routes`] trait, runs the
//! autoscaler, and rolls out a new version (start the new replicas, shift
//! traffic once they are ready, drain and stop the old). Every decision is
//! an event on the service.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tessera_core::auth::TokenKind;
use tessera_core::service::{Service, ServiceTemplate};
use tessera_core::{JobId, JobState};
use tessera_store::Write;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};
use utoipa::ToSchema;

use crate::{now_ms, Shared};

/// Key under which a service is stored in the store's `meta` table.
pub fn meta_key(name: &str) -> String {
    format!("service/{name}")
}

/// How the service loop reaches the gateway: publish who may be called,
/// and read how busy a service is.
pub trait Routes: Send + Sync {
    /// The ready replicas of `service` and the SHA-256 hashes of the keys
    /// that may call it.
    fn set(&self, service: &str, upstreams: Vec<(String, SocketAddr)>, key_hashes: Vec<String>);
    fn remove(&self, service: &str);
    /// Requests in flight or held for `service`, and when the last came.
    fn load(&self, service: &str) -> (u32, Option<Instant>);
    /// Replicas still serving requests (being drained): in flight by id.
    fn in_flight(&self, service: &str, upstream: &str) -> u32;
    /// Requests received for `service` so far.
    fn requests(&self, _service: &str) -> u64 {
        0
    }
    /// Requests so far by latency bucket (see `tessera_gateway::latency_bound`).
    fn latency_buckets(&self, _service: &str) -> Vec<u64> {
        Vec::new()
    }
}

/// One decision or change, for `tessera service NAME`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ServiceEvent {
    pub time: u64,
    pub kind: String,
    pub message: String,
}

/// A replica as the service loop tracks it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReplicaView {
    pub job_id: JobId,
    pub version: u32,
    pub port: u16,
    pub node: Option<String>,
    pub address: Option<String>,
    /// starting, ready, unready, draining.
    pub state: String,
}

#[derive(Debug, Default)]
struct Replica {
    job_id: JobId,
    version: u32,
    port: u16,
    addr: Option<SocketAddr>,
    ready: bool,
    /// Whether it ever passed a readiness check (until then it is probed
    /// every 20 ms, so a new replica gets traffic as soon as it can).
    was_ready: bool,
    last_probe: Option<Instant>,
    probing: bool,
    draining_since: Option<Instant>,
}

#[derive(Debug)]
struct Runtime {
    /// When the service loop first saw the service (the idle clock starts).
    since: Instant,
    /// Replicas that failed soon after starting, in a row; starts back off.
    crashes: u32,
    backoff_until: Option<Instant>,
    replicas: Vec<Replica>,
    /// Samples (every 250 ms) of concurrency (in flight plus held).
    samples: VecDeque<(Instant, f64)>,
    /// Samples (every 250 ms) of requests received so far (last 10 s).
    requests: VecDeque<(Instant, u64)>,
    /// Samples of the latency buckets, taken with `requests`.
    latency: VecDeque<Vec<u64>>,
    last_sample: Option<Instant>,
    events: VecDeque<ServiceEvent>,
    /// A request waits for a first replica: scale from zero now.
    demand: bool,
}

const MAX_EVENTS: usize = 200;

/// How often a replica is probed until it is first ready: a refused
/// connection costs next to nothing, and every probe period is latency
/// added to a scale from zero.
const FIRST_PROBE_EVERY: Duration = Duration::from_millis(20);

/// How often the autoscaler samples a service's concurrency.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// How long a drained replica keeps running at least.
const DRAIN_MIN: Duration = Duration::from_millis(1200);

impl Default for Runtime {
    fn default() -> Runtime {
        Runtime {
            since: Instant::now(),
            crashes: 0,
            backoff_until: None,
            replicas: Vec::new(),
            samples: VecDeque::new(),
            requests: VecDeque::new(),
            latency: VecDeque::new(),
            last_sample: None,
            events: VecDeque::new(),
            demand: false,
        }
    }
}

impl Runtime {
    fn event(&mut self, kind: &str, message: String) {
        info!(kind, %message, "service event");
        self.events.push_back(ServiceEvent {
            time: now_ms(),
            kind: kind.into(),
            message,
        });
        while self.events.len() > MAX_EVENTS {
            self.events.pop_front();
        }
    }
}

/// The services part of the control plane.
pub struct Services {
    pub routes: Arc<dyn Routes>,
    /// Wakes the service loop (a request waits, a probe answered).
    wake: Arc<tokio::sync::Notify>,
    runtime: Mutex<HashMap<String, Runtime>>,
    probes: Arc<Mutex<HashMap<JobId, bool>>>,
    /// Load reported by standalone gateways: (gateway, service) → (requests
    /// in flight or held, when reported, when the last request came).
    remote: Mutex<HashMap<(String, String), RemoteLoad>>,
    /// What was last published per service: ready upstreams and key hashes
    /// (for standalone gateways).
    published: Mutex<BTreeMap<String, Published>>,
}

/// A standalone gateway's report: load, when reported, last request.
type RemoteLoad = (u32, Instant, Option<Instant>);

/// A service's route as published to gateways.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Published {
    /// (replica id, address) of each ready replica.
    #[schema(value_type = Vec<Vec<String>>)]
    pub upstreams: Vec<(String, SocketAddr)>,
    /// SHA-256 hex of every key and token that may call the service.
    pub key_hashes: Vec<String>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Services")
    }
}

impl Services {
    pub fn new(routes: Arc<dyn Routes>) -> Services {
        Services {
            routes,
            wake: Arc::new(tokio::sync::Notify::new()),
            runtime: Mutex::new(HashMap::new()),
            probes: Arc::new(Mutex::new(HashMap::new())),
            remote: Mutex::new(HashMap::new()),
            published: Mutex::new(BTreeMap::new()),
        }
    }

    /// A request is waiting for a replica of `service`.
    pub fn demand(&self, service: &str) {
        if let Some(rt) = self.runtime.lock().expect("services lock").get_mut(service) {
            rt.demand = true;
        }
        self.wake.notify_one();
    }

    /// Load a standalone gateway reports for `service`: requests in flight
    /// or held, and how long ago the last one came.
    pub fn report_load(&self, gateway: &str, service: &str, load: u32, idle: Option<Duration>) {
        let now = Instant::now();
        self.remote.lock().expect("remote lock").insert(
            (gateway.to_string(), service.to_string()),
            (load, now, idle.and_then(|d| now.checked_sub(d))),
        );
    }

    /// The embedded gateway's load plus what standalone gateways reported
    /// in the last 5 s.
    fn load(&self, service: &str) -> (u32, Option<Instant>) {
        let (mut load, mut last) = self.routes.load(service);
        let mut remote = self.remote.lock().expect("remote lock");
        remote.retain(|_, (_, at, _)| at.elapsed() < Duration::from_secs(5));
        for ((_, svc), (l, _, lr)) in remote.iter() {
            if svc == service {
                load += l;
                last = last.max(*lr);
            }
        }
        (load, last)
    }

    /// Runs the service loop now (a spec, a key or the bounds changed).
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    pub fn event(&self, service: &str, kind: &str, message: String) {
        self.runtime
            .lock()
            .expect("services lock")
            .entry(service.to_string())
            .or_default()
            .event(kind, message);
    }

    pub fn events(&self, service: &str) -> Vec<ServiceEvent> {
        self.runtime
            .lock()
            .expect("services lock")
            .get(service)
            .map(|r| r.events.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn replicas(&self, service: &str) -> Vec<ReplicaView> {
        let rt = self.runtime.lock().expect("services lock");
        let Some(r) = rt.get(service) else {
            return Vec::new();
        };
        r.replicas
            .iter()
            .map(|x| ReplicaView {
                job_id: x.job_id,
                version: x.version,
                port: x.port,
                node: None,
                address: x.addr.map(|a| a.to_string()),
                state: if x.draining_since.is_some() {
                    "draining"
                } else if x.ready {
                    "ready"
                } else if x.addr.is_some() {
                    "unready"
                } else {
                    "starting"
                }
                .into(),
            })
            .collect()
    }

    /// Requests per second through the embedded gateway, over the last 10 s.
    pub fn request_rate(&self, service: &str) -> f64 {
        let rt = self.runtime.lock().expect("services lock");
        let Some(r) = rt.get(service) else {
            return 0.0;
        };
        match (r.requests.front(), r.requests.back()) {
            (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => {
                n1.saturating_sub(*n0) as f64 / t1.duration_since(*t0).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    /// The 99th percentile of request latency through the embedded gateway
    /// over the last 10 s (the upper bound of its bucket), in milliseconds.
    pub fn p99_ms(&self, service: &str) -> Option<f64> {
        let rt = self.runtime.lock().expect("services lock");
        let r = rt.get(service)?;
        let (first, last) = (r.latency.front()?, r.latency.back()?);
        let diff: Vec<u64> = last
            .iter()
            .zip(first.iter().chain(std::iter::repeat(&0)))
            .map(|(b, a)| b.saturating_sub(*a))
            .collect();
        let total: u64 = diff.iter().sum();
        if total == 0 {
            return None;
        }
        let want = (total as f64 * 0.99).ceil() as u64;
        let mut seen = 0;
        for (i, n) in diff.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some(tessera_gateway::latency_bound(i) * 1000.0);
            }
        }
        None
    }

    /// Ready replicas of the current version (those traffic goes to).
    pub fn ready_count(&self, service: &str) -> usize {
        let rt = self.runtime.lock().expect("services lock");
        rt.get(service)
            .map(|r| {
                r.replicas
                    .iter()
                    .filter(|x| x.ready && x.draining_since.is_none())
                    .count()
            })
            .unwrap_or(0)
    }

    pub fn forget(&self, service: &str) {
        self.runtime.lock().expect("services lock").remove(service);
        self.published
            .lock()
            .expect("published lock")
            .remove(service);
        self.routes.remove(service);
    }

    /// Every service's route, for standalone gateways.
    pub fn published(&self) -> BTreeMap<String, Published> {
        self.published.lock().expect("published lock").clone()
    }
}

/// Replica jobs carry their service in these variables.
pub const ENV_SERVICE: &str = "TESSERA_SERVICE";
pub const ENV_VERSION: &str = "TESSERA_SERVICE_VERSION";

/// Where a node's replicas can be reached: the address its agent reported,
/// else loopback (the local agent of `tessera up`).
pub const ADDRESS_LABEL: &str = "tessera.dev/address";

fn node_ip(state: &crate::state::ClusterState, node: &str) -> std::net::IpAddr {
    state
        .nodes
        .get(node)
        .and_then(|n| n.inventory.labels.get(ADDRESS_LABEL))
        .and_then(|a| a.parse().ok())
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]))
}

/// Picks a port for a new replica on no node in particular: distinct from
/// every other live service replica's.
fn free_port(state: &crate::state::ClusterState, taken: &[u16]) -> u16 {
    let used: std::collections::HashSet<u16> = state
        .active
        .iter()
        .chain(state.queued.iter())
        .filter_map(|id| state.jobs.get(id))
        .filter_map(|j| j.spec.env.get("PORT").and_then(|p| p.parse().ok()))
        .chain(taken.iter().copied())
        .collect();
    let mut p = 20000 + (now_ms() % 10000) as u16;
    while used.contains(&p) || std::net::TcpListener::bind(("0.0.0.0", p)).is_err() {
        p = if p >= 29999 { 20000 } else { p + 1 };
    }
    p
}

/// Rebuilds the replica lists after a restart from the jobs that carry a
/// service's variables.
pub fn recover(shared: &Shared) {
    let state = shared.state.lock().expect("state lock");
    let mut rt = shared.services.runtime.lock().expect("services lock");
    for id in state.active.iter().chain(state.queued.iter()) {
        let j = &state.jobs[id];
        let (Some(svc), Some(ver), Some(port)) = (
            j.spec.env.get(ENV_SERVICE),
            j.spec.env.get(ENV_VERSION).and_then(|v| v.parse().ok()),
            j.spec.env.get("PORT").and_then(|p| p.parse().ok()),
        ) else {
            continue;
        };
        if !state.services.contains_key(svc) {
            continue;
        }
        rt.entry(svc.clone()).or_default().replicas.push(Replica {
            job_id: *id,
            version: ver,
            port,
            ..Default::default()
        });
    }
}

/// The service loop: reconcile, probe, route, autoscale.
pub async fn services_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let wake = shared.services.wake.clone();
    // Jobs changing (a replica started or ended) also wake the loop, at
    // most every 20 ms: a new replica is probed as soon as it runs.
    let mut changes = shared.changes.subscribe();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = wake.notified() => {}
            _ = changes.changed() => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let names: Vec<String> = shared
            .state
            .lock()
            .expect("state lock")
            .services
            .keys()
            .cloned()
            .collect();
        for name in names {
            reconcile(&shared, &name).await;
        }
    }
}

/// What the autoscaler wants, from concurrency samples (every 250 ms).
pub fn autoscale(
    t: &ServiceTemplate,
    current: u32,
    samples: &VecDeque<(Instant, f64)>,
    now: Instant,
    idle_for: Option<Duration>,
) -> (u32, String) {
    let avg = |window_ms: u64| {
        let w = Duration::from_millis(window_ms);
        let xs: Vec<f64> = samples
            .iter()
            .filter(|(t, _)| now.duration_since(*t) < w)
            .map(|(_, v)| *v)
            .collect();
        if xs.is_empty() {
            0.0
        } else {
            xs.iter().sum::<f64>() / xs.len() as f64
        }
    };
    let a = &t.autoscale;
    let stable = avg(a.stable_window_ms);
    let panic = avg(a.panic_window_ms);
    let want = |c: f64| (c / a.target_inflight_per_replica).ceil() as u32;
    let (mut desired, mut mode) = if want(panic) >= 2 * current.max(1) && want(panic) > current {
        (want(panic), "panic")
    } else {
        (
            want(stable).max(if current > want(stable) {
                want(panic)
            } else {
                0
            }),
            "stable",
        )
    };
    let idle = idle_for.unwrap_or(Duration::MAX);
    let idle_long = a
        .scale_to_zero_after_ms
        .is_some_and(|ms| idle >= Duration::from_millis(ms));
    if t.min == 0 && idle_long && samples.back().is_none_or(|(_, v)| *v == 0.0) {
        // Nothing in flight or held and no request for the idle period:
        // zero, whatever the windows' averages still remember.
        (desired, mode) = (0, "idle");
    } else if desired == 0 && t.min == 0 {
        // Only go to zero after the idle period.
        desired = current.min(1).max(desired);
    }
    let desired = desired.clamp(t.min, t.max);
    (
        desired,
        format!(
            "{mode}: concurrency {stable:.2} over {}s, {panic:.2} over {}s, target {} per replica",
            a.stable_window_ms / 1000,
            a.panic_window_ms / 1000,
            a.target_inflight_per_replica
        ),
    )
}

async fn reconcile(shared: &Arc<Shared>, name: &str) {
    let now = now_ms();
    let Some(service) = shared
        .state
        .lock()
        .expect("state lock")
        .services
        .get(name)
        .cloned()
    else {
        return;
    };
    let t = &service.template;
    // 1. Forget replicas whose jobs ended; learn addresses of running ones.
    let mut ended = Vec::new();
    {
        let state = shared.state.lock().expect("state lock");
        let mut rt_all = shared.services.runtime.lock().expect("services lock");
        let rt = rt_all.entry(name.to_string()).or_default();
        rt.replicas.retain(|r| {
            let Some(j) = state.jobs.get(&r.job_id) else {
                return false;
            };
            if j.state.is_terminal() {
                ended.push((r.job_id, j.state, j.reason.clone().unwrap_or_default()));
                return false;
            }
            true
        });
        for r in &mut rt.replicas {
            let j = &state.jobs[&r.job_id];
            r.addr = (j.state == JobState::Running)
                .then(|| j.placement.first())
                .flatten()
                .map(|p| SocketAddr::new(node_ip(&state, &p.node), r.port));
            if r.addr.is_none() {
                r.ready = false;
            }
        }
        let quick = ended.iter().any(|(id, st, _)| {
            *st != JobState::Cancelled
                && state.jobs[id]
                    .started_at
                    .is_none_or(|s| now.saturating_sub(s) < 10_000)
        });
        if quick {
            rt.crashes += 1;
            let delay = Duration::from_millis((250u64 << rt.crashes.min(7)).min(30_000));
            rt.backoff_until = Some(Instant::now() + delay);
            rt.event(
                "backoff",
                format!(
                    "a replica ended soon after it started ({} in a row); next start in {:.1}s",
                    rt.crashes,
                    delay.as_secs_f64()
                ),
            );
        }
        for (id, st, why) in &ended {
            rt.event(
                "replica-ended",
                format!("replica job {id} ended ({}): {why}", st.as_str()),
            );
        }
    }
    // 2. Readiness probes, at most one in flight per replica.
    {
        let results = shared.services.probes.clone();
        let mut rt_all = shared.services.runtime.lock().expect("services lock");
        let rt = rt_all.entry(name.to_string()).or_default();
        let mut changes = Vec::new();
        for r in &mut rt.replicas {
            if let Some(ok) = results.lock().expect("probes lock").remove(&r.job_id) {
                r.probing = false;
                if ok != r.ready {
                    changes.push((r.job_id, ok));
                }
                r.ready = ok && r.addr.is_some();
                r.was_ready |= r.ready;
            }
            let every = if r.was_ready {
                Duration::from_millis(t.readiness.interval_ms)
            } else {
                FIRST_PROBE_EVERY.min(Duration::from_millis(t.readiness.interval_ms))
            };
            let due = r.last_probe.is_none_or(|p| p.elapsed() >= every);
            if let (Some(addr), true, false) = (r.addr, due, r.probing) {
                r.probing = true;
                r.last_probe = Some(Instant::now());
                let (path, timeout) = (
                    t.readiness.path.clone(),
                    Duration::from_millis(t.readiness.timeout_ms),
                );
                let (results, id) = (results.clone(), r.job_id);
                let (wake, first) = (shared.services.wake.clone(), !r.was_ready);
                tokio::spawn(async move {
                    let began = tokio::time::Instant::now();
                    let ok = probe(addr, &path, timeout).await;
                    results.lock().expect("probes lock").insert(id, ok);
                    if first {
                        // Until it is first ready a replica is probed every
                        // 20 ms: a failed probe wakes the loop for the next
                        // one (the 250 ms tick alone would probe that often).
                        if !ok {
                            tokio::time::sleep_until(began + every).await;
                        }
                        wake.notify_one();
                    }
                });
            }
        }
        if rt.replicas.iter().any(|r| r.ready) {
            rt.crashes = 0;
        }
        for (id, ok) in changes {
            rt.event(
                if ok { "ready" } else { "unready" },
                format!(
                    "replica job {id} {}",
                    if ok {
                        "passed its readiness check; it gets traffic"
                    } else {
                        "failed its readiness check; no traffic"
                    }
                ),
            );
        }
    }
    // 3. Autoscale, on a sample of concurrency every 250 ms: a window's
    //    average reflects a step in load within a quarter second of the
    //    window's own length.
    let mut desired = service.desired;
    {
        let (load, last) = shared.services.load(name);
        let mut rt_all = shared.services.runtime.lock().expect("services lock");
        let rt = rt_all.entry(name.to_string()).or_default();
        let instant = Instant::now();
        if rt.last_sample.is_none_or(|s| s.elapsed() >= SAMPLE_EVERY) {
            rt.last_sample = Some(instant);
            rt.samples.push_back((instant, load as f64));
            rt.requests
                .push_back((instant, shared.services.routes.requests(name)));
            rt.latency
                .push_back(shared.services.routes.latency_buckets(name));
            while rt
                .requests
                .front()
                .is_some_and(|(s, _)| instant.duration_since(*s) > Duration::from_secs(10))
            {
                rt.requests.pop_front();
                rt.latency.pop_front();
            }
            let keep = Duration::from_millis(
                t.autoscale
                    .stable_window_ms
                    .max(t.autoscale.panic_window_ms),
            );
            while rt
                .samples
                .front()
                .is_some_and(|(s, _)| instant.duration_since(*s) > keep)
            {
                rt.samples.pop_front();
            }
            let idle = Some(instant.duration_since(last.unwrap_or(rt.since).max(rt.since)));
            let (want, why) = autoscale(t, service.desired, &rt.samples, instant, idle);
            if want != desired {
                rt.event("scale", format!("{} -> {} replicas ({why})", desired, want));
                desired = want;
            }
        }
        if rt.demand && desired == 0 && t.max > 0 {
            rt.event(
                "scale",
                "0 -> 1 replicas (a request is waiting: scale from zero)".into(),
            );
            desired = 1;
        }
        rt.demand = false;
    }
    // 4. Replicas: start what is missing, roll out a new version, drain
    //    and stop what is not wanted.
    let mut starts = 0u32;
    let mut stops: Vec<JobId> = Vec::new();
    {
        let mut rt_all = shared.services.runtime.lock().expect("services lock");
        let rt = rt_all.entry(name.to_string()).or_default();
        let current: Vec<&Replica> = rt
            .replicas
            .iter()
            .filter(|r| r.version == service.version && r.draining_since.is_none())
            .collect();
        let ready_new = current.iter().filter(|r| r.ready).count() as u32;
        if (current.len() as u32) < desired && rt.backoff_until.is_none_or(|b| Instant::now() >= b)
        {
            starts = desired - current.len() as u32;
        }
        let surplus = (current.len() as u32).saturating_sub(desired);
        // Drop surplus current replicas: not-ready ones first.
        let mut victims: Vec<JobId> = current
            .iter()
            .filter(|r| !r.ready)
            .chain(current.iter().filter(|r| r.ready))
            .take(surplus as usize)
            .map(|r| r.job_id)
            .collect();
        // Old versions go once the new version carries the load (or when
        // nothing is wanted at all).
        let old_ready = rt
            .replicas
            .iter()
            .any(|r| r.version != service.version && r.ready && r.draining_since.is_none());
        if ready_new >= desired || !old_ready || desired == 0 {
            victims.extend(
                rt.replicas
                    .iter()
                    .filter(|r| r.version != service.version && r.draining_since.is_none())
                    .map(|r| r.job_id),
            );
        }
        for r in &mut rt.replicas {
            if victims.contains(&r.job_id) {
                r.draining_since = Some(Instant::now());
                let why = if r.version != service.version {
                    format!(
                        "version {} replaced by version {}",
                        r.version, service.version
                    )
                } else {
                    "scaled down".to_string()
                };
                rt.events.push_back(ServiceEvent {
                    time: now,
                    kind: "draining".into(),
                    message: format!("replica job {} draining: {why}", r.job_id),
                });
            }
        }
        // A drained replica stops once its requests are done (or after
        // 30 s) — and never before every gateway has stopped sending it
        // requests: the embedded one learns at the end of this pass,
        // standalone ones within their 500 ms poll.
        for r in &rt.replicas {
            if let Some(since) = r.draining_since {
                let busy = shared
                    .services
                    .routes
                    .in_flight(name, &r.job_id.to_string());
                if (busy == 0 && since.elapsed() >= DRAIN_MIN)
                    || since.elapsed() > Duration::from_secs(30)
                {
                    stops.push(r.job_id);
                }
            }
        }
    }
    let mut new_ids = Vec::new();
    for _ in 0..starts {
        let port = {
            let state = shared.state.lock().expect("state lock");
            let taken: Vec<u16> = shared
                .services
                .runtime
                .lock()
                .expect("services lock")
                .values()
                .flat_map(|r| r.replicas.iter().map(|x| x.port))
                .collect();
            free_port(&state, &taken)
        };
        let mut replica = t.replica.clone();
        replica.env.insert("PORT".into(), port.to_string());
        replica.env.insert(ENV_SERVICE.into(), name.to_string());
        replica
            .env
            .insert(ENV_VERSION.into(), service.version.to_string());
        match crate::api::insert_new_job(shared, replica, &format!("service {name}"), now).await {
            Ok(job) => {
                new_ids.push(job.id);
                let mut rt_all = shared.services.runtime.lock().expect("services lock");
                let rt = rt_all.entry(name.to_string()).or_default();
                rt.replicas.push(Replica {
                    job_id: job.id,
                    version: service.version,
                    port,
                    ..Default::default()
                });
                rt.event(
                    "replica-started",
                    format!(
                        "replica job {} (version {}) on port {port}",
                        job.id, service.version
                    ),
                );
            }
            Err(e) => {
                warn!(service = name, error = %e.message, "cannot start a replica");
                shared.services.event(
                    name,
                    "replica-failed",
                    format!("cannot start a replica: {}", e.message),
                );
                break;
            }
        }
    }
    // 5. Commit: the new desired count, stopped replicas.
    let staged = {
        let mut state = shared.state.lock().expect("state lock");
        let mut writes = Vec::new();
        for id in &stops {
            crate::api::cancel_in_state(
                shared,
                &mut state,
                *id,
                format!("service {name}: replica drained"),
                now,
                &mut writes,
            );
        }
        if let Some(s) = state.services.get_mut(name) {
            if s.desired != desired {
                s.desired = desired;
                s.updated_at = now;
                writes.push(Write::Meta(
                    meta_key(name),
                    serde_json::to_string(s).expect("serialisable"),
                ));
            }
        }
        shared.stage(writes)
    };
    staged.durable().await;
    if !stops.is_empty() {
        let mut rt_all = shared.services.runtime.lock().expect("services lock");
        if let Some(rt) = rt_all.get_mut(name) {
            rt.replicas.retain(|r| !stops.contains(&r.job_id));
        }
    }
    // 6. Publish the ready replicas and who may call.
    let (upstreams, keys) = {
        let state = shared.state.lock().expect("state lock");
        let keys: Vec<String> = state
            .tokens
            .values()
            .filter(|tk| match &tk.kind {
                TokenKind::Service { service } => service == name,
                TokenKind::Api => tk.team == t.team || tk.team == tessera_core::auth::ADMIN_TEAM,
                _ => false,
            })
            .map(|tk| tk.hash.clone())
            .collect();
        let rt_all = shared.services.runtime.lock().expect("services lock");
        let ups: Vec<(String, SocketAddr)> = rt_all
            .get(name)
            .map(|rt| {
                rt.replicas
                    .iter()
                    .filter(|r| r.ready && r.draining_since.is_none())
                    .filter_map(|r| r.addr.map(|a| (r.job_id.to_string(), a)))
                    .collect()
            })
            .unwrap_or_default();
        (ups, keys)
    };
    shared
        .services
        .published
        .lock()
        .expect("published lock")
        .insert(
            name.to_string(),
            Published {
                upstreams: upstreams.clone(),
                key_hashes: keys.clone(),
            },
        );
    shared.services.routes.set(name, upstreams, keys);
}

/// `GET path` against a replica: ready when it answers 2xx in time.
pub async fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: tessera-probe\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.ok()?;
        let line = std::str::from_utf8(&buf[..n]).ok()?;
        let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some((200..300).contains(&code))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Loads services from the store's `meta` rows.
pub fn load(meta: &BTreeMap<String, String>) -> BTreeMap<String, Service> {
    meta.iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix("service/")?;
            match serde_json::from_str::<Service>(v) {
                Ok(s) => Some((name.to_string(), s)),
                Err(e) => {
                    warn!(service = name, error = %e, "unreadable stored service; ignored");
                    None
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_core::service::ServiceSpec;

    fn template(yaml: &str) -> ServiceTemplate {
        ServiceSpec::parse(yaml).unwrap().validate("ml").unwrap()
    }

    fn samples(now: Instant, values: &[(u64, f64)]) -> VecDeque<(Instant, f64)> {
        values
            .iter()
            .map(|(ago, v)| (now - Duration::from_secs(*ago), *v))
            .collect()
    }

    #[test]
    fn a_burst_scales_up_in_the_panic_window() {
        let t = template("name: s\nscript: x\nreplicas: {min: 1, max: 10}\nautoscale: {target_inflight_per_replica: 2}");
        let now = Instant::now() + Duration::from_secs(120);
        // Quiet for a minute, then 5 s of 16 in flight.
        let mut v: Vec<(u64, f64)> = (6..60).map(|s| (s, 0.0)).collect();
        v.extend((0..6).map(|s| (s, 16.0)));
        let (d, why) = autoscale(&t, 1, &samples(now, &v), now, None);
        assert_eq!(d, 8, "{why}");
        assert!(why.starts_with("panic"));
    }

    #[test]
    fn a_dip_does_not_scale_down_before_the_stable_window_says_so() {
        let t = template("name: s\nscript: x\nreplicas: {min: 1, max: 10}\nautoscale: {target_inflight_per_replica: 2}");
        let now = Instant::now() + Duration::from_secs(120);
        let mut v: Vec<(u64, f64)> = (6..60).map(|s| (s, 8.0)).collect();
        v.extend((0..6).map(|s| (s, 0.0)));
        let (d, _) = autoscale(&t, 4, &samples(now, &v), now, None);
        assert!(d >= 4, "a 6 s dip keeps {d} replicas");
    }

    #[test]
    fn zero_only_after_the_idle_period_and_min_max_hold() {
        let t = template(
            "name: s\nscript: x\nreplicas: {min: 0, max: 3}\nautoscale: {scale_to_zero_after: 30s}",
        );
        let now = Instant::now() + Duration::from_secs(120);
        let v: Vec<(u64, f64)> = (0..60).map(|s| (s, 0.0)).collect();
        let s = samples(now, &v);
        assert_eq!(
            autoscale(&t, 1, &s, now, Some(Duration::from_secs(10))).0,
            1
        );
        assert_eq!(
            autoscale(&t, 1, &s, now, Some(Duration::from_secs(31))).0,
            0
        );
        let busy: Vec<(u64, f64)> = (0..60).map(|s| (s, 500.0)).collect();
        assert_eq!(autoscale(&t, 1, &samples(now, &busy), now, None).0, 3);
    }

    #[test]
    fn idle_past_scale_to_zero_after_goes_to_zero_within_the_stable_window() {
        let t = template(
            "name: s\nscript: x\nreplicas: {min: 0, max: 3}\nautoscale: {scale_to_zero_after: 1s}",
        );
        let now = Instant::now() + Duration::from_secs(120);
        // One request 3 s ago: the 60 s window still averages above zero.
        let s = samples(now, &[(3, 1.0), (2, 0.0), (1, 0.0), (0, 0.0)]);
        let (d, why) = autoscale(&t, 1, &s, now, Some(Duration::from_secs(2)));
        assert_eq!(d, 0, "{why}");
        assert!(why.starts_with("idle"), "{why}");
        // Not while a request is still in flight, nor before the idle time.
        let busy = samples(now, &[(3, 1.0), (0, 1.0)]);
        assert_eq!(
            autoscale(&t, 1, &busy, now, Some(Duration::from_secs(2))).0,
            1
        );
        assert_eq!(
            autoscale(&t, 1, &s, now, Some(Duration::from_millis(500))).0,
            1
        );
    }
}

/// Routes for a control plane without a gateway (tests): nothing is served.
#[derive(Debug, Default)]
pub struct NoRoutes;

impl Routes for NoRoutes {
    fn set(&self, _: &str, _: Vec<(String, SocketAddr)>, _: Vec<String>) {}
    fn remove(&self, _: &str) {}
    fn load(&self, _: &str) -> (u32, Option<Instant>) {
        (0, None)
    }
    fn in_flight(&self, _: &str, _: &str) -> u32 {
        0
    }
}

/// [`Routes`] through the embedded gateway.
pub struct GatewayRoutes {
    pub gateway: Arc<tessera_gateway::Gateway>,
}

impl Routes for GatewayRoutes {
    fn set(&self, service: &str, upstreams: Vec<(String, SocketAddr)>, key_hashes: Vec<String>) {
        let mut route = tessera_gateway::ServiceRoute::new(
            upstreams
                .into_iter()
                .map(|(id, addr)| tessera_gateway::Upstream { id, addr })
                .collect(),
        );
        route.key_hashes = key_hashes;
        self.gateway.set_service(service, route);
    }

    fn remove(&self, service: &str) {
        self.gateway.remove_service(service);
    }

    fn load(&self, service: &str) -> (u32, Option<Instant>) {
        match self.gateway.stats(service) {
            Some(s) => (s.in_flight + s.held, s.last_request),
            None => (0, None),
        }
    }

    fn requests(&self, service: &str) -> u64 {
        self.gateway
            .stats(service)
            .map(|s| s.requests_total)
            .unwrap_or(0)
    }

    fn latency_buckets(&self, service: &str) -> Vec<u64> {
        self.gateway.latency_buckets(service).unwrap_or_default()
    }

    fn in_flight(&self, service: &str, _upstream: &str) -> u32 {
        // Per-replica counts stay inside the gateway; the service's total
        // is an upper bound, so a drained replica never stops early.
        self.gateway
            .stats(service)
            .map(|s| s.in_flight)
            .unwrap_or(0)
    }
}
