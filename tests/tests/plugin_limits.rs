//! What a greedy plugin may take: lines of the host's log (panic messages,
//! rate-limited per plugin) and worker threads (`--max-plugin-threads`).

use std::time::Instant;

use futures_util::future::join_all;
use host_harness::http::{client, get};
use host_harness::workspace::{host_builder, plugin_library};
use host_harness::{Host, field};

/// The lines of `plugin mounted` for `plugin` since `mark`, waited for.
async fn mounted(host: &Host, mark: usize, plugin: &str) -> String {
    host.wait_for_log_since(mark, &["plugin mounted", &format!("plugin={plugin}")])
        .await
        .unwrap()
}

async fn status(host: &Host, path: &str) -> u16 {
    get(&client(), &host.gateway_url(path)).await.unwrap().0
}

#[tokio::test]
async fn handler_panics_are_logged_by_the_host_rate_limited_with_the_plugin_name() {
    const REQUESTS: usize = 200;
    let host = host_builder().start().await.unwrap();
    host.install_plugin(plugin_library("panicky"), "libpanicky.so")
        .unwrap();
    mounted(&host, 0, "panicky").await;

    let mark = host.log_mark();
    let started = Instant::now();
    let client = client();
    let url = host.gateway_url("/api/panicky/boom");
    for _ in 0..REQUESTS / 20 {
        let answers = join_all((0..20).map(|_| get(&client, &url))).await;
        for answer in answers {
            assert_eq!(answer.unwrap().0, 500);
        }
    }
    let seconds = started.elapsed().as_secs() as usize + 1;
    // Unloading sums up whatever the rate limit held back.
    host.remove_plugin("libpanicky.so").unwrap();
    host.wait_for_log_since(mark, &["plugin unloaded", "plugin=panicky"])
        .await
        .unwrap();

    let logs = host.logs();
    assert!(
        !logs.contains("thread '<unnamed>' panicked"),
        "the plugin's own panic hook printed:\n{logs}"
    );
    let panics = host.log_lines_since(mark, &["plugin handler panicked"]);
    assert!(!panics.is_empty(), "{logs}");
    assert!(
        panics.len() <= 5 * seconds,
        "{} panic lines in {seconds} s:\n{logs}",
        panics.len()
    );
    for line in &panics {
        assert!(line.contains("WARN"), "{line}");
        assert_eq!(field(line, "plugin"), Some("panicky"), "{line}");
        assert!(
            line.contains("handler panicked at tests/plugins/panicky/src/lib.rs:"),
            "{line}"
        );
        assert!(line.contains(": boom"), "{line}");
    }
    let suppressed: usize = host
        .log_lines_since(
            mark,
            &["suppressed plugin panic messages", "plugin=panicky"],
        )
        .iter()
        .map(|line| field(line, "suppressed").unwrap().parse::<usize>().unwrap())
        .sum();
    assert_eq!(panics.len() + suppressed, REQUESTS, "{logs}");
}

#[tokio::test]
async fn the_plugin_thread_limit_degrades_then_refuses_and_a_removal_frees_its_share() {
    let host = host_builder()
        .args(["--plugin-workers", "2", "--max-plugin-threads", "5"])
        .start()
        .await
        .unwrap();
    for (lib, plugin) in [("hello", "hello"), ("echo", "echo")] {
        let mark = host.log_mark();
        host.install_plugin(plugin_library(lib), &format!("lib{lib}.so"))
            .unwrap();
        let line = mounted(&host, mark, plugin).await;
        assert_eq!(field(&line, "workers"), Some("2"), "{line}");
    }

    // One thread left: the third plugin runs with it, and says so.
    let mark = host.log_mark();
    host.install_plugin(plugin_library("panicky"), "libpanicky.so")
        .unwrap();
    let line = mounted(&host, mark, "panicky").await;
    assert_eq!(field(&line, "workers"), Some("1"), "{line}");
    let warning = host.log_lines_since(mark, &["WARN", "plugin thread limit reached"]);
    assert_eq!(warning.len(), 1, "{}", host.logs());
    assert_eq!(field(&warning[0], "max_plugin_threads"), Some("5"));
    assert_eq!(status(&host, "/api/panicky/ok").await, 200);

    // None left: refused, naming the limit; the others serve on.
    let mark = host.log_mark();
    host.install_plugin(plugin_library("slow"), "libslow.so")
        .unwrap();
    let line = host
        .wait_for_log_since(mark, &["plugin file refused", "file=libslow.so"])
        .await
        .unwrap();
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("no plugin worker thread left: 5 of --max-plugin-threads=5 are in use"),
        "{line}"
    );
    assert_eq!(status(&host, "/api/slow/sleep?ms=1").await, 404);
    assert_eq!(status(&host, "/api/hello/health").await, 200);

    // A removal gives its workers back once they are joined.
    let mark = host.log_mark();
    host.remove_plugin("libhello.so").unwrap();
    host.wait_for_log_since(mark, &["plugin unloaded", "plugin=hello"])
        .await
        .unwrap();
    let mark = host.log_mark();
    host.install_plugin(plugin_library("slow"), "libslow.so")
        .unwrap();
    let line = mounted(&host, mark, "slow").await;
    assert_eq!(field(&line, "workers"), Some("2"), "{line}");
    assert_eq!(status(&host, "/api/slow/sleep?ms=1").await, 200);
}

#[tokio::test]
async fn a_swap_at_the_plugin_thread_limit_still_happens() {
    let host = host_builder()
        .args(["--plugin-workers", "2", "--max-plugin-threads", "4"])
        .start()
        .await
        .unwrap();
    host.install_plugin(plugin_library("hello"), "libhello.so")
        .unwrap();
    mounted(&host, 0, "hello").await;
    host.install_plugin(plugin_library("swap_a"), "libswap.so")
        .unwrap();
    let line = mounted(&host, 0, "swap").await;
    assert_eq!(field(&line, "workers"), Some("2"), "{line}");

    // Every thread is taken, yet the new version replaces the old one with
    // the old one's share.
    let mark = host.log_mark();
    host.install_plugin(plugin_library("swap_b"), "libswap.so")
        .unwrap();
    let line = mounted(&host, mark, "swap").await;
    assert_eq!(field(&line, "workers"), Some("2"), "{line}");
    assert_eq!(field(&line, "replaced"), Some("true"), "{line}");
    assert!(!host.logs().contains("refused"), "{}", host.logs());
}
