//! The training step of CvT: a forward with train-mode BatchNorm that keeps what
//! the backward needs, the hand-written backward of every op in reverse, and the
//! parameter/gradient bookkeeping for the optimizer. Built once per (batch, h, w)
//! as one `Graph` and replayed for every batch.
//!
//! Differences from the inference forward (`model::cvt`): weights stay in the
//! buffer matmul layout (the optimizer updates them in place), BatchNorm uses batch
//! statistics, residual adds are out of place (the backward needs every LayerNorm
//! input), and fc1's pre-activation is kept.

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::sync::Arc;

use super::forward::{BlockRef, Layers, Mode, Proj, Saved};
use crate::gpu::{Gpu, MatmulKind};
use crate::graph::{Graph, TensorId};
use crate::models::cvt::weights::Tensor;
use crate::models::cvt::CvtConfig;
pub use crate::models::step::{Optimizer, Param, StepPlan};
use crate::ops::attention::{attention_backward, AttnShape};
use crate::ops::dwconv::{conv_proj_train_backward, ConvProjGrad, ConvProjTrain};
use crate::ops::matmul::{conv2d_backward, linear_backward, linear_backward_act, LinearGrad};
use crate::ops::optim::AdamW;
use crate::ops::rownorm::{layernorm_backward, softmax_xent, LayerNorm, LayerNormGrad, RowMap};
use crate::ops::tokens::{add, cls_grad, scale_rows};
use crate::ops::{Act, Linear};

struct Lin {
    l: Linear,
    g: LinearGrad,
}

struct Ln {
    l: LayerNorm,
    g: LayerNormGrad,
}

struct Block {
    norm1: Ln,
    proj: ConvProjTrain,
    proj_g: ConvProjGrad,
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    norm2: Ln,
    fc1: Lin,
    fc2: Lin,
}

struct Stage {
    embed: Lin,
    embed_norm: Ln,
    cls: Option<(Arc<wgpu::Buffer>, Arc<wgpu::Buffer>)>,
    blocks: Vec<Block>,
}

/// A CvT with parameters, gradients and BN running statistics on the GPU.
pub struct TrainModel {
    pub gpu: Arc<Gpu>,
    pub cfg: CvtConfig,
    pub act: Act,
    stages: Vec<Stage>,
    norm: Ln,
    head: Lin,
    /// Drop-path rate of each block (all stages in order); 0 = off.
    drop_path: Vec<f32>,
}

fn get<'a>(t: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a [f32]> {
    Ok(&t.get(name).with_context(|| format!("missing tensor {name}"))?.data)
}

impl TrainModel {
    /// BatchNorm in eval mode (running statistics, frozen) or train mode (batch
    /// statistics, the default). Takes effect in plans built afterwards.
    pub fn set_bn_eval(&mut self, eval: bool) {
        for st in &mut self.stages {
            for b in &mut st.blocks {
                b.proj.bn_eval = eval;
            }
        }
    }

    /// Stochastic depth as the official code: per stage, rates rising linearly from
    /// 0 to `per_stage[s]` over the stage's blocks. Takes effect in plans built afterwards.
    pub fn set_drop_path(&mut self, per_stage: &[f32]) {
        self.drop_path.clear();
        for (s, &d) in self.cfg.depths.iter().enumerate() {
            let r = per_stage.get(s).copied().unwrap_or(0.0);
            for j in 0..d {
                self.drop_path.push(if d > 1 { r * j as f32 / (d - 1) as f32 } else { r });
            }
        }
    }

    /// Drop-path rate of every block.
    pub fn drop_path_rates(&self) -> &[f32] {
        &self.drop_path
    }

