//! Metrics, access log, request ids, probes and the plugin files' status,
//! checked against traffic the test made itself.

use std::collections::BTreeMap;

use host_harness::http::{client, get_json, registration};
use host_harness::workspace::{host_builder, plugin_library};
use integration_tests::upstream::{Upstream, register};
use serde_json::Value;

/// A Prometheus text exposition: each sample's `name{labels}` (labels as
/// written, sorted by the encoder's order) to its value.
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("no value in `{line}`"));
            let value = match value {
                "+Inf" => f64::INFINITY,
                value => value
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in `{line}`")),
            };
            (series.to_owned(), value)
        })
        .collect()
}

/// The value of the sample `name` whose labels are exactly `labels`.
fn sample(samples: &BTreeMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    let key = if wanted.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{}}}", wanted.join(","))
    };
    *samples
        .get(&key)
        .unwrap_or_else(|| panic!("no sample `{key}` in:\n{samples:#?}"))
}

async fn scrape(host: &host_harness::Host) -> BTreeMap<String, f64> {
    let response = client()
        .get(host.registry_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    parse_exposition(&response.text().await.unwrap())
}

/// `GET <gateway><path>`, with an `X-Request-Id` if given: status, the
/// answer's `X-Request-Id`, body.
async fn get(host: &host_harness::Host, path: &str, id: Option<&str>) -> (u16, String, String) {
    let mut request = client().get(host.gateway_url(path));
    if let Some(id) = id {
        request = request.header("x-request-id", id);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let returned = response
        .headers()
        .get("x-request-id")
        .map(|id| id.to_str().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no X-Request-Id in the answer to {path}"));
    (status, returned, response.text().await.unwrap())
}

/// A port nothing listens on.
fn closed_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test]
async fn metrics_listing_and_access_log_count_the_traffic_sent() {
    let host = host_builder().start().await.unwrap();
    host.mount_plugin(plugin_library("hello"), "hello.so")
        .await
        .unwrap();
    let upstream = Upstream::start().await;
    assert_eq!(
        register(&host, &registration("upstream", upstream.addr()))
            .await
            .0,
        201
    );
    let gone = registration("gone", closed_port());
    assert_eq!(register(&host, &gone).await.0, 201);

    let mark = host.log_mark();
    for _ in 0..5 {
        assert_eq!(get(&host, "/api/hello/hello", None).await.0, 200);
    }
    let mut data_item = BTreeMap::<u16, u32>::new();
    for id in ["1", "2"] {
        let status = get(&host, &format!("/api/hello/data/{id}"), None).await.0;
        *data_item.entry(status).or_default() += 1;
    }
    for _ in 0..2 {
        // An undeclared path: the plugin's 404, counted under `other`.
        assert_eq!(get(&host, "/api/hello/no/such/path", None).await.0, 404);
    }
    for _ in 0..3 {
        assert_eq!(get(&host, "/api/upstream/hello", None).await.0, 200);
    }
    assert_eq!(get(&host, "/api/gone/hello", None).await.0, 502);
    // Not a service: refused before any service is involved.
    assert_eq!(get(&host, "/api/nobody/x", None).await.0, 404);

    let samples = scrape(&host).await;
    let requests = |service: &str, route: &str, class: &str| {
        sample(
            &samples,
            "gateway_requests_total",
            &[
                ("service", service),
                ("route", route),
                ("method", "GET"),
                ("status_class", class),
            ],
        )
    };
    assert_eq!(requests("hello", "/hello", "2xx"), 5.0);
    for (status, count) in &data_item {
        let class = format!("{}xx", status / 100);
        assert_eq!(requests("hello", "/data/{id}", &class), f64::from(*count));
    }
    assert_eq!(requests("hello", "other", "4xx"), 2.0);
    assert_eq!(requests("upstream", "/hello", "2xx"), 3.0);
    assert_eq!(requests("gone", "/hello", "5xx"), 1.0);
    let duration_count = |service| {
        sample(
            &samples,
            "gateway_request_duration_seconds_count",
            &[("service", service)],
        )
    };
    assert_eq!(duration_count("hello"), 9.0);
    assert_eq!(duration_count("upstream"), 3.0);
    assert_eq!(
        sample(
            &samples,
            "gateway_request_duration_seconds_bucket",
            &[("service", "hello"), ("le", "+Inf")]
        ),
        9.0
    );
    assert_eq!(
        sample(
            &samples,
            "proxy_upstream_duration_seconds_count",
            &[("service", "upstream")]
        ),
        3.0
    );
    assert_eq!(
        sample(
            &samples,
            "proxy_upstream_errors_total",
            &[("service", "gone"), ("kind", "connect")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &samples,
            "gateway_requests_in_flight",
            &[("service", "hello")]
        ),
        0.0
    );
    assert_eq!(
        sample(
            &samples,
            "plugin_lifecycle_events_total",
            &[("event", "load")]
        ),
        1.0
    );
    assert_eq!(
        sample(&samples, "plugin_workers_busy", &[("service", "hello")]),
        0.0
    );
    assert_eq!(
        sample(
            &samples,
            "registry_services",
            &[("kind", "plugin"), ("state", "healthy")]
        ),
        1.0
    );
    assert!(
        samples
            .keys()
            .all(|series| !series.contains("no/such") && !series.contains("nobody")),
        "a raw path or an unknown name became a label"
    );

    // The listing's totals: the same traffic.
    let (status, hello) = get_json(&host.registry_url("/api/registry/services/hello"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        hello["traffic"],
        serde_json::json!({"requests_total": 9, "errors_total": 0, "in_flight": 0})
    );
    let (_, listing) = get_json(&host.registry_url("/api/registry/services"))
        .await
        .unwrap();
    let gone = listing
        .as_array()
        .unwrap()
        .iter()
        .find(|service| service["name"] == "gone")
        .unwrap();
    assert_eq!(gone["traffic"]["requests_total"], 1);
    assert_eq!(gone["traffic"]["errors_total"], 1);

    // One access line per request, the unknown name's included.
    let access = host.log_lines_since(mark, &["access:", "request_id="]);
    assert_eq!(access.len(), 14, "{access:#?}");
    let to_hello = host.log_lines_since(mark, &["access:", "service=\"hello\""]);
    assert_eq!(to_hello.len(), 9, "{to_hello:#?}");
    assert!(
        to_hello
            .iter()
            .filter(|line| line.contains("route=\"/hello\""))
            .all(|line| line.contains("status=200") && line.contains("method=GET")),
        "{to_hello:#?}"
    );
}

#[tokio::test]
async fn request_ids_are_kept_when_usable_replaced_otherwise_and_always_returned() {
    let host = host_builder().start().await.unwrap();
    host.mount_plugin(plugin_library("echo"), "echo.so")
        .await
        .unwrap();
    let upstream = Upstream::start().await;
    assert_eq!(
        register(&host, &registration("upstream", upstream.addr()))
            .await
            .0,
        201
    );
    let id_seen_by = |body: &str| -> Vec<String> {
        let body: Value = serde_json::from_str(body).unwrap();
        match &body["headers"] {
            // The echo plugin: `[[name, value], ...]`.
            Value::Array(pairs) => pairs
                .iter()
                .filter(|pair| pair[0] == "x-request-id")
                .map(|pair| pair[1].as_str().unwrap().to_owned())
                .collect(),
            // The upstream: `{name: [values]}`.
            headers => headers["x-request-id"]
                .as_array()
                .unwrap()
                .iter()
                .map(|value| value.as_str().unwrap().to_owned())
                .collect(),
        }
    };

    for path in ["/api/echo/a", "/api/upstream/echo"] {
        let (status, returned, body) = get(&host, path, Some("trace-7f3a")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(returned, "trace-7f3a");
        assert_eq!(id_seen_by(&body), ["trace-7f3a"], "{path}");

        let (status, returned, body) = get(&host, path, Some("not usable")).await;
        assert_eq!(status, 200, "{body}");
        assert_ne!(returned, "not usable");
        assert_eq!(id_seen_by(&body), [returned], "{path}");

        let (_, first, body) = get(&host, path, None).await;
        let (_, second, _) = get(&host, path, None).await;
        assert_eq!(id_seen_by(&body), std::slice::from_ref(&first));
        assert_ne!(first, second, "ids are unique");
        assert!(
            first.len() >= 32 && first.bytes().all(|b| b.is_ascii_graphic()),
            "{first}"
        );
    }

    // Refusals carry one too: an unknown service, a refused path, a
    // refused method.
    for path in ["/api/nobody/x", "/api/echo/%2e%2e/x", "/nowhere"] {
        let (status, returned, body) = get(&host, path, Some("refused-1")).await;
        assert!((400..500).contains(&status), "{path}: {status} {body}");
        assert_eq!(returned, "refused-1", "{path}");
    }
}

#[tokio::test]
async fn probes_and_plugin_files_tell_loaded_refused_and_waiting_files_apart() {
    let host = host_builder().start().await.unwrap();
    let (status, body) = get_json(&host.registry_url("/healthz")).await.unwrap();
    assert_eq!((status, &body["status"]), (200, &Value::from("ok")));
    let (status, ready) = get_json(&host.registry_url("/readyz")).await.unwrap();
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["plugin_files_refused"], 0);
    // Refusals are the registry's JSON ones.
    let response = client()
        .post(host.registry_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    let refusal: Value = response.json().await.unwrap();
    assert!(
        refusal["error"].as_str().unwrap().contains("/healthz"),
        "{refusal}"
    );

    host.mount_plugin(plugin_library("hello"), "hello.so")
        .await
        .unwrap();
    let mark = host.log_mark();
    std::fs::write(host.plugins_dir().join("x.so"), "not a library").unwrap();
    host.wait_for_log_since(mark, &["plugin file refused", "file=x.so"])
        .await
        .unwrap();
    let mark = host.log_mark();
    host.install_plugin(plugin_library("hello_dup"), "dup.so")
        .unwrap();
    host.wait_for_log_since(mark, &["service name already in use", "file=dup.so"])
        .await
        .unwrap();

    let (status, listing) = get_json(&host.registry_url("/api/registry/plugins/files"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{listing}");
    assert_eq!(
        listing["directory"],
        host.plugins_dir().display().to_string()
    );
    let files: BTreeMap<String, Value> = listing["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|file| (file["file"].as_str().unwrap().to_owned(), file.clone()))
        .collect();
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        ["dup.so", "hello.so", "x.so"]
    );
    let hello = &files["hello.so"];
    assert_eq!(hello["state"], "loaded");
    assert_eq!(hello["service"], "hello");
    assert!(hello["version"].is_string());
    assert_eq!(hello["reason"], Value::Null);
    let refused = &files["x.so"];
    assert_eq!(refused["state"], "refused");
    assert_eq!(refused["service"], Value::Null);
    assert!(refused["reason"].as_str().unwrap().len() > 5, "{refused}");
    let waiting = &files["dup.so"];
    assert_eq!(waiting["state"], "waiting");
    assert_eq!(waiting["service"], "hello");
    assert!(
        waiting["reason"].as_str().unwrap().contains("hello.so"),
        "the reason names the holder: {waiting}"
    );
    for file in files.values() {
        // RFC 3339, UTC.
        let since = file["since"].as_str().unwrap();
        assert!(since.len() >= 20 && since.ends_with('Z'), "{since}");
    }

    let (status, ready) = get_json(&host.registry_url("/readyz")).await.unwrap();
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["plugin_files_refused"], 1);
    assert_eq!(ready["refused"][0]["file"], "x.so");
    assert_eq!(ready["plugin_files_waiting"], 1);
    assert_eq!(ready["waiting"][0]["file"], "dup.so");

    // The name frees: the waiting file is loaded, the removed one leaves.
    let mark = host.log_mark();
    host.remove_plugin("hello.so").unwrap();
    host.wait_for_log_since(mark, &["plugin mounted", "file=dup.so"])
        .await
        .unwrap();
    let (_, listing) = get_json(&host.registry_url("/api/registry/plugins/files"))
        .await
        .unwrap();
    let states: Vec<(&str, &str)> = listing["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|file| {
            (
                file["file"].as_str().unwrap(),
                file["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(states, [("dup.so", "loaded"), ("x.so", "refused")]);
}

#[tokio::test]
async fn metrics_off_serves_no_metrics_and_keeps_the_listing_totals() {
    let host = host_builder()
        .args(["--metrics", "off"])
        .start()
        .await
        .unwrap();
    host.mount_plugin(plugin_library("hello"), "hello.so")
        .await
        .unwrap();
    assert_eq!(get(&host, "/api/hello/hello", None).await.0, 200);
    let (status, _) = get_json(&host.registry_url("/metrics")).await.unwrap();
    assert_eq!(status, 404);
    let (_, hello) = get_json(&host.registry_url("/api/registry/services/hello"))
        .await
        .unwrap();
    assert_eq!(hello["traffic"]["requests_total"], 1);

    let moved = host_builder()
        .config("[metrics]\npath = \"/internal/metrics\"\n")
        .start()
        .await
        .unwrap();
    let (status, _) = host_harness::http::get(&client(), &moved.registry_url("/internal/metrics"))
        .await
        .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_plugin_is_probed_through_its_runtime_and_listed_as_its_health_route_answers() {
    let host = host_builder()
        .args(["--health-check-interval", "200ms"])
        .start()
        .await
        .unwrap();
    host.mount_plugin(plugin_library("flaky_health"), "flaky.so")
        .await
        .unwrap();
    let listed = || async {
        get_json(&host.registry_url("/api/registry/services/flaky-health"))
            .await
            .unwrap()
            .1
    };
    integration_tests::eventually("a first health check", || async {
        listed().await["last_health_check"]["ok"] == true
    })
    .await;
    assert_eq!(listed().await["status"], "healthy");

    let mark = host.log_mark();
    let post = |path: &'static str| {
        let url = host.gateway_url(path);
        async move { client().post(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(post("/api/flaky-health/fail").await, 200);
    host.wait_for_log_since(mark, &["plugin unhealthy", "plugin=flaky-health"])
        .await
        .unwrap();
    let unhealthy = listed().await;
    assert_eq!(unhealthy["status"], "unhealthy", "{unhealthy}");
    assert_eq!(unhealthy["last_health_check"]["ok"], false);
    assert!(
        unhealthy["last_health_check"]["error"]
            .as_str()
            .unwrap()
            .contains("503"),
        "{unhealthy}"
    );
    let samples = scrape(&host).await;
    assert_eq!(
        sample(
            &samples,
            "registry_services",
            &[("kind", "plugin"), ("state", "unhealthy")]
        ),
        1.0
    );
    assert!(
        sample(
            &samples,
            "registry_health_checks_total",
            &[("result", "unhealthy")]
        ) >= 1.0
    );

    // Still routed: its one instance answers what it can.
    let mark = host.log_mark();
    assert_eq!(post("/api/flaky-health/recover").await, 200);
    host.wait_for_log_since(mark, &["plugin healthy again", "plugin=flaky-health"])
        .await
        .unwrap();
    assert_eq!(listed().await["status"], "healthy");
}

#[tokio::test]
async fn json_logs_carry_the_access_log_as_objects() {
    let host = host_builder()
        .args(["--log-format", "json"])
        .start()
        .await
        .unwrap();
    let mark = host.log_mark();
    host.install_plugin(plugin_library("hello"), "hello.so")
        .unwrap();
    host.wait_for_log_since(mark, &["plugin mounted", r#""file":"hello.so""#])
        .await
        .unwrap();
    let mark = host.log_mark();
    let (status, id, _) = get(&host, "/api/hello/data/7", Some("json-1")).await;
    assert_eq!((status, id.as_str()), (404, "json-1"));
    let line = host
        .wait_for_log_since(mark, &[r#""target":"access""#])
        .await
        .unwrap();
    let event: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
    let fields = &event["fields"];
    assert_eq!(fields["service"], "hello", "{event}");
    assert_eq!(fields["route"], "/data/{id}");
    assert_eq!(fields["method"], "GET");
    assert_eq!(fields["status"], 404);
    assert_eq!(fields["request_id"], "json-1");
    assert!(fields["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(fields["client"].as_str().unwrap().starts_with("127.0.0.1:"));
}
