//! OCI whiteouts turned into overlayfs whiteouts.
//!
//! OCI layers mark deletions with empty files: `.wh.<name>` hides `<name>` of the layers
//! below, `.wh..wh..opq` hides everything below in its directory. Overlayfs expresses the same
//! with a 0:0 character device named `<name>` and the xattr `trusted.overlay.opaque=y` on the
//! directory. Whiteouts only hide lower layers: an entry of the same layer keeps its place.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::sys::stat::{Mode, SFlag, fstatat, mknodat};

use crate::beneath::proc_path;

/// Prefix of OCI whiteout files.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Prefix of AUFS metadata entries (`.wh..wh.plnk`, ...), which carry nothing for us.
const META_PREFIX: &[u8] = b".wh..wh.";
/// The opaque-directory marker.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// The xattr overlayfs reads to make a directory opaque.
pub(crate) const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// What a tar entry's base name means.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Marker<'a> {
    /// An ordinary entry.
    None,
    /// `.wh..wh..opq`: the parent directory is opaque.
    Opaque,
    /// `.wh.<name>`: `<name>` is deleted.
    Whiteout(&'a OsStr),
    /// Other `.wh..wh.*` AUFS metadata, skipped.
    Ignored,
}

/// Classifies a base name.
pub(crate) fn classify(base: &OsStr) -> Marker<'_> {
    let b = base.as_bytes();
    if b == OPAQUE_MARKER {
        Marker::Opaque
    } else if b.starts_with(META_PREFIX) {
        Marker::Ignored
    } else if let Some(rest) = b.strip_prefix(WHITEOUT_PREFIX) {
        Marker::Whiteout(OsStr::from_bytes(rest))
    } else {
        Marker::None
    }
}

/// What sits at a name in the layer being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Existing {
    /// Nothing.
    Missing,
    /// A directory.
    Dir,
    /// An overlayfs whiteout (char device 0:0).
    Whiteout,
    /// Any other file.
    Other,
}

/// Looks at `name` in `dir` without following it.
pub(crate) fn existing(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Existing> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(Errno::ENOENT) => Ok(Existing::Missing),
        Err(e) => Err(e.into()),
        Ok(st) => {
            let fmt = st.st_mode & libc::S_IFMT;
            Ok(if fmt == libc::S_IFDIR {
                Existing::Dir
            } else if fmt == libc::S_IFCHR && st.st_rdev == 0 {
                Existing::Whiteout
            } else {
                Existing::Other
            })
        }
    }
}

/// Writes the overlayfs whiteout for `name` in `dir`. When `name` already exists in this
/// layer it stays (whiteouts only hide lower layers); an existing directory is made opaque
/// instead, since it must still hide the lower directory's contents.
pub(crate) fn whiteout(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    match existing(dir, name)? {
        Existing::Missing => {
            mknodat(dir, name, SFlag::S_IFCHR, Mode::empty(), 0)?;
            Ok(())
        }
        Existing::Dir => set_opaque_at(dir, name),
        Existing::Whiteout | Existing::Other => Ok(()),
    }
}

/// Marks the directory `name` in `dir` opaque.
pub(crate) fn set_opaque_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    xattr::set(proc_path(dir.as_fd(), name), OPAQUE_XATTR, b"y")
}

/// Marks the open directory `dir` opaque.
pub(crate) fn set_opaque(dir: &std::fs::File) -> io::Result<()> {
    use xattr::FileExt;
    dir.set_xattr(OPAQUE_XATTR, b"y")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_names() {
        assert_eq!(classify(OsStr::new("file")), Marker::None);
        assert_eq!(classify(OsStr::new(".wh..wh..opq")), Marker::Opaque);
        assert_eq!(classify(OsStr::new(".wh..wh.plnk")), Marker::Ignored);
        assert_eq!(classify(OsStr::new(".wh.foo")), Marker::Whiteout(OsStr::new("foo")));
        assert_eq!(classify(OsStr::new(".wh.")), Marker::Whiteout(OsStr::new("")));
        assert_eq!(classify(OsStr::new(".whx")), Marker::None);
    }
}
