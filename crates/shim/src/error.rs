//! The shim's error type.

use std::path::PathBuf;
use std::time::Duration;

/// What went wrong in the shim.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// The OCI runtime binary ran and reported a failure.
    #[error("{command} {id} failed (exit code {code}): {stderr}")]
    RuntimeFailed {
        /// The runtime sub-command, e.g. `runc create`.
        command: String,
        /// Container ID it was run for.
        id: String,
        /// The runtime's own error message (from its `--log` file or its stderr).
        stderr: String,
        /// Its exit code (`128 + signal` when it was killed).
        code: i32,
    },
    /// A command did not finish in time and was killed.
    #[error("{command} did not finish within {after:?}; it was killed")]
    Timeout {
        /// The command line that timed out, e.g. `runc start abc`.
        command: String,
        /// How long it was given.
        after: Duration,
    },
    /// No task with this ID is known to the shim.
    #[error("task {id} not found")]
    NotFound {
        /// The ID asked for.
        id: String,
    },
    /// A task with this ID exists already (or is being created).
    #[error("task {id} already exists")]
    AlreadyExists {
        /// The ID asked for.
        id: String,
    },
    /// The container ID cannot be used as a file name and runtime name.
    #[error(
        "invalid container id {id:?}: must be non-empty, at most 1024 characters, of [A-Za-z0-9_.-], and not start with '.'"
    )]
    InvalidId {
        /// The rejected ID.
        id: String,
    },
    /// The operation needs a running task, but its main process has exited.
    #[error("task {id} is not running")]
    NotRunning {
        /// Container ID.
        id: String,
    },
    /// An exec process with `terminal: true`: not implemented yet (container ttys are).
    #[error("tty not supported yet (task {id})")]
    TtyNotSupported {
        /// Container ID.
        id: String,
    },
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What we tried, e.g. `create directory`.
        action: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The container's log path holds something other than a regular file: a symlink
    /// (which would send the output into another host file), a FIFO (which would block the
    /// writer), a directory.
    #[error("log file {path} is {kind}, not a regular file")]
    LogNotRegular {
        /// The log path.
        path: PathBuf,
        /// What is there instead, e.g. `a FIFO`.
        kind: String,
    },
    /// A pipe (or other I/O on a process's stdio) failed.
    #[error("{action}: {source}")]
    Pipe {
        /// What we tried, e.g. `create stdout pipe`.
        action: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The runtime binary (or another command) could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{call}: {source}")]
    Sys {
        /// Which call, e.g. `prctl(PR_SET_CHILD_SUBREAPER)`.
        call: &'static str,
        /// The errno.
        #[source]
        source: nix::errno::Errno,
    },
    /// The runtime wrote a PID file we cannot parse.
    #[error("bad pid file {path}: {content:?}")]
    BadPidFile {
        /// The file.
        path: PathBuf,
        /// What it held.
        content: String,
    },
    /// The exec process could not be serialised to JSON.
    #[error("serialise exec process for task {id}: {source}")]
    ProcessJson {
        /// Container ID.
        id: String,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// The process-wide reaper thread could not be started.
    #[error("cannot start the reaper thread: {kind}")]
    ReaperStart {
        /// Why the thread could not be spawned.
        kind: std::io::ErrorKind,
    },
    /// The reaper stopped tracking a process before it was reaped (another waiter for the
    /// same PID replaced ours).
    #[error("lost track of process {pid}")]
    ReaperLost {
        /// The process.
        pid: i32,
    },
    /// I/O on the connection to an external shim failed.
    #[error("shim connection {path}: {action}: {source}")]
    Wire {
        /// What we tried, e.g. `connect`, `read frame`.
        action: &'static str,
        /// The shim's socket.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A frame from the other side of a shim connection is not a valid protobuf message.
    #[error("undecodable shim message: {source}")]
    Decode {
        /// The underlying error.
        #[source]
        source: prost::DecodeError,
    },
    /// A frame announced a length above the protocol's limit.
    #[error("shim frame of {len} bytes exceeds the limit")]
    FrameTooLarge {
        /// The announced length.
        len: usize,
    },
    /// The shim answered with a message of the wrong kind (a protocol bug or version skew).
    #[error("unexpected shim response (wanted {expected})")]
    UnexpectedResponse {
        /// What the request should have produced.
        expected: &'static str,
    },
    /// A request lacked a field it needs (a protocol bug or version skew).
    #[error("bad shim request: {detail}")]
    BadRequest {
        /// What was wrong.
        detail: &'static str,
    },
    /// The external shim failed internally (I/O, spawning, a system call); its own rendering
    /// of the error, which cannot cross the process boundary with its source.
    #[error("shim error: {message}")]
    Remote {
        /// Task the error is about (may be empty).
        id: String,
        /// The shim's error message.
        message: String,
    },
    /// The pod's shim still has tasks and was not told to delete them.
    #[error("shim of pod {pod_id} still has tasks")]
    ShimBusy {
        /// The pod.
        pod_id: String,
    },
    /// `ExternalShim::create` for a container not bound to a pod with `bind_container`.
    #[error("container {id} is not bound to a pod sandbox")]
    PodNotBound {
        /// Container ID.
        id: String,
    },
    /// An external shim process did not come up.
    #[error("shim for pod {pod_id} did not start: {detail}")]
    ShimStart {
        /// The pod.
        pod_id: String,
        /// Why: its exit code, or the time waited, and the tail of its log.
        detail: String,
    },
    /// The pod's shim process is gone (its tasks are reported as exited).
    #[error("shim of pod {pod_id} is gone")]
    ShimGone {
        /// The pod.
        pod_id: String,
    },
    /// A task state file could not be encoded or parsed.
    #[error("task state file {path}: {source}")]
    StateFile {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
}
