//! The GPU's own page table: what the device can reach, at 4 KiB, 64 KiB or 2 MiB
//! granularity, in its local memory or in system memory over the link.
//!
//! Layout: a `BTreeMap` of 512-entry leaves, one per 2 MiB of GPU virtual address space
//! (the GPU shares the process's addresses, as SVM does), so a lookup costs one map
//! search per 2 MiB and an unmap drops whole leaves. Every 4 KiB page has its own word;
//! a 64 KiB or 2 MiB entry is the run of words it covers, each carrying the size class, so
//! a lookup needs no second level and an unmap of part of a large entry is exact (the
//! entry then counts as split). The words hold **no** page references: an entry stays
//! valid only because every change of the CPU mapping first runs the driver's notifier,
//! which takes the notifier lock that guards this table and zaps the range.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::Serialize;

use crate::addr::GpuPageSize;

const LEAF_SHIFT: u32 = 9;
const LEAF_LEN: usize = 1 << LEAF_SHIFT;

const VALID: u64 = 1 << 0;
const WRITE: u64 = 1 << 1;
const VRAM: u64 = 1 << 2;
const SIZE_SHIFT: u32 = 3;
const PEER: u64 = 1 << 5;
const FRAME_SHIFT: u32 = 6;

/// Where a GPU entry points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Location {
    /// The GPU's own memory (a device-private page of its pagemap).
    Vram,
    /// System memory, reached over the link (a remote mapping).
    System,
    /// A peer's memory (another device of the group), reached over the peer link.
    Peer,
}

/// One GPU page-table entry, as seen for one 4 KiB page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct GpuPte {
    /// The frame (one numbering for RAM and device memory).
    pub frame_nr: u64,
    /// Whether the GPU may write through it.
    pub writable: bool,
    /// Local or remote memory.
    pub location: Location,
    /// The size class of the entry this page belongs to.
    pub size: GpuPageSize,
}

impl GpuPte {
    fn encode(self) -> u64 {
        let mut w = VALID | (self.frame_nr << FRAME_SHIFT) | (self.size.bits() << SIZE_SHIFT);
        if self.writable {
            w |= WRITE;
        }
        match self.location {
            Location::Vram => w |= VRAM,
            Location::Peer => w |= PEER,
            Location::System => {}
        }
        w
    }

    fn decode(w: u64) -> Option<GpuPte> {
        (w & VALID != 0).then(|| GpuPte {
            frame_nr: w >> FRAME_SHIFT,
            writable: w & WRITE != 0,
            location: if w & VRAM != 0 {
                Location::Vram
            } else if w & PEER != 0 {
                Location::Peer
            } else {
                Location::System
            },
            size: GpuPageSize::from_bits(w >> SIZE_SHIFT),
        })
    }
}

/// One 2 MiB leaf: the entries, and the block's access counter (UVM's hardware access
/// counters count remote accesses per 2 MiB region; bumped under the notifier lock held
/// for reading, hence atomic).
#[derive(Debug)]
struct Leaf {
    words: [u64; LEAF_LEN],
    remote_accesses: AtomicU32,
}

impl Leaf {
    fn new() -> Box<Leaf> {
        Box::new(Leaf {
            words: [0; LEAF_LEN],
            remote_accesses: AtomicU32::new(0),
        })
    }
}

/// The table, indexed by virtual page number.
#[derive(Debug, Default)]
pub(crate) struct GpuPageTable {
    leaves: BTreeMap<u64, Box<Leaf>>,
    mapped: u64,
}

impl GpuPageTable {
    /// The entry for virtual page `vpn`.
    pub(crate) fn lookup(&self, vpn: u64) -> Option<GpuPte> {
        let leaf = self.leaves.get(&(vpn >> LEAF_SHIFT))?;
        GpuPte::decode(leaf.words[(vpn as usize) & (LEAF_LEN - 1)])
    }

