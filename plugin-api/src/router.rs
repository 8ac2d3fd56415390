use std::fmt;

use crate::ffi::FfiRequest;
use crate::{EndpointConfig, Error, Request, Response, Result};

/// The HTTP methods a route can match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `GET`
    Get,
    /// `POST`
    Post,
    /// `PUT`
    Put,
    /// `PATCH`
    Patch,
    /// `DELETE`
    Delete,
}

impl Method {
    /// The method's name in upper case.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request handler: any `Fn(&State, &Request) -> Result<Response>`.
pub trait Handler<S>: Send + Sync + 'static {
    /// Handles one request.
    fn call(&self, state: &S, request: &Request<'_>) -> Result<Response>;
}

impl<S, F> Handler<S> for F
where
    F: Fn(&S, &Request<'_>) -> Result<Response> + Send + Sync + 'static,
{
    fn call(&self, state: &S, request: &Request<'_>) -> Result<Response> {
        self(state, request)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

/// Path parameters: name in the pattern, decoded value.
type Params<'r> = Vec<(&'r str, String)>;

struct Route<S> {
    method: Method,
    path: String,
    segments: Vec<Segment>,
    description: String,
    is_public: bool,
    handler: Box<dyn Handler<S>>,
}

impl<S> Route<S> {
    /// The decoded parameters if `path` matches this route's pattern.
    fn matches(&self, path: &[&str]) -> Option<Params<'_>> {
        if path.len() != self.segments.len() {
            return None;
        }
        let mut params = Vec::new();
        for (segment, part) in self.segments.iter().zip(path) {
            match segment {
                Segment::Literal(literal) if literal == part => {}
                Segment::Literal(_) => return None,
                Segment::Param(name) => {
                    let value = percent_encoding::percent_decode_str(part)
                        .decode_utf8()
                        .ok()?
                        .into_owned();
                    params.push((name.as_str(), value));
                }
            }
        }
        Some(params)
    }

    fn literal_count(&self) -> usize {
        self.segments
            .iter()
            .filter(|segment| matches!(segment, Segment::Literal(_)))
            .count()
    }
}

/// Maps method + path pattern to handlers.
///
/// Patterns are relative to the service's mount point: `/` is
/// `/api/<name>/`, `/items/{id}` matches one segment as parameter `id`.
/// A trailing slash does not matter. Where several patterns match, the one
/// with more literal segments wins. A path that matches no pattern is
/// answered `404`, a path matched with another method `405` with `Allow`.
pub struct Router<S> {
    routes: Vec<Route<S>>,
}

impl<S> fmt::Debug for Router<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.routes.iter().map(|r| (r.method, &r.path)))
            .finish()
    }
}

impl<S: 'static> Default for Router<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: 'static> Router<S> {
    /// A router with no routes.
    pub fn new() -> Self {
        Self { routes: Vec::new() }
    }

    /// Adds a route. `description` is what the registry lists for it.
    ///
    /// # Panics
    /// If `path` does not start with `/`, has an empty or unclosed `{}`
    /// parameter, or the same method and pattern were added before: these
    /// are programming errors, and the panic refuses the plugin's load.
    pub fn route(
        mut self,
        method: Method,
        path: &str,
        description: &str,
        handler: impl Handler<S>,
    ) -> Self {
        assert!(path.starts_with('/'), "route `{path}` must start with `/`");
        let segments: Vec<Segment> = split_path(path)
            .map(|part| match part.strip_prefix('{') {
                Some(rest) => {
                    let name = rest
                        .strip_suffix('}')
                        .filter(|name| !name.is_empty())
                        .unwrap_or_else(|| panic!("route `{path}`: bad parameter `{part}`"));
                    Segment::Param(name.to_owned())
                }
                None => Segment::Literal(part.to_owned()),
            })
            .collect();
        assert!(
            !self
                .routes
                .iter()
                .any(|r| r.method == method && same_shape(&r.segments, &segments)),
            "route {method} `{path}` added twice"
        );
        self.routes.push(Route {
            method,
            path: path.to_owned(),
            segments,
            description: description.to_owned(),
            is_public: true,
            handler: Box::new(handler),
        });
        self
    }

    /// Adds a `GET` route.
    pub fn get(self, path: &str, description: &str, handler: impl Handler<S>) -> Self {
        self.route(Method::Get, path, description, handler)
    }

    /// Adds a `POST` route.
    pub fn post(self, path: &str, description: &str, handler: impl Handler<S>) -> Self {
        self.route(Method::Post, path, description, handler)
    }

    /// Adds a `PUT` route.
    pub fn put(self, path: &str, description: &str, handler: impl Handler<S>) -> Self {
        self.route(Method::Put, path, description, handler)
    }

    /// Adds a `PATCH` route.
    pub fn patch(self, path: &str, description: &str, handler: impl Handler<S>) -> Self {
        self.route(Method::Patch, path, description, handler)
    }

    /// Adds a `DELETE` route.
    pub fn delete(self, path: &str, description: &str, handler: impl Handler<S>) -> Self {
        self.route(Method::Delete, path, description, handler)
    }

    /// Marks the route added last as not public: it requires authentication
    /// when the service's config says `requires_auth`.
    ///
    /// # Panics
    /// If no route was added yet.
    pub fn private(mut self) -> Self {
        self.routes
            .last_mut()
            .expect("`private()` follows a route")
            .is_public = false;
        self
    }

