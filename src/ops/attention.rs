//! `shaders/attention.wgsl`: fused multi-head attention with online softmax.

use crate::graph::{Graph, Res, TensorId};
use anyhow::{bail, Result};

const WG: usize = 64;

/// Shapes of one attention call: q [batch, tq, c], k and v [batch, tkv, c].
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub batch: usize,
    pub tq: usize,
    pub tkv: usize,
    pub c: usize,
    pub heads: usize,
    /// Softmax scale; CvT uses c^-0.5 (the stage width), not head_dim^-0.5.
    pub scale: f32,
}

/// Largest head width the kernel's register arrays hold.
pub const MAX_HEAD_DIM: usize = 64;

pub fn check_heads(c: usize, heads: usize) -> Result<()> {
    if heads == 0 || c % heads != 0 {
        bail!("width {c} is not divisible by {heads} heads");
    }
    let d = c / heads;
    if d % 4 != 0 || d > MAX_HEAD_DIM {
        bail!("head width {d} (= {c}/{heads}) must be a multiple of 4 and at most {MAX_HEAD_DIM}");
    }
    Ok(())
}

pub fn attention(g: &mut Graph, label: &str, q: TensorId, k: TensorId, v: TensorId, s: AttnShape) -> Result<TensorId> {
    check_heads(s.c, s.heads)?;
    let d4 = s.c / s.heads / 4;
    let o = g.tensor(label.to_string(), s.batch * s.tq * s.c);
    let pipeline = g.gpu.pipeline("attention", "main", &[("WG", WG as f64), ("D4", d4 as f64)])?;
    let params = vec![s.batch as u32, s.tq as u32, s.tkv as u32, (s.c / 4) as u32, s.heads as u32, s.scale.to_bits(), 0, 0];
    let groups = [s.tq.div_ceil(WG) as u32, s.heads as u32, s.batch as u32];
    // QKᵀ and PV: 2 multiply-adds per (query, key, channel).
    let flops = 4.0 * (s.batch * s.tq * s.tkv * s.c) as f64;
    g.dispatch(
        label,
        pipeline,
        vec![Res::Act(q), Res::Act(k), Res::Act(v), Res::Act(o), Res::Uniform(params)],
        groups,
        flops,
    );
    Ok(o)
}
