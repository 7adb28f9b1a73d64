//! The interval sequence protocol (§1.5 of the reference), step by step.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::sync::Mutex;

use super::*;
use crate::addr::PAGE_SIZE;

/// A driver-like subscriber: a "mirror lock" and the kernel dmirror's owner filter.
struct Driver {
    lock: Mutex<Vec<NotifierEvent>>,
    owner: Owner,
    refuse_nonblock: bool,
}

impl IntervalNotifierOps for Driver {
    fn invalidate(&self, sub: &IntervalSub, range: &NotifierRange, cur: InvalidateSeq) -> bool {
        if range.event == NotifierEvent::Migrate && range.owner == Some(self.owner) {
            return true;
        }
        if !range.is_blockable() && self.refuse_nonblock {
            return false;
        }
        let mut l = self.lock.lock();
        sub.set_seq(cur);
        l.push(range.event);
        true
    }
}

fn driver(refuse_nonblock: bool) -> Arc<Driver> {
    Arc::new(Driver {
        lock: Mutex::new(Vec::new()),
        owner: Owner::new_unique(),
        refuse_nonblock,
    })
}

fn r(mm: MmId, start: u64, pages: u64, event: NotifierEvent) -> NotifierRange {
    NotifierRange::new(
        mm,
        VaRange::from_len(VirtAddr::new(start), pages * PAGE_SIZE).unwrap(),
        event,
        None,
    )
}

#[test]
fn collision_makes_read_retry_fire_and_idle_does_not() {
    let subs = MmNotifiers::new(MmId::new_unique());
    let d = driver(false);
    let sub = subs
        .interval_insert(VirtAddr::new(0x10000), 4 * PAGE_SIZE, d.clone())
        .unwrap();
    let seq = sub.read_begin();
    assert_eq!(seq.as_u64() % 2, 1, "an idle subscription's seq is odd");
    assert!(!sub.read_retry(seq));
    // A range that misses the interval changes nothing.
    subs.invalidate_range_start(r(subs.mm(), 0x20000, 1, NotifierEvent::Clear))
        .end();
    assert!(!sub.read_retry(seq));
    assert!(d.lock.lock().is_empty());
    // A hit does.
    subs.invalidate_range_start(r(subs.mm(), 0x13000, 1, NotifierEvent::Unmap))
        .end();
    assert!(sub.read_retry(seq));
    assert!(sub.check_retry(seq));
    assert_eq!(*d.lock.lock(), [NotifierEvent::Unmap]);
    let seq2 = sub.read_begin();
    assert!(!sub.read_retry(seq2));
    let st = subs.stats();
    assert_eq!(st.of(NotifierEvent::Unmap), 1);
    assert_eq!(st.of(NotifierEvent::Clear), 1);
    assert_eq!(st.interval_callbacks, 1);
}

#[test]
fn own_migrate_event_is_skipped_without_retry() {
    let subs = MmNotifiers::new(MmId::new_unique());
    let d = driver(false);
    let sub = subs
        .interval_insert(VirtAddr::new(0x10000), PAGE_SIZE, d.clone())
        .unwrap();
    let seq = sub.read_begin();
    let mine = r(subs.mm(), 0x10000, 1, NotifierEvent::Migrate).with_owner(Some(d.owner));
    let inv = subs.invalidate_range_start(mine);
    // While our own migration runs, read_begin does not block and retry does not fire.
    let s2 = sub.read_begin();
    assert_eq!(s2, seq);
    inv.end();
    assert!(!sub.read_retry(seq));
    // Somebody else's migration is an invalidation like any other.
    let theirs =
        r(subs.mm(), 0x10000, 1, NotifierEvent::Migrate).with_owner(Some(Owner::new_unique()));
    subs.invalidate_range_start(theirs).end();
    assert!(sub.read_retry(seq));
}

#[test]
fn read_begin_sleeps_until_the_invalidation_ends() {
    let subs = MmNotifiers::new(MmId::new_unique());
    let d = driver(false);
    let sub = subs
        .interval_insert(VirtAddr::new(0x10000), PAGE_SIZE, d)
        .unwrap();
    let inv = subs.invalidate_range_start(r(subs.mm(), 0x10000, 1, NotifierEvent::Clear));
    let returned = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let seq = sub.read_begin();
            returned.store(true, std::sync::atomic::Ordering::SeqCst);
            assert!(!sub.read_retry(seq));
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!returned.load(std::sync::atomic::Ordering::SeqCst));
        inv.end();
    });
    assert!(returned.load(std::sync::atomic::Ordering::SeqCst));
}

#[test]
fn inserts_and_removes_are_deferred_during_an_invalidation() {
    let subs = MmNotifiers::new(MmId::new_unique());
    let d = driver(false);
    let a = subs
        .interval_insert(VirtAddr::new(0x10000), PAGE_SIZE, d.clone())
        .unwrap();
    let inv = subs.invalidate_range_start(r(subs.mm(), 0x10000, 1, NotifierEvent::Clear));
    // Inserted during a hitting invalidation: deferred, and its first read_begin waits.
    let b = subs
        .interval_insert(VirtAddr::new(0x10000), PAGE_SIZE, d.clone())
        .unwrap();
    assert_eq!(subs.nr_intervals(), 1);
    let removed = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            a.remove();
            removed.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !removed.load(std::sync::atomic::Ordering::SeqCst),
            "remove waits"
        );
        inv.end();
    });
    assert_eq!(subs.nr_intervals(), 1);
    let seq = b.read_begin();
    subs.invalidate_range_start(r(subs.mm(), 0x10000, 1, NotifierEvent::Clear))
        .end();
    assert!(b.read_retry(seq));
    // Only `b` saw the second invalidation.
    assert_eq!(d.lock.lock().len(), 2);
    drop(b);
    assert_eq!(subs.nr_intervals(), 0);
}

