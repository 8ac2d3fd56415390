//! A plugin's life at its edges: an `init` that fails, panics or hangs, a
//! handler that outlives the drain timeout, a shutdown hook that panics, and
//! a plugin with a thread of its own. Each must leave the host serving and
//! its other files loading and unloading.

use std::time::{Duration, Instant};

use host_harness::Host;
use host_harness::http::client;
use host_harness::workspace::{host_builder, plugin_library};
use integration_tests::eventually;

async fn get_text(url: String) -> (u16, String) {
    let answer = client().get(url).send().await.unwrap();
    let status = answer.status().as_u16();
    (status, answer.text().await.unwrap_or_default())
}

/// Lines of the host's memory map that belong to private copies of `stem`
/// (deleted ones included: a library left loaded outlives its file).
fn mapped_lines(host: &Host, stem: &str) -> usize {
    let needle = format!("plugin-cache/{stem}.");
    host.maps()
        .unwrap()
        .lines()
        .filter(|line| line.contains(&needle))
        .count()
}

/// Installs `hello`, waits for it to be mounted since `mark`, and checks it
/// answers.
async fn hello_serves(host: &Host) {
    let mark = host.log_mark();
    host.install_plugin(plugin_library("hello"), "libhello.so")
        .unwrap();
    host.wait_for_log_since(mark, &["plugin mounted", "plugin=hello"])
        .await
        .unwrap();
    let (status, _) = get_text(host.gateway_url("/api/hello/hello")).await;
    assert_eq!(status, 200);
}

/// Installs the test plugin `lib` (service `service`) next to `hello` and
/// checks that its `init` failing refuses the file with `message`, leaves
/// nothing mapped, and leaves `hello` serving.
async fn refused_at_init(lib: &str, service: &str, message: &str) {
    let host = host_builder().start().await.unwrap();
    hello_serves(&host).await;

    let file = format!("lib{lib}.so");
    host.install_plugin(plugin_library(lib), &file).unwrap();
    let line = host
        .wait_for_log_since(0, &["plugin file refused", &format!("file={file}")])
        .await
        .unwrap();
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains(message), "{line}");
    let (status, _) = get_text(host.gateway_url(&format!("/api/{service}/"))).await;
    assert_eq!(status, 404);
    assert_eq!(
        mapped_lines(&host, &format!("lib{lib}")),
        0,
        "{}",
        host.maps().unwrap()
    );
    let (status, _) = get_text(host.gateway_url("/api/hello/hello")).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_init_error_refuses_the_file_with_the_plugins_message() {
    refused_at_init(
        "init_error",
        "init-error",
        "init failed: database at 10.0.0.1 unreachable",
    )
    .await;
}

#[tokio::test]
async fn an_init_panic_refuses_the_file_with_the_panic_message() {
    refused_at_init(
        "init_panic",
        "init-panic",
        "init panicked: no configuration file found",
    )
    .await;
}

#[tokio::test]
async fn a_hanging_init_is_refused_after_the_entry_timeout_and_the_host_goes_on() {
    let host = host_builder()
        .args(["--plugin-entry-timeout", "500ms"])
        .start()
        .await
        .unwrap();

    let installed = Instant::now();
    host.install_plugin(plugin_library("init_hang"), "libinit_hang.so")
        .unwrap();
    let line = host
        .wait_for_log_since(0, &["plugin file refused", "file=libinit_hang.so"])
        .await
        .unwrap();
    assert!(installed.elapsed() >= Duration::from_millis(500));
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("init did not return within 500ms; its library is left loaded"),
        "{line}"
    );
    // Left loaded, as the line says: its code still runs on a thread.
    assert!(
        mapped_lines(&host, "libinit_hang") > 0,
        "{}",
        host.maps().unwrap()
    );
    let (status, _) = get_text(host.gateway_url("/api/init-hang/")).await;
    assert_eq!(status, 404);

    // The manager is free: another file loads and serves, goes away and
    // comes back.
    hello_serves(&host).await;
    let mark = host.log_mark();
    host.remove_plugin("libhello.so").unwrap();
    host.wait_for_log_since(mark, &["plugin unloaded", "plugin=hello"])
        .await
        .unwrap();
    let (status, _) = get_text(host.gateway_url("/api/hello/hello")).await;
    assert_eq!(status, 404);
    hello_serves(&host).await;

    // The hanging file itself can go and come back: refused again, alike.
    host.remove_plugin("libinit_hang.so").unwrap();
    let mark = host.log_mark();
    host.install_plugin(plugin_library("init_hang"), "libinit_hang.so")
        .unwrap();
    let line = host
        .wait_for_log_since(mark, &["plugin file refused", "file=libinit_hang.so"])
        .await
        .unwrap();
    assert!(line.contains("init did not return within 500ms"), "{line}");
    let (status, _) = get_text(host.gateway_url("/api/hello/hello")).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_request_in_flight_at_removal_is_answered_before_the_unload() {
    let host = host_builder().start().await.unwrap();
    host.mount_plugin(plugin_library("stuck"), "libstuck.so")
        .await
        .unwrap();

    let held = tokio::spawn(get_text(host.gateway_url("/api/stuck/hold?ms=1000")));
    host.wait_for_log("stuck: handler entered").await.unwrap();
    let mark = host.log_mark();
    host.remove_plugin("libstuck.so").unwrap();
    host.wait_for_log_since(mark, &["plugin unmounted", "plugin=stuck"])
        .await
        .unwrap();
    assert_eq!(held.await.unwrap(), (200, "held 1000 ms".to_owned()));
    let line = host
        .wait_for_log_since(mark, &["plugin unloaded", "plugin=stuck"])
        .await
        .unwrap();
    // The unload woke when the request ended, long before the default
    // 30 s drain timeout.
    let elapsed_ms: u64 = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("elapsed_ms="))
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no elapsed_ms in {line}"));
    assert!(elapsed_ms < 10_000, "{line}");
    assert!(!host.logs().contains("still in flight"), "{}", host.logs());
    assert_eq!(
        mapped_lines(&host, "libstuck"),
        0,
        "{}",
        host.maps().unwrap()
    );
}

