//! Every forward kernel against a plain f64 CPU reference, on awkward shapes:
//! odd sizes, 1x1, sizes not divisible by the tiles, Tq != Tkv, batch > 1.

mod common;
use common::*;

use cvt_gpu::gpu::MatmulKind;
use cvt_gpu::graph::Graph;
use cvt_gpu::ops::attention::{attention_train, attention_with, AttnGrad, AttnShape};
use cvt_gpu::ops::dwconv::{conv_proj, fold_bn, kv_hw, BatchNorm, ConvProj};
use cvt_gpu::ops::gemm::TEXTURE_CHUNK_BYTES;
use cvt_gpu::ops::matmul::{conv2d, linear, linear_residual, Out, WeightFormat};
use cvt_gpu::ops::rownorm::{add_layernorm, layernorm, softmax, LayerNorm, RowMap};
use cvt_gpu::ops::tokens::{cls_fill, mean_tokens};
use cvt_gpu::ops::{Act, ConvGeom, Linear};
use std::sync::Arc;

fn matmul_ref(a: &[f32], w: &[f32], b: &[f32], m: usize, n: usize, k: usize, act: Act, acc: Option<&[f32]>) -> Vec<f64> {
    let mut y = vec![0f64; m * n];
    for i in 0..m {
        for o in 0..n {
            let mut s = b[o] as f64;
            for kk in 0..k {
                s += a[i * k + kk] as f64 * w[o * k + kk] as f64;
            }
            let v = match act {
                Act::None => s,
                Act::Gelu => gelu(s),
                Act::QuickGelu => quick_gelu(s),
            };
            y[i * n + o] = v + acc.map_or(0.0, |r| r[i * n + o] as f64);
        }
    }
    y
}

fn check_matmul(kind: MatmulKind, m: usize, n: usize, k: usize, act: Act, accumulate: bool) {
    // Buffer weights: on the adapter's own choice (on CPU drivers the packed
    // texture GEMM) and in the GPU kernel set (`main_tiled`, split-K).
    let gpus = if kind == MatmulKind::Buffer { vec![gpu(), gpu_buffer_variants()] } else { vec![gpu()] };
    for gpu in gpus {
        check_matmul_on(gpu, kind, m, n, k, act, accumulate);
    }
}

fn check_matmul_on(gpu: std::sync::Arc<cvt_gpu::gpu::Gpu>, kind: MatmulKind, m: usize, n: usize, k: usize, act: Act, accumulate: bool) {
    let a = randn(m * k, 1);
    let w = randn(n * k, 2);
    let b = randn(n, 3);
    let r = randn(m * n, 4);
    let l = Linear::with_kind(&gpu, "t", &w, Some(&b), n, k, kind).unwrap();
    let want = matmul_ref(&a, &w, &b, m, n, k, act, accumulate.then_some(&r[..]));
    // The texture variant with 8 and 16 rows per invocation (Graph::tex_rows), its
    // epilogue fused or split into separate passes (Graph::fused_epilogue).
    // The GPU set at its workgroup target and at targets of 1 and 2, which pick
    // the 128-row tile (8 rows per invocation) wherever there are 2 row tiles.
    let variants: &[(usize, bool, usize)] = if kind == MatmulKind::Texture {
        &[(8, false, 0), (8, true, 0), (16, true, 0)]
    } else if gpu.profile().kernels == cvt_gpu::profile::KernelSet::Gpu {
        &[(8, true, 0), (8, true, 1), (8, true, 2)]
    } else {
        &[(8, true, 0)]
    };
    for &(tex_rows, fused, min_groups) in variants {
        let mut g = Graph::new(gpu.clone());
        if min_groups > 0 {
            g.profile.gemm.min_workgroups = min_groups;
        }
        g.profile.tex_rows = tex_rows;
        // Narrow outputs too (not the 8-row default where A is shared).
        g.profile.narrow_rows = Some(tex_rows);
        g.profile.fused_epilogue = fused;
        let x = g.pinned("x", m * k);
        let y = g.pinned("y", m * n);
        let out = if accumulate { Out::Accumulate(y) } else { Out::Into(y) };
        linear(&mut g, "mm", x, m, &l, act, out).unwrap();
        let plan = g.compile().unwrap();
        plan.write(x, &a).unwrap();
        plan.write(y, &r).unwrap();
        plan.run().unwrap();
        let got = plan.read(y).unwrap();
        // f32 accumulation over K terms of unit-variance products: error ~ 1e-7 * sqrt(K) * |sum|.
        assert_close(&format!("{kind:?} matmul {m}x{n}x{k} {act:?} acc={accumulate} rows={tex_rows} fused={fused} min_groups={min_groups}"), &got, &want, 1e-4, 1e-4);
    }
}

#[test]
fn matmul_buffer_variant_all_epilogues() {
    // The last three span several 64x64 tiles of the GPU set's GEMM, ragged in
    // every dimension, and split K (up to 15 splits of 64 or 80).
    for &(m, n, k) in &[(1, 1, 1), (5, 3, 7), (13, 9, 17), (33, 70, 65), (64, 64, 64), (17, 1000, 12), (9, 6, 4), (130, 70, 300), (67, 129, 1000), (300, 10, 2001)] {
        for act in [Act::None, Act::Gelu, Act::QuickGelu] {
            for accumulate in [false, true] {
                check_matmul(MatmulKind::Buffer, m, n, k, act, accumulate);
            }
        }
    }
}

#[test]
fn matmul_texture_variant_all_epilogues() {
    // The texture variant takes K % 64 == 0 (row copies of 256-byte multiples).
    // 17x1000 and 21x376 fetch A once per subgroup (A_SHARE): 16 and, where
    // subgroups are runs of 8, 8 lanes along 63 and 24 column blocks.
    for &(m, n, k) in &[(1, 1, 64), (5, 3, 64), (33, 70, 128), (17, 1000, 64), (100, 12, 192), (16, 16, 64), (21, 376, 128)] {
        for act in [Act::None, Act::Gelu, Act::QuickGelu] {
            for accumulate in [false, true] {
                check_matmul(MatmulKind::Texture, m, n, k, act, accumulate);
            }
        }
    }
}

