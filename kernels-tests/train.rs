//! Gradient parity with PyTorch for every parameter of a tiny CvT, one training
//! step with train-mode BatchNorm (fixture: make_fixtures.py, `train_fixture`).

mod common;
use common::*;

use cvt_gpu::models::cvt::train::TrainModel;
use cvt_gpu::models::cvt::weights::read_checkpoint;
use cvt_gpu::models::cvt::CvtConfig;
use cvt_gpu::ops::Act;
use cvt_gpu::preprocess::{self, Resize};
use std::path::Path;

#[test]
fn tiny_cvt_gradients_match_torch() {
    gradient_parity(gpu_texture_variants(), false);
}

/// The same with the GPU kernel set (tiled GEMMs with split-K, two-stage column
/// sums and BatchNorm statistics, workgroup row reductions).
#[test]
fn tiny_cvt_gradients_match_torch_buffer_variants() {
    gradient_parity(gpu_buffer_variants(), false);
}

/// Attention probabilities recomputed in the backward (the default for large
/// maps) instead of saved, in both kernel sets: the GPU set's backward reads the
/// forward's log-sum-exp.
#[test]
fn tiny_cvt_gradients_match_torch_recomputed_attention() {
    use cvt_gpu::profile::KernelSet;
    for set in [KernelSet::Gpu, KernelSet::Cpu] {
        gradient_parity(forced_with(set, |p| p.attn_saved = Some(false)), false);
    }
}

/// BatchNorm in eval mode (running statistics, frozen) while training the rest,
/// in both kernel sets.
#[test]
fn tiny_cvt_gradients_match_torch_bn_eval() {
    gradient_parity(gpu_texture_variants(), true);
    gradient_parity(gpu_buffer_variants(), true);
}

fn gradient_parity(gpu: std::sync::Arc<cvt_gpu::gpu::Gpu>, bn_eval: bool) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels-tests/reference/fixtures");
    let tiny = root.join("tiny");
    let cfg = CvtConfig::from_json_file(tiny.join("config.json").to_str().unwrap()).unwrap();
    let ck = read_checkpoint(&tiny.join("official.safetensors")).unwrap();
    let mut model = TrainModel::new(gpu, cfg.clone(), &ck.tensors, Act::QuickGelu).unwrap();
    model.set_bn_eval(bn_eval);
    let suffix = if bn_eval { "_eval" } else { "" };
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join(format!("train/expected{suffix}.json"))).unwrap()).unwrap();
    let images: Vec<f32> = ["chelsea64.png", "coffee64.png"].iter().flat_map(|f| preprocess::load_image(&tiny.join(f), 64, Resize::None).unwrap()).collect();
    let classes = cfg.num_classes;
    let smooth = exp["label_smoothing"].as_f64().unwrap() as f32;
    let labels: Vec<usize> = exp["labels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let targets: Vec<f32> = labels.iter().flat_map(|&l| (0..classes).map(move |c| smooth / classes as f32 + if c == l { 1.0 - smooth } else { 0.0 })).collect();
    let step = model.step_plan(2, 64, 64).unwrap();
    let (loss, logits) = step.run(&images, &targets).unwrap();
    let want_logits: Vec<f64> = exp["logits"].as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect::<Vec<_>>()).collect();
    assert_close("train-mode logits", &logits, &want_logits, 1e-4, 1e-4);
    let want_loss = exp["loss"].as_f64().unwrap();
    assert!((loss as f64 - want_loss).abs() < 1e-5, "loss {loss} vs torch {want_loss}");

    let grads = model.gradients().unwrap();
    let torch = read_checkpoint(&root.join(format!("train/grads{suffix}.safetensors"))).unwrap();
    assert_eq!(grads.len(), torch.tensors.len(), "every parameter has a gradient");
    let mut worst = (String::new(), 0f64);
    for (name, t) in &torch.tensors {
        let got = grads.get(name).unwrap_or_else(|| panic!("no gradient for {name}"));
        let scale = t.data.iter().map(|v| v.abs() as f64).fold(0.0, f64::max);
        let err = got.iter().zip(&t.data).map(|(a, b)| (*a as f64 - *b as f64).abs()).fold(0.0, f64::max);
        // Per tensor: max error within 1e-3 of the tensor's largest gradient (f32
        // sums in a different order than PyTorch's), plus an absolute 1e-6: the key
        // projection's bias has an analytically zero gradient (softmax ignores a
        // per-query constant), so both sides there are f32 rounding noise (~1e-7).
        let rel = if scale > 1e-5 { err / scale } else { 0.0 };
        assert!(err <= 1e-3 * scale + 1e-6, "{name}: max |grad - torch| = {err:.3e}, largest |torch grad| = {scale:.3e}");
        if rel > worst.1 {
            worst = (name.clone(), rel);
        }
    }
    eprintln!("BN {}: {} gradients match torch; worst relative error {:.2e} in {}", if bn_eval { "eval" } else { "train" }, torch.tensors.len(), worst.1, worst.0);

    // BatchNorm running statistics after the step (momentum 0.1, unbiased
    // variance); in eval mode they must not move.
    let running = model.running_stats().unwrap();
    if bn_eval {
        for (name, v) in &running {
            assert_eq!(v, &ck.tensors[name].data, "{name} changed in eval mode");
        }
        return;
    }
    let want = read_checkpoint(&root.join("train/running_after.safetensors")).unwrap();
    assert_eq!(running.len(), want.tensors.len());
    for (name, t) in &want.tensors {
        let got = &running[name];
        assert_close(name, got, &t.data.iter().map(|&v| v as f64).collect::<Vec<_>>(), 1e-5, 1e-4);
    }
}

