//! The registry's persistence: every accepted registration, in an embedded
//! crash-safe database (redb) in the data directory: one record per
//! service name in a tenant, keyed `t/<tenant>/s/<name>` (the registry
//! model's schema; a record under the bare name, written before tenants,
//! is the default tenant's and moves to its key at its next write),
//! holding its versions and their instances (format `"2"`;
//! the single-version records of format `"1"` that earlier releases wrote
//! are read as a name of one version, and rewritten in the new format at
//! the name's next write), and the names' traffic policies, one record per
//! name in a table of their own.
//! [`RecordStore`] is what the registry asks of a store: [`Store`] is the
//! embedded one; with the `etcd` feature, an etcd cluster shared by
//! several hosts is the other. The record encodings below ([`encode`],
//! [`decode`], [`encode_policy`], [`decode_policy`], [`encode_api_key`],
//! [`decode_api_key`]) are both stores'.
//!
//! A write returns only once it is durable (redb's default `Immediate`
//! durability: the commit is fsynced), so a registration answered 200/201
//! survives `kill -9` and a power cut. Liveness (heartbeats, checks) is not
//! stored: after a restart a service gets a fresh TTL and the health checks
//! take over. The calls block on disk I/O; async callers run them on the
//! blocking pool.
//!
//! **Writes are committed in groups.** Every put and delete goes to one
//! committer thread, which takes the first write waiting, waits for the
//! database's write transaction, then adds every write that queued
//! meanwhile (while the previous commit was being fsynced) to the same
//! transaction and commits it: one fsync for the whole group, so
//! concurrent registrations are no longer bounded by one fsync each. Each
//! caller is answered only once its group is committed; a group that fails
//! is not applied at all, and every caller in it gets the error (each
//! write is one record, so none is ever half-applied). Writes are applied
//! in the order they were made; the registry never has two writes of one
//! name in flight.
//!
//! **A damaged file is refused, never replaced.** Only a missing file means
//! "new registry": an existing file is opened, never re-initialised, so a
//! 0-byte (truncated) file is refused instead of silently becoming an empty
//! registry. The open verifies every page's checksum (redb's integrity
//! check), so a file altered outside redb fails with an error rather than
//! being trusted. redb may still panic on a file it cannot make sense of;
//! a panic is a Rust panic in this process, so the open and the first full
//! read run under `catch_unwind` and a panic there becomes
//! [`StoreError::Damaged`] as well. The error names the file and how to
//! recover; the host does not start over a damaged registry.
//!
//! **Every record carries a checksum.** A value is the line
//! `xxh3=<16 hex digits>\n` followed by the record's JSON; the checksum is
//! xxh3-64 of the JSON bytes. It catches a value edited or damaged in a way
//! redb's page checksums cannot see (a value rewritten through redb itself,
//! or a future store whose pages carry no checksum). A record that fails it
//! is reported as [`RecordError::Checksum`]: the registry logs it naming the
//! service and does not route it, but keeps it in the database, exactly like
//! a record it cannot decode. One bad record does not refuse the start,
//! because the registry's other services are still sound and a refusal
//! would take them all offline; the service's owner recovers by
//! registering again, which overwrites the record.
//!
//! Records written before checksums (a bare JSON value, starting with `{`)
//! are still read, reported as unchecked, and get a checksum at their next
//! write (a registration or update). They are not rewritten at start-up:
//! the host then never writes what no client asked it to, and a host of the
//! previous version can still read a database this one only opened.

use std::cell::Cell;
use std::net::IpAddr;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once, mpsc};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::remote::{InstanceAddr, RemoteSpec};
use crate::tenant;
use crate::traffic::TrafficPolicy;

/// `t/<tenant>/s/<name>` (or, written before tenants, the bare name: the
/// default tenant's) -> the checksum line and the JSON of a [`Record`].
const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("remote_services");

/// `t/<tenant>/s/<name>` (or the bare name, as for [`SERVICES`]) -> the
/// checksum line and the JSON of its [`TrafficPolicy`]: kept apart from the registrations, since plugin names
/// have policies too, and a policy outlives the versions it names.
const TRAFFIC: TableDefinition<&str, &[u8]> = TableDefinition::new("traffic_policies");

/// API key id -> the checksum line and the JSON of a [`StoredApiKey`]:
/// the keys added through the admin API, as digests.
const API_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("api_keys");

/// What starts a value's checksum line.
const CHECKSUM_PREFIX: &[u8] = b"xxh3=";

/// Most writes committed in one transaction: bounds the time one group
/// holds the writer, and what a failed group takes down with it.
const MAX_GROUP: usize = 1024;

/// How to recover from a damaged database, for the error message.
const RECOVERY: &str = "move it aside to start with an empty registry, or restore it from a backup";

/// One service name's registrations as stored: every version with its
/// instances, in one record under the name, so a change of membership or
/// of versions is one atomic write. (The registry model's per-instance
/// keys, `.../s/<name>/v/<version>/i/<instance-id>`, would split it; an
/// instance record here is already what such a key will hold.)
///
/// Format `"2"`. A record of format `"1"` (one version, written by the
/// releases before versions) is read as a service of that one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredService {
    /// Its versions; never empty.
    pub versions: Vec<StoredVersion>,
}

impl StoredService {
    /// Whether the record is one a registration of `name` writes: at least
    /// one version, every one declaring `name`. One filed under another
    /// name is never routed.
    pub fn is_filed_as(&self, name: &str) -> bool {
        !self.versions.is_empty()
            && self
                .versions
                .iter()
                .all(|version| version.spec.info.name == name)
    }

