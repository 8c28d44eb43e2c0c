//! Helpers shared by the real-runc tests: availability check and a busybox bundle.

#![allow(dead_code)]

use std::path::Path;

/// The OCI runtime the tests drive.
pub const RUNC: &str = "runc";

/// Root, runc and a static busybox are present (prints why not otherwise).
pub fn available() -> bool {
    let ok = nix::unistd::geteuid().is_root()
        && Path::new("/bin/busybox").exists()
        // Looked up rather than run: a spawn here would race with the reaper of a test
        // that already started it (and be skipped for a lost exit status).
        && std::env::var_os("PATH").is_some_and(|p| {
            std::env::split_paths(&p).any(|d| d.join(RUNC).is_file())
        });
    if !ok {
        report_skip("needs root, runc and /bin/busybox");
    }
    ok
}

/// Says on stderr that the running test is skipped, and why: `SKIPPED <test>: <reason>`.
/// Written to the stderr file itself, past the test harness's capture, so a `cargo test`
/// run shows it although the test then returns as passed.
pub fn report_skip(reason: &str) {
    use std::io::Write;
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}

/// Writes `<bundle>/config.json` and a busybox rootfs (with `/tmp`) running `args`.
pub fn write_bundle(bundle: &Path, args: &[&str]) {
    write_bundle_in_cgroup(bundle, args, None);
}

/// [`write_bundle`], with `cgroup` = `(cgroupsPath, memory limit)` giving the container a
/// memory cgroup of its own.
pub fn write_bundle_in_cgroup(bundle: &Path, args: &[&str], cgroup: Option<(&str, i64)>) {
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::create_dir_all(rootfs.join("tmp")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    let applets = ["sh", "echo", "sleep", "cat", "touch", "true", "false", "test", "[", "tail"];
    for applet in applets.into_iter().chain(["printf", "head"]) {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    let mut linux = serde_json::json!({
        "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
    });
    if let Some((path, limit)) = cgroup {
        linux["cgroupsPath"] = path.into();
        linux["resources"] = serde_json::json!({"memory": {"limit": limit, "swap": limit}});
    }
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/",
        },
        "root": {"path": "rootfs"},
        "hostname": "shim-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "mode=755"]},
        ],
        "linux": linux,
    });
    std::fs::write(bundle.join("config.json"), serde_json::to_vec_pretty(&config).unwrap())
        .unwrap();
}

/// An OCI process running `args`.
pub fn process(args: &[&str]) -> oci_spec::runtime::Process {
    serde_json::from_value(serde_json::json!({
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin"],
        "cwd": "/",
    }))
    .unwrap()
}

/// `runc delete --force`, synchronously and best effort.
pub fn runc_delete(runtime_root: &Path, id: &str) {
    let _ = std::process::Command::new(RUNC)
        .arg("--root")
        .arg(runtime_root)
        .args(["delete", "--force", id])
        .stderr(std::process::Stdio::null())
        .status();
}
