//! Connections to a port on localhost inside a pod's network namespace.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream as StdTcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use berth_runtime::PodNetwork;
use tokio::net::TcpStream;

/// How long a connect may take (a port with no listener fails at once).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `port` on localhost in `net` (IPv4, then IPv6).
pub(crate) async fn connect(net: &PodNetwork, port: u16) -> std::io::Result<TcpStream> {
    let std = match net {
        PodNetwork::Host => tokio::task::spawn_blocking(move || dial(port))
            .await
            .map_err(std::io::Error::other)??,
        PodNetwork::Namespace(path) => {
            // setns() changes the calling thread's namespace: a thread of our own does it
            // and ends, so no pooled runtime thread is left in the pod's netns. The socket
            // stays in the namespace it was created in.
            let path = path.clone();
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::Builder::new().name("berth-portfwd".into()).spawn(move || {
                let _ = tx.send(enter(&path).and_then(|()| dial(port)));
            })?;
            rx.await.map_err(std::io::Error::other)??
        }
    };
    std.set_nonblocking(true)?;
    TcpStream::from_std(std)
}

/// Moves the current thread into the network namespace pinned at `path`.
fn enter(path: &Path) -> std::io::Result<()> {
    let ns = std::fs::File::open(path)?;
    // SAFETY: setns on a descriptor we own, affecting only this thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn dial(port: u16) -> std::io::Result<StdTcpStream> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    StdTcpStream::connect_timeout(&v4, CONNECT_TIMEOUT).or_else(|e| {
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
        StdTcpStream::connect_timeout(&v6, CONNECT_TIMEOUT).map_err(|_| e)
    })
}
