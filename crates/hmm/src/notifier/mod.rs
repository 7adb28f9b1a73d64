//! MMU notifiers: telling mirrors *before* a CPU mapping changes, with the reason.
//!
//! Every address space has one [`MmNotifiers`] (the kernel's `mmu_notifier_subscriptions`)
//! holding two kinds of subscribers:
//!
//! * full-mm notifiers ([`MmuNotifier`]): `invalidate_range_start`/`end` for every change
//!   and `release` at teardown;
//! * interval notifiers ([`IntervalNotifierOps`], see [`interval`]): one callback per change
//!   that intersects the subscribed interval, with the sequence protocol that lets a driver
//!   commit device mappings safely (`read_begin` / `read_retry`).
//!
//! # Protocol
//!
//! An operation that changes entries calls [`MmNotifiers::invalidate_range_start`] with a
//! [`NotifierRange`] (event, owner, VMA) *before* the change is visible, with the mmap lock
//! held and no page-table lock held; it changes the entries; then it ends the returned
//! [`Invalidation`] (explicitly or by dropping it). Interval callbacks run first, then
//! full-mm callbacks, as in the kernel; on end the interval state ends first.
//!
//! Callbacks may take driver locks; a driver must therefore never hold its mirror lock
//! while it calls anything that can invalidate (faults, migration, munmap).
//!
//! ```
//! use std::sync::Arc;
//! use hmm::addr::PAGE_SIZE;
//! use hmm::mm::{MapFlags, Mm, Prot};
//! use hmm::notifier::{IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierEvent, NotifierRange, Recorder};
//! use hmm::phys::{PhysConfig, PhysMem};
//!
//! struct Mirror;
//! impl IntervalNotifierOps for Mirror {
//!     fn invalidate(&self, sub: &IntervalSub, _: &NotifierRange, seq: InvalidateSeq) -> bool {
//!         sub.set_seq(seq); // under the driver's lock, with its device entries dropped
//!         true
//!     }
//! }
//!
//! let mm = Mm::new(PhysMem::new(PhysConfig::with_size(16 << 20))?);
//! let a = mm.mmap(None, 8 * PAGE_SIZE, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)?;
//! mm.write(a, &[1; 8 * PAGE_SIZE as usize])?;
//! let n = mm.interval_notifier_insert(a, 8 * PAGE_SIZE, Arc::new(Mirror))?;
//! let events = Arc::new(Recorder::new()); // a full-mm notifier that records every range
//! let _h = mm.register_notifier(events.clone())?;
//! let seq = n.read_begin();
//! mm.mprotect(a, 8 * PAGE_SIZE, Prot::READ)?;
//! assert!(n.read_retry(seq)); // a mirror made from before must be made again
//! let r = events.take();
//! assert_eq!((r.len(), r[0].event), (1, NotifierEvent::ProtectionVma));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod interval;
mod range;
mod recorder;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::sync::RwLock;
use thiserror::Error;

pub use interval::{IntervalNotifier, IntervalNotifierOps, IntervalSub, InvalidateSeq, ReadSeq};
pub use range::{Blockable, MmId, NotifierEvent, NotifierRange, Owner, VmaInfo};
pub use recorder::Recorder;

use crate::addr::{VaRange, VirtAddr, USER_VA_END};
use interval::Itree;

/// Errors of the notifier API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum NotifierError {
    /// A non-blockable invalidation met a subscriber that needs to sleep (`-EAGAIN`).
    #[error("a subscriber would block (EAGAIN)")]
    WouldBlock,
    /// Zero length or a range that wraps (`-EOVERFLOW`).
    #[error("interval [{start:#x}, +{len:#x}) is empty or overflows (EOVERFLOW)")]
    Overflow {
        /// Requested start.
        start: u64,
        /// Requested length.
        len: u64,
    },
    /// The address space has exited (`-EINVAL`).
    #[error("the address space has no users (EINVAL)")]
    Released,
}

/// A subscriber to every change of an address space (`struct mmu_notifier_ops`).
///
/// All methods have empty defaults.
pub trait MmuNotifier: Send + Sync {
    /// Entries in `range` are about to change. A non-blockable range may be refused with
    /// [`NotifierError::WouldBlock`]; a blockable one must be accepted.
    fn invalidate_range_start(&self, range: &NotifierRange) -> Result<(), NotifierError> {
        let _ = range;
        Ok(())
    }

    /// The change is done (frames may already be freed).
    fn invalidate_range_end(&self, range: &NotifierRange) {
        let _ = range;
    }

    /// The address space is going away, or the notifier is being unregistered: stop every
    /// secondary access.
    fn release(&self, mm: MmId) {
        let _ = mm;
    }
}

