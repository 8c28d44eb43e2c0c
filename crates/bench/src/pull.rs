//! The pull scenario: cold PullImage (RemoveImage first), repeated, median reported.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_cri::v1::PullImageRequest;

use crate::cri::{Cri, image_spec};
use crate::report::Report;
use crate::stats::{Samples, Summary};

/// Runs `repetitions` cold pulls of `image`, then one warm pull (image present).
pub async fn run(cri: &Cri, image: &str, repetitions: usize, report: &mut Report) -> Result<()> {
    let mut c = cri.clone();
    let mut cold = Samples::default();
    for _ in 0..repetitions.max(1) {
        // NotFound on the first round is fine: the point is that the image is absent.
        c.remove_image_quietly(image).await;
        cold.record("cold", pull(&mut c, image).await?);
    }
    let warm = pull(&mut c, image).await?;
    let name = short_name(image);
    if let Some(s) = Summary::of(cold.get("cold")) {
        report.push_ms(format!("pull {name} cold median"), s.p50);
        report.push_ms(format!("pull {name} cold max"), s.max);
    }
    report.push_ms(format!("pull {name} warm"), warm);
    // Leave the image absent, as the machine was before the first cold pull.
    c.remove_image_quietly(image).await;
    Ok(())
}

async fn pull(c: &mut Cri, image: &str) -> Result<Duration> {
    let start = Instant::now();
    let req = PullImageRequest { image: Some(image_spec(image)), ..Default::default() };
    c.img.pull_image(req).await.with_context(|| format!("PullImage {image}"))?;
    Ok(start.elapsed())
}

/// `host:port/big:1.0` → `big:1.0`: report names must not depend on the registry port.
pub fn short_name(image: &str) -> &str {
    image.rsplit('/').next().unwrap_or(image)
}

#[cfg(test)]
mod tests {
    #[test]
    fn short_names() {
        assert_eq!(super::short_name("127.0.0.1:5000/big:1.0"), "big:1.0");
        assert_eq!(super::short_name("busybox"), "busybox");
    }
}
