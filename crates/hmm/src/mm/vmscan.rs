//! Reclaim: anonymous pages written to swap and read back (the kernel's `mm/vmscan.c`,
//! `mm/swap_state.c` and `do_swap_page`), `MADV_COLD` and `MADV_PAGEOUT`, and kswapd.
//!
//! # Writing a folio out (`shrink_folio_list` for one folio)
//!
//! With a reference and the folio lock held, every mapping becomes a migration entry
//! through the reverse map, each range under a CLEAR invalidation (the kernel's
//! `try_to_unmap` raises the same event), so mirrors drop the page. If a mapping stayed
//! (a pin) or anything else holds a reference, the entries are put back and the folio is
//! skipped. Otherwise the bytes go to a swap slot and each migration entry becomes a
//! swap entry naming it (one count per entry; anon-exclusivity kept as `SWP_EXCLUSIVE`,
//! soft-dirty and uffd-wp kept), and the frame is freed. A THP is split first. Every
//! page is written, dirty or not: with no swap cache there is no clean copy on the device
//! to keep (so a page a device wrote reaches the swap with the device's bytes).
//!
//! # Reading it back (`do_swap_page`)
//!
//! A fault on a swap entry takes a reference on the slot under the page-table lock,
//! reads the bytes into a new page with no lock held, and maps it if the entry is
//! unchanged: writable at once on a write fault when the page was exclusive or the slot
//! had no other user (else read-only, and the write reuses it through `do_wp_page`), never
//! writable under uffd-wp. There is no swap cache: two address spaces sharing a slot after
//! a fork each read their own copy (the kernel would map the one swap-cache page in both,
//! copy-on-write).
//!
//! # Choosing what to write (`shrink_node`)
//!
//! [`reclaim`] runs a clock over the frames of RAM: an anonymous folio whose mappings were
//! accessed since the hand last passed (an accessed bit set in any entry) has the bits
//! cleared and is passed over (`folio_referenced`, the second chance); one that was not is
//! written out. `MADV_COLD` clears the bits of a range, so its pages go first;
//! `MADV_PAGEOUT` writes a range's pages out at once. [`Kswapd`] runs the clock when an
//! allocation leaves fewer free frames than the low watermark, until the high one is
//! reached. Allocations never reclaim themselves (no direct reclaim): one that finds no
//! frame fails as before.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::addr::{Pfn, VaRange};
use crate::migrate::{folio_mapped, remove_migration_ptes, replace_migration_ptes, try_to_migrate};
use crate::pgtable::{Huge, MigrationKind, Pte, PteFlags, Slot, WalkMode};
use crate::phys::{Frame, FrameFlags, FrameRef, PhysMem, Zone};

use super::error::MmError;
use super::tlb::TlbGather;
use super::vma::Vma;
use super::{thp, Mm, MmState};

/// What a reclaim pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct ReclaimStats {
    /// Frames the clock looked at.
    pub scanned: u64,
    /// Folios passed over because their mappings were accessed (then aged).
    pub referenced: u64,
    /// Pages written to swap and freed.
    pub reclaimed: u64,
}

/// Writes the anonymous page `nr` to swap, if nothing holds it beyond its mappings (see
/// the module docs); returns the pages freed. A page of a large folio splits the folio
/// first, and with `whole` every page of it goes, as `shrink_folio_list` puts the split
/// pages on its list; without, only page `nr` (what `MADV_PAGEOUT` asked for). `held` is
/// the address space whose mmap lock the caller holds, if any.
pub(crate) fn pageout_folio(
    phys: &PhysMem,
    held: Option<(&Mm, &MmState)>,
    nr: u64,
    whole: bool,
) -> u64 {
    if phys.swap().is_none() {
        return 0;
    }
    let page = phys.frame_nr(nr);
    if !matches!(page.zone(), Zone::System) {
        return 0;
    }
    let folio = page.folio();
    let flags = folio.meta().flags();
    if !flags.contains(FrameFlags::ANON) || flags.contains(FrameFlags::HUGETLB) {
        return 0;
    }
    let Ok(held_ref) = folio.try_get() else {
        return 0;
    };
    pageout_held(phys, held, nr, held_ref, whole)
}

