//! `cvt-gpu bench`: forward latency, throughput and achieved GFLOP/s against the
//! adapter's own GEMM ceiling measured with the engine's matmul kernel.

use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::Instant;

use crate::gpu::Gpu;
use crate::graph::Graph;
use crate::models::{Arch, Net, TrainNet};
use crate::ops::matmul::{linear, Out, WeightFormat};
use crate::ops::{Act, Linear};
use crate::util::Rng;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// cvt-13, cvt-21, cvt-w24 or a JSON config (random weights).
    #[arg(long, default_value = "cvt-13")]
    pub model: String,
    /// Input resolution (default: the model's).
    #[arg(long)]
    pub res: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Timed iterations after one warm-up.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Measure only the GEMM ceiling (best matmul rate at 1024x1024x1024).
    #[arg(long)]
    pub gemm: bool,
    /// With --gemm: the product's shape instead of 1024³, as M,N,K (e.g. CvT-13's
    /// stage-2 MLP at 224, batch 64: 12608,1536,384).
    #[arg(long, value_name = "M,N,K", requires = "gemm")]
    pub shape: Option<String>,
    /// infer: a forward; train: forward + backward + AdamW update.
    #[arg(long, value_enum, default_value = "infer")]
    pub mode: Mode,
    /// Inference in f16: weights, and activations where the adapter has
    /// shader-f16 (f32 arithmetic); reports the largest logit difference against
    /// f32 on the same input.
    #[arg(long)]
    pub f16: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Build the plan and list every dispatch without running it: label,
    /// workgroups (x, y, z), workgroup size, FLOPs and bytes bound; and the
    /// heavy dispatches (1% or more of the FLOPs or bytes) that launch fewer than
    /// 132 workgroups (one per SM of an H100) or workgroups under 64 invocations.
    #[arg(long)]
    pub plan_only: bool,
}

/// What `--plan-only` prints.
#[derive(serde::Serialize)]
struct PlanReport {
    model: String,
    mode: Mode,
    res: usize,
    batch: usize,
    kernels: &'static str,
    adapter: String,
    total_flops: f64,
    total_bytes: u64,
    dispatches: Vec<crate::graph::Launch>,
    /// Dispatches with at least 1% of the FLOPs or bytes and fewer than
    /// `MIN_FILL_GROUPS` workgroups or workgroups of fewer than 64 invocations.
    underfilled: Vec<crate::graph::Launch>,
}

/// Workgroups a heavy dispatch should launch at least: one per SM of an H100.
pub const MIN_FILL_GROUPS: u64 = 132;