    /// The routes as the registry lists them.
    pub fn endpoints(&self) -> impl Iterator<Item = EndpointConfig> + '_ {
        self.routes.iter().map(|route| EndpointConfig {
            path: route.path.clone(),
            method: route.method.as_str().to_owned(),
            description: route.description.clone(),
            is_public: route.is_public,
        })
    }

    /// Calls the handler matching `request`, or answers 404 / 405.
    pub(crate) fn dispatch(&self, state: &S, request: &FfiRequest<'_>) -> Result<Response> {
        let method = request.method.as_str();
        // HEAD is GET without the body (RFC 9110 9.3.2); the server drops it.
        let wanted = if method == "HEAD" { "GET" } else { method };
        let path: Vec<&str> = split_path(request.path.as_str()).collect();
        let mut best: Option<(&Route<S>, Params<'_>)> = None;
        let mut allowed: Vec<&'static str> = Vec::new();
        for route in &self.routes {
            let Some(params) = route.matches(&path) else {
                continue;
            };
            if route.method.as_str() != wanted {
                allowed.push(route.method.as_str());
                continue;
            }
            if best
                .as_ref()
                .is_none_or(|(b, _)| route.literal_count() > b.literal_count())
            {
                best = Some((route, params));
            }
        }
        match best {
            Some((route, params)) => {
                let request = Request::new(request, params);
                route.handler.call(state, &request)
            }
            None if !allowed.is_empty() => {
                if allowed.contains(&"GET") {
                    allowed.push("HEAD");
                }
                allowed.push("OPTIONS");
                allowed.sort_unstable();
                allowed.dedup();
                let allow = allowed.join(", ");
                if method == "OPTIONS" {
                    return Ok(Response::new(204).header("allow", allow));
                }
                Ok(Error::new(
                    405,
                    format!("method {method} not allowed on {}", request.path.as_str()),
                )
                .into_response()
                .header("allow", allow))
            }
            None => Err(Error::not_found(format!(
                "no route for {method} {}",
                request.path.as_str()
            ))),
        }
    }
}

/// Whether two patterns match the same paths, whatever their parameters' names.
fn same_shape(a: &[Segment], b: &[Segment]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|pair| match pair {
            (Segment::Literal(x), Segment::Literal(y)) => x == y,
            (Segment::Param(_), Segment::Param(_)) => true,
            _ => false,
        })
}

fn split_path(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|part| !part.is_empty())
}

#[cfg(test)]
mod tests {
    use abi_stable::std_types::{RSlice, RStr};

    use super::*;

    fn request<'a>(method: &'a str, path: &'a str) -> FfiRequest<'a> {
        FfiRequest {
            method: RStr::from_str(method),
            path: RStr::from_str(path),
            query: RStr::from_str(""),
            headers: RSlice::from_slice(&[]),
            body: RSlice::from_slice(&[]),
            client_addr: RStr::from_str("127.0.0.1:1"),
        }
    }

    fn router() -> Router<()> {
        Router::new()
            .get("/", "root", |_: &(), _: &Request<'_>| {
                Ok(Response::text("root"))
            })
            .get("/items/{id}", "one", |_: &(), r: &Request<'_>| {
                Ok(Response::text(format!("id={}", r.param("id").unwrap())))
            })
            .get("/items/new", "form", |_: &(), _: &Request<'_>| {
                Ok(Response::text("form"))
            })
            .delete("/items/{id}", "delete", |_: &(), _: &Request<'_>| {
                Ok(Response::new(204))
            })
    }

    fn body(response: Result<Response>) -> String {
        let response = response.unwrap_or_else(Error::into_response);
        String::from_utf8(response.body_bytes().to_vec()).unwrap()
    }

    #[test]
    fn matches_literal_and_params_with_trailing_slash() {
        let router = router();
        assert_eq!(body(router.dispatch(&(), &request("GET", "/"))), "root");
        assert_eq!(body(router.dispatch(&(), &request("GET", ""))), "root");
        assert_eq!(
            body(router.dispatch(&(), &request("GET", "/items/a%20b/"))),
            "id=a b"
        );
    }

    #[test]
    fn literal_beats_parameter_whatever_the_order() {
        let router = router();
        assert_eq!(
            body(router.dispatch(&(), &request("GET", "/items/new"))),
            "form"
        );
    }

    #[test]
    fn unknown_path_is_404_and_wrong_method_is_405_with_allow() {
        let router = router();
        let missing = router.dispatch(&(), &request("GET", "/nope")).unwrap_err();
        assert_eq!(missing.status(), 404);
        let wrong = router.dispatch(&(), &request("POST", "/items/1")).unwrap();
        assert_eq!(wrong.status(), 405);
        assert_eq!(
            wrong.headers(),
            &[
                ("content-type".to_owned(), b"application/json".to_vec()),
                ("allow".to_owned(), b"DELETE, GET, HEAD, OPTIONS".to_vec())
            ]
        );
    }

    #[test]
    fn head_is_get_and_options_lists_the_methods() {
        let router = router();
        assert_eq!(
            body(router.dispatch(&(), &request("HEAD", "/items/7"))),
            "id=7"
        );
        let options = router
            .dispatch(&(), &request("OPTIONS", "/items/7"))
            .unwrap();
        assert_eq!(options.status(), 204);
        assert_eq!(
            options.headers(),
            &[("allow".to_owned(), b"DELETE, GET, HEAD, OPTIONS".to_vec())]
        );
    }

    #[test]
    #[should_panic(expected = "added twice")]
    fn duplicate_route_panics() {
        let _ = router().get("/items/{other}", "dup", |_: &(), _: &Request<'_>| {
            Ok(Response::new(200))
        });
    }
}
