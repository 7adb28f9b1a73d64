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

use crate::addr::{DevicePfn, PMD_NR};
use crate::phys::{FrameFlags, FrameRef, LockedFolio, PhysMem};

use super::collect::{remove_migration_ptes, try_to_migrate};
use super::compound::{expand_unit, folio_mapped, split_unmapped_folio};
use super::pfn::{DstRefused, MigratePfn, MigratePfnFlags};
use super::{MigrateError, MigrateOutcome};

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
    /// The frame number each entry was asked for.
    nrs: Vec<u64>,
    src: Vec<MigratePfn>,
    dst: Vec<MigratePfn>,
    committed: bool,
    done: bool,
}

/// Collects the in-use pages of the `npages` device frames from `start` (private or
/// coherent) (`migrate_device_range`). Free frames, tails of large folios and locked
/// pages give 0, and so does a device THP whose 2 MiB the range does not hold whole.
///
/// Errors: `Inval` when `start` is not a frame of a device pagemap or the range runs past
/// the end of that pagemap (a kernel driver passes the pfns of its own memory; the arrays
/// are then bounded by the device's size).
pub fn migrate_device_range<'p>(
    phys: &'p PhysMem,
    start: FrameRef<'_>,
    npages: u64,
) -> Result<DeviceMigration<'p>, MigrateError> {
    let first = start.nr();
    let pgmap = phys.pagemap_of(first).ok_or(MigrateError::Inval {
        what: "start is not a device frame",
    })?;
    let inside = npages == 0
        || first
            .checked_add(npages - 1)
            .is_some_and(|last| pgmap.contains_nr(last));
    if !inside {
        return Err(MigrateError::Inval {
            what: "the range runs past its device pagemap",
        });
    }
    Ok(collect(phys, (0..npages).map(|i| first + i)))
}

/// Collects the in-use device pages `pfns` (`migrate_device_pfns`). A device THP is
/// collected when its head is followed by its 511 other pages, in order, as in a range;
/// otherwise its entry gives 0. The words of the 511 stay 0.
pub fn migrate_device_pfns<'p>(phys: &'p PhysMem, pfns: &[DevicePfn]) -> DeviceMigration<'p> {
    collect(phys, pfns.iter().map(|p| p.as_u64()))
}

fn collect(phys: &PhysMem, nrs: impl Iterator<Item = u64>) -> DeviceMigration<'_> {
    let nrs: Vec<u64> = nrs.collect();
    let n = nrs.len();
    let mut state = DevState {
        phys,
        src: vec![MigratePfn::default(); n],
        dst: vec![MigratePfn::default(); n],
        nrs,
        committed: false,
        done: false,
    };
    let mut i = 0;
    while i < n {
        // Whether a device THP headed here would have its other pages in the entries
        // after it; checked again under the folio lock, where the order is stable.
        let unit_fits = {
            let nrs = &state.nrs;
            i + PMD_NR as usize <= n
                && nrs[i] % PMD_NR == 0
                && (1..PMD_NR as usize).all(|k| nrs[i + k] == nrs[i] + k as u64)
        };
        let w = collect_one(phys, state.nrs[i], unit_fits);
        state.src[i] = w;
        i += w.npages() as usize;
    }
    DeviceMigration { state }
}

/// One page (or device THP, if `unit_fits`): referenced, locked, unmapped everywhere,
/// pin-checked; or 0.
fn collect_one(phys: &PhysMem, nr: u64, unit_fits: bool) -> MigratePfn {
    // Device memory of a registered pagemap only.
    if !phys.pagemap_of(nr).is_some_and(|p| p.is_live()) {
        return MigratePfn::default();
    }
    let page = phys.frame_nr(nr);
    let fm = page.meta();
    // A folio head in use (the words of a device THP's other pages stay 0).
    if fm.flags().contains(FrameFlags::TAIL) || fm.try_get().is_err() {
        return MigratePfn::default();
    }
    if !fm.trylock() {
        let _ = page.put();
        return MigratePfn::default();
    }
    if fm.order() > 0 && !unit_fits {
        fm.unlock();
        let _ = page.put();
        return MigratePfn::default();
    }
    if folio_mapped(phys, page) {
        try_to_migrate(None, page);
    }
    if folio_mapped(phys, page) || fm.refcount() > 1 {
        remove_migration_ptes(None, page, page);
        fm.unlock();
        let _ = page.put();
        return MigratePfn::default();
    }
    let mut flags = MigratePfnFlags::MIGRATE;
    if fm.order() > 0 {
        flags |= MigratePfnFlags::COMPOUND;
    }
    MigratePfn::new(nr, flags)
}

