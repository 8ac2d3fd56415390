//! Which store the registry keeps its records in, and, with etcd, how the
//! records other hosts write reach this host's table.
//!
//! With `--store etcd` every host keeps the service table it routes from
//! (routing never waits on etcd) and follows the store: the etcd backend
//! ([`super::etcd`]) watches the prefix and turns what it sees into
//! [`Change`]s; [`Registry::follow`] applies each to the table under the
//! registry's write lock, the lock its own writes take, so a change this
//! host made itself (and sees again in the watch) and one it learns from
//! another host are told apart by their revision and applied exactly once.
//! See `docs/CLUSTER.md`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::store::{RecordStore, Store, StoreError};

/// `--store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// A redb file in the data directory: one host.
    Embedded,
    /// An etcd cluster shared by several hosts.
    Etcd,
}

/// Where the registry keeps remote registrations, as configured.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// Which store.
    pub kind: StoreKind,
    /// The embedded store's file.
    pub database: PathBuf,
    /// etcd's client URLs.
    pub etcd_endpoints: Vec<String>,
    /// The key prefix this cluster of hosts uses in etcd.
    pub etcd_prefix: String,
    /// Longest wait for one etcd request.
    pub etcd_timeout: Duration,
}

impl StoreSettings {
    /// The embedded store in `database`.
    pub fn embedded(database: PathBuf) -> Self {
        Self {
            kind: StoreKind::Embedded,
            database,
            etcd_endpoints: Vec::new(),
            etcd_prefix: "/plugin-host".to_owned(),
            etcd_timeout: Duration::from_secs(2),
        }
    }
}

/// `--etcd-prefix`: an absolute key path without a trailing `/`, so the
/// keys under it read `<prefix>/t/<tenant>/s/<name>`.
pub fn check_etcd_prefix(prefix: String) -> Result<String, String> {
    let well_formed = prefix.starts_with('/')
        && !prefix.ends_with('/')
        && prefix
            .bytes()
            .all(|byte| byte.is_ascii_graphic() && byte != b'\\');
    if well_formed {
        Ok(prefix)
    } else {
        Err(format!(
            "`{prefix}` is not a key prefix: it must start with `/`, not end with one, and hold printable ASCII only (like `/plugin-host`)"
        ))
    }
}

impl super::Registry {
    /// The remote services whose active health checks this host runs:
    /// every one, except with etcd, where one host among those sharing
    /// the prefix checks each service in each tenant (`EtcdStore::checks`,
    /// by table key, so two tenants' services of one name are spread
    /// independently) and shares the results (`share_checks`), so checks
    /// are not multiplied by the number of hosts. The host that checks a
    /// service also evicts it.
    pub(super) fn checked_here(&self) -> Vec<std::sync::Arc<crate::remote::RemoteService>> {
        #[cfg(feature = "etcd")]
        if let Some(etcd) = &self.shared.etcd {
            return self
                .shared
                .services
                .list()
                .iter()
                .filter(|versions| etcd.checks(versions.key()))
                .flat_map(|versions| {
                    versions
                        .all()
                        .iter()
                        .filter_map(|service| super::remote_of(service))
                })
                .cloned()
                .collect();
        }
        self.remotes()
    }

    /// `response` to a read, marked `X-Registry-Stale: true` while this
    /// host's table may be behind the store (its etcd watch is lost).
    pub(super) fn marked(&self, response: axum::response::Response) -> axum::response::Response {
        #[cfg(feature = "etcd")]
        if self
            .shared
            .etcd
            .as_ref()
            .is_some_and(|etcd| etcd.is_stale())
        {
            let mut response = response;
            response.headers_mut().insert(
                "x-registry-stale",
                axum::http::HeaderValue::from_static("true"),
            );
            return response;
        }
        response
    }
}

/// The opened store, and with etcd the stream of what other hosts change.
pub(super) struct Opened {
    /// The records.
    pub store: Arc<dyn RecordStore>,
    /// etcd's backend itself, whose changes the registry follows.
    #[cfg(feature = "etcd")]
    pub etcd: Option<Arc<super::etcd::EtcdStore>>,
}

