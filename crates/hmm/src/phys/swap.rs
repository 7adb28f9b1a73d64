//! The swap device (`swapon`, `struct swap_info_struct`): slots of one page that hold the
//! bytes of anonymous pages written out by reclaim, each with a count of the swap entries
//! that refer to it (`swap_map`).
//!
//! A slot is allocated with the page's bytes ([`SwapDevice::alloc`]) and one count per
//! entry that names it: [`dup`](SwapDevice::dup) for each more (a fork copying an
//! entry, a reader taking a reference), [`free`](SwapDevice::free) for each that goes
//! (a swap-in, a zap). The bytes live in host memory allocated when the slot is
//! written and released when its count reaches zero, so the host's memory follows what is
//! swapped out, not the device's size. There is no swap cache: a swap-in reads the bytes
//! into a new page (see `mm::vmscan`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

use crate::addr::PAGE_SIZE;
use crate::sync::Mutex;

/// A slot of the swap device: what a swap entry names (`swp_offset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SwapSlot(u64);

impl SwapSlot {
    /// The slot numbered `n`.
    pub const fn new(n: u64) -> SwapSlot {
        SwapSlot(n)
    }

    /// Its number.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

/// What the swap device holds and has done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct SwapStats {
    /// Slots of the device.
    pub slots: u64,
    /// Slots in use.
    pub used: u64,
    /// Pages written out (`pswpout`).
    pub swapped_out: u64,
    /// Pages read back in (`pswpin`).
    pub swapped_in: u64,
}

struct Slot {
    count: u32,
    bytes: Box<[u8]>,
}

/// A swap device of a fixed number of page slots.
pub struct SwapDevice {
    slots: u64,
    inner: Mutex<Inner>,
    swapped_out: AtomicU64,
    swapped_in: AtomicU64,
}

#[derive(Default)]
struct Inner {
    used: HashMap<u64, Slot>,
    /// Freed slot numbers, reused first (lowest last).
    free: Vec<u64>,
    /// Slots never used start here.
    next: u64,
}

impl SwapDevice {
    /// A device of `bytes` (whole pages).
    pub(crate) fn new(bytes: u64) -> SwapDevice {
        SwapDevice {
            slots: bytes / PAGE_SIZE,
            inner: Mutex::new(Inner::default()),
            swapped_out: AtomicU64::new(0),
            swapped_in: AtomicU64::new(0),
        }
    }

    /// Writes a page's bytes to a free slot with a count of zero: the caller adds one
    /// count per entry it installs ([`dup`](Self::dup)), and frees the slot if it
    /// installed none. `None` when the device is full (`get_swap_page` failing).
    #[doc(alias = "folio_alloc_swap")]
    pub(crate) fn alloc(&self, fill: impl FnOnce(&mut [u8])) -> Option<SwapSlot> {
        let mut bytes = vec![0u8; PAGE_SIZE as usize].into_boxed_slice();
        fill(&mut bytes);
        let mut s = self.inner.lock();
        let n = match s.free.pop() {
            Some(n) => n,
            None if s.next < self.slots => {
                s.next += 1;
                s.next - 1
            }
            None => return None,
        };
        s.used.insert(n, Slot { count: 0, bytes });
        drop(s);
        self.swapped_out.fetch_add(1, Relaxed);
        Some(SwapSlot(n))
    }

    /// One more entry (or reader) refers to `slot` (`swap_duplicate`).
    ///
    /// # Panics
    ///
    /// Panics if the slot is not in use: a swap entry naming a free slot is corrupt.
    #[doc(alias = "swap_duplicate")]
    pub(crate) fn dup(&self, slot: SwapSlot) {
        let mut s = self.inner.lock();
        let e = s
            .used
            .get_mut(&slot.0)
            .expect("a swap entry names a used slot");
        e.count += 1;
    }

    /// One entry (or reader) of `slot` went (`swap_free`); the slot is freed with its last.
    ///
    /// # Panics
    ///
    /// Panics if the slot is not in use.
    #[doc(alias = "swap_free")]
    pub(crate) fn free(&self, slot: SwapSlot) {
        let mut s = self.inner.lock();
        let e = s
            .used
            .get_mut(&slot.0)
            .expect("a swap entry names a used slot");
        if e.count <= 1 {
            s.used.remove(&slot.0);
            s.free.push(slot.0);
        } else {
            e.count -= 1;
        }
    }

    /// Hands the bytes of `slot` (one page) to `read`, as a swap-in reads them.
    ///
    /// # Panics
    ///
    /// Panics if the slot is not in use.
    pub(crate) fn read(&self, slot: SwapSlot, read: impl FnOnce(&[u8])) {
        let s = self.inner.lock();
        read(&s.used.get(&slot.0).expect("a used slot").bytes);
        drop(s);
        self.swapped_in.fetch_add(1, Relaxed);
    }

    /// The count of `slot` (0 if free) (`swp_swapcount`).
    pub fn count(&self, slot: SwapSlot) -> u32 {
        self.inner.lock().used.get(&slot.0).map_or(0, |e| e.count)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SwapStats {
        SwapStats {
            slots: self.slots,
            used: self.inner.lock().used.len() as u64,
            swapped_out: self.swapped_out.load(Relaxed),
            swapped_in: self.swapped_in.load(Relaxed),
        }
    }
}

impl std::fmt::Debug for SwapDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwapDevice")
            .field("stats", &self.stats())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_reused_and_bounded() {
        let d = SwapDevice::new(2 * PAGE_SIZE);
        let a = d.alloc(|b| b[0] = 1).unwrap();
        d.dup(a);
        let b = d.alloc(|b| b[0] = 2).unwrap();
        d.dup(b);
        assert!(d.alloc(|_| {}).is_none(), "full");
        d.dup(a);
        assert_eq!(d.count(a), 2);
        d.free(a);
        d.read(a, |b| assert_eq!(b[0], 1));
        d.free(a);
        assert_eq!(d.count(a), 0);
        let c = d.alloc(|b| b[0] = 3).unwrap();
        assert_eq!(c, a, "a freed slot is reused");
        let s = d.stats();
        assert_eq!((s.slots, s.used, s.swapped_out, s.swapped_in), (2, 2, 3, 1));
    }
}
