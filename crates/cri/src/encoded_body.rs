//! The gRPC response body of a list the runtime keeps encoded ([`berth_runtime::Encoded`]):
//! the message bytes go to HTTP/2 as they are, without tonic's encoder copying them into a
//! buffer of its own first (for 1000 containers that copy was ~400 KB per call).
//!
//! A unary gRPC response body is one length-prefixed message, then trailers carrying
//! `grpc-status: 0`. The prefix is glued to the start of the message in a first chunk of one
//! HTTP/2 frame's size, so the frames on the wire are the same as tonic's; the rest of the
//! message follows as one zero-copy chunk, which h2 cuts into frames.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use berth_runtime::{Encoded, ListLayout};
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame};
use prost::Message;

/// Size of the gRPC message prefix: compression flag (1 byte) and length (4 bytes, big endian).
const PREFIX_LEN: usize = 5;

/// HTTP/2's default and smallest SETTINGS_MAX_FRAME_SIZE (16 KiB), which grpc-go and hyper
/// clients keep: the first chunk is exactly one frame.
const FIRST_CHUNK: usize = 16 * 1024;

/// Lets `Bytes` borrow an [`Encoded`] message's buffer instead of copying it.
struct Owner<T>(Encoded<T>);

impl<T> AsRef<[u8]> for Owner<T>
where
    T: ListLayout + Message + Default,
{
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// `message`'s bytes, without a copy.
pub(crate) fn message_bytes<T>(message: Encoded<T>) -> Bytes
where
    T: ListLayout + Message + Default + Send + 'static,
{
    Bytes::from_owner(Owner(message))
}

/// The body of a successful unary response carrying one pre-encoded message.
#[derive(Debug)]
pub(crate) struct EncodedBody {
    data: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
}

/// Why a message cannot be sent.
#[derive(Debug, thiserror::Error)]
#[error("a gRPC message holds at most 4 GiB; this one has {0} bytes")]
pub(crate) struct TooLarge(usize);

impl EncodedBody {
    /// The body that sends `bytes`, one protobuf message.
    pub(crate) fn new(bytes: Bytes) -> Result<Self, TooLarge> {
        let len = bytes.len();
        let prefix_len = u32::try_from(len).map_err(|_| TooLarge(len))?;
        let split = len.min(FIRST_CHUNK - PREFIX_LEN);
        let mut first = BytesMut::with_capacity(PREFIX_LEN + split);
        first.put_u8(0); // not compressed
        first.put_u32(prefix_len);
        first.put_slice(&bytes[..split]);
        let mut data = VecDeque::from([first.freeze()]);
        if split < len {
            data.push_back(bytes.slice(split..));
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        Ok(Self { data, trailers: Some(trailers) })
    }
}

impl Body for EncodedBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = match this.data.pop_front() {
            Some(chunk) => Some(Frame::data(chunk)),
            None => this.trailers.take().map(Frame::trailers),
        };
        Poll::Ready(frame.map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty() && self.trailers.is_none()
    }

    // No exact size hint: hyper would turn it into a `content-length` header, which
    // tonic's responses never carry.
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use k8s_cri::v1::{Container, ListContainersResponse};

    use super::*;

    fn list(n: usize) -> ListContainersResponse {
        let containers = (0..n)
            .map(|i| Container {
                id: format!("{i:064}"),
                labels: [("app".to_string(), "x".repeat(100))].into(),
                ..Default::default()
            })
            .collect();
        ListContainersResponse { containers }
    }

    /// Collects the body: its data in one buffer, the chunk sizes and the trailers.
    async fn collect(body: EncodedBody) -> (Vec<u8>, Vec<usize>, Option<HeaderMap>) {
        let (mut data, mut sizes, mut trailers) = (Vec::new(), Vec::new(), None);
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(chunk) => {
                    sizes.push(chunk.len());
                    data.extend_from_slice(&chunk);
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        assert!(body.is_end_stream());
        (data, sizes, trailers)
    }

    #[tokio::test]
    async fn frames_one_message_then_ok_trailers() {
        for n in [0, 1, 150] {
            let message = list(n);
            let want = message.encode_to_vec();
            let body = EncodedBody::new(Bytes::from(want.clone())).unwrap();
            assert_eq!(body.size_hint().exact(), None, "no content-length");
            let (data, sizes, trailers) = collect(body).await;

            assert_eq!(data[0], 0, "not compressed");
            assert_eq!(u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize, want.len());
            assert_eq!(&data[5..], want.as_slice());
            assert_eq!(ListContainersResponse::decode(&data[5..]).unwrap(), message);
            // A big message starts with exactly one HTTP/2 frame.
            if want.len() + 5 > FIRST_CHUNK {
                assert_eq!(sizes, [FIRST_CHUNK, want.len() + 5 - FIRST_CHUNK]);
            } else {
                assert_eq!(sizes, [want.len() + 5]);
            }
            let trailers = trailers.expect("trailers");
            assert_eq!(trailers.get("grpc-status").unwrap(), "0");
        }
    }
}
