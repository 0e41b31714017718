//! The CvT forward (paper §3; spec §2), once, for inference and training: the
//! mode decides which BatchNorm the convolutional projections apply (folded
//! running statistics, or batch statistics with the running update), whether
//! residual adds are fused in place (inference) or kept apart for the backward,
//! what is saved, and where drop path applies. `Model` (kernel-ready layouts)
//! and `TrainModel` (buffers with gradients) hand their layers over through
//! `Layers`.

use anyhow::Result;
use std::sync::Arc;

use super::config::CvtConfig;
use crate::graph::{Graph, TensorId};
use crate::ops::attention::{attention, attention_train, attn_grad_mode, AttnSaved, AttnShape};
use crate::ops::dwconv::{conv_proj, conv_proj_train, kv_hw, ConvProj, ConvProjTrain, ProjSaved};
use crate::ops::matmul::{conv2d, linear, linear_act, linear_residual, Out};
use crate::ops::rownorm::{add_layernorm, layernorm, LayerNorm, RowMap};
use crate::ops::tokens::{add, add_into, add_scaled, cls_fill, mean_tokens};
use crate::ops::{Act, ConvGeom, Linear};

/// A block's convolutional projection: BatchNorm folded into the depthwise
/// weights (inference), or raw weights with batch-statistics BatchNorm (training).
pub(crate) enum Proj<'a> {
    Folded(&'a ConvProj),
    Train(&'a ConvProjTrain),
}

/// One block's layers, as the forward reads them.
pub(crate) struct BlockRef<'a> {
    pub norm1: &'a LayerNorm,
    pub proj: Proj<'a>,
    pub q: &'a Linear,
    pub k: &'a Linear,
    pub v: &'a Linear,
    pub o: &'a Linear,
    pub norm2: &'a LayerNorm,
    pub fc1: &'a Linear,
    pub fc2: &'a Linear,
}

/// The layers of a CvT, whatever layout holds them.
pub(crate) trait Layers {
    fn embed(&self, s: usize) -> &Linear;
    fn embed_norm(&self, s: usize) -> &LayerNorm;
    fn cls(&self, s: usize) -> Option<&Arc<wgpu::Buffer>>;
    fn block(&self, s: usize, j: usize) -> BlockRef<'_>;
    fn norm(&self) -> &LayerNorm;
    fn head(&self) -> &Linear;
}

/// How the forward is built. Training: per-sample drop-path scales
/// [block][branch][sample] where any block's rate (`rates`, all stages in order) is set.
#[derive(Clone, Copy)]
pub(crate) enum Mode<'a> {
    Infer,
    Train { drop: Option<TensorId>, rates: &'a [f32] },
}

/// What the training forward keeps for the backward.
pub(crate) struct BlockSaved {
    pub x0: TensorId,
    pub h1: TensorId,
    pub proj: ProjSaved,
    pub q: TensorId,
    pub k: TensorId,
    pub v: TensorId,
    pub attn: AttnSaved,
    pub q0: TensorId,
    pub k0: TensorId,
    pub v0: TensorId,
    pub a: TensorId,
    pub x1: TensorId,
    pub h2: TensorId,
    pub z: TensorId,
    pub u: TensorId,
}

pub(crate) struct StageSaved {
    pub input: TensorId,
    pub geom: ConvGeom,
    pub e: TensorId,
    pub blocks: Vec<BlockSaved>,
    pub t: usize,
    pub tk: usize,
    pub hw: (usize, usize),
}

pub(crate) struct Saved {
    pub stages: Vec<StageSaved>,
    /// The last stage's output stream, its tokens and width.
    pub x: TensorId,
    pub tokens: usize,
    pub c: usize,
    /// The head's input (the final norm of the class token).
    pub feat: TensorId,
    pub feat_map: RowMap,
}

