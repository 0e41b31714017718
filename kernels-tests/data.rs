//! Dataset readers: IDX (plain and gzipped), bad files, and the real
//! Fashion-MNIST from Debian's dataset-fashion-mnist when installed.

mod scratch;
use cvt_gpu::data::{fashion_mnist, idx::read_idx, FASHION_MNIST_DIR};
use scratch::Scratch;
use std::io::Write;
use std::path::Path;

fn tmp(tag: &str) -> Scratch {
    Scratch::new(&format!("data-{tag}"))
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

use cvt_gpu::data::loader::{epoch, epoch_from, epoch_order, LoaderConfig, Shard};
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
    let cfg = LoaderConfig { batch: 4, seed: 9, label_smoothing: 0.3, mean: [0.5; 3], std: [0.25; 3], augment: Default::default(), drop_last: false, shuffle: true, shard: Shard::ALL };
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

/// Beta(a, a) for mixup and cutmix: finite, in [0, 1], mean 1/2 and variance
/// 1/(4(2a+1)), down to a = 0.001 (an f32 Gamma ratio gave 0/0 = NaN there).
/// Tolerances are 5 standard errors of 20k samples: for the mean sqrt(var/n)
/// (<= 0.0036); for the second moment about the true mean 1/2, whose variance is
/// (mu4 - var^2)/n with mu4 = 3/(16(2a+1)(2a+3)) for the symmetric Beta.
#[test]
fn beta_sampler_is_exact_for_small_alpha() {
    let n = 20_000;
    for a in [0.001f32, 0.01, 0.1, 0.5, 1.0, 2.0, 5.0] {
        let mut rng = cvt_gpu::util::Rng::new(42);
        let xs: Vec<f64> = (0..n).map(|_| cvt_gpu::data::loader::beta(a, &mut rng)).collect();
        assert!(xs.iter().all(|x| (0.0..=1.0).contains(x)), "a = {a}: sample outside [0, 1] or NaN");
        let a = a as f64;
        let var = 1.0 / (4.0 * (2.0 * a + 1.0));
        let mu4 = 3.0 / (16.0 * (2.0 * a + 1.0) * (2.0 * a + 3.0));
        let mean = xs.iter().sum::<f64>() / n as f64;
        let m2 = xs.iter().map(|x| (x - 0.5).powi(2)).sum::<f64>() / n as f64;
        let (se_mean, se_m2) = ((var / n as f64).sqrt(), ((mu4 - var * var) / n as f64).sqrt());
        assert!((mean - 0.5).abs() < 5.0 * se_mean, "a = {a}: mean {mean}");
        assert!((m2 - var).abs() < 5.0 * se_m2 + 1e-12, "a = {a}: variance {m2}, want {var} +- {}", 5.0 * se_m2);
        // Small a: nearly all mass at the ends (P(min(x, 1 - x) < 1e-3) ~ 1e-3^a).
        let ends = xs.iter().filter(|&&x| x.min(1.0 - x) < 1e-3).count() as f64 / n as f64;
        if a <= 0.01 {
            assert!(ends > 0.9, "a = {a}: {ends} of samples near 0 or 1");
        }
    }
    // Mixup at a = 0.01 through the loader: finite images and targets.
    let ds = toy();
    let augment = cvt_gpu::data::loader::Augment { mixup: 0.01, ..Default::default() };
    let cfg = LoaderConfig { batch: 4, seed: 1, label_smoothing: 0.0, mean: [0.5; 3], std: [0.25; 3], augment, drop_last: false, shuffle: true, shard: Shard::ALL };
    for b in epoch(ds, cfg, 0) {
        assert!(b.images.iter().chain(&b.targets).all(|v| v.is_finite()));
    }
}

use cvt_gpu::data::folder::{image_folder, tiny_imagenet};
use std::os::unix::ffi::OsStrExt;

fn png_at(dir: &Path, name: &str) {
    std::fs::create_dir_all(dir).unwrap();
    image::RgbImage::from_pixel(4, 4, image::Rgb([9, 99, 199])).save(dir.join(name)).unwrap();
}

/// A class directory whose name is not UTF-8 keeps its images; two whose lossy
/// names collide are refused; an empty training class is an error naming it, an
/// empty validation class a warning.
#[test]
fn image_folder_class_names() {
    let root = tmp("folder");
    let latin1 = std::ffi::OsStr::from_bytes(b"caf\xe9");
    for split in ["train", "val"] {
        png_at(&root.join(split).join("apple"), "0.png");
        png_at(&root.join(split).join(latin1), "0.png");
        png_at(&root.join(split).join(latin1), "1.jpg");
    }
    let train = image_folder(&root, "train", None).unwrap();
    assert_eq!(train.classes, ["apple", "caf\u{FFFD}"]);
    assert_eq!(train.files.iter().map(|f| f.1).collect::<Vec<_>>(), [0, 1, 1]);
    assert!(train.files.iter().all(|f| f.0.is_file()));
    let val = image_folder(&root, "val", Some(&train.classes)).unwrap();
    assert_eq!(val.files.len(), 3);
    // A validation class with no images: still a list (with a warning).
    std::fs::remove_file(root.join("val").join(latin1).join("0.png")).unwrap();
    std::fs::remove_file(root.join("val").join(latin1).join("1.jpg")).unwrap();
    assert_eq!(image_folder(&root, "val", Some(&train.classes)).unwrap().files.len(), 1);
    // An empty training class.
    std::fs::create_dir_all(root.join("train").join("zebra")).unwrap();
    std::fs::write(root.join("train").join("zebra").join("notes.txt"), "no images").unwrap();
    let e = format!("{:#}", image_folder(&root, "train", None).unwrap_err());
    assert!(e.contains("zebra") && e.contains("no image files") && !e.contains('\n'), "{e}");
    std::fs::remove_dir_all(root.join("train").join("zebra")).unwrap();
    // Two names that read the same once made UTF-8.
    png_at(&root.join("train").join(std::ffi::OsStr::from_bytes(b"caf\xff")), "0.png");
    let e = format!("{:#}", image_folder(&root, "train", None).unwrap_err());
    assert!(e.contains("both read as class 'caf\u{FFFD}'"), "{e}");
}

/// Tiny-ImageNet: a class with no training images is an error; the text files
/// are read bounded (a FIFO for wnids.txt is refused, not waited on).
#[test]
fn tiny_imagenet_empty_class_and_text_files() {
    let root = tmp("tiny");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("wnids.txt"), "n1\nn2\n").unwrap();
    std::fs::write(root.join("words.txt"), "n1\tone, uno\nn2\ttwo\n").unwrap();
    png_at(&root.join("train/n1/images"), "a.JPEG");
    std::fs::create_dir_all(root.join("train/n2/images")).unwrap();
    let e = format!("{:#}", tiny_imagenet(&root, "train").unwrap_err());
    assert!(e.contains("n2") && e.contains("no image files"), "{e}");
    png_at(&root.join("train/n2/images"), "b.JPEG");
    let t = tiny_imagenet(&root, "train").unwrap();
    assert_eq!((t.files.len(), t.classes.clone()), (2, vec!["one".to_string(), "two".to_string()]));
    // Validation with no image of n2: a warning, not an error.
    png_at(&root.join("val/images"), "v.JPEG");
    std::fs::write(root.join("val/val_annotations.txt"), "v.JPEG\tn1\t0\t0\t1\t1\n").unwrap();
    assert_eq!(tiny_imagenet(&root, "val").unwrap().files.len(), 1);
    std::fs::remove_file(root.join("wnids.txt")).unwrap();
    let fifo = std::ffi::CString::new(root.join("wnids.txt").as_os_str().as_bytes()).unwrap();
    if unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) } == 0 {
        let e = format!("{:#}", tiny_imagenet(&root, "val").unwrap_err());
        assert!(e.contains("not a regular file"), "{e}");
    }
}

