//! Checks of request fields that the OCI runtime (or the shim) would only trip over once the
//! container starts, or that could point berthd outside the directories the kubelet gave it:
//! the log path, environment names, the working directory, argv, and the pod's host paths.
//! Each refusal names the field, so the kubelet's event says what to fix.

use std::path::{Component, Path, PathBuf};

use k8s_cri::v1::{KeyValue, PodSandboxConfig};

use crate::SpecError;

/// Linux's `PATH_MAX`: the longest path a system call takes, counting the terminating NUL.
const PATH_MAX: usize = libc::PATH_MAX as usize;
/// Linux's `NAME_MAX`: the longest file name (one path component).
const NAME_MAX: usize = 255;
/// How much of a refused value an error message repeats: enough to recognise it, without
/// sending kilobytes of a hostile path back in a gRPC header.
const SHOWN: usize = 256;

/// `value`, cut at [`SHOWN`] bytes (on a character boundary) with a marker when cut.
fn shown(value: &str) -> String {
    if value.len() <= SHOWN {
        return value.to_string();
    }
    let mut end = SHOWN;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &value[..end], value.len())
}

fn invalid_path(field: &'static str, path: &str, reason: &'static str) -> SpecError {
    SpecError::InvalidPath { field, path: shown(path), reason }
}

/// A container's `log_path`: empty (no log), or a relative path naming a file inside the
/// pod's `log_directory` (the kubelet sends `<container>/<attempt>.log`). Refused: absolute
/// paths, `..` components, a last component of `.` or nothing (a directory), NUL bytes, and
/// paths or names longer than the kernel takes.
pub fn check_log_path(log_path: &str) -> Result<(), SpecError> {
    if log_path.is_empty() {
        return Ok(());
    }
    let bad = |reason| Err(invalid_path("log_path", log_path, reason));
    if log_path.contains('\0') {
        return bad("contains a NUL byte");
    }
    if log_path.starts_with('/') {
        return bad("is absolute: it must be relative to the pod's log_directory");
    }
    if log_path.len() >= PATH_MAX {
        return bad("is longer than PATH_MAX");
    }
    let segments: Vec<&str> = log_path.split('/').collect();
    if segments.contains(&"..") {
        return bad("must not contain \"..\": the log stays inside the pod's log_directory");
    }
    if matches!(segments.last(), None | Some(&"") | Some(&".")) {
        return bad("does not name a file");
    }
    if segments.iter().any(|s| s.len() > NAME_MAX) {
        return bad("has a component longer than NAME_MAX");
    }
    Ok(())
}

/// The container's log file: `log_path` inside `log_directory`, or `None` when either is
/// empty (the container's output is then dropped). Both are checked: `log_path` as
/// [`check_log_path`] does, `log_directory` absolute (as [`validate_pod_paths`] does), and
/// the whole path shorter than `PATH_MAX`.
pub fn container_log_path(
    log_directory: &str,
    log_path: &str,
) -> Result<Option<PathBuf>, SpecError> {
    check_log_path(log_path)?;
    if log_directory.is_empty() || log_path.is_empty() {
        return Ok(None);
    }
    check_host_dir("log_directory", log_directory)?;
    // `join` of a relative path (checked above) appends: it cannot replace the directory.
    let joined = Path::new(log_directory).join(log_path);
    if joined.as_os_str().len() >= PATH_MAX {
        return Err(invalid_path(
            "log_path",
            log_path,
            "is longer than PATH_MAX within the pod's log_directory",
        ));
    }
    Ok(Some(joined))
}

/// An absolute host path the kubelet chose for the pod: no NUL bytes, absolute.
fn check_host_dir(field: &'static str, path: &str) -> Result<(), SpecError> {
    if path.contains('\0') {
        return Err(invalid_path(field, path, "contains a NUL byte"));
    }
    if !path.starts_with('/') {
        return Err(SpecError::RelativePath { field, path: shown(path) });
    }
    Ok(())
}

