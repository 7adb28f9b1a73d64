//! What the driver did, counted, with the anchors' names: UVM's fault-buffer and migration
//! counters (`num_replayable_faults`, `num_duplicate_faults`, `num_replays`,
//! `num_buffer_overflows`, `num_pages_in`/`out`), Xe's per-size-class GT statistics
//! (`svm_4K_pagefault_count`, `svm_2M_migrate_count`, ...), drm_gpusvm's range life
//! cycle.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::addr::GpuPageSize;

/// A snapshot of one GPU's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct SvmStats {
    /// GPU faults raised (accesses that missed the GPU page table), duplicates included.
    pub gpu_faults: u64,
    /// Faults the buffer had no room for (the access retries: replayable faults).
    pub buffer_overflows: u64,
    /// Batches serviced.
    pub fault_batches: u64,
    /// Faults dropped from a batch as duplicates of another fault on the same page.
    pub duplicate_faults: u64,
    /// Faults that needed no work: the page was mapped by the time the batch ran
    /// (Xe's "valid" faults).
    pub valid_faults: u64,
    /// Replays issued (one per batch, UVM's batch-flush policy).
    pub replays: u64,
    /// Faults that could not be resolved (no VMA, no permission): cancelled.
    pub fatal_faults: u64,
    /// Pages migrated host to device.
    pub pages_h2d: u64,
    /// Pages migrated device to host (CPU faults, eviction, destroyed ranges, and this
    /// device's pages bounced home on their way to a peer).
    pub pages_d2h: u64,
    /// Pages copied into this device's memory directly from a peer's.
    pub pages_d2d_in: u64,
    /// Pages this device copied directly into a peer's memory (the source copies).
    pub pages_d2d_out: u64,
    /// Pages that left a peer for system memory on their way to this device (the first
    /// half of a bounce: the peer's `pages_d2h`; the second half, when device memory has
    /// room, is this device's `pages_h2d`).
    pub pages_bounced: u64,
    /// Chunks of device memory evicted (UVM's `num_evictions` of root chunks): those that
    /// gave up at least one page.
    pub evictions: u64,
    /// Pages those evictions moved: to system memory (also counted in `pages_d2h`) or to a
    /// peer (also counted in `pages_d2d_out`).
    pub evicted_pages: u64,
    /// Pages a migration to the device could not place (device memory full), left in
    /// system memory and mapped remotely.
    pub vram_alloc_failures: u64,
    /// Pages the GPU maps in system memory (remote mappings made).
    pub remote_mapped_pages: u64,
    /// Pages the GPU maps in its own memory (local mappings made).
    pub local_mapped_pages: u64,
    /// Pages the GPU maps in a peer's memory (peer mappings made).
    pub peer_mapped_pages: u64,
    /// GPU accesses that went to system memory over the link.
    pub remote_accesses: u64,
    /// GPU accesses that went to a peer's memory over the peer link.
    pub peer_accesses: u64,
    /// GPU accesses served from device memory.
    pub local_accesses: u64,
    /// Pages migrated that had not faulted (the prefetcher's, and explicit prefetches).
    pub prefetched_pages: u64,
    /// Access-counter notifications (a block's remote accesses reached the threshold).
    pub access_counter_notifications: u64,
    /// Thrashing detected (a page's events reached the threshold).
    pub thrash_detections: u64,
    /// Of those, pages throttled (left where they were for a lapse).
    pub thrash_throttles: u64,
    /// Of those, pages pinned (left where they were, mapped remotely, for the pin time).
    pub thrash_pins: u64,
    /// Pages a thrashing hint kept from migrating.
    pub thrash_held_pages: u64,
    /// GPU page-table zaps by the notifier (device TLB invalidations).
    pub invalidations: u64,
    /// GPU pages those zaps unmapped.
    pub pages_invalidated: u64,
    /// This device's own MIGRATE events the notifier skipped (the owner filter).
    pub own_migrate_skips: u64,
    /// SVM ranges created.
    pub ranges_created: u64,
    /// SVM ranges destroyed by the garbage collector (unmapped, or partly unmapped).
    pub ranges_destroyed: u64,
    /// `hmm_range_fault` passes run to map pages (drm_gpusvm's `get_pages`).
    pub get_pages: u64,
    /// Faults per size class of the range they hit (4K, 64K, 2M).
    pub faults_by_size: [u64; 3],
    /// Migrations to the device per size class of the range.
    pub migrations_by_size: [u64; 3],
    /// GPU entries made per size class.
    pub binds_by_size: [u64; 3],
}

