//! Access patterns: the stream of accesses an agent makes over its buffer.

use crate::scenario::Agent;

/// One access: the byte offset in the buffer and whether it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// Offset in the buffer.
    pub offset: u64,
    /// A write (else a read).
    pub write: bool,
}

/// The accesses of one agent, pass after pass.
#[derive(Debug, Clone)]
pub struct Pattern {
    kind: Kind,
    write: Write,
    access_bytes: u64,
    size: u64,
    per_pass: u64,
    passes: u64,
    /// Accesses made so far.
    n: u64,
    rng: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Sequential,
    Strided(u64),
    Random,
    /// Three accesses a step: centre minus `stride`, centre plus `stride`, centre.
    Stencil(u64),
    /// The pages in this order (a random cycle), one access each.
    Chase(Vec<u32>),
    /// A tiled matrix multiply over three matrices (A, B, C: a third of the span each) of
    /// `t` × `t` tiles of `tile` bytes: for each tile of C, the row of A's tiles and the
    /// column of B's tiles, in turn, then the tile of C written.
    Tiled {
        tile: u64,
        t: u64,
        third: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    Never,
    Always,
    EveryOther,
}

impl Pattern {
    /// The pattern of `agent` over a span of `size` bytes; `seed` makes `random` and
    /// `chase` repeat.
    pub fn new(agent: &Agent, size: u64, seed: u64) -> Pattern {
        let ab = agent.access_bytes;
        // xorshift must not start at 0.
        let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let (kind, per_pass) = match agent.pattern.as_str() {
            "strided" => (
                Kind::Strided(agent.stride),
                size.div_ceil(agent.stride.max(1)),
            ),
            "random" => (
                Kind::Random,
                if agent.count > 0 {
                    agent.count
                } else {
                    size / ab
                },
            ),
            "stencil" => (Kind::Stencil(agent.stride), 3 * (size / ab)),
            "tiled" => {
                let tile = agent.stride.max(ab);
                let third = size / 3;
                // CAST: the square root of a tile count that fits u64.
                let t = (((third / tile) as f64).sqrt() as u64).max(1);
                let per_cell = (2 * t + 1) * (tile / ab);
                (Kind::Tiled { tile, t, third }, t * t * per_cell)
            }
            "chase" => {
                // CAST: a span of at most 256 GiB has at most 2^26 pages.
                let pages = (size / 4096).max(1) as u32;
                let mut order: Vec<u32> = (0..pages).collect();
                for i in (1..order.len()).rev() {
                    // CAST: the remainder is at most i, a usize.
                    let j = (xorshift(&mut rng) % (i as u64 + 1)) as usize;
                    order.swap(i, j);
                }
                (Kind::Chase(order), u64::from(pages))
            }
            _ => (Kind::Sequential, size / ab),
        };
        let write = match agent.access.as_str() {
            "write" => Write::Always,
            "rw" => Write::EveryOther,
            _ => Write::Never,
        };
        Pattern {
            kind,
            write,
            access_bytes: ab,
            size,
            per_pass: per_pass.max(1),
            passes: agent.passes,
            n: 0,
            rng,
        }
    }

    /// Accesses in all.
    pub fn len(&self) -> u64 {
        self.per_pass * self.passes
    }

    /// Whether it makes no access.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next access, if any.
    pub fn next_access(&mut self) -> Option<Access> {
        if self.n >= self.len() {
            return None;
        }
        let i = self.n % self.per_pass;
        let ab = self.access_bytes;
        let (offset, centre) = match &self.kind {
            Kind::Sequential => (i * ab, true),
            Kind::Strided(s) => (i * s, true),
            Kind::Random => ((xorshift(&mut self.rng) % (self.size / ab)) * ab, true),
            Kind::Stencil(s) => {
                let c = (i / 3) * ab;
                match i % 3 {
                    0 => (c.saturating_sub(*s), false),
                    1 => (c + s, false),
                    _ => (c, true),
                }
            }
            // CAST: i is below the number of pages, a u32.
            Kind::Chase(order) => (u64::from(order[i as usize]) * 4096, true),
            Kind::Tiled { tile, t, third } => {
                let steps = tile / ab;
                let per_cell = (2 * t + 1) * steps;
                let (cell, w) = (i / per_cell, i % per_cell);
                let (row, col) = (cell / t, cell % t);
                let (step, within) = (w / steps, (w % steps) * ab);
                if step < 2 * t {
                    let k = step / 2;
                    let at = if step % 2 == 0 {
                        (row * t + k) * tile
                    } else {
                        third + (k * t + col) * tile
                    };
                    (at + within, false)
                } else {
                    (2 * third + (row * t + col) * tile + within, true)
                }
            }
        };
        let offset = offset.min(self.size - ab);
        let write = centre
            && match self.write {
                Write::Never => false,
                Write::Always => true,
                Write::EveryOther => self.n % 2 == 1,
            };
        self.n += 1;
        Some(Access { offset, write })
    }
}

/// One step of xorshift64.
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(pattern: &str, access: &str, stride: u64, count: u64) -> Agent {
        toml::from_str(&format!(
            "on = \"gpu0\"\nbuffer = \"a\"\npattern = \"{pattern}\"\naccess = \"{access}\"\n\
             stride = {stride}\ncount = {count}\npasses = 2"
        ))
        .unwrap()
    }

