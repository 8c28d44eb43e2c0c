//! Streaming exec: a process in a container whose stdio is handed to the caller (the streaming
//! server) rather than collected.
//!
//! `<runtime> exec --detach --process <json> --pid-file <file> [--tty --console-socket <sock>]
//! <id>`, run by the calling process itself, with either pipes or (with a tty) the pty master
//! the runtime sends over the console socket. The process is reparented to the caller (a child
//! subreaper) once the runtime has exited, and its exit comes through the reaper.
//!
//! Why the caller runs the runtime itself, with both shims: the stdio of a streamed exec must
//! end up in berthd, which serves the HTTP connection; the shim owns the container, not the
//! exec. Passing descriptors back from an external shim over its socket (SCM_RIGHTS) would add
//! a second path with the same result, and the exec does not outlive the connection anyway.
//! The runtime's state root is shared, so `runc exec` works from berthd as from the shim; the
//! exec process joins the container's cgroup and dies with it.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::oneshot;

use crate::ShimError;
use crate::console::ConsoleSocket;
use crate::exec::ExecFiles;
use crate::reaper::{Reaped, Reaper, spawn, wait_or_kill};
use crate::runtime_cmd::{RUNTIME_TIMEOUT, RuntimeCmd, display_command};

/// How long the runtime gets to send the pty master once it has exited.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);

/// What to start: the container, the process (OCI JSON) and which stdio the caller wants.
#[derive(Debug, Clone)]
pub struct ExecSpec<'a> {
    /// The OCI runtime binary.
    pub runtime: &'a Path,
    /// The runtime's state root.
    pub runtime_root: &'a Path,
    /// A directory for the per-exec files (process JSON, PID file, runtime log, console
    /// socket); short, as socket paths are limited to 108 bytes.
    pub work_dir: &'a Path,
    /// The container.
    pub id: &'a str,
    /// The OCI process, as JSON; its `terminal` must equal `tty`.
    pub process_json: &'a [u8],
    /// Allocate a pty (the process's stdin, stdout and stderr are its slave end).
    pub tty: bool,
    /// Give the process a stdin pipe (else `/dev/null`).
    pub stdin: bool,
    /// Give the process a stdout pipe (else `/dev/null`).
    pub stdout: bool,
    /// Give the process a stderr pipe (else `/dev/null`).
    pub stderr: bool,
}

/// A started exec process and our ends of its stdio.
#[derive(Debug)]
pub struct StreamingExec {
    /// The process (in the host's PID namespace).
    pub pid: i32,
    /// Write end of its stdin (a dup of the pty master with a tty).
    pub stdin: Option<OwnedFd>,
    /// Read end of its stdout (the pty master with a tty).
    pub stdout: Option<OwnedFd>,
    /// Read end of its stderr (never with a tty).
    pub stderr: Option<OwnedFd>,
    /// The pty master, for resizes.
    pub pty: Option<OwnedFd>,
    /// Its exit, from the reaper.
    pub exited: oneshot::Receiver<Reaped>,
}

/// Starts the process described by `spec`.
pub async fn start_exec(spec: ExecSpec<'_>) -> Result<StreamingExec, ShimError> {
    let runtime = RuntimeCmd::new(spec.runtime.to_owned(), spec.runtime_root.to_owned());
    std::fs::create_dir_all(spec.work_dir).map_err(|source| ShimError::Io {
        action: "create exec directory",
        path: spec.work_dir.to_owned(),
        source,
    })?;
    let files = ExecFiles::new(spec.work_dir);
    files.write_process(spec.process_json)?;

    let mut cmd = runtime.base(Some(&files.log));
    cmd.arg("exec").arg("--detach").arg("--process").arg(&files.process);
    cmd.arg("--pid-file").arg(&files.pid);
    let mut ours = Ends::default();
    let console = if spec.tty {
        let console = ConsoleSocket::bind(spec.work_dir)?;
        cmd.arg("--tty").arg("--console-socket").arg(console.connect_path());
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        Some(console)
    } else {
        cmd.stdin(ours.pipe(spec.stdin, Dir::In)?)
            .stdout(ours.pipe(spec.stdout, Dir::Out)?)
            .stderr(ours.pipe(spec.stderr, Dir::Err)?);
        None
    };
    cmd.arg(spec.id);

    let display = display_command(&cmd);
    let reaper = Reaper::global()?;
    let before = Instant::now();
    let child = spawn(&mut cmd)
        .map_err(|source| ShimError::Spawn { program: runtime.binary().to_owned(), source })?;
    // Drop our copies of the child's ends, or we would never see EOF.
    drop(cmd);
    let runtime_pid = child.id() as i32;
    let runtime_exited = reaper.register(runtime_pid, before);
    let runtime_exit =
        wait_or_kill(reaper, runtime_pid, runtime_exited, Some(RUNTIME_TIMEOUT), &display).await?;
    if runtime_exit.code != 0 {
        let log = std::fs::read_to_string(&files.log).unwrap_or_default();
        return Err(runtime.failed("exec", spec.id, runtime_exit.code, &log));
    }
    let pid = files.read_pid().ok_or_else(|| ShimError::BadPidFile {
        path: files.pid.clone(),
        content: std::fs::read_to_string(&files.pid).unwrap_or_default(),
    })?;
    let exited = reaper.register(pid, before);
    let mut exec = StreamingExec {
        pid,
        stdin: ours.stdin,
        stdout: ours.stdout,
        stderr: ours.stderr,
        pty: None,
        exited,
    };
    if let Some(console) = console {
        let master = match console.receive_master(CONSOLE_TIMEOUT).await {
            Ok(m) => m,
            Err(e) => {
                kill_exec(pid);
                return Err(e);
            }
        };
        let dup =
            |what| master.try_clone().map_err(|source| ShimError::Pipe { action: what, source });
        exec.stdin = if spec.stdin { Some(dup("dup pty master for stdin")?) } else { None };
        exec.stdout = Some(dup("dup pty master for stdout")?);
        exec.pty = Some(master);
    }
    Ok(exec)
}

/// Kills an exec process (the client went away) unless it was reaped already, so that a
/// recycled PID is never signalled.
pub fn kill_exec(pid: i32) {
    if let Ok(reaper) = Reaper::global() {
        reaper.with_unreaped(pid, |p| kill(Pid::from_raw(p), Signal::SIGKILL));
    }
}

/// Sets the window size of a pty (`TIOCSWINSZ`).
pub fn resize_pty(pty: &OwnedFd, width: u16, height: u16) -> Result<(), ShimError> {
    let ws = libc::winsize { ws_row: height, ws_col: width, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads a `winsize` from the pointer, which lives across the call.
    let rc = unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc != 0 {
        return Err(ShimError::Pipe {
            action: "resize pty",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

enum Dir {
    In,
    Out,
    Err,
}

/// Our ends of the pipes made so far.
#[derive(Default)]
struct Ends {
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

impl Ends {
    /// A pipe for the child's side `dir` if `wanted` (keeping our end), else `/dev/null`.
    fn pipe(&mut self, wanted: bool, dir: Dir) -> Result<Stdio, ShimError> {
        if !wanted {
            return Ok(Stdio::null());
        }
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| ShimError::Pipe { action: "create exec pipe", source: e.into() })?;
        Ok(match dir {
            Dir::In => {
                self.stdin = Some(write);
                Stdio::from(read)
            }
            Dir::Out => {
                self.stdout = Some(read);
                Stdio::from(write)
            }
            Dir::Err => {
                self.stderr = Some(read);
                Stdio::from(write)
            }
        })
    }
}
