//! A server-side SPDY connection: a reader task that replies to each stream the client opens
//! and routes its data, and a writer task that owns the send-side header compression.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::frame::{Frame, FrameReader, FrameWriter, Headers, RST_CANCEL, RST_PROTOCOL_ERROR};
use crate::StreamError;
use crate::channel::{IN_QUEUE, InStream, OUT_QUEUE, Out, OutStream};

/// How long, after we said goodbye, we keep reading for the client to close: closing with
/// unread data would reset the connection and could lose what we sent last.
const LINGER: Duration = Duration::from_secs(5);

/// A stream the client opened.
#[derive(Debug)]
pub(crate) struct SpdyStream {
    /// Its headers (names lower case).
    pub(crate) headers: Headers,
    /// What the client sends on it.
    pub(crate) input: InStream,
    /// What we send on it.
    pub(crate) output: OutStream,
}

impl SpdyStream {
    /// A header's value.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A running connection.
pub(crate) struct Connection {
    /// Streams as the client opens them; ends with the connection.
    pub(crate) streams: mpsc::Receiver<SpdyStream>,
    /// For sending on streams and shutting down.
    pub(crate) out: mpsc::Sender<Out>,
    /// Becomes true once the client's side has ended.
    pub(crate) gone: watch::Receiver<bool>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Connection {
    /// Starts serving SPDY on `io` (after the HTTP upgrade).
    pub(crate) fn start<IO>(io: IO) -> Result<Self, StreamError>
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(io);
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let (streams_tx, streams) = mpsc::channel(8);
        let (gone_tx, gone) = watch::channel(false);
        let frames = FrameWriter::new()?;
        let writer = tokio::spawn(write_loop(wr, frames, out_rx));
        let reader = tokio::spawn({
            let out = out_tx.clone();
            async move {
                if let Err(e) = read_loop(rd, out, streams_tx).await {
                    tracing::debug!(error = %e, "SPDY connection ended");
                }
                let _ = gone_tx.send(true);
            }
        });
        Ok(Connection { streams, out: out_tx, gone, reader, writer })
    }

