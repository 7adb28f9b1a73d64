//! The deterministic engine: every agent of a phase advances in simulated-time order on
//! one OS thread, so a scenario and its seed give the same counters, bit for bit.
//!
//! Each step takes the agent with the earliest time (ties: the lower agent index), makes
//! its next access on the real system (a GPU load or store through `hmm-svm`, a CPU load or
//! store through the address space), and charges it from the cost model: a hit costs an
//! access (local or remote), a GPU fault costs the batch the agent's thread services
//! (batch, faults, bytes moved over the link) and the access is made again at the agent's
//! new time, a CPU access that brought a device page home costs a CPU fault and the bytes.
//! The policies' clock is the simulated one. Bytes are real: every write is also made in a
//! shadow copy of the buffer, and the run ends with the byte check (the CPU reads every
//! buffer back and compares) and the frame audit (nothing in use once all is torn down).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Instant;

use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::mm::{Advice, MapFlags, Mm, Prot};
use hmm::phys::{PhysConfig, PhysMem};
use hmm_svm::clock::ManualClock;
use hmm_svm::policy::eviction::{EvictionPolicy, Fifo, Lfu, Lru, RandomEviction};
use hmm_svm::policy::prefetch::{NoPrefetch, PrefetchPolicy, TreePrefetch, WholeRange};
use hmm_svm::policy::thrashing::ThrashingDetector;
use hmm_svm::policy::{CounterDriven, FirstTouch, MigrationPolicy, RemoteMap, VmPolicies};
use hmm_svm::{EvictTarget, GpuConfig, GpuDevice, GpuVm, Outcome, PeerGroup, PeerPolicy, SvmStats};
use serde::Serialize;
use thiserror::Error;

use std::io::Write;

use hmm::notifier::{MmuNotifierHandle, Recorder};
use serde_json::{json, Value};

use crate::cost::CostModel;
use crate::pattern::Pattern;
use crate::record::{Recording, Sample};
use crate::scenario::Scenario;
use crate::timeline::{self, Timeline};
use crate::topology::{Engines, Links, Traffic};

/// What a run measured (`hmm run --json` prints it).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    /// The scenario's name.
    pub scenario: String,
    /// Its seed.
    pub seed: u64,
    /// Simulated time at the end of the last phase, ns.
    pub sim_time_ns: u64,
    /// Wall time of the run (set-up and the final checks excluded), s.
    pub wall_seconds: f64,
    /// Accesses made.
    pub events: u64,
    /// `events / wall_seconds`.
    pub events_per_second: f64,
    /// GPU faults raised (all GPUs).
    pub gpu_faults: u64,
    /// Fault batches serviced.
    pub fault_batches: u64,
    /// Bytes migrated host to device.
    pub bytes_h2d: u64,
    /// Bytes migrated device to host.
    pub bytes_d2h: u64,
    /// Bytes migrated device to device directly (between peers).
    pub bytes_d2d: u64,
    /// Bytes that went from one GPU to another through system memory (counted in
    /// `bytes_d2h` and `bytes_h2d` too).
    pub bytes_bounced: u64,
    /// Bytes each link carried: `host-gpu0`, `gpu0-host`, `gpu0-gpu1` (links that
    /// carried none left out).
    pub bytes_by_link: std::collections::BTreeMap<String, u64>,
    /// Chunks of device memory evicted.
    pub evictions: u64,
    /// Pages migrated that had not faulted.
    pub prefetched_pages: u64,
    /// Thrashing detected.
    pub thrash_detections: u64,
    /// GPU accesses that went over the link.
    pub remote_accesses: u64,
    /// GPU accesses to a peer's memory over the peer link.
    pub peer_accesses: u64,
    /// Bytes that differed from the shadow copy: read by an agent, or in the final read-back.
    pub corrupted_bytes: u64,
    /// Frames still in use after everything was torn down.
    pub leaked_frames: u64,
    /// The policies, by name.
    pub policy: crate::scenario::Policy,
}

/// Why a run failed (not a wrong byte: that is `corrupted_bytes`).
#[derive(Debug, Error)]
pub enum RunError {
    /// The machine could not be made.
    #[error("setting up the machine: {0}")]
    Setup(String),
    /// The timeline could not be written.
    #[error("writing the timeline: {0}")]
    Timeline(std::io::Error),
    /// An access faulted again after every one of its replays: the workload livelocks
    /// (with thrashing detection off, two agents can take a page from each other for ever).
    #[error("{agent} at {addr}: faulted {faults} times in a row (livelock)")]
    Livelock {
        /// The agent.
        agent: String,
        /// The address.
        addr: VirtAddr,
        /// Faults in a row.
        faults: u32,
    },
    /// A GPU could not go offline or come back.
    #[error("{what}: {why}")]
    Device {
        /// What was asked (`phase 1, gpu3 offline`).
        what: String,
        /// The error.
        why: String,
    },
    /// An access failed that should not (the model refused a valid access).
    #[error("{agent} at {addr}: {why}")]
    Access {
        /// The agent (`phase 0, agent 1 on gpu0`).
        agent: String,
        /// The address.
        addr: VirtAddr,
        /// The error.
        why: String,
    },
}

