//! The registry's records in etcd, shared by every host that names the
//! same endpoints and prefix (`--store etcd`).
//!
//! **Keys.** Under `<prefix>/t/<tenant>/`, the same keys as the embedded
//! store's, with the same values (checksum line, tagged JSON: see
//! [`super::store`]): `s/<name>`, one record per service name holding
//! every version and its instances; `p/<name>`, the name's traffic
//! policy; and `live/<name>/<instance-id>`, an instance's liveness key,
//! attached to its lease. API keys added through the admin API are
//! `<prefix>/keys/<id>` (followed like the records); the hosts sharing the
//! prefix list themselves as `<prefix>/hosts/<id>`, each on its own
//! session lease; and an instance removed (deregistered or evicted) leaves
//! a tombstone `<prefix>/tomb/<tenant>/<name>/<instance-id>` on a lease of
//! one TTL ([`super::tombstones`]). (Anything under `s/<name>/` is left to per-instance
//! keys the registry model may add, and ignored here.)
//!
//! **Writes are transactions on revisions.** A put succeeds only if the
//! key is absent (`create_revision == 0`) when this host saw it absent,
//! or unchanged since the revision this host saw (`mod_revision`); else
//! it is [`StoreError::Conflict`] and nothing changed. Two hosts can
//! therefore never both accept a write decided on the same view.
//!
//! **Liveness.** A heartbeat to any host renews the instance's lease (one
//! keep-alive by the lease's id, which every host learns from the watch;
//! a fresh grant if it expired) and puts the liveness key again, so every
//! host sees the heartbeat as a watch event and refreshes its copy of the
//! instance: the TTL then runs out at the same moment everywhere, and the
//! lease's expiry removes the key everywhere. The host that checks a
//! service ([`EtcdStore::checks`]) puts each check's outcome on the same
//! key, and the other hosts record it as their own. Either put is refused
//! when the instance has a tombstone newer than the record this host
//! routes it from: a host whose table is behind a removal does not keep a
//! removed instance alive.
//!
//! **Following.** [`EtcdStore::follow`] watches `<prefix>/` from the revision of the initial read. When the watch fails (etcd
//! unreachable, or the revision compacted) the host keeps routing from
//! its table, marks its reads stale, and retries; once etcd answers, it
//! lists the prefix again, sends what differs from what it has seen, and
//! watches from the listing's revision, so no change is missed, and none
//! is applied twice (the registry applies a change only if its revision
//! is newer than the last one it saw for the key: [`EtcdStore::accept`]).

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, WatchOptions,
};
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use super::cluster::StoreSettings;
use super::store::{
    Loaded, LoadedApiKey, LoadedPolicy, RecordStore, StoreError, StoredApiKey, StoredService,
    decode, decode_api_key, decode_policy, encode, encode_api_key, encode_policy,
};
use super::tombstones::Tombstone;
use crate::remote::CheckOutcome;
use crate::sync::lock;
use crate::tenant;
use crate::traffic::TrafficPolicy;
use xxhash_rust::xxh3::xxh3_64;

/// The pause before a request etcd's client could not deliver is sent
/// again.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Longest pause between two attempts to reach etcd again.
const MAX_RETRY: Duration = Duration::from_secs(2);

/// Keys read per request when listing the prefix.
const LIST_PAGE: i64 = 1000;

/// Largest watch message accepted. etcd sends a watcher catching up
/// (after falling behind) up to 1000 revisions in one message, far more
/// than the client's default limit of 4 MiB when records are large; a
/// message past the limit would lose the watch, and the next one again.
const MAX_WATCH_MESSAGE: usize = 256 << 20;

/// What the watch saw change.
#[derive(Debug)]
pub enum Change {
    /// The record of `name` in `tenant` at `revision`: its value, or
    /// `None` once it was deleted.
    Service {
        /// The tenant.
        tenant: String,
        /// The service.
        name: String,
        /// The revision of the change.
        revision: i64,
        /// The stored value (checksum line and JSON).
        value: Option<Vec<u8>>,
    },
    /// The traffic policy of `name` in `tenant` at `revision`: its
    /// value, or `None` once it was deleted.
    Policy {
        /// The tenant.
        tenant: String,
        /// The service.
        name: String,
        /// The revision of the change.
        revision: i64,
        /// The stored value (checksum line and JSON).
        value: Option<Vec<u8>>,
    },
    /// A heartbeat some host received for an instance.
    Beat {
        /// The service's table key ([`tenant::key`]).
        key: String,
        /// The instance's id.
        instance: String,
        /// Whether it said it is healthy.
        healthy: bool,
    },
    /// API key `id` added through the admin API at `revision` (its stored
    /// value), or revoked (`None`).
    ApiKey {
        /// The key's id.
        id: String,
        /// The revision of the change.
        revision: i64,
        /// The stored value (checksum line and JSON).
        value: Option<Vec<u8>>,
    },
    /// An instance removed (deregistered or evicted) on some host.
    Buried {
        /// The service's table key ([`tenant::key`]).
        key: String,
        /// The instance's id.
        instance: String,
        /// When and why.
        tombstone: Tombstone,
    },
    /// A health check the host checking the service made of an instance.
    Check {
        /// The service's table key ([`tenant::key`]).
        key: String,
        /// The instance's id.
        instance: String,
        /// What the check found.
        outcome: CheckOutcome,
    },
}

