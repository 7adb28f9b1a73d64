//! Deadlock detection: every thread of the run beats a heart (a counter it bumps after
//! each operation); the watchdog looks at them every 100 ms and declares a deadlock when
//! one has not moved for the stall limit while the run is still going. It then names the
//! stuck threads and what each was last doing. A deadlocked thread cannot be freed, so
//! the caller reports and exits the process.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// One thread's heartbeat.
pub(crate) struct Heart {
    name: String,
    beats: AtomicU64,
    doing: Mutex<&'static str>,
}

impl Heart {
    pub(crate) fn new(name: impl Into<String>) -> Heart {
        Heart {
            name: name.into(),
            beats: AtomicU64::new(0),
            doing: Mutex::new("starting"),
        }
    }

    /// Says what the thread is about to do.
    pub(crate) fn doing(&self, what: &'static str) {
        *self.doing.lock() = what;
    }

    /// One operation done.
    pub(crate) fn beat(&self) {
        self.beats.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn beats(&self) -> u64 {
        self.beats.load(Ordering::Relaxed)
    }
}

/// Watches `hearts` until `done`; returns the stuck threads (`name: doing`) if some heart
/// stood still for `stall`.
pub(crate) fn watch(hearts: &[Heart], done: &AtomicBool, stall: Duration) -> Vec<String> {
    let mut last: Vec<(u64, Instant)> =
        hearts.iter().map(|h| (h.beats(), Instant::now())).collect();
    while !done.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(100));
        let now = Instant::now();
        let mut stuck = Vec::new();
        for (h, (beats, since)) in hearts.iter().zip(&mut last) {
            let b = h.beats();
            if b != *beats {
                *beats = b;
                *since = now;
            } else if now - *since > stall {
                stuck.push(format!("{}: {}", h.name, *h.doing.lock()));
            }
        }
        if !stuck.is_empty() && !done.load(Ordering::Acquire) {
            return stuck;
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_still_heart_is_reported_and_a_beating_one_is_not() {
        let hearts = [Heart::new("busy"), Heart::new("stuck")];
        hearts[1].doing("waiting forever");
        let done = AtomicBool::new(false);
        let stuck = std::thread::scope(|s| {
            let w = s.spawn(|| watch(&hearts, &done, Duration::from_millis(300)));
            while !w.is_finished() {
                hearts[0].beat();
                std::thread::sleep(Duration::from_millis(10));
            }
            w.join().unwrap()
        });
        assert_eq!(stuck, ["stuck: waiting forever"]);
    }
}
