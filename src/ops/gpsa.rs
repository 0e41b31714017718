//! `shaders/gpsa.wgsl`: ConViT's gated positional self-attention, forward and
//! backward, in the split form of `../shared/convit-spec.md` §11: the content
//! attention is the fused attention kernel (`ops::attention`, scale d^-0.5), the
//! positional attention Qpos = softmax(pos_proj(r)) is computed once per layer
//! (it depends on no input), and one pass mixes them per head,
//! O = (1 − σ(λ))·Yc + σ(λ)·Qpos·V. The gate's gradient is Σ dO ⊙ (Yp − Yc): no
//! N×N reduction over the batch.

use crate::gpu::{Gpu, MatmulKind};
use crate::graph::{bind, grid1d, Graph, Res, TensorId};
use crate::ops::attention::{attention_backward, attention_train, attention_with, check_heads, AttnGrad, AttnSaved, AttnShape};
use crate::ops::params::gp;
use crate::profile::KernelSet;
use anyhow::{ensure, Result};
use std::sync::Arc;

const WG: usize = 64;
/// Rows of a `pos_mix` workgroup, and queries/keys per side of a `pos_dq` one.
const MIX_ROWS: usize = 64;
const DQ_TILE: usize = 16;

crate::kernel_params! {
/// `gpsa.wgsl`'s `Params`, field by field.
pub struct GpsaParams for "gpsa" "Params" {
    /// Images, patches (N = gs²), channels / 4, heads.
    pub b: u32,
    pub n: u32,
    pub c4: u32,
    pub h: u32,
    /// The side of the patch grid.
    pub gs: u32,
    /// gate_part's partial sums per head.
    pub parts: u32,
    pub _p0: u32,
    pub _p1: u32,
}
}

/// One GPSA layer's positional parameters: `pos_proj.weight` [H, 3],
/// `pos_proj.bias` [H] and `gating_param` [H] (λ; the gate is σ(λ)).
pub struct Gpsa {
    pub pos_w: Arc<wgpu::Buffer>,
    pub pos_b: Arc<wgpu::Buffer>,
    pub gate: Arc<wgpu::Buffer>,
    pub heads: usize,
    /// Inference (`frozen`): Qpos [H, n, n] computed once at load for n patches,
    /// which the forward reads instead of computing it at every run.
    pub qpos: Option<(usize, Arc<wgpu::Buffer>)>,
}

impl Gpsa {
    pub fn new(gpu: &Gpu, name: &str, pos_w: &[f32], pos_b: &[f32], gate: &[f32]) -> Result<Gpsa> {
        let heads = gate.len();
        ensure!(pos_w.len() == 3 * heads && pos_b.len() == heads, "{name}: pos_proj.weight must be [{heads}, 3] and pos_proj.bias [{heads}]");
        let up = |what: &str, v: &[f32]| -> Result<Arc<wgpu::Buffer>> { Ok(Arc::new(gpu.upload(&format!("{name}.{what}"), v)?)) };
        Ok(Gpsa { pos_w: up("pos_proj.weight", pos_w)?, pos_b: up("pos_proj.bias", pos_b)?, gate: up("gating_param", gate)?, heads, qpos: None })
    }

