//! [`MemFile`]: an in-memory file (tmpfs, `memfd_create`) that address spaces can map and
//! that `pread`/`pwrite` read and write through the same page cache, so file I/O and
//! mappings always agree.
//!
//! Truncation (`ftruncate` to a smaller size) follows the kernel's order: the new size is
//! set first, then every mapping of the pages beyond it — shared mappings and private
//! copies alike (`unmap_mapping_range` with `even_cows`) — is zapped under a CLEAR
//! invalidation in each address space that maps the file, then the pages leave the cache
//! and the tail of the last partial page is zeroed.

use std::sync::Arc;

use crate::addr::{VaRange, PAGE_SHIFT, PAGE_SIZE};
use crate::notifier::{NotifierEvent, NotifierRange};
use crate::phys::{HugetlbSize, PhysMem};

use super::error::MmError;
use super::shmem::ShmemObject;
use super::tlb::TlbGather;
use super::vma::Backing;
use super::zap;

/// An in-memory file. Clones are handles to the same file.
#[doc(alias = "memfd_create")]
#[doc(alias = "shmem_file_setup")]
#[derive(Clone)]
pub struct MemFile {
    obj: Arc<ShmemObject>,
}

/// The largest file size (`MAX_LFS_FILESIZE`, one page short of 2^63 here).
const MAX_FILE_SIZE: u64 = (1 << 63) - PAGE_SIZE;

impl MemFile {
    /// A new, empty file whose pages come from `phys`.
    pub fn new(phys: &Arc<PhysMem>) -> MemFile {
        MemFile {
            obj: ShmemObject::new(phys.clone(), 0, false),
        }
    }

    /// A new, empty hugetlbfs file (`memfd_create` with `MFD_HUGETLB`, the default 2 MiB
    /// size): its pages are 2 MiB pages of the hugetlb pool
    /// ([`PhysMem::set_nr_hugepages`](crate::phys::PhysMem::set_nr_hugepages)), taken by
    /// [`fallocate`](Self::fallocate) or by a fault of a mapping. Its size moves in whole
    /// 2 MiB pages, it cannot be written with [`pwrite`](Self::pwrite) (hugetlbfs has no
    /// `write`), and [`Mm::mmap_file`](super::Mm::mmap_file) maps it with PMD leaves from
    /// 2 MiB aligned offsets. Unlike Linux, a mapping of it reserves no pool pages: a
    /// fault the pool cannot serve gets SIGBUS.
    #[doc(alias = "MFD_HUGETLB")]
    pub fn new_hugetlb(phys: &Arc<PhysMem>) -> MemFile {
        Self::new_hugetlb_of(phys, HugetlbSize::Size2M)
    }

    /// A new, empty hugetlbfs file of pages of `size` (`MFD_HUGETLB` with `MFD_HUGE_2MB`
    /// or `MFD_HUGE_1GB`), as [`new_hugetlb`](Self::new_hugetlb) is of 2 MiB pages: its
    /// pages come from the pool of `size`
    /// ([`PhysMem::set_nr_hugepages_of`](crate::phys::PhysMem::set_nr_hugepages_of)), its
    /// size moves in whole pages, and it maps from offsets aligned to the page size, by
    /// PUD leaves for 1 GiB pages.
    #[doc(alias = "MFD_HUGE_1GB")]
    pub fn new_hugetlb_of(phys: &Arc<PhysMem>, size: HugetlbSize) -> MemFile {
        MemFile {
            obj: ShmemObject::new_hugetlb_file(phys.clone(), size),
        }
    }

    /// Whether this is a hugetlbfs file.
    pub fn is_hugetlb(&self) -> bool {
        self.obj.is_hugetlb()
    }

    /// The page size of a hugetlbfs file; `None` for other files.
    pub fn hugetlb_size(&self) -> Option<HugetlbSize> {
        self.obj.hugetlb_size()
    }

    pub(crate) fn object(&self) -> &Arc<ShmemObject> {
        &self.obj
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.obj.size()
    }