/// [`pageout_folio`] with the reference on the page's folio already taken (by a walk
/// under the page-table lock, as the kernel isolates a folio before it reclaims it).
fn pageout_held(
    phys: &PhysMem,
    held: Option<(&Mm, &MmState)>,
    nr: u64,
    held_ref: Frame<'_>,
    whole: bool,
) -> u64 {
    let Some(swap) = phys.swap() else { return 0 };
    let page = phys.frame_nr(nr);
    let folio = held_ref.folio();
    if folio.meta().order() > 0 {
        // Split first (no THP swap): the split takes the reference, and each page goes on
        // as a folio of its own (split_folio_to_list).
        let (head, pages) = (folio.nr(), 1u64 << folio.meta().order());
        if !thp::split_folio_held(phys, held, held_ref, 0) {
            return 0;
        }
        return if whole {
            (head..head + pages)
                .map(|p| pageout_folio(phys, held, p, false))
                .sum()
        } else {
            pageout_folio(phys, held, nr, false)
        };
    }
    let fm = page.meta();
    if folio.nr() != page.nr() || !fm.trylock() {
        return 0;
    }
    let skip = |restore: bool| {
        if restore {
            remove_migration_ptes(held, page, page);
        }
        fm.unlock();
        0
    };
    // Stable under the folio lock: still an anonymous, unpinned, mapped page.
    if !fm.flags().contains(FrameFlags::ANON) || fm.order() > 0 || fm.pincount() > 0 {
        return skip(false);
    }
    if !folio_mapped(phys, page) {
        return skip(false);
    }
    try_to_migrate(held, page);
    if folio_mapped(phys, page) || fm.refcount() > 1 {
        return skip(true);
    }
    let Some(slot) = swap.alloc(|bytes| page.read(0, bytes)) else {
        return skip(true);
    };
    // The walk's own count on the slot, as the swap cache holds one in Linux: the walk
    // installs the entries one address space at a time, and a swap-in of an entry it
    // installed must not free the slot before the walk is through with it.
    swap.dup(slot);
    replace_migration_ptes(held, page, |_, _, entry, level, _| {
        let Pte::Migration { kind, flags, .. } = entry else {
            unreachable!("only migration entries are replaced")
        };
        debug_assert_eq!(level, Huge::Pte, "a small folio has no PMD entry");
        swap.dup(slot);
        Pte::Swap {
            slot,
            exclusive: kind != MigrationKind::Read,
            flags: flags & PteFlags::STICKY,
        }
    });
    // The walk's count goes; with no entry installed (the mappings went meanwhile: an
    // unmap waited on the folio lock) that frees the slot.
    swap.free(slot);
    fm.unlock();
    // The last reference: the frame is free.
    drop(held_ref);
    1
}

/// Clears the accessed bits of every mapping of the folio `head` heads and returns how
/// many were set (`folio_referenced` with `ptep_clear_flush_young`: no invalidation, as
/// the kernel's young-clearing is a notifier's `clear_flush_young`, not a range event).
pub(crate) fn folio_referenced(head: FrameRef<'_>, held: Option<(&Mm, &MmState)>) -> u32 {
    let folio = head.nr()..head.nr() + (1u64 << head.meta().order());
    let mut referenced = 0;
    crate::mm::rmap_walk(head, held, |_, st, _, range| {
        referenced += clear_young(st, range, |pfn| folio.contains(&pfn.as_u64()));
    });
    referenced
}