    /// As `new` for a layer that never trains, over a grid of `n` patches: its
    /// positional attention depends on no input, so it is computed here once
    /// (in f64, as `gpsa.wgsl`'s pos_softmax would in f32) like BatchNorm is
    /// folded into CvT's convolutions at load.
    pub fn frozen(gpu: &Gpu, name: &str, pos_w: &[f32], pos_b: &[f32], gate: &[f32], n: usize) -> Result<Gpsa> {
        let mut g = Self::new(gpu, name, pos_w, pos_b, gate)?;
        let gs = (n as f64).sqrt().round() as usize;
        ensure!(gs * gs == n, "{name}: GPSA needs a square grid of patches, not {n}");
        let mut q = vec![0f32; g.heads * n * n];
        for h in 0..g.heads {
            let w = &pos_w[3 * h..3 * h + 3];
            for i in 0..n {
                let scores: Vec<f64> = (0..n)
                    .map(|j| {
                        let dx = (j % gs) as f64 - (i % gs) as f64;
                        let dy = (j / gs) as f64 - (i / gs) as f64;
                        w[0] as f64 * dx + w[1] as f64 * dy + w[2] as f64 * (dx * dx + dy * dy) + pos_b[h] as f64
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for (j, s) in scores.iter().enumerate() {
                    q[(h * n + i) * n + j] = ((s - m).exp() / z) as f32;
                }
            }
        }
        g.qpos = Some((n, Arc::new(gpu.upload(&format!("{name}.qpos"), &q)?)));
        Ok(g)
    }
}

/// Gradient buffers of a GPSA layer's positional parameters (same shapes).
pub struct GpsaGrad {
    pub pos_w: Arc<wgpu::Buffer>,
    pub pos_b: Arc<wgpu::Buffer>,
    pub gate: Arc<wgpu::Buffer>,
}

impl GpsaGrad {
    pub fn new(gpu: &Gpu, name: &str, heads: usize) -> Result<GpsaGrad> {
        let buf = |what: &str, n: usize| -> Result<Arc<wgpu::Buffer>> { Ok(Arc::new(gpu.storage(&format!("{name}.{what}.grad"), (n * 4) as u64)?)) };
        Ok(GpsaGrad { pos_w: buf("pos_proj.weight", 3 * heads)?, pos_b: buf("pos_proj.bias", heads)?, gate: buf("gating_param", heads)? })
    }
}

/// Shapes of one GPSA call: q, k, v [batch, n, c] over a square grid of n patches.
#[derive(Clone, Copy, Debug)]
pub struct GpsaShape {
    pub batch: usize,
    pub n: usize,
    pub c: usize,
    pub heads: usize,
}

impl GpsaShape {
    /// The side of the patch grid; errors unless n is a square.
    fn side(&self) -> Result<usize> {
        let gs = (self.n as f64).sqrt().round() as usize;
        ensure!(gs * gs == self.n, "GPSA needs a square grid of patches, not {} tokens", self.n);
        Ok(gs)
    }

    /// The content attention's shape (scale: head width^-0.5, as ConViT).
    pub fn attn(&self) -> AttnShape {
        let d = self.c / self.heads.max(1);
        AttnShape { batch: self.batch, tq: self.n, tkv: self.n, c: self.c, heads: self.heads, scale: (d as f32).powf(-0.5) }
    }

    fn params(&self, parts: usize) -> Result<GpsaParams> {
        let u = |v: usize| v as u32;
        Ok(GpsaParams { b: u(self.batch), n: u(self.n), c4: u(self.c / 4), h: u(self.heads), gs: u(self.side()?), parts: u(parts), ..Default::default() })
    }

    fn d4(&self) -> usize {
        self.c / self.heads / 4
    }
}

/// What the training forward keeps for `gpsa_backward`.
#[derive(Clone, Copy, Debug)]
pub struct GpsaSaved {
    /// Qpos [heads, n, n].
    pub qpos: TensorId,
    /// The content attention's output Yc and what it kept.
    pub yc: TensorId,
    pub attn: AttnSaved,
    /// Yp = Qpos·V [batch, n, c].
    pub yp: TensorId,
}

/// Whether the GPU set's tiled kernels serve (else the CPU drivers' row forms).
fn tiled(g: &Graph) -> bool {
    g.profile.kernels == KernelSet::Gpu
}

/// Appends Qpos [heads, n, n] = softmax over keys of pos_proj(r): once per layer.
pub fn pos_attention(g: &mut Graph, label: &str, p: &Gpsa, s: &GpsaShape) -> Result<TensorId> {
    // Qpos is f32 (pos_softmax writes array<f32>): f16 plans take it frozen at load.
    ensure!(!g.half, "{label}: an f16 plan needs the layer's positional attention computed at load (Gpsa::frozen)");
    let qpos = g.tensor(format!("{label}.qpos"), s.heads * s.n * s.n);
    let pipeline = g.pipeline("gpsa", "pos_softmax", &[("WG", WG as f64)])?;
    let b = bind([(gp::PARAMS, Res::uniform(&s.params(0)?)), (gp::QPOS, Res::Act(qpos)), (gp::WPOS, Res::Buf(p.pos_w.clone())), (gp::BPOS, Res::Buf(p.pos_b.clone()))]);
    g.dispatch(format!("{label}.qpos"), pipeline, b, [(s.heads * s.n).div_ceil(WG) as u32, 1, 1], (8 * s.heads * s.n * s.n) as f64);
    Ok(qpos)
}

/// `out` = (1 − g)·y + g·Qpos·v per head, and Yp = Qpos·v into `yp` where given;
/// `backward`: `out` = y + g·Qposᵀ·v (dV from the content dV and dO).
fn mix(g: &mut Graph, label: &str, (v, y, qpos): (TensorId, TensorId, Res), p: &Gpsa, s: &GpsaShape, yp: Option<TensorId>, backward: bool) -> Result<TensorId> {
    let out = g.tensor(label.to_string(), s.batch * s.n * s.c);
    let consts = [("WG", MIX_ROWS as f64), ("D4", s.d4() as f64), ("BACKWARD", backward as u8 as f64), ("SAVE_YP", yp.is_some() as u8 as f64)];
    // The tiled form's tiles: V [32 rows, D4 vec4s] and the weights [64, 33]
    // (16.3 KiB at head width 64, over WebGPU's guaranteed 16 KiB): the row form
    // where the adapter has less.
    let tile_bytes = 32 * s.d4() * 16 + MIX_ROWS * 33 * 4;
    let fits = tile_bytes <= g.gpu.limits.max_compute_workgroup_storage_size as usize;
    let entry = if tiled(g) && fits { "pos_mix" } else { "pos_mix_rows" };
    let pipeline = g.pipeline("gpsa", entry, &consts)?;
    let yp_res = yp.map_or_else(|| Res::Buf(g.gpu.placeholder()), Res::Act);
    let b = bind([
        (gp::V, Res::Act(v)),
        (gp::Y, Res::Act(y)),
        (gp::O, Res::Act(out)),
        (gp::PARAMS, Res::uniform(&s.params(0)?)),
        (gp::QPOS, qpos),
        (gp::GATING, Res::Buf(p.gate.clone())),
        (gp::YP, yp_res),
    ]);
    let groups = [s.n.div_ceil(MIX_ROWS) as u32, s.heads as u32, s.batch as u32];
    g.dispatch(label, pipeline, b, groups, (2 * s.batch * s.n * s.n * s.c) as f64);
    Ok(out)
}

fn check(s: &GpsaShape, p: &Gpsa) -> Result<()> {
    check_heads(s.c, s.heads)?;
    ensure!(p.heads == s.heads, "GPSA layer has {} heads' positional parameters, the call {}", p.heads, s.heads);
    s.side()?;
    Ok(())
}

/// Inference: GPSA of q, k, v [batch, n, c] (after the qk and v projections).
pub fn gpsa(g: &mut Graph, label: &str, (q, k, v): (TensorId, TensorId, TensorId), s: GpsaShape, p: &Gpsa, kind: MatmulKind) -> Result<TensorId> {
    check(&s, p)?;
    let qpos = match &p.qpos {
        Some((n, buf)) if *n == s.n => Res::Buf(buf.clone()),
        _ => Res::Act(pos_attention(g, label, p, &s)?),
    };
    let yc = attention_with(g, &format!("{label}.content"), q, k, v, s.attn(), kind)?;
    mix(g, label, (v, yc, qpos), p, &s, None, false)
}

/// The training forward: the output, and what `gpsa_backward` needs.
pub fn gpsa_train(g: &mut Graph, label: &str, (q, k, v): (TensorId, TensorId, TensorId), s: GpsaShape, p: &Gpsa, grad: AttnGrad, kind: MatmulKind) -> Result<(TensorId, GpsaSaved)> {
    check(&s, p)?;
    let qpos = pos_attention(g, label, p, &s)?;
    let (yc, attn) = attention_train(g, &format!("{label}.content"), (q, k, v), s.attn(), grad, kind)?;
    let yp = g.tensor(format!("{label}.yp"), s.batch * s.n * s.c);
    let o = mix(g, label, (v, yc, Res::Act(qpos)), p, &s, Some(yp), false)?;
    Ok((o, GpsaSaved { qpos, yc, attn, yp }))
}

/// Partial sums per head of the gate's gradient: enough rows each to keep the
/// partials few, enough partials to fill a GPU.
fn gate_parts(rows: usize) -> usize {
    rows.div_ceil(16).clamp(1, 1024)
}

/// Backward of `gpsa_train`: from dO, returns (dq, dk, dv) and writes the
/// gradients of pos_proj and the gate into `grad`.
pub fn gpsa_backward(
    g: &mut Graph,
    label: &str,
    (q, k, v): (TensorId, TensorId, TensorId),
    saved: GpsaSaved,
    dout: TensorId,
    s: GpsaShape,
    p: &Gpsa,
    grad: &GpsaGrad,
) -> Result<(TensorId, TensorId, TensorId)> {
    check(&s, p)?;
    let rows = s.batch * s.n;
    let parts = gate_parts(rows);
    let prm = Res::uniform(&s.params(parts)?);
    let d4 = s.d4() as f64;
    let tiled = tiled(g);
    // dλ from dO, Yp and Yc.
    let part = g.tensor(format!("{label}.part"), 4 * (parts * s.heads).max(s.heads * s.n));
    let pipeline = g.pipeline("gpsa", "gate_part", &[("WG", WG as f64), ("D4", d4)])?;
    let b = bind([(gp::Y, Res::Act(saved.yc)), (gp::PARAMS, prm.clone()), (gp::YP, Res::Act(saved.yp)), (gp::DOUT, Res::Act(dout)), (gp::PART, Res::Act(part))]);
    g.dispatch(format!("{label}.dgate.part"), pipeline, b, grid1d(&g.gpu, (parts * s.heads).div_ceil(WG) as u64), (2 * rows * s.c) as f64);
    let pipeline = g.pipeline("gpsa", "gate_finish", &[("WG", WG as f64), ("D4", d4)])?;
    let b = bind([(gp::PARAMS, prm.clone()), (gp::GATING, Res::Buf(p.gate.clone())), (gp::DGATE, Res::Buf(grad.gate.clone())), (gp::PART, Res::Act(part))]);
    g.dispatch(format!("{label}.dgate"), pipeline, b, [s.heads as u32, 1, 1], 0.0);
    // The positional path: dQpos = Σ_b dO·Vᵀ, its softmax backward, dW_pos, db_pos.
    let dqpos = g.tensor(format!("{label}.dqpos"), s.heads * s.n * s.n);
    let b = bind([(gp::V, Res::Act(v)), (gp::PARAMS, prm.clone()), (gp::DOUT, Res::Act(dout)), (gp::DQPOS, Res::Act(dqpos))]);
    let flops = (2 * s.batch * s.n * s.n * s.c) as f64;
    if tiled {
        let pipeline = g.pipeline("gpsa", "pos_dq", &[("D4", d4)])?;
        let t = s.n.div_ceil(DQ_TILE) as u32;
        g.dispatch(format!("{label}.dqpos"), pipeline, b, [t, t, s.heads as u32], flops);
    } else {
        let pipeline = g.pipeline("gpsa", "pos_dq_rows", &[("WG", WG as f64), ("D4", d4)])?;
        g.dispatch(format!("{label}.dqpos"), pipeline, b, grid1d(&g.gpu, (s.heads * s.n * s.n).div_ceil(WG) as u64), flops);
    }
    let pipeline = g.pipeline("gpsa", "pos_softmax_backward", &[("WG", WG as f64)])?;
    let b = bind([(gp::PARAMS, prm.clone()), (gp::QPOS, Res::Act(saved.qpos)), (gp::GATING, Res::Buf(p.gate.clone())), (gp::DQPOS, Res::Act(dqpos)), (gp::PART, Res::Act(part))]);
    g.dispatch(format!("{label}.dpos"), pipeline, b, [(s.heads * s.n).div_ceil(WG) as u32, 1, 1], (10 * s.heads * s.n * s.n) as f64);
    let pipeline = g.pipeline("gpsa", "pos_grad_finish", &[("WG", WG as f64)])?;
    let b = bind([(gp::PARAMS, prm.clone()), (gp::DWPOS, Res::Buf(grad.pos_w.clone())), (gp::DBPOS, Res::Buf(grad.pos_b.clone())), (gp::PART, Res::Act(part))]);
    g.dispatch(format!("{label}.dpos_proj"), pipeline, b, [s.heads as u32, 1, 1], 0.0);
    // The content path with upstream (1 − g)·dO, then dV += g·Qposᵀ·dO.
    let dyc = g.tensor(format!("{label}.dyc"), rows * s.c);
    let pipeline = g.pipeline("gpsa", "scale_heads", &[("WG", WG as f64), ("D4", d4)])?;
    let b = bind([(gp::O, Res::Act(dyc)), (gp::PARAMS, prm), (gp::GATING, Res::Buf(p.gate.clone())), (gp::DOUT, Res::Act(dout))]);
    g.dispatch(format!("{label}.dyc"), pipeline, b, grid1d(&g.gpu, (rows * s.c / 4).div_ceil(WG) as u64), 0.0);
    let (dq, dk, dvc) = attention_backward(g, &format!("{label}.content"), (q, k, v, saved.yc), saved.attn, dyc, s.attn())?;
    let dv = mix(g, &format!("{label}.dv"), (dout, dvc, Res::Act(saved.qpos)), p, &s, None, true)?;
    Ok((dq, dk, dv))
}
