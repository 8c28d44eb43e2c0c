//! Latency samples and nearest-rank percentiles.

use std::collections::BTreeMap;
use std::time::Duration;

/// The nearest-rank `p`-th percentile (0 < p <= 100) of `sorted` (ascending): the smallest
/// sample such that at least p % of all samples are less than or equal to it.
pub fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    // rank = ceil(p/100 * n), 1-based; a p of 0 still means the first sample.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, sorted.len()) - 1;
    sorted.get(idx).copied()
}

/// What one series of samples boils down to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest sample.
    pub max: Duration,
}

impl Summary {
    /// Summarises `samples` (any order); `None` when empty.
    pub fn of(samples: &[Duration]) -> Option<Self> {
        let mut s = samples.to_vec();
        s.sort_unstable();
        Some(Self {
            n: s.len(),
            p50: percentile(&s, 50.0)?,
            p90: percentile(&s, 90.0)?,
            p99: percentile(&s, 99.0)?,
            max: *s.last()?,
        })
    }
}

/// Durations per series name (e.g. per CRI call), in insertion order of names kept sorted.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    series: BTreeMap<String, Vec<Duration>>,
}

impl Samples {
    /// Adds one sample to series `name`.
    pub fn record(&mut self, name: &str, d: Duration) {
        self.series.entry(name.to_string()).or_default().push(d);
    }

    /// Moves all samples of `other` into `self`.
    pub fn merge(&mut self, other: Samples) {
        for (k, mut v) in other.series {
            self.series.entry(k).or_default().append(&mut v);
        }
    }

    /// The samples of series `name`.
    pub fn get(&self, name: &str) -> &[Duration] {
        self.series.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Series names and their samples.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Vec<Duration>)> {
        self.series.iter()
    }
}

/// Milliseconds as a float, for reports.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn nearest_rank_on_ten() {
        let s: Vec<_> = (1..=10).map(d).collect();
        assert_eq!(percentile(&s, 50.0), Some(d(5)));
        assert_eq!(percentile(&s, 90.0), Some(d(9)));
        assert_eq!(percentile(&s, 99.0), Some(d(10)));
        assert_eq!(percentile(&s, 100.0), Some(d(10)));
        assert_eq!(percentile(&s, 0.0), Some(d(1)));
        assert_eq!(percentile(&s, 11.0), Some(d(2)));
    }

    #[test]
    fn single_and_empty() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[d(7)], 99.0), Some(d(7)));
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn summary_sorts() {
        let s = Summary::of(&[d(30), d(10), d(20)]).unwrap();
        assert_eq!((s.n, s.p50, s.p99, s.max), (3, d(20), d(30), d(30)));
        assert_eq!(Summary::of(&[d(4), d(1), d(3), d(2)]).unwrap().p50, d(2));
    }

    #[test]
    fn merge_appends() {
        let mut a = Samples::default();
        a.record("x", d(1));
        let mut b = Samples::default();
        b.record("x", d(2));
        b.record("y", d(3));
        a.merge(b);
        assert_eq!(a.get("x"), &[d(1), d(2)]);
        assert_eq!(a.get("y"), &[d(3)]);
        assert!(a.get("z").is_empty());
    }
}
