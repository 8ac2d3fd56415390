//! The plugin runtime: the threads a loaded plugin's code runs on.
//!
//! Each plugin gets a bounded queue and worker threads of its own. The
//! gateway sends a request as a message and awaits the reply on a oneshot
//! channel, so plugin code never runs on a tokio thread, and a slow or stuck
//! plugin costs its own workers only. [`PluginRuntime::start`] runs the
//! plugin's `init` on a thread of its own with a deadline
//! ([`super::entry`]). [`PluginRuntime::shutdown`] is the only way a plugin
//! ends: stop taking work, let the queue drain, wait (bounded) until every
//! worker has signalled its exit and join them, run the plugin's shutdown
//! hook on a thread of its own with a deadline, and only then close the
//! library. Calls in flight and running workers are counted ([`Tally`]), so
//! the unload sequence waits for them instead of polling.

use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;

use arc_swap::ArcSwapOption;
use axum::http::StatusCode;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use tokio::sync::oneshot;

use super::context::{DataDirError, HostContext, HostSetup, within_request};
use super::entry::{EntryError, run_bounded};
use super::loader::{CloseReport, Handled, Instance, PluginLibrary};
use super::message::{PluginRequest, PluginResponse};
use crate::http::Escaped;
use crate::metrics::PluginSample;
use crate::sync::{Tally, lock};

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
    /// A call from another plugin found every call thread busy.
    #[error("plugin is busy: all {max} threads for calls from other plugins are in use")]
    CallThreadsBusy {
        /// The limit.
        max: usize,
    },
}

impl CallError {
    /// The status the gateway answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            CallError::Overloaded { .. }
            | CallError::Unloading
            | CallError::CallThreadsBusy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            CallError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// How a plugin's threads are sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuntimeLimits {
    /// Worker threads it asks the [`ThreadBudget`] for.
    pub workers: u16,
    /// Requests that may wait for a worker.
    pub queue: usize,
}

impl RuntimeLimits {
    /// The most worker threads one plugin may ask for.
    pub const MAX_WORKERS: u16 = 256;

    /// Checks a number of workers a plugin would ask for: at least one, at
    /// most [`RuntimeLimits::MAX_WORKERS`].
    pub fn check_workers(workers: u16) -> Result<u16, String> {
        if (1..=Self::MAX_WORKERS).contains(&workers) {
            Ok(workers)
        } else {
            Err(format!("must be between 1 and {}", Self::MAX_WORKERS))
        }
    }
}

/// The worker threads all plugins together may have
/// (`--max-plugin-threads`): each worker holds a [`WorkerPermit`] from the
/// moment it is planned until its thread's loop ended, so a plugin's share
/// comes back when it is unloaded, and a worker left running past the drain
/// timeout keeps its share for as long as it runs.
#[derive(Debug)]
pub struct ThreadBudget {
    max: usize,
    used: Mutex<usize>,
}

/// Why a plugin got no worker thread.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no plugin worker thread left: {in_use} of --max-plugin-threads={max} are in use; remove a plugin or raise the limit, then copy the file again"
)]
pub struct BudgetExhausted {
    /// Worker threads of other plugins.
    pub in_use: usize,
    /// The limit.
    pub max: usize,
}

