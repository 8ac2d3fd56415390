//! Tombstones: which instances of which names were removed (deregistered
//! or evicted), and when, kept one heartbeat TTL.
//!
//! They serve two purposes (see `docs/CLUSTER.md`):
//! - **Saying why.** A heartbeat for a service that is gone is answered
//!   `404` as before (the guide's client ignores the answer; a client that
//!   reads it learns to register again), and for one TTL the answer says
//!   whether it was deregistered or evicted, and when.
//! - **No resurrection through a stale table (etcd).** A host that has not
//!   yet applied a removal another host made still routes the instance and
//!   would share its heartbeats (and health checks) through etcd. The
//!   tombstone is written under `<prefix>/tomb/<tenant>/<name>/<id>` on a
//!   lease of one TTL, and a liveness write is a transaction that succeeds
//!   only while no tombstone is newer than the record the host routes from
//!   ([`super::etcd::EtcdStore::beat`]): a late heartbeat is answered
//!   `404` and refreshes nothing, while an instance registered again (a
//!   newer record) is not held back by its old tombstone.
//!
//! Every host keeps the tombstones it made or saw in etcd's watch (a
//! re-listing after a lost watch sends them again) in memory. With the
//! embedded store there is one host, whose table is never stale, so only
//! the first purpose applies and the tombstones are not stored: they
//! explain a `404` for one TTL, which a restart need not keep.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::sync::lock;

/// Why an instance was removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Removal {
    /// Its owner (or the admin) deregistered it.
    Deregistered,
    /// It was silent for the eviction grace period.
    Evicted,
}

impl Removal {
    /// The word answers and logs use.
    pub fn word(self) -> &'static str {
        match self {
            Removal::Deregistered => "deregistered",
            Removal::Evicted => "evicted",
        }
    }
}

/// One instance's removal: the value of its tombstone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Why.
    pub reason: Removal,
}

impl Tombstone {
    /// A removal for `reason` now.
    pub fn now(reason: Removal) -> Self {
        Self {
            at_ms: now_ms(),
            reason,
        }
    }

    /// The tombstone's stored value (JSON).
    #[cfg(feature = "etcd")]
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A stored value read back, or why it cannot be.
    #[cfg(feature = "etcd")]
    pub fn decode(value: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(value)
    }

    fn expired(&self, now_ms: u64, keep_ms: u64) -> bool {
        now_ms.saturating_sub(self.at_ms) > keep_ms
    }
}

/// The tombstones this host knows, per service table key
/// ([`crate::tenant::key`]), each kept one TTL. Expired ones are pruned by
/// a burial at most every quarter TTL, so a mass deregistration does not
/// scan them all once per removal, and they never outgrow the removals of
/// one and a quarter TTL.
#[derive(Debug)]
pub struct Tombstones {
    keep: Duration,
    buried: Mutex<Buried>,
}

#[derive(Debug, Default)]
struct Buried {
    by_key: HashMap<String, Vec<(String, Tombstone)>>,
    next_prune_ms: u64,
}

impl Tombstones {
    /// Tombstones kept for `keep` (the heartbeat TTL).
    pub fn new(keep: Duration) -> Self {
        Self {
            keep,
            buried: Mutex::default(),
        }
    }

    /// Records the removal of instances `ids` of the service under table
    /// key `key`, replacing an older tombstone of the same instance, and
    /// forgets the expired ones.
    pub fn bury(&self, key: &str, ids: &[String], tombstone: Tombstone) {
        let now_ms = now_ms();
        let keep_ms = u64::try_from(self.keep.as_millis()).unwrap_or(u64::MAX);
        let mut state = lock(&self.buried);
        if now_ms >= state.next_prune_ms {
            state.by_key.retain(|_, buried| {
                buried.retain(|(_, old)| !old.expired(now_ms, keep_ms));
                !buried.is_empty()
            });
            state.next_prune_ms = now_ms.saturating_add(keep_ms / 4);
        }
        if tombstone.expired(now_ms, keep_ms) {
            return;
        }
        let buried = state.by_key.entry(key.to_owned()).or_default();
        for id in ids {
            match buried.iter_mut().find(|(held, _)| held == id) {
                Some((_, old)) if old.at_ms <= tombstone.at_ms => *old = tombstone,
                Some(_) => {}
                None => buried.push((id.clone(), tombstone)),
            }
        }
    }

    /// The latest removal of an instance of the service under table key
    /// `key` within the last TTL, and the instances it removed then.
    pub fn latest(&self, key: &str) -> Option<(Tombstone, Vec<String>)> {
        let now_ms = now_ms();
        let keep_ms = u64::try_from(self.keep.as_millis()).unwrap_or(u64::MAX);
        let state = lock(&self.buried);
        let live = || {
            state
                .by_key
                .get(key)
                .into_iter()
                .flatten()
                .filter(|(_, tombstone)| !tombstone.expired(now_ms, keep_ms))
        };
        let (_, latest) = live().max_by_key(|(_, tombstone)| tombstone.at_ms)?;
        let ids = live()
            .filter(|(_, tombstone)| tombstone == latest)
            .map(|(id, _)| id.clone())
            .collect();
        Some((*latest, ids))
    }

    /// How many instances have a tombstone now, expired ones included
    /// until the next pruning.
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.buried).by_key.values().map(Vec::len).sum()
    }
}

/// Milliseconds since the Unix epoch, now.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_removal_is_told_and_old_ones_are_forgotten() {
        let tombstones = Tombstones::new(Duration::from_secs(30));
        let now = Tombstone::now(Removal::Evicted);
        let old = Tombstone {
            at_ms: now.at_ms - 60_000,
            reason: Removal::Deregistered,
        };
        tombstones.bury("svc", &["a:1".to_owned()], old);
        assert_eq!(tombstones.latest("svc"), None, "older than the TTL");
        tombstones.bury("svc", &["a:1".to_owned(), "a:2".to_owned()], now);
        tombstones.bury("acme/svc", &["a:3".to_owned()], old);
        let (latest, ids) = tombstones.latest("svc").unwrap();
        assert_eq!(latest, now);
        assert_eq!(ids, ["a:1", "a:2"]);
        assert_eq!(tombstones.latest("acme/svc"), None);
        assert_eq!(tombstones.len(), 2, "expired ones never buried");
        #[cfg(feature = "etcd")]
        assert_eq!(Tombstone::decode(&now.encode()).unwrap(), now);
    }
}
