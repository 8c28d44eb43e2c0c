//! Writing the entries of a layer tar into a layer directory.
//!
//! Every entry is created with `*at` calls on its parent directory in the new layer. The
//! parent's name is resolved through the merged view of the new layer and its parents (see
//! [`crate::merged`]): symlinks of any layer are followed inside the root file system, and
//! directories that exist only below are created in the new layer with their metadata. The
//! entry's own name is never followed. Ownership,
//! permission bits (setuid included: chown comes before chmod because chown clears them),
//! PAX `SCHILY.xattr.*` attributes and modification times are preserved. Directory times are
//! set after all entries are written, since writing into a directory changes its mtime.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{
    FchmodatFlags, Mode, SFlag, UtimensatFlags, fchmod, fchmodat, futimens, makedev, mkdirat,
    mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, linkat, symlinkat, unlinkat};
use tar::EntryType;
use tracing::{debug, warn};

use crate::beneath::{CleanError, ResolveError, clean, display, proc_path};
use crate::error::{SnapshotError, UnsafeReason};
use crate::lenient::EntryEnd;
use crate::merged::{self, Merged, Node};
use crate::whiteout::{self, Existing, Marker, OPAQUE_XATTR};

/// What an unpack accepts beyond plain files.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    /// Whether character/block device nodes may be created.
    pub(crate) allow_device_nodes: bool,
}

/// Prefix of PAX records carrying extended attributes (GNU tar, Docker, containerd).
const PAX_XATTR: &[u8] = b"SCHILY.xattr.";
/// Overlayfs' own xattrs: an image may carry only the opaque flag; the others
/// (`redirect`, `metacopy`, `origin`...) would let a layer steer overlayfs lookups.
const OVERLAY_XATTR_PREFIX: &str = "trusted.overlay.";
/// Copy buffer for file contents.
const COPY_BUF: usize = 128 * 1024;

/// Owner, mode, times and xattrs of one entry.
#[derive(Debug)]
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: TimeSpec,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

/// Writes every entry of `archive` into the new layer `root`, on top of its parents'
/// directories `lowers` (top first). Each entry's extent goes to `end` (see
/// [`crate::lenient`]).
pub(crate) fn apply<R: Read>(
    archive: &mut tar::Archive<R>,
    root: &Path,
    lowers: &[PathBuf],
    end: &EntryEnd,
    blob: &Path,
    policy: Policy,
) -> Result<(), SnapshotError> {
    let merged = Merged::open(root, lowers).map_err(|source| SnapshotError::Io {
        action: "open layer directories",
        path: root.to_owned(),
        source,
    })?;
    let mut applier = Applier { merged, blob, policy, dir_times: Vec::new() };
    let read_err = |source| SnapshotError::ReadLayer { blob: blob.to_owned(), source };
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        end.set(entry.raw_file_position(), entry.size());
        applier.entry(&mut entry)?;
    }
    applier.set_dir_times(root)
}

struct Applier<'a> {
    merged: Merged,
    blob: &'a Path,
    policy: Policy,
    /// Directories written, with the mtime to give them at the end.
    dir_times: Vec<(Vec<OsString>, TimeSpec)>,
}

/// Builds an `ApplyEntry` error mapper.
fn fail<'a>(entry: &'a str, action: &'static str) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::ApplyEntry { entry: entry.to_owned(), action, source }
}

/// Same for `nix` results.
fn nfail<'a>(entry: &'a str, action: &'static str) -> impl FnOnce(Errno) -> SnapshotError + 'a {
    move |e| SnapshotError::ApplyEntry { entry: entry.to_owned(), action, source: e.into() }
}

fn refuse(entry: &str, reason: UnsafeReason) -> SnapshotError {
    SnapshotError::UnsafeEntry { entry: entry.to_owned(), reason }
}

