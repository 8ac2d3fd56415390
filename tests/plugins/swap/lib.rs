//! Test plugin shared by packages `swap-a` and `swap-b`: both serve service
//! `swap` and differ only in the package name and version they are built
//! with, so a test can replace one with the other under load and tell which
//! answered.

#![forbid(unsafe_code)]

use plugin_api::{Plugin, Request, Response, Result, Router, ServiceConfig, export_plugin};
use serde_json::json;

struct Swap;

impl Plugin for Swap {
    fn config() -> ServiceConfig {
        ServiceConfig::new("swap").version(env!("CARGO_PKG_VERSION"))
    }

    fn init(_ctx: &plugin_api::Context) -> Result<Self> {
        Ok(Swap)
    }

    fn router() -> Router<Self> {
        Router::new()
            .get("/", "Which variant answers", root)
            .get("/health", "Health check", health)
    }
}

fn root(_: &Swap, _: &Request) -> Result<Response> {
    Response::json(&json!({ "variant": env!("CARGO_PKG_NAME") }))
}

fn health(_: &Swap, _: &Request) -> Result<Response> {
    Response::json(&json!({ "status": "healthy" }))
}

export_plugin!(Swap);
