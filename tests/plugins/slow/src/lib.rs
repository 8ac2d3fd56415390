//! Test plugin `slow`: `GET /sleep?ms=N` blocks its worker thread for N ms,
//! then answers `{"slept_ms": N}`.

#![forbid(unsafe_code)]

use std::time::Duration;

use plugin_api::{Error, Plugin, Request, Response, Result, Router, ServiceConfig, export_plugin};

struct Slow;

impl Plugin for Slow {
    fn config() -> ServiceConfig {
        ServiceConfig::new("slow").version(env!("CARGO_PKG_VERSION"))
    }

    fn init(_ctx: &plugin_api::Context) -> Result<Self> {
        Ok(Slow)
    }

    fn router() -> Router<Self> {
        Router::new().get("/sleep", "Sleeps `ms` milliseconds", sleep)
    }
}

fn sleep(_: &Slow, req: &Request) -> Result<Response> {
    let ms: u64 = req
        .query("ms")
        .and_then(|ms| ms.parse().ok())
        .ok_or_else(|| Error::unprocessable("query parameter `ms`: expected milliseconds"))?;
    std::thread::sleep(Duration::from_millis(ms));
    Response::json(&serde_json::json!({ "slept_ms": ms }))
}

export_plugin!(Slow);
