//! Mounting and unmounting container root filesystems.
//!
//! Overlay mounts go through the new mount API (`fsopen("overlay")`, one
//! `fsconfig("lowerdir+")` per layer, Linux >= 6.8): it has no page-size limit on options
//! and needs no escaping of `:`/`,` in paths. On older kernels we fall back to `mount(2)`
//! with a `lowerdir=a:b:...` option string, refusing when that exceeds a page.
//!
//! Writable mounts are `volatile` where the kernel has it (5.10+, new mount API path): no
//! fsync reaches the upper filesystem, and above all unmounting does not `syncfs` the whole
//! filesystem under it, which cost every RemoveContainer 6-36 ms here and, on busy nodes,
//! stalls everything writing to that disk (containerd#6478). Kubernetes never restarts a
//! container on an old writable layer, so its durability buys nothing.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use tracing::{debug, warn};

use crate::SnapshotError;

// From <linux/mount.h>; libc does not export them yet.
const FSOPEN_CLOEXEC: libc::c_uint = 0x1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 0x1;
const MOUNT_ATTR_RDONLY: libc::c_uint = 0x1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// mount(2) copies at most one page of options, NUL included.
const MAX_OPTIONS: usize = 4095;
/// How many stacked mounts at one target we take down at most.
const MAX_UNMOUNTS: usize = 16;

/// What to mount.
#[derive(Debug)]
pub(crate) struct Overlay<'a> {
    /// Layer dirs, top-most first.
    pub(crate) lowers: &'a [PathBuf],
    /// Upper and work dir, or `None` for a read-only mount of the lowers only.
    pub(crate) upper: Option<(&'a Path, &'a Path)>,
}

/// Mounts `overlay` at `target`.
pub(crate) fn mount_overlay(ov: &Overlay<'_>, target: &Path) -> Result<(), SnapshotError> {
    match mount_new_api(ov, target) {
        Ok(()) => Ok(()),
        Err(NewApi::Unsupported) => {
            debug!("new mount API or lowerdir+ unsupported, falling back to mount(2)");
            mount_legacy(ov, target)
        }
        Err(NewApi::Failed { source, detail }) => {
            Err(SnapshotError::Mount { kind: "overlay", target: target.to_owned(), detail, source })
        }
    }
}

/// Bind-mounts `source` read-only at `target` (a single read-only layer: overlayfs needs
/// two lower dirs when there is no upper).
pub(crate) fn bind_readonly(source: &Path, target: &Path) -> Result<(), SnapshotError> {
    let err = |e: Errno| SnapshotError::Mount {
        kind: "bind",
        target: target.to_owned(),
        detail: String::new(),
        source: e.into(),
    };
    mount(Some(source), target, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(err)?;
    // MS_RDONLY is ignored on the initial bind: it takes a remount.
    let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    if let Err(e) = mount(None::<&str>, target, None::<&str>, ro, None::<&str>) {
        if let Err(u) = umount2(target, MntFlags::MNT_DETACH) {
            warn!(target = %target.display(), error = %u, "could not undo bind mount");
        }
        return Err(err(e));
    }
    Ok(())
}

/// Unmounts everything mounted at `target` (lazily if busy). Nothing mounted is fine.
pub(crate) fn unmount_all(target: &Path) -> Result<(), SnapshotError> {
    let canonical = match target.canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SnapshotError::Unmount { target: target.to_owned(), source });
        }
    };
    // umount2 only takes down a mount whose root is exactly `canonical`, never a parent
    // (EINVAL: nothing is mounted there), so unmount until it says so. No look at
    // /proc/self/mountinfo first: its size, and so the cost of every removal, grows with the
    // number of containers.
    for _ in 0..MAX_UNMOUNTS {
        match umount2(&canonical, MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => {}
            Err(Errno::EINVAL | Errno::ENOENT) => break,
            Err(Errno::EBUSY) => {
                debug!(target = %canonical.display(), "rootfs busy, detaching lazily");
                umount2(&canonical, MntFlags::MNT_DETACH).map_err(|e| SnapshotError::Unmount {
                    target: target.to_owned(),
                    source: e.into(),
                })?;
            }
            Err(e) => {
                return Err(SnapshotError::Unmount { target: target.to_owned(), source: e.into() });
            }
        }
    }
    Ok(())
}

/// Failure of the new mount API path.
enum NewApi {
    /// The kernel lacks `fsopen` or overlay's `lowerdir+`: use mount(2).
    Unsupported,
    /// A real failure, with the kernel's log messages.
    Failed { source: io::Error, detail: String },
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
}

