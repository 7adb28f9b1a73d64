//! Frame handles: [`FrameRef`] borrows a frame without holding a reference, [`Frame`] owns
//! exactly one reference and drops it on `Drop`.
//!
//! A page-table entry that maps a frame owns one reference too, but as a bare [`Pfn`] inside
//! the entry: [`Frame::into_raw`] moves a handle's reference into an entry and
//! [`Frame::from_raw`] takes it back out (when the entry is cleared). Reference operations
//! act on the folio head, as the kernel's `folio_get`/`folio_put` do.

use std::fmt;

use super::meta::{FrameFlags, FrameMeta, GetFrameError};
use super::region::Region;
use super::{arena, io};
use super::{PhysMem, Zone};
use crate::addr::{DevicePfn, Pfn};

/// A borrowed view of one frame; holds no reference.
///
/// The frame may be system RAM or device memory: it names its region and its number in
/// the machine's one frame-number space, which CPU-addressable frames ([`Pfn`]) and
/// device-private frames ([`DevicePfn`]) share, as in the kernel.
#[derive(Clone, Copy)]
pub struct FrameRef<'a> {
    region: &'a Region,
    nr: u64,
}

impl<'a> FrameRef<'a> {
    pub(crate) fn new(region: &'a Region, nr: u64) -> Self {
        debug_assert!(nr >= region.base() && nr - region.base() < region.nr_frames() as u64);
        FrameRef { region, nr }
    }

    #[inline]
    fn index(&self) -> usize {
        (self.nr - self.region.base()) as usize
    }

    /// The frame number of a CPU-addressable frame (system RAM or device-coherent).
    ///
    /// # Panics
    ///
    /// Panics on a device-private frame, which has a [`DevicePfn`] instead.
    #[track_caller]
    pub fn pfn(&self) -> Pfn {
        assert!(
            !matches!(self.zone(), Zone::DevicePrivate { .. }),
            "a device-private frame has no CPU pfn"
        );
        Pfn::new(self.nr)
    }

    /// The frame number of a device-private frame.
    ///
    /// # Panics
    ///
    /// Panics on a CPU-addressable frame.
    #[track_caller]
    pub fn device_pfn(&self) -> DevicePfn {
        assert!(
            matches!(self.zone(), Zone::DevicePrivate { .. }),
            "only device-private frames have a device pfn"
        );
        DevicePfn::new(self.nr)
    }

    /// The frame number, whatever the zone.
    pub(crate) fn nr(&self) -> u64 {
        self.nr
    }

    /// The frame's zone.
    #[doc(alias = "page_zonenum")]
    pub fn zone(&self) -> Zone {
        self.region.zone()
    }

