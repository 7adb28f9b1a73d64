//! `mmap` of anonymous memory, private or shared.

use bitflags::bitflags;

use std::sync::Arc;

use crate::addr::{VaRange, VirtAddr, PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, TASK_SIZE};
use crate::phys::HugetlbSize;
use crate::prot::{Prot, VmFlags};

use super::driver::DriverMapping;
use super::error::MmError;
use super::shmem::ShmemObject;
use super::userfaultfd::UffdEvents;
use super::vma::{Backing, Vma};
use super::{hugetlb, Mm, MMAP_BASE, MMAP_MIN_ADDR};

bitflags! {
    /// `MAP_*` flags of an anonymous mapping.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct MapFlags: u32 {
        /// `MAP_SHARED`: writes are shared with every mapping of the object.
        const SHARED = 1 << 0;
        /// `MAP_PRIVATE`: copy on write.
        const PRIVATE = 1 << 1;
        /// `MAP_FIXED`: map exactly at the address, replacing what is there.
        const FIXED = 1 << 4;
        /// `MAP_FIXED_NOREPLACE`: map exactly at the address, fail if occupied.
        const FIXED_NOREPLACE = 1 << 20;
        /// `MAP_HUGETLB`: huge pages from the hugetlb pool, all reserved at `mmap` (the
        /// length is rounded up to the page size): 2 MiB pages, or 1 GiB ones with
        /// [`HUGE_1GB`](Self::HUGE_1GB).
        const HUGETLB = 1 << 18;
        /// `MAP_HUGE_2MB` (`21 << MAP_HUGE_SHIFT`): with `HUGETLB`, 2 MiB pages, the
        /// default. Ignored without `HUGETLB`, as in Linux.
        const HUGE_2MB = 1 << 26;
        /// `MAP_HUGE_1GB` (`30 << MAP_HUGE_SHIFT`): with `HUGETLB`, 1 GiB pages from the
        /// pool of [`HugetlbSize::Size1G`](crate::phys::HugetlbSize::Size1G), mapped by PUD
        /// leaves. Ignored without `HUGETLB`, as in Linux.
        const HUGE_1GB = 1 << 27;
    }
}

/// What a new mapping maps.
enum Source<'a> {
    /// Anonymous memory (a shared object for `MAP_SHARED`).
    Anon,
    /// A file from a page offset.
    File(&'a Arc<ShmemObject>, u64),
    /// A driver's pages.
    Driver(Arc<DriverMapping>),
}

/// The largest page offset a file mapping may reach.
const MAX_PGOFF: u64 = u64::MAX >> PAGE_SHIFT >> 1;

impl Mm {
    /// Maps `len` bytes (rounded up to pages) of anonymous memory (`mmap` with
    /// `MAP_ANONYMOUS`). With `FIXED`/`FIXED_NOREPLACE` the mapping is placed at `addr`;
    /// otherwise `addr` is a hint and the highest free gap below [`MMAP_BASE`] is used,
    /// 2 MiB aligned for lengths of at least 2 MiB (as Linux does for THP).
    ///
    /// Errors: `Inval` for zero length, neither or both of `SHARED`/`PRIVATE`, an unaligned
    /// fixed address; `NoMem` for a length or range beyond the address space or no gap;
    /// `Perm` for a fixed address below [`MMAP_MIN_ADDR`]; `Exists` for
    /// `FIXED_NOREPLACE` over a mapping. A `FIXED` mapping over existing ones unmaps them
    /// first (UNMAP).
    #[doc(alias = "do_mmap")]
    pub fn mmap(
        &self,
        addr: Option<VirtAddr>,
        len: u64,
        prot: Prot,
        flags: MapFlags,
    ) -> Result<VirtAddr, MmError> {
        self.do_mmap(addr, len, prot, flags, Source::Anon)
    }

