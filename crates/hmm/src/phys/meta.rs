//! Per-frame metadata (the model's `struct page`): reference count, map count, pin count,
//! flags, order, and the sleeping folio lock.
//!
//! # Reference-count states
//!
//! | `refcount` | state |
//! |---|---|
//! | 0 | free (owned by the allocator), or a tail page of a compound folio (the head counts) |
//! | ≥ 1 | in use: one reference per page-table mapping (present or non-present entry), one per live [`Frame`](super::Frame) handle, one per pin, one per page-cache slot |
//!
//! A frame goes back to its allocator when its refcount drops from 1 to 0
//! ([`FrameRef::put`](super::FrameRef::put)); taking a reference on a frame that may be
//! concurrently freed uses [`try_get`](FrameMeta::try_get) (the kernel's
//! `get_page_unless_zero`), which fails on a free frame.
//!
//! # The folio lock
//!
//! `LOCKED` in `flags` is the folio lock. `trylock` is a compare-and-swap; `lock` sleeps on
//! a hashed wait queue (the kernel's `folio_waitqueue`) and is woken by `unlock`. The
//! `WAITERS` bit (the kernel's `PG_waiters`) keeps the uncontended unlock to one atomic
//! operation. A waiter sets `WAITERS` and re-checks `LOCKED` while holding its bucket's
//! mutex, and `unlock` takes that mutex before notifying, so no wake-up is lost.

use crate::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::any::Any;
use std::sync::Arc;

use crate::sync::{Condvar, Mutex};
use bitflags::bitflags;

use super::mapping::MappingId;

bitflags! {
    /// Flags of a frame (the kernel's page flags that the model needs).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct FrameFlags: u32 {
        /// The folio lock is held.
        #[doc(alias = "PG_locked")]
        const LOCKED = 1 << 0;
        /// Someone may be sleeping on the folio lock.
        #[doc(alias = "PG_waiters")]
        const WAITERS = 1 << 1;
        /// Contents differ from the backing store.
        #[doc(alias = "PG_dirty")]
        const DIRTY = 1 << 2;
        /// Anonymous memory.
        const ANON = 1 << 3;
        /// Anonymous and mapped by exactly one process, so a write fault may reuse it
        /// instead of copying.
        #[doc(alias = "PG_anon_exclusive")]
        const ANON_EXCLUSIVE = 1 << 4;
        /// Contents are valid.
        #[doc(alias = "PG_uptodate")]
        const UPTODATE = 1 << 5;
        /// Head page of a compound (order > 0) folio.
        #[doc(alias = "PG_head")]
        const HEAD = 1 << 6;
        /// Tail page of a compound folio.
        const TAIL = 1 << 7;
        /// `MADV_FREE` was applied: reclaim may discard the folio while it stays clean (the
        /// kernel clears `PG_swapbacked` for this).
        const LAZYFREE = 1 << 9;
        /// A page of the hugetlb pool: its last `put` returns it to the pool.
        #[doc(alias = "PG_hugetlb")]
        const HUGETLB = 1 << 10;
        /// Never allocated or freed: the zero pages.
        #[doc(alias = "PG_reserved")]
        const RESERVED = 1 << 8;
    }
}

/// The metadata of one frame.
///
/// For a compound folio the head page's `refcount`, `flags`, `pincount` and mapping describe
/// the whole folio; `mapcount` is kept per page and counts PTE mappings of that page, while
/// the head's `entire_mapcount` counts PMD mappings of the whole folio.
#[derive(Default)]
pub struct FrameMeta {
    refcount: AtomicU32,
    mapcount: AtomicI32,
    entire_mapcount: AtomicI32,
    pincount: AtomicU32,
    flags: AtomicU32,
    order: AtomicU8,
    /// A tail page's folio's order (the kernel's tails point at their head,
    /// `compound_head`; here the head is the tail's index aligned down to it).
    folio_order: AtomicU8,
    index: AtomicU64,
    /// What the folio belongs to: a [`MappingId`]'s word, 0 for nothing.
    mapping: AtomicU64,
    zone_device_data: AtomicU64,
}

// A zeroed mapping of `FrameMeta`s is valid (`zeroed`'s `unsafe impl ZeroValid`): no
// `Drop`, and every field zero-valid, each named here so that a new field must be too.
#[cfg(not(feature = "shuttle"))]
const _: () = assert!(!std::mem::needs_drop::<FrameMeta>());

