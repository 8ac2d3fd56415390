//! Upgraded connections: a WebSocket (or any other `Upgrade` protocol)
//! handshake the proxy passed to a remote service, and which the service
//! accepted with `101 Switching Protocols`, turns the client's connection
//! and the upstream's into one byte tunnel.
//!
//! The pieces meet here because three layers take part: the server
//! ([`crate::server`]) owns the client's connection and hands each upgrade
//! request a [`Handoff`]; the proxy reserves a place under the listener's
//! cap with it ([`Handoff::reserve`], 503 beyond it), asks the upstream,
//! and on a 101 leaves both ends in the handoff ([`Reserved::accept`]);
//! the server, once hyper has written the 101 and released the socket,
//! takes the [`Tunnel`] back ([`Pickup::take`]) and runs it in the
//! connection's own task. So a tunnel keeps its connection's place under
//! `--max-connections`, and is closed with the server's tasks when the
//! drain period after a shutdown ends.
//!
//! A tunnel ends when either side closes, or when no byte moved either way
//! for the idle timeout: the header-read and keep-alive rules of an HTTP
//! connection no longer apply to it, this one does. The server's write
//! stall timeout still applies to the client's side, whose socket it
//! wraps.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Version, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::sync::lock;

/// The tunnel limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct TunnelLimits {
    /// A tunnel with no byte moving either way for this long is closed.
    pub idle_timeout: Duration,
    /// Tunnels open at once; an upgrade beyond it is answered 503.
    pub max_tunnels: usize,
}

/// The `Upgrade` header of an HTTP/1.1 request whose `Connection` header
/// lists `upgrade`: the protocol(s) it asks to switch to. `None` for any
/// other request, whose `Upgrade` header (if any) is hop-by-hop like the
/// rest.
pub fn requested(version: Version, headers: &HeaderMap) -> Option<HeaderValue> {
    if version != Version::HTTP_11 {
        return None;
    }
    let upgrade = headers.get(header::UPGRADE)?;
    connection_lists_upgrade(headers).then(|| upgrade.clone())
}

fn connection_lists_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Puts back the two hop-by-hop headers an upgrade carries to the next
/// hop, after every hop-by-hop header was removed.
pub fn restore_upgrade_headers(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// A listener's open tunnels.
#[derive(Debug)]
pub struct Tunnels {
    limits: TunnelLimits,
    open: Arc<Semaphore>,
}

impl Tunnels {
    /// No tunnel open yet.
    pub fn new(limits: TunnelLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            open: Arc::new(Semaphore::new(limits.max_tunnels)),
        })
    }
}

/// Where the tunnel of one connection is left for the server to run: put
/// into the extensions of each of its requests that carries `Upgrade`.
#[derive(Debug, Clone)]
pub struct Handoff {
    tunnels: Arc<Tunnels>,
    slot: Arc<Slot>,
}

type Slot = Mutex<Option<Tunnel>>;

/// The server's side of a connection's [`Handoff`].
#[derive(Debug)]
pub struct Pickup(Arc<Slot>);

/// The listener's tunnels are all in use.
#[derive(Debug, thiserror::Error)]
#[error("{max} tunnels (upgraded connections) are open on this listener, the limit")]
pub struct TunnelsFull {
    /// The cap.
    pub max: usize,
}

impl Handoff {
    /// The handoff of one connection on a listener with `tunnels`, and the
    /// server's end of it.
    pub fn new(tunnels: Arc<Tunnels>) -> (Handoff, Pickup) {
        let slot = Arc::new(Mutex::new(None));
        (
            Handoff {
                tunnels,
                slot: slot.clone(),
            },
            Pickup(slot),
        )
    }

    /// A place under the listener's cap, held until the tunnel ends, or
    /// until the upstream refused the upgrade.
    pub fn reserve(&self) -> Result<Reserved, TunnelsFull> {
        let permit = self
            .tunnels
            .open
            .clone()
            .try_acquire_owned()
            .map_err(|_| TunnelsFull {
                max: self.tunnels.limits.max_tunnels,
            })?;
        Ok(Reserved {
            permit,
            idle_timeout: self.tunnels.limits.idle_timeout,
            slot: self.slot.clone(),
        })
    }
}

/// A place under the cap, for one upgrade in progress.
#[derive(Debug)]
pub struct Reserved {
    permit: OwnedSemaphorePermit,
    idle_timeout: Duration,
    slot: Arc<Slot>,
}

impl Reserved {
    /// The upstream switched protocols: leaves both ends for the server,
    /// which runs the tunnel once the client has been answered the 101.
    pub fn accept(self, service: &str, client: OnUpgrade, upstream: OnUpgrade) {
        *lock(&self.slot) = Some(Tunnel {
            service: service.to_owned(),
            client,
            upstream,
            idle_timeout: self.idle_timeout,
            _permit: self.permit,
        });
    }
}

impl Pickup {
    /// The tunnel a handler accepted on this connection, if any.
    pub fn take(&self) -> Option<Tunnel> {
        lock(&self.0).take()
    }
}

/// Both ends of an accepted upgrade, and the place under the cap they hold.
#[derive(Debug)]
pub struct Tunnel {
    service: String,
    client: OnUpgrade,
    upstream: OnUpgrade,
    idle_timeout: Duration,
    _permit: OwnedSemaphorePermit,
}

