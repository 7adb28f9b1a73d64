//! One PMD slot under its lock: the primitive THP code uses to install, split and collapse
//! PMD leaves (the kernel's `pmd_lock` with `set_pmd_at`, `__split_huge_pmd_locked` and
//! `pmdp_collapse_flush`).
//!
//! A PMD slot that holds a leaf keeps the PTE table it had before (or gets one on split):
//! the kernel *deposits* a page table with every THP mapping so that a split never has to
//! allocate. Here the table stays in the slot's [`OnceLock`](std::sync::OnceLock) while the
//! word says "leaf", and a split fills it and publishes it by storing the table word. No
//! walker reads a deposited table: walkers follow the word, and re-check it after taking
//! the PMD lock.

use std::sync::atomic::Ordering;

use crate::sync::MutexGuard;

use super::entry::{word_is_huge, Huge, Pte};
use super::radix::{PmdTable, PMD_TABLE, PUD_TABLE};
use super::{PageTable, WalkMode};
use crate::addr::{VaRange, VirtAddr, PMD_SIZE};

/// What a PMD slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PmdEntry {
    /// Nothing: no table, no leaf.
    None,
    /// A PTE table.
    Table,
    /// A leaf (a 2 MiB mapping or a non-present PMD entry).
    Leaf(Pte),
}

/// A PMD slot with its PMD lock held.
pub struct PmdGuard<'a> {
    pt: &'a PageTable,
    table: &'a PmdTable,
    index: usize,
    base: VirtAddr,
    _lock: MutexGuard<'a, ()>,
}

impl PageTable {
    /// Locks the PMD slot covering `va`. [`WalkMode::Populate`] allocates missing upper
    /// tables (never the PTE table); [`WalkMode::Lookup`] returns `None` where they are
    /// missing. Both return `None` where a PUD leaf covers `va`. Counts one walk.
    #[doc(alias = "pmd_lock")]
    pub fn lock_pmd(&self, va: VirtAddr, mode: WalkMode) -> Option<PmdGuard<'_>> {
        self.counters.walks.fetch_add(1, Ordering::Relaxed);
        self.counters.entries.fetch_add(1, Ordering::Relaxed);
        let populate = mode == WalkMode::Populate;
        let pgd_slot = &self.pgd.tables[va.table_index(4)];
        let pud = match pgd_slot.get() {
            Some(t) => t,
            None if populate => pgd_slot.get_or_init(|| self.new_pud_table()),
            None => return None,
        };
        let u = va.table_index(3);
        loop {
            let word = pud.entries[u].load(Ordering::Acquire);
            if word == 0 {
                if !populate {
                    return None;
                }
                let _pud_lock = pud.lock.lock();
                if pud.entries[u].load(Ordering::Acquire) == 0 {
                    pud.tables[u].get_or_init(|| self.new_pmd_table());
                    pud.entries[u].store(PUD_TABLE, Ordering::Release);
                }
                continue;
            }
            if word != PUD_TABLE {
                return None;
            }
            let table = pud.tables[u].get().expect("table installed");
            let lock = table.lock.lock();
            // Re-checked under the PMD lock, which a PUD leaf needs to replace the table.
            if pud.entries[u].load(Ordering::Acquire) != PUD_TABLE {
                continue;
            }
            return Some(PmdGuard {
                pt: self,
                table,
                index: va.table_index(2),
                base: va.align_down(PMD_SIZE),
                _lock: lock,
            });
        }
    }
}

impl PmdGuard<'_> {
    /// The 2 MiB range of the slot.
    pub fn range(&self) -> VaRange {
        VaRange::from_len(self.base, PMD_SIZE).expect("PMD range is valid")
    }

    /// What the slot holds.
    pub fn get(&self) -> PmdEntry {
        let w = self.table.entries[self.index].load(Ordering::Acquire);
        if w == 0 {
            PmdEntry::None
        } else if word_is_huge(w) {
            PmdEntry::Leaf(Pte::decode(w))
        } else {
            PmdEntry::Table
        }
    }

    /// Stores a leaf over none or a leaf ([`Pte::None`] clears the slot).
    ///
    /// # Panics
    ///
    /// Panics if the slot holds a PTE table: use [`collapse`](Self::collapse).
    #[doc(alias = "set_pmd_at")]
    pub fn set_leaf(&self, pte: Pte) {
        assert!(
            self.get() != PmdEntry::Table,
            "set_leaf over a PTE table at {}",
            self.base
        );
        let word = if pte.is_none() {
            0
        } else {
            pte.encode(Huge::Pmd)
        };
        self.table.entries[self.index].store(word, Ordering::Release);
    }

    /// Replaces a leaf by a PTE table whose entry `i` is `pte(i)`, reusing the deposited
    /// table (`__split_huge_pmd_locked`). Returns the leaf it replaced, or `None` (and
    /// changes nothing) if the slot holds no leaf.
    pub fn split(&self, mut pte: impl FnMut(usize, Pte) -> Pte) -> Option<Pte> {
        let PmdEntry::Leaf(leaf) = self.get() else {
            return None;
        };
        let t = self.table.tables[self.index].get_or_init(|| self.pt.new_pte_table());
        {
            let _ptl = t.lock.lock();
            for (i, e) in t.entries.iter().enumerate() {
                e.store(pte(i, leaf).encode(Huge::Pte), Ordering::Release);
            }
        }
        self.table.entries[self.index].store(PMD_TABLE, Ordering::Release);
        Some(leaf)
    }

    /// The entries of the PTE table, if the slot holds one, read under its lock.
    pub fn ptes(&self) -> Option<Vec<Pte>> {
        if self.get() != PmdEntry::Table {
            return None;
        }
        let t = self.table.tables[self.index]
            .get()
            .expect("table installed");
        let _ptl = t.lock.lock();
        Some(
            t.entries
                .iter()
                .map(|e| Pte::decode(e.load(Ordering::Acquire)))
                .collect(),
        )
    }

    /// Replaces a PTE table by a leaf, clearing the table, which stays deposited
    /// (`pmdp_collapse_flush`, then `set_pmd_at`). The caller has taken over what the PTEs
    /// held (references, map counts), and holds the mmap lock for writing.
    ///
    /// # Panics
    ///
    /// Panics if the slot does not hold a PTE table.
    pub fn collapse(&self, leaf: Pte) {
        assert_eq!(self.get(), PmdEntry::Table, "collapse without a PTE table");
        let t = self.table.tables[self.index]
            .get()
            .expect("table installed");
        {
            let _ptl = t.lock.lock();
            for e in &t.entries {
                e.store(0, Ordering::Release);
            }
        }
        self.table.entries[self.index].store(leaf.encode(Huge::Pmd), Ordering::Release);
    }
}

impl std::fmt::Debug for PmdGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PmdGuard")
            .field("base", &self.base)
            .field("entry", &self.get())
            .finish()
    }
}
