//! Device THP through dmirror (the kernel's `migrate_anon_huge_*`, `migrate_partial_unmap_fault`
//! and `migrate_remap_fault` selftests): a 2 MiB unit goes to the device as one device THP,
//! comes back whole on a CPU fault or MIGRATE_TO_SYS, falls back to pages when an
//! allocation fails, and survives partial munmap, mremap and device removal.

mod common;

use common::{page, rig, Rig, RW};
use hmm::addr::{VirtAddr, PAGE_SIZE, PMD_NR, PMD_SIZE};
use hmm::mm::{Advice, MremapFlags, SwapKind};
use hmm_dmirror::{prot, Dmirror, DmirrorCmd, HmmDmirrorCmd, HMM_DMIRROR_FLAG_FAIL_ALLOC};

const NR: u64 = PMD_NR;
const PMD_LOCAL: u8 = prot::DEV_PRIVATE_LOCAL | prot::WRITE | prot::PMD;

/// A 2 MiB-aligned private mapping of `pmds` PMDs with MADV_HUGEPAGE.
fn huge_map(r: &Rig, pmds: u64) -> VirtAddr {
    let a = r.map(pmds * NR);
    assert!(a.is_aligned(PMD_SIZE));
    r.mm.madvise(a, pmds * PMD_SIZE, Advice::HugePage).unwrap();
    a
}

/// Writes `tag + i` at the start of page `i`.
fn fill(r: &Rig, a: VirtAddr, pages: u64, tag: u64) {
    for i in 0..pages {
        r.mm.write_val(page(a, i), tag + i).unwrap();
    }
}

fn check(r: &Rig, a: VirtAddr, pages: impl IntoIterator<Item = u64>, tag: u64) {
    for i in pages {
        let want = if tag == 0 { 0 } else { tag + i };
        assert_eq!(r.mm.read_val::<u64>(page(a, i)).unwrap(), want, "page {i}");
    }
}

/// Runs a command over `npages` from `a` with a user buffer large enough for the read-back.
fn run(r: &Rig, d: &Dmirror, which: DmirrorCmd, a: VirtAddr, npages: u64) -> HmmDmirrorCmd {
    let buf = r.map(npages);
    let mut c = HmmDmirrorCmd {
        addr: a.as_u64(),
        ptr: buf.as_u64(),
        npages,
        ..HmmDmirrorCmd::default()
    };
    d.ioctl(which, &mut c).unwrap();
    r.mm.munmap(buf, npages * PAGE_SIZE).unwrap();
    c
}

fn is_pmd_mapped_thp(r: &Rig, a: VirtAddr) -> bool {
    r.mm.pagemap(a, NR)
        .unwrap()
        .iter()
        .all(|e| e.present && e.order == 9)
}

#[test]
fn an_empty_2mib_and_the_huge_zero_page_become_device_thps() {
    let r = rig();
    let d = r.open(0);
    let a = huge_map(&r, 2);
    // PMD 1 maps the huge zero page; PMD 0 is empty.
    assert_eq!(r.mm.read_val::<u64>(page(a, NR)).unwrap(), 0);
    let before = r.mm.stats();
    let c = run(&r, &d, DmirrorCmd::MigrateToDev, a, 2 * NR);
    assert_eq!(c.cpages, 2 * NR);
    let s = r.mm.stats().since(&before);
    assert_eq!(s.migrate.pages_collected, 2 * NR);
    assert_eq!(s.migrate.pages_migrated, 2 * NR);
    assert_eq!(d.stats().pages_zero_filled, 2 * NR);
    assert!(r.snapshot(&d, a, 64).iter().all(|&b| b == PMD_LOCAL));
    let map = r.mm.pagemap(a, 2 * NR).unwrap();
    assert!(map
        .iter()
        .all(|e| e.swap == Some(SwapKind::DevicePrivate) && e.order == 9));
    assert_eq!(r.driver.device(0).nr_in_use(), 2 * NR);
    r.mm.audit().unwrap();
    // Back whole: two system THPs of zeros.
    let c = run(&r, &d, DmirrorCmd::MigrateToSys, a, 2 * NR);
    assert_eq!(
        c.cpages, 2,
        "a unit counts once, as the kernel's driver counts it"
    );
    assert!(is_pmd_mapped_thp(&r, a) && is_pmd_mapped_thp(&r, page(a, NR)));
    check(&r, a, 0..2 * NR, 0);
    assert_eq!(r.driver.device(0).nr_in_use(), 0);
    r.mm.audit().unwrap();
}

