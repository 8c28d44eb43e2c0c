//! Reading a file of the container's rootfs without ever leaving it.
//!
//! The rootfs belongs to the image author: `/etc/passwd` may be a symlink to `/../../etc/shadow`
//! of the host. We resolve the path one component at a time with `O_NOFOLLOW`, and resolve each
//! symlink ourselves as if the rootfs were `/` (absolute targets restart at the rootfs, `..`
//! stops at it), like `openat2(RESOLVE_IN_ROOT)` but without needing that syscall.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{OFlag, openat, readlinkat};
use nix::sys::stat::{Mode, SFlag, fstat};

/// How many symlinks one lookup may traverse (the kernel's limit).
const MAX_SYMLINKS: usize = 40;

/// Opens `path` (taken as relative to `root` even if absolute) for reading, resolving every
/// symlink inside `root`. Errors with `NotFound` when the file does not exist in the rootfs.
pub fn open_in_root(root: &Path, path: &Path) -> io::Result<File> {
    let root_fd = openat(
        nix::fcntl::AT_FDCWD,
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // Directory fds from the root down to where we are; `..` pops, but never the root.
    let mut dirs: Vec<OwnedFd> = vec![root_fd];
    let mut queue: VecDeque<OsString> = components(path);
    let mut hops = 0usize;

    while let Some(name) = queue.pop_front() {
        if name == ".." {
            if dirs.len() > 1 {
                dirs.pop();
            }
            continue;
        }
        let Some(dir) = dirs.last() else {
            return Err(io::Error::other("directory stack empty"));
        };
        let fd = openat(
            dir,
            name.as_os_str(),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let st = fstat(&fd)?;
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFLNK {
            hops += 1;
            if hops > MAX_SYMLINKS {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            let target = readlinkat(dir, name.as_os_str())?;
            let target = PathBuf::from(target);
            if target.is_absolute() {
                dirs.truncate(1);
            }
            let mut rest = components(&target);
            rest.extend(queue);
            queue = rest;
            continue;
        }
        if queue.is_empty() {
            if kind != SFlag::S_IFREG {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
            }
            // Reopen for reading; O_NOFOLLOW makes a swap to a symlink since fstat fail.
            let file = openat(
                dir,
                name.as_os_str(),
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            return Ok(File::from(file));
        }
        if kind != SFlag::S_IFDIR {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        dirs.push(fd);
    }
    Err(io::Error::new(io::ErrorKind::InvalidInput, "path names the rootfs itself"))
}

/// Reads a whole file of the rootfs as text; `Ok(None)` when it does not exist there.
pub fn read_in_root(root: &Path, path: &Path) -> io::Result<Option<String>> {
    use std::io::Read;
    match open_in_root(root, path) {
        Ok(mut f) => {
            let mut s = String::new();
            f.read_to_string(&mut s)?;
            Ok(Some(s))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The normal and `..` components of `path`, as owned names.
fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .filter(|n| !n.as_bytes().is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn reads_plain_and_internal_symlinks() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::create_dir_all(root.path().join("usr/share")).unwrap();
        std::fs::write(root.path().join("usr/share/passwd"), "x").unwrap();
        symlink("/usr/share/passwd", root.path().join("etc/passwd")).unwrap();
        symlink("../usr/share/passwd", root.path().join("etc/rel")).unwrap();
        let got = read_in_root(root.path(), Path::new("/etc/passwd")).unwrap();
        assert_eq!(got.as_deref(), Some("x"));
        let got = read_in_root(root.path(), Path::new("/etc/rel")).unwrap();
        assert_eq!(got.as_deref(), Some("x"));
    }

    #[test]
    fn symlink_out_of_root_stays_inside() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host secret").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        // Absolute target: resolved inside the rootfs, where it does not exist.
        symlink(outside.path().join("secret"), root.path().join("etc/passwd")).unwrap();
        assert_eq!(read_in_root(root.path(), Path::new("/etc/passwd")).unwrap(), None);
        // Relative target climbing out: `..` stops at the rootfs.
        let depth = root.path().components().count();
        let up = "../".repeat(depth + 2);
        let rel = format!("{up}{}", outside.path().join("secret").display());
        symlink(&rel, root.path().join("etc/group")).unwrap();
        assert_eq!(read_in_root(root.path(), Path::new("/etc/group")).unwrap(), None);
        // A symlinked directory pointing out is resolved inside too.
        symlink(outside.path(), root.path().join("link")).unwrap();
        assert_eq!(read_in_root(root.path(), Path::new("/link/secret")).unwrap(), None);
    }

    #[test]
    fn symlink_loop_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        symlink("/b", root.path().join("a")).unwrap();
        symlink("/a", root.path().join("b")).unwrap();
        let err = read_in_root(root.path(), Path::new("/a")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
    }
}
