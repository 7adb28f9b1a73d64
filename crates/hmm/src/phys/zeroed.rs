//! Lazily committed, zero-initialised arrays: the frame arena's words and the frames'
//! metadata, so that the host's memory follows the frames a run touches and not the size
//! of the simulated machine (the kernel's `SPARSEMEM_VMEMMAP` populates `struct page`
//! memory per section for the same reason).
//!
//! A [`ZeroedArray`] is one `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE` mapping: the host
//! hands out its shared zero page for reads and commits a page only when it is first
//! written, so an array sized for terabytes of simulated RAM costs address space, not
//! memory, until used. Its elements must be valid as all-zero bytes and shared through
//! atomics only ([`ZeroValid`]). Under Miri the array is a zeroed heap allocation.

use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicU8};

/// A type whose all-zero bit pattern is a valid value and which is used through shared
/// references only (interior mutability through atomics).
///
/// # Safety
///
/// Every byte of a `Self` may be zero and the result is a valid, initialised `Self`;
/// `Self` needs no `Drop`, and it is `Sync`.
pub(crate) unsafe trait ZeroValid: Sync {}

// SAFETY: the standard library documents each of these atomic integer types as having the
// same in-memory representation as its integer type, for which zero is a valid value;
// they have no `Drop` and are `Sync`.
unsafe impl ZeroValid for AtomicU8 {}
// SAFETY: as for `AtomicU8`.
unsafe impl ZeroValid for AtomicU32 {}
// SAFETY: as for `AtomicU8`.
unsafe impl ZeroValid for AtomicI32 {}
// SAFETY: as for `AtomicU8`.
unsafe impl ZeroValid for AtomicU64 {}

/// `len` zero-initialised `T`s in a lazily committed host mapping.
///
/// # Invariants
///
/// `ptr` points to `len` properly aligned `T`s, initialised (all bytes zero, valid by
/// `T: ZeroValid`), that this value owns exclusively for its whole lifetime and releases
/// in `drop`; they are only ever reached through shared references.
pub(crate) struct ZeroedArray<T: ZeroValid> {
    ptr: NonNull<T>,
    len: usize,
    _owns: PhantomData<T>,
}

// SAFETY: the elements are only reached through `&T`, and `T: Sync`; the raw pointer is
// owned and never aliased mutably.
unsafe impl<T: ZeroValid> Send for ZeroedArray<T> {}
// SAFETY: see `Send`.
unsafe impl<T: ZeroValid> Sync for ZeroedArray<T> {}

