//! The graph runner.
//!
//! A model is built once per (model, batch, resolution) as a list of kernel
//! dispatches over symbolic activation tensors (`Graph`). `Graph::compile` then
//! plans memory by liveness: each tensor's span of steps is known in advance, and
//! `plan_slots` gives tensors whose spans do not overlap the same buffer (largest
//! first, each into the smallest free slot that holds it), so activations that are
//! never alive at the same time share memory. Buffers, uniforms and bind groups are
//! created once; `Plan::run` only re-records the same dispatches into one command
//! buffer (wgpu has no reusable compute bundles) and submits it, with no readback
//! until the caller asks for an output.

use crate::gpu::Gpu;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::sync::Arc;

/// A tensor that does not fit in one storage binding on this adapter. Callers
/// that can split the work (smaller batch) look for this error.
#[derive(Debug)]
pub struct TooLarge {
    pub tensor: String,
    pub bytes: u64,
    pub limit: u64,
}

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "tensor {} needs {} MiB, over this adapter's storage binding limit of {} MiB; use a smaller batch or resolution", self.tensor, self.bytes >> 20, self.limit >> 20)
    }
}

impl std::error::Error for TooLarge {}

/// The plan texture a filling lands in, as `compile` will share them: linear
/// textures of one binding are one texture whatever their widths.
fn fill_key(t: &TexRef) -> (u32, u32, bool) {
    (t.binding, if t.linear { 0 } else { t.width }, t.linear)
}

/// A symbolic activation tensor of a `Graph`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TensorId(usize);

/// What one binding of a dispatch refers to.
#[derive(Clone)]
pub enum Res {
    /// An activation tensor, placed by the memory plan.
    Act(TensorId),
    /// A buffer that outlives the plan (weights).
    Buf(Arc<wgpu::Buffer>),
    /// Kernel parameters, uploaded once as a uniform buffer.
    Uniform(Vec<u32>),
    /// A binding index the entry point does not use (its family's other entry
    /// points do).
    Unused,
    /// A texture that outlives the plan (weights in the texture matmul variant).
    Tex(Arc<wgpu::TextureView>),
    /// A texture filled from an activation by an earlier `Graph::to_texture`, or
    /// written by an earlier dispatch through `OutTex`.
    ActTex(TexRef),
    /// A plan texture this dispatch writes (a storage texture binding).
    OutTex(TexRef),
}

/// An rgba32float texture of the plan, filled by a copy step or a packing
/// dispatch. Textures of equal width and `binding` share one texture as tall as
/// the tallest of them: each is consumed by the dispatches right after it is
/// filled, and a dispatch reading several gives each its own binding. `fill`
/// identifies the filling, so `compile` can check that no other filling of the
/// same texture came between a filling and its use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TexRef {
    width: u32,
    height: u32,
    binding: u32,
    fill: u32,
    /// A linear texture (read by index, so exactly `width` wide, a power of two);
    /// the others are read by coordinates and padded to a non-power-of-two width
    /// (see `gpu::npot`).
    linear: bool,
}

impl Res {
    /// A typed parameter struct (`#[repr(C)]`, mirroring the shader's) as a uniform.
    pub fn uniform<T: bytemuck::Pod>(params: &T) -> Res {
        Res::Uniform(bytemuck::cast_slice(std::slice::from_ref(params)).to_vec())
    }
}

impl TexRef {
    /// The shared texture this one lives in.
    fn key(&self) -> (u32, u32, bool) {
        (self.binding, self.width, self.linear)
    }
}

struct TensorMeta {
    name: String,
    /// Elements (f32).
    len: usize,
    /// Pinned tensors (inputs, outputs) keep their own buffer for the plan's life.
    pinned: bool,
}

enum OpRec {
    Dispatch {
        label: String,
        pipeline: Arc<wgpu::ComputePipeline>,
        bindings: Vec<Res>,
        groups: [u32; 3],
        flops: f64,
    },
    /// Texels from `texel0` of a tensor into `tex`: whole rows of tex.width texels
    /// (rows of a [rows, 4 * tex.width] tensor), or with `texels` only that many in
    /// row order (a linear texture, whose last row may be partial).
    Copy {
        src: CopySrc,
        /// First texel (4 values) of `src` copied.
        texel0: usize,
        tex: TexRef,
        texels: Option<usize>,
    },
    /// Zero a tensor (gradients that several ops add into).
    Clear {
        t: TensorId,
    },
}

/// What a texture copy reads: a plan tensor, or a buffer of the caller's
/// (parameters, gradients and optimizer state, which outlive the plan).
#[derive(Clone, Debug)]
enum CopySrc {
    Act(TensorId),
    Buf(Arc<wgpu::Buffer>),
}

impl CopySrc {
    /// Identity for `CopyKey`: a tensor, or a buffer by address.
    fn key(&self) -> (bool, usize) {
        match self {
            CopySrc::Act(t) => (true, t.0),
            CopySrc::Buf(b) => (false, Arc::as_ptr(b) as usize),
        }
    }
}

/// A compiled copy's source buffer: an activation slot, or the caller's.
enum CopyFrom {
    Slot(usize),
    Buf(Arc<wgpu::Buffer>),
}

impl OpRec {
    fn acts(&self) -> Vec<TensorId> {
        match self {
            OpRec::Dispatch { bindings, .. } => bindings.iter().filter_map(|r| if let Res::Act(t) = r { Some(*t) } else { None }).collect(),
            OpRec::Copy { src: CopySrc::Act(t), .. } => vec![*t],
            OpRec::Copy { src: CopySrc::Buf(_), .. } => vec![],
            OpRec::Clear { t } => vec![*t],
        }
    }
}

