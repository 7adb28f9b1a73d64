//! Fault injection: make chosen calls of a fallible operation fail, as the kernel's
//! fault-injection framework does (`lib/fault-inject.c`, `struct fault_attr`,
//! `should_fail()`).
//!
//! A [`FaultAttr`] sits in front of one operation: system RAM's allocator has one
//! ([`PhysMem::fail_page_alloc`](crate::phys::PhysMem::fail_page_alloc), the kernel's
//! `fail_page_alloc`), and a device driver can put one in front of its own memory (the
//! dmirror driver does). Each call of the operation asks [`FaultAttr::should_fail`] first and
//! fails as if the resource ran out when it says so.
//!
//! The decision follows `should_fail_ex()`, in the kernel's order:
//!
//! 1. nothing fails while the attribute is disabled (the default, one relaxed load);
//! 2. nothing fails once `times` failures have been injected;
//! 3. the first `space` calls pass;
//! 4. of the rest, only every `interval`-th call is a candidate;
//! 5. a candidate fails with `probability` percent, drawn from a generator seeded by
//!    `seed`, so a run is reproducible when the calls come in the same order.
//!
//! [`FaultAttr::fail_nth`] is the kernel's `/proc/self/fail-nth`: exactly the `n`-th call
//! from now fails, once, which lets a test walk an operation's failure points one by one
//! (arm `n = 1, 2, …` until the operation no longer fails).
//!
//! Every call made while enabled is counted, so a test can first run an operation with
//! [`FaultConfig::counting`] to learn how many failure points it has.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::sync::Mutex;

/// When calls fail (the knobs of `struct fault_attr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultConfig {
    /// Percent of candidate calls that fail, 0 to 100.
    pub probability: u32,
    /// Only every `interval`-th call past `space` is a candidate (1: every call).
    pub interval: u64,
    /// Failures to inject at most; `None` for no limit (the kernel's `times = -1`).
    pub times: Option<u64>,
    /// Calls that pass before any may fail.
    pub space: u64,
    /// Seed of the generator that draws against `probability`.
    pub seed: u64,
}

impl FaultConfig {
    /// Every call fails, without limit.
    pub const ALWAYS: FaultConfig = FaultConfig {
        probability: 100,
        interval: 1,
        times: None,
        space: 0,
        seed: 0,
    };

    /// Nothing fails, but calls are counted (see [`FaultAttr::stats`]).
    pub const fn counting() -> FaultConfig {
        FaultConfig {
            probability: 0,
            ..FaultConfig::ALWAYS
        }
    }

    /// Calls fail with `probability` percent, without limit, drawn from `seed`.
    pub const fn random(probability: u32, seed: u64) -> FaultConfig {
        FaultConfig {
            probability,
            seed,
            ..FaultConfig::ALWAYS
        }
    }

    /// Exactly the `n`-th call (counting from 1) fails.
    pub const fn nth(n: u64) -> FaultConfig {
        FaultConfig {
            space: n.saturating_sub(1),
            times: Some(1),
            ..FaultConfig::ALWAYS
        }
    }
}

/// What a [`FaultAttr`] has seen since it was last configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct FaultStats {
    /// Calls made while enabled.
    pub calls: u64,
    /// Calls that were made to fail.
    pub injected: u64,
}

/// The state the decision updates.
#[derive(Debug)]
struct State {
    config: FaultConfig,
    /// Candidates seen (for `interval`).
    count: u64,
    /// The generator (SplitMix64).
    rng: u64,
}

/// One injection point's configuration and counters (`struct fault_attr`).
#[doc(alias = "fault_attr")]
#[derive(Debug)]
pub struct FaultAttr {
    enabled: AtomicBool,
    state: Mutex<State>,
    calls: AtomicU64,
    injected: AtomicU64,
}

impl Default for FaultAttr {
    fn default() -> Self {
        FaultAttr {
            enabled: AtomicBool::new(false),
            state: Mutex::new(State {
                config: FaultConfig::counting(),
                count: 0,
                rng: 0,
            }),
            calls: AtomicU64::new(0),
            injected: AtomicU64::new(0),
        }
    }
}

/// Error of [`FaultAttr::set`]: a configuration the kernel would refuse too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FaultConfigError {
    /// `probability` above 100.
    #[error("probability {0} is above 100 percent")]
    Probability(u32),
    /// `interval` of 0.
    #[error("interval must be at least 1")]
    Interval,
}

