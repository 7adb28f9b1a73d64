//! Addresses, frame numbers and page-aligned ranges.
//!
//! Every address in the public API is one of these newtypes; none is a bare integer.
//!
//! * [`VirtAddr`]: a user virtual address in the 47-bit x86-64 user half, `0..=USER_VA_END`.
//! * [`Pfn`]: a CPU-addressable frame number (system RAM, later device-coherent memory).
//! * [`DevicePfn`]: a device-private frame number; the CPU cannot address it.
//! * [`VaRange`]: a non-empty, page-aligned `[start, end)` range of virtual addresses.
//!
//! Arithmetic is explicit and checked (`checked_add`, `checked_sub`); there are no `+`/`-`
//! operators, so an overflow is a value the caller handles, never a silent wrap.

use std::fmt;

use thiserror::Error;

/// log2 of the base page size.
pub const PAGE_SHIFT: u32 = 12;
/// The base page size in bytes (4 KiB).
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// log2 of the span of one PMD entry.
pub const PMD_SHIFT: u32 = 21;
/// The span of one PMD entry in bytes (2 MiB): the size of a THP or hugetlb page.
pub const PMD_SIZE: u64 = 1 << PMD_SHIFT;
/// log2 of the span of one PUD entry.
pub const PUD_SHIFT: u32 = 30;
/// log2 of the span of one PGD entry.
pub const PGDIR_SHIFT: u32 = 39;
/// Order (log2 of the page count) of a PMD-sized folio.
#[doc(alias = "HPAGE_PMD_ORDER")]
pub const PMD_ORDER: u32 = PMD_SHIFT - PAGE_SHIFT;
/// Number of base pages in a PMD-sized folio.
#[doc(alias = "HPAGE_PMD_NR")]
pub const PMD_NR: u64 = 1 << PMD_ORDER;
/// Bytes mapped by one PUD leaf (a 1 GiB hugetlb page).
pub const PUD_SIZE: u64 = 1 << PUD_SHIFT;
/// Order of a PUD-sized folio (1 GiB).
#[doc(alias = "HPAGE_PUD_ORDER")]
pub const PUD_ORDER: u32 = PUD_SHIFT - PAGE_SHIFT;
/// Base pages per PUD-sized folio.
#[doc(alias = "HPAGE_PUD_NR")]
pub const PUD_NR: u64 = 1 << PUD_ORDER;
/// Entries per page-table node at every level.
#[doc(alias = "PTRS_PER_PTE")]
pub const ENTRIES_PER_TABLE: usize = 512;
/// One past the highest user virtual address (47-bit user half of x86-64).
pub const USER_VA_END: u64 = 1 << 47;
/// The end of the area `mmap` may hand out: one page below [`USER_VA_END`], as Linux's
/// `TASK_SIZE`.
pub const TASK_SIZE: u64 = USER_VA_END - PAGE_SIZE;

/// Errors from constructing addresses and ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum AddrError {
    /// The value lies outside the user half of the address space.
    #[error("address {addr:#x} is outside the user address space")]
    OutOfRange {
        /// The offending value.
        addr: u64,
    },
    /// The value is not aligned to the required size.
    #[error("address {addr:#x} is not aligned to {align:#x}")]
    Unaligned {
        /// The offending value.
        addr: u64,
        /// The alignment that was required.
        align: u64,
    },
    /// A range was empty or reversed.
    #[error("empty range [{start:#x}, {end:#x})")]
    Empty {
        /// Start of the range.
        start: u64,
        /// End of the range.
        end: u64,
    },
    /// Arithmetic overflowed.
    #[error("address arithmetic overflowed")]
    Overflow,
}

/// A user virtual address, `0..=USER_VA_END`.
///
/// `USER_VA_END` itself is allowed so that it can be the exclusive end of a range.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
pub struct VirtAddr(u64);

impl VirtAddr {
    /// The lowest address.
    pub const ZERO: VirtAddr = VirtAddr(0);

    /// Creates an address.
    ///
    /// # Panics
    ///
    /// Panics if `addr > USER_VA_END`; use [`VirtAddr::try_new`] for untrusted values.
    #[track_caller]
    pub const fn new(addr: u64) -> Self {
        assert!(addr <= USER_VA_END, "virtual address outside the user half");
        VirtAddr(addr)
    }

    /// Creates an address, or fails if it lies outside the user half.
    pub const fn try_new(addr: u64) -> Result<Self, AddrError> {
        if addr <= USER_VA_END {
            Ok(VirtAddr(addr))
        } else {
            Err(AddrError::OutOfRange { addr })
        }
    }

