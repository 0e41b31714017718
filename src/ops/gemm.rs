//! The texture GEMM over packed operand views: C (+)= act(A·B + bias) where A and
//! B are views of storage buffers, each packed into an rgba32float texture by
//! `matmul.wgsl`'s `pack` right before `main_tex` reads it.
//!
//! This is how weights that live in buffers (training: the optimizer updates them
//! in place; inference: layers whose K is not a multiple of 64) use the texture
//! matmul on adapters that prefer it. A view may be transposed, so the three
//! products of a linear layer need no transposed copies:
//!   forward  y  = x·W     A = x,           B = W
//!   backward dx = dy·Wᵀ   A = dy,          B = W read transposed
//!            dW = xᵀ·dy   A = x transposed, B = dy
//! Operands taller than the texture limit are split: output rows into row chunks
//! (`out_row_off`), the reduction into K chunks that accumulate.

use crate::graph::{bind, Graph, Res, TensorId};
use crate::ops::matmul::MatmulParams;
use crate::ops::params::mm;
use crate::ops::Act;
use anyhow::Result;
use std::sync::Arc;

crate::kernel_params! {
/// `matmul.wgsl`'s `PackParams` (the pack kernels' uniform), field by field.
pub struct PackParams for "matmul" "PackParams" {
    /// The texture's height and width in texels.
    pub height: u32,
    pub width: u32,
    /// The logical matrix's real rows and columns (zeros beyond).
    pub rows_real: u32,
    pub cols_real: u32,
    /// The source view: first element, row stride, 1 if transposed.
    pub off: u32,
    pub stride: u32,
    pub transposed: u32,
    pub _pad: u32,
}
}

/// Where a view's values live.
#[derive(Clone)]
pub enum Src {
    Act(TensorId),
    Buf(Arc<wgpu::Buffer>),
}

impl Src {
    fn res(&self) -> Res {
        match self {
            Src::Act(t) => Res::Act(*t),
            Src::Buf(b) => Res::Buf(b.clone()),
        }
    }
}

/// A logical matrix [rows, cols] over a buffer: element (r, c) is
/// src[r * stride + c], or src[c * stride + r] when `transposed`.
#[derive(Clone)]
pub struct View {
    pub src: Src,
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
    pub transposed: bool,
    /// Columns [cols, stride) of every row hold zeros (an im2col matrix padded to
    /// whole vec4s), so a reader may run the reduction over whole vec4s of the
    /// buffer as it is, with no pack pass to zero-pad it.
    pub zero_pad: bool,
}

impl View {
    pub fn new(src: Src, rows: usize, cols: usize, stride: usize) -> View {
        View { src, rows, cols, stride, transposed: false, zero_pad: false }
    }

    /// As `new`, for a buffer whose columns [cols, stride) are zeros (`zero_pad`).
    pub fn zero_padded(src: Src, rows: usize, cols: usize, stride: usize) -> View {
        View { zero_pad: true, ..View::new(src, rows, cols, stride) }
    }

    /// The transpose of a row-major [rows, cols] buffer with row `stride`, as a
    /// [cols, rows] view.
    pub fn t(src: Src, rows: usize, cols: usize, stride: usize) -> View {
        View { src, rows: cols, cols: rows, stride, transposed: true, zero_pad: false }
    }

    /// As `t`, for a buffer whose columns [cols, stride) are zeros (`zero_pad`).
    pub fn t_zero_padded(src: Src, rows: usize, cols: usize, stride: usize) -> View {
        View { zero_pad: true, ..View::t(src, rows, cols, stride) }
    }
}

const WG: usize = 8;

