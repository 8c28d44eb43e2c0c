//! [`AnyShim`]: the shim `berth.toml` chose (`shim = "embedded"` or `"external"`), as one
//! type, so the runtime need not be generic over it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::{
    CreateTask, EmbeddedShim, ExecOutput, Exit, ExternalShim, Shim, ShimError, TaskEvent, TaskState,
};

/// Either shim; every call is forwarded.
#[derive(Debug, Clone)]
pub enum AnyShim {
    /// Containers run under berthd itself.
    Embedded(Arc<EmbeddedShim>),
    /// One `berth-shim` process per pod.
    External(Arc<ExternalShim>),
}

impl AnyShim {
    /// After a berthd restart: the tasks that survived it, and those that ended meanwhile.
    /// See [`ExternalShim::connect_existing`] and the embedded shim's [`Shim::reattach`].
    pub async fn connect_existing(&self) -> Result<Vec<crate::RecoveredTask>, ShimError> {
        match self {
            AnyShim::Embedded(s) => s.reattach().await,
            AnyShim::External(s) => s.connect_existing().await,
        }
    }
}

macro_rules! forward {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            AnyShim::Embedded($s) => $call,
            AnyShim::External($s) => $call,
        }
    };
}

impl Shim for AnyShim {
    async fn create(&self, task: CreateTask) -> Result<u32, ShimError> {
        forward!(self, s => s.create(task).await)
    }
    async fn start(&self, id: &str) -> Result<(), ShimError> {
        forward!(self, s => s.start(id).await)
    }
    async fn kill(&self, id: &str, signal: i32, all: bool) -> Result<(), ShimError> {
        forward!(self, s => s.kill(id, signal, all).await)
    }
    async fn wait(&self, id: &str, timeout: Duration) -> Result<Option<Exit>, ShimError> {
        forward!(self, s => s.wait(id, timeout).await)
    }
    async fn state(&self, id: &str) -> Result<TaskState, ShimError> {
        forward!(self, s => s.state(id).await)
    }
    async fn delete(&self, id: &str) -> Result<(), ShimError> {
        forward!(self, s => s.delete(id).await)
    }
    async fn exec_sync(
        &self,
        id: &str,
        process: oci_spec::runtime::Process,
        timeout: Option<Duration>,
    ) -> Result<ExecOutput, ShimError> {
        forward!(self, s => s.exec_sync(id, process, timeout).await)
    }
    async fn reopen_log(&self, id: &str) -> Result<(), ShimError> {
        forward!(self, s => s.reopen_log(id).await)
    }
    fn subscribe(&self) -> broadcast::Receiver<TaskEvent> {
        forward!(self, s => s.subscribe())
    }
    fn bind_container(&self, container_id: &str, pod_id: &str) {
        forward!(self, s => Shim::bind_container(s.as_ref(), container_id, pod_id))
    }
    async fn release_pod(&self, pod_id: &str) -> Result<(), ShimError> {
        forward!(self, s => s.release_pod(pod_id).await)
    }
    async fn reattach(&self) -> Result<Vec<crate::RecoveredTask>, ShimError> {
        self.connect_existing().await
    }
}
