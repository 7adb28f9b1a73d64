//! Trace replay: a recorded stream of accesses drives the machine of a scenario (its
//! machine, buffers and policies; its phases are not run).
//!
//! Formats (`docs/scenarios.md`, "Traces"):
//!
//! * **native** CSV, one access a line: `time_ns,agent,op,buffer,offset,len`, with `agent`
//!   `cpu` or `gpuN`, `op` `r` or `w` (or `read`, `write`), `offset` and `len` in bytes inside
//!   the named buffer (`len` 1 to 4096). Blank lines, `#` comments and a header line
//!   starting with `time` are skipped. A line that starts with `{` is the same access as
//!   one JSON object (JSONL): `{"time_ns": 0, "agent": "gpu0", "op": "r", "buffer": "a",
//!   "offset": 4096, "len": 64}`; the two may be mixed.
//! * **uvm-eval** fault logs (Allen & Ge, SC'21): the kernel log prefix up to the first `;`
//!   is dropped; `f,<hex VA>,<timestamp>,...` is a GPU fault of `gpu0`, replayed as a 64-byte
//!   read; the other lines (`s,`, `b,`, `p,`, `e,`, noise) are skipped. A real process's
//!   addresses are folded into the scenario's first buffer: the offset is the address
//!   modulo the buffer's size, so pages stay pages and neighbours stay neighbours.
//! * **gpu-ext** chunk traces (gpu_ext, arXiv 2512.12615): CSV `time_ms, hook_type,
//!   owner_pid, va_block_start, va_block_end, page_index` (addresses in hex with `0x`, or
//!   decimal; `time_ms` may have a fraction). A `block_access` or `block_activate` hook
//!   (or `access`, `activate`) is a read of 64 bytes of page `page_index` of the block, by
//!   `gpu0`, folded into the first buffer as uvm-eval's addresses are; `evict_prepare` and
//!   the prefetch hooks record the driver's own decisions, which the model makes itself, and
//!   are skipped, as are a header line starting with `time`, blank lines and `#` comments.
//!
//! The reader streams (a trace may be larger than memory) and stops at the first malformed
//! line with its number. Each access starts at its recorded time or when its agent is free,
//! whichever is later; a fault makes the agent service the batch and the access is made
//! again, as in a scenario run.

use std::io::BufRead;
use std::time::Instant;

use thiserror::Error;

use crate::engine::{Actor, Metrics, Outputs, Req, RunError, Step, World, MAX_REFAULTS};
use crate::record::Recording;
use crate::scenario::Scenario;

/// A trace's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `time_ns,agent,op,buffer,offset,len`.
    Native,
    /// NVIDIA UVM fault logs as uvm-eval records them.
    UvmEval,
    /// gpu_ext's chunk traces of UVM's policy hooks.
    GpuExt,
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Format, String> {
        match s {
            "native" => Ok(Format::Native),
            "uvm-eval" => Ok(Format::UvmEval),
            "gpu-ext" => Ok(Format::GpuExt),
            _ => Err(format!("`{s}`: native, uvm-eval or gpu-ext")),
        }
    }
}

