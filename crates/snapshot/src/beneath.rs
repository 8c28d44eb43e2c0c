//! Safe path handling inside one layer directory.
//!
//! Tar entry names are cleaned lexically (leading `/` stripped, `.` dropped, `..` folded, but
//! never above the layer root). Directories of one layer are opened with `openat2(2)`
//! `RESOLVE_BENEATH`, so the kernel refuses any resolution that would leave the layer; the
//! unpack uses that (with no symlinks allowed) for its fast path and for directory times, and
//! resolves everything else through the merged view of the layers ([`crate::merged`]).
//! The last component of a name is never resolved: callers use `*at` calls on the parent fd
//! with `O_NOFOLLOW`/`AT_SYMLINK_NOFOLLOW` semantics.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::Mode;

/// Why a tar name could not be cleaned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CleanError {
    /// `..` would climb above the layer root.
    Escape,
    /// The name holds a NUL byte.
    Nul,
}

/// Cleans a tar entry name into path components relative to the layer root.
///
/// `/etc/x` becomes `etc/x` (Docker's treatment of absolute names); `a/../b` becomes `b`;
/// `../x` and `a/../../x` are refused. An empty result means the layer root itself.
pub(crate) fn clean(name: &[u8]) -> Result<Vec<OsString>, CleanError> {
    if name.contains(&0) {
        return Err(CleanError::Nul);
    }
    let mut out: Vec<OsString> = Vec::new();
    for comp in name.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() {
                    return Err(CleanError::Escape);
                }
            }
            c => out.push(OsString::from_vec(c.to_vec())),
        }
    }
    Ok(out)
}

/// Joins cleaned components into a relative path.
pub(crate) fn join(comps: &[OsString]) -> PathBuf {
    comps.iter().collect()
}

/// Why a directory inside the layer could not be opened.
#[derive(Debug)]
pub(crate) enum ResolveError {
    /// Resolution would leave the layer (absolute or climbing symlink).
    Escape,
    /// A symlink was met where none is allowed.
    Symlink,
    /// Any other failure, including `ENOENT` and `ENOTDIR`.
    Io(io::Error),
}

/// An open layer directory that entries are resolved beneath.
#[derive(Debug)]
pub(crate) struct Tree {
    fd: OwnedFd,
}

impl Tree {
    /// Opens the layer root `path` (which we created ourselves, so it is trusted).
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self { fd })
    }

    /// Opens the directory `comps` beneath the root with open `flags` (`O_PATH` or
    /// `O_RDONLY`). When `strict`, no symlink at all may be crossed; otherwise symlinks are
    /// followed as long as they stay beneath the root.
    pub(crate) fn open_dir(
        &self,
        comps: &[OsString],
        flags: OFlag,
        strict: bool,
    ) -> Result<OwnedFd, ResolveError> {
        let path: PathBuf = if comps.is_empty() { PathBuf::from(".") } else { join(comps) };
        let mut resolve = ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS;
        if strict {
            resolve |= ResolveFlag::RESOLVE_NO_SYMLINKS;
        }
        let how =
            OpenHow::new().flags(flags | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC).resolve(resolve);
        openat2(self.fd.as_fd(), path.as_path(), how).map_err(|e| match e {
            Errno::EXDEV => ResolveError::Escape,
            Errno::ELOOP if strict => ResolveError::Symlink,
            // Without `strict`, ELOOP means a symlink loop or too many links: treat as hostile.
            Errno::ELOOP => ResolveError::Escape,
            e => ResolveError::Io(e.into()),
        })
    }
}

/// `/proc/self/fd/<dir>/<name>`: a path naming `name` inside an already-resolved directory,
/// for the few calls that have no `*at` variant (`lsetxattr`, `remove_dir_all`). Only the
/// last component is looked up, and callers use calls that do not follow it.
pub(crate) fn proc_path(dir: BorrowedFd<'_>, name: &OsStr) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    p.push(name);
    p
}

/// Lossy text of a raw name, for error messages.
pub(crate) fn display(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str) -> Result<Vec<String>, CleanError> {
        clean(name.as_bytes())
            .map(|v| v.into_iter().map(|s| s.to_string_lossy().into_owned()).collect())
    }

    #[test]
    fn clean_names() {
        assert_eq!(c("etc/passwd").unwrap(), ["etc", "passwd"]);
        assert_eq!(c("/etc/passwd").unwrap(), ["etc", "passwd"]);
        assert_eq!(c("./a//b/./").unwrap(), ["a", "b"]);
        assert_eq!(c("a/../b").unwrap(), ["b"]);
        assert!(c("./").unwrap().is_empty());
        assert_eq!(c("../x"), Err(CleanError::Escape));
        assert_eq!(c("a/../../x"), Err(CleanError::Escape));
        assert_eq!(c("/../x"), Err(CleanError::Escape));
        assert_eq!(clean(b"a\0b"), Err(CleanError::Nul));
    }

    #[test]
    fn open_dir_refuses_escapes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../..", root.join("up")).unwrap();
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
        let t = Tree::open(&root).unwrap();
        let p = |s: &str| clean(s.as_bytes()).unwrap();
        assert!(matches!(t.open_dir(&p("abs"), OFlag::O_PATH, false), Err(ResolveError::Escape)));
        assert!(matches!(t.open_dir(&p("up"), OFlag::O_PATH, false), Err(ResolveError::Escape)));
        assert!(t.open_dir(&p("lib"), OFlag::O_PATH, false).is_ok());
        assert!(matches!(t.open_dir(&p("lib"), OFlag::O_PATH, true), Err(ResolveError::Symlink)));
    }
}
