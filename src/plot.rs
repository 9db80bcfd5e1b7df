//! `miadpo plot`: the curves of a training run (`OUT/metrics.jsonl`, one JSON object per optimizer
//! step, written by `miadpo train`) drawn to one PNG with plotters: a 3x2 grid of panels. A DPO run:
//! loss; the rewards of the chosen and rejected answers and their margin; the reward accuracy; the
//! log-probs of the chosen and rejected answers; the learning rate; the gradient norm. An SFT run
//! (its lines carry `mean_token_accuracy` and no DPO reward): loss; token accuracy; answer tokens per
//! step; throughput; the learning rate; the gradient norm.
//!
//! Text is drawn with the DejaVu Sans Bold font embedded in the binary (the one the augment labels
//! use), registered with plotters' `ab_glyph` backend, so no system font is needed. Values that are
//! null (serde_json writes a non-finite float as null) or not finite are left out of the curves, and
//! the steps whose update was skipped (`"skipped": true`) are marked by a vertical red line.
use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};
use serde_json::Value;

use crate::{Error, Result};

/// Size of the PNG in pixels.
pub const WIDTH: u32 = 1500;
pub const HEIGHT: u32 = 900;
/// Rows and columns of the panel grid.
pub const GRID: (usize, usize) = (3, 2);
/// Height in pixels of the band at the top that holds the title; the panels fill the rest.
pub const TITLE_HEIGHT: u32 = 40;

const BACKGROUND: RGBColor = WHITE;
const SKIPPED_COLOR: RGBColor = RGBColor(230, 60, 60);
const COLORS: [RGBColor; 3] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
];

/// What `plot_metrics` drew.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlotSummary {
    /// optimizer steps (lines of metrics.jsonl) plotted
    pub steps: usize,
    /// of them, steps whose update was skipped (marked, not a gap in the x axis)
    pub skipped: usize,
    /// panels in the grid
    pub panels: usize,
}

/// The keys of metrics.jsonl that are plotted (by one of the two panel sets); every other key is
/// ignored.
const KEYS: [&str; 11] = [
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "lr",
    SFT_ACCURACY,
    "answer_tokens",
    "tokens_per_s",
];
/// The key that marks an SFT run's metrics.
const SFT_ACCURACY: &str = "mean_token_accuracy";
const GRAD_NORM: &str = "grad_norm";

/// One panel: its caption, its y-axis label and its series (legend label, metrics key).
struct Panel {
    caption: &'static str,
    y_label: &'static str,
    series: &'static [(&'static str, &'static str)],
    /// a y range that the axis always shows (widened to the data where they leave it)
    y_range: Option<(f64, f64)>,
}

const PANELS: [Panel; 6] = [
    Panel {
        caption: "DPO loss",
        y_label: "loss",
        series: &[("loss", "loss")],
        y_range: None,
    },
    Panel {
        caption: "Rewards",
        y_label: "reward",
        series: &[
            ("chosen", "rewards/chosen"),
            ("rejected", "rewards/rejected"),
            ("margin", "rewards/margins"),
        ],
        y_range: None,
    },
    Panel {
        caption: "Reward accuracy",
        y_label: "accuracy",
        series: &[("accuracy", "rewards/accuracies")],
        y_range: Some((-0.05, 1.05)),
    },
    Panel {
        caption: "Log-probs",
        y_label: "log p",
        series: &[("chosen", "logps/chosen"), ("rejected", "logps/rejected")],
        y_range: None,
    },
    Panel {
        caption: "Learning rate",
        y_label: "lr",
        series: &[("lr", "lr")],
        y_range: None,
    },
    Panel {
        caption: "Gradient norm",
        y_label: "norm",
        series: &[("grad norm", GRAD_NORM)],
        y_range: None,
    },
];

