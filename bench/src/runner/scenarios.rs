//! The scenarios of BENCHMARKS.md. Each returns its numbers or says why it
//! could not run; one failing does not stop the others.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bench::stats::{median, percentile};
use bench::wrk::WrkResult;
use serde::Serialize;
use serde_json::json;
use tokio::runtime::Runtime;

use host_harness::http::{self, get, registration};
use host_harness::{Host, PATIENCE, field};

use crate::haproxy::Haproxy;
use crate::load::{self, WrkOptions};
use crate::nginx::Nginx;
use crate::procs::{Pinning, SimpleServer, cpu_seconds, with_children};
use crate::{Artifacts, Settings};

/// Everything measured.
#[derive(Debug, Default, Serialize)]
pub struct ScenarioResults {
    /// Scenario 1.
    pub in_process: Option<Comparison>,
    /// Scenario 2, small JSON answer.
    pub proxy_small: Option<Comparison>,
    /// Scenario 2, 1 MiB answer.
    pub proxy_large: Option<Comparison>,
    /// Scenario 3.
    pub hot_swap: Option<HotSwap>,
    /// Scenario 4.
    pub load_unload: Option<LoadUnload>,
    /// Scenario 5.
    pub registry: Option<RegistryScale>,
    /// Scenario 6.
    pub memory: Option<Memory>,
    /// Scenario 7.
    pub plugin_calls: Option<crate::plugin_calls::CallCost>,
    /// Scenario 8.
    pub cluster: Option<crate::cluster::ClusterCost>,
    /// Scenarios that could not run, and why.
    pub errors: Vec<String>,
    /// WARN and ERROR lines the hosts logged, by host.
    pub host_warnings: Vec<HostWarnings>,
}

/// What a host complained about during the run.
#[derive(Debug, Clone, Serialize)]
pub struct HostWarnings {
    /// Which host (`scenarios 1-4, 6` or `scenario 5`).
    pub host: String,
    /// WARN or ERROR lines.
    pub count: usize,
    /// The first few, distinct by message.
    pub samples: Vec<String>,
}

fn warnings(host: &Host, name: &str) -> HostWarnings {
    let mut lines = host.log_lines_since(0, &["WARN"]);
    lines.extend(host.log_lines_since(0, &["ERROR"]));
    let count = lines.len();
    let mut samples: Vec<String> = Vec::new();
    for line in lines {
        // Drop the timestamp, keep level, target and message.
        let text = line
            .split_once(' ')
            .map_or(line.as_str(), |(_, rest)| rest)
            .trim();
        let key: String = text.chars().take(60).collect();
        if samples.len() < 5 && !samples.iter().any(|s| s.starts_with(&key)) {
            samples.push(text.chars().take(300).collect());
        }
    }
    HostWarnings {
        host: name.to_owned(),
        count,
        samples,
    }
}

/// What a comparison runs wrk against.
#[derive(Debug, Clone)]
pub struct Spec {
    /// `plugin`, `native`, `ours`, `direct`, `nginx`.
    pub label: &'static str,
    /// The URL.
    pub url: String,
    /// The processes under test (whose CPU time is counted).
    pub pids: Vec<u32>,
    /// Processes behind them on the same core (the upstream), counted
    /// separately.
    pub behind: Vec<u32>,
}

/// One wrk run of a target, with the CPU time it cost.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    /// What wrk reported.
    pub wrk: WrkResult,
    /// CPU time of the processes under test per request, µs.
    pub cpu_us_per_req: f64,
    /// The same, with the processes behind them (the upstream).
    pub total_cpu_us_per_req: f64,
}

/// One target of a comparison: the medians of its interleaved rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// `plugin`, `native`, `ours`, `direct`, `nginx`.
    pub label: String,
    /// What wrk hit.
    pub url: String,
    /// Median requests/s over the rounds.
    pub rps: f64,
    /// Median of the rounds' p50, in ms.
    pub p50_ms: f64,
    /// Median of the rounds' p99, in ms.
    pub p99_ms: f64,
    /// Median CPU µs per request of the process under test (user +
    /// system, all threads; nginx: master and workers).
    pub cpu_us_per_req: f64,
    /// Median CPU µs per request including the upstream behind it.
    pub total_cpu_us_per_req: f64,
    /// Failed requests (non-2xx/3xx and socket errors) over all rounds.
    pub failures: u64,
    /// Every round.
    pub rounds: Vec<Round>,
}

/// `ours` against `baseline`: ratios of the medians.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// e.g. `plugin/native`.
    pub name: String,
    /// Throughput ratio (above 1: ours is faster).
    pub rps: f64,
    /// p50 latency ratio (above 1: ours is slower).
    pub p50: f64,
    /// p99 latency ratio (above 1: ours is slower).
    pub p99: f64,
    /// CPU per request ratio, whole path on the server core (above 1:
    /// ours costs more).
    pub cpu: f64,
}

/// Several targets measured in interleaved rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// What is compared.
    pub title: String,
    /// The wrk command line (without the URL).
    pub wrk: String,
    /// The targets, baselines first.
    pub targets: Vec<Target>,
    /// Ours against each baseline.
    pub ratios: Vec<Ratio>,
}

impl Comparison {
    fn target(&self, label: &str) -> Option<&Target> {
        self.targets.iter().find(|target| target.label == label)
    }

    fn add_ratio(&mut self, ours: &str, baseline: &str) {
        let (Some(o), Some(b)) = (self.target(ours), self.target(baseline)) else {
            return;
        };
        let ratio = Ratio {
            name: format!("{ours}/{baseline}"),
            rps: o.rps / b.rps,
            p50: o.p50_ms / b.p50_ms,
            p99: o.p99_ms / b.p99_ms,
            cpu: o.total_cpu_us_per_req / b.total_cpu_us_per_req,
        };
        self.ratios.push(ratio);
    }
}

