//! `shaders/attention.wgsl`: fused multi-head attention with online softmax.

use crate::gpu::MatmulKind;
use crate::graph::{bind, Graph, Res, TensorId};
use crate::ops::gemm::act_rows_texture;
use crate::ops::params::at;
use anyhow::{bail, Result};

const WG: usize = 64;

crate::kernel_params! {
/// `attention.wgsl`'s `Params`, field by field.
pub struct AttnParams for "attention" "Params" {
    /// Images of the dispatch, queries and keys per image, channels / 4, heads.
    pub b: u32,
    pub tq: u32,
    pub tkv: u32,
    pub c4: u32,
    pub heads: u32,
    /// The score scale (the stage width^-0.5, as the official code).
    pub scale: f32,
    /// First image of this dispatch (the texture kernels split the batch).
    pub b_off: u32,
    /// The saved-P backward on textures: elements into its first texel where the
    /// chunk's P and dS start.
    pub p_off: u32,
}
}

impl AttnParams {
    fn of(s: &AttnShape, batch: usize, b_off: usize) -> AttnParams {
        let u = |v: usize| v as u32;
        AttnParams { b: u(batch), tq: u(s.tq), tkv: u(s.tkv), c4: u(s.c / 4), heads: u(s.heads), scale: s.scale, b_off: u(b_off), p_off: 0 }
    }
}

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

/// Rows per tile that the GPU set's attention kernels stage in workgroup memory
/// (`attention.wgsl`'s TK) when walking a sequence of `rows` keys (or queries, in
/// the dK/dV pass): 32, or the profile's `attn_tile_max` (64) where the whole
/// sequence then fits one tile (CvT's stage 2: 50 keys at 224) and the adapter's
/// workgroup memory holds two such tiles.
fn key_tile(g: &Graph, rows: usize, d4: usize) -> usize {
    let big = g.profile.attn_tile_max.clamp(32, 64);
    let bytes = 2 * big * d4 * 16 + big * 8;
    if rows > 32 && rows <= big && bytes <= g.gpu.limits.max_compute_workgroup_storage_size as usize {
        big
    } else {
        32
    }
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
    let kind = g.profile.matmul();
    attention_with(g, label, q, k, v, s, kind)
}

/// As `attention`, with the operand path given (tests run both). The texture
/// path copies q, k, v into textures when their rows are 256-byte multiples (C %
/// 64 == 0; C % 128 == 0 in f16 plans) and packs them with a kernel otherwise.
pub fn attention_with(g: &mut Graph, label: &str, q: TensorId, k: TensorId, v: TensorId, s: AttnShape, kind: MatmulKind) -> Result<TensorId> {
    Ok(forward(g, label, (q, k, v), s, kind, None)?.0)
}

/// How the training backward gets the softmax probabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnGrad {
    /// Recomputed from Q and K in the backward (no extra memory).
    Recompute,
    /// Written by the forward and kept until the backward: P and dS take
    /// B·heads·Tq·Tkv floats each (on CPU drivers the backward also copies a
    /// chunk of images' worth of each into a texture).
    Saved,
}

/// Largest P a block may keep with `AttnGrad::Saved` under `attn_grad_mode`'s default:
/// P lives from the forward to the backward, one per block, so at CvT-13 @224 batch 64
/// (630 MB per stage-1 block) recomputing is the only sensible choice.
const SAVED_P_MAX_BYTES: u64 = 32 << 20;

/// The probability mode for one attention of a training graph: `CVT_GPU_ATTN_GRAD`
/// (`saved` or `recompute`) if set, otherwise saved when P fits the adapter's
/// storage-binding limit and `SAVED_P_MAX_BYTES`. docs/perf.md has the measurements
/// behind the default.
pub fn attn_grad_mode(g: &Graph, s: &AttnShape) -> Result<AttnGrad> {
    let bytes = probs_len(s) as u64 * 4;
    let fits = bytes <= SAVED_P_MAX_BYTES.min(g.gpu.max_binding());
    match g.profile.attn_saved {
        None => Ok(if fits { AttnGrad::Saved } else { AttnGrad::Recompute }),
        Some(false) => Ok(AttnGrad::Recompute),
        Some(true) if bytes <= g.gpu.max_binding() => Ok(AttnGrad::Saved),
        Some(true) => bail!("CVT_GPU_ATTN_GRAD=saved: the probabilities of one attention ({} MiB) exceed this adapter's storage binding limit; use recompute", bytes >> 20),
    }
}

fn probs_len(s: &AttnShape) -> usize {
    s.batch * s.heads * s.tq * s.tkv
}