    /// The service's name (its versions all declare it).
    pub fn name(&self) -> &str {
        self.versions
            .first()
            .map_or("", |version| version.spec.info.name.as_str())
    }
}

/// One version of a service as stored: what it registered with and its
/// instances (exactly a format `"1"` record's fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredVersion {
    /// What it registered with.
    pub spec: RemoteSpec,
    /// Its instances. Records written before several instances per service
    /// hold one, without an owner of its own: it is the record's `owner`.
    pub instances: Vec<StoredInstance>,
    /// When it first registered, milliseconds since the Unix epoch.
    pub registered_at_unix_ms: u64,
    /// The client address that registered its first instance; absent in
    /// records written before owners were recorded. Kept so that an older
    /// release reading this record still knows an owner.
    #[serde(default)]
    pub owner: Option<IpAddr>,
    /// The id of the registry token that registered it; absent when the
    /// registry had no tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_token: Option<String>,
}

/// One instance as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredInstance {
    /// Where it listens (`host`, `port`).
    #[serde(flatten)]
    pub addr: InstanceAddr,
    /// The client address that registered it; absent in records written
    /// before several instances per service, whose owner is the record's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<IpAddr>,
    /// When it registered, milliseconds since the Unix epoch; absent in
    /// older records (the service's time then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_at_unix_ms: Option<u64>,
}

impl StoredVersion {
    /// The owner of `instance`: its own, or for a record written before
    /// instances had one, the record's.
    pub fn owner_of(&self, instance: &StoredInstance) -> Option<IpAddr> {
        instance.owner.or(self.owner)
    }
}

/// An API key added through the admin API: its digest, never the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredApiKey {
    /// The key's id.
    pub id: String,
    /// Hex SHA-256 of the key.
    pub sha256: String,
    /// Services it may reach; `None`: every service.
    pub services: Option<Vec<String>>,
    /// The tenant it names; absent in keys stored before tenants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// One stored API key as read back: its id, and the key or why it is not
/// used.
pub type LoadedApiKey = (String, Result<StoredApiKey, RecordError>);

/// One stored traffic policy as read back: its tenant, its service name,
/// and the policy or why it is not used.
pub type LoadedPolicy = (String, String, Result<TrafficPolicy, RecordError>);

/// The stored encoding, tagged so a later format can be read beside this
/// one.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "format")]
enum Record {
    #[serde(rename = "1")]
    V1(Box<StoredVersion>),
    #[serde(rename = "2")]
    V2(StoredService),
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
    /// The file exists but is not a sound database.
    #[error("registry database {path} is damaged: {problem}; {RECOVERY}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The file's size cannot be read.
    #[error("registry database {path}: {source}")]
    Inspect {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A read or a write failed.
    #[error("registry database: {0}")]
    Database(#[from] redb::Error),
    /// A record could not be encoded.
    #[error("registry record: {0}")]
    Encode(#[from] serde_json::Error),
    /// The group of writes this one was committed with failed: what
    /// failed it (every write of the group gets the same error).
    #[error(transparent)]
    Group(Arc<StoreError>),
    /// The committer thread is gone (it panicked on the database, or the
    /// store is being closed).
    #[error("registry database committer: {0}")]
    Committer(String),
    /// A store on the network (etcd) did not answer: nothing changed.
    #[error("the registry store ({store}) is unreachable: {reason}")]
    Unreachable {
        /// Which store, and where (`etcd at http://...`).
        store: String,
        /// What the client said.
        reason: String,
    },
    /// The record changed in the store since this host last read it
    /// (another host wrote it): nothing changed.
    #[error(
        "service `{name}` was changed by another host since this host read it; send the request again"
    )]
    Conflict {
        /// The service.
        name: String,
    },
}

/// What the registry asks of its store. Every call blocks until the store
/// answered (async callers run them on the blocking pool), and a write
/// returns only once it is durable.
pub trait RecordStore: std::fmt::Debug + Send + Sync {
    /// Every stored registration, with its tenant and name.
    fn load(&self) -> Result<Vec<Loaded>, StoreError>;
    /// Stores `service` under its tenant and name, replacing what was
    /// there.
    fn put(&self, tenant: &str, service: &StoredService) -> Result<(), StoreError>;
    /// Removes the registration of `name` in `tenant`.
    fn delete(&self, tenant: &str, name: &str) -> Result<(), StoreError>;
    /// Every stored traffic policy, by tenant and service name, or why
    /// one cannot be used.
    fn load_traffic(&self) -> Result<Vec<LoadedPolicy>, StoreError>;
    /// Stores the traffic policy of `name` in `tenant`, replacing what was
    /// there.
    fn put_traffic(
        &self,
        tenant: &str,
        name: &str,
        policy: &TrafficPolicy,
    ) -> Result<(), StoreError>;
    /// Removes the traffic policy of `name` in `tenant`.
    fn delete_traffic(&self, tenant: &str, name: &str) -> Result<(), StoreError>;
    /// Every API key added through the admin API, by id, or why one cannot
    /// be used.
    fn load_api_keys(&self) -> Result<Vec<LoadedApiKey>, StoreError>;
    /// Stores `key` under its id, replacing what was there.
    fn put_api_key(&self, key: &StoredApiKey) -> Result<(), StoreError>;
    /// Removes the API key `id`.
    fn delete_api_key(&self, id: &str) -> Result<(), StoreError>;
    /// Where the records are, for log lines (`registry.redb` path, etcd
    /// endpoints).
    fn describe(&self) -> String;
}

/// Why one stored record is not used.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The record's bytes do not match the checksum stored with them.
    #[error(
        "record fails its checksum (stored xxh3 {stored:016x}, computed {computed:016x}): it was edited or damaged"
    )]
    Checksum {
        /// The checksum stored with the record.
        stored: u64,
        /// The checksum of the bytes read.
        computed: u64,
    },
    /// The checksum line is not `xxh3=<16 hex digits>`.
    #[error("record has a malformed checksum line")]
    ChecksumLine,
    /// The record is not a registration this host can read.
    #[error("record cannot be decoded: {0}")]
    Decode(#[from] serde_json::Error),
}

