//! SPDY/3.1 frames: parsing and writing, and the zlib-compressed header blocks.
//!
//! A control frame is `1 | version(15) | type(16) | flags(8) | length(24) | body`, a data frame
//! `0 | stream id(31) | flags(8) | length(24) | data`. Header blocks are one zlib stream per
//! direction for the whole connection, primed with the SPDY/3 dictionary, each block ended by
//! a sync flush.

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::dictionary::dictionary;
use crate::StreamError;

/// The SPDY version we speak.
const VERSION: u16 = 3;
/// Last frame of a stream from its sender.
pub const FLAG_FIN: u8 = 0x01;
/// SYN_STREAM: the receiver may not send on it.
const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// Largest decompressed header block we accept: the headers here are a handful of short ones.
const MAX_HEADER_BLOCK: usize = 64 << 10;

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;

/// RST_STREAM status: the stream was refused (e.g. an id that goes backwards).
pub(crate) const RST_PROTOCOL_ERROR: u32 = 1;
/// RST_STREAM status: the stream is no longer wanted.
pub(crate) const RST_CANCEL: u32 = 5;

/// Header names (lower case, as SPDY/3 requires) and values.
pub type Headers = Vec<(String, String)>;

/// One SPDY frame (stream ids without their reserved top bit).
#[allow(missing_docs)] // the fields are the spec's
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated: u32,
        priority: u8,
        fin: bool,
        unidirectional: bool,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        entries: Vec<(u8, u32, u32)>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        fin: bool,
        data: Bytes,
    },
    /// A control frame of a type we do not know: ignored, as the spec asks.
    Unknown {
        kind: u16,
    },
}

/// Reads frames, inflating header blocks with the connection's receive-side zlib stream.
pub struct FrameReader {
    inflate: Decompress,
}

impl FrameReader {
    /// A reader at the start of a connection.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        FrameReader { inflate: Decompress::new(true) }
    }

    /// The next frame; `None` at a clean end of the connection between frames.
    pub async fn read<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
    ) -> Result<Option<Frame>, StreamError> {
        let mut head = [0u8; 8];
        match r.read(&mut head[..1]).await? {
            0 => return Ok(None),
            _ => r.read_exact(&mut head[1..]).await?,
        };
        let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await?;
        self.decode(head, body).map(Some)
    }

    /// A frame from its 8-byte head and its body.
    pub fn decode(&mut self, head: [u8; 8], body: Vec<u8>) -> Result<Frame, StreamError> {
        let flags = head[4];
        let fin = flags & FLAG_FIN != 0;
        if head[0] & 0x80 == 0 {
            let stream_id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
            return Ok(Frame::Data { stream_id, fin, data: Bytes::from(body) });
        }
        let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
        if version != VERSION {
            return Err(StreamError::Protocol(format!("SPDY version {version}")));
        }
        let kind = u16::from_be_bytes([head[2], head[3]]);
        let mut b = Body(&body);
        Ok(match kind {
            SYN_STREAM => {
                let stream_id = b.u32()? & 0x7fff_ffff;
                let associated = b.u32()? & 0x7fff_ffff;
                let priority = b.u8()? >> 5;
                let _slot = b.u8()?;
                let headers = self.headers(b.0)?;
                let unidirectional = flags & FLAG_UNIDIRECTIONAL != 0;
                Frame::SynStream { stream_id, associated, priority, fin, unidirectional, headers }
            }
            SYN_REPLY => {
                let stream_id = b.u32()? & 0x7fff_ffff;
                Frame::SynReply { stream_id, fin, headers: self.headers(b.0)? }
            }
            HEADERS => {
                let stream_id = b.u32()? & 0x7fff_ffff;
                Frame::Headers { stream_id, fin, headers: self.headers(b.0)? }
            }
            RST_STREAM => Frame::RstStream { stream_id: b.u32()? & 0x7fff_ffff, status: b.u32()? },
            SETTINGS => {
                let n = b.u32()?;
                let mut entries = Vec::new();
                for _ in 0..n {
                    let id = b.u32()?;
                    entries.push(((id >> 24) as u8, id & 0x00ff_ffff, b.u32()?));
                }
                Frame::Settings { entries }
            }
            PING => Frame::Ping { id: b.u32()? },
            GOAWAY => Frame::GoAway { last_stream_id: b.u32()? & 0x7fff_ffff, status: b.u32()? },
            WINDOW_UPDATE => Frame::WindowUpdate {
                stream_id: b.u32()? & 0x7fff_ffff,
                delta: b.u32()? & 0x7fff_ffff,
            },
            kind => Frame::Unknown { kind },
        })
    }

    /// Inflates and parses one header block.
    fn headers(&mut self, compressed: &[u8]) -> Result<Headers, StreamError> {
        let block = self.inflate_block(compressed)?;
        let mut b = Body(&block);
        let n = b.u32()?;
        let mut headers = Vec::new();
        for _ in 0..n {
            let name = b.string()?.to_ascii_lowercase();
            let value = b.string()?;
            headers.push((name, value));
        }
        Ok(headers)
    }

    fn inflate_block(&mut self, input: &[u8]) -> Result<Vec<u8>, StreamError> {
        let bad = |what: String| StreamError::Protocol(format!("header block: {what}"));
        let mut out = Vec::with_capacity(input.len() * 4 + 256);
        let mut pos = 0;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(bad("too large".into()));
                }
                out.reserve(out.capacity());
            }
            let before = self.inflate.total_in();
            let result =
                self.inflate.decompress_vec(&input[pos..], &mut out, FlushDecompress::Sync);
            pos += (self.inflate.total_in() - before) as usize;
            match result {
                Ok(Status::StreamEnd) => return Err(bad("zlib stream ended".into())),
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate.set_dictionary(dictionary()).map_err(|e| bad(e.to_string()))?;
                }
                Err(e) => return Err(bad(e.to_string())),
            }
            // All input taken and room left over: the block is complete.
            if pos >= input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }
}