    /// The raw value.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// `self + bytes`, or `None` past [`USER_VA_END`].
    pub const fn checked_add(self, bytes: u64) -> Option<Self> {
        match self.0.checked_add(bytes) {
            Some(a) if a <= USER_VA_END => Some(VirtAddr(a)),
            _ => None,
        }
    }

    /// `self - bytes`, or `None` below zero.
    pub const fn checked_sub(self, bytes: u64) -> Option<Self> {
        match self.0.checked_sub(bytes) {
            Some(a) => Some(VirtAddr(a)),
            None => None,
        }
    }

    /// The distance in bytes from `base` up to `self`, or `None` if `self < base`.
    pub const fn offset_from(self, base: VirtAddr) -> Option<u64> {
        self.0.checked_sub(base.0)
    }

    /// Whether the address is a multiple of `align` (a power of two).
    pub const fn is_aligned(self, align: u64) -> bool {
        self.0 & (align - 1) == 0
    }

    /// Whether the address is page aligned.
    pub const fn is_page_aligned(self) -> bool {
        self.is_aligned(PAGE_SIZE)
    }

    /// Rounds down to a multiple of `align` (a power of two).
    pub const fn align_down(self, align: u64) -> Self {
        VirtAddr(self.0 & !(align - 1))
    }

    /// Rounds up to a multiple of `align` (a power of two), or `None` past [`USER_VA_END`].
    pub const fn align_up(self, align: u64) -> Option<Self> {
        match self.0.checked_add(align - 1) {
            Some(a) => VirtAddr(a & !(align - 1)).checked_add(0),
            None => None,
        }
    }

    /// The byte offset inside the base page.
    pub const fn page_offset(self) -> u64 {
        self.0 & (PAGE_SIZE - 1)
    }

    /// The base page this address falls in.
    pub const fn page_down(self) -> Self {
        self.align_down(PAGE_SIZE)
    }

    /// Index of this address in the page-table node of `level` (1 = PTE … 4 = PGD).
    pub(crate) const fn table_index(self, level: u32) -> usize {
        ((self.0 >> (PAGE_SHIFT + 9 * (level - 1))) & 511) as usize
    }
}

/// `addr + bytes`, as pointer arithmetic reads in C (`buf + i * PAGE_SIZE`).
///
/// # Panics
///
/// Panics past [`USER_VA_END`], as [`VirtAddr::new`] does; use
/// [`VirtAddr::checked_add`] for untrusted offsets.
impl std::ops::Add<u64> for VirtAddr {
    type Output = VirtAddr;

    #[track_caller]
    fn add(self, bytes: u64) -> VirtAddr {
        self.checked_add(bytes)
            .expect("virtual address arithmetic left the user half")
    }
}

impl std::ops::AddAssign<u64> for VirtAddr {
    #[track_caller]
    fn add_assign(&mut self, bytes: u64) {
        *self = *self + bytes;
    }
}

/// `addr - bytes`.
///
/// # Panics
///
/// Panics below zero; use [`VirtAddr::checked_sub`] for untrusted offsets.
impl std::ops::Sub<u64> for VirtAddr {
    type Output = VirtAddr;

    #[track_caller]
    fn sub(self, bytes: u64) -> VirtAddr {
        self.checked_sub(bytes)
            .expect("virtual address arithmetic went below zero")
    }
}

/// The distance in bytes from `base` up to `addr` (`end - start` in C).
///
/// # Panics
///
/// Panics if `addr < base`; use [`VirtAddr::offset_from`] otherwise.
impl std::ops::Sub<VirtAddr> for VirtAddr {
    type Output = u64;

    #[track_caller]
    fn sub(self, base: VirtAddr) -> u64 {
        self.offset_from(base)
            .expect("address difference of a lower address")
    }
}

impl fmt::Debug for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VirtAddr({:#x})", self.0)
    }
}

impl fmt::Display for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::LowerHex for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

