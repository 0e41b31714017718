//! ConViT architecture (`../shared/convit-spec.md` §1): the released sizes, the
//! "+" widths through JSON, a small Fashion-MNIST model, and detection from a
//! checkpoint's tensor shapes.

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

use crate::models::Tensor;

/// One ConViT: `depth` blocks, the first `local_layers` GPSA (patches only), the
/// rest plain attention with the class token prepended before them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvitConfig {
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default = "default_in_chans")]
    pub in_chans: usize,
    #[serde(default = "default_classes")]
    pub num_classes: usize,
    /// Input side (square; the position embedding fixes it).
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    pub heads: usize,
    /// Width per head (48 for Ti/S/B, 64 for the "+" models): C = heads · head_dim.
    #[serde(default = "default_head_dim")]
    pub head_dim: usize,
    #[serde(default = "default_depth")]
    pub depth: usize,
    /// GPSA blocks before the class token is prepended (`local_up_to_layer`).
    #[serde(default = "default_local")]
    pub local_layers: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: usize,
    /// `local_init`'s α (initialisation only).
    #[serde(default = "default_locality")]
    pub locality_strength: f32,
}

fn default_name() -> String {
    "custom".into()
}
fn default_in_chans() -> usize {
    3
}
fn default_classes() -> usize {
    1000
}
fn default_image_size() -> usize {
    224
}
fn default_patch() -> usize {
    16
}
fn default_head_dim() -> usize {
    48
}
fn default_depth() -> usize {
    12
}
fn default_local() -> usize {
    10
}
fn default_mlp_ratio() -> usize {
    4
}
fn default_locality() -> f32 {
    1.0
}

/// ConViT's LayerNorm ε (timm's and the official models', spec §6.10).
pub const LN_EPS: f32 = 1e-6;

impl ConvitConfig {
    fn released(name: &str, heads: usize) -> ConvitConfig {
        ConvitConfig { name: name.into(), in_chans: 3, num_classes: 1000, image_size: 224, patch_size: 16, heads, head_dim: 48, depth: 12, local_layers: 10, mlp_ratio: 4, locality_strength: 1.0 }
    }

    /// The Fashion-MNIST model: 28×28 grey images in a 4×4 grid of 7×7 patches,
    /// 4 heads of 16 (C = 64), 6 blocks of which 4 GPSA. (4×4 patches, a 7×7 grid,
    /// train 3.4× slower per image on lavapipe: 146 against 494 img/s.)
    pub fn fmnist() -> ConvitConfig {
        ConvitConfig { name: "convit-fmnist".into(), in_chans: 1, num_classes: 10, image_size: 28, patch_size: 7, heads: 4, head_dim: 16, depth: 6, local_layers: 4, ..Self::released("", 4) }
    }

    /// A preset by name: `convit-ti`, `convit-s`, `convit-b` (also timm's
    /// `convit_tiny`, … and `convit-tiny`, …) or `convit-fmnist`.
    fn preset(name: &str) -> Option<ConvitConfig> {
        match name.to_lowercase().as_str() {
            "convit-ti" | "convit-tiny" | "convit_tiny" => Some(Self::released("convit-ti", 4)),
            "convit-s" | "convit-small" | "convit_small" => Some(Self::released("convit-s", 9)),
            "convit-b" | "convit-base" | "convit_base" => Some(Self::released("convit-b", 16)),
            "convit-fmnist" => Some(Self::fmnist()),
            _ => None,
        }
    }

    /// A preset (`preset`) or a JSON file
    /// (e.g. `{"name": "convit-s+", "heads": 9, "head_dim": 64}`).
    pub fn by_name(name: &str) -> Result<ConvitConfig> {
        if let Some(p) = Self::preset(name) {
            return Ok(p);
        }
        let text = crate::util::read_text_limited(std::path::Path::new(name), crate::util::limits::TEXT, "JSON config")
            .map_err(|e| anyhow::anyhow!("{name}: not a model name (convit-ti, convit-s, convit-b, convit-fmnist) and not a readable JSON config ({})", e.root_cause()))?;
        let cfg: ConvitConfig = serde_json::from_str(&text).with_context(|| format!("{name}: invalid ConViT config JSON"))?;
        cfg.validate().with_context(|| name.to_string())?;
        Ok(cfg)
    }

