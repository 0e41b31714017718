//! `cvt-gpu`: a thin command line over the library.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use cvt_gpu::gpu::{list_adapters, AdapterRequest, BackendChoice, Gpu};
use cvt_gpu::models::cvt::{self as model, LoadOptions};
use cvt_gpu::models::Arch;
use cvt_gpu::ops::Act;
use cvt_gpu::{bench, labels, preprocess};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "cvt-gpu",
    version,
    about = "CvT and ConViT vision transformers: inference and training on any GPU (Vulkan, Metal, DX12, GL) via wgpu",
    after_help = "Examples:\n  cvt-gpu infer --weights weights/fmnist/model.safetensors weights/samples/fmnist-ankle-boot.png\n  cvt-gpu infer --weights cvt-13.safetensors --json --topk 3 cat.png dog.jpg\n  cvt-gpu train --fashion-mnist --out runs/fmnist\n  cvt-gpu eval --weights runs/fmnist/model.safetensors --fashion-mnist\n  cvt-gpu bench --model cvt-13 --batch 8\n  cvt-gpu convert CvT-13-224x224-IN-1k.pth cvt-13.safetensors\n  cvt-gpu adapters --json                 # adapters and the resolved kernel profile\n  cvt-gpu --kernels gpu infer --weights cvt-13.safetensors cat.png   # force the GPU kernel set"
)]
struct Cli {
    #[command(flatten)]
    gpu: GpuArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct GpuArgs {
    /// GPU backend.
    #[arg(long, global = true, value_enum, env = "CVT_GPU_BACKEND", default_value = "auto")]
    backend: BackendChoice,
    /// Adapter index (from `cvt-gpu adapters`) or a substring of its name.
    #[arg(long, global = true, env = "CVT_GPU_ADAPTER")]
    adapter: Option<String>,
    /// Skip the timed kernel-variant trial and its on-disk cache (~/.cache/cvt-gpu/tuning.json); use a fixed rule per device type.
    #[arg(long, global = true)]
    no_tune: bool,
    /// Kernel set: `gpu` (workgroup-tiled kernels for GPUs), `cpu` (texture kernels for CPU drivers such as lavapipe), or `auto` (the adapter's profile: cache, trial, rule). Without it, env CVT_GPU_KERNELS, else auto.
    #[arg(long, global = true, value_enum)]
    kernels: Option<cvt_gpu::profile::KernelChoice>,
}

impl GpuArgs {
    fn open(&self) -> Result<Arc<Gpu>> {
        Gpu::new(&AdapterRequest { backend: self.backend, adapter: self.adapter.clone() })
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// List GPU adapters with their backend, limits and features.
    Adapters {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Classify images with a CvT or ConViT checkpoint and print the top-k classes.
    #[command(
        after_help = "Examples:\n  cvt-gpu infer --weights cvt-13.safetensors cat.png\n  cvt-gpu infer --weights cvt-21-384.safetensors --res 384 a.jpg b.webp --json\n  cvt-gpu infer --weights mine.safetensors --labels classes.txt --topk 3 img.png\n  cvt-gpu infer --weights cvt-w24-384.safetensors --res 384 --f16 img.png\n  cvt-gpu infer --weights convit_tiny.safetensors cat.png          # ConViT (timm or official .pth), detected from its names"
    )]
    Infer(InferArgs),
    /// Measure latency, throughput and GFLOP/s of a CvT forward (or the GEMM ceiling).
    #[command(after_help = "Examples:\n  cvt-gpu bench --model cvt-13 --batch 8\n  cvt-gpu bench --model cvt-w24 --res 384 --iters 2\n  cvt-gpu bench --gemm --json
  cvt-gpu bench --model cvt-w24 --res 384 --f16   # f16 weights and activations; prints the logit difference
  cvt-gpu bench --gemm --shape 12608,1536,384      # any GEMM, GPU-timestamp time beside the wall clock
  cvt-gpu --kernels gpu bench --model cvt-13 --mode train --res 64 --batch 64 --plan-only   # every dispatch's launch shape, not run")]
    Bench(bench::BenchArgs),
    /// Train a CvT or ConViT (from scratch, or fine-tune a checkpoint) with progress, evaluation, checkpoints and resume.
    #[command(
        after_help = "Examples:\n  cvt-gpu train                                   # Fashion-MNIST, cvt-fmnist, 15 epochs -> runs/train\n  cvt-gpu train --fashion-mnist --epochs 5 --out runs/fmnist\n  cvt-gpu train --model convit-fmnist --fashion-mnist --out runs/convit   # ConViT, 8 epochs: 88.1% in 16.5 min on lavapipe\n  cvt-gpu train --tiny-imagenet tiny-imagenet-200 --model cvt-13 --batch 64 --epochs 30 --mixup 0.8 --cutmix 1.0\n  cvt-gpu train --image-folder flowers --weights cvt-13.safetensors --res 224 --lr 1e-4 --epochs 5\n  cvt-gpu train --fashion-mnist --resume runs/fmnist      # continue in runs/fmnist after a stop or a crash\n\nThe run directory holds checkpoint.safetensors (weights + optimizer state; --resume),\nmodel.safetensors (weights with config, labels and preprocessing; for infer/eval),\nmetrics.jsonl (loss, learning rate, img/s per step; evaluation per epoch) and curves.png/.svg.\nCtrl-C, SIGTERM and SIGHUP stop after the current step with a checkpoint (a second one exits at once);\ncheckpoints are also written every 10 minutes (--save-every N: every N steps). One run per directory."
    )]
    Train(cvt_gpu::trainer::TrainArgs),
    /// Top-1/top-5 accuracy of a checkpoint on a dataset's validation split.
    #[command(
        after_help = "Examples:\n  cvt-gpu eval --weights weights/fmnist/model.safetensors --fashion-mnist\n  cvt-gpu eval --weights runs/tin/model.safetensors --tiny-imagenet tiny-imagenet-200 --json"
    )]
    Eval(cvt_gpu::trainer::EvalArgs),
    /// Convert a checkpoint (safetensors or PyTorch .pth/.bin, either naming) to safetensors in the official or Hugging Face naming.
    #[command(
        after_help = "Examples:\n  cvt-gpu convert CvT-13-224x224-IN-1k.pth cvt-13.safetensors\n  cvt-gpu convert pytorch_model.bin cvt-21.safetensors          # HF .bin -> official names\n  cvt-gpu convert runs/fmnist/model.safetensors hf-fmnist/ --naming hf\n      # writes hf-fmnist/model.safetensors + config.json: CvtForImageClassification.from_pretrained(\"hf-fmnist\")"
    )]
    Convert(cvt_gpu::convert::ConvertArgs),
}

