//! `shaders/matmul.wgsl`: linear layers and dense convolutions (implicit GEMM)
//! with fused bias, activation and residual add.
//!
//! One module per job, one GEMM per kernel set: this one holds the weight
//! layouts (`Linear`), the parameters and `dispatch`, which picks the kernel for
//! a layer from the graph's profile; `tiled` is the GPU set's GEMM (tiles,
//! split-K) and its column sums; `texture` the CPU set's block and grid rules
//! (the texture GEMM itself is `ops::gemm`); `conv` the dense convolutions
//! (im2col, col2im) and their backward; `backward` the linear layers' backward.

mod backward;
mod conv;
mod texture;
mod tiled;

pub use backward::{linear_backward, linear_backward_act, LinearGrad};
use conv::im2col;
pub use conv::{conv2d, conv2d_backward};
pub use texture::TWG_X;
pub(crate) use texture::{tex_block, tex_grid};
use tiled::{backward_product, tiled, TiledZ};
pub use tiled::{colsum, tiled_shape, TiledShape, MIN_GROUPS};

use crate::gpu::{Gpu, MatmulKind};
use crate::graph::{bind, Graph, Res, TensorId};
use crate::ops::params::mm;
use anyhow::Result;
use std::sync::Arc;

use crate::ops::gemm::{tex_gemm, texture_chunk_rows, Epilogue, Src, View};

/// Whether buffer-held weights go through the packed texture GEMM (`ops::gemm`):
/// in the CPU kernel set.
pub fn packs(g: &Graph) -> bool {
    g.profile.kernels == crate::profile::KernelSet::Cpu
}

/// Rows and vec4 columns per invocation (`RM`, `RN4` in the shader).
const RM: usize = 8;
const RN4: usize = 2;
const WG_X: usize = 8;
const WG_Y: usize = 8;
/// Activation fused into the matmul epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Act {
    None,
    /// Exact erf GELU (Hugging Face's CvT).
    Gelu,
    /// x * sigmoid(1.702 x) (the official CvT code).
    QuickGelu,
}

impl Act {
    pub(crate) fn code(self) -> f64 {
        match self {
            Act::None => 0.0,
            Act::Gelu => 1.0,
            Act::QuickGelu => 2.0,
        }
    }
}

/// A GEMM right-hand side on the GPU: B [K, NP] (NP = N rounded up to 4) as a
/// storage buffer or as a [K x NP/4] rgba32float texture, and bias [NP].
pub struct Linear {
    pub w: Option<Arc<wgpu::Buffer>>,
    /// The texture variant's weight and, as a linear texture, its bias (`main_tex`
    /// reads the bias as texels: CPU drivers load storage buffers per lane).
    pub tex: Option<(Arc<wgpu::TextureView>, Arc<wgpu::TextureView>)>,
    pub b: Arc<wgpu::Buffer>,
    pub k: usize,
    pub n: usize,
    /// The weight is stored as f16 (see `WeightFormat`); inference only.
    pub f16: bool,
}

/// How a layer's weight is stored on the GPU. With `F16` the matmul reads halves
/// and computes in f32: an rgba16float texture for the texture variant, f16 pairs
/// unpacked in the shader for the buffer variant (which f16 buffer weights take
/// even on adapters that otherwise pack buffer weights into textures, `packs`).
/// Training weights are f32. `Half` is `F16` for a model whose plans are f16
/// too (`Graph::half`: activations in f16, every texture rgba16float, so the
/// bias and LayerNorm textures made at load are f16 as well).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WeightFormat {
    #[default]
    F32,
    F16,
    Half,
}

impl WeightFormat {
    /// With `--f16`: `Half` on adapters with shader-f16 (WGSL's f16 type, for
    /// f16 activation buffers), else `F16` (weights only, which needs no feature).
    pub fn from_flag(gpu: &Arc<Gpu>, f16: bool) -> WeightFormat {
        if !f16 {
            WeightFormat::F32
        } else if gpu.features.contains(wgpu::Features::SHADER_F16) && gpu.profile().f16_act {
            WeightFormat::Half
        } else {
            WeightFormat::F16
        }
    }
}

