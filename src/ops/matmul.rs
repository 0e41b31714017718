//! `shaders/matmul.wgsl`: linear layers and dense convolutions (implicit GEMM)
//! with fused bias, activation and residual add.

use crate::gpu::{Gpu, MatmulKind};
use crate::graph::{Graph, Res, TensorId};
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
/// The texture variant's block (`TRN4` vec4 columns; rows per invocation are the
/// graph's `tex_rows`, the shader's `TRM`) and workgroup.
pub(crate) const TRN4: usize = 4;
pub const TWG_X: usize = 16;

/// The grid of a texture GEMM with `n4` vec4 output columns, `rows` rows and
/// block `b`: 2^b.lx of its TWG_X invocations along column blocks, the rest
/// along row blocks.
pub(crate) fn tex_grid(n4: usize, rows: usize, b: &TexBlock) -> [u32; 3] {
    let wx = 1usize << b.lx;
    [n4.div_ceil(TRN4).div_ceil(wx) as u32, rows.div_ceil(b.trm).div_ceil(TWG_X / wx) as u32, 1]
}

/// Whether this graph's texture GEMMs may fetch A once per subgroup
/// (`matmul.wgsl`'s `A_SHARE`): subgroup operations, subgroups of 8 lanes or more.
fn can_share_a(g: &Graph) -> bool {
    g.profile.a_share && g.gpu.subgroups && g.gpu.info.subgroup_min_size >= 8
}

/// How a texture GEMM works: rows per invocation (the shader's `TRM`), whether
/// A is fetched once per subgroup (`A_SHARE`), and log2 of the invocations along
/// column blocks (`p.in_tok_off`).
pub(crate) struct TexBlock {
    pub trm: usize,
    pub share: bool,
    pub lx: u32,
}

/// The block of a texture GEMM with `n4` vec4 output columns.
///
/// Lanes go along the column blocks as far as there are (up to TWG_X), the rest
/// along row blocks: a narrow output (N = 32: two column blocks) would otherwise
/// leave 14 of 16 invocations idle, which on a CPU driver are SIMD lanes
/// computed anyway. A is shared where all TWG_X lanes split column blocks
/// (outputs over 128 wide), so every lane has the same rows whatever the
/// driver's subgroup layout: 1024^3 1.18x, CvT-13 training 1.11x
/// (docs/perf.md); or where 8 lanes do and the adapter's subgroups are runs of 8
/// consecutive invocations (`subgroups_of_8`), when that idles fewer lanes of
/// the last workgroup: N = 384 has 24 column blocks, which 16-lane rows cover
/// with 8 idle lanes. Shared GEMMs take `tex_rows`; the others `narrow_rows`, by
/// default 8 where A can be shared (they need a pipeline of their own then, and
/// the 8-row one compiles in half the time: first call 0.7-1.5 s shorter,
/// CvT-13's stage 0 GEMMs 1.16x faster), else `tex_rows` (one pipeline for all).
pub(crate) fn tex_block(g: &Graph, n4: usize) -> TexBlock {
    let cb = n4.div_ceil(TRN4);
    let wx = cb.next_power_of_two().min(TWG_X);
    if can_share_a(g) && wx == TWG_X {
        let idle = |w: usize| cb.div_ceil(w) * w - cb;
        let lx = if idle(8) < idle(16) && g.profile.subgroups_of_8 { 3 } else { 4 };
        TexBlock { trm: g.profile.tex_rows, share: true, lx }
    } else {
        TexBlock { trm: g.profile.narrow_rows.unwrap_or(if can_share_a(g) { 8 } else { g.profile.tex_rows }), share: false, lx: wx.trailing_zeros() }
    }
}

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
    let mut p = MatmulParams { m, n, k, np4, out_row_off: out_row_off as u32, a_stride: a_stride as u32, b_stride: b_stride as u32, splits: 1, ..Default::default() };
    if let Some(c) = conv {
        let (oh, ow) = c.out_hw();
        [p.in_h, p.in_w, p.cin, p.in_tokens, p.in_tok_off, p.out_h, p.out_w, p.kh, p.kw, p.stride, p.pad] = [c.in_h, c.in_w, c.cin, c.in_tokens, c.in_tok_off, oh, ow, c.k, c.k, c.stride, c.pad].map(|v| v as u32);
    }
    p
}