/// Why a replay stopped.
#[derive(Debug, Error)]
pub enum ReplayError {
    /// A line that is not what the format says.
    #[error("line {line}: {why}")]
    Line {
        /// The line (1-based).
        line: u64,
        /// What is wrong with it.
        why: String,
    },
    /// The trace could not be read.
    #[error("reading the trace: {0}")]
    Io(#[from] std::io::Error),
    /// The run failed.
    #[error(transparent)]
    Run(#[from] RunError),
}

/// One access of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Event {
    time: u64,
    who: Actor,
    write: bool,
    buffer: usize,
    offset: u64,
    len: usize,
}

/// The event on `line` of a `format` trace, `None` for a line to skip.
fn parse_line(
    format: Format,
    line: &str,
    s: &Scenario,
    sizes: &[u64],
) -> Result<Option<Event>, String> {
    let line = line.trim();
    match format {
        Format::Native if line.starts_with('{') => {
            let a: JsonAccess =
                serde_json::from_str(line).map_err(|e| format!("not an access: {e}"))?;
            let ops = ["r", "w", "read", "write"];
            let op = ops
                .iter()
                .find(|o| **o == a.op)
                .ok_or_else(|| format!("op `{}`: r or w", a.op))?;
            native(
                s, sizes, a.time_ns, &a.agent, op, &a.buffer, a.offset, a.len,
            )
            .map(Some)
        }
        Format::Native => {
            if line.is_empty() || line.starts_with('#') || line.starts_with("time") {
                return Ok(None);
            }
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            let [time, agent, op, buffer, offset, len] = f[..] else {
                return Err(format!(
                    "expected 6 fields (time_ns,agent,op,buffer,offset,len), found {}",
                    f.len()
                ));
            };
            let num = |v: &str, what: &str| {
                v.parse::<u64>()
                    .map_err(|_| format!("{what} `{v}` is not a whole number"))
            };
            let (time, offset, len) = (
                num(time, "time_ns")?,
                num(offset, "offset")?,
                num(len, "len")?,
            );
            native(s, sizes, time, agent, op, buffer, offset, len).map(Some)
        }
        Format::GpuExt => {
            if line.is_empty() || line.starts_with('#') || line.starts_with("time") {
                return Ok(None);
            }
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            let [time_ms, hook, _pid, start, end, page] = f[..] else {
                return Err(format!(
                    "expected 6 fields (time_ms,hook_type,owner_pid,va_block_start,\
                     va_block_end,page_index), found {}",
                    f.len()
                ));
            };
            let access = match hook {
                "block_access" | "access" | "block_activate" | "activate" => true,
                "evict_prepare" | "prefetch" | "prefetch_iter" => false,
                _ => return Err(format!("hook `{hook}`: one of gpu_ext's hooks")),
            };
            let ms = time_ms
                .parse::<f64>()
                .ok()
                .filter(|t| t.is_finite() && *t >= 0.0 && *t < 1e12)
                .ok_or_else(|| format!("time_ms `{time_ms}` is not a time"))?;
            let addr = |v: &str, what: &str| {
                match v.strip_prefix("0x") {
                    Some(h) => u64::from_str_radix(h, 16).ok(),
                    None => v.parse::<u64>().ok(),
                }
                .ok_or_else(|| format!("{what} `{v}` is not an address"))
            };
            let (start, end) = (addr(start, "va_block_start")?, addr(end, "va_block_end")?);
            let page = page
                .parse::<u64>()
                .map_err(|_| format!("page_index `{page}` is not a whole number"))?;
            let va = page
                .checked_mul(4096)
                .and_then(|o| start.checked_add(o))
                .filter(|va| start < end && *va < end)
                .ok_or_else(|| {
                    format!("page {page} is not inside the block {start:#x}..{end:#x}")
                })?;
            if !access {
                return Ok(None);
            }
            if s.machine.gpus.is_empty() || sizes.is_empty() {
                return Err("a gpu-ext trace needs a GPU and a buffer in the scenario".into());
            }
            Ok(Some(Event {
                // CAST: below 10^18 ns (checked above).
                time: (ms * 1e6) as u64,
                who: Actor::Gpu(0),
                write: false,
                buffer: 0,
                offset: (va % sizes[0]) / 64 * 64,
                len: 64,
            }))
        }
        Format::UvmEval => {
            let body = line.split_once(';').map_or(line, |(_, b)| b).trim();
            let Some(rest) = body.strip_prefix("f,") else {
                return Ok(None);
            };
            let mut f = rest.split(',').map(str::trim);
            let va = f.next().unwrap_or("");
            let va = u64::from_str_radix(va.trim_start_matches("0x"), 16)
                .map_err(|_| format!("fault address `{va}` is not hexadecimal"))?;
            let ts = f.next().unwrap_or("");
            let time = ts
                .parse::<u64>()
                .map_err(|_| format!("timestamp `{ts}` is not a whole number"))?;
            if s.machine.gpus.is_empty() || sizes.is_empty() {
                return Err("a uvm-eval trace needs a GPU and a buffer in the scenario".into());
            }
            Ok(Some(Event {
                time,
                who: Actor::Gpu(0),
                write: false,
                buffer: 0,
                offset: (va % sizes[0]) / 64 * 64,
                len: 64,
            }))
        }
    }
}

/// A native access as one JSON object (a JSONL line).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonAccess {
    time_ns: u64,
    agent: String,
    op: String,
    buffer: String,
    offset: u64,
    len: u64,
}

