//! The model families, one folder each: its configuration (presets and JSON),
//! checkpoint names, parameters and forward. `cvt` (Wu et al. 2021: convolutional
//! token embeddings and projections) and `convit` (d'Ascoli et al. 2021: gated
//! positional self-attention). The op families they are built from live in
//! `ops`; `Family` is what the commands work with.

pub mod convit;
pub mod cvt;
pub mod pth;
pub mod step;
pub mod tensors;

pub use tensors::Tensor;

use crate::gpu::Gpu;
use crate::ops::matmul::WeightFormat;
use crate::ops::Act;
use anyhow::{bail, ensure, Context, Result};
use convit::{Convit, ConvitConfig};
use cvt::train::TrainModel;
use cvt::{CvtConfig, ForwardPlan, Model};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The model families the engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Cvt,
    Convit,
}

impl Family {
    pub fn name(&self) -> &'static str {
        match self {
            Family::Cvt => "CvT",
            Family::Convit => "ConViT",
        }
    }
}

/// An architecture of either family: what `--model` and `--config` name, what a
/// checkpoint's metadata or shapes describe.
#[derive(Clone, Debug, PartialEq)]
pub enum Arch {
    Cvt(CvtConfig),
    Convit(ConvitConfig),
}

impl Arch {
    /// A preset (`cvt-13`, `cvt-21`, `cvt-w24`, `cvt-fmnist`, `convit-ti`,
    /// `convit-s`, `convit-b`, `convit-fmnist`) or a JSON config file: a ConViT
    /// one has no `dims` (CvT's per-stage widths).
    pub fn by_name(name: &str) -> Result<Arch> {
        if ConvitConfig::is_preset(name) {
            return Ok(Arch::Convit(ConvitConfig::by_name(name)?));
        }
        let path = Path::new(name);
        if path.is_file() {
            let text = crate::util::read_text_limited(path, crate::util::limits::TEXT, "JSON config")?;
            let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{name}: invalid JSON"))?;
            if v.get("dims").is_none() && v.get("heads").is_some_and(|h| h.is_number()) {
                return Ok(Arch::Convit(ConvitConfig::by_name(name)?));
            }
        }
        Ok(Arch::Cvt(CvtConfig::by_name(name)?))
    }

    pub fn family(&self) -> Family {
        match self {
            Arch::Cvt(_) => Family::Cvt,
            Arch::Convit(_) => Family::Convit,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Arch::Cvt(c) => &c.name,
            Arch::Convit(c) => &c.name,
        }
    }

    pub fn num_classes(&self) -> usize {
        match self {
            Arch::Cvt(c) => c.num_classes,
            Arch::Convit(c) => c.num_classes,
        }
    }

    pub fn in_chans(&self) -> usize {
        match self {
            Arch::Cvt(c) => c.in_chans,
            Arch::Convit(c) => c.in_chans,
        }
    }

    /// The default (CvT) or only (ConViT: the position embedding fixes it) input side.
    pub fn image_size(&self) -> usize {
        match self {
            Arch::Cvt(c) => c.image_size,
            Arch::Convit(c) => c.image_size,
        }
    }

    /// Whether the architecture takes inputs of any size (CvT) or only its own.
    pub fn fixed_size(&self) -> bool {
        matches!(self, Arch::Convit(_))
    }

    /// Refuses `--res` `res` for an architecture whose input size is fixed.
    pub fn check_res(&self, res: usize) -> Result<()> {
        let s = self.image_size();
        ensure!(!self.fixed_size() || res == s, "--res {res}: {} takes {s}x{s} inputs only (its position embedding fixes the grid)", self.name());
        Ok(())
    }

