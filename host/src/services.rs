//! The service table: every service the gateway can route to, by name,
//! whatever its kind.
//!
//! It owns the mapping name -> [`Service`] and nothing else. Writers (the
//! plugin manager, the registry) replace entries atomically; readers (the
//! gateway, the registry listing) take a snapshot without locking. A
//! [`Service`] in the table is immutable: mutable state of a kind (a remote
//! service's heartbeats) lives behind its own handle in [`Backend`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::registry::RemoteService;
use crate::runtime::PluginRuntime;
use crate::sync::lock;

use crossbeam_channel::{Receiver, Sender};

/// What every service declares about itself, whatever its kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// Unique name; the gateway mounts the service under `/api/<name>/`.
    pub name: String,
    /// Human-readable name.
    pub display_name: String,
    /// One-paragraph description.
    pub description: String,
    /// Free-form version.
    pub version: String,
    /// Health endpoint, relative to the service.
    pub health_check_url: String,
    /// Free-form metadata.
    pub metadata: BTreeMap<String, String>,
    /// Free-form tags.
    pub tags: Vec<String>,
    /// Whether non-public endpoints require authentication.
    pub requires_auth: bool,
    /// What the service offers.
    pub endpoints: Vec<Endpoint>,
}

/// One endpoint of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Path relative to the service.
    pub path: String,
    /// HTTP method, upper case.
    pub method: String,
    /// What it does.
    pub description: String,
    /// Callable without authentication.
    pub is_public: bool,
}

/// HTTP methods an endpoint may declare.
pub const HTTP_METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

/// Why a service name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidName {
    /// Empty string.
    #[error("name is empty")]
    Empty,
    /// Longer than [`MAX_NAME_LEN`].
    #[error("name is {0} bytes long, the limit is {MAX_NAME_LEN}")]
    TooLong(usize),
    /// Not `[a-z0-9][a-z0-9-]*`.
    #[error(
        "name `{0}` must match [a-z0-9][a-z0-9-]* (lower-case letters, digits, `-`, not first)"
    )]
    BadCharacters(String),
}

/// Longest accepted service name.
pub const MAX_NAME_LEN: usize = 63;

/// Checks a service name: `[a-z0-9][a-z0-9-]*`, at most [`MAX_NAME_LEN`]
/// bytes. The name becomes a URL path segment, so nothing else is allowed.
pub fn validate_name(name: &str) -> Result<(), InvalidName> {
    let mut bytes = name.bytes();
    let Some(first) = bytes.next() else {
        return Err(InvalidName::Empty);
    };
    if name.len() > MAX_NAME_LEN {
        return Err(InvalidName::TooLong(name.len()));
    }
    let ok = (first.is_ascii_lowercase() || first.is_ascii_digit())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(InvalidName::BadCharacters(name.to_owned()))
    }
}

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
}

/// One entry of the table.
#[derive(Debug, Clone)]
pub struct Service {
    /// What the service declares.
    pub info: ServiceInfo,
    /// Where its requests go.
    pub backend: Backend,
}

impl Service {
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
type Snapshot = imbl::HashMap<String, Arc<Service>>;

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
        self.current.load().get(name).cloned()
    }

    /// Every service, sorted by name.
    pub fn list(&self) -> Vec<Arc<Service>> {
        let mut services: Vec<_> = self.current.load().values().cloned().collect();
        services.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        services
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
        if let Some(holder) = current.get(&service.info.name)
            && !may_replace(holder)
        {
            return Err(holder.clone());
        }
        let mut next = Snapshot::clone(&current);
        let previous = next.insert(service.info.name.clone(), Arc::new(service));
        self.current.store(Arc::new(next));
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
        let holder = current.get(name)?;
        if !should_remove(holder) {
            return None;
        }
        let mut next = Snapshot::clone(&current);
        let removed = next.remove(name);
        self.current.store(Arc::new(next));
        lock(&self.freed).retain(|listener| listener.send(name.to_owned()).is_ok());
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(validate_name("my-plugin"), Ok(()));
        assert_eq!(validate_name("0x"), Ok(()));
        assert_eq!(validate_name(""), Err(InvalidName::Empty));
        assert!(matches!(
            validate_name("-x"),
            Err(InvalidName::BadCharacters(_))
        ));
        assert!(matches!(
            validate_name("My_Plugin"),
            Err(InvalidName::BadCharacters(_))
        ));
        assert!(matches!(
            validate_name("a/b"),
            Err(InvalidName::BadCharacters(_))
        ));
        assert_eq!(
            validate_name(&"a".repeat(64)),
            Err(InvalidName::TooLong(64))
        );
    }
}
