//! The stressed memory: slots of pages, each page carrying a known pattern and version.
//!
//! Page `i` at version `v` holds `i` in its first word, `v` in its second, and a pattern
//! derived from both in the rest, so a page that was lost, torn, stale or moved to the
//! wrong address is told apart from the right one by its bytes alone. The harness keeps
//! the version each page must have ([`Slot::pages`]); every access that writes bumps it
//! under the page's lock, every access that reads compares all 4096 bytes with it.
//!
//! Locks, in order: the world (held for reading by every operation, for writing by the
//! checker), then a slot (for reading by accesses and migrations, for writing by the churn
//! that moves, unmaps or re-protects it), then pages of that slot in ascending order.

use hmm::addr::{VirtAddr, PAGE_SIZE};
use parking_lot::{Mutex, RwLock};

/// Pages per slot: the unit of munmap, mremap, mprotect and fork churn.
pub(crate) const SLOT_PAGES: u64 = 16;
pub(crate) const SLOT_BYTES: u64 = SLOT_PAGES * PAGE_SIZE;

/// One slot: its current address and the versions of its pages.
pub(crate) struct Slot {
    pub(crate) base: RwLock<VirtAddr>,
    pub(crate) pages: Vec<Mutex<u64>>,
}

/// All slots, and the global index of each slot's first page.
pub(crate) struct Region {
    pub(crate) slots: Vec<Slot>,
}

pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 4096 bytes of page `index` at `version`.
pub(crate) fn content(index: u64, version: u64) -> Vec<u8> {
    let seed = mix(index ^ version.rotate_left(32));
    let mut page = Vec::with_capacity(PAGE_SIZE as usize);
    page.extend_from_slice(&index.to_le_bytes());
    page.extend_from_slice(&version.to_le_bytes());
    for k in 2..PAGE_SIZE / 8 {
        page.extend_from_slice(&mix(seed.wrapping_add(k)).to_le_bytes());
    }
    page
}

/// Bytes of `got` that differ from page `index` at `version`.
pub(crate) fn wrong_bytes(got: &[u8], index: u64, version: u64) -> u64 {
    let want = content(index, version);
    got.iter().zip(&want).filter(|(a, b)| a != b).count() as u64
}

impl Region {
    pub(crate) fn new(nslots: u64, bases: impl IntoIterator<Item = VirtAddr>) -> Region {
        Region {
            slots: bases
                .into_iter()
                .take(nslots as usize)
                .map(|b| Slot {
                    base: RwLock::new(b),
                    pages: (0..SLOT_PAGES).map(|_| Mutex::new(0)).collect(),
                })
                .collect(),
        }
    }

    /// The global index of page `k` of slot `s`.
    pub(crate) fn index(s: usize, k: u64) -> u64 {
        s as u64 * SLOT_PAGES + k
    }
}

/// The address of page `k` of a slot at `base`.
pub(crate) fn page_va(base: VirtAddr, k: u64) -> VirtAddr {
    base.checked_add(k * PAGE_SIZE).expect("inside the slot")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_differ_by_index_and_version() {
        let a = content(3, 7);
        assert_eq!(a.len(), PAGE_SIZE as usize);
        assert_eq!(wrong_bytes(&a, 3, 7), 0);
        assert!(wrong_bytes(&a, 3, 8) > 4000);
        assert!(wrong_bytes(&a, 4, 7) > 4000);
    }
}
