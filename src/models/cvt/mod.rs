//! The CvT model: configuration, checkpoints and the forward schedule.

pub mod config;
pub mod forward;
pub mod infer;
pub mod train;
pub mod weights;

pub use config::CvtConfig;
pub use infer::{ForwardPlan, Model};

use crate::gpu::Gpu;
use crate::ops::Act;
use anyhow::{Context, Result};
use std::path::Path;
use std::sync::Arc;
use weights::{check_against, Checkpoint, Naming};

/// How to interpret a checkpoint.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Architecture to use instead of the one detected from shapes/metadata.
    pub config: Option<CvtConfig>,
    /// Activation to use instead of the naming's default.
    pub activation: Option<Act>,
    /// Store the matmul and convolution weights in f16 (`--f16`).
    pub f16: bool,
    /// Load weights holding NaN or infinities instead of refusing them (`--allow-nonfinite`).
    pub allow_nonfinite: bool,
}

/// A loaded checkpoint: the GPU model plus what the file said about itself.
pub struct Loaded {
    pub model: Model,
    pub naming: Naming,
    /// Class names stored in the checkpoint's metadata (our own checkpoints).
    pub labels: Option<Vec<String>>,
    /// Input preparation stored in the metadata, else the ImageNet transform.
    pub preprocess: crate::preprocess::Spec,
}

/// What a checkpoint says about itself, with `LoadOptions` applied.
pub struct Described {
    pub cfg: CvtConfig,
    pub act: Act,
    /// Whether `act` came from the options or the metadata (not the naming's default).
    pub act_explicit: bool,
    pub labels: Option<Vec<String>>,
    /// The `preprocess` metadata of checkpoints the engine trained.
    pub preprocess: Option<crate::preprocess::Spec>,
}

/// Works out a checkpoint's architecture (options, `cvt_config` metadata, or
/// detection from the shapes), checks every tensor against it, and reads its
/// activation, labels and preprocessing. Shared by `load`, fine-tuning and resume.
///
/// Activation default: QuickGELU for the official naming (what the official code
/// computes), exact GELU for the Hugging Face naming (what transformers computes),
/// unless the checkpoint's metadata or `opts` says otherwise.
pub fn describe(ck: &Checkpoint, path: &Path, opts: &LoadOptions) -> Result<Described> {
    let shown = path.display();
    anyhow::ensure!(ck.family == crate::models::Family::Cvt, "{shown}: a {} checkpoint, not a CvT one", ck.family.name());
    let meta_cfg = match ck.metadata.get("cvt_config") {
        Some(j) => Some(serde_json::from_str::<CvtConfig>(j).with_context(|| format!("{shown}: invalid cvt_config metadata"))?),
        None => None,
    };
    let cfg = match (&opts.config, meta_cfg) {
        (Some(c), _) => c.clone(),
        (None, Some(c)) => c,
        (None, None) => {
            let c = CvtConfig::detect(&ck.tensors).with_context(|| format!("{shown}"))?;
            if c.name == "custom" {
                anyhow::bail!(
                    "{shown}: not a released CvT shape (dims {:?}, depths {:?}) and no cvt_config metadata; the number of heads is not visible in the weights, so pass --config JSON",
                    c.dims,
                    c.depths
                );
            }
            // Named after a released model by its widths and depths: every other
            // shape (stem kernel, cls token, MLP width) must be that model's too,
            // or its stride and padding would be guesses.
            let mut preset = CvtConfig::by_name(&c.name)?;
            preset.num_classes = c.num_classes;
            preset.in_chans = c.in_chans;
            if let Err(e) = check_against(&preset, &ck.tensors, ck.naming) {
                anyhow::bail!("{shown}: has {}'s widths and depths but not its shapes ({e:#}); pass --config JSON for a different architecture", c.name);
            }
            c
        }
    };
    cfg.validate().with_context(|| format!("{shown}"))?;
    check_against(&cfg, &ck.tensors, ck.naming).with_context(|| format!("{shown}"))?;
    if !opts.allow_nonfinite {
        check_finite(ck).with_context(|| format!("{shown}"))?;
    }
    let meta_act = match ck.metadata.get("activation").map(|s| s.as_str()) {
        Some("gelu") => Some(Act::Gelu),
        Some("quick-gelu") => Some(Act::QuickGelu),
        Some(other) => anyhow::bail!("{shown}: unknown activation {other:?} in the metadata (expected \"gelu\" or \"quick-gelu\")"),
        None => None,
    };
    let explicit = opts.activation.or(meta_act);
    let act = explicit.unwrap_or(match ck.naming {
        Naming::Official => Act::QuickGelu,
        Naming::Hf => Act::Gelu,
    });
    let (labels, preprocess) = labels_and_preprocess(ck, path, cfg.num_classes)?;
    Ok(Described { cfg, act, act_explicit: explicit.is_some(), labels, preprocess })
}

