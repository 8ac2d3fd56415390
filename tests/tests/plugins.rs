//! In-process plugins: load on drop, unload on removal, swap on replace,
//! refusal of bad files, and isolation of bad plugin behaviour.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use host_harness::http::{client, get_json};
use host_harness::workspace::{host_builder, plugin_library};
use host_harness::{Dirs, Host};
use integration_tests::eventually;
use serde_json::Value;

/// Threads of the host whose name starts with `prefix` (the runtime names a
/// plugin's workers `plugin-<name>-<index>`) that are asleep in
/// `nanosleep`, as a handler calling `std::thread::sleep` is: the kernel's
/// `wchan` says where a thread waits, and an idle worker waits on a futex.
fn sleeping_threads(host: &Host, prefix: &str) -> usize {
    let tasks =
        std::fs::read_dir(format!("/proc/{}/task", host.pid())).expect("threads of the host");
    tasks
        .filter_map(Result::ok)
        .filter(|task| {
            let read =
                |file: &str| std::fs::read_to_string(task.path().join(file)).unwrap_or_default();
            read("comm").starts_with(prefix) && read("wchan").contains("nanosleep")
        })
        .count()
}

/// Private copies of `stem` mapped into the host.
fn mapped_copies(host: &Host, stem: &str) -> usize {
    host.maps()
        .unwrap()
        .lines()
        .filter(|line| line.contains(&format!("plugin-cache/{stem}.")))
        .filter_map(|line| line.split_whitespace().last())
        .collect::<std::collections::HashSet<_>>()
        .len()
}

