//! Timelines: the Chrome trace-event JSON that Perfetto (ui.perfetto.dev) and
//! `chrome://tracing` open, in simulated time.
//!
//! | track (`tid`) | what |
//! |---|---|
//! | 0 `phases` | one slice per phase |
//! | 200 + K `cpu thread K` | CPU faults of the CPU agent K of its phase that brought device pages home (`migrate_to_ram`), with the pages (a trace replay's CPU is thread 0) |
//! | 10 + N `gpuN driver` | fault batches (faults, pages each way, evictions), explicit prefetches, the device going offline or back; instants for evictions and thrashing detections |
//! | 20 + N `gpuN copy` | the transfers GPU N's copy engine made: each link's bytes (`host to gpuN`, `gpuN to host`, `gpuN to gpuM`) and time |
//! | 100 `notifier` | every invalidation, an instant with its event (`MMU_NOTIFY_*`), owner and pages |
//!
//! Hits are not drawn (a run makes millions). Events are written as they happen, so a
//! timeline never holds a run in memory; writing stops at the first I/O error, which
//! [`Timeline::finish`] returns.

use std::io::{self, Write};

use serde_json::{json, Value};

/// The track of the phases.
pub const PHASES: u32 = 0;
/// The track of GPU `n`'s driver.
pub const fn gpu_driver(n: usize) -> u32 {
    // CAST: at most 8 GPUs.
    10 + n as u32
}
/// The track of GPU `n`'s copy engine.
pub const fn gpu_copy(n: usize) -> u32 {
    // CAST: at most 8 GPUs.
    20 + n as u32
}
/// The track of the invalidations.
pub const NOTIFIER: u32 = 100;

/// A trace-event writer.
pub struct Timeline {
    out: Box<dyn Write + Send>,
    first: bool,
    error: Option<io::Error>,
    /// The CPU threads whose tracks are named.
    cpus: Vec<bool>,
}

impl Timeline {
    /// Starts a trace on `out`, naming the tracks of a machine with `gpus` GPUs.
    pub fn new(out: Box<dyn Write + Send>, gpus: usize) -> Timeline {
        let mut t = Timeline {
            out,
            first: true,
            error: None,
            cpus: Vec::new(),
        };
        t.raw("{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n");
        t.name(PHASES, "phases");
        for g in 0..gpus {
            t.name(gpu_driver(g), &format!("gpu{g} driver"));
            t.name(gpu_copy(g), &format!("gpu{g} copy"));
        }
        t.name(NOTIFIER, "notifier");
        t
    }

    fn raw(&mut self, s: &str) {
        if self.error.is_none() {
            if let Err(e) = self.out.write_all(s.as_bytes()) {
                self.error = Some(e);
            }
        }
    }

    fn event(&mut self, v: Value) {
        let sep = if self.first { "" } else { ",\n" };
        self.first = false;
        self.raw(&format!("{sep}{v}"));
    }

    fn name(&mut self, tid: u32, name: &str) {
        self.event(
            json!({"ph": "M", "name": "thread_name", "pid": 0, "tid": tid, "args": {"name": name}}),
        );
    }

    /// The track of CPU thread `k` (named the first time).
    pub fn cpu(&mut self, k: usize) -> u32 {
        // CAST: agents of a phase fit u32; far more than a trace viewer shows.
        let track = 200u32.saturating_add(k as u32);
        if self.cpus.len() <= k {
            self.cpus.resize(k + 1, false);
        }
        if !self.cpus[k] {
            self.cpus[k] = true;
            self.name(track, &format!("cpu thread {k}"));
        }
        track
    }

    /// A slice on `track` from `start_ns` for `dur_ns`.
    pub fn slice(&mut self, track: u32, name: &str, start_ns: u64, dur_ns: u64, args: Value) {
        self.event(json!({
            "ph": "X", "name": name, "pid": 0, "tid": track,
            "ts": start_ns as f64 / 1000.0, "dur": dur_ns as f64 / 1000.0, "args": args,
        }));
    }

    /// An instant on `track` at `at_ns`.
    pub fn instant(&mut self, track: u32, name: &str, at_ns: u64, args: Value) {
        self.event(json!({
            "ph": "i", "s": "t", "name": name, "pid": 0, "tid": track,
            "ts": at_ns as f64 / 1000.0, "args": args,
        }));
    }

    /// Ends the trace and flushes it; the first write error, if any.
    pub fn finish(mut self) -> io::Result<()> {
        self.raw("\n]}\n");
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        self.out.flush()
    }
}

impl std::fmt::Debug for Timeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timeline").finish_non_exhaustive()
    }
}
