//! One PUD slot under its lock: the primitive 1 GiB hugetlb code uses to install and clear
//! PUD leaves (the kernel's `pud_lock` with `set_huge_pte_at` at PUD level, as x86-64 maps
//! a 1 GiB hugetlb page).
//!
//! Only hugetlb maps PUD leaves, and a hugetlb VMA never holds small pages, so a leaf
//! goes where there is nothing or where a PMD table maps nothing (one a populating walk
//! left, or one left behind by memory unmapped earlier). Such a table stays in the slot,
//! as a PMD slot keeps its deposited PTE table, until `free_pgtables` takes it.

use std::sync::atomic::Ordering;

use crate::sync::MutexGuard;

use super::entry::{word_is_huge, Huge, Pte};
use super::radix::{PudTable, PMD_TABLE};
use super::{PageTable, WalkMode};
use crate::addr::{VaRange, VirtAddr, PUD_SIZE};

/// What a PUD slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PudEntry {
    /// Nothing: no table, no leaf.
    None,
    /// A PMD table.
    Table,
    /// A leaf (a 1 GiB mapping or a non-present PUD entry).
    Leaf(Pte),
}

/// A PUD slot with its PUD lock held.
pub struct PudGuard<'a> {
    table: &'a PudTable,
    index: usize,
    base: VirtAddr,
    _lock: MutexGuard<'a, ()>,
}

impl PageTable {
    /// Locks the PUD slot covering `va`. [`WalkMode::Populate`] allocates a missing PUD
    /// table (never the PMD table below the slot); [`WalkMode::Lookup`] returns `None`
    /// where it is missing. Counts one walk.
    #[doc(alias = "pud_lock")]
    #[doc(alias = "huge_pte_alloc")]
    pub fn lock_pud(&self, va: VirtAddr, mode: WalkMode) -> Option<PudGuard<'_>> {
        self.counters.walks.fetch_add(1, Ordering::Relaxed);
        self.counters.entries.fetch_add(1, Ordering::Relaxed);
        let pgd_slot = &self.pgd.tables[va.table_index(4)];
        let table = match pgd_slot.get() {
            Some(t) => t,
            None if mode == WalkMode::Populate => pgd_slot.get_or_init(|| self.new_pud_table()),
            None => return None,
        };
        Some(PudGuard {
            table,
            index: va.table_index(3),
            base: va.align_down(PUD_SIZE),
            _lock: table.lock.lock(),
        })
    }
}

impl PudGuard<'_> {
    /// The 1 GiB range of the slot.
    pub fn range(&self) -> VaRange {
        VaRange::from_len(self.base, PUD_SIZE).expect("PUD range is valid")
    }

    /// What the slot holds.
    pub fn get(&self) -> PudEntry {
        let w = self.table.entries[self.index].load(Ordering::Acquire);
        if w == 0 {
            PudEntry::None
        } else if word_is_huge(w) {
            PudEntry::Leaf(Pte::decode(w))
        } else {
            PudEntry::Table
        }
    }

    /// Stores a leaf ([`Pte::None`] clears the slot). Over a PMD table, the table must map
    /// nothing: its PMD words that point to empty PTE tables are cleared first, each under
    /// its PTE lock and all under the PMD lock, so that no walker is inside it when the
    /// leaf appears (walkers re-check the words above a table after locking it). Returns
    /// false, and changes nothing that maps, if the table maps something.
    #[doc(alias = "set_huge_pte_at")]
    #[must_use]
    pub fn set_leaf(&self, pte: Pte) -> bool {
        let slot = &self.table.entries[self.index];
        let word = if pte.is_none() {
            0
        } else {
            pte.encode(Huge::Pud)
        };
        if self.get() != PudEntry::Table {
            slot.store(word, Ordering::Release);
            return true;
        }
        let pmdt = self.table.tables[self.index]
            .get()
            .expect("table installed");
        let _pmd_lock = pmdt.lock.lock();
        for (w, t) in pmdt.entries.iter().zip(&pmdt.tables) {
            match w.load(Ordering::Acquire) {
                0 => {}
                PMD_TABLE => {
                    let t = t.get().expect("table installed");
                    let _ptl = t.lock.lock();
                    if !t.is_empty() {
                        return false;
                    }
                    // The empty table stays; its none word sends walkers back up.
                    w.store(0, Ordering::Release);
                }
                _ => return false,
            }
        }
        slot.store(word, Ordering::Release);
        true
    }
}

impl std::fmt::Debug for PudGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PudGuard")
            .field("base", &self.base)
            .field("entry", &self.get())
            .finish()
    }
}
