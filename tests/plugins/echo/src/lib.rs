//! Test plugin `echo`: answers any GET or POST up to two segments deep with
//! the request exactly as the plugin received it.

#![forbid(unsafe_code)]

use plugin_api::{Plugin, Request, Response, Result, Router, ServiceConfig, export_plugin};
use serde_json::json;

struct Echo;

impl Plugin for Echo {
    fn config() -> ServiceConfig {
        ServiceConfig::new("echo").version(env!("CARGO_PKG_VERSION"))
    }

    fn init(_ctx: &plugin_api::Context) -> Result<Self> {
        Ok(Echo)
    }

    fn router() -> Router<Self> {
        ["/", "/{a}", "/{a}/{b}"]
            .into_iter()
            .fold(Router::new(), |router, path| {
                router
                    .get(path, "Echoes the request", echo)
                    .post(path, "Echoes the request", echo)
            })
    }
}

fn echo(_: &Echo, req: &Request) -> Result<Response> {
    let headers: Vec<_> = req
        .headers()
        .map(|(name, value)| json!([name, String::from_utf8_lossy(value)]))
        .collect();
    Response::json(&json!({
        "method": req.method(),
        "path": req.path(),
        "query": req.query_string(),
        "headers": headers,
        "body": req.text(),
        "client_addr": req.client_addr(),
        "tenant": req.tenant(),
    }))
}

export_plugin!(Echo);

#[cfg(test)]
mod tests {
    use plugin_api::testing::TestClient;
    use serde_json::Value;

    use super::Echo;

    fn tenant(client: &TestClient<Echo>, headers: &[(&str, &str)]) -> Value {
        let response = client.request("GET", "/x", headers, b"");
        serde_json::from_slice::<Value>(response.body_bytes()).unwrap()["tenant"].clone()
    }

    #[test]
    fn the_tenant_is_the_x_tenant_id_header_or_default() {
        let client = TestClient::<Echo>::new().unwrap();
        assert_eq!(tenant(&client, &[("X-Tenant-ID", "acme")]), "acme");
        assert_eq!(tenant(&client, &[]), plugin_api::DEFAULT_TENANT);
    }
}
