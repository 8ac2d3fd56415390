//! The harness's one error: a message saying what was expected and what
//! was seen instead.

use std::fmt;

/// What went wrong, in words (including the process output that explains
/// it, where there is one).
pub struct Error(String);

/// A harness result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error saying `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

// Plain text, not a quoted string: `.unwrap()` in a test then shows the
// host's log lines one per line instead of escaped into one.
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// The bench reports failures as strings, scenario by scenario.
impl From<Error> for String {
    fn from(error: Error) -> Self {
        error.0
    }
}
