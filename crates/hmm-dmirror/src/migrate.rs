//! dmirror's side of migration (`dmirror_migrate_*`, `dmirror_devmem_*`): allocate and
//! copy, map into the device page table, and the CPU fault on a device page
//! (`migrate_to_ram`).
//!
//! Copies move real bytes between frames; the device's own table is updated by the driver
//! during the migration (which is why the mirror ignores MIGRATE events carrying its
//! owner): new device pages are stored when the migration to the device commits, and
//! entries of pages leaving the device are erased before they are copied back.

use hmm::addr::{VirtAddr, PAGE_SHIFT};
use hmm::migrate::{MigratePfnFlags, Migration, MigrationPages};
use hmm::phys::{FrameFlags, Zone};

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
/// the source (or zeroed for a hole), tagged with the mirror that migrated it. A source
/// already in device memory is skipped; an allocation failure (or the one-shot
/// `fail_alloc`) skips the entry.
///
/// The mirror skipped the migration's own MIGRATE invalidation, so its table may still map
/// the system pages being moved: those entries are erased (under `pt`) before any byte is
/// copied, or a device write through them between the copy and the commit would be lost.
/// The pages already on this device are not collected and keep their entries.
pub(crate) fn alloc_and_copy_to_device(
    m: &mut Migration<'_, '_>,
    device: &DmirrorDevice,
    mirror_id: u64,
    vm_write: bool,
    pt: &parking_lot::Mutex<DevicePageTable>,
    mut fail_alloc: impl FnMut() -> bool,
) -> CopyCounts {
    let mut counts = CopyCounts::default();
    {
        let mut pt = pt.lock();
        for i in 0..m.src().len() {
            if m.src()[i].is_migrating()
                && m.src_page(i)
                    .is_some_and(|p| matches!(p.zone(), Zone::System))
            {
                let vpn = m.addr(i).as_u64() >> PAGE_SHIFT;
                pt.erase(vpn, vpn + 1);
            }
        }
    }
    for i in 0..m.src().len() {
        let w = m.src()[i];
        if !w.is_migrating() {
            continue;
        }
        let src = m.src_page(i);
        if src.is_some_and(|p| !matches!(p.zone(), Zone::System)) {
            continue;
        }
        if fail_alloc() {
            continue;
        }
        let Ok(dpage) = device.alloc(0) else {
            continue;
        };
        match &src {
            Some(s) => {
                dpage.copy_from(s);
                counts.copied += 1;
            }
            None => {
                dpage.zero();
                counts.zeroed += 1;
            }
        }
        dpage.meta().set_zone_device_data(mirror_id);
        let write = w.flags().contains(MigratePfnFlags::WRITE) || (src.is_none() && vm_write);
        m.set_dst(i, dpage, write);
    }
    counts
}

/// `dmirror_migrate_finalize_and_map`: store the device pages of the entries still
/// migrating, writable if their destination is.
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
        pt.store(
            (start.as_u64() >> PAGE_SHIFT) + i as u64,
            DptEntry {
                frame_nr: d.frame_nr(),
                tag,
            },
        );
        mapped += 1;
    }
    mapped
}

/// Why copying back to system memory stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutOfMemory;

/// `dmirror_devmem_fault_alloc_and_copy`: a system page for every migrating device page,
/// the device's entry erased first (under `pt`), then the bytes copied back. An
/// allocation failure (or the one-shot `fail_alloc`) stops with `OutOfMemory`; the
/// entries left without a destination stay on the device.
pub(crate) fn alloc_and_copy_to_system(
    m: &mut Migration<'_, '_>,
    pt: Option<&parking_lot::Mutex<DevicePageTable>>,
    mut fail_alloc: impl FnMut() -> bool,
) -> Result<CopyCounts, OutOfMemory> {
    let mut counts = CopyCounts::default();
    let phys = std::sync::Arc::clone(m.mmap().mm().phys());
    for i in 0..m.src().len() {
        let w = m.src()[i];
        if !w.is_migrating() {
            continue;
        }
        let Some(spage) = m.src_page(i) else {
            continue;
        };
        if fail_alloc() {
            return Err(OutOfMemory);
        }
        let Ok(page) = phys.alloc(0, FrameFlags::empty()) else {
            return Err(OutOfMemory);
        };
        assert!(page.meta().trylock(), "a fresh page is unlocked");
        if let Some(pt) = pt {
            let vpn = m.addr(i).as_u64() >> PAGE_SHIFT;
            pt.lock().erase(vpn, vpn + 1);
        }
        page.copy_from(&spage);
        counts.copied += 1;
        let write = w.flags().contains(MigratePfnFlags::WRITE);
        m.set_dst(i, page, write);
    }
    Ok(counts)
}
