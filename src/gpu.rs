//! GPU context: adapter choice, device with the adapter's own limits, shader and
//! pipeline caches, buffer helpers and readback.
//!
//! Nothing here assumes a limit: every size the engine relies on is read from the
//! device (`Gpu::limits`) and checked before a buffer or dispatch is created, so a
//! too-large request becomes a clear error instead of a wgpu validation panic.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use wgpu::util::DeviceExt;

use crate::texread::TexRead;

/// Functions and entry points made from another's text: a WGSL comment line
/// `// derive NEW from OLD: FROM -> TO` (several substitutions separated by
/// ` ; `) appends a copy of function OLD (from its `@compute` line, for an entry
/// point, to its closing brace) named NEW, with every FROM replaced by TO. One
/// source for kernels that differ only in a function they call, without
/// compiling both into one pipeline (matmul.wgsl's main_tex_act, dwconv.wgsl's
/// main_tex), and for helpers that differ only in the binding they read
/// (attention.wgsl's row loaders).
pub fn derive_entries(src: &str) -> String {
    let mut out = src.to_string();
    for line in src.lines() {
        let Some(rest) = line.trim().strip_prefix("// derive ") else { continue };
        let parsed = rest.split_once(": ").and_then(|(names, subst)| {
            let pairs: Option<Vec<(&str, &str)>> = subst.split(" ; ").map(|p| p.split_once(" -> ")).collect();
            Some((names.split_once(" from ")?, pairs?))
        });
        let Some(((new, old), pairs)) = parsed else { panic!("malformed shader directive: {line}") };
        let head = format!("fn {old}(");
        let f = src.find(&head).unwrap_or_else(|| panic!("{line}: no function {old}"));
        // The function's line, and the attribute line above it for an entry point.
        let fn_line = src[..f].rfind('\n').map_or(0, |i| i + 1);
        let above = src[..fn_line.saturating_sub(1)].rfind('\n').map_or(0, |i| i + 1);
        let start = if src[above..fn_line].trim_start().starts_with("@compute") { above } else { fn_line };
        let end = src[f..].find("\n}\n").map(|e| f + e + 3).unwrap_or_else(|| panic!("{line}: {old} has no closing brace"));
        let mut text = src[start..end].replacen(&head, &format!("fn {new}("), 1);
        for (from, to) in pairs {
            text = text.replace(from, to);
        }
        out.push('\n');
        out.push_str(&text);
    }
    out
}

/// The workgroup size of `entry` in WGSL `src` with `overrides`: its
/// `@workgroup_size(...)` attribute, each dimension a literal, an override
/// constant (the value given, else its default) or a module constant.
pub fn workgroup_size(src: &str, entry: &str, overrides: &[(&str, f64)]) -> [u32; 3] {
    let Some(f) = src.find(&format!("fn {entry}(")) else { return [1, 1, 1] };
    let Some(a) = src[..f].rfind("@workgroup_size(") else { return [1, 1, 1] };
    let args = &src[a + "@workgroup_size(".len()..];
    let args = &args[..args.find(')').unwrap_or(0)];
    let value = |tok: &str| -> u32 {
        let tok = tok.trim();
        if let Ok(v) = tok.trim_end_matches('u').parse::<u32>() {
            return v;
        }
        if let Some((_, v)) = overrides.iter().find(|(n, _)| *n == tok) {
            return *v as u32;
        }
        // `override NAME: u32 = 8u;` or `const NAME: u32 = 8u;`
        for kw in ["override", "const"] {
            if let Some(i) = src.find(&format!("{kw} {tok}: u32 = ")) {
                let rest = &src[i + format!("{kw} {tok}: u32 = ").len()..];
                if let Ok(v) = rest[..rest.find(';').unwrap_or(0)].trim_end_matches('u').parse::<u32>() {
                    return v;
                }
            }
        }
        1
    };
    let mut out = [1u32; 3];
    for (o, tok) in out.iter_mut().zip(args.split(',')) {
        *o = value(tok);
    }
    out
}