/// The GPU set's GEMM tiles (`main_tiled`): TM rows per invocation, 16·TM x TBN
/// outputs per workgroup, K steps of TBK.
const TBN: usize = 64;
const TBK: usize = 16;
/// Split-K gives each split at least this much of K (4 K steps), so the
/// partial products' traffic stays small beside the operands'.
const MIN_K_PER_SPLIT: usize = 4 * TBK;
/// Workgroups a GEMM or reduction of the GPU set should launch at least: two
/// per compute unit of a large GPU (132 SMs on an H100), so no unit idles
/// while the last wave runs.
pub const MIN_GROUPS: usize = 264;

/// How a tiled GEMM of `m` x `n` over `k` is launched (`TiledShape`): the
/// 128-row tile (8 rows per invocation: twice the multiply-adds per staged value)
/// where it still gives `min_groups` workgroups, else the 64-row tile; then K
/// splits that bring the workgroups up to `min_groups` where the tiles alone
/// would leave a large GPU idle (the weight gradients: dW is K_in x N, a few
/// tiles, over K = every token of the batch).
pub fn tiled_shape(m: usize, n: usize, k: usize, min_groups: usize) -> TiledShape {
    let gx = n.div_ceil(4).div_ceil(TBN / 4);
    let tm = if gx * m.div_ceil(128) >= min_groups { 8 } else { 4 };
    let gy = m.div_ceil(16 * tm);
    let want = min_groups.div_ceil(gx * gy).min(k / MIN_K_PER_SPLIT).max(1);
    let chunk = (k.div_ceil(want).div_ceil(TBK) * TBK).max(TBK);
    TiledShape { groups: [gx, gy], tm, splits: k.div_ceil(chunk).max(1), k_chunk: chunk }
}

/// A tiled GEMM's launch: output tiles (x along N, y along M), rows per
/// invocation (the shader's TM), K splits and K per split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TiledShape {
    pub groups: [usize; 2],
    pub tm: usize,
    pub splits: usize,
    pub k_chunk: usize,
}

