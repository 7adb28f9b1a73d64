//! Fault injection: system RAM and device memory allocations fail at every point of every
//! migration step, one at a time, and every byte survives; then devices are removed in the
//! middle of a run while allocations fail at random.
//!
//! The sweep runs each step once with counting on to learn how many allocations it makes
//! (its failure points), then once per point on a fresh machine with exactly that
//! allocation failing (`fail_nth`). After each run, with injection off: the step's result
//! is success or the out-of-memory error it may give; every device table maps only what
//! the process maps; the step runs again to success (the failure lost nothing that a
//! retry needs); every byte of both processes reads back; the audit passes; and once
//! everything is torn down no RAM or device frame is left allocated.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::{assert_maps_only_what_the_process_maps, page, pattern, rig, Rig};
use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::fault_inject::{FaultAttr, FaultConfig};
use hmm::mm::{FaultError, Mm};
use hmm_dmirror::{Dmirror, DmirrorCmd, DmirrorError};

/// Pages of the range every step works on.
const N: u64 = 16;

/// The range, laid out so that one step meets every kind of page:
///
/// | pages  | state                                                   |
/// |--------|---------------------------------------------------------|
/// | 0..4   | written, private to the parent                          |
/// | 4..6   | never touched (holes)                                   |
/// | 6..8   | read-faulted (the zero page)                            |
/// | 8..12  | written before a fork: shared copy-on-write with `child` |
/// | 12..16 | written, then migrated to device 0                      |
struct World {
    r: Rig,
    d: [Arc<Dmirror>; 2],
    a: VirtAddr,
    child: Arc<Mm>,
    /// What the parent's range must hold.
    bytes: Vec<u8>,
}

fn world() -> World {
    let r = rig();
    let d = [r.open(0), r.open(1)];
    let a = r.map(N);
    let data = pattern(N, 0x5a);
    let span =
        |p: std::ops::Range<u64>| (p.start * PAGE_SIZE) as usize..(p.end * PAGE_SIZE) as usize;
    let mut bytes = vec![0u8; data.len()];
    let mut write = |p: std::ops::Range<u64>| {
        r.mm.write(page(a, p.start), &data[span(p.clone())])
            .unwrap();
        bytes[span(p.clone())].copy_from_slice(&data[span(p)]);
    };
    write(8..12);
    let child = r.mm.fork().unwrap();
    write(0..4);
    write(12..16);
    let mut zero = [0u8; 1];
    for p in 6..8 {
        r.mm.read(page(a, p), &mut zero).unwrap();
    }
    assert_eq!(
        r.run(&d[0], DmirrorCmd::MigrateToDev, page(a, 12), 4)
            .unwrap()
            .cpages,
        4
    );
    // The buffer holds the range's bytes, for the steps that write them back.
    r.mm.write(r.buf, &bytes).unwrap();
    World {
        r,
        d,
        a,
        child,
        bytes,
    }
}

impl World {
    /// What the child's range must hold: the pages it shares, zeros elsewhere.
    fn child_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.bytes.len()];
        let shared = (8 * PAGE_SIZE) as usize..(12 * PAGE_SIZE) as usize;
        b[shared.clone()].copy_from_slice(&self.bytes[shared]);
        b
    }

    /// The injection point of `target`.
    fn attr(&self, target: Target) -> &FaultAttr {
        match target {
            Target::Ram => self.r.phys.fail_page_alloc(),
            Target::Device(minor) => self.r.driver.device(minor).fail_alloc(),
        }
    }

    /// Runs a dmirror command over the whole range.
    fn cmd(&self, dev: usize, which: DmirrorCmd) -> Result<(), Failure> {
        self.r
            .run(&self.d[dev], which, self.a, N)
            .map(|_| ())
            .map_err(Failure::from)
    }

    /// Everything a failed step must have kept: the device tables, every byte of both
    /// processes, the audits; then the teardown frees every frame.
    fn check_and_tear_down(self, what: &str) {
        for d in &self.d {
            assert_maps_only_what_the_process_maps(d, &self.r.mm, self.a, N);
        }
        let mut got = vec![0u8; self.bytes.len()];
        self.r.mm.read(self.a, &mut got).unwrap();
        assert!(got == self.bytes, "{what}: the parent's bytes changed");
        self.child.read(self.a, &mut got).unwrap();
        assert!(
            got == self.child_bytes(),
            "{what}: the child's bytes changed"
        );
        self.r.mm.audit().unwrap();
        self.child.audit().unwrap();
        let World { r, d, child, .. } = self;
        drop((d, child));
        let Rig {
            phys, driver, mm, ..
        } = r;
        drop(mm);
        for dev in driver.devices() {
            assert_eq!(dev.nr_in_use(), 0, "{what}: device {} leaked", dev.minor());
        }
        drop(driver);
        assert_eq!(phys.nr_in_use(), 0, "{what}: RAM frames leaked");
    }
}

