//! Load generators: wrk for throughput and latency, and a closed-loop
//! client of our own where the run needs a time series and the content of
//! each answer (hot swap).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bench::wrk::{self, WrkResult};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::header::HOST;
use hyper_util::rt::TokioIo;

use crate::procs::Pinning;

/// How wrk is run.
#[derive(Debug, Clone)]
pub struct WrkOptions {
    /// `-t`.
    pub threads: u32,
    /// `-c`.
    pub connections: u32,
    /// `-d`, whole seconds.
    pub seconds: u64,
    /// `-s`: a Lua script.
    pub script: Option<PathBuf>,
    /// Environment for the script.
    pub env: Vec<(String, String)>,
    /// `-H`: headers sent with every request, `Name: value`.
    pub headers: Vec<String>,
}

impl WrkOptions {
    /// `threads` threads, `connections` connections, `seconds` long.
    pub fn new(threads: u32, connections: u32, seconds: u64) -> Self {
        Self {
            threads,
            connections,
            seconds,
            script: None,
            env: Vec::new(),
            headers: Vec::new(),
        }
    }

    /// The same, `seconds` long.
    pub fn for_seconds(&self, seconds: u64) -> Self {
        Self {
            seconds,
            ..self.clone()
        }
    }

    /// The same, sending `header` (`Name: value`) with every request.
    pub fn with_header(mut self, header: &str) -> Self {
        self.headers.push(header.to_owned());
        self
    }

    /// `wrk -tT -cC -dDs` as text, for the report.
    pub fn describe(&self) -> String {
        let headers: String = self
            .headers
            .iter()
            .map(|header| format!(" -H '{header}'"))
            .collect();
        format!(
            "wrk -t{} -c{} -d{}s{headers} --latency",
            self.threads, self.connections, self.seconds
        )
    }
}

/// Runs wrk against `url` on the client core and parses its output.
pub fn run_wrk(pinning: Pinning, url: &str, options: &WrkOptions) -> Result<WrkResult, String> {
    let mut command = pinning.client("wrk");
    command
        .arg(format!("-t{}", options.threads))
        .arg(format!("-c{}", options.connections))
        .arg(format!("-d{}s", options.seconds))
        .args(["--timeout", "10s", "--latency"]);
    if let Some(script) = &options.script {
        command.arg("-s").arg(script);
    }
    for header in &options.headers {
        command.arg("-H").arg(header);
    }
    command.arg(url);
    for (key, value) in &options.env {
        command.env(key, value);
    }
    let output = command
        .output()
        .map_err(|error| format!("cannot run wrk: {error}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "wrk failed ({}): {}{}",
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    wrk::parse(&stdout).map_err(|error| format!("{error} (url {url})"))
}

/// One answered (or failed) request of the closed-loop client.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// When it completed, in microseconds after the run started.
    pub done_us: u64,
    /// How long it took, in microseconds.
    pub latency_us: u32,
    /// 2xx with a body naming a known variant.
    pub ok: bool,
}

/// What the closed-loop client saw.
#[derive(Debug, Default)]
pub struct ClosedLoopReport {
    /// Every request, in no particular order.
    pub samples: Vec<Sample>,
    /// Answers by which variant of the plugin gave them (`swap-a`,
    /// `swap-b`), and by status for anything else.
    pub answers: BTreeMap<String, u64>,
    /// The first few failures, described.
    pub errors: Vec<String>,
    /// Failed requests: transport errors and non-2xx answers.
    pub failures: u64,
}

/// A closed-loop HTTP/1.1 load: `connections` keep-alive connections, each
/// sending `GET path` again as soon as the previous answer is read, until
/// `stop` is set. A transport error counts as a failure and the connection
/// is opened again.
pub async fn closed_loop(
    addr: SocketAddr,
    path: &'static str,
    connections: usize,
    variants: &'static [&'static str],
    stop: Arc<AtomicBool>,
    start: Instant,
) -> ClosedLoopReport {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let stop = stop.clone();
        tasks.spawn(connection(addr, path, variants, stop, start));
    }
    let mut report = ClosedLoopReport::default();
    while let Some(joined) = tasks.join_next().await {
        let Ok(part) = joined else {
            report.failures += 1;
            report.errors.push("a client task panicked".to_owned());
            continue;
        };
        report.samples.extend(part.samples);
        for (answer, count) in part.answers {
            *report.answers.entry(answer).or_default() += count;
        }
        report.failures += part.failures;
        for error in part.errors {
            if report.errors.len() < 10 {
                report.errors.push(error);
            }
        }
    }
    report
}

async fn connection(
    addr: SocketAddr,
    path: &'static str,
    variants: &'static [&'static str],
    stop: Arc<AtomicBool>,
    start: Instant,
) -> ClosedLoopReport {
    let mut report = ClosedLoopReport::default();
    let authority = addr.to_string();
    let fail = |report: &mut ClosedLoopReport, sent: Instant, error: String| {
        report.failures += 1;
        if report.errors.len() < 10 {
            report.errors.push(error);
        }
        report.samples.push(Sample {
            done_us: start.elapsed().as_micros() as u64,
            latency_us: sent.elapsed().as_micros() as u32,
            ok: false,
        });
    };
    'connect: while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let stream = match tokio::net::TcpStream::connect(addr).await {
            Ok(stream) => stream,
            Err(error) => {
                fail(&mut report, sent, format!("connect: {error}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
            {
                Ok(pair) => pair,
                Err(error) => {
                    fail(&mut report, sent, format!("handshake: {error}"));
                    continue;
                }
            };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        while !stop.load(Ordering::Relaxed) {
            let request = Request::get(path)
                .header(HOST, authority.as_str())
                .body(Empty::<Bytes>::new())
                .expect("a valid request");
            let sent = Instant::now();
            let response = match sender.send_request(request).await {
                Ok(response) => response,
                Err(error) => {
                    fail(&mut report, sent, format!("request: {error}"));
                    continue 'connect;
                }
            };
            let status = response.status();
            let body = match response.into_body().collect().await {
                Ok(body) => body.to_bytes(),
                Err(error) => {
                    fail(&mut report, sent, format!("body: {error}"));
                    continue 'connect;
                }
            };
            let variant = variants
                .iter()
                .find(|variant| contains(&body, variant.as_bytes()));
            match variant {
                Some(variant) if status.is_success() => {
                    *report.answers.entry((*variant).to_owned()).or_default() += 1;
                    report.samples.push(Sample {
                        done_us: start.elapsed().as_micros() as u64,
                        latency_us: sent.elapsed().as_micros() as u32,
                        ok: true,
                    });
                }
                _ => {
                    *report
                        .answers
                        .entry(format!("status {}", status.as_u16()))
                        .or_default() += 1;
                    fail(
                        &mut report,
                        sent,
                        format!("{status}: {}", String::from_utf8_lossy(&body)),
                    );
                }
            }
        }
    }
    report
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}
