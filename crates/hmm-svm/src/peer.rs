//! Peer groups: devices that reach each other's memory over a fast link and therefore share
//! one pagemap owner (drm_pagemap's *owner lists*, an XGMI hive for amdkfd, "all NVIDIA
//! GPUs" for UVM), and what a device does when it faults on a page a peer holds.
//!
//! # What sharing the owner means
//!
//! * `hmm_range_fault` with the group's owner hands a member every member's device-private
//!   pages as they are (valid, with their frame), instead of faulting them home through the
//!   holder's `migrate_to_ram`: the faulting device can map them over the peer link.
//!   Devices outside the group still fault them home, as before.
//! * `migrate_vma` with the group's owner and `SELECT_DEVICE_PRIVATE` collects every
//!   member's pages, and never a page of a device outside the group (the seed series'
//!   owner filter).
//! * Every member's notifier skips MIGRATE events that carry the group's owner. So
//!   **whoever migrates zaps the sources in every VM of every member** bound to the address
//!   space ([`PeerGroup::vms_of`]); the fault path, eviction of a range and the CPU-fault
//!   handler all do.
//!
//! # The peer policy
//!
//! When a member faults on pages a peer holds and its placement says *device*, the pages
//! move by [`PeerPolicy`]:
//!
//! | policy | what moves | follows |
//! |---|---|---|
//! | [`PeerPolicy::Bounce`] | peer → system memory → this device: two copies over two host links | amdkfd (VRAM→VRAM bounces through RAM, an explicit TODO there) |
//! | [`PeerPolicy::SourceCopy`] | peer → this device directly, the *source* device copying | Xe's drm_pagemap (2026: source-side peer migration) and UVM's peer copies |
//! | [`PeerPolicy::RemoteMap`] | nothing: the page stays, this device maps it over the peer link | Xe's `device_map` of a peer's pages, UVM's accessed-by mappings of peer memory, amdkfd inside one XGMI hive |
//!
//! Pages of a device outside the group are faulted home by `hmm_range_fault` whatever the
//! policy (they cannot be reached directly).

use std::sync::{Arc, Weak};

use hmm::notifier::{MmId, Owner};
use hmm::sync::Mutex;

use crate::device::{DeviceOps, GpuDevice};
use crate::vm::VmShared;

/// How a device takes pages a peer of its group holds when its placement says *device*.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
pub enum PeerPolicy {
    /// Through system memory: the peer's pages go home first (its copy engine), then come
    /// to this device (amdkfd).
    Bounce,
    /// Directly over the peer link, the source device copying (Xe's drm_pagemap).
    #[default]
    SourceCopy,
    /// Not at all: this device maps the peer's pages where they are.
    RemoteMap,
}

impl PeerPolicy {
    /// The policy's name, as scenario files and reports spell it.
    pub fn name(self) -> &'static str {
        match self {
            PeerPolicy::Bounce => "bounce",
            PeerPolicy::SourceCopy => "copy",
            PeerPolicy::RemoteMap => "remote",
        }
    }
}

/// Devices that share one pagemap owner.
///
/// ```
/// use hmm::phys::{PhysConfig, PhysMem};
/// use hmm_svm::{GpuConfig, GpuDevice, PeerGroup};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let phys = PhysMem::new(PhysConfig::with_size(64 << 20))?;
/// let hive = PeerGroup::new();
/// let a = GpuDevice::in_group(&phys, GpuConfig::default(), &hive)?;
/// let b = GpuDevice::in_group(&phys, GpuConfig::default(), &hive)?;
/// let c = GpuDevice::new(&phys, GpuConfig::default())?;
/// assert_eq!(a.owner(), b.owner());
/// assert_ne!(a.owner(), c.owner());
/// assert_eq!(hive.len(), 2);
/// # Ok(())
/// # }
/// ```
#[doc(alias = "drm_pagemap_owner")]
pub struct PeerGroup {
    owner: Owner,
    /// Members by pagemap id (a leaf lock).
    members: Mutex<Vec<Member>>,
}

/// One member: its pagemap's id, its pagemap callbacks (alive as long as its memory is)
/// and the device (alive as long as the driver holds it).
struct Member {
    pagemap: u32,
    ops: Weak<DeviceOps>,
    device: Weak<GpuDevice>,
}

impl PeerGroup {
    /// An empty group with a fresh owner.
    pub fn new() -> Arc<PeerGroup> {
        Arc::new(PeerGroup {
            owner: Owner::new_unique(),
            members: Mutex::new(Vec::new()),
        })
    }

    /// The owner every member's memory carries.
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// Live members.
    pub fn len(&self) -> usize {
        self.members
            .lock()
            .iter()
            .filter(|m| m.device.strong_count() > 0)
            .count()
    }

    /// The live members, in the order they joined.
    pub fn devices(&self) -> Vec<Arc<GpuDevice>> {
        self.members
            .lock()
            .iter()
            .filter_map(|m| m.device.upgrade())
            .collect()
    }

    /// Whether no member is alive.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn join(&self, pagemap: u32, ops: &Arc<DeviceOps>, device: &Arc<GpuDevice>) {
        let mut m = self.members.lock();
        m.retain(|m| m.device.strong_count() > 0);
        m.push(Member {
            pagemap,
            ops: Arc::downgrade(ops),
            device: Arc::downgrade(device),
        });
    }

    /// The member whose device memory is the pagemap `id`: its callbacks, alive while
    /// its memory is (a device dropped with pages still in use keeps them).
    pub(crate) fn member(&self, id: u32) -> Option<Arc<DeviceOps>> {
        self.members
            .lock()
            .iter()
            .find(|m| m.pagemap == id)
            .and_then(|m| m.ops.upgrade())
    }

    /// Every live VM of every member bound to the address space `mm`: the VMs whose
    /// notifiers skip the group's MIGRATE events, which a migration must zap itself.
    pub(crate) fn vms_of(&self, mm: MmId) -> Vec<Arc<VmShared>> {
        let members: Vec<Arc<DeviceOps>> = self
            .members
            .lock()
            .iter()
            .filter_map(|m| m.ops.upgrade())
            .collect();
        members.iter().flat_map(|m| m.own_vms_of(mm)).collect()
    }
}

impl std::fmt::Debug for PeerGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerGroup")
            .field("owner", &self.owner)
            .field("members", &self.len())
            .finish()
    }
}
