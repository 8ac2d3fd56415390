//! The first example plugin, mounted at `/api/hello/`.

#![forbid(unsafe_code)]

use std::sync::Mutex;

use plugin_api::{
    Context, Error, Plugin, Request, Response, Result, Router, ServiceConfig, export_plugin,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

const DISPLAY_NAME: &str = "Hello Service";
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The plugin's state: created on load, dropped on unload.
#[derive(Default)]
struct Hello {
    items: Mutex<Vec<Item>>,
}

#[derive(Deserialize)]
struct NewItem {
    title: String,
    content: String,
}

#[derive(Clone, Serialize)]
struct Item {
    id: u64,
    title: String,
    content: String,
}

impl Plugin for Hello {
    fn config() -> ServiceConfig {
        ServiceConfig::new("hello")
            .display_name(DISPLAY_NAME)
            .description("My first plugin service")
            .version(VERSION)
            .metadata("category", "example")
            .tag("example")
    }

    fn init(_ctx: &Context) -> Result<Self> {
        Ok(Hello::default())
    }

    fn router() -> Router<Self> {
        Router::new()
            .get("/", "Service info", root)
            .get("/health", "Health check", health)
            .get("/hello", "Greets `name` (default World)", hello)
            .get("/data", "Lists the data items", list_data)
            .post("/data", "Creates a data item", create_data)
            .get("/data/{id}", "Gets one data item", get_data)
    }
}

fn root(_: &Hello, _: &Request) -> Result<Response> {
    Response::json(&json!({ "service": DISPLAY_NAME, "version": VERSION, "status": "running" }))
}

fn health(_: &Hello, _: &Request) -> Result<Response> {
    Response::json(&json!({ "status": "healthy" }))
}

fn hello(_: &Hello, req: &Request) -> Result<Response> {
    let name = req.query("name").unwrap_or_else(|| "World".into());
    Response::json(&json!({ "message": format!("Hello, {name}!") }))
}

fn list_data(state: &Hello, _: &Request) -> Result<Response> {
    let items = state.items.lock().unwrap();
    Response::json(&json!({ "data": &*items, "count": items.len() }))
}

fn create_data(state: &Hello, req: &Request) -> Result<Response> {
    let NewItem { title, content } = req.json()?; // 400 or 422 if the body does not fit
    let mut items = state.items.lock().unwrap();
    // Items are never removed, so the next id is the count plus one.
    let item = Item {
        id: items.len() as u64 + 1,
        title,
        content,
    };
    items.push(item.clone());
    Response::json(&json!({ "status": "created", "item": item }))
}

fn get_data(state: &Hello, req: &Request) -> Result<Response> {
    let id: u64 = req.param_as("id")?; // 422 if not an integer
    let items = state.items.lock().unwrap();
    match items.iter().find(|item| item.id == id) {
        Some(item) => Response::json(item),
        None => Err(Error::not_found("Item not found")),
    }
}

export_plugin!(Hello);

#[cfg(test)]
mod tests {
    use plugin_api::testing::TestClient;
    use serde_json::{Value, json};

    use super::Hello;

    fn body(response: &plugin_api::Response) -> Value {
        serde_json::from_slice(response.body_bytes()).unwrap()
    }

    #[test]
    fn greets_by_name_or_the_world() {
        let client = TestClient::<Hello>::new().unwrap();
        assert_eq!(
            body(&client.get("/hello?name=Ada")),
            json!({"message": "Hello, Ada!"})
        );
        assert_eq!(
            body(&client.get("/hello")),
            json!({"message": "Hello, World!"})
        );
    }

    #[test]
    fn stores_and_finds_items() {
        let client = TestClient::<Hello>::new().unwrap();
        let created = client.post_json("/data", &json!({"title": "t", "content": "c"}));
        assert_eq!(body(&created)["item"]["id"], 1);
        assert_eq!(client.get("/data/1").status(), 200);
        assert_eq!(client.get("/data/2").status(), 404);
        assert_eq!(client.get("/data/x").status(), 422);
        assert_eq!(body(&client.get("/data"))["count"], 1);
    }

    #[test]
    fn refuses_bodies_that_do_not_fit() {
        let client = TestClient::<Hello>::new().unwrap();
        assert_eq!(
            client.post_json("/data", &json!({"title": "t"})).status(),
            422
        );
        let malformed = client.request("POST", "/data", &[], b"{not json");
        assert_eq!(malformed.status(), 400);
    }
}
