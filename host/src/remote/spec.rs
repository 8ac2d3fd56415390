//! What a remote service is, apart from its liveness: where its instances
//! listen and what it declared. Stored by the registry, routed by the
//! proxy.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use axum::http::uri::{Authority, InvalidUri};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Balancing;
use crate::service::ServiceInfo;

/// Where one instance of a remote service listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceAddr {
    /// Host name or IP address (an IPv6 address without brackets).
    pub host: String,
    /// TCP port, never 0.
    pub port: u16,
}

impl InstanceAddr {
    /// `host:port` with an IPv6 address bracketed, as the authority of the
    /// instance's URLs. Fails only for an address that was never checked
    /// (a database record edited by hand).
    pub fn authority(&self) -> Result<Authority, InvalidUri> {
        Authority::from_str(&self.to_string())
    }
}

impl fmt::Display for InstanceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// What a registration declares about a service, apart from where it
/// listens: shared by all its instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteSpec {
    /// Name, description, endpoints... as for any service. Shared with the
    /// service's table entry: at 10,000 services one copy is megabytes.
    #[serde(serialize_with = "shared_info", deserialize_with = "own_info")]
    pub info: Arc<ServiceInfo>,
    /// Path prefix on the instance that `/api/<name>/` maps to; starts with
    /// `/`.
    pub base_path: String,
    /// The balancing it asked for (`load_balancing` in the registration);
    /// `[service.<name>] load_balancing` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancing: Option<Balancing>,
}

/// Serializes the shared info as the info itself (serde's own `Arc`
/// support is an opt-in feature of the whole build).
fn shared_info<S: Serializer>(info: &Arc<ServiceInfo>, serializer: S) -> Result<S::Ok, S::Error> {
    info.as_ref().serialize(serializer)
}

fn own_info<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Arc<ServiceInfo>, D::Error> {
    ServiceInfo::deserialize(deserializer).map(Arc::new)
}

/// What a heartbeat says about the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    /// `"healthy"`: route to it.
    Healthy,
    /// `"unhealthy"`: route nothing to it until a healthy heartbeat.
    Unhealthy,
}
