//! Batches for training: a seeded shuffle per epoch, conversion to normalised
//! NHWC f32 and soft targets (label smoothing), prepared on a CPU thread one batch
//! ahead of the GPU. The same seed gives the same batches.

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

#[derive(Clone, Copy, Debug)]
pub struct LoaderConfig {
    pub batch: usize,
    pub seed: u64,
    pub label_smoothing: f32,
    pub mean: f32,
    pub std: f32,
    /// Drop the last partial batch (training) or keep it (evaluation).
    pub drop_last: bool,
    pub shuffle: bool,
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

/// Builds the batch of the given dataset indices.
pub fn make_batch(ds: &Dataset, idx: &[usize], cfg: &LoaderConfig) -> Batch {
    let classes = ds.classes.len();
    let px = ds.height * ds.width * ds.channels;
    let mut images = Vec::with_capacity(idx.len() * px);
    let mut targets = vec![cfg.label_smoothing / classes as f32; idx.len() * classes];
    let mut labels = Vec::with_capacity(idx.len());
    for (b, &i) in idx.iter().enumerate() {
        images.extend(ds.image(i).iter().map(|&v| (v as f32 / 255.0 - cfg.mean) / cfg.std));
        let l = ds.labels[i];
        targets[b * classes + l as usize] += 1.0 - cfg.label_smoothing;
        labels.push(l);
    }
    Batch { images, targets, labels }
}

/// The batches of one epoch, produced on a worker thread one ahead of the consumer.
pub fn epoch(ds: Arc<Dataset>, cfg: LoaderConfig, epoch: u64) -> Receiver<Batch> {
    let (tx, rx) = sync_channel(2);
    std::thread::spawn(move || {
        let order = epoch_order(ds.len(), cfg.seed, epoch, cfg.shuffle);
        for chunk in order.chunks(cfg.batch) {
            if cfg.drop_last && chunk.len() < cfg.batch {
                break;
            }
            if tx.send(make_batch(&ds, chunk, &cfg)).is_err() {
                break;
            }
        }
    });
    rx
}
