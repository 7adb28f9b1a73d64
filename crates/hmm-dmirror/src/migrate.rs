//! dmirror's side of migration (`dmirror_migrate_*`, `dmirror_devmem_*`): allocate and
//! copy, map into the device page table, and the CPU fault on a device page
//! (`migrate_to_ram`).
//!
//! Copies move real bytes between frames; the device's own table is updated by the driver
//! during the migration (which is why the mirror ignores MIGRATE events carrying its
//! owner): new device pages are stored when the migration to the device commits, and
//! entries of pages leaving the device are erased before they are copied back.

use hmm::addr::{VirtAddr, PAGE_SHIFT, PMD_ORDER};
use hmm::migrate::{MigratePfnFlags, Migration, MigrationPages};
use hmm::phys::{copy_folios, FrameFlags, FrameRef, LockedFolio, PhysMem, Zone};

use crate::device::DmirrorDevice;
use crate::dpt::{DevicePageTable, DptEntry, DptTag};

/// What one allocate-and-copy pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CopyCounts {
    /// Pages copied (bytes moved: 4 KiB each).
    pub(crate) copied: u64,
    /// Destinations zero-filled (holes and the zero page: nothing to copy).
    pub(crate) zeroed: u64,
}

/// `dmirror_migrate_alloc_and_copy`: a device page for every migrating entry, filled from
/// the source (or zeroed for a hole), tagged with the mirror that migrated it. A unit
/// (`COMPOUND`: a THP, or an empty 2 MiB) gets one device THP; if that allocation fails
/// (or the one-shot `fail_alloc` fires) it falls back to 512 device pages, and the core
/// splits the source. A source already in device memory is skipped; an order-0
/// allocation failure skips the entry.
///
/// Every mirror of this device skipped the migration's MIGRATE invalidation (it carries the
/// device's owner), so their tables (`pts`, every open mirror) may still map the system
/// pages being moved: the entries that map them are erased, under each mirror's lock,
/// before any byte is copied, or a device write through one between the copy and the
/// commit would be lost, and a mirror other than the migrating one would keep mapping the
/// freed page. (The kernel's driver erases nothing here; its migrating mirror's entries are
/// replaced when the new pages are mapped, and a second mirror of the same device on the
/// same process keeps the stale one.) The pages already on this device are not collected
/// and keep their entries.
pub(crate) fn alloc_and_copy_to_device(
    m: &mut Migration<'_, '_>,
    device: &DmirrorDevice,
    mirror_id: u64,
    vm_write: bool,
    pts: &[&parking_lot::Mutex<DevicePageTable>],
    mut fail_alloc: impl FnMut() -> bool,
) -> CopyCounts {
    erase_sources(m, pts, 0..m.src().len());
    let mut copier = Copier::default();
    let mut i = 0;
    while i < m.src().len() {
        let w = m.src()[i];
        let n = w.npages() as usize;
        if !w.is_migrating()
            || m.src_page(i)
                .is_some_and(|p| !matches!(p.zone(), Zone::System))
        {
            i += n;
            continue;
        }
        let write = w.flags().contains(MigratePfnFlags::WRITE) || (!w.is_valid() && vm_write);
        let large = (n > 1 && !fail_alloc())
            .then(|| device.alloc(PMD_ORDER).ok())
            .flatten();
        if let Some(folio) = large {
            copier.fill(*folio, m.src_page(i));
            folio.meta().set_zone_device_data(mirror_id);
            m.set_dst(i, folio, write).expect(HANDED_ONCE);
        } else {
            for k in i..i + n {
                if n == 1 && fail_alloc() {
                    continue;
                }
                let Ok(dpage) = device.alloc(0) else {
                    continue;
                };
                copier.fill(*dpage, m.src_page(k));
                dpage.meta().set_zone_device_data(mirror_id);
                m.set_dst(k, dpage, write).expect(HANDED_ONCE);
            }
        }
        i += n;
    }
    copier.finish()
}

/// The copies of one allocate-and-copy (or eviction) pass, handed to the device's copy
/// engine as one batch ([`copy_folios`]) before the migration commits, or copied with
/// cached stores for a CPU fault ([`Copier::for_cpu`]); holes are zero-filled at once.
#[derive(Default)]
pub(crate) struct Copier<'p> {
    pairs: Vec<(FrameRef<'p>, FrameRef<'p>)>,
    counts: CopyCounts,
    /// The CPU reads the destinations next (a CPU fault's `migrate_to_ram`): copy single
    /// pages with cached stores (`copy_highpage`), so the read that retries the fault
    /// finds the bytes in its cache, rather than streaming them past it as a bulk copy
    /// does.
    for_cpu: bool,
}

impl<'p> Copier<'p> {
    /// A copier for the destinations of a CPU fault (see `for_cpu`).
    pub(crate) fn for_cpu() -> Self {
        Copier {
            for_cpu: true,
            ..Copier::default()
        }
    }

    /// Fills the folio `dst` (a page or a THP) from `src` (a folio of its order, or a page
    /// of a unit the migration will split, which is copied at once), or zero-fills it for
    /// a hole.
    pub(crate) fn fill(&mut self, dst: FrameRef<'p>, src: Option<FrameRef<'p>>) {
        let n = 1 << dst.meta().order();
        match src {
            Some(s)
                if s.meta().flags().contains(FrameFlags::TAIL)
                    || s.meta().order() != dst.meta().order() =>
            {
                dst.copy_from(&s);
                self.counts.copied += 1;
            }
            Some(s) => {
                self.pairs.push((dst, s));
                self.counts.copied += n;
            }
            None => {
                (0..n).for_each(|k| dst.folio_page(k).zero());
                self.counts.zeroed += n;
            }
        }
    }

