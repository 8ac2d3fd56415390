//! The host's configuration: command line, environment and config file,
//! resolved into one [`Config`].
//!
//! Precedence is flag > environment > file > default: clap reads the
//! command line and the environment, and a value clap took from its
//! default is replaced by the file's, when the file sets it. A file value
//! is checked as its flag's would be, and refused with its key's path.
//! Every other module receives the part it needs as plain values; none
//! reads the environment or the file itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use ipnet::IpNet;

use crate::metrics::{self, Switch};
use crate::plugin::{FileChecks, RuntimeLimits};
use crate::registry::{InvalidPolicy, Policy, StoreKind, StoreSettings, check_etcd_prefix};

pub mod file;

use file::{FileConfig, FileError};

/// Command line of `plugin-host`. Every option can also be set by the
/// environment variable named in its help, and by the config file key
/// named in `docs/GATEWAY_CONFIG.md`. Built by [`Config::load`].
///
/// A new option needs its key in [`mod@file`], a `take!` line in
/// `Config::resolve`, and, unless a reload applies it, a line in
/// [`Config::keeping_restart_keys`].
#[derive(Debug, Clone, Parser)]
#[command(name = "plugin-host", version = version(), about, long_about = None)]
pub struct Config {
    /// What to do instead of running the host.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// A TOML config file (see `docs/GATEWAY_CONFIG.md`). A key set on the
    /// command line or in the environment wins over the file. SIGHUP reads
    /// it again.
    #[arg(long = "config", env = "PLUGIN_HOST_CONFIG")]
    pub config_file: Option<PathBuf>,

    /// What the config file says (empty without one). Read the sections no
    /// option mirrors from here; an option's value in force is its field
    /// of this struct, whichever source set it.
    #[arg(skip)]
    pub file: FileConfig,

    /// The command line and environment as clap read them: what a reload
    /// resolves the file against again.
    #[arg(skip)]
    command_line: ArgMatches,

    /// Directory watched for plugin libraries (`*.so`): a file dropped here
    /// is loaded and mounted, replaced is swapped, removed is unloaded.
    #[arg(long, env = "PLUGINS_DIR", default_value = "./plugins-dir")]
    pub plugins_dir: PathBuf,

    /// Directory for the host's own state: the registry's database and the
    /// private copies of loaded plugin libraries.
    #[arg(long, env = "DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Address of the API gateway (`/api/<service>/...`).
    #[arg(long, env = "GATEWAY_ADDR", default_value = "127.0.0.1:8000")]
    pub gateway_addr: SocketAddr,

    /// Address of the registry API (`/api/registry/...`).
    #[arg(long, env = "REGISTRY_ADDR", default_value = "127.0.0.1:8001")]
    pub registry_addr: SocketAddr,

    /// Longest a request may wait for a plugin or an upstream service before
    /// it is answered 504. For a remote service it counts from the end of
    /// the request body, so a long upload is not cut short.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// Largest request body accepted for a plugin, in bytes; a larger one is
    /// answered 413. (Bodies proxied to remote services are streamed and
    /// not buffered.)
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Worker threads per plugin: how many of its requests run at once
    /// (1 to 256).
    #[arg(long, env = "PLUGIN_WORKERS", default_value_t = 4, value_parser = parse_workers)]
    pub plugin_workers: u16,

    /// Requests that may wait for a plugin's workers; beyond that the
    /// gateway answers 503.
    #[arg(long, env = "PLUGIN_QUEUE", default_value_t = 1024)]
    pub plugin_queue: usize,

    /// How long an unloaded plugin's in-flight requests and threads may take
    /// to finish before the host gives up and leaves the library mapped.
    #[arg(long, env = "DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// How long a plugin's entry calls may take: loading its library (which
    /// runs its initializers), its `config`, its `init`, and its shutdown
    /// hook. A plugin still in one after this is refused (or, on unload,
    /// abandoned) and its library is left loaded.
    #[arg(long, env = "PLUGIN_ENTRY_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub plugin_entry_timeout: Duration,

    /// How long a plugin file still being written (created or written to,
    /// not yet closed) or whose metadata changed must stay unchanged before
    /// it is loaded, so a file still being copied is never opened. A file
    /// closed after writing, renamed or removed is acted on at once.
    #[arg(long, env = "WATCH_DEBOUNCE", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub watch_debounce: Duration,