/// Whether `path` has a `..` component (`a/../b`, `/..`, `..`; not `a..b`).
fn has_dot_dot(path: &str) -> bool {
    Path::new(path).components().any(|c| c == Component::ParentDir)
}

/// The pod's host paths: `log_directory` (empty, or absolute) and `linux.cgroup_parent`
/// (empty for berth's own, or absolute without `..`: it names a cgroup directory, and a
/// relative one would land wherever the OCI runtime's own cgroup is).
pub fn validate_pod_paths(config: &PodSandboxConfig) -> Result<(), SpecError> {
    if !config.log_directory.is_empty() {
        check_host_dir("log_directory", &config.log_directory)?;
    }
    let parent = config.linux.as_ref().map(|l| l.cgroup_parent.as_str()).unwrap_or_default();
    if !parent.is_empty() {
        check_host_dir("linux.cgroup_parent", parent)?;
        if has_dot_dot(parent) {
            return Err(invalid_path("linux.cgroup_parent", parent, "must not contain \"..\""));
        }
    }
    Ok(())
}

/// A container path (mount target) as runc takes it: absolute, no NUL bytes, no `..`
/// components, and not `/` itself (the rootfs cannot be a volume's target).
pub(crate) fn check_container_path(field: &'static str, path: &str) -> Result<(), SpecError> {
    if path.contains('\0') {
        return Err(invalid_path(field, path, "contains a NUL byte"));
    }
    if !path.starts_with('/') {
        return Err(SpecError::RelativePath { field, path: shown(path) });
    }
    if has_dot_dot(path) {
        return Err(invalid_path(field, path, "must not contain \"..\""));
    }
    if crate::mounts::clean(path) == Path::new("/") {
        return Err(invalid_path(field, path, "is the container's root"));
    }
    Ok(())
}

/// The config's environment: names non-empty, without `=` or NUL (an entry is `KEY=value`
/// for the kernel, so neither can be carried); values without NUL.
pub fn check_envs(envs: &[KeyValue]) -> Result<(), SpecError> {
    for kv in envs {
        let bad = |reason| Err(SpecError::InvalidEnv { key: shown(&kv.key), reason });
        if kv.key.is_empty() {
            return bad("the name is empty");
        }
        if kv.key.contains('=') {
            return bad("the name contains '='");
        }
        if kv.key.contains('\0') {
            return bad("the name contains a NUL byte");
        }
        if kv.value.contains('\0') {
            return bad("the value contains a NUL byte");
        }
    }
    Ok(())
}

/// The config's `working_dir`: empty (the image's), or absolute without NUL bytes (runc
/// refuses a relative `cwd`).
pub fn check_working_dir(dir: &str) -> Result<(), SpecError> {
    if dir.is_empty() {
        return Ok(());
    }
    if dir.contains('\0') {
        return Err(invalid_path("working_dir", dir, "contains a NUL byte"));
    }
    if !dir.starts_with('/') {
        return Err(SpecError::RelativePath { field: "working_dir", path: shown(dir) });
    }
    Ok(())
}

