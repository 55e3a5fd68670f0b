//! Latency summaries: nearest-rank percentiles over the samples of one step.

use serde::{Deserialize, Serialize};

/// min / p50 / p95 / p99 / max / mean of one measured step, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    /// Summarises `samples` (milliseconds); `None` when there are none.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let mean = sorted.iter().sum::<f64>() / sorted.len() as f64;
        Some(Summary {
            n: sorted.len(),
            min: round_ms(sorted[0]),
            p50: round_ms(nearest_rank(&sorted, 50)),
            p95: round_ms(nearest_rank(&sorted, 95)),
            p99: round_ms(nearest_rank(&sorted, 99)),
            max: round_ms(sorted[sorted.len() - 1]),
            mean: round_ms(mean),
        })
    }
}

/// The nearest-rank percentile of ascending `sorted` (not empty): the smallest sample that at
/// least `percent` % of the samples do not exceed. No interpolation, so every reported figure
/// is a latency that was actually observed. The rank is computed in integers because in
/// floating point 95 % of 20 is 19.000000000000004, which would round up to the wrong rank.
/// `bench/baseline.sh` computes the same rank the same way.
pub fn nearest_rank(sorted: &[f64], percent: usize) -> f64 {
    let rank = (percent * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

/// Rounds milliseconds to 10 µs, which is finer than anything these runs can resolve.
pub fn round_ms(ms: f64) -> f64 {
    (ms * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_table() {
        let twenty: Vec<f64> = (1..=20).map(f64::from).collect();
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        let cases: &[(&[f64], usize, f64)] = &[
            (&[7.0], 50, 7.0),
            (&[7.0], 99, 7.0),
            (&[1.0, 2.0], 50, 1.0),
            (&[1.0, 2.0], 51, 2.0),
            (&twenty, 50, 10.0),
            (&twenty, 95, 19.0),
            (&twenty, 99, 20.0),
            (&hundred, 95, 95.0),
            (&hundred, 99, 99.0),
            (&hundred, 100, 100.0),
            (&hundred, 0, 1.0),
        ];
        for (samples, percent, want) in cases {
            assert_eq!(
                nearest_rank(samples, *percent),
                *want,
                "p{percent} of {} samples",
                samples.len()
            );
        }
    }

    #[test]
    fn summary_sorts_and_rounds() {
        assert_eq!(Summary::of(&[]), None);
        let s = Summary::of(&[30.004, 10.0, 20.0, 40.0]).unwrap();
        assert_eq!(
            (s.n, s.min, s.p50, s.p95, s.p99, s.max),
            (4, 10.0, 20.0, 40.0, 40.0, 40.0)
        );
        assert_eq!(s.mean, 25.0);
        assert_eq!(Summary::of(&[1.23456]).unwrap().p50, 1.23);
    }
}