/// Whose allocations fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// System RAM (`fail_page_alloc`).
    Ram,
    /// A device's memory.
    Device(usize),
}

const TARGETS: [Target; 3] = [Target::Ram, Target::Device(0), Target::Device(1)];

/// How a step failed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// Out of memory, in whatever type the entry point reports it.
    NoMem,
    /// dmirror's read-back found a page the device does not map (`-ENOENT`): a page that
    /// could not migrate.
    NoEnt,
    /// Anything else.
    Other(String),
}

impl From<DmirrorError> for Failure {
    fn from(e: DmirrorError) -> Self {
        match e {
            DmirrorError::NoMem => Failure::NoMem,
            DmirrorError::NoEnt => Failure::NoEnt,
            e => Failure::Other(e.to_string()),
        }
    }
}

impl From<FaultError> for Failure {
    fn from(e: FaultError) -> Self {
        match e {
            FaultError::Oom { .. } => Failure::NoMem,
            e => Failure::Other(e.to_string()),
        }
    }
}

/// One step of a migration (or an access that migrates), run on the whole range.
struct Step {
    name: &'static str,
    run: fn(&World) -> Result<(), Failure>,
}

const STEPS: &[Step] = &[
    Step {
        name: "MIGRATE_TO_DEV to device 0 (its own pages stay)",
        run: |w| w.cmd(0, DmirrorCmd::MigrateToDev),
    },
    Step {
        name: "MIGRATE_TO_DEV to device 1 (device 0's pages stay)",
        run: |w| w.cmd(1, DmirrorCmd::MigrateToDev),
    },
    Step {
        name: "MIGRATE_ON_FAULT_TO_DEV to device 1",
        run: |w| w.cmd(1, DmirrorCmd::MigrateOnFaultToDev),
    },
    Step {
        name: "MIGRATE_TO_SYS from device 0",
        run: |w| w.cmd(0, DmirrorCmd::MigrateToSys),
    },
    Step {
        name: "RELEASE of device 0 (device removal)",
        run: |w| w.cmd(0, DmirrorCmd::Release),
    },
    Step {
        name: "CPU read (migrate_to_ram)",
        run: |w| {
            let mut b = vec![0u8; w.bytes.len()];
            w.r.mm.read(w.a, &mut b).map_err(Failure::from)
        },
    },
    Step {
        name: "CPU write of the same bytes (faults, COW, migrate_to_ram)",
        run: |w| w.r.mm.write(w.a, &w.bytes).map_err(Failure::from),
    },
    Step {
        name: "device 1 READ (faults device 0's pages home)",
        run: |w| w.cmd(1, DmirrorCmd::Read),
    },
    Step {
        name: "device 1 WRITE of the same bytes",
        run: |w| w.cmd(1, DmirrorCmd::Write),
    },
    Step {
        name: "device 1 EXCLUSIVE",
        run: |w| w.cmd(1, DmirrorCmd::Exclusive),
    },
];