#[tokio::test]
async fn a_handler_stuck_past_the_drain_timeout_leaks_its_library_and_frees_the_name() {
    let mut host = host_builder()
        .args(["--drain-timeout", "500ms"])
        .start()
        .await
        .unwrap();
    host.mount_plugin(plugin_library("stuck"), "libstuck.so")
        .await
        .unwrap();

    let held = tokio::spawn(get_text(host.gateway_url("/api/stuck/hold?ms=6000")));
    host.wait_for_log("stuck: handler entered").await.unwrap();
    let mark = host.log_mark();
    host.remove_plugin("libstuck.so").unwrap();
    host.wait_for_log_since(
        mark,
        &[
            "requests still in flight after the drain timeout",
            "plugin=stuck",
        ],
    )
    .await
    .unwrap();
    let line = host
        .wait_for_log_since(
            mark,
            &[
                "plugin workers still busy after the drain timeout; library left loaded",
                "plugin=stuck",
            ],
        )
        .await
        .unwrap();
    assert!(
        line.contains("WARN") && line.contains("running_workers=1"),
        "{line}"
    );
    assert!(host.is_running());

    // The name is free again: the plugin installed anew loads and serves
    // while its old copy still holds a worker.
    let mark = host.log_mark();
    host.install_plugin(plugin_library("stuck"), "libstuck.so")
        .unwrap();
    host.wait_for_log_since(mark, &["plugin mounted", "plugin=stuck"])
        .await
        .unwrap();
    let (status, body) = get_text(host.gateway_url("/api/stuck/hold?ms=0")).await;
    assert_eq!((status, body.as_str()), (200, "held 0 ms"));
    assert!(!held.is_finished());
    // The leaked copy finishes the request it was stuck in.
    assert_eq!(held.await.unwrap(), (200, "held 6000 ms".to_owned()));
    assert!(host.is_running());
}

#[tokio::test]
async fn a_panicking_shutdown_hook_is_logged_and_the_library_still_unmapped() {
    let host = host_builder().start().await.unwrap();
    host.mount_plugin(plugin_library("shutdown_panic"), "libshutdown_panic.so")
        .await
        .unwrap();
    let (status, body) = get_text(host.gateway_url("/api/shutdown-panic/")).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert!(mapped_lines(&host, "libshutdown_panic") > 0);

    let mark = host.log_mark();
    host.remove_plugin("libshutdown_panic.so").unwrap();
    let line = host
        .wait_for_log_since(
            mark,
            &["plugin shutdown hook failed", "plugin=shutdown-panic"],
        )
        .await
        .unwrap();
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("shutdown panicked: could not flush the journal"),
        "{line}"
    );
    host.wait_for_log_since(mark, &["plugin unloaded", "plugin=shutdown-panic"])
        .await
        .unwrap();
    assert_eq!(
        mapped_lines(&host, "libshutdown_panic"),
        0,
        "{}",
        host.maps().unwrap()
    );
    assert!(!host.logs().contains("still mapped"), "{}", host.logs());
}

#[tokio::test]
async fn a_plugin_that_joins_its_own_thread_in_shutdown_unloads_cleanly() {
    let host = host_builder().start().await.unwrap();
    host.mount_plugin(plugin_library("background"), "libbackground.so")
        .await
        .unwrap();
    // Its thread runs: the count moves.
    let ticks = || async {
        let (status, body) = get_text(host.gateway_url("/api/background/")).await;
        assert_eq!(status, 200, "{body}");
        body.strip_prefix("ticks: ")
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("unexpected answer {body}"))
    };
    let first = ticks().await;
    eventually("the plugin's thread ticks", || async {
        ticks().await > first
    })
    .await;
    assert!(mapped_lines(&host, "libbackground") > 0);

    let mark = host.log_mark();
    host.remove_plugin("libbackground.so").unwrap();
    host.wait_for_log_since(mark, &["plugin unloaded", "plugin=background"])
        .await
        .unwrap();
    assert_eq!(
        mapped_lines(&host, "libbackground"),
        0,
        "{}",
        host.maps().unwrap()
    );
    assert!(!host.logs().contains("still mapped"), "{}", host.logs());
}
