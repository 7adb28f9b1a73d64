//! The page-table cursor: the one walker every operation uses.
//!
//! A [`Cursor`] visits the slots of a virtual range in address order and yields each as a
//! [`Slot`]: a [`PteSlot`] (a PTE, under its PTE-table lock), a [`LeafSlot`] (a PMD leaf
//! under the PMD lock, or a PUD leaf, a 1 GiB hugetlb mapping, under the PUD lock), or a [`Slot::Hole`] (no table there; lookup walks only).
//!
//! # Locking protocol
//!
//! * The caller holds the mmap lock (the cursor borrows the [`PageTable`], which lives
//!   inside it), so no table is freed while the cursor runs.
//! * The cursor is the lock guard of the slot it last yielded. Consecutive PTEs of one table
//!   are yielded under one lock acquisition; moving to another table (or a PMD leaf)
//!   releases the old lock first, so a cursor holds at most one page-table lock.
//! * A yielded slot borrows the cursor, so it cannot outlive the lock. To do blocking work
//!   (allocate, call notifiers, wait on a folio), call [`Cursor::unlock`]; then
//!   [`Cursor::current`] re-locks the same slot (one walk, not two), and the caller must
//!   re-check the entry, which may have changed meanwhile (the kernel's `pte_same`).
//! * After taking a table's lock the cursor re-checks that the PMD word (and the PUD word
//!   above it) still points to that table, so a concurrent PMD or PUD change is never
//!   missed.
//!
//! Every cursor counts one walk; every yielded slot counts one entry visited.

use crate::sync::atomic::{AtomicU64, Ordering};

use crate::sync::MutexGuard;

use super::entry::{word_is_huge, Huge, Pte};
use super::radix::{PmdTable, PteTable, PMD_TABLE, PUD_TABLE};
use super::PageTable;
use crate::addr::{
    VaRange, VirtAddr, ENTRIES_PER_TABLE, PAGE_SHIFT, PAGE_SIZE, PGDIR_SHIFT, PMD_SIZE, PUD_SHIFT,
    PUD_SIZE,
};

/// Whether a walk allocates missing tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkMode {
    /// Report missing tables as [`Slot::Hole`].
    Lookup,
    /// Allocate missing tables down to the PTE level (PMD and PUD leaves are still yielded
    /// as such).
    Populate,
}

/// One slot visited by a [`Cursor`].
#[derive(Debug)]
pub enum Slot<'c> {
    /// No page table covers this part of the range (only in [`WalkMode::Lookup`]).
    Hole(VaRange),
    /// A PUD leaf (a 1 GiB hugetlb mapping), under the PUD lock.
    Pud(LeafSlot<'c>),
    /// A PMD leaf, under the PMD lock.
    Pmd(LeafSlot<'c>),
    /// A PTE, under its table's lock.
    Pte(PteSlot<'c>),
}

/// A PTE under its table lock; in a batched walk ([`Cursor::set_batch`]), the run of
/// consecutive PTEs of one table that starts with it.
#[derive(Debug)]
pub struct PteSlot<'c> {
    va: VirtAddr,
    entries: &'c [AtomicU64],
}

impl PteSlot<'_> {
    /// The virtual address the (first) PTE maps.
    pub fn va(&self) -> VirtAddr {
        self.va
    }

    /// The current (first) entry.
    pub fn get(&self) -> Pte {
        self.get_at(0)
    }

    /// Stores the (first) entry.
    #[doc(alias = "set_pte_at")]
    pub fn set(&self, pte: Pte) {
        self.set_at(0, pte);
    }

    /// Stores the (first) entry and returns the previous one.
    #[doc(alias = "ptep_get_and_clear")]
    pub fn replace(&self, pte: Pte) -> Pte {
        Pte::decode(self.entries[0].swap(pte.encode(Huge::Pte), Ordering::AcqRel))
    }

    /// Number of PTEs in the run: 1 unless the walk is batched.
    #[allow(clippy::len_without_is_empty)] // a run is never empty
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The `i`-th entry of the run, mapping `va() + i` pages.
    ///
    /// # Panics
    ///
    /// Panics if `i` is not below [`len`](Self::len).
    pub fn get_at(&self, i: usize) -> Pte {
        Pte::decode(self.entries[i].load(Ordering::Acquire))
    }

    /// Stores the `i`-th entry of the run.
    ///
    /// # Panics
    ///
    /// Panics if `i` is not below [`len`](Self::len).
    pub fn set_at(&self, i: usize, pte: Pte) {
        self.entries[i].store(pte.encode(Huge::Pte), Ordering::Release);
    }

    /// The virtual address the `i`-th entry of the run maps.
    pub fn va_at(&self, i: usize) -> VirtAddr {
        self.va
            .checked_add(i as u64 * PAGE_SIZE)
            .expect("inside the run")
    }
}

