//! Test plugin `no_entry`: a valid shared library without `plugin_api_entry`.
//! The host must refuse it naming the missing symbol.

#![deny(unsafe_code)]

/// An exported function that is not a plugin entry point.
// SAFETY: no other symbol of this name exists in the library.
#[allow(unsafe_code)] // `no_mangle` is unsafe: exporting a symbol is the point.
#[unsafe(no_mangle)]
pub extern "C" fn something_else() -> u32 {
    42
}
