//! The container's mounts: the standard kernel filesystems, the pod's shared files, then the
//! kubelet's volumes, in the order containerd's CRI plugin produces them.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use k8s_cri::v1::{Mount as CriMount, MountPropagation};
use oci_spec::runtime::{Mount, MountBuilder};

use crate::error::build_err;
use crate::{PodContext, SpecError};

/// The mounts and the rootfs propagation they need.
#[derive(Debug, Clone)]
pub struct MountPlan {
    /// Mounts in the order the runtime must perform them.
    pub mounts: Vec<Mount>,
    /// `linux.rootfsPropagation`: `rshared` when a volume is bidirectional, `rslave` when one
    /// receives host mounts; `None` leaves the runtime's default.
    pub rootfs_propagation: Option<&'static str>,
}

fn mount(dst: &str, typ: &str, src: impl Into<PathBuf>, opts: &[&str]) -> Result<Mount, SpecError> {
    MountBuilder::default()
        .destination(dst)
        .typ(typ)
        .source(src.into())
        .options(opts.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(build_err("mount"))
}

/// The standard mounts (containerd's `pkg/oci` defaults without `/run`, plus the read-only
/// cgroup mount the CRI plugin adds). Privileged containers get `/sys` and the cgroup
/// filesystem read-write.
pub fn default_mounts(privileged: bool) -> Result<Vec<Mount>, SpecError> {
    let sys_mode = if privileged { "rw" } else { "ro" };
    Ok(vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount("/dev", "tmpfs", "tmpfs", &["nosuid", "strictatime", "mode=755", "size=65536k"])?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount("/dev/mqueue", "mqueue", "mqueue", &["nosuid", "noexec", "nodev"])?,
        mount("/sys", "sysfs", "sysfs", &["nosuid", "noexec", "nodev", sys_mode])?,
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", sys_mode],
        )?,
    ])
}

/// Lexically cleans an absolute path (`//`, `.`, `..`), as Go's `filepath.Clean`.
pub(crate) fn clean(path: &str) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in Path::new(path).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// The propagation option for a CRI mount, and what it needs of the rootfs.
fn propagation(m: &CriMount) -> Result<(&'static str, Option<&'static str>), SpecError> {
    match MountPropagation::try_from(m.propagation) {
        Ok(MountPropagation::PropagationPrivate) => Ok(("rprivate", None)),
        Ok(MountPropagation::PropagationHostToContainer) => Ok(("rslave", Some("rslave"))),
        Ok(MountPropagation::PropagationBidirectional) => Ok(("rshared", Some("rshared"))),
        Err(_) => Err(SpecError::UnknownPropagation {
            container_path: m.container_path.clone(),
            value: m.propagation,
        }),
    }
}

/// Checks a CRI mount's paths and flags without touching the host, except to see that
/// `host_path` exists; returns the host path with symlinks resolved (the CRI asks runtimes to
/// mount a symlink's target).
pub(crate) fn check_cri_mount(m: &CriMount) -> Result<PathBuf, SpecError> {
    if m.image.as_ref().is_some_and(|i| !i.image.is_empty()) {
        return Err(SpecError::ImageVolumeUnsupported { container_path: m.container_path.clone() });
    }
    crate::checks::check_container_path("mounts.container_path", &m.container_path)?;
    if !m.host_path.starts_with('/') {
        return Err(SpecError::RelativePath {
            field: "mounts.host_path",
            path: m.host_path.clone(),
        });
    }
    if m.recursive_read_only
        && (!m.readonly || m.propagation != MountPropagation::PropagationPrivate as i32)
    {
        return Err(SpecError::InvalidRecursiveReadOnly {
            container_path: m.container_path.clone(),
        });
    }
    propagation(m)?;
    std::fs::canonicalize(&m.host_path).map_err(|source| SpecError::MountSourceMissing {
        host_path: m.host_path.clone(),
        container_path: m.container_path.clone(),
        source,
    })
}

