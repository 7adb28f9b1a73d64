//! The synchronization primitives hmm's protocols are built on, in one place so that a
//! model checker can take their place.
//!
//! Normally these are `parking_lot`'s locks and the standard library's atomics. With the
//! `shuttle` feature they are [shuttle](https://docs.rs/shuttle)'s, behind the same API:
//! every lock, condition-variable and atomic operation becomes a scheduling point that
//! shuttle's schedulers permute, so a test run under `shuttle::check_random` or
//! `shuttle::check_pct` explores interleavings of the real mm, notifier and migration code
//! (see `crates/hmm/tests/shuttle.rs`). Shuttle treats every atomic ordering as `SeqCst`:
//! it finds interleaving bugs, not weak-memory ones.
//!
//! What goes through this module: the mmap lock, page-table locks, the PTE words, the frame
//! metadata (refcount, mapcount, pincount, flags with the folio lock) and the folio wait
//! queues, the interval-notifier state and sequence, the notifier lists. What does not:
//! frame contents (data, not synchronization: one scheduling point per word would drown the
//! search) and statistics counters.
//!
//! A build with the `shuttle` feature can run only inside a shuttle execution; it exists for
//! the model checks and nothing else.

#[cfg(not(feature = "shuttle"))]
pub use parking_lot::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
#[cfg(not(feature = "shuttle"))]
pub use std::thread::yield_now;

/// A point where a thread may be retrying work that another thread must finish first: a
/// fault, re-executed like the faulting instruction until the page is ready (a migration
/// holds it, a driver could not migrate it back yet). Nothing in a normal build; with
/// `shuttle` a yield, without which shuttle's PCT scheduler would run a retrying
/// highest-priority thread for ever and never the thread it waits for.
#[inline(always)]
pub fn retry_point() {
    #[cfg(feature = "shuttle")]
    shuttle::thread::yield_now();
}

/// Runs the work of a `Drop` so that it cannot turn a panic into an abort: normally it
/// just runs `work`; while the thread is already unwinding from a panic, `work` runs under
/// `catch_unwind`, and a second panic inside it (a consistency check that fails because
/// the first panic left a structure half done) is reported by the panic hook and
/// swallowed, leaking what `work` did not finish instead of aborting the process. Every
/// `Drop` in this crate that can reach an assertion goes through here.
pub fn drop_work(work: impl FnOnce()) {
    if std::thread::panicking() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
    } else {
        work();
    }
}

/// How long [`read_unqueued`] stays parked before it looks at the lock again.
#[cfg(not(feature = "shuttle"))]
const UNQUEUED_PARK: std::time::Duration = std::time::Duration::from_millis(1);

/// Takes `lock` for reading the way a reverse-map walk must: it gets in whenever any
/// reader is inside, even with a writer waiting, and it never stays parked in the lock's
/// queue.
///
/// `read_recursive` alone is not enough. It passes a waiting writer only at the moment
/// of the call: a caller that arrives while a writer *holds* the lock parks, and when that
/// writer leaves, the lock may wake the next writer and stop there, leaving the reader
/// parked. If another reader then gets in and waits for something the parked one holds
/// (a CPU fault waiting on a folio lock a device eviction holds), the writer waits for
/// that reader, and nobody wakes the parked one: a deadlock of three threads, found by
/// `hmm stress`. So the park is bounded and the fast path is tried again, which succeeds
/// whenever a reader is inside. A writer holding the lock never waits for a folio lock
/// or another address space (DESIGN.md, lock order), so the loop ends.
pub fn read_unqueued<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    loop {
        #[cfg(not(feature = "shuttle"))]
        let got = lock.try_read_recursive_for(UNQUEUED_PARK);
        #[cfg(feature = "shuttle")]
        let got = lock.try_read_recursive();
        if let Some(guard) = got {
            return guard;
        }
        #[cfg(feature = "shuttle")]
        shuttle::thread::yield_now();
    }
}

/// Atomics that take part in hmm's protocols.
pub mod atomic {
    #[cfg(feature = "shuttle")]
    pub use shuttle::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicU8, Ordering};
    #[cfg(not(feature = "shuttle"))]
    pub use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicU8, Ordering};
}

#[cfg(feature = "shuttle")]
pub use shuttle::thread::yield_now;

