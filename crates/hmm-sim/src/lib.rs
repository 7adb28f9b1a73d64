//! # hmm-sim: workloads on hmm-rs
//!
//! Scenario files ([`scenario`]: the machine, buffers, phases of CPU threads and GPU
//! kernels with access patterns, the policies, the cost model), run by a deterministic
//! engine ([`engine`]) on the real system (`hmm` and the `hmm-svm` driver) with simulated
//! time from a documented cost model ([`cost`]). The same scenario and seed give the same
//! counters, bit for bit; every run ends with the byte check and the frame audit.
//!
//! ```
//! use hmm_sim::{engine, scenario};
//!
//! let text = scenario::shipped("cpu-gpu-pingpong").unwrap();
//! let s = scenario::parse(text, &["policy.thrashing=false".into()]).unwrap();
//! let m = engine::run(&s).unwrap();
//! assert_eq!((m.corrupted_bytes, m.leaked_frames), (0, 0));
//! assert_eq!(m.thrash_detections, 0);
//! assert!(m.gpu_faults > 0 && m.bytes_d2h > 0, "pages went back and forth");
//! ```
//!
//! The format is documented in `docs/scenarios.md`; `hmm run` is the command. [`trace`]
//! replays a recorded trace on a scenario's machine instead (`hmm replay`).

#![forbid(unsafe_code)]

pub mod cost;
pub mod engine;
pub mod pattern;
pub mod record;
pub mod scenario;
pub mod threads;
pub mod timeline;
pub mod topology;
pub mod trace;