/// Clears the accessed bit of every present entry (PTE or PMD leaf) in `range` mapping a
/// frame `pick` accepts; returns how many had it (`ptep_test_and_clear_young`).
fn clear_young(st: &MmState, range: VaRange, pick: impl Fn(Pfn) -> bool) -> u32 {
    let mut young = 0;
    let mut c = st.pt.cursor(range, WalkMode::Lookup);
    while let Some(slot) = c.next() {
        let aged = |e: Pte| match e {
            Pte::Present { pfn, flags } if flags.contains(PteFlags::YOUNG) && pick(pfn) => {
                Some(Pte::Present {
                    pfn,
                    flags: flags - PteFlags::YOUNG,
                })
            }
            _ => None,
        };
        let new = match &slot {
            Slot::Pte(p) => aged(p.get()).inspect(|&n| p.set(n)),
            Slot::Pmd(p) | Slot::Pud(p) => aged(p.get()).inspect(|&n| p.set(n)),
            Slot::Hole(_) => None,
        };
        young += u32::from(new.is_some());
    }
    young
}

/// Reclaims up to `nr_to_reclaim` pages of anonymous memory to swap by the clock over RAM
/// (`shrink_node`; see the module docs). Looks at every frame at most twice, and at
/// nothing without a swap device. Takes each address space's mmap lock for reading in
/// turn; the caller holds none.
#[doc(alias = "shrink_node")]
#[doc(alias = "try_to_free_pages")]
pub fn reclaim(phys: &PhysMem, nr_to_reclaim: u64) -> ReclaimStats {
    let mut out = ReclaimStats::default();
    if phys.swap().is_none() || nr_to_reclaim == 0 {
        return out;
    }
    let frames = phys.nr_frames();
    let hand = phys.reclaim_hand();
    for _ in 0..2 * frames {
        let nr = hand.fetch_add(1, Ordering::Relaxed) % frames;
        out.scanned += 1;
        let page = phys.frame_nr(nr);
        let flags = page.meta().flags();
        if !flags.contains(FrameFlags::ANON)
            || flags.intersects(FrameFlags::TAIL | FrameFlags::HUGETLB)
            || page.meta().refcount() == 0
        {
            continue;
        }
        let Ok(held) = page.try_get() else { continue };
        let young = folio_referenced(page, None);
        drop(held);
        if young > 0 {
            out.referenced += 1;
            continue;
        }
        out.reclaimed += pageout_folio(phys, None, nr, true);
        if out.reclaimed >= nr_to_reclaim {
            break;
        }
    }
    out
}

impl Mm {
    /// `MADV_COLD`: the accessed bits of the range's anonymous pages are cleared, so
    /// reclaim takes them first (`madvise_cold`). Device-private and other non-present
    /// entries, PMD ones included, are left alone.
    pub(super) fn madvise_cold(&self, st: &MmState, range: VaRange) {
        let phys = self.phys();
        clear_young(st, range, |pfn| {
            !phys.is_zero_pfn(pfn) && !phys.is_huge_zero_pfn(pfn)
        });
    }

