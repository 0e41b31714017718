//! How kernels read textures: sampled `textureLoad` or read-only storage-texture
//! loads. The data and the results are the same; the cost is the driver's.
//!
//! Mesa 22.3's llvmpipe (lavapipe) compiles a sampled fetch of an rgba32float
//! texture as a call to a sampling function that looks up the mip level's offset
//! and stride per lane; a storage-texture load is inlined as address arithmetic
//! and a gather. Switching every kernel to storage reads made the 1024³ GEMM 1.5x
//! faster there (docs/perf.md). GPUs may prefer the texture cache of sampled
//! reads, so the mode is chosen per adapter by `ops::matmul`'s timed trial.
//!
//! Shaders name the texture type `Tex` (rgba32float activations and weights;
//! rgba16float in f16 plans) and `WTex` (`matmul.wgsl`'s weight binding, which may
//! hold f16), and read them with `texel` and `wtexel`; [`prelude`] defines those
//! four for the chosen mode. A storage-texture type names its format, so f16
//! textures need modules of their own in storage mode (`Gpu::pipeline_in`'s `w16`
//! and `a16`); sampled reads take any format.

/// The two ways to read a texture (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TexRead {
    Sampled,
    Storage,
}

/// Texture bindings one entry point reads at most (attention's saved-P backward:
/// probs, dscore, dout, q; the depthwise backward: three map gradients and x or
/// w); storage mode needs that many storage textures per stage (WebGPU's default
/// limit is 4). `kernels-tests/shaders.rs` checks the count.
pub const MAX_TEXTURES_PER_KERNEL: u32 = 4;

impl TexRead {
    pub fn name(self) -> &'static str {
        match self {
            TexRead::Sampled => "sampled",
            TexRead::Storage => "storage",
        }
    }

    pub fn parse(s: &str) -> Option<TexRead> {
        match s {
            "sampled" => Some(TexRead::Sampled),
            "storage" => Some(TexRead::Storage),
            _ => None,
        }
    }
}

/// Whether the device can run every kernel with storage-texture reads. Not on
/// Metal or GL: naga 30's MSL writer cannot pass a storage texture to a function
/// (`texel`), and its GLSL writer drops the parameter's `readonly` qualifier,
/// which GLSL compilers reject. Sampled reads are those backends' path.
pub fn storage_supported(info: &wgpu::AdapterInfo, limits: &wgpu::Limits) -> bool {
    !matches!(info.backend, wgpu::Backend::Metal | wgpu::Backend::Gl) && limits.max_storage_textures_per_shader_stage >= MAX_TEXTURES_PER_KERNEL
}

/// A `CVT_GPU_TEX_READ` this adapter cannot honour, as a one-line error.
pub fn check_setting(info: &wgpu::AdapterInfo, limits: &wgpu::Limits) -> anyhow::Result<()> {
    if crate::profile::settings::get().tex_read == Some(TexRead::Storage) && !storage_supported(info, limits) {
        anyhow::bail!("CVT_GPU_TEX_READ=storage: {} ({:?}) cannot read storage textures in every kernel; use `sampled` or unset it", info.name, info.backend);
    }
    Ok(())
}

/// Linear textures (`Graph::linear_texture`): texel i of a buffer at
/// (i & (W - 1), i >> log2 W), W a power of two. The same in both modes.
const LINEAR: &str = "fn lin_at(width: u32, i: u32) -> vec2<i32> {\n\
    let s = countTrailingZeros(width);\n\
    return vec2<i32>(vec2<u32>(i & ((1u << s) - 1u), i >> s));\n\
}\n\
fn lin(t: Tex, i: u32) -> vec4<f32> { return texel(t, lin_at(textureDimensions(t).x, i)); }\n";

