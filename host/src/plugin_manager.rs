//! The plugin manager: applies settled file events to the service table.
//!
//! It owns which file is mounted under which name and version (two files
//! may serve two versions of one name; a file whose name and version are
//! another file's, or whose name remote services hold, waits), and the
//! budget of worker threads all plugins share. For a changed file it takes the
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
//!
//! What it applies to each plugin by name, worker threads, queue and an
//! integrity pin, is the [`PluginPolicy`], which a config reload replaces:
//! a changed pin is applied at once (a mounted plugin whose file does not
//! match its pin is unmounted; a file refused by its pin is read again
//! when the pin changes), a changed number of workers or queue length at
//! the plugin's next load (its file changed, or touched).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use crossbeam_channel::Receiver;
use serde::Deserialize;

use crate::auth::SecretDigest;
use crate::metrics::{self, Refusal};
use crate::plugin::{
    Candidate, CloseReport, FileChecks, HostSetup, PluginLibrary, PluginRuntime, RuntimeLimits,
    ServiceCalls, ShutdownReport, ThreadBudget,
};
use crate::service::{self, Version};
use crate::settings::SettingsError;
use crate::sync::lock;
use crate::table::{Backend, PluginBackend, Service, ServiceTable};
use crate::tenant;
use crate::watcher::FileEvent;

/// `[plugin.<name>]` of the config file: what the host applies to the
/// plugin whose service is `<name>`, whichever file declares it.
/// Reloadable (see the module's doc for when each key takes effect).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSettings {
    /// Worker threads for this plugin, 1 to 256; overrides `[plugins]
    /// workers`. Applies at the plugin's next load.
    pub workers: Option<u16>,
    /// Requests that may wait for this plugin's workers; overrides
    /// `[plugins] queue`. Applies at the plugin's next load.
    pub queue: Option<usize>,
    /// Hex SHA-256 the plugin's file must have (`sha256sum <file>`): a file
    /// declaring this service with another digest is refused, and a
    /// mounted one is unmounted when a reload pins it to another digest.
    pub sha256: Option<String>,
    /// The plugin's own settings, which it reads through its context
    /// (`ctx.settings::<T>()`). Applies at the plugin's next load.
    #[serde(default)]
    pub settings: toml::Table,
}

/// What the manager applies to each plugin, by its service name: threads
/// and queue (the defaults, or the plugin's own), and the SHA-256 its file
/// must have, if pinned. Plain values, built from the config by
/// [`PluginPolicy::from_settings`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginPolicy {
    defaults: RuntimeLimits,
    plugins: BTreeMap<String, PluginRule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PluginRule {
    workers: Option<u16>,
    queue: Option<usize>,
    pin: Option<SecretDigest>,
}

impl PluginPolicy {
    /// The policy for `defaults` (`[plugins] workers` and `queue`) and the
    /// `[plugin.<name>]` sections; every value is checked here, so a
    /// policy that was built can be applied.
    pub fn from_settings(
        defaults: RuntimeLimits,
        plugins: &BTreeMap<String, PluginSettings>,
    ) -> Result<Self, SettingsError> {
        let mut rules = BTreeMap::new();
        for (name, settings) in plugins {
            let refused = |key: &str, reason: String| SettingsError {
                key: format!("plugin.{name}{key}"),
                reason,
            };
            // A section no plugin can ever match is a typo.
            service::validate_name(name)
                .map_err(|error| refused("", format!("not a service name: {error}")))?;
            let workers = settings
                .workers
                .map(RuntimeLimits::check_workers)
                .transpose()
                .map_err(|reason| refused(".workers", reason))?;
            let pin = settings
                .sha256
                .as_deref()
                .map(SecretDigest::from_hex)
                .transpose()
                .map_err(|_| {
                    refused(
                        ".sha256",
                        "not a SHA-256 digest: expected 64 hex digits (`sha256sum <file>`)"
                            .to_owned(),
                    )
                })?;
            rules.insert(
                name.clone(),
                PluginRule {
                    workers,
                    queue: settings.queue,
                    pin,
                },
            );
        }
        Ok(Self {
            defaults,
            plugins: rules,
        })
    }

    /// The threads and queue of the plugin `name`.
    pub fn limits(&self, name: &str) -> RuntimeLimits {
        let rule = self.plugins.get(name);
        RuntimeLimits {
            workers: rule
                .and_then(|rule| rule.workers)
                .unwrap_or(self.defaults.workers),
            queue: rule
                .and_then(|rule| rule.queue)
                .unwrap_or(self.defaults.queue),
        }
    }

