//! The IDX format of MNIST and Fashion-MNIST (optionally gzipped): a magic
//! number 0x0000_08_NN (unsigned bytes, NN dimensions), NN big-endian u32 sizes,
//! then exactly the bytes those sizes multiply to.

use anyhow::{anyhow, bail, Result};
use std::io::Read;
use std::path::Path;

use crate::util::{limits, read_limited};

/// An IDX array of unsigned bytes.
pub struct Idx {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// More dimensions than any IDX file of bytes uses (images have 3).
const MAX_DIMS: usize = 8;

/// Reads an IDX file; gzip is detected by content.
pub fn read_idx(path: &Path) -> Result<Idx> {
    let raw = read_limited(path, limits::IDX, "IDX file")?;
    parse_idx(&raw).map_err(|e| anyhow!("{}: {e:#}", path.display()))
}

/// Parses an IDX file's contents, gzipped or not. Errors are bare reasons.
///
/// Gzip is inflated as a stream: the header first, then at most the bytes it
/// declares plus one, so a small file that inflates to gigabytes (a gzip bomb)
/// costs no more than its header promises. Bytes after the declared data, in
/// either form, are refused: a header that disagrees with its file is corrupt.
pub fn parse_idx(raw: &[u8]) -> Result<Idx> {
    if raw.starts_with(&[0x1f, 0x8b]) {
        parse_stream(flate2::read::GzDecoder::new(raw))
    } else {
        parse_stream(raw)
    }
}

/// Fills `buf` from `r`; false when the stream ends first. (Only gzip fails to
/// read: a byte slice cannot.)
fn fill(r: &mut impl Read, buf: &mut [u8]) -> Result<bool> {
    match r.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(corrupt(e)),
    }
}

fn corrupt(e: std::io::Error) -> anyhow::Error {
    anyhow!("corrupt gzip data ({e})")
}

fn parse_stream(mut r: impl Read) -> Result<Idx> {
    let mut magic = [0u8; 4];
    if !fill(&mut r, &mut magic)? || magic[0] != 0 || magic[1] != 0 {
        bail!("not an IDX file (bad magic number)");
    }
    if magic[2] != 0x08 {
        bail!("IDX element type 0x{:02x} is not unsigned bytes (0x08)", magic[2]);
    }
    let nd = magic[3] as usize;
    if nd == 0 || nd > MAX_DIMS {
        bail!("IDX header declares {nd} dimensions (1 to {MAX_DIMS} supported)");
    }
    let mut sizes = vec![0u8; 4 * nd];
    if !fill(&mut r, &mut sizes)? {
        bail!("truncated IDX header");
    }
    let dims: Vec<usize> = sizes.chunks_exact(4).map(|b| u32::from_be_bytes(b.try_into().unwrap()) as usize).collect();
    if let Some(i) = dims.iter().position(|&d| d == 0) {
        bail!("IDX dimension {i} is 0 in {dims:?}: an empty array");
    }
    let n = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64)).filter(|&n| n <= limits::IDX).ok_or_else(|| anyhow!("IDX dimensions {dims:?} declare more than {} bytes", limits::IDX))?;
    let mut data = vec![];
    r.take(n + 1).read_to_end(&mut data).map_err(corrupt)?;
    let n = n as usize;
    if data.len() < n {
        bail!("truncated: {} data bytes for dimensions {dims:?} ({n} expected)", data.len());
    }
    if data.len() > n {
        bail!("more data than dimensions {dims:?} declare ({n} bytes); corrupt header?");
    }
    Ok(Idx { dims, data })
}

impl std::fmt::Debug for Idx {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "Idx({:?})", self.dims)
    }
}
