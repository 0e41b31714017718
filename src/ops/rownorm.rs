//! `shaders/rownorm.wgsl`: LayerNorm (with row gather/scatter) and softmax.

use crate::gpu::Gpu;
use crate::graph::{bind, grid1d, Graph, Res, TensorId};
use crate::ops::params::rn;
use anyhow::Result;
use std::sync::Arc;

const WG: usize = 64;
pub const LN_EPS: f32 = 1e-5;

pub struct LayerNorm {
    pub gamma: Arc<wgpu::Buffer>,
    pub beta: Arc<wgpu::Buffer>,
    pub c: usize,
    /// ε (CvT's 1e-5, `LN_EPS`; ConViT's 1e-6: `with_eps`).
    pub eps: f32,
    /// For a LayerNorm that never trains (`frozen`): gamma and beta as linear
    /// textures made at load, which the vec4 kernels read instead of copying the
    /// buffers into textures at every run.
    pub tex: Option<(Arc<wgpu::TextureView>, Arc<wgpu::TextureView>)>,
}

impl LayerNorm {
    pub fn new(gpu: &Gpu, name: &str, gamma: &[f32], beta: &[f32]) -> Result<LayerNorm> {
        Ok(LayerNorm { gamma: Arc::new(gpu.upload(&format!("{name}.weight"), gamma)?), beta: Arc::new(gpu.upload(&format!("{name}.bias"), beta)?), c: gamma.len(), eps: LN_EPS, tex: None })
    }

    /// As `new`, for inference: the parameters never change after load. `half`:
    /// textures in f16, for f16 plans (`Graph::half`).
    pub fn frozen(gpu: &Gpu, name: &str, gamma: &[f32], beta: &[f32], half: bool) -> Result<LayerNorm> {
        let mut ln = Self::new(gpu, name, gamma, beta)?;
        let t = |v: &[f32], what: &str| crate::gpu::linear_texture_from(gpu, &format!("{name}.{what}"), v, half);
        ln.tex = Some((t(gamma, "weight"), t(beta, "bias")));
        Ok(ln)
    }

    /// The same LayerNorm with ε = `eps`.
    pub fn with_eps(self, eps: f32) -> LayerNorm {
        LayerNorm { eps, ..self }
    }

    /// GPU bytes of the parameter textures (beside the buffers).
    pub fn texture_bytes(&self) -> u64 {
        self.tex.as_ref().map_or(0, |(g, b)| crate::gpu::texture_bytes(g) + crate::gpu::texture_bytes(b))
    }
}

/// Row mapping: `rows` rows in groups of `group`; group g, row i reads input row
/// g*in_stride + in_off + i and writes output row g*out_stride + out_off + i.
#[derive(Clone, Copy, Debug)]
pub struct RowMap {
    pub rows: usize,
    pub group: usize,
    pub in_stride: usize,
    pub in_off: usize,
    pub out_stride: usize,
    pub out_off: usize,
}

impl RowMap {
    /// Plain contiguous rows.
    pub fn dense(rows: usize) -> RowMap {
        RowMap { rows, group: rows.max(1), in_stride: 0, in_off: 0, out_stride: 0, out_off: 0 }
    }
}

/// Invocations per row: the profile's `row_lanes` (1 in the CPU kernel set,
/// where lanes are SIMD and barriers are expensive; a workgroup of 64 per row in
/// the GPU set).
pub fn row_lanes(g: &Graph) -> usize {
    g.profile.row_lanes
}

/// Whether the LayerNorm kernels take their vec4 form: a row per invocation
/// (LANES = 1: CPU drivers) and a width that is a multiple of 4. That form reads
/// its inputs from linear textures (`Graph::linear_texture`).
fn vec4_rows(g: &Graph, c: usize) -> bool {
    row_lanes(g) == 1 && c % 4 == 0
}

/// The pipeline of a row kernel and its grid for `rows` rows.
/// `c`: the row width, which sets how many values each lane keeps in registers.
fn row_kernel(g: &Graph, entry: &str, rows: usize, c: usize, residual: bool) -> Result<(Arc<wgpu::ComputePipeline>, [u32; 3])> {
    let mut consts = vec![("WG", row_wg(g) as f64), ("LANES", row_lanes(g) as f64)];
    if let Some(per) = row_registers(g, c) {
        consts.push(("PER", per as f64));
    }
    // Subgroup reductions where the adapter has them and a workgroup is one row.
    if g.profile.row_subgroups && g.gpu.subgroups && row_lanes(g) == row_wg(g) {
        consts.push(("SG_REDUCE", 1.0));
    }
    if residual {
        consts.push(("RESIDUAL", 1.0));
    }
    Ok((g.pipeline("rownorm", entry, &consts)?, row_grid(g, rows)))
}

