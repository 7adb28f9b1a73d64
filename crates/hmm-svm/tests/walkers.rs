//! Every page walker meets a device THP (issue 26, item 4).
//!
//! The 2026 fixes after device THP landed were all one class: ordinary page walkers meeting
//! a device-private PMD (`page_vma_mapped_walk`, the COLD/PAGEOUT walks, `MADV_FREE`'s
//! `madvise_free_huge_pmd`, the write-protect bit on a downgrade). Here every walker the
//! model has runs over a range holding a device-private THP (one PMD entry for 512 pages of
//! the GPU's memory, made by a GPU fault on a THP range), each on a fresh one; then every
//! byte, the audit and the frames are checked. Where the walker keeps the data, the CPU
//! reads it back (faulting it home through the GPU's `migrate_to_ram`); where it drops it
//! (`MADV_DONTNEED`, `munmap`), the GPU's memory must be free.

use std::sync::Arc;

use hmm::addr::{VirtAddr, PAGE_SIZE, PMD_NR, PMD_SIZE};
use hmm::mm::{Advice, GupFlags, MapFlags, Mm, MremapFlags, Prot};
use hmm::phys::{PhysConfig, PhysMem};
use hmm_svm::{GpuConfig, GpuDevice, GpuVm, VmPolicies};

const RW: Prot = Prot::READ.union(Prot::WRITE);
const NR: u64 = PMD_NR;
/// The first page's word; page `i` holds `TAG + i`.
const TAG: u64 = 200;

struct Rig {
    phys: Arc<PhysMem>,
    gpu: Arc<GpuDevice>,
    mm: Arc<Mm>,
    vm: Arc<GpuVm>,
}

fn page(a: VirtAddr, i: u64) -> VirtAddr {
    a.checked_add(i * PAGE_SIZE).unwrap()
}

/// A machine with a 2 MiB THP buffer written with `TAG + i` per page, then read by the GPU:
/// one device THP.
fn rig() -> (Rig, VirtAddr) {
    let phys = PhysMem::new(PhysConfig::with_size(64 << 20)).unwrap();
    let gpu = GpuDevice::new(
        &phys,
        GpuConfig {
            vram_bytes: 8 << 20,
            ..GpuConfig::default()
        },
    )
    .unwrap();
    let mm = Mm::new(phys.clone());
    let vm = GpuVm::with_policies(&gpu, &mm, VmPolicies::plain());
    let a = mm.mmap(None, PMD_SIZE, RW, MapFlags::PRIVATE).unwrap();
    assert!(a.is_aligned(PMD_SIZE));
    mm.madvise(a, PMD_SIZE, Advice::HugePage).unwrap();
    for i in 0..NR {
        mm.write_val(page(a, i), TAG + i).unwrap();
    }
    let mut b = [0u8; 8];
    vm.read(a, &mut b).unwrap();
    let map = mm.pagemap(a, NR).unwrap();
    assert!(
        map.iter().all(|e| !e.present && e.order == 9),
        "one device THP to start with"
    );
    assert_eq!(gpu.vram_pages_in_use(), NR);
    (Rig { phys, gpu, mm, vm }, a)
}

/// Where the bytes are after a walker: `pages` pages from `at`, the first holding
/// `TAG + first`; `None` when the walker dropped them.
type Kept = Option<(VirtAddr, u64, u64)>;

/// A walker over the `len` bytes at `a` (a whole device THP, or what is left of one).
type Walker = fn(&Rig, VirtAddr, u64) -> Kept;

