//! An SVG of latency distributions (cumulative, per series) for one or more reports.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::report::Report;

const COLORS: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
];

/// Points of the empirical CDF of `v`: (latency, fraction of samples at or below it).
pub fn cdf(v: &[f64]) -> Vec<(f64, f64)> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len() as f64;
    s.into_iter().enumerate().map(|(i, x)| (x, (i + 1) as f64 / n)).collect()
}

/// Draws one panel per sample series found in any report, one line per report.
pub fn draw(reports: &[Report], out: &Path) -> Result<usize> {
    // Panels in measurement order: the order of the p50 figures, then anything else.
    let mut series: Vec<&String> = Vec::new();
    for r in reports {
        for f in &r.figures {
            if let Some(k) = f.name.strip_suffix(" p50")
                && let Some((key, _)) = r.samples.get_key_value(k)
                && !series.contains(&key)
            {
                series.push(key);
            }
        }
    }
    for r in reports {
        for k in r.samples.keys() {
            if !series.contains(&k) {
                series.push(k);
            }
        }
    }
    if series.is_empty() {
        return Ok(0);
    }
    let cols = 3usize;
    let rows = series.len().div_ceil(cols);
    let root = SVGBackend::new(out, (cols as u32 * 420, rows as u32 * 260)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let panels = root.split_evenly((rows, cols));
    for (name, area) in series.iter().zip(panels.iter()) {
        // Axis up to the largest p99 (times 1.2): a lone outlier would squash the rest.
        let mut xmax: f64 = 0.0;
        for r in reports {
            if let Some(v) = r.samples.get(*name) {
                let c = cdf(v);
                if let Some(p) = c.iter().find(|(_, f)| *f >= 0.99).or(c.last()) {
                    xmax = xmax.max(p.0);
                }
            }
        }
        let xmax = if xmax > 0.0 { xmax * 1.2 } else { 1.0 };
        let mut chart = ChartBuilder::on(area)
            .caption(name.as_str(), ("sans-serif", 14))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(36)
            .build_cartesian_2d(0f64..xmax, 0f64..1f64)
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("ms")
            .y_desc("fraction")
            .x_labels(5)
            .y_labels(5)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (i, r) in reports.iter().enumerate() {
            let Some(v) = r.samples.get(*name) else { continue };
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(cdf(v), color.stroke_width(2)))
                .map_err(|e| anyhow!("{e}"))?
                .label(r.runtime.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(series.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_is_sorted_and_ends_at_one() {
        let c = cdf(&[3.0, 1.0, 2.0, 4.0]);
        assert_eq!(c, vec![(1.0, 0.25), (2.0, 0.5), (3.0, 0.75), (4.0, 1.0)]);
    }

    #[test]
    fn draws_an_svg() {
        let mut a = Report::new("a");
        a.samples.insert("lifecycle seq RunPodSandbox".into(), vec![1.0, 2.0, 3.0]);
        let mut b = Report::new("b");
        b.samples.insert("lifecycle seq RunPodSandbox".into(), vec![2.0, 4.0]);
        let out = std::env::temp_dir().join(format!("berth-bench-{}.svg", uuid::Uuid::new_v4()));
        assert_eq!(draw(&[a, b], &out).unwrap(), 1);
        let svg = std::fs::read_to_string(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        assert!(svg.contains("<svg") && svg.contains("RunPodSandbox"));
    }
}
