//! The reverse proxy to remote services.
//!
//! Requests reuse keep-alive HTTP/1.1 connections, pooled per instance
//! ([`crate::remote::Pool`]) and driven from the request's own task
//! (hyper's `client::conn::http1`): a request checks a connection out,
//! sends on it and puts it back when the answer's body has ended, with no
//! hand-off to a pool task in between (hyper-util's legacy client, used
//! before, cost a channel, a oneshot and a spawned task per request). Each
//! connection's I/O runs in a task of its own, spawned once when it is
//! opened. A pooled connection found closed before the request went out
//! is dropped and the next one (or a new one) is used; one idle for
//! [`IDLE_TIMEOUT`] is closed; at most [`MAX_IDLE_PER_INSTANCE`] are kept
//! per instance. New connections come from hyper-util's `HttpConnector`,
//! which resolves the service's host with the system resolver (filtered
//! by the egress policy) at connect time and tries every address it gets,
//! IPv6 and IPv4 alike (so `localhost` reaches `::1` only where the system
//! resolves it so), with `TCP_NODELAY`.
//! Bodies are streamed both ways, never collected: memory per request is
//! bounded by hyper's buffers whatever the body's size.
//!
//! An upgrade request (a WebSocket handshake) takes [`Proxy::upgrade`]: the
//! same route, headers, `Via` stamp and pool, with its `Upgrade` and
//! `Connection` headers kept; on the upstream's `101` both connections are
//! left to [`crate::tunnel`].
//!
//! It owns nothing but its connection pool. Which instance to use, and
//! whether the service may be used at all, is the [`RemoteService`]'s to
//! say (by the live [`InstancePolicy`]); the proxy tells it how each
//! request went (a connect error, a failed answer, a timeout or a 5xx
//! counts against the instance, for outlier ejection) and holds the
//! instance's outstanding-request count until the answer's body ends.
//! The gateway has already refused paths that could leave the service's
//! base path.
//!
//! **Retries.** An idempotent request (GET, HEAD, OPTIONS, PUT, DELETE)
//! that met a connect error, or a kept-alive connection the instance
//! closed without a byte of answer (an instance shutting down closes its
//! idle connections, racing the request sent on one; nginx retries the
//! same case), is sent once more, to another instance, if its body was
//! never sent: none at all, or one the failed attempt never polled (the
//! body waits in a slot the attempt borrows it from, so nothing is
//! buffered). A request that got any answer is never retried, nor is a
//! POST or PATCH.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::extract::Request;
use axum::http::uri::Authority;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::HttpConnector;
use tower_service::Service as _;

use crate::egress::{EgressPolicy, LoopGuard, Resolver};
use crate::http::{ApiError, error_chain, new_request_id, remove_hop_by_hop};
use crate::metrics::{ServiceTraffic, UpstreamError};
use crate::remote::{
    Instance, InstancePolicy, Outstanding, RemoteService, Route, Sender, Unavailable,
};
use crate::sync::lock;
use crate::tunnel::{self, Handoff};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");

/// Longest client-supplied `X-Request-Id` kept; a longer one is replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// How long an upstream connection may sit idle in its pool before it is
/// closed (hyper-util's client's default, which the proxy used before).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Most idle connections kept per instance; one more is closed when put
/// back.
pub const MAX_IDLE_PER_INSTANCE: usize = 256;

/// Forwards gateway requests to remote services. Cheap to clone: clones
/// share the connector and the idle sweep (the pools are the instances').
#[derive(Debug, Clone)]
pub struct Proxy {
    upstreams: Arc<Upstreams>,
    timeout: Duration,
    loop_guard: LoopGuard,
    instances: Arc<ArcSwap<InstancePolicy>>,
}

impl Proxy {
    /// A proxy whose upstreams must start answering within `timeout` of the
    /// end of the request (504 otherwise). Connections go only to addresses `egress` admits, and every
    /// request carries `loop_guard`'s `Via` entry. `instances` (balancing,
    /// ejection, protect threshold) is loaded per request.
    pub fn new(
        timeout: Duration,
        egress: Arc<EgressPolicy>,
        loop_guard: LoopGuard,
        instances: Arc<ArcSwap<InstancePolicy>>,
    ) -> Self {
        let mut connector = HttpConnector::new_with_resolver(Resolver::new(egress));
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let upstreams = Arc::new(Upstreams {
            connector,
            handshake: http1::Builder::new(),
            enrolled: Mutex::default(),
        });
        tokio::spawn(sweep_idle(Arc::downgrade(&upstreams)));
        Self {
            upstreams,
            timeout,
            loop_guard,
            instances,
        }
    }

