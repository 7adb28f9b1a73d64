//! Page-table entry encodings.
//!
//! An entry is a `u64` in the table; [`Pte`] is its decoded, comparable form, and every walk
//! `match`es on it exhaustively. The same encoding serves PTEs and PMD leaves (a PMD leaf
//! additionally carries `PSE`).
//!
//! ```text
//! present / PROT_NONE:   pfn[12..52] | SOFT_DIRTY 11 | UFFD_WP 10 | PROTNONE 8 | PSE 7 | DIRTY 6 | YOUNG 5 | WRITE 1 | PRESENT 0
//! non-present (swap-like): pfn[12..52] | SOFT_DIRTY 11 | UFFD_WP 10 | PSE 7 | DIRTY 6 | YOUNG 5 | type[1..5] | 0
//! none:                  0
//! ```
//!
//! A PROT_NONE entry has `PRESENT` clear and `PROTNONE` set, as on x86-64: the kernel treats
//! it as present (it maps a page) but the CPU cannot access it. Non-present entries have
//! `PRESENT` and `PROTNONE` clear and a non-zero type:
//!
//! | type | entry | target |
//! |---|---|---|
//! | 1 | migration, readable | [`Pfn`] |
//! | 2 | migration, readable-exclusive | [`Pfn`] |
//! | 3 | migration, writable | [`Pfn`] |
//! | 4 | device-private, readable | [`DevicePfn`] |
//! | 5 | device-private, writable | [`DevicePfn`] |
//! | 6 | device-exclusive | [`Pfn`] |
//! | 7 | migration of a device-private page, readable | [`DevicePfn`] |
//! | 8 | migration of a device-private page, readable-exclusive | [`DevicePfn`] |
//! | 9 | migration of a device-private page, writable | [`DevicePfn`] |
//! | 10 | swap | [`SwapSlot`] |
//! | 11 | swap, anon-exclusive (`SWP_EXCLUSIVE`) | [`SwapSlot`] |
//!
//! Migration entries keep `YOUNG`, `DIRTY`, `SOFT_DIRTY` and `UFFD_WP` of the entry they
//! replaced (the kernel's `SWP_MIG_YOUNG`/`SWP_MIG_DIRTY`, `pte_swp_soft_dirty`,
//! `pte_swp_uffd_wp`); device-private and swap entries keep `SOFT_DIRTY` and `UFFD_WP`.

use bitflags::bitflags;

use crate::addr::{DevicePfn, Pfn, PAGE_SHIFT};
use crate::phys::SwapSlot;

bitflags! {
    /// Flag bits of an entry, at their bit positions in the encoded word.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct PteFlags: u64 {
        /// Writable (present entries; for device-private entries: the writable type).
        const WRITE = 1 << 1;
        /// Accessed.
        #[doc(alias = "_PAGE_ACCESSED")]
        const YOUNG = 1 << 5;
        /// Written since the bit was cleared.
        #[doc(alias = "_PAGE_DIRTY")]
        const DIRTY = 1 << 6;
        /// Present but inaccessible (PROT_NONE); present entries only.
        #[doc(alias = "_PAGE_PROTNONE")]
        const PROTNONE = 1 << 8;
        /// userfaultfd write-protected: a write faults to the handler even where the VMA
        /// allows it (present entries: `_PAGE_UFFD_WP`; non-present ones:
        /// `_PAGE_SWP_UFFD_WP`). A present entry with it is never writable.
        #[doc(alias = "_PAGE_UFFD_WP")]
        const UFFD_WP = 1 << 10;
        /// Soft-dirty tracking bit.
        #[doc(alias = "_PAGE_SOFT_DIRTY")]
        const SOFT_DIRTY = 1 << 11;
    }
}

impl PteFlags {
    /// The bits that belong to the mapping rather than to the entry's kind: every change
    /// of an entry that keeps the mapping (migration and back, device-private and back,
    /// device-exclusive, a THP split, mprotect, mremap) carries them over.
    pub const STICKY: PteFlags = PteFlags::SOFT_DIRTY.union(PteFlags::UFFD_WP);
    /// [`STICKY`](Self::STICKY) plus the accessed and dirty bits, which migration entries
    /// and PMD splits keep too.
    pub const CARRIED: PteFlags = PteFlags::STICKY
        .union(PteFlags::YOUNG)
        .union(PteFlags::DIRTY);
}

