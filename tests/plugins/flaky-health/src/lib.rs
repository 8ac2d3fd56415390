//! Test plugin `flaky-health`: `GET /health` answers 200 while healthy and
//! 503 after `POST /fail`, until `POST /recover`.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};

use plugin_api::{Plugin, Request, Response, Result, Router, ServiceConfig, export_plugin};
use serde_json::json;

struct FlakyHealth {
    failing: AtomicBool,
}

impl Plugin for FlakyHealth {
    fn config() -> ServiceConfig {
        ServiceConfig::new("flaky-health").version(env!("CARGO_PKG_VERSION"))
    }

    fn init(_ctx: &plugin_api::Context) -> Result<Self> {
        Ok(FlakyHealth {
            failing: AtomicBool::new(false),
        })
    }

    fn router() -> Router<Self> {
        Router::new()
            .get("/health", "200 while healthy, 503 after /fail", health)
            .post("/fail", "Makes /health answer 503", fail)
            .post("/recover", "Makes /health answer 200", recover)
    }
}

fn health(plugin: &FlakyHealth, _: &Request) -> Result<Response> {
    if plugin.failing.load(Ordering::SeqCst) {
        Ok(Response::json(&json!({"status": "unhealthy"}))?.with_status(503))
    } else {
        Response::json(&json!({"status": "healthy"}))
    }
}

fn fail(plugin: &FlakyHealth, _: &Request) -> Result<Response> {
    plugin.failing.store(true, Ordering::SeqCst);
    Response::json(&json!({"failing": true}))
}

fn recover(plugin: &FlakyHealth, _: &Request) -> Result<Response> {
    plugin.failing.store(false, Ordering::SeqCst);
    Response::json(&json!({"failing": false}))
}

export_plugin!(FlakyHealth);