/// One agent of the running phase.
pub(crate) struct Running {
    pub(crate) who: Actor,
    /// The agent's span's offset in the buffer.
    pub(crate) offset: u64,
    pub(crate) buffer: usize,
    pub(crate) pattern: Pattern,
    pub(crate) bytes: usize,
    /// Writes made, for the values written.
    pub(crate) seq: u64,
    pub(crate) name: String,
}

fn migration_policy(name: &str) -> Box<dyn MigrationPolicy> {
    match name {
        "remote" => Box::new(RemoteMap),
        "counters" => Box::new(CounterDriven),
        _ => Box::new(FirstTouch),
    }
}

fn prefetch_policy(name: &str) -> Box<dyn PrefetchPolicy> {
    match name {
        "none" => Box::new(NoPrefetch),
        "tree" => Box::new(TreePrefetch::default()),
        _ => Box::new(WholeRange),
    }
}

fn peer_policy(name: &str) -> PeerPolicy {
    match name {
        "bounce" => PeerPolicy::Bounce,
        "remote" => PeerPolicy::RemoteMap,
        _ => PeerPolicy::SourceCopy,
    }
}

fn evict_target(name: &str) -> EvictTarget {
    match name {
        "peer" => EvictTarget::Peer,
        _ => EvictTarget::Host,
    }
}

fn eviction_policy(name: &str, seed: u64) -> Box<dyn EvictionPolicy> {
    match name {
        "fifo" => Box::new(Fifo),
        "lfu" => Box::new(Lfu),
        "random" => Box::new(RandomEviction::new(seed)),
        _ => Box::new(Lru),
    }
}

/// The sum of every GPU's counters.
fn total(vms: &[Arc<GpuVm>]) -> SvmStats {
    let mut t = SvmStats::default();
    for v in vms {
        let s = v.stats();
        t.gpu_faults += s.gpu_faults;
        t.fault_batches += s.fault_batches;
        t.duplicate_faults += s.duplicate_faults;
        t.pages_h2d += s.pages_h2d;
        t.pages_d2h += s.pages_d2h;
        t.pages_bounced += s.pages_bounced;
        t.evictions += s.evictions;
        t.prefetched_pages += s.prefetched_pages;
        t.thrash_detections += s.thrash_detections;
        t.thrash_pins += s.thrash_pins;
        t.thrash_throttles += s.thrash_throttles;
        t.remote_accesses += s.remote_accesses;
        t.peer_accesses += s.peer_accesses;
    }
    t
}

/// The machine a scenario describes, with its buffers written and their shadows: what
/// both a scenario run and a trace replay drive, one access at a time.
pub(crate) struct World {
    phys: Arc<PhysMem>,
    pub(crate) clock: Arc<ManualClock>,
    pub(crate) gpus: Vec<Arc<GpuDevice>>,
    pub(crate) mm: Arc<Mm>,
    pub(crate) vms: Vec<Arc<GpuVm>>,
    pub(crate) bases: Vec<VirtAddr>,
    pub(crate) sizes: Vec<u64>,
    pub(crate) shadows: Vec<Vec<u8>>,
    pub(crate) cost: CostModel,
    pub(crate) links: Links,
    /// When each GPU's copy engines are free again.
    engines: Engines,
    buf: Vec<u8>,
    pub(crate) events: u64,
    /// Bytes reads returned that differ from the shadow.
    pub(crate) read_mismatches: u64,
    /// The timeline being written, and the recorder of invalidations it draws.
    timeline: Option<(Timeline, Arc<Recorder>, MmuNotifierHandle)>,
    /// The samples for plots and reports, if asked for.
    recording: Option<Recording>,
}

/// What a run writes or keeps besides its metrics.
#[derive(Default)]
pub struct Outputs {
    /// Where the timeline goes (`timeline`'s trace-event JSON).
    pub trace: Option<Box<dyn Write + Send>>,
    /// Whether to keep a [`Recording`] of the run.
    pub record: bool,
}

/// Who makes an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Actor {
    /// A CPU thread (its number: the agent's index in its phase, each its own track).
    Cpu(usize),
    Gpu(usize),
}

/// One access: who, where (buffer and offset), how many bytes, which way, and the stamp a
/// write stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Req {
    pub(crate) who: Actor,
    pub(crate) buffer: usize,
    pub(crate) offset: u64,
    pub(crate) len: usize,
    pub(crate) write: bool,
    pub(crate) stamp: u64,
}

/// What one access did: completed (at this cost), or faulted (the batch it serviced cost
/// this; the access must be made again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Done(u64),
    Faulted(u64),
}

