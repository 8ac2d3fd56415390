//! The loader: from a file in the plugins directory to an open library whose
//! ABI and config were checked. The only module with `unsafe` code.
//!
//! It never `dlopen`s the watched file itself. It opens the file once,
//! after the ownership and permission checks of [`super::file_checks`] (on
//! the descriptor it then reads from), reads it, checks the ELF header,
//! writes a private copy at a unique path (so `dlopen` can never hand back
//! a cached older library, and a `cp` over the watched file cannot touch
//! mapped code), opens the copy, checks the ABI version and
//! descriptor size, then the layout fingerprint, before reading anything
//! else, and copies the service config into host-owned memory. Plugin code
//! it runs (the initializers `dlopen` runs, the entry point, the
//! fingerprint and the config) runs on threads of its own with a deadline
//! ([`super::entry`]): one that returns in time has ended before `open`
//! returns, so no host thread keeps plugin thread-locals alive; one that
//! does not leaves its library loaded.
//!
//! [`PluginLibrary`] is the only owner of the function pointers into a
//! library; it closes the library only in [`PluginLibrary::close`], which
//! consumes it.

use std::fs::File;
use std::io::Read;
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use abi_stable::std_types::{RErr, RNone, ROk, RResult, RSlice, RStr, RString};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use bytes::Bytes;
use plugin_api::ffi::{
    ABI_VERSION, DESCRIPTOR_SIZE, DescriptorHeader, ENTRY_SYMBOL, EntryFn, FfiCall, FfiHeader,
    FfiHeaderRef, FfiHost, FfiHostVtable, FfiInitArgs, FfiRequest, FfiResponse, FfiServiceConfig,
    FfiTask, HostPtr, InstancePtr, layout_fingerprint,
};

use super::context::HostContext;
use super::entry::{EntryError, run_bounded};
use super::file_checks::{self, FileChecks, OpenError, Untrusted};
use super::message::{PluginRequest, PluginResponse};
use crate::http::{ApiError, Escaped, error_chain};
use crate::service::{self, Endpoint, ServiceInfo};

/// Why a plugin file was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read or copied.
    #[error("could not read or copy the file: {0}")]
    Io(#[from] std::io::Error),
    /// The file (or its directory, or a symlink's target) may be written by
    /// someone the host does not trust.
    #[error(transparent)]
    Untrusted(#[from] Untrusted),
    /// The file is a symlink, and what it points to was refused: the
    /// message names the file that was really read.
    #[error("symlink to {}: {source}", Escaped(&target.to_string_lossy()))]
    LinkTarget {
        /// The resolved target.
        target: PathBuf,
        /// Why it was refused.
        source: Box<LoadError>,
    },
    /// Larger than any plugin library should be; not read.
    #[error(
        "file is {size} bytes, more than the limit of {MAX_LIBRARY_BYTES} bytes for a plugin library"
    )]
    TooLarge {
        /// The file's size.
        size: u64,
    },
    /// Not an ELF file at all.
    #[error("not an ELF shared object (bad magic bytes)")]
    NotElf,
    /// An ELF file for another platform or of another type.
    #[error("not a shared object for this host: {0}")]
    WrongElf(&'static str),
    /// The header promises more bytes than the file has.
    #[error("truncated: the ELF header needs {needed} bytes, the file has {actual}")]
    Truncated {
        /// Bytes the header's tables reach.
        needed: u64,
        /// Bytes in the file.
        actual: u64,
    },
    /// `dlopen` failed. Shown with its sources: libloading's own message
    /// is only "dlopen failed", the cause (`dlerror`) is its source.
    #[error("{}", error_chain(.0))]
    Open(libloading::Error),
    /// No entry symbol.
    #[error(
        "missing entry symbol `plugin_api_entry` (was the plugin built with `export_plugin!`?)"
    )]
    MissingEntry,
    /// The entry returned a null descriptor.
    #[error("entry symbol returned a null descriptor")]
    NullDescriptor,
    /// Built against another version of the ABI.
    #[error(
        "ABI version mismatch: the plugin has version {found}, this host speaks version {expected}; rebuild the plugin against this host's plugin-api"
    )]
    AbiVersion {
        /// The plugin's.
        found: u32,
        /// Ours.
        expected: u32,
    },
    /// Same version number, different layout: a plugin-api built wrongly.
    #[error(
        "descriptor size mismatch: the plugin's is {found} bytes, this host expects {expected}"
    )]
    DescriptorSize {
        /// The plugin's.
        found: u32,
        /// Ours.
        expected: u32,
    },
    /// Same version and size, but the types crossing the boundary are laid
    /// out differently: a `plugin-api` changed without a version bump.
    #[error(
        "ABI layout mismatch: the plugin's plugin-api types have layout fingerprint {found:#018x}, this host's {expected:#018x}; rebuild the plugin against this host's plugin-api"
    )]
    LayoutFingerprint {
        /// The plugin's.
        found: u64,
        /// Ours.
        expected: u64,
    },
    /// The plugin's code failed while building its config.
    #[error("plugin failed to describe itself: {0}")]
    Config(String),
    /// The config has an invalid field.
    #[error("invalid config field `{}`: {}", .0.field, .0.reason)]
    InvalidConfig(service::InvalidField),
    /// The thread to run plugin code on could not be started or died.
    #[error("could not run the plugin's entry point: {0}")]
    Thread(String),
}

