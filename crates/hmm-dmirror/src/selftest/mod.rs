//! # The kernel's `hmm-tests.c`, case by case
//!
//! `tools/testing/selftests/mm/hmm-tests.c` is the kernel's own test of HMM through the
//! `test_hmm` driver; `test_hmm.sh smoke` loads the driver and runs it. This module is
//! that file ported to the library: every `TEST_F` under its own name, in the file's
//! order, run once per fixture variant as the kselftest harness runs them
//! (`hmm.hmm_device_private.anon_read`, `hmm2.hmm2_device_coherent.migrate_mixed`, ...).
//! `hmm selftest` prints them as TAP; `cargo test -p hmm-dmirror --test selftest` runs them
//! too.
//!
//! The port keeps each case's steps, sizes and assertions. What the kernel's file reaches
//! through other kernel interfaces maps onto the model's: `fork` is [`Mm::fork`] with the
//! child run on its own thread (its `_exit` is the end of that thread and the drop of its
//! address space), `/sys/kernel/debug/gup_test` is [`Mm::get_user_pages`] and
//! [`Mm::pin_user_pages`], `/proc/self/pagemap` is [`Mm::pagemap`], an `O_TMPFILE` file is
//! a [`MemFile`](hmm::mm::MemFile). Where the model lacks what a case needs, the case
//! skips and says why, as the harness does.
//!
//! Beyond the kernel's harness, every case ends with a leak check: with the process gone
//! and the driver unloaded, no frame of RAM may still be in use.
//!
//! [`Mm::fork`]: hmm::mm::Mm::fork
//! [`Mm::get_user_pages`]: hmm::mm::Mm::get_user_pages
//! [`Mm::pin_user_pages`]: hmm::mm::Mm::pin_user_pages
//! [`Mm::pagemap`]: hmm::mm::Mm::pagemap
//!
//! ```
//! use hmm_dmirror::selftest::{self, Outcome, Options};
//!
//! let test = selftest::tests()
//!     .find(|t| t.name() == "hmm.hmm_device_private.migrate")
//!     .unwrap();
//! let report = selftest::run(&test, &Options::default());
//! assert_eq!(report.outcome, Outcome::Pass);
//! ```

#[macro_use]
mod harness;
mod anon;
mod benchmark;
mod exclusive;
mod file;
mod migrate;
mod snapshot;
mod thp;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use harness::{Fixture, Stop};

/// The kernel's two fixtures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FixtureKind {
    /// `FIXTURE(hmm)`: one device (`self->fd`).
    Hmm,
    /// `FIXTURE(hmm2)`: two devices of the same kind (`self->fd0`, `self->fd1`).
    Hmm2,
}

impl FixtureKind {
    /// The fixture's name in test names.
    pub fn name(self) -> &'static str {
        match self {
            FixtureKind::Hmm => "hmm",
            FixtureKind::Hmm2 => "hmm2",
        }
    }
}

/// The variants each fixture runs in (`FIXTURE_VARIANT_ADD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Device-private memory (devices 0 and 1).
    DevicePrivate,
    /// Device-coherent memory (devices 2 and 3).
    DeviceCoherent,
}

impl Variant {
    /// Both, in the kernel's order.
    pub const ALL: [Variant; 2] = [Variant::DevicePrivate, Variant::DeviceCoherent];

    /// The device numbers a fixture of this variant opens.
    fn units(self, fixture: FixtureKind) -> &'static [usize] {
        match (fixture, self) {
            (FixtureKind::Hmm, Variant::DevicePrivate) => &[0],
            (FixtureKind::Hmm, Variant::DeviceCoherent) => &[2],
            (FixtureKind::Hmm2, Variant::DevicePrivate) => &[0, 1],
            (FixtureKind::Hmm2, Variant::DeviceCoherent) => &[2, 3],
        }
    }

    /// `device_private` or `device_coherent`.
    fn suffix(self) -> &'static str {
        match self {
            Variant::DevicePrivate => "device_private",
            Variant::DeviceCoherent => "device_coherent",
        }
    }
}

/// One `TEST_F`.
#[derive(Debug)]
pub struct Case {
    /// Its fixture.
    pub fixture: FixtureKind,
    /// Its name in the C.
    pub name: &'static str,
    /// What it checks, in one line (the comment above it in the C).
    pub about: &'static str,
    run: fn(&mut Fixture) -> Result<(), Stop>,
}

macro_rules! cases {
    ($($fixture:ident $name:ident: $about:literal => $module:ident;)*) => {
        /// Every case of `hmm-tests.c`, in the file's order.
        pub static CASES: &[Case] = &[$(Case {
            fixture: FixtureKind::$fixture,
            name: stringify!($name),
            about: $about,
            run: $module::$name,
        },)*];
    };
}