/// A model under construction: tensors and the ordered dispatches over them.
pub struct Graph {
    pub gpu: Arc<Gpu>,
    /// The kernel choices this graph's ops follow: the device's resolved profile
    /// (`Gpu::profile`) unless given (`with_profile`), so tests can pick variants.
    pub profile: crate::profile::Profile,
    /// An f16 plan: every tensor holds f16 and every plan texture is rgba16float;
    /// kernels compute in f32, converting at each load and store
    /// (`texread::prelude`'s `act`). Set by `Model::plan` for `--f16` models on
    /// adapters with shader-f16; before any op is added, since ops pick their
    /// pipelines (`Graph::pipeline`) as they are added.
    pub half: bool,
    tensors: Vec<TensorMeta>,
    ops: Vec<OpRec>,
    /// Texture fillings so far (`TexRef::fill`).
    fills: u32,
    /// What `reused_copy` needs: the copies recorded so far, the latest filling of
    /// each plan texture, and how often each tensor and buffer has been bound to
    /// a dispatch (a copy is stale once its source may have been written).
    copies: Vec<(CopyKey, TexRef, u32, CopySrc)>,
    latest_fill: HashMap<(u32, u32, bool), u32>,
    tensor_uses: Vec<u32>,
    buf_uses: HashMap<usize, u32>,
}

/// The values a copy reads: its source (a tensor, or a buffer by address), first
/// texel, texels, and the row width of a row copy (0 for a linear texture).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct CopyKey {
    src: (bool, usize),
    texel0: usize,
    texels: usize,
    row_width: usize,
}

/// One recorded step of a compiled plan.
pub struct Step {
    pub label: String,
    pub flops: f64,
    /// Bytes of the buffers the step binds (for a GB/s estimate).
    pub bytes: u64,
    kind: StepKind,
}

enum StepKind {
    Dispatch {
        pipeline: Arc<wgpu::ComputePipeline>,
        bind_group: wgpu::BindGroup,
        groups: [u32; 3],
    },
    Clear {
        slot: usize,
        bytes: u64,
    },
    /// Buffer bytes from `offset` into texture rows [y, y + height), `width` texels each.
    Copy {
        from: CopyFrom,
        offset: u64,
        texture: usize,
        width: u32,
        height: u32,
        y: u32,
    },
}

/// A compiled graph: buffers allocated, bind groups built, ready to run.
pub struct Plan {
    pub gpu: Arc<Gpu>,
    pub steps: Vec<Step>,
    slots: Vec<wgpu::Buffer>,
    textures: Vec<wgpu::Texture>,
    tensor_slot: Vec<usize>,
    tensor_len: Vec<usize>,
    /// Bytes of all activation buffers (the plan's activation footprint).
    pub activation_bytes: u64,
    /// Bytes all tensors would take with no sharing, for comparison.
    pub unshared_bytes: u64,
    /// The lower bound any plan must pay: the most bytes of tensors alive at once
    /// (pinned ones always; others from first to last use). `activation_bytes` over
    /// this is the slot plan's fragmentation overhead.
    pub max_live_bytes: u64,
    /// Bytes of the plan's textures (texture-operand variants).
    pub texture_bytes: u64,
    /// Tensors hold f16 (`Graph::half`); `write` and `read` convert.
    pub half: bool,
}

/// Splits a 1-D count of workgroups into a 2-D grid within the device's
/// per-dimension limit; kernels recover the index as `wid.y * nwg.x + wid.x`.
pub fn grid1d(gpu: &Gpu, groups: u64) -> [u32; 3] {
    let max = gpu.limits.max_compute_workgroups_per_dimension as u64;
    if groups <= max {
        [groups.max(1) as u32, 1, 1]
    } else {
        let y = groups.div_ceil(max);
        [groups.div_ceil(y) as u32, y as u32, 1]
    }
}

impl Graph {
    pub fn new(gpu: Arc<Gpu>) -> Self {
        let profile = (*gpu.profile()).clone();
        Self::with_profile(gpu, profile)
    }

    /// A graph whose ops follow `profile` instead of the device's.
    pub fn with_profile(gpu: Arc<Gpu>, profile: crate::profile::Profile) -> Self {
        Graph {
            gpu,
            profile,
            half: false,
            tensors: vec![],
            ops: vec![],
            fills: 0,
            copies: vec![],
            latest_fill: HashMap::new(),
            tensor_uses: vec![],
            buf_uses: HashMap::new(),
        }
    }

    /// The pipeline of `shader::entry` for this graph's precision (see `half`).
    pub fn pipeline(&self, shader: &'static str, entry: &str, overrides: &[(&str, f64)]) -> Result<Arc<wgpu::ComputePipeline>> {
        self.gpu.pipeline_in(shader, entry, overrides, self.profile.texture_read, false, self.half)
    }

    /// As `pipeline`, with f16 weight textures when `w16`.
    pub fn pipeline_w(&self, shader: &'static str, entry: &str, overrides: &[(&str, f64)], w16: bool) -> Result<Arc<wgpu::ComputePipeline>> {
        self.gpu.pipeline_in(shader, entry, overrides, self.profile.texture_read, w16, self.half)
    }

    /// Bytes of one texel (4 values) of the plan's textures.
    pub fn texel_bytes(&self) -> usize {
        crate::gpu::texel_bytes(self.half)
    }

    /// Bytes of one tensor element: 4, or 2 in an f16 plan.
    pub fn elem_bytes(&self) -> usize {
        self.texel_bytes() / 4
    }

    /// Whether rows of `width` texels can be copied into a texture: buffer-to-
    /// texture copies need rows of a multiple of 256 bytes.
    pub fn row_copy_ok(&self, width: usize) -> bool {
        (width * self.texel_bytes()) % 256 == 0
    }

    /// A new intermediate tensor of `len` values.
    pub fn tensor(&mut self, name: impl Into<String>, len: usize) -> TensorId {
        self.tensors.push(TensorMeta { name: name.into(), len, pinned: false });
        self.tensor_uses.push(0);
        TensorId(self.tensors.len() - 1)
    }

