//! Service versions: selection by header and by path, the default (the
//! highest stable version), traffic splits (weighted, sticky) and who may
//! set them, plugin versions side by side, ownership of new versions,
//! persistence across `kill -9`, and a store written before versions.

use std::collections::BTreeMap;

use host_harness::Host;
use host_harness::http::{client, get_json, registration};
use host_harness::workspace::{host_builder, plugin_library};
use integration_tests::upstream::{Upstream, client_from, post_from, register};
use redb::ReadableDatabase;
use serde_json::{Value, json};

/// Registers `upstream` as version `version` of `name` (from 127.0.0.1).
async fn register_version(host: &Host, name: &str, version: &str, upstream: &Upstream) -> Value {
    let mut body = registration(name, upstream.addr());
    body["version"] = json!(version);
    let (status, answer) = register(host, &body).await;
    assert_eq!(status, 201, "{answer}");
    answer
}

/// `GET <gateway><path>` with `X-Service-Version: <header>` if given: the
/// status, the version that answered, and the body.
async fn ask(host: &Host, path: &str, header: Option<&str>) -> (u16, Option<String>, Value) {
    let mut request = client().get(host.gateway_url(path));
    if let Some(header) = header {
        request = request.header("X-Service-Version", header);
    }
    let answer = request.send().await.expect("gateway request");
    let status = answer.status().as_u16();
    let version = answer
        .headers()
        .get("x-service-version")
        .map(|value| value.to_str().unwrap().to_owned());
    (status, version, answer.json().await.unwrap_or(Value::Null))
}

/// The service `name`'s listing entry.
async fn listed(host: &Host, name: &str) -> Value {
    let (status, entry) = get_json(&host.registry_url(&format!("/api/registry/services/{name}")))
        .await
        .unwrap();
    assert_eq!(status, 200, "{entry}");
    entry
}

/// `<method> /api/registry/services/<name>/traffic` from `from`, with a
/// bearer token if given.
async fn traffic(
    from: &reqwest::Client,
    host: &Host,
    method: reqwest::Method,
    name: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, Value) {
    let url = host.registry_url(&format!("/api/registry/services/{name}/traffic"));
    let mut request = from.request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let answer = request.send().await.expect("registry request");
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

/// How many of `n` requests to `path` (with `header`s) each version
/// answered, over `clients` concurrent connections.
async fn versions_answering(
    host: &Host,
    path: &str,
    n: usize,
    clients: usize,
    headers: &[(&str, String)],
) -> BTreeMap<String, usize> {
    let mut tasks = Vec::new();
    for worker in 0..clients {
        let url = host.gateway_url(path);
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(name, value)| ((*name).to_owned(), value.clone()))
            .collect();
        let count = n / clients + usize::from(worker < n % clients);
        tasks.push(tokio::spawn(async move {
            let client = client();
            let mut seen = BTreeMap::<String, usize>::new();
            for _ in 0..count {
                let mut request = client.get(&url);
                for (name, value) in &headers {
                    request = request.header(name, value);
                }
                let answer = request.send().await.expect("gateway request");
                assert_eq!(answer.status(), 200);
                let version = answer.headers()["x-service-version"]
                    .to_str()
                    .unwrap()
                    .to_owned();
                let _ = answer.bytes().await;
                *seen.entry(version).or_default() += 1;
            }
            seen
        }));
    }
    let mut total = BTreeMap::new();
    for task in tasks {
        for (version, count) in task.await.unwrap() {
            *total.entry(version).or_default() += count;
        }
    }
    total
}