impl From<OpenError> for LoadError {
    fn from(error: OpenError) -> Self {
        match error {
            OpenError::Io(error) => LoadError::Io(error),
            OpenError::Untrusted(error) => LoadError::Untrusted(error),
        }
    }
}

/// A plugin file's bytes, read once and checked to be a loadable ELF
/// shared object for this host.
#[derive(Debug)]
pub struct Candidate {
    bytes: Vec<u8>,
}

impl Candidate {
    /// Opens `path` after the checks `checks` asks for ([`file_checks`]),
    /// then reads it from that descriptor and checks its ELF header. A file
    /// that does not start like an ELF file is refused after its first
    /// bytes, never read whole.
    pub fn read(path: &Path, checks: FileChecks) -> Result<Self, LoadError> {
        let opened = file_checks::open(path, checks, host_uid())?;
        Self::read_elf(opened.file, opened.size).map_err(|error| match opened.link_target {
            Some(target) => LoadError::LinkTarget {
                target,
                source: Box::new(error),
            },
            None => error,
        })
    }

    /// As [`Self::read`], for a file in a subdirectory of the plugins
    /// directory `plugins_dir` (a tenant's): strict checks hold the plugins
    /// directory to the rule of the file's own, since whoever may write it
    /// may replace the subdirectory.
    pub fn read_below(
        path: &Path,
        plugins_dir: &Path,
        checks: FileChecks,
    ) -> Result<Self, LoadError> {
        if checks == FileChecks::Strict {
            file_checks::check_directory(file_checks::Subject::Directory, plugins_dir, host_uid())?;
        }
        Self::read(path, checks)
    }

    fn read_elf(file: File, size: u64) -> Result<Self, LoadError> {
        if size > MAX_LIBRARY_BYTES {
            return Err(LoadError::TooLarge { size });
        }
        let mut file = file.take(MAX_LIBRARY_BYTES);
        // Sized once: growing a buffer of many megabytes by doubling, on
        // every load, fragments the heap (the host's RSS grew by the
        // library's size per load).
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        (&mut file).take(4).read_to_end(&mut bytes)?;
        if bytes.len() == 4 && bytes != b"\x7fELF" {
            return Err(LoadError::NotElf);
        }
        file.read_to_end(&mut bytes)?;
        check_elf(&bytes)?;
        Ok(Self { bytes })
    }

