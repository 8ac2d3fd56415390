//! Example plugin: CRUD on items, mounted at `/api/demo-service/`, stored
//! in SQLite in the plugin's data directory, so items survive a reload and
//! a restart of the host.

#![forbid(unsafe_code)]

use std::sync::Mutex;

use plugin_api::{
    Context, Error, Json, Plugin, Request, Response, Result, Router, ServiceConfig, export_plugin,
    log,
};
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};
use serde_json::json;

struct DemoService {
    db: Mutex<Connection>,
}

#[derive(Serialize)]
struct Item {
    id: i64,
    #[serde(flatten)]
    fields: ItemFields,
}

/// What a client sends to create or replace an item. A missing or mistyped
/// field is answered 422 by the `Json` extractor; `validate` checks the rest.
#[derive(Serialize, Deserialize)]
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

impl Item {
    fn from_row(row: &Row) -> rusqlite::Result<Self> {
        Ok(Item {
            id: row.get("id")?,
            fields: ItemFields {
                name: row.get("name")?,
                description: row.get("description")?,
                price: row.get("price")?,
            },
        })
    }
}

impl Plugin for DemoService {
    fn config() -> ServiceConfig {
        ServiceConfig::new("demo-service")
            .display_name("Demo Service")
            .description("CRUD on an item catalogue stored in SQLite")
            .version(env!("CARGO_PKG_VERSION"))
            .tag("example")
    }

    fn init(ctx: &Context) -> Result<Self> {
        let db = Connection::open(ctx.data_dir().join("items.sqlite3"))?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS items (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                name TEXT NOT NULL,
                description TEXT,
                price REAL NOT NULL
            )",
        )?;
        log::info!("items stored in {}", ctx.data_dir().display());
        Ok(DemoService { db: Mutex::new(db) })
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

fn not_found(id: i64) -> Error {
    Error::not_found(format!("item {id} not found"))
}

fn health(_: &DemoService, _: &Request) -> Result<Response> {
    Response::json(&json!({ "status": "healthy" }))
}

fn list_items(state: &DemoService, _: &Request) -> Result<Response> {
    let db = state.db.lock().unwrap();
    let mut query = db.prepare("SELECT * FROM items ORDER BY id")?;
    let items = query
        .query_map([], Item::from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Response::json(&items)
}

fn create_item(state: &DemoService, req: &Request) -> Result<Response> {
    let Json(fields): Json<ItemFields> = req.extract()?;
    fields.validate()?;
    let db = state.db.lock().unwrap();
    db.execute(
        "INSERT INTO items (name, description, price) VALUES (?1, ?2, ?3)",
        params![fields.name, fields.description, fields.price],
    )?;
    let item = Item {
        id: db.last_insert_rowid(),
        fields,
    };
    log::info!("item {} created", item.id);
    Ok(Response::json(&item)?.with_status(201))
}

fn get_item(state: &DemoService, req: &Request) -> Result<Response> {
    let id: i64 = req.param_as("id")?;
    let db = state.db.lock().unwrap();
    let item = db
        .query_row("SELECT * FROM items WHERE id = ?1", [id], Item::from_row)
        .optional()?;
    Response::json(&item.ok_or_else(|| not_found(id))?)
}

fn update_item(state: &DemoService, req: &Request) -> Result<Response> {
    let id: i64 = req.param_as("id")?;
    let Json(fields): Json<ItemFields> = req.extract()?;
    fields.validate()?;
    let db = state.db.lock().unwrap();
    let changed = db.execute(
        "UPDATE items SET name = ?1, description = ?2, price = ?3 WHERE id = ?4",
        params![fields.name, fields.description, fields.price, id],
    )?;
    if changed == 0 {
        return Err(not_found(id));
    }
    Response::json(&Item { id, fields })
}

fn delete_item(state: &DemoService, req: &Request) -> Result<Response> {
    let id: i64 = req.param_as("id")?;
    let db = state.db.lock().unwrap();
    if db.execute("DELETE FROM items WHERE id = ?1", [id])? == 0 {
        return Err(not_found(id));
    }
    Ok(Response::new(204))
}

export_plugin!(DemoService);

#[cfg(test)]
mod tests {
    use plugin_api::testing::{MockContext, TestClient};
    use serde_json::{Value, json};

    use super::*;

    fn body(response: &Response) -> Value {
        serde_json::from_slice(response.body_bytes()).unwrap()
    }

    #[test]
    fn crud_round_trip_in_insertion_order() {
        let client = TestClient::<DemoService>::new().unwrap();
        let created = client.post_json("/items", &json!({"name": "pen", "price": 1.5}));
        assert_eq!(created.status(), 201);
        assert_eq!(
            String::from_utf8_lossy(created.body_bytes()),
            r#"{"id":1,"name":"pen","description":null,"price":1.5}"#
        );
        let replaced = client.put_json(
            "/items/1",
            &json!({"name": "pencil", "description": "HB", "price": 0.5}),
        );
        assert_eq!(body(&replaced)["name"], "pencil");
        assert_eq!(body(&client.get("/items"))[0]["description"], "HB");
        assert_eq!(client.delete("/items/1").status(), 204);
        assert_eq!(client.get("/items/1").status(), 404);
        assert!(
            client
                .logs()
                .iter()
                .any(|line| line.contains("item 1 created")),
            "{:?}",
            client.logs()
        );
    }

    #[test]
    fn items_survive_a_new_instance_on_the_same_data_dir() {
        let dir = std::env::temp_dir().join(format!("demo-service-test-{}", std::process::id()));
        {
            let client =
                TestClient::<DemoService>::with_context(MockContext::new().data_dir(&dir)).unwrap();
            client.post_json("/items", &json!({"name": "kept", "price": 2.0}));
        }
        let client =
            TestClient::<DemoService>::with_context(MockContext::new().data_dir(&dir)).unwrap();
        assert_eq!(body(&client.get("/items/1"))["name"], "kept");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn invalid_input_is_422_naming_the_field() {
        let client = TestClient::<DemoService>::new().unwrap();
        let wrong = client.post_json("/items", &json!({"name": "pen", "price": "cheap"}));
        assert_eq!(wrong.status(), 422);
        assert!(body(&wrong)["detail"].as_str().unwrap().contains("price"));
        let negative = client.post_json("/items", &json!({"name": "pen", "price": -1}));
        assert_eq!(body(&negative)["detail"], "price: must not be negative");
    }
}
