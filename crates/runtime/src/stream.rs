//! What the streaming server needs from the runtime: exec processes with their stdio handed
//! over, and the network namespace a pod's ports live in.

use std::path::PathBuf;

use berth_shim::{ExecSpec, Shim, StreamingExec};

use crate::Runtime;
use crate::error::{Result, RuntimeError};

/// Where a pod's ports are reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodNetwork {
    /// The pod's own network namespace, pinned at this path.
    Namespace(PathBuf),
    /// The node's (host-network pods).
    Host,
}

/// A streaming exec: which container, which command, which stdio.
#[derive(Debug, Clone, Default)]
pub struct StreamExec {
    /// The container (id or unique prefix).
    pub container_id: String,
    /// The command and its arguments.
    pub cmd: Vec<String>,
    /// Allocate a pty.
    pub tty: bool,
    /// Wire up stdin.
    pub stdin: bool,
    /// Wire up stdout.
    pub stdout: bool,
    /// Wire up stderr (not with a tty).
    pub stderr: bool,
    /// The terminal's size to start with, (width, height): a command that looks at once
    /// must not see 0x0 before the client's first resize lands.
    pub console_size: Option<(u16, u16)>,
}

/// What an attach session connects to.
#[derive(Debug, Clone)]
pub struct AttachTarget {
    /// The container's bundle, which holds the shim's attach socket.
    pub bundle: PathBuf,
    /// The container has a tty (one output stream; resizes apply).
    pub tty: bool,
    /// The container was created with stdin open.
    pub stdin: bool,
}

impl<S: Shim + 'static> Runtime<S> {
    /// Where to attach to the running container `id`'s own process.
    pub fn attach_target(&self, id: &str) -> Result<AttachTarget> {
        let entry = self.running(id, "attach to it")?;
        Ok(AttachTarget {
            bundle: entry.meta.bundle.clone(),
            tty: entry.meta.config.tty,
            stdin: entry.meta.config.stdin,
        })
    }

    /// Starts `exec.cmd` in the running container with the container's process settings and
    /// hands over its stdio. berthd runs the OCI runtime itself, with either shim (see
    /// `berth_shim::start_exec` for why).
    pub async fn exec_streaming(&self, exec: &StreamExec) -> Result<StreamingExec> {
        if exec.cmd.is_empty() {
            return Err(RuntimeError::Missing("cmd"));
        }
        let entry = self.running(&exec.container_id, "exec in it")?;
        let spec = self.read_spec(&entry)?;
        let mut process = berth_oci::exec_process(&spec, &exec.cmd, exec.tty)
            .map_err(RuntimeError::ContainerConfig)?;
        if let (true, Some((width, height))) = (exec.tty, exec.console_size) {
            // The builder has defaults for every field, so it cannot fail.
            let size = oci_spec::runtime::BoxBuilder::default()
                .width(u64::from(width))
                .height(u64::from(height))
                .build()
                .ok();
            process.set_console_size(size);
        }
        let json = serde_json::to_vec(&process)
            .map_err(|source| RuntimeError::Serialize { what: "exec process", source })?;
        let work_dir = self.config.state_dir.join("exec");
        berth_shim::start_exec(ExecSpec {
            runtime: &entry.meta.runtime,
            runtime_root: &entry.meta.runtime_root,
            work_dir: &work_dir,
            id: &entry.meta.id,
            process_json: &json,
            tty: exec.tty,
            stdin: exec.stdin,
            stdout: exec.stdout,
            stderr: exec.stderr && !exec.tty,
        })
        .await
        .map_err(RuntimeError::Shim)
    }

    /// The network a pod's forwarded ports are reached in; the pod must exist and be ready.
    pub fn pod_network(&self, pod_id: &str) -> Result<PodNetwork> {
        let entry = self
            .find_sandbox(pod_id)
            .ok_or_else(|| RuntimeError::SandboxNotFound(pod_id.to_owned()))?;
        Ok(match &entry.meta.netns {
            Some(path) => PodNetwork::Namespace(path.clone()),
            None => PodNetwork::Host,
        })
    }

    /// Whether the container exists and is running (checked before handing out a URL).
    pub fn check_running(&self, id: &str) -> Result<()> {
        self.running(id, "stream to it").map(|_| ())
    }
}