/// Every WGSL file of the engine, embedded in the binary. Tests walk this list to
/// validate each shader with naga and translate it for every backend.
pub const SHADERS: &[(&str, &str)] = &[
    ("matmul", include_str!("../shaders/matmul.wgsl")),
    ("attention", include_str!("../shaders/attention.wgsl")),
    ("dwconv", include_str!("../shaders/dwconv.wgsl")),
    ("rownorm", include_str!("../shaders/rownorm.wgsl")),
    ("tokens", include_str!("../shaders/tokens.wgsl")),
    ("optim", include_str!("../shaders/optim.wgsl")),
    ("gpsa", include_str!("../shaders/gpsa.wgsl")),
];

/// Which wgpu backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackendChoice {
    /// The best adapter wgpu finds on any backend (a discrete GPU first; Vulkan before GL).
    #[default]
    Auto,
    Vulkan,
    Metal,
    Dx12,
    Gl,
}

impl BackendChoice {
    fn backends(self) -> wgpu::Backends {
        match self {
            BackendChoice::Auto => wgpu::Backends::all(),
            BackendChoice::Vulkan => wgpu::Backends::VULKAN,
            BackendChoice::Metal => wgpu::Backends::METAL,
            BackendChoice::Dx12 => wgpu::Backends::DX12,
            BackendChoice::Gl => wgpu::Backends::GL,
        }
    }
}

/// How to pick an adapter: backend filter plus an optional index or name substring.
#[derive(Clone, Debug, Default)]
pub struct AdapterRequest {
    pub backend: BackendChoice,
    /// Index into `cvt-gpu adapters`' list, or a case-insensitive substring of the name.
    pub adapter: Option<String>,
}

/// A summary of one adapter, as `cvt-gpu adapters` prints it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdapterSummary {
    pub index: usize,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_compute_workgroups_per_dimension: u32,
    pub max_storage_buffers_per_shader_stage: u32,
    pub min_subgroup_size: u32,
    pub max_subgroup_size: u32,
    pub features: Vec<String>,
}

fn summarize(index: usize, a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    let l = a.limits();
    let features = a.features().iter_names().map(|(n, _)| n.to_string()).collect();
    AdapterSummary {
        index,
        min_subgroup_size: info.subgroup_min_size,
        max_subgroup_size: info.subgroup_max_size,
        name: info.name,
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: info.driver,
        driver_info: info.driver_info,
        max_storage_buffer_binding_size: l.max_storage_buffer_binding_size as u64,
        max_buffer_size: l.max_buffer_size,
        max_compute_workgroup_storage_size: l.max_compute_workgroup_storage_size,
        max_compute_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
        max_compute_workgroups_per_dimension: l.max_compute_workgroups_per_dimension,
        max_storage_buffers_per_shader_stage: l.max_storage_buffers_per_shader_stage,
        features,
    }
}

/// Adapters on the requested backend, ordered best first: discrete, integrated,
/// virtual, then CPU; on ties Vulkan before the others (lavapipe is faster than
/// llvmpipe-on-GL for compute).
/// `lazy_gl`: for the default pick only — GL is probed when nothing else exists.
/// Listing and `--adapter` selection always see every backend, in the same order.
fn ordered_adapters(backend: BackendChoice, lazy_gl: bool) -> Vec<wgpu::Adapter> {
    let enumerate = |b: wgpu::Backends| {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        desc.backends = b;
        pollster::block_on(wgpu::Instance::new(desc).enumerate_adapters(b))
    };
    // GL is the fallback of `auto`: probing it costs time (and Mesa's EGL prints
    // warnings on headless machines), so it is only tried when nothing else is found.
    let mut adapters = if backend == BackendChoice::Auto && lazy_gl {
        let native = enumerate(wgpu::Backends::all() - wgpu::Backends::GL);
        if native.is_empty() {
            enumerate(wgpu::Backends::GL)
        } else {
            native
        }
    } else {
        enumerate(backend.backends())
    };
    let rank = |a: &wgpu::Adapter| {
        let i = a.get_info();
        let t = match i.device_type {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu => 2,
            wgpu::DeviceType::Other => 3,
            wgpu::DeviceType::Cpu => 4,
        };
        let b = match i.backend {
            wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
            _ => 1,
        };
        (t, b)
    };
    adapters.sort_by_key(|a| rank(a));
    adapters
}

/// Lists every adapter the backend filter admits.
pub fn list_adapters(backend: BackendChoice) -> Vec<AdapterSummary> {
    ordered_adapters(backend, false).iter().enumerate().map(|(i, a)| summarize(i, a)).collect()
}

