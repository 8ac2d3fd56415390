//! The watcher: turns the plugins directory's file-system events into
//! settled [`FileEvent`]s.
//!
//! notify reports every write of a file being copied; acting on the first
//! would open half a library. So events only mark a path dirty, and a path
//! is reported once it had no event for the debounce period and its size did
//! not change over that period. The events that end a write settle a path
//! at once instead: the file was closed after writing (`IN_CLOSE_WRITE`),
//! renamed into place or away, or deleted. Only a file still being written
//! (created or written to, not yet closed) or whose metadata changed waits
//! for the debounce. Whether the path then exists decides
//! between [`FileEvent::Changed`] and [`FileEvent::Removed`]: renames in and
//! out, atomic replaces and `cp` over a file all reduce to that one question.
//! A change of a file's metadata (`chmod`, `chown`) is a change like any
//! other, since it decides whether the file is trusted; one of the
//! directory's own re-examines every file in it.
//!
//! A tenant's plugin files live one level down, in `<dir>/<tenant>/`: the
//! watch is recursive, files directly in a subdirectory are reported like
//! the directory's own (deeper ones are not), and a subdirectory created,
//! removed or renamed rescans, so its files are reported (or reported
//! gone) even if they arrived before its watch did. Which subdirectory
//! names a tenant is the plugin manager's to decide. The initial scan feeds the
//! same queue, so start-up loading and hot loading are one code path. It
//! never opens a file's content: the loader does.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};

/// A settled change of a plugin file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileEvent {
    /// The file exists and was stable for the debounce period: (re)load it.
    Changed(PathBuf),
    /// The file is gone: unload what was loaded from it.
    Removed(PathBuf),
    /// Every file present at start-up has been reported (sent once, after
    /// the last of them): what depends on the initial plugins being in
    /// place, such as accepting registrations, may start.
    InitialScanDone,
}

/// Why the watcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The directory could not be created or listed.
    #[error("plugins directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// notify refused to watch it.
    #[error("cannot watch plugins directory {path}: {source}")]
    Notify {
        /// The directory.
        path: PathBuf,
        /// notify's error.
        source: notify::Error,
    },
}

/// A running watcher. Dropping it stops the watch and the debounce thread,
/// which closes the [`FileEvent`] channel.
#[derive(Debug)]
pub struct Watcher {
    notify: Option<RecommendedWatcher>,
    debouncer: Option<JoinHandle<()>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Dropping notify's watcher drops its event sender, which ends the
        // debounce loop.
        self.notify.take();
        if let Some(debouncer) = self.debouncer.take() {
            let _ = debouncer.join();
        }
    }
}

/// Whether `path` names a plugin library.
fn is_plugin_file(path: &Path) -> bool {
    path.extension().is_some_and(|ext| ext == "so")
}

/// Starts watching `dir` and its subdirectories, reporting every plugin
/// file in them first, then every settled change.
pub fn watch(
    dir: &Path,
    debounce: Duration,
    events: Sender<FileEvent>,
) -> Result<Watcher, WatchError> {
    let dir_error = |source| WatchError::Dir {
        path: dir.to_owned(),
        source,
    };
    // Never group- or world-writable, whatever the umask: the host refuses
    // files in such a directory (`--plugin-file-checks`).
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(dir_error)?;
    // notify reports absolute paths; compare like with like.
    let dir = &dir.canonicalize().map_err(dir_error)?;
    let (raw_tx, raw_rx) = crossbeam_channel::unbounded::<Raw>();
    let watched = dir.clone();
    let mut notify = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let raw = match event {
            Ok(event) if event.need_rescan() => Raw::Rescan,
            // The directory's own owner or mode changed, and with it
            // whether the host trusts the files in it: every file is looked
            // at again.
            Ok(event) if is_metadata_change(&event.kind) && event.paths.contains(&watched) => {
                Raw::Rescan
            }
            Ok(event) if is_content_read(&event.kind) => return,
            Ok(event) => Raw::Paths {
                settled: ends_a_write(&event.kind),
                paths: event.paths,
            },
            Err(error) => {
                tracing::warn!(%error, "file watch error; rescanning the plugins directory");
                Raw::Rescan
            }
        };
        let _ = raw_tx.send(raw);
    })
    .map_err(|source| WatchError::Notify {
        path: dir.to_owned(),
        source,
    })?;
    notify
        .watch(dir, RecursiveMode::Recursive)
        .map_err(|source| WatchError::Notify {
            path: dir.to_owned(),
            source,
        })?;
    // Scan after the watch is set, so a file created in between is seen by
    // one or the other (or both, which the debounce merges).
    let initial = list_plugin_files(dir).map_err(dir_error)?;
    let mut debouncer = Debouncer::new(dir.to_owned(), debounce);
    for path in &initial {
        debouncer.mark(path.clone(), Instant::now(), true);
    }
    debouncer.initial = Some(initial.into_iter().collect());
    let debouncer = thread::Builder::new()
        .name("plugin-watcher".to_owned())
        .spawn(move || debouncer.run(&raw_rx, &events))
        .map_err(dir_error)?;
    Ok(Watcher {
        notify: Some(notify),
        debouncer: Some(debouncer),
    })
}

