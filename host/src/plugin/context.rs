//! The host's side of a plugin's context: what a loaded plugin may ask of
//! the host (log, call another service, run a background task, wait for
//! the stop signal), in host memory. The loader exposes it to the plugin
//! through the ABI's callbacks; the runtime owns it, keeps it alive until
//! the library is closed (or leaks it with a library it cannot close), and
//! stops and joins the background tasks before the plugin's shutdown hook.
//!
//! Calls to other services go through [`ServiceCalls`], implemented one
//! layer up (`crate::calls`), where the service table is: this module only
//! tracks the call chain, so that a chain that loops is refused here.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};

use super::loader::PluginTask;
use super::message::{PluginRequest, PluginResponse};
use crate::egress::MAX_VIA_HOPS;
use crate::http::{ApiError, Escaped, X_REQUEST_ID, new_request_id};
use crate::sync::{Tally, lock};
use crate::tenant::{self, X_TENANT_ID};

/// Background tasks one plugin may run at once; a plugin spawning more is
/// refused (503) until some end. They are threads, outside the worker
/// budget (`--max-plugin-threads`), so they are capped here.
pub const MAX_BACKGROUND_TASKS: usize = 64;

/// Where another service's requests go, for a plugin's calls: implemented
/// where the service table is.
pub trait ServiceCalls: Send + Sync + std::fmt::Debug {
    /// Sends `request` to the service `service` and blocks, at most
    /// `timeout`, for its answer; refusals are answers (404, 503, 504...).
    /// Called on plugin threads, never on the async runtime's.
    fn call(&self, service: &str, request: PluginRequest, timeout: Duration) -> PluginResponse;
}

/// The request a call belongs to and the services it passed, outermost
/// first: a call to a service already in it is a loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallChain {
    /// The `X-Request-Id` every call of the chain carries.
    pub request_id: HeaderValue,
    /// The services the chain passed, the current one last.
    pub services: Vec<String>,
    /// The tenant every call of the chain is resolved in and carries as
    /// `X-Tenant-ID`: the gateway request's (which the gateway set), or
    /// for a background task's chain, its plugin's; `None`: the default
    /// tenant, and no header.
    pub tenant: Option<HeaderValue>,
}

impl CallChain {
    /// The chain of a request the gateway hands `service`, in `tenant`.
    pub fn start(service: &str, request_id: HeaderValue, tenant: Option<HeaderValue>) -> Self {
        Self {
            request_id,
            services: vec![service.to_owned()],
            tenant,
        }
    }

    /// The chain of a call from the current service to `service`, or why
    /// not: `service` is already in the chain (the call would wait for
    /// itself), or the chain is as long as a request may travel
    /// ([`MAX_VIA_HOPS`], the gateway's own limit).
    pub fn extend(&self, service: &str) -> Result<Self, String> {
        if self.services.iter().any(|passed| passed == service) {
            return Err(format!(
                "call loop: {} -> {service}",
                self.services.join(" -> ")
            ));
        }
        if self.services.len() >= MAX_VIA_HOPS {
            return Err(format!(
                "call chain passed {} services, more than the limit of {MAX_VIA_HOPS}",
                self.services.len() + 1
            ));
        }
        let mut services = self.services.clone();
        services.push(service.to_owned());
        Ok(Self {
            request_id: self.request_id.clone(),
            services,
            tenant: self.tenant.clone(),
        })
    }
}

thread_local! {
    /// The request this worker thread is handling, whose chain its calls
    /// extend: a host thread-local, in the host's std, so it pins no
    /// plugin library.
    static CURRENT_REQUEST: RefCell<Option<Arc<PluginRequest>>> = const { RefCell::new(None) };
}

/// Runs `handle` (a plugin's handler) with `request` as the request whose
/// chain its calls extend.
pub(crate) fn within_request<R>(request: &Arc<PluginRequest>, handle: impl FnOnce() -> R) -> R {
    let previous = CURRENT_REQUEST.replace(Some(request.clone()));
    let result = handle();
    CURRENT_REQUEST.set(previous);
    result
}

/// What the runtime needs to give a plugin its context.
#[derive(Debug, Clone)]
pub struct HostSetup {
    /// The plugin's settings, a JSON object.
    pub settings: serde_json::Value,
    /// The plugin's data directory; created if missing.
    pub data_dir: PathBuf,
    /// Where its calls go.
    pub calls: Arc<dyn ServiceCalls>,
    /// Longest wait of a call (the host's request timeout).
    pub call_timeout: Duration,
    /// The tenant the plugin belongs to: its background tasks' calls are
    /// resolved in it.
    pub tenant: String,
}

