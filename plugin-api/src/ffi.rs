//! The raw C ABI between the host and a plugin library.
//!
//! Plugin authors never touch this module: [`export_plugin!`](crate::export_plugin)
//! generates the entry point. The host reads it through the loader.
//!
//! The handshake is deliberately dumb: the entry symbol returns a pointer to a
//! static [`PluginDescriptor`] whose first two fields are a `u32` ABI version
//! and the descriptor's size in bytes. The host reads those two words, and
//! only if both match its own does it read the next field, a function
//! returning the [layout fingerprint](layout_fingerprint) of the plugin's copy
//! of these types; only if that matches its own too does it look at anything
//! else. Every type that
//! crosses the boundary is `#[repr(C)]` and built from abi_stable's FFI-safe
//! containers, and every function pointer is `extern "C"` and never unwinds:
//! the SDK catches panics inside the plugin, because a panic cannot be caught
//! on the host's side of the boundary.
//!
//! Ownership rule: whoever allocated a value drops it. The host lends the
//! request ([`FfiRequest`] borrows host memory); the plugin returns the
//! response and the service config by value, and the host copies them into
//! its own types and drops the originals while the library is still loaded.

use std::ffi::c_void;

use std::sync::OnceLock;

use abi_stable::StableAbi;
use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString, RVec};
use abi_stable::type_layout::TypeLayout;

/// The version of this ABI. The host refuses a library whose descriptor
/// carries another number. Bump it on any change to a type in this module:
/// the [layout fingerprint](layout_fingerprint) catches a change nobody
/// bumped it for, but only from version 2 on, and with a vaguer message.
///
/// Version 2 added [`PluginDescriptor::layout_fingerprint`], version 3
/// [`FfiResponse::panic`], version 4 the host context passed to
/// [`PluginDescriptor::create`] ([`FfiInitArgs`], [`FfiHost`]).
pub const ABI_VERSION: u32 = 4;

/// Name of the symbol every plugin library exports, NUL-terminated for `dlsym`.
pub const ENTRY_SYMBOL: &[u8] = b"plugin_api_entry\0";

/// Signature of the entry symbol: returns a pointer to a descriptor with
/// static lifetime inside the library.
pub type EntryFn = unsafe extern "C" fn() -> *const PluginDescriptor;

/// Size of [`PluginDescriptor`] as the host expects it.
pub const DESCRIPTOR_SIZE: u32 = std::mem::size_of::<PluginDescriptor>() as u32;

/// The first two words of every descriptor, whatever its ABI version.
/// The host reads only this until both fields are checked.
///
/// It never grows: a plugin of another version may export nothing more than
/// these two words, so the fingerprint that version 2 added is the
/// descriptor's next field, read only once the version is known to be ours.
#[repr(C)]
#[derive(Debug, Clone, Copy, StableAbi)]
pub struct DescriptorHeader {
    /// [`ABI_VERSION`] of the `plugin-api` the plugin was built with.
    pub abi_version: u32,
    /// `size_of::<PluginDescriptor>()` in the plugin's build.
    pub descriptor_size: u32,
}

