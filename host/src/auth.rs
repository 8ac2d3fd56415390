//! Who is calling: turns a request's credentials (an API key in
//! `X-API-Key`, a JWT in `Authorization: Bearer`) into an [`Identity`], and
//! decides whether that identity may reach a service.
//!
//! It owns the compiled credentials (key digests, JWT verifying keys, the
//! keys added at run time) and nothing else: the gateway asks it about a
//! request to a service that declared `requires_auth`, and answers 401 or
//! 403 from its [`Refusal`]. It does no I/O after construction and never
//! sees a plain-text key: keys are held, and configured, as SHA-256
//! digests, and a presented key is hashed once and compared with every
//! digest in constant time.
//!
//! Which endpoints need a credential is the service's declaration
//! (`service::PublicEndpoints`); what a verified identity looks like to a
//! service is [`forward_identity`]: `X-Consumer-Id` and, for a token,
//! `X-Consumer-Claims`, never a client's copy of either.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use subtle::{Choice, ConditionallySelectable as _, ConstantTimeEq as _};

use crate::http::ApiError;
use crate::service::validate_name;
use crate::settings::SettingsError;
use crate::sync::lock;
use crate::tenant;

/// The header an API key is sent in.
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// The header that tells a service who called (see [`forward_identity`]).
pub const X_CONSUMER_ID: HeaderName = HeaderName::from_static(plugin_api::CONSUMER_ID_HEADER);
/// The header that carries a token's verified claims to a service.
pub const X_CONSUMER_CLAIMS: HeaderName =
    HeaderName::from_static(plugin_api::CONSUMER_CLAIMS_HEADER);

/// The realm named in `WWW-Authenticate`.
const REALM: &str = "plugin-host";
/// Longest clock skew an issuer may be allowed: "a small leeway".
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);
/// Shortest HS256 secret accepted: 256 bits, the hash's size (RFC 7518
/// section 3.2).
pub const MIN_HS256_SECRET_BYTES: usize = 32;
/// Smallest RSA modulus accepted (RFC 7518 section 3.3).
pub const MIN_RSA_BITS: usize = 2048;
/// Longest API key id.
pub const MAX_KEY_ID_LEN: usize = 64;
/// Longest token looked at; a longer one is refused unread.
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Longest `sub` claim passed on.
const MAX_SUBJECT_LEN: usize = 256;

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

/// One API key, `[[auth.api_keys]]`, or one added at run time through
/// [`ManagedKeys`] (which is why it also serializes: the admin endpoint
/// lists and persists them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySettings {
    /// Names the key in logs and to services (`X-Consumer-Id`); never
    /// secret. Letters, digits, `.`, `_` and `-`, not first; at most
    /// [`MAX_KEY_ID_LEN`] bytes. Unique among all keys, configured or
    /// added at run time.
    pub id: String,
    /// Hex SHA-256 of the key (`printf %s "$KEY" | sha256sum`): the key
    /// itself is never written in the file.
    pub sha256: String,
    /// Services the key may reach; absent: every service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<Vec<String>>,
    /// The tenant whose services the key's requests reach (a tenant id,
    /// see `docs/MULTI_TENANT.md`); absent: the default tenant, or the
    /// trusted `X-Tenant-ID` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// One JWT issuer, `[[auth.jwt]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuerSettings {
    /// The `iss` claim its tokens must carry; it also picks the issuer
    /// whose key verifies a token. Unique; no `#`, whitespace or control
    /// characters (an OpenID issuer URL has no fragment).
    pub issuer: String,
    /// Accepted `aud` values; a token must name one of them.
    pub audiences: Vec<String>,
    /// The one algorithm its tokens are signed with: `HS256`, `RS256` or
    /// `EdDSA`. A token naming any other (`none` included) is refused.
    pub algorithm: String,
    /// For `HS256`: a file holding the shared secret (at least
    /// [`MIN_HS256_SECRET_BYTES`] bytes; a final newline is not part of
    /// it).
    #[serde(default)]
    pub secret_file: Option<std::path::PathBuf>,
    /// For `RS256` and `EdDSA`: a PEM file holding the public key
    /// (`-----BEGIN PUBLIC KEY-----`; RSA keys of at least
    /// [`MIN_RSA_BITS`] bits).
    #[serde(default)]
    pub public_key_file: Option<std::path::PathBuf>,
    /// Clock skew allowed on `exp` and `nbf`; at most [`MAX_LEEWAY`].
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// Services its tokens may reach; absent: every service.
    #[serde(default)]
    pub services: Option<Vec<String>>,
    /// The claim naming a token's tenant (`tenant_claim = "tenant"`): a
    /// token carrying it must hold a tenant id there; a token without it
    /// names no tenant. Absent: its tokens name none.
    #[serde(default)]
    pub tenant_claim: Option<String>,
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
        self.ct_eq(other).into()
    }

    /// Every byte pair XORed into one accumulator, without a branch, then
    /// one constant-time test of it: the same guarantee as comparing the
    /// slices with `subtle`, which pays an optimisation barrier per byte.
    fn ct_eq(&self, other: &SecretDigest) -> Choice {
        let difference = self
            .0
            .iter()
            .zip(&other.0)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        difference.ct_eq(&0)
    }
}

/// `prefix.field`, or `field` alone without a prefix.
fn key_path(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_owned()
    } else {
        format!("{prefix}.{field}")
    }
}

/// The services a credential may reach.
#[derive(Debug, Clone)]
enum Scope {
    Every,
    Only(Arc<[String]>),
}

impl Scope {
    fn from_settings(services: Option<&[String]>, key: &str) -> Result<Self, SettingsError> {
        let Some(services) = services else {
            return Ok(Scope::Every);
        };
        if services.is_empty() {
            return Err(SettingsError::new(
                key,
                "an empty list would let the credential reach nothing; omit it for every service",
            ));
        }
        for (index, name) in services.iter().enumerate() {
            validate_name(name).map_err(|error| {
                SettingsError::new(format!("{key}[{index}]"), error.to_string())
            })?;
        }
        Ok(Scope::Only(services.into()))
    }

    fn admits(&self, service: &str) -> bool {
        match self {
            Scope::Every => true,
            Scope::Only(services) => services.iter().any(|name| name == service),
        }
    }
}

/// Who a request comes from, as the gateway verified it.
#[derive(Debug, Clone)]
pub struct Identity {
    id: Arc<str>,
    /// `id` as the `X-Consumer-Id` value, built once.
    id_header: HeaderValue,
    /// For a token: its payload as signed (base64url JSON).
    claims: Option<HeaderValue>,
    scope: Scope,
    /// The tenant the credential names, if any.
    tenant: Option<Arc<str>>,
}

impl Identity {
    /// The tenant the credential names (an API key's `tenant`, a token's
    /// tenant claim), if any.
    pub fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    /// The consumer id: an API key's id, or `jwt:<iss>#<sub>` for a token
    /// (key ids cannot contain `:`, so the two never collide).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether the credential's scope includes `service`.
    pub fn may_reach(&self, service: &str) -> bool {
        self.scope.admits(service)
    }
}