fn plan_only(gpu: Arc<Gpu>, a: &BenchArgs, arch: &Arch, res: usize) -> Result<()> {
    let tensors = arch.random_tensors(1);
    let launches = if a.mode == Mode::Train {
        let model = TrainNet::new(gpu.clone(), arch, &tensors, Act::QuickGelu)?;
        let step = model.step_plan(a.batch, res)?;
        let opt = model.optimizer(crate::ops::optim::AdamW::default())?;
        let mut l = step.plan.launches();
        l.extend(opt.plan.launches());
        l
    } else {
        let model = Net::new(gpu.clone(), arch, &tensors, Act::QuickGelu, WeightFormat::from_flag(&gpu, a.f16))?;
        model.plan(a.batch, res, res)?.plan.launches()
    };
    let total_flops: f64 = launches.iter().map(|l| l.flops).sum();
    let total_bytes: u64 = launches.iter().map(|l| l.bytes).sum();
    let heavy = |l: &crate::graph::Launch| l.flops >= 0.01 * total_flops || l.bytes as f64 >= 0.01 * total_bytes as f64;
    let underfilled: Vec<_> = launches.iter().filter(|l| heavy(l) && (l.groups() < MIN_FILL_GROUPS || l.invocations() < 64)).cloned().collect();
    let r = PlanReport {
        model: arch.name().to_string(),
        mode: a.mode,
        res,
        batch: a.batch,
        kernels: gpu.profile().kernels.name(),
        adapter: gpu.describe(),
        total_flops,
        total_bytes,
        dispatches: launches,
        underfilled,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{} {:?} @{}x{} batch {}: {} dispatches, {:.1} GFLOP, {:.2} GB bound; {} kernel set on {}",
        r.model,
        r.mode,
        res,
        res,
        a.batch,
        r.dispatches.len(),
        total_flops / 1e9,
        total_bytes as f64 / 1e9,
        r.kernels,
        r.adapter
    );
    let mut heaviest: Vec<&crate::graph::Launch> = r.dispatches.iter().collect();
    heaviest.sort_by(|x, y| y.flops.total_cmp(&x.flops).then(y.bytes.cmp(&x.bytes)));
    println!("  {:<44} {:>18} {:>12} {:>9} {:>9}", "heaviest dispatches", "workgroups", "size", "GFLOP", "MB");
    let row =
        |l: &crate::graph::Launch| format!("{:<44} {:>18} {:>12} {:>9.2} {:>9.1}", l.label, format!("{:?}", l.workgroups), format!("{:?}", l.workgroup_size), l.flops / 1e9, l.bytes as f64 / 1e6);
    for l in heaviest.iter().take(10) {
        println!("  {}", row(l));
    }
    if r.underfilled.is_empty() {
        println!("  every dispatch with 1% or more of the FLOPs or bytes launches at least {MIN_FILL_GROUPS} workgroups of 64 or more invocations");
    } else {
        println!("  {} heavy dispatches launch fewer than {MIN_FILL_GROUPS} workgroups or workgroups under 64 invocations:", r.underfilled.len());
        for l in &r.underfilled {
            println!("  {}", row(l));
        }
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Infer,
    Train,
}

#[derive(serde::Serialize, Debug)]
pub struct GemmResult {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub median_ms: f64,
    pub gflops_per_s: f64,
    /// The kernel set that ran it.
    pub kernels: &'static str,
    /// Median GPU time of the product by timestamp queries, where the adapter has
    /// them (no submission or readback), and the rate it gives.
    pub gpu_ms: Option<f64>,
    pub gpu_gflops_per_s: Option<f64>,
}

#[derive(serde::Serialize, Debug)]
pub struct BenchResult {
    pub model: String,
    pub res: usize,
    pub batch: usize,
    pub mode: Mode,
    pub median_ms: f64,
    pub min_ms: f64,
    pub img_per_s: f64,
    pub gflop_per_image: f64,
    pub gflops_per_s: f64,
    /// The engine's 1024³ GEMM rate: median of runs interleaved with the timed ones.
    pub ceiling_gflops_per_s: f64,
    pub ratio_to_ceiling: f64,
    pub weight_bytes: u64,
    pub activation_bytes: u64,
    /// Weights + activation slots + plan textures: every GPU buffer the run holds.
    pub peak_memory_bytes: u64,
    /// The most activation bytes alive at one point of the forward (a lower bound for any plan).
    pub max_live_activation_bytes: u64,
    /// peak_memory_bytes / (weight_bytes + max_live_activation_bytes).
    pub peak_over_weights_plus_live: f64,
    /// Weights stored in f16 (`--f16`).
    pub f16: bool,
    /// Activations and textures in f16 too (`--f16` on adapters with shader-f16).
    pub f16_activations: bool,
    /// With `--f16`: its logits against the f32 model on the same input.
    pub f16_vs_f32: Option<F16Difference>,
    /// The variant trial (`tune_ms`), plan, pipeline compiles and first forward;
    /// the weight upload (`upload_ms`) is not included.
    pub first_call_ms: f64,
    /// The adapter's timed matmul-variant trial in this run (near 0 when cached).
    pub tune_ms: f64,
    pub upload_ms: f64,
    pub dispatches: usize,
    pub texture_copies: usize,
    pub matmul_variant: crate::gpu::MatmulKind,
    /// How kernels read textures on this adapter (`texread`).
    pub texture_read: crate::texread::TexRead,
    pub adapter: String,
    pub timing: &'static str,
    pub kernel_timing: crate::graph::Timing,
    pub kernels: Vec<KernelTime>,
}

/// An f16 model against the f32 one: the largest logit difference, the largest
/// f32 logit magnitude, and how often the top-1 class agrees.
#[derive(serde::Serialize, Debug)]
pub struct F16Difference {
    pub max_abs_logit_diff: f64,
    pub max_abs_logit: f64,
    pub top1_agreement: f64,
}

fn f16_difference(gpu: &Arc<Gpu>, arch: &Arch, tensors: &std::collections::HashMap<String, crate::models::Tensor>, res: usize, img: &[f32], logits: &[f32]) -> Result<F16Difference> {
    let k = arch.num_classes();
    let reference = Net::new(gpu.clone(), arch, tensors, Act::QuickGelu, WeightFormat::F32)?;
    let (want, _) = reference.plan(logits.len() / k, res, res)?.forward(img)?;
    let top1 = |l: &[f32]| -> Vec<usize> { l.chunks(k).map(|r| (0..r.len()).max_by(|&i, &j| r[i].total_cmp(&r[j])).unwrap_or(0)).collect() };
    let (a, b) = (top1(logits), top1(&want));
    Ok(F16Difference {
        max_abs_logit_diff: logits.iter().zip(&want).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max),
        max_abs_logit: want.iter().map(|v| v.abs() as f64).fold(0.0, f64::max),
        top1_agreement: a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / a.len().max(1) as f64,
    })
}

