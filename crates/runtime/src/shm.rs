//! The pod's `/dev/shm`: a tmpfs in the pod directory that every container bind-mounts, so
//! containers of one pod share POSIX shared memory.

use std::path::Path;

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::error::{Result, RuntimeError};

/// Size of the pod's shm, as Docker and containerd default to.
const SHM_SIZE: &str = "size=65536k";

/// Mounts the tmpfs at `target` (created if missing).
pub(crate) fn mount_shm(target: &Path) -> Result<()> {
    std::fs::create_dir_all(target).map_err(RuntimeError::io("create directory", target))?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("shm"), target, Some("tmpfs"), flags, Some(format!("mode=1777,{SHM_SIZE}").as_str()))
        .map_err(|source| RuntimeError::Sys { call: "mount(tmpfs /dev/shm)", source })
}

/// Unmounts it (lazily: a container may still hold it open). Idempotent.
pub(crate) fn unmount_shm(target: &Path) -> Result<()> {
    loop {
        match umount2(target, MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return Ok(()),
            Err(source) => return Err(RuntimeError::Sys { call: "umount(/dev/shm)", source }),
        }
    }
}
