//! Many devices: peer groups (devices sharing one pagemap owner map each other's pages,
//! take them by the peer policy: a direct copy by the source, a bounce through system
//! memory, or a peer mapping), the seed series' owner filter across groups, eviction to a
//! peer, and devices going offline and coming back. Every test checks bytes and frames.

use std::sync::Arc;

use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::migrate::{migrate_vma_setup, MigrateVma, MigrateVmaFlags};
use hmm::mm::{Advice, MapFlags, Mm, Prot};
use hmm::notifier::{NotifierEvent, Recorder};
use hmm::phys::{PhysConfig, PhysMem};
use hmm_svm::policy::prefetch::NoPrefetch;
use hmm_svm::{
    EvictTarget, GpuConfig, GpuDevice, GpuVm, Location, PeerGroup, PeerPolicy, SvmError, VmPolicies,
};

const RW: Prot = Prot::READ.union(Prot::WRITE);
/// Pages per part of a buffer.
const PART: u64 = 16;

struct Machine {
    phys: Arc<PhysMem>,
    mm: Arc<Mm>,
    gpus: Vec<Arc<GpuDevice>>,
}

/// GPUs with 8 MiB each, `groups[i]` naming GPU `i`'s group (the same number, the same
/// group).
fn machine(groups: &[u32]) -> Machine {
    machine_with(groups, &[8; 8], EvictTarget::Host)
}

/// [`machine`] with GPU `i` holding `vram_mib[i]` MiB and evicting to `evict_to`.
fn machine_with(groups: &[u32], vram_mib: &[u64], evict_to: EvictTarget) -> Machine {
    let phys = PhysMem::new(PhysConfig::with_size(128 << 20)).unwrap();
    let mut made: Vec<(u32, Arc<PeerGroup>)> = Vec::new();
    let gpus = groups
        .iter()
        .zip(vram_mib)
        .map(|(&g, &mib)| {
            let group = match made.iter().find(|(n, _)| *n == g) {
                Some((_, grp)) => Arc::clone(grp),
                None => {
                    made.push((g, PeerGroup::new()));
                    Arc::clone(&made.last().unwrap().1)
                }
            };
            let config = GpuConfig {
                vram_bytes: mib << 20,
                evict_to,
                ..GpuConfig::default()
            };
            GpuDevice::in_group(&phys, config, &group).unwrap()
        })
        .collect();
    let mm = Mm::new(phys.clone());
    Machine { phys, mm, gpus }
}

impl Machine {
    /// A VM of GPU `g` that migrates only the pages that fault (no prefetch, no
    /// thrashing detector, no access counters), taking peers' pages by `peer`.
    fn vm(&self, g: usize, peer: PeerPolicy) -> Arc<GpuVm> {
        let policies = VmPolicies {
            prefetch: Box::new(NoPrefetch),
            peer,
            ..VmPolicies::plain()
        };
        GpuVm::with_policies(&self.gpus[g], &self.mm, policies)
    }

    /// A private anonymous buffer of `npages` written with a pattern; returns it and the
    /// pattern.
    fn buffer(&self, npages: u64) -> (VirtAddr, Vec<u8>) {
        let len = npages * PAGE_SIZE;
        let a = self.mm.mmap(None, len, RW, MapFlags::PRIVATE).unwrap();
        self.mm.madvise(a, len, Advice::NoHugePage).unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        self.mm.write(a, &data).unwrap();
        (a, data)
    }

    /// The CPU reads the buffer back; it must hold `want`.
    fn check(&self, a: VirtAddr, want: &[u8]) {
        let mut back = vec![0u8; want.len()];
        self.mm.read(a, &mut back).unwrap();
        assert!(back == want, "the CPU reads back what was written");
    }

    /// Everything torn down: no frame of RAM or of any GPU in use.
    fn finish(self, vms: Vec<Arc<GpuVm>>) {
        self.mm.audit().unwrap();
        drop(vms);
        let Machine { phys, mm, gpus } = self;
        drop(mm);
        assert_eq!(phys.nr_in_use(), 0, "no RAM frame leaked");
        for g in &gpus {
            assert_eq!(g.vram_pages_in_use(), 0, "no device frame leaked");
        }
    }
}

