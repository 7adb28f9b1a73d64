//! The driver's side of a migration, both ways: allocating destinations, zapping the GPU
//! entries of the sources (the notifier skips this device's own MIGRATE events, so the
//! driver does it), and copying, as `drm_pagemap`'s `populate_mm` / `evict_to_ram` and
//! UVM's `make_resident` do.
//!
//! Copies are batched: every (destination, source) pair of one migration goes to
//! [`copy_folios`] in one call, as a driver hands its copy engine one list, before the
//! migration commits.

use hmm::addr::{PAGE_SHIFT, PMD_ORDER};
use hmm::migrate::{DeviceMigration, DstRefused, MigratePfn, MigratePfnFlags, Migration};
use hmm::phys::{copy_folios, FrameFlags, FrameRef, LockedFolio, PhysMem, Zone};

use crate::device::GpuDevice;
use crate::stats::add;
use crate::vm::VmShared;

/// No system memory for a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutOfMemory;

/// Zaps `vm`'s GPU entries for every entry `m` collected (pages, and holes and zero pages,
/// whose entries change too), under the notifier lock, before a byte is copied: the GPU
/// must not write a page after its copy was taken, nor keep reading the zero page.
pub(crate) fn zap_sources(vm: &VmShared, m: &Migration<'_, '_>) {
    let first = m.start().as_u64() >> PAGE_SHIFT;
    let mut st = vm.state.write();
    let mut i = 0;
    while i < m.src().len() {
        let w = m.src()[i];
        let n = w.npages();
        if w.is_migrating() {
            let vpn = first + i as u64;
            let zapped = st.gpt.unmap(vpn, vpn + n);
            add(&vm.counters.pages_invalidated, zapped);
        }
        i += n as usize;
    }
}

/// What [`copy_to_vram`] placed.
#[derive(Debug, Default)]
pub(crate) struct VramFill {
    /// Pages given a destination.
    pub(crate) placed: u64,
    /// Pages left in system memory: device memory ran out.
    pub(crate) failed: u64,
    /// The device folios handed over (their chunks are busy until the migration ends).
    pub(crate) frames: Vec<u64>,
}

/// Which collected entries a migration to device memory takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sources {
    /// System pages and holes (what `SELECT_SYSTEM` collects).
    System,
    /// Pages of the device's peers (what `SELECT_DEVICE_PRIVATE` with the group's owner
    /// collects, less the device's own pages).
    Peers,
}

/// Gives every migrating entry of `m` that `from` takes a page of `device`'s memory,
/// filled from its source (zeroed for a hole); one batched copy. A unit of 512 gets one
/// device THP, or 512 pages when there is none. A hole is mapped writable if the VMA is
/// (`vm_write`), a page if its CPU mapping was.
pub(crate) fn copy_to_vram(
    m: &mut Migration<'_, '_>,
    device: &GpuDevice,
    vm_write: bool,
    from: Sources,
) -> VramFill {
    let mut pairs: Vec<(FrameRef<'_>, FrameRef<'_>)> = Vec::new();
    let mut fill = VramFill::default();
    let mut i = 0;
    while i < m.src().len() {
        let w = m.src()[i];
        let n = w.npages();
        let src = m.src_page(i);
        let take = match from {
            Sources::System => src.map_or(true, |p| p.zone() == Zone::System),
            Sources::Peers => src.is_some_and(|p| device.peer_of(&p).is_some()),
        };
        if !w.is_migrating() || !take {
            i += n as usize;
            continue;
        }
        let write = w.flags().contains(MigratePfnFlags::WRITE) || (!w.is_valid() && vm_write);
        let whole = (n > 1).then(|| device.alloc(PMD_ORDER)).flatten();
        if let Some(folio) = whole {
            match m.src_page(i) {
                Some(src) => pairs.push((*folio, src)),
                None => (0..n).for_each(|k| folio.folio_page(k).zero()),
            }
            fill.frames.push(folio.device_pfn().as_u64());
            m.set_dst(i, folio, write).expect(HANDED_ONCE);
            fill.placed += n;
        } else {
            for k in i..i + n as usize {
                let Some(page) = device.alloc(0) else {
                    fill.failed += 1;
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
                fill.frames.push(page.device_pfn().as_u64());
                m.set_dst(k, page, write).expect(HANDED_ONCE);
                fill.placed += 1;
            }
        }
        i += n as usize;
    }
    copy_folios(&pairs);
    fill
}

/// A collected migration a driver fills, by VMA ([`Migration`]) or by frame number
/// ([`DeviceMigration`]): the words, the sources (borrowed for `'s`, the migration's
/// own lifetime), and the hand-over of destinations.
pub(crate) trait Collected<'s> {
    fn words(&self) -> &[MigratePfn];
    fn dst_words(&self) -> &[MigratePfn];
    fn source(&self, i: usize) -> Option<FrameRef<'s>>;
    fn hand_over<'f>(&mut self, i: usize, dst: LockedFolio<'f>) -> Result<(), DstRefused<'f>>;
}

impl<'g> Collected<'g> for Migration<'g, '_> {
    fn words(&self) -> &[MigratePfn] {
        self.src()
    }

    fn dst_words(&self) -> &[MigratePfn] {
        self.dst()
    }

