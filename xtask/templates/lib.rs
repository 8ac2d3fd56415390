//! Plugin `{name}`, mounted by the plugin host at `/api/{name}/`.

#![forbid(unsafe_code)]

use plugin_api::{Context, Plugin, Request, Response, Result, Router, ServiceConfig, export_plugin};
use serde_json::json;

struct Service {
    ctx: Context,
}

impl Plugin for Service {
    fn config() -> ServiceConfig {
        ServiceConfig::new("{name}")
            .description("A plugin made by `cargo xtask new-plugin`")
            .version(env!("CARGO_PKG_VERSION"))
    }

    fn init(ctx: &Context) -> Result<Self> {
        plugin_api::log::info!("{name} started; data in {}", ctx.data_dir().display());
        Ok(Service { ctx: ctx.clone() })
    }

    fn router() -> Router<Self> {
        Router::new().get("/health", "Health check", health)
    }
}

fn health(state: &Service, _: &Request) -> Result<Response> {
    Response::json(&json!({ "status": "healthy", "service": state.ctx.name() }))
}

export_plugin!(Service);

#[cfg(test)]
mod tests {
    use plugin_api::testing::TestClient;

    use super::*;

    #[test]
    fn health_answers_healthy() {
        let client = TestClient::<Service>::new().unwrap();
        let response = client.get("/health");
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = serde_json::from_slice(response.body_bytes()).unwrap();
        assert_eq!(body, json!({ "status": "healthy", "service": "{name}" }));
    }
}
