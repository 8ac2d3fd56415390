//! What the loader refuses before running any plugin code beyond the entry
//! point, and how it says why.

use host_harness::Host;
use host_harness::http::client;
use host_harness::workspace::{host_binary, host_builder, plugin_library};

/// The loaded `hello` still answers: a refusal leaves what is mounted alone.
async fn hello_answers(host: &Host) {
    let answer = client()
        .get(host.gateway_url("/api/hello/"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
}

#[tokio::test]
async fn a_plugin_built_against_another_layout_is_refused_by_its_fingerprint() {
    let host = host_builder().start().await.unwrap();
    host.mount_plugin(plugin_library("hello"), "libhello.so")
        .await
        .unwrap();

    let mark = host.log_mark();
    host.install_plugin(plugin_library("bad_layout"), "libbad_layout.so")
        .unwrap();
    let line = host
        .wait_for_log_since(mark, &["refused", "file=libbad_layout.so"])
        .await
        .unwrap();
    for part in [
        "ABI layout mismatch",
        "the plugin's plugin-api types have layout fingerprint 0x",
        "this host's 0x",
        "rebuild the plugin against this host's plugin-api",
    ] {
        assert!(line.contains(part), "{part:?} missing from: {line}");
    }
    // The two numbers differ: the plugin's is not the host's.
    let numbers: Vec<&str> = line.split("0x").skip(1).map(|rest| &rest[..16]).collect();
    assert_eq!(numbers.len(), 2, "{line}");
    assert_ne!(numbers[0], numbers[1], "{line}");

    assert!(
        !host.maps().unwrap().contains("libbad_layout"),
        "{}",
        host.maps().unwrap()
    );
    hello_answers(&host).await;
}

#[tokio::test]
async fn an_executable_is_refused_naming_it_an_executable() {
    let host = host_builder().start().await.unwrap();
    host.mount_plugin(plugin_library("hello"), "libhello.so")
        .await
        .unwrap();

    let mark = host.log_mark();
    // The host binary is a position-independent executable: ELF type
    // ET_DYN, like a library, so only its program interpreter gives it away.
    std::fs::copy(host_binary(), host.plugins_dir().join("exe.so")).unwrap();
    let line = host
        .wait_for_log_since(mark, &["refused", "file=exe.so"])
        .await
        .unwrap();
    assert!(
        line.contains(
            "not a shared object for this host: an executable (PIE), not a shared library"
        ),
        "{line}"
    );
    assert!(!line.contains("dlopen"), "refused before dlopen: {line}");
    assert!(
        !host.maps().unwrap().contains("exe."),
        "{}",
        host.maps().unwrap()
    );
    hello_answers(&host).await;
}

#[tokio::test]
async fn a_plugin_built_before_the_host_context_is_refused_with_what_to_do() {
    let host = host_builder().start().await.unwrap();
    host.mount_plugin(plugin_library("hello"), "libhello.so")
        .await
        .unwrap();

    let mark = host.log_mark();
    host.install_plugin(plugin_library("old_abi"), "libold_abi.so")
        .unwrap();
    let line = host
        .wait_for_log_since(mark, &["refused", "file=libold_abi.so"])
        .await
        .unwrap();
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains(&format!(
            "ABI version mismatch: the plugin has version 3, this host speaks version {}; rebuild the plugin against this host's plugin-api",
            plugin_api::ffi::ABI_VERSION
        )),
        "{line}"
    );
    assert!(
        !host.maps().unwrap().contains("libold_abi"),
        "{}",
        host.maps().unwrap()
    );
    hello_answers(&host).await;
}
