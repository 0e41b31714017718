//! `cvt-gpu train` and `cvt-gpu eval`: datasets, the training loop (schedule,
//! clipping, NaN guard, progress, metrics, evaluation), checkpoints and resume.
//! The GPU work itself is `train::TrainModel` (forward + backward) and
//! `train::Optimizer` (AdamW); this module drives them.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::checkpoint::{write_safetensors, Entry, OPTIM_PREFIX};
use crate::data::loader::{epoch_from, Augment, LoaderConfig};
use crate::data::{folder, Dataset, FASHION_MNIST_DIR};
use crate::gpu::Gpu;
use crate::models::cvt::weights::{read_checkpoint, read_checkpoint_bytes, Tensor};
use crate::models::cvt::weights::{Checkpoint, Naming};
use crate::models::cvt::LoadOptions;
use crate::models::{Arch, Net, TrainNet};
use crate::ops::optim::AdamW;
use crate::ops::Act;
use crate::preprocess::Spec;
use crate::rundir::RunDir;

/// Where a run goes when neither --out nor --resume names a directory.
pub const DEFAULT_OUT: &str = "runs/train";

/// Which dataset, from the command line.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DataArgs {
    /// Fashion-MNIST IDX files, gzipped or not [default dir: /usr/share/datasets/fashion-mnist,
    /// from Debian's dataset-fashion-mnist]. The default dataset when none is given.
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = FASHION_MNIST_DIR)]
    pub fashion_mnist: Option<PathBuf>,
    /// Tiny-ImageNet in its official layout (tiny-imagenet-200: wnids.txt, words.txt,
    /// train/<wnid>/images/, val/images/ + val_annotations.txt).
    #[arg(long, value_name = "DIR")]
    pub tiny_imagenet: Option<PathBuf>,
    /// An image folder: DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg.
    #[arg(long, value_name = "DIR")]
    pub image_folder: Option<PathBuf>,
    /// Training and evaluation resolution (default: 28 for Fashion-MNIST, 64 for
    /// Tiny-ImageNet, the model's for an image folder).
    #[arg(long)]
    pub res: Option<usize>,
}

/// A dataset opened for training or evaluation.
pub struct Data {
    pub name: &'static str,
    pub train: Option<Arc<Dataset>>,
    pub val: Arc<Dataset>,
    pub spec: Spec,
    /// Images that failed to decode (skipped).
    pub skipped: Vec<String>,
}

fn decode_with_bar(list: &folder::FileList, res: usize, what: &str, quiet: bool) -> (Dataset, Vec<String>) {
    let bar = progress_bar(list.files.len() as u64, quiet);
    bar.set_message(format!("decoding {what}"));
    let (ds, failed) = folder::decode_all(list, res, &|d| bar.set_position(d as u64));
    bar.finish_and_clear();
    (ds, failed)
}

impl DataArgs {
    fn default_res(&self) -> Option<usize> {
        if self.tiny_imagenet.is_some() {
            Some(64)
        } else if self.image_folder.is_some() {
            None
        } else {
            Some(28)
        }
    }

    /// Opens the chosen dataset; `train` false reads only the validation split.
    pub fn open(&self, train: bool, model_res: usize, quiet: bool) -> Result<Data> {
        let chosen = [self.fashion_mnist.is_some(), self.tiny_imagenet.is_some(), self.image_folder.is_some()].iter().filter(|&&b| b).count();
        if chosen > 1 {
            bail!("choose one dataset: --fashion-mnist, --tiny-imagenet or --image-folder");
        }
        let res = self.res.or(self.default_res()).unwrap_or(model_res);
        crate::models::cvt::check_resolution(res).context("--res")?;
        let imagenet = Spec { resize: "plain".into(), ..Spec::imagenet() };
        if let Some(dir) = &self.tiny_imagenet {
            let val_list = folder::tiny_imagenet(dir, "val")?;
            let train_list = if train { Some(folder::tiny_imagenet(dir, "train")?) } else { None };
            return Self::decode(train_list, val_list, res, imagenet, "tiny-imagenet", quiet);
        }
        if let Some(dir) = &self.image_folder {
            let train_list = folder::image_folder(dir, "train", None)?;
            let val_list = folder::image_folder(dir, "val", Some(&train_list.classes))?;
            let spec = Spec::imagenet();
            return Self::decode(train.then_some(train_list), val_list, res, spec, "image-folder", quiet);
        }
        let dir = self.fashion_mnist.clone().unwrap_or_else(|| PathBuf::from(FASHION_MNIST_DIR));
        if res != 28 {
            bail!("Fashion-MNIST images are 28x28; --res {res} is not supported for it");
        }
        let train_ds = if train { Some(Arc::new(crate::data::fashion_mnist(&dir, "train")?)) } else { None };
        let val = Arc::new(crate::data::fashion_mnist(&dir, "t10k")?);
        let spec = Spec { channels: 1, mean: vec![0.2860], std: vec![0.3530], resize: "plain".into() };
        Ok(Data { name: "fashion-mnist", train: train_ds, val, spec, skipped: vec![] })
    }

    fn decode(train: Option<folder::FileList>, val: folder::FileList, res: usize, spec: Spec, name: &'static str, quiet: bool) -> Result<Data> {
        // The decoded set is held in memory at --res: refuse one that cannot fit
        // before decoding a single image.
        let images = val.files.len() + train.as_ref().map_or(0, |t| t.files.len());
        let bytes = (images as u128) * (res as u128) * (res as u128) * 3;
        if let Some(mem) = crate::util::physical_memory() {
            if bytes > mem as u128 / 2 {
                bail!(
                    "{images} images at {res}x{res} take {:.1} GiB decoded, more than half this machine's memory ({:.1} GiB): lower --res",
                    bytes as f64 / (1u64 << 30) as f64,
                    mem as f64 / (1u64 << 30) as f64
                );
            }
        }
        let mut skipped = vec![];
        let train = match train {
            Some(list) => {
                let (ds, failed) = decode_with_bar(&list, res, "train images", quiet);
                skipped.extend(failed);
                if ds.is_empty() {
                    bail!("no training image could be decoded ({} failed; first: {})", skipped.len(), skipped.first().map(|s| s.as_str()).unwrap_or("-"));
                }
                Some(Arc::new(ds))
            }
            None => None,
        };
        let (val_ds, failed) = decode_with_bar(&val, res, "validation images", quiet);
        skipped.extend(failed);
        if val_ds.is_empty() {
            bail!("no validation image could be decoded");
        }
        for s in &skipped {
            eprintln!("warning: skipped {s}");
        }
        Ok(Data { name, train, val: Arc::new(val_ds), spec, skipped })
    }
}