/// Scenario 3.
#[derive(Debug, Clone, Serialize)]
pub struct HotSwap {
    /// Replacements asked for.
    pub swaps: usize,
    /// Replacements the host logged as mounted.
    pub swaps_mounted: usize,
    /// Old versions the host logged as unloaded afterwards.
    pub unloaded: usize,
    /// Connections of the closed-loop client.
    pub connections: usize,
    /// All requests sent.
    pub requests: u64,
    /// Failed requests: transport errors and non-2xx answers. Must be 0.
    pub failures: u64,
    /// Answers per variant (and per status for anything else).
    pub answers: std::collections::BTreeMap<String, u64>,
    /// The first few failures.
    pub errors: Vec<String>,
    /// Requests/s before the first replacement.
    pub steady_rps: f64,
    /// Requests/s while the replacements ran.
    pub swapping_rps: f64,
    /// `1 - swapping/steady`, in percent.
    pub dip_percent: f64,
    /// What one replacement costs the clients, whatever the swap rate: the
    /// requests the dip lost, per replacement, as milliseconds of the
    /// steady rate.
    pub lost_ms_per_swap: f64,
    /// The least time from one replacement's start to the next's, in ms.
    pub swap_every_ms: f64,
    /// Worst 100 ms window while swapping, as requests/s.
    pub worst_100ms_rps: f64,
    /// Latency before the swaps (p50, p99, max) in ms.
    pub steady_latency_ms: [f64; 3],
    /// Latency while swapping (p50, p99, max) in ms.
    pub swapping_latency_ms: [f64; 3],
    /// File written -> host logged the new version mounted: p50, p99 in ms.
    pub swap_ms: [f64; 2],
    /// Seconds the replacements took in all.
    pub swapping_seconds: f64,
    /// Host RSS (KiB) before the first replacement, after half of them,
    /// and after all of them (old versions unloaded): a leak per swap
    /// shows as two equal steps.
    pub rss_kib: [u64; 3],
    /// Successful answers per 100 ms over the whole run.
    pub ok_per_100ms: Vec<u32>,
    /// Which of those windows the replacements ran in: [first, last).
    pub swapping_windows: [usize; 2],
}

/// Scenario 4.
#[derive(Debug, Clone, Serialize)]
pub struct LoadUnload {
    /// Rounds.
    pub rounds: usize,
    /// File written -> first 200: p50, p99, max in ms.
    pub load_ms: [f64; 3],
    /// File removed -> first 404: p50, p99, max in ms.
    pub unload_ms: [f64; 3],
    /// The host's own `elapsed_ms` of each mount (read, copy, dlopen,
    /// init): p50, p99 in ms.
    pub host_mount_ms: [f64; 2],
    /// Answers that were neither the old nor the new state (must be 0).
    pub unexpected_answers: u64,
    /// Watch debounce the host ran with.
    pub debounce: String,
}

/// Scenario 5.
#[derive(Debug, Clone, Serialize)]
pub struct RegistryScale {
    /// Services registered.
    pub services: usize,
    /// Registrations refused or failed.
    pub register_failures: u64,
    /// Registrations in flight.
    pub register_concurrency: usize,
    /// Registrations per second.
    pub registrations_per_s: f64,
    /// Registrations per second over the first and the last tenth.
    pub registrations_per_s_first_last_tenth: [f64; 2],
    /// Registration latency p50, p99 in ms.
    pub register_ms: [f64; 2],
    /// Heartbeats (wrk).
    pub heartbeats: WrkResult,
    /// `GET /api/registry/services` with every service registered (wrk,
    /// one connection).
    pub list: WrkResult,
    /// A page of it, `?limit=100` (wrk, one connection).
    pub list_page: WrkResult,
    /// Size of that listing in bytes.
    pub list_bytes: usize,
    /// Entries in that listing.
    pub list_entries: usize,
    /// Host RSS before registering, KiB.
    pub rss_before_kib: u64,
    /// Host RSS after registering, KiB.
    pub rss_after_register_kib: u64,
    /// Host RSS after the heartbeats and listings, KiB.
    pub rss_end_kib: u64,
    /// (after register - before) per 1,000 services, KiB.
    pub rss_per_1000_kib: f64,
    /// What the host logged at WARN or ERROR.
    pub host_warnings: HostWarnings,
}

/// Scenario 6.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Memory {
    /// Host RSS with nothing loaded, KiB.
    pub idle_kib: u64,
    /// With hello and demo-service loaded, KiB.
    pub plugins_kib: u64,
    /// After scenario 1 and 2 (warm, pools and buffers grown), KiB.
    pub after_load_kib: Option<u64>,
    /// After scenario 3 (every replaced version unloaded), KiB.
    pub after_swaps_kib: Option<u64>,
}

/// The `ps`-th percentiles of `values` (NaN when there are none), in the
/// order asked: `[50.0, 99.0, 100.0]` gives p50, p99 and max.
pub(crate) fn percentiles<const N: usize>(values: &[f64], ps: [f64; N]) -> [f64; N] {
    ps.map(|p| percentile(values, p).unwrap_or(f64::NAN))
}

/// The API key scenario 1 sends, and its digest in the host's config
/// (`printf %s bench-api-key | sha256sum`). The runner checks that the key
/// is accepted before it measures anything.
const BENCH_API_KEY: &str = "bench-api-key";
const BENCH_API_KEY_SHA256: &str =
    "fd0ba226dc24b08a5c55782e91ba91ba5528bb35f37f7d322b35d703efb77822";

