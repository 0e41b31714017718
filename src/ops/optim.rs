//! `shaders/optim.wgsl`: AdamW on the GPU. Each parameter tensor gets one
//! recorded dispatch; the per-step hyper-parameters (learning rate, bias
//! corrections, clipping scale) are rewritten into a small buffer before a step.

use crate::gpu::Gpu;
use crate::graph::{bind, grid1d, Graph, Res};
use crate::ops::params::op;
use anyhow::Result;
use std::sync::Arc;

const WG: usize = 64;

crate::kernel_params! {
/// `optim.wgsl`'s `Params`, field by field.
pub struct OptimParams for "optim" "Params" {
    /// Values (vec4s in the vec4 entries) of the dispatch.
    pub n: u32,
    /// 1 where weight decay applies.
    pub decay: u32,
    /// adamw4_tex: the first vec4 of its chunk.
    pub chunk_off: u32,
    /// sumsq: the first output slot.
    pub slot: u32,
}
}

/// AdamW settings (torch.optim.AdamW's defaults but for the learning rate).
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// The per-step buffer: [lr, beta1, beta2, eps, wd, bc1, bc2, grad_scale].
pub struct Hyper {
    pub buf: Arc<wgpu::Buffer>,
}

impl Hyper {
    pub fn new(gpu: &Gpu) -> Result<Hyper> {
        let buf = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("adamw hyper-parameters"),
            size: 32,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(Hyper { buf: Arc::new(buf) })
    }

    /// Values for optimizer step `step` (1-based) at learning rate `lr`.
    pub fn set(&self, gpu: &Gpu, o: &AdamW, lr: f32, step: u64, grad_scale: f32) {
        let bc1 = 1.0 - (o.beta1 as f64).powi(step as i32);
        let bc2 = 1.0 - (o.beta2 as f64).powi(step as i32);
        let v = [lr, o.beta1, o.beta2, o.eps, o.weight_decay, bc1 as f32, bc2 as f32, grad_scale];
        gpu.queue.write_buffer(&self.buf, 0, bytemuck::cast_slice(&v));
    }
}

/// One parameter tensor's optimizer state: first and second moments.
pub struct Moments {
    pub m: Arc<wgpu::Buffer>,
    pub v: Arc<wgpu::Buffer>,
    pub len: usize,
}

impl Moments {
    pub fn zeros(gpu: &Gpu, name: &str, len: usize) -> Result<Moments> {
        let z = vec![0f32; len];
        Ok(Moments { m: Arc::new(gpu.upload(&format!("{name}.exp_avg"), &z)?), v: Arc::new(gpu.upload(&format!("{name}.exp_avg_sq"), &z)?), len })
    }
}

/// Tensors of at least this many vec4s read their AdamW inputs from textures on
/// texture-preferring adapters; for smaller ones (biases, norms) four copies
/// cost more than the loads they save.
const TEX_MIN_VEC4: usize = 4096;

/// Appends the AdamW update of `param` (len elements) from `grad`.
pub fn adamw_step(g: &mut Graph, label: &str, param: &Arc<wgpu::Buffer>, grad: &Arc<wgpu::Buffer>, state: &Moments, hyper: &Hyper, decay: bool) -> Result<()> {
    // Four values per invocation when the length allows (bindings 7-10 view the
    // same buffers as vec4).
    let vec4 = state.len % 4 == 0;
    let n = if vec4 { state.len / 4 } else { state.len };
    let buf = |b: &Arc<wgpu::Buffer>| Res::Buf(b.clone());
    let prm = |n: usize, chunk_off: usize| Res::uniform(&OptimParams { n: n as u32, decay: decay as u32, chunk_off: chunk_off as u32, slot: 0 });
    if vec4 && n >= TEX_MIN_VEC4 && crate::ops::matmul::packs(g) {
        // Inputs through linear textures, a chunk of at most TEXTURE_CHUNK_BYTES each.
        let pipeline = g.pipeline("optim", "adamw4_tex", &[("WG", WG as f64)])?;
        for (i0, m) in crate::ops::gemm::texture_ranges(n, 16) {
            let mut b = vec![(op::HYPER, buf(&hyper.buf)), (op::PARAMS, prm(m, i0)), (op::PARAM4, buf(param)), (op::M14, buf(&state.m)), (op::M24, buf(&state.v))];
            for (slot, src) in [(op::W_TEX, param), (op::G_TEX, grad), (op::M_TEX, &state.m), (op::V_TEX, &state.v)] {
                b.push((slot, Res::ActTex(g.linear_texture_buf(src, i0, m, slot as u32))));
            }
            g.dispatch(format!("adamw {label}"), pipeline.clone(), bind(b), grid1d(&g.gpu, m.div_ceil(WG) as u64), 0.0);
        }
        return Ok(());
    }
    let pipeline = g.pipeline("optim", if vec4 { "adamw4" } else { "adamw" }, &[("WG", WG as f64)])?;
    let groups = grid1d(&g.gpu, n.div_ceil(WG) as u64);
    let slots = if vec4 { [op::PARAM4, op::GRAD4, op::M14, op::M24] } else { [op::PARAM, op::GRAD, op::M1, op::M2] };
    let mut b: Vec<(usize, Res)> = slots.into_iter().zip([param, grad, &state.m, &state.v].map(buf)).collect();
    b.extend([(op::HYPER, buf(&hyper.buf)), (op::PARAMS, prm(n, 0))]);
    g.dispatch(format!("adamw {label}"), pipeline, bind(b), groups, 0.0);
    Ok(())
}

/// Output slots `sumsq` takes for a tensor of `len` values: a workgroup per 16
/// values per invocation, at most 64 (so a large tensor fills a GPU, and the host
/// adds few partials).
pub fn sumsq_slots(len: usize) -> usize {
    len.div_ceil(WG * 16).clamp(1, 64)
}

/// Appends Σ grad² of `grad` (len elements) as `sumsq_slots(len)` partial sums
/// into `norms[slot..]`.
pub fn sumsq(g: &mut Graph, label: &str, grad: &Arc<wgpu::Buffer>, len: usize, norms: &Arc<wgpu::Buffer>, slot: usize) -> Result<()> {
    let pipeline = g.pipeline("optim", "sumsq", &[("WG", WG as f64)])?;
    let p = OptimParams { n: len as u32, slot: slot as u32, ..Default::default() };
    let b = bind([(op::GRAD, Res::Buf(grad.clone())), (op::PARAMS, Res::uniform(&p)), (op::NORMS, Res::Buf(norms.clone()))]);
    g.dispatch(format!("{label}.sumsq"), pipeline, b, [sumsq_slots(len) as u32, 1, 1], 0.0);
    Ok(())
}

/// Appends the accumulation of `grad` (len values) into `acc`: acc = grad when
/// `first` (a step's first micro-batch), else acc += grad.
pub fn accumulate(g: &mut Graph, label: &str, grad: &Arc<wgpu::Buffer>, acc: &Arc<wgpu::Buffer>, len: usize, first: bool) -> Result<()> {
    let pipeline = g.pipeline("optim", "accumulate", &[("WG", WG as f64), ("FIRST", first as u8 as f64)])?;
    let p = OptimParams { n: len as u32, ..Default::default() };
    let b = bind([(op::GRAD, Res::Buf(grad.clone())), (op::M1, Res::Buf(acc.clone())), (op::PARAMS, Res::uniform(&p))]);
    g.dispatch(format!("{label}.accumulate"), pipeline, b, grid1d(&g.gpu, len.div_ceil(WG) as u64), len as f64);
    Ok(())
}
