//! The plugin runtime: the threads a loaded plugin's code runs on.
//!
//! Each plugin gets a bounded queue and worker threads of its own. The
//! gateway sends a request as a message and awaits the reply on a oneshot
//! channel, so plugin code never runs on a tokio thread, and a slow or stuck
//! plugin costs its own workers only. [`PluginRuntime::shutdown`] is the
//! only way a plugin ends: stop taking work, let the queue drain, join every
//! worker, run the plugin's shutdown hook on a thread that is joined too,
//! and only then close the library.

use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use axum::http::StatusCode;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use tokio::sync::oneshot;

use super::loader::{CloseReport, Instance, PluginLibrary};
use super::message::{PluginRequest, PluginResponse};
use crate::sync::lock;

/// Why a call got no answer from the plugin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The queue is full.
    #[error("plugin is overloaded: {queued} requests already wait for its workers")]
    Overloaded {
        /// Requests waiting.
        queued: usize,
    },
    /// No answer in time; the request keeps its worker until the handler
    /// returns, but the client is answered now.
    #[error("plugin did not answer within {0:?}")]
    Timeout(Duration),
    /// The plugin is being unloaded and takes no new work.
    #[error("plugin is being unloaded")]
    Unloading,
}

impl CallError {
    /// The status the gateway answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            CallError::Overloaded { .. } | CallError::Unloading => StatusCode::SERVICE_UNAVAILABLE,
            CallError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// How a plugin's threads are sized.
#[derive(Debug, Clone, Copy)]
pub struct RuntimeLimits {
    /// Worker threads.
    pub workers: u16,
    /// Requests that may wait for a worker.
    pub queue: usize,
}

struct Job {
    request: Arc<PluginRequest>,
    reply: oneshot::Sender<PluginResponse>,
}

/// What the workers share: the library and the plugin's state in it.
struct Shared {
    library: PluginLibrary,
    instance: Instance,
}

/// What [`PluginRuntime::shutdown`] found.
#[derive(Debug)]
pub enum ShutdownReport {
    /// Every thread joined, the shutdown hook ran and the library was closed.
    Closed {
        /// Error of the plugin's shutdown hook, if it panicked.
        hook_error: Option<String>,
        /// What closing the library found.
        close: CloseReport,
    },
    /// Some worker was still running a handler after the deadline: the
    /// plugin's state and library are left alive (leaked), since freeing
    /// them under a running thread would crash the host.
    Leaked {
        /// Workers still running.
        running_workers: usize,
    },
}

/// A loaded plugin's workers. Shared by the service table and in-flight
/// requests; the manager calls [`PluginRuntime::shutdown`] once it is
/// unmounted.
pub struct PluginRuntime {
    name: String,
    /// `None` once shutdown began. Read on every call, so lock-free.
    jobs: ArcSwapOption<Sender<Job>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    shared: Mutex<Option<Arc<Shared>>>,
}

impl std::fmt::Debug for PluginRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRuntime")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Why a runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The plugin's `init` failed or panicked.
    #[error("{0}")]
    Init(String),
    /// The OS refused a thread.
    #[error("could not spawn a worker thread: {0}")]
    Spawn(std::io::Error),
}

impl PluginRuntime {
    /// Creates the plugin's state on a thread of its own and starts the
    /// workers. On failure the library is closed before returning.
    pub fn start(
        name: &str,
        library: PluginLibrary,
        limits: RuntimeLimits,
    ) -> Result<Self, StartError> {
        let instance = match thread::scope(|scope| {
            thread::Builder::new()
                .name(format!("plugin-{name}-init"))
                .spawn_scoped(scope, || library.create())
                .map(|handle| handle.join())
        }) {
            Ok(Ok(Ok(instance))) => instance,
            Ok(Ok(Err(message))) => {
                library.close();
                return Err(StartError::Init(message));
            }
            // The SDK catches panics in `create`, so a join error means the
            // panic came from the host's side of the thread; report it alike.
            Ok(Err(_)) => {
                library.close();
                return Err(StartError::Init("init thread panicked".to_owned()));
            }
            Err(error) => {
                library.close();
                return Err(StartError::Spawn(error));
            }
        };
        let (jobs, queue) = crossbeam_channel::bounded::<Job>(limits.queue);
        let runtime = Self {
            name: name.to_owned(),
            jobs: ArcSwapOption::from_pointee(jobs),
            workers: Mutex::new(Vec::new()),
            shared: Mutex::new(Some(Arc::new(Shared { library, instance }))),
        };
        for index in 0..limits.workers {
            let queue = queue.clone();
            let shared = lock(&runtime.shared).clone();
            let spawned = thread::Builder::new()
                .name(format!("plugin-{name}-{index}"))
                .spawn(move || {
                    if let Some(shared) = shared {
                        work(&shared, &queue);
                    }
                });
            match spawned {
                Ok(handle) => lock(&runtime.workers).push(handle),
                Err(error) => {
                    runtime.shutdown(Duration::from_secs(5));
                    return Err(StartError::Spawn(error));
                }
            }
        }
        Ok(runtime)
    }

