//! Hostile input and lost work, end to end: runs are never clobbered (resume
//! continues in its own directory, a busy directory is refused, stale temporary
//! files are removed, replayed steps are not logged twice), every stop signal
//! saves, out-of-range settings and oversized models or inputs are refused with
//! one line before anything large is allocated, and no silent guesses (non-finite
//! weights, preset look-alikes, unknown metadata and settings).
//!
//! Every command runs under an address-space cap (`CAP`), so an input that makes
//! the program allocate without bound fails the test instead of the machine.

mod scratch;
use scratch::Scratch;
mod cli_common;

use cli_common::{one_line_error, run};
use cvt_gpu::models::cvt::weights::{init_tensors, Checkpoint, Naming};
use cvt_gpu::models::cvt::{describe, CvtConfig, LoadOptions};
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Address space per command: lavapipe's JIT and the tiny models here need
/// about 1 GiB of it; the failures this file guards against asked for 12-30 GB.
const CAP: u64 = 6 << 30;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cvt-gpu"));
    unsafe {
        c.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: CAP, rlim_max: CAP };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

fn tmp(tag: &str) -> Scratch {
    Scratch::new(&format!("runs-{tag}"))
}

/// A tiny CvT for 16x16 RGB images.
fn tiny_config(dir: &Path) -> PathBuf {
    let p = dir.join("tiny.json");
    std::fs::write(&p, r#"{"name":"tiny","num_classes":2,"dims":[8,16,24],"heads":[1,2,2],"depths":[1,1,1],"image_size":16}"#).unwrap();
    p
}

/// DIR/train/<class>/*.png and DIR/val/<class>/*.png, two classes told apart by brightness.
fn image_folder(dir: &Path, per_class: usize) {
    for split in ["train", "val"] {
        for (ci, c) in ["a", "b"].iter().enumerate() {
            let d = dir.join(split).join(c);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..per_class {
                let img = image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([(ci as u32 * 150 + (x * 7 + y * 3 + i as u32) % 60) as u8, 60, 90]));
                img.save(d.join(format!("{i}.png"))).unwrap();
            }
        }
    }
}

fn train_cmd(data: &Path, cfg: &Path) -> Command {
    let mut c = bin();
    c.args(["train", "--image-folder"]).arg(data).arg("--model").arg(cfg).args(["--res", "16", "--batch", "4", "--json"]);
    c
}

/// The "step" of every train record in a run's metrics.jsonl.
fn logged_steps(dir: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).filter(|v| v["kind"] == "train").map(|v| v["step"].as_u64().unwrap()).collect()
}

#[test]
fn resume_continues_in_its_own_directory_and_logs_each_step_once() {
    let d = tmp("resume");
    image_folder(&d.join("data"), 8);
    let cfg = tiny_config(&d);
    let run_dir = d.join("run");
    // 16 images, batch 4: 4 steps an epoch, a log line every step at the epoch end.
    let (ok, _, err) = run(train_cmd(&d.join("data"), &cfg).args(["--epochs", "3", "--save-every", "1", "--max-steps", "6", "--out"]).arg(&run_dir));
    assert!(ok && err.contains("stopped at step 6"), "{err}");
    // A crash after step 6's checkpoint but with later metrics logged: append a
    // record a killed run would have written.
    let mut m = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    m += "{\"kind\":\"train\",\"step\":7,\"loss\":1.0}\n";
    std::fs::write(run_dir.join("metrics.jsonl"), m).unwrap();
    // Resume without --out, from a different working directory: the run goes on
    // in run_dir, and the default runs/train is not created.
    let cwd = d.join("elsewhere");
    std::fs::create_dir_all(&cwd).unwrap();
    let (ok, _, err) = run(train_cmd(&d.join("data"), &cfg).current_dir(&cwd).arg("--resume").arg(&run_dir));
    assert!(ok, "resume: {err}");
    assert!(!cwd.join("runs").exists(), "resume wrote into the default run directory");
    let steps = logged_steps(&run_dir);
    let mut sorted = steps.clone();
    sorted.dedup();
    assert_eq!(steps, sorted, "steps logged twice or out of order: {steps:?}");
    assert_eq!(steps.last(), Some(&12), "the run reached its end: {steps:?}");
    assert!(run_dir.join("curves.png").is_file());
}