#[test]
fn a_cpu_fault_brings_a_device_thp_back_whole() {
    let r = rig();
    let d = r.open(0);
    let a = huge_map(&r, 1);
    fill(&r, a, NR, 1000);
    let c = run(&r, &d, DmirrorCmd::MigrateToDev, a, NR);
    assert_eq!(c.cpages, NR);
    assert_eq!(d.stats().pages_copied_to_device, NR);
    assert_eq!(r.mm.stats().thp_split_folio, 0);
    assert!(r.snapshot(&d, a, 8).iter().all(|&b| b == PMD_LOCAL));
    let before = r.mm.stats();
    assert_eq!(r.mm.read_val::<u64>(page(a, 300)).unwrap(), 1300);
    let s = r.mm.stats().since(&before);
    assert_eq!(s.faults.device_private, 1, "one fault for the whole unit");
    assert_eq!(s.migrate.pages_migrated, NR);
    assert!(is_pmd_mapped_thp(&r, a));
    assert_eq!(d.nr_mapped(), 0, "the device's entries went with the pages");
    check(&r, a, 0..NR, 1000);
    assert_eq!(r.driver.device(0).nr_in_use(), 0);
    r.mm.audit().unwrap();
}

#[test]
fn allocation_failures_fall_back_to_pages_both_ways() {
    let r = rig();
    let d = r.open(0);
    let a = huge_map(&r, 1);
    fill(&r, a, NR, 2000);
    r.run(&d, DmirrorCmd::Flags, a, HMM_DMIRROR_FLAG_FAIL_ALLOC)
        .unwrap();
    let before = r.mm.stats();
    let c = run(&r, &d, DmirrorCmd::MigrateToDev, a, NR);
    assert_eq!(c.cpages, NR);
    assert_eq!(r.mm.stats().since(&before).thp_split_folio, 1);
    assert!(r
        .snapshot(&d, a, 8)
        .iter()
        .all(|&b| b == prot::DEV_PRIVATE_LOCAL | prot::WRITE));
    r.mm.audit().unwrap();
    // The pages come back one by one; a device THP made again comes back as pages too
    // when the system THP cannot be had.
    let c = run(&r, &d, DmirrorCmd::MigrateToSys, a, NR);
    assert_eq!(c.cpages, NR);
    check(&r, a, 0..NR, 2000);
    r.mm.madvise(a, PMD_SIZE, Advice::Collapse).unwrap();
    assert!(is_pmd_mapped_thp(&r, a));
    run(&r, &d, DmirrorCmd::MigrateToDev, a, NR);
    assert!(r.snapshot(&d, a, 8).iter().all(|&b| b == PMD_LOCAL));
    r.run(&d, DmirrorCmd::Flags, a, HMM_DMIRROR_FLAG_FAIL_ALLOC)
        .unwrap();
    let c = run(&r, &d, DmirrorCmd::MigrateToSys, a, NR);
    assert_eq!(c.cpages, NR, "split into 512 entries");
    let map = r.mm.pagemap(a, NR).unwrap();
    assert!(map.iter().all(|e| e.present && e.order == 0));
    check(&r, a, 0..NR, 2000);
    assert_eq!(r.driver.device(0).nr_in_use(), 0);
    r.mm.audit().unwrap();
}

#[test]
fn a_partial_munmap_of_a_device_thp_keeps_the_rest() {
    let r = rig();
    let d = r.open(0);
    let a = huge_map(&r, 1);
    fill(&r, a, NR, 3000);
    run(&r, &d, DmirrorCmd::MigrateToDev, a, NR);
    r.mm.munmap(page(a, 100), 4 * PAGE_SIZE).unwrap();
    r.mm.audit().unwrap();
    // Every remaining page faults back (the folio is split on the first fault).
    check(&r, a, (0..100).chain(104..NR), 3000);
    assert_eq!(r.driver.device(0).nr_in_use(), 0);
    r.mm.audit().unwrap();
}

#[test]
fn a_remapped_device_thp_faults_back_at_its_new_address() {
    let r = rig();
    let d = r.open(0);
    let a = huge_map(&r, 1);
    fill(&r, a, NR, 4000);
    run(&r, &d, DmirrorCmd::MigrateToDev, a, NR);
    let to = huge_map(&r, 1);
    let b =
        r.mm.mremap(
            a,
            PMD_SIZE,
            PMD_SIZE,
            MremapFlags::MAYMOVE | MremapFlags::FIXED,
            Some(to),
        )
        .unwrap();
    assert_eq!(b, to);
    assert!(r.mm.pagemap(b, 1).unwrap()[0].swap == Some(SwapKind::DevicePrivate));
    check(&r, b, 0..NR, 4000);
    assert!(is_pmd_mapped_thp(&r, b));
    r.mm.audit().unwrap();
}

