//! Training curves from a run's metrics.jsonl, as curves.png and curves.svg: a
//! title (model and dataset), a loss panel (training loss per logged step,
//! validation loss per epoch) and an accuracy panel (validation top-1 and top-5
//! per epoch, training accuracy where logged), both over training steps so they
//! line up. Drawn with plotters; the PNG's text uses a bundled DejaVu Sans
//! subset (assets/), so no system font library is needed.

use crate::util::{limits, read_text_limited};
use anyhow::{anyhow, bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

/// PNG size in pixels; the SVG uses the same coordinates.
pub const WIDTH: u32 = 1280;
pub const HEIGHT: u32 = 540;
/// Height of the legend strip under each panel.
const LEGEND_H: u32 = 30;

const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const GREY: RGBColor = RGBColor(127, 127, 127);
const PURPLE: RGBColor = RGBColor(148, 103, 189);

/// The series of one run, (step, value) each; accuracies in %.
#[derive(Default)]
struct Series {
    train_loss: Vec<(f64, f64)>,
    val_loss: Vec<(f64, f64)>,
    top1: Vec<(f64, f64)>,
    top5: Vec<(f64, f64)>,
    train_acc: Vec<(f64, f64)>,
}

/// A value a chart can hold: huge or infinite ones (a diverged run, a corrupt
/// line) would make the axis range overflow.
fn plottable(v: f64) -> bool {
    v.is_finite() && v.abs() < 1e12
}

/// Parses metrics.jsonl. Lines that are not JSON records, or lack a plottable
/// step, are skipped (a run killed mid-write leaves a partial last line); a
/// record missing one value leaves only that value out.
fn parse(text: &str) -> Series {
    let mut s = Series::default();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v["step"].as_f64().filter(|&x| plottable(x) && x >= 0.0) else {
            continue;
        };
        let push = |to: &mut Vec<(f64, f64)>, key: &str, scale: f64| {
            if let Some(y) = v[key].as_f64().map(|y| y * scale).filter(|&y| plottable(y)) {
                to.push((step, y));
            }
        };
        match v["kind"].as_str() {
            Some("train") => push(&mut s.train_loss, "loss", 1.0),
            Some("eval") => {
                push(&mut s.val_loss, "val_loss", 1.0);
                push(&mut s.top1, "val_top1", 100.0);
                push(&mut s.top5, "val_top5", 100.0);
                push(&mut s.train_acc, "train_acc", 100.0);
            }
            _ => {}
        }
    }
    s
}

/// Registers the bundled font as "sans-serif" (regular and bold) once per process.
fn register_fonts() -> Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, include_bytes!("../assets/DejaVuSans.ttf")).is_ok()
            && plotters::style::register_font("sans-serif", FontStyle::Bold, include_bytes!("../assets/DejaVuSans-Bold.ttf")).is_ok()
    });
    if !ok {
        bail!("the bundled font does not parse");
    }
    Ok(())
}

/// A y range holding every value with some headroom, within [floor, ceil].
/// It starts at `floor` when the values come near it (loss from 0, accuracy
/// early in training), else it zooms in so late small changes stay visible.
fn y_range(values: impl Iterator<Item = f64>, floor: f64, ceil: f64) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        return (floor, ceil.min(floor + 1.0));
    }
    // Values outside the bounds (a corrupt record) are drawn at the edge.
    let (lo, hi) = (lo.clamp(floor, ceil), hi.clamp(floor, ceil));
    let pad = ((hi - lo) * 0.08).max(0.02 * hi.abs().max(1.0));
    let lo = if lo - floor < hi - lo { floor } else { (lo - pad).max(floor) };
    let top = (hi + pad).min(ceil);
    // A sliver above `ceil` too: a series at 100% is not drawn on the frame.
    (lo, top + (top - lo) * 0.02)
}