/// The panels of an SFT run (`train --stage sft`).
const SFT_PANELS: [Panel; 6] = [
    Panel {
        caption: "SFT loss (cross-entropy per answer token)",
        y_label: "loss",
        series: &[("loss", "loss")],
        y_range: None,
    },
    Panel {
        caption: "Token accuracy (greedy = answer)",
        y_label: "accuracy",
        series: &[("accuracy", SFT_ACCURACY)],
        y_range: Some((-0.05, 1.05)),
    },
    Panel {
        caption: "Answer tokens per step",
        y_label: "tokens",
        series: &[("answer tokens", "answer_tokens")],
        y_range: None,
    },
    Panel {
        caption: "Throughput",
        y_label: "tokens/s",
        series: &[("tokens/s", "tokens_per_s")],
        y_range: None,
    },
    Panel {
        caption: "Learning rate",
        y_label: "lr",
        series: &[("lr", "lr")],
        y_range: None,
    },
    Panel {
        caption: "Gradient norm",
        y_label: "norm",
        series: &[("grad norm", GRAD_NORM)],
        y_range: None,
    },
];

/// The panel set for these records: SFT's when some line has a token accuracy and none a DPO
/// reward or log-prob, DPO's otherwise.
fn panels_for(records: &[Record]) -> &'static [Panel; 6] {
    let has = |key: &str| records.iter().any(|r| r.get(key).is_some());
    let dpo = KEYS[1..7].iter().any(|k| has(k));
    if has(SFT_ACCURACY) && !dpo {
        &SFT_PANELS
    } else {
        &PANELS
    }
}

/// One line of metrics.jsonl: the step, whether its update was skipped, and the plotted values
/// (None where the key is missing, null or not finite).
struct Record {
    step: u64,
    skipped: bool,
    values: Vec<(&'static str, Option<f64>)>,
}

impl Record {
    fn get(&self, key: &str) -> Option<f64> {
        self.values.iter().find(|(k, _)| *k == key).and_then(|(_, v)| *v)
    }
}

/// Reads metrics.jsonl, or no records when `allow_empty` and the file is empty or missing.
fn read_metrics_or_empty(path: &Path) -> Result<Vec<Record>> {
    match std::fs::read_to_string(path) {
        Ok(t) if t.trim().is_empty() => Ok(Vec::new()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        _ => read_metrics(path),
    }
}

/// Reads metrics.jsonl: blank lines are skipped; every other line must be a JSON object with a
/// non-negative integer `step`. Records are returned in step order.
fn read_metrics(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |msg: String| Error::file(path, format!("line {}: {msg}", i + 1));
        let v: Value = serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
        let step = obj
            .get("step")
            .ok_or_else(|| bad("no `step`".into()))?
            .as_u64()
            .ok_or_else(|| bad("`step` is not a non-negative integer".into()))?;
        let skipped = match obj.get("skipped") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad("`skipped` is not a boolean".into())),
        };
        let mut values = Vec::with_capacity(KEYS.len() + 1);
        for key in KEYS.into_iter().chain([GRAD_NORM]) {
            let x = match obj.get(key) {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => n.as_f64().filter(|x| x.is_finite()),
                Some(_) => return Err(bad(format!("`{key}` is not a number or null"))),
            };
            values.push((key, x));
        }
        records.push(Record {
            step,
            skipped,
            values,
        });
    }
    if records.is_empty() {
        return Err(Error::file(
            path,
            "no metrics: the file is empty (has `miadpo train` done a step yet?)",
        ));
    }
    records.sort_by_key(|r| r.step);
    Ok(records)
}

/// The embedded DejaVu Sans Bold, registered once as plotters' "sans-serif" (every style falls back
/// to it). The outcome of registering a constant does not change between calls, so it is cached.
fn register_fonts() -> Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            register_font(
                "sans-serif",
                FontStyle::Normal,
                crate::augment::compose::FONT_BYTES,
            )
            .map_err(|_| "embedded font DejaVuSans-Bold.ttf: not a usable font".to_string())
        })
        .clone()
        .map_err(Error::Invalid)
}