/// The last change this host applied for a name.
#[derive(Debug, Clone, Copy)]
struct Seen {
    revision: i64,
    present: bool,
}

/// The etcd store: a client, and what this host has seen of the prefix.
pub struct EtcdStore {
    client: Client,
    endpoints: String,
    /// `<prefix>/`: everything this cluster of hosts keeps.
    root_prefix: String,
    /// `<prefix>/keys/`.
    keys_prefix: String,
    timeout: Duration,
    /// The heartbeat TTL, in whole seconds (etcd's lease unit).
    lease_ttl: i64,
    runtime: Handle,
    /// Per record (its key below the prefix: `t/<tenant>/s/<name>`,
    /// `t/<tenant>/p/<name>`, `keys/<id>`), the last revision applied to
    /// the table or written by this host: what a write compares against.
    seen: Mutex<HashMap<String, Seen>>,
    /// Liveness key -> the lease it is attached to.
    leases: Mutex<HashMap<String, i64>>,
    /// Per (service table key, instance), when this host last shared a heartbeat
    /// and with which status.
    beats_shared: Mutex<HashMap<(String, String), (tokio::time::Instant, bool)>>,
    /// How often a heartbeat whose status did not change is shared.
    share_every: Duration,
    /// The revision the initial read was made at.
    listed: Mutex<i64>,
    /// The tombstones the initial read found, sent first when following.
    buried_at_load: Mutex<Vec<Change>>,
    /// This host's id among the hosts sharing the prefix.
    host_id: String,
    /// The ids of the hosts sharing the prefix now (`<prefix>/hosts/<id>`,
    /// each on its host's session lease).
    members: Mutex<BTreeSet<String>>,
    /// Whether the watch is following etcd now.
    following: AtomicBool,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.root_prefix)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to etcd; blocks, on the multi-threaded runtime. The first
    /// request is the initial [`load`].
    ///
    /// [`load`]: RecordStore::load
    pub fn connect(settings: &StoreSettings, ttl: Duration) -> Result<Self, StoreError> {
        let runtime = Handle::current();
        let endpoints = settings.etcd_endpoints.join(",");
        // One attempt gets a quarter of the timeout, so a request stuck on
        // a member that just died is sent again to another in time.
        let attempt = (settings.etcd_timeout / 4).max(Duration::from_millis(100));
        let options = ConnectOptions::new()
            .with_connect_timeout(attempt)
            .with_timeout(attempt)
            .with_keep_alive(Duration::from_secs(2), settings.etcd_timeout);
        let connecting = tokio::time::timeout(
            settings.etcd_timeout,
            Client::connect(&settings.etcd_endpoints, Some(options)),
        );
        let client = tokio::task::block_in_place(|| runtime.block_on(connecting))
            .map_err(|_| unreachable(&endpoints, "no answer within the etcd timeout"))?
            .map_err(|error| unreachable(&endpoints, &error.to_string()))?;
        Ok(Self {
            client,
            root_prefix: format!("{}/", settings.etcd_prefix),
            keys_prefix: format!("{}/keys/", settings.etcd_prefix),
            endpoints,
            timeout: settings.etcd_timeout,
            lease_ttl: i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX),
            runtime,
            seen: Mutex::default(),
            leases: Mutex::default(),
            beats_shared: Mutex::default(),
            share_every: ttl / 4,
            listed: Mutex::new(0),
            buried_at_load: Mutex::default(),
            host_id: uuid::Uuid::new_v4().simple().to_string(),
            members: Mutex::default(),
            following: AtomicBool::new(true),
        })
    }

    /// Whether this host's table may be behind etcd: its watch is not
    /// following etcd now.
    pub fn is_stale(&self) -> bool {
        !self.following.load(Ordering::Relaxed)
    }

    /// Whether the change of record `seen` (its key below the prefix:
    /// [`record_seen`], [`policy_seen`], [`api_key_seen`]) at `revision`
    /// is newer than what this host applied or wrote; if so it is recorded
    /// as seen. The registry calls it under the name's write lock, with
    /// the change it then applies.
    pub fn accept(&self, seen: &str, revision: i64, present: bool) -> bool {
        let mut all = lock(&self.seen);
        if all.get(seen).is_some_and(|seen| seen.revision >= revision) {
            return false;
        }
        all.insert(seen.to_owned(), Seen { revision, present });
        true
    }

    /// Follows etcd from the initial read on, for ever: every change
    /// under the prefix, and after a lost watch the difference between a
    /// fresh listing and what this host has seen.
    pub fn follow(self: &std::sync::Arc<Self>) -> mpsc::UnboundedReceiver<Change> {
        self.join();
        let (sender, receiver) = mpsc::unbounded_channel();
        for buried in std::mem::take(&mut *lock(&self.buried_at_load)) {
            let _ = sender.send(buried);
        }
        let store = self.clone();
        tokio::spawn(async move {
            let mut from = *lock(&store.listed) + 1;
            loop {
                let lost = store.watch(from, &sender).await;
                if sender.is_closed() {
                    return;
                }
                store.following.store(false, Ordering::Relaxed);
                tracing::warn!(store = %store.endpoints, error = %lost, "etcd watch lost: routing from the last known table, registry writes refused until etcd answers");
                // Only a fresh listing ends the outage: a watch resumed
                // from the old revision could start past a compaction.
                let mut pause = Duration::from_millis(100);
                from = loop {
                    match store.relist(&sender).await {
                        Ok(revision) => break revision + 1,
                        Err(error) => {
                            tracing::debug!(store = %store.endpoints, %error, "etcd still unreachable");
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(MAX_RETRY);
                        }
                    }
                };
                store.following.store(true, Ordering::Relaxed);
                tracing::info!(store = %store.endpoints, revision = from - 1, "etcd watch resumed after a fresh listing");
            }
        });
        receiver
    }

    /// Keeps this host listed among the hosts sharing the prefix, on a
    /// session lease of the heartbeat TTL renewed a third of it apart: a
    /// host that dies drops out of the list one TTL later, and the other
    /// hosts take over the health checks it made.
    fn join(self: &std::sync::Arc<Self>) {
        let store = self.clone();
        tokio::spawn(async move {
            let key = format!("{}hosts/{}", store.root_prefix, store.host_id);
            let renew_every = Duration::from_secs(u64::try_from(store.lease_ttl).unwrap_or(1)) / 3;
            loop {
                let error = store.hold(&key, renew_every).await;
                tracing::debug!(store = %store.endpoints, %error, "host session lease lost; joining again");
                tokio::time::sleep(MAX_RETRY).await;
            }
        });
    }

    /// Puts `key` on a fresh session lease and renews it until that
    /// fails; returns why.
    async fn hold(&self, key: &str, renew_every: Duration) -> StoreError {
        let leases = self.client.lease_client();
        let granted = self
            .bounded(|| {
                let mut leases = leases.clone();
                async move { leases.grant(self.lease_ttl, None).await }
            })
            .await;
        let lease = match granted {
            Ok(granted) => granted.id(),
            Err(error) => return error,
        };
        let put = self
            .bounded(|| async {
                self.client
                    .kv_client()
                    .put(
                        key,
                        self.host_id.as_bytes(),
                        Some(PutOptions::new().with_lease(lease)),
                    )
                    .await
            })
            .await;
        if let Err(error) = put {
            return error;
        }
        tracing::info!(store = %self.endpoints, host_id = %self.host_id, "joined the hosts sharing the registry in etcd");
        let renewing = self
            .bounded(|| {
                let mut leases = leases.clone();
                async move { leases.keep_alive(lease).await }
            })
            .await;
        let (mut keeper, mut answers) = match renewing {
            Ok(stream) => stream,
            Err(error) => return error,
        };
        loop {
            tokio::time::sleep(renew_every).await;
            let renewed = tokio::time::timeout(self.timeout, async {
                keeper.keep_alive().await?;
                answers.message().await
            })
            .await;
            match renewed {
                Ok(Ok(Some(answer))) if answer.ttl() > 0 => {}
                Ok(Ok(_)) => return unreachable(&self.endpoints, "the session lease expired"),
                Ok(Err(error)) => return unreachable(&self.endpoints, &error.to_string()),
                Err(_) => return unreachable(&self.endpoints, "no answer to a lease renewal"),
            }
        }
    }

    /// Whether this host runs the active health checks of the service
    /// under table key `key` ([`tenant::key`]): the host among those
    /// sharing the prefix that ranks first for the key (rendezvous
    /// hashing, so a host joining or leaving moves only its share of the
    /// services, and two tenants' services of one name are placed
    /// independently). While the watch is lost, or before the
    /// host saw itself listed, it checks everything: checks repeated are
    /// better than checks missed.
    pub fn checks(&self, key: &str) -> bool {
        if self.is_stale() {
            return true;
        }
        let members = lock(&self.members);
        if !members.contains(&self.host_id) {
            return true;
        }
        checker_of(&members, key).is_none_or(|host| host == self.host_id)
    }

    /// Watches from `from` until the watch fails; returns why.
    async fn watch(&self, mut from: i64, sender: &mpsc::UnboundedSender<Change>) -> String {
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut stream = match self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_WATCH_MESSAGE)
            .watch(self.root_prefix.as_bytes(), Some(options))
            .await
        {
            Ok(stream) => stream,
            Err(error) => return error.to_string(),
        };
        loop {
            let response = match stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return "the watch stream ended".to_owned(),
                Err(error) => return error.to_string(),
            };
            if response.compact_revision() > 0 {
                return format!(
                    "revision {from} was compacted (oldest kept: {})",
                    response.compact_revision()
                );
            }
            if response.canceled() {
                return format!("the watch was cancelled: {}", response.cancel_reason());
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                from = kv.mod_revision() + 1;
                let deleted = event.event_type() == EventType::Delete;
                if let Some(change) = self.change(kv, deleted) {
                    let _ = sender.send(change);
                }
            }
        }
    }

    /// Lists the prefix again and sends every record that differs from
    /// what was seen, and a deletion for every name seen that is gone;
    /// returns the listing's revision.
    async fn relist(&self, sender: &mpsc::UnboundedSender<Change>) -> Result<i64, StoreError> {
        let (kvs, revision) = self.list(&self.root_prefix).await?;
        lock(&self.members).clear();
        // The records listed, as `seen` files them.
        let mut listed = std::collections::HashSet::new();
        for kv in &kvs {
            match self.change(kv, false) {
                // Removals this host missed are told again, for their TTL.
                Some(change @ Change::Buried { .. }) => {
                    let _ = sender.send(change);
                }
                Some(
                    change @ (Change::Service { .. }
                    | Change::Policy { .. }
                    | Change::ApiKey { .. }),
                ) => {
                    if let Some(seen) = std::str::from_utf8(kv.key())
                        .ok()
                        .and_then(|key| key.strip_prefix(&self.root_prefix))
                    {
                        listed.insert(seen.to_owned());
                    }
                    let _ = sender.send(change);
                }
                // Liveness is not replayed: the heartbeats to come are.
                Some(Change::Beat { .. } | Change::Check { .. }) | None => {}
            }
        }
        let gone: Vec<String> = lock(&self.seen)
            .iter()
            .filter(|(seen, at)| at.present && !listed.contains(seen.as_str()))
            .map(|(seen, _)| seen.clone())
            .collect();
        for seen in gone {
            if let Some(change) = record_change(&seen, revision, None) {
                let _ = sender.send(change);
            }
        }
        Ok(revision)
    }

    /// What a key under the prefix changing means, if anything; keeps the
    /// list of hosts, and remembers the lease of a liveness key.
    fn change(&self, kv: &KeyValue, deleted: bool) -> Option<Change> {
        let key = std::str::from_utf8(kv.key()).ok()?;
        if let Some(host) = key
            .strip_prefix(&self.root_prefix)
            .and_then(|rest| rest.strip_prefix("hosts/"))
        {
            let mut members = lock(&self.members);
            if deleted {
                members.remove(host);
            } else {
                members.insert(host.to_owned());
            }
            return None;
        }
        let below = key.strip_prefix(&self.root_prefix)?;
        if let Some(buried) = below.strip_prefix("tomb/") {
            // A tombstone's expiry says nothing new: its TTL is over.
            if deleted {
                return None;
            }
            let (tenant, rest) = buried.split_once('/')?;
            let (name, instance) = rest.split_once('/')?;
            let tombstone = match Tombstone::decode(kv.value()) {
                Ok(tombstone) => tombstone,
                Err(error) => {
                    tracing::debug!(key, %error, "tombstone in etcd cannot be read; ignored");
                    return None;
                }
            };
            return Some(Change::Buried {
                key: tenant::key(tenant, name).into_owned(),
                instance: instance.to_owned(),
                tombstone,
            });
        }
        if let Some(change) = record_change(
            below,
            kv.mod_revision(),
            (!deleted).then(|| kv.value().to_vec()),
        ) {
            return Some(change);
        }
        let (tenant, rest) = below.strip_prefix("t/")?.split_once('/')?;
        let (name, instance) = rest.strip_prefix("live/")?.split_once('/')?;
        let table_key = tenant::key(tenant, name).into_owned();
        if deleted {
            lock(&self.leases).remove(key);
            lock(&self.beats_shared).remove(&(table_key, instance.to_owned()));
            return None;
        }
        lock(&self.leases).insert(key.to_owned(), kv.lease());
        // `healthy`/`unhealthy` from a heartbeat; `check:<host>:<result>`
        // from a health check of the host named (`ok`, or why it failed),
        // which that host has applied already.
        let value = std::str::from_utf8(kv.value()).ok()?;
        if let Some(check) = value.strip_prefix("check:") {
            let (host, result) = check.split_once(':')?;
            if host == self.host_id {
                return None;
            }
            let ok = result == "ok";
            return Some(Change::Check {
                key: table_key,
                instance: instance.to_owned(),
                outcome: CheckOutcome {
                    at: std::time::SystemTime::now(),
                    ok,
                    error: (!ok).then(|| result.to_owned()),
                },
            });
        }
        Some(Change::Beat {
            key: table_key,
            instance: instance.to_owned(),
            healthy: value == "healthy",
        })
    }

    /// Records a heartbeat for `instance` of the service under table key
    /// `name` ([`tenant::key`]) where every host sees
    /// it. Skipped, as an error, while the watch is lost: the heartbeat
    /// then counts on this host only.
    ///
    /// Other hosts need a sign of life within every TTL, and a change of
    /// the status at once, not every heartbeat: a heartbeat with the
    /// status this host last shared for the instance less than a quarter
    /// of the TTL ago counts here only, which keeps the cost of a
    /// heartbeat on etcd that of one on the embedded store for all but a
    /// few of them.
    ///
    /// `Some` tombstone when the instance was removed after the record this
    /// host routes it from (its table is behind): nothing was shared, and
    /// the heartbeat is a late one for an instance that is gone.
    pub async fn beat(
        &self,
        name: &str,
        instance: &str,
        healthy: bool,
    ) -> Result<Option<Tombstone>, StoreError> {
        let key = (name.to_owned(), instance.to_owned());
        let now = tokio::time::Instant::now();
        if lock(&self.beats_shared)
            .get(&key)
            .is_some_and(|(at, shared)| *shared == healthy && now - *at < self.share_every)
        {
            return Ok(None);
        }
        let value = if healthy { "healthy" } else { "unhealthy" };
        let buried = self.signal(name, instance, value.to_owned()).await?;
        if buried.is_none() {
            lock(&self.beats_shared).insert(key, (now, healthy));
        }
        Ok(buried)
    }

    /// Records the outcome of this host's health check of `instance` of
    /// the service under table key `name` where every host sees it, and applies it as if it had made
    /// the check itself.
    pub async fn checked(
        &self,
        name: &str,
        instance: &str,
        outcome: &CheckOutcome,
    ) -> Result<(), StoreError> {
        let result = match &outcome.error {
            None if outcome.ok => "ok",
            None => "failed",
            Some(error) => error,
        };
        let value = format!("check:{}:{result}", self.host_id);
        if let Some(tombstone) = self.signal(name, instance, value).await? {
            tracing::debug!(service = %name, instance, removed = tombstone.reason.word(), "health check of a removed instance not shared");
        }
        Ok(())
    }

    /// Leaves a tombstone for each of instances `ids` of the service under
    /// table key `name`, on one lease of the heartbeat TTL, so every host
    /// learns of the removal and no liveness write made on a table from
    /// before it succeeds for one TTL. Called under the name's write lock,
    /// right after the record's write: a registration that brings an
    /// instance back writes a record newer than its tombstone.
    pub async fn bury(
        &self,
        name: &str,
        ids: &[String],
        tombstone: &Tombstone,
    ) -> Result<(), StoreError> {
        let (tenant, name) = tenant::split_key(name);
        let value = tombstone.encode();
        let lease = self
            .bounded(|| async { self.client.lease_client().grant(self.lease_ttl, None).await })
            .await?
            .id();
        let puts: Vec<TxnOp> = ids
            .iter()
            .map(|id| {
                TxnOp::put(
                    tomb_key(&self.root_prefix, tenant, name, id),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )
            })
            .collect();
        let txn = Txn::new().and_then(puts);
        self.bounded(|| async { self.client.kv_client().txn(txn.clone()).await })
            .await?;
        Ok(())
    }

    /// Renews the lease of `instance` of the service under table key
    /// `name` (or grants one) and puts its liveness key with `value`,
    /// unless the instance has a tombstone newer than the record this host
    /// applied for the name: then nothing is put and the tombstone is
    /// returned.
    async fn signal(
        &self,
        name: &str,
        instance: &str,
        value: String,
    ) -> Result<Option<Tombstone>, StoreError> {
        if self.is_stale() {
            return Err(unreachable(
                &self.endpoints,
                "the watch is not following etcd",
            ));
        }
        let (tenant, name) = tenant::split_key(name);
        let key = format!("{}t/{tenant}/live/{name}/{instance}", self.root_prefix);
        let tomb = tomb_key(&self.root_prefix, tenant, name, instance);
        let routed_from = lock(&self.seen)
            .get(&record_seen(tenant, name))
            .filter(|seen| seen.present)
            .map(|seen| seen.revision);
        let known = lock(&self.leases).get(&key).copied();
        let lease = self
            .bounded(|| async {
                let mut leases = self.client.lease_client();
                if let Some(id) = known {
                    let (mut keeper, mut answers) = leases.keep_alive(id).await?;
                    keeper.keep_alive().await?;
                    if answers
                        .message()
                        .await?
                        .is_some_and(|answer| answer.ttl() > 0)
                    {
                        return Ok(id);
                    }
                }
                Ok(leases.grant(self.lease_ttl, None).await?.id())
            })
            .await?;
        // No tombstone, or one older than the record routed from (the
        // instance was registered again since): an absent key's
        // `mod_revision` is 0.
        let put = TxnOp::put(
            key.as_bytes(),
            value.as_bytes(),
            Some(PutOptions::new().with_lease(lease)),
        );
        let txn = match routed_from {
            Some(revision) => Txn::new()
                .when([Compare::mod_revision(
                    tomb.as_bytes(),
                    CompareOp::Less,
                    revision,
                )])
                .and_then([put])
                .or_else([TxnOp::get(tomb.as_bytes(), None)]),
            None => Txn::new().and_then([put]),
        };
        let response = self
            .bounded(|| async { self.client.kv_client().txn(txn.clone()).await })
            .await?;
        if !response.succeeded() {
            let buried = response.op_responses().into_iter().find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(got) => got
                    .kvs()
                    .first()
                    .and_then(|kv| Tombstone::decode(kv.value()).ok()),
                _ => None,
            });
            // A tombstone that cannot be read still means removed.
            return Ok(Some(buried.unwrap_or_else(|| {
                Tombstone::now(super::tombstones::Removal::Deregistered)
            })));
        }
        lock(&self.leases).insert(key, lease);
        Ok(None)
    }

    /// Every key under `prefix`, and the revision of the read: read in
    /// pages of [`LIST_PAGE`] keys, all at the first page's revision, so
    /// no answer outgrows the client's message limit however large the
    /// registry grows.
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let mut end = prefix.as_bytes().to_vec();
        // Every prefix here ends in `/`: the range ends at `0`, the next byte.
        if let Some(last) = end.last_mut() {
            *last = last.saturating_add(1);
        }
        let mut kvs = Vec::new();
        let mut from = prefix.as_bytes().to_vec();
        let mut revision = None;
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if let Some(revision) = revision {
                options = options.with_revision(revision);
            }
            let mut response = self
                .bounded(|| {
                    let (from, options) = (from.clone(), options.clone());
                    async move { self.client.kv_client().get(from, Some(options)).await }
                })
                .await?;
            let read_at =
                *revision.get_or_insert(response.header().map_or(0, |header| header.revision()));
            let more = response.more();
            let page = response.take_kvs();
            match page.last() {
                Some(last) if more => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => {
                    kvs.extend(page);
                    return Ok((kvs, read_at));
                }
            }
            kvs.extend(page);
        }
    }

    /// `request`, within the etcd timeout; any failure is etcd being
    /// unreachable (a refusal of a request this host built is one too:
    /// nothing a client sent reaches etcd unchecked). A request etcd's
    /// client could not deliver, or that got no answer within one attempt's
    /// time (the member it picked is down, or has no leader yet), is sent
    /// again until the timeout, which is how the loss of one member of
    /// several goes unnoticed. Sending a
    /// write twice is safe: each compares revisions, so a repeat of one
    /// that was applied is refused as a conflict, never applied twice.
    async fn bounded<T, Request>(
        &self,
        mut request: impl FnMut() -> Request,
    ) -> Result<T, StoreError>
    where
        Request: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let error = match tokio::time::timeout_at(deadline, request()).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(error)) => error,
                Err(_) => {
                    return Err(unreachable(
                        &self.endpoints,
                        &format!("no answer within {:?}", self.timeout),
                    ));
                }
            };
            let undelivered = match &error {
                etcd_client::Error::GRpcStatus(status) => matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::Cancelled
                        | tonic::Code::DeadlineExceeded
                ),
                etcd_client::Error::TransportError(_) => true,
                _ => false,
            };
            if !undelivered || tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
                return Err(unreachable(&self.endpoints, &error.to_string()));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// Runs `request` to completion from blocking code: the registry's
    /// store calls run on the blocking pool, except the initial load made
    /// while the host starts, which `block_in_place` moves off its worker.
    fn blocking<T>(
        &self,
        request: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::task::block_in_place(|| self.runtime.block_on(request))
    }

    /// Writes (`Some`) or deletes (`None`) the record `seen` names (its
    /// key below the prefix) if it is still what this host last saw;
    /// records the write's revision as seen. A conflict names `name`.
    fn compare_and(
        &self,
        name: &str,
        seen: &str,
        value: Option<Vec<u8>>,
    ) -> Result<(), StoreError> {
        let key = format!("{}{seen}", self.root_prefix);
        let present = value.is_some();
        let operation = match value {
            Some(value) => TxnOp::put(key.as_bytes(), value, None),
            None => TxnOp::delete(key.as_bytes(), None),
        };
        let last = lock(&self.seen).get(seen).copied();
        let compare = match last {
            Some(Seen {
                revision,
                present: true,
            }) => Compare::mod_revision(key.as_bytes(), CompareOp::Equal, revision),
            _ => Compare::create_revision(key.as_bytes(), CompareOp::Equal, 0),
        };
        let txn = Txn::new().when([compare]).and_then([operation]);
        let response = self
            .blocking(self.bounded(|| async { self.client.kv_client().txn(txn.clone()).await }))?;
        if !response.succeeded() {
            return Err(StoreError::Conflict {
                name: name.to_owned(),
            });
        }
        let revision = response.header().map_or(0, |header| header.revision());
        lock(&self.seen).insert(seen.to_owned(), Seen { revision, present });
        Ok(())
    }
}