/// `command` and `args`: no NUL bytes (no argv string can carry one).
pub fn check_argv(command: &[String], args: &[String]) -> Result<(), SpecError> {
    for (field, words) in [("command", command), ("args", args)] {
        if let Some(word) = words.iter().find(|w| w.contains('\0')) {
            return Err(SpecError::NulByte { field, value: shown(word) });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::LinuxPodSandboxConfig;

    #[test]
    fn log_paths() {
        for ok in ["", "app/0.log", "a.log", "ctr_1/12.log", "a/./b.log", "a..b/c..log"] {
            assert!(check_log_path(ok).is_ok(), "{ok}");
        }
        let long_name = format!("{}/0.log", "n".repeat(NAME_MAX + 1));
        let long_path = format!("{}0.log", "d/".repeat(PATH_MAX / 2));
        for bad in [
            "/etc/shadow",
            "../x.log",
            "a/../../x.log",
            "a/..",
            "..",
            ".",
            "a/.",
            "a/",
            "a\0b",
            long_name.as_str(),
            long_path.as_str(),
        ] {
            let err = check_log_path(bad).unwrap_err();
            assert!(matches!(&err, SpecError::InvalidPath { field: "log_path", .. }), "{bad}");
            assert!(err.to_string().len() < 2 * SHOWN, "{err}");
        }
    }

    #[test]
    fn joined_log_path() {
        let kubelet = "/var/log/pods/default_web_0123-4567";
        assert_eq!(
            container_log_path(kubelet, "app/0.log").unwrap(),
            Some(PathBuf::from("/var/log/pods/default_web_0123-4567/app/0.log"))
        );
        assert_eq!(container_log_path("", "app/0.log").unwrap(), None);
        assert_eq!(container_log_path(kubelet, "").unwrap(), None);
        assert!(container_log_path(kubelet, "/etc/passwd").is_err());
        assert!(container_log_path("relative/dir", "app/0.log").is_err());
        let deep = format!("/{}", "d".repeat(PATH_MAX - 8));
        assert!(matches!(
            container_log_path(&deep, "app/0.log"),
            Err(SpecError::InvalidPath { field: "log_path", .. })
        ));
    }

    #[test]
    fn pod_paths() {
        let pod = |dir: &str, parent: &str| PodSandboxConfig {
            log_directory: dir.into(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: parent.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        for (dir, parent) in [
            ("", ""),
            ("/var/log/pods/ns_name_uid", "/kubepods/burstable/pod1234"),
            ("/tmp/logs", "/kubepods/pod..x"),
        ] {
            assert!(validate_pod_paths(&pod(dir, parent)).is_ok(), "{dir} {parent}");
        }
        for (dir, parent) in [
            ("logs", ""),
            ("/logs\0", ""),
            ("", "kubepods/pod1"),
            ("", "/kubepods/../../escape"),
            ("", "/.."),
            ("", "/kube\0pods"),
        ] {
            assert!(validate_pod_paths(&pod(dir, parent)).is_err(), "{dir:?} {parent:?}");
        }
    }

    #[test]
    fn container_paths() {
        for ok in ["/data", "/a/b/", "//x", "/a/./b", "/a..b"] {
            assert!(check_container_path("mounts.container_path", ok).is_ok(), "{ok}");
        }
        for bad in ["/", "//", "/.", "data", "", "/a/../b", "/..", "/x\0y"] {
            assert!(check_container_path("mounts.container_path", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn envs_and_argv() {
        let kv = |k: &str, v: &str| KeyValue { key: k.into(), value: v.into() };
        assert!(check_envs(&[kv("A", "1"), kv("B_2", ""), kv("a.b-c", "x=y")]).is_ok());
        for bad in [kv("", "x"), kv("A=B", "x"), kv("A\0", "x"), kv("A", "x\0y")] {
            assert!(matches!(check_envs(&[bad]), Err(SpecError::InvalidEnv { .. })));
        }
        assert!(check_working_dir("").is_ok());
        assert!(check_working_dir("/srv").is_ok());
        assert!(check_working_dir("srv").is_err());
        assert!(check_working_dir("/s\0rv").is_err());
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_argv(&v(&["/bin/sh", "-c", ""]), &v(&[""])).is_ok());
        assert!(matches!(
            check_argv(&v(&["/bin/sh\0"]), &[]),
            Err(SpecError::NulByte { field: "command", .. })
        ));
        assert!(matches!(
            check_argv(&[], &v(&["a", "b\0"])),
            Err(SpecError::NulByte { field: "args", .. })
        ));
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        let s = "é".repeat(1000);
        let cut = shown(&s);
        assert!(cut.len() < SHOWN + 32 && cut.ends_with("(2000 bytes)"), "{cut}");
    }
}
