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
    /// Its version, normalised ([`Version`]) once checked.
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
pub fn validate(info: &ServiceInfo) -> Result<Version, InvalidField> {
    validate_name(&info.name).map_err(|error| InvalidField::new("name", error.to_string()))?;
    if info.version.trim().is_empty() {
        return Err(InvalidField::new("version", "must not be empty"));
    }
    check_text("version", &info.version, limits::SHORT_TEXT)?;
    let version = Version::parse(&info.version)
        .map_err(|error| InvalidField::new("version", error.to_string()))?;
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
    Ok(version)
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

/// Which endpoints of a service may be called without authentication,
/// compiled once from its declaration (a table entry is built once per
/// load or registration), so the gateway matches a request without
/// allocating.
///
/// A request is matched to the declared endpoints of its method (`HEAD`
/// counts as `GET`) by path template, as the SDK's router does: a `{name}`
/// segment matches any one segment, other segments match literally, a
/// trailing slash does not matter, and where several templates match, the
/// one with more literal segments decides (a tie: private wins). A path no
/// endpoint declares is not public.
///
/// Servers differ in how they decode a path before routing: `/%61dmin`
/// and `/admin;x=1` reach `/admin` on many of them, while the SDK's
/// router and this matcher compare raw segments. So a path holding `%` or
/// `;` is matched twice, as sent and decoded (parameters after `;` cut),
/// and is public only if both readings say so.
#[derive(Debug, Clone, Default)]
pub struct PublicEndpoints {
    /// Every endpoint, private ones too (they may outrank a public
    /// template); empty when none is public, which makes the answer
    /// `false` without looking.
    rules: Box<[Rule]>,
}

#[derive(Debug, Clone)]
struct Rule {
    method: String,
    segments: Box<[Pattern]>,
    literals: usize,
    public: bool,
}

#[derive(Debug, Clone)]
enum Pattern {
    /// A literal segment as declared, and percent-decoded.
    Literal { raw: Box<str>, decoded: Box<[u8]> },
    /// `{name}`: any one segment.
    Param,
}

impl PublicEndpoints {
    /// The public endpoints of `info`'s declaration.
    pub fn compile(info: &ServiceInfo) -> Self {
        if !info.endpoints.iter().any(|endpoint| endpoint.is_public) {
            return Self::default();
        }
        Self {
            rules: compile_rules(info),
        }
    }

    /// Whether `method` on `path` (below the service's mount point, still
    /// percent-encoded) reaches a public endpoint.
    pub fn is_public(&self, method: &str, path: &str) -> bool {
        if self.rules.is_empty() {
            return false;
        }
        let method = if method == "HEAD" { "GET" } else { method };
        let as_sent = self.verdict(method, path, |pattern, segment| match pattern {
            Pattern::Literal { raw, .. } => **raw == *segment,
            Pattern::Param => true,
        });
        if !as_sent || !path.contains(['%', ';']) {
            return as_sent;
        }
        self.verdict(method, path, |pattern, segment| match pattern {
            Pattern::Literal { decoded, .. } => **decoded == *decode_segment(segment),
            Pattern::Param => true,
        })
    }

    /// The verdict of the most specific endpoint matching, with `matches`
    /// comparing a template's segment with the path's.
    fn verdict(&self, method: &str, path: &str, matches: impl Fn(&Pattern, &str) -> bool) -> bool {
        let count = path_segments(path).count();
        let mut best: Option<(usize, bool)> = None;
        for rule in self.rules.iter() {
            if rule.method != method
                || rule.segments.len() != count
                || !rule
                    .segments
                    .iter()
                    .zip(path_segments(path))
                    .all(|(pattern, segment)| matches(pattern, segment))
            {
                continue;
            }
            best = match best {
                Some((literals, public)) if literals == rule.literals => {
                    Some((literals, public && rule.public))
                }
                Some((literals, _)) if literals > rule.literals => best,
                _ => Some((rule.literals, rule.public)),
            };
        }
        best.is_some_and(|(_, public)| public)
    }
}

/// Every endpoint of `info` compiled into a rule.
fn compile_rules(info: &ServiceInfo) -> Box<[Rule]> {
    info.endpoints
        .iter()
        .map(|endpoint| {
            let segments: Box<[Pattern]> = path_segments(&endpoint.path)
                .map(|segment| {
                    if segment.len() > 2 && segment.starts_with('{') && segment.ends_with('}') {
                        Pattern::Param
                    } else {
                        Pattern::Literal {
                            raw: segment.into(),
                            decoded: decode_segment(segment).into(),
                        }
                    }
                })
                .collect();
            Rule {
                method: endpoint.method.clone(),
                literals: segments
                    .iter()
                    .filter(|p| matches!(p, Pattern::Literal { .. }))
                    .count(),
                segments,
                public: endpoint.is_public,
            }
        })
        .collect()
}

/// A service's declared endpoints compiled into a matcher that names the
/// one a request reached: the route label of its metrics and access log
/// line, which must be a template, never the raw path.
#[derive(Debug, Clone, Default)]
pub struct RouteTemplates {
    rules: Box<[Rule]>,
}

impl RouteTemplates {
    /// The endpoints of `info`'s declaration.
    pub fn compile(info: &ServiceInfo) -> Self {
        Self {
            rules: compile_rules(info),
        }
    }

    /// The index in `info.endpoints` of the most specific endpoint that
    /// `method` on `path` (below the mount point, as sent) matches: the
    /// most literal segments win, the first declared breaks a tie. HEAD
    /// matches a GET endpoint.
    pub fn route(&self, method: &str, path: &str) -> Option<usize> {
        let method = if method == "HEAD" { "GET" } else { method };
        let count = path_segments(path).count();
        let mut best: Option<(usize, usize)> = None;
        for (index, rule) in self.rules.iter().enumerate() {
            let matches = rule.method == method
                && rule.segments.len() == count
                && rule
                    .segments
                    .iter()
                    .zip(path_segments(path))
                    .all(|(pattern, segment)| match pattern {
                        Pattern::Literal { raw, .. } => **raw == *segment,
                        Pattern::Param => true,
                    });
            if matches && best.is_none_or(|(literals, _)| rule.literals > literals) {
                best = Some((rule.literals, index));
            }
        }
        best.map(|(_, index)| index)
    }
}

/// A path's non-empty segments: `/a/b/` and `a/b` are the same path.
fn path_segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|segment| !segment.is_empty())
}

