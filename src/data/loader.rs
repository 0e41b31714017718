//! Batches for training: a seeded shuffle per epoch, augmentation (random-resized
//! crop, horizontal flip, mixup or cutmix), conversion to normalised NHWC f32 and
//! soft targets (label smoothing), prepared on a CPU thread ahead of the GPU.
//! Every random choice comes from (seed, epoch, batch index), so the same seed
//! gives the same batches, and a resumed run gets the batches it would have had.

use super::Dataset;
use crate::util::Rng;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

/// One training batch.
pub struct Batch {
    /// [batch, h, w, channels], normalised by `mean` / `std`.
    pub images: Vec<f32>,
    /// [batch, classes] target distribution.
    pub targets: Vec<f32>,
    pub labels: Vec<u32>,
}

/// Training-time augmentation (all off for evaluation).
#[derive(Clone, Copy, Debug, Default)]
pub struct Augment {
    pub flip: bool,
    /// Random-resized crop: area fraction in [min_scale, 1], aspect in [3/4, 4/3],
    /// resized back to the image size (bilinear). 0 disables it.
    pub min_scale: f32,
    /// Mixup / cutmix Beta(alpha, alpha) parameters (0 disables; with both set,
    /// each batch uses one of them at random, as timm does).
    pub mixup: f32,
    pub cutmix: f32,
}

#[derive(Clone, Copy, Debug)]
pub struct LoaderConfig {
    pub batch: usize,
    pub seed: u64,
    pub label_smoothing: f32,
    /// Per-channel normalisation (only the first `channels` entries are used).
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub augment: Augment,
    /// Drop the last partial batch (training) or keep it (evaluation).
    pub drop_last: bool,
    pub shuffle: bool,
    /// Which micro-batches this process takes (data parallelism; `Shard::ALL`
    /// in one process).
    pub shard: Shard,
}

/// A process's share of an epoch's micro-batches (`batch` images each). An
/// optimizer step takes `ranks` × `accum` consecutive micro-batches, in the
/// epoch's one order whatever the split; rank r takes the r-th run of `accum`
/// of them. So step s sees the same images, augmented the same way (every
/// random choice is keyed by the micro-batch's index in the epoch), whether one
/// process accumulates `ranks` × `accum` micro-batches or `ranks` processes
/// `accum` each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub ranks: usize,
    pub accum: usize,
}

impl Shard {
    /// Every micro-batch: one process, no accumulation.
    pub const ALL: Shard = Shard { rank: 0, ranks: 1, accum: 1 };

    /// Whether micro-batch `bi` of the epoch is this process's.
    pub fn owns(&self, bi: usize) -> bool {
        (bi / self.accum.max(1)) % self.ranks.max(1) == self.rank
    }

    /// Micro-batches of the epoch before optimizer step `step` (all ranks').
    pub fn start_of(&self, step: usize) -> usize {
        step * self.ranks.max(1) * self.accum.max(1)
    }
}

/// The order of epoch `epoch`: a Fisher-Yates shuffle seeded by (seed, epoch).
pub fn epoch_order(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = Rng::new(seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407));
        for i in (1..n).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
    }
    order
}

