//! Registration (`UFFDIO_REGISTER`, `UFFDIO_UNREGISTER`) and the release of a closed
//! userfaultfd.

use std::sync::Arc;

use bitflags::bitflags;

use crate::addr::{VaRange, VirtAddr};
use crate::prot::VmFlags;

use super::super::mprotect::CpMode;
use super::super::vma::{Backing, Vma};
use super::super::{thp, Mm, MmState};
use super::{user_range, UffdCtx, UffdError, Userfaultfd};

bitflags! {
    /// How a range is registered (`UFFDIO_REGISTER_MODE_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct RegisterMode: u64 {
        /// Report faults on missing pages (`UFFDIO_REGISTER_MODE_MISSING`).
        #[doc(alias = "UFFDIO_REGISTER_MODE_MISSING")]
        const MISSING = 1 << 0;
        /// Report writes to write-protected pages (`UFFDIO_REGISTER_MODE_WP`).
        #[doc(alias = "UFFDIO_REGISTER_MODE_WP")]
        const WP = 1 << 1;
    }
}

bitflags! {
    /// The operations a registered range supports, as `UFFDIO_REGISTER` reports them
    /// (`1 << _UFFDIO_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct UffdIoctls: u64 {
        /// `UFFDIO_WAKE`.
        const WAKE = 1 << 0x02;
        /// `UFFDIO_COPY`.
        const COPY = 1 << 0x03;
        /// `UFFDIO_ZEROPAGE`.
        const ZEROPAGE = 1 << 0x04;
        /// `UFFDIO_MOVE`.
        const MOVE = 1 << 0x05;
        /// `UFFDIO_WRITEPROTECT` (write-protect mode only).
        const WRITEPROTECT = 1 << 0x06;
    }
}

/// The VMA flags of a registration mode.
fn vm_flags(mode: RegisterMode) -> VmFlags {
    let mut f = VmFlags::empty();
    f.set(VmFlags::UFFD_MISSING, mode.contains(RegisterMode::MISSING));
    f.set(VmFlags::UFFD_WP, mode.contains(RegisterMode::WP));
    f
}

/// Whether `vma` may be registered in `mode` (`vma_can_userfault`): anonymous memory in
/// either mode; shared memory and private file mappings (shmem) for missing pages only;
/// neither hugetlb nor driver mappings.
fn can_userfault(vma: &Vma, mode: RegisterMode) -> Result<(), UffdError> {
    if vma.flags().contains(VmFlags::HUGETLB) {
        return Err(UffdError::Inval {
            what: "hugetlb memory cannot be registered in the model",
        });
    }
    match vma.backing() {
        Backing::Anon => Ok(()),
        Backing::Shmem(_) if !mode.contains(RegisterMode::WP) => Ok(()),
        Backing::Shmem(_) => Err(UffdError::Inval {
            what: "write-protect mode needs anonymous memory in the model (no PTE markers)",
        }),
        Backing::Driver(_) => Err(UffdError::Inval {
            what: "a driver mapping cannot be registered",
        }),
    }
}

impl Userfaultfd {
    /// Registers the VMAs in `[start, start + len)` in `mode` (`UFFDIO_REGISTER`); holes
    /// between them are skipped, and a VMA that reaches outside the range is split at its
    /// edge. Registering again changes the mode. Returns the operations the range
    /// supports.
    ///
    /// Errors: `Inval` for an unaligned or empty range, an empty mode, no VMA in the
    /// range, or memory that cannot be registered; `Perm` for a mapping that may never be
    /// written (`!VM_MAYWRITE`); `Busy` if another userfaultfd has part of the range;
    /// `Srch` if the address space is gone. Nothing changes on an error.
    #[doc(alias = "UFFDIO_REGISTER")]
    #[doc(alias = "userfaultfd_register")]
    pub fn register(
        &self,
        start: VirtAddr,
        len: u64,
        mode: RegisterMode,
    ) -> Result<UffdIoctls, UffdError> {
        let range = user_range(start, len)?;
        if mode.is_empty() {
            return Err(UffdError::Inval { what: "no mode" });
        }
        let mm = self.mm()?;
        let mut st = mm.lock.write();
        if st.vmas.overlapping(range).next().is_none() {
            return Err(UffdError::Inval {
                what: "no VMA in the range",
            });
        }
        for v in st.vmas.overlapping(range) {
            can_userfault(v, mode)?;
            if !v.flags().contains(VmFlags::MAYWRITE) {
                return Err(UffdError::Perm {
                    what: "the mapping may never be written",
                });
            }
            if v.uffd().is_some_and(|c| !Arc::ptr_eq(c, &self.ctx)) {
                return Err(UffdError::Busy {
                    what: "another userfaultfd has part of the range",
                });
            }
        }
        thp::split_at_vma_bounds(&mm, &st, range);
        let want = vm_flags(mode);
        let ctx = self.ctx.clone();
        st.vmas.update(range, |v| {
            let flags = (v.flags() - VmFlags::UFFD) | want;
            v.set_uffd(flags, Some(ctx.clone()))
        });
        let mut ioctls = UffdIoctls::all();
        if !mode.contains(RegisterMode::WP) {
            ioctls -= UffdIoctls::WRITEPROTECT;
        }
        Ok(ioctls)
    }

    /// Unregisters the VMAs of this userfaultfd in `[start, start + len)`
    /// (`UFFDIO_UNREGISTER`): their write-protected entries lose the bit and the threads
    /// waiting on faults in the range retry without the userfaultfd.
    ///
    /// Errors: `Inval` for an unaligned or empty range; `Srch` if the address space is
    /// gone.
    #[doc(alias = "UFFDIO_UNREGISTER")]
    pub fn unregister(&self, start: VirtAddr, len: u64) -> Result<(), UffdError> {
        let range = user_range(start, len)?;
        let mm = self.mm()?;
        let mut st = mm.lock.write();
        mm.uffd_clear(&mut st, &self.ctx, range);
        drop(st);
        self.ctx.wake(range);
        Ok(())
    }
}

impl Mm {
    /// Removes `ctx` from its VMAs in `range` (`userfaultfd_clear_vma`): write-protected
    /// entries lose the bit first, then the VMAs lose the flags and merge.
    fn uffd_clear(&self, st: &mut MmState, ctx: &Arc<UffdCtx>, range: VaRange) {
        let mine: Vec<Vma> = st
            .vmas
            .overlapping(range)
            .filter(|v| v.uffd().is_some_and(|c| Arc::ptr_eq(c, ctx)))
            .cloned()
            .collect();
        if mine.is_empty() {
            return;
        }
        for v in mine.iter().filter(|v| v.flags().contains(VmFlags::UFFD_WP)) {
            let part = v.range().intersect(&range).expect("overlapping VMA");
            self.change_protection(&st.pt, v, part, CpMode::UffdWpResolve);
        }
        thp::split_at_vma_bounds(self, st, range);
        st.vmas.update(range, |v| {
            if v.uffd().is_some_and(|c| Arc::ptr_eq(c, ctx)) {
                v.set_uffd(v.flags() - VmFlags::UFFD, None)
            } else {
                false
            }
        });
    }

    /// The release of `ctx` (`userfaultfd_release`): every VMA leaves it.
    pub(super) fn uffd_release(&self, ctx: &Arc<UffdCtx>) {
        let mut st = self.lock.write();
        let all = VaRange::new(VirtAddr::ZERO, VirtAddr::new(crate::addr::USER_VA_END))
            .expect("the user address space");
        self.uffd_clear(&mut st, ctx, all);
    }
}
