//! Interval notifiers and the sequence protocol (`mmu_interval_notifier`).
//!
//! This reproduces `mm/mmu_notifier.c` exactly:
//!
//! 1. Per address space there is one `invalidate_seq` (starts at 2; even = idle), a count of
//!    active invalidations, the interval tree, and a deferred list of inserts and removes.
//! 2. `invalidate_range_start` increments the active count; if any interval intersects the
//!    range it makes the global seq odd and calls each intersecting subscription's
//!    [`IntervalNotifierOps::invalidate`] with `cur_seq` = the global seq. The callback records
//!    it with [`IntervalSub::set_seq`] under the driver's lock.
//! 3. `invalidate_range_end` decrements the active count; when it reaches zero with an odd
//!    seq it increments the seq (even again, a new value), applies deferred inserts and
//!    removes, and wakes sleepers.
//! 4. [`IntervalSub::read_begin`] returns the subscription's own seq, first sleeping while an
//!    invalidation that hit this subscription is still running (its seq equals the odd
//!    global seq).
//! 5. [`IntervalSub::read_retry`] is "the subscription's seq changed since `read_begin`".
//! 6. A new subscription starts at `global - 1` when idle (odd, never equal to the even
//!    global seq); if inserted during an invalidation it starts equal to the global seq so
//!    that `read_begin` waits for that invalidation.
//! 7. A callback that returns without calling `set_seq` (a driver ignoring its own
//!    `MIGRATE` event) makes neither `read_begin` block nor `read_retry` fire.
//!
//! The tree is only modified while no invalidation has made the seq odd, so callbacks run
//! without the subscriptions lock, on subscriptions that cannot vanish under them: a remove
//! during an invalidation is deferred and [`IntervalNotifier::remove`] sleeps until that
//! invalidation ends, after which no callback runs.

use crate::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::sync::{Condvar, Mutex};

use super::range::NotifierRange;
use super::{MmNotifiers, NotifierError};
use crate::addr::VaRange;
use crate::interval_tree::IntervalTree;

/// The sequence a mirror read started at ([`IntervalSub::read_begin`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a read sequence must be checked with read_retry"]
pub struct ReadSeq(u64);

impl ReadSeq {
    /// The raw sequence number.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

/// The sequence an invalidation runs at; always odd. Passed to
/// [`IntervalNotifierOps::invalidate`], recorded with [`IntervalSub::set_seq`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidateSeq(u64);

impl InvalidateSeq {
    /// The raw sequence number.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

/// What a driver does when an interval it watches is invalidated
/// (`struct mmu_interval_notifier_ops`).
pub trait IntervalNotifierOps: Send + Sync {
    /// Called before entries in `range` (which intersects `sub`) change. Must, under the
    /// driver's lock, call `sub.set_seq(cur_seq)` and stop using device mappings of the
    /// range — unless the event is one the driver may ignore (its own `MIGRATE`). Return
    /// `false` only if `range` is not blockable and the work would sleep.
    fn invalidate(&self, sub: &IntervalSub, range: &NotifierRange, cur_seq: InvalidateSeq) -> bool;
}

/// An interval subscription, as seen by its callback and by the driver's read loop.
pub struct IntervalSub {
    id: u64,
    range: VaRange,
    ops: Arc<dyn IntervalNotifierOps>,
    invalidate_seq: AtomicU64,
    subs: Arc<MmNotifiers>,
}

impl IntervalSub {
    /// The watched range.
    pub fn range(&self) -> VaRange {
        self.range
    }

    /// The address space watched.
    pub fn mm(&self) -> super::MmId {
        self.subs.mm()
    }

    /// Starts a read-side critical section; sleeps while an invalidation of this interval
    /// is in progress.
    #[doc(alias = "mmu_interval_read_begin")]
    pub fn read_begin(&self) -> ReadSeq {
        let itree = &self.subs.itree;
        let mut st = itree.state.lock();
        let seq = self.invalidate_seq.load(Ordering::Acquire);
        if seq == st.invalidate_seq {
            while st.invalidate_seq == seq {
                itree.wq.wait(&mut st);
            }
        }
        ReadSeq(seq)
    }