    /// The file's content as read: exactly what [`PluginLibrary::open`]
    /// loads, so a digest of these bytes is the digest of the code that
    /// runs.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// The host's effective uid: the user besides root whose plugin files it
/// trusts.
fn host_uid() -> u32 {
    // SAFETY: `geteuid` takes nothing, cannot fail and touches no memory of
    // ours; libc declares every foreign function `unsafe`.
    unsafe { libc::geteuid() }
}

/// Largest plugin file read. The loader holds a file in memory while it
/// checks and copies it, so a stray multi-gigabyte `*.so` must not be read.
const MAX_LIBRARY_BYTES: u64 = 1 << 30;

#[cfg(target_arch = "x86_64")]
const ELF_MACHINE: u16 = 62;
#[cfg(target_arch = "aarch64")]
const ELF_MACHINE: u16 = 183;

fn check_elf(bytes: &[u8]) -> Result<(), LoadError> {
    const HEADER_LEN: usize = 64;
    if bytes.is_empty() {
        return Err(LoadError::Truncated {
            needed: HEADER_LEN as u64,
            actual: 0,
        });
    }
    if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
        return Err(LoadError::NotElf);
    }
    if bytes.len() < HEADER_LEN {
        return Err(LoadError::Truncated {
            needed: HEADER_LEN as u64,
            actual: bytes.len() as u64,
        });
    }
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let u64_at = |at: usize| {
        let mut word = [0; 8];
        word.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(word)
    };
    if bytes[4] != 2 || bytes[5] != 1 {
        return Err(LoadError::WrongElf("not 64-bit little-endian"));
    }
    if u16_at(16) != 3 {
        return Err(LoadError::WrongElf("not a shared object (ET_DYN)"));
    }
    if u16_at(18) != ELF_MACHINE {
        return Err(LoadError::WrongElf("built for another CPU architecture"));
    }
    let table_end = |offset: u64, entry_size: u16, count: u16| {
        offset.saturating_add(u64::from(entry_size) * u64::from(count))
    };
    let needed = table_end(u64_at(0x20), u16_at(0x36), u16_at(0x38)).max(table_end(
        u64_at(0x28),
        u16_at(0x3a),
        u16_at(0x3c),
    ));
    if needed > bytes.len() as u64 {
        return Err(LoadError::Truncated {
            needed,
            actual: bytes.len() as u64,
        });
    }
    // A position-independent executable is ET_DYN too, and glibc refuses to
    // `dlopen` it with a message that would name our private copy rather
    // than the file. It is the one with a program interpreter. (The program
    // header table was just checked to lie inside the file.)
    const PT_INTERP: u32 = 3;
    let program_headers = u64_at(0x20) as usize;
    let has_interpreter = (0..usize::from(u16_at(0x38))).any(|nth| {
        let at = program_headers + nth * usize::from(u16_at(0x36));
        bytes.get(at..at + 4) == Some(&PT_INTERP.to_le_bytes()[..])
    });
    if has_interpreter {
        return Err(LoadError::WrongElf(
            "an executable (PIE), not a shared library",
        ));
    }
    Ok(())
}

/// Deletes private copies left behind by an earlier run (a crash, `kill -9`).
pub fn clear_cache(cache_dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(cache_dir)?;
    for entry in std::fs::read_dir(cache_dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "so") {
            std::fs::remove_file(path)?;
        }
    }
    Ok(())
}

/// An open plugin library: the only holder of pointers into it.
///
/// Dropping it leaves the library mapped: only [`PluginLibrary::close`]
/// unmaps it, because closing is safe only at the end of the unload
/// sequence, and a drop can happen anywhere (even on a plugin thread).
pub struct PluginLibrary {
    library: ManuallyDrop<libloading::Library>,
    private_copy: PathBuf,
    create: extern "C" fn(&FfiInitArgs<'_>) -> RResult<InstancePtr, RString>,
    handle: extern "C" fn(InstancePtr, &FfiRequest<'_>) -> FfiResponse,
    destroy: extern "C" fn(InstancePtr) -> RResult<(), RString>,
}

impl std::fmt::Debug for PluginLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginLibrary")
            .field("private_copy", &self.private_copy)
            .finish_non_exhaustive()
    }
}

