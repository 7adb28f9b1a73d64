//! The pieces of the kselftest harness and of `hmm-tests.c` that every case uses: the
//! fixture (`self`: one process with the driver's devices open), the buffer
//! (`struct hmm_buffer`), `hmm_dmirror_cmd`, and the `ASSERT_*` macros as early returns
//! that name the expression, its value and the line, as the harness prints them.
//!
//! A case is `fn(&mut Fixture) -> Result<(), Stop>`. Memory calls the C checks with
//! `ASSERT_EQ(ret, 0)` return `Result` here and are checked with [`check_ok!`]; dmirror
//! commands return the kernel's `0` or `-errno`, so the cases compare errors as the C does
//! (`check_eq!(ret, -EINVAL)`).

use std::ops::Range;
use std::sync::Arc;

use hmm::addr::{VirtAddr, PAGE_SHIFT, PAGE_SIZE};
use hmm::mm::{MapFlags, Mm, Prot, Scalar};
use hmm::phys::{PhysConfig, PhysMem};

use super::Variant;
use crate::{Dmirror, DmirrorCmd, DmirrorConfig, DmirrorDriver};

/// `EPERM`, as the C compares it.
pub(crate) const EPERM: i32 = 1;
/// `ENOENT`.
pub(crate) const ENOENT: i32 = 2;
/// `EFAULT`.
pub(crate) const EFAULT: i32 = 14;
/// `EINVAL`.
pub(crate) const EINVAL: i32 = 22;

/// `HMM_BUFFER_SIZE`: the buffer most cases use (1024 pages).
pub(crate) const HMM_BUFFER_SIZE: u64 = 1024 << 12;
/// `NTIMES`: rounds of the repeated cases.
pub(crate) const NTIMES: u64 = 10;
/// `TWOMEG`.
pub(crate) const TWOMEG: u64 = 1 << 21;
/// Read and write, the mapping most buffers get.
pub(crate) const RW: Prot = Prot::READ.union(Prot::WRITE);
/// `MAP_PRIVATE | MAP_ANONYMOUS`.
pub(crate) const PRIVATE: MapFlags = MapFlags::PRIVATE;

/// The simulated machine each case runs on: RAM for the benchmark's largest buffer, its
/// mirror and the rest; committed by the host only where touched.
const RAM_BYTES: u64 = 1 << 30;

/// Why a case stopped before its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stop {
    /// An assertion failed (`ASSERT_*`): where and what.
    Fail(String),
    /// The case cannot run here (`SKIP`): why.
    Skip(String),
}

/// `ASSERT_EQ(a, b)`: fails the case with both expressions and their values.
macro_rules! check_eq {
    ($a:expr, $b:expr $(,)?) => {{
        let (a, b) = (&$a, &$b);
        if a != b {
            return Err($crate::selftest::Stop::Fail(format!(
                "{}:{}: Expected {} ({:?}) == {} ({:?})",
                file!(),
                line!(),
                stringify!($a),
                a,
                stringify!($b),
                b
            )));
        }
    }};
}

/// `ASSERT_NE(a, b)`.
macro_rules! check_ne {
    ($a:expr, $b:expr $(,)?) => {{
        let (a, b) = (&$a, &$b);
        if a == b {
            return Err($crate::selftest::Stop::Fail(format!(
                "{}:{}: Expected {} ({:?}) != {} ({:?})",
                file!(),
                line!(),
                stringify!($a),
                a,
                stringify!($b),
                b
            )));
        }
    }};
}

/// `ASSERT_EQ(call, 0)` for a call that returns `Result`: the value, or the case fails
/// with the call and its error.
macro_rules! check_ok {
    ($e:expr $(,)?) => {
        match $e {
            Ok(v) => v,
            Err(e) => {
                return Err($crate::selftest::Stop::Fail(format!(
                    "{}:{}: {} failed: {}",
                    file!(),
                    line!(),
                    stringify!($e),
                    e
                )))
            }
        }
    };
}

/// `SKIP(return, why)`.
macro_rules! skip {
    ($($why:tt)+) => {
        return Err($crate::selftest::Stop::Skip(format!($($why)+)))
    };
}

/// The fixture: the kernel's `FIXTURE(hmm)` / `FIXTURE(hmm2)` state (`self`) plus what the
/// kernel provides around it: a machine with the driver loaded (`test_hmm.ko`, devices 0
/// and 1 private, 2 and 3 coherent) and one hugetlb page in the pool
/// (`HUGETLB_SETUP_DEFAULT_PAGES(1)`), and the test's process (the harness forks one per
/// test).
pub(crate) struct Fixture {
    /// The test's process.
    pub(crate) mm: Arc<Mm>,
    /// The device files this fixture opened: one for `hmm` (`self->fd`), two for `hmm2`
    /// (`self->fd0`, `self->fd1`).
    fds: Vec<Arc<Dmirror>>,
    variant: Variant,
    /// `self->page_size`.
    pub(crate) page_size: u64,
    /// `self->page_shift`.
    pub(crate) page_shift: u32,
    /// The largest buffer the benchmark may use.
    pub(crate) bench_max_bytes: u64,
    /// Lines the case printed (`printf` in the C).
    pub(crate) log: Vec<String>,
    driver: DmirrorDriver,
    phys: Arc<PhysMem>,
}

