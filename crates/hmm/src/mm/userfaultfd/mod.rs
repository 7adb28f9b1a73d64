//! userfaultfd: page faults handled by a thread of the process (the kernel's
//! `fs/userfaultfd.c` and `mm/userfaultfd.c`).
//!
//! A [`Userfaultfd`] is the file `userfaultfd(2)` returns, already past `UFFDIO_API`. Its
//! owner registers ranges of the address space ([`Userfaultfd::register`]) in two modes:
//!
//! * **missing** (`UFFDIO_REGISTER_MODE_MISSING`): a fault on a page with nothing behind
//!   it (no entry, and for shared memory no page in the object) is not resolved by the
//!   kernel but reported to the handler, which supplies the page with
//!   [`copy`](Userfaultfd::copy) or [`zeropage`](Userfaultfd::zeropage);
//! * **write-protect** (`UFFDIO_REGISTER_MODE_WP`): a write to a present page whose entry
//!   carries the uffd-wp bit ([`writeprotect`](Userfaultfd::writeprotect) sets it) is
//!   reported, and the handler clears the bit to let it go on.
//!
//! [`move_pages`](Userfaultfd::move_pages) moves anonymous pages from one place to
//! another (`UFFDIO_MOVE`). The non-cooperative events (fork, mremap, `MADV_DONTNEED`,
//! munmap) are reported when the features that ask for them are set.
//!
//! # The fault protocol (`handle_userfault`)
//!
//! Under the mmap lock for reading the fault path decides that the handler must resolve
//! the fault, queues a message, checks the entry again under its page-table lock (a
//! `UFFDIO_COPY` may have filled it since), and returns `VM_FAULT_RETRY`: the caller drops
//! the mmap lock and sleeps until a `copy`, `zeropage`, `writeprotect` or `wake` of a range
//! holding the address wakes it, the file is closed, or the process gets a fatal signal.
//! Then it takes the lock again and retries the fault. The message is queued before the
//! second check and every wake removes the waiters of its range under the queue's lock,
//! so a wake is never lost between the check and the sleep.
//!
//! Only callers that can drop the mmap lock may wait (`FAULT_FLAG_ALLOW_RETRY`): the
//! CPU's own accesses, GUP (which takes the lock itself),
//! [`Mm::fixup_user_fault`](crate::mm::Mm::fixup_user_fault) and
//! `hmm_range_fault_unlocked_timeout`. Every other fault on such a page fails with SIGBUS,
//! as the kernel's `handle_userfault` answers a fault that may not retry; so the locked
//! `hmm_range_fault` returns `Fault` (`-EFAULT`) there.
//!
//! # Locks
//!
//! The queue's lock is the innermost lock: nothing else is taken under it. A faulting
//! thread sleeps on it with no other lock held. A thread raising a non-cooperative event
//! waits for the handler to read it with no mmap lock held, as the kernel's
//! `userfaultfd_event_wait_completion` does.
//!
//! # What differs from Linux
//!
//! Write-protect mode needs anonymous memory (the kernel also allows shmem and hugetlb,
//! with PTE markers that keep the bit on an empty entry; the model has no markers), and
//! hugetlb VMAs cannot be registered. `MINOR` mode and `UFFDIO_CONTINUE`, `UFFDIO_POISON`
//! and the asynchronous write-protect mode are not modelled.

mod event;
mod fault;
mod fill;
mod register;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bitflags::bitflags;
use thiserror::Error;

use crate::addr::{VaRange, VirtAddr};

use super::Mm;

pub(crate) use event::{remap_prep, userfaultfd_remove, ForkCtxs, UffdEvents};
pub(crate) use fault::{handle_userfault, must_fault, UffdWait};
pub use fill::{CopyMode, MoveMode};
pub use register::{RegisterMode, UffdIoctls};

