//! Virtual memory areas and the ordered set of them (`struct vm_area_struct`, the maple
//! tree). All of it is protected by the mmap lock.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::addr::{VaRange, VirtAddr, PAGE_SHIFT};
use crate::notifier::VmaInfo;
use crate::prot::{Prot, VmFlags};

use super::driver::DriverMapping;
use super::shmem::ShmemObject;
use super::userfaultfd::UffdCtx;

/// What backs a VMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum VmaKind {
    /// Private anonymous memory: zero page on read, fresh pages on write, COW.
    AnonPrivate,
    /// Shared anonymous memory: pages live in a shared object; writes are never copied.
    AnonShared,
    /// A private mapping of a file: its pages read-only, written pages copied.
    FilePrivate,
    /// A shared mapping of a file: writes go to the file.
    FileShared,
    /// A driver's mapping of its own pages (`VM_MIXEDMAP`).
    Driver,
}

/// A virtual memory area.
pub struct Vma {
    range: VaRange,
    flags: VmFlags,
    /// Page offset of `range.start()` in the backing object.
    pgoff: u64,
    backing: Backing,
    /// Whether an anonymous page was ever made here (the kernel's `vma->anon_vma` is set,
    /// by `anon_vma_prepare` on the first one). Set under the mmap lock for reading, hence
    /// atomic; kept by splits, merges, moves and fork, as the kernel's pointer is.
    anon_vma: AtomicBool,
    /// The userfaultfd the VMA is registered with (`vm_userfaultfd_ctx`); set exactly
    /// when `flags` has a [`VmFlags::UFFD`] bit.
    uffd: Option<Arc<UffdCtx>>,
}

