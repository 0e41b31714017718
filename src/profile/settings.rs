//! Every `CVT_GPU_*` environment setting, parsed and validated in one place.
//!
//! `Settings::from_env` reads them all; an unknown `CVT_GPU_*` name or a value
//! outside a setting's range is a one-line error (with a did-you-mean hint for
//! names). The command line checks them at start (`check`), and so does
//! `Gpu::new`; the rest of the engine reads the parsed values (`get`), never the
//! environment. The kernel choices among them override the per-adapter profile
//! (`profile::resolve`); the others are tools (traces, shader directory, cache).

use super::KernelSet;
use crate::texread::TexRead;
use anyhow::{bail, Result};
use std::path::PathBuf;

/// Every `CVT_GPU_*` setting the engine reads, for the unknown-name check.
pub const NAMES: &[&str] = &[
    "CVT_GPU_BACKEND",
    "CVT_GPU_ADAPTER",
    "CVT_GPU_KERNELS",
    "CVT_GPU_NO_TUNE",
    "CVT_GPU_CACHE_DIR",
    "CVT_GPU_TEX_READ",
    "CVT_GPU_TEX_ROWS",
    "CVT_GPU_NARROW_ROWS",
    "CVT_GPU_A_SHARE",
    "CVT_GPU_EPILOGUE",
    "CVT_GPU_ATTN_WG",
    "CVT_GPU_ATTN_QPI",
    "CVT_GPU_ATTN_GRAD",
    "CVT_GPU_ROW_LANES",
    "CVT_GPU_F16_ACT",
    "CVT_GPU_COPY_REUSE",
    "CVT_GPU_FUSE_ACT",
    "CVT_GPU_CHECKS",
    "CVT_GPU_SHADER_DIR",
    "CVT_GPU_TRACE_MEMORY",
    "CVT_GPU_TRACE_TEXTURES",
    "CVT_GPU_TRACE_TUNE",
    "CVT_GPU_TRACE_COMPILE",
];

/// naga's runtime checks on the engine's shaders (`CVT_GPU_CHECKS`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Checks {
    /// Bounds checks, without loop bounding (every loop's bound comes from uniforms or constants).
    #[default]
    Default,
    All,
    None,
}

/// The parsed settings. `None`: not set (the profile decides).
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// `CVT_GPU_KERNELS=auto|gpu|cpu` (`--kernels`); `auto` is None.
    pub kernels: Option<KernelSet>,
    pub tex_read: Option<TexRead>,
    pub row_lanes: Option<usize>,
    pub tex_rows: Option<usize>,
    pub narrow_rows: Option<usize>,
    pub a_share: Option<bool>,
    pub fused_epilogue: Option<bool>,
    pub attn_wg: Option<usize>,
    pub attn_queries: Option<usize>,
    /// `CVT_GPU_ATTN_GRAD=saved|recompute`: true for saved probabilities.
    pub attn_saved: Option<bool>,
    pub f16_act: Option<bool>,
    pub copy_reuse: Option<bool>,
    pub fuse_act: Option<bool>,
    /// `CVT_GPU_NO_TUNE=1` (`--no-tune`): no trials and no cache.
    pub no_tune: bool,
    pub cache_dir: Option<PathBuf>,
    pub checks: Checks,
    pub shader_dir: Option<PathBuf>,
    pub trace_memory: bool,
    pub trace_textures: bool,
    pub trace_tune: bool,
    pub trace_compile: bool,
}

/// Command-line options that take the place of their settings (`set_options`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// `--kernels`: None where not given (the environment's setting stands);
    /// Some(None) for `auto`.
    pub kernels: Option<Option<KernelSet>>,
    /// `--no-tune`.
    pub no_tune: bool,
}

static OPTIONS: std::sync::OnceLock<Options> = std::sync::OnceLock::new();

/// Sets the command line's options once, before any device is opened: they
/// override the environment's `CVT_GPU_KERNELS` and `CVT_GPU_NO_TUNE`.
pub fn set_options(o: Options) {
    OPTIONS.set(o).ok();
}

/// The settings now, the command line's options applied; invalid values (which
/// `check` reports at start) read as unset.
pub fn get() -> Settings {
    let mut s = Settings::from_env().unwrap_or_default();
    if let Some(o) = OPTIONS.get() {
        s.kernels = o.kernels.unwrap_or(s.kernels);
        s.no_tune |= o.no_tune;
    }
    s
}