    /// Whether `name` names a ConViT preset.
    pub fn is_preset(name: &str) -> bool {
        Self::preset(name).is_some()
    }

    pub fn dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Patches per side and in all.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }

    pub fn patches(&self) -> usize {
        self.grid() * self.grid()
    }

    pub fn hidden(&self) -> usize {
        self.mlp_ratio * self.dim()
    }

    /// Multiply-adds of one image's forward as the engine computes it: spec §1.3's
    /// count with the split form's GPSA (Q·Kᵀ, softmax(S)·V and Qpos·V: 3·N²·C a
    /// layer, against the reference's 2·N²·C + 3·H·N² with pos_proj per image; the
    /// positional softmax, once per layer, not counted). ConViT-Ti: 1.32 G against
    /// the reference's 1.25 G.
    pub fn macs(&self) -> f64 {
        let (n, c, p) = (self.patches() as f64, self.dim() as f64, self.patch_size as f64);
        let (g, l) = (self.local_layers as f64, self.depth as f64);
        let r = self.mlp_ratio as f64;
        n * c * self.in_chans as f64 * p * p
            + g * ((4.0 + 2.0 * r) * n * c * c + 3.0 * n * n * c)
            + (l - g) * ((4.0 + 2.0 * r) * (n + 1.0) * c * c + 2.0 * (n + 1.0) * (n + 1.0) * c)
            + c * self.num_classes as f64
    }

    /// Checks consistency and sizes (limits far above ConViT-B's: 16 heads of 48,
    /// 12 blocks, 1000 classes).
    pub fn validate(&self) -> Result<()> {
        ensure!((1..=64).contains(&self.heads), "heads {} outside 1..=64", self.heads);
        ensure!(
            self.head_dim % 4 == 0 && (4..=crate::ops::attention::MAX_HEAD_DIM).contains(&self.head_dim),
            "head_dim {} must be a multiple of 4 in 4..={}",
            self.head_dim,
            crate::ops::attention::MAX_HEAD_DIM
        );
        ensure!((1..=64).contains(&self.depth), "depth {} outside 1..=64", self.depth);
        ensure!(self.local_layers >= 1, "local_layers 0: a ConViT has at least one GPSA block (without, it is a plain ViT, which checkpoints could not tell from)");
        ensure!(self.local_layers <= self.depth, "local_layers {} exceeds depth {}", self.local_layers, self.depth);
        ensure!(
            self.local_layers < self.depth,
            "local_layers {} = depth: the class token would never be prepended (a quirk of both reference codes that this engine does not reproduce)",
            self.local_layers
        );
        ensure!((1..=100_000).contains(&self.num_classes), "num_classes {} outside 1..=100000", self.num_classes);
        ensure!((1..=16).contains(&self.mlp_ratio), "mlp_ratio {} outside 1..=16", self.mlp_ratio);
        ensure!(matches!(self.in_chans, 1 | 3), "in_chans {} must be 1 or 3", self.in_chans);
        ensure!(self.patch_size >= 1 && self.image_size % self.patch_size == 0, "image_size {} is not a multiple of patch_size {}", self.image_size, self.patch_size);
        crate::models::cvt::check_resolution(self.image_size).context("image_size")?;
        ensure!(self.patches() >= 1 && self.patches() <= 4096, "{} patches: outside 1..=4096", self.patches());
        Ok(())
    }

    /// The architecture a checkpoint's names and shapes describe (head width from
    /// `gating_param`'s length: the heads are visible in GPSA's parameters).
    pub fn detect(t: &HashMap<String, Tensor>) -> Result<ConvitConfig> {
        let shape = |n: &str| t.get(n).map(|x| x.shape.clone()).with_context(|| format!("missing tensor {n}"));
        let pe = shape("patch_embed.proj.weight")?;
        ensure!(pe.len() == 4 && pe[2] == pe[3], "patch_embed.proj.weight has shape {pe:?}; expected [C, in, p, p]");
        let (c, in_chans, patch) = (pe[0], pe[1], pe[2]);
        let pos = shape("pos_embed")?;
        ensure!(pos.len() == 3 && pos[2] == c, "pos_embed has shape {pos:?}; expected [1, N, {c}]");
        let gs = (pos[1] as f64).sqrt().round() as usize;
        ensure!(gs * gs == pos[1], "pos_embed holds {} positions, not a square grid", pos[1]);
        let depth = (0..).take_while(|i| t.contains_key(&format!("blocks.{i}.norm1.weight"))).count();
        let local = (0..depth).take_while(|i| t.contains_key(&format!("blocks.{i}.attn.gating_param"))).count();
        ensure!(local > 0, "no GPSA block (blocks.0.attn.gating_param)");
        let heads = shape("blocks.0.attn.gating_param")?.iter().product::<usize>();
        ensure!(heads > 0 && c % heads == 0, "{heads} heads do not divide width {c}");
        let fc1 = shape("blocks.0.mlp.fc1.weight")?;
        let classes = shape("head.weight")?[0];
        let cfg = ConvitConfig {
            name: "custom".into(),
            in_chans,
            num_classes: classes,
            image_size: gs * patch,
            patch_size: patch,
            heads,
            head_dim: c / heads,
            depth,
            local_layers: local,
            mlp_ratio: fc1[0] / c.max(1),
            locality_strength: 1.0,
        };
        // Named after a preset where it is one.
        for name in ["convit-ti", "convit-s", "convit-b"] {
            let p = Self::by_name(name)?;
            if (ConvitConfig { name: p.name.clone(), num_classes: p.num_classes, ..cfg.clone() }) == p {
                return Ok(ConvitConfig { name: p.name, ..cfg });
            }
        }
        Ok(cfg)
    }

    /// Every parameter's name and shape, in the state dict's order (spec §4).
    pub fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (c, h, hid, p) = (self.dim(), self.heads, self.hidden(), self.patch_size);
        let mut v: Vec<(String, Vec<usize>)> = vec![
            ("cls_token".into(), vec![1, 1, c]),
            ("pos_embed".into(), vec![1, self.patches(), c]),
            ("patch_embed.proj.weight".into(), vec![c, self.in_chans, p, p]),
            ("patch_embed.proj.bias".into(), vec![c]),
        ];
        for i in 0..self.depth {
            let b = format!("blocks.{i}");
            let mut push = |n: &str, s: Vec<usize>| v.push((format!("{b}.{n}"), s));
            push("norm1.weight", vec![c]);
            push("norm1.bias", vec![c]);
            if i < self.local_layers {
                push("attn.gating_param", vec![h]);
                push("attn.qk.weight", vec![2 * c, c]);
                push("attn.v.weight", vec![c, c]);
            } else {
                push("attn.qkv.weight", vec![3 * c, c]);
            }
            push("attn.proj.weight", vec![c, c]);
            push("attn.proj.bias", vec![c]);
            if i < self.local_layers {
                push("attn.pos_proj.weight", vec![h, 3]);
                push("attn.pos_proj.bias", vec![h]);
            }
            push("norm2.weight", vec![c]);
            push("norm2.bias", vec![c]);
            push("mlp.fc1.weight", vec![hid, c]);
            push("mlp.fc1.bias", vec![hid]);
            push("mlp.fc2.weight", vec![c, hid]);
            push("mlp.fc2.bias", vec![c]);
        }
        v.extend([("norm.weight".into(), vec![c]), ("norm.bias".into(), vec![c]), ("head.weight".into(), vec![self.num_classes, c]), ("head.bias".into(), vec![self.num_classes])]);
        v
    }

    /// Checks that `t` holds exactly this architecture's tensors, in its shapes.
    pub fn check(&self, t: &HashMap<String, Tensor>) -> Result<()> {
        let want = self.expected_shapes();
        for (n, s) in &want {
            match t.get(n) {
                None => bail!("missing tensor {n} (a {} needs it)", self.name),
                Some(x) if &x.shape != s => bail!("tensor {n} has shape {:?}; {} expects {s:?}", x.shape, self.name),
                _ => {}
            }
        }
        if t.len() != want.len() {
            let known: std::collections::HashSet<&String> = want.iter().map(|(n, _)| n).collect();
            let mut extra: Vec<&String> = t.keys().filter(|n| !known.contains(n)).collect();
            extra.sort();
            bail!("unexpected tensor {} for {}", extra.first().map(|s| s.as_str()).unwrap_or("?"), self.name);
        }
        Ok(())
    }
}
