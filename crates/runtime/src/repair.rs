//! Startup repair: removes what a crashed berthd left behind that no record owns.
//!
//! A crash in the middle of RunPodSandbox, CreateContainer or a removal leaves resources
//! whose record was never written (or already deleted): the record is written last on
//! create and deleted last on remove, so everything without one is garbage. Swept, in an
//! order that frees what holds the next thing: OCI runtime containers (their processes),
//! container bundles with their overlay rootfs mounts, writable snapshot layers, pod
//! directories with their namespace pins, shm mounts and init processes, pod shims, and
//! empty cgroups under the configured cgroup parent. Everything is best effort and logged.
//!
//! Cgroups are only ever `rmdir`ed, never emptied by killing: the cgroup parent may be
//! shared with another runtime, whose live containers must not be touched.

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_shim::Shim;
use nix::mount::{MntFlags, umount2};

use crate::Runtime;
use crate::util::remove_dir_all;

/// How long `<runtime> delete --force` of an orphan container may take.
const RUNTIME_DELETE_TIMEOUT: Duration = Duration::from_secs(30);

/// Decodes the octal escapes (`\040` for a space, ...) of a `/proc/self/mountinfo` path.
fn unescape_mount_path(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(digits) = std::str::from_utf8(&bytes[i + 1..i + 4])
            && let Ok(v) = u8::from_str_radix(digits, 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// Mount points of this process's mount namespace.
fn mount_points() -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines().filter_map(|l| l.split(' ').nth(4)).map(unescape_mount_path).collect()
}

/// Whether `path` is a mount point (a namespace pin, the pod's shm, a rootfs).
pub(crate) fn is_mount_point(path: &Path) -> bool {
    mount_points().iter().any(|m| m == path)
}

/// Detaches every mount stacked on `path` (none is fine).
fn unmount_all(path: &Path) -> bool {
    let mut any = false;
    loop {
        match umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) => any = true,
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return any,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "repair: cannot unmount");
                return any;
            }
        }
    }
}

/// Names of the entries of `dir` that are directories (missing dir: none).
fn subdirs(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// Removes an empty cgroup tree, children first. Returns whether `dir` is gone.
fn rmdir_cgroup_tree(dir: &Path) -> bool {
    for child in subdirs(dir) {
        rmdir_cgroup_tree(&dir.join(child));
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            tracing::debug!(dir = %dir.display(), error = %e, "repair: cgroup stays");
            false
        }
    }
}

/// The cgroup hierarchies' roots under the cgroup root `root` (v1: one per controller,
/// deduplicated; v2: the root).
fn cgroup_hierarchies(root: &Path) -> Vec<PathBuf> {
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_owned()];
    }
    let mut seen = HashSet::new();
    let Ok(entries) = std::fs::read_dir(root) else { return Vec::new() };
    entries
        .flatten()
        .map(|e| e.path())
        .filter_map(|p| std::fs::canonicalize(&p).ok())
        .filter(|p| p.is_dir() && seen.insert(p.clone()))
        .collect()
}

/// Pids of pod init processes (`berth-pod-init pod-init <dir>` or `berthd pod-init <dir>`)
/// whose pod dir is under `pods_dir`, by pod id.
fn pod_init_processes(pods_dir: &Path) -> Vec<(String, i32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.len() < 3 || args[1] != berth_pod_init::POD_INIT_COMMAND.as_bytes() {
            continue;
        }
        let dir = Path::new(std::ffi::OsStr::from_bytes(args[2]));
        if dir.parent() == Some(pods_dir)
            && let Some(id) = dir.file_name().and_then(|n| n.to_str())
        {
            out.push((id.to_owned(), pid));
        }
    }
    out
}