impl RecordStore for EtcdStore {
    fn load(&self) -> Result<Vec<Loaded>, StoreError> {
        let (kvs, revision) = self.blocking(self.list(&self.root_prefix))?;
        *lock(&self.listed) = revision;
        let mut loaded = Vec::new();
        for kv in &kvs {
            let change = self.change(kv, false);
            if let Some(buried @ Change::Buried { .. }) = change {
                lock(&self.buried_at_load).push(buried);
                continue;
            }
            if let Some(Change::Service {
                tenant,
                name,
                revision,
                value: Some(value),
            }) = change
            {
                self.accept(&record_seen(&tenant, &name), revision, true);
                let (service, checksummed) = decode(&value);
                loaded.push(Loaded {
                    tenant,
                    name,
                    service,
                    checksummed,
                });
            }
        }
        Ok(loaded)
    }

    fn put(&self, tenant: &str, service: &StoredService) -> Result<(), StoreError> {
        let name = service.name();
        self.compare_and(name, &record_seen(tenant, name), Some(encode(service)?))
    }

    fn delete(&self, tenant: &str, name: &str) -> Result<(), StoreError> {
        self.compare_and(name, &record_seen(tenant, name), None)
    }

    fn load_traffic(&self) -> Result<Vec<LoadedPolicy>, StoreError> {
        let prefix = format!("{}t/", self.root_prefix);
        let (kvs, _) = self.blocking(self.list(&prefix))?;
        let mut policies = Vec::new();
        for kv in &kvs {
            if let Some(Change::Policy {
                tenant,
                name,
                revision,
                value: Some(value),
            }) = self.change(kv, false)
            {
                self.accept(&policy_seen(&tenant, &name), revision, true);
                let policy = decode_policy(&value);
                policies.push((tenant, name, policy));
            }
        }
        Ok(policies)
    }

