//! The hugetlb pools (`/sys/kernel/mm/hugepages/hugepages-<size>kB/nr_hugepages`): one of
//! 2 MiB folios and one of 1 GiB folios, each taken from the allocator once and kept for
//! hugetlb mappings of its size, with reservations (the kernel's `struct hstate`, one per
//! size).
//!
//! * [`Region::hugetlb_resize`] grows a pool from the allocator (as far as whole free
//!   2 MiB blocks allow, or for 1 GiB pages, runs of 512 free blocks aligned to 1 GiB, as
//!   `alloc_contig_pages` finds them) or shrinks it by returning free, unreserved pages.
//! * A mapping reserves its pages when it is created ([`Region::hugetlb_reserve`]), so that
//!   its faults cannot fail later; a fault then takes a page against its reservation, or,
//!   without one (a fork child's copy on write), only from pages nobody reserved.
//! * A pool page whose last reference goes returns to the pool, not to the allocator.
//!
//! Invariant: `reserved <= free.len() <= total`.

use serde::Serialize;

use crate::addr::{PMD_ORDER, PUD_ORDER};

/// A hugetlb page size (the kernel's `struct hstate`): the 2 MiB size of PMD leaves, the
/// default (`nr_hugepages`), or the 1 GiB size of PUD leaves (`MAP_HUGE_1GB`,
/// `MFD_HUGE_1GB`).
#[doc(alias = "hstate")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub enum HugetlbSize {
    /// 2 MiB pages, mapped by PMD leaves.
    #[default]
    Size2M,
    /// 1 GiB pages, mapped by PUD leaves.
    Size1G,
}

impl HugetlbSize {
    /// Both sizes, smallest first.
    pub const ALL: [HugetlbSize; 2] = [HugetlbSize::Size2M, HugetlbSize::Size1G];

    /// The folio order (`huge_page_order`): 9 or 18.
    #[doc(alias = "huge_page_order")]
    pub fn order(self) -> u32 {
        match self {
            HugetlbSize::Size2M => PMD_ORDER,
            HugetlbSize::Size1G => PUD_ORDER,
        }
    }

    /// The size in bytes (`huge_page_size`).
    #[doc(alias = "huge_page_size")]
    pub fn bytes(self) -> u64 {
        crate::addr::PAGE_SIZE << self.order()
    }

    /// Base pages per huge page (`pages_per_huge_page`).
    #[doc(alias = "pages_per_huge_page")]
    pub fn nr_pages(self) -> u64 {
        1 << self.order()
    }

    /// The size of a folio of `order`, if hugetlb has one.
    pub fn of_order(order: u32) -> Option<HugetlbSize> {
        Self::ALL.into_iter().find(|s| s.order() == order)
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }
}

/// Pool state, under the region's pool lock.
#[derive(Debug, Default)]
pub(super) struct HugetlbPool {
    /// Free pool pages (head frame indices).
    pub(super) free: Vec<usize>,
    /// Pages in the pool, free or in use.
    pub(super) total: u64,
    /// Free pages promised to mappings.
    pub(super) reserved: u64,
}

/// A snapshot of the hugetlb pool (`/proc/meminfo`'s `HugePages_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct HugetlbStats {
    /// Pages in the pool (`HugePages_Total`).
    pub total: u64,
    /// Pages not in use (`HugePages_Free`).
    pub free: u64,
    /// Free pages reserved by mappings (`HugePages_Rsvd`).
    pub reserved: u64,
}

impl HugetlbPool {
    pub(super) fn stats(&self) -> HugetlbStats {
        HugetlbStats {
            total: self.total,
            free: self.free.len() as u64,
            reserved: self.reserved,
        }
    }
}
