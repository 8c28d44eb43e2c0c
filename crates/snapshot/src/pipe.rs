//! Decompression on a thread of its own, so that inflating a layer overlaps hashing and
//! writing its files: on a busy pull these are the three largest costs, and in one thread
//! they add up.

use std::io::{self, Read};
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread;

use crate::SnapshotError;

/// Bytes per message between the decompressor and the tar reader.
const CHUNK: usize = 256 * 1024;
/// Messages in flight: bounds the memory a fast decompressor can fill.
const DEPTH: usize = 8;

/// Runs `decoder(input)` on a scoped thread and `consume` on this one, reading the
/// decompressed bytes. Decompression errors reach `consume` as read errors. When `consume`
/// returns early the thread notices at its next send and stops.
pub(crate) fn decode_in_thread<R, D, T>(
    origin: &Path,
    input: R,
    decoder: impl FnOnce(R) -> io::Result<D> + Send,
    consume: impl FnOnce(PipeReader) -> Result<T, SnapshotError>,
) -> Result<T, SnapshotError>
where
    R: Read + Send,
    D: Read,
{
    thread::scope(|scope| {
        let (tx, rx) = sync_channel(DEPTH);
        thread::Builder::new()
            .name("berth-decompress".into())
            .spawn_scoped(scope, move || produce(input, decoder, &tx))
            .map_err(|source| SnapshotError::Io {
                action: "start decompression thread",
                path: origin.to_owned(),
                source,
            })?;
        // `consume` owns the receiver and drops it when it returns, which ends the thread.
        consume(PipeReader { rx, current: Vec::new(), pos: 0 })
    })
}

/// The thread's side: decompress in `CHUNK`s and send them until the end, an error, or the
/// reader going away.
fn produce<R, D: Read>(
    input: R,
    decoder: impl FnOnce(R) -> io::Result<D>,
    tx: &SyncSender<io::Result<Vec<u8>>>,
) {
    let mut decoder = match decoder(input) {
        Ok(d) => d,
        Err(e) => {
            let _ = tx.send(Err(e));
            return;
        }
    };
    loop {
        let mut buf = vec![0u8; CHUNK];
        match fill(&mut decoder, &mut buf) {
            Ok(0) => return,
            Ok(n) => {
                buf.truncate(n);
                if tx.send(Ok(buf)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn fill(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The decompressed stream, as the thread sends it.
pub(crate) struct PipeReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    current: Vec<u8>,
    pos: usize,
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.pos == self.current.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.current = chunk?;
                    self.pos = 0;
                }
                // The thread is done: end of stream (its errors arrive as messages).
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_everything_through() {
        let data: Vec<u8> = (0..CHUNK * 3 + 17).map(|i| (i % 251) as u8).collect();
        let out = decode_in_thread(Path::new("x"), &data[..], Ok, |mut r| {
            let mut out = Vec::new();
            r.read_to_end(&mut out)
                .map_err(|source| SnapshotError::ReadLayer { blob: "x".into(), source })?;
            Ok(out)
        })
        .unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn decoder_errors_become_read_errors() {
        let err = decode_in_thread(
            Path::new("x"),
            &b"abc"[..],
            |_| Err::<&[u8], _>(io::Error::other("bad header")),
            |mut r| {
                let mut out = Vec::new();
                r.read_to_end(&mut out)
                    .map(|_| ())
                    .map_err(|source| SnapshotError::ReadLayer { blob: "x".into(), source })
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("bad header"), "{err}");
    }

    #[test]
    fn consumer_giving_up_stops_the_thread() {
        // Much more than the channel holds: the producer must not block forever.
        let data = vec![0u8; CHUNK * (DEPTH + 4)];
        let got = decode_in_thread(Path::new("x"), &data[..], Ok, |mut r| {
            let mut first = [0u8; 10];
            r.read_exact(&mut first).unwrap();
            Ok(first.len())
        })
        .unwrap();
        assert_eq!(got, 10);
    }
}
