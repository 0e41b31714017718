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
        Ok(Hyper { buf: Arc::new(gpu.storage("adamw hyper-parameters", 32)?) })
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

/// Appends the AdamW update of `param` (len elements) from `grad`.
pub fn adamw_step(g: &mut Graph, label: &str, param: &Arc<wgpu::Buffer>, grad: &Arc<wgpu::Buffer>, state: &Moments, hyper: &Hyper, decay: bool) -> Result<()> {
    let pipeline = g.gpu.pipeline("optim", "adamw", &[("WG", WG as f64)])?;
    let groups = grid1d(&g.gpu, state.len.div_ceil(WG) as u64);
    g.dispatch(
        format!("adamw {label}"),
        pipeline,
        vec![
            Res::Buf(param.clone()),
            Res::Buf(grad.clone()),
            Res::Buf(state.m.clone()),
            Res::Buf(state.v.clone()),
            Res::Buf(hyper.buf.clone()),
            Res::Uniform(vec![state.len as u32, decay as u32, 0, 0]),
        ],
        groups,
        0.0,
    );
    Ok(())
}

/// Appends Σ grad² of `grad` (len elements) into `norms[slot]`.
pub fn sumsq(g: &mut Graph, label: &str, grad: &Arc<wgpu::Buffer>, len: usize, norms: &Arc<wgpu::Buffer>, slot: usize) -> Result<()> {
    let pipeline = g.gpu.pipeline("optim", "sumsq", &[("WG", WG as f64)])?;
    g.dispatch(
        format!("{label}.sumsq"),
        pipeline,
        vec![Res::Unused, Res::Buf(grad.clone()), Res::Unused, Res::Unused, Res::Unused, Res::Uniform(vec![len as u32, slot as u32, 0, 0]), Res::Buf(norms.clone())],
        [1, 1, 1],
        0.0,
    );
    Ok(())
}
