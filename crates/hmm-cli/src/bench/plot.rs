//! `--plot DIR`: the charts of a run, each written as SVG and PNG.
//!
//! - `migrate-threads-N`: throughput against region size, one line per direction and page
//!   kind, and the memcpy baseline of the same run (log-scale sizes);
//! - `walks`: page-table passes per method against the fraction of pages held by another
//!   device (left), and `one_walk`'s time over each other method's, round by round, with
//!   its 95% interval (right);
//! - `fault`: fault latency per scenario, the model's against the host kernel's baseline,
//!   median bars with a whisker to the 99th percentile (log scale);
//! - `range-fault`: `hmm_range_fault` ns per page per scenario, with the kernel's pagemap
//!   walk as a line (log scale).
//!
//! `hmm run`'s charts are in `crate::charts`, drawn with the helpers here.
//!
//! Text is drawn with DejaVu Sans, compiled into the binary (`assets/`, Bitstream Vera
//! licence), so plotting needs no system fonts.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::{CoordTranslate, Shift};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use super::fault::FaultRow;
use super::migrate::{human, MigrateRow};
use super::paired::PairedRatio;
use super::range_fault::RangeFaultRow;
use super::walks::{WalkRow, METHODS};
use super::Result;

pub(crate) const SIZE: (u32, u32) = (1024, 576);
const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
/// Colours of the series, in order: readable on white and for the common colour-blindness.
pub(crate) const PALETTE: [RGBColor; 5] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
];

pub(crate) fn err(e: impl std::fmt::Display) -> Box<dyn std::error::Error> {
    e.to_string().into()
}

/// A chart that can draw itself on any backend.
pub(crate) trait Chart {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>;
}

/// Registers the built-in font once.
fn font() -> Result<()> {
    static FONT_OK: OnceLock<bool> = OnceLock::new();
    if *FONT_OK.get_or_init(|| register_font("sans-serif", FontStyle::Normal, FONT).is_ok()) {
        Ok(())
    } else {
        Err("the built-in font does not load".into())
    }
}

/// `chart` as an SVG document, for a page that embeds it.
pub(crate) fn svg(chart: &impl Chart) -> Result<String> {
    font()?;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
        chart.draw(&root)?;
        root.present().map_err(err)?;
    }
    Ok(out)
}

/// Writes `chart` as `DIR/NAME.svg` and `DIR/NAME.png`; returns the two paths.
pub(crate) fn save(dir: &Path, name: &str, chart: &impl Chart) -> Result<Vec<PathBuf>> {
    font()?;
    let svg = dir.join(format!("{name}.svg"));
    let png = dir.join(format!("{name}.png"));
    let writing = |path: &Path| {
        let path = path.display().to_string();
        move |e: Box<dyn std::error::Error>| -> Box<dyn std::error::Error> {
            format!("writing {path}: {e}").into()
        }
    };
    {
        let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
        chart.draw(&root).map_err(writing(&svg))?;
        root.present().map_err(err).map_err(writing(&svg))?;
    }
    {
        let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
        chart.draw(&root).map_err(writing(&png))?;
        root.present().map_err(err).map_err(writing(&png))?;
    }
    Ok(vec![svg, png])
}

pub(crate) fn style(i: usize) -> ShapeStyle {
    PALETTE[i % PALETTE.len()].stroke_width(2)
}

/// A time in nanoseconds as an axis label: `500 ns`, `2 µs`, `1.5 ms`.
fn ns_label(ns: f64) -> String {
    let (v, unit) = if ns >= 1e6 {
        (ns / 1e6, "ms")
    } else if ns >= 1e3 {
        (ns / 1e3, "µs")
    } else {
        (ns, "ns")
    };
    if v >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0} {unit}")
    } else {
        format!("{v:.1} {unit}")
    }
}

/// Draws the series labels of `chart` at `position` in a framed box.
pub(crate) fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
    font_size: u32,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", font_size))
        .draw()
        .map_err(err)
}

/// Throughput against size for one thread count.
struct Throughput<'a> {
    rows: Vec<&'a MigrateRow>,
    threads: usize,
}

