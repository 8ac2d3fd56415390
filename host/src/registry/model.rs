//! What remote services send the registry: registrations and heartbeats,
//! checked so that every refusal names the field at fault.
//!
//! A body is read into a typed struct whose every field is optional (so
//! `null` is absent, as pydantic's `None`, and a missing required field is
//! reported by name rather than as serde's "missing field" prose), with
//! `serde_path_to_error` naming the field of a type error
//! (`endpoints[2].method`). Then one step fills in the defaults the seed
//! guide implies, normalises its spellings, and applies the rules every
//! service meets ([`service::validate`]). Unknown fields are ignored, so
//! clients written for a newer registry still register.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::str::FromStr;

use axum::http::StatusCode;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::remote::{Balancing, InstanceAddr, RemoteSpec, Reported};
use crate::service::{self, Endpoint, InvalidField, ServiceInfo, check_relative_path};
use crate::traffic::TrafficPolicy;

/// A checked `POST /api/registry/register` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The service.
    pub spec: RemoteSpec,
    /// The instance that registered.
    pub instance: InstanceAddr,
}

/// A checked `POST /api/registry/heartbeat` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// The service's name (the seed guide sends `SERVICE_CONFIG["name"]`).
    pub service_id: String,
    /// Its own view of its health.
    pub status: Reported,
    /// The instance it speaks for (`host:port`, as the registration's
    /// answer gave it); `None`: the caller's instances.
    pub instance_id: Option<String>,
}

/// A checked `POST /api/registry/deregister/{name}` body (optional).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deregistration {
    /// The instance to remove; `None`: the caller's instances.
    pub instance_id: Option<String>,
}

/// Why a request body is refused.
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    /// Not JSON at all.
    #[error("request body is not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// JSON, but a field is missing, of the wrong type or out of range.
    #[error(transparent)]
    Field(#[from] InvalidField),
}

impl Invalid {
    /// The field at fault; `body` for the body as a whole.
    pub fn field(&self) -> &str {
        match self {
            Invalid::Json(_) => "body",
            Invalid::Field(invalid) => &invalid.field,
        }
    }

    /// 400 for a body that is not JSON, 422 for JSON that does not fit.
    pub fn status(&self) -> StatusCode {
        match self {
            Invalid::Json(_) => StatusCode::BAD_REQUEST,
            Invalid::Field(_) => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }
}

/// Defaults the seed guide's `SERVICE_CONFIG` implies.
const DEFAULT_BASE_PATH: &str = "/";
const DEFAULT_HEALTH_CHECK_URL: &str = "/health";

#[derive(Deserialize)]
struct RegistrationBody {
    name: Option<String>,
    display_name: Option<String>,
    description: Option<String>,
    version: Option<String>,
    host: Option<String>,
    port: Option<serde_json::Number>,
    base_path: Option<String>,
    health_check_url: Option<String>,
    /// Any JSON value per key: kept as text, so clients written for
    /// registries that took any JSON still register.
    metadata: Option<BTreeMap<String, Value>>,
    tags: Option<Vec<String>>,
    requires_auth: Option<bool>,
    endpoints: Option<Vec<EndpointBody>>,
    load_balancing: Option<Balancing>,
}

#[derive(Deserialize)]
struct EndpointBody {
    path: Option<String>,
    method: Option<String>,
    description: Option<String>,
    is_public: Option<bool>,
}

#[derive(Deserialize)]
struct HeartbeatBody {
    service_id: Option<String>,
    status: Option<String>,
    instance_id: Option<String>,
}

#[derive(Deserialize)]
struct DeregistrationBody {
    instance_id: Option<String>,
}

/// Checks a registration body. Required: `name`, `version`, `host`, `port`;
/// everything else has a default.
pub fn parse_registration(body: &[u8]) -> Result<Registration, Invalid> {
    let body: RegistrationBody = parse(body, &["endpoints"])?;
    let name = required(body.name, "name")?;
    let instance = InstanceAddr {
        host: check_host(&required(body.host, "host")?)
            .map_err(|reason| InvalidField::new("host", reason))?,
        port: check_port(&required(body.port, "port")?)?,
    };
    if instance.authority().is_err() {
        return Err(InvalidField::new("host", "does not form a valid `host:port`").into());
    }
    let base_path = with_leading_slash(body.base_path.as_deref().unwrap_or(DEFAULT_BASE_PATH));
    check_base_path(&base_path).map_err(|reason| InvalidField::new("base_path", reason))?;
    let endpoints = body
        .endpoints
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(index, endpoint)| {
            let field = |key: &str| format!("endpoints[{index}].{key}");
            Ok(Endpoint {
                // The guide writes `"path": "hello"`; plugins list `/hello`.
                // One spelling in the listing, whoever registered.
                path: with_leading_slash(&required(endpoint.path, &field("path"))?),
                method: required(endpoint.method, &field("method"))?.to_ascii_uppercase(),
                description: endpoint.description.unwrap_or_default(),
                is_public: endpoint.is_public.unwrap_or(true),
            })
        })
        .collect::<Result<Vec<_>, InvalidField>>()?;
    let info = ServiceInfo {
        display_name: body.display_name.unwrap_or_else(|| name.clone()),
        name,
        description: body.description.unwrap_or_default(),
        version: required(body.version, "version")?,
        health_check_url: with_leading_slash(
            body.health_check_url
                .as_deref()
                .unwrap_or(DEFAULT_HEALTH_CHECK_URL),
        ),
        metadata: body
            .metadata
            .unwrap_or_default()
            .into_iter()
            .map(|(key, value)| match value {
                Value::String(text) => (key, text),
                other => (key, other.to_string()),
            })
            .collect(),
        tags: body.tags.unwrap_or_default(),
        requires_auth: body.requires_auth.unwrap_or(false),
        endpoints,
    };
    let version = service::validate(&info)?;
    // Listed and compared in its normalised form (`1.2` is `1.2.0`).
    let info = ServiceInfo {
        version: version.to_string(),
        ..info
    };
    Ok(Registration {
        spec: RemoteSpec {
            info: std::sync::Arc::new(info),
            base_path,
            load_balancing: body.load_balancing,
        },
        instance,
    })
}

