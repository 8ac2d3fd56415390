//! Test plugin `background`: `init` starts a thread of the plugin's own,
//! which counts ticks until `shutdown` stops and joins it, as the SDK asks.
//! `GET /` answers `ticks: N`; N grows while the plugin is loaded.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use plugin_api::{Plugin, Request, Response, Result, Router, ServiceConfig, export_plugin};

struct Background {
    ticks: Arc<AtomicU64>,
    /// Dropping the sender stops the thread.
    ticker: Mutex<Option<(Sender<()>, JoinHandle<()>)>>,
}

impl Plugin for Background {
    fn config() -> ServiceConfig {
        ServiceConfig::new("background").version(env!("CARGO_PKG_VERSION"))
    }

    fn init(_ctx: &plugin_api::Context) -> Result<Self> {
        let ticks = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = mpsc::channel::<()>();
        let counter = ticks.clone();
        let handle = std::thread::spawn(move || {
            while let Err(RecvTimeoutError::Timeout) =
                stopped.recv_timeout(Duration::from_millis(5))
            {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(Background {
            ticks,
            ticker: Mutex::new(Some((stop, handle))),
        })
    }

    fn router() -> Router<Self> {
        Router::new().get("/", "Ticks counted so far", ticks)
    }

    fn shutdown(&self) {
        if let Some((stop, handle)) = self.ticker.lock().unwrap().take() {
            drop(stop);
            handle.join().unwrap();
        }
    }
}

fn ticks(plugin: &Background, _: &Request) -> Result<Response> {
    Ok(Response::text(format!(
        "ticks: {}",
        plugin.ticks.load(Ordering::Relaxed)
    )))
}

export_plugin!(Background);
