//! The config file's schema (`--config`, TOML): every command-line option
//! has a key here, and the sections only a file can express (credentials,
//! CORS, rate limits, per-plugin and per-service settings).
//!
//! Every field is optional: a key absent from the file leaves the
//! command line, the environment or the default to decide. Unknown keys
//! are refused with their path. A key that mirrors an option needs a
//! restart unless its doc says it is reloadable
//! ([`super::Config::keeping_restart_keys`] is the list); the file-only
//! sections are reloadable. `docs/GATEWAY_CONFIG.md` describes every key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::admission::{CorsSettings, RateLimitSettings, ServiceSettingsByName};
use crate::auth::{ApiKeySettings, AuthSettings, JwtIssuerSettings};
use crate::metrics::MetricsSection;
use crate::plugin::FileChecks;
use crate::plugin_manager::PluginSettings;
use crate::registry::RegistryAuthSettings;
use crate::remote::{HealthSettings, LoadBalancingSettings, OutlierSettings};
use crate::tenant::TenantSettings;

use super::LogFormat;

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `--data-dir`. Needs a restart.
    pub data_dir: Option<PathBuf>,
    /// `[gateway]`.
    #[serde(default)]
    pub gateway: GatewaySection,
    /// `[registry]`.
    #[serde(default)]
    pub registry: RegistrySection,
    /// `[connections]`: limits of both listeners.
    #[serde(default)]
    pub connections: ConnectionsSection,
    /// `[plugins]`.
    #[serde(default)]
    pub plugins: PluginsSection,
    /// `[plugin.<name>]`: one plugin's overrides and integrity pin.
    #[serde(default)]
    pub plugin: BTreeMap<String, PluginSettings>,
    /// `[auth]`, with `[auth.registry]`.
    #[serde(default)]
    pub auth: AuthSection,
    /// `[cors]`.
    #[serde(default)]
    pub cors: CorsSettings,
    /// `[rate_limit]`.
    #[serde(default)]
    pub rate_limit: RateLimitSettings,
    /// `[service.<name>]`.
    #[serde(default)]
    pub service: ServiceSettingsByName,
    /// `[metrics]`.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// `[log]`.
    #[serde(default)]
    pub log: LogSection,
    /// `[load_balancing]`: how requests pick a remote service's instance.
    #[serde(default)]
    pub load_balancing: LoadBalancingSettings,
    /// `[outlier]`: passive ejection of failing instances.
    #[serde(default)]
    pub outlier: OutlierSettings,
    /// `[health]`: health check thresholds and the protect threshold.
    #[serde(default)]
    pub health: HealthSettings,
    /// `[tenants]`: whether `X-Tenant-ID` is trusted. Restart-only.
    #[serde(default)]
    pub tenants: TenantSettings,
}

/// `[log]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// `--log-format`. Needs a restart.
    pub format: Option<LogFormat>,
}

/// `[gateway]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// `--gateway-addr`. Needs a restart.
    pub listen: Option<SocketAddr>,
    /// `--request-timeout`.
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// `--max-body-bytes`.
    pub max_body_bytes: Option<usize>,
    /// Default for `[service.<name>] max_concurrent`.
    pub max_concurrent_per_service: Option<u32>,
}

/// `[registry]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySection {
    /// `--registry-addr`. Needs a restart.
    pub listen: Option<SocketAddr>,
    /// `--heartbeat-interval`.
    #[serde(default, with = "humantime_serde")]
    pub heartbeat_interval: Option<Duration>,
    /// `--heartbeat-ttl`.
    #[serde(default, with = "humantime_serde")]
    pub heartbeat_ttl: Option<Duration>,
    /// `--health-check-interval`.
    #[serde(default, with = "humantime_serde")]
    pub health_check_interval: Option<Duration>,
    /// `--health-check-timeout`.
    #[serde(default, with = "humantime_serde")]
    pub health_check_timeout: Option<Duration>,
    /// `--evict-after`.
    #[serde(default, with = "humantime_serde")]
    pub evict_after: Option<Duration>,
    /// `--registry-max-body-bytes`.
    pub max_body_bytes: Option<usize>,
    /// `--registry-max-bytes`.
    pub max_bytes: Option<u64>,
    /// `--max-instances-per-service`.
    pub max_instances_per_service: Option<u32>,
    /// `--max-versions-per-service`.
    pub max_versions_per_service: Option<u32>,
    /// `--upstream-allow`.
    pub upstream_allow: Option<Vec<IpNet>>,
    /// `--store`: `embedded` or `etcd`. Needs a restart.
    pub store: Option<crate::registry::StoreKind>,
    /// `--etcd-endpoints`. Needs a restart.
    pub etcd_endpoints: Option<Vec<String>>,
    /// `--etcd-prefix`. Needs a restart.
    pub etcd_prefix: Option<String>,
    /// `--etcd-timeout`. Needs a restart.
    #[serde(default, with = "humantime_serde")]
    pub etcd_timeout: Option<Duration>,
}

/// `[connections]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionsSection {
    /// `--header-read-timeout`.
    #[serde(default, with = "humantime_serde")]
    pub header_read_timeout: Option<Duration>,
    /// `--idle-timeout`.
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// `--write-stall-timeout`.
    #[serde(default, with = "humantime_serde")]
    pub write_stall_timeout: Option<Duration>,
    /// `--max-connections`.
    pub max_connections: Option<u32>,
    /// `--tunnel-idle-timeout`.
    #[serde(default, with = "humantime_serde")]
    pub tunnel_idle_timeout: Option<Duration>,
    /// `--max-tunnels`.
    pub max_tunnels: Option<u32>,
}

