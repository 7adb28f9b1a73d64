//! `hmm selftest`: the driver conformance suite (`hmm_dmirror::conformance`) against the
//! built-in simulated devices, device-private and device-coherent. One line per scenario,
//! then `N passed, M failed`; a scenario that panics counts as failed, and the others
//! still run.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use hmm::zone_device::MemoryType;
use hmm_dmirror::conformance::{DmirrorFactory, SCENARIOS};

/// Runs every scenario on every kind of device; returns the number that failed.
pub(crate) fn run() -> usize {
    let (mut passed, mut failed) = (0, 0);
    for (kind, label) in [
        (MemoryType::DevicePrivate, "private"),
        (MemoryType::DeviceCoherent, "coherent"),
    ] {
        let factory = DmirrorFactory::new(kind);
        for s in SCENARIOS {
            let t = Instant::now();
            let result = catch_unwind(AssertUnwindSafe(|| (s.run)(&factory)))
                .unwrap_or_else(|p| Err(format!("panicked: {}", panic_message(&*p))));
            let ms = t.elapsed().as_secs_f64() * 1e3;
            match result {
                Ok(()) => {
                    passed += 1;
                    outln!("ok      {label:<8} {:<48} {ms:>7.1} ms", s.name);
                }
                Err(why) => {
                    failed += 1;
                    outln!("FAILED  {label:<8} {:<48} {ms:>7.1} ms: {why}", s.name);
                }
            }
        }
    }
    outln!("{passed} passed, {failed} failed");
    failed
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string payload".into())
}
