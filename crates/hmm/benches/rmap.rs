//! The reverse map in a fork family: evicting a child's own pages from a device
//! (`migrate_device_range`, copy, `finalize`: every page's migration entries are found
//! and put back by a reverse-map walk), in a family of 1, 16 and 256 address spaces.
//!
//! The root maps and writes a region, then forks the other members; the last member
//! maps a region of its own, writes it (its own pages, which no other member can map)
//! and migrates it to a device-private pagemap. Each timed eviction brings those pages
//! home; an untimed migration sends them back before the next. A walk scoped like the
//! kernel's `anon_vma` visits the one address space that can map them, so the family's
//! size should not show; the family of 1 is the baseline in the same run.
//!
//! `cargo bench -p hmm --bench rmap`.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::migrate::{migrate_device_range, migrate_vma_setup, MigrateVma, MigrateVmaFlags};
use hmm::mm::{MapFlags, Mm, Prot};
use hmm::notifier::Owner;
use hmm::phys::{FrameFlags, PhysConfig, PhysMem};
use hmm::zone_device::{memremap_pages, DevPagemap, DevPagemapOps, MemoryType, PagemapConfig};

/// The child's own pages, evicted each iteration.
const OWN: u64 = 64;
/// The root's region, shared copy-on-write with every member.
const SHARED: u64 = 64;

struct Dev;
impl DevPagemapOps for Dev {}

struct Family {
    phys: Arc<PhysMem>,
    dev: Arc<DevPagemap>,
    /// Every member, the root first; the last one owns the evicted pages.
    members: Vec<Arc<Mm>>,
    own: VirtAddr,
}

fn family(size: usize) -> Family {
    let phys = PhysMem::new(PhysConfig::with_size(64 << 20)).expect("RAM");
    let dev = memremap_pages(
        &phys,
        PagemapConfig {
            kind: MemoryType::DevicePrivate,
            owner: Owner::new_unique(),
            size_bytes: 4 << 20,
        },
        Arc::new(Dev),
    )
    .expect("pagemap");
    let rw = Prot::READ | Prot::WRITE;
    let root = Mm::new(phys.clone());
    let shared = root
        .mmap(None, SHARED * PAGE_SIZE, rw, MapFlags::PRIVATE)
        .expect("mmap");
    for i in 0..SHARED {
        root.write_val(shared.checked_add(i * PAGE_SIZE).expect("in"), i)
            .expect("write");
    }
    let mut members = vec![root.clone()];
    for _ in 1..size {
        members.push(root.fork().expect("fork"));
    }
    let owner = members.last().expect("one member").clone();
    let own = owner
        .mmap(None, OWN * PAGE_SIZE, rw, MapFlags::PRIVATE)
        .expect("mmap");
    for i in 0..OWN {
        owner
            .write_val(own.checked_add(i * PAGE_SIZE).expect("in"), !i)
            .expect("write");
    }
    let f = Family {
        phys,
        dev,
        members,
        own,
    };
    f.to_device();
    f
}

impl Family {
    fn owner(&self) -> &Mm {
        self.members.last().expect("one member")
    }

    /// Migrates the owner's pages to the device.
    fn to_device(&self) {
        let mmap = self.owner().mmap_read();
        let mut mig = migrate_vma_setup(
            &mmap,
            MigrateVma {
                start: self.own,
                end: self.own.checked_add(OWN * PAGE_SIZE).expect("in"),
                pgmap_owner: Some(self.dev.owner()),
                flags: MigrateVmaFlags::SELECT_SYSTEM,
                fault_page: None,
            },
        )
        .expect("setup");
        for i in 0..mig.src().len() {
            let d = self
                .dev
                .alloc(0, FrameFlags::empty())
                .expect("device memory");
            d.copy_from(&mig.src_page(i).expect("written"));
            mig.set_dst(i, d, true).expect("destination");
        }
        assert_eq!(mig.pages().finalize().migrated, OWN);
    }

    /// Evicts every page of the device to RAM; returns how long it took.
    fn evict(&self) -> Duration {
        let t = Instant::now();
        let mut mig = migrate_device_range(&self.phys, self.dev.frame(0), self.dev.nr_frames())
            .expect("range");
        for i in 0..mig.src().len() {
            if !mig.src()[i].is_migrating() {
                continue;
            }
            let d = self.phys.alloc(0, FrameFlags::empty()).expect("RAM").lock();
            d.copy_from(&mig.src_page(i).expect("device page"));
            mig.set_dst(i, d, true).expect("destination");
        }
        let migrated = mig.pages().finalize().migrated;
        let took = t.elapsed();
        assert_eq!(migrated, OWN);
        took
    }
}

fn evict_own_pages(c: &mut Criterion) {
    let mut g = c.benchmark_group("evict_own_pages");
    g.throughput(Throughput::Elements(OWN));
    for size in [1usize, 16, 256] {
        let f = family(size);
        g.bench_function(BenchmarkId::new("family", size), |b| {
            b.iter_custom(|n| {
                let mut total = Duration::ZERO;
                for _ in 0..n {
                    total += f.evict();
                    f.to_device();
                }
                total
            })
        });
        let last = f.own.checked_add((OWN - 1) * PAGE_SIZE).expect("in");
        f.evict();
        assert_eq!(f.owner().read_val::<u64>(last).expect("read"), !(OWN - 1));
    }
    g.finish();
}

criterion_group!(benches, evict_own_pages);
criterion_main!(benches);