#[cfg(not(feature = "shuttle"))]
#[allow(dead_code)] // a compile-time check, never called
fn fields_are_zero_valid(m: &FrameMeta) {
    fn zero_valid<T: super::zeroed::ZeroValid>(_: &T) {}
    let FrameMeta {
        refcount,
        mapcount,
        entire_mapcount,
        pincount,
        flags,
        order,
        folio_order,
        index,
        mapping,
        zone_device_data,
    } = m;
    zero_valid(refcount);
    zero_valid(mapcount);
    zero_valid(entire_mapcount);
    zero_valid(pincount);
    zero_valid(flags);
    zero_valid(order);
    zero_valid(folio_order);
    zero_valid(index);
    zero_valid(mapping);
    zero_valid(zone_device_data);
}

impl std::fmt::Debug for FrameMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameMeta")
            .field("refcount", &self.refcount())
            .field("mapcount", &self.mapcount())
            .field("entire_mapcount", &self.entire_mapcount())
            .field("pincount", &self.pincount())
            .field("flags", &self.flags())
            .field("order", &self.order())
            .finish_non_exhaustive()
    }
}

/// Why a reference could not be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GetFrameError {
    /// The frame is free (refcount 0).
    #[error("frame is free")]
    Unused,
}

impl FrameMeta {
    /// The reference count.
    #[doc(alias = "page_ref_count")]
    pub fn refcount(&self) -> u32 {
        self.refcount.load(Ordering::Acquire)
    }

    /// Number of page-table entries mapping this page.
    #[doc(alias = "page_mapcount")]
    pub fn mapcount(&self) -> i32 {
        self.mapcount.load(Ordering::Acquire)
    }

    /// Number of PMD mappings of the whole folio (head page only).
    #[doc(alias = "folio_entire_mapcount")]
    pub fn entire_mapcount(&self) -> i32 {
        self.entire_mapcount.load(Ordering::Acquire)
    }

    /// Adds one PMD mapping of the folio.
    pub fn inc_entire_mapcount(&self) {
        self.entire_mapcount.fetch_add(1, Ordering::Relaxed);
    }

    /// Removes one PMD mapping; returns the new count.
    pub fn dec_entire_mapcount(&self) -> i32 {
        let new = self.entire_mapcount.fetch_sub(1, Ordering::Relaxed) - 1;
        debug_assert!(new >= 0, "entire mapcount underflow");
        new
    }

    /// Records what the folio belongs to and its page index there (`folio->mapping`,
    /// `folio->index`).
    pub fn set_mapping(&self, mapping: MappingId, index: u64) {
        self.index.store(index, Ordering::Relaxed);
        self.mapping.store(mapping.as_u64(), Ordering::Release);
    }

    /// What the folio belongs to, without looking the owner up (`folio->mapping` as a
    /// word: cheap, for "does it belong anywhere").
    pub fn mapping_id(&self) -> Option<MappingId> {
        MappingId::from_u64(self.mapping.load(Ordering::Acquire))
    }

    /// What the folio belongs to, if that still exists, and its page index there.
    #[doc(alias = "folio_mapping")]
    pub fn mapping(&self) -> Option<(Arc<dyn Any + Send + Sync>, u64)> {
        let owner = self.mapping_id()?.owner()?;
        Some((owner, self.index.load(Ordering::Relaxed)))
    }

    /// The device driver's word for this page (`page->zone_device_data`); 0 until set.
    #[doc(alias = "folio_zone_device_data")]
    pub fn zone_device_data(&self) -> u64 {
        self.zone_device_data.load(Ordering::Relaxed)
    }

    /// Sets the driver's word for this page (`folio_set_zone_device_data`).
    #[doc(alias = "folio_set_zone_device_data")]
    pub fn set_zone_device_data(&self, data: u64) {
        self.zone_device_data.store(data, Ordering::Relaxed);
    }

    /// Forgets the mapping (the folio is being freed).
    pub(crate) fn clear_mapping(&self) {
        self.mapping.store(0, Ordering::Relaxed);
    }

    /// Number of pins (`pin_user_pages`).
    #[doc(alias = "folio_maybe_dma_pinned")]
    pub fn pincount(&self) -> u32 {
        self.pincount.load(Ordering::Acquire)
    }

    /// Current flags.
    pub fn flags(&self) -> FrameFlags {
        FrameFlags::from_bits_retain(self.flags.load(Ordering::Acquire))
    }

    /// Folio order (0 to 9, or 18 for a 1 GiB hugetlb page); meaningful on the head page.
    pub fn order(&self) -> u32 {
        u32::from(self.order.load(Ordering::Relaxed))
    }