/// Random-resized crop and flip of one HWC u8 image, to f32 in [0, 1].
fn augment_image(src: &[u8], h: usize, w: usize, c: usize, a: &Augment, rng: &mut Rng) -> Vec<f32> {
    let (mut y0, mut x0, mut ch, mut cw) = (0.0f32, 0.0f32, h as f32, w as f32);
    if a.min_scale > 0.0 && a.min_scale < 1.0 {
        // torchvision's RandomResizedCrop: up to 10 tries, then the whole image.
        for _ in 0..10 {
            let area = (a.min_scale + (1.0 - a.min_scale) * rng.uniform()) * (h * w) as f32;
            let log_r = (0.75f32).ln() + ((4.0f32 / 3.0).ln() - (0.75f32).ln()) * rng.uniform();
            let r = log_r.exp();
            let tw = (area * r).sqrt();
            let th = (area / r).sqrt();
            if tw <= w as f32 && th <= h as f32 {
                (cw, ch) = (tw, th);
                y0 = rng.uniform() * (h as f32 - th);
                x0 = rng.uniform() * (w as f32 - tw);
                break;
            }
        }
    }
    let flip = a.flip && rng.uniform() < 0.5;
    let mut out = vec![0f32; h * w * c];
    let identity = ch == h as f32 && cw == w as f32;
    for y in 0..h {
        for x in 0..w {
            let xd = if flip { w - 1 - x } else { x };
            for k in 0..c {
                out[(y * w + xd) * c + k] = if identity {
                    src[(y * w + x) * c + k] as f32 / 255.0
                } else {
                    // Bilinear sample at the crop's pixel centre.
                    let sy = (y0 + (y as f32 + 0.5) * ch / h as f32 - 0.5).clamp(0.0, (h - 1) as f32);
                    let sx = (x0 + (x as f32 + 0.5) * cw / w as f32 - 0.5).clamp(0.0, (w - 1) as f32);
                    let (iy, ix) = (sy.floor() as usize, sx.floor() as usize);
                    let (fy, fx) = (sy - iy as f32, sx - ix as f32);
                    let (iy1, ix1) = ((iy + 1).min(h - 1), (ix + 1).min(w - 1));
                    let p = |yy: usize, xx: usize| src[(yy * w + xx) * c + k] as f32;
                    ((p(iy, ix) * (1.0 - fx) + p(iy, ix1) * fx) * (1.0 - fy) + (p(iy1, ix) * (1.0 - fx) + p(iy1, ix1) * fx) * fy) / 255.0
                };
            }
        }
    }
    out
}

/// Uniform in (0, 1] with 53 random bits: its logarithm is finite.
fn uniform_open(rng: &mut Rng) -> f64 {
    ((rng.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
}

/// ln of a Gamma(a) sample (Marsaglia-Tsang; below a = 1 the boost
/// Gamma(a) = Gamma(a + 1) U^(1/a)). In log space because for small a the
/// sample itself underflows: at a = 0.01, U^100 is below f64's range for U < 0.0006.
fn ln_gamma_sample(a: f64, rng: &mut Rng) -> f64 {
    if a < 1.0 {
        return ln_gamma_sample(a + 1.0, rng) + uniform_open(rng).ln() / a;
    }
    let d = a - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        // Standard normal (Box-Muller) in f64.
        let x = (-2.0 * uniform_open(rng).ln()).sqrt() * (2.0 * std::f64::consts::PI * uniform_open(rng)).cos();
        let v = (1.0 + c * x).powi(3);
        if v > 0.0 && uniform_open(rng).ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return (d * v).ln();
        }
    }
}

/// A Beta(a, a) sample, X / (X + Y) for X, Y ~ Gamma(a), computed as
/// 1 / (1 + exp(ln Y - ln X)): exact for small a (mostly 0 or 1, never 0/0),
/// always in [0, 1]. An infinite a is the point mass at 1/2 (Marsaglia-Tsang
/// would loop on inf - inf); the caller never passes a <= 0.
pub fn beta(a: f32, rng: &mut Rng) -> f64 {
    let a = a as f64;
    if !a.is_finite() {
        return 0.5;
    }
    // a is an f32 > 0, so ln U / a >= -37 / 1.4e-45 stays finite in f64.
    let t = ln_gamma_sample(a, rng) - ln_gamma_sample(a, rng);
    1.0 / (1.0 + (-t).exp())
}

