//! The host's configuration: command line and environment, nothing else.
//!
//! Every other module receives the part it needs as plain values; none reads
//! the environment itself.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ipnet::IpNet;

use crate::plugin::FileChecks;

pub mod file;

/// Command line of `plugin-host`. Every option can also be set by the
/// environment variable named in its help.
#[derive(Debug, Clone, Parser)]
#[command(name = "plugin-host", version, about, long_about = None)]
pub struct Config {
    /// A TOML config file (see `docs/GATEWAY_CONFIG.md`). A key set on the
    /// command line or in the environment wins over the file.
    #[arg(long = "config", env = "PLUGIN_HOST_CONFIG")]
    pub config_file: Option<PathBuf>,

    /// What the config file says (empty without one).
    #[arg(skip)]
    pub file: file::FileConfig,

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

    /// Worker threads per plugin: how many of its requests run at once.
    #[arg(long, env = "PLUGIN_WORKERS", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
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
}

/// A duration that is not zero: a zero timeout would close every
/// connection at once.
fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(duration) if duration.is_zero() => Err("must be longer than zero".to_owned()),
        Ok(duration) => Ok(duration),
        Err(error) => Err(error.to_string()),
    }
}
