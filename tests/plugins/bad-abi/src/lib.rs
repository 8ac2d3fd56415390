//! Test plugin `bad_abi`: exports the entry symbol by hand, as a plugin built
//! against another ABI version would. The host must read only the header
//! and refuse the library.

#![deny(unsafe_code)]

use plugin_api::ffi::{DESCRIPTOR_SIZE, DescriptorHeader};

static HEADER: DescriptorHeader = DescriptorHeader {
    abi_version: 999,
    descriptor_size: DESCRIPTOR_SIZE,
};

/// Entry point with a header announcing ABI version 999.
// SAFETY: no other symbol of this name exists in the library.
#[allow(unsafe_code)] // `no_mangle` is unsafe: exporting a symbol is the point.
#[unsafe(no_mangle)]
pub extern "C" fn plugin_api_entry() -> *const DescriptorHeader {
    &HEADER
}
