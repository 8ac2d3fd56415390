//! What the host counts, and its Prometheus exposition.
//!
//! Two kinds of state, both plain atomics so that recording costs no lock,
//! no allocation and no syscall on the request path:
//!
//! - per service, a [`ServiceTraffic`] held by the service's table entry
//!   (built once per entry, so the gateway never resolves labels per
//!   request): answers by route template, method and status class,
//!   latency histograms, requests in flight, upstream errors. A service
//!   that leaves the table takes its series with it: the exposition is
//!   built from the table at scrape time ([`render`]), so label values
//!   are bounded by what is routable;
//! - host-wide, the [`host`] counters: plugin loads, replacements,
//!   unloads and refusals by [`Refusal`] reason, load durations,
//!   heartbeats and health checks.
//!
//! The text is written by `prometheus-client`'s encoders from
//! collectors built per scrape; nothing here knows a service table, a
//! plugin or a remote service: the caller describes each service in a
//! [`ServiceSample`].
//!
//! `[metrics] enabled = false` ([`set_enabled`]) skips the per-route
//! counters and the histograms, which is what the benchmark compares;
//! the totals the registry lists (`traffic`) are always kept.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// `[metrics]` in the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// `--metrics on|off`. Needs a restart.
    pub enabled: Option<bool>,
    /// `--metrics-path`. Needs a restart.
    pub path: Option<String>,
}

/// `--metrics`: whether the detailed metrics are recorded and served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    /// Recorded, and served at `--metrics-path`.
    On,
    /// Not recorded (the registry's traffic totals still are), not served.
    Off,
}

impl From<bool> for Switch {
    fn from(on: bool) -> Self {
        if on { Self::On } else { Self::Off }
    }
}

/// `--metrics-path`: an absolute path that no registry endpoint uses.
pub fn check_path(path: String) -> Result<String, String> {
    if !path.starts_with('/') || path.len() < 2 {
        return Err(format!("`{path}` must be an absolute path like /metrics"));
    }
    if path.starts_with("/api/") || ["/healthz", "/readyz"].contains(&path.as_str()) {
        return Err(format!(
            "`{path}` is taken by the registry listener's own endpoints"
        ));
    }
    if path.contains(|c: char| c.is_whitespace() || c == '?' || c == '#' || c == '{') {
        return Err(format!("`{path}` is not a plain path"));
    }
    Ok(path)
}

/// Whether the detailed metrics are recorded (`[metrics] enabled`).
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Switches the detailed metrics on or off for the whole process; set
/// once at start-up, before anything is served.
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// Whether the detailed metrics are recorded.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Upper bounds of the latency buckets, in seconds: from a plugin's
/// sub-millisecond answer to the default request timeout.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram with fixed buckets: one atomic per bucket, and the
/// sum in nanoseconds. The count is the buckets' total, so a scrape never
/// sees a count that disagrees with them.
#[derive(Debug)]
pub struct Histogram {
    /// Observations per bucket (not cumulative), the last one `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::empty()
    }
}

impl Histogram {
    /// A histogram with no observations.
    const fn empty() -> Self {
        Self {
            buckets: [const { AtomicU64::new(0) }; LATENCY_BUCKETS.len() + 1],
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets
            .iter()
            .map(|bucket| bucket.load(Ordering::Relaxed))
            .sum()
    }

    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        // Per bucket: the encoder makes them cumulative.
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(&self.buckets)
            .map(|(bound, count)| (bound, count.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, count)| count).sum();
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

/// The methods a route's counters tell apart; anything else is `other`.
const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other",
];

fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::PATCH => 4,
        Method::DELETE => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn class_index(status: StatusCode) -> usize {
    usize::from(status.as_u16() / 100).clamp(1, 5) - 1
}

/// Why a remote service gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    /// No connection could be made.
    Connect,
    /// No answer within the request timeout.
    Timeout,
    /// The connection broke or the answer was not HTTP.
    Reset,
}

impl UpstreamError {
    const ALL: [Self; 3] = [Self::Connect, Self::Timeout, Self::Reset];

    fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Reset => "reset",
        }
    }
}

