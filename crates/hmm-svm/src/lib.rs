//! # hmm-svm: a production-style SVM driver on hmm-rs
//!
//! What a GPU driver builds on the HMM mechanism, modelled on drm_gpusvm/Xe, drm_pagemap
//! and NVIDIA UVM (see `DESIGN.md`, "hmm-svm"), using only the mechanism's public API, as
//! a real driver uses only the kernel's exported symbols:
//!
//! * a simulated GPU ([`GpuDevice`]): device memory as a device-private pagemap with the
//!   GPU's owner, and per process a [`GpuVm`] with the GPU's own page table (4 KiB, 64 KiB
//!   and 2 MiB entries, [`gpt`]);
//! * GPU loads and stores of real bytes that hit the GPU page table (local device memory,
//!   or system memory over the link) or raise a GPU fault into a bounded fault buffer
//!   ([`fault`]);
//! * the fault handler: batches of up to 256 faults, coalesced, sorted and grouped by
//!   2 MiB block; ranges chosen as drm_gpusvm does (the largest of 2 MiB, 64 KiB, 4 KiB
//!   that fits the VMA and its neighbours) under 512 MiB notifier windows; the migration
//!   decision of a [`policy`]; migration to device memory in one walk (migrate on fault);
//!   `hmm_range_fault` and the bind under the notifier protocol; one replay per batch;
//! * the device skipping its own MIGRATE invalidations by owner (the seed series' point),
//!   the CPU faulting device pages back through `migrate_to_ram`, unmapped ranges garbage
//!   collected and partly unmapped ones evicted and destroyed;
//! * peer groups ([`PeerGroup`]): devices sharing one pagemap owner map each other's
//!   memory, and take a peer's pages by the [`PeerPolicy`] (bounce through system
//!   memory, a direct copy by the source device, or a peer mapping);
//! * counters with the anchors' names ([`SvmStats`]).
//!
//! The fault path in ten lines:
//!
//! ```text
//! GPU access misses the GPU page table      -> GpuFault into the FaultBuffer, access stalls
//! driver fetches <= 256 faults              -> coalesce, sort, group by 2 MiB block
//! per fault                                 -> window notifier; VMA check (else fatal)
//!                                           -> find or insert the SVM range (chunk choice)
//! per range                                 -> policy: Device or System
//!   Device                                  -> hmm_range_fault_migrate (fault + collect,
//!                                              one walk), zap own entries, copy, commit
//!   always                                  -> hmm_range_fault under the window sequence
//!                                           -> notifier lock, read_retry, bind entries
//! batch done                                -> replay: the stalled accesses run again
//! ```
//!
//! Lock order: mmap lock → (interval notifier) → the VM's notifier lock; the notifier lock
//! is never held across a call into `hmm` that can fault or invalidate.
//!
//! ```
//! use hmm::addr::PAGE_SIZE;
//! use hmm::mm::{MapFlags, Mm, Prot};
//! use hmm::phys::{PhysConfig, PhysMem};
//! use hmm_svm::{GpuConfig, GpuDevice, GpuVm, Location};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let phys = PhysMem::new(PhysConfig::with_size(64 << 20))?;
//! let gpu = GpuDevice::new(&phys, GpuConfig { vram_bytes: 16 << 20, ..GpuConfig::default() })?;
//! let mm = Mm::new(phys.clone());
//! let vm = GpuVm::new(&gpu, &mm);
//! let buf = mm.mmap(None, 16 * PAGE_SIZE, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)?;
//! mm.write(buf, b"from the CPU")?;
//!
//! let mut seen = [0u8; 12];
//! vm.read(buf, &mut seen)?; // GPU fault, migration to device memory, replay
//! assert_eq!(&seen, b"from the CPU");
//! assert_eq!(vm.lookup(buf).unwrap().location, Location::Vram);
//! vm.write(buf, b"from the GPU")?;
//!
//! let mut back = [0u8; 12];
//! mm.read(buf, &mut back)?; // CPU fault: migrate_to_ram
//! assert_eq!(&back, b"from the GPU");
//! assert_eq!(vm.stats().gpu_faults, 1);
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod addr;
pub mod clock;
mod device;
mod error;
pub mod fault;
pub mod gpt;
mod migrate;
mod peer;
pub mod policy;
mod range;
mod service;
mod stats;
mod vm;
mod vram;

pub use addr::GpuPageSize;
pub use device::{EvictTarget, GpuConfig, GpuDevice, OfflineReport};
pub use error::SvmError;
pub use fault::{Access, FaultBuffer, GpuFault};
pub use gpt::{GpuPte, Location};
pub use peer::{PeerGroup, PeerPolicy};
pub use policy::{Advice, Placement, VmPolicies};
pub use service::ServiceReport;
pub use stats::SvmStats;
pub use vm::{GpuVm, Outcome};
