//! The gateway's reverse proxy to remote services: what reaches the
//! upstream, what comes back, streaming without buffering, pooled
//! connections, and the 502/504 answers.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use host_harness::http::{client, registration};
use host_harness::workspace::host_builder;
use host_harness::{Host, require_or_skip, status_kib};
use integration_tests::upstream::{Upstream, gateway_get, pattern_body, pattern_byte, register};
use integration_tests::{raw_http, stalled_upload};
use serde_json::{Value, json};

/// A registration that declares no endpoints, so the gateway routes every
/// method to it (one that declares them gets only the declared methods).
fn any_method(name: &str, upstream: &Upstream) -> Value {
    let mut body = registration(name, upstream.addr());
    body["endpoints"] = json!([]);
    body
}

async fn host_with(name: &str, upstream: &Upstream) -> Host {
    let host = host_builder().start().await.unwrap();
    let (status, answer) = register(&host, &any_method(name, upstream)).await;
    assert_eq!(status, 201, "{answer}");
    host
}

#[tokio::test]
async fn requests_arrive_whole_with_forwarding_headers() {
    let upstream = Upstream::start().await;
    let host = host_with("echo", &upstream).await;

    for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        let answer = client()
            .request(
                method.parse().unwrap(),
                host.gateway_url("/api/echo/echo/a/b%20c?x=1&y=%2F"),
            )
            .header("x-custom", "kept")
            .header("connection", "x-hop")
            .header("x-hop", "dropped")
            .body("payload")
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{method}");
        let request_id = answer.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let echo: Value = answer.json().await.unwrap();
        assert_eq!(echo["method"], method);
        assert_eq!(echo["path"], "/echo/a/b%20c");
        assert_eq!(echo["query"], "x=1&y=%2F");
        assert_eq!(echo["body"], "payload", "{method}");
        let headers = &echo["headers"];
        assert_eq!(headers["x-custom"][0], "kept");
        assert!(headers.get("x-hop").is_none(), "{headers}");
        assert_eq!(headers["x-forwarded-for"][0], "127.0.0.1");
        assert_eq!(headers["x-forwarded-proto"][0], "http");
        assert_eq!(
            headers["x-forwarded-host"][0],
            host.gateway_addr().to_string()
        );
        assert_eq!(headers["host"][0], upstream.addr().to_string());
        assert_eq!(headers["x-request-id"][0], request_id.as_str());
        // A generated id: a per-thread random prefix and a counter, 16 hex
        // digits each (no longer a UUID, which cost a getrandom call per
        // request).
        assert_eq!(request_id.len(), 33, "{request_id}");
    }

    // A caller's request id and forwarding chain are carried on.
    let answer = client()
        .get(host.gateway_url("/api/echo/echo"))
        .header("x-request-id", "trace-42")
        .header("x-forwarded-for", "192.0.2.7")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.headers()["x-request-id"], "trace-42");
    let echo: Value = answer.json().await.unwrap();
    assert_eq!(echo["headers"]["x-request-id"][0], "trace-42");
    assert_eq!(
        echo["headers"]["x-forwarded-for"][0],
        "192.0.2.7, 127.0.0.1"
    );
}

