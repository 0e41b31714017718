//! The IDX format of MNIST and Fashion-MNIST (optionally gzipped): a magic
//! number 0x0000_08_NN (unsigned bytes, NN dimensions), NN big-endian u32 sizes,
//! then the bytes.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;

/// An IDX array of unsigned bytes.
pub struct Idx {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads an IDX file; gzip is detected by content.
pub fn read_idx(path: &Path) -> Result<Idx> {
    let shown = path.display();
    let raw = std::fs::read(path).with_context(|| format!("{shown}: cannot read"))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = vec![];
        flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(|e| anyhow::anyhow!("{shown}: corrupt gzip data ({e})"))?;
        out
    } else {
        raw
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        bail!("{shown}: not an IDX file (bad magic number)");
    }
    if bytes[2] != 0x08 {
        bail!("{shown}: IDX element type 0x{:02x} is not unsigned bytes (0x08)", bytes[2]);
    }
    let nd = bytes[3] as usize;
    let header = 4 + 4 * nd;
    if bytes.len() < header {
        bail!("{shown}: truncated IDX header");
    }
    let dims: Vec<usize> = (0..nd).map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize).collect();
    let n: usize = dims.iter().product();
    if bytes.len() - header < n {
        bail!("{shown}: truncated: {} data bytes for dimensions {dims:?} ({n} expected)", bytes.len() - header);
    }
    Ok(Idx { dims, data: bytes[header..header + n].to_vec() })
}

impl std::fmt::Debug for Idx {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "Idx({:?})", self.dims)
    }
}
