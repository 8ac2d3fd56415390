//! The service table: every service the gateway can route to, by name,
//! whatever its kind.
//!
//! It owns the mapping name -> [`Service`] and nothing else. Writers (the
//! plugin manager, the registry) replace entries atomically; readers (the
//! gateway, the registry listing) take a snapshot without locking. A
//! [`Service`] in the table is immutable: mutable state of a kind (a remote
//! service's heartbeats) lives behind its own handle in [`Backend`].

use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender};

use crate::metrics::ServiceTraffic;
use crate::plugin::PluginRuntime;
use crate::remote::{CheckOutcome, RemoteService, Status};
use crate::service::{PublicEndpoints, RouteTemplates, ServiceInfo};
use crate::sync::lock;

/// Where a service's requests go.
#[derive(Debug, Clone)]
pub enum Backend {
    /// An in-process plugin.
    Plugin(PluginBackend),
    /// An out-of-process service reached over HTTP.
    Remote(Arc<RemoteService>),
}

/// An in-process plugin mounted from a file.
#[derive(Debug, Clone)]
pub struct PluginBackend {
    /// Its workers and library.
    pub runtime: Arc<PluginRuntime>,
    /// File name in the plugins directory it was loaded from.
    pub loaded_from: String,
    /// What the checks of its health route found.
    pub health: Arc<PluginHealth>,
}

/// A plugin's health, as the liveness task's checks of its health route
/// (see `registry::liveness`) found it: healthy until a check fails. An
/// unhealthy plugin is still routed (it has one instance, and its
/// handlers may answer what its health route does not); the listing and
/// the metrics show it, and each change is logged once.
#[derive(Debug, Default)]
pub struct PluginHealth {
    last: Mutex<Option<CheckOutcome>>,
}

impl PluginHealth {
    /// Records a check of the plugin `plugin`; logs a change of status
    /// (WARN when it fails, INFO when it passes again).
    pub fn record(&self, plugin: &str, outcome: CheckOutcome) {
        let mut last = lock(&self.last);
        let was_ok = last.as_ref().is_none_or(|last| last.ok);
        if was_ok && !outcome.ok {
            tracing::warn!(plugin = %plugin, error = outcome.error.as_deref().unwrap_or_default(), "plugin unhealthy: its health check failed");
        } else if !was_ok && outcome.ok {
            tracing::info!(plugin = %plugin, "plugin healthy again");
        }
        *last = Some(outcome);
    }

    /// Healthy unless the last check failed.
    pub fn status(&self) -> Status {
        match &*lock(&self.last) {
            Some(last) if !last.ok => Status::Unhealthy,
            _ => Status::Healthy,
        }
    }

    /// The last check, if any.
    pub fn last_check(&self) -> Option<CheckOutcome> {
        lock(&self.last).clone()
    }
}

/// One entry of the table.
#[derive(Debug, Clone)]
pub struct Service {
    /// What the service declares.
    pub info: ServiceInfo,
    /// Where its requests go.
    pub backend: Backend,
    /// Its public endpoints, compiled from `info` once rather than per
    /// request.
    public_endpoints: PublicEndpoints,
    /// Its endpoints' templates, which name a request's route.
    routes: RouteTemplates,
    /// Its traffic since this entry was made: the gateway records into
    /// it without resolving a label, and it leaves with the entry.
    traffic: Arc<ServiceTraffic>,
}

impl Service {
    /// The entry for a service declaring `info`, reached through `backend`.
    pub fn new(info: ServiceInfo, backend: Backend) -> Self {
        Self {
            public_endpoints: PublicEndpoints::compile(&info),
            routes: RouteTemplates::compile(&info),
            traffic: Arc::new(ServiceTraffic::new(
                info.endpoints.iter().map(|endpoint| endpoint.path.as_str()),
            )),
            info,
            backend,
        }
    }

    /// The index of the declared endpoint `method` on `path` (below the
    /// mount point) reaches, if any: its route label.
    pub fn route(&self, method: &str, path: &str) -> Option<usize> {
        self.routes.route(method, path)
    }

