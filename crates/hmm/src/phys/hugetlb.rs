//! The hugetlb pool (`/proc/sys/vm/nr_hugepages`): 2 MiB folios taken from the allocator
//! once and kept for hugetlb mappings, with reservations.
//!
//! * [`Region::hugetlb_resize`] grows the pool from the allocator (as far as whole free
//!   2 MiB blocks allow) or shrinks it by returning free, unreserved pages.
//! * A mapping reserves its pages when it is created ([`Region::hugetlb_reserve`]), so that
//!   its faults cannot fail later; a fault then takes a page against its reservation, or,
//!   without one (a fork child's copy on write), only from pages nobody reserved.
//! * A pool page whose last reference goes returns to the pool, not to the allocator.
//!
//! Invariant: `reserved <= free.len() <= total`.

use serde::Serialize;

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
