//! The service gateway: the data path in front of model-serving replicas.
//!
//! This crate owns the routing table (service name → ready replicas, keys,
//! timeouts, hold bounds), the HTTP/1.1 reverse proxy that streams request
//! and response bodies through a pooled hyper client, least-outstanding
//! load balancing, the retry rule (only when connecting failed, never after a
//! request was sent), scale-from-zero holding with a demand hook, and the
//! per-service counters the autoscaler samples and Prometheus scrapes. It
//! knows nothing of the control plane: it never starts replicas, reads no
//! store and decides no scaling. The control plane tells it which replicas
//! are *ready* (`Gateway::set_service`), and it reports demand back through
//! the hook and `Gateway::stats`. `tessera-server` embeds it; a standalone
//! gateway process runs the same `Gateway` behind `Gateway::serve`, which
//! serves plain HTTP/1.1 requests on a path of its own (`fast`: heads
//! parsed in place, bodies copied through, no HTTP library in between) and
//! hands any other connection (HTTP/1.0, upgrades, `Expect`) to hyper.
//!
//! Hot-path rules: the table is a copy-on-write snapshot behind a `RwLock`
//! that is held only long enough to clone an `Arc`; counters are atomics;
//! a route update swaps the snapshot and never touches requests in flight
//! (per-replica in-flight counts are kept by replica id across updates).

mod error;
mod fast;
mod metrics;
mod proxy;
mod server;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::header::HeaderValue;
use axum::http::uri::Authority;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

pub use error::error_response;
pub use metrics::{latency_bound, LATENCY_BOUNDS};
use metrics::{GatewayMetrics, ServiceMetrics};
use proxy::OutBody;
pub use server::reuseport_listeners;

/// Called with the service name when a request finds no ready replica, so
/// the control plane can start one. It runs on the request path: it must be
/// cheap and must not block (send on a channel). It is called once for every
/// request that starts to wait, so the receiver should deduplicate.
pub type DemandHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Settings that apply to the whole gateway.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// With `Some("svc.example")`, `Host: <service>.svc.example` routes to
    /// `<service>` with the path unchanged (served by the router's fallback).
    pub domain: Option<String>,
    /// How long connecting to one replica may take before the next is tried.
    pub connect_timeout: Duration,
    /// Replicas tried for one request when connecting fails (at least 1).
    pub max_attempts: usize,
    /// Idle upstream connections are closed after this long.
    pub pool_idle_timeout: Duration,
    /// The value of `X-Forwarded-Proto` (`"https"` behind TLS).
    pub forwarded_proto: &'static str,
}

impl Default for GatewayConfig {
    fn default() -> GatewayConfig {
        GatewayConfig {
            domain: None,
            connect_timeout: Duration::from_secs(2),
            max_attempts: 3,
            pool_idle_timeout: Duration::from_secs(90),
            forwarded_proto: "http",
        }
    }
}

/// One ready replica of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// Stable id (e.g. `job.attempt.replica`): in-flight counts follow it
    /// across route updates.
    pub id: String,
    pub addr: SocketAddr,
}

/// What the gateway knows of a service. Only *ready* replicas belong in
/// `replicas`; an empty list means requests are held (scale from zero).
#[derive(Clone, Debug)]
pub struct ServiceRoute {
    pub replicas: Vec<Upstream>,
    /// SHA-256 hex of the service keys; empty means no key is required.
    /// A malformed entry matches no key (fail closed).
    pub key_hashes: Vec<String>,
    /// From forwarding a request until the replica's response head arrives
    /// (the body may then stream for longer); past it, 504.
    pub request_timeout: Duration,
    /// How long a request waits for a first ready replica; past it, 503.
    pub hold_timeout: Duration,
    /// At most this many requests wait at once; beyond it, 503.
    pub max_held: usize,
}

impl ServiceRoute {
    /// A route to `replicas` with no key, 60 s request and hold timeouts and
    /// up to 1,000 held requests.
    pub fn new(replicas: Vec<Upstream>) -> ServiceRoute {
        ServiceRoute {
            replicas,
            key_hashes: Vec::new(),
            request_timeout: Duration::from_secs(60),
            hold_timeout: Duration::from_secs(60),
            max_held: 1000,
        }
    }
}

/// SHA-256 hex of a service key, the form `ServiceRoute::key_hashes` holds.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A snapshot of one service's counters, for the autoscaler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceStats {
    /// Requests forwarded and not yet finished (response bodies included).
    pub in_flight: u32,
    /// Requests waiting for a first ready replica.
    pub held: u32,
    /// Requests received since the service was added (route updates keep it).
    pub requests_total: u64,
    pub last_request: Option<Instant>,
}