/// Why a credential was not accepted (401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// An `X-API-Key` that matches no key.
    #[error("unknown API key")]
    UnknownKey,
    /// Both an API key and a token, or either twice.
    #[error("more than one credential: send one X-API-Key or one Authorization: Bearer token")]
    Ambiguous,
    /// A credential header that is not text.
    #[error("the {0} header is not valid text")]
    Malformed(&'static str),
    /// A token whose `iss` names no configured issuer.
    #[error("invalid token: its issuer is not accepted")]
    UnknownIssuer,
    /// A token that failed verification.
    #[error("invalid token: {0}")]
    InvalidToken(String),
}

impl AuthError {
    /// The RFC 6750 error code for `WWW-Authenticate`.
    fn code(&self) -> &'static str {
        match self {
            AuthError::Ambiguous | AuthError::Malformed(_) => "invalid_request",
            AuthError::UnknownKey | AuthError::UnknownIssuer | AuthError::InvalidToken(_) => {
                "invalid_token"
            }
        }
    }
}

/// Why a request to a protected endpoint is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No credential: 401.
    Missing,
    /// A credential that was not accepted: 401.
    Invalid(AuthError),
    /// A valid credential whose scope excludes the service: 403.
    OutOfScope {
        /// The consumer id.
        consumer: String,
    },
}

impl Refusal {
    /// The answer in the gateway's error shape: 401 with
    /// `WWW-Authenticate` challenges for both credential kinds, or 403.
    pub fn into_response(self, service: &str) -> Response {
        let (status, message, code) = match self {
            Refusal::Missing => (
                StatusCode::UNAUTHORIZED,
                format!(
                    "service `{service}` requires authentication: send an API key in X-API-Key \
                     or a token in Authorization: Bearer"
                ),
                None,
            ),
            Refusal::Invalid(error) => (
                StatusCode::UNAUTHORIZED,
                error.to_string(),
                Some(error.code()),
            ),
            Refusal::OutOfScope { consumer } => {
                return ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!("`{consumer}` may not call service `{service}`"),
                )
                .with("service", service)
                .with("consumer", consumer)
                .into_response();
            }
        };
        let mut response = ApiError::new(status, message)
            .with("service", service)
            .into_response();
        let bearer = match code {
            Some(code) => format!("Bearer realm=\"{REALM}\", error=\"{code}\""),
            None => format!("Bearer realm=\"{REALM}\""),
        };
        let headers = response.headers_mut();
        for challenge in [
            bearer,
            format!("ApiKey realm=\"{REALM}\", header=\"X-API-Key\""),
        ] {
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                headers.append(header::WWW_AUTHENTICATE, value);
            }
        }
        response
    }
}

/// One API key, compiled: its digest and the identity it proves.
#[derive(Debug, Clone)]
struct ApiKey {
    digest: SecretDigest,
    identity: Identity,
    /// As configured (digest in lower case), for listing.
    settings: ApiKeySettings,
}

impl ApiKey {
    /// Checks `settings`; `prefix` is its path for errors (empty for a key
    /// added at run time).
    fn from_settings(settings: &ApiKeySettings, prefix: &str) -> Result<Self, SettingsError> {
        check_key_id(&settings.id)
            .map_err(|reason| SettingsError::new(key_path(prefix, "id"), reason))?;
        let digest = SecretDigest::from_hex(&settings.sha256)
            .map_err(|error| SettingsError::new(key_path(prefix, "sha256"), error.to_string()))?;
        let scope =
            Scope::from_settings(settings.services.as_deref(), &key_path(prefix, "services"))?;
        let id_header = HeaderValue::from_str(&settings.id)
            .map_err(|_| SettingsError::new(key_path(prefix, "id"), "not a valid header value"))?;
        if let Some(tenant) = &settings.tenant {
            tenant::check(tenant)
                .map_err(|reason| SettingsError::new(key_path(prefix, "tenant"), reason))?;
        }
        Ok(Self {
            digest,
            identity: Identity {
                id: settings.id.as_str().into(),
                id_header,
                claims: None,
                scope,
                tenant: settings.tenant.as_deref().map(Arc::from),
            },
            settings: ApiKeySettings {
                sha256: settings.sha256.trim().to_ascii_lowercase(),
                ..settings.clone()
            },
        })
    }

    fn id(&self) -> &str {
        &self.settings.id
    }
}

/// `[A-Za-z0-9][A-Za-z0-9._-]*`: safe in a header, a log line and a URL,
/// and never containing `:`, which token ids do.
fn check_key_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if id.len() > MAX_KEY_ID_LEN {
        return Err(format!(
            "is {} bytes long, the limit is {MAX_KEY_ID_LEN}",
            id.len()
        ));
    }
    let mut bytes = id.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(format!(
            "`{}` must match [A-Za-z0-9][A-Za-z0-9._-]*",
            id.escape_debug()
        ));
    }
    Ok(())
}

