//! berth-stream: the streaming server behind the CRI's Exec, Attach and PortForward.
//!
//! The CRI call gets a URL on this server carrying a random single-use token ([`Tokens`]); the
//! client (crictl, or the kubelet proxying `kubectl`) then upgrades an HTTP connection on it to
//! SPDY/3.1 or WebSocket and speaks the Kubernetes stream protocols: `channel.k8s.io` (v1 to
//! v5) for exec and `portforward.k8s.io` for port forwarding.

mod attach;
mod channel;
mod error;
mod exec;
mod netns;
mod portforward;
mod server;
pub mod spdy;
mod token;
mod ws;

pub use error::StreamError;
pub use server::{StreamConfig, StreamServer, TlsFiles};
pub use token::{Request, Tokens};
