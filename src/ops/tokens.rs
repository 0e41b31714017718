//! `shaders/tokens.wgsl`: the cls token and token mean-pooling.

use crate::graph::{bind, Graph, Res, TensorId};
use crate::ops::params::tk;
use anyhow::Result;
use std::sync::Arc;

const WG: usize = 64;

crate::kernel_params! {
/// `tokens.wgsl`'s `Params`, field by field.
pub struct TokParams for "tokens" "Params" {
    /// The map's shape (cls_fill, mean_tokens, cls_grad).
    pub b: u32,
    pub t: u32,
    pub c: u32,
    /// Elements (vec4s in add4_tex) of an element-wise pass.
    pub n: u32,
    /// add4_tex: the first vec4 of its chunk.
    pub chunk_off: u32,
    /// Drop path: elements per sample, and the dispatch's first sample in `scales`.
    pub per_sample: u32,
    pub scale_off: u32,
    pub _pad: u32,
}
}

crate::kernel_params! {
/// `tokens.wgsl`'s `GatherParams`: `gather_rows` copies rows
/// (r / group)·stride + off + r % group of src densely.
pub struct GatherParams for "tokens" "GatherParams" {
    pub rows: u32,
    pub c: u32,
    pub group: u32,
    pub stride: u32,
    pub off: u32,
    pub _p0: u32,
    pub _p1: u32,
    pub _p2: u32,
}
}

fn map_params(batch: usize, tokens: usize, c: usize) -> Res {
    Res::uniform(&TokParams { b: batch as u32, t: tokens as u32, c: c as u32, ..Default::default() })
}

/// Params of an element-wise pass over n elements.
fn el_params(n: usize) -> TokParams {
    TokParams { n: n as u32, ..Default::default() }
}

/// Writes `cls` [C] into token 0 of each image of y [batch, tokens, C].
pub fn cls_fill(g: &mut Graph, label: &str, cls: &Arc<wgpu::Buffer>, y: TensorId, batch: usize, tokens: usize, c: usize) -> Result<()> {
    let pipeline = g.pipeline("tokens", "cls_fill", &[("WG", WG as f64)])?;
    let groups = [(batch * c).div_ceil(WG) as u32, 1, 1];
    g.dispatch(label, pipeline, bind([(tk::SRC, Res::Buf(cls.clone())), (tk::Y, Res::Act(y)), (tk::PARAMS, map_params(batch, tokens, c))]), groups, 0.0);
    Ok(())
}

/// y [batch, C] = mean over tokens of x [batch, tokens, C].
pub fn mean_tokens(g: &mut Graph, label: &str, x: TensorId, batch: usize, tokens: usize, c: usize) -> Result<TensorId> {
    let y = g.tensor(label.to_string(), batch * c);
    let pipeline = g.pipeline("tokens", "mean_tokens", &[("WG", WG as f64)])?;
    let groups = [(batch * c).div_ceil(WG) as u32, 1, 1];
    g.dispatch(label, pipeline, bind([(tk::SRC, Res::Act(x)), (tk::Y, Res::Act(y)), (tk::PARAMS, map_params(batch, tokens, c))]), groups, (batch * tokens * c) as f64);
    Ok(y)
}

/// Gradient of a cls parameter: out [C] = Σ over images of token 0 of dy [batch, tokens, C].
pub fn cls_grad(g: &mut Graph, label: &str, dy: TensorId, batch: usize, tokens: usize, c: usize, out: &Arc<wgpu::Buffer>) -> Result<()> {
    let pipeline = g.pipeline("tokens", "cls_grad", &[("WG", WG as f64)])?;
    g.dispatch(label, pipeline, bind([(tk::SRC, Res::Act(dy)), (tk::Y, Res::Buf(out.clone())), (tk::PARAMS, map_params(batch, tokens, c))]), [c.div_ceil(WG) as u32, 1, 1], 0.0);
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
            let (at, bt) = (g.linear_texture_range(a, i0, m, tk::A_TEX as u32), g.linear_texture_range(b, i0, m, tk::B_TEX as u32));
            let groups = crate::graph::grid1d(&g.gpu, m.div_ceil(WG) as u64);
            let p = TokParams { chunk_off: i0 as u32, ..el_params(m) };
            g.dispatch(label, pipeline.clone(), bind([(tk::PARAMS, Res::uniform(&p)), (tk::A_TEX, Res::ActTex(at)), (tk::B_TEX, Res::ActTex(bt)), (tk::Y4, Res::Act(y))]), groups, 4.0 * m as f64);
        }
        return Ok(y);
    }
    let pipeline = g.pipeline("tokens", "add", &[("WG", WG as f64)])?;
    let groups = crate::graph::grid1d(&g.gpu, n.div_ceil(WG) as u64);
    g.dispatch(label, pipeline, bind([(tk::SRC, Res::Act(a)), (tk::Y, Res::Act(y)), (tk::PARAMS, Res::uniform(&el_params(n))), (tk::OTHER, Res::Act(b))]), groups, n as f64);
    Ok(y)
}

