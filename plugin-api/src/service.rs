use std::collections::BTreeMap;

use abi_stable::std_types::{RString, RVec};

use crate::Router;
use crate::ffi::{FfiEndpoint, FfiKeyValue, FfiServiceConfig};

/// A service's description: what the registry lists and the gateway mounts.
///
/// Built with [`ServiceConfig::new`] and the chained setters. The endpoints
/// come from the plugin's [`Router`], so they cannot drift from the code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    name: String,
    display_name: Option<String>,
    description: String,
    version: String,
    health_check_url: String,
    metadata: BTreeMap<String, String>,
    tags: Vec<String>,
    requires_auth: bool,
}

/// One endpoint as the registry lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    /// Path pattern relative to the service, e.g. `/data/{id}`.
    pub path: String,
    /// HTTP method in upper case.
    pub method: String,
    /// What the endpoint does.
    pub description: String,
    /// Whether the endpoint may be called without authentication.
    pub is_public: bool,
}

impl ServiceConfig {
    /// A config for the service `name` (`[a-z0-9][a-z0-9-]*`, checked by the
    /// host at load time), version `0.0.0` and health path `/health`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            display_name: None,
            description: String::new(),
            version: "0.0.0".to_owned(),
            health_check_url: "/health".to_owned(),
            metadata: BTreeMap::new(),
            tags: Vec::new(),
            requires_auth: false,
        }
    }

    /// Human-readable name; defaults to the service name.
    pub fn display_name(mut self, display_name: impl Into<String>) -> Self {
        self.display_name = Some(display_name.into());
        self
    }

    /// One-paragraph description.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// The service's version; `env!("CARGO_PKG_VERSION")` is a good value.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Path of the health endpoint, relative to the service.
    pub fn health_check_url(mut self, path: impl Into<String>) -> Self {
        self.health_check_url = path.into();
        self
    }

    /// Adds one metadata entry (a later value for the same key wins).
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Adds one tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Marks the service's non-public endpoints as requiring authentication.
    pub fn requires_auth(mut self, requires_auth: bool) -> Self {
        self.requires_auth = requires_auth;
        self
    }

    /// The service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn into_ffi<S: 'static>(self, router: &Router<S>) -> FfiServiceConfig {
        let display_name = self.display_name.unwrap_or_else(|| self.name.clone());
        FfiServiceConfig {
            name: self.name.into(),
            display_name: display_name.into(),
            description: self.description.into(),
            version: self.version.into(),
            health_check_url: self.health_check_url.into(),
            metadata: self
                .metadata
                .into_iter()
                .map(|(key, value)| FfiKeyValue {
                    key: key.into(),
                    value: value.into(),
                })
                .collect(),
            tags: self.tags.into_iter().map(RString::from).collect(),
            requires_auth: self.requires_auth,
            endpoints: router
                .endpoints()
                .map(|endpoint| FfiEndpoint {
                    path: endpoint.path.into(),
                    method: endpoint.method.into(),
                    description: endpoint.description.into(),
                    is_public: endpoint.is_public,
                })
                .collect::<RVec<_>>(),
        }
    }
}
