//! The one error every settings constructor returns.
//!
//! Each reloadable piece (`X::from_settings`) checks its own section of the
//! config file; a refusal names the key's path in that file and why, so
//! that a start, `check-config` and a reload all say the same line.

/// A setting refused: which key, and why. The key is the path in the
/// config file (`auth.jwt[1].public_key_file`,
/// `service.hello.cors.allow_origins[2]`), or the field of a key added at
/// run time (`sha256`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct SettingsError {
    /// Path of the key at fault.
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

impl SettingsError {
    /// `key` is refused for `reason`.
    pub fn new(key: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self {
            key: key.into(),
            reason: reason.to_string(),
        }
    }
}
