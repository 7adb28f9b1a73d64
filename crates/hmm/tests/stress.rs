//! Multi-threaded stress: CPU threads fault and write while others munmap, mprotect and
//! madvise, or fork, pin, collapse and split THPs. Ends with no lost data and every frame
//! accounted for.
//!
//! `HMM_STRESS_ITERS` scales the run (default 3000 operations per thread).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::{page, Machine, RW};
use hmm::addr::{PAGE_SIZE, PMD_SIZE};
use hmm::mm::{Advice, GupFlags, MapFlags, Prot, ThpMode};

const STABLE: u64 = 64;
const CHURN: u64 = 32;

fn iters() -> u64 {
    std::env::var("HMM_STRESS_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

/// A tiny deterministic generator (xorshift), one per thread.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn writers_survive_munmap_mprotect_and_dontneed_churn() {
    let m = Machine::new(64);
    let private = m.map(STABLE, RW, MapFlags::PRIVATE);
    let shared = m.map(STABLE, RW, MapFlags::SHARED);
    let churn = m.map(CHURN, RW, MapFlags::PRIVATE);
    let stop = AtomicBool::new(false);
    let n = iters();
    // Final version each writer left in each of its pages.
    let finals = std::thread::scope(|s| {
        let writers: Vec<_> = (0..2u64)
            .map(|t| {
                let mm = &m.mm;
                s.spawn(move || {
                    let mut rng = Rng(0x9e37_79b9 + t);
                    let mut last = vec![0u64; STABLE as usize];
                    for v in 1..=n {
                        // Each writer owns the pages of its parity, in both stable regions.
                        let i = rng.below(STABLE / 2) * 2 + t;
                        let word = (t << 56) | v;
                        for base in [private, shared] {
                            let a = page(base, i).checked_add(8 * (v % 512)).unwrap();
                            mm.write_val(a, word).unwrap();
                            assert_eq!(mm.read_val::<u64>(a).unwrap(), word);
                            mm.write_val(page(base, i), word).unwrap();
                        }
                        last[i as usize] = word;
                        // Touch the churn region too; failures are expected there.
                        let c = page(churn, rng.below(CHURN));
                        let _ = mm.write_val(c, word);
                        let _ = mm.read_val::<u64>(c);
                    }
                    last
                })
            })
            .collect();
        let mm = &m.mm;
        let stop = &stop;
        s.spawn(move || {
            let mut rng = Rng(42);
            while !stop.load(Ordering::Relaxed) {
                let at = rng.below(CHURN);
                let len = (1 + rng.below(4)).min(CHURN - at) * PAGE_SIZE;
                let a = page(churn, at);
                match rng.below(5) {
                    0 => mm.munmap(a, len).unwrap(),
                    1 => {
                        mm.mmap(Some(a), len, RW, MapFlags::PRIVATE | MapFlags::FIXED)
                            .unwrap();
                    }
                    2 => {
                        let prot = if rng.below(2) == 0 { Prot::READ } else { RW };
                        let _ = mm.mprotect(a, len, prot);
                    }
                    3 => {
                        let _ = mm.madvise(a, len, Advice::DontNeed);
                    }
                    _ => {
                        // Shared memory keeps its data through DONTNEED.
                        let at = rng.below(STABLE - 4);
                        mm.madvise(page(shared, at), 4 * PAGE_SIZE, Advice::DontNeed)
                            .unwrap();
                    }
                }
            }
        });
        let finals: Vec<Vec<u64>> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        stop.store(true, Ordering::Relaxed);
        finals
    });
    for (t, last) in finals.iter().enumerate() {
        for i in (t as u64..STABLE).step_by(2) {
            let want = last[i as usize];
            for base in [private, shared] {
                assert_eq!(
                    m.mm.read_val::<u64>(page(base, i)).unwrap(),
                    want,
                    "lost write in page {i} of {base}"
                );
            }
        }
    }
    let report = m.mm.audit().unwrap();
    assert_eq!(m.phys.nr_in_use(), report.frames_referenced);
    let phys = m.phys.clone();
    drop(m);
    assert_eq!(phys.nr_in_use(), 0, "frames leaked");
}

#[test]
fn concurrent_first_touch_of_the_same_pages_allocates_once() {
    let m = Machine::new(16);
    let a = m.map(256, RW, MapFlags::PRIVATE);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let mm = &m.mm;
            s.spawn(move || {
                for i in 0..256 {
                    let at = page(a, i).checked_add(8 * t).unwrap();
                    mm.write_val(at, t + 1).unwrap();
                }
            });
        }
    });
    for i in 0..256 {
        assert_eq!(m.mm.read_val::<u64>(page(a, i)).unwrap(), 1);
        assert_eq!(
            m.mm.read_val::<u64>(page(a, i).checked_add(8).unwrap())
                .unwrap(),
            2
        );
    }
    let s = m.mm.stats();
    assert_eq!(m.phys.nr_in_use(), 256);
    // Racing faults that lost free their frame again.
    assert_eq!(s.frames_allocated - s.frames_freed, 256);
    m.mm.audit().unwrap();
}

