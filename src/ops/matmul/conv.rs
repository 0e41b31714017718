//! Dense convolutions: the implicit GEMM (GPU set) or im2col and the texture
//! GEMM (CPU set), and their backward (col2im).

use super::*;

/// Materialises the im2col matrix of x for `geom`: [M, k_out] with zero columns
/// past kh·kw·cin.
pub(super) fn im2col(g: &mut Graph, label: &str, x: TensorId, geom: &ConvGeom, k_out: usize) -> Result<TensorId> {
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
            let xt = g.linear_texture_range(x, b0 * image_texels, nb * image_texels, mm::A_TEX as u32);
            let mut pc = p.clone();
            (pc.m, pc.out_row_off) = ((nb * hw) as u32, (b0 * hw) as u32);
            let groups = crate::graph::grid1d(&g.gpu, (nb * hw * k_out / 4).div_ceil(64) as u64);
            g.dispatch(format!("{label}.im2col"), pipeline.clone(), bind([(mm::PARAMS, Res::uniform(&pc)), (mm::A_TEX, Res::ActTex(xt)), (mm::C4, Res::Act(cols))]), groups, 0.0);
        }
        return Ok(cols);
    }
    let pipeline = g.pipeline("matmul", "im2col", &overrides(Act::None, false, true, (64, 1)))?;
    let max = g.gpu.limits.max_compute_workgroups_per_dimension as usize;
    let (gy, gz) = if m <= max { (m, 1) } else { (max, m.div_ceil(max)) };
    g.dispatch(format!("{label}.im2col"), pipeline, bind([(mm::A, Res::Act(x)), (mm::C, Res::Act(cols)), (mm::PARAMS, Res::uniform(&p))]), [k_out.div_ceil(64) as u32, gy as u32, gz as u32], 0.0);
    Ok(cols)
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
        backward_product(g, &format!("{label}.dW"), (cols, 2, k_real), (Res::Act(dy), 2, l.n), Res::Buf(grad.w.clone()), (k_real, np, m), false, None)?;
    }
    colsum(g, &format!("{label}.db"), dy, m, l.n, Res::Buf(grad.b.clone()))?;
    if let Some(dx) = dx_into {
        // dcols = dy·Wᵀ, then col2im gathers it back onto the input grid.
        let dcols = g.tensor(format!("{label}.dcols"), m * k_real);
        if packs(g) {
            tex_gemm(g, &format!("{label}.dcols"), &dyv, &View::t(Src::Buf(w), k_real, l.n, np), Res::Act(dcols), k_real, Epilogue::plain())?;
        } else {
            backward_product(g, &format!("{label}.dcols"), (dy, 0, l.n), (Res::Buf(w), 1, np), Res::Act(dcols), (m, k_real, l.n), false, None)?;
        }
        let n_in = geom.batch * geom.in_h * geom.in_w * geom.cin;
        let p = params([geom.batch, 0, k_real, 0], Some(&geom), 0, (0, 0));
        if packs(g) && geom.cin % 4 == 0 {
            let dt = g.linear_texture(dcols, mm::A_TEX as u32);
            let pipeline = g.pipeline("matmul", "col2im4", &overrides(Act::None, true, false, (64, 1)))?;
            let groups = crate::graph::grid1d(&g.gpu, (n_in / 4).div_ceil(64) as u64);
            g.dispatch(format!("{label}.col2im"), pipeline, bind([(mm::PARAMS, Res::uniform(&p)), (mm::A_TEX, Res::ActTex(dt)), (mm::C4, Res::Act(dx))]), groups, 0.0);
        } else {
            let pipeline = g.pipeline("matmul", "col2im", &overrides(Act::None, true, false, (64, 1)))?;
            let groups = crate::graph::grid1d(&g.gpu, n_in.div_ceil(64) as u64);
            g.dispatch(format!("{label}.col2im"), pipeline, bind([(mm::A, Res::Act(dcols)), (mm::C, Res::Act(dx)), (mm::PARAMS, Res::uniform(&p))]), groups, 0.0);
        }
    }
    Ok(())
}