    /// `MADV_PAGEOUT`: writes the range's anonymous pages that only this address space
    /// maps to swap (`madvise_pageout`); a THP the range covers in part is split at the
    /// range's edge first. Pages mapped elsewhere too, pinned, locked or not anonymous
    /// stay; device-private and other non-present entries are left alone. Returns the
    /// pages written.
    pub(super) fn madvise_pageout(&self, st: &MmState, range: VaRange) -> u64 {
        {
            // A present PMD leaf the range covers in part is split (split_huge_pmd): the
            // leaves holding its first and its last page.
            let mut tlb = TlbGather::new(self);
            let last = range.end() - crate::addr::PAGE_SIZE;
            for at in [range.start(), last] {
                let partial = {
                    let mut c = st.pt.cursor(VaRange::page_of(at), WalkMode::Lookup);
                    match c.current() {
                        Some(Slot::Pmd(p))
                            if !range.contains_range(&p.range())
                                && matches!(p.get(), Pte::Present { .. }) =>
                        {
                            Some(p.range())
                        }
                        _ => None,
                    }
                };
                if let Some(leaf) = partial {
                    let info = st.vmas.find(at).map(Vma::info);
                    thp::split_pmd(self, &st.pt, info, leaf.start(), &mut tlb);
                }
            }
            tlb.finish();
        }
        let phys = self.phys();
        // The pages to write, each with a reference on its folio taken under the
        // page-table lock (isolate_lru_folio): a frame freed and reused after the walk is
        // never written out for another process. A large folio is held once, with its
        // pages in the range.
        let mut small: Vec<(u64, Frame<'_>)> = Vec::new();
        let mut large: Vec<(Frame<'_>, Vec<u64>)> = Vec::new();
        let mut c = st.pt.cursor(range, WalkMode::Lookup);
        while let Some(slot) = c.next() {
            let (entry, n) = match &slot {
                Slot::Hole(_) => continue,
                Slot::Pte(p) => (p.get(), 1),
                // Inside the range whole: the edges were split above.
                Slot::Pmd(p) => (p.get(), crate::addr::PMD_NR),
                Slot::Pud(_) => unreachable!("pageout refuses hugetlb memory"),
            };
            let Pte::Present { pfn, .. } = entry else {
                continue;
            };
            if phys.is_zero_pfn(pfn) || phys.is_huge_zero_pfn(pfn) {
                continue;
            }
            let folio = phys.frame(pfn).folio();
            let fm = folio.meta();
            // folio_likely_mapped_shared: leave pages other address spaces map too.
            let shared = phys.frame(pfn).meta().mapcount() + fm.entire_mapcount() > 1;
            if !fm.flags().contains(FrameFlags::ANON) || shared {
                continue;
            }
            let pages = pfn.as_u64()..pfn.as_u64() + n;
            if fm.order() == 0 {
                if let Ok(r) = folio.try_get() {
                    small.push((pfn.as_u64(), r));
                }
            } else if let Some((_, list)) = large.last_mut().filter(|(h, _)| h.nr() == folio.nr()) {
                list.extend(pages);
            } else if let Ok(r) = folio.try_get() {
                large.push((r, pages.collect()));
            }
        }
        drop(c);
        let held = Some((self, st));
        let mut out: u64 = small
            .into_iter()
            .map(|(nr, r)| pageout_held(phys, held, nr, r, false))
            .sum();
        for (head, pages) in large {
            if thp::split_folio_held(phys, held, head, 0) {
                out += pages
                    .into_iter()
                    .map(|p| pageout_folio(phys, held, p, false))
                    .sum::<u64>();
            }
        }
        out
    }

    /// A CPU fault on a swap entry (`do_swap_page`; see the module docs). `orig` is the
    /// entry, `c` the cursor holding its page-table lock.
    pub(super) fn do_swap_page(
        &self,
        vma: &Vma,
        addr: crate::addr::VirtAddr,
        write: bool,
        c: &mut crate::pgtable::Cursor<'_>,
        orig: Pte,
    ) -> Result<(), super::FaultError> {
        let Pte::Swap {
            slot,
            exclusive,
            flags,
        } = orig
        else {
            unreachable!("a swap entry")
        };
        let phys = self.phys();
        let swap = phys
            .swap()
            .expect("swap entries exist only with a swap device");
        // The reader's reference keeps the slot's bytes while no lock is held.
        let sole = swap.count(slot) == 1;
        swap.dup(slot);
        c.unlock();
        let exclusive = exclusive || sole;
        let mut fflags = FrameFlags::ANON | FrameFlags::UPTODATE;
        if exclusive {
            fflags |= FrameFlags::ANON_EXCLUSIVE;
        }
        let frame = match phys.alloc(0, fflags) {
            Ok(f) => f,
            Err(_) => {
                swap.free(slot);
                return Err(super::FaultError::Oom { addr });
            }
        };
        self.counters.frame_allocated();
        swap.read(slot, |bytes| frame.write(0, bytes));
        self.new_anon_rmap(&frame, vma, addr);
        let Some(Slot::Pte(p)) = c.current() else {
            unreachable!("a swap entry is a PTE")
        };
        if p.get() != orig {
            c.unlock();
            self.release_frame(frame);
            swap.free(slot);
            return Ok(());
        }
        let uffd_wp = flags.contains(PteFlags::UFFD_WP);
        let mut nf = PteFlags::YOUNG | (flags & PteFlags::STICKY);
        if !vma.is_accessible() {
            nf |= PteFlags::PROTNONE;
        } else if write
            && exclusive
            && !uffd_wp
            && vma.flags().contains(crate::prot::VmFlags::WRITE)
        {
            nf |= PteFlags::WRITE | super::thp::dirty_flags();
        }
        frame.meta().inc_mapcount();
        p.set(Pte::Present {
            pfn: frame.into_raw(),
            flags: nf,
        });
        c.unlock();
        // The reader's reference and the entry's.
        swap.free(slot);
        swap.free(slot);
        self.counters.fault(crate::stats::FaultKind::SwapIn);
        Ok(())
    }
}

/// Reads the swapped-out page at `va` of `vma` back (`do_swap_page` without the access
/// check of a fault, as `__collapse_huge_page_swapin` calls it); with the mmap lock held.
/// Anything else at `va` is left alone.
pub(super) fn swapin(
    mm: &Mm,
    st: &MmState,
    vma: &Vma,
    va: crate::addr::VirtAddr,
) -> Result<(), super::FaultError> {
    let mut c = st.pt.cursor(VaRange::page_of(va), WalkMode::Lookup);
    let entry = match c.current() {
        Some(Slot::Pte(p)) => p.get(),
        _ => return Ok(()),
    };
    if !matches!(entry, Pte::Swap { .. }) {
        return Ok(());
    }
    mm.do_swap_page(vma, va, false, &mut c, entry)
}

/// The kernel's kswapd: a thread that reclaims when an allocation leaves fewer free frames
/// than the low watermark, until the high one is reached ([`PhysMem::watermarks`]).
/// Dropping the handle stops and joins it.
#[doc(alias = "kswapd")]
pub struct Kswapd {
    stop: Arc<AtomicBool>,
    phys: Arc<PhysMem>,
    thread: Option<std::thread::JoinHandle<ReclaimStats>>,
}

impl Kswapd {
    /// Starts kswapd on `phys`.
    pub fn start(phys: Arc<PhysMem>) -> Kswapd {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, phys) = (stop.clone(), phys.clone());
            std::thread::Builder::new()
                .name("kswapd".into())
                .spawn(move || kswapd(&phys, &stop))
                .expect("spawning kswapd")
        };
        Kswapd {
            stop,
            phys,
            thread: Some(thread),
        }
    }

