//! `shaders/matmul.wgsl`: linear layers and dense convolutions (implicit GEMM)
//! with fused bias, activation and residual add.

use crate::gpu::{Gpu, MatmulKind};
use crate::graph::{Graph, Res, TensorId};
use crate::texread::TexRead;
use anyhow::Result;
use std::sync::Arc;
use std::time::Instant;

use crate::ops::gemm::{tex_gemm, texture_chunk_rows, Epilogue, Src, View};

/// Whether buffer-held weights go through the packed texture GEMM (`ops::gemm`):
/// on adapters whose timed trial preferred texture operands.
pub fn packs(gpu: &Arc<Gpu>) -> bool {
    preferred_kind(gpu) == MatmulKind::Texture
}

/// Rows and vec4 columns per invocation (`RM`, `RN4` in the shader).
const RM: usize = 8;
const RN4: usize = 2;
const WG_X: usize = 8;
const WG_Y: usize = 8;
/// The texture variant's block (`TRN4` vec4 columns; rows per invocation are the
/// graph's `tex_rows`, the shader's `TRM`) and workgroup.
pub(crate) const TRN4: usize = 4;
pub(crate) const TWG_X: usize = 16;

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
    g.a_share && g.gpu.subgroups && g.gpu.info.subgroup_min_size >= 8
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
        let lx = if idle(8) < idle(16) && subgroups_of_8(&g.gpu) { 3 } else { 4 };
        TexBlock { trm: g.tex_rows, share: true, lx }
    } else {
        TexBlock { trm: g.narrow_rows.unwrap_or(if can_share_a(g) { 8 } else { g.tex_rows }), share: false, lx: wx.trailing_zeros() }
    }
}

