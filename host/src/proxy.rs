//! The reverse proxy to remote services.

use std::net::SocketAddr;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::http::ApiError;
use crate::registry::RemoteService;

/// Forwards gateway requests to remote services.
#[derive(Debug, Clone, Default)]
pub struct Proxy {}

impl Proxy {
    /// Forwards `request` to `remote`, at `rest` below its base path.
    pub async fn forward(
        &self,
        _remote: &RemoteService,
        _rest: &str,
        _client: SocketAddr,
        _request: Request,
    ) -> Response {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "remote services are not supported yet",
        )
        .into_response()
    }
}
