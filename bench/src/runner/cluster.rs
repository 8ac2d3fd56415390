//! Scenario 8: the registry on etcd (`--store etcd`, docs/CLUSTER.md)
//! against the embedded store: registrations and heartbeats per second on
//! each, with the same services and clients, and the time from a
//! registration on host A to the first answer routed through host B.
//!
//! etcd is Debian's `etcd-server` (one member, loopback, temporary data,
//! not pinned: it competes with the host for the machine, as a co-located
//! member would); the host must be built with its `etcd` feature, which
//! `bench/run` does when `protoc` is found. Without either the scenario is
//! skipped with a line saying why, unless `PLUGIN_HOST_REQUIRE_ALL=1`.

use std::time::{Duration, Instant};

use bench::wrk::WrkResult;
use serde::Serialize;
use serde_json::json;
use tokio::runtime::Runtime;

use host_harness::etcd::{self, Etcd};
use host_harness::http::{self, registration};
use host_harness::{Host, REQUIRE_ALL};

use crate::load::{self, WrkOptions};
use crate::procs::{Pinning, SimpleServer};
use crate::scenarios::{percentiles, register_many, start_host};
use crate::{Artifacts, Settings};

/// What one store sustained.
#[derive(Debug, Clone, Serialize)]
pub struct StoreCost {
    /// Registrations per second.
    pub registrations_per_s: f64,
    /// Registration latency p50, p99 in ms.
    pub register_ms: [f64; 2],
    /// Registrations refused or failed.
    pub register_failures: u64,
    /// Heartbeats (wrk), one per registered service in turn.
    pub heartbeats: WrkResult,
}

/// Scenario 8.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterCost {
    /// Services registered on each store.
    pub services: usize,
    /// The embedded store (redb).
    pub embedded: StoreCost,
    /// etcd, one member.
    pub etcd: StoreCost,
    /// Registrations per second on etcd / on the embedded store.
    pub registrations_ratio: f64,
    /// Heartbeats per second on etcd / on the embedded store.
    pub heartbeats_ratio: f64,
    /// Registrations timed from A to B.
    pub propagation_samples: usize,
    /// Registration sent to host A -> first 200 through host B, p50 and
    /// p99 in ms.
    pub propagation_ms: [f64; 2],
}

/// Runs scenario 8, or says why it cannot (`Ok(None)`: skipped).
pub fn run(
    rt: &Runtime,
    pinning: Pinning,
    settings: &Settings,
    artifacts: &Artifacts,
) -> Result<Option<ClusterCost>, String> {
    if let Err(reason) = etcd::available() {
        if std::env::var(REQUIRE_ALL).is_ok_and(|value| value == "1") {
            return Err(format!("{reason}, and {REQUIRE_ALL}=1 requires it"));
        }
        eprintln!("[8] SKIPPED: {reason}");
        return Ok(None);
    }
    // A tenth of scenario 5's services: etcd's writes are fsynced by a
    // process that shares the two cores.
    let services = (settings.services / 10).max(50);
    let (embedded_host, _config) = start_host(rt, pinning, &artifacts.host, &[])?;
    let embedded = store_cost(rt, pinning, settings, &embedded_host, services, "embedded")?;
    drop(embedded_host);

    let cluster = rt.block_on(Etcd::single());
    let on_etcd = [
        "--store".to_owned(),
        "etcd".to_owned(),
        "--etcd-endpoints".to_owned(),
        cluster.endpoints(),
    ];
    let (a, _config_a) = start_host(rt, pinning, &artifacts.host, &on_etcd)?;
    let etcd_cost = store_cost(rt, pinning, settings, &a, services, "etcd")?;
    let (b, _config_b) = start_host(rt, pinning, &artifacts.host, &on_etcd)?;
    let samples = if settings.mode == "quick" { 20 } else { 200 };
    let propagation = propagation(rt, pinning, artifacts, &a, &b, samples)?;
    let propagation_ms = percentiles(&propagation, [50.0, 99.0]);
    eprintln!(
        "[8] propagation A -> B: p50 {:.1} ms, p99 {:.1} ms ({samples} registrations)",
        propagation_ms[0], propagation_ms[1]
    );
    Ok(Some(ClusterCost {
        services,
        registrations_ratio: etcd_cost.registrations_per_s / embedded.registrations_per_s,
        heartbeats_ratio: etcd_cost.heartbeats.rps / embedded.heartbeats.rps,
        embedded,
        etcd: etcd_cost,
        propagation_samples: samples,
        propagation_ms,
    }))
}

