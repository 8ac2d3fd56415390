//! HTTP vocabulary shared by the gateway, the proxy and the registry API:
//! the JSON error every refusal is answered with, the bounded body reader
//! (in size and time), and the edge checks.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Serialize;
use serde_json::{Map, Value};

/// `X-Request-Id`: the id a request carries through the gateway, its
/// plugin, the remote services it reaches and the answer.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

thread_local! {
    /// This thread's id prefix (random, drawn once) and counter: an id
    /// costs no syscall and no shared cache line.
    static REQUEST_IDS: std::cell::Cell<Option<(u64, u64)>> = const { std::cell::Cell::new(None) };
}

/// A new request id: 16 hex digits drawn at random once per thread, `-`,
/// and the thread's count of ids, 16 hex digits. Unique within the
/// process, and not guessable across processes. A UUID v4 per request
/// cost a `getrandom` call each.
pub fn new_request_id() -> HeaderValue {
    let (prefix, count) = REQUEST_IDS.with(|ids| {
        let (prefix, count) = ids.get().unwrap_or_else(|| {
            let mut seed = [0; 8];
            // Without entropy (never on Linux) the ids stay unique within
            // the process, which is what they are for.
            let _ = getrandom::fill(&mut seed);
            (u64::from_ne_bytes(seed), 0)
        });
        ids.set(Some((prefix, count.wrapping_add(1))));
        (prefix, count)
    });
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [b'-'; 33];
    for (i, value) in [(0, prefix), (17, count)] {
        for digit in 0..16 {
            text[i + digit] = HEX[((value >> (60 - 4 * digit)) & 0xf) as usize];
        }
    }
    HeaderValue::from_bytes(&text).expect("hex digits and `-` are a valid header value")
}

/// A refusal answered as JSON: `{"error": message, ...context}`.
///
/// The message says what was wrong; context fields name the service, the
/// field or the limit involved, so a client can act on it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Map<String, Value>,
    /// Few and rare: a `Vec` keeps every `Result<_, ApiError>` small.
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    /// An error with a status and a message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        let mut body = Map::new();
        body.insert("error".to_owned(), Value::String(message.into()));
        Self {
            status,
            body,
            headers: Vec::new(),
        }
    }

    /// Adds a context field, e.g. `("service", name)` or `("field", "port")`.
    pub fn with(mut self, key: &str, value: impl Serialize) -> Self {
        let value = serde_json::to_value(value).unwrap_or(Value::Null);
        self.body.insert(key.to_owned(), value);
        self
    }

    /// The status and the JSON body, for an answer that is not sent by
    /// axum (a plugin's call to another service). Headers are dropped.
    pub fn into_json(self) -> (StatusCode, Vec<u8>) {
        let body = serde_json::to_vec(&self.body).unwrap_or_default();
        (self.status, body)
    }

    /// Adds a response header, e.g. `WWW-Authenticate` or `Retry-After`.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(Value::Object(self.body))).into_response();
        response.headers_mut().extend(self.headers);
        response
    }
}

/// The whole body, refused with 413 beyond `limit` bytes (by its declared
/// length before reading anything, or while reading).
pub async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than the limit of {limit} bytes"),
        )
        .with("limit_bytes", limit)
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(error) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("could not read the request body: {error}"),
        )),
    }
}

/// [`read_body`], answered 408 if the whole body has not arrived within
/// `timeout`: a client trickling its body cannot hold a handler (and the
/// connection) open for longer.
pub async fn read_body_within(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    tokio::time::timeout(timeout, read_body(body, headers, limit))
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "request body not received within {}",
                    humantime::format_duration(timeout)
                ),
            )
            .with(
                "limit_ms",
                u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            ))
        })
}

/// `error` and its sources, `: `-separated: hyper's own messages are terse
/// ("client error (Connect)"), the cause is in the chain.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Text a client or a plugin chose, made safe to log: control characters
/// (a newline that would start a forged log line, an escape sequence that
/// would rewrite an operator's terminal), quotes and backslashes are
/// escaped as in Rust string literals; printable text, any script, is kept.
/// Fields checked by `service::validate` hold no control characters and
/// need no escaping; anything else from outside is logged through this.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0.escape_debug(), f)
    }
}

/// Headers that describe one hop, not the message (RFC 9110 section 7.6.1);
/// a gateway must not forward them.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop headers, including those the `Connection` header
/// names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over their few names is cheaper
    // than a lookup per listed header (this runs twice per proxied request).
    if !headers
        .keys()
        .any(|name| HOP_BY_HOP.contains(name) || name.as_str() == PROXY_CONNECTION)
    {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(PROXY_CONNECTION);
}

/// Not standard, but sent by old clients, and hop-by-hop where it is.
const PROXY_CONNECTION: &str = "proxy-connection";

/// Why a path relative to a service is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnsafePath {
    /// A `.` or `..` segment, literal or percent-encoded.
    #[error("path contains a dot segment (`.` or `..`)")]
    DotSegment,
    /// `%2F` or `%5C`: a slash the routing would not see.
    #[error("path contains an encoded slash or backslash")]
    EncodedSlash,
    /// A literal backslash or a NUL byte.
    #[error("path contains a backslash or a NUL byte")]
    BadCharacter,
    /// `%25` encoding a `%` that would encode a dot, a slash, a backslash
    /// or NUL once the service decodes it again.
    #[error("path contains a double-encoded dot, slash, backslash or NUL (`%25..`)")]
    DoubleEncoded,
    /// `//`: an empty segment, which servers collapse or treat as a root.
    #[error("path contains an empty segment (`//`)")]
    EmptySegment,
}

