//! Errors of address-space operations and CPU accesses, keeping the kernel's distinctions.

use thiserror::Error;

use crate::addr::VirtAddr;

/// Errors of `mmap`, `munmap`, `mprotect`, `madvise` (the kernel's errno values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum MmError {
    /// `-EINVAL`: a malformed argument.
    #[error("invalid argument (EINVAL): {what}")]
    Inval {
        /// What was wrong.
        what: &'static str,
    },
    /// `-ENOMEM`: no room in the address space, a range not fully mapped, or no memory.
    #[error("out of memory or address space (ENOMEM): {what}")]
    NoMem {
        /// What ran out or was missing.
        what: &'static str,
    },
    /// `-EPERM`: a fixed mapping below the lowest mappable address.
    #[error("operation not permitted (EPERM): {what}")]
    Perm {
        /// Why.
        what: &'static str,
    },
    /// `-EACCES`: a protection the mapping may never have.
    #[error("permission denied (EACCES): {what}")]
    Access {
        /// Why.
        what: &'static str,
    },
    /// `-EAGAIN`: a transient condition (a pinned, referenced or locked page); retrying
    /// may succeed.
    #[error("resource temporarily unavailable (EAGAIN): {what}")]
    Again {
        /// Why.
        what: &'static str,
    },
    /// `-EBUSY`: something is in the way (an entry already mapped).
    #[error("device or resource busy (EBUSY): {what}")]
    Busy {
        /// What.
        what: &'static str,
    },
    /// `-EFAULT`: an address that is not mapped, or not with the access asked for.
    #[error("bad address {addr} (EFAULT)")]
    Fault {
        /// The first address that failed.
        addr: VirtAddr,
    },
    /// `-EINTR`: the process got a fatal signal while the operation waited.
    #[error("interrupted (EINTR): {what}")]
    Intr {
        /// What was waiting.
        what: &'static str,
    },
    /// `-EEXIST`: `MAP_FIXED_NOREPLACE` over an existing mapping.
    #[error("a mapping exists at {addr} (EEXIST)")]
    Exists {
        /// The occupied address.
        addr: VirtAddr,
    },
}

impl MmError {
    /// The kernel's errno for this error (positive).
    pub fn errno(&self) -> i32 {
        match self {
            MmError::Inval { .. } => libc::EINVAL,
            MmError::NoMem { .. } => libc::ENOMEM,
            MmError::Perm { .. } => libc::EPERM,
            MmError::Access { .. } => libc::EACCES,
            MmError::Again { .. } => libc::EAGAIN,
            MmError::Fault { .. } => libc::EFAULT,
            MmError::Busy { .. } => libc::EBUSY,
            MmError::Exists { .. } => libc::EEXIST,
            MmError::Intr { .. } => libc::EINTR,
        }
    }
}

/// Why an access raised SIGSEGV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegvCause {
    /// No VMA maps the address (`SEGV_MAPERR`).
    #[doc(alias = "SEGV_MAPERR")]
    MapErr,
    /// A VMA maps it but forbids the access (`SEGV_ACCERR`).
    #[doc(alias = "SEGV_ACCERR")]
    AccErr,
}

/// A CPU access or fault that could not be satisfied: the model's signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FaultError {
    /// SIGSEGV: no mapping, or the mapping forbids the access. Nothing was changed.
    #[error("segmentation fault at {addr} ({cause:?})")]
    Segv {
        /// The first faulting address.
        addr: VirtAddr,
        /// Unmapped or forbidden.
        cause: SegvCause,
    },
    /// SIGBUS: the entry cannot be resolved (`VM_FAULT_SIGBUS`).
    #[error("bus error at {addr}")]
    Bus {
        /// The faulting address.
        addr: VirtAddr,
    },
    /// No memory to resolve the fault (`VM_FAULT_OOM`).
    #[error("out of memory resolving a fault at {addr}")]
    Oom {
        /// The faulting address.
        addr: VirtAddr,
    },
    /// The process got a fatal signal while the fault waited for a userfaultfd handler:
    /// the access never completes (the task dies).
    #[error("killed while the fault at {addr} waited for userfaultfd")]
    Killed {
        /// The faulting address.
        addr: VirtAddr,
    },
}
