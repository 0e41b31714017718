//! Writing checkpoints: safetensors (F32, plus int64 BatchNorm counters) with string metadata, written to a
//! temporary file in the same directory, flushed to disk, then renamed over the
//! target, so a crash or Ctrl-C at any moment leaves either the old file or the
//! new one, never a torn one.
//!
//! A training checkpoint holds the model in the official naming (what `infer`
//! loads) plus the optimizer moments as `optim.<param>.exp_avg` /
//! `optim.<param>.exp_avg_sq` (the engine's storage layout, flat), which
//! `model::weights::read_checkpoint` skips; the training state (step, epoch, RNG
//! seed, settings) is JSON in the metadata.

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// One tensor to write: name, shape and little-endian bytes of `dtype`.
pub struct Entry<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: safetensors::Dtype,
    pub bytes: std::borrow::Cow<'a, [u8]>,
}

impl<'a> Entry<'a> {
    pub fn f32(name: String, shape: Vec<usize>, data: &'a [f32]) -> Entry<'a> {
        Entry { name, shape, dtype: safetensors::Dtype::F32, bytes: std::borrow::Cow::Borrowed(bytemuck::cast_slice(data)) }
    }
    /// An int64 scalar (BatchNorm's `num_batches_tracked`, which PyTorch state dicts carry).
    pub fn i64_scalar(name: String, value: i64) -> Entry<'static> {
        Entry { name, shape: vec![], dtype: safetensors::Dtype::I64, bytes: std::borrow::Cow::Owned(value.to_le_bytes().to_vec()) }
    }
}

/// The metadata of a model file the engine writes (`train`'s model.safetensors,
/// `convert`): "format" = "pt" (PyTorch tensor layout; transformers refuses other
/// values), config, activation, and labels and preprocessing when known.
pub fn model_metadata(arch: &crate::models::Arch, act: crate::ops::Act, labels: Option<&[String]>, spec: Option<&crate::preprocess::Spec>) -> Result<HashMap<String, String>> {
    let mut m = HashMap::new();
    m.insert("format".into(), "pt".into());
    m.insert("producer".into(), "cvt-gpu".into());
    let (key, cfg) = arch.metadata()?;
    m.insert(key.into(), cfg);
    // ConViT's MLP is always exact GELU: only CvT records its activation.
    if arch.family() == crate::models::Family::Cvt {
        m.insert("activation".into(), serde_json::to_value(act)?.as_str().unwrap_or("quick-gelu").to_string());
    }
    if let Some(l) = labels {
        m.insert("labels".into(), serde_json::to_string(l)?);
    }
    if let Some(p) = spec {
        m.insert("preprocess".into(), serde_json::to_string(p)?);
    }
    Ok(m)
}

/// Prefix of optimizer-state tensors inside a training checkpoint.
pub const OPTIM_PREFIX: &str = "optim.";

/// Serialises `entries` and `metadata` as safetensors into `path`, atomically.
pub fn write_safetensors(path: &Path, entries: &[Entry], metadata: &HashMap<String, String>) -> Result<()> {
    let shown = path.display();
    let views: Vec<(String, safetensors::tensor::TensorView)> = entries
        .iter()
        .map(|e| safetensors::tensor::TensorView::new(e.dtype, e.shape.clone(), &e.bytes).map(|v| (e.name.clone(), v)))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{shown}: cannot serialise ({e:?})"))?;
    let bytes = safetensors::tensor::serialize(views, &Some(metadata.clone())).map_err(|e| anyhow::anyhow!("{shown}: cannot serialise ({e:?})"))?;
    write_atomic(path, &bytes)
}

/// Where a write to `path` must go: the file a symbolic link points to (so the
/// link is written through, never replaced by a regular file), else `path`.
pub fn write_target(path: &Path) -> Result<std::path::PathBuf> {
    let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if !is_link {
        return Ok(path.to_path_buf());
    }
    let target = std::fs::read_link(path).with_context(|| format!("{}: cannot read the symbolic link", path.display()))?;
    let target = if target.is_absolute() { target } else { path.parent().unwrap_or(Path::new(".")).join(target) };
    // A chain of links resolves one step per call.
    if std::fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink()) {
        return std::fs::canonicalize(&target).with_context(|| format!("{}: the symbolic link leads nowhere", path.display()));
    }
    Ok(target)
}

/// The temporary sibling a write to `path` goes through before its rename:
/// `.NAME.tmpPID` in the same directory (so the rename stays on one file system).
/// `is_temporary` recognises these names, so a run can remove what killed writes
/// left behind.
pub fn temporary_sibling(path: &Path) -> Result<std::path::PathBuf> {
    let name = path.file_name().with_context(|| format!("{}: not a file path", path.display()))?.to_string_lossy();
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok(dir.join(format!(".{name}.tmp{}", std::process::id())))
}

/// Whether a file name is one `temporary_sibling` makes.
pub fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && name.rsplit_once(".tmp").is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Writes `bytes` to `path` through a temporary sibling file and a rename. A
/// symbolic link at `path` is written through (its target is replaced).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let path = &write_target(path)?;
    let shown = path.display();
    let tmp = temporary_sibling(path)?;
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create (is the directory writable?)", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("{}: write failed (disk full?)", tmp.display()))?;
        f.sync_all().with_context(|| format!("{}: sync failed", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("{shown}: cannot replace"))?;
        Ok(())
    })();
    if result.is_err() {
        std::fs::remove_file(&tmp).ok();
    }
    result
}
