//! `bench-runner`: the driver behind `bench/run`. Starts every server
//! pinned to its core, runs each scenario of `BENCHMARKS.md` with ours and
//! its baseline interleaved, and writes `bench/results/latest.md` and
//! `latest.json`.
//!
//! It expects release builds of `plugin-host`, the plugins and the bench
//! binaries next to its own executable (`bench/run` builds them).

#![forbid(unsafe_code)]

mod cluster;
mod haproxy;
mod load;
mod nginx;
mod plugin_calls;
mod procs;
mod report;
mod scenarios;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

use crate::procs::Pinning;

/// Runs the benchmark suite (see BENCHMARKS.md).
#[derive(Debug, Parser)]
#[command(name = "bench-runner")]
pub struct Args {
    /// Short runs (1 round of 2 s per target, fewer swaps, rounds and
    /// services): a smoke test of the whole suite in under two minutes.
    #[arg(long)]
    quick: bool,

    /// Where `latest.md` and `latest.json` go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out: PathBuf,

    /// Directory holding plugin-host, bench-native, bench-upstream and the
    /// plugin libraries (default: this executable's directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,

    /// Do not pin servers and clients to separate cores.
    #[arg(long)]
    no_pin: bool,

    /// Another build of plugin-host (e.g. a copy of `target/release/plugin-host`
    /// from before a change), run beside ours as one more target, `base`, of
    /// scenarios 1 and 2, in the same interleaved rounds: an A/B of a change.
    #[arg(long)]
    compare_host: Option<PathBuf>,

    /// Runs the `base` target of `--compare-host` (our own build when no
    /// other is given) with `--metrics off`: the cost of the metrics, as a
    /// ratio of the same rounds.
    #[arg(long)]
    compare_metrics_off: bool,

    /// Interleaved rounds per target (default 5, quick 1).
    #[arg(long)]
    rounds: Option<usize>,

    /// Only these scenarios, e.g. `1,3` (memory, 6, is measured along the
    /// way whenever 1 runs).
    #[arg(long, value_delimiter = ',')]
    only: Vec<u8>,

    /// Registry scenario: services to register (default 10000, quick 2000).
    #[arg(long)]
    services: Option<usize>,

    /// Hot-swap scenario: replacements (default 100, quick 20).
    #[arg(long)]
    swaps: Option<usize>,

    /// After a full run, replace the results block of this markdown file
    /// (between `<!-- bench-results:begin -->` and `<!-- bench-results:end -->`)
    /// with the new table.
    #[arg(long)]
    update_doc: Option<PathBuf>,
}

/// The profile of this build, which `bench/run` uses for every binary.
/// Hot swap: ten replacements a second at most, about the rate the
/// watcher's 100 ms debounce allowed when the scenario's target was set.
const SWAP_EVERY: Duration = Duration::from_millis(100);

const BUILD: &str = if cfg!(debug_assertions) {
    "dev"
} else {
    "release"
};

/// How long and how much of everything: full or quick.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Settings {
    /// `full` or `quick`.
    pub mode: &'static str,
    /// The cargo profile this suite was built with (`bench/run` builds every
    /// binary of a run with the same one): `release`, or `dev` for a smoke
    /// run whose numbers mean nothing.
    pub build: &'static str,
    /// Interleaved rounds per target.
    pub rounds: usize,
    /// Seconds per wrk run.
    pub seconds: u64,
    /// Seconds of warm-up per target before the rounds.
    pub warmup_seconds: u64,
    /// wrk threads.
    pub wrk_threads: u32,
    /// wrk connections for small answers.
    pub connections_small: u32,
    /// wrk connections for the 1 MiB answers.
    pub connections_large: u32,
    /// Hot swap: replacements.
    pub swaps: usize,
    /// Hot swap: connections of the closed-loop client.
    pub swap_connections: usize,
    /// Hot swap: seconds of load before the first replacement.
    pub swap_lead_seconds: f64,
    /// Hot swap: the least time from one replacement's start to the next's.
    /// The dip is a rate: it depends on how often a swap happens as much as
    /// on what one costs, so the rate is fixed here rather than left to how
    /// fast the host mounts.
    pub swap_every: Duration,
    /// Load/unload rounds.
    pub load_rounds: usize,
    /// Registry: services registered.
    pub services: usize,
    /// Registry: registrations in flight.
    pub register_concurrency: usize,
    /// Registry: seconds of heartbeats.
    pub heartbeat_seconds: u64,
    /// Registry: wrk connections sending heartbeats.
    pub heartbeat_connections: u32,
    /// Registry: seconds of `GET /api/registry/services`.
    pub list_seconds: u64,
}

impl Settings {
    fn new(args: &Args) -> Self {
        let mut settings = if args.quick {
            Self {
                mode: "quick",
                build: BUILD,
                rounds: 1,
                seconds: 2,
                warmup_seconds: 1,
                wrk_threads: 1,
                connections_small: 64,
                connections_large: 16,
                swaps: 20,
                swap_connections: 64,
                swap_lead_seconds: 1.5,
                swap_every: SWAP_EVERY,
                load_rounds: 10,
                services: 2000,
                register_concurrency: 32,
                heartbeat_seconds: 2,
                heartbeat_connections: 64,
                list_seconds: 2,
            }
        } else {
            Self {
                mode: "full",
                build: BUILD,
                rounds: 5,
                seconds: 5,
                warmup_seconds: 1,
                wrk_threads: 1,
                connections_small: 64,
                connections_large: 16,
                swaps: 100,
                swap_connections: 64,
                swap_lead_seconds: 3.0,
                swap_every: SWAP_EVERY,
                load_rounds: 50,
                services: 10_000,
                register_concurrency: 32,
                heartbeat_seconds: 10,
                heartbeat_connections: 64,
                list_seconds: 5,
            }
        };
        if let Some(services) = args.services {
            settings.services = services.max(1);
        }
        if let Some(rounds) = args.rounds {
            settings.rounds = rounds.max(1);
        }
        if let Some(swaps) = args.swaps {
            settings.swaps = swaps.max(1);
        }
        settings
    }
}