    /// A tensor with its own buffer for the plan's life: graph inputs and outputs.
    pub fn pinned(&mut self, name: impl Into<String>, len: usize) -> TensorId {
        let t = self.tensor(name, len);
        self.tensors[t.0].pinned = true;
        t
    }

    /// Marks an existing tensor as pinned, so its value can be read after a run.
    pub fn pin(&mut self, t: TensorId) {
        self.tensors[t.0].pinned = true;
    }

    pub fn len(&self, t: TensorId) -> usize {
        self.tensors[t.0].len
    }

    /// Appends a dispatch. Bindings are in binding-index order (0, 1, ...).
    pub fn dispatch(&mut self, label: impl Into<String>, pipeline: Arc<wgpu::ComputePipeline>, mut bindings: Vec<Res>, groups: [u32; 3], flops: f64) {
        // A reused copy (`reused_copy`) made for another binding, which this
        // dispatch's own operands have since refilled: copy its values again,
        // into a texture of their own (binding numbers from 64 up are only
        // these), right before this dispatch. Its source is unchanged: the reuse
        // was checked when the operand was made, and nothing ran since.
        for i in 0..bindings.len() {
            let Res::ActTex(t) = &bindings[i] else { continue };
            if self.latest_fill.get(&fill_key(t)) == Some(&t.fill) {
                continue;
            }
            if let Some((key, _, at, src)) = self.copies.iter().find(|c| c.1 == *t).cloned() {
                assert_eq!(at, self.uses_of(&key), "internal: a reused copy's source changed before its dispatch");
                bindings[i] = Res::ActTex(self.copy(src, key, 64 + i as u32));
            }
        }
        // Any binding may be written (Res does not say which are read-only).
        for r in &bindings {
            match r {
                Res::Act(t) => self.tensor_uses[t.0] += 1,
                Res::Buf(b) => *self.buf_uses.entry(Arc::as_ptr(b) as usize).or_insert(0) += 1,
                Res::OutTex(t) => self.note_fill(t),
                _ => {}
            }
        }
        self.ops.push(OpRec::Dispatch { label: label.into(), pipeline, bindings, groups, flops });
    }

    /// Zeroes tensor `t` at this point of the schedule.
    pub fn clear(&mut self, t: TensorId) {
        self.tensor_uses[t.0] += 1;
        self.ops.push(OpRec::Clear { t });
    }

    /// Copies rows [row0, row0 + rows) of `src`, a row-major [_, 4 * width]
    /// tensor, into a texture of width x rows texels, for the next dispatch's
    /// `binding`. The copy needs rows of a multiple of 256 bytes (`row_copy_ok`).
    pub fn to_texture(&mut self, src: TensorId, row0: usize, rows: usize, width: usize, binding: u32) -> TexRef {
        assert!(self.row_copy_ok(width), "to_texture: rows of {width} texels are not a multiple of 256 bytes");
        let key = CopyKey { src: (true, src.0), texel0: row0 * width, texels: rows * width, row_width: width };
        self.reused_copy(&key).unwrap_or_else(|| self.copy(CopySrc::Act(src), key, binding))
    }

    /// The whole of tensor `t` (a multiple of 4 values) as a *linear texture* for
    /// `binding`: texel i (values 4i..4i+4) at (i % W, i / W), W a power of two
    /// of at least 16 texels (256 bytes, what row copies need), so kernels find it
    /// with a mask and a shift (`textureDimensions(..).x` gives W). The copy is a
    /// memcpy on CPU drivers, where every storage-buffer load runs as a loop over
    /// SIMD lanes but texel fetches are vector gathers: load-heavy kernels read
    /// their inputs this way there.
    pub fn linear_texture(&mut self, t: TensorId, binding: u32) -> TexRef {
        let texels = self.tensors[t.0].len.div_ceil(4);
        self.linear_texture_range(t, 0, texels, binding)
    }

    /// Texels [texel0, texel0 + texels) of `t` as a linear texture (texel0 first),
    /// for kernels that work through a large tensor in chunks with a small texture.
    pub fn linear_texture_range(&mut self, t: TensorId, texel0: usize, texels: usize, binding: u32) -> TexRef {
        self.linear_copy(CopySrc::Act(t), texel0, texels, binding)
    }

    /// As `linear_texture_range`, from a buffer outside the plan (a parameter,
    /// its gradient or optimizer state).
    pub fn linear_texture_buf(&mut self, b: &Arc<wgpu::Buffer>, texel0: usize, texels: usize, binding: u32) -> TexRef {
        // A byte copy: an f16 plan's textures would need f16 buffers (parameters are f32).
        assert!(!self.half, "linear_texture_buf in an f16 plan");
        self.linear_copy(CopySrc::Buf(b.clone()), texel0, texels, binding)
    }

    fn linear_copy(&mut self, src: CopySrc, texel0: usize, texels: usize, binding: u32) -> TexRef {
        let key = CopyKey { src: src.key(), texel0, texels, row_width: 0 };
        self.reused_copy(&key).unwrap_or_else(|| self.copy(src, key, binding))
    }

    /// Records the copy of `key`'s values into a new filling of `binding`'s
    /// texture: rows of `row_width` texels, or a linear texture (row_width 0).
    fn copy(&mut self, src: CopySrc, key: CopyKey, binding: u32) -> TexRef {
        let (tex, texels) = if key.row_width > 0 {
            (self.tex(key.row_width, key.texels / key.row_width, binding), None)
        } else {
            let width = crate::gpu::linear_width(key.texels, self.gpu.limits.max_texture_dimension_2d as usize, self.texel_bytes());
            (TexRef { linear: true, ..self.tex(width, key.texels.div_ceil(width).max(1), binding) }, Some(key.texels))
        };
        self.ops.push(OpRec::Copy { src: src.clone(), texel0: key.texel0, tex, texels });
        self.note_fill(&tex);
        let at = self.uses_of(&key);
        self.copies.push((key, tex, at, src));
        tex
    }