/// A replica as the hot path sees it: precomputed URI authority and `Host`
/// value, and its in-flight count (shared across route updates by id).
pub(crate) struct Replica {
    pub(crate) addr: SocketAddr,
    pub(crate) authority: Authority,
    pub(crate) host: HeaderValue,
    pub(crate) in_flight: Arc<AtomicU32>,
}

pub(crate) struct Route {
    /// Distinct for every route built (`set_service`), so that a client
    /// connection notices when to drop connections to replicas that left.
    pub(crate) generation: u64,
    pub(crate) replicas: Vec<Replica>,
    pub(crate) keys: Vec<[u8; 32]>,
    pub(crate) require_key: bool,
    pub(crate) request_timeout: Duration,
    pub(crate) hold_timeout: Duration,
    pub(crate) max_held: usize,
}

pub(crate) struct Service {
    pub(crate) name: Arc<str>,
    pub(crate) route: RwLock<Arc<Route>>,
    pub(crate) removed: AtomicBool,
    /// Woken when a route update brings ready replicas (or on removal).
    pub(crate) ready: Notify,
    /// Replica id → in-flight count; only route updates touch it.
    counts: Mutex<HashMap<String, Arc<AtomicU32>>>,
    pub(crate) requests_total: AtomicU64,
    /// Nanoseconds since the gateway's epoch, plus one; 0 = never.
    pub(crate) last_request: AtomicU64,
    /// Round-robin start among equally loaded replicas.
    pub(crate) rr: AtomicUsize,
    pub(crate) m: ServiceMetrics,
}

static ROUTE_GENERATION: AtomicU64 = AtomicU64::new(1);

type Table = HashMap<Box<str>, Arc<Service>>;

/// The gateway. Share it as `Arc<Gateway>`; every method takes `&self`.
pub struct Gateway {
    pub(crate) config: GatewayConfig,
    table: RwLock<Arc<Table>>,
    pub(crate) client: Client<HttpConnector, OutBody>,
    hook: RwLock<Option<DemandHook>>,
    metrics: GatewayMetrics,
    pub(crate) epoch: Instant,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("config", &self.config)
            .field("services", &self.snapshot().len())
            .finish()
    }
}

impl Gateway {
    pub fn new(config: GatewayConfig) -> Arc<Gateway> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .set_host(false)
            .build(http);
        Arc::new(Gateway {
            config,
            table: RwLock::new(Arc::new(Table::new())),
            client,
            hook: RwLock::new(None),
            metrics: GatewayMetrics::default(),
            epoch: Instant::now(),
        })
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// Adds a service or replaces its route. Requests in flight keep the
    /// replica they were sent to; counters and metrics carry over; requests
    /// held for a ready replica are woken when `route` has one.
    pub fn set_service(&self, name: &str, route: ServiceRoute) {
        let svc = match self.snapshot().get(name) {
            Some(svc) => svc.clone(),
            None => {
                let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
                match table.get(name) {
                    Some(svc) => svc.clone(),
                    None => {
                        let svc = Arc::new(Service {
                            name: Arc::from(name),
                            route: RwLock::new(Arc::new(Route {
                                generation: 0,
                                replicas: Vec::new(),
                                keys: Vec::new(),
                                require_key: false,
                                request_timeout: route.request_timeout,
                                hold_timeout: route.hold_timeout,
                                max_held: route.max_held,
                            })),
                            removed: AtomicBool::new(false),
                            ready: Notify::new(),
                            counts: Mutex::new(HashMap::new()),
                            requests_total: AtomicU64::new(0),
                            last_request: AtomicU64::new(0),
                            rr: AtomicUsize::new(0),
                            m: self.metrics.for_service(name),
                        });
                        let mut next = Table::clone(&table);
                        next.insert(Box::from(name), svc.clone());
                        *table = Arc::new(next);
                        svc
                    }
                }
            }
        };
        let built = {
            let mut counts = svc.counts.lock().unwrap_or_else(|e| e.into_inner());
            let replicas: Vec<Replica> = route
                .replicas
                .iter()
                .map(|u| {
                    let in_flight = counts.entry(u.id.clone()).or_default().clone();
                    let text = u.addr.to_string();
                    Replica {
                        addr: u.addr,
                        authority: Authority::try_from(text.as_str())
                            .expect("a socket address is a valid authority"),
                        host: HeaderValue::try_from(text)
                            .expect("a socket address is a valid header"),
                        in_flight,
                    }
                })
                .collect();
            // Forget replicas that left the route once nothing is in flight
            // to them; a busy one keeps its count should it come back.
            counts.retain(|id, n| {
                route.replicas.iter().any(|u| &u.id == id) || n.load(Ordering::Relaxed) > 0
            });
            let keys = route
                .key_hashes
                .iter()
                .filter_map(|h| {
                    let parsed = hex::decode(h.trim())
                        .ok()
                        .and_then(|b| <[u8; 32]>::try_from(b).ok());
                    if parsed.is_none() {
                        tracing::warn!(service = name, "ignoring a malformed key hash");
                    }
                    parsed
                })
                .collect();
            Route {
                generation: ROUTE_GENERATION.fetch_add(1, Ordering::Relaxed),
                replicas,
                keys,
                require_key: !route.key_hashes.is_empty(),
                request_timeout: route.request_timeout,
                hold_timeout: route.hold_timeout,
                max_held: route.max_held,
            }
        };
        let ready = !built.replicas.is_empty();
        *svc.route.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(built);
        if ready {
            svc.ready.notify_waiters();
        }
    }

