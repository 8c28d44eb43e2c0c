//! ExecSync, ReopenContainerLog, UpdateContainerResources: calls on a running container.

use std::path::Path;
use std::time::Duration;

use berth_shim::{Shim, ShimError};
use k8s_cri::v1::{ExecSyncResponse, LinuxContainerResources};

use crate::error::{Result, RuntimeError};
use crate::state::ContainerState;
use crate::util::{process_alive, write_atomic, write_volatile};
use crate::{ContainerEntry, Runtime};

impl<S: Shim + 'static> Runtime<S> {
    pub(crate) fn running(
        &self,
        id: &str,
        action: &'static str,
    ) -> Result<std::sync::Arc<ContainerEntry>> {
        let entry = self
            .find_container(id)
            .ok_or_else(|| RuntimeError::ContainerNotFound(id.to_owned()))?;
        let state = entry.status().state;
        if !state.is_running() {
            return Err(RuntimeError::WrongState {
                id: entry.meta.id.clone(),
                state: state.name(),
                action,
            });
        }
        Ok(entry)
    }

    pub(crate) fn read_spec(&self, entry: &ContainerEntry) -> Result<oci_spec::runtime::Spec> {
        let path = entry.meta.bundle.join("config.json");
        let bytes = std::fs::read(&path).map_err(RuntimeError::io("read", &path))?;
        serde_json::from_slice(&bytes)
            .map_err(|source| RuntimeError::CorruptRecord { id: entry.meta.id.clone(), source })
    }

    /// ExecSync: runs `cmd` in the container with its process settings. `timeout` seconds
    /// (0: none); on expiry the process is killed and DeadlineExceeded returned, as
    /// containerd does (the kubelet counts that as a probe timeout).
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: i64,
    ) -> Result<ExecSyncResponse> {
        if cmd.is_empty() {
            return Err(RuntimeError::Missing("cmd"));
        }
        let entry = self.running(id, "exec in it")?;
        let spec = self.read_spec(&entry)?;
        let process =
            berth_oci::exec_process(&spec, &cmd, false).map_err(RuntimeError::ContainerConfig)?;
        let after = (timeout > 0).then(|| Duration::from_secs(timeout as u64));
        let out = match self.shim.exec_sync(&entry.meta.id, process, after).await {
            Ok(out) => out,
            // The container's main process ended meanwhile (the kernel then kills whatever
            // joins its namespaces, so the runtime fails with a broken pipe): the container
            // is not running, as if the exit had been seen before the call.
            Err(ShimError::RuntimeFailed { .. })
                if entry.status().process.is_some_and(|p| !process_alive(p.pid, p.start_time)) =>
            {
                return Err(RuntimeError::WrongState {
                    id: entry.meta.id.clone(),
                    state: "exited",
                    action: "exec in it",
                });
            }
            // The runtime refused to start the process: say why in its words, not with its
            // command line and state paths.
            Err(ShimError::RuntimeFailed { stderr, .. }) => {
                return Err(RuntimeError::ExecFailed {
                    id: entry.meta.id.clone(),
                    command: cmd,
                    reason: exec_failure_reason(&stderr),
                });
            }
            Err(e) => return Err(RuntimeError::Shim(e)),
        };
        if out.timed_out {
            return Err(RuntimeError::ExecTimeout {
                command: cmd,
                after: after.unwrap_or_default(),
            });
        }
        Ok(ExecSyncResponse { stdout: out.stdout, stderr: out.stderr, exit_code: out.exit_code })
    }

    /// ReopenContainerLog: the kubelet rotated the log file.
    pub async fn reopen_container_log(&self, id: &str) -> Result<()> {
        let entry = self.running(id, "reopen its log")?;
        self.shim.reopen_log(&entry.meta.id).await.map_err(RuntimeError::Shim)
    }

    /// UpdateContainerResources: `<runtime> update --resources <file>`, then records them.
    pub async fn update_container_resources(
        &self,
        id: &str,
        resources: Option<LinuxContainerResources>,
    ) -> Result<()> {
        let Some(resources) = resources else { return Ok(()) };
        // Refused before anything is touched: the OCI runtime would fail on them with its
        // own words and the host's cgroup paths.
        berth_oci::resources::validate(&resources).map_err(RuntimeError::Resources)?;
        crate::cgroups::check_cpuset_online(&resources)?;
        let entry = self
            .find_container(id)
            .ok_or_else(|| RuntimeError::ContainerNotFound(id.to_owned()))?;
        let _op = entry.op.lock().await;
        let status = entry.status();
        let mut oci = berth_oci::resources::resources(&resources, self.cgroup_v2)
            .map_err(RuntimeError::Resources)?;
        self.resource_fit.apply(&mut oci, &entry.meta.id);
        match status.state {
            // No task yet: the spec StartContainer runs it with takes the new resources.
            _ if status.awaits_task() => {
                let bundle = entry.meta.bundle.clone();
                tokio::task::spawn_blocking(move || update_spec_resources(&bundle, oci))
                    .await
                    .map_err(|e| RuntimeError::TaskFailed(e.to_string()))??;
            }
            ContainerState::Running | ContainerState::Created => {
                self.runtime_update(&entry, &oci).await?
            }
            ContainerState::Exited | ContainerState::Unknown => {}
        }
        self.update_container(&entry, |s| {
            s.resources = Some(resources);
            true
        })?;
        Ok(())
    }

    /// `<runtime> update --resources <file>` for the container's task.
    async fn runtime_update(
        &self,
        entry: &ContainerEntry,
        oci: &oci_spec::runtime::LinuxResources,
    ) -> Result<()> {
        let file = entry.meta.bundle.join("resources.json");
        let json = serde_json::to_vec(oci)
            .map_err(|source| RuntimeError::Serialize { what: "resources", source })?;
        write_atomic(&file, &json)?;
        let mut cmd = std::process::Command::new(&entry.meta.runtime);
        cmd.arg("--root")
            .arg(&entry.meta.runtime_root)
            .arg("update")
            .arg("--resources")
            .arg(&file)
            .arg(&entry.meta.id);
        let out = berth_shim::run_captured(cmd, Some(Duration::from_secs(30)))
            .await
            .map_err(RuntimeError::Shim)?;
        if out.code != 0 {
            return Err(RuntimeError::Shim(berth_shim::ShimError::RuntimeFailed {
                command: format!("{} update", entry.meta.runtime.display()),
                id: entry.meta.id.clone(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                code: out.code,
            }));
        }
        Ok(())
    }
}

