//! The kernel profile: every kernel choice for one adapter, resolved once per
//! device and handed to each graph (`Graph::profile`), which its ops read.
//!
//! Each choice comes, in order, from an explicit setting (`settings`: the
//! `CVT_GPU_*` variables and `--kernels`), the on-disk cache of earlier trials
//! on this adapter and build (`cache`), a timed trial (`trial`: GPU timestamps
//! where the adapter has them), or a rule by device type. `Profile::sources`
//! records which. `cvt-gpu adapters --json` prints the resolved profile.
//!
//! Tests pick a variant by editing a graph's profile (or the device's, with
//! `Gpu::set_profile`) instead of the process environment.

pub mod cache;
pub mod settings;
mod trial;

use crate::gpu::{Gpu, MatmulKind};
use crate::texread::TexRead;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The two kernel sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KernelSet {
    /// Workgroup-tiled kernels over storage buffers, for GPUs: `main_tiled`
    /// GEMMs with split-K, two-stage column sums, a workgroup per row in the
    /// row reductions, attention with key tiles in workgroup memory.
    Gpu,
    /// Texture-operand kernels with no workgroup memory and a row per
    /// invocation, for CPU drivers (lavapipe, llvmpipe, SwiftShader), where a
    /// workgroup's invocations are SIMD lanes and texel fetches are gathers.
    Cpu,
}

impl KernelSet {
    /// The weight layout and GEMM family this set uses.
    pub fn matmul(self) -> MatmulKind {
        match self {
            KernelSet::Gpu => MatmulKind::Buffer,
            KernelSet::Cpu => MatmulKind::Texture,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KernelSet::Gpu => "gpu",
            KernelSet::Cpu => "cpu",
        }
    }

    fn parse(s: &str) -> Option<KernelSet> {
        match s {
            "gpu" => Some(KernelSet::Gpu),
            "cpu" => Some(KernelSet::Cpu),
            _ => None,
        }
    }
}

/// `--kernels`: a kernel set, or `auto` (the profile's choice).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KernelChoice {
    #[default]
    Auto,
    Gpu,
    Cpu,
}

/// The GPU set's GEMM launch (`ops::matmul::tiled`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GemmTiles {
    /// The shader's tiles (matmul.wgsl's TM, TBN and TBK; reported, not tuned here)
    /// as (rows, columns, K step): 128 x 64 where a GEMM still fills
    /// `min_workgroups` with it (8 x 4 outputs per invocation), else 64 x 64
    /// (4 x 4); `ops::matmul::tiled_shape` picks per shape.
    pub tiles: [[usize; 3]; 2],
    /// Invocations per workgroup.
    pub invocations: usize,
    /// Split K (and size the column sums' first stage) until a GEMM launches at
    /// least this many workgroups: two per compute unit of a large GPU (132 SMs
    /// on an H100). wgpu does not report compute units, so this is a rule.
    pub min_workgroups: usize,
}

/// Where a choice came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Setting,
    Cache,
    Trial,
    Rule,
}

