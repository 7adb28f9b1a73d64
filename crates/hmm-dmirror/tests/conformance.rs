//! The conformance suite on dmirror's private and coherent devices.

use hmm::zone_device::MemoryType;
use hmm_dmirror::conformance::{run_all, DmirrorFactory, SCENARIOS};

fn check(kind: MemoryType) {
    let report = run_all(&DmirrorFactory::new(kind));
    assert_eq!(report.len(), SCENARIOS.len());
    let failed: Vec<_> = report.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(failed.is_empty(), "{kind:?}: {failed:#?}");
}

#[test]
fn device_private_driver_conforms() {
    check(MemoryType::DevicePrivate);
}

#[test]
fn device_coherent_driver_conforms() {
    check(MemoryType::DeviceCoherent);
}