    /// The SHA-256 the file of the plugin `name` must have, if pinned.
    pub fn pin(&self, name: &str) -> Option<&SecretDigest> {
        self.plugins.get(name)?.pin.as_ref()
    }
}

/// What the manager needs to know.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Where private copies of libraries go.
    pub cache_dir: PathBuf,
    /// Threads, queue and pin per plugin; replaced by a config reload,
    /// which then signals the manager's `policy_changed` channel.
    pub policy: Arc<ArcSwap<PluginPolicy>>,
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
    /// What became of each plugin file, written here and read by the
    /// registry listener.
    pub files: Arc<PluginFiles>,
}

/// What became of a plugin file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileState {
    /// Mounted: its service is routed.
    Loaded,
    /// Not mounted; the reason says why.
    Refused,
    /// Declares a name another service holds; loaded when it is free.
    Waiting,
}

/// One file of the plugins directory, as `GET /api/registry/plugins/files`
/// lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileStatus {
    /// Its name in the plugins directory (`<directory>/<file>` for a file
    /// in a subdirectory: a tenant's).
    pub file: String,
    /// What became of it.
    pub state: FileState,
    /// The service it declares, once it was read that far.
    pub service: Option<String>,
    /// The version it declares, once it was read that far.
    pub version: Option<String>,
    /// Why it is refused or waiting.
    pub reason: Option<String>,
    /// When it entered this state.
    #[serde(serialize_with = "rfc3339")]
    pub since: SystemTime,
}

fn rfc3339<S: serde::Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_rfc3339_millis(*time))
}

/// The status of every plugin file the manager has looked at, by file
/// name: written by the manager's thread only, read by the registry
/// listener (a copy per read).
#[derive(Debug)]
pub struct PluginFiles {
    directory: PathBuf,
    files: Mutex<BTreeMap<String, FileStatus>>,
}

impl PluginFiles {
    /// No file seen yet in `directory`.
    pub fn new(directory: PathBuf) -> Self {
        Self {
            directory,
            files: Mutex::default(),
        }
    }

    /// The plugins directory.
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// Every file's status, by file name.
    pub fn list(&self) -> Vec<FileStatus> {
        lock(&self.files).values().cloned().collect()
    }

    fn set(
        &self,
        file: &str,
        state: FileState,
        service: Option<&str>,
        version: Option<&str>,
        reason: Option<String>,
    ) {
        lock(&self.files).insert(
            file.to_owned(),
            FileStatus {
                file: file.to_owned(),
                state,
                service: service.map(str::to_owned),
                version: version.map(str::to_owned),
                reason,
                since: SystemTime::now(),
            },
        );
    }

    fn forget(&self, file: &str) {
        lock(&self.files).remove(file);
    }
}

struct Mounted {
    name: String,
    /// Its key in the table: the name in its tenant ([`tenant::key`]).
    key: String,
    /// Of the bytes loaded: checked against the pin, and tells a file
    /// written again with the same content.
    sha256: SecretDigest,
    /// What it was loaded with.
    limits: RuntimeLimits,
    runtime: Arc<PluginRuntime>,
}

/// Applies `events` until the channel closes, then unloads every plugin
/// and waits for the unloads to finish. A message on `policy_changed`
/// applies the policy now in `config.policy`. `initial_scan_applied` is
/// sent once every file present at start-up was loaded or refused.
pub fn spawn(
    config: ManagerConfig,
    services: Arc<ServiceTable>,
    events: Receiver<FileEvent>,
    policy_changed: Receiver<()>,
    initial_scan_applied: tokio::sync::oneshot::Sender<()>,
) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("plugin-manager".to_owned())
        .spawn(move || {
            let freed = services.freed_names();
            let mut manager = Manager {
                threads: ThreadBudget::new(config.max_plugin_threads),
                policy: config.policy.load_full(),
                config,
                services,
                mounted: HashMap::new(),
                waiting_for_name: HashMap::new(),
                root: std::cell::OnceCell::new(),
                refused_by_pin: HashMap::new(),
                unloads: Vec::new(),
            };
            let mut initial_scan_applied = Some(initial_scan_applied);
            let mut policy_changed = policy_changed;
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
                    recv(policy_changed) -> changed => match changed {
                        Ok(()) => manager.policy_changed(),
                        // No more reloads: stop selecting a closed channel.
                        Err(_) => policy_changed = crossbeam_channel::never(),
                    },
                }
                manager.unloads.retain(|unload| !unload.is_finished());
            }
            manager.unload_all();
        })
}

