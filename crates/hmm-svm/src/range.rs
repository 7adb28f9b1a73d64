//! SVM ranges and the notifier windows that hold them (`drm_gpusvm`'s two levels).
//!
//! * A **window** is one interval notifier over a large aligned piece of the address space
//!   (512 MiB by default), inserted the first time the GPU faults inside it.
//! * A **range** is the unit the driver migrates and maps: the largest chunk (2 MiB,
//!   64 KiB, 4 KiB) aligned around the faulting address that lies inside the CPU VMA and
//!   overlaps no existing range. Ranges are never split: an UNMAP that covers a range
//!   marks it unmapped, one that covers part of it marks it partially unmapped, and both
//!   send it to the garbage collector, which (for a partial unmap) moves its remaining
//!   device pages to system memory and then destroys it.
//!
//! The window's callback is the driver's invalidation: under the notifier lock it records
//! the sequence, then zaps the GPU entries of the range, except for MIGRATE events that
//! carry this device's owner (the seed series' filter): the migrating path zaps exactly
//! the pages it collects, so a page already on the device keeps its GPU mapping when its
//! range is migrated again.

use std::collections::BTreeMap;
use std::sync::Arc;

use hmm::addr::{VaRange, VirtAddr, PAGE_SHIFT};
use hmm::notifier::{
    IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierEvent, NotifierRange,
};

use crate::addr::GpuPageSize;
use crate::stats::add;
use crate::vm::VmShared;

/// One SVM range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SvmRange {
    /// First address, aligned to `size`.
    pub(crate) start: VirtAddr,
    /// The chunk size.
    pub(crate) size: GpuPageSize,
    /// An UNMAP covered all of it.
    pub(crate) unmapped: bool,
    /// An UNMAP covered part of it.
    pub(crate) partial_unmap: bool,
    /// It no longer fits the CPU's mappings (a `get_pages` over it failed): the garbage
    /// collector drops it and the next fault makes a new one.
    pub(crate) stale: bool,
}

impl SvmRange {
    /// The addresses it covers.
    pub(crate) fn range(&self) -> VaRange {
        VaRange::from_len(self.start, self.size.bytes()).expect("an aligned chunk")
    }

    /// Whether it waits for the garbage collector.
    pub(crate) fn is_dead(&self) -> bool {
        self.unmapped || self.partial_unmap || self.stale
    }

    /// First and end virtual page numbers.
    pub(crate) fn vpns(&self) -> (u64, u64) {
        let first = self.start.as_u64() >> PAGE_SHIFT;
        (first, first + self.size.pages())
    }
}

/// The range a fault at `addr` gets when none holds it (`drm_gpusvm_range_chunk_size`):
/// the largest chunk aligned around `addr` inside `vma` that overlaps none of `ranges`.
pub(crate) fn choose_chunk(
    addr: VirtAddr,
    vma: VaRange,
    ranges: &BTreeMap<u64, SvmRange>,
) -> Option<SvmRange> {
    GpuPageSize::LARGEST_FIRST.into_iter().find_map(|size| {
        let start = addr.align_down(size.bytes());
        let chunk = VaRange::from_len(start, size.bytes()).ok()?;
        let (first, end) = (
            start.as_u64() >> PAGE_SHIFT,
            chunk.end().as_u64() >> PAGE_SHIFT,
        );
        let overlaps = ranges
            .range(..end)
            .next_back()
            .is_some_and(|(_, r)| r.vpns().1 > first);
        (vma.contains_range(&chunk) && !overlaps).then_some(SvmRange {
            start,
            size,
            unmapped: false,
            partial_unmap: false,
            stale: false,
        })
    })
}

/// The range holding virtual page `vpn`, if any.
pub(crate) fn find(ranges: &BTreeMap<u64, SvmRange>, vpn: u64) -> Option<SvmRange> {
    ranges
        .range(..=vpn)
        .next_back()
        .map(|(_, r)| *r)
        .filter(|r| r.vpns().1 > vpn)
}

/// The callbacks of one window's interval notifier.
pub(crate) struct Window {
    pub(crate) vm: Arc<VmShared>,
}

