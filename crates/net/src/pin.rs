//! Creating and pinning namespaces.
//!
//! `unshare(2)` of the network, IPC and UTS namespaces is per thread, so a dedicated std thread
//! can make new ones without disturbing the async runtime's threads. The thread bind-mounts its
//! namespace files onto empty files and exits; the mounts keep the namespaces alive until
//! [`unpin`] detaches them.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};

use crate::NetError;

/// A kind of namespace berth pins for a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamespaceKind {
    /// Network.
    Net,
    /// System V IPC and POSIX message queues.
    Ipc,
    /// Hostname.
    Uts,
}

impl NamespaceKind {
    /// The name under `/proc/<pid>/ns/` and of the pin file.
    pub fn name(self) -> &'static str {
        match self {
            NamespaceKind::Net => "net",
            NamespaceKind::Ipc => "ipc",
            NamespaceKind::Uts => "uts",
        }
    }

    fn clone_flag(self) -> CloneFlags {
        match self {
            NamespaceKind::Net => CloneFlags::CLONE_NEWNET,
            NamespaceKind::Ipc => CloneFlags::CLONE_NEWIPC,
            NamespaceKind::Uts => CloneFlags::CLONE_NEWUTS,
        }
    }
}

/// Which namespaces to create for a pod, and where.
#[derive(Debug, Clone)]
pub struct PinRequest {
    /// Directory the pin files go into (`<dir>/net`, `<dir>/ipc`, `<dir>/uts`); created if
    /// missing.
    pub dir: PathBuf,
    /// Namespaces to create.
    pub kinds: Vec<NamespaceKind>,
    /// Hostname to set in the new UTS namespace (ignored without [`NamespaceKind::Uts`]).
    pub hostname: String,
}

/// The pin files of a pod's namespaces (`None`: not created, i.e. the host's is shared).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PinnedNamespaces {
    /// Network namespace pin.
    pub net: Option<PathBuf>,
    /// IPC namespace pin.
    pub ipc: Option<PathBuf>,
    /// UTS namespace pin.
    pub uts: Option<PathBuf>,
}

impl PinnedNamespaces {
    fn set(&mut self, kind: NamespaceKind, path: PathBuf) {
        match kind {
            NamespaceKind::Net => self.net = Some(path),
            NamespaceKind::Ipc => self.ipc = Some(path),
            NamespaceKind::Uts => self.uts = Some(path),
        }
    }

    /// Every pin file present.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        [&self.net, &self.ipc, &self.uts].into_iter().flatten().map(PathBuf::as_path)
    }
}

fn sys(call: &'static str) -> impl FnOnce(nix::errno::Errno) -> NetError {
    move |source| NetError::Sys { call, source }
}

/// Creates the requested namespaces and pins them. Blocking (it joins a short-lived thread):
/// call it from `spawn_blocking`. On failure nothing stays pinned.
pub fn pin_namespaces(request: &PinRequest) -> Result<PinnedNamespaces, NetError> {
    if request.kinds.is_empty() {
        return Ok(PinnedNamespaces::default());
    }
    if request.kinds.contains(&NamespaceKind::Uts) {
        check_hostname(&request.hostname)?;
    }
    std::fs::create_dir_all(&request.dir).map_err(|source| NetError::Io {
        action: "create directory",
        path: request.dir.clone(),
        source,
    })?;
    let mut targets = Vec::new();
    for &kind in &request.kinds {
        let path = request.dir.join(kind.name());
        // An empty regular file is the mount point for an nsfs bind mount.
        OpenOptions::new().write(true).create(true).truncate(false).open(&path).map_err(
            |source| NetError::Io { action: "create pin file", path: path.clone(), source },
        )?;
        targets.push((kind, path));
    }
    let request_copy = request.clone();
    let thread_targets = targets.clone();
    let result = std::thread::Builder::new()
        .name("berth-netns".into())
        .spawn(move || pin_in_thread(&request_copy, &thread_targets))
        .map_err(|_| NetError::Thread("cannot spawn"))?
        .join()
        .unwrap_or(Err(NetError::Thread("panicked")));
    match result {
        Ok(pinned) => Ok(pinned),
        Err(e) => {
            for (_, path) in &targets {
                if let Err(undo) = unpin(path) {
                    tracing::warn!(error = %undo, path = %path.display(), "cannot undo namespace pin");
                }
            }
            Err(e)
        }
    }
}

