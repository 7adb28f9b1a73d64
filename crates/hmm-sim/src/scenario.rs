//! Scenario files: the machine, the buffers, the phases of work, the policies (TOML; the
//! schema is `docs/scenarios.md`).
//!
//! ```toml
//! name = "stream"
//! about = "a GPU kernel streams through a buffer twice"
//! seed = 1
//!
//! [machine]
//! ram_mib = 128
//! gpus = [{ vram_mib = 32 }]
//!
//! [policy]
//! migration = "first-touch"    # remote, counters
//! prefetch = "range"           # none, tree
//! eviction = "lru"             # fifo, lfu, random
//!
//! [[buffer]]
//! name = "a"
//! mib = 16
//!
//! [[phase]]
//! agents = [{ on = "gpu0", buffer = "a", pattern = "sequential", access = "read", passes = 2 }]
//! ```
//!
//! A file is read in three steps: TOML syntax and types (`toml`'s errors name the line and
//! column), unknown keys refused (`deny_unknown_fields`), then the meaning (a buffer that
//! does not exist, a GPU that is not there, a zero size), whose errors name the field's
//! path and the line it is on. `--set key=value` overrides any field before the file is
//! read ([`apply_override`]).

use serde::Deserialize;
use thiserror::Error;
use toml::{Spanned, Table, Value};

/// A scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Its name.
    pub name: String,
    /// One line of what it shows.
    #[serde(default)]
    pub about: String,
    /// The seed of every random choice (access patterns, random eviction).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// The machine.
    pub machine: Machine,
    /// The policies.
    #[serde(default)]
    pub policy: Policy,
    /// The cost model's parameters, where they differ from the defaults.
    #[serde(default)]
    pub cost: crate::cost::CostModel,
    /// The buffers, all in one process.
    #[serde(rename = "buffer", default)]
    pub buffers: Vec<Buffer>,
    /// The phases, one after the other (a barrier between each two).
    #[serde(rename = "phase", default)]
    pub phases: Vec<Phase>,
}

fn default_seed() -> u64 {
    1
}

/// The simulated machine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    /// System RAM, MiB (a multiple of 2).
    pub ram_mib: u64,
    /// The GPUs: `gpu0`, `gpu1`, ... in order.
    #[serde(default)]
    pub gpus: Vec<Gpu>,
    /// Direct links between two GPUs of one group whose bandwidth or latency differ from
    /// the cost model's `peer_gbps` / `peer_latency_ns`.
    #[serde(rename = "link", default)]
    pub links: Vec<LinkSpec>,
}

/// One GPU.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    /// Device memory, MiB (a multiple of 2).
    pub vram_mib: u64,
    /// Its peer group: GPUs with the same group name share a pagemap owner and a direct
    /// link between each two (none: a group of its own).
    #[serde(default)]
    pub group: Option<String>,
    /// Its host link's bandwidth, GB/s (default: the cost model's `link_gbps`).
    #[serde(default)]
    pub host_gbps: Option<f64>,
    /// Its host link's latency, ns (default: the cost model's `link_latency_ns`).
    #[serde(default)]
    pub host_latency_ns: Option<u64>,
}

/// A direct link between two GPUs of one group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    /// The two GPUs (`gpu0`, `gpu3`).
    pub between: Spanned<[String; 2]>,
    /// Bandwidth, GB/s, each direction.
    pub gbps: f64,
    /// Latency per transfer, ns.
    pub latency_ns: u64,
}

impl LinkSpec {
    /// The index of end `k` (0 or 1) of a validated link.
    pub fn gpu_index(&self, k: usize) -> usize {
        self.between.get_ref()[k][3..].parse().expect("validated")
    }
}