    /// From official-named tensors (as `model::weights` reads them).
    pub fn new(gpu: Arc<Gpu>, cfg: CvtConfig, t: &HashMap<String, Tensor>, act: Act) -> Result<TrainModel> {
        cfg.validate()?;
        let lin = |name: &str, n: usize, k: usize| -> Result<Lin> {
            let l = Linear::with_kind(&gpu, name, get(t, &format!("{name}.weight"))?, Some(get(t, &format!("{name}.bias"))?), n, k, MatmulKind::Buffer)?;
            Ok(Lin { g: LinearGrad::new(&gpu, name, &l)?, l })
        };
        let ln = |name: &str| -> Result<Ln> {
            let l = LayerNorm::new(&gpu, name, get(t, &format!("{name}.weight"))?, get(t, &format!("{name}.bias"))?)?;
            Ok(Ln { g: LayerNormGrad::new(&gpu, name, l.c)?, l })
        };
        let mut stages = vec![];
        let mut cin = cfg.in_chans;
        for s in 0..cfg.stages() {
            let (c, k, hid) = (cfg.dims[s], cfg.patch_sizes[s], cfg.hidden(s));
            let p = format!("stage{s}");
            let e = format!("{p}.patch_embed.proj");
            let el = Linear::conv_with_kind(&gpu, &e, get(t, &format!("{e}.weight"))?, Some(get(t, &format!("{e}.bias"))?), c, cin, k, k, MatmulKind::Buffer)?;
            let embed = Lin { g: LinearGrad::new(&gpu, &e, &el)?, l: el };
            let cls = if cfg.cls_token[s] {
                Some((Arc::new(gpu.upload(&format!("{p}.cls_token"), get(t, &format!("{p}.cls_token"))?)?), Arc::new(gpu.storage(&format!("{p}.cls_token.grad"), (c * 4) as u64)?)))
            } else {
                None
            };
            let mut blocks = vec![];
            for j in 0..cfg.depths[s] {
                let b = format!("{p}.blocks.{j}");
                let (convs, bns) = super::conv_projections(t, &b)?;
                let pn = format!("{b}.attn.conv_proj");
                blocks.push(Block {
                    norm1: ln(&format!("{b}.norm1"))?,
                    proj: ConvProjTrain::new(&gpu, &pn, convs, bns, c)?,
                    proj_g: ConvProjGrad::new(&gpu, &pn, c)?,
                    q: lin(&format!("{b}.attn.proj_q"), c, c)?,
                    k: lin(&format!("{b}.attn.proj_k"), c, c)?,
                    v: lin(&format!("{b}.attn.proj_v"), c, c)?,
                    o: lin(&format!("{b}.attn.proj"), c, c)?,
                    norm2: ln(&format!("{b}.norm2"))?,
                    fc1: lin(&format!("{b}.mlp.fc1"), hid, c)?,
                    fc2: lin(&format!("{b}.mlp.fc2"), c, hid)?,
                });
            }
            stages.push(Stage { embed, embed_norm: ln(&format!("{p}.patch_embed.norm"))?, cls, blocks });
            cin = c;
        }
        let last = cfg.dims[cfg.stages() - 1];
        let norm = ln("norm")?;
        let head = lin("head", cfg.num_classes, last)?;
        let drop_path = vec![0.0; cfg.depths.iter().sum()];
        Ok(TrainModel { gpu, cfg, act, stages, norm, head, drop_path })
    }