/// AdamW over every parameter, wired to the training step: on one fixed batch the
/// loss must fall well below its start (a broken gradient or update cannot).
#[test]
fn training_steps_reduce_the_loss() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels-tests/reference/fixtures");
    let tiny = root.join("tiny");
    let cfg = CvtConfig::from_json_file(tiny.join("config.json").to_str().unwrap()).unwrap();
    let ck = read_checkpoint(&tiny.join("official.safetensors")).unwrap();
    let model = TrainModel::new(gpu(), cfg.clone(), &ck.tensors, Act::QuickGelu).unwrap();
    // Every tensor of the checkpoint is a parameter of the optimizer (the three
    // depthwise convs of a block share one [3, 9, C] parameter).
    let params = model.params();
    let blocks: usize = cfg.depths.iter().sum();
    let n_ckpt = ck.tensors.keys().filter(|k| !k.contains("running_")).count();
    assert_eq!(params.len(), n_ckpt - 2 * blocks);
    let images: Vec<f32> = ["chelsea64.png", "coffee64.png"].iter().flat_map(|f| preprocess::load_image(&tiny.join(f), 64, Resize::None).unwrap()).collect();
    let targets: Vec<f32> = [3usize, 7].iter().flat_map(|&l| (0..cfg.num_classes).map(move |c| (c == l) as u8 as f32)).collect();
    let step = model.step_plan(2, 64, 64).unwrap();
    let mut opt = model.optimizer(cvt_gpu::ops::optim::AdamW { lr: 3e-3, weight_decay: 0.05, ..Default::default() }).unwrap();
    let (first, _) = step.run(&images, &targets).unwrap();
    let mut last = first;
    for _ in 0..25 {
        opt.update(3e-3).unwrap();
        last = step.run(&images, &targets).unwrap().0;
    }
    eprintln!("loss {first:.4} -> {last:.4} after 25 AdamW steps");
    assert!(last.is_finite() && last < 0.3 * first, "loss {first} -> {last}");
}

