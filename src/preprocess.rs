//! Image decoding and the official evaluation preprocessing (spec §6).
//!
//! The resize reproduces Pillow's bicubic resampling (`Image.resize(..., BICUBIC)`,
//! which torchvision and transformers both call): a separable convolution with
//! the a = -0.5 cubic kernel stretched by the scale factor when downsampling
//! (antialiasing), fixed-point coefficients with 22 fractional bits, and 8-bit
//! rounding and clamping after each pass. Matching it bit for bit is what makes
//! the engine's input equal the reference's.

use crate::util::{limits, read_limited};
use anyhow::{bail, Context, Result};
use image::RgbImage;
use std::collections::VecDeque;
use std::ops::Range;
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

/// Decoding limits: a side longer than `MAX_SIDE`, or a decoder buffer or RGB
/// result larger than `MAX_DECODED_BYTES`, is refused from the header, before
/// the pixels are allocated (a decompression bomb is KBs on disk, GBs decoded).
pub const MAX_SIDE: u32 = 1 << 16;
pub const MAX_DECODED_BYTES: u64 = 512 << 20;
/// Above this decoded size (RGBA8), a file must be at least 1/`MAX_RATIO` of it:
/// real photos compress 2-20x, flat synthetic images a few hundred times.
const BOMB_FREE_BYTES: u64 = 64 << 20;
const MAX_RATIO: u64 = 1024;

/// Decodes an image file to 8-bit RGB (grayscale, alpha and 16-bit converted).
pub fn decode(path: &Path) -> Result<RgbImage> {
    let bytes = read_limited(path, limits::IMAGE, "image file")?;
    decode_image_bytes(&bytes, &path.display().to_string())
}

