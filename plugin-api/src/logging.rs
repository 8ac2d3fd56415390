//! The `log` crate's logger of a plugin library: events go to the host's
//! `tracing` (with `plugin=<name>` and the host's level filter), or, in a
//! [`TestClient`](crate::testing::TestClient), to its captured lines.
//!
//! The logger and the host it forwards to are `static`s of this library's
//! copy of the SDK: each load is a fresh copy, and they are unmapped with
//! it, after the host joined every thread that could log.

use std::cell::RefCell;
use std::sync::{Arc, Once, OnceLock};

use abi_stable::std_types::RStr;
use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::ffi::{FfiHost, level};
use crate::testing::Mock;

static HOST: OnceLock<FfiHost> = OnceLock::new();

thread_local! {
    /// The mock context of the test client calling on this thread. Only
    /// tests touch it; in a loaded plugin [`HOST`] is set and it is never
    /// read, so it registers nothing on the host's threads.
    static MOCK: RefCell<Option<Arc<Mock>>> = const { RefCell::new(None) };
}

struct Bridge;

static BRIDGE: Bridge = Bridge;

fn ffi_level(level: Level) -> u8 {
    match level {
        Level::Error => level::ERROR,
        Level::Warn => level::WARN,
        Level::Info => level::INFO,
        Level::Debug => level::DEBUG,
        Level::Trace => level::TRACE,
    }
}

impl Log for Bridge {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        match HOST.get() {
            Some(host) => (host.vtable.log_enabled)(host.data, ffi_level(metadata.level())),
            None => true,
        }
    }

    fn log(&self, record: &Record<'_>) {
        let message = record.args().to_string();
        if let Some(host) = HOST.get() {
            (host.vtable.log)(
                host.data,
                ffi_level(record.level()),
                RStr::from_str(record.target()),
                RStr::from_str(&message),
            );
            return;
        }
        MOCK.with_borrow(|mock| {
            if let Some(mock) = mock {
                mock.log(record.level(), record.target(), message);
            }
        });
    }

    fn flush(&self) {}
}

fn install() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Fails only if the plugin installed a logger of its own first,
        // which then keeps its events.
        let _ = log::set_logger(&BRIDGE);
    });
}

/// Forwards this library's `log` events to `host`, filtered at the host's
/// most verbose enabled level. Called at `create`.
pub(crate) fn to_host(host: FfiHost) {
    let _ = HOST.set(host);
    install();
    let enabled = |wanted| (host.vtable.log_enabled)(host.data, wanted);
    let max = [
        (level::TRACE, LevelFilter::Trace),
        (level::DEBUG, LevelFilter::Debug),
        (level::INFO, LevelFilter::Info),
        (level::WARN, LevelFilter::Warn),
        (level::ERROR, LevelFilter::Error),
    ]
    .into_iter()
    .find(|(wanted, _)| enabled(*wanted))
    .map_or(LevelFilter::Off, |(_, filter)| filter);
    log::set_max_level(max);
}

/// Captures this thread's `log` events into `mock` while `f` runs.
pub(crate) fn captured<R>(mock: &Arc<Mock>, f: impl FnOnce() -> R) -> R {
    install();
    log::set_max_level(LevelFilter::Trace);
    let previous = MOCK.replace(Some(mock.clone()));
    let result = f();
    MOCK.set(previous);
    result
}
