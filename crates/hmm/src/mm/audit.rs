//! [`Mm::audit`]: checks every invariant that ties entries, VMAs and frame metadata
//! together. Tests and the stress command run it after every scenario.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use thiserror::Error;

use crate::addr::{Pfn, VaRange, VirtAddr, USER_VA_END};
use crate::pgtable::{Pte, PteFlags, Slot, WalkMode};
use crate::phys::FrameFlags;
use crate::prot::VmFlags;

use super::vma::Backing;
use super::Mm;

/// What an audit found in a consistent address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct AuditReport {
    /// VMAs.
    pub vmas: u64,
    /// Present entries (including zero-page mappings).
    pub present_entries: u64,
    /// Entries mapping the zero page.
    pub zero_page_entries: u64,
    /// Distinct frames this address space holds references on: mapped frames and pages
    /// of its shared objects.
    pub frames_referenced: u64,
}

/// The invariants an audit found broken.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("audit found {} problem(s): {}", problems.len(), problems.join("; "))]
pub struct AuditError {
    /// One line per broken invariant.
    pub problems: Vec<String>,
}

impl Mm {
    /// Checks, under the mmap lock held for writing (so nothing moves):
    /// every entry lies in a VMA and agrees with its protection; a writable private page
    /// is anon-exclusive; each frame's map count equals the entries mapping it and its
    /// reference count equals the references this address space accounts for (mappings,
    /// plus one per shared-object page).
    pub fn audit(&self) -> Result<AuditReport, AuditError> {
        let st = self.lock.write();
        let phys = self.phys();
        let mut problems = Vec::new();
        let mut report = AuditReport {
            vmas: st.vmas.iter().count() as u64,
            ..AuditReport::default()
        };
        let mut maps: HashMap<Pfn, i32> = HashMap::new();
        let all = VaRange::new(VirtAddr::ZERO, VirtAddr::new(USER_VA_END)).expect("whole space");
        let mut c = st.pt.cursor(all, WalkMode::Lookup);
        while let Some(slot) = c.next() {
            let (va, pte) = match slot {
                Slot::Hole(_) => continue,
                Slot::Pte(p) => (p.va(), p.get()),
                Slot::Pmd(p) => (p.range().start(), p.get()),
            };
            if pte.is_none() {
                continue;
            }
            let Some(vma) = st.vmas.find(va) else {
                problems.push(format!("{va}: entry {pte:?} outside any VMA"));
                continue;
            };
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
                if phys.is_zero_pfn(pfn) {
                    report.zero_page_entries += 1;
                    if flags.contains(PteFlags::WRITE) {
                        problems.push(format!("{va}: writable zero page"));
                    }
                    continue;
                }
                let folio = phys.frame(pfn).folio().meta().flags();
                if folio.contains(FrameFlags::RESERVED) {
                    problems.push(format!("{va}: maps reserved frame {pfn}"));
                }
                if vma.is_anonymous() {
                    if !folio.contains(FrameFlags::ANON) {
                        problems.push(format!("{va}: private page {pfn} not anonymous"));
                    }
                    if pte.is_writable() && !folio.contains(FrameFlags::ANON_EXCLUSIVE) {
                        problems.push(format!("{va}: writable page {pfn} not anon-exclusive"));
                    }
                }
            }
            if let Some(pfn) = pte.pfn() {
                if !matches!(pte, Pte::Migration { .. }) && !phys.is_zero_pfn(pfn) {
                    *maps.entry(pfn).or_default() += 1;
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
        for (&pfn, &n) in &maps {
            let f = phys.frame(pfn);
            let meta = f.meta();
            if meta.mapcount() != n {
                problems.push(format!(
                    "{pfn}: mapcount {} but {n} entries",
                    meta.mapcount()
                ));
            }
            let in_object = st.vmas.iter().any(|v| match v.backing() {
                Backing::Shmem(obj) => obj.holds(pfn),
                Backing::Anon => false,
            });
            let expected = n as u32 + u32::from(in_object) + f.folio().meta().pincount();
            let refs = f.folio().meta().refcount();
            if refs != expected {
                problems.push(format!("{pfn}: refcount {refs}, expected {expected}"));
            }
        }
        let anon_mapped = maps
            .keys()
            .filter(|p| {
                phys.frame(**p)
                    .folio()
                    .meta()
                    .flags()
                    .contains(FrameFlags::ANON)
            })
            .count() as u64;
        report.frames_referenced = anon_mapped + object_pages;
        if problems.is_empty() {
            Ok(report)
        } else {
            Err(AuditError { problems })
        }
    }
}