    /// `mmap` of `file` at byte `offset` (page-aligned); see [`mmap`](Self::mmap) for the
    /// placement rules and errors, plus `Inval` for an unaligned or overflowing offset.
    /// `MAP_SHARED` writes go to the file's pages; `MAP_PRIVATE` maps them read-only and a
    /// write copies the page into anonymous memory. Access at or beyond the end of file
    /// raises SIGBUS ([`FaultError::Bus`](super::FaultError::Bus)).
    pub fn mmap_file(
        &self,
        addr: Option<VirtAddr>,
        len: u64,
        prot: Prot,
        flags: MapFlags,
        file: &super::MemFile,
        offset: u64,
    ) -> Result<VirtAddr, MmError> {
        if offset % PAGE_SIZE != 0
            || !offset
                .checked_add(len)
                .is_some_and(|e| e >> PAGE_SHIFT <= MAX_PGOFF)
        {
            return Err(MmError::Inval {
                what: "unaligned or overflowing file offset",
            });
        }
        self.do_mmap(
            addr,
            len,
            prot,
            flags,
            Source::File(file.object(), offset >> PAGE_SHIFT),
        )
    }

    /// `mmap` with a driver's backing (see `driver`).
    pub(super) fn do_mmap_driver(
        &self,
        addr: Option<VirtAddr>,
        len: u64,
        prot: Prot,
        flags: MapFlags,
        mapping: Arc<DriverMapping>,
    ) -> Result<VirtAddr, MmError> {
        self.do_mmap(addr, len, prot, flags, Source::Driver(mapping))
    }

    fn do_mmap(
        &self,
        addr: Option<VirtAddr>,
        len: u64,
        prot: Prot,
        flags: MapFlags,
        source: Source<'_>,
    ) -> Result<VirtAddr, MmError> {
        let mut uf = UffdEvents::default();
        let r = self.do_mmap_locked(addr, len, prot, flags, source, &mut uf);
        uf.send();
        r
    }