bitflags! {
    /// Features asked for at `UFFDIO_API` (`UFFD_FEATURE_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct UffdFeatures: u64 {
        /// Report forks: the child's registered VMAs get a userfaultfd of their own, handed
        /// over in a [`UffdMsg::Fork`] (`UFFD_FEATURE_EVENT_FORK`).
        #[doc(alias = "UFFD_FEATURE_EVENT_FORK")]
        const EVENT_FORK = 1 << 1;
        /// Report moves by `mremap`; without it a moved VMA leaves the userfaultfd
        /// (`UFFD_FEATURE_EVENT_REMAP`).
        #[doc(alias = "UFFD_FEATURE_EVENT_REMAP")]
        const EVENT_REMAP = 1 << 2;
        /// Report `MADV_DONTNEED` and `MADV_REMOVE` (`UFFD_FEATURE_EVENT_REMOVE`).
        #[doc(alias = "UFFD_FEATURE_EVENT_REMOVE")]
        const EVENT_REMOVE = 1 << 3;
        /// Report `munmap` (`UFFD_FEATURE_EVENT_UNMAP`).
        #[doc(alias = "UFFD_FEATURE_EVENT_UNMAP")]
        const EVENT_UNMAP = 1 << 6;
        /// Report the faulting address exactly rather than its page
        /// (`UFFD_FEATURE_EXACT_ADDRESS`).
        #[doc(alias = "UFFD_FEATURE_EXACT_ADDRESS")]
        const EXACT_ADDRESS = 1 << 11;
    }
}

bitflags! {
    /// What kind of fault a [`UffdMsg::PageFault`] reports (`UFFD_PAGEFAULT_FLAG_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct PageFaultFlags: u64 {
        /// A write access (`UFFD_PAGEFAULT_FLAG_WRITE`).
        #[doc(alias = "UFFD_PAGEFAULT_FLAG_WRITE")]
        const WRITE = 1 << 0;
        /// A write to a write-protected page (`UFFD_PAGEFAULT_FLAG_WP`).
        #[doc(alias = "UFFD_PAGEFAULT_FLAG_WP")]
        const WP = 1 << 1;
    }
}

/// A message read from a userfaultfd (`struct uffd_msg`).
#[derive(Debug)]
pub enum UffdMsg {
    /// A thread faulted on a registered page and waits (`UFFD_EVENT_PAGEFAULT`).
    PageFault {
        /// The page (or, with [`UffdFeatures::EXACT_ADDRESS`], the exact address).
        address: VirtAddr,
        /// Write, write-protect.
        flags: PageFaultFlags,
    },
    /// The process forked; the child's registered VMAs belong to `child`
    /// (`UFFD_EVENT_FORK`).
    Fork {
        /// The child's userfaultfd.
        child: Userfaultfd,
    },
    /// `mremap` moved `[from, from + len)` to `to` (`UFFD_EVENT_REMAP`).
    Remap {
        /// The old start.
        from: VirtAddr,
        /// The new start.
        to: VirtAddr,
        /// The old length.
        len: u64,
    },
    /// `MADV_DONTNEED` or `MADV_REMOVE` is about to drop `[start, end)`
    /// (`UFFD_EVENT_REMOVE`).
    Remove {
        /// First byte.
        start: VirtAddr,
        /// End (exclusive).
        end: VirtAddr,
    },
    /// `munmap` removed `[start, end)` (`UFFD_EVENT_UNMAP`).
    Unmap {
        /// First byte.
        start: VirtAddr,
        /// End (exclusive).
        end: VirtAddr,
    },
}

