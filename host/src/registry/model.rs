//! What remote services send the registry: registrations and heartbeats,
//! checked field by field so that every refusal names the field at fault.
//!
//! Parsing goes through `serde_json::Value` rather than a derived struct:
//! serde's derive reports "missing field" or "invalid type" as prose with a
//! line and column, and a client needs the field's name (`endpoints[2].method`)
//! as data.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use axum::http::StatusCode;
use axum::http::uri::{Authority, InvalidUri, PathAndQuery};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::http::check_service_path;
use crate::services::{Endpoint, HTTP_METHODS, ServiceInfo, validate_name};

/// Where one instance of a remote service listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceAddr {
    /// Host name or IP address (an IPv6 address without brackets).
    pub host: String,
    /// TCP port, never 0.
    pub port: u16,
}

impl InstanceAddr {
    /// `host:port` with an IPv6 address bracketed, as the authority of the
    /// instance's URLs. Fails only for an address that was never checked
    /// (a database record edited by hand).
    pub fn authority(&self) -> Result<Authority, InvalidUri> {
        Authority::from_str(&self.to_string())
    }
}

impl fmt::Display for InstanceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// What a registration declares about a service, apart from where it
/// listens: shared by all its instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteSpec {
    /// Name, description, endpoints... as for any service.
    pub info: ServiceInfo,
    /// Path prefix on the instance that `/api/<name>/` maps to; starts with
    /// `/`.
    pub base_path: String,
}

/// A checked `POST /api/registry/register` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The service.
    pub spec: RemoteSpec,
    /// The instance that registered.
    pub instance: InstanceAddr,
}

/// What a heartbeat says about the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    /// `"healthy"`: route to it.
    Healthy,
    /// `"unhealthy"`: route nothing to it until a healthy heartbeat.
    Unhealthy,
}

/// A checked `POST /api/registry/heartbeat` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// The service's name (the seed guide sends `SERVICE_CONFIG["name"]`).
    pub service_id: String,
    /// Its own view of its health.
    pub status: Reported,
}

/// Why a request body is refused.
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    /// Not JSON at all.
    #[error("request body is not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// JSON, but a field is missing, of the wrong type or out of range.
    #[error("{field}: {problem}")]
    Field {
        /// Path of the field, e.g. `port` or `endpoints[1].method`.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
}

impl Invalid {
    /// The field at fault; `body` for the body as a whole.
    pub fn field(&self) -> &str {
        match self {
            Invalid::Json(_) => "body",
            Invalid::Field { field, .. } => field,
        }
    }

