//! The kernel's `tools/testing/selftests/mm/cow.c`, ported: copy-on-write after `fork`,
//! with and without GUP references (`vmsplice`) and pins (R/O long-term pins, io_uring's
//! R/W long-term pins), on every kind of memory the model has. No modification may leak
//! between parent and child, and a page pinned for a device stays the page the process
//! writes.
//!
//! Each test is one case of the file run on each of its memory kinds, in the file's order;
//! a failure names the case and the kind, swapped-out kinds included; the THP kinds run at
//! every size, the PMD size and each multi-size THP from 1 MiB down to 16 KiB, as the C
//! runs them for every size the kernel offers; the hugetlb kinds run at each hugetlb size
//! of [`common::hugetlb_sizes`] (2 MiB, and 1 GiB with `HMM_HUGETLB_1G` set, as CI runs
//! them in a release build). `docs/mm-selftests.md` lists what the model cannot express.
//! The non-anonymous cases run on the shared zero page, a memfd page, the huge zero page
//! and a hugetlb memfd page of each hugetlb size.
//!
//! How the C's kernel interfaces map here: `fork` is [`Mm::fork`], the child's steps run
//! where the C's pipes order them; `vmsplice` takes GUP references ([`Mm::get_user_pages`],
//! as `iov_iter_get_pages` does) and reading the pipe reads the referenced pages; the
//! `gup_test` module's `PIN_LONGTERM_TEST_*` is a read-only long-term pin
//! ([`Mm::pin_user_pages`] with `LONGTERM`); an io_uring fixed buffer is a read-write
//! long-term pin, and its `write_fixed` reads the pinned pages; GUP-fast is the same walk.

mod common;

use std::sync::Arc;

use common::{hugetlb_machine, hugetlb_sizes, map_huge, page, Machine, RW};
use hmm::addr::{VirtAddr, PAGE_SIZE, PMD_ORDER, PMD_SIZE};
use hmm::mm::{
    Advice, GupFlags, MapFlags, MemFile, Mm, MremapFlags, MthpMode, Prot, ThpMode, UserPages,
    MTHP_MAX_ORDER, MTHP_MIN_ORDER,
};
use hmm::phys::HugetlbSize;

/// What the C's `memcmp` of a snapshot compares, without a copy of the bytes: a digest of
/// them, taken a piece at a time, so that a 1 GiB kind holds no GiB-sized buffer (every
/// byte of it is still read and compared through the digest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Digest(u64);

impl Digest {
    fn new() -> Digest {
        Digest(0xcbf2_9ce4_8422_2325)
    }

    /// Folds in `bytes` (a multiple of 8 bytes long): the same bytes give the same digest
    /// however they are cut into pieces.
    fn add(&mut self, bytes: &[u8]) {
        assert_eq!(bytes.len() % 8, 0, "whole words");
        for w in bytes.chunks_exact(8) {
            let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            self.0 = (self.0 ^ w)
                .wrapping_mul(0x0000_0100_0000_01b3)
                .rotate_left(29);
        }
    }
}

/// The pieces `len` bytes are read and written in.
const PIECE: u64 = 2 << 20;

/// The digest of the bytes of `len` at `a`.
fn bytes(mm: &Mm, a: VirtAddr, len: u64) -> Digest {
    let mut d = Digest::new();
    let mut buf = vec![0u8; len.min(PIECE) as usize];
    for off in (0..len).step_by(PIECE as usize) {
        let n = (len - off).min(PIECE) as usize;
        mm.read(a + off, &mut buf[..n]).expect("readable");
        d.add(&buf[..n]);
    }
    d
}

/// The digest of the bytes the held pages `p` hold (`len` bytes from the first).
fn held(p: &UserPages, len: u64) -> Digest {
    let mut d = Digest::new();
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for i in 0..npages(len) {
        let n = (len - i * PAGE_SIZE).min(PAGE_SIZE) as usize;
        p.read(i as usize, 0, &mut page[..n]);
        d.add(&page[..n]);
    }
    d
}

