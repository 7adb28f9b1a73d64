//! Device memory under pressure: 2 MiB chunks, their use, and eviction (UVM's PMM root
//! chunks, `drm_pagemap_evict_to_ram`).
//!
//! Device memory is one pagemap; its chunks are its 2 MiB-aligned pieces. A 2 MiB range
//! takes a whole chunk (one device THP), smaller ranges take pages, which the pagemap's
//! allocator packs into partly used chunks first. The [`ChunkTracker`] counts each
//! chunk's pages in use (allocation, and the pagemap's `folio_free`), when it was
//! allocated and used, and the migrations filling it right now ("busy").
//!
//! When a migration to the device needs room, the driver evicts chunks chosen by the
//! eviction policy among those that hold pages and are not busy: every in-use page of the
//! chunk is collected by frame number (`migrate_device_range`, no mmap lock: the reverse
//! map finds every mapping, each invalidated with CLEAR), copied to system memory and
//! remapped there. A page locked by someone else is skipped (the eviction is partial);
//! a chunk that gave nothing is not tried again in the same pass. What cannot be made room
//! for stays in system memory and is mapped remotely: nothing is lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use hmm::addr::PMD_NR;
use hmm::sync::Mutex;

use crate::policy::eviction::ChunkInfo;

/// What is known of one chunk.
#[derive(Debug, Clone, Copy, Default)]
struct ChunkState {
    pages_in_use: u32,
    allocated_at: u64,
    last_used: u64,
    uses: u64,
    busy: u32,
}

/// The chunks of one device's memory.
#[derive(Debug)]
pub(crate) struct ChunkTracker {
    /// The first frame number of device memory (set once the pagemap exists).
    base: OnceLock<u64>,
    chunks: Mutex<Vec<ChunkState>>,
    /// The logical clock of allocations and uses.
    tick: AtomicU64,
}

impl ChunkTracker {
    pub(crate) fn new(nchunks: usize) -> ChunkTracker {
        ChunkTracker {
            base: OnceLock::new(),
            chunks: Mutex::new(vec![ChunkState::default(); nchunks]),
            tick: AtomicU64::new(0),
        }
    }

    pub(crate) fn set_base(&self, base: u64) {
        self.base.set(base).expect("the base is set once");
    }

    /// The chunk of frame `nr`, if it is device memory of this tracker.
    fn chunk_of(&self, nr: u64) -> Option<usize> {
        let base = *self.base.get()?;
        // CAST: a chunk index is below the number of chunks, a usize.
        nr.checked_sub(base).map(|i| (i / PMD_NR) as usize)
    }

    fn now(&self) -> u64 {
        self.tick.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// `npages` from frame `nr` were allocated for a migration: in use and busy.
    pub(crate) fn allocated(&self, nr: u64, npages: u64) {
        let Some(c) = self.chunk_of(nr) else { return };
        let now = self.now();
        let mut chunks = self.chunks.lock();
        let s = &mut chunks[c];
        if s.pages_in_use == 0 {
            s.allocated_at = now;
            s.uses = 0;
        }
        // CAST: at most 512 pages a chunk.
        s.pages_in_use += npages as u32;
        s.last_used = now;
        s.uses += 1;
        s.busy += 1;
    }

    /// The migration that allocated from the chunk of frame `nr` finished.
    pub(crate) fn done(&self, nr: u64) {
        if let Some(c) = self.chunk_of(nr) {
            let mut chunks = self.chunks.lock();
            chunks[c].busy = chunks[c].busy.saturating_sub(1);
        }
    }

    /// `npages` from frame `nr` were freed (`folio_free`).
    pub(crate) fn freed(&self, nr: u64, npages: u64) {
        if let Some(c) = self.chunk_of(nr) {
            let mut chunks = self.chunks.lock();
            // CAST: at most 512 pages a chunk.
            chunks[c].pages_in_use = chunks[c].pages_in_use.saturating_sub(npages as u32);
        }
    }

    /// The GPU mapped pages of the chunk of frame `nr`.
    pub(crate) fn used(&self, nr: u64) {
        let Some(c) = self.chunk_of(nr) else { return };
        let now = self.now();
        let mut chunks = self.chunks.lock();
        chunks[c].last_used = now;
        chunks[c].uses += 1;
    }

    /// The chunks that hold pages and are not being filled, except those in `skip`.
    pub(crate) fn candidates(&self, skip: &[u32]) -> Vec<ChunkInfo> {
        self.chunks
            .lock()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.pages_in_use > 0 && s.busy == 0)
            .map(|(i, s)| ChunkInfo {
                // CAST: chunk indexes fit u32 (a pagemap is at most 2^17 chunks).
                index: i as u32,
                allocated_at: s.allocated_at,
                last_used: s.last_used,
                uses: s.uses,
                pages_in_use: s.pages_in_use,
            })
            .filter(|c| !skip.contains(&c.index))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_count_pages_and_busy_migrations() {
        let t = ChunkTracker::new(4);
        assert!(t.candidates(&[]).is_empty());
        t.set_base(1 << 26);
        let f = |chunk: u64, page: u64| (1 << 26) + chunk * PMD_NR + page;
        t.allocated(f(1, 0), 1);
        t.allocated(f(1, 1), 1);
        t.allocated(f(3, 0), PMD_NR);
        assert!(t.candidates(&[]).is_empty(), "busy while being filled");
        t.done(f(1, 0));
        t.done(f(1, 1));
        t.done(f(3, 0));
        let c = t.candidates(&[]);
        assert_eq!(
            c.iter()
                .map(|c| (c.index, c.pages_in_use))
                .collect::<Vec<_>>(),
            [(1, 2), (3, 512)]
        );
        assert!(c[0].allocated_at < c[1].allocated_at);
        t.used(f(1, 0));
        assert!(t.candidates(&[])[0].last_used > t.candidates(&[])[1].last_used);
        assert_eq!(t.candidates(&[1]).len(), 1);
        t.freed(f(3, 0), PMD_NR);
        assert_eq!(t.candidates(&[]).len(), 1);
        t.freed(0, 1); // not device memory: ignored
    }
}