struct Manager {
    config: ManagerConfig,
    /// The policy applied: the one in `config.policy` as of the last
    /// `policy_changed` message.
    policy: Arc<PluginPolicy>,
    threads: Arc<ThreadBudget>,
    services: Arc<ServiceTable>,
    mounted: HashMap<PathBuf, Mounted>,
    /// Files refused because another service held their name: loaded again
    /// when that name (its table key, in the file's tenant) is free.
    waiting_for_name: HashMap<PathBuf, String>,
    /// The plugins directory as the watcher names it (canonical), found at
    /// the first event (the watcher creates it).
    root: std::cell::OnceCell<PathBuf>,
    /// Files refused (or unmounted) because their digest did not match the
    /// pin of the name they declared: read again when that pin changes.
    refused_by_pin: HashMap<PathBuf, String>,
    unloads: Vec<JoinHandle<()>>,
}

impl Manager {
    /// Where `path` (a path the watcher reported) sits: the subdirectory
    /// it is in, if any (a tenant's, if it is named like one), and its
    /// name as listed and logged: `x.so`, or `<dir>/x.so`.
    fn placed(&self, path: &Path) -> (Option<String>, String) {
        let root = self.root.get_or_init(|| {
            let directory = self.config.files.directory();
            directory
                .canonicalize()
                .unwrap_or_else(|_| directory.to_owned())
        });
        let name = |path: &Path| {
            path.file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        match path.parent() {
            Some(parent) if parent != root.as_path() => {
                let dir = name(parent);
                (Some(dir.clone()), format!("{dir}/{}", name(path)))
            }
            _ => (None, name(path)),
        }
    }

    /// `path`'s name as listed and logged ([`Self::placed`]).
    fn file_name(&self, path: &Path) -> String {
        self.placed(path).1
    }

    fn load(&mut self, path: PathBuf) {
        self.waiting_for_name.remove(&path);
        self.refused_by_pin.remove(&path);
        let started = Instant::now();
        let (directory, file) = self.placed(&path);
        let in_subdirectory = directory.is_some();
        // Files directly in the plugins directory are the default
        // tenant's; those in a subdirectory, the tenant it is named after.
        let tenant = match directory {
            None => tenant::DEFAULT.to_owned(),
            Some(directory) => match tenant::check(&directory) {
                Ok(()) => directory,
                Err(reason) => {
                    let why = format!(
                        "directory `{directory}` is not a tenant id ({reason}): a tenant's plugin files go in <plugins-dir>/<tenant>/"
                    );
                    self.refused(&file, Refusal::File, None, why.clone());
                    tracing::warn!(file = %file, error = %why, "plugin file refused");
                    return;
                }
            },
        };
        // `placed` found the plugins directory.
        let read = match self.root.get().filter(|_| in_subdirectory) {
            Some(root) => Candidate::read_below(&path, root, self.config.file_checks),
            None => Candidate::read(&path, self.config.file_checks),
        };
        let candidate = match read {
            Ok(candidate) => candidate,
            Err(error) => {
                self.refused(&file, Refusal::File, None, error.to_string());
                tracing::warn!(file = %file, error = %error, "plugin file refused");
                return;
            }
        };
        // Of the bytes the loader read and will load, not of the path,
        // which may have changed since.
        let sha256 = SecretDigest::of(candidate.bytes());
        if self.mounted.get(&path).is_some_and(|mounted| {
            mounted.sha256 == sha256 && mounted.limits == self.policy.limits(&mounted.name)
        }) {
            tracing::debug!(file = %file, "plugin file rewritten with the same content; kept as loaded");
            return;
        }
        // One worker before any plugin code runs: a plugin refused for want
        // of threads must not have run its initializers. The rest once the
        // plugin declared its name, which its limits depend on. The version
        // this file replaces gives its workers back once drained; until
        // then the swap may use them (see `ThreadBudget::acquire`).
        let replacing = self
            .mounted
            .get(&path)
            .map_or(0, |mounted| mounted.runtime.worker_count());
        let mut workers = match self.threads.acquire(1, replacing) {
            Ok(workers) => workers,
            Err(error) => {
                self.refused(&file, Refusal::Threads, None, error.to_string());
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
                self.refused(&file, Refusal::Library, None, error.to_string());
                tracing::warn!(file = %file, error = %error, "plugin file refused");
                return;
            }
        };
        let name = info.name.clone();
        let key = tenant::key(&tenant, &name).into_owned();
        // The loader checked the declaration, version included.
        let version = match Version::parse(&info.version) {
            Ok(version) => version,
            Err(error) => {
                self.refused(&file, Refusal::Library, Some(&name), error.to_string());
                tracing::warn!(file = %file, plugin = %name, error = %error, "plugin file refused");
                log_close(&name, &file, library.close());
                return;
            }
        };
        // Before `init`: a file that is not the pinned build never runs
        // more than its initializers and `config`, and is never mounted.
        if let Some(pin) = self.policy.pin(&name)
            && !pin.matches_digest(&sha256)
        {
            self.refused(&file, Refusal::Pin, Some(&name), pin_mismatch(&sha256));
            refuse_pin(&file, &name, pin, &sha256);
            log_close(&name, &file, library.close());
            self.refused_by_pin.insert(path, name);
            return;
        }
        if let Some(holder) = self.name_holder(&key, &version, &file) {
            self.waiting(&file, &name, &version, &holder);
            tracing::warn!(file = %file, plugin = %name, tenant = %tenant, version = %version, holder = %holder, "plugin file refused: service name already in use");
            log_close(&name, &file, library.close());
            self.waiting_for_name.insert(path, key);
            return;
        }
        let limits = self.policy.limits(&name);
        let wanted = usize::from(limits.workers);
        workers.extend(
            self.threads
                .acquire_more(wanted.saturating_sub(workers.len()), replacing),
        );
        let granted = workers.len();
        let host = HostSetup {
            settings: self
                .config
                .plugin_settings
                .get(&name)
                .cloned()
                .unwrap_or_else(|| serde_json::Value::Object(serde_json::Map::new())),
            // A tenant's plugin keeps its data apart from the default
            // tenant's plugin of the same name (`@` is in no name).
            data_dir: self
                .config
                .plugin_data_dir
                .join(if tenant::is_default(&tenant) {
                    name.clone()
                } else {
                    format!("{name}@{tenant}")
                }),
            calls: self.config.calls.clone(),
            call_timeout: self.config.call_timeout,
            tenant: tenant.clone(),
        };
        let runtime = match PluginRuntime::start(
            &name,
            library,
            workers,
            limits.queue,
            self.config.entry_timeout,
            host,
        ) {
            Ok(runtime) => Arc::new(runtime),
            Err(error) => {
                self.refused(&file, Refusal::Init, Some(&name), error.to_string());
                tracing::warn!(file = %file, plugin = %name, error = %error, "plugin file refused");
                return;
            }
        };
        let endpoints = info.endpoints.len();
        let service = Arc::new(Service::new(
            info,
            version.clone(),
            Backend::Plugin(PluginBackend {
                runtime: runtime.clone(),
                loaded_from: file.clone(),
                health: Arc::default(),
            }),
        ));
        // The table decides the race with a remote registration: it may
        // have taken the name since `name_holder` looked. The version this
        // file held (whichever it was) leaves in the same write, so a
        // request finds one or the other, never neither.
        let inserted = self.services.update(&key, |versions| {
            if let Some(holder) = versions.iter().find(|held| blocks(held, &version, &file)) {
                return Err(holder.clone());
            }
            Ok(versions
                .iter()
                .filter(|held| !is_plugin_from(held, &file))
                .cloned()
                .chain([service])
                .collect())
        });
        match inserted {
            Ok(replaced) => drop(replaced),
            Err(holder) => {
                self.waiting(&file, &name, &version, &describe(&holder));
                tracing::warn!(file = %file, plugin = %name, version = %version, holder = %describe(&holder), "plugin file refused: service name already in use");
                self.unload(runtime, file);
                self.waiting_for_name.insert(path, key);
                return;
            }
        }
        let previous = self.mounted.insert(
            path,
            Mounted {
                name: name.clone(),
                key: key.clone(),
                sha256,
                limits,
                runtime,
            },
        );
        let replaced = previous.is_some();
        metrics::host().plugin_loaded(replaced, started.elapsed());
        self.config.files.set(
            &file,
            FileState::Loaded,
            Some(&name),
            Some(&version.to_string()),
            None,
        );
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
            if previous.key != key {
                self.services
                    .remove_if(&previous.key, |s| is_runtime(s, &previous.runtime));
            }
            self.unload(previous.runtime, file.clone());
        }
        tracing::info!(
            plugin = %name,
            tenant = %tenant,
            version = %version,
            file = %file,
            endpoints,
            workers = granted,
            queue = limits.queue,
            replaced,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "plugin mounted"
        );
    }

