//! `bench-upstream`: the remote service of scenario 2. HTTP/1.1 with
//! keep-alive (axum's default), `GET /small` (a small JSON document),
//! `GET /large` (1 MiB of bytes), `GET /health`.
//!
//! Prints `listening <addr>` on stdout once it accepts connections.

#![forbid(unsafe_code)]

use std::net::SocketAddr;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use bench::{LARGE_BODY_BYTES, SMALL_BODY};
use bytes::Bytes;
use clap::Parser;

/// The upstream HTTP server proxied to in scenario 2.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    // One shared buffer: serving it clones a reference, not the mebibyte.
    let large = Bytes::from(vec![b'x'; LARGE_BODY_BYTES]);
    let app = Router::new()
        .route(
            "/small",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], SMALL_BODY) }),
        )
        .route(
            "/large",
            get(move || {
                let large = large.clone();
                async move {
                    ([(header::CONTENT_TYPE, "application/octet-stream")], large).into_response()
                }
            }),
        )
        .route(
            "/health",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    r#"{"status":"healthy"}"#,
                )
            }),
        );
    bench::serve(args.addr, app).await
}