    /// How often remote services are asked to heartbeat (the value the
    /// registry answers a registration with; the seed guide's client uses
    /// 30 s whatever it is told).
    #[arg(long, env = "HEARTBEAT_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,

    /// A remote service with neither a heartbeat nor a passing health check
    /// for this long is unhealthy: the gateway answers 503 for it until the
    /// next good heartbeat or check.
    #[arg(long, env = "HEARTBEAT_TTL", default_value = "90s", value_parser = humantime::parse_duration)]
    pub heartbeat_ttl: Duration,

    /// How often the registry GETs every remote service's
    /// `health_check_url`.
    #[arg(long, env = "HEALTH_CHECK_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub health_check_interval: Duration,

    /// Longest wait for one health check's answer.
    #[arg(long, env = "HEALTH_CHECK_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub health_check_timeout: Duration,

    /// A remote service that neither heartbeated nor passed a health check
    /// for this long is removed from the registry (and its database). Must
    /// be longer than `--heartbeat-ttl`.
    #[arg(long, env = "EVICT_AFTER", default_value = "24h", value_parser = humantime::parse_duration)]
    pub evict_after: Duration,

    /// Largest body the registry API accepts, in bytes (413 beyond). A
    /// registration with every field at its limit fits.
    #[arg(long, env = "REGISTRY_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub registry_max_body_bytes: usize,

    /// Most bytes of registrations the registry keeps (their stored JSON,
    /// added up). A registration that would exceed it is answered 413.
    #[arg(long, env = "REGISTRY_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub registry_max_bytes: u64,

    /// Most instances one remote service may have; a registration of one
    /// more is answered 409 naming the limit.
    #[arg(long, env = "MAX_INSTANCES_PER_SERVICE", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_instances_per_service: u32,

    /// Most versions one remote service name may have; a registration of
    /// one more is answered 409 naming the limit.
    #[arg(long, env = "MAX_VERSIONS_PER_SERVICE", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_versions_per_service: u32,

