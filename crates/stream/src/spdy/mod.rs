//! SPDY/3.1, as much as the Kubernetes stream protocols use: the client opens every stream,
//! the server replies to each and sends data on them. The frame codec is public for clients
//! (the end-to-end tests speak SPDY with it).

mod conn;
mod dictionary;
mod frame;

pub(crate) use conn::{Connection, SpdyStream};
pub use frame::{FLAG_FIN, Frame, FrameReader, FrameWriter, Headers};