/// Data parallelism's split of an epoch: step s of K ranks accumulating n
/// micro-batches each sees exactly the images, augmentations and targets one
/// process accumulating K·n micro-batches sees at step s (rank r holding the r-th
/// run of n), and a start mid-epoch (resume) gives the rest of each rank's share.
#[test]
fn shards_of_a_step_are_the_single_process_step() {
    use cvt_gpu::data::loader::Augment;
    let ds = toy();
    let augment = Augment { flip: true, min_scale: 0.5, mixup: 0.4, cutmix: 0.0 };
    let cfg = LoaderConfig { batch: 2, seed: 5, label_smoothing: 0.1, mean: [0.5; 3], std: [0.25; 3], augment, drop_last: true, shuffle: true, shard: Shard::ALL };
    let (ranks, accum) = (2, 2);
    let single: Vec<_> = epoch(ds.clone(), LoaderConfig { shard: Shard { rank: 0, ranks: 1, accum: ranks * accum }, ..cfg }, 3).into_iter().collect();
    let per_rank: Vec<Vec<_>> = (0..ranks).map(|rank| epoch(ds.clone(), LoaderConfig { shard: Shard { rank, ranks, accum }, ..cfg }, 3).into_iter().collect()).collect();
    assert!(single.len() >= 4, "the toy set gives {} micro-batches", single.len());
    for (i, b) in single.iter().enumerate() {
        let step_micro = i % (ranks * accum);
        let (rank, j) = (step_micro / accum, step_micro % accum);
        let mine = &per_rank[rank][(i / (ranks * accum)) * accum + j];
        assert!(b.images == mine.images && b.targets == mine.targets && b.labels == mine.labels, "micro-batch {i}: rank {rank}'s copy differs");
    }
    assert_eq!(per_rank.iter().map(|r| r.len()).sum::<usize>(), single.len());
    // Resumed at step 1: each rank's share from there.
    let s0 = Shard { rank: 0, ranks, accum };
    let rest: Vec<_> = epoch_from(ds.clone(), LoaderConfig { shard: s0, ..cfg }, 3, s0.start_of(1)).into_iter().collect();
    assert_eq!(rest.len() + accum, per_rank[0].len(), "resume mid-epoch");
    assert!(rest[0].images == per_rank[0][accum].images, "resume mid-epoch");
}
