//! The description of an invalidation: [`NotifierRange`] with its contextual
//! [`NotifierEvent`] and [`Owner`].

use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::addr::{VaRange, VirtAddr};
use crate::prot::VmFlags;

/// Why CPU page-table entries are about to change (`enum mmu_notifier_event`).
#[doc(alias = "mmu_notifier_event")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[repr(u8)]
pub enum NotifierEvent {
    /// The range is unmapped (munmap, the old range of mremap): drop mappings, the range
    /// is gone.
    #[doc(alias = "MMU_NOTIFY_UNMAP")]
    Unmap = 0,
    /// Entries are cleared (madvise DONTNEED/FREE, COW replacement, THP split/collapse, …).
    #[doc(alias = "MMU_NOTIFY_CLEAR")]
    Clear = 1,
    /// Protection of the whole range changes (mprotect).
    #[doc(alias = "MMU_NOTIFY_PROTECTION_VMA")]
    ProtectionVma = 2,
    /// Per-page protection changes (fork write-protecting COW pages).
    #[doc(alias = "MMU_NOTIFY_PROTECTION_PAGE")]
    ProtectionPage = 3,
    /// Soft-dirty bits are cleared; pages and access stay the same.
    #[doc(alias = "MMU_NOTIFY_SOFT_DIRTY")]
    SoftDirty = 4,
    /// The address space is torn down (interval notifiers only).
    #[doc(alias = "MMU_NOTIFY_RELEASE")]
    Release = 5,
    /// Pages are being migrated; `owner` names the migrating driver.
    #[doc(alias = "MMU_NOTIFY_MIGRATE")]
    Migrate = 6,
    /// A page is made exclusive to a device; `owner` names it.
    #[doc(alias = "MMU_NOTIFY_EXCLUSIVE")]
    Exclusive = 7,
}

impl NotifierEvent {
    /// Every event, in value order.
    pub const ALL: [NotifierEvent; 8] = [
        NotifierEvent::Unmap,
        NotifierEvent::Clear,
        NotifierEvent::ProtectionVma,
        NotifierEvent::ProtectionPage,
        NotifierEvent::SoftDirty,
        NotifierEvent::Release,
        NotifierEvent::Migrate,
        NotifierEvent::Exclusive,
    ];

    /// The kernel's name of the event.
    pub fn kernel_name(self) -> &'static str {
        match self {
            NotifierEvent::Unmap => "MMU_NOTIFY_UNMAP",
            NotifierEvent::Clear => "MMU_NOTIFY_CLEAR",
            NotifierEvent::ProtectionVma => "MMU_NOTIFY_PROTECTION_VMA",
            NotifierEvent::ProtectionPage => "MMU_NOTIFY_PROTECTION_PAGE",
            NotifierEvent::SoftDirty => "MMU_NOTIFY_SOFT_DIRTY",
            NotifierEvent::Release => "MMU_NOTIFY_RELEASE",
            NotifierEvent::Migrate => "MMU_NOTIFY_MIGRATE",
            NotifierEvent::Exclusive => "MMU_NOTIFY_EXCLUSIVE",
        }
    }
}

/// An opaque owner cookie: a device's `pgmap->owner`, carried in ranges so that the
/// initiator of an invalidation can recognise (and skip) its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Owner(NonZeroU64);

impl Owner {
    /// A fresh owner, distinct from every other created by this process.
    pub fn new_unique() -> Owner {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Owner(NonZeroU64::new(NEXT.fetch_add(1, Ordering::Relaxed)).expect("owner ids never wrap"))
    }

    /// The raw cookie.
    pub fn as_u64(self) -> u64 {
        self.0.get()
    }
}

/// Identifies an address space in notifier ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct MmId(pub(crate) u64);

impl MmId {
    pub(crate) fn new_unique() -> MmId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        MmId(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// The raw id.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

/// The VMA an invalidation concerns (the first one, when the range spans several).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VmaInfo {
    /// The VMA's range at the time of the call.
    pub range: VaRange,
    /// Its flags.
    pub flags: VmFlags,
}

/// What an invalidation covers and why (`struct mmu_notifier_range`).
#[doc(alias = "mmu_notifier_range")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NotifierRange {
    /// The address space.
    pub mm: MmId,
    /// `[start, end)` of the change.
    pub range: VaRange,
    /// Why.
    pub event: NotifierEvent,
    /// The initiator's cookie, if it set one (`mmu_notifier_range_init_owner`).
    pub owner: Option<Owner>,
    /// Whether callbacks may sleep (`MMU_NOTIFIER_RANGE_BLOCKABLE`).
    pub blockable: Blockable,
    /// The VMA concerned, if any (none for RELEASE).
    pub vma: Option<VmaInfo>,
}

/// Whether notifier callbacks may sleep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Blockable {
    /// Callbacks may sleep (the normal case).
    Yes,
    /// Callbacks must not sleep and may refuse with `WouldBlock` (the OOM reaper's case).
    No,
}

impl NotifierRange {
    /// A blockable range without owner (`mmu_notifier_range_init`).
    #[doc(alias = "mmu_notifier_range_init")]
    pub fn new(mm: MmId, range: VaRange, event: NotifierEvent, vma: Option<VmaInfo>) -> Self {
        NotifierRange {
            mm,
            range,
            event,
            owner: None,
            blockable: Blockable::Yes,
            vma,
        }
    }

    /// The same range carrying `owner` (`mmu_notifier_range_init_owner`).
    #[doc(alias = "mmu_notifier_range_init_owner")]
    pub fn with_owner(mut self, owner: Option<Owner>) -> Self {
        self.owner = owner;
        self
    }

    /// Inclusive start.
    pub fn start(&self) -> VirtAddr {
        self.range.start()
    }

    /// Exclusive end.
    pub fn end(&self) -> VirtAddr {
        self.range.end()
    }

    /// Whether callbacks may sleep.
    #[doc(alias = "mmu_notifier_range_blockable")]
    pub fn is_blockable(&self) -> bool {
        self.blockable == Blockable::Yes
    }
}