/// Headers the gateway adds to a plugin's answer, at most, besides CORS.
const ADDED_HEADERS: usize = 4;

/// A plugin's answer headers as the gateway sends them, and the names of
/// those that are not valid HTTP (dropped).
fn copy_headers(answered: &[FfiHeader]) -> (HeaderMap, Vec<String>) {
    // Room for what the gateway and axum add to every answer
    // (`X-Service-Version`, `X-Request-Id`, `Content-Length`): a map sized
    // to the plugin's headers alone grew, twice per request.
    let mut headers = HeaderMap::with_capacity(answered.len() + ADDED_HEADERS);
    let mut dropped = Vec::new();
    for header in answered {
        match (
            HeaderName::from_bytes(header.name.as_str().as_bytes()),
            HeaderValue::from_bytes(header.value.as_slice()),
        ) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => dropped.push(header.name.to_string()),
        }
    }
    (headers, dropped)
}

/// What [`PluginLibrary::handle`] got from the plugin.
#[derive(Debug)]
pub struct Handled {
    /// The answer, in host memory.
    pub response: PluginResponse,
    /// The handler's panic message, if it panicked.
    pub panic: Option<String>,
    /// Names of the headers dropped because they were not valid HTTP.
    pub dropped_headers: Vec<String>,
}

/// A plugin's state, created by [`PluginLibrary::create`]. Only the library
/// that made it can use or free it.
#[derive(Debug)]
pub struct Instance(InstancePtr);

/// What closing a library found.
#[derive(Debug)]
pub struct CloseReport {
    /// `dlclose` failed with this message.
    pub close_error: Option<String>,
    /// The private copy is still in `/proc/self/maps` after `dlclose`: some
    /// thread-local destructor or thread of the plugin still pins it.
    pub still_mapped: bool,
}

/// Unique private-copy paths within this process; the pid keeps two hosts
/// sharing a data dir apart.
static NEXT_COPY: AtomicU64 = AtomicU64::new(0);

impl PluginLibrary {
    /// Opens `candidate` from a private copy in `cache_dir` and reads its
    /// config. `file_stem` names the copy, for people reading `/proc/maps`.
    /// `dlopen` (the library's initializers) and the config each get
    /// `entry_timeout`; a library still running either after it is refused
    /// and left loaded.
    pub fn open(
        candidate: Candidate,
        file_stem: &str,
        cache_dir: &Path,
        entry_timeout: Duration,
    ) -> Result<(Self, ServiceInfo), LoadError> {
        let private_copy = cache_dir.join(format!(
            "{file_stem}.{}.{}.so",
            std::process::id(),
            NEXT_COPY.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&private_copy, &candidate.bytes)?;
        let opened = Self::open_copy(&private_copy, entry_timeout);
        if opened.is_err() {
            // Harmless even for a library left loaded: its mapping
            // outlives the file's name.
            let _ = std::fs::remove_file(&private_copy);
        }
        opened
    }

    fn open_copy(
        private_copy: &Path,
        entry_timeout: Duration,
    ) -> Result<(Self, ServiceInfo), LoadError> {
        use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
        let path = private_copy.to_owned();
        let opened = run_bounded(
            "dlopen",
            "plugin-dlopen".to_owned(),
            entry_timeout,
            move || {
                // SAFETY: opening a library runs its initializers. The file
                // passed the ELF check, and running foreign initializers is the
                // purpose of a plugin host; RTLD_LOCAL keeps its symbols out of
                // the global namespace and RTLD_NOW makes missing symbols fail
                // here, not later.
                unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_LOCAL) }
                    .map(libloading::Library::from)
            },
        );
        let library = opened
            .map_err(|e| LoadError::Thread(e.to_string()))?
            .map_err(LoadError::Open)?;
        // SAFETY: `EntryFn` is the signature `export_plugin!` generates; a
        // library exporting the name with another signature is caught by the
        // header check below before any other field is used.
        let entry: EntryFn = *unsafe { library.get::<EntryFn>(ENTRY_SYMBOL) }
            .map_err(|_| LoadError::MissingEntry)?;

