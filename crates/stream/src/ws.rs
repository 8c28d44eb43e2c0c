//! The Kubernetes channel protocols over WebSocket: every binary message starts with its
//! channel byte (exec: 0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize; port-forward: 2n data
//! and 2n+1 error of the n-th port). `v5.channel.k8s.io` adds channel 255, whose message
//! `[255, n]` from the client closes channel n (so stdin can be closed without closing the
//! connection).

use std::collections::HashMap;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::channel::{IN_QUEUE, InStream, OUT_QUEUE, Out, OutStream};

/// The v5 close channel.
const CLOSE_CHANNEL: u8 = 255;
/// Bytes in flight in a SPDY tunnel, each way.
const TUNNEL_BUFFER: usize = 64 << 10;
/// How long after our close frame we wait for the client's.
const LINGER: Duration = Duration::from_secs(5);

/// A running WebSocket stream connection.
pub(crate) struct WsConnection {
    /// The client's channels that carry input, by channel number.
    pub(crate) inputs: HashMap<u8, InStream>,
    out: mpsc::Sender<Out>,
    /// Becomes true once the client's side has ended.
    pub(crate) gone: watch::Receiver<bool>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl WsConnection {
    /// Starts serving `ws`; `inputs` are the channels the client may send on.
    pub(crate) fn start<IO>(ws: WebSocketStream<IO>, v5: bool, inputs: &[u8]) -> Self
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sink, stream) = ws.split();
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let (gone_tx, gone) = watch::channel(false);
        let mut senders = HashMap::new();
        let mut receivers = HashMap::new();
        for &ch in inputs {
            let (tx, rx) = mpsc::channel(IN_QUEUE);
            senders.insert(ch, tx);
            receivers.insert(ch, rx);
        }
        let writer = tokio::spawn(write_loop(sink, out_rx));
        let reader = tokio::spawn(async move {
            read_loop(stream, senders, v5).await;
            let _ = gone_tx.send(true);
        });
        WsConnection { inputs: receivers, out: out_tx, gone, reader, writer }
    }

    /// Our sending end of channel `ch`.
    pub(crate) fn output(&self, ch: u8) -> OutStream {
        OutStream { id: u32::from(ch), tx: self.out.clone() }
    }

    /// Closes the connection once everything queued is sent.
    pub(crate) async fn finish(self) {
        let WsConnection { inputs, out, mut gone, reader, writer } = self;
        drop(inputs);
        let _ = out.send(Out::Shutdown).await;
        drop(out);
        let _ = writer.await;
        let _ = tokio::time::timeout(LINGER, gone.wait_for(|g| *g)).await;
        reader.abort();
    }
}

/// A close frame with status 1000.
fn normal_close() -> CloseFrame {
    CloseFrame { code: CloseCode::Normal, reason: "".into() }
}

/// Carries a byte stream over binary messages, for SPDY tunnelled through a WebSocket
/// (`SPDY/3.1+portforward.k8s.io`, as client-go's port-forward over WebSocket speaks): the
/// returned end reads what the client sends and writes what it receives.
pub(crate) fn tunnel<IO>(ws: WebSocketStream<IO>) -> DuplexStream
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (ours, theirs) = tokio::io::duplex(TUNNEL_BUFFER);
    let (mut rd, mut wr) = tokio::io::split(theirs);
    let (mut sink, mut stream) = ws.split();
    tokio::spawn(async move {
        let up = async {
            while let Some(Ok(msg)) = stream.next().await {
                match msg {
                    Message::Binary(data) if wr.write_all(&data).await.is_err() => break,
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            let _ = wr.shutdown().await;
        };
        let down = async {
            let mut buf = vec![0u8; crate::channel::CHUNK];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let data = Bytes::copy_from_slice(&buf[..n]);
                        if sink.send(Message::Binary(data)).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = sink.send(Message::Close(Some(normal_close()))).await;
            let _ = sink.close().await;
        };
        tokio::join!(up, down);
    });
    ours
}

async fn read_loop<S>(mut stream: S, mut senders: HashMap<u8, mpsc::Sender<Bytes>>, v5: bool)
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    while let Some(Ok(msg)) = stream.next().await {
        let data = match msg {
            Message::Binary(data) => data,
            Message::Close(_) => return,
            // Text is only used by the base64 variants, which we do not offer.
            _ => continue,
        };
        let Some(&ch) = data.first() else { continue };
        crate::channel::count_bytes("in", data.len() - 1);
        if v5 && ch == CLOSE_CHANNEL {
            if let Some(closed) = data.get(1) {
                senders.remove(closed);
            }
            continue;
        }
        if let Some(tx) = senders.get(&ch)
            && data.len() > 1
            && tx.send(data.slice(1..)).await.is_err()
        {
            senders.remove(&ch);
        }
    }
}

async fn write_loop<S>(mut sink: S, mut rx: mpsc::Receiver<Out>)
where
    S: futures::Sink<Message> + Unpin,
{
    while let Some(msg) = rx.recv().await {
        let frame = match msg {
            Out::Data(ch, data) => {
                let mut b = BytesMut::with_capacity(data.len() + 1);
                b.put_u8(ch as u8);
                b.put_slice(&data);
                Message::Binary(b.freeze())
            }
            // The end of an output channel is the end of the connection: client-go's
            // executor takes a close message from the server for an unknown stream.
            Out::Close(_) | Out::Control(_) => continue,
            Out::Shutdown => {
                // A normal closure: Go's clients take 1005 (no status) as an error.
                let _ = sink.send(Message::Close(Some(normal_close()))).await;
                let _ = sink.close().await;
                return;
            }
        };
        if sink.send(frame).await.is_err() {
            return;
        }
    }
}