/// A segment as a server that decodes before routing sees it: `;`
/// parameters cut, percent-decoded.
fn decode_segment(segment: &str) -> Vec<u8> {
    let segment = segment.split(';').next().unwrap_or_default();
    percent_encoding::percent_decode_str(segment).collect()
}

/// A service's version: a semantic version (semver 2.0), as both kinds
/// declare it in their `version` field. A short form is normalised where it
/// is unambiguous (`1` is `1.0.0`, `1.2` is `1.2.0`, a leading `v` or `V`
/// is dropped); anything else is refused. Ordered as semver orders
/// versions; shown in its normalised form.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(semver::Version);

/// Why a version or a version requirement is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidVersion {
    /// Not a semantic version, nor a short form of one.
    #[error(
        "`{text}` is not a semantic version (MAJOR.MINOR.PATCH, such as 1.4.2 or 2.0.0-beta.1; 1, 1.2 and v1.2.3 are read as 1.0.0, 1.2.0 and 1.2.3): {reason}"
    )]
    Version {
        /// What was given (cut to 64 characters).
        text: String,
        /// What the semver parser found wrong.
        reason: String,
    },
    /// Not a version requirement.
    #[error(
        "`{text}` is not a version requirement (such as 2, ^1.4, =1.4.2, 1.x or >=1.2, <2): {reason}"
    )]
    Requirement {
        /// What was given (cut to 64 characters).
        text: String,
        /// What the semver parser found wrong.
        reason: String,
    },
}

/// At most 64 characters of `text`, for a message.
fn shown(text: &str) -> String {
    text.chars().take(64).collect()
}

