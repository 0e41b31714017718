//! Timed trials that decide the kernel set and the texture-read mode of an
//! adapter where no setting or cache does (`profile::resolve`).
//!
//! Each candidate is a compiled plan timed best of five interleaved rounds, by
//! GPU timestamps where the adapter has them (so submission and readback
//! overhead, which dominate a small GEMM on a discrete GPU, do not decide),
//! else by wall clock.

use super::{KernelSet, Profile};
use crate::gpu::Gpu;
use crate::graph::{Graph, Plan, Res};
use crate::ops::matmul::{Act, Linear, Out};
use crate::ops::params::mm;
use crate::texread::TexRead;
use anyhow::Result;
use std::sync::Arc;
use std::time::Instant;

/// Seconds of one run of `plan`: the GPU time of its steps, or the wall clock.
fn time_once(plan: &Plan) -> Result<f64> {
    if plan.gpu.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
        let (steps, _) = plan.profile()?;
        return Ok(steps.iter().map(|s| s.ms).sum::<f64>() / 1e3);
    }
    let t = Instant::now();
    plan.run()?;
    plan.gpu.sync()?;
    Ok(t.elapsed().as_secs_f64())
}

/// Best of five interleaved rounds per plan (seconds): the results are cached
/// on disk, so rounds disturbed by other load must not decide them.
fn best_times(plans: &[Plan]) -> Result<Vec<f64>> {
    let mut best = vec![f64::MAX; plans.len()];
    for _ in 0..5 {
        for (plan, b) in plans.iter().zip(best.iter_mut()) {
            *b = b.min(time_once(plan)?);
        }
    }
    Ok(best)
}

fn fastest(times: &[f64]) -> usize {
    times.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)
}

fn trace(on: bool, what: &str, times: &[(String, f64)]) {
    if on {
        for (name, s) in times {
            eprintln!("{what} trial: {name} {:.3} ms", s * 1e3);
        }
    }
}

/// The texture-read mode by timing a fetch-bound kernel both ways (`colsum_part`
/// over a 4 MiB texture: 64 texel fetches per store). It compiles in
/// milliseconds, where a GEMM per mode would add about a second of JIT to the
/// first call on lavapipe; the cost of a texel fetch is what the mode changes.
fn read_trial(gpu: &Arc<Gpu>, set: KernelSet, start: TexRead, trace_on: bool) -> Result<TexRead> {
    if !crate::texread::storage_supported(&gpu.info, &gpu.limits) {
        return Ok(TexRead::Sampled);
    }
    let (rows, cols, parts) = (4096, 256, 64);
    let mut plans = vec![];
    let mut reads = vec![];
    for read in [TexRead::Storage, TexRead::Sampled] {
        let build = || -> Result<Plan> {
            let mut g = Graph::with_profile(gpu.clone(), Profile::for_set(gpu, set, read));
            let (x, y) = (g.pinned("x", rows * cols), g.pinned("y", parts * cols));
            let pipeline = g.pipeline("matmul", "colsum_part", &[("WG_X", 64.0), ("WG_Y", 1.0)])?;
            let xt = g.linear_texture(x, mm::B_TEX as u32);
            let p = crate::ops::matmul::MatmulParams { m: rows as u32, n: cols as u32, splits: parts as u32, ..Default::default() };
            let b = crate::graph::bind([(mm::PARAMS, Res::uniform(&p)), (mm::B_TEX, Res::ActTex(xt)), (mm::C4, Res::Act(y))]);
            g.dispatch("read trial", pipeline, b, crate::graph::grid1d(gpu, (parts * cols / 4).div_ceil(64) as u64), 0.0);
            let plan = g.compile()?;
            plan.run()?;
            gpu.sync()?;
            Ok(plan)
        };
        // A mode the driver rejects is not a candidate.
        if let Ok(plan) = build() {
            plans.push(plan);
            reads.push(read);
        }
    }
    if plans.is_empty() {
        return Ok(start);
    }
    let times = best_times(&plans)?;
    trace(trace_on, "texture read", &reads.iter().zip(&times).map(|(r, t)| (r.name().to_string(), *t)).collect::<Vec<_>>());
    Ok(reads[fastest(&times)])
}

