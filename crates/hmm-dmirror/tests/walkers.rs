//! Every page walker meets a device THP (issue 26, item 4), on a machine with swap.
//!
//! The 2026 fixes after device THP landed were all one class: ordinary page walkers meeting
//! a device-private PMD (`page_vma_mapped_walk`, the COLD/PAGEOUT walks, `MADV_FREE`'s
//! `madvise_free_huge_pmd`, the write-protect bit on a downgrade). Here every walker the
//! model has runs over a range holding a device THP made by dmirror's MIGRATE_TO_DEV of a
//! THP (one PMD entry for 512 device pages): a device-private one (device 0), what is left
//! of one whose upper half was unmapped, and a device-coherent one (device 2), each walker
//! on a fresh machine; then every byte, the audit and the frames are checked. Where the
//! walker keeps the data, the CPU reads it back (faulting device-private pages home through
//! dmirror's `migrate_to_ram`; device-coherent ones are read in place); where it drops it,
//! the device's memory must be free.

mod common;

use common::{page, rig, Rig, RW};
use hmm::addr::{VirtAddr, PAGE_SIZE, PMD_NR, PMD_SIZE};
use hmm::mm::userfaultfd::{
    MoveMode, PageFaultFlags, RegisterMode, UffdError, UffdFeatures, UffdMsg, Userfaultfd,
};
use hmm::mm::{Advice, GupFlags, MremapFlags, Prot};
use hmm_dmirror::{Dmirror, DmirrorCmd, HmmDmirrorCmd};
use std::sync::Arc;

const NR: u64 = PMD_NR;
/// The first page's word; page `i` holds `TAG + i`.
const TAG: u64 = 200;

/// The device kinds a walker meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Private,
    Coherent,
}

/// A machine with a 2 MiB THP buffer written with `TAG + i` per page and migrated whole to
/// device `kind` (one device THP).
fn machine(kind: Kind) -> (Rig, Arc<Dmirror>, usize, VirtAddr) {
    let r = rig();
    r.phys.swapon(4 * PMD_SIZE).unwrap();
    let minor = match kind {
        Kind::Private => 0,
        Kind::Coherent => 2,
    };
    let d = r.open(minor);
    let a = r.map(NR);
    assert!(a.is_aligned(PMD_SIZE));
    r.mm.madvise(a, PMD_SIZE, Advice::HugePage).unwrap();
    for i in 0..NR {
        r.mm.write_val(page(a, i), TAG + i).unwrap();
    }
    // A user buffer for the command's read-back of 512 pages.
    let buf = r.map(NR);
    let mut c = HmmDmirrorCmd {
        addr: a.as_u64(),
        ptr: buf.as_u64(),
        npages: NR,
        ..HmmDmirrorCmd::default()
    };
    d.ioctl(DmirrorCmd::MigrateToDev, &mut c).unwrap();
    r.mm.munmap(buf, NR * PAGE_SIZE).unwrap();
    assert_eq!(c.cpages, NR);
    let map = r.mm.pagemap(a, NR).unwrap();
    assert!(
        map.iter().all(|e| e.order == 9),
        "one device THP to start with"
    );
    assert_eq!(r.driver.device(minor).nr_in_use(), NR);
    (r, d, minor, a)
}

/// Where the bytes are after a walker: `pages` pages from `at`, the first holding
/// `TAG + first`; `None` when the walker dropped them.
type Kept = Option<(VirtAddr, u64, u64)>;

/// A walker over the `len` bytes at `a` (a whole device THP, or what is left of one), on a
/// device of `kind`.
type Walker = fn(&Rig, VirtAddr, u64, Kind) -> Kept;

