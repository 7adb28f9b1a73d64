//! The kernel's `hmm-tests.c`, every case in every variant (`hmm_dmirror::selftest`):
//! each passes.

use std::sync::atomic::{AtomicUsize, Ordering};

use hmm_dmirror::selftest::{self, Options, Outcome, Test, CASES};

#[test]
fn every_kernel_case_passes_in_both_variants() {
    // The benchmark at up to four THPs: its 256 MiB rounds belong to release builds.
    let opts = Options {
        bench_max_bytes: 4 * hmm::addr::PMD_SIZE,
    };
    let tests: Vec<Test> = selftest::tests().collect();
    // Every case of the file, each in two variants.
    assert_eq!(tests.len(), 2 * CASES.len());
    // Each test has a machine of its own, so they run side by side.
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let failed: Vec<String> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                sc.spawn(|| {
                    let mut failed = Vec::new();
                    while let Some(test) = tests.get(next.fetch_add(1, Ordering::Relaxed)) {
                        match selftest::run(test, &opts).outcome {
                            Outcome::Pass => {}
                            other => failed.push(format!("{}: {other:?}", test.name())),
                        }
                    }
                    failed
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("worker"))
            .collect()
    });
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn names_and_filters_follow_the_kselftest_harness() {
    let names: Vec<String> = selftest::tests().map(|t| t.name()).collect();
    assert_eq!(names[0], "hmm.hmm_device_private.open_close");
    assert!(names.contains(&"hmm2.hmm2_device_coherent.migrate_mixed".to_string()));
    // Fixture by fixture, variant by variant.
    let first_coherent = names
        .iter()
        .position(|n| n.starts_with("hmm.hmm_device_coherent."))
        .unwrap();
    assert!(names[..first_coherent]
        .iter()
        .all(|n| n.starts_with("hmm.hmm_device_private.")));
    let t = selftest::tests()
        .filter(|t| t.matches("hmm2.snapshot"))
        .count();
    assert_eq!(t, 2);
    assert_eq!(
        selftest::tests().filter(|t| t.matches("migrate")).count(),
        2
    );
    assert_eq!(
        selftest::tests()
            .filter(|t| t.matches("hmm.hmm_device_coherent.migrate"))
            .count(),
        1
    );
    assert_eq!(selftest::tests().filter(|t| t.matches("nosuch")).count(), 0);
}
