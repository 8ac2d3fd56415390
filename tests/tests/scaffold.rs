//! `cargo xtask new-plugin`: the crate it writes passes its own unit test,
//! builds standalone against `plugin-api` by path, and the library it
//! builds is loaded and served by the host.

use std::path::{Path, PathBuf};
use std::process::Command;

use host_harness::http::get_json;
use host_harness::workspace::{host_binary, host_builder};
use serde_json::json;

/// Runs `command`, panicking with its output if it fails.
fn run(command: &mut Command) -> String {
    let output = command.output().expect("the command starts");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{command:?} failed:\n{text}");
    text
}

#[tokio::test]
async fn a_scaffolded_plugin_builds_standalone_and_is_served() {
    // The workspace's build (the harness's) holds the xtask binary and the
    // compiled dependencies the scaffold shares: same paths, same lock file.
    let profile_dir: PathBuf = host_binary().parent().unwrap().to_owned();
    let target_dir = profile_dir.parent().unwrap();
    let root = tempfile::tempdir().unwrap();
    let crate_dir = root.path().join("scaffold-probe");
    let said = run(Command::new(profile_dir.join("xtask"))
        .args(["new-plugin", "scaffold-probe", "--dir"])
        .arg(&crate_dir));
    assert!(said.contains("Created plugin `scaffold-probe`"), "{said}");
    assert!(
        std::fs::read_to_string(crate_dir.join("Cargo.toml"))
            .unwrap()
            .contains("[workspace]"),
        "standalone"
    );

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let in_crate = |args: &[&str]| {
        let mut command = Command::new(&cargo);
        command
            .args(args)
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(&crate_dir);
        command
    };
    let tested = run(&mut in_crate(&["test", "--quiet"]));
    assert!(tested.contains("1 passed"), "{tested}");
    run(&mut in_crate(&["build", "--quiet"]));
    let library = profile_dir.join("libscaffold_probe.so");
    assert!(Path::new(&library).exists());

    let host = host_builder().start().await.unwrap();
    host.mount_plugin(&library, "libscaffold_probe.so")
        .await
        .unwrap();
    let (status, body) = get_json(&host.gateway_url("/api/scaffold-probe/health"))
        .await
        .unwrap();
    assert_eq!(
        (status, body),
        (
            200,
            json!({"status": "healthy", "service": "scaffold-probe"})
        )
    );
    host.wait_for_log("scaffold-probe started").await.unwrap();
}