fn at(a: VirtAddr, page: u64) -> VirtAddr {
    a.checked_add(page * PAGE_SIZE).unwrap()
}

/// GPU `vm` reads pages `[first, first + n)` of the buffer; they must hold `want`'s bytes.
fn gpu_read(vm: &GpuVm, a: VirtAddr, first: u64, n: u64, want: &[u8]) {
    let mut got = vec![0u8; (n * PAGE_SIZE) as usize];
    vm.read(at(a, first), &mut got).unwrap();
    let s = (first * PAGE_SIZE) as usize;
    assert!(
        got == want[s..s + got.len()],
        "the GPU reads what was written"
    );
}

#[test]
fn one_group_shares_an_owner_and_others_do_not() {
    let m = machine(&[0, 0, 1]);
    assert_eq!(m.gpus[0].owner(), m.gpus[1].owner());
    assert_ne!(m.gpus[0].owner(), m.gpus[2].owner());
    assert_eq!(m.gpus[0].group().len(), 2);
    assert_eq!(m.gpus[2].group().len(), 1);
    m.finish(Vec::new());
}

#[test]
fn a_peer_mapping_reads_the_holders_pages_where_they_are() {
    let m = machine(&[0, 0]);
    let (a, data) = m.buffer(PART);
    let holder = m.vm(0, PeerPolicy::SourceCopy);
    let reader = m.vm(1, PeerPolicy::RemoteMap);
    gpu_read(&holder, a, 0, PART, &data);
    assert_eq!(m.gpus[0].vram_pages_in_use(), PART);
    gpu_read(&reader, a, 0, PART, &data);
    let pte = reader.lookup(a).unwrap();
    assert_eq!(pte.location, Location::Peer);
    assert_eq!(
        pte.frame_nr,
        holder.lookup(a).unwrap().frame_nr,
        "the same frame"
    );
    let s = reader.stats();
    assert_eq!((s.pages_h2d, s.pages_d2d_in, s.pages_bounced), (0, 0, 0));
    assert_eq!(s.peer_mapped_pages, PART);
    assert_eq!(s.peer_accesses, PART);
    assert_eq!(m.gpus[0].vram_pages_in_use(), PART, "nothing moved");
    // A write by the reader lands in the holder's memory: the holder sees it.
    reader.write(at(a, 3), b"peer").unwrap();
    let mut seen = [0u8; 4];
    holder.read(at(a, 3), &mut seen).unwrap();
    assert_eq!(&seen, b"peer");
    let mut data = data;
    data[3 * PAGE_SIZE as usize..][..4].copy_from_slice(b"peer");
    m.check(a, &data);
    m.finish(vec![holder, reader]);
}

#[test]
fn the_source_copies_its_pages_straight_to_the_peer() {
    let m = machine(&[0, 0]);
    let (a, data) = m.buffer(PART);
    let first = m.vm(0, PeerPolicy::SourceCopy);
    let second = m.vm(1, PeerPolicy::SourceCopy);
    gpu_read(&first, a, 0, PART, &data);
    gpu_read(&second, a, 0, PART, &data);
    assert_eq!(second.lookup(a).unwrap().location, Location::Vram);
    assert_eq!(first.lookup(a), None, "the source's entries were zapped");
    assert_eq!(
        m.gpus[0].vram_pages_in_use(),
        0,
        "the source's frames are free"
    );
    assert_eq!(m.gpus[1].vram_pages_in_use(), PART);
    let (s0, s1) = (first.stats(), second.stats());
    assert_eq!((s1.pages_d2d_in, s0.pages_d2d_out), (PART, PART));
    assert_eq!((s1.pages_h2d, s0.pages_d2h, s1.pages_bounced), (0, 0, 0));
    assert_eq!(
        m.gpus[1].peer_pages_in(),
        vec![(m.gpus[0].pagemap_id(), PART)]
    );
    // And back, by a write.
    first.write(at(a, 5), b"back").unwrap();
    assert_eq!(first.stats().pages_d2d_in, 1);
    let mut data = data;
    data[5 * PAGE_SIZE as usize..][..4].copy_from_slice(b"back");
    m.check(a, &data);
    m.finish(vec![first, second]);
}