#[test]
fn writers_survive_fork_pins_collapse_and_thp_splits() {
    let m = Machine::new(128);
    m.mm.set_thp_mode(ThpMode::Always);
    const HUGE: u64 = 4 * 512;
    let huge = m.map(HUGE, RW, MapFlags::PRIVATE);
    assert!(huge.is_aligned(PMD_SIZE));
    // With MADV_HUGEPAGE on the whole region, the NOHUGEPAGE/HUGEPAGE flip below leaves
    // the VMA as it was (it merges back), so the region keeps getting THPs.
    m.mm.madvise(huge, HUGE * PAGE_SIZE, Advice::HugePage)
        .unwrap();
    let stop = AtomicBool::new(false);
    // Writers go on until the churn thread has done at least this much, however small n.
    let churned = AtomicU64::new(0);
    const MIN_CHURN: u64 = 200;
    let n = iters();
    let finals = std::thread::scope(|s| {
        let writers: Vec<_> = (0..2u64)
            .map(|t| {
                let mm = &m.mm;
                let churned = &churned;
                s.spawn(move || {
                    let mut rng = Rng(0x51 + t);
                    let mut last = vec![0u64; HUGE as usize];
                    let mut v = 0;
                    while v < n || churned.load(Ordering::Relaxed) < MIN_CHURN {
                        v += 1;
                        // Writer t owns the pages i with i % 4 == t; pages with i % 4 == 3
                        // are dropped by the churn thread, which splits the THPs.
                        let i = rng.below(HUGE / 4) * 4 + t;
                        let word = (t << 56) | v;
                        mm.write_val(page(huge, i), word).unwrap();
                        assert_eq!(mm.read_val::<u64>(page(huge, i)).unwrap(), word);
                        last[i as usize] = word;
                    }
                    last
                })
            })
            .collect();
        let mm = &m.mm;
        let stop = &stop;
        let churned = &churned;
        s.spawn(move || {
            let mut rng = Rng(7);
            let mut pins = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                churned.fetch_add(1, Ordering::Relaxed);
                match rng.below(7) {
                    6 => {
                        let i = rng.below(HUGE / 4) * 4 + 3;
                        mm.madvise(page(huge, i), PAGE_SIZE, Advice::DontNeed)
                            .unwrap();
                    }
                    0 => {
                        // A short-lived child: its snapshot holds writers' words only, and
                        // its own writes stay its own.
                        let child = mm.fork().unwrap();
                        let i = rng.below(HUGE);
                        let seen = child.read_val::<u64>(page(huge, i)).unwrap();
                        assert!(seen == 0 || seen >> 56 == i % 4, "foreign word {seen:#x}");
                        child.write_val(page(huge, i), u64::MAX).unwrap();
                        assert_eq!(child.read_val::<u64>(page(huge, i)).unwrap(), u64::MAX);
                        // (No audit here: the parent keeps changing the shared folios, and
                        // an audit wants a quiet system.)
                    }
                    1 => {
                        let i = rng.below(HUGE - 4);
                        let flags = if rng.below(2) == 0 {
                            GupFlags::WRITE
                        } else {
                            GupFlags::empty()
                        };
                        pins.push(mm.pin_user_pages(page(huge, i), 4, flags).unwrap());
                        if pins.len() > 4 {
                            pins.remove(0).release();
                        }
                    }
                    2 => {
                        let pmd = rng.below(HUGE / 512);
                        let _ = mm.madvise(page(huge, pmd * 512), PMD_SIZE, Advice::Collapse);
                    }
                    3 => {
                        // Splits a THP (and back), keeping the data.
                        let at = page(huge, rng.below(HUGE - 1));
                        mm.madvise(at, PAGE_SIZE, Advice::NoHugePage).unwrap();
                        mm.madvise(at, PAGE_SIZE, Advice::HugePage).unwrap();
                    }
                    4 => mm.clear_soft_dirty(),
                    _ => drop(pins.pop()),
                }
            }
        });
        let finals: Vec<Vec<u64>> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        stop.store(true, Ordering::Relaxed);
        finals
    });
    for (t, last) in finals.iter().enumerate() {
        for i in (t as u64..HUGE).step_by(4) {
            assert_eq!(
                m.mm.read_val::<u64>(page(huge, i)).unwrap(),
                last[i as usize],
                "lost write in page {i}"
            );
        }
    }
    m.mm.audit().unwrap();
    let st = m.mm.stats();
    eprintln!(
        "thp faults {}, PMD splits {}, folio splits {}, collapses {}, COW {}",
        st.faults.thp_anon, st.thp_split_pmd, st.thp_split_folio, st.thp_collapse, st.faults.cow
    );
    assert!(st.faults.thp_anon > 0, "the run made THPs");
    let phys = m.phys.clone();
    drop(m);
    assert_eq!(phys.nr_in_use(), 0, "frames leaked");
}