/// Checks a heartbeat body: `service_id` required, `status` `"healthy"`
/// (the default) or `"unhealthy"`, in any case.
pub fn parse_heartbeat(body: &[u8]) -> Result<Heartbeat, Invalid> {
    let body: HeartbeatBody = parse(body, &[])?;
    let service_id = required(body.service_id, "service_id")?;
    let status = match body.status.as_deref().unwrap_or("healthy") {
        status if status.eq_ignore_ascii_case("healthy") => Reported::Healthy,
        status if status.eq_ignore_ascii_case("unhealthy") => Reported::Unhealthy,
        other => {
            return Err(InvalidField::new(
                "status",
                format!("`{other}` is not a status; use \"healthy\" or \"unhealthy\""),
            )
            .into());
        }
    };
    Ok(Heartbeat {
        service_id,
        status,
        instance_id: body.instance_id,
    })
}

/// Checks a deregistration body: empty, or an object with an optional
/// `instance_id`.
pub fn parse_deregistration(body: &[u8]) -> Result<Deregistration, Invalid> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Deregistration::default());
    }
    let body: DeregistrationBody = parse(body, &[])?;
    Ok(Deregistration {
        instance_id: body.instance_id,
    })
}

/// Checks a traffic split body (`PUT .../traffic`): `weights` (version ->
/// 0..=10000, a positive sum) and an optional `sticky` (`{"header": H}` or
/// `{"cookie": C}`). Whether the versions exist is the registry's to say.
pub fn parse_traffic(body: &[u8]) -> Result<TrafficPolicy, Invalid> {
    let policy: TrafficPolicy = parse(body, &[])?;
    policy.check()?;
    Ok(policy)
}

/// Reads `body` as a `T`: a syntax error is about the body, a type error
/// about the field at the path where it happened.
///
/// serde's derived structs also accept a JSON array (fields by position),
/// so the body, and each object listed under `objects_in`, is first
/// checked to be an object.
fn parse<T: DeserializeOwned>(body: &[u8], objects_in: &[&str]) -> Result<T, Invalid> {
    let value: Value = serde_json::from_slice(body).map_err(Invalid::Json)?;
    let Value::Object(fields) = &value else {
        return Err(InvalidField::new("body", must_be_an_object(&value)).into());
    };
    for key in objects_in {
        if let Some(Value::Array(items)) = fields.get(*key)
            && let Some((index, item)) = items.iter().enumerate().find(|(_, v)| !v.is_object())
        {
            return Err(
                InvalidField::new(format!("{key}[{index}]"), must_be_an_object(item)).into(),
            );
        }
    }
    serde_path_to_error::deserialize(value).map_err(|error| {
        let field = error.path().to_string();
        InvalidField::new(field, error.into_inner().to_string()).into()
    })
}

