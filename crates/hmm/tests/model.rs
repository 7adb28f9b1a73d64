//! Property test: random sequences of mmap / munmap / mprotect / madvise / read / write
//! agree with a byte-level reference model, and every run ends with a clean audit.

mod common;

use std::collections::HashMap;

use proptest::prelude::*;

use common::{page, Machine};
use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::mm::{Advice, FaultError, MapFlags, Prot, SegvCause};

const BASE: u64 = 0x1000_0000;
const PAGES: u64 = 24;

#[derive(Debug, Clone)]
enum Op {
    Mmap {
        at: u64,
        n: u64,
        prot: u32,
        shared: bool,
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
    DontNeed {
        at: u64,
        n: u64,
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
}

fn op() -> impl Strategy<Value = Op> {
    let at = 0..PAGES;
    let n = 1..6u64;
    prop_oneof![
        (at.clone(), n.clone(), 0..4u32, any::<bool>()).prop_map(|(at, n, prot, shared)| {
            Op::Mmap {
                at,
                n,
                prot,
                shared,
            }
        }),
        (at.clone(), n.clone()).prop_map(|(at, n)| Op::Munmap { at, n }),
        (at.clone(), n.clone(), 0..4u32).prop_map(|(at, n, prot)| Op::Mprotect { at, n, prot }),
        (at.clone(), n.clone()).prop_map(|(at, n)| Op::DontNeed { at, n }),
        (at.clone(), 0..PAGE_SIZE, 1..3 * PAGE_SIZE, any::<u8>())
            .prop_map(|(at, off, len, byte)| Op::Write { at, off, len, byte }),
        (at, 0..PAGE_SIZE, 1..3 * PAGE_SIZE).prop_map(|(at, off, len)| Op::Read { at, off, len }),
    ]
}

fn prot_of(p: u32) -> Prot {
    Prot::from_bits_truncate(p)
}

/// One page of the model: its protection and where its bytes live.
#[derive(Clone)]
struct ModelPage {
    prot: Prot,
    /// `Some((object, page offset))` for shared memory.
    shared: Option<(u64, u64)>,
}

#[derive(Default)]
struct Model {
    pages: HashMap<u64, ModelPage>,
    private: HashMap<u64, Vec<u8>>,
    objects: HashMap<(u64, u64), Vec<u8>>,
    next_object: u64,
}

impl Model {
    fn bytes(&mut self, p: u64) -> &mut Vec<u8> {
        let zero = || vec![0u8; PAGE_SIZE as usize];
        match self.pages[&p].shared {
            Some(key) => self.objects.entry(key).or_insert_with(zero),
            None => self.private.entry(p).or_insert_with(zero),
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
        let end = start + len;
        let mut a = start;
        while a < end {
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
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let m = Machine::new(16);
    let mut model = Model::default();
    let base = VirtAddr::new(BASE);
    for op in ops {
        match op {
            Op::Mmap {
                at,
                n,
                prot,
                shared,
            } => {
                let n = n.min(PAGES - at);
                let flags = if shared {
                    MapFlags::SHARED
                } else {
                    MapFlags::PRIVATE
                };
                let got =
                    m.mm.mmap(
                        Some(page(base, at)),
                        n * PAGE_SIZE,
                        prot_of(prot),
                        flags | MapFlags::FIXED,
                    )
                    .unwrap();
                prop_assert_eq!(got, page(base, at));
                model.unmap(at, n);
                let obj = model.next_object;
                model.next_object += 1;
                for (i, p) in (at..at + n).enumerate() {
                    let shared = shared.then_some((obj, i as u64));
                    model.pages.insert(
                        p,
                        ModelPage {
                            prot: prot_of(prot),
                            shared,
                        },
                    );
                }
            }
            Op::Munmap { at, n } => {
                let n = n.min(PAGES - at);
                m.mm.munmap(page(base, at), n * PAGE_SIZE).unwrap();
                model.unmap(at, n);
            }
            Op::Mprotect { at, n, prot } => {
                let n = n.min(PAGES - at);
                let r = m.mm.mprotect(page(base, at), n * PAGE_SIZE, prot_of(prot));
                if model.all_mapped(at, n) {
                    prop_assert!(r.is_ok());
                    for p in at..at + n {
                        model.pages.get_mut(&p).unwrap().prot = prot_of(prot);
                    }
                } else {
                    prop_assert_eq!(r.unwrap_err().errno(), libc::ENOMEM);
                }
            }
            Op::DontNeed { at, n } => {
                let n = n.min(PAGES - at);
                let r =
                    m.mm.madvise(page(base, at), n * PAGE_SIZE, Advice::DontNeed);
                if model.all_mapped(at, n) {
                    prop_assert!(r.is_ok());
                    for p in at..at + n {
                        model.private.remove(&p);
                    }
                } else {
                    prop_assert_eq!(r.unwrap_err().errno(), libc::ENOMEM);
                }
            }
            Op::Write { at, off, len, byte } => {
                let start = BASE + at * PAGE_SIZE + off;
                let len = len.min(BASE + PAGES * PAGE_SIZE - start);
                let data = vec![byte; len as usize];
                let r = m.mm.write(VirtAddr::new(start), &data);
                match model.check(start, len, true) {
                    Ok(()) => {
                        prop_assert!(r.is_ok(), "{:?}", r);
                        for a in start..start + len {
                            let p = (a - BASE) / PAGE_SIZE;
                            model.bytes(p)[((a - BASE) % PAGE_SIZE) as usize] = byte;
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
                let mut buf = vec![0u8; len as usize];
                let r = m.mm.read(VirtAddr::new(start), &mut buf);
                match model.check(start, len, false) {
                    Ok(()) => {
                        prop_assert!(r.is_ok(), "{:?}", r);
                        for (i, a) in (start..start + len).enumerate() {
                            let p = (a - BASE) / PAGE_SIZE;
                            let want = model.bytes(p)[((a - BASE) % PAGE_SIZE) as usize];
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
        }
    }
    let report =
        m.mm.audit()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(m.phys.nr_in_use(), report.frames_referenced);
    let phys = m.phys.clone();
    drop(m);
    prop_assert_eq!(phys.nr_in_use(), 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("HMM_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn random_operations_agree_with_the_reference_model(ops in prop::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}
