//! berth-net: a pod's network side.
//!
//! - `pin`: a pod's network, IPC and UTS namespaces are created by a short-lived thread and
//!   kept alive by bind-mounting `/proc/thread-self/ns/<kind>` onto files in the pod's
//!   directory, as CRI-O's "drop infra" mode does. No pause process is involved.
//! - [`network`]: pod networking behind [`NetworkManager`], through the built-in bridge
//!   (netlink, our own IPAM and NAT) or CNI plugins, as [`NetworkConfig`] (the `[network]`
//!   section of `berth.toml`) chooses.
//!
//! Unsafe code is denied here but in `pin`, which brings the pod's loopback up with ioctls.

#![deny(unsafe_code)]

// ioctl(SIOCGIFFLAGS/SIOCSIFFLAGS) on a raw socket inside the new netns: no safe wrapper.
#[allow(unsafe_code)]
mod pin;

pub use pin::{NamespaceKind, PinRequest, PinnedNamespaces, pin_namespaces, unpin, unpin_all};

use std::path::PathBuf;

/// Why namespaces could not be created, pinned or unpinned.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A file operation on a pin file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What we tried, e.g. `create pin file`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{call}: {source}")]
    Sys {
        /// Which call, e.g. `unshare(CLONE_NEWNET)`.
        call: &'static str,
        /// The errno.
        #[source]
        source: nix::errno::Errno,
    },
    /// The hostname is not usable (empty, too long, or contains a NUL byte).
    #[error("invalid hostname {0:?}")]
    InvalidHostname(String),
    /// The helper thread could not be started or panicked.
    #[error("namespace helper thread failed: {0}")]
    Thread(&'static str),
}
pub mod network;
pub use network::{
    Mode, NetworkConfig, NetworkError, NetworkManager, PodNetwork, PodNetworkStatus, PortMapping,
    Readiness,
};
