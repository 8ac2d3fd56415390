//! The service table: every service the gateway can route to, by name and
//! version, whatever its kind.
//!
//! It owns the mapping name -> [`Versions`] (the name's versions, highest
//! first, with the default and the traffic split precomputed) and the
//! names' traffic policies, and nothing else. Writers (the plugin manager,
//! the registry) replace a name's entry atomically; readers (the gateway,
//! the registry listing) take a snapshot without locking. An entry is
//! immutable: mutable state of a kind (a remote service's heartbeats)
//! lives behind its own handle in [`Backend`].
//!
//! A name's versions are all of one kind: the writers see to it (a plugin
//! file waits for a name remote services hold; a registration for a name
//! plugins hold is refused), and the table keeps whatever list a writer's
//! change returns.

use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use axum::http::{HeaderMap, HeaderValue};
use crossbeam_channel::{Receiver, Sender};

use crate::metrics::ServiceTraffic;
use crate::plugin::PluginRuntime;
use crate::remote::{CheckOutcome, RemoteService, Status};
use crate::service::{PublicEndpoints, RouteTemplates, ServiceInfo, Version, VersionReq};
use crate::sync::lock;
use crate::tenant;
use crate::traffic::{Split, TrafficPolicy};

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

/// One version of a service.
#[derive(Debug, Clone)]
pub struct Service {
    /// What the service declares (its `version` normalised); a remote
    /// service's is the one its spec holds.
    pub info: Arc<ServiceInfo>,
    /// Its version.
    version: Version,
    /// Its version as the `X-Service-Version` answer header, made once
    /// rather than per request.
    version_header: HeaderValue,
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
    /// The entry for version `version` of a service declaring `info`,
    /// reached through `backend`.
    pub fn new(info: impl Into<Arc<ServiceInfo>>, version: Version, backend: Backend) -> Self {
        let mut info = info.into();
        let normalised = version.to_string();
        if info.version != normalised {
            Arc::make_mut(&mut info).version = normalised;
        }
        Self {
            // A version's text is ASCII without control characters.
            version_header: HeaderValue::from_str(&info.version)
                .unwrap_or_else(|_| HeaderValue::from_static("invalid")),
            version,
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

    /// Its version.
    pub fn version(&self) -> &Version {
        &self.version
    }

    /// Its version as a header value.
    pub fn version_header(&self) -> &HeaderValue {
        &self.version_header
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

/// Which version of a name a request asked for.
#[derive(Debug, Clone)]
pub enum Selection {
    /// None in particular: the traffic split if the name has one, else
    /// its default version.
    Default,
    /// The highest version meeting the requirement.
    Matching(VersionReq),
}

/// One name's versions: the table's entry for a name. Immutable; a writer
/// replaces it whole.
#[derive(Debug)]
pub struct Versions {
    /// Its key in the table: the name, or `<tenant>/<name>` outside the
    /// default tenant.
    key: String,
    /// Highest first, never empty.
    versions: Vec<Arc<Service>>,
    /// Index of the default version: the highest stable one, else the
    /// highest.
    default: usize,
    /// The name's traffic policy, if it has one.
    policy: Option<Arc<TrafficPolicy>>,
    /// The policy compiled over the versions present; `None` (one branch
    /// on the request path) when there is no policy or no version it
    /// weighs is present.
    split: Option<Split>,
}

impl Versions {
    fn build(
        key: &str,
        mut versions: Vec<Arc<Service>>,
        policy: Option<Arc<TrafficPolicy>>,
    ) -> Option<Self> {
        if versions.is_empty() {
            return None;
        }
        versions.sort_by(|a, b| b.version.cmp(&a.version));
        let default = versions
            .iter()
            .position(|service| service.version.is_stable())
            .unwrap_or(0);
        let split = policy.as_ref().and_then(|policy| {
            Split::compile(policy, versions.iter().map(|service| &service.version))
        });
        Some(Self {
            key: key.to_owned(),
            versions,
            default,
            policy,
            split,
        })
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.versions[0].info.name
    }

    /// The tenant it belongs to.
    pub fn tenant(&self) -> &str {
        tenant::split_key(&self.key).0
    }

    /// Its key in the table (see [`tenant::key`]).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Every version, highest first.
    pub fn all(&self) -> &[Arc<Service>] {
        &self.versions
    }

    /// The version a request asking for none goes to when there is no
    /// split: the highest stable version, else the highest.
    pub fn default_version(&self) -> &Arc<Service> {
        &self.versions[self.default]
    }

    /// The name's traffic policy, as set (it may name versions that are
    /// gone).
    pub fn policy(&self) -> Option<&TrafficPolicy> {
        self.policy.as_deref()
    }

    /// `"plugin"` or `"remote"` (a name's versions are all of one kind).
    pub fn kind(&self) -> &'static str {
        self.versions[0].kind()
    }

    /// Version `version`, if present.
    pub fn version(&self, version: &Version) -> Option<&Arc<Service>> {
        self.versions
            .iter()
            .find(|service| service.version == *version)
    }

    /// The version `selection` picks for a request with `headers` (which
    /// a sticky split reads), if one meets it.
    pub fn select(&self, selection: &Selection, headers: &HeaderMap) -> Option<&Arc<Service>> {
        match selection {
            Selection::Default => Some(match &self.split {
                None => &self.versions[self.default],
                Some(split) => &self.versions[split.pick(headers)],
            }),
            Selection::Matching(requirement) => self
                .versions
                .iter()
                .find(|service| service.version.meets(requirement)),
        }
    }
}

/// One version of the table, in persistent maps: a writer's copy shares
/// all but the changed path with the snapshot readers hold, so a write
/// costs O(log n), not a full clone.
#[derive(Debug, Default)]
struct Snapshot {
    /// By [`tenant::key`]: a default-tenant name is its own key, so its
    /// lookup is one hash lookup as before tenants.
    entries: imbl::HashMap<String, Arc<Versions>>,
    /// Kept whether or not the name has versions now: a policy outlives
    /// its versions (a name may come back, a plugin may be reloaded).
    policies: imbl::HashMap<String, Arc<TrafficPolicy>>,
    /// Its names sorted, made by the first reader that asks and shared by
    /// every later one until the next write: a listing, a scrape or a
    /// health check round of a large table would otherwise sort it each
    /// time.
    sorted: OnceLock<Arc<[Arc<Versions>]>>,
}

impl Snapshot {
    /// A writer's starting point: the same maps (shared, not copied), and
    /// a sorted list to be made again.
    fn to_change(&self) -> Self {
        Self {
            entries: self.entries.clone(),
            policies: self.policies.clone(),
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

    /// The versions of the service whose key is `key` (for the default
    /// tenant, its name), if any.
    pub fn get(&self, key: &str) -> Option<Arc<Versions>> {
        self.current.load().entries.get(key).cloned()
    }

    /// The versions of `name` a request of `tenant` reaches: the tenant's
    /// own, else the shared (default tenant's) one; never another
    /// tenant's. For the default tenant, one lookup.
    pub fn resolve(&self, tenant: &str, name: &str) -> Option<Arc<Versions>> {
        if tenant::is_default(tenant) {
            return self.get(name);
        }
        let current = self.current.load();
        current
            .entries
            .get(tenant::key(tenant, name).as_ref())
            .or_else(|| current.entries.get(name))
            .cloned()
    }

    /// Every name's versions, in every tenant, sorted by name, then
    /// tenant.
    pub fn list(&self) -> Arc<[Arc<Versions>]> {
        let snapshot = self.current.load();
        snapshot
            .sorted
            .get_or_init(|| {
                let mut names: Vec<_> = snapshot.entries.values().cloned().collect();
                names.sort_by(|a, b| (a.name(), a.tenant()).cmp(&(b.name(), b.tenant())));
                names.into()
            })
            .clone()
    }

    /// Every version of every service, sorted by name, highest version
    /// first.
    pub fn services(&self) -> Vec<Arc<Service>> {
        self.list()
            .iter()
            .flat_map(|versions| versions.all().iter().cloned())
            .collect()
    }

    /// Replaces the versions under `key` (a name, or `<tenant>/<name>`:
    /// [`tenant::key`]) by what `change` makes of them (an empty list
    /// removes the name), unless it refuses. `change` sees the
    /// versions there are (none for a new name) under the writers' lock,
    /// so its check and the replacement are one atomic step. Returns the
    /// versions replaced. Listeners of [`Self::freed_names`] are told the
    /// key if a version it had is gone.
    pub fn update<E>(
        &self,
        key: &str,
        change: impl FnOnce(&[Arc<Service>]) -> Result<Vec<Arc<Service>>, E>,
    ) -> Result<Vec<Arc<Service>>, E> {
        let _guard = lock(&self.write);
        let current = self.current.load_full();
        let previous: Vec<Arc<Service>> = current
            .entries
            .get(key)
            .map(|entry| entry.versions.clone())
            .unwrap_or_default();
        let next_versions = change(&previous)?;
        debug_assert!(
            next_versions
                .iter()
                .all(|service| service.info.name == tenant::split_key(key).1),
            "a name's entry holds only that name's versions"
        );
        let freed = previous
            .iter()
            .any(|old| !next_versions.iter().any(|new| new.version == old.version));
        let mut next = current.to_change();
        match Versions::build(key, next_versions, current.policies.get(key).cloned()) {
            Some(entry) => next.entries.insert(key.to_owned(), Arc::new(entry)),
            None => next.entries.remove(key),
        };
        self.current.store(Arc::new(next));
        if freed {
            lock(&self.freed).retain(|listener| listener.send(key.to_owned()).is_ok());
        }
        Ok(previous)
    }

    /// Sets (or with `None` clears) the traffic policy of `name`, whether
    /// or not it has versions now.
    pub fn set_policy(&self, name: &str, policy: Option<TrafficPolicy>) {
        let _guard = lock(&self.write);
        let current = self.current.load_full();
        let mut next = current.to_change();
        let policy = policy.map(Arc::new);
        match &policy {
            Some(policy) => next.policies.insert(name.to_owned(), policy.clone()),
            None => next.policies.remove(name),
        };
        if let Some(entry) = current.entries.get(name)
            && let Some(rebuilt) = Versions::build(name, entry.versions.clone(), policy)
        {
            next.entries.insert(name.to_owned(), Arc::new(rebuilt));
        }
        self.current.store(Arc::new(next));
    }

    /// A channel that receives the key of every service that lost a
    /// version (or went) from now on, so that whoever waits for a name (a
    /// plugin file refused because the name or its version was taken) can
    /// try again.
    pub fn freed_names(&self) -> Receiver<String> {
        let (sender, receiver) = crossbeam_channel::unbounded();
        lock(&self.freed).push(sender);
        receiver
    }

    /// Removes the versions under `key` for which `should_remove` holds;
    /// returns them.
    pub fn remove_if(
        &self,
        key: &str,
        should_remove: impl Fn(&Service) -> bool,
    ) -> Vec<Arc<Service>> {
        let mut removed = Vec::new();
        let _ = self.update::<()>(key, |versions| {
            let (gone, kept) = versions
                .iter()
                .cloned()
                .partition::<Vec<_>, _>(|service| should_remove(service));
            removed = gone;
            Ok(kept)
        });
        removed
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::remote::RemoteSpec;

    fn version(text: &str) -> Arc<Service> {
        let version = Version::parse(text).unwrap();
        let info = ServiceInfo {
            name: "svc".to_owned(),
            display_name: "svc".to_owned(),
            description: String::new(),
            version: text.to_owned(),
            health_check_url: "/health".to_owned(),
            metadata: Default::default(),
            tags: Vec::new(),
            requires_auth: false,
            endpoints: Vec::new(),
        };
        let remote = RemoteService::new(
            RemoteSpec {
                info: Arc::new(info.clone()),
                base_path: "/".to_owned(),
                load_balancing: None,
            },
            Vec::new(),
            SystemTime::now(),
            None,
            Duration::from_secs(30),
        );
        Arc::new(Service::new(
            info,
            version,
            Backend::Remote(Arc::new(remote)),
        ))
    }

    fn listed(table: &ServiceTable) -> (Vec<String>, String) {
        let versions = table.get("svc").unwrap();
        (
            versions
                .all()
                .iter()
                .map(|s| s.version().to_string())
                .collect(),
            versions.default_version().version().to_string(),
        )
    }

    #[test]
    fn the_default_is_the_highest_stable_version() {
        let table = ServiceTable::new();
        let put = |text: &str| {
            let added = version(text);
            table
                .update::<()>("svc", |held| {
                    Ok(held.iter().cloned().chain([added]).collect())
                })
                .unwrap();
        };
        put("1.4.2");
        put("2.0.0-beta.1");
        put("1.10");
        assert_eq!(
            listed(&table),
            (
                vec!["2.0.0-beta.1".into(), "1.10.0".into(), "1.4.2".into()],
                "1.10.0".into()
            )
        );
        let only_pre = ServiceTable::new();
        only_pre
            .update::<()>("svc", |_| {
                Ok(vec![version("3.0.0-rc.1"), version("2.0.0-beta.1")])
            })
            .unwrap();
        assert_eq!(
            listed(&only_pre).1,
            "3.0.0-rc.1",
            "no stable one: the highest"
        );
    }

    #[test]
    fn selection_by_requirement_and_split_and_the_freed_name() {
        let table = ServiceTable::new();
        let freed = table.freed_names();
        table
            .update::<()>("svc", |_| Ok(vec![version("1.4.2"), version("2.0.0")]))
            .unwrap();
        let pick = |requirement: &str| {
            let versions = table.get("svc").unwrap();
            let selection = Selection::Matching(VersionReq::parse(requirement).unwrap());
            versions
                .select(&selection, &HeaderMap::new())
                .map(|s| s.version().to_string())
        };
        assert_eq!(pick("1").as_deref(), Some("1.4.2"));
        assert_eq!(pick("*").as_deref(), Some("2.0.0"));
        assert_eq!(pick("3"), None);
        let policy: TrafficPolicy =
            serde_json::from_str(r#"{"weights": {"1.4.2": 1, "9.9.9": 5}}"#).unwrap();
        table.set_policy("svc", Some(policy.clone()));
        let versions = table.get("svc").unwrap();
        assert_eq!(versions.policy(), Some(&policy));
        for _ in 0..50 {
            let picked = versions
                .select(&Selection::Default, &HeaderMap::new())
                .unwrap();
            assert_eq!(
                picked.version().to_string(),
                "1.4.2",
                "only present versions share"
            );
        }
        assert!(freed.try_recv().is_err());
        table.remove_if("svc", |s| s.version().to_string() == "2.0.0");
        assert_eq!(freed.try_recv().as_deref(), Ok("svc"));
        table.remove_if("svc", |_| true);
        assert!(table.get("svc").is_none());
        table
            .update::<()>("svc", |_| Ok(vec![version("1.4.2")]))
            .unwrap();
        assert_eq!(
            table.get("svc").unwrap().policy(),
            Some(&policy),
            "a policy outlives its versions"
        );
    }

    #[test]
    fn a_tenant_reaches_its_own_then_the_shared_never_anothers() {
        let table = ServiceTable::new();
        table
            .update::<()>("acme/svc", |_| Ok(vec![version("2.0.0")]))
            .unwrap();
        let reached = |tenant: &str| {
            table
                .resolve(tenant, "svc")
                .map(|versions| (versions.tenant().to_owned(), versions.key().to_owned()))
        };
        assert_eq!(reached("acme"), Some(("acme".into(), "acme/svc".into())));
        assert_eq!(reached("globex"), None, "never another tenant's");
        assert_eq!(reached(tenant::DEFAULT), None);
        table
            .update::<()>("svc", |_| Ok(vec![version("1.0.0")]))
            .unwrap();
        assert_eq!(reached("globex"), Some(("default".into(), "svc".into())));
        assert_eq!(reached("acme").unwrap().1, "acme/svc", "its own first");
        let listed: Vec<String> = table.list().iter().map(|v| v.key().to_owned()).collect();
        assert_eq!(listed, ["acme/svc", "svc"]);
    }
}
