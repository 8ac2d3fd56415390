//! Benchmark plugin `hello-versioned`: the `hello` example's `GET /hello`,
//! answered the same, built twice (`hello-v1` declares 1.0.0, `hello-v2`
//! 2.0.0). Scenario 1 mounts both beside `hello`, so the difference between
//! the two names is what choosing among a name's versions costs.

#![forbid(unsafe_code)]

use plugin_api::{Plugin, Request, Response, Result, Router, ServiceConfig, export_plugin};
use serde_json::json;

struct HelloVersioned;

impl Plugin for HelloVersioned {
    fn config() -> ServiceConfig {
        ServiceConfig::new("hello-versioned").version(env!("CARGO_PKG_VERSION"))
    }

    fn init(_ctx: &plugin_api::Context) -> Result<Self> {
        Ok(HelloVersioned)
    }

    fn router() -> Router<Self> {
        Router::new().get("/health", "Health check", health).get(
            "/hello",
            "Greets `name` (default World)",
            hello,
        )
    }
}

fn health(_: &HelloVersioned, _: &Request) -> Result<Response> {
    Response::json(&json!({ "status": "healthy" }))
}

/// Exactly what `hello`'s handler does.
fn hello(_: &HelloVersioned, req: &Request) -> Result<Response> {
    let name = req.query("name").unwrap_or_else(|| "World".into());
    Response::json(&json!({ "message": format!("Hello, {name}!") }))
}

export_plugin!(HelloVersioned);