    /// Removes a service: new requests get 404, held ones are answered 404;
    /// requests in flight finish normally.
    pub fn remove_service(&self, name: &str) {
        let removed = {
            let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
            if !table.contains_key(name) {
                return;
            }
            let mut next = Table::clone(&table);
            let svc = next.remove(name);
            *table = Arc::new(next);
            svc
        };
        if let Some(svc) = removed {
            svc.removed.store(true, Ordering::Release);
            svc.ready.notify_waiters();
        }
    }

    /// Names of the services in the table, sorted.
    pub fn services(&self) -> Vec<String> {
        let mut names: Vec<String> = self.snapshot().keys().map(|k| k.to_string()).collect();
        names.sort();
        names
    }

    /// Sets the hook called when a request finds no ready replica.
    pub fn set_demand_hook(&self, hook: DemandHook) {
        *self.hook.write().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    pub(crate) fn demand_hook(&self) -> Option<DemandHook> {
        self.hook.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Counters of one service; `None` when it is not in the table.
    pub fn stats(&self, name: &str) -> Option<ServiceStats> {
        let svc = self.service(name)?;
        let last = svc.last_request.load(Ordering::Relaxed);
        Some(ServiceStats {
            in_flight: svc.m.in_flight.get().max(0) as u32,
            held: svc.m.held.get().max(0) as u32,
            requests_total: svc.requests_total.load(Ordering::Relaxed),
            last_request: (last > 0).then(|| self.epoch + Duration::from_nanos(last - 1)),
        })
    }

    /// Requests of a service by latency bucket since it was added (bucket
    /// `i` holds latencies up to [`latency_bound`]`(i)` seconds; the last,
    /// everything slower): the control plane diffs two readings for a
    /// recent quantile.
    pub fn latency_buckets(&self, name: &str) -> Option<Vec<u64>> {
        let svc = self.service(name)?;
        Some(
            svc.m
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        )
    }

    /// The current concurrency of a service (in flight plus held): the
    /// value the autoscaler samples. Two atomic loads.
    pub fn concurrency(&self, name: &str) -> Option<u32> {
        let svc = self.service(name)?;
        Some((svc.m.in_flight.get().max(0) + svc.m.held.get().max(0)) as u32)
    }

    /// Registers the gateway's series into `registry`. The names assume the
    /// server's `Registry::with_prefix("tessera")`:
    /// `tessera_gateway_requests_total{service,code}` (code: `2xx`…),
    /// `tessera_gateway_request_duration_seconds{service}` (arrival to the
    /// end of the response body), `tessera_gateway_in_flight{service}` and
    /// `tessera_gateway_held{service}`. Unknown service names are not
    /// recorded, so clients cannot grow the label set.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.metrics.register(registry);
    }

    fn snapshot(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn service(&self, name: &str) -> Option<Arc<Service>> {
        self.table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }
}

impl Route {
    /// Whether `Authorization: Bearer <key>` carries one of the route's keys.
    pub(crate) fn authorized(&self, authorization: Option<&[u8]>) -> bool {
        if !self.require_key {
            return true;
        }
        let Some(key) = authorization
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
        else {
            return false;
        };
        let digest: [u8; 32] = Sha256::digest(key.trim().as_bytes()).into();
        self.keys.contains(&digest)
    }

    /// The least-loaded replica not yet tried (bit i of `tried` = replica
    /// i, for the first 64), starting the scan at a rotating offset so
    /// equally loaded replicas take turns.
    pub(crate) fn pick(&self, rr: &AtomicUsize, tried: u64) -> Option<usize> {
        let n = self.replicas.len();
        if n == 0 {
            return None;
        }
        let start = if n == 1 {
            0
        } else {
            rr.fetch_add(1, Ordering::Relaxed) % n
        };
        let mut best: Option<(usize, u32)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if i < 64 && tried & (1 << i) != 0 {
                continue;
            }
            let load = self.replicas[i].in_flight.load(Ordering::Relaxed);
            if best.is_none_or(|(_, b)| load < b) {
                best = Some((i, load));
            }
        }
        best.map(|(i, _)| i)
    }
}

/// The replicas one request tries in turn (another one only after a
/// connect failure): each the least-loaded replica not tried yet
/// (`Route::pick`), `total` of them at most.
pub(crate) struct Attempts {
    pub(crate) total: usize,
    made: usize,
    tried: u64,
}

impl Attempts {
    /// Up to `max` attempts: at least one, no more than there are replicas.
    pub(crate) fn new(route: &Route, max: usize) -> Attempts {
        Attempts {
            total: max.clamp(1, route.replicas.len().max(1)),
            made: 0,
            tried: 0,
        }
    }