/// A native access (from CSV or JSON) checked against the scenario.
#[allow(clippy::too_many_arguments)]
fn native(
    s: &Scenario,
    sizes: &[u64],
    time: u64,
    agent: &str,
    op: &str,
    buffer: &str,
    offset: u64,
    len: u64,
) -> Result<Event, String> {
    let who = match agent {
        "cpu" => Actor::Cpu(0),
        g => match g.strip_prefix("gpu").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) if n < s.machine.gpus.len() && g == format!("gpu{n}") => Actor::Gpu(n),
            _ => {
                return Err(format!(
                    "agent `{agent}`: cpu or one of the scenario's GPUs"
                ))
            }
        },
    };
    let write = match op {
        "r" | "read" => false,
        "w" | "write" => true,
        _ => return Err(format!("op `{op}`: r or w")),
    };
    let b = s
        .buffers
        .iter()
        .position(|x| x.name == buffer)
        .ok_or_else(|| format!("no buffer `{buffer}` in the scenario"))?;
    if len == 0 || len > 4096 || offset.checked_add(len).map_or(true, |e| e > sizes[b]) {
        return Err(format!(
            "offset {offset} and len {len}: len from 1 to 4096, inside the buffer's {} bytes",
            sizes[b]
        ));
    }
    Ok(Event {
        time,
        who,
        write,
        buffer: b,
        offset,
        // CAST: at most 4096.
        len: len as usize,
    })
}