/// A `plugin-host` on the server core, with empty directories, logging
/// nothing per request (the access log is off), `--config` giving it
/// [`BENCH_API_KEY`], and `args`. The returned directory holds the config
/// file; it is read at start-up.
pub(crate) fn start_host(
    rt: &Runtime,
    pinning: Pinning,
    binary: &Path,
    args: &[String],
) -> Result<(Host, tempfile::TempDir), String> {
    let config_dir = tempfile::tempdir().map_err(|error| format!("temp dir: {error}"))?;
    let config = config_dir.path().join("plugin-host.toml");
    std::fs::write(
        &config,
        format!("[[auth.api_keys]]\nid = \"bench\"\nsha256 = \"{BENCH_API_KEY_SHA256}\"\n"),
    )
    .map_err(|error| format!("{}: {error}", config.display()))?;
    let builder = Host::builder(pinning.server(binary))
        .log_filter("info,access=off")
        .arg("--config")
        .arg(config.display().to_string())
        .args(args.iter().cloned());
    Ok((rt.block_on(builder.start())?, config_dir))
}

/// Runs everything `only` selects.
pub fn run_all(
    rt: &Runtime,
    pinning: Pinning,
    settings: &Settings,
    artifacts: &Artifacts,
    only: &dyn Fn(u8) -> bool,
) -> ScenarioResults {
    let mut results = ScenarioResults::default();
    if [1, 2, 3, 4, 6].into_iter().any(only)
        && let Err(error) = host_scenarios(rt, pinning, settings, artifacts, only, &mut results)
    {
        results.errors.push(error);
    }
    if only(5) {
        match registry_scale(rt, pinning, settings, artifacts) {
            Ok(registry) => results.registry = Some(registry),
            Err(error) => results.errors.push(format!("scenario 5: {error}")),
        }
    }
    if only(7) {
        let bin_dir = artifacts.host.parent().unwrap_or(std::path::Path::new("."));
        match crate::plugin_calls::run(rt, pinning, settings, bin_dir) {
            Ok(cost) => results.plugin_calls = Some(cost),
            Err(error) => results.errors.push(format!("scenario 7: {error}")),
        }
    }
    if only(8) {
        match crate::cluster::run(rt, pinning, settings, artifacts) {
            Ok(cost) => results.cluster = cost,
            Err(error) => results.errors.push(format!("scenario 8: {error}")),
        }
    }
    results
}

/// Scenarios 1, 2, 3, 4 and 6 share one host: memory is read idle, with
/// the example plugins, after the load and after the swaps.
fn host_scenarios(
    rt: &Runtime,
    pinning: Pinning,
    settings: &Settings,
    artifacts: &Artifacts,
    only: &dyn Fn(u8) -> bool,
    results: &mut ScenarioResults,
) -> Result<(), String> {
    let (mut host, _config) = start_host(rt, pinning, &artifacts.host, &[])?;
    let client = http::client();
    std::thread::sleep(Duration::from_secs(1));
    let mut memory = Memory {
        idle_kib: host.rss_kib().unwrap_or(0),
        ..Memory::default()
    };
    let mark = host.log_mark();
    host.rename_plugin_in(&artifacts.hello, "hello.so")?;
    host.rename_plugin_in(&artifacts.demo, "demo-service.so")?;
    rt.block_on(host.wait_for_log_since(mark, &["plugin mounted", "plugin=hello"]))?;
    rt.block_on(host.wait_for_log_since(mark, &["plugin mounted", "plugin=demo-service"]))?;
    std::thread::sleep(Duration::from_secs(1));
    memory.plugins_kib = host.rss_kib().unwrap_or(0);
    eprintln!(
        "[6] RSS idle {} KiB, with hello + demo-service {} KiB",
        memory.idle_kib, memory.plugins_kib
    );
    // `--compare-host`: another build of plugin-host, measured as one more
    // target of scenarios 1 and 2 (A/B of a change, in the same rounds).
    let mut base = match &artifacts.compare_host {
        Some(binary) if only(1) || only(2) => {
            let (base, config) = start_host(rt, pinning, binary, &artifacts.compare_args)?;
            let mark = base.log_mark();
            base.rename_plugin_in(&artifacts.hello, "hello.so")?;
            rt.block_on(base.wait_for_log_since(mark, &["plugin mounted", "plugin=hello"]))?;
            Some((base, config))
        }
        _ => None,
    };

    if only(1) {
        match in_process(
            rt,
            &client,
            pinning,
            settings,
            artifacts,
            &host,
            base.as_ref().map(|(base, _)| base),
        ) {
            Ok(comparison) => results.in_process = Some(comparison),
            Err(error) => results.errors.push(format!("scenario 1: {error}")),
        }
    }
    if only(2) {
        match proxy(
            rt,
            &client,
            pinning,
            settings,
            artifacts,
            &host,
            base.as_ref().map(|(base, _)| base),
        ) {
            Ok((small, large)) => {
                results.proxy_small = Some(small);
                results.proxy_large = Some(large);
            }
            Err(error) => results.errors.push(format!("scenario 2: {error}")),
        }
    }
    if only(1) || only(2) {
        memory.after_load_kib = host.rss_kib().ok();
    }
    if let Some((base, _)) = &mut base {
        base.stop();
        results
            .host_warnings
            .push(warnings(base, "comparison host (--compare-host)"));
    }
    if only(3) {
        match hot_swap(rt, settings, artifacts, &mut host) {
            Ok(swap) => {
                results.hot_swap = Some(swap);
                memory.after_swaps_kib = host.rss_kib().ok();
            }
            Err(error) => results.errors.push(format!("scenario 3: {error}")),
        }
    }
    if only(4) {
        match load_unload(rt, &client, settings, artifacts, &mut host) {
            Ok(latencies) => results.load_unload = Some(latencies),
            Err(error) => results.errors.push(format!("scenario 4: {error}")),
        }
    }
    results.memory = Some(memory);
    host.stop();
    results
        .host_warnings
        .push(warnings(&host, "host of scenarios 1-4 and 6"));
    Ok(())
}

