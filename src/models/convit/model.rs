//! The ConViT model on the GPU: one forward (`Convit::forward`) that inference
//! and training both build, with the mode deciding what is kept for the
//! backward, whether residual adds are fused in place or kept apart, and where
//! drop-path applies; and the hand-written backward of the training step.
//!
//! Layout: the patch tokens [B, N, C] (N = gs²) run the GPSA blocks densely; before
//! block `local_layers` they are scattered below a class-token row into
//! [B, N + 1, C] (spec §2.1). Weights: `qk` [2C, C] and `qkv` [3C, C] are kept as
//! separate q, k (and v) layers, split by rows at load and joined again on export.

use anyhow::{ensure, Context, Result};
use std::collections::HashMap;
use std::sync::Arc;

use super::config::{ConvitConfig, LN_EPS};
use crate::gpu::{Gpu, MatmulKind};
use crate::graph::{Graph, TensorId};
use crate::models::cvt::ForwardPlan;
use crate::models::step::{Optimizer, Param, StepPlan};
use crate::models::Tensor;
use crate::ops::attention::{attention, attention_backward, attention_train, attn_grad_mode, AttnSaved, AttnShape};
use crate::ops::gpsa::{gpsa, gpsa_backward, gpsa_train, Gpsa, GpsaGrad, GpsaSaved, GpsaShape};
use crate::ops::matmul::{conv2d, conv2d_backward, linear, linear_act, linear_backward, linear_backward_act, linear_residual, LinearGrad, Out, WeightFormat};
use crate::ops::rownorm::{add_layernorm, layernorm, layernorm_backward, softmax, softmax_xent, LayerNorm, LayerNormGrad, RowMap};
use crate::ops::tokens::{add, add_into, add_pos, add_scaled, batch_sum, cls_fill, cls_grad, gather_rows, scale_rows, scatter_rows};
use crate::ops::{Act, ConvGeom, Linear};

/// A linear layer and, for training, its gradient.
struct Lin {
    l: Linear,
    g: Option<LinearGrad>,
}

struct Ln {
    l: LayerNorm,
    g: Option<LayerNormGrad>,
}

/// A parameter the model holds as a plain buffer (position embedding, class token).
struct Table {
    v: Arc<wgpu::Buffer>,
    g: Option<Arc<wgpu::Buffer>>,
    len: usize,
}

struct Block {
    norm1: Ln,
    q: Lin,
    k: Lin,
    v: Lin,
    /// GPSA's positional parameters (and gradients); None for plain attention.
    pos: Option<(Gpsa, Option<GpsaGrad>)>,
    proj: Lin,
    norm2: Ln,
    fc1: Lin,
    fc2: Lin,
}

/// A ConViT whose weights live on the GPU, built for inference or for training.
pub struct Convit {
    pub gpu: Arc<Gpu>,
    pub cfg: ConvitConfig,
    embed: Lin,
    pos_embed: Table,
    cls: Table,
    blocks: Vec<Block>,
    norm: Ln,
    head: Lin,
    training: bool,
    half: bool,
    /// Drop-path rate of each block (training; 0 = off).
    drop_path: Vec<f32>,
    /// Bytes of weights uploaded.
    pub weight_bytes: u64,
}

fn get<'a>(t: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a [f32]> {
    Ok(&t.get(name).with_context(|| format!("missing tensor {name}"))?.data)
}

/// What the forward keeps for the backward (training).
struct BlockSaved {
    x0: TensorId,
    h1: TensorId,
    q: TensorId,
    k: TensorId,
    v: TensorId,
    attn: Attn,
    a: TensorId,
    x1: TensorId,
    h2: TensorId,
    z: TensorId,
    u: TensorId,
}

#[derive(Clone, Copy)]
enum Attn {
    Gpsa(GpsaSaved),
    Plain(AttnSaved),
}

struct Saved {
    blocks: Vec<BlockSaved>,
    /// The stream after the last block, [B, N + 1, C].
    x: TensorId,
    feat: TensorId,
    geom: ConvGeom,
}

