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

type Walker = fn(&Rig, VirtAddr) -> Kept;

const WALKERS: [(&str, Walker); 15] = [
    ("mprotect read-only and back", |r, a| {
        r.mm.mprotect(a, PMD_SIZE, Prot::READ).unwrap();
        r.mm.mprotect(a, PMD_SIZE, RW).unwrap();
        Some((a, NR, 0))
    }),
    ("mprotect of one half", |r, a| {
        r.mm.mprotect(a, PMD_SIZE / 2, Prot::READ).unwrap();
        Some((a, NR, 0))
    }),
    ("MADV_FREE, then lazy-free reclaim", |r, a| {
        r.mm.madvise(a, PMD_SIZE, Advice::Free).unwrap();
        r.mm.reclaim_lazyfree();
        Some((a, NR, 0))
    }),
    ("MADV_DONTNEED", |r, a| {
        r.mm.madvise(a, PMD_SIZE, Advice::DontNeed).unwrap();
        None
    }),
    ("MADV_COLLAPSE (refused: not present)", |r, a| {
        assert!(r.mm.madvise(a, PMD_SIZE, Advice::Collapse).is_err());
        Some((a, NR, 0))
    }),
    ("MADV_NOHUGEPAGE and MADV_HUGEPAGE", |r, a| {
        r.mm.madvise(a, PMD_SIZE, Advice::NoHugePage).unwrap();
        r.mm.madvise(a, PMD_SIZE, Advice::HugePage).unwrap();
        Some((a, NR, 0))
    }),
    ("MADV_POPULATE_READ", |r, a| {
        r.mm.madvise(a, PMD_SIZE, Advice::PopulateRead).unwrap();
        Some((a, NR, 0))
    }),
    ("MADV_POPULATE_WRITE", |r, a| {
        r.mm.madvise(a, PMD_SIZE, Advice::PopulateWrite).unwrap();
        Some((a, NR, 0))
    }),
    ("fork, the child reads", |r, a| {
        let child = r.mm.fork().unwrap();
        for i in 0..NR {
            assert_eq!(child.read_val::<u64>(page(a, i)).unwrap(), TAG + i);
        }
        child.audit().unwrap();
        Some((a, NR, 0))
    }),
    ("mremap to another place", |r, a| {
        let to =
            r.mm.mremap(a, PMD_SIZE, PMD_SIZE, MremapFlags::MAYMOVE, None)
                .unwrap();
        Some((to, NR, 0))
    }),
    ("get_user_pages", |r, a| {
        drop(r.mm.get_user_pages(a, NR, GupFlags::empty()).unwrap());
        Some((a, NR, 0))
    }),
    ("pin_user_pages, long-term", |r, a| {
        drop(r.mm.pin_user_pages(a, NR, GupFlags::LONGTERM).unwrap());
        Some((a, NR, 0))
    }),
    ("pagemap", |r, a| {
        let map = r.mm.pagemap(a, NR).unwrap();
        assert!(
            map.iter().all(|e| !e.present),
            "device pages are not present"
        );
        Some((a, NR, 0))
    }),
    ("clear_refs (soft-dirty)", |r, a| {
        r.mm.clear_soft_dirty();
        Some((a, NR, 0))
    }),
    ("munmap of one half", |r, a| {
        r.mm.munmap(a, PMD_SIZE / 2).unwrap();
        Some((page(a, NR / 2), NR / 2, NR / 2))
    }),
];

#[test]
fn every_walker_meets_a_device_private_thp() {
    for (name, walk) in WALKERS {
        let (r, a) = rig();
        let kept = walk(&r, a);
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
                for i in 0..NR {
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
