//! The frame arena: the bytes of every frame of a memory region, in one lazily committed
//! zeroed mapping ([`ZeroedArray`]).
//!
//! With [`super::zeroed`] and `cpu`, this is one of the modules of the workspace with
//! `unsafe` code. The arena is viewed as a slice of `AtomicU64` words and never in any
//! other way, so two threads touching one frame (a CPU store racing a device read, say)
//! are atomic accesses, not a Rust data race; the one piece of assembly, the streaming
//! copy of [`stream_frames`], makes only accesses that are atomic on its target too. The
//! protocols above (page-table locks, folio locks, migration entries) decide *which* bytes a
//! reader sees; this layer only guarantees that seeing them is defined behaviour.
//!
//! The host commits a page of the arena only when a frame is first written, so an arena
//! sized for terabytes costs nothing until it is used.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::io::FrameWords;
use super::zeroed::ZeroedArray;

/// Number of 64-bit words in one 4 KiB frame.
pub(crate) const WORDS_PER_FRAME: usize = 512;

/// The words of every frame of a region, zero until written.
pub(crate) struct Arena {
    words: ZeroedArray<AtomicU64>,
}

impl Arena {
    /// Maps an arena of `frames` 4 KiB frames.
    pub(crate) fn new(frames: usize) -> std::io::Result<Arena> {
        let words = frames
            .checked_mul(WORDS_PER_FRAME)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(Arena {
            words: ZeroedArray::new(words)?,
        })
    }

    /// All words of the arena.
    #[inline]
    pub(crate) fn words(&self) -> &[AtomicU64] {
        self.words.as_slice()
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

    /// Bytes of the arena the host has committed.
    pub(crate) fn resident_bytes(&self) -> u64 {
        self.words.resident_bytes()
    }

    /// Asks the host to commit the whole arena now, so later first touches of frames cost no
    /// host page fault (benchmarks use this to measure the model, not the host). Contents
    /// do not change.
    pub(crate) fn prefault(&self) {
        if self.words.populate() {
            return;
        }
        // A host before Linux 5.14: write every host page, storing back the value just read
        // with a compare-exchange (an atomic OR of 0 is not enough: the compiler turns that
        // idempotent update into a fenced load, which maps the host's shared zero page and
        // commits nothing).
        for f in 0..self.words().len() / WORDS_PER_FRAME {
            let w = &self.frame(f)[0];
            let v = w.load(Relaxed);
            let _ = w.compare_exchange(v, v, Relaxed, Relaxed);
        }
    }
}

/// Copies every `(src, dst)` frame pair the way a device's copy engine writes memory:
/// streaming stores that bypass the CPU caches (`movntdq` on x86-64), then one store fence.
/// Four pairs are copied at once, a cache line of each in turn, as glibc's `memcpy` does
/// for large copies (more DRAM pages open at once): contiguous or scattered, pages then
/// move at about the speed of one large `memcpy` (1.0x of it for 256 MiB of 4 KiB pages
/// here; 8-byte `movnti` stores reached 0.89x, and a page-by-page copy with ordinary stores
/// about 0.6).
///
/// # Why this is not a data race
///
/// Every access is one aligned 16-byte load (`vmovdqa`) or streaming store (`vmovntdq`),
/// VEX-encoded. On a processor with AVX, Intel guarantees that an aligned 16-byte
/// VEX.128 `vmovdqa` is performed atomically (SDM vol. 3A, "Guaranteed Atomic
/// Operations"; AMD's APM vol. 2, "Access Atomicity", gives the same for cacheable
/// accesses), so a load never tears a word. The stores are not on that list: that each
/// aligned 8-byte half of a `vmovntdq` lands whole is the one assumption here, resting on
/// the SDM's statement that an SSE access "may be implemented using multiple memory
/// accesses" and on aligned quadword accesses being atomic (the same section); every
/// x86-64 implementation writes a 16-byte aligned store to its write-combining buffer
/// whole. Two tests race a writer against the sources and a reader against the
/// destinations and never see a torn word. So the blocks behave as the relaxed
/// `AtomicU64` loads and stores of the portable loop below, whatever other threads do to
/// the same words at the same time. Streaming stores are weakly ordered, which relaxed
/// stores may be; the trailing `sfence` makes them globally visible before any later
/// store of this thread, so a release that follows (a folio unlock, a page-table lock)
/// publishes the bytes as it would publish relaxed stores. Without AVX (checked once at
/// run time), for a frame not 16-byte aligned (arena frames are 4096-byte aligned; the
/// check guards the function's other callers), on other targets and under Miri, the
/// portable loop runs.
pub(crate) fn stream_frames<'a>(pairs: impl IntoIterator<Item = (&'a FrameWords, &'a FrameWords)>) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    let pairs = {
        let pairs: Vec<_> = pairs.into_iter().collect();
        let aligned = |w: &FrameWords| w.as_ptr() as usize % 16 == 0;
        if std::arch::is_x86_feature_detected!("avx")
            && pairs.iter().all(|(s, d)| aligned(s) && aligned(d))
        {
            stream_aligned(&pairs);
            return;
        }
        pairs
    };
    for (s, d) in pairs {
        for (s, d) in s.iter().zip(d) {
            d.store(s.load(Relaxed), Relaxed);
        }
    }
}