    /// Forwards `request` to `remote`, at `rest` below its base path, and
    /// streams the answer back. Refusals are JSON naming the service: 503
    /// unhealthy, 502 unreachable or broken answer, 504 no answer in time.
    /// The upstream's time to answer and its failures are recorded in
    /// `traffic`.
    pub async fn forward(
        &self,
        remote: &RemoteService,
        traffic: &ServiceTraffic,
        rest: &str,
        client: SocketAddr,
        request: Request,
    ) -> Response {
        let name = remote.name();
        let policy = self.instances.load();
        let mut route = match remote.route(&policy, None) {
            Ok(route) => route,
            Err(unavailable) => return unhealthy(name, &unavailable),
        };
        let (mut parts, body) = request.into_parts();
        let uri = match route.uri(rest, parts.uri.query()) {
            Ok(uri) => uri,
            Err(error) => {
                return ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("cannot form the URL for service `{name}`: {error}"),
                )
                .with("service", name)
                .into_response();
            }
        };
        let request_id = request_id(&parts.headers);
        forwarding_headers(
            &mut parts.headers,
            client,
            parts.uri.authority(),
            &request_id,
        );
        self.loop_guard.stamp(&mut parts.headers);
        // A shared clone, for the redirect rewrite of the answer.
        let gateway_host = parts.headers.get(X_FORWARDED_HOST).cloned();
        if let Some(mount) = remote.mount() {
            parts.headers.insert(X_FORWARDED_PREFIX, mount.clone());
        }
        parts.uri = uri;
        // Upstreams are spoken to in HTTP/1.1 whatever the client used.
        parts.version = Version::HTTP_11;
        let method = parts.method.clone();
        // A body already complete (most GETs) cannot stall: nothing to
        // track, and the deadline below stays where it starts.
        let progress = (!body.is_end_stream()).then(|| Arc::new(Progress::new()));
        // What a retry needs: the head again, and the body if it is never
        // sent (an empty one is made anew). Only made where a retry can
        // happen.
        let mut retry = (is_idempotent(&method) && remote.instances().len() > 1).then(|| Head {
            method: parts.method.clone(),
            headers: parts.headers.clone(),
            query: parts.uri.query().map(str::to_owned),
        });
        let (tracked, slot) = Tracked::wrap(
            body,
            progress.clone(),
            retry.is_some() && progress.is_some(),
        );
        let mut upstream = Request::from_parts(parts, tracked);