impl Chart for Throughput<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        root.fill(&WHITE).map_err(err)?;
        // Sizes on a log2 axis, labelled at whole powers of two.
        let log2 = |r: &&MigrateRow| (r.size_bytes() as f64).log2();
        let lo = self.rows.iter().map(log2).fold(f64::INFINITY, f64::min);
        let hi = self.rows.iter().map(log2).fold(0.0, f64::max);
        let top = self
            .rows
            .iter()
            .map(|r| r.gbps().max(r.memcpy_gbps()))
            .fold(0.0, f64::max);
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!(
                    "migrate_vma throughput, {} thread{}",
                    self.threads,
                    if self.threads == 1 { "" } else { "s" }
                ),
                ("sans-serif", 26),
            )
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            // Headroom above the lines for the legend.
            .build_cartesian_2d(lo - 0.5..hi + 0.5, 0.0..top * 1.6)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("region size")
            .y_desc("GB/s")
            .x_labels((hi - lo) as usize + 2)
            .x_label_formatter(&|v| {
                let k = v.round();
                if (v - k).abs() < 1e-6 && k >= 0.0 {
                    human(1u64 << k as u32)
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v| format!("{v:.1}"))
            .label_style(("sans-serif", 16))
            .draw()
            .map_err(err)?;
        let mut series = 0;
        for thp in [false, true] {
            for direction in ["sys_to_dev", "dev_to_sys"] {
                let pts: Vec<(f64, f64)> = self
                    .rows
                    .iter()
                    .filter(|r| r.thp() == thp && r.direction() == direction)
                    .map(|r| (log2(r), r.gbps()))
                    .collect();
                if pts.is_empty() {
                    continue;
                }
                let s = style(series);
                series += 1;
                chart
                    .draw_series(LineSeries::new(pts.clone(), s))
                    .map_err(err)?
                    .label(format!(
                        "{direction}, {}",
                        if thp { "THP" } else { "4 KiB pages" }
                    ))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], s));
                chart
                    .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, s.filled())))
                    .map_err(err)?;
            }
        }
        let mut memcpy: Vec<(f64, f64)> = self
            .rows
            .iter()
            .map(|r| (log2(r), r.memcpy_gbps()))
            .collect();
        memcpy.sort_by(|a, b| a.0.total_cmp(&b.0));
        memcpy.dedup_by(|a, b| a.0 == b.0);
        let black = BLACK.stroke_width(2);
        chart
            .draw_series(DashedLineSeries::new(memcpy, 8, 6, black))
            .map_err(err)?
            .label("memcpy of the same bytes")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], black));
        legend(&mut chart, SeriesLabelPosition::UpperRight, 16)
    }
}

/// Walks and ns per page against the fraction, per method.
struct Walks<'a> {
    rows: &'a [WalkRow],
}

