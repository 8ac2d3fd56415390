//! One OpenAPI 3.1 document for everything the gateway routes
//! (`GET /api/registry/openapi.json`).
//!
//! Every service contributes the endpoints it declared, under its gateway
//! path `/api/<name>/`. A remote service may also publish its own document
//! (FastAPI serves `/openapi.json` below its base path): it is fetched once
//! per registration, bounded in size and time and through the egress policy
//! like a health check, and its operations and components are merged in,
//! rewritten to gateway paths, with component names prefixed by the
//! service's name so that two services' `Item` schemas cannot collide. A
//! re-registration builds a new [`RemoteService`] and fetches again; the
//! document of a replaced or removed registration is never served (it is
//! held against the registration it came from, weakly).
//!
//! The gateway's credentials, not a service's own, are what a client shows:
//! a published document's security schemes and requirements are dropped,
//! and operations of a service with `requires_auth` that it did not declare
//! public get the gateway's requirement (an API key or a bearer JWT).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Map, Value, json};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::egress::{EgressPolicy, LoopGuard, Resolver};
use crate::http::error_chain;
use crate::remote::{InstancePolicy, RemoteService};
use crate::service::{PublicEndpoints, ServiceInfo};
use crate::sync::lock;
use crate::table::{Backend, Service};

/// Largest published document read; a bigger one is not merged.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// Most bytes of published documents kept at once, added up; past it a new
/// one is not merged (and a WARN says so), so many services cannot make the
/// catalogue grow without bound.
const MAX_KEPT_BYTES: usize = 64 * 1024 * 1024;

/// Workers asking services for their documents, so fetches in flight at
/// once: a burst of registrations must not open a socket each.
const FETCHERS: usize = 8;

/// How often a service that cannot be reached is asked for its document,
/// and the first wait between two askings (then doubled): about 15 s in all.
const ATTEMPTS: u32 = 5;
const RETRY_FIRST: Duration = Duration::from_secs(1);

/// Where a remote service publishes its document, relative to its base
/// path (FastAPI's default).
const PUBLISHED_PATH: &str = "/openapi.json";

/// The security schemes of the gateway (see docs/AUTH.md).
const API_KEY_SCHEME: &str = "api_key";
const BEARER_SCHEME: &str = "bearer";

/// HTTP methods an OpenAPI path item may hold, lower case.
const OPERATION_METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Kinds of components a published document may hold and the catalogue
/// merges (security schemes are the gateway's own).
const MERGED_COMPONENTS: &[&str] = &[
    "schemas",
    "responses",
    "parameters",
    "examples",
    "requestBodies",
    "headers",
    "links",
    "callbacks",
    "pathItems",
];

/// The catalogue's components by kind (`schemas`, `responses`...), each by
/// (prefixed) name.
type Components = BTreeMap<&'static str, Map<String, Value>>;

/// The published documents of the remote services, and the client that
/// fetches them.
#[derive(Debug)]
pub(super) struct Catalogue {
    client: Client<HttpConnector<Resolver>, Empty<Bytes>>,
    timeout: Duration,
    loop_guard: LoopGuard,
    /// Under which an instance to ask is picked, as the proxy picks one.
    instances: Arc<ArcSwap<InstancePolicy>>,
    /// The services still to ask, served by [`FETCHERS`] workers started
    /// at the first fetch.
    queue: Arc<FetchQueue>,
    workers: std::sync::Once,
    published: std::sync::Mutex<HashMap<RegistrationId, Published>>,
}

/// Which registration a document or a pending asking belongs to: the
/// address of its `RemoteService`. Not its name: two tenants' services, or
/// two versions of one, share a name and each publish their own document.
/// An address is reused only after its registration is gone, and each
/// entry also holds the registration weakly, so a stale entry is told from
/// a later registration at the same address.
type RegistrationId = usize;

fn id_of(remote: &Arc<RemoteService>) -> RegistrationId {
    Arc::as_ptr(remote).addr()
}

