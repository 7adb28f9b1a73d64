//! GPU page sizes: the three entry sizes of the simulated GPU's page table, which are also
//! the chunk sizes an SVM range is cut to (Xe's `2M, 64K, 4K` list).

use hmm::addr::{PAGE_SHIFT, PAGE_SIZE, PMD_SIZE};
use serde::Serialize;

/// One size class of GPU page-table entry (and of SVM range).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum GpuPageSize {
    /// 4 KiB: one CPU page.
    Size4K,
    /// 64 KiB: UVM's "big page", Xe's middle chunk.
    Size64K,
    /// 2 MiB: a PMD, a UVM va_block, a device THP.
    Size2M,
}

impl GpuPageSize {
    /// Every size, largest first: the order a range's chunk is chosen in.
    pub const LARGEST_FIRST: [GpuPageSize; 3] = [
        GpuPageSize::Size2M,
        GpuPageSize::Size64K,
        GpuPageSize::Size4K,
    ];

    /// Bytes covered.
    pub const fn bytes(self) -> u64 {
        match self {
            GpuPageSize::Size4K => PAGE_SIZE,
            GpuPageSize::Size64K => 16 * PAGE_SIZE,
            GpuPageSize::Size2M => PMD_SIZE,
        }
    }

    /// 4 KiB pages covered.
    pub const fn pages(self) -> u64 {
        self.bytes() >> PAGE_SHIFT
    }

    /// Index for per-size-class arrays (4K = 0, 64K = 1, 2M = 2).
    pub const fn index(self) -> usize {
        match self {
            GpuPageSize::Size4K => 0,
            GpuPageSize::Size64K => 1,
            GpuPageSize::Size2M => 2,
        }
    }

    /// The name Xe's statistics use ("4K", "64K", "2M").
    pub const fn name(self) -> &'static str {
        match self {
            GpuPageSize::Size4K => "4K",
            GpuPageSize::Size64K => "64K",
            GpuPageSize::Size2M => "2M",
        }
    }

    pub(crate) const fn from_bits(b: u64) -> GpuPageSize {
        match b & 3 {
            0 => GpuPageSize::Size4K,
            1 => GpuPageSize::Size64K,
            _ => GpuPageSize::Size2M,
        }
    }

    pub(crate) const fn bits(self) -> u64 {
        self.index() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(
            GpuPageSize::LARGEST_FIRST.map(GpuPageSize::pages),
            [512, 16, 1]
        );
        for s in GpuPageSize::LARGEST_FIRST {
            assert_eq!(GpuPageSize::from_bits(s.bits()), s);
        }
    }
}
