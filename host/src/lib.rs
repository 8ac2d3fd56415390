//! The plugin host: an API gateway, a service registry and a loader of
//! native plugins in one process.
//!
//! `main.rs` loads the [`Config`], builds its reloadable pieces
//! ([`reload::Live`]) and calls [`run`]; integration tests drive the real
//! binary. See `ARCHITECTURE.md` for the code map.

#![deny(unsafe_code)]

pub mod admission;
pub mod auth;
pub mod calls;
pub mod config;
pub mod console;
pub mod egress;
pub mod gateway;
pub mod http;
pub mod metrics;
pub mod observe;
pub mod plugin;
pub mod plugin_manager;
pub mod proxy;
pub mod registry;
pub mod reload;
pub mod remote;
pub mod server;
pub mod service;
pub mod settings;
mod sync;
pub mod table;
pub mod tenant;
pub mod traffic;
pub mod tunnel;
pub mod watcher;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Config;

use crate::egress::{EgressPolicy, LoopGuard};
use crate::reload::Live;
use crate::table::ServiceTable;

/// Why the host could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which server.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The data directory is unusable.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The plugins directory cannot be watched.
    #[error(transparent)]
    Watch(#[from] watcher::WatchError),
    /// A server task failed (it panicked).
    #[error("{what} server failed: {source}")]
    Serve {
        /// Which server.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The registry's database or options are unusable.
    #[error(transparent)]
    Registry(#[from] registry::StartError),
    /// The plugin manager thread could not start.
    #[error("cannot start the plugin manager: {0}")]
    Manager(std::io::Error),
    /// A setting of the config file is invalid (the message names the
    /// key's path in the file).
    #[error(transparent)]
    Settings(#[from] settings::SettingsError),
    /// The configuration (command line, environment, file) is refused.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
}

/// Every check of the settings the host makes before it starts, without
/// binding or loading anything: what `plugin-host check-config` runs, and
/// what a reload passes before it applies anything. Resolving the
/// [`Config`] checked each option and the rules between them; this builds
/// every reloadable piece ([`Live::build`], which is where a new piece's
/// checks go), and is where a check of a setting that needs a restart goes.
pub fn check_settings(config: &Config) -> Result<(), HostError> {
    Live::build(config).map(drop)
}

/// Runs the host until `shutdown` completes, then stops serving, unloads
/// every plugin and returns. `live` holds the reloadable pieces built from
/// `config`; each message on `reloads` (one per SIGHUP) reloads the config
/// file (see [`reload`]).
pub async fn run(
    config: Config,
    mut live: Live,
    reloads: tokio::sync::mpsc::Receiver<()>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HostError> {
    // Bound first: the registry must know the listeners' real addresses
    // (port 0 picks one) to refuse services pointing back at them. Nothing
    // is served before start-up state is complete; connections wait in the
    // backlog until then.
    let (gateway_listener, gateway_addr) = bind("gateway", config.gateway_addr).await?;
    let (registry_listener, registry_addr) = bind("registry", config.registry_addr).await?;
    let egress = Arc::new(
        EgressPolicy::new(config.upstream_allow.clone())
            .with_own_listeners(gateway_addr, registry_addr),
    );
    let loop_guard = LoopGuard::new();

    let services = Arc::new(ServiceTable::new());
    let cache_dir = config.data_dir.join("plugin-cache");
    plugin::loader::clear_cache(&cache_dir).map_err(|source| HostError::DataDir {
        path: cache_dir.clone(),
        source,
    })?;

    // Stored registrations go into the table before any plugin is loaded,
    // so a plugin file cannot take the name of a remote service accepted
    // earlier (see `Registry::open`).
    let registry = registry::Registry::open(
        services.clone(),
        registry::RegistryConfig {
            store: config.registry_store(),
            policy: config.registry_policy(),
            max_body_bytes: config.registry_max_body_bytes,
            body_timeout: config.request_timeout,
            max_stored_bytes: config.registry_max_bytes,
            max_instances: config.max_instances_per_service as usize,
            max_versions: config.max_versions_per_service as usize,
            instances: live.instances.clone(),
            egress: egress.clone(),
            loop_guard: loop_guard.clone(),
            tokens: live.registry_tokens.clone(),
            authenticator: live.authenticator.clone(),
            managed_keys: live.managed_keys.clone(),
            gateway_addr,
            trust_tenant_header: config.file.tenants.trust_header,
        },
    )?;

    let proxy = proxy::Proxy::new(
        config.request_timeout,
        egress,
        loop_guard.clone(),
        live.instances.clone(),
    );
    let calls = Arc::new(calls::ServiceCaller::new(
        services.clone(),
        proxy.clone(),
        tokio::runtime::Handle::current(),
        config.max_body_bytes,
    ));
    metrics::set_enabled(config.metrics == metrics::Switch::On);
    let files = Arc::new(plugin_manager::PluginFiles::new(config.plugins_dir.clone()));
    let (file_events, file_events_rx) = crossbeam_channel::unbounded();
    let (initial_scan_applied, initial_scan) = tokio::sync::oneshot::channel();
    let policy_changed = live.reloader.subscribe();
    let manager = plugin_manager::spawn(
        plugin_manager::ManagerConfig {
            cache_dir,
            policy: live.plugin_policy.clone(),
            drain_timeout: config.drain_timeout,
            entry_timeout: config.plugin_entry_timeout,
            file_checks: config.plugin_file_checks,
            max_plugin_threads: config.max_plugin_threads as usize,
            plugin_data_dir: config.data_dir.join("plugins"),
            plugin_settings: plugin_settings(&config.file.plugin),
            calls,
            call_timeout: config.request_timeout,
            files: files.clone(),
        },
        services.clone(),
        file_events_rx,
        policy_changed,
        initial_scan_applied,
    )
    .map_err(HostError::Manager)?;
    let reloading = tokio::spawn(reload::serve(config.clone(), live.reloader, reloads));
    let watcher = watcher::watch(&config.plugins_dir, config.watch_debounce, file_events)?;
    // Plugin files present at start-up take their names before the registry
    // accepts a registration: a service registering during a restart must
    // not take a plugin's name (restored registrations kept theirs above).
    tokio::pin!(shutdown);
    let stopped_during_start = tokio::select! {
        _ = initial_scan => false,
        () = &mut shutdown => true,
    };

    let gateway = gateway::router(gateway::Gateway {
        services: services.clone(),
        proxy,
        max_body_bytes: config.max_body_bytes,
        request_timeout: config.request_timeout,
        loop_guard,
        auth: live.authenticator.clone(),
        admission: live.admission.clone(),
        trust_tenant_header: config.file.tenants.trust_header,
    });
    let liveness = registry.spawn_liveness();
    let admission_housekeeping = admission::spawn_housekeeping(live.admission.clone());
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let observe = observe::router(
        observe::Observe {
            services: services.clone(),
            instances: live.instances.clone(),
            files,
            registry: registry.clone(),
            stopping: stopping.clone(),
        },
        (config.metrics == metrics::Switch::On).then_some(config.metrics_path.as_str()),
    );
    let registry = registry::router(registry, observe.merge(console::router()));

    if !stopped_during_start {
        tracing::info!(
            gateway = %gateway_addr,
            registry = %registry_addr,
            plugins_dir = %config.plugins_dir.display(),
            "listening"
        );
    }

    let limits = server::ConnectionLimits {
        header_read_timeout: config.header_read_timeout,
        idle_timeout: config.idle_timeout,
        write_stall_timeout: config.write_stall_timeout,
        max_connections: config.max_connections as usize,
        tunnels: tunnel::TunnelLimits {
            idle_timeout: config.tunnel_idle_timeout,
            max_tunnels: config.max_tunnels as usize,
        },
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let gateway_server = server::serve(
        "gateway",
        gateway_listener,
        gateway,
        limits,
        stopped.clone(),
    );
    let registry_server = server::serve("registry", registry_listener, registry, limits, stopped);

    if !stopped_during_start {
        shutdown.await;
    }
    tracing::info!("shutting down");
    stopping.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = stop.send(true);
    // In-flight requests get the drain timeout to finish; a stalled stream
    // must not keep the host from unloading its plugins and exiting.
    let gateway_result = finish(gateway_server, config.drain_timeout).await;
    let registry_result = finish(registry_server, config.drain_timeout).await;
    liveness.abort();
    reloading.abort();
    admission_housekeeping.abort();
    // Closing the watcher closes the manager's event channel: it unloads
    // every plugin and ends.
    drop(watcher);
    let _ = tokio::task::spawn_blocking(move || manager.join()).await;
    for (what, result) in [("gateway", gateway_result), ("registry", registry_result)] {
        result.map_err(|join| HostError::Serve {
            what,
            source: std::io::Error::other(join),
        })?;
    }
    Ok(())
}

/// Each plugin's `[plugin.<name>] settings` as JSON, which the SDK reads
/// with serde: converted once here, so `plugin/` knows no config type.
fn plugin_settings(
    sections: &BTreeMap<String, plugin_manager::PluginSettings>,
) -> BTreeMap<String, serde_json::Value> {
    sections
        .iter()
        .map(|(name, section)| {
            // A TOML table always converts (a datetime becomes an object).
            let settings = serde_json::to_value(&section.settings).unwrap_or_default();
            (name.clone(), settings)
        })
        .collect()
}

/// Waits for a server to finish its requests, at most `deadline`, then
/// stops it (which closes the connections still open).
async fn finish(
    mut server: tokio::task::JoinHandle<()>,
    deadline: std::time::Duration,
) -> Result<(), tokio::task::JoinError> {
    match tokio::time::timeout(deadline, &mut server).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                timeout_ms = deadline.as_millis() as u64,
                "requests still open after the drain timeout; closing them"
            );
            server.abort();
            match server.await {
                Err(join) if join.is_cancelled() => Ok(()),
                other => other,
            }
        }
    }
}

/// Binds `addr`; also returns the address really bound (port 0 picks one).
async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), HostError> {
    let error = |source| HostError::Bind { what, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(error)?;
    let bound = listener.local_addr().map_err(error)?;
    Ok((listener, bound))
}