/// Counters of notifier traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct NotifierStats {
    /// Invalidations started, indexed by [`NotifierEvent`] value. Serialized as an object
    /// keyed by the kernel's event names (`{"MMU_NOTIFY_UNMAP": 1, ...}`, every event).
    #[serde(serialize_with = "by_event_name")]
    pub invalidations: [u64; 8],
    /// Interval-notifier callbacks made.
    pub interval_callbacks: u64,
    /// Full-mm `invalidate_range_start` callbacks made.
    pub mm_callbacks: u64,
}

/// Writes per-event counters as `{kernel name: count}`, in [`NotifierEvent::ALL`]'s order.
fn by_event_name<S: serde::Serializer>(counts: &[u64; 8], ser: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = ser.serialize_map(Some(counts.len()))?;
    for e in NotifierEvent::ALL {
        map.serialize_entry(e.kernel_name(), &counts[e as usize])?;
    }
    map.end()
}

impl NotifierStats {
    /// Invalidations started for `event`.
    pub fn of(&self, event: NotifierEvent) -> u64 {
        self.invalidations[event as usize]
    }

    /// All invalidations started.
    pub fn total(&self) -> u64 {
        self.invalidations.iter().sum()
    }
}

/// The notifier subscriptions of one address space.
pub struct MmNotifiers {
    mm: MmId,
    itree: Itree,
    list: RwLock<Vec<(u64, Arc<dyn MmuNotifier>)>>,
    next_id: AtomicU64,
    released: AtomicBool,
    by_event: [AtomicU64; 8],
    interval_calls: AtomicU64,
    mm_calls: AtomicU64,
}

impl MmNotifiers {
    /// Subscriptions for address space `mm`.
    pub fn new(mm: MmId) -> Arc<Self> {
        Arc::new(MmNotifiers {
            mm,
            itree: Itree::new(),
            list: RwLock::new(Vec::new()),
            next_id: AtomicU64::new(1),
            released: AtomicBool::new(false),
            by_event: Default::default(),
            interval_calls: AtomicU64::new(0),
            mm_calls: AtomicU64::new(0),
        })
    }

    /// The address space.
    pub fn mm(&self) -> MmId {
        self.mm
    }

    /// Registers a full-mm notifier (`mmu_notifier_register`).
    #[doc(alias = "mmu_notifier_register")]
    pub fn register(
        self: &Arc<Self>,
        notifier: Arc<dyn MmuNotifier>,
    ) -> Result<MmuNotifierHandle, NotifierError> {
        if self.released.load(Ordering::Acquire) {
            return Err(NotifierError::Released);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.list.write().push((id, notifier));
        Ok(MmuNotifierHandle {
            subs: Arc::clone(self),
            id,
        })
    }

    /// Registers an interval notifier over `[start, start + len)`
    /// (`mmu_interval_notifier_insert`). The interval need not be page aligned; it is
    /// widened to whole pages.
    #[doc(alias = "mmu_interval_notifier_insert")]
    pub fn interval_insert(
        self: &Arc<Self>,
        start: VirtAddr,
        len: u64,
        ops: Arc<dyn IntervalNotifierOps>,
    ) -> Result<IntervalNotifier, NotifierError> {
        let overflow = NotifierError::Overflow {
            start: start.as_u64(),
            len,
        };
        let end = start
            .checked_add(len)
            .filter(|_| len > 0)
            .and_then(|e| e.align_up(crate::addr::PAGE_SIZE))
            .ok_or(overflow)?;
        let range = VaRange::new(start.page_down(), end).map_err(|_| overflow)?;
        if self.released.load(Ordering::Acquire) {
            return Err(NotifierError::Released);
        }
        Ok(Itree::insert(self, range, ops))
    }

    /// Number of registered interval notifiers.
    pub fn nr_intervals(&self) -> usize {
        self.itree.len()
    }

    /// Number of registered full-mm notifiers.
    pub fn nr_mm_notifiers(&self) -> usize {
        self.list.read().len()
    }

    /// Starts a blockable invalidation (`mmu_notifier_invalidate_range_start`).
    ///
    /// # Panics
    ///
    /// Panics if `range` is not blockable (use
    /// [`invalidate_range_start_nonblock`](Self::invalidate_range_start_nonblock)).
    #[doc(alias = "mmu_notifier_invalidate_range_start")]
    #[track_caller]
    pub fn invalidate_range_start(&self, range: NotifierRange) -> Invalidation<'_> {
        assert!(
            range.is_blockable(),
            "blockable start with a non-blockable range"
        );
        self.start(range)
            .expect("blockable invalidations cannot be refused")
    }

