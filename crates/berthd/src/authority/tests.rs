use tokio::io::AsyncWriteExt;

use super::*;

/// Huffman-codes `bytes` (RFC 7541, 5.2), for the tests.
fn huffman_encode(bytes: &[u8]) -> Vec<u8> {
    let (mut acc, mut bits, mut out) = (0u64, 0u32, Vec::new());
    for &b in bytes {
        let i = usize::from(b);
        acc = acc << huffman_table::ENCODE_CODE_LENGTHS[i]
            | u64::from(huffman_table::ENCODE_CODES[i]);
        bits += u32::from(huffman_table::ENCODE_CODE_LENGTHS[i]);
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        out.push((acc << (8 - bits)) as u8 | (0xff >> bits));
    }
    out
}

/// An HPACK string literal, Huffman-coded or not.
fn hpack_string(value: &[u8], huffman: bool) -> Vec<u8> {
    let body = if huffman { huffman_encode(value) } else { value.to_vec() };
    let mut out = Vec::new();
    encode_integer(&mut out, body.len(), 7, if huffman { 0x80 } else { 0 });
    out.extend(body);
    out
}

/// A gRPC unary call's header block as grpc-core sends it: `:authority` and `:path` as
/// literals with incremental indexing (static names), `te` with a literal name.
fn call_block(authority: &[u8], huffman: bool) -> Vec<u8> {
    let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
    b.push(0x44); // :path, indexed name 4
    b.extend(hpack_string(b"/runtime.v1.RuntimeService/Version", huffman));
    b.push(0x41); // :authority, indexed name 1
    b.extend(hpack_string(authority, huffman));
    b.push(0x5f); // content-type, indexed name 31
    b.extend(hpack_string(b"application/grpc", huffman));
    b.push(0x40); // te, literal name
    b.extend(hpack_string(b"te", false));
    b.extend(hpack_string(b"trailers", false));
    b
}

#[test]
fn huffman_round_trips() {
    for s in [&b""[..], b"localhost", b"%2Frun%2Fberth%2Fberth.sock", b"\x00\xff weird \x7f"] {
        assert_eq!(huffman_decode(&huffman_encode(s)).as_deref(), Some(s), "{s:?}");
    }
    // Padding that is not a prefix of EOS is an error.
    assert_eq!(huffman_decode(&[0x00]), None);
}

#[test]
fn an_invalid_authority_gets_a_same_length_host() {
    for huffman in [false, true] {
        let block = call_block(b"%2Frun%2Fberth%2Fberth.sock", huffman);
        let fixed = rewrite_block(&block).expect("rewritten");
        let want = call_block(b"_2Frun_2Fberth_2Fberth.sock", huffman);
        if !huffman {
            assert_eq!(fixed, want);
        }
        // Whatever the coding, the value decodes to the sanitised one.
        let at = fixed.iter().position(|&b| b == 0x41).expect(":authority");
        let (value, _) = string(&fixed, at + 1).expect("value");
        assert_eq!(value, b"_2Frun_2Fberth_2Fberth.sock");
    }
    // grpc-java's bare path, and a literal `:authority` name.
    let mut block = vec![0x00];
    block.extend(hpack_string(b":authority", true));
    block.extend(hpack_string(b"/run/berth/berth.sock", false));
    let fixed = rewrite_block(&block).expect("rewritten");
    let (value, _) = string(&fixed, 1 + string(&fixed, 1).expect("name").1).expect("value");
    assert_eq!(value, b"_run_berth_berth.sock");
}

#[test]
fn valid_or_unparsable_blocks_are_left_alone() {
    assert_eq!(rewrite_block(&call_block(b"localhost", false)), None);
    assert_eq!(rewrite_block(&call_block(b"[::1]:50051", true)), None);
    assert_eq!(rewrite_block(&[0x41]), None);
    assert_eq!(rewrite_block(&[0x41, 0x7f, 0xff, 0xff, 0xff, 0xff, 0x7f]), None);
    assert_eq!(rewrite_block(&[]), None);
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame_header(&mut out, payload.len(), kind, flags, stream);
    out.extend_from_slice(payload);
    out
}

