//! `migrate_vma` of 2 MiB from system memory to a device-private pagemap and back,
//! copying every page: setup, copy, pages, finalize. Two groups: 512 pages of 4 KiB, and
//! one THP moved whole (`SELECT_COMPOUND`: one device THP there, one system THP back).
//! Throughput in bytes, with memcpy of the same bytes in the same group as the baseline.
//! The pages are copied as drivers copy them, in one batch of streaming stores
//! (`copy_folios`), which write memory, not the cache; the memcpy's 2 MiB stay in the
//! cache, so at this size the baseline is the faster of the two by more than at the sizes
//! of `hmm bench migrate`.
//!
//! `cargo bench -p hmm --bench migrate`.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hmm::addr::{VirtAddr, PAGE_SIZE, PMD_ORDER, PMD_SIZE};
use hmm::migrate::{migrate_vma_setup, MigratePfnFlags, MigrateVma, MigrateVmaFlags};
use hmm::mm::{Advice, MapFlags, Mm, Prot};
use hmm::notifier::Owner;
use hmm::phys::{copy_folios, Frame, FrameFlags, PhysConfig, PhysMem};
use hmm::zone_device::{memremap_pages, DevPagemap, DevPagemapOps, MemoryType, PagemapConfig};

const NPAGES: u64 = 512;

struct Dev;
impl DevPagemapOps for Dev {}

fn migrate(mm: &Mm, dev: &DevPagemap, a: VirtAddr, to_device: bool) {
    let mmap = mm.mmap_read();
    let flags = MigrateVmaFlags::SELECT_COMPOUND
        | if to_device {
            MigrateVmaFlags::SELECT_SYSTEM
        } else {
            MigrateVmaFlags::SELECT_DEVICE_PRIVATE
        };
    let mut m = migrate_vma_setup(
        &mmap,
        MigrateVma {
            start: a,
            end: a.checked_add(NPAGES * PAGE_SIZE).expect("end"),
            pgmap_owner: Some(dev.owner()),
            flags,
            fault_page: None,
        },
    )
    .expect("setup");
    // The pages' destinations in one bulk allocation, the units' one by one.
    let small = m
        .src()
        .iter()
        .filter(|w| w.is_migrating() && w.npages() == 1)
        .count();
    let mut pages = if to_device {
        dev.alloc_bulk(small, FrameFlags::empty())
    } else {
        let frames = mm.phys().alloc_bulk(small, FrameFlags::empty());
        frames.into_iter().map(Frame::lock).collect()
    }
    .into_iter();
    let mut pairs = Vec::new();
    for i in 0..m.src().len() {
        let w = m.src()[i];
        if !w.is_migrating() {
            continue;
        }
        let dst = match (w.npages(), to_device) {
            (1, _) => pages.next().expect("memory for the pages"),
            (_, true) => dev
                .alloc(PMD_ORDER, FrameFlags::empty())
                .expect("device memory"),
            (_, false) => {
                let f = mm
                    .phys()
                    .alloc(PMD_ORDER, FrameFlags::empty())
                    .expect("RAM");
                f.lock()
            }
        };
        pairs.push((*dst, m.src_page(i).expect("a page or THP")));
        m.set_dst(i, dst, w.flags().contains(MigratePfnFlags::WRITE))
            .unwrap();
    }
    copy_folios(&pairs);
    let out = m.pages().finalize();
    assert_eq!(out.migrated, NPAGES);
}

fn bench(c: &mut Criterion) {
    let phys = PhysMem::new(PhysConfig {
        size_bytes: 32 << 20,
        prefault: true,
        per_cpu_lists: true,
    })
    .expect("RAM");
    let dev = memremap_pages(
        &phys,
        PagemapConfig {
            kind: MemoryType::DevicePrivate,
            owner: Owner::new_unique(),
            size_bytes: 8 << 20,
        },
        Arc::new(Dev),
    )
    .expect("pagemap");
    dev.prefault();
    let mm = Mm::new(phys);
    let len = NPAGES * PAGE_SIZE;
    let a = mm
        .mmap(None, len, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)
        .expect("mmap");
    mm.madvise(a, len, Advice::NoHugePage).expect("madvise");
    for i in 0..NPAGES {
        mm.write_val(a.checked_add(i * PAGE_SIZE).expect("in"), i)
            .expect("write");
    }
    let mut g = c.benchmark_group("migrate_2m_4k_pages");
    g.throughput(Throughput::Bytes(len));
    g.bench_function("round_trip", |b| {
        b.iter(|| {
            migrate(&mm, &dev, a, true);
            migrate(&mm, &dev, a, false);
        });
    });
    let mut src = vec![1u8; len as usize];
    let mut dst = vec![0u8; len as usize];
    g.bench_function("memcpy_round_trip", |b| {
        b.iter(|| {
            dst.copy_from_slice(&src);
            src.copy_from_slice(&dst);
        });
    });
    g.finish();

    // One THP, moved whole both ways each round.
    let t = mm
        .mmap(None, PMD_SIZE, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)
        .expect("mmap");
    mm.madvise(t, PMD_SIZE, Advice::HugePage).expect("madvise");
    mm.write(t, &src).expect("write");
    let mut g = c.benchmark_group("migrate_2m_thp");
    g.throughput(Throughput::Bytes(PMD_SIZE));
    g.bench_function("round_trip", |b| {
        b.iter(|| {
            migrate(&mm, &dev, t, true);
            migrate(&mm, &dev, t, false);
        });
    });
    assert_eq!(
        mm.pagemap(t, 1).expect("pagemap")[0].order,
        9,
        "still a THP"
    );
    g.bench_function("memcpy_round_trip", |b| {
        b.iter(|| {
            dst.copy_from_slice(&src);
            src.copy_from_slice(&dst);
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