#[test]
fn a_bounce_goes_home_and_out_again() {
    let m = machine(&[0, 0]);
    let (a, data) = m.buffer(PART);
    let first = m.vm(0, PeerPolicy::SourceCopy);
    let second = m.vm(1, PeerPolicy::Bounce);
    gpu_read(&first, a, 0, PART, &data);
    gpu_read(&second, a, 0, PART, &data);
    assert_eq!(second.lookup(a).unwrap().location, Location::Vram);
    let (s0, s1) = (first.stats(), second.stats());
    assert_eq!(s1.pages_bounced, PART);
    assert_eq!(s0.pages_d2h, PART, "the source moved them home");
    assert_eq!(s1.pages_h2d, PART, "then they came to the destination");
    assert_eq!((s1.pages_d2d_in, s0.pages_d2d_out), (0, 0));
    assert_eq!(m.gpus[0].vram_pages_in_use(), 0);
    m.check(a, &data);
    m.finish(vec![first, second]);
}

#[test]
fn a_device_outside_the_group_faults_the_pages_home() {
    let m = machine(&[0, 1]);
    let (a, data) = m.buffer(PART);
    let first = m.vm(0, PeerPolicy::SourceCopy);
    let other = m.vm(1, PeerPolicy::SourceCopy);
    gpu_read(&first, a, 0, PART, &data);
    gpu_read(&other, a, 0, PART, &data);
    let (s0, s1) = (first.stats(), other.stats());
    assert_eq!(s0.pages_d2h, PART, "hmm_range_fault faulted them home");
    assert_eq!(s1.pages_h2d, PART);
    assert_eq!(
        (s1.pages_d2d_in, s1.pages_bounced, s1.peer_mapped_pages),
        (0, 0, 0)
    );
    m.check(a, &data);
    m.finish(vec![first, other]);
}

/// A range mixing pages of two devices of one group (A, B), of a device of another group
/// (C), and system pages. A migration by A with its group's owner collects A's and B's
/// pages and never C's; when A faults the whole range in, its own pages cost no
/// invalidation, B's come straight over the peer link, C's are faulted home by C (a
/// MIGRATE with C's owner) and come to A from system memory.
#[test]
fn the_owner_filter_across_three_devices_of_two_groups() {
    let m = machine(&[0, 0, 1]);
    let (a, data) = m.buffer(4 * PART);
    let vms: Vec<_> = (0..3).map(|g| m.vm(g, PeerPolicy::SourceCopy)).collect();
    for (g, vm) in vms.iter().enumerate() {
        gpu_read(vm, a, g as u64 * PART, PART, &data);
    }
    let group = m.gpus[0].owner();
    let other = m.gpus[2].owner();

    // The owner filter at the core: SELECT_DEVICE_PRIVATE with the group's owner.
    {
        let mmap = m.mm.mmap_read();
        let args = MigrateVma {
            start: a,
            end: at(a, 4 * PART),
            pgmap_owner: Some(group),
            flags: MigrateVmaFlags::SELECT_DEVICE_PRIVATE,
            fault_page: None,
        };
        let mig = migrate_vma_setup(&mmap, args).unwrap();
        let collected: Vec<bool> = mig.src().iter().map(|w| w.is_migrating()).collect();
        assert!(
            collected[..2 * PART as usize].iter().all(|&c| c),
            "A's and B's"
        );
        assert!(
            collected[2 * PART as usize..].iter().all(|&c| !c),
            "neither C's pages nor system pages"
        );
        // No destinations: every page is put back.
        assert_eq!(mig.pages().finalize().restored, 2 * PART);
    }
    // The collection zapped A's and B's entries (their notifiers skip the group's
    // MIGRATE); fault them back in before counting.
    gpu_read(&vms[0], a, 0, PART, &data);

    let rec = Arc::new(Recorder::new());
    let _handle = m.mm.register_notifier(rec.clone()).unwrap();
    let before: Vec<_> = vms.iter().map(|v| v.stats()).collect();
    let own = vms[0].lookup(a).unwrap();
    gpu_read(&vms[0], a, 0, 4 * PART, &data);
    let d: Vec<_> = vms
        .iter()
        .zip(&before)
        .map(|(v, b)| v.stats().since(b))
        .collect();
    assert_eq!(vms[0].lookup(a), Some(own), "A's own pages stayed mapped");
    assert_eq!(d[0].pages_d2d_in, PART, "B's pages came over the peer link");
    assert_eq!(d[1].pages_d2d_out, PART);
    assert_eq!(d[2].pages_d2h, PART, "C moved its own pages home");
    assert_eq!(d[0].pages_h2d, 2 * PART, "C's and the system pages");
    let events = rec.take();
    let migrate_owners: Vec<_> = events
        .iter()
        .filter(|r| r.event == NotifierEvent::Migrate)
        .map(|r| r.owner)
        .collect();
    assert!(migrate_owners.contains(&Some(other)), "C's migrate_to_ram");
    assert!(
        migrate_owners
            .iter()
            .all(|o| *o == Some(group) || *o == Some(other)),
        "every MIGRATE carries the owner of the device that migrated"
    );
    // A's own pages took no invalidation on any device: only moved pages were zapped.
    assert_eq!(d[0].pages_invalidated, 0, "nothing A held was zapped");
    for g in 0..3 {
        let loc = vms[0].lookup(at(a, g * PART)).unwrap().location;
        assert_eq!(loc, Location::Vram);
    }
    assert_eq!(m.gpus[0].vram_pages_in_use(), 4 * PART);
    m.check(a, &data);
    m.finish(vms);
}

