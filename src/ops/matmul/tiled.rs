//! The GPU set's GEMM (`main_tiled`): tile choice and split-K per shape, the
//! backward's products, and column sums as two-stage reductions.

use super::*;

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
/// `split`: false keeps K whole (f16 plans, whose partial sums would be f16).
pub fn tiled_shape(m: usize, n: usize, k: usize, min_groups: usize, split: bool) -> TiledShape {
    let gx = n.div_ceil(4).div_ceil(TBN / 4);
    let tm = if gx * m.div_ceil(128) >= min_groups { 8 } else { 4 };
    let gy = m.div_ceil(16 * tm);
    let want = if split { min_groups.div_ceil(gx * gy).min(k / MIN_K_PER_SPLIT).max(1) } else { 1 };
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

/// What a tiled GEMM does with the activation's pre-activation z (training's
/// fused MLP activation): nothing, keep it (`SAVE_Z`: fc1 stores z and act(z)),
/// or multiply the product by act'(z) (`ACT_GRAD`: fc2's dx).
#[derive(Clone, Copy)]
pub(super) enum TiledZ {
    None,
    Save(TensorId),
    Grad(TensorId),
}

/// C (+)= epilogue(A·B) with `main_tiled` (the GPU kernel set), split along K
/// where the output tiles alone give fewer than the profile's workgroup target:
/// each split writes its partial product to a tensor of its own and
/// `splitk_sum` adds them in order and applies the epilogue. Not in f16 plans:
/// partial sums stored in f16 lose more than the output's own rounding (partials
/// can be far larger than their sum). `ov` are the
/// operand modes and epilogue constants; `ops` the bindings a, b, bias, c.
pub(super) fn tiled(g: &mut Graph, label: &str, ov: &[(&'static str, f64)], [a, b, bias, c]: [Res; 4], z: TiledZ, mut p: MatmulParams, (m, n, k): (usize, usize, usize)) -> Result<()> {
    let shape = tiled_shape(m, n, k, g.profile.gemm.min_workgroups, !g.half);
    let ([gx, gy], splits) = (shape.groups, shape.splits);
    let max = g.gpu.limits.max_compute_workgroups_per_dimension as usize;
    anyhow::ensure!(gx <= max && gy <= max, "{label}: a {m}x{n} GEMM needs {gx}x{gy} workgroups, over this adapter's {max} per dimension; use a smaller batch");
    (p.k_chunk, p.splits) = (shape.k_chunk as u32, splits as u32);
    let mut ov = ov.to_vec();
    ov.push(("TM", shape.tm as f64));
    let (save, grad) = (matches!(z, TiledZ::Save(_)), matches!(z, TiledZ::Grad(_)));
    ov.extend([("SAVE_Z", save as u32 as f64), ("ACT_GRAD", grad as u32 as f64)]);
    let ov = &ov[..];
    let flops = 2.0 * (m * n * k) as f64;
    // A dense A of whole-vec4 rows is read four values per load (main_tiled4).
    let a_mode = ov.iter().find(|(name, _)| *name == "A_MODE").map_or(0.0, |o| o.1);
    let entry = if a_mode == 0.0 && k % 4 == 0 && p.a_stride % 4 == 0 { "main_tiled4" } else { "main_tiled" };
    if splits == 1 {
        let pipeline = g.pipeline("matmul", entry, ov)?;
        let zs = z_bindings(g, z, &a);
        g.dispatch(label, pipeline, bind([(mm::A, a), (mm::B, b), (mm::BIAS, bias), (mm::C, c), (mm::PARAMS, Res::uniform(&p))].into_iter().chain(zs)), [gx as u32, gy as u32, 1], flops);
        return Ok(());
    }
    // The product without epilogue, then the ordered sum with it.
    let epilogue = |name: &str| matches!(name, "HAS_BIAS" | "ACT" | "ACCUMULATE" | "SAVE_Z" | "ACT_GRAD");
    let mut part_ov: Vec<(&'static str, f64)> = ov.iter().copied().filter(|(name, _)| !epilogue(name)).collect();
    part_ov.extend([("SPLIT", 1.0), ("HAS_BIAS", 0.0)]);
    let part = g.tensor(format!("{label}.splitk"), splits * m * n);
    let pipeline = g.pipeline("matmul", entry, &part_ov)?;
    let zs = z_bindings(g, TiledZ::None, &a);
    // The unused bias takes an operand (read-only, as at binding 1).
    let v = bind([(mm::A, a), (mm::B, b.clone()), (mm::BIAS, b), (mm::C, Res::Act(part)), (mm::PARAMS, Res::uniform(&p))].into_iter().chain(zs));
    g.dispatch(format!("{label}.splitk"), pipeline, v, [gx as u32, gy as u32, splits as u32], flops);
    let mut sum_ov: Vec<(&'static str, f64)> = ov.iter().copied().filter(|(name, _)| epilogue(name)).collect();
    sum_ov.extend([("WG_X", 64.0), ("WG_Y", 1.0)]);
    let pipeline = g.pipeline("matmul", "splitk_sum", &sum_ov)?;
    let groups = crate::graph::grid1d(&g.gpu, (m * n).div_ceil(64) as u64);
    let zs = z_bindings(g, z, &Res::Act(part));
    g.dispatch(label, pipeline, bind([(mm::A, Res::Act(part)), (mm::BIAS, bias), (mm::C, c), (mm::PARAMS, Res::uniform(&p))].into_iter().chain(zs)), groups, 0.0);
    Ok(())
}

/// The bindings of z, which the tiled GEMM's stores use statically: z written at
/// ZC (else the placeholder, which no tiled dispatch binds read-only), z read at
/// ZB (else `other`, a read-only operand of the same dispatch).
fn z_bindings(g: &Graph, z: TiledZ, other: &Res) -> [(usize, Res); 2] {
    let zc = match z {
        TiledZ::Save(t) => Res::Act(t),
        _ => Res::Buf(g.gpu.placeholder()),
    };
    let zb = match z {
        TiledZ::Grad(t) => Res::Act(t),
        _ => other.clone(),
    };
    [(mm::ZC, zc), (mm::ZB, zb)]
}

/// One backward product C[m, n] (+)= A·B in the given operand modes (the GPU
/// kernel set's tiled GEMM; split along K where its tiles are few: dW), with
/// `grad_of` the product times act'(z) (fc2's dx, `TiledZ::Grad`).
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_product(
    g: &mut Graph,
    label: &str,
    (a, a_mode, a_stride): (TensorId, u32, usize),
    (b, b_mode, b_stride): (Res, u32, usize),
    out: Res,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    grad_of: Option<(TensorId, Act)>,
) -> Result<()> {
    let act = grad_of.map_or(Act::None, |(_, act)| act);
    let ov = [("A_MODE", a_mode as f64), ("B_MODE", b_mode as f64), ("HAS_BIAS", 0.0), ("ACCUMULATE", if accumulate { 1.0 } else { 0.0 }), ("ACT", act.code())];
    let z = grad_of.map_or(TiledZ::None, |(z, _)| TiledZ::Grad(z));
    // HAS_BIAS=false reads no bias: the B operand fills its binding (read-only, as at 1).
    let bias = b.clone();
    tiled(g, label, &ov, [Res::Act(a), b, bias, out], z, params([m, n, k, 0], None, 0, (a_stride, b_stride)), (m, n, k))
}

/// out[1, cols] = column sums of src [rows, cols], in two stages: partial sums
/// over row strides, then their sum per column, in a fixed order.
pub fn colsum(g: &mut Graph, label: &str, src: TensorId, rows: usize, cols: usize, out: Res) -> Result<()> {
    if packs(g) && cols % 4 == 0 {
        // Partial sums over row strides, then their sum (see the shader).
        const PARTS: usize = 64;
        let part = g.tensor(format!("{label}.partials"), PARTS * cols);
        let st = g.linear_texture(src, mm::B_TEX as u32);
        let p = MatmulParams { splits: PARTS as u32, ..params([rows, cols, 0, 0], None, 0, (0, 0)) };
        let pipeline = g.pipeline("matmul", "colsum_part", &[("WG_X", 64.0), ("WG_Y", 1.0)])?;
        let groups = crate::graph::grid1d(&g.gpu, (PARTS * cols / 4).div_ceil(64) as u64);
        g.dispatch(format!("{label}.part"), pipeline, bind([(mm::PARAMS, Res::uniform(&p)), (mm::B_TEX, Res::ActTex(st)), (mm::C4, Res::Act(part))]), groups, 0.0);
        let pipeline = g.pipeline("matmul", "colsum_finish", &[("WG_X", 64.0), ("WG_Y", 1.0)])?;
        g.dispatch(label, pipeline, bind([(mm::C, out), (mm::PARAMS, Res::uniform(&p)), (mm::C4, Res::Act(part))]), [(cols / 4).div_ceil(64) as u32, 1, 1], 0.0);
        return Ok(());
    }
    // Partial sums over row strides: P = enough partials per column for
    // MIN_GROUPS workgroups of 64 (consecutive invocations read consecutive
    // columns of a row); then a workgroup per column adds its P partials by a
    // tree in workgroup memory. Fixed order: deterministic.
    let parts = (g.profile.gemm.min_workgroups * 64).div_ceil(cols).clamp(1, rows.div_ceil(4).max(1));
    let part = g.tensor(format!("{label}.partials"), parts * cols);
    let p = MatmulParams { splits: parts as u32, ..params([rows, cols, 0, 0], None, 0, (0, 0)) };
    let pipeline = g.pipeline("matmul", "colsum_rows", &[("WG_X", 64.0), ("WG_Y", 1.0)])?;
    let groups = crate::graph::grid1d(&g.gpu, (parts * cols).div_ceil(64) as u64);
    g.dispatch(format!("{label}.part"), pipeline, bind([(mm::A, Res::Act(src)), (mm::C, Res::Act(part)), (mm::PARAMS, Res::uniform(&p))]), groups, 0.0);
    let pipeline = g.pipeline("matmul", "colsum_tree", &[])?;
    g.dispatch(label, pipeline, bind([(mm::A, Res::Act(part)), (mm::C, out), (mm::PARAMS, Res::uniform(&p))]), crate::graph::grid1d(&g.gpu, cols as u64), 0.0);
    Ok(())
}
