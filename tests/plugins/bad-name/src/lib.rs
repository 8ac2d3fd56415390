//! Test plugin `bad_name`: valid in every way but its service name, which
//! the host must refuse naming the `name` field.

#![forbid(unsafe_code)]

use plugin_api::{Plugin, Request, Response, Result, Router, ServiceConfig, export_plugin};

struct BadName;

impl Plugin for BadName {
    fn config() -> ServiceConfig {
        ServiceConfig::new("Bad_Name!").version(env!("CARGO_PKG_VERSION"))
    }

    fn init(_ctx: &plugin_api::Context) -> Result<Self> {
        Ok(BadName)
    }

    fn router() -> Router<Self> {
        Router::new().get("/health", "Health check", health)
    }
}

fn health(_: &BadName, _: &Request) -> Result<Response> {
    Response::json(&serde_json::json!({ "status": "healthy" }))
}

export_plugin!(BadName);
