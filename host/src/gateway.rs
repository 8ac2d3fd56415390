//! The API gateway: `/api/<name>/<rest>` to whichever service holds `name`.
//!
//! It owns nothing but the request path: it looks the name up in the
//! [`ServiceTable`], refuses what must not reach a service (a request that
//! looped back into the host, an unsafe path, a missing credential where
//! the service asked for one, an oversized body, what the [`Admission`]
//! rules refuse: CORS preflights it answers itself, rates, requests in
//! flight), and hands the request to the plugin runtime or to the proxy.
//! It never loads, unloads or registers anything, and never calls plugin
//! code itself: a plugin request is a message to the plugin's own
//! worker threads, awaited here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::{Body, HttpBody};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::admission::{Admission, CorsHeaders, is_preflight};
use crate::auth::{Authenticator, Identity, Refusal, forward_identity};
use crate::egress::LoopGuard;
use crate::http::{
    ApiError, X_REQUEST_ID, check_service_path, read_body_within, remove_hop_by_hop,
};
use crate::metrics::{self, Started};
use crate::plugin::{CallError, PluginRequest, PluginResponse};
use crate::proxy::{Proxy, request_id};
use crate::service::{HTTP_METHODS, ServiceInfo, Version, VersionReq};
use crate::table::{Backend, Selection, Service, ServiceTable, Versions};
use crate::tenant::{self, X_TENANT_ID};
use crate::tunnel;

/// What the gateway needs to serve.
#[derive(Debug, Clone)]
pub struct Gateway {
    /// The routable services.
    pub services: Arc<ServiceTable>,
    /// Forwards requests to remote services.
    pub proxy: Proxy,
    /// Largest plugin request body, in bytes.
    pub max_body_bytes: usize,
    /// Longest wait for a plugin's answer.
    pub request_timeout: Duration,
    /// Recognises requests that looped back into the host.
    pub loop_guard: LoopGuard,
    /// The credentials accepted for services that require authentication;
    /// a reload stores a new one.
    pub auth: Arc<ArcSwap<Authenticator>>,
    /// CORS, rate limits and concurrency limits; reloadable.
    pub admission: Arc<ArcSwap<Admission>>,
    /// Whether a client's `X-Tenant-ID` chooses its tenant
    /// (`[tenants] trust_header`).
    pub trust_tenant_header: bool,
}

/// The gateway's routes.
pub fn router(gateway: Gateway) -> Router {
    // Shared, not cloned per request as axum clones a state.
    Router::new()
        .fallback(dispatch)
        .with_state(Arc::new(gateway))
}

/// `/api/<name>` or `/api/<name>/<rest>` split into name and rest (raw).
/// The name may carry a version requirement (`<name>@<requirement>`).
fn split_service_path(path: &str) -> Option<(&str, &str)> {
    let below = path.strip_prefix("/api/")?;
    Some(below.split_at(below.find('/').unwrap_or(below.len())))
}

/// Which version a request asks for, and the answer each version's
/// responses carry: `X-Service-Version`.
pub const X_SERVICE_VERSION: HeaderName = HeaderName::from_static("x-service-version");

/// What version a request selects: the path form's requirement
/// (`<name>@<requirement>`, percent-decoded) if any, else the
/// `X-Service-Version` header's, else none in particular. A requirement
/// that does not parse is a 400 naming it.
fn selection(
    name: &str,
    in_path: Option<&str>,
    headers: &HeaderMap,
) -> Result<Selection, Box<Response>> {
    let refuse = |reason: String, given: &str| {
        Box::new(
            ApiError::new(StatusCode::BAD_REQUEST, reason)
                .with("service", name)
                .with("version_requirement", given)
                .into_response(),
        )
    };
    let text = match (in_path, headers.get(X_SERVICE_VERSION)) {
        (Some(raw), _) => match percent_encoding::percent_decode_str(raw).decode_utf8() {
            Ok(text) => text,
            Err(_) => {
                return Err(refuse(
                    format!("the version requirement after `{name}@` is not UTF-8"),
                    raw,
                ));
            }
        },
        (None, Some(value)) => match value.to_str() {
            Ok(text) => text.into(),
            Err(_) => {
                return Err(refuse(
                    "the X-Service-Version header is not visible ASCII".to_owned(),
                    "",
                ));
            }
        },
        (None, None) => return Ok(Selection::Default),
    };
    VersionReq::parse(text.trim())
        .map(Selection::Matching)
        .map_err(|error| refuse(format!("version requirement refused: {error}"), &text))
}

