//! Frame handles: [`FrameRef`] borrows a frame without holding a reference, [`Frame`] owns
//! exactly one reference and drops it on `Drop`.
//!
//! A page-table entry that maps a frame owns one reference too, but as a bare [`Pfn`] inside
//! the entry: [`Frame::into_raw`] moves a handle's reference into an entry and
//! [`Frame::from_raw`] takes it back out (when the entry is cleared). Reference operations
//! act on the folio head, as the kernel's `folio_get`/`folio_put` do.

use std::fmt;

use super::io;
use super::meta::{FrameMeta, GetFrameError};
use super::{PhysMem, Zone};
use crate::addr::Pfn;

/// A borrowed view of one frame; holds no reference.
#[derive(Clone, Copy)]
pub struct FrameRef<'a> {
    phys: &'a PhysMem,
    pfn: Pfn,
}

impl<'a> FrameRef<'a> {
    pub(super) fn new(phys: &'a PhysMem, pfn: Pfn) -> Self {
        FrameRef { phys, pfn }
    }

    /// The frame number.
    pub fn pfn(&self) -> Pfn {
        self.pfn
    }

    /// The frame's zone.
    pub fn zone(&self) -> Zone {
        Zone::System
    }

    /// This page's own metadata.
    pub fn meta(&self) -> &'a FrameMeta {
        self.phys.region().meta(self.pfn.as_usize())
    }

    /// The head page of the folio this page belongs to.
    #[doc(alias = "page_folio")]
    pub fn folio(&self) -> FrameRef<'a> {
        FrameRef::new(
            self.phys,
            Pfn::new(self.phys.region().head_of(self.pfn.as_usize()) as u64),
        )
    }

    /// Takes a reference on the folio, which must be in use.
    #[doc(alias = "folio_get")]
    pub fn get(&self) -> Frame<'a> {
        self.folio().meta().get();
        Frame { r: *self }
    }

    /// Takes a reference unless the folio is free.
    #[doc(alias = "folio_try_get")]
    pub fn try_get(&self) -> Result<Frame<'a>, GetFrameError> {
        self.folio().meta().try_get()?;
        Ok(Frame { r: *self })
    }

    /// Drops a reference the caller owns without a handle (one moved out of an entry).
    /// Returns [`Freed::Yes`] when it was the last reference and the folio went back to
    /// the allocator.
    #[doc(alias = "folio_put")]
    #[track_caller]
    pub fn put(self) -> Freed {
        if self.phys.region().put(self.pfn.as_usize()) {
            Freed::Yes
        } else {
            Freed::No
        }
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
        self.phys.region().words(self.pfn.as_usize())
    }
}

impl fmt::Debug for FrameRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.meta();
        f.debug_struct("Frame")
            .field("pfn", &self.pfn)
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
    pub(super) fn adopt(phys: &'a PhysMem, pfn: Pfn) -> Self {
        Frame {
            r: FrameRef::new(phys, pfn),
        }
    }

    /// Moves the reference out of the handle, to be owned by a page-table entry or another
    /// structure that stores the bare pfn.
    pub fn into_raw(self) -> Pfn {
        let pfn = self.r.pfn;
        std::mem::forget(self);
        pfn
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
}

impl<'a> std::ops::Deref for Frame<'a> {
    type Target = FrameRef<'a>;

    fn deref(&self) -> &FrameRef<'a> {
        &self.r
    }
}

impl Drop for Frame<'_> {
    fn drop(&mut self) {
        let _ = self.r.put();
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
