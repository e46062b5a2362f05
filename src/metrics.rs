//! Prometheus metrics (the `prometheus` crate: lock-free counters and histograms).
//!
//! Per-request counters are resolved once at startup into a flat table indexed by app, status
//! class and method, so the hot path does an atomic add, never a label lookup or allocation.
//! Labels never carry a secret: apps and clients by configured name, nothing from requests.
//! The `expect`s below are on metric definitions fixed at compile time, which cannot fail.

use std::borrow::Cow;
use std::time::Duration;

use http::Method;
use prometheus::core::Collector;
use prometheus::{
    exponential_buckets, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec,
    Opts, Registry, TextEncoder,
};

/// Methods with their own label value; anything else counts as `OTHER`.
const METHODS: [Method; 7] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
    Method::HEAD,
    Method::OPTIONS,
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Why a token was fetched (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchReason {
    /// The app had never had a token.
    FirstUse,
    /// Refreshed in the background before expiry.
    AheadOfExpiry,
    /// The token had expired with no refresh in time.
    Expired,
    /// The platform rejected the token.
    Rejected,
    /// `POST /tokens/{app}/refresh`.
    Forced,
}

impl FetchReason {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FetchReason::FirstUse => "first_use",
            FetchReason::AheadOfExpiry => "ahead_of_expiry",
            FetchReason::Expired => "expired",
            FetchReason::Rejected => "rejected",
            FetchReason::Forced => "forced",
        }
    }
}

/// Every metric the proxy exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `[app][class][method]`, flattened; the last app slot is for unrouted requests (`-`).
    requests: Vec<IntCounter>,
    apps: usize,
    overhead: Histogram,
    upstream: Histogram,
    token_fetches: IntCounterVec,
    token_seconds_left: GaugeVec,
    replays: IntCounterVec,
    rejections: IntCounterVec,
    platform_errors: IntCounterVec,
    upstream_errors: IntCounterVec,
    http_refused: IntCounterVec,
    by_client: IntCounterVec,
    /// `token_store_up`, registered when a store is first reported on (only a configured
    /// store is).
    redis_up: std::sync::OnceLock<Gauge>,
    /// The process collector's standard, unprefixed names (`process_cpu_seconds_total`…).
    process: Registry,
    /// The status page's 15 minutes of traffic per app.
    traffic: crate::status::Traffic,
    rate_limited: IntCounterVec,
    window_calls: prometheus::IntGaugeVec,
    log_dropped: prometheus::IntCounter,
}

