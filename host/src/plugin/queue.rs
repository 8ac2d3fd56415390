//! A plugin's work queue: bounded, filled by the gateway's tasks, emptied
//! by the plugin's workers, whose workers park as soon as it is empty.
//!
//! The host's tokio thread and a plugin's workers often share a core (the
//! benchmark pins them all to one): a worker that spins or yields while the
//! queue is empty (what a channel's blocking receive does before it parks)
//! only delays the thread that would fill it. So a worker that finds the
//! queue empty parks at once, and a sender wakes a parked worker only if no
//! worker woken earlier is still on its way to the queue: that one takes
//! what arrives meanwhile, in one go. A worker that takes a job and leaves
//! more behind wakes the next parked one, so a handler that blocks never
//! keeps a queued request from an idle worker.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Condvar, Mutex};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};

use crate::sync::lock;

/// A queue of `capacity` jobs.
pub(super) fn bounded<T>(capacity: usize) -> (JobSender<T>, JobReceiver<T>) {
    let (sender, receiver) = crossbeam_channel::bounded(capacity);
    let bell = Arc::new(Bell::default());
    (
        JobSender {
            queue: sender,
            bell: bell.clone(),
        },
        JobReceiver {
            queue: receiver,
            bell,
        },
    )
}

/// The one sending side. Dropping it closes the queue: workers take what
/// is left, then [`JobReceiver::recv`] returns `None`.
#[derive(Debug)]
pub(super) struct JobSender<T> {
    queue: Sender<T>,
    bell: Arc<Bell>,
}

/// A worker's side; cloned for each worker.
#[derive(Debug)]
pub(super) struct JobReceiver<T> {
    queue: Receiver<T>,
    bell: Arc<Bell>,
}

impl<T> Clone for JobReceiver<T> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
            bell: self.bell.clone(),
        }
    }
}

/// Where workers park.
#[derive(Debug, Default)]
struct Bell {
    parked: Mutex<Parked>,
    ring: Condvar,
    /// Parked workers that may be woken: zero when none is parked, or when
    /// one woken earlier has not taken its wake-up yet. A mirror of
    /// `parked`, so that a sender reads one atomic when there is nobody to
    /// wake (the usual case under load).
    wakeable: AtomicUsize,
    /// Set when the sender is dropped.
    closed: AtomicBool,
}

#[derive(Debug, Default)]
struct Parked {
    /// Workers between announcing that they park and leaving the wait.
    workers: usize,
    /// Wake-ups given and not yet taken.
    woken: usize,
}

impl Bell {
    /// Updates the mirror; called under the lock after every change.
    fn publish(&self, parked: &Parked) {
        let wakeable = if parked.woken == 0 { parked.workers } else { 0 };
        self.wakeable.store(wakeable, Ordering::SeqCst);
    }

    /// Wakes one parked worker, unless none is parked or one woken earlier
    /// is still on its way.
    fn wake_one(&self) {
        // Pairs with the fence in `park`: either this reads the parking
        // worker's announcement, or that worker sees the job just queued.
        fence(Ordering::SeqCst);
        if self.wakeable.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut parked = lock(&self.parked);
        if parked.woken == 0 && parked.workers > 0 {
            parked.woken += 1;
            self.publish(&parked);
            self.ring.notify_one();
        }
    }

    /// Parks until `queue` has a job, a wake-up is given, or the queue is
    /// closed.
    fn park<T>(&self, queue: &Receiver<T>) {
        let mut parked = lock(&self.parked);
        parked.workers += 1;
        self.publish(&parked);
        fence(Ordering::SeqCst);
        while parked.woken == 0 && queue.is_empty() && !self.closed.load(Ordering::SeqCst) {
            parked = self
                .ring
                .wait(parked)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        parked.woken = parked.woken.saturating_sub(1);
        parked.workers -= 1;
        self.publish(&parked);
    }
}

impl<T> JobSender<T> {
    /// Queues `job` without blocking, waking a worker if none is on its way.
    pub(super) fn try_send(&self, job: T) -> Result<(), TrySendError<T>> {
        self.queue.try_send(job)?;
        self.bell.wake_one();
        Ok(())
    }

    /// Jobs waiting for a worker.
    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }
}

impl<T> Drop for JobSender<T> {
    fn drop(&mut self) {
        self.bell.closed.store(true, Ordering::SeqCst);
        let _held = lock(&self.bell.parked);
        self.bell.ring.notify_all();
    }
}

impl<T> JobReceiver<T> {
    /// The next job, parking while there is none; `None` once the queue is
    /// closed and empty.
    pub(super) fn recv(&self) -> Option<T> {
        loop {
            match self.queue.try_recv() {
                Ok(job) => {
                    if !self.queue.is_empty() {
                        self.bell.wake_one();
                    }
                    return Some(job);
                }
                Err(TryRecvError::Disconnected) => return None,
                // Nothing is sent after the sender's drop began.
                Err(TryRecvError::Empty) if self.bell.closed.load(Ordering::SeqCst) => {
                    return None;
                }
                Err(TryRecvError::Empty) => self.bell.park(&self.queue),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::thread;
    use std::time::Duration;

    use super::*;

    #[test]
    fn every_job_is_taken_once_and_workers_end_when_it_closes() {
        let (sender, receiver) = bounded::<usize>(64);
        let (taken, seen) = mpsc::channel();
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let receiver = receiver.clone();
                let taken = taken.clone();
                thread::spawn(move || {
                    while let Some(job) = receiver.recv() {
                        taken.send(job).unwrap();
                    }
                })
            })
            .collect();
        drop(taken);
        let mut sent = 0;
        while sent < 10_000 {
            match sender.try_send(sent) {
                Ok(()) => sent += 1,
                Err(TrySendError::Full(_)) => thread::yield_now(),
                Err(TrySendError::Disconnected(_)) => unreachable!(),
            }
        }
        drop(sender);
        for worker in workers {
            worker.join().unwrap();
        }
        let mut jobs: Vec<usize> = seen.iter().collect();
        jobs.sort_unstable();
        assert_eq!(jobs, (0..10_000).collect::<Vec<_>>());
    }

    #[test]
    fn a_blocked_worker_does_not_keep_a_job_from_an_idle_one() {
        let (sender, receiver) = bounded::<mpsc::Receiver<()>>(8);
        let (done, finished) = mpsc::channel();
        for _ in 0..2 {
            let receiver = receiver.clone();
            let done = done.clone();
            thread::spawn(move || {
                while let Some(release) = receiver.recv() {
                    let _ = release.recv();
                    done.send(()).unwrap();
                }
            });
        }
        // The first job blocks its worker until released; the second must
        // be taken by the other worker meanwhile.
        let (release_first, first) = mpsc::channel();
        let (release_second, second) = mpsc::channel();
        sender.try_send(first).unwrap();
        sender.try_send(second).unwrap();
        release_second.send(()).unwrap();
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("the second job was served while the first blocked");
        release_first.send(()).unwrap();
        finished.recv_timeout(Duration::from_secs(10)).unwrap();
    }
}
