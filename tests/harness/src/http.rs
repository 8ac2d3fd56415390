//! HTTP as the tests and the bench speak it to the host: a loopback client,
//! GETs and POSTs with their status, and the registration body.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};

use crate::{Error, Result};

/// An HTTP client that talks to loopback directly (no proxy from the
/// environment), with a timeout long enough for a 100 MiB transfer.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("an HTTP client with default TLS-less settings")
}

/// `GET url` with `client`: status and body.
pub async fn get(client: &reqwest::Client, url: &str) -> Result<(u16, Bytes)> {
    let failed = |error: reqwest::Error| Error::new(format!("GET {url}: {error}"));
    let answer = client.get(url).send().await.map_err(failed)?;
    let status = answer.status().as_u16();
    Ok((status, answer.bytes().await.map_err(failed)?))
}

/// `GET url`: status and JSON body (`null` if the body is not JSON).
pub async fn get_json(url: &str) -> Result<(u16, Value)> {
    let (status, body) = get(&client(), url).await?;
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

/// `POST url` with a JSON body: status and JSON answer (`null` if the
/// answer is not JSON).
pub async fn post_json(url: &str, body: &Value) -> Result<(u16, Value)> {
    let failed = |error: reqwest::Error| Error::new(format!("POST {url}: {error}"));
    let answer = client().post(url).json(body).send().await.map_err(failed)?;
    let status = answer.status().as_u16();
    let body = answer.bytes().await.map_err(failed)?;
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

/// A registration shaped like the seed guide's `SERVICE_CONFIG`, for a
/// service `name` at `addr` with one endpoint, `GET hello`. Callers change
/// fields with `body["field"] = ...`.
pub fn registration(name: &str, addr: SocketAddr) -> Value {
    json!({
        "name": name,
        "display_name": format!("Service {name}"),
        "description": "a remote service of the tests or the bench",
        "version": "1.0.0",
        "host": addr.ip().to_string(),
        "port": addr.port(),
        "base_path": "/",
        "health_check_url": "/health",
        "metadata": {"author": "host-harness"},
        "tags": ["test"],
        "requires_auth": false,
        "endpoints": [
            {"path": "hello", "method": "GET", "description": "greeting", "is_public": true},
        ],
    })
}
