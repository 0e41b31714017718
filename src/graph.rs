//! The graph runner.
//!
//! A model is built once per (model, batch, resolution) as a list of kernel
//! dispatches over symbolic activation tensors (`Graph`). `Graph::compile` then
//! plans memory by liveness: walking the ops in order, a tensor takes a buffer when
//! it is first used and returns it after its last use, so activations that are
//! never alive at the same time share memory. Buffers, uniforms and bind groups are
//! created once; `Plan::run` only re-records the same dispatches into one command
//! buffer (wgpu has no reusable compute bundles) and submits it, with no readback
//! until the caller asks for an output.

use crate::gpu::Gpu;
use anyhow::{bail, Result};
use std::sync::Arc;

/// A tensor that does not fit in one storage binding on this adapter. Callers
/// that can split the work (smaller batch) look for this error.
#[derive(Debug)]
pub struct TooLarge {
    pub tensor: String,
    pub bytes: u64,
    pub limit: u64,
}

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "tensor {} needs {} MiB, over this adapter's storage binding limit of {} MiB; use a smaller batch or resolution",
            self.tensor,
            self.bytes >> 20,
            self.limit >> 20
        )
    }
}

impl std::error::Error for TooLarge {}

/// A symbolic activation tensor of a `Graph`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TensorId(usize);

/// What one binding of a dispatch refers to.
pub enum Res {
    /// An activation tensor, placed by the memory plan.
    Act(TensorId),
    /// A buffer that outlives the plan (weights).
    Buf(Arc<wgpu::Buffer>),
    /// Kernel parameters, uploaded once as a uniform buffer.
    Uniform(Vec<u32>),
    /// A binding index the entry point does not use (its family's other entry
    /// points do).
    Unused,
}

struct TensorMeta {
    name: String,
    /// Elements (f32).
    len: usize,
    /// Pinned tensors (inputs, outputs) keep their own buffer for the plan's life.
    pinned: bool,
}

struct OpRec {
    label: String,
    pipeline: Arc<wgpu::ComputePipeline>,
    bindings: Vec<Res>,
    groups: [u32; 3],
    flops: f64,
}

/// A model under construction: tensors and the ordered dispatches over them.
pub struct Graph {
    pub gpu: Arc<Gpu>,
    tensors: Vec<TensorMeta>,
    ops: Vec<OpRec>,
}

/// One recorded dispatch of a compiled plan.
pub struct Step {
    pub label: String,
    pub flops: f64,
    pipeline: Arc<wgpu::ComputePipeline>,
    bind_group: wgpu::BindGroup,
    groups: [u32; 3],
}

/// A compiled graph: buffers allocated, bind groups built, ready to run.
pub struct Plan {
    pub gpu: Arc<Gpu>,
    pub steps: Vec<Step>,
    slots: Vec<wgpu::Buffer>,
    tensor_slot: Vec<usize>,
    tensor_len: Vec<usize>,
    /// Bytes of all activation buffers (the plan's activation footprint).
    pub activation_bytes: u64,
    /// Bytes all tensors would take with no sharing, for comparison.
    pub unshared_bytes: u64,
}

/// Splits a 1-D count of workgroups into a 2-D grid within the device's
/// per-dimension limit; kernels recover the index as `wid.y * nwg.x + wid.x`.
pub fn grid1d(gpu: &Gpu, groups: u64) -> [u32; 3] {
    let max = gpu.limits.max_compute_workgroups_per_dimension as u64;
    if groups <= max {
        [groups.max(1) as u32, 1, 1]
    } else {
        let y = groups.div_ceil(max);
        [groups.div_ceil(y) as u32, y as u32, 1]
    }
}

impl Graph {
    pub fn new(gpu: Arc<Gpu>) -> Self {
        Graph { gpu, tensors: vec![], ops: vec![] }
    }

    /// A new intermediate tensor of `len` f32.
    pub fn tensor(&mut self, name: impl Into<String>, len: usize) -> TensorId {
        self.tensors.push(TensorMeta { name: name.into(), len, pinned: false });
        TensorId(self.tensors.len() - 1)
    }

    /// A tensor with its own buffer for the plan's life: graph inputs and outputs.
    pub fn pinned(&mut self, name: impl Into<String>, len: usize) -> TensorId {
        let t = self.tensor(name, len);
        self.tensors[t.0].pinned = true;
        t
    }

    pub fn len(&self, t: TensorId) -> usize {
        self.tensors[t.0].len
    }

    /// Appends a dispatch. Bindings are in binding-index order (0, 1, ...).
    pub fn dispatch(
        &mut self,
        label: impl Into<String>,
        pipeline: Arc<wgpu::ComputePipeline>,
        bindings: Vec<Res>,
        groups: [u32; 3],
        flops: f64,
    ) {
        self.ops.push(OpRec { label: label.into(), pipeline, bindings, groups, flops });
    }

