//! Image decoding and the official evaluation preprocessing (spec §6).
//!
//! The resize reproduces Pillow's bicubic resampling (`Image.resize(..., BICUBIC)`,
//! which torchvision and transformers both call): a separable convolution with
//! the a = -0.5 cubic kernel stretched by the scale factor when downsampling
//! (antialiasing), fixed-point coefficients with 22 fractional bits, and 8-bit
//! rounding and clamping after each pass. Matching it bit for bit is what makes
//! the engine's input equal the reference's.

use anyhow::{bail, Context, Result};
use image::RgbImage;
use std::path::Path;

pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How to bring an image to the model's resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resize {
    /// The official evaluation transform: below 384, resize the shorter side to
    /// int(res / 0.875) and centre-crop res x res; at 384 and above, warp to res x res.
    Eval,
    /// The image must already be res x res; only convert and normalise
    /// (transformers' `do_resize=False`).
    None,
}

/// Decodes an image file to 8-bit RGB (grayscale, alpha and 16-bit converted).
pub fn decode(path: &Path) -> Result<RgbImage> {
    let shown = path.display();
    if path.is_dir() {
        bail!("{shown}: is a directory, expected an image file");
    }
    let meta = std::fs::metadata(path).with_context(|| format!("{shown}: cannot read"))?;
    if meta.len() == 0 {
        bail!("{shown}: empty file, not an image");
    }
    let reader = image::ImageReader::open(path).with_context(|| format!("{shown}: cannot read"))?.with_guessed_format().with_context(|| format!("{shown}: cannot read"))?;
    if reader.format().is_none() {
        bail!("{shown}: not a PNG, JPEG, WebP or BMP image");
    }
    let img = reader.decode().map_err(|e| anyhow::anyhow!("{shown}: cannot decode image ({e})"))?;
    Ok(img.to_rgb8())
}

/// Pillow's bicubic kernel (a = -0.5), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: first input index and fixed-point weights (Pillow's
/// `precompute_coeffs` + `normalize_coeffs_8bpc`).
fn coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut w: Vec<f64> = (xmin..xmax).map(|x| bicubic((x as f64 - center + 0.5) * ss)).collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            let fixed = w
                .iter()
                .map(|&v| {
                    let s = v * (1u64 << PRECISION_BITS) as f64;
                    if v < 0.0 {
                        (s - 0.5) as i32
                    } else {
                        (s + 0.5) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow-exact bicubic resize of an RGB image.
pub fn resize_bicubic(img: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let src = img.as_raw();
    // Horizontal pass (skipped when the width is unchanged, as Pillow does).
    let (mid, mid_w) = if out_w != in_w {
        let cx = coeffs(in_w, out_w);
        let mut mid = vec![0u8; out_w * in_h * 3];
        for y in 0..in_h {
            for (x, (xmin, k)) in cx.iter().enumerate() {
                for ch in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &w) in k.iter().enumerate() {
                        ss += src[(y * in_w + xmin + i) * 3 + ch] as i64 * w as i64;
                    }
                    mid[(y * out_w + x) * 3 + ch] = clip8(ss);
                }
            }
        }
        (mid, out_w)
    } else {
        (src.to_vec(), in_w)
    };
    let out = if out_h != in_h {
        let cy = coeffs(in_h, out_h);
        let mut out = vec![0u8; mid_w * out_h * 3];
        for (y, (ymin, k)) in cy.iter().enumerate() {
            for x in 0..mid_w {
                for ch in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &w) in k.iter().enumerate() {
                        ss += mid[((ymin + i) * mid_w + x) * 3 + ch] as i64 * w as i64;
                    }
                    out[(y * mid_w + x) * 3 + ch] = clip8(ss);
                }
            }
        }
        out
    } else {
        mid
    };
    RgbImage::from_raw(out_w as u32, out_h as u32, out).expect("resize buffer size")
}

/// Python's round() (half to even), which torchvision's CenterCrop uses.
fn round_half_even(x: f64) -> i64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && (r as i64) % 2 != 0 {
        (r - x.signum()) as i64
    } else {
        r as i64
    }
}

