//! Policies, behind traits with the anchors' defaults. A policy is a pure decision over
//! what the driver tells it; the driver carries it out, so the same policy code decides in
//! a simulated run and in a real one.
//!
//! * where a range goes when the GPU faults on it, or when its access counter fires
//!   ([`MigrationPolicy`]: [`FirstTouch`] by default, [`RemoteMap`], [`CounterDriven`]),
//!   with the user's advice ([`Advice`]: preferred location, accessed-by);
//! * which pages of the block to migrate with the faulted ones ([`prefetch`]);
//! * which chunk of device memory to evict ([`eviction`]);
//! * when a page ping-pongs ([`thrashing`]);
//! * UVM's access counters ([`VmPolicies::access_counter_threshold`]).
//!
//! [`VmPolicies`] gathers what one GPU VM uses, with the clock their times come from.

pub mod eviction;
pub mod prefetch;
pub mod thrashing;

use std::sync::Arc;

use hmm::addr::VaRange;

use crate::addr::GpuPageSize;
use crate::clock::{Clock, WallClock};
use crate::fault::Access;
use crate::peer::PeerPolicy;
use prefetch::{PrefetchPolicy, WholeRange};
use thrashing::ThrashingDetector;

/// Where a range should live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Placement {
    /// The GPU's memory: migrate, then map locally.
    Device,
    /// Where it is (system memory), mapped remotely over the link.
    System,
}

/// Why the driver asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Cause {
    /// A GPU fault.
    Fault,
    /// The block's access counter reached its threshold (remote accesses).
    AccessCounter,
}

/// `cudaMemAdvise`-like advice on a range of addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Advice {
    /// Keep the pages here (`cudaMemAdviseSetPreferredLocation`).
    PreferredLocation(Placement),
    /// The GPU keeps a mapping wherever the pages are: it maps them remotely rather than
    /// migrating them on a fault (`cudaMemAdviseSetAccessedBy`).
    AccessedBy,
}

/// What a placement decision is made on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacementQuery {
    /// The range.
    pub range: VaRange,
    /// Its chunk size.
    pub size: GpuPageSize,
    /// The strongest access of its faults in the batch.
    pub access: Access,
    /// Why the driver asks.
    pub cause: Cause,
    /// The advice in force on the range, the latest first.
    pub advice: Option<Advice>,
    /// Free pages of device memory.
    pub vram_free_pages: u64,
}

/// The migration decision (UVM's residency decision, drm_gpusvm's `devmem_possible`).
pub trait MigrationPolicy: Send + Sync {
    /// Where the range goes.
    fn place(&self, q: &PlacementQuery) -> Placement;

    /// The policy's name, as scenario files and reports spell it.
    fn name(&self) -> &'static str;
}

/// Migrate on first GPU touch, unless advised otherwise: a preferred location wins, and
/// accessed-by maps remotely (Xe with a VRAM preferred location, amdkfd's faulting-GPU
/// placement, UVM's first touch).
#[derive(Debug, Clone, Copy, Default)]
pub struct FirstTouch;

impl MigrationPolicy for FirstTouch {
    fn place(&self, q: &PlacementQuery) -> Placement {
        match q.advice {
            Some(Advice::PreferredLocation(p)) => p,
            Some(Advice::AccessedBy) if q.cause == Cause::Fault => Placement::System,
            _ => Placement::Device,
        }
    }

    fn name(&self) -> &'static str {
        "first-touch"
    }
}

/// Never migrate: map system memory remotely (zero-copy).
#[derive(Debug, Clone, Copy, Default)]
pub struct RemoteMap;

impl MigrationPolicy for RemoteMap {
    fn place(&self, _q: &PlacementQuery) -> Placement {
        Placement::System
    }

    fn name(&self) -> &'static str {
        "remote"
    }
}

/// Map remotely on a fault, migrate when the block's access counter fires (UVM's
/// accessed-by mappings with access-counter migration), unless a preferred location says
/// otherwise.
#[derive(Debug, Clone, Copy, Default)]
pub struct CounterDriven;

impl MigrationPolicy for CounterDriven {
    fn place(&self, q: &PlacementQuery) -> Placement {
        match (q.advice, q.cause) {
            (Some(Advice::PreferredLocation(p)), _) => p,
            (_, Cause::AccessCounter) => Placement::Device,
            (_, Cause::Fault) => Placement::System,
        }
    }

    fn name(&self) -> &'static str {
        "counters"
    }
}

/// The policies of one GPU VM.
pub struct VmPolicies {
    /// Where a faulting range goes.
    pub migration: Box<dyn MigrationPolicy>,
    /// What to migrate with the faulted pages ([`WholeRange`] by default: the range is
    /// the unit, as in drm_gpusvm).
    pub prefetch: Box<dyn PrefetchPolicy>,
    /// The thrashing detector (UVM's, with its parameters, by default); `None` turns it
    /// off.
    pub thrashing: Option<ThrashingDetector>,
    /// Remote accesses to one 2 MiB block that make an access-counter notification
    /// (UVM: 256); `None` turns the counters off.
    pub access_counter_threshold: Option<u32>,
    /// Where the times of the thrashing detector come from.
    pub clock: Arc<dyn Clock>,
    /// How pages a peer of the device's group holds come to the device
    /// ([`PeerPolicy::SourceCopy`] by default, as Xe).
    pub peer: PeerPolicy,
}

impl Default for VmPolicies {
    fn default() -> Self {
        VmPolicies {
            migration: Box::new(FirstTouch),
            prefetch: Box::new(WholeRange),
            thrashing: Some(ThrashingDetector::default()),
            access_counter_threshold: Some(256),
            clock: Arc::new(WallClock::new()),
            peer: PeerPolicy::default(),
        }
    }
}

impl VmPolicies {
    /// The defaults without the thrashing detector and the access counters: every fault
    /// migrates as the migration policy says, whatever the timing (tests that count
    /// migrations use this).
    pub fn plain() -> VmPolicies {
        VmPolicies {
            thrashing: None,
            access_counter_threshold: None,
            ..VmPolicies::default()
        }
    }
}

impl std::fmt::Debug for VmPolicies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmPolicies")
            .field("migration", &self.migration.name())
            .field("prefetch", &self.prefetch.name())
            .field("thrashing", &self.thrashing)
            .field("access_counter_threshold", &self.access_counter_threshold)
            .field("peer", &self.peer.name())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmm::addr::VirtAddr;

    fn q(cause: Cause, advice: Option<Advice>) -> PlacementQuery {
        PlacementQuery {
            range: VaRange::new(VirtAddr::new(0x1000), VirtAddr::new(0x2000)).unwrap(),
            size: GpuPageSize::Size4K,
            access: Access::Read,
            cause,
            advice,
            vram_free_pages: 0,
        }
    }

    #[test]
    fn placement_policies_follow_cause_and_advice() {
        use Cause::{AccessCounter as Ac, Fault as F};
        use Placement::{Device as D, System as S};
        let sys = Some(Advice::PreferredLocation(S));
        let by = Some(Advice::AccessedBy);
        for (policy, want) in [
            (&FirstTouch as &dyn MigrationPolicy, [D, D, S, S, D]),
            (&RemoteMap, [S, S, S, S, S]),
            (&CounterDriven, [S, D, S, S, D]),
        ] {
            let got =
                [q(F, None), q(Ac, None), q(F, sys), q(F, by), q(Ac, by)].map(|x| policy.place(&x));
            assert_eq!(got, want, "{}", policy.name());
        }
    }
}