impl SvmStats {
    /// What happened between `earlier` and `self` (as
    /// [`MmStats::since`](hmm::stats::MmStats::since)).
    pub fn since(&self, earlier: &SvmStats) -> SvmStats {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        SvmStats {
            gpu_faults: d(self.gpu_faults, earlier.gpu_faults),
            buffer_overflows: d(self.buffer_overflows, earlier.buffer_overflows),
            fault_batches: d(self.fault_batches, earlier.fault_batches),
            duplicate_faults: d(self.duplicate_faults, earlier.duplicate_faults),
            valid_faults: d(self.valid_faults, earlier.valid_faults),
            replays: d(self.replays, earlier.replays),
            fatal_faults: d(self.fatal_faults, earlier.fatal_faults),
            pages_h2d: d(self.pages_h2d, earlier.pages_h2d),
            pages_d2h: d(self.pages_d2h, earlier.pages_d2h),
            pages_d2d_in: d(self.pages_d2d_in, earlier.pages_d2d_in),
            pages_d2d_out: d(self.pages_d2d_out, earlier.pages_d2d_out),
            pages_bounced: d(self.pages_bounced, earlier.pages_bounced),
            evictions: d(self.evictions, earlier.evictions),
            evicted_pages: d(self.evicted_pages, earlier.evicted_pages),
            vram_alloc_failures: d(self.vram_alloc_failures, earlier.vram_alloc_failures),
            remote_mapped_pages: d(self.remote_mapped_pages, earlier.remote_mapped_pages),
            local_mapped_pages: d(self.local_mapped_pages, earlier.local_mapped_pages),
            peer_mapped_pages: d(self.peer_mapped_pages, earlier.peer_mapped_pages),
            remote_accesses: d(self.remote_accesses, earlier.remote_accesses),
            peer_accesses: d(self.peer_accesses, earlier.peer_accesses),
            local_accesses: d(self.local_accesses, earlier.local_accesses),
            prefetched_pages: d(self.prefetched_pages, earlier.prefetched_pages),
            access_counter_notifications: d(
                self.access_counter_notifications,
                earlier.access_counter_notifications,
            ),
            thrash_detections: d(self.thrash_detections, earlier.thrash_detections),
            thrash_throttles: d(self.thrash_throttles, earlier.thrash_throttles),
            thrash_pins: d(self.thrash_pins, earlier.thrash_pins),
            thrash_held_pages: d(self.thrash_held_pages, earlier.thrash_held_pages),
            invalidations: d(self.invalidations, earlier.invalidations),
            pages_invalidated: d(self.pages_invalidated, earlier.pages_invalidated),
            own_migrate_skips: d(self.own_migrate_skips, earlier.own_migrate_skips),
            ranges_created: d(self.ranges_created, earlier.ranges_created),
            ranges_destroyed: d(self.ranges_destroyed, earlier.ranges_destroyed),
            get_pages: d(self.get_pages, earlier.get_pages),
            faults_by_size: std::array::from_fn(|i| {
                d(self.faults_by_size[i], earlier.faults_by_size[i])
            }),
            migrations_by_size: std::array::from_fn(|i| {
                d(self.migrations_by_size[i], earlier.migrations_by_size[i])
            }),
            binds_by_size: std::array::from_fn(|i| {
                d(self.binds_by_size[i], earlier.binds_by_size[i])
            }),
        }
    }