/// Everything the host can call in a plugin.
#[repr(C)]
#[derive(Debug, StableAbi)]
pub struct PluginDescriptor {
    /// Must come first: see [`DescriptorHeader`].
    pub header: DescriptorHeader,
    /// Returns [`layout_fingerprint`] as the plugin's build computes it. The
    /// host calls it right after checking the header, and reads no other
    /// field unless the number equals its own. Never unwinds.
    pub layout_fingerprint: extern "C" fn() -> u64,
    /// Returns the service config, or a message if building it panicked.
    pub service_config: extern "C" fn() -> RResult<FfiServiceConfig, RString>,
    /// Creates the plugin's state. Called once per load, before any
    /// request. The arguments are lent for the call; the [`FfiHost`] in
    /// them stays valid until `destroy` returned.
    pub create: extern "C" fn(&FfiInitArgs<'_>) -> RResult<InstancePtr, RString>,
    /// Handles one request. Called concurrently from the plugin's worker
    /// threads; never unwinds (a panic becomes a 500 response).
    pub handle: extern "C" fn(InstancePtr, &FfiRequest<'_>) -> FfiResponse,
    /// Runs the plugin's shutdown hook and frees its state. Called once,
    /// after the last request returned. Returns an error message if the hook
    /// panicked; the state is freed either way.
    pub destroy: extern "C" fn(InstancePtr) -> RResult<(), RString>,
}

/// The layout fingerprint of every type crossing the boundary in this
/// build: [`PluginDescriptor`] and, through its fields and function
/// pointers, the request, response and config types.
///
/// A hash of abi_stable's [`StableAbi`] description of the types (names,
/// sizes, alignments, field names and types), computed once per process
/// and equal in every build of the same types. A host and a plugin whose
/// numbers differ disagree on a layout, even if version and size agree.
pub fn layout_fingerprint() -> u64 {
    static FINGERPRINT: OnceLock<u64> = OnceLock::new();
    *FINGERPRINT.get_or_init(|| layout_fingerprint_of(PluginDescriptor::LAYOUT))
}

/// The fingerprint of any type's layout, computed as [`layout_fingerprint`]
/// computes it for [`PluginDescriptor`]. Test plugins use it to pose as a
/// plugin built against other types.
pub fn layout_fingerprint_of(layout: &'static TypeLayout) -> u64 {
    crate::fingerprint::of(layout)
}

/// Opaque pointer to a plugin's state, created by
/// [`PluginDescriptor::create`] and freed by [`PluginDescriptor::destroy`].
#[repr(transparent)]
#[derive(Debug, Clone, Copy, StableAbi)]
pub struct InstancePtr(pub *mut c_void);

// SAFETY: the pointee is the plugin's state, which the SDK requires to be
// `Send + Sync` (`Plugin: Send + Sync`); the pointer itself is only an address.
unsafe impl Send for InstancePtr {}
// SAFETY: as above.
unsafe impl Sync for InstancePtr {}

/// A service's description, as a plugin declares it.
#[repr(C)]
#[derive(Debug, StableAbi)]
pub struct FfiServiceConfig {
    /// Unique service name, `[a-z0-9][a-z0-9-]*`; the gateway mounts the
    /// plugin under `/api/<name>/`.
    pub name: RString,
    /// Human-readable name.
    pub display_name: RString,
    /// One-paragraph description.
    pub description: RString,
    /// The service's version, free-form (semver recommended).
    pub version: RString,
    /// Path of the health endpoint, relative to the service.
    pub health_check_url: RString,
    /// Free-form key/value metadata.
    pub metadata: RVec<FfiKeyValue>,
    /// Free-form tags.
    pub tags: RVec<RString>,
    /// Whether the service's non-public endpoints require authentication.
    pub requires_auth: bool,
    /// The endpoints the service offers.
    pub endpoints: RVec<FfiEndpoint>,
}

/// One metadata entry.
#[repr(C)]
#[derive(Debug, StableAbi)]
pub struct FfiKeyValue {
    /// The key.
    pub key: RString,
    /// The value.
    pub value: RString,
}

/// One endpoint of a service.
#[repr(C)]
#[derive(Debug, StableAbi)]
pub struct FfiEndpoint {
    /// Path pattern relative to the service, e.g. `/data/{id}`.
    pub path: RString,
    /// HTTP method in upper case.
    pub method: RString,
    /// What the endpoint does.
    pub description: RString,
    /// Whether the endpoint may be called without authentication.
    pub is_public: bool,
}

/// A request, lent by the host for the duration of one `handle` call.
#[repr(C)]
#[derive(Debug, StableAbi)]
pub struct FfiRequest<'a> {
    /// HTTP method in upper case.
    pub method: RStr<'a>,
    /// Path relative to `/api/<name>`, always starting with `/`, still
    /// percent-encoded.
    pub path: RStr<'a>,
    /// The raw query string without `?`, empty if none.
    pub query: RStr<'a>,
    /// Request headers, names in lower case.
    pub headers: RSlice<'a, FfiHeaderRef<'a>>,
    /// The whole request body.
    pub body: RSlice<'a, u8>,
    /// The client's socket address, e.g. `127.0.0.1:51234`.
    pub client_addr: RStr<'a>,
}

/// A borrowed request header.
#[repr(C)]
#[derive(Debug, StableAbi)]
pub struct FfiHeaderRef<'a> {
    /// Lower-case header name.
    pub name: RStr<'a>,
    /// Raw header value.
    pub value: RSlice<'a, u8>,
}

/// A response, owned by the plugin until the host has copied it.
#[repr(C)]
#[derive(Debug, StableAbi)]
pub struct FfiResponse {
    /// HTTP status code.
    pub status: u16,
    /// Response headers.
    pub headers: RVec<FfiHeader>,
    /// The whole response body.
    pub body: RVec<u8>,
    /// If the handler panicked: the panic's message and where it was
    /// raised, for the host's log (the response is then the SDK's 500). The
    /// SDK keeps the plugin's own panic hook from printing it, so that the
    /// host decides what reaches its log, and how often.
    pub panic: ROption<RString>,
}