/// Draws the curves of `metrics` (a metrics.jsonl) to the PNG `png` (WIDTH x HEIGHT), with `title`
/// at the top. The PNG's folder must exist.
pub fn plot_metrics(metrics: &Path, png: &Path, title: &str) -> Result<PlotSummary> {
    let records = read_metrics(metrics)?;
    register_fonts()?;
    let mut buf = vec![0u8; WIDTH as usize * HEIGHT as usize * 3];
    draw(&records, &mut buf, title).map_err(|e| Error::file(png, format!("drawing the plot: {e}")))?;
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, buf)
        .ok_or_else(|| Error::file(png, "plot buffer has the wrong size"))?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png)
        .map_err(|e| Error::file(png, format!("encoding PNG: {e}")))?;
    std::fs::write(png, bytes.into_inner()).map_err(|e| Error::io(png, e))?;
    Ok(PlotSummary {
        steps: records.len(),
        skipped: records.iter().filter(|r| r.skipped).count(),
        panels: PANELS.len(),
    })
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn draw(records: &[Record], buf: &mut [u8], title: &str) -> DrawResult {
    let root = BitMapBackend::with_buffer(buf, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&BACKGROUND)?;
    let (top, body) = root.split_vertically(TITLE_HEIGHT);
    top.draw(&Text::new(
        title.to_string(),
        (WIDTH as i32 / 2, TITLE_HEIGHT as i32 / 2),
        ("sans-serif", 24)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Center)),
    ))?;
    let areas = body.split_evenly(GRID);
    for (panel, area) in panels_for(records).iter().zip(&areas) {
        draw_panel(panel, records, area)?;
    }
    root.present()?;
    Ok(())
}

/// A curve: its runs of consecutive steps that have a value, as (step, value) points.
type Curve = Vec<Vec<(i64, f64)>>;

/// Curves with more points than this are drawn raw (thin, faint) plus a moving average.
const DENSE: usize = 120;

/// The mean of each point's `half` neighbours on either side and itself (fewer at the ends).
fn moving_average(seg: &[(i64, f64)], half: usize) -> Vec<(i64, f64)> {
    let mut prefix = vec![0.0];
    for &(_, y) in seg {
        prefix.push(prefix.last().unwrap() + y);
    }
    (0..seg.len())
        .map(|i| {
            let (a, b) = (i.saturating_sub(half), (i + half + 1).min(seg.len()));
            (seg[i].0, (prefix[b] - prefix[a]) / (b - a) as f64)
        })
        .collect()
}