        let read = match run_bounded(
            "config",
            "plugin-config".to_owned(),
            entry_timeout,
            move || read_descriptor(entry),
        ) {
            Ok(read) => read,
            Err(error) => {
                if matches!(error, EntryError::TimedOut { .. }) {
                    // The plugin's code still runs on the abandoned thread:
                    // `dlclose` (dropping `library`) would unmap it.
                    std::mem::forget(library);
                }
                return Err(LoadError::Thread(error.to_string()));
            }
        };
        let (functions, info) = read?;
        service::validate(&info).map_err(LoadError::InvalidConfig)?;
        Ok((
            Self {
                library: ManuallyDrop::new(library),
                private_copy: private_copy.to_owned(),
                create: functions.create,
                handle: functions.handle,
                destroy: functions.destroy,
            },
            info,
        ))
    }

    /// Creates the plugin's state with `host` as its context. Runs plugin
    /// code: call it on a thread that ends before the library is closed.
    /// The plugin keeps a pointer to `host`: it must outlive every thread
    /// that may run the plugin's code (keep it until the library is
    /// closed, or leak it with the library).
    pub fn create(&self, host: &Arc<HostContext>) -> Result<Instance, String> {
        let data_dir = host.data_dir().to_string_lossy();
        let args = FfiInitArgs {
            name: RStr::from_str(host.name()),
            settings_json: RStr::from_str(host.settings_json()),
            data_dir: RStr::from_str(&data_dir),
            host: FfiHost {
                data: HostPtr(Arc::as_ptr(host).cast()),
                vtable: &HOST_VTABLE,
            },
        };
        match (self.create)(&args) {
            RResult::ROk(ptr) => Ok(Instance(ptr)),
            RResult::RErr(message) => Err(message.into()),
        }
    }

    /// Handles one request, and returns the answer with the handler's panic
    /// message if it panicked (the answer is then the SDK's 500) and the
    /// names of the headers it dropped as invalid HTTP. Runs plugin code:
    /// call it only from the plugin's own worker threads.
    pub fn handle(&self, instance: &Instance, request: &PluginRequest) -> Handled {
        let headers: Vec<FfiHeaderRef<'_>> = request
            .headers
            .iter()
            .map(|(name, value)| FfiHeaderRef {
                name: RStr::from_str(name.as_str()),
                value: RSlice::from_slice(value.as_bytes()),
            })
            .collect();
        let ffi_request = FfiRequest {
            method: RStr::from_str(request.method.as_str()),
            path: RStr::from_str(&request.path),
            query: RStr::from_str(&request.query),
            headers: RSlice::from_slice(&headers),
            body: RSlice::from_slice(&request.body),
            client_addr: RStr::from_str(&request.client_addr),
        };
        let response = (self.handle)(instance.0, &ffi_request);
        // Copied straight into the types the gateway answers with (one
        // copy, validated on the way, as the plugin may answer anything);
        // dropping `response` frees the plugin's allocations through the
        // plugin's own allocator, while it is loaded.
        let (headers, dropped) = copy_headers(&response.headers);
        Handled {
            response: PluginResponse {
                status: response.status,
                headers,
                body: Bytes::copy_from_slice(response.body.as_slice()),
            },
            panic: response
                .panic
                .as_ref()
                .map(|message| message.to_string())
                .into_option(),
            dropped_headers: dropped,
        }
    }

    /// Runs the plugin's shutdown hook and frees its state. Runs plugin
    /// code: call it on a thread that ends before the library is closed,
    /// after every [`PluginLibrary::handle`] call returned.
    pub fn destroy(&self, instance: Instance) -> Result<(), String> {
        match (self.destroy)(instance.0) {
            RResult::ROk(()) => Ok(()),
            RResult::RErr(message) => Err(message.into()),
        }
    }

    /// Closes the library, deletes the private copy, and checks that the
    /// library is really gone from the address space.
    pub fn close(self) -> CloseReport {
        let close_error = ManuallyDrop::into_inner(self.library)
            .close()
            .err()
            .map(|e| e.to_string());
        if let Err(error) = std::fs::remove_file(&self.private_copy) {
            tracing::warn!(path = %self.private_copy.display(), %error, "could not delete a plugin's private copy");
        }
        let still_mapped = std::fs::read_to_string("/proc/self/maps")
            .map(|maps| maps.contains(&*self.private_copy.to_string_lossy()))
            .unwrap_or(false);
        CloseReport {
            close_error,
            still_mapped,
        }
    }
}