/// The files the suite runs.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// `plugin-host`.
    pub host: PathBuf,
    /// `bench-native`.
    pub native: PathBuf,
    /// `bench-upstream`.
    pub upstream: PathBuf,
    /// `libhello.so`.
    pub hello: PathBuf,
    /// `libhello_keyed.so`.
    pub hello_keyed: PathBuf,
    /// `libhello_v1.so` and `libhello_v2.so`: two versions of one name.
    pub hello_versions: [PathBuf; 2],
    /// `libdemo_service.so`.
    pub demo: PathBuf,
    /// `libswap_a.so`.
    pub swap_a: PathBuf,
    /// `libswap_b.so`.
    pub swap_b: PathBuf,
    /// `--compare-host`: another plugin-host build measured beside ours.
    pub compare_host: Option<PathBuf>,
    /// Extra arguments of the `compare_host` target
    /// (`--compare-metrics-off`).
    pub compare_args: Vec<String>,
}

impl Artifacts {
    fn find(dir: &Path) -> Result<Self, String> {
        let file = |name: &str| {
            let path = dir.join(name);
            if path.exists() {
                Ok(path)
            } else {
                Err(format!(
                    "{} is missing: build first (`bench/run` runs `cargo build --release -p plugin-host -p hello -p hello-keyed -p hello-v1 -p hello-v2 -p demo-service -p swap-a -p swap-b -p bench`)",
                    path.display()
                ))
            }
        };
        Ok(Self {
            host: file("plugin-host")?,
            native: file("bench-native")?,
            upstream: file("bench-upstream")?,
            hello: file("libhello.so")?,
            hello_keyed: file("libhello_keyed.so")?,
            hello_versions: [file("libhello_v1.so")?, file("libhello_v2.so")?],
            demo: file("libdemo_service.so")?,
            swap_a: file("libswap_a.so")?,
            swap_b: file("libswap_b.so")?,
            compare_host: None,
            compare_args: Vec::new(),
        })
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let pinning = Pinning::detect(args.no_pin);
    // Probed before pinning: the machine's cores, not this process's.
    let machine = report::Machine::probe(&pinning);
    // Before any thread exists, so that every thread of the driver (its
    // closed-loop clients included) stays off the servers' core.
    if let Err(error) = pinning.pin_self_to_client_core() {
        eprintln!("bench-runner: cannot pin itself to core 0: {error}");
        return ExitCode::FAILURE;
    }
    let settings = Settings::new(&args);
    let bin_dir = args.bin_dir.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_owned))
            .unwrap_or_default()
    });
    let artifacts = match Artifacts::find(&bin_dir) {
        Ok(_)
            if args
                .compare_host
                .as_ref()
                .is_some_and(|path| !path.exists()) =>
        {
            eprintln!(
                "bench-runner: --compare-host {}: no such file",
                args.compare_host
                    .as_ref()
                    .map_or_else(String::new, |p| p.display().to_string())
            );
            return ExitCode::FAILURE;
        }
        Ok(artifacts) => Artifacts {
            compare_host: args
                .compare_host
                .clone()
                .or_else(|| args.compare_metrics_off.then(|| artifacts.host.clone())),
            compare_args: if args.compare_metrics_off {
                vec!["--metrics".to_owned(), "off".to_owned()]
            } else {
                Vec::new()
            },
            ..artifacts
        },
        Err(error) => {
            eprintln!("bench-runner: {error}");
            return ExitCode::FAILURE;
        }
    };
    for tool in ["wrk", "nginx", "haproxy"] {
        if !report::have(tool) {
            eprintln!("bench-runner: `{tool}` not found (bench/run installs it with apt-get)");
            return ExitCode::FAILURE;
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("bench-runner: cannot start tokio: {error}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    eprintln!(
        "bench-runner: {} mode on {} ({} cores); {}",
        settings.mode, machine.cpu_model, machine.cores, machine.pinning
    );
    let only = |n: u8| args.only.is_empty() || args.only.contains(&n);
    let results = scenarios::run_all(&runtime, pinning, &settings, &artifacts, &only);
    let results = report::Results {
        machine,
        settings: settings.clone(),
        elapsed_seconds: started.elapsed().as_secs_f64(),
        loadavg_end: report::loadavg(),
        scenarios: results,
    };
    let markdown = report::markdown(&results);
    if let Err(error) = report::write(&args.out, &markdown, &results) {
        eprintln!("bench-runner: {error}");
        return ExitCode::FAILURE;
    }
    println!("{markdown}");
    eprintln!(
        "bench-runner: wrote {}/latest.md and latest.json in {:.0} s",
        args.out.display(),
        results.elapsed_seconds
    );
    if let Some(doc) = &args.update_doc {
        if settings.mode != "full" || !args.only.is_empty() {
            eprintln!(
                "bench-runner: --update-doc ignored: only a full run of every scenario updates the document"
            );
        } else if let Err(error) = report::update_doc(doc, &markdown) {
            eprintln!("bench-runner: {error}");
            return ExitCode::FAILURE;
        }
    }
    if results.scenarios.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        for error in &results.scenarios.errors {
            eprintln!("bench-runner: {error}");
        }
        ExitCode::FAILURE
    }
}
