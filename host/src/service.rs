//! The service vocabulary: what every service declares about itself,
//! whichever its kind, and the one set of rules that declaration must meet.
//!
//! Both writers of the service table check a declaration here: the plugin
//! loader for the config a library returns, the registry for a
//! registration body (after it normalised the spellings the seed guide
//! uses, such as `"path": "hello"`). So a plugin can never declare what a
//! remote service may not, nor the other way round.

use std::collections::BTreeMap;
use std::str::FromStr;

use axum::http::uri::PathAndQuery;
use serde::{Deserialize, Serialize};

use crate::http::check_service_path;

/// What every service declares about itself, whatever its kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// Unique name; the gateway mounts the service under `/api/<name>/`.
    pub name: String,
    /// Human-readable name.
    pub display_name: String,
    /// One-paragraph description.
    pub description: String,
    /// Free-form version.
    pub version: String,
    /// Health endpoint: a path (and optional query) relative to the
    /// service.
    pub health_check_url: String,
    /// Free-form metadata.
    pub metadata: BTreeMap<String, String>,
    /// Free-form tags.
    pub tags: Vec<String>,
    /// Whether non-public endpoints require authentication.
    pub requires_auth: bool,
    /// What the service offers.
    pub endpoints: Vec<Endpoint>,
}

/// One endpoint of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Path relative to the service, starting with `/`.
    pub path: String,
    /// HTTP method, upper case.
    pub method: String,
    /// What it does.
    pub description: String,
    /// Callable without authentication.
    pub is_public: bool,
}

/// HTTP methods an endpoint may declare.
pub const HTTP_METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

/// Longest accepted service name.
pub const MAX_NAME_LEN: usize = 63;

/// Why a service name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidName {
    /// Empty string.
    #[error("name is empty")]
    Empty,
    /// Longer than [`MAX_NAME_LEN`].
    #[error("name is {0} bytes long, the limit is {MAX_NAME_LEN}")]
    TooLong(usize),
    /// Not `[a-z0-9][a-z0-9-]*`.
    #[error(
        "name `{0}` must match [a-z0-9][a-z0-9-]* (lower-case letters, digits, `-`, not first)"
    )]
    BadCharacters(String),
}

/// Checks a service name: `[a-z0-9][a-z0-9-]*`, at most [`MAX_NAME_LEN`]
/// bytes. The name becomes a URL path segment, so nothing else is allowed.
pub fn validate_name(name: &str) -> Result<(), InvalidName> {
    let mut bytes = name.bytes();
    let Some(first) = bytes.next() else {
        return Err(InvalidName::Empty);
    };
    if name.len() > MAX_NAME_LEN {
        return Err(InvalidName::TooLong(name.len()));
    }
    let ok = (first.is_ascii_lowercase() || first.is_ascii_digit())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(InvalidName::BadCharacters(name.to_owned()))
    }
}

/// A declaration refused: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidField {
    /// Path of the field, e.g. `name` or `endpoints[2].method`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl InvalidField {
    /// `field` is refused for `reason`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Bounds on a declaration. A service's declaration is held in memory,
/// listed, stored and (for a plugin) copied on every load: nothing a
/// caller declares may make it grow without bound.
pub mod limits {
    /// Longest display name, version or tag, in bytes.
    pub const SHORT_TEXT: usize = 256;
    /// Longest description, metadata value or endpoint description.
    pub const LONG_TEXT: usize = 4096;
    /// Longest path (health check, endpoint, base path).
    pub const PATH: usize = 2048;
    /// Most endpoints per service.
    pub const ENDPOINTS: usize = 256;
    /// Most tags per service.
    pub const TAGS: usize = 64;
    /// Most metadata entries per service.
    pub const METADATA: usize = 64;
}