    /// Whether an invalidation collided with the read that started at `seq`. Must be called
    /// under the same driver lock that the `invalidate` callback takes.
    #[doc(alias = "mmu_interval_read_retry")]
    pub fn read_retry(&self, seq: ReadSeq) -> bool {
        self.invalidate_seq.load(Ordering::Acquire) != seq.0
    }

    /// A lock-free early hint of [`read_retry`](Self::read_retry) (may miss a collision
    /// that is just happening).
    #[doc(alias = "mmu_interval_check_retry")]
    pub fn check_retry(&self, seq: ReadSeq) -> bool {
        self.invalidate_seq.load(Ordering::Relaxed) != seq.0
    }

    /// Records the invalidation's seq; called from `invalidate` under the driver lock.
    #[doc(alias = "mmu_interval_set_seq")]
    pub fn set_seq(&self, cur_seq: InvalidateSeq) {
        self.invalidate_seq.store(cur_seq.0, Ordering::Release);
    }

    fn key(&self) -> (u64, u64) {
        (self.range.start().as_u64(), self.id)
    }
}

impl std::fmt::Debug for IntervalSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntervalSub")
            .field("id", &self.id)
            .field("range", &self.range)
            .field(
                "invalidate_seq",
                &self.invalidate_seq.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

/// The handle of a registered interval notifier; dropping it removes the notifier.
#[must_use = "dropping the handle removes the notifier"]
#[derive(Debug)]
pub struct IntervalNotifier {
    sub: Arc<IntervalSub>,
}

impl std::ops::Deref for IntervalNotifier {
    type Target = IntervalSub;

    fn deref(&self) -> &IntervalSub {
        &self.sub
    }
}

impl IntervalNotifier {
    /// Unregisters; if an invalidation is running, sleeps until it ends. After this returns
    /// no callback runs. Must not be called from a callback.
    #[doc(alias = "mmu_interval_notifier_remove")]
    pub fn remove(self) {
        // Drop does the work.
    }
}

impl Drop for IntervalNotifier {
    fn drop(&mut self) {
        let itree = &self.sub.subs.itree;
        let mut st = itree.state.lock();
        let key = self.sub.key();
        if st.is_invalidating() {
            if st.tree.contains_key(&key) {
                st.deferred.push(Arc::clone(&self.sub));
                let seq = st.invalidate_seq;
                while st.is_invalidating() && st.invalidate_seq == seq {
                    itree.wq.wait(&mut st);
                }
            } else {
                // A deferred insert that never happened: cancel it.
                st.deferred.retain(|s| !Arc::ptr_eq(s, &self.sub));
            }
        } else {
            st.tree.remove(&key);
        }
    }
}

/// The subscriptions by `(start, id)` in an augmented interval tree (the kernel's
/// `mm->notifier_subscriptions->itree`): a lookup costs `O(log n + k)` whatever the
/// lengths, a whole-address-space subscription included.
#[derive(Default)]
struct Intervals {
    tree: IntervalTree<Arc<IntervalSub>>,
}

impl Intervals {
    fn insert(&mut self, sub: Arc<IntervalSub>) {
        let (start, id) = sub.key();
        let end = sub.range.end().as_u64();
        self.tree.insert(start, end, id, sub);
    }

    fn remove(&mut self, key: &(u64, u64)) -> Option<Arc<IntervalSub>> {
        self.tree.remove(key.0, key.1)
    }

    fn contains_key(&self, key: &(u64, u64)) -> bool {
        self.tree.contains_key(key.0, key.1)
    }

    fn len(&self) -> usize {
        self.tree.len()
    }

    /// The subscriptions overlapping `[s, e)`, in address order.
    fn overlapping(&self, s: u64, e: u64) -> Vec<Arc<IntervalSub>> {
        let mut hits = Vec::new();
        self.tree
            .for_each_overlapping(s, e, |sub| hits.push(Arc::clone(sub)));
        hits
    }
}

pub(crate) struct ItreeState {
    invalidate_seq: u64,
    active_invalidate_ranges: u64,
    tree: Intervals,
    deferred: Vec<Arc<IntervalSub>>,
}

impl ItreeState {
    fn is_invalidating(&self) -> bool {
        self.invalidate_seq & 1 == 1
    }
}

/// The interval tree and its sequence state (part of `mmu_notifier_subscriptions`).
pub(crate) struct Itree {
    state: Mutex<ItreeState>,
    wq: Condvar,
    next_id: AtomicU64,
}

impl Itree {
    pub(crate) fn new() -> Self {
        Itree {
            state: Mutex::new(ItreeState {
                invalidate_seq: 2,
                active_invalidate_ranges: 0,
                tree: Intervals::default(),
                deferred: Vec::new(),
            }),
            wq: Condvar::new(),
            next_id: AtomicU64::new(1),
        }
    }

    /// Number of registered intervals (deferred inserts not counted).
    pub(crate) fn len(&self) -> usize {
        self.state.lock().tree.len()
    }

    pub(crate) fn insert(
        subs: &Arc<MmNotifiers>,
        range: VaRange,
        ops: Arc<dyn IntervalNotifierOps>,
    ) -> IntervalNotifier {
        let itree = &subs.itree;
        let sub = Arc::new(IntervalSub {
            id: itree.next_id.fetch_add(1, Ordering::Relaxed),
            range,
            ops,
            invalidate_seq: AtomicU64::new(0),
            subs: Arc::clone(subs),
        });
        let mut st = itree.state.lock();
        if st.active_invalidate_ranges > 0 {
            if st.is_invalidating() {
                st.deferred.push(Arc::clone(&sub));
            } else {
                st.invalidate_seq |= 1;
                st.tree.insert(Arc::clone(&sub));
            }
            sub.invalidate_seq
                .store(st.invalidate_seq, Ordering::Release);
        } else {
            debug_assert!(!st.is_invalidating());
            sub.invalidate_seq
                .store(st.invalidate_seq - 1, Ordering::Release);
            st.tree.insert(Arc::clone(&sub));
        }
        IntervalNotifier { sub }
    }

    /// `mn_itree_invalidate`: the start half. On `Err` the invalidation is already ended.
    pub(crate) fn invalidate_start(
        &self,
        range: &NotifierRange,
        calls: &std::sync::atomic::AtomicU64,
    ) -> Result<(), NotifierError> {
        let (hits, cur_seq) = {
            let mut st = self.state.lock();
            st.active_invalidate_ranges += 1;
            let (s, e) = (range.start().as_u64(), range.end().as_u64());
            let hits = st.tree.overlapping(s, e);
            if !hits.is_empty() {
                st.invalidate_seq |= 1;
            }
            (hits, st.invalidate_seq)
        };
        for sub in hits {
            calls.fetch_add(1, Ordering::Relaxed);
            if !sub.ops.invalidate(&sub, range, InvalidateSeq(cur_seq)) {
                if range.is_blockable() {
                    debug_assert!(false, "interval notifier refused a blockable range");
                    continue;
                }
                self.invalidate_end();
                return Err(NotifierError::WouldBlock);
            }
        }
        Ok(())
    }

    /// `mn_itree_inv_end`.
    pub(crate) fn invalidate_end(&self) {
        let mut st = self.state.lock();
        st.active_invalidate_ranges -= 1;
        if st.active_invalidate_ranges > 0 || !st.is_invalidating() {
            return;
        }
        st.invalidate_seq += 1;
        for sub in std::mem::take(&mut st.deferred) {
            if st.tree.remove(&sub.key()).is_none() {
                st.tree.insert(sub);
            }
        }
        drop(st);
        self.wq.notify_all();
    }
}