/// How a forward is built: for inference (fused residuals, nothing kept), or for
/// the training step (batch-statistics-free here: ConViT has no BatchNorm), with
/// per-sample drop-path scales [block][branch][sample] where any rate is set.
#[derive(Clone, Copy)]
enum Mode {
    Infer,
    Train { drop: Option<TensorId> },
}

impl Convit {
    /// From tensors in the official/timm naming (checked by the caller against
    /// `cfg.expected_shapes`). `training`: f32 buffer weights with gradients;
    /// else kernel-ready layouts in `fmt`.
    pub fn new(gpu: Arc<Gpu>, cfg: ConvitConfig, t: &HashMap<String, Tensor>, training: bool, fmt: WeightFormat) -> Result<Convit> {
        cfg.validate()?;
        let fmt = if training { WeightFormat::F32 } else { fmt };
        let half = fmt == WeightFormat::Half;
        let (c, h, hid, p) = (cfg.dim(), cfg.heads, cfg.hidden(), cfg.patch_size);
        let mk = |name: &str, w: &[f32], b: Option<&[f32]>, n: usize, k: usize| -> Result<Lin> {
            if training {
                let l = Linear::with_kind(&gpu, name, w, b, n, k, MatmulKind::Buffer)?;
                Ok(Lin { g: Some(LinearGrad::new(&gpu, name, &l)?), l })
            } else {
                Ok(Lin { l: Linear::from_torch_in(&gpu, name, w, b, n, k, fmt)?, g: None })
            }
        };
        let lin = |name: &str, n: usize, k: usize| mk(name, get(t, &format!("{name}.weight"))?, Some(get(t, &format!("{name}.bias"))?), n, k);
        let ln = |name: &str| -> Result<Ln> {
            let (gm, bt) = (get(t, &format!("{name}.weight"))?, get(t, &format!("{name}.bias"))?);
            if training {
                let l = LayerNorm::new(&gpu, name, gm, bt)?.with_eps(LN_EPS);
                Ok(Ln { g: Some(LayerNormGrad::new(&gpu, name, c)?), l })
            } else {
                Ok(Ln { l: LayerNorm::frozen(&gpu, name, gm, bt, half)?.with_eps(LN_EPS), g: None })
            }
        };
        let param = |name: &str| -> Result<Table> {
            let v = get(t, name)?;
            let g = if training { Some(Arc::new(gpu.storage(&format!("{name}.grad"), (v.len() * 4) as u64)?)) } else { None };
            // Copied into f16 activations as stored in an f16 plan.
            let buf = if half { gpu.upload_bytes(name, bytemuck::cast_slice(&crate::gpu::to_f16(v)))? } else { gpu.upload(name, v)? };
            Ok(Table { v: Arc::new(buf), g, len: v.len() })
        };
        let ew = get(t, "patch_embed.proj.weight")?;
        let eb = get(t, "patch_embed.proj.bias")?;
        let embed = if training {
            let l = Linear::conv_with_kind(&gpu, "patch_embed.proj", ew, Some(eb), c, cfg.in_chans, p, p, MatmulKind::Buffer)?;
            Lin { g: Some(LinearGrad::new(&gpu, "patch_embed.proj", &l)?), l }
        } else {
            Lin { l: Linear::from_conv_in(&gpu, "patch_embed.proj", ew, Some(eb), (c, cfg.in_chans, p, p), fmt)?, g: None }
        };
        let mut blocks = vec![];
        for i in 0..cfg.depth {
            let b = format!("blocks.{i}");
            let local = i < cfg.local_layers;
            // q, k (and v) by rows of the fused weight, bias-free (qkv_bias=False).
            let (fused, parts) = if local { (format!("{b}.attn.qk.weight"), 2) } else { (format!("{b}.attn.qkv.weight"), 3) };
            let w = get(t, &fused)?;
            let part = |j: usize| &w[j * c * c..(j + 1) * c * c];
            let (q, k) = (mk(&format!("{b}.attn.q"), part(0), None, c, c)?, mk(&format!("{b}.attn.k"), part(1), None, c, c)?);
            let v = if parts == 3 { mk(&format!("{b}.attn.v"), part(2), None, c, c)? } else { mk(&format!("{b}.attn.v"), get(t, &format!("{b}.attn.v.weight"))?, None, c, c)? };
            let pos = if local {
                let name = format!("{b}.attn");
                let (w, pb, gate) = (get(t, &format!("{name}.pos_proj.weight"))?, get(t, &format!("{name}.pos_proj.bias"))?, get(t, &format!("{name}.gating_param"))?);
                let g = if training { Gpsa::new(&gpu, &name, w, pb, gate)? } else { Gpsa::frozen(&gpu, &name, w, pb, gate, cfg.patches())? };
                let gg = if training { Some(GpsaGrad::new(&gpu, &name, h)?) } else { None };
                Some((g, gg))
            } else {
                None
            };
            blocks.push(Block {
                norm1: ln(&format!("{b}.norm1"))?,
                q,
                k,
                v,
                pos,
                proj: lin(&format!("{b}.attn.proj"), c, c)?,
                norm2: ln(&format!("{b}.norm2"))?,
                fc1: lin(&format!("{b}.mlp.fc1"), hid, c)?,
                fc2: lin(&format!("{b}.mlp.fc2"), c, hid)?,
            });
        }
        let weight_bytes = t.values().map(|x| (x.data.len() * 4) as u64).sum();
        let model = Convit {
            embed,
            pos_embed: param("pos_embed")?,
            cls: param("cls_token")?,
            blocks,
            norm: ln("norm")?,
            head: lin("head", cfg.num_classes, c)?,
            training,
            half,
            drop_path: vec![0.0; cfg.depth],
            weight_bytes,
            gpu: gpu.clone(),
            cfg,
        };
        gpu.check_error()?;
        Ok(model)
    }