    /// For training on a data set: its class count, channels and resolution.
    pub fn fit_data(&mut self, classes: usize, chans: usize, res: usize) -> Result<()> {
        match self {
            Arch::Cvt(c) => (c.num_classes, c.in_chans, c.image_size) = (classes, chans, res),
            Arch::Convit(c) => (c.num_classes, c.in_chans, c.image_size) = (classes, chans, res),
        }
        self.validate()
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            Arch::Cvt(c) => c.validate(),
            Arch::Convit(c) => c.validate(),
        }
    }

    /// Fresh weights as the reference code initialises them.
    pub fn init_tensors(&self, seed: u64) -> HashMap<String, Tensor> {
        match self {
            Arch::Cvt(c) => cvt::weights::init_tensors(c, seed),
            Arch::Convit(c) => convit::init_tensors(c, seed),
        }
    }

    /// Non-trivial random weights (benchmarks).
    pub fn random_tensors(&self, seed: u64) -> HashMap<String, Tensor> {
        match self {
            Arch::Cvt(c) => cvt::weights::random_tensors(c, seed),
            Arch::Convit(c) => convit::random_tensors(c, seed),
        }
    }

    /// Every parameter with its shape.
    pub fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            Arch::Cvt(c) => cvt::weights::expected_shapes(c),
            Arch::Convit(c) => c.expected_shapes(),
        }
    }

    /// Drop-path groups `--drop-path` takes rates for: CvT's stages, ConViT's one
    /// rate (spread linearly over its blocks).
    pub fn drop_path_groups(&self) -> usize {
        match self {
            Arch::Cvt(c) => c.stages(),
            Arch::Convit(_) => 1,
        }
    }

    /// The metadata entry that stores the architecture in a checkpoint.
    pub fn metadata(&self) -> Result<(&'static str, String)> {
        Ok(match self {
            Arch::Cvt(c) => ("cvt_config", serde_json::to_string(c)?),
            Arch::Convit(c) => ("convit_config", serde_json::to_string(c)?),
        })
    }

    /// GFLOP (2 × multiply-adds) of one image's forward at `res`.
    pub fn gflop(&self, res: usize) -> Result<f64> {
        Ok(match self {
            Arch::Cvt(c) => 2.0 * c.macs(res, res)? / 1e9,
            Arch::Convit(c) => 2.0 * c.macs() / 1e9,
        })
    }
}

/// A ConViT checkpoint's architecture: `arch` (`--model`/`--config`), its
/// `convit_config` metadata, or its names and shapes; every tensor checked.
pub fn describe_convit(ck: &cvt::weights::Checkpoint, path: &Path, arch: Option<&ConvitConfig>, allow_nonfinite: bool) -> Result<ConvitConfig> {
    let shown = path.display();
    let cfg = match (arch, ck.metadata.get("convit_config")) {
        (Some(c), _) => c.clone(),
        (None, Some(j)) => serde_json::from_str::<ConvitConfig>(j).with_context(|| format!("{shown}: invalid convit_config metadata"))?,
        (None, None) => ConvitConfig::detect(&ck.tensors).with_context(|| format!("{shown}"))?,
    };
    cfg.validate().with_context(|| format!("{shown}"))?;
    cfg.check(&ck.tensors).with_context(|| format!("{shown}"))?;
    if !allow_nonfinite {
        cvt::check_finite(ck).with_context(|| format!("{shown}"))?;
    }
    Ok(cfg)
}

/// A model of either family built for inference.
pub enum Net {
    Cvt(Model),
    Convit(Convit),
}

impl Net {
    /// Uploads checked tensors for inference.
    pub fn new(gpu: Arc<Gpu>, arch: &Arch, t: &HashMap<String, Tensor>, act: Act, fmt: WeightFormat) -> Result<Net> {
        Ok(match arch {
            Arch::Cvt(c) => Net::Cvt(Model::new_in(gpu, c.clone(), t, act, fmt)?),
            Arch::Convit(c) => Net::Convit(Convit::new(gpu, c.clone(), t, false, fmt)?),
        })
    }

    pub fn arch(&self) -> Arch {
        match self {
            Net::Cvt(m) => Arch::Cvt(m.cfg.clone()),
            Net::Convit(m) => Arch::Convit(m.cfg.clone()),
        }
    }