/// Packs view rows [r0, r0 + rows) and columns [c0, c0 + cols) into a plan texture
/// of ceil(cols / 4) x rows texels for `binding`; entries outside the view are zero.
pub fn pack(g: &mut Graph, label: &str, v: &View, (r0, rows): (usize, usize), (c0, cols): (usize, usize), binding: u32) -> Result<crate::graph::TexRef> {
    let width = cols.div_ceil(4);
    let tex = g.tex(width, rows, binding);
    let off = if v.transposed { c0 * v.stride + r0 } else { r0 * v.stride + c0 };
    let r_real = v.rows.saturating_sub(r0).min(rows);
    let c_real = v.cols.saturating_sub(c0).min(cols);
    let w = |v: usize| v as u32;
    let p = PackParams { height: w(rows), width: w(width), rows_real: w(r_real), cols_real: w(c_real), off: w(off), stride: w(v.stride), transposed: v.transposed as u32, _pad: 0 };
    // Whole vec4 rows when aligned (`pack4` reads the source as vec4 through
    // binding 1); transposed and aligned, 4x4 blocks of vec4 loads transposed in
    // registers (`pack4t`); else scalars (`pack`, binding 0).
    let aligned = off % 4 == 0 && v.stride % 4 == 0;
    let (entry, vec4, rows_per_inv) = match (v.transposed, aligned) {
        (false, true) if c_real % 4 == 0 => ("pack4", true, 1),
        (true, true) => ("pack4t", true, 4),
        _ => ("pack", false, 1),
    };
    // The vec4 kernels read their source from a linear-texture copy of the whole
    // buffer (PACK_TEX): a copy is a memcpy, and texel fetches are gathers where
    // storage loads are per-lane loops (pack4t of a 384x1536 weight: 5.6 ms from
    // the buffer on lavapipe, docs/perf.md). Not for f16 plans' parameter buffers
    // (f32), which no inference pack reads anyway.
    let src_tex = vec4 && (matches!(v.src, Src::Act(_)) || !g.half);
    let pipeline = g.pipeline("matmul", entry, &[("WG_X", WG as f64), ("WG_Y", WG as f64), ("PACK_TEX", src_tex as u32 as f64)])?;
    let (s0, s1) = if vec4 { (Res::Unused, if src_tex { Res::Buf(g.gpu.placeholder()) } else { v.src.res() }) } else { (v.src.res(), Res::Unused) };
    let mut pairs = vec![(mm::A, s0), (mm::B, s1), (mm::PARAMS, Res::uniform(&p)), (mm::ZC, Res::OutTex(tex))];
    if vec4 {
        let src = match (&v.src, src_tex) {
            (Src::Act(t), true) => Res::ActTex(g.linear_texture(*t, mm::PACK_SRC as u32)),
            (Src::Buf(bb), true) => Res::ActTex(g.linear_texture_buf(bb, 0, (bb.size() / 16) as usize, mm::PACK_SRC as u32)),
            _ => Res::Tex(g.gpu.placeholder_texture(g.half)),
        };
        pairs.push((mm::PACK_SRC, src));
    }
    let b = bind(pairs);
    let groups = [width.div_ceil(WG) as u32, rows.div_ceil(rows_per_inv).div_ceil(WG) as u32, 1];
    g.dispatch(format!("{label}.pack"), pipeline, b, groups, 0.0);
    Ok(tex)
}

/// Rows [r0, r0 + n) of a row-major [rows, c] activation as a texture bound at
/// `binding`: copied when rows are whole 256-byte multiples (`Graph::row_copy_ok`:
/// c % 64 == 0, or c % 128 == 0 in f16 plans; what buffer-to-texture copies
/// need), else packed by a kernel.
pub fn act_rows_texture(g: &mut Graph, label: &str, t: TensorId, rows: usize, c: usize, (r0, n): (usize, usize), binding: u32) -> Result<crate::graph::TexRef> {
    if c % 4 == 0 && g.row_copy_ok(c / 4) {
        Ok(g.to_texture(t, r0, n, c / 4, binding))
    } else {
        pack(g, label, &View::new(Src::Act(t), rows, c, c), (r0, n), (0, c), binding)
    }
}

/// Most bytes of activation an inference kernel copies into one texture at a
/// time. Activation textures are copies of live tensors, so a texture as large as
/// the largest activation would add that much to peak memory; chunks of a few MiB
/// keep the copies small while each dispatch still has thousands of invocations.
pub const TEXTURE_CHUNK_BYTES: usize = 2 << 20;

/// Rows per chunk of a [_, row_bytes / 4] tensor read through a texture: within
/// TEXTURE_CHUNK_BYTES (at least 16 rows) and the adapter's texture height, and a
/// multiple of 16, so no chunk but the last ends in a part-idle GEMM row block.
pub fn texture_chunk_rows(row_bytes: usize, max_tex: usize) -> usize {
    let rows = (TEXTURE_CHUNK_BYTES / row_bytes.max(1)).max(16);
    (rows - rows % 16).min(max_tex)
}

/// (first unit, units) ranges covering `units` units of `unit_bytes` each, about
/// TEXTURE_CHUNK_BYTES per range: how elementwise and row kernels walk a large
/// tensor with a small linear texture.
pub fn texture_ranges(units: usize, unit_bytes: usize) -> Vec<(usize, usize)> {
    // No texture-height limit here: a linear texture widens to fit (Graph::linear_texture_range).
    let per = texture_chunk_rows(unit_bytes, usize::MAX);
    (0..units).step_by(per).map(|u0| (u0, per.min(units - u0))).collect()
}

