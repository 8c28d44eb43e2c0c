//! berth-metrics: the Prometheus metrics berth records and the HTTP endpoint that serves them.
//!
//! All metrics live in one process-wide registry (`registry()`), so every crate records into
//! the same place without threading handles through; they are cheap atomic counters, and a
//! test process that starts several daemons still starts them as separate processes.

// No unsafe code in this crate.
#![deny(unsafe_code)]

mod server;

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder, exponential_buckets,
};

pub use server::{MetricsServerError, serve};

/// Every metric berth exports.
pub struct Metrics {
    /// CRI requests by full gRPC method path.
    pub cri_requests: IntCounterVec,
    /// CRI requests that failed, by method and gRPC code name.
    pub cri_errors: IntCounterVec,
    /// CRI request latency by method.
    pub cri_duration: HistogramVec,
    /// Bytes downloaded from registries by image pulls.
    pub pull_bytes: IntCounter,
    /// Duration of successful image pulls.
    pub pull_duration: Histogram,
    /// Containers by state (`created`, `running`, `exited`).
    pub containers: IntGaugeVec,
    /// Pod sandboxes by state (`ready`, `notready`).
    pub sandboxes: IntGaugeVec,
    /// Containers killed by the kernel's OOM killer.
    pub oom_kills: IntCounter,
    /// Streaming sessions open, by kind (`exec`, `attach`, `portforward`).
    pub stream_sessions: IntGaugeVec,
    /// Bytes streamed, by direction (`in`: from clients, `out`: to them).
    pub stream_bytes: IntCounterVec,
    registry: Registry,
}

/// A metric definition that cannot fail at runtime: names and labels are constants, so a
/// failure here is a programming error caught by the unit test below.
fn must<T>(r: prometheus::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("invalid metric definition: {e}"),
    }
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        // Buckets from 100µs to ~100s: CRI calls span list calls and image pulls.
        let latency = exponential_buckets(0.0001, 2.5, 16).unwrap_or_default();
        let cri_requests = must(IntCounterVec::new(
            Opts::new("berth_cri_requests_total", "CRI requests received, by method."),
            &["method"],
        ));
        let cri_errors = must(IntCounterVec::new(
            Opts::new(
                "berth_cri_errors_total",
                "CRI requests that failed, by method and gRPC code.",
            ),
            &["method", "code"],
        ));
        let cri_duration = must(HistogramVec::new(
            HistogramOpts::new("berth_cri_request_duration_seconds", "CRI request latency.")
                .buckets(latency.clone()),
            &["method"],
        ));
        let pull_bytes = must(IntCounter::new(
            "berth_image_pull_bytes_total",
            "Bytes downloaded from registries by image pulls.",
        ));
        let pull_duration = must(Histogram::with_opts(
            HistogramOpts::new("berth_image_pull_duration_seconds", "Duration of image pulls.")
                .buckets(latency),
        ));
        let containers = must(IntGaugeVec::new(
            Opts::new("berth_containers", "Containers by state."),
            &["state"],
        ));
        let sandboxes = must(IntGaugeVec::new(
            Opts::new("berth_pod_sandboxes", "Pod sandboxes by state."),
            &["state"],
        ));
        let oom_kills = must(IntCounter::new(
            "berth_container_oom_kills_total",
            "Containers killed by the kernel's OOM killer.",
        ));
        let stream_sessions = must(IntGaugeVec::new(
            Opts::new("berth_stream_sessions", "Streaming sessions open, by kind."),
            &["kind"],
        ));
        let stream_bytes = must(IntCounterVec::new(
            Opts::new(
                "berth_stream_bytes_total",
                "Bytes streamed by exec, attach and port-forward sessions, by direction.",
            ),
            &["direction"],
        ));
        for c in [
            Box::new(cri_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(cri_errors.clone()),
            Box::new(cri_duration.clone()),
            Box::new(pull_bytes.clone()),
            Box::new(pull_duration.clone()),
            Box::new(containers.clone()),
            Box::new(sandboxes.clone()),
            Box::new(oom_kills.clone()),
            Box::new(stream_sessions.clone()),
            Box::new(stream_bytes.clone()),
        ] {
            must(registry.register(c));
        }
        Self {
            cri_requests,
            cri_errors,
            cri_duration,
            pull_bytes,
            pull_duration,
            containers,
            sandboxes,
            oom_kills,
            stream_sessions,
            stream_bytes,
            registry,
        }
    }

    /// The metrics in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which we never build.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_metrics_register_and_render() {
        let m = metrics();
        m.cri_requests.with_label_values(&["/runtime.v1.RuntimeService/Version"]).inc();
        m.pull_bytes.inc_by(10);
        let text = m.render();
        assert!(
            text.contains(
                "berth_cri_requests_total{method=\"/runtime.v1.RuntimeService/Version\"} 1"
            )
        );
        assert!(text.contains("berth_image_pull_bytes_total 10"));
    }
}
