//! What only the end-to-end tests need on top of [`host_harness`]: a stand-in
//! remote service ([`upstream`]), raw HTTP for requests a client would
//! normalize or could not stall, and polling for states no log line announces.
//!
//! ```no_run
//! # async fn example() {
//! use host_harness::{http, workspace};
//! let host = workspace::host_builder().start().await.unwrap();
//! host.install_plugin(workspace::plugin_library("hello"), "libhello.so").unwrap();
//! host.wait_for_log("plugin mounted").await.unwrap();
//! let (status, _) = http::get_json(&host.gateway_url("/api/hello/hello")).await.unwrap();
//! assert_eq!(status, 200);
//! # }
//! ```

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use host_harness::PATIENCE;

pub mod python;
pub mod upstream;

/// Polls `check` every 10 ms until it returns true; panics naming `what`
/// after [`PATIENCE`]. For states the host announces in no log line.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {PATIENCE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts `POST <path>` declaring a 1,000-byte body, sends `pieces` bytes
/// of it one at a time `pace` apart, then sends nothing more: a client
/// whose upload stalls. Panics if an answer comes before the stall. Returns
/// the status code, the whole answer, and how long after the last byte it
/// came.
pub async fn stalled_upload(
    addr: SocketAddr,
    path: &str,
    pieces: usize,
    pace: Duration,
) -> (u16, String, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: 1000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    for _ in 0..pieces {
        // The pace is the stimulus: a slow client, not a wait for the host.
        tokio::time::sleep(pace).await;
        stream.write_all(b"x").await.expect("write a piece");
    }
    let stalled = Instant::now();
    let mut early = [0u8; 1];
    match stream.try_read(&mut early) {
        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("answered while the body was still flowing: {other:?}"),
    }
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("an answer within 10 s of the stall")
        .expect("read the answer");
    let waited = stalled.elapsed();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    (status_code(&answer), answer, waited)
}

/// Sends `request` as raw bytes (for paths an HTTP client would normalize)
/// and returns the status code and the whole answer.
pub fn raw_http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(request.as_bytes()).expect("write");
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    (status_code(&answer), answer)
}

/// The status code of an HTTP/1.1 answer.
fn status_code(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {answer:?}"))
}
