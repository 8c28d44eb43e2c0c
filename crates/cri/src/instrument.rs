//! The one instrumentation layer every CRI call passes through: it refuses calls until the
//! daemon has finished recovering its state, opens the tracing span (handlers record
//! `pod_id`/`container_id` into it), records the per-method Prometheus metrics, ends a
//! call whose client deadline (`grpc-timeout`) passes with `DeadlineExceeded`, and makes
//! every error fit to send ([`fit_error`]): its message bounded, an undecodable request
//! `InvalidArgument`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tonic::body::Body;
use tower::{Layer, Service};
use tracing::Instrument as _;

/// Whether berthd is ready to serve CRI calls (recovery finished). Cheap to clone and share.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the daemon ready: calls are served from now on.
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether calls are served.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A tower layer that wraps the CRI services in [`Instrument`].
#[derive(Clone, Debug)]
pub struct InstrumentLayer {
    readiness: Readiness,
}

impl InstrumentLayer {
    /// A layer gated on `readiness`.
    pub fn new(readiness: Readiness) -> Self {
        Self { readiness }
    }
}

impl<S> Layer<S> for InstrumentLayer {
    type Service = Instrument<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Instrument { inner, readiness: self.readiness.clone() }
    }
}

/// The instrumented service; see the module docs.
#[derive(Clone, Debug)]
pub struct Instrument<S> {
    inner: S,
    readiness: Readiness,
}

/// How much earlier than the client's deadline a call is ended here. tonic's own
/// `grpc-timeout` handling sits outside this layer and answers `Cancelled` ("Timeout
/// expired"), where gRPC clients (critest, the kubelet) expect `DeadlineExceeded`; ending
/// the call one timer tick before it makes ours the answer.
const DEADLINE_MARGIN: Duration = Duration::from_millis(1);

/// The client's deadline from the `grpc-timeout` header: at most 8 digits and a unit
/// (`H`, `M`, `S`, `m`, `u`, `n`), as the gRPC over HTTP/2 spec has it. `None` when absent
/// or malformed (tonic ignores those too).
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Most bytes of an error message sent back. Messages echo input (a megabyte image name,
/// the OCI runtime's output) and travel in the `grpc-message` header, percent-encoded (up
/// to 3 bytes per byte); grpc-core clients refuse header lists above 8 KiB (16 KiB at
/// most), and then see a broken stream instead of the error.
pub const MAX_MESSAGE: usize = 2048;

/// What prost's decode errors start with (tonic answers them `Internal`).
const DECODE_ERROR: &str = "failed to decode Protobuf message";

/// `message`, cut in the middle when longer than `max` bytes: its start says what failed,
/// its end usually why (the cause comes last in an error chain).
pub fn bounded_message(message: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if message.len() <= max {
        return message.into();
    }
    let keep = max.saturating_sub(48) / 2;
    let mut head = keep;
    while !message.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = message.len() - keep;
    while !message.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{} … [{} bytes cut] … {}", &message[..head], tail - head, &message[tail..]).into()
}

/// An error response made fit to send: a message longer than [`MAX_MESSAGE`] is cut, and a
/// request that did not decode is `InvalidArgument` (the client's fault; tonic says
/// `Internal`, as grpc-go does). Every error status tonic or a handler makes goes through
/// `Status::into_http`, which leaves the status in the response's extensions.
fn fit_error(response: http::Response<Body>) -> http::Response<Body> {
    let Some(status) = response.extensions().get::<tonic::Status>() else { return response };
    let code = match status.code() {
        tonic::Code::Internal if status.message().starts_with(DECODE_ERROR) => {
            tonic::Code::InvalidArgument
        }
        code => code,
    };
    let message = bounded_message(status.message(), MAX_MESSAGE);
    if code == status.code() && message.len() == status.message().len() {
        return response;
    }
    tonic::Status::new(code, message.into_owned()).into_http()
}

/// The gRPC status code of a response: trailers-only errors carry it in the headers; a
/// response without it there succeeded at least as far as its headers.
fn grpc_code(response: &http::Response<Body>) -> tonic::Code {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from)
        .unwrap_or(tonic::Code::Ok)
}

