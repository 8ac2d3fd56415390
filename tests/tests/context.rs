//! The host context plugins get at `init`, end to end: settings from the
//! config file, a data directory that outlives reloads and restarts, log
//! lines in the host's log, calls to other services (in process and
//! remote, loops refused, no starvation under mutual calls), and background
//! tasks stopped and joined before the library is closed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use host_harness::http::{client, get_json, registration};
use host_harness::workspace::{host_builder, plugin_library};
use host_harness::{Host, HostBuilder};
use integration_tests::upstream::{Upstream, register};
use serde_json::{Value, json};

/// A config file in a directory of its own (kept as long as the returned
/// guard), for `--config`.
fn config_file(toml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plugin-host.toml");
    std::fs::write(&path, toml).unwrap();
    (dir, path)
}

/// The two caller plugins, each calling the other.
const PEERS: &str = r#"
[plugin.caller-a.settings]
peer = "caller-b"
greeting = "hello from the config file"

[plugin.caller-b.settings]
peer = "caller-a"
"#;

fn with_config(builder: HostBuilder, path: &std::path::Path) -> HostBuilder {
    builder
        .arg("--config")
        .arg(path.to_string_lossy().into_owned())
}

async fn mount_peers(host: &Host) {
    for lib in ["caller_a", "caller_b"] {
        host.mount_plugin(plugin_library(lib), &format!("lib{lib}.so"))
            .await
            .unwrap();
    }
}

async fn post(url: &str) -> (u16, Value) {
    let answer = client().post(url).send().await.unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

/// Lines of the host's memory map from private copies of `stem`.
fn mapped(host: &Host, stem: &str) -> bool {
    host.maps()
        .unwrap()
        .contains(&format!("plugin-cache/{stem}."))
}

#[tokio::test]
async fn settings_come_from_the_config_file_and_a_bad_one_refuses_the_load_naming_the_key() {
    let (_dir, path) = config_file(
        r#"
[plugin.caller-a.settings]
peer = "caller-b"
greeting = "hello from the config file"

[plugin.caller-b.settings]
peer = 5
"#,
    );
    let host = with_config(host_builder(), &path).start().await.unwrap();
    host.mount_plugin(plugin_library("caller_a"), "libcaller_a.so")
        .await
        .unwrap();
    let (status, body) = get_json(&host.gateway_url("/api/caller-a/settings"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"peer": "caller-b", "greeting": "hello from the config file"})
    );

    let mark = host.log_mark();
    host.install_plugin(plugin_library("caller_b"), "libcaller_b.so")
        .unwrap();
    let line = host
        .wait_for_log_since(mark, &["plugin file refused", "file=libcaller_b.so"])
        .await
        .unwrap();
    assert!(
        line.contains("invalid setting `plugin.caller-b.settings.peer`: invalid type: integer `5`"),
        "{line}"
    );
    assert!(!mapped(&host, "libcaller_b"), "{}", host.maps().unwrap());
}

#[tokio::test]
async fn the_data_directory_survives_a_reload_and_a_restart() {
    let (_dir, path) = config_file(PEERS);
    let host = with_config(host_builder(), &path).start().await.unwrap();
    host.mount_plugin(plugin_library("caller_a"), "libcaller_a.so")
        .await
        .unwrap();
    let visits = |host: &Host| {
        let url = host.gateway_url("/api/caller-a/visits");
        async move { post(&url).await }
    };
    assert_eq!(visits(&host).await, (200, json!({"visits": 1})));

    // An unload and a load: a new library copy, a new state.
    let mark = host.log_mark();
    host.remove_plugin("libcaller_a.so").unwrap();
    host.wait_for_log_since(mark, &["plugin unloaded", "plugin=caller-a"])
        .await
        .unwrap();
    host.mount_plugin(plugin_library("caller_a"), "libcaller_a.so")
        .await
        .unwrap();
    assert_eq!(visits(&host).await, (200, json!({"visits": 2})));

    let (_, dirs) = host.stop_keeping_dirs();
    let stored = dirs.data().join("plugins/caller-a/visits");
    assert_eq!(std::fs::read_to_string(&stored).unwrap(), "2");
    let host = with_config(host_builder(), &path)
        .dirs(dirs)
        .start()
        .await
        .unwrap();
    host.wait_for_log("plugin mounted").await.unwrap();
    assert_eq!(visits(&host).await, (200, json!({"visits": 3})));
}