/// The policies, by name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// `first-touch`, `remote` or `counters`.
    pub migration: String,
    /// `range`, `none` or `tree`.
    pub prefetch: String,
    /// `lru`, `fifo`, `lfu` or `random`.
    pub eviction: String,
    /// UVM's thrashing detector on or off.
    pub thrashing: bool,
    /// Remote accesses per 2 MiB block that migrate it (0: access counters off).
    pub access_counters: u32,
    /// How a GPU takes pages a peer of its group holds: `copy` (directly, the source
    /// copying: Xe), `bounce` (through system memory: amdkfd) or `remote` (it maps them
    /// over the peer link).
    pub peer: String,
    /// Where a GPU's evicted chunks go: `host`, or `peer` (a GPU of its group with room,
    /// else the host).
    pub evict_to: String,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            migration: "first-touch".into(),
            prefetch: "range".into(),
            eviction: "lru".into(),
            thrashing: true,
            access_counters: 256,
            peer: "copy".into(),
            evict_to: "host".into(),
        }
    }
}

/// A buffer of the process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Buffer {
    /// Its name, for the agents.
    pub name: String,
    /// Size, MiB.
    pub mib: u64,
    /// `MADV_HUGEPAGE` on it.
    #[serde(default)]
    pub thp: bool,
}

/// One phase: agents that run at once; the next phase starts when all are done.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// Its name, for reports.
    #[serde(default)]
    pub name: String,
    /// GPUs brought back online when the phase starts (before `offline`).
    #[serde(default)]
    pub online: Vec<Spanned<String>>,
    /// GPUs taken offline when the phase starts: every page of their memory moves out (to
    /// a peer of the group with room when `policy.evict_to = "peer"`, else home) and they
    /// take no part until a phase brings them back.
    #[serde(default)]
    pub offline: Vec<Spanned<String>>,
    /// Explicit prefetches to a GPU before the agents start (`cudaMemPrefetchAsync`).
    #[serde(default)]
    pub prefetch: Vec<Prefetch>,
    /// The agents.
    pub agents: Vec<Agent>,
}

impl Phase {
    /// The index of GPU `name` (`gpuN`, validated).
    pub fn gpu_index(name: &Spanned<String>) -> usize {
        name.get_ref()[3..].parse().expect("validated")
    }
}

/// An explicit prefetch of a whole buffer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prefetch {
    /// The buffer.
    pub buffer: Spanned<String>,
    /// The GPU (`gpu0`, ...).
    pub to: Spanned<String>,
}

/// A CPU thread or a GPU kernel, accessing one buffer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    /// `cpu` or `gpuN`.
    pub on: Spanned<String>,
    /// The buffer.
    pub buffer: Spanned<String>,
    /// Where in the buffer the agent works, MiB from its start.
    #[serde(default)]
    pub offset_mib: u64,
    /// How much of the buffer, MiB (0: to its end).
    #[serde(default)]
    pub span_mib: u64,
    /// `sequential`, `strided`, `random`, `stencil` (each step reads the neighbours
    /// `stride` bytes either side, then the centre), `chase` (pointer chasing: the pages
    /// in a random cycle, one access each) or `tiled` (a matrix multiply over three
    /// matrices, a third of the span each, in tiles of `stride` bytes).
    #[serde(default = "default_pattern")]
    pub pattern: String,
    /// `read`, `write` or `rw` (a write every other access).
    #[serde(default = "default_access")]
    pub access: String,
    /// Bytes per access (at least 8, at most 4096).
    #[serde(default = "default_access_bytes")]
    pub access_bytes: u64,
    /// Bytes between accesses of `strided`.
    #[serde(default)]
    pub stride: u64,
    /// Accesses of `random` (default: one per `access_bytes` of the buffer).
    #[serde(default)]
    pub count: u64,
    /// Times over the pattern.
    #[serde(default = "default_passes")]
    pub passes: u64,
}

fn default_pattern() -> String {
    "sequential".into()
}

fn default_access() -> String {
    "read".into()
}

fn default_access_bytes() -> u64 {
    64
}

fn default_passes() -> u64 {
    1
}

