//! Port-forward sessions: each forwarded connection is a data stream (bytes both ways) and an
//! error stream (a message if the port cannot be reached), to a port on localhost in the pod.

use std::collections::HashMap;

use berth_runtime::PodNetwork;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::channel::{CHUNK, InStream, OutStream};
use crate::spdy::{Connection, SpdyStream};
use crate::ws::WsConnection;

/// Serves port-forward streams on a SPDY connection until the client closes it.
pub(crate) async fn serve_spdy(net: PodNetwork, mut conn: Connection) {
    // Streams pair up by request id (older clients send none: then by port).
    let mut pending: HashMap<String, (Option<SpdyStream>, Option<SpdyStream>)> = HashMap::new();
    let mut forwards = JoinSet::new();
    while let Some(stream) = conn.streams.recv().await {
        let key = stream
            .header("requestid")
            .or_else(|| stream.header("port"))
            .unwrap_or_default()
            .to_owned();
        let slot = pending.entry(key.clone()).or_default();
        match stream.header("streamtype") {
            Some("data") => slot.0 = Some(stream),
            Some("error") => slot.1 = Some(stream),
            _ => continue,
        }
        if let (Some(_), Some(_)) = slot
            && let Some((Some(data), Some(error))) = pending.remove(&key)
        {
            let net = net.clone();
            forwards.spawn(async move {
                let port =
                    data.header("port").and_then(|p| p.parse::<u16>().ok()).filter(|&p| p > 0);
                forward(&net, port, data.input, data.output, error.output).await;
            });
        }
    }
    forwards.abort_all();
    conn.finish().await;
}

/// Serves `v4.portforward.k8s.io` on a WebSocket: channel 2n carries the data and 2n+1 the
/// errors of `ports[n]`, and both first carry the port number (16-bit little endian).
pub(crate) async fn serve_ws(net: PodNetwork, ports: Vec<u16>, mut conn: WsConnection) {
    let mut forwards = JoinSet::new();
    for (n, port) in ports.into_iter().enumerate() {
        let (data_ch, error_ch) = ((2 * n) as u8, (2 * n + 1) as u8);
        let (data, error) = (conn.output(data_ch), conn.output(error_ch));
        let input = conn.inputs.remove(&data_ch);
        let net = net.clone();
        forwards.spawn(async move {
            let prefix = Bytes::copy_from_slice(&port.to_le_bytes());
            if data.write(prefix.clone()).await.is_err() || error.write(prefix).await.is_err() {
                return;
            }
            let Some(input) = input else { return };
            forward(&net, Some(port), input, data, error).await;
        });
    }
    let mut gone = conn.gone.clone();
    tokio::select! {
        _ = async { while forwards.join_next().await.is_some() {} } => {}
        _ = async { let _ = gone.wait_for(|g| *g).await; } => forwards.abort_all(),
    }
    conn.finish().await;
}

/// One forwarded connection.
async fn forward(
    net: &PodNetwork,
    port: Option<u16>,
    input: InStream,
    data: OutStream,
    error: OutStream,
) {
    let result: Result<(), String> = match port {
        None => Err("invalid port".to_owned()),
        Some(port) => match crate::netns::connect(net, port).await {
            Ok(tcp) => {
                copy(tcp, input, data).await;
                error.close().await;
                return;
            }
            Err(e) => Err(format!("error forwarding port {port} to pod: {e}")),
        },
    };
    if let Err(message) = result {
        tracing::debug!(%message, "port forward failed");
        let _ = error.write(Bytes::from(message)).await;
    }
    error.close().await;
    data.close().await;
}

/// Copies both ways until both directions are done.
async fn copy(tcp: TcpStream, mut input: InStream, out: OutStream) {
    let (mut r, mut w) = tcp.into_split();
    let up = async move {
        while let Some(b) = input.recv().await {
            if w.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    };
    let down = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out.write(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                        break;
                    }
                }
            }
        }
        out.close().await;
    };
    tokio::join!(up, down);
}
