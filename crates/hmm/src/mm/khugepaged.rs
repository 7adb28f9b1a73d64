//! khugepaged's scan (`mm/khugepaged.c`): the background collapse of anonymous memory into
//! THPs, with the scan limits `MADV_COLLAPSE` does without.
//!
//! [`Mm::khugepaged_scan`] is one full scan of an address space (`khugepaged_scan_mm_slot`
//! over every VMA): each aligned 2 MiB of an eligible VMA (THPs allowed on fault there:
//! [`ThpMode::Always`](super::ThpMode::Always) and not `MADV_NOHUGEPAGE`, or
//! [`ThpMode::Madvise`](super::ThpMode::Madvise) and `MADV_HUGEPAGE`) that is a table of
//! PTEs is checked against the limits (`hpage_collapse_scan_pmd`) and collapsed as
//! `MADV_COLLAPSE` collapses it. Where the PMD size is not allowed but multi-size THPs
//! are ([`MthpMode`](super::MthpMode)), the range's windows of those sizes collapse
//! instead (see the `mthp` module). The kernel's daemon runs such scans on its own timer; the
//! model runs them when asked, so a test or a workload decides when the daemon "woke".

use serde::Serialize;

use crate::addr::{VaRange, PMD_SIZE};
use crate::pgtable::{Pte, PteFlags};
use crate::phys::PhysMem;
use crate::prot::VmFlags;

use super::error::MmError;
use super::thp::{self, ThpMode};
use super::vma::{Backing, Vma};
use super::Mm;

/// khugepaged's scan limits (`/sys/kernel/mm/transparent_hugepage/khugepaged/*`), per
/// 2 MiB range of 512 entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KhugepagedLimits {
    /// Empty entries (or zero pages) allowed (`max_ptes_none`, default 511).
    pub max_ptes_none: u64,
    /// Swap entries allowed, read back before the collapse (`max_ptes_swap`, default 64).
    pub max_ptes_swap: u64,
    /// Pages mapped by another address space too (`max_ptes_shared`, default 256).
    pub max_ptes_shared: u64,
}

impl Default for KhugepagedLimits {
    fn default() -> Self {
        KhugepagedLimits {
            max_ptes_none: 511,
            max_ptes_swap: 64,
            max_ptes_shared: 256,
        }
    }
}

/// What one scan did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct KhugepagedStats {
    /// 2 MiB ranges of eligible VMAs looked at (`pages_to_scan` in PMDs).
    pub pmds_scanned: u64,
    /// THPs made (`pages_collapsed` in PMDs).
    pub collapsed: u64,
    /// Multi-size THPs made where only smaller sizes are allowed (the mTHP collapse).
    pub mthp_collapsed: u64,
}

impl KhugepagedLimits {
    /// `hpage_collapse_scan_pmd`'s counts over the 512 entries of a range: too many
    /// empty, swapped or shared entries, or none accessed (with swap entries, fewer than
    /// half accessed: `SCAN_LACK_REFERENCED_PAGE`), and khugepaged leaves it.
    pub(super) fn check(&self, phys: &PhysMem, ptes: &[Pte]) -> Result<(), MmError> {
        let (mut none, mut swap, mut shared, mut young) = (0u64, 0u64, 0u64, 0u64);
        for pte in ptes {
            match *pte {
                Pte::None => none += 1,
                Pte::Present { pfn, .. } if phys.is_zero_pfn(pfn) => none += 1,
                Pte::Present { pfn, flags } => {
                    // page_mapcount: the page's own mappings and its folio's PMD ones.
                    let page = phys.frame(pfn);
                    if page.meta().mapcount() + page.folio().meta().entire_mapcount() > 1 {
                        shared += 1;
                    }
                    if flags.contains(PteFlags::YOUNG) {
                        young += 1;
                    }
                }
                Pte::Swap { .. } => swap += 1,
                _ => {}
            }
        }
        let exceeded = |what| Err(MmError::Again { what });
        // (An empty entry of a userfaultfd-armed VMA stops any collapse: `collapse_one`.)
        if none > self.max_ptes_none {
            return exceeded("more empty entries than max_ptes_none");
        }
        if swap > self.max_ptes_swap {
            return exceeded("more swap entries than max_ptes_swap");
        }
        if shared > self.max_ptes_shared {
            return exceeded("more shared pages than max_ptes_shared");
        }
        if young == 0 || (swap > 0 && young < ptes.len() as u64 / 2) {
            return exceeded("too few recently accessed pages");
        }
        Ok(())
    }
}

