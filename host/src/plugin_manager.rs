//! The plugin manager: applies settled file events to the service table.
//!
//! It owns which file is mounted under which name, and the budget of
//! worker threads all plugins share. For a changed file it takes the
//! file's workers from that budget, asks the loader for a library, starts
//! a runtime for it, and swaps it into the table in one step, so a request
//! sees the old version or the new one, never neither. Whatever leaves the table (replaced, removed, refused
//! after start) is unloaded on a thread of its own: wait (bounded by the
//! drain timeout, woken by the last call's end) until no call is in flight,
//! then shut the runtime down. It runs on one std thread, so file events
//! are applied strictly in order; it never serves a request. The plugin
//! code a load waits for (`dlopen`, `config`, `init`) runs on threads of
//! its own with the entry timeout, so a plugin that hangs there costs the
//! manager that long once, and its file is refused with its library left
//! loaded.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::plugin::{
    Candidate, CloseReport, FileChecks, HostSetup, PluginLibrary, PluginRuntime, RuntimeLimits,
    ServiceCalls, ShutdownReport, ThreadBudget,
};
use crate::table::{Backend, PluginBackend, Service, ServiceTable};
use crate::watcher::FileEvent;

/// What the manager needs to know.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Where private copies of libraries go.
    pub cache_dir: PathBuf,
    /// Threads and queue per plugin.
    pub limits: RuntimeLimits,
    /// Longest wait for an unloaded plugin's requests and threads.
    pub drain_timeout: Duration,
    /// Longest wait for each call into plugin code a load or unload waits
    /// for (`dlopen`, `config`, `init`, the shutdown hook).
    pub entry_timeout: Duration,
    /// Which plugin files are trusted enough to read.
    pub file_checks: FileChecks,
    /// Worker threads of all plugins together.
    pub max_plugin_threads: usize,
    /// Where each plugin's data directory goes: `<this>/<service name>/`.
    pub plugin_data_dir: PathBuf,
    /// Each plugin's settings (a JSON object), by service name; read at
    /// each load, so new settings apply from the next load of the plugin.
    pub plugin_settings: BTreeMap<String, serde_json::Value>,
    /// Where plugins' calls to other services go.
    pub calls: Arc<dyn ServiceCalls>,
    /// Longest wait of a plugin's call to another service.
    pub call_timeout: Duration,
}

struct Mounted {
    name: String,
    digest: u64,
    runtime: Arc<PluginRuntime>,
}

/// Applies `events` until the channel closes, then unloads every plugin
/// and waits for the unloads to finish. `initial_scan_applied` is sent once
/// every file present at start-up was loaded or refused.
pub fn spawn(
    config: ManagerConfig,
    services: Arc<ServiceTable>,
    events: Receiver<FileEvent>,
    initial_scan_applied: tokio::sync::oneshot::Sender<()>,
) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("plugin-manager".to_owned())
        .spawn(move || {
            let freed = services.freed_names();
            let mut manager = Manager {
                threads: ThreadBudget::new(config.max_plugin_threads),
                config,
                services,
                mounted: HashMap::new(),
                waiting_for_name: HashMap::new(),
                unloads: Vec::new(),
            };
            let mut initial_scan_applied = Some(initial_scan_applied);
            loop {
                crossbeam_channel::select! {
                    recv(events) -> event => match event {
                        Ok(FileEvent::Changed(path)) => manager.load(path),
                        Ok(FileEvent::Removed(path)) => manager.remove(&path),
                        Ok(FileEvent::InitialScanDone) => {
                            if let Some(applied) = initial_scan_applied.take() {
                                let _ = applied.send(());
                            }
                        }
                        Err(_) => break,
                    },
                    recv(freed) -> name => {
                        if let Ok(name) = name {
                            manager.name_freed(&name);
                        }
                    }
                }
                manager.unloads.retain(|unload| !unload.is_finished());
            }
            manager.unload_all();
        })
}