impl Fixture {
    /// `FIXTURE_SETUP`: a machine, the driver, the process, and the devices `units` open.
    pub(crate) fn setup(
        variant: Variant,
        units: &[usize],
        bench_max_bytes: u64,
    ) -> Result<Fixture, String> {
        let phys = PhysMem::new(PhysConfig::with_size(RAM_BYTES))
            .map_err(|e| format!("no machine: {e}"))?;
        phys.set_nr_hugepages(1);
        let driver = DmirrorDriver::new(&phys, DmirrorConfig::default());
        let mm = Mm::new(Arc::clone(&phys));
        let fds = units
            .iter()
            .map(|&u| Dmirror::open(driver.device(u), &mm))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("could not open hmm dmirror driver: {e}"))?;
        Ok(Fixture {
            mm,
            fds,
            variant,
            page_size: PAGE_SIZE,
            page_shift: PAGE_SHIFT,
            bench_max_bytes,
            log: Vec::new(),
            driver,
            phys,
        })
    }

    /// `FIXTURE_TEARDOWN` and the process's exit: closes the devices, ends the process,
    /// unloads the driver; returns the frames still in use afterwards (none, or they
    /// leaked).
    pub(crate) fn teardown(self) -> u64 {
        let Fixture {
            mm,
            fds,
            driver,
            phys,
            ..
        } = self;
        drop(fds);
        drop(mm);
        drop(driver);
        phys.nr_in_use()
    }

    /// `self->fd`: the `hmm` fixture's device.
    pub(crate) fn fd(&self) -> &Arc<Dmirror> {
        &self.fds[0]
    }

    /// `self->fd0`: the `hmm2` fixture's first device.
    pub(crate) fn fd0(&self) -> &Arc<Dmirror> {
        &self.fds[0]
    }

    /// `self->fd1`: the `hmm2` fixture's second device.
    pub(crate) fn fd1(&self) -> &Arc<Dmirror> {
        &self.fds[1]
    }

    /// `hmm_is_coherent_type(variant->device_number)`.
    pub(crate) fn coherent(&self) -> bool {
        self.variant == Variant::DeviceCoherent
    }

    /// The machine's RAM.
    pub(crate) fn phys(&self) -> &Arc<PhysMem> {
        &self.phys
    }

    /// `hmm_open(unit)` for the process `mm`: a new open of the device, as a child opens
    /// its own mirror.
    pub(crate) fn open(&self, unit: usize, mm: &Arc<Mm>) -> Result<Arc<Dmirror>, Stop> {
        Dmirror::open(self.driver.device(unit), mm).map_err(|e| {
            Stop::Fail(format!(
                "could not open hmm dmirror driver ({}): {e}",
                dev_path(unit)
            ))
        })
    }

    /// `hugetlb_free_default_pages()`: free pages in the hugetlb pool.
    pub(crate) fn hugetlb_free_pages(&self) -> u64 {
        self.phys.hugetlb().free
    }

    /// `printf` of a case: a line of its output.
    pub(crate) fn print(&mut self, line: String) {
        self.log.push(line);
    }

    /// A buffer of `size` bytes at `ptr` (already mapped) with a private anonymous mirror
    /// of `mirror_size` bytes (`malloc` in the C), filled with `fill`.
    pub(crate) fn buffer(
        &self,
        ptr: VirtAddr,
        size: u64,
        mirror_size: u64,
        fill: u8,
    ) -> Result<Buffer, Stop> {
        let mirror = check_ok!(self.mm.mmap(None, mirror_size.max(1), RW, PRIVATE));
        if fill != 0 {
            check_ok!(self.mm.write(mirror, &vec![fill; mirror_size as usize]));
        }
        Ok(Buffer {
            ptr,
            mirror,
            size,
            mirror_size: mirror_size.max(1),
            cpages: 0,
            faults: 0,
        })
    }

    /// `hmm_buffer_free`: unmaps `ptr` (`size` bytes) and the mirror.
    pub(crate) fn free(&self, b: Buffer) -> Result<(), Stop> {
        if b.ptr != VirtAddr::ZERO {
            check_ok!(self.mm.munmap(b.ptr, b.size));
        }
        check_ok!(self.mm.munmap(b.mirror, b.mirror_size));
        Ok(())
    }
}

/// `/dev/hmm_dmirrorN`.
pub(crate) fn dev_path(unit: usize) -> String {
    format!("/dev/hmm_dmirror{unit}")
}