const NO_ADAPTER: &str = "no GPU adapter found: install a Vulkan, Metal, DX12 or GL driver \
(on Linux without a GPU: `apt-get install mesa-vulkan-drivers` for lavapipe)";

/// The engine's device: everything kernels need to create and run pipelines.
pub struct Gpu {
    /// Kept to open sibling devices (`sibling`).
    adapter: wgpu::Adapter,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    /// Shader modules by (file, texture-read mode, f16 weight textures, f16 plan).
    /// (The WGSL text each was made from, for `workgroup_size`.)
    modules: Mutex<HashMap<(&'static str, TexRead, bool, bool), (wgpu::ShaderModule, Arc<str>)>>,
    /// The device has subgroup operations (`texread::subgroup_helpers`).
    pub subgroups: bool,
    pipelines: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
    /// Each pipeline's workgroup size (by address), for launch reports.
    workgroup_sizes: Mutex<HashMap<usize, [u32; 3]>>,
    /// A small zero buffer for bindings an entry point declares but a mode ignores.
    placeholder: std::sync::OnceLock<Arc<wgpu::Buffer>>,
    /// One-texel textures in rgba32float and rgba16float (for f16 plans).
    placeholder_texture: [std::sync::OnceLock<Arc<wgpu::TextureView>>; 2],
    /// The kernel profile, resolved on first use (`profile::resolve`) or set
    /// (`set_profile`).
    profile: std::sync::OnceLock<Arc<crate::profile::Profile>>,
    /// Uncaptured wgpu errors land here (instead of wgpu's default panic) and are
    /// turned into `Err` at the next synchronisation point.
    error: Arc<Mutex<Option<String>>>,
}

impl Gpu {
    /// Opens the adapter described by `req`.
    pub fn new(req: &AdapterRequest) -> Result<Arc<Gpu>> {
        crate::profile::settings::check()?;
        let adapters = ordered_adapters(req.backend, req.adapter.is_none());
        if adapters.is_empty() {
            if req.backend == BackendChoice::Auto {
                bail!("{NO_ADAPTER}");
            }
            bail!("no adapter on the {:?} backend; `cvt-gpu adapters` lists what is available. {NO_ADAPTER}", req.backend);
        }
        let adapter = match &req.adapter {
            None => adapters.into_iter().next().unwrap(),
            Some(sel) => {
                if let Ok(i) = sel.parse::<usize>() {
                    let n = adapters.len();
                    adapters.into_iter().nth(i).ok_or_else(|| anyhow!("adapter index {i} does not exist ({n} adapters; see `cvt-gpu adapters`)"))?
                } else {
                    let s = sel.to_lowercase();
                    adapters.into_iter().find(|a| a.get_info().name.to_lowercase().contains(&s)).ok_or_else(|| anyhow!("no adapter name contains {sel:?} (see `cvt-gpu adapters`)"))?
                }
            }
        };
        Self::from_adapter(adapter)
    }

