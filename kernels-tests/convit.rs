//! ConViT against timm (fixtures: `reference/convit_fixtures.py`): a tiny
//! ConViT's logits from its safetensors and `.pth` forms, every parameter's
//! gradient of one training step, and one AdamW step with the recipe's decay
//! groups, in both kernel sets. With `--large` fixtures (not committed), the
//! ConViT-Ti logits of two real 224 crops.

mod scratch;
use scratch::Scratch;
mod common;
use common::*;

use cvt_gpu::models::convit::{self, Convit, ConvitConfig};
use cvt_gpu::models::{tensors, Tensor};
use cvt_gpu::ops::matmul::WeightFormat;
use cvt_gpu::ops::optim::AdamW;
use cvt_gpu::preprocess::{self, Resize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels-tests/reference/fixtures/convit_tiny")
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    let (raw, _) = tensors::read(path).unwrap();
    convit::canonical(raw, &path.display().to_string()).unwrap()
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap()
}

fn rows(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<_>>()).collect()
}

fn images(cfg: &ConvitConfig) -> Vec<f32> {
    ["chelsea32.png", "coffee32.png"].iter().flat_map(|f| preprocess::load_image(&fixtures().join(f), cfg.image_size, Resize::None).unwrap()).collect()
}

fn config() -> ConvitConfig {
    ConvitConfig::by_name(fixtures().join("config.json").to_str().unwrap()).unwrap()
}

#[test]
fn tiny_convit_logits_match_timm_in_both_kernel_sets_and_forms() {
    let cfg = config();
    let want = rows(&expected()["logits"]);
    for (set, gpu) in [("gpu set", gpu_buffer_variants()), ("cpu set", gpu_texture_variants())] {
        for file in ["model.safetensors", "model.pth"] {
            let t = load(&fixtures().join(file));
            cfg.check(&t).unwrap();
            assert_eq!(ConvitConfig::detect(&t).unwrap(), ConvitConfig { name: "custom".into(), ..cfg.clone() }, "detected architecture");
            let model = Convit::new(gpu.clone(), cfg.clone(), &t, false, WeightFormat::F32).unwrap();
            let (logits, _) = model.plan(2).unwrap().forward(&images(&cfg)).unwrap();
            assert_close(&format!("{set} {file} logits"), &logits, &want, 1e-4, 1e-4);
        }
    }
}