    /// Builds forward + backward for `batch` images of h x w; the loss is the mean
    /// cross-entropy against soft targets [batch, classes].
    pub fn step_plan(&self, batch: usize, height: usize, width: usize) -> Result<StepPlan> {
        let cfg = &self.cfg;
        let mut g = Graph::new(self.gpu.clone());
        let images = g.pinned("images", batch * height * width * cfg.in_chans);
        let targets = g.pinned("targets", batch * cfg.num_classes);
        let drop_scales = self.drop_path.iter().any(|&r| r > 0.0).then(|| g.pinned("drop_path.scales", 2 * self.drop_path.len() * batch));
        // Block index over all stages, for the drop-path scales.
        let block_base: Vec<usize> = cfg
            .depths
            .iter()
            .scan(0, |acc, &d| {
                let b = *acc;
                *acc += d;
                Some(b)
            })
            .collect();
        let dropped = |s: usize, j: usize| -> Option<(TensorId, usize)> {
            let bi = block_base[s] + j;
            match drop_scales {
                Some(t) if self.drop_path[bi] > 0.0 => Some((t, 2 * bi * batch)),
                _ => None,
            }
        };

        // ---- forward (training mode), keeping what the backward reads ----
        let mode = Mode::Train { drop: drop_scales, rates: &self.drop_path };
        let (logits, saved) = super::forward::forward(self, cfg, self.act, &mut g, images, batch, (height, width), mode)?;
        let Saved { stages: saved, x, tokens, c: c_last, feat, feat_map } = saved.expect("the training forward keeps its tensors");
        let (dlogits, loss) = softmax_xent(&mut g, "xent", logits, targets, batch, cfg.num_classes, 1.0 / batch as f32)?;

        // ---- backward ----
        let dfeat = linear_backward(&mut g, "head", feat, dlogits, batch, &self.head.l, &self.head.g, None)?;
        let dx_last = g.tensor("d.stage_out", batch * tokens * c_last);
        g.clear(dx_last);
        let mut dcur = layernorm_backward(&mut g, "norm", x, dfeat, feat_map, &self.norm.l, &self.norm.g, Some(dx_last))?;
        for (s, st) in self.stages.iter().enumerate().rev() {
            let sv = &saved[s];
            let (c, t, tk) = (cfg.dims[s], sv.t, sv.tk);
            let (oh, ow) = sv.hw;
            let cls = st.cls.is_some() as usize;
            for (j, b) in st.blocks.iter().enumerate().rev() {
                let bs = &sv.blocks[j];
                let l = format!("stage{s}.blocks.{j}");
                // x2 = x1 + s2 ⊙ fc2(act(fc1(LN2(x1)))), s2 the per-sample drop-path scale (1 without)
                let dbranch = match dropped(s, j) {
                    Some((sc, off)) => scale_rows(&mut g, &format!("{l}.dpath2"), dcur, sc, t * c, off + batch)?,
                    None => dcur,
                };
                let du = linear_backward_act(&mut g, &format!("{l}.fc2"), bs.u, dbranch, batch * t, &b.fc2.l, &b.fc2.g, (bs.z, self.act))?;
                let dh2 = linear_backward(&mut g, &format!("{l}.fc1"), bs.h2, du, batch * t, &b.fc1.l, &b.fc1.g, None)?;
                let dx1b = layernorm_backward(&mut g, &format!("{l}.norm2"), bs.x1, dh2, RowMap::dense(batch * t), &b.norm2.l, &b.norm2.g, None)?;
                let dx1 = add(&mut g, &format!("{l}.dres2"), dcur, dx1b)?;
                // x1 = x0 + s1 ⊙ proj(attn(q, k, v))
                let dbranch = match dropped(s, j) {
                    Some((sc, off)) => scale_rows(&mut g, &format!("{l}.dpath1"), dx1, sc, t * c, off)?,
                    None => dx1,
                };
                let da = linear_backward(&mut g, &format!("{l}.proj"), bs.a, dbranch, batch * t, &b.o.l, &b.o.g, None)?;
                let shape = AttnShape { batch, tq: t, tkv: tk, c, heads: cfg.heads[s], scale: (c as f32).powf(-0.5) };
                let (dq, dk, dv) = attention_backward(&mut g, &format!("{l}.attn"), (bs.q, bs.k, bs.v, bs.a), bs.attn, da, shape)?;
                let dq0 = linear_backward(&mut g, &format!("{l}.proj_q"), bs.q0, dq, batch * t, &b.q.l, &b.q.g, None)?;
                let dk0 = linear_backward(&mut g, &format!("{l}.proj_k"), bs.k0, dk, batch * tk, &b.k.l, &b.k.g, None)?;
                let dv0 = linear_backward(&mut g, &format!("{l}.proj_v"), bs.v0, dv, batch * tk, &b.v.l, &b.v.g, None)?;
                let dh1 = conv_proj_train_backward(&mut g, &format!("{l}.conv_proj"), bs.h1, &bs.proj, (dq0, dk0, dv0), batch, oh, ow, cls, &b.proj, &b.proj_g)?;
                let dx0b = layernorm_backward(&mut g, &format!("{l}.norm1"), bs.x0, dh1, RowMap::dense(batch * t), &b.norm1.l, &b.norm1.g, None)?;
                dcur = add(&mut g, &format!("{l}.dres1"), dx1, dx0b)?;
            }
            // Stage start: cls parameter, embedding norm, embedding conv.
            if let Some((_, cls_g)) = &st.cls {
                cls_grad(&mut g, &format!("stage{s}.dcls"), dcur, batch, t, c, cls_g)?;
            }
            let map = RowMap { rows: batch * oh * ow, group: oh * ow, in_stride: oh * ow, in_off: 0, out_stride: t, out_off: cls };
            let de = layernorm_backward(&mut g, &format!("stage{s}.embed_norm"), sv.e, dcur, map, &st.embed_norm.l, &st.embed_norm.g, None)?;
            let dx_prev = if s > 0 {
                let prev = g.tensor(format!("d.stage{}_out", s - 1), g.len(sv.input));
                g.clear(prev);
                Some(prev)
            } else {
                None
            };
            conv2d_backward(&mut g, &format!("stage{s}.embed"), sv.input, de, sv.geom, &st.embed.l, &st.embed.g, dx_prev)?;
            if let Some(p) = dx_prev {
                dcur = p;
            }
        }
        let plan = g.compile()?;
        Ok(StepPlan { plan, batch, images, targets, loss, logits, drop_scales })
    }

