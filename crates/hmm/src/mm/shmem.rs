//! In-memory files (the kernel's tmpfs/shmem inode): a page cache indexed by page offset,
//! a size, and the address spaces that map the file. Shared anonymous memory
//! (`MAP_SHARED | MAP_ANONYMOUS`) is an unnamed one of these, sized to the mapping
//! (`shmem_zero_setup`); [`MemFile`](super::MemFile) is the named kind.
//!
//! The object holds one reference on each cached page; each mapping of a page holds
//! another. Holes read as zeros; a fault or a write allocates the page (zero-filled).
//! Pages at or beyond the end of file cannot be faulted in (SIGBUS).
//!
//! Lock order: the object's lock is taken before any page-table lock and released before
//! one is taken. The size is an atomic read without the lock by faults, which re-check it
//! under the page-table lock before they install an entry; truncation stores the new size
//! before it zaps the mappings, so a fault either sees the new size or is zapped.

use crate::phys::MappingHandle;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use crate::sync::Mutex;

use crate::addr::{Pfn, PAGE_SHIFT, PAGE_SIZE};
use crate::notifier::MmId;
use crate::phys::{AllocError, Frame, FrameFlags, HugetlbSize, PhysMem};

use super::rmap::MmSet;

/// Why a page could not be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PageError {
    /// At or beyond the end of file.
    Eof,
    /// No memory for a new page.
    NoMem(AllocError),
}

/// Why [`ShmemObject::add_page`] added nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AddPageError {
    /// A page is there.
    Exists,
    /// At or beyond the end of file.
    Eof,
    /// No memory for the page.
    NoMem,
}

/// An in-memory file or shared anonymous memory object.
pub(crate) struct ShmemObject {
    phys: Arc<PhysMem>,
    /// Unnamed shared anonymous memory (as opposed to a [`MemFile`](super::MemFile)).
    anonymous: bool,
    size: AtomicU64,
    pages: Mutex<BTreeMap<u64, Pfn>>,
    /// Address spaces that map it (the kernel's `i_mmap`).
    pub(crate) mappers: MmSet,
    /// For a hugetlbfs file: its reservations.
    hugetlb: Option<HugetlbResv>,
    /// What its pages store as their mapping.
    handle: MappingHandle,
}

/// The reservations of a hugetlb mapping (the kernel's `resv_map`): the huge-page indices
/// not yet faulted in, each holding one reservation in the pool of `size`.
struct HugetlbResv {
    /// The page size of the file (its hugetlbfs mount's, `hstate_inode`).
    size: HugetlbSize,
    reserved: Mutex<BTreeSet<u64>>,
    /// For a private mapping, the address space whose faults may use them (the
    /// `HPAGE_RESV_OWNER`); a fork child's faults may not.
    owner: Option<MmId>,
    /// The fault mutexes, hashed by huge-page index (`hugetlb_fault_mutex_table`).
    faults: [Mutex<()>; FAULT_MUTEXES],
}

/// Fault mutexes per hugetlbfs file.
const FAULT_MUTEXES: usize = 16;

impl HugetlbResv {
    fn new(size: HugetlbSize, reserved: BTreeSet<u64>, owner: Option<MmId>) -> Self {
        HugetlbResv {
            size,
            reserved: Mutex::new(reserved),
            owner,
            faults: std::array::from_fn(|_| Mutex::new(())),
        }
    }
}

impl ShmemObject {
    /// A new object of `size` bytes.
    pub(crate) fn new(phys: Arc<PhysMem>, size: u64, anonymous: bool) -> Arc<Self> {
        Self::build(phys, size, anonymous, None)
    }