struct Manager {
    config: ManagerConfig,
    threads: Arc<ThreadBudget>,
    services: Arc<ServiceTable>,
    mounted: HashMap<PathBuf, Mounted>,
    /// Files refused because another service held their name: loaded again
    /// when that name is free.
    waiting_for_name: HashMap<PathBuf, String>,
    unloads: Vec<JoinHandle<()>>,
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl Manager {
    fn load(&mut self, path: PathBuf) {
        self.waiting_for_name.remove(&path);
        let started = Instant::now();
        let file = file_name(&path);
        let candidate = match Candidate::read(&path, self.config.file_checks) {
            Ok(candidate) => candidate,
            Err(error) => {
                tracing::warn!(file = %file, error = %error, "plugin file refused");
                return;
            }
        };
        if self
            .mounted
            .get(&path)
            .is_some_and(|mounted| mounted.digest == candidate.digest())
        {
            tracing::debug!(file = %file, "plugin file rewritten with the same content; kept as loaded");
            return;
        }
        let digest = candidate.digest();
        // Before any plugin code runs: a plugin refused for want of threads
        // must not have run its initializers. The version this file
        // replaces gives its workers back once drained; until then the swap
        // may use them (see `ThreadBudget::acquire`).
        let replacing = self
            .mounted
            .get(&path)
            .map_or(0, |mounted| mounted.runtime.worker_count());
        let wanted = usize::from(self.config.limits.workers);
        let workers = match self.threads.acquire(wanted, replacing) {
            Ok(workers) => workers,
            Err(error) => {
                tracing::warn!(file = %file, error = %error, "plugin file refused");
                return;
            }
        };
        let stem = path
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (library, info) = match PluginLibrary::open(
            candidate,
            &stem,
            &self.config.cache_dir,
            self.config.entry_timeout,
        ) {
            Ok(opened) => opened,
            Err(error) => {
                tracing::warn!(file = %file, error = %error, "plugin file refused");
                return;
            }
        };
        let name = info.name.clone();
        if let Some(holder) = self.name_holder(&name, &file) {
            tracing::warn!(file = %file, plugin = %name, holder = %holder, "plugin file refused: service name already in use");
            log_close(&name, &file, library.close());
            self.waiting_for_name.insert(path, name);
            return;
        }
        let granted = workers.len();
        let host = HostSetup {
            settings: self
                .config
                .plugin_settings
                .get(&name)
                .cloned()
                .unwrap_or_else(|| serde_json::Value::Object(serde_json::Map::new())),
            data_dir: self.config.plugin_data_dir.join(&name),
            calls: self.config.calls.clone(),
            call_timeout: self.config.call_timeout,
        };
        let runtime = match PluginRuntime::start(
            &name,
            library,
            workers,
            self.config.limits.queue,
            self.config.entry_timeout,
            host,
        ) {
            Ok(runtime) => Arc::new(runtime),
            Err(error) => {
                tracing::warn!(file = %file, plugin = %name, error = %error, "plugin file refused");
                return;
            }
        };
        let version = info.version.clone();
        let endpoints = info.endpoints.len();
        let service = Service {
            info,
            backend: Backend::Plugin(PluginBackend {
                runtime: runtime.clone(),
                loaded_from: file.clone(),
            }),
        };
        // The table decides the race with a remote registration: it may
        // have taken the name since `name_holder` looked.
        match self
            .services
            .insert(service, |holder| is_plugin_from(holder, &file))
        {
            Ok(replaced) => drop(replaced),
            Err(holder) => {
                tracing::warn!(file = %file, plugin = %name, holder = %describe(&holder), "plugin file refused: service name already in use");
                self.unload(runtime, file);
                self.waiting_for_name.insert(path, name);
                return;
            }
        }
        let previous = self.mounted.insert(
            path,
            Mounted {
                name: name.clone(),
                digest,
                runtime,
            },
        );
        let replaced = previous.is_some();
        if granted < wanted {
            tracing::warn!(
                plugin = %name,
                file = %file,
                workers = granted,
                wanted,
                max_plugin_threads = self.threads.max(),
                "plugin thread limit reached: plugin runs with fewer workers"
            );
        }
        if let Some(previous) = previous {
            if previous.name != name {
                self.services
                    .remove_if(&previous.name, |s| is_runtime(s, &previous.runtime));
            }
            self.unload(previous.runtime, file.clone());
        }
        tracing::info!(
            plugin = %name,
            version = %version,
            file = %file,
            endpoints,
            workers = granted,
            replaced,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "plugin mounted"
        );
    }

    /// Who other than the plugin file `file` holds `name`, if anyone.
    fn name_holder(&self, name: &str, file: &str) -> Option<String> {
        self.services
            .get(name)
            .filter(|holder| !is_plugin_from(holder, file))
            .map(|holder| describe(&holder))
    }

    fn remove(&mut self, path: &Path) {
        self.waiting_for_name.remove(path);
        let Some(mounted) = self.mounted.remove(path) else {
            return;
        };
        self.services
            .remove_if(&mounted.name, |s| is_runtime(s, &mounted.runtime));
        tracing::info!(plugin = %mounted.name, file = %file_name(path), "plugin unmounted");
        self.unload(mounted.runtime, file_name(path));
    }

    /// Loads the files that were refused because `name` was taken: a plugin
    /// file or a remote service let go of it.
    fn name_freed(&mut self, name: &str) {
        let waiting: Vec<PathBuf> = self
            .waiting_for_name
            .iter()
            .filter(|(_, wanted)| *wanted == name)
            .map(|(path, _)| path.clone())
            .collect();
        for path in waiting {
            tracing::info!(file = %file_name(&path), plugin = %name, "service name free again; loading the file that wanted it");
            self.load(path);
        }
    }

    /// Drains and shuts down `runtime` on a thread of its own. The caller
    /// has already taken it out of the table.
    fn unload(&mut self, runtime: Arc<PluginRuntime>, file: String) {
        let drain_timeout = self.config.drain_timeout;
        let name = runtime.name().to_owned();
        let spawned = thread::Builder::new()
            .name(format!("unload-{name}"))
            .spawn(move || unload(runtime, &file, drain_timeout));
        match spawned {
            Ok(handle) => self.unloads.push(handle),
            Err(error) => {
                tracing::error!(plugin = %name, %error, "could not spawn an unload thread; plugin left loaded");
            }
        }
    }

    fn unload_all(mut self) {
        let mounted: Vec<(PathBuf, Mounted)> = self.mounted.drain().collect();
        for (path, mounted) in mounted {
            self.services
                .remove_if(&mounted.name, |s| is_runtime(s, &mounted.runtime));
            self.unload(mounted.runtime, file_name(&path));
        }
        for unload in self.unloads {
            let _ = unload.join();
        }
    }
}

fn is_plugin_from(service: &Service, file: &str) -> bool {
    matches!(&service.backend, Backend::Plugin(plugin) if plugin.loaded_from == file)
}

fn is_runtime(service: &Service, runtime: &Arc<PluginRuntime>) -> bool {
    matches!(&service.backend, Backend::Plugin(plugin) if Arc::ptr_eq(&plugin.runtime, runtime))
}

fn describe(service: &Service) -> String {
    match &service.backend {
        Backend::Plugin(plugin) => format!("plugin file {}", plugin.loaded_from),
        Backend::Remote(_) => format!("remote service `{}`", service.info.name),
    }
}

/// Waits until no call is in flight on `runtime` (the table no longer
/// holds it, so no new one starts but a racing lookup's), then shuts it
/// down; both waits share `drain_timeout`.
fn unload(runtime: Arc<PluginRuntime>, file: &str, drain_timeout: Duration) {
    let started = Instant::now();
    let name = runtime.name().to_owned();
    let in_flight = runtime.wait_for_calls(drain_timeout);
    if in_flight > 0 {
        tracing::warn!(plugin = %name, file = %file, in_flight, "requests still in flight after the drain timeout; shutting down anyway");
    }
    let remaining = drain_timeout.saturating_sub(started.elapsed());
    match runtime.shutdown(remaining.max(Duration::from_millis(100))) {
        ShutdownReport::Closed { hook_error, close } => {
            if let Some(error) = hook_error {
                tracing::warn!(plugin = %name, file = %file, %error, "plugin shutdown hook failed");
            }
            log_close(&name, file, close);
            tracing::info!(plugin = %name, file = %file, elapsed_ms = started.elapsed().as_millis() as u64, "plugin unloaded");
        }
        ShutdownReport::Leaked { running_workers } => {
            tracing::warn!(plugin = %name, file = %file, running_workers, "plugin workers still busy after the drain timeout; library left loaded");
        }
        ShutdownReport::TasksLeaked { running_tasks } => {
            tracing::warn!(plugin = %name, file = %file, running_tasks, "plugin background tasks still running after the stop signal and the drain timeout; library left loaded");
        }
        ShutdownReport::HookAbandoned(error) => {
            tracing::warn!(plugin = %name, file = %file, %error, "plugin shutdown hook abandoned; library left loaded");
        }
    }
}

fn log_close(name: &str, file: &str, close: CloseReport) {
    if let Some(error) = close.close_error {
        tracing::warn!(plugin = %name, file = %file, %error, "dlclose failed");
    }
    if close.still_mapped {
        tracing::warn!(plugin = %name, file = %file, "library still mapped after dlclose (a plugin thread or thread-local pins it)");
    }
}
