//! The shim's record of one task (container main process).

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::adopt::{PidFd, TaskFile};
use crate::log::LogWriter;
use crate::oom::OomCounter;
use crate::runtime_cmd::RuntimeCmd;
use crate::{Exit, TaskState};

/// One task. Immutable after creation except for the `started` flag, the exit (published
/// once by the exit monitor) and the background tasks' handles. Either created by this
/// shim, or adopted from a previous berthd's (see `adopt`).
pub(crate) struct Task {
    pub(crate) runtime: RuntimeCmd,
    /// `<state_dir>/<id>`.
    pub(crate) dir: PathBuf,
    /// Host PID of the container's init.
    pub(crate) pid: u32,
    pub(crate) started: AtomicBool,
    /// `Some` once the main process has exited and its logs have been drained.
    pub(crate) exit: watch::Receiver<Option<Exit>>,
    pub(crate) log: Option<Arc<LogWriter>>,
    /// The container's OOM-kill counter (`None`: no memory cgroup to watch).
    pub(crate) oom: Option<OomCounter>,
    /// Our write end of the container's stdin pipe, kept so stdin stays open.
    pub(crate) stdin: Arc<Mutex<Option<OwnedFd>>>,
    /// Log copiers and the OOM watcher, stopped on delete.
    pub(crate) background: Mutex<Vec<AbortHandle>>,
    /// The task's record for a later berthd (`None` where none is kept: the external shim
    /// keeps its own).
    pub(crate) record: Option<TaskFile>,
    /// Set for a task adopted from a previous berthd whose init still ran: not our child,
    /// so the reaper never sees its exit. It is watched, and signalled, through this.
    pub(crate) pidfd: Option<Arc<PidFd>>,
}

impl Task {
    pub(crate) fn exit(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    pub(crate) fn state(&self) -> TaskState {
        match self.exit() {
            Some(exit) => TaskState::Exited(exit),
            None if self.started.load(Ordering::Acquire) => TaskState::Running { pid: self.pid },
            None => TaskState::Created { pid: self.pid },
        }
    }

    /// Stops the background tasks and closes stdin.
    pub(crate) fn stop_background(&self) {
        for h in self.background.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            h.abort();
        }
        self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}
