//! Serving a listener's HTTP/1.1 connections with the limits `axum::serve`
//! does not have: a header-read timeout, an idle keep-alive timeout, a write
//! stall timeout and a cap on open connections.
//!
//! Each accepted connection is one task running hyper's HTTP/1 connection
//! and, beside it, a watchdog that knows whether a request is in flight and
//! when bytes last moved. The watchdog is lazy: requests starting and ending
//! only update counters, and it wakes at the earliest deadline that could
//! apply, to re-read them (see [`Activity::expired`]), so a request costs no
//! wake-up of its own.
//!
//! - **Header read** (`header_read_timeout`): a connection's first request
//!   head must be complete within the timeout of the accept, and any later
//!   one within the timeout of its first byte. The client is answered `408`
//!   with a JSON body, then the connection is closed. hyper's own
//!   `header_read_timeout` is not used: it also runs while a keep-alive
//!   connection waits for its next request (in hyper 1.12 the timer starts
//!   whenever the connection is ready to read a head), so it could not be
//!   told apart from the idle timeout.
//! - **Idle** (`idle_timeout`): a connection with no request in flight and
//!   no byte moving either way for the timeout is closed. A response still
//!   draining from hyper's buffer to a slow reader counts as bytes moving.
//! - **Write stall** (`write_stall_timeout`): the socket is wrapped so that
//!   a write that stays pending (the client does not read) longer than the
//!   timeout fails the connection, which frees the response it pinned.
//! - **Connection cap** (`max_connections`): a connection is accepted only
//!   while fewer than the cap are open. Beyond it, new connections wait in
//!   the kernel's accept backlog (and past the backlog the kernel drops
//!   their SYNs, so clients retry): a waiting connection costs the host no
//!   file descriptor or memory, and is served as soon as a slot frees, which
//!   the timeouts above guarantee happens. Closing them instead would turn a
//!   burst into errors.
//!
//! - **Tunnels** ([`crate::tunnel`]): a request that carries `Upgrade`
//!   gets the connection's [`Handoff`]; once hyper has answered it `101`
//!   and let go of the socket, the task runs the tunnel the handler left
//!   there instead of ending. The header-read and idle rules above no
//!   longer apply; the tunnel's own idle timeout does, the write stall
//!   timeout still does, and the connection keeps its place under the cap.
//!
//! Request bodies are not timed here: the handlers that read a body bound
//! the read themselves (`--request-timeout`), and answer `408` naming it.
//!
//! On shutdown the accept loop stops, idle connections close, and
//! connections with a request in flight close once it is answered; the
//! caller bounds that wait and then aborts the task, which closes what is
//! left.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::{TowerToHyperService, TowerToHyperServiceFuture};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, Sleep};

use crate::tunnel::{Handoff, TunnelLimits, Tunnels};

/// The limits every connection on a listener is held to.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Longest wait for a complete request head (first request: from the
    /// accept; later ones: from their first byte).
    pub header_read_timeout: Duration,
    /// Longest a connection may sit with no request in flight and no bytes
    /// moving.
    pub idle_timeout: Duration,
    /// Longest a response write may make no progress.
    pub write_stall_timeout: Duration,
    /// Connections open at once; more wait in the accept backlog.
    pub max_connections: usize,
    /// Upgraded connections: their idle timeout and how many may be open.
    pub tunnels: TunnelLimits,
}

/// Serves `router` on `listener` until `stopped` turns true, then lets the
/// requests in flight finish. Abort the task to close what is still open.
pub fn serve(
    listener: &'static str,
    socket: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    stopped: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(accept_loop(listener, socket, router, limits, stopped))
}