/// The 404 of a requirement no version of the service meets.
fn no_version(versions: &Versions, selection: &Selection) -> Response {
    let name = versions.name();
    let present: Vec<String> = versions
        .all()
        .iter()
        .map(|service| service.version().to_string())
        .collect();
    let wanted = match selection {
        Selection::Matching(requirement) => requirement.to_string(),
        Selection::Default => String::new(),
    };
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no version of service `{name}` meets `{wanted}`; its versions are {}",
            present.join(", ")
        ),
    )
    .with("service", name)
    .with("version_requirement", wanted)
    .with("versions", present)
    .into_response()
}

/// What the access log and the metrics learn of a request while it is
/// routed.
#[derive(Default)]
struct Served {
    /// The service's traffic, in flight until the answer.
    started: Option<Started>,
    /// The declared endpoint it reached.
    route: Option<usize>,
    /// Who called, when the service asked the gateway to authenticate.
    identity: Option<String>,
}

/// Every gateway answer, refusals included, carries the request's
/// `X-Request-Id` (the client's if usable, else a new one) and is counted
/// in its service's traffic and logged on the `access` target.
async fn dispatch(
    State(gateway): State<Arc<Gateway>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    mut request: Request,
) -> Response {
    let arrived = Instant::now();
    let id = request_id(request.headers());
    request.headers_mut().insert(X_REQUEST_ID, id.clone());
    let method = request.method().clone();
    // Only what a log line needs is kept for it.
    let logged_uri = access_logged().then(|| request.uri().clone());
    let mut served = Served::default();
    let mut response = route(&gateway, client, request, arrived, &mut served).await;
    response.headers_mut().entry(X_REQUEST_ID).or_insert(id);
    let status = response.status();
    if let Some(uri) = logged_uri {
        tracing::info!(
            target: "access",
            service = split_service_path(uri.path())
                .and_then(|(name, _)| name.split('@').next()),
            route = served
                .started
                .as_ref()
                .map_or("other", |started| started.route_label(served.route)),
            method = %method,
            status = status.as_u16(),
            duration_ms = arrived.elapsed().as_secs_f64() * 1e3,
            bytes = HttpBody::size_hint(response.body()).exact(),
            version = response.headers().get(X_SERVICE_VERSION).and_then(|v| v.to_str().ok()),
            request_id = response.headers().get(X_REQUEST_ID).and_then(|id| id.to_str().ok()),
            client = %client,
            identity = served.identity.as_deref(),
        );
    }
    if let Some(started) = served.started.take() {
        started.finish(served.route, &method, status);
    }
    response
}

/// Whether the access log is on (the log filter decides).
fn access_logged() -> bool {
    tracing::enabled!(target: "access", tracing::Level::INFO)
}