    /// How often `key`'s source has been bound to a dispatch so far.
    fn uses_of(&self, key: &CopyKey) -> u32 {
        if key.src.0 {
            self.tensor_uses[key.src.1]
        } else {
            self.buf_uses.get(&key.src.1).copied().unwrap_or(0)
        }
    }

    /// The texture of an earlier copy of the same values, if it still holds them:
    /// no other filling of that texture since, and no dispatch bound the source
    /// since. A texture is a memcpy of its source on CPU drivers (lavapipe moves
    /// ~12 GB/s), and the three products of a linear layer's backward and the
    /// bias gradient read the same operands: a CvT-13 training step copied many
    /// tensors two or three times (docs/perf.md). The texture may have been made
    /// for another binding (a dispatch binds a TexRef at any index); should the
    /// same dispatch's other operands refill it, `dispatch` copies again.
    fn reused_copy(&self, key: &CopyKey) -> Option<TexRef> {
        if !self.profile.copy_reuse {
            return None;
        }
        let (_, tex, at, _) = self.copies.iter().rev().find(|c| c.0 == *key)?;
        (*at == self.uses_of(key) && self.latest_fill.get(&fill_key(tex)) == Some(&tex.fill)).then_some(*tex)
    }

    fn note_fill(&mut self, t: &TexRef) {
        self.latest_fill.insert(fill_key(t), t.fill);
    }

    /// A plan texture of width x rows texels for a later dispatch's `binding`,
    /// to be written by a dispatch (`Res::OutTex`) right before that one.
    pub fn tex(&mut self, width: usize, rows: usize, binding: u32) -> TexRef {
        self.fills += 1;
        TexRef { width: width as u32, height: rows as u32, binding, fill: self.fills, linear: false }
    }

    /// `CVT_GPU_TRACE_MEMORY=1`: the slot plan's total against the live set, and
    /// the tensors alive at the step where the most bytes are.
    fn trace_memory(&self, tensors: &[SlotTensor], slot_size: &[u64]) {
        let mib = |b: u64| b as f64 / 1048576.0;
        let live_at = |i: usize| tensors.iter().enumerate().filter(move |(_, t)| t.span.is_none_or(|(a, b)| a <= i && i <= b));
        let peak = (0..self.ops.len()).max_by_key(|&i| live_at(i).map(|(_, t)| t.bytes).sum::<u64>()).unwrap_or(0);
        let mut live: Vec<(u64, &str)> = live_at(peak).map(|(k, t)| (t.bytes, self.tensors[k].name.as_str())).collect();
        live.sort_by(|a, b| b.cmp(a));
        let total: u64 = live.iter().map(|l| l.0).sum();
        eprintln!("plan: {} slots, {:.2} MiB; most live at step {peak}: {:.2} MiB in {} tensors", slot_size.len(), mib(slot_size.iter().sum()), mib(total), live.len());
        for (b, name) in live.iter().take(12) {
            eprintln!("  {:8.2} MiB  {name}", mib(*b));
        }
    }