/// Times `iters` runs of `f` (median and min ms, as `time_runs`), each followed
/// by one run of the 1024³ GEMM timed apart, and returns the GEMM's median rate in
/// GFLOP/s too: this host's speed drifts up to 2x within minutes, so the ceiling a
/// run is compared with is measured in the same minutes, interleaved with it.
fn time_with_ceiling(gpu: &Arc<Gpu>, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64, f64)> {
    let n = 1024;
    let ceiling = gemm_plan(gpu, n, n, n)?;
    ceiling.run()?;
    gpu.sync()?;
    let (mut run_ms, mut gemm_ms) = (vec![], vec![]);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        run_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        ceiling.run()?;
        gpu.sync()?;
        gemm_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    run_ms.sort_by(f64::total_cmp);
    gemm_ms.sort_by(f64::total_cmp);
    Ok((run_ms[run_ms.len() / 2], run_ms[0], 2.0 * (n * n * n) as f64 / gemm_ms[gemm_ms.len() / 2] / 1e6))
}

fn time_runs(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    let mut times = vec![];
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[0]))
}

/// Rate of the engine's matmul on an m x n x k problem (random data).
pub fn gemm(gpu: &Arc<Gpu>, m: usize, n: usize, k: usize, iters: usize) -> Result<GemmResult> {
    let plan = gemm_plan(gpu, m, n, k)?;
    plan.run()?;
    gpu.sync()?;
    let (median, _) = time_runs(iters, || {
        plan.run()?;
        gpu.sync()
    })?;
    let flop = 2.0 * (m * n * k) as f64;
    let mut gpu_ms = None;
    if gpu.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
        let mut t = vec![];
        for _ in 0..iters.max(3) {
            let (steps, _) = plan.profile()?;
            t.push(steps.iter().map(|s| s.ms).sum::<f64>());
        }
        t.sort_by(f64::total_cmp);
        gpu_ms = Some(t[t.len() / 2]);
    }
    let kernels = gpu.profile().kernels.name();
    Ok(GemmResult { m, n, k, median_ms: median, gflops_per_s: flop / median / 1e6, kernels, gpu_ms, gpu_gflops_per_s: gpu_ms.map(|ms| flop / ms / 1e6) })
}

/// The plan `gemm` times: [m, k] random input times a random [k, n] weight, loaded.
pub fn gemm_plan(gpu: &Arc<Gpu>, m: usize, n: usize, k: usize) -> Result<crate::graph::Plan> {
    let mut rng = Rng::new(7);
    let w: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
    let l = Linear::from_torch(gpu, "gemm", &w, None, n, k)?;
    let mut g = Graph::new(gpu.clone());
    let a = g.pinned("a", m * k);
    linear(&mut g, "gemm", a, m, &l, Act::None, Out::New)?;
    let plan = g.compile()?;
    let data: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
    plan.write(a, &data)?;
    Ok(plan)
}

