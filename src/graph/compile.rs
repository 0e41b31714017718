//! `Graph::compile`: plans memory by liveness (`slots`), checks every tensor and
//! dispatch against the device's limits, and creates buffers, textures, uniforms
//! and bind groups once.

use super::slots::{plan_slots, SlotPlan, SlotTensor};
use super::*;
use anyhow::{bail, Context};

impl Graph {
    /// `CVT_GPU_TRACE_MEMORY=1`: the slot plan's total against the live set, and
    /// the tensors alive at the step where the most bytes are.
    fn trace_memory(&self, tensors: &[SlotTensor], slot_size: &[u64]) {
        let mib = |b: u64| b as f64 / 1048576.0;
        let live_at = |i: usize| tensors.iter().enumerate().filter(move |(_, t)| t.span.is_none_or(|(a, b)| a <= i && i <= b));
        let peak = (0..self.ops.len()).max_by_key(|&i| live_at(i).map(|(_, t)| t.bytes).sum::<u64>()).unwrap_or(0);
        let mut live: Vec<(u64, &str)> = live_at(peak).map(|(k, t)| (t.bytes, self.tensors[k].name.as_str())).collect();
        live.sort_by(|a, b| b.cmp(a));
        let total: u64 = live.iter().map(|l| l.0).sum();
        eprintln!("plan: {} slots, {:.2} MiB; most live at step {peak}: {:.2} MiB in {} tensors", slot_size.len(), mib(slot_size.iter().sum()), mib(total), live.len());
        for (b, name) in live.iter().take(12) {
            eprintln!("  {:8.2} MiB  {name}", mib(*b));
        }
    }