/// Chooses what `forced_*` leaves open: the read mode (`read_trial`), then the
/// kernel set by timing each set's GEMM on a square product (256³ on CPU
/// drivers, where compiling is the trial's cost; 512³ elsewhere, where the
/// product must be long enough to measure).
pub(super) fn run(gpu: &Arc<Gpu>, forced_set: Option<KernelSet>, forced_read: Option<TexRead>, rule_read: TexRead, trace_on: bool) -> Result<(KernelSet, TexRead)> {
    let read = match forced_read {
        Some(r) => r,
        None => read_trial(gpu, forced_set.unwrap_or(KernelSet::Cpu), rule_read, trace_on)?,
    };
    if let Some(set) = forced_set {
        return Ok((set, read));
    }
    let n = if gpu.info.device_type == wgpu::DeviceType::Cpu { 256 } else { 512 };
    let w: Vec<f32> = (0..n * n).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
    // The first run of each compiles its kernel. The CPU set's is the one the
    // model will use on a CPU driver, on the main device; the GPU set's runs on a
    // sibling device from another thread where there is one, so a CPU driver
    // compiles both at once (0.5-0.7 s off the first call on lavapipe).
    let first_run = |gpu: &Arc<Gpu>, set: KernelSet| -> Result<Plan> {
        let l = Linear::with_kind(gpu, "trial", &w, None, n, n, set.matmul())?;
        let mut g = Graph::with_profile(gpu.clone(), Profile::for_set(gpu, set, read));
        let x = g.pinned("x", n * n);
        crate::ops::matmul::linear(&mut g, "trial", x, n, &l, Act::None, Out::New)?;
        let t = Instant::now();
        let plan = g.compile()?;
        plan.run()?;
        gpu.sync()?;
        trace(trace_on, "kernels (first run, compile included)", &[(set.name().to_string(), t.elapsed().as_secs_f64())]);
        Ok(plan)
    };
    let (gpu_set, cpu_set) = match gpu.sibling() {
        Some(side) => std::thread::scope(|s| {
            let gpu_set = s.spawn(|| first_run(&side, KernelSet::Gpu));
            let cpu_set = first_run(gpu, KernelSet::Cpu);
            (gpu_set.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the GPU-set trial panicked"))), cpu_set)
        }),
        None => (first_run(gpu, KernelSet::Gpu), first_run(gpu, KernelSet::Cpu)),
    };
    let sets = [KernelSet::Gpu, KernelSet::Cpu];
    let plans = [gpu_set?, cpu_set?];
    let times = best_times(&plans)?;
    trace(trace_on, "kernels", &sets.iter().zip(&times).map(|(k, t)| (k.name().to_string(), *t)).collect::<Vec<_>>());
    Ok((sets[fastest(&times)], read))
}

/// Whether the adapter's subgroups are the runs of 8 consecutive invocations of
/// a workgroup (lavapipe's SIMD lanes), measured by `subgroup_probe`. Vulkan
/// does not promise any layout, so sharing across 8-lane halves of a workgroup
/// (`ops::matmul::tex_block`) is used only where this holds.
pub(super) fn subgroups_of_8(gpu: &Arc<Gpu>, profile: &Profile) -> bool {
    let probe = || -> Result<bool> {
        if !gpu.subgroups || gpu.info.subgroup_min_size != 8 || gpu.info.subgroup_max_size != 8 {
            return Ok(false);
        }
        let mut g = Graph::with_profile(gpu.clone(), profile.clone());
        let out = g.pinned("subgroup probe", 16);
        let pipeline = g.pipeline("matmul", "subgroup_probe", &[("WG_X", crate::ops::matmul::TWG_X as f64), ("WG_Y", 1.0)])?;
        g.dispatch("subgroup probe", pipeline, crate::graph::bind([(mm::C, Res::Act(out))]), [1, 1, 1], 0.0);
        let plan = g.compile()?;
        plan.run()?;
        Ok(plan.read(out)?.iter().all(|&v| v == 1.0))
    };
    probe().unwrap_or(false)
}
