//! Page tables: entry encodings ([`Pte`]), the 4-level radix tree, and the [`Cursor`] that
//! every walk goes through.
//!
//! The tree stores encoded `u64` words; [`Pte`] decodes them. Tables are Rust heap objects,
//! not frames of [`PhysMem`](crate::phys::PhysMem) (the model does not charge page-table
//! memory to RAM); [`WalkStats`] counts them.

mod cursor;
mod entry;
mod pmd;
mod pud;
mod radix;

use std::sync::atomic::{AtomicU64, Ordering};

pub use cursor::{Cursor, LeafSlot, PteSlot, Slot, WalkMode};
pub use entry::{Huge, MigrationKind, MigrationPfn, Pte, PteFlags};
pub use pmd::{PmdEntry, PmdGuard};
pub use pud::{PudEntry, PudGuard};

#[cfg(test)]
use crate::addr::VirtAddr;
use crate::addr::{VaRange, ENTRIES_PER_TABLE, PGDIR_SHIFT, PMD_SHIFT, PUD_SHIFT};
use radix::{Pgd, PmdTable, PteTable, PudTable, PMD_TABLE, PUD_TABLE};

#[derive(Debug, Default)]
pub(crate) struct WalkCounters {
    walks: AtomicU64,
    entries: AtomicU64,
    pte_tables: AtomicU64,
    pmd_tables: AtomicU64,
    pud_tables: AtomicU64,
}

/// What walking the table has cost, and how big it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct WalkStats {
    /// Cursors created (each is one page-table walk).
    pub walks: u64,
    /// Slots visited by all walks.
    pub entries_visited: u64,
    /// PTE tables currently allocated.
    pub nr_pte_tables: u64,
    /// PMD tables currently allocated.
    pub nr_pmd_tables: u64,
    /// PUD tables currently allocated.
    pub nr_pud_tables: u64,
}

/// A 4-level page table with x86-64 geometry.
pub struct PageTable {
    pgd: Box<Pgd>,
    counters: WalkCounters,
}

impl Default for PageTable {
    fn default() -> Self {
        Self::new()
    }
}

impl PageTable {
    /// An empty page table.
    pub fn new() -> Self {
        PageTable {
            pgd: Pgd::new(),
            counters: WalkCounters::default(),
        }
    }