/// The streaming copy of [`stream_frames`], for frames its caller checked are 16-byte
/// aligned, on a processor it checked has AVX.
#[cfg(all(target_arch = "x86_64", not(miri)))]
fn stream_aligned(pairs: &[(&FrameWords, &FrameWords)]) {
    let ptrs: Vec<_> = pairs
        .iter()
        .map(|(s, d)| (s.as_ptr(), d.as_ptr()))
        .collect();
    let mut quads = ptrs.chunks_exact(4);
    for q in &mut quads {
        let (s, d) = ([0, 1, 2, 3].map(|k| q[k].0), [0, 1, 2, 3].map(|k| q[k].1));
        // SAFETY: four live 16-byte aligned frames of atomics on each side, AVX present
        // (the caller checked both); each word's accesses atomic as argued above.
        unsafe { stream_quad(s, d) };
    }
    for &(s, d) in quads.remainder() {
        // SAFETY: as above, one frame on each side: `WORDS_PER_FRAME / 8` lines.
        unsafe { stream_lines(s, d, WORDS_PER_FRAME / 8) };
    }
    // SAFETY: a store fence touches no memory and no register.
    unsafe { std::arch::asm!("sfence", options(nostack, preserves_flags)) };
}

/// The assembly of one 64-byte line from `[{s}]` to `[{d}]`: four aligned 16-byte loads
/// and four streaming stores (VEX-encoded, so no SSE/AVX transition), through
/// `xmm0`-`xmm3`.
#[cfg(all(target_arch = "x86_64", not(miri)))]
macro_rules! stream_line {
    ($s:literal, $d:literal) => {
        concat!(
            "vmovdqa xmm0, [{",
            $s,
            "}]\n",
            "vmovdqa xmm1, [{",
            $s,
            "} + 16]\n",
            "vmovdqa xmm2, [{",
            $s,
            "} + 32]\n",
            "vmovdqa xmm3, [{",
            $s,
            "} + 48]\n",
            "vmovntdq [{",
            $d,
            "}], xmm0\n",
            "vmovntdq [{",
            $d,
            "} + 16], xmm1\n",
            "vmovntdq [{",
            $d,
            "} + 32], xmm2\n",
            "vmovntdq [{",
            $d,
            "} + 48], xmm3\n",
            "add {",
            $s,
            "}, 64\n",
            "add {",
            $d,
            "}, 64\n",
        )
    };
}

/// Streams four 4 KiB frames, `s[k]` to `d[k]`, line `j` of each in turn. No fence. The
/// block touches no stack and clobbers only the registers it declares.
///
/// # Safety
///
/// Each pointer points to one 16-byte aligned frame of atomics, and the processor has AVX.
#[cfg(all(target_arch = "x86_64", not(miri)))]
unsafe fn stream_quad(s: [*const AtomicU64; 4], d: [*const AtomicU64; 4]) {
    // SAFETY: the caller's contract; see `stream_frames`.
    unsafe {
        std::arch::asm!(
            "2:",
            stream_line!("s0", "d0"),
            stream_line!("s1", "d1"),
            stream_line!("s2", "d2"),
            stream_line!("s3", "d3"),
            "dec {lines:e}",
            "jnz 2b",
            s0 = inout(reg) s[0] => _,
            s1 = inout(reg) s[1] => _,
            s2 = inout(reg) s[2] => _,
            s3 = inout(reg) s[3] => _,
            d0 = inout(reg) d[0] => _,
            d1 = inout(reg) d[1] => _,
            d2 = inout(reg) d[2] => _,
            d3 = inout(reg) d[3] => _,
            lines = inout(reg) WORDS_PER_FRAME / 8 => _,
            out("xmm0") _,
            out("xmm1") _,
            out("xmm2") _,
            out("xmm3") _,
            options(nostack),
        );
    }
}

