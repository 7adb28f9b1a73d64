//! The non-cooperative events: fork, mremap, `MADV_DONTNEED`/`MADV_REMOVE` and munmap
//! reported to a handler that asked for them (`userfaultfd_event_wait_completion` and its
//! callers).
//!
//! The thread that changed the address space queues the event once it no longer holds the
//! mmap lock and waits until the handler has read it (or the userfaultfd is closed, or
//! the process killed). Meanwhile fills, write-protects and moves of that userfaultfd
//! fail with `Again` (`mmap_changing`), so the handler never resolves a fault against a
//! layout it has not yet been told about.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::addr::VaRange;

use super::super::vma::Vma;
use super::super::Mm;
use super::{UffdCtx, UffdFeatures, UffdMsg, Userfaultfd};

/// A non-cooperative event collected and not yet read: `mmap_changing` counts it from
/// the moment it is collected, under the mmap lock (as the kernel increments it in
/// `dup_userfaultfd`, `mremap_userfaultfd_prep`, `userfaultfd_unmap_prep` and
/// `userfaultfd_remove`), until it is read or dropped unsent.
pub(crate) struct Changing(Arc<UffdCtx>);

impl Changing {
    fn new(ctx: Arc<UffdCtx>) -> Changing {
        ctx.mmap_changing.fetch_add(1, Ordering::AcqRel);
        Changing(ctx)
    }

    /// Queues `msg` and waits until it is read (`userfaultfd_event_wait_completion`).
    /// The caller holds no mmap lock.
    fn deliver(self, msg: UffdMsg) {
        let ctx = &self.0;
        if ctx.is_released() {
            return;
        }
        let mut q = ctx.queue.lock();
        let id = q.next_id;
        q.next_id += 1;
        q.events.push_back((id, msg));
        ctx.cond.notify_all();
        let killed = || {
            ctx.mm
                .upgrade()
                .map_or(true, |mm| mm.fatal_signal_pending())
        };
        while q.events.iter().any(|(i, _)| *i == id) && !ctx.is_released() && !killed() {
            ctx.cond.wait(&mut q);
        }
        // Not read (closed or killed): the event goes, outside the lock (a fork's child
        // userfaultfd closes as it drops).
        let unread = q
            .events
            .iter()
            .position(|(i, _)| *i == id)
            .and_then(|i| q.events.remove(i));
        drop(q);
        drop(unread);
    }
}

impl Drop for Changing {
    fn drop(&mut self) {
        self.0.mmap_changing.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The userfaultfds of the VMAs in `range` that asked for `feature`, each once.
fn ctxs_with<'v>(vmas: impl Iterator<Item = &'v Vma>, feature: UffdFeatures) -> Vec<Arc<UffdCtx>> {
    let mut out: Vec<Arc<UffdCtx>> = Vec::new();
    for c in vmas.filter_map(Vma::uffd) {
        if c.features.contains(feature) && !out.iter().any(|o| Arc::ptr_eq(o, c)) {
            out.push(c.clone());
        }
    }
    out
}

/// `userfaultfd_remove`: before `MADV_DONTNEED` or `MADV_FREE` drops `range`, each
/// userfaultfd of a VMA in it that asked reads a [`UffdMsg::Remove`] for that VMA's part.
/// The caller checked the range and holds no lock; this takes and drops the mmap lock for
/// reading, and the caller takes it again.
pub(crate) fn userfaultfd_remove(mm: &Mm, range: VaRange) {
    let events: Vec<(Changing, UffdMsg)> = {
        let guard = mm.mmap_read();
        guard
            .state()
            .vmas
            .overlapping(range)
            .filter_map(|v| {
                let ctx = v.uffd()?;
                let part = v.range().intersect(&range)?;
                ctx.features.contains(UffdFeatures::EVENT_REMOVE).then(|| {
                    (
                        Changing::new(ctx.clone()),
                        UffdMsg::Remove {
                            start: part.start(),
                            end: part.end(),
                        },
                    )
                })
            })
            .collect()
    };
    for (c, msg) in events {
        c.deliver(msg);
    }
}

/// Events an operation under the mmap lock for writing collects, to send once the lock is
/// dropped (the kernel's `uf` list of `userfaultfd_unmap_prep` and the remap context of
/// `mremap_userfaultfd_prep`).
#[derive(Default)]
#[must_use = "send them once the mmap lock is dropped"]
pub(crate) struct UffdEvents {
    events: Vec<(Changing, UffdMsg)>,
}

impl UffdEvents {
    /// `userfaultfd_unmap_prep`: the userfaultfds of `vmas` that asked are told that
    /// `range` went.
    pub(crate) fn unmap<'v>(&mut self, vmas: impl Iterator<Item = &'v Vma>, range: VaRange) {
        for c in ctxs_with(vmas, UffdFeatures::EVENT_UNMAP) {
            self.events.push((
                Changing::new(c),
                UffdMsg::Unmap {
                    start: range.start(),
                    end: range.end(),
                },
            ));
        }
    }

