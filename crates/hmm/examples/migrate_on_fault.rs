//! Migrate on fault (`MIGRATE_VMA_FAULT`, `HMM_PFN_REQ_MIGRATE`): pages a plain
//! `migrate_vma` cannot take are faulted in and collected in the same page-table walk,
//! instead of the three walks of the older recipe.
//!
//! ```text
//! cargo run -p hmm --example migrate_on_fault
//! ```
//!
//! A third of the range is held for device atomics by another device
//! (`make_device_exclusive`): `migrate_vma` skips device-exclusive entries. The old recipe
//! migrates, finds what did not move, faults those in with `hmm_range_fault` (which
//! revokes the exclusive access), and migrates them: three walks at least. `migrate_vma_setup` with
//! `MigrateVmaFlags::FAULT` does it in one.

use std::error::Error;
use std::sync::Arc;

use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::exclusive::make_device_exclusive;
use hmm::migrate::{migrate_vma_setup, MigrateVma, MigrateVmaFlags, Migration};
use hmm::mm::{MapFlags, Mm, Prot};
use hmm::notifier::{IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierRange, Owner};
use hmm::phys::{FrameFlags, PhysConfig, PhysMem};
use hmm::range_fault::{hmm_range_fault, HmmError, HmmPfn, HmmPfnFlags, HmmRange};
use hmm::zone_device::{memremap_pages, DevPagemap, DevPagemapOps, MemoryType, PagemapConfig};

struct Ops;
impl DevPagemapOps for Ops {}

/// A notifier that only records the sequence (the example keeps no device table).
struct Seq;
impl IntervalNotifierOps for Seq {
    fn invalidate(&self, sub: &IntervalSub, _: &NotifierRange, seq: InvalidateSeq) -> bool {
        sub.set_seq(seq);
        true
    }
}

const N: u64 = 48;

/// A buffer of `N` written pages, the middle third exclusive to another device.
fn buffer(mm: &Mm) -> Result<VirtAddr, Box<dyn Error>> {
    let buf = mm.mmap(
        None,
        N * PAGE_SIZE,
        Prot::READ | Prot::WRITE,
        MapFlags::PRIVATE,
    )?;
    let data: Vec<u64> = (0..N * PAGE_SIZE / 8).collect();
    mm.write_slice(buf, &data)?;
    let other = Owner::new_unique();
    let mmap = mm.mmap_read();
    for i in N / 3..2 * N / 3 {
        // Dropping the page unlocks it; the entry stays device-exclusive.
        drop(make_device_exclusive(
            &mmap,
            buf + i * PAGE_SIZE,
            Some(other),
        )?);
    }
    Ok(buf)
}

/// Gives every collected page a device page with its bytes and commits; returns the pages
/// migrated.
fn copy_to(dev: &DevPagemap, mut mig: Migration<'_, '_>) -> u64 {
    for i in 0..mig.src().len() {
        if !mig.src()[i].is_migrating() {
            continue;
        }
        let dst = dev.alloc(0, FrameFlags::empty()).expect("device memory");
        match mig.src_page(i) {
            Some(src) => dst.copy_from(&src),
            None => dst.zero(),
        }
        mig.set_dst(i, dst, true)
            .expect("one destination per entry");
    }
    mig.pages().finalize().migrated
}

/// One migration of `args` into `dev`; returns the pages migrated.
fn migrate(mm: &Mm, dev: &DevPagemap, args: MigrateVma) -> Result<u64, Box<dyn Error>> {
    let mmap = mm.mmap_read();
    let mig = migrate_vma_setup(&mmap, args)?;
    Ok(copy_to(dev, mig))
}

fn args(start: VirtAddr, npages: u64, owner: Owner, flags: MigrateVmaFlags) -> MigrateVma {
    MigrateVma {
        start,
        end: start + npages * PAGE_SIZE,
        pgmap_owner: Some(owner),
        flags,
        fault_page: None,
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let phys = PhysMem::new(PhysConfig::with_size(32 << 20))?;
    let owner = Owner::new_unique();
    let config = PagemapConfig {
        kind: MemoryType::DevicePrivate,
        owner,
        size_bytes: 4 << 20,
    };
    let dev = memremap_pages(&phys, config, Arc::new(Ops))?;
    let mm = Mm::new(Arc::clone(&phys));
    let sel = MigrateVmaFlags::SELECT_SYSTEM;

    // The old recipe: migrate, fault what stayed behind, migrate again.
    let a = buffer(&mm)?;
    let notifier = mm.interval_notifier_insert(a, N * PAGE_SIZE, Arc::new(Seq))?;
    let before = mm.stats();
    let (first, behind) = {
        let mmap = mm.mmap_read();
        let mig = migrate_vma_setup(&mmap, args(a, N, owner, sel))?;
        let behind: Vec<u64> = (0..N)
            .filter(|&i| !mig.src()[i as usize].is_migrating())
            .collect();
        (copy_to(&dev, mig), behind)
    };
    let (lo, hi) = (behind[0], behind[behind.len() - 1] + 1);
    let mut pfns = vec![HmmPfn::default(); (hi - lo) as usize];
    loop {
        let mut range = HmmRange {
            notifier: &notifier,
            notifier_seq: notifier.read_begin(),
            start: a + lo * PAGE_SIZE,
            end: a + hi * PAGE_SIZE,
            hmm_pfns: &mut pfns,
            default_flags: HmmPfnFlags::REQ_FAULT | HmmPfnFlags::REQ_WRITE,
            pfn_flags_mask: HmmPfnFlags::empty(),
            dev_private_owner: Some(owner),
        };
        // Revoking the exclusive entries invalidates the range being read: `Busy`, and
        // the walk is retried from `read_begin` (the pages faulted stay faulted).
        match hmm_range_fault(&mm.mmap_read(), &mut range) {
            Err(HmmError::Busy) => continue,
            r => break r?,
        }
    }
    let second = migrate(&mm, &dev, args(a + lo * PAGE_SIZE, hi - lo, owner, sel))?;
    let old = mm.stats().since(&before);
    println!(
        "migrate, fault, migrate: {first} + {second} pages moved in {} page-table walks ({} migrate_vma, {} hmm_range_fault)",
        old.range_walks.migrate + old.range_walks.hmm,
        old.range_walks.migrate,
        old.range_walks.hmm
    );
    assert_eq!(first + second, N);

    // Migrate on fault: one walk faults the exclusive entries back and collects everything.
    let b = buffer(&mm)?;
    let before = mm.stats();
    let moved = migrate(&mm, &dev, args(b, N, owner, sel | MigrateVmaFlags::FAULT))?;
    let new = mm.stats().since(&before);
    println!(
        "MIGRATE_VMA_FAULT:       {moved} pages moved in {} page-table walk",
        new.range_walks.migrate + new.range_walks.hmm
    );
    assert_eq!(
        (moved, new.range_walks.migrate + new.range_walks.hmm),
        (N, 1)
    );
    assert_eq!(dev.nr_in_use(), 2 * N);
    Ok(())
}