/// Drop path: y = a + b ⊙ scales[offset + sample], samples of `per_sample` elements.
pub fn add_scaled(g: &mut Graph, label: &str, a: TensorId, b: TensorId, scales: TensorId, per_sample: usize, offset: usize) -> Result<TensorId> {
    let n = g.len(a);
    let y = g.tensor(label.to_string(), n);
    let pipeline = g.pipeline("tokens", "add_scaled", &[("WG", WG as f64)])?;
    let groups = crate::graph::grid1d(&g.gpu, n.div_ceil(WG) as u64);
    let p = Res::uniform(&TokParams { per_sample: per_sample as u32, scale_off: offset as u32, ..el_params(n) });
    g.dispatch(label, pipeline, bind([(tk::SRC, Res::Act(a)), (tk::Y, Res::Act(y)), (tk::PARAMS, p), (tk::OTHER, Res::Act(b)), (tk::SCALES, Res::Act(scales))]), groups, n as f64);
    Ok(y)
}

/// The backward of a dropped-path branch: y = x ⊙ scales[offset + sample].
pub fn scale_rows(g: &mut Graph, label: &str, x: TensorId, scales: TensorId, per_sample: usize, offset: usize) -> Result<TensorId> {
    let n = g.len(x);
    let y = g.tensor(label.to_string(), n);
    let pipeline = g.pipeline("tokens", "scale_rows", &[("WG", WG as f64)])?;
    let groups = crate::graph::grid1d(&g.gpu, n.div_ceil(WG) as u64);
    let p = Res::uniform(&TokParams { per_sample: per_sample as u32, scale_off: offset as u32, ..el_params(n) });
    g.dispatch(label, pipeline, bind([(tk::SRC, Res::Act(x)), (tk::Y, Res::Act(y)), (tk::PARAMS, p), (tk::SCALES, Res::Act(scales))]), groups, 0.0);
    Ok(y)
}

/// y [batch, T·C] = x + table [T·C] for every image (ConViT's position embedding).
pub fn add_pos(g: &mut Graph, label: &str, x: TensorId, table: &Arc<wgpu::Buffer>, per_image: usize) -> Result<TensorId> {
    let n = g.len(x);
    let y = g.tensor(label.to_string(), n);
    let pipeline = g.pipeline("tokens", "add_pos", &[("WG", WG as f64)])?;
    let p = TokParams { per_sample: per_image as u32, ..el_params(n) };
    let groups = crate::graph::grid1d(&g.gpu, n.div_ceil(WG) as u64);
    g.dispatch(label, pipeline, bind([(tk::SRC, Res::Act(x)), (tk::Y, Res::Act(y)), (tk::PARAMS, Res::uniform(&p)), (tk::OTHER, Res::Buf(table.clone()))]), groups, n as f64);
    Ok(y)
}

/// out [per_image] = Σ over the batch of dy [batch, per_image]: `add_pos`'s table gradient.
pub fn batch_sum(g: &mut Graph, label: &str, dy: TensorId, batch: usize, per_image: usize, out: &Arc<wgpu::Buffer>) -> Result<()> {
    let pipeline = g.pipeline("tokens", "batch_sum", &[("WG", WG as f64)])?;
    let p = TokParams { b: batch as u32, per_sample: per_image as u32, ..Default::default() };
    let groups = crate::graph::grid1d(&g.gpu, per_image.div_ceil(WG) as u64);
    g.dispatch(label, pipeline, bind([(tk::SRC, Res::Act(dy)), (tk::Y, Res::Buf(out.clone())), (tk::PARAMS, Res::uniform(&p))]), groups, (batch * per_image) as f64);
    Ok(())
}

/// The inverse of `gather_rows`: src [rows, C] densely into the mapped rows of y.
pub fn scatter_rows(g: &mut Graph, label: &str, src: TensorId, y: TensorId, c: usize, map: (usize, usize, usize, usize)) -> Result<()> {
    mapped_rows(g, label, src, y, c, map, true)
}

/// y [rows, C] = the rows of src that `map` reads or writes ((r / group)·stride + off
/// + r % group), densely.
pub fn gather_rows(g: &mut Graph, label: &str, src: TensorId, y: TensorId, c: usize, map: (usize, usize, usize, usize)) -> Result<()> {
    mapped_rows(g, label, src, y, c, map, false)
}

fn mapped_rows(g: &mut Graph, label: &str, src: TensorId, y: TensorId, c: usize, (rows, group, stride, off): (usize, usize, usize, usize), scatter: bool) -> Result<()> {
    let pipeline = g.pipeline("tokens", "gather_rows", &[("WG", WG as f64), ("SCATTER", scatter as u8 as f64)])?;
    let u = |v: usize| v as u32;
    let p = GatherParams { rows: u(rows), c: u(c), group: u(group), stride: u(stride), off: u(off), ..Default::default() };
    let groups = crate::graph::grid1d(&g.gpu, (rows * c).div_ceil(WG) as u64);
    g.dispatch(label, pipeline, bind([(tk::SRC, Res::Act(src)), (tk::Y, Res::Act(y)), (tk::GATHER_PARAMS, Res::uniform(&p))]), groups, 0.0);
    Ok(())
}