impl IntervalNotifierOps for Window {
    fn invalidate(&self, sub: &IntervalSub, range: &NotifierRange, cur_seq: InvalidateSeq) -> bool {
        let vm = &self.vm;
        let mut st = if range.is_blockable() {
            vm.state.write()
        } else {
            match vm.state.try_write() {
                Some(g) => g,
                None => return false,
            }
        };
        // Recorded for this device's own MIGRATE events too: a fault that read the CPU
        // table before the migration took a page must retry (DESIGN.md, "dmirror").
        sub.set_seq(cur_seq);
        if range.event == NotifierEvent::Migrate && range.owner == Some(vm.owner) {
            add(&vm.counters.own_migrate_skips, 1);
            return true;
        }
        let Some(r) = range.range.intersect(&sub.range()) else {
            return true;
        };
        let (first, end) = (
            r.start().as_u64() >> PAGE_SHIFT,
            r.end().as_u64() >> PAGE_SHIFT,
        );
        let zapped = st.gpt.unmap(first, end);
        if zapped > 0 {
            add(&vm.counters.invalidations, 1);
            add(&vm.counters.pages_invalidated, zapped);
        }
        if range.event == NotifierEvent::Unmap {
            let hit: Vec<u64> = st
                .ranges
                .range(..end)
                .rev()
                .take_while(|(_, s)| s.vpns().1 > first)
                .map(|(&k, _)| k)
                .collect();
            for k in hit {
                let s = st.ranges.get_mut(&k).expect("just found");
                let newly = !s.is_dead();
                if r.contains_range(&s.range()) {
                    s.unmapped = true;
                } else {
                    // The whole range stops being usable: its GPU entries go now, and
                    // the next fault in it finds the garbage collector's work first.
                    s.partial_unmap = true;
                    let (sf, se) = s.vpns();
                    let zapped = st.gpt.unmap(sf, se);
                    add(&vm.counters.pages_invalidated, zapped);
                }
                if newly {
                    st.gc.push(k);
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmm::addr::{PAGE_SIZE, PMD_SIZE};

    fn va(x: u64) -> VirtAddr {
        VirtAddr::new(x)
    }

    #[test]
    fn the_largest_chunk_that_fits_the_vma_and_its_neighbours() {
        let mut ranges = BTreeMap::new();
        let vma = VaRange::new(va(0x4000_0000), va(0x4000_0000 + 4 * PMD_SIZE)).unwrap();
        let r = choose_chunk(va(0x4000_0000 + PMD_SIZE + 5 * PAGE_SIZE), vma, &ranges).unwrap();
        assert_eq!(
            (r.start, r.size),
            (va(0x4000_0000 + PMD_SIZE), GpuPageSize::Size2M)
        );
        ranges.insert(r.vpns().0, r);
        // A VMA that ends 32 KiB into a 64 KiB chunk gets 4 KiB ranges at its end.
        let small = VaRange::new(va(0x1000_0000), va(0x1000_0000 + 0x18000)).unwrap();
        let r = choose_chunk(va(0x1000_0000 + 0x3000), small, &ranges).unwrap();
        assert_eq!((r.start, r.size), (va(0x1000_0000), GpuPageSize::Size64K));
        let r = choose_chunk(va(0x1000_0000 + 0x11000), small, &ranges).unwrap();
        assert_eq!((r.start, r.size), (va(0x1001_1000), GpuPageSize::Size4K));
        // A neighbour inside the 2 MiB chunk forces a smaller one.
        let four_k = SvmRange {
            start: va(0x4000_0000 + 0x20000),
            size: GpuPageSize::Size4K,
            unmapped: false,
            partial_unmap: false,
            stale: false,
        };
        ranges.insert(four_k.vpns().0, four_k);
        let r = choose_chunk(va(0x4000_0000), vma, &ranges).unwrap();
        assert_eq!((r.start, r.size), (va(0x4000_0000), GpuPageSize::Size64K));
        let r = choose_chunk(va(0x4000_0000 + 0x20000), vma, &ranges);
        assert_eq!(r, None, "the page is a range already");
        assert_eq!(find(&ranges, 0x40020), Some(four_k));
        assert_eq!(find(&ranges, 0x40000 + 512), find(&ranges, 0x40000 + 1023));
        assert_eq!(find(&ranges, 0x40000), None);
    }
}