    /// 400 for a body that is not JSON, 422 for JSON that does not fit.
    pub fn status(&self) -> StatusCode {
        match self {
            Invalid::Json(_) => StatusCode::BAD_REQUEST,
            Invalid::Field { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }
}

/// Defaults the seed guide's `SERVICE_CONFIG` implies.
const DEFAULT_BASE_PATH: &str = "/";
const DEFAULT_HEALTH_CHECK_URL: &str = "/health";

/// Checks a registration body. Required: `name`, `version`, `host`, `port`;
/// everything else has a default. Unknown fields are ignored, so clients
/// written for a newer registry still register.
pub fn parse_registration(body: &[u8]) -> Result<Registration, Invalid> {
    let value: Value = serde_json::from_slice(body).map_err(Invalid::Json)?;
    let object = Object::root(&value)?;

    let name = object.required_str("name")?;
    validate_name(name).map_err(|error| object.invalid("name", error.to_string()))?;
    let version = object.required_str("version")?;
    if version.trim().is_empty() {
        return Err(object.invalid("version", "must not be empty"));
    }
    let host = object.required_str("host")?;
    let host = check_host(host).map_err(|problem| object.invalid("host", problem))?;
    let port = object.port("port")?;
    let instance = InstanceAddr { host, port };
    if instance.authority().is_err() {
        return Err(object.invalid("host", "does not form a valid `host:port`"));
    }

    let base_path = object.str_or("base_path", DEFAULT_BASE_PATH)?;
    let base_path = check_base_path(base_path).map_err(|p| object.invalid("base_path", p))?;
    let health_check_url = object.str_or("health_check_url", DEFAULT_HEALTH_CHECK_URL)?;
    let health_check_url = check_health_check_url(health_check_url)
        .map_err(|problem| object.invalid("health_check_url", problem))?;

    let endpoints = object
        .array("endpoints")?
        .iter()
        .enumerate()
        .map(|(index, value)| endpoint(&object.element("endpoints", index, value)?))
        .collect::<Result<Vec<_>, _>>()?;
    let tags = object
        .array("tags")?
        .iter()
        .enumerate()
        .map(|(index, value)| {
            value.as_str().map(str::to_owned).ok_or_else(|| {
                object.invalid_at(&format!("tags[{index}]"), expected("a string", value))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let info = ServiceInfo {
        name: name.to_owned(),
        display_name: object.str_or("display_name", name)?.to_owned(),
        description: object.str_or("description", "")?.to_owned(),
        version: version.to_owned(),
        health_check_url,
        metadata: object.metadata("metadata")?,
        tags,
        requires_auth: object.bool_or("requires_auth", false)?,
        endpoints,
    };
    Ok(Registration {
        spec: RemoteSpec { info, base_path },
        instance,
    })
}

/// Checks a heartbeat body: `service_id` required, `status` `"healthy"`
/// (the default) or `"unhealthy"`.
pub fn parse_heartbeat(body: &[u8]) -> Result<Heartbeat, Invalid> {
    let value: Value = serde_json::from_slice(body).map_err(Invalid::Json)?;
    let object = Object::root(&value)?;
    let service_id = object.required_str("service_id")?.to_owned();
    let status = match object.str_or("status", "healthy")? {
        status if status.eq_ignore_ascii_case("healthy") => Reported::Healthy,
        status if status.eq_ignore_ascii_case("unhealthy") => Reported::Unhealthy,
        other => {
            return Err(object.invalid(
                "status",
                format!("`{other}` is not a status; use \"healthy\" or \"unhealthy\""),
            ));
        }
    };
    Ok(Heartbeat { service_id, status })
}

fn endpoint(object: &Object<'_>) -> Result<Endpoint, Invalid> {
    let path = object.required_str("path")?;
    let method = object.required_str("method")?.to_ascii_uppercase();
    if !HTTP_METHODS.contains(&method.as_str()) {
        return Err(object.invalid(
            "method",
            format!("`{method}` is not one of {}", HTTP_METHODS.join(", ")),
        ));
    }
    Ok(Endpoint {
        // The guide writes `"path": "hello"`; plugins list `/hello`. One
        // spelling in the listing, whoever registered.
        path: with_leading_slash(path),
        method,
        description: object.str_or("description", "")?.to_owned(),
        is_public: object.bool_or("is_public", true)?,
    })
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
/// segments or encoded slashes. A missing leading `/` is added.
fn check_base_path(path: &str) -> Result<String, String> {
    let path = with_leading_slash(path);
    if path.contains(['?', '#']) {
        return Err("must be a path without `?` or `#`".to_owned());
    }
    check_path(&path)?;
    Ok(path)
}

/// A path (and optional query) relative to the service, as the gateway
/// would route it; not a URL, so a registration cannot send health checks
/// to another host.
fn check_health_check_url(url: &str) -> Result<String, String> {
    if url.contains("://") {
        return Err(format!(
            "`{url}` is a URL; give a path relative to the service, e.g. /health"
        ));
    }
    let url = with_leading_slash(url);
    if url.contains('#') {
        return Err("must not contain a fragment (`#`)".to_owned());
    }
    check_path(url.split('?').next().unwrap_or_default())?;
    PathAndQuery::from_str(&url).map_err(|_| format!("`{url}` is not a valid path"))?;
    Ok(url)
}

fn check_path(path: &str) -> Result<(), String> {
    PathAndQuery::from_str(path).map_err(|_| {
        format!("`{path}` is not a valid URL path (percent-encode spaces and non-ASCII)")
    })?;
    check_service_path(path).map_err(|error| format!("`{path}`: {error}"))
}

/// A JSON object and where it is in the body, for field names in errors.
struct Object<'a> {
    map: &'a Map<String, Value>,
    /// `""` for the body, `endpoints[2]` for an element.
    at: String,
}

impl<'a> Object<'a> {
    fn root(value: &'a Value) -> Result<Self, Invalid> {
        match value.as_object() {
            Some(map) => Ok(Self {
                map,
                at: String::new(),
            }),
            None => Err(Invalid::Field {
                field: "body".to_owned(),
                problem: expected("a JSON object", value),
            }),
        }
    }

    fn element(&self, key: &str, index: usize, value: &'a Value) -> Result<Object<'a>, Invalid> {
        let at = format!("{}[{index}]", self.name(key));
        match value.as_object() {
            Some(map) => Ok(Object { map, at }),
            None => Err(self.invalid_at(&at, expected("an object", value))),
        }
    }

    fn name(&self, key: &str) -> String {
        if self.at.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.at)
        }
    }

    fn invalid(&self, key: &str, problem: impl Into<String>) -> Invalid {
        self.invalid_at(&self.name(key), problem)
    }

    fn invalid_at(&self, field: &str, problem: impl Into<String>) -> Invalid {
        Invalid::Field {
            field: field.to_owned(),
            problem: problem.into(),
        }
    }

    /// The value of `key`; `null` counts as absent, as pydantic's `None`.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|value| !value.is_null())
    }

    fn required_str(&self, key: &str) -> Result<&'a str, Invalid> {
        match self.get(key) {
            None => Err(self.invalid(key, "is required")),
            Some(value) => value
                .as_str()
                .ok_or_else(|| self.invalid(key, expected("a string", value))),
        }
    }

    fn str_or(&self, key: &str, default: &'a str) -> Result<&'a str, Invalid> {
        match self.get(key) {
            None => Ok(default),
            Some(value) => value
                .as_str()
                .ok_or_else(|| self.invalid(key, expected("a string", value))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, Invalid> {
        match self.get(key) {
            None => Ok(default),
            Some(value) => value
                .as_bool()
                .ok_or_else(|| self.invalid(key, expected("true or false", value))),
        }
    }

    fn array(&self, key: &str) -> Result<&'a [Value], Invalid> {
        match self.get(key) {
            None => Ok(&[]),
            Some(value) => value
                .as_array()
                .map(Vec::as_slice)
                .ok_or_else(|| self.invalid(key, expected("an array", value))),
        }
    }

    fn port(&self, key: &str) -> Result<u16, Invalid> {
        let Some(value) = self.get(key) else {
            return Err(self.invalid(key, "is required"));
        };
        let out_of_range = || {
            self.invalid(
                key,
                format!("{value} is not a port: use an integer from 1 to 65535"),
            )
        };
        if !value.is_number() {
            return Err(self.invalid(key, expected("an integer from 1 to 65535", value)));
        }
        match value.as_u64().map(u16::try_from) {
            Some(Ok(port)) if port != 0 => Ok(port),
            _ => Err(out_of_range()),
        }
    }

    /// Free-form metadata: strings are kept, any other JSON value is kept
    /// as its JSON text (`3` -> `"3"`), so clients written for registries
    /// that took any JSON still register.
    fn metadata(&self, key: &str) -> Result<BTreeMap<String, String>, Invalid> {
        let Some(value) = self.get(key) else {
            return Ok(BTreeMap::new());
        };
        let map = value
            .as_object()
            .ok_or_else(|| self.invalid(key, expected("an object", value)))?;
        Ok(map
            .iter()
            .map(|(name, value)| {
                let text = match value {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                };
                (name.clone(), text)
            })
            .collect())
    }
}

fn expected(what: &str, found: &Value) -> String {
    let kind = match found {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    format!("must be {what}, found {kind}")
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
            (with("port", json!("8010")), "port"),
            (with("port", json!(80.5)), "port"),
            (with("name", json!("My_Plugin")), "name"),
            (with("name", json!(7)), "name"),
            (with("host", json!("exa mple")), "host"),
            (with("host", json!("")), "host"),
            (with("base_path", json!("/a/../b")), "base_path"),
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
        let error = parse_registration(b"{\"name\": ").unwrap_err();
        assert_eq!(
            (error.status(), error.field()),
            (StatusCode::BAD_REQUEST, "body")
        );
    }

    #[test]
    fn metadata_values_of_any_type_are_kept_as_text() {
        let mut config = guide_config();
        config["metadata"] = json!({"replicas": 3, "labels": {"a": true}});
        let metadata = parse(&config).unwrap().spec.info.metadata;
        assert_eq!(metadata["replicas"], "3");
        assert_eq!(metadata["labels"], r#"{"a":true}"#);
    }

    #[test]
    fn heartbeats() {
        let beat = parse_heartbeat(br#"{"service_id": "my-plugin", "status": "healthy"}"#).unwrap();
        assert_eq!(beat.status, Reported::Healthy);
        let beat = parse_heartbeat(br#"{"service_id": "my-plugin"}"#).unwrap();
        assert_eq!(beat.status, Reported::Healthy);
        let beat = parse_heartbeat(br#"{"service_id": "x", "status": "unhealthy"}"#).unwrap();
        assert_eq!(beat.status, Reported::Unhealthy);
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