#[test]
fn device_removal_evicts_device_thps_whole() {
    let r = rig();
    let d = r.open(0);
    let a = huge_map(&r, 2);
    fill(&r, a, 2 * NR, 5000);
    run(&r, &d, DmirrorCmd::MigrateToDev, a, 2 * NR);
    let child = r.mm.fork().unwrap();
    r.run(&d, DmirrorCmd::Release, a, 1).unwrap();
    assert_eq!(r.driver.device(0).nr_in_use(), 0);
    for mm in [&r.mm, &child] {
        assert!(mm
            .pagemap(a, 2 * NR)
            .unwrap()
            .iter()
            .all(|e| e.present && e.order == 9));
        mm.audit().unwrap();
    }
    check(&r, a, 0..2 * NR, 5000);
    child.write_val(a, 0u64).unwrap();
    check(&r, a, 0..2 * NR, 5000);
}

#[test]
fn migrate_on_fault_collects_units_in_its_one_walk() {
    let r = rig();
    let d = r.open(0);
    let a = huge_map(&r, 2);
    fill(&r, a, NR, 6000);
    let before = r.mm.stats();
    let c = run(&r, &d, DmirrorCmd::MigrateOnFaultToDev, a, 2 * NR);
    assert_eq!(c.cpages, 2 * NR);
    let s = r.mm.stats().since(&before);
    assert_eq!(s.range_walks.hmm, 2, "one walk per 512-page piece");
    assert_eq!(s.thp_split_folio, 0);
    assert!(r.snapshot(&d, a, 2 * NR).iter().all(|&b| b == PMD_LOCAL));
    check(&r, a, 0..NR, 6000);
    r.mm.audit().unwrap();
}

#[test]
fn writes_to_a_device_thp_mapping_need_write_permission() {
    let r = rig();
    let d = r.open(0);
    let a = huge_map(&r, 1);
    fill(&r, a, NR, 7000);
    r.mm.mprotect(a, PMD_SIZE, hmm::mm::Prot::READ).unwrap();
    run(&r, &d, DmirrorCmd::MigrateToDev, a, NR);
    let snap = r.snapshot(&d, a, 4);
    assert!(snap
        .iter()
        .all(|&b| b == prot::DEV_PRIVATE_LOCAL | prot::READ | prot::PMD));
    r.mm.mprotect(a, PMD_SIZE, RW).unwrap();
    check(&r, a, 0..NR, 7000);
    r.mm.write_val(a, 1u64).unwrap();
    r.mm.audit().unwrap();
}

#[test]
fn a_coherent_device_takes_a_thp_whole_and_gives_it_back() {
    let r = rig();
    let d = r.open(2);
    let a = huge_map(&r, 1);
    fill(&r, a, NR, 8000);
    let c = run(&r, &d, DmirrorCmd::MigrateToDev, a, NR);
    assert_eq!(c.cpages, NR);
    let local = prot::DEV_COHERENT_LOCAL | prot::WRITE | prot::PMD;
    assert!(r.snapshot(&d, a, 8).iter().all(|&b| b == local));
    // CPU-addressable: read and written in place, no fault.
    let before = r.mm.stats();
    check(&r, a, 0..NR, 8000);
    assert_eq!(r.mm.stats().since(&before).faults.total(), 0);
    r.mm.audit().unwrap();
    let c = run(&r, &d, DmirrorCmd::MigrateToSys, a, NR);
    assert_eq!(c.cpages, 1, "one unit");
    assert!(is_pmd_mapped_thp(&r, a));
    assert!(r
        .snapshot(&d, a, 8)
        .iter()
        .all(|&b| b == prot::WRITE | prot::PMD));
    check(&r, a, 0..NR, 8000);
    assert_eq!(r.driver.device(2).nr_in_use(), 0);
    r.mm.audit().unwrap();
}

#[test]
fn a_1g_hugetlb_page_is_reported_at_pud_level() {
    // dmirror_mkentry's HMM_DMIRROR_PROT_PUD: a 1 GiB hugetlb page is mapped by a PUD.
    let r = common::rig_with_ram(3 << 30);
    let gig = hmm::phys::HugetlbSize::Size1G;
    assert_eq!(r.phys.set_nr_hugepages_of(gig, 1), 1);
    let flags =
        hmm::mm::MapFlags::PRIVATE | hmm::mm::MapFlags::HUGETLB | hmm::mm::MapFlags::HUGE_1GB;
    let a = r.mm.mmap(None, 1 << 30, RW, flags).unwrap();
    fill(&r, a, 4, 9000);
    let d = r.open(0);
    let snap = r.snapshot(&d, a, 4);
    assert!(
        snap.iter().all(|&b| b == prot::WRITE | prot::PUD),
        "{snap:?}"
    );
    r.mm.mprotect(a, 1 << 30, hmm::mm::Prot::READ).unwrap();
    let snap = r.snapshot(&d, a, 4);
    assert!(
        snap.iter().all(|&b| b == prot::READ | prot::PUD),
        "{snap:?}"
    );
    // A hugetlb VMA does not migrate.
    assert!(r.run(&d, DmirrorCmd::MigrateToDev, a, 4).is_err());
    check(&r, a, 0..4, 9000);
    r.mm.audit().unwrap();
}
