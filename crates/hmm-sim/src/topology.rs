//! The machine's links and the bytes that cross them.
//!
//! Every GPU has a host link (the scenario's `host_gbps` / `host_latency_ns`, or the cost
//! model's `link_gbps` / `link_latency_ns`). GPUs of one peer group (`group = "..."` in the
//! scenario) share a pagemap owner and have a direct link between each two of them: the
//! cost model's `peer_gbps` / `peer_latency_ns`, or a `[[machine.link]]` entry for that
//! pair. GPUs of different groups have no direct link: what moves between them goes
//! through system memory, over both host links.
//!
//! [`Traffic`] is a snapshot of the pages every link has carried, read from the devices'
//! counters; the difference of two snapshots is charged link by link, one transfer each
//! ([`Links::cost_ns`]), made by a GPU's copy engine (the destination's from the host, the
//! source's otherwise). The GPUs' parts are charged one after the other (a bounce's legs
//! depend on each other, and one agent services the batch); within one GPU, with one copy
//! engine (`copy_engines = 1`, the default) its transfers are one after the other too, with
//! two or more the transfers into the GPU and those out of it overlap (a link is full
//! duplex), and the GPU's part costs the longer of the two.

use std::sync::Arc;

use hmm::addr::PAGE_SIZE;
use hmm_svm::GpuDevice;

use crate::cost::CostModel;
use crate::scenario::Machine;

/// One link: bandwidth and latency.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// GB/s, one direction.
    pub gbps: f64,
    /// Per transfer.
    pub latency_ns: u64,
}

impl Link {
    /// Moving `bytes` over the link (0 when nothing moved).
    pub fn transfer_ns(&self, bytes: u64) -> u64 {
        if bytes == 0 {
            return 0;
        }
        // CAST: nanoseconds of a transfer fit u64 for any size a run can move.
        self.latency_ns + (bytes as f64 / self.gbps.max(1e-9)) as u64
    }
}

/// The links of a machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Links {
    /// Each GPU's host link.
    pub host: Vec<Link>,
    /// `peer[a][b]`: the direct link between GPUs `a` and `b`, if they share a group.
    pub peer: Vec<Vec<Option<Link>>>,
    /// Copy engines per GPU (the cost model's `copy_engines`).
    pub copy_engines: u32,
}

impl Links {
    /// The links of `machine` (validated) under `cost`.
    pub fn new(machine: &Machine, cost: &CostModel) -> Links {
        let host = machine
            .gpus
            .iter()
            .map(|g| Link {
                gbps: g.host_gbps.unwrap_or(cost.link_gbps),
                latency_ns: g.host_latency_ns.unwrap_or(cost.link_latency_ns),
            })
            .collect();
        let default_peer = Link {
            gbps: cost.peer_gbps,
            latency_ns: cost.peer_latency_ns,
        };
        let gpus = &machine.gpus;
        let mut peer: Vec<Vec<Option<Link>>> = gpus
            .iter()
            .enumerate()
            .map(|(a, ga)| {
                gpus.iter()
                    .enumerate()
                    .map(|(b, gb)| {
                        (a != b && ga.group.is_some() && ga.group == gb.group)
                            .then_some(default_peer)
                    })
                    .collect()
            })
            .collect();
        for l in &machine.links {
            let (a, b) = (l.gpu_index(0), l.gpu_index(1));
            let link = Link {
                gbps: l.gbps,
                latency_ns: l.latency_ns,
            };
            peer[a][b] = Some(link);
            peer[b][a] = Some(link);
        }
        Links {
            host,
            peer,
            copy_engines: cost.copy_engines,
        }
    }

    /// The transfers that carried the traffic `now - before`: one per link that carried
    /// any, with the GPU whose copy engine made it (the destination's for host to GPU, the
    /// source's otherwise: a peer copy is the source's), its bytes and what it costs.
    pub fn transfers(&self, now: &Traffic, before: &Traffic) -> Vec<Transfer> {
        let n = self.host.len();
        let mut out = Vec::new();
        let mut push = |name: String, engine: usize, inbound: bool, link: &Link, pages: u64| {
            if pages > 0 {
                let bytes = pages * PAGE_SIZE;
                out.push(Transfer {
                    name,
                    engine,
                    inbound,
                    bytes,
                    ns: link.transfer_ns(bytes),
                    start_ns: 0,
                });
            }
        };
        for g in 0..n {
            let host = &self.host[g];
            let (h2d, d2h) = (now.h2d[g] - before.h2d[g], now.d2h[g] - before.d2h[g]);
            push(format!("host to gpu{g}"), g, true, host, h2d);
            push(format!("gpu{g} to host"), g, false, host, d2h);
            for src in 0..n {
                let pages = now.d2d[src * n + g] - before.d2d[src * n + g];
                if pages > 0 {
                    let link = self.peer[src][g].expect("pages move directly only between peers");
                    push(format!("gpu{src} to gpu{g}"), src, false, &link, pages);
                }
            }
        }
        out
    }

