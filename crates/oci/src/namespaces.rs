//! Which namespaces the container gets, joins, or shares with the host.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType};

use crate::error::build_err;
use crate::{PodContext, SpecError};

fn ns(typ: LinuxNamespaceType, path: Option<&PathBuf>) -> Result<LinuxNamespace, SpecError> {
    let mut b = LinuxNamespaceBuilder::default().typ(typ);
    if let Some(p) = path {
        b = b.path(p.clone());
    }
    b.build().map_err(build_err("namespace"))
}

/// The namespaces of a container of the pod.
///
/// A namespace absent from the list is the host's. PID: the pod's (`pidns`), the host's
/// (`host_pid`), or a new one. IPC, UTS, network: the pod's pinned one, or the host's when
/// `None`. Mount: always new. Cgroup: new on cgroup v2 only, as containerd does (on v1 a
/// cgroup namespace hides nothing useful and older runtimes mishandle it).
pub fn namespaces(pod: &PodContext, cgroup_v2: bool) -> Result<Vec<LinuxNamespace>, SpecError> {
    let mut out = Vec::new();
    if let Some(p) = &pod.pidns {
        out.push(ns(LinuxNamespaceType::Pid, Some(p))?);
    } else if !pod.host_pid {
        out.push(ns(LinuxNamespaceType::Pid, None)?);
    }
    if let Some(p) = &pod.ipcns {
        out.push(ns(LinuxNamespaceType::Ipc, Some(p))?);
    }
    if let Some(p) = &pod.utsns {
        out.push(ns(LinuxNamespaceType::Uts, Some(p))?);
    }
    if let Some(p) = &pod.netns {
        out.push(ns(LinuxNamespaceType::Network, Some(p))?);
    }
    out.push(ns(LinuxNamespaceType::Mount, None)?);
    if cgroup_v2 {
        out.push(ns(LinuxNamespaceType::Cgroup, None)?);
    }
    Ok(out)
}

/// Whether `/sys/fs/cgroup` is a cgroup v2 (unified) mount. Callers that know better (tests,
/// a config override) pass their own value in `ContainerSpecInput::cgroup_v2`.
pub fn detect_cgroup_v2() -> bool {
    is_cgroup_v2_mount(Path::new("/sys/fs/cgroup"))
}

/// Whether `path` is the root of a cgroup2 filesystem.
pub fn is_cgroup_v2_mount(path: &Path) -> bool {
    use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
    statfs(path).is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(v: &[LinuxNamespace]) -> Vec<(LinuxNamespaceType, Option<PathBuf>)> {
        v.iter().map(|n| (n.typ(), n.path().clone())).collect()
    }

    #[test]
    fn pod_namespaces() {
        let pod = PodContext {
            netns: Some("/run/berth/netns/p".into()),
            ipcns: Some("/run/berth/ipcns/p".into()),
            utsns: Some("/run/berth/utsns/p".into()),
            pidns: Some("/proc/42/ns/pid".into()),
            ..Default::default()
        };
        let got = kinds(&namespaces(&pod, true).unwrap());
        assert_eq!(
            got,
            vec![
                (LinuxNamespaceType::Pid, Some("/proc/42/ns/pid".into())),
                (LinuxNamespaceType::Ipc, Some("/run/berth/ipcns/p".into())),
                (LinuxNamespaceType::Uts, Some("/run/berth/utsns/p".into())),
                (LinuxNamespaceType::Network, Some("/run/berth/netns/p".into())),
                (LinuxNamespaceType::Mount, None),
                (LinuxNamespaceType::Cgroup, None),
            ]
        );
    }

    #[test]
    fn host_namespaces() {
        let pod = PodContext { host_pid: true, ..Default::default() };
        let got = kinds(&namespaces(&pod, false).unwrap());
        assert_eq!(got, vec![(LinuxNamespaceType::Mount, None)]);
        let got = kinds(&namespaces(&PodContext::default(), false).unwrap());
        assert_eq!(got, vec![(LinuxNamespaceType::Pid, None), (LinuxNamespaceType::Mount, None)]);
    }

    #[test]
    fn cgroup_detection_does_not_panic() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(!is_cgroup_v2_mount(tmp.path()));
        let _ = detect_cgroup_v2();
    }
}