/// Runs each target for a warm-up, then `rounds` rounds, alternating the
/// order (ABAB.. then BA..), so drift of the machine hits every target.
fn interleaved(
    pinning: Pinning,
    scenario: &str,
    title: &str,
    targets: &[Spec],
    options: &WrkOptions,
    settings: &Settings,
) -> Result<Comparison, String> {
    for spec in targets {
        load::run_wrk(
            pinning,
            &spec.url,
            &options.for_seconds(settings.warmup_seconds),
        )
        .map_err(|error| format!("warm-up of {}: {error}", spec.label))?;
    }
    let mut rounds: Vec<Vec<Round>> = vec![Vec::new(); targets.len()];
    for round in 0..settings.rounds {
        let mut order: Vec<usize> = (0..targets.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for index in order {
            let spec = &targets[index];
            let (cpu_before, behind_before) = (cpu_seconds(&spec.pids), cpu_seconds(&spec.behind));
            let wrk = load::run_wrk(pinning, &spec.url, options)?;
            let cpu = cpu_seconds(&spec.pids) - cpu_before;
            let behind = cpu_seconds(&spec.behind) - behind_before;
            let per_request = |seconds: f64| seconds * 1e6 / wrk.requests.max(1) as f64;
            eprintln!(
                "[{scenario}] {title}: {} round {}/{}: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, CPU {:.1} us/req (+{:.1} upstream), failures {}",
                spec.label,
                round + 1,
                settings.rounds,
                wrk.rps,
                wrk.p50_ms,
                wrk.p99_ms,
                per_request(cpu),
                per_request(behind),
                wrk.failures()
            );
            rounds[index].push(Round {
                cpu_us_per_req: per_request(cpu),
                total_cpu_us_per_req: per_request(cpu + behind),
                wrk,
            });
        }
    }
    let targets = targets
        .iter()
        .zip(rounds)
        .map(|(spec, rounds)| {
            let of = |f: fn(&Round) -> f64| {
                median(&rounds.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN)
            };
            Target {
                label: spec.label.to_owned(),
                url: spec.url.clone(),
                rps: of(|r| r.wrk.rps),
                p50_ms: of(|r| r.wrk.p50_ms),
                p99_ms: of(|r| r.wrk.p99_ms),
                cpu_us_per_req: of(|r| r.cpu_us_per_req),
                total_cpu_us_per_req: of(|r| r.total_cpu_us_per_req),
                failures: rounds.iter().map(|r| r.wrk.failures()).sum(),
                rounds,
            }
        })
        .collect();
    Ok(Comparison {
        title: title.to_owned(),
        wrk: options.describe(),
        targets,
        ratios: Vec::new(),
    })
}

/// Scenario 1: the hello plugin through the host against the same handler
/// compiled into a plain axum server; and the cost of gateway auth: the
/// same handler in `hello-keyed`, whose route needs an API key, against
/// the open `hello`, in the same host. Every target gets the same
/// `X-API-Key` header, so the requests differ only in where they go. And
/// the cost of versions: the same handler under a name served by two
/// versions (`hello-versioned` 1.0.0 and 2.0.0), asked without a version
/// (the default path) and with the path form `@1` (a requirement matched
/// per request), against `hello`, which has one.
fn in_process(
    rt: &Runtime,
    client: &reqwest::Client,
    pinning: Pinning,
    settings: &Settings,
    artifacts: &Artifacts,
    host: &Host,
    base: Option<&Host>,
) -> Result<Comparison, String> {
    let native = SimpleServer::start(rt, "bench-native", &artifacts.native, pinning)?;
    let mark = host.log_mark();
    host.rename_plugin_in(&artifacts.hello_keyed, "hello-keyed.so")?;
    rt.block_on(host.wait_for_log_since(mark, &["plugin mounted", "plugin=hello-keyed"]))?;
    for (index, library) in artifacts.hello_versions.iter().enumerate() {
        let mark = host.log_mark();
        let file = format!("hello-v{}.so", index + 1);
        host.rename_plugin_in(library, &file)?;
        rt.block_on(host.wait_for_log_since(mark, &["plugin mounted", &format!("file={file}")]))?;
    }
    let versions_url = host.gateway_url("/api/hello-versioned/hello?name=x");
    let required_url = host.gateway_url("/api/hello-versioned@1/hello?name=x");
    let path = "/api/hello/hello?name=x";
    let plugin_url = host.gateway_url(path);
    let keyed_url = host.gateway_url("/api/hello-keyed/hello?name=x");
    let native_url = format!("http://{}{path}", native.addr);
    let (status_p, body_p) = rt.block_on(get(client, &plugin_url))?;
    let (status_n, body_n) = rt.block_on(get(client, &native_url))?;
    if status_p != 200 || status_n != 200 || body_p != body_n {
        return Err(format!(
            "plugin and native answer differently: {status_p} {body_p:?} vs {status_n} {body_n:?}"
        ));
    }
    let (status_open, _) = rt.block_on(get(client, &keyed_url))?;
    let (status_k, body_k) = rt.block_on(async {
        let answer = client
            .get(&keyed_url)
            .header("X-API-Key", BENCH_API_KEY)
            .send()
            .await
            .map_err(|error| format!("GET {keyed_url}: {error}"))?;
        let status = answer.status().as_u16();
        let body = answer.bytes().await.map_err(|error| error.to_string())?;
        Ok::<_, String>((status, body))
    })?;
    if status_open != 401 || status_k != 200 || body_k != body_p {
        return Err(format!(
            "hello-keyed: {status_open} without the key (401 expected), {status_k} {body_k:?} with it"
        ));
    }
    for url in [&versions_url, &required_url] {
        let (status, body) = rt.block_on(get(client, url))?;
        if status != 200 || body != body_p {
            return Err(format!("{url}: {status} {body:?}, not what hello answers"));
        }
    }
    let options = WrkOptions::new(
        settings.wrk_threads,
        settings.connections_small,
        settings.seconds,
    )
    .with_header(&format!("X-API-Key: {BENCH_API_KEY}"));
    let mut targets = vec![
        Spec {
            label: "native",
            url: native_url,
            pids: vec![native.proc.pid()],
            behind: Vec::new(),
        },
        Spec {
            label: "plugin",
            url: plugin_url,
            pids: vec![host.pid()],
            behind: Vec::new(),
        },
        Spec {
            label: "plugin+key",
            url: keyed_url,
            pids: vec![host.pid()],
            behind: Vec::new(),
        },
        Spec {
            label: "plugin-2-versions",
            url: versions_url,
            pids: vec![host.pid()],
            behind: Vec::new(),
        },
        Spec {
            label: "plugin-2-versions@1",
            url: required_url,
            pids: vec![host.pid()],
            behind: Vec::new(),
        },
    ];
    if let Some(base) = base {
        targets.push(Spec {
            label: "base",
            url: base.gateway_url(path),
            pids: vec![base.pid()],
            behind: Vec::new(),
        });
    }
    let mut comparison = interleaved(
        pinning,
        "1",
        "GET /api/hello/hello?name=x; with an API key required: GET /api/hello-keyed/hello?name=x; a name of two versions: GET /api/hello-versioned/hello?name=x and /api/hello-versioned@1/hello?name=x",
        &targets,
        &options,
        settings,
    )?;
    comparison.add_ratio("plugin", "native");
    comparison.add_ratio("plugin+key", "plugin");
    comparison.add_ratio("plugin-2-versions", "plugin");
    comparison.add_ratio("plugin-2-versions@1", "plugin");
    comparison.add_ratio("plugin", "base");
    Ok(comparison)
}

/// Scenario 2: a remote service hit directly, through our gateway, through
/// nginx; and through our gateway spread over three instances
/// (`ours-3-instances`, three upstream processes registered under one
/// name, round robin), against one (`ours`).
fn proxy(
    rt: &Runtime,
    client: &reqwest::Client,
    pinning: Pinning,
    settings: &Settings,
    artifacts: &Artifacts,
    host: &Host,
    base: Option<&Host>,
) -> Result<(Comparison, Comparison), String> {
    let upstream = SimpleServer::start(rt, "bench-upstream", &artifacts.upstream, pinning)?;
    register_upstream(rt, host, "upstream", upstream.addr)?;
    if let Some(base) = base {
        register_upstream(rt, base, "upstream", upstream.addr)?;
    }
    // The same upstream three times over: what spreading costs or gains.
    let siblings = [
        SimpleServer::start(rt, "bench-upstream", &artifacts.upstream, pinning)?,
        SimpleServer::start(rt, "bench-upstream", &artifacts.upstream, pinning)?,
    ];
    for addr in std::iter::once(upstream.addr).chain(siblings.iter().map(|s| s.addr)) {
        register_upstream(rt, host, "upstream3", addr)?;
    }
    // plugin-host runs one tokio worker on its one core; nginx gets one
    // worker process on the same core, HAProxy one thread.
    let nginx = Nginx::start(upstream.addr, 1, pinning)?;
    let haproxy = Haproxy::start(upstream.addr, 1, pinning)?;
    let mut comparisons = Vec::new();
    for (what, path, connections) in [
        ("small JSON", "small", settings.connections_small),
        ("1 MiB body", "large", settings.connections_large),
    ] {
        let direct = format!("http://{}/{path}", upstream.addr);
        let ours = host.gateway_url(&format!("/api/upstream/{path}"));
        let ours_3 = host.gateway_url(&format!("/api/upstream3/{path}"));
        let via_nginx = format!("http://{}/api/upstream/{path}", nginx.addr);
        let via_nginx_unbuffered = format!("http://{}/api/upstream/{path}", nginx.unbuffered_addr);
        let via_haproxy = format!("http://{}/api/upstream/{path}", haproxy.addr);
        let via_base = base.map(|base| base.gateway_url(&format!("/api/upstream/{path}")));
        let mut sizes = Vec::new();
        for url in [
            &direct,
            &ours,
            &ours_3,
            &via_nginx,
            &via_nginx_unbuffered,
            &via_haproxy,
        ]
        .into_iter()
        .chain(&via_base)
        {
            let (status, body) = rt.block_on(get(client, url))?;
            if status != 200 {
                return Err(format!("GET {url} answered {status}: {body:?}"));
            }
            sizes.push(body.len());
        }
        if sizes.iter().any(|size| *size != sizes[0]) {
            return Err(format!(
                "direct, ours, nginx, haproxy (and base) answer bodies of different sizes for /{path}: {sizes:?}"
            ));
        }
        let options = WrkOptions::new(settings.wrk_threads, connections, settings.seconds);
        let behind = vec![upstream.proc.pid()];
        let mut targets = vec![
            Spec {
                label: "direct",
                url: direct,
                pids: vec![upstream.proc.pid()],
                behind: Vec::new(),
            },
            Spec {
                label: "nginx",
                url: via_nginx,
                pids: with_children(nginx.proc.pid()),
                behind: behind.clone(),
            },
        ];
        // Buffering only differs for an answer larger than nginx's buffers.
        if path == "large" {
            targets.push(Spec {
                label: "nginx-unbuffered",
                url: via_nginx_unbuffered,
                pids: with_children(nginx.proc.pid()),
                behind: behind.clone(),
            });
        }
        targets.push(Spec {
            label: "haproxy",
            url: via_haproxy,
            pids: vec![haproxy.proc.pid()],
            behind: behind.clone(),
        });
        targets.push(Spec {
            label: "ours",
            url: ours,
            pids: vec![host.pid()],
            behind: behind.clone(),
        });
        targets.push(Spec {
            label: "ours-3-instances",
            url: ours_3,
            pids: vec![host.pid()],
            behind: std::iter::once(upstream.proc.pid())
                .chain(siblings.iter().map(|s| s.proc.pid()))
                .collect(),
        });
        if let (Some(base), Some(url)) = (base, via_base) {
            targets.push(Spec {
                label: "base",
                url,
                pids: vec![base.pid()],
                behind,
            });
        }
        let mut comparison = interleaved(
            pinning,
            "2",
            &format!("GET /{path} ({what})"),
            &targets,
            &options,
            settings,
        )?;
        for baseline in ["direct", "nginx", "nginx-unbuffered", "haproxy", "base"] {
            comparison.add_ratio("ours", baseline);
        }
        comparison.add_ratio("ours-3-instances", "ours");
        comparisons.push(comparison);
    }
    let large = comparisons.pop().ok_or("no large comparison")?;
    let small = comparisons.pop().ok_or("no small comparison")?;
    drop(haproxy);
    drop(nginx);
    drop(siblings);
    drop(upstream);
    Ok((small, large))
}

/// Registers the bench upstream at `upstream` as (an instance of) `name`.
fn register_upstream(
    rt: &Runtime,
    host: &Host,
    name: &str,
    upstream: SocketAddr,
) -> Result<(), String> {
    let mut body = registration(name, upstream);
    body["endpoints"] = json!([
        {"path": "/small", "method": "GET", "description": "small JSON", "is_public": true},
        {"path": "/large", "method": "GET", "description": "1 MiB", "is_public": true}
    ]);
    let url = host.registry_url("/api/registry/register");
    let (status, answer) = rt.block_on(http::post_json(&url, &body))?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!(
            "registering the upstream answered {status}: {answer}"
        ))
    }
}

