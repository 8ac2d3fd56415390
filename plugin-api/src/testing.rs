//! Calling a plugin's router in unit tests, without a host.
//!
//! [`TestClient`] runs [`Plugin::init`] with a mock [`Context`]
//! ([`MockContext`]: settings, a temporary data directory, stubbed
//! services), captures what the plugin logs, and runs its background
//! tasks to completion when asked.
//!
//! ```
//! use plugin_api::testing::{MockContext, TestClient};
//! # use plugin_api::{Context, Plugin, Request, Response, Result, Router, ServiceConfig};
//! # struct Greeter;
//! # impl Plugin for Greeter {
//! #     fn config() -> ServiceConfig { ServiceConfig::new("greeter") }
//! #     fn init(_: &Context) -> Result<Self> { Ok(Greeter) }
//! #     fn router() -> Router<Self> {
//! #         Router::new().get("/hello", "Greets", |_: &Greeter, _: &Request| {
//! #             log::info!("greeting");
//! #             Response::json(&"hi")
//! #         })
//! #     }
//! # }
//! let client = TestClient::<Greeter>::with_context(MockContext::new().setting("greeting", "hi"))
//!     .unwrap();
//! let response = client.get("/hello?name=x");
//! assert_eq!(response.status(), 200);
//! assert_eq!(response.body_bytes(), b"\"hi\"");
//! assert!(client.logs().iter().any(|line| line.ends_with("greeting")));
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use abi_stable::std_types::{RSlice, RStr};
use serde::Serialize;

use crate::context::Backend;
use crate::ffi::{FfiHeaderRef, FfiRequest};
use crate::{Call, Context, Error, Plugin, Response, Router, Stop};

/// A stubbed service: answers a [`Call`].
type Stub = Box<dyn Fn(&Call) -> Response + Send + Sync>;
type Task = Box<dyn FnOnce(&Stop) + Send>;
type Periodic = Box<dyn FnMut() + Send>;

/// How many times a task's [`Stop::sleep`] returns at once before a mock
/// reports the stop signal: a task looping on it ends in a test too.
const MOCK_SLEEPS: u32 = 1000;

/// What a test sets up for the context a [`TestClient`] hands `init`.
#[derive(Default)]
pub struct MockContext {
    settings: serde_json::Map<String, serde_json::Value>,
    data_dir: Option<PathBuf>,
    stubs: HashMap<String, Stub>,
}

impl std::fmt::Debug for MockContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockContext")
            .field("settings", &self.settings)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl MockContext {
    /// No settings, a fresh temporary data directory, no services.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the setting `key`, as `[plugin.<name>.settings] key = value`.
    ///
    /// # Panics
    /// If `value` cannot be represented as JSON.
    pub fn setting(mut self, key: &str, value: impl Serialize) -> Self {
        let value = serde_json::to_value(value).expect("a setting serializable as JSON");
        self.settings.insert(key.to_owned(), value);
        self
    }

    /// Uses `dir` as the data directory (kept after the test) instead of a
    /// fresh temporary one (deleted when the client is dropped).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Answers calls to `service` with `stub`. A call to a service without
    /// a stub is answered 404, as the host answers an unknown name.
    pub fn stub(
        mut self,
        service: &str,
        stub: impl Fn(&Call) -> Response + Send + Sync + 'static,
    ) -> Self {
        self.stubs.insert(service.to_owned(), Box::new(stub));
        self
    }
}

/// The state behind a mock [`Context`].
pub(crate) struct Mock {
    stubs: HashMap<String, Stub>,
    logs: Mutex<Vec<String>>,
    tasks: Mutex<Vec<(Context, Task)>>,
    periodic: Mutex<Vec<Periodic>>,
    sleeps: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Mock {
    pub(crate) fn call(&self, service: &str, call: &Call) -> Response {
        match self.stubs.get(service) {
            Some(stub) => stub(call),
            None => Response::json(&serde_json::json!({
                "error": format!("no service named `{service}`"),
                "service": service,
            }))
            .map(|response| response.with_status(404))
            .unwrap_or_else(Error::into_response),
        }
    }

    pub(crate) fn log(&self, level: log::Level, target: &str, message: String) {
        lock(&self.logs).push(format!("{level} {target}: {message}"));
    }

    pub(crate) fn queue_task(&self, context: Context, task: Task) {
        lock(&self.tasks).push((context, task));
    }

    pub(crate) fn add_periodic(&self, job: Periodic) {
        lock(&self.periodic).push(job);
    }

    pub(crate) fn sleep(&self) -> bool {
        self.sleeps.fetch_add(1, Ordering::Relaxed) < u64::from(MOCK_SLEEPS)
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.sleeps.load(Ordering::Relaxed) >= u64::from(MOCK_SLEEPS)
    }
}

/// A plugin's state and router, called the way the host calls them
/// (panics included: they become 500 responses only inside the host, here
/// they fail the test), with a mock context.
pub struct TestClient<P: Plugin> {
    plugin: P,
    router: Router<P>,
    context: Context,
    mock: Arc<Mock>,
    /// A data directory the client made, deleted on drop.
    temp_dir: Option<PathBuf>,
}

impl<P: Plugin> std::fmt::Debug for TestClient<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestClient")
            .field("router", &self.router)
            .field("context", &self.context)
            .finish_non_exhaustive()
    }
}

