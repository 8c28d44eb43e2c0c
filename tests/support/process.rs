//! Child processes of the tests: free ports, log files, polite shutdown by PID.

use std::fs::File;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A TCP port on 127.0.0.1 that was free a moment ago. The kernel hands out ephemeral ports
/// round-robin, so two tests asking at once get different ones; callers still retry if the
/// process they start cannot bind it.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a probe port")?;
    Ok(l.local_addr()?.port())
}

/// Spawns `cmd` with stdout and stderr appended to `log`.
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Child> {
    let out = File::options().create(true).append(true).open(log).context("opening log")?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    cmd.spawn().with_context(|| format!("spawning {cmd:?}"))
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILL and waits. Returns after the child has
/// been reaped (so no zombie and no stray process stays behind).
pub fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(pid, Signal::SIGKILL);
    let _ = child.wait();
}

/// Sends SIGKILL and reaps the child.
pub fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The last `lines` lines of a text file (empty if unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned());
    let text = text.unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// SIGKILLs every process whose command line mentions `marker` (a test's private temp dir):
/// helpers such as shims that berthd started and that would otherwise outlive the test.
/// Returns the PIDs killed.
pub fn kill_processes_mentioning(marker: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut killed = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return killed };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        if String::from_utf8_lossy(&cmdline).contains(marker)
            && kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok()
        {
            killed.push(pid);
        }
    }
    killed
}