impl Walks<'_> {
    fn panel<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        title: &str,
        y_desc: &str,
        value: impl Fn(&WalkRow) -> f64,
    ) -> Result<()> {
        let top = self.rows.iter().map(&value).fold(0.0, f64::max);
        // Headroom above the lines for the legend.
        let y1 = if top > 0.0 { top * 1.45 } else { 1.0 };
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..1.0, 0.0..y1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("fraction of pages held by device 1")
            .y_desc(y_desc)
            .y_label_formatter(&|v| {
                if v.fract() == 0.0 {
                    format!("{v:.0}")
                } else {
                    String::new()
                }
            })
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        for (i, method) in METHODS.iter().enumerate() {
            let pts: Vec<(f64, f64)> = self
                .rows
                .iter()
                .filter(|r| r.method() == *method)
                .map(|r| (r.fraction(), value(r)))
                .collect();
            let s = style(i);
            chart
                .draw_series(LineSeries::new(pts.clone(), s))
                .map_err(err)?
                .label(*method)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], s));
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, s.filled())))
                .map_err(err)?;
        }
        legend(&mut chart, SeriesLabelPosition::UpperLeft, 14)
    }

    /// `one_walk`'s time over each other method's: the median of the paired rounds, a
    /// whisker over its 95% interval, and a line at 1 (below it `one_walk` is faster).
    fn ratio_panel<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<()> {
        let ratios = || self.rows.iter().filter_map(|r| r.one_walk_time_ratio());
        let lo = ratios().map(|p| p.low).fold(1.0, f64::min);
        let hi = ratios().map(|p| p.high).fold(1.0, f64::max);
        // Headroom above for the legend.
        let pad = (hi - lo).max(0.01);
        let mut chart = ChartBuilder::on(area)
            .caption(
                "one_walk's time / the method's (paired rounds)",
                ("sans-serif", 22),
            )
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.02..1.02, (lo - pad * 0.1)..(hi + pad * 0.6))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("fraction of pages held by device 1")
            .y_desc("ratio (median, 95% interval)")
            .y_label_formatter(&|v| format!("{v:.2}"))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new([(-0.02, 1.0), (1.02, 1.0)], BLACK.mix(0.5)))
            .map_err(err)?;
        for (i, method) in METHODS.iter().enumerate() {
            let pts: Vec<(f64, PairedRatio)> = self
                .rows
                .iter()
                .filter(|r| r.method() == *method)
                .filter_map(|r| Some((r.fraction(), *r.one_walk_time_ratio()?)))
                .collect();
            if pts.is_empty() {
                continue;
            }
            let s = style(i);
            chart
                .draw_series(LineSeries::new(pts.iter().map(|(x, p)| (*x, p.median)), s))
                .map_err(err)?
                .label(*method)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], s));
            chart
                .draw_series(
                    pts.iter()
                        .map(|(x, p)| ErrorBar::new_vertical(*x, p.low, p.median, p.high, s, 8)),
                )
                .map_err(err)?;
        }
        legend(&mut chart, SeriesLabelPosition::UpperLeft, 14)
    }
}

impl Chart for Walks<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        root.fill(&WHITE).map_err(err)?;
        let pass = self.rows.first().map_or(0.0, WalkRow::pass_ns_per_page);
        let root = root
            .titled(
                &format!("Bringing a range to device 0 (one pass over it costs {pass:.1} ns/page)"),
                ("sans-serif", 24),
            )
            .map_err(err)?;
        let (left, right) = root.split_horizontally(SIZE.0 / 2);
        self.panel(&left, "page-table passes", "passes", |r| r.walks() as f64)?;
        self.ratio_panel(&right)
    }
}

/// One bar series: its name and, per category, the bar's value and an optional whisker
/// end.
struct BarSeries {
    name: String,
    values: Vec<(f64, Option<f64>)>,
}

/// Horizontal bars per category on a log scale, with an optional vertical reference line.
struct Bars {
    title: String,
    x_desc: &'static str,
    categories: Vec<String>,
    series: Vec<BarSeries>,
    reference: Option<(String, f64)>,
}