    /// `mremap_userfaultfd_complete`: `ctx` is told that `old` moved to `to`.
    pub(crate) fn remap(&mut self, ctx: Arc<UffdCtx>, old: VaRange, to: crate::addr::VirtAddr) {
        self.events.push((
            Changing::new(ctx),
            UffdMsg::Remap {
                from: old.start(),
                to,
                len: old.npages() * crate::addr::PAGE_SIZE,
            },
        ));
    }

    /// Sends them, each waiting to be read. The caller holds no mmap lock.
    pub(crate) fn send(self) {
        for (c, msg) in self.events {
            c.deliver(msg);
        }
    }
}

/// The userfaultfds a fork made for the child (`dup_userfaultfd`): one per parent
/// userfaultfd that asked for [`UffdFeatures::EVENT_FORK`].
#[derive(Default)]
pub(crate) struct ForkCtxs {
    /// The parent's userfaultfd (counted as changing from now) and the child's.
    pairs: Vec<(Changing, Arc<UffdCtx>)>,
}

impl ForkCtxs {
    /// The child's copy of `vma`'s registration: the child's userfaultfd for the
    /// parent's, made on first use, or none (the flags go too) when the parent's did not
    /// ask for fork events.
    pub(crate) fn child_vma(&mut self, child: &Arc<Mm>, vma: &Vma) -> Vma {
        let mut v = vma.clone();
        let Some(parent) = vma.uffd() else { return v };
        if parent.features.contains(UffdFeatures::EVENT_FORK) && !parent.is_released() {
            let c = match self.pairs.iter().find(|(p, _)| Arc::ptr_eq(&p.0, parent)) {
                Some((_, c)) => c.clone(),
                None => {
                    let c = UffdCtx::new(child, parent.features);
                    self.pairs.push((Changing::new(parent.clone()), c.clone()));
                    c
                }
            };
            v.set_uffd(vma.flags(), Some(c));
        } else {
            v.set_uffd(vma.flags() - crate::prot::VmFlags::UFFD, None);
        }
        v
    }

    /// `dup_userfaultfd_complete`: each parent userfaultfd reads a [`UffdMsg::Fork`]
    /// carrying the child's. The caller holds no mmap lock.
    pub(crate) fn send(self) {
        for (parent, child) in self.pairs {
            parent.deliver(UffdMsg::Fork {
                child: Userfaultfd { ctx: child },
            });
        }
    }
}

/// `mremap_userfaultfd_prep`: the registration of a VMA `mremap` moves stays with it
/// only if its userfaultfd asked for remap events; the userfaultfd to tell, if any.
pub(crate) fn remap_prep(vma: &mut Vma) -> Option<Arc<UffdCtx>> {
    let ctx = vma.uffd()?.clone();
    if ctx.features.contains(UffdFeatures::EVENT_REMAP) && !ctx.is_released() {
        Some(ctx)
    } else {
        vma.set_uffd(vma.flags() - crate::prot::VmFlags::UFFD, None);
        None
    }
}
