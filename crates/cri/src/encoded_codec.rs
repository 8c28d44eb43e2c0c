//! A gRPC codec whose responses are already protobuf bytes ([`berth_runtime::Encoded`]): the
//! encoder copies them into tonic's buffer as they are; requests decode with prost as usual.

use std::marker::PhantomData;

use berth_runtime::{Encoded, ListLayout};
use bytes::BufMut;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic_prost::ProstDecoder;

/// Decodes `Req` with prost, encodes a pre-encoded `Resp`.
pub(crate) struct EncodedCodec<Req, Resp>(PhantomData<fn() -> (Req, Resp)>);

impl<Req, Resp> Default for EncodedCodec<Req, Resp> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<Req, Resp> Codec for EncodedCodec<Req, Resp>
where
    Req: prost::Message + Default + Send + 'static,
    Resp: ListLayout + prost::Message + Default + Send + 'static,
{
    type Encode = Encoded<Resp>;
    type Decode = Req;
    type Encoder = BytesEncoder<Resp>;
    type Decoder = RequestDecoder<Req>;

    fn encoder(&mut self) -> Self::Encoder {
        BytesEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(ProstDecoder::default())
    }
}

/// Writes an [`Encoded`] message's bytes.
pub(crate) struct BytesEncoder<Resp>(PhantomData<fn() -> Resp>);

impl<Resp: ListLayout + prost::Message + Default> Encoder for BytesEncoder<Resp> {
    type Item = Encoded<Resp>;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.as_bytes().len());
        dst.put_slice(item.as_bytes());
        Ok(())
    }
}

/// prost's decoder, under a name of ours (its type is all the codec needs).
pub(crate) struct RequestDecoder<Req>(ProstDecoder<Req>);

impl<Req: prost::Message + Default> Decoder for RequestDecoder<Req> {
    type Item = Req;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Req>, Status> {
        self.0.decode(src)
    }
}
