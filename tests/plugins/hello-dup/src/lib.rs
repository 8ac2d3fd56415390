//! Test plugin `hello_dup`: a valid plugin whose service name and version,
//! `hello` 1.0.0, are already taken by the `hello` example; the host must
//! refuse whichever of the two loads second.

#![forbid(unsafe_code)]

use plugin_api::{Plugin, Request, Response, Result, Router, ServiceConfig, export_plugin};
use serde_json::json;

struct HelloDup;

impl Plugin for HelloDup {
    fn config() -> ServiceConfig {
        ServiceConfig::new("hello").version(env!("CARGO_PKG_VERSION"))
    }

    fn init(_ctx: &plugin_api::Context) -> Result<Self> {
        Ok(HelloDup)
    }

    fn router() -> Router<Self> {
        Router::new()
            .get("/", "Which plugin answers", root)
            .get("/health", "Health check", health)
    }
}

fn root(_: &HelloDup, _: &Request) -> Result<Response> {
    Response::json(&json!({ "variant": env!("CARGO_PKG_NAME") }))
}

fn health(_: &HelloDup, _: &Request) -> Result<Response> {
    Response::json(&json!({ "status": "healthy" }))
}

export_plugin!(HelloDup);
