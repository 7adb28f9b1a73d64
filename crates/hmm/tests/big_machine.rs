//! A DGX-sized machine on a laptop: 2 TiB of RAM and eight devices of 80 GiB each, used
//! sparsely. The frames' bytes and metadata are committed on the host as they are used,
//! so the machine costs the host what its working set does (`PhysMem::host_resident_bytes`).

mod common;

use std::sync::Arc;

use common::{copy_to, NoOps};
use hmm::addr::PAGE_SIZE;
use hmm::migrate::{migrate_device_range, migrate_vma_setup, MigrateVma, MigrateVmaFlags};
use hmm::mm::{MapFlags, Mm, Prot};
use hmm::notifier::Owner;
use hmm::phys::{
    FrameFlags, PhysConfig, PhysError, PhysMem, MAX_RAM_BYTES, MAX_SECTION_BYTES, SECTION_SHIFT,
};
use hmm::zone_device::{memremap_pages, MemoryType, PagemapConfig};

const GIB: u64 = 1 << 30;

#[test]
fn two_tib_of_ram_and_eight_80_gib_devices_cost_the_host_their_working_set() {
    let phys = PhysMem::new(PhysConfig::with_size(2048 * GIB)).unwrap();
    assert_eq!(phys.stats().nr_frames, 2048 * GIB / PAGE_SIZE);
    let devs: Vec<_> = (0..8)
        .map(|_| {
            memremap_pages(
                &phys,
                PagemapConfig {
                    kind: MemoryType::DevicePrivate,
                    owner: Owner::new_unique(),
                    size_bytes: 80 * GIB,
                },
                Arc::new(NoOps),
            )
            .unwrap()
        })
        .collect();
    // RAM spans 8 sections; the pagemaps take the sections after it.
    for (i, d) in devs.iter().enumerate() {
        assert_eq!(
            d.frame(0).device_pfn().as_u64() >> SECTION_SHIFT,
            8 + i as u64
        );
        assert_eq!(d.id(), 8 + i as u32);
    }

    // One page written every 4 GiB of a 1 TiB mapping: 256 pages.
    let mm = Mm::new(phys.clone());
    let a = mm
        .mmap(
            None,
            1024 * GIB,
            Prot::READ | Prot::WRITE,
            MapFlags::PRIVATE,
        )
        .unwrap();
    let at = |i: u64| a.checked_add(i * 4 * GIB).unwrap();
    for i in 0..256 {
        mm.write_val(at(i), i ^ 0xabcd).unwrap();
    }
    // Each device takes 32 of them and gives them back.
    for (d, dev) in devs.iter().enumerate() {
        for i in (d as u64 * 32)..(d as u64 + 1) * 32 {
            let mmap = mm.mmap_read();
            let mig = migrate_vma_setup(
                &mmap,
                MigrateVma {
                    start: at(i),
                    end: at(i).checked_add(PAGE_SIZE).unwrap(),
                    pgmap_owner: Some(dev.owner()),
                    flags: MigrateVmaFlags::SELECT_SYSTEM,
                    fault_page: None,
                },
            )
            .unwrap();
            assert_eq!(copy_to(dev, mig), 1);
        }
        assert_eq!(dev.nr_in_use(), 32);
        evict(&phys, dev);
        assert_eq!(dev.nr_in_use(), 0);
    }
    for i in 0..256 {
        assert_eq!(mm.read_val::<u64>(at(i)).unwrap(), i ^ 0xabcd);
    }
    mm.audit().unwrap();

    // 2.6 TiB of simulated memory; the host committed about 2 MiB for its frames and their
    // metadata (the allocators' block tables, 72 bytes per 2 MiB, are allocated up front).
    let resident = phys.host_resident_bytes();
    assert!(resident < 16 << 20, "{} KiB resident", resident >> 10);
}

/// Brings every page of `dev`'s first 2 MiB back to RAM (where its allocator put them: the
/// caller checks that nothing is left), as a driver evicts the chunks it used.
fn evict(phys: &PhysMem, dev: &hmm::zone_device::DevPagemap) {
    let mut mig = migrate_device_range(phys, dev.frame(0), 512).unwrap();
    for i in 0..mig.src().len() {
        if !mig.src()[i].is_migrating() {
            continue;
        }
        let d = phys.alloc(0, FrameFlags::empty()).unwrap().lock();
        d.copy_from(&mig.src_page(i).unwrap());
        mig.set_dst(i, d, true).unwrap();
    }
    mig.pages().finalize();
}

#[test]
fn ram_beyond_the_largest_is_refused() {
    assert!(matches!(
        PhysMem::new(PhysConfig::with_size(MAX_RAM_BYTES + 2 * (1 << 20))),
        Err(PhysError::Inval { .. })
    ));
    // A pagemap is still one section at most.
    let phys = PhysMem::new(PhysConfig::with_size(16 << 20)).unwrap();
    assert!(memremap_pages(
        &phys,
        PagemapConfig {
            kind: MemoryType::DevicePrivate,
            owner: Owner::new_unique(),
            size_bytes: MAX_SECTION_BYTES + (2 << 20),
        },
        Arc::new(NoOps),
    )
    .is_err());
}
