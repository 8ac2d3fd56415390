use abi_stable::std_types::{RNone, RVec};
use serde::Serialize;

use crate::ffi::{FfiHeader, FfiResponse};

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An HTTP response built by a handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Response {
    /// An empty response with the given status.
    pub fn new(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// `200 OK` with `value` serialized as JSON.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self> {
        let body = serde_json::to_vec(value)
            .map_err(|e| Error::internal(format!("response serialization failed: {e}")))?;
        Ok(Self::new(200)
            .header("content-type", "application/json")
            .body(body))
    }

    /// `200 OK` with a UTF-8 text body.
    pub fn text(body: impl Into<String>) -> Self {
        Self::new(200)
            .header("content-type", "text/plain; charset=utf-8")
            .body(body.into().into_bytes())
    }

    /// Replaces the status code.
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Replaces the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The headers, in the order they were added.
    pub fn headers(&self) -> &[(String, Vec<u8>)] {
        &self.headers
    }

    /// The body.
    pub fn body_bytes(&self) -> &[u8] {
        &self.body
    }

    pub(crate) fn into_ffi(self) -> FfiResponse {
        FfiResponse {
            status: self.status,
            headers: self
                .headers
                .into_iter()
                .map(|(name, value)| FfiHeader {
                    name: name.into(),
                    value: value.into(),
                })
                .collect(),
            body: RVec::from(self.body),
            panic: RNone,
        }
    }
}

/// An HTTP error answered as `{"detail": message}` with its status code,
/// the shape FastAPI services answer errors with.
///
/// `?` turns any [`std::error::Error`] (I/O, serde, a database driver...)
/// into a `500` answered `{"detail": "internal server error"}`, as FastAPI
/// answers an unhandled exception: the cause is logged (at ERROR, with the
/// request's method and path), never shown to the client. That is why this
/// type does not implement `std::error::Error` itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    status: u16,
    message: String,
    /// The error it was converted from, for the log.
    cause: Option<String>,
}

impl<E: std::error::Error> From<E> for Error {
    fn from(error: E) -> Self {
        let mut cause = error.to_string();
        let mut source = error.source();
        while let Some(inner) = source {
            cause.push_str(": ");
            cause.push_str(&inner.to_string());
            source = inner.source();
        }
        Self {
            status: 500,
            message: "internal server error".to_owned(),
            cause: Some(cause),
        }
    }
}

impl Error {
    /// An error with any status code.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            cause: None,
        }
    }

    /// `400 Bad Request`: the request cannot be read (e.g. malformed JSON).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    /// `404 Not Found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, message)
    }

    /// `409 Conflict`.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, message)
    }

    /// `422 Unprocessable Entity`: well-formed but invalid input.
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(422, message)
    }

    /// `500 Internal Server Error`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, message)
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The error this one was converted from by `?`, with its sources:
    /// logged, never answered.
    pub fn cause(&self) -> Option<&str> {
        self.cause.as_deref()
    }

    /// The answer to a request that failed with this error, its cause
    /// logged first (at ERROR, naming the request) if it has one.
    pub(crate) fn into_logged_response(self, method: &str, path: &str) -> Response {
        if let Some(cause) = &self.cause {
            log::error!(target: "plugin_api", "{method} {path} failed: {cause}");
        }
        self.into_response()
    }

    /// The JSON response this error is answered with.
    pub fn into_response(self) -> Response {
        let body = serde_json::json!({ "detail": self.message });
        Response::new(self.status)
            .header("content-type", "application/json")
            .body(body.to_string())
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}
