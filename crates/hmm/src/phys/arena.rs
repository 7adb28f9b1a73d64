//! The frame arena: one lazily committed anonymous mapping that holds the bytes of every
//! frame of a memory region.
//!
//! This is the only module of the workspace with `unsafe` code. The arena is viewed as a
//! slice of `AtomicU64` words and never in any other way, so two threads touching one frame
//! (a CPU store racing a device read, say) are atomic accesses, not a Rust data race. The
//! protocols above (page-table locks, folio locks, migration entries) decide *which* bytes a
//! reader sees; this layer only guarantees that seeing them is defined behaviour.
//!
//! The mapping is `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`: the host commits a page of
//! it only when a frame is first written, so an arena sized for gigabytes costs nothing until
//! it is used. Under Miri the arena is a plain heap allocation.

use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

/// Number of 64-bit words in one 4 KiB frame.
pub(crate) const WORDS_PER_FRAME: usize = 512;

/// An owned, zero-initialised block of memory seen as `AtomicU64` words.
///
/// # Invariants
///
/// `ptr` points to `words` properly aligned, initialised (zero-filled) `AtomicU64`s that this
/// value owns exclusively for its whole lifetime and releases in `drop`.
pub(crate) struct Arena {
    ptr: NonNull<AtomicU64>,
    words: usize,
}

// SAFETY: the arena is only ever accessed through `&AtomicU64`, which is `Sync`; the raw
// pointer is owned and never aliased mutably.
unsafe impl Send for Arena {}
// SAFETY: see `Send`: shared access goes through atomics only.
unsafe impl Sync for Arena {}

impl Arena {
    /// Maps an arena of `frames` 4 KiB frames.
    pub(crate) fn new(frames: usize) -> std::io::Result<Arena> {
        let words = frames
            .checked_mul(WORDS_PER_FRAME)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        if words == 0 {
            return Ok(Arena {
                ptr: NonNull::dangling(),
                words: 0,
            });
        }
        let ptr = Self::map(words)?;
        // INVARIANT: `map` returned `words` zeroed, aligned words owned by us.
        Ok(Arena { ptr, words })
    }

    #[cfg(not(miri))]
    fn map(words: usize) -> std::io::Result<NonNull<AtomicU64>> {
        let len = words * 8;
        // SAFETY: an anonymous private mapping with a null hint has no preconditions; the
        // result is checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // mmap returns page-aligned, zero-filled memory, which is a valid `[AtomicU64]`.
        NonNull::new(p.cast::<AtomicU64>()).ok_or_else(std::io::Error::last_os_error)
    }

    #[cfg(miri)]
    fn map(words: usize) -> std::io::Result<NonNull<AtomicU64>> {
        let v: Box<[AtomicU64]> = (0..words).map(|_| AtomicU64::new(0)).collect();
        Ok(NonNull::new(Box::into_raw(v).cast::<AtomicU64>()).expect("box is non-null"))
    }

    /// All words of the arena.
    #[inline]
    pub(crate) fn words(&self) -> &[AtomicU64] {
        // SAFETY: by the type invariant `ptr` points to `words` initialised, aligned
        // `AtomicU64`s that live as long as `self`; shared references to atomics may alias.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.words) }
    }

    /// The words of frame `index`.
    ///
    /// # Panics
    ///
    /// Panics if `index` is outside the arena.
    #[inline]
    #[track_caller]
    pub(crate) fn frame(&self, index: usize) -> &[AtomicU64; WORDS_PER_FRAME] {
        let start = index * WORDS_PER_FRAME;
        self.words()[start..start + WORDS_PER_FRAME]
            .try_into()
            .expect("slice has frame length")
    }

    /// Asks the host to commit the whole arena now, so later first touches of frames cost no
    /// host page fault (benchmarks use this to measure the model, not the host).
    pub(crate) fn prefault(&self) {
        for f in 0..self.words / WORDS_PER_FRAME {
            // A relaxed read-modify-write of zero commits the host page without changing it.
            self.frame(f)[0].fetch_or(0, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        if self.words == 0 {
            return;
        }
        #[cfg(not(miri))]
        {
            // SAFETY: `ptr`/`words * 8` is exactly the mapping created in `new`, and no
            // reference into it outlives `self`.
            let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.words * 8) };
            debug_assert_eq!(rc, 0, "munmap of the arena failed");
        }
        #[cfg(miri)]
        {
            let slice = std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.words);
            // SAFETY: `slice` is the boxed slice leaked in `map`, released exactly once here.
            drop(unsafe { Box::from_raw(slice) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn arena_is_zeroed_and_writable() {
        let a = Arena::new(4).unwrap();
        assert!(a.words().iter().all(|w| w.load(Ordering::Relaxed) == 0));
        a.frame(3)[511].store(7, Ordering::Relaxed);
        assert_eq!(a.words()[4 * 512 - 1].load(Ordering::Relaxed), 7);
        a.prefault();
        assert_eq!(a.frame(3)[511].load(Ordering::Relaxed), 7);
    }

    #[test]
    fn empty_arena() {
        let a = Arena::new(0).unwrap();
        assert!(a.words().is_empty());
    }

    #[test]
    #[should_panic]
    fn frame_out_of_bounds_panics() {
        let a = Arena::new(1).unwrap();
        let _ = a.frame(1);
    }
}
