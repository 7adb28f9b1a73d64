//! TLB shootdown batching (the kernel's `mmu_gather`).
//!
//! Clearing entries records the span of the present entries cleared and the frames whose
//! references those entries held. [`TlbGather::finish`] (or drop) then performs one range
//! flush — counted once, with the pages of the span — and only after it releases the frames.
//! A frame is therefore never reused while a stale translation to it could exist.

use crate::addr::{DevicePfn, Pfn, VaRange, VirtAddr, PAGE_SHIFT};
use crate::phys::Freed;

use super::Mm;

/// Pending flush and frame releases.
#[must_use = "the gathered flush and frame releases happen in finish()"]
pub(crate) struct TlbGather<'a> {
    mm: &'a Mm,
    span: Option<(VirtAddr, VirtAddr)>,
    /// Frame numbers (CPU or device pfns: one numbering) to release.
    frames: Vec<u64>,
}

impl<'a> TlbGather<'a> {
    pub(crate) fn new(mm: &'a Mm) -> Self {
        TlbGather {
            mm,
            span: None,
            frames: Vec::new(),
        }
    }

    /// A present translation for `range` was removed or restricted.
    pub(crate) fn add_range(&mut self, range: VaRange) {
        self.span = Some(match self.span {
            None => (range.start(), range.end()),
            Some((s, e)) => (s.min(range.start()), e.max(range.end())),
        });
    }

    /// Drop one reference on `pfn` after the flush.
    pub(crate) fn defer_put(&mut self, pfn: Pfn) {
        self.frames.push(pfn.as_u64());
    }

    /// Drop one reference on the device-private frame `pfn` after the flush.
    pub(crate) fn defer_put_device(&mut self, pfn: DevicePfn) {
        self.frames.push(pfn.as_u64());
    }

    /// Flushes and releases (also done on drop).
    #[doc(alias = "tlb_finish_mmu")]
    pub(crate) fn finish(self) {}
}

impl Drop for TlbGather<'_> {
    fn drop(&mut self) {
        crate::sync::drop_work(|| self.flush_and_release());
    }
}

impl TlbGather<'_> {
    fn flush_and_release(&mut self) {
        if let Some((s, e)) = self.span.take() {
            let pages = (e.as_u64() - s.as_u64()) >> PAGE_SHIFT;
            self.mm.counters.tlb_flush(pages);
        }
        let phys = self.mm.phys();
        let mut freed = 0;
        for nr in self.frames.drain(..) {
            if phys.frame_nr(nr).put() == Freed::Yes {
                freed += 1;
            }
        }
        self.mm.counters.frames_freed(freed);
    }
}
