//! [`Mm::audit`]: checks every invariant that ties entries, VMAs and frame metadata
//! together. Tests and the stress command run it after every scenario.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use thiserror::Error;

use crate::addr::{Pfn, VaRange, VirtAddr, USER_VA_END};
use crate::pgtable::{Huge, Pte, PteFlags, Slot, WalkMode};
use crate::phys::{FrameFlags, Zone};
use crate::prot::VmFlags;

use super::vma::Backing;
use super::{hugetlb, rmap, Mm};

/// What an audit found in a consistent address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct AuditReport {
    /// VMAs.
    pub vmas: u64,
    /// Present entries (including zero-page mappings).
    pub present_entries: u64,
    /// Entries mapping the zero page.
    pub zero_page_entries: u64,
    /// Device-private entries (PTEs and PMDs).
    pub device_private_entries: u64,
    /// Swap entries.
    pub swap_entries: u64,
    /// RAM frames (4 KiB each) of the folios this address space holds references on: its
    /// mapped anonymous folios (a THP counts its 512 frames) and the pages of its shared
    /// objects.
    pub frames_referenced: u64,
    /// Device frames (private or coherent) of the anonymous folios it maps, likewise.
    pub device_frames_referenced: u64,
}

/// The invariants an audit found broken.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("audit found {} problem(s): {}", problems.len(), problems.join("; "))]
pub struct AuditError {
    /// One line per broken invariant.
    pub problems: Vec<String>,
}