    /// Plans memory by liveness and creates every buffer, texture and bind group.
    pub fn compile(self) -> Result<Plan> {
        let gpu = self.gpu.clone();
        let n = self.tensors.len();
        let max_groups = gpu.limits.max_compute_workgroups_per_dimension;
        let (mut first, mut last) = (vec![usize::MAX; n], vec![0usize; n]);
        for (i, op) in self.ops.iter().enumerate() {
            if let OpRec::Dispatch { label, groups, .. } = op {
                if groups.iter().any(|&g| g > max_groups) {
                    bail!("{label}: dispatch {groups:?} exceeds this adapter's {max_groups} workgroups per dimension; use a smaller batch");
                }
            }
            for t in op.acts() {
                first[t.0] = first[t.0].min(i);
                last[t.0] = i;
            }
        }
        let (elem, texel) = (self.elem_bytes(), self.texel_bytes());
        let format = crate::gpu::tex_format(self.half);
        let bytes = |t: usize| ((self.tensors[t].len.max(1) * elem) as u64).div_ceil(16) * 16;
        let tensors: Vec<SlotTensor> = (0..n).map(|t| SlotTensor { bytes: bytes(t), span: (first[t] != usize::MAX && !self.tensors[t].pinned).then(|| (first[t], last[t])) }).collect();
        let SlotPlan { slot_size, tensor_slot, max_live } = plan_slots(&tensors);
        if crate::profile::settings::get().trace_memory {
            self.trace_memory(&tensors, &slot_size);
        }
        for t in 0..n {
            if bytes(t) > gpu.max_binding() {
                return Err(TooLarge { tensor: self.tensors[t].name.clone(), bytes: bytes(t), limit: gpu.max_binding() }.into());
            }
        }
        let slots: Vec<wgpu::Buffer> = slot_size.iter().enumerate().map(|(i, &s)| gpu.storage(&format!("activation slot {i}"), s)).collect::<Result<_>>()?;
        // Linear textures of one binding all take the widest one's width (kernels
        // read the width from the texture), so they share a single texture.
        let mut lin_w: HashMap<u32, u32> = HashMap::new();
        let mut lin_texels: HashMap<u32, usize> = HashMap::new();
        for op in &self.ops {
            if let OpRec::Copy { tex, texels: Some(n), .. } = op {
                let w = lin_w.entry(tex.binding).or_insert(0);
                *w = (*w).max(tex.width);
                lin_texels.insert(tex.fill, *n);
            }
        }
        let relink = |t: &mut TexRef| {
            if let Some(&n) = lin_texels.get(&t.fill) {
                t.width = lin_w[&t.binding];
                t.height = n.div_ceil(t.width as usize).max(1) as u32;
            }
        };
        let mut ops = self.ops;
        for op in &mut ops {
            match op {
                OpRec::Copy { tex, .. } => relink(tex),
                OpRec::Dispatch { bindings, .. } => bindings.iter_mut().for_each(|r| {
                    if let Res::ActTex(t) | Res::OutTex(t) = r {
                        relink(t)
                    }
                }),
                OpRec::Clear { .. } => {}
            }
        }
        // One texture per (binding, width), as tall as its tallest filling; check
        // that every use reads the latest filling of its texture.
        let mut tex_sizes: Vec<TexRef> = vec![];
        let mut last_fill: HashMap<(u32, u32, bool), u32> = HashMap::new();
        for op in &ops {
            let (filled, used): (Vec<TexRef>, Vec<TexRef>) = match op {
                OpRec::Copy { tex, .. } => (vec![*tex], vec![]),
                OpRec::Dispatch { bindings, .. } => (
                    bindings.iter().filter_map(|r| if let Res::OutTex(t) = r { Some(*t) } else { None }).collect(),
                    bindings.iter().filter_map(|r| if let Res::ActTex(t) = r { Some(*t) } else { None }).collect(),
                ),
                OpRec::Clear { .. } => (vec![], vec![]),
            };
            for t in &used {
                if last_fill.get(&t.key()) != Some(&t.fill) {
                    bail!("internal: texture for binding {} ({} texels wide) refilled before its use", t.binding, t.width);
                }
            }
            for t in filled {
                last_fill.insert(t.key(), t.fill);
                match tex_sizes.iter_mut().find(|x| x.key() == t.key()) {
                    Some(x) => x.height = x.height.max(t.height),
                    None => tex_sizes.push(t),
                }
            }
        }
        if crate::profile::settings::get().trace_textures {
            eprintln!("plan: {} textures", tex_sizes.len());
            for t in &tex_sizes {
                eprintln!("texture binding {:2} {:5} x {:6} texels {:8.2} MiB", t.binding, t.width, t.height, (t.width as f64 * t.height as f64 * texel as f64) / 1048576.0);
            }
        }
        let max_tex = gpu.limits.max_texture_dimension_2d;
        if let Some(t) = tex_sizes.iter().find(|t| t.width > max_tex || t.height > max_tex) {
            bail!("texture {}x{} exceeds this adapter's {max_tex} texel limit", t.width, t.height);
        }
        let width = |t: &TexRef| if t.linear { t.width } else { crate::gpu::npot(t.width, max_tex) };
        let textures: Vec<wgpu::Texture> = tex_sizes.iter().map(|t| crate::gpu::texture_of(&gpu, "activation texture", width(t), t.height, format)).collect();
        let views: Vec<wgpu::TextureView> = textures.iter().map(|t| t.create_view(&Default::default())).collect();
        let tex_index = |t: &TexRef| tex_sizes.iter().position(|x| x.key() == t.key()).unwrap();
        let mut steps = Vec::with_capacity(ops.len());
        for op in ops {
            let (label, pipeline, bindings, groups, flops) = match op {
                OpRec::Copy { src, texel0, tex, texels } => {
                    let from = |src: &CopySrc| match src {
                        CopySrc::Act(t) => CopyFrom::Slot(tensor_slot[t.0]),
                        CopySrc::Buf(b) => CopyFrom::Buf(b.clone()),
                    };
                    let (texture, w) = (tex_index(&tex), tex.width as usize);
                    let offset = (texel0 * texel) as u64;
                    // A linear texture: its whole rows, then the partial last row
                    // (a one-row copy needs no 256-byte row alignment).
                    let (full, rest) = match texels {
                        Some(n) => (n / w, n % w),
                        None => (tex.height as usize, 0),
                    };
                    let parts = [(full, w, 0), (usize::from(rest > 0), rest, full)];
                    for (rows, width, y) in parts.into_iter().filter(|p| p.0 > 0) {
                        steps.push(Step {
                            label: "copy to texture".into(),
                            flops: 0.0,
                            bytes: 2 * (rows * width * texel) as u64,
                            bufs: match &src {
                                CopySrc::Buf(b) => vec![Arc::as_ptr(b) as usize],
                                CopySrc::Act(_) => vec![],
                            },
                            kind: StepKind::Copy { from: from(&src), offset: offset + (y * w * texel) as u64, texture, width: width as u32, height: rows as u32, y: y as u32 },
                        });
                    }
                    continue;
                }
                OpRec::Clear { t } => {
                    steps.push(Step { label: "clear".into(), flops: 0.0, bytes: bytes(t.0), bufs: vec![], kind: StepKind::Clear { slot: tensor_slot[t.0], bytes: bytes(t.0) } });
                    continue;
                }
                OpRec::Dispatch { label, pipeline, bindings, groups, flops } => (label, pipeline, bindings, groups, flops),
            };
            let uniforms: Vec<Option<wgpu::Buffer>> = bindings
                .iter()
                .map(|r| match r {
                    Res::Uniform(w) => Some(gpu.uniform(&label, w)),
                    _ => None,
                })
                .collect();
            let entries: Vec<wgpu::BindGroupEntry> = bindings
                .iter()
                .enumerate()
                .filter(|(_, r)| !matches!(r, Res::Unused))
                .map(|(i, r)| wgpu::BindGroupEntry {
                    binding: i as u32,
                    resource: match r {
                        Res::Act(t) => wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer: &slots[tensor_slot[t.0]], offset: 0, size: std::num::NonZeroU64::new(bytes(t.0)) }),
                        Res::Buf(b) => b.as_entire_binding(),
                        Res::Uniform(_) => uniforms[i].as_ref().unwrap().as_entire_binding(),
                        Res::Tex(v) => wgpu::BindingResource::TextureView(v),
                        Res::ActTex(t) | Res::OutTex(t) => wgpu::BindingResource::TextureView(&views[tex_index(t)]),
                        Res::Unused => unreachable!(),
                    },
                })
                .collect();
            let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor { label: Some(&label), layout: &pipeline.get_bind_group_layout(0), entries: &entries });
            gpu.check_error().with_context(|| label.clone())?;
            // Each tensor or buffer counted once, however many bindings it fills
            // (kernels bind an operand again where a binding is declared but unused).
            let mut seen = std::collections::HashSet::new();
            let traffic = bindings
                .iter()
                .map(|r| match r {
                    Res::Act(t) if seen.insert((0, t.0)) => bytes(t.0),
                    Res::Buf(b) if seen.insert((1, Arc::as_ptr(b) as usize)) => b.size(),
                    Res::ActTex(t) | Res::OutTex(t) => t.width as u64 * t.height as u64 * texel as u64,
                    _ => 0,
                })
                .sum();
            let bufs = bindings.iter().filter_map(|r| if let Res::Buf(b) = r { Some(Arc::as_ptr(b) as usize) } else { None }).collect();
            steps.push(Step { label, flops, bytes: traffic, bufs, kind: StepKind::Dispatch { pipeline, bind_group, groups } });
        }
        Ok(Plan {
            activation_bytes: slot_size.iter().sum(),
            unshared_bytes: (0..n).map(bytes).sum(),
            max_live_bytes: max_live,
            texture_bytes: tex_sizes.iter().map(|t| width(t) as u64 * crate::gpu::npot(t.height, max_tex) as u64 * texel as u64).sum(),
            half: self.half,
            gpu,
            steps,
            slots,
            textures,
            tensor_slot,
            tensor_len: self.tensors.iter().map(|t| t.len).collect(),
        })
    }
}
