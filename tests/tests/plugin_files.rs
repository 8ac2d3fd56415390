//! Which plugin files the host trusts (`--plugin-file-checks`): a file or
//! directory others may write, and symlinks whose targets are not checked,
//! are refused with one WARN line naming the file and the rule; what is
//! mounted stays mounted.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use host_harness::Host;
use host_harness::http::get_json;
use host_harness::workspace::{host_builder, plugin_library};

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Copies `hello` into the plugins directory as `libhello.so` with `mode`
/// already set: written under a name the host ignores, then renamed in.
fn install_hello_with_mode(host: &Host, mode: u32) {
    let partial = host.plugins_dir().join(".libhello.so.partial");
    std::fs::copy(plugin_library("hello"), &partial).unwrap();
    chmod(&partial, mode);
    std::fs::rename(&partial, host.plugins_dir().join("libhello.so")).unwrap();
}

async fn status(host: &Host, path: &str) -> u16 {
    get_json(&host.gateway_url(path)).await.unwrap().0
}

/// Waits for the refusal of `file` after `mark`, checks it is the only
/// WARN line about it, and returns it.
async fn refusal(host: &Host, mark: usize, file: &str) -> String {
    let file_field = format!("file={file}");
    let line = host
        .wait_for_log_since(mark, &["plugin file refused", &file_field])
        .await
        .unwrap();
    assert!(line.contains("WARN"), "{line}");
    assert_eq!(
        host.log_lines_since(mark, &["WARN", &file_field]).len(),
        1,
        "{}",
        host.logs()
    );
    line
}

#[tokio::test]
async fn a_world_writable_plugin_file_is_refused_and_loads_once_chmod_o_w() {
    let host = host_builder().start().await.unwrap();
    install_hello_with_mode(&host, 0o757);
    let line = refusal(&host, 0, "libhello.so").await;
    assert!(
        line.contains("is writable by others (mode 0757): a plugin file and its directory must be writable by their owner only"),
        "{line}"
    );
    assert_eq!(status(&host, "/api/hello/health").await, 404);

    // The chmod alone is the change the host reacts to.
    let mark = host.log_mark();
    chmod(&host.plugins_dir().join("libhello.so"), 0o755);
    host.wait_for_log_since(mark, &["plugin mounted", "plugin=hello"])
        .await
        .unwrap();
    assert_eq!(status(&host, "/api/hello/health").await, 200);

    // Made group-writable while mounted: refused, and the loaded version
    // keeps serving.
    let mark = host.log_mark();
    chmod(&host.plugins_dir().join("libhello.so"), 0o775);
    let line = refusal(&host, mark, "libhello.so").await;
    assert!(line.contains("is writable by group (mode 0775)"), "{line}");
    assert_eq!(status(&host, "/api/hello/health").await, 200);
}

#[tokio::test]
async fn without_file_checks_a_world_writable_file_loads() {
    let host = host_builder()
        .args(["--plugin-file-checks", "off"])
        .start()
        .await
        .unwrap();
    install_hello_with_mode(&host, 0o777);
    host.wait_for_log_since(0, &["plugin mounted", "plugin=hello"])
        .await
        .unwrap();
    assert_eq!(status(&host, "/api/hello/health").await, 200);
}

#[tokio::test]
async fn a_symlink_to_a_library_in_a_safe_directory_is_loaded() {
    let host = host_builder().start().await.unwrap();
    // `tempfile` makes it 0700, owned by the test's (the host's) user.
    let elsewhere = tempfile::tempdir().unwrap();
    let library = elsewhere.path().join("libhello.so");
    std::fs::copy(plugin_library("hello"), &library).unwrap();
    chmod(&library, 0o755);
    symlink(&library, host.plugins_dir().join("libhello.so")).unwrap();
    host.wait_for_log_since(0, &["plugin mounted", "plugin=hello"])
        .await
        .unwrap();
    assert_eq!(status(&host, "/api/hello/health").await, 200);
    assert!(!host.logs().contains("refused"), "{}", host.logs());
}

#[tokio::test]
async fn a_symlink_into_a_world_writable_directory_is_refused() {
    let host = host_builder().start().await.unwrap();
    let shared = tempfile::tempdir().unwrap();
    chmod(shared.path(), 0o777);
    let library = shared.path().join("libhello.so");
    std::fs::copy(plugin_library("hello"), &library).unwrap();
    chmod(&library, 0o755);
    symlink(&library, host.plugins_dir().join("libhello.so")).unwrap();
    let line = refusal(&host, 0, "libhello.so").await;
    assert!(
        line.contains(&format!(
            "symlink target's directory {} is writable by group and others (mode 0777)",
            shared.path().canonicalize().unwrap().display()
        )),
        "{line}"
    );
    assert_eq!(status(&host, "/api/hello/health").await, 404);
}

#[tokio::test]
async fn a_symlink_to_etc_passwd_is_refused_naming_the_target() {
    let mut host = host_builder().start().await.unwrap();
    symlink("/etc/passwd", host.plugins_dir().join("libpasswd.so")).unwrap();
    let line = refusal(&host, 0, "libpasswd.so").await;
    assert!(
        line.contains("symlink to /etc/passwd: not an ELF shared object (bad magic bytes)"),
        "{line}"
    );
    assert!(host.is_running());
    // The host goes on loading files.
    install_hello_with_mode(&host, 0o755);
    host.wait_for_log_since(0, &["plugin mounted", "plugin=hello"])
        .await
        .unwrap();
}

#[tokio::test]
async fn a_world_writable_plugins_directory_refuses_its_files_until_fixed() {
    let host = host_builder().start().await.unwrap();
    host.install_plugin(plugin_library("echo"), "libecho.so")
        .unwrap();
    host.wait_for_log_since(0, &["plugin mounted", "plugin=echo"])
        .await
        .unwrap();

    // The directory's own chmod has every file looked at again: the
    // mounted one is refused, and keeps serving.
    let mark = host.log_mark();
    chmod(&host.plugins_dir(), 0o757);
    let line = refusal(&host, mark, "libecho.so").await;
    assert!(
        line.contains(&format!(
            "plugins directory {} is writable by others (mode 0757)",
            host.plugins_dir().canonicalize().unwrap().display()
        )),
        "{line}"
    );
    assert_eq!(status(&host, "/api/echo/").await, 200);

    let mark = host.log_mark();
    host.install_plugin(plugin_library("hello"), "libhello.so")
        .unwrap();
    let line = refusal(&host, mark, "libhello.so").await;
    assert!(line.contains("plugins directory"), "{line}");
    assert_eq!(status(&host, "/api/hello/health").await, 404);

    let mark = host.log_mark();
    chmod(&host.plugins_dir(), 0o755);
    host.wait_for_log_since(mark, &["plugin mounted", "plugin=hello"])
        .await
        .unwrap();
    assert_eq!(status(&host, "/api/hello/health").await, 200);
}
