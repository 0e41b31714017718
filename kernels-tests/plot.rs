//! curves.png and curves.svg from a metrics.jsonl: both written, the PNG of the
//! expected size with coloured series on it, the SVG with the title and axis
//! labels; partial and empty metrics files.

mod scratch;
use cvt_gpu::plot::{curves, HEIGHT, WIDTH};
use scratch::Scratch;
use std::path::PathBuf;

fn tmp(tag: &str) -> Scratch {
    Scratch::new(&format!("plot-{tag}"))
}

/// Two epochs of 50 steps: train records every 10 steps, an eval at each epoch end.
fn metrics() -> String {
    let mut lines = vec![];
    for step in (10..=100).step_by(10) {
        lines.push(format!(r#"{{"kind":"train","step":{step},"epoch":{},"loss":{},"lr":0.001}}"#, 1 + (step - 1) / 50, 2.3 / (1.0 + step as f64 / 30.0)));
        if step % 50 == 0 {
            let e = step / 50;
            lines.push(format!(
                r#"{{"kind":"eval","epoch":{e},"step":{step},"train_loss":1.0,"train_acc":{},"val_top1":{},"val_top5":{},"val_loss":{}}}"#,
                0.5 + 0.1 * e as f64,
                0.6 + 0.1 * e as f64,
                0.9 + 0.02 * e as f64,
                1.2 / e as f64
            ));
        }
    }
    lines.push("not json".into());
    lines.push(r#"{"kind":"train","step":110,"lo"#.into()); // a run killed mid-write
    lines.join("\n")
}

/// Pixels of the PNG that are neither white nor grey (the series' colours).
fn coloured(img: &image::RgbImage) -> usize {
    img.pixels().filter(|p| p.0.iter().max().unwrap() - p.0.iter().min().unwrap() > 60).count()
}

#[test]
fn curves_png_and_svg() {
    let dir = tmp("full");
    let m = dir.join("metrics.jsonl");
    std::fs::write(&m, metrics()).unwrap();
    curves(&m, &dir, "cvt-13 on image-folder").unwrap();
    let png = image::open(dir.join("curves.png")).unwrap().to_rgb8();
    assert_eq!(png.dimensions(), (WIDTH, HEIGHT));
    let dark = png.pixels().filter(|p| p.0.iter().all(|&c| c < 100)).count();
    assert!(dark > 2000, "{dark} dark pixels: no text or axes drawn");
    assert!(coloured(&png) > 1000, "{} coloured pixels: no series drawn", coloured(&png));
    let svg = std::fs::read_to_string(dir.join("curves.svg")).unwrap();
    for text in ["cvt-13 on image-folder", "training step", "cross-entropy loss", "accuracy (%)", "validation top-1", "validation top-5", "train (per logged step)"] {
        assert!(svg.contains(text), "curves.svg lacks '{text}'");
    }
    // No temporary files left beside them.
    let names: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

#[test]
fn curves_of_one_point_and_of_nothing() {
    let dir = tmp("partial");
    let m = dir.join("metrics.jsonl");
    // One training record, no evaluation yet: still a chart.
    std::fs::write(&m, r#"{"kind":"train","step":0,"epoch":1,"loss":2.3}"#).unwrap();
    curves(&m, &dir, "one point").unwrap();
    let png = image::open(dir.join("curves.png")).unwrap().to_rgb8();
    assert!(coloured(&png) > 10, "the single point is not drawn");
    // Only an evaluation record.
    std::fs::write(&m, r#"{"kind":"eval","step":5,"val_top1":0.5,"val_top5":0.8,"val_loss":1.0}"#).unwrap();
    curves(&m, &dir, "eval only").unwrap();
    // Corrupt values: a huge step and loss are left out, an accuracy over 100% is
    // drawn at the edge; no hang or panic in the axis ranges.
    std::fs::write(&m, "{\"kind\":\"train\",\"step\":1e300,\"loss\":1}\n{\"kind\":\"train\",\"step\":3,\"loss\":1e300}\n{\"kind\":\"train\",\"step\":4,\"loss\":-1}\n{\"kind\":\"eval\",\"step\":4,\"val_top1\":5,\"val_top5\":-2,\"val_loss\":0}").unwrap();
    curves(&m, &dir, "corrupt").unwrap();
    // Nothing usable: a one-line error naming the file; the old chart stays.
    std::fs::write(&m, "garbage\n{\"kind\":\"train\"}\n").unwrap();
    let e = format!("{:#}", curves(&m, &dir, "x").unwrap_err());
    assert!(e.contains("metrics.jsonl") && e.contains("no training or evaluation records") && !e.contains('\n'), "{e}");
    assert!(dir.join("curves.png").exists());
    // A missing file.
    let e = format!("{:#}", curves(&dir.join("absent.jsonl"), &dir, "x").unwrap_err());
    assert!(e.contains("absent.jsonl"), "{e}");
}

/// Renders a sample chart where CVT_PLOT_SAMPLE names a directory (for looking at it).
#[test]
fn sample_chart() {
    let Some(dir) = std::env::var_os("CVT_PLOT_SAMPLE") else {
        return;
    };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut lines = vec![];
    let mut rng = cvt_gpu::util::Rng::new(3);
    for step in (0..=1200).step_by(10) {
        let loss = 0.35 + 1.95 * (-(step as f64) / 300.0).exp() + 0.08 * rng.normal() as f64;
        lines.push(format!(r#"{{"kind":"train","step":{step},"loss":{loss}}}"#));
        if step > 0 && step % 200 == 0 {
            let e = step as f64 / 200.0;
            let top1 = 0.9 - 0.35 * (-e / 1.5).exp();
            lines.push(format!(r#"{{"kind":"eval","step":{step},"train_acc":{},"val_top1":{top1},"val_top5":{},"val_loss":{}}}"#, top1 - 0.04, (top1 + 0.09).min(0.998), 0.3 + 0.6 * (-e / 1.5).exp()));
        }
    }
    std::fs::write(dir.join("metrics.jsonl"), lines.join("\n")).unwrap();
    curves(&dir.join("metrics.jsonl"), &dir, "cvt-13 on tiny-imagenet").unwrap();
    // A first epoch of one logged step.
    let one = dir.join("one");
    std::fs::create_dir_all(&one).unwrap();
    std::fs::write(one.join("metrics.jsonl"), "{\"kind\":\"train\",\"step\":10,\"loss\":2.2}\n{\"kind\":\"eval\",\"step\":10,\"val_top1\":0.31,\"val_top5\":0.72,\"val_loss\":1.9}").unwrap();
    curves(&one.join("metrics.jsonl"), &one, "cvt-fmnist on fashion-mnist").unwrap();
}