impl Applier<'_> {
    fn read_err(&self, source: io::Error) -> SnapshotError {
        SnapshotError::ReadLayer { blob: self.blob.to_owned(), source }
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), SnapshotError> {
        let mut kind = entry.header().entry_type();
        // Long names and per-entry PAX headers are folded into the next entry by the tar
        // crate; global PAX headers carry nothing we use.
        if matches!(kind, EntryType::XGlobalHeader | EntryType::XHeader) {
            return Ok(());
        }
        let raw = entry.path_bytes().into_owned();
        let name = display(&raw);
        // Pre-POSIX tars mark directories with a trailing slash on a regular entry.
        if kind == EntryType::Regular && raw.ends_with(b"/") {
            kind = EntryType::Directory;
        }
        let comps = clean(&raw).map_err(|e| {
            refuse(
                &name,
                match e {
                    CleanError::Escape => UnsafeReason::ParentDirEscape,
                    CleanError::Nul => UnsafeReason::InvalidName,
                },
            )
        })?;
        let meta = self.meta(entry)?;

        let Some((base, parent)) = comps.split_last() else {
            // The layer root itself (`./`).
            if kind != EntryType::Directory {
                return Err(refuse(&name, UnsafeReason::InvalidName));
            }
            let (_, root) = self.parent(&[], &name)?;
            set_meta_fd(&root, &meta, &name)?;
            self.dir_times.push((Vec::new(), meta.mtime));
            return Ok(());
        };

        match whiteout::classify(base) {
            Marker::None => {}
            Marker::Ignored => {
                debug!(entry = %name, "skipping AUFS metadata entry");
                return Ok(());
            }
            Marker::Opaque => {
                let (_, dir) = self.parent(parent, &name)?;
                return whiteout::set_opaque(&dir).map_err(fail(&name, "set opaque xattr"));
            }
            Marker::Whiteout(hidden) => {
                if matches!(hidden.as_bytes(), b"" | b"." | b"..") {
                    return Err(refuse(&name, UnsafeReason::InvalidName));
                }
                let (_, dir) = self.parent(parent, &name)?;
                return whiteout::whiteout(dir.as_fd(), hidden)
                    .map_err(fail(&name, "create whiteout"));
            }
        }

        let (real, dir) = self.parent(parent, &name)?;
        let dir = dir.as_fd();
        match kind {
            EntryType::Directory => {
                self.directory(dir, base, &name, &meta)?;
                let mut path = real;
                path.push(base.clone());
                self.dir_times.push((path, meta.mtime));
                Ok(())
            }
            EntryType::Regular | EntryType::Continuous => self.file(dir, base, &name, &meta, entry),
            EntryType::Symlink => {
                let target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                symlink(dir, base, &name, &meta, OsStr::from_bytes(&target))
            }
            EntryType::Link => {
                let target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                self.hardlink(dir, base, &name, &real, &target)
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                self.node(dir, base, &name, &meta, entry.header(), kind)
            }
            other => Err(SnapshotError::UnsupportedEntry {
                entry: name,
                kind: char::from(other.as_byte()),
            }),
        }
    }

    /// Reads owner, mode, mtime and xattrs from the header and its PAX records.
    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>) -> Result<Meta, SnapshotError> {
        let h = entry.header();
        let bad = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("tar header field {what} out of range"),
            )
        };
        let mut uid = h.uid().map_err(|e| self.read_err(e))?;
        let mut gid = h.gid().map_err(|e| self.read_err(e))?;
        let mode = h.mode().map_err(|e| self.read_err(e))? & 0o7777;
        let secs = h.mtime().map_err(|e| self.read_err(e))?;
        let mut mtime =
            TimeSpec::new(i64::try_from(secs).map_err(|_| self.read_err(bad("mtime")))?, 0);
        let mut xattrs = Vec::new();
        if let Some(exts) = entry.pax_extensions().map_err(|e| self.read_err(e))? {
            for ext in exts {
                let ext = ext.map_err(|e| self.read_err(e))?;
                let (key, value) = (ext.key_bytes(), ext.value_bytes());
                if let Some(xname) = key.strip_prefix(PAX_XATTR) {
                    xattrs.push((OsStr::from_bytes(xname).to_owned(), value.to_vec()));
                    continue;
                }
                let text = std::str::from_utf8(value).unwrap_or("");
                match key {
                    b"uid" => uid = text.parse().map_err(|_| self.read_err(bad("uid")))?,
                    b"gid" => gid = text.parse().map_err(|_| self.read_err(bad("gid")))?,
                    b"mtime" => {
                        mtime = parse_pax_time(text).ok_or_else(|| self.read_err(bad("mtime")))?
                    }
                    _ => {}
                }
            }
        }
        Ok(Meta {
            uid: u32::try_from(uid).map_err(|_| self.read_err(bad("uid")))?,
            gid: u32::try_from(gid).map_err(|_| self.read_err(bad("gid")))?,
            mode,
            mtime,
            xattrs,
        })
    }

    /// Opens (creating as needed, in the new layer) the parent directory `comps` of an
    /// entry, resolved through the merged view; returns its real path too.
    fn parent(
        &mut self,
        comps: &[OsString],
        name: &str,
    ) -> Result<(Vec<OsString>, File), SnapshotError> {
        let refused = |e| match e {
            ResolveError::Escape | ResolveError::Symlink => {
                refuse(name, UnsafeReason::SymlinkEscape)
            }
            ResolveError::Io(e) => fail(name, "create parent directories")(e),
        };
        // Fast path: the new layer has the directory already, without symlinks on the way,
        // so that is what the merged view shows too (the new layer is on top).
        if let Ok(fd) = self.merged.upper().open_dir(comps, OFlag::O_RDONLY, true) {
            return Ok((comps.to_vec(), File::from(fd)));
        }
        let real = self.merged.resolve(comps, false).map_err(refused)?;
        let dir = self.merged.make_upper_dirs(&real, &mut self.dir_times).map_err(refused)?;
        Ok((real, dir))
    }

    fn directory(
        &self,
        dir: BorrowedFd<'_>,
        base: &OsStr,
        name: &str,
        meta: &Meta,
    ) -> Result<(), SnapshotError> {
        let ex = whiteout::existing(dir, base).map_err(fail(name, "stat"))?;
        if ex != Existing::Dir {
            if ex != Existing::Missing {
                unlinkat(dir, base, UnlinkatFlags::NoRemoveDir).map_err(nfail(name, "replace"))?;
            }
            mkdirat(dir, base, Mode::from_bits_truncate(0o700))
                .map_err(nfail(name, "create directory"))?;
        }
        let fd = openat(
            dir,
            base,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(nfail(name, "open directory"))?;
        let file = File::from(fd);
        // A directory replacing a whiteout of this layer must still hide the lower one.
        if ex == Existing::Whiteout {
            whiteout::set_opaque(&file).map_err(fail(name, "set opaque xattr"))?;
        }
        set_meta_fd(&file, meta, name)
    }

    fn file<R: Read>(
        &self,
        dir: BorrowedFd<'_>,
        base: &OsStr,
        name: &str,
        meta: &Meta,
        data: &mut R,
    ) -> Result<(), SnapshotError> {
        clear(dir, base).map_err(fail(name, "replace"))?;
        let fd = openat(
            dir,
            base,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(nfail(name, "create file"))?;
        let mut file = File::from(fd);
        let mut buf = vec![0u8; COPY_BUF];
        loop {
            let n = match data.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.read_err(e)),
            };
            file.write_all(&buf[..n]).map_err(fail(name, "write file"))?;
        }
        set_meta_fd(&file, meta, name)?;
        futimens(file.as_fd(), &meta.mtime, &meta.mtime).map_err(nfail(name, "set times"))
    }

    fn hardlink(
        &mut self,
        dir: BorrowedFd<'_>,
        base: &OsStr,
        name: &str,
        parent: &[OsString],
        target: &[u8],
    ) -> Result<(), SnapshotError> {
        // Link targets name a file of the root file system as it is so far (an earlier entry
        // of this tar, or a file of a layer below), relative to its root.
        let tcomps = clean(target).map_err(|e| {
            refuse(
                name,
                match e {
                    CleanError::Escape => UnsafeReason::HardlinkOutside,
                    CleanError::Nul => UnsafeReason::InvalidName,
                },
            )
        })?;
        let Some((tbase, tparent)) = tcomps.split_last() else {
            return Err(refuse(name, UnsafeReason::HardlinkToRoot));
        };
        if tparent == parent && tbase == base {
            return Ok(());
        }
        // Strict: a tar writer records the real path of the first link, never one through
        // a symlink, so any symlink on the way is an attempt to reach something else.
        let node = self.merged.lookup(tparent, tbase).map_err(|e| match e {
            ResolveError::Escape => refuse(name, UnsafeReason::HardlinkOutside),
            ResolveError::Symlink => refuse(name, UnsafeReason::HardlinkThroughSymlink),
            ResolveError::Io(e) => fail(name, "look up hard link target")(e),
        })?;
        let tdir = match node {
            Node::Missing => {
                return Err(fail(name, "hard link target is in neither this layer nor below")(
                    Errno::ENOENT.into(),
                ));
            }
            Node::Dir(_) => {
                return Err(fail(name, "create hard link to a directory")(Errno::EPERM.into()));
            }
            Node::Other { layer: 0, dir, .. } => dir,
            // Only a lower layer has it: copy it up first, as overlayfs would before
            // linking, and link to the copy.
            Node::Other { dir: lower, .. } => {
                let (_, upper) = self.parent(tparent, name)?;
                merged::copy_up(lower.as_fd(), upper.as_fd(), tbase)
                    .map_err(fail(name, "copy up hard link target"))?;
                upper
            }
        };
        clear(dir, base).map_err(fail(name, "replace"))?;
        // Flags empty: if the target is a symlink, link the symlink itself, never its target.
        linkat(tdir.as_fd(), tbase.as_os_str(), dir, base, AtFlags::empty())
            .map_err(nfail(name, "create hard link"))
    }

    fn node(
        &self,
        dir: BorrowedFd<'_>,
        base: &OsStr,
        name: &str,
        meta: &Meta,
        header: &tar::Header,
        kind: EntryType,
    ) -> Result<(), SnapshotError> {
        let sflag = match kind {
            EntryType::Char => SFlag::S_IFCHR,
            EntryType::Block => SFlag::S_IFBLK,
            _ => SFlag::S_IFIFO,
        };
        if sflag != SFlag::S_IFIFO && !self.policy.allow_device_nodes {
            return Err(refuse(name, UnsafeReason::DeviceNode));
        }
        // FIFOs have no device numbers, and some writers leave those fields empty.
        let (major, minor) = if sflag == SFlag::S_IFIFO {
            (0, 0)
        } else {
            (
                header.device_major().map_err(|e| self.read_err(e))?.unwrap_or(0),
                header.device_minor().map_err(|e| self.read_err(e))?.unwrap_or(0),
            )
        };
        clear(dir, base).map_err(fail(name, "replace"))?;
        mknodat(
            dir,
            base,
            sflag,
            Mode::from_bits_truncate(meta.mode),
            makedev(u64::from(major), u64::from(minor)),
        )
        .map_err(nfail(name, "create device node"))?;
        fchownat(
            dir,
            base,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(nfail(name, "chown"))?;
        set_xattrs(&meta.xattrs, name, |k, v| xattr::set(proc_path(dir, base), k, v))?;
        // The name is the node we just made in a directory only we write to: not a symlink.
        fchmodat(dir, base, Mode::from_bits_truncate(meta.mode), FchmodatFlags::FollowSymlink)
            .map_err(nfail(name, "chmod"))?;
        utimensat(dir, base, &meta.mtime, &meta.mtime, UtimensatFlags::NoFollowSymlink)
            .map_err(nfail(name, "set times"))
    }

    /// Gives every directory written its mtime from the tar, now that nothing more is
    /// written into them.
    fn set_dir_times(&self, root: &Path) -> Result<(), SnapshotError> {
        for (comps, mtime) in &self.dir_times {
            let fd = match self.merged.upper().open_dir(comps, OFlag::O_RDONLY, true) {
                Ok(fd) => fd,
                // Replaced by a later entry (file, symlink) or removed: nothing to date.
                Err(ResolveError::Symlink) => continue,
                Err(ResolveError::Io(e))
                    if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) =>
                {
                    continue;
                }
                Err(ResolveError::Escape) => continue,
                Err(ResolveError::Io(source)) => {
                    return Err(SnapshotError::Io {
                        action: "open directory to set its time",
                        path: root.join(crate::beneath::join(comps)),
                        source,
                    });
                }
            };
            futimens(fd.as_fd(), mtime, mtime).map_err(|e| SnapshotError::Io {
                action: "set directory time",
                path: root.join(crate::beneath::join(comps)),
                source: e.into(),
            })?;
        }
        Ok(())
    }
}