/// f16 weight storage (`WeightFormat::F16`): each variant, with every epilogue,
/// equals the f64 product with the weights rounded to f16.
#[test]
fn matmul_f16_weights_both_variants() {
    let gpu = gpu();
    for kind in [MatmulKind::Buffer, MatmulKind::Texture] {
        // (8, 12): m·n a multiple of 4, where the texture variant splits its epilogue.
        for &(m, n, k) in &[(5, 3, 64), (33, 70, 128), (9, 6, 64), (8, 12, 64)] {
            for (act, accumulate) in [(Act::None, false), (Act::QuickGelu, false), (Act::None, true)] {
                let (a, w, b, r) = (randn(m * k, 1), randn(n * k, 2), randn(n, 3), randn(m * n, 4));
                let l = Linear::with_kind_in(&gpu, "t", &w, Some(&b), n, k, kind, WeightFormat::F16).unwrap();
                assert!(l.f16);
                let wh: Vec<f32> = w.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
                let want = matmul_ref(&a, &wh, &b, m, n, k, act, accumulate.then_some(&r[..]));
                let mut g = Graph::new(gpu.clone());
                let (x, y) = (g.pinned("x", m * k), g.pinned("y", m * n));
                linear(&mut g, "mm", x, m, &l, act, if accumulate { Out::Accumulate(y) } else { Out::Into(y) }).unwrap();
                let plan = g.compile().unwrap();
                plan.write(x, &a).unwrap();
                plan.write(y, &r).unwrap();
                plan.run().unwrap();
                assert_close(&format!("{kind:?} f16 matmul {m}x{n}x{k} {act:?} acc={accumulate}"), &plan.read(y).unwrap(), &want, 1e-4, 1e-4);
            }
        }
    }
}

/// An f16 plan (`WeightFormat::Half`, `Graph::half`: f16 weights, activations
/// and textures, f32 arithmetic), on adapters with shader-f16: each variant, with
/// every epilogue, equals the f64 product of the f16-rounded operands, rounded to
/// f16 once at the store. Tolerance: the output's f16 rounding (2^-11 relative)
/// and the bias's (f32 in the buffer variant, f16 in the texture one), doubled.
#[test]
fn matmul_f16_plan_both_variants() {
    let gpu = gpu();
    if !gpu.features.contains(wgpu::Features::SHADER_F16) {
        eprintln!("SKIPPED: {} has no shader-f16", gpu.describe());
        return;
    }
    let h = |v: &[f32]| v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect::<Vec<f32>>();
    for kind in [MatmulKind::Buffer, MatmulKind::Texture] {
        // (5, 3, 64): odd m and n; (9, 6, 192): K = 192, A rows of 384 bytes (read
        // through a linear texture, which takes any row width).
        for &(m, n, k) in &[(5, 3, 64), (33, 70, 128), (9, 6, 192), (8, 12, 64)] {
            for (act, accumulate) in [(Act::None, false), (Act::QuickGelu, false), (Act::None, true)] {
                let (a, w, b, r) = (h(&randn(m * k, 1)), randn(n * k, 2), h(&randn(n, 3)), h(&randn(m * n, 4)));
                let l = Linear::with_kind_in(&gpu, "t", &w, Some(&b), n, k, kind, WeightFormat::Half).unwrap();
                let want = matmul_ref(&a, &h(&w), &b, m, n, k, act, accumulate.then_some(&r[..]));
                let mut g = Graph::new(gpu.clone());
                g.half = true;
                let (x, y) = (g.pinned("x", m * k), g.pinned("y", m * n));
                linear(&mut g, "mm", x, m, &l, act, if accumulate { Out::Accumulate(y) } else { Out::Into(y) }).unwrap();
                let plan = g.compile().unwrap();
                assert!(plan.half);
                plan.write(x, &a).unwrap();
                plan.write(y, &r).unwrap();
                plan.run().unwrap();
                assert_close(&format!("{kind:?} f16 plan matmul {m}x{n}x{k} {act:?} acc={accumulate}"), &plan.read(y).unwrap(), &want, 2e-3, 2e-3);
            }
        }
    }
}

#[test]
fn matmul_texture_variant_splits_rows_over_the_texture_limit() {
    let rows = gpu().limits.max_texture_dimension_2d as usize + 5;
    check_matmul(MatmulKind::Texture, rows, 5, 64, Act::None, true);
    // A read in chunks of TEXTURE_CHUNK_BYTES (1024 rows of K = 512 at 2 MiB), the
    // last one partial: each chunk's texture starts at its first row.
    let rows = 2 * (TEXTURE_CHUNK_BYTES / 2048) + 37;
    check_matmul(MatmulKind::Texture, rows, 7, 512, Act::QuickGelu, false);
    // The split epilogue's activation and residual passes over an output larger
    // than one texture chunk (2100 x 256 floats: two chunks of vec4s).
    check_matmul(MatmulKind::Texture, 2100, 256, 64, Act::QuickGelu, true);
}

#[test]
fn matmul_texture_variant_refuses_unaligned_k() {
    let gpu = gpu();
    assert!(Linear::with_kind(&gpu, "t", &randn(3 * 65, 1), None, 3, 65, MatmulKind::Texture).is_err());
}

/// Direct convolution over an NHWC token map (with optional leading cls tokens).
fn conv_ref(x: &[f32], w: &[f32], b: &[f32], geo: &ConvGeom, cout: usize) -> Vec<f64> {
    let (oh, ow) = geo.out_hw();
    let mut y = vec![0f64; geo.batch * oh * ow * cout];
    for bi in 0..geo.batch {
        for oy in 0..oh {
            for ox in 0..ow {
                for o in 0..cout {
                    let mut s = b[o] as f64;
                    for ci in 0..geo.cin {
                        for ky in 0..geo.k {
                            for kx in 0..geo.k {
                                let iy = (oy * geo.stride + ky) as isize - geo.pad as isize;
                                let ix = (ox * geo.stride + kx) as isize - geo.pad as isize;
                                if iy < 0 || ix < 0 || iy >= geo.in_h as isize || ix >= geo.in_w as isize {
                                    continue;
                                }
                                let t = bi * geo.in_tokens + geo.in_tok_off + iy as usize * geo.in_w + ix as usize;
                                s += x[t * geo.cin + ci] as f64 * w[((o * geo.cin + ci) * geo.k + ky) * geo.k + kx] as f64;
                            }
                        }
                    }
                    y[((bi * oh + oy) * ow + ox) * cout + o] = s;
                }
            }
        }
    }
    y
}