impl World {
    /// Builds the machine of `s` (already validated), writing a timeline to `trace` if
    /// given.
    pub(crate) fn new(s: &Scenario, out: Outputs) -> Result<World, RunError> {
        let Outputs { trace, record } = out;
        let setup = |e: &dyn std::fmt::Display| RunError::Setup(e.to_string());
        let phys = PhysMem::new(PhysConfig {
            // One free list: the frames a run gets do not depend on the host CPU the
            // engine's thread happens to run on.
            per_cpu_lists: false,
            ..PhysConfig::with_size(s.machine.ram_mib << 20)
        })
        .map_err(|e| setup(&e))?;
        let clock = Arc::new(ManualClock::new(0));
        // One peer group per group name, in the order the names first appear.
        let mut groups: Vec<(&str, Arc<PeerGroup>)> = Vec::new();
        let gpus: Vec<Arc<GpuDevice>> = s
            .machine
            .gpus
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let config = GpuConfig {
                    vram_bytes: g.vram_mib << 20,
                    evict_to: evict_target(&s.policy.evict_to),
                    ..GpuConfig::default()
                };
                let group = match g.group.as_deref() {
                    None => PeerGroup::new(),
                    Some(name) => match groups.iter().find(|(n, _)| *n == name) {
                        Some((_, grp)) => Arc::clone(grp),
                        None => {
                            let grp = PeerGroup::new();
                            groups.push((name, Arc::clone(&grp)));
                            grp
                        }
                    },
                };
                GpuDevice::in_group_with_eviction(
                    &phys,
                    config,
                    &group,
                    eviction_policy(&s.policy.eviction, s.seed + i as u64),
                )
                .map_err(|e| setup(&e))
            })
            .collect::<Result<_, _>>()?;
        let mm = Mm::new(Arc::clone(&phys));
        let vms: Vec<Arc<GpuVm>> = gpus
            .iter()
            .map(|g| {
                let policies = VmPolicies {
                    migration: migration_policy(&s.policy.migration),
                    prefetch: prefetch_policy(&s.policy.prefetch),
                    thrashing: s.policy.thrashing.then(ThrashingDetector::default),
                    access_counter_threshold: (s.policy.access_counters > 0)
                        .then_some(s.policy.access_counters),
                    clock: clock.clone(),
                    peer: peer_policy(&s.policy.peer),
                };
                GpuVm::with_policies(g, &mm, policies)
            })
            .collect();
        // The buffers, written by the CPU (untimed), and their shadows.
        let mut bases = Vec::new();
        let mut sizes = Vec::new();
        let mut shadows = Vec::new();
        for (i, b) in s.buffers.iter().enumerate() {
            let len = b.mib << 20;
            let a = mm
                .mmap(None, len, Prot::READ | Prot::WRITE, MapFlags::PRIVATE)
                .map_err(|e| setup(&e))?;
            let advice = if b.thp {
                Advice::HugePage
            } else {
                Advice::NoHugePage
            };
            mm.madvise(a, len, advice).map_err(|e| setup(&e))?;
            // No two 8-byte words of any buffer alike: a page or a buffer mixed up with
            // another cannot go unseen.
            let data: Vec<u8> = (0..len / 8)
                .flat_map(|w| mix((i as u64) << 48 ^ w).to_le_bytes())
                .collect();
            mm.write(a, &data).map_err(|e| setup(&e))?;
            bases.push(a);
            sizes.push(len);
            shadows.push(data);
        }
        let timeline = match trace {
            None => None,
            Some(out) => {
                let rec = Arc::new(Recorder::new());
                let handle = mm.register_notifier(rec.clone()).map_err(|e| setup(&e))?;
                Some((Timeline::new(out, gpus.len()), rec, handle))
            }
        };
        Ok(World {
            phys,
            clock,
            gpus,
            mm,
            vms,
            bases,
            sizes,
            shadows,
            cost: s.cost,
            links: Links::new(&s.machine, &s.cost),
            engines: Engines::new(s.machine.gpus.len()),
            buf: vec![0u8; 4096],
            events: 0,
            read_mismatches: 0,
            timeline,
            recording: record.then(Recording::new),
        })
    }

    /// Samples the run at `t` for its recording, if it keeps one; `batches` fault batches
    /// of `faults` faults in all were serviced just before.
    fn note(&mut self, t: u64, batches: u64, faults: u64) {
        if self.recording.is_none() {
            return;
        }
        let traffic = self.traffic();
        let resident = self.gpus.iter().map(|g| g.vram_pages_in_use()).collect();
        let r = self.recording.as_mut().expect("checked");
        for b in 0..batches {
            // The faults shared out among the batches, the first ones taking the rest.
            r.batch(faults / batches + u64::from(b < faults % batches));
        }
        r.sample(Sample {
            t_ns: t,
            h2d_pages: traffic.h2d.iter().sum(),
            d2h_pages: traffic.d2h.iter().sum(),
            d2d_pages: traffic.d2d_pages(),
            resident_pages: resident,
        });
    }

    /// Draws a slice on the timeline, if there is one.
    pub(crate) fn slice(&mut self, track: u32, name: &str, start: u64, dur: u64, args: Value) {
        if let Some((t, _, _)) = &mut self.timeline {
            t.slice(track, name, start, dur, args);
        }
    }

    /// Places the transfers of the traffic `after - before` on the copy engines from `start`
    /// (waiting for engines earlier transfers hold) and draws them on the engines' tracks;
    /// returns how long after `start` the last one ends.
    fn transfers(&mut self, start: u64, after: &Traffic, before: &Traffic) -> u64 {
        let (placed, end) = self.links.place(&mut self.engines, start, after, before);
        if self.timeline.is_some() {
            for x in placed {
                let args = json!({ "bytes": x.bytes });
                self.slice(
                    timeline::gpu_copy(x.engine),
                    &x.name,
                    x.start_ns,
                    x.ns,
                    args,
                );
            }
        }
        end - start
    }

    /// Draws an instant on the timeline, if there is one.
    fn instant(&mut self, track: u32, name: &str, at: u64, args: Value) {
        if let Some((t, _, _)) = &mut self.timeline {
            t.instant(track, name, at, args);
        }
    }

    /// Draws the invalidations recorded since the last call as instants at `now`.
    fn invalidations(&mut self, now: u64) {
        if let Some((t, rec, _)) = &mut self.timeline {
            for r in rec.take() {
                t.instant(
                    timeline::NOTIFIER,
                    r.event.kernel_name(),
                    now,
                    json!({
                        "owner": r.owner.map(|o| o.as_u64()),
                        "start": format!("{:#x}", r.start().as_u64()),
                        "pages": r.range.npages(),
                    }),
                );
            }
        }
    }

    /// An explicit prefetch of buffer `b` to GPU `g` at `now`; returns its cost.
    pub(crate) fn prefetch(&mut self, g: usize, b: usize, now: u64) -> Result<u64, String> {
        let before = self.traffic();
        self.clock.set(now);
        self.vms[g]
            .prefetch(self.bases[b], self.sizes[b])
            .map_err(|e| e.to_string())?;
        let after = self.traffic();
        let moved = after.h2d[g] - before.h2d[g];
        let spent = self.transfers(now, &after, &before);
        self.note(now + spent, 0, 0);
        self.slice(
            timeline::gpu_driver(g),
            "prefetch",
            now,
            spent,
            json!({"pages": moved}),
        );
        self.invalidations(now);
        Ok(spent)
    }

    /// GPU `g` goes offline at `now` (its pages to a peer with `to`, else home); returns
    /// what moving them cost.
    pub(crate) fn offline(&mut self, g: usize, to: EvictTarget, now: u64) -> Result<u64, String> {
        let before = self.traffic();
        self.clock.set(now);
        let report = self.gpus[g].offline(to).map_err(|e| e.to_string())?;
        let after = self.traffic();
        let spent = self.transfers(now, &after, &before);
        self.note(now + spent, 0, 0);
        let args =
            json!({"pages_home": report.pages_home, "pages_to_peers": report.pages_to_peers});
        self.slice(timeline::gpu_driver(g), "offline", now, spent, args);
        self.invalidations(now);
        Ok(spent)
    }

    /// GPU `g` comes back online.
    pub(crate) fn online(&mut self, g: usize, now: u64) -> Result<(), String> {
        self.gpus[g].online().map_err(|e| e.to_string())?;
        self.slice(timeline::gpu_driver(g), "online", now, 0, json!({}));
        Ok(())
    }

    /// What phase `p` does at its start, at `now`: GPUs come back, then go away, then the
    /// explicit prefetches; returns the time the agents start.
    pub(crate) fn start_phase(
        &mut self,
        s: &Scenario,
        p: usize,
        mut now: u64,
    ) -> Result<u64, RunError> {
        let phase = &s.phases[p];
        for g in &phase.online {
            let i = crate::scenario::Phase::gpu_index(g);
            self.online(i, now).map_err(|why| RunError::Device {
                what: format!("phase {p}, {} online", g.get_ref()),
                why,
            })?;
        }
        for g in &phase.offline {
            let i = crate::scenario::Phase::gpu_index(g);
            let to = evict_target(&s.policy.evict_to);
            now += self.offline(i, to, now).map_err(|why| RunError::Device {
                what: format!("phase {p}, {} offline", g.get_ref()),
                why,
            })?;
        }
        for f in &phase.prefetch {
            let b = buffer_index(s, f.buffer.get_ref());
            let g = crate::scenario::Phase::gpu_index(&f.to);
            now += self.prefetch(g, b, now).map_err(|why| RunError::Access {
                agent: format!("phase {p}, prefetch to {}", f.to.get_ref()),
                addr: self.bases[b],
                why,
            })?;
        }
        Ok(now)
    }

    /// The pages every link has carried so far.
    fn traffic(&self) -> Traffic {
        Traffic::of(&self.gpus)
    }

    /// `r.who` makes the access `r` at time `now`; a write stores `r.stamp`
    /// (little-endian) in its first 8 bytes and whatever the scratch buffer held in the
    /// rest, in the shadow too.
    pub(crate) fn access(&mut self, r: &Req, now: u64) -> Result<Step, String> {
        let Req {
            who,
            buffer: b,
            offset,
            len,
            write,
            stamp,
        } = *r;
        let addr = self.bases[b]
            .checked_add(offset)
            .expect("inside the buffer");
        // The scratch bytes leave `self` for the access (whose drawing borrows `self`);
        // a failed access leaves an empty one behind, refilled here.
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(4096, 0);
        let data = &mut buf[..len];
        if write {
            // Every byte written comes from the stamp, none from an earlier read.
            fill(data, stamp);
        }
        let cost = &self.cost;
        let spent = match who {
            Actor::Gpu(g) => {
                let vm = &self.vms[g];
                match vm
                    .try_access(addr, write, data)
                    .map_err(|e| e.to_string())?
                {
                    Outcome::Done {
                        local,
                        remote,
                        peer,
                    } => {
                        let mut spent = cost.hit_ns(local, remote, peer);
                        if vm.has_notifications() {
                            // The access counters fired: the driver migrates the hot
                            // blocks now, and the agent that tripped them waits for it.
                            self.clock.set(now);
                            let before = Traffic::of(&self.gpus);
                            vm.service_access_counters().map_err(|e| e.to_string())?;
                            let after = Traffic::of(&self.gpus);
                            spent += self.transfers(now + spent, &after, &before);
                            self.note(now + spent, 0, 0);
                        }
                        spent
                    }
                    Outcome::Faulted(_) => {
                        // The agent services the batch; the access is made again. The
                        // policies read the clock only here and in CPU faults: hits do
                        // not set it.
                        self.clock.set(now);
                        let before = total(&self.vms);
                        let moved_before = Traffic::of(&self.gpus);
                        let report = vm.service_faults().map_err(|e| e.to_string())?;
                        let after = total(&self.vms);
                        let moved = Traffic::of(&self.gpus);
                        let overhead =
                            cost.fault_batch_ns * report.batches + cost.fault_ns * report.faults;
                        let spent =
                            overhead + self.transfers(now + overhead, &moved, &moved_before);
                        self.buf = buf;
                        self.note(now + spent, report.batches, report.faults);
                        if self.timeline.is_some() {
                            let d = after.since(&before);
                            let args = json!({
                                "faults": report.faults,
                                "pages_h2d": d.pages_h2d,
                                "pages_d2h": d.pages_d2h,
                                "pages_d2d": moved.d2d_pages() - moved_before.d2d_pages(),
                                "evictions": d.evictions,
                            });
                            let track = timeline::gpu_driver(g);
                            self.slice(track, "fault batch", now, spent, args);
                            if d.evictions > 0 {
                                let args = json!({ "chunks": d.evictions });
                                self.instant(track, "eviction", now + overhead, args);
                            }
                            if d.thrash_detections > 0 {
                                let args = json!({
                                    "detections": d.thrash_detections,
                                    "pins": d.thrash_pins,
                                    "throttles": d.thrash_throttles,
                                });
                                self.instant(track, "thrashing", now, args);
                            }
                            self.invalidations(now);
                        }
                        return Ok(Step::Faulted(spent));
                    }
                }
            }
            Actor::Cpu(k) => {
                self.clock.set(now);
                // A CPU fault moves pages home only: each GPU's over its host link. At
                // most 8 GPUs (validated): no allocation per access.
                let home = |gpus: &[Arc<GpuDevice>]| {
                    let mut d2h = [0u64; crate::scenario::MAX_GPUS];
                    gpus.iter()
                        .zip(&mut d2h)
                        .for_each(|(g, n)| *n = g.pages_d2h());
                    d2h
                };
                let before = home(&self.gpus);
                if write {
                    self.mm.write(addr, data)
                } else {
                    self.mm.read(addr, data)
                }
                .map_err(|e| e.to_string())?;
                let after = home(&self.gpus);
                let came: u64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
                if came > 0 {
                    // Pages home only: each GPU's, out over its host link.
                    let n = self.gpus.len();
                    let traffic = |d2h: &[u64]| Traffic {
                        h2d: vec![0; n],
                        d2h: d2h[..n].to_vec(),
                        d2d: vec![0; n * n],
                    };
                    let fault_ns = cost.cpu_fault_ns;
                    let moved = self.transfers(now + fault_ns, &traffic(&after), &traffic(&before));
                    let spent = fault_ns + moved;
                    self.note(now + spent, 0, 0);
                    if let Some((t, _, _)) = &mut self.timeline {
                        let track = t.cpu(k);
                        t.slice(
                            track,
                            "migrate_to_ram",
                            now,
                            spent,
                            json!({ "pages": came }),
                        );
                        self.invalidations(now);
                    }
                    spent
                } else {
                    cost.cpu_access_ns
                }
            }
        };
        // CAST: the buffers are in this process's memory: offsets fit usize.
        let at = offset as usize;
        let shadow = &mut self.shadows[b][at..at + len];
        if write {
            shadow.copy_from_slice(data);
        } else {
            // A read must see what was last written there (compared whole first: the
            // bytes are counted only when they differ).
            if shadow != &*data {
                self.read_mismatches += shadow
                    .iter()
                    .zip(data.iter())
                    .filter(|(x, y)| x != y)
                    .count() as u64;
            }
        }
        self.buf = buf;
        self.events += 1;
        Ok(Step::Done(spent.max(1)))
    }

    /// The byte check and the frame audit; the metrics of the run, and its recording if
    /// it kept one.
    pub(crate) fn finish(
        mut self,
        s: &Scenario,
        sim_time_ns: u64,
        wall: f64,
    ) -> Result<(Metrics, Option<Recording>), RunError> {
        self.note(sim_time_ns, 0, 0);
        let recording = self.recording.take().map(|mut r| {
            r.finish();
            r
        });
        let setup = |e: &dyn std::fmt::Display| RunError::Setup(e.to_string());
        let t = total(&self.vms);
        let traffic = self.traffic();
        let mut corrupted = 0u64;
        for (b, shadow) in self.shadows.iter().enumerate() {
            let mut back = vec![0u8; shadow.len()];
            self.mm
                .read(self.bases[b], &mut back)
                .map_err(|e| setup(&e))?;
            corrupted += back.iter().zip(shadow).filter(|(x, y)| x != y).count() as u64;
        }
        self.mm.audit().map_err(|e| setup(&e))?;
        let World {
            phys,
            gpus,
            mm,
            vms,
            events,
            timeline,
            read_mismatches,
            ..
        } = self;
        if let Some((t, _, handle)) = timeline {
            drop(handle);
            t.finish().map_err(RunError::Timeline)?;
        }
        drop(vms);
        drop(mm);
        let leaked = phys.nr_in_use() + gpus.iter().map(|g| g.vram_pages_in_use()).sum::<u64>();
        let metrics = Metrics {
            scenario: s.name.clone(),
            seed: s.seed,
            sim_time_ns,
            wall_seconds: wall,
            events,
            events_per_second: events as f64 / wall.max(1e-9),
            gpu_faults: t.gpu_faults,
            fault_batches: t.fault_batches,
            bytes_h2d: t.pages_h2d * PAGE_SIZE,
            bytes_d2h: t.pages_d2h * PAGE_SIZE,
            bytes_d2d: traffic.d2d_pages() * PAGE_SIZE,
            bytes_bounced: t.pages_bounced * PAGE_SIZE,
            bytes_by_link: traffic.by_link(),
            evictions: t.evictions,
            prefetched_pages: t.prefetched_pages,
            thrash_detections: t.thrash_detections,
            remote_accesses: t.remote_accesses,
            peer_accesses: t.peer_accesses,
            corrupted_bytes: corrupted + read_mismatches,
            leaked_frames: leaked,
            policy: s.policy.clone(),
        };
        Ok((metrics, recording))
    }
}

