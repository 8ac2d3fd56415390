//! The artifacts the tests run (`plugin-host` and the plugin libraries),
//! built fresh from the sources before the first use in each test process.
//!
//! A test binary may be newer than the binary it starts: `cargo test`
//! builds test targets, not the host's `[[bin]]` nor the plugins'
//! `cdylib`s. So the first call here runs `cargo build --workspace` for
//! the test binary's own profile and target directory (a no-op of about a
//! second when nothing changed), and every later call reuses it. `cargo
//! test` holds its build lock only while compiling, not while the tests
//! run, so the nested build does not wait on it.
//!
//! The host is built with its `etcd` feature whenever `protoc` is found
//! ([`etcd_feature`]), the rule `cargo xtask test` follows too, so the two
//! builds never undo each other's.
//!
//! Test-only: a failure here panics with cargo's output, as a test that
//! cannot have its artifacts cannot run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::{Host, HostBuilder};

/// `<target>/<profile>` after a fresh build of the workspace.
fn built_profile_dir() -> &'static Path {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BUILT.get_or_init(build_workspace) {
        Ok(dir) => dir,
        Err(error) => panic!("{error}"),
    }
}

fn build_workspace() -> Result<PathBuf, String> {
    // A test binary lives in `<target>/<profile>/deps/`.
    let exe = std::env::current_exe().map_err(|error| format!("test binary path: {error}"))?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("{} is not in <target>/<profile>/deps", exe.display()))?;
    let target_dir = profile_dir.parent().ok_or("no target directory")?;
    // Cargo names the `dev` profile's directory `debug`.
    let profile = match profile_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") => "dev",
        Some(name) => name,
        None => return Err(format!("no profile in {}", profile_dir.display())),
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut build = Command::new(&cargo);
    build.args(["build", "--workspace", "--quiet", "--profile", profile]);
    if etcd_feature().is_ok() {
        build.args(["--features", "plugin-host/etcd"]);
    }
    let output = build
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(&root)
        .output()
        .map_err(|error| format!("cannot run {cargo}: {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "`cargo build --workspace --profile {profile}` failed ({}), so the tests would run \
             stale or missing binaries:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(profile_dir.to_owned())
}

/// Whether the host is built with its etcd store (`--features etcd`):
/// `Ok` when `protoc` is found (`$PROTOC`, or on the `PATH`), which
/// etcd-client's build needs; otherwise why not, for a test's `SKIPPED`
/// line. `cargo xtask test` decides by the same rule.
pub fn etcd_feature() -> Result<(), String> {
    let found = match std::env::var_os("PROTOC") {
        Some(protoc) => Path::new(&protoc).is_file(),
        None => std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|dir| dir.join("protoc").is_file())
        }),
    };
    if found {
        Ok(())
    } else {
        Err(
            "no protoc (Debian's protobuf-compiler), so the host is built without its etcd store"
                .to_owned(),
        )
    }
}

/// A file cargo built for this workspace, freshly.
fn artifact(file: &str) -> PathBuf {
    let path = built_profile_dir().join(file);
    assert!(
        path.exists(),
        "{} is missing after `cargo build --workspace`",
        path.display()
    );
    path
}

/// The freshly built `plugin-host` binary.
pub fn host_binary() -> PathBuf {
    artifact("plugin-host")
}

/// A host running the freshly built `plugin-host`.
pub fn host_builder() -> HostBuilder {
    Host::builder(Command::new(host_binary()))
}

/// The freshly built library of the plugin crate whose lib name is `lib`
/// (`hello` -> `libhello.so`).
pub fn plugin_library(lib: &str) -> PathBuf {
    artifact(&format!("lib{lib}.so"))
}
