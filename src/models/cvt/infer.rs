//! The CvT forward pass as a schedule of kernels (paper §3; spec §2).
//!
//! `Model` holds the weights on the GPU in kernel-ready layouts (transposed
//! matmul weights, BatchNorm folded into the depthwise convs). `Model::plan`
//! builds the graph for one (batch, height, width) and compiles it; the plan is
//! reused for every call at that shape.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::sync::Arc;

use super::config::CvtConfig;
use super::forward::{forward, BlockRef, Layers, Mode, Proj};
use super::weights::Tensor;
use crate::gpu::Gpu;
use crate::graph::{Graph, Plan, TensorId};
use crate::ops::dwconv::ConvProj;
use crate::ops::matmul::WeightFormat;
use crate::ops::rownorm::{softmax, LayerNorm};
use crate::ops::{Act, Linear};

struct Block {
    norm1: LayerNorm,
    conv_proj: ConvProj,
    proj_q: Linear,
    proj_k: Linear,
    proj_v: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

struct Stage {
    embed: Linear,
    embed_norm: LayerNorm,
    cls: Option<Arc<wgpu::Buffer>>,
    blocks: Vec<Block>,
}

/// A CvT whose weights live on the GPU.
pub struct Model {
    pub gpu: Arc<Gpu>,
    pub cfg: CvtConfig,
    pub act: Act,
    stages: Vec<Stage>,
    norm: LayerNorm,
    head: Linear,
    /// Bytes of weights uploaded.
    pub weight_bytes: u64,
    /// Plans run in f16 (`WeightFormat::Half`, `Graph::half`).
    pub half: bool,
}

/// The compiled forward for one input shape.
pub struct ForwardPlan {
    pub plan: Plan,
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub classes: usize,
    pub(crate) input: TensorId,
    pub(crate) logits: TensorId,
    pub(crate) probs: TensorId,
}

fn get<'a>(t: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a [f32]> {
    Ok(&t.get(name).with_context(|| format!("missing tensor {name}"))?.data)
}

impl Model {
    /// Uploads checked, official-named tensors.
    pub fn new(gpu: Arc<Gpu>, cfg: CvtConfig, t: &HashMap<String, Tensor>, act: Act) -> Result<Model> {
        Self::new_in(gpu, cfg, t, act, WeightFormat::F32)
    }

    /// As `new`, with the matmul and convolution weights (all but a few per
    /// cent of the parameters) stored in `fmt`.
    pub fn new_in(gpu: Arc<Gpu>, cfg: CvtConfig, t: &HashMap<String, Tensor>, act: Act, fmt: WeightFormat) -> Result<Model> {
        cfg.validate()?;
        let half = fmt == WeightFormat::Half;
        let mut stages = vec![];
        let mut cin = cfg.in_chans;
        let mut bytes = 0u64;
        // Linear layers count as stored (padding, f16), not at 4 bytes per
        // parameter as the other tensors below: (parameters, stored bytes).
        let linear = std::cell::Cell::new((0u64, 0u64));
        let counted = |w: &[f32], l: Linear| {
            let (p, b) = linear.get();
            linear.set((p + (w.len() + l.n) as u64, b + l.stored_bytes()));
            l
        };
        for s in 0..cfg.stages() {
            let c = cfg.dims[s];
            let k = cfg.patch_sizes[s];
            let hid = cfg.hidden(s);
            let p = format!("stage{s}");
            let ew = get(t, &format!("{p}.patch_embed.proj.weight"))?;
            let embed = counted(ew, Linear::from_conv_in(&gpu, &format!("{p}.patch_embed.proj"), ew, Some(get(t, &format!("{p}.patch_embed.proj.bias"))?), (c, cin, k, k), fmt)?);
            let ln = |n: &str| LayerNorm::frozen(&gpu, n, get(t, &format!("{n}.weight"))?, get(t, &format!("{n}.bias"))?, half);
            let lin = |n: &str, out: usize, inp: usize| -> Result<Linear> {
                let w = get(t, &format!("{n}.weight"))?;
                Ok(counted(w, Linear::from_torch_in(&gpu, n, w, Some(get(t, &format!("{n}.bias"))?), out, inp, fmt)?))
            };
            let embed_norm = ln(&format!("{p}.patch_embed.norm"))?;
            // The cls token is copied into the activations as it is stored (f16 in an f16 plan).
            let cls = if cfg.cls_token[s] {
                let v = get(t, &format!("{p}.cls_token"))?;
                let label = format!("{p}.cls_token");
                Some(Arc::new(if half { gpu.upload_bytes(&label, bytemuck::cast_slice(&crate::gpu::to_f16(v)))? } else { gpu.upload(&label, v)? }))
            } else {
                None
            };
            let mut blocks = vec![];
            for j in 0..cfg.depths[s] {
                let b = format!("{p}.blocks.{j}");
                let (convs, bns) = super::conv_projections(t, &b)?;
                blocks.push(Block {
                    norm1: ln(&format!("{b}.norm1"))?,
                    conv_proj: ConvProj::with_kind(&gpu, &format!("{b}.attn.conv_proj"), convs, bns, c, gpu.profile().matmul(), half)?,
                    proj_q: lin(&format!("{b}.attn.proj_q"), c, c)?,
                    proj_k: lin(&format!("{b}.attn.proj_k"), c, c)?,
                    proj_v: lin(&format!("{b}.attn.proj_v"), c, c)?,
                    proj: lin(&format!("{b}.attn.proj"), c, c)?,
                    norm2: ln(&format!("{b}.norm2"))?,
                    fc1: lin(&format!("{b}.mlp.fc1"), hid, c)?,
                    fc2: lin(&format!("{b}.mlp.fc2"), c, hid)?,
                });
            }
            stages.push(Stage { embed, embed_norm, cls, blocks });
            cin = c;
        }
        let last = cfg.dims[cfg.stages() - 1];
        let norm = LayerNorm::frozen(&gpu, "norm", get(t, "norm.weight")?, get(t, "norm.bias")?, half)?;
        let hw = get(t, "head.weight")?;
        let head = counted(hw, Linear::from_torch_in(&gpu, "head", hw, Some(get(t, "head.bias")?), cfg.num_classes, last, fmt)?);
        for v in t.values() {
            bytes += (v.data.len() * 4) as u64;
        }
        let (params, stored) = linear.get();
        bytes = bytes - 4 * params + stored;
        // Textures of LayerNorm and conv-projection parameters, beside their buffers.
        for st in &stages {
            bytes += st.embed_norm.texture_bytes();
            bytes += st.blocks.iter().map(|b| b.norm1.texture_bytes() + b.norm2.texture_bytes() + b.conv_proj.texture_bytes()).sum::<u64>();
        }
        bytes += norm.texture_bytes();
        gpu.check_error()?;
        Ok(Model { gpu, cfg, act, stages, norm, head, weight_bytes: bytes, half })
    }