    /// Networks a registered service's addresses must be in (CIDRs,
    /// comma-separated). Link-local and unspecified addresses are refused
    /// whatever the list says, and so are the host's own listeners.
    #[arg(
        long,
        env = "UPSTREAM_ALLOW",
        value_delimiter = ',',
        default_values_t = crate::egress::DEFAULT_ALLOWED.iter().map(|net| net.parse::<IpNet>().expect("a valid default network")),
    )]
    pub upstream_allow: Vec<IpNet>,

    /// Where the registry keeps remote registrations: `embedded` (a redb
    /// file in the data directory, one host) or `etcd` (shared by every
    /// host given the same `--etcd-endpoints` and `--etcd-prefix`; needs
    /// a build with the `etcd` feature). See `docs/CLUSTER.md`.
    #[arg(long, env = "REGISTRY_STORE", value_enum, default_value_t = StoreKind::Embedded)]
    pub store: StoreKind,

    /// The etcd cluster's client URLs, comma-separated
    /// (`http://127.0.0.1:2379,...`), with `--store etcd`.
    #[arg(long, env = "ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,

    /// The key prefix under which this cluster of hosts keeps its
    /// registry in etcd, so several clusters can share one etcd.
    #[arg(long, env = "ETCD_PREFIX", default_value = "/plugin-host", value_parser = |text: &str| check_etcd_prefix(text.to_owned()))]
    pub etcd_prefix: String,

    /// Longest wait for one etcd request; a registry write that gets no
    /// answer within it is answered 503.
    #[arg(long, env = "ETCD_TIMEOUT", default_value = "2s", value_parser = positive_duration)]
    pub etcd_timeout: Duration,

    /// Longest wait for a complete request head: from the accept for a
    /// connection's first request, from its first byte for a later one.
    /// Past it the client is answered 408 and the connection closed (both
    /// listeners).
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub header_read_timeout: Duration,

    /// A keep-alive connection with no request in flight and no bytes
    /// moving for this long is closed (both listeners).
    #[arg(long, env = "IDLE_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    pub idle_timeout: Duration,

    /// A response the client reads nothing of for this long is dropped and
    /// its connection closed, so a client that never reads cannot pin the
    /// response in memory (both listeners).
    #[arg(long, env = "WRITE_STALL_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    pub write_stall_timeout: Duration,

    /// Connections open at once on each listener; further ones wait in the
    /// kernel's accept backlog until one closes.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// An upgraded connection (a WebSocket proxied to a remote service)
    /// with no byte moving either way for this long is closed (both
    /// listeners).
    #[arg(long, env = "TUNNEL_IDLE_TIMEOUT", default_value = "300s", value_parser = positive_duration)]
    pub tunnel_idle_timeout: Duration,

    /// Upgraded connections open at once on each listener; an upgrade
    /// request beyond it is answered 503. Each also counts against
    /// `--max-connections`.
    #[arg(long, env = "MAX_TUNNELS", default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tunnels: u32,

    /// Which plugin files are trusted: `strict` refuses a plugin file (or
    /// a symlink's target) that is writable by group or others, whose
    /// directory is, or that is owned by neither the host's user nor root,
    /// as sshd's StrictModes does; `off` checks only that it is a regular
    /// file, for a directory protected some other way.
    #[arg(long, env = "PLUGIN_FILE_CHECKS", value_enum, default_value_t = FileChecks::Strict)]
    pub plugin_file_checks: FileChecks,

    /// Worker threads of all plugins together. A plugin gets
    /// `--plugin-workers` threads, or as many as are left (at least one);
    /// with none left it is refused. A swap may exceed the limit by the
    /// replaced version's workers until that version has drained.
    #[arg(long, env = "MAX_PLUGIN_THREADS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_plugin_threads: u32,

    /// Whether the Prometheus metrics are recorded and served on the
    /// registry listener (`off` keeps only the listing's traffic totals).
    #[arg(long, env = "PLUGIN_HOST_METRICS", value_enum, default_value_t = Switch::On)]
    pub metrics: Switch,

    /// Where the registry listener serves the metrics.
    #[arg(long, env = "PLUGIN_HOST_METRICS_PATH", default_value = "/metrics", value_parser = |text: &str| metrics::check_path(text.to_owned()))]
    pub metrics_path: String,

    /// How log lines are written: `text` (one human-readable line per
    /// event) or `json` (one JSON object per line). `RUST_LOG` filters
    /// them; the access log is its target `access`.
    #[arg(long, env = "PLUGIN_HOST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// What `plugin-host` does instead of running the host.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Checks a config file as the host would at start (resolved against
    /// the command line and environment, every setting validated) without
    /// binding or loading anything: prints `ok: <file>` and exits 0, or
    /// the error and exits 2.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read, is not TOML, or has an unknown key or a
    /// bad value.
    #[error(transparent)]
    File(#[from] FileError),
    /// Options given on the command line or in the environment contradict
    /// each other.
    #[error("{setting}: {reason}")]
    Options {
        /// The flag.
        setting: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A command line read again for a reload no longer parses (clap
    /// accepted it at start, so this is a bug).
    #[error("command line: {0}")]
    CommandLine(#[from] clap::Error),
}

/// `--version`: the host's version and the plugin ABI it speaks, the
/// number a plugin must have been built against.
fn version() -> String {
    format!(
        "{} (plugin ABI {})",
        env!("CARGO_PKG_VERSION"),
        plugin_api::ffi::ABI_VERSION
    )
}

impl Config {
    /// Reads the command line and the environment (exiting with clap's
    /// usage message and status 2 on a bad one), then the config file they
    /// name, and resolves them.
    pub fn load() -> Result<Config, ConfigError> {
        Self::from_command_line(Self::command().get_matches())
    }

    /// Resolves a parsed command line against the file it names (`--config`,
    /// or `check-config <file>`), read now.
    pub fn from_command_line(matches: ArgMatches) -> Result<Config, ConfigError> {
        let cli = Config::from_arg_matches(&matches)?;
        let file = match cli.file_to_read() {
            Some(path) => Some((path.to_owned(), FileConfig::read(path)?)),
            None => None,
        };
        cli.resolve(matches, file)
    }

    /// The same command line and environment resolved against the config
    /// file as it is now: what a reload applies.
    pub fn reread(&self) -> Result<Config, ConfigError> {
        Self::from_command_line(self.command_line.clone())
    }

    fn file_to_read(&self) -> Option<&Path> {
        match &self.command {
            Some(Command::CheckConfig { file }) => Some(file),
            None => self.config_file.as_deref(),
        }
    }

    /// Takes each option clap set from its default from `file`, where the
    /// file sets it, after checking every value the file sets; then checks
    /// the rules between options.
    fn resolve(
        mut self,
        matches: ArgMatches,
        file: Option<(PathBuf, FileConfig)>,
    ) -> Result<Config, ConfigError> {
        let Some((path, file)) = file else {
            self.check_rules(&HashMap::new(), None)?;
            self.command_line = matches;
            return Ok(self);
        };
        let invalid = |key: &str, reason: String| FileError::Invalid {
            path: path.clone(),
            key: key.to_owned(),
            reason,
        };
        // Option id -> file key, for the options whose value in force is
        // the file's.
        let mut from_file = HashMap::new();
        macro_rules! take {
            ($field:ident, $key:literal, $value:expr) => {
                take!($field, $key, $value, Ok::<_, String>)
            };
            ($field:ident, $key:literal, $value:expr, $check:expr) => {
                if let Some(value) = $value {
                    // Checked even when a flag overrides it: a file is valid
                    // or not by itself.
                    let value = $check(value).map_err(|reason| invalid($key, reason))?;
                    let id = stringify!($field);
                    if matches.value_source(id) == Some(ValueSource::DefaultValue) {
                        self.$field = value;
                        from_file.insert(id, $key);
                    }
                }
            };
        }
        take!(data_dir, "data_dir", file.data_dir.clone());
        take!(gateway_addr, "gateway.listen", file.gateway.listen);
        take!(
            request_timeout,
            "gateway.request_timeout",
            file.gateway.request_timeout
        );
        take!(
            max_body_bytes,
            "gateway.max_body_bytes",
            file.gateway.max_body_bytes
        );
        take!(registry_addr, "registry.listen", file.registry.listen);
        take!(
            heartbeat_interval,
            "registry.heartbeat_interval",
            file.registry.heartbeat_interval
        );
        take!(
            heartbeat_ttl,
            "registry.heartbeat_ttl",
            file.registry.heartbeat_ttl
        );
        take!(
            health_check_interval,
            "registry.health_check_interval",
            file.registry.health_check_interval
        );
        take!(
            health_check_timeout,
            "registry.health_check_timeout",
            file.registry.health_check_timeout
        );
        take!(
            evict_after,
            "registry.evict_after",
            file.registry.evict_after
        );
        take!(
            registry_max_body_bytes,
            "registry.max_body_bytes",
            file.registry.max_body_bytes
        );
        take!(
            registry_max_bytes,
            "registry.max_bytes",
            file.registry.max_bytes
        );
        take!(
            max_instances_per_service,
            "registry.max_instances_per_service",
            file.registry.max_instances_per_service,
            at_least_one
        );
        take!(
            max_versions_per_service,
            "registry.max_versions_per_service",
            file.registry.max_versions_per_service,
            at_least_one
        );
        take!(
            upstream_allow,
            "registry.upstream_allow",
            file.registry.upstream_allow.clone()
        );
        take!(store, "registry.store", file.registry.store);
        take!(
            etcd_endpoints,
            "registry.etcd_endpoints",
            file.registry.etcd_endpoints.clone()
        );
        take!(
            etcd_prefix,
            "registry.etcd_prefix",
            file.registry.etcd_prefix.clone(),
            check_etcd_prefix
        );
        take!(
            etcd_timeout,
            "registry.etcd_timeout",
            file.registry.etcd_timeout,
            positive
        );
        take!(
            header_read_timeout,
            "connections.header_read_timeout",
            file.connections.header_read_timeout,
            positive
        );
        take!(
            idle_timeout,
            "connections.idle_timeout",
            file.connections.idle_timeout,
            positive
        );
        take!(
            write_stall_timeout,
            "connections.write_stall_timeout",
            file.connections.write_stall_timeout,
            positive
        );
        take!(
            max_connections,
            "connections.max_connections",
            file.connections.max_connections,
            at_least_one
        );
        take!(
            tunnel_idle_timeout,
            "connections.tunnel_idle_timeout",
            file.connections.tunnel_idle_timeout,
            positive
        );
        take!(
            max_tunnels,
            "connections.max_tunnels",
            file.connections.max_tunnels,
            at_least_one
        );
        take!(plugins_dir, "plugins.dir", file.plugins.dir.clone());
        take!(
            plugin_workers,
            "plugins.workers",
            file.plugins.workers,
            RuntimeLimits::check_workers
        );
        take!(plugin_queue, "plugins.queue", file.plugins.queue);
        take!(
            drain_timeout,
            "plugins.drain_timeout",
            file.plugins.drain_timeout
        );
        take!(
            plugin_entry_timeout,
            "plugins.entry_timeout",
            file.plugins.entry_timeout
        );
        take!(
            watch_debounce,
            "plugins.watch_debounce",
            file.plugins.watch_debounce
        );
        take!(
            plugin_file_checks,
            "plugins.file_checks",
            file.plugins.file_checks
        );
        take!(
            max_plugin_threads,
            "plugins.max_threads",
            file.plugins.max_threads,
            at_least_one
        );
        take!(
            metrics,
            "metrics.enabled",
            file.metrics.enabled.map(Switch::from)
        );
        take!(
            metrics_path,
            "metrics.path",
            file.metrics.path.clone(),
            metrics::check_path
        );
        take!(log_format, "log.format", file.log.format);
        self.check_rules(&from_file, Some(&path))?;
        self.config_file = Some(path);
        self.file = file;
        self.command_line = matches;
        Ok(self)
    }

    /// The rules between options (today the registry's liveness policy),
    /// whatever set them. A refusal names each option as it was set: its
    /// file key if the file's value is in force, else its flag.
    fn check_rules(
        &self,
        from_file: &HashMap<&str, &'static str>,
        path: Option<&Path>,
    ) -> Result<(), ConfigError> {
        let name = |id: &str| match from_file.get(id) {
            Some(key) => (*key).to_owned(),
            None => format!("--{}", id.replace('_', "-")),
        };
        if let Err((id, reason)) = self.store_rule() {
            return match (from_file.get(id), path) {
                (Some(key), Some(path)) => Err(FileError::Invalid {
                    path: path.to_owned(),
                    key: (*key).to_owned(),
                    reason,
                }
                .into()),
                _ => Err(ConfigError::Options {
                    setting: name(id),
                    reason,
                }),
            };
        }
        let (id, reason) = match self.registry_policy().validate() {
            Ok(()) => return Ok(()),
            Err(InvalidPolicy::Zero(flag)) => (
                flag.replace('-', "_"),
                "must be longer than zero".to_owned(),
            ),
            Err(InvalidPolicy::EvictBeforeUnhealthy { ttl, .. }) => (
                "evict_after".to_owned(),
                format!(
                    "must be longer than {} ({})",
                    name("heartbeat_ttl"),
                    humantime::format_duration(ttl)
                ),
            ),
        };
        match (from_file.get(id.as_str()), path) {
            (Some(key), Some(path)) => Err(FileError::Invalid {
                path: path.to_owned(),
                key: (*key).to_owned(),
                reason,
            }
            .into()),
            _ => Err(ConfigError::Options {
                setting: name(&id),
                reason,
            }),
        }
    }

    /// Whether the registry's store can be used as set: the option at
    /// fault (its id) and why not.
    fn store_rule(&self) -> Result<(), (&'static str, String)> {
        match self.store {
            StoreKind::Embedded => Ok(()),
            StoreKind::Etcd if !cfg!(feature = "etcd") => Err((
                "store",
                "this plugin-host was built without the etcd store: build it with `--features etcd` (needs protoc)".to_owned(),
            )),
            StoreKind::Etcd if self.etcd_endpoints.is_empty() => Err((
                "etcd_endpoints",
                "the etcd store needs at least one endpoint (`http://host:2379`)".to_owned(),
            )),
            StoreKind::Etcd => Ok(()),
        }
    }

    /// Where the registry keeps remote registrations.
    pub fn registry_store(&self) -> StoreSettings {
        StoreSettings {
            kind: self.store,
            database: self.data_dir.join("registry.redb"),
            etcd_endpoints: self.etcd_endpoints.clone(),
            etcd_prefix: self.etcd_prefix.clone(),
            etcd_timeout: self.etcd_timeout,
        }
    }

    /// How the registry keeps track of remote services.
    pub fn registry_policy(&self) -> Policy {
        Policy {
            heartbeat_interval: self.heartbeat_interval,
            ttl: self.heartbeat_ttl,
            check_interval: self.health_check_interval,
            check_timeout: self.health_check_timeout,
            evict_after: self.evict_after,
        }
    }

    /// This config with every option that needs a restart set as in
    /// `running`, and the file keys of those that differed: what a reload
    /// applies, and what it warns about. This is the list of keys that
    /// need a restart; every other key is applied by a reload.
    pub fn keeping_restart_keys(mut self, running: &Config) -> (Config, Vec<&'static str>) {
        let mut kept = Vec::new();
        macro_rules! keep {
            ($($field:ident => $key:literal,)*) => {$(
                if self.$field != running.$field {
                    self.$field = running.$field.clone();
                    kept.push($key);
                }
            )*};
        }
        keep! {
            // Bound, opened and watched once, at start.
            data_dir => "data_dir",
            gateway_addr => "gateway.listen",
            registry_addr => "registry.listen",
            plugins_dir => "plugins.dir",
            // Handed as plain values to the gateway, the proxy, the
            // servers and the registry when they start.
            request_timeout => "gateway.request_timeout",
            max_body_bytes => "gateway.max_body_bytes",
            heartbeat_interval => "registry.heartbeat_interval",
            heartbeat_ttl => "registry.heartbeat_ttl",
            health_check_interval => "registry.health_check_interval",
            health_check_timeout => "registry.health_check_timeout",
            evict_after => "registry.evict_after",
            registry_max_body_bytes => "registry.max_body_bytes",
            registry_max_bytes => "registry.max_bytes",
            max_instances_per_service => "registry.max_instances_per_service",
            max_versions_per_service => "registry.max_versions_per_service",
            upstream_allow => "registry.upstream_allow",
            store => "registry.store",
            etcd_endpoints => "registry.etcd_endpoints",
            etcd_prefix => "registry.etcd_prefix",
            etcd_timeout => "registry.etcd_timeout",
            header_read_timeout => "connections.header_read_timeout",
            idle_timeout => "connections.idle_timeout",
            write_stall_timeout => "connections.write_stall_timeout",
            max_connections => "connections.max_connections",
            tunnel_idle_timeout => "connections.tunnel_idle_timeout",
            max_tunnels => "connections.max_tunnels",
            // The plugin manager's own settings, and runtimes'
            // deadlines fixed when they start.
            drain_timeout => "plugins.drain_timeout",
            plugin_entry_timeout => "plugins.entry_timeout",
            watch_debounce => "plugins.watch_debounce",
            plugin_file_checks => "plugins.file_checks",
            max_plugin_threads => "plugins.max_threads",
            // Set once when the host starts.
            metrics => "metrics.enabled",
            metrics_path => "metrics.path",
            log_format => "log.format",
        }
        // Handed as a plain value to the gateway and the registry.
        if self.file.tenants != running.file.tenants {
            self.file.tenants = running.file.tenants.clone();
            kept.push("tenants.trust_header");
        }
        (self, kept)
    }
}

/// `--plugin-workers`, checked as `plugins.workers` is.
fn parse_workers(text: &str) -> Result<u16, String> {
    let workers = text.parse().map_err(|error| format!("{error}"))?;
    RuntimeLimits::check_workers(workers)
}

/// A duration that is not zero: a zero timeout would close every
/// connection at once.
fn positive_duration(text: &str) -> Result<Duration, String> {
    positive(humantime::parse_duration(text).map_err(|error| error.to_string())?)
}

fn positive(duration: Duration) -> Result<Duration, String> {
    if duration.is_zero() {
        Err("must be longer than zero".to_owned())
    } else {
        Ok(duration)
    }
}

fn at_least_one(count: u32) -> Result<u32, String> {
    if count == 0 {
        Err("must be at least 1".to_owned())
    } else {
        Ok(count)
    }
}

#[cfg(test)]
mod tests;
