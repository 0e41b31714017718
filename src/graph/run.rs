//! Running a compiled plan: recording its steps into a command buffer, inputs
//! and outputs, per-step profiling (GPU timestamps or wall clock) and the launch
//! report.

use super::*;
use anyhow::bail;

impl Plan {
    fn buffer(&self, t: TensorId) -> &wgpu::Buffer {
        &self.slots[self.tensor_slot[t.0]]
    }

    /// Uploads `data` into tensor `t` (an input).
    pub fn write(&self, t: TensorId, data: &[f32]) -> Result<()> {
        if data.len() != self.tensor_len[t.0] {
            bail!("input has {} values, the plan expects {}", data.len(), self.tensor_len[t.0]);
        }
        if self.half {
            // Padded to whole 4-byte words, as buffer writes need.
            let mut h = crate::gpu::to_f16(data);
            h.resize(h.len().div_ceil(2) * 2, half::f16::ZERO);
            self.gpu.queue.write_buffer(self.buffer(t), 0, bytemuck::cast_slice(&h));
        } else {
            self.gpu.queue.write_buffer(self.buffer(t), 0, bytemuck::cast_slice(data));
        }
        Ok(())
    }

    /// A step's workgroups and invocations per workgroup (0, 0 for copies and clears).
    fn launch_of(&self, s: &Step) -> (u64, u64) {
        match &s.kind {
            StepKind::Dispatch { pipeline, groups, .. } => (groups.iter().map(|&g| g as u64).product(), self.gpu.workgroup_size_of(pipeline).iter().map(|&v| v as u64).product()),
            _ => (0, 0),
        }
    }

    /// Every dispatch with its launch shape, in order.
    pub fn launches(&self) -> Vec<Launch> {
        let launch = |s: &Step| match &s.kind {
            StepKind::Dispatch { pipeline, groups, .. } => {
                Some(Launch { label: s.label.clone(), workgroups: *groups, workgroup_size: self.gpu.workgroup_size_of(pipeline), flops: s.flops, bytes: s.bytes })
            }
            _ => None,
        };
        self.steps.iter().filter_map(launch).collect()
    }

    /// Records every step into one command buffer — dispatches in compute passes,
    /// texture copies between them — and submits it.
    pub fn run(&self) -> Result<()> {
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        self.encode(&mut enc, 0..self.steps.len());
        self.gpu.queue.submit([enc.finish()]);
        self.gpu.check_error()
    }

