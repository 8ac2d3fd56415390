//! The registry API for out-of-process services: registration, listing,
//! heartbeats and the TTL, deregistration, eviction, persistence across
//! `kill -9`, names shared with plugins, and refusals of bad input.

use std::time::{Duration, Instant};

use host_harness::http::{client, get_json, post_json, registration};
use host_harness::workspace::{host_builder, plugin_library};
use host_harness::{Host, HostBuilder};
use integration_tests::eventually;
use integration_tests::upstream::{Upstream, gateway_get, heartbeat, register};
use serde_json::{Value, json};

/// Liveness options short enough for tests: unhealthy after 1 s of
/// silence, health checks every 200 ms.
const FAST_LIVENESS: [&str; 8] = [
    "--heartbeat-interval",
    "300ms",
    "--heartbeat-ttl",
    "1s",
    "--health-check-interval",
    "200ms",
    "--health-check-timeout",
    "500ms",
];

fn fast_host() -> HostBuilder {
    host_builder().args(FAST_LIVENESS)
}

async fn listed(host: &Host, name: &str) -> (u16, Value) {
    get_json(&host.registry_url(&format!("/api/registry/services/{name}")))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_registration_is_answered_routed_and_listed() {
    let host = host_builder().start().await.unwrap();
    let upstream = Upstream::start().await;

    let (status, answer) = register(&host, &registration("svc", upstream.addr())).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["service_id"], "svc");
    assert_eq!(answer["status"], "registered");
    assert_eq!(answer["heartbeat_interval_seconds"], 30);
    assert_eq!(answer["ttl_seconds"], 90);

    let (status, body) = get_json(&host.gateway_url("/api/svc/hello?name=Developer"))
        .await
        .unwrap();
    assert_eq!(
        (status, body),
        (200, json!({"message": "Hello, Developer!"}))
    );

    let (status, all) = get_json(&host.registry_url("/api/registry/services"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let listed_svc = all
        .as_array()
        .expect("a list")
        .iter()
        .find(|service| service["name"] == "svc")
        .expect("svc listed")
        .clone();
    assert_eq!(listed_svc["kind"], "remote");
    assert_eq!(listed_svc["status"], "healthy");
    assert_eq!(listed_svc["version"], "1.0.0");
    assert_eq!(
        listed_svc["url"],
        format!("http://127.0.0.1:{}/", upstream.port())
    );
    assert_eq!(listed_svc["endpoints"][0]["path"], "/hello");
    assert_eq!(listed_svc["endpoints"][0]["method"], "GET");
    assert!(listed_svc["registered_at"].is_string(), "{listed_svc}");
    assert!(listed_svc["last_heartbeat"].is_null(), "{listed_svc}");

    let (status, one) = listed(&host, "svc").await;
    assert_eq!(status, 200);
    assert_eq!(one["name"], "svc");
    assert_eq!(one["registered_at"], listed_svc["registered_at"]);

    let (status, beat) = heartbeat(&host, "svc").await;
    assert_eq!(status, 200, "{beat}");
    let (_, one) = listed(&host, "svc").await;
    assert!(one["last_heartbeat"].is_string(), "{one}");

    // The same registration again is an update, not a new service.
    let (status, answer) = register(&host, &registration("svc", upstream.addr())).await;
    assert_eq!(
        (status, &answer["status"]),
        (200, &json!("updated")),
        "{answer}"
    );
    let (_, again) = listed(&host, "svc").await;
    assert_eq!(again["registered_at"], listed_svc["registered_at"]);
}

#[tokio::test]
async fn a_registration_from_another_port_adds_an_instance() {
    let host = host_builder().start().await.unwrap();
    let first = Upstream::start().await;
    let second = Upstream::start().await;
    assert_eq!(
        register(&host, &registration("moving", first.addr()))
            .await
            .0,
        201
    );
    let (status, answer) = register(&host, &registration("moving", second.addr())).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["status"], "instance added");
    assert_eq!(answer["instance_id"], second.addr().to_string());
    assert_eq!(answer["instances"], 2);

    // Round robin: two requests, one per instance.
    let mut hosts = Vec::new();
    for _ in 0..2 {
        let (status, echo) = get_json(&host.gateway_url("/api/moving/echo/where"))
            .await
            .unwrap();
        assert_eq!(status, 200);
        hosts.push(echo["headers"]["host"][0].as_str().unwrap().to_owned());
    }
    hosts.sort();
    let mut expected = vec![first.addr().to_string(), second.addr().to_string()];
    expected.sort();
    assert_eq!(hosts, expected);
    let (_, listed) = listed(&host, "moving").await;
    assert_eq!(
        listed["instances"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
}

#[tokio::test]
async fn health_checks_keep_a_service_routed_between_sparse_heartbeats() {
    // The seed guide heartbeats every 30 s whatever the TTL: a live service
    // must stay routed on its health endpoint alone.
    let host = fast_host().start().await.unwrap();
    let upstream = Upstream::start().await;
    assert_eq!(
        register(&host, &registration("quiet", upstream.addr()))
            .await
            .0,
        201
    );
    let registered = Instant::now();
    // Eight checks 200 ms apart span more than the 1 s TTL.
    eventually("eight health checks", || async {
        upstream.health_checks() >= 8
    })
    .await;
    assert!(
        registered.elapsed() > Duration::from_secs(1),
        "eight checks within the TTL ({:?}): the test would prove nothing",
        registered.elapsed()
    );
    let (status, body) = gateway_get(&host, "/api/quiet/hello").await;
    assert_eq!(status, 200, "{body}");
    let (_, listed) = listed(&host, "quiet").await;
    assert_eq!(listed["status"], "healthy", "{listed}");
    assert!(listed["last_heartbeat"].is_null(), "{listed}");
}

#[tokio::test]
async fn silence_past_the_ttl_is_503_until_a_heartbeat_or_a_passing_check() {
    let host = fast_host().start().await.unwrap();
    let upstream = Upstream::start().await;
    assert_eq!(
        register(&host, &registration("flaky", upstream.addr()))
            .await
            .0,
        201
    );
    assert_eq!(gateway_get(&host, "/api/flaky/hello").await.0, 200);

    // Neither a heartbeat nor a passing check from now on.
    upstream.set_healthy(false);
    let silent_since = Instant::now();
    eventually("503 after the TTL", || async {
        gateway_get(&host, "/api/flaky/hello").await.0 == 503
    })
    .await;
    assert!(
        silent_since.elapsed() >= Duration::from_millis(700),
        "unhealthy after {:?}, before the 1 s TTL could run out",
        silent_since.elapsed()
    );
    let answer = client()
        .get(host.gateway_url("/api/flaky/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 503);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["service"], "flaky");
    assert!(
        body["error"].as_str().unwrap().contains("unhealthy"),
        "{body}"
    );
    let (_, listed) = listed(&host, "flaky").await;
    assert_eq!(listed["status"], "unhealthy", "{listed}");
    assert_eq!(listed["last_health_check"]["ok"], false, "{listed}");
    host.wait_for_log("remote service unhealthy").await.unwrap();

    // One heartbeat and it is routed again, at once.
    let (status, beat) = heartbeat(&host, "flaky").await;
    assert_eq!(
        (status, &beat["status"]),
        (200, &json!("healthy")),
        "{beat}"
    );
    assert_eq!(gateway_get(&host, "/api/flaky/hello").await.0, 200);

    // Silent again; this time a passing health check brings it back.
    let mark = host.log_mark();
    eventually("503 after the TTL again", || async {
        gateway_get(&host, "/api/flaky/hello").await.0 == 503
    })
    .await;
    host.wait_for_log_since(mark, &["remote service unhealthy", "service=flaky"])
        .await
        .unwrap();
    let mark = host.log_mark();
    upstream.set_healthy(true);
    eventually("routed after a passing check", || async {
        gateway_get(&host, "/api/flaky/hello").await.0 == 200
    })
    .await;
    host.wait_for_log_since(mark, &["remote service healthy again", "service=flaky"])
        .await
        .unwrap();
}

#[tokio::test]
async fn a_service_reporting_itself_unhealthy_is_not_routed() {
    let host = fast_host().start().await.unwrap();
    let upstream = Upstream::start().await;
    assert_eq!(
        register(&host, &registration("honest", upstream.addr()))
            .await
            .0,
        201
    );
    let (status, _) = post_json(
        &host.registry_url("/api/registry/heartbeat"),
        &json!({"service_id": "honest", "status": "unhealthy"}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    // Its health endpoint still passes: its own word counts more. Two checks
    // begun after the report means at least one passed since.
    let checks = upstream.health_checks();
    eventually("two more health checks", || async {
        upstream.health_checks() >= checks + 2
    })
    .await;
    assert_eq!(gateway_get(&host, "/api/honest/hello").await.0, 503);
    assert_eq!(heartbeat(&host, "honest").await.0, 200);
    assert_eq!(gateway_get(&host, "/api/honest/hello").await.0, 200);
}

#[tokio::test]
async fn a_deregistered_service_is_gone() {
    let host = host_builder().start().await.unwrap();
    let upstream = Upstream::start().await;
    assert_eq!(
        register(&host, &registration("leaving", upstream.addr()))
            .await
            .0,
        201
    );
    assert_eq!(gateway_get(&host, "/api/leaving/hello").await.0, 200);

    let (status, answer) = post_json(
        &host.registry_url("/api/registry/deregister/leaving"),
        &json!({}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(gateway_get(&host, "/api/leaving/hello").await.0, 404);
    assert_eq!(listed(&host, "leaving").await.0, 404);
    let (status, answer) = post_json(
        &host.registry_url("/api/registry/deregister/leaving"),
        &json!({}),
    )
    .await
    .unwrap();
    assert_eq!(status, 404, "{answer}");

    let (status, answer) = heartbeat(&host, "leaving").await;
    assert_eq!(status, 404);
    assert_eq!(answer["field"], "service_id");
    assert!(
        answer["error"].as_str().unwrap().contains("register again"),
        "{answer}"
    );
}

#[tokio::test]
async fn a_long_silent_service_is_evicted() {
    let host = fast_host()
        .args(["--evict-after", "2s"])
        .start()
        .await
        .unwrap();
    let upstream = Upstream::start().await;
    upstream.set_healthy(false);
    assert_eq!(
        register(&host, &registration("gone", upstream.addr()))
            .await
            .0,
        201
    );
    host.wait_for_log("remote service unhealthy").await.unwrap();
    host.wait_for_log("remote service evicted").await.unwrap();
    assert_eq!(listed(&host, "gone").await.0, 404);
    assert_eq!(gateway_get(&host, "/api/gone/hello").await.0, 404);
    assert_eq!(heartbeat(&host, "gone").await.0, 404);

    // Evicted for good: not restored by a restart.
    let dirs = host.kill9();
    let host = fast_host().dirs(dirs).start().await.unwrap();
    assert_eq!(listed(&host, "gone").await.0, 404);
}

#[tokio::test]
async fn registrations_survive_kill_9_and_are_routed_at_once() {
    let host = host_builder().start().await.unwrap();
    let upstream = Upstream::start().await;
    assert_eq!(
        register(&host, &registration("durable", upstream.addr()))
            .await
            .0,
        201
    );
    assert_eq!(
        register(&host, &registration("dropped", upstream.addr()))
            .await
            .0,
        201
    );
    let (status, _) = post_json(
        &host.registry_url("/api/registry/deregister/dropped"),
        &json!({}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let (_, before) = listed(&host, "durable").await;

    let dirs = host.kill9();
    let host = host_builder().dirs(dirs).start().await.unwrap();
    host.wait_for_log("remote services restored restored=1")
        .await
        .unwrap();
    // No new registration: the guide's plugin never sends one.
    let (status, body) = get_json(&host.gateway_url("/api/durable/hello?name=again"))
        .await
        .unwrap();
    assert_eq!((status, body), (200, json!({"message": "Hello, again!"})));
    let (_, after) = listed(&host, "durable").await;
    assert_eq!(after["registered_at"], before["registered_at"]);
    assert_eq!(after["status"], "healthy");
    assert_eq!(listed(&host, "dropped").await.0, 404);
    assert_eq!(heartbeat(&host, "durable").await.0, 200);
}

#[tokio::test]
async fn a_plugin_name_cannot_be_registered() {
    let host = host_builder().start().await.unwrap();
    host.mount_plugin(plugin_library("hello"), "libhello.so")
        .await
        .unwrap();
    let upstream = Upstream::start().await;

    let (status, answer) = register(&host, &registration("hello", upstream.addr())).await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["field"], "name");
    assert_eq!(answer["holder"]["kind"], "plugin");
    assert_eq!(answer["holder"]["loaded_from"], "libhello.so");
    assert!(
        answer["error"].as_str().unwrap().contains("libhello.so"),
        "{answer}"
    );

    let (status, answer) = heartbeat(&host, "hello").await;
    assert_eq!(status, 409, "{answer}");
    let (status, answer) = post_json(
        &host.registry_url("/api/registry/deregister/hello"),
        &json!({}),
    )
    .await
    .unwrap();
    assert_eq!(status, 409, "{answer}");
    let (_, listed) = listed(&host, "hello").await;
    assert_eq!(listed["kind"], "plugin");
}

#[tokio::test]
async fn a_plugin_file_cannot_take_a_registered_name_even_across_a_restart() {
    let host = host_builder().start().await.unwrap();
    let upstream = Upstream::start().await;
    assert_eq!(
        register(&host, &registration("hello", upstream.addr()))
            .await
            .0,
        201
    );
    host.install_plugin(plugin_library("hello"), "libhello.so")
        .unwrap();
    let refused = host.wait_for_log("plugin file refused").await.unwrap();
    assert!(refused.contains("remote service `hello`"), "{refused}");
    // Only the remote service has /echo.
    assert_eq!(gateway_get(&host, "/api/hello/echo/x").await.0, 200);

    // Restored registrations are in place before the plugin file is seen.
    let dirs = host.kill9();
    let host = host_builder().dirs(dirs).start().await.unwrap();
    let refused = host.wait_for_log("plugin file refused").await.unwrap();
    assert!(refused.contains("file=libhello.so"), "{refused}");
    let (_, listed) = listed(&host, "hello").await;
    assert_eq!(listed["kind"], "remote");
    assert_eq!(gateway_get(&host, "/api/hello/echo/x").await.0, 200);

    // Once the remote service lets go of the name, the waiting file loads.
    let mark = host.log_mark();
    let (status, _) = post_json(
        &host.registry_url("/api/registry/deregister/hello"),
        &json!({}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    host.wait_for_log_since(mark, &["plugin mounted", "file=libhello.so"])
        .await
        .unwrap();
    let (status, body) = gateway_get(&host, "/api/hello/hello?name=x").await;
    assert_eq!((status, body.as_str()), (200, r#"{"message":"Hello, x!"}"#));
}

#[tokio::test]
async fn bad_input_is_refused_naming_the_field() {
    let host = host_builder()
        .args(["--registry-max-body-bytes", "4096"])
        .start()
        .await
        .unwrap();
    let with = |key: &str, value: Value| {
        let mut body = registration("bad", ([127, 0, 0, 1], 8010).into());
        body[key] = value;
        body.to_string()
    };
    let without = |key: &str| {
        let mut body = registration("bad", ([127, 0, 0, 1], 8010).into());
        body.as_object_mut().unwrap().remove(key);
        body.to_string()
    };
    let cases: Vec<(&str, &str, String, u16, &str)> = vec![
        (
            "register",
            "malformed JSON",
            r#"{"name": "x", "#.to_owned(),
            400,
            "body",
        ),
        (
            "register",
            "not an object",
            "[1, 2]".to_owned(),
            422,
            "body",
        ),
        ("register", "empty body", String::new(), 400, "body"),
        ("register", "missing name", without("name"), 422, "name"),
        ("register", "missing host", without("host"), 422, "host"),
        ("register", "missing port", without("port"), 422, "port"),
        (
            "register",
            "missing version",
            without("version"),
            422,
            "version",
        ),
        (
            "register",
            "invalid name",
            with("name", json!("My_Service")),
            422,
            "name",
        ),
        (
            "register",
            "name not a string",
            with("name", json!(42)),
            422,
            "name",
        ),
        ("register", "port 0", with("port", json!(0)), 422, "port"),
        (
            "register",
            "port too large",
            with("port", json!(65536)),
            422,
            "port",
        ),
        (
            "register",
            "port as text",
            with("port", json!("8010")),
            422,
            "port",
        ),
        (
            "register",
            "negative port",
            with("port", json!(-1)),
            422,
            "port",
        ),
        (
            "register",
            "bad host",
            with("host", json!("not a host")),
            422,
            "host",
        ),
        (
            "register",
            "unknown method",
            with("endpoints", json!([{"path": "x", "method": "FETCH"}])),
            422,
            "endpoints[0].method",
        ),
        (
            "register",
            "endpoint without path",
            with("endpoints", json!([{"method": "GET"}])),
            422,
            "endpoints[0].path",
        ),
        (
            "register",
            "tags not a list",
            with("tags", json!("a,b")),
            422,
            "tags",
        ),
        (
            "register",
            "requires_auth as text",
            with("requires_auth", json!("no")),
            422,
            "requires_auth",
        ),
        (
            "register",
            "escaping base path",
            with("base_path", json!("/a/../../b")),
            422,
            "base_path",
        ),
        (
            "register",
            "health check elsewhere",
            with("health_check_url", json!("http://169.254.169.254/")),
            422,
            "health_check_url",
        ),
        (
            "register",
            "body over the limit",
            with("description", json!("x".repeat(8192))),
            413,
            "body",
        ),
        (
            "heartbeat",
            "no service_id",
            r#"{"status": "healthy"}"#.to_owned(),
            422,
            "service_id",
        ),
        (
            "heartbeat",
            "unknown status",
            r#"{"service_id": "x", "status": "fine"}"#.to_owned(),
            422,
            "status",
        ),
        (
            "heartbeat",
            "malformed JSON",
            "service_id=x".to_owned(),
            400,
            "body",
        ),
        (
            "heartbeat",
            "unknown service",
            r#"{"service_id": "nobody"}"#.to_owned(),
            404,
            "service_id",
        ),
    ];
    for (endpoint, what, body, status, field) in cases {
        let answer = client()
            .post(host.registry_url(&format!("/api/registry/{endpoint}")))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let got = answer.status().as_u16();
        let json: Value = answer.json().await.unwrap_or(Value::Null);
        assert_eq!(got, status, "{endpoint}, {what}: {json}");
        assert_eq!(json["field"], field, "{endpoint}, {what}: {json}");
        assert!(json["error"].is_string(), "{endpoint}, {what}: {json}");
    }

    // Neither a wrong route nor a wrong method is a 500 or an empty answer.
    for (method, path, status) in [
        ("GET", "/api/registry/register", 405),
        ("DELETE", "/api/registry/services", 405),
        ("GET", "/api/registry/nothing", 404),
        ("GET", "/api/registry/services/nobody", 404),
        ("POST", "/api/registry/deregister/nobody", 404),
    ] {
        let answer = client()
            .request(method.parse().unwrap(), host.registry_url(path))
            .send()
            .await
            .unwrap();
        let got = answer.status().as_u16();
        let json: Value = answer.json().await.unwrap_or(Value::Null);
        assert_eq!(got, status, "{method} {path}: {json}");
        assert!(json["error"].is_string(), "{method} {path}: {json}");
    }
    assert!(!host.logs().contains("panicked"), "{}", host.logs());
}
