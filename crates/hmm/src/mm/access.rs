//! CPU loads and stores: what a thread of the process does when it touches memory.
//!
//! An access first checks, under the mmap read lock, that VMAs cover the whole range with
//! the needed permission; if not it fails with SIGSEGV and changes nothing. Then it walks
//! the range once; for each page it copies bytes while holding the page-table lock of the
//! entry that translated it (see the locking notes in [`super`]), setting the accessed and
//! dirty bits as the MMU would. An entry that does not satisfy the access is resolved by
//! [`handle_mm_fault`](super::MmapReadGuard::handle_mm_fault) and the page is retried.

use crate::addr::{Pfn, VaRange, VirtAddr, PAGE_SIZE, PMD_SIZE, USER_VA_END};
use crate::pgtable::{Pte, PteFlags, Slot, WalkMode};
use crate::phys::FrameRef;

use super::error::{FaultError, SegvCause};
use super::fault::{check_access, handle_mm_fault_retry, FaultFlags, Faulted};
use super::{Mm, MmState};

/// A plain value that can be loaded from and stored to memory, little-endian.
pub trait Scalar: Copy + sealed::Sealed {
    /// Size in bytes.
    const SIZE: usize;
    /// Decodes from `SIZE` little-endian bytes.
    fn from_le(bytes: &[u8]) -> Self;
    /// Encodes into `SIZE` little-endian bytes.
    fn to_le(self, out: &mut [u8]);
}

mod sealed {
    pub trait Sealed {}
}

