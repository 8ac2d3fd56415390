//! Scenario 7: what a plugin's call to another plugin costs in process
//! (`ctx.call`), against the same call through the gateway over loopback
//! (what a plugin had to do before it had a context).
//!
//! The test plugins `caller-a` and `caller-b` are loaded, each the other's
//! peer; `caller-a`'s `/bench-calls` times `n` sequential calls of
//! `caller-b`'s `/pong`, either way, on one of its worker threads, so the
//! client and the measurement are in the plugin and only the call differs.
//! Rounds alternate the two ways; the medians are compared.

use std::path::Path;

use bench::stats::median;
use host_harness::http::{self, get};
use host_harness::{Host, PATIENCE};
use serde::Serialize;
use serde_json::Value;
use tokio::runtime::Runtime;

use crate::Settings;
use crate::procs::Pinning;

/// Scenario 7's numbers.
#[derive(Debug, Clone, Serialize)]
pub struct CallCost {
    /// Calls per round and way.
    pub calls: u32,
    /// Rounds per way.
    pub rounds: usize,
    /// Median nanoseconds per in-process call.
    pub in_process_ns: u64,
    /// Median nanoseconds per call through the gateway over loopback.
    pub via_gateway_ns: u64,
    /// `via_gateway_ns / in_process_ns`.
    pub ratio: f64,
}

/// The two plugins' settings: each calls the other.
const CONFIG: &str = r#"
[plugin.caller-a.settings]
peer = "caller-b"

[plugin.caller-b.settings]
peer = "caller-a"
"#;

/// Runs scenario 7 on a host of its own; `bin_dir` holds the release
/// builds of `plugin-host`, `libcaller_a.so` and `libcaller_b.so`.
pub fn run(
    rt: &Runtime,
    pinning: Pinning,
    settings: &Settings,
    bin_dir: &Path,
) -> Result<CallCost, String> {
    let config_dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let config = config_dir.path().join("plugin-host.toml");
    std::fs::write(&config, CONFIG).map_err(|e| format!("config file: {e}"))?;
    let builder = Host::builder(pinning.server(&bin_dir.join("plugin-host")))
        .log_filter("info")
        .arg("--config")
        .arg(config.to_string_lossy().into_owned());
    let host = rt.block_on(builder.start())?;
    for lib in ["caller_a", "caller_b"] {
        let file = format!("lib{lib}.so");
        let library = bin_dir.join(&file);
        if !library.exists() {
            return Err(format!(
                "{} is missing: build it (`cargo build --release -p caller-a -p caller-b`)",
                library.display()
            ));
        }
        rt.block_on(host.mount_plugin(&library, &file))?;
    }
    let client = http::client();
    let calls: u32 = if settings.mode == "quick" { 500 } else { 5000 };
    let time = |via: &str| -> Result<u64, String> {
        let url = host.gateway_url(&format!("/api/caller-a/bench-calls?n={calls}{via}"));
        let (status, body) = rt.block_on(async {
            tokio::time::timeout(PATIENCE, get(&client, &url))
                .await
                .map_err(|_| format!("GET {url}: no answer within {PATIENCE:?}"))?
                .map_err(|e| format!("{e:?}"))
        })?;
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        match body["ns_per_call"].as_u64() {
            Some(ns) if status == 200 => Ok(ns),
            _ => Err(format!("GET {url}: {status} {body}")),
        }
    };
    let gateway = format!("&gateway={}", host.gateway_addr());
    // Warm-up: connections, call threads, caches.
    time("")?;
    time(&gateway)?;
    let rounds = settings.rounds.max(3);
    let (mut in_process, mut via_gateway) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let order: [&str; 2] = if round % 2 == 0 {
            ["", &gateway]
        } else {
            [&gateway, ""]
        };
        for via in order {
            let ns = time(via)? as f64;
            if via.is_empty() {
                in_process.push(ns);
            } else {
                via_gateway.push(ns);
            }
        }
    }
    let in_process_ns = median(&in_process).unwrap_or(0.0) as u64;
    let via_gateway_ns = median(&via_gateway).unwrap_or(0.0) as u64;
    let ratio = via_gateway_ns as f64 / in_process_ns.max(1) as f64;
    eprintln!(
        "[7] plugin-to-plugin call: in process {in_process_ns} ns, through the gateway {via_gateway_ns} ns: {ratio:.1}x"
    );
    Ok(CallCost {
        calls,
        rounds,
        in_process_ns,
        via_gateway_ns,
        ratio,
    })
}

/// The scenario's section of the report.
pub fn markdown(cost: &CallCost) -> String {
    format!(
        "## 7. Plugin-to-plugin call\n\n\
         | way | ns per call (median of {} rounds of {} calls) |\n|---|---|\n\
         | in process (`ctx.call`) | {} |\n\
         | through the gateway over loopback | {} |\n\n\
         The in-process call costs **1/{:.1}** of the same call through the gateway.\n",
        cost.rounds, cost.calls, cost.in_process_ns, cost.via_gateway_ns, cost.ratio
    )
}