#[derive(Args)]
struct InferArgs {
    /// Checkpoint: .safetensors or PyTorch .pth/.pt/.bin (detected by content); CvT (official or Hugging Face names) or ConViT (official = timm names); F32/F16/BF16.
    #[arg(long, short)]
    weights: PathBuf,
    /// Images (PNG, JPEG, WebP, BMP); they are classified as one batch.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Number of classes to print per image.
    #[arg(long, default_value_t = 5)]
    topk: usize,
    /// Label file, one class name per line (default: the checkpoint's labels, or ImageNet-1k).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Input resolution (default: the model's, 224; 384 for CvT-W24).
    #[arg(long)]
    res: Option<usize>,
    /// Images are already at the model's resolution: only convert and normalise.
    #[arg(long)]
    no_resize: bool,
    /// MLP activation (default: QuickGELU for official names, GELU for Hugging Face names).
    #[arg(long, value_enum)]
    activation: Option<Act>,
    /// Architecture: cvt-13, cvt-21, cvt-w24, convit-ti, convit-s, convit-b or a JSON config (default: detected from the weights).
    #[arg(long)]
    config: Option<String>,
    /// Largest number of images per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Run in f16: weights, and on adapters with shader-f16 activations too (half
    /// the weight and activation memory; f32 arithmetic). Logits agree with f32 to
    /// a few 1e-3 (`bench --f16` measures it). CVT_GPU_F16_ACT=0: weights only.
    #[arg(long)]
    f16: bool,
    /// Load weights holding NaN or infinities instead of refusing the file.
    #[arg(long)]
    allow_nonfinite: bool,
    /// Print JSON (per image: index, label, probability and logit of each top-k class).
    #[arg(long)]
    json: bool,
}