    /// Records steps `range` into `enc`: runs of dispatches share a compute
    /// pass; copies and clears go between passes. A plan run in pieces
    /// (`dist::exchange`, which submits the backward in segments) records its
    /// steps in order, each once.
    pub fn encode(&self, enc: &mut wgpu::CommandEncoder, range: std::ops::Range<usize>) {
        let mut i = range.start;
        while i < range.end {
            if !matches!(self.steps[i].kind, StepKind::Dispatch { .. }) {
                self.record_step(enc, &self.steps[i], None);
                i += 1;
                continue;
            }
            let mut pass = enc.begin_compute_pass(&Default::default());
            while i < range.end {
                let Step { kind: StepKind::Dispatch { pipeline, bind_group, groups }, .. } = &self.steps[i] else { break };
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, bind_group, &[]);
                pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
                i += 1;
            }
        }
    }

    /// The last step that binds (or copies from) `buf`, a buffer from outside
    /// the plan: after it, the plan no longer touches the buffer (a gradient
    /// is final). None when no step does.
    pub fn last_use(&self, buf: &Arc<wgpu::Buffer>) -> Option<usize> {
        let key = Arc::as_ptr(buf) as usize;
        self.steps.iter().rposition(|s| s.bufs.contains(&key))
    }

    /// Replays step `i` alone `n` times, one submit each, and waits (leak and
    /// timing probes: dev/dispatch_leaks.rs).
    pub fn run_one(&self, i: usize, n: usize) -> Result<()> {
        for _ in 0..n {
            let mut enc = self.gpu.device.create_command_encoder(&Default::default());
            self.record_step(&mut enc, &self.steps[i], None);
            self.gpu.queue.submit([enc.finish()]);
        }
        self.gpu.sync()
    }

    /// Elements of tensor `t`.
    pub fn len(&self, t: TensorId) -> usize {
        self.tensor_len[t.0]
    }

    /// Reads tensor `t` back (waits for submitted work).
    pub fn read(&self, t: TensorId) -> Result<Vec<f32>> {
        let n = self.tensor_len[t.0];
        if self.half {
            // f16 pairs read as f32 words, then reinterpreted.
            let words = self.gpu.read(self.buffer(t), 0, n.div_ceil(2))?;
            let h: &[half::f16] = bytemuck::cast_slice(&words);
            return Ok(h[..n].iter().map(|v| v.to_f32()).collect());
        }
        self.gpu.read(self.buffer(t), 0, n)
    }

    /// (dispatches, texture copies) recorded per run.
    pub fn counts(&self) -> (usize, usize) {
        let copies = self.steps.iter().filter(|s| matches!(s.kind, StepKind::Copy { .. })).count();
        let clears = self.steps.iter().filter(|s| matches!(s.kind, StepKind::Clear { .. })).count();
        (self.steps.len() - copies - clears, copies)
    }

    /// Total floating-point operations of one run (2 per multiply-add).
    pub fn flops(&self) -> f64 {
        self.steps.iter().map(|s| s.flops).sum()
    }
}

/// Time of one step, measured by `Plan::profile`.
pub struct StepTime {
    pub label: String,
    pub ms: f64,
    pub flops: f64,
    /// Bytes the step's bindings span (a traffic estimate for GB/s).
    pub bytes: u64,
    /// Workgroups launched and invocations per workgroup (0 for copies and clears).
    pub workgroups: u64,
    pub invocations: u64,
}

/// One dispatch of a plan as launched: for launch-shape reports (`bench --plan-only`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Launch {
    pub label: String,
    pub workgroups: [u32; 3],
    pub workgroup_size: [u32; 3],
    pub flops: f64,
    /// Bytes of the buffers the dispatch binds: an upper estimate of its traffic.
    pub bytes: u64,
}

impl Launch {
    pub fn groups(&self) -> u64 {
        self.workgroups.iter().map(|&v| v as u64).product()
    }

    pub fn invocations(&self) -> u64 {
        self.workgroup_size.iter().map(|&v| v as u64).product()
    }
}

/// How `Plan::profile` timed the steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Timing {
    /// GPU timestamps around each dispatch (its own compute pass).
    GpuTimestamps,
    /// Wall clock per step, each submitted alone (no timestamp queries).
    WallClock,
}