/// Checks a declaration against the rules every service meets: a valid
/// name, a version, a health check path relative to the service,
/// endpoints with a known method and a path starting with `/`, every
/// field within [`limits`], and no control characters in anything that is
/// logged or shown on one line (only a description may span lines). The
/// first field at fault is reported.
pub fn validate(info: &ServiceInfo) -> Result<(), InvalidField> {
    validate_name(&info.name).map_err(|error| InvalidField::new("name", error.to_string()))?;
    if info.version.trim().is_empty() {
        return Err(InvalidField::new("version", "must not be empty"));
    }
    check_text("version", &info.version, limits::SHORT_TEXT)?;
    check_text("display_name", &info.display_name, limits::SHORT_TEXT)?;
    check_description("description", &info.description)?;
    check_text("health_check_url", &info.health_check_url, limits::PATH)?;
    check_health_check_url(&info.health_check_url)
        .map_err(|reason| InvalidField::new("health_check_url", reason))?;
    check_count("tags", info.tags.len(), limits::TAGS)?;
    for (index, tag) in info.tags.iter().enumerate() {
        check_text(&format!("tags[{index}]"), tag, limits::SHORT_TEXT)?;
    }
    check_count("metadata", info.metadata.len(), limits::METADATA)?;
    for (key, value) in &info.metadata {
        check_text("metadata", key, limits::SHORT_TEXT)?;
        check_text(&format!("metadata.{key}"), value, limits::LONG_TEXT)?;
    }
    check_count("endpoints", info.endpoints.len(), limits::ENDPOINTS)?;
    for (index, endpoint) in info.endpoints.iter().enumerate() {
        check_text(
            &format!("endpoints[{index}].path"),
            &endpoint.path,
            limits::PATH,
        )?;
        check_description(
            &format!("endpoints[{index}].description"),
            &endpoint.description,
        )?;
        if !HTTP_METHODS.contains(&endpoint.method.as_str()) {
            return Err(InvalidField::new(
                format!("endpoints[{index}].method"),
                format!(
                    "`{}` is not one of {}",
                    endpoint.method,
                    HTTP_METHODS.join(", ")
                ),
            ));
        }
        if !endpoint.path.starts_with('/') {
            return Err(InvalidField::new(
                format!("endpoints[{index}].path"),
                format!("`{}` must start with `/`", endpoint.path),
            ));
        }
    }
    Ok(())
}

/// At most `limit` bytes, and no control characters: such a field is
/// logged and listed, and a newline or an escape sequence in it could
/// forge log lines or terminal output.
pub fn check_text(field: &str, text: &str, limit: usize) -> Result<(), InvalidField> {
    if text.len() > limit {
        return Err(InvalidField::new(
            field,
            format!("is {} bytes long, the limit is {limit}", text.len()),
        ));
    }
    if let Some(control) = text.chars().find(|c| c.is_control()) {
        return Err(InvalidField::new(
            field,
            format!("must not contain control characters (found {control:?})"),
        ));
    }
    Ok(())
}

/// Like [`check_text`] with the longer limit, but lines and tabs allowed.
fn check_description(field: &str, text: &str) -> Result<(), InvalidField> {
    check_text(
        field,
        &text.replace(['\n', '\t', '\r'], " "),
        limits::LONG_TEXT,
    )
}

fn check_count(field: &str, count: usize, limit: usize) -> Result<(), InvalidField> {
    if count > limit {
        return Err(InvalidField::new(
            field,
            format!("has {count} entries, the limit is {limit}"),
        ));
    }
    Ok(())
}

/// A path (and optional query) relative to the service, as the gateway
/// would route it; not a URL, so a declaration cannot send health checks
/// to another host.
fn check_health_check_url(url: &str) -> Result<(), String> {
    if url.contains("://") {
        return Err(format!(
            "`{url}` is a URL; give a path relative to the service, e.g. /health"
        ));
    }
    if !url.starts_with('/') {
        return Err(format!("`{url}` must start with `/`"));
    }
    if url.contains('#') {
        return Err("must not contain a fragment (`#`)".to_owned());
    }
    check_relative_path(url.split('?').next().unwrap_or_default())?;
    PathAndQuery::from_str(url).map_err(|_| format!("`{url}` is not a valid path"))?;
    Ok(())
}

