//! The streaming server's errors.

/// What can go wrong serving a stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Reading or writing the connection, or a socket.
    #[error("stream I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The peer broke the wire protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Too many URLs handed out and not yet used.
    #[error("too many pending stream requests ({0}); try again later")]
    TooManyPending(usize),
    /// The kernel's random source failed.
    #[error("cannot read random bytes for a token: {0}")]
    Random(#[source] std::io::Error),
    /// The streaming server could not listen.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address asked for.
        address: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS certificate or key of the streaming server cannot be used.
    #[error("streaming server TLS: {path}: {reason}")]
    Tls {
        /// The certificate or key file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The runtime refused (no such container, not running, ...).
    #[error(transparent)]
    Runtime(#[from] berth_runtime::RuntimeError),
    /// The peer went away.
    #[error("the client closed the connection")]
    Gone,
}
