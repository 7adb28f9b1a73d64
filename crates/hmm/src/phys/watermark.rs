//! The free-memory watermarks (`WMARK_LOW`, `WMARK_HIGH`) and kswapd's wake-up: an
//! allocation that leaves fewer free frames than the low mark wakes kswapd
//! (`wakeup_kswapd`), which reclaims until the high mark is reached (see
//! `mm::vmscan::Kswapd`). Unarmed (both zero) by default, so an allocation costs one
//! load more.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// The low and high watermarks of free frames, and the wait queue kswapd sleeps on.
#[derive(Default)]
pub struct Watermarks {
    low: AtomicU64,
    high: AtomicU64,
    woken: parking_lot::Mutex<bool>,
    cond: parking_lot::Condvar,
}

impl Watermarks {
    /// Sets the marks in frames: below `low` free frames kswapd is woken, and it
    /// reclaims until `high` are free. `(0, 0)` disarms them. A `high` below `low` is
    /// raised to `low`.
    pub fn set(&self, low: u64, high: u64) {
        self.high.store(high.max(low), Relaxed);
        self.low.store(low, Relaxed);
    }

    /// The low mark.
    pub fn low(&self) -> u64 {
        self.low.load(Relaxed)
    }

    /// The high mark.
    pub fn high(&self) -> u64 {
        self.high.load(Relaxed)
    }

    pub(crate) fn armed(&self) -> bool {
        self.low.load(Relaxed) > 0
    }

    /// Wakes kswapd if `free` is below the low mark.
    pub(crate) fn check(&self, free: u64) {
        if free < self.low.load(Relaxed) {
            self.wake();
        }
    }

    /// Wakes kswapd (`wakeup_kswapd`).
    pub fn wake(&self) {
        let mut w = self.woken.lock();
        if !*w {
            *w = true;
            self.cond.notify_all();
        }
    }

    /// Sleeps until woken or `timeout` passed; returns whether it was woken (and clears
    /// the wake-up).
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        let mut w = self.woken.lock();
        if !*w {
            self.cond.wait_for(&mut w, timeout);
        }
        std::mem::take(&mut *w)
    }
}

impl std::fmt::Debug for Watermarks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watermarks")
            .field("low", &self.low())
            .field("high", &self.high())
            .finish()
    }
}
