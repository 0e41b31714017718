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

//!
//! One module per job: this one is the graph's IR and the builder ops use
//! (tensors, dispatches, texture copies and their reuse); `compile` plans memory
//! and creates the GPU objects; `slots` is the liveness memory plan; `run`
//! records, runs and profiles a compiled plan.

mod compile;
mod run;
mod slots;

pub use run::{Launch, StepTime, Timing};

use crate::gpu::Gpu;
use anyhow::Result;
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

/// A dispatch's binding list from (binding, resource) pairs, `Res::Unused`
/// between: bindings by name (`ops::params::mm::A`, ...) rather than by position.
pub fn bind(pairs: impl IntoIterator<Item = (usize, Res)>) -> Vec<Res> {
    let mut b: Vec<Res> = vec![];
    for (i, r) in pairs {
        if b.len() <= i {
            b.resize(i + 1, Res::Unused);
        }
        b[i] = r;
    }
    b
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
    /// The buffers from outside the plan (`Res::Buf`) the step binds or copies
    /// from, by address: where a parameter's gradient is last touched
    /// (`Plan::last_use`).
    bufs: Vec<usize>,
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
        Graph { gpu, profile, half: false, tensors: vec![], ops: vec![], fills: 0, copies: vec![], latest_fill: HashMap::new(), tensor_uses: vec![], buf_uses: HashMap::new() }
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
}