    /// For a tail page, the order of the folio it belongs to.
    pub(crate) fn folio_order(&self) -> u32 {
        u32::from(self.folio_order.load(Ordering::Relaxed))
    }

    pub(crate) fn set_order(&self, order: u32) {
        self.order.store(order as u8, Ordering::Relaxed);
    }

    /// Sets flags (never `LOCKED`/`WAITERS`, which belong to the lock).
    pub fn set_flags(&self, f: FrameFlags) {
        debug_assert!(!f.intersects(FrameFlags::LOCKED | FrameFlags::WAITERS));
        self.flags.fetch_or(f.bits(), Ordering::AcqRel);
    }

    /// Clears flags (never `LOCKED`/`WAITERS`).
    pub fn clear_flags(&self, f: FrameFlags) {
        debug_assert!(!f.intersects(FrameFlags::LOCKED | FrameFlags::WAITERS));
        self.flags.fetch_and(!f.bits(), Ordering::AcqRel);
    }

    /// Resets flags to `f` on allocation, keeping nothing of the previous user.
    pub(crate) fn init(&self, f: FrameFlags, order: u32) {
        self.zone_device_data.store(0, Ordering::Relaxed);
        self.flags.store(f.bits(), Ordering::Release);
        self.set_order(order);
        self.mapcount.store(0, Ordering::Relaxed);
        self.entire_mapcount.store(0, Ordering::Relaxed);
        self.pincount.store(0, Ordering::Relaxed);
        self.mapping.store(0, Ordering::Relaxed);
        self.refcount.store(1, Ordering::Release);
    }

    /// Resets a tail page of a compound folio of `folio_order`: no reference of its own
    /// (the head counts).
    pub(crate) fn init_tail(&self, folio_order: u32) {
        self.folio_order.store(folio_order as u8, Ordering::Relaxed);
        self.flags.store(FrameFlags::TAIL.bits(), Ordering::Release);
        self.set_order(0);
        self.mapcount.store(0, Ordering::Relaxed);
        self.entire_mapcount.store(0, Ordering::Relaxed);
        self.pincount.store(0, Ordering::Relaxed);
        self.mapping.store(0, Ordering::Relaxed);
        self.refcount.store(0, Ordering::Release);
    }

    /// Takes a reference on a frame known to be in use (the caller holds one already, or
    /// holds a lock that keeps a mapping alive).
    #[doc(alias = "folio_get")]
    pub fn get(&self) {
        let old = self.refcount.fetch_add(1, Ordering::Relaxed);
        debug_assert!(old > 0, "get on a free frame");
    }

    /// Takes `n` more references on a frame known to be in use.
    pub(crate) fn get_many(&self, n: u32) {
        let old = self.refcount.fetch_add(n, Ordering::Relaxed);
        debug_assert!(old > 0, "get on a free frame");
    }

