//! Test plugin `old_abi`: exports the entry symbol by hand, as a plugin
//! built against the `plugin-api` of ABI version 3 (before `init` got a
//! context) would: its header says version 3, with that version's
//! descriptor size. The host must read only the header and refuse it,
//! saying what to do.

#![deny(unsafe_code)]

use plugin_api::ffi::DescriptorHeader;

/// The descriptor of ABI 3: header, fingerprint and four function
/// pointers, 48 bytes.
static HEADER: DescriptorHeader = DescriptorHeader {
    abi_version: 3,
    descriptor_size: 48,
};

/// Entry point with a header announcing ABI version 3.
// SAFETY: no other symbol of this name exists in the library.
#[allow(unsafe_code)] // `no_mangle` is unsafe: exporting a symbol is the point.
#[unsafe(no_mangle)]
pub extern "C" fn plugin_api_entry() -> *const DescriptorHeader {
    &HEADER
}