pub fn run(gpu: Arc<Gpu>, a: &BenchArgs) -> Result<()> {
    if a.f16 && (a.gemm || a.mode == Mode::Train) {
        anyhow::bail!("--f16 applies to inference; training and --gemm use f32");
    }
    anyhow::ensure!(a.iters >= 1, "--iters {}: must be at least 1", a.iters);
    anyhow::ensure!((1..=1 << 16).contains(&a.batch), "--batch {}: must be in 1..=65536", a.batch);
    if a.gemm {
        let (m, n, k) = match &a.shape {
            None => (1024, 1024, 1024),
            Some(s) => {
                let v: Vec<usize> =
                    s.split(',').map(|x| x.trim().parse::<usize>()).collect::<std::result::Result<_, _>>().map_err(|_| anyhow::anyhow!("--shape {s}: expected M,N,K (three positive integers)"))?;
                anyhow::ensure!(v.len() == 3 && v.iter().all(|&x| (1..=1 << 20).contains(&x)), "--shape {s}: expected M,N,K, each in 1..=1048576");
                (v[0], v[1], v[2])
            }
        };
        let r = gemm(&gpu, m, n, k, a.iters.max(3))?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            let gpu_time = r.gpu_ms.map_or(String::new(), |ms| format!("; GPU time {ms:.3} ms, {:.1} GFLOP/s", r.gpu_gflops_per_s.unwrap_or(0.0)));
            println!("{}: matmul {m}x{n}x{k} ({} kernels) {:.1} ms wall clock, {:.1} GFLOP/s{gpu_time}", gpu.describe(), r.kernels, r.median_ms, r.gflops_per_s);
        }
        return Ok(());
    }
    let arch = Arch::by_name(&a.model)?;
    let res = a.res.unwrap_or(arch.image_size());
    crate::models::cvt::check_resolution(res).context("--res")?;
    arch.check_res(res)?;
    if a.plan_only {
        return plan_only(gpu, a, &arch, res);
    }
    if a.mode == Mode::Train {
        return train(gpu, a, &arch, res);
    }
    // The first call as a user meets it, before anything else has compiled a
    // kernel: the adapter's variant trial (skipped when cached), then the plan,
    // its pipelines (CPU drivers compile at first dispatch) and the first forward.
    let t0 = Instant::now();
    gpu.profile().matmul();
    let tune_ms = t0.elapsed().as_secs_f64() * 1e3;
    let tensors = arch.random_tensors(1);
    let t0 = Instant::now();
    let fmt = WeightFormat::from_flag(&gpu, a.f16);
    let model = Net::new(gpu.clone(), &arch, &tensors, Act::QuickGelu, fmt)?;
    let upload_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    let plan = model.plan(a.batch, res, res)?;
    let mut rng = Rng::new(3);
    let img: Vec<f32> = (0..a.batch * res * res * arch.in_chans()).map(|_| rng.normal()).collect();
    let (logits, _) = plan.forward(&img)?;
    let first_call_ms = tune_ms + t1.elapsed().as_secs_f64() * 1e3;
    let f16_vs_f32 = if a.f16 { Some(f16_difference(&gpu, &arch, &tensors, res, &img, &logits)?) } else { None };
    let (median, min, ceiling) = time_with_ceiling(&gpu, a.iters, || {
        plan.run()?;
        gpu.sync()
    })?;
    let (kernels, kernel_timing) = kernel_profile(&[&plan.plan])?;
    let gflop = arch.gflop(res)?;
    let (dispatches, texture_copies) = plan.plan.counts();
    let rate = gflop * a.batch as f64 / (median / 1e3);
    let r = BenchResult {
        model: arch.name().to_string(),
        res,
        batch: a.batch,
        mode: Mode::Infer,
        median_ms: median,
        min_ms: min,
        img_per_s: a.batch as f64 / (median / 1e3),
        gflop_per_image: gflop,
        gflops_per_s: rate,
        ceiling_gflops_per_s: ceiling,
        ratio_to_ceiling: rate / ceiling,
        weight_bytes: model.weight_bytes(),
        activation_bytes: plan.plan.activation_bytes,
        peak_memory_bytes: model.weight_bytes() + plan.plan.activation_bytes + plan.plan.texture_bytes,
        max_live_activation_bytes: plan.plan.max_live_bytes,
        peak_over_weights_plus_live: (model.weight_bytes() + plan.plan.activation_bytes + plan.plan.texture_bytes) as f64 / (model.weight_bytes() + plan.plan.max_live_bytes) as f64,
        f16: a.f16,
        f16_activations: model.half(),
        f16_vs_f32,
        first_call_ms,
        tune_ms,
        upload_ms,
        dispatches,
        texture_copies,
        matmul_variant: gpu.profile().matmul(),
        texture_read: gpu.profile().texture_read,
        adapter: gpu.describe(),
        timing: "wall clock, submit to completion",
        kernel_timing,
        kernels,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{} @{}x{} batch {} on {}", r.model, res, res, a.batch, r.adapter);
        println!("  latency   median {:.1} ms, min {:.1} ms ({} iterations)", median, min, a.iters);
        println!("  throughput {:.2} img/s, {:.1} GFLOP/s ({:.2} GFLOP/image)", r.img_per_s, rate, gflop);
        println!("  ceiling   {:.1} GFLOP/s (matmul 1024^3, median of runs interleaved with the model's) -> {:.0}% of it", ceiling, 100.0 * r.ratio_to_ceiling);
        let mib = |b: u64| b as f64 / 1048576.0;
        println!(
            "  memory    weights {:.1} MiB, activations {:.1} MiB (largest live set {:.1} MiB; unshared would be {:.1} MiB), textures {:.1} MiB",
            mib(r.weight_bytes),
            mib(r.activation_bytes),
            mib(r.max_live_activation_bytes),
            mib(plan.plan.unshared_bytes),
            mib(plan.plan.texture_bytes)
        );
        println!("            peak {:.1} MiB = {:.2}x weights + largest live set", mib(r.peak_memory_bytes), r.peak_over_weights_plus_live);
        if let Some(d) = &r.f16_vs_f32 {
            println!(
                "  f16       {} in f16: logits within {:.2e} of f32 (largest |logit| {:.2}), top-1 agrees on {:.0}%",
                if r.f16_activations { "weights and activations" } else { "weights (no shader-f16 for activations)" },
                d.max_abs_logit_diff,
                d.max_abs_logit,
                100.0 * d.top1_agreement
            );
        }
        println!("  first call {:.0} ms (variant trial {:.0} ms + plan + pipelines + first run; weights upload {:.0} ms)", first_call_ms, tune_ms, upload_ms);
        println!("  schedule  {} dispatches, {} texture copies per forward; {} kernel set, {} texture reads", dispatches, texture_copies, gpu.profile().kernels.name(), r.texture_read.name());
        print_kernels(&r.kernels, r.kernel_timing, 20);
    }
    Ok(())
}

