//! VMA-less migration of device pages (`migrate_device_range`, `migrate_device_pfns`,
//! `migrate_device_pages`, `migrate_device_finalize`): how a driver evicts its memory
//! (chunk release, device teardown) without knowing where the pages are mapped.
//!
//! The same three stages as `migrate_vma`, driven by frame numbers: each in-use page gets
//! a reference and its lock (trylock: a locked page is skipped), then every mapping of it
//! in every address space becomes a migration entry through the reverse map (CLEAR per
//! VMA range); a page still referenced beyond the migration is put back. The driver copies
//! into destination pages and hands them over; [`DeviceMigration::pages`] moves the
//! metadata; [`DeviceMigrationPages::finalize`] maps the destinations where the migration
//! entries were. No mmap lock is held by the caller; the reverse-map walks take each
//! address space's lock for reading.

use crate::addr::DevicePfn;
use crate::phys::{Frame, FrameFlags, FrameRef, PhysMem};

use super::collect::{remove_migration_ptes, try_to_migrate};
use super::pfn::{MigratePfn, MigratePfnFlags};
use super::MigrateOutcome;

/// Collected device pages, waiting for destinations.
#[must_use = "dropping a migration puts every page back; call pages() and finalize()"]
pub struct DeviceMigration<'p> {
    state: DevState<'p>,
}

/// Committed device pages, waiting for finalize.
#[must_use = "dropping finalizes; call finalize() to get the outcome"]
pub struct DeviceMigrationPages<'p> {
    state: DevState<'p>,
}

struct DevState<'p> {
    phys: &'p PhysMem,
    src: Vec<MigratePfn>,
    dst: Vec<MigratePfn>,
    committed: bool,
    done: bool,
}

/// Collects the in-use pages of the `npages` device frames from `start` (private or
/// coherent) (`migrate_device_range`). Free frames, tails of large folios and locked
/// pages give 0.
pub fn migrate_device_range<'p>(
    phys: &'p PhysMem,
    start: FrameRef<'_>,
    npages: u64,
) -> DeviceMigration<'p> {
    let first = start.nr();
    collect(phys, (0..npages).map(|i| first + i))
}

/// Collects the in-use device pages `pfns` (`migrate_device_pfns`).
pub fn migrate_device_pfns<'p>(phys: &'p PhysMem, pfns: &[DevicePfn]) -> DeviceMigration<'p> {
    collect(phys, pfns.iter().map(|p| p.as_u64()))
}

fn collect(phys: &PhysMem, nrs: impl Iterator<Item = u64>) -> DeviceMigration<'_> {
    let mut state = DevState {
        phys,
        src: Vec::new(),
        dst: Vec::new(),
        committed: false,
        done: false,
    };
    for nr in nrs {
        state.src.push(collect_one(phys, nr));
        state.dst.push(MigratePfn::default());
    }
    DeviceMigration { state }
}

/// One page: referenced, locked, unmapped everywhere, pin-checked; or 0.
fn collect_one(phys: &PhysMem, nr: u64) -> MigratePfn {
    // Device memory of a registered pagemap only.
    if !phys.pagemap_of(nr).is_some_and(|p| p.is_live()) {
        return MigratePfn::default();
    }
    let page = phys.frame_nr(nr);
    let fm = page.meta();
    // Only a folio head of order 0 (device THP is not built yet) that is in use.
    if fm.flags().contains(FrameFlags::TAIL) || fm.order() != 0 || fm.try_get().is_err() {
        return MigratePfn::default();
    }
    if !fm.trylock() {
        let _ = page.put();
        return MigratePfn::default();
    }
    if fm.mapcount() > 0 {
        try_to_migrate(None, page);
    }
    if fm.mapcount() > 0 || fm.refcount() > 1 {
        remove_migration_ptes(None, page, page);
        fm.unlock();
        let _ = page.put();
        return MigratePfn::default();
    }
    MigratePfn::new(nr, MigratePfnFlags::MIGRATE)
}

