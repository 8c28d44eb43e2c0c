//! The protocol-neutral streams a session works with: the SPDY and WebSocket connections turn
//! their frames into these, so exec and port-forward are written once.

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::StreamError;

/// Largest chunk read from a process or socket and sent as one frame.
pub(crate) const CHUNK: usize = 32 << 10;
/// Chunks queued towards one connection's writer: with [`CHUNK`] this bounds what a slow
/// client makes us buffer; beyond it the readers (and so the process) wait.
pub(crate) const OUT_QUEUE: usize = 16;
/// Chunks queued from the client per stream before the connection's reader waits.
pub(crate) const IN_QUEUE: usize = 16;

/// What a session sends to the connection's writer.
#[derive(Debug)]
pub(crate) enum Out {
    /// Data on a stream (SPDY stream id, or WebSocket channel).
    Data(u32, Bytes),
    /// The end of what we send on a stream.
    Close(u32),
    /// A protocol frame of the connection's own (SPDY replies, pings, window updates).
    Control(crate::spdy::Frame),
    /// Finish: say goodbye and close our side of the connection.
    Shutdown,
}

/// Our sending end of one stream.
#[derive(Debug)]
pub(crate) struct OutStream {
    pub(crate) id: u32,
    pub(crate) tx: mpsc::Sender<Out>,
}

impl OutStream {
    /// Sends `data`, waiting while the connection's queue is full.
    pub(crate) async fn write(&self, data: Bytes) -> Result<(), StreamError> {
        count_bytes("out", data.len());
        self.tx.send(Out::Data(self.id, data)).await.map_err(|_| StreamError::Gone)
    }

    /// Ends the stream.
    pub(crate) async fn close(self) {
        let _ = self.tx.send(Out::Close(self.id)).await;
    }
}

/// Counts streamed bytes for the metrics.
pub(crate) fn count_bytes(direction: &str, n: usize) {
    berth_metrics::metrics().stream_bytes.with_label_values(&[direction]).inc_by(n as u64);
}

/// Counts a session as open while it lives.
pub(crate) struct SessionGauge(&'static str);

impl SessionGauge {
    pub(crate) fn open(kind: &'static str) -> Self {
        berth_metrics::metrics().stream_sessions.with_label_values(&[kind]).inc();
        SessionGauge(kind)
    }
}

impl Drop for SessionGauge {
    fn drop(&mut self) {
        berth_metrics::metrics().stream_sessions.with_label_values(&[self.0]).dec();
    }
}

/// Receives what the client sends on one stream; ends at its close.
pub(crate) type InStream = mpsc::Receiver<Bytes>;
