//! Test plugin `tls`: a `thread_local!` whose value has a destructor, and a
//! call to `std::thread::current()`, on every request. Both register
//! per-thread destructors inside the library, so the host can unload it only
//! once every thread that ran its code has exited.
//!
//! `GET /` answers `{"thread": <thread name>, "count": <requests this thread served>}`.

#![forbid(unsafe_code)]

use std::cell::Cell;

use plugin_api::{Plugin, Request, Response, Result, Router, ServiceConfig, export_plugin};

struct Tls;

/// Per-thread state with a real destructor.
struct PerThread {
    count: Cell<u64>,
    /// Heap memory owned by this library, freed by the destructor.
    scratch: Vec<u8>,
}

impl Drop for PerThread {
    fn drop(&mut self) {
        std::hint::black_box((self.count.get(), self.scratch.len()));
    }
}

thread_local! {
    static PER_THREAD: PerThread = PerThread { count: Cell::new(0), scratch: vec![0; 64] };
}

impl Plugin for Tls {
    fn config() -> ServiceConfig {
        ServiceConfig::new("tls").version(env!("CARGO_PKG_VERSION"))
    }

    fn init(_ctx: &plugin_api::Context) -> Result<Self> {
        Ok(Tls)
    }

    fn router() -> Router<Self> {
        Router::new().get("/", "Thread name and per-thread request count", root)
    }
}

fn root(_: &Tls, _: &Request) -> Result<Response> {
    // This library has its own copy of std, which never saw the host name
    // its threads: `name()` is `None` there, so fall back to the OS name.
    let thread = std::thread::current();
    let name = thread.name().map(str::to_owned).or_else(|| {
        let comm = std::fs::read_to_string("/proc/thread-self/comm").ok()?;
        Some(comm.trim_end().to_owned())
    });
    let count = PER_THREAD.with(|state| {
        state.count.set(state.count.get() + 1);
        state.count.get()
    });
    Response::json(&serde_json::json!({ "thread": name, "count": count }))
}

export_plugin!(Tls);