    fn from_adapter(adapter: wgpu::Adapter) -> Result<Arc<Gpu>> {
        let info = adapter.get_info();
        let limits = adapter.limits();
        crate::texread::check_setting(&info, &limits)?;
        // Only features the engine uses, and only when the adapter has them.
        let wanted =
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES | wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP;
        let features = adapter.features() & wanted;
        let (device, queue) =
            pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor { label: Some("cvt-gpu"), required_features: features, required_limits: limits.clone(), ..Default::default() }))
                .with_context(|| format!("could not open a device on adapter {:?}", info.name))?;
        let error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let sink = error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut slot = sink.lock().unwrap();
            if slot.is_none() {
                *slot = Some(e.to_string());
            }
        }));
        Ok(Arc::new(Gpu {
            adapter,
            device,
            queue,
            info,
            limits,
            features,
            modules: Mutex::new(HashMap::new()),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            pipelines: Mutex::new(HashMap::new()),
            workgroup_sizes: Mutex::new(HashMap::new()),
            profile: std::sync::OnceLock::new(),
            placeholder: std::sync::OnceLock::new(),
            placeholder_texture: [std::sync::OnceLock::new(), std::sync::OnceLock::new()],
            error,
        }))
    }

    /// A second device on the same adapter (with no profile of its own: the
    /// trials that use it give their graphs one). CPU
    /// drivers compile a kernel at its first dispatch, on the thread that submits
    /// it: work submitted to two devices from two threads compiles on two cores
    /// (`profile::trial`). None where the backend cannot open a second device.
    pub fn sibling(&self) -> Option<Arc<Gpu>> {
        if self.info.backend == wgpu::Backend::Gl {
            return None;
        }
        Self::from_adapter(self.adapter.clone()).ok()
    }

    /// One line naming the adapter, for logs and reports.
    pub fn describe(&self) -> String {
        format!("{} ({:?}, {})", self.info.name, self.info.backend, self.info.driver)
    }

    /// Fails with the first wgpu error reported since the last check.
    pub fn check_error(&self) -> Result<()> {
        if let Some(e) = self.error.lock().unwrap().take() {
            let text: String = e.split_whitespace().collect::<Vec<_>>().join(" ");
            bail!("GPU error: {}", text.chars().take(400).collect::<String>());
        }
        Ok(())
    }

    /// A 16-byte zero storage buffer, for bindings a kernel mode does not read.
    pub fn placeholder(&self) -> Arc<wgpu::Buffer> {
        self.placeholder
            .get_or_init(|| Arc::new(self.device.create_buffer(&wgpu::BufferDescriptor { label: Some("placeholder"), size: 16, usage: wgpu::BufferUsages::STORAGE, mapped_at_creation: false })))
            .clone()
    }

    /// A one-texel texture, for texture bindings a kernel mode does not read (WGSL
    /// counts a binding used under a false override-constant branch as used).
    /// `half`: rgba16float, for f16 plans, whose storage-texture bindings name that format.
    pub fn placeholder_texture(&self, half: bool) -> Arc<wgpu::TextureView> {
        self.placeholder_texture[half as usize].get_or_init(|| Arc::new(texture_of(self, "placeholder", 1, 1, tex_format(half)).create_view(&Default::default()))).clone()
    }

    /// Largest storage buffer one binding may cover on this device.
    pub fn max_binding(&self) -> u64 {
        (self.limits.max_storage_buffer_binding_size as u64).min(self.limits.max_buffer_size)
    }

    /// This device's kernel profile, resolved on first use (trials run then,
    /// unless settings or the cache decide; `profile::resolve`).
    pub fn profile(self: &Arc<Self>) -> Arc<crate::profile::Profile> {
        self.profile.get_or_init(|| Arc::new(crate::profile::resolve(self))).clone()
    }

    /// Sets the profile before first use (tests force a kernel set this way);
    /// false if one was already resolved.
    pub fn set_profile(&self, profile: crate::profile::Profile) -> bool {
        self.profile.set(Arc::new(profile)).is_ok()
    }

    fn module(&self, name: &'static str, read: TexRead, w16: bool, a16: bool) -> Result<(wgpu::ShaderModule, Arc<str>)> {
        let mut m = self.modules.lock().unwrap();
        if let Some(module) = m.get(&(name, read, w16, a16)) {
            return Ok(module.clone());
        }
        let mut src: String = SHADERS.iter().find(|(n, _)| *n == name).ok_or_else(|| anyhow!("no shader named {name}"))?.1.into();
        // Kernel development: CVT_GPU_SHADER_DIR loads the WGSL from disk instead
        // of the copy embedded at build time, so a kernel can be tuned without a rebuild.
        let settings = crate::profile::settings::get();
        if let Some(dir) = &settings.shader_dir {
            let path = std::path::Path::new(&dir).join(format!("{name}.wgsl"));
            src = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        }
        let src: Arc<str> = (crate::texread::prelude(read, w16, a16, self.subgroups) + &derive_entries(&src)).into();
        let desc = wgpu::ShaderModuleDescriptor { label: Some(name), source: wgpu::ShaderSource::Wgsl(src.as_ref().into()) };
        let checks = match settings.checks {
            crate::profile::settings::Checks::All => wgpu::ShaderRuntimeChecks::checked(),
            crate::profile::settings::Checks::None => wgpu::ShaderRuntimeChecks::unchecked(),
            crate::profile::settings::Checks::Default => {
                let mut c = wgpu::ShaderRuntimeChecks::checked();
                c.force_loop_bounding = false;
                c
            }
        };
        // SAFETY: every loop in our kernels has a bound computed from uniforms or constants.
        let module = unsafe { self.device.create_shader_module_trusted(desc, checks) };
        m.insert((name, read, w16, a16), (module.clone(), src.clone()));
        Ok((module, src))
    }

    /// A compute pipeline for `shader::entry` specialised by `overrides`, compiled
    /// once per process and shared; textures read in mode `read`.
    pub fn pipeline(&self, shader: &'static str, entry: &str, overrides: &[(&str, f64)], read: TexRead) -> Result<Arc<wgpu::ComputePipeline>> {
        self.pipeline_in(shader, entry, overrides, read, false, false)
    }

    /// As `pipeline`, for a kernel whose weight texture (`WTex`) is rgba16float
    /// (`w16`) and/or of an f16 plan (`a16`: f16 activations and textures; see
    /// `texread::prelude`).
    pub fn pipeline_in(&self, shader: &'static str, entry: &str, overrides: &[(&str, f64)], read: TexRead, w16: bool, a16: bool) -> Result<Arc<wgpu::ComputePipeline>> {
        // Sampled reads take any format: one module serves f32 and f16 weights.
        let w16 = w16 && read == TexRead::Storage && !a16;
        let key = format!("{shader}:{entry}:{overrides:?}:{}{}{}", read.name(), if w16 { ":w16" } else { "" }, if a16 { ":f16" } else { "" });
        if let Some(p) = self.pipelines.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let (module, src) = self.module(shader, read, w16, a16)?;
        let t0 = std::time::Instant::now();
        let p = Arc::new(self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&key),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: overrides,
                // Every kernel writes the workgroup memory it reads; zero-fill costs time on CPUs.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        }));
        self.check_error().with_context(|| format!("compiling {key}"))?;
        if crate::profile::settings::get().trace_compile {
            eprintln!("compile {:8.1} ms {key}", t0.elapsed().as_secs_f64() * 1e3);
        }
        self.workgroup_sizes.lock().unwrap().insert(Arc::as_ptr(&p) as usize, workgroup_size(&src, entry, overrides));
        self.pipelines.lock().unwrap().insert(key, p.clone());
        Ok(p)
    }

    /// The workgroup size of a pipeline made by `pipeline_in` ([1, 1, 1] if unknown).
    pub fn workgroup_size_of(&self, p: &Arc<wgpu::ComputePipeline>) -> [u32; 3] {
        self.workgroup_sizes.lock().unwrap().get(&(Arc::as_ptr(p) as usize)).copied().unwrap_or([1, 1, 1])
    }

    /// A storage buffer of `bytes` (rounded up to 16), checked against the device limits.
    pub fn storage(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer> {
        let size = bytes.max(16).div_ceil(16) * 16;
        if size > self.max_binding() {
            bail!("{label}: {} MiB exceeds this adapter's storage binding limit of {} MiB; use a smaller batch or resolution", size >> 20, self.max_binding() >> 20);
        }
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        }))
    }

    /// A storage buffer holding `data`.
    pub fn upload(&self, label: &str, data: &[f32]) -> Result<wgpu::Buffer> {
        self.upload_bytes(label, bytemuck::cast_slice(data))
    }

    /// A storage buffer holding `bytes` (a multiple of 4 long).
    pub fn upload_bytes(&self, label: &str, bytes: &[u8]) -> Result<wgpu::Buffer> {
        let buf = self.storage(label, bytes.len() as u64)?;
        self.queue.write_buffer(&buf, 0, bytes);
        Ok(buf)
    }

    /// A small uniform buffer of kernel parameters.
    pub fn uniform(&self, label: &str, words: &[u32]) -> wgpu::Buffer {
        let mut padded = words.to_vec();
        padded.resize(words.len().div_ceil(4).max(1) * 4, 0);
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some(label), contents: bytemuck::cast_slice(&padded), usage: wgpu::BufferUsages::UNIFORM })
    }

    /// Copies `len` f32 from `buf` (at element `offset`) back to the host.
    pub fn read(&self, buf: &wgpu::Buffer, offset: u64, len: usize) -> Result<Vec<f32>> {
        let bytes = (len * 4) as u64;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buf, offset * 4, &staging, 0, bytes);
        self.queue.submit([enc.finish()]);
        self.map_read(&staging, bytes)
    }

    /// Waits for `staging` (MAP_READ) to map and returns its first `bytes` as f32.
    pub fn map_read(&self, staging: &wgpu::Buffer, bytes: u64) -> Result<Vec<f32>> {
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, 0..bytes.max(4), move |r| {
            let _ = tx.send(r);
        });
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| anyhow!("GPU poll failed: {e}"))?;
        self.check_error()?;
        rx.recv()?.map_err(|e| anyhow!("readback failed: {e}"))?;
        let out = {
            let view = staging.get_mapped_range(..)?;
            bytemuck::cast_slice::<u8, f32>(&view[..bytes as usize]).to_vec()
        };
        staging.unmap();
        Ok(out)
    }

    /// Blocks until all submitted work is done.
    pub fn sync(&self) -> Result<()> {
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| anyhow!("GPU poll failed: {e}"))?;
        self.check_error()
    }
}

