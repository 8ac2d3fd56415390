//! What the gateway and a plugin exchange, in host memory: the request as
//! the gateway hands it over, and the answer copied out of the plugin.
//!
//! The loader turns these into the ABI's borrowed types and back; nothing
//! else in the host sees an FFI type.

use std::sync::Arc;

use axum::http::{HeaderMap, Method};
use bytes::Bytes;

use super::context::CallChain;

/// A request as the gateway hands it to a plugin. Shared (`Arc`) so that a
/// retry after a swap costs no copy.
#[derive(Debug)]
pub struct PluginRequest {
    /// The method.
    pub method: Method,
    /// Path relative to `/api/<name>`, starting with `/`.
    pub path: String,
    /// Raw query string.
    pub query: String,
    /// Headers, hop-by-hop ones removed.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// Client socket address.
    pub client_addr: String,
    /// The request id and the services the request passed: the chain a
    /// call the plugin makes while handling it extends. `None` for a
    /// request from the gateway: its chain is the plugin alone, with the
    /// request's `X-Request-Id`, built only if the plugin makes a call
    /// (most requests make none, and pay nothing for it).
    pub chain: Option<Arc<CallChain>>,
}

/// A plugin's answer, copied into host memory.
#[derive(Debug)]
pub struct PluginResponse {
    /// Status code as the plugin gave it (not yet validated).
    pub status: u16,
    /// The headers the plugin gave that are valid HTTP; the loader drops
    /// (and reports) the others while it copies them.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}