    /// This page's own metadata.
    pub fn meta(&self) -> &'a FrameMeta {
        self.region.meta(self.index())
    }

    /// Whether this page is anon-exclusive (`PageAnonExclusive`): the one mapping it has
    /// is the only one that may have it, so a write may reuse it and a pin may hold it.
    /// The bit is per page, as the kernel's: for a PTE mapping it is the mapped page's,
    /// for a PMD mapping the head's (the whole 2 MiB); splitting a PMD hands the head's
    /// bit to every page.
    #[doc(alias = "PageAnonExclusive")]
    pub(crate) fn anon_exclusive(&self) -> bool {
        self.meta().flags().contains(FrameFlags::ANON_EXCLUSIVE)
    }

    /// Marks this page anon-exclusive (`SetPageAnonExclusive`).
    pub(crate) fn set_anon_exclusive(&self) {
        self.meta().set_flags(FrameFlags::ANON_EXCLUSIVE);
    }

    /// Clears this page's anon-exclusive bit (`ClearPageAnonExclusive`).
    pub(crate) fn clear_anon_exclusive(&self) {
        self.meta().clear_flags(FrameFlags::ANON_EXCLUSIVE);
    }

    /// The head page of the folio this page belongs to.
    #[doc(alias = "page_folio")]
    pub fn folio(&self) -> FrameRef<'a> {
        FrameRef::new(
            self.region,
            self.region.base() + self.region.head_of(self.index()) as u64,
        )
    }

    /// Page `k` of the folio this frame heads (`folio_page`): how a driver reaches the
    /// 512 pages of a THP or device THP to copy them.
    ///
    /// # Panics
    ///
    /// Panics if this frame is not a folio head or the folio has no page `k`.
    #[track_caller]
    pub fn folio_page(&self, k: u64) -> FrameRef<'a> {
        assert_eq!(self.folio().nr, self.nr, "not a folio head");
        assert!(
            k < 1u64 << self.meta().order(),
            "page {k} outside an order-{} folio",
            self.meta().order()
        );
        FrameRef::new(self.region, self.nr + k)
    }

    /// Takes a reference on the folio, which must be in use.
    #[doc(alias = "folio_get")]
    pub fn get(&self) -> Frame<'a> {
        self.folio().meta().get();
        Frame { r: *self }
    }

    /// Takes a reference unless the folio is free.
    ///
    /// The folio is looked up again once the reference is held: a split between the
    /// lookup and the reference may have moved this page into a new folio, and the
    /// reference must be on the folio the page belongs to (`folio_try_get`, then the
    /// kernel's `page_folio(page) != folio` check and retry). Held, it keeps the folio
    /// whole (a split freezes the count first).
    #[doc(alias = "folio_try_get")]
    pub fn try_get(&self) -> Result<Frame<'a>, GetFrameError> {
        loop {
            let folio = self.folio();
            folio.meta().try_get()?;
            if self.folio().nr == folio.nr {
                return Ok(Frame { r: *self });
            }
            let _ = folio.put();
        }
    }

    /// Drops a reference the caller owns without a handle (one moved out of an entry).
    /// Returns [`Freed::Yes`] when it was the last reference and the folio went back to
    /// its allocator (for device memory, after the pagemap's `folio_free`).
    #[doc(alias = "folio_put")]
    #[track_caller]
    pub fn put(self) -> Freed {
        if self.region.put(self.index()) {
            Freed::Yes
        } else {
            Freed::No
        }
    }

    /// Splits this frozen, locked, unmapped large folio head (order 1 to 9) into locked
    /// folios of `new_order`: each new head gets one reference, this one `head_refs` (see
    /// `Region::split_frozen`).
    pub(crate) fn split_frozen(&self, head_refs: u32, new_order: u32) {
        self.region.split_frozen(self.index(), head_refs, new_order);
    }

    /// Reads `buf.len()` bytes at byte `offset` of the frame.
    ///
    /// # Panics
    ///
    /// Panics if the access leaves the 4 KiB frame.
    #[track_caller]
    pub fn read(&self, offset: usize, buf: &mut [u8]) {
        io::read(self.words(), offset, buf);
    }

    /// Writes `data` at byte `offset` of the frame.
    ///
    /// # Panics
    ///
    /// Panics if the access leaves the 4 KiB frame.
    #[track_caller]
    pub fn write(&self, offset: usize, data: &[u8]) {
        io::write(self.words(), offset, data);
    }

    /// Copies the whole contents of `src` into this frame.
    #[doc(alias = "copy_highpage")]
    pub fn copy_from(&self, src: &FrameRef<'_>) {
        io::copy(src.words(), self.words());
    }

    /// Copies the folio `src` heads into the folio this frame heads (`folio_copy`): see
    /// [`copy_folios`], which copies many pairs at once.
    ///
    /// # Panics
    ///
    /// Panics if either frame is not a folio head or their orders differ.
    #[doc(alias = "folio_copy")]
    #[track_caller]
    pub fn copy_folio_from(&self, src: &FrameRef<'_>) {
        copy_folios(&[(*self, *src)]);
    }

    /// Marks the folio dirty (`folio_mark_dirty`, `set_page_dirty`): its bytes are newer
    /// than anything that backs them, so reclaim must keep them (a lazy-free page written
    /// this way is no longer discarded). A driver calls it for every page its device
    /// writes, which no CPU page-table entry records.
    #[doc(alias = "folio_mark_dirty")]
    #[doc(alias = "set_page_dirty")]
    pub fn mark_dirty(&self) {
        self.folio().meta().set_flags(super::FrameFlags::DIRTY);
    }

    /// Zero-fills the frame.
    #[doc(alias = "clear_highpage")]
    pub fn zero(&self) {
        io::zero(self.words());
    }

    /// Whether every byte of the frame is zero.
    pub fn is_zero(&self) -> bool {
        io::is_zero(self.words())
    }

    fn words(&self) -> &'a io::FrameWords {
        self.region.words(self.index())
    }
}

