//! Unix socket addresses hold at most 107 bytes of path (`sun_path`), and a shim socket
//! under a long state directory plus a 64-character pod id can be longer. Such a socket is
//! reached through `/proc/self/fd/<its directory>/<name>`, which the kernel resolves like
//! the real path.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;

/// The longest path a socket address holds, without its NUL.
const MAX_SUN_PATH: usize = 107;

/// A path to use for `bind`/`connect`, valid while this lives.
pub(crate) struct SocketPath {
    path: PathBuf,
    /// The socket's directory, when `path` goes through it.
    _dir: Option<OwnedFd>,
}

impl SocketPath {
    /// `path` itself when short enough, else a `/proc/self/fd` path to it.
    pub(crate) fn new(path: &Path) -> io::Result<Self> {
        if path.as_os_str().as_bytes().len() <= MAX_SUN_PATH {
            return Ok(SocketPath { path: path.to_owned(), _dir: None });
        }
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "socket path has no file name",
            ));
        };
        let fd = open(dir, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?;
        let mut short = OsString::from(format!("/proc/self/fd/{}/", fd.as_raw_fd()));
        short.push(name);
        let short = PathBuf::from(short);
        if short.as_os_str().as_bytes().len() > MAX_SUN_PATH {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "socket name too long"));
        }
        Ok(SocketPath { path: short, _dir: Some(fd) })
    }

    /// The path to hand to `bind` or `connect`.
    pub(crate) fn as_path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_socket_paths_bind_and_connect() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("shim.sock");
        assert!(sock.as_os_str().len() > MAX_SUN_PATH);
        let bind_at = SocketPath::new(&sock).unwrap();
        let listener = tokio::net::UnixListener::bind(bind_at.as_path()).unwrap();
        assert!(sock.exists(), "the socket is where the long path says");
        let connect_at = SocketPath::new(&sock).unwrap();
        let (client, server) =
            tokio::join!(tokio::net::UnixStream::connect(connect_at.as_path()), listener.accept());
        client.unwrap();
        server.unwrap();
        let short = tmp.path().join("s.sock");
        assert_eq!(SocketPath::new(&short).unwrap().as_path(), short);
    }
}
