//! The service registry: the HTTP API on the registry address, and the
//! remote services registered through it.
//!
//! Listing reads the [`ServiceTable`]; registration (issue: remote services)
//! writes remote entries to it.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use crate::http::ApiError;
use crate::services::{Backend, Service, ServiceTable};

/// A service registered over HTTP and reached through the proxy.
#[derive(Debug)]
pub struct RemoteService {}

/// What the registry API serves from.
#[derive(Debug, Clone)]
pub struct Registry {
    /// The routable services.
    pub services: Arc<ServiceTable>,
}

/// The registry API's routes.
pub fn router(registry: Registry) -> Router {
    Router::new()
        .route("/api/registry/services", get(list_services))
        .route("/api/registry/services/{name}", get(get_service))
        .with_state(registry)
}

async fn list_services(State(registry): State<Registry>) -> Response {
    let services: Vec<Value> = registry
        .services
        .list()
        .iter()
        .map(|s| describe(s))
        .collect();
    axum::Json(services).into_response()
}

async fn get_service(State(registry): State<Registry>, Path(name): Path<String>) -> Response {
    match registry.services.get(&name) {
        Some(service) => axum::Json(describe(&service)).into_response(),
        None => ApiError::new(StatusCode::NOT_FOUND, format!("no service named `{name}`"))
            .with("service", name)
            .into_response(),
    }
}

/// A service as the registry lists it.
fn describe(service: &Service) -> Value {
    let mut value = json!(service.info);
    value["kind"] = json!(service.kind());
    match &service.backend {
        Backend::Plugin(plugin) => {
            value["status"] = json!("healthy");
            value["loaded_from"] = json!(plugin.loaded_from);
        }
        Backend::Remote(_) => {}
    }
    value
}