fn adapters(args: &GpuArgs, json: bool) -> Result<()> {
    let list = list_adapters(args.backend);
    if json {
        // The adapter a command would open, with its resolved kernel profile.
        let profile = match args.open() {
            Ok(gpu) => serde_json::json!({ "adapter": gpu.describe(), "profile": &*gpu.profile() }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "adapters": list, "selected": profile }))?);
        return Ok(());
    }
    if list.is_empty() {
        bail!("no GPU adapter found: install a Vulkan, Metal, DX12 or GL driver (on Linux without a GPU: `apt-get install mesa-vulkan-drivers`)");
    }
    for a in list {
        println!("[{}] {} ({}, {}, driver {} {})", a.index, a.name, a.backend, a.device_type, a.driver, a.driver_info);
        println!(
            "    storage binding {} MiB, buffer {} MiB, workgroup memory {} KiB, {} invocations/workgroup, {} workgroups/dim, {} storage buffers/stage, subgroup {}..{}",
            a.max_storage_buffer_binding_size >> 20,
            a.max_buffer_size >> 20,
            a.max_compute_workgroup_storage_size >> 10,
            a.max_compute_invocations_per_workgroup,
            a.max_compute_workgroups_per_dimension,
            a.max_storage_buffers_per_shader_stage,
            a.min_subgroup_size,
            a.max_subgroup_size
        );
        println!("    features: {}", a.features.join(" "));
    }
    let gpu = args.open()?;
    let p = gpu.profile();
    println!(
        "kernel profile of {}: {} kernel set, {} texture reads, GEMM tiles {:?} x {} invocations, row lanes {} (`adapters --json` has every choice and its source)",
        gpu.describe(),
        p.kernels.name(),
        p.texture_read.name(),
        p.gemm.tiles,
        p.gemm.invocations,
        p.row_lanes
    );
    Ok(())
}

#[derive(serde::Serialize)]
struct Prediction {
    index: usize,
    label: String,
    probability: f32,
    logit: f32,
}

#[derive(serde::Serialize)]
struct ImageResult {
    image: String,
    top: Vec<Prediction>,
}

