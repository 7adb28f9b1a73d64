//! The 4-level radix tree with x86-64 geometry: PGD → PUD → PMD → PTE tables of 512
//! entries, 9 bits of address per level.
//!
//! Upper levels are `OnceLock<Box<…>>` slots: installed at most once while the mmap lock is
//! held for reading (so concurrent faults race only to install, and the loser's table is
//! dropped), read without locks, and removed only through `&mut PageTable`, i.e. with the
//! mmap lock held for writing (`free_pgtables`).
//!
//! A PMD table keeps, per slot, an entry word *and* a PTE-table slot. The word is the truth:
//! `0` none, [`PMD_TABLE`] "descend into the PTE table", otherwise a PMD leaf (a 2 MiB
//! mapping or a non-present PMD entry). The invariant `word == PMD_TABLE ⇒ table installed`
//! holds because the table is installed before the word is stored (release/acquire).
//!
//! A PUD table works the same way one level up: per slot an entry word (`0` none,
//! [`PUD_TABLE`] "descend into the PMD table", otherwise a PUD leaf: a 1 GiB hugetlb
//! mapping or a non-present PUD entry) and a PMD-table slot, with `word == PUD_TABLE ⇒
//! table installed`. A PUD leaf replaces a table only when the table maps nothing (see
//! [`PudGuard::set_leaf`](super::PudGuard::set_leaf)).
//!
//! Locks: every PTE table has its own lock (the kernel's split PTE lock) guarding its 512
//! entries; every PMD table has one lock (the split PMD lock, one per 1 GiB) guarding its 512
//! words; every PUD table has one lock guarding its 512 words (the kernel's `pud_lock`,
//! which is the mm's `page_table_lock`; one per 512 GiB here). Lock order: PUD lock → PMD
//! lock → PTE lock.

use crate::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::sync::Mutex;

use crate::addr::ENTRIES_PER_TABLE;

/// The PMD word meaning "this slot points to a PTE table".
pub(crate) const PMD_TABLE: u64 = 1 | (1 << 9);

/// A table of 512 PTEs and their lock.
pub(crate) struct PteTable {
    pub(crate) lock: Mutex<()>,
    pub(crate) entries: [AtomicU64; ENTRIES_PER_TABLE],
}

/// A table of 512 PMD words, their PTE tables, and the PMD lock.
pub(crate) struct PmdTable {
    pub(crate) lock: Mutex<()>,
    pub(crate) entries: [AtomicU64; ENTRIES_PER_TABLE],
    pub(crate) tables: [OnceLock<Box<PteTable>>; ENTRIES_PER_TABLE],
}

/// The PUD word meaning "this slot points to a PMD table".
pub(crate) const PUD_TABLE: u64 = PMD_TABLE;

/// A table of 512 PUD words, their PMD tables, and the PUD lock.
pub(crate) struct PudTable {
    pub(crate) lock: Mutex<()>,
    pub(crate) entries: [AtomicU64; ENTRIES_PER_TABLE],
    pub(crate) tables: [OnceLock<Box<PmdTable>>; ENTRIES_PER_TABLE],
}

/// The top level.
pub(crate) struct Pgd {
    pub(crate) tables: [OnceLock<Box<PudTable>>; ENTRIES_PER_TABLE],
}

fn words() -> [AtomicU64; ENTRIES_PER_TABLE] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

fn slots<T>() -> [OnceLock<T>; ENTRIES_PER_TABLE] {
    std::array::from_fn(|_| OnceLock::new())
}

impl PteTable {
    pub(crate) fn new() -> Box<Self> {
        Box::new(PteTable {
            lock: Mutex::new(()),
            entries: words(),
        })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.iter().all(|e| e.load(Ordering::Acquire) == 0)
    }
}

impl PmdTable {
    pub(crate) fn new() -> Box<Self> {
        Box::new(PmdTable {
            lock: Mutex::new(()),
            entries: words(),
            tables: slots(),
        })
    }
}

impl PudTable {
    pub(crate) fn new() -> Box<Self> {
        Box::new(PudTable {
            lock: Mutex::new(()),
            entries: words(),
            tables: slots(),
        })
    }
}

impl Pgd {
    pub(crate) fn new() -> Box<Self> {
        Box::new(Pgd { tables: slots() })
    }
}
