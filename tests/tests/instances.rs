//! Several instances of one remote service: round robin and least
//! outstanding requests, a killed instance costing no idempotent request
//! (retry) and being ejected then readmitted, deregistering one instance,
//! per-instance ownership (by address, and by registry token), and
//! instances surviving `kill -9`.

use std::collections::BTreeMap;
use std::time::Duration;

use host_harness::Host;
use host_harness::http::{client, get_json, post_json, registration};
use host_harness::workspace::host_builder;
use integration_tests::eventually;
use integration_tests::upstream::{Upstream, client_from, post_from, register};
use serde_json::{Value, json};

/// The service `name`'s entry in the listing.
async fn listed(host: &Host, name: &str) -> Value {
    let (status, entry) = get_json(&host.registry_url(&format!("/api/registry/services/{name}")))
        .await
        .unwrap();
    assert_eq!(status, 200, "{entry}");
    entry
}

/// The listed instance `id` of `name`.
async fn instance(host: &Host, name: &str, id: &str) -> Value {
    let entry = listed(host, name).await;
    entry["instances"]
        .as_array()
        .and_then(|instances| instances.iter().find(|i| i["id"] == id).cloned())
        .unwrap_or_else(|| panic!("no instance {id} in {entry}"))
}

/// Registers every upstream as an instance of `name`.
async fn register_all(host: &Host, name: &str, upstreams: &[&Upstream]) {
    for (index, upstream) in upstreams.iter().enumerate() {
        let (status, answer) = register(host, &registration(name, upstream.addr())).await;
        assert_eq!(status, 201, "{answer}");
        assert_eq!(answer["instance_id"], upstream.addr().to_string());
        assert_eq!(answer["instances"], index + 1, "{answer}");
    }
}

/// `n` GETs of `path` on `clients` concurrent connections; returns the
/// statuses that were not 200, with their bodies.
async fn load(host: &Host, path: &str, n: usize, clients: usize) -> Vec<(u16, String)> {
    let url = host.gateway_url(path);
    let mut tasks = Vec::new();
    for worker in 0..clients {
        let url = url.clone();
        let count = n / clients + usize::from(worker < n % clients);
        tasks.push(tokio::spawn(async move {
            let client = client();
            let mut failed = Vec::new();
            for _ in 0..count {
                match client.get(&url).send().await {
                    Ok(answer) if answer.status() == 200 => {
                        let _ = answer.bytes().await;
                    }
                    Ok(answer) => failed.push((
                        answer.status().as_u16(),
                        answer.text().await.unwrap_or_default(),
                    )),
                    Err(error) => failed.push((0, error.to_string())),
                }
            }
            failed
        }));
    }
    let mut failed = Vec::new();
    for task in tasks {
        failed.extend(task.await.unwrap());
    }
    failed
}

#[tokio::test]
async fn round_robin_spreads_requests_evenly() {
    let host = host_builder().start().await.unwrap();
    let upstreams = [
        Upstream::start().await,
        Upstream::start().await,
        Upstream::start().await,
    ];
    register_all(&host, "spread", &upstreams.iter().collect::<Vec<_>>()).await;
    let entry = listed(&host, "spread").await;
    assert_eq!(entry["load_balancing"], "round_robin", "{entry}");
    assert_eq!(entry["status"], "healthy");
    assert_eq!(entry["instances"].as_array().map(Vec::len), Some(3));

    assert_eq!(load(&host, "/api/spread/echo/x", 300, 3).await, []);
    for upstream in &upstreams {
        let share = upstream.echoes();
        assert!(
            (90..=110).contains(&share),
            "one instance got {share} of 300 requests: {:?}",
            upstreams.iter().map(Upstream::echoes).collect::<Vec<_>>()
        );
    }
}