    /// Applies the policy a reload stored. Pins take effect now: files
    /// refused by a pin that changed are read again (first, so a fixed file
    /// replaces its mounted predecessor in one swap), then every mounted
    /// plugin whose file does not match its pin is unmounted. New limits
    /// wait for each plugin's next load: restarting a plugin (its `init`,
    /// its state) is not a reload's to decide.
    fn policy_changed(&mut self) {
        let previous = std::mem::replace(&mut self.policy, self.config.policy.load_full());
        if previous == self.policy {
            return;
        }
        let pin_changed: Vec<PathBuf> = self
            .refused_by_pin
            .iter()
            .filter(|(_, name)| previous.pin(name) != self.policy.pin(name))
            .map(|(path, _)| path.clone())
            .collect();
        for path in pin_changed {
            tracing::info!(file = %self.file_name(&path), "plugin pin changed; reading the file again");
            self.load(path);
        }
        let mismatched: Vec<(PathBuf, String)> = self
            .mounted
            .iter()
            .filter_map(|(path, mounted)| {
                let pin = self.policy.pin(&mounted.name)?;
                if pin.matches_digest(&mounted.sha256) {
                    return None;
                }
                metrics::host().plugin_refused(Refusal::Pin);
                self.config.files.set(
                    &self.file_name(path),
                    FileState::Refused,
                    Some(&mounted.name),
                    None,
                    Some(pin_mismatch(&mounted.sha256)),
                );
                refuse_pin(&self.file_name(path), &mounted.name, pin, &mounted.sha256);
                Some((path.clone(), mounted.name.clone()))
            })
            .collect();
        for (path, name) in mismatched {
            self.unmount(&path);
            self.refused_by_pin.insert(path, name);
        }
        for (path, mounted) in &self.mounted {
            let limits = self.policy.limits(&mounted.name);
            if limits != mounted.limits {
                tracing::info!(
                    plugin = %mounted.name,
                    file = %self.file_name(path),
                    workers = limits.workers,
                    queue = limits.queue,
                    "plugin limits change at its next load (touch its file to load it now)"
                );
            }
        }
    }