    /// What carrying the traffic `now - before` costs on idle copy engines: each GPU's
    /// transfers as [`place`](Self::place) queues them, the GPUs one after the other.
    pub fn cost_ns(&self, now: &Traffic, before: &Traffic) -> u64 {
        let mut idle = Engines::new(self.host.len());
        self.place(&mut idle, 0, now, before).1
    }

    /// Places the transfers of `now - before` on the GPUs' copy engines from time `at`:
    /// GPU after GPU (a bounce's legs depend on each other); within a GPU, in one queue, or
    /// with two copy engines or more one queue into it and one out of it; a transfer also
    /// waits for its queue to be free of earlier transfers (`engines`, which it then
    /// occupies). Returns the transfers with their start times, and when the last ends.
    pub fn place(
        &self,
        engines: &mut Engines,
        at: u64,
        now: &Traffic,
        before: &Traffic,
    ) -> (Vec<Transfer>, u64) {
        let mut all = self.transfers(now, before);
        let mut cursor = at;
        for g in 0..self.host.len() {
            let mut queue = [cursor, cursor];
            for t in all.iter_mut().filter(|t| t.engine == g) {
                let q = usize::from(self.copy_engines >= 2 && !t.inbound);
                t.start_ns = engines.reserve(g, q, queue[q], t.ns);
                queue[q] = t.start_ns + t.ns;
            }
            cursor = queue[0].max(queue[1]);
        }
        (all, cursor)
    }
}

/// What each GPU's copy-engine queues hold, in simulated time: per GPU `[into the GPU, out
/// of it]` (with one copy engine only the first is used), the latest reservations of each
/// ([`KEPT`] of them, in time order).
///
/// Transfers are asked for in the order agents reach them, which is simulated-time order,
/// but a fault batch asks for its transfers to start after its own overhead: a transfer
/// asked for later may start earlier. Each goes in the first gap, from the time it asks
/// for, that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Engines {
    busy: Vec<[Vec<(u64, u64)>; 2]>,
}

/// Reservations kept per queue: older ones are long past the times agents ask for.
pub const KEPT: usize = 64;

impl Engines {
    /// The engines of `gpus` GPUs, all free.
    pub fn new(gpus: usize) -> Engines {
        Engines {
            busy: vec![[Vec::new(), Vec::new()]; gpus],
        }
    }

    /// Reserves queue `q` of GPU `g` for `ns` from `at` or the earliest time after it that
    /// is free; returns the start.
    fn reserve(&mut self, g: usize, q: usize, at: u64, ns: u64) -> u64 {
        let busy = &mut self.busy[g][q];
        let mut start = at;
        let mut i = 0;
        while i < busy.len() {
            let (s, e) = busy[i];
            if start + ns <= s {
                break;
            }
            start = start.max(e);
            i += 1;
        }
        busy.insert(i, (start, start + ns));
        if busy.len() > KEPT {
            busy.remove(0);
        }
        start
    }
}

/// One transfer over one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// `host to gpu0`, `gpu0 to host`, `gpu1 to gpu0`.
    pub name: String,
    /// The GPU whose copy engine made it.
    pub engine: usize,
    /// Whether it came into that GPU (from the host) rather than out of it.
    pub inbound: bool,
    /// Bytes moved.
    pub bytes: u64,
    /// What it costs, ns.
    pub ns: u64,
    /// When it starts ([`Links::place`]; 0 from [`Links::transfers`]).
    pub start_ns: u64,
}

/// The pages each link has carried so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Traffic {
    /// Host to GPU `g`.
    pub h2d: Vec<u64>,
    /// GPU `g` to host.
    pub d2h: Vec<u64>,
    /// `d2d[src * n + dst]`: GPU `src` to GPU `dst`, directly.
    pub d2d: Vec<u64>,
}

