//! What the gateway admits, from the config file's `[cors]`,
//! `[service.<name>]` and `[rate_limit]`: CORS preflights answered by the
//! gateway, rate limits per client (429 then recovery), and the limit of
//! requests in flight per service (503 when full, then recovery).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use host_harness::Host;
use host_harness::http::{client, registration};
use host_harness::workspace::{host_builder, plugin_library};
use integration_tests::eventually;
use integration_tests::upstream::{Upstream, register};
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tempfile::TempDir;

/// A host started with `--config` holding `toml`; the directory holding
/// the file lives as long as the host is needed.
async fn host_with_config(toml: &str) -> (Host, TempDir) {
    let dir = config_dir(toml);
    let host = host_builder()
        .arg("--config")
        .arg(dir.path().join("plugin-host.toml").display().to_string())
        .start()
        .await
        .unwrap();
    (host, dir)
}

fn config_dir(toml: &str) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("plugin-host.toml"), toml).unwrap();
    dir
}

/// Registers `upstream` as `name`, declaring no endpoints, so every method
/// reaches it.
async fn register_any_method(host: &Host, name: &str, upstream: &Upstream) {
    let mut body = registration(name, upstream.addr());
    body["endpoints"] = json!([]);
    let (status, answer) = register(host, &body).await;
    assert_eq!(status, 201, "{answer}");
}

/// `OPTIONS <path>` as a browser's preflight for a `POST` with a JSON body.
async fn preflight(host: &Host, path: &str, origin: &str) -> (u16, HeaderMap, String) {
    let answer = client()
        .request(Method::OPTIONS, host.gateway_url(path))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    let headers = answer.headers().clone();
    (status, headers, answer.text().await.unwrap())
}

