//! Per-kernel wall-clock benchmarks at CvT-13's real shapes (224x224, batch 1 by
//! default; CVT_BENCH_BATCH=8 for batch 8). `cargo bench` prints one row per
//! kernel (section `forward-kernels`): shape, median time, GFLOP/s (or GB/s for
//! the memory-bound ones).
//! Then (section `attention-training`) the attention forward + backward of CvT-13 training at 64x64, batch 64,
//! with the probabilities recomputed and saved (`AttnGrad`), in alternation.

use cvt_gpu::gpu::{AdapterRequest, Gpu};
use cvt_gpu::graph::Graph;
use cvt_gpu::ops::attention::{attention, attention_backward, attention_train, AttnGrad, AttnShape};
use cvt_gpu::ops::dwconv::{conv_proj, kv_hw, BatchNorm, ConvProj};
use cvt_gpu::ops::matmul::{conv2d, linear, Out};
use cvt_gpu::ops::rownorm::{layernorm, LayerNorm, RowMap};
use cvt_gpu::ops::{Act, ConvGeom, Linear};
use cvt_gpu::util::Rng;
use std::sync::Arc;
use std::time::Instant;

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal()).collect()
}

/// Times a single-op graph built by `build` (inputs get random data).
fn time(gpu: &Arc<Gpu>, name: &str, shape: &str, iters: usize, build: impl FnOnce(&mut Graph) -> Vec<cvt_gpu::graph::TensorId>) {
    let mut g = Graph::new(gpu.clone());
    let inputs = build(&mut g);
    let lens: Vec<usize> = inputs.iter().map(|&t| g.len(t)).collect();
    let plan = g.compile().unwrap();
    for (i, (&t, &n)) in inputs.iter().zip(&lens).enumerate() {
        plan.write(t, &randn(n, i as u64)).unwrap();
    }
    plan.run().unwrap();
    gpu.sync().unwrap();
    let mut ts: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            plan.run().unwrap();
            gpu.sync().unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ts.sort_by(f64::total_cmp);
    let ms = ts[ts.len() / 2];
    let flops = plan.flops();
    let rate = if flops > 0.0 { format!("{:8.2} GFLOP/s", flops / ms / 1e6) } else { String::from("   (memory-bound)") };
    println!("{name:<22} {shape:<28} {ms:9.2} ms {rate}");
}

fn main() {
    let gpu = Gpu::new(&AdapterRequest::default()).unwrap();
    // `cargo bench --bench kernels -- attention-training` runs that section alone.
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let run = |section: &str| only.is_empty() || only.iter().any(|o| section.contains(o.as_str()));
    if run("forward-kernels") {
        forward_kernels(&gpu);
    }
    if run("attention-training") {
        attention_training(&gpu);
    }
}

