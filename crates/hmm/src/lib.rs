//! # hmm-rs: Linux HMM as a real userspace system
//!
//! The core library: physical frames with real bytes ([`phys`]), x86-64 page tables
//! ([`pgtable`]), address spaces with VMAs and a CPU fault path ([`mm`]), and MMU notifiers
//! with contextual events and the interval-notifier sequence protocol ([`notifier`]).
//! Every operation reports what it cost through [`stats`].
//!
//! Layers point one way: `addr`/`prot` ← `phys` ← `pgtable` ← `notifier` ← `mm`. A lower layer that
//! must call up (a notifier callback) defines a trait the upper layer implements. See
//! `DESIGN.md` at the repository root for the lock order and the protocols.
//!
//! ```
//! use hmm::addr::PAGE_SIZE;
//! use hmm::mm::{MapFlags, Mm, Prot};
//! use hmm::phys::{PhysConfig, PhysMem};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ram = PhysMem::new(PhysConfig::with_size(16 << 20))?;
//! let mm = Mm::new(ram);
//! let buf = mm.mmap(None, 4 * PAGE_SIZE, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)?;
//! mm.write(buf, &0xfeed_u64.to_le_bytes())?;
//! let mut back = [0u8; 8];
//! mm.read(buf, &mut back)?;
//! assert_eq!(u64::from_le_bytes(back), 0xfeed);
//! assert_eq!(mm.stats().faults.anon_write, 1);
//! # Ok(())
//! # }
//! ```

#![deny(unsafe_code)]

pub mod addr;
pub mod exclusive;
pub mod fault_inject;
mod interval_tree;
pub mod kvmalloc;
pub mod migrate;
pub mod mm;
pub mod notifier;
pub mod pgtable;
pub mod phys;
pub mod prot;
pub mod range_fault;
pub mod stats;
pub mod sync;
pub mod zone_device;
