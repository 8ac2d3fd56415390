//! Stand-ins for remote services: small axum servers on loopback that the
//! tests register with a host and reach through its gateway, and helpers
//! to speak the registry API.
//!
//! ```no_run
//! # async fn example() {
//! use host_harness::{http::registration, workspace};
//! use integration_tests::upstream::{Upstream, register};
//! let host = workspace::host_builder().start().await.unwrap();
//! let upstream = Upstream::start().await;
//! let (status, _) = register(&host, &registration("svc", upstream.addr())).await;
//! assert_eq!(status, 201);
//! # }
//! ```
//!
//! Routes (also under `/v1`, for base-path tests):
//! - `GET /health`: 200, or 503 after [`Upstream::set_healthy`]`(false)`.
//! - `GET /hello?name=X`: `{"message": "Hello, X!"}`, like the seed guide.
//! - `GET /close`: `closing`, with `Connection: close`: the connection ends
//!   after each answer.
//! - `ANY /echo/...`: the request as JSON (method, path, query, headers,
//!   body length).
//! - `POST /count`: reads the body as a stream and answers how many bytes
//!   it had and whether they followed [`pattern_byte`].
//! - `GET /bytes/{n}`: `n` bytes of [`pattern_byte`], streamed.
//! - `GET /slow/{ms}`: answers after `ms` milliseconds.
//! - `GET /redirect/{kind}`: redirects to `/hello?name=<kind>` the way web
//!   frameworks build their redirects, from the `Host` they were asked and
//!   their own paths: `absolute` (307, `http://<Host>/...`), `path` (301,
//!   `/hello...`), `relative` (302, `../hello...`), `chain` (302 to
//!   `redirect/absolute`).
//! - `GET /ws`: a WebSocket echo: every text and binary message is sent
//!   back as it came. The handshake's headers are kept
//!   ([`Upstream::last_upgrade_headers`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{OriginalUri, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::serve::ListenerExt;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use host_harness::Host;
use host_harness::http::{self, client, post_json};

/// The byte at `offset` of every body the upstream streams or checks.
pub fn pattern_byte(offset: u64) -> u8 {
    (offset % 251) as u8
}

#[derive(Debug, Default)]
struct Counters {
    unhealthy: AtomicBool,
    /// Milliseconds every answer but `/health` waits.
    delay_ms: AtomicU64,
    health_checks: AtomicUsize,
    connections: AtomicUsize,
    echoes: AtomicUsize,
    upgrade_headers: Mutex<Option<BTreeMap<String, Value>>>,
}

/// A running upstream; stops when dropped.
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    counters: Arc<Counters>,
    server: JoinHandle<()>,
    stop: Option<oneshot::Sender<()>>,
}

impl Upstream {
    /// An upstream on `127.0.0.1`, on a port of its own.
    pub async fn start() -> Upstream {
        Self::start_on("127.0.0.1:0".parse().expect("address"))
            .await
            .expect("bind 127.0.0.1:0")
    }