/// One JWT issuer, compiled: its one algorithm and key.
struct Issuer {
    issuer: String,
    algorithm: Algorithm,
    key: DecodingKey,
    /// `Validation::new(algorithm)` with this issuer's audiences, leeway
    /// and required claims.
    validation: Validation,
    scope: Scope,
    /// The claim naming a token's tenant, if configured.
    tenant_claim: Option<String>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("issuer", &self.issuer)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    fn from_settings(settings: &JwtIssuerSettings, prefix: &str) -> Result<Self, SettingsError> {
        let field = |name: &str| key_path(prefix, name);
        let issuer = settings.issuer.as_str();
        if issuer.is_empty() || issuer.len() > 1024 {
            return Err(SettingsError::new(
                field("issuer"),
                "must be 1 to 1024 bytes long",
            ));
        }
        if issuer.contains(|c: char| c == '#' || c.is_whitespace() || c.is_control()) {
            return Err(SettingsError::new(
                field("issuer"),
                "must not contain `#`, whitespace or control characters",
            ));
        }
        if settings.audiences.is_empty() {
            return Err(SettingsError::new(
                field("audiences"),
                "needs at least one audience: a token must name this gateway's",
            ));
        }
        if let Some(index) = settings.audiences.iter().position(|aud| aud.is_empty()) {
            return Err(SettingsError::new(
                format!("{}[{index}]", field("audiences")),
                "must not be empty",
            ));
        }
        if settings.leeway > MAX_LEEWAY {
            return Err(SettingsError::new(
                field("leeway"),
                format!(
                    "{} is more than the limit of {}",
                    humantime::format_duration(settings.leeway),
                    humantime::format_duration(MAX_LEEWAY)
                ),
            ));
        }
        let (algorithm, key) = match settings.algorithm.as_str() {
            "HS256" => (Algorithm::HS256, hs256_key(settings, &field)?),
            "RS256" => (Algorithm::RS256, rs256_key(settings, &field)?),
            "EdDSA" => (Algorithm::EdDSA, eddsa_key(settings, &field)?),
            other => {
                return Err(SettingsError::new(
                    field("algorithm"),
                    format!(
                        "`{}` is not one of HS256, RS256, EdDSA",
                        other.escape_debug()
                    ),
                ));
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = settings.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[issuer]);
        validation.set_audience(&settings.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        if settings
            .tenant_claim
            .as_deref()
            .is_some_and(|claim| claim.is_empty() || claim.len() > 256)
        {
            return Err(SettingsError::new(
                field("tenant_claim"),
                "must be 1 to 256 bytes long",
            ));
        }
        Ok(Self {
            issuer: issuer.to_owned(),
            algorithm,
            key,
            validation,
            scope: Scope::from_settings(settings.services.as_deref(), &field("services"))?,
            tenant_claim: settings.tenant_claim.clone(),
        })
    }
}

/// The key file of `settings` for its algorithm: `wanted` must be set and
/// the other file must not, so there is never a doubt which key verifies.
fn key_file<'a>(
    settings: &'a JwtIssuerSettings,
    field: &dyn Fn(&str) -> String,
    wanted: &str,
) -> Result<(&'a Path, Vec<u8>), SettingsError> {
    let (path, other, other_name) = match wanted {
        "secret_file" => (
            &settings.secret_file,
            &settings.public_key_file,
            "public_key_file",
        ),
        _ => (
            &settings.public_key_file,
            &settings.secret_file,
            "secret_file",
        ),
    };
    if other.is_some() {
        return Err(SettingsError::new(
            field(other_name),
            format!(
                "not used with {}: its key is `{wanted}`",
                settings.algorithm
            ),
        ));
    }
    let Some(path) = path else {
        return Err(SettingsError::new(
            field(wanted),
            format!("required for {}", settings.algorithm),
        ));
    };
    let bytes = std::fs::read(path).map_err(|error| {
        SettingsError::new(
            field(wanted),
            format!("cannot read {}: {error}", path.display()),
        )
    })?;
    Ok((path, bytes))
}

fn hs256_key(
    settings: &JwtIssuerSettings,
    field: &dyn Fn(&str) -> String,
) -> Result<DecodingKey, SettingsError> {
    let (path, bytes) = key_file(settings, field, "secret_file")?;
    let secret = bytes
        .strip_suffix(b"\r\n")
        .or_else(|| bytes.strip_suffix(b"\n"))
        .unwrap_or(&bytes);
    if secret.len() < MIN_HS256_SECRET_BYTES {
        return Err(SettingsError::new(
            field("secret_file"),
            format!(
                "{} holds {} bytes; an HS256 secret needs at least {MIN_HS256_SECRET_BYTES} (`openssl rand -hex 32`)",
                path.display(),
                secret.len()
            ),
        ));
    }
    Ok(DecodingKey::from_secret(secret))
}

/// A PEM file holding a private key is refused: the host verifies only,
/// and should never hold what signs.
fn check_public_pem(path: &Path, pem: &[u8], field: &str) -> Result<(), SettingsError> {
    if pem
        .windows(b"PRIVATE KEY".len())
        .any(|window| window == b"PRIVATE KEY")
    {
        return Err(SettingsError::new(
            field,
            format!(
                "{} holds a private key; give the public key (`openssl pkey -in <key> -pubout`)",
                path.display()
            ),
        ));
    }
    Ok(())
}

fn rs256_key(
    settings: &JwtIssuerSettings,
    field: &dyn Fn(&str) -> String,
) -> Result<DecodingKey, SettingsError> {
    use rsa::pkcs1::DecodeRsaPublicKey as _;
    use rsa::traits::PublicKeyParts as _;
    let (path, pem) = key_file(settings, field, "public_key_file")?;
    let key_field = field("public_key_file");
    check_public_pem(path, &pem, &key_field)?;
    let not_rsa = |detail: String| {
        SettingsError::new(
            &key_field,
            format!("{} is not a PEM RSA public key: {detail}", path.display()),
        )
    };
    let key = DecodingKey::from_rsa_pem(&pem).map_err(|error| not_rsa(error.to_string()))?;
    // The verifier parses the key on each use; parse it now so that a bad
    // key is refused here, not answered 401 on every request.
    let der = key
        .try_get_as_bytes()
        .map_err(|error| not_rsa(error.to_string()))?;
    let parsed =
        rsa::RsaPublicKey::from_pkcs1_der(der).map_err(|error| not_rsa(error.to_string()))?;
    let bits = parsed.size() * 8;
    if bits < MIN_RSA_BITS {
        return Err(SettingsError::new(
            key_field,
            format!(
                "{} is a {bits}-bit RSA key; at least {MIN_RSA_BITS} bits are required",
                path.display()
            ),
        ));
    }
    Ok(key)
}

fn eddsa_key(
    settings: &JwtIssuerSettings,
    field: &dyn Fn(&str) -> String,
) -> Result<DecodingKey, SettingsError> {
    let (path, pem) = key_file(settings, field, "public_key_file")?;
    let key_field = field("public_key_file");
    check_public_pem(path, &pem, &key_field)?;
    let not_ed25519 = |detail: &str| {
        SettingsError::new(
            &key_field,
            format!(
                "{} is not a PEM Ed25519 public key: {detail}",
                path.display()
            ),
        )
    };
    let key = DecodingKey::from_ed_pem(&pem).map_err(|error| not_ed25519(&error.to_string()))?;
    let bytes = key
        .try_get_as_bytes()
        .map_err(|error| not_ed25519(&error.to_string()))?;
    let bytes: &[u8; 32] = bytes.try_into().map_err(|_| not_ed25519("not 32 bytes"))?;
    ed25519_dalek::VerifyingKey::from_bytes(bytes).map_err(|_| not_ed25519("not a curve point"))?;
    Ok(key)
}

/// The gateway's credentials: configured API keys and JWT issuers, and the
/// keys added at run time. Built whole by [`Authenticator::from_settings`]
/// (start-up and every reload), then only read.
#[derive(Debug)]
pub struct Authenticator {
    keys: Box<[ApiKey]>,
    issuers: Box<[Issuer]>,
    managed: Arc<ManagedKeys>,
    /// Whether a configured key or issuer names a tenant.
    names_tenants: bool,
}

impl Authenticator {
    /// Checks every setting (digests, ids, scopes, algorithms, key files:
    /// read and parsed now) and compiles them; `managed` is the set of
    /// keys added at run time, shared by every authenticator built over
    /// the host's life. A configured key whose id or digest is also a
    /// managed key's is refused: a key added at run time is never
    /// shadowed silently.
    pub fn from_settings(
        settings: &AuthSettings,
        managed: &Arc<ManagedKeys>,
    ) -> Result<Self, SettingsError> {
        let managed_now = managed.keys.load();
        let mut keys: Vec<ApiKey> = Vec::with_capacity(settings.api_keys.len());
        for (index, key) in settings.api_keys.iter().enumerate() {
            let prefix = format!("auth.api_keys[{index}]");
            let key = ApiKey::from_settings(key, &prefix)?;
            if let Some(other) = keys.iter().position(|k| k.id() == key.id()) {
                return Err(SettingsError::new(
                    key_path(&prefix, "id"),
                    format!("`{}` is also the id of auth.api_keys[{other}]", key.id()),
                ));
            }
            if let Some(other) = keys.iter().position(|k| k.digest == key.digest) {
                return Err(SettingsError::new(
                    key_path(&prefix, "sha256"),
                    format!("the same key as auth.api_keys[{other}]"),
                ));
            }
            if managed_now.iter().any(|k| k.id() == key.id()) {
                return Err(SettingsError::new(
                    key_path(&prefix, "id"),
                    format!(
                        "`{}` is a key added through the admin endpoint; revoke it there first",
                        key.id()
                    ),
                ));
            }
            if let Some(other) = managed_now.iter().find(|k| k.digest == key.digest) {
                return Err(SettingsError::new(
                    key_path(&prefix, "sha256"),
                    format!(
                        "the same key as `{}`, added through the admin endpoint",
                        other.id()
                    ),
                ));
            }
            keys.push(key);
        }
        let mut issuers: Vec<Issuer> = Vec::with_capacity(settings.jwt.len());
        for (index, issuer) in settings.jwt.iter().enumerate() {
            let prefix = format!("auth.jwt[{index}]");
            let issuer = Issuer::from_settings(issuer, &prefix)?;
            if let Some(other) = issuers.iter().position(|i| i.issuer == issuer.issuer) {
                return Err(SettingsError::new(
                    key_path(&prefix, "issuer"),
                    format!(
                        "`{}` is also the issuer of auth.jwt[{other}]",
                        issuer.issuer
                    ),
                ));
            }
            issuers.push(issuer);
        }
        let names_tenants = keys.iter().any(|key| key.identity.tenant.is_some())
            || issuers.iter().any(|issuer| issuer.tenant_claim.is_some());
        Ok(Self {
            keys: keys.into(),
            issuers: issuers.into(),
            managed: managed.clone(),
            names_tenants,
        })
    }

