//! ConViT (d'Ascoli et al., ICML 2021): a plain-patch vision transformer whose
//! first blocks use gated positional self-attention (GPSA, `ops::gpsa`), a soft
//! convolutional locality each head can turn off. `../shared/convit-spec.md`
//! pins the formulas, names and numbers. Checkpoint names are the official
//! repository's, which timm keeps unchanged.

pub mod config;
pub mod model;

pub use config::ConvitConfig;
pub use model::Convit;

use crate::models::Tensor;
use anyhow::{bail, Result};
use std::collections::HashMap;

/// A ConViT checkpoint's tensors by name (a DataParallel `module.` prefix removed).
pub fn canonical(raw: Vec<(String, Tensor)>, shown: &str) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, t) in raw {
        let short = name.strip_prefix("module.").unwrap_or(&name).to_string();
        if out.insert(short.clone(), t).is_some() {
            bail!("{shown}: holds {short} twice (with and without the `module.` prefix)");
        }
    }
    Ok(out)
}

/// Whether a checkpoint's names are ConViT's (GPSA's gate, or the patch-only
/// position embedding beside `blocks.*`).
pub fn is_convit(names: &[&str]) -> bool {
    let strip = |n: &&str| n.strip_prefix("module.").unwrap_or(n).to_string();
    names.iter().map(strip).any(|n| n.starts_with("blocks.") && n.ends_with(".attn.gating_param"))
}

/// A freshly initialised ConViT as both reference codes build one (spec §3):
/// trunc-normal(0.02) linear weights with zero biases, `v.weight` = I, the local
/// initialisation of `pos_proj` (heads on a √H × √H grid of centres), gates at
/// 1, PyTorch's default init of the patch convolution, trunc-normal(0.02)
/// position embedding and class token, unit LayerNorms.
pub fn init_tensors(cfg: &ConvitConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = crate::util::Rng::new(seed);
    let mut tn = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| loop {
                let v = rng.normal();
                if v.abs() <= 2.0 / 0.02 {
                    break 0.02 * v;
                }
            })
            .collect()
    };
    let c = cfg.dim();
    let mut out = HashMap::new();
    let fan_in = cfg.in_chans * cfg.patch_size * cfg.patch_size;
    let mut urng = crate::util::Rng::new(seed ^ 0x5eed);
    let bound = 1.0 / (fan_in as f32).sqrt();
    for (name, shape) in cfg.expected_shapes() {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.starts_with("patch_embed.proj") {
            (0..n).map(|_| bound * (2.0 * urng.uniform() - 1.0)).collect()
        } else if name.ends_with("gating_param") {
            vec![1.0; n]
        } else if name.ends_with("attn.v.weight") {
            (0..n).map(|i| if i / c == i % c { 1.0 } else { 0.0 }).collect()
        } else if name.ends_with("pos_proj.weight") {
            local_init(cfg, tn(n))
        } else if name.contains("norm") && name.ends_with("weight") {
            vec![1.0; n]
        } else if name.ends_with("bias") {
            vec![0.0; n]
        } else {
            tn(n)
        };
        out.insert(name, Tensor::new(shape, data));
    }
    out
}

/// `local_init` of a GPSA's `pos_proj.weight` [H, 3] (spec §3.1): with k = ⌊√H⌋
/// and c = (k − 1)/2, head h1 + k·h2 gets α·(2(h2 − c), 2(h1 − c), −1); heads past
/// k² keep their trunc-normal rows.
fn local_init(cfg: &ConvitConfig, mut w: Vec<f32>) -> Vec<f32> {
    let k = (cfg.heads as f64).sqrt().floor() as usize;
    let centre = (k as f32 - 1.0) / 2.0;
    let a = cfg.locality_strength;
    for h1 in 0..k {
        for h2 in 0..k {
            let p = h1 + k * h2;
            w[3 * p] = a * 2.0 * (h2 as f32 - centre);
            w[3 * p + 1] = a * 2.0 * (h1 as f32 - centre);
            w[3 * p + 2] = -a;
        }
    }
    w
}

/// Non-trivial random weights for benchmarks and tests: the initialisation with
/// gates, `pos_proj` and the LayerNorms moved off their initial values.
pub fn random_tensors(cfg: &ConvitConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut t = init_tensors(cfg, seed);
    let mut rng = crate::util::Rng::new(seed ^ 0xab);
    for (name, x) in t.iter_mut() {
        if name.ends_with("gating_param") || name.contains("pos_proj") || name.contains("norm") || name.ends_with("attn.v.weight") {
            x.data.iter_mut().for_each(|v| *v += 0.2 * rng.normal());
        }
    }
    t
}