/// What the training forward keeps for `attention_backward`.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttnSaved {
    /// With `AttnGrad::Saved`: the probabilities P [batch, heads, tq, tkv].
    pub probs: Option<TensorId>,
    /// Recomputing in the GPU kernel set: (log-sum-exp, D) per query
    /// [batch, heads, tq] (the forward writes the first).
    pub lse: Option<TensorId>,
}

/// The training forward: the output, and what the backward needs (`AttnSaved`).
pub fn attention_train(g: &mut Graph, label: &str, (q, k, v): (TensorId, TensorId, TensorId), s: AttnShape, grad: AttnGrad, kind: MatmulKind) -> Result<(TensorId, AttnSaved)> {
    forward(g, label, (q, k, v), s, kind, Some(grad))
}

/// `grad`: None for inference, else how the training backward gets P.
fn forward(g: &mut Graph, label: &str, (q, k, v): (TensorId, TensorId, TensorId), s: AttnShape, kind: MatmulKind, grad: Option<AttnGrad>) -> Result<(TensorId, AttnSaved)> {
    check_heads(s.c, s.heads)?;
    let d4 = s.c / s.heads / 4;
    let o = g.tensor(label.to_string(), s.batch * s.tq * s.c);
    let save = grad == Some(AttnGrad::Saved);
    let probs = save.then(|| g.tensor(format!("{label}.probs"), probs_len(&s)));
    // Binding 14 is statically used by both forward entry points (WGSL counts uses
    // under an override-constant branch): a placeholder fills it when P is not saved.
    let p_res = probs.map_or_else(|| Res::Buf(g.gpu.placeholder()), Res::Act);
    let consts = [("WG", WG as f64), ("D4", d4 as f64), ("SAVE_P", save as u32 as f64)];
    let params = |batch: usize, b_off: usize| Res::uniform(&AttnParams::of(&s, batch, b_off));
    // QKᵀ and PV: 2 multiply-adds per (query, key, channel).
    let flops = |batch: usize| 4.0 * (batch * s.tq * s.tkv * s.c) as f64;
    if let Some(chunks) = texture_chunks(g, &s, kind) {
        let qpi = g.profile.attn_queries;
        anyhow::ensure!([1, 2, 4].contains(&qpi), "{label}: attn_queries must be 1, 2 or 4, not {qpi}");
        let wg = g.profile.attn_wg;
        let consts = [("WG", wg as f64), ("D4", d4 as f64), ("SAVE_P", save as u32 as f64), ("QPI", qpi as f64)];
        let pipeline = g.pipeline("attention", "main_tex", &consts)?;
        for (b0, nb) in chunks {
            let qt = texture_rows(g, label, q, &s, (s.tq, b0, nb), 5)?;
            let kt = texture_rows(g, label, k, &s, (s.tkv, b0, nb), 6)?;
            let vt = texture_rows(g, label, v, &s, (s.tkv, b0, nb), 7)?;
            let groups = [s.tq.div_ceil(wg * qpi) as u32, s.heads as u32, nb as u32];
            let bindings =
                bind([(at::O, Res::Act(o)), (at::PARAMS, params(nb, b0)), (at::Q_TEX, Res::ActTex(qt)), (at::K_TEX, Res::ActTex(kt)), (at::V_TEX, Res::ActTex(vt)), (at::PROBS, p_res.clone())]);
            g.dispatch(label, pipeline.clone(), bindings, groups, flops(nb));
        }
        return Ok((o, AttnSaved { probs, lse: None }));
    }
    // Recomputing: the log-sum-exp per query for the backward (binding 10; a
    // placeholder otherwise, as for binding 14).
    let lse = (grad == Some(AttnGrad::Recompute)).then(|| g.tensor(format!("{label}.lse_d"), s.batch * s.heads * s.tq * 2));
    let lse_res = lse.map_or_else(|| Res::Buf(g.gpu.placeholder()), Res::Act);
    let consts = [consts[0], consts[1], consts[2], ("SAVE_LSE", lse.is_some() as u32 as f64), ("TK", key_tile(g, s.tkv, d4) as f64)];
    let pipeline = g.pipeline("attention", "main", &consts)?;
    let groups = [s.tq.div_ceil(WG) as u32, s.heads as u32, s.batch as u32];
    // Binding 8 (dO) is statically used through stage_tile, which the backward
    // shares, and never read here: q fills it (a read-only binding, as at 0; the
    // placeholder is bound read-write at 10 and 14).
    let bindings = bind([
        (at::Q, Res::Act(q)),
        (at::K, Res::Act(k)),
        (at::V, Res::Act(v)),
        (at::O, Res::Act(o)),
        (at::PARAMS, params(s.batch, 0)),
        (at::DOUT, Res::Act(q)),
        (at::LSE, lse_res),
        (at::PROBS, p_res),
    ]);
    g.dispatch(label, pipeline, bindings, groups, flops(s.batch));
    Ok((o, AttnSaved { probs, lse }))
}