/// A document a registration published, valid while that registration is
/// the one in the table.
#[derive(Debug)]
struct Published {
    registration: Weak<RemoteService>,
    document: Arc<Value>,
    bytes: usize,
}

/// Why a published document was not merged.
#[derive(Debug, thiserror::Error)]
enum NotPublished {
    #[error("no instance to ask: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Request(String),
    #[error("answered {0}")]
    Status(axum::http::StatusCode),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("larger than {MAX_DOCUMENT_BYTES} bytes, or cut short: {0}")]
    Body(String),
    #[error("not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("not an OpenAPI document: no `paths` object")]
    NoPaths,
    #[error(
        "the catalogue already keeps {MAX_KEPT_BYTES} bytes of published documents; this one ({0} bytes) is not merged"
    )]
    Full(usize),
}

impl Catalogue {
    /// Fetches connect only where `egress` admits, within `timeout`, and
    /// carry `loop_guard`'s `Via` entry, like health checks.
    pub(super) fn new(
        egress: Arc<EgressPolicy>,
        loop_guard: LoopGuard,
        instances: Arc<ArcSwap<InstancePolicy>>,
        timeout: Duration,
    ) -> Self {
        let mut connector = HttpConnector::new_with_resolver(Resolver::new(egress));
        connector.set_connect_timeout(Some(timeout));
        Self {
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build(connector),
            timeout,
            loop_guard,
            instances,
            queue: Arc::new(FetchQueue::default()),
            workers: std::sync::Once::new(),
            published: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Asks `remote` for its published document in the background; what it
    /// answers replaces what its name published before. A service that
    /// publishes none (most answer 404) is listed from its declared
    /// endpoints only. A service not listening yet is asked again, a few
    /// times, [`RETRY_FIRST`] apart and then twice as long each time: the
    /// guide's FastAPI client registers from its startup hook, before its
    /// server accepts connections. The asking ends with the registration
    /// (a replaced or removed one is not asked again).
    ///
    /// The asking is queued, not a task of its own: a fixed pool of
    /// [`FETCHERS`] workers serves the queue, so a burst of registrations
    /// costs one queue entry each, not a task, a timer and a socket.
    pub(super) fn fetch(self: &Arc<Self>, remote: Arc<RemoteService>) {
        self.workers.call_once(|| {
            for _ in 0..FETCHERS {
                let catalogue = Arc::downgrade(self);
                tokio::spawn(self.queue.clone().work(move |remote, attempt| {
                    let catalogue = catalogue.clone();
                    async move {
                        match catalogue.upgrade() {
                            Some(catalogue) => catalogue.ask(&remote, attempt).await,
                            None => Asked::Done,
                        }
                    }
                }));
            }
        });
        self.queue.push(&remote);
    }

    /// One asking of `remote` for its document, the `attempt`-th: whether
    /// to ask again.
    async fn ask(&self, remote: &Arc<RemoteService>, attempt: u32) -> Asked {
        let name = remote.name();
        let error = match self.published_by(remote).await {
            Ok((document, bytes)) => {
                match self.keep(remote, document, bytes) {
                    Ok(paths) => tracing::info!(
                        service = %name,
                        paths,
                        bytes,
                        "published API document merged into the catalogue"
                    ),
                    Err(error) => {
                        tracing::warn!(service = %name, error = %error, "published API document not merged");
                    }
                }
                return Asked::Done;
            }
            Err(error) => error,
        };
        let unreachable = matches!(
            error,
            NotPublished::Unavailable(_) | NotPublished::Request(_) | NotPublished::Timeout(_)
        );
        if unreachable && attempt < ATTEMPTS {
            return Asked::Again;
        }
        lock(&self.published).remove(&id_of(remote));
        tracing::debug!(service = %name, error = %error, attempt, "no published API document");
        Asked::Done
    }

    async fn published_by(&self, remote: &RemoteService) -> Result<(Value, usize), NotPublished> {
        let uri = remote
            .route(&self.instances.load(), None)
            .map_err(|unavailable| NotPublished::Unavailable(unavailable.to_string()))?
            .uri(PUBLISHED_PATH, None)
            .map_err(|error| NotPublished::Request(error.to_string()))?;
        let mut request = axum::http::Request::get(uri)
            .header(axum::http::header::USER_AGENT, "plugin-host-catalogue")
            .header(axum::http::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|error| NotPublished::Request(error.to_string()))?;
        self.loop_guard.stamp(request.headers_mut());
        let attempt = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|error| NotPublished::Request(error_chain(&error)))?;
            if !response.status().is_success() {
                return Err(NotPublished::Status(response.status()));
            }
            Limited::new(response.into_body(), MAX_DOCUMENT_BYTES)
                .collect()
                .await
                .map(|body| body.to_bytes())
                .map_err(|error| NotPublished::Body(error.to_string()))
        };
        let body = tokio::time::timeout(self.timeout, attempt)
            .await
            .map_err(|_| NotPublished::Timeout(self.timeout))??;
        let document: Value = serde_json::from_slice(&body)?;
        if !document.get("paths").is_some_and(Value::is_object) {
            return Err(NotPublished::NoPaths);
        }
        Ok((document, body.len()))
    }

