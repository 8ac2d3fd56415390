//! A child process whose stdout and stderr lines are kept and can be
//! waited for, and what `/proc` says about a process's memory.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::{Error, Result};

/// How long [`Proc::stop`] lets a process exit on SIGTERM before it is
/// killed, and how long it then waits for the last output lines.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A running child with its output captured line by line; stopped with
/// SIGTERM (then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Option<Child>,
    /// Every line so far, stdout and stderr interleaved as they arrived.
    /// The readers hold the senders: the channel closes when the process
    /// (and whatever inherited its pipes) closed both.
    lines: watch::Receiver<Vec<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    /// Spawns `command` with stdin closed and stdout and stderr captured;
    /// `name` is how errors refer to it.
    pub fn spawn(name: &str, mut command: Command) -> Result<Self> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| Error::new(format!("cannot start {name}: {error}")))?;
        let (sender, lines) = watch::channel(Vec::new());
        let mut readers = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            readers.push(collect(stdout, sender.clone()));
        }
        if let Some(stderr) = child.stderr.take() {
            readers.push(collect(stderr, sender));
        }
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            lines,
            readers,
        })
    }

    /// The process id (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Number of lines so far: a mark for the `*_since` methods.
    pub fn mark(&self) -> usize {
        self.lines.borrow().len()
    }

    /// Every line so far, joined with newlines.
    pub fn output(&self) -> String {
        self.lines.borrow().join("\n")
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines.borrow();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Lines after `mark` that contain every one of `needles`.
    pub fn lines_since(&self, mark: usize, needles: &[&str]) -> Vec<String> {
        let lines = self.lines.borrow();
        lines[mark.min(lines.len())..]
            .iter()
            .filter(|line| needles.iter().all(|needle| line.contains(needle)))
            .cloned()
            .collect()
    }

    /// Waits for the first line after `mark` containing all `needles`.
    /// Wakes on each new line, so the time it returns at is the time the
    /// line arrived (the bench measures with it). Fails after `patience`,
    /// or once the process closed its output without such a line.
    pub async fn wait_for_since(
        &self,
        mark: usize,
        needles: &[&str],
        patience: Duration,
    ) -> Result<String> {
        let mut lines = self.lines.clone();
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            lines.mark_unchanged();
            if let Some(line) = self.lines_since(mark, needles).into_iter().next() {
                return Ok(line);
            }
            let what = match tokio::time::timeout_at(deadline, lines.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => "closed its output (exited?) before logging",
                Err(_) => "logged no line within the patience with",
            };
            // One last look: the line may have come with the close.
            if let Some(line) = self.lines_since(mark, needles).into_iter().next() {
                return Ok(line);
            }
            return Err(Error::new(format!(
                "{} {what} {needles:?} ({patience:?}); output:\n{}",
                self.name,
                self.output()
            )));
        }
    }

    /// Waits until the process closed its output (it exited) and returns
    /// its exit status. Fails after `patience`, leaving it running (it is
    /// stopped when dropped).
    pub async fn wait_for_exit(&mut self, patience: Duration) -> Result<ExitStatus> {
        let mut lines = self.lines.clone();
        let closed =
            tokio::time::timeout(patience, async { while lines.changed().await.is_ok() {} }).await;
        if closed.is_err() {
            return Err(Error::new(format!(
                "{} still running after {patience:?}; output:\n{}",
                self.name,
                self.output()
            )));
        }
        let mut child = self
            .child
            .take()
            .ok_or_else(|| Error::new(format!("{} was stopped before", self.name)))?;
        let status = child
            .wait()
            .map_err(|error| Error::new(format!("wait for {}: {error}", self.name)))?;
        self.finish_reading();
        Ok(status)
    }

    /// Sends the signal `name` (`HUP`, `TERM`, ...) to the process.
    pub fn signal(&self, name: &str) -> Result<()> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| Error::new(format!("{} was stopped before", self.name)))?;
        send_signal(child.id(), name)
    }

    /// Resident set size in KiB (`VmRSS`); `None` once it is gone.
    pub fn rss_kib(&self) -> Option<u64> {
        status_kib(self.pid(), "VmRSS")
    }

    /// SIGTERM, then SIGKILL if it has not exited within five seconds;
    /// returns once its output is read to the end (or five more seconds
    /// passed, if a child of its own still holds the pipes). `None` if it
    /// was stopped before.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // Gone already (it exited on its own) is fine: it is reaped below.
        let _ = send_signal(child.id(), "TERM");
        let deadline = Instant::now() + STOP_GRACE;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => {
                    let _ = child.kill();
                    break child.wait().ok();
                }
            }
        };
        self.finish_reading();
        status
    }

    /// SIGKILL, as a crash would; returns once it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.finish_reading();
    }

    fn finish_reading(&mut self) {
        let deadline = Instant::now() + STOP_GRACE;
        while self.readers.iter().any(|reader| !reader.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.readers.clear();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn send_signal(pid: u32, name: &str) -> Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .map_err(|error| Error::new(format!("cannot run kill: {error}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::new(format!("kill -{name} {pid}: {status}")))
    }
}

fn collect(stream: impl Read + Send + 'static, sink: watch::Sender<Vec<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            sink.send_modify(|lines| lines.push(line));
        }
    })
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, ...), in KiB;
/// `None` if the process or the field is not there.
pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(script: &str) -> Proc {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        Proc::spawn("sh", command).expect("sh")
    }

    #[tokio::test]
    async fn a_wait_finds_a_line_from_either_stream_after_the_mark() {
        let proc = shell("echo 'a x=1'; echo 'b x=2' >&2; exec sleep 5");
        let line = proc
            .wait_for_since(0, &["b", "x="], Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(line, "b x=2");
        // The two streams are read by threads of their own: stdout's line
        // may be recorded after stderr's.
        proc.wait_for_since(0, &["a x=1"], Duration::from_secs(5))
            .await
            .unwrap();
        let mark = proc.mark();
        assert_eq!(mark, 2);
        assert!(proc.lines_since(mark, &["x="]).is_empty());
    }

    #[tokio::test]
    async fn a_wait_fails_at_once_when_the_process_exits_without_the_line() {
        let proc = shell("echo started");
        let started = Instant::now();
        let error = proc
            .wait_for_since(0, &["never"], Duration::from_secs(20))
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10), "waited out");
        assert!(error.to_string().contains("closed its output"), "{error}");
        assert!(error.to_string().contains("started"), "{error}");
    }

    #[tokio::test]
    async fn a_wait_for_exit_returns_the_status_and_every_line() {
        let mut proc = shell("echo bye >&2; exit 3");
        let status = proc.wait_for_exit(Duration::from_secs(20)).await.unwrap();
        assert_eq!(status.code(), Some(3));
        assert_eq!(proc.output(), "bye");
        let mut running = shell("exec sleep 5");
        let error = running
            .wait_for_exit(Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("still running"), "{error}");
    }

    #[test]
    fn status_fields_are_read_in_kib() {
        let rss = status_kib(std::process::id(), "VmRSS").unwrap();
        let peak = status_kib(std::process::id(), "VmHWM").unwrap();
        assert!(rss > 0 && peak >= rss, "{rss} {peak}");
        assert_eq!(status_kib(std::process::id(), "NoSuchField"), None);
    }
}