/// Stochastic depth: scales of 1 reproduce the plain step exactly; a block whose
/// two branches are dropped for every sample gets exactly zero gradients (and
/// the other blocks do not); a kept branch scaled by 1/(1-p) changes the loss.
#[test]
fn drop_path_scales_the_residual_branches() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels-tests/reference/fixtures");
    let tiny = root.join("tiny");
    let cfg = CvtConfig::from_json_file(tiny.join("config.json").to_str().unwrap()).unwrap();
    let ck = read_checkpoint(&tiny.join("official.safetensors")).unwrap();
    let images: Vec<f32> = ["chelsea64.png", "coffee64.png"].iter().flat_map(|f| preprocess::load_image(&tiny.join(f), 64, Resize::None).unwrap()).collect();
    let classes = cfg.num_classes;
    let targets: Vec<f32> = (0..2 * classes).map(|i| if i % classes == (i / classes) * 3 { 1.0 } else { 0.0 }).collect();

    let plain = TrainModel::new(gpu(), cfg.clone(), &ck.tensors, Act::QuickGelu).unwrap();
    let (loss0, _) = plain.step_plan(2, 64, 64).unwrap().run(&images, &targets).unwrap();
    let grads0 = plain.gradients().unwrap();

    let mut model = TrainModel::new(gpu(), cfg.clone(), &ck.tensors, Act::QuickGelu).unwrap();
    model.set_drop_path(&[0.1, 0.2, 0.3]);
    let blocks: usize = cfg.depths.iter().sum();
    // Linear rise within each stage, 0 at a stage's first block.
    assert_eq!(model.drop_path_rates().len(), blocks);
    assert_eq!(model.drop_path_rates()[0], 0.1);
    assert_eq!(model.drop_path_rates()[cfg.depths[0]], 0.0);
    let step = model.step_plan(2, 64, 64).unwrap();
    assert_eq!(step.drop_scale_len(), 2 * blocks * 2);
    step.write_drop_scales(&vec![1.0; step.drop_scale_len()]).unwrap();
    let (loss1, _) = step.run(&images, &targets).unwrap();
    assert_eq!(loss1, loss0, "all-kept scales of 1 give the plain step");
    let grads1 = model.gradients().unwrap();
    for (n, g) in &grads0 {
        assert_eq!(&grads1[n], g, "{n}");
    }

    // Drop both branches of the last block (rate 0.3; a stage's first block has
    // rate 0 and ignores its scales) for both samples.
    let last = cfg.stages() - 1;
    let bi = blocks - 1;
    let mut sc = vec![1.0f32; step.drop_scale_len()];
    for v in &mut sc[2 * bi * 2..2 * (bi + 1) * 2] {
        *v = 0.0;
    }
    step.write_drop_scales(&sc).unwrap();
    let (loss2, _) = step.run(&images, &targets).unwrap();
    assert_ne!(loss2, loss0);
    let grads2 = model.gradients().unwrap();
    let dropped = format!("stage{last}.blocks.{}.", cfg.depths[last] - 1);
    for (n, g) in &grads2 {
        let zero = g.iter().all(|&v| v == 0.0);
        if n.starts_with(&dropped) && !n.contains("running") {
            assert!(zero, "{n}: a dropped block must get no gradient");
        }
    }
    assert!(grads2[&format!("stage{last}.blocks.0.mlp.fc1.weight")].iter().any(|&v| v != 0.0), "the block before still learns");
    assert!(grads2["stage0.blocks.0.mlp.fc1.weight"].iter().any(|&v| v != 0.0), "earlier blocks still learn (through the skip)");

    // A kept branch scaled by 1/(1 - p) changes the loss (the scale is applied).
    let mut sc = vec![1.0f32; step.drop_scale_len()];
    sc[2 * bi * 2 + 2] = 1.0 / 0.7;
    step.write_drop_scales(&sc).unwrap();
    let (loss3, _) = step.run(&images, &targets).unwrap();
    assert_ne!(loss3, loss0);
}