#[tokio::test]
async fn a_version_is_selected_by_header_or_path_and_names_itself() {
    let host = host_builder().start().await.unwrap();
    let old = Upstream::start().await;
    let new = Upstream::start().await;
    register_version(&host, "svc", "1.4.2", &old).await;
    let added = register_version(&host, "svc", "2", &new).await;
    assert_eq!(added["status"], "version added", "{added}");
    assert_eq!(added["version"], "2.0.0", "normalised: {added}");

    let version = |path: &'static str, header: Option<&'static str>| {
        let host = &host;
        async move {
            let (status, version, body) = ask(host, path, header).await;
            assert_eq!(status, 200, "{path} {header:?}: {body}");
            version.expect("X-Service-Version on the answer")
        }
    };
    assert_eq!(version("/api/svc/hello", None).await, "2.0.0");
    assert_eq!(version("/api/svc/hello", Some("1")).await, "1.4.2");
    assert_eq!(version("/api/svc/hello", Some("=1.4.2")).await, "1.4.2");
    assert_eq!(version("/api/svc/hello", Some("^1.4")).await, "1.4.2");
    assert_eq!(version("/api/svc/hello", Some("2")).await, "2.0.0");
    assert_eq!(version("/api/svc/hello", Some("1.x")).await, "1.4.2");
    assert_eq!(version("/api/svc@1/hello", None).await, "1.4.2");
    assert_eq!(version("/api/svc@=2.0.0/hello", None).await, "2.0.0");
    assert_eq!(
        version("/api/svc@2/hello", Some("1")).await,
        "2.0.0",
        "the path form wins"
    );

    // The service sees the client's header as it was sent.
    let (status, _, echoed) = ask(&host, "/api/svc/echo/x", Some("^1.4")).await;
    assert_eq!(status, 200);
    assert_eq!(echoed["headers"]["x-service-version"], json!(["^1.4"]));
    assert_eq!(old.echoes(), 1);
    assert_eq!(new.echoes(), 0);
    // The access log names the version that answered, and the service
    // without the path form's requirement.
    host.wait_for_log_since(0, &["access:", "service=\"svc\"", "version=\"1.4.2\""])
        .await
        .unwrap();

    let (status, _, refused) = ask(&host, "/api/svc/hello", Some("^^1")).await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["version_requirement"], "^^1");
    assert!(
        refused["error"].as_str().unwrap().contains("`^^1`"),
        "{refused}"
    );
    let (status, _, refused) = ask(&host, "/api/svc@nonsense!/hello", None).await;
    assert_eq!(status, 400, "{refused}");

    let (status, _, missing) = ask(&host, "/api/svc/hello", Some("3")).await;
    assert_eq!(status, 404, "{missing}");
    assert_eq!(missing["versions"], json!(["2.0.0", "1.4.2"]), "{missing}");
    assert!(
        missing["error"].as_str().unwrap().contains("2.0.0, 1.4.2"),
        "{missing}"
    );

    let entry = listed(&host, "svc").await;
    assert_eq!(entry["version"], "2.0.0", "{entry}");
    assert_eq!(entry["default_version"], "2.0.0", "{entry}");
    assert_eq!(entry["versions"][0]["version"], "2.0.0", "{entry}");
    assert_eq!(
        entry["versions"][1]["instances"],
        json!([old.addr().to_string()]),
        "{entry}"
    );
    let instances = entry["instances"].as_array().unwrap();
    assert_eq!(
        instances.len(),
        2,
        "every instance of every version: {entry}"
    );
    assert!(
        instances
            .iter()
            .any(|i| i["id"] == old.addr().to_string() && i["version"] == "1.4.2"),
        "{entry}"
    );
}

#[tokio::test]
async fn the_default_is_the_highest_stable_version_and_bad_versions_are_refused() {
    let host = host_builder().start().await.unwrap();
    let stable = Upstream::start().await;
    let beta = Upstream::start().await;
    register_version(&host, "svc", "v1.4.2", &stable).await;
    register_version(&host, "svc", "2.0.0-beta.1", &beta).await;
    let (_, version, _) = ask(&host, "/api/svc/hello", None).await;
    assert_eq!(version.as_deref(), Some("1.4.2"));
    let (_, version, _) = ask(&host, "/api/svc/hello", Some("=2.0.0-beta.1")).await;
    assert_eq!(version.as_deref(), Some("2.0.0-beta.1"));
    let (status, _, body) = ask(&host, "/api/svc/hello", Some("2")).await;
    assert_eq!(status, 404, "a pre-release is picked only by name: {body}");
    assert_eq!(listed(&host, "svc").await["default_version"], "1.4.2");

    for bad in ["latest", "1.2.3.4", "01.2"] {
        let mut body = registration("other", stable.addr());
        body["version"] = json!(bad);
        let (status, answer) = register(&host, &body).await;
        assert_eq!(status, 422, "{bad}: {answer}");
        assert_eq!(answer["field"], "version", "{answer}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .contains("not a semantic version"),
            "{answer}"
        );
    }
}