impl ThreadBudget {
    /// A budget of `max` worker threads.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            used: Mutex::new(0),
        })
    }

    /// Up to `wanted` permits, as many as are left but at least one. A
    /// load that replaces a mounted version may count that version's
    /// `replacing` workers as free: both run side by side until the old one
    /// drained, so a swap exceeds the limit by at most that many, for that
    /// long, rather than failing when the limit is reached.
    pub fn acquire(
        self: &Arc<Self>,
        wanted: usize,
        replacing: usize,
    ) -> Result<Vec<WorkerPermit>, BudgetExhausted> {
        let mut used = lock(&self.used);
        let in_use = *used;
        let permits = self.take(&mut used, wanted, replacing);
        if permits.is_empty() {
            return Err(BudgetExhausted {
                in_use,
                max: self.max,
            });
        }
        Ok(permits)
    }

    /// Up to `wanted` more permits, as many as are left, possibly none;
    /// `replacing` counts as in [`ThreadBudget::acquire`]. For a load that
    /// already holds the permit it cannot start without, and learns how
    /// many more it wants once the plugin declared its name.
    pub fn acquire_more(self: &Arc<Self>, wanted: usize, replacing: usize) -> Vec<WorkerPermit> {
        self.take(&mut lock(&self.used), wanted, replacing)
    }

    fn take(
        self: &Arc<Self>,
        used: &mut usize,
        wanted: usize,
        replacing: usize,
    ) -> Vec<WorkerPermit> {
        let granted = wanted.min((self.max + replacing).saturating_sub(*used));
        *used += granted;
        (0..granted).map(|_| WorkerPermit(self.clone())).collect()
    }

    /// The limit.
    pub fn max(&self) -> usize {
        self.max
    }
}

/// One worker thread's share of a [`ThreadBudget`], given back when
/// dropped.
#[derive(Debug)]
pub struct WorkerPermit(Arc<ThreadBudget>);

impl Drop for WorkerPermit {
    fn drop(&mut self) {
        *lock(&self.0.used) -= 1;
    }
}

/// Handler panics logged per plugin and second; more are counted and
/// summed up in one line. A handler that panics on every request under load
/// must not flood the host's log (its own panic hook, which printed each
/// one, is silenced by the SDK).
const PANIC_LINES_PER_SECOND: u32 = 5;

/// The rate limit of one plugin's panic lines: a window of one second.
struct PanicLog {
    plugin: String,
    window: Instant,
    logged: u32,
    suppressed: u64,
}

impl PanicLog {
    fn new(plugin: &str) -> Self {
        Self {
            plugin: plugin.to_owned(),
            window: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }

    fn record(&mut self, message: &str) {
        let now = Instant::now();
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.flush();
            self.window = now;
            self.logged = 0;
        }
        if self.logged < PANIC_LINES_PER_SECOND {
            self.logged += 1;
            tracing::warn!(plugin = %self.plugin, error = %Escaped(message), "plugin handler panicked");
        } else {
            self.suppressed += 1;
        }
    }

    /// Logs how many lines were held back since the last summary, if any.
    fn flush(&mut self) {
        if self.suppressed > 0 {
            tracing::warn!(
                plugin = %self.plugin,
                suppressed = self.suppressed,
                limit_per_second = PANIC_LINES_PER_SECOND,
                "suppressed plugin panic messages over the rate limit"
            );
            self.suppressed = 0;
        }
    }
}

/// Threads one plugin may run for calls from other plugins at once (see
/// [`PluginRuntime::call_from_plugin`]); more calls are answered 503.
pub const MAX_CALL_THREADS: usize = 64;

/// How long a thread for calls from other plugins waits for the next one
/// before it ends.
const CALL_THREAD_IDLE: Duration = Duration::from_secs(10);

struct Job {
    request: Arc<PluginRequest>,
    reply: Reply,
}

/// Where a job's answer goes: the gateway awaits it on the async runtime,
/// another plugin's thread blocks on it.
enum Reply {
    Gateway(oneshot::Sender<PluginResponse>),
    Plugin(crossbeam_channel::Sender<PluginResponse>),
}

impl Reply {
    /// Whether nobody waits for the answer any more.
    fn is_closed(&self) -> bool {
        match self {
            Reply::Gateway(reply) => reply.is_closed(),
            Reply::Plugin(_) => false,
        }
    }

    fn send(self, response: PluginResponse) {
        // The caller may have given up (timeout); nobody else needs to know.
        match self {
            Reply::Gateway(reply) => drop(reply.send(response)),
            Reply::Plugin(reply) => drop(reply.send(response)),
        }
    }
}