impl Clone for Vma {
    fn clone(&self) -> Self {
        Vma {
            range: self.range,
            flags: self.flags,
            pgoff: self.pgoff,
            backing: self.backing.clone(),
            anon_vma: AtomicBool::new(self.has_anon_vma()),
            uffd: self.uffd.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) enum Backing {
    Anon,
    Shmem(Arc<ShmemObject>),
    Driver(Arc<DriverMapping>),
}

impl Vma {
    pub(crate) fn new(range: VaRange, flags: VmFlags, pgoff: u64, backing: Backing) -> Self {
        Vma {
            range,
            flags,
            pgoff,
            backing,
            anon_vma: AtomicBool::new(false),
            uffd: None,
        }
    }

    /// The range the VMA covers.
    pub fn range(&self) -> VaRange {
        self.range
    }

    /// Start address.
    pub fn start(&self) -> VirtAddr {
        self.range.start()
    }

    /// End address (exclusive).
    pub fn end(&self) -> VirtAddr {
        self.range.end()
    }

    /// The VMA's flags.
    pub fn flags(&self) -> VmFlags {
        self.flags
    }

    /// The access the VMA allows.
    pub fn prot(&self) -> Prot {
        self.flags.prot()
    }

    /// What backs it.
    pub fn kind(&self) -> VmaKind {
        match &self.backing {
            Backing::Anon => VmaKind::AnonPrivate,
            Backing::Shmem(o) if o.is_anonymous() => VmaKind::AnonShared,
            Backing::Shmem(_) if self.is_shared() => VmaKind::FileShared,
            Backing::Shmem(_) => VmaKind::FilePrivate,
            Backing::Driver(_) => VmaKind::Driver,
        }
    }

    /// Whether the mapping is shared (`VM_SHARED`): writes go to the backing object.
    pub fn is_shared(&self) -> bool {
        self.flags.contains(VmFlags::SHARED)
    }

    /// Whether the mapping is private and may be made writable (`is_cow_mapping`): its
    /// writes copy the page first.
    pub fn is_cow_mapping(&self) -> bool {
        !self.is_shared() && self.flags.contains(VmFlags::MAYWRITE)
    }

    /// Whether the VMA is anonymous memory with no backing object (`vma_is_anonymous`).
    #[doc(alias = "vma_is_anonymous")]
    pub fn is_anonymous(&self) -> bool {
        matches!(self.backing, Backing::Anon)
    }

    /// Whether any access is allowed (`vma_is_accessible`).
    #[doc(alias = "vma_is_accessible")]
    pub fn is_accessible(&self) -> bool {
        self.flags.intersects(VmFlags::ACCESS)
    }

    /// The description carried in notifier ranges.
    pub fn info(&self) -> VmaInfo {
        VmaInfo {
            range: self.range,
            flags: self.flags,
        }
    }

    pub(crate) fn backing(&self) -> &Backing {
        &self.backing
    }

    /// A copy of the part starting at `old_start` placed at `target` (`copy_vma`): same
    /// flags and backing, the page offset of `old_start`.
    ///
    /// An anonymous VMA that never had a page (no `anon_vma`) is re-based: its offset
    /// becomes the new start's page number, as `copy_vma` does, so it can merge with a
    /// neighbour at its new place. Any other keeps the offset of `old_start`, which its
    /// pages' reverse-map indexes refer to.
    #[doc(alias = "copy_vma")]
    pub(crate) fn moved(&self, old_start: VirtAddr, target: VaRange) -> Vma {
        let pgoff = if self.is_anonymous() && !self.has_anon_vma() {
            target.start().as_u64() >> PAGE_SHIFT
        } else {
            self.pgoff_of(old_start)
        };
        Vma {
            range: target,
            flags: self.flags,
            pgoff,
            backing: self.backing.clone(),
            anon_vma: AtomicBool::new(self.has_anon_vma()),
            uffd: self.uffd.clone(),
        }
    }

    /// The userfaultfd the VMA is registered with.
    pub(crate) fn uffd(&self) -> Option<&Arc<UffdCtx>> {
        self.uffd.as_ref()
    }

    /// Sets the registration: `flags` (whose [`VmFlags::UFFD`] bits must agree with
    /// `ctx`) and the userfaultfd. Returns whether anything changed.
    pub(crate) fn set_uffd(&mut self, flags: VmFlags, ctx: Option<Arc<UffdCtx>>) -> bool {
        debug_assert_eq!(flags.intersects(VmFlags::UFFD), ctx.is_some());
        let same_ctx = match (&self.uffd, &ctx) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        if same_ctx && flags == self.flags {
            return false;
        }
        self.flags = flags;
        self.uffd = ctx;
        true
    }

    /// Records that an anonymous page is being made in this VMA (`anon_vma_prepare`).
    #[doc(alias = "anon_vma_prepare")]
    pub(crate) fn prepare_anon_vma(&self) {
        if !self.anon_vma.load(Ordering::Relaxed) {
            self.anon_vma.store(true, Ordering::Relaxed);
        }
    }

    /// Whether an anonymous page was ever made here (`vma->anon_vma != NULL`).
    pub(crate) fn has_anon_vma(&self) -> bool {
        self.anon_vma.load(Ordering::Relaxed)
    }

    /// Page offset of the VMA's start in its backing object (for anonymous memory, the
    /// start's page number when it was mapped; see [`super::rmap`]).
    pub(crate) fn pgoff(&self) -> u64 {
        self.pgoff
    }

    /// Page offset in the backing object of `addr`.
    pub(crate) fn pgoff_of(&self, addr: VirtAddr) -> u64 {
        self.pgoff + (addr.offset_from(self.start()).expect("address in VMA") >> PAGE_SHIFT)
    }

    /// Whether `next` may be merged onto the end of `self`.
    fn can_merge(&self, next: &Vma) -> bool {
        self.end() == next.start()
            && self.flags - VmFlags::SOFTDIRTY == next.flags - VmFlags::SOFTDIRTY
            && self.pgoff + self.range.npages() == next.pgoff
            && match (&self.uffd, &next.uffd) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
            && match (&self.backing, &next.backing) {
                (Backing::Anon, Backing::Anon) => true,
                (Backing::Shmem(a), Backing::Shmem(b)) => Arc::ptr_eq(a, b),
                (Backing::Driver(a), Backing::Driver(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

impl std::fmt::Debug for Vma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vma")
            .field("range", &self.range)
            .field("flags", &self.flags)
            .field("kind", &self.kind())
            .finish()
    }
}

/// The VMAs of an address space, ordered and non-overlapping.
#[derive(Default)]
pub(crate) struct VmaTree {
    map: BTreeMap<VirtAddr, Vma>,
}

impl VmaTree {
    /// The VMA containing `addr` (`vma_lookup`).
    pub(crate) fn find(&self, addr: VirtAddr) -> Option<&Vma> {
        self.map
            .range(..=addr)
            .next_back()
            .map(|(_, v)| v)
            .filter(|v| v.range.contains(addr))
    }

    /// VMAs intersecting `range`, in order.
    pub(crate) fn overlapping(&self, range: VaRange) -> impl Iterator<Item = &Vma> {
        let first = self
            .map
            .range(..range.start())
            .next_back()
            .filter(|(_, v)| v.end() > range.start())
            .map(|(k, _)| *k)
            .unwrap_or(range.start());
        self.map
            .range(first..range.end())
            .map(|(_, v)| v)
            .filter(move |v| v.range.overlaps(&range))
    }

    /// The first address of `range` not covered by a VMA, if any.
    pub(crate) fn first_hole(&self, range: VaRange) -> Option<VirtAddr> {
        let mut at = range.start();
        for v in self.overlapping(range) {
            if v.start() > at {
                return Some(at);
            }
            at = v.end();
        }
        (at < range.end()).then_some(at)
    }

    /// Splits the VMA strictly containing `addr` (if any) at `addr`.
    pub(crate) fn split_at(&mut self, addr: VirtAddr) {
        let Some(v) = self.find(addr) else { return };
        if v.start() == addr {
            return;
        }
        let mut low = v.clone();
        let mut high = v.clone();
        low.range = VaRange::new(v.start(), addr).expect("split inside VMA");
        high.range = VaRange::new(addr, v.end()).expect("split inside VMA");
        high.pgoff = v.pgoff_of(addr);
        self.map.insert(low.start(), low);
        self.map.insert(high.start(), high);
    }

    /// Splits at both ends of `range` and returns mutable access to the VMAs inside it.
    pub(crate) fn isolate(&mut self, range: VaRange) -> impl Iterator<Item = &mut Vma> {
        self.split_at(range.start());
        self.split_at(range.end());
        self.map
            .range_mut(range.start()..range.end())
            .map(|(_, v)| v)
    }

    /// Removes every part of every VMA inside `range` and returns the removed parts.
    pub(crate) fn remove_range(&mut self, range: VaRange) -> Vec<Vma> {
        let keys: Vec<VirtAddr> = self.isolate(range).map(|v| v.start()).collect();
        keys.iter()
            .map(|k| self.map.remove(k).expect("isolated VMA"))
            .collect()
    }

    /// Inserts a VMA over free space, merging with compatible neighbours.
    pub(crate) fn insert(&mut self, vma: Vma) {
        debug_assert!(self.overlapping(vma.range).next().is_none(), "overlap");
        let start = vma.start();
        self.map.insert(start, vma);
        self.merge_around(start);
    }

    /// Merges the VMA starting at `start` with compatible neighbours.
    pub(crate) fn merge_around(&mut self, start: VirtAddr) {
        let mut key = start;
        if let Some((&pk, prev)) = self.map.range(..key).next_back() {
            if prev.can_merge(&self.map[&key]) {
                let cur = self.map.remove(&key).expect("present");
                let prev = self.map.get_mut(&pk).expect("present");
                prev.range = VaRange::new(prev.start(), cur.end()).expect("merged range");
                prev.flags |= cur.flags & VmFlags::SOFTDIRTY;
                if cur.has_anon_vma() {
                    prev.prepare_anon_vma();
                }
                key = pk;
            }
        }
        let end = self.map[&key].end();
        if let Some(next) = self.map.get(&end) {
            if self.map[&key].can_merge(next) {
                let next = self.map.remove(&end).expect("present");
                let cur = self.map.get_mut(&key).expect("present");
                cur.range = VaRange::new(cur.start(), next.end()).expect("merged range");
                cur.flags |= next.flags & VmFlags::SOFTDIRTY;
                if next.has_anon_vma() {
                    cur.prepare_anon_vma();
                }
            }
        }
    }

    /// Extends the VMA starting at `start` to `end` over free space (`vma_expand`), merging
    /// with the next VMA if compatible.
    pub(crate) fn extend(&mut self, start: VirtAddr, end: VirtAddr) {
        let v = self.map.get_mut(&start).expect("VMA at start");
        debug_assert!(end >= v.end());
        v.range = VaRange::new(start, end).expect("extended range");
        self.merge_around(start);
    }

    /// Sets the flags of every VMA part inside `range` to `update(flags)`, splitting at the
    /// ends and merging afterwards (`vma_modify_flags`). Returns the parts that changed,
    /// with their new flags, before merging.
    pub(crate) fn update_flags(
        &mut self,
        range: VaRange,
        update: impl Fn(VmFlags) -> VmFlags,
    ) -> Vec<Vma> {
        self.update(range, |v| {
            let new = update(v.flags);
            let changed = new != v.flags;
            v.flags = new;
            changed
        })
    }

    /// Applies `update` to every VMA part inside `range` (it returns whether it changed
    /// the part), splitting at the ends and merging afterwards. Returns the parts that
    /// changed, as they were made, before merging.
    pub(crate) fn update(&mut self, range: VaRange, update: impl Fn(&mut Vma) -> bool) -> Vec<Vma> {
        let changed: Vec<Vma> = self
            .isolate(range)
            .filter_map(|v| update(v).then(|| v.clone()))
            .collect();
        let mut starts: Vec<VirtAddr> = self.overlapping(range).map(Vma::start).collect();
        starts.extend(self.find(range.end()).map(Vma::start));
        for s in starts {
            if self.map.contains_key(&s) {
                self.merge_around(s);
            }
        }
        changed
    }

    /// The end of the VMA below `addr` (or zero) and the start of the VMA at or above
    /// `end` (or `limit`): the gap a range lies in.
    pub(crate) fn gap_around(&self, range: VaRange, limit: VirtAddr) -> VaRange {
        let floor = self
            .map
            .range(..range.start())
            .next_back()
            .map_or(VirtAddr::ZERO, |(_, v)| v.end().min(range.start()));
        let ceiling = self
            .map
            .range(range.end()..)
            .next()
            .map_or(limit, |(k, _)| *k);
        VaRange::new(floor, ceiling.max(range.end())).expect("gap contains range")
    }

    /// The highest `len`-byte gap aligned to `align` that ends at or below `top` and starts
    /// at or above `bottom` (the kernel's top-down `vm_unmapped_area`).
    pub(crate) fn find_gap_topdown(
        &self,
        len: u64,
        align: u64,
        bottom: VirtAddr,
        top: VirtAddr,
    ) -> Option<VirtAddr> {
        let mut gap_end = top;
        let fits = |gap_start: VirtAddr, gap_end: VirtAddr| {
            let s = gap_end.checked_sub(len)?.align_down(align);
            (s >= gap_start && s >= bottom).then_some(s)
        };
        for (_, v) in self.map.range(..top).rev() {
            if v.end() < gap_end {
                if let Some(s) = fits(v.end(), gap_end) {
                    return Some(s);
                }
            }
            gap_end = gap_end.min(v.start());
            if gap_end <= bottom {
                return None;
            }
        }
        fits(bottom, gap_end)
    }

    /// All VMAs in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Vma> {
        self.map.values()
    }

    /// Removes and returns every VMA.
    pub(crate) fn take_all(&mut self) -> Vec<Vma> {
        std::mem::take(&mut self.map).into_values().collect()
    }
}