impl Mm {
    /// One full scan of this address space by khugepaged, run when asked rather than on
    /// the daemon's timer: each aligned 2 MiB of a VMA where THPs are allowed on fault
    /// ([`ThpMode::Always`] and not `MADV_NOHUGEPAGE`, or [`ThpMode::Madvise`] and
    /// `MADV_HUGEPAGE`) that passes `limits` becomes a THP, as `MADV_COLLAPSE` makes one;
    /// where only multi-size THPs are allowed, its windows of those sizes become folios
    /// of them. Takes the mmap lock for writing for each range it collapses.
    #[doc(alias = "khugepaged_scan_mm_slot")]
    pub fn khugepaged_scan(&self, limits: &KhugepagedLimits) -> KhugepagedStats {
        let mut out = KhugepagedStats::default();
        let ranges: Vec<VaRange> = {
            let st = self.lock.read();
            st.vmas
                .iter()
                .filter(|v| {
                    self.khugepaged_eligible(v) || !super::mthp::allowed_orders(self, v).is_empty()
                })
                .flat_map(|v| {
                    let first = v.start().align_up(PMD_SIZE);
                    let count = first.map_or(0, |f| {
                        v.end().as_u64().saturating_sub(f.as_u64()) / PMD_SIZE
                    });
                    (0..count).filter_map(move |k| {
                        VaRange::from_len(first? + k * PMD_SIZE, PMD_SIZE).ok()
                    })
                })
                .collect()
        };
        for r in ranges {
            let st = self.lock.write();
            // Looked up again: the VMA may have changed since the list was made.
            let Some(vma) = st
                .vmas
                .find(r.start())
                .filter(|v| v.range().contains_range(&r))
            else {
                continue;
            };
            if self.khugepaged_eligible(vma) {
                out.pmds_scanned += 1;
                if let Ok(true) = thp::collapse_one(self, &st, vma, r, Some(limits)) {
                    out.collapsed += 1;
                }
                self.deferred_split_scan(&st);
                continue;
            }
            // The PMD size is not allowed here: the enabled smaller sizes, each aligned
            // window from the largest size down (a window a larger collapse covered is
            // one folio of that size now, and is left).
            let orders = super::mthp::allowed_orders(self, vma);
            if orders.is_empty() {
                continue;
            }
            out.pmds_scanned += 1;
            for order in orders {
                let len = crate::addr::PAGE_SIZE << order;
                for k in 0..PMD_SIZE / len {
                    let Ok(window) = VaRange::from_len(r.start() + k * len, len) else {
                        continue;
                    };
                    if let Ok(true) =
                        super::mthp::collapse_window(self, &st, vma, window, order, limits)
                    {
                        out.mthp_collapsed += 1;
                    }
                }
            }
            self.deferred_split_scan(&st);
        }
        out
    }

    /// Whether khugepaged may collapse in `vma` (`thp_vma_allowable_order` with the sysfs
    /// settings enforced).
    fn khugepaged_eligible(&self, vma: &Vma) -> bool {
        let flags = vma.flags();
        matches!(vma.backing(), Backing::Anon)
            && !flags.contains(VmFlags::NOHUGEPAGE)
            && match self.thp_mode() {
                ThpMode::Always => true,
                ThpMode::Madvise => flags.contains(VmFlags::HUGEPAGE),
                ThpMode::Never => false,
            }
    }
}