#[tokio::test]
async fn a_dropped_file_is_mounted_listed_and_served() {
    let host = host_builder().start().await.unwrap();
    let line = host
        .mount_plugin(plugin_library("hello"), "libhello.so")
        .await
        .unwrap();
    assert!(
        line.contains("plugin=hello") && line.contains("file=libhello.so"),
        "{line}"
    );

    let (status, body) = get_json(&host.gateway_url("/api/hello/hello?name=Developer"))
        .await
        .unwrap();
    assert_eq!(
        (status, body),
        (200, serde_json::json!({"message": "Hello, Developer!"}))
    );
    let (_, body) = get_json(&host.gateway_url("/api/hello/hello"))
        .await
        .unwrap();
    assert_eq!(body["message"], "Hello, World!");

    let created = client()
        .post(host.gateway_url("/api/hello/data"))
        .json(&serde_json::json!({"title": "t", "content": "c"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    let created: Value = created.json().await.unwrap();
    assert_eq!(created["item"]["id"], 1);
    assert_eq!(
        get_json(&host.gateway_url("/api/hello/data/1"))
            .await
            .unwrap()
            .0,
        200
    );
    assert_eq!(
        get_json(&host.gateway_url("/api/hello/data/2"))
            .await
            .unwrap()
            .0,
        404
    );

    let (status, listing) = get_json(&host.registry_url("/api/registry/services"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let hello = listing
        .as_array()
        .unwrap()
        .iter()
        .find(|service| service["name"] == "hello")
        .expect("hello listed");
    assert_eq!(hello["kind"], "plugin");
    assert_eq!(hello["status"], "healthy");
    assert_eq!(hello["loaded_from"], "libhello.so");
    assert_eq!(hello["version"], "1.0.0");
    assert_eq!(hello["display_name"], "Hello Service");
    assert!(hello["endpoints"].as_array().unwrap().len() >= 6);
}

#[tokio::test]
async fn a_removed_file_is_unmounted_and_its_library_unmapped() {
    let host = host_builder().start().await.unwrap();
    host.mount_plugin(plugin_library("hello"), "libhello.so")
        .await
        .unwrap();
    assert_eq!(mapped_copies(&host, "libhello"), 1);

    let mark = host.log_mark();
    host.remove_plugin("libhello.so").unwrap();
    host.wait_for_log_since(mark, &["plugin unloaded", "plugin=hello"])
        .await
        .unwrap();
    assert_eq!(
        get_json(&host.gateway_url("/api/hello/hello"))
            .await
            .unwrap()
            .0,
        404
    );
    assert_eq!(
        mapped_copies(&host, "libhello"),
        0,
        "{}",
        host.maps().unwrap()
    );
    assert!(!host.logs().contains("still mapped"), "{}", host.logs());

    // Back again: live at once.
    host.mount_plugin(plugin_library("hello"), "libhello.so")
        .await
        .unwrap();
    assert_eq!(
        get_json(&host.gateway_url("/api/hello/hello"))
            .await
            .unwrap()
            .0,
        200
    );
}

async fn variant(host: &Host) -> Option<String> {
    let (status, body) = get_json(&host.gateway_url("/api/swap/")).await.unwrap();
    (status == 200).then(|| body["variant"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn a_replaced_file_serves_the_new_version_by_cp_and_by_rename() {
    let host = host_builder().start().await.unwrap();
    host.mount_plugin(plugin_library("swap_a"), "swap.so")
        .await
        .unwrap();
    assert_eq!(variant(&host).await.as_deref(), Some("swap-a"));

    let mark = host.log_mark();
    host.install_plugin(plugin_library("swap_b"), "swap.so")
        .unwrap();
    host.wait_for_log_since(mark, &["plugin mounted", "replaced=true"])
        .await
        .unwrap();
    assert_eq!(variant(&host).await.as_deref(), Some("swap-b"));

    let mark = host.log_mark();
    host.rename_plugin_in(plugin_library("swap_a"), "swap.so")
        .unwrap();
    host.wait_for_log_since(mark, &["plugin mounted", "replaced=true"])
        .await
        .unwrap();
    assert_eq!(variant(&host).await.as_deref(), Some("swap-a"));
    // Two versions were unloaded, each on a thread of its own.
    eventually("only the live version mapped", || async {
        mapped_copies(&host, "swap") == 1
    })
    .await;
}

/// `cp` over a mounted file truncates it and sets its mode before the first
/// byte is copied; on a busy machine the copy may start after the debounce.
/// The empty file is not the new version: the host waits for the write to
/// end, and the old version serves meanwhile.
#[tokio::test]
async fn a_file_truncated_and_left_empty_past_the_debounce_waits_for_its_content() {
    use std::io::Write as _;

    let host = host_builder()
        .arg("--watch-debounce")
        .arg("20ms")
        .start()
        .await
        .unwrap();
    host.mount_plugin(plugin_library("swap_a"), "swap.so")
        .await
        .unwrap();

    let mark = host.log_mark();
    let mut file = std::fs::File::create(host.plugins_dir().join("swap.so")).unwrap();
    // Ten debounce periods with the file empty and still open for writing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(variant(&host).await.as_deref(), Some("swap-a"));
    file.write_all(&std::fs::read(plugin_library("swap_b")).unwrap())
        .unwrap();
    drop(file);
    host.wait_for_log_since(mark, &["plugin mounted", "replaced=true"])
        .await
        .unwrap();
    assert_eq!(variant(&host).await.as_deref(), Some("swap-b"));
    assert!(
        host.log_lines_since(mark, &["refused"]).is_empty(),
        "{}",
        host.logs()
    );
}

#[tokio::test]
async fn no_request_fails_while_a_plugin_is_replaced_20_times_under_load() {
    let host = Arc::new(
        host_builder()
            .arg("--watch-debounce")
            .arg("20ms")
            .start()
            .await
            .unwrap(),
    );
    host.mount_plugin(plugin_library("swap_a"), "swap.so")
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (host, stop, failures, served) =
            (host.clone(), stop.clone(), failures.clone(), served.clone());
        load.push(tokio::spawn(async move {
            let client = client();
            let mut variants = std::collections::HashSet::new();
            // Bounded: at most 100,000 requests per client even if the
            // swaps stall.
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match client.get(host.gateway_url("/api/swap/")).send().await {
                    Ok(answer) if answer.status() == 200 => {
                        let body: Value = answer.json().await.unwrap();
                        variants.insert(body["variant"].as_str().unwrap().to_owned());
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(answer) => {
                        eprintln!("failed: {} {:?}", answer.status(), answer.text().await);
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => {
                        eprintln!("failed: {error}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            variants
        }));
    }
    for round in 0..20 {
        let lib = if round % 2 == 0 { "swap_b" } else { "swap_a" };
        let mark = host.log_mark();
        host.install_plugin(plugin_library(lib), "swap.so").unwrap();
        host.wait_for_log_since(mark, &["plugin mounted", "replaced=true"])
            .await
            .unwrap();
        // Stimulus pacing, not a wait: each version serves the load for a
        // moment before it is replaced again.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut variants = std::collections::HashSet::new();
    for task in load {
        variants.extend(task.await.unwrap());
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert!(
        served.load(Ordering::Relaxed) > 100,
        "too little load to prove anything"
    );
    assert_eq!(variants.len(), 2, "both versions served: {variants:?}");
    eventually("every replaced library unloaded", || async {
        host.logs().matches("plugin unloaded").count() == 20
    })
    .await;
    assert_eq!(mapped_copies(&host, "swap"), 1, "{}", host.maps().unwrap());
}

#[tokio::test]
async fn bad_files_are_refused_naming_the_file_and_the_reason() {
    let host = host_builder().start().await.unwrap();
    host.mount_plugin(plugin_library("hello"), "libhello.so")
        .await
        .unwrap();

    let plugins = host.plugins_dir();
    std::fs::write(plugins.join("garbage.so"), b"this is not a library").unwrap();
    let slow = std::fs::read(plugin_library("slow")).unwrap();
    std::fs::write(plugins.join("truncated.so"), &slow[..slow.len() / 2]).unwrap();
    std::fs::write(plugins.join("notes.txt"), b"not a plugin, ignored").unwrap();
    host.install_plugin(plugin_library("no_entry"), "libno_entry.so")
        .unwrap();
    host.install_plugin(plugin_library("bad_abi"), "libbad_abi.so")
        .unwrap();
    host.install_plugin(plugin_library("bad_name"), "libbad_name.so")
        .unwrap();
    host.install_plugin(plugin_library("hello_dup"), "libhello_dup.so")
        .unwrap();

    for (file, reason) in [
        ("garbage.so", "not an ELF shared object"),
        ("truncated.so", "truncated"),
        ("libno_entry.so", "missing entry symbol `plugin_api_entry`"),
        (
            "libbad_abi.so",
            "the plugin has version 999, this host speaks version 4",
        ),
        ("libbad_name.so", "invalid config field `name`"),
        ("libhello_dup.so", "service name already in use"),
    ] {
        let line = host
            .wait_for_log_since(0, &["refused", &format!("file={file}")])
            .await
            .unwrap();
        assert!(line.contains(reason), "{file}: {line}");
    }
    assert!(!host.logs().contains("notes.txt"));
    // The first `hello` is untouched, and nothing refused is mapped.
    let (status, body) = get_json(&host.gateway_url("/api/hello/")).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["service"], "Hello Service");
    for stem in [
        "garbage",
        "truncated",
        "libno_entry",
        "libbad_abi",
        "libbad_name",
        "libhello_dup",
    ] {
        assert_eq!(mapped_copies(&host, stem), 0, "{stem} still mapped");
    }
}

#[tokio::test]
async fn a_panicking_handler_is_a_500_and_the_host_lives_on() {
    let host = host_builder().start().await.unwrap();
    host.mount_plugin(plugin_library("panicky"), "libpanicky.so")
        .await
        .unwrap();
    for _ in 0..3 {
        let (status, body) = get_json(&host.gateway_url("/api/panicky/boom"))
            .await
            .unwrap();
        assert_eq!(status, 500);
        assert!(
            body["detail"].as_str().unwrap().contains("panicked"),
            "{body}"
        );
    }
    let (status, body) = get_json(&host.gateway_url("/api/panicky/ok"))
        .await
        .unwrap();
    assert_eq!((status, body), (200, serde_json::json!({"ok": true})));
}

#[tokio::test]
async fn a_plugin_with_thread_locals_unloads_and_the_host_survives() {
    let mut host = host_builder()
        .arg("--plugin-workers")
        .arg("2")
        .start()
        .await
        .unwrap();
    host.mount_plugin(plugin_library("tls"), "libtls.so")
        .await
        .unwrap();
    for _ in 0..10 {
        let (status, body) = get_json(&host.gateway_url("/api/tls/")).await.unwrap();
        assert_eq!(status, 200);
        assert!(body["count"].as_u64().unwrap() >= 1);
    }
    let mark = host.log_mark();
    host.remove_plugin("libtls.so").unwrap();
    host.wait_for_log_since(mark, &["plugin unloaded", "plugin=tls"])
        .await
        .unwrap();
    assert_eq!(
        mapped_copies(&host, "libtls"),
        0,
        "{}",
        host.maps().unwrap()
    );
    // Load it again: a fresh copy, fresh thread-locals, still working.
    host.install_plugin(plugin_library("tls"), "libtls.so")
        .unwrap();
    host.wait_for_log_since(mark, &["plugin mounted", "plugin=tls"])
        .await
        .unwrap();
    let (status, body) = get_json(&host.gateway_url("/api/tls/")).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["count"], 1, "thread-locals start afresh: {body}");
    assert!(host.is_running());
}

#[tokio::test]
async fn a_slow_plugin_times_out_with_504_while_another_answers() {
    let host = host_builder()
        .args(["--request-timeout", "3s"])
        .start()
        .await
        .unwrap();
    host.install_plugin(plugin_library("slow"), "libslow.so")
        .unwrap();
    host.install_plugin(plugin_library("hello"), "libhello.so")
        .unwrap();
    host.wait_for_log_since(0, &["plugin mounted", "plugin=slow"])
        .await
        .unwrap();
    host.wait_for_log_since(0, &["plugin mounted", "plugin=hello"])
        .await
        .unwrap();

    let slow = tokio::spawn(get_json_owned(host.gateway_url("/api/slow/sleep?ms=10000")));
    // While the slow request holds its worker, another plugin answers, and
    // the slow one has not been answered yet.
    eventually("the slow plugin's worker asleep in the handler", || async {
        sleeping_threads(&host, "plugin-slow-") == 1
    })
    .await;
    assert_eq!(
        get_json(&host.gateway_url("/api/hello/health"))
            .await
            .unwrap()
            .0,
        200
    );
    assert!(!slow.is_finished());
    let (status, body) = slow.await.unwrap();
    assert_eq!(status, 504);
    assert_eq!(body["service"], "slow");
}

#[tokio::test]
async fn a_full_queue_is_answered_503() {
    let host = host_builder()
        .args(["--plugin-workers", "1", "--plugin-queue", "1"])
        .start()
        .await
        .unwrap();
    host.mount_plugin(plugin_library("slow"), "libslow.so")
        .await
        .unwrap();
    // One worker and one queue slot hold two requests; of six sent at once
    // the others find the queue full, whatever order they arrive in.
    let url = host.gateway_url("/api/slow/sleep?ms=1500");
    let requests: Vec<_> = (0..6)
        .map(|_| tokio::spawn(get_json_owned(url.clone())))
        .collect();
    let mut statuses = Vec::new();
    for request in requests {
        let (status, body) = request.await.unwrap();
        if status == 503 {
            assert!(
                body["error"].as_str().unwrap().contains("overloaded"),
                "{body}"
            );
        }
        statuses.push(status);
    }
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    assert!(
        statuses.iter().filter(|s| **s == 503).count() >= 3,
        "{statuses:?}"
    );
    assert!(statuses.contains(&200), "{statuses:?}");
}

async fn get_json_owned(url: String) -> (u16, Value) {
    get_json(&url).await.unwrap()
}

#[tokio::test]
async fn a_hundred_load_unload_cycles_do_not_grow_the_host() {
    let host = host_builder()
        .arg("--watch-debounce")
        .arg("10ms")
        .start()
        .await
        .unwrap();
    let mut warm_rss = 0;
    for cycle in 0..100 {
        if cycle == 10 {
            warm_rss = host.rss_kib().unwrap();
        }
        host.mount_plugin(plugin_library("hello"), "libhello.so")
            .await
            .unwrap();
        assert_eq!(
            get_json(&host.gateway_url("/api/hello/health"))
                .await
                .unwrap()
                .0,
            200
        );
        let mark = host.log_mark();
        host.remove_plugin("libhello.so").unwrap();
        host.wait_for_log_since(mark, &["plugin unloaded"])
            .await
            .unwrap();
    }
    let final_rss = host.rss_kib().unwrap();
    eprintln!("RSS after 10 cycles: {warm_rss} KiB, after 100: {final_rss} KiB");
    assert!(
        final_rss < warm_rss + 4 * 1024,
        "RSS grew from {warm_rss} KiB to {final_rss} KiB over 90 cycles"
    );
    assert_eq!(mapped_copies(&host, "libhello"), 0);
}

#[tokio::test]
async fn files_present_at_start_are_mounted_and_sigterm_unloads_them() {
    let dirs = Dirs::new().unwrap();
    std::fs::copy(plugin_library("hello"), dirs.plugins().join("libhello.so")).unwrap();
    let host = host_builder().dirs(dirs).start().await.unwrap();
    host.wait_for_log("plugin mounted").await.unwrap();
    assert_eq!(
        get_json(&host.gateway_url("/api/hello/health"))
            .await
            .unwrap()
            .0,
        200
    );
    let mut host = host;
    let status = host.stop().expect("running until stopped");
    assert!(status.success(), "exit status {status}");
    assert!(host.logs().contains("plugin unloaded"), "{}", host.logs());
}

#[tokio::test]
async fn a_file_written_slowly_in_chunks_is_loaded_once_complete() {
    // Pauses of 40 ms between writes, well under the debounce even on a
    // loaded machine.
    let host = host_builder()
        .args(["--watch-debounce", "500ms"])
        .start()
        .await
        .unwrap();
    let library = std::fs::read(plugin_library("hello")).unwrap();
    let path = host.plugins_dir().join("libhello.so");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&path).unwrap();
        for chunk in library.chunks(library.len() / 4 + 1) {
            file.write_all(chunk).unwrap();
            file.flush().unwrap();
            // Shorter than the debounce: the writer is still busy.
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }
    host.wait_for_log("plugin mounted").await.unwrap();
    assert_eq!(
        get_json(&host.gateway_url("/api/hello/health"))
            .await
            .unwrap()
            .0,
        200
    );
    // A later file is settled after any event the chunks could still have
    // pending: once it is mounted, no second load of the library can come.
    host.install_plugin(plugin_library("panicky"), "libpanicky.so")
        .unwrap();
    host.wait_for_log_since(0, &["plugin mounted", "plugin=panicky"])
        .await
        .unwrap();
    let logs = host.logs();
    assert_eq!(
        host.log_lines_since(0, &["plugin mounted", "plugin=hello"])
            .len(),
        1,
        "{logs}"
    );
    assert!(!logs.contains("refused"), "{logs}");
}

#[tokio::test]
async fn a_renamed_file_keeps_its_service_mounted() {
    let host = host_builder().start().await.unwrap();
    host.mount_plugin(plugin_library("hello"), "a.so")
        .await
        .unwrap();
    for (from, to) in [("a.so", "b.so"), ("b.so", "a.so")].repeat(3) {
        let mark = host.log_mark();
        std::fs::rename(host.plugins_dir().join(from), host.plugins_dir().join(to)).unwrap();
        host.wait_for_log_since(mark, &["plugin mounted", &format!("file={to}")])
            .await
            .unwrap();
        assert_eq!(
            get_json(&host.gateway_url("/api/hello/health"))
                .await
                .unwrap()
                .0,
            200
        );
    }
    assert!(!host.logs().contains("refused"), "{}", host.logs());

    // Renamed out of the directory: unmounted.
    let elsewhere = tempfile::tempdir().unwrap();
    let mark = host.log_mark();
    std::fs::rename(
        host.plugins_dir().join("a.so"),
        elsewhere.path().join("a.so"),
    )
    .unwrap();
    host.wait_for_log_since(mark, &["plugin unloaded", "plugin=hello"])
        .await
        .unwrap();
    assert_eq!(
        get_json(&host.gateway_url("/api/hello/health"))
            .await
            .unwrap()
            .0,
        404
    );
}

#[tokio::test]
async fn a_file_refused_for_its_name_loads_once_the_name_is_free() {
    let host = host_builder().start().await.unwrap();
    host.mount_plugin(plugin_library("hello"), "libhello.so")
        .await
        .unwrap();
    host.install_plugin(plugin_library("hello_dup"), "libhello_dup.so")
        .unwrap();
    host.wait_for_log_since(0, &["refused", "file=libhello_dup.so"])
        .await
        .unwrap();
    assert_eq!(
        get_json(&host.gateway_url("/api/hello/")).await.unwrap().1["service"],
        "Hello Service"
    );

    let mark = host.log_mark();
    host.remove_plugin("libhello.so").unwrap();
    host.wait_for_log_since(mark, &["plugin mounted", "file=libhello_dup.so"])
        .await
        .unwrap();
    let (status, body) = get_json(&host.gateway_url("/api/hello/")).await.unwrap();
    assert_eq!((status, body["variant"].as_str()), (200, Some("hello-dup")));
}