fn progress_bar(len: u64, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta}").expect("valid template").progress_chars("=> "));
    bar
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// cvt-fmnist, cvt-13, cvt-21, cvt-w24, convit-fmnist, convit-ti, convit-s,
    /// convit-b or a JSON config [default: cvt-fmnist for Fashion-MNIST, cvt-13
    /// otherwise]. Classes, input channels and (ConViT) the input size follow the data.
    /// With --weights: the checkpoint's architecture, for files that do not record it.
    #[arg(long)]
    pub model: Option<String>,
    /// CvT's MLP activation (ConViT's is always exact GELU).
    #[arg(long, value_enum, default_value = "quick-gelu")]
    pub activation: Act,
    /// Start from this checkpoint (any `infer` accepts); a head whose class count
    /// differs from the data's is re-initialised.
    #[arg(long, conflicts_with = "resume")]
    pub weights: Option<PathBuf>,
    /// Continue an interrupted run from its checkpoint.safetensors (or its run
    /// directory); the run goes on in that directory unless --out names another.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Run directory: checkpoint.safetensors, model.safetensors, metrics.jsonl,
    /// curves.png/.svg [default: runs/train; with --resume, the resumed run's].
    /// One run at a time: a second run on a directory in use is refused.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also checkpoint every N optimizer steps [default: every 10 minutes], so a
    /// crash or SIGKILL loses at most that much work; epochs end with one anyway.
    #[arg(long, value_name = "N")]
    pub save_every: Option<u64>,
    /// Epochs [default: 15 for Fashion-MNIST, 3 otherwise; on --resume, the run's own, which this may raise].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Images per micro-batch (per forward and backward).
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Gradient accumulation: N micro-batches of --batch images, their gradients
    /// added, then one optimizer step (a batch of N × --batch; BatchNorm's statistics
    /// stay per micro-batch, as in PyTorch). Steps, the schedule and the logs count
    /// optimizer steps [default: 1; on --resume, the run's own].
    #[arg(long)]
    pub accum_steps: Option<usize>,
    /// Data parallelism (`mpirun`): all-reduce the gradients after the backward
    /// instead of bucket by bucket during it (to measure what the overlap hides).
    #[arg(long)]
    pub no_overlap: bool,
    /// Data parallelism: gradients are all-reduced in buckets of about this many
    /// MiB (as DDP's bucket_cap_mb): larger amortise each all-reduce's latency,
    /// smaller start sooner in the backward.
    #[arg(long, default_value_t = 8.0)]
    pub bucket_mb: f64,
    /// Peak learning rate (after warmup; cosine decay to --min-lr) [default: 4e-3 for
    /// Fashion-MNIST, 3e-3 otherwise].
    #[arg(long)]
    pub lr: Option<f32>,
    #[arg(long, default_value_t = 1e-5)]
    pub min_lr: f32,
    /// Linear warmup length in optimizer steps.
    #[arg(long, default_value_t = 200)]
    pub warmup_steps: u64,
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f32,
    /// Clip the global gradient norm to this value (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub clip_grad: f32,
    #[arg(long, default_value_t = 0.1)]
    pub label_smoothing: f32,
    /// Mixup alpha (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub mixup: f32,
    /// Cutmix alpha (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub cutmix: f32,
    /// Random-resized-crop minimum area fraction (0: off) [default: 0 for Fashion-MNIST, 0.35 otherwise].
    #[arg(long)]
    pub crop_scale: Option<f32>,
    /// No random horizontal flips.
    #[arg(long)]
    pub no_flip: bool,
    /// Stochastic depth. CvT: one rate for the last stage (the official recipes use
    /// 0.1 there), or one per stage ("0,0.05,0.1"); within a stage the rate rises
    /// linearly from 0 over its blocks, as the official code. ConViT: one rate,
    /// rising linearly from 0 over all blocks (the DeiT/ConViT recipe's 0.1).
    #[arg(long, default_value = "0")]
    pub drop_path: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop (with a checkpoint, as a stop signal does) after this many optimizer steps in this invocation.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Evaluate on at most this many validation images per epoch (default: all).
    #[arg(long)]
    pub eval_limit: Option<usize>,
    /// Train on only the first N training images (quick experiments, tests).
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// No progress bars; one JSON line per epoch on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Settings that must match when resuming, and the position in the run.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// Epoch in progress and batches of it done.
    pub epoch: usize,
    pub batch_in_epoch: usize,
    pub seed: u64,
    pub batch: usize,
    pub epochs: usize,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup_steps: u64,
    pub weight_decay: f32,
    pub clip_grad: f32,
    pub label_smoothing: f32,
    pub mixup: f32,
    pub cutmix: f32,
    pub crop_scale: f32,
    pub flip: bool,
    pub res: usize,
    pub dataset: String,
    #[serde(default)]
    pub train_limit: Option<usize>,
    /// Drop-path rate per stage.
    #[serde(default)]
    pub drop_path: Vec<f32>,
    /// Micro-batches per optimizer step, per process.
    #[serde(default = "one")]
    pub accum_steps: usize,
    /// Processes of the run (data parallelism).
    #[serde(default = "one")]
    pub ranks: usize,
}

fn one() -> usize {
    1
}

/// "0.1" (the last stage) or "a,b,c" (per stage) into per-stage rates.
fn parse_drop_path(text: &str, stages: usize) -> Result<Vec<f32>> {
    let vals: Vec<f32> =
        text.split(',').map(|v| v.trim().parse::<f32>()).collect::<std::result::Result<_, _>>().with_context(|| format!("--drop-path {text}: expected a rate or one rate per stage"))?;
    if vals.iter().any(|v| !(0.0..1.0).contains(v)) {
        bail!("--drop-path {text}: rates must be in [0, 1)");
    }
    match vals.len() {
        1 => Ok((0..stages).map(|s| if s + 1 == stages { vals[0] } else { 0.0 }).collect()),
        n if n == stages => Ok(vals),
        n if stages == 1 => bail!("--drop-path {text}: {n} rates; this model takes one"),
        n => bail!("--drop-path {text}: {n} rates for a {stages}-stage model"),
    }
}

/// Cosine learning rate with linear warmup, per optimizer step (1-based).
pub fn learning_rate(s: &TrainState, total_steps: u64, step: u64) -> f32 {
    if step <= s.warmup_steps {
        return s.lr * step as f32 / s.warmup_steps.max(1) as f32;
    }
    let t = (step - s.warmup_steps) as f64 / (total_steps.saturating_sub(s.warmup_steps)).max(1) as f64;
    (s.min_lr as f64 + 0.5 * (s.lr - s.min_lr) as f64 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())) as f32
}

fn weight_entries(t: &HashMap<String, Tensor>) -> Vec<Entry<'_>> {
    let mut names: Vec<&String> = t.keys().collect();
    names.sort();
    names.into_iter().map(|n| Entry::f32(n.clone(), t[n].shape.clone(), &t[n].data)).collect()
}

/// Writes checkpoint.safetensors (weights + optimizer + state) then model.safetensors (weights).
/// `weights`: `TrainModel::weights()` of the model as it is now.
fn save(out: &Path, weights: &HashMap<String, Tensor>, opt: &crate::models::step::Optimizer, state: &TrainState, meta: &HashMap<String, String>) -> Result<()> {
    let moments = opt.state()?;
    let mut entries = weight_entries(weights);
    for (name, m, v) in &moments {
        entries.push(Entry::f32(format!("{OPTIM_PREFIX}{name}.exp_avg"), vec![m.len()], m));
        entries.push(Entry::f32(format!("{OPTIM_PREFIX}{name}.exp_avg_sq"), vec![v.len()], v));
    }
    let mut full_meta = meta.clone();
    full_meta.insert("train_state".into(), serde_json::to_string(state)?);
    write_safetensors(&out.join("checkpoint.safetensors"), &entries, &full_meta)?;
    write_safetensors(&out.join("model.safetensors"), &weight_entries(weights), meta)
}

/// Top-1, top-5 accuracy and mean cross-entropy of a model on a dataset.
#[derive(serde::Serialize, Debug, Clone, Copy)]
pub struct EvalResult {
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
    pub images: usize,
}

pub fn evaluate(model: &Net, ds: &Dataset, spec: &Spec, limit: Option<usize>, quiet: bool) -> Result<EvalResult> {
    evaluate_shared(model, ds, spec, limit, quiet, &crate::dist::World::single())
}