#[tokio::test]
async fn a_preflight_from_an_allowed_origin_is_answered_by_the_gateway() {
    let (host, _config) = host_with_config(
        r#"
        [cors]
        allow_origins = ["https://app.example", "http://localhost:3000"]
        allow_methods = ["GET", "POST"]
        allow_headers = ["content-type", "x-api-key"]
        expose_headers = ["x-request-id"]
        max_age = "10m"
        "#,
    )
    .await;
    let upstream = Upstream::start().await;
    register_any_method(&host, "svc", &upstream).await;

    let (status, headers, body) = preflight(&host, "/api/svc/echo", "http://localhost:3000").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        headers["access-control-allow-origin"],
        "http://localhost:3000"
    );
    assert_eq!(headers["access-control-allow-methods"], "GET,POST");
    assert_eq!(
        headers["access-control-allow-headers"],
        "content-type,x-api-key"
    );
    assert_eq!(headers["access-control-max-age"], "600");
    assert!(headers["vary"].to_str().unwrap().contains("origin"));
    assert!(body.is_empty(), "the service answered: {body}");
    assert_eq!(upstream.echoes(), 0, "the preflight reached the service");

    // The request itself reaches the service, and its answer carries the
    // CORS headers.
    let answer = client()
        .post(host.gateway_url("/api/svc/echo"))
        .header("origin", "http://localhost:3000")
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
    assert_eq!(
        answer.headers()["access-control-expose-headers"],
        "x-request-id"
    );
    let echo: Value = answer.json().await.unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(upstream.echoes(), 1);

    // An OPTIONS without `Access-Control-Request-Method` is no preflight:
    // the service answers it, with the CORS headers added.
    let answer = client()
        .request(Method::OPTIONS, host.gateway_url("/api/svc/echo"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let echo: Value = answer.json().await.unwrap();
    assert_eq!(echo["method"], "OPTIONS");
    assert_eq!(upstream.echoes(), 2);
}

#[tokio::test]
async fn an_origin_not_allowed_gets_no_cors_headers_and_no_error() {
    let (host, _config) = host_with_config(
        r#"
        [cors]
        allow_origins = ["https://app.example"]
        "#,
    )
    .await;
    let upstream = Upstream::start().await;
    register_any_method(&host, "svc", &upstream).await;

    let (status, headers, body) = preflight(&host, "/api/svc/echo", "https://evil.example").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.is_empty(), "{body}");
    assert!(
        headers
            .keys()
            .all(|name| !name.as_str().starts_with("access-control-")),
        "{headers:?}"
    );
    assert_eq!(upstream.echoes(), 0, "the preflight reached the service");

    let answer = client()
        .get(host.gateway_url("/api/svc/echo"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert!(!answer.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn a_service_table_replaces_the_global_cors_and_without_cors_preflights_reach_the_service() {
    let (host, _config) = host_with_config(
        r#"
        [cors]
        allow_origins = ["https://global.example"]

        [service.own.cors]
        allow_origins = ["https://own.example"]

        [service.open.cors]
        allow_origins = []
        "#,
    )
    .await;
    let upstream = Upstream::start().await;
    for name in ["own", "other", "open"] {
        register_any_method(&host, name, &upstream).await;
    }

    for (path, allowed, refused) in [
        (
            "/api/own/echo",
            "https://own.example",
            "https://global.example",
        ),
        (
            "/api/other/echo",
            "https://global.example",
            "https://own.example",
        ),
    ] {
        let (_, headers, _) = preflight(&host, path, allowed).await;
        assert_eq!(headers["access-control-allow-origin"], allowed, "{path}");
        let (_, headers, _) = preflight(&host, path, refused).await;
        assert!(
            !headers.contains_key("access-control-allow-origin"),
            "{path}"
        );
    }
    assert_eq!(upstream.echoes(), 0);

    // CORS off for `open`: the service answers its preflights itself.
    let (status, _, body) = preflight(&host, "/api/open/echo", "https://global.example").await;
    assert_eq!(status, 200);
    let echo: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["method"], "OPTIONS");
    assert_eq!(echo["headers"]["access-control-request-method"][0], "POST");
    assert_eq!(upstream.echoes(), 1);

    // No config at all: the same.
    let plain = host_builder().start().await.unwrap();
    register_any_method(&plain, "svc", &upstream).await;
    let (status, _, body) = preflight(&plain, "/api/svc/echo", "https://global.example").await;
    assert_eq!(status, 200);
    let echo: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["method"], "OPTIONS");
}

/// `GET /api/hello/hello` from `client`: status, `Retry-After`, body.
async fn hello_from(host: &Host, client: &reqwest::Client) -> (u16, Option<String>, Value) {
    let answer = client
        .get(host.gateway_url("/api/hello/hello"))
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    let retry_after = answer
        .headers()
        .get("retry-after")
        .map(|value| value.to_str().unwrap().to_owned());
    (
        status,
        retry_after,
        answer.json().await.unwrap_or(Value::Null),
    )
}

fn client_from(address: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(IpAddr::from(address))
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_client_over_its_rate_gets_429_with_retry_after_then_recovers() {
    // A burst of 3, then one request per second.
    let (host, _config) = host_with_config(
        r#"
        [rate_limit.per_client]
        requests = 1
        per = "1s"
        burst = 3
        "#,
    )
    .await;
    host.mount_plugin(plugin_library("hello"), "libhello.so")
        .await
        .unwrap();
    let first = client_from([127, 0, 0, 1]);

    for n in 1..=3 {
        let (status, _, body) = hello_from(&host, &first).await;
        assert_eq!(status, 200, "request {n}: {body}");
    }
    let (status, retry_after, body) = hello_from(&host, &first).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(body["limit"], "per_client");
    assert_eq!(body["requests"], 1);
    assert_eq!(body["per"], "1s");
    assert_eq!(body["burst"], 3);
    assert!(
        body["error"].as_str().unwrap().contains("per_client"),
        "{body}"
    );

    // Another address has a bucket of its own.
    let (status, _, body) = hello_from(&host, &client_from([127, 0, 0, 2])).await;
    assert_eq!(status, 200, "{body}");

    // A second later the first client is served again.
    let refused_at = Instant::now();
    eventually("the client's bucket refills", || async {
        hello_from(&host, &first).await.0 == 200
    })
    .await;
    assert!(
        refused_at.elapsed() < Duration::from_secs(5),
        "recovered only after {:?}",
        refused_at.elapsed()
    );
}

/// `GET /api/slow/sleep?ms=<ms>`: status, `Retry-After` and body.
async fn sleep_for(host: &Host, ms: u64) -> (u16, Option<String>, Value) {
    let answer = client()
        .get(host.gateway_url(&format!("/api/slow/sleep?ms={ms}")))
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    let retry_after = answer
        .headers()
        .get("retry-after")
        .map(|value| value.to_str().unwrap().to_owned());
    (
        status,
        retry_after,
        answer.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn a_plugin_at_its_concurrency_limit_answers_503_at_once_then_serves_again() {
    let (host, _config) = host_with_config(
        r#"
        [gateway]
        max_concurrent_per_service = 50

        [service.slow]
        max_concurrent = 2
        "#,
    )
    .await;
    host.mount_plugin(plugin_library("slow"), "libslow.so")
        .await
        .unwrap();

    // Three at once, each holding a worker for 3 s: two are let through,
    // the third is refused at once.
    let requests: Vec<_> = (0..3)
        .map(|_| {
            let host = &host;
            async move {
                let started = Instant::now();
                let answer = sleep_for(host, 3000).await;
                (answer, started.elapsed())
            }
        })
        .collect();
    let mut answers = futures_util::future::join_all(requests).await;
    answers.sort_by_key(|((status, _, _), _)| *status);
    let statuses: Vec<u16> = answers.iter().map(|((status, _, _), _)| *status).collect();
    assert_eq!(statuses, [200, 200, 503], "{answers:?}");
    let ((_, retry_after, body), took) = &answers[2];
    assert!(
        *took < Duration::from_secs(1),
        "refused only after {took:?}"
    );
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(body["service"], "slow");
    assert_eq!(body["limit"], "max_concurrent");
    assert_eq!(body["max_concurrent"], 2);

    // The two have finished: the service takes requests again.
    let (status, _, body) = sleep_for(&host, 0).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_streamed_answer_holds_its_place_until_its_body_is_done() {
    let (host, _config) = host_with_config(
        r#"
        [service.up]
        max_concurrent = 1
        "#,
    )
    .await;
    let upstream = Upstream::start().await;
    register_any_method(&host, "up", &upstream).await;

    // 64 MiB, of which the client reads nothing: the answer's head is in,
    // its body is still streaming.
    let streaming = client()
        .get(host.gateway_url("/api/up/bytes/67108864"))
        .send()
        .await
        .unwrap();
    assert_eq!(streaming.status(), 200);
    let answer = client()
        .get(host.gateway_url("/api/up/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 503);
    assert_eq!(answer.headers()["retry-after"], "1");

    // The client gives up on the body: the place is free again.
    drop(streaming);
    eventually("the dropped answer's place is free", || async {
        client()
            .get(host.gateway_url("/api/up/hello"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
    })
    .await;
}

#[tokio::test]
async fn an_invalid_admission_setting_stops_the_start_naming_its_key() {
    let dir = config_dir(
        r#"
        [service.hello.cors]
        allow_origins = ["https://a.example", "https://b.example/app"]
        "#,
    );
    let error = host_builder()
        .arg("--config")
        .arg(dir.path().join("plugin-host.toml").display().to_string())
        .start()
        .await
        .expect_err("the host must refuse to start");
    let output = error.to_string();
    assert!(
        output.contains("service.hello.cors.allow_origins[1]") && output.contains("has a path"),
        "{output}"
    );
}