/// Why a scenario cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ScenarioError {
    /// Bad TOML, a bad type or an unknown key (the message names the line).
    #[error("{0}")]
    Toml(String),
    /// A value that means nothing here.
    #[error("{}{field}: {why}", at_line(*line))]
    Invalid {
        /// The line (1-based), 0 when unknown.
        line: usize,
        /// The field's path.
        field: String,
        /// What is wrong and what would be right.
        why: String,
    },
    /// A `--set` that cannot be applied.
    #[error("--set {0}")]
    Override(String),
}

/// `line N: `, or nothing for line 0 (unknown).
fn at_line(line: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!("line {line}: ")
    }
}

/// The scenarios shipped in `scenarios/`, by name, with their text.
pub const SHIPPED: [(&str, &str); 14] = [
    ("stream", include_str!("../scenarios/stream.toml")),
    (
        "stream-oversubscribed",
        include_str!("../scenarios/stream-oversubscribed.toml"),
    ),
    ("random", include_str!("../scenarios/random.toml")),
    ("stencil", include_str!("../scenarios/stencil.toml")),
    ("sgemm", include_str!("../scenarios/sgemm.toml")),
    (
        "pointer-chase",
        include_str!("../scenarios/pointer-chase.toml"),
    ),
    (
        "cpu-gpu-pingpong",
        include_str!("../scenarios/cpu-gpu-pingpong.toml"),
    ),
    ("seed-story", include_str!("../scenarios/seed-story.toml")),
    (
        "multi-gpu-halo",
        include_str!("../scenarios/multi-gpu-halo.toml"),
    ),
    (
        "multi-gpu-halo-2",
        include_str!("../scenarios/multi-gpu-halo-2.toml"),
    ),
    ("all-to-all", include_str!("../scenarios/all-to-all.toml")),
    (
        "prefetch-multi-gpu",
        include_str!("../scenarios/prefetch-multi-gpu.toml"),
    ),
    (
        "peer-eviction",
        include_str!("../scenarios/peer-eviction.toml"),
    ),
    ("gpu-offline", include_str!("../scenarios/gpu-offline.toml")),
];

/// The text of the shipped scenario `name`.
pub fn shipped(name: &str) -> Option<&'static str> {
    SHIPPED.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// Sets `key` (a dotted path, `policy.eviction`) to `value` in the document `doc` (TOML:
/// `value` is read as a TOML value, or as a string if it is not one).
pub fn apply_override(doc: &mut Table, key: &str, value: &str) -> Result<(), ScenarioError> {
    let bad = |why: &str| ScenarioError::Override(format!("{key}={value}: {why}"));
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(bad("the key is empty or has an empty part"));
    }
    let parsed: Value = toml::from_str::<Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(value.to_string()));
    let (last, path) = parts.split_last().expect("at least one part");
    let mut table = doc;
    for p in path {
        let entry = table
            .entry(p.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| bad(&format!("`{p}` is not a table")))?;
    }
    table.insert(last.to_string(), parsed);
    Ok(())
}

/// Reads a scenario from `text` with the `overrides` (`key=value`) applied, and checks
/// what it means.
pub fn parse(text: &str, overrides: &[String]) -> Result<Scenario, ScenarioError> {
    let toml_error = |e: toml::de::Error| ScenarioError::Toml(e.to_string());
    if overrides.is_empty() {
        let scenario: Scenario = toml::from_str(text).map_err(toml_error)?;
        validate(&scenario, Some(text))?;
        return Ok(scenario);
    }
    let mut doc: Table = toml::from_str(text).map_err(toml_error)?;
    for o in overrides {
        let (k, v) = o
            .split_once('=')
            .ok_or_else(|| ScenarioError::Override(format!("{o}: expected key=value")))?;
        apply_override(&mut doc, k.trim(), v.trim())?;
    }
    // The document is written out and read again with the values set: its spans are
    // not the file's, so errors name the field without a line.
    let text = toml::to_string(&doc).map_err(|e| ScenarioError::Toml(e.to_string()))?;
    let scenario: Scenario = toml::from_str(&text).map_err(toml_error)?;
    validate(&scenario, None)?;
    Ok(scenario)
}

