//! Thrashing: a page moving back and forth between the GPU and the CPU (UVM's
//! `uvm_perf_thrashing.c`).
//!
//! Every migration of a page, either way, is an event in the page's [`PageHistory`]. A
//! page with `threshold` events each within one `lapse` of the previous is thrashing. The
//! first `pin_threshold` times the driver is told to throttle (UVM naps the faulting
//! processor for a lapse; here the page is not migrated during that lapse and the GPU maps
//! it where it is, remotely); after that the page is pinned where it is for `pin_lapses`
//! lapses, mapped remotely by the GPU. A history older than `epoch_lapses` lapses starts
//! afresh. Times come from the driver's [`Clock`](crate::clock::Clock).

use serde::Serialize;

/// UVM's thrashing parameters (`uvm_perf_thrashing_*` module parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ThrashingConfig {
    /// The lapse, in nanoseconds (500 µs).
    pub lapse_ns: u64,
    /// Events within consecutive lapses that mean thrashing (3).
    pub threshold: u32,
    /// Throttles before the page is pinned (10).
    pub pin_threshold: u32,
    /// Lapses a pin lasts (300: 150 ms).
    pub pin_lapses: u64,
    /// Lapses after which a page's history is forgotten (2000: 1 s).
    pub epoch_lapses: u64,
}

impl Default for ThrashingConfig {
    fn default() -> Self {
        ThrashingConfig {
            lapse_ns: 500_000,
            threshold: 3,
            pin_threshold: 10,
            pin_lapses: 300,
            epoch_lapses: 2000,
        }
    }
}

/// What the detector knows of one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct PageHistory {
    /// When the history (re)started.
    pub epoch_start: u64,
    /// The last event.
    pub last_event: u64,
    /// Events in a row, each within a lapse of the one before.
    pub events: u32,
    /// Throttles since the last pin.
    pub throttles: u32,
    /// Throttled until then.
    pub throttled_until: u64,
    /// Pinned until then.
    pub pinned_until: u64,
}

/// The detector's advice for a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ThrashHint {
    /// Not thrashing: migrate as the policy says.
    None,
    /// Thrashing: leave the page where it is for now (until the time given).
    Throttle {
        /// End of the throttle, in the clock's nanoseconds.
        until_ns: u64,
    },
    /// Thrashing persistently: leave it where it is, mapped remotely, until then.
    Pin {
        /// End of the pin.
        until_ns: u64,
    },
}

/// What an event changed: whether it was detected as thrashing, and the hint now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrashEvent {
    /// The event completed a thrashing pattern.
    pub detected: bool,
    /// The hint that applies from now on.
    pub hint: ThrashHint,
}

/// UVM's detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ThrashingDetector {
    /// Its parameters.
    pub config: ThrashingConfig,
}

impl ThrashingDetector {
    /// Records a migration of the page at `now`.
    pub fn on_migration(&self, h: &mut PageHistory, now: u64) -> ThrashEvent {
        let c = &self.config;
        let epoch = c.lapse_ns.saturating_mul(c.epoch_lapses);
        if now.saturating_sub(h.epoch_start) > epoch {
            *h = PageHistory {
                epoch_start: now,
                ..PageHistory::default()
            };
        }
        h.events = if h.events > 0 && now.saturating_sub(h.last_event) <= c.lapse_ns {
            h.events + 1
        } else {
            1
        };
        h.last_event = now;
        let detected = h.events >= c.threshold;
        if detected {
            h.events = 0;
            h.throttles += 1;
            if h.throttles > c.pin_threshold {
                h.throttles = 0;
                h.pinned_until = now.saturating_add(c.lapse_ns.saturating_mul(c.pin_lapses));
            } else {
                h.throttled_until = now.saturating_add(c.lapse_ns);
            }
        }
        ThrashEvent {
            detected,
            hint: self.hint(h, now),
        }
    }

    /// The advice for a page at `now`.
    pub fn hint(&self, h: &PageHistory, now: u64) -> ThrashHint {
        if h.pinned_until > now {
            ThrashHint::Pin {
                until_ns: h.pinned_until,
            }
        } else if h.throttled_until > now {
            ThrashHint::Throttle {
                until_ns: h.throttled_until,
            }
        } else {
            ThrashHint::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: u64 = 1000;

    #[test]
    fn three_events_within_lapses_throttle_and_ten_throttles_pin() {
        let d = ThrashingDetector::default();
        let mut h = PageHistory::default();
        let mut t = 0;
        assert!(!d.on_migration(&mut h, t).detected);
        t += 400 * US;
        assert!(!d.on_migration(&mut h, t).detected);
        t += 400 * US;
        let e = d.on_migration(&mut h, t);
        assert!(e.detected);
        assert_eq!(
            e.hint,
            ThrashHint::Throttle {
                until_ns: t + 500 * US
            }
        );
        assert_eq!(
            d.hint(&h, t + 500 * US),
            ThrashHint::None,
            "a throttle lasts a lapse"
        );
        // Events further apart than a lapse never add up.
        let mut slow = PageHistory::default();
        for k in 0..10 {
            assert!(!d.on_migration(&mut slow, k * 600 * US).detected);
        }
        // Ten throttles, then the eleventh detection pins for 300 lapses.
        for n in 2..=11 {
            for _ in 0..3 {
                t += 100 * US;
                d.on_migration(&mut h, t);
            }
            if n <= 10 {
                assert!(matches!(d.hint(&h, t), ThrashHint::Throttle { .. }), "{n}");
            }
        }
        assert_eq!(
            d.hint(&h, t),
            ThrashHint::Pin {
                until_ns: t + 150_000 * US
            }
        );
        assert_eq!(d.hint(&h, t + 150_000 * US), ThrashHint::None);
    }

    #[test]
    fn an_old_history_is_forgotten_after_an_epoch() {
        let d = ThrashingDetector::default();
        let mut h = PageHistory::default();
        d.on_migration(&mut h, 0);
        d.on_migration(&mut h, 100 * US);
        // 1 s + later: a fresh epoch, the two events are gone.
        let e = d.on_migration(&mut h, 1_000_200 * US);
        assert!(!e.detected);
        assert_eq!((h.events, h.epoch_start), (1, 1_000_200 * US));
    }
}
