//! The service registry: the HTTP API on the registry address, and the
//! remote services registered through it.
//!
//! It owns remote registrations: it checks them ([`model`]), makes them
//! durable ([`store`]) and then puts them in the [`ServiceTable`], where the
//! gateway finds them; [`liveness`] checks their health, and what has been
//! silent for the eviction grace period is removed here. Listing reads the table, so plugins and remote services are
//! listed alike.
//!
//! **Invariant:** a registration is answered 200/201 only once it is in the
//! database; the table never holds a remote service the database does not
//! (with etcd, shared by several hosts: no service etcd did not commit).
//! Names are unique across kinds: the table's writer lock decides a race
//! between a registration and a plugin file.

mod admin;
mod catalogue;
mod cluster;
#[cfg(feature = "etcd")]
mod etcd;
mod listing;
mod liveness;
mod model;
mod store;
mod tokens;
mod tombstones;
mod traffic;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

pub use cluster::{StoreKind, StoreSettings, check_etcd_prefix};
pub use liveness::{InvalidPolicy, Policy};
pub use tokens::{ListingAccess, RegistryAuthSettings, RegistryTokenSettings, TokenPolicy};

use tokens::{Unauthenticated, Writer};

use catalogue::Catalogue;
use liveness::Checker;
use tombstones::{Removal, Tombstone, Tombstones};

use crate::auth::{ApiKeySettings, Authenticator, ManagedKeys};
use crate::egress::{EgressPolicy, LoopGuard};
use crate::http::{ApiError, Escaped, read_body_within};
use crate::remote::{self, Instance, InstancePolicy, RemoteService, RemoteSpec};
use crate::service::{ServiceInfo, Version};
use crate::sync::lock;
use crate::table::{Backend, Service, ServiceTable, Versions};
use crate::tenant;
use model::{Invalid, Registration};
use store::{RecordError, RecordStore, StoreError, StoredInstance, StoredService, StoredVersion};

/// What the registry needs to start.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Where the records are kept: the database file, or etcd.
    pub store: StoreSettings,
    /// Heartbeats, health checks, eviction.
    pub policy: Policy,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Longest wait for a whole request body (408 past it).
    pub body_timeout: Duration,
    /// Most bytes of stored registrations, added up.
    pub max_stored_bytes: u64,
    /// Most instances one service may have.
    pub max_instances: usize,
    /// Most versions one service name may have.
    pub max_versions: usize,
    /// Health check thresholds, protect threshold and balancing, for the
    /// liveness task and the listing; swapped on reload.
    pub instances: Arc<ArcSwap<InstancePolicy>>,
    /// Which upstream addresses a registration may name.
    pub egress: Arc<EgressPolicy>,
    /// Marks the health checks, like every request the host sends.
    pub loop_guard: LoopGuard,
    /// Who may write and read (`[auth.registry]`); swapped on reload.
    pub tokens: Arc<ArcSwap<TokenPolicy>>,
    /// The gateway's credentials, which keys added here must not clash
    /// with.
    pub authenticator: Arc<ArcSwap<Authenticator>>,
    /// The API keys added through the admin endpoints: restored from the
    /// database at open, changed by those endpoints only.
    pub managed_keys: Arc<ManagedKeys>,
    /// The gateway's address, as bound: where the API catalogue sends
    /// clients.
    pub gateway_addr: SocketAddr,
    /// Whether a caller's `X-Tenant-ID` chooses its tenant when its token
    /// names none (`[tenants] trust_header`).
    pub trust_tenant_header: bool,
}

/// Why the registry could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The liveness options contradict each other.
    #[error(transparent)]
    Policy(#[from] InvalidPolicy),
    /// The database cannot be opened or read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The registry: cheap to clone, shared by its API handlers and its
/// liveness task.
#[derive(Debug, Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    services: Arc<ServiceTable>,
    store: Arc<dyn RecordStore>,
    /// The etcd backend itself, with `--store etcd`: what heartbeats are
    /// shared through, and whether reads are stale.
    #[cfg(feature = "etcd")]
    etcd: Option<Arc<etcd::EtcdStore>>,
    policy: Policy,
    max_body_bytes: usize,
    body_timeout: Duration,
    max_stored_bytes: u64,
    max_instances: usize,
    max_versions: usize,
    instances: Arc<ArcSwap<InstancePolicy>>,
    /// What the stored registrations take, and what the writes in flight
    /// reserved.
    storage: std::sync::Mutex<Storage>,
    egress: Arc<EgressPolicy>,
    loop_guard: LoopGuard,
    tokens: Arc<ArcSwap<TokenPolicy>>,
    authenticator: Arc<ArcSwap<Authenticator>>,
    managed_keys: Arc<ManagedKeys>,
    catalogue: Arc<Catalogue>,
    /// The listing as last built.
    listing: listing::Listing,
    gateway_addr: SocketAddr,
    trust_tenant_header: bool,
    /// Serializes the registrations, deregistrations and evictions of one
    /// name. Each is a look at the table, a durable write, then a change of
    /// the table; two of them interleaved could leave the database and the
    /// table telling different stories. Writes of different names run
    /// concurrently, so that their durable writes share a commit.
    /// Heartbeats do not take it.
    writes: NameLocks,
    /// Serializes the admin API's changes of API keys (each checks the
    /// new key against all the others).
    key_writes: tokio::sync::Mutex<()>,
    /// The instances removed within the last TTL, here or (with etcd) on
    /// any host.
    tombstones: Tombstones,
}

/// How many locks the names of [`NameLocks`] are spread over: well above
/// the writes a registry sees in flight at once, so two of them seldom
/// share one.
const NAME_LOCKS: usize = 256;

/// One lock per name, without a map of names: each name hashes to one of
/// a fixed set of locks. Two names sharing a lock only wait for each
/// other; one name always finds its own.
#[derive(Debug)]
struct NameLocks {
    locks: Box<[tokio::sync::Mutex<()>]>,
}

