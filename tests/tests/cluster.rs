//! Several hosts sharing one registry in etcd (`--store etcd`): what one
//! host accepts, every host routes, and keeps routing when that host or
//! etcd goes away.
//!
//! Each test starts its own etcd (one member, or three) from Debian's
//! `etcd-server` on loopback ports with temporary data, and needs the
//! host built with its etcd store (`protoc` found): without either, the
//! tests print `SKIPPED` lines, and under `PLUGIN_HOST_REQUIRE_ALL=1` (CI)
//! they fail.

use std::time::Duration;

use host_harness::etcd::{self, Etcd};
use host_harness::http::{client, get_json, registration};
use host_harness::workspace::{host_builder, plugin_library};
use host_harness::{Host, require_or_skip};
use integration_tests::upstream::{
    Upstream, client_from, gateway_get, heartbeat, post_from, register,
};

/// etcd and an etcd-capable host, or a `SKIPPED` line and `false`.
fn can_run(test: &str) -> bool {
    require_or_skip(test, etcd::available()).is_some()
}

/// A host on `etcd`'s registry, with `extra` flags.
async fn host_on(etcd: &Etcd, extra: &[&str]) -> Host {
    host_builder()
        .args(["--store", "etcd", "--etcd-endpoints", &etcd.endpoints()])
        .args(extra.iter().copied())
        .start()
        .await
        .unwrap()
}

