//! Which seccomp profile a container gets: the `seccomp` field or the deprecated
//! `seccomp_profile_path`, resolved to nothing, the built-in default, or a file on the node.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use k8s_cri::v1::LinuxContainerSecurityContext;
use k8s_cri::v1::security_profile::ProfileType;
use oci_spec::runtime::{Capabilities, LinuxSeccomp};

use crate::SpecError;
use crate::seccomp_default::{HostArch, default_profile};

/// What the kubelet asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeccompChoice {
    /// No filter.
    Unconfined,
    /// The built-in profile ([`crate::seccomp_default`]).
    RuntimeDefault,
    /// A profile file on the node (path already made absolute).
    Localhost(PathBuf),
}

/// Resolves a Localhost reference: absolute, or relative to `root`.
fn localhost_path(reference: &str, root: &Path, shown: &str) -> Result<PathBuf, SpecError> {
    if reference.is_empty() {
        return Err(SpecError::InvalidSeccompProfile { value: shown.to_string() });
    }
    let p = Path::new(reference);
    Ok(if p.is_absolute() { p.to_path_buf() } else { root.join(p) })
}

/// The profile the security context asks for. The `seccomp` field wins over the deprecated
/// path; an empty path means unconfined (the CRI's documented default).
pub fn seccomp_choice(
    sc: &LinuxContainerSecurityContext,
    profile_root: &Path,
) -> Result<SeccompChoice, SpecError> {
    if let Some(p) = &sc.seccomp {
        return match ProfileType::try_from(p.profile_type) {
            Ok(ProfileType::RuntimeDefault) => Ok(SeccompChoice::RuntimeDefault),
            Ok(ProfileType::Unconfined) => Ok(SeccompChoice::Unconfined),
            Ok(ProfileType::Localhost) => Ok(SeccompChoice::Localhost(localhost_path(
                &p.localhost_ref,
                profile_root,
                "Localhost with an empty localhost_ref",
            )?)),
            Err(_) => Err(SpecError::InvalidSeccompProfile {
                value: format!("profile_type {}", p.profile_type),
            }),
        };
    }
    #[allow(deprecated)]
    let legacy = sc.seccomp_profile_path.as_str();
    match legacy {
        "" | "unconfined" => Ok(SeccompChoice::Unconfined),
        "runtime/default" | "docker/default" => Ok(SeccompChoice::RuntimeDefault),
        other => match other.strip_prefix("localhost/") {
            Some(rest) => Ok(SeccompChoice::Localhost(localhost_path(rest, profile_root, other)?)),
            None => Err(SpecError::InvalidSeccompProfile { value: other.to_string() }),
        },
    }
}

/// The largest profile we read. Docker's default profile is about 20 KiB; the bound keeps a
/// reference to `/dev/zero`, or to a huge file, from exhausting berthd's memory.
pub const MAX_PROFILE_SIZE: u64 = 1024 * 1024;

/// What a file that is not a regular file is, for error messages.
pub(crate) fn file_kind(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "of an unknown file type"
    }
}

