//! Who may write to the registry when tokens are configured: an admin
//! token, and registration tokens limited to name patterns. A name belongs
//! to the token that registered it.
//!
//! With no token configured the registry stays open, with ownership by
//! caller address, so the seed guide's client works unchanged.

use serde::Deserialize;

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
    /// Names the token in logs and in the listing's `owner`; never secret.
    pub id: String,
    /// Hex SHA-256 of the token.
    pub sha256: String,
    /// Name patterns it may register: exact names, or a prefix ending in
    /// `*` (`team-a-*`).
    pub names: Vec<String>,
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
