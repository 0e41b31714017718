//! `shaders/attention.wgsl`: fused multi-head attention with online softmax.

use crate::gpu::MatmulKind;
use crate::graph::{Graph, Res, TensorId};
use crate::ops::gemm::act_rows_texture;
use crate::ops::matmul::preferred_kind;
use anyhow::{bail, Result};

const WG: usize = 64;

/// Shapes of one attention call: q [batch, tq, c], k and v [batch, tkv, c].
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub batch: usize,
    pub tq: usize,
    pub tkv: usize,
    pub c: usize,
    pub heads: usize,
    /// Softmax scale; CvT uses c^-0.5 (the stage width), not head_dim^-0.5.
    pub scale: f32,
}

/// Largest head width the kernel's register arrays hold.
pub const MAX_HEAD_DIM: usize = 64;

pub fn check_heads(c: usize, heads: usize) -> Result<()> {
    if heads == 0 || c % heads != 0 {
        bail!("width {c} is not divisible by {heads} heads");
    }
    let d = c / heads;
    if d % 4 != 0 || d > MAX_HEAD_DIM {
        bail!("head width {d} (= {c}/{heads}) must be a multiple of 4 and at most {MAX_HEAD_DIM}");
    }
    Ok(())
}

pub fn attention(g: &mut Graph, label: &str, q: TensorId, k: TensorId, v: TensorId, s: AttnShape) -> Result<TensorId> {
    let kind = preferred_kind(&g.gpu);
    attention_with(g, label, q, k, v, s, kind)
}

/// As `attention`, with the operand path given (tests run both). The texture
/// path copies q, k, v into textures when C % 64 == 0 (256-byte rows) and packs
/// them with a kernel otherwise.
pub fn attention_with(g: &mut Graph, label: &str, q: TensorId, k: TensorId, v: TensorId, s: AttnShape, kind: MatmulKind) -> Result<TensorId> {
    check_heads(s.c, s.heads)?;
    let d4 = s.c / s.heads / 4;
    let o = g.tensor(label.to_string(), s.batch * s.tq * s.c);
    let params = |batch: usize, b_off: usize| vec![batch as u32, s.tq as u32, s.tkv as u32, (s.c / 4) as u32, s.heads as u32, s.scale.to_bits(), b_off as u32, 0];
    // QKᵀ and PV: 2 multiply-adds per (query, key, channel).
    let flops = |batch: usize| 4.0 * (batch * s.tq * s.tkv * s.c) as f64;
    if let Some(chunks) = texture_chunks(g, &s, kind) {
        let pipeline = g.gpu.pipeline("attention", "main_tex", &[("WG", WG as f64), ("D4", d4 as f64)])?;
        for (b0, nb) in chunks {
            let qt = texture_rows(g, label, q, &s, (s.tq, b0, nb), 5)?;
            let kt = texture_rows(g, label, k, &s, (s.tkv, b0, nb), 6)?;
            let vt = texture_rows(g, label, v, &s, (s.tkv, b0, nb), 7)?;
            let groups = [s.tq.div_ceil(WG) as u32, s.heads as u32, nb as u32];
            let bindings = vec![Res::Unused, Res::Unused, Res::Unused, Res::Act(o), Res::Uniform(params(nb, b0)), Res::ActTex(qt), Res::ActTex(kt), Res::ActTex(vt)];
            g.dispatch(label, pipeline.clone(), bindings, groups, flops(nb));
        }
        return Ok(o);
    }
    let pipeline = g.gpu.pipeline("attention", "main", &[("WG", WG as f64), ("D4", d4 as f64)])?;
    let groups = [s.tq.div_ceil(WG) as u32, s.heads as u32, s.batch as u32];
    g.dispatch(label, pipeline, vec![Res::Act(q), Res::Act(k), Res::Act(v), Res::Act(o), Res::Uniform(params(s.batch, 0))], groups, flops(s.batch));
    Ok(o)
}

/// Batch chunks of the texture kernels (`gemm::texture_batches`), else None.
fn texture_chunks(g: &Graph, s: &AttnShape, kind: MatmulKind) -> Option<Vec<(usize, usize)>> {
    crate::ops::gemm::texture_batches(g, kind == MatmulKind::Texture, s.batch, s.tq.max(s.tkv), s.c)
}

/// Images [b0, b0 + nb) of a [batch, rows_per, c] tensor as a texture bound at `binding`.
fn texture_rows(g: &mut Graph, label: &str, t: TensorId, s: &AttnShape, (rows_per, b0, nb): (usize, usize, usize), binding: u32) -> Result<crate::graph::TexRef> {
    act_rows_texture(g, label, t, s.batch * rows_per, s.c, (b0 * rows_per, nb * rows_per), binding)
}

