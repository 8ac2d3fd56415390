//! Locking that survives a poisoned mutex, a count of work in progress
//! that a thread can wait on, and a per-thread random number source that
//! needs neither.
//!
//! Every mutex in the host guards state that stays consistent field by
//! field, and plugin panics never unwind through host code (the SDK catches
//! them), so a poisoned lock means a host bug on one request: it must not
//! take every later request down with it.

use std::cell::Cell;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Locks `mutex`, ignoring poisoning.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A number below `bound` (at least 1), from a per-thread xorshift: cheap,
/// lock-free, and good enough to spread requests (two choices, a traffic
/// split), not for anything secret.
pub(crate) fn random_below(bound: usize) -> usize {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(RandomState::new().hash_one(0u8) | 1);
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        (x % bound.max(1) as u64) as usize
    })
}

/// How many of something are in progress (calls into a plugin, its worker
/// threads), for a thread that must wait until none are, with a deadline
/// rather than by polling.
///
/// Counting is lock-free: it happens twice per plugin request, while a
/// wait is rare (an unload). The last guard out takes the lock and
/// notifies only when someone waits (a condition variable's notify is a
/// system call even with no waiter).
#[derive(Debug, Default)]
pub(crate) struct Tally {
    count: AtomicUsize,
    /// Threads in [`Tally::wait_idle`].
    waiters: AtomicUsize,
    /// Held by a waiter from its check of the count until it sleeps, and
    /// by a notifier, so a notification cannot fall between the two.
    lock: Mutex<()>,
    /// Notified when the count drops to zero while someone waits.
    idle: Condvar,
}

/// One thing in progress: counted from [`Tally::enter`] until dropped. Being
/// a drop guard, it is released on every path out, an unwinding panic
/// included.
#[derive(Debug)]
pub(crate) struct TallyGuard(Arc<Tally>);

impl Tally {
    /// Counts one more until the guard is dropped.
    pub(crate) fn enter(self: &Arc<Self>) -> TallyGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        TallyGuard(Arc::clone(self))
    }

    /// The count now.
    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until the count is zero, at most `timeout`, and returns the
    /// count then (zero unless the timeout passed).
    pub(crate) fn wait_idle(&self, timeout: Duration) -> usize {
        let guard = lock(&self.lock);
        // Announced before the count is read: a guard dropping the count
        // to zero after that read sees the waiter, and needs the lock
        // (held until this thread sleeps) to notify it.
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let (guard, _) = self
            .idle
            .wait_timeout_while(guard, timeout, |()| self.count.load(Ordering::SeqCst) > 0)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        drop(guard);
        self.count()
    }
}

impl Drop for TallyGuard {
    fn drop(&mut self) {
        let tally = &self.0;
        if tally.count.fetch_sub(1, Ordering::SeqCst) == 1
            && tally.waiters.load(Ordering::SeqCst) > 0
        {
            let _held = lock(&tally.lock);
            tally.idle.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_idle_returns_when_the_last_guard_drops_or_at_the_deadline() {
        let tally = Arc::new(Tally::default());
        assert_eq!(tally.wait_idle(Duration::ZERO), 0);
        let first = tally.enter();
        let second = tally.enter();
        assert_eq!(tally.wait_idle(Duration::from_millis(20)), 2);
        drop(first);
        let waiter = std::thread::spawn({
            let tally = tally.clone();
            move || tally.wait_idle(Duration::from_secs(60))
        });
        drop(second);
        assert_eq!(waiter.join().unwrap(), 0);
    }
}