fn infer(g: &GpuArgs, a: &InferArgs) -> Result<()> {
    if a.topk == 0 {
        bail!("--topk must be at least 1");
    }
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if let Some(r) = a.res {
        model::check_resolution(r).context("--res")?;
    }
    let arch = a.config.as_deref().map(Arch::by_name).transpose()?;
    let gpu = g.open()?;
    let loaded = cvt_gpu::models::load(gpu, &a.weights, arch, &LoadOptions { config: None, activation: a.activation, f16: a.f16, allow_nonfinite: a.allow_nonfinite })?;
    let m = &loaded.model;
    let arch = m.arch();
    // --res was checked above; image_size by the config's validation.
    let res = a.res.unwrap_or(arch.image_size());
    arch.check_res(res)?;
    let names = labels::for_head(arch.num_classes(), a.labels.as_deref(), loaded.labels.clone())?;
    let resize = if a.no_resize { preprocess::Resize::None } else { preprocess::Resize::Eval };
    if loaded.preprocess.channels != arch.in_chans() {
        bail!("{}: the model takes {} input channels but its preprocessing gives {}", a.weights.display(), arch.in_chans(), loaded.preprocess.channels);
    }
    // The plan first (halved until it fits the adapter): an input too large for
    // the adapter fails here, before any image is decoded or resized.
    let full = m.plan_fitting(a.batch.min(a.images.len()), res, res)?;
    let chunk = full.batch;
    let mut inputs = Vec::with_capacity(a.images.len());
    for p in &a.images {
        inputs.push(loaded.preprocess.load(p, res, resize)?);
    }
    let classes = arch.num_classes();
    let mut results = vec![];
    let mut tail: Option<model::ForwardPlan> = None;
    for (ci, imgs) in inputs.chunks(chunk).enumerate() {
        let n = imgs.len();
        let plan = if n == chunk { &full } else { tail.get_or_insert(m.plan(n, res, res)?) };
        let (logits, probs) = plan.forward(&imgs.concat())?;
        if let Some(i) = logits.iter().position(|v| !v.is_finite()) {
            bail!(
                "{}: the model's output for {} is not finite ({}); its weights or preprocessing produce NaN or infinity",
                a.weights.display(),
                a.images[ci * chunk + i / classes].display(),
                logits[i]
            );
        }
        for i in 0..n {
            let l = &logits[i * classes..(i + 1) * classes];
            let p = &probs[i * classes..(i + 1) * classes];
            let mut order: Vec<usize> = (0..classes).collect();
            order.sort_by(|&x, &y| p[y].total_cmp(&p[x]).then(x.cmp(&y)));
            let top = order.iter().take(a.topk.min(classes)).map(|&k| Prediction { index: k, label: names[k].clone(), probability: p[k], logit: l[k] }).collect();
            results.push(ImageResult { image: a.images[ci * chunk + i].display().to_string(), top });
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        for r in &results {
            println!("{}", r.image);
            for (rank, p) in r.top.iter().enumerate() {
                println!("  {}. {:6.2}%  {} ({})", rank + 1, 100.0 * p.probability, p.label, p.index);
            }
        }
    }
    Ok(())
}

/// `train`, in one process or as one of an MPI job's (`--features mpi`, then
/// `mpirun -n K cvt-gpu train ...`): each process opens the adapter `--adapter`
/// names, else its rank on this machine modulo the adapters there. An error on
/// any process ends the whole job, naming the rank.
fn train(g: &GpuArgs, a: &cvt_gpu::trainer::TrainArgs) -> Result<()> {
    let world = cvt_gpu::dist::World::init()?;
    if world.size == 1 {
        return cvt_gpu::trainer::train(g.open()?, a, &world);
    }
    let adapters = list_adapters(g.backend).len().max(1);
    let adapter = g.adapter.clone().or_else(|| Some((world.local_rank % adapters).to_string()));
    let result = Gpu::new(&AdapterRequest { backend: g.backend, adapter }).and_then(|gpu| cvt_gpu::trainer::train(gpu, a, &world));
    match result {
        // Every process stops at the same point: each says why, none aborts.
        Err(e) if e.downcast_ref::<cvt_gpu::dist::OnEveryRank>().is_some() => {
            // One write: the ranks share stderr, and a line written in pieces interleaves.
            let line = format!("error: rank {} of {}: {}\n", world.rank, world.size, format!("{e:#}").replace('\n', " "));
            std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes()).ok();
            drop(world);
            std::process::exit(1)
        }
        Err(e) => world.abort(&format!("{e:#}").replace('\n', " ")),
        Ok(()) => Ok(()),
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    cvt_gpu::profile::settings::check()?;
    // The options take the place of their settings, which the profile reads
    // (`profile::settings`), before any device is opened.
    use cvt_gpu::profile::{KernelChoice, KernelSet};
    let kernels = cli.gpu.kernels.map(|k| match k {
        KernelChoice::Auto => None,
        KernelChoice::Gpu => Some(KernelSet::Gpu),
        KernelChoice::Cpu => Some(KernelSet::Cpu),
    });
    cvt_gpu::profile::settings::set_options(cvt_gpu::profile::settings::Options { kernels, no_tune: cli.gpu.no_tune });
    match &cli.cmd {
        Cmd::Adapters { json } => adapters(&cli.gpu, *json),
        Cmd::Infer(a) => infer(&cli.gpu, a),
        Cmd::Bench(a) => bench::run(cli.gpu.open()?, a),
        Cmd::Train(a) => train(&cli.gpu, a),
        Cmd::Eval(a) => cvt_gpu::trainer::eval(cli.gpu.open()?, a),
        Cmd::Convert(a) => cvt_gpu::convert::run(a),
    }
}

fn main() {
    // Output piped into `head` and the like: end quietly when the reader goes away,
    // as command-line tools do, instead of panicking in println! on EPIPE (Rust
    // ignores SIGPIPE by default).
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Mesa's drivers warn on stderr when XDG_RUNTIME_DIR is missing (headless
    // machines, CI); a compute-only program needs no window-system directory.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = std::env::temp_dir().join("cvt-gpu-runtime");
        if std::fs::create_dir_all(&dir).is_ok() {
            #[allow(unused_unsafe)]
            unsafe {
                std::env::set_var("XDG_RUNTIME_DIR", &dir);
            }
        }
    }
    if let Err(e) = run() {
        // One line: the chain of contexts, outermost first.
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}
