//! The CvT model: configuration, checkpoints and the forward schedule.

pub mod config;
pub mod cvt;
pub mod pth;
pub mod weights;

pub use config::CvtConfig;
pub use cvt::{ForwardPlan, Model};

use crate::gpu::Gpu;
use crate::ops::Act;
use anyhow::{Context, Result};
use std::path::Path;
use std::sync::Arc;
use weights::{check_against, read_checkpoint, Checkpoint, Naming};

/// How to interpret a checkpoint.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Architecture to use instead of the one detected from shapes/metadata.
    pub config: Option<CvtConfig>,
    /// Activation to use instead of the naming's default.
    pub activation: Option<Act>,
    /// Store the matmul and convolution weights in f16 (`--f16`).
    pub f16: bool,
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
    let meta_cfg = match ck.metadata.get("cvt_config") {
        Some(j) => Some(serde_json::from_str::<CvtConfig>(j).with_context(|| format!("{shown}: invalid cvt_config metadata"))?),
        None => None,
    };
    let cfg = match (&opts.config, meta_cfg) {
        (Some(c), _) => c.clone(),
        (None, Some(c)) => c,
        (None, None) => {
            let mut c = CvtConfig::detect(&ck.tensors).with_context(|| format!("{shown}"))?;
            if c.name == "custom" {
                anyhow::bail!(
                    "{shown}: not a released CvT shape (dims {:?}, depths {:?}) and no cvt_config metadata; the number of heads is not visible in the weights, so pass --config JSON",
                    c.dims,
                    c.depths
                );
            }
            if let Some(fc1) = ck.tensors.get("stage0.blocks.0.mlp.fc1.weight") {
                c.mlp_ratio = fc1.shape[0] as f64 / c.dims[0] as f64;
            }
            c
        }
    };
    cfg.validate().with_context(|| format!("{shown}"))?;
    check_against(&cfg, &ck.tensors, ck.naming).with_context(|| format!("{shown}"))?;
    let meta_act = match ck.metadata.get("activation").map(|s| s.as_str()) {
        Some("gelu") => Some(Act::Gelu),
        Some("quick-gelu") => Some(Act::QuickGelu),
        _ => None,
    };
    let explicit = opts.activation.or(meta_act);
    let act = explicit.unwrap_or(match ck.naming {
        Naming::Official => Act::QuickGelu,
        Naming::Hf => Act::Gelu,
    });
    let labels = match ck.metadata.get("labels") {
        Some(j) => Some(serde_json::from_str::<Vec<String>>(j).with_context(|| format!("{shown}: invalid labels metadata"))?),
        None => None,
    };
    let preprocess = match ck.metadata.get("preprocess") {
        Some(j) => Some(serde_json::from_str(j).with_context(|| format!("{shown}: invalid preprocess metadata"))?),
        None => None,
    };
    Ok(Described { cfg, act, act_explicit: explicit.is_some(), labels, preprocess })
}

/// Reads a checkpoint, works out its architecture and activation (`describe`),
/// checks every tensor and uploads it.
pub fn load(gpu: Arc<Gpu>, path: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let ck = read_checkpoint(path)?;
    let shown = path.display();
    let Described { cfg, act, labels, preprocess, .. } = describe(&ck, path, opts)?;
    let preprocess = preprocess.unwrap_or_else(crate::preprocess::Spec::imagenet);
    let fmt = crate::ops::matmul::WeightFormat::from_flag(&gpu, opts.f16);
    let model = Model::new_in(gpu, cfg, &ck.tensors, act, fmt).with_context(|| format!("{shown}"))?;
    Ok(Loaded { model, naming: ck.naming, labels, preprocess })
}