/// One stored record as read back.
#[derive(Debug)]
pub struct Loaded {
    /// The tenant it belongs to: the default tenant for a record written
    /// before tenants (keyed by its bare name).
    pub tenant: String,
    /// Its service name.
    pub name: String,
    /// The record, or why it is not used.
    pub service: Result<StoredService, RecordError>,
    /// Whether it carried a checksum (records written before checksums do
    /// not, until their next write).
    pub checksummed: bool,
}

/// The open database.
#[derive(Debug)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
    /// Where writes go to be committed; `None` once closing.
    writes: Option<Sender<Job>>,
    /// The committer thread, joined when the store is dropped so that the
    /// file is closed (and can be opened again) once `drop` returns.
    committer: Option<JoinHandle<()>>,
}

/// Which table a write goes to.
#[derive(Debug, Clone, Copy)]
enum Table {
    Services,
    Traffic,
    ApiKeys,
}

/// One change of one record.
#[derive(Debug)]
enum Write {
    Insert {
        table: Table,
        key: String,
        value: Vec<u8>,
    },
    Remove {
        table: Table,
        key: String,
    },
    /// A record written (`value`) or removed (`None`) under its tenant key,
    /// with the record of the same name written before tenants (`legacy`,
    /// under the bare name) removed with it.
    Keyed {
        table: Table,
        key: String,
        value: Option<Vec<u8>>,
        legacy: Option<String>,
    },
    /// Fails its group, as a failing disk would.
    #[cfg(test)]
    Fail,
}

/// What a write is answered: the sequence number of the commit that made
/// it durable, or why its group failed.
type Committed = Result<u64, Arc<StoreError>>;

/// A write waiting for the committer, and where to answer it.
#[derive(Debug)]
struct Job {
    write: Write,
    done: mpsc::Sender<Committed>,
}

