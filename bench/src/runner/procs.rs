//! Child processes of the benchmark: started pinned to a core, their output
//! captured line by line, stopped with SIGTERM when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Which cores things run on. With two cores or more, the servers under
/// test get core 1 and the load generators (wrk, this driver) core 0.
#[derive(Debug, Clone, Copy)]
pub struct Pinning {
    /// Whether `taskset` is used at all.
    pub enabled: bool,
}

impl Pinning {
    /// Pins when the machine has at least two cores and `taskset` exists.
    pub fn detect(disabled: bool) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let taskset = Command::new("taskset")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        Self {
            enabled: !disabled && cores >= 2 && taskset,
        }
    }

    /// `program args...` on the server core.
    pub fn server(&self, program: &Path) -> Command {
        self.on_core(program.as_os_str(), "1")
    }

    /// `program args...` on the client core.
    pub fn client(&self, program: &str) -> Command {
        self.on_core(program.as_ref(), "0")
    }

    fn on_core(&self, program: &std::ffi::OsStr, core: &str) -> Command {
        if self.enabled {
            let mut command = Command::new("taskset");
            command.arg("-c").arg(core).arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    /// Pins this process (every thread started after this call) to the
    /// client core. Call it before starting any thread.
    pub fn pin_self_to_client_core(&self) -> std::io::Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let status = Command::new("taskset")
            .args(["-p", "-c", "0", &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other("taskset -p failed"))
        }
    }

    /// Human-readable description for the report.
    pub fn describe(&self) -> String {
        if self.enabled {
            "servers under test (plugin-host, bench-native, bench-upstream, nginx) pinned to core 1 \
             with `taskset -c 1`; wrk and the driver's own clients pinned to core 0"
                .to_owned()
        } else {
            "not pinned (fewer than two cores, no `taskset`, or --no-pin)".to_owned()
        }
    }
}

/// A running child whose stdout and stderr lines are kept.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Spawns `command` with stdout and stderr captured.
    pub fn spawn(name: &str, mut command: Command) -> Result<Self, String> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| format!("cannot start {name}: {error}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        if let Some(stdout) = child.stdout.take() {
            collect(stdout, lines.clone());
        }
        if let Some(stderr) = child.stderr.take() {
            collect(stderr, lines.clone());
        }
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            lines,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Number of lines so far: a mark for [`Proc::wait_for_since`].
    pub fn mark(&self) -> usize {
        lock(&self.lines).len()
    }

    /// Lines after `mark` that contain every one of `needles`.
    pub fn count_since(&self, mark: usize, needles: &[&str]) -> usize {
        let lines = lock(&self.lines);
        lines[mark.min(lines.len())..]
            .iter()
            .filter(|line| needles.iter().all(|needle| line.contains(needle)))
            .count()
    }

    /// Lines after `mark` that contain every one of `needles`.
    pub fn lines_since(&self, mark: usize, needles: &[&str]) -> Vec<String> {
        let lines = lock(&self.lines);
        lines[mark.min(lines.len())..]
            .iter()
            .filter(|line| needles.iter().all(|needle| line.contains(needle)))
            .cloned()
            .collect()
    }

    /// Waits for the first line after `mark` containing all `needles`.
    pub fn wait_for_since(
        &mut self,
        mark: usize,
        needles: &[&str],
        patience: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(line) = self.lines_since(mark, needles).into_iter().next() {
                return Ok(line);
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!(
                    "{} exited ({status}) before logging {needles:?}; output:\n{}",
                    self.name,
                    self.tail(40)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} logged no line with {needles:?} within {patience:?}; output:\n{}",
                    self.name,
                    self.tail(40)
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> String {
        let lines = lock(&self.lines);
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Resident set size in KiB, from `/proc/<pid>/status`.
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.pid())
    }

    /// SIGTERM, then SIGKILL if it has not exited within five seconds.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn collect(stream: impl std::io::Read + Send + 'static, sink: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            lock(&sink).push(line);
        }
    });
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The value of `key=value` in a log line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!(" {key}=");
    let start = line.find(&needle)? + needle.len();
    line[start..].split_whitespace().next()
}