/// Every kernel choice for one adapter.
#[derive(Clone, Debug, Serialize)]
pub struct Profile {
    pub kernels: KernelSet,
    /// How every kernel reads textures (`texread`).
    pub texture_read: TexRead,
    /// Invocations per row of the row reductions (LayerNorm, softmax): 1 (a row
    /// per invocation, no barriers: CPU drivers) or 64 (a workgroup per row).
    pub row_lanes: usize,
    /// Rows per invocation of the texture GEMM (8 or 16). 16 runs CvT-13 at batch
    /// 1 1.10-1.17x faster on lavapipe and compiles in 1.4-1.8 s against 0.7 s.
    pub tex_rows: usize,
    /// Rows per invocation of texture GEMMs that do not share A; None: the rule of
    /// `ops::matmul::tex_block`.
    pub narrow_rows: Option<usize>,
    /// Whether the texture GEMM fetches A once per subgroup where it can.
    pub a_share: bool,
    /// Whether the adapter's subgroups are runs of 8 consecutive invocations
    /// (probed: `ops::matmul::subgroup_probe`).
    pub subgroups_of_8: bool,
    /// Whether the texture GEMM applies activation and residual in its epilogue
    /// (one pipeline per combination) or in other passes (one GEMM pipeline to
    /// compile on CPU drivers: split, the default there, is as fast per run and
    /// 2.5-8 s shorter on the first call).
    pub fused_epilogue: bool,
    /// Queries per invocation of the texture attention (1, 2 or 4; 4 runs
    /// CvT-13's attention 1.4x faster than 2 on lavapipe).
    pub attn_queries: usize,
    /// Workgroup size of the texture attention kernels: a workgroup serves one
    /// (image, head), an invocation one query or key, so short sequences leave most
    /// of 64 lanes idle (stage 2 at 64×64: 17 queries, 5 keys). 8 on CPU drivers,
    /// whose lanes are SIMD runs of 8 (CvT-13's attention 1.35-1.49x faster in
    /// training at 64×64, batch 64, and 1.11x at 224, batch 1); 64 on GPUs, where
    /// less would fill a fraction of a 32- or 64-wide wave. `CVT_GPU_ATTN_WG`.
    pub attn_wg: usize,
    /// Training's attention backward: saved probabilities (true), recomputed
    /// (false), or None: saved while P fits `attention::SAVED_P_MAX_BYTES`.
    pub attn_saved: Option<bool>,
    /// Largest key tile of the GPU set's attention (32 or 64): a sequence of up to
    /// this many keys is staged whole, in one tile (`ops::attention::key_tile`).
    pub attn_tile_max: usize,
    /// Whether the row reductions with a workgroup per row (the GPU set's
    /// LayerNorm and softmax) reduce through subgroup operations where the adapter
    /// has them (`rownorm.wgsl`'s SG_REDUCE), instead of a tree in workgroup memory.
    pub row_subgroups: bool,
    /// Whether those row reductions keep each lane's values of the row in
    /// registers (`rownorm.wgsl`'s PER) where a row is at most 16 values per lane,
    /// reading it from memory once instead of once per pass.
    pub row_registers: bool,
    /// Whether a texture copy of values some texture already holds reuses it.
    pub copy_reuse: bool,
    /// Whether training's MLP activation and its gradient are fused into the GEMMs'
    /// stores (fc1 keeps z, fc2's dx takes act'(z)), in either kernel set.
    pub fuse_act: bool,
    /// Whether `--f16` also stores activations in f16 where the adapter has shader-f16.
    pub f16_act: bool,
    pub gemm: GemmTiles,
    /// Where each choice came from.
    pub sources: BTreeMap<&'static str, Source>,
}

impl Profile {
    /// The rule's profile of a kernel set: every choice by device type and set,
    /// with settings not yet applied.
    pub fn for_set(gpu: &Gpu, kernels: KernelSet, texture_read: TexRead) -> Profile {
        let cpu_set = kernels == KernelSet::Cpu;
        Profile {
            kernels,
            texture_read,
            row_lanes: if cpu_set { 1 } else { 64 },
            tex_rows: 16,
            narrow_rows: None,
            a_share: true,
            subgroups_of_8: false,
            fused_epilogue: false,
            attn_queries: 4,
            attn_wg: if gpu.info.device_type == wgpu::DeviceType::Cpu { 8 } else { 64 },
            attn_saved: None,
            attn_tile_max: 64,
            row_subgroups: true,
            row_registers: true,
            copy_reuse: true,
            fuse_act: true,
            f16_act: true,
            gemm: GemmTiles { tiles: [[128, 64, 16], [64, 64, 16]], invocations: 256, min_workgroups: crate::ops::matmul::MIN_GROUPS },
            sources: BTreeMap::new(),
        }
    }