fn mount_new_api(ov: &Overlay<'_>, target: &Path) -> Result<(), NewApi> {
    let failed = |source: io::Error| NewApi::Failed { source, detail: String::new() };
    let fstype = cstring(b"overlay").map_err(failed)?;
    // SAFETY: fsopen takes a NUL-terminated string and flags; it returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENOSYS) => NewApi::Unsupported,
            _ => failed(e),
        });
    }
    // SAFETY: fd was just returned by fsopen and is owned by nobody else.
    let fs = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    let with_log = |source: io::Error| NewApi::Failed { source, detail: read_log(&fs) };

    for (i, lower) in ov.lowers.iter().enumerate() {
        if let Err(e) = set_string(&fs, "lowerdir+", lower) {
            // Kernels before 6.8 reject the unknown key with EINVAL.
            if i == 0 && e.raw_os_error() == Some(libc::EINVAL) {
                let _ = read_log(&fs);
                return Err(NewApi::Unsupported);
            }
            return Err(with_log(e));
        }
    }
    if let Some((upper, work)) = ov.upper {
        set_string(&fs, "upperdir", upper).map_err(with_log)?;
        set_string(&fs, "workdir", work).map_err(with_log)?;
        if let Err(e) = set_flag(&fs, "volatile") {
            debug!(error = %e, log = %read_log(&fs), "overlay without volatile");
        }
    }
    // SAFETY: plain syscall on our fd with null key/value as FSCONFIG_CMD_CREATE requires.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if rc < 0 {
        return Err(with_log(io::Error::last_os_error()));
    }
    let attrs = if ov.upper.is_none() { MOUNT_ATTR_RDONLY } else { 0 };
    // SAFETY: fsmount on our configured context fd; returns a new mount fd or -1.
    let mfd = unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, attrs) };
    if mfd < 0 {
        return Err(with_log(io::Error::last_os_error()));
    }
    // SAFETY: mfd was just returned by fsmount.
    let mnt = unsafe { OwnedFd::from_raw_fd(mfd as libc::c_int) };
    let target_c = cstring(target.as_os_str().as_bytes()).map_err(failed)?;
    let empty = cstring(b"").map_err(failed)?;
    // SAFETY: move_mount with valid fds and NUL-terminated paths.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            target_c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(failed(io::Error::last_os_error()));
    }
    Ok(())
}

/// `fsconfig(FSCONFIG_SET_STRING, key, path)`.
fn set_string(fs: &OwnedFd, key: &str, value: &Path) -> io::Result<()> {
    let key = cstring(key.as_bytes())?;
    let value = cstring(value.as_os_str().as_bytes())?;
    // SAFETY: NUL-terminated key and value, valid fd.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_SET_STRING,
            key.as_ptr(),
            value.as_ptr(),
            0,
        )
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// `fsconfig(FSCONFIG_SET_FLAG, key)`.
fn set_flag(fs: &OwnedFd, key: &str) -> io::Result<()> {
    let key = cstring(key.as_bytes())?;
    // SAFETY: NUL-terminated key, null value as FSCONFIG_SET_FLAG requires, valid fd.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_SET_FLAG,
            key.as_ptr(),
            std::ptr::null::<libc::c_char>(),
            0,
        )
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Drains the messages the kernel logged on a filesystem context ("e overlay: ...").
fn read_log(fs: &OwnedFd) -> String {
    let mut msgs = Vec::new();
    let mut buf = [0u8; 1024];
    // Bounded: the kernel keeps at most a handful of messages per context.
    for _ in 0..32 {
        // SAFETY: reading into a stack buffer of the given length.
        let n = unsafe { libc::read(fs.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        let len = usize::try_from(n).unwrap_or(0).min(buf.len());
        msgs.push(String::from_utf8_lossy(&buf[..len]).trim_end().to_owned());
    }
    msgs.join("; ")
}

fn mount_legacy(ov: &Overlay<'_>, target: &Path) -> Result<(), SnapshotError> {
    let data = legacy_options(ov);
    if data.len() > MAX_OPTIONS {
        return Err(SnapshotError::MountOptionsTooLong {
            layers: ov.lowers.len(),
            len: data.len(),
            max: MAX_OPTIONS,
        });
    }
    let flags = if ov.upper.is_none() { MsFlags::MS_RDONLY } else { MsFlags::empty() };
    mount(Some("overlay"), target, Some("overlay"), flags, Some(OsStr::from_bytes(&data))).map_err(
        |e| SnapshotError::Mount {
            kind: "overlay",
            target: target.to_owned(),
            detail: String::new(),
            source: e.into(),
        },
    )
}

/// `lowerdir=a:b,upperdir=u,workdir=w`, with `:`, `,` and `\` in paths backslash-escaped.
pub(crate) fn legacy_options(ov: &Overlay<'_>) -> Vec<u8> {
    fn push_escaped(out: &mut Vec<u8>, p: &Path) {
        for &b in p.as_os_str().as_bytes() {
            if matches!(b, b':' | b',' | b'\\') {
                out.push(b'\\');
            }
            out.push(b);
        }
    }
    let mut out = b"lowerdir=".to_vec();
    for (i, l) in ov.lowers.iter().enumerate() {
        if i > 0 {
            out.push(b':');
        }
        push_escaped(&mut out, l);
    }
    if let Some((upper, work)) = ov.upper {
        out.extend_from_slice(b",upperdir=");
        push_escaped(&mut out, upper);
        out.extend_from_slice(b",workdir=");
        push_escaped(&mut out, work);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_string() {
        let lowers = [PathBuf::from("/l/2"), PathBuf::from("/l/a:b")];
        let ov = Overlay { lowers: &lowers, upper: Some((Path::new("/u"), Path::new("/w,x"))) };
        assert_eq!(
            String::from_utf8(legacy_options(&ov)).unwrap(),
            r"lowerdir=/l/2:/l/a\:b,upperdir=/u,workdir=/w\,x"
        );
    }
}
