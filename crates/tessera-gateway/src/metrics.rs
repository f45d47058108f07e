//! Per-service Prometheus series. Each service resolves its label sets once,
//! when it is added, and keeps the handles: the request path touches only
//! atomics (and the histogram's own lock), never the families' maps.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ServiceLabel {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ServiceCodeLabel {
    pub service: String,
    pub code: &'static str,
}

/// Upper bounds (seconds) of the latency buckets: 0.5 ms … ~4.4 min,
/// doubling; a last bucket holds everything slower.
pub const LATENCY_BOUNDS: usize = 20;

pub fn latency_bound(i: usize) -> f64 {
    0.0005 * 2f64.powi(i as i32)
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, LATENCY_BOUNDS as u16))
}

type HistogramFamily = Family<ServiceLabel, Histogram, fn() -> Histogram>;

#[derive(Clone)]
pub(crate) struct GatewayMetrics {
    requests: Family<ServiceCodeLabel, Counter>,
    duration: HistogramFamily,
    in_flight: Family<ServiceLabel, Gauge>,
    held: Family<ServiceLabel, Gauge>,
}

impl Default for GatewayMetrics {
    fn default() -> GatewayMetrics {
        GatewayMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            in_flight: Family::default(),
            held: Family::default(),
        }
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// One service's handles into the families.
pub(crate) struct ServiceMetrics {
    by_class: [Counter; 5],
    duration: Histogram,
    /// The same latencies, in counters the control plane can read (the
    /// histogram's own are private to the metrics library).
    pub buckets: std::sync::Arc<[std::sync::atomic::AtomicU64; LATENCY_BOUNDS + 1]>,
    /// Also the service's in-flight count for `Gateway::stats`.
    pub in_flight: Gauge,
    /// Also the service's held count (and the hold queue's bound check).
    pub held: Gauge,
}

impl ServiceMetrics {
    pub fn count(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].inc();
    }

    /// Records a request that arrived at `start` and has now ended.
    pub fn observe(&self, start: std::time::Instant) {
        let secs = start.elapsed().as_secs_f64();
        self.duration.observe(secs);
        let i = (0..LATENCY_BOUNDS)
            .find(|&i| secs <= latency_bound(i))
            .unwrap_or(LATENCY_BOUNDS);
        self.buckets[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl GatewayMetrics {
    pub fn for_service(&self, name: &str) -> ServiceMetrics {
        let label = ServiceLabel {
            service: name.to_string(),
        };
        ServiceMetrics {
            by_class: CLASSES.map(|code| {
                self.requests
                    .get_or_create(&ServiceCodeLabel {
                        service: name.to_string(),
                        code,
                    })
                    .clone()
            }),
            duration: self.duration.get_or_create(&label).clone(),
            buckets: std::sync::Arc::new(std::array::from_fn(|_| Default::default())),
            in_flight: self.in_flight.get_or_create(&label).clone(),
            held: self.held.get_or_create(&label).clone(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "gateway_requests",
            "Requests to known services by status class",
            self.requests.clone(),
        );
        registry.register_with_unit(
            "gateway_request_duration",
            "From arrival to the end of the response body",
            Unit::Seconds,
            self.duration.clone(),
        );
        registry.register(
            "gateway_in_flight",
            "Requests forwarded and not yet finished",
            self.in_flight.clone(),
        );
        registry.register(
            "gateway_held",
            "Requests waiting for a first ready replica",
            self.held.clone(),
        );
    }
}