const PRESENT: u64 = 1 << 0;
const PSE: u64 = 1 << 7;
const TYPE_SHIFT: u32 = 1;
const TYPE_MASK: u64 = 0xf << TYPE_SHIFT;
const PFN_MASK: u64 = ((1u64 << 40) - 1) << PAGE_SHIFT;
/// Flags a non-present entry may carry.
const SWP_FLAGS: PteFlags = PteFlags::CARRIED;

/// The access a migration entry remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MigrationKind {
    /// The page was mapped read-only and shared.
    #[doc(alias = "make_readable_migration_entry")]
    Read,
    /// The page was mapped read-only and anon-exclusive.
    #[doc(alias = "make_readable_exclusive_migration_entry")]
    ReadExclusive,
    /// The page was mapped writable.
    #[doc(alias = "make_writable_migration_entry")]
    Write,
}

impl MigrationKind {
    /// The migration entry for a mapping that was `writable`, of a page that was
    /// `anon_exclusive` (`make_*_migration_entry`).
    pub fn for_mapping(writable: bool, anon_exclusive: bool) -> MigrationKind {
        if writable {
            MigrationKind::Write
        } else if anon_exclusive {
            MigrationKind::ReadExclusive
        } else {
            MigrationKind::Read
        }
    }
}

/// The page a migration entry stands for: a CPU-addressable page, or a device-private
/// page being migrated (the kernel's device-private migration entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MigrationPfn {
    /// System RAM or device-coherent memory.
    Cpu(Pfn),
    /// Device-private memory.
    Device(DevicePfn),
}

impl MigrationPfn {
    /// The frame number (CPU and device pfns share one numbering).
    pub fn nr(self) -> u64 {
        match self {
            MigrationPfn::Cpu(p) => p.as_u64(),
            MigrationPfn::Device(p) => p.as_u64(),
        }
    }

    /// The same kind of pfn, `n` frames further (a page of the same folio).
    ///
    /// # Panics
    ///
    /// Panics past the representable range.
    #[track_caller]
    pub fn offset(self, n: u64) -> MigrationPfn {
        match self {
            MigrationPfn::Cpu(p) => MigrationPfn::Cpu(p.checked_add(n).expect("pfn in range")),
            MigrationPfn::Device(p) => {
                MigrationPfn::Device(p.checked_add(n).expect("pfn in range"))
            }
        }
    }
}

impl From<Pfn> for MigrationPfn {
    fn from(p: Pfn) -> Self {
        MigrationPfn::Cpu(p)
    }
}

/// A decoded page-table entry (PTE or PMD leaf).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pte {
    /// Nothing mapped.
    #[doc(alias = "pte_none")]
    None,
    /// A mapping of a CPU-addressable frame; with `PROTNONE` it maps the frame but denies
    /// every access.
    Present {
        /// The mapped frame (for a PMD leaf: the head of the 2 MiB folio).
        pfn: Pfn,
        /// Write, young, dirty, soft-dirty, uffd-wp, protnone.
        flags: PteFlags,
    },
    /// The page is being migrated; CPU accesses wait for the migration to end.
    Migration {
        /// The page being migrated.
        pfn: MigrationPfn,
        /// The access the entry had before.
        kind: MigrationKind,
        /// Young, dirty, soft-dirty, uffd-wp of the entry it replaced.
        flags: PteFlags,
    },
    /// The page lives in device-private memory; a CPU access faults into the owner's
    /// `migrate_to_ram`.
    DevicePrivate {
        /// The device frame.
        pfn: DevicePfn,
        /// `WRITE` if the entry is writable; soft-dirty, uffd-wp.
        flags: PteFlags,
    },
    /// A device holds the page for exclusive (atomic) access; a CPU access revokes it.
    DeviceExclusive {
        /// The page.
        pfn: Pfn,
        /// Young, dirty, soft-dirty, uffd-wp.
        flags: PteFlags,
    },
    /// The page was written to swap; a CPU access reads it back (`do_swap_page`).
    Swap {
        /// The slot holding its bytes.
        slot: SwapSlot,
        /// The page was anon-exclusive (`SWP_EXCLUSIVE`): swapping it in may map it
        /// writable at once.
        exclusive: bool,
        /// Soft-dirty, uffd-wp.
        flags: PteFlags,
    },
}