impl Traffic {
    /// Reads the counters of `gpus`.
    pub fn of(gpus: &[Arc<GpuDevice>]) -> Traffic {
        let n = gpus.len();
        let mut d2d = vec![0; n * n];
        for (dst, g) in gpus.iter().enumerate() {
            for (pagemap, pages) in g.peer_pages_in() {
                if let Some(src) = gpus.iter().position(|s| s.pagemap_id() == pagemap) {
                    d2d[src * n + dst] += pages;
                }
            }
        }
        let stats: Vec<_> = gpus.iter().map(|g| g.stats()).collect();
        Traffic {
            h2d: stats.iter().map(|s| s.pages_h2d).collect(),
            d2h: stats.iter().map(|s| s.pages_d2h).collect(),
            d2d,
        }
    }

    /// Pages moved between GPUs directly, all pairs.
    pub fn d2d_pages(&self) -> u64 {
        self.d2d.iter().sum()
    }

    /// Bytes per link that carried any, named `host-gpu0`, `gpu0-host`, `gpu0-gpu1`.
    pub fn by_link(&self) -> std::collections::BTreeMap<String, u64> {
        let n = self.h2d.len();
        let mut m = std::collections::BTreeMap::new();
        for g in 0..n {
            if self.h2d[g] > 0 {
                m.insert(format!("host-gpu{g}"), self.h2d[g] * PAGE_SIZE);
            }
            if self.d2h[g] > 0 {
                m.insert(format!("gpu{g}-host"), self.d2h[g] * PAGE_SIZE);
            }
            for dst in 0..n {
                let p = self.d2d[g * n + dst];
                if p > 0 {
                    m.insert(format!("gpu{g}-gpu{dst}"), p * PAGE_SIZE);
                }
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_engines_overlap_a_gpus_transfers_in_and_out() {
        let link = Link {
            gbps: 1.0,
            latency_ns: 0,
        };
        let mut links = Links {
            host: vec![link, link],
            peer: vec![vec![None, Some(link)], vec![Some(link), None]],
            copy_engines: 1,
        };
        let before = Traffic {
            h2d: vec![0, 0],
            d2h: vec![0, 0],
            d2d: vec![0; 4],
        };
        // gpu0: 1 page in, 2 out; gpu1: 1 page from gpu0 (gpu0's engine).
        let now = Traffic {
            h2d: vec![1, 0],
            d2h: vec![2, 0],
            d2d: vec![0, 1, 0, 0],
        };
        let page = 4096;
        assert_eq!(
            links.cost_ns(&now, &before),
            (1 + 2 + 1) * page,
            "one queue"
        );
        links.copy_engines = 2;
        // In: 1 page; out: 2 pages to the host, then 1 to gpu1.
        assert_eq!(links.cost_ns(&now, &before), 3 * page, "in and out at once");
        let mut engines = Engines::new(2);
        let (s, end) = links.place(&mut engines, 100, &now, &before);
        let at = |n: &str| s.iter().find(|t| t.name == n).unwrap().start_ns;
        assert_eq!((at("host to gpu0"), at("gpu0 to host")), (100, 100));
        assert_eq!(at("gpu0 to gpu1"), 100 + 2 * page);
        assert_eq!(end, 100 + 3 * page);
        // A second batch at 100 waits for the engines the first holds.
        let (s, end) = links.place(&mut engines, 100, &now, &before);
        assert_eq!(
            s.iter()
                .find(|t| t.name == "host to gpu0")
                .unwrap()
                .start_ns,
            100 + page
        );
        assert_eq!(end, 100 + 6 * page);
        assert_eq!(links.cost_ns(&before, &before), 0);
    }

    #[test]
    fn a_transfer_takes_the_first_gap_that_holds_it() {
        let mut e = Engines::new(1);
        assert_eq!(e.reserve(0, 0, 100, 100), 100);
        assert_eq!(e.reserve(0, 0, 0, 50), 0, "before, in the gap");
        assert_eq!(e.reserve(0, 0, 60, 50), 200, "too long for the gap left");
        assert_eq!(e.reserve(0, 0, 50, 50), 50, "exactly the gap");
        assert_eq!(e.reserve(0, 1, 60, 50), 60, "the other queue is free");
        for k in 0..2 * KEPT as u64 {
            e.reserve(0, 0, 1000 + 10 * k, 5);
        }
        assert_eq!(e.busy[0][0].len(), KEPT);
    }

    #[test]
    fn a_transfer_costs_latency_and_bandwidth() {
        let l = Link {
            gbps: 16.0,
            latency_ns: 1_000,
        };
        assert_eq!(l.transfer_ns(0), 0);
        // 2 MiB at 16 GB/s: 131 072 ns, plus the latency.
        assert_eq!(l.transfer_ns(2 << 20), 1_000 + 131_072);
    }
}