    /// Every gradient in PyTorch's layout and official names (for parity tests and
    /// checkpoints): reads them back from the GPU.
    pub fn gradients(&self) -> Result<HashMap<String, Vec<f32>>> {
        self.read_tensors(true)
    }

    /// Every parameter and BatchNorm running statistic as official-named tensors
    /// in PyTorch's shapes: what `infer` and `TrainModel::new` load.
    pub fn weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut flat = self.read_tensors(false)?;
        flat.extend(self.running_stats()?);
        let mut out = HashMap::new();
        for (name, shape) in crate::models::cvt::weights::expected_shapes(&self.cfg) {
            let data = flat.remove(&name).with_context(|| format!("internal: no tensor {name} in the training model"))?;
            out.insert(name, Tensor::new(shape, data));
        }
        Ok(out)
    }

    /// Parameters (`grads` false) or their gradients, flat, in PyTorch's layouts.
    fn read_tensors(&self, grads: bool) -> Result<HashMap<String, Vec<f32>>> {
        let gpu = &self.gpu;
        let mut out = HashMap::new();
        let pick = |value: &Arc<wgpu::Buffer>, grad: &Arc<wgpu::Buffer>| {
            if grads {
                grad.clone()
            } else {
                value.clone()
            }
        };
        let lin = |out: &mut HashMap<String, Vec<f32>>, name: &str, l: &Lin| -> Result<()> {
            out.insert(format!("{name}.weight"), l.l.read_torch(gpu, &pick(l.l.w.as_ref().expect("training weights are buffers"), &l.g.w))?);
            out.insert(format!("{name}.bias"), gpu.read(&pick(&l.l.b, &l.g.b), 0, l.l.n)?);
            Ok(())
        };
        let ln = |out: &mut HashMap<String, Vec<f32>>, name: &str, l: &Ln| -> Result<()> {
            out.insert(format!("{name}.weight"), gpu.read(&pick(&l.l.gamma, &l.g.gamma), 0, l.l.c)?);
            out.insert(format!("{name}.bias"), gpu.read(&pick(&l.l.beta, &l.g.beta), 0, l.l.c)?);
            Ok(())
        };
        let mut cin = self.cfg.in_chans;
        for (s, st) in self.stages.iter().enumerate() {
            let (c, k) = (self.cfg.dims[s], self.cfg.patch_sizes[s]);
            let p = format!("stage{s}");
            let wt = st.embed.l.read_torch_conv(gpu, &pick(st.embed.l.w.as_ref().expect("training weights are buffers"), &st.embed.g.w), cin, (k, k))?;
            out.insert(format!("{p}.patch_embed.proj.weight"), wt);
            out.insert(format!("{p}.patch_embed.proj.bias"), gpu.read(&pick(&st.embed.l.b, &st.embed.g.b), 0, c)?);
            ln(&mut out, &format!("{p}.patch_embed.norm"), &st.embed_norm)?;
            if let Some((cv, cg)) = &st.cls {
                out.insert(format!("{p}.cls_token"), gpu.read(&pick(cv, cg), 0, c)?);
            }
            for (j, b) in st.blocks.iter().enumerate() {
                let pb = format!("{p}.blocks.{j}");
                ln(&mut out, &format!("{pb}.norm1"), &b.norm1)?;
                ln(&mut out, &format!("{pb}.norm2"), &b.norm2)?;
                let dw = gpu.read(&pick(&b.proj.w, &b.proj_g.w), 0, 27 * c)?;
                for (m, x) in ["q", "k", "v"].iter().enumerate() {
                    out.insert(format!("{pb}.attn.conv_proj_{x}.conv.weight"), (0..9 * c).map(|i| dw[(m * 9 + i % 9) * c + i / 9]).collect());
                    out.insert(format!("{pb}.attn.conv_proj_{x}.bn.weight"), gpu.read(&pick(&b.proj.bn[m].gamma, &b.proj_g.gamma[m]), 0, c)?);
                    out.insert(format!("{pb}.attn.conv_proj_{x}.bn.bias"), gpu.read(&pick(&b.proj.bn[m].beta, &b.proj_g.beta[m]), 0, c)?);
                }
                lin(&mut out, &format!("{pb}.attn.proj_q"), &b.q)?;
                lin(&mut out, &format!("{pb}.attn.proj_k"), &b.k)?;
                lin(&mut out, &format!("{pb}.attn.proj_v"), &b.v)?;
                lin(&mut out, &format!("{pb}.attn.proj"), &b.o)?;
                lin(&mut out, &format!("{pb}.mlp.fc1"), &b.fc1)?;
                lin(&mut out, &format!("{pb}.mlp.fc2"), &b.fc2)?;
            }
            cin = c;
        }
        ln(&mut out, "norm", &self.norm)?;
        lin(&mut out, "head", &self.head)?;
        Ok(out)
    }
}

