//! Test plugin `shutdown-panic`: serves `GET /` (`ok`), and its shutdown hook
//! panics; the unload must still complete.

use plugin_api::{Plugin, Request, Response, Result, Router, ServiceConfig, export_plugin};

struct ShutdownPanic;

impl Plugin for ShutdownPanic {
    fn config() -> ServiceConfig {
        ServiceConfig::new("shutdown-panic").version(env!("CARGO_PKG_VERSION"))
    }

    fn init(_ctx: &plugin_api::Context) -> Result<Self> {
        Ok(ShutdownPanic)
    }

    fn router() -> Router<Self> {
        Router::new().get("/", "Answers `ok`", ok)
    }

    fn shutdown(&self) {
        panic!("could not flush the journal")
    }
}

fn ok(_: &ShutdownPanic, _: &Request) -> Result<Response> {
    Ok(Response::text("ok"))
}

export_plugin!(ShutdownPanic);