cases! {
    Hmm open_close: "open and close the device" => anon;
    Hmm anon_read: "read private anonymous memory, zero pages included" => anon;
    Hmm anon_read_prot: "read memory protected PROT_NONE: EFAULT, nothing read" => anon;
    Hmm anon_write: "write private anonymous memory" => anon;
    Hmm anon_write_prot: "write read-only memory: EPERM, then allowed after mprotect" => anon;
    Hmm anon_write_child: "a child's device write copies on write, THP and migrated too" => anon;
    Hmm anon_write_child_shared: "a child's device write to shared memory reaches the parent" => anon;
    Hmm anon_write_huge: "write a private anonymous THP" => thp;
    Hmm anon_write_hugetlbfs: "write a hugetlb page" => thp;
    Hmm file_read: "read a shared file mapping" => file;
    Hmm file_write: "write a shared file mapping, and the file" => file;
    Hmm migrate: "migrate anonymous memory to the device" => migrate;
    Hmm migrate_file_private: "migrate a private file mapping's copies" => migrate;
    Hmm migrate_fault: "migrate, fault half back, migrate the mix again" => migrate;
    Hmm migrate_release: "migrate, release the device's memory, fault back" => migrate;
    Hmm migrate_shared: "shared anonymous memory does not migrate: ENOENT" => migrate;
    Hmm2 migrate_mixed: "migrate a range of holes, zero, read-only and another device's pages" => migrate;
    Hmm migrate_multiple: "migrate to the device and back ten times" => migrate;
    Hmm anon_read_multiple: "read anonymous memory ten times" => anon;
    Hmm anon_teardown: "read anonymous memory while another thread unmaps half of it" => anon;
    Hmm mixedmap: "snapshot the driver's own mapping (VM_MIXEDMAP)" => snapshot;
    Hmm2 snapshot: "snapshot holes, zero, read-only, writable and both devices' pages" => snapshot;
    Hmm compound: "snapshot a hugetlb page: one PMD, before and after mprotect" => snapshot;
    Hmm2 double_map: "two devices read the same memory, then one after the other migrated it" => snapshot;
    Hmm exclusive: "exclusive device access until the CPU touches the pages" => exclusive;
    Hmm exclusive_mprotect: "a device write after mprotect(PROT_READ) of exclusive pages: EPERM" => exclusive;
    Hmm exclusive_cow: "fork over exclusive pages: parent and child copy on write" => exclusive;
    Hmm hmm_gup_test: "get_user_pages and long-term pins of device pages" => exclusive;
    Hmm hmm_cow_in_device: "a write to device pages shared with a child copies them to RAM" => exclusive;
    Hmm migrate_anon_huge_empty: "migrate an empty THP-sized range" => thp;
    Hmm migrate_anon_huge_zero: "migrate the huge zero page" => thp;
    Hmm migrate_anon_huge_free: "migrate a THP, then MADV_FREE it" => thp;
    Hmm migrate_anon_huge_fault: "migrate a collapsed THP, see a device PMD, fault it back" => thp;
    Hmm migrate_partial_unmap_fault: "migrate, unmap part, fault the rest back" => thp;
    Hmm migrate_remap_fault: "migrate and mremap in either order, fault back at the new address" => thp;
    Hmm migrate_anon_huge_err: "THP migration with device allocation failures, both ways" => thp;
    Hmm migrate_anon_huge_zero_err: "huge zero page migration with device allocation failures" => thp;
    Hmm benchmark_thp_migration: "migration throughput with and without THP" => benchmark;
    Hmm userfaultfd_read: "device read of userfaultfd-backed memory (linux-mm)" => anon;
}

/// One test: a case in one variant of its fixture.
#[derive(Debug, Clone, Copy)]
pub struct Test {
    /// The case.
    pub case: &'static Case,
    /// The variant.
    pub variant: Variant,
}

impl Test {
    /// The harness's name: `fixture.fixture_variant.case`
    /// (`hmm.hmm_device_private.anon_read`).
    pub fn name(&self) -> String {
        let f = self.case.fixture.name();
        format!("{f}.{f}_{}.{}", self.variant.suffix(), self.case.name)
    }

    /// Whether `pattern` selects this test: its full name, `fixture.case`, or the case's
    /// name alone (every variant).
    pub fn matches(&self, pattern: &str) -> bool {
        pattern == self.case.name
            || pattern == self.name()
            || pattern == format!("{}.{}", self.case.fixture.name(), self.case.name)
    }
}