    /// Runs the batch; every destination holds its bytes when this returns.
    pub(crate) fn finish(mut self) -> CopyCounts {
        if self.for_cpu {
            // Single pages with cached stores; a 2 MiB folio still streams (cached, it
            // would push most of the faulting CPU's cache out for the one page it reads).
            self.pairs.retain(|(dst, src)| {
                let small = dst.meta().order() == 0;
                if small {
                    dst.copy_from(src);
                }
                !small
            });
        }
        copy_folios(&self.pairs);
        self.counts
    }
}

/// `dmirror_migrate_finalize_and_map`: store the device pages of the entries still
/// migrating (all 512 of a device THP), writable if their destination is; returns the
/// pages mapped.
pub(crate) fn map_migrated(
    p: &MigrationPages<'_, '_>,
    start: VirtAddr,
    pt: &mut DevicePageTable,
) -> u64 {
    let mut mapped = 0;
    for (i, (w, d)) in p.src().iter().zip(p.dst()).enumerate() {
        if !w.is_migrating() || d.is_empty() {
            continue;
        }
        let tag = if d.flags().contains(MigratePfnFlags::WRITE) {
            DptTag::Write
        } else {
            DptTag::Read
        };
        let n = d.npages();
        let vpn = (start.as_u64() >> PAGE_SHIFT) + i as u64;
        for k in 0..n {
            pt.store(
                vpn + k,
                DptEntry {
                    frame_nr: d.frame_nr() + k,
                    tag,
                },
            );
        }
        mapped += n;
    }
    mapped
}

/// A system folio of `2^order` pages, locked, as a migration destination must be.
pub(crate) fn alloc_locked(phys: &PhysMem, order: u32) -> Option<LockedFolio<'_>> {
    Some(phys.alloc(order, FrameFlags::empty()).ok()?.lock())
}

/// The `expect` of every `set_dst` of the driver's: each loop hands one destination to
/// each migrating entry it visits, once.
pub(crate) const HANDED_ONCE: &str = "one destination for a migrating entry";

/// Why copying back to system memory stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutOfMemory;

/// `dmirror_devmem_fault_alloc_and_copy`: a system page for every migrating device page,
/// the entries of the device's tables (`pts`, every open mirror) that map it erased first,
/// then the bytes copied back. (The kernel's driver erases the entry of the mirror that
/// migrated the page only; a process forked from it maps the page too, with a mirror of
/// its own that skips the migration's invalidation as its own device's, and would keep
/// reading the page after it left.) A device THP
/// gets one system THP; if that allocation fails (or the one-shot `fail_alloc` fires) it
/// falls back to 512 pages, and the core splits the device folio. An order-0 allocation
/// failure (or `fail_alloc` on a single page) stops with `OutOfMemory`; the entries left
/// without a destination stay on the device. With `for_cpu` (a CPU fault), the bytes are
/// copied with cached stores ([`Copier::for_cpu`]).
pub(crate) fn alloc_and_copy_to_system(
    m: &mut Migration<'_, '_>,
    pts: &[&parking_lot::Mutex<DevicePageTable>],
    for_cpu: bool,
    mut fail_alloc: impl FnMut() -> bool,
) -> Result<CopyCounts, OutOfMemory> {
    let phys = std::sync::Arc::clone(m.mmap().mm().phys());
    let alloc = |order| alloc_locked(&phys, order);
    let mut copier = if for_cpu {
        Copier::for_cpu()
    } else {
        Copier::default()
    };
    let mut out = Ok(());
    let mut i = 0;
    while i < m.src().len() && out.is_ok() {
        let w = m.src()[i];
        let n = w.npages() as usize;
        if !w.is_migrating() || m.src_page(i).is_none() {
            i += n;
            continue;
        }
        erase_sources(m, pts, i..i + n);
        let write = w.flags().contains(MigratePfnFlags::WRITE);
        let large = (n > 1 && !fail_alloc()).then(|| alloc(PMD_ORDER)).flatten();
        if let Some(folio) = large {
            copier.fill(*folio, m.src_page(i));
            m.set_dst(i, folio, write).expect(HANDED_ONCE);
        } else {
            for k in i..i + n {
                let Some(page) = (n > 1 || !fail_alloc()).then(|| alloc(0)).flatten() else {
                    out = Err(OutOfMemory);
                    break;
                };
                copier.fill(*page, m.src_page(k));
                m.set_dst(k, page, write).expect(HANDED_ONCE);
            }
        }
        i += n;
    }
    // The destinations handed over are committed by the caller: they get their bytes
    // whether or not the pass stopped early.
    let counts = copier.finish();
    out.map(|()| counts)
}

/// Erases, from every table in `pts`, the entries at `m`'s entries `entries` that map
/// those entries' source pages. The mirrors skipped the migration's MIGRATE event (it
/// carries their device's owner), so this is their invalidation, done before any byte of
/// the sources is copied.
fn erase_sources(
    m: &Migration<'_, '_>,
    pts: &[&parking_lot::Mutex<DevicePageTable>],
    entries: std::ops::Range<usize>,
) {
    for pt in pts {
        let mut pt = pt.lock();
        for i in entries.clone() {
            let Some(src) = m.src_page(i) else { continue };
            let vpn = m.addr(i).as_u64() >> PAGE_SHIFT;
            if pt.get(vpn).map(|e| e.frame_nr) == Some(frame_nr(src)) {
                pt.erase(vpn, vpn + 1);
            }
        }
    }
}

/// The frame number a device table stores for `page`.
fn frame_nr(page: FrameRef<'_>) -> u64 {
    match page.zone() {
        Zone::DevicePrivate { .. } => page.device_pfn().as_u64(),
        _ => page.pfn().as_u64(),
    }
}