    /// Whether its plans run in f16 (`Graph::half`).
    pub fn half(&self) -> bool {
        self.half
    }

    /// Stochastic depth as timm: block i's rate linspace(0, rate, depth)[i].
    /// Takes effect in step plans built afterwards.
    pub fn set_drop_path(&mut self, rate: f32) {
        let d = self.cfg.depth;
        self.drop_path = (0..d).map(|i| if d > 1 { rate * i as f32 / (d - 1) as f32 } else { rate }).collect();
    }

    pub fn drop_path_rates(&self) -> &[f32] {
        &self.drop_path
    }

    /// The forward for `batch` images [batch, S, S, in_chans] at `images`:
    /// returns the logits [batch, classes] and, training, what the backward reads.
    fn forward(&self, g: &mut Graph, images: TensorId, batch: usize, mode: Mode) -> Result<(TensorId, Option<Saved>)> {
        let cfg = &self.cfg;
        let (c, n, s) = (cfg.dim(), cfg.patches(), cfg.image_size);
        let train = matches!(mode, Mode::Train { .. });
        let geom = ConvGeom { batch, in_h: s, in_w: s, cin: cfg.in_chans, in_tokens: s * s, in_tok_off: 0, k: cfg.patch_size, stride: cfg.patch_size, pad: 0 };
        let e = conv2d(g, "patch_embed", images, geom, &self.embed.l)?;
        let mut x = add_pos(g, "pos_embed", e, &self.pos_embed.v, n * c)?;
        let mut t = n;
        let mut saved = vec![];
        // Inference: a branch output the GEMM's epilogue did not add to the stream
        // x yet (`linear_residual`); the next LayerNorm adds it.
        let mut pending: Option<TensorId> = None;
        for (i, b) in self.blocks.iter().enumerate() {
            let l = format!("blocks.{i}");
            if i == cfg.local_layers {
                if let Some(z) = pending.take() {
                    add_into(g, &format!("{l}.residual"), x, z, x)?;
                }
                let x1 = g.tensor(format!("{l}.with_cls"), batch * (n + 1) * c);
                scatter_rows(g, &format!("{l}.tokens"), x, x1, c, (batch * n, n, n + 1, 1))?;
                cls_fill(g, &format!("{l}.cls"), &self.cls.v, x1, batch, n + 1, c)?;
                (x, t) = (x1, n + 1);
            }
            let rows = batch * t;
            let h1 = match pending.take() {
                Some(z) => add_layernorm(g, &format!("{l}.norm1"), x, z, rows, &b.norm1.l)?,
                None => layernorm(g, &format!("{l}.norm1"), x, RowMap::dense(rows), &b.norm1.l, None)?,
            };
            let q = linear(g, &format!("{l}.attn.q"), h1, rows, &b.q.l, Act::None, Out::New)?;
            let k = linear(g, &format!("{l}.attn.k"), h1, rows, &b.k.l, Act::None, Out::New)?;
            let v = linear(g, &format!("{l}.attn.v"), h1, rows, &b.v.l, Act::None, Out::New)?;
            let kind = g.profile.matmul();
            let (a, attn) = match (&b.pos, mode) {
                (Some((pos, _)), Mode::Infer) => (gpsa(g, &format!("{l}.attn"), (q, k, v), GpsaShape { batch, n: t, c, heads: cfg.heads }, pos, kind)?, None),
                (Some((pos, _)), Mode::Train { .. }) => {
                    let s = GpsaShape { batch, n: t, c, heads: cfg.heads };
                    let grad = attn_grad_mode(g, &s.attn())?;
                    let (a, sv) = gpsa_train(g, &format!("{l}.attn"), (q, k, v), s, pos, grad, kind)?;
                    (a, Some(Attn::Gpsa(sv)))
                }
                (None, _) => {
                    let shape = AttnShape { batch, tq: t, tkv: t, c, heads: cfg.heads, scale: (cfg.head_dim as f32).powf(-0.5) };
                    if train {
                        let grad = attn_grad_mode(g, &shape)?;
                        let (a, sv) = attention_train(g, &format!("{l}.attn"), (q, k, v), shape, grad, kind)?;
                        (a, Some(Attn::Plain(sv)))
                    } else {
                        (attention(g, &format!("{l}.attn"), q, k, v, shape)?, None)
                    }
                }
            };
            match mode {
                Mode::Infer => {
                    let z = linear_residual(g, &format!("{l}.attn.proj"), a, rows, &b.proj.l, x)?;
                    let h2 = match z {
                        Some(z) => add_layernorm(g, &format!("{l}.norm2"), x, z, rows, &b.norm2.l)?,
                        None => layernorm(g, &format!("{l}.norm2"), x, RowMap::dense(rows), &b.norm2.l, None)?,
                    };
                    let u = linear(g, &format!("{l}.mlp.fc1"), h2, rows, &b.fc1.l, Act::Gelu, Out::New)?;
                    pending = linear_residual(g, &format!("{l}.mlp.fc2"), u, rows, &b.fc2.l, x)?;
                }
                Mode::Train { drop } => {
                    let dropped = drop.filter(|_| self.drop_path[i] > 0.0).map(|sc| (sc, 2 * i * batch));
                    let po = linear(g, &format!("{l}.attn.proj"), a, rows, &b.proj.l, Act::None, Out::New)?;
                    let x1 = match dropped {
                        Some((sc, off)) => add_scaled(g, &format!("{l}.res1"), x, po, sc, t * c, off)?,
                        None => add(g, &format!("{l}.res1"), x, po)?,
                    };
                    let h2 = layernorm(g, &format!("{l}.norm2"), x1, RowMap::dense(rows), &b.norm2.l, None)?;
                    let (z, u) = linear_act(g, &format!("{l}.mlp.fc1"), h2, rows, &b.fc1.l, Act::Gelu)?;
                    let f = linear(g, &format!("{l}.mlp.fc2"), u, rows, &b.fc2.l, Act::None, Out::New)?;
                    let x2 = match dropped {
                        Some((sc, off)) => add_scaled(g, &format!("{l}.res2"), x1, f, sc, t * c, off + batch)?,
                        None => add(g, &format!("{l}.res2"), x1, f)?,
                    };
                    saved.push(BlockSaved { x0: x, h1, q, k, v, attn: attn.expect("training keeps attention state"), a, x1, h2, z, u });
                    x = x2;
                }
            }
        }
        if let Some(z) = pending.take() {
            add_into(g, "residual", x, z, x)?;
        }
        // The final norm on the class token (row 0 of each image; LayerNorm is per row).
        let feat_map = RowMap { rows: batch, group: 1, in_stride: t, in_off: 0, out_stride: 1, out_off: 0 };
        let feat = layernorm(g, "norm", x, feat_map, &self.norm.l, None)?;
        let logits = g.pinned("logits", batch * cfg.num_classes);
        linear(g, "head", feat, batch, &self.head.l, Act::None, Out::Into(logits))?;
        let saved = train.then_some(Saved { blocks: saved, x, feat, geom });
        Ok((logits, saved))
    }