const WALKERS: [(&str, Walker); 15] = [
    ("mprotect read-only and back", |r, a, len| {
        r.mm.mprotect(a, len, Prot::READ).unwrap();
        r.mm.mprotect(a, len, RW).unwrap();
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("mprotect of one half", |r, a, len| {
        r.mm.mprotect(a, len / 2, Prot::READ).unwrap();
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("MADV_FREE, then lazy-free reclaim", |r, a, len| {
        r.mm.madvise(a, len, Advice::Free).unwrap();
        r.mm.reclaim_lazyfree();
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("MADV_DONTNEED", |r, a, len| {
        r.mm.madvise(a, len, Advice::DontNeed).unwrap();
        None
    }),
    ("MADV_COLLAPSE (refused: not present)", |r, a, len| {
        assert!(r.mm.madvise(a, len, Advice::Collapse).is_err());
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("MADV_NOHUGEPAGE and MADV_HUGEPAGE", |r, a, len| {
        r.mm.madvise(a, len, Advice::NoHugePage).unwrap();
        r.mm.madvise(a, len, Advice::HugePage).unwrap();
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("MADV_POPULATE_READ", |r, a, len| {
        r.mm.madvise(a, len, Advice::PopulateRead).unwrap();
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("MADV_POPULATE_WRITE", |r, a, len| {
        r.mm.madvise(a, len, Advice::PopulateWrite).unwrap();
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("fork, the child reads", |r, a, len| {
        let child = r.mm.fork().unwrap();
        for i in 0..len / PAGE_SIZE {
            assert_eq!(child.read_val::<u64>(page(a, i)).unwrap(), TAG + i);
        }
        child.audit().unwrap();
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("mremap to another place", |r, a, len| {
        let to =
            r.mm.mremap(a, len, len, MremapFlags::MAYMOVE, None)
                .unwrap();
        Some((to, len / PAGE_SIZE, 0))
    }),
    ("get_user_pages", |r, a, len| {
        drop(
            r.mm.get_user_pages(a, len / PAGE_SIZE, GupFlags::empty())
                .unwrap(),
        );
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("pin_user_pages, long-term", |r, a, len| {
        drop(
            r.mm.pin_user_pages(a, len / PAGE_SIZE, GupFlags::LONGTERM)
                .unwrap(),
        );
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("pagemap", |r, a, len| {
        let map = r.mm.pagemap(a, len / PAGE_SIZE).unwrap();
        assert!(
            map.iter().all(|e| !e.present),
            "device pages are not present"
        );
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("clear_refs (soft-dirty)", |r, a, len| {
        r.mm.clear_soft_dirty();
        Some((a, len / PAGE_SIZE, 0))
    }),
    ("munmap of one half", |r, a, len| {
        r.mm.munmap(a, len / 2).unwrap();
        let n = len / PAGE_SIZE;
        Some((page(a, n / 2), n / 2, n / 2))
    }),
];

/// Runs every walker over the device THP of a fresh machine, after `prepare` made what the
/// walkers get of it (`len` bytes from the buffer's start); checks what `Kept` says.
fn every_walker(prepare: fn(&Rig, VirtAddr) -> u64) {
    for (name, walk) in WALKERS {
        let (r, a) = rig();
        let len = prepare(&r, a);
        let kept = walk(&r, a, len);
        r.mm.audit().unwrap_or_else(|e| panic!("{name}: {e}"));
        match kept {
            Some((at, pages, first)) => {
                for i in 0..pages {
                    let got = r.mm.read_val::<u64>(page(at, i));
                    assert_eq!(got, Ok(TAG + first + i), "{name}: page {i}");
                }
            }
            None => {
                assert_eq!(r.gpu.vram_pages_in_use(), 0, "{name}: the memory is free");
                for i in 0..len / PAGE_SIZE {
                    assert_eq!(r.mm.read_val::<u64>(page(a, i)), Ok(0), "{name}");
                }
            }
        }
        r.mm.audit().unwrap_or_else(|e| panic!("{name}: {e}"));
        let Rig { phys, gpu, mm, vm } = r;
        drop(vm);
        drop(mm);
        assert_eq!(gpu.vram_pages_in_use(), 0, "{name}: no device frame leaked");
        assert_eq!(phys.nr_in_use(), 0, "{name}: no frame leaked");
    }
}

#[test]
fn every_walker_meets_a_device_private_thp() {
    every_walker(|_, _| PMD_SIZE);
}

/// The same over what is left of a device THP whose upper half was unmapped (its PMD split
/// into 256 device-private PTEs of a folio partly unmapped).
#[test]
fn every_walker_meets_a_partly_unmapped_device_thp() {
    every_walker(|r, a| {
        r.mm.munmap(page(a, NR / 2), PMD_SIZE / 2).unwrap();
        let map = r.mm.pagemap(a, NR / 2).unwrap();
        assert!(
            map.iter().all(|e| !e.present && e.swap.is_some()),
            "still on the device"
        );
        PMD_SIZE / 2
    });
}
