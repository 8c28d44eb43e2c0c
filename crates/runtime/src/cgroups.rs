//! cgroupfs paths: where a container's cgroup lives, stats from its files, and removal of a
//! pod's cgroup in every hierarchy.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use berth_oci::{Controller, HostCgroups};
use k8s_cri::v1::LinuxContainerResources;
use oci_spec::runtime::LinuxResources;

use crate::error::{Result, RuntimeError};

/// Fits containers' resources to the host's cgroup controllers: what needs a controller the
/// host lacks is dropped (never a failed container: the kubelet sends hugepage limits for
/// every page size a node has, hugetlb controller or not), with one warning per controller
/// for the daemon's life.
#[derive(Debug)]
pub(crate) struct ResourceFit {
    host: HostCgroups,
    warned: Mutex<BTreeSet<Controller>>,
}

impl ResourceFit {
    /// Reads the host's controllers (under the cgroup root `root`) once.
    pub(crate) fn detect(root: &Path, v2: bool) -> Self {
        Self::new(HostCgroups::detect(root, v2))
    }

    /// For the given host.
    pub(crate) fn new(host: HostCgroups) -> Self {
        Self { host, warned: Mutex::new(BTreeSet::new()) }
    }

    /// Drops from `res` what the host cannot apply, warning the first time each controller
    /// is found missing.
    pub(crate) fn apply(&self, res: &mut LinuxResources, container_id: &str) {
        for controller in self.host.fit(res) {
            let first =
                self.warned.lock().unwrap_or_else(PoisonError::into_inner).insert(controller);
            if first {
                tracing::warn!(
                    container_id,
                    controller = controller.name(),
                    "the host has no such cgroup controller: its limits are dropped (warned once)"
                );
            } else {
                tracing::debug!(container_id, controller = controller.name(), "limits dropped");
            }
        }
    }
}

/// Whether `root` is a cgroup2 (unified) mount; a plain directory (a test's fake root) is
/// taken for cgroup v1.
pub(crate) fn is_v2(root: &Path) -> bool {
    use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
    statfs(root).is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC)
}

/// The memory cgroup directory of `cgroups_path` under the cgroup root `root` (for OOM
/// detection and stats).
pub fn memory_dir(root: &Path, cgroups_path: &str, v2: bool) -> PathBuf {
    let rel = cgroups_path.trim_start_matches('/');
    if v2 { root.join(rel) } else { root.join("memory").join(rel) }
}

