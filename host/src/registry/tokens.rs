//! Who may write to the registry when tokens are configured: an admin
//! token, and registration tokens limited to name patterns. A name belongs
//! to the token that registered it.
//!
//! With no token configured the registry stays open, with ownership by
//! caller address, so the seed guide's client works unchanged.

use std::sync::Arc;

use axum::http::{HeaderMap, header};
use serde::Deserialize;

use crate::auth::SecretDigest;
use crate::service;
use crate::settings::SettingsError;
use crate::tenant;

/// The `[auth.registry]` section. Reloadable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryAuthSettings {
    /// Hex SHA-256 of the admin token: may write any name, manage API
    /// keys, and read everything.
    #[serde(default)]
    pub admin_token_sha256: Option<String>,
    /// Registration tokens.
    #[serde(default)]
    pub tokens: Vec<RegistryTokenSettings>,
    /// Whether reading the listing needs a token (`open` or `token`).
    #[serde(default)]
    pub listing: ListingAccess,
}

/// One registration token, `[[auth.registry.tokens]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryTokenSettings {
    /// Names the token: the names it registers are owned by this id (so a
    /// token's secret can be rotated under the same id). Never secret.
    pub id: String,
    /// Hex SHA-256 of the token.
    pub sha256: String,
    /// Name patterns it may register: exact names, or a prefix ending in
    /// `*` (`team-a-*`).
    pub names: Vec<String>,
    /// The tenant its registrations belong to and its listing shows
    /// (besides the shared services); absent: the default tenant.
    #[serde(default)]
    pub tenant: Option<String>,
}

/// Who may read the registry's listing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListingAccess {
    /// Anyone (today's behaviour).
    #[default]
    Open,
    /// Only a caller with a registry token.
    Token,
}

/// A key of `[auth.registry]` refused.
fn refused(key: impl std::fmt::Display, reason: impl std::fmt::Display) -> SettingsError {
    SettingsError::new(format!("auth.registry.{key}"), reason)
}

/// The registry's credentials, checked: who may write which names, and
/// who may read. Built once per config (re)load.
#[derive(Debug, Default)]
pub struct TokenPolicy {
    admin: Option<SecretDigest>,
    tokens: Vec<Arc<RegistrationToken>>,
    listing: ListingAccess,
}

/// One registration token, checked.
#[derive(Debug)]
pub struct RegistrationToken {
    id: String,
    digest: SecretDigest,
    names: Vec<NamePattern>,
    tenant: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum NamePattern {
    Exact(String),
    /// `prefix*`; an empty prefix (`*`) covers every name.
    Prefix(String),
}

/// Who is writing, as the registry's credentials say.
#[derive(Debug, Clone)]
pub enum Writer {
    /// No token is configured: anyone, under the ownership-by-address rule.
    Anyone,
    /// The admin token: any name.
    Admin,
    /// A registration token.
    Token(Arc<RegistrationToken>),
}

/// Why a request's credentials were refused (answered 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unauthenticated {
    /// No `Authorization: Bearer` header.
    #[error(
        "the registry requires a token: send `Authorization: Bearer <token>` (see docs/REGISTRY_API.md)"
    )]
    Missing,
    /// A token that is none of the configured ones.
    #[error("the registry token presented is not valid")]
    Invalid,
    /// A valid token that is not the admin token, for an admin endpoint.
    #[error("this endpoint requires the registry's admin token")]
    NotAdmin,
    /// No admin token is configured, so admin endpoints are closed.
    #[error(
        "no admin token is configured (`auth.registry.admin_token_sha256`), so admin endpoints are closed"
    )]
    NoAdmin,
}