/// The smallest size >= `n` that is not a power of two (3 for 1 and 2), or `n`
/// itself if that would pass the adapter's texture limit `max`.
///
/// Why: llvmpipe/lavapipe compiles a kernel at its first dispatch, once per
/// combination of its textures' static state, and that state includes whether
/// each dimension is a power of two. CvT's layer widths are powers of two in
/// stage 0 and not in later stages, so without padding every texture GEMM JITs
/// twice (about 1 s each on lavapipe). Kernels never read a texture's height, and
/// read its width only for linear textures, which are always powers of two wide;
/// so heights, and the widths of textures read by coordinates (weights,
/// attention and depthwise image chunks), are padded to a non-power of two: one
/// extra row or column, never read.
pub fn npot(n: u32, max: u32) -> u32 {
    let mut m = n.max(3);
    while m.is_power_of_two() {
        m += 1;
    }
    if m <= max {
        m
    } else {
        n
    }
}

/// An rgba32float texture that kernels read (sampled or as a read-only storage
/// texture, `texread`: both usages, so pipelines of either mode can bind it) and
/// copies or `pack` fill; at least `height` rows (see [`npot`]).
pub fn texture(gpu: &Gpu, label: &str, width: u32, height: u32) -> wgpu::Texture {
    texture_of(gpu, label, width, height, wgpu::TextureFormat::Rgba32Float)
}

