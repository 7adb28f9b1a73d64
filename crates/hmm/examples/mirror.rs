//! A mirroring driver: a device page table kept coherent with the CPU's through an
//! interval notifier and `hmm_range_fault`, the loop of the kernel's HMM documentation.
//!
//! ```text
//! cargo run -p hmm --example mirror
//! ```
//!
//! The driver's table maps virtual pages to frames and holds no page references; it is
//! valid because every change of the CPU page table over the range first calls the
//! notifier's `invalidate`, which (under the driver's lock) records the new sequence and
//! drops the device entries. A device fault runs `read_begin` → `hmm_range_fault` under the
//! mmap lock → the driver lock → `read_retry` → program the table
//! ([`fault_and_commit`] packages it). The device touches memory only through the table,
//! under the same lock, so an invalidation can never free a page the device is using.

use std::collections::BTreeMap;
use std::error::Error;
use std::sync::Arc;

use hmm::addr::{Pfn, VirtAddr, PAGE_SHIFT, PAGE_SIZE};
use hmm::mm::{MapFlags, Mm, Prot};
use hmm::notifier::{IntervalNotifierOps, IntervalSub, InvalidateSeq, NotifierRange};
use hmm::phys::PhysMem;
use hmm::range_fault::{
    fault_and_commit, HmmPfn, HmmPfnFlags, HmmRange, HMM_RANGE_DEFAULT_TIMEOUT,
};
use hmm::sync::Mutex;

/// The device's page table: virtual page number → (frame number, writable).
type DeviceTable = BTreeMap<u64, (u64, bool)>;

/// The driver's half of the notifier: its lock and its table.
struct Mirror {
    table: Mutex<DeviceTable>,
}

impl IntervalNotifierOps for Mirror {
    fn invalidate(&self, sub: &IntervalSub, range: &NotifierRange, seq: InvalidateSeq) -> bool {
        // A non-blockable invalidation (the OOM reaper's) may not sleep on the lock.
        let mut table = if range.is_blockable() {
            self.table.lock()
        } else {
            match self.table.try_lock() {
                Some(t) => t,
                None => return false,
            }
        };
        sub.set_seq(seq);
        let (s, e) = (
            range.start().as_u64() >> PAGE_SHIFT,
            range.end().as_u64() >> PAGE_SHIFT,
        );
        let gone: Vec<u64> = table.range(s..e).map(|(vpn, _)| *vpn).collect();
        for vpn in &gone {
            table.remove(vpn);
        }
        println!(
            "    invalidate {:<28} {} pages: {} device entries dropped",
            range.event.kernel_name(),
            e - s,
            gone.len()
        );
        true
    }
}

/// A device fault on `npages` at `start` (`write`: the device wants to write): mirror them
/// into the device table with the documented loop.
fn device_fault(
    mm: &Mm,
    notifier: &IntervalSub,
    mirror: &Mirror,
    start: VirtAddr,
    npages: u64,
    write: bool,
) -> Result<(), Box<dyn Error>> {
    let mut pfns = vec![HmmPfn::default(); npages as usize];
    let mut flags = HmmPfnFlags::REQ_FAULT;
    if write {
        flags |= HmmPfnFlags::REQ_WRITE;
    }
    let mut range = HmmRange {
        notifier,
        notifier_seq: notifier.read_begin(),
        start,
        end: start + npages * PAGE_SIZE,
        hmm_pfns: &mut pfns,
        default_flags: flags,
        pfn_flags_mask: HmmPfnFlags::empty(),
        dev_private_owner: None,
    };
    fault_and_commit(
        mm,
        &mut range,
        HMM_RANGE_DEFAULT_TIMEOUT,
        &mirror.table,
        |table, range| {
            let first = range.start.as_u64() >> PAGE_SHIFT;
            for (i, w) in range.hmm_pfns.iter().enumerate() {
                table.insert(first + i as u64, (w.frame_nr(), w.is_writable()));
            }
        },
    )?;
    Ok(())
}

