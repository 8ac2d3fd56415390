//! The host context: what a plugin gets from the host at [`Plugin::init`](crate::Plugin::init).
//!
//! A [`Context`] is cheap to clone; keep one in the plugin's state to use
//! it from handlers and tasks. Through it a plugin reads its settings and
//! its data directory, calls other services, and runs background work on
//! threads the host owns (and stops and joins before it unloads the
//! library). Logging needs no context: the `log` crate's macros reach the
//! host's log (see the crate docs).
//!
//! In unit tests, [`testing::TestClient`](crate::testing::TestClient) hands
//! `init` a mock context instead ([`testing::MockContext`](crate::testing::MockContext)).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use abi_stable::std_types::{RResult, RSlice, RStr};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ffi::{FfiCall, FfiHeaderRef, FfiHost, FfiInitArgs};
use crate::testing::Mock;
use crate::{Error, Method, Response, Result};

/// The host's services for one loaded plugin. Clone it into the plugin's
/// state; it stays valid until the plugin is unloaded.
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    settings: serde_json::Value,
    data_dir: PathBuf,
    backend: Backend,
}

#[derive(Clone)]
pub(crate) enum Backend {
    Host(FfiHost),
    Mock(Arc<Mock>),
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("name", &self.inner.name)
            .field("data_dir", &self.inner.data_dir)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// The context the host lends `create`. Malformed settings JSON (a host
    /// bug) reads as no settings.
    pub(crate) fn from_host(args: &FfiInitArgs<'_>) -> Self {
        Self::new(
            args.name.as_str(),
            serde_json::from_str(args.settings_json.as_str()).unwrap_or_default(),
            PathBuf::from(args.data_dir.as_str()),
            Backend::Host(args.host),
        )
    }

    pub(crate) fn new(
        name: &str,
        settings: serde_json::Value,
        data_dir: PathBuf,
        backend: Backend,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                settings,
                data_dir,
                backend,
            }),
        }
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    /// The plugin's service name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The plugin's settings (`[plugin.<name>] settings` in the host's
    /// config file) as `T`. A missing or mistyped key is an error naming
    /// it: returned from `init`, it refuses the load with that message.
    /// Give fields `#[serde(default)]` to make them optional.
    pub fn settings<T: DeserializeOwned>(&self) -> Result<T> {
        let settings = match &self.inner.settings {
            serde_json::Value::Null => &serde_json::Value::Object(serde_json::Map::new()),
            settings => settings,
        };
        serde_path_to_error::deserialize(settings).map_err(|error| {
            let key = match error.path().to_string() {
                path if path == "." => String::new(),
                path => format!(".{path}"),
            };
            Error::internal(format!(
                "invalid setting `plugin.{}.settings{key}`: {}",
                self.inner.name,
                error.inner()
            ))
        })
    }

    /// The plugin's own directory (`<data-dir>/plugins/<name>/`), created by
    /// the host and kept across reloads and restarts.
    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// Sends `call` to the service named `service`, whichever kind it is:
    /// another plugin is called in process (no socket), a remote service
    /// through the host's connection pool. Blocks until the answer, or the
    /// call's timeout (the host's request timeout unless set). The host's
    /// own refusals are answers too: 404 for an unknown service, 508 for a
    /// call chain that loops, 504 for a timeout, 503 for an overloaded or
    /// unloading plugin.
    pub fn call(&self, service: &str, call: Call) -> Response {
        match &self.inner.backend {
            Backend::Host(host) => host_call(host, service, &call),
            Backend::Mock(mock) => mock.call(service, &call),
        }
    }

    /// `GET target` on `service`, its JSON answer parsed as `T`. See
    /// [`Context::call`] and [`Context::expect_json`] for the errors.
    pub fn get_json<T: DeserializeOwned>(&self, service: &str, target: &str) -> Result<T> {
        let response = self.call(service, Call::get(target));
        Self::expect_json(service, &response)
    }

    /// `POST target` on `service` with `body` as JSON, the JSON answer
    /// parsed as `T`.
    pub fn post_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        service: &str,
        target: &str,
        body: &B,
    ) -> Result<T> {
        let response = self.call(service, Call::post(target).json(body)?);
        Self::expect_json(service, &response)
    }

    /// A 2xx answer's JSON body as `T`. A 508 (loop) or 504 (timeout) is
    /// passed on with its status, so a loop is refused all the way up the
    /// chain; any other failure is a 502 naming the service and its answer.
    pub fn expect_json<T: DeserializeOwned>(service: &str, response: &Response) -> Result<T> {
        let status = response.status();
        if (200..300).contains(&status) {
            return serde_json::from_slice(response.body_bytes()).map_err(|error| {
                Error::new(
                    502,
                    format!("service `{service}` answered invalid JSON: {error}"),
                )
            });
        }
        let body = String::from_utf8_lossy(response.body_bytes());
        let excerpt: String = body.chars().take(300).collect();
        let status = if matches!(status, 504 | 508) {
            status
        } else {
            502
        };
        Err(Error::new(
            status,
            format!(
                "service `{service}` answered {}: {excerpt}",
                response.status()
            ),
        ))
    }

    /// Runs `task` on a thread the host owns, now; returns at once. Use it
    /// for work that goes on after a handler answered (FastAPI's
    /// `BackgroundTasks`). The host signals [`Stop`] when the plugin is
    /// unloaded and waits (up to its drain timeout) for the task to return
    /// before closing the library: a long task must watch the signal. A
    /// panic in the task is logged by the host. Refused (503) while the
    /// plugin is being unloaded, or when it already runs the most tasks
    /// the host allows.
    pub fn spawn(&self, task: impl FnOnce(&Stop) + Send + 'static) -> Result<()> {
        match &self.inner.backend {
            Backend::Host(host) => {
                let stop = Stop {
                    context: self.clone(),
                };
                let ffi = crate::__private::task(Box::new(move || task(&stop)));
                match (host.vtable.spawn)(host.data, ffi) {
                    RResult::ROk(()) => Ok(()),
                    RResult::RErr(reason) => Err(Error::new(503, reason.to_string())),
                }
            }
            Backend::Mock(mock) => {
                mock.queue_task(self.clone(), Box::new(task));
                Ok(())
            }
        }
    }

    /// Runs `job` now and then every `interval` on a thread the host owns,
    /// until the plugin is unloaded. A panic in one run is logged and the
    /// next run goes on. In a [`TestClient`](crate::testing::TestClient),
    /// each `run_background` runs it once.
    pub fn every(&self, interval: Duration, mut job: impl FnMut() + Send + 'static) -> Result<()> {
        match &self.inner.backend {
            Backend::Host(_) => self.spawn(move |stop| {
                loop {
                    if let Err(message) = crate::__private::catch(&mut job) {
                        log::error!(target: "plugin_api", "periodic job panicked: {message}");
                    }
                    if !stop.sleep(interval) {
                        break;
                    }
                }
            }),
            Backend::Mock(mock) => {
                mock.add_periodic(Box::new(job));
                Ok(())
            }
        }
    }
}

