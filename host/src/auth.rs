//! Who is calling: turns a request's credentials (an API key in
//! `X-API-Key`, a JWT in `Authorization: Bearer`) into an [`Identity`], and
//! decides whether that identity may reach a service's endpoint.
//!
//! It owns the compiled credentials (key digests, JWT verifying keys) and
//! nothing else: the gateway asks it, with the service's declaration, and
//! answers 401 or 403 from its verdict. It does no I/O and never sees a
//! plain-text key after start-up: keys are held, and configured, as
//! SHA-256 digests.

use std::time::Duration;

use serde::Deserialize;

/// The `[auth]` section of the config file: the credentials the gateway
/// accepts. Reloadable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// API keys accepted in `X-API-Key`.
    #[serde(default)]
    pub api_keys: Vec<ApiKeySettings>,
    /// JWT issuers whose tokens are accepted in `Authorization: Bearer`.
    #[serde(default)]
    pub jwt: Vec<JwtIssuerSettings>,
}

/// One API key, `[[auth.api_keys]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySettings {
    /// Names the key in logs and to services (`X-Consumer-Id`); never
    /// secret.
    pub id: String,
    /// Hex SHA-256 of the key (`printf %s "$KEY" | sha256sum`): the key
    /// itself is never written in the file.
    pub sha256: String,
    /// Services the key may reach; absent: every service.
    #[serde(default)]
    pub services: Option<Vec<String>>,
}

/// One JWT issuer, `[[auth.jwt]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuerSettings {
    /// The `iss` claim its tokens must carry.
    pub issuer: String,
    /// Accepted `aud` values; a token must name one of them.
    pub audiences: Vec<String>,
    /// The one algorithm its tokens are signed with: `HS256`, `RS256` or
    /// `EdDSA`. A token naming any other (`none` included) is refused.
    pub algorithm: String,
    /// For `HS256`: a file holding the shared secret.
    #[serde(default)]
    pub secret_file: Option<std::path::PathBuf>,
    /// For `RS256` and `EdDSA`: a PEM file holding the public key.
    #[serde(default)]
    pub public_key_file: Option<std::path::PathBuf>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// Services its tokens may reach; absent: every service.
    #[serde(default)]
    pub services: Option<Vec<String>>,
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

/// The SHA-256 digest of a secret (an API key, a registry token): what
/// the host keeps instead of the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretDigest([u8; 32]);

impl std::fmt::Debug for SecretDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretDigest(..)")
    }
}

/// A configured digest that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a SHA-256 digest: expected 64 hex digits (`printf %s \"$SECRET\" | sha256sum`)")]
pub struct BadDigest;

impl SecretDigest {
    /// Parses a digest written as 64 hex digits.
    pub fn from_hex(hex_digest: &str) -> Result<Self, BadDigest> {
        let mut bytes = [0; 32];
        hex::decode_to_slice(hex_digest.trim(), &mut bytes).map_err(|_| BadDigest)?;
        Ok(Self(bytes))
    }

    /// The digest of `secret`.
    pub fn of(secret: &[u8]) -> Self {
        use sha2::Digest as _;
        Self(sha2::Sha256::digest(secret).into())
    }

    /// Whether `presented` is the secret this is the digest of. The
    /// comparison takes the same time wherever the digests differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.matches_digest(&Self::of(presented))
    }

    /// The digest as 64 lower-case hex digits. For digests that are not a
    /// secret's (a plugin file's, for its pin): a secret's digest is never
    /// logged.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Whether two digests are equal, in constant time.
    pub fn matches_digest(&self, other: &SecretDigest) -> bool {
        use subtle::ConstantTimeEq as _;
        self.0.ct_eq(&other.0).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_matches_its_secret_only() {
        // printf %s secret | sha256sum
        let digest = SecretDigest::from_hex(
            "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b",
        )
        .expect("valid hex");
        assert!(digest.matches(b"secret"));
        assert!(!digest.matches(b"secret "));
        assert!(!digest.matches(b""));
    }

    #[test]
    fn a_digest_must_be_64_hex_digits() {
        assert_eq!(SecretDigest::from_hex("abc"), Err(BadDigest));
        assert_eq!(SecretDigest::from_hex(&"g".repeat(64)), Err(BadDigest));
        assert!(SecretDigest::from_hex(&"A".repeat(64)).is_ok());
    }
}
