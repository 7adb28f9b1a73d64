//! `migrate_vma` both ways, with the selection flags and the owner the seed series added:
//! a range moved to device memory and back, a second migration that costs the device
//! nothing for the pages already there, and another device's pages left alone.
//!
//! ```text
//! cargo run -p hmm --example migrate_both_ways
//! ```
//!
//! `pgmap_owner` does two things. It selects: with `SELECT_DEVICE_PRIVATE` only the
//! device-private pages of that owner are collected, never another device's. And it is
//! carried by the migration's `MMU_NOTIFY_MIGRATE` invalidation, so the migrating
//! driver's own mirror can skip it: the driver updates its own table as it migrates.

use std::error::Error;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::migrate::{migrate_vma_setup, MigrateVma, MigrateVmaFlags, Migration};
use hmm::mm::{MapFlags, Mm, Prot, SwapKind};
use hmm::notifier::{
    IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierEvent, NotifierRange, Owner,
};
use hmm::phys::{FrameFlags, LockedFolio, PhysConfig, PhysMem};
use hmm::zone_device::{memremap_pages, DevPagemap, DevPagemapOps, MemoryType, PagemapConfig};

/// Device memory no CPU access reaches in this example (every page comes home by
/// migration), so the default callbacks do.
struct Ops;
impl DevPagemapOps for Ops {}

/// A device's mirror notifier that counts what it honours and what it skips.
struct Mirror {
    owner: Owner,
    honoured: AtomicU64,
    skipped: AtomicU64,
}

impl IntervalNotifierOps for Mirror {
    fn invalidate(&self, sub: &IntervalSub, range: &NotifierRange, seq: InvalidateSeq) -> bool {
        if range.event == NotifierEvent::Migrate && range.owner == Some(self.owner) {
            // Our own migration: it keeps our device table right itself.
            self.skipped.fetch_add(1, Ordering::Relaxed);
        } else {
            // (A real driver would drop its device entries for the range here.)
            self.honoured.fetch_add(1, Ordering::Relaxed);
        }
        sub.set_seq(seq);
        true
    }
}

fn device(phys: &Arc<PhysMem>) -> Result<(Owner, Arc<DevPagemap>), Box<dyn Error>> {
    let owner = Owner::new_unique();
    let config = PagemapConfig {
        kind: MemoryType::DevicePrivate,
        owner,
        size_bytes: 4 << 20,
    };
    Ok((owner, memremap_pages(phys, config, Arc::new(Ops))?))
}

/// Runs one migration of `npages` at `start` selecting `flags` for `owner`: every
/// collected page gets a destination from `alloc` with its bytes. Returns (collected,
/// migrated).
fn migrate<'p>(
    mm: &Mm,
    start: VirtAddr,
    npages: u64,
    owner: Owner,
    flags: MigrateVmaFlags,
    mut alloc: impl FnMut() -> LockedFolio<'p>,
) -> Result<(u64, u64), Box<dyn Error>> {
    let mmap = mm.mmap_read();
    let args = MigrateVma {
        start,
        end: start + npages * PAGE_SIZE,
        pgmap_owner: Some(owner),
        flags,
        fault_page: None,
    };
    let mut mig: Migration<'_, '_> = migrate_vma_setup(&mmap, args)?;
    let collected = mig.cpages();
    for i in 0..mig.src().len() {
        if !mig.src()[i].is_migrating() {
            continue;
        }
        let dst = alloc();
        match mig.src_page(i) {
            Some(src) => dst.copy_from(&src),
            None => dst.zero(),
        }
        mig.set_dst(i, dst, true)
            .expect("one destination per entry");
    }
    Ok((collected, mig.pages().finalize().migrated))
}

fn on_device(mm: &Mm, start: VirtAddr, npages: u64) -> Result<usize, Box<dyn Error>> {
    Ok(mm
        .pagemap(start, npages)?
        .iter()
        .filter(|e| e.swap == Some(SwapKind::DevicePrivate))
        .count())
}

fn main() -> Result<(), Box<dyn Error>> {
    let phys = PhysMem::new(PhysConfig::with_size(32 << 20))?;
    let (owner0, dev0) = device(&phys)?;
    let (owner1, dev1) = device(&phys)?;
    let mm = Mm::new(Arc::clone(&phys));
    let n = 64;
    let buf = mm.mmap(
        None,
        n * PAGE_SIZE,
        Prot::READ | Prot::WRITE,
        MapFlags::PRIVATE,
    )?;
    let data: Vec<u32> = (0..(n * PAGE_SIZE / 4) as u32).collect();
    mm.write_slice(buf, &data)?;
    let mirror = Arc::new(Mirror {
        owner: owner0,
        honoured: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
    });
    let _notifier = mm.interval_notifier_insert(
        buf,
        n * PAGE_SIZE,
        Arc::clone(&mirror) as Arc<dyn IntervalNotifierOps>,
    )?;
    let to_dev0 = || {
        dev0.alloc(0, FrameFlags::empty())
            .expect("device 0 has room")
    };
    let home = || {
        phys.alloc(0, FrameFlags::empty())
            .expect("RAM has room")
            .lock()
    };

    // 1. System memory to device 0: SELECT_SYSTEM.
    let (c, m) = migrate(&mm, buf, n, owner0, MigrateVmaFlags::SELECT_SYSTEM, to_dev0)?;
    println!(
        "to device 0:   collected {c}, migrated {m}; {} pages on a device",
        on_device(&mm, buf, n)?
    );
    assert_eq!(m, n);

    // 2. The same call again: the pages are already there and nothing is selected; the
    //    one MIGRATE event carries device 0's owner, so its mirror skips it.
    let (c, m) = migrate(&mm, buf, n, owner0, MigrateVmaFlags::SELECT_SYSTEM, to_dev0)?;
    println!("again:         collected {c}, migrated {m}");
    assert_eq!((c, m), (0, 0));

    // 3. Device 1 asks for device-private pages with its own owner: device 0's are not its.
    let to_dev1 = || {
        dev1.alloc(0, FrameFlags::empty())
            .expect("device 1 has room")
    };
    let (c, _) = migrate(
        &mm,
        buf,
        n,
        owner1,
        MigrateVmaFlags::SELECT_DEVICE_PRIVATE,
        to_dev1,
    )?;
    println!("device 1:      collected {c} (device 0's pages are not its own)");
    assert_eq!(c, 0);

    // 4. Device 0 evicts its pages home: SELECT_DEVICE_PRIVATE with its owner.
    let (c, m) = migrate(
        &mm,
        buf,
        n,
        owner0,
        MigrateVmaFlags::SELECT_DEVICE_PRIVATE,
        home,
    )?;
    println!(
        "home:          collected {c}, migrated {m}; {} pages on a device",
        on_device(&mm, buf, n)?
    );
    assert_eq!((m, dev0.nr_in_use()), (n, 0));

    let mut back = vec![0u32; data.len()];
    mm.read_slice(buf, &mut back)?;
    assert_eq!(back, data);
    println!(
        "every byte came back; device 0's mirror skipped {} of its own MIGRATE events and honoured {} others",
        mirror.skipped.load(Ordering::Relaxed),
        mirror.honoured.load(Ordering::Relaxed)
    );
    assert_eq!(
        mirror.honoured.load(Ordering::Relaxed),
        1,
        "device 1's MIGRATE event"
    );
    Ok(())
}