/// Values per lane that the workgroup-per-row kernels keep in registers
/// (`rownorm.wgsl`'s PER): the row read from memory once instead of once per pass
/// (three passes in LayerNorm, four in its backward). Only where lanes share a row:
/// with a row per invocation (CPU drivers) a row of 384 would spill. None for rows
/// wider than MAX_PER (16) values per lane, which stream from memory.
pub const MAX_PER: usize = 16;

fn row_registers(g: &Graph, c: usize) -> Option<usize> {
    let lanes = row_lanes(g);
    let per = c.div_ceil(lanes);
    (g.profile.row_registers && lanes > 1 && per <= MAX_PER).then_some(per)
}

/// The grid of a row kernel over `rows` rows (WG / LANES rows per workgroup).
fn row_grid(g: &Graph, rows: usize) -> [u32; 3] {
    grid1d(&g.gpu, rows.div_ceil(row_wg(g) / row_lanes(g)) as u64)
}

/// Workgroup size of the row kernels: 64 lanes per row, or with a row per
/// invocation 16 rows, so that a stage-2 LayerNorm (197 rows at batch 1) spreads
/// over a CPU driver's threads in more than four pieces (1.12x on lavapipe's
/// LayerNorms against 64; docs/perf.md).
fn row_wg(g: &Graph) -> usize {
    if row_lanes(g) == 1 {
        16
    } else {
        WG
    }
}

crate::kernel_params! {
/// `rownorm.wgsl`'s `Params`, field by field.
pub struct RowParams for "rownorm" "Params" {
    /// Rows, row width, and the row map (`RowMap`): rows come in groups of
    /// `group`, read from in_stride·(r / group) + in_off + r % group and written
    /// likewise with the out_ fields.
    pub rows: u32,
    pub c: u32,
    pub group: u32,
    pub in_stride: u32,
    pub in_off: u32,
    pub out_stride: u32,
    pub out_off: u32,
    /// LayerNorm's ε.
    pub eps: f32,
    /// layernorm4 in chunks: first row, and the texel of the chunk's texture
    /// where the input's vec4 0 would be.
    pub row0: u32,
    pub tex_off: u32,
    /// softmax_xent: the gradient's scale (1 / batch for a mean loss).
    pub scale: f32,
    pub _pad: u32,
}
}

/// Params of a row kernel over `m`'s rows of `c`, with LayerNorm's ε `eps`.
fn params(m: &RowMap, c: usize, eps: f32) -> RowParams {
    let u = |v: usize| v as u32;
    RowParams { rows: u(m.rows), c: u(c), group: u(m.group), in_stride: u(m.in_stride), in_off: u(m.in_off), out_stride: u(m.out_stride), out_off: u(m.out_off), eps, ..Default::default() }
}

/// Gamma (`beta` false, binding 13) or beta (binding 14) as a linear texture: a
/// frozen LayerNorm's own, else a copy of the buffer made at this step of every
/// run, so that training's updates reach it.
fn param(g: &mut Graph, ln: &LayerNorm, beta: bool) -> Res {
    match (&ln.tex, beta) {
        (Some((gt, _)), false) => Res::Tex(gt.clone()),
        (Some((_, bt)), true) => Res::Tex(bt.clone()),
        (None, false) => Res::ActTex(g.linear_texture_buf(&ln.gamma, 0, ln.c / 4, rn::GAMMA_TEX as u32)),
        (None, true) => Res::ActTex(g.linear_texture_buf(&ln.beta, 0, ln.c / 4, rn::BETA_TEX as u32)),
    }
}

