//! Nothing a caller registers may turn the host against itself or take
//! over a name: loops, the host's own listeners, the upstream allow-list,
//! ownership of a registration, and the name race at start-up.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use host_harness::http::{client, post_json, registration};
use host_harness::workspace::{host_builder, plugin_library};
use host_harness::{Dirs, PATIENCE};
use integration_tests::raw_http;
use integration_tests::upstream::{
    Upstream, client_from, gateway_get, heartbeat, post_from, register,
};
use serde_json::{Value, json};

/// A registration of `name` at `addr`, mounted at `base_path` there.
fn pointing_at(name: &str, addr: SocketAddr, base_path: &str) -> Value {
    let mut body = registration(name, addr);
    body["base_path"] = json!(base_path);
    body
}

#[tokio::test]
async fn a_service_at_one_of_the_hosts_own_listeners_is_refused() {
    let host = host_builder().start().await.unwrap();
    for (own, listener) in [
        (host.gateway_addr(), "gateway"),
        (host.registry_addr(), "registry"),
    ] {
        let (status, answer) = register(&host, &pointing_at("loop", own, "/api/loop")).await;
        assert_eq!(status, 422, "{answer}");
        assert_eq!(answer["field"], "host");
        let error = answer["error"].as_str().unwrap();
        assert!(
            error.contains(&format!("own {listener} listener")),
            "{error}"
        );
    }
    // `localhost` names the same listener.
    let mut by_name = pointing_at("loop", host.gateway_addr(), "/api/loop");
    by_name["host"] = json!("localhost");
    assert_eq!(register(&host, &by_name).await.0, 422);
    assert_eq!(gateway_get(&host, "/api/loop/x").await.0, 404);
}

#[tokio::test]
async fn a_loop_through_two_hosts_is_answered_508() {
    let a = host_builder().start().await.unwrap();
    let b = host_builder().start().await.unwrap();
    // Each host's `chain` service is the other host's `chain` service.
    for (from, to) in [(&a, &b), (&b, &a)] {
        let body = pointing_at("chain", to.gateway_addr(), "/api/chain");
        assert_eq!(register(from, &body).await.0, 201);
    }
    let started = Instant::now();
    let (status, body) = gateway_get(&a, "/api/chain/x").await;
    assert_eq!(status, 508, "{body}");
    assert!(body.contains("already passed through this host"), "{body}");
    assert!(started.elapsed() < PATIENCE);
    // Both hosts still serve.
    for host in [&a, &b] {
        let listing = client()
            .get(host.registry_url("/api/registry/services"))
            .send()
            .await
            .expect("listing");
        assert_eq!(listing.status(), 200);
    }
}

#[tokio::test]
async fn a_request_that_passed_too_many_proxies_is_answered_508() {
    let host = host_builder().start().await.unwrap();
    let upstream = Upstream::start().await;
    assert_eq!(
        register(&host, &registration("far", upstream.addr()))
            .await
            .0,
        201
    );
    let via = vec!["1.1 hop"; 17].join(", ");
    let answer = client()
        .get(host.gateway_url("/api/far/hello"))
        .header("via", via)
        .send()
        .await
        .expect("request");
    assert_eq!(answer.status(), 508);
    let answer = client()
        .get(host.gateway_url("/api/far/hello"))
        .header("via", "1.1 one-proxy")
        .send()
        .await
        .expect("request");
    assert_eq!(answer.status(), 200);
}

#[tokio::test]
async fn the_upstream_allow_list_decides_which_addresses_may_be_registered() {
    let host = host_builder()
        .args(["--upstream-allow", "127.0.0.1/32"])
        .start()
        .await
        .unwrap();
    let upstream = Upstream::start().await;
    assert_eq!(
        register(&host, &registration("inside", upstream.addr()))
            .await
            .0,
        201
    );
    let mut outside = registration("outside", upstream.addr());
    outside["host"] = json!("127.0.0.2");
    let (status, answer) = register(&host, &outside).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["field"], "host");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains("127.0.0.2 is outside the upstream allow-list (127.0.0.1/32)"),
        "{error}"
    );
    assert_eq!(gateway_get(&host, "/api/outside/hello").await.0, 404);
}