#[cfg(feature = "shuttle")]
pub use model::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// `parking_lot`'s API over shuttle's `std`-shaped primitives. Poisoning is ignored, as
/// `parking_lot` has none.
#[cfg(feature = "shuttle")]
mod model {
    use std::collections::HashMap;
    use std::ops::{Deref, DerefMut};
    use std::sync::PoisonError;

    use shuttle::current::{me, TaskId};

    /// A mutex (`parking_lot::Mutex`'s API).
    #[derive(Default)]
    pub struct Mutex<T>(shuttle::sync::Mutex<T>);

    /// A held [`Mutex`].
    pub struct MutexGuard<'a, T>(Option<shuttle::sync::MutexGuard<'a, T>>);

    impl<T> Mutex<T> {
        /// A new unlocked mutex.
        pub const fn new(value: T) -> Self {
            Self(shuttle::sync::Mutex::new(value))
        }

        /// Takes the lock, sleeping while another thread holds it.
        pub fn lock(&self) -> MutexGuard<'_, T> {
            MutexGuard(Some(self.0.lock().unwrap_or_else(PoisonError::into_inner)))
        }

        /// Takes the lock if it is free.
        pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            match self.0.try_lock() {
                Ok(g) => Some(MutexGuard(Some(g))),
                Err(std::sync::TryLockError::Poisoned(p)) => Some(MutexGuard(Some(p.into_inner()))),
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        }

        /// The value, through exclusive access.
        pub fn get_mut(&mut self) -> &mut T {
            self.0.get_mut().unwrap_or_else(PoisonError::into_inner)
        }

        /// The value, consuming the mutex.
        pub fn into_inner(self) -> T {
            self.0.into_inner().unwrap_or_else(PoisonError::into_inner)
        }
    }

    impl<T: std::fmt::Debug> std::fmt::Debug for Mutex<T> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Mutex { .. }")
        }
    }

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;

        fn deref(&self) -> &T {
            self.0.as_ref().expect("guard taken by a condvar wait")
        }
    }

    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            self.0.as_mut().expect("guard taken by a condvar wait")
        }
    }

    /// A condition variable (`parking_lot::Condvar`'s API).
    #[derive(Default)]
    pub struct Condvar(shuttle::sync::Condvar);

    impl Condvar {
        /// A new condition variable.
        pub const fn new() -> Self {
            Self(shuttle::sync::Condvar::new())
        }

        /// Releases the guard's lock, sleeps until notified, and takes the lock again.
        pub fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
            let g = guard.0.take().expect("guard taken by a condvar wait");
            guard.0 = Some(self.0.wait(g).unwrap_or_else(PoisonError::into_inner));
        }

        /// Wakes every waiter.
        pub fn notify_all(&self) {
            self.0.notify_all();
        }

        /// Wakes one waiter.
        pub fn notify_one(&self) {
            self.0.notify_one();
        }
    }

    /// A reader-writer lock (`parking_lot::RwLock`'s API, `read_recursive` included).
    ///
    /// Shuttle's lock decides who may enter; a `std` lock, never contended once shuttle let
    /// a thread in, holds the data. `read_recursive` by a thread that already reads skips
    /// shuttle's lock (which would report a self-deadlock): no writer can be inside while
    /// that thread reads, which is all `parking_lot` promises.
    #[derive(Default)]
    pub struct RwLock<T> {
        gate: shuttle::sync::RwLock<()>,
        data: std::sync::RwLock<T>,
        readers: std::sync::Mutex<HashMap<TaskId, usize>>,
    }

    /// A read-held [`RwLock`].
    pub struct RwLockReadGuard<'a, T> {
        data: Option<std::sync::RwLockReadGuard<'a, T>>,
        gate: Option<shuttle::sync::RwLockReadGuard<'a, ()>>,
        readers: &'a std::sync::Mutex<HashMap<TaskId, usize>>,
    }

    /// A write-held [`RwLock`].
    pub struct RwLockWriteGuard<'a, T> {
        // Declared first, so dropped before the gate.
        data: std::sync::RwLockWriteGuard<'a, T>,
        _gate: shuttle::sync::RwLockWriteGuard<'a, ()>,
    }

    impl<T> RwLock<T> {
        /// A new unlocked lock.
        pub fn new(value: T) -> Self {
            Self {
                gate: shuttle::sync::RwLock::new(()),
                data: std::sync::RwLock::new(value),
                readers: std::sync::Mutex::new(HashMap::new()),
            }
        }

        fn reading<'a>(
            &'a self,
            gate: Option<shuttle::sync::RwLockReadGuard<'a, ()>>,
        ) -> RwLockReadGuard<'a, T> {
            *self
                .readers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(me())
                .or_default() += 1;
            RwLockReadGuard {
                data: Some(self.data.read().unwrap_or_else(PoisonError::into_inner)),
                gate,
                readers: &self.readers,
            }
        }

        /// Takes the lock for reading.
        pub fn read(&self) -> RwLockReadGuard<'_, T> {
            let gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
            self.reading(Some(gate))
        }

        /// Whether this thread holds the lock for reading already.
        fn nested(&self) -> bool {
            self.readers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&me())
                .is_some_and(|&n| n > 0)
        }

        /// Takes the lock for reading even when this thread already reads.
        pub fn read_recursive(&self) -> RwLockReadGuard<'_, T> {
            if self.nested() {
                self.reading(None)
            } else {
                self.read()
            }
        }

        /// Takes the lock for reading if this thread already reads or no writer is
        /// inside; never waits.
        pub fn try_read_recursive(&self) -> Option<RwLockReadGuard<'_, T>> {
            if self.nested() {
                return Some(self.reading(None));
            }
            match self.gate.try_read() {
                Ok(gate) => Some(self.reading(Some(gate))),
                Err(std::sync::TryLockError::Poisoned(p)) => {
                    Some(self.reading(Some(p.into_inner())))
                }
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        }

        /// The value, through exclusive access.
        pub fn get_mut(&mut self) -> &mut T {
            self.data.get_mut().unwrap_or_else(PoisonError::into_inner)
        }

        /// Takes the lock for writing.
        pub fn write(&self) -> RwLockWriteGuard<'_, T> {
            let gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
            RwLockWriteGuard {
                data: self.data.write().unwrap_or_else(PoisonError::into_inner),
                _gate: gate,
            }
        }

        /// Takes the lock for writing if nobody holds it; never waits.
        pub fn try_write(&self) -> Option<RwLockWriteGuard<'_, T>> {
            let gate = match self.gate.try_write() {
                Ok(gate) => gate,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return None,
            };
            Some(RwLockWriteGuard {
                data: self.data.write().unwrap_or_else(PoisonError::into_inner),
                _gate: gate,
            })
        }
    }

    impl<T> Deref for RwLockReadGuard<'_, T> {
        type Target = T;

        fn deref(&self) -> &T {
            self.data.as_ref().expect("a released guard")
        }
    }

    impl<T> Drop for RwLockReadGuard<'_, T> {
        fn drop(&mut self) {
            // The data first: once the gate is released (a scheduling point) a writer may run
            // and must find the data lock free.
            self.data.take();
            let mut readers = self.readers.lock().unwrap_or_else(PoisonError::into_inner);
            let n = readers.get_mut(&me()).expect("a reader that never read");
            *n -= 1;
            drop(readers);
            self.gate.take();
        }
    }

    impl<T> Deref for RwLockWriteGuard<'_, T> {
        type Target = T;

        fn deref(&self) -> &T {
            &self.data
        }
    }

    impl<T> DerefMut for RwLockWriteGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            &mut self.data
        }
    }
}

#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    /// The deadlock `read_unqueued` exists for: a walker parks while a writer holds the
    /// lock, a second writer queues behind it, the first writer leaves by becoming a
    /// reader (so a reader is inside and the second writer waits for it), and the walker
    /// must still get in, as a reader is inside.
    #[test]
    fn an_unqueued_reader_gets_in_while_a_writer_waits_for_a_reader() {
        let lock = RwLock::new(7u32);
        let lock = &lock;
        let held = lock.write();
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel();
            let writer = s.spawn(move || *lock.write() += 1);
            std::thread::sleep(Duration::from_millis(50));
            let walker = s.spawn(move || tx.send(*read_unqueued(lock)).unwrap());
            std::thread::sleep(Duration::from_millis(50));
            let reader = RwLockWriteGuard::downgrade(held);
            assert_eq!(
                rx.recv_timeout(Duration::from_secs(10)),
                Ok(7),
                "the walker stayed parked behind a writer waiting for a reader"
            );
            drop(reader);
            walker.join().unwrap();
            writer.join().unwrap();
        });
        assert_eq!(*lock.read(), 8);
    }
}
