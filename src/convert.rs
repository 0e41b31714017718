//! `cvt-gpu convert`: any checkpoint the engine reads (safetensors or a PyTorch
//! `torch.save` file, either naming) to safetensors in the official or the
//! Hugging Face naming. With `--naming hf` it also writes the `config.json` that
//! transformers' `CvtForImageClassification.from_pretrained` reads, so a model
//! trained here can be continued in PyTorch.

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

use crate::checkpoint::{model_metadata, write_atomic, write_safetensors, Entry};
use crate::model::weights::{official_to_hf, read_checkpoint};
use crate::model::{describe, CvtConfig, LoadOptions};
use crate::ops::Act;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutNaming {
    /// `stage0.blocks.0.attn.proj_q.weight` (the official CvT code; what `train` writes).
    Official,
    /// `cvt.encoder.stages.0.layers.0.attention.attention.projection_query.weight`, plus config.json.
    Hf,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Checkpoint to read: .safetensors, or PyTorch .pth/.pt/.bin (detected by content), either naming.
    pub input: PathBuf,
    /// Output .safetensors file, or a directory (then DIR/model.safetensors, as Hugging Face expects).
    pub output: PathBuf,
    /// Parameter naming of the output.
    #[arg(long, value_enum, default_value = "official")]
    pub naming: OutNaming,
    /// Architecture: cvt-13, cvt-21, cvt-w24 or a JSON config (default: metadata, else detected).
    #[arg(long)]
    pub config: Option<String>,
    /// MLP activation to record in the output (default: the checkpoint's, else the naming's).
    #[arg(long, value_enum)]
    pub activation: Option<Act>,
    /// Copy weights holding NaN or infinities instead of refusing the file.
    #[arg(long)]
    pub allow_nonfinite: bool,
}

pub fn run(a: &ConvertArgs) -> Result<()> {
    let config = a.config.as_deref().map(CvtConfig::by_name).transpose()?;
    let ck = read_checkpoint(&a.input)?;
    let d = describe(&ck, &a.input, &LoadOptions { config, activation: a.activation, f16: false, allow_nonfinite: a.allow_nonfinite })?;
    let out = if a.output.is_dir() || a.output.to_string_lossy().ends_with('/') { a.output.join("model.safetensors") } else { a.output.clone() };
    if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create the output directory", dir.display()))?;
    }
    let hf = a.naming == OutNaming::Hf;

    let mut names: Vec<&String> = ck.tensors.keys().collect();
    names.sort();
    let rename = |n: &str| if hf { official_to_hf(n) } else { n.to_string() };
    let mut entries: Vec<Entry> = names.iter().map(|n| Entry::f32(rename(n), ck.tensors[*n].shape.clone(), &ck.tensors[*n].data)).collect();
    // PyTorch's BatchNorm also carries a step counter; without it a strict
    // load_state_dict fails and transformers reports the keys as missing. Its value
    // only matters for momentum=None, which CvT does not use.
    for n in names.iter().filter_map(|n| n.strip_suffix("running_mean")) {
        entries.push(Entry::i64_scalar(rename(&format!("{n}num_batches_tracked")), 0));
    }
    let labels = d.labels.clone().or_else(|| (d.cfg.num_classes == 1000).then(crate::labels::imagenet));
    let meta = model_metadata(&d.cfg, d.act, d.labels.as_deref(), d.preprocess.as_ref())?;
    write_safetensors(&out, &entries, &meta)?;

    let mut wrote = format!("{} ({} tensors, {} naming, {})", out.display(), entries.len(), if hf { "Hugging Face" } else { "official" }, d.cfg.name);
    if hf {
        if d.act == Act::QuickGelu {
            eprintln!(
                "warning: {} computes QuickGELU (x*sigmoid(1.702x)), but transformers' CvT computes exact GELU, so its outputs will differ a little from cvt-gpu's; train with --activation gelu for an exact export",
                a.input.display()
            );
        }
        if let Some(i) = (0..d.cfg.stages()).find(|&i| d.cfg.depths[i] <= i) {
            eprintln!(
                "warning: transformers (5.x) cannot build this model: it indexes stage {i}'s drop-path list by the stage number, which needs more than {i} blocks in stage {i} (depths {:?})",
                d.cfg.depths
            );
        }
        let cfg_path = out.with_file_name("config.json");
        let json = serde_json::to_string_pretty(&hf_config(&d.cfg, labels.as_deref()))?;
        write_atomic(&cfg_path, json.as_bytes())?;
        wrote += &format!(" and {}", cfg_path.display());
    }
    println!("wrote {wrote}");
    Ok(())
}

/// transformers' `CvtConfig` for this architecture (every per-stage list sized to
/// the stage count; the fields CvT's official code fixes are set as it does).
pub fn hf_config(cfg: &CvtConfig, labels: Option<&[String]>) -> serde_json::Value {
    let n = cfg.stages();
    let id2label: serde_json::Map<String, serde_json::Value> =
        (0..cfg.num_classes).map(|i| (i.to_string(), labels.and_then(|l| l.get(i)).cloned().unwrap_or_else(|| format!("LABEL_{i}")).into())).collect();
    let label2id: serde_json::Map<String, serde_json::Value> = id2label.iter().map(|(k, v)| (v.as_str().unwrap_or_default().to_string(), k.parse::<usize>().unwrap_or(0).into())).collect();
    serde_json::json!({
        "architectures": ["CvtForImageClassification"],
        "model_type": "cvt",
        "num_channels": cfg.in_chans,
        "patch_sizes": cfg.patch_sizes,
        "patch_stride": cfg.patch_strides,
        "patch_padding": cfg.patch_padding,
        "embed_dim": cfg.dims,
        "num_heads": cfg.heads,
        "depth": cfg.depths,
        "mlp_ratio": vec![cfg.mlp_ratio; n],
        "attention_drop_rate": vec![0.0; n],
        "drop_rate": vec![0.0; n],
        "drop_path_rate": vec![0.0; n],
        "qkv_bias": vec![true; n],
        "cls_token": cfg.cls_token,
        "qkv_projection_method": vec!["dw_bn"; n],
        "kernel_qkv": vec![3; n],
        "padding_kv": vec![1; n],
        "stride_kv": vec![2; n],
        "padding_q": vec![1; n],
        "stride_q": vec![1; n],
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "num_labels": cfg.num_classes,
        "id2label": id2label,
        "label2id": label2id,
        "image_size": cfg.image_size,
    })
}
