//! `bench-native`: the physical limit of scenario 1. The hello plugin's
//! `GET /api/hello/hello?name=<name>` as a plain axum handler in the same
//! process as the server: same JSON (`{"message":"Hello, <name>!"}`, built
//! with serde_json as the plugin builds it), no gateway, no plugin runtime.
//!
//! Prints `listening <addr>` on stdout once it accepts connections.

#![forbid(unsafe_code)]

use std::net::SocketAddr;

use axum::extract::Query;
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;
use serde::Deserialize;

/// The native baseline of the hello plugin.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
}

#[derive(Debug, Deserialize)]
struct HelloQuery {
    name: Option<String>,
}

async fn hello(Query(query): Query<HelloQuery>) -> Json<serde_json::Value> {
    Json(bench::hello_message(
        query.name.as_deref().unwrap_or("World"),
    ))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let app = Router::new().route("/api/hello/hello", get(hello)).route(
        "/health",
        get(|| async { Json(serde_json::json!({ "status": "healthy" })) }),
    );
    bench::serve(args.addr, app).await
}