/// Appends the attention backward (probabilities recomputed; texture operands on
/// texture-preferring adapters, as the forward):
/// given q, k, v, the forward output o and its gradient dout, returns (dq, dk, dv).
pub fn attention_backward(g: &mut Graph, label: &str, (q, k, v, o): (TensorId, TensorId, TensorId, TensorId), dout: TensorId, s: AttnShape) -> Result<(TensorId, TensorId, TensorId)> {
    check_heads(s.c, s.heads)?;
    let d4 = s.c / s.heads / 4;
    let dq = g.tensor(format!("{label}.dq"), s.batch * s.tq * s.c);
    let dk = g.tensor(format!("{label}.dk"), s.batch * s.tkv * s.c);
    let dv = g.tensor(format!("{label}.dv"), s.batch * s.tkv * s.c);
    let ld = g.tensor(format!("{label}.lse_d"), s.batch * s.heads * s.tq * 2);
    let params = vec![s.batch as u32, s.tq as u32, s.tkv as u32, (s.c / 4) as u32, s.heads as u32, s.scale.to_bits(), 0, 0];
    let consts = [("WG", WG as f64), ("D4", d4 as f64)];
    // Per (query, key, channel): QKᵀ recomputed twice and dO·Vᵀ once in each kernel, plus dS·K / Pᵀ·dO / dSᵀ·Q.
    let flops = 2.0 * (s.batch * s.tq * s.tkv * s.c) as f64;
    let u = || Res::Unused;
    if let Some(chunks) = texture_chunks(g, &s, preferred_kind(&g.gpu)) {
        // K, V for the per-query pass and Q, dO for the per-key pass as textures.
        let pq = g.gpu.pipeline("attention", "attn_bwd_q_tex", &consts)?;
        let pkv = g.gpu.pipeline("attention", "attn_bwd_kv_tex", &consts)?;
        for (b0, nb) in chunks {
            let mut params = params.clone();
            params[6] = b0 as u32;
            let chunk_flops = flops * nb as f64 / s.batch as f64;
            let kt = texture_rows(g, label, k, &s, (s.tkv, b0, nb), 6)?;
            let vt = texture_rows(g, label, v, &s, (s.tkv, b0, nb), 7)?;
            let bq = vec![Res::Act(q), u(), u(), Res::Act(o), Res::Uniform(params.clone()), u(), Res::ActTex(kt), Res::ActTex(vt), Res::Act(dout), Res::Act(dq), Res::Act(ld)];
            g.dispatch(format!("{label}.bwd_q"), pq.clone(), bq, [s.tq.div_ceil(WG) as u32, s.heads as u32, nb as u32], 3.0 * chunk_flops);
            let qt = texture_rows(g, label, q, &s, (s.tq, b0, nb), 5)?;
            let gt = texture_rows(g, label, dout, &s, (s.tq, b0, nb), 13)?;
            let bkv = vec![u(), Res::Act(k), Res::Act(v), u(), Res::Uniform(params), Res::ActTex(qt), u(), u(), u(), u(), Res::Act(ld), Res::Act(dk), Res::Act(dv), Res::ActTex(gt)];
            g.dispatch(format!("{label}.bwd_kv"), pkv.clone(), bkv, [s.tkv.div_ceil(WG) as u32, s.heads as u32, nb as u32], 4.0 * chunk_flops);
        }
        return Ok((dq, dk, dv));
    }
    let bq = vec![Res::Act(q), Res::Act(k), Res::Act(v), Res::Act(o), Res::Uniform(params.clone()), u(), u(), u(), Res::Act(dout), Res::Act(dq), Res::Act(ld), u(), u()];
    let pq = g.gpu.pipeline("attention", "attn_bwd_q", &consts)?;
    g.dispatch(format!("{label}.bwd_q"), pq, bq, [s.tq.div_ceil(WG) as u32, s.heads as u32, s.batch as u32], 4.0 * flops);
    let bkv = vec![Res::Act(q), Res::Act(k), Res::Act(v), u(), Res::Uniform(params), u(), u(), u(), Res::Act(dout), u(), Res::Act(ld), Res::Act(dk), Res::Act(dv)];
    let pkv = g.gpu.pipeline("attention", "attn_bwd_kv", &consts)?;
    g.dispatch(format!("{label}.bwd_kv"), pkv, bkv, [s.tkv.div_ceil(WG) as u32, s.heads as u32, s.batch as u32], 4.0 * flops);
    Ok((dq, dk, dv))
}