/// Scenario 3: the swap plugin replaced back and forth under full load.
fn hot_swap(
    rt: &Runtime,
    settings: &Settings,
    artifacts: &Artifacts,
    host: &mut Host,
) -> Result<HotSwap, String> {
    let mark = host.log_mark();
    host.rename_plugin_in(&artifacts.swap_a, "swap.so")?;
    rt.block_on(host.wait_for_log_since(mark, &["plugin mounted", "plugin=swap"]))?;

    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let load = rt.spawn(load::closed_loop(
        host.gateway_addr(),
        "/api/swap/",
        settings.swap_connections,
        &["swap-a", "swap-b"],
        stop.clone(),
        start,
    ));
    std::thread::sleep(Duration::from_secs_f64(settings.swap_lead_seconds));
    let mut rss_kib = [host.rss_kib().unwrap_or(0), 0, 0];
    let swaps_mark = host.log_mark();
    let swaps_start = start.elapsed();
    let mut swap_ms = Vec::new();
    let swapped = (|| -> Result<(), String> {
        for index in 0..settings.swaps {
            let library = if index % 2 == 0 {
                &artifacts.swap_b
            } else {
                &artifacts.swap_a
            };
            let mark = host.log_mark();
            let written = Instant::now();
            host.rename_plugin_in(library, "swap.so")?;
            rt.block_on(
                host.wait_for_log_since(mark, &["plugin mounted", "plugin=swap", "replaced=true"]),
            )?;
            swap_ms.push(written.elapsed().as_secs_f64() * 1000.0);
            if let Some(rest) = settings.swap_every.checked_sub(written.elapsed()) {
                std::thread::sleep(rest);
            }
            if index + 1 == settings.swaps / 2 {
                rss_kib[1] = host.rss_kib().unwrap_or(0);
            }
        }
        Ok(())
    })();
    let swaps_end = start.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let report = rt
        .block_on(load)
        .map_err(|error| format!("load client: {error}"))?;
    swapped?;
    eprintln!(
        "[3] {} swaps in {:.1} s under load; waiting for the old versions to unload",
        swap_ms.len(),
        (swaps_end - swaps_start).as_secs_f64()
    );
    let deadline = Instant::now() + PATIENCE;
    let unloaded = loop {
        let unloaded = host
            .log_lines_since(swaps_mark, &["plugin unloaded", "plugin=swap"])
            .len();
        if unloaded >= settings.swaps || Instant::now() > deadline {
            break unloaded;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    rss_kib[2] = host.rss_kib().unwrap_or(0);
    let mut ok_per_100ms = Vec::new();
    for sample in report.samples.iter().filter(|s| s.ok) {
        let window = (sample.done_us / 100_000) as usize;
        if ok_per_100ms.len() <= window {
            ok_per_100ms.resize(window + 1, 0u32);
        }
        ok_per_100ms[window] += 1;
    }
    let swapping_windows = [
        (swaps_start.as_micros() / 100_000) as usize,
        (swaps_end.as_micros() / 100_000) as usize + 1,
    ];

    // Skip the client's first half second (connections opening).
    let warm = Duration::from_millis(500).min(swaps_start / 2);
    let in_window = |from: Duration, to: Duration| {
        report
            .samples
            .iter()
            .filter(move |s| {
                let done = Duration::from_micros(s.done_us);
                done >= from && done < to
            })
            .copied()
    };
    let ok_rate = |from: Duration, to: Duration| {
        in_window(from, to).filter(|s| s.ok).count() as f64 / (to - from).as_secs_f64()
    };
    let latencies = |from: Duration, to: Duration| {
        let values: Vec<f64> = in_window(from, to)
            .map(|s| f64::from(s.latency_us) / 1000.0)
            .collect();
        percentiles(&values, [50.0, 99.0, 100.0])
    };
    let steady_rps = ok_rate(warm, swaps_start);
    let swapping_rps = ok_rate(swaps_start, swaps_end);
    let bucket = Duration::from_millis(100);
    let mut worst = f64::INFINITY;
    let mut from = swaps_start;
    while from + bucket <= swaps_end {
        worst = worst.min(ok_rate(from, from + bucket));
        from += bucket;
    }
    let result = HotSwap {
        swaps: settings.swaps,
        swaps_mounted: swap_ms.len(),
        unloaded,
        connections: settings.swap_connections,
        requests: report.samples.len() as u64,
        failures: report.failures,
        answers: report.answers,
        errors: report.errors,
        steady_rps,
        swapping_rps,
        dip_percent: (1.0 - swapping_rps / steady_rps) * 100.0,
        lost_ms_per_swap: (1.0 - swapping_rps / steady_rps)
            * (swaps_end - swaps_start).as_secs_f64()
            * 1000.0
            / settings.swaps.max(1) as f64,
        swap_every_ms: settings.swap_every.as_secs_f64() * 1000.0,
        worst_100ms_rps: if worst.is_finite() {
            worst
        } else {
            swapping_rps
        },
        steady_latency_ms: latencies(warm, swaps_start),
        swapping_latency_ms: latencies(swaps_start, swaps_end),
        swap_ms: percentiles(&swap_ms, [50.0, 99.0]),
        swapping_seconds: (swaps_end - swaps_start).as_secs_f64(),
        rss_kib,
        ok_per_100ms,
        swapping_windows,
    };
    eprintln!(
        "[3] failures {}, steady {:.0} req/s, swapping {:.0} req/s (dip {:.1} %), worst 100 ms {:.0} req/s, answers {:?}",
        result.failures,
        result.steady_rps,
        result.swapping_rps,
        result.dip_percent,
        result.worst_100ms_rps,
        result.answers
    );
    Ok(result)
}

/// Polls `url` every millisecond until it answers `want`; returns how long
/// that took from `since`, and counts answers other than `want` and `other`.
async fn poll_until(
    client: &reqwest::Client,
    url: &str,
    want: u16,
    other: u16,
    since: Instant,
    unexpected: &mut u64,
) -> Result<f64, String> {
    loop {
        let (status, _) = get(client, url).await?;
        if status == want {
            return Ok(since.elapsed().as_secs_f64() * 1000.0);
        }
        if status != other {
            *unexpected += 1;
        }
        if since.elapsed() > PATIENCE {
            return Err(format!("{url} did not answer {want} within {PATIENCE:?}"));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Scenario 4: file written -> first 200, file removed -> first 404.
fn load_unload(
    rt: &Runtime,
    client: &reqwest::Client,
    settings: &Settings,
    artifacts: &Artifacts,
    host: &mut Host,
) -> Result<LoadUnload, String> {
    let url = host.gateway_url("/api/swap/health");
    if host.plugins_dir().join("swap.so").exists() {
        let mark = host.log_mark();
        host.remove_plugin("swap.so")?;
        rt.block_on(host.wait_for_log_since(mark, &["plugin unmounted", "plugin=swap"]))?;
    }
    let mut unexpected = 0;
    let (mut loads, mut unloads, mut mounts) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..settings.load_rounds {
        let mark = host.log_mark();
        let written = Instant::now();
        host.rename_plugin_in(&artifacts.swap_a, "swap.so")?;
        loads.push(rt.block_on(poll_until(client, &url, 200, 404, written, &mut unexpected))?);
        let line =
            rt.block_on(host.wait_for_log_since(mark, &["plugin mounted", "plugin=swap"]))?;
        if let Some(ms) = field(&line, "elapsed_ms").and_then(|ms| ms.parse::<f64>().ok()) {
            mounts.push(ms);
        }
        let removed = Instant::now();
        host.remove_plugin("swap.so")?;
        unloads.push(rt.block_on(poll_until(client, &url, 404, 200, removed, &mut unexpected))?);
        // The next round starts with the old version gone.
        rt.block_on(host.wait_for_log_since(mark, &["plugin unloaded", "plugin=swap"]))?;
        if round == 0 || (round + 1) % 10 == 0 {
            eprintln!(
                "[4] round {}/{}: load {:.1} ms, unload {:.1} ms",
                round + 1,
                settings.load_rounds,
                loads[round],
                unloads[round]
            );
        }
    }
    Ok(LoadUnload {
        rounds: settings.load_rounds,
        load_ms: percentiles(&loads, [50.0, 99.0, 100.0]),
        unload_ms: percentiles(&unloads, [50.0, 99.0, 100.0]),
        host_mount_ms: percentiles(&mounts, [50.0, 99.0]),
        unexpected_answers: unexpected,
        debounce: "100ms (the default of --watch-debounce)".to_owned(),
    })
}

/// Scenario 5: many remote services, heartbeats, the listing.
fn registry_scale(
    rt: &Runtime,
    pinning: Pinning,
    settings: &Settings,
    artifacts: &Artifacts,
) -> Result<RegistryScale, String> {
    let (host, _config) = start_host(rt, pinning, &artifacts.host, &[])?;
    let client = http::client();
    std::thread::sleep(Duration::from_secs(1));
    let rss_before_kib = host.rss_kib().unwrap_or(0);
    let started = Instant::now();
    let Registrations {
        latencies,
        failures,
        first_error,
    } = rt.block_on(register_many(
        &client,
        host.registry_url("/api/registry/register"),
        settings.services,
        settings.register_concurrency,
    ));
    let register_seconds = started.elapsed().as_secs_f64();
    if let Some(error) = &first_error {
        eprintln!("[5] {failures} registrations failed; first: {error}");
    }
    eprintln!(
        "[5] {} services registered in {register_seconds:.1} s ({:.0}/s)",
        settings.services,
        settings.services as f64 / register_seconds
    );
    std::thread::sleep(Duration::from_secs(1));
    let rss_after_register_kib = host.rss_kib().unwrap_or(0);

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
    options.env = vec![("BENCH_SERVICES".to_owned(), settings.services.to_string())];
    let heartbeats = load::run_wrk(
        pinning,
        &host.registry_url("/api/registry/heartbeat"),
        &options,
    )?;
    eprintln!(
        "[5] heartbeats: {:.0}/s, p50 {:.3} ms, p99 {:.3} ms, failures {}",
        heartbeats.rps,
        heartbeats.p50_ms,
        heartbeats.p99_ms,
        heartbeats.failures()
    );

    let list_url = host.registry_url("/api/registry/services");
    let (status, body) = rt.block_on(get(&client, &list_url))?;
    if status != 200 {
        return Err(format!("GET {list_url} answered {status}"));
    }
    let list_entries = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|value| {
            value
                .get("services")
                .and_then(|services| services.as_array().map(Vec::len))
                .or_else(|| value.as_array().map(Vec::len))
        })
        .unwrap_or(0);
    let list = load::run_wrk(
        pinning,
        &list_url,
        &WrkOptions::new(1, 1, settings.list_seconds),
    )?;
    eprintln!(
        "[5] listing {list_entries} services ({} bytes): p50 {:.1} ms, p99 {:.1} ms",
        body.len(),
        list.p50_ms,
        list.p99_ms
    );
    let list_page = load::run_wrk(
        pinning,
        &format!("{list_url}?limit=100"),
        &WrkOptions::new(1, 1, settings.list_seconds),
    )?;
    eprintln!(
        "[5] a page of 100: p50 {:.2} ms, p99 {:.2} ms",
        list_page.p50_ms, list_page.p99_ms
    );
    let rss_end_kib = host.rss_kib().unwrap_or(0);
    let host_warnings = warnings(&host, "host of scenario 5");
    let latency_ms: Vec<f64> = latencies.iter().map(|(_, ms)| *ms).collect();
    let register_ms = percentiles(&latency_ms, [50.0, 99.0]);
    // Rate over the first and the last tenth of the registrations: a
    // table that gets slower to update as it grows shows here.
    let mut done: Vec<f64> = latencies.iter().map(|(at, _)| *at).collect();
    done.sort_by(f64::total_cmp);
    let tenth = done.len() / 10;
    let registrations_per_s_first_last_tenth = if tenth > 1 {
        [
            tenth as f64 / done[tenth - 1],
            tenth as f64 / (done[done.len() - 1] - done[done.len() - 1 - tenth]),
        ]
    } else {
        [f64::NAN, f64::NAN]
    };
    Ok(RegistryScale {
        services: settings.services,
        register_failures: failures,
        register_concurrency: settings.register_concurrency,
        registrations_per_s: settings.services as f64 / register_seconds,
        registrations_per_s_first_last_tenth,
        register_ms,
        heartbeats,
        list,
        list_page,
        list_bytes: body.len(),
        list_entries,
        rss_before_kib,
        rss_after_register_kib,
        rss_end_kib,
        rss_per_1000_kib: (rss_after_register_kib.saturating_sub(rss_before_kib)) as f64
            / (settings.services as f64 / 1000.0),
        host_warnings,
    })
}

/// What registering many services came to, per worker and in all.
#[derive(Debug, Default)]
pub(crate) struct Registrations {
    /// Per success: seconds since the start when it was done, and its
    /// latency in ms.
    pub(crate) latencies: Vec<(f64, f64)>,
    /// Registrations refused or failed.
    pub(crate) failures: u64,
    /// The first failure.
    pub(crate) first_error: Option<String>,
}

impl Registrations {
    fn fail(&mut self, error: String) {
        self.failures += 1;
        self.first_error.get_or_insert(error);
    }

    fn merge(&mut self, other: Self) {
        self.latencies.extend(other.latencies);
        self.failures += other.failures;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// Registers `svc-00000`.. with `concurrency` requests in flight. Nothing
/// listens on their ports (10000 + i): the host's health checker finds
/// them down, as it would find crashed services.
pub(crate) async fn register_many(
    client: &reqwest::Client,
    url: String,
    services: usize,
    concurrency: usize,
) -> Registrations {
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let url = Arc::new(url);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, next, url) = (client.clone(), next.clone(), url.clone());
        workers.spawn(async move {
            let mut done = Registrations::default();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= services {
                    break;
                }
                let port = 10_000 + (index % 50_000) as u16;
                let body = registration(
                    &format!("svc-{index:05}"),
                    SocketAddr::from(([127, 0, 0, 1], port)),
                );
                let sent = Instant::now();
                match client.post(url.as_str()).json(&body).send().await {
                    Ok(response) if response.status().is_success() => {
                        let _ = response.bytes().await;
                        done.latencies.push((
                            started.elapsed().as_secs_f64(),
                            sent.elapsed().as_secs_f64() * 1000.0,
                        ));
                    }
                    Ok(response) => {
                        let status = response.status();
                        let text = response.text().await.unwrap_or_default();
                        done.fail(format!("{status}: {text}"));
                    }
                    Err(error) => done.fail(error.to_string()),
                }
            }
            done
        });
    }
    let mut all = Registrations::default();
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(part) => all.merge(part),
            Err(error) => all.fail(error.to_string()),
        }
    }
    all
}
