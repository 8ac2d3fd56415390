//! Locking that survives a poisoned mutex.
//!
//! Every mutex in the host guards state that stays consistent field by
//! field, and plugin panics never unwind through host code (the SDK catches
//! them), so a poisoned lock means a host bug on one request: it must not
//! take every later request down with it.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, ignoring poisoning.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