    /// Starts a walk over `range`.
    pub fn cursor(&self, range: VaRange, mode: WalkMode) -> Cursor<'_> {
        Cursor::new(self, range, mode)
    }

    /// Walk counters and table counts.
    pub fn stats(&self) -> WalkStats {
        let c = &self.counters;
        WalkStats {
            walks: c.walks.load(Ordering::Relaxed),
            entries_visited: c.entries.load(Ordering::Relaxed),
            nr_pte_tables: c.pte_tables.load(Ordering::Relaxed),
            nr_pmd_tables: c.pmd_tables.load(Ordering::Relaxed),
            nr_pud_tables: c.pud_tables.load(Ordering::Relaxed),
        }
    }

    fn new_pud_table(&self) -> Box<PudTable> {
        self.counters.pud_tables.fetch_add(1, Ordering::Relaxed);
        PudTable::new()
    }

    fn new_pmd_table(&self) -> Box<PmdTable> {
        self.counters.pmd_tables.fetch_add(1, Ordering::Relaxed);
        PmdTable::new()
    }

    fn new_pte_table(&self) -> Box<PteTable> {
        self.counters.pte_tables.fetch_add(1, Ordering::Relaxed);
        PteTable::new()
    }

    /// Frees every table whose whole span lies inside `range` and that maps nothing
    /// (the kernel's `free_pgtables`, given the gap between the neighbouring VMAs).
    /// Exclusive access (`&mut`, i.e. the mmap lock held for writing) guarantees that no
    /// walker still looks at them. Returns the number of tables freed.
    #[doc(alias = "free_pgtables")]
    pub fn free_tables(&mut self, range: VaRange) -> u64 {
        let mut freed = 0;
        let within = |base: u64, shift: u32| {
            base >= range.start().as_u64() && base + (1u64 << shift) <= range.end().as_u64()
        };
        let c = &self.counters;
        for (g, pud_slot) in self.pgd.tables.iter_mut().enumerate() {
            let g_base = (g as u64) << PGDIR_SHIFT;
            if !overlaps(g_base, PGDIR_SHIFT, &range) {
                continue;
            }
            let Some(pud) = pud_slot.get_mut() else {
                continue;
            };
            for (u, pmd_slot) in pud.tables.iter_mut().enumerate() {
                let u_base = g_base + ((u as u64) << PUD_SHIFT);
                let pud_word = *pud.entries[u].get_mut();
                // A PUD leaf keeps whatever table it replaced, as a PMD leaf does.
                if !overlaps(u_base, PUD_SHIFT, &range) || (pud_word != 0 && pud_word != PUD_TABLE)
                {
                    continue;
                }
                let Some(pmdt) = pmd_slot.get_mut() else {
                    continue;
                };
                for i in 0..ENTRIES_PER_TABLE {
                    let m_base = u_base + ((i as u64) << PMD_SHIFT);
                    let word = *pmdt.entries[i].get_mut();
                    if !within(m_base, PMD_SHIFT) || (word != 0 && word != PMD_TABLE) {
                        continue;
                    }
                    // A table behind a none word was left by a PMD leaf that replaced it.
                    let unused = pmdt.tables[i]
                        .get()
                        .is_some_and(|t| word == 0 || t.is_empty());
                    if unused {
                        *pmdt.entries[i].get_mut() = 0;
                        pmdt.tables[i].take();
                        c.pte_tables.fetch_sub(1, Ordering::Relaxed);
                        freed += 1;
                    }
                }
                let all_none = pmdt.entries.iter_mut().all(|w| *w.get_mut() == 0);
                if within(u_base, PUD_SHIFT) && all_none {
                    let stale = pmdt.tables.iter().filter(|t| t.get().is_some()).count();
                    c.pte_tables.fetch_sub(stale as u64, Ordering::Relaxed);
                    pmd_slot.take();
                    *pud.entries[u].get_mut() = 0;
                    c.pmd_tables.fetch_sub(1, Ordering::Relaxed);
                    freed += 1;
                }
            }
            let pud_empty = pud.tables.iter().all(|t| t.get().is_none())
                && pud.entries.iter_mut().all(|w| *w.get_mut() == 0);
            if within(g_base, PGDIR_SHIFT) && pud_empty {
                pud_slot.take();
                c.pud_tables.fetch_sub(1, Ordering::Relaxed);
                freed += 1;
            }
        }
        freed
    }

    /// Every non-none entry, found by a deliberately simple recursive scan that does not use
    /// the cursor: the oracle that tests check cursors against.
    #[cfg(test)]
    pub(crate) fn reference_entries(&self) -> Vec<(VirtAddr, Huge, Pte)> {
        let mut out = Vec::new();
        for (g, pud) in self.pgd.tables.iter().enumerate() {
            let Some(pud) = pud.get() else { continue };
            for (u, pmdt) in pud.tables.iter().enumerate() {
                let w = pud.entries[u].load(Ordering::Acquire);
                if w != 0 && w != PUD_TABLE {
                    let base = ((g as u64) << PGDIR_SHIFT) | ((u as u64) << PUD_SHIFT);
                    out.push((VirtAddr::new(base), Huge::Pud, Pte::decode(w)));
                    continue;
                }
                let Some(pmdt) = pmdt.get() else { continue };
                for i in 0..ENTRIES_PER_TABLE {
                    let base = ((g as u64) << PGDIR_SHIFT)
                        | ((u as u64) << PUD_SHIFT)
                        | ((i as u64) << PMD_SHIFT);
                    let w = pmdt.entries[i].load(Ordering::Acquire);
                    if w == 0 {
                        continue;
                    }
                    if w != PMD_TABLE {
                        out.push((VirtAddr::new(base), Huge::Pmd, Pte::decode(w)));
                        continue;
                    }
                    let t = pmdt.tables[i].get().expect("table installed");
                    for (p, e) in t.entries.iter().enumerate() {
                        let w = e.load(Ordering::Acquire);
                        if w != 0 {
                            let va = VirtAddr::new(base | ((p as u64) << 12));
                            out.push((va, Huge::Pte, Pte::decode(w)));
                        }
                    }
                }
            }
        }
        out
    }
}

fn overlaps(base: u64, shift: u32, range: &VaRange) -> bool {
    base < range.end().as_u64() && base + (1u64 << shift) > range.start().as_u64()
}

impl std::fmt::Debug for PageTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageTable")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
