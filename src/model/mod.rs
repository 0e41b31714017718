//! The CvT model: configuration, checkpoints and the forward schedule.

pub mod config;
pub mod cvt;
pub mod weights;

pub use config::CvtConfig;
pub use cvt::{ForwardPlan, Model};

use crate::gpu::Gpu;
use crate::ops::Act;
use anyhow::{Context, Result};
use std::path::Path;
use std::sync::Arc;
use weights::{check_against, read_checkpoint, Naming};

/// How to interpret a checkpoint.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Architecture to use instead of the one detected from shapes/metadata.
    pub config: Option<CvtConfig>,
    /// Activation to use instead of the naming's default.
    pub activation: Option<Act>,
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

/// Reads a checkpoint, works out its architecture and activation, checks every
/// tensor and uploads it.
///
/// Activation default: QuickGELU for the official naming (what the official code
/// computes), exact GELU for the Hugging Face naming (what transformers computes),
/// unless the checkpoint's metadata or `opts` says otherwise.
pub fn load(gpu: Arc<Gpu>, path: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let ck = read_checkpoint(path)?;
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
    let act = opts.activation.or(meta_act).unwrap_or(match ck.naming {
        Naming::Official => Act::QuickGelu,
        Naming::Hf => Act::Gelu,
    });
    let labels = match ck.metadata.get("labels") {
        Some(j) => Some(serde_json::from_str::<Vec<String>>(j).with_context(|| format!("{shown}: invalid labels metadata"))?),
        None => None,
    };
    let preprocess = match ck.metadata.get("preprocess") {
        Some(j) => serde_json::from_str(j).with_context(|| format!("{shown}: invalid preprocess metadata"))?,
        None => crate::preprocess::Spec::imagenet(),
    };
    let model = Model::new(gpu, cfg, &ck.tensors, act).with_context(|| format!("{shown}"))?;
    Ok(Loaded { model, naming: ck.naming, labels, preprocess })
}
