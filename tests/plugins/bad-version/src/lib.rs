//! Test plugin `bad_version`: valid in every way but its version, `latest`,
//! which is no semantic version: the host must refuse the file naming the
//! `version` field, and never load it.

#![forbid(unsafe_code)]

use plugin_api::{Plugin, Request, Response, Result, Router, ServiceConfig, export_plugin};

struct BadVersion;

impl Plugin for BadVersion {
    fn config() -> ServiceConfig {
        ServiceConfig::new("bad-version").version("latest")
    }

    fn init(_ctx: &plugin_api::Context) -> Result<Self> {
        Ok(BadVersion)
    }

    fn router() -> Router<Self> {
        Router::new().get("/health", "Health check", health)
    }
}

fn health(_: &BadVersion, _: &Request) -> Result<Response> {
    Response::json(&serde_json::json!({ "status": "healthy" }))
}

export_plugin!(BadVersion);