/// A plugin's background task, owned by the host until it runs it: a
/// task dropped without running is discarded by the plugin's own code.
#[derive(Debug)]
pub struct PluginTask(Option<FfiTask>);

impl PluginTask {
    /// Runs the task (plugin code: call it on a thread the runtime joins
    /// before the library is closed); its panic message if it panicked.
    pub fn run(mut self) -> Option<String> {
        let task = self.0.take()?;
        (task.run)(task.data)
            .map(|message| message.to_string())
            .into_option()
    }
}

impl Drop for PluginTask {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            (task.discard)(task.data);
        }
    }
}

/// The callbacks every plugin's context points at.
static HOST_VTABLE: FfiHostVtable = FfiHostVtable {
    log_enabled: host_log_enabled,
    log: host_log,
    call: host_call,
    spawn: host_spawn,
    wait_for_stop: host_wait_for_stop,
};

/// Runs `callback` with the context `data` points at. Never unwinds into
/// the plugin (a panic of the host's is caught and `fallback` returned):
/// an unwinding panic cannot cross the boundary.
fn with_host<R>(data: HostPtr, fallback: R, callback: impl FnOnce(&HostContext) -> R) -> R {
    // SAFETY: `data` is the pointer `PluginLibrary::create` handed the
    // plugin, to a `HostContext` the runtime keeps alive (in an `Arc`)
    // until the library is closed, or leaks with a library it cannot
    // close; the plugin's code, the only caller, cannot run after either.
    let host = unsafe { &*data.0.cast::<HostContext>() };
    catch_unwind(AssertUnwindSafe(|| callback(host))).unwrap_or(fallback)
}

extern "C" fn host_log_enabled(data: HostPtr, level: u8) -> bool {
    with_host(data, false, |host| host.log_enabled(level))
}

extern "C" fn host_log(data: HostPtr, level: u8, module: RStr<'_>, message: RStr<'_>) {
    with_host(data, (), |host| {
        host.log(level, module.as_str(), message.as_str());
    });
}

extern "C" fn host_call(data: HostPtr, call: &FfiCall<'_>) -> FfiResponse {
    let failed = || {
        ffi_response(PluginResponse::from_error(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the host failed to make the call",
        )))
    };
    with_host(data, failed(), |host| {
        let service = call.service.as_str();
        let Ok(method) = Method::from_bytes(call.method.as_str().as_bytes()) else {
            return ffi_response(PluginResponse::from_error(
                ApiError::new(StatusCode::BAD_REQUEST, "invalid method").with("service", service),
            ));
        };
        let mut headers = HeaderMap::with_capacity(call.headers.len());
        for header in call.headers.iter() {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(header.name.as_str().as_bytes()),
                HeaderValue::from_bytes(header.value.as_slice()),
            ) {
                headers.append(name, value);
            }
        }
        let request = PluginRequest {
            method,
            path: call.path.as_str().to_owned(),
            query: call.query.as_str().to_owned(),
            headers,
            body: Bytes::copy_from_slice(call.body.as_slice()),
            client_addr: "127.0.0.1:0".to_owned(),
            // Set by the context, which knows the caller's chain.
            chain: None,
        };
        let timeout = (call.timeout_ms > 0).then(|| Duration::from_millis(call.timeout_ms));
        ffi_response(host.call(service, request, timeout))
    })
}