#[test]
fn nonblocking_invalidation_can_be_refused_and_backs_out() {
    let subs = MmNotifiers::new(MmId::new_unique());
    let rec = Arc::new(Recorder::new());
    let _h = subs.register(rec.clone()).unwrap();
    let d = driver(true);
    let sub = subs
        .interval_insert(VirtAddr::new(0x10000), PAGE_SIZE, d)
        .unwrap();
    let err = subs
        .invalidate_range_start_nonblock(r(subs.mm(), 0x10000, 1, NotifierEvent::Clear))
        .unwrap_err();
    assert_eq!(err, NotifierError::WouldBlock);
    assert!(rec.ranges().is_empty(), "later subscribers are not called");
    // The refused invalidation ended: read_begin does not block.
    let seq = sub.read_begin();
    assert!(!sub.read_retry(seq));
}

#[test]
fn interval_insert_validates_and_release_ends_everything() {
    let subs = MmNotifiers::new(MmId::new_unique());
    let d = driver(false);
    assert!(matches!(
        subs.interval_insert(VirtAddr::new(0x1000), 0, d.clone()),
        Err(NotifierError::Overflow { .. })
    ));
    assert!(matches!(
        subs.interval_insert(
            VirtAddr::new(crate::addr::USER_VA_END - 4096),
            8192,
            d.clone()
        ),
        Err(NotifierError::Overflow { .. })
    ));
    let rec = Arc::new(Recorder::new());
    let _h = subs.register(rec.clone()).unwrap();
    let sub = subs
        .interval_insert(VirtAddr::new(0x1234), 10, d.clone())
        .unwrap();
    assert_eq!(sub.range().len_bytes(), PAGE_SIZE);
    subs.release();
    assert_eq!(*d.lock.lock(), [NotifierEvent::Release]);
    assert_eq!(rec.releases(), [subs.mm()]);
    assert_eq!(subs.nr_mm_notifiers(), 0);
    assert!(matches!(
        subs.interval_insert(VirtAddr::new(0x1000), 10, d),
        Err(NotifierError::Released)
    ));
}

#[test]
fn unregister_calls_release_once() {
    let subs = MmNotifiers::new(MmId::new_unique());
    let rec = Arc::new(Recorder::new());
    let h = subs.register(rec.clone()).unwrap();
    subs.invalidate_range_start(r(subs.mm(), 0x1000, 1, NotifierEvent::SoftDirty))
        .end();
    assert_eq!(rec.ranges().len(), 1);
    h.unregister();
    assert_eq!(rec.releases().len(), 1);
    subs.invalidate_range_start(r(subs.mm(), 0x1000, 1, NotifierEvent::SoftDirty))
        .end();
    assert_eq!(rec.ranges().len(), 1);
    subs.release();
    assert_eq!(rec.releases().len(), 1);
}

#[test]
fn lookups_find_every_overlapping_interval_of_any_length() {
    let subs = MmNotifiers::new(MmId::new_unique());
    let mm = subs.mm();
    let base = 0x100_0000u64;
    // (first page, pages): short ones, a long one starting far before the probe, one
    // ending exactly where the probe starts, one starting exactly where it ends.
    let spans = [
        (0, 1),
        (10, 2),
        (11, 1),
        (12, 1),
        (0, 64),
        (8, 2),
        (14, 3),
        (40, 1),
    ];
    let drivers: Vec<_> = spans.iter().map(|_| driver(false)).collect();
    let mut held: Vec<_> = spans
        .iter()
        .zip(&drivers)
        .map(|((p, n), d)| {
            subs.interval_insert(
                VirtAddr::new(base + p * PAGE_SIZE),
                n * PAGE_SIZE,
                d.clone(),
            )
            .unwrap()
        })
        .collect();
    let probe = |first: u64, pages: u64| -> Vec<usize> {
        for d in &drivers {
            d.lock.lock().clear();
        }
        subs.invalidate_range_start(r(mm, base + first * PAGE_SIZE, pages, NotifierEvent::Clear))
            .end();
        (0..drivers.len())
            .filter(|&i| !drivers[i].lock.lock().is_empty())
            .collect()
    };
    // Pages 10..14 overlap (10,2), (11,1), (12,1), (0,64); not (8,2) (ends at 10) nor
    // (14,3) (starts at 14).
    assert_eq!(probe(10, 4), [1, 2, 3, 4]);
    assert_eq!(probe(40, 1), [4, 7]);
    assert_eq!(probe(100, 1), Vec::<usize>::new());
    // Without the long interval the lookup narrows, and still finds the short ones.
    held.remove(4).remove();
    assert_eq!(probe(10, 4), [1, 2, 3]);
    assert_eq!(probe(0, 1), [0]);
    assert_eq!(probe(40, 1), [7]);
}
