//! The driver's user interface, as `lib/test_hmm_uapi.h` defines it: the command block,
//! the command numbers, the snapshot bytes, the flags, and the errors as errnos.

use hmm::migrate::MigrateError;
use hmm::range_fault::HmmError;
use thiserror::Error;

/// The argument of every command (`struct hmm_dmirror_cmd`, five 64-bit words).
#[doc(alias = "hmm_dmirror_cmd")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct HmmDmirrorCmd {
    /// In: the virtual address the device accesses.
    pub addr: u64,
    /// In: the user buffer (a virtual address of the same process) data is copied to or
    /// from; for SNAPSHOT, the byte array.
    pub ptr: u64,
    /// In: pages.
    pub npages: u64,
    /// Out: pages processed.
    pub cpages: u64,
    /// Out: device faults taken (calls of the fault routine, not pages).
    pub faults: u64,
}

/// A command (`HMM_DMIRROR_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum DmirrorCmd {
    /// The device reads `npages` at `addr` into `ptr`, faulting missing pages.
    #[doc(alias = "HMM_DMIRROR_READ")]
    Read,
    /// READ whose faults go through `hmm_range_fault_unlocked_timeout` with no timeout
    /// (Linux 2026): the driver does not hold the mmap lock, `Busy` passes are retried
    /// inside, and a fatal signal of the process stops it with `-EINTR`. Number 0x09.
    #[doc(alias = "HMM_DMIRROR_READ_UNLOCKED")]
    ReadUnlocked,
    /// The device writes `npages` from `ptr` at `addr`, faulting pages it cannot write.
    #[doc(alias = "HMM_DMIRROR_WRITE")]
    Write,
    /// Migrates the range to device memory (system pages and holes), then reads it back
    /// from the device's table without faulting into `ptr` (`-ENOENT` if a page is not
    /// there). `cpages`: pages read back.
    #[doc(alias = "HMM_DMIRROR_MIGRATE_TO_DEV")]
    MigrateToDev,
    /// Migrates this device's pages in the range back to system memory. `cpages`: pages
    /// migrated.
    #[doc(alias = "HMM_DMIRROR_MIGRATE_TO_SYS")]
    MigrateToSys,
    /// One byte per page at `ptr` describing the CPU mapping (`HMM_DMIRROR_PROT_*`).
    #[doc(alias = "HMM_DMIRROR_SNAPSHOT")]
    Snapshot,
    /// Makes every page exclusive to the device (`make_device_exclusive`), maps it for
    /// atomics, then reads the range back from the device's table into `ptr`.
    #[doc(alias = "HMM_DMIRROR_EXCLUSIVE")]
    Exclusive,
    /// `EPERM` while any page of the range is still mapped for device atomics (the CPU
    /// has not revoked it yet).
    #[doc(alias = "HMM_DMIRROR_CHECK_EXCLUSIVE")]
    CheckExclusive,
    /// Evicts all of the device's memory back to system memory and retires its chunks
    /// (`migrate_device_range`).
    #[doc(alias = "HMM_DMIRROR_RELEASE")]
    Release,
    /// Sets the mirror's test flags to `npages` ([`HMM_DMIRROR_FLAG_FAIL_ALLOC`]).
    #[doc(alias = "HMM_DMIRROR_FLAGS")]
    Flags,
    /// Migrates the range to device memory in one walk that also faults in what cannot
    /// migrate as it is (another device's pages, device-exclusive entries)
    /// (`hmm_range_fault` with `REQ_FAULT | REQ_MIGRATE`, then
    /// `migrate_hmm_range_setup`), then reads it back as MIGRATE_TO_DEV does. Number
    /// 0x0a: 0x09 is READ_UNLOCKED.
    #[doc(alias = "HMM_DMIRROR_MIGRATE_ON_FAULT_TO_DEV")]
    MigrateOnFaultToDev,
}

impl DmirrorCmd {
    /// Every command, in number order.
    pub const ALL: [DmirrorCmd; 11] = [
        DmirrorCmd::Read,
        DmirrorCmd::Write,
        DmirrorCmd::MigrateToDev,
        DmirrorCmd::MigrateToSys,
        DmirrorCmd::Snapshot,
        DmirrorCmd::Exclusive,
        DmirrorCmd::CheckExclusive,
        DmirrorCmd::Release,
        DmirrorCmd::Flags,
        DmirrorCmd::ReadUnlocked,
        DmirrorCmd::MigrateOnFaultToDev,
    ];

    /// The command's number in the ioctl (`_IOWR('H', nr, struct hmm_dmirror_cmd)`).
    pub fn nr(self) -> u32 {
        match self {
            DmirrorCmd::Read => 0x00,
            DmirrorCmd::Write => 0x01,
            DmirrorCmd::MigrateToDev => 0x02,
            DmirrorCmd::MigrateToSys => 0x03,
            DmirrorCmd::Snapshot => 0x04,
            DmirrorCmd::Exclusive => 0x05,
            DmirrorCmd::CheckExclusive => 0x06,
            DmirrorCmd::Release => 0x07,
            DmirrorCmd::Flags => 0x08,
            DmirrorCmd::ReadUnlocked => 0x09,
            DmirrorCmd::MigrateOnFaultToDev => 0x0a,
        }
    }

    /// The full ioctl request number: `0xC0284800 + nr`.
    pub fn ioctl(self) -> u32 {
        IOCTL_BASE + self.nr()
    }

    /// The command an ioctl request number names, if this driver has it.
    pub fn from_ioctl(request: u32) -> Option<DmirrorCmd> {
        DmirrorCmd::ALL.into_iter().find(|c| c.ioctl() == request)
    }
}

