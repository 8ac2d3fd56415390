//! The crate both sides of a plugin depend on.
//!
//! A plugin is a Rust `cdylib` that implements [`Plugin`] and calls
//! [`export_plugin!`]. The host loads the library, reads its
//! [`ServiceConfig`], mounts it under `/api/<name>/`, and sends it requests on
//! worker threads of its own. A plugin author writes a router and handlers;
//! the C ABI underneath is generated, and never needs `unsafe` code: a plugin
//! crate can carry `#![forbid(unsafe_code)]`.
//!
//! ```
//! use plugin_api::{Context, Plugin, Request, Response, Result, Router, ServiceConfig, export_plugin};
//!
//! #[derive(Default)]
//! struct Greeter;
//!
//! impl Plugin for Greeter {
//!     fn config() -> ServiceConfig {
//!         ServiceConfig::new("greeter").version("1.0.0").description("Says hello")
//!     }
//!
//!     fn init(_ctx: &Context) -> Result<Self> {
//!         Ok(Greeter)
//!     }
//!
//!     fn router() -> Router<Self> {
//!         Router::new().get("/hello", "Greets the caller", hello)
//!     }
//! }
//!
//! fn hello(_: &Greeter, req: &Request) -> Result<Response> {
//!     let name = req.query("name").unwrap_or_else(|| "World".into());
//!     Response::json(&serde_json::json!({ "message": format!("Hello, {name}!") }))
//! }
//!
//! export_plugin!(Greeter);
//! ```
//!
//! # Core concepts
//! - [`Plugin`]: your state, created once per load by [`Plugin::init`],
//!   shared by all requests (`Send + Sync`), dropped on unload after
//!   [`Plugin::shutdown`]. Keep every allocation in it rather than in
//!   `static`s, so that unloading frees it.
//! - [`Router`]: method + path pattern (`/items/{id}`) to handler. Built once
//!   per load. Its routes are also the endpoints the registry lists.
//! - [`Request`] / [`Response`]: one call, fully buffered. Handlers run on the
//!   host's per-plugin worker threads and may block; a slow handler costs a
//!   worker, not the gateway.
//! - [`Error`]: an HTTP error with a JSON body; `?` on it returns early,
//!   and `?` on any other error is a logged 500.
//! - [`Json`], [`Query`], [`Path`]: typed inputs (`req.extract()?`),
//!   answered 422 naming the field.
//! - [`Context`]: the host's services, handed to `init`: settings, a data
//!   directory, calls to other services, background tasks.
//! - Logging: the [`log`] crate's macros (`log::info!`) reach the host's
//!   log, with `plugin=<name>`, filtered at the host's level.
//! - [`testing::TestClient`]: calls your router in unit tests, no host
//!   needed, with a mock context.
//!
//! # Rules for plugin code
//! - Run background work with [`Context::spawn`] or [`Context::every`]
//!   rather than threads of your own: the host stops and joins its threads
//!   before it unloads the library. A thread of your own must be joined in
//!   [`Plugin::shutdown`]: a live thread keeps the library mapped.
//! - Panics are caught at the boundary and answered with a 500; the host
//!   logs them (rate-limited), and the SDK keeps your library's panic hook
//!   from printing them.
//! - Do not start an async runtime of your own to serve requests; handlers are
//!   synchronous by design.

#![deny(missing_docs)]
#![deny(unsafe_code)]

// The ABI types and the entry points behind them are the only `unsafe` code
// of the SDK. `ffi` stays public because the host reads a plugin through it,
// and hidden because a plugin author never needs it.
mod consumer;
mod context;
mod extract;
#[doc(hidden)]
#[allow(unsafe_code)]
pub mod ffi;
mod fingerprint;
mod logging;
mod request;
mod response;
mod router;
mod service;
pub mod testing;

#[doc(hidden)]
#[allow(unsafe_code)]
pub mod __private;

pub use consumer::{CONSUMER_CLAIMS_HEADER, CONSUMER_ID_HEADER, Consumer};
pub use context::{Call, Context, Stop};
pub use extract::{FromRequest, Json, Path, Query};
pub use log;
pub use request::{DEFAULT_TENANT, Request, TENANT_HEADER};
pub use response::{Error, Response, Result};
pub use router::{Handler, Method, Router};
pub use service::{EndpointConfig, ServiceConfig};

/// A plugin: its configuration, its state and its routes.
///
/// Implement it on the type that holds your state, then call
/// [`export_plugin!`] with that type.
pub trait Plugin: Sized + Send + Sync + 'static {
    /// The service's description. Its `name` is the mount point
    /// `/api/<name>/`. Endpoints are filled in from [`Plugin::router`].
    fn config() -> ServiceConfig;

    /// Creates the state, with the host's [`Context`] (keep a clone to use
    /// it later). An error refuses the load with its message.
    fn init(ctx: &Context) -> Result<Self>;

    /// The routes. Called once per load, after [`Plugin::init`].
    fn router() -> Router<Self>;

    /// Called once on unload after the last request returned and every
    /// background task of the context ended, before the state is dropped.
    /// Join any thread you started yourself here.
    fn shutdown(&self) {}
}

/// Exports a [`Plugin`] type as this library's entry point.
///
/// Use it exactly once, at the crate root of a `cdylib`.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        /// Entry point read by the plugin host.
        #[unsafe(no_mangle)]
        pub extern "C" fn plugin_api_entry() -> *const $crate::ffi::PluginDescriptor {
            static DESCRIPTOR: $crate::ffi::PluginDescriptor =
                $crate::__private::descriptor::<$plugin>();
            &DESCRIPTOR
        }
    };
}
