//! Shared pieces of the benchmark suite: parsing `wrk --latency` output,
//! the little statistics the report needs, and how the two test servers
//! listen.
//!
//! The binaries are `bench-upstream` (the remote service proxied to),
//! `bench-native` (the native baseline of the hello plugin) and
//! `bench-runner` (the driver behind `bench/run`).

#![forbid(unsafe_code)]

use std::io::Write;
use std::net::SocketAddr;

pub mod stats;
pub mod wrk;

/// Binds `addr`, prints `listening <addr>` (the address actually bound) on
/// stdout once it accepts connections, then serves `app` until the process
/// is stopped. The runner reads that line to learn the port.
pub async fn serve(addr: SocketAddr, app: axum::Router) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening {addr}")?;
        stdout.flush()?;
    }
    axum::serve(listener, app).await
}

/// The JSON the hello plugin's `GET /hello?name=<name>` answers, and so the
/// native baseline too: `{"message":"Hello, <name>!"}`.
pub fn hello_message(name: &str) -> serde_json::Value {
    serde_json::json!({ "message": format!("Hello, {name}!") })
}

/// Size of the large body `bench-upstream` serves at `/large`: 1 MiB.
pub const LARGE_BODY_BYTES: usize = 1024 * 1024;

/// The small JSON document `bench-upstream` serves at `/small`.
pub const SMALL_BODY: &str = r#"{"id":42,"name":"bench","tags":["a","b","c"],"ok":true}"#;