impl<'p> DeviceMigration<'p> {
    /// One word per frame asked for: `MIGRATE` for each page being migrated.
    pub fn src(&self) -> &[MigratePfn] {
        &self.state.src
    }

    /// The source page of entry `i`, if it is migrating.
    pub fn src_page(&self, i: usize) -> Option<FrameRef<'p>> {
        let w = self.state.src[i];
        w.is_migrating()
            .then(|| self.state.phys.frame_nr(w.frame_nr()))
    }

    /// Gives entry `i` its destination (locked, filled); see
    /// [`Migration::set_dst`](super::Migration::set_dst).
    ///
    /// # Panics
    ///
    /// Panics if entry `i` is not migrating, has a destination, or `dst` is not locked.
    #[track_caller]
    pub fn set_dst(&mut self, i: usize, dst: Frame<'_>, write: bool) {
        self.state.dst[i] =
            MigratePfn::destination(self.state.src[i], self.state.dst[i], dst, write);
    }

    /// Moves the metadata of every entry that has a destination (`migrate_device_pages`).
    #[doc(alias = "migrate_device_pages")]
    pub fn pages(mut self) -> DeviceMigrationPages<'p> {
        let s = &mut self.state;
        for i in 0..s.src.len() {
            let (w, d) = (s.src[i], s.dst[i]);
            if !w.is_migrating() {
                continue;
            }
            let src = s.phys.frame_nr(w.frame_nr());
            if d.is_empty() || src.meta().refcount() != 1 {
                s.src[i] = w.without(MigratePfnFlags::MIGRATE);
                continue;
            }
            let dm = s.phys.frame_nr(d.frame_nr()).meta();
            let sm = src.meta();
            dm.inherit_mapping(sm, 0);
            dm.set_flags(
                (sm.flags() & (FrameFlags::ANON | FrameFlags::DIRTY)) | FrameFlags::UPTODATE,
            );
        }
        s.committed = true;
        DeviceMigrationPages {
            state: std::mem::replace(
                s,
                DevState {
                    phys: s.phys,
                    src: Vec::new(),
                    dst: Vec::new(),
                    committed: true,
                    done: true,
                },
            ),
        }
    }
}

impl DeviceMigrationPages<'_> {
    /// The source words: `MIGRATE` still set on the entries that will migrate.
    pub fn src(&self) -> &[MigratePfn] {
        &self.state.src
    }

    /// Maps the destinations where the sources were mapped (or the sources back), unlocks
    /// and releases (`migrate_device_finalize`).
    #[doc(alias = "migrate_device_finalize")]
    pub fn finalize(mut self) -> MigrateOutcome {
        self.state.finalize()
    }
}

impl DevState<'_> {
    fn finalize(&mut self) -> MigrateOutcome {
        let mut out = MigrateOutcome::default();
        for i in 0..self.src.len() {
            let (w, d) = (self.src[i], self.dst[i]);
            if !w.is_valid() {
                continue;
            }
            let src = self.phys.frame_nr(w.frame_nr());
            let dst = (!d.is_empty()).then(|| self.phys.frame_nr(d.frame_nr()));
            let target = match dst {
                Some(dst) if self.committed && w.is_migrating() => {
                    out.migrated += 1;
                    dst
                }
                _ => {
                    out.restored += 1;
                    src
                }
            };
            remove_migration_ptes(None, src, target);
            src.meta().unlock();
            let _ = src.put();
            if let Some(dst) = dst {
                dst.meta().unlock();
                let _ = dst.put();
            }
        }
        self.done = true;
        out
    }
}

impl Drop for DevState<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.finalize();
        }
    }
}

impl std::fmt::Debug for DeviceMigration<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMigration")
            .field("npages", &self.state.src.len())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for DeviceMigrationPages<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMigrationPages")
            .field("npages", &self.state.src.len())
            .finish_non_exhaustive()
    }
}