    /// Plans memory by liveness and creates every buffer, texture and bind group.
    pub fn compile(self) -> Result<Plan> {
        let gpu = self.gpu.clone();
        let n = self.tensors.len();
        let max_groups = gpu.limits.max_compute_workgroups_per_dimension;
        let (mut first, mut last) = (vec![usize::MAX; n], vec![0usize; n]);
        for (i, op) in self.ops.iter().enumerate() {
            if let OpRec::Dispatch { label, groups, .. } = op {
                if groups.iter().any(|&g| g > max_groups) {
                    bail!("{label}: dispatch {groups:?} exceeds this adapter's {max_groups} workgroups per dimension; use a smaller batch");
                }
            }
            for t in op.acts() {
                first[t.0] = first[t.0].min(i);
                last[t.0] = i;
            }
        }
        let (elem, texel) = (self.elem_bytes(), self.texel_bytes());
        let format = crate::gpu::tex_format(self.half);
        let bytes = |t: usize| ((self.tensors[t].len.max(1) * elem) as u64).div_ceil(16) * 16;
        let tensors: Vec<SlotTensor> = (0..n).map(|t| SlotTensor { bytes: bytes(t), span: (first[t] != usize::MAX && !self.tensors[t].pinned).then(|| (first[t], last[t])) }).collect();
        let SlotPlan { slot_size, tensor_slot, max_live } = plan_slots(&tensors);
        if crate::profile::settings::get().trace_memory {
            self.trace_memory(&tensors, &slot_size);
        }
        for t in 0..n {
            if bytes(t) > gpu.max_binding() {
                return Err(TooLarge { tensor: self.tensors[t].name.clone(), bytes: bytes(t), limit: gpu.max_binding() }.into());
            }
        }
        let slots: Vec<wgpu::Buffer> = slot_size.iter().enumerate().map(|(i, &s)| gpu.storage(&format!("activation slot {i}"), s)).collect::<Result<_>>()?;
        // Linear textures of one binding all take the widest one's width (kernels
        // read the width from the texture), so they share a single texture.
        let mut lin_w: HashMap<u32, u32> = HashMap::new();
        let mut lin_texels: HashMap<u32, usize> = HashMap::new();
        for op in &self.ops {
            if let OpRec::Copy { tex, texels: Some(n), .. } = op {
                let w = lin_w.entry(tex.binding).or_insert(0);
                *w = (*w).max(tex.width);
                lin_texels.insert(tex.fill, *n);
            }
        }
        let relink = |t: &mut TexRef| {
            if let Some(&n) = lin_texels.get(&t.fill) {
                t.width = lin_w[&t.binding];
                t.height = n.div_ceil(t.width as usize).max(1) as u32;
            }
        };
        let mut ops = self.ops;
        for op in &mut ops {
            match op {
                OpRec::Copy { tex, .. } => relink(tex),
                OpRec::Dispatch { bindings, .. } => bindings.iter_mut().for_each(|r| {
                    if let Res::ActTex(t) | Res::OutTex(t) = r {
                        relink(t)
                    }
                }),
                OpRec::Clear { .. } => {}
            }
        }
        // One texture per (binding, width), as tall as its tallest filling; check
        // that every use reads the latest filling of its texture.
        let mut tex_sizes: Vec<TexRef> = vec![];
        let mut last_fill: HashMap<(u32, u32, bool), u32> = HashMap::new();
        for op in &ops {
            let (filled, used): (Vec<TexRef>, Vec<TexRef>) = match op {
                OpRec::Copy { tex, .. } => (vec![*tex], vec![]),
                OpRec::Dispatch { bindings, .. } => (
                    bindings.iter().filter_map(|r| if let Res::OutTex(t) = r { Some(*t) } else { None }).collect(),
                    bindings.iter().filter_map(|r| if let Res::ActTex(t) = r { Some(*t) } else { None }).collect(),
                ),
                OpRec::Clear { .. } => (vec![], vec![]),
            };
            for t in &used {
                if last_fill.get(&t.key()) != Some(&t.fill) {
                    bail!("internal: texture for binding {} ({} texels wide) refilled before its use", t.binding, t.width);
                }
            }
            for t in filled {
                last_fill.insert(t.key(), t.fill);
                match tex_sizes.iter_mut().find(|x| x.key() == t.key()) {
                    Some(x) => x.height = x.height.max(t.height),
                    None => tex_sizes.push(t),
                }
            }
        }
        if crate::profile::settings::get().trace_textures {
            eprintln!("plan: {} textures", tex_sizes.len());
            for t in &tex_sizes {
                eprintln!("texture binding {:2} {:5} x {:6} texels {:8.2} MiB", t.binding, t.width, t.height, (t.width as f64 * t.height as f64 * texel as f64) / 1048576.0);
            }
        }
        let max_tex = gpu.limits.max_texture_dimension_2d;
        if let Some(t) = tex_sizes.iter().find(|t| t.width > max_tex || t.height > max_tex) {
            bail!("texture {}x{} exceeds this adapter's {max_tex} texel limit", t.width, t.height);
        }
        let width = |t: &TexRef| if t.linear { t.width } else { crate::gpu::npot(t.width, max_tex) };
        let textures: Vec<wgpu::Texture> = tex_sizes.iter().map(|t| crate::gpu::texture_of(&gpu, "activation texture", width(t), t.height, format)).collect();
        let views: Vec<wgpu::TextureView> = textures.iter().map(|t| t.create_view(&Default::default())).collect();
        let tex_index = |t: &TexRef| tex_sizes.iter().position(|x| x.key() == t.key()).unwrap();
        let mut steps = Vec::with_capacity(ops.len());
        for op in ops {
            let (label, pipeline, bindings, groups, flops) = match op {
                OpRec::Copy { src, texel0, tex, texels } => {
                    let from = |src: &CopySrc| match src {
                        CopySrc::Act(t) => CopyFrom::Slot(tensor_slot[t.0]),
                        CopySrc::Buf(b) => CopyFrom::Buf(b.clone()),
                    };
                    let (texture, w) = (tex_index(&tex), tex.width as usize);
                    let offset = (texel0 * texel) as u64;
                    // A linear texture: its whole rows, then the partial last row
                    // (a one-row copy needs no 256-byte row alignment).
                    let (full, rest) = match texels {
                        Some(n) => (n / w, n % w),
                        None => (tex.height as usize, 0),
                    };
                    let parts = [(full, w, 0), (usize::from(rest > 0), rest, full)];
                    for (rows, width, y) in parts.into_iter().filter(|p| p.0 > 0) {
                        steps.push(Step {
                            label: "copy to texture".into(),
                            flops: 0.0,
                            bytes: 2 * (rows * width * texel) as u64,
                            kind: StepKind::Copy { from: from(&src), offset: offset + (y * w * texel) as u64, texture, width: width as u32, height: rows as u32, y: y as u32 },
                        });
                    }
                    continue;
                }
                OpRec::Clear { t } => {
                    steps.push(Step { label: "clear".into(), flops: 0.0, bytes: bytes(t.0), kind: StepKind::Clear { slot: tensor_slot[t.0], bytes: bytes(t.0) } });
                    continue;
                }
                OpRec::Dispatch { label, pipeline, bindings, groups, flops } => (label, pipeline, bindings, groups, flops),
            };
            let uniforms: Vec<Option<wgpu::Buffer>> = bindings
                .iter()
                .map(|r| match r {
                    Res::Uniform(w) => Some(gpu.uniform(&label, w)),
                    _ => None,
                })
                .collect();
            let entries: Vec<wgpu::BindGroupEntry> = bindings
                .iter()
                .enumerate()
                .filter(|(_, r)| !matches!(r, Res::Unused))
                .map(|(i, r)| wgpu::BindGroupEntry {
                    binding: i as u32,
                    resource: match r {
                        Res::Act(t) => wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer: &slots[tensor_slot[t.0]], offset: 0, size: std::num::NonZeroU64::new(bytes(t.0)) }),
                        Res::Buf(b) => b.as_entire_binding(),
                        Res::Uniform(_) => uniforms[i].as_ref().unwrap().as_entire_binding(),
                        Res::Tex(v) => wgpu::BindingResource::TextureView(v),
                        Res::ActTex(t) | Res::OutTex(t) => wgpu::BindingResource::TextureView(&views[tex_index(t)]),
                        Res::Unused => unreachable!(),
                    },
                })
                .collect();
            let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor { label: Some(&label), layout: &pipeline.get_bind_group_layout(0), entries: &entries });
            gpu.check_error().with_context(|| label.clone())?;
            let traffic = bindings
                .iter()
                .map(|r| match r {
                    Res::Act(t) => bytes(t.0),
                    Res::Buf(b) => b.size(),
                    Res::ActTex(t) | Res::OutTex(t) => t.width as u64 * t.height as u64 * texel as u64,
                    _ => 0,
                })
                .sum();
            steps.push(Step { label, flops, bytes: traffic, kind: StepKind::Dispatch { pipeline, bind_group, groups } });
        }
        Ok(Plan {
            activation_bytes: slot_size.iter().sum(),
            unshared_bytes: (0..n).map(bytes).sum(),
            max_live_bytes: max_live,
            texture_bytes: tex_sizes.iter().map(|t| width(t) as u64 * crate::gpu::npot(t.height, max_tex) as u64 * texel as u64).sum(),
            half: self.half,
            gpu,
            steps,
            slots,
            textures,
            tensor_slot,
            tensor_len: self.tensors.iter().map(|t| t.len).collect(),
        })
    }
}