/// Opens a profile for reading, refusing anything but a regular file. A stat first keeps us
/// from opening devices at all (opening some has side effects); the open is non-blocking,
/// so a FIFO swapped in meanwhile (which would wait for a writer) cannot stall the runtime
/// thread that builds the spec, and the type is checked again on the opened file (fstat).
/// Symlinks are followed: a profile linked from the kubelet's directory is fine, the check
/// applies to what the link points to.
fn open_profile(path: &Path) -> Result<File, SpecError> {
    let read_err = |source| SpecError::SeccompProfileRead { path: path.to_path_buf(), source };
    let not_regular =
        |t| SpecError::SeccompProfileNotRegular { path: path.to_path_buf(), kind: file_kind(t) };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.file_type().is_file() {
        return Err(not_regular(meta.file_type()));
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.file_type().is_file() {
        return Err(not_regular(meta.file_type()));
    }
    Ok(file)
}

/// Checks that a profile is a regular file without reading it (for validation before
/// anything is created).
pub fn check_profile_file(path: &Path) -> Result<(), SpecError> {
    open_profile(path).map(drop)
}

/// Reads at most [`MAX_PROFILE_SIZE`] bytes of a regular file.
fn read_profile(path: &Path) -> Result<Vec<u8>, SpecError> {
    let file = open_profile(path)?;
    let mut text = Vec::new();
    // One byte more than allowed tells "exactly the limit" from "larger".
    file.take(MAX_PROFILE_SIZE + 1)
        .read_to_end(&mut text)
        .map_err(|source| SpecError::SeccompProfileRead { path: path.to_path_buf(), source })?;
    if text.len() as u64 > MAX_PROFILE_SIZE {
        return Err(SpecError::SeccompProfileTooLarge {
            path: path.to_path_buf(),
            limit: MAX_PROFILE_SIZE,
        });
    }
    Ok(text)
}

/// Reads a profile file: the OCI `LinuxSeccomp` JSON, also accepting Docker's profile format
/// (`archMap` instead of `architectures`, `name` instead of `names`). Only a regular file of
/// at most [`MAX_PROFILE_SIZE`] bytes is read.
pub fn load_profile(path: &Path) -> Result<LinuxSeccomp, SpecError> {
    let text = read_profile(path)?;
    let parse_err = |source| SpecError::SeccompProfileParse { path: path.to_path_buf(), source };
    let mut value: serde_json::Value = serde_json::from_slice(&text).map_err(parse_err)?;
    if let Some(obj) = value.as_object_mut() {
        if !obj.contains_key("architectures")
            && let Some(map) = obj.get("archMap").and_then(|m| m.as_array())
        {
            let mut archs = Vec::new();
            for entry in map {
                if let Some(a) = entry.get("architecture") {
                    archs.push(a.clone());
                }
                if let Some(subs) = entry.get("subArchitectures").and_then(|s| s.as_array()) {
                    archs.extend(subs.iter().cloned());
                }
            }
            obj.insert("architectures".into(), serde_json::Value::Array(archs));
        }
        obj.remove("archMap");
        if let Some(calls) = obj.get_mut("syscalls").and_then(|s| s.as_array_mut()) {
            for call in calls.iter_mut().filter_map(|c| c.as_object_mut()) {
                if !call.contains_key("names")
                    && let Some(name) = call.remove("name")
                {
                    call.insert("names".into(), serde_json::Value::Array(vec![name]));
                }
            }
        }
    }
    serde_json::from_value(value).map_err(parse_err)
}

/// The `linux.seccomp` of the container.
///
/// Privileged containers get no filter at all, whatever the profile (the kubelet sends
/// `RuntimeDefault` by default when `seccompDefault` is on, and the CRI says privileged means
/// unconfined): containerd skips seccomp for them the same way, and critest checks that a
/// `Localhost` profile blocking `sethostname` is ignored when privileged.
pub fn seccomp_for(
    choice: &SeccompChoice,
    privileged: bool,
    effective_caps: &Capabilities,
) -> Result<Option<LinuxSeccomp>, SpecError> {
    match choice {
        SeccompChoice::Unconfined => Ok(None),
        _ if privileged => Ok(None),
        SeccompChoice::RuntimeDefault => {
            Ok(Some(default_profile(effective_caps, HostArch::current())))
        }
        SeccompChoice::Localhost(path) => load_profile(path).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::SecurityProfile;
    use oci_spec::runtime::{Arch, LinuxSeccompAction};

    fn sc_profile(t: ProfileType, r: &str) -> LinuxContainerSecurityContext {
        LinuxContainerSecurityContext {
            seccomp: Some(SecurityProfile { profile_type: t as i32, localhost_ref: r.into() }),
            ..Default::default()
        }
    }

    #[allow(deprecated)]
    fn sc_legacy(p: &str) -> LinuxContainerSecurityContext {
        LinuxContainerSecurityContext { seccomp_profile_path: p.into(), ..Default::default() }
    }

    #[test]
    fn choices() {
        let root = Path::new("/var/lib/kubelet/seccomp");
        let c = |sc| seccomp_choice(&sc, root);
        assert_eq!(
            c(sc_profile(ProfileType::RuntimeDefault, "")).unwrap(),
            SeccompChoice::RuntimeDefault
        );
        assert_eq!(c(sc_profile(ProfileType::Unconfined, "")).unwrap(), SeccompChoice::Unconfined);
        assert_eq!(
            c(sc_profile(ProfileType::Localhost, "/p.json")).unwrap(),
            SeccompChoice::Localhost("/p.json".into())
        );
        assert_eq!(
            c(sc_profile(ProfileType::Localhost, "prof/a.json")).unwrap(),
            SeccompChoice::Localhost(root.join("prof/a.json"))
        );
        assert!(matches!(
            c(sc_profile(ProfileType::Localhost, "")),
            Err(SpecError::InvalidSeccompProfile { .. })
        ));
        assert_eq!(c(sc_legacy("")).unwrap(), SeccompChoice::Unconfined);
        assert_eq!(c(sc_legacy("unconfined")).unwrap(), SeccompChoice::Unconfined);
        assert_eq!(c(sc_legacy("runtime/default")).unwrap(), SeccompChoice::RuntimeDefault);
        assert_eq!(c(sc_legacy("docker/default")).unwrap(), SeccompChoice::RuntimeDefault);
        assert_eq!(
            c(sc_legacy("localhost//etc/p.json")).unwrap(),
            SeccompChoice::Localhost("/etc/p.json".into())
        );
        assert!(matches!(
            c(sc_legacy("bogus")),
            Err(SpecError::InvalidSeccompProfile { value }) if value == "bogus"
        ));
        // The field wins over the legacy path.
        let mut sc = sc_profile(ProfileType::Unconfined, "");
        #[allow(deprecated)]
        {
            sc.seccomp_profile_path = "runtime/default".into();
        }
        assert_eq!(c(sc).unwrap(), SeccompChoice::Unconfined);
    }

    #[test]
    fn localhost_files() {
        let dir = tempfile::tempdir().unwrap();
        let oci = dir.path().join("oci.json");
        std::fs::write(
            &oci,
            r#"{"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_X86_64"],
                "syscalls":[{"names":["read","write"],"action":"SCMP_ACT_ALLOW"}]}"#,
        )
        .unwrap();
        let p = seccomp_for(&SeccompChoice::Localhost(oci), false, &Default::default())
            .unwrap()
            .unwrap();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(p.syscalls().as_ref().unwrap()[0].names(), &["read", "write"]);

        let docker = dir.path().join("docker.json");
        std::fs::write(
            &docker,
            r#"{"defaultAction":"SCMP_ACT_ALLOW",
                "archMap":[{"architecture":"SCMP_ARCH_X86_64","subArchitectures":["SCMP_ARCH_X86"]}],
                "syscalls":[{"name":"mount","action":"SCMP_ACT_ERRNO"}]}"#,
        )
        .unwrap();
        let p = load_profile(&docker).unwrap();
        assert_eq!(
            p.architectures().clone().unwrap(),
            vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86]
        );
        assert_eq!(p.syscalls().as_ref().unwrap()[0].names(), &["mount"]);

        let missing = dir.path().join("missing.json");
        assert!(matches!(
            seccomp_for(&SeccompChoice::Localhost(missing), false, &Default::default()),
            Err(SpecError::SeccompProfileRead { .. })
        ));
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, r#"{"defaultAction":"SCMP_ACT_NOPE"}"#).unwrap();
        assert!(matches!(load_profile(&bad), Err(SpecError::SeccompProfileParse { .. })));

        // A symlink to a regular profile is fine.
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&docker, &link).unwrap();
        assert!(load_profile(&link).is_ok());
    }

    #[test]
    fn hostile_profiles_refused() {
        let dir = tempfile::tempdir().unwrap();
        // A device: /dev/zero would be read forever.
        assert!(matches!(
            load_profile(Path::new("/dev/zero")),
            Err(SpecError::SeccompProfileNotRegular { kind: "a character device", .. })
        ));
        let zero = dir.path().join("zero.json");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert!(matches!(
            check_profile_file(&zero),
            Err(SpecError::SeccompProfileNotRegular { .. })
        ));
        // A FIFO without a writer: a blocking open would wait forever.
        let fifo = dir.path().join("fifo.json");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = load_profile(&fifo).unwrap_err();
        assert!(
            matches!(&err, SpecError::SeccompProfileNotRegular { kind: "a FIFO", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("fifo.json"), "{err}");
        // A directory.
        assert!(matches!(
            load_profile(dir.path()),
            Err(SpecError::SeccompProfileNotRegular { kind: "a directory", .. })
        ));
        // Over the size limit (sparse: no disk used).
        let big = dir.path().join("big.json");
        File::create(&big).unwrap().set_len(MAX_PROFILE_SIZE + 1).unwrap();
        assert!(matches!(
            load_profile(&big),
            Err(SpecError::SeccompProfileTooLarge { limit: MAX_PROFILE_SIZE, .. })
        ));
        // Exactly the limit is read (and then fails to parse: it is all NULs).
        File::create(&big).unwrap().set_len(MAX_PROFILE_SIZE).unwrap();
        assert!(matches!(load_profile(&big), Err(SpecError::SeccompProfileParse { .. })));
    }

    #[test]
    fn privileged_and_unconfined() {
        let caps = Default::default();
        assert!(seccomp_for(&SeccompChoice::RuntimeDefault, true, &caps).unwrap().is_none());
        assert!(seccomp_for(&SeccompChoice::Unconfined, false, &caps).unwrap().is_none());
        assert!(seccomp_for(&SeccompChoice::RuntimeDefault, false, &caps).unwrap().is_some());
        // A Localhost profile too: privileged is unconfined (it is not even read).
        let missing = SeccompChoice::Localhost("/nonexistent/profile.json".into());
        assert!(seccomp_for(&missing, true, &caps).unwrap().is_none());
    }
}
