//! `shaders/dwconv.wgsl`: CvT's convolutional projection (depthwise 3x3 + folded
//! BatchNorm) producing the q, k and v token maps in one pass.

use crate::gpu::{Gpu, MatmulKind};
use crate::graph::{bind, grid1d, Graph, Res, TensorId};
use crate::ops::gemm::{act_rows_texture, pack, texture_batches, Src, View};
use crate::ops::params::dw;
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
    /// How the kernel reads x and w (the matmul's per-adapter variant).
    pub kind: MatmulKind,
    /// w as a [27, C/4] texture and b as a linear texture, uploaded once
    /// (inference). None on the texture path means w and b change between runs
    /// (training): w is packed and b copied into textures in each run.
    pub tex: Option<(Arc<wgpu::TextureView>, Arc<wgpu::TextureView>)>,
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
    /// From the q, k, v depthwise weights ([C, 1, 3, 3] each) and their BatchNorms,
    /// in the adapter's preferred variant.
    pub fn new(gpu: &Arc<Gpu>, name: &str, convs: [&[f32]; 3], bns: [BatchNorm; 3], c: usize) -> Result<ConvProj> {
        Self::with_kind(gpu, name, convs, bns, c, gpu.profile().matmul(), false)
    }

    /// As `new`, in a given variant (tests run both); `half`: the textures in
    /// f16, for f16 plans (`Graph::half`).
    pub fn with_kind(gpu: &Gpu, name: &str, convs: [&[f32]; 3], bns: [BatchNorm; 3], c: usize, kind: MatmulKind, half: bool) -> Result<ConvProj> {
        check_width(name, c)?;
        let mut w = Vec::with_capacity(27 * c);
        let mut b = Vec::with_capacity(3 * c);
        for i in 0..3 {
            let (wi, bi) = fold_bn(convs[i], &bns[i], c);
            w.extend(wi);
            b.extend(bi);
        }
        let tex = (kind == MatmulKind::Texture)
            .then(|| (Arc::new(crate::gpu::texture_from_in(gpu, &format!("{name}.w"), &w, (c / 4) as u32, 27, half)), crate::gpu::linear_texture_from(gpu, &format!("{name}.b"), &b, half)));
        Ok(ConvProj { w: Arc::new(gpu.upload(&format!("{name}.w"), &w)?), b: Arc::new(gpu.upload(&format!("{name}.b"), &b)?), c, kind, tex })
    }

    /// GPU bytes of the weight and bias textures (beside the buffers).
    pub fn texture_bytes(&self) -> u64 {
        self.tex.as_ref().map_or(0, |(w, b)| crate::gpu::texture_bytes(w) + crate::gpu::texture_bytes(b))
    }
}

