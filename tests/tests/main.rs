//! One test binary for every end-to-end test (one link, one run).

mod gateway;
mod lifecycle;
mod plugins;
mod proxy;
mod python_guide;
mod registry;