    fn build(
        phys: Arc<PhysMem>,
        size: u64,
        anonymous: bool,
        hugetlb: Option<HugetlbResv>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|this: &Weak<ShmemObject>| ShmemObject {
            phys,
            anonymous,
            size: AtomicU64::new(size),
            pages: Mutex::new(BTreeMap::new()),
            mappers: MmSet::default(),
            hugetlb,
            handle: MappingHandle::register(this.clone()),
        })
    }

    /// A hugetlbfs file of `size` bytes (a multiple of `hsize`) with every page reserved in
    /// the pool of `hsize` (`hugetlb_file_setup` with `hugetlb_reserve_pages`); `owner` for
    /// a private mapping. `None` if the pool cannot promise the pages.
    pub(crate) fn new_hugetlb(
        phys: Arc<PhysMem>,
        size: u64,
        hsize: HugetlbSize,
        owner: Option<MmId>,
    ) -> Option<Arc<Self>> {
        let n = size / hsize.bytes();
        if !phys.hugetlb_reserve(hsize, n) {
            return None;
        }
        let resv = HugetlbResv::new(hsize, (0..n).collect(), owner);
        Some(Self::build(phys, size, true, Some(resv)))
    }

    /// An empty hugetlbfs file of pages of `hsize` (`memfd_create` with `MFD_HUGETLB`): its
    /// pages come from the pool when first used, with no reservation (a mapping of it
    /// reserves nothing).
    pub(crate) fn new_hugetlb_file(phys: Arc<PhysMem>, hsize: HugetlbSize) -> Arc<Self> {
        let resv = HugetlbResv::new(hsize, BTreeSet::new(), None);
        Self::build(phys, 0, false, Some(resv))
    }

    /// Puts every page of `[offset, offset + len)` in the cache (`fallocate` mode 0),
    /// extending the size to cover it; a hugetlbfs file takes whole huge pages.
    pub(crate) fn fallocate(&self, offset: u64, len: u64) -> Result<(), PageError> {
        let end = offset + len;
        if end > self.size() {
            self.set_size(end);
        }
        let step = self.page_nr();
        let first = (offset >> PAGE_SHIFT) / step * step;
        let mut pgoff = first;
        while pgoff < end.div_ceil(PAGE_SIZE) {
            let (pfn, _) = self.get_page(pgoff)?;
            // The cache keeps its reference; the caller's goes.
            drop(Frame::from_raw(&self.phys, pfn));
            pgoff += step;
        }
        Ok(())
    }

    /// Whether this is a hugetlbfs file.
    pub(crate) fn is_hugetlb(&self) -> bool {
        self.hugetlb.is_some()
    }

    /// The page size of a hugetlbfs file (`hstate_inode`).
    pub(crate) fn hugetlb_size(&self) -> Option<HugetlbSize> {
        self.hugetlb.as_ref().map(|r| r.size)
    }

    /// Serializes the faults of one huge page of this file (`hugetlb_fault_mutex_hash`):
    /// two first faults must not both allocate, or the second would find the page's
    /// reservation taken and the pool empty, and get SIGBUS where Linux waits. Taken with
    /// the mmap lock held, before the folio and page-table locks.
    #[doc(alias = "hugetlb_fault_mutex_table")]
    pub(crate) fn hugetlb_fault_lock(&self, idx: u64) -> crate::sync::MutexGuard<'_, ()> {
        let resv = self.hugetlb.as_ref().expect("a hugetlb file");
        resv.faults[(idx % FAULT_MUTEXES as u64) as usize].lock()
    }

    /// Base pages per page of the cache: a huge page's for a hugetlbfs file, else 1.
    pub(crate) fn page_nr(&self) -> u64 {
        self.hugetlb_size().map_or(1, HugetlbSize::nr_pages)
    }

    /// A zeroed pool page of the file's size for the huge index `idx` with `flags`, against its
    /// reservation if `mm` may use it, else from unreserved pages; `None` if there is none.
    pub(crate) fn hugetlb_alloc(&self, idx: u64, mm: MmId, flags: FrameFlags) -> Option<Frame<'_>> {
        let resv = self.hugetlb.as_ref().expect("a hugetlb file");
        let may = resv.owner.map_or(true, |o| o == mm);
        let use_resv = may && resv.reserved.lock().remove(&idx);
        self.phys.hugetlb_alloc(resv.size, use_resv, flags)
    }

    /// Whether this is unnamed shared anonymous memory.
    pub(crate) fn is_anonymous(&self) -> bool {
        self.anonymous
    }

    /// The size in bytes (`i_size`).
    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Whether page `pgoff` lies before the end of file.
    pub(crate) fn in_size(&self, pgoff: u64) -> bool {
        pgoff < self.size().div_ceil(PAGE_SIZE)
    }

    /// The page at `pgoff`, allocated zero-filled if missing; the caller receives one new
    /// reference. Returns whether the page was allocated.
    #[doc(alias = "shmem_get_folio")]
    pub(crate) fn get_page(&self, pgoff: u64) -> Result<(Pfn, bool), PageError> {
        let mut pages = self.pages.lock();
        if !self.in_size(pgoff) {
            return Err(PageError::Eof);
        }
        let pgoff = pgoff - pgoff % self.page_nr();
        if let Some(&pfn) = pages.get(&pgoff) {
            self.phys.frame(pfn).meta().get();
            return Ok((pfn, false));
        }
        let flags = FrameFlags::UPTODATE | FrameFlags::DIRTY;
        let f = if self.is_hugetlb() {
            let resv = self.hugetlb.as_ref().expect("a hugetlb file");
            let use_resv = resv.reserved.lock().remove(&(pgoff / self.page_nr()));
            self.phys
                .hugetlb_alloc(resv.size, use_resv, flags)
                .ok_or(PageError::NoMem(AllocError {
                    order: resv.size.order(),
                }))?
        } else {
            self.phys.alloc_zeroed(0, flags).map_err(PageError::NoMem)?
        };
        let pfn = f.pfn();
        f.meta().set_mapping(self.handle.id(), pgoff);
        // One reference for the object, one for the caller.
        f.meta().get();
        pages.insert(pgoff, f.into_raw());
        Ok((pfn, true))
    }

    /// Copies bytes from `offset` into `buf`, stopping at the end of file; returns how
    /// many. Holes read as zeros and allocate nothing.
    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> usize {
        let size = self.size();
        if offset >= size {
            return 0;
        }
        let n = buf.len().min((size - offset) as usize);
        let mut done = 0;
        while done < n {
            let at = offset + done as u64;
            let in_page = (at % PAGE_SIZE) as usize;
            let k = (PAGE_SIZE as usize - in_page).min(n - done);
            // A hugetlbfs file's cache holds huge pages, by their first index.
            let pgoff = at >> PAGE_SHIFT;
            let sub = pgoff % self.page_nr();
            match self.lookup(pgoff - sub) {
                // The folio's reference keeps its page alive while it is read.
                Some(folio) => self
                    .phys
                    .frame(Pfn::new(folio.pfn().as_u64() + sub))
                    .read(in_page, &mut buf[done..done + k]),
                None => buf[done..done + k].fill(0),
            }
            done += k;
        }
        n
    }

    /// Copies `data` to `offset`, allocating pages and extending the file as needed.
    /// Returns the number of pages allocated.
    pub(crate) fn write_at(&self, offset: u64, data: &[u8]) -> Result<u64, AllocError> {
        let end = offset + data.len() as u64;
        let mut allocated = 0;
        let mut done = 0;
        // Allocation past the old size must not fail on EOF: grow first.
        self.size.fetch_max(end, Ordering::AcqRel);
        while done < data.len() {
            let at = offset + done as u64;
            let in_page = (at % PAGE_SIZE) as usize;
            let k = (PAGE_SIZE as usize - in_page).min(data.len() - done);
            let (pfn, new) = match self.get_page(at >> PAGE_SHIFT) {
                Ok(p) => p,
                Err(PageError::NoMem(e)) => return Err(e),
                Err(PageError::Eof) => unreachable!("size grown above"),
            };
            allocated += u64::from(new);
            let page = Frame::from_raw(&self.phys, pfn);
            page.write(in_page, &data[done..done + k]);
            page.meta().set_flags(FrameFlags::DIRTY);
            drop(page);
            done += k;
        }
        Ok(allocated)
    }

    /// Whether the object holds a page at `pgoff`.
    pub(crate) fn has_page(&self, pgoff: u64) -> bool {
        self.pages.lock().contains_key(&pgoff)
    }

    /// Adds a new page at `pgoff`, filled by `fill` before anyone can see it, unless one
    /// is there (`shmem_mfill_atomic_pte`); the caller receives one new reference.
    pub(crate) fn add_page(
        &self,
        pgoff: u64,
        fill: impl FnOnce(&Frame<'_>),
    ) -> Result<Pfn, AddPageError> {
        debug_assert!(!self.is_hugetlb(), "userfaultfd fills no hugetlb file");
        let f = self
            .phys
            .alloc_zeroed(0, FrameFlags::UPTODATE | FrameFlags::DIRTY)
            .map_err(|_| AddPageError::NoMem)?;
        fill(&f);
        let mut pages = self.pages.lock();
        if !self.in_size(pgoff) || pages.contains_key(&pgoff) {
            let eof = !self.in_size(pgoff);
            drop(pages);
            let _ = f.release();
            return Err(if eof {
                AddPageError::Eof
            } else {
                AddPageError::Exists
            });
        }
        let pfn = f.pfn();
        f.meta().set_mapping(self.handle.id(), pgoff);
        // One reference for the object, one for the caller.
        f.meta().get();
        pages.insert(pgoff, f.into_raw());
        Ok(pfn)
    }

    /// A reference on the cached page at `pgoff`, if any.
    pub(crate) fn lookup(&self, pgoff: u64) -> Option<Frame<'_>> {
        let pages = self.pages.lock();
        pages.get(&pgoff).map(|&pfn| self.phys.frame(pfn).get())
    }

    /// Sets the size to `size`. The caller unmaps pages beyond it from every mapping
    /// first when shrinking, then calls [`drop_pages_from`](Self::drop_pages_from).
    pub(crate) fn set_size(&self, size: u64) -> u64 {
        let _pages = self.pages.lock();
        self.size.swap(size, Ordering::AcqRel)
    }

    /// Removes pages from `pgoff` on from the cache and zeroes the part of the last page
    /// beyond the end of file (`truncate_inode_pages_range`); returns the pages removed.
    pub(crate) fn drop_pages_from(&self, pgoff: u64) -> Vec<Pfn> {
        let mut pages = self.pages.lock();
        let removed: Vec<Pfn> = pages.split_off(&pgoff).into_values().collect();
        let size = self.size();
        if size % PAGE_SIZE != 0 {
            if let Some(&pfn) = pages.get(&(size >> PAGE_SHIFT)) {
                let from = (size % PAGE_SIZE) as usize;
                let zeros = vec![0u8; PAGE_SIZE as usize - from];
                self.phys.frame(pfn).write(from, &zeros);
            }
        }
        removed
    }

    /// Number of pages held.
    pub(crate) fn nr_pages(&self) -> usize {
        self.pages.lock().len()
    }

    /// Whether the object holds `pfn` (for audits).
    pub(crate) fn holds(&self, pfn: Pfn) -> bool {
        self.pages.lock().values().any(|&p| p == pfn)
    }

    /// The RAM its pages live in.
    pub(crate) fn phys(&self) -> &Arc<PhysMem> {
        &self.phys
    }
}

impl Drop for ShmemObject {
    fn drop(&mut self) {
        crate::sync::drop_work(|| {
            for (_, pfn) in std::mem::take(self.pages.get_mut()) {
                let _ = self.phys.frame(pfn).put();
            }
            if let Some(resv) = &self.hugetlb {
                self.phys
                    .hugetlb_unreserve(resv.size, resv.reserved.lock().len() as u64);
            }
        });
    }
}

impl std::fmt::Debug for ShmemObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmemObject")
            .field("size", &self.size())
            .field("pages", &self.nr_pages())
            .finish()
    }
}