/// The kernels work on four channels at a time (vec4): the width must be a
/// multiple of 4, which every valid CvT width is (head widths are).
fn check_width(name: &str, c: usize) -> Result<()> {
    anyhow::ensure!(c % 4 == 0 && c > 0, "{name}: width {c} is not a multiple of 4");
    Ok(())
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
    let flops = 2.0 * 9.0 * (batch * c * (h * w + 2 * hk * wk)) as f64;
    if let Some(chunks) = texture_batches(g, p.kind == MatmulKind::Texture, batch, tq, c) {
        let pipeline = g.pipeline("dwconv", "main_tex", &[("WG", WG as f64)])?;
        // The bias as a linear texture too (`dwconv.wgsl` binding 19).
        let (w_tex, bias_t) = match &p.tex {
            Some((w, b)) => (Res::Tex(w.clone()), Res::Tex(b.clone())),
            None => (Res::ActTex(pack(g, label, &View::new(Src::Buf(p.w.clone()), 27, c, c), (0, 27), (0, c), dw::W_TEX as u32)?), Res::ActTex(g.linear_texture_buf(&p.b, 0, 3 * c / 4, 19))),
        };
        for (b0, nb) in chunks {
            let xt = act_rows_texture(g, label, x, batch * tq, c, (b0 * tq, nb * tq), dw::X_TEX as u32)?;
            // The shader works in units of four channels (vec4).
            let total = nb * tq * c / 4;
            let prm = params_of([nb, h, w, c / 4, cls, hk, wk, total, b0]);
            let b = bind([
                (dw::Q, Res::Act(q)),
                (dw::K, Res::Act(k)),
                (dw::V, Res::Act(v)),
                (dw::PARAMS, Res::uniform(&prm)),
                (dw::X_TEX, Res::ActTex(xt)),
                (dw::W_TEX, w_tex.clone()),
                (dw::BIAS_TEX, bias_t.clone()),
            ]);
            g.dispatch(label, pipeline.clone(), b, grid1d(&g.gpu, total.div_ceil(WG) as u64), flops * nb as f64 / batch as f64);
        }
        return Ok((q, k, v));
    }
    let total = batch * tq * c / 4;
    let pipeline = g.pipeline("dwconv", "main", &[("WG", WG as f64)])?;
    let groups = grid1d(&g.gpu, total.div_ceil(WG) as u64);
    let prm = params_of([batch, h, w, c / 4, cls, hk, wk, total, 0]);
    let b = bind([
        (dw::X, Res::Act(x)),
        (dw::W, Res::Buf(p.w.clone())),
        (dw::BIAS, Res::Buf(p.b.clone())),
        (dw::Q, Res::Act(q)),
        (dw::K, Res::Act(k)),
        (dw::V, Res::Act(v)),
        (dw::PARAMS, Res::uniform(&prm)),
    ]);
    g.dispatch(label, pipeline, b, groups, flops);
    Ok((q, k, v))
}

crate::kernel_params! {
/// `dwconv.wgsl`'s `Params`, field by field.
pub struct DwParams for "dwconv" "Params" {
    /// Images, the map's grid, channel groups (channels / 4: the kernels work on
    /// vec4), cls tokens per image (0 or 1), the k/v grid.
    pub b: u32,
    pub h: u32,
    pub w: u32,
    pub c: u32,
    pub cls: u32,
    pub hk: u32,
    pub wk: u32,
    /// Elements (vec4) of the dispatch's output, where the kernel has one per invocation.
    pub total: u32,
    /// First image of this dispatch.
    pub b_off: u32,
    /// `dw_sum_partials` adds into dw (every dispatch after the first).
    pub accumulate: u32,
    /// Partial sums per channel group (`bn_part`, `bn_finish`).
    pub parts: u32,
    pub _pad: u32,
}
}

/// Params from [batch, h, w, c/4, cls, hk, wk, total, b_off].
fn params_of(v: [usize; 9]) -> DwParams {
    let [b, h, w, c, cls, hk, wk, total, b_off] = v.map(|x| x as u32);
    DwParams { b, h, w, c, cls, hk, wk, total, b_off, ..Default::default() }
}

// ---------------------------------------------------------------------------
// Training: train-mode BatchNorm (batch statistics) instead of the folded form.

/// One projection's BatchNorm for training: γ, β [C] and running [mean C | var C].
pub struct BnParams {
    pub gamma: Arc<wgpu::Buffer>,
    pub beta: Arc<wgpu::Buffer>,
    pub running: Arc<wgpu::Buffer>,
}

/// The q, k, v projections for training: raw depthwise weights [3, 9, C] and their BNs.
pub struct ConvProjTrain {
    pub w: Arc<wgpu::Buffer>,
    zero_bias: Arc<wgpu::Buffer>,
    pub bn: [BnParams; 3],
    pub c: usize,
    /// Normalise by the running statistics and keep them fixed (BN in eval mode).
    pub bn_eval: bool,
}

