//! One test binary for every end-to-end test (one link, one run).

#![forbid(unsafe_code)]

mod abi;
mod admission;
mod auth;
mod cluster;
mod config;
mod console;
mod context;
mod edge;
mod examples;
mod gateway;
mod hardening;
mod instances;
mod lifecycle;
mod liveness;
mod observability;
mod plugin_files;
mod plugin_limits;
mod plugins;
mod proxy;
mod python_guide;
mod registry;
mod registry_scale;
mod registry_tokens;
mod scaffold;
mod store;
mod tenants;
mod versions;
mod websocket;
