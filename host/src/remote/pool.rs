//! The idle keep-alive connections to one instance.
//!
//! The proxy drives its upstream HTTP/1.1 connections itself (hyper's
//! `client::conn::http1`): a request checks a connection's sender out of
//! its instance's [`Pool`], sends on it from its own task, and puts it back
//! when the answer's body has ended. Keeping the pool in the [`Instance`]
//! makes it per instance without a map or a lock shared by every service,
//! and an instance that leaves the registry closes its idle connections
//! with it (dropping a sender ends its connection).
//!
//! Nothing here connects or sends: that is the proxy's (this module only
//! stores senders, so `remote/` still does no I/O).
//!
//! [`Instance`]: super::Instance

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::HeaderValue;
use axum::http::uri::Authority;
use hyper::client::conn::http1::SendRequest;

use crate::sync::lock;

/// A connection's sending half, as the proxy sends on it.
pub type Sender = SendRequest<Body>;

/// Idle connections to one instance, the most recently used on top (so a
/// busy instance reuses warm connections and the rest age out).
#[derive(Debug)]
pub struct Pool {
    idle: Mutex<Vec<Idle>>,
    /// The `Host` every request to the instance carries, made once.
    host: HeaderValue,
    /// Whether the proxy's idle sweep knows this instance.
    enrolled: AtomicBool,
}

#[derive(Debug)]
struct Idle {
    sender: Sender,
    since: Instant,
}

impl Pool {
    /// An empty pool for the instance at `authority`.
    pub fn new(authority: &Authority) -> Self {
        // As hyper-util's client did: the port only when it is not HTTP's
        // default.
        let host = match authority.port_u16() {
            Some(80) => authority.host(),
            _ => authority.as_str(),
        };
        Self {
            idle: Mutex::new(Vec::new()),
            host: HeaderValue::from_str(host).expect("an authority is a valid header value"),
            enrolled: AtomicBool::new(false),
        }
    }

    /// The instance's `Host` header value.
    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// The most recently returned connection that is still open and has
    /// been idle for no longer than `max_idle` (older ones are dropped:
    /// they are all below it).
    pub fn take(&self, now: Instant, max_idle: Duration) -> Option<Sender> {
        let mut idle = lock(&self.idle);
        while let Some(top) = idle.pop() {
            if now.saturating_duration_since(top.since) > max_idle {
                idle.clear();
                return None;
            }
            if !top.sender.is_closed() {
                return Some(top.sender);
            }
        }
        None
    }

    /// Puts `sender` back, idle from `now`, unless `max` connections are
    /// idle already (then it is dropped, which closes it).
    pub fn put(&self, sender: Sender, now: Instant, max: usize) {
        let mut idle = lock(&self.idle);
        if idle.len() < max {
            idle.push(Idle { sender, since: now });
        }
    }

    /// Drops every connection idle for longer than `max_idle` or closed by
    /// the instance; returns how many are left.
    pub fn sweep(&self, now: Instant, max_idle: Duration) -> usize {
        let mut idle = lock(&self.idle);
        idle.retain(|idle| {
            now.saturating_duration_since(idle.since) <= max_idle && !idle.sender.is_closed()
        });
        idle.len()
    }

    /// Marks the pool as known to the idle sweep; true the first time.
    pub fn enroll(&self) -> bool {
        !self.enrolled.load(Ordering::Relaxed) && !self.enrolled.swap(true, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use hyper::client::conn::http1;
    use hyper_util::rt::TokioIo;

    use super::*;

    /// A sender over an in-memory pipe, and the connection it needs open.
    async fn connection() -> (Sender, tokio::task::JoinHandle<()>) {
        let (near, _far) = tokio::io::duplex(64);
        let (sender, connection) = http1::handshake(TokioIo::new(near)).await.unwrap();
        let running = tokio::spawn(async move {
            let _far = _far;
            let _ = connection.await;
        });
        (sender, running)
    }

    fn pool() -> Pool {
        Pool::new(&"127.0.0.1:8010".parse().unwrap())
    }

    #[test]
    fn the_host_header_names_the_port_unless_it_is_http_s_default() {
        assert_eq!(pool().host(), "127.0.0.1:8010");
        assert_eq!(Pool::new(&"[::1]:80".parse().unwrap()).host(), "[::1]");
    }

    #[tokio::test]
    async fn the_newest_open_connection_is_taken_and_closed_ones_are_skipped() {
        let pool = pool();
        let now = Instant::now();
        let (open, _running) = connection().await;
        let (closed, running) = connection().await;
        pool.put(open, now, 8);
        pool.put(closed, now, 8);
        running.abort();
        let _ = running.await;
        assert!(pool.take(now, IDLE).is_some());
        assert!(pool.take(now, IDLE).is_none());
    }

    const IDLE: Duration = Duration::from_secs(90);

    #[tokio::test]
    async fn connections_idle_too_long_are_dropped_and_idle_ones_capped() {
        let pool = pool();
        let start = Instant::now();
        let mut running = Vec::new();
        for _ in 0..3 {
            let (sender, task) = connection().await;
            running.push(task);
            pool.put(sender, start, 2);
        }
        assert_eq!(pool.sweep(start, IDLE), 2, "the third was over the cap");
        let (newer, task) = connection().await;
        running.push(task);
        pool.put(newer, start + IDLE, 3);
        assert_eq!(pool.sweep(start + IDLE + Duration::from_secs(1), IDLE), 1);
        assert!(pool.take(start + IDLE * 3, IDLE).is_none());
    }
}
