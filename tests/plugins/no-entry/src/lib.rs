//! Test plugin `no_entry`: a valid shared library without `plugin_api_entry`.
//! The host must refuse it naming the missing symbol.

/// An exported function that is not a plugin entry point.
#[unsafe(no_mangle)]
pub extern "C" fn something_else() -> u32 {
    42
}