#[test]
fn conv_implicit_gemm() {
    let gpu = gpu();
    // (batch, h, w, cin, cout, k, stride, pad, cls)
    for &(batch, h, w, cin, cout, k, s, p, cls) in &[
        (2, 9, 7, 3, 5, 7, 4, 2, 0),
        (1, 5, 5, 6, 8, 3, 2, 1, 1),
        (3, 1, 1, 4, 3, 3, 2, 1, 0),
        (1, 16, 13, 3, 16, 7, 4, 2, 0),
        (2, 6, 6, 5, 7, 3, 1, 1, 1),
        (2, 8, 8, 3, 4, 7, 4, 2, 0),
        (3, 48, 48, 96, 8, 3, 2, 1, 1),
    ] {
        // Texture variant: im2col4 reads one texel per value where cin % 4 != 0 but
        // whole images start on texels ((1, 16, 13, 3), (1, 5, 5, 6) with cls,
        // (2, 8, 8, 3)), the buffer im2col otherwise. The last case: 0.9 MB images,
        // read by im2col two at a time (TEXTURE_CHUNK_BYTES).
        let tokens = cls + h * w;
        let geo = ConvGeom { batch, in_h: h, in_w: w, cin, in_tokens: tokens, in_tok_off: cls, k, stride: s, pad: p };
        let x = randn(batch * tokens * cin, 5);
        let wt = randn(cout * cin * k * k, 6);
        let b = randn(cout, 7);
        let want = conv_ref(&x, &wt, &b, &geo, cout);
        // Buffer variant: implicit GEMM; texture variant: im2col (K padded to 64) + texture GEMM.
        // And the GPU kernel set's implicit GEMM (`main_tiled`, A_MODE 1; the
        // last case splits K = 864 ten ways).
        // With a workgroup target of 1 too: the 128-row tile.
        for (gpu, kind, min_groups) in
            [(gpu.clone(), MatmulKind::Buffer, 0), (gpu.clone(), MatmulKind::Texture, 0), (gpu_buffer_variants(), MatmulKind::Buffer, 0), (gpu_buffer_variants(), MatmulKind::Buffer, 1)]
        {
            let l = Linear::conv_with_kind(&gpu, "c", &wt, Some(&b), cout, cin, k, k, kind).unwrap();
            let mut g = Graph::new(gpu.clone());
            if min_groups > 0 {
                g.profile.gemm.min_workgroups = min_groups;
            }
            let xin = g.pinned("x", x.len());
            let y = conv2d(&mut g, "conv", xin, geo, &l).unwrap();
            let plan = g.compile().unwrap();
            plan.write(xin, &x).unwrap();
            plan.run().unwrap();
            assert_close(&format!("{kind:?} conv {geo:?}"), &plan.read(y).unwrap(), &want, 1e-4, 1e-4);
        }
    }
}

#[test]
fn conv_projection_q_k_v() {
    let gpu = gpu();
    // Widths are multiples of 4 (the kernels are vec4 over channels; valid CvT widths are).
    // Both variants; (3, 78, 78, 4, 1) has 6085 tokens per image, so the texture
    // variant splits the batch when the texture height limit is 16384 or less.
    // With `half` (adapters with shader-f16), in an f16 plan: C = 128 has rows a
    // copy takes (256 bytes), the others are packed. Tolerance there: the f16
    // rounding of the output (values up to ~10) and of the texture variant's
    // folded weights.
    let cases = [(2, 5, 7, 8, 0), (1, 4, 4, 4, 1), (2, 1, 1, 12, 1), (1, 7, 3, 20, 0), (2, 3, 5, 64, 1), (3, 78, 78, 4, 1), (1, 5, 6, 128, 1)];
    let halves: &[bool] = if gpu.features.contains(wgpu::Features::SHADER_F16) { &[false, true] } else { &[false] };
    let mut all = vec![];
    for &hf in halves {
        for k in [MatmulKind::Buffer, MatmulKind::Texture] {
            all.extend(cases.iter().map(|c| (hf, k, c)));
        }
    }
    for (half, kind, &(batch, h, w, c, cls)) in all {
        let tq = cls + h * w;
        let (hk, wk) = kv_hw(h, w);
        let tk = cls + hk * wk;
        let x: Vec<f32> = randn(batch * tq * c, 8).iter().map(|&v| if half { half::f16::from_f32(v).to_f32() } else { v }).collect();
        let convs: Vec<Vec<f32>> = (0..3).map(|i| randn(c * 9, 10 + i)).collect();
        let bnp: Vec<Vec<Vec<f32>>> =
            (0..3).map(|i| vec![randn(c, 20 + i).iter().map(|v| 1.0 + 0.2 * v).collect(), randn(c, 30 + i), randn(c, 40 + i), randn(c, 50 + i).iter().map(|v| 0.5 + v.abs()).collect()]).collect();
        let bn = |i: usize| BatchNorm { weight: &bnp[i][0], bias: &bnp[i][1], mean: &bnp[i][2], var: &bnp[i][3] };
        let proj = ConvProj::with_kind(&gpu, "p", [&convs[0], &convs[1], &convs[2]], [bn(0), bn(1), bn(2)], c, kind, half).unwrap();
        let mut g = Graph::new(gpu.clone());
        g.half = half;
        let xin = g.pinned("x", x.len());
        let (q, k, v) = conv_proj(&mut g, "proj", xin, batch, h, w, cls, &proj).unwrap();
        let plan = g.compile().unwrap();
        plan.write(xin, &x).unwrap();
        plan.run().unwrap();
        for (i, (t, stride, oh, ow, tt)) in [(q, 1, h, w, tq), (k, 2, hk, wk, tk), (v, 2, hk, wk, tk)].into_iter().enumerate() {
            // Reference: conv, then BatchNorm with running statistics (not folded).
            let pre = depthwise_ref(&x, &convs[i], (batch, h, w, c, cls), stride);
            let mut want = vec![0f64; batch * tt * c];
            for bi in 0..batch {
                for ch in 0..c {
                    if cls == 1 {
                        want[(bi * tt) * c + ch] = x[(bi * tq) * c + ch] as f64;
                    }
                    let (gm, bt, mu, var) = (bnp[i][0][ch] as f64, bnp[i][1][ch] as f64, bnp[i][2][ch] as f64, bnp[i][3][ch] as f64);
                    for pix in 0..oh * ow {
                        let r = (bi * tt + cls + pix) * c + ch;
                        want[r] = (pre[r] - mu) / (var + 1e-5).sqrt() * gm + bt;
                    }
                }
            }
            let tol = if half { 8e-3 } else { 1e-4 };
            assert_close(&format!("conv_proj {kind:?} half={half} {} b{batch} {h}x{w} c{c} cls{cls}", ["q", "k", "v"][i]), &plan.read(t).unwrap(), &want, tol, tol);
        }
    }
}