/// One CRI volume as a bind mount. `selinux_relabel` is ignored: berth applies no SELinux
/// labels.
fn cri_mount(m: &CriMount) -> Result<(Mount, Option<&'static str>), SpecError> {
    let source = check_cri_mount(m)?;
    let (prop, rootfs_prop) = propagation(m)?;
    let mut opts = vec!["rbind", prop, if m.readonly { "ro" } else { "rw" }];
    if m.recursive_read_only {
        opts.push("rro");
    }
    let dst = clean(&m.container_path);
    let built = MountBuilder::default()
        .destination(dst)
        .typ("bind")
        .source(source)
        .options(opts.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(build_err("mount"))?;
    Ok((built, rootfs_prop))
}

/// A bind of one of the pod's files or directories.
fn pod_bind(dst: &str, src: &Path, readonly: bool) -> Result<Mount, SpecError> {
    let mode = if readonly { "ro" } else { "rw" };
    mount(dst, "bind", src, &["rbind", "rprivate", mode])
}

/// All mounts of the container.
///
/// Defaults first, minus those a CRI volume replaces (and everything under `/dev` when a
/// volume replaces `/dev`); the pod's `/dev/shm` replaces the tmpfs; then the pod's
/// `/etc/hostname`, `/etc/hosts`, `/etc/resolv.conf` unless a volume provides them
/// (read-only when the rootfs is); then the volumes, parents before children.
pub fn build_mounts(
    cri: &[CriMount],
    pod: &PodContext,
    privileged: bool,
    readonly_rootfs: bool,
) -> Result<MountPlan, SpecError> {
    let cri_dsts: HashSet<PathBuf> = cri.iter().map(|m| clean(&m.container_path)).collect();
    let dev_replaced = cri_dsts.contains(Path::new("/dev"));

    let mut mounts = Vec::new();
    for m in default_mounts(privileged)? {
        let dst = m.destination().clone();
        if cri_dsts.contains(&dst) || (dev_replaced && dst.starts_with("/dev")) {
            continue;
        }
        if dst == Path::new("/dev/shm")
            && let Some(shm) = &pod.shm
        {
            mounts.push(mount(
                "/dev/shm",
                "bind",
                shm,
                &["rbind", "rprivate", "nosuid", "nodev", "noexec", "rw"],
            )?);
            continue;
        }
        mounts.push(m);
    }

    let pod_files = [
        ("/etc/hostname", &pod.hostname_file),
        ("/etc/hosts", &pod.hosts),
        ("/etc/resolv.conf", &pod.resolv_conf),
    ];
    for (dst, src) in pod_files {
        if let Some(src) = src
            && !cri_dsts.contains(Path::new(dst))
        {
            mounts.push(pod_bind(dst, src, readonly_rootfs)?);
        }
    }

    let mut volumes = Vec::with_capacity(cri.len());
    let mut rootfs_propagation: Option<&'static str> = None;
    for m in cri {
        let (built, prop) = cri_mount(m)?;
        rootfs_propagation = match (rootfs_propagation, prop) {
            (Some("rshared"), _) | (_, Some("rshared")) => Some("rshared"),
            (cur, new) => new.or(cur),
        };
        volumes.push(built);
    }
    // Parents before children: a stable sort on depth keeps the kubelet's order otherwise.
    volumes.sort_by_key(|m| m.destination().components().count());
    mounts.extend(volumes);

    Ok(MountPlan { mounts, rootfs_propagation })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cri(container: &str, host: &Path, prop: MountPropagation, ro: bool) -> CriMount {
        CriMount {
            container_path: container.to_string(),
            host_path: host.to_string_lossy().into_owned(),
            readonly: ro,
            propagation: prop as i32,
            ..Default::default()
        }
    }

    fn dsts(plan: &MountPlan) -> Vec<String> {
        plan.mounts.iter().map(|m| m.destination().to_string_lossy().into_owned()).collect()
    }

    fn find<'a>(plan: &'a MountPlan, dst: &str) -> &'a Mount {
        plan.mounts.iter().find(|m| m.destination() == Path::new(dst)).unwrap()
    }

    fn opts(m: &Mount) -> Vec<String> {
        m.options().clone().unwrap_or_default()
    }

    #[test]
    fn defaults_and_pod_files() {
        let dir = tempfile::tempdir().unwrap();
        let pod = PodContext {
            shm: Some(dir.path().join("shm")),
            hosts: Some(dir.path().join("hosts")),
            resolv_conf: Some(dir.path().join("resolv.conf")),
            hostname_file: Some(dir.path().join("hostname")),
            ..Default::default()
        };
        let plan = build_mounts(&[], &pod, false, true).unwrap();
        assert_eq!(
            dsts(&plan),
            vec![
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/dev/mqueue",
                "/sys",
                "/sys/fs/cgroup",
                "/etc/hostname",
                "/etc/hosts",
                "/etc/resolv.conf"
            ]
        );
        let shm = find(&plan, "/dev/shm");
        assert_eq!(shm.typ().as_deref(), Some("bind"));
        assert_eq!(shm.source().as_deref(), Some(dir.path().join("shm").as_path()));
        assert!(opts(find(&plan, "/etc/hosts")).contains(&"ro".to_string()));
        assert!(opts(find(&plan, "/sys")).contains(&"ro".to_string()));
        assert!(opts(find(&plan, "/sys/fs/cgroup")).contains(&"ro".to_string()));
        assert_eq!(plan.rootfs_propagation, None);

        // No pod shm: the tmpfs stays.
        let plan = build_mounts(&[], &PodContext::default(), true, false).unwrap();
        assert_eq!(find(&plan, "/dev/shm").typ().as_deref(), Some("tmpfs"));
        assert!(opts(find(&plan, "/sys")).contains(&"rw".to_string()));
        assert!(opts(find(&plan, "/sys/fs/cgroup")).contains(&"rw".to_string()));
    }

    #[test]
    fn volumes_sorted_with_propagation() {
        let dir = tempfile::tempdir().unwrap();
        let h = dir.path();
        let mounts = vec![
            cri("/data/sub/leaf", h, MountPropagation::PropagationPrivate, false),
            cri("/data", h, MountPropagation::PropagationHostToContainer, true),
            cri("/etc/hosts", &h.join("."), MountPropagation::PropagationPrivate, false),
            cri("/shared", h, MountPropagation::PropagationBidirectional, false),
            cri("/data/sub", h, MountPropagation::PropagationPrivate, false),
        ];
        let pod = PodContext { hosts: Some(h.join("pod-hosts")), ..Default::default() };
        let plan = build_mounts(&mounts, &pod, false, false).unwrap();
        let all = dsts(&plan);
        let vols = &all[all.len() - 5..];
        assert_eq!(vols, ["/data", "/shared", "/etc/hosts", "/data/sub", "/data/sub/leaf"]);
        // The pod's /etc/hosts is replaced by the volume.
        assert_eq!(all.iter().filter(|d| *d == "/etc/hosts").count(), 1);
        let data = find(&plan, "/data");
        assert_eq!(data.typ().as_deref(), Some("bind"));
        assert_eq!(opts(data), vec!["rbind", "rslave", "ro"]);
        assert_eq!(opts(find(&plan, "/shared")), vec!["rbind", "rshared", "rw"]);
        assert_eq!(opts(find(&plan, "/data/sub")), vec!["rbind", "rprivate", "rw"]);
        assert_eq!(plan.rootfs_propagation, Some("rshared"));
    }

    #[test]
    fn dev_volume_replaces_dev_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let mounts = vec![cri("/dev", dir.path(), MountPropagation::PropagationPrivate, false)];
        let plan = build_mounts(&mounts, &PodContext::default(), false, false).unwrap();
        assert_eq!(dsts(&plan), vec!["/proc", "/sys", "/sys/fs/cgroup", "/dev"]);
    }

    #[test]
    fn bad_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = build_mounts(
            &[cri("/x", &missing, MountPropagation::PropagationPrivate, false)],
            &PodContext::default(),
            false,
            false,
        );
        assert!(matches!(err, Err(SpecError::MountSourceMissing { .. })));
        let err = build_mounts(
            &[cri("x", dir.path(), MountPropagation::PropagationPrivate, false)],
            &PodContext::default(),
            false,
            false,
        );
        assert!(matches!(err, Err(SpecError::RelativePath { field: "mounts.container_path", .. })));
        let mut m = cri("/x", dir.path(), MountPropagation::PropagationPrivate, false);
        m.recursive_read_only = true;
        assert!(matches!(check_cri_mount(&m), Err(SpecError::InvalidRecursiveReadOnly { .. })));
        m.readonly = true;
        assert!(check_cri_mount(&m).is_ok());
        m.propagation = 9;
        m.recursive_read_only = false;
        assert!(matches!(check_cri_mount(&m), Err(SpecError::UnknownPropagation { value: 9, .. })));
    }

    #[test]
    fn clean_paths() {
        assert_eq!(clean("/a//b/./c/../d/"), PathBuf::from("/a/b/d"));
        assert_eq!(clean("/../x"), PathBuf::from("/x"));
    }
}
