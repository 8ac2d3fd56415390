//! The machine the suite ran on, and the report: `latest.md`, `latest.json`.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use serde::Serialize;

use crate::Settings;
use crate::procs::Pinning;
use crate::scenarios::{Comparison, ScenarioResults};

/// What the suite ran on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `nproc`.
    pub cores: usize,
    /// `lscpu`'s model name.
    pub cpu_model: String,
    /// `lscpu | head -n 20`, for the record.
    pub lscpu: String,
    /// `uname -r`.
    pub kernel: String,
    /// Total memory.
    pub memory: String,
    /// `/etc/os-release`'s PRETTY_NAME (and Debian's point release).
    pub os: String,
    /// `rustc --version`.
    pub rustc: String,
    /// `wrk -v`, first line.
    pub wrk: String,
    /// `nginx -v`.
    pub nginx: String,
    /// `haproxy -v`, first line.
    pub haproxy: String,
    /// UTC time of the run.
    pub date: String,
    /// How servers and clients were pinned.
    pub pinning: String,
    /// `/proc/loadavg` when the run started: other work on the machine.
    pub loadavg_start: String,
}

/// The first three fields of `/proc/loadavg`.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Whether `tool` is on the PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|output| {
            let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&output.stderr));
            text.trim().to_owned()
        })
        .unwrap_or_default()
}

impl Machine {
    /// Asks the system.
    pub fn probe(pinning: &Pinning) -> Self {
        let lscpu = output("lscpu", &[]);
        let cpu_model = lscpu
            .lines()
            .find_map(|line| line.strip_prefix("Model name:"))
            .map(|model| model.trim().to_owned())
            .unwrap_or_else(|| "unknown CPU".to_owned());
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|meminfo| {
                meminfo
                    .lines()
                    .find_map(|line| line.strip_prefix("MemTotal:"))
                    .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
            .map_or_else(
                || "unknown".to_owned(),
                |kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0),
            );
        let pretty = std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|release| {
                release
                    .lines()
                    .find_map(|line| line.strip_prefix("PRETTY_NAME="))
                    .map(|name| name.trim_matches('"').to_owned())
            })
            .unwrap_or_else(|| "unknown OS".to_owned());
        let os = match std::fs::read_to_string("/etc/debian_version") {
            Ok(version) => format!("{pretty} ({})", version.trim()),
            Err(_) => pretty,
        };
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            lscpu: lscpu.lines().take(20).collect::<Vec<_>>().join("\n"),
            kernel: output("uname", &["-r"]),
            memory,
            os,
            rustc: output("rustc", &["--version"]),
            wrk: output("wrk", &["-v"])
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
            nginx: output("nginx", &["-v"]),
            haproxy: output("haproxy", &["-v"])
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
            date: output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            pinning: pinning.describe(),
            loadavg_start: loadavg(),
        }
    }
}

/// Everything written to `latest.json`.
#[derive(Debug, Serialize)]
pub struct Results {
    /// Where.
    pub machine: Machine,
    /// How long and how much.
    pub settings: Settings,
    /// Wall time of the whole run.
    pub elapsed_seconds: f64,
    /// `/proc/loadavg` when the run ended.
    pub loadavg_end: String,
    /// The numbers.
    pub scenarios: ScenarioResults,
}

/// Writes `latest.md` and `latest.json` (through a temp file and a rename,
/// so a reader never sees half a file).
pub fn write(dir: &Path, markdown: &str, results: &Results) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|error| format!("{}: {error}", dir.display()))?;
    let json = serde_json::to_string_pretty(results).map_err(|error| error.to_string())?;
    for (name, text) in [("latest.md", markdown), ("latest.json", json.as_str())] {
        let path = dir.join(name);
        let temp = dir.join(format!("{name}.tmp"));
        std::fs::write(&temp, text).map_err(|error| format!("{}: {error}", temp.display()))?;
        std::fs::rename(&temp, &path).map_err(|error| format!("{}: {error}", path.display()))?;
    }
    Ok(())
}

const BEGIN: &str = "<!-- bench-results:begin -->";
const END: &str = "<!-- bench-results:end -->";

