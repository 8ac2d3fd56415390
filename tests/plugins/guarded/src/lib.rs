//! Test plugin `guarded`: declares `requires_auth`, with a public route
//! (`GET /public`) and private ones (`GET /private`, `POST /private`,
//! `GET /items/{id}`). Every route answers what the plugin was told: the
//! consumer (`Request::consumer`) and the identity and credential headers
//! it received.

#![forbid(unsafe_code)]

use plugin_api::{Plugin, Request, Response, Result, Router, ServiceConfig, export_plugin};
use serde_json::json;

struct Guarded;

impl Plugin for Guarded {
    fn config() -> ServiceConfig {
        ServiceConfig::new("guarded")
            .version(env!("CARGO_PKG_VERSION"))
            .requires_auth(true)
    }

    fn init(_ctx: &plugin_api::Context) -> Result<Self> {
        Ok(Guarded)
    }

    fn router() -> Router<Self> {
        Router::new()
            .get("/public", "Open to anyone", whoami)
            .get("/private", "Needs a credential", whoami)
            .private()
            .post("/private", "Needs a credential", whoami)
            .private()
            .get("/items/{id}", "Needs a credential", whoami)
            .private()
    }
}

fn whoami(_: &Guarded, req: &Request) -> Result<Response> {
    let seen = |name: &str| -> Vec<String> {
        req.headers()
            .filter(|(header, _)| header.eq_ignore_ascii_case(name))
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
            .collect()
    };
    let consumer = req.consumer();
    Response::json(&json!({
        "path": req.path(),
        "consumer": consumer.as_ref().map(|c| json!({"id": c.id(), "claims": c.claims()})),
        "x-consumer-id": seen("x-consumer-id"),
        "x-consumer-claims": seen("x-consumer-claims"),
        "x-api-key": seen("x-api-key"),
        "authorization": seen("authorization"),
    }))
}

export_plugin!(Guarded);