/// As `texture`, in `format` (rgba16float in f16 plans).
pub fn texture_of(gpu: &Gpu, label: &str, width: u32, height: u32, format: wgpu::TextureFormat) -> wgpu::Texture {
    let usage = wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST | wgpu::TextureUsages::STORAGE_BINDING;
    texture_as(gpu, label, width, height, format, usage)
}

/// Bytes of one texel of `tex_format(half)`.
pub fn texel_bytes(half: bool) -> usize {
    if half {
        8
    } else {
        16
    }
}

/// The texture format of an f16 plan's textures (`half`) or of an f32 one's.
pub fn tex_format(half: bool) -> wgpu::TextureFormat {
    if half {
        wgpu::TextureFormat::Rgba16Float
    } else {
        wgpu::TextureFormat::Rgba32Float
    }
}

/// A 2D texture of `format`, `width` wide and at least `height` rows (see [`npot`]).
fn texture_as(gpu: &Gpu, label: &str, width: u32, height: u32, format: wgpu::TextureFormat, usage: wgpu::TextureUsages) -> wgpu::Texture {
    gpu.device.create_texture(&wgpu::TextureDescriptor {
        label: Some(label),
        size: wgpu::Extent3d { width, height: npot(height, gpu.limits.max_texture_dimension_2d), depth_or_array_layers: 1 },
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format,
        usage,
        view_formats: &[],
    })
}

/// A texture whose first `height` rows of `width` rgba32float texels are `data`
/// (row-major), read by coordinates (never as a linear texture): both dimensions
/// padded to non-powers of two (see [`npot`]).
pub fn texture_from(gpu: &Gpu, label: &str, data: &[f32], width: u32, height: u32) -> wgpu::TextureView {
    let t = texture(gpu, label, npot(width, gpu.limits.max_texture_dimension_2d), height);
    fill_texture(gpu, &t, bytemuck::cast_slice(data), 16, width, height)
}

