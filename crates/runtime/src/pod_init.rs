//! The pod's init process, for pods that share one PID namespace (PID mode POD): started
//! here as `berth-pod-init` (or `berthd pod-init`), which makes the namespace, forks its
//! PID 1 and prints that one's host PID (see the `berth_pod_init` crate).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::error::{Result, RuntimeError};
use crate::records::ProcessRef;
use crate::util::process_start_time;

use berth_pod_init::POD_INIT_COMMAND;

/// How long the helper may take to report its child.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the pod init for the pod in `pod_dir` and returns it.
pub(crate) async fn start(program: &Path, pod_dir: &Path) -> Result<ProcessRef> {
    let mut cmd = Command::new(program);
    // The pod dir makes the process recognisable (and findable by tests) in `ps`.
    cmd.arg(POD_INIT_COMMAND).arg(pod_dir).current_dir("/");
    let out = berth_shim::run_captured(cmd, Some(START_TIMEOUT))
        .await
        .map_err(|e| RuntimeError::PodInit { reason: e.to_string() })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if out.code != 0 {
        return Err(RuntimeError::PodInit {
            reason: format!(
                "exit code {}: {}",
                out.code,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    let pid: u32 = text
        .trim()
        .parse()
        .map_err(|_| RuntimeError::PodInit { reason: format!("unexpected output {text:?}") })?;
    Ok(ProcessRef { pid, start_time: process_start_time(pid) })
}

/// Kills the pod init (and with it every process left in its PID namespace).
pub(crate) fn kill(init: &ProcessRef) {
    if crate::util::process_alive(init.pid, init.start_time) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(init.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}
