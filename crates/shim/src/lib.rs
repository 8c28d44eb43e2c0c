//! berth-shim: drives a runc-compatible OCI runtime binary for berth's containers. It starts
//! and stops container processes, copies their stdout/stderr into CRI-format log files, reaps
//! them, records exit codes and times, detects OOM kills from the cgroup, and runs exec
//! sessions. `Shim` is the interface; `EmbeddedShim` runs inside berthd, `ExternalShim`
//! talks to one `berth-shim` process per pod (which outlives berthd), and `AnyShim` is
//! whichever of the two `berth.toml` chose.
//!
//! Modules: `reaper` (the one process-wide `waitpid(-1)` loop every child goes through),
//! `runtime_cmd` (runtime invocations), `log` (CRI log files), `oom` (OOM-kill detection),
//! `exec` (`exec_sync`), `console` (ttys via `--console-socket`), `embedded` (the [`Shim`]
//! implementation), `external` (the `berth-shim` server, its client and wire format),
//! `state_file` (the external shim's per-task exit records), `adopt` (the embedded shim's
//! task records and pidfds, by which a restarted berthd adopts its tasks), `any` (the
//! [`AnyShim`] choice).

// Unsafe code only in the modules allowed by name below.
#![deny(unsafe_code)]

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

// unsafe: pidfd_open/pidfd_send_signal syscalls and polling the pidfd.
#[allow(unsafe_code)]
mod adopt;
mod any;
pub mod attach;
pub mod command;
// unsafe: takes ownership of the pty master received over SCM_RIGHTS.
#[allow(unsafe_code)]
mod console;
mod embedded;
mod error;
mod exec;
// unsafe: TIOCSWINSZ ioctl for tty resizes.
#[allow(unsafe_code)]
mod exec_stream;
pub mod external;
pub mod log;
// unsafe: polls the eventfd/inotify fd it owns through tokio.
#[allow(unsafe_code)]
pub mod oom;
mod pipe;
// unsafe: waitpid(2) of any child, the one reaper.
#[allow(unsafe_code)]
pub mod reaper;
mod runtime_cmd;
mod sock_path;
pub mod state_file;
mod task;

pub use any::AnyShim;
pub use command::run_with_input;
pub use embedded::{EmbeddedShim, validate_id};
pub use error::ShimError;
pub use exec::EXEC_OUTPUT_CAP;
pub use exec_stream::{ExecSpec, StreamingExec, kill_exec, resize_pty, start_exec};
pub use external::{ExternalShim, RecoveredTask};
pub use reaper::{Captured, Reaper, become_subreaper, run_captured};

/// How a container's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Exit {
    /// Exit code; `128 + signal` when killed by a signal.
    pub code: i32,
    /// When it was reaped.
    pub at: SystemTime,
    /// The cgroup's OOM-kill counter rose while this task ran (main process only).
    pub oom_killed: bool,
    /// The real exit was lost (the task's shim died without recording it): `code` is a
    /// placeholder (255) and the runtime reports the reason `Unknown`.
    #[serde(default)]
    pub lost: bool,
}

/// A task (container main process) to create.
#[derive(Debug, Clone)]
pub struct CreateTask {
    /// Container ID (also the runtime's container name).
    pub id: String,
    /// The OCI bundle directory (holds `config.json`; rootfs already mounted).
    pub bundle: PathBuf,
    /// The OCI runtime binary (`runc`, `/usr/bin/crun`, ...).
    pub runtime: PathBuf,
    /// The runtime's `--root` state directory.
    pub runtime_root: PathBuf,
    /// The CRI log file to append stdout/stderr to (`None`: discard).
    pub log_path: Option<PathBuf>,
    /// The container's memory cgroup directory, for OOM detection (`None`: no detection).
    pub memory_cgroup: Option<PathBuf>,
    /// Allocate a terminal.
    pub tty: bool,
    /// Keep stdin open (attach sessions write to it).
    pub stdin: bool,
    /// Close stdin once the first attach session that used it ends.
    pub stdin_once: bool,
    /// Start it as well (`<runtime> run --detach`): one runtime process instead of a
    /// `create` and a `start`, which is how StartContainer makes a task.
    pub start: bool,
}

