//! The words a migration is described by: [`MigratePfn`] (`src`/`dst` entries) and the
//! selection flags [`MigrateVmaFlags`].

use bitflags::bitflags;

use crate::phys::LockedFolio;

bitflags! {
    /// Which pages `migrate_vma_setup` selects (`enum migrate_vma_direction`). Holes and
    /// the zero page of anonymous memory are selected whatever the flags.
    #[doc(alias = "migrate_vma_direction")]
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct MigrateVmaFlags: u32 {
        /// System pages (and the zero page).
        #[doc(alias = "MIGRATE_VMA_SELECT_SYSTEM")]
        const SELECT_SYSTEM = 1 << 0;
        /// Device-private pages whose pagemap owner is `pgmap_owner`.
        #[doc(alias = "MIGRATE_VMA_SELECT_DEVICE_PRIVATE")]
        const SELECT_DEVICE_PRIVATE = 1 << 1;
        /// Device-coherent pages whose pagemap owner is `pgmap_owner`.
        #[doc(alias = "MIGRATE_VMA_SELECT_DEVICE_COHERENT")]
        const SELECT_DEVICE_COHERENT = 1 << 2;
        /// Keep PMD-sized units whole (device THP migration).
        #[doc(alias = "MIGRATE_VMA_SELECT_COMPOUND")]
        const SELECT_COMPOUND = 1 << 3;
        /// Fault in, during the collect walk itself, the pages that cannot migrate as
        /// they are (another device's private pages, device-exclusive entries): one walk
        /// instead of `hmm_range_fault` and then the migration (the migrate-on-fault
        /// series; its RFC used `1 << 3`, which `SELECT_COMPOUND` took since).
        #[doc(alias = "MIGRATE_VMA_FAULT")]
        const FAULT = 1 << 4;
    }
}

bitflags! {
    /// Flag bits of a [`MigratePfn`] word.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct MigratePfnFlags: u64 {
        /// The frame number is meaningful.
        #[doc(alias = "MIGRATE_PFN_VALID")]
        const VALID = 1 << 0;
        /// The entry is (still) migrating.
        #[doc(alias = "MIGRATE_PFN_MIGRATE")]
        const MIGRATE = 1 << 1;
        /// Source mapped writable / destination to be mapped writable.
        #[doc(alias = "MIGRATE_PFN_WRITE")]
        const WRITE = 1 << 3;
        /// Head of a PMD-sized unit; the next 511 words are 0.
        #[doc(alias = "MIGRATE_PFN_COMPOUND")]
        const COMPOUND = 1 << 4;
    }
}

/// `MIGRATE_PFN_SHIFT`: the frame number is stored this far up.
pub const MIGRATE_PFN_SHIFT: u32 = 6;

/// One `src` or `dst` word: a frame number (CPU or device: one numbering) and flags.
/// A source word of exactly `MIGRATE` (no `VALID`) is a hole or the zero page: the
/// destination is zero-filled, nothing is copied.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct MigratePfn(u64);

impl MigratePfn {
    /// A word naming frame `nr` (`migrate_pfn`, which sets `VALID`) with `flags`.
    #[doc(alias = "migrate_pfn")]
    pub fn new(nr: u64, flags: MigratePfnFlags) -> MigratePfn {
        MigratePfn((nr << MIGRATE_PFN_SHIFT) | (flags | MigratePfnFlags::VALID).bits())
    }

    /// A word of flags only (a hole: `MIGRATE` without a page).
    pub fn flags_only(flags: MigratePfnFlags) -> MigratePfn {
        MigratePfn((flags - MigratePfnFlags::VALID).bits())
    }

    /// The raw word.
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// The flags.
    pub fn flags(self) -> MigratePfnFlags {
        MigratePfnFlags::from_bits_truncate(self.0)
    }

    /// The frame number (meaningful when [`is_valid`](Self::is_valid)).
    pub fn frame_nr(self) -> u64 {
        self.0 >> MIGRATE_PFN_SHIFT
    }

    /// Whether a page is named.
    pub fn is_valid(self) -> bool {
        self.flags().contains(MigratePfnFlags::VALID)
    }

    /// Whether the entry is migrating.
    pub fn is_migrating(self) -> bool {
        self.flags().contains(MigratePfnFlags::MIGRATE)
    }

    /// The pages the word stands for: 512 for the head of a unit (`COMPOUND`), else 1.
    pub fn npages(self) -> u64 {
        if self.flags().contains(MigratePfnFlags::COMPOUND) {
            crate::addr::PMD_NR
        } else {
            1
        }
    }