/// `evaluate` with the images shared among the run's processes (image i on
/// process i mod K) and the counts summed.
pub fn evaluate_shared(model: &Net, ds: &Dataset, spec: &Spec, limit: Option<usize>, quiet: bool, world: &crate::dist::World) -> Result<EvalResult> {
    let res = ds.height;
    let n = limit.unwrap_or(usize::MAX).min(ds.len());
    let mine: Vec<usize> = (0..n).filter(|i| i % world.size == world.rank).collect();
    let plan = model.plan_fitting(256.min(mine.len().max(1)), res, ds.width)?;
    let classes = model.arch().num_classes();
    let bar = progress_bar(mine.len() as u64, quiet);
    bar.set_message("evaluating");
    let (mut c1, mut c5, mut loss) = (0usize, 0usize, 0f64);
    let mut tail = None;
    for idx in mine.chunks(plan.batch) {
        let mut images = Vec::with_capacity(idx.len() * res * ds.width * spec.channels);
        for &i in idx {
            let px = ds.image(i);
            let rgb: Vec<u8> = if ds.channels == 1 { px.iter().flat_map(|&v| [v, v, v]).collect() } else { px.to_vec() };
            images.extend(spec.normalize(&rgb));
        }
        let p = if idx.len() == plan.batch { &plan } else { tail.get_or_insert(model.plan(idx.len(), res, ds.width)?) };
        let (_, probs) = p.forward(&images)?;
        if probs.iter().any(|v| !v.is_finite()) {
            bail!("the model's output is not finite on validation images {}..{}: its weights produce NaN or infinity", idx[0], idx[idx.len() - 1]);
        }
        for (b, &i) in idx.iter().enumerate() {
            let pr = &probs[b * classes..(b + 1) * classes];
            let label = ds.labels[i] as usize;
            let better = pr.iter().filter(|&&v| v > pr[label]).count();
            c1 += (better == 0) as usize;
            c5 += (better < 5) as usize;
            loss -= (pr[label].max(1e-30) as f64).ln();
        }
        bar.inc(idx.len() as u64);
    }
    bar.finish_and_clear();
    let mut sums = [c1 as f64, c5 as f64, loss];
    world.sum_f64(&mut sums);
    Ok(EvalResult { top1: sums[0] / n as f64, top5: sums[1] / n as f64, loss: sums[2] / n as f64, images: n })
}

/// Reads a training checkpoint (a file or its run directory): the checkpoint,
/// the optimizer moments by parameter name, and the file's path.
fn read_training_checkpoint(path: &Path) -> Result<(Checkpoint, HashMap<String, Vec<f32>>, PathBuf)> {
    let path = if path.is_dir() { path.join("checkpoint.safetensors") } else { path.to_path_buf() };
    let shown = path.display();
    // One read serves the weights and the optimizer moments.
    let bytes = crate::util::read_limited(&path, crate::util::limits::WEIGHTS, "checkpoint")?;
    let ck = read_checkpoint_bytes(&bytes, &shown.to_string())?;
    if !ck.metadata.contains_key("train_state") {
        bail!("{shown}: not a cvt-gpu training checkpoint (no train_state); to start from its weights use --weights");
    }
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{shown}: {e:?}"))?;
    let mut moments = HashMap::new();
    for (name, view) in st.tensors() {
        if let Some(rest) = name.strip_prefix(OPTIM_PREFIX) {
            moments.insert(rest.to_string(), bytemuck::pod_collect_to_vec::<u8, f32>(view.data()));
        }
    }
    Ok((ck, moments, path))
}

/// Loads weights for fine-tuning: any checkpoint `infer` reads, interpreted as
/// `model::describe` does; the head is re-initialised when its class count
/// differs from the data's. The activation is None when the checkpoint leaves it
/// to the default of its naming (official names: `--activation` decides).
/// `model`: `--model` given with `--weights`, the checkpoint's architecture when it
/// carries none (a .pth of a non-released shape); its class and channel counts are
/// taken from the checkpoint's tensors.
fn fine_tune_weights(path: &Path, model: Option<&str>, classes: usize, seed: u64) -> Result<(Arch, HashMap<String, Tensor>, Option<Act>, Option<Spec>)> {
    let shown = path.display();
    let ck = read_checkpoint(path)?;
    let arch = match model {
        Some(m) => {
            let mut arch = Arch::by_name(m)?;
            // Shapes of any other rank are named by the description's check below.
            let head = ck.tensors.get("head.weight").and_then(|h| h.shape.first()).copied();
            let first_conv = if ck.family == crate::models::Family::Cvt { "stage0.patch_embed.proj.weight" } else { "patch_embed.proj.weight" };
            let chans = ck.tensors.get(first_conv).and_then(|p| p.shape.get(1)).copied();
            match &mut arch {
                Arch::Cvt(c) => (c.num_classes, c.in_chans) = (head.unwrap_or(c.num_classes), chans.unwrap_or(c.in_chans)),
                Arch::Convit(c) => (c.num_classes, c.in_chans) = (head.unwrap_or(c.num_classes), chans.unwrap_or(c.in_chans)),
            }
            Some(arch)
        }
        None => None,
    };
    let (mut arch, act, spec) = describe_any(&ck, path, arch)?;
    let mut t = ck.tensors;
    if arch.num_classes() != classes {
        eprintln!("note: {shown} has a {}-class head; the data has {classes} classes, so the head is re-initialised", arch.num_classes());
        match &mut arch {
            Arch::Cvt(c) => c.num_classes = classes,
            Arch::Convit(c) => c.num_classes = classes,
        }
        let fresh = arch.init_tensors(seed);
        t.insert("head.weight".into(), fresh["head.weight"].clone());
        t.insert("head.bias".into(), fresh["head.bias"].clone());
    }
    Ok((arch, t, act, spec))
}

/// A checkpoint's architecture in either family (`arch`: `--model`), checked
/// against its tensors, with its activation (CvT: None where the naming's default
/// applies and official names leave `--activation` to decide) and preprocessing.
fn describe_any(ck: &Checkpoint, path: &Path, arch: Option<Arch>) -> Result<(Arch, Option<Act>, Option<Spec>)> {
    let d = crate::models::describe(ck, path, arch, &LoadOptions::default(), "--model")?;
    let act = (d.act_explicit || ck.naming == Naming::Hf).then_some(d.act);
    Ok((d.arch, act, d.preprocess))
}

/// Fits the data to the model's input channels: a 1-channel model on RGB data
/// gets it in grayscale. The checkpoint's own preprocessing (normalisation) wins
/// when it has one for that channel count; a grayscale view of RGB data without one
/// is normalised with mean 0.5, std 0.5.
fn fit_channels(model_chans: usize, spec: &Spec, sets: &mut [&mut Arc<Dataset>], ck_spec: Option<Spec>, what: &str) -> Result<Spec> {
    let ck_spec = ck_spec.filter(|s| s.channels == model_chans);
    if model_chans == spec.channels {
        return Ok(ck_spec.unwrap_or_else(|| spec.clone()));
    }
    if model_chans == 1 && spec.channels == 3 {
        for ds in sets.iter_mut() {
            **ds = Arc::new(ds.to_gray());
        }
        return Ok(ck_spec.unwrap_or(Spec { channels: 1, mean: vec![0.5], std: vec![0.5], resize: spec.resize.clone() }));
    }
    bail!("{what}: the model takes {model_chans} input channels, the data has {}", spec.channels)
}

/// Appends one JSON line to metrics.jsonl.
fn log_metrics(out: &Path, v: serde_json::Value) -> Result<()> {
    let p = out.join("metrics.jsonl");
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&p).with_context(|| format!("{}: cannot write", p.display()))?;
    writeln!(f, "{v}").with_context(|| format!("{}: cannot write", p.display()))
}