/// Checks the raw (still percent-encoded) path below `/api/<name>`, so that
/// nothing a service receives can resolve outside its mount point, however
/// it decodes or normalises the path: dot segments (also written `%2e`, or
/// followed by `;` parameters as in `..;`, which Java servers strip),
/// encoded or double-encoded slashes and dots, and empty segments are all
/// refused.
pub fn check_service_path(raw: &str) -> Result<(), UnsafePath> {
    // Every check below needs a `%`, a `\\`, a `.` or an empty segment
    // (`//`): a plain path (the usual case) is passed in one scan.
    if !raw.bytes().any(|byte| matches!(byte, b'%' | b'\\' | b'.')) && !raw.contains("//") {
        return Ok(());
    }
    let has = |needle: &str| {
        raw.as_bytes()
            .windows(needle.len())
            .any(|window| window.eq_ignore_ascii_case(needle.as_bytes()))
    };
    if has("%2f") || has("%5c") {
        return Err(UnsafePath::EncodedSlash);
    }
    if raw.contains('\\') || has("%00") {
        return Err(UnsafePath::BadCharacter);
    }
    if ["%252e", "%252f", "%255c", "%2500"]
        .iter()
        .any(|needle| has(needle))
    {
        return Err(UnsafePath::DoubleEncoded);
    }
    let segments: Vec<&str> = raw.split('/').collect();
    // `rest` starts with `/` (an empty first segment) and may end with one
    // (an empty last segment): only empty segments in between are `//`.
    if segments.len() > 2 && segments[1..segments.len() - 1].iter().any(|s| s.is_empty()) {
        return Err(UnsafePath::EmptySegment);
    }
    if segments
        .iter()
        .any(|segment| is_dot_segment(segment.split(';').next().unwrap_or_default()))
    {
        return Err(UnsafePath::DotSegment);
    }
    Ok(())
}

/// `.` or `..`, with any dot possibly written `%2e` / `%2E`.
fn is_dot_segment(segment: &str) -> bool {
    let mut dots = 0;
    let mut rest = segment.as_bytes();
    while !rest.is_empty() {
        if rest[0] == b'.' {
            rest = &rest[1..];
        } else if rest.len() >= 3 && rest[..3].eq_ignore_ascii_case(b"%2e") {
            rest = &rest[3..];
        } else {
            return false;
        }
        dots += 1;
    }
    matches!(dots, 1 | 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_unique_per_thread_and_across_threads() {
        let ids: Vec<HeaderValue> = (0..3)
            .map(|_| new_request_id())
            .chain(
                std::thread::spawn(|| (0..3).map(|_| new_request_id()).collect::<Vec<_>>())
                    .join()
                    .unwrap(),
            )
            .collect();
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        for id in &ids {
            let text = id.to_str().unwrap();
            assert_eq!(text.len(), 33);
            let (prefix, count) = text.split_once('-').unwrap();
            assert!(prefix.len() == 16 && count.len() == 16, "{text}");
            assert!(text.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()));
        }
        let prefix = |id: &HeaderValue| id.to_str().unwrap()[..16].to_owned();
        assert_eq!(prefix(&ids[0]), prefix(&ids[2]), "one prefix per thread");
        assert_ne!(
            prefix(&ids[0]),
            prefix(&ids[3]),
            "another thread, another prefix"
        );
    }

    #[test]
    fn service_paths() {
        assert_eq!(check_service_path("/data/1"), Ok(()));
        assert_eq!(check_service_path("/a..b/c"), Ok(()));
        assert_eq!(check_service_path(""), Ok(()));
        assert_eq!(check_service_path("/../x"), Err(UnsafePath::DotSegment));
        assert_eq!(check_service_path("/a/%2E%2e"), Err(UnsafePath::DotSegment));
        assert_eq!(check_service_path("/a/."), Err(UnsafePath::DotSegment));
        assert_eq!(check_service_path("/a%2fb"), Err(UnsafePath::EncodedSlash));
        assert_eq!(check_service_path("/a%5Cb"), Err(UnsafePath::EncodedSlash));
        assert_eq!(check_service_path("/a\\b"), Err(UnsafePath::BadCharacter));
        assert_eq!(check_service_path("/..;/x"), Err(UnsafePath::DotSegment));
        assert_eq!(check_service_path("/a/.;a=b"), Err(UnsafePath::DotSegment));
        assert_eq!(check_service_path("/a;b/c"), Ok(()));
        assert_eq!(
            check_service_path("/%252e%252e/x"),
            Err(UnsafePath::DoubleEncoded)
        );
        assert_eq!(
            check_service_path("/a%252Fb"),
            Err(UnsafePath::DoubleEncoded)
        );
        assert_eq!(check_service_path("/100%25"), Ok(()));
        assert_eq!(check_service_path("//x"), Err(UnsafePath::EmptySegment));
        assert_eq!(check_service_path("/a//b"), Err(UnsafePath::EmptySegment));
        assert_eq!(check_service_path("/a/"), Ok(()));
        assert_eq!(check_service_path("/"), Ok(()));
    }

    #[test]
    fn escaped_text_cannot_start_a_line_or_drive_a_terminal() {
        assert_eq!(
            Escaped("x\nINFO forged \u{1b}[31m").to_string(),
            "x\\nINFO forged \\u{1b}[31m"
        );
        assert_eq!(Escaped("我的插件").to_string(), "我的插件");
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        headers.insert("x-secret", "1".parse().unwrap());
        headers.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        headers.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::CONTENT_TYPE));
    }
}