#[derive(serde::Serialize, Debug)]
pub struct TrainBench {
    pub model: String,
    pub res: usize,
    pub batch: usize,
    pub mode: Mode,
    pub median_ms: f64,
    pub min_ms: f64,
    pub img_per_s: f64,
    pub gflop_per_image: f64,
    pub gflops_per_s: f64,
    /// The engine's 1024³ GEMM rate: median of runs interleaved with the timed ones.
    pub ceiling_gflops_per_s: f64,
    pub ratio_to_ceiling: f64,
    pub weight_bytes: u64,
    pub activation_bytes: u64,
    /// Parameters, gradients, AdamW moments, activation slots and plan textures.
    pub peak_memory_bytes: u64,
    pub first_call_ms: f64,
    pub adapter: String,
    pub timing: &'static str,
    pub kernel_timing: crate::graph::Timing,
    pub kernels: Vec<KernelTime>,
}

/// Training step rate: forward + backward + AdamW on random data and weights.
fn train(gpu: Arc<Gpu>, a: &BenchArgs, arch: &Arch, res: usize) -> Result<()> {
    let t1 = Instant::now();
    let model = TrainNet::new(gpu.clone(), arch, &arch.random_tensors(1), Act::QuickGelu)?;
    let step = model.step_plan(a.batch, res)?;
    let params: usize = model.params().iter().map(|p| p.len).sum();
    let mut opt = model.optimizer(crate::ops::optim::AdamW::default())?;
    let mut rng = Rng::new(3);
    let img: Vec<f32> = (0..a.batch * res * res * arch.in_chans()).map(|_| rng.normal()).collect();
    let k = arch.num_classes();
    let targets: Vec<f32> = (0..a.batch * k).map(|i| ((i % k) == (i / k) % k) as u8 as f32).collect();
    step.run(&img, &targets)?;
    opt.update(1e-4)?;
    gpu.sync()?;
    let first_call_ms = t1.elapsed().as_secs_f64() * 1e3;
    let (median, min, ceiling) = time_with_ceiling(&gpu, a.iters, || {
        step.run(&img, &targets)?;
        opt.update(1e-4)?;
        gpu.sync()
    })?;
    let (kernels, kernel_timing) = kernel_profile(&[&step.plan, &opt.plan])?;
    // Forward + backward ≈ 3 × the forward's FLOPs (the convention PyTorch's FlopCounter gives).
    let gflop = 3.0 * arch.gflop(res)?;
    let rate = gflop * a.batch as f64 / (median / 1e3);
    let r = TrainBench {
        model: arch.name().to_string(),
        res,
        batch: a.batch,
        mode: Mode::Train,
        median_ms: median,
        min_ms: min,
        img_per_s: a.batch as f64 / (median / 1e3),
        gflop_per_image: gflop,
        gflops_per_s: rate,
        ceiling_gflops_per_s: ceiling,
        ratio_to_ceiling: rate / ceiling,
        weight_bytes: 4 * params as u64,
        activation_bytes: step.plan.activation_bytes,
        peak_memory_bytes: 16 * params as u64 + step.plan.activation_bytes + step.plan.texture_bytes + opt.plan.activation_bytes,
        first_call_ms,
        adapter: gpu.describe(),
        timing: "wall clock per step (forward, backward, AdamW), loss read back",
        kernel_timing,
        kernels,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{} training @{}x{} batch {} on {}", r.model, res, res, a.batch, r.adapter);
        println!("  step      median {:.1} ms -> {:.2} img/s", median, r.img_per_s);
        println!("  rate      {:.2} GFLOP/s ({:.2} GFLOP/image fwd+bwd), {:.0}% of the {:.1} GFLOP/s matmul ceiling", rate, gflop, 100.0 * r.ratio_to_ceiling, ceiling);
        println!(
            "  memory    activations {:.1} MiB, peak {:.1} MiB (parameters, gradients, AdamW moments, activations, textures); first step {:.0} ms",
            r.activation_bytes as f64 / 1048576.0,
            r.peak_memory_bytes as f64 / 1048576.0,
            first_call_ms
        );
        print_kernels(&r.kernels, r.kernel_timing, 20);
    }
    Ok(())
}

