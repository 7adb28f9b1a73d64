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
//! | `local_access_ns` | 1 | a GPU access that hits device memory, amortised over a warp |
//! | `remote_access_ns` | 500 | a GPU access that crosses the link (about half a PCIe round trip, pipelined) |
//! | `cpu_access_ns` | 1 | a CPU access that hits |
//! | `cpu_fault_ns` | 5 000 | a CPU fault that migrates a device page home (the kernel's `migrate_to_ram` path, before the copy) |
//!
//! Bytes moved cost `bytes / link_gbps` plus one `link_latency_ns` per operation that moved
//! any.

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
            local_access_ns: 1,
            remote_access_ns: 500,
            cpu_access_ns: 1,
            cpu_fault_ns: 5_000,
        }
    }
}

/// The largest cost of one thing, ns (about 17 minutes): no simulated time overflows.
const MAX_NS: u64 = 1 << 40;

impl CostModel {
    /// Checks that every parameter is in range; the field and why not otherwise.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(0.001..=100_000.0).contains(&self.link_gbps) {
            return Err(("link_gbps", "from 0.001 to 100000 GB/s".into()));
        }
        for (name, v) in [
            ("fault_batch_ns", self.fault_batch_ns),
            ("fault_ns", self.fault_ns),
            ("link_latency_ns", self.link_latency_ns),
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

    /// Moving `bytes` over the link (0 when nothing moved).
    pub fn transfer_ns(&self, bytes: u64) -> u64 {
        if bytes == 0 {
            return 0;
        }
        // CAST: nanoseconds of a transfer fit u64 for any size a run can move.
        self.link_latency_ns + (bytes as f64 / self.link_gbps.max(1e-9)) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfers_cost_latency_and_bandwidth() {
        let c = CostModel::default();
        assert_eq!(c.transfer_ns(0), 0);
        // 2 MiB at 16 GB/s: 131 072 ns, plus the latency.
        assert_eq!(c.transfer_ns(2 << 20), 1_000 + 131_072);
    }
}