    /// Keeps `document` for `remote`'s registration; answers how many paths
    /// it has.
    fn keep(
        &self,
        remote: &Arc<RemoteService>,
        document: Value,
        bytes: usize,
    ) -> Result<usize, NotPublished> {
        let mut published = lock(&self.published);
        published.retain(|_, kept| kept.registration.strong_count() > 0);
        let kept: usize = published
            .iter()
            .filter(|(id, _)| **id != id_of(remote))
            .map(|(_, kept)| kept.bytes)
            .sum();
        if kept + bytes > MAX_KEPT_BYTES {
            return Err(NotPublished::Full(bytes));
        }
        let paths = document["paths"].as_object().map_or(0, Map::len);
        published.insert(
            id_of(remote),
            Published {
                registration: Arc::downgrade(remote),
                document: Arc::new(document),
                bytes,
            },
        );
        Ok(paths)
    }

    /// The document `remote`'s current registration published, if any.
    fn published(&self, remote: &Arc<RemoteService>) -> Option<Arc<Value>> {
        let published = lock(&self.published);
        let kept = published.get(&id_of(remote))?;
        let registration = kept.registration.upgrade()?;
        Arc::ptr_eq(&registration, remote).then(|| kept.document.clone())
    }

    /// The catalogue of `services` (sorted by name), telling clients to
    /// call the gateway at `gateway_url`.
    pub(super) fn document(&self, services: &[Arc<Service>], gateway_url: &str) -> Value {
        let mut paths = Map::new();
        let mut components = Components::new();
        let mut tags = Vec::new();
        for service in services {
            let published = match &service.backend {
                Backend::Remote(remote) => self.published(remote),
                Backend::Plugin(_) => None,
            };
            add_service(
                &service.info,
                service.public_endpoints(),
                published.as_deref(),
                &mut paths,
                &mut components,
            );
            let info = &service.info;
            let mut tag = json!({"name": info.name});
            let description = [info.display_name.as_str(), info.description.as_str()]
                .into_iter()
                .filter(|text| !text.is_empty() && *text != info.name)
                .collect::<Vec<_>>()
                .join(": ");
            if !description.is_empty() {
                tag["description"] = json!(description);
            }
            tags.push(tag);
        }
        let mut all_components = Map::new();
        for (kind, entries) in components {
            if !entries.is_empty() {
                all_components.insert(kind.to_owned(), Value::Object(entries));
            }
        }
        all_components.insert(
            "securitySchemes".to_owned(),
            json!({
                API_KEY_SCHEME: {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                BEARER_SCHEME: {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            }),
        );
        json!({
            "openapi": "3.1.0",
            "info": {
                "title": "plugin-host gateway",
                "version": env!("CARGO_PKG_VERSION"),
                "description": "Every service the gateway routes, plugins and remote services alike, under /api/{name}/.",
            },
            "servers": [{"url": gateway_url}],
            "tags": tags,
            "paths": paths,
            "components": all_components,
        })
    }
}

impl Drop for Catalogue {
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// What one asking of a service concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asked {
    /// Nothing more to ask: merged, refused, or the last attempt.
    Done,
    /// Not reachable yet: ask again after the next wait.
    Again,
}

/// The services whose documents are still to be asked for, each at the
/// time it is due: one entry per registration (queued again, it keeps one
/// place), holding the registration weakly, so a service that goes, or is
/// replaced by a newer registration, is dropped from the queue unasked. Workers ([`FetchQueue::work`]) take due entries; how
/// many fetches are in flight is how many workers there are.
#[derive(Debug, Default)]
struct FetchQueue {
    pending: std::sync::Mutex<Pending>,
    /// Signalled when an entry is queued, or the queue closed: a worker
    /// waiting for a later entry looks again.
    queued: Notify,
}

#[derive(Debug, Default)]
struct Pending {
    /// By registration.
    jobs: HashMap<RegistrationId, Job>,
    /// The same entries in the order they are due: (due, sequence, id).
    due: BTreeSet<(Instant, u64, RegistrationId)>,
    /// Tells apart entries due at the same instant.
    sequence: u64,
    /// Set when the catalogue goes: the workers end.
    closed: bool,
}

#[derive(Debug)]
struct Job {
    registration: Weak<RemoteService>,
    /// Which asking this is, from 1.
    attempt: u32,
    /// Its place in [`Pending::due`].
    due: (Instant, u64),
}

impl Pending {
    fn insert(&mut self, remote: &Arc<RemoteService>, attempt: u32, at: Instant) {
        self.sequence += 1;
        let due = (at, self.sequence);
        let id = id_of(remote);
        if let Some(replaced) = self.jobs.insert(
            id,
            Job {
                registration: Arc::downgrade(remote),
                attempt,
                due,
            },
        ) {
            self.due.remove(&(replaced.due.0, replaced.due.1, id));
        }
        self.due.insert((due.0, due.1, id));
    }

    /// The first entry due by `now` whose service is still there, with
    /// its attempt (entries of services gone are dropped on the way);
    /// else when the next one is due, if any.
    fn take(&mut self, now: Instant) -> Result<(Arc<RemoteService>, u32), Option<Instant>> {
        while let Some(first) = self.due.first() {
            if first.0 > now {
                return Err(Some(first.0));
            }
            let (_, _, id) = self.due.pop_first().expect("a first entry");
            let Some(job) = self.jobs.remove(&id) else {
                continue;
            };
            if let Some(remote) = job.registration.upgrade() {
                return Ok((remote, job.attempt));
            }
        }
        Err(None)
    }
}

impl FetchQueue {
    /// Queues the first asking of `remote`, due now, in place of any
    /// pending one of it.
    fn push(&self, remote: &Arc<RemoteService>) {
        lock(&self.pending).insert(remote, 1, Instant::now());
        self.queued.notify_one();
    }

    /// Queues asking `remote` again, the `attempt`-th time, after `wait`,
    /// unless it was queued afresh meanwhile.
    fn again(&self, remote: &Arc<RemoteService>, attempt: u32, wait: Duration) {
        let mut pending = lock(&self.pending);
        if !pending.jobs.contains_key(&id_of(remote)) {
            pending.insert(remote, attempt, Instant::now() + wait);
        }
        drop(pending);
        self.queued.notify_one();
    }

    /// Ends the workers once they are between two askings.
    fn close(&self) {
        lock(&self.pending).closed = true;
        self.queued.notify_waiters();
    }

    /// Entries queued, including those of services gone and not yet
    /// dropped.
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.pending).jobs.len()
    }