fn symlink(
    dir: BorrowedFd<'_>,
    base: &OsStr,
    name: &str,
    meta: &Meta,
    target: &OsStr,
) -> Result<(), SnapshotError> {
    clear(dir, base).map_err(fail(name, "replace"))?;
    symlinkat(target, dir, base).map_err(nfail(name, "create symlink"))?;
    fchownat(
        dir,
        base,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(nfail(name, "chown"))?;
    // lsetxattr (what `xattr::set` uses) does not follow the final symlink.
    set_xattrs(&meta.xattrs, name, |k, v| xattr::set(proc_path(dir, base), k, v))?;
    utimensat(dir, base, &meta.mtime, &meta.mtime, UtimensatFlags::NoFollowSymlink)
        .map_err(nfail(name, "set times"))
}

/// Owner, xattrs, then mode (chown would clear setuid/setgid bits set before it).
fn set_meta_fd(file: &File, meta: &Meta, name: &str) -> Result<(), SnapshotError> {
    use xattr::FileExt;
    fchown(file.as_fd(), Some(Uid::from_raw(meta.uid)), Some(Gid::from_raw(meta.gid)))
        .map_err(nfail(name, "chown"))?;
    set_xattrs(&meta.xattrs, name, |k, v| file.set_xattr(k, v))?;
    fchmod(file.as_fd(), Mode::from_bits_truncate(meta.mode)).map_err(nfail(name, "chmod"))
}

/// Applies the entry's xattrs through `set`, skipping overlayfs-internal ones and tolerating
/// a filesystem without xattr support for a namespace.
fn set_xattrs(
    xattrs: &[(OsString, Vec<u8>)],
    name: &str,
    mut set: impl FnMut(&OsStr, &[u8]) -> io::Result<()>,
) -> Result<(), SnapshotError> {
    for (key, value) in xattrs {
        let text = key.to_string_lossy();
        if text.starts_with(OVERLAY_XATTR_PREFIX) && text != OPAQUE_XATTR {
            warn!(entry = %name, xattr = %text, "dropping overlayfs-internal xattr from layer");
            continue;
        }
        match set(key, value) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                warn!(entry = %name, xattr = %text, "filesystem does not support xattr, skipped");
            }
            Err(e) => return Err(fail(name, "set xattr")(e)),
        }
    }
    Ok(())
}

