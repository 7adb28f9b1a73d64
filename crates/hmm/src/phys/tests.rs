use super::*;
use crate::addr::{PMD_NR, PMD_ORDER};

fn ram(mib: u64) -> Arc<PhysMem> {
    PhysMem::new(PhysConfig::with_size(mib << 20)).unwrap()
}

#[test]
fn config_is_validated() {
    assert!(matches!(
        PhysMem::new(PhysConfig::with_size(2 << 20)),
        Err(PhysError::Inval { .. })
    ));
    assert!(matches!(
        PhysMem::new(PhysConfig::with_size((4 << 20) + 4096)),
        Err(PhysError::Inval { .. })
    ));
}

#[test]
fn zero_pages_are_reserved() {
    let p = ram(4);
    assert_eq!(p.nr_in_use(), 0);
    assert!(p.is_zero_pfn(p.zero_pfn()));
    assert!(p.is_huge_zero_pfn(Pfn::new(511)));
    assert!(!p.is_huge_zero_pfn(p.zero_pfn()));
    let z = p.frame(p.zero_pfn());
    assert!(z.meta().flags().contains(FrameFlags::RESERVED));
    assert!(z.is_zero());
    // Every other frame of the second block is allocatable.
    let frames: Vec<_> = (0..PMD_NR - 1)
        .map(|_| p.alloc(0, FrameFlags::ANON).unwrap())
        .collect();
    assert!(frames.iter().all(|f| !p.is_zero_pfn(f.pfn())));
    assert_eq!(
        p.alloc(0, FrameFlags::ANON).unwrap_err(),
        AllocError { order: 0 }
    );
    assert_eq!(p.nr_in_use(), PMD_NR - 1);
    drop(frames);
    assert_eq!(p.nr_in_use(), 0);
}

#[test]
fn frames_return_on_last_put() {
    let p = ram(8);
    let f = p.alloc_zeroed(0, FrameFlags::ANON).unwrap();
    assert!(f.is_zero());
    f.write(10, b"data");
    let g = f.get();
    assert_eq!(f.folio().meta().refcount(), 2);
    drop(f);
    assert_eq!(p.nr_in_use(), 1);
    let raw = g.into_raw();
    assert_eq!(p.nr_in_use(), 1);
    let mut b = [0u8; 4];
    p.frame(raw).read(10, &mut b);
    assert_eq!(&b, b"data");
    drop(Frame::from_raw(&p, raw));
    assert_eq!(p.nr_in_use(), 0);
    assert_eq!(p.frame(raw).try_get().unwrap_err(), GetFrameError::Unused);
    let s = p.stats();
    assert_eq!((s.nr_alloc_ops, s.nr_free_ops), (1, 1));
}

#[test]
fn huge_folios_count_on_the_head() {
    let p = ram(8);
    let f = p.alloc_zeroed(PMD_ORDER, FrameFlags::ANON).unwrap();
    let head = f.pfn();
    assert!(head.is_aligned_to_order(PMD_ORDER));
    assert_eq!(p.nr_in_use(), PMD_NR);
    let tail = p.frame(head.checked_add(7).unwrap());
    assert!(tail.meta().flags().contains(FrameFlags::TAIL));
    assert_eq!(tail.folio().pfn(), head);
    tail.write(0, b"x");
    let extra = tail.get();
    assert_eq!(f.meta().refcount(), 2);
    drop(f);
    drop(extra);
    assert_eq!(p.nr_in_use(), 0);
    assert!(!tail.meta().flags().contains(FrameFlags::TAIL));
}

/// Folios of every order from 8 KiB to 1 MiB (the multi-size THPs' orders) are aligned,
/// counted on their head, found from any tail, freed whole, and split into pages.
#[test]
fn folios_of_every_small_order_count_on_the_head_and_split() {
    let p = ram(8);
    for order in 1..PMD_ORDER {
        let n = 1u64 << order;
        let f = p.alloc_zeroed(order, FrameFlags::ANON).unwrap();
        let head = f.pfn();
        assert!(head.is_aligned_to_order(order), "order {order}");
        assert_eq!(f.meta().order(), order);
        assert_eq!(p.nr_in_use(), n);
        for k in 1..n {
            let tail = p.frame(head.checked_add(k).unwrap());
            assert!(tail.meta().flags().contains(FrameFlags::TAIL));
            assert_eq!(tail.folio().pfn(), head, "order {order} page {k}");
        }
        // The page after the folio is not part of it.
        let next = p.frame(head.checked_add(n).unwrap());
        assert_ne!(next.folio().pfn(), head);
        drop(f);
        assert_eq!(p.nr_in_use(), 0, "order {order} freed whole");
    }
    // Split an order-4 folio: 16 locked pages, each with its own reference.
    let f = p.alloc(4, FrameFlags::ANON).unwrap().lock();
    let head = f.pfn();
    let raw = f.into_raw_nr();
    let h = p.frame(head);
    assert!(h.meta().freeze(1));
    h.split_frozen(1, 0);
    for k in 0..16 {
        let page = p.frame(head.checked_add(k).unwrap());
        assert_eq!(page.folio().pfn(), page.pfn());
        assert_eq!(page.meta().order(), 0);
        assert_eq!(page.meta().refcount(), 1);
        assert!(page.meta().flags().contains(FrameFlags::ANON));
        page.meta().unlock();
        assert_eq!(page.put(), Freed::Yes);
    }
    assert_eq!(raw, head.as_u64());
    assert_eq!(p.nr_in_use(), 0);
    // Both blocks without a zero page are whole again.
    let blocks: Vec<_> = (0..2)
        .map(|_| p.alloc(PMD_ORDER, FrameFlags::ANON).unwrap())
        .collect();
    assert_eq!(p.nr_in_use(), 2 * PMD_NR);
    drop(blocks);
}

