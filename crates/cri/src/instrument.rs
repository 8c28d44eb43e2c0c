//! The one instrumentation layer every CRI call passes through: it refuses calls until the
//! daemon has finished recovering its state, opens the tracing span (handlers record
//! `pod_id`/`container_id` into it), records the per-method Prometheus metrics, and ends a
//! call whose client deadline (`grpc-timeout`) passes with `DeadlineExceeded`.

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
