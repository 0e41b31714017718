//! Small shared helpers: a deterministic PRNG and bounded file reads.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;

/// Size limits for the files the engine reads, by kind. A real file of each kind
/// is far below its limit (CvT-W24 in f32 is 1.3 GB; a label file a few KB); the
/// limits stop `/dev/zero`, a mistaken path or a crafted file from taking all memory.
pub mod limits {
    /// Checkpoints: safetensors and PyTorch archives.
    pub const WEIGHTS: u64 = 16 << 30;
    /// JSON configs, label files, metrics, annotation lists.
    pub const TEXT: u64 = 64 << 20;
    /// One image file.
    pub const IMAGE: u64 = 256 << 20;
    /// One IDX file as stored (gzipped or not).
    pub const IDX: u64 = 4 << 30;
}

/// Reads a whole regular file of at most `limit` bytes. FIFOs, devices and other
/// non-regular files are refused before anything is read (a FIFO would block
/// forever, `/dev/zero` never ends); `what` names the kind in the error
/// ("checkpoint", "labels file", ...). Errors name the path.
pub fn read_limited(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let shown = path.display();
    let meta = std::fs::metadata(path).with_context(|| format!("{shown}: cannot read {what}"))?;
    if meta.is_dir() {
        bail!("{shown}: is a directory, expected {} {what}", article(what));
    }
    if !meta.is_file() {
        bail!("{shown}: not a regular file (a FIFO, socket or device), expected {} {what}", article(what));
    }
    if meta.len() > limit {
        bail!("{shown}: {} bytes, more than any {what} this program reads ({} bytes)", meta.len(), limit);
    }
    let f = std::fs::File::open(path).with_context(|| format!("{shown}: cannot read {what}"))?;
    let mut out = Vec::with_capacity(meta.len() as usize);
    // take(): the file may grow between the check and the read.
    f.take(limit + 1).read_to_end(&mut out).with_context(|| format!("{shown}: cannot read {what}"))?;
    if out.len() as u64 > limit {
        bail!("{shown}: more than any {what} this program reads ({limit} bytes)");
    }
    Ok(out)
}

/// Bytes of physical memory, where the platform says.
pub fn physical_memory() -> Option<u64> {
    #[cfg(unix)]
    {
        let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
        if pages > 0 && size > 0 {
            return Some(pages as u64 * size as u64);
        }
    }
    None
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// `read_limited` as UTF-8 text.
pub fn read_text_limited(path: &Path, limit: u64, what: &str) -> Result<String> {
    let bytes = read_limited(path, limit, what)?;
    String::from_utf8(bytes).map_err(|e| anyhow::anyhow!("{}: {what} is not UTF-8 text (invalid byte at offset {})", path.display(), e.utf8_error().valid_up_to()))
}

/// A tiny deterministic PRNG (SplitMix64): reproducible weights and data for
/// benchmarks and tests without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = (self.uniform() as f64).max(1e-12);
        let u2 = self.uniform() as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}