/// Decodes an image held in memory (`shown` names it in errors); the format is
/// recognised by content, whatever the file was called.
pub fn decode_image_bytes(bytes: &[u8], shown: &str) -> Result<RgbImage> {
    if bytes.is_empty() {
        bail!("{shown}: empty file, not an image");
    }
    let too_large = || format!("{shown}: image too large to decode (at most {MAX_SIDE} pixels a side and {} MiB decoded)", MAX_DECODED_BYTES >> 20);
    let fail = |e: image::ImageError| match e {
        image::ImageError::Limits(_) => anyhow::anyhow!("{} ({e})", too_large()),
        _ => anyhow::anyhow!("{shown}: cannot decode image ({e})"),
    };
    let reader = || -> Result<image::ImageReader<std::io::Cursor<&[u8]>>> {
        let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().with_context(|| format!("{shown}: cannot read"))?;
        if reader.format().is_none() {
            bail!("{shown}: not a PNG, JPEG, WebP or BMP image");
        }
        let mut lim = image::Limits::default();
        lim.max_image_width = Some(MAX_SIDE);
        lim.max_image_height = Some(MAX_SIDE);
        lim.max_alloc = Some(MAX_DECODED_BYTES);
        reader.limits(lim);
        Ok(reader)
    };
    // The decoder checks its own buffer; the RGB copy made below is checked here.
    let (w, h) = reader()?.into_dimensions().map_err(fail)?;
    if w == 0 || h == 0 {
        bail!("{shown}: image has no pixels ({w}x{h})");
    }
    if w as u64 * h as u64 * 3 > MAX_DECODED_BYTES {
        bail!("{} ({w}x{h})", too_large());
    }
    // A decompression bomb within those limits: a file of a few hundred bytes
    // (a repetitive lossless WebP) that decodes to hundreds of MiB. Large
    // images must come from files of a plausible size.
    let decoded = w as u64 * h as u64 * 4;
    if decoded > BOMB_FREE_BYTES && decoded > bytes.len() as u64 * MAX_RATIO {
        bail!("{shown}: {w}x{h} pixels from a {}-byte file: more than {MAX_RATIO}x compression, refused as a decompression bomb", bytes.len());
    }
    Ok(reader()?.decode().map_err(fail)?.to_rgb8())
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

/// For the output pixels `range` of a resize from `in_size` to `out_size`: first
/// input index and fixed-point weights (Pillow's `precompute_coeffs` +
/// `normalize_coeffs_8bpc`). Only the requested range is computed, so a crop
/// of a huge virtual output costs what the crop costs.
fn coeffs(in_size: usize, out_size: usize, range: Range<usize>) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    range
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

/// One output value of a pass: the weights `k` over the samples `at(0..k.len())`,
/// rounded and clamped to 8 bits as Pillow does.
fn convolve(k: &[i32], at: impl Fn(usize) -> u8) -> u8 {
    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
    for (i, &w) in k.iter().enumerate() {
        ss += at(i) as i64 * w as i64;
    }
    clip8(ss)
}

/// Pillow-exact bicubic resize of an RGB image.
pub fn resize_bicubic(img: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    resize_window(img, (out_w, out_h), (0..out_w, 0..out_h))
}

/// The window `xs` x `ys` of the Pillow-exact bicubic resize of `img` to
/// out_w x out_h, identical to resizing everything and cropping. Pillow runs the
/// horizontal pass (rounded to 8 bits) then the vertical one, each skipped when
/// that size is unchanged; every output pixel depends only on its own weights,
/// so only the window's columns are computed, on only the input rows the
/// window's rows read, streamed through a queue of the rows in reach. Memory is
/// the window plus one vertical kernel's rows, whatever the image's aspect.
fn resize_window(img: &RgbImage, (out_w, out_h): (usize, usize), (xs, ys): (Range<usize>, Range<usize>)) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let src = img.as_raw();
    let (x0, w, h) = (xs.start, xs.len(), ys.len());
    let cx = (out_w != in_w).then(|| coeffs(in_w, out_w, xs.clone()));
    let cy = (out_h != in_h).then(|| coeffs(in_h, out_h, ys.clone()));
    // Input row `y` after the horizontal pass, window columns only.
    let mid_row = |y: usize| -> Vec<u8> {
        let row = &src[y * in_w * 3..(y + 1) * in_w * 3];
        match &cx {
            Some(cx) => cx.iter().flat_map(|(xmin, k)| (0..3).map(move |ch| convolve(k, |i| row[(xmin + i) * 3 + ch]))).collect(),
            None => row[x0 * 3..(x0 + w) * 3].to_vec(),
        }
    };
    let mut out = Vec::with_capacity(w * h * 3);
    match &cy {
        None => ys.for_each(|y| out.extend(mid_row(y))),
        Some(cy) => {
            // Each output row reads rows ymin..ymin+k.len(); both ends only grow.
            let (mut rows, mut first) = (VecDeque::new(), 0);
            for (ymin, k) in cy {
                rows.drain(..ymin.saturating_sub(first).min(rows.len()));
                first = *ymin;
                while first + rows.len() < ymin + k.len() {
                    rows.push_back(mid_row(first + rows.len()));
                }
                out.extend((0..w * 3).map(|x| convolve(k, |i| rows[i][x])));
            }
        }
    }
    RgbImage::from_raw(w as u32, h as u32, out).expect("resize buffer size")
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
/// Only the crop window of the resized image is computed (`resize_window`).
pub fn eval_transform(img: &RgbImage, res: usize) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if res >= 384 {
        return resize_bicubic(img, res, res);
    }
    let short = (res as f64 / 0.875) as usize;
    // torchvision Resize(int): shorter side to `short`, longer side int(short * long / short_in).
    // The f64 product cannot overflow; the cast saturates, and `short` bounds the crop.
    let (nw, nh) = if w <= h { (short, (short as f64 * h as f64 / w as f64) as usize) } else { ((short as f64 * w as f64 / h as f64) as usize, short) };
    let top = (round_half_even((nh as f64 - res as f64) / 2.0).max(0) as usize).min(nh);
    let left = (round_half_even((nw as f64 - res as f64) / 2.0).max(0) as usize).min(nw);
    // As crop_imm: a window past the edge is cut to the image.
    resize_window(img, (nw, nh), (left..(left + res).min(nw), top..(top + res).min(nh)))
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
            for (_, k) in coeffs(i, o, 0..o) {
                let s: i64 = k.iter().map(|&v| v as i64).sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= k.len() as i64, "{i}->{o}: {s}");
            }
        }
    }
}