    /// Counts one remote access in the block of `vpn`; returns the count now.
    pub(crate) fn count_remote(&self, vpn: u64) -> u32 {
        self.leaves
            .get(&(vpn >> LEAF_SHIFT))
            .map_or(0, |l| l.remote_accesses.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Clears the access counter of `block` (after its notification was serviced).
    pub(crate) fn clear_remote(&self, block: u64) {
        if let Some(l) = self.leaves.get(&block) {
            l.remote_accesses.store(0, Ordering::Relaxed);
        }
    }

    /// Maps page `vpn`; returns whether it was unmapped before.
    pub(crate) fn set(&mut self, vpn: u64, pte: GpuPte) -> bool {
        let leaf = self
            .leaves
            .entry(vpn >> LEAF_SHIFT)
            .or_insert_with(Leaf::new);
        let slot = &mut leaf.words[(vpn as usize) & (LEAF_LEN - 1)];
        let new = *slot & VALID == 0;
        if new {
            self.mapped += 1;
        }
        *slot = pte.encode();
        new
    }

    /// Unmaps every page in `[start, end)`; returns how many were mapped.
    pub(crate) fn unmap(&mut self, start: u64, end: u64) -> u64 {
        if start >= end {
            return 0;
        }
        let (first, last) = (start >> LEAF_SHIFT, (end - 1) >> LEAF_SHIFT);
        let mut erased = 0;
        let mut empty = Vec::new();
        for (&k, leaf) in self.leaves.range_mut(first..=last) {
            let base = k << LEAF_SHIFT;
            let lo = (start.max(base) - base) as usize;
            let hi = (end.min(base + LEAF_LEN as u64) - base) as usize;
            for w in &mut leaf.words[lo..hi] {
                if *w & VALID != 0 {
                    *w = 0;
                    erased += 1;
                }
            }
            if leaf.words.iter().all(|&w| w == 0) {
                empty.push(k);
            }
        }
        for k in empty {
            self.leaves.remove(&k);
        }
        self.mapped -= erased;
        erased
    }

    /// Pages mapped.
    pub(crate) fn mapped(&self) -> u64 {
        self.mapped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pte(frame_nr: u64, size: GpuPageSize) -> GpuPte {
        GpuPte {
            frame_nr,
            writable: frame_nr % 2 == 0,
            location: match frame_nr {
                0..=50 => Location::System,
                51..=100 => Location::Peer,
                _ => Location::Vram,
            },
            size,
        }
    }

    #[test]
    fn set_lookup_unmap() {
        let mut t = GpuPageTable::default();
        assert!(t.set(5, pte(7, GpuPageSize::Size4K)));
        assert!(!t.set(5, pte(8, GpuPageSize::Size4K)), "a remap is not new");
        for i in 0..16 {
            t.set(512 + i, pte(1000 + i, GpuPageSize::Size64K));
        }
        assert_eq!(t.mapped(), 17);
        assert_eq!(t.lookup(5), Some(pte(8, GpuPageSize::Size4K)));
        assert_eq!(t.lookup(520).unwrap().size, GpuPageSize::Size64K);
        assert_eq!(t.lookup(520).unwrap().location, Location::Vram);
        t.set(7, pte(60, GpuPageSize::Size4K));
        assert_eq!(t.lookup(7).unwrap().location, Location::Peer);
        t.unmap(7, 8);
        assert_eq!(t.lookup(6), None);
        assert_eq!(t.unmap(6, 520), 8, "exclusive end");
        assert_eq!(t.lookup(5).map(|p| p.frame_nr), Some(8));
        assert_eq!(
            (
                t.count_remote(5),
                t.count_remote(6),
                t.count_remote(1 << 20)
            ),
            (1, 2, 0)
        );
        t.clear_remote(0);
        assert_eq!(t.count_remote(5), 1);
        assert_eq!(t.unmap(0, u64::MAX >> 12), 9);
        assert_eq!(t.mapped(), 0);
        assert!(t.leaves.is_empty(), "empty leaves are freed");
        assert_eq!(t.unmap(9, 9), 0);
    }
}
