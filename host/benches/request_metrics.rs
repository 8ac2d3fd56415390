//! What the detailed metrics add to one gateway request, measured alone.
//!
//! The end-to-end comparison (`bench/run --only 1,2 --compare-metrics-off`)
//! cannot resolve a cost of a few percent on the plugin path: its rounds
//! spread more than that on a shared VM. This measures the work itself,
//! the calls `gateway::dispatch` makes per request, with the metrics off
//! and on; BENCHMARKS.md divides the difference by the host's CPU time per
//! request from scenario 1.
//!
//! Run with `cargo bench -p plugin-host --bench request_metrics`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use axum::http::{Method, StatusCode};
use criterion::{Criterion, criterion_group, criterion_main};
use plugin_host::metrics::{self, ServiceTraffic};
use plugin_host::service::{RouteTemplates, ServiceInfo};

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

criterion_group!(benches, bookkeeping);
criterion_main!(benches);
