//! Policies, behind traits with the anchors' defaults. A policy is a pure decision over
//! what the driver tells it; the driver carries it out, so the same policy code decides in
//! a simulated run and in a real one.
//!
//! * where a faulting range goes ([`MigrationPolicy`]: [`FirstTouch`], [`RemoteMap`]);
//! * which chunk of device memory to evict ([`eviction`]).

pub mod eviction;

use hmm::addr::VaRange;

use crate::addr::GpuPageSize;
use crate::fault::Access;

/// Where a range should live when the GPU faults on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Migrate it to the GPU's memory, then map it locally.
    Device,
    /// Leave it where it is and map it remotely (system memory over the link).
    System,
}

/// What a placement decision is made on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacementQuery {
    /// The range that faulted.
    pub range: VaRange,
    /// Its chunk size.
    pub size: GpuPageSize,
    /// The strongest access of its faults in the batch.
    pub access: Access,
    /// Free pages of device memory.
    pub vram_free_pages: u64,
}

/// The migration decision (UVM's residency decision, drm_gpusvm's `devmem_possible`).
pub trait MigrationPolicy: Send + Sync {
    /// Where the range goes.
    fn place(&self, q: &PlacementQuery) -> Placement;
}

/// Migrate on first GPU touch: every faulting range goes to device memory (the default
/// of Xe with a VRAM preferred location, amdkfd's faulting-GPU placement, UVM's first
/// touch).
#[derive(Debug, Clone, Copy, Default)]
pub struct FirstTouch;

impl MigrationPolicy for FirstTouch {
    fn place(&self, _q: &PlacementQuery) -> Placement {
        Placement::Device
    }
}

/// Never migrate: map system memory remotely (zero-copy, UVM's accessed-by mapping).
#[derive(Debug, Clone, Copy, Default)]
pub struct RemoteMap;

impl MigrationPolicy for RemoteMap {
    fn place(&self, _q: &PlacementQuery) -> Placement {
        Placement::System
    }
}