impl NameLocks {
    fn new() -> Self {
        Self {
            locks: (0..NAME_LOCKS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    /// Waits for the lock of `name`.
    async fn lock(&self, name: &str) -> tokio::sync::MutexGuard<'_, ()> {
        let index = xxhash_rust::xxh3::xxh3_64(name.as_bytes()) % self.locks.len() as u64;
        self.locks[index as usize].lock().await
    }
}

/// Which instances a deregistration removes.
#[derive(Debug, Clone, Copy)]
enum Deregistered<'a> {
    /// The one named, or those the caller speaks for ([`Registry::targets`]).
    Chosen(Option<&'a str>),
    /// Every instance: the admin removes the service, whoever registered it.
    Every,
}

impl Registry {
    /// Opens the store (the database, or etcd) and puts every stored
    /// registration in `services`; with etcd, follows it from then on.
    ///
    /// Call it before plugins are loaded: a restored remote service then
    /// holds its name, and a plugin file claiming the same name is refused
    /// (and logged) by the plugin manager, exactly as when the remote
    /// service registers while the plugin is absent. A registration
    /// accepted earlier is never lost to a plugin that happened to be in
    /// the directory at start-up.
    ///
    /// A damaged database refuses the start ([`StoreError::Damaged`]); a
    /// single record that cannot be read or fails its checksum is logged
    /// (ERROR, naming the service), left in the database and not routed.
    pub fn open(services: Arc<ServiceTable>, config: RegistryConfig) -> Result<Self, StartError> {
        config.policy.validate()?;
        let opened = cluster::open(&config.store, config.policy.ttl)?;
        let store = opened.store;
        let mut restored = 0;
        let mut storage = Storage::default();
        let mut unchecked = 0;
        for loaded in store.load()? {
            let name = loaded.name;
            let key = tenant::key(&loaded.tenant, &name).into_owned();
            unchecked += usize::from(!loaded.checksummed);
            let stored = match loaded.service {
                Ok(stored) if stored.is_filed_as(&name) => stored,
                Ok(_) => {
                    tracing::error!(service = %name, "stored registration is filed under another name; left in the store, not routed");
                    continue;
                }
                Err(RecordError::Checksum { stored, computed }) => {
                    tracing::error!(
                        service = %name,
                        store = %store.describe(),
                        stored_xxh3 = format_args!("{stored:016x}"),
                        computed_xxh3 = format_args!("{computed:016x}"),
                        "stored registration fails its checksum (edited or damaged); left in the store, not routed; register the service again to replace it"
                    );
                    continue;
                }
                Err(error) => {
                    tracing::error!(service = %name, %error, "stored registration cannot be read; left in the store, not routed");
                    continue;
                }
            };
            storage.set(&key, Some(stored_size(&stored)));
            let versions = match stored
                .versions
                .iter()
                .map(|version| restored_version(version, &config.egress, config.policy.ttl, None))
                .collect::<Result<Vec<_>, String>>()
            {
                Ok(versions) => versions,
                Err(error) => {
                    tracing::error!(service = %name, %error, "stored registration not restored; left in the store, not routed");
                    continue;
                }
            };
            let inserted = services.update(&key, |held| match held.first() {
                None => Ok(versions),
                Some(holder) => Err(holder.clone()),
            });
            match inserted {
                Ok(_) => restored += 1,
                Err(holder) => {
                    tracing::error!(service = %name, holder = holder.kind(), "stored registration not restored: the name is taken");
                }
            }
        }
        for (tenant, name, policy) in store.load_traffic()? {
            match policy {
                Ok(policy) => services.set_policy(&tenant::key(&tenant, &name), Some(policy)),
                Err(error) => {
                    tracing::error!(service = %name, %error, "stored traffic policy cannot be read; left in the store, not applied");
                }
            }
        }
        restore_api_keys(
            store.as_ref(),
            &config.managed_keys,
            &config.authenticator.load(),
        )?;
        // Records from before checksums get one at their next write.
        tracing::info!(
            restored,
            unchecked,
            store = %store.describe(),
            "remote services restored"
        );
        let catalogue = Arc::new(Catalogue::new(
            config.egress.clone(),
            config.loop_guard.clone(),
            config.instances.clone(),
            config.policy.check_timeout,
        ));
        let registry = Self {
            shared: Arc::new(Shared {
                services,
                store,
                #[cfg(feature = "etcd")]
                etcd: opened.etcd,
                policy: config.policy,
                max_body_bytes: config.max_body_bytes,
                body_timeout: config.body_timeout,
                max_stored_bytes: config.max_stored_bytes,
                max_instances: config.max_instances,
                max_versions: config.max_versions,
                instances: config.instances,
                storage: std::sync::Mutex::new(storage),
                egress: config.egress,
                loop_guard: config.loop_guard,
                tokens: config.tokens,
                authenticator: config.authenticator,
                managed_keys: config.managed_keys,
                catalogue,
                listing: listing::Listing::default(),
                gateway_addr: config.gateway_addr,
                trust_tenant_header: config.trust_tenant_header,
                writes: NameLocks::new(),
                key_writes: tokio::sync::Mutex::new(()),
                tombstones: Tombstones::new(config.policy.ttl),
            }),
        };
        #[cfg(feature = "etcd")]
        if let Some(etcd) = &registry.shared.etcd {
            registry.follow(etcd.clone());
        }
        Ok(registry)
    }

    /// The versions under `key` (a name in a tenant, [`tenant::key`]), as
    /// the registry writes them: none for a free name, the holder's 409
    /// for a name plugins hold (kinds do not mix under one name).
    fn remote_versions(&self, key: &str) -> Result<Vec<Arc<Service>>, ApiError> {
        match self.shared.services.get(key) {
            None => Ok(Vec::new()),
            Some(versions) => match versions.default_version().backend {
                Backend::Plugin(_) => Err(name_taken(
                    versions.default_version(),
                    tenant::split_key(key).0,
                )),
                Backend::Remote(_) => Ok(versions.all().to_vec()),
            },
        }
    }

    /// Version `service` of a remote service with `members` as its
    /// instances (carried over with their state), everything else as it
    /// was.
    fn with_members(&self, service: &Service, members: Vec<Arc<Instance>>) -> Arc<Service> {
        let remote = remote_of(service).expect("a remote version");
        Arc::new(Service::new(
            service.info.clone(),
            service.version().clone(),
            Backend::Remote(Arc::new(RemoteService::new(
                remote.spec().clone(),
                members,
                remote.registered_at(),
                remote.owner_token().map(str::to_owned),
                self.shared.policy.ttl,
            ))),
        ))
    }

    /// Starts the health checks and evictions; abort the handle to stop
    /// them.
    pub fn spawn_liveness(&self) -> JoinHandle<()> {
        let registry = self.clone();
        let checker = Checker::new(
            self.shared.policy,
            self.shared.egress.clone(),
            self.shared.loop_guard.clone(),
        );
        // Restored registrations publish their documents again.
        for remote in self.remotes() {
            self.shared.catalogue.fetch(remote);
        }
        tokio::spawn(async move {
            let mut ticks = checker.ticks();
            loop {
                ticks.tick().await;
                let policy = registry.shared.instances.load_full();
                let checked = registry.checked_here();
                for silent in checker.round(checked.clone(), &policy).await {
                    registry.evict(&silent).await;
                }
                #[cfg(feature = "etcd")]
                registry.share_checks(&checked).await;
                checker
                    .check_plugins(&registry.shared.services.services())
                    .await;
            }
        })
    }

    /// A request's whole body, within the registry's size and time limits.
    async fn read_body(&self, body: Body, headers: &HeaderMap) -> Result<bytes::Bytes, ApiError> {
        read_body_within(
            body,
            headers,
            self.shared.max_body_bytes,
            self.shared.body_timeout,
        )
        .await
        .map_err(|error| error.with("field", "body"))
    }

    /// Who the request's registry token says is writing (401 for a
    /// missing or unknown token when tokens are configured).
    fn writer(&self, headers: &HeaderMap) -> Result<Writer, ApiError> {
        self.shared
            .tokens
            .load()
            .writer(headers)
            .map_err(unauthenticated)
    }

    /// The tenant a write of `writer` acts in: its token's, else (when
    /// `[tenants] trust_header` is on, or for the admin token) the
    /// request's `X-Tenant-ID`, else the default tenant. A token's tenant
    /// and a different header are a 403 naming both; a header that is no
    /// tenant id, a 400.
    fn tenant(&self, writer: &Writer, headers: &HeaderMap) -> Result<String, ApiError> {
        let named = match writer {
            Writer::Token(token) => token.tenant(),
            Writer::Anyone | Writer::Admin => None,
        };
        let trusted = self.shared.trust_tenant_header || matches!(writer, Writer::Admin);
        let claimed = match headers.get(tenant::X_TENANT_ID) {
            Some(value) if trusted => {
                let text = value.to_str().unwrap_or_default();
                tenant::check(text).map_err(|reason| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("X-Tenant-ID refused: {reason}"),
                    )
                    .with("field", "X-Tenant-ID")
                })?;
                Some(text)
            }
            _ => None,
        };
        match (named, claimed) {
            (Some(named), Some(claimed)) if named != claimed => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "the registry token belongs to tenant `{named}`, but X-Tenant-ID names `{claimed}`"
                ),
            )
            .with("tenant", named)
            .with("x_tenant_id", claimed)),
            (Some(tenant), _) | (None, Some(tenant)) => Ok(tenant.to_owned()),
            (None, None) => Ok(tenant::DEFAULT.to_owned()),
        }
    }

    /// Which tenants' services a listing request sees: `None` for the
    /// admin token (every tenant), else the caller's tenant (besides the
    /// shared ones), as [`Self::tenant`] decides it for a writer. A
    /// listing open to anyone is read as the default tenant unless the
    /// header is trusted.
    fn reading_tenant(&self, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
        let tokens = self.shared.tokens.load();
        let writer = if tokens.is_open() || !headers.contains_key(header::AUTHORIZATION) {
            Writer::Anyone
        } else {
            tokens.writer(headers).map_err(unauthenticated)?
        };
        drop(tokens);
        match writer {
            Writer::Admin => Ok(None),
            writer => self.tenant(&writer, headers).map(Some),
        }
    }

    /// Whether the request carries the admin token.
    fn admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        self.shared
            .tokens
            .load()
            .admin(headers)
            .map_err(unauthenticated)
    }

    /// Whether the request may read the listing (and what shares its
    /// rule: the metrics, the plugin files' status); the refusal is the
    /// listing's 401/403.
    pub fn reader(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        self.shared
            .tokens
            .load()
            .reader(headers)
            .map_err(unauthenticated)
    }

    /// The remote services in the table now.
    fn remotes(&self) -> Vec<Arc<RemoteService>> {
        self.shared
            .services
            .services()
            .iter()
            .filter_map(|service| match &service.backend {
                Backend::Remote(remote) => Some(remote.clone()),
                Backend::Plugin(_) => None,
            })
            .collect()
    }

    async fn register(
        &self,
        registration: Registration,
        caller: IpAddr,
        writer: Writer,
        tenant: String,
    ) -> Result<Response, ApiError> {
        let Registration { spec, instance } = registration;
        let name = spec.info.name.clone();
        let key = tenant::key(&tenant, &name).into_owned();
        let version = Version::parse(&spec.info.version).map_err(|error| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("version: {error}"),
            )
            .with("field", "version")
        })?;
        let id = instance.to_string();
        let writes = self.shared.writes.lock(&key).await;
        let current = self.remote_versions(&key)?;
        let first = current.first().and_then(|service| remote_of(service));
        may_write(&writer, &name, first, "name")?;
        let owner_token = match &writer {
            Writer::Anyone => None,
            Writer::Token(token) => Some(token.id().to_owned()),
            // The admin token manages a name; it does not take it from
            // the token that owns it.
            Writer::Admin => first.and_then(|first| first.owner_token().map(str::to_owned)),
        };
        let here = current.iter().find(|held| *held.version() == version);
        // The same `host:port` under another version: a rolling restart
        // in place, which moves it to this version.
        let moving = current
            .iter()
            .filter(|held| *held.version() != version)
            .find_map(|held| {
                let member = remote_of(held)?.instances().get(&id)?.clone();
                Some((held.clone(), member))
            });
        let anyone = matches!(writer, Writer::Anyone);
        if let Some((_, member)) = &moving
            && anyone
            && !member.is_owned_by(caller)
        {
            return Err(not_the_owner(
                &name,
                member,
                caller,
                StatusCode::CONFLICT,
                "name",
            ));
        }
        let (kept, mut change) = match here.and_then(|held| remote_of(held)) {
            Some(remote) => self.join(remote, &spec, &id, caller, &writer)?,
            None if current.is_empty() => (Vec::new(), Change::Registered),
            None => {
                let from = moving.as_ref().map(|(from, _)| from);
                self.may_add_version(&name, &current, &version, from, caller, anyone)?;
                (Vec::new(), Change::VersionAdded)
            }
        };
        if moving.is_some() {
            change = Change::Moved;
        }
        let registered_at = here
            .and_then(|held| remote_of(held))
            .map_or_else(SystemTime::now, |held| held.registered_at());
        // A refreshed instance keeps its state (it is the same `Arc`),
        // unless it was stored without an owner: the caller claims it.
        let refreshed = kept
            .iter()
            .find(|member| member.id() == id && member.owner().is_some())
            .cloned();
        let mut members: Vec<Arc<Instance>> = kept
            .into_iter()
            .filter(|member| member.id() != id)
            .collect();
        let joining = match &refreshed {
            Some(existing) => existing.clone(),
            None => Arc::new(
                Instance::new(instance.clone(), Some(caller), SystemTime::now()).map_err(
                    |error| {
                        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("host: {error}"))
                            .with("field", "host")
                    },
                )?,
            ),
        };
        members.push(joining.clone());
        if members.len() > self.shared.max_instances {
            let limit = self.shared.max_instances;
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "service `{name}` has {} instances, its limit (`registry.max_instances_per_service`, --max-instances-per-service); deregister one first",
                    limit
                ),
            )
            .with("field", "host")
            .with("service", name)
            .with("limit", "max_instances_per_service")
            .with("max_instances_per_service", limit));
        }
        let instances = members.len();
        let added = Arc::new(Service::new(
            spec.info.clone(),
            version.clone(),
            Backend::Remote(Arc::new(RemoteService::new(
                spec.clone(),
                members,
                registered_at,
                owner_token,
                self.shared.policy.ttl,
            ))),
        ));
        let mut next = Vec::with_capacity(current.len() + 1);
        for held in &current {
            if *held.version() == version {
                continue;
            }
            match &moving {
                Some((from, member)) if Arc::ptr_eq(from, held) => {
                    let rest: Vec<Arc<Instance>> = remote_of(held)
                        .map(|remote| remote.instances().members())
                        .unwrap_or_default()
                        .iter()
                        .filter(|other| !Arc::ptr_eq(other, member))
                        .cloned()
                        .collect();
                    if !rest.is_empty() {
                        next.push(self.with_members(held, rest));
                    }
                }
                _ => next.push(held.clone()),
            }
        }
        next.push(added);
        self.commit(&key, &current, next).await?;
        joining.refresh();
        drop(writes);
        // Outside the write lock: the next registration need not wait for
        // this instance's first heartbeat to be shared.
        #[cfg(feature = "etcd")]
        self.share_beats(&key, &[id.as_str()], true).await;
        tracing::info!(
            service = %name,
            tenant = %tenant,
            instance = %id,
            instances,
            version = %version,
            change = change.word(),
            "remote service registered"
        );
        let policy = self.shared.policy;
        let status = match change {
            Change::Updated => StatusCode::OK,
            _ => StatusCode::CREATED,
        };
        let answer = json!({
            "service_id": name,
            "tenant": tenant,
            "status": change.word(),
            "instance_id": id,
            "version": version.to_string(),
            "instances": instances,
            "heartbeat_interval_seconds": seconds(policy.heartbeat_interval),
            "ttl_seconds": seconds(policy.ttl),
            "message": format!(
                "service `{name}` {}; send POST /api/registry/heartbeat {{\"service_id\": \"{name}\", \"instance_id\": \"{id}\"}} every {}",
                change.word(),
                humantime::format_duration(policy.heartbeat_interval)
            ),
        });
        Ok((status, axum::Json(answer)).into_response())
    }

    /// Whether a caller may add `version` to `name`, which has the
    /// versions `current` and not that one. Without registry tokens, only
    /// from an address that owns an instance of the name (or moves one of
    /// its own): a higher version would take the name's default traffic,
    /// so a stranger must not add one. With tokens, [`may_write`] already
    /// held the name to its token. And at most `max_versions` versions
    /// after the change. `moving_from`: the version the caller's instance
    /// leaves for this one (which goes if it was its last instance).
    fn may_add_version(
        &self,
        name: &str,
        current: &[Arc<Service>],
        version: &Version,
        moving_from: Option<&Arc<Service>>,
        caller: IpAddr,
        anyone: bool,
    ) -> Result<(), ApiError> {
        let moving = moving_from.is_some();
        let emptied = moving_from
            .and_then(|from| remote_of(from))
            .is_some_and(|remote| remote.instances().members().len() == 1);
        let remotes = || current.iter().filter_map(|held| remote_of(held));
        if anyone && !moving && remotes().all(|remote| remote.owned_by(caller).is_empty()) {
            let owners: Vec<String> = remotes()
                .flat_map(|remote| remote.instances().members().iter())
                .filter_map(|member| member.owner())
                .map(|owner| owner.to_string())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "service `{name}` has no version {version}, and only an address that owns one of its instances ({}) may add a version: a new version may take the name's default traffic; {caller} owns none",
                    owners.join(", ")
                ),
            )
            .with("field", "version")
            .with("service", name)
            .with("version", version.to_string()));
        }
        let limit = self.shared.max_versions;
        if current.len() + 1 - usize::from(emptied) > limit {
            let present: Vec<String> = current
                .iter()
                .map(|held| held.version().to_string())
                .collect();
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "service `{name}` has {} versions ({}), its limit (`registry.max_versions_per_service`, --max-versions-per-service); deregister the instances of one first",
                    current.len(),
                    present.join(", ")
                ),
            )
            .with("field", "version")
            .with("service", name)
            .with("limit", "max_versions_per_service")
            .with("max_versions_per_service", limit));
        }
        Ok(())
    }

    /// What a registration of instance `id` with `spec` does to `remote`
    /// (the version it declares), and the instances that version keeps
    /// (the caller's one included if it is already there): refused when
    /// the caller may not.
    ///
    /// Without registry tokens, any address may add an instance, but only
    /// the address that registered an instance may register it again, and
    /// a caller that owns no instance of the version must declare exactly
    /// what it declares (it joins, it does not redefine).
    fn join(
        &self,
        remote: &RemoteService,
        spec: &RemoteSpec,
        id: &str,
        caller: IpAddr,
        writer: &Writer,
    ) -> Result<(Vec<Arc<Instance>>, Change), ApiError> {
        let name = remote.name();
        let anyone = matches!(writer, Writer::Anyone);
        let existing = remote.instances().get(id);
        if anyone {
            if let Some(existing) = existing
                && !existing.is_owned_by(caller)
            {
                return Err(not_the_owner(
                    name,
                    existing,
                    caller,
                    StatusCode::CONFLICT,
                    "name",
                ));
            }
            if remote.spec() != spec && remote.owned_by(caller).is_empty() {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "service `{name}` is declared differently by its instances (endpoints, base_path, description...): an instance joining it from {caller}, which owns none of them, must declare exactly the same"
                    ),
                )
                .with("field", "name")
                .with("service", name));
            }
        }
        let change = if existing.is_some() {
            Change::Updated
        } else {
            Change::Added
        };
        Ok((remote.instances().members().to_vec(), change))
    }

    /// Makes `next` the versions under `key` (a name in a tenant:
    /// [`tenant::key`]; none: the name goes), durably, then routes them;
    /// `current` is what the table holds now. A name
    /// that was free may have been taken by a plugin file meanwhile (the
    /// table decides; the write is undone then). Called under the name's lock.
    async fn commit(
        &self,
        key: &str,
        current: &[Arc<Service>],
        next: Vec<Arc<Service>>,
    ) -> Result<(), ApiError> {
        let (tenant, name) = tenant::split_key(key);
        let (owned_tenant, owned) = (tenant.to_owned(), name.to_owned());
        if next.is_empty() {
            self.durably(name, move |store| store.delete(&owned_tenant, &owned))
                .await?;
            self.record_storage(key, None);
        } else {
            let stored = stored_record(&next);
            let size = stored_size(&stored);
            self.reserve_storage(key, size)?;
            let written = self
                .durably(name, move |store| store.put(&owned_tenant, &stored))
                .await;
            lock(&self.shared.storage).settle(key, size, written.is_ok());
            written?;
        }
        let fresh: Vec<Arc<RemoteService>> = next
            .iter()
            .filter(|service| !current.iter().any(|held| Arc::ptr_eq(held, service)))
            .filter_map(|service| remote_of(service).cloned())
            .collect();
        let updated = self.shared.services.update(key, |held| {
            match held.iter().find(|service| remote_of(service).is_none()) {
                Some(plugin) => Err(plugin.clone()),
                None => Ok(next),
            }
        });
        if let Err(holder) = updated {
            // A plugin file took the name since the look above (the table
            // decides races); only a new name can lose one, so undo the
            // write.
            debug_assert!(current.is_empty(), "only a new name can lose a race");
            let undo = self.durably(name, {
                let (tenant, name) = (tenant.to_owned(), name.to_owned());
                move |store| store.delete(&tenant, &name)
            });
            match undo.await {
                Ok(()) => self.record_storage(key, None),
                Err(error) => {
                    tracing::error!(service = %name, error = ?error, "could not undo a registration that lost its name to a plugin; it will be restored at the next start");
                }
            }
            return Err(name_taken(&holder, tenant));
        }
        for remote in fresh {
            self.shared.catalogue.fetch(remote);
        }
        Ok(())
    }

    /// The instances of `name` (whose versions are `versions`) a
    /// heartbeat or deregistration from `caller` speaks for, in every
    /// version: `instance_id` if given (404 if unknown, 403 if the caller
    /// does not own it), else the caller's instances (403 if it has none)
    /// or, for the owning token or the admin token, all of them when none
    /// is the caller's.
    fn targets(
        &self,
        name: &str,
        versions: &[Arc<Service>],
        instance_id: Option<&str>,
        caller: IpAddr,
        writer: &Writer,
        name_field: &str,
    ) -> Result<Vec<Arc<Instance>>, ApiError> {
        let first = versions.first().and_then(|service| remote_of(service));
        may_write(writer, name, first, name_field)?;
        let anyone = matches!(writer, Writer::Anyone);
        let all: Vec<&Arc<Instance>> = versions
            .iter()
            .filter_map(|service| remote_of(service))
            .flat_map(|remote| remote.instances().members().iter())
            .collect();
        if let Some(id) = instance_id {
            let Some(instance) = all.iter().find(|member| member.id() == id) else {
                let known: Vec<&str> = all.iter().map(|member| member.id()).collect();
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!(
                        "service `{name}` has no instance `{id}`; its instances are {}",
                        known.join(", ")
                    ),
                )
                .with("field", "instance_id")
                .with("service", name));
            };
            if anyone && !instance.is_owned_by(caller) {
                return Err(not_the_owner(
                    name,
                    instance,
                    caller,
                    StatusCode::FORBIDDEN,
                    "instance_id",
                ));
            }
            return Ok(vec![(*instance).clone()]);
        }
        let owned: Vec<Arc<Instance>> = all
            .iter()
            .filter(|member| member.is_owned_by(caller))
            .map(|member| (*member).clone())
            .collect();
        if !owned.is_empty() {
            return Ok(owned);
        }
        if anyone && let Some(first) = all.first() {
            return Err(not_the_owner(
                name,
                first,
                caller,
                StatusCode::FORBIDDEN,
                name_field,
            ));
        }
        Ok(all.into_iter().cloned().collect())
    }

    /// Refuses a registration of `size` bytes under `name` (replacing what
    /// `name` held) that would take the registry past its size limit, with
    /// what the other writes in flight reserved; else reserves `size` until
    /// its write is settled ([`Storage::settle`]). Called under the name's
    /// lock, before the durable write.
    fn reserve_storage(&self, name: &str, size: u64) -> Result<(), ApiError> {
        let mut storage = lock(&self.shared.storage);
        let total =
            storage.total - storage.by_name.get(name).copied().unwrap_or(0) + storage.reserved;
        let limit = self.shared.max_stored_bytes;
        if total.saturating_add(size) > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the registry holds {total} bytes of registrations, and this one ({size} bytes) would take it past its limit of {limit} bytes"
                ),
            )
            .with("limit_bytes", limit)
            .with("service", name));
        }
        storage.reserved += size;
        Ok(())
    }

    /// Records what `name` now takes in the store (`None`: nothing).
    fn record_storage(&self, name: &str, size: Option<u64>) {
        lock(&self.shared.storage).set(name, size);
    }

    async fn deregister(
        &self,
        (tenant, name): (&str, &str),
        which: Deregistered<'_>,
        caller: IpAddr,
        writer: Writer,
    ) -> Result<Response, ApiError> {
        let key = tenant::key(tenant, name);
        let _writes = self.shared.writes.lock(&key).await;
        let versions = match self.shared.services.get(&key) {
            None => return Err(not_registered(name, "name")),
            Some(versions) => match &versions.default_version().backend {
                Backend::Remote(_) => versions.all().to_vec(),
                Backend::Plugin(plugin) => {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        format!(
                            "`{name}` is a plugin loaded from {}: remove that file from the plugins directory to unload it",
                            plugin.loaded_from
                        ),
                    )
                    .with("field", "name")
                    .with("service", name));
                }
            },
        };
        let targets = match which {
            Deregistered::Chosen(instance_id) => {
                self.targets(name, &versions, instance_id, caller, &writer, "name")?
            }
            Deregistered::Every => versions
                .iter()
                .filter_map(|service| remote_of(service))
                .flat_map(|remote| remote.instances().members().iter().cloned())
                .collect(),
        };
        let ids: Vec<String> = targets.iter().map(|t| t.id().to_owned()).collect();
        let remaining = self
            .remove_instances(&key, &versions, &targets, Removal::Deregistered)
            .await?;
        tracing::info!(service = %name, instances = %ids.join(","), remaining, "remote service instances deregistered");
        Ok(axum::Json(json!({
            "service_id": name,
            "status": "deregistered",
            "instance_ids": ids,
            "remaining_instances": remaining,
        }))
        .into_response())
    }

    /// Removes `targets` from the versions under `key` (`current`) durably
    /// for `reason`, and leaves their tombstones; a version goes with its
    /// last instance, the name with its last version. Returns how many
    /// instances remain. Called under the name's lock, so that a
    /// registration bringing an instance back is written after its
    /// tombstone.
    async fn remove_instances(
        &self,
        key: &str,
        current: &[Arc<Service>],
        targets: &[Arc<Instance>],
        reason: Removal,
    ) -> Result<usize, ApiError> {
        let mut next = Vec::with_capacity(current.len());
        let mut remaining = 0;
        for held in current {
            let Some(remote) = remote_of(held) else {
                continue;
            };
            let members = remote.instances().members();
            let kept: Vec<Arc<Instance>> = members
                .iter()
                .filter(|member| !targets.iter().any(|target| Arc::ptr_eq(target, member)))
                .cloned()
                .collect();
            remaining += kept.len();
            if kept.len() == members.len() {
                next.push(held.clone());
            } else if !kept.is_empty() {
                next.push(self.with_members(held, kept));
            }
        }
        self.commit(key, current, next).await?;
        let ids: Vec<String> = targets
            .iter()
            .map(|target| target.id().to_owned())
            .collect();
        let tombstone = Tombstone::now(reason);
        self.shared.tombstones.bury(key, &ids, tombstone);
        #[cfg(feature = "etcd")]
        self.share_tombstones(key, &ids, &tombstone).await;
        Ok(remaining)
    }

    /// Removes the instances of `remote` silent past the grace period, if
    /// it is still a version registered (a heartbeat or a new registration
    /// may have come while the liveness task was deciding); the version
    /// goes with its last instance, the service with its last version.
    async fn evict(&self, remote: &Arc<RemoteService>) {
        let name = remote.name().to_owned();
        let held = |versions: &Arc<Versions>| {
            versions.name() == name && versions.all().iter().any(|service| holds(service, remote))
        };
        // Whichever tenant holds it; evictions are rare, a scan is cheap.
        let Some(found) = self
            .shared
            .services
            .list()
            .iter()
            .find(|v| held(v))
            .cloned()
        else {
            return;
        };
        let _writes = self.shared.writes.lock(found.key()).await;
        // Looked at again under the lock: a registration or a
        // deregistration may have come meanwhile.
        let Some(versions) = self.shared.services.get(found.key()).filter(held) else {
            return;
        };
        let silent = remote.silent_instances(self.shared.policy.evict_after);
        if silent.is_empty() {
            return;
        }
        // A failed write is logged; the next round tries again.
        let Ok(remaining) = self
            .remove_instances(versions.key(), versions.all(), &silent, Removal::Evicted)
            .await
        else {
            return;
        };
        let ids: Vec<&str> = silent.iter().map(|instance| instance.id()).collect();
        let ids = ids.join(",");
        let evict_after_s = self.shared.policy.evict_after.as_secs();
        if remaining == 0 {
            tracing::warn!(
                service = %name,
                instances = %ids,
                evict_after_s,
                "remote service evicted: no heartbeat or passing health check for the eviction grace period"
            );
        } else {
            tracing::warn!(
                service = %name,
                instances = %ids,
                remaining,
                evict_after_s,
                "remote service instances evicted: no heartbeat or passing health check for the eviction grace period"
            );
        }
    }

    /// Runs a store operation on the blocking pool; a failure is logged
    /// and answered (the client did nothing wrong, and nothing changed):
    /// 503 while the store is unreachable, 409 when another host changed
    /// the record first, 500 otherwise.
    async fn durably<T: Send + 'static>(
        &self,
        service: &str,
        operation: impl FnOnce(&dyn RecordStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let store = self.shared.store.clone();
        let (status, error) =
            match tokio::task::spawn_blocking(move || operation(store.as_ref())).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(error @ StoreError::Unreachable { .. })) => {
                    (StatusCode::SERVICE_UNAVAILABLE, error.to_string())
                }
                Ok(Err(error @ StoreError::Conflict { .. })) => {
                    (StatusCode::CONFLICT, error.to_string())
                }
                Ok(Err(error)) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
                Err(join) => (StatusCode::INTERNAL_SERVER_ERROR, join.to_string()),
            };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(service, %error, "registry store write failed");
        } else {
            tracing::warn!(service, %error, "registry store write refused");
        }
        Err(ApiError::new(
            status,
            format!("the registry could not store the change, so nothing changed: {error}"),
        )
        .with("service", service)
        .with("store", self.shared.store.describe()))
    }
}

