//! Glue generated code calls; not part of the public API.
//!
//! Every function here is an `extern "C"` entry point that the host calls,
//! and each catches panics itself: an unwinding panic cannot cross into the
//! host (it would abort the process).

use std::any::Any;
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};

use abi_stable::std_types::{RErr, ROk, RResult, RString};

use crate::ffi::{
    self, ABI_VERSION, DESCRIPTOR_SIZE, DescriptorHeader, FfiRequest, FfiResponse,
    FfiServiceConfig, InstancePtr, PluginDescriptor,
};
use crate::{Error, Plugin, Router};

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

/// Not generic: the fingerprint is a property of this copy of `plugin-api`,
/// whatever the plugin.
extern "C" fn layout_fingerprint() -> u64 {
    // Walking static layout data does not panic; if it ever did, 0 is a
    // number no host has, so the load is refused rather than the host
    // aborted.
    catch_unwind(ffi::layout_fingerprint).unwrap_or(0)
}

extern "C" fn service_config<P: Plugin>() -> RResult<FfiServiceConfig, RString> {
    match catch_unwind(|| P::config().into_ffi(&P::router())) {
        Ok(config) => ROk(config),
        Err(payload) => RErr(format!("config panicked: {}", panic_message(&*payload)).into()),
    }
}

extern "C" fn create<P: Plugin>() -> RResult<InstancePtr, RString> {
    let result = catch_unwind(|| -> Result<InstancePtr, String> {
        let plugin = P::init().map_err(|e| e.message().to_owned())?;
        let instance = Box::new(Instance {
            plugin,
            router: P::router(),
        });
        Ok(InstancePtr(Box::into_raw(instance).cast::<c_void>()))
    });
    match result {
        Ok(Ok(ptr)) => ROk(ptr),
        Ok(Err(message)) => RErr(format!("init failed: {message}").into()),
        Err(payload) => RErr(format!("init panicked: {}", panic_message(&*payload)).into()),
    }
}

extern "C" fn handle<P: Plugin>(instance: InstancePtr, request: &FfiRequest<'_>) -> FfiResponse {
    // SAFETY: the host passes back the pointer `create` returned, and calls
    // `destroy` only after every `handle` call returned.
    let instance = unsafe { &*instance.0.cast::<Instance<P>>() };
    let response = catch_unwind(AssertUnwindSafe(|| {
        instance.router.dispatch(&instance.plugin, request)
    }))
    .unwrap_or_else(|payload| {
        Err(Error::internal(format!(
            "handler panicked: {}",
            panic_message(&*payload)
        )))
    });
    response.unwrap_or_else(Error::into_response).into_ffi()
}

extern "C" fn destroy<P: Plugin>(instance: InstancePtr) -> RResult<(), RString> {
    // SAFETY: `create` made this pointer with `Box::into_raw`, and the host
    // calls `destroy` once, after the last `handle` returned.
    let instance = unsafe { Box::from_raw(instance.0.cast::<Instance<P>>()) };
    let hook = catch_unwind(AssertUnwindSafe(|| instance.plugin.shutdown()));
    let drop_result = catch_unwind(AssertUnwindSafe(move || drop(instance)));
    match (hook, drop_result) {
        (Ok(()), Ok(())) => ROk(()),
        (Err(payload), _) => {
            RErr(format!("shutdown panicked: {}", panic_message(&*payload)).into())
        }
        (_, Err(payload)) => RErr(format!("drop panicked: {}", panic_message(&*payload)).into()),
    }
}
