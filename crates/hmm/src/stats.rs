//! Counters every operation reports: page-table walks, TLB flushes, notifier invalidations
//! by event, faults by kind, frames allocated and freed.
//!
//! [`MmStats`] is a snapshot of one address space's counters; [`MmStats::since`] gives the
//! cost of whatever ran between two snapshots. The counters are relaxed atomics: a snapshot
//! taken while other threads run is a consistent count of *each* counter, not of all of
//! them together.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

use crate::notifier::NotifierStats;
use crate::pgtable::WalkStats;

/// Kinds of CPU fault the fault path resolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultKind {
    /// Read of an empty private anonymous page: mapped the zero page.
    AnonReadZero,
    /// Write to an empty private anonymous page: allocated a zeroed page.
    AnonWrite,
    /// Write to a read-only page that was copied (copy on write).
    Cow,
    /// Write to a read-only page that was reused in place.
    WpReuse,
    /// Fault on a shared mapping (page found in or added to the shared object).
    Shared,
    /// Fault on a migration entry that waited for the migration.
    MigrationWait,
    /// Fault on a device-exclusive entry that restored the CPU mapping.
    DeviceExclusive,
    /// Write to an empty PMD: allocated a zeroed THP (`thp_fault_alloc`).
    ThpAnon,
    /// Read of an empty PMD: mapped the huge zero page.
    ThpZero,
    /// Fault that allocated a hugetlb page.
    Hugetlb,
    /// Fault on a device-private entry that called the owner's `migrate_to_ram`.
    DevicePrivate,
    /// Fault on a swap entry that read the page back (`do_swap_page`).
    SwapIn,
    /// Write to empty PTEs: allocated a zeroed multi-size THP and mapped all its pages
    /// (the per-size `anon_fault_alloc`).
    MthpAnon,
}

const NR_FAULT_KINDS: usize = 13;

/// Faults by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct FaultStats {
    /// Read faults that mapped the zero page.
    pub anon_read_zero: u64,
    /// Write faults that allocated a fresh zeroed page.
    pub anon_write: u64,
    /// Write faults that copied a page (COW).
    pub cow: u64,
    /// Write faults that reused a read-only page in place.
    pub wp_reuse: u64,
    /// Faults on shared mappings.
    pub shared: u64,
    /// Faults that waited on a migration entry.
    pub migration_wait: u64,
    /// Faults that revoked device-exclusive access.
    pub device_exclusive: u64,
    /// Write faults that allocated a zeroed THP (`thp_fault_alloc`).
    pub thp_anon: u64,
    /// Read faults that mapped the huge zero page.
    pub thp_zero: u64,
    /// Faults that allocated a hugetlb page.
    pub hugetlb: u64,
    /// Faults on device-private entries that called the owner's `migrate_to_ram`.
    pub device_private: u64,
    /// Faults on swap entries that read the page back (`pgmajfault`).
    pub swap_in: u64,
    /// Write faults that allocated a zeroed multi-size THP (the per-size
    /// `anon_fault_alloc`, summed over sizes).
    pub mthp_anon: u64,
}

impl FaultStats {
    /// All faults.
    pub fn total(&self) -> u64 {
        self.anon_read_zero
            + self.anon_write
            + self.cow
            + self.wp_reuse
            + self.shared
            + self.migration_wait
            + self.device_exclusive
            + self.thp_anon
            + self.thp_zero
            + self.hugetlb
            + self.device_private
            + self.swap_in
            + self.mthp_anon
    }
}

/// What `migrate_vma` did in an address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct MigrateStats {
    /// `migrate_vma_setup` calls that collected.
    pub setups: u64,
    /// Pages selected, locked and unmapped by setup (`cpages` after the pin check),
    /// holes and zero pages included.
    pub pages_collected: u64,
    /// Pages whose mapping now names the destination (holes filled included).
    pub pages_migrated: u64,
    /// Collected pages put back as they were (no destination, pinned, lost a race).
    pub pages_restored: u64,
}