/// Waits until `host` applied a change of `name` it learnt from etcd.
async fn learns(host: &Host, mark: usize, name: &str) {
    host.wait_for_log_since(
        mark,
        &["remote service changed in etcd", &format!("service={name}")],
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_service_registered_with_one_host_is_routed_by_another() {
    if !can_run("a_service_registered_with_one_host_is_routed_by_another") {
        return;
    }
    let etcd = Etcd::single().await;
    let a = host_on(&etcd, &[]).await;
    let b = host_on(&etcd, &[]).await;
    let upstream = Upstream::start().await;
    let mark = b.log_mark();
    let (status, body) = register(&a, &registration("shared", upstream.addr())).await;
    assert_eq!(status, 201, "{body}");
    learns(&b, mark, "shared").await;
    let (status, body) = gateway_get(&b, "/api/shared/hello").await;
    assert_eq!(status, 200, "{body}");
    let (status, listed) = get_json(&b.registry_url("/api/registry/services/shared"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["kind"], "remote");

    // A host started later reads it from etcd at start.
    let c = host_on(&etcd, &[]).await;
    let (status, body) = gateway_get(&c, "/api/shared/hello").await;
    assert_eq!(status, 200, "{body}");

    // Deregistered through B: gone from A too.
    let mark = a.log_mark();
    let (status, body) = host_harness::http::post_json(
        &b.registry_url("/api/registry/deregister/shared"),
        &serde_json::json!({}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    a.wait_for_log_since(mark, &["remote service removed in etcd", "service=shared"])
        .await
        .unwrap();
    assert_eq!(gateway_get(&a, "/api/shared/hello").await.0, 404);
}

#[tokio::test]
async fn a_heartbeat_to_one_host_keeps_the_service_alive_on_another() {
    if !can_run("a_heartbeat_to_one_host_keeps_the_service_alive_on_another") {
        return;
    }
    let etcd = Etcd::single().await;
    // No health check after the first round: only heartbeats keep the
    // service alive.
    let flags = [
        "--heartbeat-ttl",
        "2s",
        "--heartbeat-interval",
        "500ms",
        "--health-check-interval",
        "1h",
    ];
    let a = host_on(&etcd, &flags).await;
    let b = host_on(&etcd, &flags).await;
    let upstream = Upstream::start().await;
    let mark = b.log_mark();
    assert_eq!(
        register(&a, &registration("beating", upstream.addr()))
            .await
            .0,
        201
    );
    learns(&b, mark, "beating").await;
    // Heartbeats to B only, for twice the TTL: the pace is the stimulus.
    for _ in 0..8 {
        assert_eq!(heartbeat(&b, "beating").await.0, 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (status, body) = gateway_get(&a, "/api/beating/hello").await;
    assert_eq!(status, 200, "A saw B's heartbeats: {body}");
    for host in [&a, &b] {
        let lost = host.log_lines_since(0, &["etcd watch lost"]);
        assert!(lost.is_empty(), "the watch held: {lost:?}");
    }
    // And without them, A lets it lapse: the heartbeats were what kept it.
    let mark = a.log_mark();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, body) = gateway_get(&a, "/api/beating/hello").await;
    assert_eq!(status, 503, "{body}");
    a.wait_for_log_since(mark, &["remote service unhealthy", "service=beating"])
        .await
        .unwrap();
}

#[tokio::test]
async fn a_service_stays_routed_when_the_host_it_registered_with_dies() {
    if !can_run("a_service_stays_routed_when_the_host_it_registered_with_dies") {
        return;
    }
    let etcd = Etcd::single().await;
    let a = host_on(&etcd, &[]).await;
    let b = host_on(&etcd, &[]).await;
    let upstream = Upstream::start().await;
    let mark = b.log_mark();
    assert_eq!(
        register(&a, &registration("survivor", upstream.addr()))
            .await
            .0,
        201
    );
    learns(&b, mark, "survivor").await;
    let _dirs = a.kill9();
    for _ in 0..5 {
        let (status, body) = gateway_get(&b, "/api/survivor/hello").await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(heartbeat(&b, "survivor").await.0, 200);
}

#[tokio::test]
async fn an_etcd_outage_keeps_routing_refuses_writes_and_loses_nothing() {
    if !can_run("an_etcd_outage_keeps_routing_refuses_writes_and_loses_nothing") {
        return;
    }
    let mut etcd = Etcd::single().await;
    // A short timeout: a write is refused 503 within it.
    let flags = ["--etcd-timeout", "1s"];
    let a = host_on(&etcd, &flags).await;
    let b = host_on(&etcd, &flags).await;
    let upstream = Upstream::start().await;
    let mark = b.log_mark();
    assert_eq!(
        register(&a, &registration("before", upstream.addr()))
            .await
            .0,
        201
    );
    learns(&b, mark, "before").await;

    let mark_a = a.log_mark();
    let mark_b = b.log_mark();
    etcd.kill_all();
    for host in [&a, &b] {
        let (status, body) = gateway_get(host, "/api/before/hello").await;
        assert_eq!(status, 200, "routing goes on without etcd: {body}");
    }
    let (status, body) = register(&b, &registration("during", upstream.addr())).await;
    assert_eq!(status, 503, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("etcd"), "{error}");
    assert!(body["store"].as_str().unwrap().contains("etcd"), "{body}");
    let (status, body) = host_harness::http::post_json(
        &a.registry_url("/api/registry/deregister/before"),
        &serde_json::json!({}),
    )
    .await
    .unwrap();
    assert_eq!(status, 503, "a deregistration is a write too: {body}");
    // A heartbeat still counts on the host that received it.
    assert_eq!(heartbeat(&b, "before").await.0, 200);
    // Reads answer, flagged stale once the host noticed.
    b.wait_for_log_since(mark_b, &["etcd watch lost"])
        .await
        .unwrap();
    let answer = client()
        .get(b.registry_url("/api/registry/services"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["x-registry-stale"], "true");

    etcd.restart_killed().await;
    a.wait_for_log_since(mark_a, &["etcd watch resumed"])
        .await
        .unwrap();
    b.wait_for_log_since(mark_b, &["etcd watch resumed"])
        .await
        .unwrap();
    let mark = a.log_mark();
    let (status, body) = register(&b, &registration("after", upstream.addr())).await;
    assert_eq!(status, 201, "{body}");
    learns(&a, mark, "after").await;
    assert_eq!(gateway_get(&a, "/api/after/hello").await.0, 200);
    let answer = client()
        .get(b.registry_url("/api/registry/services"))
        .send()
        .await
        .unwrap();
    assert!(answer.headers().get("x-registry-stale").is_none());
    // The registration made before the outage is still in etcd: a host
    // started now reads it.
    let c = host_on(&etcd, &[]).await;
    let (status, body) = gateway_get(&c, "/api/before/hello").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(gateway_get(&c, "/api/during/hello").await.0, 404);
}

#[tokio::test]
async fn losing_one_etcd_member_of_three_changes_nothing() {
    if !can_run("losing_one_etcd_member_of_three_changes_nothing") {
        return;
    }
    let mut etcd = Etcd::three().await;
    let a = host_on(&etcd, &[]).await;
    let b = host_on(&etcd, &[]).await;
    let upstream = Upstream::start().await;
    let mark = b.log_mark();
    assert_eq!(
        register(&a, &registration("first", upstream.addr()))
            .await
            .0,
        201
    );
    learns(&b, mark, "first").await;
    etcd.kill(0);
    assert_eq!(gateway_get(&b, "/api/first/hello").await.0, 200);
    let mark = b.log_mark();
    let (status, body) = register(&a, &registration("second", upstream.addr())).await;
    assert_eq!(status, 201, "{body}");
    learns(&b, mark, "second").await;
    assert_eq!(gateway_get(&b, "/api/second/hello").await.0, 200);
    assert_eq!(heartbeat(&b, "first").await.0, 200);
}

#[tokio::test]
async fn a_plugin_keeps_its_name_on_its_own_host_only() {
    if !can_run("a_plugin_keeps_its_name_on_its_own_host_only") {
        return;
    }
    let etcd = Etcd::single().await;
    let a = host_on(&etcd, &[]).await;
    let b = host_on(&etcd, &[]).await;
    b.mount_plugin(plugin_library("hello"), "libhello.so")
        .await
        .unwrap();
    let upstream = Upstream::start().await;
    let mark = b.log_mark();
    let (status, body) = register(&a, &registration("hello", upstream.addr())).await;
    assert_eq!(
        status, 201,
        "a plugin elsewhere does not reserve the name: {body}"
    );
    b.wait_for_log_since(
        mark,
        &[
            "not routed on this host",
            "a plugin of this host holds the name",
            "service=hello",
        ],
    )
    .await
    .unwrap();
    // A routes the remote service, B its own plugin.
    assert_eq!(gateway_get(&a, "/api/hello/echo").await.0, 200);
    assert_eq!(upstream.echoes(), 1);
    let (status, body) = gateway_get(&b, "/api/hello/hello").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(upstream.echoes(), 1, "B answered from its plugin");
    let (_, listed) = get_json(&b.registry_url("/api/registry/services/hello"))
        .await
        .unwrap();
    assert_eq!(listed["kind"], "plugin");
    // A registration of that name at B is refused, as on one host.
    let (status, body) = register(&b, &registration("hello", upstream.addr())).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["holder"]["kind"], "plugin");
}

#[tokio::test]
async fn one_host_checks_each_service_and_every_host_sees_the_result() {
    if !can_run("one_host_checks_each_service_and_every_host_sees_the_result") {
        return;
    }
    let etcd = Etcd::single().await;
    let flags = ["--health-check-interval", "100ms"];
    let a = host_on(&etcd, &flags).await;
    let b = host_on(&etcd, &flags).await;
    for host in [&a, &b] {
        host.wait_for_log("joined the hosts sharing the registry")
            .await
            .unwrap();
    }
    let upstream = Upstream::start().await;
    let mark = b.log_mark();
    assert_eq!(
        register(&a, &registration("checked", upstream.addr()))
            .await
            .0,
        201
    );
    learns(&b, mark, "checked").await;
    // A registration from B that A has applied: both have seen both
    // hosts' membership keys, which were written before.
    let other = Upstream::start().await;
    let mark = a.log_mark();
    assert_eq!(
        register(&b, &registration("marker", other.addr())).await.0,
        201
    );
    learns(&a, mark, "marker").await;

    // One checker makes at most one check per 100 ms; two would make two.
    let before = upstream.health_checks();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let checks = upstream.health_checks() - before;
    assert!(
        (1..=24).contains(&checks),
        "{checks} checks in 2 s at one per 100 ms: one host checks"
    );

    // What the checker finds reaches the other host: the same thresholds
    // mark the instance down everywhere, and back up.
    let instance_status = |host: &Host| {
        let url = host.registry_url("/api/registry/services/checked");
        async move {
            let (_, listed) = get_json(&url).await.unwrap();
            listed["instances"][0]["status"].as_str().map(str::to_owned)
        }
    };
    upstream.set_healthy(false);
    for host in [&a, &b] {
        integration_tests::eventually("both hosts mark the failing instance down", || async {
            instance_status(host).await.as_deref() == Some("unhealthy")
        })
        .await;
    }
    upstream.set_healthy(true);
    for host in [&a, &b] {
        integration_tests::eventually("both hosts bring it back up", || async {
            instance_status(host).await.as_deref() == Some("healthy")
        })
        .await;
    }
}

#[tokio::test]
async fn an_api_key_added_on_one_host_works_on_every_host() {
    if !can_run("an_api_key_added_on_one_host_works_on_every_host") {
        return;
    }
    let etcd = Etcd::single().await;
    // `printf %s admin | sha256sum`
    let config = "[auth.registry]\nadmin_token_sha256 = \"8c6976e5b5410415bde908bd4dee15dfb167a9c873fc4bb8a81f6f2ab448a918\"\n";
    let on_etcd = || {
        host_builder()
            .args(["--store", "etcd", "--etcd-endpoints", &etcd.endpoints()])
            .config(config)
    };
    let a = on_etcd().start().await.unwrap();
    let b = on_etcd().start().await.unwrap();
    for host in [&a, &b] {
        host.mount_plugin(plugin_library("guarded"), "libguarded.so")
            .await
            .unwrap();
    }
    let with_key = |host: &Host, key: &str| {
        client()
            .get(host.gateway_url("/api/guarded/private"))
            .header("x-api-key", key)
            .send()
    };
    let mark = b.log_mark();
    let added = client()
        .post(a.registry_url("/api/registry/admin/api-keys"))
        .bearer_auth("admin")
        .json(&serde_json::json!({"id": "robot", "services": ["guarded"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 201);
    let answer: serde_json::Value = added.json().await.unwrap();
    let key = answer["key"].as_str().unwrap().to_owned();
    b.wait_for_log_since(mark, &["API key added on another host", "api_key=robot"])
        .await
        .unwrap();
    for host in [&a, &b] {
        assert_eq!(with_key(host, &key).await.unwrap().status(), 200);
    }

    let mark = a.log_mark();
    let revoked = client()
        .delete(b.registry_url("/api/registry/admin/api-keys/robot"))
        .bearer_auth("admin")
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    a.wait_for_log_since(mark, &["API key revoked on another host", "api_key=robot"])
        .await
        .unwrap();
    for host in [&a, &b] {
        assert_eq!(with_key(host, &key).await.unwrap().status(), 401);
    }
}

#[tokio::test]
async fn a_host_does_not_start_on_an_etcd_it_cannot_reach() {
    if !can_run("a_host_does_not_start_on_an_etcd_it_cannot_reach") {
        return;
    }
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .unwrap()
        .port();
    let refused = host_builder()
        .args(["--store", "etcd", "--etcd-endpoints"])
        .arg(format!("http://127.0.0.1:{port}"))
        .args(["--etcd-timeout", "500ms"])
        .start_refused()
        .await
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        refused
            .output
            .contains(&format!("etcd at http://127.0.0.1:{port}"))
            && refused.output.contains("unreachable"),
        "{}",
        refused.output
    );
}

#[tokio::test]
async fn two_hosts_never_both_accept_a_name_for_different_owners() {
    if !can_run("two_hosts_never_both_accept_a_name_for_different_owners") {
        return;
    }
    let etcd = Etcd::single().await;
    let a = host_on(&etcd, &[]).await;
    let b = host_on(&etcd, &[]).await;
    let (first, second) = (Upstream::start().await, Upstream::start().await);
    let (from_a, from_b) = (client_from("127.0.0.2"), client_from("127.0.0.3"));
    let path = "/api/registry/register";
    for round in 0..10 {
        // Two owners, two versions, the same new name, at once, through
        // two hosts: one is accepted, the other refused.
        let name = format!("contested-{round}");
        let mut one = registration(&name, first.addr());
        one["version"] = serde_json::json!("1.0.0");
        let mut other = registration(&name, second.addr());
        other["version"] = serde_json::json!("2.0.0");
        let ((status_a, answer_a), (status_b, answer_b)) = tokio::join!(
            post_from(&from_a, &a, path, &one),
            post_from(&from_b, &b, path, &other)
        );
        let mut statuses = [status_a, status_b];
        statuses.sort_unstable();
        assert_eq!(statuses, [201, 409], "{answer_a} / {answer_b}");
        let refused = if status_a == 409 {
            &answer_a
        } else {
            &answer_b
        };
        assert_eq!(refused["tenant"], "default", "{refused}");
        let winner = if status_a == 201 { "1.0.0" } else { "2.0.0" };
        // Both hosts end up routing the winner's registration.
        for host in [&a, &b] {
            let url = host.registry_url(&format!("/api/registry/services/{name}"));
            integration_tests::eventually("both hosts hold the accepted registration", || {
                let url = url.clone();
                async move {
                    let (status, listed) = get_json(&url).await.unwrap();
                    status == 200 && listed["version"] == winner
                }
            })
            .await;
        }
    }
}

/// `GET <gateway><path>` on `host`, with `X-Service-Version: <header>`
/// if given: the status and the version that answered.
async fn version_answering(host: &Host, path: &str, header: Option<&str>) -> (u16, String) {
    let mut request = client().get(host.gateway_url(path));
    if let Some(header) = header {
        request = request.header("X-Service-Version", header);
    }
    let answer = request.send().await.expect("gateway request");
    let status = answer.status().as_u16();
    let version = answer
        .headers()
        .get("x-service-version")
        .map_or_else(String::new, |value| value.to_str().unwrap().to_owned());
    (status, version)
}

/// `<method> /api/registry/services/<name>/traffic` on `host`.
async fn set_traffic(
    host: &Host,
    method: reqwest::Method,
    name: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let url = host.registry_url(&format!("/api/registry/services/{name}/traffic"));
    let mut request = client().request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let answer = request.send().await.expect("registry request");
    let status = answer.status().as_u16();
    (
        status,
        answer.json().await.unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn a_version_and_a_split_set_on_one_host_route_on_another() {
    if !can_run("a_version_and_a_split_set_on_one_host_route_on_another") {
        return;
    }
    let etcd = Etcd::single().await;
    let a = host_on(&etcd, &[]).await;
    let b = host_on(&etcd, &[]).await;
    let old = Upstream::start().await;
    let new = Upstream::start().await;
    for (version, upstream) in [("1.0.0", &old), ("2.0.0", &new)] {
        let mark = b.log_mark();
        let mut body = registration("multi", upstream.addr());
        body["version"] = serde_json::json!(version);
        let (status, answer) = register(&a, &body).await;
        assert_eq!(status, 201, "{answer}");
        learns(&b, mark, "multi").await;
    }

    // Both versions, registered on A, are routed by version on B; the
    // default is the highest.
    for (header, expected) in [
        (Some("=1.0.0"), "1.0.0"),
        (Some("=2.0.0"), "2.0.0"),
        (None, "2.0.0"),
    ] {
        let (status, version) = version_answering(&b, "/api/multi/hello", header).await;
        assert_eq!((status, version.as_str()), (200, expected), "{header:?}");
    }

    // A split set on A sends B's traffic where it says.
    let mark = b.log_mark();
    let (status, answer) = set_traffic(
        &a,
        reqwest::Method::PUT,
        "multi",
        Some(serde_json::json!({"weights": {"1.0.0": 100, "2.0.0": 0}})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    b.wait_for_log_since(mark, &["traffic policy changed in etcd", "service=multi"])
        .await
        .unwrap();
    for _ in 0..10 {
        let (status, version) = version_answering(&b, "/api/multi/hello", None).await;
        assert_eq!((status, version.as_str()), (200, "1.0.0"));
    }
    let on = |host: &Host| {
        let url = host.registry_url("/api/registry/services/multi");
        async move {
            let (status, entry) = get_json(&url).await.unwrap();
            assert_eq!(status, 200, "{entry}");
            entry["traffic"]["split"].clone()
        }
    };
    let split = on(&a).await;
    assert!(!split.is_null(), "A lists its split");
    assert_eq!(on(&b).await, split, "B lists the split A set");

    // Cleared on A: B's default is the highest version again.
    let mark = b.log_mark();
    let (status, answer) = set_traffic(&a, reqwest::Method::DELETE, "multi", None).await;
    assert_eq!(status, 200, "{answer}");
    b.wait_for_log_since(mark, &["traffic policy changed in etcd", "service=multi"])
        .await
        .unwrap();
    let (status, version) = version_answering(&b, "/api/multi/hello", None).await;
    assert_eq!((status, version.as_str()), (200, "2.0.0"));
}

#[tokio::test]
async fn tenants_keep_one_name_apart_on_every_host() {
    if !can_run("tenants_keep_one_name_apart_on_every_host") {
        return;
    }
    const TRUSTED: &str = "[tenants]\ntrust_header = true\n";
    let etcd = Etcd::single().await;
    let on_etcd = || {
        host_builder()
            .config(TRUSTED)
            .args(["--store", "etcd", "--etcd-endpoints", &etcd.endpoints()])
            .start()
    };
    let a = on_etcd().await.unwrap();
    let b = on_etcd().await.unwrap();
    let (acme, globex) = (Upstream::start().await, Upstream::start().await);
    for (tenant, upstream) in [("acme", &acme), ("globex", &globex)] {
        let mark = b.log_mark();
        let answer = client()
            .post(a.registry_url("/api/registry/register"))
            .header("X-Tenant-ID", tenant)
            .json(&registration("svc", upstream.addr()))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 201, "{}", answer.text().await.unwrap());
        learns(&b, mark, &format!("{tenant}/svc")).await;
    }
    let echo_on = |host: &Host, tenant: &'static str| {
        let url = host.gateway_url("/api/svc/echo");
        async move {
            let answer = client()
                .get(url)
                .header("X-Tenant-ID", tenant)
                .send()
                .await
                .unwrap();
            answer.status().as_u16()
        }
    };
    // Registered on A, each tenant's `svc` is routed to its own upstream
    // on B; the default tenant has none.
    assert_eq!(echo_on(&b, "acme").await, 200);
    assert_eq!((acme.echoes(), globex.echoes()), (1, 0));
    assert_eq!(echo_on(&b, "globex").await, 200);
    assert_eq!((acme.echoes(), globex.echoes()), (1, 1));
    assert_eq!(gateway_get(&b, "/api/svc/echo").await.0, 404);

    // Another address may not take acme's instance on B: the 409 names
    // the tenant.
    let refused = client_from("127.0.0.2")
        .post(b.registry_url("/api/registry/register"))
        .header("X-Tenant-ID", "acme")
        .json(&registration("svc", acme.addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 409);
    let refused: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(refused["tenant"], "acme", "{refused}");

    // Deregistered in one tenant on B: gone from A in that tenant only.
    let mark = a.log_mark();
    let answer = client()
        .post(b.registry_url("/api/registry/deregister/svc"))
        .header("X-Tenant-ID", "acme")
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
    a.wait_for_log_since(
        mark,
        &["remote service removed in etcd", "service=acme/svc"],
    )
    .await
    .unwrap();
    assert_eq!(echo_on(&a, "acme").await, 404);
    assert_eq!(echo_on(&a, "globex").await, 200);
    assert_eq!(globex.echoes(), 2);
}

/// Puts enough data under `<prefix>/filler/` (which the hosts ignore) to
/// overrun the etcd watch of a paused host: more than its connection's
/// buffers and etcd's queue for one watcher hold, so etcd stops sending to
/// it and what comes next reaches it only through etcd's catch-up (or,
/// once compacted, not at all).
async fn overrun_watch(etcd: &Etcd) {
    let value = vec![b'x'; 64 * 1024];
    for batch in 0..40 {
        let puts = (0..8).map(|i| {
            let key = format!("/plugin-host/filler/{batch}-{i}");
            let value = &value;
            async move { etcd.put(&key, value).await }
        });
        futures_util::future::join_all(puts).await;
    }
}

/// `POST /api/registry/deregister/{name}` on `host`: status and answer.
async fn deregister(host: &Host, name: &str) -> (u16, serde_json::Value) {
    host_harness::http::post_json(
        &host.registry_url(&format!("/api/registry/deregister/{name}")),
        &serde_json::json!({}),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_late_heartbeat_to_a_host_behind_a_deregistration_does_not_revive_it() {
    if !can_run("a_late_heartbeat_to_a_host_behind_a_deregistration_does_not_revive_it") {
        return;
    }
    let etcd = Etcd::single().await;
    let a = host_on(&etcd, &[]).await;
    let b = host_on(&etcd, &[]).await;
    let upstream = Upstream::start().await;
    let mark = b.log_mark();
    assert_eq!(
        register(&a, &registration("late", upstream.addr())).await.0,
        201
    );
    learns(&b, mark, "late").await;

    // B falls behind: paused, its watch overrun, then the deregistration
    // on A, which B's watch delivers only once etcd catches it up.
    b.pause().unwrap();
    overrun_watch(&etcd).await;
    let (status, body) = deregister(&a, "late").await;
    assert_eq!(status, 200, "{body}");
    let mark = b.log_mark();
    // The heartbeat waits in B's listen queue and is read as B resumes,
    // its table still holding the instance (etcd catches a watcher up on
    // a round of its own, every 100 ms).
    let url = b.registry_url("/api/registry/heartbeat");
    let beat = tokio::spawn(async move {
        let body = serde_json::json!({"service_id": "late", "status": "healthy"});
        host_harness::http::post_json(&url, &body).await.unwrap()
    });
    b.resume().unwrap();
    let (status, body) = beat.await.unwrap();
    assert_eq!(status, 404, "a late heartbeat revives nothing: {body}");
    assert_eq!(body["removed"], "deregistered", "{body}");
    assert_eq!(body["tenant"], "default", "{body}");
    b.wait_for_log_since(
        mark,
        &[
            "late heartbeat for a removed instance not shared",
            "service=late",
        ],
    )
    .await
    .unwrap();
    b.wait_for_log_since(mark, &["remote service removed in etcd", "service=late"])
        .await
        .unwrap();
    assert_eq!(gateway_get(&b, "/api/late/hello").await.0, 404);
    let (status, body) = heartbeat(&b, "late").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["removed"], "deregistered", "told why on B too: {body}");

    // Registered again: a record newer than the tombstone, so heartbeats
    // to B count and are shared again.
    let mark = b.log_mark();
    assert_eq!(
        register(&a, &registration("late", upstream.addr())).await.0,
        201
    );
    learns(&b, mark, "late").await;
    let (status, body) = heartbeat(&b, "late").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        b.log_lines_since(mark, &["late heartbeat for a removed instance"])
            .is_empty(),
        "the old tombstone holds nothing back"
    );
}

#[tokio::test]
async fn a_host_whose_watch_falls_behind_a_compaction_relists_and_misses_nothing() {
    if !can_run("a_host_whose_watch_falls_behind_a_compaction_relists_and_misses_nothing") {
        return;
    }
    let etcd = Etcd::single().await;
    let a = host_on(&etcd, &[]).await;
    let b = host_on(&etcd, &[]).await;
    let (one, two, three) = (
        Upstream::start().await,
        Upstream::start().await,
        Upstream::start().await,
    );
    let mark = b.log_mark();
    for (name, upstream) in [("kept", &one), ("dropped", &two), ("grown", &three)] {
        assert_eq!(
            register(&a, &registration(name, upstream.addr())).await.0,
            201
        );
    }
    for name in ["kept", "dropped", "grown"] {
        learns(&b, mark, name).await;
    }

    // B falls behind; A deregisters one service, registers another, and
    // adds an instance to a third; then etcd forgets the history B's watch
    // would need.
    b.pause().unwrap();
    overrun_watch(&etcd).await;
    assert_eq!(deregister(&a, "dropped").await.0, 200);
    assert_eq!(
        register(&a, &registration("fresh", one.addr())).await.0,
        201
    );
    assert_eq!(
        register(&a, &registration("grown", one.addr())).await.0,
        201
    );
    etcd.delete_prefix("/plugin-host/filler/").await;
    let compacted = etcd.compact().await;
    let mark = b.log_mark();
    b.resume().unwrap();
    let lost = b
        .wait_for_log_since(mark, &["etcd watch lost", "compacted"])
        .await
        .unwrap();
    b.wait_for_log_since(mark, &["etcd watch resumed after a fresh listing"])
        .await
        .unwrap();
    assert!(
        lost.contains(&format!("oldest kept: {compacted}")),
        "{lost}"
    );

    // B's table is etcd's: the deletion it never saw applied, the new
    // service routed, each name once, with its instances once.
    b.wait_for_log_since(mark, &["remote service removed in etcd", "service=dropped"])
        .await
        .unwrap();
    learns(&b, mark, "fresh").await;
    learns(&b, mark, "grown").await;
    assert_eq!(gateway_get(&b, "/api/dropped/hello").await.0, 404);
    assert_eq!(gateway_get(&b, "/api/fresh/hello").await.0, 200);
    assert_eq!(gateway_get(&b, "/api/kept/hello").await.0, 200);
    let (status, listed) = get_json(&b.registry_url("/api/registry/services"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{listed}");
    let mut names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|service| service["name"].as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["fresh", "grown", "kept"], "{listed}");
    let (_, grown) = get_json(&b.registry_url("/api/registry/services/grown"))
        .await
        .unwrap();
    let mut instances: Vec<&str> = grown["versions"][0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|id| id.as_str())
        .collect();
    instances.sort_unstable();
    let mut expected = vec![one.addr().to_string(), three.addr().to_string()];
    expected.sort_unstable();
    assert_eq!(instances, expected, "{grown}");
}