    fn put_traffic(
        &self,
        tenant: &str,
        name: &str,
        policy: &TrafficPolicy,
    ) -> Result<(), StoreError> {
        self.compare_and(
            name,
            &policy_seen(tenant, name),
            Some(encode_policy(policy)?),
        )
    }

    fn delete_traffic(&self, tenant: &str, name: &str) -> Result<(), StoreError> {
        self.compare_and(name, &policy_seen(tenant, name), None)
    }

    fn load_api_keys(&self) -> Result<Vec<LoadedApiKey>, StoreError> {
        let (kvs, _) = self.blocking(self.list(&self.keys_prefix))?;
        Ok(kvs
            .iter()
            .map(|kv| {
                let id = String::from_utf8_lossy(&kv.key()[self.keys_prefix.len()..]).into_owned();
                self.accept(&api_key_seen(&id), kv.mod_revision(), true);
                (id, decode_api_key(kv.value()))
            })
            .collect())
    }

    fn put_api_key(&self, key: &StoredApiKey) -> Result<(), StoreError> {
        let value = encode_api_key(key)?;
        let id = format!("{}{}", self.keys_prefix, key.id);
        let response = self.blocking(self.bounded(|| async {
            self.client
                .kv_client()
                .put(id.as_bytes(), value.clone(), None)
                .await
        }))?;
        let revision = response.header().map_or(0, |header| header.revision());
        self.accept(&api_key_seen(&key.id), revision, true);
        Ok(())
    }

