//! The driver's errors, with the kernel's distinctions.

use hmm::addr::VirtAddr;
use thiserror::Error;

/// Why a GPU VM operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SvmError {
    /// A bad argument (`-EINVAL`).
    #[error("invalid argument: {what}")]
    Inval {
        /// What was wrong.
        what: &'static str,
    },
    /// A GPU fault the driver cannot resolve: no VMA, or an access the VMA does not allow
    /// (UVM cancels the faulting context; here the access fails).
    #[error("fatal GPU fault at {addr}: {why}")]
    Fatal {
        /// The faulting address.
        addr: VirtAddr,
        /// Why it cannot be resolved.
        why: &'static str,
    },
    /// The process the VM mirrors has exited.
    #[error("the process has exited")]
    Exited,
    /// No memory to resolve a fault (`-ENOMEM`).
    #[error("out of memory")]
    NoMem,
    /// The device is offline (`-ENODEV`): taken away by [`GpuDevice::offline`](crate::GpuDevice::offline); its VMs map nothing until it is back.
    #[error("the device is offline")]
    Offline,
    /// Device memory stayed in use: pages kept being held by others while the device went
    /// offline, or it is back before its pages all left (`-EBUSY`).
    #[error("{pages} pages of device memory still in use")]
    InUse {
        /// Pages in use.
        pages: u64,
    },
    /// The access kept faulting: every replay found its page unmapped again
    /// (invalidations kept winning).
    #[error("the access kept faulting at {addr}")]
    Busy {
        /// The address.
        addr: VirtAddr,
    },
}
