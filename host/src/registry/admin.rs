//! The registry's admin endpoints, behind the admin token: API keys added
//! and revoked at run time, without a restart, and the removal of a remote
//! service whoever registered it (what the console's operator does).
//!
//! A key is kept as its digest only, in the registry's database (durable
//! before it is acknowledged) and in the gateway's [`ManagedKeys`].

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::Registry;
use super::store::StoredApiKey;
use super::tokens::Writer;
use crate::auth::{ApiKeySettings, KeyRefused, SecretDigest};
use crate::http::ApiError;

/// `POST /api/registry/admin/api-keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    id: String,
    /// The key's digest; absent: the registry generates a key and answers
    /// it once.
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    services: Option<Vec<String>>,
    /// The tenant the key's requests belong to; absent: none named.
    #[serde(default)]
    tenant: Option<String>,
}

pub(super) async fn list(
    State(registry): State<Registry>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    registry.admin(&headers)?;
    let keys: Vec<_> = registry
        .shared
        .managed_keys
        .list()
        .into_iter()
        .map(|key| {
            let mut listed = json!({"id": key.id, "services": key.services});
            if let Some(tenant) = key.tenant {
                listed["tenant"] = json!(tenant);
            }
            listed
        })
        .collect();
    Ok(axum::Json(json!({"api_keys": keys})).into_response())
}

pub(super) async fn add(
    State(registry): State<Registry>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    registry.admin(&headers)?;
    let body = registry.read_body(body, &headers).await?;
    let new: NewKey =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&body))
            .map_err(|error| {
                let field = error.path().to_string();
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("{field}: {}", error.inner()),
                )
                .with("field", field)
            })?;
    let (sha256, generated) = match new.sha256 {
        Some(sha256) => (sha256, None),
        None => {
            let key = generate_key()?;
            (hex_digest(&key), Some(key))
        }
    };
    let settings = ApiKeySettings {
        id: new.id,
        sha256,
        services: new.services,
        tenant: new.tenant,
    };
    super::uncancellable(async move { registry.add_api_key(settings, generated).await }).await
}

pub(super) async fn revoke(
    State(registry): State<Registry>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    registry.admin(&headers)?;
    let Path(id) = id.map_err(super::bad_path)?;
    super::uncancellable(async move { registry.revoke_api_key(id).await }).await
}

/// `DELETE /api/registry/admin/services/{name}`: the service goes, with
/// every instance, whoever registered it; in the tenant `X-Tenant-ID`
/// names (default: the default tenant).
pub(super) async fn remove_service(
    State(registry): State<Registry>,
    ConnectInfo(caller): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    registry.admin(&headers)?;
    let Path(name) = name.map_err(super::bad_path)?;
    let tenant = registry.tenant(&Writer::Admin, &headers)?;
    super::uncancellable(async move {
        (registry)
            .deregister(
                (&tenant, &name),
                super::Deregistered::Every,
                caller.ip(),
                Writer::Admin,
            )
            .await
    })
    .await
}

impl Registry {
    async fn add_api_key(
        &self,
        settings: ApiKeySettings,
        generated: Option<String>,
    ) -> Result<Response, ApiError> {
        let _writes = self.shared.key_writes.lock().await;
        let stored = StoredApiKey {
            id: settings.id.clone(),
            sha256: settings.sha256.clone(),
            services: settings.services.clone(),
            tenant: settings.tenant.clone(),
        };
        let id = settings.id.clone();
        // Checked in full by the insert; undone if the write fails, so an
        // answered key is always a stored one.
        self.shared
            .managed_keys
            .insert(settings, &self.shared.authenticator.load())
            .map_err(refused_key)?;
        let stored_key = stored.clone();
        if let Err(error) = self
            .durably(&id, move |store| store.put_api_key(&stored_key))
            .await
        {
            self.shared.managed_keys.revoke(&id);
            return Err(error);
        }
        tracing::info!(api_key = %id, generated = generated.is_some(), "API key added");
        let mut answer = json!({"id": id, "services": stored.services, "status": "added"});
        if let Some(tenant) = &stored.tenant {
            answer["tenant"] = json!(tenant);
        }
        if let Some(key) = generated {
            answer["key"] = json!(key);
            answer["note"] = json!("the key is shown this once; the host keeps only its digest");
        }
        Ok((StatusCode::CREATED, axum::Json(answer)).into_response())
    }

    async fn revoke_api_key(&self, id: String) -> Result<Response, ApiError> {
        let _writes = self.shared.key_writes.lock().await;
        let known = self
            .shared
            .managed_keys
            .list()
            .iter()
            .any(|key| key.id == id);
        if !known {
            let (status, message) = if self.shared.authenticator.load().defines_key(&id) {
                (
                    StatusCode::CONFLICT,
                    format!(
                        "API key `{id}` is defined in the config file: remove it there and reload"
                    ),
                )
            } else {
                (
                    StatusCode::NOT_FOUND,
                    format!("no API key `{id}` was added"),
                )
            };
            return Err(ApiError::new(status, message).with("field", "id"));
        }
        // Durable first: a revocation answered is a revocation kept.
        let key = id.clone();
        self.durably(&id, move |store| store.delete_api_key(&key))
            .await?;
        self.shared.managed_keys.revoke(&id);
        tracing::info!(api_key = %id, "API key revoked");
        Ok(axum::Json(json!({"id": id, "status": "revoked"})).into_response())
    }
}

fn refused_key(refused: KeyRefused) -> ApiError {
    let (status, field) = match &refused {
        KeyRefused::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, None),
        KeyRefused::ConfiguredId(_) | KeyRefused::IdTaken(_) => (StatusCode::CONFLICT, Some("id")),
        KeyRefused::SameKey(_) => (StatusCode::CONFLICT, Some("sha256")),
    };
    let error = ApiError::new(status, refused.to_string());
    match field {
        Some(field) => error.with("field", field),
        None => error,
    }
}

/// A new random key: 256 bits from the OS's generator, as hex.
fn generate_key() -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the host could not generate a key: {error}; send a `sha256` instead"),
        )
    })?;
    Ok(format!("phk_{}", hex::encode(bytes)))
}

fn hex_digest(key: &str) -> String {
    SecretDigest::of(key.as_bytes()).to_hex()
}