    /// Pages in the page cache.
    pub fn nr_cached_pages(&self) -> usize {
        self.obj.nr_pages()
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns how many (0 at or past the end).
    ///
    /// Errors: `Inval` if `offset`, or `offset + buf.len()`, is past what a file offset
    /// can be (`loff_t`, `i64::MAX`), as `rw_verify_area` refuses it.
    pub fn pread(&self, offset: u64, buf: &mut [u8]) -> Result<usize, MmError> {
        if !offset
            .checked_add(buf.len() as u64)
            .is_some_and(|e| e <= i64::MAX as u64)
        {
            return Err(MmError::Inval {
                what: "read past the largest file offset",
            });
        }
        Ok(self.obj.read_at(offset, buf))
    }

    /// Writes `data` at `offset`, extending the file; returns the bytes written.
    ///
    /// Errors: `Inval` (the kernel's EFBIG/EINVAL) if the write would pass the largest file
    /// size; `NoMem` if a page cannot be allocated (the bytes before it are written, and
    /// the size covers the whole request, as with a short write into a hole).
    pub fn pwrite(&self, offset: u64, data: &[u8]) -> Result<usize, MmError> {
        if !offset
            .checked_add(data.len() as u64)
            .is_some_and(|e| e <= MAX_FILE_SIZE)
        {
            return Err(MmError::Inval {
                what: "write past the largest file size",
            });
        }
        if self.obj.is_hugetlb() {
            return Err(MmError::Inval {
                what: "hugetlbfs files cannot be written, only mapped",
            });
        }
        if data.is_empty() {
            return Ok(0);
        }
        self.obj
            .write_at(offset, data)
            .map_err(|_| MmError::NoMem {
                what: "no memory for a page-cache page",
            })?;
        Ok(data.len())
    }

    /// Sets the size (`ftruncate`); see the module docs for shrinking.
    ///
    /// Errors: `Inval` past the largest file size.
    #[doc(alias = "ftruncate")]
    pub fn truncate(&self, size: u64) -> Result<(), MmError> {
        if size > MAX_FILE_SIZE {
            return Err(MmError::Inval {
                what: "size past the largest file size",
            });
        }
        if self.obj.is_hugetlb() && size % (self.obj.page_nr() * PAGE_SIZE) != 0 {
            return Err(MmError::Inval {
                what: "a hugetlbfs file's size is whole huge pages",
            });
        }
        let old = self.obj.set_size(size);
        if size >= old {
            return Ok(());
        }
        let first = size.div_ceil(PAGE_SIZE);
        for mm in self.obj.mappers.members() {
            let st = mm.lock.read_recursive();
            let mut tlb = TlbGather::new(&mm);
            for v in st.vmas.iter() {
                let Backing::Shmem(o) = v.backing() else {
                    continue;
                };
                let (lo, hi) = (v.pgoff(), v.pgoff() + v.range().npages());
                if !Arc::ptr_eq(o, &self.obj) || hi <= first {
                    continue;
                }
                let from = first.max(lo);
                let start = v
                    .start()
                    .checked_add((from - lo) << PAGE_SHIFT)
                    .expect("inside the VMA");
                let range = VaRange::new(start, v.end()).expect("non-empty");
                let inv = mm.notifiers.invalidate_range_start(NotifierRange::new(
                    mm.id(),
                    range,
                    NotifierEvent::Clear,
                    Some(v.info()),
                ));
                zap::zap_range(&mm, &st.pt, Some(v.info()), range, &mut tlb);
                inv.end();
            }
            tlb.finish();
        }
        for pfn in self.obj.drop_pages_from(first) {
            let _ = self.obj.phys().frame(pfn).put();
        }
        Ok(())
    }

    /// Puts every page of `[offset, offset + len)` in the page cache, zero-filled where
    /// missing, and extends the size to cover it (`fallocate` with mode 0); a hugetlbfs
    /// file takes the whole huge pages the range touches.
    ///
    /// Errors: `Inval` for a zero length or a range past the largest file size; `NoMem`
    /// when RAM (or, for a hugetlbfs file, the pool: the kernel's `ENOSPC`) has no page
    /// left, the pages before it staying in the cache.
    pub fn fallocate(&self, offset: u64, len: u64) -> Result<(), MmError> {
        let end = offset.checked_add(len).filter(|&e| e <= MAX_FILE_SIZE);
        let Some(mut end) = end.filter(|_| len != 0) else {
            return Err(MmError::Inval {
                what: "zero length or past the largest file size",
            });
        };
        if self.obj.is_hugetlb() {
            let page = self.obj.page_nr() * PAGE_SIZE;
            end = end.div_ceil(page) * page;
        }
        self.obj
            .fallocate(offset, end - offset)
            .map_err(|_| MmError::NoMem {
                what: "no page for the file",
            })
    }
}

impl std::fmt::Debug for MemFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemFile").field("obj", &self.obj).finish()
    }
}
