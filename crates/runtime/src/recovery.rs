//! Startup: load the records, re-reserve names, and settle containers whose process is gone
//! (berthd was down when they exited). Full reattachment to live tasks is a later issue;
//! live ones stay as recorded and are stopped by pid when asked.

use berth_shim::Shim;

use crate::error::Result;
use crate::records::{ContainerStatus, SandboxStatus};
use crate::state::{ContainerState, SandboxState};
use crate::util::{now_ns, process_alive};
use crate::{ContainerEntry, Runtime, SandboxEntry};

/// Exit code recorded for a container whose exit berthd missed (containerd uses 255 too).
const LOST_EXIT_CODE: i32 = 255;

impl<S: Shim + 'static> Runtime<S> {
    pub(crate) fn recover(&self) -> Result<()> {
        for (meta, status) in self.store.load_sandboxes()? {
            let status = status.unwrap_or(SandboxStatus { state: SandboxState::NotReady });
            if let Err(holder) = self.names.reserve(&meta.name, &meta.id) {
                tracing::warn!(pod_id = %meta.id, %holder, "duplicate pod name in the store");
            }
            self.insert_sandbox(SandboxEntry::new(meta, status));
        }
        for (meta, status) in self.store.load_containers()? {
            let mut status = status.unwrap_or_default();
            let alive = status.process.is_some_and(|p| process_alive(p.pid, p.start_time));
            if matches!(status.state, ContainerState::Running | ContainerState::Created) && !alive {
                status = ContainerStatus {
                    state: ContainerState::Exited,
                    finished_at: now_ns(),
                    exit_code: LOST_EXIT_CODE,
                    reason: "Unknown".into(),
                    message: "container process lost while berthd was down".into(),
                    ..status
                };
                self.store.put_container_status(&meta.id, &status)?;
                tracing::info!(container_id = %meta.id, "container exited while berthd was down");
            }
            if let Err(holder) = self.names.reserve(&meta.name, &meta.id) {
                tracing::warn!(container_id = %meta.id, %holder, "duplicate container name in the store");
            }
            self.insert_container(ContainerEntry::new(meta, status));
        }
        Ok(())
    }
}