#[tokio::test]
async fn a_killed_instance_costs_no_idempotent_request_and_is_ejected_then_readmitted() {
    // Passive ejection alone: the health checks are too rare to matter.
    let host = host_builder()
        .args(["--health-check-interval", "1h"])
        .config(
            "[outlier]\nconsecutive_failures = 3\nbase_ejection_time = \"1s\"\nmax_ejection_time = \"2s\"\n",
        )
        .start()
        .await
        .unwrap();
    let mut doomed = Upstream::start().await;
    let others = [Upstream::start().await, Upstream::start().await];
    register_all(&host, "sturdy", &[&doomed, &others[0], &others[1]]).await;
    let doomed_addr = doomed.addr();
    let doomed_id = doomed_addr.to_string();

    // A first part of the load reaches all three; the instance dies with
    // requests still coming, and none of them fails.
    let host = std::sync::Arc::new(host);
    let running = {
        let host = host.clone();
        tokio::spawn(async move { load(&host, "/api/sturdy/echo/x", 600, 4).await })
    };
    eventually("the doomed instance served some of the load", || async {
        doomed.echoes() >= 50
    })
    .await;
    doomed.stop().await;
    let failed = running.await.unwrap();
    assert_eq!(failed, [], "idempotent requests failed despite the retry");
    assert!(others.iter().all(|other| other.echoes() > 100));

    let ejected = host
        .wait_for_log("instance ejected after consecutive failures")
        .await
        .unwrap();
    assert!(ejected.contains(&doomed_id), "{ejected}");
    let listed = instance(&host, "sturdy", &doomed_id).await;
    assert!(
        listed["ejection"]["count"].as_u64() >= Some(1),
        "the listing shows no ejection: {listed}"
    );
    let service = self::listed(&host, "sturdy").await;
    assert_eq!(service["status"], "healthy", "{service}");

    // Back on the same port: readmitted once its ejection has run out.
    let back = Upstream::start_on(doomed_addr).await.unwrap();
    eventually("the instance that came back serves again", || async {
        load(&host, "/api/sturdy/echo/x", 3, 1).await.is_empty() && back.echoes() > 0
    })
    .await;
    eventually("the listing shows it healthy", || async {
        instance(&host, "sturdy", &doomed_id).await["status"] == "healthy"
    })
    .await;
}

#[tokio::test]
async fn least_outstanding_prefers_the_idle_instance() {
    let host = host_builder()
        .config("[service.busy]\nload_balancing = \"least_outstanding\"\n")
        .start()
        .await
        .unwrap();
    let slow = Upstream::start().await;
    let fast = Upstream::start().await;
    register_all(&host, "busy", &[&slow, &fast]).await;
    assert_eq!(
        listed(&host, "busy").await["load_balancing"],
        "least_outstanding"
    );
    slow.set_delay(Duration::from_millis(200));

    // Eight clients: requests pile up on the slow instance, so a pick
    // between the two finds it busier than the idle one.
    assert_eq!(load(&host, "/api/busy/echo/x", 80, 8).await, []);
    let (slow_share, fast_share) = (slow.echoes(), fast.echoes());
    assert_eq!(slow_share + fast_share, 80);
    // Round robin would give each 40.
    assert!(
        slow_share * 3 < fast_share,
        "the slow instance got {slow_share}, the idle one {fast_share}"
    );

    // The registration may ask for it too; the file decides for `busy`.
    let other = Upstream::start().await;
    let mut body = registration("asked", other.addr());
    body["load_balancing"] = json!("least_outstanding");
    assert_eq!(register(&host, &body).await.0, 201);
    assert_eq!(
        listed(&host, "asked").await["load_balancing"],
        "least_outstanding"
    );
}