    /// The next replica to try, while attempts and untried replicas are left.
    pub(crate) fn next_replica(&mut self, route: &Route, rr: &AtomicUsize) -> Option<usize> {
        if self.made == self.total {
            return None;
        }
        let i = route.pick(rr, self.tried)?;
        self.made += 1;
        if i < 64 {
            self.tried |= 1 << i;
        }
        Some(i)
    }

    /// Whether the attempt just made is the last one allowed.
    pub(crate) fn last(&self) -> bool {
        self.made == self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(loads: &[u32]) -> Route {
        Route {
            generation: 0,
            replicas: loads
                .iter()
                .map(|&l| Replica {
                    addr: "127.0.0.1:1".parse().unwrap(),
                    authority: Authority::from_static("127.0.0.1:1"),
                    host: HeaderValue::from_static("127.0.0.1:1"),
                    in_flight: Arc::new(AtomicU32::new(l)),
                })
                .collect(),
            keys: Vec::new(),
            require_key: false,
            request_timeout: Duration::from_secs(1),
            hold_timeout: Duration::from_secs(1),
            max_held: 1,
        }
    }

    #[test]
    fn pick_prefers_the_least_outstanding_and_rotates_ties() {
        let rr = AtomicUsize::new(0);
        assert_eq!(route(&[3, 1, 2]).pick(&rr, 0), Some(1));
        assert_eq!(route(&[3, 1, 2]).pick(&rr, 0b10), Some(2));
        let r = route(&[0, 0, 0]);
        let picks: Vec<_> = (0..6).map(|_| r.pick(&rr, 0).unwrap()).collect();
        for i in 0..3 {
            assert_eq!(picks.iter().filter(|&&p| p == i).count(), 2, "{picks:?}");
        }
        assert_eq!(route(&[0]).pick(&rr, 1), None);
        assert_eq!(route(&[]).pick(&rr, 0), None);
    }

    #[test]
    fn a_request_tries_each_replica_at_most_once_up_to_the_limit() {
        let rr = AtomicUsize::new(0);
        let tries = |loads: &[u32], max| {
            let r = route(loads);
            let mut a = Attempts::new(&r, max);
            let mut seen = Vec::new();
            while let Some(i) = a.next_replica(&r, &rr) {
                seen.push((i, a.last()));
            }
            seen
        };
        // The least loaded first; never the same replica twice.
        assert_eq!(
            tries(&[2, 0, 1], 5),
            vec![(1, false), (2, false), (0, true)]
        );
        assert_eq!(tries(&[2, 0, 1], 2), vec![(1, false), (2, true)]);
        // At least one attempt, and none without replicas.
        assert_eq!(tries(&[0], 0), vec![(0, true)]);
        assert_eq!(tries(&[], 3), vec![]);
    }

    #[test]
    fn keys_are_compared_by_hash() {
        let mut r = route(&[]);
        r.require_key = true;
        r.keys = vec![hex::decode(hash_key("s3cret")).unwrap().try_into().unwrap()];
        assert!(r.authorized(Some(b"Bearer s3cret")));
        assert!(!r.authorized(Some(b"Bearer other")));
        assert!(!r.authorized(Some(b"s3cret")));
        assert!(!r.authorized(None));
    }
}