fn check_hostname(hostname: &str) -> Result<(), NetError> {
    // HOST_NAME_MAX is 64 on Linux.
    if hostname.is_empty() || hostname.len() > 64 || hostname.contains('\0') {
        return Err(NetError::InvalidHostname(hostname.to_owned()));
    }
    Ok(())
}

/// Runs on the helper thread: unshare, configure, bind-mount. The thread's namespaces die
/// with it unless pinned, so a failure here leaves nothing behind but the empty files.
fn pin_in_thread(
    request: &PinRequest,
    targets: &[(NamespaceKind, PathBuf)],
) -> Result<PinnedNamespaces, NetError> {
    let flags = targets.iter().fold(CloneFlags::empty(), |f, (k, _)| f | k.clone_flag());
    unshare(flags).map_err(sys("unshare"))?;
    if targets.iter().any(|(k, _)| *k == NamespaceKind::Uts) {
        nix::unistd::sethostname(&request.hostname).map_err(sys("sethostname"))?;
    }
    if targets.iter().any(|(k, _)| *k == NamespaceKind::Net) {
        loopback_up()?;
    }
    let mut pinned = PinnedNamespaces::default();
    for (kind, target) in targets {
        let source = PathBuf::from(format!("/proc/thread-self/ns/{}", kind.name()));
        mount(Some(&source), target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(sys("bind-mount namespace"))?;
        pinned.set(*kind, target.clone());
    }
    Ok(pinned)
}

/// Brings `lo` up in the calling thread's network namespace.
fn loopback_up() -> Result<(), NetError> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NetError::Sys { call: "socket(AF_INET)", source: nix::errno::Errno::last() });
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of a valid ifreq.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    if rc < 0 {
        return Err(NetError::Sys {
            call: "ioctl(SIOCGIFFLAGS, lo)",
            source: nix::errno::Errno::last(),
        });
    }
    // SAFETY: the kernel filled the flags member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: as above, with the updated flags.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    if rc < 0 {
        return Err(NetError::Sys {
            call: "ioctl(SIOCSIFFLAGS, lo)",
            source: nix::errno::Errno::last(),
        });
    }
    Ok(())
}

/// Detaches a pin (if mounted) and removes its file. Idempotent.
pub fn unpin(path: &Path) -> Result<(), NetError> {
    // Lazy detach: a container still joining the namespace keeps it, we drop our reference.
    // EINVAL: not a mount point (never pinned or already unpinned); ENOENT: no file.
    loop {
        match umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) => continue, // stacked pins from a retried create: peel them all
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => break,
            Err(e) => return Err(NetError::Sys { call: "umount2(namespace pin)", source: e }),
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => {
            Err(NetError::Io { action: "remove pin file", path: path.to_owned(), source })
        }
    }
}

/// Unpins every namespace kind under `dir` (`net`, `ipc`, `uts`). Idempotent; tries all
/// three and reports the first failure.
pub fn unpin_all(dir: &Path) -> Result<(), NetError> {
    let mut first = None;
    for kind in [NamespaceKind::Net, NamespaceKind::Ipc, NamespaceKind::Uts] {
        if let Err(e) = unpin(&dir.join(kind.name())) {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns_inode(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).expect("stat").ino()
    }

    #[test]
    fn hostnames_are_checked() {
        assert!(check_hostname("pod-a").is_ok());
        assert!(check_hostname("").is_err());
        assert!(check_hostname(&"x".repeat(65)).is_err());
    }

    #[test]
    fn nothing_requested_pins_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let req = PinRequest { dir: dir.path().join("ns"), kinds: vec![], hostname: String::new() };
        assert_eq!(pin_namespaces(&req).expect("pin"), PinnedNamespaces::default());
    }

    #[test]
    fn pins_fresh_namespaces_and_unpins_them() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let req = PinRequest {
            dir: dir.path().join("ns"),
            kinds: vec![NamespaceKind::Net, NamespaceKind::Ipc, NamespaceKind::Uts],
            hostname: "berth-test".into(),
        };
        let pinned = pin_namespaces(&req).expect("pin");
        let net = pinned.net.clone().expect("net");
        assert_ne!(ns_inode(&net), ns_inode(Path::new("/proc/self/ns/net")));
        assert_ne!(
            ns_inode(pinned.uts.as_ref().expect("uts")),
            ns_inode(Path::new("/proc/self/ns/uts"))
        );
        unpin_all(&req.dir).expect("unpin");
        assert!(!net.exists());
        unpin_all(&req.dir).expect("unpin twice");
    }
}
