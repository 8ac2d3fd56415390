//! Test plugin `bad_layout`: poses as a plugin built against a `plugin-api`
//! whose `FfiResponse.status` is a `u32` rather than a `u16`. Its ABI
//! version and descriptor size are right (the field's change leaves every
//! size as it was), so only the layout fingerprint tells the host that the
//! two sides disagree. The host must read the header and the fingerprint,
//! and refuse the library without reading anything else.

#![deny(unsafe_code)]

use abi_stable::StableAbi;
use abi_stable::std_types::{ROption, RResult, RString, RVec};
use plugin_api::ffi::{
    ABI_VERSION, DESCRIPTOR_SIZE, DescriptorHeader, FfiHeader, FfiInitArgs, FfiRequest,
    FfiServiceConfig, InstancePtr, layout_fingerprint_of,
};

/// `plugin_api::ffi::FfiResponse` with `status` widened to `u32`.
#[repr(C)]
#[derive(Debug, StableAbi)]
pub struct FfiResponse {
    /// Was `u16`.
    pub status: u32,
    /// As in `plugin-api`.
    pub headers: RVec<FfiHeader>,
    /// As in `plugin-api`.
    pub body: RVec<u8>,
    /// As in `plugin-api`.
    pub panic: ROption<RString>,
}

/// `plugin_api::ffi::PluginDescriptor`, whose `handle` returns the changed
/// response. Only its layout is used, to compute the fingerprint.
#[repr(C)]
#[derive(Debug, StableAbi)]
pub struct PluginDescriptor {
    /// As in `plugin-api`.
    pub header: DescriptorHeader,
    /// As in `plugin-api`.
    pub layout_fingerprint: extern "C" fn() -> u64,
    /// As in `plugin-api`.
    pub service_config: extern "C" fn() -> RResult<FfiServiceConfig, RString>,
    /// As in `plugin-api`.
    pub create: extern "C" fn(&FfiInitArgs<'_>) -> RResult<InstancePtr, RString>,
    /// Returns the changed response.
    pub handle: extern "C" fn(InstancePtr, &FfiRequest<'_>) -> FfiResponse,
    /// As in `plugin-api`.
    pub destroy: extern "C" fn(InstancePtr) -> RResult<(), RString>,
}

/// What the entry point returns: the header and fingerprint the host reads,
/// then room for the four function pointers it must never read.
#[repr(C)]
#[derive(Debug)]
pub struct Exported {
    header: DescriptorHeader,
    layout_fingerprint: extern "C" fn() -> u64,
    unread: [usize; 4],
}

const _: () = assert!(size_of::<Exported>() == DESCRIPTOR_SIZE as usize);
const _: () = assert!(size_of::<PluginDescriptor>() == DESCRIPTOR_SIZE as usize);

extern "C" fn layout_fingerprint() -> u64 {
    layout_fingerprint_of(PluginDescriptor::LAYOUT)
}

static DESCRIPTOR: Exported = Exported {
    header: DescriptorHeader {
        abi_version: ABI_VERSION,
        descriptor_size: DESCRIPTOR_SIZE,
    },
    layout_fingerprint,
    unread: [0; 4],
};

/// Entry point with this version's header and another layout's fingerprint.
// SAFETY: no other symbol of this name exists in the library.
#[allow(unsafe_code)] // `no_mangle` is unsafe: exporting a symbol is the point.
#[unsafe(no_mangle)]
pub extern "C" fn plugin_api_entry() -> *const Exported {
    &DESCRIPTOR
}