/// Puts the API keys added through the admin endpoints back, as they were
/// before the restart. One that clashes with the config file now (same id
/// or same key) is logged and left in the database, not used: the file
/// wins, and revoking the stored key removes it.
fn restore_api_keys(
    store: &dyn RecordStore,
    managed: &ManagedKeys,
    authenticator: &Authenticator,
) -> Result<(), StoreError> {
    for (id, stored) in store.load_api_keys()? {
        let restored = match stored {
            Ok(stored) => managed
                .insert(
                    ApiKeySettings {
                        id: stored.id,
                        sha256: stored.sha256,
                        services: stored.services,
                        tenant: stored.tenant,
                    },
                    authenticator,
                )
                .map_err(|refused| refused.to_string()),
            Err(error) => Err(error.to_string()),
        };
        if let Err(error) = restored {
            tracing::error!(api_key = %id, %error, "stored API key not restored; left in the database");
        }
    }
    Ok(())
}

/// The size of every stored registration, and their sum.
#[derive(Debug, Default)]
struct Storage {
    by_name: HashMap<String, u64>,
    total: u64,
    /// What the writes in flight may add (their whole size: the record
    /// each replaces is still counted in `total` until it is settled).
    reserved: u64,
}

impl Storage {
    /// Ends the reservation of `size` bytes for `name`'s write, which
    /// now holds them if it was `stored`.
    fn settle(&mut self, name: &str, size: u64, stored: bool) {
        self.reserved -= size;
        if stored {
            self.set(name, Some(size));
        }
    }