/// Removes whatever is at `base` so a new entry can take its place (tar semantics: later
/// entries win).
fn clear(dir: BorrowedFd<'_>, base: &OsStr) -> io::Result<()> {
    match whiteout::existing(dir, base)? {
        Existing::Missing => Ok(()),
        // `remove_dir_all` never follows symlinks inside the tree it removes.
        Existing::Dir => std::fs::remove_dir_all(proc_path(dir, base)),
        Existing::Whiteout | Existing::Other => {
            unlinkat(dir, base, UnlinkatFlags::NoRemoveDir).map_err(io::Error::from)
        }
    }
}

/// Parses a PAX time (`"1700000000.5"`, possibly negative) into a timespec.
fn parse_pax_time(text: &str) -> Option<TimeSpec> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    let secs: i64 = int.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let mut nanos: i64 = digits.parse().ok()?;
    // "-1.5" is 1.5 seconds before the epoch: -2 s + 0.5 s.
    let secs = if int.starts_with('-') && nanos > 0 {
        nanos = 1_000_000_000 - nanos;
        secs - 1
    } else {
        secs
    };
    Some(TimeSpec::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        let t = parse_pax_time("1700000000.25").unwrap();
        assert_eq!((t.tv_sec(), t.tv_nsec()), (1_700_000_000, 250_000_000));
        let t = parse_pax_time("12").unwrap();
        assert_eq!((t.tv_sec(), t.tv_nsec()), (12, 0));
        let t = parse_pax_time("-1.5").unwrap();
        assert_eq!((t.tv_sec(), t.tv_nsec()), (-2, 500_000_000));
        assert!(parse_pax_time("x").is_none());
        assert!(parse_pax_time("1.x").is_none());
    }
}
