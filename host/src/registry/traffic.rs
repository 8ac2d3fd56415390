//! `/api/registry/services/{name}/traffic`: a service name's traffic split
//! between its versions (see [`crate::traffic`]).
//!
//! Who may change it: the admin token always; with registry tokens, the
//! token that owns a remote name; without tokens, an address that owns
//! one of a remote name's instances. A plugin name's split takes the admin
//! token: its versions are the operator's files, and no network caller
//! owns them. A split is written to the store before it is routed, and
//! kept when the versions it names go (they may come back).
//!
//! A split is per name in the caller's tenant (see `docs/MULTI_TENANT.md`):
//! a tenant sets the splits of its own names only, never of a shared one.

use std::net::{IpAddr, SocketAddr};

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::tokens::Writer;
use super::{Registry, bad_path, may_write, model, refusal, remote_of, uncancellable};
use crate::http::ApiError;
use crate::table::{Backend, Versions};
use crate::tenant;
use crate::traffic::TrafficPolicy;

/// `GET`: the split of `name` (the caller's tenant's, else the shared
/// one; for the admin token, the default tenant's), `null` when it has
/// none.
pub(super) async fn get(
    State(registry): State<Registry>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    registry.reader(&headers)?;
    let Path(name) = name.map_err(bad_path)?;
    let versions = match registry.reading_tenant(&headers)? {
        Some(tenant) => registry
            .shared
            .services
            .resolve(&tenant, &name)
            .map_or_else(|| registry.versions(&tenant, &name), Ok)?,
        None => registry.versions(tenant::DEFAULT, &name)?,
    };
    Ok(axum::Json(json!({
        "service": name,
        "traffic": versions.policy(),
        "versions": versions.all().iter().map(|service| service.version().to_string()).collect::<Vec<_>>(),
    }))
    .into_response())
}

/// `PUT`: sets the split of `name`.
pub(super) async fn put(
    State(registry): State<Registry>,
    ConnectInfo(caller): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let writer = registry.writer(&headers)?;
    let tenant = registry.tenant(&writer, &headers)?;
    let Path(name) = name.map_err(bad_path)?;
    let body = registry.read_body(body, &headers).await?;
    let policy = model::parse_traffic(&body).map_err(refusal)?;
    uncancellable(async move {
        registry
            .set_split((&tenant, &name), Some(policy), caller.ip(), &writer)
            .await
    })
    .await
}

/// `DELETE`: clears the split of `name`; its default version takes every
/// request that names none.
pub(super) async fn delete(
    State(registry): State<Registry>,
    ConnectInfo(caller): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let writer = registry.writer(&headers)?;
    let tenant = registry.tenant(&writer, &headers)?;
    let Path(name) = name.map_err(bad_path)?;
    uncancellable(async move {
        registry
            .set_split((&tenant, &name), None, caller.ip(), &writer)
            .await
    })
    .await
}

impl Registry {
    /// The versions of `name` in `tenant` (its own, not a shared one), or
    /// the 404 naming it.
    fn versions(&self, tenant: &str, name: &str) -> Result<std::sync::Arc<Versions>, ApiError> {
        self.shared
            .services
            .get(&tenant::key(tenant, name))
            .ok_or_else(|| {
                let error = if tenant::is_default(tenant) {
                    ApiError::new(StatusCode::NOT_FOUND, format!("no service named `{name}`"))
                } else {
                    ApiError::new(
                        StatusCode::NOT_FOUND,
                        format!("tenant `{tenant}` has no service named `{name}`"),
                    )
                    .with("tenant", tenant)
                };
                error.with("service", name)
            })
    }

    /// Sets or clears the split of `name` if `writer` at `caller` may:
    /// durably, then in the table.
    async fn set_split(
        &self,
        (tenant, name): (&str, &str),
        policy: Option<TrafficPolicy>,
        caller: IpAddr,
        writer: &Writer,
    ) -> Result<Response, ApiError> {
        let _writes = self.shared.writes.lock(&tenant::key(tenant, name)).await;
        let versions = self.versions(tenant, name)?;
        may_split(&versions, caller, writer)?;
        if let Some(policy) = &policy
            && let Some(missing) = policy
                .weights
                .keys()
                .find(|version| versions.version(version).is_none())
        {
            let present: Vec<String> = versions
                .all()
                .iter()
                .map(|service| service.version().to_string())
                .collect();
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "service `{name}` has no version {missing}; its versions are {}",
                    present.join(", ")
                ),
            )
            .with("field", format!("weights.{missing}"))
            .with("service", name)
            .with("versions", present));
        }
        let stored = policy.clone();
        let (owned_tenant, owned_name) = (tenant.to_owned(), name.to_owned());
        self.durably(name, move |store| match &stored {
            Some(policy) => store.put_traffic(&owned_tenant, &owned_name, policy),
            None => store.delete_traffic(&owned_tenant, &owned_name),
        })
        .await?;
        tracing::info!(service = %name, tenant = %tenant, split = ?policy, "traffic split changed");
        self.shared
            .services
            .set_policy(versions.key(), policy.clone());
        Ok(axum::Json(json!({
            "service": name,
            "traffic": policy,
            "status": if policy.is_some() { "set" } else { "cleared" },
        }))
        .into_response())
    }
}

/// Whether `writer` at `caller` may change the split of `versions`' name.
fn may_split(versions: &Versions, caller: IpAddr, writer: &Writer) -> Result<(), ApiError> {
    let name = versions.name();
    let forbidden = |reason: String| {
        ApiError::new(StatusCode::FORBIDDEN, reason)
            .with("field", "name")
            .with("service", name)
    };
    if let Backend::Plugin(_) = versions.default_version().backend {
        return match writer {
            Writer::Admin => Ok(()),
            Writer::Anyone => Err(forbidden(format!(
                "`{name}` is a plugin: only the registry's admin token may set a plugin's traffic split, and the registry has no tokens; configure [auth.registry] with an admin token (docs/REGISTRY_API.md) to enable it"
            ))),
            Writer::Token(token) => Err(forbidden(format!(
                "`{name}` is a plugin: only the registry's admin token may set a plugin's traffic split, and `{}` is a registration token",
                token.id()
            ))),
        };
    }
    let first = versions
        .all()
        .first()
        .and_then(|service| remote_of(service));
    may_write(writer, name, first, "name")?;
    let owns_one = versions
        .all()
        .iter()
        .filter_map(|service| remote_of(service))
        .any(|remote| !remote.owned_by(caller).is_empty());
    if matches!(writer, Writer::Anyone) && !owns_one {
        return Err(forbidden(format!(
            "only an address that owns an instance of `{name}` may change its traffic split, and {caller} owns none"
        )));
    }
    Ok(())
}