/// Whether a K x N layer can take the texture path: activation rows are copied
/// into textures, which needs rows of a multiple of 256 bytes (K % 64 == 0).
fn texture_capable(gpu: &Gpu, k: usize, n: usize) -> bool {
    let max = gpu.limits.max_texture_dimension_2d as usize;
    k % 64 == 0 && k <= max && pad4(n) / 4 <= max && k / 4 <= max
}

fn pad4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

impl Linear {
    /// A buffer in this layer's weight layout ([k, n padded to 4]: the weight of
    /// a buffer-kind layer, or its gradient) read back in PyTorch's [n, k].
    pub fn read_torch(&self, gpu: &Gpu, buf: &wgpu::Buffer) -> Result<Vec<f32>> {
        let np = self.n.div_ceil(4) * 4;
        let w = gpu.read(buf, 0, self.k * np)?;
        Ok((0..self.n * self.k).map(|i| w[(i % self.k) * np + i / self.k]).collect())
    }

    /// As `read_torch` for a convolution's weight (rows (ky·kw + kx)·cin + ci):
    /// PyTorch's [n, cin, kh, kw].
    pub fn read_torch_conv(&self, gpu: &Gpu, buf: &wgpu::Buffer, cin: usize, (kh, kw): (usize, usize)) -> Result<Vec<f32>> {
        let np = self.n.div_ceil(4) * 4;
        let wst = gpu.read(buf, 0, kh * kw * cin * np)?;
        let mut wt = vec![0f32; self.n * cin * kh * kw];
        for o in 0..self.n {
            for ci in 0..cin {
                for ky in 0..kh {
                    for kx in 0..kw {
                        wt[((o * cin + ci) * kh + ky) * kw + kx] = wst[((ky * kw + kx) * cin + ci) * np + o];
                    }
                }
            }
        }
        Ok(wt)
    }

    /// From a PyTorch Linear: weight [N, K] (y = x·Wᵀ + b), bias [N] or none,
    /// in the adapter's preferred variant.
    pub fn from_torch(gpu: &Arc<Gpu>, name: &str, w: &[f32], b: Option<&[f32]>, n: usize, k: usize) -> Result<Linear> {
        Self::from_torch_in(gpu, name, w, b, n, k, WeightFormat::F32)
    }

    /// As `from_torch`, stored in `fmt`.
    pub fn from_torch_in(gpu: &Arc<Gpu>, name: &str, w: &[f32], b: Option<&[f32]>, n: usize, k: usize, fmt: WeightFormat) -> Result<Linear> {
        let kind = if texture_capable(gpu, k, n) { gpu.profile().matmul() } else { MatmulKind::Buffer };
        Self::with_kind_in(gpu, name, w, b, n, k, kind, fmt)
    }

    /// As `from_torch`, in a given variant (tests run every variant).
    pub fn with_kind(gpu: &Gpu, name: &str, w: &[f32], b: Option<&[f32]>, n: usize, k: usize, kind: MatmulKind) -> Result<Linear> {
        Self::with_kind_in(gpu, name, w, b, n, k, kind, WeightFormat::F32)
    }

    /// As `with_kind`, stored in `fmt`.
    #[allow(clippy::too_many_arguments)]
    pub fn with_kind_in(gpu: &Gpu, name: &str, w: &[f32], b: Option<&[f32]>, n: usize, k: usize, kind: MatmulKind, fmt: WeightFormat) -> Result<Linear> {
        assert_eq!(w.len(), n * k, "{name}: weight size");
        if kind == MatmulKind::Texture && !texture_capable(gpu, k, n) {
            anyhow::bail!("{name}: a {k}x{n} layer cannot use the texture matmul (needs K % 64 == 0 within the texture limit)");
        }
        let np = pad4(n);
        let mut bt = vec![0f32; k * np];
        for o in 0..n {
            for i in 0..k {
                bt[i * np + o] = w[o * k + i];
            }
        }
        Self::from_kn(gpu, name, &bt, b, n, k, kind, fmt)
    }