impl Pte {
    /// Decodes an entry word.
    ///
    /// # Panics
    ///
    /// Panics on a word this module never produces (an unknown non-present type).
    #[track_caller]
    pub fn decode(word: u64) -> Pte {
        if word == 0 {
            return Pte::None;
        }
        let flags_all = PteFlags::from_bits_truncate(word);
        if word & PRESENT != 0 || flags_all.contains(PteFlags::PROTNONE) {
            return Pte::Present {
                pfn: Pfn::new((word & PFN_MASK) >> PAGE_SHIFT),
                flags: flags_all,
            };
        }
        let target = (word & PFN_MASK) >> PAGE_SHIFT;
        let flags = flags_all & SWP_FLAGS;
        let migration = |kind, device: bool| Pte::Migration {
            pfn: if device {
                MigrationPfn::Device(DevicePfn::new(target))
            } else {
                MigrationPfn::Cpu(Pfn::new(target))
            },
            kind,
            flags,
        };
        match (word & TYPE_MASK) >> TYPE_SHIFT {
            1 => migration(MigrationKind::Read, false),
            2 => migration(MigrationKind::ReadExclusive, false),
            3 => migration(MigrationKind::Write, false),
            7 => migration(MigrationKind::Read, true),
            8 => migration(MigrationKind::ReadExclusive, true),
            9 => migration(MigrationKind::Write, true),
            4 => Pte::DevicePrivate {
                pfn: DevicePfn::new(target),
                flags: flags & PteFlags::STICKY,
            },
            5 => Pte::DevicePrivate {
                pfn: DevicePfn::new(target),
                flags: (flags & PteFlags::STICKY) | PteFlags::WRITE,
            },
            6 => Pte::DeviceExclusive {
                pfn: Pfn::new(target),
                flags,
            },
            10 | 11 => Pte::Swap {
                slot: SwapSlot::new(target),
                exclusive: (word & TYPE_MASK) >> TYPE_SHIFT == 11,
                flags: flags & PteFlags::STICKY,
            },
            t => panic!("corrupt page-table entry {word:#x} (type {t})"),
        }
    }

    /// Encodes the entry; `huge` marks a PMD leaf.
    pub fn encode(self, huge: Huge) -> u64 {
        let pse = if huge == Huge::Pte { 0 } else { PSE };
        let swp = |ty: u64, target: u64, flags: PteFlags| {
            (target << PAGE_SHIFT) | (ty << TYPE_SHIFT) | (flags & SWP_FLAGS).bits() | pse
        };
        match self {
            Pte::None => 0,
            Pte::Present { pfn, flags } => {
                let present = if flags.contains(PteFlags::PROTNONE) {
                    0
                } else {
                    PRESENT
                };
                (pfn.as_u64() << PAGE_SHIFT) | flags.bits() | present | pse
            }
            Pte::Migration { pfn, kind, flags } => {
                let ty = match kind {
                    MigrationKind::Read => 1,
                    MigrationKind::ReadExclusive => 2,
                    MigrationKind::Write => 3,
                };
                let ty = match pfn {
                    MigrationPfn::Cpu(_) => ty,
                    MigrationPfn::Device(_) => ty + 6,
                };
                swp(ty, pfn.nr(), flags)
            }
            Pte::DevicePrivate { pfn, flags } => {
                let ty = if flags.contains(PteFlags::WRITE) {
                    5
                } else {
                    4
                };
                swp(ty, pfn.as_u64(), flags & PteFlags::STICKY)
            }
            Pte::DeviceExclusive { pfn, flags } => swp(6, pfn.as_u64(), flags),
            Pte::Swap {
                slot,
                exclusive,
                flags,
            } => swp(
                if exclusive { 11 } else { 10 },
                slot.as_u64(),
                flags & PteFlags::STICKY,
            ),
        }
    }

    /// Whether the entry is none.
    pub fn is_none(&self) -> bool {
        matches!(self, Pte::None)
    }

