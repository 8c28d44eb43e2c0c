//! Device nodes and the device cgroup: the standard allowlist, the kubelet's devices, and
//! every host device for privileged containers.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use k8s_cri::v1::Device;
use oci_spec::runtime::{
    LinuxDevice, LinuxDeviceBuilder, LinuxDeviceCgroup, LinuxDeviceCgroupBuilder, LinuxDeviceType,
};

use crate::SpecError;
use crate::error::build_err;

/// Directories under `/dev` that hold no devices to pass on (runtime-made or per-namespace).
const SKIP_DIRS: &[&str] = &["pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"];

fn rule(
    allow: bool,
    typ: Option<LinuxDeviceType>,
    major: Option<i64>,
    minor: Option<i64>,
    access: &str,
) -> Result<LinuxDeviceCgroup, SpecError> {
    let mut b = LinuxDeviceCgroupBuilder::default().allow(allow).access(access.to_string());
    if let Some(t) = typ {
        b = b.typ(t);
    }
    if let Some(m) = major {
        b = b.major(m);
    }
    if let Some(m) = minor {
        b = b.minor(m);
    }
    b.build().map_err(build_err("device cgroup rule"))
}

/// The device cgroup for an unprivileged container, as containerd writes it: deny all, then
/// allow `/dev/null`, `zero`, `full`, `random`, `urandom`, `tty`, `console`, `ptmx` and the
/// pts devices.
pub fn default_device_rules() -> Result<Vec<LinuxDeviceCgroup>, SpecError> {
    let c = Some(LinuxDeviceType::C);
    let mut out = vec![rule(false, None, None, None, "rwm")?];
    for (major, minor) in [
        (1, Some(3)), // null
        (1, Some(8)), // random
        (1, Some(7)), // full
        (5, Some(0)), // tty
        (1, Some(5)), // zero
        (1, Some(9)), // urandom
        (5, Some(1)), // console
        (136, None),  // pts/*
        (5, Some(2)), // ptmx
    ] {
        out.push(rule(true, c, Some(major), minor, "rwm")?);
    }
    Ok(out)
}

/// The device cgroup for a privileged container: everything.
pub fn allow_all_rules() -> Result<Vec<LinuxDeviceCgroup>, SpecError> {
    Ok(vec![rule(true, None, None, None, "rwm")?])
}

/// The device at `host` as it should appear at `container`; `Ok(None)` when `host` is not a
/// device node. Symlinks are followed (`/dev/disk/by-id/...`).
fn device_at(host: &Path, container: &Path) -> std::io::Result<Option<LinuxDevice>> {
    let md = std::fs::metadata(host)?;
    let ft = md.file_type();
    let typ = if ft.is_char_device() {
        LinuxDeviceType::C
    } else if ft.is_block_device() {
        LinuxDeviceType::B
    } else if ft.is_fifo() {
        LinuxDeviceType::P
    } else {
        return Ok(None);
    };
    let rdev = md.rdev();
    let dev = LinuxDeviceBuilder::default()
        .path(container.to_path_buf())
        .typ(typ)
        .major(nix::sys::stat::major(rdev) as i64)
        .minor(nix::sys::stat::minor(rdev) as i64)
        .file_mode(md.mode() & 0o7777)
        .uid(md.uid())
        .gid(md.gid())
        .build()
        .map_err(std::io::Error::other)?;
    Ok(Some(dev))
}

/// Every device under `dir` (recursively, minus [`SKIP_DIRS`] and `console`), mapped to
/// `container_dir` + the same relative path. Unreadable entries are skipped: a device we
/// cannot see is one we cannot pass on.
fn devices_under(dir: &Path, container_dir: &Path, out: &mut Vec<LinuxDevice>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Ok(ft) = entry.file_type() else { continue };
        let host = entry.path();
        let container = container_dir.join(&name);
        if ft.is_dir() {
            if name.to_str().is_some_and(|n| SKIP_DIRS.contains(&n)) {
                continue;
            }
            devices_under(&host, &container, out);
        } else if ft.is_symlink() || name == "console" {
            // Symlinks in /dev point at devices listed under their own names.
            continue;
        } else if let Ok(Some(dev)) = device_at(&host, &container) {
            out.push(dev);
        }
    }
}

/// All devices of the host's `dev_dir` (normally `/dev`), for privileged containers, sorted by
/// path. An unreadable `dev_dir` gives none.
pub fn host_devices(dev_dir: &Path) -> Vec<LinuxDevice> {
    let mut out = Vec::new();
    devices_under(dev_dir, Path::new("/dev"), &mut out);
    out.sort_by(|a, b| a.path().cmp(b.path()));
    out
}

/// Checks `permissions` is a non-empty subset of `rwm`; empty means `rwm`.
fn permissions(d: &Device) -> Result<String, SpecError> {
    if d.permissions.is_empty() {
        return Ok("rwm".to_string());
    }
    let ok = d.permissions.chars().all(|c| matches!(c, 'r' | 'w' | 'm'));
    if !ok {
        return Err(SpecError::InvalidDevicePermissions {
            host_path: d.host_path.clone(),
            permissions: d.permissions.clone(),
        });
    }
    Ok(d.permissions.clone())
}