    #[test]
    fn patterns() {
        let mut p = Pattern::new(&agent("sequential", "rw", 0, 0), 256, 1);
        let v: Vec<_> = std::iter::from_fn(|| p.next_access()).collect();
        assert_eq!(v.len(), 8);
        assert_eq!(
            v.iter().map(|a| a.offset).collect::<Vec<_>>(),
            [0, 64, 128, 192, 0, 64, 128, 192]
        );
        assert_eq!(v.iter().filter(|a| a.write).count(), 4);
        let mut p = Pattern::new(&agent("strided", "write", 4096, 0), 16384, 1);
        let v: Vec<_> = std::iter::from_fn(|| p.next_access()).collect();
        assert_eq!(
            v.iter().map(|a| a.offset).collect::<Vec<_>>(),
            [0, 4096, 8192, 12288, 0, 4096, 8192, 12288]
        );
        let r = |seed| {
            let mut p = Pattern::new(&agent("random", "read", 0, 10), 1 << 20, seed);
            std::iter::from_fn(move || p.next_access())
                .map(|a| a.offset)
                .collect::<Vec<_>>()
        };
        assert_eq!(r(3), r(3));
        assert_ne!(r(3), r(4));
        assert!(r(3).iter().all(|&o| o % 64 == 0 && o < 1 << 20));
        // A stencil step reads both neighbours, then the centre (which it writes).
        let mut p = Pattern::new(&agent("stencil", "write", 128, 0), 256, 1);
        let v: Vec<_> = std::iter::from_fn(|| p.next_access()).take(6).collect();
        assert_eq!(
            v.iter().map(|a| (a.offset, a.write)).collect::<Vec<_>>(),
            [
                (0, false),
                (128, false),
                (0, true),
                (0, false),
                (192, false),
                (64, true)
            ]
        );
        // Pointer chasing visits every page once a pass, in a seeded order.
        let mut p = Pattern::new(&agent("chase", "read", 0, 0), 16 * 4096, 9);
        let mut pages: Vec<u64> = std::iter::from_fn(|| p.next_access())
            .take(16)
            .map(|a| a.offset / 4096)
            .collect();
        assert_ne!(pages, (0..16).collect::<Vec<_>>(), "not in order");
        // A 2 x 2 tiled multiply of 4 KiB tiles (stride) with 4 KiB accesses: per tile of
        // C, A(i,0) B(0,j) A(i,1) B(1,j), then C(i,j) written.
        let mut a = agent("tiled", "write", 4096, 0);
        a.access_bytes = 4096;
        a.passes = 1;
        let mut p = Pattern::new(&a, 3 * 4 * 4096, 1);
        let v: Vec<_> = std::iter::from_fn(|| p.next_access()).collect();
        let t = |k: u64| k * 4096;
        assert_eq!(
            v[..5]
                .iter()
                .map(|a| (a.offset, a.write))
                .collect::<Vec<_>>(),
            [
                (t(0), false),
                (t(4), false),
                (t(1), false),
                (t(6), false),
                (t(8), true)
            ]
        );
        assert_eq!(v.len(), 4 * 5);
        assert_eq!(v.iter().filter(|a| a.write).count(), 4);
        pages.sort();
        assert_eq!(pages, (0..16).collect::<Vec<_>>());
    }
}
