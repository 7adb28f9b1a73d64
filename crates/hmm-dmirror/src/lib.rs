//! # hmm-dmirror: the reference HMM mirror driver
//!
//! The kernel's `lib/test_hmm.c` ("dmirror") on hmm-rs: simulated devices
//! ([`DmirrorDriver`], [`DmirrorDevice`]) with device memory in chunks, and mirrors
//! ([`Dmirror`]), one per open of a device by a process, each with its own device page
//! table kept coherent with the CPU's through an interval notifier and `hmm_range_fault`.
//! Commands keep the kernel's arguments, outputs and errors ([`HmmDmirrorCmd`],
//! [`DmirrorCmd`], [`DmirrorError`]): READ, WRITE, MIGRATE_TO_DEV, MIGRATE_TO_SYS,
//! SNAPSHOT, EXCLUSIVE, CHECK_EXCLUSIVE, RELEASE and FLAGS. The device's reads, writes and
//! migrations move real bytes; a CPU touching a device page faults it back through the
//! device's `migrate_to_ram`.
//! [`conformance`] holds driver-independent checks any mirror implementation can run;
//! [`selftest`] is the kernel's own `hmm-tests.c`, case by case, against this driver.
//!
//! ```
//! use hmm::addr::PAGE_SIZE;
//! use hmm::mm::{MapFlags, Mm, Prot};
//! use hmm::phys::{PhysConfig, PhysMem};
//! use hmm_dmirror::{Dmirror, DmirrorCmd, DmirrorConfig, DmirrorDriver, HmmDmirrorCmd};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let phys = PhysMem::new(PhysConfig::with_size(16 << 20))?;
//! let driver = DmirrorDriver::new(&phys, DmirrorConfig::default());
//! let mm = Mm::new(phys.clone());
//! let mirror = Dmirror::open(driver.device(0), &mm)?;
//! let rw = Prot::READ | Prot::WRITE;
//! let buf = mm.mmap(None, 4 * PAGE_SIZE, rw, MapFlags::PRIVATE)?;
//! let out = mm.mmap(None, 4 * PAGE_SIZE, rw, MapFlags::PRIVATE)?;
//! mm.write(buf, b"hello, device")?;
//! let mut cmd = HmmDmirrorCmd { addr: buf.as_u64(), ptr: out.as_u64(), npages: 4, ..Default::default() };
//! mirror.ioctl(DmirrorCmd::Read, &mut cmd)?;
//! assert_eq!((cmd.cpages, cmd.faults), (4, 1));
//! let mut back = [0u8; 13];
//! mm.read(out, &mut back)?;
//! assert_eq!(&back, b"hello, device");
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod conformance;
mod device;
mod dpt;
mod migrate;
mod mirror;
pub mod selftest;
mod uapi;

pub use device::{
    DmirrorConfig, DmirrorDevice, DmirrorDriver, DEVMEM_CHUNK_SIZE, DMIRROR_NDEVICES,
};
pub use dpt::{DptEntry, DptTag};
pub use mirror::{Dmirror, Done, MirrorStats};
pub use uapi::{prot, DmirrorCmd, DmirrorError, HmmDmirrorCmd, HMM_DMIRROR_FLAG_FAIL_ALLOC};