        let started = Instant::now();
        let (answer, sender) = loop {
            let failed = match self
                .attempt(name, traffic, &route, upstream, progress.as_ref())
                .await
            {
                Attempt::Answered(response, sender) => {
                    let failed = response.status().is_server_error();
                    remote.record_outcome(route.instance(), !failed, &policy);
                    break (response, sender);
                }
                Attempt::Refused(response, blame) => {
                    if blame {
                        remote.record_outcome(route.instance(), false, &policy);
                    }
                    return response;
                }
                Attempt::Failed(error) => error,
            };
            if !failed.is_client_side() {
                remote.record_outcome(route.instance(), false, &policy);
            }
            // Retried once, elsewhere, and only if no answer came and the
            // body is still in its slot.
            let resend = match (retry.take(), failed.is_unanswered()) {
                (Some(head), true) => match &slot {
                    Some(slot) => slot.reclaim().map(|body| (head, body)),
                    None => Some((head, Body::empty())),
                },
                _ => None,
            };
            let next = resend.and_then(|resend| {
                remote
                    .route(&policy, Some(route.instance()))
                    .ok()
                    .map(|next| (resend, next))
            });
            let Some(((head, body), next)) = next else {
                return failure(name, &route, &failed, traffic);
            };
            let Ok(uri) = next.uri(rest, head.query.as_deref()) else {
                return failure(name, &route, &failed, traffic);
            };
            tracing::debug!(service = %name, failed = %route.authority(), retry = %next.authority(), error = %error_chain(&failed), "no answer; retrying on another instance");
            let mut request = Request::new(Tracked::wrap(body, progress.clone(), false).0);
            *request.method_mut() = head.method;
            *request.uri_mut() = uri;
            *request.version_mut() = Version::HTTP_11;
            *request.headers_mut() = head.headers;
            upstream = request;
            route = next;
        };
        traffic.upstream_answered(started.elapsed());
        let (mut parts, body) = answer.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        passed_back(name, &route, gateway_host, request_id, &mut parts);
        tracing::debug!(
            service = %name,
            %method,
            status = parts.status.as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "proxied"
        );
        Response::from_parts(
            parts,
            Held::body(body, Some(sender), route.into_outstanding()),
        )
    }

    /// Sends one attempt and waits for its answer's head. The upstream has
    /// `timeout` to answer once the request is sent: the deadline moves
    /// while the client's body is still flowing, so a large upload is not
    /// cut off by its own length.
    async fn attempt(
        &self,
        name: &str,
        traffic: &ServiceTraffic,
        route: &Route<'_>,
        upstream: Request<Body>,
        progress: Option<&Arc<Progress>>,
    ) -> Attempt {
        let started = Instant::now();
        let answer = self.upstreams.send(route.instance(), upstream);
        tokio::pin!(answer);
        let mut deadline = started + self.timeout;
        loop {
            tokio::select! {
                result = &mut answer => return match result {
                    Ok((response, sender)) => Attempt::Answered(response, sender),
                    Err(error) => Attempt::Failed(error),
                },
                () = tokio::time::sleep_until(deadline.into()) => {
                    let (next, stalled) = match progress {
                        Some(progress) => (progress.last_activity() + self.timeout, progress.is_stalled()),
                        None => (deadline, false),
                    };
                    if next <= Instant::now() && stalled {
                        // The upstream was reading and the client stopped
                        // sending its body: the client's fault.
                        tracing::debug!(service = %name, "client stalled while uploading");
                        let refusal = ApiError::new(
                            StatusCode::REQUEST_TIMEOUT,
                            format!("request body stalled for {}", humantime::format_duration(self.timeout)),
                        )
                        .with("service", name)
                        .into_response();
                        return Attempt::Refused(refusal, false);
                    }
                    if next <= Instant::now() {
                        traffic.upstream_failed(UpstreamError::Timeout);
                        tracing::warn!(service = %name, upstream = %route.authority(), timeout_ms = self.timeout.as_millis() as u64, "remote service did not answer in time");
                        let refusal = ApiError::new(
                            StatusCode::GATEWAY_TIMEOUT,
                            format!("service `{name}` at {} did not answer within {}", route.authority(), humantime::format_duration(self.timeout)),
                        )
                        .with("service", name)
                        .into_response();
                        return Attempt::Refused(refusal, true);
                    }
                    deadline = next;
                }
            }
        }
    }

    /// Forwards an upgrade request (`Connection: upgrade`, `Upgrade:
    /// protocol`, as [`tunnel::requested`] found it) to `remote`, at
    /// `rest`. On the upstream's `101` the client is answered `101` with the
    /// upstream's `Upgrade`, and both connections are left to the server as
    /// a tunnel; any other answer is passed back as [`Proxy::forward`]
    /// passes it. Refused before the upstream is asked: a request with a
    /// body (400), a listener whose tunnels are all open (503).
    pub async fn upgrade(
        &self,
        remote: &RemoteService,
        traffic: &ServiceTraffic,
        rest: &str,
        client: SocketAddr,
        protocol: HeaderValue,
        request: Request,
    ) -> Response {
        let name = remote.name();
        let (mut parts, body) = request.into_parts();
        let refuse = |status, message: String| {
            ApiError::new(status, message)
                .with("service", name)
                .into_response()
        };
        if !body.is_end_stream() {
            return refuse(
                StatusCode::BAD_REQUEST,
                "a protocol upgrade request must not have a body".to_owned(),
            );
        }
        // The server gives both to every HTTP/1.1 request carrying
        // `Upgrade`, which is all `tunnel::requested` lets through.
        let (Some(handoff), Some(client_side)) = (
            parts.extensions.remove::<Handoff>(),
            parts.extensions.remove::<hyper::upgrade::OnUpgrade>(),
        ) else {
            return refuse(
                StatusCode::NOT_IMPLEMENTED,
                "this connection cannot be upgraded".to_owned(),
            );
        };
        let reserved = match handoff.reserve() {
            Ok(reserved) => reserved,
            Err(full) => {
                tracing::warn!(service = %name, max_tunnels = full.max, "upgrade refused: tunnel limit reached");
                return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, full.to_string())
                    .with("service", name)
                    .with("limit", full.max)
                    .into_response();
            }
        };
        let policy = self.instances.load();
        let route = match remote.route(&policy, None) {
            Ok(route) => route,
            Err(unavailable) => return unhealthy(name, &unavailable),
        };
        let uri = match route.uri(rest, parts.uri.query()) {
            Ok(uri) => uri,
            Err(error) => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    format!("cannot form the URL for service `{name}`: {error}"),
                );
            }
        };
        let request_id = request_id(&parts.headers);
        forwarding_headers(
            &mut parts.headers,
            client,
            parts.uri.authority(),
            &request_id,
        );
        tunnel::restore_upgrade_headers(&mut parts.headers, protocol);
        self.loop_guard.stamp(&mut parts.headers);
        let gateway_host = parts.headers.get(X_FORWARDED_HOST).cloned();
        if let Some(mount) = remote.mount() {
            parts.headers.insert(X_FORWARDED_PREFIX, mount.clone());
        }
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        let upstream = Request::from_parts(parts, Body::empty());
        let answer = tokio::time::timeout(
            self.timeout,
            self.upstreams.send(route.instance(), upstream),
        )
        .await;
        let (mut response, sender) = match answer {
            Ok(Ok(answered)) => {
                let failed = answered.0.status().is_server_error();
                remote.record_outcome(route.instance(), !failed, &policy);
                answered
            }
            Ok(Err(error)) => {
                remote.record_outcome(route.instance(), false, &policy);
                return failure(name, &route, &error, traffic);
            }
            Err(_) => {
                remote.record_outcome(route.instance(), false, &policy);
                traffic.upstream_failed(UpstreamError::Timeout);
                tracing::warn!(service = %name, upstream = %route.authority(), timeout_ms = self.timeout.as_millis() as u64, "remote service did not answer the upgrade in time");
                return refuse(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "service `{name}` at {} did not answer within {}",
                        route.authority(),
                        humantime::format_duration(self.timeout)
                    ),
                );
            }
        };
        let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        let upstream_side = switched.then(|| hyper::upgrade::on(&mut response));
        // A switched connection is the tunnel's now, never the pool's.
        let sender = (!switched).then_some(sender);
        let (mut parts, body) = response.into_parts();
        let upgraded_to = parts.headers.get(header::UPGRADE).cloned();
        remove_hop_by_hop(&mut parts.headers);
        passed_back(name, &route, gateway_host, request_id, &mut parts);
        tracing::debug!(service = %name, status = parts.status.as_u16(), "upgrade proxied");
        if let Some(upstream_side) = upstream_side {
            let Some(upgraded_to) = upgraded_to else {
                return refuse(
                    StatusCode::BAD_GATEWAY,
                    format!("service `{name}` switched protocols without naming one in `Upgrade`"),
                );
            };
            tunnel::restore_upgrade_headers(&mut parts.headers, upgraded_to);
            reserved.accept(name, client_side, upstream_side);
        }
        Response::from_parts(parts, Held::body(body, sender, route.into_outstanding()))
    }
}