    fn source(&self, i: usize) -> Option<FrameRef<'g>> {
        self.src_page(i)
    }

    fn hand_over<'f>(&mut self, i: usize, dst: LockedFolio<'f>) -> Result<(), DstRefused<'f>> {
        let write = self.src()[i].flags().contains(MigratePfnFlags::WRITE);
        self.set_dst(i, dst, write)
    }
}

impl<'p> Collected<'p> for DeviceMigration<'p> {
    fn words(&self) -> &[MigratePfn] {
        self.src()
    }

    fn dst_words(&self) -> &[MigratePfn] {
        self.dst()
    }

    fn source(&self, i: usize) -> Option<FrameRef<'p>> {
        self.src_page(i)
    }

    fn hand_over<'f>(&mut self, i: usize, dst: LockedFolio<'f>) -> Result<(), DstRefused<'f>> {
        // The mapping's permission comes from the migration entry it replaces.
        self.set_dst(i, dst, true)
    }
}

/// The migrating entries of `words` (a migration past `pages()`) whose source is the memory
/// of one of `device`'s peers: pages by the peer's pagemap id.
pub(crate) fn by_peer(words: &[MigratePfn], device: &GpuDevice) -> Vec<(u32, u64)> {
    let phys = device.phys();
    let mut out: Vec<(u32, u64)> = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let w = words[i];
        i += w.npages() as usize;
        if !w.is_migrating() || !w.is_valid() {
            continue;
        }
        if let Some(p) = device.peer_of(&phys.frame_nr(w.frame_nr())) {
            match out.iter_mut().find(|(q, _)| *q == p) {
                Some((_, n)) => *n += w.npages(),
                None => out.push((p, w.npages())),
            }
        }
    }
    out
}

/// Gives every migrating device page of `m` that `take` accepts and that has no
/// destination yet a system folio filled from it; one batched copy. A device THP gets a
/// system THP, or 512 pages when none can be had. `OutOfMemory` when an order-0 page cannot
/// be had: the entries left without a destination stay on the device (the pairs given so
/// far are copied).
pub(crate) fn copy_to_system<'s>(
    m: &mut impl Collected<'s>,
    phys: &'s PhysMem,
    take: &dyn Fn(&FrameRef<'_>) -> bool,
) -> Result<u64, OutOfMemory> {
    let mut alloc = |order| {
        phys.alloc(order, FrameFlags::empty())
            .ok()
            .map(|f| f.lock())
    };
    copy_out(m, &mut alloc, take, &|_| true)
}

/// Gives every migrating page of `m` a page of `device`'s memory filled from it (a unit of
/// 512 one device THP, or 512 pages when there is none and they all fit); one batched
/// copy, made by the source device. Entries left without a destination (`device` full)
/// are for the caller to place elsewhere. Returns the device frames handed over (their
/// chunks are busy until the migration ends).
pub(crate) fn copy_to_device<'s>(m: &mut impl Collected<'s>, device: &GpuDevice) -> Vec<u64> {
    let mut frames = Vec::new();
    let mut alloc = |order| {
        let f = device.alloc(order)?;
        frames.push(f.device_pfn().as_u64());
        Some(f)
    };
    // Out of device memory: the rest is the caller's to place.
    let _ = copy_out(m, &mut alloc, &|_| true, &|n| device.vram_pages_free() >= n);
    frames
}

/// What both directions of a migration out of device memory share: every migrating entry
/// of `m` whose source `take` accepts and that has no destination yet gets a folio from
/// `alloc` filled from its source, in one batched copy. A unit of 512 gets one order-9
/// folio, or, when there is none and `fits` says 512 pages may be had, 512 pages (copied at
/// once: the core splits the source). The first order-0 page `alloc` cannot give stops it
/// with `OutOfMemory` (the pairs given so far are copied). Returns the pages given.
fn copy_out<'s, 'f>(
    m: &mut impl Collected<'s>,
    alloc: &mut dyn FnMut(u32) -> Option<LockedFolio<'f>>,
    take: &dyn Fn(&FrameRef<'_>) -> bool,
    fits: &dyn Fn(u64) -> bool,
) -> Result<u64, OutOfMemory> {
    let mut pairs = Vec::new();
    let mut copied = 0;
    let mut out = Ok(());
    let mut i = 0;
    while i < m.words().len() && out.is_ok() {
        let w = m.words()[i];
        let n = w.npages();
        let given = m.dst_words()[i..i + n as usize]
            .iter()
            .any(|d| !d.is_empty());
        let Some(src) = m
            .source(i)
            .filter(|s| w.is_migrating() && !given && take(s))
        else {
            i += n as usize;
            continue;
        };
        if let Some(folio) = (n > 1).then(|| alloc(PMD_ORDER)).flatten() {
            pairs.push((*folio, src));
            m.hand_over(i, folio).expect(HANDED_ONCE);
            copied += n;
        } else if fits(n) {
            for k in i..i + n as usize {
                let Some(page) = alloc(0) else {
                    out = Err(OutOfMemory);
                    break;
                };
                let s = m.source(k).expect("a page of a migrating unit");
                if n > 1 {
                    page.copy_from(&s);
                } else {
                    pairs.push((*page, s));
                }
                m.hand_over(k, page).expect(HANDED_ONCE);
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
