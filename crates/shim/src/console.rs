//! Terminals: the runtime's `--console-socket` protocol.
//!
//! With `process.terminal: true`, `runc run|create --console-socket <path>` creates the pty inside
//! the container and sends the master end over the unix socket (`SCM_RIGHTS`). We keep the
//! master: reading it gives the container's output (one stream, logged as stdout).

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use tokio::io::Interest;
use tokio::net::UnixListener;
use tokio::net::unix::pipe::Receiver;

use crate::ShimError;

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A listening console socket; its file is removed on drop.
pub(crate) struct ConsoleSocket {
    /// Where the file is.
    path: PathBuf,
    /// The name the runtime connects to: through our descriptor of the directory, as
    /// `/proc/<our pid>/fd/<n>/<name>`, because the real path can exceed the 108 bytes of a
    /// socket address (state dirs nest pod and container ids).
    short: PathBuf,
    listener: UnixListener,
    /// Keeps `short` valid.
    _dir: std::fs::File,
}

impl ConsoleSocket {
    /// Listens on a fresh socket in `dir`. The name is short: socket paths are limited to
    /// 108 bytes.
    pub(crate) fn bind(dir: &Path) -> Result<Self, ShimError> {
        let path = dir.join(format!(
            "console-{}-{}.sock",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let err = |source| ShimError::Io {
            action: "listen on console socket",
            path: path.clone(),
            source,
        };
        let dir_file = std::fs::File::open(dir).map_err(err)?;
        let name = path.file_name().map(PathBuf::from).unwrap_or_default();
        let fd = dir_file.as_raw_fd().to_string();
        let listener =
            UnixListener::bind(Path::new("/proc/self/fd").join(&fd).join(&name)).map_err(err)?;
        let short =
            Path::new("/proc").join(std::process::id().to_string()).join("fd").join(fd).join(name);
        Ok(ConsoleSocket { path, short, listener, _dir: dir_file })
    }

    /// The name for `--console-socket`: short, through our descriptor of the directory.
    pub(crate) fn connect_path(&self) -> &Path {
        &self.short
    }

    /// Receives the pty master the runtime sent (it did so before exiting, so it is waiting
    /// in the socket's backlog by now).
    pub(crate) async fn receive_master(&self, within: Duration) -> Result<OwnedFd, ShimError> {
        let err = |source| ShimError::Io {
            action: "receive pty master from",
            path: self.path.clone(),
            source,
        };
        let receive = async {
            let (stream, _) = self.listener.accept().await?;
            loop {
                stream.readable().await?;
                match stream.try_io(Interest::READABLE, || recv_fd(stream.as_raw_fd())) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    r => return r,
                }
            }
        };
        match tokio::time::timeout(within, receive).await {
            Ok(r) => r.map_err(err),
            Err(_) => Err(err(std::io::ErrorKind::TimedOut.into())),
        }
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One `recvmsg`, returning the first passed descriptor (closing any extra ones).
fn recv_fd(sock: RawFd) -> std::io::Result<OwnedFd> {
    let mut buf = [0u8; 1024];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut first = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: SCM_RIGHTS gave us these descriptors; nobody else owns them.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if first.is_none() {
                    first = Some(owned);
                }
            }
        }
    }
    first.ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "no descriptor in console message")
    })
}

/// The pty master as an async reader.
pub(crate) fn master_reader(master: OwnedFd) -> Result<Receiver, ShimError> {
    let err = |source: std::io::Error| ShimError::Pipe { action: "poll pty master", source };
    let flags = fcntl(&master, FcntlArg::F_GETFL).map_err(|e| err(e.into()))?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(&master, FcntlArg::F_SETFL(flags)).map_err(|e| err(e.into()))?;
    // A pty is not a FIFO, so the checked constructor would refuse it; it is readable and
    // pollable all the same.
    Receiver::from_owned_fd_unchecked(master).map_err(err)
}