/// Replaces the block between the markers of `doc` with `markdown`.
pub fn update_doc(doc: &Path, markdown: &str) -> Result<(), String> {
    let text =
        std::fs::read_to_string(doc).map_err(|error| format!("{}: {error}", doc.display()))?;
    let (Some(begin), Some(end)) = (text.find(BEGIN), text.find(END)) else {
        return Err(format!(
            "{} has no `{BEGIN}` ... `{END}` block",
            doc.display()
        ));
    };
    if end < begin {
        return Err(format!("{}: markers out of order", doc.display()));
    }
    // The document has its own heading for the block: drop the report's
    // title and put its sections one level down.
    let nested: String = markdown
        .lines()
        .skip_while(|line| line.starts_with("# ") || line.is_empty())
        .map(|line| {
            if line.starts_with('#') {
                format!("#{line}\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    let updated = format!("{}{BEGIN}\n{nested}{}", &text[..begin], &text[end..]);
    std::fs::write(doc, updated).map_err(|error| format!("{}: {error}", doc.display()))
}

fn int(value: f64) -> String {
    if !value.is_finite() {
        return "n/a".to_owned();
    }
    let digits = format!("{:.0}", value);
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 && digit != '-' {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

fn ms(value: f64) -> String {
    if !value.is_finite() {
        "n/a".to_owned()
    } else if value < 1.0 {
        format!("{:.0} µs", value * 1000.0)
    } else if value < 10.0 {
        format!("{value:.2} ms")
    } else {
        format!("{value:.1} ms")
    }
}

fn ratio(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.2}")
    } else {
        "n/a".to_owned()
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn comparison_table(out: &mut String, comparison: &Comparison, describe: &dyn Fn(&str) -> String) {
    let behind = comparison
        .targets
        .iter()
        .any(|t| (t.total_cpu_us_per_req - t.cpu_us_per_req).abs() > 0.05);
    let _ = writeln!(out, "`{}`: {}\n", comparison.wrk, comparison.title);
    if behind {
        let _ = writeln!(
            out,
            "| target | req/s | p50 | p99 | CPU/req | CPU/req incl. upstream | failed |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    } else {
        let _ = writeln!(out, "| target | req/s | p50 | p99 | CPU/req | failed |");
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    }
    for target in &comparison.targets {
        let total = if behind {
            format!(" {:.1} µs |", target.total_cpu_us_per_req)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.1} µs |{total} {} |",
            describe(&target.label),
            int(target.rps),
            ms(target.p50_ms),
            ms(target.p99_ms),
            target.cpu_us_per_req,
            target.failures
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| ratio | req/s (>1: ours faster) | p50 (>1: ours slower) | p99 | CPU/req{} (>1: ours costlier) |",
        if behind { " incl. upstream" } else { "" }
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for r in &comparison.ratios {
        let _ = writeln!(
            out,
            "| **{}** | **{}** | {} | {} | {} |",
            r.name,
            ratio(r.rps),
            ratio(r.p50),
            ratio(r.p99),
            ratio(r.cpu)
        );
    }
    let _ = writeln!(out);
}

/// One target of issue 13: what was measured against what was asked.
struct Goal {
    what: &'static str,
    shown: String,
    target: &'static str,
    met: bool,
}

impl Goal {
    fn at_least(
        what: &'static str,
        measured: f64,
        shown: String,
        target: &'static str,
        goal: f64,
    ) -> Self {
        Self {
            what,
            shown,
            target,
            met: measured >= goal,
        }
    }

    fn at_most(
        what: &'static str,
        measured: f64,
        shown: String,
        target: &'static str,
        goal: f64,
    ) -> Self {
        Self {
            what,
            shown,
            target,
            met: measured <= goal,
        }
    }
}

/// The performance targets (issue 13) next to this run's numbers, misses
/// marked. Scenarios not run are left out.
fn targets_table(out: &mut String, r: &ScenarioResults) {
    let ratio_of = |c: &Option<Comparison>, name: &str| {
        c.as_ref()
            .and_then(|c| c.ratios.iter().find(|ratio| ratio.name == name))
            .cloned()
    };
    let mut goals = Vec::new();
    if let Some(p) = ratio_of(&r.in_process, "plugin/native") {
        goals.push(Goal::at_least(
            "1. plugin / native, req/s",
            p.rps,
            ratio(p.rps),
            ">= 0.90",
            0.90,
        ));
        goals.push(Goal::at_most(
            "1. plugin / native, CPU/req",
            p.cpu,
            ratio(p.cpu),
            "<= 1.15",
            1.15,
        ));
    }
    if let Some(p) = ratio_of(&r.proxy_small, "ours/nginx") {
        goals.push(Goal::at_least(
            "2. ours / nginx, small JSON, req/s",
            p.rps,
            ratio(p.rps),
            ">= 1.00",
            1.0,
        ));
        goals.push(Goal::at_most(
            "2. ours / nginx, small JSON, p99",
            p.p99,
            ratio(p.p99),
            "<= 1.00",
            1.0,
        ));
    }
    if let Some(p) = ratio_of(&r.proxy_large, "ours/nginx") {
        goals.push(Goal::at_least(
            "2. ours / nginx, 1 MiB, req/s",
            p.rps,
            ratio(p.rps),
            ">= 1.50",
            1.5,
        ));
    }
    if let Some(h) = &r.hot_swap {
        goals.push(Goal::at_most(
            "3. throughput dip during the swaps",
            h.dip_percent,
            format!("{:.1} %", h.dip_percent),
            "<= 5 %",
            5.0,
        ));
        goals.push(Goal::at_most(
            "3. failed requests during the swaps",
            h.failures as f64,
            h.failures.to_string(),
            "0",
            0.0,
        ));
        let growth = h.rss_kib[2] as f64 - h.rss_kib[1] as f64;
        goals.push(Goal::at_most(
            "6. RSS growth over the second half of the swaps",
            growth,
            format!("{:+.1} MiB", growth / 1024.0),
            "none (<= +1 MiB)",
            1024.0,
        ));
    }
    if let Some(l) = &r.load_unload {
        goals.push(Goal::at_most(
            "4. file written -> first 200, p99",
            l.load_ms[1],
            ms(l.load_ms[1]),
            "<= 20 ms",
            20.0,
        ));
        goals.push(Goal::at_most(
            "4. file removed -> first 404, p99",
            l.unload_ms[1],
            ms(l.unload_ms[1]),
            "<= 20 ms",
            20.0,
        ));
    }
    if let Some(g) = &r.registry {
        goals.push(Goal::at_least(
            "5. registrations/s",
            g.registrations_per_s,
            int(g.registrations_per_s),
            ">= 10,000",
            10_000.0,
        ));
        goals.push(Goal::at_most(
            "5. heartbeat p99 under load",
            g.heartbeats.p99_ms,
            ms(g.heartbeats.p99_ms),
            "<= 5 ms",
            5.0,
        ));
        goals.push(Goal::at_most(
            "5. listing p50",
            g.list.p50_ms,
            ms(g.list.p50_ms),
            "<= 10 ms",
            10.0,
        ));
        goals.push(Goal::at_most(
            "5. listing p99",
            g.list.p99_ms,
            ms(g.list.p99_ms),
            "<= 30 ms",
            30.0,
        ));
        goals.push(Goal::at_most(
            "5. host RSS per 1,000 services",
            g.rss_per_1000_kib,
            mib(g.rss_per_1000_kib as u64),
            "<= 1.5 MiB",
            1536.0,
        ));
    }
    if goals.is_empty() {
        return;
    }
    let _ = writeln!(out, "## Targets\n");
    let _ = writeln!(out, "| | this run | target | |");
    let _ = writeln!(out, "|---|---:|---:|---|");
    for goal in goals {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            goal.what,
            goal.shown,
            goal.target,
            if goal.met { "met" } else { "**missed**" }
        );
    }
    let _ = writeln!(out);
}

/// The report as markdown.
pub fn markdown(results: &Results) -> String {
    let mut out = String::new();
    let m = &results.machine;
    let s = &results.settings;
    let r = &results.scenarios;
    let _ = writeln!(out, "# Benchmark results ({} run)\n", s.mode);
    let _ = writeln!(
        out,
        "Run {} by `bench/run{}`, {:.0} s in all.\n",
        m.date,
        if s.mode == "quick" { " --quick" } else { "" },
        results.elapsed_seconds
    );
    if s.build != "release" {
        let _ = writeln!(
            out,
            "**A `{}` build: this run checked that every scenario runs; its numbers are not comparable with anything.**\n",
            s.build
        );
    }
    let _ = writeln!(
        out,
        "- Machine: {}, {} cores (`nproc`), {} RAM; Linux {}; {}",
        m.cpu_model, m.cores, m.memory, m.kernel, m.os
    );
    let _ = writeln!(
        out,
        "- Tools: {}; {}; {}; {}",
        m.rustc, m.wrk, m.nginx, m.haproxy
    );
    let _ = writeln!(out, "- Pinning: {}", m.pinning);
    let _ = writeln!(
        out,
        "- Load average (1, 5, 15 min) at start: {}; at end: {} (the suite itself keeps about 2 busy; more means other work shared the machine)",
        m.loadavg_start, results.loadavg_end
    );
    let _ = writeln!(
        out,
        "- Each comparison: a warm-up of {} s per target, then {} interleaved round(s) of {} s per target, order alternating; medians of the rounds. All traffic on loopback.\n",
        s.warmup_seconds, s.rounds, s.seconds
    );

    targets_table(&mut out, r);

    let _ = writeln!(out, "## 1. In-process plugin vs. native handler\n");
    match &r.in_process {
        Some(c) => comparison_table(&mut out, c, &|label| match label {
            "native" => "native: axum handler, release (`bench-native`)".to_owned(),
            "plugin" => "plugin: hello through `plugin-host`".to_owned(),
            "plugin+key" => "plugin+key: hello-keyed, `X-API-Key` required and checked".to_owned(),
            "plugin-2-versions" => {
                "plugin-2-versions: hello-versioned, two versions, no version asked".to_owned()
            }
            "plugin-2-versions@1" => {
                "plugin-2-versions@1: hello-versioned, `@1` in the path".to_owned()
            }
            "base" => "base: hello through the `--compare-host` build".to_owned(),
            other => other.to_owned(),
        }),
        None => {
            let _ = writeln!(out, "Not run.\n");
        }
    }

    let _ = writeln!(out, "## 2. Remote proxy vs. direct vs. nginx and HAProxy\n");
    for c in [&r.proxy_small, &r.proxy_large].into_iter().flatten() {
        comparison_table(&mut out, c, &|label| match label {
            "direct" => "direct to `bench-upstream`".to_owned(),
            "nginx" => "nginx `proxy_pass`, upstream keep-alive".to_owned(),
            "nginx-unbuffered" => "nginx, `proxy_buffering off`".to_owned(),
            "haproxy" => "HAProxy, upstream keep-alive (`http-reuse always`)".to_owned(),
            "ours" => "ours: `plugin-host` gateway".to_owned(),
            "base" => "base: the `--compare-host` build's gateway".to_owned(),
            other => other.to_owned(),
        });
    }
    if r.proxy_small.is_none() && r.proxy_large.is_none() {
        let _ = writeln!(out, "Not run.\n");
    }

    let _ = writeln!(out, "## 3. Hot swap under load\n");
    match &r.hot_swap {
        Some(h) => {
            let _ = writeln!(
                out,
                "Closed-loop client, {} keep-alive connections on `GET /api/swap/`, while `swap.so` is replaced {} times (swap_a and swap_b alternately, copy + atomic rename, each replacement waits for the host's `plugin mounted ... replaced=true`, and the next starts no sooner than {} ms after it).\n",
                h.connections, h.swaps, h.swap_every_ms
            );
            let _ = writeln!(out, "| metric | value |");
            let _ = writeln!(out, "|---|---:|");
            let _ = writeln!(
                out,
                "| **failed or non-2xx requests** | **{}** of {} |",
                h.failures,
                int(h.requests as f64)
            );
            let answers: Vec<String> = h
                .answers
                .iter()
                .map(|(k, v)| format!("{k}: {}", int(*v as f64)))
                .collect();
            let _ = writeln!(out, "| answers | {} |", answers.join(", "));
            let _ = writeln!(
                out,
                "| replacements mounted / old versions unloaded | {} / {} |",
                h.swaps_mounted, h.unloaded
            );
            let _ = writeln!(out, "| req/s before swapping | {} |", int(h.steady_rps));
            let _ = writeln!(
                out,
                "| req/s while swapping ({:.1} s) | {} |",
                h.swapping_seconds,
                int(h.swapping_rps)
            );
            let _ = writeln!(
                out,
                "| **throughput dip** (ratio to before) | **{:.1} %** ({}) |",
                h.dip_percent,
                ratio(h.swapping_rps / h.steady_rps)
            );
            let _ = writeln!(
                out,
                "| lost per replacement, as time at the rate before | {} |",
                ms(h.lost_ms_per_swap)
            );
            let _ = writeln!(
                out,
                "| worst 100 ms window while swapping | {} req/s |",
                int(h.worst_100ms_rps)
            );
            let _ = writeln!(
                out,
                "| latency before: p50 / p99 / max | {} / {} / {} |",
                ms(h.steady_latency_ms[0]),
                ms(h.steady_latency_ms[1]),
                ms(h.steady_latency_ms[2])
            );
            let _ = writeln!(
                out,
                "| latency while swapping: p50 / p99 / max | {} / {} / {} |",
                ms(h.swapping_latency_ms[0]),
                ms(h.swapping_latency_ms[1]),
                ms(h.swapping_latency_ms[2])
            );
            let _ = writeln!(
                out,
                "| file written -> new version mounted: p50 / p99 | {} / {} |",
                ms(h.swap_ms[0]),
                ms(h.swap_ms[1])
            );
            let _ = writeln!(
                out,
                "| host RSS before / after half / after all replacements | {} / {} / {} |",
                mib(h.rss_kib[0]),
                mib(h.rss_kib[1]),
                mib(h.rss_kib[2])
            );
            if !h.errors.is_empty() {
                let _ = writeln!(out, "\nFirst failures: `{}`", h.errors.join("`, `"));
            }
            let _ = writeln!(out);
        }
        None => {
            let _ = writeln!(out, "Not run.\n");
        }
    }

    let _ = writeln!(out, "## 4. Load and unload latency\n");
    match &r.load_unload {
        Some(l) => {
            let _ = writeln!(
                out,
                "{} rounds; the plugins directory is watched with a debounce of {}; polled every 1 ms.\n",
                l.rounds, l.debounce
            );
            let _ = writeln!(out, "| | p50 | p99 | max |");
            let _ = writeln!(out, "|---|---:|---:|---:|");
            let _ = writeln!(
                out,
                "| **file written -> first 200** | **{}** | **{}** | {} |",
                ms(l.load_ms[0]),
                ms(l.load_ms[1]),
                ms(l.load_ms[2])
            );
            let _ = writeln!(
                out,
                "| **file removed -> first 404** | **{}** | **{}** | {} |",
                ms(l.unload_ms[0]),
                ms(l.unload_ms[1]),
                ms(l.unload_ms[2])
            );
            let _ = writeln!(
                out,
                "| host's own mount time (read, copy, dlopen, init; `elapsed_ms`) | {} | {} | |",
                ms(l.host_mount_ms[0]),
                ms(l.host_mount_ms[1])
            );
            let _ = writeln!(
                out,
                "\nAnswers other than the old or the new state while polling: {}.\n",
                l.unexpected_answers
            );
        }
        None => {
            let _ = writeln!(out, "Not run.\n");
        }
    }

    let _ = writeln!(out, "## 5. Registry at scale\n");
    match &r.registry {
        Some(g) => {
            let _ = writeln!(
                out,
                "{} remote services registered ({} in flight), then heartbeats for every one in turn. Nothing listens on their ports: the host's health checker probes all of them every 10 s (its default) and finds them down, as it would find crashed services.\n",
                int(g.services as f64),
                g.register_concurrency
            );
            let _ = writeln!(out, "| metric | value |");
            let _ = writeln!(out, "|---|---:|");
            let _ = writeln!(
                out,
                "| registrations/s | {} (first tenth {}, last tenth {}; p50 {}, p99 {}; {} failed) |",
                int(g.registrations_per_s),
                int(g.registrations_per_s_first_last_tenth[0]),
                int(g.registrations_per_s_first_last_tenth[1]),
                ms(g.register_ms[0]),
                ms(g.register_ms[1]),
                g.register_failures
            );
            let _ = writeln!(
                out,
                "| **heartbeats/s** (`wrk -t1 -c{} -d{}s`) | **{}** (p50 {}, p99 {}; {} failed) |",
                s.heartbeat_connections,
                s.heartbeat_seconds,
                int(g.heartbeats.rps),
                ms(g.heartbeats.p50_ms),
                ms(g.heartbeats.p99_ms),
                g.heartbeats.failures()
            );
            let _ = writeln!(
                out,
                "| **`GET /api/registry/services`** at {} entries ({:.1} MiB), one connection | **p50 {}, p99 {}** ({:.1} req/s) |",
                int(g.list_entries as f64),
                g.list_bytes as f64 / 1024.0 / 1024.0,
                ms(g.list.p50_ms),
                ms(g.list.p99_ms),
                g.list.rps
            );
            let _ = writeln!(
                out,
                "| a page of it, `?limit=100`, one connection | p50 {}, p99 {} ({:.1} req/s) |",
                ms(g.list_page.p50_ms),
                ms(g.list_page.p99_ms),
                g.list_page.rps
            );
            let _ = writeln!(
                out,
                "| host RSS: before / after registering / at the end | {} / {} / {} |",
                mib(g.rss_before_kib),
                mib(g.rss_after_register_kib),
                mib(g.rss_end_kib)
            );
            let _ = writeln!(
                out,
                "| **host RSS per 1,000 services** | **{:.0} KiB** |",
                g.rss_per_1000_kib
            );
            let _ = writeln!(out);
        }
        None => {
            let _ = writeln!(out, "Not run.\n");
        }
    }

    let _ = writeln!(out, "## 6. Memory (host RSS)\n");
    match &r.memory {
        Some(mem) => {
            let _ = writeln!(out, "| state | RSS |");
            let _ = writeln!(out, "|---|---:|");
            let _ = writeln!(out, "| idle, no plugin | {} |", mib(mem.idle_kib));
            let _ = writeln!(
                out,
                "| hello and demo-service loaded | {} |",
                mib(mem.plugins_kib)
            );
            if let Some(kib) = mem.after_load_kib {
                let _ = writeln!(out, "| after scenarios 1 and 2 | {} |", mib(kib));
            }
            if let Some(kib) = mem.after_swaps_kib {
                let _ = writeln!(
                    out,
                    "| after scenario 3 (every replaced version unloaded) | {} |",
                    mib(kib)
                );
            }
            let _ = writeln!(out);
        }
        None => {
            let _ = writeln!(out, "Not run.\n");
        }
    }

    if let Some(cost) = &r.plugin_calls {
        let _ = writeln!(out, "{}", crate::plugin_calls::markdown(cost));
    }
    if let Some(cost) = &r.cluster {
        let _ = writeln!(out, "{}", crate::cluster::markdown(cost));
    }

    // The shared host's warnings, then those of scenario 5's own host.
    let registry_warnings = r.registry.iter().map(|g| &g.host_warnings);
    for w in r.host_warnings.iter().chain(registry_warnings) {
        if w.count > 0 {
            let _ = writeln!(out, "{}: {} WARN/ERROR log lines, e.g.:\n", w.host, w.count);
            for sample in &w.samples {
                let _ = writeln!(out, "- `{}`", sample.replace('`', "'"));
            }
            let _ = writeln!(out);
        }
    }
    if !r.errors.is_empty() {
        let _ = writeln!(out, "## Scenarios that could not run\n");
        for error in &r.errors {
            let _ = writeln!(out, "- {}", error.replace('\n', " "));
        }
        let _ = writeln!(out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_doc_block_is_replaced_and_nested() {
        let dir = tempfile::tempdir().unwrap();
        let doc = dir.path().join("DOC.md");
        std::fs::write(
            &doc,
            format!("# Doc\n\n## Latest\n\n{BEGIN}\nold\n{END}\n\n## After\n"),
        )
        .unwrap();
        update_doc(&doc, "# Title\n\nRun x.\n\n## 1. One\n\n| a |\n").unwrap();
        let text = std::fs::read_to_string(&doc).unwrap();
        assert_eq!(
            text,
            format!(
                "# Doc\n\n## Latest\n\n{BEGIN}\nRun x.\n\n### 1. One\n\n| a |\n{END}\n\n## After\n"
            )
        );
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(int(1_234_567.4), "1,234,567");
        assert_eq!(int(999.0), "999");
        assert_eq!(ms(0.5), "500 µs");
        assert_eq!(ms(12.34), "12.3 ms");
    }
}
