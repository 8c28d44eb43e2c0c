//! Exec sessions: start the process, copy its stdio to and from the client's streams, apply
//! resizes, and report how it ended on the error stream.

use std::os::fd::OwnedFd;
use std::time::Duration;

use berth_runtime::{Runtime, StreamExec};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::watch;

use crate::channel::{CHUNK, InStream, OutStream};

/// After the process exits, how long its output may still be drained (a background child of
/// it may hold the pipe).
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// How long a tty exec waits for the client's first size before starting without one.
const FIRST_SIZE_WAIT: Duration = Duration::from_millis(500);
/// How long a killed process gets to be reaped.
const KILL_GRACE: Duration = Duration::from_secs(10);

/// How the error stream reports the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatusStyle {
    /// `v4.channel.k8s.io` and later: a `metav1.Status` as JSON, also on success.
    Json,
    /// Before v4: a plain message, only on failure.
    Text,
}

/// The client's streams for one exec.
pub(crate) struct ExecIo {
    pub(crate) stdin: Option<InStream>,
    pub(crate) stdout: Option<OutStream>,
    pub(crate) stderr: Option<OutStream>,
    pub(crate) error: Option<OutStream>,
    pub(crate) resize: Option<InStream>,
    pub(crate) style: StatusStyle,
}

/// How an exec (or attach) ended.
pub(crate) enum Outcome {
    Exited(i32),
    Failed(String),
}

/// Runs `exec` against the client's streams until the process ends (or the client goes,
/// which kills it), then reports the outcome.
pub(crate) async fn run(
    runtime: &Runtime,
    mut exec: StreamExec,
    mut io: ExecIo,
    gone: watch::Receiver<bool>,
) {
    // Clients send the terminal's size as soon as the streams are up: start with it.
    let mut sizes = SizeParser::default();
    if exec.tty
        && let Some(resize) = io.resize.as_mut()
        && let Ok(Some(first)) = tokio::time::timeout(FIRST_SIZE_WAIT, resize.recv()).await
    {
        exec.console_size = sizes.push(&first).last().copied();
    }
    let outcome = match runtime.exec_streaming(&exec).await {
        Ok(process) => pump(process, &mut io, gone, sizes).await,
        Err(e) => Outcome::Failed(e.to_string()),
    };
    finish(io, outcome).await;
}

/// Closes the output streams and reports `outcome` on the error stream.
pub(crate) async fn finish(mut io: ExecIo, outcome: Outcome) {
    for out in [io.stdout.take(), io.stderr.take()].into_iter().flatten() {
        out.close().await;
    }
    if let Some(error) = io.error.take() {
        if let Some(status) = status(&outcome, io.style) {
            let _ = error.write(Bytes::from(status)).await;
        }
        error.close().await;
    }
}

async fn pump(
    mut p: berth_shim::StreamingExec,
    io: &mut ExecIo,
    mut gone: watch::Receiver<bool>,
    sizes: SizeParser,
) -> Outcome {
    let pid = p.pid;
    let tty = p.pty.is_some();
    let stdin = match (io.stdin.take(), p.stdin.take()) {
        (Some(input), Some(fd)) => Some(tokio::spawn(copy_in(input, fd, tty))),
        _ => None,
    };
    let resize = match (io.resize.take(), p.pty.as_ref().map(OwnedFd::try_clone)) {
        (Some(input), Some(Ok(pty))) => Some(tokio::spawn(resizes(input, pty, sizes))),
        _ => None,
    };
    let mut readers = Vec::new();
    if let Some(fd) = p.stdout.take() {
        readers.push(tokio::spawn(copy_out(fd, io.stdout.take())));
    }
    if let Some(fd) = p.stderr.take() {
        readers.push(tokio::spawn(copy_out(fd, io.stderr.take())));
    }

    let reaped = tokio::select! {
        r = &mut p.exited => r.ok(),
        _ = async { let _ = gone.wait_for(|g| *g).await; } => {
            tracing::debug!(pid, "client went away: killing its exec process");
            berth_shim::kill_exec(pid);
            tokio::time::timeout(KILL_GRACE, &mut p.exited).await.ok().and_then(Result::ok)
        }
    };
    for r in readers {
        let abort = r.abort_handle();
        if tokio::time::timeout(DRAIN_GRACE, r).await.is_err() {
            abort.abort();
        }
    }
    for t in [stdin, resize].into_iter().flatten() {
        t.abort();
    }
    match reaped {
        Some(r) => Outcome::Exited(r.code),
        None => Outcome::Failed(format!("lost track of exec process {pid}")),
    }
}

/// The fd as an async pipe end (a pty master is no FIFO, but pollable all the same).
fn nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The terminal's end-of-file character (VEOF, `^D`), as a terminal sends it on `^D`.
const TTY_EOF: u8 = 0x04;