/// Batch chunks of the texture kernels (`gemm::texture_batches`), else None.
fn texture_chunks(g: &Graph, s: &AttnShape, kind: MatmulKind) -> Option<Vec<(usize, usize)>> {
    crate::ops::gemm::texture_batches(g, kind == MatmulKind::Texture, s.batch, s.tq.max(s.tkv), s.c)
}

/// Images [b0, b0 + nb) of a [batch, rows_per, c] tensor as a texture bound at `binding`.
fn texture_rows(g: &mut Graph, label: &str, t: TensorId, s: &AttnShape, (rows_per, b0, nb): (usize, usize, usize), binding: u32) -> Result<crate::graph::TexRef> {
    act_rows_texture(g, label, t, s.batch * rows_per, s.c, (b0 * rows_per, nb * rows_per), binding)
}

/// Appends the attention backward (texture operands on texture-preferring
/// adapters, as the forward): given q, k, v, the forward output o, what the
/// forward kept (`AttnSaved`) and the output's gradient dout, returns (dq, dk, dv).
pub fn attention_backward(
    g: &mut Graph,
    label: &str,
    (q, k, v, o): (TensorId, TensorId, TensorId, TensorId),
    saved: AttnSaved,
    dout: TensorId,
    s: AttnShape,
) -> Result<(TensorId, TensorId, TensorId)> {
    let probs = saved.probs;
    check_heads(s.c, s.heads)?;
    let d4 = s.c / s.heads / 4;
    let dq = g.tensor(format!("{label}.dq"), s.batch * s.tq * s.c);
    let dk = g.tensor(format!("{label}.dk"), s.batch * s.tkv * s.c);
    let dv = g.tensor(format!("{label}.dv"), s.batch * s.tkv * s.c);
    let params = AttnParams::of(&s, s.batch, 0);
    let consts = [("WG", WG as f64), ("D4", d4 as f64)];
    let u = || Res::Unused;
    let pair_flops = 2.0 * (s.batch * s.tq * s.tkv * s.c) as f64;
    // Row operations per (query, key) pair, each 2·C flops over the heads: recomputing,
    // the per-query pass does Q·Kᵀ twice (texture form, online softmax; the GPU
    // set reads the forward's log-sum-exp: once, 3), dO·Vᵀ and dS·K (4) and the per-key pass Q·Kᵀ,
    // dO·Vᵀ, Pᵀ·dO and dSᵀ·Q (4); with saved P, dO·Vᵀ and dS·K (2), Pᵀ·dO and dSᵀ·Q (2).
    // Recomputing, binding 10 holds (logsumexp, D) per query from the per-query pass;
    // saved, 14 holds P and 15 the dS the per-query pass writes.
    let chunks = texture_chunks(g, &s, g.profile.matmul());
    let (names, (fq, fkv), dscore, (r10, r14, r15)) = match probs {
        None => {
            // The GPU set's kernels read the forward's log-sum-exp; the texture
            // kernels find it themselves.
            let ld = match (saved.lse, &chunks) {
                (Some(ld), None) => ld,
                (None, None) => anyhow::bail!("{label}: the recomputing backward needs the forward's log-sum-exp (attention_train in the same kernel set)"),
                (_, Some(_)) => g.tensor(format!("{label}.lse_d"), s.batch * s.heads * s.tq * 2),
            };
            (("attn_bwd_q", "attn_bwd_kv"), (4.0, 4.0), None, (Res::Act(ld), u(), u()))
        }
        Some(p) => {
            let ds = g.tensor(format!("{label}.dscore"), probs_len(&s));
            (("attn_bwd_q_p", "attn_bwd_kv_p"), (2.0, 2.0), Some(ds), (u(), Res::Act(p), Res::Act(ds)))
        }
    };
    // The GPU set's per-query pass with the saved log-sum-exp: Q·Kᵀ, dO·Vᵀ, dS·K.
    let fq = if chunks.is_none() && probs.is_none() { 3.0 } else { fq };
    if let Some(chunks) = chunks {
        // K, V for the per-query pass and Q, dO for the per-key pass as textures.
        let wg = g.profile.attn_wg;
        let consts = [("WG", wg as f64), ("D4", d4 as f64)];
        let pq = g.pipeline("attention", &format!("{}_tex", names.0), &consts)?;
        let pkv = g.pipeline("attention", &format!("{}_tex", names.1), &consts)?;
        for (b0, nb) in chunks {
            let mut params = params;
            // P and dS of this chunk's images only, from the texel holding the
            // chunk's first element (an image's P need not be whole texels).
            let per_image = s.heads * s.tq * s.tkv;
            let (t0, t1) = (b0 * per_image / 4, ((b0 + nb) * per_image).div_ceil(4));
            (params.b_off, params.p_off) = (b0 as u32, (b0 * per_image % 4) as u32);
            let chunk_flops = pair_flops * nb as f64 / s.batch as f64;
            let kt = texture_rows(g, label, k, &s, (s.tkv, b0, nb), 6)?;
            let vt = texture_rows(g, label, v, &s, (s.tkv, b0, nb), 7)?;
            // Q and dO serve both passes.
            let qt = texture_rows(g, label, q, &s, (s.tq, b0, nb), 5)?;
            let gt = texture_rows(g, label, dout, &s, (s.tq, b0, nb), 13)?;
            // The recomputing pass reads the query rows; the saved one reads P instead.
            let qtex = if probs.is_none() { Res::ActTex(qt) } else { u() };
            let p_tex = probs.map(|p| g.linear_texture_range(p, t0, t1 - t0, at::PROBS_TEX as u32));
            let pt = p_tex.map_or_else(u, Res::ActTex);
            let bq = bind([
                (at::O, Res::Act(o)),
                (at::PARAMS, Res::uniform(&params)),
                (at::Q_TEX, qtex),
                (at::K_TEX, Res::ActTex(kt)),
                (at::V_TEX, Res::ActTex(vt)),
                (at::DQ, Res::Act(dq)),
                (at::LSE, r10.clone()),
                (at::DOUT_TEX, Res::ActTex(gt)),
                (at::DSCORE, r15.clone()),
                (at::PROBS_TEX, pt),
            ]);
            g.dispatch(format!("{label}.bwd_q"), pq.clone(), bq, [s.tq.div_ceil(wg) as u32, s.heads as u32, nb as u32], fq * chunk_flops);
            let (kb, vb) = if probs.is_none() { (Res::Act(k), Res::Act(v)) } else { (u(), u()) };
            let mut bkv = vec![
                (at::K, kb),
                (at::V, vb),
                (at::PARAMS, Res::uniform(&params)),
                (at::Q_TEX, Res::ActTex(qt)),
                (at::LSE, r10.clone()),
                (at::DK, Res::Act(dk)),
                (at::DV, Res::Act(dv)),
                (at::DOUT_TEX, Res::ActTex(gt)),
            ];
            if let (Some(pt), Some(ds)) = (p_tex, dscore) {
                // P's texture from the per-query pass (nothing refills binding 16 in between).
                let dst = g.linear_texture_range(ds, t0, t1 - t0, at::DSCORE_TEX as u32);
                bkv.extend([(at::PROBS_TEX, Res::ActTex(pt)), (at::DSCORE_TEX, Res::ActTex(dst))]);
            }
            g.dispatch(format!("{label}.bwd_kv"), pkv.clone(), bind(bkv), [s.tkv.div_ceil(wg) as u32, s.heads as u32, nb as u32], fkv * chunk_flops);
        }
        return Ok((dq, dk, dv));
    }
    let groups = |t: usize| [t.div_ceil(WG) as u32, s.heads as u32, s.batch as u32];
    let qb = if probs.is_none() { Res::Act(q) } else { u() };
    let bq = bind([
        (at::Q, qb),
        (at::K, Res::Act(k)),
        (at::V, Res::Act(v)),
        (at::O, Res::Act(o)),
        (at::PARAMS, Res::uniform(&params)),
        (at::DOUT, Res::Act(dout)),
        (at::DQ, Res::Act(dq)),
        (at::LSE, r10.clone()),
        (at::PROBS, r14.clone()),
        (at::DSCORE, r15.clone()),
    ]);
    // The per-query pass walks the keys, the per-key pass the queries.
    let pq = g.pipeline("attention", names.0, &[consts[0], consts[1], ("TK", key_tile(g, s.tkv, d4) as f64)])?;
    g.dispatch(format!("{label}.bwd_q"), pq, bq, groups(s.tq), fq * pair_flops);
    let (kb, vb) = if probs.is_none() { (Res::Act(k), Res::Act(v)) } else { (u(), u()) };
    let bkv = bind([
        (at::Q, Res::Act(q)),
        (at::K, kb),
        (at::V, vb),
        (at::PARAMS, Res::uniform(&params)),
        (at::DOUT, Res::Act(dout)),
        (at::LSE, r10),
        (at::DK, Res::Act(dk)),
        (at::DV, Res::Act(dv)),
        (at::PROBS, r14),
        (at::DSCORE, r15),
    ]);
    let pkv = g.pipeline("attention", names.1, &[consts[0], consts[1], ("TK", key_tile(g, s.tq, d4) as f64)])?;
    g.dispatch(format!("{label}.bwd_kv"), pkv, bkv, groups(s.tkv), fkv * pair_flops);
    Ok((dq, dk, dv))
}