/// One kernel family's share of a run: the steps whose labels agree once block
/// indices are dropped ("stage1.blocks.0.fc1" and "stage1.blocks.1.fc1" are
/// "stage1.fc1").
#[derive(serde::Serialize, Debug, Clone)]
pub struct KernelTime {
    pub name: String,
    pub steps: usize,
    pub ms: f64,
    pub share: f64,
    pub gflops_per_s: f64,
    /// Bytes of the bound buffers per ms: a traffic estimate (each binding read or written once).
    pub gb_per_s: f64,
    /// Fewest and most workgroups one of the family's dispatches launches, and
    /// the invocations per workgroup of its first.
    pub workgroups: [u64; 2],
    pub workgroup_size: u64,
}

/// Times every step of `plans` once (`Plan::profile`) and groups by kernel family, largest first.
/// One kernel family's totals in `kernel_profile`.
#[derive(Default)]
struct Family {
    name: String,
    ms: f64,
    flops: f64,
    bytes: u64,
    steps: usize,
    /// Fewest and most workgroups of its dispatches, and the first's invocations.
    workgroups: Option<[u64; 2]>,
    invocations: u64,
}

pub fn kernel_profile(plans: &[&crate::graph::Plan]) -> Result<(Vec<KernelTime>, crate::graph::Timing)> {
    let mut families: Vec<Family> = vec![];
    let mut timing = crate::graph::Timing::GpuTimestamps;
    for p in plans {
        let (steps, t) = p.profile()?;
        timing = t;
        for s in steps {
            let key = if s.label.starts_with("adamw ") {
                "adamw (all parameters)".to_string()
            } else if s.label.ends_with(".pack") {
                // Operand packing for the texture GEMM, per stage.
                format!("{}.pack (GEMM operands)", s.label.split('.').next().unwrap_or(""))
            } else {
                s.label.split('.').filter(|part| part.parse::<usize>().is_err() && *part != "blocks").collect::<Vec<_>>().join(".")
            };
            let i = families.iter().position(|f| f.name == key).unwrap_or_else(|| {
                families.push(Family { name: key, ..Default::default() });
                families.len() - 1
            });
            let f = &mut families[i];
            f.ms += s.ms;
            f.flops += s.flops;
            f.bytes += s.bytes;
            f.steps += 1;
            if s.workgroups > 0 {
                f.workgroups = Some(f.workgroups.map_or([s.workgroups; 2], |[lo, hi]| [lo.min(s.workgroups), hi.max(s.workgroups)]));
                if f.invocations == 0 {
                    f.invocations = s.invocations;
                }
            }
        }
    }
    let total: f64 = families.iter().map(|f| f.ms).sum();
    families.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    let out = families
        .into_iter()
        .map(|f| KernelTime {
            share: f.ms / total.max(1e-9),
            gflops_per_s: if f.ms > 0.0 { f.flops / f.ms / 1e6 } else { 0.0 },
            gb_per_s: if f.ms > 0.0 { f.bytes as f64 / f.ms / 1e6 } else { 0.0 },
            workgroups: f.workgroups.unwrap_or([0, 0]),
            workgroup_size: f.invocations,
            name: f.name,
            steps: f.steps,
            ms: f.ms,
        })
        .collect();
    Ok((out, timing))
}