/// Batch chunks for kernels that read `rows_per_image` rows of `c` channels per
/// image as texture rows (attention, depthwise conv): (first image, images) pairs
/// whose rows fit the texture limit and, beyond one image, TEXTURE_CHUNK_BYTES; or
/// None when the texture path does not apply (a buffer-preferring adapter, or rows
/// too wide or one image too tall).
pub fn texture_batches(g: &Graph, texture: bool, batch: usize, rows_per_image: usize, c: usize) -> Option<Vec<(usize, usize)>> {
    let max_tex = g.gpu.limits.max_texture_dimension_2d as usize;
    let image_bytes = (rows_per_image * c * 4).max(1);
    let per = (max_tex / rows_per_image.max(1)).min((TEXTURE_CHUNK_BYTES / image_bytes).max(1));
    (texture && c / 4 <= max_tex && max_tex >= rows_per_image).then(|| (0..batch).step_by(per).map(|b0| (b0, per.min(batch - b0))).collect())
}

/// The epilogue of a texture GEMM.
pub struct Epilogue {
    pub act: Act,
    pub bias: Option<Arc<wgpu::Buffer>>,
    /// Add into `out` instead of overwriting it.
    pub accumulate: bool,
    /// Training forward: also store the pre-activation z here (`matmul.wgsl`'s SAVE_Z).
    pub save_z: Option<TensorId>,
    /// Training backward: the product is act(z)'s gradient; store it times
    /// act'(z), `act` naming the activation, instead of activating it (ACT_GRAD).
    pub act_grad_of: Option<TensorId>,
}

impl Epilogue {
    pub fn plain() -> Epilogue {
        Epilogue { act: Act::None, bias: None, accumulate: false, save_z: None, act_grad_of: None }
    }
}

