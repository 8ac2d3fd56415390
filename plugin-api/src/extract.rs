//! Typed extractors, in the spirit of axum's: a handler asks the request
//! for its inputs as types, and a value of the wrong shape is answered
//! `422` naming the field (malformed JSON `400`).
//!
//! ```
//! use plugin_api::{Json, Path, Query, Request, Response, Result};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Page { limit: Option<u32> }
//! #[derive(Deserialize)]
//! struct ItemId { id: u64 }
//! #[derive(Deserialize)]
//! struct NewItem { name: String, price: f64 }
//!
//! fn update(_: &(), req: &Request) -> Result<Response> {
//!     let Path(ItemId { id }) = req.extract()?;
//!     let Query(page): Query<Page> = req.extract()?;
//!     let Json(item): Json<NewItem> = req.extract()?;
//!     Response::json(&(id, page.limit, item.name, item.price))
//! }
//! ```

use serde::de::DeserializeOwned;

use crate::{Error, Request, Result};

/// Something a handler can take from a request with [`Request::extract`].
pub trait FromRequest: Sized {
    /// Takes it from `request`, or answers why not.
    fn from_request(request: &Request<'_>) -> Result<Self>;
}

/// The body parsed as JSON into `T`: malformed JSON is `400`, a missing or
/// mistyped field `422` naming it (`body field `price``).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Json<T>(pub T);

/// The query string parsed into `T` (a struct of its parameters; use
/// `Option` for optional ones): a missing or mistyped one is `422` naming
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query<T>(pub T);

/// The route's `{name}` parameters parsed into `T`, a struct with a field
/// per parameter: a value that does not parse is `422` naming it. For one
/// parameter, [`Request::param_as`] is shorter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path<T>(pub T);

impl<T: DeserializeOwned> FromRequest for Json<T> {
    fn from_request(request: &Request<'_>) -> Result<Self> {
        use serde_json::error::Category;
        let mut deserializer = serde_json::Deserializer::from_slice(request.body());
        let parsed = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
            match error.inner().classify() {
                Category::Data => Error::unprocessable(format!(
                    "{}: {}",
                    field("body field", &error.path().to_string()),
                    error.inner()
                )),
                Category::Syntax | Category::Eof | Category::Io => {
                    Error::bad_request(format!("malformed JSON body: {}", error.inner()))
                }
            }
        })?;
        deserializer
            .end()
            .map_err(|error| Error::bad_request(format!("malformed JSON body: {error}")))?;
        Ok(Json(parsed))
    }
}

impl<T: DeserializeOwned> FromRequest for Query<T> {
    fn from_request(request: &Request<'_>) -> Result<Self> {
        from_form(request.query_string().as_bytes(), "query parameter").map(Query)
    }
}

impl<T: DeserializeOwned> FromRequest for Path<T> {
    fn from_request(request: &Request<'_>) -> Result<Self> {
        let mut form = form_urlencoded::Serializer::new(String::new());
        for (name, value) in request.params() {
            form.append_pair(name, value);
        }
        from_form(form.finish().as_bytes(), "path parameter").map(Path)
    }
}

fn from_form<T: DeserializeOwned>(form: &[u8], what: &str) -> Result<T> {
    let deserializer = serde_urlencoded::Deserializer::new(form_urlencoded::parse(form));
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        Error::unprocessable(format!(
            "{}: {}",
            field(what, &error.path().to_string()),
            error.inner()
        ))
    })
}

/// `what `path`` for a field, `what`s for the whole value (where serde
/// names the field in its message, e.g. a missing one).
fn field(what: &str, path: &str) -> String {
    if path == "." {
        format!("{what}s")
    } else {
        format!("{what} `{path}`")
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use crate::testing::TestClient;
    use crate::{Context, Plugin, Request, Response, Router, ServiceConfig};

    use super::*;

    #[derive(Deserialize)]
    struct Body {
        name: String,
        price: f64,
    }

    #[derive(Deserialize)]
    struct Page {
        limit: u32,
    }

    #[derive(Deserialize)]
    struct Id {
        id: u64,
    }

    struct Shop;

    impl Plugin for Shop {
        fn config() -> ServiceConfig {
            ServiceConfig::new("shop")
        }
        fn init(_: &Context) -> Result<Self> {
            Ok(Shop)
        }
        fn router() -> Router<Self> {
            Router::new().post("/items/{id}", "create", |_: &Shop, req: &Request| {
                let Path(Id { id }) = req.extract()?;
                let Query(Page { limit }) = req.extract()?;
                let Json(body): Json<Body> = req.extract()?;
                Ok(Response::text(format!(
                    "{id} {limit} {} {}",
                    body.name, body.price
                )))
            })
        }
    }

    fn answer(target: &str, body: &str) -> (u16, String) {
        let client = TestClient::<Shop>::new().unwrap();
        let response = client.request("POST", target, &[], body.as_bytes());
        (
            response.status(),
            String::from_utf8_lossy(response.body_bytes()).into_owned(),
        )
    }

    #[test]
    fn extractors_parse_or_name_the_field() {
        assert_eq!(
            answer("/items/7?limit=3", r#"{"name":"a","price":1.5}"#),
            (200, "7 3 a 1.5".to_owned())
        );
        let (status, body) = answer("/items/x?limit=3", r#"{"name":"a","price":1.5}"#);
        assert_eq!(status, 422);
        assert!(body.contains("path parameter `id`"), "{body}");
        let (status, body) = answer("/items/7?limit=many", r#"{"name":"a","price":1.5}"#);
        assert_eq!(status, 422);
        assert!(body.contains("query parameter `limit`"), "{body}");
        let (status, body) = answer("/items/7?limit=3", r#"{"name":"a","price":"cheap"}"#);
        assert_eq!(status, 422);
        assert!(body.contains("body field `price`"), "{body}");
        let (status, body) = answer("/items/7?limit=3", r#"{"name":"a"}"#);
        assert_eq!(status, 422);
        assert!(body.contains("missing field `price`"), "{body}");
        let (status, _) = answer("/items/7?limit=3", r#"{"name":"#);
        assert_eq!(status, 400);
    }
}
