//! What the end-to-end tests (`tests/`) and the benchmarks (`bench/`)
//! share: the real `plugin-host` process on ephemeral loopback ports, its
//! log lines, its memory, plugin installs, and the registry's JSON.
//!
//! The harness never decides which binary runs: the caller hands it a
//! [`Command`](std::process::Command) (the tests a fresh debug build from
//! [`workspace`], the bench a release build behind `taskset`).
//!
//! ```no_run
//! # async fn example() -> Result<(), host_harness::Error> {
//! use host_harness::{http, workspace};
//! let host = workspace::host_builder().start().await?;
//! host.install_plugin(workspace::plugin_library("hello"), "libhello.so")?;
//! host.wait_for_log("plugin mounted").await?;
//! let (status, _) = http::get_json(&host.gateway_url("/api/hello/hello")).await?;
//! assert_eq!(status, 200);
//! # Ok(())
//! # }
//! ```
//!
//! Fallible calls return [`Error`], whose `Debug` is its plain message, so
//! a test's `.unwrap()` prints the host's logs readably and the bench can
//! turn it into its own per-scenario error string.

mod error;
pub mod etcd;
mod host;
pub mod http;
mod process;
mod require;
pub mod workspace;

pub use error::{Error, Result};
pub use host::{Dirs, Host, HostBuilder, Refused, field};
pub use process::{Proc, status_kib};
pub use require::{REQUIRE_ALL, require_or_skip};

use std::time::Duration;

/// How long a wait for something the host should do at once (listen,
/// mount, log) lasts before it is a failure.
pub const PATIENCE: Duration = Duration::from_secs(30);