    /// Whether the entry maps a frame the CPU may access (present and not PROT_NONE).
    #[doc(alias = "pte_present")]
    pub fn is_accessible(&self) -> bool {
        matches!(self, Pte::Present { flags, .. } if !flags.contains(PteFlags::PROTNONE))
    }

    /// Whether the entry is a present, writable mapping.
    #[doc(alias = "pte_write")]
    pub fn is_writable(&self) -> bool {
        matches!(self, Pte::Present { flags, .. }
            if flags.contains(PteFlags::WRITE) && !flags.contains(PteFlags::PROTNONE))
    }

    /// The CPU-addressable frame the entry refers to (present, migration of a
    /// CPU-addressable page, device-exclusive).
    pub fn pfn(&self) -> Option<Pfn> {
        match *self {
            Pte::Present { pfn, .. }
            | Pte::Migration {
                pfn: MigrationPfn::Cpu(pfn),
                ..
            }
            | Pte::DeviceExclusive { pfn, .. } => Some(pfn),
            Pte::None | Pte::DevicePrivate { .. } | Pte::Migration { .. } | Pte::Swap { .. } => {
                None
            }
        }
    }

    /// The number of the frame the entry refers to, whatever its kind: CPU pfns and device
    /// pfns share one numbering (see [`crate::phys`]).
    pub fn frame_nr(&self) -> Option<u64> {
        match *self {
            Pte::Present { pfn, .. } | Pte::DeviceExclusive { pfn, .. } => Some(pfn.as_u64()),
            Pte::Migration { pfn, .. } => Some(pfn.nr()),
            Pte::DevicePrivate { pfn, .. } => Some(pfn.as_u64()),
            Pte::None | Pte::Swap { .. } => None,
        }
    }

    /// The entry with its userfaultfd write-protect bit set or cleared
    /// (`pte_mkuffd_wp`/`pte_clear_uffd_wp` and their `pte_swp_` forms). Setting it
    /// write-protects a present or device-private entry (it loses `WRITE`); a migration
    /// entry keeps its kind (whoever write-protects one downgrades it first, knowing its
    /// folio). None is returned as is.
    #[doc(alias = "pte_mkuffd_wp")]
    pub fn with_uffd_wp(self, wp: bool) -> Pte {
        self.map_flags(|flags| {
            if wp {
                (flags | PteFlags::UFFD_WP) - PteFlags::WRITE
            } else {
                flags - PteFlags::UFFD_WP
            }
        })
    }

    /// The entry with its flags replaced by `f(flags)`, kept to what its kind can carry
    /// (a migration or device-exclusive entry the swap flags, a device-private entry
    /// `WRITE` and the sticky bits, a swap entry the sticky bits). None stays none.
    pub fn map_flags(self, f: impl FnOnce(PteFlags) -> PteFlags) -> Pte {
        match self {
            Pte::None => Pte::None,
            Pte::Present { pfn, flags } => Pte::Present {
                pfn,
                flags: f(flags),
            },
            Pte::Migration { pfn, kind, flags } => Pte::Migration {
                pfn,
                kind,
                flags: f(flags) & SWP_FLAGS,
            },
            Pte::DevicePrivate { pfn, flags } => Pte::DevicePrivate {
                pfn,
                flags: f(flags) & (PteFlags::WRITE | PteFlags::STICKY),
            },
            Pte::DeviceExclusive { pfn, flags } => Pte::DeviceExclusive {
                pfn,
                flags: f(flags) & SWP_FLAGS,
            },
            Pte::Swap {
                slot,
                exclusive,
                flags,
            } => Pte::Swap {
                slot,
                exclusive,
                flags: f(flags) & PteFlags::STICKY,
            },
        }
    }

    /// Whether the entry carries the userfaultfd write-protect bit (`pte_uffd_wp`,
    /// `pte_swp_uffd_wp`).
    #[doc(alias = "pte_uffd_wp")]
    pub fn is_uffd_wp(&self) -> bool {
        self.flags().contains(PteFlags::UFFD_WP)
    }

    /// The flags of the entry.
    pub fn flags(&self) -> PteFlags {
        match *self {
            Pte::None => PteFlags::empty(),
            Pte::Present { flags, .. }
            | Pte::Migration { flags, .. }
            | Pte::DevicePrivate { flags, .. }
            | Pte::DeviceExclusive { flags, .. }
            | Pte::Swap { flags, .. } => flags,
        }
    }
}

