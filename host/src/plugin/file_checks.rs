//! Which plugin files the host trusts enough to load: the rules sshd's
//! `StrictModes` applies to a user's keys, applied to libraries the host
//! runs code from.
//!
//! A library in the plugins directory runs with the host's privileges, so
//! whoever can write it, or write the directory it sits in (and so replace
//! it), can run code as the host. Under [`FileChecks::Strict`] a file is
//! refused if it, or its directory, is writable by group or others, or if
//! it is owned by neither the host's user nor root. A symlink is followed
//! only if its target passes the same rules, in the target's own directory
//! as well as in the plugins directory.
//!
//! The file itself is checked on the descriptor the loader then reads from
//! ([`open`] returns it): a file swapped between the check and the read is
//! not the file read. Its final path component is opened with `O_NOFOLLOW`,
//! so a plain file replaced by a symlink after it was looked at is refused
//! rather than followed unchecked, and with `O_NONBLOCK`, so a FIFO cannot
//! hang the plugin manager before it is refused as not a regular file.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::http::Escaped;

/// How plugin files are checked before they are read
/// (`--plugin-file-checks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileChecks {
    /// Refuse a file, or a symlink's target, that is writable by group or
    /// others, whose directory is, or that is owned by neither the host's
    /// user nor root.
    Strict,
    /// Check nothing but that the file (or a symlink's target) is a regular
    /// file: for directories protected some other way.
    Off,
}

/// What a rule was applied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// The plugin file itself.
    File,
    /// The plugins directory.
    Directory,
    /// The file a symlink in the plugins directory resolves to.
    LinkTarget,
    /// The directory of a symlink's target.
    LinkTargetDirectory,
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Subject::File => "file",
            Subject::Directory => "plugins directory",
            Subject::LinkTarget => "symlink target",
            Subject::LinkTargetDirectory => "symlink target's directory",
        })
    }
}

/// Why a plugin file is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum Untrusted {
    /// Someone besides its owner may write it.
    #[error(
        "{subject} {} is writable by {by} (mode {mode:04o}): a plugin file and its directory must be writable by their owner only (--plugin-file-checks)",
        Escaped(&path.to_string_lossy())
    )]
    Writable {
        /// File or directory.
        subject: Subject,
        /// Its path.
        path: PathBuf,
        /// `group`, `others`, or both.
        by: &'static str,
        /// Its permission bits.
        mode: u32,
    },
    /// Owned by a user who is neither the host's nor root.
    #[error(
        "{subject} {} is owned by uid {owner}, neither the host's user (uid {host}) nor root (--plugin-file-checks)",
        Escaped(&path.to_string_lossy())
    )]
    Owner {
        /// File or directory.
        subject: Subject,
        /// Its path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The host's effective uid.
        host: u32,
    },
    /// A directory, device, FIFO or socket: no library.
    #[error("{subject} {} is not a regular file", Escaped(&path.to_string_lossy()))]
    NotRegular {
        /// File or symlink target.
        subject: Subject,
        /// Its path.
        path: PathBuf,
    },
}

/// Why [`open`] gave no file.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The file (or a directory) could not be looked at or opened.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A rule refused it.
    #[error(transparent)]
    Untrusted(#[from] Untrusted),
}

/// The strict rules for one file or directory: not writable by group or
/// others, owned by `host_uid` or root.
pub fn check(
    subject: Subject,
    path: &Path,
    mode: u32,
    owner: u32,
    host_uid: u32,
) -> Result<(), Untrusted> {
    let by = match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (false, false) => None,
        (true, false) => Some("group"),
        (false, true) => Some("others"),
        (true, true) => Some("group and others"),
    };
    if let Some(by) = by {
        return Err(Untrusted::Writable {
            subject,
            path: path.to_owned(),
            by,
            mode: mode & 0o7777,
        });
    }
    if owner != host_uid && owner != 0 {
        return Err(Untrusted::Owner {
            subject,
            path: path.to_owned(),
            owner,
            host: host_uid,
        });
    }
    Ok(())
}

