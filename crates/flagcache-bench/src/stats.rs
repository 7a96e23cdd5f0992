//! Latency samples and their summaries.

use std::time::Duration;

use serde::Serialize;

/// Latency samples in nanoseconds.
#[derive(Debug, Default, Clone)]
pub struct Samples(Vec<u64>);

/// The percentiles the chart plots (the last is the maximum).
pub const CURVE: [f64; 11] = [
    0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99, 100.0,
];

/// A summary of one contender's samples, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub count: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    /// `(percentile, microseconds)` at each point of [`CURVE`].
    pub curve: Vec<(f64, f64)>,
}

impl Samples {
    pub fn with_capacity(n: usize) -> Self {
        Samples(Vec::with_capacity(n))
    }

    pub fn push(&mut self, d: Duration) {
        self.0.push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    pub fn extend(&mut self, other: Samples) {
        self.0.extend(other.0);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn summary(mut self) -> Summary {
        self.0.sort_unstable();
        let at = |p: f64| -> f64 { percentile(&self.0, p) / 1_000.0 };
        let mean = if self.0.is_empty() {
            0.0
        } else {
            self.0.iter().map(|&v| v as f64).sum::<f64>() / self.0.len() as f64 / 1_000.0
        };
        Summary {
            count: self.0.len(),
            p50_us: at(50.0),
            p99_us: at(99.0),
            max_us: at(100.0),
            mean_us: mean,
            curve: CURVE.iter().map(|&p| (p, at(p))).collect(),
        }
    }
}

/// Nearest-rank percentile of sorted samples; 0 for none.
fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut s = Samples::default();
        for us in 1..=100 {
            s.push(Duration::from_micros(us));
        }
        let sum = s.summary();
        assert_eq!(sum.count, 100);
        assert_eq!(sum.p50_us, 50.0);
        assert_eq!(sum.p99_us, 99.0);
        assert_eq!(sum.max_us, 100.0);
        assert_eq!(sum.curve[0], (0.0, 1.0));
        assert!((sum.mean_us - 50.5).abs() < 1e-9);
        assert_eq!(Samples::default().summary().p99_us, 0.0);
    }
}
