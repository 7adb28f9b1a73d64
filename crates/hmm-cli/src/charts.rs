//! `hmm run`'s charts, drawn with the bench plots' helpers (`crate::bench::plot`):
//!
//! - `compare-SCENARIO` (`--compare ... --plot DIR`): each variant's simulated time, and
//!   the MiB it moved host to GPU, GPU to host and GPU to GPU;
//! - `bytes-SCENARIO` (`--plot DIR`, one run): MiB moved so far in each direction over
//!   simulated time;
//! - `batches-SCENARIO`: how many fault batches of each size (powers of two);
//! - `residency-SCENARIO`: each GPU's device memory in use over simulated time.
//!
//! `--report FILE.html` embeds the last three ([`run_charts_svg`]).

use std::path::{Path, PathBuf};

use hmm_sim::engine::Metrics;
use hmm_sim::record::{Recording, BATCH_BINS};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::bench::plot::{err, legend, save, style, svg, Chart, PALETTE, SIZE};
use crate::bench::Result;

/// `hmm run --compare`: simulated time per variant (left), MiB moved per direction per
/// variant (right).
struct Compare<'a> {
    scenario: &'a str,
    results: &'a [(String, Metrics)],
}

impl Compare<'_> {
    /// The variants' labels, the value after `=` when every label is `key=value`.
    fn labels(&self) -> Vec<String> {
        self.results
            .iter()
            .map(|(l, _)| l.split_once('=').map_or(l.as_str(), |(_, v)| v).to_string())
            .collect()
    }

    /// Bars of `values[variant][series]` over the variants, a group per variant.
    fn panel<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        title: &str,
        y_desc: &str,
        series: &[&str],
        values: &[Vec<f64>],
    ) -> Result<()> {
        let labels = self.labels();
        let n = labels.len();
        let hi = values.iter().flatten().fold(0.0f64, |a, &b| a.max(b)) * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(-0.5..n as f64 - 0.5, 0.0..hi.max(1e-9))
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|v| {
                let i = v.round();
                if (v - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < n {
                    labels[i as usize].clone()
                } else {
                    String::new()
                }
            })
            .y_desc(y_desc)
            .light_line_style(TRANSPARENT)
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(err)?;
        let k = series.len() as f64;
        let band = 0.8 / k;
        for (si, name) in series.iter().enumerate() {
            let color = PALETTE[si % PALETTE.len()];
            let x = |vi: usize| vi as f64 - 0.4 + band * si as f64;
            let bars = chart
                .draw_series(values.iter().enumerate().map(|(vi, v)| {
                    Rectangle::new([(x(vi), 0.0), (x(vi) + band * 0.9, v[si])], color.filled())
                }))
                .map_err(err)?;
            if series.len() > 1 {
                bars.label(*name).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled())
                });
            }
        }
        if series.len() > 1 {
            legend(&mut chart, SeriesLabelPosition::UpperRight, 14)?;
        }
        Ok(())
    }
}

impl Chart for Compare<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        root.fill(&WHITE).map_err(err)?;
        let key = self.results[0].0.split_once('=').map_or("", |(k, _)| k);
        let root = root
            .titled(&format!("{} by {key}", self.scenario), ("sans-serif", 24))
            .map_err(err)?;
        let (left, right) = root.split_horizontally(SIZE.0 * 2 / 5);
        let ms: Vec<Vec<f64>> = self
            .results
            .iter()
            .map(|(_, m)| vec![m.sim_time_ns as f64 / 1e6])
            .collect();
        self.panel(&left, "simulated time", "ms", &["time"], &ms)?;
        let mib = |b: u64| b as f64 / 1048576.0;
        let moved: Vec<Vec<f64>> = self
            .results
            .iter()
            .map(|(_, m)| vec![mib(m.bytes_h2d), mib(m.bytes_d2h), mib(m.bytes_d2d)])
            .collect();
        self.panel(
            &right,
            "bytes moved",
            "MiB",
            &["host to GPU", "GPU to host", "GPU to GPU"],
            &moved,
        )
    }
}

/// A scenario's name as part of a file name: its plain characters only.
fn file_name(prefix: &str, scenario: &str) -> String {
    let name: String = scenario
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{prefix}-{name}")
}

/// Writes the chart of a `hmm run --compare` into `dir` (created if missing) as
/// `compare-SCENARIO.svg` and `.png`; returns the files.
pub(crate) fn compare(
    dir: &Path,
    scenario: &str,
    results: &[(String, Metrics)],
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("creating the folder {}: {e}", dir.display()))?;
    save(
        dir,
        &file_name("compare", scenario),
        &Compare { scenario, results },
    )
}