    /// An upstream on `addr` (port 0 for any).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Upstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let counted = counters.clone();
        let listener = listener.tap_io(move |_| {
            counted.connections.fetch_add(1, Ordering::SeqCst);
        });
        let routes = Router::new()
            .route("/health", get(health))
            .route("/hello", get(hello))
            .route("/close", get(close))
            .route("/echo", any(echo))
            .route("/echo/{*rest}", any(echo))
            .route("/count", post(count))
            .route("/bytes/{n}", get(bytes))
            .route("/slow/{ms}", get(slow))
            .route("/redirect/{kind}", get(redirect))
            .route("/ws", get(websocket));
        let app = Router::new()
            .nest("/v1", routes.clone())
            .merge(routes)
            .layer(axum::middleware::from_fn_with_state(
                counters.clone(),
                delay,
            ))
            .with_state(counters.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Upstream {
            addr,
            counters,
            server,
            stop: Some(stop),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Stops it as a process exit would for new work: no more
    /// connections are accepted and its idle keep-alive connections are
    /// closed (requests in flight finish). Returns once the server is
    /// gone, so its port is free again.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(host_harness::PATIENCE, &mut self.server).await;
    }

    /// Makes every answer but `/health` wait `delay` first.
    pub fn set_delay(&self, delay: Duration) {
        self.counters
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Makes `/health` answer 200 (true) or 503 (false).
    pub fn set_healthy(&self, healthy: bool) {
        self.counters.unhealthy.store(!healthy, Ordering::SeqCst);
    }

    /// `GET /health` requests so far.
    pub fn health_checks(&self) -> usize {
        self.counters.health_checks.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.counters.connections.load(Ordering::SeqCst)
    }

    /// Requests `/echo` answered so far (whatever the method).
    pub fn echoes(&self) -> usize {
        self.counters.echoes.load(Ordering::SeqCst)
    }

    /// The headers of the last WebSocket handshake `/ws` accepted, as
    /// `/echo` reports headers (name -> values).
    pub fn last_upgrade_headers(&self) -> Option<BTreeMap<String, Value>> {
        self.counters
            .upgrade_headers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn delay(
    State(counters): State<Arc<Counters>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let delay = counters.delay_ms.load(Ordering::SeqCst);
    if delay > 0 && request.uri().path() != "/health" {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    next.run(request).await
}

async fn health(State(counters): State<Arc<Counters>>) -> Response {
    counters.health_checks.fetch_add(1, Ordering::SeqCst);
    if counters.unhealthy.load(Ordering::SeqCst) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "unhealthy"})),
        )
            .into_response()
    } else {
        axum::Json(json!({"status": "healthy"})).into_response()
    }
}

async fn hello(Query(query): Query<BTreeMap<String, String>>) -> Response {
    let name = query.get("name").map_or("World", String::as_str);
    axum::Json(json!({"message": format!("Hello, {name}!")})).into_response()
}

/// Answers, then closes the connection (`Connection: close`), as a server
/// shutting down or limiting requests per connection does.
async fn close() -> Response {
    ([(header::CONNECTION, "close")], "closing").into_response()
}

async fn echo(
    State(counters): State<Arc<Counters>>,
    OriginalUri(uri): OriginalUri,
    request: Request,
) -> Response {
    counters.echoes.fetch_add(1, Ordering::SeqCst);
    // `uri` is the path as sent, `/v1` included (nesting strips it from
    // the request's own).
    let (parts, body) = request.into_parts();
    let headers = headers_json(&parts.headers);
    let body = axum::body::to_bytes(body, 16 * 1024 * 1024)
        .await
        .unwrap_or_default();
    axum::Json(json!({
        "method": parts.method.as_str(),
        "path": uri.path(),
        "query": uri.query(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    }))
    .into_response()
}

/// Each header name with the list of its values.
fn headers_json(headers: &HeaderMap) -> BTreeMap<String, Value> {
    headers
        .keys()
        .map(|name| {
            let values: Vec<Value> = headers
                .get_all(name)
                .iter()
                .map(|value| json!(String::from_utf8_lossy(value.as_bytes())))
                .collect();
            (name.as_str().to_owned(), Value::Array(values))
        })
        .collect()
}

async fn websocket(
    State(counters): State<Arc<Counters>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    *counters
        .upgrade_headers
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(headers_json(&headers));
    upgrade.on_upgrade(echo_messages)
}

async fn echo_messages(mut socket: WebSocket) {
    while let Some(Ok(message)) = socket.recv().await {
        let echoed = match message {
            Message::Text(_) | Message::Binary(_) => message,
            // tungstenite answers a close and pings itself, on the next
            // read; the loop ends when the socket has closed.
            Message::Close(_) | Message::Ping(_) | Message::Pong(_) => continue,
        };
        if socket.send(echoed).await.is_err() {
            break;
        }
    }
}

async fn count(body: Body) -> Response {
    let mut stream = body.into_data_stream();
    let mut offset = 0u64;
    let mut pattern_ok = true;
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            return (StatusCode::BAD_REQUEST, "body broke off").into_response();
        };
        for byte in chunk.iter() {
            pattern_ok &= *byte == pattern_byte(offset);
            offset += 1;
        }
    }
    axum::Json(json!({"bytes": offset, "pattern_ok": pattern_ok})).into_response()
}

