//! SPDY/3.1, as much as the Kubernetes stream protocols use: the client opens every stream,
//! the server replies to each and sends data on them.

mod conn;
mod dictionary;
mod frame;

pub(crate) use conn::{Connection, SpdyStream};
pub(crate) use frame::Frame;