impl TokenPolicy {
    /// Checks `settings`: every digest is 64 hex digits, ids are unique
    /// and not empty, and every name pattern is a service name or a prefix
    /// followed by `*`.
    pub fn from_settings(settings: &RegistryAuthSettings) -> Result<Self, SettingsError> {
        let admin = settings
            .admin_token_sha256
            .as_deref()
            .map(SecretDigest::from_hex)
            .transpose()
            .map_err(|error| refused("admin_token_sha256", error))?;
        let mut tokens: Vec<Arc<RegistrationToken>> = Vec::with_capacity(settings.tokens.len());
        for (index, token) in settings.tokens.iter().enumerate() {
            let key = |field: &str| format!("tokens[{index}].{field}");
            if token.id.trim().is_empty() {
                return Err(refused(key("id"), "must not be empty"));
            }
            if tokens.iter().any(|earlier| earlier.id == token.id) {
                return Err(refused(
                    key("id"),
                    format!("`{}` names two tokens", token.id),
                ));
            }
            let digest = SecretDigest::from_hex(&token.sha256)
                .map_err(|error| refused(key("sha256"), error))?;
            if token.names.is_empty() {
                return Err(refused(
                    key("names"),
                    "lists no name: a token must be allowed at least one name pattern",
                ));
            }
            let names = token
                .names
                .iter()
                .enumerate()
                .map(|(at, pattern)| {
                    NamePattern::parse(pattern)
                        .map_err(|reason| refused(format!("{}[{at}]", key("names")), reason))
                })
                .collect::<Result<_, _>>()?;
            if let Some(tenant) = &token.tenant {
                tenant::check(tenant).map_err(|reason| refused(key("tenant"), reason))?;
            }
            tokens.push(Arc::new(RegistrationToken {
                id: token.id.clone(),
                digest,
                names,
                tenant: token.tenant.clone(),
            }));
        }
        if settings.listing == ListingAccess::Token && admin.is_none() && tokens.is_empty() {
            return Err(refused(
                "listing",
                "`token` needs at least one token (`admin_token_sha256` or `tokens`), or no one could read the listing",
            ));
        }
        Ok(Self {
            admin,
            tokens,
            listing: settings.listing,
        })
    }

    /// Whether no token is configured: the registry is open, as the seed
    /// guide expects.
    pub fn is_open(&self) -> bool {
        self.admin.is_none() && self.tokens.is_empty()
    }

    /// Who the request's `Authorization` header says is writing.
    pub fn writer(&self, headers: &HeaderMap) -> Result<Writer, Unauthenticated> {
        if self.is_open() {
            return Ok(Writer::Anyone);
        }
        let presented = SecretDigest::of(bearer(headers).ok_or(Unauthenticated::Missing)?);
        // Every digest is compared, whichever matches, so the time taken
        // tells nothing about which token (if any) is close.
        let is_admin = self
            .admin
            .as_ref()
            .is_some_and(|admin| admin.matches_digest(&presented));
        let mut found = None;
        for token in &self.tokens {
            if token.digest.matches_digest(&presented) {
                found = Some(token);
            }
        }
        match (is_admin, found) {
            (true, _) => Ok(Writer::Admin),
            (false, Some(token)) => Ok(Writer::Token(token.clone())),
            (false, None) => Err(Unauthenticated::Invalid),
        }
    }

    /// Whether the request may read the listing.
    pub fn reader(&self, headers: &HeaderMap) -> Result<(), Unauthenticated> {
        match self.listing {
            ListingAccess::Open => Ok(()),
            ListingAccess::Token => self.writer(headers).map(drop),
        }
    }

    /// Whether the request carries the admin token.
    pub fn admin(&self, headers: &HeaderMap) -> Result<(), Unauthenticated> {
        if self.admin.is_none() {
            return Err(Unauthenticated::NoAdmin);
        }
        match self.writer(headers)? {
            Writer::Admin => Ok(()),
            Writer::Anyone | Writer::Token(_) => Err(Unauthenticated::NotAdmin),
        }
    }
}

impl RegistrationToken {
    /// The token's id: who owns the names it registered.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The tenant it writes and reads in, if it names one.
    pub fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    /// Whether one of its patterns covers `name`.
    pub fn covers(&self, name: &str) -> bool {
        self.names.iter().any(|pattern| match pattern {
            NamePattern::Exact(exact) => exact == name,
            NamePattern::Prefix(prefix) => name.starts_with(prefix.as_str()),
        })
    }

    /// Its patterns as configured, for refusals.
    pub fn patterns(&self) -> Vec<String> {
        self.names
            .iter()
            .map(|pattern| match pattern {
                NamePattern::Exact(exact) => exact.clone(),
                NamePattern::Prefix(prefix) => format!("{prefix}*"),
            })
            .collect()
    }
}