    fn set(&mut self, name: &str, size: Option<u64>) {
        let previous = match size {
            Some(size) => {
                self.total += size;
                self.by_name.insert(name.to_owned(), size)
            }
            None => self.by_name.remove(name),
        };
        self.total -= previous.unwrap_or(0);
    }
}

/// How much a registration counts against the registry's size limit: its
/// stored JSON.
fn stored_size(stored: &StoredService) -> u64 {
    serde_json::to_vec(stored).map_or(u64::MAX, |encoded| encoded.len() as u64)
}

/// The remote service behind a version, if it is one.
fn remote_of(service: &Service) -> Option<&Arc<RemoteService>> {
    match &service.backend {
        Backend::Remote(remote) => Some(remote),
        Backend::Plugin(_) => None,
    }
}

/// A stored version back as a version in the table, or why not: its
/// version must read as one (records of the releases before versions hold
/// any text), its address literals must be where the host may connect
/// (names are resolved again at every connection; the listeners or the
/// allow-list may have changed since it was accepted). An instance
/// `previous` (the version it replaces) already has keeps its state: a
/// record another host changed does not reset the liveness of the
/// instances it did not touch.
fn restored_version(
    stored: &StoredVersion,
    egress: &EgressPolicy,
    ttl: Duration,
    previous: Option<&RemoteService>,
) -> Result<Arc<Service>, String> {
    let version =
        Version::parse(&stored.spec.info.version).map_err(|error| format!("version: {error}"))?;
    if let Some(refused) = stored.instances.iter().find_map(|instance| {
        let ip = instance.addr.host.parse().ok()?;
        egress.check(SocketAddr::new(ip, instance.addr.port)).err()
    }) {
        return Err(format!(
            "it points where the host may not connect: {refused}"
        ));
    }
    let registered_at = from_unix_ms(stored.registered_at_unix_ms);
    let instances = stored
        .instances
        .iter()
        .map(|instance| {
            let id = instance.addr.to_string();
            if let Some(kept) = previous.and_then(|previous| previous.instances().get(&id)) {
                return Ok(kept.clone());
            }
            Instance::new(
                instance.addr.clone(),
                stored.owner_of(instance),
                instance
                    .registered_at_unix_ms
                    .map_or(registered_at, from_unix_ms),
            )
            .map(Arc::new)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("invalid address: {error}"))?;
    let mut spec = stored.spec.clone();
    Arc::make_mut(&mut spec.info).version = version.to_string();
    let remote = RemoteService::new(
        spec.clone(),
        instances,
        registered_at,
        stored.owner_token.clone(),
        ttl,
    );
    Ok(Arc::new(Service::new(
        spec.info,
        version,
        Backend::Remote(Arc::new(remote)),
    )))
}

/// Whether `service` is `remote` (and not a successor with the same name).
fn holds(service: &Service, remote: &Arc<RemoteService>) -> bool {
    matches!(&service.backend, Backend::Remote(held) if Arc::ptr_eq(held, remote))
}

/// The 409 for a name in `tenant` that `holder` holds; the tenant is named
/// in the message when it is not the default one (and, like every
/// refusal of a write, in the `tenant` field: [`in_tenant`]).
fn name_taken(holder: &Service, tenant: &str) -> ApiError {
    let name = &holder.info.name;
    let in_tenant = if tenant::is_default(tenant) {
        String::new()
    } else {
        format!(" in tenant `{tenant}`")
    };
    let (who, detail) = match &holder.backend {
        Backend::Plugin(plugin) => (
            format!("the plugin loaded from {}", plugin.loaded_from),
            json!({"kind": "plugin", "loaded_from": plugin.loaded_from}),
        ),
        Backend::Remote(_) => ("a remote service".to_owned(), json!({"kind": "remote"})),
    };
    ApiError::new(
        StatusCode::CONFLICT,
        format!("service name `{name}`{in_tenant} is held by {who}; register under another name"),
    )
    .with("field", "name")
    .with("service", name)
    .with("holder", detail)
}

/// `error`, naming the tenant a refused registry write was in: its
/// `tenant` field, on every refusal once the tenant is known (default
/// tenant included, as the registration's answer names it), so a 409 for
/// a name held by another owner says which tenant's name it is.
fn in_tenant(tenant: &str) -> impl Fn(ApiError) -> ApiError + '_ {
    move |error| error.with("tenant", tenant)
}