    fn delete_api_key(&self, id: &str) -> Result<(), StoreError> {
        let key = format!("{}{id}", self.keys_prefix);
        let response = self.blocking(
            self.bounded(|| async { self.client.kv_client().delete(key.as_bytes(), None).await }),
        )?;
        let revision = response.header().map_or(0, |header| header.revision());
        self.accept(&api_key_seen(id), revision, false);
        Ok(())
    }

    fn describe(&self) -> String {
        format!("etcd at {}", self.endpoints)
    }
}

/// The host among `members` that checks the service under table key `key`
/// ([`tenant::key`]: the name in the default tenant, `<tenant>/<name>`
/// in another): the one ranking first for it (rendezvous hashing).
fn checker_of<'a>(members: &'a BTreeSet<String>, key: &str) -> Option<&'a str> {
    let rank = |host: &str| xxh3_64(format!("{host}/{key}").as_bytes());
    members
        .iter()
        .max_by_key(|host| rank(host))
        .map(String::as_str)
}

/// What the change of a record's key below the prefix (`rest`) at
/// `revision` to `value` (`None`: deleted) means, if it is a record: a
/// service's, a traffic policy's or an API key's.
fn record_change(rest: &str, revision: i64, value: Option<Vec<u8>>) -> Option<Change> {
    if let Some(id) = rest.strip_prefix("keys/") {
        return Some(Change::ApiKey {
            id: id.to_owned(),
            revision,
            value,
        });
    }
    let (tenant, rest) = rest.strip_prefix("t/")?.split_once('/')?;
    let (kind, name) = rest.split_once('/')?;
    // Keys below a service's (versions, instances) are not records.
    if name.contains('/') {
        return None;
    }
    let (tenant, name) = (tenant.to_owned(), name.to_owned());
    match kind {
        "s" => Some(Change::Service {
            tenant,
            name,
            revision,
            value,
        }),
        "p" => Some(Change::Policy {
            tenant,
            name,
            revision,
            value,
        }),
        _ => None,
    }
}