/// One service's traffic since its table entry was made.
#[derive(Debug)]
pub struct ServiceTraffic {
    requests: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicI64,
    /// The declared path templates, in declaration order; the route index
    /// `routes.len()` is `other`.
    routes: Box<[Box<str>]>,
    /// The per-route counters and the histograms, made at the first
    /// request: most of a service's footprint, which a registry of
    /// thousands of idle services would otherwise hold for each.
    detail: OnceLock<Box<Detail>>,
    upstream_errors: [AtomicU64; UpstreamError::ALL.len()],
}

/// The series of a service that has had requests.
#[derive(Debug)]
struct Detail {
    /// Answers by `[route][method][status class]`, flattened.
    answers: Box<[AtomicU64]>,
    latency: Histogram,
    upstream_latency: Histogram,
}

/// What a service without requests shows: no answers, empty histograms.
static NO_LATENCY: Histogram = Histogram::empty();

impl ServiceTraffic {
    /// Counters for a service declaring these path templates (one per
    /// endpoint, in the order the route indexes given to
    /// [`Started::finish`] refer to).
    pub fn new<'a>(routes: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            routes: routes.into_iter().map(Box::from).collect(),
            detail: OnceLock::new(),
            upstream_errors: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// The detailed series, made now if this is the first request.
    fn detail(&self) -> &Detail {
        self.detail.get_or_init(|| {
            let slots = (self.routes.len() + 1) * METHODS.len() * STATUS_CLASSES.len();
            Box::new(Detail {
                answers: (0..slots).map(|_| AtomicU64::new(0)).collect(),
                latency: Histogram::empty(),
                upstream_latency: Histogram::empty(),
            })
        })
    }

    fn latency(&self) -> &Histogram {
        self.detail
            .get()
            .map_or(&NO_LATENCY, |detail| &detail.latency)
    }

    fn upstream_latency(&self) -> &Histogram {
        self.detail
            .get()
            .map_or(&NO_LATENCY, |detail| &detail.upstream_latency)
    }

    /// A request that arrived `at` enters: in flight until the returned
    /// guard is finished or dropped (a client that went away).
    pub fn start(self: &Arc<Self>, at: Instant) -> Started {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Started {
            traffic: self.clone(),
            at,
        }
    }

    /// Records the time a remote service took to answer (its head).
    pub fn upstream_answered(&self, elapsed: Duration) {
        if enabled() {
            self.detail().upstream_latency.observe(elapsed);
        }
    }