#[tokio::test]
async fn a_split_shares_traffic_by_weight_and_sticks_by_key() {
    let host = host_builder().start().await.unwrap();
    let old = Upstream::start().await;
    let new = Upstream::start().await;
    register_version(&host, "canary", "1.4.2", &old).await;
    register_version(&host, "canary", "2.0.0", &new).await;
    let me = client();
    let (status, answer) = traffic(
        &me,
        &host,
        reqwest::Method::PUT,
        "canary",
        Some(json!({"weights": {"1.4.2": 90, "2.0.0": 10}})),
        None,
    )
    .await;
    assert_eq!(status, 200, "{answer}");

    let seen = versions_answering(&host, "/api/canary/hello", 2000, 8, &[]).await;
    let share = seen.get("2.0.0").copied().unwrap_or(0) as f64 / 2000.0;
    println!("90/10 split over 2,000 requests: {seen:?}");
    assert!(
        (0.07..=0.13).contains(&share),
        "2.0.0 took {share} of 2,000 requests, 0.10 +- 0.03 expected: {seen:?}"
    );
    assert_eq!(seen.values().sum::<usize>(), 2000);
    // A header still selects past the split.
    let (_, version, _) = ask(&host, "/api/canary/hello", Some("=2.0.0")).await;
    assert_eq!(version.as_deref(), Some("2.0.0"));

    let sticky = json!({"weights": {"1.4.2": 50, "2.0.0": 50}, "sticky": {"header": "X-User-Id"}});
    let (status, answer) = traffic(
        &me,
        &host,
        reqwest::Method::PUT,
        "canary",
        Some(sticky.clone()),
        None,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let alice = versions_answering(
        &host,
        "/api/canary/hello",
        50,
        2,
        &[("X-User-Id", "alice".to_owned())],
    )
    .await;
    assert_eq!(alice.len(), 1, "one client, one version: {alice:?}");
    let mut spread = BTreeMap::<String, usize>::new();
    for user in 0..24 {
        let seen = versions_answering(
            &host,
            "/api/canary/hello",
            3,
            1,
            &[("X-User-Id", format!("user-{user}"))],
        )
        .await;
        assert_eq!(seen.len(), 1, "user-{user}: {seen:?}");
        *spread.entry(seen.into_keys().next().unwrap()).or_default() += 1;
    }
    assert_eq!(
        spread.len(),
        2,
        "keys spread over both versions: {spread:?}"
    );

    let (status, read) = traffic(&me, &host, reqwest::Method::GET, "canary", None, None).await;
    assert_eq!((status, &read["traffic"]), (200, &sticky), "{read}");
    assert_eq!(
        listed(&host, "canary").await["traffic"]["split"],
        sticky,
        "listed"
    );
    let (status, _) = traffic(&me, &host, reqwest::Method::DELETE, "canary", None, None).await;
    assert_eq!(status, 200);
    let seen = versions_answering(&host, "/api/canary/hello", 20, 2, &[]).await;
    assert_eq!(
        seen,
        BTreeMap::from([("2.0.0".to_owned(), 20)]),
        "the default again"
    );
    assert!(
        listed(&host, "canary").await["traffic"]
            .get("split")
            .is_none()
    );
}

#[tokio::test]
async fn a_split_needs_rights_and_versions_that_exist() {
    let host = host_builder().start().await.unwrap();
    let upstream = Upstream::start().await;
    register_version(&host, "owned", "1.0.0", &upstream).await;
    host.mount_plugin(plugin_library("swap_a"), "a.so")
        .await
        .unwrap();
    let me = client();
    let put = |name: &'static str, body: Value, from: reqwest::Client| {
        let host = &host;
        async move { traffic(&from, host, reqwest::Method::PUT, name, Some(body), None).await }
    };
    let (status, answer) = put("owned", json!({"weights": {"3.0.0": 1}}), me.clone()).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["field"], "weights.3.0.0", "{answer}");
    let (status, answer) = put("owned", json!({"weights": {"1.0.0": 0}}), me.clone()).await;
    assert_eq!(
        (status, &answer["field"]),
        (422, &json!("weights")),
        "{answer}"
    );
    let (status, answer) = put("owned", json!({"weights": {"1.0.0": 10001}}), me.clone()).await;
    assert_eq!(status, 422, "{answer}");
    let (status, answer) = put(
        "owned",
        json!({"weights": {"1.0.0": 1}, "sticky": {"header": "bad header"}}),
        me.clone(),
    )
    .await;
    assert_eq!(
        (status, &answer["field"]),
        (422, &json!("sticky.header")),
        "{answer}"
    );
    let (status, answer) = put("nobody", json!({"weights": {"1.0.0": 1}}), me.clone()).await;
    assert_eq!(status, 404, "{answer}");

    let (status, answer) = put(
        "owned",
        json!({"weights": {"1.0.0": 1}}),
        client_from("127.0.0.2"),
    )
    .await;
    assert_eq!(status, 403, "another address: {answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("owns none"),
        "{answer}"
    );

    let (status, answer) = put("swap", json!({"weights": {"1.0.0": 1}}), me.clone()).await;
    assert_eq!(status, 403, "a plugin without tokens: {answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("admin token"),
        "{answer}"
    );
    assert!(
        listed(&host, "swap").await["traffic"]
            .get("split")
            .is_none()
    );
}

