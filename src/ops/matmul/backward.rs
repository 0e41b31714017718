//! The linear layers' backward.
//!
//! For y = x·W + b (x [M, K], W stored [K, NP], dy [M, N]):
//! - dx = dy·Wᵀ (B_MODE 1: the stored weight read transposed);
//! - dW = xᵀ·dy (A_MODE 2, B_MODE 2), written in W's own [K, NP] layout so the
//!   optimizer updates weights and gradients elementwise;
//! - db: column sums of dy.
//!
//! A layer whose input was act(z) (the MLP's second) returns dz = dx ⊙ act'(z),
//! fused into the dx product where the profile fuses activations
//! (`linear_backward_act`).

use super::*;

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
    let fused;
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
        backward_product(g, &format!("{label}.dW"), (x, 2, l.k), (Res::Act(dy), 2, l.n), Res::Buf(grad.w.clone()), (l.k, np, m), false, None)?;
        // db = column sums of dy (the padding columns of grad.b stay zero).
        colsum(g, &format!("{label}.db"), dy, m, l.n, Res::Buf(grad.b.clone()))?;
        // dx [m, K] = dy [m, N] · Wᵀ, W stored [K, NP]: B_MODE 1 reads row k of the
        // store as column k of Bᵀ, with b_stride = NP.
        // fc2's dx times act'(z) in the same store where the activation is fused.
        let grad_of = act_of.filter(|_| g.profile.fuse_act && !acc);
        fused = grad_of.is_some();
        backward_product(g, &format!("{label}.dx"), (dy, 0, l.n), (Res::Buf(w), 1, np), Res::Act(dx), (m, l.k, l.n), acc, grad_of)?;
    }
    if let (Some((z, act)), false) = (act_of, fused) {
        act_backward(g, &format!("{label}.act"), z, dx, m * l.k, act)?;
    }
    Ok(dx)
}