impl<S: Shim + 'static> Runtime<S> {
    /// Removes everything no record owns; returns how many objects it removed.
    pub(crate) async fn repair(&self) -> usize {
        let containers: HashSet<String> =
            self.all_containers().iter().map(|c| c.meta.id.clone()).collect();
        let pods: HashSet<String> =
            self.all_sandboxes().iter().map(|s| s.meta.id.clone()).collect();
        let mut removed = 0;
        removed += self.repair_runtime_containers(&containers).await;
        removed += self.repair_bundles(&containers);
        removed += self.repair_snapshots(&containers);
        removed += self.repair_pods(&pods);
        removed += self.repair_shims(&pods).await;
        removed += self.repair_cgroups(&pods, &containers);
        removed
    }

    /// `<runtime> delete --force` of OCI runtime containers nobody recorded: kills their
    /// processes and frees their cgroups.
    async fn repair_runtime_containers(&self, known: &HashSet<String>) -> usize {
        let mut removed = 0;
        let root = self.config.state_dir.join("runtime");
        for handler in subdirs(&root) {
            let Some(binary) = self.config.handlers.get(&handler) else { continue };
            let runtime_root = root.join(&handler);
            for id in subdirs(&runtime_root) {
                if known.contains(&id) {
                    continue;
                }
                tracing::info!(container_id = %id, handler, "repair: deleting OCI container without a record");
                let mut cmd = std::process::Command::new(binary);
                cmd.arg("--root").arg(&runtime_root).arg("delete").arg("--force").arg(&id);
                match berth_shim::run_captured(cmd, Some(RUNTIME_DELETE_TIMEOUT)).await {
                    Ok(out) if out.code == 0 => removed += 1,
                    Ok(out) => tracing::warn!(
                        container_id = %id,
                        stderr = %String::from_utf8_lossy(&out.stderr),
                        "repair: runtime delete failed"
                    ),
                    Err(e) => {
                        tracing::warn!(container_id = %id, error = %e, "repair: cannot run runtime delete")
                    }
                }
            }
        }
        removed
    }

    /// Bundles (and their rootfs mounts) without a container record.
    fn repair_bundles(&self, known: &HashSet<String>) -> usize {
        let mut removed = 0;
        let dir = self.config.state_dir.join("containers");
        for id in subdirs(&dir) {
            if known.contains(&id) {
                continue;
            }
            let bundle = dir.join(&id);
            tracing::info!(container_id = %id, "repair: removing bundle without a record");
            unmount_all(&bundle.join("rootfs"));
            if let Err(e) = self.snapshots.remove_rootfs(&id, &bundle.join("rootfs")) {
                tracing::debug!(container_id = %id, error = %e, "repair: no writable layer");
            }
            match remove_dir_all(&bundle) {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(container_id = %id, error = %e, "repair: cannot remove bundle")
                }
            }
        }
        removed
    }

    /// Writable snapshot layers without a container record.
    fn repair_snapshots(&self, known: &HashSet<String>) -> usize {
        let keys = match self.snapshots.active_keys() {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "repair: cannot list writable layers");
                return 0;
            }
        };
        let mut removed = 0;
        for key in keys.into_iter().filter(|k| !known.contains(k)) {
            let target = self.config.state_dir.join("containers").join(&key).join("rootfs");
            tracing::info!(key, "repair: removing writable layer without a container");
            match self.snapshots.remove_rootfs(&key, &target) {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!(key, error = %e, "repair: cannot remove writable layer"),
            }
        }
        removed
    }

    /// Pod directories without a record: their init process, pins, shm, files.
    fn repair_pods(&self, known: &HashSet<String>) -> usize {
        let dir = self.config.state_dir.join("pods");
        for (id, pid) in pod_init_processes(&dir) {
            if !known.contains(&id) {
                tracing::info!(pod_id = %id, pid, "repair: killing init of a pod without a record");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let mut removed = 0;
        for id in subdirs(&dir) {
            if known.contains(&id) {
                continue;
            }
            let pod = dir.join(&id);
            tracing::info!(pod_id = %id, "repair: removing pod directory without a record");
            if let Err(e) = berth_net::unpin_all(&pod.join("ns")) {
                tracing::warn!(pod_id = %id, error = %e, "repair: cannot unpin namespaces");
            }
            unmount_all(&pod.join("shm"));
            match remove_dir_all(&pod) {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(pod_id = %id, error = %e, "repair: cannot remove pod directory")
                }
            }
        }
        removed
    }

    /// External shims of pods without a record: shut down (their tasks deleted).
    async fn repair_shims(&self, known: &HashSet<String>) -> usize {
        let mut removed = 0;
        for id in subdirs(&self.config.state_dir.join("shims")) {
            if known.contains(&id) || berth_shim::validate_id(&id).is_err() {
                continue;
            }
            tracing::info!(pod_id = %id, "repair: shutting down the shim of a pod without a record");
            match self.shim.release_pod(&id).await {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(pod_id = %id, error = %e, "repair: cannot shut the shim down")
                }
            }
        }
        removed
    }

    /// Empty cgroups under the cgroup parent that no pod or container owns.
    fn repair_cgroups(&self, pods: &HashSet<String>, containers: &HashSet<String>) -> usize {
        let parent = self.config.cgroup_parent.trim_matches('/');
        if parent.is_empty() {
            return 0;
        }
        let mut removed = 0;
        for hierarchy in cgroup_hierarchies(&self.config.cgroup_root) {
            let base = hierarchy.join(parent);
            for child in subdirs(&base) {
                let Some(pod_id) = child.strip_prefix("pod-") else { continue };
                let dir = base.join(&child);
                if !pods.contains(pod_id) {
                    if rmdir_cgroup_tree(&dir) {
                        tracing::info!(dir = %dir.display(), "repair: removed cgroup of a pod without a record");
                        removed += 1;
                    }
                    continue;
                }
                for ctr in subdirs(&dir) {
                    if ctr.len() == 64
                        && !containers.contains(&ctr)
                        && rmdir_cgroup_tree(&dir.join(&ctr))
                    {
                        tracing::info!(container_id = %ctr, "repair: removed cgroup of a container without a record");
                        removed += 1;
                    }
                }
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_unescape() {
        assert_eq!(unescape_mount_path("/a\\040b/c"), Path::new("/a b/c"));
        assert_eq!(unescape_mount_path("/plain"), Path::new("/plain"));
        assert_eq!(unescape_mount_path("/x\\"), Path::new("/x\\"));
    }

    #[test]
    fn root_is_a_mount_point() {
        assert!(is_mount_point(Path::new("/")));
        assert!(!is_mount_point(Path::new("/definitely/not/mounted")));
    }

    #[test]
    fn cgroup_trees_are_removed_children_first() {
        // A plain directory tree stands in for a cgroup tree (rmdir semantics match).
        let dir = tempfile::tempdir().expect("tempdir");
        let pod = dir.path().join("pod-x");
        std::fs::create_dir_all(pod.join("c1")).expect("mkdir");
        std::fs::create_dir_all(pod.join("c2")).expect("mkdir");
        assert!(rmdir_cgroup_tree(&pod));
        assert!(!pod.exists());
    }
}