impl Metrics {
    /// Registers every metric for the given app names.
    pub fn new(apps: &[&str]) -> Self {
        let registry =
            Registry::new_custom(Some("cx_proxy".into()), None).expect("static prefix is valid");
        // Each metric is created and registered in one step; names are fixed and unique.
        fn add<C: Collector + Clone + 'static>(
            registry: &Registry,
            metric: prometheus::Result<C>,
        ) -> C {
            let metric = metric.expect("static metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        }
        let counters = |name: &str, help: &str, labels: &[&str]| {
            add(&registry, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let histogram = |name: &str, help: &str| {
            let buckets = exponential_buckets(0.000_05, 2.0, 18).expect("static buckets");
            add(
                &registry,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)),
            )
        };
        let requests_vec = counters(
            "requests_total",
            "Requests answered, by app, status class and method",
            &["app", "status_class", "method"],
        );
        let mut requests =
            Vec::with_capacity((apps.len() + 1) * CLASSES.len() * (METHODS.len() + 1));
        for app in apps.iter().copied().chain(["-"]) {
            for class in CLASSES {
                for m in METHODS.iter().map(Method::as_str).chain(["OTHER"]) {
                    requests.push(requests_vec.with_label_values(&[app, class, m]));
                }
            }
        }
        let overhead = histogram(
            "overhead_seconds",
            "Time spent in the proxy itself per request (total minus upstream)",
        );
        let upstream = histogram(
            "upstream_seconds",
            "Time from sending upstream to the response head",
        );
        let token_fetches = counters(
            "token_fetches_total",
            "Token fetches by app, reason and result",
            &["app", "reason", "result"],
        );
        let token_seconds_left = add(
            &registry,
            GaugeVec::new(
                Opts::new(
                    "token_remaining_lifetime_seconds",
                    "Seconds until the app's current token expires (0: none)",
                ),
                &["app"],
            ),
        );
        let replays = counters(
            "replays_total",
            "Requests replayed after the platform rejected the token",
            &["app"],
        );
        let rejections = counters(
            "token_rejections_total",
            "Responses whose err_code said the token was rejected",
            &["app"],
        );
        let platform_errors = counters(
            "platform_errors_total",
            "Platform answers with a non-zero err_code, by app and code (codes the platform \
             does not document count as \"other\")",
            &["app", "code"],
        );
        let rate_limited = counters(
            "rate_limited_total",
            "Calls refused with 429 rate_limited, by app and rule (METHOD pattern)",
            &["app", "rule"],
        );
        let window_calls = add(
            &registry,
            prometheus::IntGaugeVec::new(
                Opts::new(
                    "limit_window_calls",
                    "Calls this instance counted in a call-limit window as of the last scrape, by app and rule \
                     (windows in use only)",
                ),
                &["app", "rule", "limit"],
            ),
        );
        let upstream_errors = counters(
            "upstream_errors_total",
            "Upstream exchanges that failed, by kind",
            &["kind"],
        );
        let http_refused = counters(
            "http_parse_errors_total",
            "Requests refused by the HTTP parser before the proxy saw them (400 or 431), by reason",
            &["reason"],
        );
        let by_client = counters(
            "client_requests_total",
            "Requests by identified client",
            &["client"],
        );
        let log_dropped = add(
            &registry,
            prometheus::IntCounter::new(
                "log_lines_dropped_total",
                "Log lines dropped because stderr did not take them: too slow (a stuck pipe or \
                 journald), closed or full; since the start",
            ),
        );
        // cx_proxy_build_info{version,commit} 1: which build answers (build.rs stamps it).
        let build_info = add(
            &registry,
            prometheus::IntGaugeVec::new(
                Opts::new(
                    "build_info",
                    "The running build: version and git commit (always 1)",
                ),
                &["version", "commit"],
            ),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("CX_BUILD_COMMIT")])
            .set(1);
        let process = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let collector = prometheus::process_collector::ProcessCollector::for_self();
            let _ = process.register(Box::new(collector));
        }
        // Make the per-app series visible from the start, at zero.
        for app in apps {
            token_seconds_left.with_label_values(&[app]).set(0.0);
            replays.with_label_values(&[app]);
        }
        Metrics {
            registry,
            requests,
            apps: apps.len(),
            overhead,
            upstream,
            token_fetches,
            token_seconds_left,
            replays,
            rejections,
            platform_errors,
            upstream_errors,
            http_refused,
            by_client,
            redis_up: std::sync::OnceLock::new(),
            process,
            traffic: crate::status::Traffic::new(apps.len()),
            rate_limited,
            window_calls,
            log_dropped,
        }
    }

    /// Counts one answered request. `app` is the app's index, `None` if unrouted.
    pub fn request(
        &self,
        app: Option<usize>,
        status: u16,
        method: &Method,
        total: Duration,
        upstream: Option<Duration>,
    ) {
        self.traffic.record(app, status >= 500);
        let app = app.filter(|&i| i < self.apps).unwrap_or(self.apps);
        let class = usize::from((status / 100).clamp(1, 5) - 1);
        let m = METHODS
            .iter()
            .position(|x| x == method)
            .unwrap_or(METHODS.len());
        let idx = (app * CLASSES.len() + class) * (METHODS.len() + 1) + m;
        if let Some(c) = self.requests.get(idx) {
            c.inc();
        }
        match upstream {
            Some(up) => {
                self.upstream.observe(up.as_secs_f64());
                self.overhead
                    .observe(total.saturating_sub(up).as_secs_f64());
            }
            None => self.overhead.observe(total.as_secs_f64()),
        }
    }

    /// Counts a token fetch.
    pub fn token_fetch(&self, app: &str, reason: FetchReason, result: &str) {
        self.token_fetches
            .with_label_values(&[app, reason.as_str(), result])
            .inc();
    }

    /// Counts a rejected token.
    pub fn rejection(&self, app: &str) {
        self.rejections.with_label_values(&[app]).inc();
    }

    /// A call refused by a call-limit rule.
    pub fn rate_limited(&self, app: &str, rule: &str) {
        self.rate_limited.with_label_values(&[app, rule]).inc();
    }

    /// The calls counted in each window in use: `(app, rule, limit, calls)`.
    pub fn limit_windows(&self, windows: &[(&str, String, u32, u32)]) {
        self.window_calls.reset();
        for (app, rule, limit, calls) in windows {
            self.window_calls
                .with_label_values(&[*app, rule.as_str(), &limit.to_string()])
                .set(i64::from(*calls));
        }
    }

    /// Counts a platform answer with a non-zero `err_code`.
    pub fn platform_error(&self, app: &str, code: i64) {
        let label = if crate::platform::code::DOCUMENTED.contains(&code) {
            Cow::Owned(code.to_string())
        } else {
            Cow::Borrowed("other")
        };
        self.platform_errors.with_label_values(&[app, &label]).inc();
    }

    /// Counts a replay.
    pub fn replay(&self, app: &str) {
        self.replays.with_label_values(&[app]).inc();
    }

    /// Counts a request hyper's parser refused before the proxy saw it (`uri`, `method`,
    /// `header`, `version`, `too_large`, `other`).
    pub fn http_refused(&self, reason: &str) {
        self.http_refused.with_label_values(&[reason]).inc();
    }

    /// Counts an upstream failure (`unreachable`, `timeout`).
    pub fn upstream_error(&self, kind: &str) {
        self.upstream_errors.with_label_values(&[kind]).inc();
    }

    /// The request counter of an identified client (count with `inc`).
    pub fn client_counter(&self, client: &str) -> IntCounter {
        self.by_client.with_label_values(&[client])
    }

    /// Sets the seconds-left gauge (done at scrape time).
    pub fn set_seconds_left(&self, app: &str, secs: f64) {
        self.token_seconds_left.with_label_values(&[app]).set(secs);
    }

    /// Platform error answers so far, as (app, code, count), for the status page.
    pub fn platform_error_counts(&self) -> Vec<(String, String, u64)> {
        samples(&self.platform_errors)
            .map(|m| {
                let value = m.get_counter().get_value() as u64;
                (label(&m, "app"), label(&m, "code"), value)
            })
            .collect()
    }

    /// Call-limit windows in use, as (app, rule, calls in the window, limit), for the
    /// status page.
    pub fn window_use(&self) -> Vec<(String, String, i64, String)> {
        samples(&self.window_calls)
            .map(|m| {
                let calls = m.get_gauge().get_value() as i64;
                (
                    label(&m, "app"),
                    label(&m, "rule"),
                    calls,
                    label(&m, "limit"),
                )
            })
            .collect()
    }

    /// The status page's traffic buckets.
    pub fn traffic(&self) -> &crate::status::Traffic {
        &self.traffic
    }

    /// Sets whether the shared token store is reachable.
    pub fn set_store_up(&self, up: bool) {
        let gauge = self.redis_up.get_or_init(|| {
            let gauge = Gauge::with_opts(Opts::new(
                "token_store_up",
                "1 while the shared token store is reachable and takes writes, 0 when it is \
                 down or refuses writes (present only with a store configured)",
            ))
            .expect("static metric");
            let _ = self.registry.register(Box::new(gauge.clone()));
            gauge
        });
        gauge.set(if up { 1.0 } else { 0.0 });
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        // The count lives in the logger (process-wide, across reloads); caught up here.
        let dropped = crate::logging::dropped_lines();
        if let Some(new) = dropped.checked_sub(self.log_dropped.get()) {
            self.log_dropped.inc_by(new);
        }
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }
}