impl Plan {
    fn record_step(&self, enc: &mut wgpu::CommandEncoder, s: &Step, ts: Option<(&wgpu::QuerySet, u32)>) {
        match &s.kind {
            StepKind::Copy { from, offset, texture, width, height, y } => enc.copy_buffer_to_texture(
                wgpu::TexelCopyBufferInfo {
                    buffer: match from {
                        CopyFrom::Slot(slot) => &self.slots[*slot],
                        CopyFrom::Buf(b) => b,
                    },
                    layout: wgpu::TexelCopyBufferLayout {
                        offset: *offset,
                        bytes_per_row: (*height > 1).then_some(width * crate::gpu::texel_bytes(self.half) as u32),
                        rows_per_image: (*height > 1).then_some(*height),
                    },
                },
                wgpu::TexelCopyTextureInfo { texture: &self.textures[*texture], mip_level: 0, origin: wgpu::Origin3d { x: 0, y: *y, z: 0 }, aspect: wgpu::TextureAspect::All },
                wgpu::Extent3d { width: *width, height: *height, depth_or_array_layers: 1 },
            ),
            StepKind::Clear { slot, bytes } => enc.clear_buffer(&self.slots[*slot], 0, Some(*bytes)),
            StepKind::Dispatch { pipeline, bind_group, groups } => {
                let timestamp_writes = ts.map(|(query_set, i)| wgpu::ComputePassTimestampWrites { query_set, beginning_of_pass_write_index: Some(i), end_of_pass_write_index: Some(i + 1) });
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes });
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, bind_group, &[]);
                pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
            }
        }
    }

    /// Times every step: with GPU timestamp queries where the adapter has them
    /// (each dispatch in its own pass, one submit per chunk of steps), else by
    /// wall clock with each step submitted alone and waited for.
    pub fn profile(&self) -> Result<(Vec<StepTime>, Timing)> {
        if self.gpu.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            return Ok((self.profile_timestamps()?, Timing::GpuTimestamps));
        }
        let mut out = vec![];
        for s in &self.steps {
            let t = std::time::Instant::now();
            let mut enc = self.gpu.device.create_command_encoder(&Default::default());
            self.record_step(&mut enc, s, None);
            self.gpu.queue.submit([enc.finish()]);
            self.gpu.sync()?;
            let (workgroups, invocations) = self.launch_of(s);
            out.push(StepTime { label: s.label.clone(), ms: t.elapsed().as_secs_f64() * 1e3, flops: s.flops, bytes: s.bytes, workgroups, invocations });
        }
        Ok((out, Timing::WallClock))
    }

    fn profile_timestamps(&self) -> Result<Vec<StepTime>> {
        // wgpu caps a query set at 4096 queries: 2 per dispatch, in chunks.
        const CHUNK: usize = 2048;
        let period_ns = self.gpu.queue.get_timestamp_period() as f64;
        let mut out = vec![];
        for chunk in self.steps.chunks(CHUNK) {
            let n = (2 * chunk.len()) as u32;
            let qs = self.gpu.device.create_query_set(&wgpu::QuerySetDescriptor { label: Some("profile"), ty: wgpu::QueryType::Timestamp, count: n });
            let resolve = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile resolve"),
                size: 8 * n as u64,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let mut enc = self.gpu.device.create_command_encoder(&Default::default());
            let mut used = vec![];
            // Copies and clears are timed by timestamps between passes where the
            // adapter allows them (on CPU drivers a copy is a memcpy on one core).
            let between = self.gpu.features.contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS);
            for (i, s) in chunk.iter().enumerate() {
                let dispatch = matches!(s.kind, StepKind::Dispatch { .. });
                let q = 2 * i as u32;
                if dispatch || !between {
                    self.record_step(&mut enc, s, dispatch.then_some((&qs, q)));
                } else {
                    enc.write_timestamp(&qs, q);
                    self.record_step(&mut enc, s, None);
                    enc.write_timestamp(&qs, q + 1);
                }
                used.push(dispatch || between);
            }
            // Queries of steps not timed are never written; their values are ignored.
            enc.resolve_query_set(&qs, 0..n, &resolve, 0);
            let staging = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile readback"),
                size: 8 * n as u64,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            enc.copy_buffer_to_buffer(&resolve, 0, &staging, 0, 8 * n as u64);
            self.gpu.queue.submit([enc.finish()]);
            let raw = self.gpu.map_read(&staging, 8 * n as u64)?;
            let ticks: Vec<u64> = bytemuck::pod_collect_to_vec::<f32, u64>(&raw);
            for (i, s) in chunk.iter().enumerate() {
                let ms = if used[i] { ticks[2 * i + 1].saturating_sub(ticks[2 * i]) as f64 * period_ns / 1e6 } else { 0.0 };
                let (workgroups, invocations) = self.launch_of(s);
                out.push(StepTime { label: s.label.clone(), ms, flops: s.flops, bytes: s.bytes, workgroups, invocations });
            }
        }
        Ok(out)
    }
}