/// Routes `request` to its service, or refuses it; records in `served`
/// what the access log and the metrics need.
async fn route(
    gateway: &Gateway,
    client: SocketAddr,
    mut request: Request,
    arrived: Instant,
    served: &mut Served,
) -> Response {
    let path = request.uri().path().to_owned();
    let Some((named, rest)) = split_service_path(&path).filter(|(name, _)| !name.is_empty()) else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no route for {path}: services are under /api/<name>/"),
        )
        .into_response();
    };
    let (name, in_path) = match named.split_once('@') {
        Some((name, requirement)) => (name, Some(requirement)),
        None => (named, None),
    };
    if let Err(detected) = gateway.loop_guard.check(request.headers()) {
        tracing::debug!(service = %name, error = %detected, "request refused: loop");
        return ApiError::new(StatusCode::LOOP_DETECTED, detected.to_string())
            .with("service", name)
            .into_response();
    }
    if let Err(reason) = check_service_path(rest) {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("refused path {path}: {reason}"),
        )
        .with("service", name)
        .into_response();
    }
    let selection = match selection(name, in_path, request.headers()) {
        Ok(selection) => selection,
        Err(refused) => return *refused,
    };
    let tenant = match resolve_tenant(gateway, request.headers_mut()) {
        Ok(tenant) => tenant,
        Err(refused) => return *refused,
    };
    let Some(versions) = gateway.services.resolve(tenant_of(&tenant), name) else {
        return unknown_service(name, &tenant);
    };
    let Some(service) = versions.select(&selection, request.headers()) else {
        return no_version(&versions, &selection);
    };
    let service = service.clone();
    drop(versions);
    served.started = Some(service.traffic().start(arrived));
    // The route label is worth matching only for someone who reads it.
    if metrics::enabled() || access_logged() {
        served.route = service.route(request.method().as_str(), rest);
    }
    if let Some(refused) = refuse_method(name, request.method(), &service.info) {
        return refused;
    }
    let admission = gateway.admission.load();
    // The CORS step comes right after the lookup and the method check, and
    // before authentication: a browser sends a preflight without
    // credentials, so the gateway answers it without asking for any.
    let cors = match admission.cors(name) {
        None => None,
        Some(cors) if is_preflight(&request) => {
            let routable = |method: &Method| refuse_method(name, method, &service.info).is_none();
            return cors.preflight(request, routable).await;
        }
        Some(cors) => Some(cors.actual(request.headers()).await),
    };
    let identity = match authenticate(gateway, &service, name, rest, &request) {
        Ok(identity) => identity,
        Err(refusal) => {
            tracing::debug!(service = %name, error = ?refusal, "request refused: authentication");
            return with_cors(refusal.into_response(name), cors);
        }
    };
    if access_logged() {
        served.identity = identity.as_ref().map(|identity| identity.id().to_owned());
    }
    // The authenticated caller is the `per_key` rate limit's key.
    let admitted = admission
        .check_rate(client.ip(), identity.as_ref().map(Identity::id))
        .and_then(|()| admission.enter(name));
    drop(admission);
    let in_flight = match admitted {
        Ok(in_flight) => in_flight,
        Err(refused) => {
            tracing::debug!(service = %name, refusal = ?refused, "request refused: admission");
            return with_cors(refused.into_response(), cors);
        }
    };
    // A `Connection` header naming `X-Consumer-Id` would have the later
    // hop-by-hop pass remove the gateway's own value: that pass runs first.
    // An upgrade's protocol is kept aside for the proxy to put back.
    let upgrade = if request.headers().contains_key(header::CONNECTION) {
        let upgrade = tunnel::requested(request.version(), request.headers());
        remove_hop_by_hop(request.headers_mut());
        upgrade
    } else {
        None
    };
    forward_identity(
        request.headers_mut(),
        identity.as_ref(),
        service.info.requires_auth,
    );
    let response = match &service.backend {
        // The runtime is looked up again once the body is in: a slow upload
        // must not pin a version that is being swapped out. The request is
        // in flight until the plugin answered.
        Backend::Plugin(_) if upgrade.is_some() => {
            drop(in_flight);
            ApiError::new(
                StatusCode::NOT_IMPLEMENTED,
                format!(
                    "service `{name}` is a plugin, which answers requests and cannot switch protocols; only remote services can be upgraded to"
                ),
            )
            .with("service", name)
            .into_response()
        }
        // Only the version is kept while the body is read: a slow upload
        // must not pin a runtime that is being swapped out.
        Backend::Plugin(_) => {
            let chosen = service.version().clone();
            drop(service);
            let response = call_plugin(
                gateway,
                (&tenant, name),
                rest,
                client,
                request,
                chosen,
                selection,
            )
            .await;
            drop(in_flight);
            response
        }
        // In flight until the last byte of the streamed answer; for an
        // upgrade, until the handshake is answered (the tunnel that may
        // follow counts against the listener's tunnel cap instead).
        Backend::Remote(remote) => {
            let remote = remote.clone();
            let traffic = service.traffic().clone();
            let version = service.version_header().clone();
            drop(service);
            let mut response = match upgrade {
                Some(protocol) => {
                    (gateway.proxy)
                        .upgrade(&remote, &traffic, rest, client, protocol, request)
                        .await
                }
                None => {
                    (gateway.proxy)
                        .forward(&remote, &traffic, rest, client, request)
                        .await
                }
            };
            response.headers_mut().insert(X_SERVICE_VERSION, version);
            in_flight.hold_until_body_ends(response)
        }
    };
    with_cors(response, cors)
}