fn npages(size: u64) -> u64 {
    size.div_ceil(PAGE_SIZE)
}

/// `memset(mem, byte, size)`, a piece at a time.
fn fill(mm: &Mm, mem: VirtAddr, size: u64, byte: u8) {
    let buf = vec![byte; size.min(PIECE) as usize];
    for off in (0..size).step_by(PIECE as usize) {
        let n = (size - off).min(PIECE) as usize;
        mm.write(mem + off, &buf[..n]).expect("writable");
    }
}

/// `memset(mem, 0xff, size)`.
fn modify(mm: &Mm, mem: VirtAddr, size: u64) {
    fill(mm, mem, size, 0xff);
}

/// The memory one run of an anonymous case works on: `size` bytes at `mem`, populated.
struct Anon {
    m: Machine,
    mem: VirtAddr,
    size: u64,
}

/// The C's `run_with_*` of the anonymous cases that the model can express. The THP kinds
/// carry the folio's order: 9 for the PMD size, 2 to 8 for the multi-size THPs.
#[derive(Debug, Clone, Copy)]
enum Kind {
    BasePage,
    Thp(u32),
    PteMappedThp(u32),
    SinglePteOfThp(u32),
    PartiallyMremappedThp(u32),
    PartiallySharedThp(u32),
    /// `run_with_hugetlb` at one hugetlb size.
    Hugetlb(HugetlbSize),
    /// `run_with_base_page_swap`: a base page written out by `MADV_PAGEOUT`.
    SwappedBasePage,
    /// `THP_RUN_PMD_SWAPOUT`: a THP written out (split first: no THP swap).
    SwappedThp(u32),
    /// `THP_RUN_PTE_SWAPOUT`: a PTE-mapped THP written out.
    SwappedPteMappedThp(u32),
    /// `THP_RUN_SINGLE_PTE_SWAPOUT`: the one PTE left of a THP written out.
    SwappedSinglePteOfThp(u32),
}

/// The kinds in the C's order (`run_anon_test_case`): base pages, then for each THP size
/// (the PMD size first, then the multi-size THPs from the largest) the PMD-mapped runs
/// (PMD size only), the PTE-mapped, single-PTE, partially mremapped and partially shared
/// runs, then hugetlb at each size.
fn kinds() -> Vec<Kind> {
    let mut out = vec![Kind::BasePage, Kind::SwappedBasePage];
    for order in std::iter::once(PMD_ORDER).chain((MTHP_MIN_ORDER..=MTHP_MAX_ORDER).rev()) {
        if order == PMD_ORDER {
            out.extend([Kind::Thp(order), Kind::SwappedThp(order)]);
        }
        out.extend([
            Kind::PteMappedThp(order),
            Kind::SwappedPteMappedThp(order),
            Kind::SinglePteOfThp(order),
            Kind::SwappedSinglePteOfThp(order),
            Kind::PartiallyMremappedThp(order),
            Kind::PartiallySharedThp(order),
        ]);
    }
    out.extend(hugetlb_sizes().into_iter().map(Kind::Hugetlb));
    out
}

/// The memory of `kind`, filled with ones; the swapped kinds are their base kind written
/// out by `MADV_PAGEOUT`, every page of it checked to be swapped (the C skips otherwise).
fn anon(kind: Kind) -> Anon {
    let (base, swapout) = match kind {
        Kind::SwappedBasePage => (Kind::BasePage, true),
        Kind::SwappedThp(o) => (Kind::Thp(o), true),
        Kind::SwappedPteMappedThp(o) => (Kind::PteMappedThp(o), true),
        Kind::SwappedSinglePteOfThp(o) => (Kind::SinglePteOfThp(o), true),
        k => (k, false),
    };
    let a = populated(base);
    if swapout {
        a.m.mm.madvise(a.mem, a.size, Advice::PageOut).unwrap();
        let map = a.m.mm.pagemap(a.mem, npages(a.size)).unwrap();
        assert!(
            map.iter().all(|e| e.swap == Some(hmm::mm::SwapKind::Swap)),
            "{kind:?}: not swapped out"
        );
    }
    a
}