#[tokio::test]
async fn deregistering_one_instance_leaves_the_others_routed() {
    let host = host_builder().start().await.unwrap();
    let leaving = Upstream::start().await;
    let staying = Upstream::start().await;
    register_all(&host, "pair", &[&leaving, &staying]).await;

    let path = format!("/api/registry/deregister/pair/{}", leaving.addr());
    let (status, answer) = post_json(&host.registry_url(&path), &json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["instance_ids"], json!([leaving.addr().to_string()]));
    assert_eq!(answer["remaining_instances"], 1);

    assert_eq!(load(&host, "/api/pair/echo/x", 20, 2).await, []);
    assert_eq!(leaving.echoes(), 0);
    assert_eq!(staying.echoes(), 20);
    let entry = listed(&host, "pair").await;
    assert_eq!(entry["instances"].as_array().map(Vec::len), Some(1));

    // An unknown instance is named in the refusal.
    let (status, answer) = post_json(
        &host.registry_url("/api/registry/heartbeat"),
        &json!({"service_id": "pair", "instance_id": leaving.addr().to_string()}),
    )
    .await
    .unwrap();
    assert_eq!(status, 404, "{answer}");
    assert_eq!(answer["field"], "instance_id");

    // A heartbeat naming the instance answers for it alone.
    let (status, answer) = post_json(
        &host.registry_url("/api/registry/heartbeat"),
        &json!({"service_id": "pair", "instance_id": staying.addr().to_string()}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["instance_ids"], json!([staying.addr().to_string()]));

    // The last one takes the service with it.
    let (status, answer) = post_json(
        &host.registry_url("/api/registry/deregister/pair"),
        &json!({"instance_id": staying.addr().to_string()}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["remaining_instances"], 0);
    let (status, _) = get_json(&host.registry_url("/api/registry/services/pair"))
        .await
        .unwrap();
    assert_eq!(status, 404);
}

#[tokio::test]
async fn instances_are_limited_per_service() {
    let host = host_builder()
        .args(["--max-instances-per-service", "2"])
        .start()
        .await
        .unwrap();
    let upstreams = [
        Upstream::start().await,
        Upstream::start().await,
        Upstream::start().await,
    ];
    register_all(&host, "capped", &[&upstreams[0], &upstreams[1]]).await;
    let (status, answer) = register(&host, &registration("capped", upstreams[2].addr())).await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["limit"], "max_instances_per_service");
    assert_eq!(answer["max_instances_per_service"], 2);
    // Registering a present instance again is no new instance.
    assert_eq!(
        register(&host, &registration("capped", upstreams[1].addr()))
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn a_joining_instance_from_another_address_must_declare_the_same() {
    let host = host_builder().start().await.unwrap();
    let mine = Upstream::start().await;
    let theirs = Upstream::start().await;
    register_all(&host, "shared", &[&mine]).await;
    let mut different = registration("shared", theirs.addr());
    different["requires_auth"] = json!(true);
    let other = client_from("127.0.0.2");
    let (status, answer) = post_from(&other, &host, "/api/registry/register", &different).await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("must declare exactly the same"),
        "{answer}"
    );
    // Another version would replace the owner's instance: refused too.
    let mut newer = registration("shared", theirs.addr());
    newer["version"] = json!("2.0.0");
    let (status, answer) = post_from(&other, &host, "/api/registry/register", &newer).await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["field"], "version");
}

/// SHA-256 digests of the tokens `team-a` and `team-b`.
const TOKENS: &str = r#"
[[auth.registry.tokens]]
id = "team-a"
sha256 = "96c2886c51d1dfb4901d9feccff66213ce3e27406282ff6f602a4258a33dacec"
names = ["shared-*"]

[[auth.registry.tokens]]
id = "team-b"
sha256 = "e618ceaa77728baaf382c3c58980d1ef1e75003e83dc2fe322caeea1abcc70d3"
names = ["shared-*"]
"#;

#[tokio::test]
async fn with_tokens_only_the_owning_token_adds_instances() {
    let host = host_builder().config(TOKENS).start().await.unwrap();
    let first = Upstream::start().await;
    let second = Upstream::start().await;
    let send = |token: &'static str, body: Value| {
        let url = host.registry_url("/api/registry/register");
        async move {
            let answer = client()
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = answer.status().as_u16();
            (status, answer.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, answer) = send("team-a", registration("shared-svc", first.addr())).await;
    assert_eq!(status, 201, "{answer}");
    let (status, answer) = send("team-b", registration("shared-svc", second.addr())).await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("belongs to registry token `team-a`"),
        "{answer}"
    );
    let (status, answer) = send("team-a", registration("shared-svc", second.addr())).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(
        listed(&host, "shared-svc").await["instances"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
}

#[tokio::test]
async fn instances_survive_kill_9() {
    let host = host_builder().start().await.unwrap();
    let upstreams = [
        Upstream::start().await,
        Upstream::start().await,
        Upstream::start().await,
    ];
    register_all(&host, "durable", &upstreams.iter().collect::<Vec<_>>()).await;
    let dirs = host.kill9();
    let host = host_builder().dirs(dirs).start().await.unwrap();
    let entry = listed(&host, "durable").await;
    let ids: Vec<&str> = entry["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|instance| instance["id"].as_str())
        .collect();
    let mut expected: Vec<String> = upstreams.iter().map(|u| u.addr().to_string()).collect();
    expected.sort();
    assert_eq!(ids, expected, "{entry}");
    assert_eq!(load(&host, "/api/durable/echo/x", 30, 1).await, []);
    let shares: BTreeMap<u16, usize> = upstreams.iter().map(|u| (u.port(), u.echoes())).collect();
    assert!(shares.values().all(|share| *share == 10), "{shares:?}");
    // Ownership came back with them: another address cannot remove one.
    let other = client_from("127.0.0.2");
    let (status, answer) = post_from(
        &other,
        &host,
        "/api/registry/deregister/durable",
        &json!({"instance_id": expected[0]}),
    )
    .await;
    assert_eq!(status, 403, "{answer}");
}

#[tokio::test]
async fn a_put_with_a_body_is_retried_whole_and_a_post_is_not() {
    // Neither checks nor ejection take the dead instance out of routing.
    let host = host_builder()
        .args(["--health-check-interval", "1h"])
        .config("[outlier]\nconsecutive_failures = 0\n")
        .start()
        .await
        .unwrap();
    let mut dead = Upstream::start().await;
    let live = Upstream::start().await;
    for upstream in [&dead, &live] {
        // No endpoints declared: every method is forwarded.
        let mut body = registration("retry", upstream.addr());
        body["endpoints"] = json!([]);
        assert_eq!(register(&host, &body).await.0, 201);
    }
    dead.stop().await;

    // Round robin sends every other request to the dead instance: each
    // PUT that meets it is sent again to the live one, body and all.
    let client = client();
    let url = host.gateway_url("/api/retry/echo/x");
    for n in 0..4 {
        let body = format!("payload-{n}");
        let answer = client.put(&url).body(body.clone()).send().await.unwrap();
        assert_eq!(answer.status(), 200);
        let echo: Value = answer.json().await.unwrap();
        assert_eq!(echo["method"], "PUT");
        assert_eq!(echo["body"], body, "{echo}");
    }
    assert_eq!(live.echoes(), 4);

    // A POST is never retried: the ones that meet the dead instance fail.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let answer = client.post(&url).body("once").send().await.unwrap();
        statuses.push(answer.status().as_u16());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 502, 502]);
    assert_eq!(live.echoes(), 6);
}

#[tokio::test]
async fn balancing_and_thresholds_follow_a_reload() {
    let host = host_builder()
        .config("[load_balancing]\npolicy = \"round_robin\"\n")
        .start()
        .await
        .unwrap();
    let upstream = Upstream::start().await;
    register_all(&host, "tuned", &[&upstream]).await;
    assert_eq!(
        listed(&host, "tuned").await["load_balancing"],
        "round_robin"
    );

    let mark = host.log_mark();
    host.write_config("[load_balancing]\npolicy = \"least_outstanding\"\n")
        .unwrap();
    host.sighup().unwrap();
    host.wait_for_log_since(mark, &["config reloaded"])
        .await
        .unwrap();
    assert_eq!(
        listed(&host, "tuned").await["load_balancing"],
        "least_outstanding"
    );

    // An invalid value is refused whole, naming the key.
    let mark = host.log_mark();
    host.write_config("[outlier]\nmax_ejection_percent = 150\n")
        .unwrap();
    host.sighup().unwrap();
    let refused = host
        .wait_for_log_since(mark, &["config reload refused"])
        .await
        .unwrap();
    assert!(
        refused.contains("outlier.max_ejection_percent"),
        "{refused}"
    );
    assert_eq!(
        listed(&host, "tuned").await["load_balancing"],
        "least_outstanding"
    );
}
