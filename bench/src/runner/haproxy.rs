//! HAProxy as Debian ships it, run in the foreground from
//! `bench/haproxy.cfg.template`: a second proxy baseline for scenario 2.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use host_harness::Proc;

use crate::nginx::free_port;
use crate::procs::Pinning;

const TEMPLATE: &str = include_str!("../../haproxy.cfg.template");

/// A running HAProxy proxying `/api/upstream/` to one upstream.
#[derive(Debug)]
pub struct Haproxy {
    /// The process (one, multi-threaded), stopped on drop.
    pub proc: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
    _prefix: tempfile::TempDir,
}

impl Haproxy {
    /// Writes the configuration and starts HAProxy on the server core with
    /// `threads` threads, in front of `upstream`.
    pub fn start(upstream: SocketAddr, threads: usize, pinning: Pinning) -> Result<Self, String> {
        let prefix = tempfile::Builder::new()
            .prefix("bench-haproxy-")
            .tempdir()
            .map_err(|error| format!("haproxy prefix: {error}"))?;
        let addr = free_port()?;
        let config_path = prefix.path().join("haproxy.cfg");
        std::fs::write(&config_path, render(prefix.path(), addr, upstream, threads))
            .map_err(|error| format!("haproxy.cfg: {error}"))?;
        let mut command = pinning.server(Path::new("haproxy"));
        command.arg("-db").arg("-f").arg(&config_path);
        let mut proc = Proc::spawn("haproxy", command)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                proc.stop();
                return Err(format!(
                    "haproxy did not listen on {addr}: {}",
                    proc.tail(20)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            proc,
            addr,
            _prefix: prefix,
        })
    }
}

/// The configuration for this run.
pub fn render(prefix: &Path, listen: SocketAddr, upstream: SocketAddr, threads: usize) -> String {
    TEMPLATE
        .replace("{{PREFIX}}", &prefix.display().to_string())
        .replace("{{LISTEN}}", &listen.to_string())
        .replace("{{UPSTREAM}}", &upstream.to_string())
        .replace("{{THREADS}}", &threads.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_is_filled() {
        let config = render(
            Path::new("/tmp/p"),
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
            1,
        );
        assert!(!config.contains("{{"), "{config}");
        assert!(config.contains("server upstream 127.0.0.1:2"));
        assert!(config.contains("bind 127.0.0.1:1"));
        assert!(config.contains("nbthread 1"));
        assert!(config.contains("http-reuse always"));
    }
}