    /// Takes a reference unless the frame is free.
    #[doc(alias = "get_page_unless_zero")]
    pub fn try_get(&self) -> Result<(), GetFrameError> {
        self.refcount
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |c| {
                (c != 0).then_some(c + 1)
            })
            .map(|_| ())
            .map_err(|_| GetFrameError::Unused)
    }

    /// Sets the refcount from `expected` to 0 if nobody else holds a reference
    /// (`folio_ref_freeze`); a frozen folio refuses `try_get`.
    #[doc(alias = "folio_ref_freeze")]
    pub(crate) fn freeze(&self, expected: u32) -> bool {
        self.refcount
            .compare_exchange(expected, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Gives a frozen (or tail) frame `n` references.
    pub(crate) fn unfreeze(&self, n: u32) {
        debug_assert_eq!(self.refcount(), 0, "unfreeze of a live frame");
        self.refcount.store(n, Ordering::Release);
    }

    /// Turns a tail page of a folio being split into a locked order-0 folio with one
    /// reference, `flags` (which must not hold `LOCKED`/`WAITERS`/`TAIL`) and the
    /// mapping of `head` at offset `offset`. The reference is stored before `TAIL` is
    /// cleared, so a racing `folio()` lookup finds either the frozen head or a live page.
    pub(crate) fn become_split_page(&self, head: &FrameMeta, offset: u64, flags: FrameFlags) {
        self.inherit_mapping(head, offset);
        self.pincount.store(0, Ordering::Relaxed);
        self.entire_mapcount.store(0, Ordering::Relaxed);
        self.set_order(0);
        self.refcount.store(1, Ordering::Release);
        self.flags
            .store((flags | FrameFlags::LOCKED).bits(), Ordering::Release);
    }

    /// Turns a tail page of a folio being split into the head of a new folio of `order`,
    /// locked and still frozen (refcount 0: the caller unfreezes it once every new folio
    /// is set up), with `flags` (which must not hold `LOCKED`/`WAITERS`/`TAIL`) and the
    /// mapping of `head` at offset `offset`. The order is stored before the flags, so a
    /// lookup that finds the page no longer a tail finds its right order.
    pub(crate) fn become_frozen_split_head(
        &self,
        head: &FrameMeta,
        offset: u64,
        flags: FrameFlags,
        order: u32,
    ) {
        self.inherit_mapping(head, offset);
        self.pincount.store(0, Ordering::Relaxed);
        self.entire_mapcount.store(0, Ordering::Relaxed);
        self.set_order(order);
        self.flags
            .store((flags | FrameFlags::LOCKED).bits(), Ordering::Release);
    }

    /// Copies the mapping of `head`, at `head`'s index plus `offset` (a split page, or the
    /// destination of a migration).
    pub(crate) fn inherit_mapping(&self, head: &FrameMeta, offset: u64) {
        let m = head.mapping.load(Ordering::Acquire);
        self.index.store(
            head.index.load(Ordering::Relaxed) + offset,
            Ordering::Relaxed,
        );
        self.mapping.store(m, Ordering::Release);
    }

    /// Drops a reference; returns true when it was the last one and the frame must be freed.
    #[must_use = "the last reference must free the frame"]
    pub(crate) fn put_testzero(&self) -> bool {
        let old = self.refcount.fetch_sub(1, Ordering::AcqRel);
        assert!(old > 0, "put on a free frame");
        old == 1
    }

    /// Adds one mapping.
    pub fn inc_mapcount(&self) {
        self.mapcount.fetch_add(1, Ordering::Relaxed);
    }

    /// Removes one mapping; returns the new map count.
    pub fn dec_mapcount(&self) -> i32 {
        let new = self.mapcount.fetch_sub(1, Ordering::Relaxed) - 1;
        debug_assert!(new >= 0, "mapcount underflow");
        new
    }

    /// Adds a pin (the caller also holds a reference for it).
    pub fn inc_pincount(&self) {
        self.pincount.fetch_add(1, Ordering::AcqRel);
    }

    /// Removes a pin.
    pub fn dec_pincount(&self) {
        let old = self.pincount.fetch_sub(1, Ordering::AcqRel);
        assert!(old > 0, "unpin of an unpinned frame");
    }

    /// Tries to take the folio lock without sleeping.
    #[doc(alias = "folio_trylock")]
    pub fn trylock(&self) -> bool {
        self.flags
            .fetch_or(FrameFlags::LOCKED.bits(), Ordering::Acquire)
            & FrameFlags::LOCKED.bits()
            == 0
    }

    /// Whether the folio lock is held (by anyone).
    #[doc(alias = "folio_test_locked")]
    pub fn is_locked(&self) -> bool {
        self.flags().contains(FrameFlags::LOCKED)
    }

    /// Takes the folio lock, sleeping until it is free.
    #[doc(alias = "folio_lock")]
    pub fn lock(&self) {
        while !self.trylock() {
            self.wait_unlocked();
        }
    }

    /// Sleeps until the folio lock is (momentarily) free, without taking it: the kernel's
    /// `folio_wait_locked`, used to wait for a migration to finish.
    #[doc(alias = "folio_wait_locked")]
    pub fn wait_unlocked(&self) {
        let bucket = self.bucket();
        let mut guard = bucket.mutex.lock();
        loop {
            self.flags
                .fetch_or(FrameFlags::WAITERS.bits(), Ordering::AcqRel);
            if !self.is_locked() {
                return;
            }
            bucket.cond.wait(&mut guard);
        }
    }

    /// Releases the folio lock and wakes sleepers.
    ///
    /// # Panics
    ///
    /// Panics if the lock is not held.
    #[doc(alias = "folio_unlock")]
    #[track_caller]
    pub fn unlock(&self) {
        let old = self
            .flags
            .fetch_and(!FrameFlags::LOCKED.bits(), Ordering::Release);
        assert!(
            old & FrameFlags::LOCKED.bits() != 0,
            "unlock of an unlocked folio"
        );
        if old & FrameFlags::WAITERS.bits() != 0 {
            let bucket = self.bucket();
            let _guard = bucket.mutex.lock();
            self.flags
                .fetch_and(!FrameFlags::WAITERS.bits(), Ordering::Relaxed);
            bucket.cond.notify_all();
        }
    }

    fn bucket(&self) -> &'static WaitBucket {
        let addr = std::ptr::from_ref(self) as usize;
        // Fibonacci hashing of the metadata address, like the kernel's hash_ptr.
        let h = (addr as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - WAIT_TABLE_BITS);
        &wait_table()[h as usize]
    }
}