/// A tensor for `plan_slots`: its size, and the steps [first, last] it is used
/// in, or None for a tensor that keeps its own buffer (pinned, or never used).
struct SlotTensor {
    bytes: u64,
    span: Option<(usize, usize)>,
}

struct SlotPlan {
    slot_size: Vec<u64>,
    tensor_slot: Vec<usize>,
    /// Most bytes alive at once: the bound any slot plan pays at least.
    max_live: u64,
}

/// Activation slots by liveness, offline and greedy by size: tensors from the
/// largest down, each into the smallest slot whose tensors' lifetimes it does not
/// overlap, else into a new slot of its size (so a slot is as large as its first
/// tensor). Lifetimes that meet at one step overlap: a dispatch may read one
/// tensor while writing another. Slots stay separate buffers, rather than offsets
/// in one arena, because a dispatch reads some tensors through read-only bindings
/// while writing others, and WebGPU forbids one buffer in both roles.
fn plan_slots(tensors: &[SlotTensor]) -> SlotPlan {
    let mut slot_size: Vec<u64> = vec![];
    let mut tensor_slot = vec![usize::MAX; tensors.len()];
    let mut shared = vec![];
    for (t, x) in tensors.iter().enumerate() {
        match x.span {
            Some(_) => shared.push(t),
            None => {
                slot_size.push(x.bytes);
                tensor_slot[t] = slot_size.len() - 1;
            }
        }
    }
    let span = |t: usize| tensors[t].span.unwrap();
    let own_bytes: u64 = slot_size.iter().sum();
    let steps = shared.iter().map(|&t| span(t).1 + 2).max().unwrap_or(0);
    let mut delta = vec![0i64; steps];
    for &t in &shared {
        delta[span(t).0] += tensors[t].bytes as i64;
        delta[span(t).1 + 1] -= tensors[t].bytes as i64;
    }
    let (mut live, mut peak) = (0i64, 0i64);
    for d in &delta {
        live += d;
        peak = peak.max(live);
    }
    shared.sort_by_key(|&t| (std::cmp::Reverse(tensors[t].bytes), span(t).0));
    // Per shared slot: its index and the lifetimes in it, sorted by start.
    let mut slot_spans: Vec<(usize, Vec<(usize, usize)>)> = vec![];
    for &t in &shared {
        let (sp, need) = (span(t), tensors[t].bytes);
        let free = |spans: &Vec<(usize, usize)>| {
            let k = spans.partition_point(|s| s.0 < sp.0);
            (k == 0 || spans[k - 1].1 < sp.0) && (k == spans.len() || spans[k].0 > sp.1)
        };
        let fit = slot_spans.iter().enumerate().filter(|(_, (s, spans))| slot_size[*s] >= need && free(spans)).min_by_key(|(_, (s, _))| slot_size[*s]).map(|(i, _)| i);
        let i = fit.unwrap_or_else(|| {
            slot_size.push(need);
            slot_spans.push((slot_size.len() - 1, vec![]));
            slot_spans.len() - 1
        });
        let spans = &mut slot_spans[i].1;
        let k = spans.partition_point(|s| s.0 < sp.0);
        spans.insert(k, sp);
        tensor_slot[t] = slot_spans[i].0;
    }
    SlotPlan { slot_size, tensor_slot, max_live: own_bytes + peak as u64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(bytes: u64, span: Option<(usize, usize)>) -> SlotTensor {
        SlotTensor { bytes, span }
    }

    /// No two tensors whose lifetimes overlap share a slot, and each fits its slot.
    fn check(ts: &[SlotTensor], p: &SlotPlan) {
        for (i, a) in ts.iter().enumerate() {
            assert!(p.slot_size[p.tensor_slot[i]] >= a.bytes);
            for (j, b) in ts.iter().enumerate().skip(i + 1) {
                if p.tensor_slot[i] == p.tensor_slot[j] {
                    let (Some(x), Some(y)) = (a.span, b.span) else { panic!("own-buffer tensor {i} or {j} shares a slot") };
                    assert!(x.1 < y.0 || y.1 < x.0, "tensors {i} {x:?} and {j} {y:?} overlap in slot {}", p.tensor_slot[i]);
                }
            }
        }
    }

    #[test]
    fn chain_reuses_two_slots() {
        // x0 -> x1 -> ... : each tensor is written at step i and read at i + 1.
        let ts: Vec<SlotTensor> = (0..10).map(|i| t(100 + i as u64, Some((i, i + 1)))).collect();
        let p = plan_slots(&ts);
        check(&ts, &p);
        assert_eq!(p.slot_size.len(), 2);
        assert_eq!(p.max_live, 109 + 108);
    }

    #[test]
    fn large_first_avoids_growing_slots() {
        // A small tensor early, a large one later: the online best fit had put the
        // small one in a slot and then grown it; here both share one slot of 1000.
        let ts = vec![t(10, Some((0, 1))), t(1000, Some((2, 3))), t(500, Some((0, 3))), t(64, None)];
        let p = plan_slots(&ts);
        check(&ts, &p);
        assert_eq!(p.slot_size.iter().sum::<u64>(), 1000 + 500 + 64);
        assert_eq!(p.max_live, 1500 + 64);
    }

    #[test]
    fn meeting_lifetimes_do_not_share() {
        // One step reads a and writes b: they must not alias.
        let ts = vec![t(16, Some((0, 1))), t(16, Some((1, 2)))];
        let p = plan_slots(&ts);
        check(&ts, &p);
        assert_ne!(p.tensor_slot[0], p.tensor_slot[1]);
    }
}

impl Plan {
    fn buffer(&self, t: TensorId) -> &wgpu::Buffer {
        &self.slots[self.tensor_slot[t.0]]
    }

    /// Uploads `data` into tensor `t` (an input).
    pub fn write(&self, t: TensorId, data: &[f32]) -> Result<()> {
        if data.len() != self.tensor_len[t.0] {
            bail!("input has {} values, the plan expects {}", data.len(), self.tensor_len[t.0]);
        }
        if self.half {
            // Padded to whole 4-byte words, as buffer writes need.
            let mut h = crate::gpu::to_f16(data);
            h.resize(h.len().div_ceil(2) * 2, half::f16::ZERO);
            self.gpu.queue.write_buffer(self.buffer(t), 0, bytemuck::cast_slice(&h));
        } else {
            self.gpu.queue.write_buffer(self.buffer(t), 0, bytemuck::cast_slice(data));
        }
        Ok(())
    }

    /// A step's workgroups and invocations per workgroup (0, 0 for copies and clears).
    fn launch_of(&self, s: &Step) -> (u64, u64) {
        match &s.kind {
            StepKind::Dispatch { pipeline, groups, .. } => (groups.iter().map(|&g| g as u64).product(), self.gpu.workgroup_size_of(pipeline).iter().map(|&v| v as u64).product()),
            _ => (0, 0),
        }
    }

    /// Every dispatch with its launch shape, in order.
    pub fn launches(&self) -> Vec<Launch> {
        let launch = |s: &Step| match &s.kind {
            StepKind::Dispatch { pipeline, groups, .. } => Some(Launch { label: s.label.clone(), workgroups: *groups, workgroup_size: self.gpu.workgroup_size_of(pipeline), flops: s.flops, bytes: s.bytes }),
            _ => None,
        };
        self.steps.iter().filter_map(launch).collect()
    }

    /// Records every step into one command buffer — dispatches in compute passes,
    /// texture copies between them — and submits it.
    pub fn run(&self) -> Result<()> {
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        let mut i = 0;
        while i < self.steps.len() {
            // Copies and clears go between passes; runs of dispatches share one pass.
            if !matches!(self.steps[i].kind, StepKind::Dispatch { .. }) {
                self.record_step(&mut enc, &self.steps[i], None);
                i += 1;
                continue;
            }
            let mut pass = enc.begin_compute_pass(&Default::default());
            while let Some(Step { kind: StepKind::Dispatch { pipeline, bind_group, groups }, .. }) = self.steps.get(i) {
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, bind_group, &[]);
                pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
                i += 1;
            }
        }
        self.gpu.queue.submit([enc.finish()]);
        self.gpu.check_error()
    }

    /// Replays step `i` alone `n` times, one submit each, and waits (leak and
    /// timing probes: dev/dispatch_leaks.rs).
    pub fn run_one(&self, i: usize, n: usize) -> Result<()> {
        for _ in 0..n {
            let mut enc = self.gpu.device.create_command_encoder(&Default::default());
            self.record_step(&mut enc, &self.steps[i], None);
            self.gpu.queue.submit([enc.finish()]);
        }
        self.gpu.sync()
    }

    /// Elements of tensor `t`.
    pub fn len(&self, t: TensorId) -> usize {
        self.tensor_len[t.0]
    }

    /// Reads tensor `t` back (waits for submitted work).
    pub fn read(&self, t: TensorId) -> Result<Vec<f32>> {
        let n = self.tensor_len[t.0];
        if self.half {
            // f16 pairs read as f32 words, then reinterpreted.
            let words = self.gpu.read(self.buffer(t), 0, n.div_ceil(2))?;
            let h: &[half::f16] = bytemuck::cast_slice(&words);
            return Ok(h[..n].iter().map(|v| v.to_f32()).collect());
        }
        self.gpu.read(self.buffer(t), 0, n)
    }

    /// (dispatches, texture copies) recorded per run.
    pub fn counts(&self) -> (usize, usize) {
        let copies = self.steps.iter().filter(|s| matches!(s.kind, StepKind::Copy { .. })).count();
        let clears = self.steps.iter().filter(|s| matches!(s.kind, StepKind::Clear { .. })).count();
        (self.steps.len() - copies - clears, copies)
    }

    /// Total floating-point operations of one run (2 per multiply-add).
    pub fn flops(&self) -> f64 {
        self.steps.iter().map(|s| s.flops).sum()
    }
}