/// Every test in the harness's order: fixture by fixture, variant by variant, the cases
/// of the fixture in the file's order.
pub fn tests() -> impl Iterator<Item = Test> {
    [FixtureKind::Hmm, FixtureKind::Hmm2]
        .into_iter()
        .flat_map(|fixture| {
            Variant::ALL.into_iter().flat_map(move |variant| {
                CASES
                    .iter()
                    .filter(move |c| c.fixture == fixture)
                    .map(move |case| Test { case, variant })
            })
        })
}

/// How to run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// The benchmark's largest buffer; the kernel's goes to 128 THPs (256 MiB).
    pub bench_max_bytes: u64,
}

impl Default for Options {
    /// The kernel's sizes.
    fn default() -> Self {
        Options {
            bench_max_bytes: 128 * hmm::addr::PMD_SIZE,
        }
    }
}

/// How a test ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "result", content = "reason", rename_all = "lowercase")]
pub enum Outcome {
    /// Every assertion held and nothing leaked.
    Pass,
    /// An assertion failed, the case panicked, or frames leaked.
    Fail(String),
    /// The case could not run here.
    Skip(String),
}

/// What [`run`] reports.
#[derive(Debug, Clone)]
pub struct Report {
    /// How it ended.
    pub outcome: Outcome,
    /// What the case printed.
    pub log: Vec<String>,
    /// Wall-clock seconds, set-up and teardown included.
    pub seconds: f64,
}

/// Runs one test on a fresh machine: the fixture's set-up, the case, the teardown and the
/// leak check. A panic in the case fails it and is reported, not propagated.
pub fn run(test: &Test, opts: &Options) -> Report {
    let t = Instant::now();
    let units = test.variant.units(test.case.fixture);
    let mut fixture = match Fixture::setup(test.variant, units, opts.bench_max_bytes) {
        Ok(f) => f,
        Err(why) => {
            return Report {
                outcome: Outcome::Fail(why),
                log: Vec::new(),
                seconds: t.elapsed().as_secs_f64(),
            }
        }
    };
    let result = catch_unwind(AssertUnwindSafe(|| (test.case.run)(&mut fixture)))
        .unwrap_or_else(|p| Err(Stop::Fail(format!("panicked: {}", panic_message(&*p)))));
    let log = std::mem::take(&mut fixture.log);
    let leaked = fixture.teardown();
    let outcome = match result {
        Err(Stop::Fail(why)) => Outcome::Fail(why),
        Err(Stop::Skip(why)) => Outcome::Skip(why),
        Ok(()) if leaked != 0 => Outcome::Fail(format!(
            "{leaked} frame(s) of RAM still in use after the process exited and the driver was unloaded"
        )),
        Ok(()) => Outcome::Pass,
    };
    Report {
        outcome,
        log,
        seconds: t.elapsed().as_secs_f64(),
    }
}

/// The text of a panic's payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string payload".into())
}

#[cfg(test)]
mod tests {
    use hmm::phys::FrameFlags;

    use super::*;

    fn fails(s: &mut Fixture) -> Result<(), Stop> {
        let npages = 1 << s.page_shift;
        check_eq!(npages, 4095);
        Ok(())
    }

    fn panics(_: &mut Fixture) -> Result<(), Stop> {
        panic!("on purpose")
    }

    fn leaks(s: &mut Fixture) -> Result<(), Stop> {
        let frame = s.phys().alloc_zeroed(0, FrameFlags::UPTODATE).unwrap();
        let _ = frame.into_raw();
        Ok(())
    }

    static BAD: [Case; 3] = [
        Case {
            fixture: FixtureKind::Hmm,
            name: "fails",
            about: "",
            run: fails,
        },
        Case {
            fixture: FixtureKind::Hmm,
            name: "panics",
            about: "",
            run: panics,
        },
        Case {
            fixture: FixtureKind::Hmm2,
            name: "leaks",
            about: "",
            run: leaks,
        },
    ];

    fn outcome(i: usize) -> Outcome {
        let test = Test {
            case: &BAD[i],
            variant: Variant::DeviceCoherent,
        };
        run(&test, &Options::default()).outcome
    }

    #[test]
    fn a_failed_assertion_a_panic_or_a_leak_fails_the_case() {
        let Outcome::Fail(why) = outcome(0) else {
            panic!()
        };
        assert!(
            why.contains("Expected npages (4096) == 4095 (4095)"),
            "{why}"
        );
        assert_eq!(outcome(1), Outcome::Fail("panicked: on purpose".into()));
        let Outcome::Fail(why) = outcome(2) else {
            panic!()
        };
        assert!(why.starts_with("1 frame(s) of RAM still in use"), "{why}");
    }
}
