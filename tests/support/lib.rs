//! Support for berth's end-to-end tests: a private registry with fixture images built in
//! memory, the real `berthd` on private directories, and CRI clients on its socket.
//!
//! Every test builds its own [`Registry`] and [`Berthd`], so tests run in parallel. Both stop
//! their processes on drop; [`Berthd`] also unmounts whatever its daemon left mounted.

pub mod berthd;
pub mod cgroups;
pub mod cri;
pub mod fixtures;
pub mod http;
pub mod mounts;
pub mod netkit;
pub mod oci;
pub mod process;
pub mod registry;

pub use berthd::{Berthd, Options};
pub use registry::{Pushed, Registry};

use k8s_cri::v1::ImageSpec;

/// An `ImageSpec` for `image`.
pub fn image_spec(image: &str) -> ImageSpec {
    ImageSpec { image: image.to_string(), ..Default::default() }
}

/// Says on stderr that the running test is skipped, and why: `SKIPPED <test>: <reason>`.
/// Written to the stderr file itself, past the test harness's capture, so a `cargo test`
/// run shows it although the test then returns as passed.
pub fn report_skip(reason: &str) {
    use std::io::Write;
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}

/// Whether we run as root (the e2e tests need root to mount overlays).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Sample value of a Prometheus text-format series: the sum over all lines whose metric name
/// is `name` and whose labels contain every `label="value"` pair in `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        if labels.iter().all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")))
            && let Ok(v) = value.parse::<f64>()
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_values_are_summed_over_matching_series() {
        let text = "# HELP x y\n\
            berth_cri_requests_total{method=\"/runtime.v1.ImageService/PullImage\"} 3\n\
            berth_cri_requests_total{method=\"/runtime.v1.ImageService/ListImages\"} 1\n\
            berth_cri_errors_total{code=\"NotFound\",method=\"/runtime.v1.ImageService/PullImage\"} 2\n\
            berth_image_pull_bytes_total 1024\n";
        let pull = [("method", "/runtime.v1.ImageService/PullImage")];
        assert_eq!(metric_value(text, "berth_cri_requests_total", &pull), Some(3.0));
        assert_eq!(metric_value(text, "berth_cri_requests_total", &[]), Some(4.0));
        assert_eq!(metric_value(text, "berth_cri_errors_total", &pull), Some(2.0));
        assert_eq!(metric_value(text, "berth_image_pull_bytes_total", &[]), Some(1024.0));
        assert_eq!(metric_value(text, "berth_nothing", &[]), None);
    }
}