    /// Applies the explicit settings to the choices they name.
    fn apply(&mut self, s: &settings::Settings) {
        let mut set = |what: &'static str, yes: bool| {
            if yes {
                self.sources.insert(what, Source::Setting);
            }
        };
        set("row_lanes", s.row_lanes.is_some());
        set("tex_rows", s.tex_rows.is_some());
        set("narrow_rows", s.narrow_rows.is_some());
        set("a_share", s.a_share.is_some());
        set("fused_epilogue", s.fused_epilogue.is_some());
        set("attn_queries", s.attn_queries.is_some());
        set("attn_wg", s.attn_wg.is_some());
        set("attn_saved", s.attn_saved.is_some());
        set("copy_reuse", s.copy_reuse.is_some());
        set("fuse_act", s.fuse_act.is_some());
        set("f16_act", s.f16_act.is_some());
        self.row_lanes = s.row_lanes.unwrap_or(self.row_lanes);
        self.tex_rows = s.tex_rows.unwrap_or(self.tex_rows);
        self.narrow_rows = s.narrow_rows.or(self.narrow_rows);
        self.a_share = s.a_share.unwrap_or(self.a_share);
        self.fused_epilogue = s.fused_epilogue.unwrap_or(self.fused_epilogue);
        self.attn_queries = s.attn_queries.unwrap_or(self.attn_queries);
        self.attn_wg = s.attn_wg.unwrap_or(self.attn_wg);
        self.attn_saved = s.attn_saved.or(self.attn_saved);
        self.copy_reuse = s.copy_reuse.unwrap_or(self.copy_reuse);
        self.fuse_act = s.fuse_act.unwrap_or(self.fuse_act);
        self.f16_act = s.f16_act.unwrap_or(self.f16_act);
    }

    /// The weight layout and GEMM family of this profile's kernel set.
    pub fn matmul(&self) -> MatmulKind {
        self.kernels.matmul()
    }
}

/// The rule for an adapter: CPU drivers get the CPU set with storage-texture
/// reads where every kernel can use them; GPUs the GPU set with sampled reads.
fn rule(gpu: &Gpu) -> (KernelSet, TexRead) {
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        (KernelSet::Cpu, if crate::texread::storage_supported(&gpu.info, &gpu.limits) { TexRead::Storage } else { TexRead::Sampled })
    } else {
        (KernelSet::Gpu, TexRead::Sampled)
    }
}

/// Resolves the profile of `gpu`: settings, then the cache, then trials (whose
/// results are cached; settings never are), then the rule.
pub fn resolve(gpu: &Arc<Gpu>) -> Profile {
    let s = settings::get();
    let (rule_set, rule_read) = rule(gpu);
    let mut sources = BTreeMap::new();
    let mut pick = |what: &'static str, setting: Option<String>, cached: Option<String>| -> Option<String> {
        if setting.is_some() {
            sources.insert(what, Source::Setting);
            return setting;
        }
        if cached.is_some() {
            sources.insert(what, Source::Cache);
        }
        cached
    };
    // (`cache::lookup` finds nothing with --no-tune.)
    let kernels = pick("kernels", s.kernels.map(|k| k.name().to_string()), cache::lookup(gpu, "kernels")).and_then(|k| KernelSet::parse(&k));
    let read = pick("texture_read", s.tex_read.map(|r| r.name().to_string()), cache::lookup(gpu, "texture_read")).and_then(|r| TexRead::parse(&r));
    let (kernels, read) = match (kernels, read) {
        (Some(k), Some(r)) => (k, r),
        // What settings and cache leave open: measured (a trial that fails
        // decides nothing), else the rule.
        _ => {
            let measured = if s.no_tune { None } else { trial::run(gpu, kernels, read, rule_read, s.trace_tune).ok() };
            let source = if measured.is_some() { Source::Trial } else { Source::Rule };
            sources.entry("kernels").or_insert(source);
            sources.entry("texture_read").or_insert(source);
            // Cached only when nothing was forced: a kernel set measured in a
            // forced read mode (or the reverse) is not the adapter's choice.
            if let (Some((k, r)), None, None) = (measured, s.kernels, s.tex_read) {
                cache::store(gpu, &[("texture_read", r.name()), ("kernels", k.name())]);
            }
            measured.unwrap_or((kernels.unwrap_or(rule_set), read.unwrap_or(rule_read)))
        }
    };
    let mut p = Profile::for_set(gpu, kernels, read);
    p.sources = sources;
    p.apply(&s);
    p.subgroups_of_8 = trial::subgroups_of_8(gpu, &p);
    p
}