impl Version {
    /// Reads `text` as a version, normalising the short forms.
    pub fn parse(text: &str) -> Result<Self, InvalidVersion> {
        let bare = text
            .strip_prefix('v')
            .or_else(|| text.strip_prefix('V'))
            .unwrap_or(text);
        let refused = |error: semver::Error| InvalidVersion::Version {
            text: shown(text),
            reason: error.to_string(),
        };
        match semver::Version::parse(bare) {
            Ok(version) => Ok(Self(version)),
            Err(error) => {
                // `1` and `1.2`: one or two numbers, nothing else.
                let parts: Vec<&str> = bare.split('.').collect();
                let numeric = |part: &&str| {
                    !part.is_empty()
                        && part.bytes().all(|b| b.is_ascii_digit())
                        && (part.len() == 1 || !part.starts_with('0'))
                };
                if parts.len() <= 2 && parts.iter().all(numeric) {
                    let padded = format!("{bare}{}", ".0".repeat(3 - parts.len()));
                    semver::Version::parse(&padded).map(Self).map_err(refused)
                } else {
                    Err(refused(error))
                }
            }
        }
    }

    /// Whether it is a release (no pre-release part such as `-beta.1`).
    pub fn is_stable(&self) -> bool {
        self.0.pre.is_empty()
    }

