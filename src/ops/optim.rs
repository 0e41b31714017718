//! `shaders/optim.wgsl`: AdamW on the GPU. Each parameter tensor gets one
//! recorded dispatch; the per-step hyper-parameters (learning rate, bias
//! corrections, clipping scale) are rewritten into a small buffer before a step.

use crate::gpu::Gpu;
use crate::graph::{grid1d, Graph, Res};
use anyhow::Result;
use std::sync::Arc;

const WG: usize = 64;

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
    if vec4 && n >= TEX_MIN_VEC4 && crate::ops::matmul::packs(g) {
        // Inputs through linear textures, a chunk of at most TEXTURE_CHUNK_BYTES each.
        let pipeline = g.pipeline("optim", "adamw4_tex", &[("WG", WG as f64)])?;
        let u = || Res::Unused;
        for (i0, m) in crate::ops::gemm::texture_ranges(n, 16) {
            let mut b = vec![u(), u(), u(), u(), Res::Buf(hyper.buf.clone()), Res::Uniform(vec![m as u32, decay as u32, i0 as u32, 0]), u()];
            b.extend([Res::Buf(param.clone()), u(), Res::Buf(state.m.clone()), Res::Buf(state.v.clone())]);
            for (k, src) in [param, grad, &state.m, &state.v].into_iter().enumerate() {
                b.push(Res::ActTex(g.linear_texture_buf(src, i0, m, 11 + k as u32)));
            }
            g.dispatch(format!("adamw {label}"), pipeline.clone(), b, grid1d(&g.gpu, m.div_ceil(WG) as u64), 0.0);
        }
        return Ok(());
    }
    let pipeline = g.pipeline("optim", if vec4 { "adamw4" } else { "adamw" }, &[("WG", WG as f64)])?;
    let groups = grid1d(&g.gpu, n.div_ceil(WG) as u64);
    let bufs = [param, grad, &state.m, &state.v].map(|b| Res::Buf(b.clone()));
    let u = || Res::Unused;
    let mut b = if vec4 { vec![u(), u(), u(), u()] } else { bufs.to_vec() };
    b.extend([Res::Buf(hyper.buf.clone()), Res::Uniform(vec![n as u32, decay as u32, 0, 0])]);
    if vec4 {
        b.push(u());
        b.extend(bufs);
    }
    g.dispatch(format!("adamw {label}"), pipeline, b, groups, 0.0);
    Ok(())
}

/// Appends Σ grad² of `grad` (len elements) into `norms[slot]`.
pub fn sumsq(g: &mut Graph, label: &str, grad: &Arc<wgpu::Buffer>, len: usize, norms: &Arc<wgpu::Buffer>, slot: usize) -> Result<()> {
    let pipeline = g.pipeline("optim", "sumsq", &[("WG", WG as f64)])?;
    g.dispatch(
        format!("{label}.sumsq"),
        pipeline,
        vec![Res::Unused, Res::Buf(grad.clone()), Res::Unused, Res::Unused, Res::Unused, Res::Uniform(vec![len as u32, slot as u32, 0, 0]), Res::Buf(norms.clone())],
        [1, 1, 1],
        0.0,
    );
    Ok(())
}