fn forward_kernels(gpu: &Arc<Gpu>) {
    let gpu = gpu.clone();
    let b: usize = std::env::var("CVT_BENCH_BATCH").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let iters = 3;
    println!("CvT-13 kernels at 224x224, batch {b}, on {}", gpu.describe());
    let stages = [(56usize, 64usize, 1usize, 0usize), (28, 192, 3, 0), (14, 384, 6, 1)];
    let mut cin = 3;
    let mut hin = 224;
    for (s, &(hw, c, heads, cls)) in stages.iter().enumerate() {
        let t = cls + hw * hw;
        let (k, stride, pad) = if s == 0 { (7, 4, 2) } else { (3, 2, 1) };
        let geom = ConvGeom { batch: b, in_h: hin, in_w: hin, cin, in_tokens: hin * hin, in_tok_off: 0, k, stride, pad };
        let w = Linear::from_conv(&gpu, "embed", &randn(c * cin * k * k, 1), None, c, cin, k, k).unwrap();
        time(&gpu, &format!("s{s} embed conv"), &format!("{hin}²x{cin} → {hw}²x{c}"), iters, |g| {
            let x = g.pinned("x", b * hin * hin * cin);
            conv2d(g, "conv", x, geom, &w).unwrap();
            vec![x]
        });
        let ln = LayerNorm::new(&gpu, "ln", &vec![1.0; c], &vec![0.0; c]).unwrap();
        time(&gpu, &format!("s{s} layernorm"), &format!("{}x{c}", b * t), iters, |g| {
            let x = g.pinned("x", b * t * c);
            layernorm(g, "ln", x, RowMap::dense(b * t), &ln, None).unwrap();
            vec![x]
        });
        let ones = vec![1.0f32; c];
        let zeros = vec![0.0f32; c];
        let conv = randn(9 * c, 2);
        let bn = || BatchNorm { weight: &ones, bias: &zeros, mean: &zeros, var: &ones };
        let proj = ConvProj::new(&gpu, "p", [&conv, &conv, &conv], [bn(), bn(), bn()], c).unwrap();
        time(&gpu, &format!("s{s} conv proj q,k,v"), &format!("{hw}²x{c}"), iters, |g| {
            let x = g.pinned("x", b * t * c);
            conv_proj(g, "proj", x, b, hw, hw, cls, &proj).unwrap();
            vec![x]
        });
        let (kh, kw) = kv_hw(hw, hw);
        let tk = cls + kh * kw;
        for (name, n, kk) in [("proj_q/proj", c, c), ("fc1 (+GELU)", 4 * c, c), ("fc2 (+residual)", c, 4 * c)] {
            let l = Linear::from_torch(&gpu, "l", &randn(n * kk, 3), None, n, kk).unwrap();
            let act = if name.starts_with("fc1") { Act::QuickGelu } else { Act::None };
            time(&gpu, &format!("s{s} {name}"), &format!("{}x{n}x{kk}", b * t), iters, |g| {
                let x = g.pinned("x", b * t * kk);
                linear(g, "mm", x, b * t, &l, act, Out::New).unwrap();
                vec![x]
            });
        }
        let shape = AttnShape { batch: b, tq: t, tkv: tk, c, heads, scale: (c as f32).powf(-0.5) };
        time(&gpu, &format!("s{s} attention"), &format!("{t}x{tk}, {heads} heads"), iters, |g| {
            let q = g.pinned("q", b * t * c);
            let k = g.pinned("k", b * tk * c);
            let v = g.pinned("v", b * tk * c);
            attention(g, "attn", q, k, v, shape).unwrap();
            vec![q, k, v]
        });
        cin = c;
        hin = hw;
    }
}

/// Forward + backward of each stage's attention in CvT-13 training at 64x64,
/// batch 64 (grids 16/8/4, keys and values at 8/4/2, cls in stage 2), with the
/// probabilities recomputed or saved; three alternating rounds, since this
/// machine's speed drifts.
fn attention_training(gpu: &Arc<Gpu>) {
    let b = 64;
    println!("CvT-13 attention forward + backward, training at 64x64, batch {b}");
    for round in 0..3 {
        for (s, &(hw, c, heads, cls)) in [(16usize, 64usize, 1usize, 0usize), (8, 192, 3, 0), (4, 384, 6, 1)].iter().enumerate() {
            let (t, tk) = (cls + hw * hw, cls + (hw / 2) * (hw / 2));
            let shape = AttnShape { batch: b, tq: t, tkv: tk, c, heads, scale: (c as f32).powf(-0.5) };
            for grad in [AttnGrad::Recompute, AttnGrad::Saved] {
                time(gpu, &format!("r{round} s{s} {grad:?}"), &format!("{t}x{tk}, {heads} heads"), 3, |g| {
                    let (q, k, v, dout) = (g.pinned("q", b * t * c), g.pinned("k", b * tk * c), g.pinned("v", b * tk * c), g.pinned("dout", b * t * c));
                    let kind = g.profile.matmul();
                    let (o, saved) = attention_train(g, "attn", (q, k, v), shape, grad, kind).unwrap();
                    attention_backward(g, "attn", (q, k, v, o), saved, dout, shape).unwrap();
                    vec![q, k, v, dout]
                });
            }
        }
    }
}