/// A change of `instance` of service `name` asked for by a client that is
/// not the address that registered it.
fn not_the_owner(
    name: &str,
    instance: &Instance,
    caller: IpAddr,
    status: StatusCode,
    field: &str,
) -> ApiError {
    let owner = instance
        .owner()
        .map_or_else(|| "another address".to_owned(), |owner| owner.to_string());
    ApiError::new(
        status,
        format!(
            "instance {} of service `{name}` was registered from {owner}: only that address may change, heartbeat or deregister it, and {caller} is not it",
            instance.id()
        ),
    )
    .with("field", field)
    .with("service", name)
    .with("instance_id", instance.id())
}

/// Whether `writer`'s token may write `name`, held now by `remote` (or by
/// nothing): a token may only write the names its patterns cover, and a
/// name registered with a token belongs to that token (403 otherwise). A
/// name registered before tokens were configured may be claimed by any
/// token covering it. Without tokens, ownership is per instance, by
/// address (see [`Registry::join`] and [`Registry::targets`]).
fn may_write(
    writer: &Writer,
    name: &str,
    remote: Option<&Arc<RemoteService>>,
    field: &str,
) -> Result<(), ApiError> {
    let forbidden = |reason: String| {
        ApiError::new(StatusCode::FORBIDDEN, reason)
            .with("field", field)
            .with("service", name)
    };
    match writer {
        Writer::Admin | Writer::Anyone => Ok(()),
        Writer::Token(token) if !token.covers(name) => Err(forbidden(format!(
            "registry token `{}` may not write `{name}`: it covers {}",
            token.id(),
            token.patterns().join(", ")
        ))),
        Writer::Token(token) => match remote.and_then(|remote| remote.owner_token()) {
            Some(owner) if owner != token.id() => Err(forbidden(format!(
                "service `{name}` belongs to registry token `{owner}`: only it (or the admin token) may change it or its instances, and `{}` is not it",
                token.id()
            ))),
            _ => Ok(()),
        },
    }
}

