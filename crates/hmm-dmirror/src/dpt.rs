//! The device page table: what a mirror maps, indexed by virtual page number (the kernel
//! driver's XArray `pt`).
//!
//! Entries hold a frame number and a tag; they hold **no** page references. A frame a
//! device entry names stays valid only because every change of the CPU mapping first runs
//! the mirror's interval notifier, which takes the mirror lock (that guards this table) and
//! erases the range. So every use of an entry's frame happens under that lock.
//!
//! Layout: a `BTreeMap` of 512-entry leaves keyed by `vpn >> 9`, so a walk over consecutive
//! pages costs one map lookup per 2 MiB, and erasing a range drops whole leaves.

use std::collections::BTreeMap;

const LEAF_SHIFT: u32 = 9;
const LEAF_LEN: usize = 1 << LEAF_SHIFT;
const TAG_BITS: u32 = 2;
const TAG_MASK: u64 = (1 << TAG_BITS) - 1;

/// How the device may use a mapped page (the XArray pointer tags of `test_hmm.c`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum DptTag {
    /// Read-only (no tag).
    Read,
    /// Readable and writable (`DPT_XA_TAG_WRITE`).
    Write,
    /// Exclusive access for device atomics (`DPT_XA_TAG_ATOMIC`).
    Atomic,
}

impl DptTag {
    fn bits(self) -> u64 {
        match self {
            DptTag::Read => 1,
            DptTag::Write => 3,
            DptTag::Atomic => 2,
        }
    }

    fn from_bits(b: u64) -> DptTag {
        match b {
            1 => DptTag::Read,
            3 => DptTag::Write,
            2 => DptTag::Atomic,
            _ => unreachable!("empty entries have no tag"),
        }
    }

    /// Whether the device may write through an entry with this tag: only a WRITE entry, as
    /// `dmirror_do_write` checks. A write to a page held for atomics faults it writable
    /// first, which revokes the exclusive access.
    pub fn is_writable(self) -> bool {
        matches!(self, DptTag::Write)
    }
}

/// One device mapping: a frame (CPU or device frame number, one numbering) and a tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct DptEntry {
    /// The frame number.
    pub frame_nr: u64,
    /// How the device may use it.
    pub tag: DptTag,
}

impl DptEntry {
    fn encode(self) -> u64 {
        (self.frame_nr << TAG_BITS) | self.tag.bits()
    }

    fn decode(word: u64) -> Option<DptEntry> {
        (word != 0).then(|| DptEntry {
            frame_nr: word >> TAG_BITS,
            tag: DptTag::from_bits(word & TAG_MASK),
        })
    }
}

/// The table.
#[derive(Debug, Default)]
pub(crate) struct DevicePageTable {
    leaves: BTreeMap<u64, Box<[u64; LEAF_LEN]>>,
    len: usize,
}

impl DevicePageTable {
    /// The entry for virtual page `vpn`.
    pub(crate) fn get(&self, vpn: u64) -> Option<DptEntry> {
        let leaf = self.leaves.get(&(vpn >> LEAF_SHIFT))?;
        DptEntry::decode(leaf[(vpn as usize) & (LEAF_LEN - 1)])
    }

    /// Maps virtual page `vpn`.
    pub(crate) fn store(&mut self, vpn: u64, entry: DptEntry) {
        let leaf = self
            .leaves
            .entry(vpn >> LEAF_SHIFT)
            .or_insert_with(|| Box::new([0; LEAF_LEN]));
        let slot = &mut leaf[(vpn as usize) & (LEAF_LEN - 1)];
        if *slot == 0 {
            self.len += 1;
        }
        *slot = entry.encode();
    }

    /// Unmaps every page in `[start, end)`; returns how many were mapped.
    pub(crate) fn erase(&mut self, start: u64, end: u64) -> u64 {
        let mut erased = 0;
        let (first, last) = (start >> LEAF_SHIFT, end.saturating_sub(1) >> LEAF_SHIFT);
        if start >= end {
            return 0;
        }
        let mut empty = Vec::new();
        for (&k, leaf) in self.leaves.range_mut(first..=last) {
            let base = k << LEAF_SHIFT;
            let lo = start.max(base) - base;
            let hi = end.min(base + LEAF_LEN as u64) - base;
            for w in &mut leaf[lo as usize..hi as usize] {
                if *w != 0 {
                    *w = 0;
                    erased += 1;
                }
            }
            if leaf.iter().all(|&w| w == 0) {
                empty.push(k);
            }
        }
        for k in empty {
            self.leaves.remove(&k);
        }
        self.len -= erased as usize;
        erased
    }

    /// Whether any mapped page in `[start, end)` satisfies `pred`. Visits the populated
    /// leaves only, so its cost is bounded by what is mapped, not by the range.
    pub(crate) fn any_in(
        &self,
        start: u64,
        end: u64,
        mut pred: impl FnMut(DptEntry) -> bool,
    ) -> bool {
        if start >= end {
            return false;
        }
        let (first, last) = (start >> LEAF_SHIFT, (end - 1) >> LEAF_SHIFT);
        self.leaves.range(first..=last).any(|(&k, leaf)| {
            let base = k << LEAF_SHIFT;
            let lo = (start.max(base) - base) as usize;
            let hi = (end.min(base + LEAF_LEN as u64) - base) as usize;
            leaf[lo..hi]
                .iter()
                .filter_map(|&w| DptEntry::decode(w))
                .any(&mut pred)
        })
    }

    /// Number of mapped pages.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_get_erase() {
        let mut t = DevicePageTable::default();
        let e = |n, tag| DptEntry { frame_nr: n, tag };
        for (vpn, tag) in [
            (5, DptTag::Read),
            (511, DptTag::Write),
            (512, DptTag::Atomic),
        ] {
            t.store(vpn, e(vpn * 3, tag));
        }
        t.store(5, e(7, DptTag::Write));
        assert_eq!(t.len(), 3);
        assert_eq!(t.get(5), Some(e(7, DptTag::Write)));
        assert_eq!(t.get(512), Some(e(1536, DptTag::Atomic)));
        assert_eq!(t.get(6), None);
        let atomic = |e: DptEntry| e.tag == DptTag::Atomic;
        assert!(t.any_in(0, u64::MAX >> 12, atomic));
        assert!(t.any_in(512, 513, atomic));
        assert!(!t.any_in(0, 512, atomic), "exclusive end");
        assert!(!t.any_in(513, u64::MAX >> 12, atomic));
        assert!(!t.any_in(7, 7, |_| true));
        assert_eq!(t.erase(6, 512), 1, "exclusive end: 512 stays");
        assert_eq!(t.get(511), None);
        assert_eq!(t.get(512).map(|x| x.tag), Some(DptTag::Atomic));
        assert_eq!(t.erase(0, u64::MAX >> 12), 2);
        assert_eq!(t.len(), 0);
        assert!(t.leaves.is_empty(), "empty leaves are freed");
        assert_eq!(t.erase(9, 9), 0);
    }
}