    pub fn weight_bytes(&self) -> u64 {
        match self {
            Net::Cvt(m) => m.weight_bytes,
            Net::Convit(m) => m.weight_bytes,
        }
    }

    /// Whether its plans run in f16 (`Graph::half`).
    pub fn half(&self) -> bool {
        match self {
            Net::Cvt(m) => m.half,
            Net::Convit(m) => m.half(),
        }
    }

    /// The compiled forward for `batch` images of `height` × `width`.
    pub fn plan(&self, batch: usize, height: usize, width: usize) -> Result<ForwardPlan> {
        match self {
            Net::Cvt(m) => m.plan(batch, height, width),
            Net::Convit(m) => {
                let s = m.cfg.image_size;
                ensure!(height == s && width == s, "{} takes {s}×{s} inputs only (its position embedding fixes the grid), not {height}×{width}", m.cfg.name);
                m.plan(batch)
            }
        }
    }

    /// Like `plan`, halving the batch until every tensor fits the adapter.
    pub fn plan_fitting(&self, batch: usize, height: usize, width: usize) -> Result<ForwardPlan> {
        let mut b = batch.max(1);
        loop {
            match self.plan(b, height, width) {
                Err(e) if b > 1 && e.downcast_ref::<crate::graph::TooLarge>().is_some() => b = b.div_ceil(2),
                other => return other,
            }
        }
    }
}

/// A loaded checkpoint of either family, with what the file says about itself.
pub struct Loaded {
    pub model: Net,
    pub naming: cvt::weights::Naming,
    pub labels: Option<Vec<String>>,
    pub preprocess: crate::preprocess::Spec,
}

/// What a checkpoint of either family says about itself, with the options
/// applied (`describe`).
pub struct Described {
    pub arch: Arch,
    /// The MLP activation (ConViT's is always exact GELU).
    pub act: Act,
    /// Whether `act` came from the options or the metadata, or is the family's
    /// only one (not CvT's default for its naming).
    pub act_explicit: bool,
    pub labels: Option<Vec<String>>,
    /// The `preprocess` metadata of checkpoints the engine wrote.
    pub preprocess: Option<crate::preprocess::Spec>,
}

/// A checkpoint's architecture in either family — `arch` (what `flag`, e.g.
/// `--config`, named), else `opts.config` (CvT), else the metadata, else its
/// shapes — every tensor checked against it, with its activation, labels and
/// preprocessing. An `arch` of the other family is a one-line error.
pub fn describe(ck: &cvt::weights::Checkpoint, path: &Path, arch: Option<Arch>, opts: &cvt::LoadOptions, flag: &str) -> Result<Described> {
    let shown = path.display();
    match ck.family {
        Family::Cvt => {
            let config = match arch {
                Some(Arch::Cvt(c)) => Some(c),
                Some(Arch::Convit(c)) => bail!("{shown}: a CvT checkpoint, but {flag} names ConViT {}", c.name),
                None => opts.config.clone(),
            };
            let d = cvt::describe(ck, path, &cvt::LoadOptions { config, ..opts.clone() })?;
            Ok(Described { arch: Arch::Cvt(d.cfg), act: d.act, act_explicit: d.act_explicit, labels: d.labels, preprocess: d.preprocess })
        }
        Family::Convit => {
            let want = match arch {
                Some(Arch::Convit(c)) => Some(c),
                Some(Arch::Cvt(c)) => bail!("{shown}: a ConViT checkpoint, but {flag} names CvT {}", c.name),
                None => None,
            };
            anyhow::ensure!(opts.activation.is_none(), "{shown}: a ConViT checkpoint, whose MLP is exact GELU: --activation applies to CvT");
            let cfg = describe_convit(ck, path, want.as_ref(), opts.allow_nonfinite)?;
            let (labels, preprocess) = cvt::labels_and_preprocess(ck, path, cfg.num_classes)?;
            Ok(Described { arch: Arch::Convit(cfg), act: Act::Gelu, act_explicit: true, labels, preprocess })
        }
    }
}