/// The answer to a request whose registry credentials were refused.
fn unauthenticated(refused: Unauthenticated) -> ApiError {
    let status = match refused {
        Unauthenticated::Missing | Unauthenticated::Invalid => StatusCode::UNAUTHORIZED,
        Unauthenticated::NotAdmin | Unauthenticated::NoAdmin => StatusCode::FORBIDDEN,
    };
    let mut error = ApiError::new(status, refused.to_string());
    if status == StatusCode::UNAUTHORIZED {
        let challenge = match refused {
            Unauthenticated::Invalid => {
                r#"Bearer realm="plugin-host registry", error="invalid_token""#
            }
            _ => r#"Bearer realm="plugin-host registry""#,
        };
        error = error.with_header(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
    }
    error
}

/// The 404 for a heartbeat to a service that is not registered: when
/// and why it was removed if that was within the last TTL (its tombstone,
/// and the instances removed then), else [`not_registered`].
fn removed(name: &str, removal: Option<(Tombstone, Vec<String>)>) -> ApiError {
    let Some((tombstone, ids)) = removal else {
        return not_registered(name, "service_id");
    };
    let at = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(tombstone.at_ms));
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "service `{name}` is not registered: its instances {} were {} at {at}; register again with POST /api/registry/register",
            ids.join(", "),
            tombstone.reason.word()
        ),
    )
    .with("field", "service_id")
    .with("service", name)
    .with("removed", tombstone.reason.word())
    .with("removed_at", at.to_string())
    .with("instance_ids", ids)
}

fn not_registered(name: &str, field: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no service named `{name}` is registered (it may have been deregistered or evicted); register again with POST /api/registry/register"
        ),
    )
    .with("field", field)
    .with("service", name)
}

/// What a registration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// A new service.
    Registered,
    /// A new instance of a service.
    Added,
    /// An instance registered again.
    Updated,
    /// A new version of a service, with its first instance.
    VersionAdded,
    /// An instance registered again with another version: it moved to
    /// that version (a rolling restart in place).
    Moved,
}