/// What the workers share: the library, the plugin's state in it, its
/// context, and the rate limit of its panic lines.
struct Shared {
    library: PluginLibrary,
    instance: Instance,
    host: Arc<HostContext>,
    panics: Mutex<PanicLog>,
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
    /// Some background task did not end after the stop signal by the
    /// deadline: the plugin's state and library are left alive (leaked).
    TasksLeaked {
        /// Tasks still running.
        running_tasks: usize,
    },
    /// The shutdown hook did not return in time (or got no thread): the
    /// plugin's state and library are left alive with it.
    HookAbandoned(EntryError),
}

/// A loaded plugin's workers. Shared by the service table and in-flight
/// requests; the manager calls [`PluginRuntime::shutdown`] once it is
/// unmounted.
pub struct PluginRuntime {
    name: String,
    /// `None` once shutdown began. Read on every call, so lock-free.
    jobs: ArcSwapOption<Sender<Job>>,
    /// Calls between being queued and being answered or given up on.
    calls: Arc<Tally>,
    /// Worker threads whose loop has not ended; each holds one count.
    running: Arc<Tally>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// How many workers it started with.
    worker_count: usize,
    /// Calls from other plugins: a rendezvous channel, so a call goes to a
    /// call thread that is idle, or to a new one. `None` once shutdown
    /// began.
    calls_from_plugins: ArcSwapOption<Sender<Job>>,
    idle_call_threads: Receiver<Job>,
    /// Threads serving calls from other plugins (up to
    /// [`MAX_CALL_THREADS`]), joined with the workers.
    call_threads: Mutex<Vec<JoinHandle<()>>>,
    shared: Mutex<Option<Arc<Shared>>>,
    /// Deadline of the shutdown hook.
    entry_timeout: Duration,
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
    /// The plugin's `init` failed or panicked; the library was closed.
    #[error("{0}")]
    Init(String),
    /// `init` failed and a background task it started did not stop by the
    /// entry timeout: its library is left loaded.
    #[error("{0}; a background task it started did not stop, its library is left loaded")]
    InitTasksLeaked(String),
    /// The plugin's data directory could not be created.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// `init` did not return in time or could not be run; its library is
    /// left loaded.
    #[error(transparent)]
    Entry(#[from] EntryError),
    /// The OS refused a worker thread.
    #[error("could not spawn a worker thread: {0}")]
    Spawn(std::io::Error),
}

impl PluginRuntime {
    /// Creates the plugin's state on a thread of its own, waiting at most
    /// `entry_timeout` for it, with the context `host` describes, and
    /// starts one worker per permit in `workers`, each holding its permit
    /// until its loop ends, with a queue of `queue` requests.
    /// `entry_timeout` also bounds the shutdown hook. On failure the
    /// library is closed before returning, unless plugin code may still
    /// run in it.
    pub fn start(
        name: &str,
        library: PluginLibrary,
        workers: Vec<WorkerPermit>,
        queue: usize,
        entry_timeout: Duration,
        host: HostSetup,
    ) -> Result<Self, StartError> {
        let host = HostContext::new(name, host)?;
        // The library travels with the call and comes back with its result:
        // if `init` hangs, it stays with the abandoned thread, never closed
        // (and so does the context it points at).
        let context = host.clone();
        let created = run_bounded(
            "init",
            format!("plugin-{name}-init"),
            entry_timeout,
            move || {
                let instance = library.create(&context);
                (library, instance)
            },
        )?;
        let (library, instance) = match created {
            (library, Ok(instance)) => (library, instance),
            (library, Err(message)) => {
                // A task `init` started runs the library's code.
                if host.stop_tasks(Instant::now() + entry_timeout) > 0 {
                    std::mem::forget(library);
                    std::mem::forget(host);
                    return Err(StartError::InitTasksLeaked(message));
                }
                library.close();
                return Err(StartError::Init(message));
            }
        };
        let (jobs, queue) = crossbeam_channel::bounded::<Job>(queue);
        let (calls_from_plugins, idle_call_threads) = crossbeam_channel::bounded::<Job>(0);
        let runtime = Self {
            name: name.to_owned(),
            jobs: ArcSwapOption::from_pointee(jobs),
            calls: Arc::default(),
            running: Arc::default(),
            workers: Mutex::new(Vec::new()),
            worker_count: workers.len(),
            calls_from_plugins: ArcSwapOption::from_pointee(calls_from_plugins),
            idle_call_threads,
            call_threads: Mutex::new(Vec::new()),
            shared: Mutex::new(Some(Arc::new(Shared {
                library,
                instance,
                host,
                panics: Mutex::new(PanicLog::new(name)),
            }))),
            entry_timeout,
        };
        for (index, permit) in workers.into_iter().enumerate() {
            let queue = queue.clone();
            let shared = lock(&runtime.shared).clone();
            // Counted before the thread exists, so a shutdown can never
            // find zero running while a worker is about to start.
            let running = runtime.running.enter();
            let spawned = thread::Builder::new()
                .name(format!("plugin-{name}-{index}"))
                .spawn(move || {
                    // Released when the loop ends, after the worker let go
                    // of the shared state (or if it unwinds); the permit
                    // just after (declared first, dropped last).
                    let _permit = permit;
                    let _running = running;
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

    /// How many worker threads it started with.
    pub fn worker_count(&self) -> usize {
        self.worker_count
    }

    /// Its load now, for the metrics: requests waiting for a worker, and
    /// workers busy (the calls being answered, as many as there are
    /// workers at most).
    pub fn sample(&self) -> PluginSample {
        let queued = self.jobs.load().as_deref().map_or(0, Sender::len);
        let answering = self.calls.count().saturating_sub(queued);
        PluginSample {
            queued: queued as u64,
            busy: answering.min(self.worker_count) as u64,
            workers: self.worker_count as u64,
        }
    }

    /// Sends `request` to a worker and awaits the answer for at most
    /// `timeout`. The call counts as in flight (see
    /// [`PluginRuntime::wait_for_calls`]) until it returns; a handler still
    /// running after a timeout is covered by the worker join in
    /// [`PluginRuntime::shutdown`].
    pub async fn call(
        &self,
        request: Arc<PluginRequest>,
        timeout: Duration,
    ) -> Result<PluginResponse, CallError> {
        let _in_flight = self.calls.enter();
        let (reply, answer) = oneshot::channel();
        {
            let jobs = self.jobs.load();
            let jobs = jobs.as_deref().ok_or(CallError::Unloading)?;
            jobs.try_send(Job {
                request,
                reply: Reply::Gateway(reply),
            })
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

    /// Sends `request`, a call from another plugin's thread, and blocks for
    /// the answer, at most `timeout`. Blocks; call it off the async runtime.
    ///
    /// Such a call never waits for this plugin's workers: it runs on a
    /// thread for calls from plugins, an idle one or a new one (up to
    /// [`MAX_CALL_THREADS`], else 503 at once). The caller's worker blocks
    /// while its call runs, so if calls waited in the queue, two plugins
    /// calling each other with every worker busy would each wait for the
    /// other's workers: a deadlock until the timeouts. Here every waiting
    /// thread waits for a thread that is running its call, and a chain of
    /// calls passes each service at most once ([`super::CallChain`]), so
    /// the waits cannot form a cycle.
    pub fn call_from_plugin(
        &self,
        request: Arc<PluginRequest>,
        timeout: Duration,
    ) -> Result<PluginResponse, CallError> {
        let _in_flight = self.calls.enter();
        let (reply, answer) = crossbeam_channel::bounded(1);
        let job = Job {
            request,
            reply: Reply::Plugin(reply),
        };
        {
            let calls = self.calls_from_plugins.load();
            let calls = calls.as_deref().ok_or(CallError::Unloading)?;
            match calls.try_send(job) {
                Ok(()) => {}
                Err(TrySendError::Full(job)) => self.start_call_thread(job)?,
                Err(TrySendError::Disconnected(_)) => return Err(CallError::Unloading),
            }
        }
        answer.recv_timeout(timeout).map_err(|error| match error {
            RecvTimeoutError::Timeout => CallError::Timeout(timeout),
            RecvTimeoutError::Disconnected => CallError::Unloading,
        })
    }

    /// Starts a thread for calls from other plugins with `job` as its first.
    fn start_call_thread(&self, job: Job) -> Result<(), CallError> {
        let mut threads = lock(&self.call_threads);
        // Checked under the lock `shutdown` takes the threads with: no
        // thread starts after it collected them.
        if self.calls_from_plugins.load().is_none() {
            return Err(CallError::Unloading);
        }
        let (ended, running): (Vec<_>, Vec<_>) =
            threads.drain(..).partition(JoinHandle::is_finished);
        *threads = running;
        for thread in ended {
            let _ = thread.join();
        }
        if threads.len() >= MAX_CALL_THREADS {
            return Err(CallError::CallThreadsBusy {
                max: MAX_CALL_THREADS,
            });
        }
        let shared = lock(&self.shared).clone().ok_or(CallError::Unloading)?;
        let idle = self.idle_call_threads.clone();
        let running = self.running.enter();
        let spawned = thread::Builder::new()
            .name(format!("plugin-{}-call", self.name))
            .spawn(move || {
                let _running = running;
                serve(&shared, job);
                while let Ok(job) = idle.recv_timeout(CALL_THREAD_IDLE) {
                    serve(&shared, job);
                }
            })
            .map_err(|_| CallError::CallThreadsBusy { max: threads.len() })?;
        threads.push(spawned);
        Ok(())
    }

    /// Waits until no call is in flight, at most `timeout`, and returns how
    /// many still are. Blocks; call it off the async runtime.
    pub fn wait_for_calls(&self, timeout: Duration) -> usize {
        self.calls.wait_idle(timeout)
    }

    /// Stops the plugin: refuses new calls, lets queued ones finish, waits
    /// at most `deadline` for the workers to end and joins them, runs the
    /// shutdown hook (bounded by the entry timeout) and closes the library.
    /// Blocks; call it off the async runtime. A second call finds nothing to
    /// do and reports a leak of zero workers.
    pub fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        let deadline = Instant::now() + deadline;
        // Dropping the senders ends each worker's loop once the queue is
        // empty, and each call thread's at once (a rendezvous holds none).
        self.jobs.store(None);
        let call_threads = {
            let mut threads = lock(&self.call_threads);
            self.calls_from_plugins.store(None);
            std::mem::take(&mut *threads)
        };
        // Background tasks wind down while the queue drains.
        if let Some(shared) = lock(&self.shared).as_ref() {
            shared.host.signal_stop();
        }
        let running_workers = self
            .running
            .wait_idle(deadline.saturating_duration_since(Instant::now()));
        let workers = std::mem::take(&mut *lock(&self.workers));
        if running_workers > 0 {
            // Dropping the handles detaches the threads. They hold the
            // shared state; whichever finishes last drops it, which leaves
            // the library mapped (only `close` unmaps it) and the plugin's
            // state unfreed: a leak, never a use after unmap.
            lock(&self.shared).take();
            return ShutdownReport::Leaked { running_workers };
        }
        for worker in workers.into_iter().chain(call_threads) {
            // Every worker signalled the end of its loop: what is left is
            // its exit (thread-local destructors), which must be over
            // before the library is closed. Workers catch nothing
            // themselves, but plugin panics never reach them (the SDK
            // answers 500), so a join error is a host bug.
            if worker.join().is_err() {
                tracing::error!(plugin = %self.name, "a plugin worker thread panicked");
            }
        }
        let Some(shared) = lock(&self.shared).take() else {
            return ShutdownReport::Leaked { running_workers: 0 };
        };
        let Some(Shared {
            library,
            instance,
            host,
            panics,
        }) = Arc::into_inner(shared)
        else {
            unreachable!("every worker holding the shared state was joined");
        };
        let running_tasks = host.stop_tasks(deadline);
        if running_tasks > 0 {
            // The tasks run the library's code and use the context: both
            // stay, with the plugin's state.
            std::mem::forget((library, instance, host));
            return ShutdownReport::TasksLeaked { running_tasks };
        }
        // What was held back since the last summary is summed up before
        // the plugin's last line.
        lock(&panics).flush();
        let hook = run_bounded(
            "shutdown hook",
            format!("plugin-{}-shutdown", self.name),
            self.entry_timeout,
            move || {
                let result = library.destroy(instance);
                (library, result)
            },
        );
        match hook {
            Ok((library, result)) => {
                let close = library.close();
                // Only now: the plugin kept a pointer to its context.
                drop(host);
                ShutdownReport::Closed {
                    hook_error: result.err(),
                    close,
                }
            }
            // The library, the state and the context stay with the
            // abandoned thread.
            Err(error) => {
                std::mem::forget(host);
                ShutdownReport::HookAbandoned(error)
            }
        }
    }
}

fn work(shared: &Shared, queue: &Receiver<Job>) {
    for job in queue {
        serve(shared, job);
    }
}

fn serve(shared: &Shared, Job { request, reply }: Job) {
    // Its client gave up while it was queued (timeout): spare the work.
    if reply.is_closed() {
        return;
    }
    let Handled {
        response,
        panic,
        dropped_headers,
    } = within_request(&request, || {
        shared.library.handle(&shared.instance, &request)
    });
    if let Some(message) = panic {
        lock(&shared.panics).record(&message);
    }
    for header in dropped_headers {
        tracing::warn!(plugin = %shared.host.name(), header = %Escaped(&header), "plugin answered an invalid header; dropped");
    }
    reply.send(response);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thread_budget_degrades_refuses_and_takes_shares_back() {
        let budget = ThreadBudget::new(5);
        let first = budget.acquire(2, 0).unwrap();
        let second = budget.acquire(2, 0).unwrap();
        let third = budget.acquire(2, 0).unwrap();
        assert_eq!(third.len(), 1, "what is left, at least one");
        assert_eq!(
            budget.acquire(2, 0).unwrap_err(),
            BudgetExhausted { in_use: 5, max: 5 }
        );
        // A swap of `first` may use its share while both versions run.
        let swapped = budget.acquire(2, first.len()).unwrap();
        assert_eq!(swapped.len(), 2);
        drop(first);
        drop(second);
        // 1 + 2 of 5 in use.
        assert_eq!(budget.acquire(4, 0).map(|permits| permits.len()), Ok(2));
    }

    #[test]
    fn more_permits_are_what_is_left_possibly_none() {
        let budget = ThreadBudget::new(3);
        let first = budget.acquire(1, 0).unwrap();
        let more = budget.acquire_more(4, 0);
        assert_eq!(more.len(), 2, "what is left");
        assert!(budget.acquire_more(1, 0).is_empty(), "none left: none");
        assert_eq!(
            budget.acquire_more(1, first.len()).len(),
            1,
            "a swap's share"
        );
    }

    #[test]
    fn a_plugin_asks_for_one_to_256_workers() {
        assert_eq!(RuntimeLimits::check_workers(1), Ok(1));
        assert_eq!(RuntimeLimits::check_workers(256), Ok(256));
        for refused in [0, 257] {
            assert_eq!(
                RuntimeLimits::check_workers(refused),
                Err("must be between 1 and 256".to_owned())
            );
        }
    }
}