/// Faults in a row one access may take before the run is called a livelock.
pub(crate) const MAX_REFAULTS: u32 = 1000;

/// splitmix64's finaliser: a word no other input gives.
/// Fills `data` with the bytes a write stamped `stamp` stores: every 8 bytes from the
/// stamp, none from an earlier read.
pub(crate) fn fill(data: &mut [u8], stamp: u64) {
    for (k, chunk) in data.chunks_mut(8).enumerate() {
        let v = mix(stamp ^ (k as u64) << 56).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Runs `s` (already validated) and returns what it measured.
pub fn run(s: &Scenario) -> Result<Metrics, RunError> {
    run_with(s, Outputs::default()).map(|(m, _)| m)
}

/// [`run`], writing its timeline and keeping its recording as `out` asks.
pub fn run_with(s: &Scenario, out: Outputs) -> Result<(Metrics, Option<Recording>), RunError> {
    let mut w = World::new(s, out)?;
    let start = Instant::now();
    let mut now = 0u64;
    for (p, phase) in s.phases.iter().enumerate() {
        let phase_start = now;
        now = w.start_phase(s, p, now)?;
        let mut agents = agents_of(s, p);
        let mut queue: BinaryHeap<Reverse<(u64, usize)>> =
            (0..agents.len()).map(|k| Reverse((now, k))).collect();
        let mut pending: Vec<Option<crate::pattern::Access>> = vec![None; agents.len()];
        let mut refaults = vec![0u32; agents.len()];
        let mut end = now;
        // The earliest agent runs until its time passes the next one's: a run of hits is
        // not a scheduled event each (the order is the same as one pop per access).
        while let Some(Reverse((mut t, k))) = queue.pop() {
            loop {
                let a = &mut agents[k];
                let Some(acc) = pending[k].take().or_else(|| a.pattern.next_access()) else {
                    end = end.max(t);
                    break;
                };
                let stamp = (k as u64) << 48 | (p as u64) << 40 | a.seq;
                let offset = a.offset + acc.offset;
                let step = w
                    .access(
                        &Req {
                            who: a.who,
                            buffer: a.buffer,
                            offset,
                            len: a.bytes,
                            write: acc.write,
                            stamp,
                        },
                        t,
                    )
                    .map_err(|why| RunError::Access {
                        agent: a.name.clone(),
                        addr: w.bases[a.buffer].checked_add(offset).expect("inside"),
                        why,
                    })?;
                match step {
                    Step::Done(spent) => {
                        if acc.write {
                            a.seq += 1;
                        }
                        refaults[k] = 0;
                        t = t.saturating_add(spent);
                    }
                    Step::Faulted(spent) => {
                        refaults[k] += 1;
                        if refaults[k] > MAX_REFAULTS {
                            return Err(RunError::Livelock {
                                agent: a.name.clone(),
                                addr: w.bases[a.buffer].checked_add(offset).expect("inside"),
                                faults: refaults[k],
                            });
                        }
                        pending[k] = Some(acc);
                        t = t.saturating_add(spent);
                    }
                }
                if queue.peek().is_some_and(|Reverse(next)| *next < (t, k)) {
                    queue.push(Reverse((t, k)));
                    break;
                }
            }
        }
        let name = if phase.name.is_empty() {
            format!("phase {p}")
        } else {
            phase.name.clone()
        };
        w.slice(
            timeline::PHASES,
            &name,
            phase_start,
            end - phase_start,
            json!({}),
        );
        now = end;
    }
    let wall = start.elapsed().as_secs_f64();
    w.finish(s, now, wall)
}

/// The agents of phase `p`, each with its pattern seeded from the scenario's seed, the phase
/// and its index.
pub(crate) fn agents_of(s: &Scenario, p: usize) -> Vec<Running> {
    s.phases[p]
        .agents
        .iter()
        .enumerate()
        .map(|(k, a)| {
            let b = buffer_index(s, a.buffer.get_ref());
            let on = a.on.get_ref();
            let span = if a.span_mib == 0 {
                s.buffers[b].mib - a.offset_mib
            } else {
                a.span_mib
            };
            Running {
                who: on
                    .strip_prefix("gpu")
                    .map_or(Actor::Cpu(k), |n| Actor::Gpu(n.parse().expect("validated"))),
                offset: a.offset_mib << 20,
                buffer: b,
                pattern: Pattern::new(a, span << 20, s.seed ^ ((p as u64) << 32) ^ k as u64),
                bytes: a.access_bytes as usize,
                seq: 0,
                name: format!("phase {p}, agent {k} on {on}"),
            }
        })
        .collect()
}

/// The index of the buffer named `name` (validated to exist).
pub(crate) fn buffer_index(s: &Scenario, name: &str) -> usize {
    s.buffers
        .iter()
        .position(|b| b.name == name)
        .expect("validated")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::parse;

    const SMALL: &str = r#"
name = "small"
seed = 5
[machine]
ram_mib = 64
gpus = [{ vram_mib = 2 }]
[[buffer]]
name = "a"
mib = 4
[[phase]]
agents = [
  { on = "gpu0", buffer = "a", pattern = "random", access = "rw", count = 1000 },
  { on = "cpu", buffer = "a", pattern = "strided", stride = 65536, access = "write", passes = 3 },
]
"#;

    #[test]
    fn the_same_seed_gives_the_same_counters_and_no_byte_is_lost() {
        let s = parse(SMALL, &[]).unwrap();
        let a = run(&s).unwrap();
        let b = run(&s).unwrap();
        let strip = |m: &Metrics| Metrics {
            wall_seconds: 0.0,
            events_per_second: 0.0,
            ..m.clone()
        };
        assert_eq!(strip(&a), strip(&b), "deterministic");
        assert_eq!((a.corrupted_bytes, a.leaked_frames), (0, 0));
        assert!(
            a.gpu_faults > 0 && a.evictions > 0 && a.sim_time_ns > 0,
            "{a:?}"
        );
        assert_eq!(a.events, 1000 + 3 * 64);
        let other = run(&parse(SMALL, &["seed=6".into()]).unwrap()).unwrap();
        assert_ne!(strip(&other), strip(&a), "another seed, another run");
    }

    /// A `Write` into memory the test can read afterwards.
    #[derive(Clone, Default)]
    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_timeline_draws_batches_cpu_faults_phases_and_invalidations() {
        let s = parse(SMALL, &[]).unwrap();
        let sink = Sink::default();
        let out = Outputs {
            trace: Some(Box::new(sink.clone())),
            record: false,
        };
        let (m, _) = run_with(&s, out).unwrap();
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).expect("valid trace-event JSON");
        let events = v["traceEvents"].as_array().unwrap();
        let named = |n: &str| events.iter().filter(|e| e["name"] == n).count();
        assert_eq!(named("fault batch") as u64, m.fault_batches);
        assert_eq!(named("phase 0"), 1);
        assert!(named("MMU_NOTIFY_MIGRATE") > 0 && named("MMU_NOTIFY_CLEAR") > 0);
        assert!(named("migrate_to_ram") > 0, "the CPU agent took pages back");
        assert!(events.iter().any(|e| e["args"]["name"] == "gpu0 driver"));
        assert!(events.iter().any(|e| e["args"]["name"] == "gpu0 copy"));
        // The CPU agent (agent 1 of its phase) has its own track.
        assert!(events.iter().any(|e| e["args"]["name"] == "cpu thread 1"));
        assert!(events
            .iter()
            .any(|e| e["name"] == "migrate_to_ram" && e["tid"] == 201));
        // Every byte moved is drawn on a copy engine's track.
        let drawn = |n: &str| -> u64 {
            events
                .iter()
                .filter(|e| e["name"] == n && e["tid"] == timeline::gpu_copy(0))
                .map(|e| e["args"]["bytes"].as_u64().unwrap())
                .sum()
        };
        assert_eq!(drawn("host to gpu0"), m.bytes_h2d);
        assert_eq!(drawn("gpu0 to host"), m.bytes_d2h);
        assert_eq!(named("eviction") > 0, m.evictions > 0);
        assert_eq!(
            run(&s).unwrap().sim_time_ns,
            m.sim_time_ns,
            "drawing changes nothing"
        );
    }

    /// Two GPUs of one group take turns on one buffer; a third, outside the group, reads
    /// it last.
    const PEERS: &str = r#"
name = "peers"
[machine]
ram_mib = 64
gpus = [{ vram_mib = 8, group = "x" }, { vram_mib = 8, group = "x" }, { vram_mib = 8 }]
[policy]
prefetch = "none"
thrashing = false
[[buffer]]
name = "a"
mib = 2
[[phase]]
agents = [{ on = "gpu0", buffer = "a", access = "write", access_bytes = 4096 }]
[[phase]]
agents = [{ on = "gpu1", buffer = "a", access = "rw", access_bytes = 4096 }]
[[phase]]
agents = [{ on = "gpu2", buffer = "a", access = "read", access_bytes = 4096 }]
"#;

    #[test]
    fn each_peer_policy_moves_the_bytes_its_own_way() {
        let run_with = |peer: &str| {
            let s = parse(PEERS, &[format!("policy.peer={peer}")]).unwrap();
            let m = run(&s).unwrap();
            assert_eq!((m.corrupted_bytes, m.leaked_frames), (0, 0), "{peer}");
            assert_eq!(
                m,
                Metrics {
                    wall_seconds: m.wall_seconds,
                    events_per_second: m.events_per_second,
                    ..run(&s).unwrap()
                },
                "{peer}: deterministic"
            );
            m
        };
        let mib2 = 2 << 20;
        let copy = run_with("copy");
        assert_eq!(copy.bytes_d2d, mib2, "gpu0 copied its pages to gpu1");
        assert_eq!(copy.bytes_by_link.get("gpu0-gpu1"), Some(&mib2));
        assert_eq!(copy.bytes_bounced, 0);
        let bounce = run_with("bounce");
        assert_eq!((bounce.bytes_d2d, bounce.bytes_bounced), (0, mib2));
        assert_eq!(bounce.bytes_by_link.get("gpu0-host"), Some(&mib2));
        let remote = run_with("remote");
        assert_eq!((remote.bytes_d2d, remote.bytes_bounced), (0, 0));
        assert_eq!(
            remote.peer_accesses, 512,
            "gpu1 reached every page over the peer link"
        );
        for m in [&copy, &bounce, &remote] {
            // gpu2 is outside the group: whoever holds the pages moves them home first.
            assert!(m.bytes_by_link.get("host-gpu2") == Some(&mib2), "{m:?}");
        }
        assert!(
            copy.sim_time_ns < bounce.sim_time_ns,
            "one copy over a faster link beats two"
        );
    }

    #[test]
    fn a_gpu_goes_offline_and_its_pages_go_home_or_to_a_peer() {
        let text = crate::scenario::shipped("gpu-offline").unwrap();
        for to in ["host", "peer"] {
            let s = parse(text, &[format!("policy.evict_to={to}")]).unwrap();
            let m = run(&s).unwrap();
            assert_eq!((m.corrupted_bytes, m.leaked_frames), (0, 0), "{to}");
            let out = |k: &str| m.bytes_by_link.get(k).copied().unwrap_or(0);
            let to_peers: u64 = (0..3).map(|g| out(&format!("gpu3-gpu{g}"))).sum();
            match to {
                "host" => assert!(out("gpu3-host") >= 8 << 20 && to_peers == 0, "{m:?}"),
                _ => assert!(to_peers >= 8 << 20 && out("gpu3-host") == 0, "{m:?}"),
            }
        }
    }

    #[test]
    fn the_counter_policy_migrates_a_block_read_remotely() {
        let text = r#"
name = "counters"
[machine]
ram_mib = 64
gpus = [{ vram_mib = 8 }]
[policy]
migration = "counters"
[[buffer]]
name = "a"
mib = 2
[[phase]]
agents = [{ on = "gpu0", buffer = "a", access_bytes = 4096, passes = 4 }]
"#;
        let m = run(&parse(text, &[]).unwrap()).unwrap();
        assert!(
            m.bytes_h2d > 0,
            "the counters fired and the block moved: {m:?}"
        );
        assert!(m.remote_accesses >= 256 && m.remote_accesses < 4 * 512);
        assert_eq!((m.corrupted_bytes, m.leaked_frames), (0, 0));
    }

    #[test]
    fn two_agents_taking_one_chunk_from_each_other_are_a_livelock() {
        let text = r#"
name = "livelock"
[machine]
ram_mib = 64
gpus = [{ vram_mib = 2 }]
[policy]
thrashing = false
[[buffer]]
name = "a"
mib = 4
[[phase]]
agents = [
  { on = "gpu0", buffer = "a", span_mib = 2, access_bytes = 4096, passes = 2 },
  { on = "gpu0", buffer = "a", offset_mib = 2, span_mib = 2, access_bytes = 4096, passes = 2 },
]
"#;
        match run(&parse(text, &[]).unwrap()) {
            Err(RunError::Livelock { faults, .. }) => assert!(faults > MAX_REFAULTS),
            Ok(m) => assert_eq!((m.corrupted_bytes, m.leaked_frames), (0, 0)),
            Err(e) => panic!("{e}"),
        }
    }
}
