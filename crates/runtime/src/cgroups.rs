//! cgroupfs paths: where a container's cgroup lives, stats from its files, and removal of a
//! pod's cgroup in every hierarchy.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use berth_oci::{Controller, HostCgroups};
use k8s_cri::v1::LinuxContainerResources;
use oci_spec::runtime::LinuxResources;

use crate::error::{Result, RuntimeError};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

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
    /// Reads the host's controllers once.
    pub(crate) fn detect(v2: bool) -> Self {
        Self::new(HostCgroups::detect(Path::new(CGROUP_ROOT), v2))
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

/// The memory cgroup directory of `cgroups_path` (for OOM detection and stats).
pub fn memory_dir(cgroups_path: &str, v2: bool) -> PathBuf {
    let rel = cgroups_path.trim_start_matches('/');
    if v2 {
        Path::new(CGROUP_ROOT).join(rel)
    } else {
        Path::new(CGROUP_ROOT).join("memory").join(rel)
    }
}

/// The directory holding cpu accounting of `cgroups_path`.
pub fn cpu_dir(cgroups_path: &str, v2: bool) -> PathBuf {
    let rel = cgroups_path.trim_start_matches('/');
    if v2 {
        return Path::new(CGROUP_ROOT).join(rel);
    }
    // cpuacct is mounted alone or co-mounted with cpu, depending on the distribution.
    for name in ["cpuacct", "cpu,cpuacct", "cpuacct,cpu"] {
        let dir = Path::new(CGROUP_ROOT).join(name);
        if dir.is_dir() {
            return dir.join(rel);
        }
    }
    Path::new(CGROUP_ROOT).join("cpuacct").join(rel)
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
pub fn cpu_usage_ns(cgroups_path: &str, v2: bool) -> Option<u64> {
    let dir = cpu_dir(cgroups_path, v2);
    if v2 {
        stat_field(&dir.join("cpu.stat"), "usage_usec").map(|us| us * 1000)
    } else {
        read_u64(&dir.join("cpuacct.usage"))
    }
}

/// Memory usage and working set (usage minus inactive file pages), in bytes.
pub fn memory_usage(cgroups_path: &str, v2: bool) -> Option<(u64, u64)> {
    let dir = memory_dir(cgroups_path, v2);
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
/// Missing directories are fine; a non-empty cgroup stays (logged).
pub fn remove(cgroups_path: &str) {
    let rel = cgroups_path.trim_start_matches('/');
    if rel.is_empty() {
        return;
    }
    let mut dirs = vec![Path::new(CGROUP_ROOT).join(rel)];
    if let Ok(entries) = std::fs::read_dir(CGROUP_ROOT) {
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
        assert_eq!(
            memory_dir("/berth/pod-a/c", false),
            Path::new("/sys/fs/cgroup/memory/berth/pod-a/c")
        );
        assert_eq!(memory_dir("/berth/pod-a/c", true), Path::new("/sys/fs/cgroup/berth/pod-a/c"));
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
