//! `munmap`: UNMAP to notifiers, zap, flush, free frames, remove VMAs, free page tables.

use crate::addr::{VaRange, VirtAddr, TASK_SIZE, USER_VA_END};
use crate::notifier::{NotifierEvent, NotifierRange};

use super::error::MmError;
use super::tlb::TlbGather;
use super::userfaultfd::UffdEvents;
use super::{hugetlb, page_align_len, zap, Mm, MmState};

impl Mm {
    /// Unmaps `[addr, addr + len)` (len rounded up to pages). Holes are fine.
    ///
    /// Errors: `Inval` for an unaligned address, zero length, or a range beyond the address
    /// space; nothing changes then.
    #[doc(alias = "do_munmap")]
    pub fn munmap(&self, addr: VirtAddr, len: u64) -> Result<(), MmError> {
        let range = user_range(addr, len)?;
        let mut uf = UffdEvents::default();
        {
            let mut st = self.lock.write();
            hugetlb::check_range(&st.vmas, range)?;
            self.do_munmap(&mut st, range, &mut uf);
        }
        uf.send();
        Ok(())
    }

    /// Unmaps `range` with the mmap lock held for writing. The order is the kernel's: one
    /// UNMAP invalidation for the whole range, zap, end, flush and free, then the VMAs go
    /// and the page tables of the gap they leave are freed. The userfaultfds that asked
    /// for unmap events are added to `uf`.
    pub(super) fn do_munmap(&self, st: &mut MmState, range: VaRange, uf: &mut UffdEvents) {
        let Some(first) = st.vmas.overlapping(range).next() else {
            return;
        };
        uf.unmap(st.vmas.overlapping(range), range);
        let info = first.info();
        let segments: Vec<_> = st
            .vmas
            .overlapping(range)
            .filter_map(|v| Some((v.range().intersect(&range)?, v.info())))
            .collect();
        let inv = self.notifiers.invalidate_range_start(NotifierRange::new(
            self.id,
            range,
            NotifierEvent::Unmap,
            Some(info),
        ));
        let mut tlb = TlbGather::new(self);
        for (seg, info) in segments {
            zap::zap_range(self, &st.pt, Some(info), seg, &mut tlb);
        }
        inv.end();
        tlb.finish();
        let removed = st.vmas.remove_range(range);
        let gap = st.vmas.gap_around(range, VirtAddr::new(USER_VA_END));
        st.pt.free_tables(gap);
        // Shared objects whose last VMA went are released here, after the flush.
        drop(removed);
        self.deferred_split_scan(st);
    }
}

/// Validates `[addr, addr + len)` for munmap: aligned, non-empty, inside the address space.
fn user_range(addr: VirtAddr, len: u64) -> Result<VaRange, MmError> {
    if !addr.is_page_aligned() {
        return Err(MmError::Inval {
            what: "unaligned address",
        });
    }
    if len == 0 {
        return Err(MmError::Inval {
            what: "zero length",
        });
    }
    let len = page_align_len(len)
        .filter(|&l| addr.as_u64() <= TASK_SIZE && l <= TASK_SIZE - addr.as_u64())
        .ok_or(MmError::Inval {
            what: "range beyond the address space",
        })?;
    Ok(VaRange::from_len(addr, len).expect("validated range"))
}
