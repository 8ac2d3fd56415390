//! Test plugin `init-panic`: `init` panics; the host must refuse the file
//! with the panic's message and live on.

use plugin_api::{Plugin, Result, Router, ServiceConfig, export_plugin};

struct InitPanic;

impl Plugin for InitPanic {
    fn config() -> ServiceConfig {
        ServiceConfig::new("init-panic").version(env!("CARGO_PKG_VERSION"))
    }

    fn init(_ctx: &plugin_api::Context) -> Result<Self> {
        panic!("no configuration file found")
    }

    fn router() -> Router<Self> {
        Router::new()
    }
}

export_plugin!(InitPanic);