impl Tunnel {
    /// Copies bytes both ways until either side closes or the tunnel has
    /// been idle for its timeout.
    pub async fn run(self, listener: &'static str, peer: SocketAddr) {
        let Tunnel {
            service,
            client,
            upstream,
            idle_timeout,
            _permit,
        } = self;
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(ends) => ends,
            Err(error) => {
                tracing::debug!(listener, %peer, service = %service, error = %crate::http::error_chain(&error), "tunnel not opened: a side went away during the upgrade");
                return;
            }
        };
        tracing::debug!(listener, %peer, service = %service, "tunnel opened");
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        match splice(&mut client, &mut upstream, idle_timeout).await {
            Ended::Closed {
                to_upstream,
                to_client,
            } => tracing::debug!(
                listener,
                %peer,
                service = %service,
                to_upstream,
                to_client,
                "tunnel closed"
            ),
            Ended::Idle => tracing::debug!(
                listener,
                %peer,
                service = %service,
                timeout_ms = u64::try_from(idle_timeout.as_millis()).unwrap_or(u64::MAX),
                "tunnel closed: idle"
            ),
            Ended::Failed(error) => {
                tracing::debug!(listener, %peer, service = %service, %error, "tunnel closed: a side failed")
            }
        }
    }
}

/// How a splice ended.
#[derive(Debug)]
enum Ended {
    /// Both directions reached their end; bytes copied each way.
    Closed { to_upstream: u64, to_client: u64 },
    /// No byte moved for the idle timeout.
    Idle,
    /// A read or a write failed (a reset, the client's write stall).
    Failed(std::io::Error),
}

/// Copies bytes between `client` and `upstream` until both directions
/// ended, one failed, or nothing moved for `idle_timeout`.
async fn splice<C, U>(client: &mut C, upstream: &mut U, idle_timeout: Duration) -> Ended
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let clock = Clock::new();
    let mut client = Timed {
        io: client,
        clock: &clock,
    };
    let mut upstream = Timed {
        io: upstream,
        clock: &clock,
    };
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match copied {
            Ok((to_upstream, to_client)) => Ended::Closed { to_upstream, to_client },
            Err(error) => Ended::Failed(error),
        },
        () = clock.idle_for(idle_timeout) => Ended::Idle,
    }
}

/// When a byte last moved through a tunnel, either way.
#[derive(Debug)]
struct Clock {
    start: Instant,
    /// Milliseconds after `start`.
    last_ms: AtomicU64,
}

impl Clock {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn moved(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `timeout`. Bytes moving do not wake
    /// it: it sleeps until the deadline the last movement it saw set, and
    /// looks again.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let due =
                self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + timeout;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// One end of a tunnel, telling the [`Clock`] when bytes move.
struct Timed<'a, T> {
    io: &'a mut T,
    clock: &'a Clock,
}

impl<T: AsyncRead + Unpin> AsyncRead for Timed<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut *this.io).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.clock.moved();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Timed<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut *this.io).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(written)) if written > 0) {
            this.clock.moved();
        }
        result
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[test]
    fn only_an_http11_request_whose_connection_lists_upgrade_asks_for_one() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(requested(Version::HTTP_11, &headers), None);
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert_eq!(
            requested(Version::HTTP_11, &headers),
            Some(HeaderValue::from_static("websocket"))
        );
        assert_eq!(requested(Version::HTTP_10, &headers), None);
        headers.remove(header::UPGRADE);
        assert_eq!(requested(Version::HTTP_11, &headers), None);
    }

    #[test]
    fn the_cap_is_held_until_the_reservation_is_dropped() {
        let tunnels = Tunnels::new(TunnelLimits {
            idle_timeout: Duration::from_secs(1),
            max_tunnels: 1,
        });
        let (handoff, _pickup) = Handoff::new(tunnels);
        let held = handoff.reserve().expect("one place");
        assert_eq!(handoff.reserve().unwrap_err().max, 1);
        drop(held);
        assert!(handoff.reserve().is_ok());
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_until_both_sides_close() {
        let (mut client, mut client_end) = duplex(64);
        let (mut upstream, mut upstream_end) = duplex(64);
        let splicing = tokio::spawn(async move {
            splice(&mut client_end, &mut upstream_end, Duration::from_secs(10)).await
        });
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0; 4];
        upstream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        upstream.write_all(b"pong!").await.unwrap();
        let mut buf = [0; 5];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong!");
        drop(client);
        drop(upstream);
        match splicing.await.unwrap() {
            Ended::Closed {
                to_upstream,
                to_client,
            } => assert_eq!((to_upstream, to_client), (4, 5)),
            other => panic!("ended {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_tunnel_with_nothing_moving_ends_after_the_idle_timeout() {
        let (mut client, mut client_end) = duplex(64);
        let (_upstream, mut upstream_end) = duplex(64);
        let idle = Duration::from_millis(200);
        let started = Instant::now();
        let splicing =
            tokio::spawn(async move { splice(&mut client_end, &mut upstream_end, idle).await });
        // Traffic halfway through pushes the deadline back.
        tokio::time::sleep(idle / 2).await;
        client.write_all(b"x").await.unwrap();
        let moved = Instant::now();
        assert!(matches!(splicing.await.unwrap(), Ended::Idle));
        assert!(moved.elapsed() >= idle - Duration::from_millis(5));
        assert!(started.elapsed() >= idle + idle / 2 - Duration::from_millis(5));
    }
}
