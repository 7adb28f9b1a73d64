//! The real-thread mode (`hmm run --threads`): the same scenario with every agent of a
//! phase on an OS thread of its own, all at once, for the races the deterministic engine
//! cannot show. The counters and the simulated time may differ from run to run; the bytes
//! may not: every run ends with the same byte check and frame audit.
//!
//! # The shadow under threads
//!
//! Each 4 KiB page of a buffer's shadow has a lock. An access takes the locks of the pages
//! it touches (at most two, in address order), makes the real access, then updates or
//! checks the shadow, and lets go: the real access and its shadow are one step, so a read
//! must see exactly the last write made before it, whichever thread made it. The driver
//! never takes these locks, so they add no cycle to its lock order; they are always taken
//! first and held across the real access, faults and their service included.
//!
//! # Time
//!
//! Each agent keeps its own simulated time, charged from the same cost model as the
//! deterministic engine. A fault batch is charged with the bytes every link carried while
//! it was serviced, which under threads may include another agent's: simulated time is an
//! estimate here. The policies' clock moves to the latest time any agent set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use hmm::addr::{VirtAddr, PAGE_SIZE};
use hmm::mm::Mm;
use hmm_svm::clock::ManualClock;
use hmm_svm::{GpuDevice, GpuVm, Outcome};

use crate::cost::CostModel;
use crate::engine::MAX_REFAULTS;
use crate::engine::{agents_of, fill, Actor, Metrics, Outputs, RunError, Running, World};
use crate::scenario::Scenario;
use crate::topology::{Links, Traffic};

/// What the agents' threads share of the machine.
struct View<'w> {
    gpus: &'w [Arc<GpuDevice>],
    vms: &'w [Arc<GpuVm>],
    mm: &'w Mm,
    clock: &'w ManualClock,
    cost: &'w CostModel,
    links: &'w Links,
    bases: &'w [VirtAddr],
}

/// The buffers' shadows, one lock per page.
struct Shadows {
    pages: Vec<Vec<Mutex<Vec<u8>>>>,
}

/// A page size in bytes, as a `usize`.
const PAGE: usize = PAGE_SIZE as usize;

impl Shadows {
    fn new(buffers: Vec<Vec<u8>>) -> Shadows {
        Shadows {
            pages: buffers
                .into_iter()
                .map(|b| b.chunks(PAGE).map(|c| Mutex::new(c.to_vec())).collect())
                .collect(),
        }
    }

    fn into_buffers(self) -> Vec<Vec<u8>> {
        self.pages
            .into_iter()
            .map(|b| {
                b.into_iter()
                    .flat_map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
                    .collect()
            })
            .collect()
    }

    /// The locks of the pages `[offset, offset + len)` of buffer `b` touches, in order.
    fn lock(&self, b: usize, offset: u64, len: usize) -> Vec<MutexGuard<'_, Vec<u8>>> {
        // CAST: offsets inside a buffer of this process fit usize.
        let (first, last) = (offset as usize / PAGE, (offset as usize + len - 1) / PAGE);
        (first..=last)
            .map(|p| self.pages[b][p].lock().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }
}