/// A huge leaf under its lock: a PMD leaf (2 MiB, under the PMD lock) or a PUD leaf
/// (1 GiB, under the PUD lock).
#[derive(Debug)]
pub struct LeafSlot<'c> {
    base: VirtAddr,
    entry: &'c AtomicU64,
    level: Huge,
}

impl LeafSlot<'_> {
    /// The level: [`Huge::Pmd`] or [`Huge::Pud`].
    pub fn level(&self) -> Huge {
        self.level
    }

    /// The range the leaf maps (it may extend beyond the walked range).
    pub fn range(&self) -> VaRange {
        VaRange::from_len(self.base, self.level.size()).expect("leaf range is valid")
    }

    /// The current entry.
    pub fn get(&self) -> Pte {
        Pte::decode(self.entry.load(Ordering::Acquire))
    }

    /// Stores a leaf entry; [`Pte::None`] clears the slot.
    #[doc(alias = "set_pmd_at")]
    #[doc(alias = "set_pud_at")]
    pub fn set(&self, pte: Pte) {
        self.entry.store(self.word(pte), Ordering::Release);
    }

    /// Stores a leaf entry and returns the previous one.
    #[doc(alias = "pmdp_huge_get_and_clear")]
    #[doc(alias = "pudp_huge_get_and_clear")]
    pub fn replace(&self, pte: Pte) -> Pte {
        Pte::decode(self.entry.swap(self.word(pte), Ordering::AcqRel))
    }

    fn word(&self, pte: Pte) -> u64 {
        if pte.is_none() {
            0
        } else {
            pte.encode(self.level)
        }
    }
}

/// The page-table lock a cursor holds; the guards are held only for their `Drop`.
enum Held<'a> {
    None,
    Pte {
        table: &'a PteTable,
        /// The 2 MiB-aligned address the table maps.
        base: VirtAddr,
        _guard: MutexGuard<'a, ()>,
    },
    /// The PMD lock, or the PUD lock for a PUD leaf.
    Upper {
        _guard: MutexGuard<'a, ()>,
    },
}