#[test]
fn every_allocation_of_every_step_can_fail_and_no_byte_is_lost() {
    let mut points = 0;
    for step in STEPS {
        // What the step gives when nothing fails.
        let clean = {
            let w = world();
            let r = (step.run)(&w);
            w.check_and_tear_down(step.name);
            r
        };
        let mut step_points = 0;
        for target in TARGETS {
            let calls = {
                let w = world();
                w.attr(target).set(FaultConfig::counting()).unwrap();
                assert_eq!(
                    (step.run)(&w),
                    clean,
                    "{}: counting changed the result",
                    step.name
                );
                let calls = w.attr(target).stats().calls;
                w.attr(target).disable();
                w.check_and_tear_down(step.name);
                calls
            };
            for n in 1..=calls {
                let what = format!(
                    "{} with {target:?} allocation {n} of {calls} failing",
                    step.name
                );
                let w = world();
                w.attr(target).fail_nth(n);
                let r = (step.run)(&w);
                let injected = w.attr(target).stats().injected;
                w.attr(target).disable();
                assert_eq!(injected, 1, "{what}: the allocation was not reached");
                assert!(
                    r == clean || matches!(r, Err(Failure::NoMem | Failure::NoEnt)),
                    "{what}: {r:?}"
                );
                // The failure left nothing a retry would trip over.
                assert_eq!((step.run)(&w), clean, "{what}: the retry");
                w.check_and_tear_down(&what);
            }
            println!("{:<60} {target:?}: {calls} allocations", step.name);
            step_points += calls;
        }
        assert!(step_points > 0, "{}: no allocation to fail", step.name);
        points += step_points;
    }
    println!("{points} failure points, each failed once, every byte intact");
}

