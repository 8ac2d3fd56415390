//! Test plugin `slow-init`: its `init` takes a second, so the host's
//! start-up has a wide window in which a registration could race it for
//! its name. `GET /` answers `ready`.

use std::time::Duration;

use plugin_api::{Plugin, Request, Response, Result, Router, ServiceConfig, export_plugin};

struct SlowInit;

impl Plugin for SlowInit {
    fn config() -> ServiceConfig {
        ServiceConfig::new("slow-init").version(env!("CARGO_PKG_VERSION"))
    }

    fn init(_ctx: &plugin_api::Context) -> Result<Self> {
        std::thread::sleep(Duration::from_secs(1));
        Ok(SlowInit)
    }

    fn router() -> Router<Self> {
        Router::new().get("/", "Says it is ready", ready)
    }
}

fn ready(_: &SlowInit, _: &Request) -> Result<Response> {
    Ok(Response::text("ready"))
}

export_plugin!(SlowInit);