/// The data-parallel step's gradient exchange (`dist::exchange`) runs the step
/// plan in segments, one per gradient bucket, accumulating and reading each
/// bucket back as the backward finishes it. In one process (its all-reduce is
/// the identity) it must leave exactly the plain step's accumulators, loss and
/// logits, as a step's first micro-batch and as a later one; the segments must
/// follow the plan's order and end before the backward does for the buckets
/// the backward finishes first (else nothing could overlap).
#[test]
fn gradient_exchange_in_segments_is_the_plain_step() {
    use cvt_gpu::dist::{exchange::Exchange, World};
    use cvt_gpu::models::step::Optimizer;
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels-tests/reference/fixtures/tiny");
    let cfg = CvtConfig::from_json_file(tiny.join("config.json").to_str().unwrap()).unwrap();
    let ck = read_checkpoint(&tiny.join("official.safetensors")).unwrap();
    let images: Vec<f32> = ["chelsea64.png", "coffee64.png"].iter().flat_map(|f| preprocess::load_image(&tiny.join(f), 64, Resize::None).unwrap()).collect();
    let flipped: Vec<f32> = images.iter().rev().copied().collect();
    let k = cfg.num_classes;
    let one_hot = |ls: [usize; 2]| -> Vec<f32> { ls.iter().flat_map(|&l| (0..k).map(move |c| (c == l) as u8 as f32)).collect() };
    let (ta, tb) = (one_hot([3, 7]), one_hot([1, 4]));
    let world = World::single();
    let model = TrainModel::new(gpu(), cfg.clone(), &ck.tensors, Act::QuickGelu).unwrap();
    let gpu = model.gpu.clone();
    let step = model.step_plan(2, 64, 64).unwrap();
    let opt = Optimizer::with_accumulation(&gpu, model.params(), Default::default(), true).unwrap();
    let sums = |opt: &Optimizer| -> Vec<Vec<f32>> { opt.accumulators().iter().map(|a| gpu.read(&a.sum, 0, a.len).unwrap()).collect() };
    let total = step.plan.steps.len();

    // Plain: micro-batch A starts the sum, B adds to it.
    let ra = step.run(&images, &ta).unwrap();
    opt.accumulate(true).unwrap();
    let first_only = sums(&opt);
    let rb = step.run(&flipped, &tb).unwrap();
    opt.accumulate(false).unwrap();
    let both = sums(&opt);

    // Small buckets, so that the tiny model has many.
    let mut x = Exchange::new(&gpu, &step, opt.accumulators(), true, 16 << 10).unwrap();
    let ends = x.segment_ends();
    eprintln!("{} buckets over {total} steps, segments end at {ends:?}", x.buckets());
    assert!(x.buckets() >= 4, "{} buckets", x.buckets());
    assert!(ends.windows(2).all(|w| w[0] <= w[1]) && *ends.last().unwrap() <= total, "{ends:?}");
    assert!(ends[0] < total * 9 / 10, "the head's bucket is read back only at step {} of {total}", ends[0]);
    let distinct = ends.iter().collect::<std::collections::BTreeSet<_>>().len();
    assert!(distinct >= 3, "{ends:?}");

    assert_eq!(x.run(&world, &step, &images, &ta, true).unwrap(), ra, "first micro-batch: loss and logits");
    assert_eq!(sums(&opt), first_only, "first micro-batch: accumulators");
    step.run(&images, &ta).unwrap();
    opt.accumulate(true).unwrap();
    assert_eq!(x.run(&world, &step, &flipped, &tb, false).unwrap(), rb, "second micro-batch: loss and logits");
    assert_eq!(sums(&opt), both, "second micro-batch: accumulators");
    assert_eq!(x.stats.steps, 2);

    // Not overlapped: one segment, the whole backward, and the same sums.
    let mut after = Exchange::new(&gpu, &step, opt.accumulators(), false, 16 << 10).unwrap();
    assert!(after.segment_ends().iter().all(|&e| e == total));
    assert_eq!(after.run(&world, &step, &images, &ta, true).unwrap(), ra);
    assert_eq!(sums(&opt), first_only);
}