/// `do_run_with_base_page`, `do_run_with_thp` and `run_with_hugetlb`: the memory of `kind`,
/// filled with ones, on a machine with swap. A THP kind of order `o` runs with that size
/// enabled and the PMD size off for a multi-size THP, as the C sets
/// `hugepages-<size>kB/enabled` for each size it runs.
fn populated(kind: Kind) -> Anon {
    let m = match kind {
        // Two pool pages: COW and unsharing need the second.
        Kind::Hugetlb(size) => hugetlb_machine(size, 2),
        _ => Machine::new(32),
    };
    m.phys.swapon(8 << 20).unwrap();
    let mm = &m.mm;
    let order = match kind {
        Kind::BasePage => {
            let mem = m.map(1, RW, MapFlags::PRIVATE);
            mm.madvise(mem, PAGE_SIZE, Advice::NoHugePage).unwrap();
            mm.write(mem, &[1; PAGE_SIZE as usize]).unwrap();
            return Anon {
                m,
                mem,
                size: PAGE_SIZE,
            };
        }
        Kind::Hugetlb(size) => {
            let flags = MapFlags::PRIVATE | MapFlags::HUGETLB | map_huge(size);
            let mem = mm.mmap(None, size.bytes(), RW, flags).unwrap();
            fill(mm, mem, size.bytes(), 1);
            return Anon {
                m,
                mem,
                size: size.bytes(),
            };
        }
        Kind::Thp(o)
        | Kind::PteMappedThp(o)
        | Kind::SinglePteOfThp(o)
        | Kind::PartiallyMremappedThp(o)
        | Kind::PartiallySharedThp(o) => o,
        Kind::SwappedBasePage
        | Kind::SwappedThp(_)
        | Kind::SwappedPteMappedThp(_)
        | Kind::SwappedSinglePteOfThp(_) => unreachable!("swapped kinds start from their base"),
    };
    let thp_size = PAGE_SIZE << order;
    if order < PMD_ORDER {
        mm.set_thp_mode(ThpMode::Never);
        mm.set_mthp_mode(order, MthpMode::Always).unwrap();
    }
    let raw = mm.mmap(None, 2 * thp_size, RW, MapFlags::PRIVATE).unwrap();
    let mem = raw.align_up(thp_size).unwrap();
    mm.madvise(mem, thp_size, Advice::HugePage).unwrap();
    mm.write_val(mem, 1u8).unwrap();
    let last = mm.pagemap(page(mem, npages(thp_size) - 1), 1).unwrap()[0];
    assert!(last.present, "{kind:?}: did not get a THP populated");
    mm.write(mem, &vec![1; thp_size as usize]).unwrap();
    let mut size = thp_size;
    match kind {
        Kind::PteMappedThp(_) => {
            mm.mprotect(page(mem, 1), PAGE_SIZE, Prot::READ).unwrap();
            mm.mprotect(page(mem, 1), PAGE_SIZE, RW).unwrap();
        }
        Kind::SinglePteOfThp(_) => {
            mm.madvise(page(mem, 1), thp_size - PAGE_SIZE, Advice::DontNeed)
                .unwrap();
            size = PAGE_SIZE;
        }
        Kind::PartiallyMremappedThp(_) => {
            let half = thp_size / 2;
            let to = mm.mmap(None, half, Prot::NONE, MapFlags::PRIVATE).unwrap();
            let flags = MremapFlags::MAYMOVE | MremapFlags::FIXED;
            assert_eq!(mm.mremap(mem + half, half, half, flags, Some(to)), Ok(to));
            size = half;
        }
        Kind::PartiallySharedThp(_) => {
            let rest = thp_size - PAGE_SIZE;
            mm.madvise(page(mem, 1), rest, Advice::DontFork).unwrap();
            drop(mm.fork().unwrap());
            mm.madvise(page(mem, 1), rest, Advice::DoFork).unwrap();
        }
        _ => {}
    }
    Anon { m, mem, size }
}