/// Chunks of generated bodies.
const CHUNK: u64 = 64 * 1024;

async fn bytes(Path(n): Path<u64>) -> Response {
    let chunks = futures_util::stream::iter((0..n.div_ceil(CHUNK)).map(move |index| {
        let start = index * CHUNK;
        let end = (start + CHUNK).min(n);
        Ok::<_, std::io::Error>(Bytes::from(
            (start..end).map(pattern_byte).collect::<Vec<u8>>(),
        ))
    }));
    Body::from_stream(chunks).into_response()
}

async fn slow(Path(ms): Path<u64>) -> &'static str {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    "done"
}

/// A body of `n` bytes of [`pattern_byte`], generated chunk by chunk as
/// the client sends it.
pub fn pattern_body(n: u64) -> reqwest::Body {
    let chunks = futures_util::stream::iter((0..n.div_ceil(CHUNK)).map(move |index| {
        let start = index * CHUNK;
        let end = (start + CHUNK).min(n);
        Ok::<_, std::io::Error>((start..end).map(pattern_byte).collect::<Vec<u8>>())
    }));
    reqwest::Body::wrap_stream(chunks)
}

/// `POST /api/registry/register` with `body`: status and JSON answer.
pub async fn register(host: &Host, body: &Value) -> (u16, Value) {
    post_json(&host.registry_url("/api/registry/register"), body)
        .await
        .unwrap()
}

/// `POST /api/registry/heartbeat` for `name`: status and JSON answer.
pub async fn heartbeat(host: &Host, name: &str) -> (u16, Value) {
    let body = json!({"service_id": name, "status": "healthy"});
    post_json(&host.registry_url("/api/registry/heartbeat"), &body)
        .await
        .unwrap()
}

/// A client whose connections come from `ip` (a loopback address other
/// than 127.0.0.1 plays "another machine").
pub fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(ip.parse::<IpAddr>().expect("an address"))
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client")
}

/// `POST <registry><path>` with `body` from `from`: status and JSON answer.
pub async fn post_from(
    from: &reqwest::Client,
    host: &Host,
    path: &str,
    body: &Value,
) -> (u16, Value) {
    let answer = from
        .post(host.registry_url(path))
        .json(body)
        .send()
        .await
        .expect("registry request");
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

/// `GET <gateway><path>`: status and body text.
pub async fn gateway_get(host: &Host, path: &str) -> (u16, String) {
    let (status, body) = http::get(&client(), &host.gateway_url(path)).await.unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn redirect(
    Path(kind): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: axum::http::HeaderMap,
) -> Response {
    let prefix = if uri.path().starts_with("/v1/") {
        "/v1"
    } else {
        ""
    };
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|host| host.to_str().ok())
        .unwrap_or_default();
    let (status, location) = match kind.as_str() {
        "absolute" => (
            StatusCode::TEMPORARY_REDIRECT,
            format!("http://{host}{prefix}/hello?name=absolute"),
        ),
        "path" => (
            StatusCode::MOVED_PERMANENTLY,
            format!("{prefix}/hello?name=path"),
        ),
        "relative" => (StatusCode::FOUND, "../hello?name=relative".to_owned()),
        "chain" => (StatusCode::FOUND, format!("{prefix}/redirect/absolute")),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (status, [(axum::http::header::LOCATION, location)]).into_response()
}