/// out [a.rows, n_out] (+)= act(A·B + bias), with A = `a` [M, K] and B = `b`
/// [K, N] (N <= n_out; columns N..n_out come out as the bias alone, zero without).
/// `out` has row stride n_out.
pub fn tex_gemm(g: &mut Graph, label: &str, a: &View, b: &View, out: Res, n_out: usize, ep: Epilogue) -> Result<()> {
    assert_eq!(a.cols, b.rows, "{label}: inner dimensions");
    let (m, k) = (a.rows, a.cols);
    let max = g.gpu.limits.max_texture_dimension_2d as usize;
    let k_chunk = (max / 4) * 4;
    let n4 = n_out.div_ceil(4);
    anyhow::ensure!(n4 <= max && k_chunk.div_ceil(4) <= max, "{label}: {n_out} columns exceed the texture limit");
    anyhow::ensure!(ep.act == Act::None || k <= k_chunk, "{label}: a fused activation needs K within one texture");
    anyhow::ensure!(ep.act_grad_of.is_none() || n_out % 4 == 0, "{label}: a fused activation gradient needs whole vec4 rows");
    anyhow::ensure!(ep.save_z.is_none() || !ep.accumulate, "{label}: saving the pre-activation of an accumulated product");
    // Training's fused activation: its own entry point (main_tex_act, so that
    // main_tex compiles none of it) with two more bindings (7: z written, 11: z
    // read), a placeholder for the one unused (a binding a disabled branch names
    // is still part of the layout).
    let fused = ep.save_z.is_some() || ep.act_grad_of.is_some();
    let z_bindings = fused.then(|| {
        let z_out = ep.save_z.map_or_else(|| Res::Buf(g.gpu.placeholder()), Res::Act);
        let z_in = match ep.act_grad_of {
            Some(z) => Res::ActTex(g.linear_texture(z, mm::Z_TEX as u32)),
            None => Res::Tex(g.gpu.placeholder_texture(g.half)),
        };
        (z_out, z_in)
    });
    // Activation operands whose rows are whole vec4s are read from a linear
    // texture of their buffer (a copy) instead of a packed one (a pass of their
    // own): A as is (TA 1) or transposed (TA 2), B as is. K must be a multiple of
    // 4 there, since nothing zero-pads the reduction's end, unless the buffer's
    // rows already end in zeros (`View::zero_pad`, A only: its columns are K).
    let linear = |v: &View| v.stride % 4 == 0 && v.rows % 4 == 0 && v.cols % 4 == 0;
    // Transposed, the padded dimension is the view's rows (the output rows past
    // the last are computed from the zeros and not stored).
    let linear_a = linear(a)
        || match a.transposed {
            false => a.zero_pad && a.rows % 4 == 0 && a.stride == a.cols.div_ceil(4) * 4,
            true => a.zero_pad && a.cols % 4 == 0 && a.stride == a.rows.div_ceil(4) * 4,
        };
    let ta = match (matches!(a.src, Src::Act(_)) && linear_a, a.transposed) {
        (true, false) => 1,
        (true, true) => 2,
        _ => 0,
    };
    // B may also be a weight buffer (training's forward X·W, the weights AdamW
    // updates in place): a copy of it into a linear texture instead of a pack
    // pass, since a copy runs as a memcpy and the pack's buffer loads as loops
    // over the lanes (fc1's W: 5.5 ms packed on lavapipe, docs/perf.md).
    let tb_lin = linear(b) && !b.transposed && b.cols == n_out;
    let lin_tex = |g: &mut Graph, v: &View, binding| match &v.src {
        Src::Act(t) => g.linear_texture(*t, binding),
        Src::Buf(bb) => g.linear_texture_buf(bb, 0, v.rows * v.stride / 4, binding),
    };
    let blk = super::matmul::tex_block(g, n4);
    for r0 in (0..m).step_by(max) {
        let rows = max.min(m - r0);
        for (j, k0) in (0..k.max(1)).step_by(k_chunk).enumerate() {
            let kc = k_chunk.min(k - k0).div_ceil(4) * 4;
            let at = if ta == 0 { pack(g, &format!("{label}.a"), a, (r0, rows), (k0, kc), mm::A_TEX as u32)? } else { lin_tex(g, a, mm::A_TEX as u32) };
            let bt = if tb_lin { lin_tex(g, b, mm::B_TEX as u32) } else { pack(g, &format!("{label}.b"), b, (k0, kc), (0, n_out), mm::B_TEX as u32)? };
            let first = j == 0;
            let has_bias = first && ep.bias.is_some();
            let (lx, groups) = (blk.lx, super::matmul::tex_grid(n4, rows, &blk));
            let mut consts = vec![
                ("ACT", ep.act.code()),
                ("HAS_BIAS", has_bias as u32 as f64),
                ("ACCUMULATE", (ep.accumulate || !first) as u32 as f64),
                ("WG_X", super::matmul::TWG_X as f64),
                ("WG_Y", 1.0),
                ("TA", ta as f64),
                ("TB_LIN", tb_lin as u32 as f64),
                ("TRM", blk.trm as f64),
                ("A_SHARE", blk.share as u32 as f64),
            ];
            if fused {
                consts.extend([("SAVE_Z", ep.save_z.is_some() as u32 as f64), ("ACT_GRAD", ep.act_grad_of.is_some() as u32 as f64)]);
            }
            let pipeline = g.pipeline("matmul", if fused { "main_tex_act" } else { "main_tex" }, &consts)?;
            // Linear operands: row strides and this K chunk's start, in vec4s.
            let a_off = if ta == 2 { k0 * a.stride / 4 } else { k0 / 4 };
            let w = |v: usize| v as u32;
            let (a_stride, b_stride, b_off) = (w(a.stride / 4), w(b.stride / 4), w(k0 * b.stride / 4));
            let p = MatmulParams { m: w(rows), n: w(n_out), k: w(kc), np4: w(n4), out_row_off: w(r0), a_stride, b_stride, a_off: w(a_off), b_off, col_lanes_log2: lx, splits: 1, ..Default::default() };
            // main_tex reads the bias from a linear texture of it (binding 9).
            let bias_t = match (&ep.bias, has_bias) {
                (Some(bb), true) => {
                    anyhow::ensure!(bb.size() >= 16 * n4 as u64, "{label}: bias buffer shorter than {n_out} columns");
                    Res::ActTex(g.linear_texture_buf(bb, 0, n4, mm::BIAS_TEX as u32))
                }
                _ => Res::Tex(g.gpu.placeholder_texture(g.half)),
            };
            let mut pairs = vec![(mm::C, out.clone()), (mm::PARAMS, Res::uniform(&p)), (mm::A_TEX, Res::ActTex(at)), (mm::B_TEX, Res::ActTex(bt)), (mm::BIAS_TEX, bias_t)];
            if let Some((z_out, z_in)) = &z_bindings {
                pairs.extend([(mm::ZC, z_out.clone()), (mm::Z_TEX, z_in.clone())]);
            }
            g.dispatch(label, pipeline, bind(pairs), groups, 2.0 * (rows * b.cols * k_chunk.min(k - k0)) as f64);
        }
    }
    Ok(())
}