/// Splits a series into runs of consecutive records that have a value, so that a missing value is a
/// gap in the curve rather than a straight line over it.
fn segments(records: &[Record], key: &str) -> Curve {
    let mut out: Curve = Vec::new();
    let mut cur = Vec::new();
    for r in records {
        match r.get(key) {
            Some(y) => cur.push((r.step as i64, y)),
            None if !cur.is_empty() => out.push(std::mem::take(&mut cur)),
            None => {}
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// A range that contains `lo..=hi` with a margin, and is not empty when `lo == hi`.
fn padded(lo: f64, hi: f64, frac: f64) -> (f64, f64) {
    let span = hi - lo;
    if span > 0.0 {
        (lo - span * frac, hi + span * frac)
    } else {
        let d = if lo.abs() > 0.0 { lo.abs() * 0.1 } else { 1.0 };
        (lo - d, hi + d)
    }
}

/// Formats a tick label with as many decimals as the axis span needs; very small or very large
/// values (the learning rate) in scientific notation.
fn tick_label(v: f64, lo: f64, hi: f64) -> String {
    let span = hi - lo;
    // a tick at zero may come out as -1e-17 from the tick arithmetic
    let v = if v.abs() <= span.abs() * 1e-9 { 0.0 } else { v };
    let mag = lo.abs().max(hi.abs());
    if !(1e-2..1e5).contains(&mag) {
        // enough mantissa digits to tell ticks a fifth of the span apart
        let digits = if span > 0.0 {
            (mag.log10().floor() - (span / 5.0).log10().floor()).clamp(1.0, 4.0) as usize
        } else {
            2
        };
        return if v == 0.0 {
            "0".into()
        } else {
            format!("{v:.digits$e}")
        };
    }
    let decimals = if span > 0.0 {
        (-(span / 5.0).log10().floor()).clamp(0.0, 6.0) as usize
    } else {
        2
    };
    format!("{v:.decimals$}")
}

/// The corner of the plotting area where a legend box of `frac` (width, height, as fractions of the
/// plotting area) covers the fewest curve samples; ties go to the upper right.
fn legend_corner(
    series: &[Curve],
    (x0, x1): (i64, i64),
    (y0, y1): (f64, f64),
    (fw, fh): (f64, f64),
) -> SeriesLabelPosition {
    let (x0, x1) = (x0 as f64, x1 as f64);
    let (bw, bh) = ((x1 - x0) * fw, (y1 - y0) * fh);
    let corners = [
        (SeriesLabelPosition::UpperRight, x1 - bw, y1 - bh),
        (SeriesLabelPosition::UpperLeft, x0, y1 - bh),
        (SeriesLabelPosition::LowerRight, x1 - bw, y0),
        (SeriesLabelPosition::LowerLeft, x0, y0),
    ];
    // the points of the curves and 15 points between each two, so that a line crossing a box counts
    let samples: Vec<(f64, f64)> = series
        .iter()
        .flatten()
        .flat_map(|seg| {
            let lines = seg.windows(2).flat_map(|w| {
                let (xa, xb) = (w[0].0 as f64, w[1].0 as f64);
                (1..16).map(move |k| {
                    let t = k as f64 / 16.0;
                    (xa + t * (xb - xa), w[0].1 + t * (w[1].1 - w[0].1))
                })
            });
            seg.iter().map(|&(x, y)| (x as f64, y)).chain(lines)
        })
        .collect();
    corners
        .into_iter()
        .map(|(pos, bx, by)| {
            let n = samples
                .iter()
                .filter(|&&(x, y)| x >= bx && x <= bx + bw && y >= by && y <= by + bh)
                .count();
            (n, pos)
        })
        .min_by_key(|(n, _)| *n)
        .map_or(SeriesLabelPosition::UpperRight, |(_, pos)| pos)
}

fn draw_panel(panel: &Panel, records: &[Record], area: &DrawingArea<BitMapBackend<'_>, Shift>) -> DrawResult {
    let series: Vec<(&str, RGBColor, Curve)> = panel
        .series
        .iter()
        .zip(COLORS)
        .map(|(&(label, key), color)| (label, color, segments(records, key)))
        .collect();
    let (x0, x1) = (
        records.first().map_or(0, |r| r.step) as i64,
        records.last().map_or(0, |r| r.step) as i64,
    );
    let (x0, x1) = if x1 > x0 { (x0, x1) } else { (x0 - 1, x1 + 1) };
    let ys = series
        .iter()
        .flat_map(|(_, _, segs)| segs.iter().flatten().map(|p| p.1));
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| {
        (lo.min(y), hi.max(y))
    });
    let has_data = lo <= hi;
    let (y0, y1) = match (has_data, panel.y_range) {
        (true, Some((a, b))) if lo >= a && hi <= b => (a, b),
        (true, Some((a, b))) => padded(lo.min(a), hi.max(b), 0.05),
        (true, None) => padded(lo, hi, 0.08),
        (false, range) => range.unwrap_or((0.0, 1.0)),
    };

    let mut chart = ChartBuilder::on(area)
        .caption(panel.caption, ("sans-serif", 18))
        .margin(8)
        .margin_right(20)
        .x_label_area_size(38)
        .y_label_area_size(72)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    let y_label = |v: &f64| tick_label(*v, y0, y1);
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(panel.y_label)
        .x_labels(((x1 - x0) as usize + 1).min(8))
        .y_labels(6)
        .y_label_formatter(&y_label)
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 14))
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()?;

    let skipped: Vec<i64> = records
        .iter()
        .filter(|r| r.skipped)
        .map(|r| r.step as i64)
        .collect();
    let legend = panel.series.len() > 1 || !skipped.is_empty();
    for (i, &x) in skipped.iter().enumerate() {
        let line = chart.draw_series(std::iter::once(PathElement::new(
            vec![(x, y0), (x, y1)],
            SKIPPED_COLOR.mix(0.6).stroke_width(2),
        )))?;
        if i == 0 && legend {
            line.label("skipped step")
                .legend(|(x, y)| PathElement::new(vec![(x + 4, y - 6), (x + 4, y + 6)], SKIPPED_COLOR));
        }
    }

    for (label, color, segs) in &series {
        let style = color.stroke_width(2);
        for (i, seg) in segs.iter().enumerate() {
            let drawn = if seg.len() == 1 {
                chart.draw_series(seg.iter().map(|&p| Circle::new(p, 3, color.filled())))?
            } else if seg.len() > DENSE {
                // a noisy curve of hundreds of steps: the raw values thin and faint (a thick
                // zig-zag's miter joins shoot out of the panel), a moving average on top
                chart.draw_series(LineSeries::new(
                    seg.iter().copied(),
                    color.mix(0.3).stroke_width(1),
                ))?;
                chart.draw_series(LineSeries::new(moving_average(seg, seg.len() / 60), style))?
            } else {
                chart.draw_series(LineSeries::new(seg.iter().copied(), style))?
            };
            if i == 0 && legend {
                let c = *color;
                drawn
                    .label(*label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
            }
        }
    }

    if !has_data {
        let (w, h) = area.dim_in_pixel();
        area.draw(&Text::new(
            "no data",
            (w as i32 / 2, h as i32 / 2),
            ("sans-serif", 16)
                .into_font()
                .color(&RGBColor(150, 150, 150))
                .pos(Pos::new(HPos::Center, VPos::Center)),
        ))?;
    }
    if legend {
        // the legend box: about 130 px wide, 20 px a line, 5 px margins
        let entries = series.len() + !skipped.is_empty() as usize;
        let (pw, ph) = chart.plotting_area().dim_in_pixel();
        let frac = (140.0 / pw as f64, (entries * 20 + 16) as f64 / ph as f64);
        let curves: Vec<_> = series.iter().map(|(_, _, segs)| segs.clone()).collect();
        let corner = legend_corner(&curves, (x0, x1), (y0, y1), frac);
        chart
            .configure_series_labels()
            .position(corner)
            .label_font(("sans-serif", 12))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .draw()?;
    }
    Ok(())
}

/// The demo's report panels: SFT curves, DPO curves.
const REPORT_SFT: [Panel; 2] = [
    Panel {
        caption: "SFT loss (single-image questions)",
        y_label: "loss",
        series: &[("loss", "loss")],
        y_range: None,
    },
    Panel {
        caption: "SFT token accuracy",
        y_label: "accuracy",
        series: &[("accuracy", SFT_ACCURACY)],
        y_range: Some((-0.05, 1.05)),
    },
];
const REPORT_DPO: [Panel; 2] = [
    Panel {
        caption: "DPO loss (multi-image pairs)",
        y_label: "loss",
        series: &[("loss", "loss")],
        y_range: None,
    },
    Panel {
        caption: "DPO rewards",
        y_label: "reward",
        series: &[
            ("chosen", "rewards/chosen"),
            ("rejected", "rewards/rejected"),
            ("margin", "rewards/margins"),
        ],
        y_range: None,
    },
];

/// One group of the report's bar chart: its label and the accuracies before and after DPO.
pub type BarGroup = (String, f64, f64);

/// `miadpo demo`'s report: the SFT and DPO curves (from their metrics.jsonl; an empty or missing DPO
/// file draws empty panels) and the before/after accuracies as bars, WIDTH x HEIGHT, to `png`.
pub fn plot_demo_report(sft: &Path, dpo: &Path, bars: &[BarGroup], png: &Path, title: &str) -> Result<()> {
    let sft = read_metrics(sft)?;
    let dpo = read_metrics_or_empty(dpo)?;
    register_fonts()?;
    let mut buf = vec![0u8; WIDTH as usize * HEIGHT as usize * 3];
    draw_report(&sft, &dpo, bars, &mut buf, title)
        .map_err(|e| Error::file(png, format!("drawing the report: {e}")))?;
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, buf)
        .ok_or_else(|| Error::file(png, "plot buffer has the wrong size"))?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png)
        .map_err(|e| Error::file(png, format!("encoding PNG: {e}")))?;
    crate::augment::run::write_atomic(png, &bytes.into_inner())
}