/// A checkpoint's `labels` and `preprocess` metadata (the engine's own
/// checkpoints), checked: one label per class, a usable normalisation.
pub fn labels_and_preprocess(ck: &Checkpoint, path: &Path, num_classes: usize) -> Result<(Option<Vec<String>>, Option<crate::preprocess::Spec>)> {
    let shown = path.display();
    let labels = match ck.metadata.get("labels") {
        Some(j) => Some(serde_json::from_str::<Vec<String>>(j).with_context(|| format!("{shown}: invalid labels metadata"))?),
        None => None,
    };
    let preprocess = match ck.metadata.get("preprocess") {
        Some(j) => {
            let spec: crate::preprocess::Spec = serde_json::from_str(j).with_context(|| format!("{shown}: invalid preprocess metadata"))?;
            check_spec(&spec).with_context(|| format!("{shown}: preprocess metadata"))?;
            Some(spec)
        }
        None => None,
    };
    if let Some(l) = &labels {
        anyhow::ensure!(l.len() == num_classes, "{shown}: {} labels in the metadata for a head of {} classes", l.len(), num_classes);
    }
    Ok((labels, preprocess))
}

/// Block `b`'s (`stage{s}.blocks.{j}`) three convolutional projections as a
/// checkpoint holds them: the q, k and v depthwise weights and BatchNorms.
pub(crate) fn conv_projections<'a>(t: &'a std::collections::HashMap<String, weights::Tensor>, b: &str) -> Result<([&'a [f32]; 3], [crate::ops::dwconv::BatchNorm<'a>; 3])> {
    let get = |name: String| -> Result<&'a [f32]> { Ok(&t.get(&name).with_context(|| format!("missing tensor {name}"))?.data) };
    let bn = |x: &str| -> Result<crate::ops::dwconv::BatchNorm<'a>> {
        let n = format!("{b}.attn.conv_proj_{x}.bn");
        Ok(crate::ops::dwconv::BatchNorm { weight: get(format!("{n}.weight"))?, bias: get(format!("{n}.bias"))?, mean: get(format!("{n}.running_mean"))?, var: get(format!("{n}.running_var"))? })
    };
    let conv = |x: &str| get(format!("{b}.attn.conv_proj_{x}.conv.weight"));
    Ok(([conv("q")?, conv("k")?, conv("v")?], [bn("q")?, bn("k")?, bn("v")?]))
}

/// The largest input side the engine takes: 10x the largest released model's
/// (384), and far below what would exhaust memory before the adapter's limits
/// are checked (one 4096x4096 RGB image is 192 MiB in f32).
pub const MAX_RESOLUTION: usize = 4096;

/// Checks an input resolution against `MAX_RESOLUTION`.
pub fn check_resolution(res: usize) -> Result<()> {
    anyhow::ensure!((1..=MAX_RESOLUTION).contains(&res), "resolution {res} is outside 1..={MAX_RESOLUTION}");
    Ok(())
}

/// Refuses weights holding NaN or infinities (a damaged or diverged file would
/// otherwise print NaN% for every class), naming the first tensor in name order.
pub fn check_finite(ck: &Checkpoint) -> Result<()> {
    let mut names: Vec<&String> = ck.tensors.keys().collect();
    names.sort();
    for n in names {
        let bad = ck.tensors[n].data.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            let shown = match ck.naming {
                Naming::Official => n.clone(),
                Naming::Hf => weights::official_to_hf(n),
            };
            anyhow::bail!("tensor {shown} holds {bad} non-finite value(s) (NaN or infinity): the checkpoint is damaged or its training diverged (--allow-nonfinite loads it anyway)");
        }
    }
    Ok(())
}

/// Checks a stored preprocessing spec: known resize, one finite mean and one
/// positive finite std per channel (a zero std makes every input infinite).
pub fn check_spec(s: &crate::preprocess::Spec) -> Result<()> {
    anyhow::ensure!(s.channels == 1 || s.channels == 3, "{} channels; expected 1 or 3", s.channels);
    anyhow::ensure!(s.mean.len() == s.channels && s.std.len() == s.channels, "{} means and {} stds for {} channels", s.mean.len(), s.std.len(), s.channels);
    anyhow::ensure!(s.mean.iter().all(|m| m.is_finite()), "mean {:?} is not finite", s.mean);
    anyhow::ensure!(s.std.iter().all(|v| v.is_finite() && *v > 0.0), "std {:?} must be positive and finite", s.std);
    anyhow::ensure!(s.resize == "eval" || s.resize == "plain", "unknown resize {:?} (expected \"eval\" or \"plain\")", s.resize);
    Ok(())
}

/// Reads a CvT checkpoint, works out its architecture and activation
/// (`describe`), checks every tensor and uploads it (`models::load`, which
/// serves both families, for a CvT).
pub fn load(gpu: Arc<Gpu>, path: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let l = crate::models::load(gpu, path, None, opts)?;
    match l.model {
        crate::models::Net::Cvt(model) => Ok(Loaded { model, naming: l.naming, labels: l.labels, preprocess: l.preprocess }),
        crate::models::Net::Convit(_) => anyhow::bail!("{}: a ConViT checkpoint, not a CvT one", path.display()),
    }
}