/// `struct hmm_buffer`: the range the device works on and the user buffer its commands
/// read from or write to. A clone is a forked child's copy of the struct.
#[derive(Debug, Clone)]
pub(crate) struct Buffer {
    /// `buffer->ptr`: the range.
    pub(crate) ptr: VirtAddr,
    /// `buffer->mirror`: the command's user buffer.
    pub(crate) mirror: VirtAddr,
    /// `buffer->size`: what [`Fixture::free`] unmaps at `ptr`.
    pub(crate) size: u64,
    mirror_size: u64,
    /// `buffer->cpages` of the last command that succeeded.
    pub(crate) cpages: u64,
    /// `buffer->faults` of the last command that succeeded.
    pub(crate) faults: u64,
}

/// `hmm_dmirror_cmd`: runs `which` on `fd` over `npages` at `b.ptr` with `b.mirror` as the
/// user buffer; `0` (and `cpages`/`faults` copied into `b`) or `-errno`.
pub(crate) fn cmd(fd: &Dmirror, which: DmirrorCmd, b: &mut Buffer, npages: u64) -> i32 {
    match fd.run(which, b.ptr, npages, b.mirror) {
        Ok(done) => {
            b.cpages = done.cpages;
            b.faults = done.faults;
            0
        }
        Err(e) => e.ret(),
    }
}

/// `hmm_migrate_sys_to_dev`.
pub(crate) fn migrate_sys_to_dev(fd: &Dmirror, b: &mut Buffer, npages: u64) -> i32 {
    cmd(fd, DmirrorCmd::MigrateToDev, b, npages)
}

/// `hmm_migrate_dev_to_sys`.
pub(crate) fn migrate_dev_to_sys(fd: &Dmirror, b: &mut Buffer, npages: u64) -> i32 {
    cmd(fd, DmirrorCmd::MigrateToSys, b, npages)
}

/// `ALIGN(x, a)` for a power-of-two `a`.
pub(crate) fn align(x: VirtAddr, a: u64) -> VirtAddr {
    VirtAddr::new((x.as_u64() + a - 1) & !(a - 1))
}

/// `for (i = r.start; i < r.end; ++i) ptr[i] = f(i);` with `ptr` an `int *` at `base`:
/// CPU stores through the fault path, one call per piece.
pub(crate) fn fill(
    mm: &Mm,
    base: VirtAddr,
    r: Range<u64>,
    f: impl Fn(u64) -> i32,
) -> Result<(), Stop> {
    for p in pieces(r) {
        let vals: Vec<i32> = p.clone().map(&f).collect();
        check_ok!(mm.write_slice(base + p.start * 4, &vals));
    }
    Ok(())
}

/// `r` in pieces of at most 16384 ints (64 KiB), so no host buffer grows with the range.
fn pieces(r: Range<u64>) -> impl Iterator<Item = Range<u64>> {
    const PIECE: u64 = 1 << 14;
    r.clone()
        .step_by(PIECE as usize)
        .map(move |i| i..(i + PIECE).min(r.end))
}

/// `for (i = r.start; i < r.end; ++i) ASSERT_EQ(ptr[i], f(i));` with `ptr` named `what`:
/// CPU loads through the fault path; the first mismatch fails the case.
pub(crate) fn expect(
    mm: &Mm,
    what: &str,
    base: VirtAddr,
    r: Range<u64>,
    f: impl Fn(u64) -> i32,
) -> Result<(), Stop> {
    let mut vals = Vec::new();
    for p in pieces(r) {
        vals.resize((p.end - p.start) as usize, 0);
        if let Err(e) = mm.read_slice(base + p.start * 4, &mut vals) {
            return Err(Stop::Fail(format!("reading {what}[{p:?}]: {e}")));
        }
        for (j, &got) in p.zip(&vals) {
            if got != f(j) {
                return Err(Stop::Fail(format!(
                    "Expected {what}[{j}] ({got}) == {}",
                    f(j)
                )));
            }
        }
    }
    Ok(())
}

/// One CPU load (`*(T *)addr`).
pub(crate) fn load<T: Scalar>(mm: &Mm, addr: VirtAddr) -> Result<T, Stop> {
    mm.read_val(addr)
        .map_err(|e| Stop::Fail(format!("load at {addr}: {e}")))
}

/// One CPU store (`*(T *)addr = v`).
pub(crate) fn store<T: Scalar>(mm: &Mm, addr: VirtAddr, v: T) -> Result<(), Stop> {
    mm.write_val(addr, v)
        .map_err(|e| Stop::Fail(format!("store at {addr}: {e}")))
}

/// The bytes of `len` at `addr` (the snapshot a command wrote, `unsigned char *m`).
pub(crate) fn bytes(mm: &Mm, addr: VirtAddr, len: u64) -> Result<Vec<u8>, Stop> {
    let mut b = vec![0u8; len as usize];
    mm.read(addr, &mut b)
        .map_err(|e| Stop::Fail(format!("reading {len} bytes at {addr}: {e}")))?;
    Ok(b)
}