const WAIT_TABLE_BITS: u32 = 8;

struct WaitBucket {
    mutex: Mutex<()>,
    cond: Condvar,
}

type WaitTable = [WaitBucket; 1 << WAIT_TABLE_BITS];

/// A table with every queue empty.
const fn empty_table() -> WaitTable {
    [const {
        WaitBucket {
            mutex: Mutex::new(()),
            cond: Condvar::new(),
        }
    }; 1 << WAIT_TABLE_BITS]
}

/// The hashed wait queues of folio locks (the kernel's `folio_wait_table`), one for the
/// process.
#[cfg(not(feature = "shuttle"))]
fn wait_table() -> &'static WaitTable {
    static WAIT_TABLE: WaitTable = empty_table();
    &WAIT_TABLE
}

/// Under shuttle the queues' locks are shuttle's, which belong to one execution at a
/// time, and the tests of one binary run their executions at once, each on its own OS
/// thread (an execution's tasks all run on that thread): one table per OS thread, so two
/// tests never wait on each other's locks.
#[cfg(feature = "shuttle")]
fn wait_table() -> &'static WaitTable {
    thread_local! {
        static WAIT_TABLE: &'static WaitTable = Box::leak(Box::new(empty_table()));
    }
    WAIT_TABLE.with(|t| *t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn refcount_transitions() {
        let m = FrameMeta::default();
        assert_eq!(m.try_get(), Err(GetFrameError::Unused));
        m.init(FrameFlags::ANON, 0);
        assert_eq!(m.refcount(), 1);
        m.try_get().unwrap();
        m.get();
        assert_eq!(m.refcount(), 3);
        assert!(!m.put_testzero());
        assert!(!m.put_testzero());
        assert!(m.put_testzero());
        assert_eq!(m.try_get(), Err(GetFrameError::Unused));
    }

    #[test]
    fn flags_and_counts() {
        let m = FrameMeta::default();
        m.init(FrameFlags::ANON | FrameFlags::ANON_EXCLUSIVE, 9);
        assert_eq!(m.order(), 9);
        m.set_flags(FrameFlags::DIRTY);
        m.clear_flags(FrameFlags::ANON_EXCLUSIVE);
        assert_eq!(m.flags(), FrameFlags::ANON | FrameFlags::DIRTY);
        m.inc_mapcount();
        m.inc_mapcount();
        assert_eq!(m.dec_mapcount(), 1);
        m.inc_pincount();
        assert_eq!(m.pincount(), 1);
        m.dec_pincount();
        assert_eq!(m.pincount(), 0);
    }

    #[test]
    fn trylock_excludes() {
        let m = FrameMeta::default();
        assert!(m.trylock());
        assert!(!m.trylock());
        assert!(m.is_locked());
        m.unlock();
        assert!(!m.is_locked());
    }

    #[test]
    #[should_panic(expected = "unlock of an unlocked folio")]
    fn unlock_unlocked_panics() {
        FrameMeta::default().unlock();
    }

    #[test]
    fn lock_sleeps_and_wakes() {
        // Many threads increment a plain counter under the folio lock; any lost wake-up
        // would hang, any broken exclusion would lose increments.
        let m = Arc::new((FrameMeta::default(), AtomicU32::new(0)));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = Arc::clone(&m);
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        m.0.lock();
                        let v = m.1.load(Ordering::Relaxed);
                        m.1.store(v + 1, Ordering::Relaxed);
                        m.0.unlock();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(m.1.load(Ordering::Relaxed), 8000);
        assert!(!m.0.is_locked());
    }

    #[test]
    fn wait_unlocked_returns_after_unlock() {
        let m = Arc::new(FrameMeta::default());
        assert!(m.trylock());
        let m2 = Arc::clone(&m);
        let t = std::thread::spawn(move || m2.wait_unlocked());
        std::thread::sleep(std::time::Duration::from_millis(20));
        m.unlock();
        t.join().unwrap();
    }
}