    /// Plans memory by liveness and creates every buffer and bind group.
    pub fn compile(self) -> Result<Plan> {
        let gpu = self.gpu.clone();
        let n = self.tensors.len();
        let max_groups = gpu.limits.max_compute_workgroups_per_dimension;
        let (mut first, mut last) = (vec![usize::MAX; n], vec![0usize; n]);
        for (i, op) in self.ops.iter().enumerate() {
            if op.groups.iter().any(|&g| g > max_groups) {
                bail!(
                    "{}: dispatch {:?} exceeds this adapter's {} workgroups per dimension; use a smaller batch",
                    op.label, op.groups, max_groups
                );
            }
            for r in &op.bindings {
                if let Res::Act(t) = r {
                    first[t.0] = first[t.0].min(i);
                    last[t.0] = i;
                }
            }
        }
        // Slot assignment: best fit among free slots, else grow the largest free
        // one, else open a new slot. Pinned tensors get a slot never freed.
        let bytes = |t: usize| ((self.tensors[t].len.max(1) * 4) as u64).div_ceil(16) * 16;
        let mut slot_size: Vec<u64> = vec![];
        let mut slot_free: Vec<bool> = vec![];
        let mut tensor_slot = vec![usize::MAX; n];
        let mut starting: Vec<Vec<usize>> = vec![vec![]; self.ops.len()];
        let mut ending: Vec<Vec<usize>> = vec![vec![]; self.ops.len()];
        for t in 0..n {
            if self.tensors[t].pinned || first[t] == usize::MAX {
                slot_size.push(bytes(t));
                slot_free.push(false);
                tensor_slot[t] = slot_size.len() - 1;
            } else {
                starting[first[t]].push(t);
                ending[last[t]].push(t);
            }
        }
        for i in 0..self.ops.len() {
            for &t in &starting[i] {
                let need = bytes(t);
                let fit = (0..slot_size.len())
                    .filter(|&s| slot_free[s] && slot_size[s] >= need)
                    .min_by_key(|&s| slot_size[s]);
                let s = match fit {
                    Some(s) => s,
                    None => match (0..slot_size.len()).filter(|&s| slot_free[s]).max_by_key(|&s| slot_size[s]) {
                        Some(s) => {
                            slot_size[s] = need;
                            s
                        }
                        None => {
                            slot_size.push(need);
                            slot_free.push(true);
                            slot_size.len() - 1
                        }
                    },
                };
                slot_free[s] = false;
                tensor_slot[t] = s;
            }
            for &t in &ending[i] {
                slot_free[tensor_slot[t]] = true;
            }
        }
        for t in 0..n {
            if bytes(t) > gpu.max_binding() {
                return Err(TooLarge { tensor: self.tensors[t].name.clone(), bytes: bytes(t), limit: gpu.max_binding() }.into());
            }
        }
        let slots: Vec<wgpu::Buffer> = slot_size
            .iter()
            .enumerate()
            .map(|(i, &s)| gpu.storage(&format!("activation slot {i}"), s))
            .collect::<Result<_>>()?;
        let mut steps = Vec::with_capacity(self.ops.len());
        for op in self.ops {
            let uniforms: Vec<Option<wgpu::Buffer>> = op
                .bindings
                .iter()
                .map(|r| match r {
                    Res::Uniform(w) => Some(gpu.uniform(&op.label, w)),
                    _ => None,
                })
                .collect();
            let entries: Vec<wgpu::BindGroupEntry> = op
                .bindings
                .iter()
                .enumerate()
                .filter(|(_, r)| !matches!(r, Res::Unused))
                .map(|(i, r)| wgpu::BindGroupEntry {
                    binding: i as u32,
                    resource: match r {
                        Res::Act(t) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &slots[tensor_slot[t.0]],
                            offset: 0,
                            size: std::num::NonZeroU64::new(bytes(t.0)),
                        }),
                        Res::Buf(b) => b.as_entire_binding(),
                        Res::Uniform(_) => uniforms[i].as_ref().unwrap().as_entire_binding(),
                        Res::Unused => unreachable!(),
                    },
                })
                .collect();
            let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(&op.label),
                layout: &op.pipeline.get_bind_group_layout(0),
                entries: &entries,
            });
            gpu.check_error()?;
            steps.push(Step {
                label: op.label,
                flops: op.flops,
                pipeline: op.pipeline,
                bind_group,
                groups: op.groups,
            });
        }
        Ok(Plan {
            activation_bytes: slot_size.iter().sum(),
            unshared_bytes: (0..n).map(bytes).sum(),
            gpu,
            steps,
            slots,
            tensor_slot,
            tensor_len: self.tensors.iter().map(|t| t.len).collect(),
        })
    }
}

impl Plan {
    fn buffer(&self, t: TensorId) -> &wgpu::Buffer {
        &self.slots[self.tensor_slot[t.0]]
    }

    /// Uploads `data` into tensor `t` (an input).
    pub fn write(&self, t: TensorId, data: &[f32]) -> Result<()> {
        if data.len() != self.tensor_len[t.0] {
            bail!("input has {} values, the plan expects {}", data.len(), self.tensor_len[t.0]);
        }
        self.gpu.queue.write_buffer(self.buffer(t), 0, bytemuck::cast_slice(data));
        Ok(())
    }

    /// Records every step into one compute pass and submits it.
    pub fn run(&self) -> Result<()> {
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            for s in &self.steps {
                pass.set_pipeline(&s.pipeline);
                pass.set_bind_group(0, &s.bind_group, &[]);
                pass.dispatch_workgroups(s.groups[0], s.groups[1], s.groups[2]);
            }
        }
        self.gpu.queue.submit([enc.finish()]);
        self.gpu.check_error()
    }

    /// Reads tensor `t` back (waits for submitted work).
    pub fn read(&self, t: TensorId) -> Result<Vec<f32>> {
        self.gpu.read(self.buffer(t), 0, self.tensor_len[t.0])
    }

    /// Total floating-point operations of one run (2 per multiply-add).
    pub fn flops(&self) -> f64 {
        self.steps.iter().map(|s| s.flops).sum()
    }
}