impl Change {
    fn word(self) -> &'static str {
        match self {
            Change::Registered => "registered",
            Change::Added => "instance added",
            Change::Updated => "updated",
            Change::VersionAdded => "version added",
            Change::Moved => "moved to another version",
        }
    }
}

/// The versions of a service as the store keeps them.
fn stored_record(versions: &[Arc<Service>]) -> StoredService {
    StoredService {
        versions: versions
            .iter()
            .filter_map(|service| remote_of(service))
            .map(|remote| stored_version(remote))
            .collect(),
    }
}

/// One version as the store keeps it.
fn stored_version(remote: &RemoteService) -> StoredVersion {
    let instances: Vec<StoredInstance> = remote
        .instances()
        .members()
        .iter()
        .map(|instance| StoredInstance {
            addr: instance.addr().clone(),
            owner: instance.owner(),
            registered_at_unix_ms: Some(unix_ms(instance.registered_at())),
        })
        .collect();
    StoredVersion {
        spec: remote.spec().clone(),
        owner: instances.first().and_then(|instance| instance.owner),
        instances,
        registered_at_unix_ms: unix_ms(remote.registered_at()),
        owner_token: remote.owner_token().map(str::to_owned),
    }
}

fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
    })
}

/// Whole seconds as an integer, anything finer as a fraction.
fn seconds(duration: Duration) -> Value {
    if duration.subsec_nanos() == 0 {
        json!(duration.as_secs())
    } else {
        json!(duration.as_secs_f64())
    }
}

/// The registry API's routes, and `more` served on the same listener
/// (the observability endpoints, the console), which share its JSON 404
/// and 405.
pub fn router(registry: Registry, more: Router) -> Router {
    Router::new()
        .route("/api/registry/register", post(register))
        .route("/api/registry/heartbeat", post(heartbeat))
        .route("/api/registry/deregister/{name}", post(deregister))
        .route(
            "/api/registry/deregister/{name}/{instance_id}",
            post(deregister_instance),
        )
        .route("/api/registry/services", get(list_services))
        .route("/api/registry/services/{name}", get(get_service))
        .route(
            "/api/registry/services/{name}/traffic",
            get(traffic::get).put(traffic::put).delete(traffic::delete),
        )
        .route("/api/registry/openapi.json", get(openapi))
        .route(
            "/api/registry/admin/api-keys",
            get(admin::list).post(admin::add),
        )
        .route(
            "/api/registry/admin/api-keys/{id}",
            axum::routing::delete(admin::revoke),
        )
        .route(
            "/api/registry/admin/services/{name}",
            axum::routing::delete(admin::remove_service),
        )
        .with_state(registry)
        .merge(more)
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
}

async fn register(
    State(registry): State<Registry>,
    ConnectInfo(caller): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let writer = registry.writer(&headers)?;
    let tenant = registry.tenant(&writer, &headers)?;
    let body = registry.read_body(body, &headers).await?;
    let registration = model::parse_registration(&body).map_err(refusal)?;
    let instance = &registration.instance;
    registry
        .shared
        .egress
        .resolve(&instance.host, instance.port)
        .await
        .map_err(|refused| {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("host: {refused}"))
                .with("field", "host")
                .with("tenant", &tenant)
        })?;
    let named = tenant.clone();
    uncancellable(async move {
        registry
            .register(registration, caller.ip(), writer, tenant)
            .await
    })
    .await
    .map_err(in_tenant(&named))
}

async fn heartbeat(
    State(registry): State<Registry>,
    ConnectInfo(caller): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let writer = registry.writer(&headers)?;
    let tenant = registry.tenant(&writer, &headers)?;
    let body = registry.read_body(body, &headers).await?;
    let beat = model::parse_heartbeat(&body).map_err(refusal)?;
    let name = beat.service_id;
    let key = tenant::key(&tenant, &name);
    let Some(versions) = registry.shared.services.get(&key) else {
        tracing::debug!(service = %Escaped(&name), "heartbeat for an unknown service");
        return Err(removed(&name, registry.shared.tombstones.latest(&key)).with("tenant", &tenant));
    };
    if let Backend::Plugin(_) = versions.default_version().backend {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "`{name}` is a plugin: the host itself keeps plugins alive, they send no heartbeats"
            ),
        )
        .with("field", "service_id")
        .with("service", name)
        .with("tenant", &tenant));
    }
    let targets = registry
        .targets(
            &name,
            versions.all(),
            beat.instance_id.as_deref(),
            caller.ip(),
            &writer,
            "service_id",
        )
        .map_err(in_tenant(&tenant))?;
    let healthy = beat.status == remote::Reported::Healthy;
    for instance in &targets {
        instance.heartbeat(healthy);
    }
    crate::metrics::host().heartbeat();
    let thresholds = registry.shared.instances.load().thresholds;
    let mut status = remote::Status::Unhealthy;
    for remote in versions
        .all()
        .iter()
        .filter_map(|service| remote_of(service))
    {
        remote.announce_health(thresholds);
        if remote.status(thresholds) == remote::Status::Healthy {
            status = remote::Status::Healthy;
        }
    }
    let policy = registry.shared.policy;
    let ids: Vec<&str> = targets.iter().map(|instance| instance.id()).collect();
    #[cfg(feature = "etcd")]
    {
        // Another host removed them after the record this host routes
        // from: the heartbeat is a late one, answered as if this host had
        // caught up already.
        let buried = registry.share_beats(&key, &ids, healthy).await;
        if !buried.is_empty() && buried.len() == ids.len() {
            return Err(
                removed(&name, registry.shared.tombstones.latest(&key)).with("tenant", &tenant)
            );
        }
    }
    Ok(axum::Json(json!({
        "service_id": name,
        "instance_ids": ids,
        "status": status,
        "heartbeat_interval_seconds": seconds(policy.heartbeat_interval),
        "ttl_seconds": seconds(policy.ttl),
    }))
    .into_response())
}

async fn deregister(
    State(registry): State<Registry>,
    ConnectInfo(caller): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let writer = registry.writer(&headers)?;
    let tenant = registry.tenant(&writer, &headers)?;
    let Path(name) = path.map_err(bad_path)?;
    let body = registry.read_body(body, &headers).await?;
    let instance_id = model::parse_deregistration(&body)
        .map_err(refusal)?
        .instance_id;
    let named = tenant.clone();
    uncancellable(async move {
        registry
            .deregister(
                (&tenant, &name),
                Deregistered::Chosen(instance_id.as_deref()),
                caller.ip(),
                writer,
            )
            .await
    })
    .await
    .map_err(in_tenant(&named))
}

/// `POST /api/registry/deregister/{name}/{instance_id}`: the path form of
/// a deregistration naming its instance.
async fn deregister_instance(
    State(registry): State<Registry>,
    ConnectInfo(caller): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let writer = registry.writer(&headers)?;
    let tenant = registry.tenant(&writer, &headers)?;
    let Path((name, instance_id)) = path.map_err(bad_path)?;
    let named = tenant.clone();
    uncancellable(async move {
        registry
            .deregister(
                (&tenant, &name),
                Deregistered::Chosen(Some(&instance_id)),
                caller.ip(),
                writer,
            )
            .await
    })
    .await
    .map_err(in_tenant(&named))
}

/// Runs a write to completion even if the client hangs up: hyper drops a
/// handler's future when its connection closes, which would leave a
/// committed database write without its table change.
async fn uncancellable(
    write: impl Future<Output = Result<Response, ApiError>> + Send + 'static,
) -> Result<Response, ApiError> {
    tokio::spawn(write).await.unwrap_or_else(|join| {
        tracing::error!(error = %join, "registry write task failed");
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the registry failed while applying this change",
        ))
    })
}

