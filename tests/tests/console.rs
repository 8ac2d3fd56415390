//! The web console and the API docs page in a real browser: the system's
//! Chromium, driven by Playwright (`console_browser.py`) from a throwaway
//! virtual environment. It needs `/usr/bin/chromium` (Debian's `chromium`,
//! which `.ci/run` installs) and pip access to PyPI, so it is `#[ignore]`d:
//! `cargo xtask test` runs it under `PLUGIN_HOST_REQUIRE_ALL=1`, where
//! anything missing is a failure; run alone with `--include-ignored`, a
//! missing piece is a printed `SKIPPED` line. Screenshots are saved under
//! `target/test-artifacts/console/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use host_harness::http::{client, get_json, registration};
use host_harness::require_or_skip;
use host_harness::workspace::{host_builder, plugin_library};
use integration_tests::python;
use integration_tests::upstream::{Upstream, register};
use serde_json::Value;

const CHROMIUM: &str = "/usr/bin/chromium";

/// Where the screenshots go: `target/test-artifacts/console`.
fn artifacts() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .join("test-artifacts/console")
}

fn chromium() -> Result<(), String> {
    if Path::new(CHROMIUM).exists() {
        Ok(())
    } else {
        Err(format!(
            "{CHROMIUM} is missing: install Debian's `chromium` (as .ci/run does)"
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs /usr/bin/chromium and PyPI (playwright); run with --include-ignored, or PLUGIN_HOST_REQUIRE_ALL=1 cargo xtask test"]
async fn the_console_shows_services_and_files_live_and_deregisters_in_a_browser() {
    const TEST: &str =
        "console::the_console_shows_services_and_files_live_and_deregisters_in_a_browser";
    if require_or_skip(TEST, chromium()).is_none() {
        return;
    }
    let tools =
        tokio::task::spawn_blocking(|| python::tools(Path::new(env!("CARGO_TARGET_TMPDIR"))))
            .await
            .expect("setting up python panicked");
    let Some(python) = require_or_skip(TEST, tools) else {
        return;
    };
    let host = host_builder().start().await.unwrap();
    host.mount_plugin(plugin_library("hello"), "libhello.so")
        .await
        .unwrap();
    let upstream = Upstream::start().await;
    let (status, answer) = register(&host, &registration("shop", upstream.addr())).await;
    assert_eq!(status, 201, "{answer}");
    // Two versions of one service, for the page's split form.
    let canaries = [Upstream::start().await, Upstream::start().await];
    for (canary, version) in canaries.iter().zip(["1.0.0", "2.0.0"]) {
        let mut body = registration("canary", canary.addr());
        body["version"] = version.into();
        let (status, answer) = register(&host, &body).await;
        assert_eq!(status, 201, "{answer}");
    }
    let mark = host.log_mark();
    std::fs::write(host.plugins_dir().join("broken.so"), "not a library").unwrap();
    host.wait_for_log_since(mark, &["plugin file refused", "file=broken.so"])
        .await
        .unwrap();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console_browser.py");
    let plugin_file = host.plugins_dir().join("libhello.so");
    let mark = host.log_mark();
    let registry = host.registry_url("");
    let gateway = host.gateway_url("");
    let shots = artifacts();
    let driven = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::task::spawn_blocking(move || {
            Command::new(python)
                .arg(script)
                .args([registry.as_str(), gateway.as_str()])
                .arg(&plugin_file)
                .args(["hello", "shop", "broken.so", "canary"])
                .arg(&shots)
                .output()
        }),
    )
    .await
    .expect("the browser run took over 90 s")
    .expect("the browser run panicked")
    .expect("run python");
    let stdout = String::from_utf8_lossy(&driven.stdout);
    let stderr = String::from_utf8_lossy(&driven.stderr);
    assert!(
        driven.status.success(),
        "the browser check failed (screenshots in {}):\n{stdout}\n{stderr}\nhost:\n{}",
        artifacts().display(),
        host.logs()
    );

    // What the page showed is what the host did.
    host.wait_for_log_since(mark, &["plugin unmounted", "plugin=hello"])
        .await
        .unwrap();
    host.wait_for_log_since(
        mark,
        &["remote service instances deregistered", "service=shop"],
    )
    .await
    .unwrap();
    let (status, _) = get_json(&host.registry_url("/api/registry/services/shop"))
        .await
        .unwrap();
    assert_eq!(status, 404, "shop is gone from the registry");
    let (status, split) = get_json(&host.registry_url("/api/registry/services/canary/traffic"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{split}");
    assert_eq!(
        split["traffic"],
        serde_json::json!({"weights": {"1.0.0": 90, "2.0.0": 10}, "sticky": {"header": "X-User-Id"}}),
        "the split the page set"
    );
    for shot in [
        "console-listed.png",
        "console-split.png",
        "docs.png",
        "console-after.png",
    ] {
        let size = std::fs::metadata(artifacts().join(shot)).map_or(0, |meta| meta.len());
        assert!(size > 1000, "screenshot {shot} saved");
    }
}

/// `printf %s admin | sha256sum` and `printf %s team-a | sha256sum`.
const TOKENS: &str = r#"
[auth.registry]
admin_token_sha256 = "8c6976e5b5410415bde908bd4dee15dfb167a9c873fc4bb8a81f6f2ab448a918"

[[auth.registry.tokens]]
id = "team-a"
sha256 = "96c2886c51d1dfb4901d9feccff66213ce3e27406282ff6f602a4258a33dacec"
names = ["team-a-*"]
"#;

/// What the console's Deregister does with the admin token: the service
/// goes whoever registered it; any other caller is refused and nothing
/// changes.
#[tokio::test]
async fn the_admin_token_removes_a_service_whoever_registered_it() {
    let host = host_builder().config(TOKENS).start().await.unwrap();
    let upstream = Upstream::start().await;
    let client = client();
    let registered = client
        .post(host.registry_url("/api/registry/register"))
        .bearer_auth("team-a")
        .json(&registration("team-a-shop", upstream.addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201);
    let remove = |token: Option<&'static str>, name: &'static str| {
        let mut request =
            client.delete(host.registry_url(&format!("/api/registry/admin/services/{name}")));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let answer = request.send().await.unwrap();
            let status = answer.status().as_u16();
            (status, answer.json::<Value>().await.unwrap())
        }
    };
    let (status, answer) = remove(None, "team-a-shop").await;
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = remove(Some("team-a"), "team-a-shop").await;
    assert_eq!(
        status, 403,
        "even the owner's token is not the admin's: {answer}"
    );
    assert!(
        answer["error"].as_str().unwrap().contains("admin"),
        "{answer}"
    );
    let (status, _) = get_json(&host.gateway_url("/api/team-a-shop/hello"))
        .await
        .unwrap();
    assert_eq!(status, 200, "still routed");

    let (status, answer) = remove(Some("admin"), "team-a-shop").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["service_id"], "team-a-shop", "{answer}");
    assert_eq!(answer["status"], "deregistered", "{answer}");
    let (status, _) = get_json(&host.gateway_url("/api/team-a-shop/hello"))
        .await
        .unwrap();
    assert_eq!(status, 404, "no longer routed");
    let (status, answer) = remove(Some("admin"), "team-a-shop").await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(answer["service"], "team-a-shop");
}