/// layernorm4 over `map` in chunks of rows, each reading its input rows (and, with
/// a residual, the branch output's) from a small linear texture. Dense input rows
/// are chunked (`texture_ranges`); gathered ones (the cls-token norm) are few and
/// read whole.
fn layernorm4_chunks(g: &mut Graph, label: &str, x: TensorId, z: Option<TensorId>, map: RowMap, ln: &LayerNorm, y: TensorId) -> Result<()> {
    let c4 = ln.c / 4;
    let dense = map.group == map.rows || map.in_stride == map.group;
    let ranges = if dense { crate::ops::gemm::texture_ranges(map.rows, ln.c * 4) } else { vec![(0, map.rows)] };
    let (pipeline, _) = row_kernel(g, "layernorm4", map.rows, ln.c, z.is_some())?;
    for (r0, n) in ranges {
        // The first input row of the chunk, in vec4s (dense: the rest follow it).
        let t0 = if dense { ((r0 / map.group) * map.in_stride + map.in_off + r0 % map.group) * c4 } else { 0 };
        let texels = if dense { n * c4 } else { g.len(x) / 4 };
        let xt = g.linear_texture_range(x, t0, texels, rn::X_TEX as u32);
        // Bindings 10 and 12 serve RESIDUAL only; placeholders fill the layout.
        let (aux, zt) = match z {
            Some(z) => (Res::Act(x), Res::ActTex(g.linear_texture_range(z, t0, texels, rn::DY_TEX as u32))),
            None => (Res::Buf(g.gpu.placeholder()), Res::Tex(g.gpu.placeholder_texture(g.half))),
        };
        let mut p = params(&map, ln.c, ln.eps);
        (p.rows, p.row0, p.tex_off) = ((r0 + n) as u32, r0 as u32, t0 as u32);
        let (gt, bt) = (param(g, ln, false), param(g, ln, true));
        let b = bind([(rn::PARAMS, Res::uniform(&p)), (rn::Y4, Res::Act(y)), (rn::AUX4, aux), (rn::X_TEX, Res::ActTex(xt)), (rn::DY_TEX, zt), (rn::GAMMA_TEX, gt), (rn::BETA_TEX, bt)]);
        g.dispatch(label, pipeline.clone(), b, row_grid(g, n), 0.0);
    }
    Ok(())
}

/// LayerNorm over the last axis into `out` (a new tensor of `out_len` when None).
pub fn layernorm(g: &mut Graph, label: &str, x: TensorId, map: RowMap, ln: &LayerNorm, out: Option<TensorId>) -> Result<TensorId> {
    let y = out.unwrap_or_else(|| g.tensor(label.to_string(), map.rows * ln.c));
    if vec4_rows(g, ln.c) {
        layernorm4_chunks(g, label, x, None, map, ln, y)?;
        return Ok(y);
    }
    let (pipeline, groups) = row_kernel(g, "layernorm", map.rows, ln.c, false)?;
    let b = bind([(rn::X, Res::Act(x)), (rn::GAMMA, Res::Buf(ln.gamma.clone())), (rn::BETA, Res::Buf(ln.beta.clone())), (rn::Y, Res::Act(y)), (rn::PARAMS, Res::uniform(&params(&map, ln.c, ln.eps)))]);
    g.dispatch(label, pipeline, b, groups, 0.0);
    Ok(y)
}

/// The residual add and the LayerNorm after it in one pass: x += z in place (x and
/// z dense [rows, C]), and returns LayerNorm(x) (a new tensor). For branch outputs
/// the GEMM did not add (`matmul::linear_residual`).
pub fn add_layernorm(g: &mut Graph, label: &str, x: TensorId, z: TensorId, rows: usize, ln: &LayerNorm) -> Result<TensorId> {
    if !vec4_rows(g, ln.c) {
        crate::ops::tokens::add_into(g, &format!("{label}.residual"), x, z, x)?;
        return layernorm(g, label, x, RowMap::dense(rows), ln, None);
    }
    let y = g.tensor(label.to_string(), rows * ln.c);
    layernorm4_chunks(g, label, x, Some(z), RowMap::dense(rows), ln, y)?;
    Ok(y)
}

/// Softmax over the last axis of x [rows, c].
pub fn softmax(g: &mut Graph, label: &str, x: TensorId, rows: usize, c: usize, out: Option<TensorId>) -> Result<TensorId> {
    let y = out.unwrap_or_else(|| g.tensor(label.to_string(), rows * c));
    let (pipeline, groups) = row_kernel(g, "softmax", rows, c, false)?;
    g.dispatch(label, pipeline, bind([(rn::X, Res::Act(x)), (rn::Y, Res::Act(y)), (rn::PARAMS, Res::uniform(&params(&RowMap::dense(rows), c, 0.0)))]), groups, 0.0);
    Ok(y)
}

/// Gradient buffers of a LayerNorm: dγ, dβ [C].
pub struct LayerNormGrad {
    pub gamma: Arc<wgpu::Buffer>,
    pub beta: Arc<wgpu::Buffer>,
}