fn check_dir(subject: Subject, file: &Path, host_uid: u32) -> Result<(), OpenError> {
    check_directory(subject, file.parent().unwrap_or(Path::new("/")), host_uid)
}

/// The strict rules for the directory `dir`.
pub fn check_directory(subject: Subject, dir: &Path, host_uid: u32) -> Result<(), OpenError> {
    let metadata = std::fs::metadata(dir)?;
    check(subject, dir, metadata.mode(), metadata.uid(), host_uid)?;
    Ok(())
}

/// A plugin file opened by [`open`].
#[derive(Debug)]
pub struct Opened {
    /// Open for reading.
    pub file: File,
    /// Its size, from the descriptor.
    pub size: u64,
    /// What the path resolved to, if it was a symlink.
    pub link_target: Option<PathBuf>,
}

/// Opens the plugin file at `path` for reading, following a symlink to its
/// target, after the checks `checks` asks for.
pub fn open(path: &Path, checks: FileChecks, host_uid: u32) -> Result<Opened, OpenError> {
    let strict = checks == FileChecks::Strict;
    let is_link = std::fs::symlink_metadata(path)?.file_type().is_symlink();
    if strict {
        check_dir(Subject::Directory, path, host_uid)?;
    }
    let (target, subject) = if is_link {
        // Every link on the way resolved: what is checked and opened is the
        // file itself, in its own directory.
        let target = std::fs::canonicalize(path)?;
        if strict {
            check_dir(Subject::LinkTargetDirectory, &target, host_uid)?;
        }
        (target, Subject::LinkTarget)
    } else {
        (path.to_owned(), Subject::File)
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&target)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(Untrusted::NotRegular {
            subject,
            path: target,
        }
        .into());
    }
    if strict {
        check(subject, &target, metadata.mode(), metadata.uid(), host_uid)?;
    }
    Ok(Opened {
        file,
        size: metadata.len(),
        link_target: is_link.then_some(target),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: u32 = 1000;

    fn refusal(mode: u32, owner: u32) -> Option<String> {
        check(Subject::File, Path::new("/p/x.so"), mode, owner, HOST)
            .err()
            .map(|error| error.to_string())
    }

    #[test]
    fn owner_writable_files_of_the_host_or_root_pass() {
        for mode in [0o100755, 0o100644, 0o100600, 0o100500, 0o040755] {
            assert_eq!(refusal(mode, HOST), None, "{mode:o}");
            assert_eq!(refusal(mode, 0), None, "{mode:o}");
        }
    }

    #[test]
    fn group_or_other_write_is_refused_naming_who_may_write() {
        assert_eq!(
            refusal(0o100775, HOST).unwrap(),
            "file /p/x.so is writable by group (mode 0775): a plugin file and its directory must be writable by their owner only (--plugin-file-checks)"
        );
        assert!(
            refusal(0o100757, 0)
                .unwrap()
                .contains("writable by others (mode 0757)")
        );
        assert!(
            refusal(0o041777, 0)
                .unwrap()
                .contains("writable by group and others (mode 1777)")
        );
    }

    #[test]
    fn a_file_of_another_user_is_refused() {
        assert_eq!(
            refusal(0o100644, 1001).unwrap(),
            "file /p/x.so is owned by uid 1001, neither the host's user (uid 1000) nor root (--plugin-file-checks)"
        );
        let dir = check(Subject::Directory, Path::new("/p"), 0o040755, 1001, HOST);
        assert!(matches!(
            dir,
            Err(Untrusted::Owner {
                subject: Subject::Directory,
                owner: 1001,
                ..
            })
        ));
    }

    #[test]
    fn a_path_with_control_characters_is_escaped() {
        let error = check(Subject::File, Path::new("/p/a\nb.so"), 0o100666, 0, HOST).unwrap_err();
        assert!(
            error.to_string().starts_with("file /p/a\\nb.so is"),
            "{error}"
        );
    }
}