    /// Whether it meets `requirement`. A pre-release meets only a
    /// requirement that names a pre-release of the same `MAJOR.MINOR.PATCH`
    /// (semver's rule), so `2` never picks `2.1.0-beta.1`.
    pub fn meets(&self, requirement: &VersionReq) -> bool {
        requirement.0.matches(&self.0)
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A version requirement, as a client selects a version with it: `2`
/// (`^2`), `^1.4`, `~1.4`, `=1.4.2`, `1.x`, `>=1.2, <2`, as the semver
/// crate reads them (Cargo's syntax).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionReq(semver::VersionReq);

impl std::fmt::Display for VersionReq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl VersionReq {
    /// Reads `text` as a requirement.
    pub fn parse(text: &str) -> Result<Self, InvalidVersion> {
        semver::VersionReq::parse(text)
            .map(Self)
            .map_err(|error| InvalidVersion::Requirement {
                text: shown(text),
                reason: error.to_string(),
            })
    }
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

    fn declaring(endpoints: &[(&str, &str, bool)]) -> PublicEndpoints {
        let mut info = info();
        info.requires_auth = true;
        info.endpoints = endpoints
            .iter()
            .map(|(method, path, is_public)| Endpoint {
                path: (*path).to_owned(),
                method: (*method).to_owned(),
                description: String::new(),
                is_public: *is_public,
            })
            .collect();
        PublicEndpoints::compile(&info)
    }

    #[test]
    fn public_endpoints_match_by_method_and_template() {
        let access = declaring(&[
            ("GET", "/health", true),
            ("GET", "/data/{id}", true),
            ("POST", "/data/{id}", false),
            ("GET", "/", true),
        ]);
        assert!(access.is_public("GET", "/health"));
        assert!(access.is_public("HEAD", "/health"));
        assert!(access.is_public("GET", "/health/"));
        assert!(access.is_public("GET", "/data/7"));
        assert!(access.is_public("GET", ""));
        assert!(access.is_public("GET", "/"));
        assert!(!access.is_public("POST", "/data/7"), "private method");
        assert!(!access.is_public("DELETE", "/data/7"), "undeclared method");
        assert!(!access.is_public("GET", "/data"), "undeclared path");
        assert!(!access.is_public("GET", "/data/7/more"), "one segment only");
        assert!(!access.is_public("OPTIONS", "/health"));
    }

    #[test]
    fn a_route_is_the_most_literal_matching_template() {
        let mut info = info();
        info.endpoints = [
            ("GET", "/items/{id}"),
            ("GET", "/items/admin"),
            ("POST", "/items/{id}"),
        ]
        .iter()
        .map(|(method, path)| Endpoint {
            path: (*path).to_owned(),
            method: (*method).to_owned(),
            description: String::new(),
            is_public: false,
        })
        .collect();
        let routes = RouteTemplates::compile(&info);
        assert_eq!(routes.route("GET", "/items/7"), Some(0));
        assert_eq!(routes.route("HEAD", "/items/7/"), Some(0));
        assert_eq!(routes.route("GET", "/items/admin"), Some(1));
        assert_eq!(routes.route("POST", "/items/admin"), Some(2));
        assert_eq!(routes.route("DELETE", "/items/7"), None);
        assert_eq!(routes.route("GET", "/items"), None);
    }

    #[test]
    fn the_more_literal_template_decides_and_a_tie_is_private() {
        let access = declaring(&[
            ("GET", "/items/{id}", true),
            ("GET", "/items/admin", false),
            ("GET", "/open/new", true),
            ("GET", "/open/{id}", false),
            ("GET", "/tie/{a}", true),
            ("GET", "/tie/{b}", false),
        ]);
        assert!(access.is_public("GET", "/items/7"));
        assert!(!access.is_public("GET", "/items/admin"));
        assert!(access.is_public("GET", "/open/new"));
        assert!(!access.is_public("GET", "/open/7"));
        assert!(!access.is_public("GET", "/tie/x"));
    }

    #[test]
    fn a_path_is_public_only_if_its_decoded_reading_is_too() {
        let access = declaring(&[
            ("GET", "/items/{id}", true),
            ("GET", "/items/admin", false),
            ("GET", "/caf%C3%A9", true),
        ]);
        assert!(access.is_public("GET", "/items/a%20b"));
        assert!(!access.is_public("GET", "/items/%61dmin"));
        assert!(!access.is_public("GET", "/items/admin;jsessionid=1"));
        assert!(access.is_public("GET", "/caf%C3%A9"));
        assert!(
            !access.is_public("GET", "/caf%c3%a9"),
            "literals compare as sent too"
        );
    }

    #[test]
    fn no_public_endpoint_means_nothing_is_public() {
        let access = declaring(&[("GET", "/health", false)]);
        assert!(!access.is_public("GET", "/health"));
        assert!(!PublicEndpoints::default().is_public("GET", "/"));
    }

    #[test]
    fn one_rule_set_names_the_field_at_fault() {
        assert!(validate(&info()).is_ok());
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
        assert!(validate(&multi_line).is_ok());
    }

    #[test]
    fn versions_are_normalised_where_unambiguous() {
        let normal = |text: &str| Version::parse(text).map(|v| v.to_string());
        assert_eq!(normal("1").as_deref(), Ok("1.0.0"));
        assert_eq!(normal("1.2").as_deref(), Ok("1.2.0"));
        assert_eq!(normal("v2").as_deref(), Ok("2.0.0"));
        assert_eq!(normal("V1.2.3").as_deref(), Ok("1.2.3"));
        assert_eq!(normal("2.0.0-beta.1").as_deref(), Ok("2.0.0-beta.1"));
        assert_eq!(normal("1.0.0+build.5").as_deref(), Ok("1.0.0+build.5"));
        for refused in [
            "", "latest", "1.2.3.4", "01", "1.", "1.2-beta", " 1", "vv1", "1.x",
        ] {
            let error = Version::parse(refused).expect_err(refused);
            assert!(
                error.to_string().contains("not a semantic version"),
                "{error}"
            );
        }
        let mut named = info();
        named.version = "one".into();
        assert_eq!(validate(&named).expect_err("refused").field, "version");
        let mut short = info();
        short.version = "2".into();
        assert_eq!(
            validate(&short).map(|v| v.to_string()).as_deref(),
            Ok("2.0.0")
        );
    }

    #[test]
    fn versions_order_as_semver_does() {
        let v = |text: &str| Version::parse(text).unwrap();
        assert!(v("1.10.0") > v("1.9.0"));
        assert!(v("2.0.0-beta.1") < v("2.0.0"));
        assert!(v("2.0.0-beta.1") > v("1.4.2"));
        assert!(v("1.4.2").is_stable() && !v("2.0.0-beta.1").is_stable());
    }

    #[test]
    fn requirements_match_as_cargo_reads_them() {
        let meets = |version: &str, requirement: &str| {
            Version::parse(version)
                .unwrap()
                .meets(&VersionReq::parse(requirement).unwrap())
        };
        assert!(meets("2.3.0", "2"));
        assert!(!meets("3.0.0", "2"));
        assert!(meets("1.4.9", "^1.4"));
        assert!(!meets("1.3.0", "^1.4"));
        assert!(meets("1.4.2", "=1.4.2") && !meets("1.4.3", "=1.4.2"));
        assert!(meets("1.7.0", "1.x"));
        assert!(!meets("2.0.0-beta.1", "2"), "pre-releases only when named");
        assert!(meets("2.0.0-beta.1", "=2.0.0-beta.1"));
        let error = VersionReq::parse("^^1").expect_err("refused");
        assert!(
            error
                .to_string()
                .contains("`^^1` is not a version requirement"),
            "{error}"
        );
    }
}
