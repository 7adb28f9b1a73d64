//! Differential fuzzing against a flat reference model: random sequences of mmap
//! (anonymous and file, private and shared) / munmap / mprotect / mremap / madvise
//! (DONTNEED, HUGEPAGE, COLLAPSE) / fork / exit / pread / pwrite / CPU reads and writes /
//! device reads and writes through two dmirror devices / migrations to either device and
//! back (MIGRATE_TO_DEV, MIGRATE_ON_FAULT_TO_DEV, MIGRATE_TO_SYS) / device-exclusive
//! access, over several processes, run against hmm-rs and against a model that is nothing
//! but each process's bytes and protections. Every result is compared: bytes the CPU or a
//! device reads, errors, and for a failed device write the pages it may have written (a
//! prefix of the range, each page all old or all new, as `dmirror_write` leaves it). THPs
//! are on in some runs. Every run ends with a clean audit of every address space and, once
//! all are gone, no frame of RAM or device memory in use.
//!
//! `HMM_PROPTEST_CASES=N` sets the number of runs (default 256, up to 120 operations
//! each); the long run of the README, `HMM_PROPTEST_CASES=20000 cargo test --release -p
//! hmm-dmirror --test model -- --nocapture`, is over a million operations and prints how
//! many.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use proptest::prelude::*;

use hmm::addr::{VirtAddr, PAGE_SIZE, PMD_SIZE};
use hmm::mm::{
    Advice, FaultError, MapFlags, MemFile, Mm, MremapFlags, MthpMode, Prot, SegvCause, ThpMode,
};
use hmm::phys::{PhysConfig, PhysMem};
use hmm_dmirror::{Dmirror, DmirrorCmd, DmirrorConfig, DmirrorDriver, HmmDmirrorCmd};

/// The region the operations touch: three 2 MiB-aligned PMDs.
const BASE: u64 = 0x4000_0000;
const PAGES: u64 = 3 * 512;
/// Pages of the one file, which is created with this size and never resized.
const FILE_PAGES: u64 = 64;
const FILE: u64 = 0;
const MAX_PROCS: usize = 3;
/// The devices, and the most pages one device command covers.
const DEVICES: usize = 2;
const DEV_PAGES: u64 = 8;
/// Every process's buffer for device commands (`cmd.ptr`), outside the region: mapped by the
/// first process before anything else and inherited by every child.
const OUT: u64 = BASE + 4 * PMD_SIZE;

/// Operations run, over every case.
static OPS: AtomicU64 = AtomicU64::new(0);
/// Device commands that succeeded and were compared with the model: READ, WRITE,
/// migrations, EXCLUSIVE (so that a run whose device commands all failed shows).
static DEVICE_OK: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
/// Write faults that mapped a multi-size THP, in the processes alive at the end of a run.
static MTHP_FAULTS: AtomicU64 = AtomicU64::new(0);

fn device_ok(kind: usize) {
    DEVICE_OK[kind].fetch_add(1, Ordering::Relaxed);
}

#[track_caller]
fn page(base: VirtAddr, i: u64) -> VirtAddr {
    base.checked_add(i * PAGE_SIZE).unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    Mmap {
        at: u64,
        n: u64,
        prot: u32,
        shared: bool,
    },
    MmapFile {
        at: u64,
        n: u64,
        prot: u32,
        shared: bool,
        pgoff: u64,
    },
    Munmap {
        at: u64,
        n: u64,
    },
    Mprotect {
        at: u64,
        n: u64,
        prot: u32,
    },
    Mremap {
        at: u64,
        n: u64,
        to: u64,
    },
    DontNeed {
        at: u64,
        n: u64,
    },
    HugePage {
        at: u64,
        n: u64,
    },
    Collapse {
        pmd: u64,
    },
    Write {
        at: u64,
        off: u64,
        len: u64,
        byte: u8,
    },
    Read {
        at: u64,
        off: u64,
        len: u64,
    },
    Pwrite {
        pgoff: u64,
        off: u64,
        len: u64,
        byte: u8,
    },
    Pread {
        pgoff: u64,
        off: u64,
        len: u64,
    },
    Fork,
    Exit,
    /// The device reads `n` pages at `at` into the process's buffer.
    DevRead {
        dev: usize,
        at: u64,
        n: u64,
    },
    /// The device writes `n` pages of `byte` at `at`, from the process's buffer.
    DevWrite {
        dev: usize,
        at: u64,
        n: u64,
        byte: u8,
    },
    /// A migration of `n` pages at `at` by device `dev`.
    Migrate {
        dev: usize,
        at: u64,
        n: u64,
        how: Migration,
    },
    /// EXCLUSIVE: the device takes `n` pages for atomics and reads them back.
    Exclusive {
        dev: usize,
        at: u64,
        n: u64,
    },
}