/// Passes over a driver's range by the HMM entry points: the figure the migrate-on-fault
/// work is judged by ("one walk instead of two or three").
///
/// A pass visits each page of the range once. When it stops to fault a page (or to wait
/// on a migration entry) and goes on from that page, that is a *restart* of the same pass,
/// not a new one: the pages before it are not visited again (the kernel's `-EBUSY` loop
/// around `walk_page_range` in `hmm_range_fault`). The low-level count of page-table
/// cursors, which includes the faults' own one-page walks, is [`WalkStats::walks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct RangeWalkStats {
    /// Passes by `hmm_range_fault` (plain, or migrating with `HMM_PFN_REQ_MIGRATE`).
    pub hmm: u64,
    /// Collect passes by `migrate_vma_setup` (with or without `MIGRATE_VMA_FAULT`).
    pub migrate: u64,
    /// Restarts of a pass after a fault or a migration wait.
    pub restarts: u64,
    /// Collect passes of `migrate_to_ram` handlers (`migrate_vma_setup` with a
    /// `fault_page`): part of a CPU fault, not of a driver's range, so not in
    /// [`total`](Self::total).
    pub fault_handler: u64,
}

impl RangeWalkStats {
    /// All passes.
    pub fn total(&self) -> u64 {
        self.hmm + self.migrate
    }
}

/// A snapshot of an address space's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct MmStats {
    /// Page-table walks, entries visited, table counts.
    pub walk: WalkStats,
    /// Notifier invalidations by event and callbacks made.
    pub notifier: NotifierStats,
    /// CPU faults by kind.
    pub faults: FaultStats,
    /// TLB flush operations (a range flush counts once).
    pub tlb_flush_ops: u64,
    /// Pages covered by those flushes.
    pub tlb_flush_pages: u64,
    /// Frames this address space allocated.
    pub frames_allocated: u64,
    /// Frames freed by this address space dropping their last reference.
    pub frames_freed: u64,
    /// PMD leaves split into PTEs (`thp_split_pmd`).
    pub thp_split_pmd: u64,
    /// THPs made by `MADV_COLLAPSE` (`thp_collapse_alloc`).
    pub thp_collapse: u64,
    /// THPs split into small pages after part of them was unmapped (`thp_split_page`).
    pub thp_split_folio: u64,
    /// Multi-size THP allocations that failed on a write fault, which then tried the next
    /// smaller enabled size or a page (the per-size `anon_fault_fallback`, summed).
    pub mthp_fault_fallback: u64,
    /// Reverse-map walks that visited this address space (a folio's walk visits the
    /// address spaces that can map it: see `mm::rmap`).
    #[doc(alias = "rmap_walk")]
    pub rmap_visits: u64,
    /// Migrations.
    pub migrate: MigrateStats,
    /// Passes over drivers' ranges.
    pub range_walks: RangeWalkStats,
    /// What userfaultfd handlers were asked and did.
    pub uffd: UffdStats,
}

/// What userfaultfd did in an address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct UffdStats {
    /// Faults handed to a handler (each waited outside the mmap lock).
    pub faults: u64,
    /// Pages a handler filled (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`).
    pub filled: u64,
    /// Pages a handler moved (`UFFDIO_MOVE`).
    pub moved: u64,
}

