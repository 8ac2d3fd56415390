//! What the gateway lets through before a request reaches a service:
//! CORS preflights and headers, request rates per API key and per client
//! address, and the number of requests in flight per service.
//!
//! It owns the rate limiters' and the concurrency counters' state, and
//! nothing else. It knows services only by name.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// The `[cors]` section, or a service's `[service.<name>.cors]`: which
/// browser origins may call. Reloadable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsSettings {
    /// Origins allowed (`https://app.example`), or `["*"]`. Empty: CORS
    /// is off and preflights reach the service.
    #[serde(default)]
    pub allow_origins: Vec<String>,
    /// Methods allowed in a preflight; empty: every method the service
    /// declares.
    #[serde(default)]
    pub allow_methods: Vec<String>,
    /// Request headers allowed in a preflight.
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Response headers a script may read.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Whether credentials (cookies, `Authorization`) may be sent. Not
    /// allowed with `allow_origins = ["*"]`.
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long a browser may cache a preflight's answer.
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
}

/// A token bucket: `requests` per `per`, bursts up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateSettings {
    /// Requests allowed per period.
    pub requests: u32,
    /// The period.
    #[serde(with = "humantime_serde")]
    pub per: Duration,
    /// Requests that may come at once; default `requests`.
    #[serde(default)]
    pub burst: Option<u32>,
}

/// The `[rate_limit]` section. Reloadable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Per authenticated API key or JWT subject.
    #[serde(default)]
    pub per_key: Option<RateSettings>,
    /// Per client IP address.
    #[serde(default)]
    pub per_client: Option<RateSettings>,
}

/// A service's own gateway settings, `[service.<name>]`. Reloadable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSettings {
    /// Requests in flight to this service at once; beyond, 503. Default:
    /// `gateway.max_concurrent_per_service`.
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    /// Replaces the global `[cors]` for this service.
    #[serde(default)]
    pub cors: Option<CorsSettings>,
}

/// Per-service settings by service name.
pub type ServiceSettingsByName = BTreeMap<String, ServiceSettings>;
