//! The fault side (`handle_userfault`): which faults go to the handler, queueing the
//! message, and the wait outside the mmap lock.

use std::sync::Arc;

use crate::addr::{VaRange, VirtAddr};
use crate::pgtable::{Pte, Slot, WalkMode};
use crate::prot::VmFlags;

use super::super::error::FaultError;
use super::super::fault::{FaultFlags, Faulted};
use super::super::vma::{Backing, Vma};
use super::super::{Mm, MmState};
use super::{PageFaultFlags, PendingFault, UffdCtx, UffdFeatures};

/// Whether a fault at `addr` of `vma` must go to `vma`'s userfaultfd, and as what: a
/// missing page (`userfaultfd_missing` where the kernel would allocate or map one), or a
/// write to a write-protected entry (`userfaultfd_pte_wp`). Looks under the page-table
/// lock.
pub(crate) fn must_fault(
    st: &MmState,
    vma: &Vma,
    addr: VirtAddr,
    flags: FaultFlags,
) -> Option<PageFaultFlags> {
    let vflags = vma.flags();
    let write = flags.contains(FaultFlags::WRITE);
    let mut c = st.pt.cursor(VaRange::page_of(addr), WalkMode::Lookup);
    let entry = match c.current()? {
        Slot::Hole(_) => Pte::None,
        Slot::Pte(p) => p.get(),
        Slot::Pmd(p) | Slot::Pud(p) => p.get(),
    };
    drop(c);
    let wflag = if write {
        PageFaultFlags::WRITE
    } else {
        PageFaultFlags::empty()
    };
    match entry {
        Pte::None if vflags.contains(VmFlags::UFFD_MISSING) => {
            let cached = match vma.backing() {
                Backing::Shmem(obj) => obj.has_page(vma.pgoff_of(addr)),
                _ => false,
            };
            (!cached).then_some(wflag)
        }
        Pte::Present { .. }
            if write
                && !flags.contains(FaultFlags::UNSHARE)
                && vflags.contains(VmFlags::UFFD_WP)
                && entry.is_uffd_wp() =>
        {
            Some(wflag | PageFaultFlags::WP)
        }
        _ => None,
    }
}

/// `handle_userfault`: queue the fault for the handler and tell the caller to drop the
/// mmap lock and wait ([`Faulted::Retry`]). A caller that may not drop the lock gets
/// SIGBUS. A released userfaultfd resolves nothing: the caller retries, and finds the
/// VMA unregistered once the release has run.
pub(crate) fn handle_userfault(
    mm: &Mm,
    st: &MmState,
    vma: &Vma,
    ctx: &Arc<UffdCtx>,
    addr: VirtAddr,
    reason: PageFaultFlags,
    flags: FaultFlags,
) -> Result<Faulted, FaultError> {
    if !flags.contains(FaultFlags::ALLOW_RETRY) {
        return Err(FaultError::Bus { addr });
    }
    if ctx.is_released() || mm.fatal_signal_pending() {
        return Ok(Faulted::Retry(UffdWait::none()));
    }
    let page = addr.page_down();
    let id = {
        let mut q = ctx.queue.lock();
        let id = q.next_id;
        q.next_id += 1;
        let address = if ctx.features.contains(UffdFeatures::EXACT_ADDRESS) {
            addr
        } else {
            page
        };
        q.faults.push(PendingFault {
            id,
            page,
            address,
            flags: reason,
            read: false,
        });
        ctx.cond.notify_all();
        id
    };
    mm.counters().userfault();
    // userfaultfd_must_wait: a fill that ran before the message was queued is seen here;
    // one that runs after wakes the queued waiter.
    if must_fault(st, vma, addr, flags).is_none() {
        ctx.queue.lock().faults.retain(|f| f.id != id);
        return Ok(Faulted::Done);
    }
    Ok(Faulted::Retry(UffdWait {
        ctx: Some((ctx.clone(), id)),
    }))
}

/// A fault waiting for its userfaultfd, to be waited on once the mmap lock is dropped.
#[must_use = "the caller must drop the mmap lock and wait"]
pub(crate) struct UffdWait {
    ctx: Option<(Arc<UffdCtx>, u64)>,
}

impl UffdWait {
    /// Nothing to wait for: the caller just retries.
    pub(crate) fn none() -> UffdWait {
        UffdWait { ctx: None }
    }

    /// Sleeps until the fault is woken, the userfaultfd released, or the process killed
    /// (`TASK_KILLABLE`). The caller holds no lock.
    pub(crate) fn wait(self, mm: &Mm) {
        let Some((ctx, id)) = self.ctx else { return };
        let mut q = ctx.queue.lock();
        while q.faults.iter().any(|f| f.id == id)
            && !ctx.is_released()
            && !mm.fatal_signal_pending()
        {
            ctx.cond.wait(&mut q);
        }
        q.faults.retain(|f| f.id != id);
    }
}

impl std::fmt::Debug for UffdWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UffdWait")
            .field("id", &self.ctx.as_ref().map(|(_, id)| *id))
            .finish()
    }
}
