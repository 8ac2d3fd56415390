//! Plugins' calls to other services: the host's side of `ctx.call`.
//!
//! A plugin thread asks for a service by name; the call is resolved in the
//! service table like a gateway request, without a socket for a plugin:
//! another plugin is called in process
//! ([`PluginRuntime::call_from_plugin`](crate::plugin::PluginRuntime::call_from_plugin),
//! which never waits for the callee's busy workers), a remote service
//! through the proxy's connection pool. The proxy is async: the call is
//! spawned on the async runtime and the plugin thread blocks on a channel,
//! so no tokio worker ever waits, and no plugin code runs on one. Loops are
//! refused before this (the plugin's context checks the call chain).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use http_body_util::{BodyExt, Limited};

use crate::http::{ApiError, check_service_path, remove_hop_by_hop};
use crate::metrics::ServiceTraffic;
use crate::plugin::{CallError, PluginRequest, PluginResponse, ServiceCalls};
use crate::proxy::Proxy;
use crate::remote::RemoteService;
use crate::table::{Backend, Selection, ServiceTable};
use crate::tenant::{self, X_TENANT_ID};

/// Resolves plugins' calls in the service table.
#[derive(Debug)]
pub struct ServiceCaller {
    services: Arc<ServiceTable>,
    proxy: Proxy,
    runtime: tokio::runtime::Handle,
    max_body_bytes: usize,
}

impl ServiceCaller {
    /// Calls resolved in `services`; remote ones go through `proxy` on
    /// `runtime`, their answers read up to `max_body_bytes`.
    pub fn new(
        services: Arc<ServiceTable>,
        proxy: Proxy,
        runtime: tokio::runtime::Handle,
        max_body_bytes: usize,
    ) -> Self {
        Self {
            services,
            proxy,
            runtime,
            max_body_bytes,
        }
    }

    fn remote(
        &self,
        service: &str,
        remote: Arc<RemoteService>,
        traffic: Arc<ServiceTraffic>,
        request: &PluginRequest,
        timeout: Duration,
    ) -> PluginResponse {
        let target = if request.query.is_empty() {
            request.path.clone()
        } else {
            format!("{}?{}", request.path, request.query)
        };
        let mut builder = axum::http::Request::builder()
            .method(request.method.clone())
            .uri(target);
        if let Some(headers) = builder.headers_mut() {
            // The request id of the chain is among them.
            headers.clone_from(&request.headers);
            remove_hop_by_hop(headers);
        }
        let upstream = match builder.body(Body::from(request.body.clone())) {
            Ok(upstream) => upstream,
            Err(error) => {
                return refusal(
                    service,
                    StatusCode::BAD_REQUEST,
                    format!("cannot form the request: {error}"),
                );
            }
        };
        let (answer, answered) = crossbeam_channel::bounded(1);
        let proxy = self.proxy.clone();
        let rest = request.path.clone();
        let limit = self.max_body_bytes;
        let name = service.to_owned();
        self.runtime.spawn(async move {
            let caller = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
            let forwarding = async {
                let response = proxy
                    .forward(&remote, &traffic, &rest, caller, upstream)
                    .await;
                let (parts, body) = response.into_parts();
                let body = match Limited::new(body, limit).collect().await {
                    Ok(body) => body.to_bytes(),
                    Err(error) => {
                        return refusal(
                            &name,
                            StatusCode::BAD_GATEWAY,
                            format!("cannot read the answer (limit {limit} bytes): {error}"),
                        );
                    }
                };
                PluginResponse {
                    status: parts.status.as_u16(),
                    headers: parts.headers,
                    body,
                }
            };
            let response = tokio::time::timeout(timeout, forwarding)
                .await
                .unwrap_or_else(|_| {
                    refusal(
                        &name,
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "service `{name}` did not answer within {}",
                            humantime::format_duration(timeout)
                        ),
                    )
                });
            let _ = answer.send(response);
        });
        // The task always answers, unless the runtime shuts down under it.
        answered.recv().unwrap_or_else(|_| {
            refusal(
                service,
                StatusCode::SERVICE_UNAVAILABLE,
                "the host is shutting down",
            )
        })
    }
}

impl ServiceCalls for ServiceCaller {
    fn call(&self, service: &str, request: PluginRequest, timeout: Duration) -> PluginResponse {
        if let Err(reason) = check_service_path(&request.path) {
            return refusal(
                service,
                StatusCode::BAD_REQUEST,
                format!("refused path {}: {reason}", request.path),
            );
        }
        let request = Arc::new(request);
        // As in the gateway: a runtime being unloaded refuses new work, and
        // by then the table holds its successor or nothing.
        let mut retried = false;
        loop {
            // A plugin's call asks for no version: the split or the
            // default, as for a client that names none. It is resolved in
            // its chain's tenant, which the context set.
            let tenant = request
                .headers
                .get(X_TENANT_ID)
                .and_then(|value| value.to_str().ok())
                .unwrap_or(tenant::DEFAULT);
            let backend = self.services.resolve(tenant, service).and_then(|versions| {
                versions
                    .select(&Selection::Default, &request.headers)
                    .map(|s| (s.backend.clone(), s.traffic().clone()))
            });
            match backend {
                None => {
                    return refusal(
                        service,
                        StatusCode::NOT_FOUND,
                        format!("no service named `{service}`"),
                    );
                }
                Some((Backend::Remote(remote), traffic)) => {
                    return self.remote(service, remote, traffic, &request, timeout);
                }
                Some((Backend::Plugin(plugin), _)) => {
                    match plugin.runtime.call_from_plugin(request.clone(), timeout) {
                        Ok(response) => return response,
                        Err(CallError::Unloading) if !retried => retried = true,
                        Err(error) => return refusal(service, error.status(), error.to_string()),
                    }
                }
            }
        }
    }
}

fn refusal(service: &str, status: StatusCode, message: impl Into<String>) -> PluginResponse {
    PluginResponse::from_error(ApiError::new(status, message).with("service", service))
}