async fn copy_in(mut input: InStream, fd: OwnedFd, tty: bool) {
    let Ok(mut w) = nonblocking(&fd).and_then(|()| pipe::Sender::from_owned_fd_unchecked(fd))
    else {
        return;
    };
    while let Some(data) = input.recv().await {
        if w.write_all(&data).await.is_err() {
            return;
        }
    }
    // The client closed stdin. Without a tty, dropping `w` closes the process's stdin. A
    // pty master stays open (output and resizes use it), so say it as a terminal does: the
    // EOF character, which ends the process's read of an empty line.
    if tty {
        let _ = w.write_all(&[TTY_EOF]).await;
    }
}

/// Copies a process output to the client (or drains it if the client did not ask for it).
async fn copy_out(fd: OwnedFd, out: Option<OutStream>) {
    let Ok(mut r) = nonblocking(&fd).and_then(|()| pipe::Receiver::from_owned_fd_unchecked(fd))
    else {
        return;
    };
    let mut buf = vec![0u8; CHUNK];
    loop {
        match r.read(&mut buf).await {
            // EIO: a pty whose other end is closed.
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Some(out) = &out
                    && out.write(Bytes::copy_from_slice(&buf[..n])).await.is_err()
                {
                    break;
                }
            }
        }
    }
    if let Some(out) = out {
        out.close().await;
    }
}

/// A terminal size as the clients send it (Go's JSON decoding ignores case).
#[derive(serde::Deserialize)]
struct Size {
    #[serde(rename = "Width", alias = "width")]
    width: u16,
    #[serde(rename = "Height", alias = "height")]
    height: u16,
}

/// Applies the sizes sent on the resize stream.
async fn resizes(mut input: InStream, pty: OwnedFd, mut sizes: SizeParser) {
    while let Some(data) = input.recv().await {
        for (width, height) in sizes.push(&data) {
            if let Err(e) = berth_shim::resize_pty(&pty, width, height) {
                tracing::debug!(error = %e, "cannot resize exec pty");
            }
        }
    }
}

/// The resize stream: a sequence of JSON objects, split across frames anyhow.
#[derive(Default)]
pub(crate) struct SizeParser {
    buf: Vec<u8>,
}

impl SizeParser {
    /// Adds `data`; returns the (width, height) of each object now complete.
    pub(crate) fn push(&mut self, data: &[u8]) -> Vec<(u16, u16)> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        let mut sizes = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Size>();
        let mut used = 0;
        loop {
            match sizes.next() {
                Some(Ok(s)) => {
                    used = sizes.byte_offset();
                    out.push((s.width, s.height));
                }
                Some(Err(e)) if e.is_eof() => break,
                // Not a size: drop what we have.
                Some(Err(_)) => {
                    used = self.buf.len();
                    break;
                }
                None => break,
            }
        }
        self.buf.drain(..used);
        if self.buf.len() > 4096 {
            self.buf.clear();
        }
        out
    }
}

/// The error stream's message for `outcome`, if any.
fn status(outcome: &Outcome, style: StatusStyle) -> Option<String> {
    let message = match outcome {
        Outcome::Exited(0) => None,
        Outcome::Exited(code) => {
            Some(format!("command terminated with non-zero exit code: exit status {code}"))
        }
        Outcome::Failed(e) => Some(e.clone()),
    };
    match style {
        StatusStyle::Text => message,
        StatusStyle::Json => Some(match (outcome, message) {
            (_, None) => r#"{"metadata":{},"status":"Success"}"#.to_owned(),
            (Outcome::Exited(code), Some(message)) => serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
            })
            .to_string(),
            (Outcome::Failed(_), Some(message)) => serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": "InternalError",
            })
            .to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_parsed_across_frames() {
        let mut p = SizeParser::default();
        assert_eq!(p.push(br#"{"Width":80,"Hei"#), vec![]);
        assert_eq!(p.push(br#"ght":24}{"width":1,"height":2}"#), vec![(80, 24), (1, 2)]);
        assert_eq!(p.push(b"garbage"), vec![]);
        assert_eq!(p.push(br#"{"Width":3,"Height":4}"#), vec![(3, 4)]);
    }

    #[test]
    fn statuses_are_what_the_kubelet_sends() {
        assert_eq!(
            status(&Outcome::Exited(0), StatusStyle::Json).unwrap(),
            r#"{"metadata":{},"status":"Success"}"#
        );
        let v: serde_json::Value =
            serde_json::from_str(&status(&Outcome::Exited(3), StatusStyle::Json).unwrap()).unwrap();
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["reason"], "NonZeroExitCode");
        assert_eq!(v["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(v["details"]["causes"][0]["message"], "3");
        assert_eq!(status(&Outcome::Exited(0), StatusStyle::Text), None);
        assert!(status(&Outcome::Exited(2), StatusStyle::Text).unwrap().contains("exit status 2"));
        let v: serde_json::Value = serde_json::from_str(
            &status(&Outcome::Failed("no".into()), StatusStyle::Json).unwrap(),
        )
        .unwrap();
        assert_eq!(v["message"], "no");
    }
}