impl Store {
    /// Opens the database at `path`, or creates it if there is no file.
    /// redb recovers from an interrupted write by itself on open; a file
    /// that is damaged otherwise is refused with [`StoreError::Damaged`].
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let exists = match std::fs::metadata(path) {
            Ok(metadata) if metadata.len() == 0 => {
                return Err(damaged(
                    path,
                    "the file is empty (0 bytes), so every registration it held is gone",
                ));
            }
            Ok(_) => true,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => false,
            Err(source) => {
                return Err(StoreError::Inspect {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let opened = catching_panics(|| {
            let mut builder = Database::builder();
            builder.set_check_integrity_on_open(true);
            // `create` would initialise an empty file as a new database:
            // an existing file must be opened, so damage is not papered
            // over.
            let db = if exists {
                builder.open(path)
            } else {
                builder.create(path)
            };
            let db = db.map_err(|source| open_error(path, source))?;
            // Create the table up front so that reads never meet a missing
            // one.
            let write = db.begin_write().map_err(redb::Error::from)?;
            write.open_table(SERVICES).map_err(redb::Error::from)?;
            write.open_table(API_KEYS).map_err(redb::Error::from)?;
            write.open_table(TRAFFIC).map_err(redb::Error::from)?;
            write.commit().map_err(redb::Error::from)?;
            Ok(db)
        });
        let db = Arc::new(
            opened
                .map_err(|panic| {
                    damaged(path, &format!("the database engine failed on it ({panic})"))
                })?
                .map_err(|error| classify(path, error))?,
        );
        let (writes, queue) = crossbeam_channel::unbounded();
        let committer = std::thread::Builder::new()
            .name("registry-commit".to_owned())
            .spawn({
                let db = db.clone();
                move || commit_groups(&db, &queue)
            })
            .map_err(|error| StoreError::Committer(format!("cannot start its thread: {error}")))?;
        Ok(Self {
            db,
            path: path.to_owned(),
            writes: Some(writes),
            committer: Some(committer),
        })
    }

    /// Every stored registration.
    pub fn load(&self) -> Result<Vec<Loaded>, StoreError> {
        catching_panics(|| self.read_all())
            .map_err(|panic| {
                damaged(
                    &self.path,
                    &format!("the database engine failed reading it ({panic})"),
                )
            })?
            .map_err(|error| classify(&self.path, error))
    }

    fn read_all(&self) -> Result<Vec<Loaded>, StoreError> {
        let read = self.db.begin_read().map_err(redb::Error::from)?;
        let table = read.open_table(SERVICES).map_err(redb::Error::from)?;
        let mut loaded = Vec::new();
        for entry in table.iter().map_err(redb::Error::from)? {
            let (key, value) = entry.map_err(redb::Error::from)?;
            let (service, checksummed) = decode(value.value());
            let (tenant, name) = tenant_and_name(key.value());
            loaded.push(Loaded {
                tenant: tenant.to_owned(),
                name: name.to_owned(),
                service,
                checksummed,
            });
        }
        Ok(loaded)
    }

    /// Stores `service` under its tenant and name, replacing what was
    /// there (a default-tenant record written before tenants, under the
    /// bare name, is removed in the same transaction: migrated); durable
    /// when it returns.
    pub fn put(&self, tenant: &str, service: &StoredService) -> Result<(), StoreError> {
        self.put_keyed(
            Table::Services,
            tenant,
            service.name(),
            Some(encode(service)?),
        )
    }

    /// Writes `value` (or with `None` removes the record) of `name` in
    /// `tenant` under its key `t/<tenant>/s/<name>`, and removes a
    /// default-tenant record under the bare name (written before tenants)
    /// in the same transaction: migrated, never left to shadow the new
    /// one. Durable when it returns.
    fn put_keyed(
        &self,
        table: Table,
        tenant: &str,
        name: &str,
        value: Option<Vec<u8>>,
    ) -> Result<(), StoreError> {
        self.write(Write::Keyed {
            table,
            key: record_key(tenant, name),
            value,
            legacy: tenant::is_default(tenant).then(|| name.to_owned()),
        })
        .map(drop)
    }

    /// Every stored traffic policy, by service name, or why one cannot be
    /// used.
    pub fn load_traffic(&self) -> Result<Vec<LoadedPolicy>, StoreError> {
        let read = self.db.begin_read().map_err(redb::Error::from)?;
        let table = read.open_table(TRAFFIC).map_err(redb::Error::from)?;
        let mut policies = Vec::new();
        for entry in table.iter().map_err(redb::Error::from)? {
            let (key, value) = entry.map_err(redb::Error::from)?;
            let (tenant, name) = tenant_and_name(key.value());
            policies.push((
                tenant.to_owned(),
                name.to_owned(),
                decode_policy(value.value()),
            ));
        }
        Ok(policies)
    }

    /// Stores the traffic policy of `name` in `tenant`, replacing what was
    /// there; durable when it returns.
    pub fn put_traffic(
        &self,
        tenant: &str,
        name: &str,
        policy: &TrafficPolicy,
    ) -> Result<(), StoreError> {
        self.put_keyed(Table::Traffic, tenant, name, Some(encode_policy(policy)?))
    }

    /// Removes the traffic policy of `name` in `tenant`; durable when it
    /// returns.
    pub fn delete_traffic(&self, tenant: &str, name: &str) -> Result<(), StoreError> {
        self.put_keyed(Table::Traffic, tenant, name, None)
    }

    /// Removes the registration of `name` in `tenant` (in the default
    /// tenant, under either key); durable when it returns.
    pub fn delete(&self, tenant: &str, name: &str) -> Result<(), StoreError> {
        self.put_keyed(Table::Services, tenant, name, None)
    }

    /// Every API key added through the admin API, by id, or why one cannot
    /// be used.
    pub fn load_api_keys(&self) -> Result<Vec<LoadedApiKey>, StoreError> {
        let read = self.db.begin_read().map_err(redb::Error::from)?;
        let table = read.open_table(API_KEYS).map_err(redb::Error::from)?;
        let mut keys = Vec::new();
        for entry in table.iter().map_err(redb::Error::from)? {
            let (id, value) = entry.map_err(redb::Error::from)?;
            keys.push((id.value().to_owned(), decode_api_key(value.value())));
        }
        Ok(keys)
    }

    /// Stores `key` under its id, replacing what was there; durable when it
    /// returns.
    pub fn put_api_key(&self, key: &StoredApiKey) -> Result<(), StoreError> {
        self.insert(Table::ApiKeys, &key.id, encode_api_key(key)?)
    }

    /// Removes the API key `id`; durable when it returns.
    pub fn delete_api_key(&self, id: &str) -> Result<(), StoreError> {
        self.remove(Table::ApiKeys, id)
    }

    fn insert(&self, table: Table, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.write(Write::Insert {
            table,
            key: key.to_owned(),
            value,
        })
        .map(drop)
    }

    fn remove(&self, table: Table, key: &str) -> Result<(), StoreError> {
        self.write(Write::Remove {
            table,
            key: key.to_owned(),
        })
        .map(drop)
    }

    /// Hands `write` to the committer and waits until its group is
    /// durable; answers the commit's sequence number.
    fn write(&self, write: Write) -> Result<u64, StoreError> {
        let answer = self.submit(write)?;
        match answer.recv() {
            Ok(committed) => committed.map_err(StoreError::Group),
            Err(mpsc::RecvError) => Err(StoreError::Committer(
                "it stopped before committing this write".to_owned(),
            )),
        }
    }

    /// Queues `write` for the committer; its answer comes on the receiver.
    fn submit(&self, write: Write) -> Result<mpsc::Receiver<Committed>, StoreError> {
        let (done, answer) = mpsc::channel();
        self.writes
            .as_ref()
            .and_then(|writes| writes.send(Job { write, done }).ok())
            .ok_or_else(|| StoreError::Committer("it has stopped".to_owned()))?;
        Ok(answer)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // The committer ends once the queue is closed and empty: every
        // write made before this drop is committed first.
        drop(self.writes.take());
        if let Some(committer) = self.committer.take() {
            let _ = committer.join();
        }
    }
}

/// The committer thread: commits the queued writes in groups until the
/// queue is closed. A panic of the database engine fails its group (its
/// callers get the error) instead of ending the thread.
fn commit_groups(db: &Database, queue: &Receiver<Job>) {
    let mut commits: u64 = 0;
    while let Ok(first) = queue.recv() {
        let mut group = vec![first];
        let outcome = catching_panics(|| {
            // The write transaction may have to wait for the previous one;
            // whatever queued meanwhile joins this group.
            let transaction = db.begin_write().map_err(redb::Error::from)?;
            group.extend(queue.try_iter().take(MAX_GROUP - 1));
            apply(transaction, &group)
        });
        let outcome = match outcome {
            Ok(Ok(())) => {
                commits += 1;
                Ok(commits)
            }
            Ok(Err(error)) => Err(Arc::new(StoreError::from(error))),
            Err(panic) => Err(Arc::new(StoreError::Committer(format!(
                "the database engine failed committing ({panic})"
            )))),
        };
        if let Err(error) = &outcome {
            tracing::error!(writes = group.len(), %error, "registry database commit failed; none of its writes were applied");
        }
        for job in group {
            // A caller that is gone needs no answer.
            let _ = job.done.send(outcome.clone());
        }
    }
}

/// Applies `group` in `transaction` and commits it, or aborts it whole.
fn apply(transaction: WriteTransaction, group: &[Job]) -> Result<(), redb::Error> {
    let applied = (|| {
        let mut services = transaction.open_table(SERVICES)?;
        let mut traffic = transaction.open_table(TRAFFIC)?;
        let mut api_keys = transaction.open_table(API_KEYS)?;
        for job in group {
            match &job.write {
                Write::Insert { table, key, value } => {
                    let table = match table {
                        Table::Services => &mut services,
                        Table::Traffic => &mut traffic,
                        Table::ApiKeys => &mut api_keys,
                    };
                    table.insert(key.as_str(), value.as_slice())?;
                }
                Write::Remove { table, key } => {
                    let table = match table {
                        Table::Services => &mut services,
                        Table::Traffic => &mut traffic,
                        Table::ApiKeys => &mut api_keys,
                    };
                    table.remove(key.as_str())?;
                }
                Write::Keyed {
                    table,
                    key,
                    value,
                    legacy,
                } => {
                    let table = match table {
                        Table::Services => &mut services,
                        Table::Traffic => &mut traffic,
                        Table::ApiKeys => &mut api_keys,
                    };
                    match value {
                        Some(value) => table.insert(key.as_str(), value.as_slice()).map(drop)?,
                        None => table.remove(key.as_str()).map(drop)?,
                    }
                    if let Some(legacy) = legacy {
                        table.remove(legacy.as_str())?;
                    }
                }
                #[cfg(test)]
                Write::Fail => {
                    return Err(redb::Error::Corrupted("a write made to fail".to_owned()));
                }
            }
        }
        Ok::<(), redb::Error>(())
    })();
    match applied {
        Ok(()) => Ok(transaction.commit()?),
        Err(error) => {
            // Nothing of the group is applied; an abort that fails too
            // changes nothing either.
            let _ = transaction.abort();
            Err(error)
        }
    }
}

/// The key of the registration of `name` in `tenant`: the registry model's
/// `t/<tenant>/s/<name>`.
fn record_key(tenant: &str, name: &str) -> String {
    format!("t/{tenant}/s/{name}")
}

/// The tenant and name a record key names; a bare name (a record written
/// before tenants) is the default tenant's.
fn tenant_and_name(key: &str) -> (&str, &str) {
    key.strip_prefix("t/")
        .and_then(|rest| rest.split_once("/s/"))
        .unwrap_or((tenant::DEFAULT, key))
}

impl RecordStore for Store {
    fn load(&self) -> Result<Vec<Loaded>, StoreError> {
        Store::load(self)
    }

    fn put(&self, tenant: &str, service: &StoredService) -> Result<(), StoreError> {
        Store::put(self, tenant, service)
    }

    fn delete(&self, tenant: &str, name: &str) -> Result<(), StoreError> {
        Store::delete(self, tenant, name)
    }

    fn load_traffic(&self) -> Result<Vec<LoadedPolicy>, StoreError> {
        Store::load_traffic(self)
    }

    fn put_traffic(
        &self,
        tenant: &str,
        name: &str,
        policy: &TrafficPolicy,
    ) -> Result<(), StoreError> {
        Store::put_traffic(self, tenant, name, policy)
    }

    fn delete_traffic(&self, tenant: &str, name: &str) -> Result<(), StoreError> {
        Store::delete_traffic(self, tenant, name)
    }

    fn load_api_keys(&self) -> Result<Vec<LoadedApiKey>, StoreError> {
        Store::load_api_keys(self)
    }

    fn put_api_key(&self, key: &StoredApiKey) -> Result<(), StoreError> {
        Store::put_api_key(self, key)
    }

    fn delete_api_key(&self, id: &str) -> Result<(), StoreError> {
        Store::delete_api_key(self, id)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// A registration as either store keeps it: the checksum line, then the
/// tagged JSON (format `"2"`).
pub(super) fn encode(service: &StoredService) -> Result<Vec<u8>, serde_json::Error> {
    Ok(checksummed(&serde_json::to_vec(&Record::V2(
        service.clone(),
    ))?))
}

/// A traffic policy as either store keeps it.
pub(super) fn encode_policy(policy: &TrafficPolicy) -> Result<Vec<u8>, serde_json::Error> {
    Ok(checksummed(&serde_json::to_vec(policy)?))
}

/// A stored traffic policy back, if it matches its checksum.
pub(super) fn decode_policy(value: &[u8]) -> Result<TrafficPolicy, RecordError> {
    verified(value).and_then(|json| serde_json::from_slice(json).map_err(RecordError::from))
}

/// An API key as either store keeps it.
pub(super) fn encode_api_key(key: &StoredApiKey) -> Result<Vec<u8>, serde_json::Error> {
    Ok(checksummed(&serde_json::to_vec(key)?))
}

/// A stored API key back, if it matches its checksum.
pub(super) fn decode_api_key(value: &[u8]) -> Result<StoredApiKey, RecordError> {
    verified(value).and_then(|json| serde_json::from_slice(json).map_err(RecordError::from))
}

/// The stored value of a record's JSON: checksum line, then the JSON.
fn checksummed(json: &[u8]) -> Vec<u8> {
    let mut value = format!("xxh3={:016x}\n", xxh3_64(json)).into_bytes();
    value.extend_from_slice(json);
    value
}

/// A stored value back as a registration, and whether it had a checksum.
pub(super) fn decode(value: &[u8]) -> (Result<StoredService, RecordError>, bool) {
    if value.starts_with(CHECKSUM_PREFIX) {
        (verified(value).and_then(parse), true)
    } else {
        // Written before checksums: the bare JSON.
        (parse(value), false)
    }
}

/// The JSON of a checksummed value, if it matches its checksum line.
fn verified(value: &[u8]) -> Result<&[u8], RecordError> {
    let rest = value
        .strip_prefix(CHECKSUM_PREFIX)
        .ok_or(RecordError::ChecksumLine)?;
    let Some((hex, [b'\n', json @ ..])) = rest.split_first_chunk::<16>() else {
        return Err(RecordError::ChecksumLine);
    };
    let stored = std::str::from_utf8(hex)
        .ok()
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .ok_or(RecordError::ChecksumLine)?;
    let computed = xxh3_64(json);
    if computed == stored {
        Ok(json)
    } else {
        Err(RecordError::Checksum { stored, computed })
    }
}

/// A record of either format, as the current one: a format `"1"` record
/// is a service of one version.
fn parse(json: &[u8]) -> Result<StoredService, RecordError> {
    Ok(match serde_json::from_slice(json)? {
        Record::V1(version) => StoredService {
            versions: vec![*version],
        },
        Record::V2(service) => service,
    })
}

fn damaged(path: &Path, problem: &str) -> StoreError {
    StoreError::Damaged {
        path: path.to_owned(),
        problem: problem.to_owned(),
    }
}

fn open_error(path: &Path, source: redb::DatabaseError) -> StoreError {
    StoreError::Open {
        path: path.to_owned(),
        source,
    }
}

/// Reports what says the file itself is unsound as [`StoreError::Damaged`];
/// anything else (a lock held by another host, an I/O error) as it was.
fn classify(path: &Path, error: StoreError) -> StoreError {
    use redb::{DatabaseError, StorageError};
    let problem = match &error {
        StoreError::Open {
            source: DatabaseError::Storage(StorageError::Corrupted(what)),
            ..
        }
        | StoreError::Database(redb::Error::Corrupted(what)) => what.clone(),
        StoreError::Open {
            source: DatabaseError::Storage(StorageError::Io(io)),
            ..
        } if io.kind() == std::io::ErrorKind::InvalidData => format!("not a redb database ({io})"),
        StoreError::Open {
            source: DatabaseError::RepairAborted,
            ..
        }
        | StoreError::Database(redb::Error::RepairAborted) => {
            "its integrity check failed and it could not be repaired".to_owned()
        }
        _ => return error,
    };
    damaged(path, &problem)
}

thread_local! {
    /// Set while [`catching_panics`] runs on this thread.
    static CATCHING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `operation`, turning a panic into `Err(message)`. redb panics on
/// some damaged files (an `unreachable!` on a page it cannot make sense
/// of); that is a Rust panic in our process, and a damaged file must be a
/// clear refusal, not a crash. The panic hook stays quiet for panics caught
/// here (the refusal says what happened); every other panic is reported as
/// before.
fn catching_panics<T>(operation: impl FnOnce() -> T) -> Result<T, String> {
    static QUIET_HOOK: Once = Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !CATCHING.get() {
                previous(info);
            }
        }));
    });
    CATCHING.set(true);
    let result = panic::catch_unwind(AssertUnwindSafe(operation));
    CATCHING.set(false);
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|message| (*message).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::ServiceInfo;

    fn service(name: &str, port: u16) -> StoredService {
        StoredService {
            versions: vec![version(name, port)],
        }
    }

    fn version(name: &str, port: u16) -> StoredVersion {
        StoredVersion {
            spec: RemoteSpec {
                info: std::sync::Arc::new(ServiceInfo {
                    name: name.to_owned(),
                    display_name: name.to_owned(),
                    description: String::new(),
                    version: "1".to_owned(),
                    health_check_url: "/health".to_owned(),
                    metadata: Default::default(),
                    tags: vec!["t".to_owned()],
                    requires_auth: false,
                    endpoints: Vec::new(),
                }),
                base_path: "/".to_owned(),
                load_balancing: None,
            },
            instances: vec![StoredInstance {
                addr: InstanceAddr {
                    host: "localhost".to_owned(),
                    port,
                },
                owner: Some(IpAddr::from([127, 0, 0, 1])),
                registered_at_unix_ms: Some(1),
            }],
            registered_at_unix_ms: 1,
            owner: Some(IpAddr::from([127, 0, 0, 1])),
            owner_token: None,
        }
    }

    #[test]
    fn policies_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        let policy: TrafficPolicy = serde_json::from_str(
            r#"{"weights": {"1.4.2": 90, "2.0.0": 10}, "sticky": {"header": "X-User-Id"}}"#,
        )
        .unwrap();
        {
            let store = Store::open(&path).unwrap();
            store.put_traffic(tenant::DEFAULT, "a", &policy).unwrap();
            store.put_traffic(tenant::DEFAULT, "b", &policy).unwrap();
            store.put_traffic("acme", "b", &policy).unwrap();
            store.delete_traffic(tenant::DEFAULT, "b").unwrap();
        }
        let loaded = Store::open(&path).unwrap().load_traffic().unwrap();
        let keys: Vec<(&str, &str)> = loaded
            .iter()
            .map(|(tenant, name, _)| (tenant.as_str(), name.as_str()))
            .collect();
        assert_eq!(keys, [("acme", "b"), (tenant::DEFAULT, "a")]);
        assert_eq!(loaded[1].2.as_ref().unwrap(), &policy);
    }

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        {
            let store = Store::open(&path).unwrap();
            store.put(tenant::DEFAULT, &service("a", 1)).unwrap();
            store.put(tenant::DEFAULT, &service("b", 2)).unwrap();
            store.put(tenant::DEFAULT, &service("a", 3)).unwrap();
            store.delete(tenant::DEFAULT, "b").unwrap();
            store.delete(tenant::DEFAULT, "never-there").unwrap();
        }
        let store = Store::open(&path).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].name, "a");
        assert_eq!(loaded[0].service.as_ref().unwrap(), &service("a", 3));
    }

    /// Holds the database's write transaction while `writes` are queued,
    /// so that the committer, which took the first and waits for the
    /// transaction, finds the others queued behind it; then lets it go.
    /// Answers each write's outcome, in order.
    fn group_of(store: &Store, writes: Vec<Write>) -> Vec<Committed> {
        let count = writes.len();
        let held = store.db.begin_write().unwrap();
        let answers: Vec<_> = writes
            .into_iter()
            .map(|write| store.submit(write).unwrap())
            .collect();
        let queue = store.writes.as_ref().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while queue.len() != count - 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the committer never took the first write"
            );
            std::thread::yield_now();
        }
        held.abort().unwrap();
        answers
            .into_iter()
            .map(|answer| answer.recv().unwrap())
            .collect()
    }

    fn insert_of(service: &StoredService) -> Write {
        Write::Insert {
            table: Table::Services,
            key: service.name().to_owned(),
            value: checksummed(&serde_json::to_vec(&Record::V2(service.clone())).unwrap()),
        }
    }

    #[test]
    fn concurrent_writes_are_committed_together() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        let before = {
            let store = Store::open(&path).unwrap();
            let first = store.write(insert_of(&service("before", 1))).unwrap();
            let writes = (0..8u16)
                .map(|index| insert_of(&service(&format!("s{index}"), index)))
                .chain([Write::Remove {
                    table: Table::Services,
                    key: "before".to_owned(),
                }])
                .collect();
            let commits: Vec<u64> = group_of(&store, writes)
                .into_iter()
                .map(Result::unwrap)
                .collect();
            assert!(
                commits.iter().all(|commit| *commit == first + 1),
                "nine writes, one commit: {commits:?}"
            );
            first
        };
        assert_eq!(before, 1);
        // Durable and in order: the delete queued last removed `before`.
        let loaded = Store::open(&path).unwrap().load().unwrap();
        let names: Vec<&str> = loaded.iter().map(|loaded| loaded.name.as_str()).collect();
        assert_eq!(names, ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7"]);
    }

    #[test]
    fn a_failed_group_answers_every_writer_and_applies_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        let store = Store::open(&path).unwrap();
        store.put("default", &service("kept", 1)).unwrap();
        let outcomes = group_of(
            &store,
            vec![
                insert_of(&service("a", 1)),
                Write::Remove {
                    table: Table::Services,
                    key: "kept".to_owned(),
                },
                Write::Fail,
                insert_of(&service("b", 2)),
            ],
        );
        for outcome in &outcomes {
            let error = outcome.as_ref().unwrap_err().to_string();
            assert!(error.contains("a write made to fail"), "{error}");
        }
        let loaded = store.load().unwrap();
        let names: Vec<&str> = loaded.iter().map(|loaded| loaded.name.as_str()).collect();
        assert_eq!(names, ["kept"], "nothing of the failed group applied");
        // The committer goes on: the next write is committed.
        store.put("default", &service("after", 3)).unwrap();
        assert_eq!(store.load().unwrap().len(), 2);
    }

    #[test]
    fn writes_from_many_threads_are_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        {
            let store = Store::open(&path).unwrap();
            std::thread::scope(|scope| {
                for thread in 0..8u16 {
                    let store = &store;
                    scope.spawn(move || {
                        for index in 0..25u16 {
                            let port = thread * 100 + index;
                            store
                                .put("default", &service(&format!("t{port}"), port))
                                .unwrap();
                        }
                    });
                }
            });
        }
        assert_eq!(Store::open(&path).unwrap().load().unwrap().len(), 200);
    }

    fn damage(result: Result<Store, StoreError>) -> String {
        match result {
            Err(StoreError::Damaged { problem, .. }) => problem,
            other => panic!("expected a damaged-store error, got {other:?}"),
        }
    }

    #[test]
    fn an_empty_file_is_refused_not_reinitialised() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        std::fs::write(&path, b"").unwrap();
        let problem = damage(Store::open(&path));
        assert!(problem.contains("empty"), "{problem}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "left untouched");
    }

    #[test]
    fn garbage_pages_are_refused_without_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        {
            let store = Store::open(&path).unwrap();
            for port in 1..50 {
                store
                    .put(tenant::DEFAULT, &service(&format!("s{port}"), port))
                    .unwrap();
            }
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let len = bytes.len();
        // Everything past the header region: the tree pages.
        for (offset, byte) in bytes[4096..len].iter_mut().enumerate() {
            *byte = (offset * 7 + 13) as u8;
        }
        std::fs::write(&path, &bytes).unwrap();
        let error = Store::open(&path).and_then(|store| store.load().map(|_| store));
        let message = match error {
            Err(error @ StoreError::Damaged { .. }) => error.to_string(),
            other => panic!("expected a damaged-store error, got {other:?}"),
        };
        assert!(message.contains("registry.redb"), "{message}");
        assert!(message.contains("move it aside"), "{message}");
    }

    #[test]
    fn an_edited_record_fails_its_checksum_and_others_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        {
            let store = Store::open(&path).unwrap();
            store.put(tenant::DEFAULT, &service("a", 1)).unwrap();
            store.put(tenant::DEFAULT, &service("b", 2)).unwrap();
            let write = store.db.begin_write().unwrap();
            {
                let mut table = write.open_table(SERVICES).unwrap();
                let edited = {
                    let value = table.get("t/default/s/a").unwrap().unwrap();
                    String::from_utf8(value.value().to_vec())
                        .unwrap()
                        .replace("\"port\":1", "\"port\":9")
                };
                table.insert("t/default/s/a", edited.as_bytes()).unwrap();
            }
            write.commit().unwrap();
        }
        let loaded = Store::open(&path).unwrap().load().unwrap();
        assert!(matches!(
            loaded[0].service,
            Err(RecordError::Checksum { .. })
        ));
        assert_eq!(loaded[1].service.as_ref().unwrap(), &service("b", 2));
    }

    #[test]
    fn records_without_a_checksum_load_and_get_one_when_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        {
            let store = Store::open(&path).unwrap();
            // The format before checksums: the bare tagged JSON.
            let legacy = serde_json::to_vec(&Record::V1(Box::new(version("old", 1)))).unwrap();
            let write = store.db.begin_write().unwrap();
            write
                .open_table(SERVICES)
                .unwrap()
                .insert("old", legacy.as_slice())
                .unwrap();
            write.commit().unwrap();
        }
        let store = Store::open(&path).unwrap();
        let loaded = store.load().unwrap();
        assert!(!loaded[0].checksummed);
        assert_eq!(loaded[0].service.as_ref().unwrap(), &service("old", 1));
        assert_eq!(
            (loaded[0].tenant.as_str(), loaded[0].name.as_str()),
            (tenant::DEFAULT, "old"),
            "a record from before tenants is the default tenant's"
        );
        store.put(tenant::DEFAULT, &service("old", 2)).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.len(), 1, "migrated: the bare key is gone");
        assert!(loaded[0].checksummed);
        assert_eq!(loaded[0].service.as_ref().unwrap(), &service("old", 2));
    }

    #[test]
    fn tenants_keep_records_of_the_same_name_apart() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("registry.redb")).unwrap();
        store.put(tenant::DEFAULT, &service("a", 1)).unwrap();
        store.put("acme", &service("a", 2)).unwrap();
        store.put("globex", &service("a", 3)).unwrap();
        store.delete("globex", "a").unwrap();
        let loaded: Vec<(String, String, StoredService)> = store
            .load()
            .unwrap()
            .into_iter()
            .map(|loaded| (loaded.tenant, loaded.name, loaded.service.unwrap()))
            .collect();
        assert_eq!(
            loaded,
            vec![
                ("acme".to_owned(), "a".to_owned(), service("a", 2)),
                (tenant::DEFAULT.to_owned(), "a".to_owned(), service("a", 1)),
            ]
        );
    }

    /// A record exactly as the release before several instances per
    /// service wrote it: one instance without an owner of its own.
    const SINGLE_INSTANCE_RECORD: &str = r#"{"format":"1","spec":{"info":{"name":"old","display_name":"old","description":"","version":"1.0.0","health_check_url":"/health","metadata":{},"tags":[],"requires_auth":false,"endpoints":[]},"base_path":"/"},"instances":[{"host":"127.0.0.1","port":8010}],"registered_at_unix_ms":1700000000000,"owner":"127.0.0.2"}"#;

    #[test]
    fn single_instance_records_load_with_the_records_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        {
            let store = Store::open(&path).unwrap();
            store
                .insert(
                    Table::Services,
                    "old",
                    checksummed(SINGLE_INSTANCE_RECORD.as_bytes()),
                )
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let loaded = store.load().unwrap();
        let old = &loaded[0].service.as_ref().unwrap().versions[0];
        assert_eq!(old.instances.len(), 1);
        let instance = &old.instances[0];
        assert_eq!(instance.addr.to_string(), "127.0.0.1:8010");
        assert_eq!(instance.owner, None);
        assert_eq!(old.owner_of(instance), Some(IpAddr::from([127, 0, 0, 2])));
        assert_eq!(old.spec.load_balancing, None);
        // Written again, it keeps what it had and gains the new fields.
        let mut again = StoredService {
            versions: vec![old.clone()],
        };
        again.versions[0].instances[0].owner = old.owner_of(instance);
        store.put(tenant::DEFAULT, &again).unwrap();
        let reloaded = store.load().unwrap();
        assert_eq!(reloaded[0].service.as_ref().unwrap(), &again);
    }
}
