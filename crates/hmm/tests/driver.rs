//! Driver-inserted mappings (`VM_MIXEDMAP`): pages a driver supplies on fault or inserts
//! with `vm_insert_page`, shared and private, across fork, with the reverse map and audit.

mod common;

use std::sync::Arc;

use common::{page, Machine, RW};
use hmm::addr::{Pfn, PAGE_SIZE};
use hmm::mm::{folio_mappings, MapFlags, MmError, Prot, VmFault, VmOps, VmaKind};
use hmm::phys::{FrameFlags, PhysMem};
use parking_lot::Mutex;

/// A driver with `n` pages of its own, each filled with its index; offsets beyond fault
/// with SIGBUS. It keeps one reference on each page for its whole life.
struct Driver {
    phys: Arc<PhysMem>,
    pages: Vec<Pfn>,
    faults: Mutex<Vec<u64>>,
}

impl Driver {
    fn new(phys: &Arc<PhysMem>, n: u64) -> Arc<Driver> {
        let pages = (0..n)
            .map(|i| {
                let f = phys.alloc_zeroed(0, FrameFlags::UPTODATE).unwrap();
                f.write(0, &(0xd000 + i).to_le_bytes());
                f.into_raw()
            })
            .collect();
        Arc::new(Driver {
            phys: phys.clone(),
            pages,
            faults: Mutex::new(Vec::new()),
        })
    }
}

impl VmOps for Driver {
    fn fault(&self, pgoff: u64, _write: bool) -> Result<Pfn, VmFault> {
        self.faults.lock().push(pgoff);
        self.pages
            .get(pgoff as usize)
            .copied()
            .ok_or(VmFault::Sigbus)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        for &pfn in &self.pages {
            let _ = self.phys.frame(pfn).put();
        }
    }
}

#[test]
fn faults_ask_the_driver_and_shared_writes_reach_its_pages() {
    let m = Machine::new(16);
    let d = Driver::new(&m.phys, 4);
    let a =
        m.mm.mmap_driver(None, 6 * PAGE_SIZE, RW, MapFlags::SHARED, d.clone())
            .unwrap();
    assert_eq!(m.mm.vmas()[0].kind(), VmaKind::Driver);
    assert_eq!(m.mm.read_val::<u64>(page(a, 2)).unwrap(), 0xd002);
    m.mm.write_val(page(a, 3), 7u64).unwrap();
    let mut b = [0u8; 8];
    m.phys.frame(d.pages[3]).read(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 7);
    assert_eq!(*d.faults.lock(), [2, 3]);
    assert_eq!(
        m.mm.read_val::<u8>(page(a, 5)),
        Err(hmm::mm::FaultError::Bus { addr: page(a, 5) })
    );
    assert_eq!(m.mm.stats().faults.shared, 2);
    m.mm.audit().unwrap();
    let maps = folio_mappings(&m.phys, d.pages[2]);
    assert_eq!(maps.len(), 1);
    assert_eq!(maps[0].addr, page(a, 2));
    m.mm.munmap(a, 6 * PAGE_SIZE).unwrap();
    assert_eq!(m.phys.nr_in_use(), 4, "the driver still holds its pages");
}

#[test]
fn vm_insert_page_maps_now_and_refuses_bad_input() {
    let m = Machine::new(16);
    let d = Driver::new(&m.phys, 2);
    let a =
        m.mm.mmap_driver(None, 2 * PAGE_SIZE, Prot::READ, MapFlags::SHARED, d.clone())
            .unwrap();
    m.mm.vm_insert_page(page(a, 1), d.pages[0]).unwrap();
    assert_eq!(m.mm.read_val::<u64>(page(a, 1)).unwrap(), 0xd000);
    assert!(d.faults.lock().is_empty(), "no fault needed");
    assert!(matches!(
        m.mm.vm_insert_page(page(a, 1), d.pages[1]),
        Err(MmError::Busy { .. })
    ));
    let anon = m.map(1, RW, MapFlags::PRIVATE);
    m.mm.write_val(anon, 1u8).unwrap();
    let anon_pfn = Pfn::new(m.mm.pagemap(anon, 1).unwrap()[0].pfn.unwrap());
    for (addr, pfn) in [
        (a.checked_add(8).unwrap(), d.pages[1]),
        (anon, d.pages[1]),
        (a, anon_pfn),
        (a, m.phys.zero_pfn()),
        (a, Pfn::new(1 << 30)),
    ] {
        assert!(matches!(
            m.mm.vm_insert_page(addr, pfn),
            Err(MmError::Inval { .. })
        ));
    }
    m.mm.audit().unwrap();
}

#[test]
fn private_driver_mappings_copy_on_write_and_fork_copies_the_entries() {
    let m = Machine::new(16);
    let d = Driver::new(&m.phys, 2);
    let shared =
        m.mm.mmap_driver(None, 2 * PAGE_SIZE, RW, MapFlags::SHARED, d.clone())
            .unwrap();
    let private =
        m.mm.mmap_driver(None, 2 * PAGE_SIZE, RW, MapFlags::PRIVATE, d.clone())
            .unwrap();
    m.mm.read_val::<u8>(shared).unwrap();
    m.mm.write_val(private, 1u64).unwrap();
    assert_eq!(m.mm.stats().faults.cow, 1);
    let mut b = [0u8; 8];
    m.phys.frame(d.pages[0]).read(0, &mut b);
    assert_eq!(
        u64::from_le_bytes(b),
        0xd000,
        "the driver page is untouched"
    );
    m.mm.read_val::<u8>(page(private, 1)).unwrap();
    let child = m.mm.fork().unwrap();
    // The child has the driver entries without faulting.
    let before = d.faults.lock().len();
    assert_eq!(child.read_val::<u64>(shared).unwrap(), 0xd000);
    assert_eq!(child.read_val::<u64>(page(private, 1)).unwrap(), 0xd001);
    assert_eq!(d.faults.lock().len(), before);
    child.write_val(shared, 9u64).unwrap();
    assert_eq!(m.mm.read_val::<u64>(shared).unwrap(), 9);
    assert_eq!(folio_mappings(&m.phys, d.pages[0]).len(), 2);
    m.mm.audit().unwrap();
    child.audit().unwrap();
}