/// As `texture_from`, or `texture_from_f16` when `half`.
pub fn texture_from_in(gpu: &Gpu, label: &str, data: &[f32], width: u32, height: u32, half: bool) -> wgpu::TextureView {
    if half {
        texture_from_f16(gpu, label, data, width, height)
    } else {
        texture_from(gpu, label, data, width, height)
    }
}

/// As `texture_from`, stored as rgba16float (kernels read it as f32 all the same).
pub fn texture_from_f16(gpu: &Gpu, label: &str, data: &[f32], width: u32, height: u32) -> wgpu::TextureView {
    let usage = wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST | wgpu::TextureUsages::STORAGE_BINDING;
    let t = texture_as(gpu, label, npot(width, gpu.limits.max_texture_dimension_2d), height, wgpu::TextureFormat::Rgba16Float, usage);
    fill_texture(gpu, &t, bytemuck::cast_slice(&to_f16(data)), 8, width, height)
}

/// Width in texels of a linear texture of `texels` texels of `texel_bytes`: 256
/// bytes (what row copies need), doubled while the height would pass the
/// device's `max` dimension (a power of two, as `lin` needs).
pub fn linear_width(texels: usize, max: usize, texel_bytes: usize) -> usize {
    let mut width = 256 / texel_bytes;
    while texels.div_ceil(width) > max && width < max {
        width *= 2;
    }
    width
}

/// A constant parameter vector (a bias, LayerNorm's gamma or beta) as a linear
/// texture (`texread`'s `lin`: vec4 i at (i % W, i / W), W a power of two), made
/// once at load. Kernels on CPU drivers read such parameters as texels: from a
/// storage buffer each load is a loop over the SIMD lanes.
/// `half`: stored as rgba16float, for f16 plans.
pub fn linear_texture_from(gpu: &Gpu, label: &str, data: &[f32], half: bool) -> Arc<wgpu::TextureView> {
    let max = gpu.limits.max_texture_dimension_2d;
    let texels = data.len().div_ceil(4).max(1);
    let width = linear_width(texels, max as usize, texel_bytes(half)) as u32;
    let height = (texels as u32).div_ceil(width);
    let mut padded = data.to_vec();
    padded.resize((width * height * 4) as usize, 0.0);
    // Height padded off powers of two like the graph's textures (see `npot`).
    let t = texture_of(gpu, label, width, npot(height, max), tex_format(half));
    let view = if half { fill_texture(gpu, &t, bytemuck::cast_slice(&to_f16(&padded)), 8, width, height) } else { fill_texture(gpu, &t, bytemuck::cast_slice(&padded), 16, width, height) };
    Arc::new(view)
}

/// GPU bytes of a texture as allocated (padding included).
pub fn texture_bytes(t: &wgpu::TextureView) -> u64 {
    let t = t.texture();
    t.width() as u64 * t.height() as u64 * texel_bytes(t.format() == wgpu::TextureFormat::Rgba16Float) as u64
}

/// f32 values rounded to f16 (nearest even), for f16 weight storage.
pub fn to_f16(data: &[f32]) -> Vec<half::f16> {
    data.iter().map(|&v| half::f16::from_f32(v)).collect()
}

/// Writes `height` rows of `width` texels of `texel` bytes (`bytes`, row-major)
/// at the texture's origin.
fn fill_texture(gpu: &Gpu, t: &wgpu::Texture, bytes: &[u8], texel: u32, width: u32, height: u32) -> wgpu::TextureView {
    assert_eq!(bytes.len(), (texel * width * height) as usize, "texture data size");
    gpu.queue.write_texture(
        t.as_image_copy(),
        bytes,
        wgpu::TexelCopyBufferLayout { offset: 0, bytes_per_row: Some(texel * width), rows_per_image: Some(height) },
        wgpu::Extent3d { width, height, depth_or_array_layers: 1 },
    );
    t.create_view(&Default::default())
}

/// How linear layers read their operands on this adapter (see `ops::matmul`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MatmulKind {
    /// Storage buffers: the design for GPUs.
    Buffer,
    /// rgba32float textures: for drivers that vectorise texel fetches but not buffer loads.
    Texture,
}