/// Drops one reference on the folio of each of `frames` (`release_pages`, whose small
/// folios go back through `free_unref_folios`): the folios freed by it are returned to
/// their allocators a run of frames of one region at a time, under one lock of the
/// per-CPU list per run instead of one per folio. Returns how many folios were freed.
#[doc(alias = "release_pages")]
#[doc(alias = "free_unref_folios")]
#[track_caller]
pub fn put_folios(frames: &[FrameRef<'_>]) -> u64 {
    let mut freed = 0;
    let mut rest = frames;
    while let Some(first) = rest.first() {
        let run = rest
            .iter()
            .take_while(|f| std::ptr::eq(f.region, first.region))
            .count();
        freed += first.region.put_many(rest[..run].iter().map(|f| f.index()));
        rest = &rest[run..];
    }
    freed
}

/// Copies every `(dst, src)` pair of folios as a device's copy engine would (the copy of a
/// migration, `folio_copy` of each): streaming stores that leave the destinations out of
/// the CPU caches, four pages at a time across the pairs, all of them visible before the
/// call returns. Batching a migration's pages into one call lets pages that are not
/// contiguous be copied four at a time too. This suits a destination nobody reads soon (a
/// page moving to a device, or back); a page its faulting CPU is about to write (a COW
/// copy) wants [`FrameRef::copy_from`], which leaves it in the cache.
///
/// # Panics
///
/// Panics if a frame is not a folio head or the orders of a pair differ; nothing is copied
/// then.
#[doc(alias = "folio_copy")]
#[track_caller]
pub fn copy_folios(pairs: &[(FrameRef<'_>, FrameRef<'_>)]) {
    for (dst, src) in pairs {
        assert_eq!(dst.folio().nr, dst.nr, "destination is not a folio head");
        assert_eq!(src.folio().nr, src.nr, "source is not a folio head");
        assert_eq!(
            dst.meta().order(),
            src.meta().order(),
            "folios of different orders"
        );
    }
    arena::stream_frames(pairs.iter().flat_map(|(dst, src)| {
        (0..1u64 << dst.meta().order()).map(move |k| {
            let (s, d) = (src.region, dst.region);
            (
                s.words(src.index() + k as usize),
                d.words(dst.index() + k as usize),
            )
        })
    }));
}

impl fmt::Debug for FrameRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.meta();
        f.debug_struct("Frame")
            .field("nr", &self.nr)
            .field("zone", &self.zone())
            .field("refcount", &self.folio().meta().refcount())
            .field("mapcount", &m.mapcount())
            .field("flags", &m.flags())
            .finish()
    }
}

/// One owned reference to a frame's folio, dropped with the handle.
#[must_use = "dropping a Frame drops its reference (and may free the frame)"]
pub struct Frame<'a> {
    r: FrameRef<'a>,
}

impl<'a> Frame<'a> {
    /// Wraps a reference the caller owns (a fresh allocation).
    pub(crate) fn adopt(region: &'a Region, nr: u64) -> Self {
        Frame {
            r: FrameRef::new(region, nr),
        }
    }

    /// Moves the reference out of the handle, to be owned by a page-table entry or another
    /// structure that stores the bare pfn.
    ///
    /// # Panics
    ///
    /// Panics on a device-private frame (see [`into_raw_device`](Self::into_raw_device)).
    #[track_caller]
    pub fn into_raw(self) -> Pfn {
        let pfn = self.r.pfn();
        std::mem::forget(self);
        pfn
    }

    /// [`into_raw`](Self::into_raw) for a device-private frame, which a device-private entry
    /// stores.
    ///
    /// # Panics
    ///
    /// Panics on a CPU-addressable frame.
    #[track_caller]
    pub fn into_raw_device(self) -> DevicePfn {
        let pfn = self.r.device_pfn();
        std::mem::forget(self);
        pfn
    }