/// The per-kernel table (largest `rows` families).
pub fn print_kernels(k: &[KernelTime], timing: crate::graph::Timing, rows: usize) {
    let how = match timing {
        crate::graph::Timing::GpuTimestamps => "GPU timestamps",
        crate::graph::Timing::WallClock => "wall clock, each step alone (no timestamp queries)",
    };
    println!("  kernels   ({how}; {} families, largest first)", k.len());
    println!("    {:<36} {:>5} {:>9} {:>6} {:>8} {:>7} {:>16}", "kernel", "steps", "ms", "share", "GFLOP/s", "GB/s", "workgroups");
    for x in k.iter().take(rows) {
        let wg = match x.workgroups {
            [0, 0] => "-".to_string(),
            [a, b] if a == b => format!("{a} x {}", x.workgroup_size),
            [a, b] => format!("{a}-{b} x {}", x.workgroup_size),
        };
        println!("    {:<36} {:>5} {:>9.2} {:>5.1}% {:>8.2} {:>7.2} {:>16}", x.name, x.steps, x.ms, 100.0 * x.share, x.gflops_per_s, x.gb_per_s, wg);
    }
    let total: f64 = k.iter().map(|x| x.ms).sum();
    println!("    {:<36} {:>5} {:>9.2}", "total", k.iter().map(|x| x.steps).sum::<usize>(), total);
}