/// Opens the store `settings` name; `ttl`, the heartbeat TTL, is the
/// length of etcd's leases. etcd is connected to (and must answer) here: a
/// host does not start with a registry it cannot read.
pub(super) fn open(
    settings: &StoreSettings,
    #[cfg_attr(not(feature = "etcd"), expect(unused_variables))] ttl: Duration,
) -> Result<Opened, StoreError> {
    match settings.kind {
        StoreKind::Embedded => Ok(Opened {
            store: Arc::new(Store::open(&settings.database)?),
            #[cfg(feature = "etcd")]
            etcd: None,
        }),
        #[cfg(feature = "etcd")]
        StoreKind::Etcd => {
            let etcd = Arc::new(super::etcd::EtcdStore::connect(settings, ttl)?);
            Ok(Opened {
                store: etcd.clone(),
                etcd: Some(etcd),
            })
        }
        #[cfg(not(feature = "etcd"))]
        StoreKind::Etcd => Err(StoreError::Unreachable {
            store: "etcd".to_owned(),
            reason: "this plugin-host was built without the etcd store (cargo feature `etcd`)"
                .to_owned(),
        }),
    }
}

#[cfg(feature = "etcd")]
mod following {
    use std::collections::HashSet;
    use std::sync::Arc;

    use tokio::task::JoinSet;

    use super::super::etcd::{Change, EtcdStore, api_key_seen, policy_seen, record_seen};
    use super::super::store::{decode, decode_api_key, decode_policy};
    use super::super::tombstones::Tombstone;
    use super::super::{Registry, remote_of, restored_version, stored_size};
    use crate::auth::ApiKeySettings;
    use crate::remote::{Instance, RemoteService};
    use crate::table::Service;
    use crate::tenant;

    /// Most health check outcomes put to etcd at once.
    const SHARED_AT_ONCE: usize = 64;

    impl Registry {
        /// Applies what the etcd watch reports to the table, for as long
        /// as the registry lives.
        pub(in crate::registry) fn follow(&self, etcd: Arc<EtcdStore>) {
            let mut changes = etcd.follow();
            let registry = self.clone();
            tokio::spawn(async move {
                while let Some(change) = changes.recv().await {
                    registry.apply(&etcd, change).await;
                }
            });
        }

        async fn apply(&self, etcd: &EtcdStore, change: Change) {
            match change {
                Change::Service {
                    tenant,
                    name,
                    revision,
                    value,
                } => {
                    let key = tenant::key(&tenant, &name).into_owned();
                    let _writes = self.shared.writes.lock(&key).await;
                    if !etcd.accept(&record_seen(&tenant, &name), revision, value.is_some()) {
                        return;
                    }
                    match value {
                        Some(value) => self.put_from_store(&key, &value),
                        None => self.remove_from_store(&key),
                    }
                }
                Change::Policy {
                    tenant,
                    name,
                    revision,
                    value,
                } => {
                    let key = tenant::key(&tenant, &name).into_owned();
                    let _writes = self.shared.writes.lock(&key).await;
                    if etcd.accept(&policy_seen(&tenant, &name), revision, value.is_some()) {
                        self.policy_from_store(&key, value.as_deref());
                    }
                }
                Change::Beat {
                    key,
                    instance,
                    healthy,
                } => {
                    let thresholds = self.shared.instances.load().thresholds;
                    self.on_instance(&key, &instance, |remote, instance| {
                        instance.heartbeat(healthy);
                        remote.announce_health(thresholds);
                    });
                }
                Change::ApiKey {
                    id,
                    revision,
                    value,
                } => {
                    let _writes = self.shared.key_writes.lock().await;
                    if etcd.accept(&api_key_seen(&id), revision, value.is_some()) {
                        self.api_key_from_store(&id, value.as_deref());
                    }
                }
                Change::Buried {
                    key,
                    instance,
                    tombstone,
                } => self.shared.tombstones.bury(&key, &[instance], tombstone),
                Change::Check {
                    key,
                    instance,
                    outcome,
                } => {
                    let thresholds = self.shared.instances.load().thresholds;
                    self.on_instance(&key, &instance, |remote, instance| {
                        instance.record_check(outcome.clone(), thresholds);
                        remote.announce_health(thresholds);
                    });
                }
            }
        }