/// `response` with the CORS headers of its request, if CORS applies.
fn with_cors(mut response: Response, cors: Option<CorsHeaders>) -> Response {
    if let Some(cors) = cors {
        cors.apply_to(&mut response);
    }
    response
}

/// The answer to a method the service cannot have meant to receive: any method
/// outside those a service can declare (an extension token, and CONNECT
/// and TRACE, which would let a script read back what the browser sent),
/// and, for a service that declared its endpoints, a method none of them
/// declares. OPTIONS always passes (CORS preflights are the service's to
/// answer unless the gateway's CORS rules apply to it), and HEAD wherever
/// GET does.
fn refuse_method(name: &str, method: &Method, info: &ServiceInfo) -> Option<Response> {
    let refuse = |status: StatusCode, reason: String, allowed: &[&str]| {
        let mut response = ApiError::new(status, reason)
            .with("service", name)
            .into_response();
        if let Ok(allow) = HeaderValue::from_str(&allowed.join(", ")) {
            response.headers_mut().insert(header::ALLOW, allow);
        }
        response
    };
    let method = method.as_str();
    if !HTTP_METHODS.contains(&method) {
        let known = [Method::CONNECT.as_str(), Method::TRACE.as_str()].contains(&method);
        let shown: String = method.chars().take(32).collect();
        let (status, reason) = if known {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                format!("the gateway does not route {shown} requests"),
            )
        } else {
            (
                StatusCode::NOT_IMPLEMENTED,
                format!("unknown method `{shown}`"),
            )
        };
        return Some(refuse(status, reason, HTTP_METHODS));
    }
    if info.endpoints.is_empty() || method == Method::OPTIONS {
        return None;
    }
    let declares = |wanted: &str| info.endpoints.iter().any(|e| e.method == wanted);
    if declares(method) || (method == Method::HEAD && declares(Method::GET.as_str())) {
        return None;
    }
    // Refused: only now is the `Allow` list worth building.
    let mut declared: Vec<&str> = info.endpoints.iter().map(|e| e.method.as_str()).collect();
    if declared.contains(&Method::GET.as_str()) {
        declared.push(Method::HEAD.as_str());
    }
    declared.push(Method::OPTIONS.as_str());
    declared.sort_unstable();
    declared.dedup();
    Some(refuse(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("service `{name}` declares no {method} endpoint"),
        &declared,
    ))
}

/// Who calls, as far as the service asked the gateway to check. A service
/// without `requires_auth` gets no one: its credentials, if any, are its
/// own business and pass untouched. One with it gets, on a protected
/// endpoint, the verified identity or the request is refused here (401,
/// 403); on a public endpoint, whoever a valid credential names, if the
/// client sent one. A CORS preflight (OPTIONS with `Origin` and
/// `Access-Control-Request-Method`) is never refused for lacking a
/// credential: browsers never send one with it.
fn authenticate(
    gateway: &Gateway,
    service: &Service,
    name: &str,
    rest: &str,
    request: &Request,
) -> Result<Option<Identity>, Refusal> {
    if !service.info.requires_auth || is_preflight(request) {
        return Ok(None);
    }
    let auth = gateway.auth.load();
    let headers = request.headers();
    if service
        .public_endpoints()
        .is_public(request.method().as_str(), rest)
    {
        return Ok(auth.identify(name, headers));
    }
    auth.admit(name, headers).map(Some)
}