#[test]
fn fold_bn_matches_definition() {
    let c = 3;
    let conv = randn(9 * c, 1);
    let (w, b, m, v) = (vec![1.5f32, 0.5, 2.0], vec![0.1f32, -0.2, 0.3], vec![0.3f32, -1.0, 2.0], vec![0.25f32, 4.0, 1.0]);
    let (fw, fb) = fold_bn(&conv, &BatchNorm { weight: &w, bias: &b, mean: &m, var: &v }, c);
    for ch in 0..c {
        let s = w[ch] as f64 / (v[ch] as f64 + 1e-5).sqrt();
        assert!((fb[ch] as f64 - (b[ch] as f64 - m[ch] as f64 * s)).abs() < 1e-6);
        for t in 0..9 {
            assert!((fw[t * c + ch] as f64 - conv[ch * 9 + t] as f64 * s).abs() < 1e-6);
        }
    }
}

/// The output and the probabilities P [batch, heads, tq, tkv].
fn attention_ref(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape) -> (Vec<f64>, Vec<f64>) {
    let d = s.c / s.heads;
    let mut o = vec![0f64; s.batch * s.tq * s.c];
    let mut probs = vec![0f64; s.batch * s.heads * s.tq * s.tkv];
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.tq {
                let scores: Vec<f64> =
                    (0..s.tkv).map(|j| (0..d).map(|e| q[(b * s.tq + i) * s.c + h * d + e] as f64 * k[(b * s.tkv + j) * s.c + h * d + e] as f64).sum::<f64>() * s.scale as f64).collect();
                let mx = scores.iter().cloned().fold(f64::MIN, f64::max);
                let ex: Vec<f64> = scores.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = ex.iter().sum();
                for j in 0..s.tkv {
                    probs[((b * s.heads + h) * s.tq + i) * s.tkv + j] = ex[j] / z;
                }
                for e in 0..d {
                    o[(b * s.tq + i) * s.c + h * d + e] = (0..s.tkv).map(|j| ex[j] / z * v[(b * s.tkv + j) * s.c + h * d + e] as f64).sum();
                }
            }
        }
    }
    (o, probs)
}

fn check_attention(kind: MatmulKind, batch: usize, tq: usize, tkv: usize, c: usize, heads: usize) {
    check_attention_in(kind, (batch, tq, tkv, c, heads), false);
}

/// `half`: in an f16 plan (`Graph::half`), inputs rounded to f16; the output's
/// f16 rounding (2^-11 relative, values up to ~3) bounds the error. The training
/// forward (f32 probabilities) is not part of f16 plans.
fn check_attention_in(kind: MatmulKind, (batch, tq, tkv, c, heads): (usize, usize, usize, usize, usize), half: bool) {
    let gpu = gpu();
    let shape = AttnShape { batch, tq, tkv, c, heads, scale: (c as f32).powf(-0.5) * 3.0 };
    let r = |v: Vec<f32>| if half { v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect() } else { v };
    let (q, k, v) = (r(randn(batch * tq * c, 1)), r(randn(batch * tkv * c, 2)), r(randn(batch * tkv * c, 3)));
    let (want_o, want_p) = attention_ref(&q, &k, &v, &shape);
    // The texture forward with 1, 2 and 4 queries per invocation (Graph::attn_queries),
    // in workgroups of 8 (CPU drivers) and 64 (GPUs) invocations (Graph::attn_wg).
    let variants: &[(usize, usize)] = if kind == MatmulKind::Texture { &[(1, 8), (2, 8), (4, 8), (4, 64)] } else { &[(2, 64)] };
    for &(qpi, wg) in variants {
        let mut g = Graph::new(gpu.clone());
        g.profile.attn_queries = qpi;
        g.profile.attn_wg = wg;
        g.half = half;
        let (tq_, tk_, tv_) = (g.pinned("q", q.len()), g.pinned("k", k.len()), g.pinned("v", v.len()));
        let o = attention_with(&mut g, "attn", tq_, tk_, tv_, shape, kind).unwrap();
        g.pin(o);
        if half {
            let plan = g.compile().unwrap();
            plan.write(tq_, &q).unwrap();
            plan.write(tk_, &k).unwrap();
            plan.write(tv_, &v).unwrap();
            plan.run().unwrap();
            assert_close(&format!("{kind:?} f16 plan attention {shape:?} qpi {qpi} wg {wg}"), &plan.read(o).unwrap(), &want_o, 2e-3, 2e-3);
            continue;
        }
        // The training forward that also writes the probabilities (SAVE_P).
        let (o_saving, saved) = attention_train(&mut g, "attn_p", (tq_, tk_, tv_), shape, AttnGrad::Saved, kind).unwrap();
        let probs = saved.probs.unwrap();
        g.pin(o_saving);
        g.pin(probs);
        let plan = g.compile().unwrap();
        plan.write(tq_, &q).unwrap();
        plan.write(tk_, &k).unwrap();
        plan.write(tv_, &v).unwrap();
        plan.run().unwrap();
        assert_close(&format!("{kind:?} attention {shape:?} qpi {qpi} wg {wg}"), &plan.read(o).unwrap(), &want_o, 1e-5, 1e-4);
        assert_close(&format!("{kind:?} saving attention {shape:?} qpi {qpi} wg {wg}"), &plan.read(o_saving).unwrap(), &want_o, 1e-5, 1e-4);
        assert_close(&format!("{kind:?} saved probabilities {shape:?} qpi {qpi} wg {wg}"), &plan.read(probs).unwrap(), &want_p, 1e-6, 1e-4);
    }
}

/// Attention in f16 plans: C = 48 (rows of 96 bytes: the texture variant packs
/// q, k, v) and C = 128 (256-byte rows: copied), both variants.
#[test]
fn attention_f16_plan() {
    if !gpu().features.contains(wgpu::Features::SHADER_F16) {
        eprintln!("SKIPPED: no shader-f16");
        return;
    }
    for kind in [MatmulKind::Buffer, MatmulKind::Texture] {
        check_attention_in(kind, (2, 7, 5, 48, 3), true);
        check_attention_in(kind, (1, 9, 4, 128, 2), true);
    }
}

