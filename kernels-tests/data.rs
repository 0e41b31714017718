//! Dataset readers: IDX (plain and gzipped), bad files, and the real
//! Fashion-MNIST from Debian's dataset-fashion-mnist when installed.

use cvt_gpu::data::{fashion_mnist, idx::read_idx, FASHION_MNIST_DIR};
use std::io::Write;
use std::path::{Path, PathBuf};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cvt-gpu-data-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend(d.to_be_bytes());
    }
    v.extend(data);
    v
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(vec![], flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn idx_plain_gzip_and_errors() {
    let d = tmp("idx");
    let pixels: Vec<u8> = (0..2 * 3 * 4).map(|i| i as u8).collect();
    std::fs::write(d.join("train-images-idx3-ubyte"), idx_bytes(&[2, 3, 4], &pixels)).unwrap();
    std::fs::write(d.join("train-labels-idx1-ubyte.gz"), gz(&idx_bytes(&[2], &[7, 1]))).unwrap();
    let ds = fashion_mnist(&d, "train").unwrap();
    assert_eq!((ds.len(), ds.height, ds.width, ds.channels), (2, 3, 4, 1));
    assert_eq!(ds.labels, vec![7, 1]);
    assert_eq!(ds.image(1), &pixels[12..24]);
    // Truncated data, bad magic, label/image count mismatch, missing split.
    std::fs::write(d.join("cut"), &idx_bytes(&[2, 3, 4], &pixels)[..20]).unwrap();
    assert!(read_idx(&d.join("cut")).unwrap_err().to_string().contains("truncated"));
    std::fs::write(d.join("junk"), b"hello world").unwrap();
    assert!(read_idx(&d.join("junk")).unwrap_err().to_string().contains("not an IDX file"));
    std::fs::write(d.join("t10k-images-idx3-ubyte"), idx_bytes(&[2, 3, 4], &pixels)).unwrap();
    std::fs::write(d.join("t10k-labels-idx1-ubyte"), idx_bytes(&[3], &[1, 2, 3])).unwrap();
    assert!(fashion_mnist(&d, "t10k").unwrap_err().to_string().contains("3] labels for 2 images"));
    let e = fashion_mnist(Path::new("/no/such/dir"), "train").unwrap_err().to_string();
    assert!(e.contains("dataset-fashion-mnist"), "{e}");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn real_fashion_mnist_when_installed() {
    let dir = Path::new(FASHION_MNIST_DIR);
    if !dir.exists() {
        eprintln!("SKIPPED: {FASHION_MNIST_DIR} not installed");
        return;
    }
    let train = fashion_mnist(dir, "train").unwrap();
    let test = fashion_mnist(dir, "t10k").unwrap();
    assert_eq!((train.len(), test.len(), train.height, train.width), (60000, 10000, 28, 28));
    // Balanced classes: 6000 per class in train, 1000 in test.
    for c in 0..10 {
        assert_eq!(train.labels.iter().filter(|&&l| l == c).count(), 6000);
        assert_eq!(test.labels.iter().filter(|&&l| l == c).count(), 1000);
    }
}

use cvt_gpu::data::loader::{epoch, epoch_order, LoaderConfig};
use cvt_gpu::data::Dataset;
use std::sync::Arc;

fn toy() -> Arc<Dataset> {
    let n = 10;
    Arc::new(Dataset {
        images: (0..n * 4).map(|i| (i * 6) as u8).collect(),
        labels: (0..n as u32).map(|i| i % 3).collect(),
        height: 2,
        width: 2,
        channels: 1,
        classes: vec!["a".into(), "b".into(), "c".into()],
    })
}

#[test]
fn loader_is_seeded_complete_and_smoothed() {
    let ds = toy();
    let cfg = LoaderConfig { batch: 4, seed: 9, label_smoothing: 0.3, mean: [0.5; 3], std: [0.25; 3], augment: Default::default(), drop_last: false, shuffle: true };
    // Same seed and epoch: same order; another epoch: another order; every index once.
    assert_eq!(epoch_order(10, 9, 0, true), epoch_order(10, 9, 0, true));
    assert_ne!(epoch_order(10, 9, 0, true), epoch_order(10, 9, 1, true));
    let mut seen: Vec<usize> = epoch_order(10, 9, 3, true);
    seen.sort();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    let batches: Vec<_> = epoch(ds.clone(), cfg, 0).into_iter().collect();
    assert_eq!(batches.iter().map(|b| b.labels.len()).collect::<Vec<_>>(), vec![4, 4, 2]);
    let order = epoch_order(10, 9, 0, true);
    let first = &batches[0];
    for (b, &i) in order[..4].iter().enumerate() {
        assert_eq!(first.labels[b], ds.labels[i]);
        let px = ds.image(i)[1] as f32;
        assert!((first.images[b * 4 + 1] - (px / 255.0 - 0.5) / 0.25).abs() < 1e-6);
        let t = &first.targets[b * 3..b * 3 + 3];
        assert!((t.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((t[ds.labels[i] as usize] - (0.7 + 0.1)).abs() < 1e-6);
    }
    // drop_last keeps only full batches.
    let n = epoch(ds, LoaderConfig { drop_last: true, ..cfg }, 0).into_iter().count();
    assert_eq!(n, 2);
}