/// The directory holding cpu accounting of `cgroups_path`.
pub fn cpu_dir(root: &Path, cgroups_path: &str, v2: bool) -> PathBuf {
    let rel = cgroups_path.trim_start_matches('/');
    if v2 {
        return root.join(rel);
    }
    // cpuacct is mounted alone or co-mounted with cpu, depending on the distribution.
    for name in ["cpuacct", "cpu,cpuacct", "cpuacct,cpu"] {
        let dir = root.join(name);
        if dir.is_dir() {
            return dir.join(rel);
        }
    }
    root.join("cpuacct").join(rel)
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn stat_field(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Cumulative CPU time in nanoseconds.
pub fn cpu_usage_ns(root: &Path, cgroups_path: &str, v2: bool) -> Option<u64> {
    let dir = cpu_dir(root, cgroups_path, v2);
    if v2 {
        stat_field(&dir.join("cpu.stat"), "usage_usec").map(|us| us * 1000)
    } else {
        read_u64(&dir.join("cpuacct.usage"))
    }
}

/// Memory usage and working set (usage minus inactive file pages), in bytes.
pub fn memory_usage(root: &Path, cgroups_path: &str, v2: bool) -> Option<(u64, u64)> {
    let dir = memory_dir(root, cgroups_path, v2);
    let (usage, inactive) = if v2 {
        (
            read_u64(&dir.join("memory.current"))?,
            stat_field(&dir.join("memory.stat"), "inactive_file"),
        )
    } else {
        (
            read_u64(&dir.join("memory.usage_in_bytes"))?,
            stat_field(&dir.join("memory.stat"), "total_inactive_file"),
        )
    };
    Some((usage, usage.saturating_sub(inactive.unwrap_or(0))))
}

/// Removes the cgroup `cgroups_path` in every hierarchy (v1) or the unified one (v2).
/// Missing directories are fine; a non-empty cgroup stays (logged). `root` is the cgroup
/// root (`/sys/fs/cgroup`).
pub fn remove(root: &Path, cgroups_path: &str) {
    let rel = cgroups_path.trim_start_matches('/');
    if rel.is_empty() {
        return;
    }
    let mut dirs = vec![root.join(rel)];
    if let Ok(entries) = std::fs::read_dir(root) {
        dirs.extend(entries.flatten().map(|e| e.path().join(rel)));
    }
    for dir in dirs {
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // ENOTDIR: /sys/fs/cgroup/<file>/... on v2; nothing to remove there.
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {}
            Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot remove pod cgroup"),
        }
    }
}

/// Where the kernel lists the online CPUs and memory nodes.
const ONLINE_CPUS: &str = "/sys/devices/system/cpu/online";
const ONLINE_NODES: &str = "/sys/devices/system/node/online";

/// Checks that the CPUs and memory nodes `r` pins the container to are online on this node:
/// the kernel refuses others (ERANGE, EINVAL) deep inside the OCI runtime. `r` has passed
/// `berth_oci::resources::validate`. A host whose lists cannot be read is not checked.
pub(crate) fn check_cpuset_online(r: &LinuxContainerResources) -> Result<()> {
    let lists = [
        ("resources.cpuset_cpus", &r.cpuset_cpus, ONLINE_CPUS, "CPU"),
        ("resources.cpuset_mems", &r.cpuset_mems, ONLINE_NODES, "memory node"),
    ];
    for (field, wanted, online_file, what) in lists {
        if wanted.is_empty() {
            continue;
        }
        let Ok(online) = std::fs::read_to_string(online_file) else { continue };
        if let Some(reason) = not_online(wanted, online.trim(), what) {
            return Err(RuntimeError::Invalid { field, reason });
        }
    }
    Ok(())
}

/// Why `wanted` (a kernel list) names something outside `online` (another), if it does.
fn not_online(wanted: &str, online: &str, what: &str) -> Option<String> {
    let online = berth_oci::resources::parse_cpu_list(online, u32::MAX).ok()?;
    let wanted = berth_oci::resources::parse_cpu_list(wanted, u32::MAX).ok()?;
    for (first, last) in wanted {
        // Ranges are short (CPU numbers): walking them is cheap.
        for n in first..=last {
            if !online.iter().any(|(a, b)| (*a..=*b).contains(&n)) {
                let list: Vec<String> = online
                    .iter()
                    .map(|(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") })
                    .collect();
                return Some(format!(
                    "{what} {n} is not online on this node (online: {})",
                    list.join(",")
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpusets_must_be_online() {
        assert_eq!(not_online("0-1", "0-1", "CPU"), None);
        assert_eq!(not_online("1,3", "0-3", "CPU"), None);
        assert_eq!(
            not_online("0-5", "0-1,4-7", "CPU").as_deref(),
            Some("CPU 2 is not online on this node (online: 0-1,4-7)")
        );
        assert_eq!(
            not_online("1", "0", "memory node").as_deref(),
            Some("memory node 1 is not online on this node (online: 0)")
        );
    }

    #[test]
    fn memory_dirs() {
        let root = Path::new(crate::DEFAULT_CGROUP_ROOT);
        assert_eq!(
            memory_dir(root, "/berth/pod-a/c", false),
            Path::new("/sys/fs/cgroup/memory/berth/pod-a/c")
        );
        assert_eq!(
            memory_dir(root, "/berth/pod-a/c", true),
            Path::new("/sys/fs/cgroup/berth/pod-a/c")
        );
    }

    #[test]
    fn stats_read_the_files_under_the_given_root() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("berth/pod-a/c");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("cpu.stat"), "usage_usec 7\n").expect("write");
        std::fs::write(dir.join("memory.current"), "10000\n").expect("write");
        std::fs::write(dir.join("memory.stat"), "inactive_file 4000\n").expect("write");
        assert_eq!(cpu_usage_ns(root.path(), "/berth/pod-a/c", true), Some(7000));
        assert_eq!(memory_usage(root.path(), "/berth/pod-a/c", true), Some((10000, 6000)));
        remove(root.path(), "/berth/pod-a/c/");
        // Not empty (regular files stand in for the kernel's): it stays, as a busy cgroup.
        assert!(dir.exists());
    }

    #[test]
    fn stat_fields_parse() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("memory.stat");
        std::fs::write(&p, "cache 1\ntotal_inactive_file 4096\n").expect("write");
        assert_eq!(stat_field(&p, "total_inactive_file"), Some(4096));
        assert_eq!(stat_field(&p, "nothing"), None);
    }
}