    /// Whether the word is 0.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The destination word for `dst`, taking over its lock and reference: the `set_dst`
    /// of both migration kinds. An order-9 folio gets `COMPOUND`. `src` is the word of the
    /// entry (or of its unit's head), `None` when the index is outside the migration.
    pub(crate) fn destination<'f>(
        index: usize,
        src: Option<MigratePfn>,
        dst_word: MigratePfn,
        dst: LockedFolio<'f>,
        write: bool,
    ) -> Result<MigratePfn, DstRefused<'f>> {
        let refuse = |reason, folio| {
            Err(DstRefused {
                index,
                reason,
                folio,
            })
        };
        match src {
            None => return refuse("no such entry", dst),
            Some(w) if !w.is_migrating() => return refuse("the entry is not migrating", dst),
            Some(_) if !dst_word.is_empty() => return refuse("the entry has a destination", dst),
            Some(_) => {}
        }
        let order = dst.meta().order();
        if order != 0 && order != crate::addr::PMD_ORDER {
            return refuse("a destination is a page or a 2 MiB folio", dst);
        }
        let mut flags = MigratePfnFlags::VALID;
        if write {
            flags |= MigratePfnFlags::WRITE;
        }
        if dst.meta().order() == crate::addr::PMD_ORDER {
            flags |= MigratePfnFlags::COMPOUND;
        }
        Ok(MigratePfn::new(dst.into_raw_nr(), flags))
    }

    /// The `src` word a migrating `hmm_range_fault` output word stands for (the
    /// conversion of `migrate_hmm_range_setup`): 0 unless `HMM_PFN_MIGRATE` is set;
    /// `MIGRATE` alone for a hole or the zero page (no `VALID`); else the frame with
    /// `MIGRATE`, and `WRITE` if the CPU mapping was writable; `COMPOUND` for the head of
    /// a PMD-sized unit (`HMM_PFN_COMPOUND`).
    #[doc(alias = "migrate_hmm_range_setup")]
    pub fn from_hmm(word: crate::range_fault::HmmPfn) -> MigratePfn {
        use crate::range_fault::HmmPfnFlags as H;
        let f = word.flags();
        if !f.contains(H::MIGRATE) {
            return MigratePfn::default();
        }
        let mut flags = MigratePfnFlags::MIGRATE;
        if f.contains(H::COMPOUND) {
            flags |= MigratePfnFlags::COMPOUND;
        }
        if !f.contains(H::VALID) {
            return MigratePfn::flags_only(flags);
        }
        if f.contains(H::WRITE) {
            flags |= MigratePfnFlags::WRITE;
        }
        MigratePfn::new(word.frame_nr(), flags)
    }

    pub(crate) fn without(self, f: MigratePfnFlags) -> MigratePfn {
        MigratePfn(self.0 & !f.bits())
    }
}

impl std::fmt::Debug for MigratePfn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MigratePfn({:#x}, {:?})", self.frame_nr(), self.flags())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_match_the_kernel_layout() {
        let w = MigratePfn::new(0x1234, MigratePfnFlags::MIGRATE | MigratePfnFlags::WRITE);
        assert_eq!(w.as_u64(), (0x1234 << 6) | 0b1011);
        assert_eq!(w.frame_nr(), 0x1234);
        assert!(w.is_valid() && w.is_migrating());
        let hole = MigratePfn::flags_only(MigratePfnFlags::MIGRATE);
        assert_eq!(hole.as_u64(), 2);
        assert!(!hole.is_valid() && hole.is_migrating());
        assert!(!hole.without(MigratePfnFlags::MIGRATE).is_migrating());
        assert!(MigratePfn::default().is_empty());
        assert_eq!(MigrateVmaFlags::SELECT_COMPOUND.bits(), 8);
        assert!(!MigrateVmaFlags::FAULT.intersects(MigrateVmaFlags::SELECT_COMPOUND));
    }

    #[test]
    fn hmm_words_convert_both_ways() {
        use crate::range_fault::HmmPfn;
        for src in [
            MigratePfn::default(),
            MigratePfn::flags_only(MigratePfnFlags::MIGRATE),
            MigratePfn::new(0x42, MigratePfnFlags::MIGRATE),
            MigratePfn::new(0x42, MigratePfnFlags::MIGRATE | MigratePfnFlags::WRITE),
            MigratePfn::flags_only(MigratePfnFlags::MIGRATE | MigratePfnFlags::COMPOUND),
            MigratePfn::new(
                0x200,
                MigratePfnFlags::MIGRATE | MigratePfnFlags::COMPOUND | MigratePfnFlags::WRITE,
            ),
        ] {
            let word = HmmPfn::from_migrate(src);
            assert_eq!(MigratePfn::from_hmm(word), src, "{word:?}");
        }
        // A word that is not migrating converts to 0 whatever else it says.
        let plain = HmmPfn::from_migrate(MigratePfn::new(7, MigratePfnFlags::MIGRATE));
        assert!(plain.is_migrating());
        assert_eq!(
            MigratePfn::from_hmm(HmmPfn::default()),
            MigratePfn::default()
        );
    }
}

/// A destination [`Migration::set_dst`](super::Migration::set_dst) (or
/// [`DeviceMigration::set_dst`](super::DeviceMigration::set_dst)) would not take: the folio
/// comes back, still locked and referenced, and dropping the error unlocks and frees it, so
/// nothing leaks whatever the caller does with it.
#[derive(Debug, thiserror::Error)]
#[error("entry {index} refuses a destination: {reason}")]
pub struct DstRefused<'f> {
    /// The entry asked for.
    pub index: usize,
    /// Why: no such entry, the entry is not migrating, it has a destination already, or
    /// the folio is neither a page nor a 2 MiB folio.
    pub reason: &'static str,
    /// The folio handed over, given back.
    pub folio: LockedFolio<'f>,
}