/// A server binary of this workspace that prints `listening <addr>`.
#[derive(Debug)]
pub struct SimpleServer {
    /// The process, stopped on drop.
    pub proc: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl SimpleServer {
    /// Starts `binary` on the server core and waits for its address.
    pub fn start(name: &str, binary: &Path, pinning: Pinning) -> Result<Self, String> {
        let mut proc = Proc::spawn(name, pinning.server(binary))?;
        let line = proc.wait_for_since(0, &["listening "], Duration::from_secs(20))?;
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|addr| addr.parse().ok())
            .ok_or_else(|| format!("{name}: no address in `{line}`"))?;
        Ok(Self { proc, addr })
    }
}

/// A running `plugin-host` with directories of its own.
#[derive(Debug)]
pub struct Host {
    /// The process.
    pub proc: Proc,
    /// Gateway address.
    pub gateway: SocketAddr,
    /// Registry address.
    pub registry: SocketAddr,
    /// The watched plugins directory.
    pub plugins_dir: PathBuf,
    _root: tempfile::TempDir,
}

impl Host {
    /// Starts the host on the server core with empty directories and waits
    /// until it listens. `RUST_LOG=info`: nothing is logged per request.
    pub fn start(binary: &Path, pinning: Pinning, extra_args: &[&str]) -> Result<Self, String> {
        let root = tempfile::Builder::new()
            .prefix("bench-host-")
            .tempdir()
            .map_err(|error| format!("temp dir: {error}"))?;
        let plugins_dir = root.path().join("plugins");
        std::fs::create_dir(&plugins_dir).map_err(|error| format!("plugins dir: {error}"))?;
        let mut command = pinning.server(binary);
        command
            .arg("--plugins-dir")
            .arg(&plugins_dir)
            .arg("--data-dir")
            .arg(root.path().join("data"))
            .args(["--gateway-addr", "127.0.0.1:0"])
            .args(["--registry-addr", "127.0.0.1:0"])
            .args(extra_args)
            .env("RUST_LOG", "info")
            .env_remove("RUST_BACKTRACE");
        let mut proc = Proc::spawn("plugin-host", command)?;
        let line = proc.wait_for_since(0, &["listening"], Duration::from_secs(30))?;
        let parse = |key| {
            field(&line, key)
                .and_then(|addr| addr.parse().ok())
                .ok_or_else(|| format!("no `{key}=` address in `{line}`"))
        };
        Ok(Self {
            gateway: parse("gateway")?,
            registry: parse("registry")?,
            proc,
            plugins_dir,
            _root: root,
        })
    }

    /// Writes `library` into the plugins directory as `file` the way a
    /// deployment should: copy under a name the watcher ignores, then
    /// rename over the target (atomic).
    pub fn install(&self, library: &Path, file: &str) -> Result<(), String> {
        let temp = self.plugins_dir.join(format!(".{file}.partial"));
        std::fs::copy(library, &temp)
            .map_err(|error| format!("copy {}: {error}", library.display()))?;
        std::fs::rename(&temp, self.plugins_dir.join(file))
            .map_err(|error| format!("rename to {file}: {error}"))
    }

    /// Removes `file` from the plugins directory.
    pub fn remove(&self, file: &str) -> Result<(), String> {
        std::fs::remove_file(self.plugins_dir.join(file))
            .map_err(|error| format!("remove {file}: {error}"))
    }

    /// `http://<gateway><path>`.
    pub fn gateway_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway)
    }

    /// `http://<registry><path>`.
    pub fn registry_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.registry)
    }
}

/// CPU time (user + system) `pid` has used, in clock ticks; 0 if it is
/// gone.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, utime 14, stime 15.
    let Some(after) = stat.rfind(')').map(|end| &stat[end + 1..]) else {
        return 0;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    field(14).unwrap_or(0) + field(15).unwrap_or(0)
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux).
pub fn ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds `pids` have used so far, all threads included.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let ticks: u64 = pids.iter().map(|pid| cpu_ticks(*pid)).sum();
    ticks as f64 / ticks_per_second()
}

/// `pid` and its direct children (nginx's master and workers).
pub fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let parent = stat
            .rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<u32>().ok());
        if parent == Some(pid) {
            pids.push(child);
        }
    }
    pids
}