/// Time of one step, measured by `Plan::profile`.
pub struct StepTime {
    pub label: String,
    pub ms: f64,
    pub flops: f64,
    /// Bytes the step's bindings span (a traffic estimate for GB/s).
    pub bytes: u64,
    /// Workgroups launched and invocations per workgroup (0 for copies and clears).
    pub workgroups: u64,
    pub invocations: u64,
}

/// One dispatch of a plan as launched: for launch-shape reports (`bench --plan-only`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Launch {
    pub label: String,
    pub workgroups: [u32; 3],
    pub workgroup_size: [u32; 3],
    pub flops: f64,
    /// Bytes of the buffers the dispatch binds: an upper estimate of its traffic.
    pub bytes: u64,
}

impl Launch {
    pub fn groups(&self) -> u64 {
        self.workgroups.iter().map(|&v| v as u64).product()
    }

    pub fn invocations(&self) -> u64 {
        self.workgroup_size.iter().map(|&v| v as u64).product()
    }
}

/// How `Plan::profile` timed the steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Timing {
    /// GPU timestamps around each dispatch (its own compute pass).
    GpuTimestamps,
    /// Wall clock per step, each submitted alone (no timestamp queries).
    WallClock,
}

impl Plan {
    fn record_step(&self, enc: &mut wgpu::CommandEncoder, s: &Step, ts: Option<(&wgpu::QuerySet, u32)>) {
        match &s.kind {
            StepKind::Copy { from, offset, texture, width, height, y } => enc.copy_buffer_to_texture(
                wgpu::TexelCopyBufferInfo {
                    buffer: match from {
                        CopyFrom::Slot(slot) => &self.slots[*slot],
                        CopyFrom::Buf(b) => b,
                    },
                    layout: wgpu::TexelCopyBufferLayout {
                        offset: *offset,
                        bytes_per_row: (*height > 1).then_some(width * crate::gpu::texel_bytes(self.half) as u32),
                        rows_per_image: (*height > 1).then_some(*height),
                    },
                },
                wgpu::TexelCopyTextureInfo { texture: &self.textures[*texture], mip_level: 0, origin: wgpu::Origin3d { x: 0, y: *y, z: 0 }, aspect: wgpu::TextureAspect::All },
                wgpu::Extent3d { width: *width, height: *height, depth_or_array_layers: 1 },
            ),
            StepKind::Clear { slot, bytes } => enc.clear_buffer(&self.slots[*slot], 0, Some(*bytes)),
            StepKind::Dispatch { pipeline, bind_group, groups } => {
                let timestamp_writes = ts.map(|(query_set, i)| wgpu::ComputePassTimestampWrites { query_set, beginning_of_pass_write_index: Some(i), end_of_pass_write_index: Some(i + 1) });
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes });
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, bind_group, &[]);
                pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
            }
        }
    }

    /// Times every step: with GPU timestamp queries where the adapter has them
    /// (each dispatch in its own pass, one submit per chunk of steps), else by
    /// wall clock with each step submitted alone and waited for.
    pub fn profile(&self) -> Result<(Vec<StepTime>, Timing)> {
        if self.gpu.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            return Ok((self.profile_timestamps()?, Timing::GpuTimestamps));
        }
        let mut out = vec![];
        for s in &self.steps {
            let t = std::time::Instant::now();
            let mut enc = self.gpu.device.create_command_encoder(&Default::default());
            self.record_step(&mut enc, s, None);
            self.gpu.queue.submit([enc.finish()]);
            self.gpu.sync()?;
            let (workgroups, invocations) = self.launch_of(s);
            out.push(StepTime { label: s.label.clone(), ms: t.elapsed().as_secs_f64() * 1e3, flops: s.flops, bytes: s.bytes, workgroups, invocations });
        }
        Ok((out, Timing::WallClock))
    }

    fn profile_timestamps(&self) -> Result<Vec<StepTime>> {
        // wgpu caps a query set at 4096 queries: 2 per dispatch, in chunks.
        const CHUNK: usize = 2048;
        let period_ns = self.gpu.queue.get_timestamp_period() as f64;
        let mut out = vec![];
        for chunk in self.steps.chunks(CHUNK) {
            let n = (2 * chunk.len()) as u32;
            let qs = self.gpu.device.create_query_set(&wgpu::QuerySetDescriptor { label: Some("profile"), ty: wgpu::QueryType::Timestamp, count: n });
            let resolve = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile resolve"),
                size: 8 * n as u64,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let mut enc = self.gpu.device.create_command_encoder(&Default::default());
            let mut used = vec![];
            // Copies and clears are timed by timestamps between passes where the
            // adapter allows them (on CPU drivers a copy is a memcpy on one core).
            let between = self.gpu.features.contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS);
            for (i, s) in chunk.iter().enumerate() {
                let dispatch = matches!(s.kind, StepKind::Dispatch { .. });
                let q = 2 * i as u32;
                if dispatch || !between {
                    self.record_step(&mut enc, s, dispatch.then_some((&qs, q)));
                } else {
                    enc.write_timestamp(&qs, q);
                    self.record_step(&mut enc, s, None);
                    enc.write_timestamp(&qs, q + 1);
                }
                used.push(dispatch || between);
            }
            // Queries of steps not timed are never written; their values are ignored.
            enc.resolve_query_set(&qs, 0..n, &resolve, 0);
            let staging = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile readback"),
                size: 8 * n as u64,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            enc.copy_buffer_to_buffer(&resolve, 0, &staging, 0, 8 * n as u64);
            self.gpu.queue.submit([enc.finish()]);
            let raw = self.gpu.map_read(&staging, 8 * n as u64)?;
            let ticks: Vec<u64> = bytemuck::pod_collect_to_vec::<f32, u64>(&raw);
            for (i, s) in chunk.iter().enumerate() {
                let ms = if used[i] { ticks[2 * i + 1].saturating_sub(ticks[2 * i]) as f64 * period_ns / 1e6 } else { 0.0 };
                let (workgroups, invocations) = self.launch_of(s);
                out.push(StepTime { label: s.label.clone(), ms, flops: s.flops, bytes: s.bytes, workgroups, invocations });
            }
        }
        Ok(out)
    }
}
