//! The pod's init process, for pods that share one PID namespace (PID mode POD).
//!
//! A process cannot move itself into a new PID namespace: `unshare(CLONE_NEWPID)` only puts
//! its *children* there. So berthd runs its own binary as `berthd pod-init` with
//! `unshare(CLONE_NEWPID)` done between fork and exec; that process forks once, and the
//! child is PID 1 of the new namespace: it reaps whatever is reparented to it and otherwise
//! sleeps. The parent prints the child's host pid and exits; containers then join
//! `/proc/<pid>/ns/pid`.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::error::{Result, RuntimeError};
use crate::records::ProcessRef;
use crate::util::process_start_time;

/// The first argument that makes berthd run [`run`] instead of the daemon.
pub const POD_INIT_COMMAND: &str = "pod-init";

/// How long the helper may take to report its child.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the pod init for the pod in `pod_dir` and returns it.
pub(crate) async fn start(program: &Path, pod_dir: &Path) -> Result<ProcessRef> {
    let mut cmd = Command::new(program);
    // The pod dir makes the process recognisable (and findable by tests) in `ps`.
    cmd.arg(POD_INIT_COMMAND).arg(pod_dir).current_dir("/");
    // SAFETY: unshare(2) is async-signal-safe and touches only the child's own state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWPID) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
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

/// The body of `berthd pod-init`: call it first thing in `main`, before any thread or async
/// runtime exists. Never returns.
pub fn run() -> ! {
    // SAFETY: we are single-threaded here (called before anything else in main), so fork is
    // safe; the child only makes async-signal-safe calls.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        eprintln!("pod-init: fork: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    if pid > 0 {
        // Parent: report the child's host pid and leave; the child is reparented to berthd
        // (a subreaper) or to the host's init.
        println!("{pid}");
        std::process::exit(0);
    }
    init_loop()
}

/// PID 1 of the pod: detach from berthd's stdio and session, then reap forever.
fn init_loop() -> ! {
    // SAFETY: plain syscalls on our own process; the path is a valid C string.
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            if null > 2 {
                libc::close(null);
            }
        }
        loop {
            let mut status = 0;
            if libc::waitpid(-1, &mut status, 0) < 0 {
                // No children: nothing is reparented to us yet. SIGCHLD is ignored by
                // default, so poll rather than pause.
                libc::sleep(1);
            }
        }
    }
}