/// The line of byte `offset` in `text` (1-based), 0 without a text.
fn line_of(text: Option<&str>, offset: usize) -> usize {
    text.map_or(0, |t| {
        t.as_bytes()[..offset.min(t.len())]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    })
}

/// The limits a scenario is checked against: RAM up to the model's largest, a GPU's memory
/// up to one pagemap (both committed on the host only as they are used).
const MAX_RAM_MIB: u64 = hmm::phys::MAX_RAM_BYTES >> 20;
const MAX_VRAM_MIB: u64 = hmm::phys::MAX_SECTION_BYTES >> 20;
pub(crate) const MAX_GPUS: usize = 8;

/// The most accesses one agent makes (passes included).
const MAX_ACCESSES: u64 = 1 << 40;

fn validate(s: &Scenario, text: Option<&str>) -> Result<(), ScenarioError> {
    let invalid =
        |line: usize, field: String, why: String| ScenarioError::Invalid { line, field, why };
    let at = |sp: std::ops::Range<usize>| line_of(text, sp.start);
    let mib = |v: u64, field: &str, max: u64| {
        if v == 0 || v % 2 != 0 || v > max {
            Err(invalid(
                0,
                field.into(),
                format!("{v} MiB: must be a non-zero even number of MiB, at most {max}"),
            ))
        } else {
            Ok(())
        }
    };
    mib(s.machine.ram_mib, "machine.ram_mib", MAX_RAM_MIB)?;
    if s.machine.ram_mib < 8 {
        return Err(invalid(
            0,
            "machine.ram_mib".into(),
            "at least 8 MiB".into(),
        ));
    }
    s.cost
        .validate()
        .map_err(|(field, why)| invalid(0, format!("cost.{field}"), why))?;
    if s.machine.gpus.len() > MAX_GPUS {
        return Err(invalid(
            0,
            "machine.gpus".into(),
            format!("at most {MAX_GPUS} GPUs"),
        ));
    }
    let link_ok = |gbps: f64, latency_ns: u64, field: String| {
        if !(0.001..=100_000.0).contains(&gbps) {
            Err(invalid(
                0,
                field,
                "bandwidth from 0.001 to 100000 GB/s".into(),
            ))
        } else if latency_ns > crate::cost::MAX_NS {
            Err(invalid(
                0,
                field,
                format!("latency at most {} ns", crate::cost::MAX_NS),
            ))
        } else {
            Ok(())
        }
    };
    for (i, g) in s.machine.gpus.iter().enumerate() {
        mib(
            g.vram_mib,
            &format!("machine.gpus[{i}].vram_mib"),
            MAX_VRAM_MIB,
        )?;
        link_ok(
            g.host_gbps.unwrap_or(s.cost.link_gbps),
            g.host_latency_ns.unwrap_or(s.cost.link_latency_ns),
            format!("machine.gpus[{i}].host_gbps"),
        )?;
        if g.group.as_ref().is_some_and(|n| n.is_empty()) {
            return Err(invalid(
                0,
                format!("machine.gpus[{i}].group"),
                "a group needs a name".into(),
            ));
        }
    }
    for (i, l) in s.machine.links.iter().enumerate() {
        let field = format!("machine.link[{i}].between");
        let line = at(l.between.span());
        let [a, b] = l.between.get_ref();
        let index = |v: &str| {
            v.strip_prefix("gpu")
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&n| n < s.machine.gpus.len() && v == format!("gpu{n}"))
        };
        let (Some(x), Some(y)) = (index(a), index(b)) else {
            return Err(invalid(
                line,
                field,
                format!(
                    "`{a}`, `{b}`: two of the {} GPUs (gpu0, ...)",
                    s.machine.gpus.len()
                ),
            ));
        };
        let group = &s.machine.gpus[x].group;
        if x == y || group.is_none() || *group != s.machine.gpus[y].group {
            return Err(invalid(
                line,
                field,
                format!("`{a}` and `{b}`: a direct link joins two GPUs of one group"),
            ));
        }
        link_ok(l.gbps, l.latency_ns, format!("machine.link[{i}]"))
            .map_err(|e| relined(e, line))?;
    }
    let one_of = |v: &str, field: &str, names: &[&str]| {
        if names.contains(&v) {
            Ok(())
        } else {
            Err(invalid(
                0,
                field.into(),
                format!("`{v}`: one of {}", names.join(", ")),
            ))
        }
    };
    one_of(
        &s.policy.migration,
        "policy.migration",
        &["first-touch", "remote", "counters"],
    )?;
    one_of(
        &s.policy.prefetch,
        "policy.prefetch",
        &["range", "none", "tree"],
    )?;
    one_of(
        &s.policy.eviction,
        "policy.eviction",
        &["lru", "fifo", "lfu", "random"],
    )?;
    one_of(&s.policy.peer, "policy.peer", &["copy", "bounce", "remote"])?;
    one_of(&s.policy.evict_to, "policy.evict_to", &["host", "peer"])?;
    let mut total = 0;
    for (i, b) in s.buffers.iter().enumerate() {
        if b.mib == 0 || b.mib > MAX_RAM_MIB {
            return Err(invalid(
                0,
                format!("buffer[{i}].mib"),
                "from 1 to 262144 MiB".into(),
            ));
        }
        if s.buffers[..i].iter().any(|o| o.name == b.name) {
            return Err(invalid(
                0,
                format!("buffer[{i}].name"),
                format!("`{}` twice", b.name),
            ));
        }
        total += b.mib;
    }
    // The zero pages take the first 4 MiB.
    if total > s.machine.ram_mib - 4 {
        return Err(invalid(
            0,
            "buffer".into(),
            format!(
                "{total} MiB of buffers do not fit machine.ram_mib = {} (4 MiB of it hold the zero pages)",
                s.machine.ram_mib
            ),
        ));
    }
    let buffer = |name: &Spanned<String>, field: String| {
        if s.buffers.iter().any(|b| &b.name == name.get_ref()) {
            Ok(())
        } else {
            Err(invalid(
                at(name.span()),
                field,
                format!("no buffer `{}`", name.get_ref()),
            ))
        }
    };
    let gpu = |on: &Spanned<String>, field: String, cpu_too: bool| {
        let v = on.get_ref();
        let ok = (cpu_too && v == "cpu")
            || v.strip_prefix("gpu")
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n < s.machine.gpus.len() && *v == format!("gpu{n}"));
        if ok {
            Ok(())
        } else {
            let what = if cpu_too { "`cpu` or " } else { "" };
            Err(invalid(
                at(on.span()),
                field,
                format!(
                    "`{v}`: {what}one of the {} GPUs (gpu0, ...)",
                    s.machine.gpus.len()
                ),
            ))
        }
    };
    // Which GPUs are offline, phase by phase.
    let mut offline = vec![false; s.machine.gpus.len()];
    let online_now = |on: &Spanned<String>, field: String, offline: &[bool]| {
        let g = on
            .get_ref()
            .strip_prefix("gpu")
            .and_then(|n| n.parse::<usize>().ok());
        match g {
            Some(g) if offline[g] => Err(invalid(
                at(on.span()),
                field,
                format!("`{}` is offline in this phase", on.get_ref()),
            )),
            _ => Ok(()),
        }
    };
    for (p, phase) in s.phases.iter().enumerate() {
        for (k, g) in phase.online.iter().enumerate() {
            let field = format!("phase[{p}].online[{k}]");
            gpu(g, field.clone(), false)?;
            let i = Phase::gpu_index(g);
            if !offline[i] {
                let why = format!("`{}` is online already", g.get_ref());
                return Err(invalid(at(g.span()), field, why));
            }
            offline[i] = false;
        }
        for (k, g) in phase.offline.iter().enumerate() {
            let field = format!("phase[{p}].offline[{k}]");
            gpu(g, field.clone(), false)?;
            online_now(g, field, &offline)?;
            offline[Phase::gpu_index(g)] = true;
        }
        for (k, f) in phase.prefetch.iter().enumerate() {
            buffer(&f.buffer, format!("phase[{p}].prefetch[{k}].buffer"))?;
            gpu(&f.to, format!("phase[{p}].prefetch[{k}].to"), false)?;
            online_now(&f.to, format!("phase[{p}].prefetch[{k}].to"), &offline)?;
        }
        for (k, a) in phase.agents.iter().enumerate() {
            let f = |x: &str| format!("phase[{p}].agents[{k}].{x}");
            let line = at(a.on.span());
            gpu(&a.on, f("on"), true)?;
            online_now(&a.on, f("on"), &offline)?;
            buffer(&a.buffer, f("buffer"))?;
            one_of(
                &a.pattern,
                &f("pattern"),
                &[
                    "sequential",
                    "strided",
                    "random",
                    "stencil",
                    "chase",
                    "tiled",
                ],
            )
            .map_err(|e| relined(e, line))?;
            let size = s
                .buffers
                .iter()
                .find(|b| &b.name == a.buffer.get_ref())
                .map_or(0, |b| b.mib);
            let span = if a.span_mib == 0 {
                size.saturating_sub(a.offset_mib)
            } else {
                a.span_mib
            };
            if span == 0 || a.offset_mib.checked_add(span).map_or(true, |e| e > size) {
                return Err(invalid(
                    line,
                    f("offset_mib"),
                    format!("offset_mib + span_mib must lie inside the buffer's {size} MiB"),
                ));
            }
            one_of(&a.access, &f("access"), &["read", "write", "rw"])
                .map_err(|e| relined(e, line))?;
            if !(8..=4096).contains(&a.access_bytes) {
                return Err(invalid(line, f("access_bytes"), "from 8 to 4096".into()));
            }
            let span_bytes = span << 20;
            let strided = matches!(a.pattern.as_str(), "strided" | "stencil" | "tiled");
            // A tile is a third of the span at most (three matrices).
            let most = if a.pattern == "tiled" {
                span_bytes / 3
            } else {
                span_bytes
            };
            if strided && !(a.access_bytes..=most).contains(&a.stride) {
                return Err(invalid(
                    line,
                    f("stride"),
                    format!("from access_bytes to {most} bytes (the span allows no more)"),
                ));
            }
            if a.passes == 0 || a.passes > 1_000_000 {
                return Err(invalid(line, f("passes"), "from 1 to 1000000".into()));
            }
            if a.count > 1 << 32 {
                return Err(invalid(line, f("count"), "at most 2^32".into()));
            }
            let per_pass = match a.pattern.as_str() {
                "random" if a.count > 0 => a.count,
                "stencil" => 3 * span_bytes / a.access_bytes,
                "tiled" => 3 * span_bytes / a.access_bytes,
                "strided" => span_bytes / a.stride.max(1),
                _ => span_bytes / a.access_bytes,
            };
            if per_pass.saturating_mul(a.passes) > MAX_ACCESSES {
                return Err(invalid(
                    line,
                    f("passes"),
                    "at most 2^40 accesses an agent".into(),
                ));
            }
        }
    }
    Ok(())
}