/// A directory of its own for each client, in the system's temp dir.
fn temp_data_dir(name: &str) -> Result<PathBuf, Error> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "plugin-api-test-{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

impl<P: Plugin> TestClient<P> {
    /// Runs [`Plugin::init`] with a default [`MockContext`] and builds the
    /// router.
    pub fn new() -> Result<Self, Error> {
        Self::with_context(MockContext::new())
    }

    /// Runs [`Plugin::init`] with the context `mock` describes.
    pub fn with_context(mock: MockContext) -> Result<Self, Error> {
        let config = P::config();
        let name = config.name();
        let (data_dir, temp_dir) = match mock.data_dir {
            Some(dir) => {
                std::fs::create_dir_all(&dir)?;
                (dir, None)
            }
            None => {
                let dir = temp_data_dir(name)?;
                (dir.clone(), Some(dir))
            }
        };
        let state = Arc::new(Mock {
            stubs: mock.stubs,
            logs: Mutex::default(),
            tasks: Mutex::default(),
            periodic: Mutex::default(),
            sleeps: AtomicU64::new(0),
        });
        let context = Context::new(
            name,
            serde_json::Value::Object(mock.settings),
            data_dir,
            Backend::Mock(state.clone()),
        );
        let plugin = crate::logging::captured(&state, || P::init(&context))?;
        Ok(Self {
            plugin,
            router: P::router(),
            context,
            mock: state,
            temp_dir,
        })
    }

    /// The context `init` got.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// The plugin's state.
    pub fn plugin(&self) -> &P {
        &self.plugin
    }

    /// What the plugin logged so far, one `LEVEL target: message` line per
    /// event.
    pub fn logs(&self) -> Vec<String> {
        lock(&self.mock.logs).clone()
    }

    /// Runs the background tasks spawned so far (and those they spawn) to
    /// completion, then every periodic job once, on this thread. A task's
    /// [`Stop::sleep`] returns at once (time does not pass in a test).
    pub fn run_background(&self) {
        crate::logging::captured(&self.mock, || {
            loop {
                let tasks = std::mem::take(&mut *lock(&self.mock.tasks));
                if tasks.is_empty() {
                    break;
                }
                for (context, task) in tasks {
                    task(&Stop::new(context));
                }
            }
            let mut periodic = std::mem::take(&mut *lock(&self.mock.periodic));
            for job in &mut periodic {
                job();
            }
            lock(&self.mock.periodic).extend(periodic);
        });
    }

    /// Sends a request. `target` is the path below the mount point with an
    /// optional query, e.g. `/data/1?verbose=true`.
    pub fn request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let headers: Vec<FfiHeaderRef<'_>> = headers
            .iter()
            .map(|(name, value)| FfiHeaderRef {
                name: RStr::from_str(name),
                value: RSlice::from_slice(value.as_bytes()),
            })
            .collect();
        let request = FfiRequest {
            method: RStr::from_str(method),
            path: RStr::from_str(path),
            query: RStr::from_str(query),
            headers: RSlice::from_slice(&headers),
            body: RSlice::from_slice(body),
            client_addr: RStr::from_str("127.0.0.1:0"),
        };
        crate::logging::captured(&self.mock, || {
            self.router
                .dispatch(&self.plugin, &request)
                .unwrap_or_else(|error| error.into_logged_response(method, path))
        })
    }

    /// Sends a `GET`.
    pub fn get(&self, target: &str) -> Response {
        self.request("GET", target, &[], b"")
    }

    /// Sends a `DELETE`.
    pub fn delete(&self, target: &str) -> Response {
        self.request("DELETE", target, &[], b"")
    }

    /// Sends a `POST` with a JSON body.
    pub fn post_json(&self, target: &str, body: &serde_json::Value) -> Response {
        self.request(
            "POST",
            target,
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        )
    }

    /// Sends a `PUT` with a JSON body.
    pub fn put_json(&self, target: &str, body: &serde_json::Value) -> Response {
        self.request(
            "PUT",
            target,
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        )
    }
}

impl<P: Plugin> Drop for TestClient<P> {
    fn drop(&mut self) {
        crate::logging::captured(&self.mock, || self.plugin.shutdown());
        if let Some(dir) = &self.temp_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