/// Rejects an unknown `CVT_GPU_*` name and an invalid value of any setting.
pub fn check() -> Result<()> {
    Settings::from_env().map(drop)
}

fn var(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

/// A setting that takes one of `allowed` (pairs of text and value).
fn one_of<T: Copy>(key: &str, allowed: &[(&str, T)]) -> Result<Option<T>> {
    let Some(v) = var(key) else { return Ok(None) };
    match allowed.iter().find(|(text, _)| *text == v) {
        Some((_, value)) => Ok(Some(*value)),
        None => bail!("{key}={v}: expected {}", allowed.iter().map(|(a, _)| if a.is_empty() { "empty".to_string() } else { format!("`{a}`") }).collect::<Vec<_>>().join(", ")),
    }
}

fn flag(key: &str) -> Result<Option<bool>> {
    one_of(key, &[("0", false), ("1", true)])
}

fn number(key: &str, allowed: &[usize]) -> Result<Option<usize>> {
    let pairs: Vec<(String, usize)> = allowed.iter().map(|v| (v.to_string(), *v)).collect();
    let refs: Vec<(&str, usize)> = pairs.iter().map(|(t, v)| (t.as_str(), *v)).collect();
    one_of(key, &refs)
}

impl Settings {
    pub fn from_env() -> Result<Settings> {
        for (key, _) in std::env::vars_os() {
            let Some(key) = key.to_str() else { continue };
            if key.starts_with("CVT_GPU_") && !NAMES.contains(&key) {
                let close = NAMES.iter().min_by_key(|k| edit_distance(k, key)).filter(|k| edit_distance(k, key) <= 3);
                let hint = close.map(|k| format!(" (did you mean {k}?)")).unwrap_or_default();
                bail!("{key}: unknown setting{hint}; the settings are {}", NAMES.join(", "));
            }
        }
        let on = |key: &str| var(key).is_some_and(|v| !v.is_empty() && v != "0");
        Ok(Settings {
            kernels: one_of("CVT_GPU_KERNELS", &[("auto", None), ("gpu", Some(KernelSet::Gpu)), ("cpu", Some(KernelSet::Cpu))])?.flatten(),
            tex_read: one_of("CVT_GPU_TEX_READ", &[("sampled", TexRead::Sampled), ("storage", TexRead::Storage)])?,
            row_lanes: number("CVT_GPU_ROW_LANES", &[1, 64])?,
            tex_rows: number("CVT_GPU_TEX_ROWS", &[8, 16])?,
            narrow_rows: number("CVT_GPU_NARROW_ROWS", &[8, 16])?,
            a_share: flag("CVT_GPU_A_SHARE")?,
            fused_epilogue: one_of("CVT_GPU_EPILOGUE", &[("fused", true), ("split", false)])?,
            attn_wg: number("CVT_GPU_ATTN_WG", &[8, 16, 32, 64])?,
            attn_queries: number("CVT_GPU_ATTN_QPI", &[1, 2, 4])?,
            attn_saved: one_of("CVT_GPU_ATTN_GRAD", &[("", None), ("saved", Some(true)), ("recompute", Some(false))])?.flatten(),
            f16_act: flag("CVT_GPU_F16_ACT")?,
            copy_reuse: flag("CVT_GPU_COPY_REUSE")?,
            fuse_act: flag("CVT_GPU_FUSE_ACT")?,
            no_tune: one_of("CVT_GPU_NO_TUNE", &[("", false), ("0", false), ("1", true)])?.unwrap_or(false),
            cache_dir: var("CVT_GPU_CACHE_DIR").map(PathBuf::from),
            checks: one_of("CVT_GPU_CHECKS", &[("default", Checks::Default), ("all", Checks::All), ("none", Checks::None)])?.unwrap_or_default(),
            shader_dir: var("CVT_GPU_SHADER_DIR").map(PathBuf::from),
            trace_memory: on("CVT_GPU_TRACE_MEMORY"),
            trace_textures: on("CVT_GPU_TRACE_TEXTURES"),
            trace_tune: on("CVT_GPU_TRACE_TUNE"),
            trace_compile: on("CVT_GPU_TRACE_COMPILE"),
        })
    }
}

/// Levenshtein distance, for "did you mean" hints.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for j in 0..b.len() {
            let cur = row[j + 1];
            row[j + 1] = (prev + (ca != b[j]) as usize).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}
