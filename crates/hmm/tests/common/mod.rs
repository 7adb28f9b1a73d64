//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;

use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::mm::{MapFlags, Mm, Prot};
use hmm::notifier::{MmuNotifierHandle, NotifierEvent, NotifierRange, Recorder};
use hmm::phys::{PhysConfig, PhysMem};

/// A small machine: `mib` MiB of RAM and one address space with a recorder attached.
pub struct Machine {
    pub phys: Arc<PhysMem>,
    pub mm: Arc<Mm>,
    pub rec: Arc<Recorder>,
    _handle: MmuNotifierHandle,
}

impl Machine {
    pub fn new(mib: u64) -> Machine {
        let phys = PhysMem::new(PhysConfig::with_size(mib << 20)).unwrap();
        let mm = Mm::new(phys.clone());
        let rec = Arc::new(Recorder::new());
        let handle = mm.register_notifier(rec.clone()).unwrap();
        Machine {
            phys,
            mm,
            rec,
            _handle: handle,
        }
    }

    pub fn map(&self, pages: u64, prot: Prot, flags: MapFlags) -> VirtAddr {
        self.mm.mmap(None, pages * PAGE_SIZE, prot, flags).unwrap()
    }

    pub fn events(&self) -> Vec<(NotifierEvent, u64, u64)> {
        self.rec
            .take()
            .iter()
            .map(|r: &NotifierRange| (r.event, r.start().as_u64(), r.end().as_u64()))
            .collect()
    }
}

pub const RW: Prot = Prot::READ.union(Prot::WRITE);

#[track_caller]
pub fn page(base: VirtAddr, i: u64) -> VirtAddr {
    base.checked_add(i * PAGE_SIZE).unwrap()
}