    /// Starts a non-blockable invalidation; a subscriber that would sleep refuses it, and
    /// then nothing may change (`mmu_notifier_invalidate_range_start_nonblock`).
    #[doc(alias = "mmu_notifier_invalidate_range_start_nonblock")]
    pub fn invalidate_range_start_nonblock(
        &self,
        mut range: NotifierRange,
    ) -> Result<Invalidation<'_>, NotifierError> {
        range.blockable = Blockable::No;
        self.start(range)
    }

    fn start(&self, range: NotifierRange) -> Result<Invalidation<'_>, NotifierError> {
        tracing::trace!(
            target: "hmm::notifier",
            event = range.event.kernel_name(),
            owner = range.owner.map(|o| o.as_u64()),
            start = %format_args!("{:#x}", range.range.start().as_u64()),
            pages = range.range.npages(),
            "invalidate_range_start"
        );
        self.by_event[range.event as usize].fetch_add(1, Ordering::Relaxed);
        self.itree.invalidate_start(&range, &self.interval_calls)?;
        let list = self.list.read_recursive();
        for (i, (_, n)) in list.iter().enumerate() {
            self.mm_calls.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = n.invalidate_range_start(&range) {
                // Back out the subscribers that accepted, as mn_hlist_invalidate_range_start.
                for (_, done) in &list[..i] {
                    done.invalidate_range_end(&range);
                }
                drop(list);
                self.itree.invalidate_end();
                return Err(e);
            }
        }
        Ok(Invalidation {
            subs: self,
            range,
            ended: false,
        })
    }

    fn end(&self, range: &NotifierRange) {
        self.itree.invalidate_end();
        for (_, n) in self.list.read_recursive().iter() {
            n.invalidate_range_end(range);
        }
    }

    /// Tears down at exit (`__mmu_notifier_release`): one blockable RELEASE invalidation of
    /// the whole address space to interval notifiers, then `release` to every full-mm
    /// notifier, which are unhooked. Later registrations fail with
    /// [`NotifierError::Released`].
    #[doc(alias = "mmu_notifier_release")]
    pub fn release(&self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        let all = VaRange::new(VirtAddr::ZERO, VirtAddr::new(USER_VA_END)).expect("whole space");
        let range = NotifierRange::new(self.mm, all, NotifierEvent::Release, None);
        self.by_event[NotifierEvent::Release as usize].fetch_add(1, Ordering::Relaxed);
        self.itree
            .invalidate_start(&range, &self.interval_calls)
            .expect("release is blockable");
        self.itree.invalidate_end();
        let list = std::mem::take(&mut *self.list.write());
        for (_, n) in list {
            n.release(self.mm);
        }
    }

    /// Notifier counters.
    pub fn stats(&self) -> NotifierStats {
        NotifierStats {
            invalidations: std::array::from_fn(|i| self.by_event[i].load(Ordering::Relaxed)),
            interval_callbacks: self.interval_calls.load(Ordering::Relaxed),
            mm_callbacks: self.mm_calls.load(Ordering::Relaxed),
        }
    }
}

impl std::fmt::Debug for MmNotifiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmNotifiers")
            .field("mm", &self.mm)
            .field("intervals", &self.nr_intervals())
            .field("mm_notifiers", &self.nr_mm_notifiers())
            .finish_non_exhaustive()
    }
}

/// A running invalidation; ending it (explicitly or on drop) runs the `end` half.
#[must_use = "an invalidation must end after the entries changed"]
pub struct Invalidation<'a> {
    subs: &'a MmNotifiers,
    range: NotifierRange,
    ended: bool,
}

impl Invalidation<'_> {
    /// The range being invalidated.
    pub fn range(&self) -> &NotifierRange {
        &self.range
    }

    /// Ends the invalidation (`mmu_notifier_invalidate_range_end`).
    #[doc(alias = "mmu_notifier_invalidate_range_end")]
    pub fn end(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        if !std::mem::replace(&mut self.ended, true) {
            self.subs.end(&self.range);
        }
    }
}

impl Drop for Invalidation<'_> {
    fn drop(&mut self) {
        crate::sync::drop_work(|| self.finish());
    }
}

impl std::fmt::Debug for Invalidation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invalidation")
            .field("range", &self.range)
            .finish_non_exhaustive()
    }
}

/// The registration of a full-mm notifier; dropping it unregisters.
#[must_use = "dropping the handle unregisters the notifier"]
pub struct MmuNotifierHandle {
    subs: Arc<MmNotifiers>,
    id: u64,
}

impl MmuNotifierHandle {
    /// Unregisters (`mmu_notifier_unregister`): calls `release` unless the address space
    /// already released it, and waits for running callbacks to return.
    #[doc(alias = "mmu_notifier_unregister")]
    pub fn unregister(self) {}
}

impl Drop for MmuNotifierHandle {
    fn drop(&mut self) {
        // The write lock waits for callbacks running under the read lock.
        let mut list = self.subs.list.write();
        if let Some(pos) = list.iter().position(|(id, _)| *id == self.id) {
            let (_, n) = list.remove(pos);
            drop(list);
            n.release(self.subs.mm);
        }
    }
}

impl std::fmt::Debug for MmuNotifierHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmuNotifierHandle")
            .field("id", &self.id)
            .finish()
    }
}

#[cfg(test)]
mod tests;