/// Replays the trace read from `input` on the machine of `s`, writing its timeline and
/// keeping its recording as `out` asks.
pub fn replay(
    s: &Scenario,
    input: impl BufRead,
    format: Format,
    out: Outputs,
) -> Result<(Metrics, Option<Recording>), ReplayError> {
    let mut w = World::new(s, out)?;
    let sizes = w.sizes.clone();
    // When each actor (the CPU, then each GPU) is free again.
    let mut free = vec![0u64; 1 + s.machine.gpus.len()];
    let mut first: Option<u64> = None;
    let mut end = 0u64;
    let mut seq = 0u64;
    let start = Instant::now();
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        let n = i as u64 + 1;
        let Some(ev) = parse_line(format, &line, s, &sizes)
            .map_err(|why| ReplayError::Line { line: n, why })?
        else {
            continue;
        };
        let base = *first.get_or_insert(ev.time);
        let slot = match ev.who {
            Actor::Cpu(_) => 0,
            Actor::Gpu(g) => 1 + g,
        };
        let mut t = ev.time.saturating_sub(base).max(free[slot]);
        seq += 1;
        let mut refaults = 0;
        loop {
            let step = w
                .access(
                    &Req {
                        who: ev.who,
                        buffer: ev.buffer,
                        offset: ev.offset,
                        len: ev.len,
                        write: ev.write,
                        stamp: seq,
                    },
                    t,
                )
                .map_err(|why| ReplayError::Line { line: n, why })?;
            match step {
                Step::Done(c) => {
                    t = t.saturating_add(c);
                    break;
                }
                Step::Faulted(c) => {
                    refaults += 1;
                    if refaults > MAX_REFAULTS {
                        return Err(ReplayError::Line {
                            line: n,
                            why: format!("faulted {refaults} times in a row (livelock)"),
                        });
                    }
                    t = t.saturating_add(c);
                }
            }
        }
        free[slot] = t;
        end = end.max(t);
    }
    let wall = start.elapsed().as_secs_f64();
    Ok(w.finish(s, end, wall)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::parse;

    const MACHINE: &str = r#"
name = "replay"
[machine]
ram_mib = 64
gpus = [{ vram_mib = 4 }]
[policy]
thrashing = false
[[buffer]]
name = "a"
mib = 4
"#;

    #[test]
    fn a_native_trace_replays_and_keeps_every_byte() {
        let s = parse(MACHINE, &[]).unwrap();
        let mut t = String::from("time_ns,agent,op,buffer,offset,len\n# a comment\n\n");
        for i in 0..200u64 {
            let agent = if i % 3 == 0 { "cpu" } else { "gpu0" };
            let op = if i % 2 == 0 { "w" } else { "r" };
            t.push_str(&format!(
                "{},{agent},{op},a,{},64\n",
                i * 1000,
                (i * 37 % 1024) * 4096
            ));
        }
        let (m, _) = replay(&s, t.as_bytes(), Format::Native, Outputs::default()).unwrap();
        assert_eq!(m.events, 200);
        assert_eq!((m.corrupted_bytes, m.leaked_frames), (0, 0));
        assert!(m.gpu_faults > 0 && m.sim_time_ns >= 199_000);
        let (again, _) = replay(&s, t.as_bytes(), Format::Native, Outputs::default()).unwrap();
        assert_eq!(again.sim_time_ns, m.sim_time_ns, "deterministic");
    }

    #[test]
    fn malformed_lines_are_reported_by_number() {
        let s = parse(MACHINE, &[]).unwrap();
        for (bad, want) in [
            ("0,gpu0,r,a,0", "expected 6 fields"),
            ("0,gpu1,r,a,0,64", "agent `gpu1`"),
            ("0,gpu0,x,a,0,64", "op `x`"),
            ("0,gpu0,r,b,0,64", "no buffer `b`"),
            ("0,gpu0,r,a,4194300,64", "inside the buffer"),
            ("0,gpu0,r,a,0,0", "len from 1"),
            ("zero,gpu0,r,a,0,64", "time_ns `zero`"),
        ] {
            let t = format!("0,cpu,r,a,0,8\n{bad}\n");
            let e = replay(&s, t.as_bytes(), Format::Native, Outputs::default()).unwrap_err();
            assert!(matches!(e, ReplayError::Line { line: 2, .. }), "{bad}: {e}");
            assert!(e.to_string().contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn jsonl_lines_are_native_accesses_too() {
        let s = parse(MACHINE, &[]).unwrap();
        let mut t = String::new();
        for i in 0..100u64 {
            let op = if i % 2 == 0 { "w" } else { "read" };
            t.push_str(&format!(
                "{{\"time_ns\": {}, \"agent\": \"gpu0\", \"op\": \"{op}\", \"buffer\": \"a\", \"offset\": {}, \"len\": 128}}\n",
                i * 500,
                (i * 13 % 1024) * 4096
            ));
        }
        t.push_str("99999,cpu,r,a,0,8\n");
        let (m, _) = replay(&s, t.as_bytes(), Format::Native, Outputs::default()).unwrap();
        assert_eq!(m.events, 101);
        assert_eq!((m.corrupted_bytes, m.leaked_frames), (0, 0));
        for (bad, want) in [
            ("{\"time_ns\": 0}", "missing field"),
            ("{\"time_ns\": 0, \"agent\": \"gpu0\", \"op\": \"r\", \"buffer\": \"a\", \"offset\": 0, \"len\": 8, \"x\": 1}", "unknown field"),
            ("{\"time_ns\": -1, \"agent\": \"gpu0\", \"op\": \"r\", \"buffer\": \"a\", \"offset\": 0, \"len\": 8}", "not an access"),
            ("{\"time_ns\": 0, \"agent\": \"gpu0\", \"op\": \"x\", \"buffer\": \"a\", \"offset\": 0, \"len\": 8}", "op `x`"),
            ("{\"time_ns\": 0, \"agent\": \"gpu0\", \"op\": \"r\", \"buffer\": \"a\", \"offset\": 0, \"len\": 0}", "len from 1"),
            ("{not json", "not an access"),
        ] {
            let t = format!("0,cpu,r,a,0,8\n{bad}\n");
            let e = replay(&s, t.as_bytes(), Format::Native, Outputs::default()).unwrap_err();
            assert!(matches!(e, ReplayError::Line { line: 2, .. }), "{bad}: {e}");
            assert!(e.to_string().contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn a_gpu_ext_chunk_trace_replays_its_accesses() {
        let s = parse(MACHINE, &[]).unwrap();
        let t = "time_ms,hook_type,owner_pid,va_block_start,va_block_end,page_index\n\
                 0.5,block_activate,4242,0x7f0000200000,0x7f0000400000,0\n\
                 0.75,block_access,4242,0x7f0000200000,0x7f0000400000,17\n\
                 1,prefetch,4242,0x7f0000200000,0x7f0000400000,18\n\
                 2.25,evict_prepare,4243,139637976727552,139637978824704,3\n\
                 3,access,4243,139637976727552,139637978824704,511\n";
        let (m, _) = replay(&s, t.as_bytes(), Format::GpuExt, Outputs::default()).unwrap();
        assert_eq!(m.events, 3, "activate, access, access");
        assert_eq!((m.corrupted_bytes, m.leaked_frames), (0, 0));
        assert!(m.sim_time_ns >= 2_500_000, "from 0.5 ms to 3 ms");
        for (bad, want) in [
            ("1,block_access,1,0x1000", "expected 6 fields"),
            ("1,block_smash,1,0x200000,0x400000,0", "hook `block_smash`"),
            ("-1,block_access,1,0x200000,0x400000,0", "time_ms `-1`"),
            ("nan,block_access,1,0x200000,0x400000,0", "time_ms `nan`"),
            ("1,block_access,1,0xzz,0x400000,0", "va_block_start `0xzz`"),
            (
                "1,block_access,1,0x200000,0x400000,512",
                "not inside the block",
            ),
            ("1,block_access,1,0x200000,0x400000,x", "page_index `x`"),
        ] {
            let t = format!("0,access,1,0x200000,0x400000,0\n{bad}\n");
            let e = replay(&s, t.as_bytes(), Format::GpuExt, Outputs::default()).unwrap_err();
            assert!(matches!(e, ReplayError::Line { line: 2, .. }), "{bad}: {e}");
            assert!(e.to_string().contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn a_uvm_eval_log_replays_its_faults() {
        let s = parse(MACHINE, &[]).unwrap();
        let log = "4,100,200,-;s,0\n\
                   4,101,201,-;f,7f3a00201040,1000,1,2,3\n\
                   f,0x7f3a00405000,2500,0\n\
                   uvm range destroy 0x7f3a00000000\n\
                   b,2\n\
                   4,102,202,-;e,7f3a00201000\n";
        let (m, _) = replay(&s, log.as_bytes(), Format::UvmEval, Outputs::default()).unwrap();
        assert_eq!(m.events, 2);
        assert_eq!((m.corrupted_bytes, m.leaked_frames), (0, 0));
        let e = replay(
            &s,
            "f,zz,1\n".as_bytes(),
            Format::UvmEval,
            Outputs::default(),
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("line 1: fault address `zz`"),
            "{e}"
        );
    }
}