/// An owned response header.
#[repr(C)]
#[derive(Debug, StableAbi)]
pub struct FfiHeader {
    /// Header name.
    pub name: RString,
    /// Raw header value.
    pub value: RVec<u8>,
}

/// What the host hands a plugin's `create`: who it is, its settings, its
/// data directory, and the host's callbacks. The strings are lent for the
/// call (the SDK copies them).
#[repr(C)]
#[derive(Debug, StableAbi)]
pub struct FfiInitArgs<'a> {
    /// The service name the plugin declared.
    pub name: RStr<'a>,
    /// The plugin's settings as a JSON object (`{}` if none).
    pub settings_json: RStr<'a>,
    /// The plugin's data directory, created by the host.
    pub data_dir: RStr<'a>,
    /// The host's callbacks.
    pub host: FfiHost,
}

/// Opaque pointer to the host's state for one loaded plugin; only the
/// host's callbacks read it.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, StableAbi)]
pub struct HostPtr(pub *const c_void);

// SAFETY: the pointee is host state built to be shared between threads
// (every callback may be called from any plugin thread); the pointer
// itself is only an address.
unsafe impl Send for HostPtr {}
// SAFETY: as above.
unsafe impl Sync for HostPtr {}

/// The host's side of one loaded plugin: valid from `create` until
/// `destroy` returned. Every callback may be called from any thread the
/// host runs plugin code on, and never unwinds.
#[repr(C)]
#[derive(Debug, Clone, Copy, StableAbi)]
pub struct FfiHost {
    /// Passed back to every callback.
    pub data: HostPtr,
    /// The callbacks, a `static` of the host.
    pub vtable: &'static FfiHostVtable,
}

/// Log levels as the callbacks take them: `log`'s numbering.
pub mod level {
    /// Error.
    pub const ERROR: u8 = 1;
    /// Warning.
    pub const WARN: u8 = 2;
    /// Information.
    pub const INFO: u8 = 3;
    /// Debugging.
    pub const DEBUG: u8 = 4;
    /// Tracing.
    pub const TRACE: u8 = 5;
}

/// What the host offers a plugin.
#[repr(C)]
#[derive(Debug, StableAbi)]
pub struct FfiHostVtable {
    /// Whether an event of this [`level`] would be logged.
    pub log_enabled: extern "C" fn(HostPtr, u8) -> bool,
    /// Logs `message` at [`level`]; the second argument is the event's
    /// target (the plugin's module path).
    pub log: extern "C" fn(HostPtr, u8, RStr<'_>, RStr<'_>),
    /// Calls another service and blocks until its answer, a refusal or the
    /// timeout. The response is allocated by the host: the plugin drops it.
    pub call: extern "C" fn(HostPtr, &FfiCall<'_>) -> FfiResponse,
    /// Runs a task on a thread the host owns. A refused task is discarded
    /// (its `discard` called) before this returns the reason.
    pub spawn: extern "C" fn(HostPtr, FfiTask) -> RResult<(), RString>,
    /// Waits at most the given milliseconds for the host's stop signal
    /// (the plugin is being unloaded); returns whether it was given.
    pub wait_for_stop: extern "C" fn(HostPtr, u64) -> bool,
}

/// A call to another service, lent for the duration of the callback.
#[repr(C)]
#[derive(Debug, StableAbi)]
pub struct FfiCall<'a> {
    /// The service's name.
    pub service: RStr<'a>,
    /// HTTP method in upper case.
    pub method: RStr<'a>,
    /// Path below the service's mount point, starting with `/`.
    pub path: RStr<'a>,
    /// Raw query string without `?`.
    pub query: RStr<'a>,
    /// Request headers.
    pub headers: RSlice<'a, FfiHeaderRef<'a>>,
    /// The whole body.
    pub body: RSlice<'a, u8>,
    /// Longest wait in milliseconds; `0` for the host's request timeout.
    pub timeout_ms: u64,
}

/// Opaque pointer to a plugin's boxed task.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, StableAbi)]
pub struct TaskPtr(pub *mut c_void);

// SAFETY: the pointee is a task the SDK requires to be `Send`; the pointer
// itself is only an address.
unsafe impl Send for TaskPtr {}

/// A task of the plugin's, owned by the host until it calls exactly one of
/// `run` or `discard`.
#[repr(C)]
#[derive(Debug, StableAbi)]
pub struct FfiTask {
    /// The task.
    pub data: TaskPtr,
    /// Runs the task and frees it; returns its panic message if it
    /// panicked. Never unwinds.
    pub run: extern "C" fn(TaskPtr) -> ROption<RString>,
    /// Frees the task without running it. Never unwinds.
    pub discard: extern "C" fn(TaskPtr),
}