/// Checks one kubelet device without building anything.
pub(crate) fn check_device(d: &Device) -> Result<(), SpecError> {
    for (field, p) in
        [("devices.host_path", &d.host_path), ("devices.container_path", &d.container_path)]
    {
        if !p.starts_with('/') {
            return Err(SpecError::RelativePath { field, path: p.clone() });
        }
    }
    permissions(d)?;
    std::fs::metadata(&d.host_path)
        .map_err(|source| SpecError::DeviceNotFound { host_path: d.host_path.clone(), source })?;
    Ok(())
}

/// The kubelet's devices: `linux.devices` entries and their cgroup allow rules. A directory
/// host path passes on every device under it (as containerd does for e.g. `/dev/snd`).
pub fn cri_devices(
    devices: &[Device],
) -> Result<(Vec<LinuxDevice>, Vec<LinuxDeviceCgroup>), SpecError> {
    let mut nodes = Vec::new();
    let mut rules = Vec::new();
    for d in devices {
        check_device(d)?;
        let access = permissions(d)?;
        let host = Path::new(&d.host_path);
        let container = PathBuf::from(&d.container_path);
        let found = match device_at(host, &container) {
            Ok(Some(dev)) => vec![dev],
            Ok(None) if host.is_dir() => {
                let mut v = Vec::new();
                devices_under(host, &container, &mut v);
                v
            }
            Ok(None) => Vec::new(),
            Err(source) => {
                return Err(SpecError::DeviceNotFound { host_path: d.host_path.clone(), source });
            }
        };
        if found.is_empty() {
            return Err(SpecError::NotADevice { host_path: d.host_path.clone() });
        }
        for dev in found {
            rules.push(rule(true, Some(dev.typ()), Some(dev.major()), Some(dev.minor()), &access)?);
            nodes.push(dev);
        }
    }
    Ok((nodes, rules))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(host: &str, container: &str, perms: &str) -> Device {
        Device {
            host_path: host.into(),
            container_path: container.into(),
            permissions: perms.into(),
        }
    }

    #[test]
    fn dev_null() {
        let (nodes, rules) = cri_devices(&[dev("/dev/null", "/dev/mynull", "rw")]).unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].path(), Path::new("/dev/mynull"));
        assert_eq!(nodes[0].typ(), LinuxDeviceType::C);
        assert_eq!((nodes[0].major(), nodes[0].minor()), (1, 3));
        assert_eq!(rules[0].access().as_deref(), Some("rw"));
        assert!(rules[0].allow());
        assert_eq!((rules[0].major(), rules[0].minor()), (Some(1), Some(3)));
    }

    #[test]
    fn bad_devices() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        let f = file.to_str().unwrap();
        assert!(matches!(
            cri_devices(&[dev(f, "/dev/x", "rwm")]),
            Err(SpecError::NotADevice { .. })
        ));
        assert!(matches!(
            cri_devices(&[dev("/dev/does-not-exist", "/dev/x", "rwm")]),
            Err(SpecError::DeviceNotFound { .. })
        ));
        assert!(matches!(
            cri_devices(&[dev("/dev/null", "/dev/x", "rwx")]),
            Err(SpecError::InvalidDevicePermissions { .. })
        ));
        assert!(matches!(
            cri_devices(&[dev("/dev/null", "x", "rw")]),
            Err(SpecError::RelativePath { field: "devices.container_path", .. })
        ));
    }

    #[test]
    fn directory_of_devices() {
        let dir = tempfile::tempdir().unwrap();
        // Symlinks are skipped when walking; only a real node would count, so an empty dir
        // of symlinks is "not a device".
        std::os::unix::fs::symlink("/dev/null", dir.path().join("n")).unwrap();
        let d = dir.path().to_str().unwrap();
        assert!(matches!(
            cri_devices(&[dev(d, "/dev/x", "rwm")]),
            Err(SpecError::NotADevice { .. })
        ));
        // A symlink given directly is followed.
        let n = dir.path().join("n");
        let (nodes, _) = cri_devices(&[dev(n.to_str().unwrap(), "/dev/x", "")]).unwrap();
        assert_eq!((nodes[0].major(), nodes[0].minor()), (1, 3));
    }

    #[test]
    fn host_dev_listing() {
        let all = host_devices(Path::new("/dev"));
        assert!(all.iter().any(|d| d.path() == Path::new("/dev/null")));
        assert!(all.iter().all(|d| !d.path().starts_with("/dev/pts")));
        assert!(host_devices(Path::new("/nonexistent-dev-dir")).is_empty());
    }

    #[test]
    fn default_rules() {
        let r = default_device_rules().unwrap();
        assert!(!r[0].allow());
        assert_eq!(r[0].access().as_deref(), Some("rwm"));
        assert_eq!(r.len(), 10);
        let pts = r.iter().find(|r| r.major() == Some(136)).unwrap();
        assert_eq!(pts.minor(), None);
        assert!(allow_all_rules().unwrap()[0].allow());
    }
}