#[test]
fn sigterm_mid_epoch_checkpoints_and_a_busy_directory_is_refused() {
    let d = tmp("sigterm");
    image_folder(&d.join("data"), 40);
    let cfg = tiny_config(&d);
    let out = d.join("run");
    std::fs::create_dir_all(&out).unwrap();
    // Leftovers of writes killed in an earlier run: removed at start.
    std::fs::write(out.join(".checkpoint.safetensors.tmp4242"), vec![0u8; 1000]).unwrap();
    let mut child = train_cmd(&d.join("data"), &cfg).args(["--epochs", "50", "--out"]).arg(&out).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // Wait for the first steps (metrics are logged every 10 steps).
    let t = Instant::now();
    while !out.join("metrics.jsonl").exists() {
        assert!(t.elapsed() < Duration::from_secs(90), "no training step logged");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!out.join(".checkpoint.safetensors.tmp4242").exists(), "stale temporary file kept");
    // A second run on the same directory is refused, naming the first.
    one_line_error("second run on a busy --out", run(train_cmd(&d.join("data"), &cfg).arg("--out").arg(&out)), "another training run");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "SIGTERM should stop cleanly: {err}");
    assert!(err.contains("stopped at step") && err.contains("--resume"), "{err}");
    let state = |p: &Path| -> serde_json::Value {
        let bytes = std::fs::read(p.join("checkpoint.safetensors")).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["train_state"]).unwrap()
    };
    let s = state(&out);
    assert!(s["step"].as_u64().unwrap() >= 10, "{s}");
    // Resume and stop again after two steps: it continued where it stopped.
    let (ok, _, err) = run(train_cmd(&d.join("data"), &cfg).args(["--max-steps", "2", "--resume"]).arg(&out));
    assert!(ok, "{err}");
    assert_eq!(state(&out)["step"].as_u64().unwrap(), s["step"].as_u64().unwrap() + 2);
}

#[test]
fn out_of_range_training_settings_are_refused_before_any_work() {
    let d = tmp("ranges");
    image_folder(&d.join("data"), 4);
    let cfg = tiny_config(&d);
    for (args, needle) in [
        (&["--lr=-1"][..], "--lr"),
        (&["--lr", "NaN"], "--lr"),
        (&["--label-smoothing", "2"], "--label-smoothing"),
        (&["--crop-scale", "5"], "--crop-scale"),
        (&["--max-steps", "0"], "--max-steps"),
        (&["--epochs", "0"], "--epochs"),
        (&["--mixup=-0.5"], "--mixup"),
        (&["--cutmix", "inf"], "--cutmix"),
        (&["--weight-decay=-1"], "--weight-decay"),
        (&["--save-every", "0"], "--save-every"),
        (&["--batch", "1"], "--batch"),
    ] {
        let out = d.join("out");
        one_line_error(&format!("{args:?}"), run(train_cmd(&d.join("data"), &cfg).args(args).arg("--out").arg(&out)), needle);
        assert!(!out.exists(), "{args:?}: a failed command left {}", out.display());
    }
    let mut huge = bin();
    huge.args(["train", "--image-folder"]).arg(d.join("data")).args(["--res", "100000", "--out"]).arg(d.join("out"));
    one_line_error("--res 100000", run(&mut huge), "100000");
    assert!(!d.join("out").exists());
}