    /// The compiled inference forward for `batch` images of the model's size.
    pub fn plan(&self, batch: usize) -> Result<ForwardPlan> {
        ensure!(batch >= 1, "batch must be at least 1");
        ensure!(!self.training, "internal: an inference plan of a training model");
        let s = self.cfg.image_size;
        let mut g = Graph::new(self.gpu.clone());
        g.half = self.half;
        let input = g.pinned("image", batch * s * s * self.cfg.in_chans);
        let (logits, _) = self.forward(&mut g, input, batch, Mode::Infer)?;
        let probs = g.pinned("probs", batch * self.cfg.num_classes);
        softmax(&mut g, "softmax", logits, batch, self.cfg.num_classes, Some(probs))?;
        let plan = g.compile()?;
        Ok(ForwardPlan { plan, batch, height: s, width: s, classes: self.cfg.num_classes, input, logits, probs })
    }

    /// Forward and backward for `batch` images; the loss is the mean
    /// cross-entropy against soft targets [batch, classes].
    pub fn step_plan(&self, batch: usize) -> Result<StepPlan> {
        ensure!(self.training, "internal: a training step of an inference model");
        let cfg = &self.cfg;
        let (c, n, s) = (cfg.dim(), cfg.patches(), cfg.image_size);
        let mut g = Graph::new(self.gpu.clone());
        let images = g.pinned("images", batch * s * s * cfg.in_chans);
        let targets = g.pinned("targets", batch * cfg.num_classes);
        let drop = self.drop_path.iter().any(|&r| r > 0.0).then(|| g.pinned("drop_path.scales", 2 * cfg.depth * batch));
        let (logits, saved) = self.forward(&mut g, images, batch, Mode::Train { drop })?;
        let sv = saved.expect("training forward keeps its tensors");
        let (dlogits, loss) = softmax_xent(&mut g, "xent", logits, targets, batch, cfg.num_classes, 1.0 / batch as f32)?;
        fn grad(l: &Lin) -> &LinearGrad {
            l.g.as_ref().expect("training layers have gradients")
        }
        fn lgrad(l: &Ln) -> &LayerNormGrad {
            l.g.as_ref().expect("training norms have gradients")
        }
        let dfeat = linear_backward(&mut g, "head", sv.feat, dlogits, batch, &self.head.l, grad(&self.head), None)?;
        let t_last = n + 1;
        let dx_last = g.tensor("d.blocks_out", batch * t_last * c);
        g.clear(dx_last);
        let feat_map = RowMap { rows: batch, group: 1, in_stride: t_last, in_off: 0, out_stride: 1, out_off: 0 };
        let mut dcur = layernorm_backward(&mut g, "norm", sv.x, dfeat, feat_map, &self.norm.l, lgrad(&self.norm), Some(dx_last))?;
        for (i, b) in self.blocks.iter().enumerate().rev() {
            let bs = &sv.blocks[i];
            let l = format!("blocks.{i}");
            let t = if i >= cfg.local_layers { n + 1 } else { n };
            let rows = batch * t;
            let dropped = match drop {
                Some(sc) if self.drop_path[i] > 0.0 => Some((sc, 2 * i * batch)),
                _ => None,
            };
            let dbranch = match dropped {
                Some((sc, off)) => scale_rows(&mut g, &format!("{l}.dpath2"), dcur, sc, t * c, off + batch)?,
                None => dcur,
            };
            let du = linear_backward_act(&mut g, &format!("{l}.mlp.fc2"), bs.u, dbranch, rows, &b.fc2.l, grad(&b.fc2), (bs.z, Act::Gelu))?;
            let dh2 = linear_backward(&mut g, &format!("{l}.mlp.fc1"), bs.h2, du, rows, &b.fc1.l, grad(&b.fc1), None)?;
            let dx1b = layernorm_backward(&mut g, &format!("{l}.norm2"), bs.x1, dh2, RowMap::dense(rows), &b.norm2.l, lgrad(&b.norm2), None)?;
            let dx1 = add(&mut g, &format!("{l}.dres2"), dcur, dx1b)?;
            let dbranch = match dropped {
                Some((sc, off)) => scale_rows(&mut g, &format!("{l}.dpath1"), dx1, sc, t * c, off)?,
                None => dx1,
            };
            let da = linear_backward(&mut g, &format!("{l}.attn.proj"), bs.a, dbranch, rows, &b.proj.l, grad(&b.proj), None)?;
            let (dq, dk, dv) = match (bs.attn, &b.pos) {
                (Attn::Gpsa(gs), Some((pos, Some(pg)))) => gpsa_backward(&mut g, &format!("{l}.attn"), (bs.q, bs.k, bs.v), gs, da, GpsaShape { batch, n: t, c, heads: cfg.heads }, pos, pg)?,
                (Attn::Plain(sv), None) => {
                    let shape = AttnShape { batch, tq: t, tkv: t, c, heads: cfg.heads, scale: (cfg.head_dim as f32).powf(-0.5) };
                    attention_backward(&mut g, &format!("{l}.attn"), (bs.q, bs.k, bs.v, bs.a), sv, da, shape)?
                }
                _ => anyhow::bail!("internal: block {i}'s saved attention does not match its kind"),
            };
            let dhq = linear_backward(&mut g, &format!("{l}.attn.q"), bs.h1, dq, rows, &b.q.l, grad(&b.q), None)?;
            let dhk = linear_backward(&mut g, &format!("{l}.attn.k"), bs.h1, dk, rows, &b.k.l, grad(&b.k), None)?;
            let dhv = linear_backward(&mut g, &format!("{l}.attn.v"), bs.h1, dv, rows, &b.v.l, grad(&b.v), None)?;
            let dqk = add(&mut g, &format!("{l}.dqk"), dhq, dhk)?;
            let dh1 = add(&mut g, &format!("{l}.dh1"), dqk, dhv)?;
            let dx0b = layernorm_backward(&mut g, &format!("{l}.norm1"), bs.x0, dh1, RowMap::dense(rows), &b.norm1.l, lgrad(&b.norm1), None)?;
            dcur = add(&mut g, &format!("{l}.dres1"), dx1, dx0b)?;
            if i == cfg.local_layers {
                // Undo the class token's concatenation: its gradient, and the patches' rows.
                cls_grad(&mut g, "dcls", dcur, batch, n + 1, c, self.cls.g.as_ref().expect("training parameters have gradients"))?;
                let dp = g.tensor(format!("{l}.dtokens"), batch * n * c);
                gather_rows(&mut g, &format!("{l}.dtokens"), dcur, dp, c, (batch * n, n, n + 1, 1))?;
                dcur = dp;
            }
        }
        batch_sum(&mut g, "dpos_embed", dcur, batch, n * c, self.pos_embed.g.as_ref().expect("training parameters have gradients"))?;
        conv2d_backward(&mut g, "patch_embed", images, dcur, sv.geom, &self.embed.l, grad(&self.embed), None)?;
        let plan = g.compile()?;
        Ok(StepPlan { plan, batch, images, targets, loss, logits, drop_scales: drop })
    }

