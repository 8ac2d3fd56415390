//! Benchmark plugin `hello-keyed`: the `hello` example's `GET /hello`,
//! answered the same, but private in a service that requires
//! authentication. Scenario 1 compares it with `hello` in the same host,
//! so the difference is what the gateway's auth costs.

#![forbid(unsafe_code)]

use plugin_api::{Plugin, Request, Response, Result, Router, ServiceConfig, export_plugin};
use serde_json::json;

struct HelloKeyed;

impl Plugin for HelloKeyed {
    fn config() -> ServiceConfig {
        ServiceConfig::new("hello-keyed")
            .version(env!("CARGO_PKG_VERSION"))
            .requires_auth(true)
    }

    fn init(_ctx: &plugin_api::Context) -> Result<Self> {
        Ok(HelloKeyed)
    }

    fn router() -> Router<Self> {
        Router::new()
            .get("/health", "Health check", health)
            .get("/hello", "Greets `name` (default World)", hello)
            .private()
    }
}

fn health(_: &HelloKeyed, _: &Request) -> Result<Response> {
    Response::json(&json!({ "status": "healthy" }))
}

/// Exactly what `hello`'s handler does.
fn hello(_: &HelloKeyed, req: &Request) -> Result<Response> {
    let name = req.query("name").unwrap_or_else(|| "World".into());
    Response::json(&json!({ "message": format!("Hello, {name}!") }))
}

export_plugin!(HelloKeyed);