#[test]
fn oversized_inputs_and_models_fail_in_seconds() {
    let d = tmp("sizes");
    let w = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/fmnist/model.safetensors");
    let img = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/samples/fmnist-bag.png");
    one_line_error("--res 100000", run(bin().args(["infer", "--weights"]).arg(&w).args(["--res", "100000"]).arg(&img)), "100000");
    // Sizes a real model never has, in a config file and in a checkpoint's metadata.
    let three = r#""dims":[8,16,24],"heads":[1,2,2]"#;
    let cases = [
        (format!(r#"{{"num_classes":10,{three},"depths":[1,1000000000,1]}}"#), "depth"),
        (format!(r#"{{"num_classes":1000000000,{three},"depths":[1,1,1]}}"#), "num_classes"),
        (format!(r#"{{"num_classes":10,{three},"depths":[1,1,1],"mlp_ratio":1e30}}"#), "mlp_ratio"),
        (format!(r#"{{"num_classes":10,{three},"depths":[1,1,1],"patch_padding":[2,1000000000000000000,1]}}"#), "padding"),
        (r#"{"num_classes":10,"dims":[8,16,100000000],"heads":[1,2,2],"depths":[1,1,1]}"#.to_string(), "dim"),
        (format!(r#"{{"num_classes":10,{three},"depths":[1,1,1],"image_size":100000}}"#), "image_size"),
    ];
    for (json, needle) in cases {
        let p = d.join("cfg.json");
        std::fs::write(&p, &json).unwrap();
        one_line_error(&json, run(bin().args(["bench", "--model"]).arg(&p).args(["--iters", "1"])), needle);
        one_line_error(&json, run(bin().args(["infer", "--weights"]).arg(&w).arg("--config").arg(&p).arg(&img)), needle);
        // The same in a checkpoint's metadata.
        let cfg: CvtConfig = serde_json::from_str(&json).unwrap();
        let ck = Checkpoint {
            tensors: Default::default(),
            family: cvt_gpu::models::Family::Cvt,
            naming: Naming::Official,
            metadata: BTreeMap::from([("cvt_config".to_string(), serde_json::to_string(&cfg).unwrap())]),
        };
        let e = describe(&ck, Path::new("crafted.safetensors"), &LoadOptions::default()).err().expect("crafted metadata accepted");
        assert!(format!("{e:#}").contains(needle) && format!("{e:#}").contains("crafted.safetensors"), "{e:#}");
    }
}

/// A checkpoint of `cfg`'s shapes with some tensors changed, and metadata.
fn checkpoint(cfg: &CvtConfig, edit: impl FnOnce(&mut Checkpoint)) -> Checkpoint {
    let mut ck = Checkpoint { tensors: init_tensors(cfg, 1), family: cvt_gpu::models::Family::Cvt, naming: Naming::Official, metadata: BTreeMap::new() };
    edit(&mut ck);
    ck
}

#[test]
fn no_silent_guesses_about_weights_and_metadata() {
    let path = Path::new("w.safetensors");
    let err = |ck: &Checkpoint| describe(ck, path, &LoadOptions::default()).err().map(|e| format!("{e:#}")).unwrap_or_default();
    // A CvT-13 whose stem is 5x5: named cvt-13 by its widths and depths, but not its shapes.
    let mut c13 = CvtConfig::cvt13();
    c13.num_classes = 10;
    let ck = checkpoint(&c13, |ck| {
        ck.tensors.insert("stage0.patch_embed.proj.weight".into(), cvt_gpu::models::cvt::weights::Tensor::new(vec![64, 3, 5, 5], vec![0.0; 64 * 75]));
    });
    let e = err(&ck);
    assert!(e.contains("cvt-13") && e.contains("[64, 3, 5, 5]") && e.contains("--config"), "{e}");
    assert!(err(&checkpoint(&c13, |_| {})).is_empty(), "the real shapes load");

    // Non-finite weights: refused, naming the tensor, unless allowed.
    let tiny = CvtConfig { num_classes: 3, ..CvtConfig::cvt_fmnist() };
    let with_meta = |ck: &mut Checkpoint| {
        ck.metadata.insert("cvt_config".into(), serde_json::to_string(&tiny).unwrap());
    };
    let nan = checkpoint(&tiny, |ck| {
        with_meta(ck);
        ck.tensors.get_mut("stage1.blocks.0.mlp.fc2.weight").unwrap().data[5] = f32::NAN;
    });
    let e = err(&nan);
    assert!(e.contains("stage1.blocks.0.mlp.fc2.weight") && e.contains("non-finite") && e.contains("w.safetensors"), "{e}");
    assert!(describe(&nan, path, &LoadOptions { allow_nonfinite: true, ..Default::default() }).is_ok());

    // Unknown metadata values are errors, not defaults.
    for (key, value, needle) in [
        ("activation", "swish", "swish"),
        ("preprocess", r#"{"channels":1,"mean":[0.5],"std":[0.5],"resize":"stretch"}"#, "stretch"),
        ("preprocess", r#"{"channels":1,"mean":[0.5],"std":[0.0],"resize":"plain"}"#, "std"),
        ("labels", r#"["only one"]"#, "labels"),
    ] {
        let ck = checkpoint(&tiny, |ck| {
            with_meta(ck);
            ck.metadata.insert(key.into(), value.into());
        });
        let e = err(&ck);
        assert!(e.contains(needle) && e.contains("w.safetensors"), "{key}={value}: {e}");
    }
}

#[test]
fn cli_refuses_nonfinite_weights_and_unknown_settings() {
    let d = tmp("nan");
    let w = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/fmnist/model.safetensors");
    let img = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/samples/fmnist-bag.png");
    // NaN in the last LayerNorm's weight.
    let mut bytes = std::fs::read(&w).unwrap();
    let (n, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let info = meta.info("norm.weight").unwrap();
    let at = 8 + n + info.data_offsets.0;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let nan = d.join("nan.safetensors");
    std::fs::write(&nan, &bytes).unwrap();
    one_line_error("NaN weights", run(bin().args(["infer", "--weights"]).arg(&nan).arg(&img)), "norm.weight");
    one_line_error("NaN weights, convert", run(bin().args(["convert"]).arg(&nan).arg(d.join("o.safetensors"))), "norm.weight");
    assert!(!d.join("o.safetensors").exists());
    one_line_error("NaN weights allowed: NaN logits", run(bin().args(["infer", "--allow-nonfinite", "--weights"]).arg(&nan).arg(&img)), "not finite");
    one_line_error("misspelt setting", run(bin().env("CVT_GPU_TEXREAD", "storage").args(["infer", "--weights"]).arg(&w).arg(&img)), "CVT_GPU_TEX_READ");
    one_line_error("bad value", run(bin().env("CVT_GPU_KERNELS", "gpux").args(["infer", "--weights"]).arg(&w).arg(&img)), "CVT_GPU_KERNELS=gpux");
}

#[test]
fn convert_hf_export_is_a_whole_directory_or_nothing() {
    let d = tmp("hf");
    let w = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/fmnist/model.safetensors");
    // Without a trailing slash: still a directory with both files.
    let out = d.join("hf-model");
    let (ok, _, err) = run(bin().arg("convert").arg(&w).arg(&out).args(["--naming", "hf"]));
    assert!(ok, "{err}");
    assert!(out.join("model.safetensors").is_file() && out.join("config.json").is_file());
    assert!(!d.join("config.json").exists());
    one_line_error("a file name as the HF directory", run(bin().arg("convert").arg(&w).arg(d.join("m.safetensors")).args(["--naming", "hf"])), "model directory");
    assert!(!d.join("m.safetensors").exists());
    // A failed export into an existing directory changes nothing there.
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    std::fs::remove_file(out.join("config.json")).unwrap();
    std::fs::create_dir(out.join("config.json")).unwrap();
    one_line_error("config.json is a directory", run(bin().arg("convert").arg(&w).arg(&out).args(["--naming", "hf"])), "config.json");
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), before);
    // A failed export to a new directory leaves nothing, no staging directory either.
    let fresh = d.join("sub/new");
    one_line_error("bad config", run(bin().arg("convert").arg(&w).arg(&fresh).args(["--naming", "hf", "--config", "cvt-13"])), "cvt-13");
    assert!(!d.join("sub").exists());
    let left: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 1, "leftovers: {left:?}");
    // An output that is a symbolic link is written through, the link kept.
    std::fs::write(d.join("real.safetensors"), b"old").unwrap();
    std::os::unix::fs::symlink("real.safetensors", d.join("link.safetensors")).unwrap();
    let (ok, _, err) = run(bin().arg("convert").arg(&w).arg(d.join("link.safetensors")));
    assert!(ok, "{err}");
    assert!(std::fs::symlink_metadata(d.join("link.safetensors")).unwrap().file_type().is_symlink());
    assert!(std::fs::metadata(d.join("real.safetensors")).unwrap().len() > 1000);
}
