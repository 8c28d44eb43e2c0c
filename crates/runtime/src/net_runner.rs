//! The [`CommandRunner`] berthd gives the network manager: `nft`, `iptables` and CNI plugins
//! are spawned and awaited through the shim's process-wide reaper, because berthd reaps
//! every child with `waitpid(-1)` and a wait by PID (as `StdCommandRunner` does) would race
//! with it and could lose the exit status.

use std::process::Command;
use std::time::Duration;

use berth_net::network::{CommandOutput, CommandRunner};
use berth_shim::ShimError;

/// Runs helper programs with [`berth_shim::run_with_input`].
#[derive(Debug, Default, Clone, Copy)]
pub struct ReaperCommandRunner;

/// Maps a shim error to the `io::Error` kinds the [`CommandRunner`] contract names:
/// `TimedOut` for a program killed after its timeout, the spawn error as it is.
fn to_io(e: ShimError) -> std::io::Error {
    match e {
        ShimError::Timeout { .. } => std::io::Error::new(std::io::ErrorKind::TimedOut, e),
        ShimError::Spawn { source, .. } => source,
        other => std::io::Error::other(other),
    }
}

#[async_trait::async_trait]
impl CommandRunner for ReaperCommandRunner {
    async fn run(
        &self,
        cmd: Command,
        stdin: Vec<u8>,
        timeout: Duration,
    ) -> std::io::Result<CommandOutput> {
        let out = berth_shim::run_with_input(cmd, stdin, Some(timeout)).await.map_err(to_io)?;
        Ok(CommandOutput { code: out.code, stdout: out.stdout, stderr: out.stderr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_through_the_reaper() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "cat; exit 4"]);
        let out =
            ReaperCommandRunner.run(cmd, b"in".to_vec(), Duration::from_secs(30)).await.unwrap();
        assert_eq!(out.code, 4);
        assert_eq!(out.stdout, b"in");
    }

    #[tokio::test]
    async fn errors_keep_their_kind() {
        let mut cmd = Command::new("/bin/sleep");
        cmd.arg("30");
        let err =
            ReaperCommandRunner.run(cmd, vec![], Duration::from_millis(100)).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        let cmd = Command::new("/nonexistent/berth-test");
        let err = ReaperCommandRunner.run(cmd, vec![], Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }
}
