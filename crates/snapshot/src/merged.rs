//! The merged view of the layer being written and the layers below it.
//!
//! A layer tar is a diff against the root filesystem its parents make up, so its names mean
//! what they mean in that filesystem: `lib/foo.so` under a lower layer's `lib -> usr/lib`
//! lands in `usr/lib/foo.so`, and a hard link may name a file only a lower layer has. We
//! resolve names through the merged view ourselves, the way overlayfs looks them up: the
//! topmost layer holding a name wins, a whiteout (0:0 char device) hides the name below,
//! an opaque directory (`trusted.overlay.opaque=y`) hides the directories below it, and a
//! non-directory ends the merge of the directories below it. What is written always goes
//! into the new layer (the upper), which is where overlayfs would put it too.
//!
//! Why not mount an overlay of the parents with the new layer as upperdir and untar into
//! it: overlayfs would turn our writes into its own copy-ups, redirects and whiteouts (OCI
//! opaque markers have no merged-view equivalent, and a same-layer entry must survive its
//! own layer's opaque marker), it needs a mount per unpack (privileges, cleanup after a
//! crash, the 500-lower limit), and it would make every file write pay overlayfs' cost.
//! containerd's applier resolves through the parents the same way (`WithParents`).
//!
//! Every lookup is one `*at` call on an already-open directory with a single plain name and
//! no following of the final component, so no path ever leaves the layers: symlink targets
//! are interpreted by us, inside the root file system (an absolute target starts at its
//! root, `..` stops at its root, as in a chroot).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, readlinkat};
use nix::sys::stat::{
    FchmodatFlags, Mode, SFlag, UtimensatFlags, fchmod, fchmodat, fstat, fstatat, futimens,
    mkdirat, mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, symlinkat, unlinkat};

use crate::beneath::{ResolveError, Tree, proc_path};
use crate::whiteout::{self, Existing, OPAQUE_XATTR};

/// Symlinks followed while resolving one name (Linux' own limit).
const MAX_HOPS: usize = 40;
/// Overlayfs' own xattrs are never copied up: they describe the lower layer's place.
const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";

/// The layer being written on top of its (finished, read-only) parents.
pub(crate) struct Merged {
    /// The new layer.
    upper: Tree,
    /// The parents' roots, top first.
    lowers: Vec<File>,
}

/// The layer directories one directory of the merged view is made of, top first, with the
/// layer each comes from (0 = the upper).
pub(crate) struct View(Vec<(usize, File)>);

impl View {
    /// The topmost directory from a parent layer: whose metadata the merged directory
    /// shows while the upper has none.
    fn top_lower(&self) -> Option<&File> {
        self.0.iter().find(|(layer, _)| *layer > 0).map(|(_, d)| d)
    }
}

/// What a name is in the merged view.
pub(crate) enum Node {
    /// Nothing (never there, or whited out).
    Missing,
    /// A directory.
    Dir(View),
    /// Anything else (symlinks included), topmost in `layer`, whose directory is `dir`.
    Other {
        /// 0 = the upper.
        layer: usize,
        /// The layer's directory holding the name.
        dir: File,
        /// It is a symlink, with this target.
        symlink: Option<OsString>,
    },
}

fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<File> {
    let fd = openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    Ok(File::from(fd))
}

fn dup(file: &File) -> io::Result<File> {
    file.try_clone()
}

/// Whether the open directory `dir` is opaque.
fn is_opaque(dir: &File) -> io::Result<bool> {
    use xattr::FileExt;
    match dir.get_xattr(OPAQUE_XATTR) {
        Ok(v) => Ok(v.as_deref() == Some(&b"y"[..])),
        // No xattr support, or (without CAP_SYS_ADMIN) no access to trusted.*: not opaque.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENODATA)) => Ok(false),
        Err(e) => Err(e),
    }
}

