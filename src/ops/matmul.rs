//! `shaders/matmul.wgsl`: linear layers and dense convolutions (implicit GEMM)
//! with fused bias, activation and residual add.

use crate::graph::{Graph, Res, TensorId};
use crate::gpu::Gpu;
use anyhow::Result;
use std::sync::Arc;

/// Rows and vec4 columns per invocation (`RM`, `RN4` in the shader).
const RM: usize = 8;
const RN4: usize = 2;
const WG_X: usize = 8;
const WG_Y: usize = 8;

/// Activation fused into the matmul epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Act {
    None,
    /// Exact erf GELU (Hugging Face's CvT).
    Gelu,
    /// x * sigmoid(1.702 x) (the official CvT code).
    QuickGelu,
}

impl Act {
    fn code(self) -> f64 {
        match self {
            Act::None => 0.0,
            Act::Gelu => 1.0,
            Act::QuickGelu => 2.0,
        }
    }
}

/// A GEMM right-hand side on the GPU: B [K, NP] (NP = N rounded up to 4) and bias [NP].
pub struct Linear {
    pub w: Arc<wgpu::Buffer>,
    pub b: Arc<wgpu::Buffer>,
    pub k: usize,
    pub n: usize,
}

fn pad4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

impl Linear {
    /// From a PyTorch Linear: weight [N, K] (y = x·Wᵀ + b), bias [N] or none.
    pub fn from_torch(gpu: &Gpu, name: &str, w: &[f32], b: Option<&[f32]>, n: usize, k: usize) -> Result<Linear> {
        assert_eq!(w.len(), n * k, "{name}: weight size");
        let np = pad4(n);
        let mut bt = vec![0f32; k * np];
        for o in 0..n {
            for i in 0..k {
                bt[i * np + o] = w[o * k + i];
            }
        }
        Self::from_kn(gpu, name, &bt, b, n, k)
    }

    /// From a PyTorch Conv2d weight [Cout, Cin, kh, kw]: K ordered (ky, kx, ci) as
    /// the shader's im2col view reads it.
    pub fn from_conv(gpu: &Gpu, name: &str, w: &[f32], b: Option<&[f32]>, cout: usize, cin: usize, kh: usize, kw: usize) -> Result<Linear> {
        assert_eq!(w.len(), cout * cin * kh * kw, "{name}: weight size");
        let k = kh * kw * cin;
        let np = pad4(cout);
        let mut bt = vec![0f32; k * np];
        for o in 0..cout {
            for ci in 0..cin {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let kk = (ky * kw + kx) * cin + ci;
                        bt[kk * np + o] = w[((o * cin + ci) * kh + ky) * kw + kx];
                    }
                }
            }
        }
        Self::from_kn(gpu, name, &bt, b, cout, k)
    }

    fn from_kn(gpu: &Gpu, name: &str, bt: &[f32], b: Option<&[f32]>, n: usize, k: usize) -> Result<Linear> {
        let mut bias = vec![0f32; pad4(n)];
        if let Some(b) = b {
            bias[..n].copy_from_slice(b);
        }
        Ok(Linear {
            w: Arc::new(gpu.upload(&format!("{name}.weight"), bt)?),
            b: Arc::new(gpu.upload(&format!("{name}.bias"), &bias)?),
            k,
            n,
        })
    }
}

/// Geometry of a dense convolution read from an NHWC token map.
#[derive(Clone, Copy, Debug)]
pub struct ConvGeom {
    pub batch: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub cin: usize,
    /// Tokens per image in the input map and the index of the first spatial token
    /// (1 when a cls token precedes the grid).
    pub in_tokens: usize,
    pub in_tok_off: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvGeom {
    pub fn out_hw(&self) -> (usize, usize) {
        let o = |x: usize| (x + 2 * self.pad - self.k) / self.stride + 1;
        (o(self.in_h), o(self.in_w))
    }
}

/// Where a matmul writes.
pub enum Out {
    /// A new tensor.
    New,
    /// Overwrite an existing tensor (a pinned output).
    Into(TensorId),
    /// Add into an existing tensor of the same shape (residual connection).
    Accumulate(TensorId),
}

fn dispatch(g: &mut Graph, label: &str, a: TensorId, m: usize, l: &Linear, act: Act, out: Out, conv: Option<ConvGeom>) -> Result<TensorId> {
    let np4 = pad4(l.n) / 4;
    let (accumulate, y) = match out {
        Out::New => (false, g.tensor(label.to_string(), m * l.n)),
        Out::Into(t) => (false, t),
        Out::Accumulate(t) => (true, t),
    };
    let mut params = vec![m as u32, l.n as u32, l.k as u32, np4 as u32];
    let c = conv.unwrap_or(ConvGeom { batch: 0, in_h: 0, in_w: 0, cin: 1, in_tokens: 0, in_tok_off: 0, k: 1, stride: 1, pad: 0 });
    let (oh, ow) = if conv.is_some() { c.out_hw() } else { (0, 0) };
    params.extend([c.in_h, c.in_w, c.cin, c.in_tokens, c.in_tok_off, oh, ow, c.k, c.k, c.stride, c.pad, 0].map(|v| v as u32));
    let pipeline = g.gpu.pipeline(
        "matmul",
        "main",
        &[
            ("A_MODE", if conv.is_some() { 1.0 } else { 0.0 }),
            ("ACT", act.code()),
            ("ACCUMULATE", if accumulate { 1.0 } else { 0.0 }),
            ("WG_X", WG_X as f64),
            ("WG_Y", WG_Y as f64),
        ],
    )?;
    let groups = [np4.div_ceil(RN4).div_ceil(WG_X) as u32, m.div_ceil(RM).div_ceil(WG_Y) as u32, 1];
    g.dispatch(
        label,
        pipeline,
        vec![Res::Act(a), Res::Buf(l.w.clone()), Res::Buf(l.b.clone()), Res::Act(y), Res::Uniform(params)],
        groups,
        2.0 * (m * l.n * l.k) as f64,
    );
    Ok(y)
}

/// y[m, n] = act(x[m, k] · W + b), or y += that with `Out::Accumulate(y)`.
pub fn linear(g: &mut Graph, label: &str, x: TensorId, m: usize, l: &Linear, act: Act, out: Out) -> Result<TensorId> {
    dispatch(g, label, x, m, l, act, out, None)
}

/// Dense convolution of an NHWC token map; output [batch, oh*ow, cout] tokens.
pub fn conv2d(g: &mut Graph, label: &str, x: TensorId, geom: ConvGeom, l: &Linear) -> Result<TensorId> {
    assert_eq!(l.k, geom.k * geom.k * geom.cin, "{label}: conv weight K");
    let (oh, ow) = geom.out_hw();
    dispatch(g, label, x, geom.batch * oh * ow, l, Act::None, Out::New, Some(geom))
}