        /// Runs `apply` on instance `id` of the service under table key
        /// `key`, in whichever of its versions has it.
        fn on_instance(
            &self,
            key: &str,
            id: &str,
            mut apply: impl FnMut(&RemoteService, &Instance),
        ) {
            let Some(versions) = self.shared.services.get(key) else {
                return;
            };
            for remote in versions
                .all()
                .iter()
                .filter_map(|service| remote_of(service))
            {
                if let Some(instance) = remote.instances().get(id) {
                    apply(remote, instance);
                }
            }
        }

        /// Records heartbeats for instances `ids` of the service under
        /// table key `key` in etcd, where every host sees them. A failure
        /// is logged: the heartbeat still counts on this host, and the
        /// service keeps being routed here. Returns the instances another
        /// host removed since the record this host routes them from (a
        /// late heartbeat: nothing shared), whose tombstones this host now
        /// knows.
        pub(in crate::registry) async fn share_beats(
            &self,
            key: &str,
            ids: &[&str],
            healthy: bool,
        ) -> Vec<String> {
            let Some(etcd) = &self.shared.etcd else {
                return Vec::new();
            };
            let mut buried = Vec::new();
            for id in ids {
                match etcd.beat(key, id, healthy).await {
                    Ok(None) => {}
                    Ok(Some(tombstone)) => {
                        tracing::info!(service = %key, instance = %id, removed = tombstone.reason.word(), "late heartbeat for a removed instance not shared");
                        self.shared
                            .tombstones
                            .bury(key, &[(*id).to_owned()], tombstone);
                        buried.push((*id).to_owned());
                    }
                    Err(error) => {
                        tracing::debug!(service = %key, instance = %id, %error, "heartbeat not shared through etcd");
                    }
                }
            }
            buried
        }

        /// Leaves tombstones for instances `ids` of the service under
        /// table key `key`, just removed, in etcd. A failure is logged: the
        /// removal stands, and other hosts learn of it from the record.
        pub(in crate::registry) async fn share_tombstones(
            &self,
            key: &str,
            ids: &[String],
            tombstone: &Tombstone,
        ) {
            let Some(etcd) = &self.shared.etcd else {
                return;
            };
            if let Err(error) = etcd.bury(key, ids, tombstone).await {
                tracing::warn!(service = %key, %error, "tombstones of removed instances not stored in etcd");
            }
        }

        /// Shares what this host's last health check round found for
        /// `remotes` with every host, which records each outcome as if it
        /// had made the check: the same thresholds then mark the same
        /// instances down everywhere, and a passing check is a sign of
        /// life everywhere.
        pub(in crate::registry) async fn share_checks(&self, remotes: &[Arc<RemoteService>]) {
            let Some(etcd) = &self.shared.etcd else {
                return;
            };
            // By address: a pointer is not `Send`, and the set lives across
            // awaits.
            let checked: HashSet<usize> = remotes
                .iter()
                .map(|remote| Arc::as_ptr(remote).addr())
                .collect();
            let mut sharing = JoinSet::new();
            // A remote service knows its name, not its tenant: the table's
            // keys say which tenant each one is in.
            for versions in self.shared.services.list().iter() {
                for remote in versions
                    .all()
                    .iter()
                    .filter_map(|service| remote_of(service))
                {
                    if !checked.contains(&Arc::as_ptr(remote).addr()) {
                        continue;
                    }
                    for instance in remote.instances().members() {
                        let Some(outcome) = instance.last_check() else {
                            continue;
                        };
                        // A bounded number at once: a round of many
                        // services neither waits for them one by one nor
                        // floods etcd.
                        if sharing.len() >= SHARED_AT_ONCE {
                            sharing.join_next().await;
                        }
                        let (etcd, key, id) = (
                            etcd.clone(),
                            versions.key().to_owned(),
                            instance.id().to_owned(),
                        );
                        sharing.spawn(async move {
                            if let Err(error) = etcd.checked(&key, &id, &outcome).await {
                                tracing::debug!(service = %key, instance = %id, %error, "health check not shared through etcd");
                            }
                        });
                    }
                }
            }
            sharing.join_all().await;
        }

