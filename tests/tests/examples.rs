//! The example plugins end to end: `demo-service` keeps its SQLite items
//! across a reload and a restart and unloads for real 50 times over;
//! `analytics-service` aggregates `demo-service` (in process) and a
//! registered remote service, refreshed by its periodic job;
//! `notification-service` delivers to a registered webhook from a
//! background task, with retries. Each unloads for real (maps checked).

use std::path::PathBuf;

use host_harness::http::{client, get_json, post_json, registration};
use host_harness::workspace::{host_builder, plugin_library};
use host_harness::{Host, HostBuilder};
use integration_tests::eventually;
use integration_tests::upstream::{Upstream, register};
use serde_json::{Value, json};

/// Whether a private copy of `stem` is mapped into the host.
fn mapped(host: &Host, stem: &str) -> bool {
    host.maps()
        .unwrap()
        .contains(&format!("plugin-cache/{stem}."))
}

async fn remove_and_wait(host: &Host, file: &str, service: &str) {
    let mark = host.log_mark();
    host.remove_plugin(file).unwrap();
    host.wait_for_log_since(mark, &["plugin unloaded", &format!("plugin={service}")])
        .await
        .unwrap();
}

fn with_config(builder: HostBuilder, toml: &str) -> (HostBuilder, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("plugin-host.toml");
    std::fs::write(&path, toml).unwrap();
    (
        builder
            .arg("--config")
            .arg(path.to_string_lossy().into_owned()),
        dir,
    )
}

#[tokio::test]
async fn demo_service_keeps_its_items_in_sqlite_across_a_reload_and_a_restart() {
    let host = host_builder().start().await.unwrap();
    host.mount_plugin(plugin_library("demo_service"), "libdemo_service.so")
        .await
        .unwrap();
    let items = host.gateway_url("/api/demo-service/items");
    let (status, created) = post_json(&items, &json!({"name": "pen", "price": 1.5}))
        .await
        .unwrap();
    assert_eq!(status, 201);
    // Insertion order, as FastAPI answers.
    let answer = client()
        .get(&items)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        answer,
        r#"[{"id":1,"name":"pen","description":null,"price":1.5}]"#
    );
    let line = host
        .wait_for_log_since(0, &["item 1 created", "plugin=demo-service"])
        .await
        .unwrap();
    assert!(line.contains("INFO"), "{line}");

    remove_and_wait(&host, "libdemo_service.so", "demo-service").await;
    assert!(
        !mapped(&host, "libdemo_service"),
        "{}",
        host.maps().unwrap()
    );
    host.mount_plugin(plugin_library("demo_service"), "libdemo_service.so")
        .await
        .unwrap();
    assert_eq!(get_json(&items).await.unwrap(), (200, json!([created])));

    let (_, dirs) = host.stop_keeping_dirs();
    assert!(
        dirs.data()
            .join("plugins/demo-service/items.sqlite3")
            .exists()
    );
    let host = host_builder().dirs(dirs).start().await.unwrap();
    host.wait_for_log("plugin mounted").await.unwrap();
    let (status, body) = get_json(&host.gateway_url("/api/demo-service/items/1"))
        .await
        .unwrap();
    assert_eq!((status, &body["name"]), (200, &json!("pen")), "{body}");
}

#[tokio::test]
async fn demo_service_with_sqlite_unloads_for_real_50_times() {
    let host = host_builder()
        .args(["--watch-debounce", "10ms"])
        .start()
        .await
        .unwrap();
    let mut warm_rss = 0;
    for cycle in 0..50 {
        if cycle == 10 {
            warm_rss = host.rss_kib().unwrap();
        }
        host.mount_plugin(plugin_library("demo_service"), "libdemo_service.so")
            .await
            .unwrap();
        let (status, _) = post_json(
            &host.gateway_url("/api/demo-service/items"),
            &json!({"name": format!("item {cycle}"), "price": 1.0}),
        )
        .await
        .unwrap();
        assert_eq!(status, 201);
        remove_and_wait(&host, "libdemo_service.so", "demo-service").await;
        assert!(
            !mapped(&host, "libdemo_service"),
            "cycle {cycle}: {}",
            host.maps().unwrap()
        );
    }
    let final_rss = host.rss_kib().unwrap();
    eprintln!("RSS after 10 cycles: {warm_rss} KiB, after 50: {final_rss} KiB");
    assert!(
        final_rss < warm_rss + 4 * 1024,
        "RSS grew from {warm_rss} KiB to {final_rss} KiB over 40 cycles"
    );
    assert!(!host.logs().contains("still mapped"), "{}", host.logs());
}