/// Appends the forward of `batch` NHWC images at `input` (height × width):
/// returns the logits [batch, classes] (a pinned tensor) and, training, what the
/// backward reads.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(l: &impl Layers, cfg: &CvtConfig, act: Act, g: &mut Graph, input: TensorId, batch: usize, (height, width): (usize, usize), mode: Mode) -> Result<(TensorId, Option<Saved>)> {
    let grids = cfg.grids(height, width)?;
    let train = matches!(mode, Mode::Train { .. });
    // Block index over all stages, for the drop-path scales.
    let mut block_index = 0;
    let mut saved = vec![];
    let (mut x, mut h, mut w, mut cin, mut tokens, mut off) = (input, height, width, cfg.in_chans, height * width, 0);
    for (s, &(oh, ow)) in grids.iter().enumerate() {
        let c = cfg.dims[s];
        let geom = ConvGeom { batch, in_h: h, in_w: w, cin, in_tokens: tokens, in_tok_off: off, k: cfg.patch_sizes[s], stride: cfg.patch_strides[s], pad: cfg.patch_padding[s] };
        let e = conv2d(g, &format!("stage{s}.embed"), x, geom, l.embed(s))?;
        let cls = l.cls(s).is_some() as usize;
        let t = cls + oh * ow;
        let xs = g.tensor(format!("stage{s}.x"), batch * t * c);
        let map = RowMap { rows: batch * oh * ow, group: oh * ow, in_stride: oh * ow, in_off: 0, out_stride: t, out_off: cls };
        layernorm(g, &format!("stage{s}.embed_norm"), e, map, l.embed_norm(s), Some(xs))?;
        if let Some(cls_buf) = l.cls(s) {
            cls_fill(g, &format!("stage{s}.cls"), cls_buf, xs, batch, t, c)?;
        }
        let (kh, kw) = kv_hw(oh, ow);
        let tk = cls + kh * kw;
        let rows = batch * t;
        // Inference: a branch output not yet added to the stream xs
        // (`linear_residual`); the next LayerNorm adds it, or the stage's end.
        let mut pending: Option<TensorId> = None;
        let mut cur = xs;
        let mut blocks = vec![];
        for j in 0..cfg.depths[s] {
            let b = l.block(s, j);
            let lb = format!("stage{s}.blocks.{j}");
            let h1 = match pending.take() {
                Some(z) => add_layernorm(g, &format!("{lb}.norm1"), cur, z, rows, b.norm1)?,
                None => layernorm(g, &format!("{lb}.norm1"), cur, RowMap::dense(rows), b.norm1, None)?,
            };
            let ((q0, k0, v0), proj) = match b.proj {
                Proj::Folded(p) => (conv_proj(g, &format!("{lb}.conv_proj"), h1, batch, oh, ow, cls, p)?, None),
                Proj::Train(p) => {
                    let (qkv, sv) = conv_proj_train(g, &format!("{lb}.conv_proj"), h1, batch, oh, ow, cls, p)?;
                    (qkv, Some(sv))
                }
            };
            let q = linear(g, &format!("{lb}.proj_q"), q0, rows, b.q, Act::None, Out::New)?;
            let k = linear(g, &format!("{lb}.proj_k"), k0, batch * tk, b.k, Act::None, Out::New)?;
            let v = linear(g, &format!("{lb}.proj_v"), v0, batch * tk, b.v, Act::None, Out::New)?;
            let shape = AttnShape { batch, tq: t, tkv: tk, c, heads: cfg.heads[s], scale: (c as f32).powf(-0.5) };
            match mode {
                Mode::Infer => {
                    let a = attention(g, &format!("{lb}.attn"), q, k, v, shape)?;
                    let z = linear_residual(g, &format!("{lb}.proj"), a, rows, b.o, cur)?;
                    let h2 = match z {
                        Some(z) => add_layernorm(g, &format!("{lb}.norm2"), cur, z, rows, b.norm2)?,
                        None => layernorm(g, &format!("{lb}.norm2"), cur, RowMap::dense(rows), b.norm2, None)?,
                    };
                    let u = linear(g, &format!("{lb}.fc1"), h2, rows, b.fc1, act, Out::New)?;
                    pending = linear_residual(g, &format!("{lb}.fc2"), u, rows, b.fc2, cur)?;
                }
                Mode::Train { drop, rates } => {
                    let grad = attn_grad_mode(g, &shape)?;
                    let kind = g.profile.matmul();
                    let (a, attn) = attention_train(g, &format!("{lb}.attn"), (q, k, v), shape, grad, kind)?;
                    let dropped = drop.filter(|_| rates[block_index] > 0.0).map(|sc| (sc, 2 * block_index * batch));
                    let po = linear(g, &format!("{lb}.proj"), a, rows, b.o, Act::None, Out::New)?;
                    let x1 = match dropped {
                        Some((sc, o)) => add_scaled(g, &format!("{lb}.res1"), cur, po, sc, t * c, o)?,
                        None => add(g, &format!("{lb}.res1"), cur, po)?,
                    };
                    let h2 = layernorm(g, &format!("{lb}.norm2"), x1, RowMap::dense(rows), b.norm2, None)?;
                    let (z, u) = linear_act(g, &format!("{lb}.fc1"), h2, rows, b.fc1, act)?;
                    let f = linear(g, &format!("{lb}.fc2"), u, rows, b.fc2, Act::None, Out::New)?;
                    let x2 = match dropped {
                        Some((sc, o)) => add_scaled(g, &format!("{lb}.res2"), x1, f, sc, t * c, o + batch)?,
                        None => add(g, &format!("{lb}.res2"), x1, f)?,
                    };
                    let proj = proj.expect("the training projection keeps its tensors");
                    blocks.push(BlockSaved { x0: cur, h1, proj, q, k, v, q0, k0, v0, a, attn, x1, h2, z, u });
                    cur = x2;
                }
            }
            block_index += 1;
        }
        if let Some(z) = pending {
            add_into(g, &format!("stage{s}.residual"), xs, z, xs)?;
        }
        if train {
            saved.push(StageSaved { input: x, geom, e, blocks, t, tk, hw: (oh, ow) });
        }
        (x, h, w, cin, tokens, off) = (cur, oh, ow, c, t, cls);
    }
    let c = cin;
    // Final norm on the class token only (spec §2.1); without one, on every
    // token, then their mean (inference).
    let feat_map = RowMap { rows: batch, group: 1, in_stride: tokens, in_off: 0, out_stride: 1, out_off: 0 };
    let feat = if off == 1 {
        layernorm(g, "norm", x, feat_map, l.norm(), None)?
    } else {
        anyhow::ensure!(!train, "training needs a cls token in the last stage");
        let n = layernorm(g, "norm", x, RowMap::dense(batch * tokens), l.norm(), None)?;
        mean_tokens(g, "pool", n, batch, tokens, c)?
    };
    let logits = g.pinned("logits", batch * cfg.num_classes);
    linear(g, "head", feat, batch, l.head(), Act::None, Out::Into(logits))?;
    Ok((logits, train.then_some(Saved { stages: saved, x, tokens, c, feat, feat_map })))
}
