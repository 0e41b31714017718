//! What every model family's training shares: the parameter list the optimizer
//! walks (`Param`), AdamW over it with the clipping norm (`Optimizer`), and one
//! compiled forward + backward (`StepPlan`).

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::sync::Arc;

use crate::gpu::Gpu;
use crate::graph::{Graph, Plan, TensorId};
use crate::ops::optim::{adamw_step, sumsq, sumsq_slots, AdamW, Hyper, Moments};

/// One compiled training step (forward + backward) for a batch shape.
pub struct StepPlan {
    pub plan: Plan,
    pub batch: usize,
    pub(crate) images: TensorId,
    pub(crate) targets: TensorId,
    pub(crate) loss: TensorId,
    pub(crate) logits: TensorId,
    /// Per-step drop-path scales [block][branch (attention, MLP)][sample], when any rate > 0.
    pub(crate) drop_scales: Option<TensorId>,
}

/// A parameter tensor as the optimizer sees it.
pub struct Param {
    pub name: String,
    pub value: Arc<wgpu::Buffer>,
    pub grad: Arc<wgpu::Buffer>,
    pub len: usize,
    /// Weight decay applies (not to norms, biases and the cls token, as the official recipe).
    pub decay: bool,
}

/// A parameter's gradient (what the step plan writes) and the accumulator
/// the optimizer reads, which sums it over a step's micro-batches.
#[derive(Clone)]
pub struct Accumulator {
    pub name: String,
    pub grad: Arc<wgpu::Buffer>,
    pub sum: Arc<wgpu::Buffer>,
    pub len: usize,
}

/// AdamW over every parameter, recorded once and replayed each step.
pub struct Optimizer {
    pub plan: Plan,
    pub hyper: Hyper,
    pub settings: AdamW,
    pub step: u64,
    /// (parameter name, moments), in `TrainModel::params` order.
    state: Vec<(String, Moments)>,
    /// Σ grad² per parameter, for clipping: its plan and output buffer.
    norm_plan: Plan,
    norms: Arc<wgpu::Buffer>,
    /// Partial sums in `norms` (`optim::sumsq_slots` per parameter).
    norm_slots: usize,
    /// Gradient accumulation (`with_accumulation`): the plans that copy
    /// (a step's first micro-batch) or add every gradient into its accumulator,
    /// which AdamW and the clipping norm then read.
    accum: Option<(Plan, Plan)>,
    /// With accumulation, each parameter's gradient and its accumulator, in
    /// parameter order (`dist::exchange` accumulates by bucket).
    accumulators: Vec<Accumulator>,
    /// What the update reads as each parameter's gradient, and its length.
    grads: Vec<(Arc<wgpu::Buffer>, usize)>,
}

impl Optimizer {
    /// AdamW over `params`, recorded once and replayed each step, with the
    /// clipping norm's plan.
    pub fn new(gpu: &Arc<Gpu>, params: Vec<Param>, settings: AdamW) -> Result<Optimizer> {
        Self::with_accumulation(gpu, params, settings, false)
    }

    /// As `new`; with `accumulate`, every parameter gets an accumulator that
    /// `accumulate` fills from the gradients of each micro-batch, and the update
    /// and the clipping norm read it instead of the last gradient.
    pub fn with_accumulation(gpu: &Arc<Gpu>, mut params: Vec<Param>, settings: AdamW, accumulate: bool) -> Result<Optimizer> {
        let mut accumulators = vec![];
        let accum = if accumulate {
            for p in params.iter_mut() {
                let sum = Arc::new(gpu.storage(&format!("{}.grad_sum", p.name), (p.len * 4) as u64)?);
                accumulators.push(Accumulator { name: p.name.clone(), grad: std::mem::replace(&mut p.grad, sum.clone()), sum, len: p.len });
            }
            Some((accumulate_plan(gpu, &accumulators, true)?, accumulate_plan(gpu, &accumulators, false)?))
        } else {
            None
        };
        let hyper = Hyper::new(gpu)?;
        let mut g = Graph::new(gpu.clone());
        let mut state = vec![];
        let norm_slots: usize = params.iter().map(|p| sumsq_slots(p.len)).sum();
        let norms = Arc::new(gpu.storage("gradient norms", (norm_slots.max(1) * 4) as u64)?);
        let mut ng = Graph::new(gpu.clone());
        let mut slot = 0;
        let grads = params.iter().map(|p| (p.grad.clone(), p.len)).collect();
        for p in params {
            let m = Moments::zeros(gpu, &p.name, p.len)?;
            adamw_step(&mut g, &p.name, &p.value, &p.grad, &m, &hyper, p.decay)?;
            sumsq(&mut ng, &p.name, &p.grad, p.len, &norms, slot)?;
            slot += sumsq_slots(p.len);
            state.push((p.name, m));
        }
        Ok(Optimizer { plan: g.compile()?, hyper, settings, step: 0, state, norm_plan: ng.compile()?, norms, norm_slots, accum, accumulators, grads })
    }

    /// Each parameter's gradient and accumulator (empty without accumulation).
    pub fn accumulators(&self) -> &[Accumulator] {
        &self.accumulators
    }

    /// The buffers the update reads as gradients (the accumulators, with
    /// accumulation), with their lengths, in parameter order.
    pub fn gradient_buffers(&self) -> Vec<(Arc<wgpu::Buffer>, usize)> {
        self.grads.clone()
    }