    /// Who other than the plugin file `file` keeps it from serving
    /// `version` of the name under `key` (a name in a tenant), if anyone:
    /// remote services holding the name, or another plugin file holding
    /// that version.
    fn name_holder(&self, key: &str, version: &Version, file: &str) -> Option<String> {
        self.services.get(key).and_then(|versions| {
            versions
                .all()
                .iter()
                .find(|held| blocks(held, version, file))
                .map(|holder| describe(holder))
        })
    }

    /// Records a refusal of `file` (its status, the metric); the caller
    /// logs it after, so whoever saw the line sees the status too.
    fn refused(&self, file: &str, reason: Refusal, name: Option<&str>, why: String) {
        metrics::host().plugin_refused(reason);
        self.config
            .files
            .set(file, FileState::Refused, name, None, Some(why));
    }

    /// Records that `file` waits for `version` of `name`, which `holder`
    /// holds.
    fn waiting(&self, file: &str, name: &str, version: &Version, holder: &str) {
        metrics::host().plugin_refused(Refusal::NameTaken);
        self.config.files.set(
            file,
            FileState::Waiting,
            Some(name),
            Some(&version.to_string()),
            Some(format!(
                "service name `{name}` (version {version}) is held by {holder}"
            )),
        );
    }

    fn remove(&mut self, path: &Path) {
        self.config.files.forget(&self.file_name(path));
        self.waiting_for_name.remove(path);
        self.refused_by_pin.remove(path);
        self.unmount(path);
    }

    /// Takes the plugin mounted from `path`, if any, out of the table and
    /// unloads it.
    fn unmount(&mut self, path: &Path) {
        let Some(mounted) = self.mounted.remove(path) else {
            return;
        };
        self.services
            .remove_if(&mounted.key, |s| is_runtime(s, &mounted.runtime));
        tracing::info!(plugin = %mounted.name, file = %self.file_name(path), "plugin unmounted");
        self.unload(mounted.runtime, self.file_name(path));
    }