/// One loaded plugin's context, host side.
#[derive(Debug)]
pub struct HostContext {
    name: String,
    settings_json: String,
    data_dir: PathBuf,
    calls: Arc<dyn ServiceCalls>,
    call_timeout: Duration,
    /// Its tenant as `X-Tenant-ID`, for its background tasks' calls;
    /// `None` in the default tenant.
    tenant: Option<HeaderValue>,
    tasks: Mutex<Tasks>,
    /// Notified when `tasks.stopping` is set.
    stop: Condvar,
    /// Background tasks whose thread has not ended.
    running: Arc<Tally>,
    /// For a task's thread to hold the context alive while it runs.
    this: Weak<HostContext>,
}

#[derive(Debug, Default)]
struct Tasks {
    /// The stop signal: set once the plugin is being unloaded.
    stopping: bool,
    threads: Vec<JoinHandle<()>>,
}

/// A failure to create a plugin's data directory.
#[derive(Debug, thiserror::Error)]
#[error("cannot create the plugin's data directory {}: {source}", path.display())]
pub struct DataDirError {
    path: PathBuf,
    source: std::io::Error,
}

impl HostContext {
    /// The context of plugin `name`; creates its data directory.
    pub fn new(name: &str, setup: HostSetup) -> Result<Arc<Self>, DataDirError> {
        std::fs::create_dir_all(&setup.data_dir).map_err(|source| DataDirError {
            path: setup.data_dir.clone(),
            source,
        })?;
        Ok(Arc::new_cyclic(|this| Self {
            name: name.to_owned(),
            settings_json: setup.settings.to_string(),
            data_dir: setup.data_dir,
            calls: setup.calls,
            call_timeout: setup.call_timeout,
            // A tenant id is a valid header value.
            tenant: (!tenant::is_default(&setup.tenant))
                .then(|| HeaderValue::from_str(&setup.tenant).ok())
                .flatten(),
            tasks: Mutex::default(),
            stop: Condvar::new(),
            running: Arc::default(),
            this: this.clone(),
        }))
    }

