//! Attach: each task serves a unix socket in its bundle, `attach.sock`, through which berthd's
//! streaming server attaches to the container's own process.
//!
//! The socket belongs to whoever owns the task's stdio (the embedded shim in berthd, or the
//! pod's `berth-shim`), so attach works the same with both shims and, with the external one,
//! across berthd restarts; it needs no call in the shim protocol. As CRI-O's conmon does it.
//!
//! Frames both ways are `kind(8) | length(32, big endian) | payload`. From the shim: the
//! container's output as it is read ([`FRAME_STDOUT`], [`FRAME_STDERR`]); it still goes to the
//! CRI log, and a client too slow to keep up loses output rather than slow the container.
//! From the client: [`FRAME_STDIN`] data, [`FRAME_STDIN_CLOSE`], [`FRAME_RESIZE`] (width and
//! height, 16 bits each). The shim closes the socket once the container has exited and its
//! output is drained.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::{Exit, ShimError};

/// The socket's file name in the bundle directory.
pub const ATTACH_SOCKET: &str = "attach.sock";
/// Client → shim: bytes for the container's stdin.
pub const FRAME_STDIN: u8 = 0;
/// Shim → client: container stdout (with a tty: all its output).
pub const FRAME_STDOUT: u8 = 1;
/// Shim → client: container stderr.
pub const FRAME_STDERR: u8 = 2;
/// Client → shim: no more stdin from this client.
pub const FRAME_STDIN_CLOSE: u8 = 3;
/// Client → shim: terminal size, `width(16) | height(16)`.
pub const FRAME_RESIZE: u8 = 4;
/// Largest frame accepted from a client.
const MAX_FRAME: usize = 1 << 20;
/// Output chunks kept for each attached client.
const OUTPUT_QUEUE: usize = 256;

/// The output fan-out: the log copiers send, attach clients subscribe.
pub(crate) type Output = broadcast::Sender<(u8, Arc<[u8]>)>;

/// A new output fan-out.
pub(crate) fn output() -> Output {
    broadcast::channel(OUTPUT_QUEUE).0
}

/// What an attach client can reach.
pub(crate) struct AttachIo {
    /// The shim's write end of the container's stdin pipe (closing it ends stdin).
    pub(crate) stdin: Arc<Mutex<Option<OwnedFd>>>,
    /// The pty master, with a tty: stdin goes there and resizes apply to it.
    pub(crate) pty: Option<OwnedFd>,
    /// Close stdin when the first client that wrote to it is done.
    pub(crate) stdin_once: bool,
    /// Stdin was closed for good (`stdin_once`); with a tty the pty itself stays open for
    /// output, so this is what keeps later clients from writing to it.
    pub(crate) stdin_closed: std::sync::atomic::AtomicBool,
    /// The container's output.
    pub(crate) output: Output,
    /// `Some` once the container exited and its output was drained.
    pub(crate) exit: watch::Receiver<Option<Exit>>,
}

/// Listens on `<bundle>/attach.sock` and serves clients until aborted.
pub(crate) fn serve(bundle: &Path, io: AttachIo) -> Result<JoinHandle<()>, ShimError> {
    let path = bundle.join(ATTACH_SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = bind_long(&path).map_err(|source| ShimError::Io {
        action: "listen on attach socket",
        path: path.clone(),
        source,
    })?;
    let io = Arc::new(io);
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(client(stream, io.clone()));
        }
    }))
}

/// Connects to the attach socket of the bundle at `bundle`.
pub async fn connect_attach(bundle: &Path) -> std::io::Result<UnixStream> {
    let dir = std::fs::File::open(bundle)?;
    // Bundle paths can exceed the 108 bytes of a socket address: go through the directory's
    // descriptor instead.
    UnixStream::connect(via_fd(&dir, ATTACH_SOCKET)).await
}

fn bind_long(path: &Path) -> std::io::Result<UnixListener> {
    let dir = std::fs::File::open(path.parent().unwrap_or(Path::new("/")))?;
    let name = path.file_name().map(PathBuf::from).unwrap_or_default();
    UnixListener::bind(via_fd(&dir, &name))
}