macro_rules! frame_number {
    ($(#[$doc:meta])* $name:ident, $max_bits:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
        pub struct $name(u64);

        impl $name {
            /// The largest representable frame number plus one.
            pub const LIMIT: u64 = 1 << $max_bits;

            /// Creates a frame number.
            ///
            /// # Panics
            ///
            /// Panics if the value does not fit the entry encodings
            #[doc = concat!("(`", stringify!($max_bits), "` bits).")]
            #[track_caller]
            pub const fn new(n: u64) -> Self {
                assert!(n < Self::LIMIT, "frame number too large");
                $name(n)
            }

            /// Creates a frame number, or fails if it does not fit the entry encodings.
            pub const fn try_new(n: u64) -> Result<Self, AddrError> {
                if n < Self::LIMIT {
                    Ok($name(n))
                } else {
                    Err(AddrError::OutOfRange { addr: n })
                }
            }

            /// The raw value.
            pub const fn as_u64(self) -> u64 {
                self.0
            }

            /// The raw value as an index.
            pub const fn as_usize(self) -> usize {
                self.0 as usize
            }

            /// `self + n`, or `None` past the representable range.
            pub const fn checked_add(self, n: u64) -> Option<Self> {
                match self.0.checked_add(n) {
                    Some(v) if v < Self::LIMIT => Some($name(v)),
                    _ => None,
                }
            }

            /// `self - n`, or `None` below zero.
            pub const fn checked_sub(self, n: u64) -> Option<Self> {
                match self.0.checked_sub(n) {
                    Some(v) => Some($name(v)),
                    None => None,
                }
            }

            /// Whether the frame number is a multiple of `2^order`.
            pub const fn is_aligned_to_order(self, order: u32) -> bool {
                self.0 & ((1 << order) - 1) == 0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

frame_number!(
    /// A CPU-addressable physical frame number: system RAM (and, later, device-coherent
    /// memory). Present page-table entries and migration entries hold one.
    Pfn,
    40
);

frame_number!(
    /// A device-private frame number: memory the CPU cannot address. Device-private
    /// page-table entries hold one; a CPU access to it faults into the owner's
    /// `migrate_to_ram`.
    DevicePfn,
    40
);

/// A non-empty, page-aligned range of virtual addresses, `[start, end)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct VaRange {
    start: VirtAddr,
    end: VirtAddr,
}

impl VaRange {
    /// Creates `[start, end)`; both ends page aligned and `start < end`.
    pub fn new(start: VirtAddr, end: VirtAddr) -> Result<Self, AddrError> {
        for a in [start, end] {
            if !a.is_page_aligned() {
                return Err(AddrError::Unaligned {
                    addr: a.as_u64(),
                    align: PAGE_SIZE,
                });
            }
        }
        if start >= end {
            return Err(AddrError::Empty {
                start: start.as_u64(),
                end: end.as_u64(),
            });
        }
        Ok(VaRange { start, end })
    }

    /// Creates `[start, start + len_bytes)`; `start` and `len_bytes` page aligned, non-zero.
    pub fn from_len(start: VirtAddr, len_bytes: u64) -> Result<Self, AddrError> {
        let end = start.checked_add(len_bytes).ok_or(AddrError::Overflow)?;
        Self::new(start, end)
    }

    /// The range of the single page containing `addr`.
    pub fn page_of(addr: VirtAddr) -> Self {
        let start = addr.page_down();
        VaRange {
            start,
            // The page below USER_VA_END ends at USER_VA_END at most.
            end: start
                .checked_add(PAGE_SIZE)
                .unwrap_or(VirtAddr(USER_VA_END)),
        }
    }

    /// Inclusive start.
    pub const fn start(&self) -> VirtAddr {
        self.start
    }

    /// Exclusive end.
    pub const fn end(&self) -> VirtAddr {
        self.end
    }

    /// Length in bytes.
    pub const fn len_bytes(&self) -> u64 {
        self.end.0 - self.start.0
    }

    /// Number of base pages.
    pub const fn npages(&self) -> u64 {
        self.len_bytes() >> PAGE_SHIFT
    }

    /// Whether `addr` lies inside the range.
    pub fn contains(&self, addr: VirtAddr) -> bool {
        self.start <= addr && addr < self.end
    }

    /// Whether `other` lies entirely inside this range.
    pub fn contains_range(&self, other: &VaRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// Whether the two ranges share at least one byte.
    pub fn overlaps(&self, other: &VaRange) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// The common part of two ranges, if any.
    pub fn intersect(&self, other: &VaRange) -> Option<VaRange> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        (start < end).then_some(VaRange { start, end })
    }

    /// The start address of every base page in the range.
    pub fn pages(&self) -> impl Iterator<Item = VirtAddr> {
        (self.start.0..self.end.0)
            .step_by(PAGE_SIZE as usize)
            .map(VirtAddr)
    }

    /// The range cut at every multiple of `align` (a power of two, at least a page): the
    /// pieces a walk that must not hold a lock for the whole range takes one at a time
    /// (`PMD_SIZE` for the kernel's `PAGEMAP_WALK_SIZE`).
    ///
    /// # Panics
    ///
    /// Panics if `align` is not a power of two of at least [`PAGE_SIZE`].
    #[track_caller]
    pub fn pieces(&self, align: u64) -> impl Iterator<Item = VaRange> {
        assert!(
            align.is_power_of_two() && align >= PAGE_SIZE,
            "bad alignment {align}"
        );
        let end = self.end;
        let mut at = self.start;
        std::iter::from_fn(move || {
            (at < end).then(|| {
                let next = VirtAddr(at.0 & !(align - 1))
                    .checked_add(align)
                    .map_or(end, |e| e.min(end));
                let piece = VaRange {
                    start: at,
                    end: next,
                };
                at = next;
                piece
            })
        })
    }

    /// Index of the page containing `addr`, counted from `start`.
    ///
    /// # Panics
    ///
    /// Panics if `addr` is outside the range.
    #[track_caller]
    pub fn page_index(&self, addr: VirtAddr) -> usize {
        assert!(self.contains(addr), "{addr} outside {self:?}");
        ((addr.0 - self.start.0) >> PAGE_SHIFT) as usize
    }
}

impl fmt::Debug for VaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start.0, self.end.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virt_addr_bounds_and_arithmetic() {
        assert!(VirtAddr::try_new(USER_VA_END).is_ok());
        assert_eq!(
            VirtAddr::try_new(USER_VA_END + 1),
            Err(AddrError::OutOfRange {
                addr: USER_VA_END + 1
            })
        );
        let a = VirtAddr::new(0x1234);
        assert_eq!(a.page_down(), VirtAddr::new(0x1000));
        assert_eq!(a.page_offset(), 0x234);
        assert_eq!(a.align_up(PAGE_SIZE), Some(VirtAddr::new(0x2000)));
        assert_eq!(VirtAddr::new(USER_VA_END).checked_add(1), None);
        assert_eq!(
            VirtAddr::new(TASK_SIZE + 1).align_up(PMD_SIZE),
            Some(VirtAddr::new(USER_VA_END))
        );
        assert_eq!(VirtAddr::ZERO.checked_sub(1), None);
        assert_eq!(a.offset_from(VirtAddr::new(0x1000)), Some(0x234));
        assert_eq!(VirtAddr::new(0x1000).offset_from(a), None);
    }

    #[test]
    fn table_indices_follow_x86_64_geometry() {
        let a = VirtAddr::new((3 << 39) | (5 << 30) | (7 << 21) | (9 << 12) | 0x10);
        assert_eq!(a.table_index(4), 3);
        assert_eq!(a.table_index(3), 5);
        assert_eq!(a.table_index(2), 7);
        assert_eq!(a.table_index(1), 9);
    }

    #[test]
    fn ranges_validate_and_intersect() {
        let r = VaRange::from_len(VirtAddr::new(0x10000), 0x4000).unwrap();
        assert_eq!(r.npages(), 4);
        assert_eq!(r.pages().count(), 4);
        assert_eq!(r.page_index(VirtAddr::new(0x12fff)), 2);
        assert!(matches!(
            VaRange::new(VirtAddr::new(0x1001), VirtAddr::new(0x2000)),
            Err(AddrError::Unaligned { .. })
        ));
        assert!(matches!(
            VaRange::new(VirtAddr::new(0x2000), VirtAddr::new(0x2000)),
            Err(AddrError::Empty { .. })
        ));
        assert_eq!(
            VaRange::from_len(VirtAddr::new(TASK_SIZE), 2 * PAGE_SIZE),
            Err(AddrError::Overflow)
        );
        let s = VaRange::from_len(VirtAddr::new(0x12000), 0x8000).unwrap();
        assert_eq!(
            r.intersect(&s),
            Some(VaRange::new(VirtAddr::new(0x12000), VirtAddr::new(0x14000)).unwrap())
        );
        assert!(r.overlaps(&s));
        let t = VaRange::from_len(VirtAddr::new(0x14000), 0x1000).unwrap();
        assert_eq!(r.intersect(&t), None);
    }

    #[test]
    fn frame_numbers_are_checked() {
        assert!(Pfn::try_new(Pfn::LIMIT).is_err());
        assert_eq!(Pfn::new(5).checked_add(3), Some(Pfn::new(8)));
        assert_eq!(Pfn::new(Pfn::LIMIT - 1).checked_add(1), None);
        assert!(Pfn::new(1024).is_aligned_to_order(9));
        assert!(!DevicePfn::new(513).is_aligned_to_order(9));
    }
}
