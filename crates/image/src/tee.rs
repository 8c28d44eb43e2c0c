//! Hands a download's chunks to a blocking reader: the async side sends `Bytes` into a
//! bounded channel, a layer unpack on a blocking thread reads them through [`ChannelReader`].
//! The bound keeps memory flat: a download faster than its unpack waits for it.

use std::io::{self, Read};

use bytes::{Buf, Bytes};
use tokio::sync::mpsc;

/// Chunks in flight between a download and its unpack (HTTP chunks are 8-64 KiB).
pub(crate) const CHANNEL_CHUNKS: usize = 64;

/// A bounded channel whose receiving end reads as a byte stream.
pub(crate) fn channel() -> (mpsc::Sender<Bytes>, ChannelReader) {
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    (tx, ChannelReader { rx, current: Bytes::new() })
}

/// The receiving end: reads chunks in order, end of stream once every sender is gone.
/// Blocking: use it only off the async threads (`spawn_blocking`).
pub(crate) struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_chunks_in_order_then_eof() {
        let (tx, mut reader) = channel();
        let read = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            reader.read_to_end(&mut out).map(|_| out)
        });
        for chunk in [&b"hello "[..], b"", b"chunked ", b"world"] {
            tx.send(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        drop(tx);
        assert_eq!(read.await.unwrap().unwrap(), b"hello chunked world");
    }

    #[tokio::test]
    async fn sender_sees_a_gone_reader() {
        let (tx, reader) = channel();
        drop(reader);
        assert!(tx.send(Bytes::from_static(b"x")).await.is_err());
    }
}
