//! Calling a plugin's router in unit tests, without a host.
//!
//! ```
//! use plugin_api::testing::TestClient;
//! # use plugin_api::{Plugin, Request, Response, Result, Router, ServiceConfig};
//! # struct Greeter;
//! # impl Plugin for Greeter {
//! #     fn config() -> ServiceConfig { ServiceConfig::new("greeter") }
//! #     fn init() -> Result<Self> { Ok(Greeter) }
//! #     fn router() -> Router<Self> {
//! #         Router::new().get("/hello", "Greets", |_: &Greeter, _: &Request| Response::json(&"hi"))
//! #     }
//! # }
//! let client = TestClient::<Greeter>::new().unwrap();
//! let response = client.get("/hello?name=x");
//! assert_eq!(response.status(), 200);
//! assert_eq!(response.body_bytes(), b"\"hi\"");
//! ```

use abi_stable::std_types::{RSlice, RStr};

use crate::ffi::{FfiHeaderRef, FfiRequest};
use crate::{Error, Plugin, Response, Router};

/// A plugin's state and router, called the way the host calls them
/// (panics included: they become 500 responses only inside the host, here
/// they fail the test).
pub struct TestClient<P: Plugin> {
    plugin: P,
    router: Router<P>,
}

impl<P: Plugin> std::fmt::Debug for TestClient<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestClient")
            .field("router", &self.router)
            .finish()
    }
}

impl<P: Plugin> TestClient<P> {
    /// Runs [`Plugin::init`] and builds the router.
    pub fn new() -> Result<Self, Error> {
        Ok(Self {
            plugin: P::init()?,
            router: P::router(),
        })
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
        self.router
            .dispatch(&self.plugin, &request)
            .unwrap_or_else(Error::into_response)
    }

    /// Sends a `GET`.
    pub fn get(&self, target: &str) -> Response {
        self.request("GET", target, &[], b"")
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
}

impl<P: Plugin> Drop for TestClient<P> {
    fn drop(&mut self) {
        self.plugin.shutdown();
    }
}