/// SHA-256 of `admin`.
const ADMIN: &str = r#"
[auth.registry]
admin_token_sha256 = "8c6976e5b5410415bde908bd4dee15dfb167a9c873fc4bb8a81f6f2ab448a918"
"#;

#[tokio::test]
async fn plugin_versions_load_side_by_side_and_the_admin_splits_them() {
    let host = host_builder().config(ADMIN).start().await.unwrap();
    host.mount_plugin(plugin_library("swap_a"), "a.so")
        .await
        .unwrap();
    host.mount_plugin(plugin_library("swap_b"), "b.so")
        .await
        .unwrap();
    let (status, version, body) = ask(&host, "/api/swap/", None).await;
    assert_eq!((status, version.as_deref()), (200, Some("2.0.0")), "{body}");
    assert_eq!(body["variant"], "swap-b");
    let (_, version, body) = ask(&host, "/api/swap@1/", None).await;
    assert_eq!(
        (version.as_deref(), &body["variant"]),
        (Some("1.0.0"), &json!("swap-a"))
    );
    let entry = listed(&host, "swap").await;
    assert_eq!(entry["versions"][1]["loaded_from"], "a.so", "{entry}");

    let (status, answer) = traffic(
        &client(),
        &host,
        reqwest::Method::PUT,
        "swap",
        Some(json!({"weights": {"1.0.0": 1, "2.0.0": 0}})),
        Some("admin"),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let seen = versions_answering(&host, "/api/swap/", 20, 2, &[]).await;
    assert_eq!(seen, BTreeMap::from([("1.0.0".to_owned(), 20)]));

    // The same name and version as a loaded file waits.
    let mark = host.log_mark();
    host.install_plugin(plugin_library("swap_a"), "a-again.so")
        .unwrap();
    host.wait_for_log_since(mark, &["service name already in use", "file=a-again.so"])
        .await
        .unwrap();

    let mark = host.log_mark();
    host.remove_plugin("b.so").unwrap();
    host.wait_for_log_since(mark, &["plugin unmounted", "file=b.so"])
        .await
        .unwrap();
    let (status, version, body) = ask(&host, "/api/swap/", None).await;
    assert_eq!((status, version.as_deref()), (200, Some("1.0.0")), "{body}");
    let (status, _, body) = ask(&host, "/api/swap@2/", None).await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test]
async fn a_plugin_file_whose_version_is_no_semver_is_refused() {
    let host = host_builder().start().await.unwrap();
    host.install_plugin(plugin_library("bad_version"), "bad-version.so")
        .unwrap();
    let line = host
        .wait_for_log_since(0, &["plugin file refused", "file=bad-version.so"])
        .await
        .unwrap();
    assert!(line.contains("`version`"), "{line}");
    assert!(
        line.contains("`latest` is not a semantic version"),
        "{line}"
    );
    let (status, _, _) = ask(&host, "/api/bad-version/health", None).await;
    assert_eq!(status, 404, "never loaded");
}

#[tokio::test]
async fn only_an_owner_adds_a_version_and_a_restart_in_place_moves_its_instance() {
    let host = host_builder()
        .args(["--max-versions-per-service", "2"])
        .start()
        .await
        .unwrap();
    let mine = Upstream::start().await;
    let theirs = Upstream::start().await;
    register_version(&host, "svc", "1.0.0", &mine).await;

    let mut newer = registration("svc", theirs.addr());
    newer["version"] = json!("2.0.0");
    let other = client_from("127.0.0.2");
    let (status, answer) = post_from(&other, &host, "/api/registry/register", &newer).await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["field"], "version", "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("only an address that owns"),
        "{answer}"
    );
    let (_, version, _) = ask(&host, "/api/svc/hello", None).await;
    assert_eq!(version.as_deref(), Some("1.0.0"), "nothing changed");

    // The same host:port registering another version moves to it.
    let mut moved = registration("svc", mine.addr());
    moved["version"] = json!("1.1.0");
    let (status, answer) = register(&host, &moved).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["status"], "moved to another version", "{answer}");
    let entry = listed(&host, "svc").await;
    assert_eq!(entry["versions"].as_array().unwrap().len(), 1, "{entry}");
    assert_eq!(entry["default_version"], "1.1.0", "{entry}");

    // The owner adds versions up to the limit.
    register_version(&host, "svc", "2.0.0", &theirs).await;
    let third = Upstream::start().await;
    let mut over = registration("svc", third.addr());
    over["version"] = json!("3.0.0");
    let (status, answer) = register(&host, &over).await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["limit"], "max_versions_per_service", "{answer}");
    // A move out of a version's last instance keeps the count: allowed.
    let mut moved = registration("svc", theirs.addr());
    moved["version"] = json!("3.0.0");
    let (status, answer) = register(&host, &moved).await;
    assert_eq!(status, 201, "{answer}");
    let entry = listed(&host, "svc").await;
    let versions: Vec<&str> = entry["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["3.0.0", "1.1.0"], "{entry}");

    // A heartbeat by name speaks for the caller's instances in every version.
    let (status, answer) = post_from(
        &client(),
        &host,
        "/api/registry/heartbeat",
        &json!({"service_id": "svc"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["instance_ids"].as_array().unwrap().len(),
        2,
        "{answer}"
    );
    // Deregistering one version's instance leaves the other version.
    let (status, answer) = post_from(
        &client(),
        &host,
        &format!("/api/registry/deregister/svc/{}", theirs.addr()),
        &json!({}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (_, version, _) = ask(&host, "/api/svc/hello", None).await;
    assert_eq!(version.as_deref(), Some("1.1.0"));
}

#[tokio::test]
async fn versions_and_splits_survive_kill_9() {
    let host = host_builder().start().await.unwrap();
    let old = Upstream::start().await;
    let new = Upstream::start().await;
    register_version(&host, "durable", "1.0.0", &old).await;
    register_version(&host, "durable", "2.0.0", &new).await;
    let split = json!({"weights": {"1.0.0": 1}, "sticky": {"cookie": "session"}});
    let (status, answer) = traffic(
        &client(),
        &host,
        reqwest::Method::PUT,
        "durable",
        Some(split.clone()),
        None,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let dirs = host.kill9();
    let host = host_builder().dirs(dirs).start().await.unwrap();
    let entry = listed(&host, "durable").await;
    let versions: Vec<&str> = entry["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["2.0.0", "1.0.0"], "{entry}");
    assert_eq!(entry["traffic"]["split"], split, "{entry}");
    let seen = versions_answering(&host, "/api/durable/hello", 10, 1, &[]).await;
    assert_eq!(seen, BTreeMap::from([("1.0.0".to_owned(), 10)]));

    // The version the split names goes: the split is kept, and with none
    // of its versions present the default takes the traffic.
    let (status, answer) = post_from(
        &client(),
        &host,
        &format!("/api/registry/deregister/durable/{}", old.addr()),
        &json!({}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let seen = versions_answering(&host, "/api/durable/hello", 10, 1, &[]).await;
    assert_eq!(seen, BTreeMap::from([("2.0.0".to_owned(), 10)]));
    assert_eq!(listed(&host, "durable").await["traffic"]["split"], split);
}

/// A record as the release before versions wrote it (format 1, before
/// checksums too), with a short version.
fn legacy_record(addr: std::net::SocketAddr) -> String {
    format!(
        r#"{{"format":"1","spec":{{"info":{{"name":"legacy","display_name":"legacy","description":"","version":"1.2","health_check_url":"/health","metadata":{{}},"tags":[],"requires_auth":false,"endpoints":[]}},"base_path":"/"}},"instances":[{{"host":"{}","port":{}}}],"registered_at_unix_ms":1700000000000,"owner":"127.0.0.1"}}"#,
        addr.ip(),
        addr.port()
    )
}

#[tokio::test]
async fn a_store_written_before_versions_is_migrated_on_read() {
    let upstream = Upstream::start().await;
    let host = host_builder().start().await.unwrap();
    let (exit, dirs) = host.stop_keeping_dirs();
    assert!(exit.is_some_and(|exit| exit.success()), "{exit:?}");
    {
        let db = redb::Database::open(dirs.data().join("registry.redb")).expect("open");
        let write = db.begin_write().expect("write");
        write
            .open_table(redb::TableDefinition::<&str, &[u8]>::new("remote_services"))
            .expect("table")
            .insert("legacy", legacy_record(upstream.addr()).as_bytes())
            .expect("insert");
        write.commit().expect("commit");
    }
    let host = host_builder().dirs(dirs).start().await.unwrap();
    let (status, version, body) = ask(&host, "/api/legacy/hello", None).await;
    assert_eq!((status, version.as_deref()), (200, Some("1.2.0")), "{body}");
    let newer = Upstream::start().await;
    register_version(&host, "legacy", "2.0.0", &newer).await;
    let (exit, dirs) = host.stop_keeping_dirs();
    assert!(exit.is_some_and(|exit| exit.success()), "{exit:?}");
    {
        let db = redb::Database::open(dirs.data().join("registry.redb")).expect("open");
        let read = db.begin_read().expect("read");
        let table = read
            .open_table(redb::TableDefinition::<&str, &[u8]>::new("remote_services"))
            .expect("table");
        assert!(
            redb::ReadableTable::get(&table, "legacy")
                .expect("get")
                .is_none(),
            "moved to the tenant's key"
        );
        let value = redb::ReadableTable::get(&table, "t/default/s/legacy")
            .expect("get")
            .expect("stored");
        let text = String::from_utf8_lossy(value.value()).into_owned();
        assert!(
            text.contains(r#""format":"2""#),
            "rewritten as format 2: {text}"
        );
    }
    let host = host_builder().dirs(dirs).start().await.unwrap();
    let entry = listed(&host, "legacy").await;
    assert_eq!(
        entry["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["version"].clone())
            .collect::<Vec<_>>(),
        [json!("2.0.0"), json!("1.2.0")],
        "{entry}"
    );
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
async fn with_tokens_the_owning_token_adds_versions_and_splits() {
    let host = host_builder().config(TOKENS).start().await.unwrap();
    let first = Upstream::start().await;
    let second = Upstream::start().await;
    let send = |token: &'static str, version: &'static str, upstream: &Upstream| {
        let mut body = registration("shared-svc", upstream.addr());
        body["version"] = json!(version);
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
            (status, answer.json::<Value>().await.unwrap())
        }
    };
    let (status, answer) = send("team-a", "1.0.0", &first).await;
    assert_eq!(status, 201, "{answer}");
    let (status, answer) = send("team-b", "2.0.0", &second).await;
    assert_eq!(status, 403, "another token adds no version: {answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("team-a"),
        "{answer}"
    );
    let (status, answer) = send("team-a", "2.0.0", &second).await;
    assert_eq!(status, 201, "{answer}");

    let split = json!({"weights": {"1.0.0": 1}});
    let (status, answer) = traffic(
        &client(),
        &host,
        reqwest::Method::PUT,
        "shared-svc",
        Some(split.clone()),
        Some("team-b"),
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    let (status, answer) = traffic(
        &client(),
        &host,
        reqwest::Method::PUT,
        "shared-svc",
        Some(split),
        None,
    )
    .await;
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = traffic(
        &client(),
        &host,
        reqwest::Method::PUT,
        "shared-svc",
        Some(json!({"weights": {"1.0.0": 1}})),
        Some("team-a"),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (_, version, _) = ask(&host, "/api/shared-svc/hello", None).await;
    assert_eq!(version.as_deref(), Some("1.0.0"));
}