    /// Loads the files that were refused because `name` (a table key) was
    /// taken: a plugin file or a remote service let go of it.
    fn name_freed(&mut self, name: &str) {
        let waiting: Vec<PathBuf> = self
            .waiting_for_name
            .iter()
            .filter(|(_, wanted)| *wanted == name)
            .map(|(path, _)| path.clone())
            .collect();
        for path in waiting {
            tracing::info!(file = %self.file_name(&path), plugin = %name, "service name free again; loading the file that wanted it");
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
                .remove_if(&mounted.key, |s| is_runtime(s, &mounted.runtime));
            self.unload(mounted.runtime, self.file_name(&path));
        }
        for unload in self.unloads {
            let _ = unload.join();
        }
    }
}

fn is_plugin_from(service: &Service, file: &str) -> bool {
    matches!(&service.backend, Backend::Plugin(plugin) if plugin.loaded_from == file)
}

/// Whether `held`, a version of the name a plugin file declares, keeps
/// that file from serving `version`: a remote service (kinds do not mix
/// under one name) or another file's plugin of the same version.
fn blocks(held: &Service, version: &Version, file: &str) -> bool {
    match &held.backend {
        Backend::Remote(_) => true,
        Backend::Plugin(plugin) => held.version() == version && plugin.loaded_from != file,
    }
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
            metrics::host().plugin_unloaded();
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

/// The status reason of a file refused by its pin.
fn pin_mismatch(actual: &SecretDigest) -> String {
    format!(
        "its SHA-256 {} does not match the pin in the config",
        actual.to_hex()
    )
}

/// The one WARN line of a file refused (or unmounted) by its pin.
fn refuse_pin(file: &str, name: &str, pin: &SecretDigest, actual: &SecretDigest) {
    tracing::warn!(
        file = %file,
        plugin = %name,
        expected = %pin.to_hex(),
        actual = %actual.to_hex(),
        error = %format_args!("the file's SHA-256 does not match the pin plugin.{name}.sha256"),
        "plugin file refused"
    );
}

fn log_close(name: &str, file: &str, close: CloseReport) {
    if let Some(error) = close.close_error {
        tracing::warn!(plugin = %name, file = %file, %error, "dlclose failed");
    }
    if close.still_mapped {
        tracing::warn!(plugin = %name, file = %file, "library still mapped after dlclose (a plugin thread or thread-local pins it)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: RuntimeLimits = RuntimeLimits {
        workers: 4,
        queue: 1024,
    };

    fn policy(toml: &str) -> Result<PluginPolicy, SettingsError> {
        let sections: BTreeMap<String, PluginSettings> = toml::from_str(toml).expect("valid TOML");
        PluginPolicy::from_settings(DEFAULTS, &sections)
    }

    #[test]
    fn a_plugin_section_overrides_the_defaults_for_that_plugin_only() {
        let policy = policy("[hello]\nworkers = 2\n[echo]\nqueue = 8\n").unwrap();
        assert_eq!(
            policy.limits("hello"),
            RuntimeLimits {
                workers: 2,
                queue: 1024
            }
        );
        assert_eq!(
            policy.limits("echo"),
            RuntimeLimits {
                workers: 4,
                queue: 8
            }
        );
        assert_eq!(policy.limits("other"), DEFAULTS);
        assert_eq!(policy.pin("hello"), None);
    }

    #[test]
    fn a_pin_is_a_sha256_digest_matched_against_the_bytes() {
        let bytes = b"\x7fELF not really";
        let digest = SecretDigest::of(bytes);
        let policy = policy(&format!(
            "[hello]\nsha256 = \"{}\"\n",
            digest.to_hex().to_uppercase()
        ))
        .unwrap();
        let pin = policy.pin("hello").expect("pinned");
        assert!(pin.matches_digest(&SecretDigest::of(bytes)));
        assert!(!pin.matches_digest(&SecretDigest::of(b"another build")));
        assert_eq!(pin.to_hex(), digest.to_hex(), "kept as lower-case hex");
    }

    #[test]
    fn every_refusal_names_the_key() {
        let refused = |toml: &str| policy(toml).unwrap_err().to_string();
        assert_eq!(
            refused("[hello]\nworkers = 0\n"),
            "plugin.hello.workers: must be between 1 and 256"
        );
        assert_eq!(
            refused("[hello]\nworkers = 300\n"),
            "plugin.hello.workers: must be between 1 and 256"
        );
        assert_eq!(
            refused("[hello]\nsha256 = \"abc\"\n"),
            "plugin.hello.sha256: not a SHA-256 digest: expected 64 hex digits (`sha256sum <file>`)"
        );
        let bad_name = refused("[Hello]\nqueue = 1\n");
        assert!(
            bad_name.starts_with("plugin.Hello: not a service name: "),
            "{bad_name}"
        );
    }
}
