//! # hmm-rs: Linux HMM as a real userspace system
//!
//! The core library, in the kernel's terms:
//!
//! | module | what | the kernel's |
//! |---|---|---|
//! | [`addr`], [`prot`] | addresses, frame numbers, ranges; protections and VMA flags | `unsigned long`, `pfn`, `vm_flags` |
//! | [`phys`] | physical frames with real bytes, their metadata, the allocator | `struct page`, the buddy allocator |
//! | [`zone_device`] | device memory: private and coherent pagemaps | `ZONE_DEVICE`, `dev_pagemap` |
//! | [`pgtable`] | x86-64 page tables and the cursor that walks them | `mm/pagewalk.c` |
//! | [`notifier`] | MMU notifiers with contextual events, interval notifiers | `mm/mmu_notifier.c` |
//! | [`mm`] | address spaces: VMAs, mmap, faults, fork, madvise, GUP, reverse map | `mm/*.c` |
//! | [`range_fault`] | mirroring a range of a page table into a device | `mm/hmm.c` (`hmm_range_fault`) |
//! | [`migrate`] | moving pages between system and device memory, migrate on fault | `mm/migrate_device.c` (`migrate_vma_*`) |
//! | [`exclusive`] | exclusive device access to system pages | `make_device_exclusive` |
//! | [`stats`] | what every operation cost, counted | `vmstat`, tracepoints |
//! | [`fault_inject`] | making chosen allocations fail | `fail_page_alloc` |
//! | [`kvmalloc`] | the bound on arrays a caller's range sizes | `kvmalloc` |
//! | [`sync`] | the locks and atomics, swappable for a model checker | `spinlock_t`, `rw_semaphore` |
//!
//! Layers point one way: `addr`/`prot` ← `phys` ← `pgtable` ← `notifier` ← `mm` ←
//! `range_fault`/`migrate`/`exclusive`. A lower layer that must call up (a notifier
//! callback, a device's `migrate_to_ram`) defines a trait the upper layer implements. See
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