#[test]
fn contents_are_shared_between_threads() {
    let p = ram(8);
    let f = p.alloc_zeroed(0, FrameFlags::ANON).unwrap();
    let pfn = f.pfn();
    std::thread::scope(|s| {
        for t in 0..2u8 {
            let p = &p;
            s.spawn(move || {
                // Interleaved single-byte writes to the same words must not lose bytes.
                for i in 0..2048usize {
                    p.frame(pfn).write(i * 2 + usize::from(t), &[t + 1]);
                }
            });
        }
    });
    let mut all = vec![0u8; 4096];
    f.read(0, &mut all);
    assert!(all.chunks(2).all(|c| c == [1, 2]));
}

#[test]
#[should_panic(expected = "is not a CPU-addressable frame of this machine")]
fn frame_out_of_range_panics() {
    let p = ram(4);
    let _ = p.frame(Pfn::new(4 * 512));
}

#[test]
fn folio_copy_moves_every_page_of_a_folio() {
    let p = ram(16);
    let (src, dst) = (
        p.alloc(PMD_ORDER, FrameFlags::empty()).unwrap(),
        p.alloc(PMD_ORDER, FrameFlags::empty()).unwrap(),
    );
    for k in 0..PMD_NR {
        src.folio_page(k)
            .write(8 * (k as usize % 500), &k.to_le_bytes());
    }
    dst.copy_folio_from(&src);
    let mut b = [0u8; 8];
    for k in 0..PMD_NR {
        dst.folio_page(k).read(8 * (k as usize % 500), &mut b);
        assert_eq!(u64::from_le_bytes(b), k, "page {k}");
    }
    let (a, z) = (
        p.alloc(0, FrameFlags::empty()).unwrap(),
        p.alloc(0, FrameFlags::empty()).unwrap(),
    );
    a.write(4090, b"tail!!");
    z.copy_folio_from(&a);
    let mut t = [0u8; 6];
    z.read(4090, &mut t);
    assert_eq!(&t, b"tail!!");
    // One call for a THP and seven scattered pages, back the other way.
    let pages: Vec<_> = (0..14)
        .map(|_| p.alloc(0, FrameFlags::empty()).unwrap())
        .collect();
    for (k, f) in pages[..7].iter().enumerate() {
        f.write(8 * k, &[k as u8 + 1; 8]);
    }
    let mut pairs = vec![(*src, *dst)];
    pairs.extend((0..7).map(|k| (*pages[13 - k], *pages[k])));
    dst.folio_page(3).write(0, b"changed!");
    copy_folios(&pairs);
    src.folio_page(3).read(0, &mut b);
    assert_eq!(&b, b"changed!");
    for k in 0..7 {
        pages[13 - k].read(8 * k, &mut b);
        assert_eq!(b, [k as u8 + 1; 8], "page {k}");
    }
}

/// A bad pair anywhere in the list panics before any pair is copied.
#[test]
fn folio_copies_check_every_pair_first() {
    let p = ram(16);
    let big = p.alloc(PMD_ORDER, FrameFlags::empty()).unwrap();
    let (a, b) = (
        p.alloc(0, FrameFlags::empty()).unwrap(),
        p.alloc(0, FrameFlags::empty()).unwrap(),
    );
    b.write(0, b"source!!");
    a.write(0, b"target!!");
    let bad = [(*a, *b), (*a, big.folio_page(7))];
    let panic =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| copy_folios(&bad))).unwrap_err();
    assert!(panic
        .downcast_ref::<String>()
        .is_some_and(|m| m.contains("not a folio head")));
    let mut got = [0u8; 8];
    a.read(0, &mut got);
    assert_eq!(&got, b"target!!", "the good pair was not copied either");
}

#[test]
#[should_panic(expected = "different orders")]
fn folio_copy_between_orders_panics() {
    let p = ram(16);
    let big = p.alloc(PMD_ORDER, FrameFlags::empty()).unwrap();
    let small = p.alloc(0, FrameFlags::empty()).unwrap();
    small.copy_folio_from(&big);
}