/// A CPU fault on a page A holds zaps the mapping B has of it over the peer link (B's
/// notifier skips the group's MIGRATE: A's handler zaps B itself).
#[test]
fn a_cpu_fault_zaps_the_peers_mapping() {
    let m = machine(&[0, 0]);
    let (a, mut data) = m.buffer(PART);
    let holder = m.vm(0, PeerPolicy::SourceCopy);
    let reader = m.vm(1, PeerPolicy::RemoteMap);
    gpu_read(&holder, a, 0, PART, &data);
    gpu_read(&reader, a, 0, PART, &data);
    assert_eq!(reader.lookup(at(a, 2)).unwrap().location, Location::Peer);
    m.mm.write(at(a, 2), b"cpu").unwrap();
    data[2 * PAGE_SIZE as usize..][..3].copy_from_slice(b"cpu");
    assert_eq!(reader.lookup(at(a, 2)), None, "the peer mapping is gone");
    assert_eq!(holder.lookup(at(a, 2)), None);
    // In system memory now, the page migrates on the reader's first touch; the others
    // stay mapped over the peer link.
    gpu_read(&reader, a, 0, PART, &data);
    assert_eq!(reader.lookup(at(a, 2)).unwrap().location, Location::Vram);
    assert_eq!(reader.lookup(at(a, 3)).unwrap().location, Location::Peer);
    m.check(a, &data);
    m.finish(vec![holder, reader]);
}