impl Merged {
    /// Opens the new layer's root `upper` and the roots of its parents `lowers` (top first).
    pub(crate) fn open(upper: &Path, lowers: &[PathBuf]) -> io::Result<Self> {
        let upper = Tree::open(upper)?;
        let lowers = lowers
            .iter()
            .map(|p| {
                nix::fcntl::open(
                    p.as_path(),
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map(File::from)
                .map_err(io::Error::from)
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self { upper, lowers })
    }

    /// The new layer alone.
    pub(crate) fn upper(&self) -> &Tree {
        &self.upper
    }

    /// The root directory of the merged view.
    fn root(&self) -> io::Result<View> {
        let upper = File::from(self.upper.open_dir(&[], OFlag::O_RDONLY, true).map_err(io_of)?);
        let mut dirs = vec![(0, upper)];
        for (i, lower) in self.lowers.iter().enumerate() {
            if is_opaque(&dirs[dirs.len() - 1].1)? {
                break;
            }
            dirs.push((i + 1, dup(lower)?));
        }
        Ok(View(dirs))
    }

    /// Looks `name` up in the merged directory `view`, without following it.
    pub(crate) fn child(&self, view: &View, name: &OsStr) -> io::Result<Node> {
        let mut found: Option<View> = None;
        for (layer, dir) in &view.0 {
            let st = match fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            let fmt = st.st_mode & libc::S_IFMT;
            let whiteout = fmt == libc::S_IFCHR && st.st_rdev == 0;
            match &mut found {
                None if fmt == libc::S_IFDIR => {
                    let d = open_dir_at(dir.as_fd(), name)?;
                    let opaque = is_opaque(&d)?;
                    found = Some(View(vec![(*layer, d)]));
                    if opaque {
                        break;
                    }
                }
                None if whiteout => return Ok(Node::Missing),
                None => {
                    let symlink = if fmt == libc::S_IFLNK {
                        Some(readlinkat(dir.as_fd(), name)?)
                    } else {
                        None
                    };
                    return Ok(Node::Other { layer: *layer, dir: dup(dir)?, symlink });
                }
                // Below a directory: more of it, unless a whiteout or a file ends it.
                Some(v) if fmt == libc::S_IFDIR => {
                    let d = open_dir_at(dir.as_fd(), name)?;
                    let opaque = is_opaque(&d)?;
                    v.0.push((*layer, d));
                    if opaque {
                        break;
                    }
                }
                Some(_) => break,
            }
        }
        Ok(found.map_or(Node::Missing, Node::Dir))
    }

    /// The merged directory at `real` (a path without symlinks), `None` if missing.
    fn walk(&self, real: &[OsString]) -> Result<Option<View>, ResolveError> {
        let mut view = self.root().map_err(ResolveError::Io)?;
        for name in real {
            match self.child(&view, name).map_err(ResolveError::Io)? {
                Node::Dir(v) => view = v,
                Node::Missing => return Ok(None),
                Node::Other { symlink: Some(_), .. } => return Err(ResolveError::Symlink),
                Node::Other { .. } => return Err(ResolveError::Io(Errno::ENOTDIR.into())),
            }
        }
        Ok(Some(view))
    }

    /// Resolves the directory path `comps` through the merged view, following symlinks
    /// (none at all when `strict`), and returns its real path: no symlinks, every component
    /// a directory of the merged view or missing.
    pub(crate) fn resolve(
        &self,
        comps: &[OsString],
        strict: bool,
    ) -> Result<Vec<OsString>, ResolveError> {
        let mut pending: Vec<OsString> = comps.iter().rev().cloned().collect();
        let mut real: Vec<OsString> = Vec::new();
        let mut view = Some(self.root().map_err(ResolveError::Io)?);
        let mut hops = 0;
        while let Some(name) = pending.pop() {
            match name.as_bytes() {
                b"" | b"." => continue,
                b".." => {
                    // At the root, `..` is the root: the link stays inside.
                    real.pop();
                    view = self.walk(&real)?;
                    continue;
                }
                _ => {}
            }
            let Some(v) = &view else {
                real.push(name);
                continue;
            };
            match self.child(v, &name).map_err(ResolveError::Io)? {
                Node::Dir(child) => {
                    real.push(name);
                    view = Some(child);
                }
                Node::Missing => {
                    real.push(name);
                    view = None;
                }
                Node::Other { symlink: Some(target), .. } => {
                    if strict {
                        return Err(ResolveError::Symlink);
                    }
                    hops += 1;
                    if hops > MAX_HOPS {
                        // A loop, or a chain long enough to be one.
                        return Err(ResolveError::Escape);
                    }
                    let target = target.into_vec();
                    if target.starts_with(b"/") {
                        real.clear();
                        view = Some(self.root().map_err(ResolveError::Io)?);
                    }
                    for part in target.split(|&b| b == b'/').rev() {
                        pending.push(OsString::from_vec(part.to_vec()));
                    }
                }
                Node::Other { .. } => return Err(ResolveError::Io(Errno::ENOTDIR.into())),
            }
        }
        Ok(real)
    }

    /// What `name` in the merged directory at `real` (no symlinks) is.
    pub(crate) fn lookup(&self, real: &[OsString], name: &OsStr) -> Result<Node, ResolveError> {
        match self.walk(real)? {
            Some(view) => self.child(&view, name).map_err(ResolveError::Io),
            None => Ok(Node::Missing),
        }
    }

    /// Opens the upper's directory at `real` (a path from [`Merged::resolve`]), creating
    /// what is missing. A directory that exists below gets its owner, mode, xattrs and (in
    /// `created`, to set once nothing more is written into it) its mtime, as overlayfs'
    /// copy-up would give it: the upper's directory is what the merged view shows.
    pub(crate) fn make_upper_dirs(
        &self,
        real: &[OsString],
        created: &mut Vec<(Vec<OsString>, TimeSpec)>,
    ) -> Result<File, ResolveError> {
        let mut cur = File::from(self.upper.open_dir(&[], OFlag::O_RDONLY, true)?);
        let mut view = Some(self.root().map_err(ResolveError::Io)?);
        for (i, name) in real.iter().enumerate() {
            let below = match view.take() {
                Some(v) => match self.child(&v, name).map_err(ResolveError::Io)? {
                    Node::Dir(child) => {
                        view = Some(child);
                        view.as_ref().and_then(View::top_lower)
                    }
                    Node::Missing => None,
                    Node::Other { symlink: Some(_), .. } => return Err(ResolveError::Symlink),
                    Node::Other { .. } => return Err(ResolveError::Io(Errno::ENOTDIR.into())),
                },
                None => None,
            };
            let ex = whiteout::existing(cur.as_fd(), name).map_err(ResolveError::Io)?;
            cur = match ex {
                Existing::Dir => open_dir_at(cur.as_fd(), name).map_err(ResolveError::Io)?,
                Existing::Other => return Err(ResolveError::Io(Errno::ENOTDIR.into())),
                Existing::Missing | Existing::Whiteout => {
                    let io = ResolveError::Io;
                    if ex == Existing::Whiteout {
                        unlinkat(cur.as_fd(), name.as_os_str(), UnlinkatFlags::NoRemoveDir)
                            .map_err(|e| io(e.into()))?;
                    }
                    mkdirat(cur.as_fd(), name.as_os_str(), Mode::from_bits_truncate(0o755))
                        .map_err(|e| io(e.into()))?;
                    let dir = open_dir_at(cur.as_fd(), name).map_err(io)?;
                    if let Some(src) = below {
                        let mtime = copy_dir_meta(src, &dir).map_err(ResolveError::Io)?;
                        created.push((real[..=i].to_vec(), mtime));
                    }
                    // This layer deleted the name and now puts a directory there: it must
                    // still hide what is below.
                    if ex == Existing::Whiteout {
                        whiteout::set_opaque(&dir).map_err(ResolveError::Io)?;
                    }
                    dir
                }
            };
        }
        Ok(cur)
    }
}

fn io_of(e: ResolveError) -> io::Error {
    match e {
        ResolveError::Io(e) => e,
        ResolveError::Escape | ResolveError::Symlink => Errno::ELOOP.into(),
    }
}

/// Copies owner, mode and xattrs of the directory `src` to `dst`; returns `src`'s mtime.
fn copy_dir_meta(src: &File, dst: &File) -> io::Result<TimeSpec> {
    use xattr::FileExt;
    let st = fstat(src.as_fd())?;
    fchown(dst.as_fd(), Some(Uid::from_raw(st.st_uid)), Some(Gid::from_raw(st.st_gid)))?;
    for key in src.list_xattr()? {
        if key.as_bytes().starts_with(OVERLAY_XATTR_PREFIX) {
            continue;
        }
        if let Some(value) = src.get_xattr(&key)? {
            set_tolerant(dst.set_xattr(&key, &value))?;
        }
    }
    fchmod(dst.as_fd(), Mode::from_bits_truncate(st.st_mode & 0o7777))?;
    Ok(TimeSpec::new(st.st_mtime, st.st_mtime_nsec))
}

/// An xattr the destination filesystem cannot hold is skipped, as in unpacking.
fn set_tolerant(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        other => other,
    }
}

/// Copies the xattrs of `name` in `src_dir` to `name` in `dst_dir`, neither followed.
fn copy_xattrs_at(
    src_dir: BorrowedFd<'_>,
    dst_dir: BorrowedFd<'_>,
    name: &OsStr,
) -> io::Result<()> {
    // `xattr`'s path calls are the l* variants: the final name is not followed.
    let (src, dst) = (proc_path(src_dir, name), proc_path(dst_dir, name));
    for key in xattr::list(&src)? {
        if key.as_bytes().starts_with(OVERLAY_XATTR_PREFIX) {
            continue;
        }
        if let Some(value) = xattr::get(&src, &key)? {
            set_tolerant(xattr::set(&dst, &key, &value))?;
        }
    }
    Ok(())
}

/// Copies the non-directory `name` from a lower layer's directory `src_dir` into the
/// upper's `dst_dir` (where nothing has that name): content, owner, mode, xattrs and times,
/// as overlayfs' copy-up does before a hard link is made to a lower file.
pub(crate) fn copy_up(
    src_dir: BorrowedFd<'_>,
    dst_dir: BorrowedFd<'_>,
    name: &OsStr,
) -> io::Result<()> {
    let st = fstatat(src_dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
    let (uid, gid) = (Some(Uid::from_raw(st.st_uid)), Some(Gid::from_raw(st.st_gid)));
    let perm = Mode::from_bits_truncate(st.st_mode & 0o7777);
    let atime = TimeSpec::new(st.st_atime, st.st_atime_nsec);
    let mtime = TimeSpec::new(st.st_mtime, st.st_mtime_nsec);
    let fmt = st.st_mode & libc::S_IFMT;
    match fmt {
        libc::S_IFREG => {
            use xattr::FileExt;
            let flags = OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            let mut src =
                File::from(openat(src_dir, name, OFlag::O_RDONLY | flags, Mode::empty())?);
            let mut dst = File::from(openat(
                dst_dir,
                name,
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | flags,
                Mode::from_bits_truncate(0o600),
            )?);
            // std uses copy_file_range: a reflink or an in-kernel copy where it can.
            io::copy(&mut src, &mut dst)?;
            fchown(dst.as_fd(), uid, gid)?;
            for key in src.list_xattr()? {
                if key.as_bytes().starts_with(OVERLAY_XATTR_PREFIX) {
                    continue;
                }
                if let Some(value) = src.get_xattr(&key)? {
                    set_tolerant(dst.set_xattr(&key, &value))?;
                }
            }
            fchmod(dst.as_fd(), perm)?;
            futimens(dst.as_fd(), &atime, &mtime)?;
        }
        libc::S_IFLNK => {
            let target = readlinkat(src_dir, name)?;
            symlinkat(target.as_os_str(), dst_dir, name)?;
            fchownat(dst_dir, name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)?;
            copy_xattrs_at(src_dir, dst_dir, name)?;
            utimensat(dst_dir, name, &atime, &mtime, UtimensatFlags::NoFollowSymlink)?;
        }
        libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO => {
            let kind = SFlag::from_bits_truncate(fmt);
            mknodat(dst_dir, name, kind, perm, st.st_rdev)?;
            fchownat(dst_dir, name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)?;
            copy_xattrs_at(src_dir, dst_dir, name)?;
            // The node we just made, in a directory only we write to: not a symlink.
            fchmodat(dst_dir, name, perm, FchmodatFlags::FollowSymlink)?;
            utimensat(dst_dir, name, &atime, &mtime, UtimensatFlags::NoFollowSymlink)?;
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("cannot copy up a file of type {fmt:o}"),
            ));
        }
    }
    Ok(())
}
