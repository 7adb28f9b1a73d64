//! Paired comparison of two methods timed round by round on a shared, noisy machine.
//!
//! When two methods take turns within each round, the machine's interference (another
//! tenant, frequency changes) hits both runs of a round alike, so the per-round ratio
//! cancels most of it where the fastest or median time of each method alone does not.
//! [`PairedRatio`] is the median of those ratios with a distribution-free confidence
//! interval for it: the order statistics `x[j]` and `x[n-1-j]` of the sorted ratios, `j`
//! the largest index with `P(Binomial(n, ½) ≤ j) ≤ 2.5%` (the sign test's interval for a
//! median, which assumes nothing about the ratios' distribution). With fewer than six
//! rounds no such `j` exists; the interval is then the whole range and `confidence` says
//! how much less than 95% it is.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// The median per-round ratio `a / b` and its confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct PairedRatio {
    /// The median of the per-round ratios (the upper one of an even count).
    pub(crate) median: f64,
    /// The interval's lower end.
    pub(crate) low: f64,
    /// The interval's upper end.
    pub(crate) high: f64,
    /// The probability that the interval holds the true median (≥ 0.95 from 6 rounds up).
    pub(crate) confidence: f64,
    /// Rounds compared.
    pub(crate) rounds: usize,
}

impl PairedRatio {
    /// Compares `a[r]` with `b[r]` for every round `r`; `None` when there are no rounds or
    /// the two sides have different counts.
    pub(crate) fn new(a: &[Duration], b: &[Duration]) -> Option<PairedRatio> {
        if a.is_empty() || a.len() != b.len() {
            return None;
        }
        let mut ratios: Vec<f64> = a
            .iter()
            .zip(b)
            .map(|(a, b)| a.as_secs_f64() / b.as_secs_f64().max(f64::MIN_POSITIVE))
            .collect();
        ratios.sort_by(f64::total_cmp);
        let n = ratios.len();
        let (j, tail) = interval_rank(n);
        Some(PairedRatio {
            median: ratios[n / 2],
            low: ratios[j],
            high: ratios[n - 1 - j],
            confidence: 1.0 - 2.0 * tail,
            rounds: n,
        })
    }
}

impl fmt::Display for PairedRatio {
    /// `median [low, high]` to the formatter's precision (3 decimals unless given), then
    /// the confidence if it is under 95%.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = f.precision().unwrap_or(3);
        write!(
            f,
            "{:.d$} [{:.d$}, {:.d$}]",
            self.median, self.low, self.high
        )?;
        if self.confidence < 0.95 {
            write!(f, " ({:.0}%)", 100.0 * self.confidence)?;
        }
        Ok(())
    }
}

/// For `n` rounds: the largest `j` with `P(Binomial(n, ½) ≤ j) ≤ 0.025` (0 when none) and
/// that probability (`P(B ≤ 0)` when none).
fn interval_rank(n: usize) -> (usize, f64) {
    // ln P(B = i) = ln C(n, i) - n ln 2, built up term by term; logs keep large n finite.
    let mut ln_pmf = -(n as f64) * std::f64::consts::LN_2;
    let mut cdf = ln_pmf.exp();
    let mut best = (0, cdf);
    for i in 0..n / 2 {
        ln_pmf += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
        let next = cdf + ln_pmf.exp();
        if next > 0.025 {
            break;
        }
        cdf = next;
        best = (i + 1, cdf);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(v: &[u64]) -> Vec<Duration> {
        v.iter().copied().map(Duration::from_nanos).collect()
    }

    #[test]
    fn the_interval_ranks_are_the_sign_tests() {
        // P(B ≤ 3) for n = 15 is 576 / 32768; P(B ≤ 4) is 1941 / 32768, over 2.5%.
        let (j, tail) = interval_rank(15);
        assert_eq!(j, 3);
        assert!((tail - 576.0 / 32768.0).abs() < 1e-12);
        assert_eq!(interval_rank(25).0, 7);
        assert_eq!(interval_rank(6).0, 0);
        assert!(interval_rank(6).1 <= 0.025);
        // Five rounds cannot reach 95%: the whole range, 1 - 2/32 confidence.
        assert_eq!(interval_rank(5), (0, 1.0 / 32.0));
        assert_eq!(interval_rank(1), (0, 0.5));
    }

    #[test]
    fn ratios_are_paired_by_round_not_by_rank() {
        // `a` is 10% faster than `b` in every round although their ranges overlap.
        let b = ns(&[1000, 2000, 1500, 3000, 1200, 1800, 2500, 1100]);
        let a: Vec<Duration> = b.iter().map(|d| d.mul_f64(0.9)).collect();
        let p = PairedRatio::new(&a, &b).expect("rounds");
        assert!((p.median - 0.9).abs() < 1e-9);
        assert!((p.low - 0.9).abs() < 1e-9 && (p.high - 0.9).abs() < 1e-9);
        assert_eq!(p.rounds, 8);
        assert!(p.confidence >= 0.95);
    }

    #[test]
    fn the_interval_comes_from_the_sorted_ratios() {
        let b = ns(&[100; 15]);
        let a = ns(&[
            115, 101, 90, 104, 97, 112, 95, 100, 103, 99, 108, 92, 106, 94, 110,
        ]);
        let p = PairedRatio::new(&a, &b).expect("rounds");
        // Sorted: 90 92 94 [95] 97 99 100 101 103 104 106 [108] 110 112 115.
        assert!((p.median - 1.01).abs() < 1e-9);
        assert!((p.low - 0.95).abs() < 1e-9);
        assert!((p.high - 1.08).abs() < 1e-9);
    }

    #[test]
    fn it_prints_the_interval_and_a_confidence_under_95_percent() {
        let p = PairedRatio::new(&ns(&[90, 100, 110]), &ns(&[100; 3])).expect("rounds");
        assert_eq!(format!("{p:.2}"), "1.00 [0.90, 1.10] (75%)");
        let p = PairedRatio::new(&ns(&[100; 6]), &ns(&[100; 6])).expect("rounds");
        assert_eq!(format!("{p}"), "1.000 [1.000, 1.000]");
    }

    #[test]
    fn mismatched_or_empty_sides_compare_nothing() {
        assert_eq!(PairedRatio::new(&[], &[]), None);
        assert_eq!(PairedRatio::new(&ns(&[1, 2]), &ns(&[1])), None);
    }
}