/// The state of a task as the shim knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskState {
    /// Created by the runtime, not started.
    Created {
        /// Host PID of the container's init.
        pid: u32,
    },
    /// Running.
    Running {
        /// Host PID of the container's init.
        pid: u32,
    },
    /// Exited.
    Exited(Exit),
}

/// An event from the shim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEvent {
    /// A task's main process exited.
    Exited {
        /// Container ID.
        id: String,
        /// How.
        exit: Exit,
    },
    /// The task's cgroup saw an OOM kill (any process in it).
    Oom {
        /// Container ID.
        id: String,
    },
}

/// Output of `exec_sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Captured stdout (capped).
    pub stdout: Vec<u8>,
    /// Captured stderr (capped).
    pub stderr: Vec<u8>,
    /// Exit code (`-1`... when it timed out and was killed: see `timed_out`).
    pub exit_code: i32,
    /// The timeout expired and the process was killed.
    pub timed_out: bool,
}

/// The interface berth's runtime uses to run containers.
#[allow(async_fn_in_trait)]
pub trait Shim: Send + Sync {
    /// `<runtime> create`: the process exists, stopped before the user's command. With
    /// [`CreateTask::start`], `<runtime> run --detach`: the user's command runs.
    fn create(
        &self,
        task: CreateTask,
    ) -> impl std::future::Future<Output = Result<u32, ShimError>> + Send;
    /// `<runtime> start`.
    fn start(&self, id: &str) -> impl std::future::Future<Output = Result<(), ShimError>> + Send;
    /// Sends `signal` to the task's main process (`all`: every process in it).
    fn kill(
        &self,
        id: &str,
        signal: i32,
        all: bool,
    ) -> impl std::future::Future<Output = Result<(), ShimError>> + Send;
    /// Waits until the task exits, or `timeout` passes (`Ok(None)`).
    fn wait(
        &self,
        id: &str,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Result<Option<Exit>, ShimError>> + Send;
    /// The task's state.
    fn state(
        &self,
        id: &str,
    ) -> impl std::future::Future<Output = Result<TaskState, ShimError>> + Send;
    /// `<runtime> delete` (forced if still running); forgets the task. Idempotent.
    fn delete(&self, id: &str) -> impl std::future::Future<Output = Result<(), ShimError>> + Send;
    /// Runs `process` (an OCI process JSON) in the task and collects its output.
    fn exec_sync(
        &self,
        id: &str,
        process: oci_spec::runtime::Process,
        timeout: Option<Duration>,
    ) -> impl std::future::Future<Output = Result<ExecOutput, ShimError>> + Send;
    /// Reopens the task's log file (after the kubelet rotated it).
    fn reopen_log(
        &self,
        id: &str,
    ) -> impl std::future::Future<Output = Result<(), ShimError>> + Send;
    /// Subscribes to exits and OOM events of all tasks.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<TaskEvent>;
    /// Tells the shim which pod sandbox a container belongs to; call before `create`. The
    /// external shim routes a container to its pod's shim process by it; the embedded one
    /// needs nothing.
    fn bind_container(&self, _container_id: &str, _pod_id: &str) {}
    /// After a berthd restart: reattaches to the tasks that outlived the previous berthd and
    /// returns them with their states (exits that happened meanwhile included). The
    /// embedded shim adopts its tasks from the records it keeps: their processes are no
    /// longer berthd's children, so their exit codes are lost (`Exit::lost`, code 255) and
    /// so is their output from then on; exec, signals, stop and delete work as before.
    fn reattach(
        &self,
    ) -> impl std::future::Future<Output = Result<Vec<RecoveredTask>, ShimError>> + Send {
        async { Ok(Vec::new()) }
    }
    /// The pod sandbox is being removed (its containers deleted already): release what the
    /// shim keeps for it. The external shim stops the pod's shim process.
    fn release_pod(
        &self,
        _pod_id: &str,
    ) -> impl std::future::Future<Output = Result<(), ShimError>> + Send {
        async { Ok(()) }
    }
}