/// WGSL defining `Tex`, `WTex`, `OTex` (the written storage texture), `act`
/// (the element type of activation buffers), `texel` and `wtexel` for `read`, and
/// the linear-texture readers `lin_at` and `lin`; prepended to every shader.
/// `w16`: f16 weight textures. `a16`: an f16 plan (`Graph::half`): activation
/// buffers hold f16 (`enable f16`, the shader-f16 feature), and every texture the
/// kernels read or write is rgba16float; arithmetic stays f32 (kernels convert
/// at each load and store: `f32(x[i])`, `act(v)`, identities when `act` is f32).
/// `sg`: the device has subgroup operations (wgpu's SUBGROUP feature); the
/// helpers of [`subgroup_helpers`] are real, else stubs that never share.
pub fn prelude(read: TexRead, w16: bool, a16: bool, sg: bool) -> String {
    let (head, fmt) = if a16 { ("enable f16;\nalias act = f16;\n", "rgba16float") } else { ("alias act = f32;\n", "rgba32float") };
    let wfmt = if w16 || a16 { "rgba16float" } else { "rgba32float" };
    let textures = match read {
        TexRead::Sampled => "alias Tex = texture_2d<f32>;\n\
             alias WTex = texture_2d<f32>;\n\
             fn texel(t: Tex, c: vec2<i32>) -> vec4<f32> { return textureLoad(t, c, 0); }\n\
             fn wtexel(t: WTex, c: vec2<i32>) -> vec4<f32> { return textureLoad(t, c, 0); }\n"
            .to_string(),
        TexRead::Storage => format!(
            "alias Tex = texture_storage_2d<{fmt}, read>;\n\
             alias WTex = texture_storage_2d<{wfmt}, read>;\n\
             fn texel(t: Tex, c: vec2<i32>) -> vec4<f32> {{ return textureLoad(t, c); }}\n\
             fn wtexel(t: WTex, c: vec2<i32>) -> vec4<f32> {{ return textureLoad(t, c); }}\n"
        ),
    };
    format!("{head}alias OTex = texture_storage_2d<{fmt}, write>;\n{LINEAR}{textures}{}", subgroup_helpers(sg))
}

/// Subgroup helpers, so that one kernel source serves devices with and without
/// subgroup operations (a module using them anywhere needs the feature, and
/// WGSL cannot compile them out with an override): `sg_same(x)` (x is the same on
/// every active lane of the subgroup; always false without subgroups),
/// `sg_lane()` and `sg_count()` (this lane's index among the active lanes, and
/// their number: the lane id and subgroup size where all are active),
/// `sg_sum(x)` and `sg_max(x)` (over the active lanes), and
/// `bc0`..`bc7` (lane i's value of a vec4; WGSL wants the lane as a constant).
/// The texture GEMM uses them to fetch A once per subgroup instead of once per
/// lane (`matmul.wgsl`, `sa`/`sb`).
pub fn subgroup_helpers(sg: bool) -> String {
    let mut s = String::new();
    if sg {
        s += "fn sg_lane() -> u32 { return subgroupExclusiveAdd(1u); }\n\
              fn sg_count() -> u32 { return subgroupAdd(1u); }\n\
              fn sg_sum(x: f32) -> f32 { return subgroupAdd(x); }\n\
              fn sg_max(x: f32) -> f32 { return subgroupMax(x); }\n\
              fn sg_same(x: u32) -> bool { return subgroupAll(x == subgroupBroadcastFirst(x)); }\n";
    } else {
        s += "fn sg_lane() -> u32 { return 0u; }\n\
              fn sg_count() -> u32 { return 1u; }\n\
              fn sg_sum(x: f32) -> f32 { return x; }\n\
              fn sg_max(x: f32) -> f32 { return x; }\n\
              fn sg_same(x: u32) -> bool { return false; }\n";
    }
    for i in 0..8 {
        let body = if sg { format!("subgroupBroadcast(v, {i}u)") } else { "v".into() };
        s += &format!("fn bc{i}(v: vec4<f32>) -> vec4<f32> {{ return {body}; }}\n");
    }
    s
}