    /// Stops it; returns what it reclaimed in all.
    pub fn stop(mut self) -> ReclaimStats {
        self.join()
    }

    fn join(&mut self) -> ReclaimStats {
        self.stop.store(true, Ordering::Release);
        self.phys.watermarks().wake();
        self.thread
            .take()
            .map(|t| t.join().expect("kswapd panicked"))
            .unwrap_or_default()
    }
}

impl Drop for Kswapd {
    fn drop(&mut self) {
        self.join();
    }
}

impl std::fmt::Debug for Kswapd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kswapd").finish_non_exhaustive()
    }
}

fn kswapd(phys: &PhysMem, stop: &AtomicBool) -> ReclaimStats {
    let mut total = ReclaimStats::default();
    while !stop.load(Ordering::Acquire) {
        let w = phys.watermarks();
        if !w.wait(Duration::from_millis(100)) && phys.nr_free() >= w.low() {
            continue;
        }
        // balance_pgdat: in batches of 32 (SWAP_CLUSTER_MAX) up to the high mark.
        while !stop.load(Ordering::Acquire) && phys.nr_free() < w.high() {
            let r = reclaim(phys, 32);
            total.scanned += r.scanned;
            total.referenced += r.referenced;
            total.reclaimed += r.reclaimed;
            if r.reclaimed == 0 {
                break;
            }
        }
    }
    total
}

/// `MADV_PAGEOUT` and `MADV_COLD` refuse hugetlb memory (`can_madv_lru_vma`).
pub(super) fn check_lru_range(st: &MmState, range: VaRange) -> Result<(), MmError> {
    if st.vmas.overlapping(range).any(super::hugetlb::is_hugetlb) {
        return Err(MmError::Inval {
            what: "MADV_COLD and MADV_PAGEOUT do not apply to hugetlb memory",
        });
    }
    Ok(())
}