#[test]
fn attention_rectangular_multihead() {
    // (batch, tq, tkv, c, heads): Tq != Tkv, several key tiles, partial tiles, D = 4..64;
    // 33 to 64 keys take one whole tile of 64 (64 exactly, and 65 three of 32).
    for &(batch, tq, tkv, c, heads) in &[(2, 7, 3, 8, 2), (1, 37, 19, 64, 1), (2, 65, 17, 48, 3), (1, 1, 1, 4, 1), (3, 50, 33, 16, 2), (1, 70, 64, 128, 2), (1, 9, 65, 64, 1)] {
        check_attention(MatmulKind::Buffer, batch, tq, tkv, c, heads);
    }
    // The texture variant (C % 64 == 0); Tq == Tkv checks that q, k, v get distinct textures.
    // Tq 37, 38, 39, 40 end a 4-query invocation with 1, 2, 3 and 4 real queries.
    for &(batch, tq, tkv, c, heads) in &[(2, 37, 19, 64, 1), (2, 38, 7, 64, 1), (1, 39, 5, 64, 2), (1, 40, 6, 64, 1), (3, 17, 17, 128, 2), (1, 1, 1, 64, 1), (2, 65, 50, 192, 3)] {
        check_attention(MatmulKind::Texture, batch, tq, tkv, c, heads);
    }
}

#[test]
fn attention_texture_variant_splits_the_batch_over_the_texture_limit() {
    // Three images whose rows together pass the texture height limit.
    let t = gpu().limits.max_texture_dimension_2d as usize / 2 + 1;
    check_attention(MatmulKind::Texture, 3, t, 5, 64, 1);
}

/// The GPU kernel set's row kernels (a workgroup per row) with and without
/// subgroup reductions, and the adapter's own set.
/// (name, device, subgroup reductions, row in registers): the default set, and the
/// GPU set's workgroup-per-row kernels with each reduction and each way of holding
/// the row.
fn row_variants() -> Vec<(String, std::sync::Arc<cvt_gpu::gpu::Gpu>, bool, bool)> {
    let b = gpu_buffer_variants;
    vec![
        ("own".into(), gpu(), true, true),
        ("gpu set, subgroups, registers".into(), b(), true, true),
        ("gpu set, tree, registers".into(), b(), false, true),
        ("gpu set, subgroups, streamed".into(), b(), true, false),
    ]
}

#[test]
fn layernorm_rows_every_reduction() {
    for (what, gpu, sg, regs) in row_variants() {
        // 1100: wider than a lane's registers hold (16 × 64), streamed either way.
        for &(rows, c) in &[(5, 7), (3, 130), (1, 1), (8, 384), (2, 1000), (2, 1100)] {
            let x: Vec<f32> = randn(rows * c, 1).iter().map(|v| v * 3.0 + 5.0).collect();
            let (gm, bt) = (randn(c, 2), randn(c, 3));
            let ln = LayerNorm::new(&gpu, "ln", &gm, &bt).unwrap();
            let mut g = Graph::new(gpu.clone());
            (g.profile.row_subgroups, g.profile.row_registers) = (sg, regs);
            let xi = g.pinned("x", x.len());
            let y = layernorm(&mut g, "ln", xi, RowMap::dense(rows), &ln, None).unwrap();
            let plan = g.compile().unwrap();
            plan.write(xi, &x).unwrap();
            plan.run().unwrap();
            let want: Vec<f64> = x.chunks(c).flat_map(|r| layernorm_ref(&r.iter().map(|&v| v as f64).collect::<Vec<_>>(), &gm, &bt)).collect();
            assert_close(&format!("{what} layernorm {rows}x{c}"), &plan.read(y).unwrap(), &want, 1e-4, 1e-4);
        }
    }
}

/// Gathered and scattered rows (the row maps of the embedding norm and the
/// cls-token norm), over texture chunks of rows.
#[test]
fn layernorm_gathered() {
    let gpu = gpu();
    // Rows [3, 1403) of a tensor into rows [2, 1402) of another: offsets on both
    // sides, over two texture chunks of rows (the vec4 form reads in chunks).
    let (rows, c) = (1400, 384);
    let x = randn((rows + 3) * c, 7);
    let (gm, bt) = (randn(c, 2), randn(c, 3));
    let ln = LayerNorm::new(&gpu, "ln", &gm, &bt).unwrap();
    let mut g = Graph::new(gpu.clone());
    let xi = g.pinned("x", x.len());
    let out = g.pinned("y", (rows + 2) * c);
    layernorm(&mut g, "offset", xi, RowMap { rows, group: rows, in_stride: 0, in_off: 3, out_stride: 0, out_off: 2 }, &ln, Some(out)).unwrap();
    let plan = g.compile().unwrap();
    plan.write(xi, &x).unwrap();
    plan.write(out, &vec![7.0; (rows + 2) * c]).unwrap();
    plan.run().unwrap();
    let mut want = vec![7.0f64; (rows + 2) * c];
    for r in 0..rows {
        let row: Vec<f64> = x[(r + 3) * c..(r + 4) * c].iter().map(|&v| v as f64).collect();
        want[(r + 2) * c..(r + 3) * c].copy_from_slice(&layernorm_ref(&row, &gm, &bt));
    }
    assert_close("layernorm with row offsets, chunked", &plan.read(out).unwrap(), &want, 1e-4, 1e-4);
    // Gather: the cls token (row 0 of 4 tokens) of each of 3 images; scatter below a cls slot.
    let (b, t, c) = (3, 4, 6);
    let x = randn(b * t * c, 9);
    let (gm, bt) = (randn(c, 2), randn(c, 3));
    let ln = LayerNorm::new(&gpu, "ln", &gm, &bt).unwrap();
    let mut g = Graph::new(gpu.clone());
    let xi = g.pinned("x", x.len());
    let cls = layernorm(&mut g, "cls", xi, RowMap { rows: b, group: 1, in_stride: t, in_off: 0, out_stride: 1, out_off: 0 }, &ln, None).unwrap();
    let out = g.pinned("scatter", b * (t + 1) * c);
    layernorm(&mut g, "scatter", xi, RowMap { rows: b * t, group: t, in_stride: t, in_off: 0, out_stride: t + 1, out_off: 1 }, &ln, Some(out)).unwrap();
    let plan = g.compile().unwrap();
    plan.write(xi, &x).unwrap();
    plan.write(out, &vec![7.0; b * (t + 1) * c]).unwrap();
    plan.run().unwrap();
    let row = |bi: usize, ti: usize| -> Vec<f64> { x[(bi * t + ti) * c..(bi * t + ti + 1) * c].iter().map(|&v| v as f64).collect() };
    let want_cls: Vec<f64> = (0..b).flat_map(|bi| layernorm_ref(&row(bi, 0), &gm, &bt)).collect();
    assert_close("layernorm cls gather", &plan.read(cls).unwrap(), &want_cls, 1e-4, 1e-4);
    let mut want = vec![7.0f64; b * (t + 1) * c];
    for bi in 0..b {
        for ti in 0..t {
            let r = layernorm_ref(&row(bi, ti), &gm, &bt);
            want[(bi * (t + 1) + 1 + ti) * c..(bi * (t + 1) + 2 + ti) * c].copy_from_slice(&r);
        }
    }
    assert_close("layernorm scatter", &plan.read(out).unwrap(), &want, 1e-4, 1e-4);
}