/// On resume in the same directory: drops the metrics logged after the
/// checkpoint (steps that will be run again), so no step is logged twice.
fn truncate_metrics(out: &Path, step: u64) -> Result<()> {
    let p = out.join("metrics.jsonl");
    if !p.is_file() {
        return Ok(());
    }
    let text = crate::util::read_text_limited(&p, crate::util::limits::TEXT, "metrics file")?;
    let keep = |l: &&str| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["step"].as_u64()).is_none_or(|s| s <= step);
    let kept: Vec<&str> = text.lines().filter(keep).collect();
    if kept.len() == text.lines().count() {
        return Ok(());
    }
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    crate::checkpoint::write_atomic(&p, body.as_bytes())
}

/// A new run's settings: the options, with the dataset's defaults where they say nothing.
/// `family`: the model's, whose Fashion-MNIST default epochs differ (each fits
/// the 20 minutes of lavapipe here: 15 of cvt-fmnist, 8 of convit-fmnist).
fn new_state(a: &TrainArgs, dataset: &str, res: usize, train_limit: Option<usize>, drop_path: Vec<f32>, family: crate::models::Family) -> TrainState {
    let fmnist = dataset == "fashion-mnist";
    let fmnist_epochs = if family == crate::models::Family::Convit { 8 } else { 15 };
    TrainState {
        step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        seed: a.seed,
        batch: a.batch,
        // Fashion-MNIST's default: 15 epochs of cvt-fmnist at 4e-3 reach 91.7% in
        // under 20 minutes on lavapipe (weights/README.md; 6 epochs: 90.2%); 8 of
        // convit-fmnist reach 88.1% in 16.5 minutes (docs/perf.md).
        epochs: a.epochs.unwrap_or(if fmnist { fmnist_epochs } else { 3 }),
        lr: a.lr.unwrap_or(if fmnist { 4e-3 } else { 3e-3 }),
        min_lr: a.min_lr,
        warmup_steps: a.warmup_steps,
        weight_decay: a.weight_decay,
        clip_grad: a.clip_grad,
        label_smoothing: a.label_smoothing,
        mixup: a.mixup,
        cutmix: a.cutmix,
        crop_scale: a.crop_scale.unwrap_or(if fmnist { 0.0 } else { 0.35 }),
        flip: !a.no_flip,
        res,
        dataset: dataset.to_string(),
        train_limit,
        drop_path,
        accum_steps: a.accum_steps.unwrap_or(1),
        ranks: 1,
    }
}

/// Range checks of the settings a run uses, each a one-line error naming the option.
fn check_ranges(s: &TrainState, a: &TrainArgs) -> Result<()> {
    let finite_at_least = |name: &str, v: f32, min: f32| -> Result<()> {
        anyhow::ensure!(v.is_finite() && v >= min, "{name} {v}: must be a finite number of at least {min}");
        Ok(())
    };
    anyhow::ensure!(s.lr.is_finite() && s.lr > 0.0, "--lr {}: the learning rate must be positive and finite", s.lr);
    finite_at_least("--min-lr", s.min_lr, 0.0)?;
    anyhow::ensure!(s.min_lr <= s.lr, "--min-lr {} is above --lr {}", s.min_lr, s.lr);
    finite_at_least("--weight-decay", s.weight_decay, 0.0)?;
    finite_at_least("--clip-grad", s.clip_grad, 0.0)?;
    finite_at_least("--mixup", s.mixup, 0.0)?;
    finite_at_least("--cutmix", s.cutmix, 0.0)?;
    anyhow::ensure!((0.0..1.0).contains(&s.label_smoothing), "--label-smoothing {}: must be in [0, 1)", s.label_smoothing);
    // 0 is the documented "off"; otherwise the smallest crop area fraction.
    anyhow::ensure!((0.0..=1.0).contains(&s.crop_scale), "--crop-scale {}: must be in (0, 1], or 0 for no random crops", s.crop_scale);
    anyhow::ensure!((1..=1_000_000).contains(&s.epochs), "--epochs {}: must be in 1..=1000000", s.epochs);
    anyhow::ensure!(s.drop_path.iter().all(|r| (0.0..1.0).contains(r)), "--drop-path {:?}: rates must be in [0, 1)", s.drop_path);
    anyhow::ensure!(s.batch >= 2, "--batch {}: must be at least 2 (BatchNorm needs batch statistics)", s.batch);
    anyhow::ensure!(s.batch <= 1 << 16, "--batch {}: larger than any batch one step can hold", s.batch);
    anyhow::ensure!((1..=4096).contains(&s.accum_steps), "--accum-steps {}: must be in 1..=4096", s.accum_steps);
    anyhow::ensure!(a.bucket_mb.is_finite() && a.bucket_mb > 0.0 && a.bucket_mb <= 1024.0, "--bucket-mb {}: must be in (0, 1024]", a.bucket_mb);
    anyhow::ensure!(a.max_steps != Some(0), "--max-steps 0: must be at least 1");
    anyhow::ensure!(a.save_every != Some(0), "--save-every 0: must be at least 1 step");
    anyhow::ensure!(a.eval_limit != Some(0), "--eval-limit 0: must be at least 1");
    anyhow::ensure!(s.train_limit != Some(0), "--train-limit 0: must be at least 1");
    Ok(())
}

/// SIGINT, SIGTERM and SIGHUP (Ctrl-C, `timeout`, `docker stop`, Slurm, a closed
/// ssh session) ask the run to stop at the next step boundary with a checkpoint;
/// a second signal exits at once (the checkpoint writes are atomic, so at worst
/// the previous checkpoint stays).
fn stop_on_signals() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handler = move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond signal: exiting now, without a new checkpoint");
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step (a checkpoint will be written; a second signal exits at once)");
    };
    if let Err(e) = ctrlc::set_handler(handler) {
        eprintln!("warning: cannot catch stop signals ({e}); a stop loses the steps since the last checkpoint");
    }
    stop
}

/// Everything a run needs before its first step: data, architecture, initial
/// weights, the settings (new or resumed) and the file metadata.
struct Setup {
    data: Data,
    train_ds: Arc<Dataset>,
    val_ds: Arc<Dataset>,
    arch: Arch,
    tensors: HashMap<String, Tensor>,
    act: Act,
    spec: Spec,
    state: TrainState,
    meta: HashMap<String, String>,
    moments: Option<HashMap<String, Vec<f32>>>,
}