/// Frames freed to the per-CPU lists stay free, count as free, and do not keep their
/// blocks from going out whole: an order-9 allocation that finds no whole block drains
/// the lists and tries again, and so does an order-0 one that finds nothing.
#[test]
fn frames_on_per_cpu_lists_are_free_and_drained_for_huge_allocations() {
    let p = ram(64);
    let free_at_start = p.stats().nr_free;
    // Every frame as order 0, then all of them back: some stay on this CPU's list.
    let small: Vec<_> = std::iter::from_fn(|| p.alloc(0, FrameFlags::empty()).ok()).collect();
    assert_eq!(small.len() as u64, free_at_start);
    assert_eq!(p.stats().nr_free, 0);
    drop(small);
    assert_eq!(p.stats().nr_free, free_at_start);
    assert_eq!(p.nr_in_use(), 0);
    // Every free block goes out whole (the two reserved blocks hold the zero pages).
    let huge: Vec<_> =
        std::iter::from_fn(|| p.alloc(PMD_ORDER, FrameFlags::empty()).ok()).collect();
    assert_eq!(huge.len() as u64, free_at_start / PMD_NR);
    drop(huge);
    // Order-0 allocations can again take every frame after the huge churn.
    let small: Vec<_> = std::iter::from_fn(|| p.alloc(0, FrameFlags::empty()).ok()).collect();
    assert_eq!(small.len() as u64, free_at_start);
    let s = p.stats();
    assert_eq!(s.nr_alloc_ops, 2 * free_at_start + free_at_start / PMD_NR);
}

#[test]
fn bulk_allocation_hands_out_distinct_fresh_folios() {
    let p = ram(8);
    let free = p.nr_free();
    let frames = p.alloc_bulk(300, FrameFlags::ANON);
    assert_eq!(frames.len(), 300);
    let distinct: std::collections::HashSet<_> = frames.iter().map(|f| f.pfn()).collect();
    assert_eq!(distinct.len(), 300);
    for f in &frames {
        assert_eq!(f.meta().refcount(), 1);
        assert_eq!(f.meta().order(), 0);
        assert!(f.meta().flags().contains(FrameFlags::ANON));
        assert!(!p.is_zero_pfn(f.pfn()));
    }
    assert_eq!(p.nr_free(), free - 300);
    assert_eq!(p.stats().nr_alloc_ops - p.stats().nr_free_ops, 300);
    drop(frames);
    assert_eq!(p.nr_free(), free);
    assert_eq!(p.nr_in_use(), 0);
}

#[test]
fn bulk_allocation_stops_at_the_end_of_memory_whatever_it_is_asked() {
    let p = ram(8);
    let free = p.nr_free();
    // One frame held by a single allocation, so the bulk one meets a partial block.
    let one = p.alloc(0, FrameFlags::ANON).unwrap();
    // Bounded by the free memory, not by the count asked for.
    let all = p.alloc_bulk(usize::MAX, FrameFlags::ANON);
    assert_eq!(all.len() as u64, free - 1);
    assert!(p.alloc_bulk(1, FrameFlags::ANON).is_empty());
    assert_eq!(
        p.alloc(0, FrameFlags::ANON).unwrap_err(),
        AllocError { order: 0 }
    );
    drop(all);
    drop(one);
    assert_eq!(p.nr_free(), free);
    assert!(
        p.alloc(PMD_ORDER, FrameFlags::ANON).is_ok(),
        "blocks whole again"
    );
    assert!(p.alloc_bulk(0, FrameFlags::ANON).is_empty());
}

#[test]
fn bulk_allocation_consults_fail_page_alloc_once_a_page() {
    let p = ram(8);
    let free = p.nr_free();
    p.fail_page_alloc().fail_nth(5);
    let frames = p.alloc_bulk(10, FrameFlags::ANON);
    // Four pages passed; the fifth failed, and the ones after it went back.
    assert_eq!(frames.len(), 4);
    assert_eq!(p.fail_page_alloc().stats().calls, 5);
    assert_eq!(p.fail_page_alloc().stats().injected, 1);
    drop(frames);
    assert_eq!(p.nr_free(), free);
    assert_eq!(p.nr_in_use(), 0);
}

#[test]
fn device_bulk_allocation_locks_each_folio_and_ends_with_the_pagemap() {
    use crate::notifier::Owner;
    use crate::zone_device::{memremap_pages, DevPagemapOps, MemoryType, PagemapConfig};
    struct Ops;
    impl DevPagemapOps for Ops {}
    let p = ram(8);
    let dev = memremap_pages(
        &p,
        PagemapConfig {
            kind: MemoryType::DevicePrivate,
            owner: Owner::new_unique(),
            size_bytes: 4 << 20,
        },
        Arc::new(Ops),
    )
    .unwrap();
    let folios = dev.alloc_bulk(100, FrameFlags::empty());
    assert_eq!(folios.len(), 100);
    assert!(folios
        .iter()
        .all(|f| f.meta().flags().contains(FrameFlags::LOCKED) && f.meta().refcount() == 1));
    assert_eq!(dev.nr_in_use(), 100);
    drop(folios);
    assert_eq!(dev.nr_in_use(), 0);
    assert_eq!(
        dev.alloc_bulk(usize::MAX, FrameFlags::empty()).len() as u64,
        dev.nr_frames()
    );
    dev.memunmap().unwrap();
    assert!(dev.alloc_bulk(1, FrameFlags::empty()).is_empty());
}