impl Mm {
    /// Checks, under the mmap lock held for writing (so nothing in this address space
    /// moves): every entry lies in a VMA and agrees with its protection; a writable private
    /// page is anon-exclusive; a uffd-wp entry is write-protected and lies in a VMA
    /// registered for userfaultfd write-protection; a PMD leaf maps a whole THP inside one VMA. Then, for every
    /// folio this address space maps, across *all* address spaces that map it (found
    /// through the reverse map, which must find this one's entries):
    /// each page's map count equals the PTEs mapping it, the folio's entire map count
    /// equals the PMD leaves mapping it, and its reference count equals its mappings plus
    /// its pins plus one if a shared object holds it.
    ///
    /// Run it when the system is quiet: references held outside address spaces (live
    /// [`UserPages`](super::UserPages) from `get_user_pages` without `PIN`, frames a caller
    /// holds) are reported as mismatches. It takes the mmap lock of every other address
    /// space in the fork family for reading, so two audits of one family must not run at
    /// the same time.
    pub fn audit(&self) -> Result<AuditReport, AuditError> {
        let st = self.lock.write();
        let phys = self.phys();
        let mut problems = Vec::new();
        let mut report = AuditReport {
            vmas: st.vmas.iter().count() as u64,
            ..AuditReport::default()
        };
        // Folio head -> entries of this address space that map it.
        let mut folios: HashMap<u64, Vec<(VirtAddr, Pte)>> = HashMap::new();
        let all = VaRange::new(VirtAddr::ZERO, VirtAddr::new(USER_VA_END)).expect("whole space");
        let mut c = st.pt.cursor(all, WalkMode::Lookup);
        while let Some(slot) = c.next() {
            let (va, pte, level) = match slot {
                Slot::Hole(_) => continue,
                Slot::Pte(p) => (p.va(), p.get(), Huge::Pte),
                Slot::Pmd(p) | Slot::Pud(p) => (p.range().start(), p.get(), p.level()),
            };
            let huge = level != Huge::Pte;
            if pte.is_none() {
                continue;
            }
            let Some(vma) = st.vmas.find(va) else {
                problems.push(format!("{va}: entry {pte:?} outside any VMA"));
                continue;
            };
            if huge
                && !VaRange::from_len(va, level.size())
                    .is_ok_and(|r| vma.range().contains_range(&r))
            {
                problems.push(format!(
                    "{va}: {level:?} leaf not inside VMA {:?}",
                    vma.range()
                ));
            }
            if level == Huge::Pud && hugetlb::page_size(vma) != level.size() {
                problems.push(format!("{va}: PUD leaf outside a 1 GiB hugetlb VMA"));
            }
            // The uffd-wp bit lives only where write-protection is registered, and
            // write-protects.
            if pte.is_uffd_wp() {
                if !vma.flags().contains(VmFlags::UFFD_WP) {
                    problems.push(format!(
                        "{va}: uffd-wp entry {pte:?} outside a WP-registered VMA"
                    ));
                }
                if pte.flags().contains(PteFlags::WRITE) {
                    problems.push(format!("{va}: uffd-wp entry {pte:?} is writable"));
                }
            }
            if let Pte::Swap { slot, .. } = pte {
                report.swap_entries += 1;
                if huge {
                    problems.push(format!("{va}: a swap entry at {level:?} level"));
                }
                if phys.swap().map_or(0, |s| s.count(slot)) == 0 {
                    problems.push(format!("{va}: swap entry names free slot {slot:?}"));
                }
            }
            if let Pte::Present { pfn, flags } = pte {
                report.present_entries += 1;
                if flags.contains(PteFlags::PROTNONE) == vma.is_accessible() {
                    problems.push(format!(
                        "{va}: {pte:?} disagrees with VMA {:?}",
                        vma.flags()
                    ));
                }
                if pte.is_writable() && !vma.flags().contains(VmFlags::WRITE) {
                    problems.push(format!("{va}: writable entry in a read-only VMA"));
                }
                let zero = if level == Huge::Pmd {
                    phys.is_huge_zero_pfn(pfn)
                } else {
                    phys.is_zero_pfn(pfn)
                };
                if zero {
                    report.zero_page_entries += 1;
                    if flags.contains(PteFlags::WRITE) {
                        problems.push(format!("{va}: writable zero page"));
                    }
                    continue;
                }
                let folio = phys.frame(pfn).folio();
                let fflags = folio.meta().flags();
                if fflags.contains(FrameFlags::RESERVED) {
                    problems.push(format!("{va}: maps reserved frame {pfn}"));
                }
                if huge && (folio.pfn() != pfn || folio.meta().order() != level.order()) {
                    problems.push(format!("{va}: {level:?} leaf maps {pfn}, not a folio head"));
                }
                if vma.is_anonymous() && !fflags.contains(FrameFlags::ANON) {
                    problems.push(format!("{va}: private page {pfn} not anonymous"));
                }
                // The mapped page's own bit (the head's, for a PMD leaf).
                if !vma.is_shared() && pte.is_writable() && !phys.frame(pfn).anon_exclusive() {
                    problems.push(format!("{va}: writable page {pfn} not anon-exclusive"));
                }
            }
            if let Pte::DevicePrivate { pfn, flags } = pte {
                report.device_private_entries += 1;
                if !phys.contains_device(pfn) {
                    problems.push(format!("{va}: {pte:?} names no live device-private frame"));
                    continue;
                }
                // Only anonymous folios migrate to device memory: those of anonymous VMAs
                // and the COW copies in private file mappings (as in Linux).
                let anon = phys
                    .device_frame(pfn)
                    .folio()
                    .meta()
                    .flags()
                    .contains(FrameFlags::ANON);
                if vma.is_shared() || !anon {
                    problems.push(format!(
                        "{va}: device-private entry of a non-anonymous folio or in a shared VMA"
                    ));
                }
                if flags.contains(PteFlags::WRITE) && !vma.flags().contains(VmFlags::WRITE) {
                    problems.push(format!(
                        "{va}: writable device-private entry, read-only VMA"
                    ));
                }
            }
            if let Some(nr) = pte.frame_nr() {
                if !matches!(pte, Pte::Migration { .. }) {
                    let head = phys.frame_nr(nr).folio().nr();
                    folios.entry(head).or_default().push((va, pte));
                }
            }
        }
        drop(c);
        let mut objects = HashSet::new();
        let mut object_pages = 0u64;
        for v in st.vmas.iter() {
            if let Backing::Shmem(obj) = v.backing() {
                if objects.insert(Arc::as_ptr(obj)) {
                    object_pages += obj.nr_pages() as u64;
                }
            }
        }
        let (mut anon_frames, mut device_frames) = (0u64, 0u64);
        for (&head, ours) in &folios {
            let fm = phys.frame_nr(head).meta();
            let nr = 1u64 << fm.order();
            if fm.flags().contains(FrameFlags::ANON) {
                match phys.frame_nr(head).zone() {
                    Zone::System => anon_frames += nr,
                    _ => device_frames += nr,
                }
            }
            let everywhere = rmap::collect(phys.frame_nr(head), Some((self, &st)));
            for (va, pte) in ours {
                let found = everywhere
                    .iter()
                    .any(|e| e.mm == self.id && e.addr == *va && e.entry == *pte);
                if !found {
                    problems.push(format!("{va}: {pte:?} not found by the reverse map"));
                }
            }
            let mut pte_maps = vec![0i32; nr as usize];
            let mut pmd_maps = 0i32;
            for e in everywhere
                .iter()
                .filter(|e| !matches!(e.entry, Pte::Migration { .. }))
            {
                let nr = e.entry.frame_nr().expect("a frame entry");
                match e.level {
                    Huge::Pmd | Huge::Pud => pmd_maps += 1,
                    Huge::Pte => pte_maps[(nr - head) as usize] += 1,
                }
            }
            for (i, &n) in pte_maps.iter().enumerate() {
                let page = phys.frame_nr(head + i as u64);
                if page.meta().mapcount() != n {
                    problems.push(format!(
                        "frame {:#x}: mapcount {} but {n} PTEs",
                        page.nr(),
                        page.meta().mapcount()
                    ));
                }
            }
            // An anon-exclusive page is mapped by one entry at most (PageAnonExclusive):
            // a second mapping would let a write through the first reach both. The bit is
            // each page's own; the head's covers every page while a PMD maps the folio.
            let pmd_exclusive = pmd_maps > 0 && phys.frame_nr(head).anon_exclusive();
            for (i, &n) in pte_maps.iter().enumerate() {
                let page = phys.frame_nr(head + i as u64);
                if n + pmd_maps > 1 && (pmd_exclusive || page.anon_exclusive()) {
                    problems.push(format!(
                        "frame {:#x}: anon-exclusive but mapped {} times",
                        page.nr(),
                        n + pmd_maps
                    ));
                }
            }
            if fm.entire_mapcount() != pmd_maps {
                problems.push(format!(
                    "frame {head:#x}: entire mapcount {} but {pmd_maps} PMD leaves",
                    fm.entire_mapcount()
                ));
            }
            // A file's page cache and a driver each hold one reference of their own.
            let in_object = match fm.mapping().map(|(o, _)| rmap::Owner::of(o)) {
                Some(rmap::Owner::File(obj)) => obj.holds(Pfn::new(head)),
                Some(rmap::Owner::Driver(_)) => true,
                _ => false,
            };
            let mappings: i32 = pte_maps.iter().sum::<i32>() + pmd_maps;
            let expected = mappings as u32 + u32::from(in_object) + fm.pincount();
            if fm.refcount() != expected {
                problems.push(format!(
                    "frame {head:#x}: refcount {}, expected {expected}",
                    fm.refcount()
                ));
            }
        }
        report.frames_referenced = anon_frames + object_pages;
        report.device_frames_referenced = device_frames;
        if problems.is_empty() {
            Ok(report)
        } else {
            Err(AuditError { problems })
        }
    }
}