/// A tick value without trailing zeros ("95", "2.5", "0.25").
fn tick(v: &f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A series to draw: name, colour, (step, value) points, whether to mark each point.
type Curve<'a> = (&'a str, RGBColor, &'a [(f64, f64)], bool);

/// One panel: `series` as (name, colour, points, marked) with markers on the
/// per-epoch series (and on any series of a single point, which no line shows),
/// and a legend in a strip below the axis, where it can hide no data.
fn panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, caption: &str, x_max: f64, (y_lo, y_hi): (f64, f64), y_label: &str, series: &[Curve]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the chart: {e}");
    let (plot_area, legend_area) = area.split_vertically(area.dim_in_pixel().1.saturating_sub(LEGEND_H));
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(caption, ("sans-serif", 19, FontStyle::Bold))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(64)
        // 2% room on the right: the last evaluation's marker sits on the last step.
        .build_cartesian_2d(0f64..x_max * 1.02, y_lo..y_hi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("training step")
        .y_desc(y_label)
        .axis_desc_style(("sans-serif", 16))
        .label_style(("sans-serif", 15))
        .light_line_style(RGBColor(240, 240, 240))
        .bold_line_style(RGBColor(210, 210, 210))
        .max_light_lines(2)
        .x_labels(8)
        .y_labels(8)
        // Steps are integers; a run of a few steps must not show "0.5".
        .x_label_formatter(&|x| if x.fract() == 0.0 { format!("{x:.0}") } else { String::new() })
        .y_label_formatter(&tick)
        .draw()
        .map_err(err)?;
    let shown: Vec<_> = series.iter().filter(|s| !s.2.is_empty()).collect();
    for &&(_, colour, points, marked) in &shown {
        chart.draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(2))).map_err(err)?;
        if marked || points.len() == 1 {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, colour.filled()))).map_err(err)?;
        }
    }
    // Legend entries side by side, centred under the plot: swatch, gap, name.
    let text = ("sans-serif", 15).into_font().color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
    let widths = shown.iter().map(|s| legend_area.estimate_text_size(s.0, &text).map(|(w, _)| w as i32)).collect::<Result<Vec<_>, _>>().map_err(err)?;
    let (swatch, gap) = (28, 26);
    let total: i32 = widths.iter().map(|w| w + swatch + 6).sum::<i32>() + gap * (widths.len() as i32 - 1).max(0);
    let (mut x, y) = (((legend_area.dim_in_pixel().0 as i32 - total) / 2).max(0), LEGEND_H as i32 / 2 - 4);
    for (&&(name, colour, _, marked), w) in shown.iter().zip(widths) {
        legend_area.draw(&PathElement::new(vec![(x, y), (x + swatch, y)], colour.stroke_width(2))).map_err(err)?;
        if marked {
            legend_area.draw(&Circle::new((x + swatch / 2, y), 4, colour.filled())).map_err(err)?;
        }
        legend_area.draw_text(name, &text, (x + swatch + 6, y)).map_err(err)?;
        x += swatch + 6 + w + gap;
    }
    Ok(())
}

/// The whole chart on one drawing area (a PNG buffer or an SVG string).
fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, s: &Series, title: &str) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the chart: {e}");
    root.fill(&WHITE).map_err(err)?;
    let root = root.margin(14, 6, 10, 22).titled(title, ("sans-serif", 24, FontStyle::Bold)).map_err(err)?;
    let (left, right) = root.split_horizontally(WIDTH / 2);
    let all = [&s.train_loss, &s.val_loss, &s.top1, &s.top5, &s.train_acc];
    let x_max = all.iter().flat_map(|v| v.iter().map(|p| p.0)).fold(1.0, f64::max);
    let loss = y_range(s.train_loss.iter().chain(&s.val_loss).map(|p| p.1), 0.0, 1e12);
    panel(&left, "Loss", x_max, loss, "cross-entropy loss", &[("train (per logged step)", BLUE, &s.train_loss, false), ("validation (per epoch)", ORANGE, &s.val_loss, true)])?;
    let acc = y_range(s.top1.iter().chain(&s.top5).chain(&s.train_acc).map(|p| p.1), 0.0, 100.0);
    panel(
        &right,
        "Accuracy",
        x_max,
        acc,
        "accuracy (%)",
        &[("validation top-1", GREEN, &s.top1, true), ("validation top-5", GREY, &s.top5, true), ("train (epoch mean)", PURPLE, &s.train_acc, true)],
    )?;
    root.present().map_err(err)
}

/// Draws `out_dir`/curves.png and curves.svg from `metrics` (each written
/// atomically). A file with no usable record is an error; one with a single
/// point or no evaluation yet draws what it has.
pub fn curves(metrics: &Path, out_dir: &Path, title: &str) -> Result<()> {
    let text = read_text_limited(metrics, limits::TEXT, "metrics file")?;
    let s = parse(&text);
    if s.train_loss.is_empty() && s.val_loss.is_empty() && s.top1.is_empty() && s.top5.is_empty() {
        bail!("{}: no training or evaluation records to plot", metrics.display());
    }
    register_fonts()?;
    let mut rgb = vec![255u8; WIDTH as usize * HEIGHT as usize * 3];
    draw(BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area(), &s, title)?;
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, rgb).ok_or_else(|| anyhow!("chart buffer size"))?;
    let mut png = vec![];
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    crate::checkpoint::write_atomic(&out_dir.join("curves.png"), &png)?;
    let mut svg = String::new();
    draw(SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area(), &s, title)?;
    crate::checkpoint::write_atomic(&out_dir.join("curves.svg"), svg.as_bytes())
}