impl LayerNormGrad {
    pub fn new(gpu: &Gpu, name: &str, c: usize) -> Result<LayerNormGrad> {
        Ok(LayerNormGrad { gamma: Arc::new(gpu.storage(&format!("{name}.weight.grad"), (c * 4) as u64)?), beta: Arc::new(gpu.storage(&format!("{name}.bias.grad"), (c * 4) as u64)?) })
    }
}

/// Backward of `layernorm` with the forward's row map: dy at the output rows, dx
/// written at the input rows (a new dense tensor for dense maps, else `dx_into`,
/// whose other rows are left as they are). Writes dγ, dβ.
pub fn layernorm_backward(g: &mut Graph, label: &str, x: TensorId, dy: TensorId, map: RowMap, ln: &LayerNorm, grad: &LayerNormGrad, dx_into: Option<TensorId>) -> Result<TensorId> {
    let rows = map.rows;
    let dx = dx_into.unwrap_or_else(|| g.tensor(format!("{label}.dx"), rows * ln.c));
    let t = g.tensor(format!("{label}.dy_xhat"), rows * ln.c);
    if vec4_rows(g, ln.c) {
        let (pipeline, groups) = row_kernel(g, "layernorm_backward4", rows, ln.c, false)?;
        let (xt, dyt) = (g.linear_texture(x, rn::X_TEX as u32), g.linear_texture(dy, rn::DY_TEX as u32));
        let gt = param(g, ln, false);
        let b = bind([
            (rn::PARAMS, Res::uniform(&params(&map, ln.c, ln.eps))),
            (rn::Y4, Res::Act(dx)),
            (rn::AUX4, Res::Act(t)),
            (rn::X_TEX, Res::ActTex(xt)),
            (rn::DY_TEX, Res::ActTex(dyt)),
            (rn::GAMMA_TEX, gt),
        ]);
        g.dispatch(label, pipeline, b, groups, 0.0);
    } else {
        let (pipeline, groups) = row_kernel(g, "layernorm_backward", rows, ln.c, false)?;
        let b = bind([
            (rn::X, Res::Act(x)),
            (rn::GAMMA, Res::Buf(ln.gamma.clone())),
            (rn::DY, Res::Act(dy)),
            (rn::Y, Res::Act(dx)),
            (rn::PARAMS, Res::uniform(&params(&map, ln.c, ln.eps))),
            (rn::AUX, Res::Act(t)),
        ]);
        g.dispatch(label, pipeline, b, groups, 0.0);
    }
    crate::ops::matmul::colsum(g, &format!("{label}.dgamma"), t, rows, ln.c, Res::Buf(grad.gamma.clone()))?;
    if map.group == rows && map.out_stride == 0 && map.out_off == 0 {
        crate::ops::matmul::colsum(g, &format!("{label}.dbeta"), dy, rows, ln.c, Res::Buf(grad.beta.clone()))?;
    } else {
        // dβ sums dy over the mapped output rows only: gather them densely first
        // (t's slot is free again after dγ's sum, the planner reuses it).
        let dense = g.tensor(format!("{label}.dy_rows"), rows * ln.c);
        crate::ops::tokens::gather_rows(g, &format!("{label}.gather"), dy, dense, ln.c, (rows, map.group, map.out_stride, map.out_off))?;
        crate::ops::matmul::colsum(g, &format!("{label}.dbeta"), dense, rows, ln.c, Res::Buf(grad.beta.clone()))?;
    }
    Ok(dx)
}

/// Softmax cross-entropy of logits [rows, classes] against soft targets (same
/// shape). Returns (dlogits = (softmax − t)·scale, per-row loss [rows]).
pub fn softmax_xent(g: &mut Graph, label: &str, logits: TensorId, targets: TensorId, rows: usize, classes: usize, scale: f32) -> Result<(TensorId, TensorId)> {
    let d = g.tensor(format!("{label}.dlogits"), rows * classes);
    // Pinned: the training loop reads the losses after the step.
    let loss = g.pinned(format!("{label}.loss"), rows);
    let (pipeline, groups) = row_kernel(g, "softmax_xent", rows, classes, false)?;
    let mut p = params(&RowMap::dense(rows), classes, 0.0);
    p.scale = scale;
    let b = bind([(rn::X, Res::Act(logits)), (rn::TARGETS, Res::Act(targets)), (rn::Y, Res::Act(d)), (rn::PARAMS, Res::uniform(&p)), (rn::AUX, Res::Act(loss))]);
    g.dispatch(label, pipeline, b, groups, 0.0);
    Ok((d, loss))
}
