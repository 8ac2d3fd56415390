//! The registry's persistence: every accepted registration, in an embedded
//! crash-safe database (redb) in the data directory.
//!
//! A write returns only once it is durable (redb's default `Immediate`
//! durability: the commit is fsynced), so a registration answered 200/201
//! survives `kill -9` and a power cut. Liveness (heartbeats, checks) is not
//! stored: after a restart a service gets a fresh TTL and the health checks
//! take over. The calls block on disk I/O; async callers run them on the
//! blocking pool.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::remote::{InstanceAddr, RemoteSpec};

/// Service name -> JSON of a [`Record`].
const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("remote_services");

/// One registration as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredService {
    /// What it registered with.
    pub spec: RemoteSpec,
    /// Where its instances listen.
    pub instances: Vec<InstanceAddr>,
    /// When it first registered, milliseconds since the Unix epoch.
    pub registered_at_unix_ms: u64,
    /// The client address that registered it; absent in records written
    /// before owners were recorded.
    #[serde(default)]
    pub owner: Option<IpAddr>,
}

/// The stored encoding, tagged so a later format can be read beside this
/// one.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "format")]
enum Record {
    #[serde(rename = "1")]
    V1(StoredService),
}

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file cannot be opened or created (or another host has it open).
    #[error("registry database {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What redb said.
        source: redb::DatabaseError,
    },
    /// A read or a write failed.
    #[error("registry database: {0}")]
    Database(#[from] redb::Error),
    /// A record could not be encoded.
    #[error("registry record: {0}")]
    Encode(#[from] serde_json::Error),
}

/// One stored record as read back.
#[derive(Debug)]
pub struct Loaded {
    /// Its key.
    pub name: String,
    /// The record, or why it cannot be read.
    pub service: Result<StoredService, serde_json::Error>,
}

/// The open database.
#[derive(Debug)]
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) the database at `path`. redb recovers from an
    /// interrupted write by itself on open.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        // Create the table up front so that reads never meet a missing one.
        let write = db.begin_write().map_err(redb::Error::from)?;
        write.open_table(SERVICES).map_err(redb::Error::from)?;
        write.commit().map_err(redb::Error::from)?;
        Ok(Self { db })
    }

    /// Every stored registration.
    pub fn load(&self) -> Result<Vec<Loaded>, StoreError> {
        let read = self.db.begin_read().map_err(redb::Error::from)?;
        let table = read.open_table(SERVICES).map_err(redb::Error::from)?;
        let mut loaded = Vec::new();
        for entry in table.iter().map_err(redb::Error::from)? {
            let (name, value) = entry.map_err(redb::Error::from)?;
            loaded.push(Loaded {
                name: name.value().to_owned(),
                service: serde_json::from_slice::<Record>(value.value())
                    .map(|Record::V1(service)| service),
            });
        }
        Ok(loaded)
    }

    /// Stores `service` under its name, replacing what was there; durable
    /// when it returns.
    pub fn put(&self, service: &StoredService) -> Result<(), StoreError> {
        let name = service.spec.info.name.as_str();
        let encoded = serde_json::to_vec(&Record::V1(service.clone()))?;
        let write = self.db.begin_write().map_err(redb::Error::from)?;
        {
            let mut table = write.open_table(SERVICES).map_err(redb::Error::from)?;
            table
                .insert(name, encoded.as_slice())
                .map_err(redb::Error::from)?;
        }
        write.commit().map_err(redb::Error::from)?;
        Ok(())
    }

    /// Removes the registration of `name`; durable when it returns.
    pub fn delete(&self, name: &str) -> Result<(), StoreError> {
        let write = self.db.begin_write().map_err(redb::Error::from)?;
        {
            let mut table = write.open_table(SERVICES).map_err(redb::Error::from)?;
            table.remove(name).map_err(redb::Error::from)?;
        }
        write.commit().map_err(redb::Error::from)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::ServiceInfo;

    fn service(name: &str, port: u16) -> StoredService {
        StoredService {
            spec: RemoteSpec {
                info: ServiceInfo {
                    name: name.to_owned(),
                    display_name: name.to_owned(),
                    description: String::new(),
                    version: "1".to_owned(),
                    health_check_url: "/health".to_owned(),
                    metadata: Default::default(),
                    tags: vec!["t".to_owned()],
                    requires_auth: false,
                    endpoints: Vec::new(),
                },
                base_path: "/".to_owned(),
            },
            instances: vec![InstanceAddr {
                host: "localhost".to_owned(),
                port,
            }],
            registered_at_unix_ms: 1,
            owner: Some(IpAddr::from([127, 0, 0, 1])),
        }
    }

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        {
            let store = Store::open(&path).unwrap();
            store.put(&service("a", 1)).unwrap();
            store.put(&service("b", 2)).unwrap();
            store.put(&service("a", 3)).unwrap();
            store.delete("b").unwrap();
            store.delete("never-there").unwrap();
        }
        let store = Store::open(&path).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].name, "a");
        assert_eq!(loaded[0].service.as_ref().unwrap(), &service("a", 3));
    }
}