/// C (+)= epilogue(A·B) with `main_tiled` (the GPU kernel set), split along K
/// where the output tiles alone give fewer than the profile's workgroup target:
/// each split writes its partial product to a tensor of its own and
/// `splitk_sum` adds them in order and applies the epilogue. Not in f16 plans:
/// partial sums stored in f16 lose more than the output's own rounding (partials
/// can be far larger than their sum). `ov` are the
/// operand modes and epilogue constants; `ops` the bindings a, b, bias, c.
fn tiled(g: &mut Graph, label: &str, ov: &[(&'static str, f64)], [a, b, bias, c]: [Res; 4], mut p: MatmulParams, (m, n, k): (usize, usize, usize)) -> Result<()> {
    let shape = tiled_shape(m, n, k, if g.half { 1 } else { g.profile.gemm.min_workgroups });
    let ([gx, gy], splits) = (shape.groups, shape.splits);
    let max = g.gpu.limits.max_compute_workgroups_per_dimension as usize;
    anyhow::ensure!(gx <= max && gy <= max, "{label}: a {m}x{n} GEMM needs {gx}x{gy} workgroups, over this adapter's {max} per dimension; use a smaller batch");
    (p.k_chunk, p.splits) = (shape.k_chunk as u32, splits as u32);
    let mut ov = ov.to_vec();
    ov.push(("TM", shape.tm as f64));
    let ov = &ov[..];
    let flops = 2.0 * (m * n * k) as f64;
    if splits == 1 {
        let pipeline = g.pipeline("matmul", "main_tiled", ov)?;
        g.dispatch(label, pipeline, vec![a, b, bias, c, Res::uniform(&p)], [gx as u32, gy as u32, 1], flops);
        return Ok(());
    }
    // The product without epilogue, then the ordered sum with it.
    let keep = |name: &str| !matches!(name, "HAS_BIAS" | "ACT" | "ACCUMULATE");
    let mut part_ov: Vec<(&'static str, f64)> = ov.iter().copied().filter(|(name, _)| keep(name)).collect();
    part_ov.extend([("SPLIT", 1.0), ("HAS_BIAS", 0.0)]);
    let part = g.tensor(format!("{label}.splitk"), splits * m * n);
    let pipeline = g.pipeline("matmul", "main_tiled", &part_ov)?;
    let unused = Res::Buf(g.gpu.placeholder());
    g.dispatch(format!("{label}.splitk"), pipeline, vec![a, b, unused, Res::Act(part), Res::uniform(&p)], [gx as u32, gy as u32, splits as u32], flops);
    let mut sum_ov: Vec<(&'static str, f64)> = ov.iter().copied().filter(|(name, _)| !keep(name)).collect();
    sum_ov.extend([("WG_X", 64.0), ("WG_Y", 1.0)]);
    let pipeline = g.pipeline("matmul", "splitk_sum", &sum_ov)?;
    let groups = crate::graph::grid1d(&g.gpu, (m * n).div_ceil(64) as u64);
    g.dispatch(label, pipeline, vec![Res::Act(part), Res::Unused, bias, c, Res::uniform(&p)], groups, 0.0);
    Ok(())
}

/// Materialises the im2col matrix of x for `geom`: [M, k_out] with zero columns
/// past kh·kw·cin.
fn im2col(g: &mut Graph, label: &str, x: TensorId, geom: &ConvGeom, k_out: usize) -> Result<TensorId> {
    let (oh, ow) = geom.out_hw();
    let m = geom.batch * oh * ow;
    let cols = g.tensor(format!("{label}.im2col"), m * k_out);
    let p = params([m, k_out, geom.k * geom.k * geom.cin, 0], Some(geom), 0, (0, 0));
    // Images must start on whole texels of the input's linear texture.
    if packs(g) && (geom.in_tokens * geom.cin) % 4 == 0 && k_out % 4 == 0 {
        // A few images at a time, so the input's texture stays small beside the
        // activations (TEXTURE_CHUNK_BYTES; at least one image).
        let pipeline = g.pipeline("matmul", "im2col4", &overrides(Act::None, false, true, (64, 1)))?;
        let image_texels = geom.in_tokens * geom.cin / 4;
        let per = (crate::ops::gemm::TEXTURE_CHUNK_BYTES / (16 * image_texels).max(1)).max(1);
        let hw = oh * ow;
        for b0 in (0..geom.batch).step_by(per) {
            let nb = per.min(geom.batch - b0);
            let xt = g.linear_texture_range(x, b0 * image_texels, nb * image_texels, 5);
            let mut pc = p.clone();
            (pc.m, pc.out_row_off) = ((nb * hw) as u32, (b0 * hw) as u32);
            let groups = crate::graph::grid1d(&g.gpu, (nb * hw * k_out / 4).div_ceil(64) as u64);
            let u = || Res::Unused;
            g.dispatch(format!("{label}.im2col"), pipeline.clone(), vec![u(), u(), u(), u(), Res::uniform(&pc), Res::ActTex(xt), u(), u(), Res::Act(cols)], groups, 0.0);
        }
        return Ok(cols);
    }
    let pipeline = g.pipeline("matmul", "im2col", &overrides(Act::None, false, true, (64, 1)))?;
    let max = g.gpu.limits.max_compute_workgroups_per_dimension as usize;
    let (gy, gz) = if m <= max { (m, 1) } else { (max, m.div_ceil(max)) };
    g.dispatch(format!("{label}.im2col"), pipeline, vec![Res::Act(x), Res::Unused, Res::Unused, Res::Act(cols), Res::uniform(&p)], [k_out.div_ceil(64) as u32, gy as u32, gz as u32], 0.0);
    Ok(cols)
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
            let mut ov = overrides(act, accumulate, conv.is_some(), (WG_X, WG_Y)).to_vec();
            if l.f16 {
                ov.push(("B_F16", 1.0));
            }
            if !pack {
                // The GPU kernel set.
                ov.retain(|(name, _)| !name.starts_with("WG_"));
                tiled(g, label, &ov, [Res::Act(a), Res::Buf(w.clone()), Res::Buf(l.b.clone()), Res::Act(y)], params(m, 0), (m, l.n, l.k))?;
                return Ok(y);
            }
            let pipeline = g.pipeline("matmul", "main", &ov)?;
            let groups = [np4.div_ceil(RN4).div_ceil(WG_X) as u32, m.div_ceil(RM).div_ceil(WG_Y) as u32, 1];
            let b = vec![Res::Act(a), Res::Buf(w.clone()), Res::Buf(l.b.clone()), Res::Act(y), Res::uniform(&params(m, 0))];
            g.dispatch(label, pipeline, b, groups, flops(m));
        }
        (None, Some(_)) if splits_epilogue(g, l, act, accumulate, m) => {
            // The plain GEMM (into y itself unless y accumulates), then the
            // activation in place and the residual add as passes of their own
            // (Graph::fused_epilogue). In place is safe on this path: those passes
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
                let at = g.linear_texture_range(a, r0 * k4, rows * k4, 5);
                let (lx, groups) = (blk.lx, tex_grid(np4, rows, &blk));
                let mut pu = params(rows, r0);
                // A's row stride in vec4s, the column-block split, and A's offset:
                // the kernel reads row r0 + r at (r0 + r)·stride + a_off, and the
                // chunk's texture starts at row r0 (u32 arithmetic wraps in WGSL).
                (pu.a_stride, pu.col_lanes_log2, pu.a_off) = (k4 as u32, lx, ((r0 * k4) as u32).wrapping_neg());
                let b = vec![Res::Unused, Res::Unused, Res::Unused, Res::Act(y), Res::uniform(&pu), Res::ActTex(at), Res::Tex(tex.clone()), Res::Unused, Res::Unused, Res::Tex(bias_t.clone())];
                g.dispatch(label, pipeline.clone(), b, groups, flops(rows));
            }
        }
        (None, None) => unreachable!("a Linear holds a buffer or a texture"),
    }
    Ok(y)
}

/// Whether this texture-GEMM layer leaves its activation or residual add to
/// separate passes (see `Graph::fused_epilogue`; the vec4 passes need m·n % 4 == 0).
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

/// Dense convolution of an NHWC token map; output [batch, oh*ow, cout] tokens.
/// Buffer variant: implicit GEMM. Texture variant: im2col, then the texture GEMM.
pub fn conv2d(g: &mut Graph, label: &str, x: TensorId, geom: ConvGeom, l: &Linear) -> Result<TensorId> {
    let k_real = geom.k * geom.k * geom.cin;
    let (oh, ow) = geom.out_hw();
    let m = geom.batch * oh * ow;
    if l.tex.is_none() {
        assert_eq!(l.k, k_real, "{label}: conv weight K");
        let pack = packs(g);
        return dispatch(g, label, x, m, l, Act::None, Out::New, Some(geom), pack);
    }
    assert!(l.k >= k_real && l.k % 64 == 0, "{label}: padded conv weight K");
    let cols = im2col(g, label, x, &geom, l.k)?;
    dispatch(g, label, cols, m, l, Act::None, Out::New, None, false)
}

// ---------------------------------------------------------------------------
// Backward. For y = x·W + b (x [M, K], W stored [K, NP], dy [M, N]):
//   dx = dy·Wᵀ        (B_MODE 1: the stored weight read transposed)
//   dW = xᵀ·dy        (A_MODE 2, B_MODE 2), written in W's own [K, NP] layout so
//                      the optimizer updates weights and gradients elementwise
//   db = 1ᵀ·dy        (A_MODE 3, B_MODE 2)
// The activation's derivative is applied to dy before this (it is not fused).

/// Gradient buffers of a `Linear`, in its storage layout: w [K, NP], b [NP].
pub struct LinearGrad {
    pub w: Arc<wgpu::Buffer>,
    pub b: Arc<wgpu::Buffer>,
}

impl LinearGrad {
    pub fn new(gpu: &Gpu, name: &str, l: &Linear) -> Result<LinearGrad> {
        let np = pad4(l.n);
        Ok(LinearGrad { w: Arc::new(gpu.storage(&format!("{name}.weight.grad"), (l.k * np * 4) as u64)?), b: Arc::new(gpu.storage(&format!("{name}.bias.grad"), (np * 4) as u64)?) })
    }
}

/// One backward product C[m, n] (+)= A·B in the given operand modes (the GPU
/// kernel set's tiled GEMM; split along K where its tiles are few: dW).
#[allow(clippy::too_many_arguments)]
fn backward_product(
    g: &mut Graph,
    label: &str,
    (a, a_mode, a_stride): (TensorId, u32, usize),
    (b, b_mode, b_stride): (Res, u32, usize),
    out: Res,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) -> Result<()> {
    let ov = [("A_MODE", a_mode as f64), ("B_MODE", b_mode as f64), ("HAS_BIAS", 0.0), ("ACCUMULATE", if accumulate { 1.0 } else { 0.0 })];
    // HAS_BIAS=false reads no bias: a placeholder fills the layout.
    let unused = Res::Buf(g.gpu.placeholder());
    tiled(g, label, &ov, [Res::Act(a), b, unused, out], params([m, n, k, 0], None, 0, (a_stride, b_stride)), (m, n, k))
}

/// out[1, cols] = column sums of src [rows, cols] (a ones-vector product).
pub fn colsum(g: &mut Graph, label: &str, src: TensorId, rows: usize, cols: usize, out: Res) -> Result<()> {
    if packs(g) && cols % 4 == 0 {
        // Partial sums over row strides, then their sum (see the shader).
        const PARTS: usize = 64;
        let part = g.tensor(format!("{label}.partials"), PARTS * cols);
        let st = g.linear_texture(src, 6);
        let p = params([rows, cols, PARTS, 0], None, 0, (0, 0));
        let u = || Res::Unused;
        let pipeline = g.pipeline("matmul", "colsum_part", &[("WG_X", 64.0), ("WG_Y", 1.0)])?;
        let groups = crate::graph::grid1d(&g.gpu, (PARTS * cols / 4).div_ceil(64) as u64);
        g.dispatch(format!("{label}.part"), pipeline, vec![u(), u(), u(), u(), Res::uniform(&p), u(), Res::ActTex(st), u(), Res::Act(part)], groups, 0.0);
        let pipeline = g.pipeline("matmul", "colsum_finish", &[("WG_X", 64.0), ("WG_Y", 1.0)])?;
        g.dispatch(label, pipeline, vec![u(), u(), u(), out, Res::uniform(&p), u(), u(), u(), Res::Act(part)], [(cols / 4).div_ceil(64) as u32, 1, 1], 0.0);
        return Ok(());
    }
    // Partial sums over row strides: P = enough partials per column for
    // MIN_GROUPS workgroups of 64 (consecutive invocations read consecutive
    // columns of a row); then a workgroup per column adds its P partials by a
    // tree in workgroup memory. Fixed order: deterministic.
    let parts = (MIN_GROUPS * 64).div_ceil(cols).clamp(1, rows.div_ceil(4).max(1));
    let part = g.tensor(format!("{label}.partials"), parts * cols);
    let p = params([rows, cols, 0, 0], None, 0, (0, 0));
    let p1 = MatmulParams { splits: parts as u32, ..p };
    let pipeline = g.pipeline("matmul", "colsum_rows", &[("WG_X", 64.0), ("WG_Y", 1.0)])?;
    let groups = crate::graph::grid1d(&g.gpu, (parts * cols).div_ceil(64) as u64);
    g.dispatch(format!("{label}.part"), pipeline, vec![Res::Act(src), Res::Unused, Res::Unused, Res::Act(part), Res::uniform(&p1)], groups, 0.0);
    let pipeline = g.pipeline("matmul", "colsum_tree", &[])?;
    g.dispatch(label, pipeline, vec![Res::Act(part), Res::Unused, Res::Unused, out, Res::uniform(&p1)], crate::graph::grid1d(&g.gpu, cols as u64), 0.0);
    Ok(())
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
            let zt = g.linear_texture_range(z, i0, m, 5);
            let dyt = if entry == "act_backward4" { Res::ActTex(g.linear_texture_range(out, i0, m, 6)) } else { u() };
            let groups = crate::graph::grid1d(&g.gpu, m.div_ceil(64) as u64);
            let b = vec![u(), u(), u(), u(), Res::uniform(&params([m, 0, 0, 0], None, i0, (0, 0))), Res::ActTex(zt), dyt, u(), Res::Act(out)];
            g.dispatch(label, pipeline.clone(), b, groups, 0.0);
        }
        return Ok(());
    }
    let pipeline = g.pipeline("matmul", &entry, &consts)?;
    let b = if vec4 { vec![u(), Res::Act(z), u(), u(), Res::uniform(&p), u(), u(), u(), Res::Act(out)] } else { vec![Res::Act(z), u(), u(), Res::Act(out), Res::uniform(&p)] };
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
/// for the backward. On texture-GEMM adapters one GEMM stores both (its SAVE_Z
/// epilogue); elsewhere the GEMM, then the activation pass.
pub fn linear_act(g: &mut Graph, label: &str, x: TensorId, m: usize, l: &Linear, act: Act) -> Result<(TensorId, TensorId)> {
    match &l.w {
        Some(w) if packs(g) && g.profile.fuse_act && !l.f16 && act != Act::None => {
            let (z, u) = (g.tensor(label.to_string(), m * l.n), g.tensor(format!("{label}.act"), m * l.n));
            let b_view = View::new(Src::Buf(w.clone()), l.k, l.n, pad4(l.n));
            let ep = Epilogue { act, bias: Some(l.b.clone()), save_z: Some(z), ..Epilogue::plain() };
            tex_gemm(g, label, &View::new(Src::Act(x), m, l.k, l.k), &b_view, Res::Act(u), l.n, ep)?;
            Ok((z, u))
        }
        _ => {
            let z = linear(g, label, x, m, l, Act::None, Out::New)?;
            Ok((z, act_forward(g, &format!("{label}.act"), z, m * l.n, act)?))
        }
    }
}