/// Whether the adapter's subgroups are the runs of 8 consecutive invocations of
/// a workgroup (lavapipe's SIMD lanes), measured once by `subgroup_probe`.
/// Vulkan does not promise any layout, so sharing across 8-lane halves of a
/// workgroup is used only where this holds.
pub fn subgroups_of_8(gpu: &Arc<Gpu>) -> bool {
    *gpu.subgroups_of_8.get_or_init(|| {
        let probe = || -> Result<bool> {
            if !gpu.subgroups || gpu.info.subgroup_min_size != 8 || gpu.info.subgroup_max_size != 8 {
                return Ok(false);
            }
            let mut g = Graph::new(gpu.clone());
            let out = g.pinned("subgroup probe", 16);
            let pipeline = g.pipeline("matmul", "subgroup_probe", &[("WG_X", TWG_X as f64), ("WG_Y", 1.0)])?;
            g.dispatch("subgroup probe", pipeline, vec![Res::Unused, Res::Unused, Res::Unused, Res::Act(out)], [1, 1, 1], 0.0);
            let plan = g.compile()?;
            plan.run()?;
            Ok(plan.read(out)?.iter().all(|&v| v == 1.0))
        };
        probe().unwrap_or(false)
    })
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
    pub fn from_flag(gpu: &Gpu, f16: bool) -> WeightFormat {
        if !f16 {
            WeightFormat::F32
        } else if gpu.features.contains(wgpu::Features::SHADER_F16) && std::env::var("CVT_GPU_F16_ACT").as_deref() != Ok("0") {
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

/// The matmul variant for this adapter, and how every kernel reads textures
/// (`texread`, set on the Gpu as a side effect). Each is, in order: the setting
/// (`CVT_GPU_MATMUL=buffer|texture`, `CVT_GPU_TEX_READ=sampled|storage`); with
/// `--no-tune`, a rule (textures and storage reads on CPU drivers, buffers and
/// sampled reads on GPUs); the choice cached on disk for this adapter and build
/// (`tune`); else a timed trial (`trial`: about 2 s on lavapipe, most of it
/// compiling the two GEMMs), whose results are cached. Settings are not cached.
pub fn preferred_kind(gpu: &Arc<Gpu>) -> MatmulKind {
    *gpu.matmul_kind.get_or_init(|| {
        let forced = match std::env::var("CVT_GPU_MATMUL").as_deref() {
            Ok("buffer") => Some(MatmulKind::Buffer),
            Ok("texture") => Some(MatmulKind::Texture),
            _ => None,
        };
        let rule = if gpu.info.device_type == wgpu::DeviceType::Cpu { MatmulKind::Texture } else { MatmulKind::Buffer };
        if crate::tune::disabled() {
            // The read mode stays at texread::rule.
            return forced.unwrap_or(rule);
        }
        // Settings are honoured but never cached: a later run without them must
        // still find measured choices.
        let forced_read = crate::texread::setting().is_some();
        let cached_read = if forced_read { Some(gpu.tex_read()) } else { crate::tune::lookup(gpu, "texture_read").and_then(|r| TexRead::parse(&r)) };
        let cached_kind = forced.or(match crate::tune::lookup(gpu, "matmul").as_deref() {
            Some("buffer") => Some(MatmulKind::Buffer),
            Some("texture") => Some(MatmulKind::Texture),
            _ => None,
        });
        if let (Some(kind), Some(read)) = (cached_kind, cached_read) {
            gpu.set_tex_read(read);
            return kind;
        }
        let start = gpu.tex_read();
        match trial(gpu, forced) {
            // The trial has set the read mode on the Gpu.
            Ok((kind, read)) => {
                let mut choices = vec![];
                if !forced_read {
                    choices.push(("texture_read", read.name()));
                    if forced.is_none() {
                        choices.push(("matmul", if kind == MatmulKind::Texture { "texture" } else { "buffer" }));
                    }
                }
                crate::tune::store(gpu, &choices);
                kind
            }
            // A trial that fails decides nothing and caches nothing.
            Err(_) => {
                gpu.set_tex_read(start);
                forced.unwrap_or(rule)
            }
        }
    })
}

/// Best of five interleaved rounds per plan (seconds): the trials' results are
/// cached on disk, so rounds disturbed by other load on the machine (tests run
/// in parallel) must not decide them. A round is milliseconds; compiling is the
/// trials' cost.
fn best_times(plans: &[crate::graph::Plan]) -> Result<Vec<f64>> {
    let mut best = vec![f64::MAX; plans.len()];
    for _ in 0..5 {
        for (plan, b) in plans.iter().zip(best.iter_mut()) {
            let t = Instant::now();
            plan.run()?;
            plan.gpu.sync()?;
            *b = b.min(t.elapsed().as_secs_f64());
        }
    }
    Ok(best)
}

/// The index of the smallest time.
fn fastest(times: &[f64]) -> usize {
    times.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)
}

fn trace_tune(what: &str, times: &[(String, f64)]) {
    if std::env::var_os("CVT_GPU_TRACE_TUNE").is_some() {
        for (name, s) in times {
            eprintln!("{what} trial: {name} {:.2} ms", s * 1e3);
        }
    }
}

/// Sets (and returns) the texture-read mode (`texread`), timing a fetch-bound kernel both
/// ways (`colsum_part` over a 4 MiB texture: 64 texel fetches per store), unless
/// `CVT_GPU_TEX_READ` says which or only sampled reads are possible. It compiles
/// in milliseconds, where a GEMM per mode would add about a second of JIT to the
/// first call on lavapipe; the cost of a texel fetch is what the mode changes.
fn read_trial(gpu: &Arc<Gpu>) -> Result<TexRead> {
    if crate::texread::setting().is_some() || !crate::texread::storage_supported(&gpu.info, &gpu.limits) {
        return Ok(gpu.tex_read());
    }
    let (rows, cols, parts) = (4096, 256, 64);
    let mut plans = vec![];
    let mut reads = vec![];
    for read in [TexRead::Storage, TexRead::Sampled] {
        gpu.set_tex_read(read);
        let build = || -> Result<crate::graph::Plan> {
            let mut g = Graph::new(gpu.clone());
            let (x, y) = (g.pinned("x", rows * cols), g.pinned("y", parts * cols));
            let pipeline = g.pipeline("matmul", "colsum_part", &[("WG_X", 64.0), ("WG_Y", 1.0)])?;
            let xt = g.linear_texture(x, 6);
            let u = || Res::Unused;
            let b = vec![u(), u(), u(), u(), Res::Uniform(params([rows, cols, parts, 0], None, 0, (0, 0))), u(), Res::ActTex(xt), u(), Res::Act(y)];
            g.dispatch("read trial", pipeline, b, crate::graph::grid1d(gpu, (parts * cols / 4).div_ceil(64) as u64), 0.0);
            let plan = g.compile()?;
            plan.run()?;
            gpu.sync()?;
            Ok(plan)
        };
        // A mode the driver rejects is not a candidate.
        if let Ok(plan) = build() {
            plans.push(plan);
            reads.push(read);
        }
    }
    anyhow::ensure!(!plans.is_empty(), "no texture-read mode runs on this adapter");
    let times = best_times(&plans)?;
    trace_tune("texture read", &reads.iter().zip(&times).map(|(r, t)| (r.name().to_string(), *t)).collect::<Vec<_>>());
    let read = reads[fastest(&times)];
    gpu.set_tex_read(read);
    Ok(read)
}

/// Chooses the texture-read mode (`read_trial`), then, unless `forced` names the
/// kind, times the buffer GEMM against the texture GEMM in that mode on a 256³ product.
fn trial(gpu: &Arc<Gpu>, forced: Option<MatmulKind>) -> Result<(MatmulKind, TexRead)> {
    let read = read_trial(gpu)?;
    if let Some(kind) = forced {
        return Ok((kind, read));
    }
    let n = 256;
    let w: Vec<f32> = (0..n * n).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
    // The first run of each compiles its kernel. The texture GEMM's is the one the
    // model will use on the main device; the buffer GEMM's runs on a sibling device
    // from another thread where there is one, so a CPU driver compiles both at once
    // (0.5-0.7 s off the first call on lavapipe; docs/perf.md).
    let first_run = |gpu: &Arc<Gpu>, kind: MatmulKind| -> Result<crate::graph::Plan> {
        let l = Linear::with_kind(gpu, "trial", &w, None, n, n, kind)?;
        let mut g = Graph::new(gpu.clone());
        let x = g.pinned("x", n * n);
        // Not `linear`: it asks for the preferred kind, which this trial decides.
        dispatch(&mut g, "trial", x, n, &l, Act::None, Out::New, None, false)?;
        let t = Instant::now();
        let plan = g.compile()?;
        plan.run()?;
        gpu.sync()?;
        trace_tune("matmul (first run, compile included)", &[(format!("{kind:?}"), t.elapsed().as_secs_f64())]);
        Ok(plan)
    };
    let (buffer, texture) = match gpu.sibling() {
        Some(side) => std::thread::scope(|s| {
            let buffer = s.spawn(|| first_run(&side, MatmulKind::Buffer));
            let texture = first_run(gpu, MatmulKind::Texture);
            (buffer.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the buffer GEMM trial panicked"))), texture)
        }),
        None => (first_run(gpu, MatmulKind::Buffer), first_run(gpu, MatmulKind::Texture)),
    };
    let kinds = [MatmulKind::Buffer, MatmulKind::Texture];
    let plans = [buffer?, texture?];
    let times = best_times(&plans)?;
    trace_tune("matmul", &kinds.iter().zip(&times).map(|(k, t)| (format!("{k:?}"), *t)).collect::<Vec<_>>());
    Ok((kinds[fastest(&times)], read))
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
        let kind = if texture_capable(gpu, k, n) { preferred_kind(gpu) } else { MatmulKind::Buffer };
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
        let kind = if texture_capable(gpu, (kh * kw * cin).div_ceil(64) * 64, cout) { preferred_kind(gpu) } else { MatmulKind::Buffer };
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

/// The shader's `Params` (20 u32, in its field order): sizes [M, N, K, NP4], the
/// conv view (zeros when there is none), the first output row and the A/B strides.
fn params(sizes: [usize; 4], conv: Option<&ConvGeom>, out_row_off: usize, (a_stride, b_stride): (usize, usize)) -> Vec<u32> {
    let mut p: Vec<u32> = sizes.iter().map(|&v| v as u32).collect();
    match conv {
        Some(c) => {
            let (oh, ow) = c.out_hw();
            p.extend([c.in_h, c.in_w, c.cin, c.in_tokens, c.in_tok_off, oh, ow, c.k, c.k, c.stride, c.pad].map(|v| v as u32));
        }
        None => p.extend([0u32; 11]),
    }
    p.extend([out_row_off as u32, a_stride as u32, b_stride as u32, 0, 0]);
    p
}

/// Materialises the im2col matrix of x for `geom`: [M, k_out] with zero columns
/// past kh·kw·cin.
fn im2col(g: &mut Graph, label: &str, x: TensorId, geom: &ConvGeom, k_out: usize) -> Result<TensorId> {
    let (oh, ow) = geom.out_hw();
    let m = geom.batch * oh * ow;
    let cols = g.tensor(format!("{label}.im2col"), m * k_out);
    let p = params([m, k_out, geom.k * geom.k * geom.cin, 0], Some(geom), 0, (0, 0));
    // Images must start on whole texels of the input's linear texture.
    if packs(&g.gpu) && (geom.in_tokens * geom.cin) % 4 == 0 && k_out % 4 == 0 {
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
            (pc[0], pc[15]) = ((nb * hw) as u32, (b0 * hw) as u32);
            let groups = crate::graph::grid1d(&g.gpu, (nb * hw * k_out / 4).div_ceil(64) as u64);
            let u = || Res::Unused;
            g.dispatch(format!("{label}.im2col"), pipeline.clone(), vec![u(), u(), u(), u(), Res::Uniform(pc), Res::ActTex(xt), u(), u(), Res::Act(cols)], groups, 0.0);
        }
        return Ok(cols);
    }
    let pipeline = g.pipeline("matmul", "im2col", &overrides(Act::None, false, true, (64, 1)))?;
    let max = g.gpu.limits.max_compute_workgroups_per_dimension as usize;
    let (gy, gz) = if m <= max { (m, 1) } else { (max, m.div_ceil(max)) };
    g.dispatch(format!("{label}.im2col"), pipeline, vec![Res::Act(x), Res::Unused, Res::Unused, Res::Act(cols), Res::Uniform(p)], [k_out.div_ceil(64) as u32, gy as u32, gz as u32], 0.0);
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
            let pipeline = g.pipeline("matmul", "main", &ov)?;
            let groups = [np4.div_ceil(RN4).div_ceil(WG_X) as u32, m.div_ceil(RM).div_ceil(WG_Y) as u32, 1];
            let b = vec![Res::Act(a), Res::Buf(w.clone()), Res::Buf(l.b.clone()), Res::Act(y), Res::Uniform(params(m, 0))];
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
                (pu[16], pu[8], pu[18]) = (k4 as u32, lx, ((r0 * k4) as u32).wrapping_neg());
                let b = vec![Res::Unused, Res::Unused, Res::Unused, Res::Act(y), Res::Uniform(pu), Res::ActTex(at), Res::Tex(tex.clone()), Res::Unused, Res::Unused, Res::Tex(bias_t.clone())];
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
    l.w.is_none() && l.tex.is_some() && !g.fused_epilogue && (act != Act::None || accumulate) && (m * l.n) % 4 == 0 && packs(&g.gpu)
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
    let pack = packs(&g.gpu);
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
        let pack = packs(&g.gpu);
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

/// One backward product C[m, n] (+)= A·B in the given operand modes.
#[allow(clippy::too_many_arguments)]
fn backward_product(
    g: &mut Graph,
    label: &str,
    (a, a_mode, a_stride): (Option<TensorId>, u32, usize),
    (b, b_mode, b_stride): (Res, u32, usize),
    out: Res,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) -> Result<()> {
    let unused = g.gpu.placeholder();
    let pipeline = g.pipeline(
        "matmul",
        "main",
        &[("A_MODE", a_mode as f64), ("B_MODE", b_mode as f64), ("HAS_BIAS", 0.0), ("ACCUMULATE", if accumulate { 1.0 } else { 0.0 }), ("WG_X", WG_X as f64), ("WG_Y", WG_Y as f64)],
    )?;
    let params = params([m, n, k, 0], None, 0, (a_stride, b_stride));
    let groups = [n.div_ceil(4).div_ceil(RN4).div_ceil(WG_X) as u32, m.div_ceil(RM).div_ceil(WG_Y) as u32, 1];
    // A_MODE 3 reads no A and HAS_BIAS=false reads no bias: placeholders fill the layout.
    let a_res = match a {
        Some(t) => Res::Act(t),
        None => Res::Buf(unused.clone()),
    };
    g.dispatch(label, pipeline, vec![a_res, b, Res::Buf(unused), out, Res::Uniform(params)], groups, 2.0 * (m * n * k) as f64);
    Ok(())
}

/// out[1, cols] = column sums of src [rows, cols] (a ones-vector product).
pub fn colsum(g: &mut Graph, label: &str, src: TensorId, rows: usize, cols: usize, out: Res) -> Result<()> {
    if packs(&g.gpu) && cols % 4 == 0 {
        // Partial sums over row strides, then their sum (see the shader).
        const PARTS: usize = 64;
        let part = g.tensor(format!("{label}.partials"), PARTS * cols);
        let st = g.linear_texture(src, 6);
        let p = params([rows, cols, PARTS, 0], None, 0, (0, 0));
        let u = || Res::Unused;
        let pipeline = g.pipeline("matmul", "colsum_part", &[("WG_X", 64.0), ("WG_Y", 1.0)])?;
        let groups = crate::graph::grid1d(&g.gpu, (PARTS * cols / 4).div_ceil(64) as u64);
        g.dispatch(format!("{label}.part"), pipeline, vec![u(), u(), u(), u(), Res::Uniform(p.clone()), u(), Res::ActTex(st), u(), Res::Act(part)], groups, 0.0);
        let pipeline = g.pipeline("matmul", "colsum_finish", &[("WG_X", 64.0), ("WG_Y", 1.0)])?;
        g.dispatch(label, pipeline, vec![u(), u(), u(), out, Res::Uniform(p), u(), u(), u(), Res::Act(part)], [(cols / 4).div_ceil(64) as u32, 1, 1], 0.0);
        return Ok(());
    }
    backward_product(g, label, (None, 3, 0), (Res::Act(src), 2, cols), out, (1, cols, rows), false)
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
    if vec4 && packs(&g.gpu) {
        // Texel gathers instead of per-lane storage loads (see Graph::linear_texture),
        // in chunks so the textures stay small beside the activations; the
        // backward also reads dy (its output) as a texture.
        let pipeline = g.pipeline("matmul", &format!("{entry}_tex"), &consts)?;
        for (i0, m) in crate::ops::gemm::texture_ranges(n, 16) {
            let zt = g.linear_texture_range(z, i0, m, 5);
            let dyt = if entry == "act_backward4" { Res::ActTex(g.linear_texture_range(out, i0, m, 6)) } else { u() };
            let groups = crate::graph::grid1d(&g.gpu, m.div_ceil(64) as u64);
            let b = vec![u(), u(), u(), u(), Res::Uniform(params([m, 0, 0, 0], None, i0, (0, 0))), Res::ActTex(zt), dyt, u(), Res::Act(out)];
            g.dispatch(label, pipeline.clone(), b, groups, 0.0);
        }
        return Ok(());
    }
    let pipeline = g.pipeline("matmul", &entry, &consts)?;
    let b = if vec4 { vec![u(), Res::Act(z), u(), u(), Res::Uniform(p), u(), u(), u(), Res::Act(out)] } else { vec![Res::Act(z), u(), u(), Res::Act(out), Res::Uniform(p)] };
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
        Some(w) if packs(&g.gpu) && g.fuse_act && !l.f16 && act != Act::None => {
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
    if packs(&g.gpu) {
        let dyv = View::new(Src::Act(dy), m, l.n, l.n);
        tex_gemm(g, &format!("{label}.dW"), &View::t(Src::Act(x), m, l.k, l.k), &dyv, Res::Buf(grad.w.clone()), np, Epilogue::plain())?;
        colsum(g, &format!("{label}.db"), dy, m, l.n, Res::Buf(grad.b.clone()))?;
        let wt = View::t(Src::Buf(w), l.k, l.n, np);
        let ep = match act_of {
            Some((z, act)) if g.fuse_act && l.k % 4 == 0 && !acc => Epilogue { act, act_grad_of: Some(z), ..Epilogue::plain() },
            _ => Epilogue { accumulate: acc, ..Epilogue::plain() },
        };
        fused = ep.act_grad_of.is_some();
        tex_gemm(g, &format!("{label}.dx"), &dyv, &wt, Res::Act(dx), l.k, ep)?;
    } else {
        // dW [K, NP] = xᵀ [K, m] · dy [m, N] (columns N..NP come out zero).
        backward_product(g, &format!("{label}.dW"), (Some(x), 2, l.k), (Res::Act(dy), 2, l.n), Res::Buf(grad.w.clone()), (l.k, np, m), false)?;
        // db [1, NP] = 1ᵀ · dy.
        backward_product(g, &format!("{label}.db"), (None, 3, 0), (Res::Act(dy), 2, l.n), Res::Buf(grad.b.clone()), (1, np, m), false)?;
        // dx [m, K] = dy [m, N] · Wᵀ, W stored [K, NP]: B_MODE 1 reads row k of the
        // store as column k of Bᵀ, with b_stride = NP.
        backward_product(g, &format!("{label}.dx"), (Some(dy), 0, l.n), (Res::Buf(w), 1, np), Res::Act(dx), (m, l.k, l.n), acc)?;
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
    if packs(&g.gpu) {
        // Padded to whole vec4s, as in the forward: the GEMM reads it transposed as it is.
        let cols = im2col(g, label, x, &geom, pad4(k_real))?;
        tex_gemm(g, &format!("{label}.dW"), &View::t_zero_padded(Src::Act(cols), m, k_real, pad4(k_real)), &dyv, Res::Buf(grad.w.clone()), np, Epilogue::plain())?;
    } else {
        let cols = im2col(g, label, x, &geom, k_real)?;
        backward_product(g, &format!("{label}.dW"), (Some(cols), 2, k_real), (Res::Act(dy), 2, l.n), Res::Buf(grad.w.clone()), (k_real, np, m), false)?;
    }
    colsum(g, &format!("{label}.db"), dy, m, l.n, Res::Buf(grad.b.clone()))?;
    if let Some(dx) = dx_into {
        // dcols = dy·Wᵀ, then col2im gathers it back onto the input grid.
        let dcols = g.tensor(format!("{label}.dcols"), m * k_real);
        if packs(&g.gpu) {
            tex_gemm(g, &format!("{label}.dcols"), &dyv, &View::t(Src::Buf(w), k_real, l.n, np), Res::Act(dcols), k_real, Epilogue::plain())?;
        } else {
            backward_product(g, &format!("{label}.dcols"), (Some(dy), 0, l.n), (Res::Buf(w), 1, np), Res::Act(dcols), (m, k_real, l.n), false)?;
        }
        let n_in = geom.batch * geom.in_h * geom.in_w * geom.cin;
        let p = params([geom.batch, 0, k_real, 0], Some(&geom), 0, (0, 0));
        if packs(&g.gpu) && geom.cin % 4 == 0 {
            let dt = g.linear_texture(dcols, 5);
            let pipeline = g.pipeline("matmul", "col2im4", &overrides(Act::None, true, false, (64, 1)))?;
            let groups = crate::graph::grid1d(&g.gpu, (n_in / 4).div_ceil(64) as u64);
            let u = || Res::Unused;
            g.dispatch(format!("{label}.col2im"), pipeline, vec![u(), u(), u(), u(), Res::Uniform(p), Res::ActTex(dt), u(), u(), Res::Act(dx)], groups, 0.0);
        } else {
            let pipeline = g.pipeline("matmul", "col2im", &overrides(Act::None, true, false, (64, 1)))?;
            let groups = crate::graph::grid1d(&g.gpu, n_in.div_ceil(64) as u64);
            g.dispatch(format!("{label}.col2im"), pipeline, vec![Res::Act(dcols), Res::Unused, Res::Unused, Res::Act(dx), Res::Uniform(p)], groups, 0.0);
        }
    }
    Ok(())
}