async fn accept_loop(
    listener: &'static str,
    socket: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    mut stopped: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let tunnels = Tunnels::new(limits.tunnels);
    // Owning the connection tasks here means aborting this task (the drain
    // deadline passed) aborts them too, closing their sockets.
    let mut connections = JoinSet::new();
    let mut warned_full_at: Option<Instant> = None;
    loop {
        while connections.try_join_next().is_some() {}
        if slots.available_permits() == 0
            && warned_full_at.is_none_or(|at| at.elapsed() >= FULL_WARNING_INTERVAL)
        {
            warned_full_at = Some(Instant::now());
            tracing::warn!(
                listener,
                max_connections = limits.max_connections,
                "connection limit reached; new connections wait in the accept backlog until one closes"
            );
        }
        let slot = tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => break,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let accepted = tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => break,
            accepted = socket.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) if is_connection_error(&error) => continue,
            Err(error) => {
                // Typically out of file descriptors: accepting again at once
                // would spin; connections closing meanwhile free some.
                tracing::warn!(listener, %error, "cannot accept connections; retrying in 1 s");
                tokio::select! {
                    _ = stopped.wait_for(|stop| *stop) => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        connections.spawn(serve_connection(
            Connection {
                listener,
                peer,
                limits,
                tunnels: tunnels.clone(),
                _slot: slot,
            },
            stream,
            router.clone(),
            stopped.clone(),
        ));
    }
    drop(socket);
    while connections.join_next().await.is_some() {}
}

/// How often the "connection limit reached" warning may repeat.
const FULL_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Errors of one connection that failed before it was accepted.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// One accepted connection's identity and limits.
struct Connection {
    listener: &'static str,
    peer: SocketAddr,
    limits: ConnectionLimits,
    tunnels: Arc<Tunnels>,
    /// Held for the connection's life: its place under the cap.
    _slot: OwnedSemaphorePermit,
}

/// Why the watchdog closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    Headers,
    Idle,
}

async fn serve_connection(
    connection: Connection,
    stream: TcpStream,
    router: Router,
    mut stopped: watch::Receiver<bool>,
) {
    let Connection {
        listener,
        peer,
        limits,
        tunnels,
        ..
    } = connection;
    // hyper writes whole messages; Nagle would only delay small answers.
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        stream,
        activity: activity.clone(),
        stall_timeout: limits.write_stall_timeout,
        stall: None,
    });
    let (handoff, pickup) = Handoff::new(tunnels);
    let service = RequestService {
        router: TowerToHyperService::new(router),
        peer,
        activity: activity.clone(),
        handoff,
    };
    let mut conn = http1::Builder::new()
        // See the module doc: the watchdog times request heads.
        .header_read_timeout(None)
        .serve_connection(io, service)
        .with_upgrades();
    let watchdog = activity.expired(limits);
    tokio::pin!(watchdog);
    let mut draining = false;
    let ended = loop {
        tokio::select! {
            result = &mut conn => {
                if let Some(tunnel) = pickup.take() {
                    break Ok(tunnel);
                }
                if activity.stalled.load(Ordering::Relaxed) {
                    tracing::debug!(
                        listener,
                        %peer,
                        timeout_ms = millis(limits.write_stall_timeout),
                        "connection closed: the client stopped reading the response"
                    );
                } else if let Err(error) = result {
                    tracing::debug!(listener, %peer, error = %crate::http::error_chain(&error), "connection ended with an error");
                }
                return;
            }
            expired = &mut watchdog => break Err(expired),
            _ = stopped.wait_for(|stop| *stop), if !draining => {
                draining = true;
                Pin::new(&mut conn).graceful_shutdown();
            }
        }
    };
    let expired = match ended {
        // hyper has let go of the socket: what is left of the connection
        // is the tunnel, which its own idle timeout bounds.
        Ok(tunnel) => return tunnel.run(listener, peer).await,
        Err(expired) => expired,
    };
    match expired {
        Expired::Idle => {
            tracing::debug!(
                listener,
                %peer,
                timeout_ms = millis(limits.idle_timeout),
                "connection closed: idle"
            );
        }
        Expired::Headers => {
            tracing::debug!(
                listener,
                %peer,
                timeout_ms = millis(limits.header_read_timeout),
                "connection closed: request headers not received in time"
            );
            // No request is in flight, so nothing was written: the socket is
            // at a message boundary and may carry a last answer.
            let Some(parts) = conn.into_parts() else {
                return;
            };
            let mut stream = parts.io.into_inner();
            let answer = header_timeout_answer(limits.header_read_timeout);
            let _ = tokio::time::timeout(limits.write_stall_timeout, async {
                stream.write_all(&answer).await?;
                stream.shutdown().await
            })
            .await;
        }
    }
}

