//! Running helper programs (`nft`, `iptables`, CNI plugins).
//!
//! berthd is a child subreaper that reaps with `waitpid(-1)`; a plain `Child::wait` in the
//! same process could lose its child's exit status to that reaper. So how a program is
//! spawned and waited for is injectable: berthd plugs in a [`CommandRunner`] that goes
//! through its process-wide reaper; tests and tools without a reaper use
//! [`StdCommandRunner`].

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use async_trait::async_trait;

/// What a finished program left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// Exit code; `128 + signal` when a signal killed it.
    pub code: i32,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
}

/// Runs a program to completion: `stdin` is written to its standard input, stdout and
/// stderr are captured. After `timeout` the program is killed and an error of kind
/// [`std::io::ErrorKind::TimedOut`] is returned; failing to start it is any other error.
#[async_trait]
pub trait CommandRunner: Send + Sync {
    /// Runs `cmd` (program, arguments, environment already set).
    async fn run(
        &self,
        cmd: Command,
        stdin: Vec<u8>,
        timeout: Duration,
    ) -> std::io::Result<CommandOutput>;
}

/// A [`CommandRunner`] using `std::process` and a blocking wait on a worker thread.
/// Not for processes that also run a `waitpid(-1)` reaper.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdCommandRunner;

#[async_trait]
impl CommandRunner for StdCommandRunner {
    async fn run(
        &self,
        mut cmd: Command,
        stdin: Vec<u8>,
        timeout: Duration,
    ) -> std::io::Result<CommandOutput> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        let pid = child.id();
        // Feed stdin from its own thread: a program may write a lot before reading.
        let writer = child.stdin.take().map(|mut input| {
            std::thread::spawn(move || {
                // A program that exits without reading its input gives EPIPE: not our error.
                let _ = input.write_all(&stdin);
            })
        });
        let mut waiter = tokio::task::spawn_blocking(move || child.wait_with_output());
        let output = match tokio::time::timeout(timeout, &mut waiter).await {
            Ok(joined) => joined.map_err(std::io::Error::other)??,
            Err(_) => {
                // Not waited for yet, so the PID is still our child (a zombie at worst).
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = waiter.await;
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "killed after timeout",
                ));
            }
        };
        if let Some(w) = writer {
            let _ = w.join();
        }
        use std::os::unix::process::ExitStatusExt;
        let code =
            output.status.code().or_else(|| output.status.signal().map(|s| 128 + s)).unwrap_or(-1);
        Ok(CommandOutput { code, stdout: output.stdout, stderr: output.stderr })
    }
}

/// Finds `program` in `PATH`, and in the sbin directories a daemon's `PATH` may lack.
pub(crate) fn find_in_path(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].iter().map(std::path::PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| is_executable(p))
}

/// A regular file with an execute bit.
pub(crate) fn is_executable(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn std_runner_feeds_stdin_and_captures() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "cat; echo err >&2; exit 3"]);
        let out =
            StdCommandRunner.run(cmd, b"hello".to_vec(), Duration::from_secs(10)).await.unwrap();
        assert_eq!(out.code, 3);
        assert_eq!(out.stdout, b"hello");
        assert_eq!(out.stderr, b"err\n");
    }

    #[tokio::test]
    async fn std_runner_times_out() {
        let mut cmd = Command::new("sleep");
        cmd.arg("10");
        let err = StdCommandRunner.run(cmd, vec![], Duration::from_millis(100)).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }
}
