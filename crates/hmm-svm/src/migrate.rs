//! The driver's side of a migration, both ways: allocating destinations, zapping the GPU
//! entries of the sources (the notifier skips this device's own MIGRATE events, so the
//! driver does it), and copying, as `drm_pagemap`'s `populate_mm` / `evict_to_ram` and
//! UVM's `make_resident` do.
//!
//! Copies are batched: every (destination, source) pair of one migration goes to
//! [`copy_folios`] in one call, as a driver hands its copy engine one list, before the
//! migration commits.

use hmm::addr::{PAGE_SHIFT, PMD_ORDER};
use hmm::migrate::{MigratePfnFlags, Migration};
use hmm::phys::{copy_folios, FrameFlags, FrameRef, PhysMem};

use crate::device::{order_of, GpuDevice};
use crate::stats::add;
use crate::vm::VmShared;

/// No system memory for a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutOfMemory;

/// Zaps `vm`'s GPU entries for every source `m` collected, under the notifier lock,
/// before a byte is copied: the GPU must not write a page after its copy was taken.
pub(crate) fn zap_sources(vm: &VmShared, m: &Migration<'_, '_>) {
    let first = m.start().as_u64() >> PAGE_SHIFT;
    let mut st = vm.state.write();
    let mut i = 0;
    while i < m.src().len() {
        let w = m.src()[i];
        let n = w.npages();
        if w.is_migrating() && w.is_valid() {
            let vpn = first + i as u64;
            let zapped = st.gpt.unmap(vpn, vpn + n);
            add(&vm.counters.pages_invalidated, zapped);
        }
        i += n as usize;
    }
}

/// Gives every migrating system page (and hole) of `m` a page of `device`'s memory,
/// tagged with `vm_id`, filled from its source; one batched copy. Returns the pages given
/// a destination and the pages left in system memory because device memory ran out.
pub(crate) fn copy_to_vram(
    m: &mut Migration<'_, '_>,
    device: &GpuDevice,
    vm_id: u64,
) -> (u64, u64) {
    let mut pairs: Vec<(FrameRef<'_>, FrameRef<'_>)> = Vec::new();
    let (mut placed, mut failed) = (0, 0);
    let mut i = 0;
    while i < m.src().len() {
        let w = m.src()[i];
        let n = w.npages();
        // System pages and holes only (SELECT_SYSTEM collects nothing else).
        let system = m
            .src_page(i)
            .map_or(true, |p| p.zone() == hmm::phys::Zone::System);
        if !w.is_migrating() || !system {
            i += n as usize;
            continue;
        }
        let write = w.flags().contains(MigratePfnFlags::WRITE) || !w.is_valid();
        let whole = (n > 1).then(|| device.alloc(PMD_ORDER, vm_id)).flatten();
        if let Some(folio) = whole {
            match m.src_page(i) {
                Some(src) => pairs.push((*folio, src)),
                None => (0..n).for_each(|k| folio.folio_page(k).zero()),
            }
            m.set_dst(i, folio, write).expect(HANDED_ONCE);
            placed += n;
        } else {
            for k in i..i + n as usize {
                let Some(page) = device.alloc(order_of(1), vm_id) else {
                    failed += 1;
                    continue;
                };
                match m.src_page(k) {
                    Some(src) => {
                        // A page of a unit the core will split: copied at once.
                        if n > 1 {
                            page.copy_from(&src);
                        } else {
                            pairs.push((*page, src));
                        }
                    }
                    None => page.zero(),
                }
                m.set_dst(k, page, write).expect(HANDED_ONCE);
                placed += 1;
            }
        }
        i += n as usize;
    }
    copy_folios(&pairs);
    (placed, failed)
}

/// Gives every migrating device page of `m` a system folio filled from it; one batched
/// copy. A device THP gets a system THP, or 512 pages when none can be had.
/// `OutOfMemory` when an order-0 page cannot be had: the entries left without a
/// destination stay on the device (the pairs given so far are copied).
pub(crate) fn copy_to_system(
    m: &mut Migration<'_, '_>,
    phys: &PhysMem,
) -> Result<u64, OutOfMemory> {
    let alloc = |order| {
        phys.alloc(order, FrameFlags::empty())
            .ok()
            .map(|f| f.lock())
    };
    let mut pairs = Vec::new();
    let mut copied = 0;
    let mut out = Ok(());
    let mut i = 0;
    while i < m.src().len() && out.is_ok() {
        let w = m.src()[i];
        let n = w.npages();
        let Some(src) = m.src_page(i).filter(|_| w.is_migrating()) else {
            i += n as usize;
            continue;
        };
        let write = w.flags().contains(MigratePfnFlags::WRITE);
        if let Some(folio) = (n > 1).then(|| alloc(PMD_ORDER)).flatten() {
            pairs.push((*folio, src));
            m.set_dst(i, folio, write).expect(HANDED_ONCE);
            copied += n;
        } else {
            for k in i..i + n as usize {
                let Some(page) = alloc(0) else {
                    out = Err(OutOfMemory);
                    break;
                };
                let s = m.src_page(k).expect("a page of a migrating unit");
                if n > 1 {
                    page.copy_from(&s);
                } else {
                    pairs.push((*page, s));
                }
                m.set_dst(k, page, write).expect(HANDED_ONCE);
                copied += 1;
            }
        }
        i += n as usize;
    }
    copy_folios(&pairs);
    out.map(|()| copied)
}

/// The `expect` of every `set_dst` here: each loop hands one destination to each migrating
/// entry it visits, once.
const HANDED_ONCE: &str = "one destination for a migrating entry";