impl FaultAttr {
    /// A disabled attribute.
    pub fn new() -> FaultAttr {
        FaultAttr::default()
    }

    /// Enables injection with `config`, and starts the counters again from zero.
    pub fn set(&self, config: FaultConfig) -> Result<(), FaultConfigError> {
        if config.probability > 100 {
            return Err(FaultConfigError::Probability(config.probability));
        }
        if config.interval == 0 {
            return Err(FaultConfigError::Interval);
        }
        let mut st = self.state.lock();
        *st = State {
            config,
            count: 0,
            rng: config.seed,
        };
        self.calls.store(0, Ordering::Relaxed);
        self.injected.store(0, Ordering::Relaxed);
        self.enabled.store(true, Ordering::Release);
        Ok(())
    }

    /// Makes exactly the `n`-th call from now fail (`/proc/self/fail-nth`); `n = 0`
    /// disables injection.
    #[doc(alias = "fail-nth")]
    pub fn fail_nth(&self, n: u64) {
        if n == 0 {
            self.disable();
        } else {
            self.set(FaultConfig::nth(n))
                .expect("the nth configuration is valid");
        }
    }

    /// Stops injecting; the counters keep their values.
    pub fn disable(&self) {
        self.enabled.store(false, Ordering::Release);
    }

    /// Whether injection is on.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Calls seen and failures injected since the last [`set`](Self::set).
    pub fn stats(&self) -> FaultStats {
        FaultStats {
            calls: self.calls.load(Ordering::Relaxed),
            injected: self.injected.load(Ordering::Relaxed),
        }
    }

    /// Whether this call fails (`should_fail()`); see the module docs for the order of
    /// the tests.
    #[inline]
    pub fn should_fail(&self) -> bool {
        if !self.enabled.load(Ordering::Relaxed) {
            return false;
        }
        self.decide()
    }

    #[cold]
    fn decide(&self) -> bool {
        let mut st = self.state.lock();
        self.calls.fetch_add(1, Ordering::Relaxed);
        if st.config.times == Some(0) {
            return false;
        }
        if st.config.space > 0 {
            st.config.space -= 1;
            return false;
        }
        st.count += 1;
        if st.count % st.config.interval != 0 {
            return false;
        }
        if st.config.probability < 100 {
            st.rng = st.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
            if splitmix(st.rng) % 100 >= u64::from(st.config.probability) {
                return false;
            }
        }
        if let Some(t) = &mut st.config.times {
            *t -= 1;
        }
        self.injected.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// SplitMix64's output function.
fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(attr: &FaultAttr, calls: usize) -> Vec<bool> {
        (0..calls).map(|_| attr.should_fail()).collect()
    }

    #[test]
    fn disabled_never_fails_and_counts_nothing() {
        let a = FaultAttr::new();
        assert!(pattern(&a, 100).iter().all(|f| !f));
        assert_eq!(a.stats(), FaultStats::default());
    }

    #[test]
    fn nth_fails_exactly_that_call_once() {
        let a = FaultAttr::new();
        a.fail_nth(3);
        assert_eq!(pattern(&a, 6), [false, false, true, false, false, false]);
        assert_eq!(
            a.stats(),
            FaultStats {
                calls: 6,
                injected: 1
            }
        );
        a.fail_nth(0);
        assert!(!a.is_enabled());
    }

    #[test]
    fn interval_times_and_space_combine_as_in_the_kernel() {
        let a = FaultAttr::new();
        a.set(FaultConfig {
            probability: 100,
            interval: 2,
            times: Some(2),
            space: 1,
            seed: 0,
        })
        .unwrap();
        // Call 1 is space; then every second candidate, twice.
        assert_eq!(
            pattern(&a, 8),
            [false, false, true, false, true, false, false, false]
        );
    }

    #[test]
    fn probability_is_reproducible_and_roughly_right() {
        let a = FaultAttr::new();
        a.set(FaultConfig::random(10, 7)).unwrap();
        let first = pattern(&a, 10_000);
        a.set(FaultConfig::random(10, 7)).unwrap();
        assert_eq!(pattern(&a, 10_000), first, "same seed, same failures");
        let n = first.iter().filter(|f| **f).count();
        assert!((800..1200).contains(&n), "{n} failures in 10,000 at 10%");
        a.set(FaultConfig::counting()).unwrap();
        assert!(pattern(&a, 1000).iter().all(|f| !f));
        assert_eq!(a.stats().calls, 1000);
    }
}
