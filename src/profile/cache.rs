//! Per-adapter tuning results, cached on disk so a timed trial runs once per
//! (adapter, driver, engine build), not once per process.
//!
//! The cache is a JSON object in `$CVT_GPU_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/cvt-gpu`, else `~/.cache/cvt-gpu` (`tuning.json`), keyed by
//! the adapter's name, backend, driver and driver version, the crate version and a
//! hash of every WGSL source, so a new driver or changed kernels re-tune. A cache
//! that cannot be read or written only costs the trial again.
//!
//! `--no-tune` (env `CVT_GPU_NO_TUNE=1`) skips both trial and cache and uses a fixed
//! rule per device type instead.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;

use crate::gpu::{Gpu, SHADERS};
use crate::texread::{prelude, TexRead};

/// Whether trials and the cache are disabled (`--no-tune` / `CVT_GPU_NO_TUNE`).
fn disabled() -> bool {
    super::settings::get().no_tune
}

/// The cache file, if a cache directory can be named.
pub fn cache_file() -> Option<PathBuf> {
    let dir = super::settings::get()
        .cache_dir
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("cvt-gpu")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/cvt-gpu")))?;
    Some(dir.join("tuning.json"))
}

/// What identifies one tuning: adapter, driver and this build's kernels.
pub fn key(gpu: &Gpu) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (name, src) in SHADERS {
        name.hash(&mut h);
        src.hash(&mut h);
    }
    for (read, w16, a16) in [(TexRead::Sampled, false, false), (TexRead::Storage, false, false), (TexRead::Storage, true, false), (TexRead::Storage, false, true)] {
        prelude(read, w16, a16, true).hash(&mut h);
    }
    let i = &gpu.info;
    format!("{} | {:?} | {} {} | cvt-gpu {} | kernels {:016x}", i.name, i.backend, i.driver, i.driver_info, env!("CARGO_PKG_VERSION"), h.finish())
}

type Table = BTreeMap<String, BTreeMap<String, String>>;

fn read_table() -> Table {
    cache_file().and_then(|p| std::fs::read_to_string(p).ok()).and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

/// A cached choice (`what`: e.g. "matmul") for this adapter, if any.
pub fn lookup(gpu: &Gpu, what: &str) -> Option<String> {
    if disabled() {
        return None;
    }
    read_table().get(&key(gpu)).and_then(|m| m.get(what)).cloned()
}

/// Records choices in one write, so that processes tuning at the same time
/// cannot leave a mixed pair; a failure to write is not an error (the trial just
/// runs again).
pub fn store(gpu: &Gpu, choices: &[(&str, &str)]) {
    if disabled() || choices.is_empty() {
        return;
    }
    let Some(path) = cache_file() else { return };
    let mut table = read_table();
    let entry = table.entry(key(gpu)).or_default();
    for (what, value) in choices {
        entry.insert(what.to_string(), value.to_string());
    }
    if let (Some(dir), Ok(json)) = (path.parent(), serde_json::to_string_pretty(&table)) {
        if std::fs::create_dir_all(dir).is_ok() {
            crate::checkpoint::write_atomic(&path, json.as_bytes()).ok();
        }
    }
}