impl TrainModel {
    /// Every parameter with its gradient buffer (storage layouts; the padded
    /// columns of linear weights stay zero: their gradients are zero).
    pub fn params(&self) -> Vec<Param> {
        let mut v = vec![];
        let mut push = |name: String, value: &Arc<wgpu::Buffer>, grad: &Arc<wgpu::Buffer>, len: usize, decay: bool| v.push(Param { name, value: value.clone(), grad: grad.clone(), len, decay });
        let lin = |push: &mut dyn FnMut(String, &Arc<wgpu::Buffer>, &Arc<wgpu::Buffer>, usize, bool), name: &str, l: &Lin| {
            let np = l.l.n.div_ceil(4) * 4;
            push(format!("{name}.weight"), l.l.w.as_ref().expect("training weights are buffers"), &l.g.w, l.l.k * np, true);
            push(format!("{name}.bias"), &l.l.b, &l.g.b, np, false);
        };
        let ln = |push: &mut dyn FnMut(String, &Arc<wgpu::Buffer>, &Arc<wgpu::Buffer>, usize, bool), name: &str, l: &Ln| {
            push(format!("{name}.weight"), &l.l.gamma, &l.g.gamma, l.l.c, false);
            push(format!("{name}.bias"), &l.l.beta, &l.g.beta, l.l.c, false);
        };
        for (s, st) in self.stages.iter().enumerate() {
            let c = self.cfg.dims[s];
            let p = format!("stage{s}");
            lin(&mut push, &format!("{p}.patch_embed.proj"), &st.embed);
            ln(&mut push, &format!("{p}.patch_embed.norm"), &st.embed_norm);
            if let Some((cls, g)) = &st.cls {
                push(format!("{p}.cls_token"), cls, g, c, false);
            }
            for (j, b) in st.blocks.iter().enumerate() {
                let pb = format!("{p}.blocks.{j}");
                ln(&mut push, &format!("{pb}.norm1"), &b.norm1);
                ln(&mut push, &format!("{pb}.norm2"), &b.norm2);
                // Depthwise weights decay (the official no-decay list has no 'dw'); BN does not.
                push(format!("{pb}.attn.conv_proj.w"), &b.proj.w, &b.proj_g.w, 27 * c, true);
                for (m, x) in ["q", "k", "v"].iter().enumerate() {
                    push(format!("{pb}.attn.conv_proj_{x}.bn.weight"), &b.proj.bn[m].gamma, &b.proj_g.gamma[m], c, false);
                    push(format!("{pb}.attn.conv_proj_{x}.bn.bias"), &b.proj.bn[m].beta, &b.proj_g.beta[m], c, false);
                }
                lin(&mut push, &format!("{pb}.attn.proj_q"), &b.q);
                lin(&mut push, &format!("{pb}.attn.proj_k"), &b.k);
                lin(&mut push, &format!("{pb}.attn.proj_v"), &b.v);
                lin(&mut push, &format!("{pb}.attn.proj"), &b.o);
                lin(&mut push, &format!("{pb}.mlp.fc1"), &b.fc1);
                lin(&mut push, &format!("{pb}.mlp.fc2"), &b.fc2);
            }
        }
        ln(&mut push, "norm", &self.norm);
        lin(&mut push, "head", &self.head);
        v
    }