/// `e` with the line of its agent.
fn relined(e: ScenarioError, line: usize) -> ScenarioError {
    match e {
        ScenarioError::Invalid { field, why, .. } => ScenarioError::Invalid { line, field, why },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
name = "t"
[machine]
ram_mib = 64
gpus = [{ vram_mib = 8 }]
[[buffer]]
name = "a"
mib = 4
[[phase]]
agents = [
  { on = "gpu0", buffer = "a" },
]
"#;

    #[test]
    fn every_shipped_scenario_parses() {
        for (name, text) in SHIPPED {
            let s = parse(text, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(s.name, name);
            assert!(!s.about.is_empty(), "{name} says what it shows");
        }
        assert!(shipped("stream").is_some() && shipped("nope").is_none());
    }

    #[test]
    fn bad_files_name_the_line_and_the_field() {
        let e = parse(&OK.replace("buffer = \"a\" }", "buffer = \"b\" }"), &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 11: phase[0].agents[0].buffer: no buffer `b`"
        );
        let e = parse(&OK.replace("on = \"gpu0\"", "on = \"gpu3\""), &[]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("line 11: phase[0].agents[0].on: `gpu3`"),
            "{e}"
        );
        let e = parse(&OK.replace("mib = 4", "mib = 4\ncolour = 1"), &[]).unwrap_err();
        assert!(
            e.to_string().contains("colour") && e.to_string().contains("line 9"),
            "{e}"
        );
        let e = parse(&OK.replace("ram_mib = 64", "ram_mib = \"x\""), &[]).unwrap_err();
        assert!(e.to_string().contains("line 4"), "{e}");
        let e = parse(&OK.replace("ram_mib = 64", "ram_mib = 3"), &[]).unwrap_err();
        assert!(e.to_string().contains("machine.ram_mib"), "{e}");
        let e = parse(&OK.replace("mib = 4", "mib = 100"), &[]).unwrap_err();
        assert!(e.to_string().contains("do not fit"), "{e}");
    }

    const PEERS: &str = r#"
name = "t"
[machine]
ram_mib = 64
gpus = [{ vram_mib = 8, group = "x" }, { vram_mib = 8, group = "x" }, { vram_mib = 8, host_gbps = 32.0 }]
[[machine.link]]
between = ["gpu0", "gpu1"]
gbps = 100.0
latency_ns = 500
[[buffer]]
name = "a"
mib = 4
[[phase]]
agents = [{ on = "gpu2", buffer = "a" }]
"#;

    #[test]
    fn groups_and_links_make_the_topology() {
        let s = parse(PEERS, &[]).unwrap();
        let links = crate::topology::Links::new(&s.machine, &s.cost);
        assert_eq!(links.peer[0][1].unwrap().gbps, 100.0);
        assert_eq!(links.peer[1][0].unwrap().latency_ns, 500);
        assert_eq!((links.peer[0][2], links.peer[2][1]), (None, None));
        assert_eq!(links.host[2].gbps, 32.0);
        assert_eq!(links.host[0].gbps, s.cost.link_gbps);
        // Two GPUs of one group without a `link` entry get the cost model's peer link.
        let bare = PEERS.replace(
            "[[machine.link]]\nbetween = [\"gpu0\", \"gpu1\"]\ngbps = 100.0\nlatency_ns = 500\n",
            "",
        );
        let s = parse(&bare, &[]).unwrap();
        assert!(s.machine.links.is_empty());
        let peer = crate::topology::Links::new(&s.machine, &s.cost).peer[0][1].unwrap();
        assert_eq!(
            (peer.gbps, peer.latency_ns),
            (s.cost.peer_gbps, s.cost.peer_latency_ns)
        );
        let e = parse(
            &PEERS.replace("[\"gpu0\", \"gpu1\"]", "[\"gpu0\", \"gpu2\"]"),
            &[],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 7: machine.link[0].between: `gpu0` and `gpu2`: a direct link joins two GPUs of one group"
        );
        let e = parse(
            &PEERS.replace("[\"gpu0\", \"gpu1\"]", "[\"gpu0\", \"gpu9\"]"),
            &[],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("line 7: machine.link[0].between: `gpu0`, `gpu9`"),
            "{e}"
        );
        let e = parse(&PEERS.replace("gbps = 100.0", "gbps = 0.0"), &[]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("line 7: machine.link[0]: bandwidth"),
            "{e}"
        );
        let e = parse(PEERS, &["policy.peer=teleport".into()]).unwrap_err();
        assert!(e.to_string().contains("policy.peer: `teleport`"), "{e}");
        let e = parse(
            &PEERS.replace(
                "group = \"x\" }, { vram_mib = 8, group",
                "group = \"\" }, { vram_mib = 8, group",
            ),
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("machine.gpus[0].group"), "{e}");
    }

    #[test]
    fn gpus_go_offline_and_come_back_between_phases() {
        let text = r#"
name = "t"
[machine]
ram_mib = 64
gpus = [{ vram_mib = 8 }, { vram_mib = 8 }]
[[buffer]]
name = "a"
mib = 4
[[phase]]
offline = ["gpu1"]
agents = [{ on = "gpu0", buffer = "a" }]
[[phase]]
online = ["gpu1"]
agents = [{ on = "gpu1", buffer = "a" }]
"#;
        parse(text, &[]).unwrap();
        let e = parse(&text.replace("on = \"gpu0\"", "on = \"gpu1\""), &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 11: phase[0].agents[0].on: `gpu1` is offline in this phase"
        );
        let e = parse(
            &text.replace("online = [\"gpu1\"]", "online = [\"gpu0\"]"),
            &[],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 13: phase[1].online[0]: `gpu0` is online already"
        );
        let e = parse(
            &text.replace("offline = [\"gpu1\"]", "offline = [\"gpu7\"]"),
            &[],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("line 10: phase[0].offline[0]: `gpu7`"),
            "{e}"
        );
    }

    #[test]
    fn the_documented_example_parses() {
        let doc = include_str!("../../../docs/scenarios.md");
        let start = doc.find("```toml\n").expect("an example") + 8;
        let end = start + doc[start..].find("```").expect("its end");
        let s = parse(&doc[start..end], &[]).unwrap();
        assert_eq!(s.name, "stream-oversubscribed");
        assert_eq!(s.cost.cpu_access_ns, 2000);
        assert_eq!(s.phases[0].prefetch.len(), 1);
    }

    #[test]
    fn overrides_of_a_file_with_wide_characters_do_not_panic() {
        let wide = format!("# {}\n{OK}", "\u{2014}".repeat(200));
        let s = parse(&wide, &["seed=2".into()]).unwrap();
        assert_eq!(s.seed, 2);
        // Without a line (the spans are those of the document with the values set).
        let e = parse(
            &wide.replace("buffer = \"a\" }", "buffer = \"b\" }"),
            &["seed=2".into()],
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "phase[0].agents[0].buffer: no buffer `b`");
    }

    #[test]
    fn limits_that_would_hang_or_overflow_a_run_are_refused() {
        for (from, to, field) in [
            (
                "{ on = \"gpu0\", buffer = \"a\" }",
                "{ on = \"gpu0\", buffer = \"a\", pattern = \"tiled\", stride = 1099511627776 }",
                "stride",
            ),
            (
                "{ on = \"gpu0\", buffer = \"a\" }",
                "{ on = \"gpu0\", buffer = \"a\", pattern = \"random\", count = 4294967296, passes = 1000 }",
                "passes",
            ),
            ("ram_mib = 64", "ram_mib = 4", "machine.ram_mib"),
            ("mib = 4", "mib = 62", "buffer"),
        ] {
            let e = parse(&OK.replace(from, to), &[]).unwrap_err();
            assert!(e.to_string().contains(field), "{to}: {e}");
        }
        for bad in [
            "cost.link_gbps=0",
            "cost.fault_batch_ns=9223372036854775807",
        ] {
            let e = parse(OK, &[bad.into()]).unwrap_err();
            assert!(e.to_string().contains("cost."), "{bad}: {e}");
        }
    }

    #[test]
    fn overrides_set_any_field() {
        let s = parse(OK, &["policy.eviction=fifo".into(), "seed=7".into()]).unwrap();
        assert_eq!((s.policy.eviction.as_str(), s.seed), ("fifo", 7));
        let e = parse(OK, &["policy.eviction=mru".into()]).unwrap_err();
        assert!(e.to_string().contains("policy.eviction"), "{e}");
        assert!(parse(OK, &["noequals".into()]).is_err());
        assert!(
            parse(OK, &["name.x=1".into()]).is_err(),
            "name is not a table"
        );
        assert!(
            parse(OK, &["colour=1".into()]).is_err(),
            "unknown keys stay refused"
        );
    }
}