/// Registers `services` services on `host`, then heartbeats them.
fn store_cost(
    rt: &Runtime,
    pinning: Pinning,
    settings: &Settings,
    host: &Host,
    services: usize,
    store: &str,
) -> Result<StoreCost, String> {
    let client = http::client();
    let started = Instant::now();
    let registered = rt.block_on(register_many(
        &client,
        host.registry_url("/api/registry/register"),
        services,
        settings.register_concurrency,
    ));
    let seconds = started.elapsed().as_secs_f64();
    if let Some(error) = &registered.first_error {
        eprintln!(
            "[8] {store}: {} registrations failed; first: {error}",
            registered.failures
        );
    }
    let latency_ms: Vec<f64> = registered.latencies.iter().map(|(_, ms)| *ms).collect();
    let script = tempfile::Builder::new()
        .prefix("bench-heartbeat-")
        .suffix(".lua")
        .tempfile()
        .map_err(|error| format!("temp file: {error}"))?;
    std::fs::write(script.path(), include_str!("../../wrk/heartbeat.lua"))
        .map_err(|error| format!("heartbeat script: {error}"))?;
    let mut options = WrkOptions::new(
        settings.wrk_threads,
        settings.heartbeat_connections,
        settings.heartbeat_seconds,
    );
    options.script = Some(script.path().to_owned());
    options.env = vec![("BENCH_SERVICES".to_owned(), services.to_string())];
    let heartbeats = load::run_wrk(
        pinning,
        &host.registry_url("/api/registry/heartbeat"),
        &options,
    )?;
    let cost = StoreCost {
        registrations_per_s: services as f64 / seconds,
        register_ms: percentiles(&latency_ms, [50.0, 99.0]),
        register_failures: registered.failures,
        heartbeats,
    };
    eprintln!(
        "[8] {store}: {:.0} registrations/s (p50 {:.1} ms), {:.0} heartbeats/s (p99 {:.1} ms, failures {})",
        cost.registrations_per_s,
        cost.register_ms[0],
        cost.heartbeats.rps,
        cost.heartbeats.p99_ms,
        cost.heartbeats.failures()
    );
    Ok(cost)
}

/// For each of `samples` new services: the time from sending its
/// registration to host A to the first 200 host B routes for it, in ms.
fn propagation(
    rt: &Runtime,
    pinning: Pinning,
    artifacts: &Artifacts,
    a: &Host,
    b: &Host,
    samples: usize,
) -> Result<Vec<f64>, String> {
    let upstream = SimpleServer::start(rt, "bench-upstream", &artifacts.upstream, pinning)?;
    let client = http::client();
    let register = a.registry_url("/api/registry/register");
    let mut times = Vec::with_capacity(samples);
    for index in 0..samples {
        let name = format!("prop-{index:04}");
        let mut body = registration(&name, upstream.addr);
        body["endpoints"] = json!([{"path": "/small", "method": "GET", "description": "small JSON", "is_public": true}]);
        let through_b = b.gateway_url(&format!("/api/{name}/small"));
        let sent = Instant::now();
        let elapsed = rt.block_on(async {
            let (status, answer) = http::post_json(&register, &body)
                .await
                .map_err(|error| error.to_string())?;
            if status != 201 {
                return Err(format!(
                    "registering {name} on A answered {status}: {answer}"
                ));
            }
            let deadline = sent + Duration::from_secs(10);
            loop {
                let (status, _) = http::get(&client, &through_b)
                    .await
                    .map_err(|error| error.to_string())?;
                if status == 200 {
                    return Ok(sent.elapsed());
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "B did not route {name} within 10 s (last {status})"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })?;
        times.push(elapsed.as_secs_f64() * 1000.0);
    }
    Ok(times)
}

/// The scenario's section of the results.
pub fn markdown(cost: &ClusterCost) -> String {
    let row = |store: &str, c: &StoreCost| {
        format!(
            "| {store} | {:.0} | p50 {:.1}, p99 {:.1} | {:.0} | p50 {:.2}, p99 {:.2} |\n",
            c.registrations_per_s,
            c.register_ms[0],
            c.register_ms[1],
            c.heartbeats.rps,
            c.heartbeats.p50_ms,
            c.heartbeats.p99_ms
        )
    };
    format!(
        "## 8. Registry on etcd\n\n\
         {} services registered (32 in flight), then heartbeated (wrk), on each store.\n\n\
         | store | registrations/s | ms | heartbeats/s | ms |\n|---|---|---|---|---|\n{}{}\n\
         etcd / embedded: registrations **{:.2}x**, heartbeats **{:.2}x**.\n\n\
         Registration on host A to its first 200 through host B ({} services): **p50 {:.1} ms, p99 {:.1} ms**.\n",
        cost.services,
        row("embedded (redb)", &cost.embedded),
        row("etcd (1 member)", &cost.etcd),
        cost.registrations_ratio,
        cost.heartbeats_ratio,
        cost.propagation_samples,
        cost.propagation_ms[0],
        cost.propagation_ms[1]
    )
}