impl NamePattern {
    fn parse(pattern: &str) -> Result<Self, String> {
        match pattern.strip_suffix('*') {
            Some("") => Ok(Self::Prefix(String::new())),
            Some(prefix) => {
                // A prefix must itself be the start of a valid name.
                service::validate_name(&format!("{prefix}x"))
                    .map(|()| Self::Prefix(prefix.to_owned()))
                    .map_err(|error| format!("`{pattern}`: {error}"))
            }
            None => service::validate_name(pattern)
                .map(|()| Self::Exact(pattern.to_owned()))
                .map_err(|error| format!("`{pattern}`: {error}")),
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let scheme = value.get(..7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| value[7..].trim_ascii())
        .filter(|token| !token.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    // printf %s admin | sha256sum, printf %s team-a | sha256sum
    const ADMIN: &str = "8c6976e5b5410415bde908bd4dee15dfb167a9c873fc4bb8a81f6f2ab448a918";
    const TEAM_A: &str = "96c2886c51d1dfb4901d9feccff66213ce3e27406282ff6f602a4258a33dacec";

    fn settings(tokens: &[(&str, &str, &[&str])]) -> RegistryAuthSettings {
        RegistryAuthSettings {
            admin_token_sha256: Some(ADMIN.to_owned()),
            tokens: tokens
                .iter()
                .map(|(id, sha256, names)| RegistryTokenSettings {
                    id: (*id).to_owned(),
                    sha256: (*sha256).to_owned(),
                    names: names.iter().map(|name| (*name).to_owned()).collect(),
                    tenant: None,
                })
                .collect(),
            listing: ListingAccess::Open,
        }
    }

    fn bearing(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().expect("header value"),
        );
        headers
    }

    #[test]
    fn no_token_configured_is_open() {
        let policy = TokenPolicy::from_settings(&RegistryAuthSettings::default()).expect("valid");
        assert!(policy.is_open());
        assert!(matches!(
            policy.writer(&HeaderMap::new()),
            Ok(Writer::Anyone)
        ));
        assert_eq!(
            policy.admin(&HeaderMap::new()),
            Err(Unauthenticated::NoAdmin)
        );
    }

    #[test]
    fn tokens_are_told_apart() {
        let policy =
            TokenPolicy::from_settings(&settings(&[("team-a", TEAM_A, &["team-a-*", "shared"])]))
                .expect("valid");
        assert!(matches!(
            policy.writer(&bearing("admin")),
            Ok(Writer::Admin)
        ));
        let Ok(Writer::Token(token)) = policy.writer(&bearing("team-a")) else {
            panic!("team-a's token is a registration token");
        };
        assert_eq!(token.id(), "team-a");
        assert!(token.covers("team-a-orders"));
        assert!(token.covers("shared"));
        assert!(!token.covers("team-b-orders"));
        assert!(!token.covers("shared-2"));
        assert_eq!(
            policy.writer(&bearing("nope")).err(),
            Some(Unauthenticated::Invalid)
        );
        assert_eq!(
            policy.writer(&HeaderMap::new()).err(),
            Some(Unauthenticated::Missing)
        );
        assert_eq!(
            policy.admin(&bearing("team-a")),
            Err(Unauthenticated::NotAdmin)
        );
        assert_eq!(policy.admin(&bearing("admin")), Ok(()));
    }

    #[test]
    fn bad_settings_name_their_key() {
        let error =
            TokenPolicy::from_settings(&settings(&[("a", "xyz", &["a"])])).expect_err("bad digest");
        assert!(
            error
                .to_string()
                .starts_with("auth.registry.tokens[0].sha256: "),
            "{error}"
        );
        let error = TokenPolicy::from_settings(&settings(&[("a", TEAM_A, &["ok", "Bad Name"])]))
            .expect_err("bad pattern");
        assert!(
            error
                .to_string()
                .starts_with("auth.registry.tokens[0].names[1]: "),
            "{error}"
        );
        let error =
            TokenPolicy::from_settings(&settings(&[("a", TEAM_A, &["a"]), ("a", TEAM_A, &["b"])]))
                .expect_err("duplicate id");
        assert!(
            error
                .to_string()
                .starts_with("auth.registry.tokens[1].id: "),
            "{error}"
        );
        let closed = RegistryAuthSettings {
            listing: ListingAccess::Token,
            ..RegistryAuthSettings::default()
        };
        let error = TokenPolicy::from_settings(&closed).expect_err("nobody could read");
        assert!(
            error.to_string().starts_with("auth.registry.listing: "),
            "{error}"
        );
    }
}