#[tokio::test]
async fn a_plugins_log_lines_reach_the_host_log_with_its_name_at_the_hosts_level() {
    let (_dir, path) = config_file(PEERS);
    let host = with_config(host_builder(), &path).start().await.unwrap();
    host.mount_plugin(plugin_library("caller_a"), "libcaller_a.so")
        .await
        .unwrap();
    let (status, _) = post(&host.gateway_url("/api/caller-a/log?msg=first%20line")).await;
    assert_eq!(status, 204);
    let line = host
        .wait_for_log_since(0, &["first line", "plugin=caller-a"])
        .await
        .unwrap();
    assert!(line.contains("INFO"), "{line}");
    // A second event, so that the first one's DEBUG twin (logged in
    // between) would have arrived by the time it does.
    let (status, _) = post(&host.gateway_url("/api/caller-a/log?msg=second")).await;
    assert_eq!(status, 204);
    host.wait_for_log_since(0, &["second", "plugin=caller-a"])
        .await
        .unwrap();
    assert!(
        !host.logs().contains("debug: first line"),
        "DEBUG is below the host's level for plugins: {}",
        host.logs()
    );
}

#[tokio::test]
async fn an_in_process_call_carries_the_request_id_and_a_loop_is_refused_508() {
    let (_dir, path) = config_file(PEERS);
    let host = with_config(host_builder(), &path).start().await.unwrap();
    mount_peers(&host).await;

    let answer = client()
        .get(host.gateway_url("/api/caller-a/call?service=caller-b&path=/request-id"))
        .header("x-request-id", "chain-test-1")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.json::<Value>().await.unwrap(),
        json!({"id": "chain-test-1"})
    );

    // caller-a -> caller-b -> caller-a: refused at the third call.
    let (status, body) = get_json(&host.gateway_url("/api/caller-a/relay"))
        .await
        .unwrap();
    assert_eq!(status, 508, "{body}");
    assert_eq!(
        body,
        json!({"error": "call loop: caller-a -> caller-b -> caller-a", "service": "caller-a"})
    );

    let (status, body) = get_json(&host.gateway_url("/api/caller-a/call?service=nobody&path=/"))
        .await
        .unwrap();
    assert_eq!(
        (status, body),
        (
            404,
            json!({"error": "no service named `nobody`", "service": "nobody"})
        )
    );
}

#[tokio::test]
async fn two_plugins_calling_each_other_at_full_concurrency_all_complete() {
    let (_dir, path) = config_file(PEERS);
    // Two workers each: 24 requests in flight keep every worker of both
    // plugins blocked in a call to the other. Calls waiting for the other's
    // workers would all wait until the request timeout.
    let host = with_config(host_builder(), &path)
        .args(["--plugin-workers", "2", "--request-timeout", "20s"])
        .start()
        .await
        .unwrap();
    mount_peers(&host).await;

    let started = Instant::now();
    let requests = (0..24).map(|index| {
        let from = if index % 2 == 0 {
            "caller-a"
        } else {
            "caller-b"
        };
        let url = host.gateway_url(&format!("/api/{from}/ping?sleep_ms=100"));
        tokio::spawn(async move { (from, get_json(&url).await.unwrap()) })
    });
    for request in requests {
        let (from, (status, body)) = request.await.unwrap();
        assert_eq!(status, 200, "{from}: {body}");
        let peer = if from == "caller-a" {
            "caller-b"
        } else {
            "caller-a"
        };
        assert_eq!(body, json!({"me": from, "peer": {"from": peer}}));
    }
    // 12 requests per plugin through 2 workers, 100 ms each: about 600 ms.
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
}

