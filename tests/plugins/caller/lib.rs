//! Test plugin shared by packages `caller-a` and `caller-b` (the service
//! is named after the package): everything the host context offers, each
//! behind a route a test can drive. Setting `peer` (required) names the
//! service `/ping`, `/relay` and `/bench-calls` call. The benchmark's
//! plugin-call scenario drives `/bench-calls`.

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use plugin_api::{
    Call, Context, Error, Plugin, Query, Request, Response, Result, Router, ServiceConfig,
    export_plugin,
};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct Settings {
    peer: String,
    #[serde(default)]
    greeting: Option<String>,
}

struct Caller {
    ctx: Context,
    settings: Settings,
    ticks: Arc<AtomicU64>,
}

#[derive(Deserialize)]
struct Sleep {
    #[serde(default)]
    sleep_ms: u64,
}

#[derive(Deserialize)]
struct Target {
    service: String,
    path: String,
}

#[derive(Deserialize)]
struct BenchCalls {
    n: u32,
    /// The gateway's address: call the peer through it, over loopback,
    /// rather than in process.
    gateway: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    msg: String,
}

impl Plugin for Caller {
    fn config() -> ServiceConfig {
        ServiceConfig::new(env!("CARGO_PKG_NAME")).version(env!("CARGO_PKG_VERSION"))
    }

    fn init(ctx: &Context) -> Result<Self> {
        Ok(Caller {
            ctx: ctx.clone(),
            settings: ctx.settings()?,
            ticks: Arc::default(),
        })
    }

    fn router() -> Router<Self> {
        Router::new()
            .get("/settings", "The settings read", settings)
            .get("/pong", "Answers, after `sleep_ms`", pong)
            .get("/ping", "Calls the peer's /pong", ping)
            .get("/relay", "Calls the peer's /relay", relay)
            .get("/call", "Calls `service` at `path`", call)
            .get("/request-id", "The X-Request-Id received", request_id)
            .post("/visits", "Counts visits in a file of the data dir", visits)
            .post("/log", "Logs `msg` at INFO", log_message)
            .post("/tick", "Starts a task counting ticks until stopped", tick)
            .get("/ticks", "Ticks counted", ticks)
            .post(
                "/stuck",
                "Starts a task that ignores the stop signal",
                stuck,
            )
            .get(
                "/bench-calls",
                "Times `n` calls of the peer's /pong",
                bench_calls,
            )
    }
}

fn settings(state: &Caller, _: &Request) -> Result<Response> {
    Response::json(&json!({"peer": state.settings.peer, "greeting": state.settings.greeting}))
}

fn pong(state: &Caller, req: &Request) -> Result<Response> {
    let Query(Sleep { sleep_ms }) = req.extract()?;
    std::thread::sleep(Duration::from_millis(sleep_ms));
    Response::json(&json!({"from": state.ctx.name()}))
}

fn ping(state: &Caller, req: &Request) -> Result<Response> {
    let target = format!("/pong?{}", req.query_string());
    let answer: serde_json::Value = state.ctx.get_json(&state.settings.peer, &target)?;
    Response::json(&json!({"me": state.ctx.name(), "peer": answer}))
}

fn relay(state: &Caller, _: &Request) -> Result<Response> {
    let answer = state.ctx.call(&state.settings.peer, Call::get("/relay"));
    Ok(answer)
}

fn call(state: &Caller, req: &Request) -> Result<Response> {
    let Query(Target { service, path }) = req.extract()?;
    Ok(state.ctx.call(&service, Call::get(&path)))
}

fn request_id(_: &Caller, req: &Request) -> Result<Response> {
    Response::json(&json!({"id": req.header("x-request-id")}))
}

fn visits(state: &Caller, _: &Request) -> Result<Response> {
    let file = state.ctx.data_dir().join("visits");
    let count = match std::fs::read_to_string(&file) {
        Ok(text) => text.trim().parse::<u64>().unwrap_or(0),
        Err(_) => 0,
    } + 1;
    std::fs::write(&file, count.to_string())?;
    Response::json(&json!({"visits": count}))
}

fn log_message(_: &Caller, req: &Request) -> Result<Response> {
    let Query(Message { msg }) = req.extract()?;
    plugin_api::log::info!("{msg}");
    plugin_api::log::debug!("debug: {msg}");
    Ok(Response::new(204))
}

fn tick(state: &Caller, _: &Request) -> Result<Response> {
    let ticks = state.ticks.clone();
    state.ctx.spawn(move |stop| {
        while stop.sleep(Duration::from_millis(5)) {
            ticks.fetch_add(1, Ordering::Relaxed);
        }
        plugin_api::log::info!("tick task stopped");
    })?;
    Ok(Response::new(202))
}

fn ticks(state: &Caller, _: &Request) -> Result<Response> {
    Response::json(&json!({"ticks": state.ticks.load(Ordering::Relaxed)}))
}

fn stuck(state: &Caller, _: &Request) -> Result<Response> {
    state.ctx.spawn(|_stop| {
        plugin_api::log::info!("stuck task started");
        loop {
            std::thread::sleep(Duration::from_millis(50));
        }
    })?;
    Ok(Response::new(202))
}

fn bench_calls(state: &Caller, req: &Request) -> Result<Response> {
    let Query(BenchCalls { n, gateway }) = req.extract()?;
    let peer = &state.settings.peer;
    let started = Instant::now();
    match gateway {
        None => {
            for _ in 0..n {
                let answer = state.ctx.call(peer, Call::get("/pong"));
                if answer.status() != 200 {
                    return Err(Error::new(
                        502,
                        format!("{peer} answered {}", answer.status()),
                    ));
                }
            }
        }
        // What a plugin had to do before the context: a client of its own
        // (here a minimal keep-alive HTTP/1.1 one) to the gateway.
        Some(gateway) => {
            let mut stream = TcpStream::connect(&gateway)?;
            stream.set_nodelay(true)?;
            let mut answers = BufReader::new(stream.try_clone()?);
            let request = format!("GET /api/{peer}/pong HTTP/1.1\r\nHost: {gateway}\r\n\r\n");
            for _ in 0..n {
                stream.write_all(request.as_bytes())?;
                let status = read_answer(&mut answers)?;
                if status != 200 {
                    return Err(Error::new(502, format!("{peer} answered {status}")));
                }
            }
        }
    }
    let ns_per_call = started.elapsed().as_nanos() / u128::from(n.max(1));
    Response::json(&json!({"calls": n, "ns_per_call": ns_per_call as u64}))
}

/// Reads one HTTP/1.1 answer with a `content-length`; its status.
fn read_answer(answers: &mut impl BufRead) -> std::io::Result<u16> {
    let mut line = String::new();
    answers.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or(0);
    let mut length = 0;
    loop {
        line.clear();
        answers.read_line(&mut line)?;
        if line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    answers.read_exact(&mut vec![0; length])?;
    Ok(status)
}

export_plugin!(Caller);