    /// Bytes migrated host to device.
    pub fn bytes_h2d(&self) -> u64 {
        self.pages_h2d * hmm::addr::PAGE_SIZE
    }

    /// Bytes migrated device to host.
    pub fn bytes_d2h(&self) -> u64 {
        self.pages_d2h * hmm::addr::PAGE_SIZE
    }
}

/// A few lines a person can read, zeros left out (`nothing counted` when all are).
impl std::fmt::Display for SvmStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let groups: [(&str, Vec<(&str, u64)>); 5] = [
            (
                "faults",
                vec![
                    ("GPU faults", self.gpu_faults),
                    ("batches", self.fault_batches),
                    ("duplicates", self.duplicate_faults),
                    ("already valid", self.valid_faults),
                    ("fatal", self.fatal_faults),
                    ("buffer overflows", self.buffer_overflows),
                    ("replays", self.replays),
                ],
            ),
            (
                "migration",
                vec![
                    ("pages to the device", self.pages_h2d),
                    ("pages to the host", self.pages_d2h),
                    ("pages from peers", self.pages_d2d_in),
                    ("pages to peers", self.pages_d2d_out),
                    ("pages bounced", self.pages_bounced),
                    ("prefetched", self.prefetched_pages),
                    ("evictions", self.evictions),
                    ("evicted pages", self.evicted_pages),
                    ("placement failures", self.vram_alloc_failures),
                ],
            ),
            (
                "mappings",
                vec![
                    ("local pages", self.local_mapped_pages),
                    ("remote pages", self.remote_mapped_pages),
                    ("peer pages", self.peer_mapped_pages),
                    ("local accesses", self.local_accesses),
                    ("remote accesses", self.remote_accesses),
                    ("peer accesses", self.peer_accesses),
                    ("invalidations", self.invalidations),
                    ("pages invalidated", self.pages_invalidated),
                    ("own MIGRATE skipped", self.own_migrate_skips),
                ],
            ),
            (
                "policy",
                vec![
                    (
                        "access-counter notifications",
                        self.access_counter_notifications,
                    ),
                    ("thrashing detections", self.thrash_detections),
                    ("throttles", self.thrash_throttles),
                    ("pins", self.thrash_pins),
                    ("pages held", self.thrash_held_pages),
                ],
            ),
            (
                "ranges",
                vec![
                    ("created", self.ranges_created),
                    ("destroyed", self.ranges_destroyed),
                    ("get_pages passes", self.get_pages),
                ],
            ),
        ];
        let lines: Vec<String> = groups
            .into_iter()
            .filter_map(|(group, parts)| {
                let shown: Vec<String> = parts
                    .into_iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(name, n)| format!("{n} {name}"))
                    .collect();
                (!shown.is_empty()).then(|| format!("{group}: {}", shown.join(", ")))
            })
            .collect();
        if lines.is_empty() {
            f.write_str("nothing counted")
        } else {
            f.write_str(&lines.join("\n"))
        }
    }
}

/// The live counters: relaxed atomics, read with [`Counters::snapshot`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) gpu_faults: AtomicU64,
    pub(crate) buffer_overflows: AtomicU64,
    pub(crate) fault_batches: AtomicU64,
    pub(crate) duplicate_faults: AtomicU64,
    pub(crate) valid_faults: AtomicU64,
    pub(crate) replays: AtomicU64,
    pub(crate) fatal_faults: AtomicU64,
    pub(crate) pages_h2d: AtomicU64,
    pub(crate) pages_d2h: AtomicU64,
    pub(crate) pages_d2d_in: AtomicU64,
    pub(crate) pages_d2d_out: AtomicU64,
    pub(crate) pages_bounced: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) evicted_pages: AtomicU64,
    pub(crate) vram_alloc_failures: AtomicU64,
    pub(crate) remote_mapped_pages: AtomicU64,
    pub(crate) local_mapped_pages: AtomicU64,
    pub(crate) peer_mapped_pages: AtomicU64,
    pub(crate) remote_accesses: AtomicU64,
    pub(crate) peer_accesses: AtomicU64,
    pub(crate) local_accesses: AtomicU64,
    pub(crate) prefetched_pages: AtomicU64,
    pub(crate) access_counter_notifications: AtomicU64,
    pub(crate) thrash_detections: AtomicU64,
    pub(crate) thrash_throttles: AtomicU64,
    pub(crate) thrash_pins: AtomicU64,
    pub(crate) thrash_held_pages: AtomicU64,
    pub(crate) invalidations: AtomicU64,
    pub(crate) pages_invalidated: AtomicU64,
    pub(crate) own_migrate_skips: AtomicU64,
    pub(crate) ranges_created: AtomicU64,
    pub(crate) ranges_destroyed: AtomicU64,
    pub(crate) get_pages: AtomicU64,
    pub(crate) faults_by_size: [AtomicU64; 3],
    pub(crate) migrations_by_size: [AtomicU64; 3],
    pub(crate) binds_by_size: [AtomicU64; 3],
}