fn unknown_service(name: &str, tenant: &Option<Arc<str>>) -> Response {
    match tenant {
        None => ApiError::new(StatusCode::NOT_FOUND, format!("no service named `{name}`"))
            .with("service", name),
        Some(tenant) => ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no service named `{name}` in tenant `{tenant}` or shared"),
        )
        .with("service", name)
        .with("tenant", &**tenant),
    }
    .into_response()
}

/// The tenant id of a resolved tenant (`None`: the default tenant).
fn tenant_of(tenant: &Option<Arc<str>>) -> &str {
    tenant.as_deref().unwrap_or(tenant::DEFAULT)
}

/// The tenant a request belongs to (`None`: the default tenant), with its
/// `X-Tenant-ID` set to it for the service (or, while no credential can
/// name a tenant and the header is not trusted, removed: then this is one
/// branch and a header lookup). A credential naming a tenant decides;
/// else a trusted `X-Tenant-ID`; else the default tenant. A trusted header
/// naming another tenant than the credential is a 403 naming both; one
/// that is no tenant id, or sent twice, a 400.
fn resolve_tenant(
    gateway: &Gateway,
    headers: &mut HeaderMap,
) -> Result<Option<Arc<str>>, Box<Response>> {
    let auth = gateway.auth.load();
    let credentials = auth.names_tenants();
    if !credentials && !gateway.trust_tenant_header {
        if headers.contains_key(X_TENANT_ID) {
            headers.remove(X_TENANT_ID);
        }
        return Ok(None);
    }
    // Service-independent: a credential that fails here is judged again
    // by the service's own authentication, which refuses it if it must.
    let named: Option<Arc<str>> = if credentials {
        auth.authenticate(headers)
            .ok()
            .flatten()
            .and_then(|identity| identity.tenant().map(Arc::from))
    } else {
        None
    };
    drop(auth);
    let claimed: Option<Arc<str>> = if gateway.trust_tenant_header {
        let mut values = headers.get_all(X_TENANT_ID).iter();
        match (values.next(), values.next()) {
            (None, _) => None,
            (Some(_), Some(_)) => {
                return Err(refuse_tenant(
                    StatusCode::BAD_REQUEST,
                    "X-Tenant-ID was sent more than once".to_owned(),
                ));
            }
            (Some(value), None) => {
                let text = value.to_str().unwrap_or_default();
                if let Err(reason) = tenant::check(text) {
                    return Err(refuse_tenant(
                        StatusCode::BAD_REQUEST,
                        format!("X-Tenant-ID refused: {reason}"),
                    ));
                }
                Some(Arc::from(text))
            }
        }
    } else {
        None
    };
    let tenant = match (named, claimed) {
        (Some(named), Some(claimed)) if named != claimed => {
            return Err(Box::new(
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!(
                        "the credential belongs to tenant `{named}`, but X-Tenant-ID names `{claimed}`"
                    ),
                )
                .with("tenant", &*named)
                .with("x_tenant_id", &*claimed)
                .into_response(),
            ));
        }
        (Some(named), _) => Some(named),
        (None, claimed) => claimed,
    }
    .filter(|tenant| !tenant::is_default(tenant));
    // A tenant id is a valid header value (checked above or at load).
    let value = HeaderValue::from_str(tenant_of(&tenant))
        .unwrap_or_else(|_| HeaderValue::from_static(tenant::DEFAULT));
    headers.insert(X_TENANT_ID, value);
    Ok(tenant)
}