/// The upstream side of the proxy: opens connections (resolver, egress
/// checks, connect timeout, `TCP_NODELAY`) and sends requests on the
/// instances' pooled ones.
#[derive(Debug)]
struct Upstreams {
    connector: HttpConnector<Resolver>,
    handshake: http1::Builder,
    /// Every instance the proxy opened a connection to, for the idle
    /// sweep; touched once per instance, not per request.
    enrolled: Mutex<Vec<Weak<Instance>>>,
}

impl Upstreams {
    /// Sends `request` (its URI absolute, as [`Route::uri`] makes it) to
    /// `instance` on an idle connection, else on a new one, and returns
    /// the answer's head with the connection it came on, to be put back
    /// once the body has ended.
    async fn send(
        &self,
        instance: &Arc<Instance>,
        mut request: Request<Body>,
    ) -> Result<(Response<Incoming>, Sender), SendError> {
        let pool = instance.pool();
        // HTTP/1.1 asks in origin form and names the host in `Host`.
        let uri = std::mem::take(request.uri_mut());
        if let Some(path_and_query) = uri.into_parts().path_and_query {
            *request.uri_mut() = Uri::from(path_and_query);
        }
        request
            .headers_mut()
            .insert(header::HOST, pool.host().clone());
        while let Some(mut sender) = pool.take(Instant::now(), IDLE_TIMEOUT) {
            // Not ready yet: the connection is finishing the last exchange.
            if !sender.is_ready() && poll_fn(|cx| sender.poll_ready(cx)).await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, sender)),
                Err(mut failed) => match failed.take_message() {
                    // Closed before it took the request: nothing was sent.
                    Some(unsent) => request = unsent,
                    None => return Err(SendError::Http(failed.into_error())),
                },
            }
        }
        // Boxed: opening a connection is rare, and its future would make
        // every request's future larger.
        let mut sender = Box::pin(self.connect(instance)).await?;
        let response = sender.send_request(request).await?;
        Ok((response, sender))
    }

    /// A new connection to `instance`, its I/O running in a task of its own
    /// until either side closes it (or it is upgraded and handed to a
    /// tunnel).
    async fn connect(&self, instance: &Arc<Instance>) -> Result<Sender, SendError> {
        let target = Uri::builder()
            .scheme("http")
            .authority(instance.authority().clone())
            .path_and_query("/")
            .build()
            .map_err(|error| SendError::Connect(error.into()))?;
        let io = self
            .connector
            .clone()
            .call(target)
            .await
            .map_err(|error| SendError::Connect(error.into()))?;
        let (sender, connection) = self
            .handshake
            .handshake(io)
            .await
            .map_err(|error| SendError::Connect(error.into()))?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(error = %error_chain(&error), "upstream connection failed");
            }
        });
        if instance.pool().enroll() {
            lock(&self.enrolled).push(Arc::downgrade(instance));
        }
        Ok(sender)
    }
}

