//! `cvt-gpu train` / `eval` end to end on small synthetic datasets in the real
//! on-disk layouts: kill-and-resume reproduces an uninterrupted run exactly,
//! Tiny-ImageNet's layout trains with progress, checkpoints and evaluation,
//! fine-tuning re-initialises a head, bad input gives one-line errors, and a
//! short Fashion-MNIST run learns.

mod scratch;
use scratch::Scratch;
mod cli_common;

use cli_common::{image_folder, one_line_error, run, synth, tensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cvt-gpu"))
}

fn tmp(tag: &str) -> Scratch {
    Scratch::new(&format!("train-{tag}"))
}

/// A tiny CvT for 16x16 RGB images (grids 4x4, 2x2, 1x1 + cls).
fn tiny_config(dir: &Path, in_chans: usize) -> PathBuf {
    let p = dir.join("tiny.json");
    let j = format!(r#"{{"name":"tiny","in_chans":{in_chans},"num_classes":2,"dims":[8,16,24],"heads":[1,2,2],"depths":[1,1,1],"image_size":16}}"#);
    std::fs::write(&p, j).unwrap();
    p
}

#[test]
fn kill_and_resume_matches_uninterrupted() {
    let d = tmp("resume");
    image_folder(&d.join("data"), &["a", "b"], 12);
    let cfg = tiny_config(&d, 3);
    let common = |out: &Path| {
        let mut c = bin();
        c.args(["train", "--image-folder"]).arg(d.join("data")).arg("--model").arg(&cfg);
        c.args([
            "--res",
            "16",
            "--epochs",
            "2",
            "--batch",
            "4",
            "--seed",
            "5",
            "--lr",
            "3e-3",
            "--warmup-steps",
            "2",
            "--clip-grad",
            "1",
            "--mixup",
            "0.4",
            "--drop-path",
            "0.1,0.2,0.3",
            "--json",
            "--out",
        ])
        .arg(out);
        c
    };
    let (ok, _, err) = run(&mut common(&d.join("full")));
    assert!(ok, "uninterrupted run failed: {err}");
    // Interrupted after 4 of 12 steps (mid-epoch 1), resumed, interrupted again
    // after 5 more (mid-epoch 2), resumed to the end.
    let (ok, _, err) = run(common(&d.join("split")).args(["--max-steps", "4"]));
    assert!(ok && err.contains("stopped at step 4"), "first part: {err}");
    let resume = |extra: &[&str]| {
        let mut c = bin();
        c.args(["train", "--image-folder"]).arg(d.join("data")).args(["--json", "--out"]).arg(d.join("split")).arg("--resume").arg(d.join("split"));
        c.args(extra);
        run(&mut c)
    };
    let (ok, _, err) = resume(&["--max-steps", "5"]);
    assert!(ok && err.contains("stopped at step 9"), "second part: {err}");
    let (ok, _, err) = resume(&[]);
    assert!(ok, "final part: {err}");
    let (a, b) = (tensors(&d.join("full/model.safetensors")), tensors(&d.join("split/model.safetensors")));
    assert_eq!(a.len(), b.len());
    for (name, v) in &a {
        assert!(b[name] == *v, "{name} differs between the uninterrupted and the resumed run");
    }
    // The optimizer state too.
    let (a, b) = (tensors(&d.join("full/checkpoint.safetensors")), tensors(&d.join("split/checkpoint.safetensors")));
    for (name, v) in &a {
        assert!(b[name] == *v, "{name} differs");
    }
}

/// tiny-imagenet-200's layout with 3 classes, one undecodable training image.
fn tiny_imagenet(dir: &Path) {
    let wnids = ["n01443537", "n01629819", "n01641577"];
    std::fs::write(dir.join("wnids.txt"), wnids.join("\n") + "\n").unwrap();
    std::fs::write(dir.join("words.txt"), "n01443537\tgoldfish, Carassius auratus\nn01629819\tEuropean fire salamander\nn01641577\tbullfrog, Rana catesbeiana\nn99999999\tunused\n").unwrap();
    for (ci, w) in wnids.iter().enumerate() {
        let d = dir.join("train").join(w).join("images");
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..8 {
            synth(ci, i, 20).save(d.join(format!("{w}_{i}.JPEG"))).unwrap();
        }
        std::fs::write(dir.join("train").join(w).join(format!("{w}_boxes.txt")), "").unwrap();
    }
    std::fs::write(dir.join("train").join(wnids[0]).join("images").join("broken.JPEG"), b"not a jpeg at all").unwrap();
    let v = dir.join("val").join("images");
    std::fs::create_dir_all(&v).unwrap();
    let mut ann = String::new();
    for i in 0..6 {
        let ci = i % 3;
        synth(ci, 500 + i, 20).save(v.join(format!("val_{i}.JPEG"))).unwrap();
        ann += &format!("val_{i}.JPEG\t{}\t0\t0\t10\t10\n", wnids[ci]);
    }
    std::fs::write(dir.join("val").join("val_annotations.txt"), ann).unwrap();
}

#[test]
fn tiny_imagenet_layout_trains_evaluates_and_resumes() {
    let d = tmp("tin");
    let data = d.join("tiny-imagenet-200");
    std::fs::create_dir_all(&data).unwrap();
    tiny_imagenet(&data);
    let cfg = tiny_config(&d, 3);
    let out = d.join("run");
    let mut c = bin();
    c.args(["train", "--tiny-imagenet"]).arg(&data).arg("--model").arg(&cfg).args(["--res", "16", "--epochs", "1", "--batch", "4", "--out"]).arg(&out);
    let (ok, _, err) = run(&mut c);
    assert!(ok, "train failed: {err}");
    assert!(err.contains("warning: skipped") && err.contains("broken.JPEG"), "the broken image is reported: {err}");
    assert!(err.contains("1 images could not be decoded"), "and counted in the summary: {err}");
    assert!(err.contains("val top-1"), "evaluation per epoch: {err}");
    for f in ["checkpoint.safetensors", "model.safetensors", "metrics.jsonl", "curves.png"] {
        assert!(out.join(f).is_file(), "{f} written");
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let eval: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).filter(|v| v["kind"] == "eval").collect();
    assert_eq!(eval.len(), 1);
    assert_eq!(eval[0]["val_images"], 6);
    // Resume with more epochs continues from epoch 2.
    let mut c = bin();
    c.args(["train", "--tiny-imagenet"]).arg(&data).args(["--epochs", "2", "--out"]).arg(&out).arg("--resume").arg(&out);
    let (ok, _, err) = run(&mut c);
    assert!(ok && err.contains("epoch 2/2"), "resume: {err}");
    // eval and infer read the trained model (labels from words.txt).
    let (ok, stdout, err) = run(bin().args(["eval", "--json", "--weights"]).arg(out.join("model.safetensors")).arg("--tiny-imagenet").arg(&data));
    assert!(ok, "eval: {err}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["images"], 6);
    let top1 = v["top1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&top1));
    let (ok, stdout, err) = run(bin().args(["infer", "--topk", "3", "--weights"]).arg(out.join("model.safetensors")).arg(data.join("val/images/val_0.JPEG")));
    assert!(ok && stdout.contains("goldfish") && stdout.contains("bullfrog"), "infer: {stdout} {err}");
}

#[test]
fn fine_tune_reinitialises_the_head_and_bad_input_fails_cleanly() {
    let d = tmp("ft");
    image_folder(&d.join("three"), &["x", "y", "z"], 8);
    image_folder(&d.join("two"), &["cat", "dog"], 8);
    let cfg = tiny_config(&d, 3);
    let base = d.join("base");
    let (ok, _, err) = run(bin().args(["train", "--image-folder"]).arg(d.join("three")).arg("--model").arg(&cfg).args(["--res", "16", "--epochs", "1", "--batch", "4", "--json", "--out"]).arg(&base));
    assert!(ok, "{err}");
    let ft = d.join("ft");
    let (ok, _, err) = run(bin()
        .args(["train", "--image-folder"])
        .arg(d.join("two"))
        .arg("--weights")
        .arg(base.join("model.safetensors"))
        .args(["--res", "16", "--epochs", "1", "--batch", "4", "--lr", "1e-3", "--out"])
        .arg(&ft));
    assert!(ok, "fine-tune failed: {err}");
    assert!(err.contains("3-class head") && err.contains("re-initialised"), "head message: {err}");
    let (ok, stdout, err) = run(bin().args(["eval", "--weights"]).arg(ft.join("model.safetensors")).arg("--image-folder").arg(d.join("two")));
    assert!(ok && stdout.contains("top-1"), "eval: {stdout} {err}");

    // The shipped 1-channel Fashion-MNIST model fine-tunes on RGB folders (seen in
    // grayscale, with the checkpoint's own normalisation).
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/fmnist/model.safetensors");
    let gray = d.join("gray");
    let (ok, _, err) = run(bin().args(["train", "--image-folder"]).arg(d.join("two")).arg("--weights").arg(&shipped).args(["--res", "28", "--epochs", "1", "--batch", "4", "--out"]).arg(&gray));
    assert!(ok && err.contains("10-class head"), "grayscale fine-tune: {err}");
    let (ok, stdout, err) = run(bin().args(["eval", "--weights"]).arg(gray.join("model.safetensors")).arg("--image-folder").arg(d.join("two")).args(["--res", "28"]));
    assert!(ok && stdout.contains("top-1"), "grayscale eval: {stdout} {err}");

    // Bad input: each one line, exit 1, nothing written lost.
    let before = std::fs::read(ft.join("checkpoint.safetensors")).unwrap();
    one_line_error("missing dataset", run(bin().args(["train", "--image-folder", "/nonexistent/data", "--out"]).arg(d.join("x"))), "/nonexistent/data");
    std::fs::create_dir_all(d.join("empty")).unwrap();
    one_line_error("malformed folder", run(bin().args(["train", "--image-folder"]).arg(d.join("empty")).arg("--out").arg(d.join("x"))), "no train/ directory");
    one_line_error("malformed tiny-imagenet", run(bin().args(["train", "--tiny-imagenet"]).arg(d.join("empty")).arg("--out").arg(d.join("x"))), "wnids.txt");
    std::fs::write(d.join("file"), b"x").unwrap();
    one_line_error("unwritable --out", run(bin().args(["train", "--image-folder"]).arg(d.join("two")).arg("--out").arg(d.join("file/sub"))), "output directory");
    // A checkpoint whose architecture does not fit the data: 3 classes vs 2.
    one_line_error("another architecture", run(bin().args(["eval", "--weights"]).arg(base.join("model.safetensors")).arg("--image-folder").arg(d.join("two"))), "3 classes");
    one_line_error(
        "resume from weights-only file",
        run(bin().args(["train", "--image-folder"]).arg(d.join("two")).arg("--resume").arg(ft.join("model.safetensors")).arg("--out").arg(&ft)),
        "not a cvt-gpu training checkpoint",
    );
    std::fs::write(d.join("trunc.safetensors"), &before[..100]).unwrap();
    one_line_error(
        "truncated checkpoint",
        run(bin().args(["train", "--image-folder"]).arg(d.join("two")).arg("--weights").arg(d.join("trunc.safetensors")).arg("--out").arg(d.join("y"))),
        "trunc.safetensors",
    );
    assert_eq!(std::fs::read(ft.join("checkpoint.safetensors")).unwrap(), before, "the run's checkpoint is untouched");
}

/// Fashion-MNIST (Debian's dataset-fashion-mnist): 60 steps of 64 images take an
/// untrained model (10% expected) well above chance; the bar is set where a
/// model whose gradients or optimizer were broken cannot reach.
#[test]
fn fashion_mnist_learns() {
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    assert!(dir.is_dir(), "install Debian's dataset-fashion-mnist (scripts/setup.sh --datasets)");
    let d = tmp("fmnist");
    let (ok, stdout, err) =
        run(bin().args(["train", "--fashion-mnist", "--train-limit", "3840", "--batch", "64", "--epochs", "1", "--warmup-steps", "10", "--eval-limit", "2000", "--json", "--out"]).arg(&d));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let top1 = v["val_top1"].as_f64().unwrap();
    eprintln!("Fashion-MNIST after 60 steps: val top-1 {:.1}% on 2000 test images, {:.1} img/s", 100.0 * top1, v["img_per_s"].as_f64().unwrap());
    assert!(top1 > 0.6, "val top-1 {top1} after 60 steps");
}

/// The model shipped in weights/fmnist (trained by this engine) classifies the
/// bundled Fashion-MNIST samples correctly, as the demo shows.
#[test]
fn shipped_fmnist_model_classifies_samples() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let samples = [("ankle-boot", 9), ("trouser", 1), ("bag", 8), ("sneaker", 7), ("dress", 3)];
    let mut c = bin();
    c.args(["infer", "--json", "--weights"]).arg(root.join("weights/fmnist/model.safetensors"));
    for (name, _) in samples {
        c.arg(root.join(format!("weights/samples/fmnist-{name}.png")));
    }
    let (ok, stdout, err) = run(&mut c);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for (i, (name, want)) in samples.iter().enumerate() {
        assert_eq!(v[i]["top"][0]["index"], *want, "{name}: {}", v[i]);
    }
}

/// A tiny ConViT for 16x16 RGB images: a 4x4 grid of 4x4 patches, 2 heads of 4,
/// one GPSA block then one plain block.
fn tiny_convit(dir: &Path) -> PathBuf {
    let p = dir.join("convit.json");
    std::fs::write(&p, r#"{"name":"convit-tiny-test","num_classes":2,"image_size":16,"patch_size":4,"heads":2,"head_dim":4,"depth":2,"local_layers":1}"#).unwrap();
    p
}

/// ConViT through the same trainer: a kill-and-resume run equals an
/// uninterrupted one (weights and optimizer state), drop path on; the model it
/// writes evaluates, classifies through `infer`, and converts to timm's names;
/// a ConViT-only mistake is one line.
#[test]
fn convit_trains_resumes_exactly_and_is_served() {
    let d = tmp("convit");
    image_folder(&d.join("data"), &["a", "b"], 12);
    let cfg = tiny_convit(&d);
    let common = |out: &Path| {
        let mut c = bin();
        c.args(["train", "--image-folder"]).arg(d.join("data")).arg("--model").arg(&cfg);
        c.args(["--res", "16", "--epochs", "2", "--batch", "4", "--seed", "9", "--lr", "3e-3", "--warmup-steps", "2", "--drop-path", "0.2", "--json", "--out"]).arg(out);
        c
    };
    let (ok, _, err) = run(&mut common(&d.join("full")));
    assert!(ok, "uninterrupted run failed: {err}");
    let (ok, _, err) = run(common(&d.join("split")).args(["--max-steps", "5"]));
    assert!(ok && err.contains("stopped at step 5"), "first part: {err}");
    let mut c = bin();
    c.args(["train", "--image-folder"]).arg(d.join("data")).args(["--json", "--out"]).arg(d.join("split")).arg("--resume").arg(d.join("split"));
    let (ok, _, err) = run(&mut c);
    assert!(ok, "resumed part: {err}");
    for f in ["model.safetensors", "checkpoint.safetensors"] {
        let (a, b) = (tensors(&d.join("full").join(f)), tensors(&d.join("split").join(f)));
        assert_eq!(a.len(), b.len());
        for (name, v) in &a {
            assert!(b[name] == *v, "{f}: {name} differs between the uninterrupted and the resumed run");
        }
    }
    let model = d.join("full/model.safetensors");
    assert!(tensors(&model).contains_key("blocks.0.attn.gating_param"), "timm names");
    let (ok, out, err) = run(bin().args(["eval", "--image-folder"]).arg(d.join("data")).arg("--weights").arg(&model).arg("--json"));
    assert!(ok, "eval: {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["top1"].as_f64().unwrap() >= 0.0 && v["images"].as_u64().unwrap() == 12, "{out}");
    let img = d.join("data/val/a/0.png");
    let (ok, out, err) = run(bin().args(["infer", "--json", "--weights"]).arg(&model).arg(&img));
    assert!(ok, "infer: {err}");
    assert!(out.contains("\"label\": \"a\"") || out.contains("\"label\": \"b\""), "labels from the checkpoint: {out}");
    let conv = d.join("converted.safetensors");
    let (ok, _, err) = run(bin().arg("convert").arg(&model).arg(&conv));
    assert!(ok, "convert: {err}");
    assert_eq!(tensors(&conv).len(), tensors(&model).len());
    one_line_error("infer at another size", run(bin().args(["infer", "--res", "32", "--weights"]).arg(&model).arg(&img)), "takes 16x16 inputs only");
    // Fine-tuning timm's tiny fixture (10 classes, 32x32) on the 2-class folder:
    // a new head, the rest loaded; then a ConViT checkpoint against a CvT --model.
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels-tests/reference/fixtures/convit_tiny/model.safetensors");
    let (ok, _, err) =
        run(bin().args(["train", "--image-folder"]).arg(d.join("data")).arg("--weights").arg(&fixture).args(["--res", "32", "--epochs", "1", "--batch", "4", "--out"]).arg(d.join("ft")));
    assert!(ok && err.contains("head is re-initialised"), "fine-tune: {err}");
    let ft = tensors(&d.join("ft/model.safetensors"));
    assert_eq!(ft["head.weight"].len(), 2 * 24 * 4, "a 2-class head");
    one_line_error(
        "a ConViT checkpoint as a CvT",
        run(bin().args(["train", "--image-folder"]).arg(d.join("data")).arg("--weights").arg(&fixture).args(["--model", "cvt-13", "--res", "32", "--out"]).arg(d.join("ft2"))),
        "a ConViT checkpoint, but --model names CvT",
    );
    one_line_error("convert to HF names", run(bin().arg("convert").arg(&model).arg(d.join("hf")).args(["--naming", "hf"])), "ConViT");
}

/// Gradient accumulation: ConViT has no BatchNorm, so 2 micro-batches of 4 with
/// their gradients added are the batch of 8 (the same images in the same steps,
/// no augmentation), up to f32 summation order; both log optimizer steps.
#[test]
fn accumulated_micro_batches_equal_the_whole_batch() {
    let d = tmp("accum");
    image_folder(&d.join("data"), &["a", "b"], 12);
    let cfg = tiny_convit(&d);
    let common = |out: &Path, batch: &str| {
        let mut c = bin();
        c.args(["train", "--image-folder"]).arg(d.join("data")).arg("--model").arg(&cfg);
        c.args(["--res", "16", "--epochs", "2", "--batch", batch, "--seed", "3", "--lr", "3e-3", "--warmup-steps", "1", "--no-flip", "--crop-scale", "0", "--clip-grad", "1", "--json", "--out"])
            .arg(out);
        c
    };
    let (ok, _, err) = run(&mut common(&d.join("whole"), "8"));
    assert!(ok, "batch 8: {err}");
    let (ok, _, err) = run(common(&d.join("accum"), "4").args(["--accum-steps", "2"]));
    assert!(ok, "accumulated: {err}");
    let read = |p: &Path| -> HashMap<String, Vec<f32>> { tensors(p).into_iter().map(|(n, b)| (n, bytemuck::pod_collect_to_vec::<u8, f32>(&b))).collect() };
    let (a, b) = (read(&d.join("whole/model.safetensors")), read(&d.join("accum/model.safetensors")));
    assert_eq!(a.len(), b.len());
    for (name, x) in &a {
        let scale = x.iter().map(|v| v.abs()).fold(0f32, f32::max).max(1e-6);
        let diff = x.iter().zip(&b[name]).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        // Plus 1e-6 absolute: pos_proj.bias has an analytically zero gradient, so
        // it holds only AdamW-normalised rounding noise (~1e-6) on both sides.
        assert!(diff <= 1e-4 * scale + 1e-6, "{name}: max |whole - accumulated| = {diff:e} against max |w| = {scale:e}");
    }
    let steps = |p: &Path| {
        std::fs::read_to_string(p.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"kind\":\"eval\""))
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(steps(&d.join("whole")), vec![3, 6], "24 images, 8 a step: 3 steps an epoch");
    assert_eq!(steps(&d.join("whole")), steps(&d.join("accum")), "both count optimizer steps");
    // Stopped after 4 of 6 steps (mid-epoch 2) and resumed: bit-identical to the
    // uninterrupted accumulated run; a different --accum-steps on resume is refused.
    let (ok, _, err) = run(common(&d.join("split"), "4").args(["--accum-steps", "2", "--max-steps", "4"]));
    assert!(ok && err.contains("stopped at step 4"), "first part: {err}");
    let resume = |extra: &[&str]| run(bin().args(["train", "--image-folder"]).arg(d.join("data")).args(["--json", "--out"]).arg(d.join("split")).arg("--resume").arg(d.join("split")).args(extra));
    one_line_error("resume with another accumulation", resume(&["--accum-steps", "3"]), "not --accum-steps 3");
    let (ok, _, err) = resume(&[]);
    assert!(ok, "resumed: {err}");
    assert!(tensors(&d.join("accum/model.safetensors")) == tensors(&d.join("split/model.safetensors")), "resumed accumulation differs");
}
