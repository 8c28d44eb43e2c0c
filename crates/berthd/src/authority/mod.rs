//! Lets gRPC clients other than Go's talk to berthd: [`AuthorityFix`] sits between a CRI
//! connection and h2 and rewrites the one header h2 would refuse.
//!
//! h2 (under tonic) resets every stream whose `:authority` is not a valid URI authority with
//! `RST_STREAM PROTOCOL_ERROR`, before tonic or berthd see the call (hyperium/h2 PR 487,
//! open since 2020). Over a unix socket, grpc-core clients (Python grpcio, C++, Ruby...)
//! send the percent-encoded socket path (`%2Frun%2Fberth%2Fberth.sock`; `%` may not be in a
//! host name) and grpc-java the bare path: every call of theirs failed. Go's client sends
//! `localhost`.
//!
//! The adapter reads the client's HTTP/2 frames and passes everything through unchanged
//! except the header blocks, in which an invalid `:authority` value is replaced by one of the
//! same length whose bytes outside RFC 3986's unreserved set became `_`
//! (`_2Frun_2Fberth_2Fberth.sock`). The same length matters: h2's HPACK dynamic table then
//! holds entries of the sizes the client's encoder counts with, so evictions and later
//! indexed references stay in step, and the sanitised value is what later references
//! resolve to. Anything it does not understand (no HTTP/2 preface, a malformed header
//! block, a block above [`MAX_BLOCK`]) is passed on as it came, for h2 to judge.

mod huffman_table;

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::codegen::http::uri::Authority;

/// The client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame payload a server accepts without saying otherwise (h2's default too):
/// rewritten blocks are cut into frames no larger.
const MAX_FRAME: usize = 16_384;
/// The largest header block rewritten; a larger one is passed on as it is.
pub const MAX_BLOCK: usize = 256 << 10;

/// A header block being collected (a HEADERS frame and its CONTINUATIONs).
struct Block {
    /// The frames as they came, to pass on if the block is left alone.
    raw: Vec<u8>,
    /// The HPACK fragment, padding and priority removed.
    fragment: Vec<u8>,
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
}

enum State {
    /// Waiting for the client preface.
    Preface,
    /// Reading frames: `passthrough` payload bytes of the current frame still go through
    /// untouched; `block` is a header block waiting for its CONTINUATION frames.
    Frames { passthrough: usize, block: Option<Block> },
    /// Everything passes through unchanged.
    Off,
}

/// A connection whose incoming HTTP/2 header blocks get a valid `:authority` (see the
/// module docs). Writes go straight through.
pub struct AuthorityFix<S> {
    inner: S,
    /// Bytes read from `inner`, not looked at yet.
    input: Vec<u8>,
    /// Bytes ready for h2; `out_pos` of them are handed out already.
    output: Vec<u8>,
    out_pos: usize,
    state: State,
    eof: bool,
}

