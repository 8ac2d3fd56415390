//! Tenants: who a service belongs to, and which services a request may
//! reach.
//!
//! Every service (a plugin file, a registration) belongs to one tenant. The
//! default tenant, [`DEFAULT`], is the host as it was before tenants: its
//! services are the shared ones, and its table keys are the bare names, so
//! a host that names no other tenant routes exactly as before. Another
//! tenant's services are keyed `<tenant>/<name>` (a name holds no `/`); a
//! request of tenant T for name N goes to T's N, else to the default
//! tenant's N, never to another tenant's (see `docs/MULTI_TENANT.md`).
//!
//! It knows names and ids, no table, kind or HTTP type beyond the header's
//! name.

use std::borrow::Cow;

use axum::http::HeaderName;
use serde::Deserialize;

use crate::service::validate_name;

/// The default tenant: the shared services, and every request and
/// registration that names no other.
pub const DEFAULT: &str = "default";

/// The header that carries the tenant: read from a client only when
/// `[tenants] trust_header` says so (otherwise removed), and always set by
/// the gateway to the tenant it resolved before a request reaches a
/// service.
pub const X_TENANT_ID: HeaderName = HeaderName::from_static("x-tenant-id");

/// The `[tenants]` section of the config file. Restart-only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    /// Whether a client's `X-Tenant-ID` chooses its tenant (on the gateway,
    /// when its credential names none, and on the registry, when its token
    /// names none). Off: the header is ignored and removed.
    #[serde(default)]
    pub trust_header: bool,
}

/// Checks a tenant id: the service name rule, `[a-z0-9][a-z0-9-]*`, at
/// most 63 bytes (it becomes a directory name and a key segment).
pub fn check(id: &str) -> Result<(), String> {
    validate_name(id).map_err(|invalid| invalid.to_string().replacen("name", "tenant id", 1))
}

/// Whether `tenant` is the default tenant.
pub fn is_default(tenant: &str) -> bool {
    tenant == DEFAULT
}

/// The table key of `name` in `tenant`: the bare name in the default
/// tenant (no allocation), `<tenant>/<name>` in another.
pub fn key<'a>(tenant: &str, name: &'a str) -> Cow<'a, str> {
    if is_default(tenant) {
        Cow::Borrowed(name)
    } else {
        Cow::Owned(format!("{tenant}/{name}"))
    }
}

/// The tenant and the name of a table key made by [`key`].
pub fn split_key(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or((DEFAULT, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_the_default_tenant_are_bare_names() {
        assert_eq!(key(DEFAULT, "hello"), "hello");
        assert!(matches!(key(DEFAULT, "hello"), Cow::Borrowed(_)));
        assert_eq!(key("acme", "hello"), "acme/hello");
        assert_eq!(split_key("acme/hello"), ("acme", "hello"));
        assert_eq!(split_key("hello"), (DEFAULT, "hello"));
    }

    #[test]
    fn ids_follow_the_name_rule_and_refusals_say_tenant() {
        assert!(check("acme-2").is_ok());
        let refused = check("Acme").unwrap_err();
        assert!(refused.contains("tenant id `Acme`"), "{refused}");
        assert!(check(&"a".repeat(64)).unwrap_err().contains("63"));
        assert!(check("").is_err());
    }
}