impl Setup {
    fn new(a: &TrainArgs, resumed: Option<(Checkpoint, HashMap<String, Vec<f32>>, PathBuf)>) -> Result<Setup> {
        let prev_state: Option<TrainState> = match &resumed {
            Some((ck, _, path)) => Some(serde_json::from_str(&ck.metadata["train_state"]).with_context(|| format!("{}: invalid train_state metadata", path.display()))?),
            None => None,
        };
        // The data: on resume it must be the same dataset and resolution.
        let mut data_args = a.data.clone();
        if let Some(s) = &prev_state {
            data_args.res.get_or_insert(s.res);
        }
        let model_res_hint = match &a.model {
            Some(m) => Arch::by_name(m)?.image_size(),
            None => 224,
        };
        let data = data_args.open(true, model_res_hint, a.json)?;
        let mut train_ds = data.train.clone().context("the dataset has no training split")?;
        let train_limit = prev_state.as_ref().map(|s| s.train_limit).unwrap_or(a.train_limit);
        if let Some(n) = train_limit {
            if n < train_ds.len() {
                let px = train_ds.height * train_ds.width * train_ds.channels;
                let d = &*train_ds;
                train_ds =
                    Arc::new(Dataset { images: d.images[..n * px].to_vec(), labels: d.labels[..n].to_vec(), height: d.height, width: d.width, channels: d.channels, classes: d.classes.clone() });
            }
        }
        let res = train_ds.height;
        let classes = train_ds.classes.clone();

        // Model and initial weights.
        let (arch, tensors, act, ck_spec) = if let Some((ck, _, path)) = &resumed {
            let (arch, act, spec) = describe_any(ck, path, None)?;
            (arch, ck.tensors.clone(), act.unwrap_or(a.activation), spec)
        } else if let Some(w) = &a.weights {
            let (arch, t, act, spec) = fine_tune_weights(w, a.model.as_deref(), classes.len(), a.seed)?;
            (arch, t, act.unwrap_or(a.activation), spec)
        } else {
            let name = a.model.clone().unwrap_or_else(|| if data.name == "fashion-mnist" { "cvt-fmnist".into() } else { "cvt-13".into() });
            let mut arch = Arch::by_name(&name)?;
            arch.fit_data(classes.len(), data.spec.channels, res).with_context(|| format!("--model {name} on {}", data.name))?;
            let t = arch.init_tensors(a.seed);
            (arch, t, a.activation, None)
        };
        // ConViT's MLP is exact GELU whatever --activation says (CvT's choice).
        let act = if arch.family() == crate::models::Family::Convit { Act::Gelu } else { act };
        let mut val_ds = data.val.clone();
        let what = a.weights.as_ref().or(a.resume.as_ref()).map(|p| p.display().to_string()).unwrap_or_else(|| "--model".into());
        let spec = fit_channels(arch.in_chans(), &data.spec, &mut [&mut train_ds, &mut val_ds], ck_spec, &what)?;
        if arch.num_classes() != classes.len() {
            bail!("{what}: the model has {} classes, the data {}", arch.num_classes(), classes.len());
        }
        if arch.fixed_size() && arch.image_size() != res {
            bail!("{what}: {} takes {}x{} inputs, the data is {res}x{res} (--res {})", arch.name(), arch.image_size(), arch.image_size(), arch.image_size());
        }
        let state = match prev_state {
            // A resumed run keeps its own settings (only --epochs may be raised).
            Some(mut s) => {
                if s.dataset != data.name {
                    bail!("{what}: the checkpoint was trained on {}, not {}", s.dataset, data.name);
                }
                if let Some(e) = a.epochs {
                    s.epochs = s.epochs.max(e);
                }
                if let Some(n) = a.accum_steps.filter(|&n| n != s.accum_steps) {
                    bail!("{what}: the run takes {} micro-batches a step, not --accum-steps {n} (a resumed run keeps its batch)", s.accum_steps);
                }
                s
            }
            None => new_state(a, data.name, res, train_limit, parse_drop_path(&a.drop_path, arch.drop_path_groups())?, arch.family()),
        };
        check_ranges(&state, a)?;
        let meta = crate::checkpoint::model_metadata(&arch, act, Some(&classes), Some(&spec))?;
        Ok(Setup { data, train_ds, val_ds, arch, tensors, act, spec, state, meta, moments: resumed.map(|(_, m, _)| m) })
    }
}

/// How a pass over the data ended.
enum EpochEnd {
    Complete {
        loss: f64,
        acc: f64,
        images: usize,
        seconds: f64,
    },
    /// A signal or --max-steps: checkpoint and stop.
    Stopped,
}

/// The run in progress: GPU model, step plan, optimizer, settings and position.
struct Run<'a> {
    a: &'a TrainArgs,
    /// The run's processes (data parallelism; one in the default build).
    world: &'a crate::dist::World,
    gpu: Arc<Gpu>,
    dir: &'a RunDir,
    s: Setup,
    model: TrainNet,
    step_plan: crate::models::step::StepPlan,
    opt: crate::models::step::Optimizer,
    loader: LoaderConfig,
    steps_per_epoch: u64,
    total_steps: u64,
    stop: Arc<AtomicBool>,
    t_run: Instant,
    steps_this_run: u64,
    last_save: Instant,
    /// Data parallelism: the gradient exchange, overlapped with the backward.
    exchange: Option<crate::dist::exchange::Exchange>,
}

/// Checkpoints by wall time when --save-every does not say: a crash or SIGKILL
/// then loses at most this much work.
const SAVE_EVERY_SECONDS: u64 = 600;