    /// The plugin's service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The settings, as a JSON object.
    pub fn settings_json(&self) -> &str {
        &self.settings_json
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether an event at `level` (the ABI's numbering) would be logged.
    pub fn log_enabled(&self, level: u8) -> bool {
        macro_rules! enabled {
            ($level:expr) => {
                tracing::enabled!(target: "plugin", $level)
            };
        }
        match level {
            1 => enabled!(tracing::Level::ERROR),
            2 => enabled!(tracing::Level::WARN),
            3 => enabled!(tracing::Level::INFO),
            4 => enabled!(tracing::Level::DEBUG),
            _ => enabled!(tracing::Level::TRACE),
        }
    }

    /// Logs a plugin's event under the target `plugin`, with the plugin's
    /// name and module; the message is escaped, so a plugin cannot forge
    /// log lines.
    pub fn log(&self, level: u8, module: &str, message: &str) {
        macro_rules! event {
            ($level:expr) => {
                tracing::event!(target: "plugin", $level, plugin = %self.name, module = %Escaped(module), "{}", Escaped(message))
            };
        }
        match level {
            1 => event!(tracing::Level::ERROR),
            2 => event!(tracing::Level::WARN),
            3 => event!(tracing::Level::INFO),
            4 => event!(tracing::Level::DEBUG),
            _ => event!(tracing::Level::TRACE),
        }
    }

    /// Sends `request` to `service` for the plugin: as part of the chain of
    /// the request its thread handles, or of a new chain from a background
    /// task. A loop is answered 508 here; the wait is bounded by the
    /// host's request timeout, or less if `timeout` asks.
    pub fn call(
        &self,
        service: &str,
        mut request: PluginRequest,
        timeout: Option<Duration>,
    ) -> PluginResponse {
        // A request from the gateway starts its chain here, with its id and
        // tenant; a background task's call starts a chain of its own, in
        // the plugin's tenant.
        let caller = CURRENT_REQUEST
            .with_borrow(|current| {
                let current = current.as_ref()?;
                Some(current.chain.clone().unwrap_or_else(|| {
                    let id = current.headers.get(X_REQUEST_ID).cloned();
                    Arc::new(CallChain::start(
                        &self.name,
                        id.unwrap_or_else(new_request_id),
                        current.headers.get(X_TENANT_ID).cloned(),
                    ))
                }))
            })
            .unwrap_or_else(|| {
                Arc::new(CallChain::start(
                    &self.name,
                    new_request_id(),
                    self.tenant.clone(),
                ))
            });
        let chain = match caller.extend(service) {
            Ok(chain) => chain,
            Err(reason) => {
                tracing::debug!(plugin = %self.name, service = %service, error = %reason, "plugin call refused: loop");
                return PluginResponse::from_error(
                    ApiError::new(StatusCode::LOOP_DETECTED, reason).with("service", service),
                );
            }
        };
        // The callee sees the request id of the chain, whatever the
        // plugin set.
        request
            .headers
            .insert(X_REQUEST_ID, chain.request_id.clone());
        // And the chain's tenant, never one the plugin chose.
        request.headers.remove(X_TENANT_ID);
        if let Some(tenant) = &chain.tenant {
            request.headers.insert(X_TENANT_ID, tenant.clone());
        }
        request.chain = Some(Arc::new(chain));
        let timeout = timeout.map_or(self.call_timeout, |asked| asked.min(self.call_timeout));
        self.calls.call(service, request, timeout)
    }

    /// Runs `task` on a thread of its own, unless the plugin is being
    /// unloaded or runs [`MAX_BACKGROUND_TASKS`] already (the task is then
    /// discarded, and the reason returned).
    pub fn spawn(&self, task: PluginTask) -> Result<(), String> {
        let mut tasks = lock(&self.tasks);
        if tasks.stopping {
            return Err(format!("plugin `{}` is being unloaded", self.name));
        }
        // Threads that ended are joined now rather than at unload, so the
        // list stays as short as the tasks running.
        let (ended, running): (Vec<_>, Vec<_>) =
            tasks.threads.drain(..).partition(JoinHandle::is_finished);
        tasks.threads = running;
        for thread in ended {
            let _ = thread.join();
        }
        if tasks.threads.len() >= MAX_BACKGROUND_TASKS {
            return Err(format!(
                "plugin `{}` already runs {MAX_BACKGROUND_TASKS} background tasks, the most it may",
                self.name
            ));
        }
        let Some(this) = self.this.upgrade() else {
            return Err(format!("plugin `{}` is being unloaded", self.name));
        };
        let running = self.running.enter();
        let spawned = thread::Builder::new()
            .name(format!("plugin-{}-task", self.name))
            .spawn(move || {
                let _running = running;
                if let Some(panic) = task.run() {
                    tracing::warn!(plugin = %this.name, error = %Escaped(&panic), "plugin background task panicked");
                }
            });
        match spawned {
            Ok(thread) => {
                tasks.threads.push(thread);
                Ok(())
            }
            Err(error) => Err(format!("could not start a thread: {error}")),
        }
    }

    /// Waits at most `timeout` for the stop signal; whether it was given.
    pub fn wait_for_stop(&self, timeout: Duration) -> bool {
        let tasks = lock(&self.tasks);
        let (tasks, _) = self
            .stop
            .wait_timeout_while(tasks, timeout, |tasks| !tasks.stopping)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        tasks.stopping
    }

    /// Gives the stop signal: waiting tasks wake up, new ones are refused.
    pub fn signal_stop(&self) {
        lock(&self.tasks).stopping = true;
        self.stop.notify_all();
    }

    /// Gives the stop signal, waits until `deadline` for every background
    /// task to end and joins them; returns how many still run (then none
    /// is joined: their threads keep running plugin code, and the library
    /// must stay loaded).
    pub fn stop_tasks(&self, deadline: Instant) -> usize {
        self.signal_stop();
        let still_running = self
            .running
            .wait_idle(deadline.saturating_duration_since(Instant::now()));
        if still_running == 0 {
            for thread in std::mem::take(&mut lock(&self.tasks).threads) {
                // Its loop ended: what is left is its exit (thread-local
                // destructors), which must be over before the library is
                // closed.
                let _ = thread.join();
            }
        }
        still_running
    }
}

impl PluginResponse {
    /// The answer to a call the host refused, in the gateway's error shape.
    pub fn from_error(error: ApiError) -> Self {
        let (status, body) = error.into_json();
        let mut headers = HeaderMap::with_capacity(1);
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Self {
            status: status.as_u16(),
            headers,
            body: body.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_refuses_a_service_it_passed_and_too_many_hops() {
        let chain = CallChain::start(
            "a",
            HeaderValue::from_static("id-1"),
            Some(HeaderValue::from_static("acme")),
        );
        let chain = chain.extend("b").unwrap();
        assert_eq!(chain.services, ["a", "b"]);
        assert_eq!(chain.request_id, "id-1");
        assert_eq!(
            chain.tenant.as_ref().unwrap(),
            "acme",
            "a chain keeps its tenant"
        );
        assert_eq!(chain.extend("a").unwrap_err(), "call loop: a -> b -> a");
        let mut long = chain;
        for hop in 0..MAX_VIA_HOPS - 2 {
            long = long.extend(&format!("s{hop}")).unwrap();
        }
        assert!(
            long.extend("last")
                .unwrap_err()
                .contains(&format!("more than the limit of {MAX_VIA_HOPS}"))
        );
    }
}