/// Runs `case` on every kind; panics naming the kinds it failed on.
fn run_anon(name: &str, case: fn(&Anon) -> Result<(), String>) {
    let failed: Vec<String> = kinds()
        .into_iter()
        .filter_map(|kind| {
            let a = anon(kind);
            let r = case(&a).map_err(|why| format!("{name} ... with {kind:?}: {why}"));
            a.m.mm.audit().unwrap();
            r.err()
        })
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// `do_test_cow_in_parent` with `child_memcmp_fn`: the parent writes the pages it shares
/// with a child; the child must still read what it read before.
fn cow_in_parent(a: &Anon, mprotect: bool) -> Result<(), String> {
    let mm = &a.m.mm;
    let child = mm.fork().unwrap();
    let old = bytes(&child, a.mem, a.size);
    if mprotect {
        // mprotect() may try to avoid the write fault by mapping the pages writable.
        mm.mprotect(a.mem, a.size, Prot::READ).unwrap();
        mm.mprotect(a.mem, a.size, RW).unwrap();
    }
    modify(mm, a.mem, a.size);
    if bytes(&child, a.mem, a.size) != old {
        return Err("Leak from parent into child".into());
    }
    child.audit().unwrap();
    Ok(())
}

/// `do_test_cow_in_parent` with `child_vmsplice_memcmp_fn`: the child takes R/O GUP
/// references, unmaps the pages, and reads them through the references after the parent
/// wrote. (The C expects hugetlb to fail here; the model does not leak there either.)
fn vmsplice_in_child(a: &Anon, mprotect: bool) -> Result<(), String> {
    let mm = &a.m.mm;
    let child = mm.fork().unwrap();
    let old = bytes(&child, a.mem, a.size);
    let pipe = child
        .get_user_pages(a.mem, npages(a.size), GupFlags::empty())
        .unwrap();
    child.munmap(a.mem, a.size.max(PAGE_SIZE)).unwrap();
    if mprotect {
        mm.mprotect(a.mem, a.size, Prot::READ).unwrap();
        mm.mprotect(a.mem, a.size, RW).unwrap();
    }
    modify(mm, a.mem, a.size);
    if held(&pipe, a.size) != old {
        return Err("Leak from parent into child".into());
    }
    Ok(())
}

/// `do_test_vmsplice_in_parent`: the parent takes R/O GUP references (before or after the
/// fork), unmaps; the child writes; the parent must read the old bytes through the
/// references.
fn vmsplice_in_parent(a: &Anon, before_fork: bool) -> Result<(), String> {
    let mm = &a.m.mm;
    let old = bytes(mm, a.mem, a.size);
    let take = || {
        mm.get_user_pages(a.mem, npages(a.size), GupFlags::empty())
            .unwrap()
    };
    let early = before_fork.then(take);
    let child = mm.fork().unwrap();
    let pipe = early.unwrap_or_else(take);
    mm.munmap(a.mem, a.size).unwrap();
    modify(&child, a.mem, a.size);
    if held(&pipe, a.size) != old {
        return Err("Leak from child into parent".into());
    }
    Ok(())
}

/// `do_test_iouring`: an io_uring fixed buffer is a R/W long-term pin; after an mprotect
/// round trip (with soft-dirty tracking reset) or a fork, the parent's write must be what
/// the pin holds.
fn iouring(a: &Anon, use_fork: bool) -> Result<(), String> {
    let mm = &a.m.mm;
    let pin = mm
        .pin_user_pages(a.mem, npages(a.size), GupFlags::WRITE | GupFlags::LONGTERM)
        .unwrap();
    let child = if use_fork {
        Some(mm.fork().unwrap())
    } else {
        mm.mprotect(a.mem, a.size, Prot::READ).unwrap();
        mm.clear_soft_dirty();
        mm.mprotect(a.mem, a.size, RW).unwrap();
        None
    };
    modify(mm, a.mem, a.size);
    if held(&pin, a.size) != bytes(mm, a.mem, a.size) {
        return Err("Longterm R/W pin is not reliable".into());
    }
    drop(child);
    Ok(())
}

/// `enum ro_pin_test`.
#[derive(Clone, Copy)]
enum RoPin {
    /// `RO_PIN_TEST`: no preparation.
    Plain,
    /// The pages shared with a live child.
    Shared,
    /// Shared with a child that has exited since.
    PreviouslyShared,
    /// Mapped R/O and exclusive (mprotect round trip with soft-dirty tracking reset).
    RoExclusive,
}

/// `do_test_ro_pin`: a R/O long-term pin, then the process writes; the pin must see it.
fn ro_pin(mm: &Arc<Mm>, mem: VirtAddr, size: u64, test: RoPin) -> Result<(), String> {
    let mut child = None;
    match test {
        RoPin::Plain => {}
        RoPin::Shared => child = Some(mm.fork().unwrap()),
        RoPin::PreviouslyShared => drop(mm.fork().unwrap()),
        RoPin::RoExclusive => {
            mm.mprotect(mem, size, Prot::READ).unwrap();
            mm.clear_soft_dirty();
            mm.mprotect(mem, size, RW).unwrap();
        }
    }
    let pin = mm
        .pin_user_pages(mem, npages(size), GupFlags::LONGTERM)
        .map_err(|e| format!("PIN_LONGTERM_TEST_START failed: {e}"))?;
    modify(mm, mem, size);
    let ok = held(&pin, size) == bytes(mm, mem, size);
    drop((pin, child));
    ok.then_some(())
        .ok_or_else(|| "Longterm R/O pin is not reliable".into())
}

#[test]
fn basic_cow_after_fork() {
    run_anon("Basic COW after fork()", |a| cow_in_parent(a, false));
}

#[test]
fn basic_cow_after_fork_with_mprotect_optimization() {
    run_anon("Basic COW after fork() with mprotect() optimization", |a| {
        cow_in_parent(a, true)
    });
}

#[test]
fn vmsplice_and_unmap_in_child() {
    run_anon("vmsplice() + unmap in child", |a| {
        vmsplice_in_child(a, false)
    });
}

#[test]
fn vmsplice_and_unmap_in_child_with_mprotect_optimization() {
    run_anon(
        "vmsplice() + unmap in child with mprotect() optimization",
        |a| vmsplice_in_child(a, true),
    );
}

#[test]
fn vmsplice_before_fork_unmap_in_parent_after_fork() {
    run_anon(
        "vmsplice() before fork(), unmap in parent after fork()",
        |a| vmsplice_in_parent(a, true),
    );
}

#[test]
fn vmsplice_and_unmap_in_parent_after_fork() {
    run_anon("vmsplice() + unmap in parent after fork()", |a| {
        vmsplice_in_parent(a, false)
    });
}

#[test]
fn ro_mapping_a_page_registered_as_iouring_fixed_buffer() {
    run_anon(
        "R/O-mapping a page registered as iouring fixed buffer",
        |a| iouring(a, false),
    );
}

#[test]
fn fork_with_an_iouring_fixed_buffer() {
    run_anon("fork() with an iouring fixed buffer", |a| iouring(a, true));
}

#[test]
fn ro_gup_pin_on_ro_mapped_shared_page() {
    // And the GUP-fast variant, the same walk here.
    run_anon("R/O GUP pin on R/O-mapped shared page", |a| {
        ro_pin(&a.m.mm, a.mem, a.size, RoPin::Shared)
    });
}

#[test]
fn ro_gup_pin_on_ro_mapped_previously_shared_page() {
    run_anon("R/O GUP pin on R/O-mapped previously-shared page", |a| {
        ro_pin(&a.m.mm, a.mem, a.size, RoPin::PreviouslyShared)
    });
}

#[test]
fn ro_gup_pin_on_ro_mapped_exclusive_page() {
    run_anon("R/O GUP pin on R/O-mapped exclusive page", |a| {
        ro_pin(&a.m.mm, a.mem, a.size, RoPin::RoExclusive)
    });
}

/// `enum anon_thp_collapse_test`.
#[derive(Debug, Clone, Copy)]
enum Collapse {
    Unshared,
    FullyShared,
    LowerShared,
    UpperShared,
}

/// `do_test_anon_thp_collapse`: a PTE-mapped THP collapsed before or after being
/// COW-shared (whole, lower or upper half) with a child; the parent's write must not reach
/// the child.
fn thp_collapse(test: Collapse) {
    let a = anon(Kind::Thp(PMD_ORDER));
    let (mm, mem, size) = (&a.m.mm, a.mem, a.size);
    let half = size / 2;
    mm.mprotect(page(mem, 1), PAGE_SIZE, Prot::READ).unwrap();
    mm.mprotect(page(mem, 1), PAGE_SIZE, RW).unwrap();
    match test {
        Collapse::Unshared => mm.madvise(mem, size, Advice::Collapse).unwrap(),
        Collapse::FullyShared => {}
        Collapse::LowerShared => mm.madvise(mem + half, half, Advice::DontFork).unwrap(),
        Collapse::UpperShared => mm.madvise(mem, half, Advice::DontFork).unwrap(),
    }
    let child = mm.fork().unwrap();
    let (at, len) = match test {
        Collapse::LowerShared => (mem, half),
        Collapse::UpperShared => (mem + half, half),
        _ => (mem, size),
    };
    let old = bytes(&child, at, len);
    match test {
        Collapse::Unshared => {}
        Collapse::LowerShared | Collapse::UpperShared => {
            // Merge the VMAs again so the range can collapse.
            mm.madvise(mem, size, Advice::DoFork).unwrap();
            mm.madvise(mem, size, Advice::Collapse).unwrap();
        }
        Collapse::FullyShared => mm.madvise(mem, size, Advice::Collapse).unwrap(),
    }
    assert_eq!(
        mm.pagemap(mem, 1).unwrap()[0].order,
        9,
        "{test:?}: collapsed"
    );
    modify(mm, mem, size);
    assert_eq!(
        bytes(&child, at, len),
        old,
        "{test:?}: Leak from parent into child"
    );
    mm.audit().unwrap();
    child.audit().unwrap();
}

#[test]
fn basic_cow_after_fork_when_collapsing_before_fork() {
    thp_collapse(Collapse::Unshared);
}

#[test]
fn basic_cow_after_fork_when_collapsing_after_fork_fully_shared() {
    thp_collapse(Collapse::FullyShared);
}

#[test]
fn basic_cow_after_fork_when_collapsing_after_fork_lower_shared() {
    thp_collapse(Collapse::LowerShared);
}

#[test]
fn basic_cow_after_fork_when_collapsing_after_fork_upper_shared() {
    thp_collapse(Collapse::UpperShared);
}

/// The non-anonymous kinds: a private writable mapping (`mem`) and a read-only one of the
/// same page (`smem`), the page faulted in by a read of each.
#[derive(Debug, Clone, Copy)]
enum NonAnon {
    Zeropage,
    Memfd,
    HugeZeropage,
    /// A hugetlb memfd of one size.
    MemfdHugetlb(HugetlbSize),
}

fn non_anon(kind: NonAnon) -> (Machine, VirtAddr, VirtAddr, u64, Option<MemFile>) {
    let m = match kind {
        // The file's page and a private copy.
        NonAnon::MemfdHugetlb(size) => hugetlb_machine(size, 2),
        _ => Machine::new(32),
    };
    let mm = &m.mm;
    let (mem, smem, size, file) = match kind {
        NonAnon::Zeropage => {
            let mem = m.map(1, RW, MapFlags::PRIVATE);
            let smem = m.map(1, Prot::READ, MapFlags::PRIVATE);
            (mem, smem, PAGE_SIZE, None)
        }
        NonAnon::Memfd => {
            let f = MemFile::new(&m.phys);
            // fallocate: one page of zeros.
            f.pwrite(0, &[0; PAGE_SIZE as usize]).unwrap();
            let mem = mm
                .mmap_file(None, PAGE_SIZE, RW, MapFlags::PRIVATE, &f, 0)
                .unwrap();
            let smem = mm
                .mmap_file(None, PAGE_SIZE, Prot::READ, MapFlags::SHARED, &f, 0)
                .unwrap();
            (mem, smem, PAGE_SIZE, Some(f))
        }
        NonAnon::MemfdHugetlb(size) => {
            let f = MemFile::new_hugetlb_of(&m.phys, size);
            let len = size.bytes();
            f.fallocate(0, len).unwrap();
            let mem = mm
                .mmap_file(None, len, RW, MapFlags::PRIVATE, &f, 0)
                .unwrap();
            let smem = mm
                .mmap_file(None, len, Prot::READ, MapFlags::SHARED, &f, 0)
                .unwrap();
            (mem, smem, len, Some(f))
        }
        NonAnon::HugeZeropage => {
            let aligned = |prot| {
                let raw = mm
                    .mmap(None, 2 * PMD_SIZE, prot, MapFlags::PRIVATE)
                    .unwrap();
                let a = VirtAddr::new((raw.as_u64() + PMD_SIZE) & !(PMD_SIZE - 1));
                mm.madvise(a, PMD_SIZE, Advice::HugePage).unwrap();
                a
            };
            (aligned(RW), aligned(Prot::READ), PMD_SIZE, None)
        }
    };
    mm.read_val::<u8>(mem).unwrap();
    mm.read_val::<u8>(smem).unwrap();
    if let NonAnon::HugeZeropage = kind {
        for a in [mem, smem] {
            assert!(
                mm.pagemap(page(a, 1), 1).unwrap()[0].present,
                "THPs populated"
            );
        }
    }
    (m, mem, smem, size, file)
}

/// Runs a non-anonymous case on every kind the model has (tmpfile is the memfd case: the
/// model has one kind of file).
fn run_non_anon(name: &str, case: fn(&Arc<Mm>, VirtAddr, VirtAddr, u64) -> Result<(), String>) {
    let kinds = [NonAnon::Zeropage, NonAnon::Memfd, NonAnon::HugeZeropage]
        .into_iter()
        .chain(hugetlb_sizes().into_iter().map(NonAnon::MemfdHugetlb));
    let failed: Vec<String> = kinds
        .filter_map(|kind| {
            let (m, mem, smem, size, _file) = non_anon(kind);
            let r = case(&m.mm, mem, smem, size)
                .map_err(|why| format!("{name} ... with {kind:?}: {why}"));
            m.mm.audit().unwrap();
            r.err()
        })
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn non_anon_basic_cow() {
    run_non_anon("Basic COW", |mm, mem, smem, size| {
        let old = bytes(mm, smem, size);
        modify(mm, mem, size);
        (bytes(mm, smem, size) == old)
            .then_some(())
            .ok_or_else(|| "Other mapping modified".into())
    });
}

#[test]
fn non_anon_ro_longterm_gup_pin() {
    // And the GUP-fast variant, the same walk here.
    run_non_anon("R/O longterm GUP pin", |mm, mem, _, size| {
        ro_pin(mm, mem, size, RoPin::Plain)
    });
}
