//! The config file end to end: a host started with one uses it, below a
//! flag or an environment variable; a bad one refuses the start with status
//! 2 and the key's path; `check-config` judges one without starting; SIGHUP
//! applies a valid new one (a plugin pin here) and refuses an invalid one
//! whole.

use std::path::{Path, PathBuf};
use std::process::Command;

use host_harness::http::{client, get};
use host_harness::workspace::{host_binary, host_builder, plugin_library};
use host_harness::{Host, field};
use sha2::Digest as _;

async fn status(host: &Host, path: &str) -> u16 {
    get(&client(), &host.gateway_url(path)).await.unwrap().0
}

/// `sha256sum` of a file, as an operator pins it.
fn sha256_hex(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("read the library");
    sha2::Sha256::digest(&bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The shipped example at the repository's root.
fn example_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-host.example.toml")
}

#[tokio::test]
async fn a_host_uses_its_file_below_flags_and_the_environment() {
    const FILE: &str = "[plugins]\nworkers = 2\nqueue = 7\n\n[plugin.echo]\nworkers = 3\n";
    let host = host_builder().config(FILE).start().await.unwrap();
    let hello = host
        .mount_plugin(plugin_library("hello"), "libhello.so")
        .await
        .unwrap();
    assert_eq!(field(&hello, "workers"), Some("2"), "{hello}");
    assert_eq!(field(&hello, "queue"), Some("7"), "{hello}");
    let echo = host
        .mount_plugin(plugin_library("echo"), "libecho.so")
        .await
        .unwrap();
    assert_eq!(field(&echo, "workers"), Some("3"), "its own: {echo}");
    assert_eq!(field(&echo, "queue"), Some("7"), "{echo}");
    assert_eq!(status(&host, "/api/hello/hello").await, 200);
    drop(host);

    let host = host_builder()
        .config(FILE)
        .args(["--plugin-workers", "5"])
        .env("PLUGIN_QUEUE", "9")
        .start()
        .await
        .unwrap();
    let hello = host
        .mount_plugin(plugin_library("hello"), "libhello.so")
        .await
        .unwrap();
    assert_eq!(field(&hello, "workers"), Some("5"), "the flag: {hello}");
    assert_eq!(
        field(&hello, "queue"),
        Some("9"),
        "the environment: {hello}"
    );
}

#[tokio::test]
async fn a_bad_file_refuses_the_start_with_status_2_and_one_line_naming_the_key() {
    for (toml, expected) in [
        (
            "[gateway]\nlisten_on = \"127.0.0.1:1\"\n",
            "gateway.listen_on: unknown field `listen_on`",
        ),
        (
            "[plugins]\nworkers = 0\n",
            "plugins.workers: must be between 1 and 256",
        ),
        (
            "[plugin.hello]\nsha256 = \"not hex\"\n",
            "plugin.hello.sha256: not a SHA-256 digest",
        ),
        (
            "[registry]\nevict_after = \"1m\"\n",
            "registry.evict_after: must be longer than --heartbeat-ttl",
        ),
    ] {
        let refused = host_builder().config(toml).start_refused().await.unwrap();
        let output = refused.output.trim_end();
        assert_eq!(refused.status.code(), Some(2), "{toml}: {output}");
        let file = refused.dirs.config_file();
        assert_eq!(output.lines().count(), 1, "one line: {output}");
        assert!(
            output.starts_with(&format!("plugin-host: config file {}: ", file.display())),
            "{output}"
        );
        assert!(output.contains(expected), "{output}");
    }
}

#[tokio::test]
async fn check_config_says_ok_or_names_the_key_without_starting() {
    let example = example_file();
    let checked = Command::new(host_binary())
        .arg("check-config")
        .arg(&example)
        .output()
        .unwrap();
    assert_eq!(
        checked.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&checked.stdout),
        format!("ok: {}\n", example.display())
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[plugin.hello]\nworkers = 300\n").unwrap();
    let checked = Command::new(host_binary())
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&checked.stderr);
    assert_eq!(checked.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "plugin-host: config file {}: plugin.hello.workers: must be between 1 and 256\n",
            bad.display()
        )
    );
    assert!(checked.stdout.is_empty());
}

