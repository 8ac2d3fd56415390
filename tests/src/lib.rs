//! Test harness: the real `plugin-host` binary on ephemeral loopback ports,
//! each host with directories of its own, and the plugin libraries this
//! workspace builds.
//!
//! ```no_run
//! # async fn example() {
//! use integration_tests::{Host, client};
//! let host = Host::start().await;
//! host.install_plugin("hello", "libhello.so");
//! host.wait_for_log("plugin mounted").await;
//! let answer = client().get(host.gateway_url("/api/hello/hello")).send().await.unwrap();
//! assert_eq!(answer.status(), 200);
//! # }
//! ```

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a test waits for something the host should do at once.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The directory cargo put this workspace's binaries and libraries in.
fn artifacts_dir() -> PathBuf {
    // The test binary lives in `<target>/<profile>/deps/`.
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary is in <target>/<profile>/deps")
        .to_owned()
}

fn artifact(file: &str) -> PathBuf {
    let path = artifacts_dir().join(file);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`, which `cargo xtask test` does)",
        path.display()
    );
    path
}

/// The `plugin-host` binary.
pub fn host_binary() -> PathBuf {
    artifact("plugin-host")
}

/// The library cargo built for the plugin crate whose lib name is `lib`
/// (`hello` -> `libhello.so`).
pub fn plugin_library(lib: &str) -> PathBuf {
    artifact(&format!("lib{lib}.so"))
}

/// An HTTP client that talks to loopback directly (no proxy from the
/// environment).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("HTTP client")
}

/// A plugins directory and a data directory, kept across restarts of a
/// host.
#[derive(Debug)]
pub struct Dirs {
    root: tempfile::TempDir,
}

impl Dirs {
    /// Fresh, empty directories.
    pub fn new() -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(root.path().join("plugins")).expect("plugins dir");
        Self { root }
    }

    /// The watched plugins directory.
    pub fn plugins(&self) -> PathBuf {
        self.root.path().join("plugins")
    }

    /// The host's data directory.
    pub fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }
}

impl Default for Dirs {
    fn default() -> Self {
        Self::new()
    }
}

/// Options for starting a host.
#[derive(Debug, Default)]
pub struct HostBuilder {
    args: Vec<String>,
    dirs: Option<Dirs>,
    gateway_addr: Option<String>,
    registry_addr: Option<String>,
}

impl HostBuilder {
    /// Adds a command-line argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds several command-line arguments.
    pub fn args<const N: usize>(mut self, args: [&str; N]) -> Self {
        self.args.extend(args.iter().map(|arg| (*arg).to_owned()));
        self
    }

    /// Uses existing directories (e.g. from a host that was killed).
    pub fn dirs(mut self, dirs: Dirs) -> Self {
        self.dirs = Some(dirs);
        self
    }

    /// Fixed addresses instead of ephemeral ports.
    pub fn addrs(mut self, gateway: &str, registry: &str) -> Self {
        self.gateway_addr = Some(gateway.to_owned());
        self.registry_addr = Some(registry.to_owned());
        self
    }

    /// Starts the host and waits until it listens.
    pub async fn start(self) -> Host {
        let dirs = self.dirs.unwrap_or_default();
        let mut child = Command::new(host_binary())
            .arg("--plugins-dir")
            .arg(dirs.plugins())
            .arg("--data-dir")
            .arg(dirs.data())
            .arg("--gateway-addr")
            .arg(self.gateway_addr.as_deref().unwrap_or("127.0.0.1:0"))
            .arg("--registry-addr")
            .arg(self.registry_addr.as_deref().unwrap_or("127.0.0.1:0"))
            .args(&self.args)
            .env("RUST_LOG", "info,plugin_host=debug")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start plugin-host");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = logs.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let mut host = Host {
            child: Some(child),
            reader: Some(reader),
            logs,
            dirs: Some(dirs),
            gateway: SocketAddr::from(([127, 0, 0, 1], 0)),
            registry: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let line = host.wait_for_log("listening").await;
        host.gateway = field(&line, "gateway").parse().expect("gateway address");
        host.registry = field(&line, "registry").parse().expect("registry address");
        host
    }
}

/// The value of `key=value` in a log line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line
        .find(&format!(" {key}="))
        .unwrap_or_else(|| panic!("no `{key}=` in log line: {line}"))
        + key.len()
        + 2;
    line[start..].split_whitespace().next().unwrap_or("")
}

/// A running `plugin-host`, killed when dropped.
#[derive(Debug)]
pub struct Host {
    child: Option<Child>,
    /// Reads the host's stderr into `logs` until the host exits.
    reader: Option<std::thread::JoinHandle<()>>,
    logs: Arc<Mutex<Vec<String>>>,
    dirs: Option<Dirs>,
    gateway: SocketAddr,
    registry: SocketAddr,
}

impl Host {
    /// Options for a host.
    pub fn builder() -> HostBuilder {
        HostBuilder::default()
    }

    /// A host with default options and empty directories.
    pub async fn start() -> Host {
        Self::builder().start().await
    }

    /// The gateway's address.
    pub fn gateway_addr(&self) -> SocketAddr {
        self.gateway
    }

    /// The registry's address.
    pub fn registry_addr(&self) -> SocketAddr {
        self.registry
    }

    /// `http://<gateway><path>`.
    pub fn gateway_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway)
    }

    /// `http://<registry><path>`.
    pub fn registry_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.registry)
    }

    /// The host's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The watched plugins directory.
    pub fn plugins_dir(&self) -> PathBuf {
        self.dirs.as_ref().expect("dirs").plugins()
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dirs.as_ref().expect("dirs").data()
    }

    /// Copies plugin library `lib` into the plugins directory as `file`,
    /// the way `cp` does (truncating and rewriting an existing file).
    pub fn install_plugin(&self, lib: &str, file: &str) {
        std::fs::copy(plugin_library(lib), self.plugins_dir().join(file)).expect("copy plugin");
    }

    /// Writes plugin library `lib` under a temporary name in the plugins
    /// directory, then renames it to `file` (an atomic replace).
    pub fn rename_plugin_in(&self, lib: &str, file: &str) {
        let temp = self.plugins_dir().join(format!(".{file}.partial"));
        std::fs::copy(plugin_library(lib), &temp).expect("copy plugin");
        std::fs::rename(&temp, self.plugins_dir().join(file)).expect("rename plugin");
    }

    /// Removes `file` from the plugins directory.
    pub fn remove_plugin(&self, file: &str) {
        std::fs::remove_file(self.plugins_dir().join(file)).expect("remove plugin");
    }

    /// Everything the host logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// The shared log buffer, readable after the host was stopped.
    pub fn logs_handle(&self) -> Arc<Mutex<Vec<String>>> {
        self.logs.clone()
    }

    /// Number of log lines so far: a mark for [`Host::wait_for_log_since`].
    pub fn log_mark(&self) -> usize {
        self.logs.lock().unwrap().len()
    }

    /// Waits for a log line containing every one of `needles`.
    pub async fn wait_for_log(&self, needle: &str) -> String {
        self.wait_for_log_since(0, &[needle]).await
    }

    /// Waits for a line after line `mark` containing all `needles`.
    pub async fn wait_for_log_since(&self, mark: usize, needles: &[&str]) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let found = {
                let logs = self.logs.lock().unwrap();
                logs[mark.min(logs.len())..]
                    .iter()
                    .find(|line| needles.iter().all(|needle| line.contains(needle)))
                    .cloned()
            };
            if let Some(line) = found {
                return line;
            }
            if Instant::now() > deadline {
                panic!(
                    "no log line with {needles:?} within {PATIENCE:?}; logs:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The host's `/proc/<pid>/maps`.
    pub fn maps(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/maps", self.pid())).expect("read maps")
    }

    /// The host's resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("read status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| child.try_wait().expect("try_wait").is_none())
    }

    /// Kills the host with SIGKILL and returns its directories.
    pub fn kill9(mut self) -> Dirs {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");
        self.dirs.take().expect("dirs")
    }

    /// Stops the host with SIGTERM, waits for it, and returns its exit
    /// status and directories.
    pub fn stop(mut self) -> (ExitStatus, Dirs) {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("kill -TERM");
        assert!(status.success(), "kill -TERM failed");
        let exit = child.wait().expect("wait");
        // Every line the host wrote is in `logs` once the reader saw EOF.
        if let Some(reader) = self.reader.take() {
            reader.join().expect("log reader");
        }
        (exit, self.dirs.take().expect("dirs"))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `check` every 10 ms until it returns true; panics naming `what`
/// after [`PATIENCE`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {PATIENCE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends `request` as raw bytes (for paths an HTTP client would normalize)
/// and returns the status code and the whole answer.
pub fn raw_http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(request.as_bytes()).expect("write");
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {answer:?}"));
    (status, answer)
}

// ---------------------------------------------------------------------------
// Remote services (registry and proxy tests): upstream servers and registry
// helpers live in their own module.

pub mod upstream;
