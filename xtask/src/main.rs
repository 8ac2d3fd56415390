//! Project automation, in Rust so that it runs wherever cargo does.
//!
//! - `cargo xtask run [HOST ARGS...]`: builds the host and the example
//!   plugins in release mode, copies the plugins into `plugins-dir/`, and
//!   runs the host (gateway on 127.0.0.1:8000, registry on 127.0.0.1:8001
//!   unless HOST ARGS say otherwise).
//! - `cargo xtask test`: builds every crate of the workspace (the host, the
//!   example and test plugins) and runs every test; with
//!   `PLUGIN_HOST_REQUIRE_ALL=1`, the ignored ones (they need python3 and
//!   PyPI) too. The host is built with its `etcd` feature when `protoc`
//!   is found (required under `PLUGIN_HOST_REQUIRE_ALL=1`).
//! - `cargo xtask new-plugin <name> [--dir <dir>]`: writes a plugin crate
//!   (a health route and its unit test) in `<dir>` (default `./<name>`),
//!   standalone: it depends on this checkout's `plugin-api` by path, and
//!   starts from the workspace's `Cargo.lock`, the versions the host was
//!   tested with.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// The example plugins `run` installs: (package, library file).
const EXAMPLE_PLUGINS: &[(&str, &str)] = &[
    ("hello", "libhello.so"),
    ("demo-service", "libdemo_service.so"),
    ("analytics-service", "libanalytics_service.so"),
    ("notification-service", "libnotification_service.so"),
];

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let task = args.next();
    // `cargo xtask run -- --help` and `cargo xtask run --help` mean the same.
    let rest: Vec<String> = args.skip_while(|arg| arg == "--").collect();
    let result = match task.as_deref() {
        Some("run") => run(&rest),
        Some("test") => test(&rest),
        Some("new-plugin") => new_plugin(&rest),
        _ => {
            eprintln!(
                "usage: cargo xtask run [HOST ARGS...] | cargo xtask test [CARGO TEST ARGS...] | cargo xtask new-plugin <name> [--dir <dir>]"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_owned()
}

fn cargo(args: &[&str]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`cargo {}` failed ({status})", args.join(" ")))
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn run(host_args: &[String]) -> Result<(), String> {
    let mut build = vec!["build", "--release", "-p", "plugin-host"];
    for (package, _) in EXAMPLE_PLUGINS {
        build.extend(["-p", package]);
    }
    cargo(&build)?;
    let release = target_dir().join("release");
    let plugins_dir = workspace_root().join("plugins-dir");
    // The host refuses plugin files and directories that group or others may
    // write (`--plugin-file-checks strict`); under a umask of 002 both the
    // checkout and cargo's output would be group-writable.
    without_group_and_other_write(&plugins_dir)?;
    for (_, library) in EXAMPLE_PLUGINS {
        // Write then rename: the host may already be watching the directory,
        // and must never see a half-written library.
        let staged = plugins_dir.join(format!(".{library}.partial"));
        std::fs::copy(release.join(library), &staged)
            .map_err(|e| format!("copying {library} into {}: {e}", plugins_dir.display()))?;
        without_group_and_other_write(&staged)?;
        std::fs::rename(&staged, plugins_dir.join(library))
            .map_err(|e| format!("installing {library}: {e}"))?;
    }
    let status = Command::new(release.join("plugin-host"))
        .args(host_args)
        .current_dir(workspace_root())
        .status()
        .map_err(|e| format!("cannot start plugin-host: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("plugin-host exited with {status}"))
    }
}

/// Clears the group and other write bits of `path`, if set.
fn without_group_and_other_write(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let failed = |e| format!("setting the permissions of {}: {e}", path.display());
    let mode = std::fs::metadata(path)
        .map_err(failed)?
        .permissions()
        .mode();
    if mode & 0o022 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & !0o022))
            .map_err(failed)?;
    }
    Ok(())
}

fn test(cargo_test_args: &[String]) -> Result<(), String> {
    let require_all = std::env::var("PLUGIN_HOST_REQUIRE_ALL").is_ok_and(|value| value == "1");
    // The etcd store needs protoc to build; without it the host is built
    // without the store and the cluster tests say SKIPPED, unless nothing
    // may go unchecked. The test harness's own build follows the same rule
    // (`host_harness::workspace::etcd_feature`).
    let etcd = protoc_found();
    if !etcd && require_all {
        return Err(
            "PLUGIN_HOST_REQUIRE_ALL=1 and no protoc: install protobuf-compiler (`.ci/run` does) so the etcd store is built and tested".to_owned(),
        );
    }
    let features: &[&str] = if etcd {
        &["--features", "plugin-host/etcd"]
    } else {
        &[]
    };
    // The integration tests load the plugin libraries and start the host
    // binary, so every crate must be built before they run.
    let mut build = vec!["build", "--workspace"];
    build.extend(features);
    cargo(&build)?;
    let mut args = vec!["test", "--workspace"];
    args.extend(features);
    args.extend(cargo_test_args.iter().map(String::as_str));
    // Under PLUGIN_HOST_REQUIRE_ALL=1 nothing may go unchecked: the tests
    // ignored for what they need from the machine run too, and fail if it
    // is missing.
    if require_all {
        if !args.contains(&"--") {
            args.push("--");
        }
        args.push("--include-ignored");
    }
    cargo(&args)
}

/// Whether `protoc` is found: `$PROTOC`, or on the `PATH`.
fn protoc_found() -> bool {
    match std::env::var_os("PROTOC") {
        Some(protoc) => Path::new(&protoc).is_file(),
        None => std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|dir| dir.join("protoc").is_file())
        }),
    }
}

/// The scaffold's files, `{name}` and `{plugin_api}` to be replaced.
const TEMPLATE_CARGO_TOML: &str = include_str!("../templates/Cargo.toml");
const TEMPLATE_LIB_RS: &str = include_str!("../templates/lib.rs");

fn new_plugin(args: &[String]) -> Result<(), String> {
    let (name, dir) = match args {
        [name] => (name, PathBuf::from(name)),
        [name, flag, dir] if flag == "--dir" => (name, PathBuf::from(dir)),
        _ => return Err("usage: cargo xtask new-plugin <name> [--dir <dir>]".to_owned()),
    };
    // The host's rule for service names (`service::validate`).
    let valid = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !valid {
        return Err(format!(
            "`{name}` is not a service name: lower-case letters, digits and `-`, not starting with `-`"
        ));
    }
    if dir.exists() {
        return Err(format!("{} already exists", dir.display()));
    }
    let plugin_api = workspace_root().join("plugin-api");
    let fill = |template: &str| {
        template
            .replace("{name}", name)
            .replace("{plugin_api}", &plugin_api.to_string_lossy())
    };
    let write = |path: &Path, text: &str| {
        std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
    };
    std::fs::create_dir_all(dir.join("src"))
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    write(&dir.join("Cargo.toml"), &fill(TEMPLATE_CARGO_TOML))?;
    write(&dir.join("src/lib.rs"), &fill(TEMPLATE_LIB_RS))?;
    write(&dir.join(".gitignore"), "/target\n")?;
    // The versions the host was built and tested with; cargo drops what
    // the plugin does not use at its first build.
    std::fs::copy(workspace_root().join("Cargo.lock"), dir.join("Cargo.lock"))
        .map_err(|e| format!("copying Cargo.lock: {e}"))?;
    let library = format!("lib{}.so", name.replace('-', "_"));
    println!(
        "Created plugin `{name}` in {}.\nBuild it with `cargo build --release` there, then copy target/release/{library} into the host's plugins directory.",
        dir.display()
    );
    Ok(())
}