impl Chart for Bars {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        root.fill(&WHITE).map_err(err)?;
        let all = self
            .series
            .iter()
            .flat_map(|s| s.values.iter().flat_map(|(v, w)| [Some(*v), *w]))
            .flatten()
            .chain(self.reference.iter().map(|r| r.1))
            .filter(|v| *v > 0.0);
        let lo = all.clone().fold(f64::INFINITY, f64::min);
        let hi = all.fold(0.0, f64::max);
        if !lo.is_finite() {
            return Err("nothing to plot".into());
        }
        // Room on the right for the legend.
        let (x0, x1) = (lo / 1.5, hi * 8.0);
        let n = self.categories.len();
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 26))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(200)
            .build_cartesian_2d((x0..x1).log_scale(), -0.5..n as f64 - 0.5)
            .map_err(err)?;
        let names = &self.categories;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_formatter(&|v| {
                let i = v.round();
                if (v - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
                    names[n - 1 - i as usize].clone()
                } else {
                    String::new()
                }
            })
            .x_desc(self.x_desc)
            .x_label_formatter(&|v| ns_label(*v))
            .label_style(("sans-serif", 16))
            .draw()
            .map_err(err)?;
        let k = self.series.len() as f64;
        let band = 0.8 / k;
        for (si, s) in self.series.iter().enumerate() {
            let color = PALETTE[si % PALETTE.len()];
            // Category 0 at the top.
            let y = |ci: usize| (n - 1 - ci) as f64 + 0.4 - band * si as f64;
            chart
                .draw_series(s.values.iter().enumerate().map(|(ci, (v, _))| {
                    Rectangle::new([(x0, y(ci) - band * 0.9), (*v, y(ci))], color.filled())
                }))
                .map_err(err)?
                .label(s.name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled())
                });
            chart
                .draw_series(s.values.iter().enumerate().filter_map(|(ci, (v, w))| {
                    let mid = y(ci) - band * 0.45;
                    w.map(|w| PathElement::new(vec![(*v, mid), (w, mid)], BLACK.stroke_width(2)))
                }))
                .map_err(err)?;
        }
        if let Some((name, x)) = &self.reference {
            let line = BLACK.stroke_width(2);
            chart
                .draw_series(DashedLineSeries::new(
                    [(*x, -0.5), (*x, n as f64 - 0.5)],
                    8,
                    6,
                    line,
                ))
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], line));
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight, 16)
    }
}

/// The rows of a run, any of which may be absent.
#[derive(Default)]
pub(crate) struct Figures<'a> {
    pub(crate) migrate: &'a [MigrateRow],
    pub(crate) walks: &'a [WalkRow],
    pub(crate) fault: &'a [FaultRow],
    pub(crate) range_fault: &'a [RangeFaultRow],
}

/// Writes the charts of `figures` into `dir` (created if missing); returns the files.
pub(crate) fn plot(dir: &Path, figures: &Figures<'_>) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("creating the folder {}: {e}", dir.display()))?;
    let mut files = Vec::new();
    let mut threads: Vec<usize> = figures.migrate.iter().map(MigrateRow::threads).collect();
    threads.sort_unstable();
    threads.dedup();
    for t in threads {
        let rows = figures
            .migrate
            .iter()
            .filter(|r| r.threads() == t)
            .collect();
        files.extend(save(
            dir,
            &format!("migrate-threads-{t}"),
            &Throughput { rows, threads: t },
        )?);
    }
    if !figures.walks.is_empty() {
        files.extend(save(
            dir,
            "walks",
            &Walks {
                rows: figures.walks,
            },
        )?);
    }
    if !figures.fault.is_empty() {
        let f = figures.fault;
        let bars = Bars {
            title: "Fault latency: median, whisker to p99".into(),
            x_desc: "time per fault (log scale)",
            categories: f.iter().map(|r| r.scenario().replace('_', " ")).collect(),
            series: vec![
                BarSeries {
                    name: "hmm-rs".into(),
                    values: f
                        .iter()
                        .map(|r| (r.median_ns(), Some(r.p99_ns())))
                        .collect(),
                },
                BarSeries {
                    name: "host kernel baseline".into(),
                    values: f
                        .iter()
                        .map(|r| (r.kernel_median_ns(), Some(r.kernel_p99_ns())))
                        .collect(),
                },
            ],
            reference: None,
        };
        files.extend(save(dir, "fault", &bars)?);
    }
    if !figures.range_fault.is_empty() {
        let r = figures.range_fault;
        let bars = Bars {
            title: "hmm_range_fault, one call over the region".into(),
            x_desc: "time per page (log scale)",
            categories: r.iter().map(|r| r.scenario().replace('_', " ")).collect(),
            series: vec![BarSeries {
                name: "hmm_range_fault".into(),
                values: r.iter().map(|r| (r.ns_per_page(), None)).collect(),
            }],
            reference: r
                .first()
                .and_then(RangeFaultRow::kernel_pagemap_ns_per_page)
                .map(|k| ("host kernel pagemap walk".to_owned(), k)),
        };
        files.extend(save(dir, "range-fault", &bars)?);
    }
    Ok(files)
}
