//! What a folio belongs to, as one word (the kernel's `folio->mapping` pointer).
//!
//! The owners of folios (an address space family's `anon_vma`, a shared-memory or driver
//! file) register themselves once, when they are created, and get a [`MappingId`]: one
//! `u64` that folios store in an atomic word of their metadata. Setting, copying and
//! clearing a folio's mapping (every page a migration or a split touches, every free) are
//! then single loads and stores, with no lock and no shared reference count; only a
//! reverse-map walk, which needs the owner itself, looks the id up here.
//!
//! # Invariants
//!
//! An id is a slot of the table and the slot's generation. A slot is reused only after
//! its owner was dropped ([`MappingHandle`]'s `Drop`), and reuse bumps the generation, so
//! an id left in a folio after its owner died never finds the slot's next owner: the
//! lookup fails, as upgrading the kernel's RCU-protected pointer of a freed `anon_vma`
//! would be refused. The table only grows to the most owners alive at once.
//!
//! The table is one process-wide lock taken briefly (never while another lock is awaited,
//! so it sits at the bottom of the lock order); it is bookkeeping, not synchronization
//! of the model, so it stays outside [`crate::sync`] and the model checker's schedule.

use std::any::Any;
use std::num::NonZeroU64;
use std::sync::{Arc, Weak};

use parking_lot::RwLock;

/// An owner, as the table holds it (a weak reference: a folio never keeps its owner alive).
type Owner = Weak<dyn Any + Send + Sync>;

/// A registered owner of folios, as a folio's metadata stores it (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[doc(alias = "folio->mapping")]
pub struct MappingId(NonZeroU64);

impl MappingId {
    /// The word stored in a folio's metadata.
    pub(crate) fn as_u64(self) -> u64 {
        self.0.get()
    }

    /// The id a stored word holds; `None` for 0 (no mapping).
    pub(crate) fn from_u64(word: u64) -> Option<MappingId> {
        NonZeroU64::new(word).map(MappingId)
    }

    fn new(slot: u32, generation: u32) -> MappingId {
        let word = (u64::from(generation) << 32) | (u64::from(slot) + 1);
        MappingId(NonZeroU64::new(word).expect("the slot part is at least 1"))
    }

    fn slot(self) -> usize {
        ((self.0.get() & u64::from(u32::MAX)) - 1) as usize
    }

    fn generation(self) -> u32 {
        (self.0.get() >> 32) as u32
    }

    /// The owner, if it is still alive.
    pub fn owner(self) -> Option<Arc<dyn Any + Send + Sync>> {
        let table = TABLE.read();
        let slot = table.slots.get(self.slot())?;
        if slot.generation != self.generation() {
            return None;
        }
        slot.owner.as_ref()?.upgrade()
    }
}

/// An owner's registration: its [`id`](Self::id) is valid while the handle lives, and
/// dropping the handle (with the owner) retires it.
#[derive(Debug)]
pub struct MappingHandle(MappingId);

impl MappingHandle {
    /// Registers `owner` (typically the `Weak` of an `Arc::new_cyclic` under construction).
    pub fn register(owner: Owner) -> MappingHandle {
        let mut table = TABLE.write();
        let id = match table.free.pop() {
            Some(slot) => {
                let s = &mut table.slots[slot as usize];
                s.owner = Some(owner);
                MappingId::new(slot, s.generation)
            }
            None => {
                let slot = u32::try_from(table.slots.len())
                    .ok()
                    .filter(|&s| s < u32::MAX)
                    .expect("fewer than 2^32 - 1 folio owners alive at once");
                table.slots.push(Slot {
                    generation: 0,
                    owner: Some(owner),
                });
                MappingId::new(slot, 0)
            }
        };
        MappingHandle(id)
    }

    /// The id folios of this owner store.
    pub fn id(&self) -> MappingId {
        self.0
    }
}

impl Drop for MappingHandle {
    fn drop(&mut self) {
        let mut table = TABLE.write();
        let slot = self.0.slot();
        let s = &mut table.slots[slot];
        s.owner = None;
        s.generation = s.generation.wrapping_add(1);
        table.free.push(slot as u32);
    }
}

struct Slot {
    generation: u32,
    owner: Option<Owner>,
}

struct Table {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

static TABLE: RwLock<Table> = RwLock::new(Table {
    slots: Vec::new(),
    free: Vec::new(),
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_finds_its_owner_until_the_owner_is_gone_and_never_its_successor() {
        let a: Arc<dyn Any + Send + Sync> = Arc::new(1u32);
        let ha = MappingHandle::register(Arc::downgrade(&a));
        let id = ha.id();
        assert!(Arc::ptr_eq(&id.owner().unwrap(), &a));
        assert_eq!(MappingId::from_u64(id.as_u64()), Some(id));
        assert_eq!(MappingId::from_u64(0), None);
        drop(ha);
        assert!(id.owner().is_none(), "a retired id finds nothing");
        // The slot is reused (possibly by another test's owner: the table is shared), but
        // the old id never finds the new owner.
        let b: Arc<dyn Any + Send + Sync> = Arc::new(2u32);
        let hb = MappingHandle::register(Arc::downgrade(&b));
        assert_ne!(hb.id(), id);
        assert!(id.owner().is_none());
        assert!(Arc::ptr_eq(&hb.id().owner().unwrap(), &b));
    }

    #[test]
    fn a_dead_owner_with_a_live_handle_is_not_found() {
        let a: Arc<dyn Any + Send + Sync> = Arc::new(1u32);
        let h = MappingHandle::register(Arc::downgrade(&a));
        drop(a);
        assert!(h.id().owner().is_none());
    }
}
