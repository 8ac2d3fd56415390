//! Glue generated code calls; not part of the public API.
//!
//! Every function here is an `extern "C"` entry point that the host calls,
//! and each catches panics itself: an unwinding panic cannot cross into the
//! host (it would abort the process).

use std::any::Any;
use std::cell::Cell;
use std::ffi::c_void;
use std::panic::{self, AssertUnwindSafe, catch_unwind};
use std::sync::Once;

use abi_stable::std_types::{RErr, RNone, ROk, ROption, RResult, RSome, RString};

use crate::ffi::{
    self, ABI_VERSION, DESCRIPTOR_SIZE, DescriptorHeader, FfiInitArgs, FfiRequest, FfiResponse,
    FfiServiceConfig, FfiTask, InstancePtr, PluginDescriptor, TaskPtr,
};
use crate::{Context, Plugin, Router};

/// The descriptor for plugin type `P`.
pub const fn descriptor<P: Plugin>() -> PluginDescriptor {
    PluginDescriptor {
        header: DescriptorHeader {
            abi_version: ABI_VERSION,
            descriptor_size: DESCRIPTOR_SIZE,
        },
        layout_fingerprint,
        service_config: service_config::<P>,
        create: create::<P>,
        handle: handle::<P>,
        destroy: destroy::<P>,
    }
}

struct Instance<P: Plugin> {
    plugin: P,
    router: Router<P>,
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

thread_local! {
    /// Whether this thread is inside one of the entry points below: only
    /// their panics are kept from the plugin's panic hook. No destructor, so
    /// it pins nothing on the host's threads.
    static IN_ENTRY: Cell<bool> = const { Cell::new(false) };
    /// Where the last panic inside an entry point was raised, from the hook
    /// to the entry point's `catch_unwind`, which takes it. Touched only by
    /// a panic; its destructor, registered then, runs at the thread's exit,
    /// which the host waits for before it closes the library (it joins
    /// every thread that ran plugin code).
    static PANIC_LOCATION: Cell<Option<String>> = const { Cell::new(None) };
}

/// Replaces the plugin's panic hook, once per load, by one that records
/// where a panic inside an entry point was raised instead of printing it:
/// the entry point hands the message to the host, which logs it under its
/// own rate limit (std's default hook writes every panic to stderr, outside
/// the host's logging, which a handler panicking under load turns into a
/// flood). Panics on threads of the plugin's own keep the previous hook.
///
/// The hook lives in the plugin's own copy of std (its hook `static` is in
/// this library's data), never in the host's: only panics raised by this
/// library's code consult it, and the closure and the `static` holding it
/// are unmapped together by `dlclose`, after the host joined every thread
/// that ran plugin code. So nothing can reach it once the library is gone,
/// and `destroy` has nothing to restore. Each load is a fresh copy of the
/// library, with a fresh `INSTALL`, hence once per load.
fn quiet_entry_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if IN_ENTRY.get() {
                PANIC_LOCATION.set(info.location().map(ToString::to_string));
            } else {
                previous(info);
            }
        }));
    });
}

/// A panic caught in an entry point.
struct Caught {
    message: String,
    location: Option<String>,
}

impl Caught {
    /// `<what> panicked at <location>: <message>`, for the host's log.
    fn describe(&self, what: &str) -> String {
        match &self.location {
            Some(location) => format!("{what} panicked at {location}: {}", self.message),
            None => format!("{what} panicked: {}", self.message),
        }
    }
}

/// Runs `f` as an entry point: a panic is caught, kept from the plugin's
/// panic hook, and returned with its message and location.
fn entry<R>(f: impl FnOnce() -> R) -> Result<R, Caught> {
    quiet_entry_panics();
    IN_ENTRY.set(true);
    let result = catch_unwind(AssertUnwindSafe(f));
    IN_ENTRY.set(false);
    result.map_err(|payload| Caught {
        message: panic_message(&*payload),
        location: PANIC_LOCATION.take(),
    })
}

/// Not generic: the fingerprint is a property of this copy of `plugin-api`,
/// whatever the plugin.
extern "C" fn layout_fingerprint() -> u64 {
    // Walking static layout data does not panic; if it ever did, 0 is a
    // number no host has, so the load is refused rather than the host
    // aborted.
    catch_unwind(ffi::layout_fingerprint).unwrap_or(0)
}

