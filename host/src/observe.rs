//! What an operator's tools read on the registry listener: the
//! Prometheus metrics, the probes and the plugin files' status.
//!
//! - `GET <--metrics-path>` (default `/metrics`): the exposition
//!   ([`metrics::render`]) of the host's counters and of every service in
//!   the table, under the listing's access rule;
//! - `GET /healthz`: 200 while the process serves;
//! - `GET /readyz`: 200 once started (the listeners are only served once
//!   both are bound, the registry's database is open and the plugin files
//!   present at start-up were loaded or refused: a probe made earlier
//!   waits in the listener's backlog), 503 once shutdown began; the body
//!   names the plugin files refused or waiting, so a refused plugin is
//!   never silently missing;
//! - `GET /api/registry/plugins/files`: every plugin file and what became
//!   of it ([`PluginFiles`]), under the listing's access rule.
//!
//! It owns only the shutdown flag; the state it shows belongs to the
//! table, the plugin manager and the metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use arc_swap::ArcSwap;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::http::ApiError;
use crate::metrics::{self, ServiceSample};
use crate::plugin_manager::{FileState, PluginFiles};
use crate::registry::Registry;
use crate::remote::{InstancePolicy, InstanceStatus, Status};
use crate::table::{Backend, ServiceTable};

/// What the observability endpoints read.
#[derive(Debug, Clone)]
pub struct Observe {
    /// The routable services.
    pub services: Arc<ServiceTable>,
    /// The live instance policy, under which a remote instance's state is
    /// read.
    pub instances: Arc<ArcSwap<InstancePolicy>>,
    /// The plugin files' status.
    pub files: Arc<PluginFiles>,
    /// Decides who may read the metrics and the files' status (the
    /// listing's rule).
    pub registry: Registry,
    /// Set when shutdown begins: `/readyz` answers 503 from then on.
    pub stopping: Arc<AtomicBool>,
}

/// The routes, to merge into the registry listener's; `metrics_path` is
/// `None` when the metrics are off.
pub fn router(observe: Observe, metrics_path: Option<&str>) -> Router {
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/registry/plugins/files", get(plugin_files));
    let router = match metrics_path {
        Some(path) => router.route(path, get(scrape)),
        None => router,
    };
    router.with_state(observe)
}

async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn readyz(State(observe): State<Observe>) -> Response {
    let files = observe.files.list();
    let named = |state: FileState| {
        files
            .iter()
            .filter(|file| file.state == state)
            .map(|file| json!({"file": file.file, "reason": file.reason}))
            .collect::<Vec<_>>()
    };
    let refused = named(FileState::Refused);
    let waiting = named(FileState::Waiting);
    let (status, state) = if observe.stopping.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
    } else {
        (StatusCode::OK, "ready")
    };
    let mut body = json!({
        "status": state,
        "plugin_files_refused": refused.len(),
        "refused": refused,
        "plugin_files_waiting": waiting.len(),
        "waiting": waiting,
    });
    if status != StatusCode::OK {
        body["error"] = json!(
            "the host is shutting down: it finishes the requests in flight and takes no new ones"
        );
    }
    (status, axum::Json(body)).into_response()
}

async fn plugin_files(
    State(observe): State<Observe>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    observe.registry.reader(&headers)?;
    Ok(axum::Json(json!({
        "directory": observe.files.directory().display().to_string(),
        "files": observe.files.list(),
    }))
    .into_response())
}

async fn scrape(State(observe): State<Observe>, headers: HeaderMap) -> Result<Response, ApiError> {
    observe.registry.reader(&headers)?;
    let now = SystemTime::now();
    let policy = observe.instances.load();
    let samples = observe
        .services
        .list()
        .iter()
        // One series per name: its default version's (the metrics have no
        // version label yet). A tenant's name is labelled `<tenant>/<name>`
        // (its table key), so two tenants' services never share a series.
        .map(|versions| (versions.key(), versions.default_version()))
        .map(|(key, service)| {
            let mut sample = ServiceSample {
                name: key.to_owned(),
                kind: service.kind(),
                state: "healthy",
                traffic: service.traffic().clone(),
                instances: (1, 0),
                since_heartbeat: None,
                plugin: None,
            };
            match &service.backend {
                Backend::Plugin(plugin) => {
                    sample.plugin = Some(plugin.runtime.sample());
                    if plugin.health.status() != Status::Healthy {
                        sample.state = "unhealthy";
                        sample.instances = (0, 1);
                    }
                }
                Backend::Remote(remote) => {
                    let liveness = remote.liveness(&policy);
                    if liveness.status != Status::Healthy {
                        sample.state = "unhealthy";
                    }
                    let healthy = liveness
                        .instances
                        .iter()
                        .filter(|instance| instance.status == InstanceStatus::Healthy)
                        .count() as u64;
                    sample.instances = (healthy, liveness.instances.len() as u64 - healthy);
                    sample.since_heartbeat = liveness
                        .last_heartbeat
                        .map(|at| now.duration_since(at).unwrap_or_default());
                }
            }
            sample
        })
        .collect();
    let mut response = metrics::render(samples).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(response)
}