/// Appends the backward of `y = x·W + b` (x [m, K], dy [m, N]): writes dW and db
/// into `grad` and returns dx, a new tensor or added into `dx_into`.
pub fn linear_backward(g: &mut Graph, label: &str, x: TensorId, dy: TensorId, m: usize, l: &Linear, grad: &LinearGrad, dx_into: Option<TensorId>) -> Result<TensorId> {
    linear_backward_with(g, label, x, dy, m, l, grad, dx_into, None)
}

/// `linear_backward` of a layer whose input x is `act(z)` (the MLP's second
/// layer): returns dz = dx ⊙ act'(z), fused into the dx product on texture-GEMM
/// adapters (its ACT_GRAD epilogue).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_act(g: &mut Graph, label: &str, x: TensorId, dy: TensorId, m: usize, l: &Linear, grad: &LinearGrad, (z, act): (TensorId, Act)) -> Result<TensorId> {
    linear_backward_with(g, label, x, dy, m, l, grad, None, Some((z, act)))
}

#[allow(clippy::too_many_arguments)]
fn linear_backward_with(
    g: &mut Graph,
    label: &str,
    x: TensorId,
    dy: TensorId,
    m: usize,
    l: &Linear,
    grad: &LinearGrad,
    dx_into: Option<TensorId>,
    act_of: Option<(TensorId, Act)>,
) -> Result<TensorId> {
    anyhow::ensure!(!l.f16, "{label}: backward needs f32 weights");
    let w = l.w.clone().ok_or_else(|| anyhow::anyhow!("{label}: backward needs the weight as a storage buffer (buffer variant)"))?;
    let np = pad4(l.n);
    let (dx, acc) = match dx_into {
        Some(t) => (t, true),
        None => (g.tensor(format!("{label}.dx"), m * l.k), false),
    };
    // Whether the dx product applies the activation's gradient (ACT_GRAD).
    let mut fused = false;
    if packs(g) {
        let dyv = View::new(Src::Act(dy), m, l.n, l.n);
        tex_gemm(g, &format!("{label}.dW"), &View::t(Src::Act(x), m, l.k, l.k), &dyv, Res::Buf(grad.w.clone()), np, Epilogue::plain())?;
        colsum(g, &format!("{label}.db"), dy, m, l.n, Res::Buf(grad.b.clone()))?;
        let wt = View::t(Src::Buf(w), l.k, l.n, np);
        let ep = match act_of {
            Some((z, act)) if g.profile.fuse_act && l.k % 4 == 0 && !acc => Epilogue { act, act_grad_of: Some(z), ..Epilogue::plain() },
            _ => Epilogue { accumulate: acc, ..Epilogue::plain() },
        };
        fused = ep.act_grad_of.is_some();
        tex_gemm(g, &format!("{label}.dx"), &dyv, &wt, Res::Act(dx), l.k, ep)?;
    } else {
        // dW [K, NP] = xᵀ [K, m] · dy [m, N] (columns N..NP come out zero).
        backward_product(g, &format!("{label}.dW"), (x, 2, l.k), (Res::Act(dy), 2, l.n), Res::Buf(grad.w.clone()), (l.k, np, m), false)?;
        // db = column sums of dy (the padding columns of grad.b stay zero).
        colsum(g, &format!("{label}.db"), dy, m, l.n, Res::Buf(grad.b.clone()))?;
        // dx [m, K] = dy [m, N] · Wᵀ, W stored [K, NP]: B_MODE 1 reads row k of the
        // store as column k of Bᵀ, with b_stride = NP.
        backward_product(g, &format!("{label}.dx"), (dy, 0, l.n), (Res::Buf(w), 1, np), Res::Act(dx), (m, l.k, l.n), acc)?;
    }
    if let (Some((z, act)), false) = (act_of, fused) {
        act_backward(g, &format!("{label}.act"), z, dx, m * l.k, act)?;
    }
    Ok(dx)
}