/// The reason an OCI runtime gives for not starting an exec's process, without the layers
/// of context runc wraps it in (`exec failed: unable to start container process: exec:
/// "x": executable file not found in $PATH` becomes `"x": executable file not found in
/// $PATH`).
fn exec_failure_reason(message: &str) -> String {
    let mut reason = message.trim();
    for prefix in
        ["runc exec failed:", "exec failed:", "unable to start container process:", "exec:"]
    {
        if let Some(rest) = reason.strip_prefix(prefix) {
            reason = rest.trim_start();
        }
    }
    if reason.is_empty() { message.trim().to_owned() } else { reason.to_owned() }
}

/// Puts `new` into the bundle's `config.json` as `<runtime> update` would apply it: the
/// fields it sets replace the spec's, the rest (the device rules) stay.
fn update_spec_resources(bundle: &Path, new: oci_spec::runtime::LinuxResources) -> Result<()> {
    let path = bundle.join("config.json");
    let data = std::fs::read(&path).map_err(RuntimeError::io("read", &path))?;
    let mut spec: oci_spec::runtime::Spec = serde_json::from_slice(&data)
        .map_err(|source| RuntimeError::BundleSpec { path: path.clone(), source })?;
    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut resources = linux.resources().clone().unwrap_or_default();
    merge_resources(&mut resources, new);
    linux.set_resources(Some(resources));
    spec.set_linux(Some(linux));
    let json = serde_json::to_vec(&spec)
        .map_err(|source| RuntimeError::Serialize { what: "OCI spec", source })?;
    // The bundle lives in the volatile state dir, as CreateContainer wrote it.
    write_volatile(&path, &json)
}

/// The fields `new` sets replace those of `spec`.
fn merge_resources(
    spec: &mut oci_spec::runtime::LinuxResources,
    new: oci_spec::runtime::LinuxResources,
) {
    if let Some(cpu) = new.cpu() {
        spec.set_cpu(Some(cpu.clone()));
    }
    if let Some(memory) = new.memory() {
        spec.set_memory(Some(*memory));
    }
    if let Some(pids) = new.pids() {
        spec.set_pids(Some(*pids));
    }
    if let Some(hugepages) = new.hugepage_limits() {
        spec.set_hugepage_limits(Some(hugepages.clone()));
    }
    if let Some(unified) = new.unified() {
        spec.set_unified(Some(unified.clone()));
    }
}

#[cfg(test)]
mod tests {
    use oci_spec::runtime::{LinuxDeviceCgroup, LinuxMemoryBuilder, LinuxResourcesBuilder};

    use super::*;

    #[test]
    fn exec_failure_reasons_lose_runc_context() {
        assert_eq!(
            exec_failure_reason(
                "exec failed: unable to start container process: exec: \"nope\": executable file not found in $PATH"
            ),
            "\"nope\": executable file not found in $PATH"
        );
        assert_eq!(exec_failure_reason("  something else  "), "something else");
        assert_eq!(exec_failure_reason("exec:"), "exec:");
    }

    #[test]
    fn merge_keeps_device_rules_and_replaces_what_is_set() {
        let deny_all = LinuxDeviceCgroup::default();
        let mut spec = LinuxResourcesBuilder::default()
            .devices(vec![deny_all.clone()])
            .memory(LinuxMemoryBuilder::default().limit(1 << 20).build().expect("memory"))
            .build()
            .expect("resources");
        let new = LinuxResourcesBuilder::default()
            .memory(LinuxMemoryBuilder::default().limit(2 << 20).build().expect("memory"))
            .build()
            .expect("resources");
        merge_resources(&mut spec, new);
        assert_eq!(spec.devices().as_deref(), Some(&[deny_all][..]));
        assert_eq!(spec.memory().and_then(|m| m.limit()), Some(2 << 20));
    }
}