    /// Says goodbye once everything queued is sent, then waits a little for the client to
    /// close its side.
    pub(crate) async fn finish(self) {
        let Connection { streams, out, mut gone, reader, writer } = self;
        drop(streams);
        let _ = out.send(Out::Shutdown).await;
        drop(out);
        let _ = writer.await;
        let _ = tokio::time::timeout(LINGER, gone.wait_for(|g| *g)).await;
        reader.abort();
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut rd: R,
    out: mpsc::Sender<Out>,
    streams: mpsc::Sender<SpdyStream>,
) -> Result<(), StreamError> {
    let mut frames = FrameReader::new();
    let mut inputs: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    let mut last_id = 0;
    let control = |f: Frame| out.send(Out::Control(f));
    while let Some(frame) = frames.read(&mut rd).await? {
        match frame {
            Frame::SynStream { stream_id, fin, headers, .. } => {
                // Client streams have odd ids, each above the last.
                if stream_id % 2 == 0 || stream_id <= last_id {
                    let rst = Frame::RstStream { stream_id, status: RST_PROTOCOL_ERROR };
                    control(rst).await.map_err(|_| StreamError::Gone)?;
                    continue;
                }
                last_id = stream_id;
                let (tx, input) = mpsc::channel(IN_QUEUE);
                if !fin {
                    inputs.insert(stream_id, tx);
                }
                let reply = Frame::SynReply { stream_id, fin: false, headers: Vec::new() };
                control(reply).await.map_err(|_| StreamError::Gone)?;
                let output = OutStream { id: stream_id, tx: out.clone() };
                if streams.send(SpdyStream { headers, input, output }).await.is_err() {
                    // Nobody takes new streams any more.
                    inputs.remove(&stream_id);
                    let _ = control(Frame::RstStream { stream_id, status: RST_CANCEL }).await;
                }
            }
            Frame::Data { stream_id, fin, data } => {
                crate::channel::count_bytes("in", data.len());
                let len = data.len() as u32;
                if let Some(tx) = inputs.get(&stream_id)
                    && !data.is_empty()
                    && tx.send(data).await.is_err()
                {
                    // The session stopped reading this stream: drop what comes.
                    inputs.remove(&stream_id);
                }
                if fin {
                    inputs.remove(&stream_id);
                }
                if len > 0 {
                    // Give the window back: spec clients stall after 64 KiB without it.
                    let update = Frame::WindowUpdate { stream_id, delta: len };
                    let _ = control(update).await;
                }
            }
            Frame::RstStream { stream_id, .. } => {
                inputs.remove(&stream_id);
            }
            Frame::Ping { id } => {
                let _ = control(Frame::Ping { id }).await;
            }
            Frame::GoAway { .. } => return Ok(()),
            Frame::SynReply { .. }
            | Frame::Headers { .. }
            | Frame::Settings { .. }
            | Frame::WindowUpdate { .. }
            | Frame::Unknown { .. } => {}
        }
    }
    Ok(())
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut frames: FrameWriter,
    mut rx: mpsc::Receiver<Out>,
) {
    let mut buf = Vec::with_capacity(64 << 10);
    let mut last_stream = 0;
    while let Some(msg) = rx.recv().await {
        buf.clear();
        let frame = match msg {
            Out::Data(stream_id, data) => Frame::Data { stream_id, fin: false, data },
            Out::Close(stream_id) => Frame::Data { stream_id, fin: true, data: Bytes::new() },
            Out::Control(f) => {
                if let Frame::SynReply { stream_id, .. } = &f {
                    last_stream = *stream_id;
                }
                f
            }
            Out::Shutdown => {
                let bye = Frame::GoAway { last_stream_id: last_stream, status: 0 };
                if frames.encode(&bye, &mut buf).is_ok() {
                    let _ = wr.write_all(&buf).await;
                }
                let _ = wr.shutdown().await;
                return;
            }
        };
        if let Err(e) = frames.encode(&frame, &mut buf) {
            tracing::warn!(error = %e, "cannot encode SPDY frame");
            return;
        }
        if wr.write_all(&buf).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A client's view: writes frames, reads the server's.
    struct Client {
        r: FrameReader,
        w: FrameWriter,
        io: tokio::io::DuplexStream,
    }

    impl Client {
        async fn send(&mut self, f: Frame) {
            let mut buf = Vec::new();
            self.w.encode(&f, &mut buf).unwrap();
            self.io.write_all(&buf).await.unwrap();
        }
        async fn recv(&mut self) -> Option<Frame> {
            self.r.read(&mut self.io).await.unwrap()
        }
    }

    fn syn(stream_id: u32, kind: &str) -> Frame {
        Frame::SynStream {
            stream_id,
            associated: 0,
            priority: 0,
            fin: false,
            unidirectional: false,
            headers: vec![("streamtype".into(), kind.into())],
        }
    }

    #[tokio::test]
    async fn streams_are_replied_to_and_carry_data_both_ways() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut conn = Connection::start(b).unwrap();
        let mut c = Client { r: FrameReader::new(), w: FrameWriter::new().unwrap(), io: a };
        c.send(syn(1, "stdin")).await;
        assert_eq!(
            c.recv().await,
            Some(Frame::SynReply { stream_id: 1, fin: false, headers: vec![] })
        );
        let mut s = conn.streams.recv().await.unwrap();
        assert_eq!(s.header("StreamType"), Some("stdin"));
        c.send(Frame::Data { stream_id: 1, fin: true, data: Bytes::from_static(b"in") }).await;
        assert_eq!(s.input.recv().await.as_deref(), Some(&b"in"[..]));
        assert_eq!(s.input.recv().await, None);
        assert_eq!(c.recv().await, Some(Frame::WindowUpdate { stream_id: 1, delta: 2 }));

        c.send(Frame::Ping { id: 7 }).await;
        assert_eq!(c.recv().await, Some(Frame::Ping { id: 7 }));

        s.output.write(Bytes::from_static(b"out")).await.unwrap();
        s.output.close().await;
        let data = Frame::Data { stream_id: 1, fin: false, data: Bytes::from_static(b"out") };
        assert_eq!(c.recv().await, Some(data));
        assert_eq!(
            c.recv().await,
            Some(Frame::Data { stream_id: 1, fin: true, data: Bytes::new() })
        );

        let finish = tokio::spawn(conn.finish());
        assert_eq!(c.recv().await, Some(Frame::GoAway { last_stream_id: 1, status: 0 }));
        assert_eq!(c.recv().await, None);
        drop(c);
        finish.await.unwrap();
    }

    #[tokio::test]
    async fn even_or_backward_stream_ids_are_reset() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let _conn = Connection::start(b).unwrap();
        let mut c = Client { r: FrameReader::new(), w: FrameWriter::new().unwrap(), io: a };
        c.send(syn(2, "stdin")).await;
        assert_eq!(
            c.recv().await,
            Some(Frame::RstStream { stream_id: 2, status: RST_PROTOCOL_ERROR })
        );
        c.send(syn(5, "stdin")).await;
        assert!(matches!(c.recv().await, Some(Frame::SynReply { stream_id: 5, .. })));
        c.send(syn(3, "stdin")).await;
        assert_eq!(
            c.recv().await,
            Some(Frame::RstStream { stream_id: 3, status: RST_PROTOCOL_ERROR })
        );
    }

    #[tokio::test]
    async fn garbage_ends_the_connection() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let conn = Connection::start(b).unwrap();
        a.write_all(&[0x80, 9, 0, 1, 0, 0, 0, 0]).await.unwrap();
        let mut gone = conn.gone.clone();
        gone.wait_for(|g| *g).await.unwrap();
        let mut rest = Vec::new();
        drop(conn);
        let _ = a.read_to_end(&mut rest).await;
    }
}