fn draw_report(sft: &[Record], dpo: &[Record], bars: &[BarGroup], buf: &mut [u8], title: &str) -> DrawResult {
    let root = BitMapBackend::with_buffer(buf, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&BACKGROUND)?;
    let (top, body) = root.split_vertically(TITLE_HEIGHT);
    top.draw(&Text::new(
        title.to_string(),
        (WIDTH as i32 / 2, TITLE_HEIGHT as i32 / 2),
        ("sans-serif", 20)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Center)),
    ))?;
    let (upper, lower) = body.split_vertically((HEIGHT - TITLE_HEIGHT) / 2);
    let ups = upper.split_evenly((1, 3));
    draw_panel(&REPORT_SFT[0], sft, &ups[0])?;
    draw_panel(&REPORT_SFT[1], sft, &ups[1])?;
    draw_panel(&REPORT_DPO[0], dpo, &ups[2])?;
    let (left, right) = lower.split_horizontally(WIDTH / 3);
    draw_panel(&REPORT_DPO[1], dpo, &left)?;
    draw_bars(bars, &right)?;
    root.present()?;
    Ok(())
}

/// Grouped bars: per group, the accuracy before (blue) and after (orange) DPO, in percent, each
/// bar labelled with its value.
fn draw_bars(bars: &[BarGroup], area: &DrawingArea<BitMapBackend<'_>, Shift>) -> DrawResult {
    let n = bars.len().max(1);
    let top = bars.iter().map(|b| b.1.max(b.2)).fold(0.0f64, f64::max) * 100.0;
    let y1 = ((top / 10.0).ceil() * 10.0 + 10.0).clamp(20.0, 110.0);
    let mut chart = ChartBuilder::on(area)
        .caption("Held-out accuracy before (SFT) and after DPO", ("sans-serif", 18))
        .margin(8)
        .margin_right(20)
        .x_label_area_size(38)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0.0f64..y1)?;
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let x_label = |v: &f64| {
        let i = v.round();
        if (v - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
            names[i as usize].clone()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&x_label)
        .y_desc("accuracy (%)")
        .y_labels(6)
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()?;
    let w = 0.36;
    for (which, (label, color)) in [("before (SFT)", COLORS[0]), ("after (DPO)", COLORS[1])]
        .into_iter()
        .enumerate()
    {
        let x_of = |i: usize| i as f64 + if which == 0 { -w } else { 0.0 };
        let val = |b: &BarGroup| 100.0 * if which == 0 { b.1 } else { b.2 };
        chart
            .draw_series(bars.iter().enumerate().map(|(i, b)| {
                Rectangle::new(
                    [(x_of(i) + 0.02, 0.0), (x_of(i) + w - 0.02, val(b))],
                    color.filled(),
                )
            }))?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
            Text::new(
                format!("{:.1}", val(b)),
                (x_of(i) + w / 2.0, val(b) + y1 * 0.01),
                ("sans-serif", 12)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Center, VPos::Bottom)),
            )
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::moving_average;

    #[test]
    fn moving_average_means_the_window_and_shrinks_it_at_the_ends() {
        let seg: Vec<(i64, f64)> = [1.0, 5.0, 3.0, 7.0, 4.0]
            .iter()
            .enumerate()
            .map(|(i, &y)| (i as i64, y))
            .collect();
        let m = moving_average(&seg, 1);
        let want = [3.0, 3.0, 5.0, 14.0 / 3.0, 5.5];
        assert_eq!(m.iter().map(|p| p.0).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
        for (got, want) in m.iter().zip(want) {
            assert!((got.1 - want).abs() < 1e-12, "{m:?}");
        }
        assert_eq!(moving_average(&seg, 0), seg, "no window: the values themselves");
    }
}