    /// The next due asking; `None` once the queue is closed.
    async fn next(&self) -> Option<(Arc<RemoteService>, u32)> {
        loop {
            let queued = self.queued.notified();
            tokio::pin!(queued);
            // Registered before looking, so a push made after the look
            // wakes this worker.
            queued.as_mut().enable();
            let next_due = {
                let mut pending = lock(&self.pending);
                if pending.closed {
                    return None;
                }
                match pending.take(Instant::now()) {
                    Ok(taken) => return Some(taken),
                    Err(next_due) => next_due,
                }
            };
            match next_due {
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = &mut queued => {}
                    }
                }
                None => queued.await,
            }
        }
    }

    /// One worker: asks each due service with `ask` (given the attempt)
    /// and queues it again, [`RETRY_FIRST`] later and then twice as long
    /// each time, while `ask` says so; ends when the queue closes.
    async fn work<F, A>(self: Arc<Self>, ask: F)
    where
        F: Fn(Arc<RemoteService>, u32) -> A,
        A: Future<Output = Asked>,
    {
        while let Some((remote, attempt)) = self.next().await {
            if ask(remote.clone(), attempt).await == Asked::Again {
                let wait = RETRY_FIRST.saturating_mul(1 << (attempt - 1).min(16));
                self.again(&remote, attempt + 1, wait);
            }
        }
    }
}

