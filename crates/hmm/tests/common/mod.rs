//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;

use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::migrate::{MigratePfnFlags, Migration};
use hmm::mm::{MapFlags, Mm, Prot};
use hmm::notifier::{
    IntervalSub, MmuNotifierHandle, NotifierEvent, NotifierRange, Owner, Recorder,
};
use hmm::phys::{FrameFlags, HugetlbSize, PhysConfig, PhysMem};
use hmm::range_fault::{HmmPfn, HmmPfnFlags, HmmRange};
use hmm::zone_device::{memremap_pages, DevPagemap, DevPagemapOps, MemoryType, PagemapConfig};

/// A small machine: `mib` MiB of RAM and one address space with a recorder attached.
pub struct Machine {
    pub phys: Arc<PhysMem>,
    pub mm: Arc<Mm>,
    pub rec: Arc<Recorder>,
    _handle: MmuNotifierHandle,
}

impl Machine {
    pub fn new(mib: u64) -> Machine {
        let phys = PhysMem::new(PhysConfig::with_size(mib << 20)).unwrap();
        let mm = Mm::new(phys.clone());
        let rec = Arc::new(Recorder::new());
        let handle = mm.register_notifier(rec.clone()).unwrap();
        Machine {
            phys,
            mm,
            rec,
            _handle: handle,
        }
    }

    pub fn map(&self, pages: u64, prot: Prot, flags: MapFlags) -> VirtAddr {
        self.mm.mmap(None, pages * PAGE_SIZE, prot, flags).unwrap()
    }

    pub fn events(&self) -> Vec<(NotifierEvent, u64, u64)> {
        self.rec
            .take()
            .iter()
            .map(|r: &NotifierRange| (r.event, r.start().as_u64(), r.end().as_u64()))
            .collect()
    }
}

pub const RW: Prot = Prot::READ.union(Prot::WRITE);

/// The hugetlb sizes the ports of the kernel's selftests run their hugetlb kinds at, as
/// the C runs them at every size the kernel offers: 2 MiB, and 1 GiB too when
/// `HMM_HUGETLB_1G` is set. A 1 GiB case moves gigabytes of real bytes, so CI runs those
/// in a release build, one at a time:
/// `HMM_HUGETLB_1G=1 cargo test --release -p hmm --test cow --test gup_longterm -- --test-threads 1`.
pub fn hugetlb_sizes() -> Vec<HugetlbSize> {
    let mut sizes = vec![HugetlbSize::Size2M];
    if std::env::var_os("HMM_HUGETLB_1G").is_some() {
        sizes.push(HugetlbSize::Size1G);
    }
    sizes
}

/// `MAP_HUGE_2MB` or `MAP_HUGE_1GB`.
pub fn map_huge(size: HugetlbSize) -> MapFlags {
    match size {
        HugetlbSize::Size2M => MapFlags::HUGE_2MB,
        HugetlbSize::Size1G => MapFlags::HUGE_1GB,
    }
}

/// A private or shared `MAP_HUGETLB` mapping of `n` pages of `size`.
pub fn map_hugetlb(m: &Machine, size: HugetlbSize, n: u64, shared: bool) -> VirtAddr {
    let kind = if shared {
        MapFlags::SHARED
    } else {
        MapFlags::PRIVATE
    };
    let flags = kind | MapFlags::HUGETLB | map_huge(size);
    m.mm.mmap(None, n * size.bytes(), RW, flags).unwrap()
}

/// A machine with `pages` free pages of `size` in its hugetlb pool: 32 MiB of RAM for
/// 2 MiB pages; for 1 GiB pages, a GiB per page and one more (the first GiB holds the zero
/// pages, so it is never a gigantic page). RAM is sparse: only the bytes written cost host
/// memory.
pub fn hugetlb_machine(size: HugetlbSize, pages: u64) -> Machine {
    let mib = match size {
        HugetlbSize::Size2M => 32,
        HugetlbSize::Size1G => (pages + 1) << 10,
    };
    let m = Machine::new(mib);
    assert_eq!(m.phys.set_nr_hugepages_of(size, pages), pages);
    m
}

#[track_caller]
pub fn page(base: VirtAddr, i: u64) -> VirtAddr {
    base.checked_add(i * PAGE_SIZE).unwrap()
}

/// A pagemap with no callbacks (no CPU fault may reach it).
pub struct NoOps;
impl DevPagemapOps for NoOps {}

/// A device-private pagemap of 8 MiB with owner `owner`.
pub fn device(m: &Machine, owner: Owner) -> Arc<DevPagemap> {
    memremap_pages(
        &m.phys,
        PagemapConfig {
            kind: MemoryType::DevicePrivate,
            owner,
            size_bytes: 8 << 20,
        },
        Arc::new(NoOps),
    )
    .unwrap()
}

/// Writes a pattern (different per page and per `seed`) to `npages` at `a`; returns it.
pub fn fill(m: &Machine, a: VirtAddr, npages: u64, seed: u8) -> Vec<u8> {
    let data: Vec<u8> = (0..npages * PAGE_SIZE)
        .map(|i| (i as u8) ^ ((i / PAGE_SIZE) as u8).wrapping_mul(13) ^ seed)
        .collect();
    m.mm.write(a, &data).unwrap();
    data
}

/// Gives every migrating entry a page of `dev` holding the source's bytes (zeros for an
/// empty entry), then commits and finalizes; returns the pages migrated.
pub fn copy_to(dev: &DevPagemap, mut mig: Migration<'_, '_>) -> u64 {
    for i in 0..mig.src().len() {
        let w = mig.src()[i];
        if !w.is_migrating() {
            continue;
        }
        let d = dev.alloc(0, FrameFlags::empty()).unwrap();
        match mig.src_page(i) {
            Some(s) => d.copy_from(&s),
            None => d.zero(),
        }
        let write = w.flags().contains(MigratePfnFlags::WRITE) || !w.is_valid();
        mig.set_dst(i, d, write).unwrap();
    }
    mig.pages().finalize().migrated
}

/// A range over `pfns.len()` pages from `start` with a fresh sequence of `n`.
pub fn hmm_range<'a>(
    n: &'a IntervalSub,
    start: VirtAddr,
    pfns: &'a mut [HmmPfn],
    default_flags: HmmPfnFlags,
    pfn_flags_mask: HmmPfnFlags,
    dev_private_owner: Option<Owner>,
) -> HmmRange<'a> {
    HmmRange {
        notifier: n,
        notifier_seq: n.read_begin(),
        start,
        end: page(start, pfns.len() as u64),
        hmm_pfns: pfns,
        default_flags,
        pfn_flags_mask,
        dev_private_owner,
    }
}