/// Streams `lines` 64-byte lines from `s` to `d`, in order. No fence.
///
/// # Safety
///
/// `s` and `d` point to `lines * 8` 16-byte aligned atomics each, `lines > 0`, and the
/// processor has AVX.
#[cfg(all(target_arch = "x86_64", not(miri)))]
unsafe fn stream_lines(s: *const AtomicU64, d: *const AtomicU64, lines: usize) {
    // SAFETY: the caller's contract; see `stream_frames`.
    unsafe {
        std::arch::asm!(
            "2:",
            stream_line!("s", "d"),
            "dec {lines}",
            "jnz 2b",
            s = inout(reg) s => _,
            d = inout(reg) d => _,
            lines = inout(reg) lines => _,
            out("xmm0") _,
            out("xmm1") _,
            out("xmm2") _,
            out("xmm3") _,
            options(nostack),
        );
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
    fn streaming_copies_exactly_the_frames_asked_for() {
        let a = Arena::new(20).unwrap();
        for f in 0..9 {
            for (i, w) in a.frame(f).iter().enumerate() {
                let v = ((f * 512 + i) as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                w.store(v, Ordering::Relaxed);
            }
        }
        a.frame(19)[0].store(5, Ordering::Relaxed);
        // Nine pairs, scattered: two groups of four, then one frame alone.
        let order = [3, 0, 8, 5, 1, 7, 2, 6, 4];
        stream_frames(order.iter().map(|&f| (a.frame(f), a.frame(18 - f))));
        for f in 0..9 {
            for (s, d) in a.frame(f).iter().zip(a.frame(18 - f)) {
                assert_eq!(
                    s.load(Ordering::Relaxed),
                    d.load(Ordering::Relaxed),
                    "frame {f}"
                );
            }
        }
        assert_eq!(
            a.frame(19)[0].load(Ordering::Relaxed),
            5,
            "the frame after untouched"
        );
        assert!(a.frame(9).iter().all(|w| w.load(Ordering::Relaxed) == 0));
        stream_frames([]);
    }

    /// A writer flips every source word between two values while frames are copied: each
    /// copied word is one of them, never a mix (the copy's accesses are whole words).
    #[test]
    fn streaming_racing_a_writer_never_tears_a_word() {
        const OLD: u64 = 0x1111_1111_1111_1111;
        const NEW: u64 = 0xeeee_eeee_eeee_eeee;
        let a = Arena::new(8).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut v = OLD;
                while !stop.load(Ordering::Relaxed) {
                    v = if v == OLD { NEW } else { OLD };
                    for f in 0..3 {
                        a.frame(f)
                            .iter()
                            .for_each(|w| w.store(v, Ordering::Relaxed));
                    }
                }
            });
            for _ in 0..if cfg!(miri) { 2 } else { 1000 } {
                stream_frames((0..5).map(|f| (a.frame(f % 3), a.frame(3 + f))));
                for f in 3..8 {
                    for w in a.frame(f) {
                        let v = w.load(Ordering::Relaxed);
                        assert!([0, OLD, NEW].contains(&v), "torn word {v:#x}");
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
    }

    /// A reader loads every destination word while the frames are copied again and again
    /// from sources of one value and then of another: each word it sees is one of them,
    /// never a mix (the copy's stores land whole words).
    #[test]
    fn streaming_racing_a_reader_never_tears_a_word() {
        const OLD: u64 = 0x1111_1111_1111_1111;
        const NEW: u64 = 0xeeee_eeee_eeee_eeee;
        let a = Arena::new(13).unwrap();
        for (f, v) in [(0, OLD), (1, OLD), (2, OLD), (3, OLD), (4, NEW), (5, NEW)]
            .into_iter()
            .chain((6..8).map(|f| (f, NEW)))
        {
            a.frame(f)
                .iter()
                .for_each(|w| w.store(v, Ordering::Relaxed));
        }
        // Destinations 8..13 start as OLD.
        stream_frames((0..5).map(|f| (a.frame(f % 4), a.frame(8 + f))));
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    for f in 8..13 {
                        for w in a.frame(f) {
                            let v = w.load(Ordering::Relaxed);
                            assert!(v == OLD || v == NEW, "torn word {v:#x}");
                        }
                    }
                }
            });
            for round in 0..if cfg!(miri) { 2 } else { 2000 } {
                let from = if round % 2 == 0 { 4 } else { 0 };
                stream_frames((0..5).map(|f| (a.frame(from + f % 4), a.frame(8 + f))));
            }
            stop.store(true, Ordering::Relaxed);
        });
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
