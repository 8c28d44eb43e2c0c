//! berth-stream: the streaming server behind the CRI's Exec, Attach and PortForward.
//!
//! The CRI call gets a URL on this server carrying a random single-use token ([`Tokens`]); the
//! client (crictl, or the kubelet proxying `kubectl`) then upgrades an HTTP connection on it to
//! SPDY/3.1 or WebSocket and speaks the Kubernetes stream protocols: `channel.k8s.io` (v1 to
//! v5) for exec and `portforward.k8s.io` for port forwarding.

// Unsafe code only in the modules allowed by name below.
#![deny(unsafe_code)]

mod attach;
mod channel;
mod error;
// unsafe: fcntl(2) on fds it owns.
#[allow(unsafe_code)]
mod exec;
// unsafe: setns(2) on a thread of its own.
#[allow(unsafe_code)]
mod netns;
mod portforward;
mod server;
pub mod spdy;
// unsafe: getrandom(2) for tokens.
#[allow(unsafe_code)]
mod token;
mod ws;

pub use error::StreamError;
pub use server::{StreamConfig, StreamServer, TlsFiles};
pub use token::{Request, Tokens};