/// A walk over a virtual range.
///
/// The cursor is the lock guard of the slot it last yielded: it holds at most one
/// page-table lock, released when it moves to another table, on [`unlock`](Self::unlock)
/// and on drop. [`current`](Self::current) re-takes the last slot within the same walk;
/// the caller re-checks the entry. Each cursor counts one walk, each slot one entry.
pub struct Cursor<'a> {
    pt: &'a PageTable,
    next: VirtAddr,
    end: VirtAddr,
    mode: WalkMode,
    last: Option<VirtAddr>,
    held: Held<'a>,
    entries: u64,
    batch: bool,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(pt: &'a PageTable, range: VaRange, mode: WalkMode) -> Self {
        pt.counters.walks.fetch_add(1, Ordering::Relaxed);
        Cursor {
            pt,
            next: range.start(),
            end: range.end(),
            mode,
            last: None,
            held: Held::None,
            entries: 0,
            batch: false,
        }
    }

    /// Makes every PTE slot yielded a run: the PTE at the walk's position and the ones
    /// after it in the same table, up to the end of the table or of the range, all under
    /// the one lock (counted as that many entries). For read-mostly walks that handle
    /// many PTEs per lock, such as `hmm_range_fault`.
    pub fn set_batch(&mut self, batch: bool) {
        self.batch = batch;
    }

    /// The PTE slot for `va` in `table` (whose lock is held): one PTE or, batched, the
    /// run to the end of the table or of the range.
    fn pte_slot(&mut self, table: &'a PteTable, va: VirtAddr) -> Slot<'_> {
        let page = va.page_down();
        let i = va.table_index(1);
        let n = if self.batch {
            let in_range = ((self.end.as_u64() - page.as_u64()) >> PAGE_SHIFT) as usize;
            (ENTRIES_PER_TABLE - i).min(in_range)
        } else {
            1
        };
        self.advance(va, page.checked_add(n as u64 * PAGE_SIZE).expect("run end"));
        self.entries += n as u64 - 1;
        Slot::Pte(PteSlot {
            va: page,
            entries: &table.entries[i..i + n],
        })
    }

    /// Releases the page-table lock held for the last slot.
    pub fn unlock(&mut self) {
        self.held = Held::None;
    }

    /// Re-yields the last slot, re-taking its lock; before the first slot, yields the first.
    pub fn current(&mut self) -> Option<Slot<'_>> {
        self.again();
        self.next()
    }

    /// Makes the next [`next`](Self::next) yield the last slot again (after the caller
    /// unlocked it and changed the table there, e.g. split a PMD leaf): the walk goes on
    /// from where it was, in the same walk.
    pub fn again(&mut self) {
        if let Some(last) = self.last {
            self.next = last;
        }
    }

    /// Moves the walk to `va`, which must not be behind the start of the last slot
    /// yielded (a walk may re-enter the rest of a hole it was given whole) nor past the
    /// end; the next slot yielded is the one containing `va`. The lock held stays held if
    /// `va` is in the same table.
    pub fn seek(&mut self, va: VirtAddr) {
        let floor = self.last.unwrap_or(self.next);
        assert!(
            va >= floor && va < self.end,
            "seek to {va} outside {floor}..{}",
            self.end
        );
        self.next = va;
    }

    /// Visits the next slot, or returns `None` at the end of the range.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Slot<'_>> {
        // Fast path: the next PTE is in the table whose lock is held. Holding it (and the
        // mmap lock) keeps the PMD word pointing to this table, so no re-walk is needed.
        if let Held::Pte { table, base, .. } = self.held {
            let va = self.next;
            if va < self.end && va.align_down(PMD_SIZE) == base {
                return Some(self.pte_slot(table, va));
            }
        }
        loop {
            if self.next >= self.end {
                self.held = Held::None;
                return None;
            }
            let va = self.next;
            let populate = self.mode == WalkMode::Populate;
            let pgd_slot = &self.pt.pgd.tables[va.table_index(4)];
            let pud = match pgd_slot.get() {
                Some(t) => t,
                None if populate => pgd_slot.get_or_init(|| self.pt.new_pud_table()),
                None => return Some(self.hole(va, PGDIR_SHIFT)),
            };
            let u = va.table_index(3);
            let pud_word = &pud.entries[u];
            let word = pud_word.load(Ordering::Acquire);
            if word == 0 {
                if !populate {
                    return Some(self.hole(va, PUD_SHIFT));
                }
                self.held = Held::None;
                let _pud_lock = pud.lock.lock();
                if pud_word.load(Ordering::Acquire) == 0 {
                    pud.tables[u].get_or_init(|| self.pt.new_pmd_table());
                    pud_word.store(PUD_TABLE, Ordering::Release);
                }
                continue;
            }
            if word_is_huge(word) {
                self.held = Held::None;
                let guard = pud.lock.lock();
                if !word_is_huge(pud_word.load(Ordering::Acquire)) {
                    continue;
                }
                self.held = Held::Upper { _guard: guard };
                let base = va.align_down(PUD_SIZE);
                self.advance(va, base.checked_add(PUD_SIZE).expect("PUD end"));
                return Some(Slot::Pud(LeafSlot {
                    base,
                    entry: pud_word,
                    level: Huge::Pud,
                }));
            }
            debug_assert_eq!(word, PUD_TABLE, "corrupt PUD word {word:#x}");
            let pmdt: &'a PmdTable = pud.tables[u]
                .get()
                .expect("a PUD_TABLE word has its table installed");
            // A PUD leaf replaces this table only under the PMD lock, after it has set
            // every word of it to none (each PTE-table word under that table's lock). So
            // a walker that re-checks its PMD word after taking a PTE lock already backs
            // off from a replaced table; re-checking the PUD word too, after the PMD or PTE
            // lock, makes that local to the cursor. (Shuttle check 6 finds a PTE written
            // under a leaf only when both are removed.)
            let still = || pud_word.load(Ordering::Acquire) == PUD_TABLE;
            let i = va.table_index(2);
            let word = pmdt.entries[i].load(Ordering::Acquire);
            if word == 0 {
                if !populate {
                    return Some(self.hole(va, crate::addr::PMD_SHIFT));
                }
                self.held = Held::None;
                let _pmd_lock = pmdt.lock.lock();
                if still() && pmdt.entries[i].load(Ordering::Acquire) == 0 {
                    pmdt.tables[i].get_or_init(|| self.pt.new_pte_table());
                    pmdt.entries[i].store(PMD_TABLE, Ordering::Release);
                }
                continue;
            }
            if word_is_huge(word) {
                self.held = Held::None;
                let guard = pmdt.lock.lock();
                if !still() || !word_is_huge(pmdt.entries[i].load(Ordering::Acquire)) {
                    continue;
                }
                self.held = Held::Upper { _guard: guard };
                let base = va.align_down(PMD_SIZE);
                self.advance(va, base.checked_add(PMD_SIZE).expect("PMD end"));
                return Some(Slot::Pmd(LeafSlot {
                    base,
                    entry: &pmdt.entries[i],
                    level: Huge::Pmd,
                }));
            }
            debug_assert_eq!(word, PMD_TABLE, "corrupt PMD word {word:#x}");
            let table: &'a PteTable = pmdt.tables[i]
                .get()
                .expect("a PMD_TABLE word has its table installed");
            let same = matches!(self.held, Held::Pte { table: t, .. } if std::ptr::eq(t, table));
            if !same {
                self.held = Held::None;
                let guard = table.lock.lock();
                if !still() || pmdt.entries[i].load(Ordering::Acquire) != PMD_TABLE {
                    continue;
                }
                self.held = Held::Pte {
                    table,
                    base: va.align_down(PMD_SIZE),
                    _guard: guard,
                };
            }
            return Some(self.pte_slot(table, va));
        }
    }

    fn advance(&mut self, va: VirtAddr, next: VirtAddr) {
        self.last = Some(va);
        self.next = next;
        self.entries += 1;
    }

    fn hole(&mut self, va: VirtAddr, shift: u32) -> Slot<'_> {
        self.held = Held::None;
        let size = 1u64 << shift;
        let end = va
            .align_down(size)
            .checked_add(size)
            .map_or(self.end, |e| e.min(self.end));
        self.advance(va, end);
        Slot::Hole(VaRange::new(va, end).expect("hole is a non-empty page range"))
    }
}

impl Drop for Cursor<'_> {
    fn drop(&mut self) {
        self.pt
            .counters
            .entries
            .fetch_add(self.entries, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Cursor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cursor")
            .field("next", &self.next)
            .field("end", &self.end)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}