/// Builds the batch of the given dataset indices; `rng` drives the augmentation.
pub fn make_batch(ds: &Dataset, idx: &[usize], cfg: &LoaderConfig, rng: &mut Rng) -> Batch {
    let classes = ds.classes.len();
    let (h, w, c) = (ds.height, ds.width, ds.channels);
    let px = h * w * c;
    let n = idx.len();
    let mut images = Vec::with_capacity(n * px);
    let mut targets = vec![cfg.label_smoothing / classes as f32; n * classes];
    let mut labels = Vec::with_capacity(n);
    for (b, &i) in idx.iter().enumerate() {
        images.extend(augment_image(ds.image(i), h, w, c, &cfg.augment, rng));
        let l = ds.labels[i];
        targets[b * classes + l as usize] += 1.0 - cfg.label_smoothing;
        labels.push(l);
    }
    // Mixup / cutmix with the batch reversed as partner (timm's pairing).
    let a = &cfg.augment;
    let use_cutmix = a.cutmix > 0.0 && (a.mixup <= 0.0 || rng.uniform() < 0.5);
    if n > 1 && (use_cutmix || a.mixup > 0.0) {
        let mut lam = beta(if use_cutmix { a.cutmix } else { a.mixup }, rng) as f32;
        let orig = images.clone();
        let orig_t = targets.clone();
        if use_cutmix {
            let r = (1.0 - lam).sqrt();
            let (bh, bw) = ((h as f32 * r) as usize, (w as f32 * r) as usize);
            let cy = (rng.uniform() * h as f32) as usize;
            let cx = (rng.uniform() * w as f32) as usize;
            let (ya, yb) = (cy.saturating_sub(bh / 2), (cy + bh / 2).min(h));
            let (xa, xb) = (cx.saturating_sub(bw / 2), (cx + bw / 2).min(w));
            for b in 0..n {
                let o = n - 1 - b;
                for y in ya..yb {
                    let row = (y * w + xa) * c..(y * w + xb) * c;
                    images[b * px + row.start..b * px + row.end].copy_from_slice(&orig[o * px + row.start..o * px + row.end]);
                }
            }
            lam = 1.0 - ((yb - ya) * (xb - xa)) as f32 / (h * w) as f32;
        } else {
            for b in 0..n {
                let o = n - 1 - b;
                for j in 0..px {
                    images[b * px + j] = lam * orig[b * px + j] + (1.0 - lam) * orig[o * px + j];
                }
            }
        }
        for b in 0..n {
            let o = n - 1 - b;
            for k in 0..classes {
                targets[b * classes + k] = lam * orig_t[b * classes + k] + (1.0 - lam) * orig_t[o * classes + k];
            }
        }
    }
    for (i, v) in images.iter_mut().enumerate() {
        let k = i % c;
        *v = (*v - cfg.mean[k]) / cfg.std[k];
    }
    Batch { images, targets, labels }
}

/// The batches of one epoch from micro-batch `start` on (counted over all ranks),
/// this process's share (`cfg.shard`), produced on a worker thread ahead of the
/// consumer.
pub fn epoch_from(ds: Arc<Dataset>, cfg: LoaderConfig, epoch: u64, start: usize) -> Receiver<Batch> {
    let (tx, rx) = sync_channel(3);
    std::thread::spawn(move || {
        let order = epoch_order(ds.len(), cfg.seed, epoch, cfg.shuffle);
        for (bi, chunk) in order.chunks(cfg.batch).enumerate().skip(start) {
            if cfg.drop_last && chunk.len() < cfg.batch {
                break;
            }
            if !cfg.shard.owns(bi) {
                continue;
            }
            let mut rng = Rng::new(cfg.seed ^ 0x5EED ^ (epoch << 32) ^ bi as u64);
            if tx.send(make_batch(&ds, chunk, &cfg, &mut rng)).is_err() {
                break;
            }
        }
    });
    rx
}

/// All batches of one epoch.
pub fn epoch(ds: Arc<Dataset>, cfg: LoaderConfig, epoch: u64) -> Receiver<Batch> {
    epoch_from(ds, cfg, epoch, 0)
}
