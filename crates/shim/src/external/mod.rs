//! The external shim: one `berth-shim` process per pod sandbox, which outlives berthd.
//!
//! `server` is what the process runs (an [`crate::EmbeddedShim`] behind a unix socket, plus
//! per-task state files); `client` is berthd's [`ExternalShim`]; `wire` is the framing of the
//! protobuf messages of `proto/shim/v1/shim.proto` (length-prefixed, no gRPC).
//!
//! A pod's shim lives in `<root>/<pod id>/` (mode 0700): `shim.sock` (the API), `shim.pid`,
//! `shim.log` (its stderr), `tasks/<container id>.json` (state files), `run/` (the embedded
//! shim's per-task files).

mod client;
mod server;
pub mod wire;

/// The generated protobuf messages of the shim API (`berth.shim.v1`).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/berth.shim.v1.rs"));
}

pub use client::{ExternalShim, RecoveredTask};
pub use server::{ServerConfig, serve};

/// The API socket's file name in a shim directory.
pub const SOCKET_NAME: &str = "shim.sock";
/// The shim's pid file name in a shim directory.
pub const PID_FILE: &str = "shim.pid";