fn must_be_an_object(value: &Value) -> String {
    let found = match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    format!("must be a JSON object, found {found}")
}

fn required<T>(value: Option<T>, field: &str) -> Result<T, InvalidField> {
    value.ok_or_else(|| InvalidField::new(field, "is required"))
}

fn check_port(port: &serde_json::Number) -> Result<u16, InvalidField> {
    match port.as_u64().map(u16::try_from) {
        Some(Ok(port)) if port != 0 => Ok(port),
        _ => Err(InvalidField::new(
            "port",
            format!("{port} is not a port: use an integer from 1 to 65535"),
        )),
    }
}

fn with_leading_slash(path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    }
}

/// A host name or an IP address literal (IPv6 with or without brackets);
/// returned without brackets.
fn check_host(host: &str) -> Result<String, String> {
    let bare = host
        .strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
        .unwrap_or(host);
    if bare.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if IpAddr::from_str(bare).is_ok() {
        return Ok(bare.to_owned());
    }
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if bare.len() > 253 || !bare.trim_end_matches('.').split('.').all(label_ok) {
        return Err(format!(
            "`{host}` is not a host name or an IP address (e.g. localhost, 127.0.0.1, ::1)"
        ));
    }
    Ok(bare.to_owned())
}

/// A path prefix without query or fragment that stays a prefix: no dot
/// segments or encoded slashes.
fn check_base_path(path: &str) -> Result<(), String> {
    if path.len() > service::limits::PATH {
        return Err(format!(
            "is {} bytes long, the limit is {}",
            path.len(),
            service::limits::PATH
        ));
    }
    if path.contains(['?', '#']) {
        return Err("must be a path without `?` or `#`".to_owned());
    }
    check_relative_path(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The seed guide's `SERVICE_CONFIG`, as its client sends it.
    fn guide_config() -> Value {
        json!({
            "name": "my-plugin",
            "display_name": "我的插件服务",
            "description": "这是我的第一个插件服务",
            "version": "1.0.0",
            "host": "localhost",
            "port": 8010,
            "base_path": "/",
            "health_check_url": "/health",
            "metadata": {"author": "Your Name", "category": "custom"},
            "tags": ["plugin", "custom"],
            "requires_auth": false,
            "endpoints": [
                {"path": "hello", "method": "GET", "description": "问候端点", "is_public": true},
                {"path": "data", "method": "GET", "description": "获取数据列表", "is_public": true},
                {"path": "data", "method": "POST", "description": "创建数据", "is_public": true},
            ],
        })
    }

    fn parse(value: &Value) -> Result<Registration, Invalid> {
        parse_registration(value.to_string().as_bytes())
    }

    fn refused_field(value: Value) -> (StatusCode, String) {
        let error = parse(&value).expect_err("refused");
        (error.status(), error.field().to_owned())
    }

    #[test]
    fn the_guides_config_is_accepted_as_sent() {
        let registration = parse(&guide_config()).unwrap();
        assert_eq!(registration.instance.to_string(), "localhost:8010");
        assert_eq!(registration.spec.base_path, "/");
        assert_eq!(registration.spec.info.health_check_url, "/health");
        assert_eq!(registration.spec.info.endpoints[0].path, "/hello");
        assert_eq!(registration.spec.info.metadata["author"], "Your Name");
    }

    #[test]
    fn optional_fields_have_defaults() {
        let registration =
            parse(&json!({"name": "x", "version": "1", "host": "::1", "port": 1})).unwrap();
        assert_eq!(registration.spec.base_path, "/");
        assert_eq!(registration.spec.info.health_check_url, "/health");
        assert_eq!(registration.spec.info.display_name, "x");
        assert_eq!(registration.instance.to_string(), "[::1]:1");
        assert!(registration.spec.info.endpoints.is_empty());
        let nulls = json!({"name": "x", "version": "1", "host": "h", "port": 1,
            "tags": null, "endpoints": null, "metadata": null, "requires_auth": null});
        assert!(parse(&nulls).is_ok());
    }

    #[test]
    fn every_refusal_names_its_field() {
        let with = |key: &str, value: Value| {
            let mut config = guide_config();
            config[key] = value;
            config
        };
        let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
        let cases = [
            (with("port", json!(0)), "port"),
            (with("port", json!(65536)), "port"),
            (with("port", json!(-1)), "port"),
            (with("port", json!("8010")), "port"),
            (with("port", json!(80.5)), "port"),
            (with("name", json!("My_Plugin")), "name"),
            (with("name", json!(7)), "name"),
            (with("host", json!("exa mple")), "host"),
            (with("host", json!("")), "host"),
            (with("base_path", json!("/a/../b")), "base_path"),
            (with("version", json!(" ")), "version"),
            (
                with("health_check_url", json!("http://elsewhere/health")),
                "health_check_url",
            ),
            (with("tags", json!(["a", 1])), "tags[1]"),
            (with("metadata", json!([])), "metadata"),
            (with("requires_auth", json!("no")), "requires_auth"),
            (
                with("endpoints", json!([{"path": "x", "method": "FETCH"}])),
                "endpoints[0].method",
            ),
            (
                with("endpoints", json!([{"method": "GET"}])),
                "endpoints[0].path",
            ),
            (
                with(
                    "endpoints",
                    json!([{"path": "/x", "method": "GET", "is_public": 1}]),
                ),
                "endpoints[0].is_public",
            ),
            (with("endpoints", json!(["x"])), "endpoints[0]"),
            (json!({"version": "1", "host": "h", "port": 1}), "name"),
            (json!({"name": "x", "host": "h", "port": 1}), "version"),
            (json!({"name": "x", "version": "1", "port": 1}), "host"),
            (json!({"name": "x", "version": "1", "host": "h"}), "port"),
            (json!([1, 2]), "body"),
        ];
        for (config, field) in cases {
            assert_eq!(
                refused_field(config.clone()),
                (unprocessable, field.to_owned()),
                "{config}"
            );
        }
        for not_json in [&b"{\"name\": "[..], b"{} x", b""] {
            let error = parse_registration(not_json).unwrap_err();
            assert_eq!(
                (error.status(), error.field()),
                (StatusCode::BAD_REQUEST, "body")
            );
        }
    }

    #[test]
    fn deregistrations_and_balancing() {
        assert_eq!(
            parse_deregistration(b"").unwrap(),
            Deregistration::default()
        );
        assert_eq!(
            parse_deregistration(b"{}").unwrap(),
            Deregistration::default()
        );
        assert_eq!(
            parse_deregistration(br#"{"instance_id": "h:1"}"#)
                .unwrap()
                .instance_id
                .as_deref(),
            Some("h:1")
        );
        assert_eq!(
            parse_deregistration(br#"{"instance_id": 1}"#)
                .unwrap_err()
                .field(),
            "instance_id"
        );
        let mut config = guide_config();
        config["load_balancing"] = json!("least_outstanding");
        assert_eq!(
            parse(&config).unwrap().spec.load_balancing,
            Some(Balancing::LeastOutstanding)
        );
        config["load_balancing"] = json!("random");
        assert_eq!(refused_field(config).1, "load_balancing");
    }

    #[test]
    fn messages_carry_no_json_position() {
        let error = parse(&json!({"name": 7})).unwrap_err();
        assert_eq!(
            error.to_string(),
            "name: invalid type: integer `7`, expected a string"
        );
    }

    #[test]
    fn metadata_values_of_any_type_are_kept_as_text() {
        let mut config = guide_config();
        config["metadata"] = json!({"replicas": 3, "labels": {"a": true}});
        let metadata = parse(&config).unwrap().spec.info.metadata.clone();
        assert_eq!(metadata["replicas"], "3");
        assert_eq!(metadata["labels"], r#"{"a":true}"#);
    }

    #[test]
    fn heartbeats() {
        let beat = parse_heartbeat(br#"{"service_id": "my-plugin", "status": "healthy"}"#).unwrap();
        assert_eq!(beat.status, Reported::Healthy);
        let beat = parse_heartbeat(br#"{"service_id": "my-plugin"}"#).unwrap();
        assert_eq!(beat.status, Reported::Healthy);
        let beat = parse_heartbeat(br#"{"service_id": "x", "status": "UNHEALTHY"}"#).unwrap();
        assert_eq!(beat.status, Reported::Unhealthy);
        assert_eq!(beat.instance_id, None);
        let beat =
            parse_heartbeat(br#"{"service_id": "x", "instance_id": "127.0.0.1:1"}"#).unwrap();
        assert_eq!(beat.instance_id.as_deref(), Some("127.0.0.1:1"));
        assert_eq!(
            parse_heartbeat(br#"{"status": "healthy"}"#)
                .unwrap_err()
                .field(),
            "service_id"
        );
        assert_eq!(
            parse_heartbeat(br#"{"service_id": "x", "status": "fine"}"#)
                .unwrap_err()
                .field(),
            "status"
        );
    }
}
