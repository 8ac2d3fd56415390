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
    /// the prefix checks each service (`EtcdStore::checks`) and shares the
    /// results (`share_checks`), so checks are not multiplied by the
    /// number of hosts. The host that checks a service also evicts it.
    pub(super) fn checked_here(
        &self,
        remotes: Vec<std::sync::Arc<crate::remote::RemoteService>>,
    ) -> Vec<std::sync::Arc<crate::remote::RemoteService>> {
        #[cfg(feature = "etcd")]
        if let Some(etcd) = &self.shared.etcd {
            return remotes
                .into_iter()
                .filter(|remote| etcd.checks(remote.name()))
                .collect();
        }
        remotes
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
    use std::sync::Arc;

    use tokio::task::JoinSet;

    use super::super::etcd::{Change, EtcdStore, api_key_seen};
    use super::super::store::decode;
    use super::super::store::decode_api_key;
    use super::super::{Registry, routable, stored_size};
    use crate::auth::ApiKeySettings;
    use crate::remote::RemoteService;
    use crate::table::Backend;

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
                    name,
                    revision,
                    value,
                } => {
                    let _writes = self.shared.writes.lock().await;
                    if !etcd.accept(&name, revision, value.is_some()) {
                        return;
                    }
                    match value {
                        Some(value) => self.put_from_store(&name, &value),
                        None => self.remove_from_store(&name),
                    }
                }
                Change::Beat {
                    name,
                    instance,
                    healthy,
                } => {
                    let Some(service) = self.shared.services.get(&name) else {
                        return;
                    };
                    let Backend::Remote(remote) = &service.backend else {
                        return;
                    };
                    if let Some(instance) = remote.instances().get(&instance) {
                        instance.heartbeat(healthy);
                        remote.announce_health(self.shared.instances.load().thresholds);
                    }
                }
                Change::ApiKey {
                    id,
                    revision,
                    value,
                } => {
                    let _writes = self.shared.writes.lock().await;
                    if etcd.accept(&api_key_seen(&id), revision, value.is_some()) {
                        self.api_key_from_store(&id, value.as_deref());
                    }
                }
                Change::Check {
                    name,
                    instance,
                    outcome,
                } => {
                    let Some(service) = self.shared.services.get(&name) else {
                        return;
                    };
                    let Backend::Remote(remote) = &service.backend else {
                        return;
                    };
                    if let Some(instance) = remote.instances().get(&instance) {
                        let thresholds = self.shared.instances.load().thresholds;
                        instance.record_check(outcome, thresholds);
                        remote.announce_health(thresholds);
                    }
                }
            }
        }

        /// Records heartbeats for instances `ids` of `name` in etcd, where
        /// every host sees them. A failure is logged: the heartbeat still
        /// counts on this host, and the service keeps being routed here.
        pub(in crate::registry) async fn share_beats(
            &self,
            name: &str,
            ids: &[&str],
            healthy: bool,
        ) {
            let Some(etcd) = &self.shared.etcd else {
                return;
            };
            for id in ids {
                if let Err(error) = etcd.beat(name, id, healthy).await {
                    tracing::debug!(service = %name, instance = %id, %error, "heartbeat not shared through etcd");
                }
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
            let mut sharing = JoinSet::new();
            for remote in remotes {
                for instance in remote.instances().members() {
                    let Some(outcome) = instance.last_check() else {
                        continue;
                    };
                    // A bounded number at once: a round of many services
                    // neither waits for them one by one nor floods etcd.
                    if sharing.len() >= SHARED_AT_ONCE {
                        sharing.join_next().await;
                    }
                    let (etcd, name, id) = (
                        etcd.clone(),
                        remote.name().to_owned(),
                        instance.id().to_owned(),
                    );
                    sharing.spawn(async move {
                        if let Err(error) = etcd.checked(&name, &id, &outcome).await {
                            tracing::debug!(service = %name, instance = %id, %error, "health check not shared through etcd");
                        }
                    });
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

        /// Routes the record another host wrote for `name` (or this host,
        /// before a restart), in place of what the table has for it.
        fn put_from_store(&self, name: &str, value: &[u8]) {
            let stored = match decode(value).0 {
                Ok(stored) if stored.spec.info.name == name => stored,
                Ok(_) => {
                    tracing::error!(service = %name, "record in etcd is filed under another name; not routed");
                    return;
                }
                Err(error) => {
                    tracing::error!(service = %name, %error, "record in etcd cannot be used; not routed");
                    return;
                }
            };
            self.record_storage(name, Some(stored_size(&stored)));
            let current = self.shared.services.get(name);
            let previous = current.as_ref().and_then(|service| match &service.backend {
                Backend::Remote(remote) => Some(remote.clone()),
                Backend::Plugin(_) => None,
            });
            let service = match routable(
                stored,
                &self.shared.egress,
                self.shared.policy.ttl,
                previous.as_deref(),
            ) {
                Ok(service) => service,
                Err(error) => {
                    tracing::error!(service = %name, %error, "record in etcd not routed");
                    return;
                }
            };
            let Backend::Remote(remote) = &service.backend else {
                return;
            };
            let remote = remote.clone();
            match self.shared.services.insert(service, |holder| {
                matches!(holder.backend, Backend::Remote(_))
            }) {
                Ok(_) => {
                    tracing::info!(service = %name, instances = remote.instances().len(), "remote service changed in etcd");
                    self.shared.catalogue.fetch(remote);
                }
                Err(holder) => {
                    tracing::warn!(service = %name, holder = holder.kind(), "remote service from etcd not routed on this host: a plugin of this host holds the name");
                }
            }
        }

        /// Removes what the table has for `name`, deleted in etcd.
        fn remove_from_store(&self, name: &str) {
            self.record_storage(name, None);
            let removed = self.shared.services.remove_if(name, |service| {
                matches!(service.backend, Backend::Remote(_))
            });
            if removed.is_some() {
                tracing::info!(service = %name, "remote service removed in etcd");
            }
        }
    }
}
