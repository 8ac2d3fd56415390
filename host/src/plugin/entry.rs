//! Calls into plugin code that must return before a load can go on
//! (`dlopen`'s initializers, the plugin's `config` and `init`): each runs on
//! a thread of its own and gets a deadline.
//!
//! A plugin that hangs in one of them must not hang the plugin manager,
//! the only thread applying file events. So the call runs on a fresh
//! thread and the caller waits for its result with a timeout. A call that
//! returns in time has its thread joined, so no thread that ran plugin code
//! outlives the call (its thread-local destructors have run before anyone
//! may close the library). A call that does not is abandoned: its thread
//! is detached, and whatever the call owns (the library among it) stays
//! with it and is never freed, because freeing or unmapping anything under
//! a running thread would crash the host.

use std::mem::ManuallyDrop;
use std::thread;
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;

/// Why a bounded call into plugin code gave no result.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// The OS refused a thread; the call never ran.
    #[error("could not start a thread for {call}: {source}")]
    Spawn {
        /// Which call.
        call: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The call unwound on the host's side of its thread (plugin panics are
    /// caught inside the plugin, so this is a host bug).
    #[error("{call} panicked on the host's side")]
    Panicked {
        /// Which call.
        call: &'static str,
    },
    /// The call did not return in time. Its thread is detached and keeps
    /// what the call owns, so the library stays mapped for good.
    #[error("{call} did not return within {}; its library is left loaded", humantime::format_duration(*timeout))]
    TimedOut {
        /// Which call.
        call: &'static str,
        /// The deadline it missed.
        timeout: Duration,
    },
}

/// Runs `work` (plugin code, named `call` in errors and after `thread` in
/// thread names) on a thread of its own and returns its result if it
/// arrives within `timeout`.
///
/// `work` must own everything the plugin code needs, the library included,
/// and hand back what the caller keeps: if the deadline passes, it is never
/// dropped, even if the call returns later.
pub fn run_bounded<T: Send + 'static>(
    call: &'static str,
    thread: String,
    timeout: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, EntryError> {
    let (result, received) = crossbeam_channel::bounded(1);
    let handle = thread::Builder::new()
        .name(thread)
        .spawn(move || {
            // `ManuallyDrop`: a result sent after the caller gave up is
            // dropped with the channel, by whichever thread lets go of it
            // last; it may own the library, which must then stay mapped.
            let _ = result.send(ManuallyDrop::new(work()));
        })
        .map_err(|source| EntryError::Spawn { call, source })?;
    match received.recv_timeout(timeout) {
        Ok(value) => {
            // Sending was the thread's last act: the join waits only for
            // its exit, which runs the thread-local destructors the plugin
            // registered on it.
            let _ = handle.join();
            Ok(ManuallyDrop::into_inner(value))
        }
        // Dropping the handle detaches the thread.
        Err(RecvTimeoutError::Timeout) => Err(EntryError::TimedOut { call, timeout }),
        Err(RecvTimeoutError::Disconnected) => {
            let _ = handle.join();
            Err(EntryError::Panicked { call })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_in_time_is_returned() {
        let answer = run_bounded("test", "test".to_owned(), Duration::from_secs(60), || 42);
        assert_eq!(answer.unwrap(), 42);
    }

    #[test]
    fn a_late_result_is_abandoned_and_never_dropped() {
        /// Dropping it disconnects the channel the test listens on.
        #[derive(Debug)]
        struct Late(
            #[expect(dead_code, reason = "held for its drop")] crossbeam_channel::Sender<()>,
        );
        let (release, released) = crossbeam_channel::bounded::<()>(0);
        let (dropped, dropped_rx) = crossbeam_channel::bounded::<()>(0);
        let answer = run_bounded(
            "init",
            "test".to_owned(),
            Duration::from_millis(20),
            move || {
                let _ = released.recv();
                Late(dropped)
            },
        );
        assert_eq!(
            answer.unwrap_err().to_string(),
            "init did not return within 20ms; its library is left loaded"
        );
        // Let the abandoned call return. Its result must stay alive: a drop
        // would disconnect `dropped_rx` at once, a leak leaves it waiting.
        drop(release);
        assert_eq!(
            dropped_rx.recv_timeout(Duration::from_millis(300)),
            Err(RecvTimeoutError::Timeout)
        );
    }

    #[test]
    fn a_host_side_panic_is_reported() {
        let answer = run_bounded("config", "test".to_owned(), Duration::from_secs(60), || {
            panic!("host bug")
        });
        assert!(matches!(
            answer,
            Err(EntryError::Panicked { call: "config" })
        ));
    }
}