    /// Records a remote service that gave no answer.
    pub fn upstream_failed(&self, error: UpstreamError) {
        self.upstream_errors[error as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Answers given.
    pub fn requests_total(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Answers given with a 5xx status.
    pub fn errors_total(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Requests not answered yet.
    pub fn in_flight(&self) -> u64 {
        u64::try_from(self.in_flight.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// The route label of route index `route` (`None` or out of range:
    /// `other`).
    pub fn route_label(&self, route: Option<usize>) -> &str {
        route
            .and_then(|route| self.routes.get(route))
            .map_or("other", |route| route)
    }

    fn slot(&self, route: usize, method: usize, class: usize) -> usize {
        (route * METHODS.len() + method) * STATUS_CLASSES.len() + class
    }
}

/// A request of a service in flight; [`Started::finish`] records its
/// answer.
#[derive(Debug)]
pub struct Started {
    traffic: Arc<ServiceTraffic>,
    at: Instant,
}

impl Started {
    /// The route label of route index `route`.
    pub fn route_label(&self, route: Option<usize>) -> &str {
        self.traffic.route_label(route)
    }

    /// Records the answer to `method` on route index `route` (`None`: a
    /// path no declared template matches).
    pub fn finish(self, route: Option<usize>, method: &Method, status: StatusCode) {
        let elapsed = self.at.elapsed();
        let traffic = &self.traffic;
        traffic.requests.fetch_add(1, Ordering::Relaxed);
        if status.is_server_error() {
            traffic.errors.fetch_add(1, Ordering::Relaxed);
        }
        if enabled() {
            let route = route
                .filter(|route| *route < traffic.routes.len())
                .unwrap_or(traffic.routes.len());
            let slot = traffic.slot(route, method_index(method), class_index(status));
            let detail = traffic.detail();
            detail.answers[slot].fetch_add(1, Ordering::Relaxed);
            detail.latency.observe(elapsed);
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.traffic.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a plugin file was refused: a bounded label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The file checks, or reading the file, failed.
    File,
    /// No plugin threads left.
    Threads,
    /// Not a loadable plugin: `dlopen`, the ABI, `config` or the
    /// declaration failed.
    Library,
    /// Its digest does not match the pin of its name.
    Pin,
    /// Another service holds its name.
    NameTaken,
    /// Its `init` failed, panicked or hung.
    Init,
}

impl Refusal {
    const ALL: [Self; 6] = [
        Self::File,
        Self::Threads,
        Self::Library,
        Self::Pin,
        Self::NameTaken,
        Self::Init,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Threads => "threads",
            Self::Library => "library",
            Self::Pin => "pin",
            Self::NameTaken => "name_taken",
            Self::Init => "init",
        }
    }
}

/// Host-wide counters: the plugin lifecycle and the registry's liveness.
#[derive(Debug, Default)]
pub struct HostMetrics {
    loads: AtomicU64,
    replacements: AtomicU64,
    unloads: AtomicU64,
    refusals: [AtomicU64; Refusal::ALL.len()],
    load_duration: Histogram,
    heartbeats: AtomicU64,
    checks_ok: AtomicU64,
    checks_failed: AtomicU64,
}

static HOST: std::sync::LazyLock<HostMetrics> = std::sync::LazyLock::new(HostMetrics::default);

/// The process's host-wide counters.
pub fn host() -> &'static HostMetrics {
    &HOST
}

impl HostMetrics {
    /// A plugin was mounted (`replaced`: over an earlier version of its
    /// file) after `took` of loading.
    pub fn plugin_loaded(&self, replaced: bool, took: Duration) {
        self.loads.fetch_add(1, Ordering::Relaxed);
        if replaced {
            self.replacements.fetch_add(1, Ordering::Relaxed);
        }
        self.load_duration.observe(took);
    }

    /// A plugin was unloaded.
    pub fn plugin_unloaded(&self) {
        self.unloads.fetch_add(1, Ordering::Relaxed);
    }

    /// A plugin file was refused.
    pub fn plugin_refused(&self, reason: Refusal) {
        self.refusals[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A heartbeat was accepted.
    pub fn heartbeat(&self) {
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
    }

    /// An active health check ended.
    pub fn health_check(&self, ok: bool) {
        let counter = if ok {
            &self.checks_ok
        } else {
            &self.checks_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// One service as the exposition shows it, described by its caller at
/// scrape time.
#[derive(Debug)]
pub struct ServiceSample {
    /// Its name.
    pub name: String,
    /// `plugin` or `remote`.
    pub kind: &'static str,
    /// `healthy` or `unhealthy`.
    pub state: &'static str,
    /// Its counters.
    pub traffic: Arc<ServiceTraffic>,
    /// Instances by state, `(healthy, unhealthy)`.
    pub instances: (u64, u64),
    /// Time since its last heartbeat (remote services that sent one).
    pub since_heartbeat: Option<Duration>,
    /// A plugin's runtime: requests queued, workers busy, workers.
    pub plugin: Option<PluginSample>,
}

/// A plugin runtime's load at scrape time.
#[derive(Debug, Clone, Copy)]
pub struct PluginSample {
    /// Requests waiting for a worker.
    pub queued: u64,
    /// Workers running a handler now.
    pub busy: u64,
    /// Workers.
    pub workers: u64,
}

/// The Prometheus text exposition (format 0.0.4) of the host's counters
/// and of `services`.
pub fn render(services: Vec<ServiceSample>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(HostCollector));
    registry.register_collector(Box::new(ServicesCollector(services)));
    let mut text = String::new();
    // Written into a `String`: formatting cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry);
    text
}

/// Labels as the encoder takes them.
type Labels<'a, const N: usize> = [(&'static str, &'a str); N];

/// Encodes a counter family: one sample per label set.
fn counters<'l, const N: usize>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Labels<'l, N>, u64)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in values {
        family
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
    }
    Ok(())
}

/// Encodes a gauge family: one sample per label set.
fn gauges<'l, const N: usize, V: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Labels<'l, N>, V)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in values {
        family.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

/// Encodes a histogram family: one histogram per label set.
fn histograms<'h, const N: usize>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Labels<'h, N>, &'h Histogram)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, histogram) in values {
        histogram.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The labels of a per-service series.
fn by_service(service: &ServiceSample) -> Labels<'_, 1> {
    [("service", service.name.as_str())]
}

#[derive(Debug)]
struct ServicesCollector(Vec<ServiceSample>);

impl Collector for ServicesCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let services = &self.0;
        let mut answers = Vec::new();
        for service in services {
            let traffic = &service.traffic;
            let Some(detail) = traffic.detail.get() else {
                continue;
            };
            for (route, route_label) in traffic
                .routes
                .iter()
                .map(|route| &**route)
                .chain(["other"])
                .enumerate()
            {
                for (method, method_label) in METHODS.iter().enumerate() {
                    for (class, class_label) in STATUS_CLASSES.iter().enumerate() {
                        let count = detail.answers[traffic.slot(route, method, class)]
                            .load(Ordering::Relaxed);
                        if count > 0 {
                            answers.push((
                                [
                                    ("service", service.name.as_str()),
                                    ("route", route_label),
                                    ("method", *method_label),
                                    ("status_class", *class_label),
                                ],
                                count,
                            ));
                        }
                    }
                }
            }
        }
        counters(
            &mut encoder,
            "gateway_requests",
            "Requests answered, by service, route template, method and status class",
            answers,
        )?;
        histograms(
            &mut encoder,
            "gateway_request_duration_seconds",
            "Time from the service lookup to the answer's head, by service",
            services
                .iter()
                .map(|service| (by_service(service), service.traffic.latency())),
        )?;
        histograms(
            &mut encoder,
            "proxy_upstream_duration_seconds",
            "Time a remote service took to answer (its head)",
            services
                .iter()
                .filter(|service| service.kind == "remote")
                .map(|service| (by_service(service), service.traffic.upstream_latency())),
        )?;
        gauges(
            &mut encoder,
            "gateway_requests_in_flight",
            "Requests not answered yet, by service",
            services
                .iter()
                .map(|service| (by_service(service), service.traffic.in_flight() as i64)),
        )?;
        counters(
            &mut encoder,
            "proxy_upstream_errors",
            "Requests a remote service gave no answer to, by kind",
            services
                .iter()
                .filter(|service| service.kind == "remote")
                .flat_map(|service| {
                    UpstreamError::ALL.iter().map(move |error| {
                        (
                            [("service", service.name.as_str()), ("kind", error.label())],
                            service.traffic.upstream_errors[*error as usize]
                                .load(Ordering::Relaxed),
                        )
                    })
                }),
        )?;
        let plugins = || {
            services
                .iter()
                .filter_map(|service| Some((by_service(service), service.plugin?)))
        };
        gauges(
            &mut encoder,
            "plugin_queue_depth",
            "Requests waiting for a plugin worker",
            plugins().map(|(labels, plugin)| (labels, plugin.queued as i64)),
        )?;
        gauges(
            &mut encoder,
            "plugin_workers_busy",
            "Plugin workers running a handler",
            plugins().map(|(labels, plugin)| (labels, plugin.busy as i64)),
        )?;
        gauges(
            &mut encoder,
            "plugin_workers",
            "Plugin worker threads",
            plugins().map(|(labels, plugin)| (labels, plugin.workers as i64)),
        )?;
        let mut by_state = std::collections::BTreeMap::<(&str, &str), (i64, i64)>::new();
        for service in services {
            let entry = by_state.entry((service.kind, service.state)).or_default();
            entry.0 += 1;
            for (state, count) in [
                ("healthy", service.instances.0),
                ("unhealthy", service.instances.1),
            ] {
                by_state.entry((service.kind, state)).or_default().1 += count as i64;
            }
        }
        gauges(
            &mut encoder,
            "registry_services",
            "Services in the table, by kind and state",
            by_state
                .iter()
                .map(|((kind, state), (count, _))| ([("kind", *kind), ("state", *state)], *count)),
        )?;
        gauges(
            &mut encoder,
            "registry_instances",
            "Instances of the services in the table, by kind and state",
            by_state
                .iter()
                .map(|((kind, state), (_, count))| ([("kind", *kind), ("state", *state)], *count)),
        )?;
        gauges(
            &mut encoder,
            "registry_seconds_since_heartbeat",
            "Seconds since a remote service's last heartbeat",
            services.iter().filter_map(|service| {
                Some((by_service(service), service.since_heartbeat?.as_secs_f64()))
            }),
        )
    }
}

#[derive(Debug)]
struct HostCollector;

impl Collector for HostCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let host = host();
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        counters(
            &mut encoder,
            "plugin_lifecycle_events",
            "Plugin loads, replacements and unloads",
            [
                ([("event", "load")], load(&host.loads)),
                ([("event", "replace")], load(&host.replacements)),
                ([("event", "unload")], load(&host.unloads)),
            ],
        )?;
        counters(
            &mut encoder,
            "plugin_refusals",
            "Plugin files refused, by reason",
            Refusal::ALL.iter().map(|reason| {
                (
                    [("reason", reason.label())],
                    load(&host.refusals[*reason as usize]),
                )
            }),
        )?;
        histograms(
            &mut encoder,
            "plugin_load_duration_seconds",
            "Time from reading a plugin file to mounting it",
            [([], &host.load_duration)],
        )?;
        counters(
            &mut encoder,
            "registry_heartbeats",
            "Heartbeats accepted",
            [([], load(&host.heartbeats))],
        )?;
        counters(
            &mut encoder,
            "registry_health_checks",
            "Active health checks, by result",
            [
                ([("result", "healthy")], load(&host.checks_ok)),
                ([("result", "unhealthy")], load(&host.checks_failed)),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_each_observation_once_in_its_bucket() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_micros(300));
        histogram.observe(Duration::from_millis(7));
        histogram.observe(Duration::from_secs(60));
        assert_eq!(histogram.count(), 3);
        assert_eq!(histogram.buckets[0].load(Ordering::Relaxed), 1);
        assert_eq!(histogram.buckets[4].load(Ordering::Relaxed), 1, "<= 10 ms");
        assert_eq!(
            histogram.buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn answers_are_counted_by_route_method_and_class_and_exposed() {
        let traffic = Arc::new(ServiceTraffic::new(["/items/{id}"]));
        let started = traffic.start(Instant::now());
        assert_eq!(traffic.in_flight(), 1);
        started.finish(Some(0), &Method::GET, StatusCode::OK);
        traffic.start(Instant::now()).finish(
            None,
            &Method::from_bytes(b"PURGE").unwrap(),
            StatusCode::BAD_GATEWAY,
        );
        // A client that went away: in flight no more, not answered.
        drop(traffic.start(Instant::now()));
        assert_eq!(traffic.in_flight(), 0);
        assert_eq!(traffic.requests_total(), 2);
        assert_eq!(traffic.errors_total(), 1);
        traffic.upstream_failed(UpstreamError::Timeout);

        let text = render(vec![ServiceSample {
            name: "shop".to_owned(),
            kind: "remote",
            state: "healthy",
            traffic,
            instances: (2, 1),
            since_heartbeat: Some(Duration::from_secs(3)),
            plugin: None,
        }]);
        for line in [
            "# TYPE gateway_requests_total counter",
            r#"gateway_requests_total{service="shop",route="/items/{id}",method="GET",status_class="2xx"} 1"#,
            r#"gateway_requests_total{service="shop",route="other",method="other",status_class="5xx"} 1"#,
            r#"gateway_request_duration_seconds_count{service="shop"} 2"#,
            r#"gateway_request_duration_seconds_bucket{service="shop",le="+Inf"} 2"#,
            r#"gateway_requests_in_flight{service="shop"} 0"#,
            r#"proxy_upstream_errors_total{service="shop",kind="timeout"} 1"#,
            r#"proxy_upstream_errors_total{service="shop",kind="connect"} 0"#,
            r#"registry_services{kind="remote",state="healthy"} 1"#,
            r#"registry_instances{kind="remote",state="unhealthy"} 1"#,
            r#"registry_seconds_since_heartbeat{service="shop"} 3.0"#,
            r#"plugin_refusals_total{reason="name_taken"} "#,
        ] {
            assert!(text.contains(line), "no `{line}` in:\n{text}");
        }
    }

    #[test]
    fn a_metrics_path_must_be_plain_absolute_and_free() {
        assert_eq!(check_path("/metrics".to_owned()).as_deref(), Ok("/metrics"));
        assert!(check_path("/internal/metrics".to_owned()).is_ok());
        for taken in ["metrics", "/", "/api/registry/x", "/readyz", "/a b", "/x?y"] {
            assert!(check_path(taken.to_owned()).is_err(), "{taken}");
        }
    }
}
