//! The one instrumentation layer every CRI call passes through: it refuses calls until the
//! daemon has finished recovering its state, opens the tracing span (handlers record
//! `pod_id`/`container_id` into it), and records the per-method Prometheus metrics.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

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
                inner.call(request).instrument(span.clone()).await?
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