#[tokio::test]
async fn sighup_applies_a_pin_at_once_and_refuses_an_invalid_file_whole() {
    let library = plugin_library("hello");
    let digest = sha256_hex(&library);
    let wrong = "0".repeat(64);
    let host = host_builder()
        .config("[plugins]\nworkers = 2\n")
        .start()
        .await
        .unwrap();
    let file = host.config_file().display().to_string();
    host.mount_plugin(&library, "libhello.so").await.unwrap();
    assert_eq!(status(&host, "/api/hello/hello").await, 200);

    // A pin the mounted file does not match: refused and unmounted at once;
    // a key that needs a restart keeps its value, with a warning.
    let mark = host.log_mark();
    host.write_config(&format!(
        "[plugins]\nworkers = 2\ndrain_timeout = \"10s\"\n[plugin.hello]\nsha256 = \"{wrong}\"\n"
    ))
    .unwrap();
    host.sighup().unwrap();
    let refused = host
        .wait_for_log_since(mark, &["plugin file refused", "plugin=hello"])
        .await
        .unwrap();
    assert!(refused.contains("WARN"), "{refused}");
    assert_eq!(field(&refused, "file"), Some("libhello.so"), "{refused}");
    assert_eq!(
        field(&refused, "expected"),
        Some(wrong.as_str()),
        "{refused}"
    );
    assert_eq!(
        field(&refused, "actual"),
        Some(digest.as_str()),
        "{refused}"
    );
    host.wait_for_log_since(mark, &["plugin unmounted", "plugin=hello"])
        .await
        .unwrap();
    let restart = host
        .wait_for_log_since(mark, &["config key needs a restart"])
        .await
        .unwrap();
    assert!(restart.contains("WARN"), "{restart}");
    assert_eq!(field(&restart, "key"), Some("plugins.drain_timeout"));
    let reloaded = host
        .wait_for_log_since(mark, &["config reloaded"])
        .await
        .unwrap();
    assert_eq!(field(&reloaded, "file"), Some(file.as_str()), "{reloaded}");
    assert_eq!(status(&host, "/api/hello/hello").await, 404);

    // The right pin: the refused file is read again and served.
    let mark = host.log_mark();
    host.write_config(&format!(
        "[plugins]\nworkers = 2\n[plugin.hello]\nsha256 = \"{}\"\n",
        digest.to_uppercase()
    ))
    .unwrap();
    host.sighup().unwrap();
    host.wait_for_log_since(mark, &["plugin mounted", "plugin=hello"])
        .await
        .unwrap();
    host.wait_for_log_since(mark, &["config reloaded"])
        .await
        .unwrap();
    assert_eq!(status(&host, "/api/hello/hello").await, 200);

    // An invalid file that would also pin `hello` wrongly: refused whole,
    // so `hello` stays mounted under the old pin.
    let mark = host.log_mark();
    host.write_config(&format!(
        "[plugins]\nworkers = 0\n[plugin.hello]\nsha256 = \"{wrong}\"\n"
    ))
    .unwrap();
    host.sighup().unwrap();
    let refused = host
        .wait_for_log_since(mark, &["config reload refused"])
        .await
        .unwrap();
    assert!(refused.contains("ERROR"), "{refused}");
    assert_eq!(field(&refused, "file"), Some(file.as_str()), "{refused}");
    assert!(
        refused.contains("plugins.workers: must be between 1 and 256"),
        "{refused}"
    );
    // The plugin manager applies its events in order: once it mounted a
    // file installed after the refusal, it would have acted on a pin the
    // refused reload had let through.
    host.mount_plugin(plugin_library("echo"), "libecho.so")
        .await
        .unwrap();
    assert_eq!(
        host.log_lines_since(mark, &["plugin=hello"]),
        Vec::<String>::new(),
        "nothing of the refused file applied"
    );
    assert_eq!(status(&host, "/api/hello/hello").await, 200);
}

#[tokio::test]
async fn a_reloaded_override_applies_at_the_plugins_next_load() {
    let host = host_builder()
        .config("[plugins]\nworkers = 2\n")
        .start()
        .await
        .unwrap();
    host.mount_plugin(plugin_library("hello"), "libhello.so")
        .await
        .unwrap();

    let mark = host.log_mark();
    host.write_config("[plugins]\nworkers = 2\n[plugin.hello]\nworkers = 3\n")
        .unwrap();
    host.sighup().unwrap();
    let pending = host
        .wait_for_log_since(mark, &["plugin limits change at its next load"])
        .await
        .unwrap();
    assert_eq!(field(&pending, "plugin"), Some("hello"), "{pending}");
    assert_eq!(field(&pending, "workers"), Some("3"), "{pending}");
    host.wait_for_log_since(mark, &["config reloaded"])
        .await
        .unwrap();
    assert!(
        host.log_lines_since(mark, &["plugin mounted"]).is_empty(),
        "a reload does not restart a running plugin"
    );

    // Touching the file is its next load.
    std::fs::File::options()
        .write(true)
        .open(host.plugins_dir().join("libhello.so"))
        .unwrap()
        .set_modified(std::time::SystemTime::now())
        .unwrap();
    let mounted = host
        .wait_for_log_since(mark, &["plugin mounted", "plugin=hello"])
        .await
        .unwrap();
    assert_eq!(field(&mounted, "workers"), Some("3"), "{mounted}");
    assert_eq!(field(&mounted, "replaced"), Some("true"), "{mounted}");
    assert_eq!(status(&host, "/api/hello/hello").await, 200);
}

#[tokio::test]
async fn sighup_without_a_config_file_is_logged_and_the_host_keeps_serving() {
    let mut host = host_builder().start().await.unwrap();
    host.mount_plugin(plugin_library("hello"), "libhello.so")
        .await
        .unwrap();
    host.sighup().unwrap();
    let line = host.wait_for_log("no config file to reload").await.unwrap();
    assert!(line.contains("WARN"), "{line}");
    assert!(host.is_running());
    assert_eq!(status(&host, "/api/hello/hello").await, 200);
}