/// The bytes a client sends for two calls with `authority`: the second refers to the
/// first's header fields through HPACK's dynamic table, the first's block is split over a
/// padded HEADERS frame and a CONTINUATION.
fn two_calls(authority: &[u8]) -> Vec<u8> {
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    let block = call_block(authority, false);
    let (a, b) = block.split_at(7);
    let mut padded = vec![3];
    padded.extend_from_slice(a);
    padded.extend_from_slice(&[0, 0, 0]);
    bytes.extend(frame(HEADERS, PADDED, 1, &padded));
    bytes.extend(frame(CONTINUATION, END_HEADERS, 1, b));
    bytes.extend(frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]));
    // Dynamic table, newest first: te (62), content-type (63), :authority (64), :path (65).
    bytes.extend(frame(HEADERS, END_HEADERS, 3, &[0x83, 0x86, 0xc1, 0xc0, 0xbf, 0xbe]));
    bytes.extend(frame(0x0, END_STREAM, 3, &[0, 0, 0, 0, 0]));
    bytes
}

/// h2's own server takes both calls through the adapter, and sees the sanitised authority
/// on both; without the adapter it resets them.
#[tokio::test]
async fn h2_accepts_what_it_refused() {
    for (fixed, want) in [(true, Some("_2Frun_2Fberth.sock")), (false, None)] {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(&two_calls(b"%2Frun%2Fberth.sock")).await.expect("write");
        let serve = async move {
            let mut authorities = Vec::new();
            let mut conn = if fixed {
                let io: Box<dyn Io> = Box::new(AuthorityFix::new(server));
                h2::server::handshake(io).await.expect("handshake")
            } else {
                let io: Box<dyn Io> = Box::new(server);
                h2::server::handshake(io).await.expect("handshake")
            };
            let accept = async {
                while let Some(Ok((request, mut respond))) = conn.accept().await {
                    authorities.push(request.uri().authority().map(|a| a.to_string()));
                    let _ = respond.send_response(http_response(), true);
                    if authorities.len() == 2 {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), accept).await;
            authorities
        };
        let got = serve.await;
        match want {
            Some(authority) => assert_eq!(got, vec![Some(authority.to_string()); 2]),
            None => assert!(got.is_empty(), "{got:?}"),
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

fn http_response() -> tonic::codegen::http::Response<()> {
    tonic::codegen::http::Response::new(())
}

/// Frames other than header blocks pass byte for byte, however they are cut by reads.
#[tokio::test]
async fn everything_else_passes_unchanged() {
    use tokio::io::AsyncReadExt;
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]));
    bytes.extend(frame(HEADERS, END_HEADERS, 1, &call_block(b"localhost", true)));
    bytes.extend(frame(0x0, 0, 1, &[7; 40_000]));
    bytes.extend(frame(0x8, 0, 0, &[0, 0, 1, 0])); // WINDOW_UPDATE
    let (mut client, server) = tokio::io::duplex(977);
    let sent = bytes.clone();
    let writer = tokio::spawn(async move {
        client.write_all(&sent).await.expect("write");
    });
    let mut fix = AuthorityFix::new(server);
    let mut got = vec![0u8; bytes.len()];
    fix.read_exact(&mut got).await.expect("read");
    writer.await.expect("writer");
    assert_eq!(got, bytes);

    // Not HTTP/2 at all: passed on for h2 to refuse.
    let (mut client, server) = tokio::io::duplex(64);
    client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
    drop(client);
    let mut got = Vec::new();
    AuthorityFix::new(server).read_to_end(&mut got).await.expect("read");
    assert_eq!(got, b"GET / HTTP/1.1\r\n\r\n");
}

/// The table decodes the RFC's own examples (RFC 7541, C.4.1 and C.4.2).
#[test]
fn huffman_table_decodes_the_rfc_examples() {
    let www = [0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff];
    assert_eq!(huffman_decode(&www).as_deref(), Some(b"www.example.com".as_slice()));
    let no_cache = [0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf];
    assert_eq!(huffman_decode(&no_cache).as_deref(), Some(b"no-cache".as_slice()));
}
