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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sequential,
    Strided(u64),
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    Never,
    Always,
    EveryOther,
}

impl Pattern {
    /// The pattern of `agent` over a buffer of `size` bytes; `seed` makes `random` repeat.
    pub fn new(agent: &Agent, size: u64, seed: u64) -> Pattern {
        let ab = agent.access_bytes;
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
            // xorshift must not start at 0.
            rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
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
        let offset = match self.kind {
            Kind::Sequential => i * self.access_bytes,
            Kind::Strided(s) => i * s,
            Kind::Random => {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                (self.rng % (self.size / self.access_bytes)) * self.access_bytes
            }
        }
        .min(self.size - self.access_bytes);
        let write = match self.write {
            Write::Never => false,
            Write::Always => true,
            Write::EveryOther => self.n % 2 == 1,
        };
        self.n += 1;
        Some(Access { offset, write })
    }
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
    }
}
