//! Byte-level reads and writes of frame contents held as `AtomicU64` words.
//!
//! Whole words are single relaxed atomic loads and stores; a partial word at either end of
//! a byte range is updated with a compare-and-swap so that two writers of different bytes in
//! one word never lose each other's bytes (as two CPUs storing to one cache line would not).
//! Ordering between threads comes from the locks of the layers above, so `Relaxed` is enough
//! here. Words are little-endian, like x86-64 memory.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::arena::WORDS_PER_FRAME;

/// A frame's words.
pub(crate) type FrameWords = [AtomicU64; WORDS_PER_FRAME];

/// Bytes per frame.
pub(crate) const FRAME_BYTES: usize = WORDS_PER_FRAME * 8;

#[track_caller]
fn check(offset: usize, len: usize) {
    assert!(
        offset <= FRAME_BYTES && len <= FRAME_BYTES - offset,
        "access [{offset}, +{len}) outside a 4 KiB frame"
    );
}

/// Reads `buf.len()` bytes at `offset`: a partial word at either end, the whole words
/// between them in one tight loop.
#[track_caller]
pub(crate) fn read(words: &FrameWords, offset: usize, buf: &mut [u8]) {
    check(offset, buf.len());
    let mut off = offset;
    let mut out = buf;
    // Up to the first word boundary.
    if off % 8 != 0 && !out.is_empty() {
        let in_word = off % 8;
        let n = (8 - in_word).min(out.len());
        let w = words[off / 8].load(Relaxed).to_le_bytes();
        out[..n].copy_from_slice(&w[in_word..in_word + n]);
        off += n;
        out = &mut out[n..];
    }
    // Whole words.
    let whole = out.len() / 8;
    let (body, tail) = out.split_at_mut(whole * 8);
    for (chunk, w) in body
        .chunks_exact_mut(8)
        .zip(&words[off / 8..off / 8 + whole])
    {
        chunk.copy_from_slice(&w.load(Relaxed).to_le_bytes());
    }
    off += whole * 8;
    // The rest of the last word.
    if !tail.is_empty() {
        let w = words[off / 8].load(Relaxed).to_le_bytes();
        let n = tail.len();
        tail.copy_from_slice(&w[..n]);
    }
}

/// Writes `data` at `offset`: a partial word at either end with a compare-and-swap, the
/// whole words between them in one tight loop.
#[track_caller]
pub(crate) fn write(words: &FrameWords, offset: usize, data: &[u8]) {
    check(offset, data.len());
    let head = ((8 - offset % 8) % 8).min(data.len());
    write_words(words, offset, &data[..head]);
    let rest = &data[head..];
    let (body, tail) = rest.split_at(rest.len() / 8 * 8);
    let first = (offset + head) / 8;
    for (chunk, w) in body
        .chunks_exact(8)
        .zip(&words[first..first + body.len() / 8])
    {
        let bytes: [u8; 8] = chunk.try_into().expect("eight bytes");
        w.store(u64::from_le_bytes(bytes), Relaxed);
    }
    write_words(words, offset + head + body.len(), tail);
}

/// [`write`] a word at a time.
fn write_words(words: &FrameWords, offset: usize, data: &[u8]) {
    let mut off = offset;
    let mut d = data;
    while !d.is_empty() {
        let in_word = off % 8;
        let n = (8 - in_word).min(d.len());
        let word = &words[off / 8];
        if n == 8 {
            let bytes: [u8; 8] = d[..8].try_into().expect("eight bytes");
            word.store(u64::from_le_bytes(bytes), Relaxed);
        } else {
            let mut val = [0u8; 8];
            val[in_word..in_word + n].copy_from_slice(&d[..n]);
            let val = u64::from_le_bytes(val);
            let mask = (u64::MAX >> (64 - 8 * n as u32)) << (8 * in_word as u32);
            // The closure never fails, so neither does the update.
            let _ = word.fetch_update(Relaxed, Relaxed, |old| Some((old & !mask) | val));
        }
        off += n;
        d = &d[n..];
    }
}

/// Copies a whole frame.
pub(crate) fn copy(src: &FrameWords, dst: &FrameWords) {
    for (s, d) in src.iter().zip(dst.iter()) {
        d.store(s.load(Relaxed), Relaxed);
    }
}

/// Zero-fills a whole frame.
pub(crate) fn zero(words: &FrameWords) {
    for w in words {
        w.store(0, Relaxed);
    }
}

/// Whether a whole frame is zero.
pub(crate) fn is_zero(words: &FrameWords) -> bool {
    words.iter().all(|w| w.load(Relaxed) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame() -> Box<FrameWords> {
        Box::new(std::array::from_fn(|_| AtomicU64::new(0)))
    }

    #[test]
    fn unaligned_round_trip() {
        let f = frame();
        let data: Vec<u8> = (0..100u8).collect();
        write(&f, 3, &data);
        let mut back = vec![0u8; 100];
        read(&f, 3, &mut back);
        assert_eq!(back, data);
        let mut edge = [0u8; 5];
        read(&f, 0, &mut edge);
        assert_eq!(edge, [0, 0, 0, 0, 1]);
        write(&f, FRAME_BYTES - 1, &[9]);
        let mut last = [0u8];
        read(&f, FRAME_BYTES - 1, &mut last);
        assert_eq!(last, [9]);
    }

    /// Every offset and length near the word boundaries and the frame's ends, against a
    /// plain byte array.
    #[test]
    fn reads_and_writes_agree_with_a_byte_array_at_every_alignment() {
        let f = frame();
        let mut model = vec![0u8; FRAME_BYTES];
        let mut stamp = 1u8;
        let offsets = (0..24).chain(FRAME_BYTES - 24..FRAME_BYTES);
        for off in offsets {
            for len in (0..=40).chain([FRAME_BYTES - off]) {
                let len = len.min(FRAME_BYTES - off);
                let data: Vec<u8> = (0..len).map(|i| stamp.wrapping_add(i as u8)).collect();
                stamp = stamp.wrapping_add(7);
                write(&f, off, &data);
                model[off..off + len].copy_from_slice(&data);
                let mut back = vec![0u8; len];
                read(&f, off, &mut back);
                assert_eq!(back, data, "offset {off}, length {len}");
            }
        }
        let mut all = vec![0u8; FRAME_BYTES];
        read(&f, 0, &mut all);
        assert_eq!(all, model);
    }

    #[test]
    fn partial_word_writes_keep_neighbours() {
        let f = frame();
        write(&f, 0, &[0xff; 8]);
        write(&f, 2, &[0x11, 0x22]);
        let mut b = [0u8; 8];
        read(&f, 0, &mut b);
        assert_eq!(b, [0xff, 0xff, 0x11, 0x22, 0xff, 0xff, 0xff, 0xff]);
    }

    #[test]
    fn copy_and_zero() {
        let (a, b) = (frame(), frame());
        write(&a, 100, b"hello");
        copy(&a, &b);
        let mut s = [0u8; 5];
        read(&b, 100, &mut s);
        assert_eq!(&s, b"hello");
        assert!(!is_zero(&b));
        zero(&b);
        assert!(is_zero(&b));
    }

    #[test]
    #[should_panic(expected = "outside a 4 KiB frame")]
    fn out_of_frame_access_panics() {
        let f = frame();
        write(&f, FRAME_BYTES - 2, &[0; 3]);
    }
}