#[tokio::test]
async fn a_call_to_a_remote_service_goes_through_the_proxy() {
    let (_dir, path) = config_file(PEERS);
    let host = with_config(host_builder(), &path).start().await.unwrap();
    host.mount_plugin(plugin_library("caller_a"), "libcaller_a.so")
        .await
        .unwrap();
    let upstream = Upstream::start().await;
    let (status, body) = register(&host, &registration("remote-echo", upstream.addr())).await;
    assert_eq!(status, 201, "{body}");

    let answer = client()
        .get(host.gateway_url("/api/caller-a/call?service=remote-echo&path=/echo/deep"))
        .header("x-request-id", "remote-chain-1")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let echo: Value = answer.json().await.unwrap();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/echo/deep");
    assert_eq!(echo["headers"]["x-request-id"], json!(["remote-chain-1"]));
    assert!(
        echo["headers"]["via"][0]
            .as_str()
            .is_some_and(|via| via.contains("plugin-host-")),
        "{echo}"
    );
}

#[tokio::test]
async fn background_tasks_are_stopped_and_joined_before_the_library_is_closed() {
    let (_dir, path) = config_file(PEERS);
    let host = with_config(host_builder(), &path).start().await.unwrap();
    host.mount_plugin(plugin_library("caller_a"), "libcaller_a.so")
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(post(&host.gateway_url("/api/caller-a/tick")).await.0, 202);
    }
    integration_tests::eventually("the tasks tick", || async {
        let (_, body) = get_json(&host.gateway_url("/api/caller-a/ticks"))
            .await
            .unwrap();
        body["ticks"].as_u64().unwrap_or(0) > 0
    })
    .await;

    let mark = host.log_mark();
    host.remove_plugin("libcaller_a.so").unwrap();
    host.wait_for_log_since(mark, &["plugin unloaded", "plugin=caller-a"])
        .await
        .unwrap();
    // Each task saw the stop signal and returned before the unload ended.
    assert_eq!(
        host.log_lines_since(mark, &["tick task stopped", "plugin=caller-a"])
            .len(),
        3,
        "{}",
        host.logs()
    );
    assert!(!mapped(&host, "libcaller_a"), "{}", host.maps().unwrap());
    assert!(!host.logs().contains("still mapped"), "{}", host.logs());
}

#[tokio::test]
async fn a_task_that_ignores_the_stop_signal_leaks_the_library_with_a_warning() {
    let (_dir, path) = config_file(PEERS);
    let host = with_config(host_builder(), &path)
        .args(["--drain-timeout", "500ms"])
        .start()
        .await
        .unwrap();
    host.mount_plugin(plugin_library("caller_a"), "libcaller_a.so")
        .await
        .unwrap();
    assert_eq!(post(&host.gateway_url("/api/caller-a/stuck")).await.0, 202);
    host.wait_for_log("stuck task started").await.unwrap();

    let mark = host.log_mark();
    host.remove_plugin("libcaller_a.so").unwrap();
    let line = host
        .wait_for_log_since(mark, &["background tasks still running", "plugin=caller-a"])
        .await
        .unwrap();
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("running_tasks=1"), "{line}");
    assert!(line.contains("library left loaded"), "{line}");
    // Left loaded, as the line says, and the host goes on: the same file
    // loads again as a new copy.
    assert!(mapped(&host, "libcaller_a"), "{}", host.maps().unwrap());
    host.mount_plugin(plugin_library("caller_a"), "libcaller_a.so")
        .await
        .unwrap();
    let (status, _) = get_json(&host.gateway_url("/api/caller-a/settings"))
        .await
        .unwrap();
    assert_eq!(status, 200);
}