impl<'a> Run<'a> {
    fn new(gpu: Arc<Gpu>, a: &'a TrainArgs, world: &'a crate::dist::World, dir: &'a RunDir, mut s: Setup) -> Result<Run<'a>> {
        // A run resumed on another number of processes goes on from the same
        // micro-batch of its epoch, where that is a step boundary now.
        let st = &mut s.state;
        if st.ranks != world.size {
            let done = st.batch_in_epoch * st.ranks * st.accum_steps;
            let per_step = world.size * st.accum_steps;
            anyhow::ensure!(
                done % per_step == 0,
                "the checkpoint stopped after {done} micro-batches of its epoch, not a whole number of steps of {per_step} on {} processes; resume on {} processes",
                world.size,
                st.ranks
            );
            (st.batch_in_epoch, st.ranks) = (done / per_step, world.size);
        }
        let res = s.train_ds.height;
        // Rank 0's parameters (fresh, resumed or fine-tuned) on every process.
        let tensors = if world.size > 1 { broadcast_tensors(world, &s.tensors)? } else { s.tensors.clone() };
        let mut model = TrainNet::new(gpu.clone(), &s.arch, &tensors, s.act)?;
        model.set_drop_path(&s.state.drop_path);
        let step_plan = model.step_plan(s.state.batch, res).map_err(|e| if e.downcast_ref::<crate::graph::TooLarge>().is_some() { anyhow::anyhow!("{e:#}: lower --batch") } else { e })?;
        // Gradients go through accumulators wherever more than one micro-batch
        // (of this process, or of all) makes a step.
        let mut opt = model.optimizer_with(AdamW { weight_decay: s.state.weight_decay, ..AdamW::default() }, s.state.accum_steps * world.size > 1)?;
        if let Some(moments) = &s.moments {
            let moments = if world.size > 1 { broadcast_vectors(world, moments)? } else { moments.clone() };
            opt.load_state(&moments)?;
            opt.step = s.state.step;
        }
        let spec = &s.spec;
        let loader = LoaderConfig {
            batch: s.state.batch,
            seed: s.state.seed,
            label_smoothing: s.state.label_smoothing,
            mean: [spec.mean[0], *spec.mean.get(1).unwrap_or(&0.0), *spec.mean.get(2).unwrap_or(&0.0)],
            std: [spec.std[0], *spec.std.get(1).unwrap_or(&1.0), *spec.std.get(2).unwrap_or(&1.0)],
            augment: Augment { flip: s.state.flip, min_scale: s.state.crop_scale, mixup: s.state.mixup, cutmix: s.state.cutmix },
            drop_last: true,
            shuffle: true,
            shard: crate::data::loader::Shard { rank: world.rank, ranks: world.size, accum: s.state.accum_steps },
        };
        let global = s.state.batch * s.state.accum_steps * world.size;
        let steps_per_epoch = (s.train_ds.len() / global) as u64;
        if steps_per_epoch == 0 {
            bail!(
                "{} training images, fewer than one step's {global} (--batch {} x --accum-steps {} x {} processes): lower --batch or --accum-steps",
                s.train_ds.len(),
                s.state.batch,
                s.state.accum_steps,
                world.size
            );
        }
        if s.state.batch_in_epoch as u64 > steps_per_epoch {
            bail!("the checkpoint stopped at batch {} of an epoch, but the data gives {steps_per_epoch} batches an epoch: not the same data set", s.state.batch_in_epoch);
        }
        let total_steps = steps_per_epoch * s.state.epochs as u64;
        let exchange = if world.size > 1 { Some(crate::dist::exchange::Exchange::new(&gpu, &step_plan, opt.accumulators(), !a.no_overlap, (a.bucket_mb * 1048576.0) as usize)?) } else { None };
        let now = Instant::now();
        Ok(Run { a, world, gpu, dir, s, model, step_plan, opt, loader, steps_per_epoch, total_steps, stop: stop_on_signals(), t_run: now, steps_this_run: 0, last_save: now, exchange })
    }

    /// `--json`: no progress, one JSON line per epoch.
    /// `--json`, or not rank 0 (which alone prints, logs and writes).
    fn quiet(&self) -> bool {
        self.a.json || !self.world.is_root()
    }

    /// Appends to metrics.jsonl (rank 0).
    fn log(&self, v: serde_json::Value) -> Result<()> {
        if self.world.is_root() {
            log_metrics(&self.dir.path, v)?;
        }
        Ok(())
    }

    fn checkpoint_path(&self) -> PathBuf {
        self.dir.join("checkpoint.safetensors")
    }

    fn announce(&self) -> Result<()> {
        if self.quiet() {
            return Ok(());
        }
        let (s, st) = (&self.s, &self.s.state);
        eprintln!(
            "training {} ({:.2}M parameters, {}) on {} ({} train / {} val images, {}x{}, {} classes), batch {}, {} epochs = {} steps, on {}",
            s.arch.name(),
            s.tensors.values().map(|t| t.data.len()).sum::<usize>() as f64 / 1e6,
            serde_json::to_value(s.act)?.as_str().unwrap_or(""),
            s.data.name,
            s.train_ds.len(),
            s.val_ds.len(),
            st.res,
            st.res,
            s.arch.num_classes(),
            match (st.accum_steps, self.world.size) {
                (1, 1) => st.batch.to_string(),
                (n, 1) => format!("{} ({n} micro-batches of {} a step)", st.batch * n, st.batch),
                (n, k) => format!("{} ({k} processes x {n} micro-batches of {} a step)", st.batch * n * k, st.batch),
            },
            st.epochs,
            self.total_steps,
            self.gpu.describe()
        );
        eprintln!(
            "run directory {}; checkpoints every {}",
            self.dir.path.display(),
            match self.a.save_every {
                Some(n) => format!("{n} steps"),
                None => format!("{} minutes", SAVE_EVERY_SECONDS / 60),
            }
        );
        if st.step > 0 {
            eprintln!("resuming at step {} (epoch {}, batch {})", st.step, st.epoch + 1, st.batch_in_epoch);
        }
        Ok(())
    }

    /// Writes checkpoint.safetensors (weights + optimizer + state) then model.safetensors (weights).
    fn save(&mut self, weights: &HashMap<String, Tensor>) -> Result<()> {
        if self.world.is_root() {
            save(&self.dir.path, weights, &self.opt, &self.s.state, &self.s.meta)?;
        }
        self.last_save = Instant::now();
        Ok(())
    }

    fn diverged(&self, what: String) -> anyhow::Error {
        let ck = self.checkpoint_path();
        let last = if ck.is_file() { format!("the last good checkpoint is {}", ck.display()) } else { "no checkpoint was written yet".to_string() };
        let hint = if self.s.state.clip_grad > 0.0 { "try a lower --lr" } else { "try a lower --lr or --clip-grad 1" };
        anyhow::anyhow!("{what} at step {} (epoch {}): training diverged; {last} ({hint})", self.s.state.step + 1, self.s.state.epoch + 1)
    }

    /// One optimizer step on `micro` (its micro-batches, gradients added);
    /// returns the mean loss and the number it got right.
    fn step(&mut self, micro: &[crate::data::loader::Batch]) -> Result<(f32, usize, f32)> {
        let st = &self.s.state;
        let lr = learning_rate(st, self.total_steps, st.step + 1);
        let n = micro.len();
        let k = self.s.arch.num_classes();
        let (mut loss_sum, mut correct) = (0f32, 0usize);
        let world = self.world;
        let accumulating = n * world.size > 1;
        let mut bad = None;
        for (j, batch) in micro.iter().enumerate() {
            // Drop-path masks from (seed, step, micro-batch of the whole step): the
            // same on resume, and whichever process runs the micro-batch.
            let jg = world.rank * n + j;
            let key = st.seed ^ 0xD209 ^ (st.step + 1).wrapping_mul(0x9E37_79B9) ^ (jg as u64).wrapping_mul(0xA076_1D64_78BD_642F);
            self.step_plan.set_drop_path(self.model.drop_path_rates(), &mut crate::util::Rng::new(key))?;
            // The last micro-batch's gradients are summed over the processes
            // as the backward finishes them.
            let (loss, logits) = match &mut self.exchange {
                Some(x) if j + 1 == n => x.run(world, &self.step_plan, &batch.images, &batch.targets, j == 0)?,
                _ => {
                    let out = self.step_plan.run(&batch.images, &batch.targets)?;
                    if accumulating {
                        self.opt.accumulate(j == 0)?;
                    }
                    out
                }
            };
            if !loss.is_finite() {
                bad = Some(loss);
            }
            loss_sum += loss;
            correct += batch
                .labels
                .iter()
                .enumerate()
                .filter(|&(b, &l)| {
                    let row = &logits[b * k..(b + 1) * k];
                    row.iter().filter(|&&v| v > row[l as usize]).count() == 0
                })
                .count();
        }
        // Every process takes the same decisions: a non-finite loss anywhere
        // stops them all.
        if world.any(bad.is_some()) {
            let e = self.diverged(format!("loss is {}", bad.map_or("not finite on another process".to_string(), |l| l.to_string())));
            return Err(if world.size > 1 { crate::dist::OnEveryRank(format!("{e:#}")).into() } else { e });
        }
        // The step's gradient is the mean of the micro-batches' (each a mean over
        // its images): the sum the accumulators hold (over all processes), times
        // 1/(n·K).
        let parts = n * world.size;
        let mean = 1.0 / parts as f32;
        let st = &self.s.state;
        let scale = if st.clip_grad > 0.0 {
            let norm = self.opt.grad_norm()? * mean;
            if !norm.is_finite() {
                return Err(self.diverged(format!("gradient norm is {norm}")));
            }
            (st.clip_grad / (norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        self.opt.update_scaled(lr, scale * mean)?;
        let mut totals = [loss_sum as f64, correct as f64];
        world.sum_f64(&mut totals);
        Ok(((totals[0] / parts as f64) as f32, totals[1] as usize, lr))
    }

    /// The gradient exchange of a data-parallel run, for its log: bytes and
    /// buckets per step, the all-reduce time per step and how much of it the
    /// backward hid.
    fn exchange_report(&self) -> Option<String> {
        let x = self.exchange.as_ref().filter(|x| x.stats.steps > 0)?;
        let st = x.stats;
        let per_step = |s: f64| 1e3 * s / st.steps as f64;
        Some(format!(
            "gradient all-reduce over {} processes{}: {:.1} MB a step in {} bucket{}; {:.1} ms a step in all-reduce, {:.0}% of it hidden behind the backward; the step waits {:.1} ms after its backward ({:.1}% of the run)",
            self.world.size,
            if self.a.no_overlap { " (--no-overlap)" } else { "" },
            x.bytes as f64 / 1e6,
            x.buckets(),
            if x.buckets() == 1 { "" } else { "s" },
            per_step(st.comm_s),
            100.0 * st.hidden_s / st.comm_s.max(1e-12),
            per_step(st.wait_s),
            100.0 * st.wait_s / self.t_run.elapsed().as_secs_f64()
        ))
    }

    fn epoch(&mut self) -> Result<EpochEnd> {
        let bar = progress_bar(self.steps_per_epoch, self.quiet());
        bar.set_position(self.s.state.batch_in_epoch as u64);
        // Micro-batch i of the epoch is chunk i of its order whatever the
        // accumulation: step s takes micro-batches s·n .. s·n + n.
        let n = self.s.state.accum_steps;
        let batches = epoch_from(self.s.train_ds.clone(), self.loader, self.s.state.epoch as u64, self.loader.shard.start_of(self.s.state.batch_in_epoch));
        let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
        let t_epoch = Instant::now();
        // Without a terminal (logs, nohup) the bar is hidden: a plain line every 30 s instead.
        let plain_progress = !self.quiet() && !std::io::IsTerminal::is_terminal(&std::io::stderr());
        let mut last_line = Instant::now();
        let first_batch = self.s.state.batch_in_epoch;
        let mut batches = batches.into_iter();
        while (self.s.state.batch_in_epoch as u64) < self.steps_per_epoch {
            let micro: Vec<_> = batches.by_ref().take(n).collect();
            if micro.len() < n {
                break;
            }
            let images: usize = micro.iter().map(|b| b.labels.len()).sum();
            let (loss, right, lr) = self.step(&micro)?;
            let st = &mut self.s.state;
            st.step += 1;
            st.batch_in_epoch += 1;
            self.steps_this_run += 1;
            correct += right;
            seen += images;
            loss_sum += loss as f64 * images as f64;
            let ips = seen as f64 / t_epoch.elapsed().as_secs_f64();
            let (mean_loss, acc) = (loss_sum / seen as f64, 100.0 * correct as f64 / seen as f64);
            bar.set_message(format!("epoch {}/{} loss {mean_loss:.4} acc {acc:.1}% {ips:.1} img/s", st.epoch + 1, st.epochs));
            bar.inc(1);
            if plain_progress && last_line.elapsed().as_secs() >= 30 {
                last_line = Instant::now();
                let done = st.batch_in_epoch - first_batch;
                let left = self.steps_per_epoch as usize - st.batch_in_epoch;
                let eta = t_epoch.elapsed().as_secs_f64() / done.max(1) as f64 * left as f64;
                eprintln!("epoch {}/{} step {}/{}: loss {mean_loss:.4} acc {acc:.1}% {ips:.1} img/s, epoch ETA {eta:.0} s", st.epoch + 1, st.epochs, st.batch_in_epoch, self.steps_per_epoch);
            }
            let epoch_done = st.batch_in_epoch as u64 == self.steps_per_epoch;
            if st.step % 10 == 0 || epoch_done {
                let rec = serde_json::json!({"kind": "train", "step": st.step, "epoch": st.epoch + 1, "loss": loss, "lr": lr, "img_per_s": ips, "elapsed_s": self.t_run.elapsed().as_secs_f64()});
                if self.world.is_root() {
                    log_metrics(&self.dir.path, rec)?;
                }
            }
            // A signal to any process stops them all at the same step.
            let stop = self.world.any(self.stop.load(Ordering::SeqCst));
            if stop || self.a.max_steps.is_some_and(|m| self.steps_this_run >= m) {
                bar.finish_and_clear();
                return Ok(EpochEnd::Stopped);
            }
            let due = match self.a.save_every {
                Some(n) => st.step % n == 0,
                None => self.last_save.elapsed().as_secs() >= SAVE_EVERY_SECONDS,
            };
            // Rank 0 alone writes: its clock decides (no collective in `save`).
            if due && !epoch_done && self.world.is_root() {
                let w = self.model.weights()?;
                self.save(&w)?;
            }
        }
        bar.finish_and_clear();
        let seconds = t_epoch.elapsed().as_secs_f64();
        Ok(EpochEnd::Complete { loss: loss_sum / seen.max(1) as f64, acc: correct as f64 / seen.max(1) as f64, images: seen, seconds })
    }

    /// End of an epoch: evaluate the exported weights with the inference engine,
    /// checkpoint, log and plot.
    fn end_epoch(&mut self, loss: f64, acc: f64, images: usize, seconds: f64) -> Result<EvalResult> {
        // One readback serves the evaluation and the checkpoint.
        let weights = self.model.weights()?;
        let ev_model = Net::new(self.gpu.clone(), &self.s.arch, &weights, self.s.act, Default::default())?;
        let ev = evaluate_shared(&ev_model, &self.s.val_ds, &self.s.spec, self.a.eval_limit, self.quiet(), self.world)?;
        let st = &mut self.s.state;
        st.epoch += 1;
        st.batch_in_epoch = 0;
        self.save(&weights)?;
        let st = &self.s.state;
        let ips = images as f64 / seconds;
        let rec = serde_json::json!({
            "kind": "eval", "epoch": st.epoch, "step": st.step, "train_loss": loss, "train_acc": acc,
            "val_top1": ev.top1, "val_top5": ev.top5, "val_loss": ev.loss, "val_images": ev.images,
            "epoch_s": seconds, "img_per_s": ips, "elapsed_s": self.t_run.elapsed().as_secs_f64()
        });
        let mut rec = rec;
        if let Some(x) = self.exchange.as_ref().filter(|x| x.stats.steps > 0) {
            let per_step = |s: f64| 1e3 * s / x.stats.steps as f64;
            rec["allreduce"] = serde_json::json!({
                "processes": self.world.size, "bytes_per_step": x.bytes, "buckets": x.buckets(), "overlap": !self.a.no_overlap,
                "allreduce_ms_per_step": per_step(x.stats.comm_s), "hidden_ms_per_step": per_step(x.stats.hidden_s), "wait_after_backward_ms_per_step": per_step(x.stats.wait_s)
            });
        }
        self.log(rec.clone())?;
        let root = self.world.is_root();
        if let Some(Err(e)) = root.then(|| crate::plot::curves(&self.dir.join("metrics.jsonl"), &self.dir.path, &format!("{} on {}", self.s.arch.name(), st.dataset))) {
            eprintln!("warning: no plot ({e:#})");
        }
        if !root {
            // Rank 0 reports.
        } else if self.a.json {
            println!("{rec}");
        } else {
            eprintln!(
                "epoch {}/{}: train loss {loss:.4} acc {:.2}% | val top-1 {:.2}% top-5 {:.2}% loss {:.4} | {ips:.1} img/s, {seconds:.0} s",
                st.epoch,
                st.epochs,
                100.0 * acc,
                100.0 * ev.top1,
                100.0 * ev.top5,
                ev.loss,
            );
        }
        Ok(ev)
    }

    fn run(mut self) -> Result<()> {
        self.announce()?;
        let mut last_eval: Option<EvalResult> = None;
        while self.s.state.epoch < self.s.state.epochs {
            match self.epoch()? {
                EpochEnd::Stopped => {
                    let w = self.model.weights()?;
                    self.save(&w)?;
                    let st = &self.s.state;
                    if !self.world.is_root() {
                        return Ok(());
                    }
                    if let Some(r) = self.exchange_report() {
                        eprintln!("{r}");
                    }
                    eprintln!(
                        "stopped at step {} (epoch {}, batch {}); checkpoint written to {}; continue with: cvt-gpu train --resume {}",
                        st.step,
                        st.epoch + 1,
                        st.batch_in_epoch,
                        self.checkpoint_path().display(),
                        self.dir.path.display()
                    );
                    return Ok(());
                }
                EpochEnd::Complete { loss, acc, images, seconds } => last_eval = Some(self.end_epoch(loss, acc, images, seconds)?),
            }
        }
        if !self.quiet() {
            let acc = last_eval.map(|e| format!(", val top-1 {:.2}%", 100.0 * e.top1)).unwrap_or_default();
            let weights = self.dir.join("model.safetensors");
            eprintln!("done: {} steps in {:.0} s{acc}; weights: {} (cvt-gpu infer --weights {} IMAGE)", self.s.state.step, self.t_run.elapsed().as_secs_f64(), weights.display(), weights.display());
            if let Some(r) = self.exchange_report() {
                eprintln!("{r}");
            }
            if !self.s.data.skipped.is_empty() {
                eprintln!("{} images could not be decoded and were skipped", self.s.data.skipped.len());
            }
        }
        Ok(())
    }
}

pub fn train(gpu: Arc<Gpu>, a: &TrainArgs, world: &crate::dist::World) -> Result<()> {
    // The options' ranges before anything is read or created (a resumed run's
    // stored settings are checked again once read).
    check_ranges(&new_state(a, "", 1, a.train_limit, vec![], crate::models::Family::Cvt), a)?;
    let resumed = a.resume.as_deref().map(read_training_checkpoint).transpose()?;
    // `--resume DIR` continues in DIR unless --out says otherwise.
    let out = match (&a.out, &resumed) {
        (Some(o), _) => o.clone(),
        (None, Some((_, _, path))) => path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf(),
        (None, None) => PathBuf::from(DEFAULT_OUT),
    };
    // The run directory first: an unwritable or busy --out fails before any work.
    // Rank 0 alone writes there.
    let dir = if world.is_root() { RunDir::open(&out)? } else { RunDir::of_rank_0(&out) };
    let same_dir = resumed.as_ref().is_some_and(|(_, _, p)| p.parent().and_then(|d| d.canonicalize().ok()) == out.canonicalize().ok());
    let setup = Setup::new(a, resumed)?;
    if world.size > 1 {
        // Every process must run the same model on the same data with the same
        // settings and binary: rank 0's description against each one's.
        let mine = format!(
            "{:?} {} {}x{} {} train images {} val, {:?}, cvt-gpu {}",
            setup.arch,
            setup.data.name,
            setup.state.res,
            setup.state.res,
            setup.train_ds.len(),
            setup.val_ds.len(),
            setup.state,
            env!("CARGO_PKG_VERSION")
        );
        let mut root = mine.clone().into_bytes();
        world.broadcast(&mut root);
        let differs = world.any(root != mine.as_bytes());
        if differs {
            let msg = format!("the processes disagree on the run (model, data, settings or cvt-gpu version): rank {} has {mine}", world.rank);
            return Err(crate::dist::OnEveryRank(msg).into());
        }
    }
    if same_dir && world.is_root() {
        truncate_metrics(&dir.path, setup.state.step)?;
    }
    Run::new(gpu, a, world, &dir, setup)?.run()
}

/// Rank 0's tensors on every process (the run's starting parameters), bit for bit.
fn broadcast_tensors(world: &crate::dist::World, t: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let flat: HashMap<String, Vec<f32>> = t.iter().map(|(n, x)| (n.clone(), x.data.clone())).collect();
    let shapes: HashMap<String, Vec<usize>> = t.iter().map(|(n, x)| (n.clone(), x.shape.clone())).collect();
    let mut meta = if world.is_root() { serde_json::to_vec(&shapes)? } else { vec![] };
    world.broadcast(&mut meta);
    let shapes: HashMap<String, Vec<usize>> = serde_json::from_slice(&meta).context("the parameter shapes rank 0 sent")?;
    let data = broadcast_vectors(world, &flat)?;
    shapes.into_iter().map(|(n, s)| Ok((n.clone(), Tensor::new(s, data.get(&n).cloned().context("a parameter rank 0 did not send")?)))).collect()
}

/// Rank 0's named f32 vectors on every process, bit for bit (names as JSON, the
/// values as raw little-endian bytes in name order).
fn broadcast_vectors(world: &crate::dist::World, m: &HashMap<String, Vec<f32>>) -> Result<HashMap<String, Vec<f32>>> {
    let mut names: Vec<(String, usize)> = m.iter().map(|(n, v)| (n.clone(), v.len())).collect();
    names.sort();
    let mut head = if world.is_root() { serde_json::to_vec(&names)? } else { vec![] };
    world.broadcast(&mut head);
    let names: Vec<(String, usize)> = serde_json::from_slice(&head).context("the names rank 0 sent")?;
    let mut bytes: Vec<u8> = if world.is_root() { names.iter().flat_map(|(n, _)| bytemuck::cast_slice::<f32, u8>(&m[n]).to_vec()).collect() } else { vec![] };
    world.broadcast(&mut bytes);
    let all: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
    let mut off = 0;
    let mut out = HashMap::new();
    for (n, len) in names {
        anyhow::ensure!(off + len <= all.len(), "rank 0 sent fewer values than it named");
        out.insert(n, all[off..off + len].to_vec());
        off += len;
    }
    Ok(out)
}

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Checkpoint to evaluate (any `infer` accepts).
    #[arg(long, short)]
    pub weights: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// MLP activation (default: the checkpoint's).
    #[arg(long, value_enum)]
    pub activation: Option<Act>,
    /// Evaluate in f16 (see `infer --f16`).
    #[arg(long)]
    pub f16: bool,
    /// Load weights holding NaN or infinities instead of refusing the file.
    #[arg(long)]
    pub allow_nonfinite: bool,
    /// Architecture: cvt-13, cvt-21, cvt-w24 or a JSON config (default: the checkpoint's metadata, else detected).
    #[arg(long)]
    pub config: Option<String>,
    /// Evaluate at most this many images.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

pub fn eval(gpu: Arc<Gpu>, a: &EvalArgs) -> Result<()> {
    anyhow::ensure!(a.limit != Some(0), "--limit 0: must be at least 1 image");
    let arch = a.config.as_deref().map(Arch::by_name).transpose()?;
    let loaded = crate::models::load(gpu, &a.weights, arch, &crate::models::cvt::LoadOptions { config: None, activation: a.activation, f16: a.f16, allow_nonfinite: a.allow_nonfinite })?;
    let m = &loaded.model;
    let arch = m.arch();
    let data = a.data.open(false, arch.image_size(), a.json)?;
    if data.val.classes.len() != arch.num_classes() {
        bail!("{}: the model has {} classes, the {} validation split {}", a.weights.display(), arch.num_classes(), data.name, data.val.classes.len());
    }
    // The checkpoint's own normalisation when it has one; grayscale for 1-channel models.
    let mut val = data.val.clone();
    let spec = fit_channels(arch.in_chans(), &data.spec, &mut [&mut val], Some(loaded.preprocess.clone()), &a.weights.display().to_string())?;
    let t = Instant::now();
    let r = evaluate(m, &val, &spec, a.limit, a.json)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"weights": a.weights.display().to_string(), "dataset": data.name, "top1": r.top1, "top5": r.top5, "loss": r.loss, "images": r.images, "skipped": data.skipped.len(), "seconds": t.elapsed().as_secs_f64()})
        );
    } else {
        println!(
            "{} on {} validation ({} images{}): top-1 {:.2}%, top-5 {:.2}%, loss {:.4} ({:.1} s)",
            a.weights.display(),
            data.name,
            r.images,
            if data.skipped.is_empty() { String::new() } else { format!(", {} skipped", data.skipped.len()) },
            100.0 * r.top1,
            100.0 * r.top5,
            r.loss,
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