/// A device taken offline moves every page home while a peer maps some of them: the peer's
/// mappings go, the CPU and the peer read every byte, the device's VMs fail cleanly; back
/// online, it faults from nothing and migrates again.
#[test]
fn a_device_goes_offline_and_comes_back() {
    let m = machine(&[0, 0]);
    let (a, mut data) = m.buffer(4 * PART);
    let gone = m.vm(0, PeerPolicy::SourceCopy);
    let peer = m.vm(1, PeerPolicy::RemoteMap);
    gpu_read(&gone, a, 0, 4 * PART, &data);
    gpu_read(&peer, a, 0, PART, &data);
    assert_eq!(peer.lookup(a).unwrap().location, Location::Peer);
    let report = m.gpus[0].offline(EvictTarget::Host).unwrap();
    assert_eq!(report.pages_home, 4 * PART);
    assert_eq!(report.entries_dropped, 4 * PART);
    assert!(!m.gpus[0].is_online());
    assert_eq!(m.gpus[0].vram_pages_in_use(), 0);
    assert_eq!(
        peer.lookup(a),
        None,
        "the peer's mappings went with the pages"
    );
    assert_eq!(gone.mapped_pages(), 0);
    assert_eq!(gone.nr_ranges(), 0);
    let mut buf = [0u8; 8];
    assert_eq!(gone.read(a, &mut buf), Err(SvmError::Offline));
    assert_eq!(gone.prefetch(a, PAGE_SIZE), Err(SvmError::Offline));
    assert_eq!(gone.service_faults(), Err(SvmError::Offline));
    // The others go on.
    m.mm.write(at(a, 1), b"cpu").unwrap();
    data[PAGE_SIZE as usize..][..3].copy_from_slice(b"cpu");
    gpu_read(&peer, a, 0, 4 * PART, &data);
    m.check(a, &data);
    // Twice is nothing more.
    assert_eq!(m.gpus[0].offline(EvictTarget::Host).unwrap().pages_home, 0);
    m.gpus[0].online().unwrap();
    m.gpus[0].online().unwrap();
    let before = gone.stats();
    gpu_read(&gone, a, 0, 4 * PART, &data);
    assert_eq!(gone.lookup(a).unwrap().location, Location::Vram);
    // The CPU's read-back left every page in system memory.
    assert_eq!(gone.stats().since(&before).pages_h2d, 4 * PART);
    m.check(a, &data);
    m.finish(vec![gone, peer]);
}

/// Offline to a peer: the pages move over the link, not home.
#[test]
fn a_device_going_offline_hands_its_pages_to_a_peer() {
    let m = machine(&[0, 0, 1]);
    let (a, data) = m.buffer(2 * PART);
    let gone = m.vm(0, PeerPolicy::SourceCopy);
    gpu_read(&gone, a, 0, 2 * PART, &data);
    let report = m.gpus[0].offline(EvictTarget::Peer).unwrap();
    assert_eq!((report.pages_to_peers, report.pages_home), (2 * PART, 0));
    assert_eq!(
        m.gpus[1].vram_pages_in_use(),
        2 * PART,
        "the peer of the group"
    );
    assert_eq!(
        m.gpus[2].vram_pages_in_use(),
        0,
        "not the device of another group"
    );
    assert_eq!(
        m.gpus[1].peer_pages_in(),
        vec![(m.gpus[0].pagemap_id(), 2 * PART)]
    );
    m.check(a, &data);
    assert_eq!(
        m.gpus[1].vram_pages_in_use(),
        0,
        "the CPU took them from the peer"
    );
    m.finish(vec![gone]);
}

/// Device memory full on one GPU while its peer has room: evicting to the peer moves no
/// page home; evicting home does.
#[test]
fn eviction_goes_to_a_peer_with_room_when_asked() {
    for target in [EvictTarget::Host, EvictTarget::Peer] {
        let m = machine_with(&[0, 0], &[2, 8], target);
        let (a, data) = m.buffer(4 * 512);
        let small = m.vm(0, PeerPolicy::SourceCopy);
        gpu_read(&small, a, 0, 4 * 512, &data);
        let s = small.stats();
        assert!(
            s.evictions > 0,
            "{target:?}: 8 MiB through 2 MiB of device memory"
        );
        match target {
            EvictTarget::Host => {
                assert_eq!(s.pages_d2h, s.evicted_pages);
                assert_eq!(m.gpus[1].vram_pages_in_use(), 0);
            }
            EvictTarget::Peer => {
                assert_eq!(s.pages_d2h, 0, "nothing went home");
                assert_eq!(s.pages_d2d_out, s.evicted_pages, "this device copied them");
                assert_eq!(m.gpus[1].stats().pages_d2d_in, s.evicted_pages);
                assert_eq!(m.gpus[1].vram_pages_in_use(), s.evicted_pages);
            }
        }
        m.check(a, &data);
        m.finish(vec![small]);
    }
}
