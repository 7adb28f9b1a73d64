//! The rig the migration tests share: a machine, the dmirror driver, one process and a
//! user buffer for command data.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;

use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::mm::{MapFlags, Mm, Prot, SwapKind};
use hmm::phys::{PhysConfig, PhysMem};
use hmm_dmirror::{Dmirror, DmirrorCmd, DmirrorConfig, DmirrorDriver, DmirrorError, HmmDmirrorCmd};

pub const RW: Prot = Prot::READ.union(Prot::WRITE);

pub struct Rig {
    pub phys: Arc<PhysMem>,
    pub driver: DmirrorDriver,
    pub mm: Arc<Mm>,
    /// A user buffer for command data (64 pages).
    pub buf: VirtAddr,
}

pub fn rig() -> Rig {
    rig_with_ram(32 << 20)
}

/// A rig with `bytes` of RAM (sparse: only what is written costs host memory).
pub fn rig_with_ram(bytes: u64) -> Rig {
    let phys = PhysMem::new(PhysConfig::with_size(bytes)).unwrap();
    let driver = DmirrorDriver::new(
        &phys,
        DmirrorConfig {
            chunk_bytes: 4 << 20,
            max_chunks: 2,
        },
    );
    let mm = Mm::new(phys.clone());
    let buf = mm
        .mmap(None, 64 * PAGE_SIZE, RW, MapFlags::PRIVATE)
        .unwrap();
    Rig {
        phys,
        driver,
        mm,
        buf,
    }
}

impl Rig {
    pub fn open(&self, minor: usize) -> Arc<Dmirror> {
        Dmirror::open(self.driver.device(minor), &self.mm).unwrap()
    }

    pub fn map(&self, npages: u64) -> VirtAddr {
        self.mm
            .mmap(None, npages * PAGE_SIZE, RW, MapFlags::PRIVATE)
            .unwrap()
    }

    pub fn run(
        &self,
        d: &Dmirror,
        which: DmirrorCmd,
        addr: VirtAddr,
        npages: u64,
    ) -> Result<HmmDmirrorCmd, DmirrorError> {
        let mut c = HmmDmirrorCmd {
            addr: addr.as_u64(),
            ptr: self.buf.as_u64(),
            npages,
            ..HmmDmirrorCmd::default()
        };
        d.ioctl(which, &mut c).map(|()| c)
    }

    pub fn snapshot(&self, d: &Dmirror, addr: VirtAddr, npages: u64) -> Vec<u8> {
        self.run(d, DmirrorCmd::Snapshot, addr, npages).unwrap();
        let mut b = vec![0u8; npages as usize];
        self.mm.read(self.buf, &mut b).unwrap();
        b
    }

    pub fn buf_bytes(&self, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mm.read(self.buf, &mut b).unwrap();
        b
    }
}

pub fn pattern(npages: u64, seed: u8) -> Vec<u8> {
    (0..npages * PAGE_SIZE)
        .map(|i| (i as u8).wrapping_mul(7) ^ ((i / PAGE_SIZE) as u8) ^ seed)
        .collect()
}

pub fn page(a: VirtAddr, i: u64) -> VirtAddr {
    a.checked_add(i * PAGE_SIZE).unwrap()
}

/// Rounds of a stress test: `HMM_STRESS_ITERS`, default 200.
pub fn iters() -> u64 {
    std::env::var("HMM_STRESS_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

/// Page `i` at version `v`: the first word is `i << 32 | v`.
pub fn word(i: u64, v: u64) -> u64 {
    (i << 32) | v
}

/// Every entry `d` holds for `[a, a + n)` maps the frame `mm` maps there (present, or its
/// own device-private page); returns how many entries it holds.
pub fn assert_maps_only_what_the_process_maps(d: &Dmirror, mm: &Mm, a: VirtAddr, n: u64) -> usize {
    let mut held = 0;
    for (i, e) in mm.pagemap(a, n).unwrap().into_iter().enumerate() {
        let va = page(a, i as u64);
        let Some(entry) = d.lookup(va) else { continue };
        held += 1;
        let own_private = e.swap == Some(SwapKind::DevicePrivate)
            && d.device().owns(&mm.phys().frame_nr(entry.frame_nr));
        let exclusive = e.swap == Some(SwapKind::DeviceExclusive);
        assert!(
            e.pfn == Some(entry.frame_nr) && (e.present || own_private || exclusive),
            "device {} maps {:#x} at {va}, the process has {e:?}",
            d.device().minor(),
            entry.frame_nr
        );
    }
    held
}
