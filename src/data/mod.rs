//! Datasets for training and evaluation.

pub mod folder;
pub mod idx;
pub mod loader;

use anyhow::{bail, Result};
use std::path::Path;

/// Images as 8-bit pixels (grayscale or RGB) with class labels.
pub struct Dataset {
    pub images: Vec<u8>,
    pub labels: Vec<u32>,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub classes: Vec<String>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The same images in grayscale (Pillow's L: (299 R + 587 G + 114 B) / 1000,
    /// rounded), for 1-channel models; already-gray datasets are returned as they are.
    pub fn to_gray(&self) -> Dataset {
        let images =
            if self.channels == 1 { self.images.clone() } else { self.images.chunks_exact(3).map(|p| ((p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114 + 500) / 1000) as u8).collect() };
        Dataset { images, labels: self.labels.clone(), height: self.height, width: self.width, channels: 1, classes: self.classes.clone() }
    }

    /// Pixels of image i.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.height * self.width * self.channels;
        &self.images[i * n..(i + 1) * n]
    }
}

/// Where Debian's `dataset-fashion-mnist` installs the IDX files.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

pub const FASHION_MNIST_CLASSES: [&str; 10] = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

fn find(dir: &Path, stem: &str) -> Result<std::path::PathBuf> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{}: no {stem}[.gz] (expected the Fashion-MNIST IDX files; on Debian: apt-get install dataset-fashion-mnist)", dir.display())
}

/// Loads the `train` or `t10k` split of Fashion-MNIST (or MNIST) from IDX files.
pub fn fashion_mnist(dir: &Path, split: &str) -> Result<Dataset> {
    let images_path = find(dir, &format!("{split}-images-idx3-ubyte"))?;
    let labels_path = find(dir, &format!("{split}-labels-idx1-ubyte"))?;
    let images = idx::read_idx(&images_path)?;
    let labels = idx::read_idx(&labels_path)?;
    if images.dims.len() != 3 {
        bail!("{}: expected 3 dimensions (count, height, width), found {:?}", images_path.display(), images.dims);
    }
    if labels.dims.len() != 1 || labels.dims[0] != images.dims[0] {
        bail!("{}: {:?} labels for {} images", labels_path.display(), labels.dims, images.dims[0]);
    }
    if let Some(bad) = labels.data.iter().find(|&&l| l >= 10) {
        bail!("{}: label {bad} out of range 0..9", labels_path.display());
    }
    Ok(Dataset {
        images: images.data,
        labels: labels.data.iter().map(|&l| l as u32).collect(),
        height: images.dims[1],
        width: images.dims[2],
        channels: 1,
        classes: FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect(),
    })
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "Dataset({} images of {}x{}x{}, {} classes)", self.len(), self.height, self.width, self.channels, self.classes.len())
    }
}
