//! ExecSync, ReopenContainerLog, UpdateContainerResources: calls on a running container.

use std::time::Duration;

use berth_shim::Shim;
use k8s_cri::v1::{ExecSyncResponse, LinuxContainerResources};

use crate::error::{Result, RuntimeError};
use crate::util::write_atomic;
use crate::{ContainerEntry, Runtime};

impl<S: Shim + 'static> Runtime<S> {
    fn running(&self, id: &str, action: &'static str) -> Result<std::sync::Arc<ContainerEntry>> {
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

    fn read_spec(&self, entry: &ContainerEntry) -> Result<oci_spec::runtime::Spec> {
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
        let out = self
            .shim
            .exec_sync(&entry.meta.id, process, after)
            .await
            .map_err(RuntimeError::Shim)?;
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
        let entry = self
            .find_container(id)
            .ok_or_else(|| RuntimeError::ContainerNotFound(id.to_owned()))?;
        let _op = entry.op.lock().await;
        let state = entry.status().state;
        let oci = berth_oci::resources::resources(&resources, self.cgroup_v2)
            .map_err(RuntimeError::ContainerConfig)?;
        if matches!(
            state,
            crate::state::ContainerState::Running | crate::state::ContainerState::Created
        ) {
            let file = entry.meta.bundle.join("resources.json");
            let json = serde_json::to_vec(&oci)
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
        }
        self.update_container(&entry, |s| {
            s.resources = Some(resources);
            true
        })?;
        Ok(())
    }
}
