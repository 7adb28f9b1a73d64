//! Time for the policies: a clock the caller supplies, so a policy behaves the same under
//! the wall clock (real runs) and under a workload engine's simulated clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// A source of nanoseconds since some start.
pub trait Clock: Send + Sync {
    /// Now, in nanoseconds.
    fn now_ns(&self) -> u64;
}

/// The host's monotonic clock, from when it was made.
#[derive(Debug)]
pub struct WallClock {
    start: Instant,
}

impl WallClock {
    /// A clock reading 0 now.
    pub fn new() -> WallClock {
        WallClock {
            start: Instant::now(),
        }
    }
}

impl Default for WallClock {
    fn default() -> Self {
        WallClock::new()
    }
}

impl Clock for WallClock {
    fn now_ns(&self) -> u64 {
        // CAST: u64 nanoseconds last 584 years.
        self.start.elapsed().as_nanos() as u64
    }
}

/// A clock its owner sets (a simulator's, or a test's).
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicU64,
}

impl ManualClock {
    /// A clock reading `ns`.
    pub fn new(ns: u64) -> ManualClock {
        ManualClock {
            now: AtomicU64::new(ns),
        }
    }

    /// Sets the time; it never goes back (an earlier value is ignored).
    pub fn set(&self, ns: u64) {
        self.now.fetch_max(ns, Ordering::Relaxed);
    }

    /// Moves the time forward by `ns`.
    pub fn advance(&self, ns: u64) {
        self.now.fetch_add(ns, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.now.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_move_forward() {
        let m = ManualClock::new(10);
        m.advance(5);
        m.set(3);
        assert_eq!(m.now_ns(), 15);
        m.set(20);
        assert_eq!(m.now_ns(), 20);
        let w = WallClock::new();
        let a = w.now_ns();
        assert!(w.now_ns() >= a);
    }
}
