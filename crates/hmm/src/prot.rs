//! Protection and VMA flags: what a caller asks for ([`Prot`]) and what a VMA records
//! ([`VmFlags`]). Both the address space and the notifier ranges that describe a VMA use
//! them, so they sit below both.

use bitflags::bitflags;

bitflags! {
    /// Access a mapping allows (`PROT_*` of `mmap`/`mprotect`). The empty set is
    /// `PROT_NONE`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
    pub struct Prot: u32 {
        /// `PROT_READ`.
        const READ = 1;
        /// `PROT_WRITE`.
        const WRITE = 2;
        /// `PROT_EXEC`.
        const EXEC = 4;
    }
}

impl Prot {
    /// `PROT_NONE`.
    pub const NONE: Prot = Prot::empty();
}

bitflags! {
    /// Flags of a VMA (the kernel's `vm_flags` the model needs).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
    pub struct VmFlags: u64 {
        /// Readable.
        const READ = 1 << 0;
        /// Writable.
        const WRITE = 1 << 1;
        /// Executable.
        const EXEC = 1 << 2;
        /// Shared mapping: writes are seen by every mapping of the object, never copied.
        const SHARED = 1 << 3;
        /// `mprotect` may add read.
        const MAYREAD = 1 << 4;
        /// `mprotect` may add write.
        const MAYWRITE = 1 << 5;
        /// `mprotect` may add exec.
        const MAYEXEC = 1 << 6;
        /// Registered with a userfaultfd for missing pages (`VM_UFFD_MISSING`).
        #[doc(alias = "VM_UFFD_MISSING")]
        const UFFD_MISSING = 1 << 9;
        /// Registered with a userfaultfd for write-protection (`VM_UFFD_WP`).
        #[doc(alias = "VM_UFFD_WP")]
        const UFFD_WP = 1 << 12;
        /// `MADV_DONTFORK`: `fork` leaves the range out of the child (`VM_DONTCOPY`).
        #[doc(alias = "VM_DONTCOPY")]
        const DONTCOPY = 1 << 17;
        /// Mapped with huge pages of a hugetlb pool, 2 MiB or 1 GiB (`VM_HUGETLB`).
        const HUGETLB = 1 << 26;
        /// Every page counts as soft-dirty (set on new VMAs, cleared by
        /// [`Mm::clear_soft_dirty`](crate::mm::Mm::clear_soft_dirty)); ignored when merging.
        const SOFTDIRTY = 1 << 27;
        /// Pages are inserted by a driver (`vm_insert_page`); no anonymous faults.
        const MIXEDMAP = 1 << 28;
        /// `MADV_HUGEPAGE`.
        const HUGEPAGE = 1 << 29;
        /// `MADV_NOHUGEPAGE`.
        const NOHUGEPAGE = 1 << 30;
    }
}

impl VmFlags {
    /// The access bits for `prot`.
    pub fn from_prot(prot: Prot) -> VmFlags {
        let mut f = VmFlags::empty();
        f.set(VmFlags::READ, prot.contains(Prot::READ));
        f.set(VmFlags::WRITE, prot.contains(Prot::WRITE));
        f.set(VmFlags::EXEC, prot.contains(Prot::EXEC));
        f
    }

    /// The access bits as a [`Prot`].
    pub fn prot(self) -> Prot {
        let mut p = Prot::NONE;
        p.set(Prot::READ, self.contains(VmFlags::READ));
        p.set(Prot::WRITE, self.contains(VmFlags::WRITE));
        p.set(Prot::EXEC, self.contains(VmFlags::EXEC));
        p
    }

    /// The access bits.
    pub const ACCESS: VmFlags = VmFlags::READ.union(VmFlags::WRITE).union(VmFlags::EXEC);

    /// The userfaultfd registration bits (`__VM_UFFD_FLAGS`).
    #[doc(alias = "__VM_UFFD_FLAGS")]
    pub const UFFD: VmFlags = VmFlags::UFFD_MISSING.union(VmFlags::UFFD_WP);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prot_round_trips_through_vm_flags() {
        for bits in 0..8 {
            let p = Prot::from_bits(bits).unwrap();
            assert_eq!(VmFlags::from_prot(p).prot(), p);
        }
        assert!(Prot::from_bits(8).is_none());
    }
}
