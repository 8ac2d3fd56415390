//! Example plugin: statistics over the items of `demo-service` (called in
//! process, no socket) and the data of a remote service when one is
//! registered, mounted at `/api/analytics-service/`. A periodic job keeps
//! the statistics fresh, every `refresh_ms` (a setting).
//!
//! Settings (`[plugin.analytics-service.settings]` in the host's config),
//! all optional: `refresh_ms` (60000), `source` ("demo-service"), `remote`
//! ("another-service") and `remote_path` ("/data").

#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use plugin_api::{
    Call, Context, Plugin, Request, Response, Result, Router, ServiceConfig, export_plugin, log,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    refresh_ms: u64,
    source: String,
    remote: String,
    remote_path: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            refresh_ms: 60_000,
            source: "demo-service".to_owned(),
            remote: "another-service".to_owned(),
            remote_path: "/data".to_owned(),
        }
    }
}

/// The running statistics, as `/stats` answers them.
#[derive(Default, Serialize)]
struct Stats {
    refreshes: u64,
    items: usize,
    total_value: f64,
    average_price: Option<f64>,
    remote: Option<Value>,
    last_error: Option<String>,
}

#[derive(Deserialize)]
struct Item {
    price: f64,
}

struct Analytics {
    ctx: Context,
    settings: Arc<Settings>,
    stats: Arc<Mutex<Stats>>,
}

impl Plugin for Analytics {
    fn config() -> ServiceConfig {
        ServiceConfig::new("analytics-service")
            .display_name("Analytics Service")
            .description("Statistics over demo-service and a remote service")
            .version(env!("CARGO_PKG_VERSION"))
            .tag("example")
    }

    fn init(ctx: &Context) -> Result<Self> {
        let settings: Arc<Settings> = Arc::new(ctx.settings()?);
        let stats = Arc::new(Mutex::new(Stats::default()));
        let job = (ctx.clone(), settings.clone(), stats.clone());
        ctx.every(Duration::from_millis(settings.refresh_ms), move || {
            refresh(&job.0, &job.1, &job.2);
        })?;
        Ok(Analytics {
            ctx: ctx.clone(),
            settings,
            stats,
        })
    }

    fn router() -> Router<Self> {
        Router::new()
            .get("/health", "Health check", health)
            .get("/stats", "Statistics of the last refresh", stats)
            .get("/aggregate", "The data of both services, now", aggregate)
    }
}

/// The remote service's data, or `None` if no service of that name is
/// registered.
fn remote_data(ctx: &Context, settings: &Settings) -> Result<Option<Value>> {
    let response = ctx.call(&settings.remote, Call::get(&settings.remote_path));
    if response.status() == 404 {
        return Ok(None);
    }
    Context::expect_json(&settings.remote, &response).map(Some)
}

/// The periodic job: recomputes the statistics.
fn refresh(ctx: &Context, settings: &Settings, stats: &Mutex<Stats>) {
    let items = ctx.get_json::<Vec<Item>>(&settings.source, "/items");
    let remote = remote_data(ctx, settings);
    let mut stats = stats.lock().unwrap();
    stats.refreshes += 1;
    stats.last_error = None;
    match items {
        Ok(items) => {
            stats.items = items.len();
            stats.total_value = items.iter().map(|item| item.price).sum();
            stats.average_price =
                (!items.is_empty()).then(|| stats.total_value / items.len() as f64);
        }
        Err(error) => {
            log::warn!(
                "refresh from {} failed: {}",
                settings.source,
                error.message()
            );
            stats.last_error = Some(error.message().to_owned());
        }
    }
    match remote {
        Ok(remote) => stats.remote = remote,
        Err(error) => stats.last_error = Some(error.message().to_owned()),
    }
}

fn health(_: &Analytics, _: &Request) -> Result<Response> {
    Response::json(&json!({ "status": "healthy" }))
}

fn stats(state: &Analytics, _: &Request) -> Result<Response> {
    Response::json(&*state.stats.lock().unwrap())
}

/// The guide's `/aggregate`: both services' data, fetched now.
fn aggregate(state: &Analytics, _: &Request) -> Result<Response> {
    let settings = &state.settings;
    let items: Value = state.ctx.get_json(&settings.source, "/items")?;
    let remote = remote_data(&state.ctx, settings)?;
    let mut answer = serde_json::Map::new();
    answer.insert(settings.source.clone(), items);
    answer.insert(settings.remote.clone(), remote.unwrap_or(Value::Null));
    Response::json(&answer)
}

export_plugin!(Analytics);

#[cfg(test)]
mod tests {
    use plugin_api::testing::{MockContext, TestClient};

    use super::*;

    fn body(response: &Response) -> Value {
        serde_json::from_slice(response.body_bytes()).unwrap()
    }

    fn demo_items() -> MockContext {
        MockContext::new().stub("demo-service", |call| {
            assert_eq!(call.path(), "/items");
            Response::json(&json!([{"id": 1, "price": 2.0}, {"id": 2, "price": 4.0}])).unwrap()
        })
    }

    #[test]
    fn the_periodic_job_refreshes_the_statistics() {
        let client = TestClient::<Analytics>::with_context(demo_items()).unwrap();
        assert_eq!(body(&client.get("/stats"))["refreshes"], 0);
        client.run_background();
        client.run_background();
        assert_eq!(
            body(&client.get("/stats")),
            json!({"refreshes": 2, "items": 2, "total_value": 6.0, "average_price": 3.0,
                   "remote": null, "last_error": null})
        );
    }

    #[test]
    fn aggregate_includes_the_remote_service_when_registered() {
        let client = TestClient::<Analytics>::new().unwrap();
        assert_eq!(client.get("/aggregate").status(), 502, "no demo-service");

        let client = TestClient::<Analytics>::with_context(
            demo_items()
                .setting("remote", "inventory")
                .stub("inventory", |_| {
                    Response::json(&json!({"stock": 7})).unwrap()
                }),
        )
        .unwrap();
        let answer = body(&client.get("/aggregate"));
        assert_eq!(answer["inventory"], json!({"stock": 7}));
        assert_eq!(answer["demo-service"][1]["price"], 4.0);
    }

    #[test]
    fn a_failed_refresh_is_logged_and_shown() {
        let client = TestClient::<Analytics>::new().unwrap();
        client.run_background();
        let stats = body(&client.get("/stats"));
        assert!(
            stats["last_error"]
                .as_str()
                .unwrap()
                .contains("demo-service")
        );
        assert!(
            client
                .logs()
                .iter()
                .any(|line| line.starts_with("WARN") && line.contains("refresh")),
            "{:?}",
            client.logs()
        );
    }

    #[test]
    fn a_mistyped_setting_fails_init_naming_it() {
        let error =
            TestClient::<Analytics>::with_context(MockContext::new().setting("refresh_ms", "soon"))
                .unwrap_err();
        assert!(
            error
                .message()
                .starts_with("invalid setting `plugin.analytics-service.settings.refresh_ms`"),
            "{}",
            error.message()
        );
    }
}