#[tokio::test]
async fn analytics_aggregates_demo_service_and_a_remote_and_refreshes_periodically() {
    let (builder, _config) = with_config(
        host_builder(),
        r#"
[plugin.analytics-service.settings]
refresh_ms = 100
remote = "inventory"
remote_path = "/hello?name=inventory"
"#,
    );
    let host = builder.start().await.unwrap();
    host.mount_plugin(plugin_library("demo_service"), "libdemo_service.so")
        .await
        .unwrap();
    host.mount_plugin(
        plugin_library("analytics_service"),
        "libanalytics_service.so",
    )
    .await
    .unwrap();
    for price in [2.0, 4.0] {
        let (status, _) = post_json(
            &host.gateway_url("/api/demo-service/items"),
            &json!({"name": "thing", "price": price}),
        )
        .await
        .unwrap();
        assert_eq!(status, 201);
    }
    let stats_url = host.gateway_url("/api/analytics-service/stats");
    eventually("the periodic job counts both items", || async {
        let (_, stats) = get_json(&stats_url).await.unwrap();
        stats["items"] == 2 && stats["average_price"] == 3.0
    })
    .await;

    let aggregate = host.gateway_url("/api/analytics-service/aggregate");
    let (status, body) = get_json(&aggregate).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["inventory"], Value::Null, "not registered yet");
    assert_eq!(body["demo-service"][1]["price"], 4.0);

    let upstream = Upstream::start().await;
    let (status, _) = register(&host, &registration("inventory", upstream.addr())).await;
    assert_eq!(status, 201);
    let (status, body) = get_json(&aggregate).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["inventory"], json!({"message": "Hello, inventory!"}));
    eventually("the periodic job reads the remote too", || async {
        let (_, stats) = get_json(&stats_url).await.unwrap();
        stats["remote"] == json!({"message": "Hello, inventory!"})
    })
    .await;

    // Its periodic job is stopped and joined before its library closes.
    remove_and_wait(&host, "libanalytics_service.so", "analytics-service").await;
    assert!(
        !mapped(&host, "libanalytics_service"),
        "{}",
        host.maps().unwrap()
    );
    assert!(!host.logs().contains("still mapped"), "{}", host.logs());
}

#[tokio::test]
async fn notifications_are_delivered_to_a_webhook_with_retries_and_report_their_status() {
    let (builder, _config) = with_config(
        host_builder(),
        r#"
[plugin.notification-service.settings]
webhook_path = "/echo"
max_attempts = 3
retry_ms = 50
"#,
    );
    let host = builder.start().await.unwrap();
    host.mount_plugin(
        plugin_library("notification_service"),
        "libnotification_service.so",
    )
    .await
    .unwrap();
    let notifications = host.gateway_url("/api/notification-service/notifications");

    // No webhook registered: every attempt fails, then the status says so.
    let (status, body) = post_json(&notifications, &json!({"message": "nobody listens"}))
        .await
        .unwrap();
    assert_eq!((status, &body["status"]), (202, &json!("pending")));
    let first = format!("{notifications}/{}", body["id"]);
    eventually("the first notification fails", || async {
        get_json(&first).await.unwrap().1["status"] == "failed"
    })
    .await;
    let (_, failed) = get_json(&first).await.unwrap();
    assert_eq!(failed["attempts"], 3);
    assert_eq!(
        host.log_lines_since(0, &["WARN", "plugin=notification-service", "attempt"])
            .len(),
        3,
        "{}",
        host.logs()
    );

    let upstream = Upstream::start().await;
    let (status, _) = register(&host, &registration("webhook", upstream.addr())).await;
    assert_eq!(status, 201);
    let (_, body) = post_json(
        &notifications,
        &json!({"message": "hello", "recipient": "ops"}),
    )
    .await
    .unwrap();
    let second = format!("{notifications}/{}", body["id"]);
    eventually("the second notification is delivered", || async {
        get_json(&second).await.unwrap().1["status"] == "delivered"
    })
    .await;
    assert_eq!(get_json(&second).await.unwrap().1["attempts"], 1);

    remove_and_wait(&host, "libnotification_service.so", "notification-service").await;
    assert!(
        !mapped(&host, "libnotification_service"),
        "{}",
        host.maps().unwrap()
    );
}