/// Lines over simulated time (ms): one per series, from `(t_ns, value)` points.
struct Lines {
    title: String,
    y_desc: &'static str,
    series: Vec<(String, Vec<(f64, f64)>)>,
}

impl Chart for Lines {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        root.fill(&WHITE).map_err(err)?;
        let pts = self.series.iter().flat_map(|(_, p)| p.iter());
        let t_max = pts.clone().map(|p| p.0).fold(0.0f64, f64::max).max(1e-9);
        let y_max = pts.map(|p| p.1).fold(0.0f64, f64::max).max(1e-9) * 1.25;
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(0.0..t_max, 0.0..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("simulated time (ms)")
            .y_desc(self.y_desc)
            .light_line_style(TRANSPARENT)
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(err)?;
        for (i, (name, p)) in self.series.iter().enumerate() {
            let s = style(i);
            chart
                .draw_series(LineSeries::new(p.iter().copied(), s))
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], s));
        }
        legend(&mut chart, SeriesLabelPosition::UpperLeft, 14)
    }
}

/// The fault-batch size histogram.
struct Batches<'a> {
    title: String,
    rec: &'a Recording,
}

impl Chart for Batches<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        root.fill(&WHITE).map_err(err)?;
        let counts = &self.rec.batch_sizes;
        let hi = counts.iter().copied().max().unwrap_or(0).max(1) as f64 * 1.15;
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(-0.5..BATCH_BINS as f64 - 0.5, 0.0..hi)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(TRANSPARENT)
            .x_labels(BATCH_BINS)
            .x_label_formatter(&|v| {
                let i = v.round();
                if (v - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < BATCH_BINS {
                    Recording::bin_label(i as usize)
                } else {
                    String::new()
                }
            })
            .x_desc("faults in the batch")
            .y_desc("batches")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(counts.iter().enumerate().map(|(i, &n)| {
                let x = i as f64;
                Rectangle::new([(x - 0.4, 0.0), (x + 0.4, n as f64)], PALETTE[0].filled())
            }))
            .map_err(err)?;
        Ok(())
    }
}

/// MiB over simulated time, from pages, as steps: a value holds until the next sample
/// (the run changes it only at the moments sampled).
fn mib_points(rec: &Recording, pages: impl Fn(&hmm_sim::record::Sample) -> u64) -> Vec<(f64, f64)> {
    let mut pts: Vec<(f64, f64)> = Vec::with_capacity(2 * rec.samples.len());
    for s in &rec.samples {
        let t = s.t_ns as f64 / 1e6;
        let v = pages(s) as f64 * 4096.0 / 1048576.0;
        if let Some(&(_, before)) = pts.last() {
            pts.push((t, before));
        }
        pts.push((t, v));
    }
    pts
}

/// The three charts of one run.
fn run_charts<'a>(m: &Metrics, rec: &'a Recording) -> (Lines, Batches<'a>, Lines) {
    let mut moved = vec![
        ("host to GPU".to_string(), mib_points(rec, |s| s.h2d_pages)),
        ("GPU to host".to_string(), mib_points(rec, |s| s.d2h_pages)),
    ];
    if m.bytes_d2d > 0 {
        moved.push(("GPU to GPU".to_string(), mib_points(rec, |s| s.d2d_pages)));
    }
    let gpus = rec.samples.first().map_or(0, |s| s.resident_pages.len());
    let resident = (0..gpus)
        .map(|g| (format!("gpu{g}"), mib_points(rec, |s| s.resident_pages[g])))
        .collect();
    (
        Lines {
            title: format!("{}: bytes migrated", m.scenario),
            y_desc: "MiB so far",
            series: moved,
        },
        Batches {
            title: format!("{}: fault batches by size", m.scenario),
            rec,
        },
        Lines {
            title: format!("{}: device memory in use", m.scenario),
            y_desc: "MiB",
            series: resident,
        },
    )
}

/// Writes the three charts of one run into `dir` (created if missing); returns the files.
pub(crate) fn run(dir: &Path, m: &Metrics, rec: &Recording) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("creating the folder {}: {e}", dir.display()))?;
    let (bytes, batches, residency) = run_charts(m, rec);
    let mut files = save(dir, &file_name("bytes", &m.scenario), &bytes)?;
    files.extend(save(dir, &file_name("batches", &m.scenario), &batches)?);
    files.extend(save(dir, &file_name("residency", &m.scenario), &residency)?);
    Ok(files)
}

/// The three charts of one run as SVG documents: bytes migrated, fault batches, residency.
pub(crate) fn run_charts_svg(m: &Metrics, rec: &Recording) -> Result<[String; 3]> {
    let (bytes, batches, residency) = run_charts(m, rec);
    Ok([svg(&bytes)?, svg(&batches)?, svg(&residency)?])
}