    /// Its traffic since it entered the table.
    pub fn traffic(&self) -> &Arc<ServiceTraffic> {
        &self.traffic
    }

    /// Which of its endpoints may be called without authentication.
    pub fn public_endpoints(&self) -> &PublicEndpoints {
        &self.public_endpoints
    }

    /// `"plugin"` or `"remote"`.
    pub fn kind(&self) -> &'static str {
        match self.backend {
            Backend::Plugin(_) => "plugin",
            Backend::Remote(_) => "remote",
        }
    }
}

/// A persistent map: a writer's copy shares all but the changed path with
/// the snapshot readers hold, so a write costs O(log n), not a full clone.
type Map = imbl::HashMap<String, Arc<Service>>;

/// One version of the table.
#[derive(Debug, Default)]
struct Snapshot {
    map: Map,
    /// Its services sorted by name, made by the first reader that asks
    /// and shared by every later one until the next write: a listing, a
    /// scrape or a health check round of a large table would otherwise
    /// sort it each time.
    sorted: OnceLock<Arc<[Arc<Service>]>>,
}

impl Snapshot {
    fn new(map: Map) -> Self {
        Self {
            map,
            sorted: OnceLock::new(),
        }
    }
}

/// Every routable service by name. Cheap to share: clone the `Arc`.
#[derive(Debug, Default)]
pub struct ServiceTable {
    current: ArcSwap<Snapshot>,
    /// Serializes writers so that a check-then-replace is atomic.
    write: Mutex<()>,
    /// Told the name of every service removed, whoever removed it.
    freed: Mutex<Vec<Sender<String>>>,
}

impl ServiceTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// The service named `name`, if any.
    pub fn get(&self, name: &str) -> Option<Arc<Service>> {
        self.current.load().map.get(name).cloned()
    }

    /// Every service, sorted by name.
    pub fn list(&self) -> Arc<[Arc<Service>]> {
        let snapshot = self.current.load();
        snapshot
            .sorted
            .get_or_init(|| {
                let mut services: Vec<_> = snapshot.map.values().cloned().collect();
                services.sort_by(|a, b| a.info.name.cmp(&b.info.name));
                services.into()
            })
            .clone()
    }

    /// Puts `service` under its name unless another service holds the name
    /// and `may_replace(holder)` says no. Returns the service it replaced,
    /// or the holder it refused to replace.
    pub fn insert(
        &self,
        service: Service,
        may_replace: impl FnOnce(&Service) -> bool,
    ) -> Result<Option<Arc<Service>>, Arc<Service>> {
        let _guard = lock(&self.write);
        let current = self.current.load_full();
        if let Some(holder) = current.map.get(&service.info.name)
            && !may_replace(holder)
        {
            return Err(holder.clone());
        }
        let mut next = current.map.clone();
        let previous = next.insert(service.info.name.clone(), Arc::new(service));
        self.current.store(Arc::new(Snapshot::new(next)));
        Ok(previous)
    }

    /// A channel that receives the name of every service removed from now
    /// on, so that whoever waits for a name (a plugin file refused because
    /// the name was taken) can try again.
    pub fn freed_names(&self) -> Receiver<String> {
        let (sender, receiver) = crossbeam_channel::unbounded();
        lock(&self.freed).push(sender);
        receiver
    }

    /// Removes the service named `name` if `should_remove(service)` says so.
    pub fn remove_if(
        &self,
        name: &str,
        should_remove: impl FnOnce(&Service) -> bool,
    ) -> Option<Arc<Service>> {
        let _guard = lock(&self.write);
        let current = self.current.load_full();
        let holder = current.map.get(name)?;
        if !should_remove(holder) {
            return None;
        }
        let mut next = current.map.clone();
        let removed = next.remove(name);
        self.current.store(Arc::new(Snapshot::new(next)));
        lock(&self.freed).retain(|listener| listener.send(name.to_owned()).is_ok());
        removed
    }
}
