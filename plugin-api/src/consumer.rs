//! Who called: the identity the host's gateway established for a request
//! to a service that declared [`ServiceConfig::requires_auth`].
//!
//! [`ServiceConfig::requires_auth`]: crate::ServiceConfig::requires_auth

use base64::Engine as _;
use serde_json::Value;

/// Header carrying the caller's identity: an API key's id, or
/// `jwt:<iss>#<sub>` for a JSON Web Token.
pub const CONSUMER_ID_HEADER: &str = "x-consumer-id";

/// Header carrying a JSON Web Token's verified claims: the token's payload
/// as it was signed, base64url-encoded without padding.
pub const CONSUMER_CLAIMS_HEADER: &str = "x-consumer-claims";

/// The caller of a request, as the host's gateway authenticated it.
///
/// The host removes any [`CONSUMER_ID_HEADER`] and
/// [`CONSUMER_CLAIMS_HEADER`] a client sent before a request reaches any
/// service, and sets them only for a credential it verified, so a plugin
/// can trust them.
#[derive(Debug, Clone, PartialEq)]
pub struct Consumer {
    id: String,
    claims: Option<Value>,
}

impl Consumer {
    /// Reads the identity headers; `None` without an id.
    pub(crate) fn from_headers(id: Option<&str>, claims: Option<&str>) -> Option<Self> {
        let id = id.filter(|id| !id.is_empty())?.to_owned();
        let claims = claims.and_then(|encoded| {
            let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(encoded.trim_end_matches('='))
                .ok()?;
            serde_json::from_slice(&json).ok()
        });
        Some(Self { id, claims })
    }

    /// The caller's id: the API key's configured id, or `jwt:<iss>#<sub>`
    /// for a token (API key ids never contain `:`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A token's verified claims (`sub`, `iss`, `aud`, `exp` and whatever
    /// else the issuer put in); `None` for an API key.
    pub fn claims(&self) -> Option<&Value> {
        self.claims.as_ref()
    }

    /// A token's subject (`sub`); `None` for an API key.
    pub fn subject(&self) -> Option<&str> {
        self.claims.as_ref()?.get("sub")?.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_key_has_an_id_and_no_claims() {
        let consumer = Consumer::from_headers(Some("ci"), None).expect("identity");
        assert_eq!(consumer.id(), "ci");
        assert_eq!(consumer.claims(), None);
        assert_eq!(consumer.subject(), None);
    }

    #[test]
    fn a_token_carries_its_claims() {
        // {"sub":"ada","iss":"https://issuer"}
        let claims = "eyJzdWIiOiJhZGEiLCJpc3MiOiJodHRwczovL2lzc3VlciJ9";
        let consumer =
            Consumer::from_headers(Some("jwt:https://issuer#ada"), Some(claims)).expect("identity");
        assert_eq!(consumer.subject(), Some("ada"));
        assert_eq!(consumer.claims().unwrap()["iss"], "https://issuer");
    }

    #[test]
    fn no_id_is_no_consumer() {
        assert_eq!(Consumer::from_headers(None, Some("e30")), None);
        assert_eq!(Consumer::from_headers(Some(""), None), None);
    }
}
