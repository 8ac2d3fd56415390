//! Test plugin `bad_abi`: exports the entry symbol by hand, as a plugin built
//! against another ABI version would. The host must read only the header
//! and refuse the library.

use plugin_api::ffi::{DESCRIPTOR_SIZE, DescriptorHeader};

static HEADER: DescriptorHeader = DescriptorHeader {
    abi_version: 999,
    descriptor_size: DESCRIPTOR_SIZE,
};

/// Entry point with a header announcing ABI version 999.
#[unsafe(no_mangle)]
pub extern "C" fn plugin_api_entry() -> *const DescriptorHeader {
    &HEADER
}