#[tokio::test]
async fn the_base_path_prefixes_every_path_and_cannot_be_escaped() {
    let upstream = Upstream::start().await;
    let host = host_builder().start().await.unwrap();
    let mut body = registration("versioned", upstream.addr());
    body["base_path"] = json!("/v1");
    assert_eq!(register(&host, &body).await.0, 201);

    let answer = client()
        .get(host.gateway_url("/api/versioned/echo/x?q=1"))
        .send()
        .await
        .unwrap();
    let echo: Value = answer.json().await.unwrap();
    assert_eq!(echo["path"], "/v1/echo/x");
    assert_eq!(echo["query"], "q=1");

    for path in [
        "/api/versioned/../health",
        "/api/versioned/%2e%2e/health",
        "/api/versioned/echo%2F..%2Fhealth",
    ] {
        let (status, answer) = raw_http(
            host.gateway_addr(),
            &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(status, 400, "{path}: {answer}");
    }
}

#[tokio::test]
async fn upstream_connections_are_pooled() {
    let upstream = Upstream::start().await;
    let host = host_with("pooled", &upstream).await;
    let http = client();
    for _ in 0..50 {
        let answer = http
            .get(host.gateway_url("/api/pooled/hello"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        answer.bytes().await.unwrap();
    }
    // One for the requests (plus, at most, one the health checker opened).
    assert!(
        upstream.connections() <= 2,
        "{} upstream connections for 50 sequential requests",
        upstream.connections()
    );
}

#[tokio::test]
async fn connections_the_upstream_closes_after_answering_are_never_reused() {
    let upstream = Upstream::start().await;
    let host = host_with("closing", &upstream).await;
    let http = client();
    for round in 0..30 {
        // Alternating with kept-alive answers, so pooled and closing
        // connections meet.
        let path = if round % 2 == 0 { "close" } else { "hello" };
        let answer = http
            .get(host.gateway_url(&format!("/api/closing/{path}")))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "request {round} to /{path}");
        assert!(!answer.headers().contains_key("connection"));
        answer.bytes().await.unwrap();
    }
    // Each `/close` ended its connection, so the next request needed a
    // new one: at least one per closing answer.
    assert!(
        upstream.connections() >= 15,
        "{} upstream connections for 15 answers that closed theirs",
        upstream.connections()
    );
}

#[tokio::test]
async fn a_localhost_host_is_reached() {
    let host = host_builder().start().await.unwrap();
    let v4 = Upstream::start().await;
    let mut body = registration("by-name", v4.addr());
    body["host"] = json!("localhost");
    assert_eq!(register(&host, &body).await.0, 201);
    let (status, text) = gateway_get(&host, "/api/by-name/hello?name=v4").await;
    assert_eq!(
        (status, text.as_str()),
        (200, r#"{"message":"Hello, v4!"}"#)
    );
}

#[tokio::test]
async fn an_ipv6_host_is_reached() {
    let bound = Upstream::start_on("[::1]:0".parse().unwrap())
        .await
        .map_err(|error| format!("cannot bind [::1]:0 on this machine: {error}"));
    let Some(v6) = require_or_skip("proxy::an_ipv6_host_is_reached", bound) else {
        return;
    };
    let host = host_builder().start().await.unwrap();
    // `registration` writes the upstream's own address: `::1`.
    let body = registration("by-v6", v6.addr());
    assert_eq!(body["host"], "::1");
    assert_eq!(register(&host, &body).await.0, 201);
    let (status, text) = gateway_get(&host, "/api/by-v6/hello?name=v6").await;
    assert_eq!(
        (status, text.as_str()),
        (200, r#"{"message":"Hello, v6!"}"#)
    );
}

#[tokio::test]
async fn an_unreachable_upstream_is_502_naming_the_service() {
    let host = host_builder().start().await.unwrap();
    // An address nothing listens on: bound, then released.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    assert_eq!(register(&host, &registration("down", addr)).await.0, 201);
    let answer = client()
        .get(host.gateway_url("/api/down/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 502);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["service"], "down");
    assert!(
        body["error"].as_str().unwrap().contains("cannot connect"),
        "{body}"
    );
}

#[tokio::test]
async fn a_slow_upstream_is_504_after_the_timeout() {
    let upstream = Upstream::start().await;
    let host = host_builder()
        .args(["--request-timeout", "500ms"])
        .start()
        .await
        .unwrap();
    assert_eq!(
        register(&host, &registration("slow", upstream.addr()))
            .await
            .0,
        201
    );
    let started = Instant::now();
    let answer = client()
        .get(host.gateway_url("/api/slow/slow/5000"))
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(answer.status(), 504);
    assert!(
        elapsed >= Duration::from_millis(450) && elapsed < Duration::from_secs(3),
        "answered after {elapsed:?}"
    );
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["service"], "slow");
    // Within the timeout it is answered.
    assert_eq!(gateway_get(&host, "/api/slow/slow/100").await.0, 200);
}

/// Peak resident set size of `pid` in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM").expect("VmHWM of the host")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabyte_bodies_stream_through_without_buffering() {
    const SIZE: u64 = 100 * 1024 * 1024;
    // Far below the body: what hyper's buffers may use, with headroom.
    const ALLOWED_GROWTH_KIB: u64 = 32 * 1024;
    let upstream = Upstream::start().await;
    // A timeout far shorter than the transfer: it must count from the end
    // of the upload, not from its start.
    let host = host_builder()
        .args(["--request-timeout", "2s"])
        .start()
        .await
        .unwrap();
    assert_eq!(register(&host, &any_method("bulk", &upstream)).await.0, 201);
    assert_eq!(gateway_get(&host, "/api/bulk/hello").await.0, 200);
    let baseline = host.rss_kib().unwrap();

    let started = Instant::now();
    let upload = client()
        .post(host.gateway_url("/api/bulk/count"))
        .header("content-length", SIZE)
        .body(pattern_body(SIZE))
        .send()
        .await
        .unwrap();
    assert_eq!(upload.status(), 200);
    let counted: Value = upload.json().await.unwrap();
    assert_eq!(counted, json!({"bytes": SIZE, "pattern_ok": true}));
    let upload_time = started.elapsed();
    let after_upload = peak_rss_kib(host.pid());

    let download = client()
        .get(host.gateway_url(&format!("/api/bulk/bytes/{SIZE}")))
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), 200);
    let mut stream = download.bytes_stream();
    let mut offset = 0u64;
    while let Some(chunk) = stream.next().await {
        for byte in chunk.unwrap().iter() {
            assert_eq!(*byte, pattern_byte(offset), "byte {offset}");
            offset += 1;
        }
    }
    assert_eq!(offset, SIZE);
    let peak = peak_rss_kib(host.pid());
    eprintln!(
        "host RSS: {baseline} KiB before, peak {after_upload} KiB after the upload ({upload_time:?}), peak {peak} KiB after the download ({} MiB each way)",
        SIZE >> 20
    );
    assert!(
        peak < baseline + ALLOWED_GROWTH_KIB,
        "host peak RSS {peak} KiB grew more than {ALLOWED_GROWTH_KIB} KiB over {baseline} KiB"
    );
}

#[tokio::test]
async fn a_client_that_stalls_its_upload_gets_408_not_a_504() {
    let upstream = Upstream::start().await;
    let host = host_builder()
        .args(["--request-timeout", "1s"])
        .start()
        .await
        .unwrap();
    let (status, answer) = register(&host, &any_method("sink", &upstream)).await;
    assert_eq!(status, 201, "{answer}");
    // Six bytes 300 ms apart: 1.8 s of upload, longer than the timeout but
    // never silent for as long, so it is not cut off; then silence.
    let (status, answer, waited) = stalled_upload(
        host.gateway_addr(),
        "/api/sink/count",
        6,
        Duration::from_millis(300),
    )
    .await;
    assert_eq!(status, 408, "{answer}");
    assert!(answer.contains("request body stalled for 1s"), "{answer}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "answered {waited:?} after the last byte, with a 1 s timeout"
    );
    assert!(
        !host.logs().contains("did not answer in time"),
        "{}",
        host.logs()
    );
}
