//! What a run looked like over simulated time, for `--plot` and `--report`: the pages moved
//! so far in each direction and each GPU's resident memory, sampled whenever the driver
//! moved pages (a fault batch, a CPU fault, a prefetch, an access-counter migration, a GPU
//! going offline), and the sizes of the fault batches.
//!
//! Bounded whatever the run's length: at most [`MAX_SAMPLES`] samples. When they fill up,
//! every other one is dropped and from then on only every second moment is sampled (then
//! every fourth, ...), so a long run keeps an even spread; the last moment is always kept.

use serde::Serialize;

/// The most samples a recording keeps.
pub const MAX_SAMPLES: usize = 4096;

/// Fault-batch sizes are counted in bins of powers of two: 1, 2-3, 4-7, ..., 512 and more.
pub const BATCH_BINS: usize = 10;

/// One moment of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sample {
    /// Simulated time, ns.
    pub t_ns: u64,
    /// Pages moved host to GPU so far (all GPUs).
    pub h2d_pages: u64,
    /// Pages moved GPU to host so far.
    pub d2h_pages: u64,
    /// Pages moved GPU to GPU directly so far.
    pub d2d_pages: u64,
    /// Each GPU's pages of device memory in use.
    pub resident_pages: Vec<u64>,
}

/// A run's samples and fault-batch sizes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Recording {
    /// The samples, in time order.
    pub samples: Vec<Sample>,
    /// Fault batches by size: bin `i` holds batches of `2^i` to `2^(i+1) - 1` faults (the
    /// last bin: 512 and more).
    pub batch_sizes: [u64; BATCH_BINS],
    /// Sample one moment in this many.
    #[serde(skip)]
    stride: u64,
    /// Moments offered so far.
    #[serde(skip)]
    seen: u64,
    /// The latest moment offered, kept if the stride skipped it.
    #[serde(skip)]
    last: Option<Sample>,
}

impl Recording {
    /// An empty recording.
    pub fn new() -> Recording {
        Recording {
            stride: 1,
            ..Recording::default()
        }
    }

    /// Offers the moment `s` (later than every one before).
    pub fn sample(&mut self, s: Sample) {
        self.seen += 1;
        if (self.seen - 1) % self.stride != 0 {
            self.last = Some(s);
            return;
        }
        self.last = None;
        if self.samples.len() == MAX_SAMPLES {
            let mut k = 0;
            self.samples.retain(|_| {
                k += 1;
                k % 2 == 1
            });
            self.stride *= 2;
        }
        self.samples.push(s);
    }

    /// Counts a fault batch of `faults` faults.
    pub fn batch(&mut self, faults: u64) {
        // CAST: a log2 of a u64, below 64.
        let bin = (faults.max(1).ilog2() as usize).min(BATCH_BINS - 1);
        self.batch_sizes[bin] += 1;
    }

    /// Ends the recording: the last moment offered is kept.
    pub fn finish(&mut self) {
        if let Some(s) = self.last.take() {
            self.samples.push(s);
        }
    }

    /// The label of batch-size bin `i`: `1`, `2-3`, ..., `512+`.
    pub fn bin_label(i: usize) -> String {
        match i {
            0 => "1".into(),
            _ if i == BATCH_BINS - 1 => format!("{}+", 1u64 << i),
            _ => format!("{}-{}", 1u64 << i, (1u64 << (i + 1)) - 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: u64) -> Sample {
        Sample {
            t_ns: t,
            h2d_pages: t,
            d2h_pages: 0,
            d2d_pages: 0,
            resident_pages: vec![t],
        }
    }

    #[test]
    fn samples_stay_bounded_evenly_spread_and_keep_the_end() {
        let mut r = Recording::new();
        let n = 3 * MAX_SAMPLES as u64 + 5;
        for t in 0..n {
            r.sample(at(t));
        }
        r.finish();
        assert!(r.samples.len() <= MAX_SAMPLES + 1, "{}", r.samples.len());
        assert!(r.samples.len() > MAX_SAMPLES / 2);
        assert_eq!(r.samples[0].t_ns, 0);
        assert_eq!(r.samples.last().unwrap().t_ns, n - 1, "the end is kept");
        let gaps: Vec<u64> = r
            .samples
            .windows(2)
            .map(|w| w[1].t_ns - w[0].t_ns)
            .collect();
        let stride = gaps[0];
        assert!(
            gaps[..gaps.len() - 1].iter().all(|&g| g == stride),
            "evenly spread"
        );
    }

    #[test]
    fn batches_fall_in_power_of_two_bins() {
        let mut r = Recording::new();
        for f in [1, 2, 3, 4, 255, 256, 511, 512, 100_000] {
            r.batch(f);
        }
        assert_eq!(r.batch_sizes, [1, 2, 1, 0, 0, 0, 0, 1, 2, 2]);
        assert_eq!(Recording::bin_label(0), "1");
        assert_eq!(Recording::bin_label(1), "2-3");
        assert_eq!(Recording::bin_label(BATCH_BINS - 1), "512+");
    }
}
