//! Shared anonymous memory: the object behind `MAP_SHARED | MAP_ANONYMOUS` (the kernel's
//! shmem file), a page cache indexed by page offset.
//!
//! The object holds one reference on each of its pages; each mapping of a page holds
//! another. Lock order: the object's lock is taken before any page-table lock and released
//! before one is taken.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::addr::Pfn;
use crate::phys::{AllocError, FrameFlags, PhysMem};

use super::rmap::MmSet;

/// A shared memory object.
pub(crate) struct ShmemObject {
    this: Weak<ShmemObject>,
    phys: Arc<PhysMem>,
    pages: Mutex<BTreeMap<u64, Pfn>>,
    /// Address spaces that map it (the kernel's `i_mmap`).
    pub(crate) mappers: MmSet,
}

impl ShmemObject {
    pub(crate) fn new(phys: Arc<PhysMem>) -> Arc<Self> {
        Arc::new_cyclic(|this| ShmemObject {
            this: this.clone(),
            phys,
            pages: Mutex::new(BTreeMap::new()),
            mappers: MmSet::default(),
        })
    }

    /// The page at `pgoff`, allocated zero-filled if missing; the caller receives one new
    /// reference for its mapping. Returns whether the page was allocated.
    #[doc(alias = "shmem_get_folio")]
    pub(crate) fn get_page(&self, pgoff: u64) -> Result<(Pfn, bool), AllocError> {
        let mut pages = self.pages.lock();
        if let Some(&pfn) = pages.get(&pgoff) {
            self.phys.frame(pfn).meta().get();
            return Ok((pfn, false));
        }
        let f = self
            .phys
            .alloc_zeroed(0, FrameFlags::UPTODATE | FrameFlags::DIRTY)?;
        let pfn = f.pfn();
        let owner: Weak<ShmemObject> = self.this.clone();
        f.meta().set_mapping(owner, pgoff);
        // One reference for the object, one for the caller's mapping.
        f.meta().get();
        pages.insert(pgoff, f.into_raw());
        Ok((pfn, true))
    }

    /// Number of pages held.
    pub(crate) fn nr_pages(&self) -> usize {
        self.pages.lock().len()
    }

    /// Whether the object holds `pfn` (for audits).
    pub(crate) fn holds(&self, pfn: Pfn) -> bool {
        self.pages.lock().values().any(|&p| p == pfn)
    }
}

impl Drop for ShmemObject {
    fn drop(&mut self) {
        for (_, pfn) in std::mem::take(self.pages.get_mut()) {
            let _ = self.phys.frame(pfn).put();
        }
    }
}

impl std::fmt::Debug for ShmemObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmemObject")
            .field("pages", &self.nr_pages())
            .finish()
    }
}