    /// Adds the gradients of the last `StepPlan::run` into the accumulators
    /// (`first`: they start the step's sum). An error without accumulation.
    pub fn accumulate(&self, first: bool) -> Result<()> {
        match &self.accum {
            Some((f, a)) => {
                if first {
                    f.run()
                } else {
                    a.run()
                }
            }
            None => anyhow::bail!("internal: this optimizer does not accumulate gradients"),
        }
    }

    /// One update at learning rate `lr` (gradients of the last `StepPlan::run`).
    pub fn update(&mut self, lr: f32) -> Result<()> {
        self.update_scaled(lr, 1.0)
    }

    /// One update with the gradients multiplied by `grad_scale` (clipping).
    pub fn update_scaled(&mut self, lr: f32, grad_scale: f32) -> Result<()> {
        self.step += 1;
        self.hyper.set(&self.plan.gpu, &self.settings, lr, self.step, grad_scale);
        self.plan.run()
    }

    /// The global L2 norm of all gradients (waits for the GPU).
    pub fn grad_norm(&self) -> Result<f32> {
        self.norm_plan.run()?;
        let v = self.norm_plan.gpu.read(&self.norms, 0, self.norm_slots)?;
        Ok(v.iter().map(|&x| x as f64).sum::<f64>().sqrt() as f32)
    }

    /// First and second moments of every parameter (storage layout), by name.
    pub fn state(&self) -> Result<Vec<(String, Vec<f32>, Vec<f32>)>> {
        let gpu = &self.plan.gpu;
        self.state.iter().map(|(n, m)| Ok((n.clone(), gpu.read(&m.m, 0, m.len)?, gpu.read(&m.v, 0, m.len)?))).collect()
    }

    /// Restores moments saved by `state` (keys `<name>.exp_avg`, `<name>.exp_avg_sq`).
    pub fn load_state(&mut self, t: &HashMap<String, Vec<f32>>) -> Result<()> {
        let gpu = &self.plan.gpu;
        for (n, m) in &self.state {
            for (suffix, buf) in [("exp_avg", &m.m), ("exp_avg_sq", &m.v)] {
                let key = format!("{n}.{suffix}");
                let v = t.get(&key).with_context(|| format!("checkpoint has no optimizer state {key}"))?;
                anyhow::ensure!(v.len() == m.len, "optimizer state {key} has {} values, expected {}", v.len(), m.len);
                gpu.queue.write_buffer(buf, 0, bytemuck::cast_slice(v));
            }
        }
        Ok(())
    }
}

/// The plan that adds the gradients of `accs` into their accumulators (`first`:
/// copies them, starting a step's sum).
pub fn accumulate_plan<'a>(gpu: &Arc<Gpu>, accs: impl IntoIterator<Item = &'a Accumulator>, first: bool) -> Result<Plan> {
    let mut g = Graph::new(gpu.clone());
    for a in accs {
        crate::ops::optim::accumulate(&mut g, &a.name, &a.grad, &a.sum, a.len, first)?;
    }
    g.compile()
}

impl StepPlan {
    /// Number of drop-path scales a step takes (0 when drop path is off):
    /// [block][attention, MLP][sample].
    pub fn drop_scale_len(&self) -> usize {
        self.drop_scales.map(|t| self.plan.len(t)).unwrap_or(0)
    }

    /// Sets this step's drop-path scales (see `drop_scale_len`); `rates` per block.
    pub fn set_drop_path(&self, rates: &[f32], rng: &mut crate::util::Rng) -> Result<()> {
        if let Some(t) = self.drop_scales {
            let mut v = Vec::with_capacity(self.plan.len(t));
            for &r in rates {
                for _ in 0..2 * self.batch {
                    v.push(if r > 0.0 {
                        if rng.uniform() < r {
                            0.0
                        } else {
                            1.0 / (1.0 - r)
                        }
                    } else {
                        1.0
                    });
                }
            }
            self.plan.write(t, &v)?;
        }
        Ok(())
    }

    /// Writes explicit drop-path scales (tests).
    pub fn write_drop_scales(&self, v: &[f32]) -> Result<()> {
        match self.drop_scales {
            Some(t) => self.plan.write(t, v),
            None => anyhow::bail!("this plan has no drop path"),
        }
    }

    /// Runs forward + backward on NHWC images and soft targets; returns (mean loss, logits).
    pub fn run(&self, images: &[f32], targets: &[f32]) -> Result<(f32, Vec<f32>)> {
        self.write_inputs(images, targets)?;
        self.plan.run()?;
        self.results()
    }

    /// Uploads a step's NHWC images and soft targets (`run` does it; a plan
    /// run in segments, `dist::exchange`, calls it first).
    pub fn write_inputs(&self, images: &[f32], targets: &[f32]) -> Result<()> {
        self.plan.write(self.images, images)?;
        self.plan.write(self.targets, targets)
    }

    /// The mean loss and the logits of the last run (waits for it).
    pub fn results(&self) -> Result<(f32, Vec<f32>)> {
        let losses = self.plan.read(self.loss)?;
        Ok((losses.iter().sum::<f32>() / self.batch as f32, self.plan.read(self.logits)?))
    }
}