/// A block's residual branch and the LayerNorm after it (what the forward does
/// after proj and fc2): with a split epilogue the branch output is returned and
/// added to the stream by `add_layernorm`; fused, the GEMM adds it. Both must
/// leave the stream as x + a·W + b and normalise that.
#[test]
fn residual_branch_then_layernorm() {
    let gpu = gpu();
    // 1400 x 384: LayerNorm rows over two texture chunks.
    for &(m, c, kind) in
        &[(5, 8, MatmulKind::Texture), (37, 384, MatmulKind::Texture), (1400, 384, MatmulKind::Texture), (2, 6, MatmulKind::Texture), (9, 12, MatmulKind::Buffer), (3, 6, MatmulKind::Buffer)]
    {
        let k = 64;
        let (a, w, b) = (randn(m * k, 1), randn(c * k, 2), randn(c, 3));
        let x: Vec<f32> = randn(m * c, 4).iter().map(|v| v * 2.0 + 1.0).collect();
        let (gm, bt) = (randn(c, 5), randn(c, 6));
        let l = Linear::with_kind(&gpu, "proj", &w, Some(&b), c, k, kind).unwrap();
        let ln = LayerNorm::new(&gpu, "ln", &gm, &bt).unwrap();
        let want_x = matmul_ref(&a, &w, &b, m, c, k, Act::None, Some(&x));
        let want_h: Vec<f64> = want_x.chunks(c).flat_map(|r| layernorm_ref(r, &gm, &bt)).collect();
        for fused in [false, true] {
            let mut g = Graph::new(gpu.clone());
            g.profile.fused_epilogue = fused;
            let (ai, xi) = (g.pinned("a", m * k), g.pinned("x", m * c));
            let h = match linear_residual(&mut g, "proj", ai, m, &l, xi).unwrap() {
                Some(z) => add_layernorm(&mut g, "norm", xi, z, m, &ln).unwrap(),
                None => layernorm(&mut g, "norm", xi, RowMap::dense(m), &ln, None).unwrap(),
            };
            let plan = g.compile().unwrap();
            plan.write(ai, &a).unwrap();
            plan.write(xi, &x).unwrap();
            plan.run().unwrap();
            let name = format!("{kind:?} {m}x{c} fused={fused}");
            assert_close(&format!("residual stream {name}"), &plan.read(xi).unwrap(), &want_x, 1e-4, 1e-4);
            assert_close(&format!("layernorm of the stream {name}"), &plan.read(h).unwrap(), &want_h, 1e-4, 1e-4);
        }
    }
}