/// The `408` a client gets when its request head did not arrive in time.
fn header_timeout_answer(timeout: Duration) -> Vec<u8> {
    let body = serde_json::json!({
        "error": format!(
            "request headers not received within {}",
            humantime::format_duration(timeout)
        ),
        "limit_ms": millis(timeout),
    })
    .to_string();
    format!(
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// What the watchdog knows of one connection. Written by the socket wrapper
/// and the request service, read by [`Activity::expired`].
#[derive(Debug)]
struct Activity {
    /// The accept; the other times are milliseconds since it.
    accepted: Instant,
    /// Requests whose response body hyper has not finished with.
    in_flight: AtomicUsize,
    /// Requests begun on this connection.
    requests: AtomicU64,
    /// When a byte last moved with no request in flight, or the last
    /// request ended. Bytes moving for a request in flight are not
    /// recorded: no idle deadline runs then, and the request's end restarts
    /// the idle clock anyway.
    last_io_ms: AtomicU64,
    /// When the first byte of the next request head arrived, or [`NONE`].
    head_started_ms: AtomicU64,
    /// Set when a write stalled past the timeout.
    stalled: AtomicBool,
}

const NONE: u64 = u64::MAX;

impl Activity {
    fn new() -> Self {
        Self {
            accepted: Instant::now(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            last_io_ms: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(NONE),
            stalled: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        millis(self.accepted.elapsed())
    }

    /// Bytes were read. Only the clock of a connection with no request in
    /// flight is read: they may be the first of a request head.
    fn read(&self) {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return;
        }
        let now = self.now_ms();
        self.last_io_ms.store(now, Ordering::Relaxed);
        let _ =
            self.head_started_ms
                .compare_exchange(NONE, now, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// Bytes were written. Only those written with no request in flight (a
    /// response hyper still flushes after its body ended) keep the
    /// connection from being idle.
    fn wrote(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0 {
            self.moved();
        }
    }

    fn moved(&self) {
        self.last_io_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.head_started_ms.store(NONE, Ordering::Release);
        InFlight(self.clone())
    }

    /// The deadline that applies now (milliseconds since the accept) and
    /// what passing it means, or `None` while a request is in flight.
    fn deadline_ms(&self, header_ms: u64, idle_ms: u64) -> Option<(u64, Expired)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let head = self.head_started_ms.load(Ordering::Acquire);
        let (due_ms, expired) = if self.requests.load(Ordering::Relaxed) == 0 {
            (header_ms, Expired::Headers)
        } else if head != NONE {
            (head.saturating_add(header_ms), Expired::Headers)
        } else {
            let last = self.last_io_ms.load(Ordering::Relaxed);
            (last.saturating_add(idle_ms), Expired::Idle)
        };
        Some((due_ms, expired))
    }

    /// Resolves when the connection has waited too long for a request head,
    /// or has been idle too long.
    ///
    /// Nothing wakes it when a request starts or ends or a head starts:
    /// notifying it per request cost a wake-up of the connection task and a
    /// timer insertion each time. Instead it sleeps until the deadline that
    /// applies now, but never longer than the shorter of the two timeouts:
    /// any deadline a later event sets (a head starting, a request ending)
    /// falls at least that long after the event, so it is never overslept,
    /// and on waking the state is read again. Bytes moving only push the
    /// idle deadline later, which the next wake-up also finds.
    async fn expired(&self, limits: ConnectionLimits) -> Expired {
        let header_ms = millis(limits.header_read_timeout);
        let idle_ms = millis(limits.idle_timeout);
        // In the whole milliseconds events are recorded in; a timeout under
        // one rounds to zero, and tokio's timer is no finer anyway.
        let recheck_ms = header_ms.min(idle_ms).max(1);
        // One timer for the connection's life, moved with `reset` rather
        // than made anew at each wake-up.
        let sleep = tokio::time::sleep_until(self.accepted);
        tokio::pin!(sleep);
        loop {
            let now_ms = self.now_ms();
            let wake_ms = match self.deadline_ms(header_ms, idle_ms) {
                Some((due_ms, expired)) if now_ms >= due_ms => return expired,
                Some((due_ms, _)) => due_ms.min(now_ms.saturating_add(recheck_ms)),
                None => now_ms.saturating_add(recheck_ms),
            };
            sleep
                .as_mut()
                .reset(self.accepted + Duration::from_millis(wake_ms));
            sleep.as_mut().await;
        }
    }
}

/// A request in flight on a connection, until its response body is done.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        // The idle clock starts when the request ends.
        activity.moved();
        // A head byte counted while this request was in flight belongs to
        // no head the watchdog should time.
        activity.head_started_ms.store(NONE, Ordering::Release);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The router, called with the peer's address as `ConnectInfo` (what
/// `into_make_service_with_connect_info` would give it), the connection's
/// [`Handoff`] if the request carries `Upgrade`, and with each request
/// counted in flight until its response body is done.
#[derive(Debug, Clone)]
struct RequestService {
    router: TowerToHyperService<Router>,
    peer: SocketAddr,
    activity: Arc<Activity>,
    handoff: Handoff,
}

impl hyper::service::Service<hyper::Request<Incoming>> for RequestService {
    type Response = hyper::Response<Tracked>;
    type Error = std::convert::Infallible;
    type Future = Responding;

    fn call(&self, mut request: hyper::Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(ConnectInfo(self.peer));
        // Only upgrade requests pay for the extension.
        if request.headers().contains_key(hyper::header::UPGRADE) {
            request.extensions_mut().insert(self.handoff.clone());
        }
        let in_flight = Some(self.activity.request_started());
        Responding {
            response: self.router.call(request),
            in_flight,
        }
    }
}

/// The router's response future, handing the request's [`InFlight`] on to
/// the response body. A named type rather than a boxed `async` block saves
/// an allocation per request.
struct Responding {
    response: TowerToHyperServiceFuture<Router, hyper::Request<Incoming>>,
    /// Taken when the response is ready; dropped with the future if the
    /// request is abandoned first.
    in_flight: Option<InFlight>,
}

impl Future for Responding {
    type Output = Result<hyper::Response<Tracked>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let response = ready!(Pin::new(&mut this.response).poll(cx))?;
        let in_flight = this
            .in_flight
            .take()
            .expect("a ready response future is not polled again");
        Poll::Ready(Ok(response.map(|body| Tracked {
            body,
            _in_flight: in_flight,
        })))
    }
}

/// A response body that keeps its request counted in flight until hyper
/// drops it.
#[derive(Debug)]
struct Tracked {
    body: axum::body::Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection's socket: reports bytes moving to the [`Activity`], and
/// fails a write that stays pending past the stall timeout.
#[derive(Debug)]
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
    stall_timeout: Duration,
    /// Armed while a write is pending; kept to be reset, not reallocated.
    stall: Option<(bool, Pin<Box<Sleep>>)>,
}

impl Watched {
    /// The outcome of a write attempt: progress disarms the stall timer,
    /// pending arms it (once per stall) and fails the write when it fires.
    fn on_write(
        &mut self,
        cx: &mut Context<'_>,
        attempt: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match attempt {
            Poll::Ready(result) => {
                if let Some((armed, _)) = &mut self.stall {
                    *armed = false;
                }
                if matches!(result, Ok(written) if written > 0) {
                    self.activity.wrote();
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                let deadline = Instant::now() + self.stall_timeout;
                let (armed, sleep) = self
                    .stall
                    .get_or_insert_with(|| (false, Box::pin(tokio::time::sleep_until(deadline))));
                if !*armed {
                    *armed = true;
                    sleep.as_mut().reset(deadline);
                }
                // Polling the timer registers this task to be woken when it
                // fires, so a client that never reads cannot park the
                // connection forever.
                match sleep.as_mut().poll(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(()) => {
                        self.activity.stalled.store(true, Ordering::Relaxed);
                        Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "the client read nothing of the response for {}",
                                humantime::format_duration(self.stall_timeout)
                            ),
                        )))
                    }
                }
            }
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.read();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let attempt = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.on_write(cx, attempt)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let attempt = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.on_write(cx, attempt)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
