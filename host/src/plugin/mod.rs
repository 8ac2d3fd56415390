//! In-process plugins: from a library file to threads that answer
//! requests.
//!
//! [`file_checks`] decides which files are trusted enough to read;
//! [`loader`] opens a checked private copy of a file and is the only code
//! that holds pointers into a library; [`runtime`] owns the threads a
//! plugin's code runs on and is the only way a plugin ends; [`entry`] runs
//! the calls a load or unload waits for (`dlopen`, `config`, `init`, the
//! shutdown hook) on threads of their own with a deadline; [`context`] is
//! the host's side of a plugin's context (logs, calls, background tasks,
//! the stop signal); [`message`] is what the gateway and a plugin exchange. Which file is mounted under
//! which name is the plugin manager's (`crate::plugin_manager`), one layer
//! up, because it writes to the service table that routes to these
//! runtimes.

pub mod context;
pub mod entry;
pub mod file_checks;
// The one module of the host allowed `unsafe`: opening libraries and
// calling through their pointers cannot be done without it.
#[allow(unsafe_code)]
pub mod loader;
pub mod message;
pub mod runtime;

pub use context::{CallChain, HostContext, HostSetup, MAX_BACKGROUND_TASKS, ServiceCalls};
pub use entry::EntryError;
pub use file_checks::FileChecks;
pub use loader::{Candidate, CloseReport, LoadError, PluginLibrary};
pub use message::{PluginRequest, PluginResponse};
pub use runtime::{CallError, PluginRuntime, RuntimeLimits, ShutdownReport, ThreadBudget};
