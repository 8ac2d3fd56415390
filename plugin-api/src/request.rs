use std::borrow::Cow;
use std::str::FromStr;

use serde::de::DeserializeOwned;

use crate::consumer::{CONSUMER_CLAIMS_HEADER, CONSUMER_ID_HEADER};

/// The header through which the host tells a service its request's
/// tenant.
pub const TENANT_HEADER: &str = "x-tenant-id";

/// The tenant of a request that names none: the shared services'.
pub const DEFAULT_TENANT: &str = "default";
use crate::extract::{FromRequest, Json};
use crate::ffi::FfiRequest;
use crate::{Consumer, Error};

/// One request to a plugin, borrowed from the host for the handler's call.
#[derive(Debug)]
pub struct Request<'a> {
    raw: &'a FfiRequest<'a>,
    params: Vec<(&'a str, String)>,
}

impl<'a> Request<'a> {
    pub(crate) fn new(raw: &'a FfiRequest<'a>, params: Vec<(&'a str, String)>) -> Self {
        Self { raw, params }
    }

    /// The HTTP method in upper case.
    pub fn method(&self) -> &str {
        self.raw.method.as_str()
    }

    /// The path relative to the service's mount point, starting with `/`,
    /// still percent-encoded.
    pub fn path(&self) -> &str {
        self.raw.path.as_str()
    }

    /// The raw query string, without `?`.
    pub fn query_string(&self) -> &str {
        self.raw.query.as_str()
    }

    /// The first value of query parameter `name`, decoded.
    pub fn query(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query_string().as_bytes())
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.into_owned())
    }

    /// The value of path parameter `name` (a `{name}` segment of the route),
    /// percent-decoded.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Path parameter `name` parsed as `T`; a value that does not parse is
    /// answered `422` naming the parameter.
    pub fn param_as<T: FromStr>(&self, name: &str) -> Result<T, Error> {
        let raw = self
            .param(name)
            .ok_or_else(|| Error::internal(format!("route has no parameter `{name}`")))?;
        raw.parse().map_err(|_| {
            Error::unprocessable(format!(
                "path parameter `{name}`: `{raw}` is not a valid {}",
                std::any::type_name::<T>()
            ))
        })
    }

    /// The first value of header `name` (case-insensitive) if it is UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.raw
            .headers
            .iter()
            .find(|header| header.name.as_str().eq_ignore_ascii_case(name))
            .and_then(|header| std::str::from_utf8(header.value.as_slice()).ok())
    }

    /// Every header as (lower-case name, raw value), in the order received.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.raw
            .headers
            .iter()
            .map(|header| (header.name.as_str(), header.value.as_slice()))
    }

    /// The whole body.
    pub fn body(&self) -> &[u8] {
        self.raw.body.as_slice()
    }

    /// The body as UTF-8 text, replacing invalid sequences.
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(self.body())
    }

    /// The body parsed as JSON into `T`. Malformed JSON is answered `400`;
    /// JSON of the wrong shape (a missing or mistyped field) `422`, naming
    /// the field. The same as extracting [`Json<T>`](crate::Json).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        self.extract::<Json<T>>().map(|Json(value)| value)
    }

    /// Takes a typed input from the request: [`Json`], [`Query`](crate::Query),
    /// [`Path`](crate::Path), or any [`FromRequest`].
    pub fn extract<T: FromRequest>(&self) -> Result<T, Error> {
        T::from_request(self)
    }

    /// The route's `{name}` parameters, as (name, decoded value).
    pub fn params(&self) -> impl Iterator<Item = (&str, &str)> {
        self.params
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
    }

    /// Who called, if the host authenticated the request: only on a
    /// service that declared `requires_auth`, on a private route (always)
    /// or on a public one when the client sent a valid credential. The
    /// host strips these headers from every client request first, so they
    /// can be trusted; outside the host (in [`crate::testing`]) they are
    /// whatever the test sends.
    pub fn consumer(&self) -> Option<Consumer> {
        Consumer::from_headers(
            self.header(CONSUMER_ID_HEADER),
            self.header(CONSUMER_CLAIMS_HEADER),
        )
    }

    /// The tenant the host resolved for this request (see the host's
    /// `docs/MULTI_TENANT.md`): the `X-Tenant-ID` header, which the host
    /// always sets or removes itself, or [`DEFAULT_TENANT`] without it.
    /// Outside the host (in [`crate::testing`]) it is whatever the test
    /// sends.
    pub fn tenant(&self) -> &str {
        self.header(TENANT_HEADER).unwrap_or(DEFAULT_TENANT)
    }

    /// The client's socket address, e.g. `127.0.0.1:51234`.
    pub fn client_addr(&self) -> &str {
        self.raw.client_addr.as_str()
    }
}