extern "C" fn service_config<P: Plugin>() -> RResult<FfiServiceConfig, RString> {
    match entry(|| P::config().into_ffi(&P::router())) {
        Ok(config) => ROk(config),
        Err(caught) => RErr(format!("config panicked: {}", caught.message).into()),
    }
}

extern "C" fn create<P: Plugin>(args: &FfiInitArgs<'_>) -> RResult<InstancePtr, RString> {
    let result = entry(|| -> Result<InstancePtr, String> {
        crate::logging::to_host(args.host);
        let context = Context::from_host(args);
        let plugin = P::init(&context).map_err(|e| e.cause().unwrap_or(e.message()).to_owned())?;
        let instance = Box::new(Instance {
            plugin,
            router: P::router(),
        });
        Ok(InstancePtr(Box::into_raw(instance).cast::<c_void>()))
    });
    match result {
        Ok(Ok(ptr)) => ROk(ptr),
        Ok(Err(message)) => RErr(format!("init failed: {message}").into()),
        Err(caught) => RErr(format!("init panicked: {}", caught.message).into()),
    }
}

extern "C" fn handle<P: Plugin>(instance: InstancePtr, request: &FfiRequest<'_>) -> FfiResponse {
    // SAFETY: the host passes back the pointer `create` returned, and calls
    // `destroy` only after every `handle` call returned.
    let instance = unsafe { &*instance.0.cast::<Instance<P>>() };
    match entry(|| {
        instance
            .router
            .dispatch(&instance.plugin, request)
            .unwrap_or_else(|error| {
                error.into_logged_response(request.method.as_str(), request.path.as_str())
            })
    }) {
        Ok(response) => response.into_ffi(),
        Err(caught) => {
            // The client learns that the handler panicked and why; where in
            // the plugin's source is for the host's log only.
            let mut response =
                crate::Error::internal(format!("handler panicked: {}", caught.message))
                    .into_response()
                    .into_ffi();
            response.panic = RSome(caught.describe("handler").into());
            response
        }
    }
}

extern "C" fn destroy<P: Plugin>(instance: InstancePtr) -> RResult<(), RString> {
    // SAFETY: `create` made this pointer with `Box::into_raw`, and the host
    // calls `destroy` once, after the last `handle` returned.
    let instance = unsafe { Box::from_raw(instance.0.cast::<Instance<P>>()) };
    let hook = entry(|| instance.plugin.shutdown());
    let drop_result = entry(move || drop(instance));
    match (hook, drop_result) {
        (Ok(()), Ok(())) => ROk(()),
        (Err(caught), _) => RErr(format!("shutdown panicked: {}", caught.message).into()),
        (_, Err(caught)) => RErr(format!("drop panicked: {}", caught.message).into()),
    }
}

/// A background task as the SDK boxes it.
type TaskFn = Box<dyn FnOnce() + Send>;

/// `task` as the host takes it: the host calls exactly one of `run` or
/// `discard`.
pub(crate) fn task(task: TaskFn) -> FfiTask {
    FfiTask {
        data: TaskPtr(Box::into_raw(Box::new(task)).cast::<c_void>()),
        run: run_task,
        discard: discard_task,
    }
}

extern "C" fn run_task(data: TaskPtr) -> ROption<RString> {
    // SAFETY: `task` made this pointer with `Box::into_raw`, and the host
    // calls `run` or `discard` once.
    let task = unsafe { Box::from_raw(data.0.cast::<TaskFn>()) };
    match entry(task) {
        Ok(()) => RNone,
        Err(caught) => RSome(caught.describe("background task").into()),
    }
}

extern "C" fn discard_task(data: TaskPtr) {
    // SAFETY: as in `run_task`.
    let task = unsafe { Box::from_raw(data.0.cast::<TaskFn>()) };
    // A panicking drop is caught here and forgotten: the task was refused.
    let _ = entry(move || drop(task));
}

/// Runs `job`, catching a panic, inside an entry point (a periodic job's
/// run): the panic's message and location are returned.
pub(crate) fn catch(job: &mut impl FnMut()) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(job)).map_err(|payload| {
        let caught = Caught {
            message: panic_message(&*payload),
            location: PANIC_LOCATION.take(),
        };
        caught.describe("job")
    })
}
