//! Checkpoint reading: safetensors in either naming (official CvT or Hugging
//! Face), F32/F16/BF16, mapped to one internal (official) naming, and checked
//! against the architecture so a missing, extra or mis-shaped tensor is named.

use anyhow::{anyhow, bail, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::config::CvtConfig;

pub use crate::models::tensors::Tensor;

/// Which parameter names a checkpoint uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Naming {
    /// `stage{i}.blocks.{j}.attn.proj_q.weight`, as leoxiaobin/CvT saves.
    Official,
    /// `cvt.encoder.stages.{i}.layers.{j}.attention.attention.projection_query.weight`.
    Hf,
}

/// A checkpoint read from disk, canonicalised to official names.
pub struct Checkpoint {
    pub tensors: HashMap<String, Tensor>,
    /// Which model family its names are (`models::Family`).
    pub family: crate::models::Family,
    /// CvT: official or Hugging Face names. ConViT's official names are timm's:
    /// `Official`.
    pub naming: Naming,
    pub metadata: BTreeMap<String, String>,
}

/// HF → official substitutions, applied in order to the part after the prefix.
const HF_TO_OFFICIAL: &[(&str, &str)] = &[
    ("embedding.convolution_embeddings.projection.", "patch_embed.proj."),
    ("embedding.convolution_embeddings.normalization.", "patch_embed.norm."),
    (".layers.", ".blocks."),
    ("attention.attention.convolution_projection_query.convolution_projection.convolution.", "attn.conv_proj_q.conv."),
    ("attention.attention.convolution_projection_key.convolution_projection.convolution.", "attn.conv_proj_k.conv."),
    ("attention.attention.convolution_projection_value.convolution_projection.convolution.", "attn.conv_proj_v.conv."),
    ("attention.attention.convolution_projection_query.convolution_projection.normalization.", "attn.conv_proj_q.bn."),
    ("attention.attention.convolution_projection_key.convolution_projection.normalization.", "attn.conv_proj_k.bn."),
    ("attention.attention.convolution_projection_value.convolution_projection.normalization.", "attn.conv_proj_v.bn."),
    ("attention.attention.projection_query.", "attn.proj_q."),
    ("attention.attention.projection_key.", "attn.proj_k."),
    ("attention.attention.projection_value.", "attn.proj_v."),
    ("attention.output.dense.", "attn.proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
];

/// Maps an HF parameter name to the official one (None: not a CvT name).
pub fn hf_to_official(name: &str) -> Option<String> {
    if let Some(rest) = name.strip_prefix("layernorm.") {
        return Some(format!("norm.{rest}"));
    }
    if let Some(rest) = name.strip_prefix("classifier.") {
        return Some(format!("head.{rest}"));
    }
    let rest = name.strip_prefix("cvt.").unwrap_or(name).strip_prefix("encoder.stages.")?;
    let (stage, tail) = rest.split_once('.')?;
    let mut tail = format!(".{tail}");
    for (from, to) in HF_TO_OFFICIAL {
        tail = tail.replace(from, to);
    }
    Some(format!("stage{stage}{tail}"))
}

/// Maps an official parameter name to the HF one (inverse of `hf_to_official`).
pub fn official_to_hf(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("norm.") {
        return format!("layernorm.{rest}");
    }
    if let Some(rest) = name.strip_prefix("head.") {
        return format!("classifier.{rest}");
    }
    let rest = name.strip_prefix("stage").unwrap_or(name);
    let (stage, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let mut tail = format!(".{tail}");
    for (from, to) in HF_TO_OFFICIAL.iter().rev() {
        tail = tail.replace(to, from);
    }
    format!("cvt.encoder.stages.{stage}{tail}")
}

/// Reads a checkpoint in either naming: safetensors, or a PyTorch `torch.save`
/// zip (.pth/.pt/.bin; see `pth`), told apart by content, not by extension.
pub fn read_checkpoint(path: &Path) -> Result<Checkpoint> {
    let (raw, metadata) = crate::models::tensors::read(path)?;
    canonical(raw, metadata, &path.display().to_string())
}

/// `read_checkpoint` of a file's contents; `shown` names it in errors.
pub fn read_checkpoint_bytes(bytes: &[u8], shown: &str) -> Result<Checkpoint> {
    let (raw, metadata) = crate::models::tensors::read_bytes(bytes, shown)?;
    canonical(raw, metadata, shown)
}

/// A checkpoint's tensors under official names: its family (ConViT or CvT) and,
/// for CvT, its naming told by its names.
pub fn canonical(raw: Vec<(String, Tensor)>, metadata: BTreeMap<String, String>, shown: &str) -> Result<Checkpoint> {
    let names: Vec<&str> = raw.iter().map(|(n, _)| n.as_str()).collect();
    if crate::models::convit::is_convit(&names) {
        let tensors = crate::models::convit::canonical(raw, shown)?;
        return Ok(Checkpoint { tensors, family: crate::models::Family::Convit, naming: Naming::Official, metadata });
    }
    let strip = |n: &str| n.strip_prefix("module.").unwrap_or(n).to_string();
    let hf = raw.iter().any(|(n, _)| strip(n).starts_with("cvt.encoder.") || strip(n).starts_with("encoder.stages."));
    let official = raw.iter().any(|(n, _)| strip(n).starts_with("stage0."));
    let naming = match (official, hf) {
        (true, false) => Naming::Official,
        (false, true) => Naming::Hf,
        (true, true) => bail!("{shown}: mixes official (stage0.*) and Hugging Face (cvt.encoder.*) names"),
        (false, false) => bail!(
            "{shown}: unknown parameter naming (expected CvT's official `stage0.*` or Hugging Face `cvt.encoder.stages.*` names, or ConViT's `blocks.*.attn.gating_param`; first name: {})",
            raw.first().map(|(n, _)| n.as_str()).unwrap_or("<no tensors>")
        ),
    };
    let mut tensors = HashMap::new();
    // Canonical name -> the name in the file, to name both sides of a clash.
    let mut origin: HashMap<String, String> = HashMap::new();
    for (name, t) in raw {
        let short = strip(&name);
        let canon = match naming {
            Naming::Official => short,
            Naming::Hf => hf_to_official(&short).ok_or_else(|| anyhow!("{shown}: unexpected tensor {short}"))?,
        };
        if let Some(other) = origin.insert(canon.clone(), name.clone()) {
            let (a, b) = if other < name { (other, name) } else { (name, other) };
            bail!("{shown}: holds both {a} and {b}, which are the same parameter {canon}");
        }
        tensors.insert(canon, t);
    }
    Ok(Checkpoint { tensors, family: crate::models::Family::Cvt, naming, metadata })
}

/// Every parameter the architecture needs, with its shape (official names).
pub fn expected_shapes(cfg: &CvtConfig) -> Vec<(String, Vec<usize>)> {
    let mut v = vec![];
    let mut cin = cfg.in_chans;
    for s in 0..cfg.stages() {
        let c = cfg.dims[s];
        let k = cfg.patch_sizes[s];
        if cfg.cls_token[s] {
            v.push((format!("stage{s}.cls_token"), vec![1, 1, c]));
        }
        v.push((format!("stage{s}.patch_embed.proj.weight"), vec![c, cin, k, k]));
        v.push((format!("stage{s}.patch_embed.proj.bias"), vec![c]));
        v.push((format!("stage{s}.patch_embed.norm.weight"), vec![c]));
        v.push((format!("stage{s}.patch_embed.norm.bias"), vec![c]));
        let hid = cfg.hidden(s);
        for j in 0..cfg.depths[s] {
            let p = format!("stage{s}.blocks.{j}");
            for n in ["norm1", "norm2"] {
                v.push((format!("{p}.{n}.weight"), vec![c]));
                v.push((format!("{p}.{n}.bias"), vec![c]));
            }
            for x in ["q", "k", "v"] {
                v.push((format!("{p}.attn.conv_proj_{x}.conv.weight"), vec![c, 1, 3, 3]));
                for bn in ["weight", "bias", "running_mean", "running_var"] {
                    v.push((format!("{p}.attn.conv_proj_{x}.bn.{bn}"), vec![c]));
                }
                v.push((format!("{p}.attn.proj_{x}.weight"), vec![c, c]));
                v.push((format!("{p}.attn.proj_{x}.bias"), vec![c]));
            }
            v.push((format!("{p}.attn.proj.weight"), vec![c, c]));
            v.push((format!("{p}.attn.proj.bias"), vec![c]));
            v.push((format!("{p}.mlp.fc1.weight"), vec![hid, c]));
            v.push((format!("{p}.mlp.fc1.bias"), vec![hid]));
            v.push((format!("{p}.mlp.fc2.weight"), vec![c, hid]));
            v.push((format!("{p}.mlp.fc2.bias"), vec![c]));
        }
        cin = c;
    }
    let last = cfg.dims[cfg.stages() - 1];
    v.push(("norm.weight".into(), vec![last]));
    v.push(("norm.bias".into(), vec![last]));
    v.push(("head.weight".into(), vec![cfg.num_classes, last]));
    v.push(("head.bias".into(), vec![cfg.num_classes]));
    v
}

/// Checks a checkpoint against the architecture; the error lists every problem.
pub fn check_against(cfg: &CvtConfig, tensors: &HashMap<String, Tensor>, naming: Naming) -> Result<()> {
    let show = |n: &str| match naming {
        Naming::Official => n.to_string(),
        Naming::Hf => official_to_hf(n),
    };
    let expected = expected_shapes(cfg);
    let mut missing = vec![];
    let mut wrong = vec![];
    for (name, shape) in &expected {
        match tensors.get(name) {
            None => missing.push(show(name)),
            Some(t) if &t.shape != shape => wrong.push(format!("{} is {:?}, expected {:?}", show(name), t.shape, shape)),
            _ => {}
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut extra: Vec<String> = tensors.keys().filter(|k| !known.contains(k.as_str())).map(|k| show(k)).collect();
    extra.sort();
    missing.sort();
    let list = |v: &[String]| {
        let mut s = v.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
        if v.len() > 4 {
            s += &format!(" and {} more", v.len() - 4);
        }
        s
    };
    let mut problems = vec![];
    if !wrong.is_empty() {
        problems.push(format!("wrong shape: {}", list(&wrong)));
    }
    if !missing.is_empty() {
        problems.push(format!("missing: {}", list(&missing)));
    }
    if !extra.is_empty() {
        problems.push(format!("unexpected: {}", list(&extra)));
    }
    if !problems.is_empty() {
        bail!("checkpoint does not match {} ({}): {}", cfg.name, describe(cfg), problems.join("; "));
    }
    Ok(())
}

fn describe(cfg: &CvtConfig) -> String {
    format!("dims {:?}, depths {:?}, {} classes", cfg.dims, cfg.depths, cfg.num_classes)
}

/// Fresh parameters for training from scratch, initialised as the official code
/// does: Linear weights and the cls token truncated normal (std 0.02, cut at 2σ),
/// Linear biases zero, LayerNorm/BatchNorm weight 1 and bias 0, BN running mean 0
/// and variance 1; convolutions keep PyTorch's default (uniform ±1/√fan_in for
/// weight and bias), since the official init touches only Linear and norm layers.
pub fn init_tensors(cfg: &CvtConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = crate::util::Rng::new(seed);
    let mut out = HashMap::new();
    for (name, shape) in expected_shapes(cfg) {
        let n: usize = shape.iter().product();
        let is_conv = name.contains("patch_embed.proj") || name.contains(".conv.");
        let data: Vec<f32> = if is_conv {
            let fan_in: usize = if name.ends_with("weight") { shape[1..].iter().product() } else { fan_in_of_conv(cfg, &name) };
            let bound = 1.0 / (fan_in as f32).sqrt();
            (0..n).map(|_| bound * (2.0 * rng.uniform() - 1.0)).collect()
        } else if name.ends_with("running_var") || ((name.contains("norm") || name.contains(".bn.")) && name.ends_with("weight")) {
            vec![1.0; n]
        } else if name.ends_with("bias") || name.ends_with("running_mean") {
            vec![0.0; n]
        } else {
            // Linear weights and cls tokens: trunc_normal(std=0.02), resampled outside ±2σ.
            (0..n)
                .map(|_| loop {
                    let v = rng.normal();
                    if v.abs() <= 2.0 {
                        break 0.02 * v;
                    }
                })
                .collect()
        };
        out.insert(name, Tensor::new(shape, data));
    }
    out
}

/// fan_in of a conv's weight, for its bias's default init.
fn fan_in_of_conv(cfg: &CvtConfig, bias_name: &str) -> usize {
    let w = bias_name.replace(".bias", ".weight");
    expected_shapes(cfg).into_iter().find(|(n, _)| *n == w).map(|(_, s)| s[1..].iter().product()).unwrap_or(1)
}

/// Deterministic random parameters for a config (official naming), non-trivial
/// in every tensor: used by `bench` and tests when no checkpoint is given.
pub fn random_tensors(cfg: &CvtConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = crate::util::Rng::new(seed);
    let mut out = HashMap::new();
    for (name, shape) in expected_shapes(cfg) {
        let n: usize = shape.iter().product();
        let fan_in: usize = if shape.len() > 1 { shape[1..].iter().product() } else { 1 };
        let data: Vec<f32> = if name.ends_with("running_var") {
            (0..n).map(|_| 0.5 + rng.uniform()).collect()
        } else if name.contains("norm") || name.contains(".bn.weight") {
            (0..n).map(|_| if name.ends_with("weight") { 0.8 + 0.4 * rng.uniform() } else { 0.1 * rng.normal() }).collect()
        } else {
            let std = if shape.len() > 1 { (1.0 / fan_in as f32).sqrt() } else { 0.05 };
            (0..n).map(|_| std * rng.normal()).collect()
        };
        out.insert(name, Tensor::new(shape, data));
    }
    out
}
