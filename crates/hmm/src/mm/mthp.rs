//! Multi-size THP for anonymous memory: folios of 16 KiB to 1 MiB (orders 2 to 8) mapped
//! by PTEs (the kernel's `alloc_anon_folio`, Linux 6.8).
//!
//! * **Controls.** Each size has its own setting ([`MthpMode`], the kernel's
//!   `/sys/kernel/mm/transparent_hugepage/hugepages-<size>kB/enabled`), per address space
//!   here as [`ThpMode`](super::ThpMode) is: `Always`, `Madvise` (only with
//!   `MADV_HUGEPAGE`), `Inherit` (follow the PMD-size [`ThpMode`](super::ThpMode)) or
//!   `Never`, the default for every size, as in the kernel. `MADV_NOHUGEPAGE` turns every
//!   size off for its VMA.
//! * **Fault.** A write to an empty PTE of a private anonymous VMA tries the enabled sizes
//!   from the largest: the naturally aligned range around the address must lie inside the
//!   VMA and hold only empty PTEs, and the VMA must not be registered with userfaultfd
//!   (whose handler resolves faults a page at a time). The folio is allocated and zeroed
//!   with no lock held; under the page-table lock the range must still be empty (else
//!   the folio is dropped and the access retried, as the kernel's `pte_range_none`
//!   check sends it back); then every PTE maps its page writable and dirty, each page
//!   anon-exclusive with its own map count, and the folio holds one reference per PTE. A
//!   failed allocation counts a fallback and tries the next size, down to one page. A read
//!   fault still maps the zero page.
//! * **Afterwards** the pages are PTE-mapped pages of a large folio, as the pages of a THP
//!   whose PMD was split are: copy on write copies one page, zap and `munmap` drop
//!   mappings page by page, fork shares them (copying the pinned ones), `mremap` and
//!   `mprotect` move and change PTEs, and whatever must act on a whole folio (migration,
//!   pageout, `UFFDIO_MOVE`, a `MADV_COLD` of part of it) splits it first (`split_folio`).

use std::sync::atomic::{AtomicU8, Ordering};

use crate::addr::{VaRange, VirtAddr, PAGE_SIZE};
use crate::prot::VmFlags;

use super::error::MmError;
use super::vma::{Backing, Vma};
use super::{Mm, ThpMode};

/// The smallest multi-size THP order for anonymous memory (16 KiB): the kernel allows no
/// order-1 anonymous folio.
pub const MTHP_MIN_ORDER: u32 = 2;
/// The largest multi-size THP order (1 MiB); order 9 is the PMD-size THP.
pub const MTHP_MAX_ORDER: u32 = 8;

/// When anonymous memory gets folios of one size on fault
/// (`/sys/kernel/mm/transparent_hugepage/hugepages-<size>kB/enabled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[repr(u8)]
pub enum MthpMode {
    /// In every eligible VMA that is not `NOHUGEPAGE`.
    Always,
    /// Only in VMAs with `MADV_HUGEPAGE`.
    Madvise,
    /// As the PMD-size setting ([`ThpMode`]) says.
    Inherit,
    /// Never (the default).
    #[default]
    Never,
}

/// The per-size settings of an address space, orders 2 to 8.
#[derive(Debug)]
pub(crate) struct MthpSettings([AtomicU8; (MTHP_MAX_ORDER - MTHP_MIN_ORDER + 1) as usize]);

impl Default for MthpSettings {
    fn default() -> Self {
        MthpSettings(std::array::from_fn(|_| {
            AtomicU8::new(MthpMode::Never as u8)
        }))
    }
}

impl MthpSettings {
    fn slot(&self, order: u32) -> Option<&AtomicU8> {
        let i = order.checked_sub(MTHP_MIN_ORDER)?;
        self.0.get(i as usize)
    }

    fn get(&self, order: u32) -> Option<MthpMode> {
        Some(match self.slot(order)?.load(Ordering::Relaxed) {
            0 => MthpMode::Always,
            1 => MthpMode::Madvise,
            2 => MthpMode::Inherit,
            _ => MthpMode::Never,
        })
    }

    /// Copies every setting of `other` (a fork child's).
    pub(crate) fn copy_from(&self, other: &MthpSettings) {
        for (a, b) in self.0.iter().zip(&other.0) {
            a.store(b.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
}

impl Mm {
    /// Sets when anonymous memory of this address space gets folios of `2^order` pages on
    /// fault (`echo always > .../hugepages-<4 << order>kB/enabled`).
    ///
    /// Errors: `Inval` for an order outside 2 to 8 (the PMD size is
    /// [`set_thp_mode`](Self::set_thp_mode)'s).
    pub fn set_mthp_mode(&self, order: u32, mode: MthpMode) -> Result<(), MmError> {
        let slot = self.mthp.slot(order).ok_or(MmError::Inval {
            what: "multi-size THP orders are 2 (16 KiB) to 8 (1 MiB)",
        })?;
        slot.store(mode as u8, Ordering::Relaxed);
        Ok(())
    }

    /// The setting of the folio size of `order` pages, or `None` outside 2 to 8.
    pub fn mthp_mode(&self, order: u32) -> Option<MthpMode> {
        self.mthp.get(order)
    }

    pub(crate) fn mthp_settings(&self) -> &MthpSettings {
        &self.mthp
    }
}

/// The folio orders a write fault at `addr` of `vma` may allocate, largest first, each
/// with its naturally aligned range (`thp_vma_allowable_orders` with the per-size
/// settings, then `thp_vma_suitable_order`). Empty for anything but a private anonymous
/// VMA, for `MADV_NOHUGEPAGE` and for a userfaultfd-registered VMA.
pub(super) fn fault_orders(mm: &Mm, vma: &Vma, addr: VirtAddr) -> Vec<(u32, VaRange)> {
    let flags = vma.flags();
    if !matches!(vma.backing(), Backing::Anon)
        || vma.is_shared()
        || flags.contains(VmFlags::NOHUGEPAGE)
        || vma.uffd().is_some()
    {
        return Vec::new();
    }
    let hugepage = flags.contains(VmFlags::HUGEPAGE);
    let inherited = match mm.thp_mode() {
        ThpMode::Always => true,
        ThpMode::Madvise => hugepage,
        ThpMode::Never => false,
    };
    (MTHP_MIN_ORDER..=MTHP_MAX_ORDER)
        .rev()
        .filter(|&order| match mm.mthp.get(order) {
            Some(MthpMode::Always) => true,
            Some(MthpMode::Madvise) => hugepage,
            Some(MthpMode::Inherit) => inherited,
            Some(MthpMode::Never) | None => false,
        })
        .filter_map(|order| {
            let len = PAGE_SIZE << order;
            let r = VaRange::from_len(addr.align_down(len), len).ok()?;
            vma.range().contains_range(&r).then_some((order, r))
        })
        .collect()
}
