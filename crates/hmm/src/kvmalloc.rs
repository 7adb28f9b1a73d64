//! Bounded per-page arrays: the one rule for memory a caller's range sizes.
//!
//! An entry point that needs an array with one element per page of a range the caller
//! chose (a migration's `src`/`dst` words, `get_user_pages`' page list, pagemap entries,
//! a driver's bounce buffer) allocates it here, never with `vec![…; n]` directly. The bound
//! is the kernel's own: `kvmalloc` refuses any size above `INT_MAX` bytes
//! ([`KVMALLOC_MAX`]), so a driver's `kvcalloc(npages, …)` for a huge range fails with
//! `-ENOMEM` before it allocates. Below the bound the host is asked with
//! [`Vec::try_reserve_exact`], so a host that cannot give the memory is an error too, not
//! an abort. Either way the caller gets [`TooLarge`] and maps it to its own `NoMem`.
//!
//! Walks that need no array (the device table of a mirror, a snapshot copied out in
//! chunks, pagemap read in PMD-sized pieces) do not come here: they are bounded by what is
//! populated, or by a fixed chunk.

use thiserror::Error;

/// The largest allocation `kvmalloc` accepts: `INT_MAX` bytes.
#[doc(alias = "INT_MAX")]
pub const KVMALLOC_MAX: usize = i32::MAX as usize;

/// An array that would be larger than [`KVMALLOC_MAX`], or that the host could not give.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error(
    "{len} elements of {elem_size} bytes exceed the {max}-byte kvmalloc bound or the host's memory"
)]
pub struct TooLarge {
    /// Elements asked for.
    pub len: u64,
    /// Bytes per element.
    pub elem_size: usize,
    /// The bound ([`KVMALLOC_MAX`]).
    pub max: usize,
}

/// The largest `len` that [`kvmalloc_array`] accepts for elements of type `T`.
pub const fn max_len<T>() -> u64 {
    match KVMALLOC_MAX.checked_div(std::mem::size_of::<T>()) {
        Some(n) => n as u64,
        None => u64::MAX,
    }
}

/// `len` copies of `value` (`kvcalloc` / `kvmalloc_array`), or [`TooLarge`] before anything
/// is allocated when the array would exceed [`KVMALLOC_MAX`], or when the host refuses.
#[doc(alias = "kvcalloc")]
pub fn kvmalloc_array<T: Clone>(len: u64, value: T) -> Result<Vec<T>, TooLarge> {
    let err = TooLarge {
        len,
        elem_size: std::mem::size_of::<T>(),
        max: KVMALLOC_MAX,
    };
    if len > max_len::<T>() {
        return Err(err);
    }
    let n = usize::try_from(len).map_err(|_| err)?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| err)?;
    v.resize(n, value);
    Ok(v)
}

/// Checks that an array of `len` elements of `T` is within the bound, without allocating:
/// for arrays that grow as pages are found.
pub fn check_array<T>(len: u64) -> Result<(), TooLarge> {
    if len > max_len::<T>() {
        return Err(TooLarge {
            len,
            elem_size: std::mem::size_of::<T>(),
            max: KVMALLOC_MAX,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_is_int_max_bytes() {
        assert_eq!(max_len::<u8>(), i32::MAX as u64);
        assert_eq!(max_len::<u64>(), (i32::MAX / 8) as u64);
        assert!(kvmalloc_array(max_len::<u64>() + 1, 0u64).is_err());
        assert!(check_array::<u64>(max_len::<u64>()).is_ok());
        assert!(check_array::<u64>(u64::MAX).is_err());
        assert_eq!(kvmalloc_array(3, 7u32).unwrap(), vec![7, 7, 7]);
    }

    #[test]
    fn huge_lengths_are_refused_not_aborted() {
        // 2^40 pages of 8-byte words: 8 TiB.
        let e = kvmalloc_array(1u64 << 40, 0u64).unwrap_err();
        assert_eq!(e.len, 1 << 40);
        assert_eq!(e.elem_size, 8);
    }
}
