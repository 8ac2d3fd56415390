//! Test plugin `stuck`: `GET /hold?ms=N` writes `stuck: handler entered` to
//! stderr (the host's log, so a test knows the request reached a worker),
//! blocks its worker for N ms, then answers `held N ms`.

use std::time::Duration;

use plugin_api::{Error, Plugin, Request, Response, Result, Router, ServiceConfig, export_plugin};

struct Stuck;

impl Plugin for Stuck {
    fn config() -> ServiceConfig {
        ServiceConfig::new("stuck").version(env!("CARGO_PKG_VERSION"))
    }

    fn init(_ctx: &plugin_api::Context) -> Result<Self> {
        Ok(Stuck)
    }

    fn router() -> Router<Self> {
        Router::new().get("/hold", "Blocks for `ms` milliseconds", hold)
    }
}

fn hold(_: &Stuck, req: &Request) -> Result<Response> {
    let ms: u64 = req
        .query("ms")
        .and_then(|ms| ms.parse().ok())
        .ok_or_else(|| Error::unprocessable("query parameter `ms`: expected milliseconds"))?;
    eprintln!("stuck: handler entered");
    std::thread::sleep(Duration::from_millis(ms));
    Ok(Response::text(format!("held {ms} ms")))
}

export_plugin!(Stuck);
