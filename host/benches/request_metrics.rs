//! What the detailed metrics and the choice of a version add to one
//! gateway request, measured alone.
//!
//! The end-to-end comparisons (`bench/run --only 1 --compare-metrics-off`,
//! the `plugin-2-versions` targets) cannot resolve a cost of a few percent
//! on the plugin path: their rounds spread more than that on a shared VM.
//! This measures the work itself, the calls `gateway::dispatch` makes per
//! request: the metrics' bookkeeping off and on, and the service lookup
//! alone against the lookup with the version choice and the answer's
//! `X-Service-Version`. BENCHMARKS.md divides each difference by the
//! host's CPU time per request from scenario 1.
//!
//! Run with `cargo bench -p plugin-host --bench request_metrics`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use criterion::{Criterion, criterion_group, criterion_main};
use plugin_host::gateway::X_SERVICE_VERSION;
use plugin_host::metrics::{self, ServiceTraffic};
use plugin_host::remote::{RemoteService, RemoteSpec};
use plugin_host::service::{RouteTemplates, ServiceInfo, Version};
use plugin_host::table::{Backend, Selection, Service, ServiceTable};

/// The `hello` example plugin's declaration: the service scenario 1 calls.
fn hello() -> ServiceInfo {
    let endpoint = |method: &str, path: &str| serde_json::json!({"method": method, "path": path, "description": "", "is_public": true});
    serde_json::from_value(serde_json::json!({
        "name": "hello",
        "display_name": "Hello Service",
        "description": "",
        "version": "0.1.0",
        "health_check_url": "/health",
        "metadata": {},
        "tags": [],
        "requires_auth": false,
        "endpoints": [
            endpoint("GET", "/"),
            endpoint("GET", "/health"),
            endpoint("GET", "/hello"),
            endpoint("GET", "/data"),
            endpoint("POST", "/data"),
            endpoint("GET", "/data/{id}"),
        ],
    }))
    .expect("a valid declaration")
}

/// One request's bookkeeping as the gateway does it: in flight from its
/// arrival, the route matched only when the metrics are on, the answer
/// recorded.
fn bookkeeping(c: &mut Criterion) {
    let info = hello();
    let routes = RouteTemplates::compile(&info);
    let traffic = Arc::new(ServiceTraffic::new(
        info.endpoints.iter().map(|endpoint| endpoint.path.as_str()),
    ));
    let mut group = c.benchmark_group("plugin request bookkeeping");
    for enabled in [false, true] {
        metrics::set_enabled(enabled);
        let name = if enabled { "metrics on" } else { "metrics off" };
        group.bench_function(name, |b| {
            b.iter(|| {
                let started = traffic.start(Instant::now());
                let route = metrics::enabled()
                    .then(|| routes.route(black_box("GET"), black_box("/hello")))
                    .flatten();
                started.finish(route, black_box(&Method::GET), StatusCode::OK);
            })
        });
    }
    group.finish();
}

/// The service lookup of one request, alone (what every request did
/// before versions) and with what versions added: the path checked for
/// `@`, the `X-Service-Version` header looked for, the default version
/// picked, and its version put on the answer.
fn version_choice(c: &mut Criterion) {
    let table = ServiceTable::new();
    let info = hello();
    let version = Version::parse(&info.version).expect("a valid version");
    let remote = RemoteService::new(
        RemoteSpec {
            info: Arc::new(info.clone()),
            base_path: "/".to_owned(),
            load_balancing: None,
        },
        Vec::new(),
        SystemTime::now(),
        None,
        Duration::from_secs(30),
    );
    let service = Arc::new(Service::new(
        info,
        version,
        Backend::Remote(Arc::new(remote)),
    ));
    table
        .update::<()>("hello", |_| Ok(vec![service]))
        .expect("an empty table takes a name");
    let request = HeaderMap::new();
    // An answer's headers as a plugin's answer has them by then.
    let mut answer = HeaderMap::new();
    answer.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    answer.insert(
        "x-request-id",
        HeaderValue::from_static("0123456789abcdef-1"),
    );
    let mut group = c.benchmark_group("plugin request lookup");
    group.bench_function("name only", |b| {
        b.iter(|| black_box(table.resolve("default", black_box("hello"))))
    });
    group.bench_function("name and version", |b| {
        b.iter(|| {
            let named = black_box("hello");
            let (name, requirement) = match named.split_once('@') {
                Some((name, requirement)) => (name, Some(requirement)),
                None => (named, None),
            };
            let selection = match (requirement, request.get(X_SERVICE_VERSION)) {
                (None, None) => Selection::Default,
                _ => unreachable!("the request asks for no version"),
            };
            let versions = table.resolve("default", name).expect("mounted");
            let chosen = versions
                .select(&selection, &request)
                .expect("a default version")
                .clone();
            answer.insert(X_SERVICE_VERSION, chosen.version_header().clone());
        })
    });
    group.finish();
}

criterion_group!(benches, bookkeeping, version_choice);
criterion_main!(benches);
