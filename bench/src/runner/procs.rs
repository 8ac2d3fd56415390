//! Child processes of the benchmark: pinned to a core, and their CPU time.
//! Running them and reading their output is [`host_harness::Proc`].

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use host_harness::{PATIENCE, Proc};
use tokio::runtime::Runtime;

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
    pub fn start(
        rt: &Runtime,
        name: &str,
        binary: &Path,
        pinning: Pinning,
    ) -> Result<Self, String> {
        let proc = Proc::spawn(name, pinning.server(binary))?;
        let line = rt.block_on(proc.wait_for_since(0, &["listening "], PATIENCE))?;
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|addr| addr.parse().ok())
            .ok_or_else(|| format!("{name}: no address in `{line}`"))?;
        Ok(Self { proc, addr })
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
