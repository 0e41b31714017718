//! CvT architecture description: the three released variants and custom configs
//! (JSON), plus detection of the architecture from a checkpoint's tensor shapes.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

use super::weights::Tensor;

/// One CvT: per-stage widths, heads, depths and token-embedding geometry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CvtConfig {
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default = "default_in_chans")]
    pub in_chans: usize,
    pub num_classes: usize,
    pub dims: Vec<usize>,
    pub heads: Vec<usize>,
    pub depths: Vec<usize>,
    #[serde(default = "default_patch_sizes")]
    pub patch_sizes: Vec<usize>,
    #[serde(default = "default_patch_strides")]
    pub patch_strides: Vec<usize>,
    #[serde(default = "default_patch_padding")]
    pub patch_padding: Vec<usize>,
    /// Which stages prepend a cls token (official: only the last).
    #[serde(default = "default_cls")]
    pub cls_token: Vec<bool>,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Default input resolution (square).
    #[serde(default = "default_image_size")]
    pub image_size: usize,
}

fn default_name() -> String {
    "custom".into()
}
fn default_in_chans() -> usize {
    3
}
fn default_patch_sizes() -> Vec<usize> {
    vec![7, 3, 3]
}
fn default_patch_strides() -> Vec<usize> {
    vec![4, 2, 2]
}
fn default_patch_padding() -> Vec<usize> {
    vec![2, 1, 1]
}
fn default_cls() -> Vec<bool> {
    vec![false, false, true]
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_image_size() -> usize {
    224
}

impl CvtConfig {
    fn released(name: &str, dims: [usize; 3], heads: [usize; 3], depths: [usize; 3], image_size: usize) -> CvtConfig {
        CvtConfig {
            name: name.into(),
            in_chans: 3,
            num_classes: 1000,
            dims: dims.to_vec(),
            heads: heads.to_vec(),
            depths: depths.to_vec(),
            patch_sizes: default_patch_sizes(),
            patch_strides: default_patch_strides(),
            patch_padding: default_patch_padding(),
            cls_token: default_cls(),
            mlp_ratio: 4.0,
            image_size,
        }
    }

    pub fn cvt13() -> CvtConfig {
        Self::released("cvt-13", [64, 192, 384], [1, 3, 6], [1, 2, 10], 224)
    }
    pub fn cvt21() -> CvtConfig {
        Self::released("cvt-21", [64, 192, 384], [1, 3, 6], [1, 4, 16], 224)
    }
    /// A small CvT for 28x28 grayscale images (Fashion-MNIST), the default of
    /// `cvt-gpu train`: the 7x7 stride-4 token embedding of CvT-13 gives a 7x7
    /// grid, then 4x4 and 2x2 (+ cls); widths 32/64/128, one block per stage.
    /// 0.36M parameters.
    pub fn cvt_fmnist() -> CvtConfig {
        CvtConfig { in_chans: 1, num_classes: 10, ..Self::released("cvt-fmnist", [32, 64, 128], [1, 2, 2], [1, 1, 1], 28) }
    }
    pub fn cvt_w24() -> CvtConfig {
        Self::released("cvt-w24", [192, 768, 1024], [3, 12, 16], [2, 2, 20], 384)
    }

    /// `cvt-13`, `cvt-21`, `cvt-w24` (also `13`, `21`, `w24`), or a JSON file.
    pub fn by_name(name: &str) -> Result<CvtConfig> {
        match name.to_lowercase().trim_start_matches("cvt-").trim_start_matches("cvt") {
            "13" => Ok(Self::cvt13()),
            "21" => Ok(Self::cvt21()),
            "w24" => Ok(Self::cvt_w24()),
            "fmnist" => Ok(Self::cvt_fmnist()),
            _ => Self::from_json_file(name),
        }
    }

    pub fn from_json_file(path: &str) -> Result<CvtConfig> {
        let text = crate::util::read_text_limited(std::path::Path::new(path), crate::util::limits::TEXT, "JSON config")
            .map_err(|e| anyhow::anyhow!("{path}: not a model name (cvt-13, cvt-21, cvt-w24) and not a readable JSON config ({})", e.root_cause()))?;
        let cfg: CvtConfig = serde_json::from_str(&text).with_context(|| format!("{path}: invalid CvT config JSON"))?;
        cfg.validate().with_context(|| format!("{path}"))?;
        Ok(cfg)
    }

    pub fn stages(&self) -> usize {
        self.dims.len()
    }

    pub fn hidden(&self, stage: usize) -> usize {
        (self.dims[stage] as f64 * self.mlp_ratio) as usize
    }

    /// Checks the architecture's consistency and sizes. The limits are far above
    /// any real CvT (CvT-W24: 3 stages, depth 20, width 1024, 1000 classes) and
    /// stop a config or metadata from making the engine allocate or loop without end.
    pub fn validate(&self) -> Result<()> {
        const MAX_STAGES: usize = 6;
        const MAX_DEPTH: usize = 64;
        const MAX_DIM: usize = 16384;
        const MAX_CLASSES: usize = 1 << 20;
        const MAX_KERNEL: usize = 64;
        const MAX_CHANNELS: usize = 64;
        let n = self.dims.len();
        if n == 0 {
            bail!("config has no stages");
        }
        if n > MAX_STAGES {
            bail!("config: {n} stages, more than {MAX_STAGES}");
        }
        let too_big = |what: &str, v: &[usize], max: usize| -> Result<()> {
            match v.iter().find(|&&x| x > max) {
                Some(x) => bail!("config: {what} {x} is larger than {max}"),
                None => Ok(()),
            }
        };
        too_big("depth", &self.depths, MAX_DEPTH)?;
        too_big("dim", &self.dims, MAX_DIM)?;
        too_big("patch size", &self.patch_sizes, MAX_KERNEL)?;
        too_big("patch stride", &self.patch_strides, MAX_KERNEL)?;
        too_big("num_classes", &[self.num_classes], MAX_CLASSES)?;
        too_big("in_chans", &[self.in_chans], MAX_CHANNELS)?;
        crate::models::cvt::check_resolution(self.image_size).context("config: image_size")?;
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0 && self.mlp_ratio <= 64.0) {
            bail!("config: mlp_ratio {} must be in (0, 64]", self.mlp_ratio);
        }
        for (what, len) in [
            ("heads", self.heads.len()),
            ("depths", self.depths.len()),
            ("patch_sizes", self.patch_sizes.len()),
            ("patch_strides", self.patch_strides.len()),
            ("patch_padding", self.patch_padding.len()),
            ("cls_token", self.cls_token.len()),
        ] {
            if len != n {
                bail!("config: {what} has {len} entries, dims has {n}");
            }
        }
        for s in 0..n {
            crate::ops::attention::check_heads(self.dims[s], self.heads[s]).with_context(|| format!("config stage {s}"))?;
            if self.patch_strides[s] == 0 || self.patch_sizes[s] == 0 {
                bail!("config stage {s}: patch size and stride must be positive");
            }
            if self.patch_padding[s] >= self.patch_sizes[s] {
                bail!("config stage {s}: padding {} must be smaller than the patch size {}", self.patch_padding[s], self.patch_sizes[s]);
            }
            if self.dims[s] == 0 || self.hidden(s) == 0 {
                bail!("config stage {s}: width and MLP width must be positive");
            }
        }
        if self.num_classes == 0 || self.in_chans == 0 {
            bail!("config: num_classes and in_chans must be positive");
        }
        Ok(())
    }

    /// Spatial grid of every stage for an input of h x w; errors if it vanishes.
    pub fn grids(&self, h: usize, w: usize) -> Result<Vec<(usize, usize)>> {
        let mut out = vec![];
        let (mut h, mut w) = (h, w);
        for s in 0..self.stages() {
            let (k, st, p) = (self.patch_sizes[s], self.patch_strides[s], self.patch_padding[s]);
            if h + 2 * p < k || w + 2 * p < k {
                bail!("input {h}x{w} is too small for stage {s}'s {k}x{k} token embedding");
            }
            h = (h + 2 * p - k) / st + 1;
            w = (w + 2 * p - k) / st + 1;
            out.push((h, w));
        }
        Ok(out)
    }

    /// Multiply-accumulates of one image's forward (convs, matmuls and the two
    /// attention matmuls), as PyTorch's FlopCounter counts them (×2 for FLOPs).
    pub fn macs(&self, h: usize, w: usize) -> Result<f64> {
        let grids = self.grids(h, w)?;
        let mut macs = 0.0;
        let mut cin = self.in_chans;
        for (s, &(gh, gw)) in grids.iter().enumerate() {
            let c = self.dims[s] as f64;
            let k = self.patch_sizes[s] as f64;
            let t = (gh * gw) as f64;
            let cls = self.cls_token[s] as usize as f64;
            let (kh, kw) = (gh.div_ceil(2), gw.div_ceil(2));
            let tq = t + cls;
            let tk = (kh * kw) as f64 + cls;
            macs += t * c * cin as f64 * k * k;
            let dw = 9.0 * c * (t + 2.0 * (kh * kw) as f64);
            let qkv = c * c * (tq + 2.0 * tk);
            let attn = 2.0 * tq * tk * c;
            let proj = tq * c * c;
            let mlp = 2.0 * tq * c * self.hidden(s) as f64;
            macs += self.depths[s] as f64 * (dw + qkv + attn + proj + mlp);
            cin = self.dims[s];
        }
        macs += (self.dims[self.stages() - 1] * self.num_classes) as f64;
        Ok(macs)
    }

    /// Reads the architecture off a checkpoint's (canonical, official-named) tensors.
    /// Heads are not visible in shapes: the released models all use 64-wide heads,
    /// so heads = dim / 64 unless the checkpoint's metadata carries a config.
    pub fn detect(tensors: &HashMap<String, Tensor>) -> Result<CvtConfig> {
        let mut dims = vec![];
        let mut patch = vec![];
        let mut in_chans = 0;
        while let Some(t) = tensors.get(&format!("stage{}.patch_embed.proj.weight", dims.len())) {
            if t.shape.len() != 4 {
                bail!("stage{}.patch_embed.proj.weight has shape {:?}, expected 4 dimensions", dims.len(), t.shape);
            }
            if dims.is_empty() {
                in_chans = t.shape[1];
            }
            dims.push(t.shape[0]);
            patch.push(t.shape[2]);
        }
        if dims.is_empty() {
            bail!("no stage0.patch_embed.proj.weight: not a CvT checkpoint");
        }
        let mut depths = vec![];
        for s in 0..dims.len() {
            let mut d = 0;
            while tensors.contains_key(&format!("stage{s}.blocks.{d}.norm1.weight")) {
                d += 1;
            }
            depths.push(d);
        }
        let head = tensors.get("head.weight").context("no head.weight (classifier) in the checkpoint")?;
        let (strides, pads): (Vec<usize>, Vec<usize>) = patch.iter().map(|&k| if k == 7 { (4, 2) } else { (2, k / 2) }).unzip();
        let cfg = CvtConfig {
            name: match (dims.as_slice(), depths.as_slice()) {
                ([64, 192, 384], [1, 2, 10]) => "cvt-13".into(),
                ([64, 192, 384], [1, 4, 16]) => "cvt-21".into(),
                ([192, 768, 1024], [2, 2, 20]) => "cvt-w24".into(),
                _ => "custom".into(),
            },
            in_chans,
            num_classes: match head.shape.as_slice() {
                [n, _] => *n,
                s => bail!("head.weight has shape {s:?}, expected [classes, width]"),
            },
            heads: dims.iter().map(|d| (d / 64).max(1)).collect(),
            cls_token: (0..dims.len()).map(|s| tensors.contains_key(&format!("stage{s}.cls_token"))).collect(),
            dims,
            depths,
            patch_sizes: patch,
            patch_strides: strides,
            patch_padding: pads,
            mlp_ratio: 4.0,
            image_size: 224,
        };
        Ok(cfg)
    }
}
