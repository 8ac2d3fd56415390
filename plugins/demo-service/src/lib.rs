//! Example plugin: CRUD on items, mounted at `/api/demo-service/`.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::Mutex;

use plugin_api::{Error, Plugin, Request, Response, Result, Router, ServiceConfig, export_plugin};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Default)]
struct DemoService {
    store: Mutex<Store>,
}

#[derive(Default)]
struct Store {
    items: BTreeMap<u64, Item>,
    last_id: u64,
}

#[derive(Clone, Serialize)]
struct Item {
    id: u64,
    #[serde(flatten)]
    fields: ItemFields,
}

/// What a client sends to create or replace an item. A missing or mistyped
/// field is answered 422 by `Request::json`; `validate` checks the rest.
#[derive(Clone, Serialize, Deserialize)]
struct ItemFields {
    name: String,
    description: Option<String>,
    price: f64,
}

impl ItemFields {
    fn validate(&self) -> Result<()> {
        if self.name.trim().is_empty() {
            return Err(Error::unprocessable("name: must not be empty"));
        }
        if self.price < 0.0 {
            return Err(Error::unprocessable("price: must not be negative"));
        }
        Ok(())
    }
}

impl Plugin for DemoService {
    fn config() -> ServiceConfig {
        ServiceConfig::new("demo-service")
            .display_name("Demo Service")
            .description("CRUD on an in-memory item catalogue")
            .version(env!("CARGO_PKG_VERSION"))
            .tag("example")
    }

    fn init(_ctx: &plugin_api::Context) -> Result<Self> {
        Ok(DemoService::default())
    }

    fn router() -> Router<Self> {
        Router::new()
            .get("/health", "Health check", health)
            .get("/items", "Lists the items", list_items)
            .post("/items", "Creates an item", create_item)
            .get("/items/{id}", "Gets one item", get_item)
            .put("/items/{id}", "Replaces an item", update_item)
            .delete("/items/{id}", "Deletes an item", delete_item)
    }
}

fn not_found(id: u64) -> Error {
    Error::not_found(format!("item {id} not found"))
}

fn health(_: &DemoService, _: &Request) -> Result<Response> {
    Response::json(&json!({ "status": "healthy" }))
}

fn list_items(state: &DemoService, _: &Request) -> Result<Response> {
    let store = state.store.lock().unwrap();
    Response::json(&store.items.values().collect::<Vec<_>>())
}

fn create_item(state: &DemoService, req: &Request) -> Result<Response> {
    let fields: ItemFields = req.json()?;
    fields.validate()?;
    let mut store = state.store.lock().unwrap();
    store.last_id += 1;
    let item = Item {
        id: store.last_id,
        fields,
    };
    store.items.insert(item.id, item.clone());
    Ok(Response::json(&item)?.with_status(201))
}

fn get_item(state: &DemoService, req: &Request) -> Result<Response> {
    let id: u64 = req.param_as("id")?;
    let store = state.store.lock().unwrap();
    Response::json(store.items.get(&id).ok_or_else(|| not_found(id))?)
}

fn update_item(state: &DemoService, req: &Request) -> Result<Response> {
    let id: u64 = req.param_as("id")?;
    let fields: ItemFields = req.json()?;
    fields.validate()?;
    let mut store = state.store.lock().unwrap();
    let item = store.items.get_mut(&id).ok_or_else(|| not_found(id))?;
    item.fields = fields;
    Response::json(item)
}

fn delete_item(state: &DemoService, req: &Request) -> Result<Response> {
    let id: u64 = req.param_as("id")?;
    let mut store = state.store.lock().unwrap();
    store.items.remove(&id).ok_or_else(|| not_found(id))?;
    Ok(Response::new(204))
}

export_plugin!(DemoService);
