//! Pipes for child processes' stdio, and bounded readers for them.

use std::os::fd::OwnedFd;
use std::time::Duration;

use nix::fcntl::OFlag;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe::Receiver;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::ShimError;

/// Creates a close-on-exec pipe: the read end for us (async), the write end for a child's
/// stdio (`Command` dups it onto fd 1/2, which clears close-on-exec only there).
pub(crate) fn pipe(action: &'static str) -> Result<(Receiver, OwnedFd), ShimError> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| ShimError::Pipe { action, source: e.into() })?;
    let read =
        Receiver::from_owned_fd(read).map_err(|source| ShimError::Pipe { action, source })?;
    Ok((read, write))
}

/// What a capped reader collected.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Capped {
    /// The first `cap` bytes.
    pub data: Vec<u8>,
    /// More was written (and discarded) beyond the cap.
    pub truncated: bool,
}

/// Reads a pipe to EOF in the background, keeping at most `cap` bytes and discarding the rest
/// (so the writer never blocks on a full pipe), until told to stop.
pub(crate) struct CappedReader {
    stop: watch::Sender<bool>,
    handle: JoinHandle<Capped>,
}

impl CappedReader {
    /// Starts reading `rx`.
    pub(crate) fn spawn(rx: Receiver, cap: usize) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let handle = tokio::spawn(read_capped(rx, cap, stop_rx));
        CappedReader { stop, handle }
    }

    /// Waits up to `grace` for EOF (a background process may hold the pipe open forever),
    /// then stops reading and returns what was collected.
    pub(crate) async fn finish(mut self, grace: Duration) -> Capped {
        tokio::select! {
            r = &mut self.handle => return r.unwrap_or_default(),
            _ = tokio::time::sleep(grace) => {}
        }
        let _ = self.stop.send(true);
        self.handle.await.unwrap_or_default()
    }
}

async fn read_capped(mut rx: Receiver, cap: usize, mut stop: watch::Receiver<bool>) -> Capped {
    let mut out = Capped::default();
    // Every runtime call reads two pipes: 16 KiB each keeps that off the external shim's
    // high-water mark (its heap stays as large as its largest moment), and megabytes of
    // output still take only a few hundred reads.
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            r = rx.read(&mut chunk) => match r {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "reading child output");
                    break;
                }
            },
        };
        let room = cap.saturating_sub(out.data.len());
        if n > room {
            out.truncated = true;
        }
        out.data.extend_from_slice(&chunk[..n.min(room)]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn capped_reader_keeps_cap_and_drains_rest() {
        let (rx, tx) = pipe("test").unwrap();
        let reader = CappedReader::spawn(rx, 10);
        let writer = std::thread::spawn(move || {
            let mut f = std::fs::File::from(tx);
            // Far more than a pipe buffer: would block if the reader stopped reading.
            for _ in 0..100 {
                f.write_all(&[b'x'; 4096]).unwrap();
            }
        });
        let got = reader.finish(Duration::from_secs(10)).await;
        writer.join().unwrap();
        assert_eq!(got.data, b"xxxxxxxxxx");
        assert!(got.truncated);
    }

    #[tokio::test]
    async fn capped_reader_gives_up_after_grace() {
        let (rx, tx) = pipe("test").unwrap();
        let mut f = std::fs::File::from(tx);
        f.write_all(b"hello").unwrap();
        let reader = CappedReader::spawn(rx, 100);
        // The write end stays open: no EOF.
        let got = reader.finish(Duration::from_millis(200)).await;
        assert_eq!(got.data, b"hello");
        assert!(!got.truncated);
        drop(f);
    }
}