/// The level an encoded entry is stored at: a PTE, or a PMD or PUD leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Huge {
    /// A PTE.
    Pte,
    /// A 2 MiB PMD leaf.
    Pmd,
    /// A 1 GiB PUD leaf.
    Pud,
}

impl Huge {
    /// The bytes an entry of this level maps.
    pub fn size(self) -> u64 {
        match self {
            Huge::Pte => crate::addr::PAGE_SIZE,
            Huge::Pmd => crate::addr::PMD_SIZE,
            Huge::Pud => crate::addr::PUD_SIZE,
        }
    }

    /// The order (log2 of the base pages) an entry of this level maps.
    pub fn order(self) -> u32 {
        match self {
            Huge::Pte => 0,
            Huge::Pmd => crate::addr::PMD_ORDER,
            Huge::Pud => crate::addr::PUD_ORDER,
        }
    }
}

/// Whether an encoded PMD word is a leaf (as opposed to none or a table pointer).
pub(crate) fn word_is_huge(word: u64) -> bool {
    word & PSE != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_flag_sets() -> impl Iterator<Item = PteFlags> {
        (0..64u32).map(|bits| {
            let mut f = PteFlags::empty();
            for (i, flag) in [
                PteFlags::WRITE,
                PteFlags::YOUNG,
                PteFlags::DIRTY,
                PteFlags::PROTNONE,
                PteFlags::SOFT_DIRTY,
                PteFlags::UFFD_WP,
            ]
            .into_iter()
            .enumerate()
            {
                if bits & (1 << i) != 0 {
                    f |= flag;
                }
            }
            f
        })
    }

    #[test]
    fn every_entry_kind_round_trips() {
        let pfn = Pfn::new(0xab_cdef);
        let mut entries = vec![Pte::None];
        for flags in all_flag_sets() {
            entries.push(Pte::Present { pfn, flags });
            let swp = flags & SWP_FLAGS;
            for kind in [
                MigrationKind::Read,
                MigrationKind::ReadExclusive,
                MigrationKind::Write,
            ] {
                entries.push(Pte::Migration {
                    pfn: pfn.into(),
                    kind,
                    flags: swp,
                });
                entries.push(Pte::Migration {
                    pfn: MigrationPfn::Device(DevicePfn::new(pfn.as_u64())),
                    kind,
                    flags: swp,
                });
            }
            entries.push(Pte::DeviceExclusive { pfn, flags: swp });
            for exclusive in [false, true] {
                entries.push(Pte::Swap {
                    slot: SwapSlot::new(pfn.as_u64()),
                    exclusive,
                    flags: flags & PteFlags::STICKY,
                });
            }
            entries.push(Pte::DevicePrivate {
                pfn: DevicePfn::new(Pfn::LIMIT - 1),
                flags: flags & (PteFlags::WRITE | PteFlags::STICKY),
            });
        }
        for e in entries {
            for huge in [Huge::Pte, Huge::Pmd] {
                let w = e.encode(huge);
                assert_eq!(Pte::decode(w), e, "{e:?} as {w:#x}");
                assert_eq!(word_is_huge(w), huge == Huge::Pmd && !e.is_none());
            }
        }
    }

    #[test]
    fn accessors() {
        let pfn = Pfn::new(7);
        let rw = Pte::Present {
            pfn,
            flags: PteFlags::WRITE,
        };
        assert!(rw.is_accessible() && rw.is_writable());
        let none = Pte::Present {
            pfn,
            flags: PteFlags::WRITE | PteFlags::PROTNONE,
        };
        assert!(!none.is_accessible() && !none.is_writable());
        assert_eq!(none.pfn(), Some(pfn));
        let dp = Pte::DevicePrivate {
            pfn: DevicePfn::new(1),
            flags: PteFlags::WRITE,
        };
        assert_eq!(dp.pfn(), None);
        assert!(!dp.is_accessible());
        assert!(Pte::None.is_none());
        assert_eq!(Pte::decode(0), Pte::None);
    }

    #[test]
    #[should_panic(expected = "corrupt page-table entry")]
    fn unknown_type_panics() {
        Pte::decode(12 << TYPE_SHIFT);
    }
}
