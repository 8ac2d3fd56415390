//! Shared pieces of the benchmark suite: parsing `wrk --latency` output and
//! the little statistics the report needs.
//!
//! The binaries are `bench-upstream` (the remote service proxied to),
//! `bench-native` (the native baseline of the hello plugin) and
//! `bench-runner` (the driver behind `bench/run`).

pub mod stats;
pub mod wrk;

/// The JSON the hello plugin's `GET /hello?name=<name>` answers, and so the
/// native baseline too: `{"message":"Hello, <name>!"}`.
pub fn hello_message(name: &str) -> serde_json::Value {
    serde_json::json!({ "message": format!("Hello, {name}!") })
}

/// Size of the large body `bench-upstream` serves at `/large`: 1 MiB.
pub const LARGE_BODY_BYTES: usize = 1024 * 1024;

/// The small JSON document `bench-upstream` serves at `/small`.
pub const SMALL_BODY: &str = r#"{"id":42,"name":"bench","tags":["a","b","c"],"ok":true}"#;