#[test]
fn softmax_rows() {
    for (what, gpu, sg, regs) in row_variants() {
        for &(rows, c) in &[(3, 1000), (2, 1), (5, 67), (2, 1030)] {
            let x: Vec<f32> = randn(rows * c, 4).iter().map(|v| v * 10.0).collect();
            let mut g = Graph::new(gpu.clone());
            (g.profile.row_subgroups, g.profile.row_registers) = (sg, regs);
            let xi = g.pinned("x", x.len());
            let y = softmax(&mut g, "sm", xi, rows, c, None).unwrap();
            let plan = g.compile().unwrap();
            plan.write(xi, &x).unwrap();
            plan.run().unwrap();
            let want: Vec<f64> = x
                .chunks(c)
                .flat_map(|r| {
                    let m = r.iter().cloned().fold(f32::MIN, f32::max) as f64;
                    let e: Vec<f64> = r.iter().map(|&v| (v as f64 - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    e.into_iter().map(move |v| v / z)
                })
                .collect();
            assert_close(&format!("{what} softmax {rows}x{c}"), &plan.read(y).unwrap(), &want, 1e-6, 1e-4);
        }
    }
}

#[test]
fn cls_token_and_mean_pool() {
    let gpu = gpu();
    let (b, t, c) = (3, 5, 7);
    let cls = randn(c, 1);
    let x = randn(b * t * c, 2);
    let cls_buf = Arc::new(gpu.upload("cls", &cls).unwrap());
    let mut g = Graph::new(gpu.clone());
    let xi = g.pinned("x", x.len());
    let mean = mean_tokens(&mut g, "mean", xi, b, t, c).unwrap();
    cls_fill(&mut g, "cls", &cls_buf, xi, b, t, c).unwrap();
    let plan = g.compile().unwrap();
    plan.write(xi, &x).unwrap();
    plan.run().unwrap();
    let want_mean: Vec<f64> = (0..b * c).map(|n| (0..t).map(|ti| x[((n / c) * t + ti) * c + n % c] as f64).sum::<f64>() / t as f64).collect();
    assert_close("mean_tokens", &plan.read(mean).unwrap(), &want_mean, 1e-5, 1e-5);
    let mut want: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for bi in 0..b {
        for ch in 0..c {
            want[bi * t * c + ch] = cls[ch] as f64;
        }
    }
    assert_close("cls_fill", &plan.read(xi).unwrap(), &want, 0.0, 0.0);
}

/// ConViT's token kernels against f64, in both kernel sets, on odd sizes: the
/// per-token table added to every image (`add_pos`), its gradient summed over the
/// batch (`batch_sum`), and rows scattered below a class-token row and gathered
/// back (`scatter_rows`, `gather_rows`); and the optimizer's gradient
/// accumulation (`optim::accumulate`: copy, then add).
#[test]
fn position_table_rows_and_accumulation() {
    use cvt_gpu::ops::optim::accumulate;
    use cvt_gpu::ops::tokens::{add_pos, batch_sum, gather_rows, scatter_rows};
    for gpu in [gpu_buffer_variants(), gpu_texture_variants()] {
        let (b, n, c) = (3, 7, 5);
        let (x, table) = (randn(b * n * c, 1), randn(n * c, 2));
        let table_buf = Arc::new(gpu.upload("table", &table).unwrap());
        let sum_buf = Arc::new(gpu.storage("sum", (n * c * 4) as u64).unwrap());
        let mut g = Graph::new(gpu.clone());
        let xi = g.pinned("x", x.len());
        let y = add_pos(&mut g, "pos", xi, &table_buf, n * c).unwrap();
        g.pin(y);
        batch_sum(&mut g, "sum", xi, b, n * c, &sum_buf).unwrap();
        let wide = g.pinned("wide", b * (n + 1) * c);
        scatter_rows(&mut g, "scatter", xi, wide, c, (b * n, n, n + 1, 1)).unwrap();
        let back = g.pinned("back", b * n * c);
        gather_rows(&mut g, "gather", wide, back, c, (b * n, n, n + 1, 1)).unwrap();
        let plan = g.compile().unwrap();
        plan.write(xi, &x).unwrap();
        plan.write(wide, &vec![7.0; b * (n + 1) * c]).unwrap();
        plan.run().unwrap();
        let want: Vec<f64> = (0..x.len()).map(|i| x[i] as f64 + table[i % (n * c)] as f64).collect();
        assert_close("add_pos", &plan.read(y).unwrap(), &want, 1e-6, 1e-6);
        let want: Vec<f64> = (0..n * c).map(|i| (0..b).map(|bi| x[bi * n * c + i] as f64).sum()).collect();
        assert_close("batch_sum", &gpu.read(&sum_buf, 0, n * c).unwrap(), &want, 1e-6, 1e-6);
        let mut want = vec![7.0f64; b * (n + 1) * c];
        for bi in 0..b {
            for i in 0..n * c {
                want[(bi * (n + 1) + 1) * c + i] = x[bi * n * c + i] as f64;
            }
        }
        assert_close("scatter_rows", &plan.read(wide).unwrap(), &want, 0.0, 0.0);
        assert_close("gather_rows", &plan.read(back).unwrap(), &x.iter().map(|&v| v as f64).collect::<Vec<_>>(), 0.0, 0.0);
        // Accumulation over three "micro-batches" of a 1001-value gradient.
        let len = 1001;
        let grads: Vec<Vec<f32>> = (0..3).map(|k| randn(len, 10 + k)).collect();
        let (grad, acc) = (Arc::new(gpu.upload("grad", &grads[0]).unwrap()), Arc::new(gpu.storage("acc", (len * 4) as u64).unwrap()));
        let (mut first, mut add) = (Graph::new(gpu.clone()), Graph::new(gpu.clone()));
        accumulate(&mut first, "acc", &grad, &acc, len, true).unwrap();
        accumulate(&mut add, "acc", &grad, &acc, len, false).unwrap();
        let (first, add) = (first.compile().unwrap(), add.compile().unwrap());
        for (k, gr) in grads.iter().enumerate() {
            gpu.queue.write_buffer(&grad, 0, bytemuck::cast_slice(gr));
            if k == 0 {
                first.run().unwrap()
            } else {
                add.run().unwrap()
            }
        }
        let want: Vec<f64> = (0..len).map(|i| grads.iter().map(|gr| gr[i] as f64).sum()).collect();
        assert_close("accumulate", &gpu.read(&acc, 0, len).unwrap(), &want, 1e-6, 1e-6);
    }
}

#[test]
fn gelu_reference_is_exact() {
    // The f64 reference itself, against known values of erf.
    assert!((libm_erf(0.5) - 0.520_499_877_813_046_5).abs() < 1e-14);
    assert!((libm_erf(3.0) - 0.999_977_909_503_001_4).abs() < 1e-14);
    assert!((libm_erf(-1.0) + 0.842_700_792_949_714_9).abs() < 1e-14);
}

#[test]
fn activation_and_add_elementwise() {
    let gpu = gpu();
    // 1000 values take the vec4 kernels (linear textures on CPU drivers), 999 the
    // scalar ones; 600000 cross a texture chunk (TEXTURE_CHUNK_BYTES) in the vec4 ones.
    let cases = [1000, 999].into_iter().flat_map(|n| [Act::None, Act::Gelu, Act::QuickGelu].map(|a| (n, a))).chain([(600_000, Act::QuickGelu)]);
    for (n, act) in cases {
        let z: Vec<f32> = randn(n, 1).iter().map(|v| v * 4.0).collect();
        let o = randn(n, 2);
        let dy = randn(n, 3);
        let mut g = Graph::new(gpu.clone());
        let zi = g.pinned("z", n);
        let oi = g.pinned("o", n);
        let dyi = g.pinned("dy", n);
        let u = cvt_gpu::ops::matmul::act_forward(&mut g, "act", zi, n, act).unwrap();
        let s = cvt_gpu::ops::tokens::add(&mut g, "add", u, oi).unwrap();
        cvt_gpu::ops::matmul::act_backward(&mut g, "act_b", zi, dyi, n, act).unwrap();
        let plan = g.compile().unwrap();
        plan.write(zi, &z).unwrap();
        plan.write(oi, &o).unwrap();
        plan.write(dyi, &dy).unwrap();
        plan.run().unwrap();
        let f = |z: f64| match act {
            Act::None => z,
            Act::Gelu => gelu(z),
            Act::QuickGelu => quick_gelu(z),
        };
        let want: Vec<f64> = z.iter().zip(&o).map(|(&z, &o)| f(z as f64) + o as f64).collect();
        assert_close(&format!("{act:?} + add, n {n}"), &plan.read(s).unwrap(), &want, 1e-5, 1e-5);
        // act'(z) by central differences of the f64 reference (error ~1e-9 at h = 1e-4).
        let h = 1e-4;
        let want: Vec<f64> = z.iter().zip(&dy).map(|(&z, &d)| d as f64 * (f(z as f64 + h) - f(z as f64 - h)) / (2.0 * h)).collect();
        // (Act::None leaves dy as it is: nothing to check there.)
        if act != Act::None {
            assert_close(&format!("{act:?} backward, n {n}"), &plan.read(dyi).unwrap(), &want, 1e-5, 1e-5);
        }
    }
}

/// `subgroup_probe`: lavapipe runs a workgroup as 8-lane SIMD vectors over
/// consecutive invocations, so there the probe must find runs of 8 (it enables
/// the texture GEMM's 8-lane A sharing, N = 384). Elsewhere the answer depends on
/// the driver and the test only runs it.
#[test]
fn subgroup_probe_finds_lavapipe_runs_of_8() {
    let gpu = gpu();
    let found = gpu.profile().subgroups_of_8;
    let lavapipe = gpu.info.device_type == wgpu::DeviceType::Cpu && gpu.subgroups && gpu.info.subgroup_min_size == 8 && gpu.info.subgroup_max_size == 8;
    eprintln!("{}: subgroups are runs of 8: {found}", gpu.describe());
    if lavapipe {
        assert!(found, "lavapipe's subgroups are its 8-lane SIMD runs");
    }
    if !gpu.subgroups {
        assert!(!found, "no subgroups, no sharing");
    }
}

#[test]
fn texture_gemm_reads_zero_padded_operands_as_they_are() {
    // A buffer of rows padded with zeros to whole vec4s (an im2col matrix of
    // K = 147) is read by the GEMM without a pack pass: as A (K = 147, the pad
    // column inside the last texel), and transposed as A (147 or 151 output rows:
    // the last row group starts inside the pad, and 151 puts it in the second
    // group of an invocation's 8 or 16 rows). B is a plain packed operand.
    use cvt_gpu::ops::gemm::{tex_gemm, Epilogue, Src, View};
    let gpu = gpu_texture_variants();
    for &(rows, cols, transposed) in &[(20usize, 147usize, false), (12, 151, false), (24, 147, true), (36, 151, true), (4, 9, true)] {
        let stride = cols.div_ceil(4) * 4;
        let mut src = randn(rows * stride, 1);
        for r in 0..rows {
            src[r * stride + cols..(r + 1) * stride].iter_mut().for_each(|v| *v = 0.0);
        }
        // The product's A is [m, k]: the buffer itself, or its transpose.
        let (m, k) = if transposed { (cols, rows) } else { (rows, cols) };
        let n = 12;
        let bvals = randn(k * n, 2);
        let mut g = Graph::new(gpu.clone());
        let at = g.pinned("a", src.len());
        let bt = g.pinned("b", bvals.len());
        let out = g.pinned("out", m * n);
        let a = if transposed { View::t_zero_padded(Src::Act(at), rows, cols, stride) } else { View::zero_padded(Src::Act(at), rows, cols, stride) };
        tex_gemm(&mut g, "gemm", &a, &View::new(Src::Act(bt), k, n, n), cvt_gpu::graph::Res::Act(out), n, Epilogue::plain()).unwrap();
        let plan = g.compile().unwrap();
        plan.write(at, &src).unwrap();
        plan.write(bt, &bvals).unwrap();
        plan.run().unwrap();
        let got = plan.read(out).unwrap();
        let a_at = |i: usize, j: usize| if transposed { src[j * stride + i] } else { src[i * stride + j] } as f64;
        let want: Vec<f64> = (0..m * n).map(|e| (0..k).map(|j| a_at(e / n, j) * bvals[j * n + e % n] as f64).sum()).collect();
        assert_close(&format!("zero-padded A {rows}x{cols} transposed {transposed}"), &got, &want, 1e-4, 1e-4);
    }
}

#[test]
fn graph_reuses_a_texture_copy_only_while_it_holds_the_same_values() {
    use cvt_gpu::graph::Res;
    let gpu = gpu_texture_variants();
    let mut g = Graph::new(gpu.clone());
    let (x, y) = (g.tensor("x", 256), g.tensor("y", 256));
    let pipeline = g.pipeline("matmul", "act_forward4", &[("ACT", 0.0), ("WG_X", 64.0), ("WG_Y", 1.0)]).unwrap();
    let touch = |g: &mut Graph, t| g.dispatch("touch", pipeline.clone(), vec![Res::Act(t)], [1, 1, 1], 0.0);
    touch(&mut g, x);
    let a = g.linear_texture(x, 5);
    // Same values for the same binding: the same texture.
    assert_eq!(g.linear_texture(x, 5), a);
    // And for another binding (a dispatch binds a texture at any index; see the
    // next test for when its own operands refill it).
    assert_eq!(g.linear_texture(x, 6), a);
    // Another range of x is another copy.
    assert_ne!(g.linear_texture_range(x, 16, 16, 5), a);
    let a = g.linear_texture(x, 5);
    // A dispatch that binds x may have written it: a new copy.
    touch(&mut g, x);
    let b = g.linear_texture(x, 5);
    assert_ne!(b, a);
    // Binding 5's texture refilled with y: x must be copied again.
    touch(&mut g, y);
    let _ = g.linear_texture(y, 5);
    let c = g.linear_texture(x, 5);
    assert_ne!(c, b);
    assert_eq!(g.linear_texture(x, 5), c);
    // Off: every read is its own copy.
    g.profile.copy_reuse = false;
    assert_ne!(g.linear_texture(x, 5), c);
}

#[test]
fn graph_copies_again_a_reused_texture_its_own_dispatch_refills() {
    // x's copy is made for binding 7; the add reads x as its first operand
    // (binding 6) by reusing that copy, then fills binding 7 with its second
    // operand y: the graph must give x a texture of its own, and the sum must be
    // x + y, not y + y.
    let gpu = gpu_texture_variants();
    let n = 64;
    let (xv, yv) = (randn(n, 1), randn(n, 2));
    let mut g = Graph::new(gpu.clone());
    let (x, y) = (g.pinned("x", n), g.pinned("y", n));
    let _ = g.linear_texture(x, 7);
    let s = cvt_gpu::ops::tokens::add(&mut g, "sum", x, y).unwrap();
    g.pin(s);
    let plan = g.compile().unwrap();
    plan.write(x, &xv).unwrap();
    plan.write(y, &yv).unwrap();
    plan.run().unwrap();
    let want: Vec<f64> = xv.iter().zip(&yv).map(|(a, b)| *a as f64 + *b as f64).collect();
    assert_close("x + y", &plan.read(s).unwrap(), &want, 1e-6, 1e-6);
}