    /// Every parameter (`grads` false) or its gradient, in timm's names and shapes.
    fn read_tensors(&self, grads: bool) -> Result<HashMap<String, Tensor>> {
        ensure!(self.training, "internal: reading back an inference model");
        let gpu = &self.gpu;
        let cfg = &self.cfg;
        let (c, p) = (cfg.dim(), cfg.patch_size);
        let pick = |v: &Arc<wgpu::Buffer>, g: &Option<Arc<wgpu::Buffer>>| if grads { g.clone().expect("training parameters have gradients") } else { v.clone() };
        let mut flat: HashMap<String, Vec<f32>> = HashMap::new();
        let lw = |l: &Lin| -> Result<Vec<f32>> {
            let buf = if grads { l.g.as_ref().expect("training layers have gradients").w.clone() } else { l.l.w.clone().expect("training weights are buffers") };
            l.l.read_torch(gpu, &buf)
        };
        let lb = |l: &Lin| -> Result<Vec<f32>> {
            let buf = if grads { l.g.as_ref().expect("training layers have gradients").b.clone() } else { l.l.b.clone() };
            gpu.read(&buf, 0, l.l.n)
        };
        let lin = |flat: &mut HashMap<String, Vec<f32>>, name: &str, l: &Lin| -> Result<()> {
            flat.insert(format!("{name}.weight"), lw(l)?);
            flat.insert(format!("{name}.bias"), lb(l)?);
            Ok(())
        };
        let ln = |flat: &mut HashMap<String, Vec<f32>>, name: &str, l: &Ln| -> Result<()> {
            let g = l.g.as_ref();
            let (gm, bt) = if grads { (g.expect("grad").gamma.clone(), g.expect("grad").beta.clone()) } else { (l.l.gamma.clone(), l.l.beta.clone()) };
            flat.insert(format!("{name}.weight"), gpu.read(&gm, 0, c)?);
            flat.insert(format!("{name}.bias"), gpu.read(&bt, 0, c)?);
            Ok(())
        };
        let ebuf = if grads { self.embed.g.as_ref().expect("grad").w.clone() } else { self.embed.l.w.clone().expect("buffer") };
        flat.insert("patch_embed.proj.weight".into(), self.embed.l.read_torch_conv(gpu, &ebuf, cfg.in_chans, (p, p))?);
        flat.insert("patch_embed.proj.bias".into(), lb(&self.embed)?);
        flat.insert("pos_embed".into(), gpu.read(&pick(&self.pos_embed.v, &self.pos_embed.g), 0, self.pos_embed.len)?);
        flat.insert("cls_token".into(), gpu.read(&pick(&self.cls.v, &self.cls.g), 0, self.cls.len)?);
        for (i, b) in self.blocks.iter().enumerate() {
            let n = format!("blocks.{i}");
            ln(&mut flat, &format!("{n}.norm1"), &b.norm1)?;
            ln(&mut flat, &format!("{n}.norm2"), &b.norm2)?;
            let (q, k, v) = (lw(&b.q)?, lw(&b.k)?, lw(&b.v)?);
            match &b.pos {
                Some((pos, pg)) => {
                    flat.insert(format!("{n}.attn.qk.weight"), [q, k].concat());
                    flat.insert(format!("{n}.attn.v.weight"), v);
                    let h = cfg.heads;
                    let (w, bb, gt) = match (grads, pg) {
                        (true, Some(g)) => (g.pos_w.clone(), g.pos_b.clone(), g.gate.clone()),
                        _ => (pos.pos_w.clone(), pos.pos_b.clone(), pos.gate.clone()),
                    };
                    flat.insert(format!("{n}.attn.pos_proj.weight"), gpu.read(&w, 0, 3 * h)?);
                    flat.insert(format!("{n}.attn.pos_proj.bias"), gpu.read(&bb, 0, h)?);
                    flat.insert(format!("{n}.attn.gating_param"), gpu.read(&gt, 0, h)?);
                }
                None => {
                    flat.insert(format!("{n}.attn.qkv.weight"), [q, k, v].concat());
                }
            }
            lin(&mut flat, &format!("{n}.attn.proj"), &b.proj)?;
            lin(&mut flat, &format!("{n}.mlp.fc1"), &b.fc1)?;
            lin(&mut flat, &format!("{n}.mlp.fc2"), &b.fc2)?;
        }
        ln(&mut flat, "norm", &self.norm)?;
        lin(&mut flat, "head", &self.head)?;
        let mut out = HashMap::new();
        for (name, shape) in cfg.expected_shapes() {
            let data = flat.remove(&name).with_context(|| format!("internal: no tensor {name} in the model"))?;
            out.insert(name, Tensor::new(shape, data));
        }
        Ok(out)
    }

