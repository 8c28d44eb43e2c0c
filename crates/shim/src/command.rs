//! Running a helper program with input on its stdin (CNI plugins read their network config
//! there; `nft -f -` its script), through the process-wide reaper.
//!
//! [`crate::run_captured`] covers programs without input; this is the same with a pipe on
//! stdin that a task of our own fills, so a program that writes a lot before it reads cannot
//! deadlock with us.

use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe::Sender;

use crate::ShimError;
use crate::pipe::CappedReader;
use crate::reaper::{CAPTURE_CAP, Captured, Reaper, spawn, wait_or_kill};

/// A close-on-exec pipe for a child's stdin: the read end for the child, the write end
/// (async) for us.
fn stdin_pipe() -> Result<(OwnedFd, Sender), ShimError> {
    let action = "create stdin pipe";
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| ShimError::Pipe { action, source: e.into() })?;
    let write =
        Sender::from_owned_fd(write).map_err(|source| ShimError::Pipe { action, source })?;
    Ok((read, write))
}

/// Runs `cmd` to completion through the reaper: `stdin` is written to its standard input
/// (then closed), stdout and stderr are captured up to [`CAPTURE_CAP`] each. With a
/// `timeout`, the command is killed (`SIGKILL`) when it expires and [`ShimError::Timeout`]
/// is returned. Never waits for the child by PID, so it is safe next to the reaper.
pub async fn run_with_input(
    cmd: Command,
    stdin: Vec<u8>,
    timeout: Option<Duration>,
) -> Result<Captured, ShimError> {
    run_piped(cmd, Some(stdin), timeout).await
}

/// The one way berthd runs a helper program: through the reaper, output captured, stdin
/// fed from `stdin` (or `/dev/null` when `None`).
pub(crate) async fn run_piped(
    mut cmd: Command,
    stdin: Option<Vec<u8>>,
    timeout: Option<Duration>,
) -> Result<Captured, ShimError> {
    let program = std::path::PathBuf::from(cmd.get_program());
    let input = match stdin {
        Some(data) => {
            let (in_rx, in_tx) = stdin_pipe()?;
            cmd.stdin(Stdio::from(in_rx));
            Some((in_tx, data))
        }
        None => {
            cmd.stdin(Stdio::null());
            None
        }
    };
    let (out_rx, out_tx) = crate::pipe::pipe("create stdout pipe")?;
    let (err_rx, err_tx) = crate::pipe::pipe("create stderr pipe")?;
    cmd.stdout(Stdio::from(out_tx)).stderr(Stdio::from(err_tx));
    let reaper = Reaper::global()?;
    let before = Instant::now();
    let child =
        spawn(&mut cmd).map_err(|source| ShimError::Spawn { program: program.clone(), source })?;
    let display = crate::runtime_cmd::display_command(&cmd);
    // Our copies of the child's pipe ends must go: the write ends, or the readers never see
    // EOF; the stdin read end, or writing to a child that exited never fails.
    drop(cmd);
    let pid = child.id() as i32;
    let exited = reaper.register(pid, before);
    let out = CappedReader::spawn(out_rx, CAPTURE_CAP);
    let err = CappedReader::spawn(err_rx, CAPTURE_CAP);
    let writer = input.map(|(mut in_tx, data)| {
        tokio::spawn(async move {
            // A program that exits without reading all of its input gives EPIPE: that is
            // its business, its exit code tells the caller what happened.
            let _ = in_tx.write_all(&data).await;
            // Dropping the sender closes the pipe: the program sees EOF.
        })
    });
    let reaped = wait_or_kill(reaper, pid, exited, timeout, &display).await;
    // The program is gone; a grandchild holding its stdin open must not keep the writer.
    if let Some(writer) = writer {
        writer.abort();
    }
    let reaped = reaped?;
    // The command's own children may hold the pipes open: don't wait for them forever.
    let grace = Duration::from_secs(1);
    let (stdout, stderr) = tokio::join!(out.finish(grace), err.finish(grace));
    Ok(Captured { code: reaped.code, stdout: stdout.data, stderr: stderr.data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn feeds_stdin_and_captures_output() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "cat; echo err >&2; exit 3"]);
        let out =
            run_with_input(cmd, b"hello".to_vec(), Some(Duration::from_secs(30))).await.unwrap();
        assert_eq!(out, Captured { code: 3, stdout: b"hello".to_vec(), stderr: b"err\n".to_vec() });
    }

    #[tokio::test]
    async fn large_input_and_output_do_not_deadlock() {
        // Far more than a pipe buffer each way.
        let input = vec![b'x'; 1 << 20];
        let mut cmd = Command::new("/bin/cat");
        cmd.arg("-");
        let out = run_with_input(cmd, input.clone(), Some(Duration::from_secs(30))).await.unwrap();
        assert_eq!(out.code, 0);
        assert_eq!(out.stdout, input);
    }

    #[tokio::test]
    async fn program_ignoring_stdin_is_fine() {
        let mut cmd = Command::new("/bin/true");
        cmd.arg("ignored");
        let out =
            run_with_input(cmd, vec![b'y'; 1 << 20], Some(Duration::from_secs(30))).await.unwrap();
        assert_eq!(out.code, 0);
    }

    #[tokio::test]
    async fn kills_on_timeout() {
        let mut cmd = Command::new("/bin/sleep");
        cmd.arg("30");
        let started = Instant::now();
        let err =
            run_with_input(cmd, Vec::new(), Some(Duration::from_millis(200))).await.unwrap_err();
        assert!(matches!(err, ShimError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let cmd = Command::new("/nonexistent/berth-test-program");
        let err = run_with_input(cmd, Vec::new(), None).await.unwrap_err();
        assert!(matches!(err, ShimError::Spawn { .. }), "{err}");
    }
}