macro_rules! scalar {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl Scalar for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn from_le(bytes: &[u8]) -> Self {
                <$t>::from_le_bytes(bytes.try_into().expect("scalar size"))
            }
            fn to_le(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
scalar!(u8, u16, u32, u64, i8, i16, i32, i64);

enum Buf<'b> {
    Read(&'b mut [u8]),
    Write(&'b [u8]),
}

impl Buf<'_> {
    fn len(&self) -> usize {
        match self {
            Buf::Read(b) => b.len(),
            Buf::Write(b) => b.len(),
        }
    }

    fn is_write(&self) -> bool {
        matches!(self, Buf::Write(_))
    }

    fn transfer(&mut self, frame: FrameRef<'_>, offset: usize, done: usize, n: usize) {
        match self {
            Buf::Read(b) => frame.read(offset, &mut b[done..done + n]),
            Buf::Write(b) => frame.write(offset, &b[done..done + n]),
        }
    }
}

impl Mm {
    /// Loads `buf.len()` bytes at `addr`, faulting pages in as a CPU would.
    pub fn read(&self, addr: VirtAddr, buf: &mut [u8]) -> Result<(), FaultError> {
        self.access(addr, Buf::Read(buf))
    }

    /// Stores `data` at `addr`, faulting pages in (and copying on write) as a CPU would.
    pub fn write(&self, addr: VirtAddr, data: &[u8]) -> Result<(), FaultError> {
        self.access(addr, Buf::Write(data))
    }

    /// Loads a value.
    pub fn read_val<T: Scalar>(&self, addr: VirtAddr) -> Result<T, FaultError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b[..T::SIZE])?;
        Ok(T::from_le(&b[..T::SIZE]))
    }

    /// Stores a value.
    pub fn write_val<T: Scalar>(&self, addr: VirtAddr, val: T) -> Result<(), FaultError> {
        let mut b = [0u8; 8];
        val.to_le(&mut b[..T::SIZE]);
        self.write(addr, &b[..T::SIZE])
    }

    /// Loads `out.len()` consecutive values from `addr` (an array of `T` in C), in one
    /// access: all or nothing, as [`read`](Self::read).
    pub fn read_slice<T: Scalar>(&self, addr: VirtAddr, out: &mut [T]) -> Result<(), FaultError> {
        let mut bytes = vec![0u8; std::mem::size_of_val(out)];
        self.read(addr, &mut bytes)?;
        for (v, b) in out.iter_mut().zip(bytes.chunks_exact(T::SIZE)) {
            *v = T::from_le(b);
        }
        Ok(())
    }

    /// Stores the values of `data` consecutively from `addr`, in one access: all or
    /// nothing, as [`write`](Self::write).
    pub fn write_slice<T: Scalar>(&self, addr: VirtAddr, data: &[T]) -> Result<(), FaultError> {
        let mut bytes = vec![0u8; std::mem::size_of_val(data)];
        for (v, b) in data.iter().zip(bytes.chunks_exact_mut(T::SIZE)) {
            v.to_le(b);
        }
        self.write(addr, &bytes)
    }

    fn access(&self, addr: VirtAddr, mut buf: Buf<'_>) -> Result<(), FaultError> {
        let len = buf.len();
        if len == 0 {
            return Ok(());
        }
        let end = addr.checked_add(len as u64).ok_or(FaultError::Segv {
            addr: VirtAddr::new(USER_VA_END),
            cause: SegvCause::MapErr,
        })?;
        let mut done = 0usize;
        loop {
            // A fault that waits for a userfaultfd handler drops the mmap lock; the access
            // goes on from where it stopped once the handler woke it.
            let wait = {
                let guard = self.mmap_read();
                match self.access_locked(&guard.state, addr, end, &mut buf, &mut done)? {
                    Faulted::Done => return Ok(()),
                    Faulted::Retry(wait) => wait,
                }
            };
            wait.wait(self);
            if self.fatal_signal_pending() {
                return Err(FaultError::Killed {
                    addr: addr + done as u64,
                });
            }
        }
    }

    /// The access from `addr + done` to `end` under the mmap lock; `done` counts the
    /// bytes copied. Ends with `Retry` if a fault must wait outside the lock.
    fn access_locked(
        &self,
        st: &MmState,
        addr: VirtAddr,
        end: VirtAddr,
        buf: &mut Buf<'_>,
        done: &mut usize,
    ) -> Result<Faulted, FaultError> {
        let len = buf.len();
        let write = buf.is_write();
        let from = addr + *done as u64;
        // Permission check over every VMA first: a failing access changes nothing.
        let mut at = from;
        while at < end {
            let vma = check_access(st.vmas.find(at), at, write)?;
            at = vma.end();
        }
        let pages = VaRange::new(
            from.page_down(),
            end.align_up(PAGE_SIZE).expect("end below USER_VA_END"),
        )
        .expect("non-empty access");
        let flags = if write {
            FaultFlags::WRITE | FaultFlags::ALLOW_RETRY
        } else {
            FaultFlags::ALLOW_RETRY
        };
        let phys = self.phys();
        let mut c = st.pt.cursor(pages, WalkMode::Lookup);
        while *done < len {
            let va = addr.checked_add(*done as u64).expect("inside the access");
            let slot = c.next().expect("walk covers the access");
            // A 1 GiB leaf is served a 2 MiB piece at a time, so the walk (which moved past
            // the leaf) must come back to the next byte.
            let in_pieces = matches!(slot, Slot::Pud(_));
            // (frame, offset in it, bytes) that this entry can serve, if it satisfies us.
            let served = match slot {
                Slot::Hole(_) => None,
                Slot::Pte(p) => {
                    let pte = p.get();
                    satisfies(pte, write).then(|| {
                        touch(&pte, write, |new| p.set(new));
                        let off = va.page_offset() as usize;
                        (
                            pte.pfn().expect("present"),
                            off,
                            (PAGE_SIZE as usize - off).min(len - *done),
                        )
                    })
                }
                Slot::Pmd(p) | Slot::Pud(p) => {
                    let pte = p.get();
                    satisfies(pte, write).then(|| {
                        touch(&pte, write, |new| p.set(new));
                        let off = va.offset_from(p.range().start()).expect("in leaf") as usize;
                        let head = pte.pfn().expect("present");
                        // At most to the next 2 MiB boundary under the leaf's lock, so a
                        // 1 GiB leaf is not held locked for a whole long access.
                        let chunk = PMD_SIZE as usize - off % PMD_SIZE as usize;
                        (head, off, chunk.min(len - *done))
                    })
                }
            };
            match served {
                Some((first, off, n)) => {
                    // Copy page by page (frames of a folio are consecutive pfns).
                    let mut copied = 0;
                    while copied < n {
                        let o = off + copied;
                        let pfn = Pfn::new(first.as_u64() + (o as u64 / PAGE_SIZE));
                        let in_page = o % PAGE_SIZE as usize;
                        let k = (PAGE_SIZE as usize - in_page).min(n - copied);
                        buf.transfer(phys.frame(pfn), in_page, *done + copied, k);
                        copied += k;
                    }
                    *done += n;
                    if in_pieces && *done < len {
                        c.seek(addr.checked_add(*done as u64).expect("inside the access"));
                    }
                }
                None => {
                    c.unlock();
                    if let Faulted::Retry(wait) = handle_mm_fault_retry(self, st, va, flags)? {
                        return Ok(Faulted::Retry(wait));
                    }
                    c.again();
                }
            }
        }
        Ok(Faulted::Done)
    }
}

fn satisfies(pte: Pte, write: bool) -> bool {
    if write {
        pte.is_writable()
    } else {
        pte.is_accessible()
    }
}

/// Sets the accessed (and, for writes, dirty) bit as the MMU does on a translation.
fn touch(pte: &Pte, write: bool, set: impl FnOnce(Pte)) {
    if let Pte::Present { pfn, flags } = *pte {
        let mut want = flags | PteFlags::YOUNG;
        if write {
            want |= PteFlags::DIRTY;
        }
        if want != flags {
            set(Pte::Present { pfn, flags: want });
        }
    }
}