/// Closes pooled connections idle for longer than [`IDLE_TIMEOUT`] (a
/// busy pool never holds one: it takes from the top, where the newest
/// are), every half of it, until the proxy is dropped.
async fn sweep_idle(upstreams: Weak<Upstreams>) {
    let mut every = tokio::time::interval(IDLE_TIMEOUT / 2);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(upstreams) = upstreams.upgrade() else {
            return;
        };
        let now = Instant::now();
        let instances: Vec<Arc<Instance>> = {
            let mut enrolled = lock(&upstreams.enrolled);
            enrolled.retain(|instance| instance.strong_count() > 0);
            enrolled.iter().filter_map(Weak::upgrade).collect()
        };
        for instance in instances {
            instance.pool().sweep(now, IDLE_TIMEOUT);
        }
    }
}

/// Why a request got no answer from its upstream.
#[derive(Debug, thiserror::Error)]
enum SendError {
    /// No connection: resolving, the egress policy, connecting or the
    /// handshake failed. Nothing was sent.
    #[error(transparent)]
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The exchange on a connection failed.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl SendError {
    /// Whether it is the client's own body breaking off, not the
    /// upstream's doing.
    fn is_client_side(&self) -> bool {
        std::iter::successors(Some(self as &(dyn std::error::Error + 'static)), |error| {
            error.source()
        })
        .any(|error| error.is::<axum::Error>())
    }

    /// Whether it left the request without a byte of answer: no
    /// connection, or a kept-alive one the instance closed before
    /// answering.
    fn is_unanswered(&self) -> bool {
        match self {
            Self::Connect(_) => true,
            Self::Http(error) => error.is_incomplete_message(),
        }
    }
}

/// The answer for a service that is not routed to now.
fn unhealthy(name: &str, unavailable: &Unavailable) -> Response {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("service `{name}` is unhealthy: {unavailable}"),
    )
    .with("service", name)
    .with("status", "unhealthy")
    .into_response()
}

/// Makes an upstream's answer (hop-by-hop headers already removed) the
/// client's: redirects into the service rewritten to its mount, and the
/// request's id.
fn passed_back(
    name: &str,
    route: &Route<'_>,
    gateway_host: Option<HeaderValue>,
    request_id: HeaderValue,
    parts: &mut axum::http::response::Parts,
) {
    if Redirects::apply_to(&parts.headers) {
        Redirects {
            upstream: route.authority(),
            base_path: route.base_path().trim_end_matches('/'),
            mount: format!("/api/{name}"),
            gateway_host,
        }
        .rewrite(&mut parts.headers);
    }
    parts.headers.entry(X_REQUEST_ID).or_insert(request_id);
}

/// What a retry sends again of a request's head.
struct Head {
    method: Method,
    headers: HeaderMap,
    query: Option<String>,
}

/// How one attempt ended.
enum Attempt {
    /// The upstream answered (its body still to stream on the connection
    /// that comes with it).
    Answered(Response<Incoming>, Sender),
    /// No answer: the error, for the retry decision and the 502.
    Failed(SendError),
    /// Given up by the proxy (408, 504), and whether the instance is to
    /// blame.
    Refused(Response, bool),
}

/// Methods a retry cannot repeat the effect of.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

/// An answer's body, holding its instance's outstanding-request count until
/// it ends (or the client goes away), and the connection it comes on, put
/// back in the instance's pool once the body has ended. A body the client
/// abandons takes its connection with it: hyper closes it.
struct Held {
    body: Incoming,
    sender: Option<Sender>,
    outstanding: Outstanding,
}

impl Held {
    /// The client's body for `body`, arriving on `sender`'s connection.
    fn body(body: Incoming, sender: Option<Sender>, outstanding: Outstanding) -> Body {
        let mut held = Self {
            body,
            sender,
            outstanding,
        };
        // The server does not poll a body that is empty from the start.
        if held.body.is_end_stream() {
            held.release();
        }
        Body::new(held)
    }