fn via_fd(dir: &std::fs::File, name: impl AsRef<Path>) -> PathBuf {
    Path::new("/proc/self/fd").join(dir.as_raw_fd().to_string()).join(name)
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: u8,
    data: &[u8],
) -> std::io::Result<()> {
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&(data.len() as u32).to_be_bytes());
    w.write_all(&head).await?;
    w.write_all(data).await
}

/// Reads one frame; `None` at a clean end between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    if r.read(&mut head[..1]).await? == 0 {
        return Ok(None);
    }
    r.read_exact(&mut head[1..]).await?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "attach frame too large"));
    }
    let mut data = vec![0u8; len];
    r.read_exact(&mut data).await?;
    Ok(Some((head[0], data)))
}

async fn client(stream: UnixStream, io: Arc<AttachIo>) {
    let (rd, mut wr) = stream.into_split();
    let mut out = io.output.subscribe();
    let mut exit = io.exit.clone();
    let mut input = tokio::spawn(client_input(rd, io.clone()));
    loop {
        tokio::select! {
            m = out.recv() => match m {
                Ok((kind, data)) => {
                    if write_frame(&mut wr, kind, &data).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = async { let _ = exit.wait_for(Option::is_some).await; } => {
                // The output is drained: send what is queued for us, then end.
                while let Ok((kind, data)) = out.try_recv() {
                    if write_frame(&mut wr, kind, &data).await.is_err() {
                        break;
                    }
                }
                break;
            }
            _ = &mut input => break,
        }
    }
    input.abort();
    let _ = wr.shutdown().await;
}

/// Handles what one client sends: stdin and resizes.
async fn client_input(mut rd: tokio::net::unix::OwnedReadHalf, io: Arc<AttachIo>) {
    let mut stdin: Option<pipe::Sender> = None;
    let mut used_stdin = false;
    while let Ok(Some((kind, data))) = read_frame(&mut rd).await {
        match kind {
            FRAME_STDIN => {
                used_stdin = true;
                if stdin.is_none() {
                    stdin = open_stdin(&io);
                }
                if let Some(w) = &mut stdin
                    && w.write_all(&data).await.is_err()
                {
                    stdin = None;
                }
            }
            FRAME_STDIN_CLOSE => {
                stdin = None;
                if io.stdin_once {
                    close_stdin(&io);
                }
            }
            FRAME_RESIZE if data.len() == 4 => {
                if let Some(pty) = &io.pty {
                    let width = u16::from_be_bytes([data[0], data[1]]);
                    let height = u16::from_be_bytes([data[2], data[3]]);
                    let _ = crate::exec_stream::resize_pty(pty, width, height);
                }
            }
            _ => {}
        }
    }
    drop(stdin);
    if used_stdin && io.stdin_once {
        close_stdin(&io);
    }
}

/// A writer on the container's stdin (a dup of the kept pipe end, or of the pty master).
fn open_stdin(io: &AttachIo) -> Option<pipe::Sender> {
    if io.stdin_closed.load(std::sync::atomic::Ordering::Acquire) {
        return None;
    }
    let fd = match &io.pty {
        Some(pty) => pty.try_clone().ok()?,
        None => io.stdin.lock().unwrap_or_else(|e| e.into_inner()).as_ref()?.try_clone().ok()?,
    };
    set_nonblocking(&fd).ok()?;
    pipe::Sender::from_owned_fd_unchecked(fd).ok()
}

/// The terminal's end-of-file character (VEOF, `^D`).
const TTY_EOF: u8 = 0x04;

/// Closes the container's stdin for good. Without a tty: the pipe's write end goes. With
/// one, the pty master must stay (output, resizes): the container is told as a terminal
/// would, with the EOF character, once.
fn close_stdin(io: &AttachIo) {
    io.stdin.lock().unwrap_or_else(|e| e.into_inner()).take();
    if io.stdin_closed.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return;
    }
    if let Some(pty) = &io.pty
        && let Err(e) = nix::unistd::write(pty, &[TTY_EOF])
    {
        tracing::debug!(error = %e, "cannot send EOF to the container's terminal");
    }
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = fcntl(fd, FcntlArg::F_GETFL)?;
    fcntl(fd, FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK))?;
    Ok(())
}