    /// [`do_mmap`](Self::do_mmap) with the userfaultfd events of a `MAP_FIXED` unmap
    /// collected, to send once the mmap lock is dropped.
    fn do_mmap_locked(
        &self,
        addr: Option<VirtAddr>,
        len: u64,
        prot: Prot,
        flags: MapFlags,
        source: Source<'_>,
        uf: &mut UffdEvents,
    ) -> Result<VirtAddr, MmError> {
        let shared = flags.contains(MapFlags::SHARED);
        if shared == flags.contains(MapFlags::PRIVATE) {
            return Err(MmError::Inval {
                what: "exactly one of MAP_SHARED and MAP_PRIVATE",
            });
        }
        if len == 0 {
            return Err(MmError::Inval {
                what: "zero length",
            });
        }
        let hugetlb = flags.contains(MapFlags::HUGETLB);
        if hugetlb && !matches!(source, Source::Anon) {
            return Err(MmError::Inval {
                what: "MAP_HUGETLB with a file or driver",
            });
        }
        // The page size of MAP_HUGETLB (`hstate_sizelog`): one size flag at most; without
        // MAP_HUGETLB the size flags mean nothing.
        let map_size = if hugetlb && flags.contains(MapFlags::HUGE_2MB | MapFlags::HUGE_1GB) {
            return Err(MmError::Inval {
                what: "two MAP_HUGE_* sizes",
            });
        } else if flags.contains(MapFlags::HUGE_1GB) {
            HugetlbSize::Size1G
        } else {
            HugetlbSize::Size2M
        };
        // A hugetlbfs file (a `MFD_HUGETLB` memfd) maps in its pages from an offset
        // aligned to them.
        let file_size = match source {
            Source::File(obj, _) => obj.hugetlb_size(),
            _ => None,
        };
        if let (Source::File(_, pgoff), Some(size)) = (&source, file_size) {
            if pgoff % size.nr_pages() != 0 {
                return Err(MmError::Inval {
                    what: "hugetlb file offset not aligned to its page size",
                });
            }
        }
        let huge_file = file_size.is_some();
        let page = match (hugetlb, file_size) {
            (true, _) => map_size.bytes(),
            (false, Some(size)) => size.bytes(),
            (false, None) => PAGE_SIZE,
        };
        let len = len
            .checked_add(page - 1)
            .map(|l| l & !(page - 1))
            .filter(|&l| l <= TASK_SIZE)
            .ok_or(MmError::NoMem {
                what: "length exceeds the address space",
            })?;
        let fixed = flags.intersects(MapFlags::FIXED | MapFlags::FIXED_NOREPLACE);
        let mut st = self.lock.write();
        let start = if fixed {
            let a = addr.ok_or(MmError::Inval {
                what: "MAP_FIXED needs an address",
            })?;
            if !a.is_aligned(page) {
                return Err(MmError::Inval {
                    what: "unaligned fixed address",
                });
            }
            if a.as_u64() > TASK_SIZE - len {
                return Err(MmError::NoMem {
                    what: "fixed range beyond the address space",
                });
            }
            if a.as_u64() < MMAP_MIN_ADDR {
                return Err(MmError::Perm {
                    what: "address below mmap_min_addr",
                });
            }
            a
        } else {
            let hint = addr
                .map(|a| a.align_down(page))
                .filter(|a| a.as_u64() >= MMAP_MIN_ADDR && a.as_u64() <= TASK_SIZE - len)
                .filter(|a| {
                    let r = VaRange::from_len(*a, len).expect("checked above");
                    st.vmas.overlapping(r).next().is_none()
                });
            match hint {
                Some(a) => a,
                None => {
                    // Hugetlb memory at its page size (`hugetlb_get_unmapped_area`),
                    // THP-able lengths at 2 MiB.
                    let align = if len >= PMD_SIZE {
                        page.max(PMD_SIZE)
                    } else {
                        page
                    };
                    st.vmas
                        .find_gap_topdown(
                            len,
                            align,
                            VirtAddr::new(MMAP_MIN_ADDR),
                            VirtAddr::new(MMAP_BASE),
                        )
                        .ok_or(MmError::NoMem {
                            what: "no free gap in the address space",
                        })?
                }
            }
        };
        let range = VaRange::from_len(start, len).expect("validated range");
        let occupied = st
            .vmas
            .overlapping(range)
            .next()
            .map(|v| v.start().max(start));
        if let Some(addr) = occupied {
            if flags.contains(MapFlags::FIXED_NOREPLACE) {
                return Err(MmError::Exists { addr });
            }
            hugetlb::check_range(&st.vmas, range)?;
        }
        let mut vm_flags = VmFlags::from_prot(prot)
            | VmFlags::MAYREAD
            | VmFlags::MAYWRITE
            | VmFlags::MAYEXEC
            | VmFlags::SOFTDIRTY;
        if shared {
            vm_flags |= VmFlags::SHARED;
        }
        // A hugetlb mapping reserves its pages before anything changes (Linux
        // unmaps a MAP_FIXED target first).
        let huge_obj = if hugetlb {
            let owner = (!shared).then_some(self.id);
            let obj = ShmemObject::new_hugetlb(self.phys.clone(), len, map_size, owner).ok_or(
                MmError::NoMem {
                    what: "not enough free huge pages in the pool",
                },
            )?;
            vm_flags |= VmFlags::HUGETLB;
            Some(obj)
        } else {
            if huge_file {
                vm_flags |= VmFlags::HUGETLB;
            }
            None
        };
        if occupied.is_some() {
            self.do_munmap(&mut st, range, uf);
        }
        let source = match (&huge_obj, source) {
            (Some(obj), _) => Source::File(obj, 0),
            (None, source) => source,
        };
        let (backing, pgoff) = match source {
            Source::File(obj, pgoff) => {
                obj.mappers.add(&self.this);
                (Backing::Shmem(obj.clone()), pgoff)
            }
            Source::Driver(mapping) => {
                vm_flags |= VmFlags::MIXEDMAP;
                mapping.mappers.add(&self.this);
                (Backing::Driver(mapping), 0)
            }
            Source::Anon if shared => {
                let obj = ShmemObject::new(self.phys.clone(), len, true);
                obj.mappers.add(&self.this);
                (Backing::Shmem(obj), 0)
            }
            // Anonymous memory is indexed by its first address (see `rmap`).
            Source::Anon => (Backing::Anon, start.as_u64() >> PAGE_SHIFT),
        };
        st.vmas.insert(Vma::new(range, vm_flags, pgoff, backing));
        Ok(start)
    }
}