/// A host-made answer in the ABI's types: allocated by the host, dropped
/// by the plugin (through the host's allocator, in the containers' vtables).
fn ffi_response(response: PluginResponse) -> FfiResponse {
    FfiResponse {
        status: response.status,
        headers: response
            .headers
            .iter()
            .map(|(name, value)| FfiHeader {
                name: name.as_str().into(),
                value: value.as_bytes().to_vec().into(),
            })
            .collect(),
        body: Vec::from(response.body).into(),
        panic: RNone,
    }
}

extern "C" fn host_spawn(data: HostPtr, task: FfiTask) -> RResult<(), RString> {
    let task = PluginTask(Some(task));
    with_host(
        data,
        RErr("the host failed to start the task".into()),
        |host| match host.spawn(task) {
            Ok(()) => ROk(()),
            Err(reason) => RErr(reason.into()),
        },
    )
}

extern "C" fn host_wait_for_stop(data: HostPtr, millis: u64) -> bool {
    with_host(data, true, |host| {
        host.wait_for_stop(Duration::from_millis(millis))
    })
}

struct Functions {
    create: extern "C" fn(&FfiInitArgs<'_>) -> RResult<InstancePtr, RString>,
    handle: extern "C" fn(InstancePtr, &FfiRequest<'_>) -> FfiResponse,
    destroy: extern "C" fn(InstancePtr) -> RResult<(), RString>,
}

/// Calls the entry point, checks the header, reads the config. Runs plugin
/// code, hence on a thread of its own.
fn read_descriptor(entry: EntryFn) -> Result<(Functions, ServiceInfo), LoadError> {
    // SAFETY: `entry` is the library's exported entry point and takes no
    // arguments; the library stays open for the whole call.
    let descriptor = unsafe { entry() };
    if descriptor.is_null() {
        return Err(LoadError::NullDescriptor);
    }
    // SAFETY: every ABI version starts the descriptor with a
    // `DescriptorHeader`, so these two words are readable whatever the rest.
    let header = unsafe { descriptor.cast::<DescriptorHeader>().read() };
    if header.abi_version != ABI_VERSION {
        return Err(LoadError::AbiVersion {
            found: header.abi_version,
            expected: ABI_VERSION,
        });
    }
    if header.descriptor_size != DESCRIPTOR_SIZE {
        return Err(LoadError::DescriptorSize {
            found: header.descriptor_size,
            expected: DESCRIPTOR_SIZE,
        });
    }
    // SAFETY: version and size match ours, so the pointee is a
    // `PluginDescriptor` with static lifetime inside the open library. Only
    // the fingerprint field is read until the fingerprint matched.
    let plugin_fingerprint = unsafe { (*descriptor).layout_fingerprint };
    // The number is all that crosses: the host keeps no pointer into the
    // plugin's layouts, so a closed library cannot leave one behind.
    let found = plugin_fingerprint();
    let expected = layout_fingerprint();
    if found != expected {
        return Err(LoadError::LayoutFingerprint { found, expected });
    }
    // SAFETY: as above, and the plugin's types are laid out as ours.
    let descriptor = unsafe { &*descriptor };
    let config = match (descriptor.service_config)() {
        RResult::ROk(config) => config,
        RResult::RErr(message) => return Err(LoadError::Config(message.into())),
    };
    Ok((
        Functions {
            create: descriptor.create,
            handle: descriptor.handle,
            destroy: descriptor.destroy,
        },
        copy_config(&config),
    ))
}

fn copy_config(config: &FfiServiceConfig) -> ServiceInfo {
    ServiceInfo {
        name: config.name.to_string(),
        display_name: config.display_name.to_string(),
        description: config.description.to_string(),
        version: config.version.to_string(),
        health_check_url: config.health_check_url.to_string(),
        metadata: config
            .metadata
            .iter()
            .map(|kv| (kv.key.to_string(), kv.value.to_string()))
            .collect(),
        tags: config.tags.iter().map(|tag| tag.to_string()).collect(),
        requires_auth: config.requires_auth,
        endpoints: config
            .endpoints
            .iter()
            .map(|endpoint| Endpoint {
                path: endpoint.path.to_string(),
                method: endpoint.method.to_string(),
                description: endpoint.description.to_string(),
                is_public: endpoint.is_public,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_header() -> Vec<u8> {
        let mut bytes = vec![0u8; 64];
        bytes[..4].copy_from_slice(b"\x7fELF");
        bytes[4] = 2;
        bytes[5] = 1;
        bytes[16..18].copy_from_slice(&3u16.to_le_bytes());
        bytes[18..20].copy_from_slice(&ELF_MACHINE.to_le_bytes());
        bytes
    }

    #[test]
    fn elf_checks() {
        assert!(check_elf(&elf_header()).is_ok());
        assert!(matches!(
            check_elf(b""),
            Err(LoadError::Truncated {
                needed: 64,
                actual: 0
            })
        ));
        assert!(matches!(check_elf(b"hello world"), Err(LoadError::NotElf)));
        assert!(matches!(
            check_elf(&elf_header()[..40]),
            Err(LoadError::Truncated {
                needed: 64,
                actual: 40
            })
        ));
        let mut exe = elf_header();
        exe[16] = 2;
        assert!(matches!(check_elf(&exe), Err(LoadError::WrongElf(_))));
        let mut cut = elf_header();
        // Section headers at offset 4096, 10 entries of 64 bytes.
        cut[0x28..0x30].copy_from_slice(&4096u64.to_le_bytes());
        cut[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        cut[0x3c..0x3e].copy_from_slice(&10u16.to_le_bytes());
        assert!(matches!(
            check_elf(&cut),
            Err(LoadError::Truncated {
                needed: 4736,
                actual: 64
            })
        ));
        // Two program headers of 56 bytes right after the ELF header; the
        // second is a PT_INTERP: an executable.
        let mut pie = elf_header();
        pie[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        pie[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        pie[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        pie.resize(64 + 2 * 56, 0);
        pie[64..68].copy_from_slice(&1u32.to_le_bytes());
        assert!(check_elf(&pie).is_ok(), "PT_LOAD alone is a library");
        pie[120..124].copy_from_slice(&3u32.to_le_bytes());
        let refusal = check_elf(&pie).unwrap_err().to_string();
        assert_eq!(
            refusal,
            "not a shared object for this host: an executable (PIE), not a shared library"
        );
    }

    #[test]
    fn answered_headers_are_validated_and_leave_room_for_the_gateways() {
        let header = |name: &str, value: &[u8]| FfiHeader {
            name: name.into(),
            value: value.to_vec().into(),
        };
        let answered = [
            header("content-type", b"application/json"),
            header("x-custom", b"one"),
            header("x-custom", b"two"),
            header("bad name", b"x"),
            header("x-bad-value", b"line\r\nbreak"),
        ];
        let (headers, dropped) = copy_headers(&answered);
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(
            headers.get_all("x-custom").iter().collect::<Vec<_>>(),
            ["one", "two"]
        );
        assert_eq!(headers.len(), 3);
        assert_eq!(dropped, ["bad name", "x-bad-value"]);
        assert!(headers.capacity() >= headers.len() + ADDED_HEADERS);
    }

    #[test]
    fn a_dlopen_failure_names_its_cause() {
        use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
        let missing = Path::new("/nonexistent/libmissing.so");
        // SAFETY: the file does not exist, so no initializer can run.
        let error = unsafe { Library::open(Some(missing), RTLD_NOW | RTLD_LOCAL) }.unwrap_err();
        let message = LoadError::Open(error).to_string();
        assert!(
            message.starts_with(
                "dlopen failed: /nonexistent/libmissing.so: cannot open shared object file"
            ),
            "{message}"
        );
    }
}