fn refuse_tenant(status: StatusCode, reason: String) -> Box<Response> {
    Box::new(
        ApiError::new(status, reason)
            .with("field", "X-Tenant-ID")
            .into_response(),
    )
}

/// Hands `request` to version `chosen` of the plugin `name` as `tenant`
/// reaches it (the one `selection` picked) once its body is read. The name's versions are
/// looked up again then: the same version first, else what the same
/// selection picks now, so a swap of one version never sends the request
/// to another version than the client asked for.
async fn call_plugin(
    gateway: &Gateway,
    (tenant, name): (&Option<Arc<str>>, &str),
    rest: &str,
    client: SocketAddr,
    request: Request,
    chosen: Version,
    selection: Selection,
) -> Response {
    let (parts, body) = request.into_parts();
    let reading = read_body_within(
        body,
        &parts.headers,
        gateway.max_body_bytes,
        gateway.request_timeout,
    );
    let body = match reading.await {
        Ok(body) => body,
        Err(error) => return error.with("service", name).into_response(),
    };
    // The plugin sees the `X-Request-Id` its calls to other services
    // carry (`dispatch` set it).
    let mut headers = parts.headers;
    remove_hop_by_hop(&mut headers);
    let request = Arc::new(PluginRequest {
        method: parts.method,
        path: if rest.is_empty() {
            "/".to_owned()
        } else {
            rest.to_owned()
        },
        query: parts.uri.query().unwrap_or_default().to_owned(),
        headers,
        body,
        client_addr: client.to_string(),
        // Built only if the plugin calls another service.
        chain: None,
    });
    // A runtime that is being unloaded refuses new work; by then the table
    // already holds its successor (a swap) or nothing (a removal), so one
    // fresh lookup decides.
    let mut retried = false;
    loop {
        let Some(versions) = gateway.services.resolve(tenant_of(tenant), name) else {
            return unknown_service(name, tenant);
        };
        let Some(service) = versions
            .version(&chosen)
            .or_else(|| versions.select(&selection, &request.headers))
        else {
            return no_version(&versions, &selection);
        };
        let (runtime, answered) = match &service.backend {
            Backend::Plugin(plugin) => (plugin.runtime.clone(), service.version_header().clone()),
            // A plugin replaced by a remote service meanwhile: the body was
            // read for the plugin, so let the client retry.
            Backend::Remote(_) => {
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("service `{name}` was replaced while the request waited; retry"),
                )
                .with("service", name)
                .into_response();
            }
        };
        drop(versions);
        match runtime
            .call(Arc::clone(&request), gateway.request_timeout)
            .await
        {
            Ok(response) => {
                let mut response = plugin_response(name, response);
                response.headers_mut().insert(X_SERVICE_VERSION, answered);
                return response;
            }
            Err(CallError::Unloading) if !retried => retried = true,
            Err(error) => {
                return ApiError::new(error.status(), error.to_string())
                    .with("service", name)
                    .into_response();
            }
        }
    }
}

fn plugin_response(name: &str, response: PluginResponse) -> Response {
    let Ok(status) = StatusCode::from_u16(response.status) else {
        tracing::warn!(
            plugin = name,
            status = response.status,
            "plugin answered an invalid status code"
        );
        return ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "plugin `{name}` answered an invalid status code {}",
                response.status
            ),
        )
        .with("service", name)
        .into_response();
    };
    let mut headers = response.headers;
    remove_hop_by_hop(&mut headers);
    headers.remove(header::CONTENT_LENGTH);
    let mut http_response = Response::new(Body::from(response.body));
    *http_response.status_mut() = status;
    *http_response.headers_mut() = headers;
    http_response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_name_and_rest() {
        assert_eq!(split_service_path("/api/hello"), Some(("hello", "")));
        assert_eq!(split_service_path("/api/hello/"), Some(("hello", "/")));
        assert_eq!(
            split_service_path("/api/hello/data/1"),
            Some(("hello", "/data/1"))
        );
        assert_eq!(split_service_path("/other"), None);
    }
}