    /// Puts the connection back in its pool, or, if it is not ready for
    /// another request yet (the upstream answered before reading the whole
    /// request body), once it is.
    fn release(&mut self) {
        let Some(mut sender) = self.sender.take() else {
            return;
        };
        let instance = self.outstanding.instance();
        if sender.is_ready() {
            instance
                .pool()
                .put(sender, Instant::now(), MAX_IDLE_PER_INSTANCE);
            return;
        }
        let instance = instance.clone();
        tokio::spawn(async move {
            if poll_fn(|cx| sender.poll_ready(cx)).await.is_ok() {
                instance
                    .pool()
                    .put(sender, Instant::now(), MAX_IDLE_PER_INSTANCE);
            }
        });
    }
}

impl HttpBody for Held {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.release(),
            // A broken body leaves a connection in no state to reuse.
            Poll::Ready(Some(Err(_))) => self.sender = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The answer for a request that got no response from the upstream.
fn failure(name: &str, route: &Route<'_>, error: &SendError, traffic: &ServiceTraffic) -> Response {
    let detail = error_chain(error);
    let (status, message) = if error.is_client_side() {
        // The client's own body broke off; nothing the upstream did.
        (
            StatusCode::BAD_REQUEST,
            format!("could not read the request body: {detail}"),
        )
    } else if matches!(error, SendError::Connect(_)) {
        traffic.upstream_failed(UpstreamError::Connect);
        (
            StatusCode::BAD_GATEWAY,
            format!(
                "cannot connect to service `{name}` at {}: {detail}",
                route.authority()
            ),
        )
    } else {
        traffic.upstream_failed(UpstreamError::Reset);
        (
            StatusCode::BAD_GATEWAY,
            format!(
                "service `{name}` at {} failed to answer: {detail}",
                route.authority()
            ),
        )
    };
    if status == StatusCode::BAD_GATEWAY {
        tracing::warn!(service = %name, upstream = %route.authority(), error = %detail, "remote service unreachable");
    }
    ApiError::new(status, message)
        .with("service", name)
        .into_response()
}

/// The client's `X-Request-Id` if it sent a usable one, else a new one
/// ([`new_request_id`]).
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(X_REQUEST_ID)
        .filter(|id| {
            !id.is_empty()
                && id.len() <= MAX_REQUEST_ID_LEN
                && id.as_bytes().iter().all(|b| b.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(new_request_id)
}

/// Turns the client's headers into the upstream's: hop-by-hop headers out,
/// `Host` left for the client to set from the upstream URL, and the
/// `X-Forwarded-*` and `X-Request-Id` headers in.
fn forwarding_headers(
    headers: &mut HeaderMap,
    client: SocketAddr,
    uri_authority: Option<&axum::http::uri::Authority>,
    request_id: &HeaderValue,
) {
    let original_host = headers.remove(header::HOST).or_else(|| {
        // HTTP/2 clients send `:authority` instead of `Host`.
        uri_authority.and_then(|authority| HeaderValue::from_str(authority.as_str()).ok())
    });
    remove_hop_by_hop(headers);
    // The gateway's server has already answered `Expect: 100-continue` to
    // the client; the upstream gets the body without waiting.
    headers.remove(header::EXPECT);
    // Append to a chain built by proxies in front of us, as they expect.
    let mut forwarded_for = String::new();
    for hops in headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|hops| !hops.is_empty())
    {
        forwarded_for.push_str(hops);
        forwarded_for.push_str(", ");
    }
    // Written in place: `IpAddr` formats into any `fmt::Write`.
    let _ = std::fmt::Write::write_fmt(&mut forwarded_for, format_args!("{}", client.ip()));
    if let Ok(value) = HeaderValue::try_from(forwarded_for) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    // The gateway speaks plain HTTP; what the client claimed is replaced.
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    match original_host {
        Some(host) => headers.insert(X_FORWARDED_HOST, host),
        None => headers.remove(X_FORWARDED_HOST),
    };
    headers.insert(X_REQUEST_ID, request_id.clone());
}

/// Where a service's answers may send the client, seen from the gateway.
///
/// A service builds redirect URLs from what it was asked: its own address
/// (the `Host` the proxy sent) and its own paths. Passed on unchanged, they
/// send the client around the gateway (and around whatever the gateway
/// enforces) or to a path outside the service's mount. So, as nginx's
/// `proxy_redirect default` does, `Location`, `Content-Location` and the URL
/// in `Refresh` are rewritten when they point at the upstream's own
/// authority or are absolute paths: the base path becomes `/api/<name>`, and
/// an absolute URL gets the host the client used. Relative references and
/// other hosts are left alone; they resolve correctly or are not ours.
struct Redirects<'a> {
    upstream: &'a Authority,
    /// Without its trailing `/`: `""` for a service at the root.
    base_path: &'a str,
    mount: String,
    gateway_host: Option<HeaderValue>,
}

impl Redirects<'_> {
    /// Whether `headers` hold anything [`Redirects::rewrite`] may change:
    /// most answers do not, and skip building the rewrite.
    fn apply_to(headers: &HeaderMap) -> bool {
        headers.contains_key(header::LOCATION)
            || headers.contains_key(header::CONTENT_LOCATION)
            || headers.contains_key(header::REFRESH)
    }

