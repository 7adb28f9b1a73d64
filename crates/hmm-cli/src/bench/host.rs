//! The host kernel's side of the baselines, measured in the same run as the model: its
//! first-touch anonymous faults (4 KiB write, zero-page read, 2 MiB THP write) and its
//! page-table walk as userspace can drive it, a read of `/proc/self/pagemap` (the
//! kernel's `pagemap_read` walks the page tables and writes one 64-bit word per page,
//! as `hmm_range_fault` does).
//!
//! The mappings come from `memmap2` (anonymous, private), so this module needs no
//! `unsafe`. A write is `slice[i] = 1` with the mapping passed through `black_box`
//! afterwards, so the compiler keeps every store.

use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use hmm::addr::{PAGE_SIZE, PMD_SIZE};
use memmap2::{Advice, MmapMut, MmapOptions};

use super::Result;

const PAGE: usize = PAGE_SIZE as usize;
const PMD: usize = PMD_SIZE as usize;

/// How a first touch accesses the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Touch {
    /// A store: allocate, zero and map a page.
    Write,
    /// A load: map the shared zero page.
    Read,
}

/// A fresh anonymous mapping of `len` bytes with `advice` over all of it.
fn anon(len: usize, advice: Advice) -> Result<MmapMut> {
    let m = MmapOptions::new().len(len).map_anon()?;
    m.advise(advice)?;
    Ok(m)
}

/// The latency of each of `n` first-touch faults of the host kernel on 4 KiB pages
/// (`MADV_NOHUGEPAGE`), one fresh mapping per `batch` pages.
pub(crate) fn first_touch(touch: Touch, n: u64, batch: u64) -> Result<Vec<Duration>> {
    let mut lat = Vec::with_capacity(n as usize);
    let mut left = n;
    while left > 0 {
        let k = left.min(batch) as usize;
        let mut m = anon(k * PAGE, Advice::NoHugePage)?;
        for i in 0..k {
            let t = Instant::now();
            match touch {
                Touch::Write => m[i * PAGE] = 1,
                Touch::Read => {
                    black_box(m[i * PAGE]);
                }
            }
            lat.push(t.elapsed());
        }
        black_box(&mut m);
        left -= k as u64;
    }
    Ok(lat)
}

/// The latency of each of `n` first-touch write faults of the host kernel on 2 MiB
/// units of a 2 MiB-aligned `MADV_HUGEPAGE` mapping, and how many of them the kernel
/// actually mapped as THPs (`AnonHugePages` grew by), so a fallback to 4 KiB shows.
pub(crate) fn first_touch_thp(n: u64, batch: u64) -> Result<(Vec<Duration>, u64)> {
    let mut lat = Vec::with_capacity(n as usize);
    let mut huge = 0;
    let mut left = n;
    while left > 0 {
        let k = left.min(batch) as usize;
        // One PMD more than needed, so that an aligned run of `k` PMDs lies inside.
        let mut m = MmapOptions::new().len((k + 1) * PMD).map_anon()?;
        let skip = (PMD - m.as_ptr() as usize % PMD) % PMD;
        m.advise_range(Advice::HugePage, skip, k * PMD)?;
        let before = anon_huge_bytes();
        for i in 0..k {
            let t = Instant::now();
            m[skip + i * PMD] = 1;
            lat.push(t.elapsed());
        }
        black_box(&mut m);
        huge += anon_huge_bytes().saturating_sub(before) / PMD_SIZE;
        left -= k as u64;
    }
    Ok((lat, huge))
}

/// `AnonHugePages` of this process, in bytes (0 where `/proc` does not say).
fn anon_huge_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb << 10)
}

/// The host kernel's page-table walk over `npages` populated 4 KiB pages: the median time
/// of `iters` reads of their `/proc/self/pagemap` words. `None` if this process may not
/// read its pagemap (some containers forbid it).
pub(crate) fn pagemap_walk(npages: u64, iters: usize) -> Result<Option<Duration>> {
    let Ok(pagemap) = File::open("/proc/self/pagemap") else {
        return Ok(None);
    };
    let len = npages as usize * PAGE;
    let mut m = anon(len, Advice::NoHugePage)?;
    for i in 0..npages as usize {
        m[i * PAGE] = 1;
    }
    let offset = (m.as_ptr() as u64 / PAGE_SIZE) * 8;
    let mut words = vec![0u8; npages as usize * 8];
    if pagemap.read_exact_at(&mut words, offset).is_err() {
        return Ok(None);
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        pagemap.read_exact_at(&mut words, offset)?;
        times.push(t.elapsed());
    }
    // Bit 63 of each word is "present": the walk saw the pages the loop above touched.
    let present = words
        .chunks_exact(8)
        .filter(|w| u64::from_le_bytes((*w).try_into().expect("8 bytes")) >> 63 == 1)
        .count();
    if present as u64 != npages {
        return Err(format!("pagemap saw {present} of {npages} pages present").into());
    }
    black_box(&mut m);
    Ok(Some(super::median(times)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_baselines_measure_every_touch() {
        assert_eq!(first_touch(Touch::Write, 10, 4).unwrap().len(), 10);
        assert_eq!(first_touch(Touch::Read, 3, 4).unwrap().len(), 3);
        let (lat, huge) = first_touch_thp(2, 2).unwrap();
        assert_eq!(lat.len(), 2);
        assert!(huge <= 2);
        if let Some(t) = pagemap_walk(64, 3).unwrap() {
            assert!(t > Duration::ZERO);
        }
    }
}