/// Writes frames, deflating header blocks with the connection's send-side zlib stream.
pub struct FrameWriter {
    deflate: Compress,
}

impl FrameWriter {
    /// A writer at the start of a connection.
    pub fn new() -> Result<Self, StreamError> {
        let mut deflate = Compress::new(Compression::default(), true);
        deflate
            .set_dictionary(dictionary())
            .map_err(|e| StreamError::Protocol(format!("zlib dictionary: {e}")))?;
        Ok(FrameWriter { deflate })
    }

    /// Appends `frame`'s bytes to `out`.
    pub fn encode(&mut self, frame: &Frame, out: &mut Vec<u8>) -> Result<(), StreamError> {
        let mut body = Vec::new();
        let (kind, flags) = match frame {
            Frame::Data { stream_id, fin, data } => {
                out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                push_flags_len(out, if *fin { FLAG_FIN } else { 0 }, data.len())?;
                out.extend_from_slice(data);
                return Ok(());
            }
            Frame::SynStream { stream_id, associated, priority, fin, unidirectional, headers } => {
                body.extend_from_slice(&stream_id.to_be_bytes());
                body.extend_from_slice(&associated.to_be_bytes());
                body.extend_from_slice(&[priority << 5, 0]);
                self.headers(headers, &mut body)?;
                let flags =
                    (u8::from(*fin) * FLAG_FIN) | (u8::from(*unidirectional) * FLAG_UNIDIRECTIONAL);
                (SYN_STREAM, flags)
            }
            Frame::SynReply { stream_id, fin, headers } => {
                body.extend_from_slice(&stream_id.to_be_bytes());
                self.headers(headers, &mut body)?;
                (SYN_REPLY, u8::from(*fin) * FLAG_FIN)
            }
            Frame::Headers { stream_id, fin, headers } => {
                body.extend_from_slice(&stream_id.to_be_bytes());
                self.headers(headers, &mut body)?;
                (HEADERS, u8::from(*fin) * FLAG_FIN)
            }
            Frame::RstStream { stream_id, status } => {
                body.extend_from_slice(&stream_id.to_be_bytes());
                body.extend_from_slice(&status.to_be_bytes());
                (RST_STREAM, 0)
            }
            Frame::Settings { entries } => {
                body.extend_from_slice(&(entries.len() as u32).to_be_bytes());
                for (flags, id, value) in entries {
                    body.extend_from_slice(
                        &((u32::from(*flags) << 24) | (id & 0x00ff_ffff)).to_be_bytes(),
                    );
                    body.extend_from_slice(&value.to_be_bytes());
                }
                (SETTINGS, 0)
            }
            Frame::Ping { id } => {
                body.extend_from_slice(&id.to_be_bytes());
                (PING, 0)
            }
            Frame::GoAway { last_stream_id, status } => {
                body.extend_from_slice(&last_stream_id.to_be_bytes());
                body.extend_from_slice(&status.to_be_bytes());
                (GOAWAY, 0)
            }
            Frame::WindowUpdate { stream_id, delta } => {
                body.extend_from_slice(&stream_id.to_be_bytes());
                body.extend_from_slice(&delta.to_be_bytes());
                (WINDOW_UPDATE, 0)
            }
            Frame::Unknown { kind } => {
                return Err(StreamError::Protocol(format!("cannot send frame type {kind}")));
            }
        };
        out.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        push_flags_len(out, flags, body.len())?;
        out.extend_from_slice(&body);
        Ok(())
    }

    /// Serialises and deflates a header block into `out`.
    fn headers(&mut self, headers: &Headers, out: &mut Vec<u8>) -> Result<(), StreamError> {
        let mut block = Vec::new();
        block.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (name, value) in headers {
            for s in [name.to_ascii_lowercase().as_str(), value.as_str()] {
                block.extend_from_slice(&(s.len() as u32).to_be_bytes());
                block.extend_from_slice(s.as_bytes());
            }
        }
        let start = out.len();
        out.reserve(block.len() + 64);
        let mut pos = 0;
        loop {
            if out.len() == out.capacity() {
                out.reserve(out.capacity() - start + 64);
            }
            let before = self.deflate.total_in();
            self.deflate
                .compress_vec(&block[pos..], out, FlushCompress::Sync)
                .map_err(|e| StreamError::Protocol(format!("deflate: {e}")))?;
            pos += (self.deflate.total_in() - before) as usize;
            if pos >= block.len() && out.len() < out.capacity() {
                return Ok(());
            }
        }
    }
}

