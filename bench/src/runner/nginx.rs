//! nginx as Debian ships it, run in the foreground from
//! `bench/nginx.conf.template` with a prefix of its own.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use host_harness::Proc;

use crate::procs::Pinning;

const TEMPLATE: &str = include_str!("../../nginx.conf.template");

/// A running nginx proxying `/api/upstream/` to one upstream.
#[derive(Debug)]
pub struct Nginx {
    /// The master process, stopped on drop (SIGTERM stops the workers
    /// too).
    pub proc: Proc,
    /// Where it listens, buffering answers (nginx's default).
    pub addr: SocketAddr,
    /// Where it listens with `proxy_buffering off`.
    pub unbuffered_addr: SocketAddr,
    _prefix: tempfile::TempDir,
}

impl Nginx {
    /// Writes the configuration and starts nginx on the server core with
    /// `workers` worker processes, in front of `upstream`.
    pub fn start(upstream: SocketAddr, workers: usize, pinning: Pinning) -> Result<Self, String> {
        let prefix = tempfile::Builder::new()
            .prefix("bench-nginx-")
            .tempdir()
            .map_err(|error| format!("nginx prefix: {error}"))?;
        let addr = free_port()?;
        let unbuffered_addr = free_port()?;
        let config = render(prefix.path(), [addr, unbuffered_addr], upstream, workers);
        let config_path = prefix.path().join("nginx.conf");
        std::fs::write(&config_path, config).map_err(|error| format!("nginx.conf: {error}"))?;
        // Workers run as an unprivileged user when started as root: let
        // them write their temp directories.
        let _ = std::fs::set_permissions(
            prefix.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        );
        let mut command = pinning.server(Path::new("nginx"));
        command
            .arg("-p")
            .arg(prefix.path())
            .arg("-c")
            .arg(&config_path)
            .arg("-e")
            .arg(prefix.path().join("error.log"));
        let mut proc = Proc::spawn("nginx", command)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() || TcpStream::connect(unbuffered_addr).is_err() {
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(prefix.path().join("error.log")).unwrap_or_default();
                proc.stop();
                return Err(format!("nginx did not listen on {addr}: {log}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            proc,
            addr,
            unbuffered_addr,
            _prefix: prefix,
        })
    }
}

/// The configuration for this run.
pub fn render(
    prefix: &Path,
    [listen, unbuffered]: [SocketAddr; 2],
    upstream: SocketAddr,
    workers: usize,
) -> String {
    TEMPLATE
        .replace("{{PREFIX}}", &prefix.display().to_string())
        .replace("{{LISTEN}}", &listen.to_string())
        .replace("{{LISTEN_UNBUFFERED}}", &unbuffered.to_string())
        .replace("{{UPSTREAM}}", &upstream.to_string())
        .replace("{{WORKERS}}", &workers.to_string())
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> Result<SocketAddr, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|error| format!("no free port: {error}"))?;
    listener
        .local_addr()
        .map_err(|error| format!("no free port: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_is_filled() {
        let config = render(
            Path::new("/tmp/p"),
            [
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:3".parse().unwrap(),
            ],
            "127.0.0.1:2".parse().unwrap(),
            1,
        );
        assert!(!config.contains("{{"), "{config}");
        assert!(config.contains("server 127.0.0.1:2;"));
        assert!(config.contains("listen 127.0.0.1:1 "));
        assert!(config.contains("listen 127.0.0.1:3 "));
        assert!(config.contains("proxy_buffering off;"));
        assert!(config.contains("keepalive 64;"));
        assert!(config.contains("proxy_set_header Connection \"\";"));
        assert!(config.contains("worker_processes 1;"));
    }
}