    /// AdamW over every parameter.
    pub fn optimizer(&self, settings: AdamW) -> Result<Optimizer> {
        Optimizer::new(&self.gpu, self.params(), settings)
    }

    /// BatchNorm running statistics (official names), as updated by the steps run so far.
    pub fn running_stats(&self) -> Result<HashMap<String, Vec<f32>>> {
        let mut out = HashMap::new();
        for (s, st) in self.stages.iter().enumerate() {
            let c = self.cfg.dims[s];
            for (j, b) in st.blocks.iter().enumerate() {
                for (m, x) in ["q", "k", "v"].iter().enumerate() {
                    let r = self.gpu.read(&b.proj.bn[m].running, 0, 2 * c)?;
                    let n = format!("stage{s}.blocks.{j}.attn.conv_proj_{x}.bn");
                    out.insert(format!("{n}.running_mean"), r[..c].to_vec());
                    out.insert(format!("{n}.running_var"), r[c..].to_vec());
                }
            }
        }
        Ok(out)
    }
}

impl Layers for TrainModel {
    fn embed(&self, s: usize) -> &Linear {
        &self.stages[s].embed.l
    }
    fn embed_norm(&self, s: usize) -> &LayerNorm {
        &self.stages[s].embed_norm.l
    }
    fn cls(&self, s: usize) -> Option<&Arc<wgpu::Buffer>> {
        self.stages[s].cls.as_ref().map(|(v, _)| v)
    }
    fn block(&self, s: usize, j: usize) -> BlockRef<'_> {
        let b = &self.stages[s].blocks[j];
        BlockRef { norm1: &b.norm1.l, proj: Proj::Train(&b.proj), q: &b.q.l, k: &b.k.l, v: &b.v.l, o: &b.o.l, norm2: &b.norm2.l, fc1: &b.fc1.l, fc2: &b.fc2.l }
    }
    fn norm(&self) -> &LayerNorm {
        &self.norm.l
    }
    fn head(&self) -> &Linear {
        &self.head.l
    }
}