/// Why [`migrate_device_coherent_folio`] could not move a folio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CoherentMigrateError {
    /// The folio could not be collected (locked, referenced beyond its mappings, freed
    /// meanwhile) or did not commit (`-EBUSY`).
    Busy,
    /// No system memory to move it to.
    NoMem,
}

/// Moves the device-coherent folio headed by frame `head` to system memory
/// (`migrate_device_coherent_folio`), as a long-term pin must before it pins: collected by
/// frame number like an eviction, copied to a system folio of its order (or to 512 pages
/// for a device THP when no system THP can be had), committed and remapped wherever it
/// was mapped. The caller holds no reference and no mmap lock.
pub(crate) fn migrate_device_coherent_folio(
    phys: &PhysMem,
    head: u64,
) -> Result<(), CoherentMigrateError> {
    let npages = phys.frame_nr(head).meta().order();
    let npages = 1u64 << npages.min(crate::addr::PMD_ORDER);
    let mut m = collect(phys, (0..npages).map(|i| head + i));
    let w = m.state.src[0];
    if !w.is_migrating() {
        return Err(CoherentMigrateError::Busy);
    }
    let alloc = |order| {
        phys.alloc(order, FrameFlags::empty())
            .ok()
            .map(|f| f.lock())
    };
    let large = (w.npages() > 1)
        .then(|| alloc(crate::addr::PMD_ORDER))
        .flatten();
    if let Some(folio) = large {
        folio.copy_folio_from(&m.src_page(0).expect("migrating"));
        m.set_dst(0, folio, true)
            .expect("the head of a migrating unit");
    } else {
        for k in 0..w.npages() as usize {
            let page = alloc(0).ok_or(CoherentMigrateError::NoMem)?;
            page.copy_from(&m.src_page(k).expect("migrating"));
            m.set_dst(k, page, true)
                .expect("a page of a migrating unit");
        }
    }
    let out = m.pages().finalize();
    if out.migrated == w.npages() {
        Ok(())
    } else {
        Err(CoherentMigrateError::Busy)
    }
}

impl<'p> DeviceMigration<'p> {
    /// One word per frame asked for: `MIGRATE` for each page being migrated.
    pub fn src(&self) -> &[MigratePfn] {
        &self.state.src
    }

    /// One word per frame asked for: the destination given to it (`set_dst`), or 0.
    pub fn dst(&self) -> &[MigratePfn] {
        &self.state.dst
    }

