//! Driver-inserted mappings (`VM_MIXEDMAP`): a driver maps its own pages into a process,
//! as a device driver's `mmap` does with `vm_insert_page` and a `vm_operations_struct`
//! whose `fault` supplies pages on demand.
//!
//! * [`Mm::mmap_driver`] creates a VMA backed by the driver's [`VmOps`].
//! * [`Mm::vm_insert_page`] maps one of the driver's system pages at an address now
//!   (EBUSY if something is mapped there).
//! * A fault on an empty entry asks [`VmOps::fault`] for the page. A shared mapping maps
//!   it; a private one maps it read-only and copies it on write, like a private file page.
//!
//! Each mapping of a driver page holds one reference and one map count, like any mapped
//! page. The driver keeps its own reference on every page it hands out for as long as the
//! page may be mapped (the audit counts it). Driver pages join the reverse map through
//! their [`DriverMapping`] (the driver's `address_space`), so they can be found in every
//! address space that maps them; `fork` copies these entries (`VM_MIXEDMAP` is in
//! `VM_COPY_ON_FORK`).

use crate::phys::MappingHandle;
use std::sync::{Arc, Weak};

use thiserror::Error;

use crate::addr::{Pfn, VaRange, VirtAddr};
use crate::pgtable::{Pte, PteFlags, Slot, WalkMode};
use crate::phys::{FrameFlags, FrameRef};
use crate::prot::{Prot, VmFlags};

use super::error::MmError;
use super::mmap::MapFlags;
use super::rmap::MmSet;
use super::vma::Backing;
use super::Mm;

/// Why a driver could not supply a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum VmFault {
    /// No page at this offset (`VM_FAULT_SIGBUS`): the access gets SIGBUS.
    #[error("no page at this offset (SIGBUS)")]
    Sigbus,
    /// Out of memory (`VM_FAULT_OOM`).
    #[error("out of memory")]
    Oom,
}

/// A driver's operations on its mappings (`struct vm_operations_struct`).
pub trait VmOps: Send + Sync {
    /// The page at page offset `pgoff` of the mapping (`fault`). The driver keeps its own
    /// reference on it; the mapping takes another.
    fn fault(&self, pgoff: u64, write: bool) -> Result<Pfn, VmFault>;
}

/// What backs a driver mapping: the driver's operations and the address spaces mapping
/// them (the driver file's `address_space`).
pub(crate) struct DriverMapping {
    pub(crate) ops: Arc<dyn VmOps>,
    pub(crate) mappers: MmSet,
    /// What the pages it adopts store as their mapping.
    handle: MappingHandle,
}

impl DriverMapping {
    /// Makes `page` part of this mapping's reverse map at `pgoff`, unless it already
    /// belongs somewhere.
    pub(crate) fn adopt(&self, page: &FrameRef<'_>, pgoff: u64) {
        let meta = page.folio().meta();
        if meta.mapping_id().is_none() {
            meta.set_mapping(self.handle.id(), pgoff);
        }
    }
}

impl Mm {
    /// Maps `len` bytes (rounded up to pages) whose pages `ops` supplies (a driver's
    /// `mmap`). See [`mmap`](Self::mmap) for placement and errors.
    pub fn mmap_driver(
        &self,
        addr: Option<VirtAddr>,
        len: u64,
        prot: Prot,
        flags: MapFlags,
        ops: Arc<dyn VmOps>,
    ) -> Result<VirtAddr, MmError> {
        if flags.contains(MapFlags::HUGETLB) {
            return Err(MmError::Inval {
                what: "MAP_HUGETLB with a driver mapping",
            });
        }
        let mapping = Arc::new_cyclic(|this: &Weak<DriverMapping>| DriverMapping {
            ops,
            mappers: MmSet::default(),
            handle: MappingHandle::register(this.clone()),
        });
        self.do_mmap_driver(addr, len, prot, flags, mapping)
    }

    /// Maps the driver's system page `pfn` at `addr` of a driver mapping now
    /// (`vm_insert_page`), writable if the VMA is shared and writable.
    ///
    /// Errors: `Inval` for an unaligned address, an address not in a driver mapping, a
    /// frame that is not RAM, free, reserved (the zero pages) or anonymous; `Busy` if an
    /// entry is already there.
    pub fn vm_insert_page(&self, addr: VirtAddr, pfn: Pfn) -> Result<(), MmError> {
        let inval = |what| MmError::Inval { what };
        if !addr.is_page_aligned() {
            return Err(inval("unaligned address"));
        }
        if !self.phys.contains(pfn) {
            return Err(inval("not a frame of this RAM"));
        }
        let page = self.phys.frame(pfn);
        let fflags = page.folio().meta().flags();
        if fflags.intersects(FrameFlags::ANON | FrameFlags::RESERVED) {
            return Err(inval("anonymous or reserved page"));
        }
        let st = self.lock.write();
        let vma = st
            .vmas
            .find(addr)
            .filter(|v| v.flags().contains(VmFlags::MIXEDMAP))
            .ok_or(inval("not in a driver mapping"))?;
        let Backing::Driver(d) = vma.backing() else {
            unreachable!("MIXEDMAP VMAs are driver-backed")
        };
        let Ok(mapping) = page.try_get() else {
            return Err(inval("free frame"));
        };
        let mut c = st.pt.cursor(VaRange::page_of(addr), WalkMode::Populate);
        let Some(Slot::Pte(p)) = c.next() else {
            unreachable!("no PMD leaves in driver mappings")
        };
        if !p.get().is_none() {
            drop(c);
            self.release_frame(mapping);
            return Err(MmError::Busy {
                what: "an entry is already mapped there",
            });
        }
        d.adopt(&page, vma.pgoff_of(addr));
        mapping.meta().inc_mapcount();
        let mut flags = PteFlags::YOUNG;
        if vma.is_shared() && vma.flags().contains(VmFlags::WRITE) {
            flags |= PteFlags::WRITE;
        }
        p.set(Pte::Present {
            pfn: mapping.into_raw(),
            flags,
        });
        Ok(())
    }
}

impl std::fmt::Debug for DriverMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverMapping").finish_non_exhaustive()
    }
}