    fn rewrite(&self, headers: &mut HeaderMap) {
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            if let Some(url) = headers.get(&name).and_then(|value| value.to_str().ok())
                && let Some(public) = self.public_url(url)
                && let Ok(value) = HeaderValue::from_str(&public)
            {
                headers.insert(name, value);
            }
        }
        // `Refresh: 5; url=http://...`
        if let Some(refresh) = headers
            .get(header::REFRESH)
            .and_then(|value| value.to_str().ok())
            && let Some(at) = refresh.to_ascii_lowercase().find("url=")
        {
            let url = refresh[at + 4..].trim().trim_matches(['\'', '"']);
            if let Some(public) = self.public_url(url)
                && let Ok(value) = HeaderValue::from_str(&format!("{}{public}", &refresh[..at + 4]))
            {
                headers.insert(header::REFRESH, value);
            }
        }
    }

    /// `url` as the client must follow it, if it points into the service.
    fn public_url(&self, url: &str) -> Option<String> {
        let scheme_end = ["http://", "https://"].iter().find_map(|scheme| {
            url.get(..scheme.len())
                .filter(|head| head.eq_ignore_ascii_case(scheme))
                .map(|_| scheme.len())
        });
        let (absolute, path) = match scheme_end {
            Some(end) => {
                let rest = &url[end..];
                let (authority, path) =
                    rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
                if !authority.eq_ignore_ascii_case(self.upstream.as_str()) {
                    return None;
                }
                (true, path)
            }
            None if url.starts_with('/') && !url.starts_with("//") => (false, url),
            None => return None,
        };
        let below = path.strip_prefix(self.base_path)?;
        if !(below.is_empty() || below.starts_with(['/', '?', '#'])) {
            return None;
        }
        let public = format!("{}{below}", self.mount);
        match (absolute, &self.gateway_host) {
            (true, Some(host)) => Some(format!("http://{}{public}", host.to_str().ok()?)),
            _ => Some(public),
        }
    }
}

/// When the client's request body last moved, and whether it is complete.
#[derive(Debug)]
struct Progress {
    start: Instant,
    /// Microseconds after `start`.
    last_us: AtomicU64,
    /// The upstream connection asked for the body at least once.
    polled: AtomicBool,
    finished: AtomicBool,
}

impl Progress {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_us: AtomicU64::new(0),
            polled: AtomicBool::new(false),
            finished: AtomicBool::new(false),
        }
    }

    fn finish(&self) {
        self.finished.store(true, Ordering::Relaxed);
    }

    /// Whether the body started flowing to the upstream and is not
    /// complete: a wait is then the client's, not the upstream's.
    fn is_stalled(&self) -> bool {
        self.polled.load(Ordering::Relaxed) && !self.finished.load(Ordering::Relaxed)
    }

    fn touch(&self) {
        let elapsed = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last_us.store(elapsed, Ordering::Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.start + Duration::from_micros(self.last_us.load(Ordering::Relaxed))
    }
}

/// The client's body on its way upstream, passed through frame by frame
/// and noting when each frame went by (`None`: it was complete from the
/// start).
///
/// A body that a retry may need again is lent: it waits in a [`Slot`]
/// until the upstream connection first asks for it, so after a failed
/// attempt the proxy can tell whether it was ever sent, and take it back
/// if not.
#[derive(Debug)]
struct Tracked {
    source: Source,
    /// The body's own, read before it was lent.
    end_stream: bool,
    size_hint: SizeHint,
    progress: Option<Arc<Progress>>,
}

#[derive(Debug)]
enum Source {
    Owned(Body),
    Lent(Slot),
}

/// A lent body, until the attempt it is lent to first polls it.
#[derive(Debug, Clone)]
struct Slot(Arc<Mutex<Option<Body>>>);

impl Slot {
    /// The body, if no attempt took it (so none of it was sent).
    fn reclaim(&self) -> Option<Body> {
        lock(&self.0).take()
    }
}