/// The tombstone key of instance `id` of `name` in `tenant`, under
/// `root_prefix` (`<prefix>/`).
fn tomb_key(root_prefix: &str, tenant: &str, name: &str, id: &str) -> String {
    format!("{root_prefix}tomb/{tenant}/{name}/{id}")
}

/// The key below the prefix of the record of `name` in `tenant`, which
/// its revisions are recorded under in what a host has seen.
pub fn record_seen(tenant: &str, name: &str) -> String {
    format!("t/{tenant}/s/{name}")
}

/// The key below the prefix of the traffic policy of `name` in `tenant`.
pub fn policy_seen(tenant: &str, name: &str) -> String {
    format!("t/{tenant}/p/{name}")
}

/// The key below the prefix of API key `id`.
pub fn api_key_seen(id: &str) -> String {
    format!("keys/{id}")
}

fn unreachable(endpoints: &str, reason: &str) -> StoreError {
    StoreError::Unreachable {
        store: format!("etcd at {endpoints}"),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_service_has_one_checker_and_a_host_leaving_moves_only_its_share() {
        let hosts = |ids: &[&str]| {
            ids.iter()
                .map(|id| (*id).to_owned())
                .collect::<BTreeSet<_>>()
        };
        let three = hosts(&["a", "b", "c"]);
        let two = hosts(&["a", "c"]);
        let names: Vec<String> = (0..300).map(|i| format!("svc-{i}")).collect();
        let mut share = HashMap::new();
        for name in &names {
            let checker = checker_of(&three, name).unwrap();
            *share.entry(checker).or_insert(0) += 1;
            let after = checker_of(&two, name).unwrap();
            if checker != "b" {
                assert_eq!(after, checker, "{name} stays where it was");
            }
        }
        // Spread over every host, roughly evenly.
        for host in ["a", "b", "c"] {
            let count = share.get(host).copied().unwrap_or(0);
            assert!((50..=150).contains(&count), "{host} checks {count} of 300");
        }
        assert_eq!(checker_of(&BTreeSet::new(), "svc"), None);
    }

    #[test]
    fn two_tenants_services_of_one_name_are_placed_independently() {
        let hosts: BTreeSet<String> = (0..8).map(|i| format!("host-{i}")).collect();
        // Over many names, a tenant's copy of a name lands on another host
        // than the default tenant's about 7 times in 8; checked by name
        // alone it would always land on the same one.
        let names: Vec<String> = (0..400).map(|i| format!("svc-{i}")).collect();
        let apart = names
            .iter()
            .filter(|name| {
                checker_of(&hosts, &tenant::key(tenant::DEFAULT, name))
                    != checker_of(&hosts, &tenant::key("acme", name))
            })
            .count();
        assert!((300..=390).contains(&apart), "{apart} of 400 names apart");
        // The same key always has the same checker.
        let key = tenant::key("acme", "svc-1");
        assert_eq!(checker_of(&hosts, &key), checker_of(&hosts, &key));
    }
}