    /// The keys added at run time that this authenticator consults after
    /// the configured ones.
    pub fn managed(&self) -> &Arc<ManagedKeys> {
        &self.managed
    }

    /// Whether a credential may name a tenant: a configured key or issuer
    /// does, or a key added at run time did. The gateway resolves a
    /// tenant from credentials only then.
    pub fn names_tenants(&self) -> bool {
        self.names_tenants || self.managed.names_tenants.load(Ordering::Relaxed)
    }

    /// Whether the config defines an API key with this id.
    pub fn defines_key(&self, id: &str) -> bool {
        self.keys.iter().any(|key| key.id() == id)
    }

    /// The credential `headers` carry, verified: `Ok(None)` without one.
    /// An API key in `X-API-Key`, or a JWT in `Authorization: Bearer`;
    /// both at once, or either twice, is refused. Another `Authorization`
    /// scheme is not a credential of the gateway's.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Identity>, AuthError> {
        let api_key = single(headers, &X_API_KEY)?;
        let token = bearer_token(headers)?;
        match (api_key, token) {
            (Some(_), Some(_)) => Err(AuthError::Ambiguous),
            (Some(key), None) => self.check_key(key.as_bytes()).map(Some),
            (None, Some(token)) => self.check_token(token).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// The verdict on a request to a protected endpoint of `service`.
    pub fn admit(&self, service: &str, headers: &HeaderMap) -> Result<Identity, Refusal> {
        match self.authenticate(headers) {
            Ok(Some(identity)) if identity.may_reach(service) => Ok(identity),
            Ok(Some(identity)) => Err(Refusal::OutOfScope {
                consumer: identity.id().to_owned(),
            }),
            Ok(None) => Err(Refusal::Missing),
            Err(error) => Err(Refusal::Invalid(error)),
        }
    }

    /// Who calls a public endpoint of a protected `service`: a valid
    /// credential within its scope, or no one. A public endpoint is
    /// callable without one, so a missing, invalid or out-of-scope
    /// credential does not refuse the call, it only leaves it anonymous.
    pub fn identify(&self, service: &str, headers: &HeaderMap) -> Option<Identity> {
        self.authenticate(headers)
            .ok()
            .flatten()
            .filter(|identity| identity.may_reach(service))
    }

    /// The key whose digest is `key`'s. The presented key is hashed once
    /// and compared with every digest, configured then managed, in
    /// constant time and without stopping at a match, so the time taken
    /// tells nothing of which key (if any) matched.
    fn check_key(&self, key: &[u8]) -> Result<Identity, AuthError> {
        let presented = SecretDigest::of(key);
        let managed = self.managed.keys.load();
        let mut found = Choice::from(0);
        let mut index = 0u32;
        for (position, key) in self.keys.iter().chain(managed.iter()).enumerate() {
            let hit = key.digest.ct_eq(&presented) & !found;
            index.conditional_assign(&(position as u32), hit);
            found |= hit;
        }
        if !bool::from(found) {
            return Err(AuthError::UnknownKey);
        }
        let index = index as usize;
        match self.keys.get(index) {
            Some(key) => Ok(key.identity.clone()),
            None => {
                let key = &managed[index - self.keys.len()];
                // A reload that raced an insert may have configured the
                // same id: the configured key wins, the other is inert.
                if self.defines_key(key.id()) {
                    return Err(AuthError::UnknownKey);
                }
                Ok(key.identity.clone())
            }
        }
    }

    /// The token verified by the issuer its `iss` names, with that
    /// issuer's one algorithm and key: a token naming another algorithm
    /// (`none`, or HS256 for an RS256 issuer, whose public key would then
    /// serve as an HMAC secret) is refused before any signature check.
    fn check_token(&self, token: &str) -> Result<Identity, AuthError> {
        #[derive(Deserialize)]
        struct Unverified {
            iss: Option<String>,
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::InvalidToken(format!(
                "longer than {MAX_TOKEN_LEN} bytes"
            )));
        }
        // Read unverified only to pick the issuer; nothing else is used
        // before verification.
        let unverified: Unverified = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|_| AuthError::InvalidToken("malformed".to_owned()))?;
        let iss = unverified
            .iss
            .ok_or_else(|| AuthError::InvalidToken("no `iss` claim".to_owned()))?;
        let issuer = self
            .issuers
            .iter()
            .find(|issuer| issuer.issuer == iss)
            .ok_or(AuthError::UnknownIssuer)?;
        let verified =
            jsonwebtoken::decode::<Map<String, Value>>(token, &issuer.key, &issuer.validation)
                .map_err(|error| AuthError::InvalidToken(token_error(error.kind())))?;
        let subject = verified
            .claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|sub| !sub.is_empty() && sub.len() <= MAX_SUBJECT_LEN && !sub.contains(char::is_control))
            .ok_or_else(|| {
                AuthError::InvalidToken(format!(
                    "`sub` must be a string of 1 to {MAX_SUBJECT_LEN} bytes without control characters"
                ))
            })?;
        let tenant = match &issuer.tenant_claim {
            None => None,
            Some(claim) => match verified.claims.get(claim) {
                None => None,
                Some(Value::String(tenant)) if tenant::check(tenant).is_ok() => {
                    Some(Arc::from(tenant.as_str()))
                }
                Some(_) => {
                    return Err(AuthError::InvalidToken(format!(
                        "the `{claim}` claim must be a tenant id ([a-z0-9][a-z0-9-]*, at most 63 bytes)"
                    )));
                }
            },
        };
        let id = format!("jwt:{}#{subject}", issuer.issuer);
        let invalid = || AuthError::InvalidToken("malformed".to_owned());
        let id_header = HeaderValue::from_str(&id).map_err(|_| invalid())?;
        let payload = token.split('.').nth(1).ok_or_else(invalid)?;
        let claims = HeaderValue::from_str(payload).map_err(|_| invalid())?;
        Ok(Identity {
            id: id.into(),
            id_header,
            claims: Some(claims),
            scope: issuer.scope.clone(),
            tenant,
        })
    }
}

