//! The cost model: what each thing the driver and the agents do costs in simulated time.
//! Every parameter has a default with its source (`docs/scenarios.md` has the table), and a
//! scenario's `[cost]` table may change any of them.
//!
//! | parameter | default | source |
//! |---|---|---|
//! | `fault_batch_ns` | 45 000 | UVM Smart's far-fault handling latency (GTX 1080 Ti calibration) |
//! | `fault_ns` | 2 000 | per coalesced fault of a batch: the service path's own work, measured by `hmm bench driver` (about 8 µs for a 4 KiB fault on this host, which includes the copy) and rounded down |
//! | `link_gbps` | 16 | PCIe 3.0 x16, one direction (UVM Smart) |
//! | `link_latency_ns` | 1 000 | a PCIe round trip |
//! | `peer_gbps` | 25 | one NVLink 2.0 link, one direction (a DGX-1V joins its GPU pairs with one or two) |
//! | `peer_latency_ns` | 1 000 | a GPU-to-GPU copy's start over NVLink or PCIe peer-to-peer, about a PCIe round trip |
//! | `peer_access_ns` | 250 | a GPU access to a peer's memory: taken as half of `remote_access_ns` (NVLink's loads against PCIe's) |
//! | `copy_engines` | 1 | per GPU: one queue of transfers (the conservative choice; a GPU has several engines, and with 2 or more the transfers into it and out of it overlap over the full-duplex link) |
//! | `local_access_ns` | 1 | a GPU access that hits device memory, amortised over a warp |
//! | `remote_access_ns` | 500 | a GPU access that crosses the link (about half a PCIe round trip, pipelined) |
//! | `cpu_access_ns` | 1 | a CPU access that hits |
//! | `cpu_fault_ns` | 5 000 | a CPU fault that migrates a device page home (the kernel's `migrate_to_ram` path, before the copy) |
//!
//! Bytes moved cost `bytes / gbps` plus one latency per link and operation that moved any
//! (the links of a machine: [`crate::topology`]).

use serde::{Deserialize, Serialize};

/// The cost model's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CostModel {
    /// Per batch of GPU faults.
    pub fault_batch_ns: u64,
    /// Per coalesced fault in a batch.
    pub fault_ns: u64,
    /// Link bandwidth between host and device, GB/s.
    pub link_gbps: f64,
    /// Link latency per transfer.
    pub link_latency_ns: u64,
    /// Link bandwidth between two GPUs of one group, GB/s.
    pub peer_gbps: f64,
    /// Latency per transfer between two GPUs of one group.
    pub peer_latency_ns: u64,
    /// A GPU access to a peer's memory over the peer link.
    pub peer_access_ns: u64,
    /// Copy engines per GPU: with one, a GPU's transfers of one batch run one after the
    /// other; with two or more, those into it and those out of it overlap.
    pub copy_engines: u32,
    /// A GPU access that hits device memory.
    pub local_access_ns: u64,
    /// A GPU access to system memory over the link.
    pub remote_access_ns: u64,
    /// A CPU access that hits.
    pub cpu_access_ns: u64,
    /// A CPU fault that migrates a device page home.
    pub cpu_fault_ns: u64,
}

impl Default for CostModel {
    fn default() -> Self {
        CostModel {
            fault_batch_ns: 45_000,
            fault_ns: 2_000,
            link_gbps: 16.0,
            link_latency_ns: 1_000,
            peer_gbps: 25.0,
            peer_latency_ns: 1_000,
            peer_access_ns: 250,
            copy_engines: 1,
            local_access_ns: 1,
            remote_access_ns: 500,
            cpu_access_ns: 1,
            cpu_fault_ns: 5_000,
        }
    }
}

/// The largest cost of one thing, ns (about 17 minutes): no simulated time overflows.
pub(crate) const MAX_NS: u64 = 1 << 40;

impl CostModel {
    /// A GPU access that completed: `local` pages in the GPU's memory, `remote` in system
    /// memory, `peer` in a peer's.
    pub fn hit_ns(&self, local: u32, remote: u32, peer: u32) -> u64 {
        u64::from(local) * self.local_access_ns
            + u64::from(remote) * self.remote_access_ns
            + u64::from(peer) * self.peer_access_ns
    }

    /// Checks that every parameter is in range; the field and why not otherwise.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(1..=64).contains(&self.copy_engines) {
            return Err(("copy_engines", "from 1 to 64".into()));
        }
        for (name, v) in [("link_gbps", self.link_gbps), ("peer_gbps", self.peer_gbps)] {
            if !(0.001..=100_000.0).contains(&v) {
                return Err((name, "from 0.001 to 100000 GB/s".into()));
            }
        }
        for (name, v) in [
            ("fault_batch_ns", self.fault_batch_ns),
            ("fault_ns", self.fault_ns),
            ("link_latency_ns", self.link_latency_ns),
            ("peer_latency_ns", self.peer_latency_ns),
            ("peer_access_ns", self.peer_access_ns),
            ("local_access_ns", self.local_access_ns),
            ("remote_access_ns", self.remote_access_ns),
            ("cpu_access_ns", self.cpu_access_ns),
            ("cpu_fault_ns", self.cpu_fault_ns),
        ] {
            if v > MAX_NS {
                return Err((name, format!("at most {MAX_NS} ns")));
            }
        }
        Ok(())
    }
}
