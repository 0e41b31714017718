//! A/B timing of two versions of the kernels, interleaved run by run in one
//! process (ABBA order), so that the host's speed swings (up to 2x within
//! minutes on the development VM) hit both alike. Each side has its own device,
//! whose shaders come from its own directory (`CVT_GPU_SHADER_DIR`), optionally
//! with settings (`DIR:KEY=VAL,...`; a setting stays set for side B unless B sets
//! it again). Run both orders (A B, then B A): with training steps the second
//! device ran 12-15% faster whatever it held (docs/perf.md); inference and GEMM
//! A/A runs showed no such bias.
//!
//!     cargo run --release --example ab -- DIR_A DIR_B [ROUNDS] [gemm M N K | MODEL BATCH [RES] | train MODEL BATCH RES]
//!     cargo run --release --example ab -- shaders /tmp/try 30 cvt-13 1
//!     AB_KERNELS=norm cargo run --release --example ab -- shaders /tmp/try 30 cvt-13 1
//!     cargo run --release --example ab -- shaders:AB_FORMAT=f32 shaders:AB_FORMAT=half 20 cvt-13 1
use anyhow::Result;
use cvt_gpu::{gpu::Gpu, graph::Plan, models::cvt::CvtConfig};
use std::sync::Arc;
use std::time::Instant;

/// Deterministic input values in [-1, 1).
fn image(len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect()
}

/// The plan to time (with whatever must outlive it) and its GFLOP per run.
fn workload(gpu: &Arc<Gpu>, spec: &[String]) -> Result<(Plan, Box<dyn std::any::Any>, f64)> {
    let num = |i: usize, d: usize| -> Result<usize> { Ok(spec.get(i).map(|s| s.parse()).transpose()?.unwrap_or(d)) };
    if spec.is_empty() || spec[0] == "gemm" {
        let (m, n, k) = (num(1, 1024)?, num(2, 1024)?, num(3, 1024)?);
        return Ok((cvt_gpu::bench::gemm_plan(gpu, m, n, k)?, Box::new(()), 2.0 * (m * n * k) as f64 / 1e9));
    }
    if spec[0] == "train" {
        // A training step (forward, backward; no optimizer step): train MODEL BATCH RES.
        let cfg = CvtConfig::by_name(spec.get(1).map_or("cvt-13", |s| s.as_str()))?;
        let (batch, res) = (num(2, 64)?, num(3, 64)?);
        let model = cvt_gpu::models::cvt::train::TrainModel::new(gpu.clone(), cfg.clone(), &cvt_gpu::models::cvt::weights::random_tensors(&cfg, 1), cvt_gpu::ops::Act::QuickGelu)?;
        let step = model.step_plan(batch, res, res)?;
        let img = image(batch * res * res * cfg.in_chans);
        let targets: Vec<f32> = (0..batch * cfg.num_classes).map(|i| (i % cfg.num_classes == 3) as u8 as f32).collect();
        step.run(&img, &targets)?;
        return Ok((step.plan, Box::new(model), 3.0 * 2.0 * cfg.macs(res, res)? * batch as f64 / 1e9));
    }
    let cfg = CvtConfig::by_name(&spec[0])?;
    let (batch, res) = (num(1, 1)?, num(2, cfg.image_size)?);
    let tensors = cvt_gpu::models::cvt::weights::random_tensors(&cfg, 1);
    // AB_FORMAT=f16|half (a side's setting): f16 weights, or an f16 plan.
    use cvt_gpu::ops::matmul::WeightFormat;
    let fmt = match std::env::var("AB_FORMAT").as_deref() {
        Ok("f16") => WeightFormat::F16,
        Ok("half") => WeightFormat::Half,
        _ => WeightFormat::F32,
    };
    let model = cvt_gpu::models::cvt::Model::new_in(gpu.clone(), cfg.clone(), &tensors, cvt_gpu::ops::Act::QuickGelu, fmt)?;
    let plan = model.plan(batch, res, res)?;
    let img = image(batch * res * res * cfg.in_chans);
    plan.forward(&img)?;
    Ok((plan.plan, Box::new(model), 2.0 * cfg.macs(res, res)? * batch as f64 / 1e9))
}

/// Milliseconds of one run: wall clock, or with `AB_KERNELS=a,b,..` the GPU
/// timestamps of the steps whose labels contain one of those strings.
fn measure(plan: &Plan, kernels: &[String]) -> Result<f64> {
    if kernels.is_empty() {
        let t = Instant::now();
        plan.run()?;
        plan.gpu.sync()?;
        return Ok(t.elapsed().as_secs_f64() * 1e3);
    }
    let (steps, _) = plan.profile()?;
    Ok(steps.iter().filter(|s| kernels.iter().any(|k| s.label.contains(k.as_str()))).map(|s| s.ms).sum())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(args.len() >= 2, "usage: ab DIR_A DIR_B [ROUNDS] [gemm M N K | MODEL BATCH [RES] | train MODEL BATCH RES]");
    let rounds: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(30);
    let spec = &args[args.len().min(3)..];
    let mut sides = Vec::new();
    let mut gflop = 0.0;
    for side in &args[..2] {
        let (dir, env) = side.split_once(':').unwrap_or((side, ""));
        for kv in env.split(',').filter(|s| !s.is_empty()) {
            let (key, val) = kv.split_once('=').ok_or_else(|| anyhow::anyhow!("{kv}: expected KEY=VALUE"))?;
            std::env::set_var(key, val);
        }
        std::env::set_var("CVT_GPU_SHADER_DIR", dir);
        let gpu = Gpu::new(&cvt_gpu::gpu::AdapterRequest::default())?;
        let (plan, keep, g) = workload(&gpu, spec)?;
        plan.run()?;
        gflop = g;
        sides.push((plan, keep, Vec::new()));
    }
    let kernels: Vec<String> = std::env::var("AB_KERNELS").map(|v| v.split(',').map(String::from).collect()).unwrap_or_default();
    for r in 0..rounds {
        // ABBA order: whichever side runs second in a round gets no systematic edge.
        for i in if r % 2 == 0 { [0, 1] } else { [1, 0] } {
            let (plan, _, times) = &mut sides[i];
            times.push(measure(plan, &kernels)?);
        }
    }
    let mut ratios: Vec<f64> = (0..rounds).map(|i| sides[0].2[i] / sides[1].2[i]).collect();
    let wins = ratios.iter().filter(|&&r| r > 1.0).count();
    ratios.sort_by(f64::total_cmp);
    for (name, (_, _, times)) in args.iter().zip(sides.iter_mut()) {
        times.sort_by(f64::total_cmp);
        let med = times[times.len() / 2];
        println!("{name}: median {med:.1} ms ({:.1} GFLOP/s), min {:.1} ms", gflop / med * 1e3, times[0]);
    }
    println!("B faster in {wins}/{rounds} rounds; median speed-up of B {:.3}x", ratios[rounds / 2]);
    Ok(())
}