        /// Applies API key `id` as another host added (`Some`) or revoked
        /// it through the admin API; one that clashes with this host's
        /// config file is logged and not used, as at a start.
        fn api_key_from_store(&self, id: &str, value: Option<&[u8]>) {
            let managed = &self.shared.managed_keys;
            let Some(value) = value else {
                if managed.revoke(id) {
                    tracing::info!(api_key = %id, "API key revoked on another host");
                }
                return;
            };
            let stored = match decode_api_key(value) {
                Ok(stored) => stored,
                Err(error) => {
                    tracing::error!(api_key = %id, %error, "API key in etcd cannot be used");
                    return;
                }
            };
            managed.revoke(id);
            let added = managed.insert(
                ApiKeySettings {
                    id: stored.id,
                    sha256: stored.sha256,
                    services: stored.services,
                    tenant: stored.tenant,
                },
                &self.shared.authenticator.load(),
            );
            match added {
                Ok(()) => tracing::info!(api_key = %id, "API key added on another host"),
                Err(refused) => {
                    tracing::error!(api_key = %id, error = %refused, "API key added on another host not used here");
                }
            }
        }

        /// Applies the traffic policy another host set (`Some`) or cleared
        /// for the service under table key `key`.
        fn policy_from_store(&self, key: &str, value: Option<&[u8]>) {
            let policy = match value.map(decode_policy).transpose() {
                Ok(policy) => policy,
                Err(error) => {
                    tracing::error!(service = %key, %error, "traffic policy in etcd cannot be used; not applied");
                    return;
                }
            };
            tracing::info!(service = %key, set = policy.is_some(), "traffic policy changed in etcd");
            self.shared.services.set_policy(key, policy);
        }

        /// Routes the record another host wrote for the service under
        /// table key `key` (or this host, before a restart), in place of
        /// what the table has for it; an instance already known keeps its
        /// state.
        fn put_from_store(&self, key: &str, value: &[u8]) {
            let name = tenant::split_key(key).1;
            let stored = match decode(value).0 {
                Ok(stored) if stored.is_filed_as(name) => stored,
                Ok(_) => {
                    tracing::error!(service = %key, "record in etcd is filed under another name; not routed");
                    return;
                }
                Err(error) => {
                    tracing::error!(service = %key, %error, "record in etcd cannot be used; not routed");
                    return;
                }
            };
            self.record_storage(key, Some(stored_size(&stored)));
            let current = self.shared.services.get(key);
            let previous = |version: &str| {
                current.as_ref().and_then(|versions| {
                    versions
                        .all()
                        .iter()
                        .find(|service| service.version().to_string() == version)
                        .and_then(|service| remote_of(service))
                        .cloned()
                })
            };
            let versions = stored
                .versions
                .iter()
                .map(|version| {
                    let kept = previous(&version.spec.info.version);
                    restored_version(
                        version,
                        &self.shared.egress,
                        self.shared.policy.ttl,
                        kept.as_deref(),
                    )
                })
                .collect::<Result<Vec<Arc<Service>>, String>>();
            let versions = match versions {
                Ok(versions) => versions,
                Err(error) => {
                    tracing::error!(service = %key, %error, "record in etcd not routed");
                    return;
                }
            };
            let fresh: Vec<Arc<RemoteService>> = versions
                .iter()
                .filter_map(|service| remote_of(service).cloned())
                .collect();
            let count = versions.len();
            let updated = self.shared.services.update(key, |held| {
                match held.iter().find(|service| remote_of(service).is_none()) {
                    Some(plugin) => Err(plugin.clone()),
                    None => Ok(versions),
                }
            });
            match updated {
                Ok(_) => {
                    tracing::info!(service = %key, versions = count, "remote service changed in etcd");
                    for remote in fresh {
                        self.shared.catalogue.fetch(remote);
                    }
                }
                Err(holder) => {
                    tracing::warn!(service = %key, holder = holder.kind(), "remote service from etcd not routed on this host: a plugin of this host holds the name");
                }
            }
        }

        /// Removes what the table has for the service under table key
        /// `key`, deleted in etcd.
        fn remove_from_store(&self, key: &str) {
            self.record_storage(key, None);
            let removed = self
                .shared
                .services
                .remove_if(key, |service| remote_of(service).is_some());
            if !removed.is_empty() {
                tracing::info!(service = %key, "remote service removed in etcd");
            }
        }
    }
}
