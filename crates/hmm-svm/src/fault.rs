//! GPU faults: the bounded fault buffer the GPU writes and the driver drains, and the
//! batches the driver services (UVM's `uvm_gpu_replayable_faults.c`).
//!
//! # The buffer (GPU ↔ driver)
//!
//! The GPU side ([`FaultBuffer::push`]) appends one entry per access that missed its page
//! table; the driver side ([`FaultBuffer::fetch`]) takes up to a batch's worth from the
//! front. A full buffer drops the entry and counts an overflow: the access that faulted
//! is stalled, and after the next replay it executes again and faults again (replayable
//! faults), so an overflow delays a fault, never loses it.
//!
//! # Batches
//!
//! [`FaultBatch::new`] does what UVM's `preprocess_fault_batch` does: duplicates (same
//! page) are coalesced into one fault with the strongest access, the rest are sorted by
//! address and grouped by 2 MiB block, which is the unit the service path works on.

use std::collections::VecDeque;

use hmm::sync::Mutex;
use serde::Serialize;

use hmm::addr::{VirtAddr, PAGE_SHIFT, PMD_SHIFT};

/// UVM's batch size: faults fetched per batch (`uvm_perf_fault_batch_count`).
pub const FAULT_BATCH_MAX: usize = 256;

/// The kind of access that faulted, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Access {
    /// A load.
    Read,
    /// A store.
    Write,
}

/// One entry of the fault buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct GpuFault {
    /// The faulting address (any byte of the page).
    pub addr: VirtAddr,
    /// What the access wanted.
    pub access: Access,
}

impl GpuFault {
    /// The virtual page number.
    pub fn vpn(&self) -> u64 {
        self.addr.as_u64() >> PAGE_SHIFT
    }
}

/// The fault buffer: a bounded ring.
#[derive(Debug)]
pub struct FaultBuffer {
    entries: Mutex<VecDeque<GpuFault>>,
    capacity: usize,
}

/// The buffer was full; the fault was dropped (and will be raised again on replay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

impl FaultBuffer {
    /// A buffer of `capacity` entries (at least one).
    pub fn new(capacity: usize) -> FaultBuffer {
        let capacity = capacity.max(1);
        FaultBuffer {
            entries: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
        }
    }

    /// Entries the buffer holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries waiting.
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    /// Whether no entry waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The GPU writes a fault; `Overflow` when the buffer is full.
    pub fn push(&self, fault: GpuFault) -> Result<(), Overflow> {
        let mut e = self.entries.lock();
        if e.len() >= self.capacity {
            return Err(Overflow);
        }
        e.push_back(fault);
        Ok(())
    }

    /// The driver takes up to `max` entries from the front.
    pub fn fetch(&self, max: usize) -> Vec<GpuFault> {
        let mut e = self.entries.lock();
        let n = e.len().min(max);
        e.drain(..n).collect()
    }
}

/// The faults of one 2 MiB block of a batch, coalesced and in address order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockFaults {
    /// The block number (address >> 21).
    pub block: u64,
    /// One fault per page, the strongest access asked for it.
    pub faults: Vec<GpuFault>,
}

impl BlockFaults {
    /// The strongest access any fault of the block wants.
    pub fn access(&self) -> Access {
        self.faults
            .iter()
            .map(|f| f.access)
            .max()
            .unwrap_or(Access::Read)
    }
}

/// A batch, preprocessed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultBatch {
    /// The blocks, in address order.
    pub blocks: Vec<BlockFaults>,
    /// Faults coalesced into another on the same page.
    pub duplicates: u64,
}

impl FaultBatch {
    /// Coalesces, sorts and groups `faults`.
    pub fn new(mut faults: Vec<GpuFault>) -> FaultBatch {
        let total = faults.len() as u64;
        // By page, strongest access first, so dedup keeps the strongest.
        faults.sort_unstable_by(|a, b| a.vpn().cmp(&b.vpn()).then(b.access.cmp(&a.access)));
        faults.dedup_by_key(|f| f.vpn());
        let duplicates = total - faults.len() as u64;
        let mut blocks: Vec<BlockFaults> = Vec::new();
        for f in faults {
            let block = f.addr.as_u64() >> PMD_SHIFT;
            match blocks.last_mut() {
                Some(b) if b.block == block => b.faults.push(f),
                _ => blocks.push(BlockFaults {
                    block,
                    faults: vec![f],
                }),
            }
        }
        FaultBatch { blocks, duplicates }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(addr: u64, access: Access) -> GpuFault {
        GpuFault {
            addr: VirtAddr::new(addr),
            access,
        }
    }

    #[test]
    fn the_buffer_is_bounded_and_fifo() {
        let b = FaultBuffer::new(2);
        assert!(b.push(f(0x1000, Access::Read)).is_ok());
        assert!(b.push(f(0x2000, Access::Read)).is_ok());
        assert_eq!(b.push(f(0x3000, Access::Read)), Err(Overflow));
        assert_eq!(b.fetch(1), vec![f(0x1000, Access::Read)]);
        assert_eq!(b.len(), 1);
        assert_eq!(b.fetch(10).len(), 1);
        assert!(b.is_empty());
        assert_eq!(FaultBuffer::new(0).capacity(), 1);
    }

    #[test]
    fn batches_coalesce_sort_and_group() {
        let two_mib = 1 << 21;
        let batch = FaultBatch::new(vec![
            f(two_mib + 0x5000, Access::Read),
            f(0x1008, Access::Read),
            f(0x1ff0, Access::Write),
            f(two_mib + 0x5010, Access::Read),
            f(0x3000, Access::Read),
            f(0x1000, Access::Read),
        ]);
        assert_eq!(batch.duplicates, 3);
        assert_eq!(batch.blocks.len(), 2);
        assert_eq!(batch.blocks[0].block, 0);
        assert_eq!(
            batch.blocks[0]
                .faults
                .iter()
                .map(|x| (x.vpn(), x.access))
                .collect::<Vec<_>>(),
            [(1, Access::Write), (3, Access::Read)],
            "the write wins its page"
        );
        assert_eq!(batch.blocks[0].access(), Access::Write);
        assert_eq!(batch.blocks[1].block, 1);
        assert_eq!(batch.blocks[1].access(), Access::Read);
    }
}