fn is_metadata_change(kind: &EventKind) -> bool {
    matches!(kind, EventKind::Modify(ModifyKind::Metadata(_)))
}

/// Reads do not change a file, and the loader's own read of a file must not
/// retrigger its load.
fn is_content_read(kind: &EventKind) -> bool {
    matches!(kind, EventKind::Access(access) if *access != AccessKind::Close(AccessMode::Write))
}

/// Events after which a file's content is final: closed after writing,
/// renamed into place (or away: the old name is gone), deleted. The file
/// need not wait out the debounce. A file still open for writing gives
/// none of these until it is closed.
fn ends_a_write(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(
                RenameMode::To | RenameMode::From | RenameMode::Both
            ))
            | EventKind::Remove(_)
    )
}

/// Whether `path` is a plugin file the watcher reports: directly in `dir`,
/// or directly in one of its subdirectories.
fn is_watched_file(dir: &Path, path: &Path) -> bool {
    let parent = path.parent();
    is_plugin_file(path) && (parent == Some(dir) || parent.and_then(Path::parent) == Some(dir))
}

/// The plugin files in `dir` and directly in its subdirectories.
fn list_plugin_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            // A subdirectory that vanished meanwhile has nothing to report.
            let Ok(inner) = std::fs::read_dir(&path) else {
                continue;
            };
            for inner in inner {
                let inner = inner?.path();
                if is_plugin_file(&inner) {
                    files.push(inner);
                }
            }
        } else if is_plugin_file(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

enum Raw {
    /// Paths that had an event; `settled` when the event ended a write
    /// ([`ends_a_write`]).
    Paths {
        paths: Vec<PathBuf>,
        settled: bool,
    },
    Rescan,
}

struct Pending {
    due: Instant,
    /// Size when last marked; `None` if the file did not exist then.
    size: Option<u64>,
    /// The last event ended a write (or the path came from a scan), rather
    /// than only saying the file is being written to.
    write_ended: bool,
    /// Since when the file has been empty with a write still open: `cp`
    /// over a file truncates it and sets its mode before copying a byte,
    /// and on a busy machine the copy can start later than the debounce.
    empty_since: Option<Instant>,
}

/// How long an empty file whose write has not ended waits for its content
/// before it is reported (and refused) as it is.
const EMPTY_WRITE_PATIENCE: Duration = Duration::from_secs(2);

struct Debouncer {
    dir: PathBuf,
    debounce: Duration,
    pending: HashMap<PathBuf, Pending>,
    /// Paths last reported as changed, so that a rescan can tell which of
    /// them disappeared.
    present: HashSet<PathBuf>,
    /// The files of the initial scan until each was reported; `None` once
    /// [`FileEvent::InitialScanDone`] was sent.
    initial: Option<HashSet<PathBuf>>,
}

fn file_size(path: &Path) -> Option<u64> {
    std::fs::metadata(path)
        .ok()
        .filter(|metadata| metadata.is_file())
        .map(|metadata| metadata.len())
}

impl Debouncer {
    fn new(dir: PathBuf, debounce: Duration) -> Self {
        Self {
            dir,
            debounce,
            pending: HashMap::new(),
            present: HashSet::new(),
            initial: None,
        }
    }

    fn mark(&mut self, path: PathBuf, due: Instant, write_ended: bool) {
        let size = file_size(&path);
        let empty_since = self
            .pending
            .get(&path)
            .and_then(|pending| pending.empty_since);
        self.pending.insert(
            path,
            Pending {
                due,
                size,
                write_ended,
                empty_since,
            },
        );
    }

    fn run(mut self, raw: &Receiver<Raw>, events: &Sender<FileEvent>) {
        loop {
            if !self.announce_initial_scan(events) {
                return;
            }
            let next_due = self.pending.values().map(|pending| pending.due).min();
            let received = match next_due {
                Some(due) => raw.recv_deadline(due),
                None => raw.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match received {
                Ok(Raw::Paths { paths, settled }) => {
                    let now = Instant::now();
                    let due = if settled { now } else { now + self.debounce };
                    for path in paths {
                        if is_watched_file(&self.dir, &path) {
                            self.mark(path, due, settled);
                        } else if self.is_subdirectory(&path) {
                            self.rescan();
                        }
                    }
                }
                Ok(Raw::Rescan) => self.rescan(),
                Err(RecvTimeoutError::Timeout) => {
                    if !self.report_due(events) {
                        return;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Whether `path`, directly in the directory, is (or was, holding
    /// files reported present) a subdirectory: its creation, removal or
    /// rename changes which files there are.
    fn is_subdirectory(&self, path: &Path) -> bool {
        path.parent() == Some(self.dir.as_path())
            && !is_plugin_file(path)
            && (path.is_dir() || self.present.iter().any(|known| known.starts_with(path)))
    }

    fn rescan(&mut self) {
        let due = Instant::now() + self.debounce;
        let listed = list_plugin_files(&self.dir).unwrap_or_else(|error| {
            tracing::warn!(path = %self.dir.display(), %error, "could not list the plugins directory");
            Vec::new()
        });
        let known: Vec<PathBuf> = self.present.iter().cloned().collect();
        for path in listed.into_iter().chain(known) {
            self.mark(path, due, true);
        }
    }

    /// Sends [`FileEvent::InitialScanDone`] once no file of the initial scan
    /// is pending any more. Returns false once nobody listens any more.
    fn announce_initial_scan(&mut self, events: &Sender<FileEvent>) -> bool {
        let Some(initial) = &mut self.initial else {
            return true;
        };
        initial.retain(|path| self.pending.contains_key(path));
        if !initial.is_empty() {
            return true;
        }
        self.initial = None;
        events.send(FileEvent::InitialScanDone).is_ok()
    }

    /// Reports every due path whose size held still; re-arms the others.
    /// Returns false once nobody listens any more.
    fn report_due(&mut self, events: &Sender<FileEvent>) -> bool {
        let now = Instant::now();
        let mut due: Vec<(bool, PathBuf)> = self
            .pending
            .iter()
            .filter(|(_, pending)| pending.due <= now)
            .map(|(path, _)| (path.exists(), path.clone()))
            .collect();
        // Removals first: a rename reports both paths at once, and the old
        // name must be given up before the new file claims its service name.
        due.sort();
        let due = due.into_iter().map(|(_, path)| path);
        for path in due {
            let Some(pending) = self.pending.remove(&path) else {
                continue;
            };
            let event = match file_size(&path) {
                None => {
                    self.present.remove(&path);
                    FileEvent::Removed(path)
                }
                Some(0)
                    if !pending.write_ended
                        && pending
                            .empty_since
                            .is_none_or(|since| now < since + EMPTY_WRITE_PATIENCE) =>
                {
                    self.mark(path.clone(), now + self.debounce, false);
                    if let Some(pending) = self.pending.get_mut(&path) {
                        pending.empty_since.get_or_insert(now);
                    }
                    continue;
                }
                Some(size) if pending.size == Some(size) => {
                    self.present.insert(path.clone());
                    FileEvent::Changed(path)
                }
                Some(_) => {
                    // Still growing: look again after another quiet period.
                    self.mark(path, now + self.debounce, pending.write_ended);
                    continue;
                }
            };
            if events.send(event).is_err() {
                return false;
            }
        }
        true
    }
}