    /// From a PyTorch Conv2d weight [Cout, Cin, kh, kw]: K ordered (ky, kx, ci) as
    /// the shader's im2col view reads it, in the adapter's preferred variant.
    pub fn from_conv(gpu: &Arc<Gpu>, name: &str, w: &[f32], b: Option<&[f32]>, cout: usize, cin: usize, kh: usize, kw: usize) -> Result<Linear> {
        Self::from_conv_in(gpu, name, w, b, (cout, cin, kh, kw), WeightFormat::F32)
    }

    /// As `from_conv` (shape (cout, cin, kh, kw)), stored in `fmt`.
    pub fn from_conv_in(gpu: &Arc<Gpu>, name: &str, w: &[f32], b: Option<&[f32]>, (cout, cin, kh, kw): (usize, usize, usize, usize), fmt: WeightFormat) -> Result<Linear> {
        let kind = if texture_capable(gpu, (kh * kw * cin).div_ceil(64) * 64, cout) { gpu.profile().matmul() } else { MatmulKind::Buffer };
        Self::conv_with_kind_in(gpu, name, w, b, (cout, cin, kh, kw), kind, fmt)
    }

    /// As `from_conv`, in a given variant. The texture variant multiplies an
    /// explicit im2col matrix whose K is padded to a multiple of 64 (zero rows of B).
    pub fn conv_with_kind(gpu: &Gpu, name: &str, w: &[f32], b: Option<&[f32]>, cout: usize, cin: usize, kh: usize, kw: usize, kind: MatmulKind) -> Result<Linear> {
        Self::conv_with_kind_in(gpu, name, w, b, (cout, cin, kh, kw), kind, WeightFormat::F32)
    }

    fn conv_with_kind_in(gpu: &Gpu, name: &str, w: &[f32], b: Option<&[f32]>, (cout, cin, kh, kw): (usize, usize, usize, usize), kind: MatmulKind, fmt: WeightFormat) -> Result<Linear> {
        assert_eq!(w.len(), cout * cin * kh * kw, "{name}: weight size");
        let k_real = kh * kw * cin;
        let k = if kind == MatmulKind::Texture { k_real.div_ceil(64) * 64 } else { k_real };
        let np = pad4(cout);
        let mut bt = vec![0f32; k * np];
        for o in 0..cout {
            for ci in 0..cin {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let kk = (ky * kw + kx) * cin + ci;
                        bt[kk * np + o] = w[((o * cin + ci) * kh + ky) * kw + kx];
                    }
                }
            }
        }
        Self::from_kn(gpu, name, &bt, b, cout, k, kind, fmt)
    }

    #[allow(clippy::too_many_arguments)]
    fn from_kn(gpu: &Gpu, name: &str, bt: &[f32], b: Option<&[f32]>, n: usize, k: usize, kind: MatmulKind, fmt: WeightFormat) -> Result<Linear> {
        let mut bias = vec![0f32; pad4(n)];
        if let Some(b) = b {
            bias[..n].copy_from_slice(b);
        }
        let label = format!("{name}.weight");
        let f16 = fmt != WeightFormat::F32;
        let half = fmt == WeightFormat::Half;
        let (w, tex) = match kind {
            MatmulKind::Buffer if f16 => (Some(Arc::new(gpu.upload_bytes(&label, bytemuck::cast_slice(&crate::gpu::to_f16(bt)))?)), None),
            MatmulKind::Buffer => (Some(Arc::new(gpu.upload(&label, bt)?)), None),
            MatmulKind::Texture => {
                let w4 = (pad4(n) / 4) as u32;
                let view = crate::gpu::texture_from_in(gpu, &label, bt, w4, k as u32, f16);
                (None, Some((Arc::new(view), crate::gpu::linear_texture_from(gpu, &format!("{name}.bias"), &bias, half))))
            }
        };
        Ok(Linear { w, tex, b: Arc::new(gpu.upload(&format!("{name}.bias"), &bias)?), k, n, f16 })
    }

    /// GPU bytes of the weight and bias as stored (padding and f16 included).
    pub fn stored_bytes(&self) -> u64 {
        let tex = |(w, b): &(Arc<wgpu::TextureView>, Arc<wgpu::TextureView>)| crate::gpu::texture_bytes(w) + crate::gpu::texture_bytes(b);
        self.w.as_ref().map_or(0, |w| w.size()) + self.tex.as_ref().map_or(0, tex) + self.b.size()
    }
}

