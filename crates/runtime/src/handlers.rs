//! Which runtime handlers can run a container on this host. `Status` advertises only those:
//! a configured binary that is missing, or that refuses the host (crun refuses cgroup
//! v1/v2 hybrid hosts), must not look like a usable RuntimeClass to the kubelet.
//! RunPodSandbox still takes every configured handler, and then fails with the runtime's
//! own reason.
//!
//! `<binary> --version` would not do: crun prints its version on such a host too. The probe
//! runs one container with each handler, once at startup: the host's root read-only, no
//! capabilities, new namespaces, running berthd's own `--version`. That costs one
//! `<runtime> run` (tens of milliseconds) per handler, concurrently with recovery.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_shim::Shim;

use crate::{Runtime, cgroups};

/// How long one probe may take before its handler counts as unusable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// The probe container's OCI spec: `program --version` in the host's root file system,
/// bound read-only over an empty `rootfs`, without capabilities, in new namespaces and in
/// cgroup `cgroups_path`.
fn probe_spec(program: &Path, cgroups_path: &str) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": [program, "--version"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {},
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "berth-probe",
        "mounts": [
            {"destination": "/", "type": "bind", "source": "/",
             "options": ["rbind", "ro", "private"]}
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                {"type": "mount"}, {"type": "network"}
            ],
            "cgroupsPath": cgroups_path
        }
    })
}

impl<S: Shim + 'static> Runtime<S> {
    /// Probes every configured handler (see the module docs) and remembers which can run a
    /// container; [`Runtime::handlers`] reports only those from then on. Call once, before
    /// serving; a handler that fails is logged with the runtime's words.
    pub async fn probe_handlers(&self) {
        let Ok(program) = std::env::current_exe() else {
            tracing::warn!("cannot find berthd's executable: runtime handlers are not probed");
            return;
        };
        let dir = self.config.state_dir.join("probe");
        let probes = self.config.handlers.iter().map(|(name, binary)| {
            let (dir, program) = (dir.join(name), program.clone());
            let cgroups_path = format!(
                "{}/probe-{name}-{}",
                self.config.cgroup_parent.trim_end_matches('/'),
                std::process::id()
            );
            async move {
                let result = probe(binary, &dir, &program, &cgroups_path).await;
                cgroups::remove(&self.config.cgroup_root, &cgroups_path);
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    tracing::debug!(dir = %dir.display(), error = %e, "cannot remove probe dir");
                }
                match result {
                    Ok(()) => {
                        tracing::debug!(handler = %name, "runtime handler runs containers");
                        Some(name.clone())
                    }
                    Err(reason) => {
                        tracing::warn!(
                            handler = %name, binary = %binary.display(), %reason,
                            "runtime handler cannot run containers here: not advertised"
                        );
                        None
                    }
                }
            }
        });
        let usable: BTreeSet<String> =
            futures::future::join_all(probes).await.into_iter().flatten().collect();
        // Each probe removed its own directory; the parent goes if nothing else is in it.
        let _ = std::fs::remove_dir(&dir);
        let _ = self.usable_handlers.set(usable);
    }
}

/// Runs the probe container with `binary`; the reason it failed, in words.
async fn probe(
    binary: &Path,
    dir: &Path,
    program: &Path,
    cgroups_path: &str,
) -> Result<(), String> {
    let rootfs = dir.join("rootfs");
    let root = dir.join("state");
    for d in [&rootfs, &root] {
        std::fs::create_dir_all(d).map_err(|e| format!("create {}: {e}", d.display()))?;
    }
    let spec = probe_spec(program, cgroups_path);
    std::fs::write(dir.join("config.json"), spec.to_string())
        .map_err(|e| format!("write the probe's config.json: {e}"))?;
    let id = format!("berth-probe-{}", std::process::id());
    let runtime_cmd = |args: &[&std::ffi::OsStr]| {
        let mut cmd = std::process::Command::new(binary);
        cmd.arg("--root").arg(&root).args(args);
        cmd
    };
    let bundle: PathBuf = dir.to_path_buf();
    let run = runtime_cmd(&["run".as_ref(), "--bundle".as_ref(), bundle.as_os_str(), id.as_ref()]);
    let out = berth_shim::run_captured(run, Some(PROBE_TIMEOUT)).await;
    // Whatever got made (a container record, its cgroup) goes, whether it ran or not.
    let delete = runtime_cmd(&["delete".as_ref(), "--force".as_ref(), id.as_ref()]);
    let _ = berth_shim::run_captured(delete, Some(PROBE_TIMEOUT)).await;
    let out = out.map_err(|e| e.to_string())?;
    if out.code == 0 {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    Err(format!("exit code {}: {last}", out.code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_runs_berthd_read_only_without_capabilities() {
        let spec = probe_spec(Path::new("/usr/bin/berthd"), "/berth/probe-runc-1");
        assert_eq!(spec["process"]["args"], serde_json::json!(["/usr/bin/berthd", "--version"]));
        assert_eq!(spec["process"]["capabilities"], serde_json::json!({}));
        assert_eq!(spec["root"]["readonly"], true);
        assert_eq!(spec["mounts"][0]["options"], serde_json::json!(["rbind", "ro", "private"]));
        assert_eq!(spec["linux"]["cgroupsPath"], "/berth/probe-runc-1");
        // It parses as an OCI spec.
        let parsed: oci_spec::runtime::Spec = serde_json::from_value(spec).unwrap();
        assert_eq!(parsed.root().as_ref().map(|r| r.readonly()), Some(Some(true)));
    }
}