/// A background task's view of the host's stop signal, given when the
/// plugin is being unloaded.
#[derive(Debug, Clone)]
pub struct Stop {
    context: Context,
}

impl Stop {
    pub(crate) fn new(context: Context) -> Self {
        Self { context }
    }

    /// Sleeps for `duration` or until the stop signal, whichever comes
    /// first; `true` if the task may go on (no signal). Use it for every
    /// wait of a long task: `while stop.sleep(interval) { ... }`. In a
    /// [`TestClient`](crate::testing::TestClient), it returns at once.
    pub fn sleep(&self, duration: Duration) -> bool {
        match self.context.backend() {
            Backend::Host(host) => {
                let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
                !(host.vtable.wait_for_stop)(host.data, millis)
            }
            Backend::Mock(mock) => mock.sleep(),
        }
    }

    /// Whether the host asked the task to stop.
    pub fn is_stopping(&self) -> bool {
        match self.context.backend() {
            Backend::Host(host) => (host.vtable.wait_for_stop)(host.data, 0),
            Backend::Mock(mock) => mock.is_stopping(),
        }
    }
}

fn host_call(host: &FfiHost, service: &str, call: &Call) -> Response {
    let headers: Vec<FfiHeaderRef<'_>> = call
        .headers
        .iter()
        .map(|(name, value)| FfiHeaderRef {
            name: RStr::from_str(name),
            value: RSlice::from_slice(value.as_bytes()),
        })
        .collect();
    let ffi = FfiCall {
        service: RStr::from_str(service),
        method: RStr::from_str(call.method.as_str()),
        path: RStr::from_str(&call.path),
        query: RStr::from_str(&call.query),
        headers: RSlice::from_slice(&headers),
        body: RSlice::from_slice(&call.body),
        timeout_ms: call.timeout.map_or(0, |timeout| {
            u64::try_from(timeout.as_millis())
                .unwrap_or(u64::MAX)
                .max(1)
        }),
    };
    // Allocated by the host; copied here and dropped (through the host's
    // allocator, which outlives the plugin).
    let answer = (host.vtable.call)(host.data, &ffi);
    let mut response = Response::new(answer.status).body(answer.body.to_vec());
    for header in answer.headers.iter() {
        response = response.header(header.name.to_string(), header.value.to_vec());
    }
    response
}

/// A request to another service, built for [`Context::call`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    method: Method,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    timeout: Option<Duration>,
}