/// Errors of userfaultfd operations (the kernel's errno values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum UffdError {
    /// `-EINVAL`: a malformed argument, or memory that cannot be registered.
    #[error("invalid argument (EINVAL): {what}")]
    Inval {
        /// What was wrong.
        what: &'static str,
    },
    /// `-EPERM`: a shared mapping the process may not write.
    #[error("operation not permitted (EPERM): {what}")]
    Perm {
        /// Why.
        what: &'static str,
    },
    /// `-EBUSY`: another userfaultfd owns the range, or a page cannot be moved.
    #[error("busy (EBUSY): {what}")]
    Busy {
        /// What.
        what: &'static str,
    },
    /// `-ENOENT`: the range is not registered with this userfaultfd, or (for a move) a
    /// source page is missing.
    #[error("no such range (ENOENT): {what}")]
    NoEnt {
        /// What.
        what: &'static str,
    },
    /// `-EEXIST`: the first destination page is already populated.
    #[error("a page exists at {addr} (EEXIST)")]
    Exists {
        /// The populated page.
        addr: VirtAddr,
    },
    /// `-EAGAIN`: a non-cooperative event is in flight (`done` is 0), or the operation
    /// stopped part way (`done` bytes were done; the kernel reports them in the ioctl's
    /// `copy`/`zeropage`/`move` field).
    #[error("try again (EAGAIN) after {done} bytes")]
    Again {
        /// Bytes done before it stopped.
        done: u64,
    },
    /// `-ENOMEM`: no memory for a page.
    #[error("out of memory (ENOMEM)")]
    NoMem,
    /// `-EFAULT`: a page that cannot be moved (device-private memory).
    #[error("bad address {addr} (EFAULT)")]
    Fault {
        /// The page.
        addr: VirtAddr,
    },
    /// `-ESRCH`: the address space is gone.
    #[error("the address space is gone (ESRCH)")]
    Srch,
}

impl UffdError {
    /// The kernel's errno for this error (positive).
    pub fn errno(&self) -> i32 {
        match self {
            UffdError::Inval { .. } => libc::EINVAL,
            UffdError::Perm { .. } => libc::EPERM,
            UffdError::Busy { .. } => libc::EBUSY,
            UffdError::NoEnt { .. } => libc::ENOENT,
            UffdError::Exists { .. } => libc::EEXIST,
            UffdError::Again { .. } => libc::EAGAIN,
            UffdError::NoMem => libc::ENOMEM,
            UffdError::Fault { .. } => libc::EFAULT,
            UffdError::Srch => libc::ESRCH,
        }
    }

    /// The error an operation that did `done` bytes before failing with `self` returns:
    /// `Again` with the count if it did any, else `self` (`mfill_atomic` returns the
    /// count, and the ioctl `-EAGAIN` for a short one).
    fn after(self, done: u64) -> UffdError {
        if done > 0 {
            UffdError::Again { done }
        } else {
            self
        }
    }
}

/// A userfaultfd: the file `userfaultfd(2)` returns, after `UFFDIO_API`. Dropping it
/// closes it (`userfaultfd_release`): every registration goes, write-protected entries
/// lose the bit, and every thread waiting for it retries its fault without it.
///
/// ```
/// use std::sync::Arc;
/// use hmm::addr::PAGE_SIZE;
/// use hmm::mm::userfaultfd::{CopyMode, RegisterMode, UffdFeatures, UffdMsg, Userfaultfd};
/// use hmm::mm::{MapFlags, Mm, Prot};
/// use hmm::phys::{PhysConfig, PhysMem};
///
/// let mm = Mm::new(PhysMem::new(PhysConfig::with_size(16 << 20))?);
/// let a = mm.mmap(None, 4 * PAGE_SIZE, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)?;
/// let uffd = Userfaultfd::new(&mm, UffdFeatures::empty())?;
/// uffd.register(a, 4 * PAGE_SIZE, RegisterMode::MISSING)?;
/// std::thread::scope(|s| {
///     // The handler: each missing page is supplied as a page of 0xab.
///     s.spawn(|| {
///         for _ in 0..4 {
///             let UffdMsg::PageFault { address, .. } = uffd.read() else { panic!() };
///             uffd.copy(address, &[0xab; PAGE_SIZE as usize], CopyMode::empty()).unwrap();
///         }
///     });
///     let mut buf = vec![0u8; 4 * PAGE_SIZE as usize];
///     mm.read(a, &mut buf).unwrap(); // four faults, each waits for the handler
///     assert!(buf.iter().all(|&b| b == 0xab));
/// });
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[doc(alias = "userfaultfd_ctx")]
pub struct Userfaultfd {
    ctx: Arc<UffdCtx>,
}

