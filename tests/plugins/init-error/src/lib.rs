//! Test plugin `init-error`: `init` fails with a message the host must log.

use plugin_api::{Error, Plugin, Result, Router, ServiceConfig, export_plugin};

struct InitError;

impl Plugin for InitError {
    fn config() -> ServiceConfig {
        ServiceConfig::new("init-error").version(env!("CARGO_PKG_VERSION"))
    }

    fn init(_ctx: &plugin_api::Context) -> Result<Self> {
        Err(Error::internal("database at 10.0.0.1 unreachable"))
    }

    fn router() -> Router<Self> {
        Router::new()
    }
}

export_plugin!(InitError);