/// The training model's forward, every gradient, and one AdamW step.
#[test]
fn tiny_convit_gradients_and_adamw_match_timm() {
    let cfg = config();
    let exp = expected();
    let t = load(&fixtures().join("model.safetensors"));
    let torch_grads = load(&fixtures().join("grads.safetensors"));
    let after = load(&fixtures().join("adamw.safetensors"));
    let smooth = exp["label_smoothing"].as_f64().unwrap() as f32;
    let labels: Vec<usize> = exp["labels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let k = cfg.num_classes;
    let targets: Vec<f32> = labels.iter().flat_map(|&l| (0..k).map(move |c| smooth / k as f32 + if c == l { 1.0 - smooth } else { 0.0 })).collect();
    for (set, gpu) in [("gpu set", gpu_buffer_variants()), ("cpu set", gpu_texture_variants())] {
        let model = Convit::new(gpu.clone(), cfg.clone(), &t, true, WeightFormat::F32).unwrap();
        let step = model.step_plan(2).unwrap();
        let (loss, logits) = step.run(&images(&cfg), &targets).unwrap();
        assert_close(&format!("{set} train logits"), &logits, &rows(&exp["train_logits"]), 1e-4, 1e-4);
        let want_loss = exp["loss"].as_f64().unwrap();
        assert!((loss as f64 - want_loss).abs() < 1e-5, "{set}: loss {loss} vs timm {want_loss}");
        let grads = model.gradients().unwrap();
        assert_eq!(grads.len(), torch_grads.len(), "every parameter has a gradient");
        let mut worst = (String::new(), 0f64);
        for (name, tg) in &torch_grads {
            let got = &grads.get(name).unwrap_or_else(|| panic!("no gradient for {name}")).data;
            let scale = tg.data.iter().map(|v| v.abs() as f64).fold(0.0, f64::max);
            let err = got.iter().zip(&tg.data).map(|(a, b)| (*a as f64 - *b as f64).abs()).fold(0.0, f64::max);
            if name.ends_with("pos_proj.bias") {
                // Analytically zero (softmax shift invariance): both sides are f32
                // rounding noise, compared absolutely.
                assert!(err < 1e-6, "{set} {name}: |grad - timm| = {err:.3e}");
                continue;
            }
            // Per tensor: within 1e-3 of its largest gradient (f32 sums in another
            // order than PyTorch's), plus 1e-7 absolute for near-zero tensors.
            assert!(err <= 1e-3 * scale + 1e-7, "{set} {name}: max |grad - timm| = {err:.3e}, largest |timm grad| = {scale:.3e}");
            if scale > 0.0 && err / scale > worst.1 {
                worst = (name.clone(), err / scale);
            }
        }
        eprintln!("{set}: {} gradients match timm; worst relative error {:.2e} in {}", torch_grads.len(), worst.1, worst.0);
        let a = &exp["adamw"];
        let settings = AdamW { lr: a["lr"].as_f64().unwrap() as f32, weight_decay: a["weight_decay"].as_f64().unwrap() as f32, ..Default::default() };
        let mut opt = model.optimizer(settings).unwrap();
        opt.update(settings.lr).unwrap();
        let w = model.weights().unwrap();
        for (name, want) in &after {
            let got = &w[name].data;
            let before = &t[name].data;
            // The step moves each weight by about lr: compare the step itself.
            let d_got: Vec<f32> = got.iter().zip(before).map(|(a, b)| a - b).collect();
            let d_want: Vec<f64> = want.data.iter().zip(before).map(|(a, b)| (*a - *b) as f64).collect();
            assert_close(&format!("{set} AdamW step of {name}"), &d_got, &d_want, 2e-6, 1e-2);
        }
    }
}

/// ConViT-Ti, 224 crops of two photos, timm naming and the `.pth` form, both
/// kernel sets: logits within 1e-3 and the same top-5. Needs
/// `convit_fixtures.py --large` (skipped without it).
#[test]
fn convit_ti_matches_timm_on_real_photos() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels-tests/reference/large/convit_ti");
    if !dir.join("expected.json").exists() {
        eprintln!("skipped: no {} (convit_fixtures.py --large)", dir.display());
        return;
    }
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let want = rows(&exp["logits"]);
    let imgs: Vec<f32> = ["a.png", "b.png"].iter().flat_map(|f| preprocess::load_image(&dir.join(f), 224, Resize::None).unwrap()).collect();
    for (set, gpu) in [("gpu set", gpu_buffer_variants()), ("cpu set", gpu_texture_variants())] {
        for file in ["model.safetensors", "model.pth"] {
            let t = load(&dir.join(file));
            let cfg = ConvitConfig::detect(&t).unwrap();
            assert_eq!(cfg.name, "convit-ti");
            let model = Convit::new(gpu.clone(), cfg.clone(), &t, false, WeightFormat::F32).unwrap();
            let (logits, _) = model.plan(2).unwrap().forward(&imgs).unwrap();
            assert_close(&format!("{set} {file} ConViT-Ti logits"), &logits, &want, 1e-3, 1e-3);
            let err = logits.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            for (i, top) in exp["top5"].as_array().unwrap().iter().enumerate() {
                let row = &logits[i * 1000..(i + 1) * 1000];
                let mut idx: Vec<usize> = (0..1000).collect();
                idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                let want5: Vec<usize> = top.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
                assert_eq!(idx[..5], want5[..], "{set} {file}: top-5 of image {i}");
            }
            eprintln!("{set} {file}: ConViT-Ti logits within {err:.2e} of timm, same top-5");
        }
    }
}

/// A ConViT checkpoint with a tensor missing or mis-shaped: `infer` ends with one
/// line naming the file and the tensor, exit code 1.
#[test]
fn broken_convit_checkpoints_are_one_line_errors() {
    use cvt_gpu::checkpoint::{write_safetensors, Entry};
    let t = load(&fixtures().join("model.safetensors"));
    let dir = Scratch::new("convit-bad");
    let cases: [(&str, &dyn Fn(&mut HashMap<String, Tensor>), &str); 2] = [
        ("missing", &|t| drop(t.remove("blocks.0.attn.v.weight")), "missing tensor blocks.0.attn.v.weight"),
        ("misshaped", &|t| drop(t.insert("blocks.1.attn.qk.weight".into(), Tensor::new(vec![48, 20], vec![0.0; 960]))), "blocks.1.attn.qk.weight has shape [48, 20]"),
    ];
    for (tag, edit, needle) in cases {
        let mut t = t.clone();
        edit(&mut t);
        let path = dir.join(format!("{tag}.safetensors"));
        let entries: Vec<Entry> = t.iter().map(|(n, x)| Entry::f32(n.clone(), x.shape.clone(), &x.data)).collect();
        write_safetensors(&path, &entries, &Default::default()).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cvt-gpu")).args(["infer", "--weights"]).arg(&path).arg(fixtures().join("chelsea32.png")).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(out.status.code(), Some(1), "{tag}: {err}");
        assert!(!err.contains("panicked") && lines.len() == 1, "{tag}: {err}");
        assert!(lines[0].contains(needle) && lines[0].contains(&path.display().to_string()), "{tag}: {} should name the file and say {needle:?}", lines[0]);
    }
}
