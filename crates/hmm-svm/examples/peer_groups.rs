//! Three GPUs, two of them peers: how a GPU takes pages another one holds, and a GPU going
//! away while the others keep the data.
//!
//! ```text
//! cargo run --release -p hmm-svm --example peer_groups
//! ```
//!
//! gpu0 and gpu1 share a pagemap owner (a `PeerGroup`, drm_pagemap's owner list); gpu2 has
//! an owner of its own. A buffer written by the CPU goes to gpu0 on its first touch; gpu1
//! then maps it over the peer link (`RemoteMap`) or takes it straight from gpu0
//! (`SourceCopy`, the source copying); gpu2 can only have it faulted home first. Then gpu1
//! goes offline, its pages go to its peer, and the CPU reads every byte back.

use std::error::Error;

use hmm::addr::PAGE_SIZE;
use hmm::mm::{MapFlags, Mm, Prot};
use hmm::phys::{PhysConfig, PhysMem};
use hmm_svm::policy::prefetch::NoPrefetch;
use hmm_svm::{
    EvictTarget, GpuConfig, GpuDevice, GpuVm, Location, PeerGroup, PeerPolicy, VmPolicies,
};

const PAGES: u64 = 64;

fn main() -> Result<(), Box<dyn Error>> {
    let phys = PhysMem::new(PhysConfig::with_size(64 << 20))?;
    let config = GpuConfig {
        vram_bytes: 8 << 20,
        ..GpuConfig::default()
    };
    let hive = PeerGroup::new();
    let gpu0 = GpuDevice::in_group(&phys, config, &hive)?;
    let gpu1 = GpuDevice::in_group(&phys, config, &hive)?;
    let gpu2 = GpuDevice::new(&phys, config)?;
    assert_eq!(gpu0.owner(), gpu1.owner());
    assert_ne!(gpu0.owner(), gpu2.owner());

    let mm = Mm::new(phys.clone());
    // Only the pages that fault move, so the counts below are exact.
    let vm = |gpu, peer| {
        let policies = VmPolicies {
            prefetch: Box::new(NoPrefetch),
            peer,
            ..VmPolicies::plain()
        };
        GpuVm::with_policies(gpu, &mm, policies)
    };
    let (vm0, vm2) = (
        vm(&gpu0, PeerPolicy::SourceCopy),
        vm(&gpu2, PeerPolicy::SourceCopy),
    );
    let len = PAGES * PAGE_SIZE;
    let a = mm.mmap(None, len, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)?;
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    mm.write(a, &data)?;
    let mut seen = vec![0u8; len as usize];

    // gpu0 touches it first: migrated to gpu0's memory.
    vm0.read(a, &mut seen)?;
    assert_eq!(vm0.lookup(a).map(|p| p.location), Some(Location::Vram));

    // gpu1 with a peer mapping: reads gpu0's memory where it is.
    let remote = vm(&gpu1, PeerPolicy::RemoteMap);
    remote.read(a, &mut seen)?;
    assert_eq!(seen, data);
    assert_eq!(remote.lookup(a).map(|p| p.location), Some(Location::Peer));
    println!("gpu1, remote mapping: {}", remote.stats());
    drop(remote);

    // gpu1 taking the pages: gpu0 copies them over the link.
    let vm1 = vm(&gpu1, PeerPolicy::SourceCopy);
    vm1.read(a, &mut seen)?;
    assert_eq!(gpu1.stats().pages_d2d_in, PAGES);
    assert_eq!(gpu0.stats().pages_d2d_out, PAGES);
    assert_eq!(vm0.lookup(a), None, "gpu0's entries went with the pages");
    println!("gpu1, after the peer copy: {}", gpu1.stats());

    // gpu2 is not a peer: gpu1's pages are faulted home, then migrated to gpu2.
    vm2.read(a, &mut seen)?;
    assert_eq!(seen, data);
    assert_eq!(gpu1.stats().pages_d2h, PAGES);
    assert_eq!(gpu2.stats().pages_h2d, PAGES);

    // gpu0 takes them back; then gpu0 goes away, its pages to its peer.
    vm0.read(a, &mut seen)?;
    let report = gpu0.offline(EvictTarget::Peer)?;
    assert_eq!(report.pages_to_peers, PAGES);
    assert_eq!(gpu1.vram_pages_in_use(), PAGES);
    println!("gpu0 offline: {report:?}");

    // The CPU reads every byte back, wherever the pages are.
    let mut back = vec![0u8; len as usize];
    mm.read(a, &mut back)?;
    assert_eq!(back, data);
    gpu0.online()?;
    println!("every byte read back; gpu0 is back online");
    Ok(())
}