impl MmStats {
    /// What happened between `earlier` and `self` (table counts are kept as in `self`).
    pub fn since(&self, earlier: &MmStats) -> MmStats {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        let (w, ew) = (&self.walk, &earlier.walk);
        let (n, en) = (&self.notifier, &earlier.notifier);
        let (f, ef) = (&self.faults, &earlier.faults);
        MmStats {
            walk: WalkStats {
                walks: d(w.walks, ew.walks),
                entries_visited: d(w.entries_visited, ew.entries_visited),
                ..*w
            },
            notifier: NotifierStats {
                invalidations: std::array::from_fn(|i| d(n.invalidations[i], en.invalidations[i])),
                interval_callbacks: d(n.interval_callbacks, en.interval_callbacks),
                mm_callbacks: d(n.mm_callbacks, en.mm_callbacks),
            },
            faults: FaultStats {
                anon_read_zero: d(f.anon_read_zero, ef.anon_read_zero),
                anon_write: d(f.anon_write, ef.anon_write),
                cow: d(f.cow, ef.cow),
                wp_reuse: d(f.wp_reuse, ef.wp_reuse),
                shared: d(f.shared, ef.shared),
                migration_wait: d(f.migration_wait, ef.migration_wait),
                device_exclusive: d(f.device_exclusive, ef.device_exclusive),
                thp_anon: d(f.thp_anon, ef.thp_anon),
                thp_zero: d(f.thp_zero, ef.thp_zero),
                hugetlb: d(f.hugetlb, ef.hugetlb),
                device_private: d(f.device_private, ef.device_private),
                swap_in: d(f.swap_in, ef.swap_in),
                mthp_anon: d(f.mthp_anon, ef.mthp_anon),
            },
            tlb_flush_ops: d(self.tlb_flush_ops, earlier.tlb_flush_ops),
            tlb_flush_pages: d(self.tlb_flush_pages, earlier.tlb_flush_pages),
            frames_allocated: d(self.frames_allocated, earlier.frames_allocated),
            frames_freed: d(self.frames_freed, earlier.frames_freed),
            thp_split_pmd: d(self.thp_split_pmd, earlier.thp_split_pmd),
            thp_collapse: d(self.thp_collapse, earlier.thp_collapse),
            thp_split_folio: d(self.thp_split_folio, earlier.thp_split_folio),
            mthp_fault_fallback: d(self.mthp_fault_fallback, earlier.mthp_fault_fallback),
            rmap_visits: d(self.rmap_visits, earlier.rmap_visits),
            migrate: MigrateStats {
                setups: d(self.migrate.setups, earlier.migrate.setups),
                pages_collected: d(
                    self.migrate.pages_collected,
                    earlier.migrate.pages_collected,
                ),
                pages_migrated: d(self.migrate.pages_migrated, earlier.migrate.pages_migrated),
                pages_restored: d(self.migrate.pages_restored, earlier.migrate.pages_restored),
            },
            range_walks: RangeWalkStats {
                hmm: d(self.range_walks.hmm, earlier.range_walks.hmm),
                migrate: d(self.range_walks.migrate, earlier.range_walks.migrate),
                restarts: d(self.range_walks.restarts, earlier.range_walks.restarts),
                fault_handler: d(
                    self.range_walks.fault_handler,
                    earlier.range_walks.fault_handler,
                ),
            },
            uffd: UffdStats {
                faults: d(self.uffd.faults, earlier.uffd.faults),
                filled: d(self.uffd.filled, earlier.uffd.filled),
                moved: d(self.uffd.moved, earlier.uffd.moved),
            },
        }
    }
}