/// Every sample a collector holds (one per label set).
fn samples(c: &impl Collector) -> impl Iterator<Item = prometheus::proto::Metric> {
    c.collect()
        .into_iter()
        .flat_map(|family| family.get_metric().to_vec())
}

/// A sample's value for label `name` (empty if it has none).
fn label(m: &prometheus::proto::Metric, name: &str) -> String {
    m.get_label()
        .iter()
        .find(|l| l.name() == name)
        .map(|l| l.value().to_owned())
        .unwrap_or_default()
}

/// The callback relay's metrics (SPEC section 6), in a registry of their own: the relay
/// outlives the proxy generations a reload replaces. Labels are configured route names (`-`
/// for an unknown path) and fixed words, never anything a sender wrote.
#[derive(Debug)]
pub struct CallbackMetrics {
    registry: Registry,
    received: IntCounterVec,
    deliveries: IntCounterVec,
    depth: prometheus::IntGaugeVec,
    oldest: GaugeVec,
    dead: prometheus::IntGaugeVec,
}

impl Default for CallbackMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl CallbackMetrics {
    /// Registers the relay's metrics.
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("cx_proxy".into()), None).expect("static prefix is valid");
        fn add<C: Collector + Clone + 'static>(registry: &Registry, m: prometheus::Result<C>) -> C {
            let m = m.expect("static metric");
            registry
                .register(Box::new(m.clone()))
                .expect("unique metric");
            m
        }
        let route = &["route"];
        CallbackMetrics {
            received: add(&registry, IntCounterVec::new(
                Opts::new("callbacks_received_total", "Callbacks received, by route, result (accepted, repeat, rejected, unavailable, refused) and reason"),
                &["route", "result", "reason"],
            )),
            deliveries: add(&registry, IntCounterVec::new(
                Opts::new("callback_deliveries_total", "Delivery attempts, by route and result (delivered, failed, dead_lettered)"),
                &["route", "result"],
            )),
            depth: add(&registry, prometheus::IntGaugeVec::new(
                Opts::new("callback_queue_depth", "Events waiting for delivery, by route"),
                route,
            )),
            oldest: add(&registry, GaugeVec::new(
                Opts::new("callback_oldest_pending_age_seconds", "Age of the oldest event waiting for delivery, by route (0 when none)"),
                route,
            )),
            dead: add(&registry, prometheus::IntGaugeVec::new(
                Opts::new("callback_dead_letters", "Dead-lettered events, by route"),
                route,
            )),
            registry,
        }
    }

    /// One callback answered.
    pub fn received(&self, route: &str, result: &str, reason: &str) {
        self.received
            .with_label_values(&[route, result, reason])
            .inc();
    }

    /// One delivery attempt's outcome.
    pub fn delivery(&self, route: &str, result: &str) {
        self.deliveries.with_label_values(&[route, result]).inc();
    }

    /// A route's queue as last seen: pending events, age of the oldest, dead letters.
    pub fn queue(&self, route: &str, pending: u64, oldest: Duration, dead: u64) {
        self.depth
            .with_label_values(&[route])
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        self.oldest
            .with_label_values(&[route])
            .set(oldest.as_secs_f64());
        self.dead
            .with_label_values(&[route])
            .set(i64::try_from(dead).unwrap_or(i64::MAX));
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_land_on_their_labels() {
        let m = Metrics::new(&["a", "b"]);
        m.request(
            Some(1),
            200,
            &Method::POST,
            Duration::from_millis(3),
            Some(Duration::from_millis(2)),
        );
        m.request(
            None,
            404,
            &Method::from_bytes(b"PURGE").unwrap(),
            Duration::from_millis(1),
            None,
        );
        let text = m.render();
        assert!(
            text.contains(r#"cx_proxy_requests_total{app="b",method="POST",status_class="2xx"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"cx_proxy_requests_total{app="-",method="OTHER",status_class="4xx"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("cx_proxy_upstream_seconds_count 1"), "{text}");
        assert!(text.contains("cx_proxy_overhead_seconds_count 2"), "{text}");
    }
}
