//! Shared test helpers: one GPU per test process, deterministic data and a
//! closeness check against f64 references.
#![allow(dead_code)]

use cvt_gpu::gpu::{AdapterRequest, Gpu};
use cvt_gpu::profile::{KernelSet, Profile};
use cvt_gpu::util::Rng;
use std::sync::{Arc, OnceLock};

/// The adapter named by CVT_GPU_BACKEND / CVT_GPU_ADAPTER (default: the best one).
/// Tests fail, not skip, when there is none: a kernel test that cannot run has not passed.
pub fn gpu() -> Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(open_gpu).clone()
}

/// The same adapter with the GPU kernel set forced (tiled buffer GEMMs with
/// split-K, a workgroup per row in the row reductions), whatever the profile
/// would pick: so tests cover both sets on any machine.
pub fn gpu_buffer_variants() -> Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| forced(KernelSet::Gpu)).clone()
}

/// As `gpu_buffer_variants`, with the CPU-driver kernel set forced (packed
/// texture GEMMs, a row per invocation).
pub fn gpu_texture_variants() -> Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| forced(KernelSet::Cpu)).clone()
}

/// A device whose profile is the adapter's own (settings included) with the
/// kernel set, and the row reductions' lanes that go with it, replaced.
fn forced(set: KernelSet) -> Arc<Gpu> {
    forced_with(set, |_| {})
}

/// A device with kernel set `set` and the profile further edited by `edit`.
pub fn forced_with(set: KernelSet, edit: impl FnOnce(&mut Profile)) -> Arc<Gpu> {
    let own = gpu().profile();
    let g = open_gpu();
    let mut p = (*own).clone();
    p.kernels = set;
    p.row_lanes = Profile::for_set(&g, set, own.texture_read).row_lanes;
    edit(&mut p);
    assert!(g.set_profile(p));
    g
}

fn open_gpu() -> Arc<Gpu> {
    {
        let backend = match std::env::var("CVT_GPU_BACKEND").as_deref() {
            Ok("gl") => cvt_gpu::gpu::BackendChoice::Gl,
            Ok("vulkan") => cvt_gpu::gpu::BackendChoice::Vulkan,
            Ok("metal") => cvt_gpu::gpu::BackendChoice::Metal,
            Ok("dx12") => cvt_gpu::gpu::BackendChoice::Dx12,
            _ => cvt_gpu::gpu::BackendChoice::Auto,
        };
        let g = Gpu::new(&AdapterRequest { backend, adapter: std::env::var("CVT_GPU_ADAPTER").ok() }).expect("a GPU adapter");
        eprintln!("testing on {}", g.describe());
        g
    }
}

pub fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal()).collect()
}

/// |got - want| <= atol + rtol * |want| elementwise; reports the worst element.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(err.is_finite(), "{what}: element {i} is {g}, want {w}");
        let excess = err - (atol + rtol * w.abs());
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let i = worst.0;
    assert!(worst.1 <= 0.0, "{what}: element {i} = {}, want {} (|err| {:.3e})", got[i], want[i], (got[i] as f64 - want[i]).abs());
}

/// As `assert_close` for sums of `k` products, whose f32 rounding scales with
/// the terms, not the result: where terms cancel (a result far smaller than
/// `abs_sum`, the sum of the terms' magnitudes) the error may exceed a tolerance
/// relative to the result. Adds the usual probabilistic bound for a sum in f32,
/// 4·√k·u·abs_sum (u = 2^-24), to 1e-4 + 1e-4·|want|.
pub fn assert_close_sum(what: &str, got: &[f32], want: &[f64], abs_sum: &[f64], k: usize) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let u = f32::EPSILON as f64 / 2.0;
    for (i, ((&g, &w), &a)) in got.iter().zip(want).zip(abs_sum).enumerate() {
        let tol = 1e-4 + 1e-4 * w.abs() + 4.0 * (k as f64).sqrt() * u * a;
        let err = (g as f64 - w).abs();
        assert!(err <= tol, "{what}: element {i} = {g}, want {w} (|err| {err:.3e}, tolerance {tol:.3e})");
    }
}

pub fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + libm_erf(x / std::f64::consts::SQRT_2))
}

pub fn quick_gelu(x: f64) -> f64 {
    x / (1.0 + (-1.702 * x).exp())
}

/// erf in f64 (W. J. Cody's rational approximations would do; this series/continued
/// fraction pair is accurate to ~1e-15 over the real line).
pub fn libm_erf(x: f64) -> f64 {
    let ax = x.abs();
    let r = if ax < 2.5 {
        // Maclaurin series.
        let mut sum = ax;
        let mut term = ax;
        let x2 = ax * ax;
        let mut n = 0.0;
        loop {
            n += 1.0;
            term *= -x2 / n;
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // Continued fraction for erfc.
        let mut f = 0.0;
        for k in (1..60).rev() {
            f = (k as f64 / 2.0) / (ax + f);
        }
        1.0 - (-ax * ax).exp() / std::f64::consts::PI.sqrt() / (ax + f)
    };
    r.copysign(x)
}

pub fn layernorm_ref(x: &[f64], g: &[f32], b: &[f32]) -> Vec<f64> {
    let c = x.len() as f64;
    let mean = x.iter().sum::<f64>() / c;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / c;
    let r = 1.0 / (var + 1e-5).sqrt();
    x.iter().enumerate().map(|(i, v)| (v - mean) * r * g[i] as f64 + b[i] as f64).collect()
}

/// Depthwise 3x3 conv (pad 1, no bias) of x [batch, cls + h*w, c] at `stride`, in
/// f64: [batch, cls + oh*ow, c] with the cls rows left zero (callers fill them).
pub fn depthwise_ref(x: &[f32], conv: &[f32], (batch, h, w, c, cls): (usize, usize, usize, usize, usize), stride: usize) -> Vec<f64> {
    let (oh, ow) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
    let (tq, t) = (cls + h * w, cls + oh * ow);
    let mut y = vec![0f64; batch * t * c];
    for bi in 0..batch {
        for ch in 0..c {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut s = 0f64;
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let iy = (oy * stride + ky) as isize - 1;
                            let ix = (ox * stride + kx) as isize - 1;
                            if iy >= 0 && ix >= 0 && iy < h as isize && ix < w as isize {
                                s += x[(bi * tq + cls + iy as usize * w + ix as usize) * c + ch] as f64 * conv[ch * 9 + ky * 3 + kx] as f64;
                            }
                        }
                    }
                    y[(bi * t + cls + oy * ow + ox) * c + ch] = s;
                }
            }
        }
    }
    y
}
