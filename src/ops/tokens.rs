//! `shaders/tokens.wgsl`: the cls token and token mean-pooling.

use crate::graph::{Graph, Res, TensorId};
use anyhow::Result;
use std::sync::Arc;

const WG: usize = 64;

/// Writes `cls` [C] into token 0 of each image of y [batch, tokens, C].
pub fn cls_fill(g: &mut Graph, label: &str, cls: &Arc<wgpu::Buffer>, y: TensorId, batch: usize, tokens: usize, c: usize) -> Result<()> {
    let pipeline = g.pipeline("tokens", "cls_fill", &[("WG", WG as f64)])?;
    let groups = [(batch * c).div_ceil(WG) as u32, 1, 1];
    g.dispatch(label, pipeline, vec![Res::Buf(cls.clone()), Res::Act(y), Res::Uniform(vec![batch as u32, tokens as u32, c as u32, 0])], groups, 0.0);
    Ok(())
}

/// y [batch, C] = mean over tokens of x [batch, tokens, C].
pub fn mean_tokens(g: &mut Graph, label: &str, x: TensorId, batch: usize, tokens: usize, c: usize) -> Result<TensorId> {
    let y = g.tensor(label.to_string(), batch * c);
    let pipeline = g.pipeline("tokens", "mean_tokens", &[("WG", WG as f64)])?;
    let groups = [(batch * c).div_ceil(WG) as u32, 1, 1];
    g.dispatch(label, pipeline, vec![Res::Act(x), Res::Act(y), Res::Uniform(vec![batch as u32, tokens as u32, c as u32, 0])], groups, (batch * tokens * c) as f64);
    Ok(y)
}

/// Gradient of a cls parameter: out [C] = Σ over images of token 0 of dy [batch, tokens, C].
pub fn cls_grad(g: &mut Graph, label: &str, dy: TensorId, batch: usize, tokens: usize, c: usize, out: &Arc<wgpu::Buffer>) -> Result<()> {
    let pipeline = g.pipeline("tokens", "cls_grad", &[("WG", WG as f64)])?;
    g.dispatch(label, pipeline, vec![Res::Act(dy), Res::Buf(out.clone()), Res::Uniform(vec![batch as u32, tokens as u32, c as u32, 0])], [c.div_ceil(WG) as u32, 1, 1], 0.0);
    Ok(())
}

/// y = a + b elementwise (a new tensor): the out-of-place residual add of training.
pub fn add(g: &mut Graph, label: &str, a: TensorId, b: TensorId) -> Result<TensorId> {
    let y = g.tensor(label.to_string(), g.len(a));
    add_into(g, label, a, b, y)?;
    Ok(y)
}

/// y = a + b elementwise into an existing tensor `y`. On the texture path `y` may
/// be `a` or `b` (the kernel reads texture copies); the buffer path cannot bind
/// one buffer both read-only and writable.
pub fn add_into(g: &mut Graph, label: &str, a: TensorId, b: TensorId, y: TensorId) -> Result<TensorId> {
    let n = g.len(a);
    let textures = n % 4 == 0 && crate::ops::matmul::packs(g);
    anyhow::ensure!(textures || (y != a && y != b), "{label}: an in-place add needs the texture path");
    if textures {
        // In chunks, so the textures stay small beside the activations.
        let pipeline = g.pipeline("tokens", "add4_tex", &[("WG", WG as f64)])?;
        for (i0, m) in crate::ops::gemm::texture_ranges(n / 4, 16) {
            let (at, bt) = (g.linear_texture_range(a, i0, m, 6), g.linear_texture_range(b, i0, m, 7));
            let groups = crate::graph::grid1d(&g.gpu, m.div_ceil(WG) as u64);
            let u = || Res::Unused;
            g.dispatch(label, pipeline.clone(), vec![u(), u(), Res::Uniform(vec![m as u32, i0 as u32, 0, 0]), u(), u(), u(), Res::ActTex(at), Res::ActTex(bt), Res::Act(y)], groups, 4.0 * m as f64);
        }
        return Ok(y);
    }
    let pipeline = g.pipeline("tokens", "add", &[("WG", WG as f64)])?;
    let groups = crate::graph::grid1d(&g.gpu, n.div_ceil(WG) as u64);
    g.dispatch(label, pipeline, vec![Res::Act(a), Res::Act(y), Res::Uniform(vec![n as u32, 0, 0, 0]), Res::Unused, Res::Act(b)], groups, n as f64);
    Ok(y)
}

/// Drop path: y = a + b ⊙ scales[offset + sample], samples of `per_sample` elements.
pub fn add_scaled(g: &mut Graph, label: &str, a: TensorId, b: TensorId, scales: TensorId, per_sample: usize, offset: usize) -> Result<TensorId> {
    let n = g.len(a);
    let y = g.tensor(label.to_string(), n);
    let pipeline = g.pipeline("tokens", "add_scaled", &[("WG", WG as f64)])?;
    let groups = crate::graph::grid1d(&g.gpu, n.div_ceil(WG) as u64);
    let p = vec![n as u32, per_sample as u32, offset as u32, 0];
    g.dispatch(label, pipeline, vec![Res::Act(a), Res::Act(y), Res::Uniform(p), Res::Unused, Res::Act(b), Res::Act(scales)], groups, n as f64);
    Ok(y)
}

/// The backward of a dropped-path branch: y = x ⊙ scales[offset + sample].
pub fn scale_rows(g: &mut Graph, label: &str, x: TensorId, scales: TensorId, per_sample: usize, offset: usize) -> Result<TensorId> {
    let n = g.len(x);
    let y = g.tensor(label.to_string(), n);
    let pipeline = g.pipeline("tokens", "scale_rows", &[("WG", WG as f64)])?;
    let groups = crate::graph::grid1d(&g.gpu, n.div_ceil(WG) as u64);
    let p = vec![n as u32, per_sample as u32, offset as u32, 0];
    g.dispatch(label, pipeline, vec![Res::Act(x), Res::Act(y), Res::Uniform(p), Res::Unused, Res::Unused, Res::Act(scales)], groups, 0.0);
    Ok(y)
}