/// The device loads a `u64` at `addr` through its table; `None` if it has no entry (it
/// would fault).
fn device_load(phys: &PhysMem, mirror: &Mirror, addr: VirtAddr) -> Option<u64> {
    let table = mirror.table.lock();
    let (frame, _) = *table.get(&(addr.as_u64() >> PAGE_SHIFT))?;
    let mut b = [0u8; 8];
    phys.frame(Pfn::new(frame))
        .read((addr.as_u64() % PAGE_SIZE) as usize, &mut b);
    Some(u64::from_le_bytes(b))
}

/// The device stores a `u64` at `addr` through its table; false if it has no writable
/// entry.
fn device_store(phys: &PhysMem, mirror: &Mirror, addr: VirtAddr, v: u64) -> bool {
    let table = mirror.table.lock();
    match table.get(&(addr.as_u64() >> PAGE_SHIFT)) {
        Some(&(frame, true)) => {
            phys.frame(Pfn::new(frame))
                .write((addr.as_u64() % PAGE_SIZE) as usize, &v.to_le_bytes());
            true
        }
        _ => false,
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let phys = PhysMem::new(hmm::phys::PhysConfig::with_size(32 << 20))?;
    let mm = Mm::new(Arc::clone(&phys));
    let npages = 16;
    let len = npages * PAGE_SIZE;
    let buf = mm.mmap(None, len, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)?;
    for i in 0..npages {
        mm.write_val(buf + i * PAGE_SIZE, 100 + i)?;
    }

    let mirror = Arc::new(Mirror {
        table: Mutex::new(DeviceTable::new()),
    });
    let notifier = mm.interval_notifier_insert(
        buf,
        len,
        Arc::clone(&mirror) as Arc<dyn IntervalNotifierOps>,
    )?;

    println!("device read fault on 16 pages");
    device_fault(&mm, &notifier, &mirror, buf, npages, false)?;
    println!("  the device maps {} pages", mirror.table.lock().len());
    assert_eq!(device_load(&phys, &mirror, buf + 3 * PAGE_SIZE), Some(103));

    println!("fork: the parent's private pages become copy-on-write");
    let child = mm.fork()?;
    println!("  the device maps {} pages", mirror.table.lock().len());

    println!("device write fault on pages 0..4 (breaks COW: new pages for the parent)");
    device_fault(&mm, &notifier, &mirror, buf, 4, true)?;
    assert!(device_store(&phys, &mirror, buf, 7777));
    let parent: u64 = mm.read_val(buf)?;
    let child_sees: u64 = child.read_val(buf)?;
    println!("  after a device store: the parent reads {parent}, the child {child_sees}");
    assert_eq!((parent, child_sees), (7777, 100));

    println!("device read fault on pages 4..16");
    device_fault(&mm, &notifier, &mirror, buf + 4 * PAGE_SIZE, 12, false)?;
    println!("  the device maps {} pages", mirror.table.lock().len());

    println!("munmap of pages 8..16");
    mm.munmap(buf + 8 * PAGE_SIZE, 8 * PAGE_SIZE)?;
    assert_eq!(device_load(&phys, &mirror, buf + 9 * PAGE_SIZE), None);
    println!("  the device maps {} pages", mirror.table.lock().len());

    // The write fault took two passes: its COW breaks invalidated the range the fault was
    // reading (the CLEAR events above), so `read_retry` sent the loop round again.
    let s = mm.stats();
    println!(
        "\n{} hmm_range_fault passes for 3 device faults; invalidations by event: {}",
        s.range_walks.hmm,
        events(&s.notifier)
    );
    drop(child);
    Ok(())
}

/// The notifier counters that are not zero, by the kernel's event names.
fn events(n: &hmm::notifier::NotifierStats) -> String {
    hmm::notifier::NotifierEvent::ALL
        .iter()
        .filter(|e| n.of(**e) > 0)
        .map(|e| format!("{} {}", e.kernel_name(), n.of(*e)))
        .collect::<Vec<_>>()
        .join(", ")
}