impl<S, B> Service<http::Request<B>> for Instrument<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Take the service that was driven to readiness, leave a fresh clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let method = request.uri().path().to_string();
        let ready = self.readiness.is_ready();
        // A deadline too far to represent is no deadline (never a panic).
        let deadline = grpc_timeout(request.headers()).and_then(|t| {
            tokio::time::Instant::now().checked_add(t.saturating_sub(DEADLINE_MARGIN))
        });
        Box::pin(async move {
            let metrics = berth_metrics::metrics();
            metrics.cri_requests.with_label_values(&[method.as_str()]).inc();
            let span = tracing::info_span!(
                "cri",
                method = %method,
                pod_id = tracing::field::Empty,
                container_id = tracing::field::Empty,
            );
            let start = Instant::now();
            let response = if ready {
                let call = inner.call(request).instrument(span.clone());
                match deadline {
                    None => call.await?,
                    Some(deadline) => match tokio::time::timeout_at(deadline, call).await {
                        Ok(response) => response?,
                        Err(_) => tonic::Status::deadline_exceeded(
                            "the client's deadline passed before the call finished",
                        )
                        .into_http(),
                    },
                }
            } else {
                tonic::Status::unavailable("berthd is still recovering its state; retry shortly")
                    .into_http()
            };
            let response = fit_error(response);
            let elapsed = start.elapsed();
            metrics
                .cri_duration
                .with_label_values(&[method.as_str()])
                .observe(elapsed.as_secs_f64());
            let code = grpc_code(&response);
            let _entered = span.enter();
            if code == tonic::Code::Ok {
                tracing::debug!(elapsed_ms = elapsed.as_secs_f64() * 1e3, "CRI call done");
            } else {
                let code_name = format!("{code:?}");
                metrics.cri_errors.with_label_values(&[method.as_str(), code_name.as_str()]).inc();
                let message = response
                    .headers()
                    .get("grpc-message")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                tracing::info!(code = %code_name, message, "CRI call failed");
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(timeout: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-timeout", http::HeaderValue::from_str(timeout).unwrap());
        h
    }

    #[test]
    fn parses_grpc_timeouts() {
        assert_eq!(grpc_timeout(&headers("1m")), Some(Duration::from_millis(1)));
        assert_eq!(grpc_timeout(&headers("120S")), Some(Duration::from_secs(120)));
        assert_eq!(grpc_timeout(&headers("2H")), Some(Duration::from_secs(7200)));
        assert_eq!(grpc_timeout(&headers("3M")), Some(Duration::from_secs(180)));
        assert_eq!(grpc_timeout(&headers("999999u")), Some(Duration::from_micros(999_999)));
        assert_eq!(grpc_timeout(&headers("5n")), Some(Duration::from_nanos(5)));
        for bad in ["", "m", "123456789m", "1x", "-1m", "1.5S", "S1"] {
            assert_eq!(grpc_timeout(&headers(bad)), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }

    #[test]
    fn long_messages_keep_their_start_and_end() {
        assert_eq!(bounded_message("short", 100), "short");
        let long = format!("invalid image reference \"{}\": port too big", "a".repeat(1 << 20));
        let cut = bounded_message(&long, MAX_MESSAGE);
        assert!(cut.len() <= MAX_MESSAGE, "{}", cut.len());
        assert!(cut.starts_with("invalid image reference"));
        assert!(cut.ends_with("port too big"));
        assert!(cut.contains("bytes cut"));
        // Never inside a character.
        let wide = "é".repeat(5000);
        assert!(bounded_message(&wide, 101).len() <= 101);
    }

    #[test]
    fn errors_are_fitted() {
        let huge = tonic::Status::not_found("x".repeat(1 << 20)).into_http::<Body>();
        let fitted = fit_error(huge);
        assert_eq!(grpc_code(&fitted), tonic::Code::NotFound);
        let header = fitted.headers().get("grpc-message").unwrap();
        assert!(header.len() <= 3 * MAX_MESSAGE, "{}", header.len());

        let decode = tonic::Status::internal(format!("{DECODE_ERROR}: invalid wire type"));
        let fitted = fit_error(decode.into_http::<Body>());
        assert_eq!(grpc_code(&fitted), tonic::Code::InvalidArgument);
        assert_eq!(
            fitted.extensions().get::<tonic::Status>().map(|s| s.message().to_owned()),
            Some(format!("{DECODE_ERROR}: invalid wire type"))
        );

        let internal = tonic::Status::internal("disk on fire").into_http::<Body>();
        assert_eq!(grpc_code(&fit_error(internal)), tonic::Code::Internal);
        let ok = http::Response::new(Body::empty());
        assert_eq!(grpc_code(&fit_error(ok)), tonic::Code::Ok);
    }

    /// prost's wording is what `fit_error` recognises.
    #[test]
    fn prost_decode_errors_start_as_expected() {
        use prost::Message as _;
        let err = k8s_cri::v1::VersionRequest::decode(&b"\x0a\xff"[..]).unwrap_err();
        assert!(err.to_string().starts_with(DECODE_ERROR), "{err}");
    }

    /// A call that outlives the client's `grpc-timeout` is answered `DeadlineExceeded`; one
    /// that finishes in time is passed through.
    #[tokio::test]
    async fn a_call_past_its_deadline_is_deadline_exceeded() {
        let readiness = Readiness::default();
        readiness.set_ready();
        let slow = tower::service_fn(|request: http::Request<()>| async move {
            let wait = request.headers().contains_key("x-slow");
            if wait {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::empty()))
        });
        let mut service = InstrumentLayer::new(readiness).layer(slow);
        let mut request = http::Request::new(());
        *request.headers_mut() = headers("1m");
        request.headers_mut().insert("x-slow", http::HeaderValue::from_static("1"));
        let response = service.call(request).await.unwrap();
        assert_eq!(grpc_code(&response), tonic::Code::DeadlineExceeded);

        let mut request = http::Request::new(());
        *request.headers_mut() = headers("10S");
        let response = service.call(request).await.unwrap();
        assert_eq!(grpc_code(&response), tonic::Code::Ok);
    }
}