    /// Builds and compiles the forward for `batch` images of `height` x `width`.
    pub fn plan(&self, batch: usize, height: usize, width: usize) -> Result<ForwardPlan> {
        if batch == 0 {
            bail!("batch must be at least 1");
        }
        let cfg = &self.cfg;
        let mut g = Graph::new(self.gpu.clone());
        g.half = self.half;
        let input = g.pinned("image", batch * height * width * cfg.in_chans);
        let (logits, _) = forward(self, cfg, self.act, &mut g, input, batch, (height, width), Mode::Infer)?;
        let probs = g.pinned("probs", batch * cfg.num_classes);
        softmax(&mut g, "softmax", logits, batch, cfg.num_classes, Some(probs))?;
        let plan = g.compile()?;
        Ok(ForwardPlan { plan, batch, height, width, classes: cfg.num_classes, input, logits, probs })
    }
}

impl ForwardPlan {
    /// Runs the forward on NHWC images [batch, height, width, channels]; returns
    /// (logits, probabilities), each [batch, classes].
    pub fn forward(&self, images: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        self.plan.write(self.input, images)?;
        self.plan.run()?;
        Ok((self.plan.read(self.logits)?, self.plan.read(self.probs)?))
    }

    /// Runs without reading back (for timing); `sync` waits for completion.
    pub fn run(&self) -> Result<()> {
        self.plan.run()
    }
}

impl Layers for Model {
    fn embed(&self, s: usize) -> &Linear {
        &self.stages[s].embed
    }
    fn embed_norm(&self, s: usize) -> &LayerNorm {
        &self.stages[s].embed_norm
    }
    fn cls(&self, s: usize) -> Option<&Arc<wgpu::Buffer>> {
        self.stages[s].cls.as_ref()
    }
    fn block(&self, s: usize, j: usize) -> BlockRef<'_> {
        let b = &self.stages[s].blocks[j];
        BlockRef { norm1: &b.norm1, proj: Proj::Folded(&b.conv_proj), q: &b.proj_q, k: &b.proj_k, v: &b.proj_v, o: &b.proj, norm2: &b.norm2, fc1: &b.fc1, fc2: &b.fc2 }
    }
    fn norm(&self) -> &LayerNorm {
        &self.norm
    }
    fn head(&self) -> &Linear {
        &self.head
    }
}