#[tokio::test]
async fn only_the_address_that_registered_an_instance_may_change_it() {
    let host = host_builder().start().await.unwrap();
    let owner = Upstream::start().await;
    let intruder = Upstream::start().await;
    assert_eq!(
        register(&host, &registration("owned", owner.addr()))
            .await
            .0,
        201
    );
    let owned_id = owner.addr().to_string();

    // Another address may not take over the owner's instance...
    let other = client_from("127.0.0.2");
    let (status, answer) = post_from(
        &other,
        &host,
        "/api/registry/register",
        &registration("owned", owner.addr()),
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["field"], "name");
    assert!(
        answer["error"].as_str().unwrap().contains(&format!(
            "instance {owned_id} of service `owned` was registered from 127.0.0.1: only that address may change"
        )),
        "{answer}"
    );
    // ...nor speak for it, by name (it owns no instance) or by id.
    let (status, answer) = post_from(
        &other,
        &host,
        "/api/registry/heartbeat",
        &json!({"service_id": "owned", "status": "unhealthy"}),
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(answer["field"], "service_id");
    let (status, answer) = post_from(
        &other,
        &host,
        "/api/registry/heartbeat",
        &json!({"service_id": "owned", "instance_id": owned_id, "status": "unhealthy"}),
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(answer["field"], "instance_id");
    let (status, answer) =
        post_from(&other, &host, "/api/registry/deregister/owned", &json!({})).await;
    assert_eq!(status, 403, "{answer}");
    let (status, answer) = post_from(
        &other,
        &host,
        "/api/registry/deregister/owned",
        &json!({"instance_id": owned_id}),
    )
    .await;
    assert_eq!(status, 403, "{answer}");

    // Nothing the other address sent changed anything.
    let (status, body) = gateway_get(&host, "/api/owned/echo/x").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!("127.0.0.1:{}", owner.port())),
        "{body}"
    );

    // The owner still may, and the rule survives a restart.
    assert_eq!(heartbeat(&host, "owned").await.0, 200);
    let dirs = host.kill9();
    let host = host_builder().dirs(dirs).start().await.unwrap();
    let (status, _) = post_from(
        &other,
        &host,
        "/api/registry/register",
        &registration("owned", owner.addr()),
    )
    .await;
    assert_eq!(status, 409);
    // Another address may add an instance of its own (it declares what
    // the service declares), and remove it again, not the owner's.
    let (status, answer) = post_from(
        &other,
        &host,
        "/api/registry/register",
        &registration("owned", intruder.addr()),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["status"], "instance added");
    let (status, answer) =
        post_from(&other, &host, "/api/registry/deregister/owned", &json!({})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["instance_ids"], json!([intruder.addr().to_string()]));
    assert_eq!(answer["remaining_instances"], 1);
    let (status, answer) = post_json(
        &host.registry_url("/api/registry/deregister/owned"),
        &json!({}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["remaining_instances"], 0);
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

#[tokio::test]
async fn a_registration_during_start_up_cannot_take_a_plugin_files_name() {
    let dirs = Dirs::new().unwrap();
    std::fs::copy(
        plugin_library("slow_init"),
        dirs.plugins().join("libslow_init.so"),
    )
    .expect("install plugin");
    let upstream = Upstream::start().await;
    let registry = format!("127.0.0.1:{}", free_port());
    let gateway = format!("127.0.0.1:{}", free_port());

    // Knock on the registry's door from before the host exists: the first
    // registration it answers must find the plugin's name taken.
    let url = format!("http://{registry}/api/registry/register");
    let body = registration("slow-init", upstream.addr());
    let racer = tokio::spawn(async move {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match client().post(&url).json(&body).send().await {
                Ok(answer) => {
                    let status = answer.status().as_u16();
                    return (status, answer.json::<Value>().await.unwrap_or(Value::Null));
                }
                Err(error) => {
                    assert!(
                        Instant::now() < deadline,
                        "registry never answered: {error}"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    });
    let host = host_builder()
        .dirs(dirs)
        .addrs(&gateway, &registry)
        .start()
        .await
        .unwrap();
    let (status, answer) = racer.await.expect("racer");
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["holder"]["kind"], "plugin", "{answer}");
    assert_eq!(
        gateway_get(&host, "/api/slow-init/").await,
        (200, "ready".to_owned())
    );
}

#[tokio::test]
async fn paths_and_methods_a_service_cannot_mean_never_reach_it() {
    // One health check round at start-up, before anything is registered,
    // then none; the catalogue asks the new service once for its API
    // document: from then on, every connection the upstream sees is a
    // request's.
    let host = host_builder()
        .args(["--health-check-interval", "1h"])
        .start()
        .await
        .unwrap();
    let upstream = Upstream::start().await;
    assert_eq!(
        register(&host, &registration("strict", upstream.addr()))
            .await
            .0,
        201
    );
    host.wait_for_log_since(0, &["no published API document", "service=strict"])
        .await
        .unwrap();
    let asked_by_the_catalogue = upstream.connections();
    // Blocking requests: fine for answers the gateway gives itself, but
    // not for one the upstream (a task of this test's runtime) must answer.
    let raw = |request: String| raw_http(host.gateway_addr(), &request);
    for path in [
        "/api/strict/..;/registry",
        "/api/strict/%252e%252e/x",
        "/api/strict/a%252fb",
        "/api/strict//hello",
    ] {
        let (status, answer) = raw(format!(
            "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        ));
        assert_eq!(status, 400, "{path}: {answer}");
        assert!(answer.contains("refused path"), "{path}: {answer}");
    }
    let long_token = "X".repeat(5000);
    for (method, expected) in [
        ("TRACE", 405),
        ("CONNECT", 405),
        ("FOO", 501),
        (long_token.as_str(), 501),
        // Declared: only `GET hello`.
        ("DELETE", 405),
        ("POST", 405),
    ] {
        let (status, answer) = raw(format!(
            "{method} /api/strict/hello HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ));
        assert_eq!(
            status,
            expected,
            "{}: {answer}",
            &method[..method.len().min(10)]
        );
        if method == "DELETE" {
            assert!(answer.contains("allow: GET, HEAD, OPTIONS"), "{answer}");
        }
    }
    assert_eq!(
        upstream.connections(),
        asked_by_the_catalogue,
        "a refused request reached the upstream"
    );
    assert_eq!(gateway_get(&host, "/api/strict/hello").await.0, 200);
    let head = client()
        .head(host.gateway_url("/api/strict/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert!(upstream.connections() >= 1);
}

#[tokio::test]
async fn redirects_are_followed_through_the_gateway_to_the_same_resource() {
    let host = host_builder().start().await.unwrap();
    let upstream = Upstream::start().await;
    for (name, base_path) in [("root", "/"), ("nested", "/v1/")] {
        let mut body = registration(name, upstream.addr());
        body["base_path"] = json!(base_path);
        assert_eq!(register(&host, &body).await.0, 201);
        for (kind, expected_name) in [
            ("absolute", "absolute"),
            ("path", "path"),
            ("relative", "relative"),
            ("chain", "absolute"),
        ] {
            let answer = client()
                .get(host.gateway_url(&format!("/api/{name}/redirect/{kind}")))
                .send()
                .await
                .unwrap();
            let landed = answer.url().clone();
            assert_eq!(answer.status(), 200, "{name} {kind}: landed on {landed}");
            assert_eq!(
                landed.as_str(),
                host.gateway_url(&format!("/api/{name}/hello?name={expected_name}")),
                "{name} {kind}"
            );
            let direct = client()
                .get(format!(
                    "http://{}{base_path}hello?name={expected_name}",
                    upstream.addr()
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(
                answer.text().await.unwrap(),
                direct.text().await.unwrap(),
                "{name} {kind}"
            );
        }
    }
    let (_, echo) = host_harness::http::get_json(&host.gateway_url("/api/root/echo/x"))
        .await
        .unwrap();
    assert_eq!(
        echo["headers"]["x-forwarded-prefix"][0], "/api/root",
        "{echo}"
    );
}

#[tokio::test]
async fn registrations_are_bounded_field_by_field_and_in_total() {
    let host = host_builder()
        .args(["--registry-max-bytes", "4096"])
        .start()
        .await
        .unwrap();
    let upstream = Upstream::start().await;
    let url = host.registry_url("/api/registry/register");

    let mut huge = registration("huge", upstream.addr());
    huge["description"] = json!("x".repeat(2 * 1024 * 1024));
    let (status, answer) = post_json(&url, &huge).await.unwrap();
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["limit_bytes"], 1024 * 1024);

    let mut many = registration("many", upstream.addr());
    many["endpoints"] = json!(vec![json!({"path": "/x", "method": "GET"}); 257]);
    let (status, answer) = post_json(&url, &many).await.unwrap();
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["field"], "endpoints");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("the limit is 256"),
        "{answer}"
    );

    // Each registration below is about 500 bytes stored: the registry's
    // 4096-byte budget takes a handful, then says no, naming the limit.
    let mut accepted = 0;
    let refusal = loop {
        let name = format!("svc-{accepted}");
        let (status, answer) = post_json(&url, &registration(&name, upstream.addr()))
            .await
            .unwrap();
        if status != 201 {
            break (status, answer);
        }
        accepted += 1;
        assert!(accepted < 20, "the size limit never applied");
    };
    assert!(
        accepted >= 3,
        "only {accepted} registrations fit in 4096 bytes"
    );
    assert_eq!(refusal.0, 413, "{}", refusal.1);
    assert_eq!(refusal.1["limit_bytes"], 4096);
    // Freeing one makes room for one.
    let (status, _) = post_json(
        &host.registry_url("/api/registry/deregister/svc-0"),
        &json!({}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let (status, answer) = post_json(&url, &registration("svc-next", upstream.addr()))
        .await
        .unwrap();
    assert_eq!(status, 201, "{answer}");
}

#[tokio::test]
async fn client_text_cannot_forge_a_log_line() {
    let host = host_builder().start().await.unwrap();
    let upstream = Upstream::start().await;
    let forged = "INFO plugin_host: remote service registered service=forged";

    let mut body = registration("honest", upstream.addr());
    body["version"] = json!(format!("1.0\n{forged}"));
    let (status, answer) = register(&host, &body).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["field"], "version");

    let mark = host.log_mark();
    let heartbeat_body = json!({"service_id": format!("nobody\n{forged}\u{1b}[2J")});
    let (status, _) = post_json(
        &host.registry_url("/api/registry/heartbeat"),
        &heartbeat_body,
    )
    .await
    .unwrap();
    assert_eq!(status, 404);
    let line = host
        .wait_for_log_since(mark, &["heartbeat for an unknown service"])
        .await
        .unwrap();
    assert!(line.contains("nobody\\nINFO"), "{line}");
    assert!(line.contains("\\u{1b}[2J"), "{line}");
    let logs = host.logs();
    assert!(
        !logs
            .lines()
            .any(|line| line.starts_with("INFO plugin_host")),
        "a forged line reached the log:\n{logs}"
    );
    assert!(
        !logs.contains('\u{1b}'),
        "an escape sequence reached the log"
    );
}