const WALKERS: [(&str, Walker); 20] = [
    ("mprotect read-only and back", |r, a, len, _| {
        r.mm.mprotect(a, len, Prot::READ).unwrap();
        r.mm.mprotect(a, len, RW).unwrap();
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("mprotect of one half", |r, a, len, _| {
        r.mm.mprotect(a, len / 2, Prot::READ).unwrap();
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("MADV_FREE, then lazy-free reclaim", |r, a, len, kind| {
        r.mm.madvise(a, len, Advice::Free).unwrap();
        r.mm.reclaim_lazyfree();
        // A device-private PMD is skipped (the kernel's fix to madvise_free_huge_pmd); a
        // device-coherent THP is present, clean anonymous memory: discarded.
        (kind == Kind::Private).then_some((a, len / PAGE_SIZE, 0))
    }),
    ("MADV_DONTNEED", |r, a, len, _| {
        r.mm.madvise(a, len, Advice::DontNeed).unwrap();
        None
    }),
    ("MADV_COLLAPSE", |r, a, len, kind| {
        let whole_coherent = kind == Kind::Coherent && len == PMD_SIZE;
        // Not present (SCAN_PMD_NULL, EINVAL); a coherent THP is one already.
        let done = r.mm.madvise(a, len, Advice::Collapse);
        assert_eq!(done.is_ok(), whole_coherent, "{done:?}");
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("MADV_NOHUGEPAGE and MADV_HUGEPAGE", |r, a, len, _| {
        r.mm.madvise(a, len, Advice::NoHugePage).unwrap();
        r.mm.madvise(a, len, Advice::HugePage).unwrap();
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("MADV_POPULATE_READ", |r, a, len, _| {
        r.mm.madvise(a, len, Advice::PopulateRead).unwrap();
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("MADV_POPULATE_WRITE", |r, a, len, _| {
        r.mm.madvise(a, len, Advice::PopulateWrite).unwrap();
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("fork, the child reads", |r, a, len, _| {
        let child = r.mm.fork().unwrap();
        for i in 0..len / PAGE_SIZE {
            assert_eq!(child.read_val::<u64>(page(a, i)).unwrap(), TAG + i);
        }
        child.audit().unwrap();
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("mremap to another place", |r, a, len, _| {
        let to =
            r.mm.mremap(a, len, len, MremapFlags::MAYMOVE, None)
                .unwrap();
        Some((to, len / PAGE_SIZE, 0))
    }),
    ("get_user_pages", |r, a, len, _| {
        drop(
            r.mm.get_user_pages(a, len / PAGE_SIZE, GupFlags::empty())
                .unwrap(),
        );
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("pin_user_pages, long-term", |r, a, len, _| {
        drop(
            r.mm.pin_user_pages(a, len / PAGE_SIZE, GupFlags::LONGTERM)
                .unwrap(),
        );
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("pagemap", |r, a, len, kind| {
        let map = r.mm.pagemap(a, len / PAGE_SIZE).unwrap();
        // Device-private pages are not present; device-coherent ones are mapped.
        let present = kind == Kind::Coherent;
        assert!(map.iter().all(|e| e.present == present), "{kind:?}");
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("clear_refs (soft-dirty)", |r, a, len, _| {
        r.mm.clear_soft_dirty();
        Some((a, len / PAGE_SIZE, 0))
    }),
    (
        "userfaultfd registration, write-protect, release",
        |r, a, len, _| {
            let uffd = Userfaultfd::new(&r.mm, UffdFeatures::empty()).unwrap();
            uffd.register(a, len, RegisterMode::WP | RegisterMode::MISSING)
                .unwrap();
            uffd.writeprotect(a, len, true, false).unwrap();
            let map = r.mm.pagemap(a, len / PAGE_SIZE).unwrap();
            assert!(map.iter().all(|e| e.uffd_wp));
            r.mm.audit().unwrap();
            uffd.writeprotect(a, len, false, false).unwrap();
            uffd.writeprotect(a, len, true, false).unwrap();
            // Closing it takes the bits away with the registration.
            drop(uffd);
            let map = r.mm.pagemap(a, len / PAGE_SIZE).unwrap();
            assert!(map.iter().all(|e| !e.uffd_wp));
            Some((a, len / PAGE_SIZE, 0))
        },
    ),
    ("UFFDIO_MOVE of the pages", |r, a, len, kind| {
        let to = r.map(len / PAGE_SIZE);
        let uffd = Userfaultfd::new(&r.mm, UffdFeatures::empty()).unwrap();
        uffd.register(to, len, RegisterMode::MISSING).unwrap();
        // Device pages do not move (-EFAULT); device-coherent ones are present system
        // pages to the CPU and move like them, after a THP split.
        let moved = uffd.move_pages(to, a, len, MoveMode::empty());
        match kind {
            Kind::Private => {
                assert_eq!(moved, Err(UffdError::Fault { addr: a }));
                Some((a, len / PAGE_SIZE, 0))
            }
            Kind::Coherent => {
                assert_eq!(moved, Ok(len));
                Some((to, len / PAGE_SIZE, 0))
            }
        }
    }),
    ("MADV_COLD", |r, a, len, _| {
        // The 2026 fix: the COLD walk skips a device-private PMD.
        r.mm.madvise(a, len, Advice::Cold).unwrap();
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("MADV_PAGEOUT", |r, a, len, _| {
        // Device memory is not on the LRU: nothing is written out (the PAGEOUT walk
        // skips a device-private PMD; device-coherent pages are not system RAM).
        r.mm.madvise(a, len, Advice::PageOut).unwrap();
        let map = r.mm.pagemap(a, len / PAGE_SIZE).unwrap();
        assert!(map.iter().all(|e| e.swap != Some(hmm::mm::SwapKind::Swap)));
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("reclaim", |r, a, len, _| {
        hmm::mm::reclaim(&r.phys, 4 * NR);
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("munmap of one half", |r, a, len, _| {
        r.mm.munmap(a, len / 2).unwrap();
        let n = len / PAGE_SIZE;
        Some((page(a, n / 2), n / 2, n / 2))
    }),
];

/// Runs every walker over the device THP of a fresh machine of `kind`, after `prepare` made
/// what the walkers get of it (`len` bytes from the buffer's start); checks what `Kept`
/// says.
fn every_walker(kind: Kind, prepare: fn(&Rig, VirtAddr) -> u64) {
    for (name, walk) in WALKERS {
        let (r, d, minor, a) = machine(kind);
        let len = prepare(&r, a);
        let kept = walk(&r, a, len, kind);
        r.mm.audit().unwrap_or_else(|e| panic!("{name}: {e}"));
        match kept {
            Some((at, pages, first)) => {
                for i in 0..pages {
                    let got = r.mm.read_val::<u64>(page(at, i));
                    assert_eq!(got, Ok(TAG + first + i), "{kind:?} {name}: page {i}");
                }
            }
            None => {
                for i in 0..len / PAGE_SIZE {
                    let got = r.mm.read_val::<u64>(page(a, i));
                    assert_eq!(got, Ok(0), "{kind:?} {name}: page {i}");
                }
                let left = r.driver.device(minor).nr_in_use();
                assert_eq!(left, 0, "{kind:?} {name}: the memory is free");
            }
        }
        r.mm.audit()
            .unwrap_or_else(|e| panic!("{kind:?} {name}: {e}"));
        drop(d);
        let Rig {
            phys, driver, mm, ..
        } = r;
        drop(mm);
        assert_eq!(
            driver.device(minor).nr_in_use(),
            0,
            "{kind:?} {name}: device frames"
        );
        assert_eq!(phys.nr_in_use(), 0, "{kind:?} {name}: no frame leaked");
    }
}

#[test]
fn every_walker_meets_a_device_private_thp() {
    every_walker(Kind::Private, |_, _| PMD_SIZE);
}

/// The same over what is left of a device THP whose upper half was unmapped (its PMD split
/// into 256 device-private PTEs of a folio partly unmapped).
#[test]
fn every_walker_meets_a_partly_unmapped_device_thp() {
    every_walker(Kind::Private, |r, a| {
        r.mm.munmap(page(a, NR / 2), PMD_SIZE / 2).unwrap();
        let map = r.mm.pagemap(a, NR / 2).unwrap();
        assert!(
            map.iter().all(|e| !e.present && e.swap.is_some()),
            "still on the device"
        );
        PMD_SIZE / 2
    });
}

#[test]
fn every_walker_meets_a_device_coherent_thp() {
    every_walker(Kind::Coherent, |_, _| PMD_SIZE);
}

/// The write-protect bit on a device THP (the 2026 fix: `pmd_swp_uffd_wp` lost on a
/// device-private PMD downgrade, so mprotect over a write-protect-armed device THP dropped
/// the trap): it survives mprotect of the whole PMD and of half of it (a split), the
/// migration home of a page the CPU reads, and fork with fork events; a CPU write then
/// still goes to the handler, and the handler's release lets it through.
#[test]
fn write_protect_on_a_device_thp_survives_every_change() {
    let (r, d, minor, a) = machine(Kind::Private);
    let uffd = Userfaultfd::new(&r.mm, UffdFeatures::EVENT_FORK).unwrap();
    uffd.register(a, PMD_SIZE, RegisterMode::WP).unwrap();
    uffd.writeprotect(a, PMD_SIZE, true, false).unwrap();
    let all_wp = |mm: &hmm::mm::Mm| mm.pagemap(a, NR).unwrap().iter().all(|e| e.uffd_wp);
    assert!(all_wp(&r.mm));
    r.mm.mprotect(a, PMD_SIZE, Prot::READ).unwrap();
    r.mm.mprotect(a, PMD_SIZE, RW).unwrap();
    assert!(
        all_wp(&r.mm),
        "a device-private PMD downgrade keeps the bit"
    );
    assert!(r.mm.pagemap(a, NR).unwrap().iter().all(|e| e.order == 9));
    r.mm.mprotect(a, PMD_SIZE / 2, Prot::READ).unwrap();
    r.mm.mprotect(a, PMD_SIZE / 2, RW).unwrap();
    assert!(all_wp(&r.mm), "a split of the device PMD keeps the bit");
    r.mm.audit().unwrap();
    // A CPU read brings page 5 home, still write-protected.
    assert_eq!(r.mm.read_val::<u64>(page(a, 5)).unwrap(), TAG + 5);
    let pm = r.mm.pagemap(page(a, 5), 1).unwrap()[0];
    assert!(pm.present && pm.uffd_wp, "{pm:?}");
    assert!(all_wp(&r.mm));
    // The child of a fork with fork events keeps every bit.
    let (child, child_uffd) = std::thread::scope(|s| {
        let h = s.spawn(|| r.mm.fork().unwrap());
        let UffdMsg::Fork { child } = uffd.read() else {
            panic!("not a fork event")
        };
        (h.join().unwrap(), child)
    });
    assert!(all_wp(&child));
    child.audit().unwrap();
    drop(child_uffd);
    drop(child);
    // Writes to a page at home and to a page still on the device both trap.
    for i in [5, 300] {
        std::thread::scope(|s| {
            let h = s.spawn(|| r.mm.write_val(page(a, i), 7 + i));
            let UffdMsg::PageFault { address, flags } = uffd.read() else {
                panic!("not a page fault")
            };
            assert_eq!(address, page(a, i));
            assert!(flags.contains(PageFaultFlags::WP | PageFaultFlags::WRITE));
            uffd.writeprotect(address, PAGE_SIZE, false, false).unwrap();
            h.join().unwrap().unwrap();
        });
        assert_eq!(r.mm.read_val::<u64>(page(a, i)).unwrap(), 7 + i);
    }
    r.mm.audit().unwrap();
    drop(uffd);
    for i in (0..NR).filter(|i| ![5, 300].contains(i)) {
        assert_eq!(r.mm.read_val::<u64>(page(a, i)).unwrap(), TAG + i);
    }
    drop(d);
    let Rig {
        phys, driver, mm, ..
    } = r;
    drop(mm);
    assert_eq!(driver.device(minor).nr_in_use(), 0);
    assert_eq!(phys.nr_in_use(), 0);
}

/// A page the device wrote reaches the swap with the device's bytes: the mirror's write
/// goes to the system page and marks it dirty; reclaim unmaps it under a CLEAR
/// invalidation (the mirror drops its entry), writes it out, and a CPU read brings the
/// device's bytes back; the device reads them again through a fresh fault.
#[test]
fn device_written_pages_reach_the_swap_with_their_bytes() {
    let r = rig();
    r.phys.swapon(64 * PAGE_SIZE).unwrap();
    let d = r.open(0);
    let a = r.map(8);
    for i in 0..8 {
        r.mm.write_val(page(a, i), 1u64).unwrap();
    }
    // The device writes TAG + i to each page (WRITE from the user buffer).
    for i in 0..8 {
        r.mm.write_val(page(r.buf, i), TAG + i).unwrap();
    }
    let mut c = HmmDmirrorCmd {
        addr: a.as_u64(),
        ptr: r.buf.as_u64(),
        npages: 8,
        ..HmmDmirrorCmd::default()
    };
    d.ioctl(DmirrorCmd::Write, &mut c).unwrap();
    assert_eq!(c.cpages, 8);
    let before = r.mm.stats();
    r.mm.madvise(a, 8 * PAGE_SIZE, Advice::PageOut).unwrap();
    let map = r.mm.pagemap(a, 8).unwrap();
    assert!(map.iter().all(|e| e.swap == Some(hmm::mm::SwapKind::Swap)));
    assert!(
        r.mm.stats()
            .since(&before)
            .notifier
            .of(hmm::notifier::NotifierEvent::Clear)
            >= 1
    );
    r.mm.audit().unwrap();
    // The device reads them back: its READ faults them in from swap.
    let mut c = HmmDmirrorCmd {
        addr: a.as_u64(),
        ptr: r.buf.as_u64(),
        npages: 8,
        ..HmmDmirrorCmd::default()
    };
    d.ioctl(DmirrorCmd::Read, &mut c).unwrap();
    for i in 0..8 {
        assert_eq!(r.mm.read_val::<u64>(page(r.buf, i)).unwrap(), TAG + i);
        assert_eq!(r.mm.read_val::<u64>(page(a, i)).unwrap(), TAG + i);
    }
    assert_eq!(r.mm.stats().since(&before).faults.swap_in, 8);
    r.mm.audit().unwrap();
}