    /// The plugin's service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends `request` to a worker and awaits the answer for at most
    /// `timeout`.
    pub async fn call(
        &self,
        request: Arc<PluginRequest>,
        timeout: Duration,
    ) -> Result<PluginResponse, CallError> {
        let (reply, answer) = oneshot::channel();
        {
            let jobs = self.jobs.load();
            let jobs = jobs.as_deref().ok_or(CallError::Unloading)?;
            jobs.try_send(Job { request, reply })
                .map_err(|error| match error {
                    TrySendError::Full(_) => CallError::Overloaded { queued: jobs.len() },
                    TrySendError::Disconnected(_) => CallError::Unloading,
                })?;
        }
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(response)) => Ok(response),
            // The worker dropped the reply without answering: it only does
            // that when the runtime shuts down under it.
            Ok(Err(_)) => Err(CallError::Unloading),
            Err(_) => Err(CallError::Timeout(timeout)),
        }
    }

    /// Stops the plugin: refuses new calls, lets queued ones finish, joins
    /// the workers (waiting at most `deadline`), runs the shutdown hook and
    /// closes the library. Blocks; call it off the async runtime. A second
    /// call finds nothing to do and reports a leak of zero workers.
    pub fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        self.jobs.store(None);
        let started = Instant::now();
        let workers = std::mem::take(&mut *lock(&self.workers));
        while workers.iter().any(|worker| !worker.is_finished()) && started.elapsed() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        let running_workers = workers
            .iter()
            .filter(|worker| !worker.is_finished())
            .count();
        if running_workers > 0 {
            // Dropping the handles detaches the threads. They hold the
            // shared state; whichever finishes last drops it, which leaves
            // the library mapped (only `close` unmaps it) and the plugin's
            // state unfreed: a leak, never a use after unmap.
            lock(&self.shared).take();
            return ShutdownReport::Leaked { running_workers };
        }
        for worker in workers {
            // Workers catch nothing themselves, but plugin panics never reach
            // them (the SDK answers 500), so a join error is a host bug.
            if worker.join().is_err() {
                tracing::error!(plugin = %self.name, "a plugin worker thread panicked");
            }
        }
        let Some(shared) = lock(&self.shared).take() else {
            return ShutdownReport::Leaked { running_workers: 0 };
        };
        let Some(Shared { library, instance }) = Arc::into_inner(shared) else {
            unreachable!("every worker holding the shared state was joined");
        };
        let hook = thread::scope(|scope| {
            thread::Builder::new()
                .name(format!("plugin-{}-shutdown", self.name))
                .spawn_scoped(scope, || library.destroy(instance))
                .map(|handle| handle.join())
        });
        let hook_error = match hook {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(message))) => Some(message),
            Ok(Err(_)) => Some("shutdown thread panicked".to_owned()),
            Err(error) => {
                // Without a thread to run the hook on, the state is leaked
                // (freeing it here would run plugin code on this thread) and
                // the library, dropped unclosed, stays mapped.
                tracing::error!(plugin = %self.name, %error, "could not spawn the shutdown thread; library left loaded");
                return ShutdownReport::Leaked { running_workers: 0 };
            }
        };
        ShutdownReport::Closed {
            hook_error,
            close: library.close(),
        }
    }
}

fn work(shared: &Shared, queue: &Receiver<Job>) {
    for Job { request, reply } in queue {
        // Its client gave up while it was queued (timeout): spare the work.
        if reply.is_closed() {
            continue;
        }
        let response = shared.library.handle(&shared.instance, &request);
        // The client may have given up (timeout); nobody else needs to know.
        let _ = reply.send(response);
    }
}
