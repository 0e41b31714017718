//! Host tensors and checkpoint files, whatever the model family: safetensors
//! (F32, F16, BF16) or a PyTorch `torch.save` zip (`pth`), told apart by
//! content, not by extension. Each family maps the names it finds (`models`).

use anyhow::{anyhow, bail, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// A host tensor in f32.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor { shape, data }
    }
}

fn f16_to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
}

fn bf16_to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
}

/// The tensors (minus optimizer state and integer counters) and metadata of a
/// safetensors file. Errors are bare reasons; the caller adds the path.
pub fn read_safetensors(bytes: &[u8]) -> Result<(Vec<(String, Tensor)>, BTreeMap<String, String>)> {
    let invalid = |e: safetensors::SafeTensorError| {
        use safetensors::SafeTensorError as E;
        let why = match e {
            E::HeaderTooSmall | E::InvalidHeaderLength | E::MetadataIncompleteBuffer => "truncated or not safetensors".to_string(),
            E::InvalidHeader | E::InvalidHeaderStart | E::InvalidHeaderDeserialization => "corrupt header".to_string(),
            other => format!("{other:?}"),
        };
        anyhow!("not a valid safetensors file ({why})")
    };
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(invalid)?;
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(invalid)?;
    let metadata: BTreeMap<String, String> = meta.metadata().clone().map(|m| m.into_iter().collect()).unwrap_or_default();
    let mut raw: Vec<(String, Tensor)> = vec![];
    for (name, view) in st.tensors() {
        use safetensors::Dtype;
        // Optimizer state of a training checkpoint (crate::checkpoint): not weights.
        if name.starts_with(crate::checkpoint::OPTIM_PREFIX) {
            continue;
        }
        let data = match view.dtype() {
            Dtype::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(view.data()),
            Dtype::F16 => f16_to_f32(view.data()),
            Dtype::BF16 => bf16_to_f32(view.data()),
            // BatchNorm's step counter: meaningless at inference.
            Dtype::I64 if name.ends_with("num_batches_tracked") => continue,
            other => bail!("tensor {name} has dtype {other:?}; only F32, F16 and BF16 are supported"),
        };
        raw.push((name, Tensor::new(view.shape().to_vec(), data)));
    }
    Ok((raw, metadata))
}

/// The tensors and metadata of a checkpoint file, names as stored (BatchNorm
/// step counters and a training checkpoint's optimizer state left out).
pub fn read(path: &Path) -> Result<(Vec<(String, Tensor)>, BTreeMap<String, String>)> {
    let shown = path.display();
    if path.is_dir() {
        bail!("{shown}: is a directory, expected a checkpoint file (.safetensors, or a PyTorch .pth/.pt/.bin)");
    }
    let bytes = crate::util::read_limited(path, crate::util::limits::WEIGHTS, "checkpoint")?;
    read_bytes(&bytes, &shown.to_string())
}

/// `read` of a file's contents; `shown` names it in errors.
pub fn read_bytes(bytes: &[u8], shown: &str) -> Result<(Vec<(String, Tensor)>, BTreeMap<String, String>)> {
    let (raw, metadata) = if crate::models::pth::is_zip(bytes) {
        let file = crate::models::pth::read(bytes).map_err(|e| anyhow!("{shown}: PyTorch checkpoint: {e:#}"))?;
        (file.tensors, BTreeMap::new())
    } else if crate::models::pth::is_legacy(bytes) {
        bail!("{shown}: a legacy (before PyTorch 1.6) PyTorch checkpoint; re-save it with a current torch.save (or convert it to safetensors with a current torch)");
    } else {
        read_safetensors(bytes).map_err(|e| anyhow!("{shown}: {e:#}"))?
    };
    // BatchNorm's step counter is never a weight, whatever dtype a script cast it to.
    Ok((raw.into_iter().filter(|(n, _)| !n.ends_with("num_batches_tracked")).collect(), metadata))
}