/// Appends `flags(8) | length(24)`.
fn push_flags_len(out: &mut Vec<u8>, flags: u8, len: usize) -> Result<(), StreamError> {
    if len >= 1 << 24 {
        return Err(StreamError::Protocol(format!("frame of {len} bytes")));
    }
    let l = (len as u32).to_be_bytes();
    out.extend_from_slice(&[flags, l[1], l[2], l[3]]);
    Ok(())
}

/// A cursor over a frame body.
struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StreamError> {
        if self.0.len() < n {
            return Err(StreamError::Protocol("truncated frame".into()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, StreamError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, StreamError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self) -> Result<String, StreamError> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| StreamError::Protocol("header is not UTF-8".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    async fn roundtrip(frames: &[Frame]) -> Vec<Frame> {
        let mut w = FrameWriter::new().unwrap();
        let mut wire = Vec::new();
        for f in frames {
            w.encode(f, &mut wire).unwrap();
        }
        let mut r = FrameReader::new();
        let mut src = &wire[..];
        let mut got = Vec::new();
        while let Some(f) = r.read(&mut src).await.unwrap() {
            got.push(f);
        }
        got
    }

    #[tokio::test]
    async fn every_frame_type_round_trips() {
        let frames = vec![
            Frame::SynStream {
                stream_id: 1,
                associated: 0,
                priority: 2,
                fin: false,
                unidirectional: false,
                headers: headers(&[("streamtype", "error"), ("port", "80")]),
            },
            // A second block: the zlib stream carries on from the first.
            Frame::SynStream {
                stream_id: 3,
                associated: 0,
                priority: 0,
                fin: true,
                unidirectional: true,
                headers: headers(&[("streamtype", "stdout")]),
            },
            Frame::SynReply { stream_id: 1, fin: false, headers: vec![] },
            Frame::Headers { stream_id: 3, fin: true, headers: headers(&[("a", "b")]) },
            Frame::RstStream { stream_id: 3, status: RST_CANCEL },
            Frame::Settings { entries: vec![(1, 7, 65536), (0, 4, 100)] },
            Frame::Ping { id: 9 },
            Frame::GoAway { last_stream_id: 3, status: 0 },
            Frame::WindowUpdate { stream_id: 1, delta: 1000 },
            Frame::Data { stream_id: 1, fin: false, data: Bytes::from_static(b"hello") },
            Frame::Data { stream_id: 1, fin: true, data: Bytes::new() },
        ];
        assert_eq!(roundtrip(&frames).await, frames);
    }

    #[tokio::test]
    async fn data_frame_bytes_are_as_specified() {
        let mut w = FrameWriter::new().unwrap();
        let mut wire = Vec::new();
        let data = Bytes::from_static(b"hi");
        w.encode(&Frame::Data { stream_id: 5, fin: true, data }, &mut wire).unwrap();
        assert_eq!(wire, [0, 0, 0, 5, FLAG_FIN, 0, 0, 2, b'h', b'i']);
        wire.clear();
        w.encode(&Frame::Ping { id: 7 }, &mut wire).unwrap();
        assert_eq!(wire, [0x80, 3, 0, 6, 0, 0, 0, 4, 0, 0, 0, 7]);
    }

    #[tokio::test]
    async fn header_names_are_lower_cased() {
        let f = Frame::SynReply {
            stream_id: 1,
            fin: false,
            headers: headers(&[("StreamType", "data")]),
        };
        let got = roundtrip(&[f]).await;
        assert_eq!(
            got,
            [Frame::SynReply {
                stream_id: 1,
                fin: false,
                headers: headers(&[("streamtype", "data")])
            }]
        );
    }

    #[test]
    fn bad_frames_are_errors() {
        let mut r = FrameReader::new();
        // Version 2.
        assert!(r.decode([0x80, 2, 0, 6, 0, 0, 0, 4], vec![0, 0, 0, 1]).is_err());
        // A PING without its id.
        assert!(r.decode([0x80, 3, 0, 6, 0, 0, 0, 2], vec![0, 0]).is_err());
        // A header block that is not zlib.
        assert!(r.decode([0x80, 3, 0, 2, 0, 0, 0, 8], vec![0, 0, 0, 1, 1, 2, 3, 4]).is_err());
        // Unknown control frames are skipped.
        assert_eq!(
            r.decode([0x80, 3, 0, 42, 0, 0, 0, 0], vec![]).unwrap(),
            Frame::Unknown { kind: 42 }
        );
    }

    #[tokio::test]
    async fn a_frame_cut_short_is_an_error() {
        let mut w = FrameWriter::new().unwrap();
        let mut wire = Vec::new();
        w.encode(&Frame::Ping { id: 1 }, &mut wire).unwrap();
        let mut src = &wire[..6];
        assert!(FrameReader::new().read(&mut src).await.is_err());
    }
}
