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
use crate::model::weights::{init_tensors, read_checkpoint, Tensor};
use crate::model::weights::{Checkpoint, Naming};
use crate::model::{describe, CvtConfig, LoadOptions, Model};
use crate::ops::optim::AdamW;
use crate::ops::Act;
use crate::preprocess::Spec;
use crate::train::TrainModel;

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
    /// cvt-fmnist, cvt-13, cvt-21, cvt-w24 or a JSON config [default: cvt-fmnist for
    /// Fashion-MNIST, cvt-13 otherwise]. Classes and input channels follow the data.
    /// With --weights: the checkpoint's architecture, for files that do not record it.
    #[arg(long)]
    pub model: Option<String>,
    /// MLP activation.
    #[arg(long, value_enum, default_value = "quick-gelu")]
    pub activation: Act,
    /// Start from this checkpoint (any `infer` accepts); a head whose class count
    /// differs from the data's is re-initialised.
    #[arg(long, conflicts_with = "resume")]
    pub weights: Option<PathBuf>,
    /// Continue an interrupted run from its checkpoint.safetensors (or its --out dir).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Run directory: checkpoint.safetensors, model.safetensors, metrics.jsonl, curves.png.
    #[arg(long, default_value = "runs/train")]
    pub out: PathBuf,
    /// Epochs [default: 6 for Fashion-MNIST, 3 otherwise; on --resume, the run's own, which this may raise].
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
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
    /// Stochastic depth: one rate for the last stage (the official CvT recipes use
    /// 0.1 there), or one per stage ("0,0.05,0.1"); within a stage the rate rises
    /// linearly from 0 over its blocks, as the official code.
    #[arg(long, default_value = "0")]
    pub drop_path: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop (with a checkpoint, as Ctrl-C does) after this many optimizer steps in this invocation.
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
fn save(out: &Path, weights: &HashMap<String, Tensor>, opt: &crate::train::Optimizer, state: &TrainState, meta: &HashMap<String, String>) -> Result<()> {
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

pub fn evaluate(model: &Model, ds: &Dataset, spec: &Spec, limit: Option<usize>, quiet: bool) -> Result<EvalResult> {
    let res = ds.height;
    let n = limit.unwrap_or(usize::MAX).min(ds.len());
    let plan = model.plan_fitting(256.min(n.max(1)), res, ds.width)?;
    let classes = model.cfg.num_classes;
    let bar = progress_bar(n as u64, quiet);
    bar.set_message("evaluating");
    let (mut c1, mut c5, mut loss) = (0usize, 0usize, 0f64);
    let mut tail = None;
    for start in (0..n).step_by(plan.batch) {
        let idx: Vec<usize> = (start..(start + plan.batch).min(n)).collect();
        let mut images = Vec::with_capacity(idx.len() * res * ds.width * spec.channels);
        for &i in &idx {
            let px = ds.image(i);
            let rgb: Vec<u8> = if ds.channels == 1 { px.iter().flat_map(|&v| [v, v, v]).collect() } else { px.to_vec() };
            images.extend(spec.normalize(&rgb));
        }
        let p = if idx.len() == plan.batch { &plan } else { tail.get_or_insert(model.plan(idx.len(), res, ds.width)?) };
        let (_, probs) = p.forward(&images)?;
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
    Ok(EvalResult { top1: c1 as f64 / n as f64, top5: c5 as f64 / n as f64, loss: loss / n as f64, images: n })
}

/// Reads a training checkpoint (a file or its run directory): the checkpoint,
/// the optimizer moments by parameter name, and the file's path.
fn read_training_checkpoint(path: &Path) -> Result<(Checkpoint, HashMap<String, Vec<f32>>, PathBuf)> {
    let path = if path.is_dir() { path.join("checkpoint.safetensors") } else { path.to_path_buf() };
    let shown = path.display();
    let ck = read_checkpoint(&path)?;
    if !ck.metadata.contains_key("train_state") {
        bail!("{shown}: not a cvt-gpu training checkpoint (no train_state); to start from its weights use --weights");
    }
    let bytes = std::fs::read(&path).with_context(|| format!("{shown}: cannot read"))?;
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
fn fine_tune_weights(path: &Path, model: Option<&str>, classes: usize, seed: u64) -> Result<(CvtConfig, HashMap<String, Tensor>, Option<Act>, Option<Spec>)> {
    let shown = path.display();
    let ck = read_checkpoint(path)?;
    let config = match model {
        Some(m) => {
            let mut c = CvtConfig::by_name(m)?;
            if let Some(h) = ck.tensors.get("head.weight") {
                c.num_classes = h.shape[0];
            }
            if let Some(p) = ck.tensors.get("stage0.patch_embed.proj.weight") {
                c.in_chans = p.shape[1];
            }
            Some(c)
        }
        None => None,
    };
    let d = describe(&ck, path, &LoadOptions { config, activation: None, f16: false })?;
    let mut cfg = d.cfg;
    let mut t = ck.tensors;
    if cfg.num_classes != classes {
        eprintln!("note: {shown} has a {}-class head; the data has {classes} classes, so the head is re-initialised", cfg.num_classes);
        cfg.num_classes = classes;
        let fresh = init_tensors(&cfg, seed);
        t.insert("head.weight".into(), fresh["head.weight"].clone());
        t.insert("head.bias".into(), fresh["head.bias"].clone());
    }
    let act = (d.act_explicit || ck.naming == Naming::Hf).then_some(d.act);
    Ok((cfg, t, act, d.preprocess))
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

pub fn train(gpu: Arc<Gpu>, a: &TrainArgs) -> Result<()> {
    // The run directory first: an unwritable --out fails before any work.
    std::fs::create_dir_all(&a.out).with_context(|| format!("{}: cannot create the output directory", a.out.display()))?;
    let probe = a.out.join(".write-test");
    std::fs::write(&probe, b"").with_context(|| format!("{}: output directory is not writable", a.out.display()))?;
    std::fs::remove_file(&probe).ok();
    if a.batch < 2 {
        bail!("--batch must be at least 2 (BatchNorm needs batch statistics)");
    }
    let resumed = match &a.resume {
        Some(p) => Some(read_training_checkpoint(p)?),
        None => None,
    };
    let prev_state: Option<TrainState> = match &resumed {
        Some((ck, _, _)) => Some(serde_json::from_str(&ck.metadata["train_state"]).context("checkpoint: invalid train_state metadata")?),
        None => None,
    };
    // The data: on resume it must be the same dataset and resolution.
    let mut data_args = a.data.clone();
    if let Some(s) = &prev_state {
        data_args.res.get_or_insert(s.res);
    }
    let quiet = a.json;
    let model_res_hint = match &a.model {
        Some(m) => CvtConfig::by_name(m).map(|c| c.image_size).unwrap_or(224),
        None => 224,
    };
    let data = data_args.open(true, model_res_hint, quiet)?;
    let mut train_ds = data.train.clone().expect("training split opened");
    let train_limit = prev_state.as_ref().map(|s| s.train_limit).unwrap_or(a.train_limit);
    if let Some(n) = train_limit {
        if n < train_ds.len() {
            let px = train_ds.height * train_ds.width * train_ds.channels;
            let d = &*train_ds;
            train_ds = Arc::new(Dataset { images: d.images[..n * px].to_vec(), labels: d.labels[..n].to_vec(), height: d.height, width: d.width, channels: d.channels, classes: d.classes.clone() });
        }
    }
    let res = train_ds.height;
    let classes = train_ds.classes.clone();
    let in_chans = data.spec.channels;

    // Model and initial weights.
    let (cfg, tensors, act, ck_spec) = if let Some((ck, _, path)) = &resumed {
        let d = describe(ck, path, &LoadOptions::default())?;
        (d.cfg, ck.tensors.clone(), d.act, d.preprocess)
    } else if let Some(w) = &a.weights {
        let (cfg, t, act, spec) = fine_tune_weights(w, a.model.as_deref(), classes.len(), a.seed)?;
        (cfg, t, act.unwrap_or(a.activation), spec)
    } else {
        let name = a.model.clone().unwrap_or_else(|| if data.name == "fashion-mnist" { "cvt-fmnist".into() } else { "cvt-13".into() });
        let mut cfg = CvtConfig::by_name(&name)?;
        cfg.num_classes = classes.len();
        cfg.in_chans = in_chans;
        cfg.image_size = res;
        let t = init_tensors(&cfg, a.seed);
        (cfg, t, a.activation, None)
    };
    let mut val_ds = data.val.clone();
    let what = a.weights.as_ref().or(a.resume.as_ref()).map(|p| p.display().to_string()).unwrap_or_else(|| "--model".into());
    let spec = fit_channels(cfg.in_chans, &data.spec, &mut [&mut train_ds, &mut val_ds], ck_spec, &what)?;
    if cfg.num_classes != classes.len() {
        bail!("the checkpoint's model has {} classes, the data {}", cfg.num_classes, classes.len());
    }
    let state0 = TrainState {
        step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        seed: a.seed,
        batch: a.batch,
        // Fashion-MNIST's defaults: PyTorch probes of cvt-fmnist (weights/README.md)
        // reach 90.1-90.4% after 6 epochs at 3e-3-4e-3, 89.6-89.8% after 5.
        epochs: a.epochs.unwrap_or(if data.name == "fashion-mnist" { 6 } else { 3 }),
        lr: a.lr.unwrap_or(if data.name == "fashion-mnist" { 4e-3 } else { 3e-3 }),
        min_lr: a.min_lr,
        warmup_steps: a.warmup_steps,
        weight_decay: a.weight_decay,
        clip_grad: a.clip_grad,
        label_smoothing: a.label_smoothing,
        mixup: a.mixup,
        cutmix: a.cutmix,
        crop_scale: a.crop_scale.unwrap_or(if data.name == "fashion-mnist" { 0.0 } else { 0.35 }),
        flip: !a.no_flip,
        res,
        dataset: data.name.to_string(),
        train_limit,
        drop_path: parse_drop_path(&a.drop_path, cfg.stages())?,
    };
    // A resumed run keeps its own settings (only --epochs may be raised).
    let mut state = match prev_state {
        Some(mut s) => {
            if s.dataset != data.name {
                bail!("the checkpoint was trained on {}, not {}", s.dataset, data.name);
            }
            if let Some(e) = a.epochs {
                s.epochs = s.epochs.max(e);
            }
            s
        }
        None => state0,
    };
    let meta = crate::checkpoint::model_metadata(&cfg, act, Some(&classes), Some(&spec))?;
    let mut model = TrainModel::new(gpu.clone(), cfg.clone(), &tensors, act)?;
    model.set_drop_path(&state.drop_path);
    let step_plan = model.step_plan(state.batch, res, res).map_err(|e| if e.downcast_ref::<crate::graph::TooLarge>().is_some() { anyhow::anyhow!("{e:#}: lower --batch") } else { e })?;
    let mut opt = model.optimizer(AdamW { weight_decay: state.weight_decay, ..AdamW::default() })?;
    if let Some((_, moments, _)) = &resumed {
        opt.load_state(moments)?;
        opt.step = state.step;
    }
    let loader = LoaderConfig {
        batch: state.batch,
        seed: state.seed,
        label_smoothing: state.label_smoothing,
        mean: [spec.mean[0], *spec.mean.get(1).unwrap_or(&0.0), *spec.mean.get(2).unwrap_or(&0.0)],
        std: [spec.std[0], *spec.std.get(1).unwrap_or(&1.0), *spec.std.get(2).unwrap_or(&1.0)],
        augment: Augment { flip: state.flip, min_scale: state.crop_scale, mixup: state.mixup, cutmix: state.cutmix },
        drop_last: true,
        shuffle: true,
    };
    let steps_per_epoch = (train_ds.len() / state.batch) as u64;
    if steps_per_epoch == 0 {
        bail!("{} training images, fewer than one batch of {}", train_ds.len(), state.batch);
    }
    let total_steps = steps_per_epoch * state.epochs as u64;

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second Ctrl-C while saving is ignored; the checkpoint write is atomic anyway.
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst)).ok();
    }
    if !quiet {
        eprintln!(
            "training {} ({:.2}M parameters, {}) on {} ({} train / {} val images, {}x{}, {} classes), batch {}, {} epochs = {} steps, on {}",
            cfg.name,
            tensors.values().map(|t| t.data.len()).sum::<usize>() as f64 / 1e6,
            serde_json::to_value(act)?.as_str().unwrap_or(""),
            data.name,
            train_ds.len(),
            val_ds.len(),
            res,
            res,
            classes.len(),
            state.batch,
            state.epochs,
            total_steps,
            gpu.describe()
        );
        if state.step > 0 {
            eprintln!("resuming at step {} (epoch {}, batch {})", state.step, state.epoch + 1, state.batch_in_epoch);
        }
    }
    let t_run = Instant::now();
    let mut steps_this_run = 0u64;
    let mut last_eval: Option<EvalResult> = None;
    while state.epoch < state.epochs {
        let bar = progress_bar(steps_per_epoch, quiet);
        bar.set_position(state.batch_in_epoch as u64);
        let batches = epoch_from(train_ds.clone(), loader, state.epoch as u64, state.batch_in_epoch);
        let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
        let t_epoch = Instant::now();
        // Without a terminal (logs, nohup) the bar is hidden: a plain line every 30 s instead.
        let plain_progress = !quiet && !std::io::IsTerminal::is_terminal(&std::io::stderr());
        let mut last_line = Instant::now();
        let first_batch = state.batch_in_epoch;
        let mut interrupted = false;
        for batch in batches {
            let lr = learning_rate(&state, total_steps, state.step + 1);
            // Drop-path masks from (seed, step): the same on resume.
            step_plan.set_drop_path(model.drop_path_rates(), &mut crate::util::Rng::new(state.seed ^ 0xD209 ^ (state.step + 1).wrapping_mul(0x9E37_79B9)))?;
            let (loss, logits) = step_plan.run(&batch.images, &batch.targets)?;
            if !loss.is_finite() {
                bail!(
                    "loss is {loss} at step {} (epoch {}): training diverged; the last good checkpoint is {} (try a lower --lr or --clip-grad 1)",
                    state.step + 1,
                    state.epoch + 1,
                    a.out.join("checkpoint.safetensors").display()
                );
            }
            let scale = if state.clip_grad > 0.0 {
                let norm = opt.grad_norm()?;
                if !norm.is_finite() {
                    bail!("gradient norm is {norm} at step {}: training diverged; the last good checkpoint is kept", state.step + 1);
                }
                (state.clip_grad / (norm + 1e-6)).min(1.0)
            } else {
                1.0
            };
            opt.update_scaled(lr, scale)?;
            state.step += 1;
            state.batch_in_epoch += 1;
            steps_this_run += 1;
            let k = model.cfg.num_classes;
            for (b, &l) in batch.labels.iter().enumerate() {
                let row = &logits[b * k..(b + 1) * k];
                correct += (row.iter().filter(|&&v| v > row[l as usize]).count() == 0) as usize;
            }
            seen += batch.labels.len();
            loss_sum += loss as f64 * batch.labels.len() as f64;
            let ips = seen as f64 / t_epoch.elapsed().as_secs_f64();
            bar.set_message(format!("epoch {}/{} loss {:.4} acc {:.1}% {:.1} img/s", state.epoch + 1, state.epochs, loss_sum / seen as f64, 100.0 * correct as f64 / seen as f64, ips));
            bar.inc(1);
            if plain_progress && last_line.elapsed().as_secs() >= 30 {
                last_line = Instant::now();
                let done = state.batch_in_epoch - first_batch;
                let left = steps_per_epoch as usize - state.batch_in_epoch;
                let eta = t_epoch.elapsed().as_secs_f64() / done.max(1) as f64 * left as f64;
                eprintln!(
                    "epoch {}/{} step {}/{}: loss {:.4} acc {:.1}% {:.1} img/s, epoch ETA {:.0} s",
                    state.epoch + 1,
                    state.epochs,
                    state.batch_in_epoch,
                    steps_per_epoch,
                    loss_sum / seen as f64,
                    100.0 * correct as f64 / seen as f64,
                    ips,
                    eta
                );
            }
            if state.step % 10 == 0 || state.batch_in_epoch as u64 == steps_per_epoch {
                log_metrics(
                    &a.out,
                    serde_json::json!({"kind": "train", "step": state.step, "epoch": state.epoch + 1, "loss": loss, "lr": lr, "img_per_s": ips, "elapsed_s": t_run.elapsed().as_secs_f64()}),
                )?;
            }
            if stop.load(Ordering::SeqCst) || a.max_steps.is_some_and(|m| steps_this_run >= m) {
                interrupted = true;
                break;
            }
        }
        bar.finish_and_clear();
        if interrupted {
            save(&a.out, &model.weights()?, &opt, &state, &meta)?;
            eprintln!(
                "stopped at step {} (epoch {}, batch {}); checkpoint written: continue with --resume {}",
                state.step,
                state.epoch + 1,
                state.batch_in_epoch,
                a.out.join("checkpoint.safetensors").display()
            );
            return Ok(());
        }
        // End of epoch: evaluate the exported weights with the inference engine.
        let train_loss = loss_sum / seen.max(1) as f64;
        let train_acc = correct as f64 / seen.max(1) as f64;
        // One readback serves the evaluation and the checkpoint.
        let weights = model.weights()?;
        let ev_model = Model::new(gpu.clone(), cfg.clone(), &weights, act)?;
        let ev = evaluate(&ev_model, &val_ds, &spec, a.eval_limit, quiet)?;
        last_eval = Some(ev);
        state.epoch += 1;
        state.batch_in_epoch = 0;
        save(&a.out, &weights, &opt, &state, &meta)?;
        let rec = serde_json::json!({
            "kind": "eval", "epoch": state.epoch, "step": state.step, "train_loss": train_loss, "train_acc": train_acc,
            "val_top1": ev.top1, "val_top5": ev.top5, "val_loss": ev.loss, "val_images": ev.images,
            "epoch_s": t_epoch.elapsed().as_secs_f64(), "img_per_s": seen as f64 / t_epoch.elapsed().as_secs_f64(), "elapsed_s": t_run.elapsed().as_secs_f64()
        });
        log_metrics(&a.out, rec.clone())?;
        if let Err(e) = crate::plot::curves(&a.out.join("metrics.jsonl"), &a.out, &format!("{} on {}", cfg.name, state.dataset)) {
            eprintln!("warning: no plot ({e:#})");
        }
        if quiet {
            println!("{rec}");
        } else {
            eprintln!(
                "epoch {}/{}: train loss {:.4} acc {:.2}% | val top-1 {:.2}% top-5 {:.2}% loss {:.4} | {:.1} img/s, {:.0} s",
                state.epoch,
                state.epochs,
                train_loss,
                100.0 * train_acc,
                100.0 * ev.top1,
                100.0 * ev.top5,
                ev.loss,
                seen as f64 / t_epoch.elapsed().as_secs_f64(),
                t_epoch.elapsed().as_secs_f64()
            );
        }
    }
    if !quiet {
        let acc = last_eval.map(|e| format!(", val top-1 {:.2}%", 100.0 * e.top1)).unwrap_or_default();
        eprintln!(
            "done: {} steps in {:.0} s{acc}; weights: {} (cvt-gpu infer --weights {} IMAGE)",
            state.step,
            t_run.elapsed().as_secs_f64(),
            a.out.join("model.safetensors").display(),
            a.out.join("model.safetensors").display()
        );
        if !data.skipped.is_empty() {
            eprintln!("{} images could not be decoded and were skipped", data.skipped.len());
        }
    }
    Ok(())
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
    let config = a.config.as_deref().map(CvtConfig::by_name).transpose()?;
    let loaded = crate::model::load(gpu, &a.weights, &crate::model::LoadOptions { config, activation: a.activation, f16: a.f16 })?;
    let m = &loaded.model;
    let data = a.data.open(false, m.cfg.image_size, a.json)?;
    if data.val.classes.len() != m.cfg.num_classes {
        bail!("{}: the model has {} classes, the {} validation split {}", a.weights.display(), m.cfg.num_classes, data.name, data.val.classes.len());
    }
    // The checkpoint's own normalisation when it has one; grayscale for 1-channel models.
    let mut val = data.val.clone();
    let spec = fit_channels(m.cfg.in_chans, &data.spec, &mut [&mut val], Some(loaded.preprocess.clone()), &a.weights.display().to_string())?;
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