/// Retries `op` while it fails for lack of memory (injected), counting the retries.
fn until_not_oom<T>(retries: &AtomicU64, mut op: impl FnMut() -> Result<T, FaultError>) -> T {
    loop {
        match op() {
            Ok(v) => return v,
            Err(FaultError::Oom { .. }) => {
                retries.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Real threads, with allocations failing at random everywhere: a CPU thread writes and
/// reads back every page (a store that runs out of memory is retried, since the process
/// decides what its pages hold), a migrator moves runs of pages to both devices and back,
/// device 1 reads, and a remover takes each device's memory away (RELEASE, as
/// module unload or device removal does) again and again. At the end every page holds the
/// last version written, nothing is mapped stale, and no frame is left.
#[test]
fn devices_are_removed_mid_run_while_allocations_fail_at_random() {
    const PAGES: u64 = 32;
    let r = rig();
    let d = [r.open(0), r.open(1)];
    let a = r.map(PAGES);
    let bufs = [r.map(PAGES), r.map(PAGES)];
    let va = |i: u64| page(a, i);
    for i in 0..PAGES {
        r.mm.write_val(va(i), common::word(i, 0)).unwrap();
    }
    for b in bufs {
        r.mm.write(b, &vec![0u8; (PAGES * PAGE_SIZE) as usize])
            .unwrap();
    }
    r.phys
        .fail_page_alloc()
        .set(FaultConfig::random(10, 1))
        .unwrap();
    for (minor, seed) in [(0, 2), (1, 3)] {
        r.driver
            .device(minor)
            .fail_alloc()
            .set(FaultConfig::random(25, seed))
            .unwrap();
    }
    let versions: Vec<AtomicU64> = (0..PAGES).map(|_| AtomicU64::new(0)).collect();
    let stop = AtomicBool::new(false);
    let [cpu_retries, removals, migrations, reads] = [0; 4].map(AtomicU64::new);
    // The CPU goes on until every other thread has done this much, at least.
    let enough = common::iters();
    let cmd = |dev: usize, which: DmirrorCmd, at: VirtAddr, n: u64, buf: VirtAddr| {
        let mut c = hmm_dmirror::HmmDmirrorCmd {
            addr: at.as_u64(),
            ptr: buf.as_u64(),
            npages: n,
            ..Default::default()
        };
        d[dev].ioctl(which, &mut c)
    };
    let rounds = std::thread::scope(|s| {
        let cpu = s.spawn(|| {
            let mut round = 0;
            while round < 4
                || migrations.load(Ordering::Relaxed) < enough
                || reads.load(Ordering::Relaxed) < enough / 4
                || removals.load(Ordering::Relaxed) < enough / 4
            {
                round += 1;
                for i in 0..PAGES {
                    until_not_oom(&cpu_retries, || {
                        r.mm.write_val(va(i), common::word(i, round))
                    });
                    versions[i as usize].store(round, Ordering::Release);
                    let back: u64 = until_not_oom(&cpu_retries, || r.mm.read_val(va(i)));
                    assert_eq!(back, common::word(i, round), "page {i}");
                }
            }
            stop.store(true, Ordering::Release);
            round
        });
        s.spawn(|| {
            let mut k = 0u64;
            while !stop.load(Ordering::Acquire) {
                k += 1;
                let (first, n) = (k * 5 % PAGES, 1 + k % 8);
                let n = n.min(PAGES - first);
                let which = match k % 3 {
                    0 => DmirrorCmd::MigrateToDev,
                    1 => DmirrorCmd::MigrateOnFaultToDev,
                    _ => DmirrorCmd::MigrateToSys,
                };
                let dev = (k / 3 % 2) as usize;
                match cmd(dev, which, va(first), n, bufs[0]) {
                    Ok(()) | Err(DmirrorError::NoMem | DmirrorError::NoEnt) => {}
                    // A removal held the pages (they were moving home): retry later.
                    Err(DmirrorError::Busy) => {}
                    Err(e) => panic!("device {dev} {which:?}: {e}"),
                }
                migrations.fetch_add(1, Ordering::Relaxed);
            }
        });
        s.spawn(|| {
            while !stop.load(Ordering::Acquire) {
                let floor: Vec<u64> = versions.iter().map(|v| v.load(Ordering::Acquire)).collect();
                match cmd(1, DmirrorCmd::Read, a, PAGES, bufs[1]) {
                    Ok(()) => {}
                    Err(DmirrorError::NoMem | DmirrorError::Busy) => continue,
                    Err(e) => panic!("device read: {e}"),
                }
                reads.fetch_add(1, Ordering::Relaxed);
                for i in 0..PAGES {
                    let w: u64 = r.mm.read_val(page(bufs[1], i)).unwrap();
                    assert_eq!(w >> 32, i, "page {i} holds another page's data");
                    assert!(
                        w & 0xffff_ffff >= floor[i as usize],
                        "page {i}: stale version"
                    );
                }
            }
        });
        s.spawn(|| {
            let mut k = 0;
            while !stop.load(Ordering::Acquire) {
                k += 1;
                match r.driver.device(k % 2).release() {
                    Ok(_) => {
                        removals.fetch_add(1, Ordering::Relaxed);
                    }
                    // No RAM to evict into, or pages held by a migration in flight: the
                    // device keeps what it could not move.
                    Err(DmirrorError::NoMem | DmirrorError::Busy) => {}
                    Err(e) => panic!("release: {e}"),
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        });
        cpu.join().expect("the CPU thread")
    });
    let injected = [
        r.phys.fail_page_alloc().stats().injected,
        r.driver.device(0).fail_alloc().stats().injected,
        r.driver.device(1).fail_alloc().stats().injected,
    ];
    r.phys.fail_page_alloc().disable();
    for dev in r.driver.devices() {
        dev.fail_alloc().disable();
    }
    println!(
        "{rounds} rounds: {} migrations, {} device reads, {} device removals, {} CPU retries; \
         injected failures: RAM {}, device 0 {}, device 1 {}",
        migrations.into_inner(),
        reads.into_inner(),
        removals.load(Ordering::Relaxed),
        cpu_retries.into_inner(),
        injected[0],
        injected[1],
        injected[2]
    );
    assert!(removals.into_inner() > 0, "no removal completed");
    assert!(
        injected.iter().all(|&n| n > 0),
        "every injection point fired: {injected:?}"
    );
    for dev in &d {
        assert_maps_only_what_the_process_maps(dev, &r.mm, a, PAGES);
    }
    for i in 0..PAGES {
        assert_eq!(
            r.mm.read_val::<u64>(va(i)).unwrap(),
            common::word(i, rounds),
            "page {i}"
        );
    }
    r.mm.audit().unwrap();
    for dev in r.driver.devices() {
        dev.release().unwrap();
        assert_eq!(dev.nr_in_use(), 0, "device {} kept pages", dev.minor());
    }
    let Rig {
        phys, driver, mm, ..
    } = r;
    drop((d, mm, driver));
    assert_eq!(phys.nr_in_use(), 0, "RAM frames leaked");
}