impl Tracked {
    /// `body` to send, lent through a slot (returned) when `lend`; as it
    /// is when there is nothing to track or lend (most requests), which
    /// saves boxing it again.
    fn wrap(body: Body, progress: Option<Arc<Progress>>, lend: bool) -> (Body, Option<Slot>) {
        if progress.is_none() && !lend {
            return (body, None);
        }
        let end_stream = body.is_end_stream();
        let size_hint = body.size_hint();
        let (source, slot) = if lend {
            let slot = Slot(Arc::new(Mutex::new(Some(body))));
            (Source::Lent(slot.clone()), Some(slot))
        } else {
            (Source::Owned(body), None)
        };
        let tracked = Self {
            source,
            end_stream,
            size_hint,
            progress,
        };
        (Body::new(tracked), slot)
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Source::Lent(slot) = &self.source {
            let lent = lock(&slot.0).take();
            match lent {
                Some(body) => self.source = Source::Owned(body),
                // Taken back by a retry: this attempt is over.
                None => return Poll::Ready(None),
            }
        }
        let Source::Owned(body) = &mut self.source else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *body).poll_frame(cx);
        let end_stream = body.is_end_stream();
        let Some(progress) = &self.progress else {
            return polled;
        };
        progress.polled.store(true, Ordering::Relaxed);
        match &polled {
            Poll::Ready(Some(Ok(_))) => {
                progress.touch();
                if end_stream {
                    progress.finish();
                }
            }
            Poll::Ready(None) => {
                progress.touch();
                progress.finish();
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Owned(body) => body.is_end_stream(),
            Source::Lent(_) => self.end_stream,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Owned(body) => body.size_hint(),
            Source::Lent(_) => self.size_hint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_headers_are_set_and_hop_by_hop_ones_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("gw.example:8000"));
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        let id = request_id(&headers);
        forwarding_headers(&mut headers, "127.0.0.2:5000".parse().unwrap(), None, &id);
        assert!(!headers.contains_key(header::HOST));
        assert!(!headers.contains_key("x-secret"));
        assert!(!headers.contains_key(header::CONNECTION));
        assert_eq!(headers[X_FORWARDED_FOR], "10.0.0.1, 127.0.0.2");
        assert_eq!(headers[X_FORWARDED_PROTO], "http");
        assert_eq!(headers[X_FORWARDED_HOST], "gw.example:8000");
        // A generated id (`http::new_request_id`): two 16-digit hex
        // numbers, no longer a UUID, which cost a getrandom call each.
        assert_eq!(headers[X_REQUEST_ID].len(), 33);
    }

    #[test]
    fn a_usable_request_id_is_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&headers), "abc-123");
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(request_id(&headers), "has space");
    }

    #[test]
    fn redirects_into_the_service_are_rewritten_to_its_mount() {
        let upstream: Authority = "localhost:8010".parse().unwrap();
        let at = |base_path| Redirects {
            upstream: &upstream,
            base_path,
            mount: "/api/svc".to_owned(),
            gateway_host: Some(HeaderValue::from_static("gw:8000")),
        };
        let root = at("");
        assert_eq!(
            root.public_url("http://localhost:8010/data").as_deref(),
            Some("http://gw:8000/api/svc/data")
        );
        assert_eq!(
            root.public_url("HTTP://LOCALHOST:8010?x=1").as_deref(),
            Some("http://gw:8000/api/svc?x=1")
        );
        assert_eq!(root.public_url("/get").as_deref(), Some("/api/svc/get"));
        assert_eq!(root.public_url("get"), None);
        assert_eq!(root.public_url("//elsewhere/x"), None);
        assert_eq!(root.public_url("http://elsewhere:8010/x"), None);
        let v1 = at("/v1");
        assert_eq!(v1.public_url("/v1/a").as_deref(), Some("/api/svc/a"));
        assert_eq!(v1.public_url("/v1").as_deref(), Some("/api/svc"));
        assert_eq!(v1.public_url("/v10/a"), None);
        assert_eq!(v1.public_url("/other"), None);

        let mut headers = HeaderMap::new();
        headers.insert(header::LOCATION, HeaderValue::from_static("/v1/next"));
        headers.insert(
            header::REFRESH,
            HeaderValue::from_static("5; URL='http://localhost:8010/v1/later'"),
        );
        v1.rewrite(&mut headers);
        assert_eq!(headers[header::LOCATION], "/api/svc/next");
        assert_eq!(
            headers[header::REFRESH],
            "5; URL=http://gw:8000/api/svc/later"
        );
    }
}