/// `_IOWR('H', 0, struct hmm_dmirror_cmd)`: direction read|write, size 40, type 'H'.
const IOCTL_BASE: u32 = 0xC028_4800;

/// `HMM_DMIRROR_FLAG_FAIL_ALLOC`: the next device or system allocation of a migration
/// fails once.
pub const HMM_DMIRROR_FLAG_FAIL_ALLOC: u64 = 1 << 0;

/// Snapshot bytes (`enum hmm_dmirror_prot`). Type values are not independent bits
/// (`DEV_PRIVATE_REMOTE` is `0x30`).
pub mod prot {
    /// No access possible (no VMA, no read permission).
    pub const ERROR: u8 = 0xff;
    /// Not present (not faulted in, or another device's private page).
    pub const NONE: u8 = 0x00;
    /// Valid, read-only.
    pub const READ: u8 = 0x01;
    /// Valid and writable.
    pub const WRITE: u8 = 0x02;
    /// Part of a PMD mapping.
    pub const PMD: u8 = 0x04;
    /// Part of a PUD mapping.
    pub const PUD: u8 = 0x08;
    /// The shared zero page.
    pub const ZERO: u8 = 0x10;
    /// A device-private page of this device.
    pub const DEV_PRIVATE_LOCAL: u8 = 0x20;
    /// A device-private page of another device.
    pub const DEV_PRIVATE_REMOTE: u8 = 0x30;
    /// A device-coherent page of this device.
    pub const DEV_COHERENT_LOCAL: u8 = 0x40;
    /// A device-coherent page of another device.
    pub const DEV_COHERENT_REMOTE: u8 = 0x50;
}

/// Why a command failed; [`errno`](Self::errno) gives its error number and
/// [`ret`](Self::ret) the kernel's return value. On failure the command block is not
/// copied back (its outputs are unchanged), as in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error, serde::Serialize)]
pub enum DmirrorError {
    /// Bad argument: unaligned address, no pages, overflow, unknown command (`-EINVAL`).
    #[error("invalid argument: {what}")]
    Inval {
        /// What was wrong.
        what: &'static str,
    },
    /// A page is not mapped by the device (`-ENOENT`).
    #[error("page not mapped by the device")]
    NoEnt,
    /// The range or the user buffer cannot be accessed (`-EFAULT`).
    #[error("bad address")]
    Fault,
    /// Invalidations kept colliding until the timeout (`-EBUSY`).
    #[error("busy: the range kept being invalidated")]
    Busy,
    /// Write to memory the process may only read (`-EPERM`).
    #[error("permission denied")]
    Perm,
    /// Out of memory (`-ENOMEM`).
    #[error("out of memory")]
    NoMem,
    /// The memory cannot be used this way (`-EOPNOTSUPP`): exclusive access to memory
    /// that is not private anonymous.
    #[error("operation not supported")]
    NotSupported,
    /// A migrate-on-fault piece leaves its VMA (`-ERANGE`).
    #[error("range crosses a VMA boundary")]
    Range,
    /// The process has a fatal signal pending (`-EINTR`): READ_UNLOCKED gave up.
    #[error("interrupted by a fatal signal")]
    Intr,
}

impl DmirrorError {
    /// The error number (`EINVAL`, `ENOENT`, ...), positive as `errno` is and as
    /// [`MmError::errno`](hmm::mm::MmError::errno) gives it.
    pub fn errno(self) -> i32 {
        match self {
            DmirrorError::Inval { .. } => 22, // EINVAL
            DmirrorError::NoEnt => 2,         // ENOENT
            DmirrorError::Fault => 14,        // EFAULT
            DmirrorError::Busy => 16,         // EBUSY
            DmirrorError::Perm => 1,          // EPERM
            DmirrorError::NoMem => 12,        // ENOMEM
            DmirrorError::NotSupported => 95, // EOPNOTSUPP
            DmirrorError::Range => 34,        // ERANGE
            DmirrorError::Intr => 4,          // EINTR
        }
    }

    /// What the kernel driver's ioctl handler returns: `-errno`.
    pub fn ret(self) -> i32 {
        -self.errno()
    }
}

impl From<HmmError> for DmirrorError {
    fn from(e: HmmError) -> Self {
        match e {
            HmmError::Busy => DmirrorError::Busy,
            HmmError::Fault { .. } => DmirrorError::Fault,
            HmmError::Perm { .. } => DmirrorError::Perm,
            HmmError::NoMem { .. } => DmirrorError::NoMem,
            HmmError::Inval { what } => DmirrorError::Inval { what },
            HmmError::Range { .. } => DmirrorError::Range,
            HmmError::Interrupted => DmirrorError::Intr,
        }
    }
}

impl From<MigrateError> for DmirrorError {
    fn from(e: MigrateError) -> Self {
        match e {
            MigrateError::Inval { what } => DmirrorError::Inval { what },
            MigrateError::Fault { .. } => DmirrorError::Fault,
            MigrateError::NoMem { .. } => DmirrorError::NoMem,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel() {
        assert_eq!(DmirrorCmd::Read.ioctl(), 0xC028_4800);
        assert_eq!(DmirrorCmd::Write.ioctl(), 0xC028_4801);
        assert_eq!(DmirrorCmd::Snapshot.ioctl(), 0xC028_4804);
        assert_eq!(DmirrorCmd::Flags.ioctl(), 0xC028_4808);
        assert_eq!(DmirrorCmd::MigrateOnFaultToDev.ioctl(), 0xC028_480A);
        assert_eq!(
            DmirrorCmd::from_ioctl(0xC028_4804),
            Some(DmirrorCmd::Snapshot)
        );
        assert_eq!(DmirrorCmd::from_ioctl(0xC028_48FF), None);
        assert_eq!(std::mem::size_of::<HmmDmirrorCmd>(), 40);
    }
}