#[derive(Debug, Clone, Copy)]
enum Migration {
    ToDev,
    OnFaultToDev,
    ToSys,
}

impl Migration {
    fn cmd(self) -> DmirrorCmd {
        match self {
            Migration::ToDev => DmirrorCmd::MigrateToDev,
            Migration::OnFaultToDev => DmirrorCmd::MigrateOnFaultToDev,
            Migration::ToSys => DmirrorCmd::MigrateToSys,
        }
    }
}

/// One operation, on process `proc % live processes`.
#[derive(Debug, Clone)]
struct Step {
    proc: usize,
    op: Op,
}

/// A page index, mostly near the three PMD boundaries so that operations meet each other.
fn at() -> BoxedStrategy<u64> {
    prop_oneof![
        3 => 0..24u64,
        3 => 500..530u64,
        3 => 1010..1040u64,
        1 => 0..PAGES,
    ]
    .boxed()
}

fn op() -> impl Strategy<Value = Op> {
    let at = at();
    // Mostly small mappings, sometimes big enough for THPs.
    let n = prop_oneof![2 => 1..8u64, 1 => 256..1024u64];
    let small = 1..8u64;
    prop_oneof![
        3 => (at.clone(), n.clone(), 0..4u32, any::<bool>())
            .prop_map(|(at, n, prot, shared)| Op::Mmap { at, n, prot, shared }),
        2 => (at.clone(), small.clone(), 0..4u32, any::<bool>(), 0..FILE_PAGES)
            .prop_map(|(at, n, prot, shared, pgoff)| Op::MmapFile { at, n, prot, shared, pgoff }),
        1 => (at.clone(), n.clone()).prop_map(|(at, n)| Op::Munmap { at, n }),
        1 => (at.clone(), n.clone(), 0..4u32).prop_map(|(at, n, prot)| Op::Mprotect { at, n, prot }),
        1 => (at.clone(), n.clone(), at.clone()).prop_map(|(at, n, to)| Op::Mremap { at, n, to }),
        1 => (at.clone(), n.clone()).prop_map(|(at, n)| Op::DontNeed { at, n }),
        2 => (at.clone(), n).prop_map(|(at, n)| Op::HugePage { at, n }),
        2 => (0..PAGES / 512).prop_map(|pmd| Op::Collapse { pmd }),
        6 => (at.clone(), 0..PAGE_SIZE, 1..3 * PAGE_SIZE, any::<u8>())
            .prop_map(|(at, off, len, byte)| Op::Write { at, off, len, byte }),
        6 => (at.clone(), 0..PAGE_SIZE, 1..3 * PAGE_SIZE).prop_map(|(at, off, len)| Op::Read { at, off, len }),
        1 => (0..FILE_PAGES, 0..PAGE_SIZE, 1..2 * PAGE_SIZE, any::<u8>())
            .prop_map(|(pgoff, off, len, byte)| Op::Pwrite { pgoff, off, len, byte }),
        1 => (0..FILE_PAGES, 0..PAGE_SIZE, 1..2 * PAGE_SIZE)
            .prop_map(|(pgoff, off, len)| Op::Pread { pgoff, off, len }),
        1 => Just(Op::Fork),
        1 => Just(Op::Exit),
        3 => (0..DEVICES, at.clone(), 1..=DEV_PAGES)
            .prop_map(|(dev, at, n)| Op::DevRead { dev, at, n }),
        3 => (0..DEVICES, at.clone(), 1..=DEV_PAGES, any::<u8>())
            .prop_map(|(dev, at, n, byte)| Op::DevWrite { dev, at, n, byte }),
        4 => (0..DEVICES, at.clone(), 1..=DEV_PAGES, prop_oneof![
                Just(Migration::ToDev),
                Just(Migration::OnFaultToDev),
                Just(Migration::ToSys)
            ])
            .prop_map(|(dev, at, n, how)| Op::Migrate { dev, at, n, how }),
        1 => (0..DEVICES, at, 1..=DEV_PAGES).prop_map(|(dev, at, n)| Op::Exclusive { dev, at, n }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    (0..MAX_PROCS, op()).prop_map(|(proc, op)| Step { proc, op })
}

fn prot_of(p: u32) -> Prot {
    Prot::from_bits_truncate(p)
}

/// Where a model page's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Source {
    /// Private: its own copy once written; before that zeros, or the file page if any.
    Private { file: Option<u64> },
    /// Shared: object `(id, index)` (id [`FILE`] is the file).
    Object(u64, u64),
}

#[derive(Debug, Clone, Copy)]
struct ModelPage {
    prot: Prot,
    source: Source,
}

/// One process: its address space and its view, and its mirrors (opened on first use).
struct Proc {
    mm: Arc<Mm>,
    pages: HashMap<u64, ModelPage>,
    private: HashMap<u64, Vec<u8>>,
    mirrors: [Option<Arc<Dmirror>>; DEVICES],
}

#[derive(Default)]
struct Objects {
    bytes: HashMap<(u64, u64), Vec<u8>>,
    next: u64,
}

impl Objects {
    fn page(&mut self, key: (u64, u64)) -> &mut Vec<u8> {
        self.bytes
            .entry(key)
            .or_insert_with(|| vec![0; PAGE_SIZE as usize])
    }
}

impl Proc {
    fn byte(&self, objects: &Objects, p: u64, at: usize) -> u8 {
        if let Some(b) = self.private.get(&p) {
            return b[at];
        }
        let key = match self.pages[&p].source {
            Source::Private { file: None } => return 0,
            Source::Private { file: Some(pgoff) } => (FILE, pgoff),
            Source::Object(id, i) => (id, i),
        };
        objects.bytes.get(&key).map_or(0, |b| b[at])
    }

    fn set_byte(&mut self, objects: &mut Objects, p: u64, at: usize, v: u8) {
        match self.pages[&p].source {
            Source::Object(id, i) => objects.page((id, i))[at] = v,
            Source::Private { file } => {
                let page = self.private.entry(p).or_insert_with(|| match file {
                    Some(pgoff) => objects.page((FILE, pgoff)).clone(),
                    None => vec![0; PAGE_SIZE as usize],
                });
                page[at] = v;
            }
        }
    }

    fn unmap(&mut self, at: u64, n: u64) {
        for p in at..at + n {
            self.pages.remove(&p);
            self.private.remove(&p);
        }
    }

    fn all_mapped(&self, at: u64, n: u64) -> bool {
        (at..at + n).all(|p| self.pages.contains_key(&p))
    }

    /// The access check the real system does first: the first failing address.
    fn check(&self, start: u64, len: u64, write: bool) -> Result<(), (u64, SegvCause)> {
        let mut a = start;
        while a < start + len {
            let p = (a - BASE) / PAGE_SIZE;
            let Some(mp) = self.pages.get(&p) else {
                return Err((a, SegvCause::MapErr));
            };
            let ok = if write {
                mp.prot.contains(Prot::WRITE)
            } else {
                !mp.prot.is_empty()
            };
            if !ok {
                return Err((a, SegvCause::AccErr));
            }
            a = BASE + (p + 1) * PAGE_SIZE;
        }
        Ok(())
    }

    /// The error a device access of pages `[at, at + n)` must fail with, if any: the first
    /// page without a mapping or without read permission is `EFAULT`; for a write, the
    /// first without write permission is `EPERM` (`hmm_range_fault`'s checks, in order).
    fn device_check(&self, at: u64, n: u64, write: bool) -> Result<(), (u64, i32)> {
        for p in at..at + n {
            match self.pages.get(&p) {
                None => return Err((p, -libc::EFAULT)),
                Some(mp) if !mp.prot.contains(Prot::READ) => return Err((p, -libc::EFAULT)),
                Some(mp) if write && !mp.prot.contains(Prot::WRITE) => {
                    return Err((p, -libc::EPERM))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// A write fault broke COW on pages `[from, to)` without writing them (a device write
    /// or EXCLUSIVE faults each page writable in turn): a private page of a file mapping
    /// now has its own copy of the file's bytes.
    fn cow_break(&mut self, objects: &mut Objects, from: u64, to: u64) {
        for p in from..to {
            if let Some(ModelPage {
                source: Source::Private { file: Some(pgoff) },
                ..
            }) = self.pages.get(&p)
            {
                let bytes = objects.page((FILE, *pgoff)).clone();
                self.private.entry(p).or_insert(bytes);
            }
        }
    }

    /// The model's bytes of page `p`.
    fn page_bytes(&self, objects: &Objects, p: u64) -> Vec<u8> {
        (0..PAGE_SIZE as usize)
            .map(|i| self.byte(objects, p, i))
            .collect()
    }

    /// This process's mirror on device `dev`.
    fn mirror(&mut self, driver: &DmirrorDriver, dev: usize) -> Arc<Dmirror> {
        Arc::clone(
            self.mirrors[dev]
                .get_or_insert_with(|| Dmirror::open(driver.device(dev), &self.mm).unwrap()),
        )
    }

    /// Runs a device command on `[at, at + n)` with the process's buffer as `ptr`.
    fn device(
        &mut self,
        driver: &DmirrorDriver,
        dev: usize,
        cmd: DmirrorCmd,
        at: u64,
        n: u64,
    ) -> Result<(), i32> {
        let mut c = HmmDmirrorCmd {
            addr: BASE + at * PAGE_SIZE,
            ptr: OUT,
            npages: n,
            ..Default::default()
        };
        self.mirror(driver, dev)
            .ioctl(cmd, &mut c)
            .map_err(|e| e.ret())
    }

    /// Checks that the process's buffer holds the model's bytes of pages `[at, at + n)`,
    /// as a device command that read them into it (`what`) left it.
    fn check_out(
        &self,
        objects: &Objects,
        at: u64,
        n: u64,
        what: &str,
    ) -> Result<(), TestCaseError> {
        let mut got = vec![0u8; PAGE_SIZE as usize];
        for i in 0..n {
            self.mm.read(page(VirtAddr::new(OUT), i), &mut got).unwrap();
            prop_assert!(
                got == self.page_bytes(objects, at + i),
                "{} page {}",
                what,
                at + i
            );
        }
        Ok(())
    }

    /// What the CPU reads at page `p` of the region.
    fn cpu_page(&self, p: u64) -> Vec<u8> {
        let mut got = vec![0u8; PAGE_SIZE as usize];
        self.mm
            .read(page(VirtAddr::new(BASE), p), &mut got)
            .unwrap();
        got
    }
}

/// Runs `steps`; with `premap`, process 0 starts with the whole region mapped private and
/// writable with `MADV_HUGEPAGE`, so that THPs are common; with `mthp`, write faults map
/// multi-size THPs of 16 to 256 KiB where their aligned range is empty.
fn run(steps: Vec<Step>, thp: bool, premap: bool, mthp: bool) -> Result<(), TestCaseError> {
    let phys = PhysMem::new(PhysConfig::with_size(64 << 20)).unwrap();
    let file = MemFile::new(&phys);
    file.truncate(FILE_PAGES * PAGE_SIZE).unwrap();
    let driver = DmirrorDriver::new(&phys, DmirrorConfig::default());
    let first = Mm::new(phys.clone());
    if thp {
        first.set_thp_mode(ThpMode::Always);
    }
    if mthp {
        for order in 2..=6 {
            first.set_mthp_mode(order, MthpMode::Always).unwrap();
        }
    }
    let rw = Prot::READ | Prot::WRITE;
    let out = first.mmap(
        Some(VirtAddr::new(OUT)),
        DEV_PAGES * PAGE_SIZE,
        rw,
        MapFlags::PRIVATE | MapFlags::FIXED,
    );
    prop_assert_eq!(out, Ok(VirtAddr::new(OUT)));
    let mut procs = vec![Proc {
        mm: first,
        pages: HashMap::new(),
        private: HashMap::new(),
        mirrors: Default::default(),
    }];
    let mut objects = Objects {
        next: FILE + 1,
        ..Objects::default()
    };
    let base = VirtAddr::new(BASE);
    let clamp = |at: u64, n: u64| n.min(PAGES - at);
    let premap = premap.then_some(Step {
        proc: 0,
        op: Op::Mmap {
            at: 0,
            n: PAGES,
            prot: 3,
            shared: false,
        },
    });
    let advise = premap.as_ref().map(|_| Step {
        proc: 0,
        op: Op::HugePage { at: 0, n: PAGES },
    });
    for Step { proc, op } in premap.into_iter().chain(advise).chain(steps) {
        OPS.fetch_add(1, Ordering::Relaxed);
        let me = proc % procs.len();
        match op {
            Op::Mmap {
                at,
                n,
                prot,
                shared,
            }
            | Op::MmapFile {
                at,
                n,
                prot,
                shared,
                ..
            } => {
                let n = clamp(at, n);
                let flags = MapFlags::FIXED
                    | if shared {
                        MapFlags::SHARED
                    } else {
                        MapFlags::PRIVATE
                    };
                let (addr, len, prot) = (Some(page(base, at)), n * PAGE_SIZE, prot_of(prot));
                let file_pgoff = match op {
                    Op::MmapFile { pgoff, .. } => Some(pgoff.min(FILE_PAGES - n.min(FILE_PAGES))),
                    _ => None,
                };
                let pr = &mut procs[me];
                let got = match file_pgoff {
                    Some(pgoff) if n <= FILE_PAGES => {
                        pr.mm
                            .mmap_file(addr, len, prot, flags, &file, pgoff * PAGE_SIZE)
                    }
                    Some(_) => continue,
                    None => pr.mm.mmap(addr, len, prot, flags),
                };
                prop_assert_eq!(got, Ok(page(base, at)));
                pr.unmap(at, n);
                let obj = objects.next;
                objects.next += 1;
                for (i, p) in (at..at + n).enumerate() {
                    let i = i as u64;
                    let source = match (file_pgoff, shared) {
                        (Some(pgoff), true) => Source::Object(FILE, pgoff + i),
                        (Some(pgoff), false) => Source::Private {
                            file: Some(pgoff + i),
                        },
                        (None, true) => Source::Object(obj, i),
                        (None, false) => Source::Private { file: None },
                    };
                    pr.pages.insert(p, ModelPage { prot, source });
                }
            }
            Op::Munmap { at, n } => {
                let n = clamp(at, n);
                let pr = &mut procs[me];
                pr.mm.munmap(page(base, at), n * PAGE_SIZE).unwrap();
                pr.unmap(at, n);
            }
            Op::Mprotect { at, n, prot } => {
                let n = clamp(at, n);
                let pr = &mut procs[me];
                let r = pr.mm.mprotect(page(base, at), n * PAGE_SIZE, prot_of(prot));
                if pr.all_mapped(at, n) {
                    prop_assert!(r.is_ok());
                    for p in at..at + n {
                        pr.pages.get_mut(&p).unwrap().prot = prot_of(prot);
                    }
                } else {
                    prop_assert_eq!(r.unwrap_err().errno(), libc::ENOMEM);
                }
            }
            Op::Mremap { at, n, to } => {
                // A FIXED move that keeps the length (Linux 6.17's `remap_move`): every
                // mapped page moves to its offset in the target, replacing what is there;
                // the target under the source's holes stays; the range must begin mapped.
                let n = clamp(at, n).min(PAGES - to);
                let pr = &mut procs[me];
                let r = pr.mm.mremap(
                    page(base, at),
                    n * PAGE_SIZE,
                    n * PAGE_SIZE,
                    MremapFlags::MAYMOVE | MremapFlags::FIXED,
                    Some(page(base, to)),
                );
                let overlap = at < to + n && to < at + n;
                if overlap {
                    prop_assert_eq!(r.unwrap_err().errno(), libc::EINVAL);
                } else if !pr.pages.contains_key(&at) {
                    prop_assert_eq!(r.unwrap_err().errno(), libc::EFAULT);
                } else {
                    prop_assert_eq!(r, Ok(page(base, to)));
                    for i in 0..n {
                        let Some(mp) = pr.pages.remove(&(at + i)) else {
                            continue;
                        };
                        pr.unmap(to + i, 1);
                        pr.pages.insert(to + i, mp);
                        if let Some(b) = pr.private.remove(&(at + i)) {
                            pr.private.insert(to + i, b);
                        }
                    }
                }
            }
            Op::DontNeed { at, n } => {
                let n = clamp(at, n);
                let pr = &mut procs[me];
                let r = pr
                    .mm
                    .madvise(page(base, at), n * PAGE_SIZE, Advice::DontNeed);
                if pr.all_mapped(at, n) {
                    prop_assert!(r.is_ok());
                    for p in at..at + n {
                        pr.private.remove(&p);
                    }
                } else {
                    prop_assert_eq!(r.unwrap_err().errno(), libc::ENOMEM);
                }
            }
            Op::HugePage { at, n } => {
                let n = clamp(at, n);
                let pr = &procs[me];
                let r = pr
                    .mm
                    .madvise(page(base, at), n * PAGE_SIZE, Advice::HugePage);
                prop_assert_eq!(r.is_ok(), pr.all_mapped(at, n));
            }
            Op::Collapse { pmd } => {
                // Success depends on what is mapped; the bytes must not change either way.
                let _ = procs[me]
                    .mm
                    .madvise(page(base, pmd * 512), PMD_SIZE, Advice::Collapse);
            }
            Op::Write { at, off, len, byte } => {
                let start = BASE + at * PAGE_SIZE + off;
                let len = len.min(BASE + PAGES * PAGE_SIZE - start);
                let pr = &mut procs[me];
                let r = pr.mm.write(VirtAddr::new(start), &vec![byte; len as usize]);
                match pr.check(start, len, true) {
                    Ok(()) => {
                        prop_assert!(r.is_ok(), "{:?}", r);
                        for a in start..start + len {
                            let p = (a - BASE) / PAGE_SIZE;
                            pr.set_byte(&mut objects, p, ((a - BASE) % PAGE_SIZE) as usize, byte);
                        }
                    }
                    Err((addr, cause)) => prop_assert_eq!(
                        r,
                        Err(FaultError::Segv {
                            addr: VirtAddr::new(addr),
                            cause
                        })
                    ),
                }
            }
            Op::Read { at, off, len } => {
                let start = BASE + at * PAGE_SIZE + off;
                let len = len.min(BASE + PAGES * PAGE_SIZE - start);
                let pr = &procs[me];
                let mut buf = vec![0u8; len as usize];
                let r = pr.mm.read(VirtAddr::new(start), &mut buf);
                match pr.check(start, len, false) {
                    Ok(()) => {
                        prop_assert!(r.is_ok(), "{:?}", r);
                        for (i, a) in (start..start + len).enumerate() {
                            let p = (a - BASE) / PAGE_SIZE;
                            let want = pr.byte(&objects, p, ((a - BASE) % PAGE_SIZE) as usize);
                            prop_assert_eq!(buf[i], want, "byte at {:#x}", a);
                        }
                    }
                    Err((addr, cause)) => prop_assert_eq!(
                        r,
                        Err(FaultError::Segv {
                            addr: VirtAddr::new(addr),
                            cause
                        })
                    ),
                }
            }
            Op::Pwrite {
                pgoff,
                off,
                len,
                byte,
            } => {
                let start = pgoff * PAGE_SIZE + off;
                let len = len.min(FILE_PAGES * PAGE_SIZE - start);
                prop_assert_eq!(
                    file.pwrite(start, &vec![byte; len as usize]),
                    Ok(len as usize)
                );
                for a in start..start + len {
                    objects.page((FILE, a / PAGE_SIZE))[(a % PAGE_SIZE) as usize] = byte;
                }
            }
            Op::Pread { pgoff, off, len } => {
                let start = pgoff * PAGE_SIZE + off;
                let len = len.min(FILE_PAGES * PAGE_SIZE - start);
                let mut buf = vec![0u8; len as usize];
                prop_assert_eq!(file.pread(start, &mut buf).unwrap(), len as usize);
                for (i, a) in (start..start + len).enumerate() {
                    let want = objects
                        .bytes
                        .get(&(FILE, a / PAGE_SIZE))
                        .map_or(0, |b| b[(a % PAGE_SIZE) as usize]);
                    prop_assert_eq!(buf[i], want, "file byte {}", a);
                }
            }
            Op::Fork if procs.len() < MAX_PROCS => {
                let pr = &procs[me];
                let child = Proc {
                    mm: pr.mm.fork().unwrap(),
                    pages: pr.pages.clone(),
                    private: pr.private.clone(),
                    mirrors: Default::default(),
                };
                procs.push(child);
            }
            Op::Exit if procs.len() > 1 => {
                procs.remove(me);
            }
            Op::Fork | Op::Exit => {}
            Op::DevRead { dev, at, n } => {
                let n = clamp(at, n);
                let pr = &mut procs[me];
                let r = pr.device(&driver, dev, DmirrorCmd::Read, at, n);
                // A page of a write-only VMA may still be in the device's table from
                // EXCLUSIVE (which needs only write permission); dmirror reads what its
                // table holds without faulting, as test_hmm.c does, so the read may pass.
                let held_from_exclusive = (at..at + n).all(|p| {
                    pr.pages
                        .get(&p)
                        .is_some_and(|mp| mp.prot.intersects(Prot::READ | Prot::WRITE))
                });
                match pr.device_check(at, n, false) {
                    Err((_, errno)) if r.is_err() || !held_from_exclusive => {
                        prop_assert_eq!(r, Err(errno));
                    }
                    _ => {
                        prop_assert_eq!(r, Ok(()));
                        device_ok(0);
                        pr.check_out(&objects, at, n, &format!("device {dev} read"))?;
                    }
                }
            }
            Op::DevWrite { dev, at, n, byte } => {
                let n = clamp(at, n);
                let pr = &mut procs[me];
                let data = vec![byte; (n * PAGE_SIZE) as usize];
                pr.mm.write(VirtAddr::new(OUT), &data).unwrap();
                let r = pr.device(&driver, dev, DmirrorCmd::Write, at, n);
                let written = match pr.device_check(at, n, true) {
                    Ok(()) => {
                        prop_assert_eq!(r, Ok(()));
                        device_ok(1);
                        n
                    }
                    Err((bad, errno)) => {
                        prop_assert_eq!(r, Err(errno));
                        // dmirror_write writes the pages already mirrored writable before
                        // it faults the rest: a prefix of those before the bad page, each
                        // all new or all old (a page whose old bytes were the new ones
                        // counts as written: the two are the same).
                        let k = (at..bad)
                            .take_while(|&p| pr.cpu_page(p).iter().all(|&b| b == byte))
                            .count() as u64;
                        // The rest before the bad page were faulted writable, not written.
                        pr.cow_break(&mut objects, at + k, bad);
                        for p in at + k..bad {
                            prop_assert!(
                                pr.cpu_page(p) == pr.page_bytes(&objects, p),
                                "page {} half written",
                                p
                            );
                        }
                        k
                    }
                };
                for p in at..at + written {
                    for i in 0..PAGE_SIZE as usize {
                        pr.set_byte(&mut objects, p, i, byte);
                    }
                }
            }
            Op::Migrate { dev, at, n, how } => {
                // A migration never changes a byte; what it moved is read back into the
                // buffer (TO_DEV, ON_FAULT_TO_DEV) and compared. Whether it moves a page
                // (shared, file, pinned, another device's) the later reads check.
                let n = clamp(at, n);
                let pr = &mut procs[me];
                let r = pr.device(&driver, dev, how.cmd(), at, n);
                if let Err(errno) = r {
                    prop_assert!(
                        [
                            -libc::EINVAL,
                            -libc::ENOENT,
                            -libc::EFAULT,
                            -libc::EBUSY,
                            -libc::ENOMEM
                        ]
                        .contains(&errno),
                        "{:?}: errno {}",
                        how,
                        errno
                    );
                }
                if r.is_ok() {
                    device_ok(2);
                }
                if r.is_ok() && !matches!(how, Migration::ToSys) {
                    pr.check_out(&objects, at, n, &format!("{how:?} read back"))?;
                }
            }
            Op::Exclusive { dev, at, n } => {
                let n = clamp(at, n);
                let pr = &mut procs[me];
                let r = pr.device(&driver, dev, DmirrorCmd::Exclusive, at, n);
                // make_device_exclusive faults each page writable in turn (breaking COW)
                // and stops at the first it cannot fault or that is not anonymous.
                let bad = (at..at + n)
                    .find(|p| {
                        pr.pages.get(p).map_or(true, |mp| {
                            !mp.prot.contains(Prot::WRITE)
                                || matches!(mp.source, Source::Object(..))
                        })
                    })
                    .unwrap_or(at + n);
                prop_assert_eq!(r.is_ok(), bad == at + n, "exclusive: {:?}", r);
                pr.cow_break(&mut objects, at, bad);
                match r {
                    Ok(()) => {
                        device_ok(3);
                        pr.check_out(&objects, at, n, "EXCLUSIVE read back")?;
                        // The CPU access that read the buffer revoked nothing in the
                        // region; a CPU read of the range does.
                        let mut b = vec![0u8; (n * PAGE_SIZE) as usize];
                        pr.mm.read(page(base, at), &mut b).unwrap();
                        prop_assert_eq!(
                            pr.device(&driver, dev, DmirrorCmd::CheckExclusive, at, n),
                            Ok(())
                        );
                    }
                    Err(errno) => prop_assert!(
                        [
                            -libc::EINVAL,
                            -libc::EFAULT,
                            -libc::EPERM,
                            -libc::EBUSY,
                            -libc::ENOMEM,
                            -libc::EOPNOTSUPP
                        ]
                        .contains(&errno),
                        "exclusive: errno {}",
                        errno
                    ),
                }
            }
        }
    }
    for pr in &procs {
        pr.mm
            .audit()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        MTHP_FAULTS.fetch_add(pr.mm.stats().faults.mthp_anon, Ordering::Relaxed);
    }
    drop(procs);
    drop(file);
    prop_assert_eq!(phys.nr_in_use(), 0);
    for d in driver.devices() {
        prop_assert_eq!(d.nr_in_use(), 0, "device {} memory leaked", d.minor());
    }
    Ok(())
}

/// The property, run by hand rather than by `proptest!` so that the total of operations
/// can be reported (`-- --nocapture` shows it).
#[test]
fn random_operations_agree_with_the_reference_model() {
    let cases = std::env::var("HMM_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let mut config = ProptestConfig::with_cases(cases);
    config.source_file = Some(file!());
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let cases = (
        prop::collection::vec(step(), 1..120),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    );
    let result = runner.run(&cases, |(steps, thp, premap, mthp)| {
        run(steps, thp, premap, mthp)
    });
    let ok: Vec<u64> = DEVICE_OK
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    println!(
        "{} operations against the model; device commands that succeeded and were compared: \
         {} READ, {} WRITE, {} migrations, {} EXCLUSIVE; {} multi-size THP faults",
        OPS.load(Ordering::Relaxed),
        ok[0],
        ok[1],
        ok[2],
        ok[3],
        MTHP_FAULTS.load(Ordering::Relaxed)
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Found by the property: the parent migrates pages to device 1 and exits after a fork;
/// the child reads them through its own mirror of device 1 and writes one from the CPU.
/// The page leaves the device, and the child's mirror, which skips its own device's
/// MIGRATE invalidation, must not keep mapping it (dmirror erased the entry of the
/// parent's mirror only, which had closed).
#[test]
fn a_page_leaving_the_device_leaves_every_mirror_of_it() {
    let s = |proc, op| Step { proc, op };
    let steps = vec![
        s(
            0,
            Op::Migrate {
                dev: 1,
                at: 1,
                n: 8,
                how: Migration::ToDev,
            },
        ),
        s(0, Op::Fork),
        s(2, Op::Exit),
        s(
            0,
            Op::DevRead {
                dev: 1,
                at: 2,
                n: 7,
            },
        ),
        s(
            0,
            Op::Write {
                at: 4,
                off: 1601,
                len: 2496,
                byte: 1,
            },
        ),
        s(
            0,
            Op::DevRead {
                dev: 1,
                at: 2,
                n: 3,
            },
        ),
    ];
    run(steps, false, true, false).unwrap();
}