impl ConvProjTrain {
    /// From the q, k, v depthwise weights ([C, 1, 3, 3] each) and BN tensors.
    pub fn new(gpu: &Gpu, name: &str, convs: [&[f32]; 3], bns: [BatchNorm; 3], c: usize) -> Result<ConvProjTrain> {
        check_width(name, c)?;
        let mut w = Vec::with_capacity(27 * c);
        for conv in convs {
            for t in 0..9 {
                w.extend((0..c).map(|ch| conv[ch * 9 + t]));
            }
        }
        let mut bn = vec![];
        for b in bns {
            let running: Vec<f32> = b.mean.iter().chain(b.var.iter()).copied().collect();
            bn.push(BnParams {
                gamma: Arc::new(gpu.upload(&format!("{name}.bn.weight"), b.weight)?),
                beta: Arc::new(gpu.upload(&format!("{name}.bn.bias"), b.bias)?),
                running: Arc::new(gpu.upload(&format!("{name}.bn.running"), &running)?),
            });
        }
        let bn: [BnParams; 3] = bn.try_into().map_err(|_| anyhow::anyhow!("three BatchNorms"))?;
        Ok(ConvProjTrain { w: Arc::new(gpu.upload(&format!("{name}.w"), &w)?), zero_bias: Arc::new(gpu.upload(&format!("{name}.zero_bias"), &vec![0.0; 3 * c])?), bn, c, bn_eval: false })
    }
}

/// Gradients: raw weights [3, 9, C] and per map dγ, dβ [C].
pub struct ConvProjGrad {
    pub w: Arc<wgpu::Buffer>,
    pub gamma: [Arc<wgpu::Buffer>; 3],
    pub beta: [Arc<wgpu::Buffer>; 3],
}

impl ConvProjGrad {
    pub fn new(gpu: &Gpu, name: &str, c: usize) -> Result<ConvProjGrad> {
        let buf = |what: &str, i: usize| gpu.storage(&format!("{name}.bn{i}.{what}.grad"), (4 * c) as u64).map(Arc::new);
        Ok(ConvProjGrad {
            w: Arc::new(gpu.storage(&format!("{name}.w.grad"), (108 * c) as u64)?),
            gamma: [buf("weight", 0)?, buf("weight", 1)?, buf("weight", 2)?],
            beta: [buf("bias", 0)?, buf("bias", 1)?, buf("bias", 2)?],
        })
    }
}

/// What the backward needs from the forward: pre-BN maps and batch statistics.
pub struct ProjSaved {
    pre: [TensorId; 3],
    stats: [TensorId; 3],
}

/// Invocations per workgroup of the channel reductions (BN statistics and
/// backward, depthwise dW): 1 on CPU drivers (a row-per-invocation adapter, see
/// `rownorm::row_lanes`), where a workgroup's invocations are SIMD lanes and
/// barriers are expensive; 64 with a tree reduction on GPUs.
fn reduce_wg(g: &Graph) -> usize {
    if cpu_reductions(g) {
        1
    } else {
        WG
    }
}

fn cpu_reductions(g: &Graph) -> bool {
    crate::ops::rownorm::row_lanes(g) == 1
}

/// Lanes per workgroup of the CPU set's BatchNorm kernels, each its own channel
/// group (3.6-5x faster per kernel on lavapipe than a one-lane workgroup per
/// channel group, docs/perf.md).
const BN_CPL_WG: usize = 16;