    /// Drops the reference now (`folio_put`), saying whether it was the last; any zone.
    pub fn release(self) -> Freed {
        let r = self.r;
        std::mem::forget(self);
        r.put()
    }

    /// Takes back a reference previously moved out with [`into_raw`](Self::into_raw).
    ///
    /// This is not `unsafe`: frame contents are atomics, so a wrong call cannot cause
    /// undefined behaviour, only a wrong refcount, which the allocator's checks and the
    /// audit in `Mm::audit` catch.
    ///
    /// # Panics
    ///
    /// Panics if `pfn` is not a frame of `phys`.
    #[track_caller]
    pub fn from_raw(phys: &'a PhysMem, pfn: Pfn) -> Self {
        Frame { r: phys.frame(pfn) }
    }

    /// [`from_raw`](Self::from_raw) for a device-private frame.
    ///
    /// # Panics
    ///
    /// Panics if `pfn` is not a device-private frame of a live pagemap of `phys`.
    #[track_caller]
    pub fn from_raw_device(phys: &'a PhysMem, pfn: DevicePfn) -> Self {
        Frame {
            r: phys.device_frame(pfn),
        }
    }
}

impl<'a> std::ops::Deref for Frame<'a> {
    type Target = FrameRef<'a>;

    fn deref(&self) -> &FrameRef<'a> {
        &self.r
    }
}

impl Drop for Frame<'_> {
    fn drop(&mut self) {
        let r = self.r;
        crate::sync::drop_work(|| {
            let _ = r.put();
        });
    }
}

/// One owned reference to a folio whose folio lock this handle holds (`folio_lock`): what
/// a migration takes as a destination, so an unlocked page cannot be handed over.
///
/// Dropping it unlocks the folio, then drops the reference.
#[doc(alias = "folio_lock")]
#[must_use = "dropping a LockedFolio unlocks it and drops its reference"]
pub struct LockedFolio<'a> {
    r: FrameRef<'a>,
}

impl<'a> Frame<'a> {
    /// Takes the folio lock, sleeping while someone else holds it (`folio_lock`).
    #[doc(alias = "folio_lock")]
    pub fn lock(self) -> LockedFolio<'a> {
        self.r.folio().meta().lock();
        let r = self.r;
        std::mem::forget(self);
        LockedFolio { r }
    }

    /// Takes the folio lock if it is free (`folio_trylock`); gives the handle back if not.
    #[doc(alias = "folio_trylock")]
    pub fn try_lock(self) -> Result<LockedFolio<'a>, Frame<'a>> {
        if !self.r.folio().meta().trylock() {
            return Err(self);
        }
        let r = self.r;
        std::mem::forget(self);
        Ok(LockedFolio { r })
    }
}

impl<'a> LockedFolio<'a> {
    /// Releases the folio lock (`folio_unlock`) and keeps the reference.
    #[doc(alias = "folio_unlock")]
    pub fn unlock(self) -> Frame<'a> {
        let r = self.r;
        std::mem::forget(self);
        r.folio().meta().unlock();
        Frame { r }
    }

    /// Moves the lock and the reference out of the handle, to be owned by a migration's
    /// `dst` word (released by its finalize).
    pub(crate) fn into_raw_nr(self) -> u64 {
        let nr = self.r.nr();
        std::mem::forget(self);
        nr
    }
}

impl<'a> std::ops::Deref for LockedFolio<'a> {
    type Target = FrameRef<'a>;

    fn deref(&self) -> &FrameRef<'a> {
        &self.r
    }
}

impl Drop for LockedFolio<'_> {
    fn drop(&mut self) {
        let r = self.r;
        crate::sync::drop_work(|| {
            r.folio().meta().unlock();
            let _ = r.put();
        });
    }
}

impl fmt::Debug for LockedFolio<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("LockedFolio").field(&self.r).finish()
    }
}

/// Whether dropping a reference freed the folio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freed {
    /// It was the last reference: the folio is free.
    Yes,
    /// Other references remain.
    No,
}

impl fmt::Debug for Frame<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.r.fmt(f)
    }
}
