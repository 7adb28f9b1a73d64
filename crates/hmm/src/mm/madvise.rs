//! `madvise`.

use crate::addr::{VaRange, VirtAddr};
use crate::notifier::{NotifierEvent, NotifierRange};

use super::error::MmError;
use super::tlb::TlbGather;
use super::{page_align_len, zap, Mm};

/// Advice for [`Mm::madvise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_DONTNEED`: drop the pages; private anonymous memory reads back as zeros,
    /// shared memory keeps its contents in the shared object.
    #[doc(alias = "MADV_DONTNEED")]
    DontNeed,
}

impl Mm {
    /// Gives advice about `[addr, addr + len)` (len rounded up to pages). Runs under the
    /// mmap lock held for reading, concurrently with faults.
    ///
    /// Errors: `Inval` for an unaligned address or a range that overflows; `NoMem` for a
    /// range not entirely mapped. Unlike Linux, which applies the advice to the mapped parts
    /// and then fails, a range with a hole changes nothing (see DESIGN.md).
    #[doc(alias = "do_madvise")]
    pub fn madvise(&self, addr: VirtAddr, len: u64, advice: Advice) -> Result<(), MmError> {
        if !addr.is_page_aligned() {
            return Err(MmError::Inval {
                what: "unaligned address",
            });
        }
        if len == 0 {
            return Ok(());
        }
        let range = page_align_len(len)
            .and_then(|l| VaRange::from_len(addr, l).ok())
            .ok_or(MmError::Inval {
                what: "range overflows the address space",
            })?;
        let guard = self.mmap_read();
        let st = &*guard.state;
        if st.vmas.first_hole(range).is_some() {
            return Err(MmError::NoMem {
                what: "range not fully mapped",
            });
        }
        match advice {
            Advice::DontNeed => {
                let mut tlb = TlbGather::new(self);
                for v in st.vmas.overlapping(range) {
                    let seg = v.range().intersect(&range).expect("overlapping VMA");
                    let inv = self.notifiers.invalidate_range_start(NotifierRange::new(
                        self.id,
                        seg,
                        NotifierEvent::Clear,
                        Some(v.info()),
                    ));
                    zap::zap_range(self, &st.pt, seg, &mut tlb);
                    inv.end();
                }
                tlb.finish();
            }
        }
        Ok(())
    }
}