/// A valid URL path that stays below the service's mount point: no dot
/// segments or encoded slashes.
pub fn check_relative_path(path: &str) -> Result<(), String> {
    PathAndQuery::from_str(path).map_err(|_| {
        format!("`{path}` is not a valid URL path (percent-encode spaces and non-ASCII)")
    })?;
    check_service_path(path).map_err(|error| format!("`{path}`: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(validate_name("my-plugin"), Ok(()));
        assert_eq!(validate_name("0x"), Ok(()));
        assert_eq!(validate_name(""), Err(InvalidName::Empty));
        assert!(matches!(
            validate_name("-x"),
            Err(InvalidName::BadCharacters(_))
        ));
        assert!(matches!(
            validate_name("My_Plugin"),
            Err(InvalidName::BadCharacters(_))
        ));
        assert!(matches!(
            validate_name("a/b"),
            Err(InvalidName::BadCharacters(_))
        ));
        assert_eq!(
            validate_name(&"a".repeat(64)),
            Err(InvalidName::TooLong(64))
        );
    }

    fn info() -> ServiceInfo {
        ServiceInfo {
            name: "svc".to_owned(),
            display_name: "svc".to_owned(),
            description: String::new(),
            version: "1.0.0".to_owned(),
            health_check_url: "/health".to_owned(),
            metadata: BTreeMap::new(),
            tags: Vec::new(),
            requires_auth: false,
            endpoints: vec![Endpoint {
                path: "/hello".to_owned(),
                method: "GET".to_owned(),
                description: String::new(),
                is_public: true,
            }],
        }
    }

    #[test]
    fn one_rule_set_names_the_field_at_fault() {
        assert_eq!(validate(&info()), Ok(()));
        let refused = |change: fn(&mut ServiceInfo)| {
            let mut info = info();
            change(&mut info);
            validate(&info).expect_err("refused").field
        };
        assert_eq!(refused(|i| i.name = "Bad".into()), "name");
        assert_eq!(refused(|i| i.version = " ".into()), "version");
        for url in [
            "health",
            "http://elsewhere/health",
            "/a/../b",
            "/h#x",
            "/a%2fb",
        ] {
            let mut info = info();
            info.health_check_url = url.to_owned();
            assert_eq!(
                validate(&info).expect_err(url).field,
                "health_check_url",
                "{url}"
            );
        }
        assert_eq!(
            refused(|i| i.endpoints[0].method = "FETCH".into()),
            "endpoints[0].method"
        );
        assert_eq!(
            refused(|i| i.endpoints[0].path = "x".into()),
            "endpoints[0].path"
        );
    }

    #[test]
    fn every_field_is_bounded_and_single_line_fields_hold_no_control_characters() {
        let refused = |change: &dyn Fn(&mut ServiceInfo)| {
            let mut info = info();
            change(&mut info);
            validate(&info).expect_err("refused")
        };
        let forged = refused(&|i| i.version = "1.0\nINFO forged line".into());
        assert_eq!(forged.field, "version");
        assert!(forged.reason.contains("control characters"), "{forged}");
        assert_eq!(
            refused(&|i| i.display_name = "\u{1b}[31mred".into()).field,
            "display_name"
        );
        assert_eq!(
            refused(&|i| i.description = "x".repeat(limits::LONG_TEXT + 1)).field,
            "description"
        );
        assert_eq!(
            refused(&|i| i.tags = vec!["t".into(); limits::TAGS + 1]).field,
            "tags"
        );
        let many = refused(&|i| i.endpoints = vec![i.endpoints[0].clone(); limits::ENDPOINTS + 1]);
        assert_eq!(many.field, "endpoints");
        assert!(many.reason.contains("the limit is 256"), "{many}");
        assert_eq!(
            refused(&|i| {
                i.metadata
                    .insert("k".into(), "v".repeat(limits::LONG_TEXT + 1));
            })
            .field,
            "metadata.k"
        );
        let mut multi_line = info();
        multi_line.description = "first line\nsecond line\twith a tab".into();
        assert_eq!(validate(&multi_line), Ok(()));
    }
}
