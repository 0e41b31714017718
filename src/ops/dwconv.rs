//! `shaders/dwconv.wgsl`: CvT's convolutional projection (depthwise 3x3 + folded
//! BatchNorm) producing the q, k and v token maps in one pass.

use crate::graph::{grid1d, Graph, Res, TensorId};
use crate::gpu::Gpu;
use anyhow::Result;
use std::sync::Arc;

const WG: usize = 64;
pub const BN_EPS: f64 = 1e-5;

/// Eval-mode BatchNorm2d parameters of one projection.
pub struct BatchNorm<'a> {
    pub weight: &'a [f32],
    pub bias: &'a [f32],
    pub mean: &'a [f32],
    pub var: &'a [f32],
}

/// Folded weights: w [3, 9, C] (q, k, v; tap-major so channels are contiguous)
/// and bias [3, C].
pub struct ConvProj {
    pub w: Arc<wgpu::Buffer>,
    pub b: Arc<wgpu::Buffer>,
    pub c: usize,
}

/// Folds BN into one depthwise conv: w' = w·γ/√(σ²+ε), b' = β − μ·γ/√(σ²+ε).
/// Returns ([9, C] weights, [C] bias), computed in f64.
pub fn fold_bn(conv: &[f32], bn: &BatchNorm, c: usize) -> (Vec<f32>, Vec<f32>) {
    let mut w = vec![0f32; 9 * c];
    let mut b = vec![0f32; c];
    for ch in 0..c {
        let s = bn.weight[ch] as f64 / (bn.var[ch] as f64 + BN_EPS).sqrt();
        for t in 0..9 {
            w[t * c + ch] = (conv[ch * 9 + t] as f64 * s) as f32;
        }
        b[ch] = (bn.bias[ch] as f64 - bn.mean[ch] as f64 * s) as f32;
    }
    (w, b)
}

impl ConvProj {
    /// From the q, k, v depthwise weights ([C, 1, 3, 3] each) and their BatchNorms.
    pub fn new(gpu: &Gpu, name: &str, convs: [&[f32]; 3], bns: [BatchNorm; 3], c: usize) -> Result<ConvProj> {
        let mut w = Vec::with_capacity(27 * c);
        let mut b = Vec::with_capacity(3 * c);
        for i in 0..3 {
            let (wi, bi) = fold_bn(convs[i], &bns[i], c);
            w.extend(wi);
            b.extend(bi);
        }
        Ok(ConvProj {
            w: Arc::new(gpu.upload(&format!("{name}.w"), &w)?),
            b: Arc::new(gpu.upload(&format!("{name}.b"), &b)?),
            c,
        })
    }
}

/// Token counts: q keeps the grid (plus cls); k and v use ceil(H/2) x ceil(W/2).
pub fn kv_hw(h: usize, w: usize) -> (usize, usize) {
    (h.div_ceil(2), w.div_ceil(2))
}

/// x [batch, cls + h*w, C] → (q, k, v).
pub fn conv_proj(g: &mut Graph, label: &str, x: TensorId, batch: usize, h: usize, w: usize, cls: usize, p: &ConvProj) -> Result<(TensorId, TensorId, TensorId)> {
    let c = p.c;
    let (hk, wk) = kv_hw(h, w);
    let tq = cls + h * w;
    let tk = cls + hk * wk;
    let q = g.tensor(format!("{label}.q"), batch * tq * c);
    let k = g.tensor(format!("{label}.k"), batch * tk * c);
    let v = g.tensor(format!("{label}.v"), batch * tk * c);
    let total = batch * tq * c;
    let params = [batch, h, w, c, cls, hk, wk, total].map(|v| v as u32).to_vec();
    let pipeline = g.gpu.pipeline("dwconv", "main", &[("WG", WG as f64)])?;
    let groups = grid1d(&g.gpu, total.div_ceil(WG) as u64);
    let flops = 2.0 * 9.0 * (batch * c * (h * w + 2 * hk * wk)) as f64;
    g.dispatch(
        label,
        pipeline,
        vec![Res::Act(x), Res::Buf(p.w.clone()), Res::Buf(p.b.clone()), Res::Act(q), Res::Act(k), Res::Act(v), Res::Uniform(params)],
        groups,
        flops,
    );
    Ok((q, k, v))
}