    /// Every gradient of the last step, in timm's names and shapes.
    pub fn gradients(&self) -> Result<HashMap<String, Tensor>> {
        self.read_tensors(true)
    }

    /// Every parameter, in timm's names and shapes (what `Convit::new` loads).
    pub fn weights(&self) -> Result<HashMap<String, Tensor>> {
        self.read_tensors(false)
    }

    /// AdamW over every parameter.
    pub fn optimizer(&self, settings: crate::ops::optim::AdamW) -> Result<Optimizer> {
        Optimizer::new(&self.gpu, self.params(), settings)
    }

    /// Every parameter buffer as the optimizer sees it (q, k and v apart), with
    /// the DeiT/ConViT recipe's decay groups: no decay on 1-D tensors (biases,
    /// norms, `gating_param`, `pos_proj.bias`), `pos_embed` and `cls_token`; decay
    /// on every matrix, `pos_proj.weight` [H, 3] included.
    pub fn params(&self) -> Vec<Param> {
        let mut v = vec![];
        let g = |o: &Option<Arc<wgpu::Buffer>>| o.clone().expect("training parameters have gradients");
        let lin = |v: &mut Vec<Param>, name: &str, l: &Lin, bias: bool| {
            let gr = l.g.as_ref().expect("training layers have gradients");
            let np = l.l.n.div_ceil(4) * 4;
            v.push(Param { name: format!("{name}.weight"), value: l.l.w.clone().expect("buffer"), grad: gr.w.clone(), len: l.l.k * np, decay: true });
            if bias {
                v.push(Param { name: format!("{name}.bias"), value: l.l.b.clone(), grad: gr.b.clone(), len: l.l.n, decay: false });
            }
        };
        let ln = |v: &mut Vec<Param>, name: &str, l: &Ln| {
            let gr = l.g.as_ref().expect("training norms have gradients");
            v.push(Param { name: format!("{name}.weight"), value: l.l.gamma.clone(), grad: gr.gamma.clone(), len: l.l.c, decay: false });
            v.push(Param { name: format!("{name}.bias"), value: l.l.beta.clone(), grad: gr.beta.clone(), len: l.l.c, decay: false });
        };
        v.push(Param { name: "cls_token".into(), value: self.cls.v.clone(), grad: g(&self.cls.g), len: self.cls.len, decay: false });
        v.push(Param { name: "pos_embed".into(), value: self.pos_embed.v.clone(), grad: g(&self.pos_embed.g), len: self.pos_embed.len, decay: false });
        lin(&mut v, "patch_embed.proj", &self.embed, true);
        for (i, b) in self.blocks.iter().enumerate() {
            let n = format!("blocks.{i}");
            ln(&mut v, &format!("{n}.norm1"), &b.norm1);
            lin(&mut v, &format!("{n}.attn.q"), &b.q, false);
            lin(&mut v, &format!("{n}.attn.k"), &b.k, false);
            lin(&mut v, &format!("{n}.attn.v"), &b.v, false);
            if let Some((pos, Some(pg))) = &b.pos {
                let h = self.cfg.heads;
                v.push(Param { name: format!("{n}.attn.gating_param"), value: pos.gate.clone(), grad: pg.gate.clone(), len: h, decay: false });
                v.push(Param { name: format!("{n}.attn.pos_proj.weight"), value: pos.pos_w.clone(), grad: pg.pos_w.clone(), len: 3 * h, decay: true });
                v.push(Param { name: format!("{n}.attn.pos_proj.bias"), value: pos.pos_b.clone(), grad: pg.pos_b.clone(), len: h, decay: false });
            }
            lin(&mut v, &format!("{n}.attn.proj"), &b.proj, true);
            ln(&mut v, &format!("{n}.norm2"), &b.norm2);
            lin(&mut v, &format!("{n}.mlp.fc1"), &b.fc1, true);
            lin(&mut v, &format!("{n}.mlp.fc2"), &b.fc2, true);
        }
        ln(&mut v, "norm", &self.norm);
        lin(&mut v, "head", &self.head, true);
        v
    }
}