/// A few lines a person can read: what happened, by kind, leaving out what is zero.
///
/// ```
/// # use hmm::stats::MmStats;
/// let s = MmStats::default();
/// assert_eq!(s.to_string(), "nothing counted");
/// ```
impl std::fmt::Display for MmStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut lines: Vec<String> = Vec::new();
        let join = |parts: Vec<(&str, u64)>| -> Option<String> {
            let shown: Vec<String> = parts
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(name, n)| format!("{n} {name}"))
                .collect();
            (!shown.is_empty()).then(|| shown.join(", "))
        };
        let fl = &self.faults;
        if let Some(l) = join(vec![
            ("anonymous write", fl.anon_write),
            ("zero-page read", fl.anon_read_zero),
            ("copy-on-write", fl.cow),
            ("write-protect reuse", fl.wp_reuse),
            ("shared", fl.shared),
            ("migration wait", fl.migration_wait),
            ("device-exclusive", fl.device_exclusive),
            ("THP", fl.thp_anon),
            ("mTHP", fl.mthp_anon),
            ("huge zero page", fl.thp_zero),
            ("hugetlb", fl.hugetlb),
            ("device-private", fl.device_private),
            ("swap-in", fl.swap_in),
        ]) {
            lines.push(format!("faults: {l}"));
        }
        let events: Vec<(&str, u64)> = crate::notifier::NotifierEvent::ALL
            .iter()
            .map(|e| (e.kernel_name(), self.notifier.of(*e)))
            .collect();
        if let Some(l) = join(events) {
            lines.push(format!("invalidations: {l}"));
        }
        let m = &self.migrate;
        if let Some(l) = join(vec![
            ("setups", m.setups),
            ("collected", m.pages_collected),
            ("migrated", m.pages_migrated),
            ("restored", m.pages_restored),
        ]) {
            lines.push(format!("migration: {l}"));
        }
        let r = &self.range_walks;
        if let Some(l) = join(vec![
            ("hmm_range_fault", r.hmm),
            ("migrate_vma", r.migrate),
            ("restarts", r.restarts),
            ("in migrate_to_ram", r.fault_handler),
        ]) {
            lines.push(format!("range passes: {l}"));
        }
        if let Some(l) = join(vec![
            ("allocated", self.frames_allocated),
            ("freed", self.frames_freed),
        ]) {
            lines.push(format!("frames: {l}"));
        }
        if let Some(l) = join(vec![
            ("flushes", self.tlb_flush_ops),
            ("pages flushed", self.tlb_flush_pages),
        ]) {
            lines.push(format!("TLB: {l}"));
        }
        if let Some(l) = join(vec![
            ("PMD splits", self.thp_split_pmd),
            ("folio splits", self.thp_split_folio),
            ("collapses", self.thp_collapse),
            ("mTHP fallbacks", self.mthp_fault_fallback),
        ]) {
            lines.push(format!("THP: {l}"));
        }
        if self.rmap_visits > 0 {
            lines.push(format!("reverse-map visits: {}", self.rmap_visits));
        }
        let u = &self.uffd;
        if let Some(l) = join(vec![
            ("faults", u.faults),
            ("pages filled", u.filled),
            ("pages moved", u.moved),
        ]) {
            lines.push(format!("userfaultfd: {l}"));
        }
        if lines.is_empty() {
            return f.write_str("nothing counted");
        }
        f.write_str(&lines.join("\n"))
    }
}

/// The live counters of an address space (page-table and notifier counters live with
/// their owners).
#[derive(Debug, Default)]
pub(crate) struct MmCounters {
    faults: [AtomicU64; NR_FAULT_KINDS],
    tlb_flush_ops: AtomicU64,
    tlb_flush_pages: AtomicU64,
    frames_allocated: AtomicU64,
    frames_freed: AtomicU64,
    thp_split_pmd: AtomicU64,
    migrate_setups: AtomicU64,
    migrate_collected: AtomicU64,
    migrate_migrated: AtomicU64,
    migrate_restored: AtomicU64,
    thp_collapse: AtomicU64,
    thp_split_folio: AtomicU64,
    mthp_fault_fallback: AtomicU64,
    rmap_visits: AtomicU64,
    uffd_faults: AtomicU64,
    uffd_filled: AtomicU64,
    uffd_moved: AtomicU64,
    range_walks_hmm: AtomicU64,
    range_walks_migrate: AtomicU64,
    range_walk_restarts: AtomicU64,
    range_walks_fault_handler: AtomicU64,
}

/// Who made a pass over a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RangeWalker {
    /// `hmm_range_fault`.
    Hmm,
    /// `migrate_vma_setup`.
    Migrate,
    /// `migrate_vma_setup` in a `migrate_to_ram` handler.
    FaultHandler,
}

impl MmCounters {
    pub(crate) fn fault(&self, kind: FaultKind) {
        self.faults[kind as usize].fetch_add(1, Relaxed);
    }

    pub(crate) fn tlb_flush(&self, pages: u64) {
        self.tlb_flush_ops.fetch_add(1, Relaxed);
        self.tlb_flush_pages.fetch_add(pages, Relaxed);
    }

    pub(crate) fn frame_allocated(&self) {
        self.frames_allocated.fetch_add(1, Relaxed);
    }

    pub(crate) fn frames_freed(&self, n: u64) {
        self.frames_freed.fetch_add(n, Relaxed);
    }

    pub(crate) fn thp_split_pmd(&self) {
        self.thp_split_pmd.fetch_add(1, Relaxed);
    }

    pub(crate) fn thp_split_folio(&self) {
        self.thp_split_folio.fetch_add(1, Relaxed);
    }