/// What a client may be told about a token that failed verification.
fn token_error(kind: &jsonwebtoken::errors::ErrorKind) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match kind {
        ErrorKind::ExpiredSignature => "expired".to_owned(),
        ErrorKind::ImmatureSignature => "not valid yet (`nbf`)".to_owned(),
        ErrorKind::InvalidAudience => "its audience is not accepted".to_owned(),
        ErrorKind::InvalidIssuer => "its issuer is not accepted".to_owned(),
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm => {
            "its algorithm is not the one its issuer uses".to_owned()
        }
        ErrorKind::InvalidSignature => "bad signature".to_owned(),
        ErrorKind::MissingRequiredClaim(claim) => format!("no `{claim}` claim"),
        ErrorKind::InvalidClaimFormat(claim) => format!("the `{claim}` claim is malformed"),
        _ => "malformed".to_owned(),
    }
}

/// The one value of `name`, if any; twice is ambiguous.
fn single<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Result<Option<&'h str>, AuthError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(AuthError::Ambiguous);
    }
    value.to_str().map(Some).map_err(|_| {
        AuthError::Malformed(if *name == header::AUTHORIZATION {
            "Authorization"
        } else {
            "X-API-Key"
        })
    })
}

/// The token of an `Authorization: Bearer <token>` header (scheme in any
/// case); `None` without one, or for another scheme.
fn bearer_token(headers: &HeaderMap) -> Result<Option<&str>, AuthError> {
    let Some(value) = single(headers, &header::AUTHORIZATION)? else {
        return Ok(None);
    };
    let Some((scheme, token)) = value.split_once(' ') else {
        return Ok(None);
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Ok(None);
    }
    Ok(Some(token.trim()))
}

/// Prepares a request's headers for a service: a client's own
/// `X-Consumer-Id` and `X-Consumer-Claims` are always removed (whatever
/// the service: only the gateway speaks for a caller), then `identity`, if
/// any, is set. On a service that asked for gateway auth
/// (`gateway_owns_credentials`), the credentials the gateway consumed
/// (`X-API-Key`, `Authorization: Bearer`) are removed too: a service
/// learns who called, never a secret it could replay elsewhere.
pub fn forward_identity(
    headers: &mut HeaderMap,
    identity: Option<&Identity>,
    gateway_owns_credentials: bool,
) {
    // `remove` drops every value of a repeated header.
    headers.remove(X_CONSUMER_ID);
    headers.remove(X_CONSUMER_CLAIMS);
    if gateway_owns_credentials {
        headers.remove(X_API_KEY);
        if matches!(bearer_token(headers), Ok(Some(_)) | Err(_)) {
            headers.remove(header::AUTHORIZATION);
        }
    }
    if let Some(identity) = identity {
        headers.insert(X_CONSUMER_ID, identity.id_header.clone());
        if let Some(claims) = &identity.claims {
            headers.insert(X_CONSUMER_CLAIMS, claims.clone());
        }
    }
}

/// API keys added and revoked at run time (the admin endpoint on the
/// registry listener), without a restart or a reload. Shared (`Arc`) by
/// every [`Authenticator`] built over the host's life, which consults
/// them after the configured keys. Readers load a snapshot without
/// locking; writers are serialized.
///
/// Persisting them is the caller's: [`ManagedKeys::list`] gives what to
/// store, [`ManagedKeys::insert`] puts a stored key back at start-up.
#[derive(Debug, Default)]
pub struct ManagedKeys {
    keys: ArcSwap<Vec<ApiKey>>,
    write: Mutex<()>,
    /// Set once a key naming a tenant was added, never cleared: the
    /// gateway then resolves tenants from credentials.
    names_tenants: AtomicBool,
}

/// Why a key was not added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyRefused {
    /// A field is invalid (`id`, `sha256`, `services[0]`).
    #[error(transparent)]
    Invalid(#[from] SettingsError),
    /// The config file defines a key with this id.
    #[error("the config file defines an API key with id `{0}`")]
    ConfiguredId(String),
    /// A key with this id was added before.
    #[error("an API key with id `{0}` exists; revoke it first")]
    IdTaken(String),
    /// The same key is already known under another id.
    #[error("the same key is already known as `{0}`")]
    SameKey(String),
}

impl ManagedKeys {
    /// No keys.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key, checked as a configured one is; refused if `config`
    /// (the live authenticator) or an earlier insert has its id or its
    /// digest.
    pub fn insert(&self, key: ApiKeySettings, config: &Authenticator) -> Result<(), KeyRefused> {
        let key = ApiKey::from_settings(&key, "")?;
        let _guard = lock(&self.write);
        if config.defines_key(key.id()) {
            return Err(KeyRefused::ConfiguredId(key.id().to_owned()));
        }
        if let Some(same) = config.keys.iter().find(|k| k.digest == key.digest) {
            return Err(KeyRefused::SameKey(same.id().to_owned()));
        }
        let current = self.keys.load_full();
        if current.iter().any(|k| k.id() == key.id()) {
            return Err(KeyRefused::IdTaken(key.id().to_owned()));
        }
        if let Some(same) = current.iter().find(|k| k.digest == key.digest) {
            return Err(KeyRefused::SameKey(same.id().to_owned()));
        }
        if key.identity.tenant.is_some() {
            self.names_tenants.store(true, Ordering::Relaxed);
        }
        let mut next = Vec::clone(&current);
        next.push(key);
        self.keys.store(Arc::new(next));
        Ok(())
    }

    /// Removes the key `id`; false if there was none. Requests already
    /// admitted with it finish; the next one is refused.
    pub fn revoke(&self, id: &str) -> bool {
        let _guard = lock(&self.write);
        let current = self.keys.load_full();
        if !current.iter().any(|key| key.id() == id) {
            return false;
        }
        let next: Vec<ApiKey> = current
            .iter()
            .filter(|key| key.id() != id)
            .cloned()
            .collect();
        self.keys.store(Arc::new(next));
        true
    }