/// `[plugins]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsSection {
    /// `--plugins-dir`. Needs a restart.
    pub dir: Option<PathBuf>,
    /// `--plugin-workers`. Reloadable: applies at each plugin's next load.
    pub workers: Option<u16>,
    /// `--plugin-queue`. Reloadable: applies at each plugin's next load.
    pub queue: Option<usize>,
    /// `--drain-timeout`.
    #[serde(default, with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,
    /// `--plugin-entry-timeout`.
    #[serde(default, with = "humantime_serde")]
    pub entry_timeout: Option<Duration>,
    /// `--watch-debounce`.
    #[serde(default, with = "humantime_serde")]
    pub watch_debounce: Option<Duration>,
    /// `--plugin-file-checks`.
    pub file_checks: Option<FileChecks>,
    /// `--max-plugin-threads`.
    pub max_threads: Option<u32>,
}

/// `[auth]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// `[[auth.api_keys]]`.
    #[serde(default)]
    pub api_keys: Vec<ApiKeySettings>,
    /// `[[auth.jwt]]`.
    #[serde(default)]
    pub jwt: Vec<JwtIssuerSettings>,
    /// `[auth.registry]`.
    #[serde(default)]
    pub registry: RegistryAuthSettings,
}

impl AuthSection {
    /// The gateway's credentials, as `auth::Authenticator::from_settings`
    /// reads them.
    pub fn gateway(&self) -> AuthSettings {
        AuthSettings {
            api_keys: self.api_keys.clone(),
            jwt: self.jwt.clone(),
        }
    }
}

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// It could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// It is not valid TOML, or a key is unknown or has a bad value.
    #[error("config file {path}: {}", keyed(key, reason))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key's dotted path (`.` for the file as a whole).
        key: String,
        /// What is wrong with it (a TOML error names the line and column).
        reason: String,
    },
}

/// `key: reason`, or the reason alone for the file as a whole (`.`),
/// whose TOML error names the line already.
fn keyed(key: &str, reason: &str) -> String {
    if key == "." {
        reason.to_owned()
    } else {
        format!("{key}: {reason}")
    }
}

impl FileConfig {
    /// Reads and parses the file at `path`.
    pub fn read(path: &std::path::Path) -> Result<Self, FileError> {
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|(key, reason)| FileError::Invalid {
            path: path.to_owned(),
            key,
            reason,
        })
    }

    /// Parses a file's text; an error is the key's path and the reason, on
    /// one line.
    pub fn parse(text: &str) -> Result<Self, (String, String)> {
        let deserializer = toml::de::Deserializer::parse(text)
            .map_err(|error| (".".to_owned(), one_line(text, &error)))?;
        serde_path_to_error::deserialize(deserializer)
            .map_err(|error| (error.path().to_string(), one_line(text, error.inner())))
    }
}

/// A TOML error as one line with its position: its own `Display` quotes
/// the offending lines, and a refusal is logged as one line.
fn one_line(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end().replace('\n', " ");
    let Some(before) = error.span().and_then(|span| text.get(..span.start)) else {
        return message;
    };
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    format!("{message} (line {line}, column {column})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_key_is_named_with_its_path() {
        let (key, reason) =
            FileConfig::parse("[gateway]\nlisten = \"127.0.0.1:1\"\nlisten_on = 1\n")
                .expect_err("unknown key");
        assert_eq!(key, "gateway.listen_on");
        assert!(reason.contains("unknown field `listen_on`"), "{reason}");
    }

    #[test]
    fn a_bad_value_is_named_with_its_path() {
        let (key, reason) =
            FileConfig::parse("[plugins]\ndrain_timeout = \"soon\"\n").expect_err("bad duration");
        assert_eq!(key, "plugins.drain_timeout");
        assert!(reason.ends_with("(line 2, column 17)"), "{reason}");
        assert!(!reason.contains('\n'), "one line: {reason}");
    }

    #[test]
    fn a_syntax_error_is_one_line_with_its_position() {
        let (key, reason) = FileConfig::parse("[gateway]\nlisten = \n").expect_err("no value");
        assert_eq!(key, ".");
        assert!(!reason.contains('\n'), "one line: {reason}");
        assert!(reason.contains("(line 2, column"), "{reason}");
    }

    #[test]
    fn every_section_parses() {
        let file = FileConfig::parse(
            r#"
            data_dir = "/var/lib/plugin-host"
            [gateway]
            request_timeout = "5s"
            [plugin.hello]
            workers = 2
            sha256 = "00"
            [[auth.api_keys]]
            id = "ci"
            sha256 = "00"
            [auth.registry]
            listing = "token"
            [service.hello]
            max_concurrent = 8
            "#,
        )
        .expect("valid file");
        assert_eq!(file.gateway.request_timeout, Some(Duration::from_secs(5)));
        assert_eq!(file.plugin["hello"].workers, Some(2));
        assert_eq!(file.auth.api_keys[0].id, "ci");
        assert_eq!(file.service["hello"].max_concurrent, Some(8));
    }
}
