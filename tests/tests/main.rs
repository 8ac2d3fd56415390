//! One test binary for every end-to-end test (one link, one run).

mod edge;
mod gateway;
mod liveness;
mod plugins;
mod proxy;
mod python_guide;
mod registry;
mod store;
