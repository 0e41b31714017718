//! curves.png from metrics.jsonl: left panel the training loss per logged step
//! (blue) and the validation loss per epoch (orange); right panel the validation
//! top-1 (green) and top-5 (grey) accuracy per epoch on a 0-100% scale with
//! 10% grid lines. Drawn directly into an RGB image (no plotting dependency).

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use std::path::Path;

const W: u32 = 480;
const H: u32 = 320;
const M: i64 = 24;

fn line(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>) {
    let n = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
    for i in 0..=n {
        let x = x0 + (x1 - x0) * i / n;
        let y = y0 + (y1 - y0) * i / n;
        for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
            let (px, py) = (x + dx, y + dy);
            if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                img.put_pixel(px as u32, py as u32, c);
            }
        }
    }
}

/// One panel at x offset `ox`: series of (x, y) scaled to the panel.
fn panel(img: &mut RgbImage, ox: i64, series: &[(Vec<(f64, f64)>, Rgb<u8>)], y_range: Option<(f64, f64)>) {
    let (pw, ph) = (W as i64 / 2 - 2 * M, H as i64 - 2 * M);
    let grey = Rgb([200, 200, 200]);
    line(img, (ox + M, M), (ox + M, M + ph), Rgb([0, 0, 0]));
    line(img, (ox + M, M + ph), (ox + M + pw, M + ph), Rgb([0, 0, 0]));
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|s| s.0.iter().copied()).collect();
    if pts.is_empty() {
        return;
    }
    let xmax = pts.iter().map(|p| p.0).fold(f64::MIN, f64::max).max(1e-9);
    let (ymin, ymax) = y_range.unwrap_or_else(|| (0.0, pts.iter().map(|p| p.1).fold(f64::MIN, f64::max).max(1e-9)));
    if y_range.is_some() {
        for k in 1..10 {
            let y = M + ph - ph * k / 10;
            line(img, (ox + M + 1, y), (ox + M + pw, y), grey);
        }
    }
    let map = |(x, y): (f64, f64)| (ox + M + (x / xmax * pw as f64) as i64, M + ph - ((y - ymin) / (ymax - ymin) * ph as f64) as i64);
    for (s, c) in series {
        for w in s.windows(2) {
            line(img, map(w[0]), map(w[1]), *c);
        }
        if s.len() == 1 {
            let (x, y) = map(s[0]);
            line(img, (x - 2, y), (x + 2, y), *c);
        }
    }
}

pub fn curves(metrics: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics).with_context(|| format!("{}: cannot read", metrics.display()))?;
    let (mut train, mut vloss, mut top1, mut top5) = (vec![], vec![], vec![], vec![]);
    for l in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        let step = v["step"].as_f64().unwrap_or(0.0);
        match v["kind"].as_str() {
            Some("train") => train.push((step, v["loss"].as_f64().unwrap_or(0.0))),
            Some("eval") => {
                vloss.push((step, v["val_loss"].as_f64().unwrap_or(0.0)));
                top1.push((step, 100.0 * v["val_top1"].as_f64().unwrap_or(0.0)));
                top5.push((step, 100.0 * v["val_top5"].as_f64().unwrap_or(0.0)));
            }
            _ => {}
        }
    }
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    panel(&mut img, 0, &[(train, Rgb([31, 119, 180])), (vloss, Rgb([255, 127, 14]))], None);
    panel(&mut img, W as i64 / 2, &[(top5, Rgb([127, 127, 127])), (top1, Rgb([44, 160, 44]))], Some((0.0, 100.0)));
    let mut bytes = vec![];
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    crate::checkpoint::write_atomic(out, &bytes)
}
