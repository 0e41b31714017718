//! `cvt-gpu convert`: any checkpoint the engine reads (safetensors or a PyTorch
//! `torch.save` file, either naming) to safetensors in the official or the
//! Hugging Face naming (CvT), or in the official names timm keeps (ConViT). With `--naming hf` it also writes the `config.json` that
//! transformers' `CvtForImageClassification.from_pretrained` reads, so a model
//! trained here can be continued in PyTorch.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};

use crate::checkpoint::{model_metadata, write_atomic, write_safetensors, Entry};
use crate::models::cvt::weights::{official_to_hf, read_checkpoint};
use crate::models::cvt::{CvtConfig, LoadOptions};
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
    /// Output .safetensors file, or a directory (then DIR/model.safetensors). With
    /// --naming hf always a directory: DIR/model.safetensors and DIR/config.json.
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
    let arch = a.config.as_deref().map(crate::models::Arch::by_name).transpose()?;
    let ck = read_checkpoint(&a.input)?;
    let opts = LoadOptions { config: None, activation: a.activation, f16: false, allow_nonfinite: a.allow_nonfinite };
    let d = crate::models::describe(&ck, &a.input, arch, &opts, "--config")?;
    let cfg = match &d.arch {
        crate::models::Arch::Cvt(c) => c.clone(),
        crate::models::Arch::Convit(c) => return convit(a, &ck, c, &d),
    };
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
    let meta = model_metadata(&crate::models::Arch::Cvt(cfg.clone()), d.act, d.labels.as_deref(), d.preprocess.as_ref())?;
    let summary = format!("{} tensors, {} naming, {}", entries.len(), if hf { "Hugging Face" } else { "official" }, cfg.name);
    if !hf {
        let out = write_file(&a.output, &entries, &meta)?;
        println!("wrote {} ({summary})", out.display());
        return Ok(());
    }
    if a.output.extension().is_some_and(|e| e == "safetensors") {
        bail!("{}: --naming hf writes a model directory (model.safetensors + config.json, as from_pretrained reads); name the directory instead", a.output.display());
    }
    if a.output.exists() && !a.output.is_dir() {
        bail!("{}: exists and is not a directory; --naming hf writes a model directory (model.safetensors + config.json)", a.output.display());
    }
    if d.act == Act::QuickGelu {
        eprintln!(
            "warning: {} computes QuickGELU (x*sigmoid(1.702x)), but transformers' CvT computes exact GELU, so its outputs will differ a little from cvt-gpu's; train with --activation gelu for an exact export",
            a.input.display()
        );
    }
    if let Some(i) = (0..cfg.stages()).find(|&i| cfg.depths[i] <= i) {
        eprintln!(
            "warning: transformers (5.x) cannot build this model: it indexes stage {i}'s drop-path list by the stage number, which needs more than {i} blocks in stage {i} (depths {:?})",
            cfg.depths
        );
    }
    let labels = d.labels.clone().or_else(|| (cfg.num_classes == 1000).then(crate::labels::imagenet));
    let json = serde_json::to_string_pretty(&hf_config(&cfg, labels.as_deref()))?;
    write_hf_dir(&a.output, &entries, &meta, json.as_bytes())?;
    println!("wrote {}/model.safetensors and config.json ({summary}; from_pretrained(\"{}\") loads it)", a.output.display(), a.output.display());
    Ok(())
}

/// A ConViT checkpoint (official `.pth`, possibly under `model`, or timm
/// safetensors) to safetensors in its official names, which timm uses unchanged.
fn convit(a: &ConvertArgs, ck: &crate::models::cvt::weights::Checkpoint, cfg: &crate::models::convit::ConvitConfig, d: &crate::models::Described) -> Result<()> {
    if a.naming == OutNaming::Hf {
        bail!("{}: a ConViT checkpoint; --naming hf is CvT's Hugging Face layout (ConViT's official names are timm's: leave --naming out)", a.input.display());
    }
    let (labels, spec) = (&d.labels, &d.preprocess);
    // In the state dict's order, as timm saves it.
    let entries: Vec<Entry> = cfg.expected_shapes().iter().map(|(n, _)| Entry::f32(n.clone(), ck.tensors[n].shape.clone(), &ck.tensors[n].data)).collect();
    let meta = model_metadata(&crate::models::Arch::Convit(cfg.clone()), d.act, labels.as_deref(), spec.as_ref())?;
    let out = write_file(&a.output, &entries, &meta)?;
    println!("wrote {} ({} tensors, official/timm names, {})", out.display(), entries.len(), cfg.name);
    Ok(())
}

/// One safetensors file at `output` (a directory: DIR/model.safetensors), its
/// parent made if missing and removed again if the write fails; returns its path.
fn write_file(output: &Path, entries: &[Entry], meta: &std::collections::HashMap<String, String>) -> Result<PathBuf> {
    let out = if output.is_dir() || output.to_string_lossy().ends_with('/') { output.join("model.safetensors") } else { output.to_path_buf() };
    let made = create_parent(&out)?;
    if let Err(e) = write_safetensors(&out, entries, meta) {
        if let Some(dir) = made {
            std::fs::remove_dir(dir).ok();
        }
        return Err(e);
    }
    Ok(out)
}

/// Creates `path`'s parent directory if missing; returns it when this call made it.
fn create_parent(path: &Path) -> Result<Option<PathBuf>> {
    let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) else { return Ok(None) };
    if dir.is_dir() {
        return Ok(None);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create the output directory", dir.display()))?;
    Ok(Some(dir.to_path_buf()))
}

/// A Hugging Face model directory: `dir/model.safetensors` and `dir/config.json`,
/// both or neither. A new directory is written whole under a temporary name and
/// renamed into place; into an existing directory each file is written to a
/// temporary name first and the two are renamed only once both are complete.
fn write_hf_dir(dir: &Path, entries: &[Entry], meta: &std::collections::HashMap<String, String>, config: &[u8]) -> Result<()> {
    let shown = dir.display();
    let staging = crate::checkpoint::temporary_sibling(dir)?;
    let made_parent = create_parent(dir)?;
    for f in ["model.safetensors", "config.json"] {
        if dir.join(f).is_dir() {
            bail!("{}: is a directory; cannot write the model there", dir.join(f).display());
        }
    }
    let result = (|| -> Result<()> {
        std::fs::create_dir(&staging).with_context(|| format!("{}: cannot create", staging.display()))?;
        write_safetensors(&staging.join("model.safetensors"), entries, meta)?;
        write_atomic(&staging.join("config.json"), config)?;
        if !dir.exists() {
            return std::fs::rename(&staging, dir).with_context(|| format!("{shown}: cannot create"));
        }
        for f in ["model.safetensors", "config.json"] {
            std::fs::rename(staging.join(f), crate::checkpoint::write_target(&dir.join(f))?).with_context(|| format!("{}: cannot replace", dir.join(f).display()))?;
        }
        Ok(())
    })();
    std::fs::remove_dir_all(&staging).ok();
    if result.is_err() {
        if let Some(p) = made_parent {
            std::fs::remove_dir(p).ok();
        }
    }
    result
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