/// The official evaluation geometry for a `res` model, as an RGB image res x res.
pub fn eval_transform(img: &RgbImage, res: usize) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if res >= 384 {
        return resize_bicubic(img, res, res);
    }
    let short = (res as f64 / 0.875) as usize;
    // torchvision Resize(int): shorter side to `short`, longer side int(short * long / short_in).
    let (nw, nh) = if w <= h { (short, (short as f64 * h as f64 / w as f64) as usize) } else { ((short as f64 * w as f64 / h as f64) as usize, short) };
    let r = if (nw, nh) == (w, h) { img.clone() } else { resize_bicubic(img, nw, nh) };
    let top = round_half_even((nh as f64 - res as f64) / 2.0).max(0) as u32;
    let left = round_half_even((nw as f64 - res as f64) / 2.0).max(0) as u32;
    image::imageops::crop_imm(&r, left, top, res as u32, res as u32).to_image()
}

/// ToTensor + Normalize into NHWC f32 (the layout the first conv reads).
pub fn normalize(img: &RgbImage) -> Vec<f32> {
    img.as_raw().chunks_exact(3).flat_map(|px| (0..3).map(move |c| (px[c] as f32 / 255.0 - MEAN[c]) / STD[c])).collect()
}

/// Decodes and preprocesses one image for a res x res model.
pub fn load_image(path: &Path, res: usize, resize: Resize) -> Result<Vec<f32>> {
    let img = decode(path)?;
    let img = match resize {
        Resize::Eval => eval_transform(&img, res),
        Resize::None => {
            if img.width() as usize != res || img.height() as usize != res {
                bail!("{}: is {}x{}, but --no-resize needs exactly {res}x{res}", path.display(), img.width(), img.height());
            }
            img
        }
    };
    Ok(normalize(&img))
}

/// How a model's inputs are prepared: stored in the metadata of checkpoints the
/// engine trains (key `preprocess`), so `infer` and `eval` feed a model exactly
/// what it was trained on. Absent: the ImageNet evaluation transform.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Spec {
    /// 1 (grayscale, ITU-R 601 luma) or 3 (RGB).
    pub channels: usize,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// "eval": the official resize + centre crop; "plain": warp to res x res
    /// (small images such as Fashion-MNIST and Tiny-ImageNet).
    pub resize: String,
}

impl Spec {
    pub fn imagenet() -> Spec {
        Spec { channels: 3, mean: MEAN.to_vec(), std: STD.to_vec(), resize: "eval".into() }
    }

    /// Decodes `path` and prepares it for a res x res model (`Resize::None`
    /// overrides the spec's resize and requires the exact size).
    pub fn load(&self, path: &Path, res: usize, resize: Resize) -> Result<Vec<f32>> {
        let img = decode(path)?;
        let img = match resize {
            Resize::None => {
                if img.width() as usize != res || img.height() as usize != res {
                    bail!("{}: is {}x{}, but --no-resize needs exactly {res}x{res}", path.display(), img.width(), img.height());
                }
                img
            }
            Resize::Eval if self.resize == "plain" => {
                if img.width() as usize == res && img.height() as usize == res {
                    img
                } else {
                    resize_bicubic(&img, res, res)
                }
            }
            Resize::Eval => eval_transform(&img, res),
        };
        Ok(self.normalize(img.as_raw()))
    }

    /// HWC RGB u8 pixels to normalised NHWC f32 with this spec's channels.
    pub fn normalize(&self, rgb: &[u8]) -> Vec<f32> {
        if self.channels == 1 {
            rgb.chunks_exact(3)
                .map(|p| {
                    // Pillow's L conversion: (299 R + 587 G + 114 B) / 1000, rounded.
                    let l = ((p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114 + 500) / 1000) as f32;
                    (l / 255.0 - self.mean[0]) / self.std[0]
                })
                .collect()
        } else {
            rgb.chunks_exact(3).flat_map(|px| (0..3).map(move |c| (px[c] as f32 / 255.0 - self.mean[c]) / self.std[c])).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_even() {
        assert_eq!(round_half_even(58.5), 58);
        assert_eq!(round_half_even(59.5), 60);
        assert_eq!(round_half_even(16.0), 16);
        assert_eq!(round_half_even(2.4), 2);
    }

    #[test]
    fn identity_resize_keeps_pixels() {
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, 7]));
        assert_eq!(resize_bicubic(&img, 5, 3), img);
    }

    #[test]
    fn coefficients_sum_to_one() {
        for (i, o) in [(451, 256), (256, 224), (7, 13), (300, 1)] {
            for (_, k) in coeffs(i, o) {
                let s: i64 = k.iter().map(|&v| v as i64).sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= k.len() as i64, "{i}->{o}: {s}");
            }
        }
    }
}
