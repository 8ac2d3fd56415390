//! Test plugin `panicky`: `GET /boom` panics, `GET /ok` answers `{"ok":true}`.
//! The panic must become a 500 and leave the plugin serving.

#![forbid(unsafe_code)]

use plugin_api::{Plugin, Request, Response, Result, Router, ServiceConfig, export_plugin};

struct Panicky;

impl Plugin for Panicky {
    fn config() -> ServiceConfig {
        ServiceConfig::new("panicky").version(env!("CARGO_PKG_VERSION"))
    }

    fn init(_ctx: &plugin_api::Context) -> Result<Self> {
        Ok(Panicky)
    }

    fn router() -> Router<Self> {
        Router::new()
            .get("/boom", "Panics", boom)
            .get("/ok", "Answers {\"ok\":true}", ok)
    }
}

fn boom(_: &Panicky, _: &Request) -> Result<Response> {
    panic!("boom")
}

fn ok(_: &Panicky, _: &Request) -> Result<Response> {
    Response::json(&serde_json::json!({ "ok": true }))
}

export_plugin!(Panicky);