/// Adds `n` to a counter.
pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn by_size(c: &[AtomicU64; 3], size: GpuPageSize, n: u64) {
        add(&c[size.index()], n);
    }

    pub(crate) fn snapshot(&self) -> SvmStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let r3 = |c: &[AtomicU64; 3]| [r(&c[0]), r(&c[1]), r(&c[2])];
        SvmStats {
            gpu_faults: r(&self.gpu_faults),
            buffer_overflows: r(&self.buffer_overflows),
            fault_batches: r(&self.fault_batches),
            duplicate_faults: r(&self.duplicate_faults),
            valid_faults: r(&self.valid_faults),
            replays: r(&self.replays),
            fatal_faults: r(&self.fatal_faults),
            pages_h2d: r(&self.pages_h2d),
            pages_d2h: r(&self.pages_d2h),
            pages_d2d_in: r(&self.pages_d2d_in),
            pages_d2d_out: r(&self.pages_d2d_out),
            pages_bounced: r(&self.pages_bounced),
            evictions: r(&self.evictions),
            evicted_pages: r(&self.evicted_pages),
            vram_alloc_failures: r(&self.vram_alloc_failures),
            remote_mapped_pages: r(&self.remote_mapped_pages),
            local_mapped_pages: r(&self.local_mapped_pages),
            peer_mapped_pages: r(&self.peer_mapped_pages),
            remote_accesses: r(&self.remote_accesses),
            peer_accesses: r(&self.peer_accesses),
            local_accesses: r(&self.local_accesses),
            prefetched_pages: r(&self.prefetched_pages),
            access_counter_notifications: r(&self.access_counter_notifications),
            thrash_detections: r(&self.thrash_detections),
            thrash_throttles: r(&self.thrash_throttles),
            thrash_pins: r(&self.thrash_pins),
            thrash_held_pages: r(&self.thrash_held_pages),
            invalidations: r(&self.invalidations),
            pages_invalidated: r(&self.pages_invalidated),
            own_migrate_skips: r(&self.own_migrate_skips),
            ranges_created: r(&self.ranges_created),
            ranges_destroyed: r(&self.ranges_destroyed),
            get_pages: r(&self.get_pages),
            faults_by_size: r3(&self.faults_by_size),
            migrations_by_size: r3(&self.migrations_by_size),
            binds_by_size: r3(&self.binds_by_size),
        }
    }
}

#[cfg(test)]
mod display_tests {
    use super::SvmStats;

    #[test]
    fn counters_read_as_lines_by_group_and_subtract() {
        let zero = SvmStats::default();
        assert_eq!(zero.to_string(), "nothing counted");
        let s = SvmStats {
            gpu_faults: 3,
            fault_batches: 1,
            pages_h2d: 512,
            faults_by_size: [0, 0, 3],
            ..zero
        };
        assert_eq!(
            s.to_string(),
            "faults: 3 GPU faults, 1 batches\nmigration: 512 pages to the device"
        );
        assert_eq!(s.since(&zero), s);
        assert_eq!(s.since(&s), zero);
    }
}