/// Geometry of a dense convolution read from an NHWC token map.
#[derive(Clone, Copy, Debug)]
pub struct ConvGeom {
    pub batch: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub cin: usize,
    /// Tokens per image in the input map and the index of the first spatial token
    /// (1 when a cls token precedes the grid).
    pub in_tokens: usize,
    pub in_tok_off: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvGeom {
    pub fn out_hw(&self) -> (usize, usize) {
        let o = |x: usize| (x + 2 * self.pad - self.k) / self.stride + 1;
        (o(self.in_h), o(self.in_w))
    }
}

/// Where a matmul writes.
pub enum Out {
    /// A new tensor.
    New,
    /// Overwrite an existing tensor (a pinned output).
    Into(TensorId),
    /// Add into an existing tensor of the same shape (residual connection).
    Accumulate(TensorId),
}

fn overrides(act: Act, accumulate: bool, conv: bool, wg: (usize, usize)) -> [(&'static str, f64); 5] {
    [("A_MODE", if conv { 1.0 } else { 0.0 }), ("ACT", act.code()), ("ACCUMULATE", if accumulate { 1.0 } else { 0.0 }), ("WG_X", wg.0 as f64), ("WG_Y", wg.1 as f64)]
}

/// `overrides` for `main_tiled`, whose workgroup size is fixed.
fn tiled_overrides(act: Act, accumulate: bool, conv: bool) -> Vec<(&'static str, f64)> {
    overrides(act, accumulate, conv, (0, 0)).into_iter().filter(|(name, _)| !name.starts_with("WG_")).collect()
}

crate::kernel_params! {
/// `matmul.wgsl`'s `Params`, field by field (checked against the shader,
/// `ops::params`): sizes, the conv view of A_MODE 1, the first output row,
/// strides and offsets, the split-K layout.
pub struct MatmulParams for "matmul" "Params" {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub np4: u32,
    pub in_h: u32,
    pub in_w: u32,
    pub cin: u32,
    pub in_tokens: u32,
    pub in_tok_off: u32,
    pub out_h: u32,
    pub out_w: u32,
    pub kh: u32,
    pub kw: u32,
    pub stride: u32,
    pub pad: u32,
    pub out_row_off: u32,
    pub a_stride: u32,
    pub b_stride: u32,
    pub a_off: u32,
    pub b_off: u32,
    pub k_chunk: u32,
    pub splits: u32,
    /// log2 of the texture GEMM's invocations along column blocks (`tex_block`).
    pub col_lanes_log2: u32,
    pub _pad: u32,
}
}

/// Params with sizes [M, N, K, NP4], the conv view (zeros when there is none),
/// the first output row and the A/B strides.
fn params(sizes: [usize; 4], conv: Option<&ConvGeom>, out_row_off: usize, (a_stride, b_stride): (usize, usize)) -> MatmulParams {
    let [m, n, k, np4] = sizes.map(|v| v as u32);
    // One split of all of K unless `tiled` splits it.
    let mut p = MatmulParams { m, n, k, np4, out_row_off: out_row_off as u32, a_stride: a_stride as u32, b_stride: b_stride as u32, k_chunk: k, splits: 1, ..Default::default() };
    if let Some(c) = conv {
        let (oh, ow) = c.out_hw();
        [p.in_h, p.in_w, p.cin, p.in_tokens, p.in_tok_off, p.out_h, p.out_w, p.kh, p.kw, p.stride, p.pad] =
            [c.in_h, c.in_w, c.cin, c.in_tokens, c.in_tok_off, oh, ow, c.k, c.k, c.stride, c.pad].map(|v| v as u32);
    }
    p
}

/// `pack`: route buffer weights through the packed texture GEMM (see `packs`).
#[allow(clippy::too_many_arguments)]
fn dispatch(g: &mut Graph, label: &str, a: TensorId, m: usize, l: &Linear, act: Act, out: Out, conv: Option<ConvGeom>, pack: bool) -> Result<TensorId> {
    let np4 = pad4(l.n) / 4;
    let (accumulate, y) = match out {
        Out::New => (false, g.tensor(label.to_string(), m * l.n)),
        Out::Into(t) => (false, t),
        Out::Accumulate(t) => (true, t),
    };
    let params = |rows: usize, row_off: usize| params([rows, l.n, l.k, np4], conv.as_ref(), row_off, (l.k, np4 * 4));
    let flops = |rows: usize| 2.0 * (rows * l.n * l.k) as f64;
    match (&l.w, &l.tex) {
        (Some(w), _) if pack && !l.f16 => {
            // Buffer weights on a texture-preferring adapter: pack both operands.
            let (a_view, k) = match conv {
                // The im2col matrix padded to whole vec4s (zero columns), so it is
                // built four values at a time and read by the GEMM as it is:
                // stage 0's K = 7·7·3 = 147 had taken a scalar im2col and a
                // scalar pack pass (docs/perf.md).
                Some(geom) => (View::zero_padded(Src::Act(im2col(g, label, a, &geom, pad4(l.k))?), m, l.k, pad4(l.k)), l.k),
                None => (View::new(Src::Act(a), m, l.k, l.k), l.k),
            };
            let b_view = View::new(Src::Buf(w.clone()), k, l.n, np4 * 4);
            let ep = Epilogue { act, bias: Some(l.b.clone()), accumulate, ..Epilogue::plain() };
            tex_gemm(g, label, &a_view, &b_view, Res::Act(y), l.n, ep)?;
        }
        (Some(w), _) => {
            let f16 = [("B_F16", l.f16 as u32 as f64)];
            if !pack {
                // The GPU kernel set.
                let ov = [tiled_overrides(act, accumulate, conv.is_some()), f16.to_vec()].concat();
                tiled(g, label, &ov, [Res::Act(a), Res::Buf(w.clone()), Res::Buf(l.b.clone()), Res::Act(y)], TiledZ::None, params(m, 0), (m, l.n, l.k))?;
                return Ok(y);
            }
            let ov = [overrides(act, accumulate, conv.is_some(), (WG_X, WG_Y)).as_slice(), &f16].concat();
            let pipeline = g.pipeline("matmul", "main", &ov)?;
            let groups = [np4.div_ceil(RN4).div_ceil(WG_X) as u32, m.div_ceil(RM).div_ceil(WG_Y) as u32, 1];
            let b = bind([(mm::A, Res::Act(a)), (mm::B, Res::Buf(w.clone())), (mm::BIAS, Res::Buf(l.b.clone())), (mm::C, Res::Act(y)), (mm::PARAMS, Res::uniform(&params(m, 0)))]);
            g.dispatch(label, pipeline, b, groups, flops(m));
        }
        (None, Some(_)) if splits_epilogue(g, l, act, accumulate, m) => {
            // The plain GEMM (into y itself unless y accumulates), then the
            // activation in place and the residual add as passes of their own
            // (the profile's `fused_epilogue`). In place is safe on this path: those passes
            // read texture copies of their inputs.
            let z = dispatch(g, &format!("{label}.gemm"), a, m, l, Act::None, if accumulate { Out::New } else { Out::Into(y) }, conv, pack)?;
            if act != Act::None {
                elementwise(g, "act_forward", &format!("{label}.act"), z, z, m * l.n, act)?;
            }
            if accumulate {
                crate::ops::tokens::add_into(g, &format!("{label}.residual"), y, z, y)?;
            }
        }
        (None, Some((tex, bias_t))) => {
            assert!(conv.is_none(), "{label}: convolutions use the buffer matmul");
            // A is read from a linear texture of the activation (main_tex's TA 1:
            // no row-width limit, and the linear textures of all layers share one
            // texture), in chunks of rows of at most TEXTURE_CHUNK_BYTES, so that
            // texture stays small beside the activations.
            let k4 = l.k / 4;
            let chunk = texture_chunk_rows(l.k * 4, g.gpu.limits.max_texture_dimension_2d as usize);
            let mut ov = overrides(act, accumulate, false, (TWG_X, 1)).to_vec();
            let blk = tex_block(g, np4);
            ov.extend([("TA", 1.0), ("TRM", blk.trm as f64), ("A_SHARE", blk.share as u32 as f64)]);
            let pipeline = g.pipeline_w("matmul", "main_tex", &ov, l.f16)?;
            for r0 in (0..m).step_by(chunk) {
                let rows = chunk.min(m - r0);
                let at = g.linear_texture_range(a, r0 * k4, rows * k4, mm::A_TEX as u32);
                let (lx, groups) = (blk.lx, tex_grid(np4, rows, &blk));
                let mut pu = params(rows, r0);
                // A's row stride in vec4s, the column-block split, and A's offset:
                // the kernel reads row r0 + r at (r0 + r)·stride + a_off, and the
                // chunk's texture starts at row r0 (u32 arithmetic wraps in WGSL).
                (pu.a_stride, pu.col_lanes_log2, pu.a_off) = (k4 as u32, lx, ((r0 * k4) as u32).wrapping_neg());
                let b = bind([(mm::C, Res::Act(y)), (mm::PARAMS, Res::uniform(&pu)), (mm::A_TEX, Res::ActTex(at)), (mm::B_TEX, Res::Tex(tex.clone())), (mm::BIAS_TEX, Res::Tex(bias_t.clone()))]);
                g.dispatch(label, pipeline.clone(), b, groups, flops(rows));
            }
        }
        (None, None) => unreachable!("a Linear holds a buffer or a texture"),
    }
    Ok(y)
}

/// Whether this texture-GEMM layer leaves its activation or residual add to
/// separate passes (the profile's `fused_epilogue`; the vec4 passes need m·n % 4 == 0).
fn splits_epilogue(g: &Graph, l: &Linear, act: Act, accumulate: bool, m: usize) -> bool {
    // `packs` last: the variant trial's own dispatches (no activation, no
    // accumulate) must not ask for the variant it is deciding.
    l.w.is_none() && l.tex.is_some() && !g.profile.fused_epilogue && (act != Act::None || accumulate) && (m * l.n) % 4 == 0 && packs(g)
}

/// A transformer block's residual branch x·W + b, to be added to the stream `xs`:
/// by the GEMM's epilogue (returns None), or, where the epilogue is split, returned
/// for the caller to add in its next pass over the stream
/// (`rownorm::add_layernorm`), which saves the pass a separate add would take.
pub fn linear_residual(g: &mut Graph, label: &str, x: TensorId, m: usize, l: &Linear, xs: TensorId) -> Result<Option<TensorId>> {
    if splits_epilogue(g, l, Act::None, true, m) {
        return Ok(Some(linear(g, label, x, m, l, Act::None, Out::New)?));
    }
    linear(g, label, x, m, l, Act::None, Out::Accumulate(xs))?;
    Ok(None)
}

/// y[m, n] = act(x[m, k] · W + b), or y += that with `Out::Accumulate(y)`.
pub fn linear(g: &mut Graph, label: &str, x: TensorId, m: usize, l: &Linear, act: Act, out: Out) -> Result<TensorId> {
    let pack = packs(g);
    dispatch(g, label, x, m, l, act, out, None, pack)
}

/// The activation's elementwise entries over `len` values: `act_forward` writes
/// act(z) into `out`, `act_backward` scales `out` (holding dy) by act'(z).
fn elementwise(g: &mut Graph, entry: &str, label: &str, z: TensorId, out: TensorId, len: usize, act: Act) -> Result<()> {
    // Four at a time (vec4 bindings 1 and 8) when the length allows.
    let vec4 = len % 4 == 0;
    let (entry, n) = if vec4 { (format!("{entry}4"), len / 4) } else { (entry.to_string(), len) };
    let consts = [("ACT", act.code()), ("WG_X", 64.0), ("WG_Y", 1.0)];
    let groups = crate::graph::grid1d(&g.gpu, n.div_ceil(64) as u64);
    let p = params([n, 0, 0, 0], None, 0, (0, 0));
    let u = || Res::Unused;
    if vec4 && packs(g) {
        // Texel gathers instead of per-lane storage loads (see Graph::linear_texture),
        // in chunks so the textures stay small beside the activations; the
        // backward also reads dy (its output) as a texture.
        let pipeline = g.pipeline("matmul", &format!("{entry}_tex"), &consts)?;
        for (i0, m) in crate::ops::gemm::texture_ranges(n, 16) {
            let zt = g.linear_texture_range(z, i0, m, mm::A_TEX as u32);
            let dyt = if entry == "act_backward4" { Res::ActTex(g.linear_texture_range(out, i0, m, mm::B_TEX as u32)) } else { u() };
            let groups = crate::graph::grid1d(&g.gpu, m.div_ceil(64) as u64);
            let b = bind([(mm::PARAMS, Res::uniform(&params([m, 0, 0, 0], None, i0, (0, 0)))), (mm::A_TEX, Res::ActTex(zt)), (mm::B_TEX, dyt), (mm::C4, Res::Act(out))]);
            g.dispatch(label, pipeline.clone(), b, groups, 0.0);
        }
        return Ok(());
    }
    let pipeline = g.pipeline("matmul", &entry, &consts)?;
    let b =
        if vec4 { bind([(mm::B, Res::Act(z)), (mm::PARAMS, Res::uniform(&p)), (mm::C4, Res::Act(out))]) } else { bind([(mm::A, Res::Act(z)), (mm::C, Res::Act(out)), (mm::PARAMS, Res::uniform(&p))]) };
    g.dispatch(label, pipeline, b, groups, 0.0);
    Ok(())
}

/// u = act(z) elementwise (a new tensor of `len`).
pub fn act_forward(g: &mut Graph, label: &str, z: TensorId, len: usize, act: Act) -> Result<TensorId> {
    let u = g.tensor(label.to_string(), len);
    elementwise(g, "act_forward", label, z, u, len, act)?;
    Ok(u)
}

/// In place: dy[i] *= act'(z[i]) over `len` elements (the fused activation's backward).
pub fn act_backward(g: &mut Graph, label: &str, z: TensorId, dy: TensorId, len: usize, act: Act) -> Result<()> {
    elementwise(g, "act_backward", label, z, dy, len, act)
}

/// Training's `u = act(x·W + b)` (buffer weights): returns (z, u), z = x·W + b kept
/// for the backward. Where the profile fuses activations one GEMM stores both (its
/// SAVE_Z store, in either kernel set); otherwise the GEMM, then the activation pass.
pub fn linear_act(g: &mut Graph, label: &str, x: TensorId, m: usize, l: &Linear, act: Act) -> Result<(TensorId, TensorId)> {
    match &l.w {
        Some(w) if g.profile.fuse_act && !l.f16 && act != Act::None => {
            let (z, u) = (g.tensor(label.to_string(), m * l.n), g.tensor(format!("{label}.act"), m * l.n));
            if packs(g) {
                let b_view = View::new(Src::Buf(w.clone()), l.k, l.n, pad4(l.n));
                let ep = Epilogue { act, bias: Some(l.b.clone()), save_z: Some(z), ..Epilogue::plain() };
                tex_gemm(g, label, &View::new(Src::Act(x), m, l.k, l.k), &b_view, Res::Act(u), l.n, ep)?;
            } else {
                let p = params([m, l.n, l.k, pad4(l.n) / 4], None, 0, (l.k, pad4(l.n)));
                tiled(g, label, &tiled_overrides(act, false, false), [Res::Act(x), Res::Buf(w.clone()), Res::Buf(l.b.clone()), Res::Act(u)], TiledZ::Save(z), p, (m, l.n, l.k))?;
            }
            Ok((z, u))
        }
        _ => {
            let z = linear(g, label, x, m, l, Act::None, Out::New)?;
            Ok((z, act_forward(g, &format!("{label}.act"), z, m * l.n, act)?))
        }
    }
}