/// Adds `service`'s operations: those of its published document, then its
/// declared endpoints the document does not describe.
fn add_service(
    info: &ServiceInfo,
    public: &PublicEndpoints,
    published: Option<&Value>,
    paths: &mut Map<String, Value>,
    components: &mut Components,
) {
    let name = &info.name;
    let declared_methods: HashSet<String> = info
        .endpoints
        .iter()
        .map(|endpoint| endpoint.method.to_ascii_lowercase())
        .collect();
    // What the gateway forwards: every method if nothing was declared,
    // else the declared ones (HEAD with GET, OPTIONS always).
    let forwarded = |method: &str| {
        declared_methods.is_empty()
            || declared_methods.contains(method)
            || method == "options"
            || (method == "head" && declared_methods.contains("get"))
    };
    let mut described: HashSet<(String, String)> = HashSet::new();
    if let Some(document) = published {
        let prefix = format!("{name}.");
        for (path, item) in document["paths"].as_object().into_iter().flatten() {
            let (Some(item), true) = (item.as_object(), path.starts_with('/')) else {
                continue;
            };
            let mut item = item.clone();
            item.retain(|key, _| !OPERATION_METHODS.contains(&key.as_str()) || forwarded(key));
            for method in OPERATION_METHODS {
                let Some(operation) = item.get_mut(*method).and_then(Value::as_object_mut) else {
                    continue;
                };
                operation.remove("security");
                operation.insert("tags".to_owned(), json!([name]));
                if let Some(id) = operation.get("operationId").and_then(Value::as_str) {
                    let id = format!("{prefix}{id}");
                    operation.insert("operationId".to_owned(), json!(id));
                }
                secure(info, public, method, path, operation);
                described.insert((path.clone(), (*method).to_owned()));
            }
            let mut item = Value::Object(item);
            prefix_refs(&mut item, &prefix);
            paths.insert(gateway_path(name, path), item);
        }
        for kind in MERGED_COMPONENTS {
            let entries = document["components"][*kind]
                .as_object()
                .into_iter()
                .flatten();
            for (entry, value) in entries {
                let mut value = value.clone();
                prefix_refs(&mut value, &prefix);
                components
                    .entry(kind)
                    .or_default()
                    .insert(format!("{prefix}{entry}"), value);
            }
        }
    }
    for endpoint in &info.endpoints {
        let method = endpoint.method.to_ascii_lowercase();
        if described.contains(&(endpoint.path.clone(), method.clone())) {
            continue;
        }
        let mut operation = Map::new();
        operation.insert("tags".to_owned(), json!([name]));
        operation.insert(
            "operationId".to_owned(),
            json!(format!("{name}.{method}{}", endpoint.path)),
        );
        if !endpoint.description.is_empty() {
            operation.insert("summary".to_owned(), json!(endpoint.description));
        }
        let parameters: Vec<Value> = template_params(&endpoint.path)
            .map(|param| json!({"name": param, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if !parameters.is_empty() {
            operation.insert("parameters".to_owned(), Value::Array(parameters));
        }
        operation.insert(
            "responses".to_owned(),
            json!({"default": {"description": "the service's answer"}}),
        );
        secure(info, public, &method, &endpoint.path, &mut operation);
        let item = paths
            .entry(gateway_path(name, &endpoint.path))
            .or_insert_with(|| json!({}));
        if let Some(item) = item.as_object_mut() {
            item.insert(method, Value::Object(operation));
        }
    }
}

/// Gives `operation` the gateway's security requirement when the gateway
/// asks a credential for it.
fn secure(
    info: &ServiceInfo,
    public: &PublicEndpoints,
    method: &str,
    path: &str,
    operation: &mut Map<String, Value>,
) {
    if info.requires_auth && !public.is_public(&method.to_ascii_uppercase(), path) {
        operation.insert(
            "security".to_owned(),
            json!([{API_KEY_SCHEME: []}, {BEARER_SCHEME: []}]),
        );
    }
}

/// `/api/<name>` + the service's own path.
fn gateway_path(name: &str, path: &str) -> String {
    format!("/api/{name}{path}")
}

/// The `{param}` names of a path template.
fn template_params(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter_map(|segment| {
        segment
            .strip_prefix('{')
            .and_then(|rest| rest.strip_suffix('}'))
            .filter(|param| !param.is_empty())
    })
}

/// Rewrites every local `$ref` to a component (`#/components/<kind>/<x>`)
/// to the prefixed component's name.
fn prefix_refs(value: &mut Value, prefix: &str) {
    match value {
        Value::Object(object) => {
            for (key, value) in object.iter_mut() {
                match value {
                    Value::String(target) if key == "$ref" => {
                        if let Some(rest) = target.strip_prefix("#/components/")
                            && let Some((kind, entry)) = rest.split_once('/')
                        {
                            *target = format!("#/components/{kind}/{prefix}{entry}");
                        }
                    }
                    _ => prefix_refs(value, prefix),
                }
            }
        }
        Value::Array(values) => {
            for value in values {
                prefix_refs(value, prefix);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Endpoint;

    #[test]
    fn refs_to_components_are_prefixed_and_others_kept() {
        let mut value = json!({
            "a": {"$ref": "#/components/schemas/Item"},
            "b": [{"$ref": "#/components/responses/NotFound"}, {"$ref": "https://elsewhere/x"}],
            "$ref": "#/definitions/old",
        });
        prefix_refs(&mut value, "svc.");
        assert_eq!(
            value,
            json!({
                "a": {"$ref": "#/components/schemas/svc.Item"},
                "b": [{"$ref": "#/components/responses/svc.NotFound"}, {"$ref": "https://elsewhere/x"}],
                "$ref": "#/definitions/old",
            })
        );
    }

    fn info(requires_auth: bool) -> ServiceInfo {
        let endpoint = |path: &str, method: &str, is_public| Endpoint {
            path: path.to_owned(),
            method: method.to_owned(),
            description: format!("{method} {path}"),
            is_public,
        };
        ServiceInfo {
            name: "shop".to_owned(),
            display_name: "Shop".to_owned(),
            description: String::new(),
            version: "1".to_owned(),
            health_check_url: "/health".to_owned(),
            metadata: BTreeMap::new(),
            tags: Vec::new(),
            requires_auth,
            endpoints: vec![
                endpoint("/items/{id}", "GET", true),
                endpoint("/items", "POST", false),
                endpoint("/undocumented", "GET", true),
            ],
        }
    }

    fn catalogue_of(
        info: &ServiceInfo,
        published: Option<&Value>,
    ) -> (Map<String, Value>, Components) {
        let mut paths = Map::new();
        let mut components = BTreeMap::new();
        let public = PublicEndpoints::compile(info);
        add_service(info, &public, published, &mut paths, &mut components);
        (paths, components)
    }

    #[test]
    fn declared_endpoints_become_operations_at_gateway_paths() {
        let (paths, components) = catalogue_of(&info(true), None);
        assert!(components.is_empty());
        let get = &paths["/api/shop/items/{id}"]["get"];
        assert_eq!(get["summary"], "GET /items/{id}");
        assert_eq!(
            get["parameters"],
            json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}])
        );
        assert!(get.get("security").is_none(), "declared public: {get}");
        assert_eq!(
            paths["/api/shop/items"]["post"]["security"],
            json!([{API_KEY_SCHEME: []}, {BEARER_SCHEME: []}])
        );
        // Without requires_auth nothing asks a credential.
        let (paths, _) = catalogue_of(&info(false), None);
        assert!(paths["/api/shop/items"]["post"].get("security").is_none());
    }

    #[test]
    fn a_published_document_is_merged_prefixed_and_secured_by_the_gateway() {
        let published = json!({
            "openapi": "3.1.0",
            "paths": {
                "/items/{id}": {"get": {
                    "operationId": "read_item",
                    "security": [{"their_scheme": []}],
                    "responses": {"200": {"description": "ok", "content": {"application/json":
                        {"schema": {"$ref": "#/components/schemas/Item"}}}}},
                }},
                "/items": {
                    "post": {"operationId": "create_item", "responses": {}},
                    "delete": {"operationId": "not_forwarded", "responses": {}},
                },
                "relative": {"get": {}},
            },
            "components": {
                "schemas": {"Item": {"type": "object", "properties": {
                    "tags": {"type": "array", "items": {"$ref": "#/components/schemas/Tag"}}}},
                    "Tag": {"type": "string"}},
                "securitySchemes": {"their_scheme": {"type": "http", "scheme": "basic"}},
            },
        });
        let (paths, components) = catalogue_of(&info(true), Some(&published));
        let read = &paths["/api/shop/items/{id}"]["get"];
        assert_eq!(read["operationId"], "shop.read_item");
        assert_eq!(read["tags"], json!(["shop"]));
        assert!(read.get("security").is_none(), "public, and theirs dropped");
        assert_eq!(
            read["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/shop.Item"
        );
        let create = &paths["/api/shop/items"]["post"];
        assert_eq!(create["operationId"], "shop.create_item");
        assert_eq!(
            create["security"],
            json!([{API_KEY_SCHEME: []}, {BEARER_SCHEME: []}])
        );
        assert!(
            paths["/api/shop/items"].get("delete").is_none(),
            "the gateway does not forward an undeclared method"
        );
        assert!(!paths.contains_key("/api/shoprelative"));
        // A declared endpoint the document lacks is still listed.
        assert_eq!(
            paths["/api/shop/undocumented"]["get"]["operationId"],
            "shop.get/undocumented"
        );
        assert_eq!(
            components["schemas"]["shop.Item"]["properties"]["tags"]["items"]["$ref"],
            "#/components/schemas/shop.Tag"
        );
        assert!(components["schemas"].contains_key("shop.Tag"));
        assert!(!components.contains_key("securitySchemes"));
    }

    fn remote(name: &str) -> Arc<RemoteService> {
        let mut info = info(false);
        info.name = name.to_owned();
        let addr = crate::remote::InstanceAddr {
            host: "127.0.0.1".to_owned(),
            port: 9,
        };
        let instance = crate::remote::Instance::new(addr, None, std::time::SystemTime::now())
            .expect("a valid address");
        Arc::new(RemoteService::new(
            crate::remote::RemoteSpec {
                info: Arc::new(info),
                base_path: "/".to_owned(),
                load_balancing: None,
            },
            vec![Arc::new(instance)],
            std::time::SystemTime::now(),
            None,
            Duration::from_secs(30),
        ))
    }

    /// Workers on `queue` whose asking records the name asked and waits
    /// for a permit of `gate`; answers the names asked, and the most
    /// askings in flight at once.
    struct Probe {
        asked: Arc<std::sync::Mutex<Vec<String>>>,
        in_flight: Arc<std::sync::atomic::AtomicUsize>,
        most: Arc<std::sync::atomic::AtomicUsize>,
        gate: Arc<tokio::sync::Semaphore>,
    }

    impl Probe {
        fn start(queue: &Arc<FetchQueue>, workers: usize) -> Self {
            use std::sync::atomic::Ordering::SeqCst;
            let probe = Self {
                asked: Arc::default(),
                in_flight: Arc::default(),
                most: Arc::default(),
                gate: Arc::new(tokio::sync::Semaphore::new(0)),
            };
            for _ in 0..workers {
                let (asked, in_flight, most, gate) = (
                    probe.asked.clone(),
                    probe.in_flight.clone(),
                    probe.most.clone(),
                    probe.gate.clone(),
                );
                tokio::spawn(queue.clone().work(move |remote, _attempt| {
                    let (asked, in_flight, most, gate) =
                        (asked.clone(), in_flight.clone(), most.clone(), gate.clone());
                    async move {
                        let now = in_flight.fetch_add(1, SeqCst) + 1;
                        most.fetch_max(now, SeqCst);
                        lock(&asked).push(remote.name().to_owned());
                        gate.acquire().await.expect("open").forget();
                        in_flight.fetch_sub(1, SeqCst);
                        Asked::Done
                    }
                }));
            }
            probe
        }

        /// Lets the tasks run until `done` holds (bounded).
        async fn until(&self, done: impl Fn(&Self) -> bool) {
            for _ in 0..10_000 {
                if done(self) {
                    return;
                }
                tokio::task::yield_now().await;
            }
            panic!("not reached; asked: {:?}", lock(&self.asked));
        }

        fn asked(&self) -> Vec<String> {
            let mut asked = lock(&self.asked).clone();
            asked.sort();
            asked
        }
    }

    #[tokio::test]
    async fn the_fetch_queue_has_as_many_askings_in_flight_as_workers_and_no_more() {
        use std::sync::atomic::Ordering::SeqCst;
        let queue = Arc::new(FetchQueue::default());
        let services: Vec<_> = (0..40).map(|i| remote(&format!("s{i:02}"))).collect();
        for service in &services {
            queue.push(service);
        }
        let probe = Probe::start(&queue, 4);
        probe.until(|probe| probe.in_flight.load(SeqCst) == 4).await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(probe.asked().len(), 4, "only the workers' askings start");
        probe.gate.add_permits(services.len());
        probe.until(|probe| probe.asked().len() == 40).await;
        let mut names: Vec<String> = services.iter().map(|s| s.name().to_owned()).collect();
        names.sort();
        assert_eq!(probe.asked(), names, "each service asked once");
        assert_eq!(probe.most.load(SeqCst), 4);
        assert_eq!(queue.len(), 0);
        queue.close();
    }

    #[tokio::test]
    async fn a_service_gone_or_replaced_is_dropped_from_the_fetch_queue_and_one_queued_twice_is_asked_once()
     {
        let queue = Arc::new(FetchQueue::default());
        let gone = remote("gone");
        queue.push(&gone);
        let replaced = remote("shop");
        queue.push(&replaced);
        let newer = remote("shop");
        queue.push(&newer);
        queue.push(&newer);
        let kept = remote("kept");
        queue.push(&kept);
        drop(gone);
        drop(replaced);
        assert_eq!(queue.len(), 4, "one entry per registration");
        let probe = Probe::start(&queue, 2);
        probe.gate.add_permits(10);
        probe.until(|probe| probe.asked().len() == 2).await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(probe.asked(), ["kept", "shop"]);
        assert_eq!(queue.len(), 0);
        queue.close();
    }

    #[test]
    fn template_params_are_the_braced_segments() {
        assert_eq!(
            template_params("/data/{id}/x/{ name}/{}").collect::<Vec<_>>(),
            vec!["id", " name"]
        );
        assert_eq!(template_params("/plain").count(), 0);
    }
}