/// The state of a userfaultfd (`struct userfaultfd_ctx`); registered VMAs point to it.
pub(crate) struct UffdCtx {
    mm: Weak<Mm>,
    features: UffdFeatures,
    queue: parking_lot::Mutex<Queue>,
    /// Signalled when a message is queued, read or woken, and on release or a kill.
    cond: parking_lot::Condvar,
    released: AtomicBool,
    /// Non-cooperative events not yet read: fills and moves get `EAGAIN` meanwhile
    /// (`ctx->mmap_changing`).
    mmap_changing: AtomicU32,
}

/// Messages not yet read, and faults not yet woken.
#[derive(Default)]
struct Queue {
    next_id: u64,
    /// Faulting threads waiting, oldest first (`fault_pending_wqh` while unread,
    /// `fault_wqh` once read).
    faults: Vec<PendingFault>,
    /// Non-cooperative events not yet read (`event_wqh`).
    events: VecDeque<(u64, UffdMsg)>,
}

struct PendingFault {
    id: u64,
    page: VirtAddr,
    address: VirtAddr,
    flags: PageFaultFlags,
    read: bool,
}

impl Userfaultfd {
    /// Opens a userfaultfd on `mm` with `features` (`userfaultfd(2)` and `UFFDIO_API`).
    ///
    /// Errors: `Inval` for a feature the model does not have.
    #[doc(alias = "userfaultfd")]
    #[doc(alias = "UFFDIO_API")]
    pub fn new(mm: &Arc<Mm>, features: UffdFeatures) -> Result<Userfaultfd, UffdError> {
        Ok(Userfaultfd {
            ctx: UffdCtx::new(mm, features),
        })
    }

    /// The features it was opened with.
    pub fn features(&self) -> UffdFeatures {
        self.ctx.features
    }

    /// Reads the next message, waiting for one (a blocking `read(2)`). Page faults come
    /// before events, each in the order they happened.
    pub fn read(&self) -> UffdMsg {
        self.ctx
            .read(None)
            .expect("a read with no deadline returns a message")
    }

    /// Reads the next message, waiting at most `timeout` (`poll(2)` then `read(2)`).
    pub fn read_timeout(&self, timeout: Duration) -> Option<UffdMsg> {
        self.ctx.read(Some(Instant::now() + timeout))
    }

    /// Reads the next message if one is queued (`read(2)` on an `O_NONBLOCK` file).
    ///
    /// Errors: `Again` (with `done` 0) when nothing is queued.
    pub fn try_read(&self) -> Result<UffdMsg, UffdError> {
        self.ctx
            .read(Some(Instant::now()))
            .ok_or(UffdError::Again { done: 0 })
    }

    /// Whether a message is waiting to be read (`POLLIN`).
    pub fn poll(&self) -> bool {
        let q = self.ctx.queue.lock();
        q.faults.iter().any(|f| !f.read) || !q.events.is_empty()
    }

    /// Wakes the threads waiting on faults in `[start, start + len)` without resolving
    /// anything: they retry their faults (`UFFDIO_WAKE`).
    ///
    /// Errors: `Inval` for an unaligned or empty range.
    #[doc(alias = "UFFDIO_WAKE")]
    pub fn wake(&self, start: VirtAddr, len: u64) -> Result<(), UffdError> {
        let range = user_range(start, len)?;
        self.ctx.wake(range);
        Ok(())
    }

    /// How many faulting threads wait on this userfaultfd, read or not.
    pub fn waiting(&self) -> usize {
        self.ctx.queue.lock().faults.len()
    }