impl Call {
    /// A request with `method` to `target`, the path below the service's
    /// mount point with an optional query: `/items?limit=5`.
    pub fn new(method: Method, target: &str) -> Self {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let path = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        };
        Self {
            method,
            path,
            query: query.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout: None,
        }
    }

    /// A `GET`.
    pub fn get(target: &str) -> Self {
        Self::new(Method::Get, target)
    }

    /// A `POST`.
    pub fn post(target: &str) -> Self {
        Self::new(Method::Post, target)
    }

    /// A `PUT`.
    pub fn put(target: &str) -> Self {
        Self::new(Method::Put, target)
    }

    /// A `DELETE`.
    pub fn delete(target: &str) -> Self {
        Self::new(Method::Delete, target)
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Replaces the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// `value` as a JSON body, with its content type.
    pub fn json<T: Serialize + ?Sized>(self, value: &T) -> Result<Self> {
        let body = serde_json::to_vec(value)?;
        Ok(self.header("content-type", "application/json").body(body))
    }

    /// Waits at most `timeout` (never longer than the host's request
    /// timeout) for the answer.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The method.
    pub fn method(&self) -> Method {
        self.method
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The raw query string, without `?`.
    pub fn query_string(&self) -> &str {
        &self.query
    }

    /// The headers, in the order added.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The body.
    pub fn body_bytes(&self) -> &[u8] {
        &self.body
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use crate::testing::{MockContext, TestClient};
    use crate::{Context, Plugin, Request, Response, Result, Router, ServiceConfig};

    /// Only its shape matters: `init` fails if the settings do not fit it.
    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Settings {
        limit: u32,
        #[serde(default)]
        names: Vec<String>,
    }

    struct Reader {
        ctx: Context,
    }

    impl Plugin for Reader {
        fn config() -> ServiceConfig {
            ServiceConfig::new("reader")
        }
        fn init(ctx: &Context) -> Result<Self> {
            ctx.settings::<Settings>()?;
            Ok(Reader { ctx: ctx.clone() })
        }
        fn router() -> Router<Self> {
            Router::new()
                .get(
                    "/file",
                    "Reads a missing file",
                    |_: &Reader, _: &Request| {
                        let text = std::fs::read_to_string("/nonexistent/plugin-api-test")?;
                        Ok(Response::text(text))
                    },
                )
                .get("/peer", "Calls `peer`", |state: &Reader, _: &Request| {
                    let answer: serde_json::Value = state.ctx.get_json("peer", "/x?y=1")?;
                    Response::json(&answer)
                })
        }
    }

    fn init_error(mock: MockContext) -> String {
        TestClient::<Reader>::with_context(mock)
            .unwrap_err()
            .message()
            .to_owned()
    }

    #[test]
    fn a_bad_setting_names_its_key() {
        assert_eq!(
            init_error(MockContext::new()),
            "invalid setting `plugin.reader.settings`: missing field `limit`"
        );
        assert!(
            init_error(MockContext::new().setting("limit", -1))
                .starts_with("invalid setting `plugin.reader.settings.limit`: invalid value"),
        );
        assert!(
            init_error(
                MockContext::new()
                    .setting("limit", 1)
                    .setting("names", serde_json::json!(["a", "b", 3]))
            )
            .starts_with("invalid setting `plugin.reader.settings.names[2]`"),
        );
    }

    #[test]
    fn another_error_type_is_a_500_whose_cause_is_logged_not_answered() {
        let client =
            TestClient::<Reader>::with_context(MockContext::new().setting("limit", 1)).unwrap();
        let response = client.get("/file");
        assert_eq!(response.status(), 500);
        assert_eq!(
            response.body_bytes(),
            br#"{"detail":"internal server error"}"#
        );
        let logs = client.logs();
        assert!(
            logs.iter().any(|line| line
                .starts_with("ERROR plugin_api: GET /file failed: No such file or directory")),
            "{logs:?}"
        );
    }

    #[test]
    fn a_stubbed_call_sees_the_request_and_an_unknown_service_is_404() {
        let client = TestClient::<Reader>::with_context(
            MockContext::new().setting("limit", 1).stub("peer", |call| {
                assert_eq!((call.path(), call.query_string()), ("/x", "y=1"));
                Response::json(&serde_json::json!({"b": 1, "a": 2})).unwrap()
            }),
        )
        .unwrap();
        let response = client.get("/peer");
        assert_eq!(
            response.body_bytes(),
            br#"{"b":1,"a":2}"#,
            "insertion order"
        );

        let lonely =
            TestClient::<Reader>::with_context(MockContext::new().setting("limit", 1)).unwrap();
        let response = lonely.get("/peer");
        assert_eq!(response.status(), 502);
        assert!(
            String::from_utf8_lossy(response.body_bytes()).contains("service `peer` answered 404")
        );
    }
}