impl<S> AuthorityFix<S> {
    /// Wraps a freshly accepted connection.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            input: Vec::new(),
            output: Vec::new(),
            out_pos: 0,
            state: State::Preface,
            eof: false,
        }
    }

    /// Moves input to output as far as it can be judged; whether anything moved.
    fn process(&mut self) -> bool {
        match &mut self.state {
            State::Off => {
                if self.input.is_empty() {
                    return false;
                }
                self.output.append(&mut self.input);
                true
            }
            State::Preface => {
                let n = self.input.len().min(PREFACE.len());
                if self.input[..n] != PREFACE[..n] {
                    self.state = State::Off;
                    return true;
                }
                if n < PREFACE.len() {
                    return false;
                }
                self.output.extend(self.input.drain(..n));
                self.state = State::Frames { passthrough: 0, block: None };
                true
            }
            State::Frames { passthrough, block } => {
                if *passthrough > 0 {
                    let n = (*passthrough).min(self.input.len());
                    self.output.extend(self.input.drain(..n));
                    *passthrough -= n;
                    return n > 0;
                }
                if self.input.len() < 9 {
                    return false;
                }
                let len = usize::from(self.input[0]) << 16
                    | usize::from(self.input[1]) << 8
                    | usize::from(self.input[2]);
                let (kind, flags) = (self.input[3], self.input[4]);
                let stream = u32::from_be_bytes([
                    self.input[5],
                    self.input[6],
                    self.input[7],
                    self.input[8],
                ]) & 0x7fff_ffff;
                let collecting = block.is_some();
                let header_frame = match kind {
                    HEADERS => !collecting,
                    CONTINUATION => {
                        collecting && block.as_ref().is_some_and(|b| b.stream == stream)
                    }
                    _ => false,
                };
                if !header_frame {
                    if let Some(b) = block.take() {
                        // Only CONTINUATION may follow an unfinished block: h2 will say so.
                        self.output.extend(b.raw);
                        self.state = State::Off;
                        return true;
                    }
                    self.output.extend(self.input.drain(..9));
                    *passthrough = len;
                    return true;
                }
                let buffered = block.as_ref().map_or(0, |b| b.raw.len());
                if buffered + 9 + len > MAX_BLOCK {
                    if let Some(b) = block.take() {
                        self.output.extend(b.raw);
                    }
                    self.state = State::Off;
                    return true;
                }
                if self.input.len() < 9 + len {
                    return false;
                }
                let frame: Vec<u8> = self.input.drain(..9 + len).collect();
                let b = match block.take() {
                    Some(mut b) => {
                        b.fragment.extend_from_slice(&frame[9..]);
                        b.raw.extend_from_slice(&frame);
                        b
                    }
                    None => {
                        let Some((fragment, priority)) = headers_fragment(flags, &frame[9..])
                        else {
                            self.output.extend(frame);
                            self.state = State::Off;
                            return true;
                        };
                        Block {
                            fragment: fragment.to_vec(),
                            stream,
                            end_stream: flags & END_STREAM != 0,
                            priority,
                            raw: frame,
                        }
                    }
                };
                if flags & END_HEADERS == 0 {
                    *block = Some(b);
                    return true;
                }
                match rewrite_block(&b.fragment) {
                    Some(fragment) => {
                        write_frames(&mut self.output, &b, &fragment);
                    }
                    None => self.output.extend(b.raw),
                }
                true
            }
        }
    }
}

/// The HPACK fragment of a HEADERS frame's payload and its priority fields; `None` when the
/// padding does not fit.
fn headers_fragment(flags: u8, payload: &[u8]) -> Option<(&[u8], Option<[u8; 5]>)> {
    let mut rest = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&p, r) = rest.split_first()?;
        pad = usize::from(p);
        rest = r;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let p: [u8; 5] = rest.get(..5)?.try_into().ok()?;
        priority = Some(p);
        rest = &rest[5..];
    }
    let end = rest.len().checked_sub(pad)?;
    Some((&rest[..end], priority))
}

/// Writes `fragment` as the block `b`: a HEADERS frame (END_STREAM and priority kept,
/// padding dropped) and CONTINUATION frames, none above [`MAX_FRAME`].
fn write_frames(out: &mut Vec<u8>, b: &Block, fragment: &[u8]) {
    let first_room = MAX_FRAME - if b.priority.is_some() { 5 } else { 0 };
    let (first, mut rest) = fragment.split_at(fragment.len().min(first_room));
    let mut flags = if b.end_stream { END_STREAM } else { 0 };
    if b.priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    let priority = b.priority.as_ref().map_or(&[][..], |p| &p[..]);
    frame_header(out, priority.len() + first.len(), HEADERS, flags, b.stream);
    out.extend_from_slice(priority);
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, r) = rest.split_at(rest.len().min(MAX_FRAME));
        rest = r;
        let flags = if rest.is_empty() { END_HEADERS } else { 0 };
        frame_header(out, chunk.len(), CONTINUATION, flags, b.stream);
        out.extend_from_slice(chunk);
    }
}