    fn mm(&self) -> Result<Arc<Mm>, UffdError> {
        self.ctx.mm.upgrade().ok_or(UffdError::Srch)
    }
}

impl Drop for Userfaultfd {
    /// Closes it (`userfaultfd_release`).
    fn drop(&mut self) {
        self.ctx.release();
    }
}

impl std::fmt::Debug for Userfaultfd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Userfaultfd")
            .field("features", &self.ctx.features)
            .finish_non_exhaustive()
    }
}

impl UffdCtx {
    fn new(mm: &Arc<Mm>, features: UffdFeatures) -> Arc<UffdCtx> {
        let ctx = Arc::new(UffdCtx {
            mm: Arc::downgrade(mm),
            features,
            queue: parking_lot::Mutex::new(Queue::default()),
            cond: parking_lot::Condvar::new(),
            released: AtomicBool::new(false),
            mmap_changing: AtomicU32::new(0),
        });
        mm.uffds.lock().push(Arc::downgrade(&ctx));
        ctx
    }

    pub(crate) fn is_released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    /// Whether a non-cooperative event is in flight.
    fn mmap_changing(&self) -> bool {
        self.mmap_changing.load(Ordering::Acquire) > 0
    }

    fn read(&self, deadline: Option<Instant>) -> Option<UffdMsg> {
        let mut q = self.queue.lock();
        loop {
            if let Some(f) = q.faults.iter_mut().find(|f| !f.read) {
                f.read = true;
                return Some(UffdMsg::PageFault {
                    address: f.address,
                    flags: f.flags,
                });
            }
            if let Some((_, msg)) = q.events.pop_front() {
                // The thread that raised it waits for this.
                self.cond.notify_all();
                return Some(msg);
            }
            match deadline {
                None => self.cond.wait(&mut q),
                Some(d) => {
                    if Instant::now() >= d || self.cond.wait_until(&mut q, d).timed_out() {
                        // One more look: a message may have come with the timeout.
                        if q.faults.iter().all(|f| f.read) && q.events.is_empty() {
                            return None;
                        }
                    }
                }
            }
        }
    }

    /// Wakes the faults waiting in `range` (`wake_userfault`).
    pub(crate) fn wake(&self, range: VaRange) {
        let mut q = self.queue.lock();
        let before = q.faults.len();
        q.faults.retain(|f| !range.contains(f.page));
        if q.faults.len() != before {
            self.cond.notify_all();
        }
    }

    /// Wakes every waiter so it can see a fatal signal or the release.
    pub(crate) fn wake_all(&self) {
        let _q = self.queue.lock();
        self.cond.notify_all();
    }

    /// `userfaultfd_release`: no new fault waits; every VMA leaves the userfaultfd (its
    /// write-protected entries lose the bit); every waiter wakes.
    fn release(self: &Arc<Self>) {
        self.released.store(true, Ordering::Release);
        if let Some(mm) = self.mm.upgrade() {
            mm.uffd_release(self);
            mm.uffds
                .lock()
                .retain(|w| w.strong_count() > 0 && !w.ptr_eq(&Arc::downgrade(self)));
        }
        // Fork messages never read hold the children's files: close them outside the lock.
        let unread: Vec<_> = {
            let mut q = self.queue.lock();
            q.faults.clear();
            let unread = q.events.drain(..).collect();
            self.cond.notify_all();
            unread
        };
        drop(unread);
    }
}

/// Validates a page-aligned, non-empty range inside the address space.
fn user_range(start: VirtAddr, len: u64) -> Result<VaRange, UffdError> {
    if !start.is_page_aligned() || len == 0 || len % crate::addr::PAGE_SIZE != 0 {
        return Err(UffdError::Inval {
            what: "unaligned or empty range",
        });
    }
    VaRange::from_len(start, len)
        .ok()
        .filter(|r| r.end().as_u64() <= crate::addr::TASK_SIZE)
        .ok_or(UffdError::Inval {
            what: "range beyond the address space",
        })
}