    /// The source page of entry `i`, if it is migrating; inside a device THP (a
    /// `COMPOUND` word and the 511 empty words after it), its page `i - head`.
    pub fn src_page(&self, i: usize) -> Option<FrameRef<'p>> {
        let head = self.state.unit_head(i).unwrap_or(i);
        let w = self.state.src[head];
        w.is_migrating()
            .then(|| self.state.phys.frame_nr(w.frame_nr() + (i - head) as u64))
    }

    /// Gives entry `i` its destination (locked, filled); see
    /// [`Migration::set_dst`](super::Migration::set_dst): a device THP takes one order-9
    /// folio at its head, or order-0 pages at its 512 entries (the source is then split
    /// when the migration commits).
    ///
    /// Errors: [`DstRefused`], with the folio given back, if `i` is outside the
    /// migration, the entry is neither migrating nor inside a migrating device THP, or it
    /// has a destination.
    pub fn set_dst<'f>(
        &mut self,
        i: usize,
        dst: LockedFolio<'f>,
        write: bool,
    ) -> Result<(), DstRefused<'f>> {
        let s = &mut self.state;
        let src = (i < s.src.len()).then(|| s.src[s.unit_head(i).unwrap_or(i)]);
        let dst_word = s.dst.get(i).copied().unwrap_or_default();
        let word = MigratePfn::destination(i, src, dst_word, dst, write)?;
        s.dst[i] = word;
        Ok(())
    }

    /// Moves the metadata of every entry that has a destination (`migrate_device_pages`).
    /// A device THP moves whole to an order-9 destination; for order-0 ones its folio is
    /// split first, through the reverse map (the kernel refuses that without a VMA; see
    /// DESIGN.md).
    #[doc(alias = "migrate_device_pages")]
    pub fn pages(mut self) -> DeviceMigrationPages<'p> {
        let s = &mut self.state;
        let mut i = 0;
        while i < s.src.len() {
            let (w, d) = (s.src[i], s.dst[i]);
            let unit = w.flags().contains(MigratePfnFlags::COMPOUND);
            let dst_unit = d.flags().contains(MigratePfnFlags::COMPOUND);
            if !w.is_migrating() || d.is_empty() || (dst_unit && !unit) {
                s.src[i] = w.without(MigratePfnFlags::MIGRATE);
                i += 1;
                continue;
            }
            if unit && !dst_unit {
                let head = s.phys.frame_nr(w.frame_nr());
                if !split_unmapped_folio(s.phys, None, head, 1) {
                    // Back whole, wherever its entries are now (finalize's reverse map).
                    // Finalize releases the head's destination; the tails' words are 0,
                    // so their destinations are released here.
                    s.src[i] = w.without(MigratePfnFlags::MIGRATE);
                    for k in i + 1..i + PMD_NR as usize {
                        let d = std::mem::take(&mut s.dst[k]);
                        if !d.is_empty() {
                            let f = s.phys.frame_nr(d.frame_nr());
                            f.meta().unlock();
                            let _ = f.put();
                        }
                    }
                    i += PMD_NR as usize;
                    continue;
                }
                expand_unit(&mut s.src, i);
                let n = PMD_NR as usize;
                (i..i + n).for_each(|k| s.commit(k));
                i += n;
            } else {
                s.commit(i);
                i += 1;
            }
        }
        s.committed = true;
        DeviceMigrationPages {
            state: std::mem::replace(
                s,
                DevState {
                    phys: s.phys,
                    nrs: Vec::new(),
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

    /// The destination words.
    pub fn dst(&self) -> &[MigratePfn] {
        &self.state.dst
    }

    /// Maps the destinations where the sources were mapped (or the sources back), unlocks
    /// and releases (`migrate_device_finalize`).
    #[doc(alias = "migrate_device_finalize")]
    pub fn finalize(mut self) -> MigrateOutcome {
        self.state.finalize()
    }
}

impl DevState<'_> {
    /// The index of the head of the device THP entry `i` belongs to, if it belongs to
    /// one: its pages follow the head in frame order and the head's frame number is 2 MiB
    /// aligned (a pagemap's sections are), so the only candidate is one look away.
    fn unit_head(&self, i: usize) -> Option<usize> {
        let off = self.nrs[i] % PMD_NR;
        let h = i.checked_sub(off as usize)?;
        (self.src[h].flags().contains(MigratePfnFlags::COMPOUND)
            && self.nrs[h] + off == self.nrs[i])
            .then_some(h)
    }

    /// Moves the metadata of entry `i`'s page (or device THP) to its destination, or
    /// stops it migrating (no destination, or referenced beyond the migration).
    fn commit(&mut self, i: usize) {
        let (w, d) = (self.src[i], self.dst[i]);
        let src = self.phys.frame_nr(w.frame_nr());
        if d.is_empty() || src.meta().refcount() != 1 {
            self.src[i] = w.without(MigratePfnFlags::MIGRATE);
            return;
        }
        let dm = self.phys.frame_nr(d.frame_nr()).meta();
        let sm = src.meta();
        dm.inherit_mapping(sm, 0);
        dm.set_flags((sm.flags() & (FrameFlags::ANON | FrameFlags::DIRTY)) | FrameFlags::UPTODATE);
    }

    fn finalize(&mut self) -> MigrateOutcome {
        let mut out = MigrateOutcome::default();
        for i in 0..self.src.len() {
            let (w, d) = (self.src[i], self.dst[i]);
            if !w.is_valid() {
                continue;
            }
            let src = self.phys.frame_nr(w.frame_nr());
            let dst = (!d.is_empty()).then(|| self.phys.frame_nr(d.frame_nr()));
            let pages = 1u64 << src.meta().order();
            let target = match dst {
                Some(dst) if self.committed && w.is_migrating() => {
                    out.migrated += pages;
                    dst
                }
                _ => {
                    out.restored += pages;
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
            crate::sync::drop_work(|| {
                self.finalize();
            });
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
