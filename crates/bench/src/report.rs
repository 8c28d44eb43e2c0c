//! The figures a scenario measured: printed as a table, and merged into a JSON file that the
//! comparison and plot subcommands read.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::stats::{Samples, Summary, ms};

/// One measured number.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Figure {
    /// What was measured, e.g. `lifecycle seq RunPodSandbox p50`.
    pub name: String,
    /// The value, in `unit`.
    pub value: f64,
    /// `ms`, `pods/s`, `MiB`, `KiB`, `count`...
    pub unit: String,
}

/// All figures of one runtime, possibly from several scenario runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// The runtime's label (`--label`), e.g. `berth` or `containerd`.
    pub runtime: String,
    /// Figures in the order they were measured.
    pub figures: Vec<Figure>,
    /// Raw latency samples in milliseconds per series, for plots.
    #[serde(default)]
    pub samples: BTreeMap<String, Vec<f64>>,
}

impl Report {
    /// An empty report for `runtime`.
    pub fn new(runtime: &str) -> Self {
        Self { runtime: runtime.to_string(), ..Self::default() }
    }

    /// Adds (or replaces) a figure.
    pub fn push(&mut self, name: impl Into<String>, value: f64, unit: &str) {
        let name = name.into();
        let fig = Figure { name: name.clone(), value, unit: unit.to_string() };
        match self.figures.iter_mut().find(|f| f.name == name) {
            Some(f) => *f = fig,
            None => self.figures.push(fig),
        }
    }

    /// Adds p50/p90/p99 of every series in `samples`, each name prefixed by `prefix`, and
    /// keeps the raw samples for plots. `order` puts known series first (call order).
    pub fn push_latencies(&mut self, prefix: &str, samples: &Samples, order: &[&str]) {
        let mut names: Vec<&str> =
            order.iter().copied().filter(|n| !samples.get(n).is_empty()).collect();
        for (k, _) in samples.iter() {
            if !names.contains(&k.as_str()) {
                names.push(k);
            }
        }
        for name in names {
            let v = samples.get(name);
            if let Some(s) = Summary::of(v) {
                for (p, d) in [("p50", s.p50), ("p90", s.p90), ("p99", s.p99)] {
                    self.push(format!("{prefix} {name} {p}"), round3(ms(d)), "ms");
                }
                self.samples.insert(format!("{prefix} {name}"), v.iter().map(|d| ms(*d)).collect());
            }
        }
    }

    /// Adds a duration figure in milliseconds.
    pub fn push_ms(&mut self, name: impl Into<String>, d: Duration) {
        self.push(name, round3(ms(d)), "ms");
    }

    /// Prints the figures as an aligned table.
    pub fn print(&self) {
        let w = self.figures.iter().map(|f| f.name.len()).max().unwrap_or(6).max(6);
        println!("{:<w$}  {:>12}  unit   ({})", "figure", "value", self.runtime);
        for f in &self.figures {
            println!("{:<w$}  {:>12}  {}", f.name, fmt_value(f.value), f.unit);
        }
    }

    /// Reads a report written by [`Report::merge_into`].
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Merges this report into the JSON file at `path` (creating it): figures of the same
    /// name are replaced, so each scenario run adds its part to one file per runtime.
    pub fn merge_into(&self, path: &Path) -> Result<()> {
        let mut all = if path.exists() { Self::load(path)? } else { Self::new(&self.runtime) };
        all.runtime = self.runtime.clone();
        for f in &self.figures {
            all.push(f.name.clone(), f.value, &f.unit);
        }
        for (k, v) in &self.samples {
            all.samples.insert(k.clone(), v.clone());
        }
        let text = serde_json::to_string_pretty(&all).context("serialising report")?;
        // Write then rename: an interrupted run never leaves half a file behind.
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
    }
}

/// Three decimals are more than any of these measurements can resolve.
pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// A value for a table: integers without decimals, small values with more.
pub fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v.fract() == 0.0 && v.abs() < 1e12 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_replaces_same_name() {
        let mut r = Report::new("x");
        r.push("a", 1.0, "ms");
        r.push("b", 2.0, "ms");
        r.push("a", 3.0, "ms");
        assert_eq!(r.figures.len(), 2);
        assert_eq!(r.figures[0].value, 3.0);
    }

    #[test]
    fn latencies_in_call_order() {
        let mut s = Samples::default();
        s.record("Zeta", Duration::from_millis(1));
        s.record("Alpha", Duration::from_millis(2));
        let mut r = Report::new("x");
        r.push_latencies("seq", &s, &["Zeta"]);
        assert_eq!(r.figures[0].name, "seq Zeta p50");
        assert_eq!(r.figures[3].name, "seq Alpha p50");
        assert_eq!(r.samples["seq Alpha"], vec![2.0]);
    }

    #[test]
    fn merge_into_file() {
        let dir = std::env::temp_dir().join(format!("berth-bench-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        let p = dir.join("r.json");
        let mut a = Report::new("rt");
        a.push("x", 1.0, "ms");
        a.merge_into(&p).unwrap();
        let mut b = Report::new("rt");
        b.push("y", 2.0, "ms");
        b.push("x", 5.0, "ms");
        b.merge_into(&p).unwrap();
        let r = Report::load(&p).unwrap();
        assert_eq!(r.figures.len(), 2);
        assert_eq!(r.figures[0].value, 5.0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_value(3.0), "3");
        assert_eq!(fmt_value(1.23456), "1.23");
        assert_eq!(fmt_value(314.159), "314.2");
    }
}
