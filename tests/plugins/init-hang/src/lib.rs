//! Test plugin `init-hang`: `init` sleeps for an hour; the host must give up
//! on it after its entry timeout and go on loading other files.

use std::time::Duration;

use plugin_api::{Plugin, Result, Router, ServiceConfig, export_plugin};

struct InitHang;

impl Plugin for InitHang {
    fn config() -> ServiceConfig {
        ServiceConfig::new("init-hang").version(env!("CARGO_PKG_VERSION"))
    }

    fn init(_ctx: &plugin_api::Context) -> Result<Self> {
        std::thread::sleep(Duration::from_secs(3600));
        Ok(InitHang)
    }

    fn router() -> Router<Self> {
        Router::new()
    }
}

export_plugin!(InitHang);