/// Reads a checkpoint of either family (told by its names) once, works out its
/// architecture (`describe`; `arch` from `--config`), checks every tensor and
/// uploads it for inference.
pub fn load(gpu: Arc<Gpu>, path: &Path, arch: Option<Arch>, opts: &cvt::LoadOptions) -> Result<Loaded> {
    let ck = cvt::weights::read_checkpoint(path)?;
    let d = describe(&ck, path, arch, opts, "--config")?;
    let fmt = WeightFormat::from_flag(&gpu, opts.f16);
    let model = Net::new(gpu, &d.arch, &ck.tensors, d.act, fmt).with_context(|| format!("{}", path.display()))?;
    Ok(Loaded { model, naming: ck.naming, labels: d.labels, preprocess: d.preprocess.unwrap_or_else(crate::preprocess::Spec::imagenet) })
}

/// A model of either family built for training (f32 buffers with gradients).
pub enum TrainNet {
    Cvt(TrainModel),
    Convit(Convit),
}

impl TrainNet {
    pub fn new(gpu: Arc<Gpu>, arch: &Arch, t: &HashMap<String, Tensor>, act: Act) -> Result<TrainNet> {
        Ok(match arch {
            Arch::Cvt(c) => TrainNet::Cvt(TrainModel::new(gpu, c.clone(), t, act)?),
            Arch::Convit(c) => TrainNet::Convit(Convit::new(gpu, c.clone(), t, true, WeightFormat::F32)?),
        })
    }

    /// Stochastic depth: per group (`Arch::drop_path_groups`) rates.
    pub fn set_drop_path(&mut self, rates: &[f32]) {
        match self {
            TrainNet::Cvt(m) => m.set_drop_path(rates),
            TrainNet::Convit(m) => m.set_drop_path(rates.first().copied().unwrap_or(0.0)),
        }
    }

    /// Drop-path rate of every block.
    pub fn drop_path_rates(&self) -> &[f32] {
        match self {
            TrainNet::Cvt(m) => m.drop_path_rates(),
            TrainNet::Convit(m) => m.drop_path_rates(),
        }
    }

    pub fn step_plan(&self, batch: usize, res: usize) -> Result<step::StepPlan> {
        match self {
            TrainNet::Cvt(m) => m.step_plan(batch, res, res),
            TrainNet::Convit(m) => {
                ensure!(res == m.cfg.image_size, "{} trains on {}×{} inputs, not {res}×{res}", m.cfg.name, m.cfg.image_size, m.cfg.image_size);
                m.step_plan(batch)
            }
        }
    }

    /// Every parameter buffer as the optimizer sees it.
    pub fn params(&self) -> Vec<step::Param> {
        match self {
            TrainNet::Cvt(m) => m.params(),
            TrainNet::Convit(m) => m.params(),
        }
    }

    pub fn optimizer(&self, settings: crate::ops::optim::AdamW) -> Result<step::Optimizer> {
        self.optimizer_with(settings, false)
    }

    /// AdamW over every parameter; `accumulate`: through gradient accumulators
    /// (`Optimizer::with_accumulation`).
    pub fn optimizer_with(&self, settings: crate::ops::optim::AdamW, accumulate: bool) -> Result<step::Optimizer> {
        let gpu = match self {
            TrainNet::Cvt(m) => &m.gpu,
            TrainNet::Convit(m) => &m.gpu,
        };
        step::Optimizer::with_accumulation(gpu, self.params(), settings, accumulate)
    }

    /// Every parameter (and CvT's BatchNorm statistics) in the checkpoint's names.
    pub fn weights(&self) -> Result<HashMap<String, Tensor>> {
        match self {
            TrainNet::Cvt(m) => m.weights(),
            TrainNet::Convit(m) => m.weights(),
        }
    }
}