    pub(crate) fn rmap_visit(&self) {
        self.rmap_visits.fetch_add(1, Relaxed);
    }

    pub(crate) fn migrate_setup(&self, collected: u64) {
        self.migrate_setups.fetch_add(1, Relaxed);
        self.migrate_collected.fetch_add(collected, Relaxed);
    }

    pub(crate) fn migrate_done(&self, migrated: u64, restored: u64) {
        self.migrate_migrated.fetch_add(migrated, Relaxed);
        self.migrate_restored.fetch_add(restored, Relaxed);
    }

    pub(crate) fn range_walk(&self, by: RangeWalker) {
        match by {
            RangeWalker::Hmm => &self.range_walks_hmm,
            RangeWalker::Migrate => &self.range_walks_migrate,
            RangeWalker::FaultHandler => &self.range_walks_fault_handler,
        }
        .fetch_add(1, Relaxed);
    }

    pub(crate) fn range_walk_restart(&self) {
        self.range_walk_restarts.fetch_add(1, Relaxed);
    }

    pub(crate) fn userfault(&self) {
        self.uffd_faults.fetch_add(1, Relaxed);
    }

    pub(crate) fn uffd_filled(&self) {
        self.uffd_filled.fetch_add(1, Relaxed);
    }

    pub(crate) fn uffd_moved(&self) {
        self.uffd_moved.fetch_add(1, Relaxed);
    }

    pub(crate) fn mthp_fault_fallback(&self) {
        self.mthp_fault_fallback.fetch_add(1, Relaxed);
    }

    pub(crate) fn thp_collapse(&self) {
        self.thp_collapse.fetch_add(1, Relaxed);
    }

    pub(crate) fn snapshot(&self, walk: WalkStats, notifier: NotifierStats) -> MmStats {
        let f = |k: FaultKind| self.faults[k as usize].load(Relaxed);
        MmStats {
            walk,
            notifier,
            faults: FaultStats {
                anon_read_zero: f(FaultKind::AnonReadZero),
                anon_write: f(FaultKind::AnonWrite),
                cow: f(FaultKind::Cow),
                wp_reuse: f(FaultKind::WpReuse),
                shared: f(FaultKind::Shared),
                migration_wait: f(FaultKind::MigrationWait),
                device_exclusive: f(FaultKind::DeviceExclusive),
                thp_anon: f(FaultKind::ThpAnon),
                thp_zero: f(FaultKind::ThpZero),
                hugetlb: f(FaultKind::Hugetlb),
                device_private: f(FaultKind::DevicePrivate),
                swap_in: f(FaultKind::SwapIn),
                mthp_anon: f(FaultKind::MthpAnon),
            },
            tlb_flush_ops: self.tlb_flush_ops.load(Relaxed),
            tlb_flush_pages: self.tlb_flush_pages.load(Relaxed),
            frames_allocated: self.frames_allocated.load(Relaxed),
            frames_freed: self.frames_freed.load(Relaxed),
            thp_split_pmd: self.thp_split_pmd.load(Relaxed),
            thp_collapse: self.thp_collapse.load(Relaxed),
            thp_split_folio: self.thp_split_folio.load(Relaxed),
            mthp_fault_fallback: self.mthp_fault_fallback.load(Relaxed),
            rmap_visits: self.rmap_visits.load(Relaxed),
            migrate: MigrateStats {
                setups: self.migrate_setups.load(Relaxed),
                pages_collected: self.migrate_collected.load(Relaxed),
                pages_migrated: self.migrate_migrated.load(Relaxed),
                pages_restored: self.migrate_restored.load(Relaxed),
            },
            range_walks: RangeWalkStats {
                hmm: self.range_walks_hmm.load(Relaxed),
                migrate: self.range_walks_migrate.load(Relaxed),
                restarts: self.range_walk_restarts.load(Relaxed),
                fault_handler: self.range_walks_fault_handler.load(Relaxed),
            },
            uffd: UffdStats {
                faults: self.uffd_faults.load(Relaxed),
                filled: self.uffd_filled.load(Relaxed),
                moved: self.uffd_moved.load(Relaxed),
            },
        }
    }
}