fn frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// An HPACK integer with an `n`-bit prefix at `block[at..]`: its value and length in bytes.
fn integer(block: &[u8], at: usize, n: u32) -> Option<(usize, usize)> {
    let mask = (1usize << n) - 1;
    let mut value = usize::from(*block.get(at)?) & mask;
    if value < mask {
        return Some((value, 1));
    }
    let mut shift = 0;
    let mut i = at + 1;
    loop {
        let b = *block.get(i)?;
        i += 1;
        value = value.checked_add(usize::from(b & 0x7f).checked_shl(shift)?)?;
        if b & 0x80 == 0 {
            return Some((value, i - at));
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
}

/// An HPACK string literal at `block[at..]`: its decoded bytes and its length in bytes.
fn string(block: &[u8], at: usize) -> Option<(Vec<u8>, usize)> {
    let huffman = *block.get(at)? & 0x80 != 0;
    let (len, prefix) = integer(block, at, 7)?;
    let start = at + prefix;
    let bytes = block.get(start..start.checked_add(len)?)?;
    let decoded = if huffman { huffman_decode(bytes)? } else { bytes.to_vec() };
    Some((decoded, prefix + len))
}

/// The Huffman code as a map from (bit length, code) to byte.
fn huffman_codes() -> &'static HashMap<(u8, u32), u8> {
    static CODES: OnceLock<HashMap<(u8, u32), u8>> = OnceLock::new();
    CODES.get_or_init(|| {
        (0..=255u8)
            .map(|b| {
                let i = usize::from(b);
                ((huffman_table::ENCODE_CODE_LENGTHS[i], huffman_table::ENCODE_CODES[i]), b)
            })
            .collect()
    })
}

/// Decodes a Huffman-coded string; `None` if it is not valid (RFC 7541, 5.2).
fn huffman_decode(bytes: &[u8]) -> Option<Vec<u8>> {
    let codes = huffman_codes();
    let mut out = Vec::with_capacity(bytes.len() * 8 / 5);
    let (mut code, mut len) = (0u32, 0u8);
    for byte in bytes {
        for shift in (0..8).rev() {
            code = code << 1 | u32::from(byte >> shift & 1);
            len += 1;
            if len >= 5
                && let Some(&b) = codes.get(&(len, code))
            {
                out.push(b);
                (code, len) = (0, 0);
            } else if len > 30 {
                return None;
            }
        }
    }
    // What is left must be padding: fewer than 8 bits, all ones (a prefix of EOS).
    (len < 8 && code == (1u32 << len) - 1).then_some(out)
}

/// `value` with every byte outside RFC 3986's unreserved set replaced by `_`: a host name
/// of the same length that h2 accepts.
fn sanitised(value: &[u8]) -> Vec<u8> {
    value
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                b
            } else {
                b'_'
            }
        })
        .collect()
}

/// The header block with every invalid literal `:authority` value sanitised; `None` when
/// there is none to change or the block does not parse (h2 then judges the original).
pub fn rewrite_block(block: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(block.len() + 16);
    let mut changed = false;
    let mut i = 0;
    while i < block.len() {
        let b = block[i];
        let prefix = if b & 0x80 != 0 {
            // Indexed field: one integer.
            let (_, n) = integer(block, i, 7)?;
            out.extend_from_slice(&block[i..i + n]);
            i += n;
            continue;
        } else if b & 0xc0 == 0x40 {
            6 // literal with incremental indexing
        } else if b & 0xe0 == 0x20 {
            // Dynamic table size update: one integer.
            let (_, n) = integer(block, i, 5)?;
            out.extend_from_slice(&block[i..i + n]);
            i += n;
            continue;
        } else {
            4 // literal without indexing, or never indexed
        };
        let start = i;
        let (index, n) = integer(block, i, prefix)?;
        i += n;
        // Static index 1 is `:authority`; a literal name may spell it too. (A dynamic-table
        // name is not followed: no client names :authority that way.)
        let is_authority = if index == 0 {
            let (name, n) = string(block, i)?;
            i += n;
            name == b":authority"
        } else {
            index == 1
        };
        let value_at = i;
        let (value, n) = string(block, i)?;
        i += n;
        if is_authority && !value.is_empty() && Authority::try_from(value.as_slice()).is_err() {
            out.extend_from_slice(&block[start..value_at]);
            let fixed = sanitised(&value);
            // A plain (not Huffman-coded) string: the length with a 7-bit prefix, H = 0.
            encode_integer(&mut out, fixed.len(), 7, 0);
            out.extend_from_slice(&fixed);
            changed = true;
        } else {
            out.extend_from_slice(&block[start..i]);
        }
    }
    changed.then_some(out)
}

/// Appends an HPACK integer with an `n`-bit prefix, `high` holding the bits above it.
fn encode_integer(out: &mut Vec<u8>, value: usize, n: u32, high: u8) {
    let mask = (1usize << n) - 1;
    if value < mask {
        out.push(high | value as u8);
        return;
    }
    out.push(high | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.output.len() {
                let n = buf.remaining().min(this.output.len() - this.out_pos);
                buf.put_slice(&this.output[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.output.len() {
                    this.output.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.process() {
                continue;
            }
            if this.eof {
                // A frame cut short by the end of the connection: h2 sees it as it came.
                if !this.input.is_empty() {
                    this.output.append(&mut this.input);
                    continue;
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
            } else {
                this.input.extend_from_slice(read.filled());
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for AuthorityFix<tokio::net::UnixStream> {
    type ConnectInfo = <tokio::net::UnixStream as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests;
