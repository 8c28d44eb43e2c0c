//! A diagnostic, not a scenario: where the client-side time of one ListContainers goes. Over
//! containers that already exist (e.g. left by `list-scale --keep`), it times, interleaved so
//! that machine load hits all alike:
//!
//! - `generated`: the generated client, as `list-scale` measures it;
//! - `raw`: the same call through a codec that hands back the message bytes undecoded
//!   (request, server, HTTP/2 transfer, tonic framing; no protobuf decode);
//! - `decode`: prost decoding those same bytes into a `ListContainersResponse`, alone;
//! - `h2 headers`/`first data`/`last data`: when each arrived, over the bare HTTP/2 channel
//!   (no gRPC client), and how many body chunks there were;
//! - `drop`: freeing the decoded response (outside the `generated` time, as in `list-scale`);
//! - each of the above again on a current-thread runtime with a connection of its own, which
//!   shows what cross-thread wakeups in the multi-thread client cost.

use std::marker::PhantomData;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::{Buf, Bytes};
use http::uri::PathAndQuery;
use k8s_cri::v1::{ListContainersRequest, ListContainersResponse};
use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::transport::Channel;
use tonic_prost::ProstEncoder;

use crate::cri::Cri;
use crate::report::Report;
use crate::stats::Samples;

const LIST_CONTAINERS: &str = "/runtime.v1.RuntimeService/ListContainers";

/// Encodes requests with prost, returns response messages as raw bytes.
struct RawCodec<Req>(PhantomData<fn() -> Req>);

impl<Req: Message + Send + 'static> Codec for RawCodec<Req> {
    type Encode = Req;
    type Decode = Bytes;
    type Encoder = ProstEncoder<Req>;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

/// Takes a whole message's bytes.
struct RawDecoder;

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// One ListContainers with the raw codec: the undecoded response.
pub(crate) async fn raw_list(channel: Channel) -> Result<Bytes> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.context("channel not ready")?;
    let r = grpc
        .unary(
            tonic::Request::new(ListContainersRequest::default()),
            PathAndQuery::from_static(LIST_CONTAINERS),
            RawCodec::<ListContainersRequest>(PhantomData),
        )
        .await
        .context("raw ListContainers")?;
    Ok(r.into_inner())
}

/// One ListContainers over the bare HTTP/2 channel: when the response headers, the first
/// and the last body bytes arrived (since the call began), and in how many body chunks.
async fn timeline(channel: &Channel) -> Result<(Duration, Duration, Duration, usize)> {
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    // An empty ListContainersRequest: the gRPC frame header with length 0.
    let body = tonic::body::Body::new(http_body_util::Full::new(Bytes::from_static(&[0; 5])));
    let request = http::Request::post(LIST_CONTAINERS)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(body)?;
    let t = Instant::now();
    let response = channel.clone().oneshot(request).await?;
    let headers = t.elapsed();
    let mut body = response.into_body();
    let (mut first, mut chunks) = (None, 0);
    while let Some(frame) = body.frame().await {
        if frame?.is_data() {
            first.get_or_insert_with(|| t.elapsed());
            chunks += 1;
        }
    }
    Ok((headers, first.unwrap_or_default(), t.elapsed(), chunks))
}

/// `calls` rounds of generated / raw / decode over `cri`, recorded under `prefix`.
async fn rounds(cri: &Cri, calls: usize, prefix: &str, s: &mut Samples) -> Result<usize> {
    let mut c = cri.clone();
    let channel = cri.channel.clone();
    let mut bytes = 0;
    for _ in 0..calls {
        let t = Instant::now();
        let r = c.rt.list_containers(ListContainersRequest::default()).await?;
        s.record(&format!("{prefix} generated"), t.elapsed());
        // Dropping 1000 decoded containers is not small; `list-scale` does it untimed too.
        let t = Instant::now();
        drop(r);
        s.record(&format!("{prefix} drop"), t.elapsed());

        let t = Instant::now();
        let raw = raw_list(channel.clone()).await?;
        s.record(&format!("{prefix} raw"), t.elapsed());
        bytes = raw.len();

        let t = Instant::now();
        let decoded = ListContainersResponse::decode(raw.clone())?;
        s.record(&format!("{prefix} decode"), t.elapsed());
        std::hint::black_box(decoded);

        let (headers, first, last, chunks) = timeline(&channel).await?;
        s.record(&format!("{prefix} h2 headers"), headers);
        s.record(&format!("{prefix} h2 first data"), first);
        s.record(&format!("{prefix} h2 last data"), last);
        s.record(&format!("{prefix} h2 data chunks (as µs)"), Duration::from_micros(chunks as u64));
    }
    Ok(bytes)
}

/// Runs the probe; adds its figures to `report`.
pub async fn run(
    cri: &Cri,
    endpoint: &str,
    timeout: Duration,
    calls: usize,
    dump: bool,
    report: &mut Report,
) -> Result<()> {
    let mut s = Samples::default();
    let calls = calls.max(1);
    // Warm-up: first calls pay for connection setup and allocator growth.
    rounds(cri, 3, "warmup", &mut Samples::default()).await?;
    let bytes = rounds(cri, calls, "multi-thread", &mut s).await?;
    if dump {
        let raw = raw_list(cri.channel.clone()).await?;
        let list = ListContainersResponse::decode(raw)?;
        if let Some(first) = list.containers.first() {
            eprintln!(
                "{} containers, the first ({} bytes):",
                list.containers.len(),
                first.encoded_len()
            );
            eprintln!("{first:#?}");
        }
    }

    // The same on a current-thread runtime, on a thread of its own.
    let endpoint = endpoint.to_string();
    let single = std::thread::spawn(move || -> Result<Samples> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let cri = Cri::connect(&endpoint, timeout).await?;
            let mut s = Samples::default();
            rounds(&cri, 3, "warmup", &mut Samples::default()).await?;
            rounds(&cri, calls, "current-thread", &mut s).await?;
            Ok(s)
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("current-thread probe panicked"))??;
    s.merge(single);

    report.push("list-probe response size", bytes as f64 / 1024.0, "KiB");
    let names: Vec<String> = ["multi-thread", "current-thread"]
        .iter()
        .flat_map(|rt| {
            [
                "generated",
                "raw",
                "decode",
                "drop",
                "h2 headers",
                "h2 first data",
                "h2 last data",
                "h2 data chunks (as µs)",
            ]
            .map(|k| format!("{rt} {k}"))
        })
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    report.push_latencies("list-probe ListContainers", &s, &names);
    Ok(())
}