    /// Every key added, in the order added, as settings (digest, never a
    /// key): what to persist and to list.
    pub fn list(&self) -> Vec<ApiKeySettings> {
        self.keys
            .load()
            .iter()
            .map(|key| key.settings.clone())
            .collect()
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

    use std::path::PathBuf;

    use jsonwebtoken::{EncodingKey, Header, encode, get_current_timestamp};
    use serde_json::json;

    /// The test-only keys under `tests/fixtures/jwt/`.
    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/jwt")
            .join(name)
    }

    fn read_fixture(name: &str) -> Vec<u8> {
        std::fs::read(fixture(name)).expect("fixture")
    }

    const KEY: &str = "key-for-ci";
    const OTHER_KEY: &str = "key-for-billing";

    fn key(id: &str, secret: &str, services: Option<&[&str]>) -> ApiKeySettings {
        ApiKeySettings {
            id: id.to_owned(),
            sha256: hex::encode(SecretDigest::of(secret.as_bytes()).0),
            services: services.map(|s| s.iter().map(|n| (*n).to_owned()).collect()),
            tenant: None,
        }
    }

    fn issuer(name: &str, algorithm: &str) -> JwtIssuerSettings {
        let (secret_file, public_key_file) = match algorithm {
            "HS256" => (Some(fixture("test-only-hs256-secret")), None),
            "RS256" => (None, Some(fixture("test-only-rs256-public.pem"))),
            _ => (None, Some(fixture("test-only-eddsa-public.pem"))),
        };
        JwtIssuerSettings {
            issuer: name.to_owned(),
            audiences: vec!["plugin-host".to_owned()],
            algorithm: algorithm.to_owned(),
            secret_file,
            public_key_file,
            leeway: Duration::from_secs(30),
            services: None,
            tenant_claim: None,
        }
    }

    fn settings() -> AuthSettings {
        AuthSettings {
            api_keys: vec![
                key("ci", KEY, None),
                key("billing", OTHER_KEY, Some(&["billing"])),
            ],
            jwt: vec![
                issuer("https://hs.test", "HS256"),
                issuer("https://rs.test", "RS256"),
                issuer("https://ed.test", "EdDSA"),
            ],
        }
    }

    fn authenticator() -> Authenticator {
        Authenticator::from_settings(&settings(), &Arc::new(ManagedKeys::new()))
            .expect("valid settings")
    }

    fn refused(change: impl FnOnce(&mut AuthSettings)) -> String {
        let mut settings = settings();
        change(&mut settings);
        Authenticator::from_settings(&settings, &Arc::new(ManagedKeys::new()))
            .expect_err("refused")
            .to_string()
    }

    fn with_key(secret: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(X_API_KEY, HeaderValue::from_str(secret).unwrap());
        headers
    }

    fn with_token(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        headers
    }

    fn claims(iss: &str) -> Value {
        let now = get_current_timestamp();
        json!({"iss": iss, "sub": "ada", "aud": "plugin-host", "exp": now + 300, "iat": now})
    }

    fn mint(algorithm: Algorithm, claims: &Value) -> String {
        let key = match algorithm {
            Algorithm::HS256 => {
                EncodingKey::from_secret(read_fixture("test-only-hs256-secret").trim_ascii_end())
            }
            Algorithm::RS256 => {
                EncodingKey::from_rsa_pem(&read_fixture("test-only-rs256-private.pem")).unwrap()
            }
            _ => EncodingKey::from_ed_pem(&read_fixture("test-only-eddsa-private.pem")).unwrap(),
        };
        encode(&Header::new(algorithm), claims, &key).expect("token")
    }

    fn token_refusal(token: &str) -> AuthError {
        authenticator()
            .authenticate(&with_token(token))
            .expect_err("refused")
    }

    #[test]
    fn an_api_key_is_known_by_its_digest_and_scoped() {
        let auth = authenticator();
        let ci = auth
            .authenticate(&with_key(KEY))
            .unwrap()
            .expect("identity");
        assert_eq!(ci.id(), "ci");
        assert!(ci.may_reach("anything"));
        let billing = auth
            .admit("billing", &with_key(OTHER_KEY))
            .expect("in scope");
        assert_eq!(billing.id(), "billing");
        assert_eq!(
            auth.admit("hello", &with_key(OTHER_KEY)).unwrap_err(),
            Refusal::OutOfScope {
                consumer: "billing".to_owned()
            }
        );
        assert_eq!(
            auth.authenticate(&with_key("wrong")).unwrap_err(),
            AuthError::UnknownKey
        );
        assert_eq!(
            auth.admit("hello", &HeaderMap::new()).unwrap_err(),
            Refusal::Missing
        );
    }