/// Copies between `data` and the locked shadow pages `guards` (from byte `offset` of the
/// first one): into the shadow for a write, out of it into `seen` for a read.
fn shadow_bytes(
    guards: &mut [MutexGuard<'_, Vec<u8>>],
    offset: u64,
    data: &[u8],
    seen: Option<&mut [u8]>,
) {
    // CAST: within a page.
    let mut at = offset as usize % PAGE;
    let mut done = 0;
    let mut seen = seen;
    for g in guards.iter_mut() {
        let n = (PAGE - at).min(data.len() - done);
        match seen.as_deref_mut() {
            None => g[at..at + n].copy_from_slice(&data[done..done + n]),
            Some(out) => out[done..done + n].copy_from_slice(&g[at..at + n]),
        }
        done += n;
        at = 0;
    }
}

/// What the threads count together.
#[derive(Default)]
struct Tally {
    events: AtomicU64,
    mismatches: AtomicU64,
}

/// Runs `s` (already validated) with every agent of a phase on its own thread.
pub fn run_threads(s: &Scenario) -> Result<Metrics, RunError> {
    let mut w = World::new(s, Outputs::default())?;
    let start = Instant::now();
    let shadows = Shadows::new(std::mem::take(&mut w.shadows));
    let tally = Tally::default();
    let mut now = 0u64;
    for p in 0..s.phases.len() {
        now = w.start_phase(s, p, now)?;
        let agents = agents_of(s, p);
        let view = View {
            gpus: &w.gpus,
            vms: &w.vms,
            mm: &w.mm,
            clock: &w.clock,
            cost: &w.cost,
            links: &w.links,
            bases: &w.bases,
        };
        let (w, shadows, tally) = (&view, &shadows, &tally);
        let ends: Vec<Result<u64, RunError>> = std::thread::scope(|sc| {
            let handles: Vec<_> = agents
                .into_iter()
                .enumerate()
                .map(|(k, a)| sc.spawn(move || agent(w, shadows, tally, a, p, k, now)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        for end in ends {
            now = now.max(end?);
        }
    }
    let wall = start.elapsed().as_secs_f64();
    w.shadows = shadows.into_buffers();
    w.events = tally.events.load(Ordering::Relaxed);
    w.read_mismatches = tally.mismatches.load(Ordering::Relaxed);
    Ok(w.finish(s, now, wall)?.0)
}

/// One agent's accesses, from time `t`, on the calling thread; returns its time at the end.
fn agent(
    w: &View<'_>,
    shadows: &Shadows,
    tally: &Tally,
    mut a: Running,
    p: usize,
    k: usize,
    mut t: u64,
) -> Result<u64, RunError> {
    let cost = &w.cost;
    let mut data = vec![0u8; a.bytes];
    let mut seen = vec![0u8; a.bytes];
    while let Some(acc) = a.pattern.next_access() {
        let offset = a.offset + acc.offset;
        let addr = w.bases[a.buffer]
            .checked_add(offset)
            .expect("inside the buffer");
        let failed = |why: String| RunError::Access {
            agent: a.name.clone(),
            addr,
            why,
        };
        if acc.write {
            fill(&mut data, (k as u64) << 48 | (p as u64) << 40 | a.seq);
            a.seq += 1;
        }
        let mut guards = shadows.lock(a.buffer, offset, a.bytes);
        let mut refaults = 0;
        loop {
            match a.who {
                Actor::Gpu(g) => {
                    let vm = &w.vms[g];
                    match vm
                        .try_access(addr, acc.write, &mut data)
                        .map_err(|e| failed(e.to_string()))?
                    {
                        Outcome::Done {
                            local,
                            remote,
                            peer,
                        } => {
                            t += cost.hit_ns(local, remote, peer);
                            if vm.has_notifications() {
                                w.clock.set(t);
                                vm.service_access_counters()
                                    .map_err(|e| failed(e.to_string()))?;
                            }
                            break;
                        }
                        Outcome::Faulted(_) => {
                            refaults += 1;
                            if refaults > MAX_REFAULTS {
                                return Err(RunError::Livelock {
                                    agent: a.name.clone(),
                                    addr,
                                    faults: refaults,
                                });
                            }
                            w.clock.set(t);
                            let before = Traffic::of(w.gpus);
                            let report = vm.service_faults().map_err(|e| failed(e.to_string()))?;
                            t += cost.fault_batch_ns * report.batches
                                + cost.fault_ns * report.faults
                                + w.links.cost_ns(&Traffic::of(w.gpus), &before);
                        }
                    }
                }
                Actor::Cpu(_) => {
                    w.clock.set(t);
                    let home = |w: &View<'_>| w.gpus.iter().map(|g| g.pages_d2h()).sum::<u64>();
                    let before = home(w);
                    if acc.write {
                        w.mm.write(addr, &data)
                    } else {
                        w.mm.read(addr, &mut data)
                    }
                    .map_err(|e| failed(e.to_string()))?;
                    t += if home(w) > before {
                        cost.cpu_fault_ns
                    } else {
                        cost.cpu_access_ns
                    };
                    break;
                }
            }
        }
        if acc.write {
            shadow_bytes(&mut guards, offset, &data, None);
        } else {
            shadow_bytes(&mut guards, offset, &data, Some(&mut seen));
            if seen != data {
                let wrong = seen.iter().zip(&data).filter(|(x, y)| x != y).count() as u64;
                tally.mismatches.fetch_add(wrong, Ordering::Relaxed);
            }
        }
        drop(guards);
        tally.events.fetch_add(1, Ordering::Relaxed);
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{parse, shipped};

    /// Three GPUs (two of one group) and the CPU on one buffer larger than any GPU's
    /// memory; a GPU goes offline and comes back.
    const MIXED: &str = r#"
name = "threads"
[machine]
ram_mib = 64
gpus = [{ vram_mib = 4, group = "x" }, { vram_mib = 4, group = "x" }, { vram_mib = 4 }]
[policy]
evict_to = "peer"
prefetch = "none"
[[buffer]]
name = "a"
mib = 6
[[phase]]
agents = [
  { on = "gpu0", buffer = "a", access = "rw", access_bytes = 1024 },
  { on = "gpu1", buffer = "a", pattern = "random", access = "rw", count = 2000 },
  { on = "gpu2", buffer = "a", pattern = "strided", stride = 8192 },
  { on = "cpu", buffer = "a", pattern = "strided", stride = 65536, access = "write", passes = 4 },
]
[[phase]]
offline = ["gpu1"]
agents = [
  { on = "gpu0", buffer = "a", pattern = "random", access = "rw", count = 2000 },
  { on = "cpu", buffer = "a", pattern = "random", access = "rw", count = 2000 },
]
[[phase]]
online = ["gpu1"]
agents = [{ on = "gpu1", buffer = "a", access = "rw", access_bytes = 2048 }]
"#;

    #[test]
    fn every_byte_survives_real_threads() {
        let mut runs: Vec<(&str, String, Vec<String>)> = ["copy", "bounce", "remote"]
            .into_iter()
            .map(|p| ("mixed", MIXED.to_string(), vec![format!("policy.peer={p}")]))
            .collect();
        runs.push((
            "cpu-gpu-pingpong",
            shipped("cpu-gpu-pingpong").unwrap().into(),
            vec![],
        ));
        for (name, text, set) in runs {
            let s = parse(&text, &set).unwrap();
            let m = run_threads(&s).unwrap();
            assert_eq!(
                (m.corrupted_bytes, m.leaked_frames),
                (0, 0),
                "{name} {set:?}"
            );
            // The same accesses as the deterministic engine makes, in another order.
            assert_eq!(m.events, crate::engine::run(&s).unwrap().events, "{name}");
        }
    }
}