/// The CPU set's BatchNorm kernels' override constants and grid for `c4`
/// channel groups: BN_CPL_WG channel groups per workgroup, one per lane, each
/// lane over every row.
fn bn_shape(bn_eval: bool, c4: usize) -> ([(&'static str, f64); 2], [u32; 3]) {
    ([("WG", BN_CPL_WG as f64), ("BN_EVAL", bn_eval as u8 as f64)], [c4.div_ceil(BN_CPL_WG) as u32, 1, 1])
}

/// Params of one map; C in units of four channels, as the shader counts them.
fn map_params(batch: usize, h: usize, w: usize, c: usize, cls: usize) -> DwParams {
    params_of([batch, h, w, c / 4, cls, 0, 0, 0, 0])
}

/// The GPU set's partial sums per channel group: enough for the profile's
/// workgroup target, at least 4 rows each.
fn bn_parts(g: &Graph, rows: usize, c4: usize) -> usize {
    (g.profile.gemm.min_workgroups * WG).div_ceil(c4.max(1)).clamp(1, rows.div_ceil(4).max(1))
}

/// Where a BatchNorm pass reads and writes (the shader's bindings by name).
struct BnIo {
    gamma: Res,
    beta: Res,
    stats: Res,
    running: Res,
    pre: TensorId,
    post: Res,
    dpost: Res,
    dpre: Res,
    dgamma: Res,
    dbeta: Res,
}

/// The GPU set's BatchNorm passes over one map: sums by `bn_part` and `bn_finish`
/// (the forward: mean, variance and running update, from one read of the map,
/// none for eval-mode statistics; the backward: dβ, dγ), then the apply pass
/// (`bn_apply_el`, `bn_backward_apply_el`) over every vec4 of the map.
#[allow(clippy::too_many_arguments)]
fn bn_gpu(g: &mut Graph, label: &str, io: &BnIo, prm: DwParams, rows: usize, bn_eval: bool, backward: bool) -> Result<()> {
    let (stat, apply) = if backward { (1u32, "bn_backward_apply_el") } else { (0, "bn_apply_el") };
    let c4 = prm.c as usize;
    let parts = bn_parts(g, (prm.b * prm.h * prm.w) as usize, c4);
    let prm = DwParams { parts: parts as u32, ..prm };
    let sums = g.tensor(format!("{label}.sums"), 2 * parts * c4 * 4);
    let pre = Res::Act(io.pre);
    {
        let consts = [("WG", WG as f64), ("BN_EVAL", bn_eval as u8 as f64), ("STAT", stat as f64)];
        let name = ["stats", "sums"][stat as usize];
        // Eval-mode statistics are the running ones: nothing to sum.
        if !(bn_eval && stat == 0) {
            let pipeline = g.pipeline("dwconv", "bn_part", &consts)?;
            let b = bind([(dw::PARAMS, Res::uniform(&prm)), (dw::STATS, io.stats.clone()), (dw::PRE, pre.clone()), (dw::DPOST, io.dpost.clone()), (dw::SUMS, Res::Act(sums))]);
            g.dispatch(format!("{label}.{name}.part"), pipeline, b, grid1d(&g.gpu, (parts * c4).div_ceil(WG) as u64), 0.0);
        }
        let pipeline = g.pipeline("dwconv", "bn_finish", &consts)?;
        let b = bind([
            (dw::PARAMS, Res::uniform(&prm)),
            (dw::STATS, io.stats.clone()),
            (dw::RUNNING, io.running.clone()),
            (dw::DGAMMA, io.dgamma.clone()),
            (dw::DBETA, io.dbeta.clone()),
            (dw::SUMS, Res::Act(sums)),
        ]);
        g.dispatch(format!("{label}.{name}"), pipeline, b, grid1d(&g.gpu, c4 as u64), 0.0);
    }
    let pipeline = g.pipeline("dwconv", apply, &[("WG", WG as f64), ("BN_EVAL", bn_eval as u8 as f64)])?;
    let u = Res::uniform(&prm);
    let b = if !backward {
        bind([(dw::W, io.gamma.clone()), (dw::BIAS, io.beta.clone()), (dw::PARAMS, u), (dw::STATS, io.stats.clone()), (dw::PRE, pre), (dw::POST, io.post.clone())])
    } else {
        bind([
            (dw::W, io.gamma.clone()),
            (dw::PARAMS, u),
            (dw::STATS, io.stats.clone()),
            (dw::PRE, pre),
            (dw::DPOST, io.dpost.clone()),
            (dw::DPRE, io.dpre.clone()),
            (dw::DGAMMA, io.dgamma.clone()),
            (dw::DBETA, io.dbeta.clone()),
        ])
    };
    g.dispatch(label, pipeline, b, grid1d(&g.gpu, (rows * c4).div_ceil(WG) as u64), 0.0);
    Ok(())
}

/// Train-mode forward: x [batch, cls + h*w, C] → (q, k, v) with batch-statistics
/// BN; updates the running statistics.
pub fn conv_proj_train(g: &mut Graph, label: &str, x: TensorId, batch: usize, h: usize, w: usize, cls: usize, p: &ConvProjTrain) -> Result<((TensorId, TensorId, TensorId), ProjSaved)> {
    // The raw (unfolded) weights change every step: on the texture path they are packed each run.
    let raw = ConvProj { w: p.w.clone(), b: p.zero_bias.clone(), c: p.c, kind: g.profile.matmul(), tex: None };
    let (pq, pk, pv) = conv_proj(g, &format!("{label}.raw"), x, batch, h, w, cls, &raw)?;
    let (hk, wk) = kv_hw(h, w);
    let mut post = vec![];
    let mut stats = vec![];
    let gpu_set = g.profile.kernels == crate::profile::KernelSet::Gpu;
    let (consts, bn_groups) = bn_shape(p.bn_eval, p.c / 4);
    let passes =
        if gpu_set { vec![] } else { vec![("mean", g.pipeline("dwconv", "bn_mean", &consts)?), ("var", g.pipeline("dwconv", "bn_var", &consts)?), ("", g.pipeline("dwconv", "bn_apply", &consts)?)] };
    for (m, (pre, (mh, mw))) in [(pq, (h, w)), (pk, (hk, wk)), (pv, (hk, wk))].into_iter().enumerate() {
        let out = g.tensor(format!("{label}.bn{m}"), g.len(pre));
        let st = g.tensor(format!("{label}.bn{m}.stats"), 2 * p.c);
        post.push(out);
        stats.push(st);
        if gpu_set {
            let none = || Res::Buf(g.gpu.placeholder());
            let io = BnIo {
                gamma: Res::Buf(p.bn[m].gamma.clone()),
                beta: Res::Buf(p.bn[m].beta.clone()),
                stats: Res::Act(st),
                running: Res::Buf(p.bn[m].running.clone()),
                pre,
                post: Res::Act(out),
                dpost: none(),
                dpre: none(),
                dgamma: none(),
                dbeta: none(),
            };
            bn_gpu(g, &format!("{label}.bn{m}"), &io, map_params(batch, mh, mw, p.c, cls), batch * (cls + mh * mw), p.bn_eval, false)?;
            continue;
        }
        let pre_t = Res::ActTex(g.linear_texture(pre, dw::PRE_TEX as u32));
        let b = bind([
            (dw::W, Res::Buf(p.bn[m].gamma.clone())),
            (dw::BIAS, Res::Buf(p.bn[m].beta.clone())),
            (dw::PARAMS, Res::uniform(&map_params(batch, mh, mw, p.c, cls))),
            (dw::STATS, Res::Act(st)),
            (dw::RUNNING, Res::Buf(p.bn[m].running.clone())),
            (dw::PRE, Res::Act(pre)),
            (dw::POST, Res::Act(out)),
            (dw::PRE_TEX, pre_t),
        ]);
        for (pass, pipeline) in &passes {
            let name = if pass.is_empty() { format!("{label}.bn{m}") } else { format!("{label}.bn{m}.{pass}") };
            g.dispatch(name, pipeline.clone(), b.clone(), bn_groups, 0.0);
        }
    }
    Ok(((post[0], post[1], post[2]), ProjSaved { pre: [pq, pk, pv], stats: [stats[0], stats[1], stats[2]] }))
}

/// Backward of `conv_proj_train`: from the gradients of q, k, v, writes the weight
/// and BN gradients into `grad` and returns dx.
pub fn conv_proj_train_backward(
    g: &mut Graph,
    label: &str,
    x: TensorId,
    saved: &ProjSaved,
    d: (TensorId, TensorId, TensorId),
    batch: usize,
    h: usize,
    w: usize,
    cls: usize,
    p: &ConvProjTrain,
    grad: &ConvProjGrad,
) -> Result<TensorId> {
    let c = p.c;
    let (hk, wk) = kv_hw(h, w);
    let gpu_set = g.profile.kernels == crate::profile::KernelSet::Gpu;
    let (consts, bn_groups) = bn_shape(p.bn_eval, c / 4);
    let mut dpre = vec![];
    for (m, (dpost, (mh, mw))) in [(d.0, (h, w)), (d.1, (hk, wk)), (d.2, (hk, wk))].into_iter().enumerate() {
        let out = g.tensor(format!("{label}.bn{m}.dpre"), g.len(dpost));
        dpre.push(out);
        if gpu_set {
            let none = || Res::Buf(g.gpu.placeholder());
            let io = BnIo {
                gamma: Res::Buf(p.bn[m].gamma.clone()),
                beta: none(),
                stats: Res::Act(saved.stats[m]),
                running: none(),
                pre: saved.pre[m],
                post: none(),
                dpost: Res::Act(dpost),
                dpre: Res::Act(out),
                dgamma: Res::Buf(grad.gamma[m].clone()),
                dbeta: Res::Buf(grad.beta[m].clone()),
            };
            bn_gpu(g, &format!("{label}.bn{m}.backward"), &io, map_params(batch, mh, mw, c, cls), batch * (cls + mh * mw), p.bn_eval, true)?;
            continue;
        }
        let bn_sums = g.pipeline("dwconv", "bn_backward_sums", &consts)?;
        let bn_apply = g.pipeline("dwconv", "bn_backward_apply", &consts)?;
        let (pre_t, dpost_t) = (Res::ActTex(g.linear_texture(saved.pre[m], dw::PRE_TEX as u32)), Res::ActTex(g.linear_texture(dpost, dw::DPOST_TEX as u32)));
        let b = bind([
            (dw::W, Res::Buf(p.bn[m].gamma.clone())),
            (dw::PARAMS, Res::uniform(&map_params(batch, mh, mw, c, cls))),
            (dw::STATS, Res::Act(saved.stats[m])),
            (dw::PRE, Res::Act(saved.pre[m])),
            (dw::DPOST, Res::Act(dpost)),
            (dw::DPRE, Res::Act(out)),
            (dw::DGAMMA, Res::Buf(grad.gamma[m].clone())),
            (dw::DBETA, Res::Buf(grad.beta[m].clone())),
            (dw::PRE_TEX, pre_t),
            (dw::DPOST_TEX, dpost_t),
        ]);
        g.dispatch(format!("{label}.bn{m}.backward.sums"), bn_sums, b.clone(), bn_groups, 0.0);
        g.dispatch(format!("{label}.bn{m}.backward"), bn_apply, b, bn_groups, 0.0);
    }
    let total = batch * (cls + h * w) * c;
    let params = params_of([batch, h, w, c / 4, cls, hk, wk, total / 4, 0]);
    let dx = g.tensor(format!("{label}.dx"), total);
    let (tq, tk) = (cls + h * w, cls + hk * wk);
    if let Some(chunks) = texture_batches(g, g.profile.matmul() == MatmulKind::Texture, batch, tq, c) {
        // Gradients and weights as texels (see the shader); w packed each run (it trains).
        let px = g.pipeline("dwconv", "dwconv_backward_x_tex", &[("WG", WG as f64)])?;
        let pw = g.pipeline("dwconv", "dwconv_backward_w_tex", &[("WG", WG as f64)])?;
        let psum = g.pipeline("dwconv", "dw_sum_partials", &[("WG", WG as f64)])?;
        // Per-invocation partial sums of dW: [3, C/4, 9, WG] vec4.
        let part = g.tensor(format!("{label}.dW.partials"), 3 * 9 * c * WG);
        let wt = pack(g, label, &View::new(Src::Buf(p.w.clone()), 27, c, c), (0, 27), (0, c), dw::W_TEX as u32)?;
        for (b0, nb) in chunks {
            let dq = act_rows_texture(g, label, dpre[0], batch * tq, c, (b0 * tq, nb * tq), dw::DQ_TEX as u32)?;
            let dk = act_rows_texture(g, label, dpre[1], batch * tk, c, (b0 * tk, nb * tk), dw::DK_TEX as u32)?;
            let dv = act_rows_texture(g, label, dpre[2], batch * tk, c, (b0 * tk, nb * tk), dw::DV_TEX as u32)?;
            let xt = act_rows_texture(g, label, x, batch * tq, c, (b0 * tq, nb * tq), dw::X_TEX as u32)?;
            // dW (the first chunk writes, later ones add: params word 9).
            let mut prm = params_of([nb, h, w, c / 4, cls, hk, wk, 0, b0]);
            prm.accumulate = (b0 > 0) as u32;
            let b = bind([
                (dw::PARAMS, Res::uniform(&prm)),
                (dw::X_TEX, Res::ActTex(xt)),
                (dw::DQ_TEX, Res::ActTex(dq.clone())),
                (dw::DK_TEX, Res::ActTex(dk.clone())),
                (dw::DV_TEX, Res::ActTex(dv.clone())),
                (dw::PART, Res::Act(part)),
            ]);
            g.dispatch(format!("{label}.dW"), pw.clone(), b, [(3 * c / 4) as u32, 1, 1], 0.0);
            let part_t = g.linear_texture(part, dw::PART_TEX as u32);
            let b = bind([(dw::PARAMS, Res::uniform(&prm)), (dw::DW, Res::Buf(grad.w.clone())), (dw::PART_TEX, Res::ActTex(part_t))]);
            g.dispatch(format!("{label}.dW.sum"), psum.clone(), b, grid1d(&g.gpu, (27 * c / 4).div_ceil(WG) as u64), 0.0);
            let n4 = nb * tq * c / 4;
            let prm = params_of([nb, h, w, c / 4, cls, hk, wk, n4, b0]);
            let b = bind([
                (dw::PARAMS, Res::uniform(&prm)),
                (dw::DX, Res::Act(dx)),
                (dw::W_TEX, Res::ActTex(wt.clone())),
                (dw::DQ_TEX, Res::ActTex(dq)),
                (dw::DK_TEX, Res::ActTex(dk)),
                (dw::DV_TEX, Res::ActTex(dv)),
            ]);
            g.dispatch(format!("{label}.dx"), px.clone(), b, grid1d(&g.gpu, n4.div_ceil(WG) as u64), 0.0);
        }
        return Ok(dx);
    }
    let pw = g.pipeline("dwconv", "dwconv_backward_w", &[("WG", reduce_wg(g) as f64)])?;
    let b = bind([(dw::X, Res::Act(x)), (dw::Q, Res::Act(dpre[0])), (dw::K, Res::Act(dpre[1])), (dw::V, Res::Act(dpre[2])), (dw::PARAMS, Res::uniform(&params)), (dw::DW, Res::Buf(grad.w.clone()))]);
    g.dispatch(format!("{label}.dW"), pw, b, [(3 * c / 4) as u32, 1, 1], 0.0);
    let px = g.pipeline("dwconv", "dwconv_backward_x", &[("WG", WG as f64)])?;
    let b = bind([(dw::W, Res::Buf(p.w.clone())), (dw::Q, Res::Act(dpre[0])), (dw::K, Res::Act(dpre[1])), (dw::V, Res::Act(dpre[2])), (dw::PARAMS, Res::uniform(&params)), (dw::DX, Res::Act(dx))]);
    g.dispatch(format!("{label}.dx"), px, b, grid1d(&g.gpu, (total / 4).div_ceil(WG) as u64), 0.0);
    Ok(dx)
}