    #[test]
    fn one_credential_at_a_time_and_other_schemes_are_not_ours() {
        let auth = authenticator();
        let mut both = with_key(KEY);
        both.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer x.y.z"),
        );
        assert_eq!(auth.authenticate(&both).unwrap_err(), AuthError::Ambiguous);
        let mut twice = with_key(KEY);
        twice.append(X_API_KEY, HeaderValue::from_static("again"));
        assert_eq!(auth.authenticate(&twice).unwrap_err(), AuthError::Ambiguous);
        let mut basic = HeaderMap::new();
        basic.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic YTpi"),
        );
        assert!(auth.authenticate(&basic).unwrap().is_none());
    }

    #[test]
    fn no_credential_configured_admits_no_one() {
        let auth =
            Authenticator::from_settings(&AuthSettings::default(), &Arc::new(ManagedKeys::new()))
                .unwrap();
        assert_eq!(
            auth.admit("svc", &HeaderMap::new()).unwrap_err(),
            Refusal::Missing
        );
        assert_eq!(
            auth.admit("svc", &with_key(KEY)).unwrap_err(),
            Refusal::Invalid(AuthError::UnknownKey)
        );
        assert_eq!(
            auth.admit(
                "svc",
                &with_token(&mint(Algorithm::HS256, &claims("https://hs.test")))
            )
            .unwrap_err(),
            Refusal::Invalid(AuthError::UnknownIssuer)
        );
    }

    #[test]
    fn tokens_of_each_algorithm_are_verified_by_their_issuer() {
        let auth = authenticator();
        for (algorithm, iss) in [
            (Algorithm::HS256, "https://hs.test"),
            (Algorithm::RS256, "https://rs.test"),
            (Algorithm::EdDSA, "https://ed.test"),
        ] {
            let token = mint(algorithm, &claims(iss));
            let identity = auth
                .authenticate(&with_token(&token))
                .unwrap()
                .expect("identity");
            assert_eq!(identity.id(), format!("jwt:{iss}#ada"));
            let payload = token.split('.').nth(1).unwrap();
            assert_eq!(identity.claims.as_ref().unwrap(), payload, "{algorithm:?}");
        }
    }

    #[test]
    fn time_audience_and_issuer_are_checked() {
        let now = get_current_timestamp();
        let with = |field: &str, value: Value| {
            let mut claims = claims("https://rs.test");
            claims[field] = value;
            mint(Algorithm::RS256, &claims)
        };
        assert_eq!(
            token_refusal(&with("exp", json!(now - 120))),
            AuthError::InvalidToken("expired".into())
        );
        assert!(
            authenticator()
                .authenticate(&with_token(&with("exp", json!(now - 10))))
                .is_ok(),
            "within the leeway"
        );
        assert_eq!(
            token_refusal(&with("nbf", json!(now + 120))),
            AuthError::InvalidToken("not valid yet (`nbf`)".into())
        );
        assert_eq!(
            token_refusal(&with("aud", json!("someone-else"))),
            AuthError::InvalidToken("its audience is not accepted".into())
        );
        assert_eq!(
            token_refusal(&with("iss", json!("https://unknown.test"))),
            AuthError::UnknownIssuer
        );
        let mut no_exp = claims("https://rs.test");
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(
            token_refusal(&mint(Algorithm::RS256, &no_exp)),
            AuthError::InvalidToken("no `exp` claim".into())
        );
        let mut no_sub = claims("https://rs.test");
        no_sub.as_object_mut().unwrap().remove("sub");
        assert_eq!(
            token_refusal(&mint(Algorithm::RS256, &no_sub)),
            AuthError::InvalidToken("no `sub` claim".into())
        );
    }

    #[test]
    fn alg_none_and_algorithm_confusion_are_refused() {
        use base64::Engine as _;
        let b64 = |value: &Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
        };
        let none = format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&claims("https://rs.test"))
        );
        assert_eq!(
            token_refusal(&none),
            AuthError::InvalidToken("malformed".into())
        );
        // The classic confusion: HS256 keyed with the RS256 issuer's public
        // key, which anyone can read.
        let public_pem = read_fixture("test-only-rs256-public.pem");
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &claims("https://rs.test"),
            &EncodingKey::from_secret(&public_pem),
        )
        .unwrap();
        assert_eq!(
            token_refusal(&confused),
            AuthError::InvalidToken("its algorithm is not the one its issuer uses".into())
        );
        // And an RS256 token presented as the HS256 issuer's.
        assert_eq!(
            token_refusal(&mint(Algorithm::RS256, &claims("https://hs.test"))),
            AuthError::InvalidToken("its algorithm is not the one its issuer uses".into())
        );
        let tampered = {
            let token = mint(Algorithm::EdDSA, &claims("https://ed.test"));
            let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
            let mut forged = claims("https://ed.test");
            forged["sub"] = json!("root");
            parts[1] = b64(&forged);
            parts.join(".")
        };
        assert_eq!(
            token_refusal(&tampered),
            AuthError::InvalidToken("bad signature".into())
        );
        assert_eq!(
            token_refusal("not-a-token"),
            AuthError::InvalidToken("malformed".into())
        );
    }

    #[test]
    fn every_setting_is_checked_and_the_error_names_its_key() {
        let cases: Vec<(String, &str)> = vec![
            (
                refused(|s| s.api_keys[1].sha256 = "abc".into()),
                "auth.api_keys[1].sha256: not a SHA-256 digest",
            ),
            (
                refused(|s| s.api_keys[0].id = String::new()),
                "auth.api_keys[0].id: must not be empty",
            ),
            (
                refused(|s| s.api_keys[0].id = "a:b".into()),
                "auth.api_keys[0].id: `a:b` must match",
            ),
            (
                refused(|s| s.api_keys[1].id = "ci".into()),
                "auth.api_keys[1].id: `ci` is also the id of auth.api_keys[0]",
            ),
            (
                refused(|s| s.api_keys[1].sha256 = s.api_keys[0].sha256.clone()),
                "auth.api_keys[1].sha256: the same key as auth.api_keys[0]",
            ),
            (
                refused(|s| s.api_keys[1].services = Some(vec!["Bad_Name".into()])),
                "auth.api_keys[1].services[0]: name `Bad_Name`",
            ),
            (
                refused(|s| s.api_keys[1].services = Some(Vec::new())),
                "auth.api_keys[1].services: an empty list",
            ),
            (
                refused(|s| s.jwt[0].algorithm = "none".into()),
                "auth.jwt[0].algorithm: `none` is not one of HS256, RS256, EdDSA",
            ),
            (
                refused(|s| s.jwt[0].algorithm = "HS512".into()),
                "auth.jwt[0].algorithm: `HS512` is not one of",
            ),
            (
                refused(|s| s.jwt[0].secret_file = None),
                "auth.jwt[0].secret_file: required for HS256",
            ),
            (
                refused(|s| s.jwt[0].public_key_file = Some(fixture("test-only-rs256-public.pem"))),
                "auth.jwt[0].public_key_file: not used with HS256",
            ),
            (
                refused(|s| s.jwt[1].secret_file = Some(fixture("test-only-hs256-secret"))),
                "auth.jwt[1].secret_file: not used with RS256",
            ),
            (
                refused(|s| s.jwt[1].public_key_file = Some("/nonexistent/key.pem".into())),
                "auth.jwt[1].public_key_file: cannot read /nonexistent/key.pem: No such file",
            ),
            (
                refused(|s| {
                    s.jwt[1].public_key_file = Some(fixture("test-only-rs256-private.pem"))
                }),
                "holds a private key",
            ),
            (
                refused(|s| s.jwt[1].public_key_file = Some(fixture("test-only-eddsa-public.pem"))),
                "auth.jwt[1].public_key_file: ",
            ),
            (
                refused(|s| s.jwt[2].public_key_file = Some(fixture("test-only-rs256-public.pem"))),
                "is not a PEM Ed25519 public key",
            ),
            (
                refused(|s| s.jwt[1].audiences.clear()),
                "auth.jwt[1].audiences: needs at least one audience",
            ),
            (
                refused(|s| s.jwt[1].leeway = Duration::from_secs(3600)),
                "auth.jwt[1].leeway: 1h is more than the limit of 5m",
            ),
            (
                refused(|s| s.jwt[2].issuer = "https://rs.test".into()),
                "auth.jwt[2].issuer: `https://rs.test` is also the issuer of auth.jwt[1]",
            ),
            (
                refused(|s| s.jwt[2].issuer = "https://ed.test#x".into()),
                "auth.jwt[2].issuer: must not contain `#`",
            ),
        ];
        for (error, expected) in cases {
            assert!(
                error.starts_with(expected) || error.contains(expected),
                "`{error}` should say `{expected}`"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "too short\n").unwrap();
        let error = refused(|s| s.jwt[0].secret_file = Some(short.clone()));
        assert!(
            error.contains("holds 9 bytes; an HS256 secret needs at least 32"),
            "{error}"
        );
        let weak = dir.path().join("weak.pem");
        let weak_key = std::process::Command::new("openssl")
            .args(["genrsa", "1024"])
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| {
                let mut child = std::process::Command::new("openssl")
                    .args(["rsa", "-pubout"])
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .ok()?;
                use std::io::Write as _;
                child.stdin.take()?.write_all(&out.stdout).ok()?;
                Some(child.wait_with_output().ok()?.stdout)
            });
        if let Some(pem) = weak_key {
            std::fs::write(&weak, pem).unwrap();
            let error = refused(|s| s.jwt[1].public_key_file = Some(weak.clone()));
            assert!(
                error.contains("is a 1024-bit RSA key; at least 2048"),
                "{error}"
            );
        }
    }

    #[test]
    fn managed_keys_are_consulted_after_the_configured_ones_and_never_shadow_them() {
        let managed = Arc::new(ManagedKeys::new());
        let auth = Authenticator::from_settings(&settings(), &managed).unwrap();
        managed
            .insert(key("deploy", "deploy-secret", Some(&["svc"])), &auth)
            .expect("added");
        let identity = auth
            .admit("svc", &with_key("deploy-secret"))
            .expect("admitted");
        assert_eq!(identity.id(), "deploy");
        assert_eq!(
            managed.list(),
            vec![key("deploy", "deploy-secret", Some(&["svc"]))]
        );
        assert_eq!(
            managed.insert(key("ci", "another", None), &auth),
            Err(KeyRefused::ConfiguredId("ci".into()))
        );
        assert_eq!(
            managed.insert(key("deploy", "another", None), &auth),
            Err(KeyRefused::IdTaken("deploy".into()))
        );
        assert_eq!(
            managed.insert(key("copy", KEY, None), &auth),
            Err(KeyRefused::SameKey("ci".into()))
        );
        assert!(matches!(
            managed.insert(key("", "x", None), &auth),
            Err(KeyRefused::Invalid(SettingsError { key, .. })) if key == "id"
        ));
        // A reload may not configure an id or a key added at run time.
        let mut reload = settings();
        reload.api_keys.push(key("deploy", "other", None));
        let error = Authenticator::from_settings(&reload, &managed).unwrap_err();
        assert_eq!(error.key, "auth.api_keys[2].id");
        assert!(managed.revoke("deploy"));
        assert!(!managed.revoke("deploy"));
        assert_eq!(
            auth.authenticate(&with_key("deploy-secret")).unwrap_err(),
            AuthError::UnknownKey
        );
        assert!(managed.list().is_empty());
    }

    #[test]
    fn identity_headers_are_the_gateways_alone() {
        let auth = authenticator();
        let mut headers = with_key(KEY);
        headers.insert(X_CONSUMER_ID, HeaderValue::from_static("admin"));
        headers.append(X_CONSUMER_ID, HeaderValue::from_static("root"));
        headers.insert(X_CONSUMER_CLAIMS, HeaderValue::from_static("e30"));
        let identity = auth.authenticate(&headers).unwrap();
        forward_identity(&mut headers, identity.as_ref(), true);
        assert_eq!(
            headers.get_all(X_CONSUMER_ID).iter().collect::<Vec<_>>(),
            ["ci"]
        );
        assert!(!headers.contains_key(X_CONSUMER_CLAIMS));
        assert!(!headers.contains_key(X_API_KEY), "the key is not passed on");

        let token = mint(Algorithm::HS256, &claims("https://hs.test"));
        let mut headers = with_token(&token);
        headers.insert(X_CONSUMER_ID, HeaderValue::from_static("admin"));
        let identity = auth.authenticate(&headers).unwrap();
        forward_identity(&mut headers, identity.as_ref(), true);
        assert_eq!(headers[X_CONSUMER_ID], "jwt:https://hs.test#ada");
        assert_eq!(headers[X_CONSUMER_CLAIMS], token.split('.').nth(1).unwrap());
        assert!(!headers.contains_key(header::AUTHORIZATION));

        // A service that did not ask for gateway auth keeps its own
        // credentials, never a client's identity headers.
        let mut headers = with_token("its-own-scheme");
        headers.insert(X_CONSUMER_ID, HeaderValue::from_static("admin"));
        forward_identity(&mut headers, None, false);
        assert!(!headers.contains_key(X_CONSUMER_ID));
        assert!(headers.contains_key(header::AUTHORIZATION));
    }

    #[test]
    fn refusals_answer_401_with_both_challenges_or_403() {
        let missing = Refusal::Missing.into_response("svc");
        assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
        let challenges: Vec<_> = missing
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .collect();
        assert_eq!(
            challenges,
            [
                "Bearer realm=\"plugin-host\"",
                "ApiKey realm=\"plugin-host\", header=\"X-API-Key\""
            ]
        );
        let invalid = Refusal::Invalid(AuthError::UnknownKey).into_response("svc");
        assert_eq!(
            invalid.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"plugin-host\", error=\"invalid_token\""
        );
        let forbidden = Refusal::OutOfScope {
            consumer: "ci".into(),
        }
        .into_response("svc");
        assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
        assert!(!forbidden.headers().contains_key(header::WWW_AUTHENTICATE));
    }

    #[test]
    fn a_digest_must_be_64_hex_digits() {
        assert_eq!(SecretDigest::from_hex("abc"), Err(BadDigest));
        assert_eq!(SecretDigest::from_hex(&"g".repeat(64)), Err(BadDigest));
        assert!(SecretDigest::from_hex(&"A".repeat(64)).is_ok());
    }

    #[test]
    fn a_key_or_a_token_claim_names_a_tenant() {
        let mut settings = settings();
        assert!(!authenticator().names_tenants());
        settings.api_keys[0].tenant = Some("acme".to_owned());
        settings.jwt[0].tenant_claim = Some("org".to_owned());
        let auth = Authenticator::from_settings(&settings, &Arc::new(ManagedKeys::new())).unwrap();
        assert!(auth.names_tenants());
        let by_key = auth.authenticate(&with_key(KEY)).unwrap().unwrap();
        assert_eq!(by_key.tenant(), Some("acme"));
        let issuer = settings.jwt[0].issuer.clone();
        let algorithm = Algorithm::HS256;
        let mut claims = claims(&issuer);
        claims["org"] = json!("globex");
        let token = auth
            .authenticate(&with_token(&mint(algorithm, &claims)))
            .unwrap()
            .unwrap();
        assert_eq!(token.tenant(), Some("globex"));
        claims["org"] = json!("Not A Tenant");
        let refused = auth
            .authenticate(&with_token(&mint(algorithm, &claims)))
            .unwrap_err();
        assert!(refused.to_string().contains("`org` claim"), "{refused}");
        settings.api_keys[0].tenant = Some("Bad".to_owned());
        let refused =
            Authenticator::from_settings(&settings, &Arc::new(ManagedKeys::new())).unwrap_err();
        assert_eq!(refused.key, "auth.api_keys[0].tenant");
    }
}