/// Appends the backward of `conv2d` (buffer variant weights, as `Linear::conv_with_kind(.., Buffer)`):
/// writes dW, db into `grad` and, when `dx_into` is given, adds the input gradient into it
/// (spatial tokens only; the layout of `x`). x must still be alive (it is re-read through im2col).
pub fn conv2d_backward(g: &mut Graph, label: &str, x: TensorId, dy: TensorId, geom: ConvGeom, l: &Linear, grad: &LinearGrad, dx_into: Option<TensorId>) -> Result<()> {
    anyhow::ensure!(!l.f16, "{label}: backward needs f32 weights");
    let w = l.w.clone().ok_or_else(|| anyhow::anyhow!("{label}: backward needs the buffer variant"))?;
    let k_real = geom.k * geom.k * geom.cin;
    assert_eq!(l.k, k_real, "{label}: conv weight K");
    let (oh, ow) = geom.out_hw();
    let m = geom.batch * oh * ow;
    let np = pad4(l.n);
    // im2col of x (the A of the forward), then dW = colsᵀ·dy and db = 1ᵀ·dy.
    let dyv = View::new(Src::Act(dy), m, l.n, l.n);
    if packs(g) {
        // Padded to whole vec4s, as in the forward: the GEMM reads it transposed as it is.
        let cols = im2col(g, label, x, &geom, pad4(k_real))?;
        tex_gemm(g, &format!("{label}.dW"), &View::t_zero_padded(Src::Act(cols), m, k_real, pad4(k_real)), &dyv, Res::Buf(grad.w.clone()), np, Epilogue::plain())?;
    } else {
        let cols = im2col(g, label, x, &geom, k_real)?;
        backward_product(g, &format!("{label}.dW"), (cols, 2, k_real), (Res::Act(dy), 2, l.n), Res::Buf(grad.w.clone()), (k_real, np, m), false)?;
    }
    colsum(g, &format!("{label}.db"), dy, m, l.n, Res::Buf(grad.b.clone()))?;
    if let Some(dx) = dx_into {
        // dcols = dy·Wᵀ, then col2im gathers it back onto the input grid.
        let dcols = g.tensor(format!("{label}.dcols"), m * k_real);
        if packs(g) {
            tex_gemm(g, &format!("{label}.dcols"), &dyv, &View::t(Src::Buf(w), k_real, l.n, np), Res::Act(dcols), k_real, Epilogue::plain())?;
        } else {
            backward_product(g, &format!("{label}.dcols"), (dy, 0, l.n), (Res::Buf(w), 1, np), Res::Act(dcols), (m, k_real, l.n), false)?;
        }
        let n_in = geom.batch * geom.in_h * geom.in_w * geom.cin;
        let p = params([geom.batch, 0, k_real, 0], Some(&geom), 0, (0, 0));
        if packs(g) && geom.cin % 4 == 0 {
            let dt = g.linear_texture(dcols, 5);
            let pipeline = g.pipeline("matmul", "col2im4", &overrides(Act::None, true, false, (64, 1)))?;
            let groups = crate::graph::grid1d(&g.gpu, (n_in / 4).div_ceil(64) as u64);
            let u = || Res::Unused;
            g.dispatch(format!("{label}.col2im"), pipeline, vec![u(), u(), u(), u(), Res::uniform(&p), Res::ActTex(dt), u(), u(), Res::Act(dx)], groups, 0.0);
        } else {
            let pipeline = g.pipeline("matmul", "col2im", &overrides(Act::None, true, false, (64, 1)))?;
            let groups = crate::graph::grid1d(&g.gpu, n_in.div_ceil(64) as u64);
            g.dispatch(format!("{label}.col2im"), pipeline, vec![Res::Act(dcols), Res::Unused, Res::Unused, Res::Act(dx), Res::uniform(&p)], groups, 0.0);
        }
    }
    Ok(())
}