impl<T: ZeroValid> ZeroedArray<T> {
    /// Maps `len` zeroed elements; an error if the size overflows or the host refuses.
    pub(crate) fn new(len: usize) -> std::io::Result<ZeroedArray<T>> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        if bytes == 0 {
            return Ok(ZeroedArray {
                ptr: NonNull::dangling(),
                len,
                _owns: PhantomData,
            });
        }
        let ptr = Self::map(bytes)?;
        // INVARIANT: `map` returned `bytes` zeroed bytes, page-aligned (enough for any
        // `T` of this crate), owned by us.
        Ok(ZeroedArray {
            ptr,
            len,
            _owns: PhantomData,
        })
    }

    fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    #[cfg(not(miri))]
    fn map(bytes: usize) -> std::io::Result<NonNull<T>> {
        debug_assert!(std::mem::align_of::<T>() <= 4096);
        // SAFETY: an anonymous private mapping with a null hint has no preconditions; the
        // result is checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        NonNull::new(p.cast::<T>()).ok_or_else(std::io::Error::last_os_error)
    }

    #[cfg(miri)]
    fn map(bytes: usize) -> std::io::Result<NonNull<T>> {
        let layout = Self::layout(bytes);
        // SAFETY: the layout has a non-zero size (checked by `new`).
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        NonNull::new(p.cast::<T>()).ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))
    }

    #[cfg(miri)]
    fn layout(bytes: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(bytes, std::mem::align_of::<T>())
            .expect("checked against isize::MAX in new")
    }

    /// All elements.
    #[inline]
    pub(crate) fn as_slice(&self) -> &[T] {
        // SAFETY: by the type invariant `ptr` points to `len` initialised, aligned `T`s that
        // live as long as `self` and are only shared.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Asks the host to commit the whole array now (`MADV_POPULATE_WRITE`); `false` if the
    /// host cannot (before Linux 5.14), when nothing changed.
    pub(crate) fn populate(&self) -> bool {
        #[cfg(not(miri))]
        if self.bytes() > 0 {
            // SAFETY: the range is exactly the mapping made in `new`; MADV_POPULATE_WRITE
            // only faults its pages in writable, as a write would, without writing.
            let rc = unsafe {
                libc::madvise(
                    self.ptr.as_ptr().cast(),
                    self.bytes(),
                    libc::MADV_POPULATE_WRITE,
                )
            };
            return rc == 0;
        }
        true
    }

    /// Bytes of the array the host has committed (resident, by `mincore`), in host pages
    /// of 4 KiB; asked 1 GiB at a time, so it allocates 256 KiB however large the array.
    pub(crate) fn resident_bytes(&self) -> u64 {
        const PAGE: usize = 4096;
        const STEP: usize = 1 << 30;
        let bytes = self.bytes();
        if cfg!(miri) {
            return bytes as u64;
        }
        let mut vec = vec![0u8; STEP / PAGE];
        let mut resident = 0u64;
        let mut at = 0;
        while at < bytes {
            let len = STEP.min(bytes - at);
            let start = self.ptr.as_ptr().cast::<u8>().wrapping_add(at);
            #[cfg(not(miri))]
            // SAFETY: `[start, start + len)` lies inside the mapping made in `new` and
            // starts on a host page (the mapping is page-aligned, `at` a multiple of
            // 1 GiB); `vec` holds one byte per host page of it, as mincore requires.
            let rc = unsafe { libc::mincore(start.cast(), len, vec.as_mut_ptr()) };
            #[cfg(miri)]
            let rc = {
                let _ = start;
                -1
            };
            if rc != 0 {
                return bytes as u64; // unknown: say all of it
            }
            let pages = len.div_ceil(PAGE);
            resident += vec[..pages].iter().filter(|&&b| b & 1 != 0).count() as u64;
            at += len;
        }
        resident * PAGE as u64
    }
}

impl<T: ZeroValid> std::ops::Deref for ZeroedArray<T> {
    type Target = [T];

    #[inline]
    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

// SAFETY: every field of `FrameMeta` is a standard atomic integer, each `ZeroValid`, as
// `meta::fields_are_zero_valid` checks at compile time by naming every field (a new field
// of another type fails to compile there); it has no `Drop` (a constant assertion in
// `meta`), so a `FrameMeta` of zero bytes, padding included, is valid; it is `Sync`. With
// the `shuttle` feature its fields are the model checker's types, and no such claim is
// made (the metadata is then an ordinary heap array).
#[cfg(not(feature = "shuttle"))]
unsafe impl ZeroValid for super::meta::FrameMeta {}

impl<T: ZeroValid> Drop for ZeroedArray<T> {
    fn drop(&mut self) {
        if self.bytes() == 0 {
            return;
        }
        #[cfg(not(miri))]
        {
            // SAFETY: `ptr`/`bytes` is exactly the mapping created in `new`, and no
            // reference into it outlives `self`.
            let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes()) };
            debug_assert_eq!(rc, 0, "munmap of a zeroed array failed");
        }
        #[cfg(miri)]
        {
            // SAFETY: the allocation made in `map` with this layout, released once here.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), Self::layout(self.bytes())) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    #[test]
    #[cfg_attr(miri, ignore = "64 GiB on Miri's heap")]
    fn a_huge_array_costs_the_pages_it_touches() {
        // 64 GiB of address space, two of its host pages written.
        let a = ZeroedArray::<AtomicU64>::new(8 << 30).unwrap();
        let s = a.as_slice();
        assert_eq!(s[12345].load(Relaxed), 0);
        s[0].store(1, Relaxed);
        s[(8 << 30) - 1].store(2, Relaxed);
        assert_eq!((s[0].load(Relaxed), s[(8 << 30) - 1].load(Relaxed)), (1, 2));
        assert!(a.resident_bytes() <= 64 << 10, "{}", a.resident_bytes());
        assert!(a.resident_bytes() >= 8 << 10, "{}", a.resident_bytes());
    }

    #[test]
    fn sizes_that_overflow_are_errors() {
        assert!(ZeroedArray::<AtomicU64>::new(usize::MAX / 4).is_err());
        assert!(ZeroedArray::<AtomicU64>::new(0)
            .unwrap()
            .as_slice()
            .is_empty());
    }
}
