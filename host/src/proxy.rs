//! The reverse proxy to remote services.
//!
//! One pooled HTTP/1.1 client (hyper-util's legacy client) serves every
//! remote service, so requests reuse keep-alive connections instead of
//! opening one each. Its `HttpConnector` resolves the service's host with
//! the system resolver at connect time and tries every address it gets,
//! IPv6 and IPv4 alike (so `localhost` reaches `::1` only where the system
//! resolves it so); a connection that worked stays in the pool.
//! Bodies are streamed both ways, never collected: memory per request is
//! bounded by hyper's buffers whatever the body's size.
//!
//! It owns nothing but its connection pool. Which instance to use, and
//! whether the service may be used at all, is the [`RemoteService`]'s to
//! say; the gateway has already refused paths that could leave the
//! service's base path.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::uri::Authority;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::egress::{EgressPolicy, LoopGuard, Resolver};
use crate::http::{ApiError, error_chain, new_request_id, remove_hop_by_hop};
use crate::metrics::{ServiceTraffic, UpstreamError};
use crate::remote::{RemoteService, Route};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");

/// Longest client-supplied `X-Request-Id` kept; a longer one is replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Forwards gateway requests to remote services. Cheap to clone: clones
/// share the connection pool.
#[derive(Debug, Clone)]
pub struct Proxy {
    client: Client<HttpConnector<Resolver>, Tracked>,
    timeout: Duration,
    loop_guard: LoopGuard,
}

impl Proxy {
    /// A proxy whose upstreams must start answering within `timeout` of the
    /// end of the request (504 otherwise). Connections go only to addresses `egress` admits, and every
    /// request carries `loop_guard`'s `Via` entry.
    pub fn new(timeout: Duration, egress: Arc<EgressPolicy>, loop_guard: LoopGuard) -> Self {
        let mut connector = HttpConnector::new_with_resolver(Resolver::new(egress));
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .build(connector);
        Self {
            client,
            timeout,
            loop_guard,
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
        let route = match remote.route() {
            Ok(route) => route,
            Err(unavailable) => {
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("service `{name}` is unhealthy: {unavailable}"),
                )
                .with("service", name)
                .with("status", "unhealthy")
                .into_response();
            }
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
        let upstream = Request::from_parts(
            parts,
            Tracked {
                body,
                progress: progress.clone(),
            },
        );

        let started = Instant::now();
        let answer = self.client.request(upstream);
        tokio::pin!(answer);
        // The upstream has `timeout` to answer once the request is sent:
        // the deadline moves while the client's body is still flowing, so
        // a large upload is not cut off by its own length.
        let mut deadline = started + self.timeout;
        let result = loop {
            tokio::select! {
                result = &mut answer => break result,
                () = tokio::time::sleep_until(deadline.into()) => {
                    let (next, stalled) = match &progress {
                        Some(progress) => (progress.last_activity() + self.timeout, progress.is_stalled()),
                        None => (deadline, false),
                    };
                    if next <= Instant::now() && stalled {
                        // The upstream was reading and the client stopped
                        // sending its body: the client's fault.
                        tracing::debug!(service = %name, "client stalled while uploading");
                        return ApiError::new(
                            StatusCode::REQUEST_TIMEOUT,
                            format!("request body stalled for {}", humantime::format_duration(self.timeout)),
                        )
                        .with("service", name)
                        .into_response();
                    }
                    if next <= Instant::now() {
                        traffic.upstream_failed(UpstreamError::Timeout);
                        tracing::warn!(service = %name, upstream = %route.authority, timeout_ms = self.timeout.as_millis() as u64, "remote service did not answer in time");
                        return ApiError::new(
                            StatusCode::GATEWAY_TIMEOUT,
                            format!("service `{name}` at {} did not answer within {}", route.authority, humantime::format_duration(self.timeout)),
                        )
                        .with("service", name)
                        .into_response();
                    }
                    deadline = next;
                }
            }
        };
        match result {
            Ok(response) => {
                traffic.upstream_answered(started.elapsed());
                let (mut parts, body) = response.into_parts();
                remove_hop_by_hop(&mut parts.headers);
                if Redirects::apply_to(&parts.headers) {
                    Redirects {
                        upstream: &route.authority,
                        base_path: route.base_path().trim_end_matches('/'),
                        mount: format!("/api/{name}"),
                        gateway_host,
                    }
                    .rewrite(&mut parts.headers);
                }
                parts.headers.entry(X_REQUEST_ID).or_insert(request_id);
                tracing::debug!(
                    service = %name,
                    %method,
                    status = parts.status.as_u16(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "proxied"
                );
                Response::from_parts(parts, Body::new(body))
            }
            Err(error) => failure(name, &route, &error, traffic),
        }
    }
}

/// The answer for a request that got no response from the upstream.
fn failure(
    name: &str,
    route: &Route<'_>,
    error: &hyper_util::client::legacy::Error,
    traffic: &ServiceTraffic,
) -> Response {
    let detail = error_chain(error);
    let client_side =
        std::iter::successors(Some(error as &(dyn std::error::Error + 'static)), |error| {
            error.source()
        })
        .any(|error| error.is::<axum::Error>());
    let (status, message) = if client_side {
        // The client's own body broke off; nothing the upstream did.
        (
            StatusCode::BAD_REQUEST,
            format!("could not read the request body: {detail}"),
        )
    } else if error.is_connect() {
        traffic.upstream_failed(UpstreamError::Connect);
        (
            StatusCode::BAD_GATEWAY,
            format!(
                "cannot connect to service `{name}` at {}: {detail}",
                route.authority
            ),
        )
    } else {
        traffic.upstream_failed(UpstreamError::Reset);
        (
            StatusCode::BAD_GATEWAY,
            format!(
                "service `{name}` at {} failed to answer: {detail}",
                route.authority
            ),
        )
    };
    if status == StatusCode::BAD_GATEWAY {
        tracing::warn!(service = %name, upstream = %route.authority, error = %detail, "remote service unreachable");
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
#[derive(Debug)]
struct Tracked {
    body: Body,
    progress: Option<Arc<Progress>>,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        let Some(progress) = &self.progress else {
            return polled;
        };
        progress.polled.store(true, Ordering::Relaxed);
        match &polled {
            Poll::Ready(Some(Ok(_))) => {
                progress.touch();
                if self.body.is_end_stream() {
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
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
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