/// `GET /api/registry/services`: the caller's tenant's services and the
/// shared ones; for the admin token, every tenant's, or only those of the
/// tenant `?tenant=` names. Whole (from the listing's cache while the
/// caller sees every name) or a page or filter of it (see [`listing`]).
async fn list_services(
    State(registry): State<Registry>,
    headers: HeaderMap,
    query: Result<Query<listing::ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    registry.reader(&headers)?;
    let Query(query) = query.map_err(listing::bad_query)?;
    let caller = registry.reading_tenant(&headers)?;
    let asked = query.tenant();
    if let Some(asked) = asked {
        tenant::check(asked).map_err(|reason| {
            ApiError::new(StatusCode::BAD_REQUEST, format!("tenant: {reason}"))
                .with("field", "tenant")
        })?;
        if let Some(caller) = caller.as_deref().filter(|caller| *caller != asked) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("the listing of tenant `{asked}` needs the admin token; this caller is tenant `{caller}`"),
            )
            .with("field", "tenant")
            .with("tenant", caller));
        }
    }
    let visible = |versions: &Versions| match (asked, caller.as_deref()) {
        (Some(asked), _) => versions.tenant() == asked,
        (None, None) => true,
        (None, Some(caller)) => {
            versions.tenant() == caller || tenant::is_default(versions.tenant())
        }
    };
    let services = registry.shared.services.list();
    let policy = registry.shared.instances.load_full();
    registry
        .shared
        .listing
        .answer(&services, &policy, &query, &visible)
        .map(|response| registry.marked(response))
}

async fn get_service(
    State(registry): State<Registry>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    registry.reader(&headers)?;
    let Path(name) = name.map_err(bad_path)?;
    let tenant = registry.reading_tenant(&headers)?;
    let found = match &tenant {
        Some(tenant) => registry.shared.services.resolve(tenant, &name),
        None => registry.shared.services.get(&name),
    };
    match found {
        Some(service) => Ok(registry.marked(
            axum::Json(describe(&service, &registry.shared.instances.load())).into_response(),
        )),
        None => Err(
            ApiError::new(StatusCode::NOT_FOUND, format!("no service named `{name}`"))
                .with("service", name),
        ),
    }
}

/// The API catalogue: readable by whoever may read the listing.
async fn openapi(
    State(registry): State<Registry>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    registry.reader(&headers)?;
    let gateway = registry.shared.gateway_addr;
    // The host name the client reached the registry by reaches the gateway
    // too (a listener on 0.0.0.0 has no name of its own to give).
    let gateway_url = headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .and_then(|host| host.parse::<axum::http::uri::Authority>().ok())
        .map_or_else(
            || format!("http://{gateway}"),
            |host| format!("http://{}:{}", host.host(), gateway.port()),
        );
    // One document per name: its default version's, of the name the
    // caller's tenant reaches (its own, else the shared one; the admin
    // token: the default tenant's).
    let tenant = registry.reading_tenant(&headers)?;
    let tenant = tenant.as_deref().unwrap_or(tenant::DEFAULT);
    let table = &registry.shared.services;
    let services: Vec<Arc<Service>> = table
        .list()
        .iter()
        .filter(|versions| match versions.tenant() {
            owner if owner == tenant => true,
            owner if tenant::is_default(owner) => {
                table.get(&tenant::key(tenant, versions.name())).is_none()
            }
            _ => false,
        })
        .map(|versions| versions.default_version().clone())
        .collect();
    Ok(axum::Json(registry.shared.catalogue.document(&services, &gateway_url)).into_response())
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no registry endpoint {method} {}: see docs/REGISTRY_API.md",
            uri.path()
        ),
    )
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}

fn bad_path(rejection: PathRejection) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, rejection.body_text()).with("field", "name")
}

fn refusal(invalid: Invalid) -> ApiError {
    ApiError::new(invalid.status(), invalid.to_string()).with("field", invalid.field())
}

/// A service as the registry lists it: what its default version declared,
/// its kind, what its kind adds, and its versions. Serialized straight
/// from borrowed data.
#[derive(serde::Serialize)]
struct Listed<'a> {
    #[serde(flatten)]
    info: &'a ServiceInfo,
    /// The tenant it belongs to (`default`: shared).
    tenant: &'a str,
    kind: &'static str,
    #[serde(flatten)]
    details: Details<'a>,
    /// The version a request naming none goes to when there is no split.
    default_version: &'a str,
    /// Every version, highest first.
    versions: Vec<ListedVersion<'a>>,
    /// Cumulative since each version entered the table, over every
    /// version; a reader computes rates by differencing two reads. With
    /// the name's traffic split, if it has one.
    traffic: Traffic<'a>,
}

#[derive(serde::Serialize)]
struct ListedVersion<'a> {
    version: &'a str,
    status: remote::Status,
    /// A remote version's instance ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    instances: Option<Vec<&'a str>>,
    /// A plugin version's file.
    #[serde(skip_serializing_if = "Option::is_none")]
    loaded_from: Option<&'a str>,
}

#[derive(serde::Serialize)]
struct Traffic<'a> {
    requests_total: u64,
    /// Answers with a 5xx status.
    errors_total: u64,
    in_flight: u64,
    /// The traffic split between versions (`PUT .../traffic`).
    #[serde(skip_serializing_if = "Option::is_none")]
    split: Option<&'a crate::traffic::TrafficPolicy>,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum Details<'a> {
    Plugin {
        status: remote::Status,
        last_health_check: Option<remote::CheckOutcome>,
        loaded_from: &'a str,
    },
    Remote(remote::Liveness),
}

/// The listing entry of a name: the default version's declaration and
/// details, every version's instances and status, the service healthy
/// while one version is.
fn describe<'a>(versions: &'a Versions, policy: &InstancePolicy) -> Listed<'a> {
    let default = versions.default_version();
    let mut listed_versions = Vec::with_capacity(versions.all().len());
    let mut liveness: Vec<(bool, remote::Liveness)> = Vec::new();
    let mut healthy = false;
    for service in versions.all() {
        let (status, instances, loaded_from) = match &service.backend {
            Backend::Plugin(plugin) => (
                plugin.health.status(),
                None,
                Some(plugin.loaded_from.as_str()),
            ),
            Backend::Remote(remote) => {
                let ids = remote
                    .instances()
                    .members()
                    .iter()
                    .map(|member| member.id())
                    .collect();
                let live = remote.liveness(policy);
                let status = live.status;
                liveness.push((Arc::ptr_eq(service, default), live));
                (status, Some(ids), None)
            }
        };
        healthy |= status == remote::Status::Healthy;
        listed_versions.push(ListedVersion {
            version: &service.info.version,
            status,
            instances,
            loaded_from,
        });
    }
    let details = match &default.backend {
        Backend::Plugin(plugin) => Details::Plugin {
            status: if healthy {
                remote::Status::Healthy
            } else {
                plugin.health.status()
            },
            last_health_check: plugin.health.last_check(),
            loaded_from: &plugin.loaded_from,
        },
        Backend::Remote(_) => {
            let position = liveness
                .iter()
                .position(|(is_default, _)| *is_default)
                .unwrap_or(0);
            let (_, mut shown) = liveness.swap_remove(position);
            // Every instance of every version, the default's first.
            for (_, other) in liveness {
                shown.instances.extend(other.instances);
            }
            if healthy {
                shown.status = remote::Status::Healthy;
                shown.unhealthy_reason = None;
            }
            Details::Remote(shown)
        }
    };
    let mut traffic = Traffic {
        requests_total: 0,
        errors_total: 0,
        in_flight: 0,
        split: versions.policy(),
    };
    for service in versions.all() {
        traffic.requests_total += service.traffic().requests_total();
        traffic.errors_total += service.traffic().errors_total();
        traffic.in_flight += service.traffic().in_flight();
    }
    Listed {
        info: &default.info,
        tenant: versions.tenant(),
        kind: versions.kind(),
        details,
        default_version: &default.info.version,
        versions: listed_versions,
        traffic,
    }
}

#[cfg(test)]
mod tests;
