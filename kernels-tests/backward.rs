//! Backward kernels: analytic gradients against an f64 CPU reference, and a
//! finite-difference check through the engine's own forward with the op in the
//! middle of a graph (its output feeds a second op and the loss directly), so a
//! backward that drops an incoming gradient fails.

mod common;
use common::*;

use cvt_gpu::gpu::MatmulKind;
use cvt_gpu::graph::Graph;
use cvt_gpu::ops::matmul::{linear, linear_backward, LinearGrad, Out};
use cvt_gpu::ops::{Act, Linear};

/// y = x·Wᵀ + b with PyTorch-layout W [n, k], in f64.
fn lin(x: &[f64], w: &[f64], b: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
    (0..m * n).map(|i| b[i % n] + (0..k).map(|j| x[(i / n) * k + j] * w[(i % n) * k + j]).sum::<f64>()).collect()
}

struct Case {
    m: usize,
    k: usize,
    h: usize,
    n: usize,
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Loss L = Σ c·y + Σ e·h with h = lin1(x), y = lin2(h), on `gpu` (the kernel
/// set under test) in f32.
#[allow(clippy::too_many_arguments)]
fn gpu_loss(gpu: &std::sync::Arc<cvt_gpu::gpu::Gpu>, case: &Case, x: &[f32], w1: &[f32], b1: &[f32], w2: &[f32], b2: &[f32], c: &[f32], e: &[f32]) -> f64 {
    let l1 = Linear::with_kind(&gpu, "l1", w1, Some(b1), case.h, case.k, MatmulKind::Buffer).unwrap();
    let l2 = Linear::with_kind(&gpu, "l2", w2, Some(b2), case.n, case.h, MatmulKind::Buffer).unwrap();
    let mut g = Graph::new(gpu.clone());
    let xi = g.pinned("x", x.len());
    let h = g.pinned("h", case.m * case.h);
    let y = g.pinned("y", case.m * case.n);
    linear(&mut g, "l1", xi, case.m, &l1, Act::None, Out::Into(h)).unwrap();
    linear(&mut g, "l2", h, case.m, &l2, Act::None, Out::Into(y)).unwrap();
    let plan = g.compile().unwrap();
    plan.write(xi, x).unwrap();
    plan.run().unwrap();
    let (hv, yv) = (plan.read(h).unwrap(), plan.read(y).unwrap());
    yv.iter().zip(c).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() + hv.iter().zip(e).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
}

#[test]
fn linear_backward_two_layers() {
    // Both kernel families: packed texture GEMMs / row-per-invocation norms (with
    // 8 and 16 rows per invocation), and buffer GEMMs / workgroup-per-row norms.
    // The GPU set also with a workgroup target of 1: 128-row tiles, no split-K.
    for (gpu, tex_rows, min_groups) in [(gpu_texture_variants(), 8, 0), (gpu_texture_variants(), 16, 0), (gpu_buffer_variants(), 8, 0), (gpu_buffer_variants(), 8, 1)] {
        // The last two have every dimension a multiple of 4, so the texture family
        // reads activations through linear textures (A as is and transposed, B as
        // is) instead of packing them; 12 rows of Xᵀ leave a half block of 8. The
        // last has outputs over 128 wide (forward, dX and dW alike), where the
        // texture GEMM fetches A once per subgroup (A_SHARE, as is and transposed),
        // with idle lanes past the last column block and a partial row block;
        // h = 376 (24 column blocks) shares across 8-lane halves of a workgroup
        // where subgroups are runs of 8 (lavapipe).
        let cases = [
            Case { m: 5, k: 7, h: 6, n: 3 },
            Case { m: 33, k: 64, h: 20, n: 10 },
            Case { m: 1, k: 1, h: 1, n: 1 },
            Case { m: 36, k: 12, h: 20, n: 8 },
            Case { m: 4, k: 4, h: 4, n: 4 },
            Case { m: 20, k: 136, h: 376, n: 140 },
        ];
        for case in cases {
            let Case { m, k, h, n } = case;
            let (x, w1, b1, w2, b2) = (randn(m * k, 1), randn(h * k, 2), randn(h, 3), randn(n * h, 4), randn(n, 5));
            let (c, e) = (randn(m * n, 6), randn(m * h, 7));
            // GPU backward: dy = c; dh = e + dy·W2ᵀ; then through l1.
            let l1 = Linear::with_kind(&gpu, "l1", &w1, Some(&b1), h, k, MatmulKind::Buffer).unwrap();
            let l2 = Linear::with_kind(&gpu, "l2", &w2, Some(&b2), n, h, MatmulKind::Buffer).unwrap();
            let (g1, g2) = (LinearGrad::new(&gpu, "l1", &l1).unwrap(), LinearGrad::new(&gpu, "l2", &l2).unwrap());
            let mut g = Graph::new(gpu.clone());
            g.profile.tex_rows = tex_rows;
            g.profile.narrow_rows = Some(tex_rows);
            if min_groups > 0 {
                g.profile.gemm.min_workgroups = min_groups;
            }
            let xi = g.pinned("x", m * k);
            let hi = g.tensor("h", m * h);
            linear(&mut g, "l1", xi, m, &l1, Act::None, Out::Into(hi)).unwrap();
            let dy = g.pinned("dy", m * n);
            let dh = g.pinned("dh", m * h);
            linear_backward(&mut g, "l2", hi, dy, m, &l2, &g2, Some(dh)).unwrap();
            let dx = linear_backward(&mut g, "l1", xi, dh, m, &l1, &g1, None).unwrap();
            let plan = g.compile().unwrap();
            plan.write(xi, &x).unwrap();
            plan.write(dy, &c).unwrap();
            plan.write(dh, &e).unwrap();
            plan.run().unwrap();
            let got_dx = plan.read(dx).unwrap();
            let np1 = h.div_ceil(4) * 4;
            let np2 = n.div_ceil(4) * 4;
            let got_dw1 = gpu.read(&g1.w, 0, k * np1).unwrap();
            let got_db1 = gpu.read(&g1.b, 0, np1).unwrap();
            let got_dw2 = gpu.read(&g2.w, 0, h * np2).unwrap();
            let got_db2 = gpu.read(&g2.b, 0, np2).unwrap();

            // f64 reference.
            let (xd, w1d, b1d, w2d, cd, ed) = (f64s(&x), f64s(&w1), f64s(&b1), f64s(&w2), f64s(&c), f64s(&e));
            let hd = lin(&xd, &w1d, &b1d, m, h, k);
            let mut dhd = ed.clone();
            for r in 0..m {
                for j in 0..h {
                    dhd[r * h + j] += (0..n).map(|o| cd[r * n + o] * w2d[o * h + j]).sum::<f64>();
                }
            }
            let dxd: Vec<f64> = (0..m * k).map(|i| (0..h).map(|j| dhd[(i / k) * h + j] * w1d[j * k + i % k]).sum()).collect();
            // Gradients in the stored layout [K, NP] (zero padding columns).
            let dw = |xs: &[f64], dys: &[f64], kk: usize, nn: usize, np: usize| -> Vec<f64> {
                (0..kk * np).map(|i| if i % np >= nn { 0.0 } else { (0..m).map(|r| xs[r * kk + i / np] * dys[r * nn + i % np]).sum() }).collect()
            };
            let db = |dys: &[f64], nn: usize, np: usize| -> Vec<f64> { (0..np).map(|o| if o >= nn { 0.0 } else { (0..m).map(|r| dys[r * nn + o]).sum() }).collect() };
            let what = format!("{:?} rows {tex_rows} min_groups {min_groups} m{m} k{k} h{h} n{n}", gpu.profile().kernels);
            // dx sums h products per element, and in the wide case its terms
            // (dh ~ 12, W ~ 1) cancel to results far below them: the tolerance
            // includes f32's rounding of such sums (a 64-row GEMM tile splitting K
            // happened to sum more accurately than one pass over all 376 terms).
            let dx_abs: Vec<f64> = (0..m * k).map(|i| (0..h).map(|j| (dhd[(i / k) * h + j] * w1d[j * k + i % k]).abs()).sum()).collect();
            assert_close_sum(&format!("{what} dx"), &got_dx, &dxd, &dx_abs, h);
            assert_close(&format!("{what} dW1"), &got_dw1, &dw(&xd, &dhd, k, h, np1), 1e-4, 1e-4);
            assert_close(&format!("{what} db1"), &got_db1, &db(&dhd, h, np1), 1e-4, 1e-4);
            assert_close(&format!("{what} dW2"), &got_dw2, &dw(&hd, &cd, h, n, np2), 1e-4, 1e-4);
            assert_close(&format!("{what} db2"), &got_db2, &db(&cd, n, np2), 1e-4, 1e-4);

            // Finite differences of the engine's own f32 forward (the kernel set
            // under test), on a few entries of every input. L is linear in each
            // parameter, so central differences are exact for any step up to f32
            // rounding of L: a step of 0.1 keeps that rounding (a few 1e-5 of L
            // from the outputs the entry moves) at ~1e-4 of a gradient; 1e-2 left
            // it at ~1e-3, at the tolerance.
            // Not for the wide case: its outputs (~100 each, thousands of them) put
            // the f32 rounding of L near 0.1, past what a difference can resolve;
            // the f64 references above check its gradients.
            if k > 64 {
                continue;
            }
            let eps = 1e-1f32;
            let fd = |which: usize, idx: usize| -> f64 {
                let mut p: Vec<Vec<f32>> = vec![x.clone(), w1.clone(), b1.clone(), w2.clone(), b2.clone()];
                p[which][idx] += eps;
                let lp = gpu_loss(&gpu, &case, &p[0], &p[1], &p[2], &p[3], &p[4], &c, &e);
                p[which][idx] -= 2.0 * eps;
                let lm = gpu_loss(&gpu, &case, &p[0], &p[1], &p[2], &p[3], &p[4], &c, &e);
                (lp - lm) / (2.0 * eps as f64)
            };
            let picks = |len: usize| [0, len / 2, len - 1];
            for idx in picks(m * k) {
                let (num, ana) = (fd(0, idx), got_dx[idx] as f64);
                assert!((num - ana).abs() <= 2e-3 * (1.0 + ana.abs()), "{what} dx[{idx}]: fd {num} vs {ana}");
            }
            for idx in picks(h * k) {
                // PyTorch layout [h, k] -> stored [k, np1].
                let (num, ana) = (fd(1, idx), got_dw1[(idx % k) * np1 + idx / k] as f64);
                assert!((num - ana).abs() <= 2e-3 * (1.0 + ana.abs()), "{what} dW1[{idx}]: fd {num} vs {ana}");
            }
            for idx in picks(h) {
                let (num, ana) = (fd(2, idx), got_db1[idx] as f64);
                assert!((num - ana).abs() <= 2e-3 * (1.0 + ana.abs()), "{what} db1[{idx}]: fd {num} vs {ana}");
            }
            for idx in picks(n * h) {
                let (num, ana) = (fd(3, idx), got_dw2[(idx % h) * np2 + idx / h] as f64);
                assert!((num - ana).abs() <= 2e-3 * (1.0 + ana.abs()), "{what} dW2[{idx}]: fd {num} vs {ana}");
            }
        }
    }
}

use cvt_gpu::ops::matmul::act_backward;
use cvt_gpu::ops::rownorm::{layernorm, layernorm_backward, softmax_xent, LayerNorm, LayerNormGrad, RowMap};

fn act64(act: Act, z: f64) -> f64 {
    match act {
        Act::None => z,
        Act::Gelu => gelu(z),
        Act::QuickGelu => quick_gelu(z),
    }
}

/// Central difference of `loss` in parameter `p[i]`.
fn fd(p: &[f32], i: usize, eps: f32, loss: &dyn Fn(&[f32]) -> f64) -> f64 {
    let mut q = p.to_vec();
    q[i] += eps;
    let lp = loss(&q);
    q[i] -= 2.0 * eps;
    let lm = loss(&q);
    (lp - lm) / (2.0 * eps as f64)
}

fn close(what: &str, num: f64, ana: f64, tol: f64) {
    assert!((num - ana).abs() <= tol * (1.0 + ana.abs()), "{what}: finite difference {num} vs analytic {ana}");
}

/// fc1-style layer: z = x·Wᵀ + b, a = act(z), L = Σ c·a. The activation's backward
/// sits between the loss and the linear backward.
#[test]
fn activation_backward_mid_graph() {
    // Both kernel families: packed texture GEMMs / row-per-invocation norms, and
    // buffer GEMMs / workgroup-per-row norms.
    // 6·7 values take the scalar kernels; 4·8 the vec4 ones (linear textures in the texture family).
    for (gpu, (m, k, n)) in [gpu_texture_variants(), gpu_buffer_variants()].into_iter().flat_map(|gpu| [(gpu.clone(), (6, 5, 7)), (gpu, (4, 5, 8))]) {
        for act in [Act::Gelu, Act::QuickGelu] {
            let (x, w, b, c) = (randn(m * k, 1), randn(n * k, 2), randn(n, 3), randn(m * n, 4));
            let l = Linear::with_kind(&gpu, "l", &w, Some(&b), n, k, MatmulKind::Buffer).unwrap();
            let grad = LinearGrad::new(&gpu, "l", &l).unwrap();
            let mut g = Graph::new(gpu.clone());
            let xi = g.pinned("x", m * k);
            let z = g.pinned("z", m * n);
            linear(&mut g, "l", xi, m, &l, Act::None, Out::Into(z)).unwrap();
            let dy = g.pinned("dy", m * n);
            act_backward(&mut g, "act", z, dy, m * n, act).unwrap();
            linear_backward(&mut g, "l", xi, dy, m, &l, &grad, None).unwrap();
            let plan = g.compile().unwrap();
            plan.write(xi, &x).unwrap();
            plan.write(dy, &c).unwrap();
            plan.run().unwrap();
            let zv = plan.read(z).unwrap();
            let dz = plan.read(dy).unwrap();
            // f64: dz = c * act'(z) by central differences of the f64 activation.
            let want: Vec<f64> = zv.iter().zip(&c).map(|(&z, &c)| c as f64 * (act64(act, z as f64 + 1e-6) - act64(act, z as f64 - 1e-6)) / 2e-6).collect();
            assert_close(&format!("{act:?} dz"), &dz, &want, 1e-5, 1e-4);
            // Finite differences through the engine's fused forward (act in the epilogue).
            let dw = gpu.read(&grad.w, 0, k * 8).unwrap();
            let loss = |wp: &[f32]| -> f64 {
                let l = Linear::with_kind(&gpu, "l", wp, Some(&b), n, k, MatmulKind::Buffer).unwrap();
                let mut g = Graph::new(gpu.clone());
                let xi = g.pinned("x", m * k);
                let y = g.pinned("y", m * n);
                linear(&mut g, "l", xi, m, &l, act, Out::Into(y)).unwrap();
                let plan = g.compile().unwrap();
                plan.write(xi, &x).unwrap();
                plan.run().unwrap();
                plan.read(y).unwrap().iter().zip(&c).map(|(a, b)| *a as f64 * *b as f64).sum()
            };
            for i in [0, n * k / 2, n * k - 1] {
                close(&format!("{act:?} dW[{i}]"), fd(&w, i, 1e-2, &loss), dw[(i % k) * 8 + i / k] as f64, 5e-3);
            }
        }
    }
}

/// h = LN(x); L = Σ c·(h·W2ᵀ) + Σ e·h: LayerNorm backward mid-graph.
#[test]
fn layernorm_backward_mid_graph() {
    // Both kernel families: packed texture GEMMs / row-per-invocation norms, and
    // buffer GEMMs / workgroup-per-row norms, with the row in registers and streamed.
    for (gpu, regs) in [(gpu_texture_variants(), true), (gpu_buffer_variants(), true), (gpu_buffer_variants(), false)] {
        for &(m, c, n) in &[(4, 7, 3), (3, 130, 5), (1, 1, 1)] {
            let x: Vec<f32> = randn(m * c, 1).iter().map(|v| v * 2.0 + 0.5).collect();
            let (gm, bt, w2, cy, e) = (randn(c, 2), randn(c, 3), randn(n * c, 4), randn(m * n, 5), randn(m * c, 6));
            let run = |x: &[f32], gm: &[f32], bt: &[f32], backward: bool| -> (f64, Vec<Vec<f32>>) {
                let ln = LayerNorm::new(&gpu, "ln", gm, bt).unwrap();
                let l2 = Linear::with_kind(&gpu, "l2", &w2, None, n, c, MatmulKind::Buffer).unwrap();
                let (lg, g2) = (LayerNormGrad::new(&gpu, "ln", c).unwrap(), LinearGrad::new(&gpu, "l2", &l2).unwrap());
                let mut g = Graph::new(gpu.clone());
                g.profile.row_registers = regs;
                let xi = g.pinned("x", m * c);
                let h = g.pinned("h", m * c);
                let y = g.pinned("y", m * n);
                layernorm(&mut g, "ln", xi, RowMap::dense(m), &ln, Some(h)).unwrap();
                linear(&mut g, "l2", h, m, &l2, Act::None, Out::Into(y)).unwrap();
                let (dy, dh) = (g.pinned("dy", m * n), g.pinned("dh", m * c));
                let mut dx = None;
                if backward {
                    linear_backward(&mut g, "l2", h, dy, m, &l2, &g2, Some(dh)).unwrap();
                    // Pinned: an unpinned dx's slot is free for later tensors
                    // (the column sums' partials) once the backward has read it.
                    let dx_out = g.pinned("dx", m * c);
                    dx = Some(layernorm_backward(&mut g, "ln", xi, dh, RowMap::dense(m), &ln, &lg, Some(dx_out)).unwrap());
                }
                let plan = g.compile().unwrap();
                plan.write(xi, x).unwrap();
                plan.write(dy, &cy).unwrap();
                plan.write(dh, &e).unwrap();
                plan.run().unwrap();
                let (hv, yv) = (plan.read(h).unwrap(), plan.read(y).unwrap());
                let l = yv.iter().zip(&cy).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() + hv.iter().zip(&e).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
                let grads = if backward { vec![plan.read(dx.unwrap()).unwrap(), gpu.read(&lg.gamma, 0, c).unwrap(), gpu.read(&lg.beta, 0, c).unwrap()] } else { vec![] };
                (l, grads)
            };
            let (_, gr) = run(&x, &gm, &bt, true);
            // f64 reference: dh = e + cy·W2, then the LayerNorm backward formula.
            let mut want_dx = vec![0f64; m * c];
            let (mut want_dg, mut want_db) = (vec![0f64; c], vec![0f64; c]);
            for r in 0..m {
                let row: Vec<f64> = x[r * c..(r + 1) * c].iter().map(|&v| v as f64).collect();
                let mu = row.iter().sum::<f64>() / c as f64;
                let rstd = 1.0 / (row.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / c as f64 + 1e-5).sqrt();
                let xh: Vec<f64> = row.iter().map(|v| (v - mu) * rstd).collect();
                let dh: Vec<f64> = (0..c).map(|j| e[r * c + j] as f64 + (0..n).map(|o| cy[r * n + o] as f64 * w2[o * c + j] as f64).sum::<f64>()).collect();
                let gg: Vec<f64> = (0..c).map(|j| dh[j] * gm[j] as f64).collect();
                let (mg, mgx) = (gg.iter().sum::<f64>() / c as f64, gg.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / c as f64);
                for j in 0..c {
                    want_dx[r * c + j] = rstd * (gg[j] - mg - xh[j] * mgx);
                    want_dg[j] += dh[j] * xh[j];
                    want_db[j] += dh[j];
                }
            }
            let what = format!("m{m} c{c}");
            assert_close(&format!("{what} LN dx"), &gr[0], &want_dx, 1e-4, 1e-3);
            assert_close(&format!("{what} LN dgamma"), &gr[1], &want_dg, 1e-4, 1e-4);
            assert_close(&format!("{what} LN dbeta"), &gr[2], &want_db, 1e-4, 1e-4);
            // Finite differences through the engine's forward.
            for i in [0, (m * c) / 2, m * c - 1] {
                close(&format!("{what} LN dx[{i}]"), fd(&x, i, 1e-2, &|p| run(p, &gm, &bt, false).0), gr[0][i] as f64, 1e-2);
            }
            for i in [0, c - 1] {
                close(&format!("{what} LN dgamma[{i}]"), fd(&gm, i, 1e-2, &|p| run(&x, p, &bt, false).0), gr[1][i] as f64, 1e-2);
                close(&format!("{what} LN dbeta[{i}]"), fd(&bt, i, 1e-2, &|p| run(&x, &gm, p, false).0), gr[2][i] as f64, 1e-2);
            }
        }
    }
}

/// logits = h·Wᵀ; L = mean over rows of cross-entropy against smoothed targets.
#[test]
fn softmax_cross_entropy_mid_graph() {
    let gpu = gpu();
    for &(m, k, classes) in &[(3, 5, 10), (2, 4, 1000), (1, 1, 2)] {
        let (h, w) = (randn(m * k, 1), randn(classes * k, 2));
        // Label smoothing 0.1 on labels r % classes.
        let smooth = 0.1f32;
        let t: Vec<f32> = (0..m * classes).map(|i| smooth / classes as f32 + if i % classes == (i / classes) % classes { 1.0 - smooth } else { 0.0 }).collect();
        let run = |w: &[f32], backward: bool| -> (f64, Vec<f32>, Vec<f32>) {
            let l = Linear::with_kind(&gpu, "head", w, None, classes, k, MatmulKind::Buffer).unwrap();
            let grad = LinearGrad::new(&gpu, "head", &l).unwrap();
            let mut g = Graph::new(gpu.clone());
            let hi = g.pinned("h", m * k);
            let logits = g.pinned("logits", m * classes);
            let ti = g.pinned("t", m * classes);
            linear(&mut g, "head", hi, m, &l, Act::None, Out::Into(logits)).unwrap();
            let (d, loss) = softmax_xent(&mut g, "xent", logits, ti, m, classes, 1.0 / m as f32).unwrap();
            if backward {
                linear_backward(&mut g, "head", hi, d, m, &l, &grad, None).unwrap();
            }
            let plan = g.compile().unwrap();
            plan.write(hi, &h).unwrap();
            plan.write(ti, &t).unwrap();
            plan.run().unwrap();
            let lrows = plan.read(loss).unwrap();
            let lg = plan.read(logits).unwrap();
            let dw = if backward { gpu.read(&grad.w, 0, k * classes.div_ceil(4) * 4).unwrap() } else { vec![] };
            (lrows.iter().map(|&v| v as f64).sum::<f64>() / m as f64, lg, dw)
        };
        let (loss, lg, dw) = run(&w, true);
        // f64 loss from the GPU logits.
        let mut want = 0f64;
        for r in 0..m {
            let row: Vec<f64> = lg[r * classes..(r + 1) * classes].iter().map(|&v| v as f64).collect();
            let mx = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = mx + row.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
            want += (0..classes).map(|j| t[r * classes + j] as f64 * (lse - row[j])).sum::<f64>() / m as f64;
        }
        assert!((loss - want).abs() < 1e-5 * (1.0 + want.abs()), "xent loss {loss} vs {want}");
        let np = classes.div_ceil(4) * 4;
        for i in [0, classes * k / 2, classes * k - 1] {
            close(&format!("xent m{m} C{classes} dW[{i}]"), fd(&w, i, 1e-2, &|p| run(p, false).0), dw[(i % k) * np + i / k] as f64, 1e-2);
        }
    }
}

use cvt_gpu::ops::attention::{attention_backward, attention_train, AttnGrad, AttnShape};

/// q = x·Wqᵀ; o = attention(q, k, v); L = Σ c·o + Σ e·q. Attention backward mid-graph.
#[test]
fn attention_backward_mid_graph() {
    // Texture variants: K, V / Q, dO read from textures (packed for c = 8, 16, 4;
    // copied for c = 64); buffer variants: every operand from buffers. Both with the
    // probabilities recomputed and saved by the forward (whose operand path then
    // follows the adapter's, so both saving forwards are covered).
    // The texture kernels run in workgroups of 8 (CPU drivers) and, in the last case, 64 (GPUs).
    let cases = [
        (gpu_texture_variants(), AttnGrad::Recompute, 8),
        (gpu_buffer_variants(), AttnGrad::Recompute, 8),
        (gpu_texture_variants(), AttnGrad::Saved, 8),
        (gpu_buffer_variants(), AttnGrad::Saved, 8),
        (gpu_texture_variants(), AttnGrad::Saved, 64),
    ];
    for (gpu, grad, wg) in cases {
        let fwd_kind = if grad == AttnGrad::Saved { gpu.profile().matmul() } else { MatmulKind::Buffer };
        // The last case's images (4101 rows of 256 bytes) pass TEXTURE_CHUNK_BYTES / 2:
        // one image per texture chunk, so P and dS are indexed across chunks, and an
        // image's P (2·4101·3 floats) is not whole texels, so chunks start mid-texel.
        // (1, 50, 40, ..): whole tiles of 64 queries and of 64 keys in the GPU set.
        for &(batch, tq, tkv, c, heads) in &[(2, 5, 3, 8, 2), (1, 9, 9, 16, 1), (1, 1, 1, 4, 1), (3, 7, 4, 64, 1), (3, 4101, 3, 64, 2), (1, 50, 40, 64, 1)] {
            let shape = AttnShape { batch, tq, tkv, c, heads, scale: (c as f32).powf(-0.5) * 2.0 };
            let (x, wq, k, v) = (randn(batch * tq * c, 1), randn(c * c, 2), randn(batch * tkv * c, 3), randn(batch * tkv * c, 4));
            let (co, e) = (randn(batch * tq * c, 5), randn(batch * tq * c, 6));
            let m = batch * tq;
            let run = |x: &[f32], wq: &[f32], k: &[f32], v: &[f32], backward: bool| -> (f64, Vec<Vec<f32>>) {
                let lq = Linear::with_kind(&gpu, "wq", wq, None, c, c, MatmulKind::Buffer).unwrap();
                let mut g = Graph::new(gpu.clone());
                g.profile.attn_wg = wg;
                let (xi, ki, vi) = (g.pinned("x", x.len()), g.pinned("k", k.len()), g.pinned("v", v.len()));
                let qi = g.pinned("q", m * c);
                linear(&mut g, "wq", xi, m, &lq, Act::None, Out::Into(qi)).unwrap();
                let (o_tmp, saved) = attention_train(&mut g, "attn", (qi, ki, vi), shape, grad, fwd_kind).unwrap();
                g.pin(o_tmp);
                let dout = g.pinned("dout", m * c);
                let mut outs = vec![];
                if backward {
                    let (dq, dk, dv) = attention_backward(&mut g, "attn", (qi, ki, vi, o_tmp), saved, dout, shape).unwrap();
                    outs = vec![dq, dk, dv];
                    outs.iter().for_each(|&t| g.pin(t));
                }
                let plan = g.compile().unwrap();
                plan.write(xi, x).unwrap();
                plan.write(ki, k).unwrap();
                plan.write(vi, v).unwrap();
                plan.write(dout, &co).unwrap();
                plan.run().unwrap();
                let qv = plan.read(qi).unwrap();
                let ov = plan.read(o_tmp).unwrap();
                let l = ov.iter().zip(&co).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() + qv.iter().zip(&e).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
                let mut grads: Vec<Vec<f32>> = outs.iter().map(|&t| plan.read(t).unwrap()).collect();
                if backward {
                    grads.push(qv);
                }
                (l, grads)
            };
            let (_, gr) = run(&x, &wq, &k, &v, true);
            let (dq, dk, dv, qv) = (&gr[0], &gr[1], &gr[2], &gr[3]);
            // f64 reference from the GPU's q.
            let d = c / heads;
            let (mut wdq, mut wdk, mut wdv) = (vec![0f64; m * c], vec![0f64; batch * tkv * c], vec![0f64; batch * tkv * c]);
            for b in 0..batch {
                for h in 0..heads {
                    for i in 0..tq {
                        let qrow = |e: usize| qv[(b * tq + i) * c + h * d + e] as f64;
                        let s: Vec<f64> = (0..tkv).map(|j| (0..d).map(|e| qrow(e) * k[(b * tkv + j) * c + h * d + e] as f64).sum::<f64>() * shape.scale as f64).collect();
                        let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                        let z: f64 = s.iter().map(|v| (v - mx).exp()).sum();
                        let p: Vec<f64> = s.iter().map(|v| (v - mx).exp() / z).collect();
                        let go = |e: usize| co[(b * tq + i) * c + h * d + e] as f64;
                        let dp: Vec<f64> = (0..tkv).map(|j| (0..d).map(|e| go(e) * v[(b * tkv + j) * c + h * d + e] as f64).sum()).collect();
                        let dd: f64 = (0..tkv).map(|j| p[j] * dp[j]).sum();
                        for j in 0..tkv {
                            let ds = p[j] * (dp[j] - dd) * shape.scale as f64;
                            for e in 0..d {
                                wdq[(b * tq + i) * c + h * d + e] += ds * k[(b * tkv + j) * c + h * d + e] as f64;
                                wdk[(b * tkv + j) * c + h * d + e] += ds * qrow(e);
                                wdv[(b * tkv + j) * c + h * d + e] += p[j] * go(e);
                            }
                        }
                    }
                }
            }
            let what = format!("{grad:?} b{batch} tq{tq} tkv{tkv} c{c} h{heads}");
            assert_close(&format!("{what} dq"), dq, &wdq, 1e-4, 1e-3);
            assert_close(&format!("{what} dk"), dk, &wdk, 1e-4, 1e-3);
            assert_close(&format!("{what} dv"), dv, &wdv, 1e-4, 1e-3);
            // Finite differences through the engine's forward, on k, v and x (via Wq·x).
            for i in [0, k.len() / 2, k.len() - 1] {
                close(&format!("{what} dk[{i}]"), fd(&k, i, 1e-2, &|p| run(&x, &wq, p, &v, false).0), dk[i] as f64, 1e-2);
                close(&format!("{what} dv[{i}]"), fd(&v, i, 1e-2, &|p| run(&x, &wq, &k, p, false).0), dv[i] as f64, 1e-2);
            }
        }
    }
}

use cvt_gpu::ops::matmul::{conv2d, conv2d_backward};
use cvt_gpu::ops::ConvGeom;

/// y = conv(x) on a token map (with a cls token slot); L = Σ c·y + Σ e·x.
#[test]
fn conv_backward_mid_graph() {
    // Both kernel families: packed texture GEMMs / row-per-invocation norms, and
    // buffer GEMMs / workgroup-per-row norms.
    for gpu in [gpu_texture_variants(), gpu_buffer_variants()] {
        // cin a multiple of 4 takes the vec4 im2col/col2im on linear textures in the texture family;
        // (2, 8, 6, 3, ..) the RGB im2col4 (whole images of whole texels) and a K of 147
        // read by the GEMM straight from the zero-padded im2col matrix (4 rows of output).
        for &(batch, h, w, cin, cout, k, s, p, cls) in
            &[(2, 7, 6, 3, 5, 7, 4, 2, 0), (2, 8, 6, 3, 5, 7, 4, 2, 0), (1, 5, 5, 4, 3, 3, 2, 1, 1), (1, 1, 1, 2, 2, 3, 2, 1, 0), (2, 5, 4, 8, 4, 3, 1, 1, 0)]
        {
            let tokens = cls + h * w;
            let geom = ConvGeom { batch, in_h: h, in_w: w, cin, in_tokens: tokens, in_tok_off: cls, k, stride: s, pad: p };
            let (oh, ow) = geom.out_hw();
            let (x, wt, b) = (randn(batch * tokens * cin, 1), randn(cout * cin * k * k, 2), randn(cout, 3));
            let (cy, e) = (randn(batch * oh * ow * cout, 4), randn(batch * tokens * cin, 5));
            let run = |x: &[f32], wt: &[f32], backward: bool| -> (f64, Vec<Vec<f32>>) {
                let l = Linear::conv_with_kind(&gpu, "conv", wt, Some(&b), cout, cin, k, k, MatmulKind::Buffer).unwrap();
                let grad = LinearGrad::new(&gpu, "conv", &l).unwrap();
                let mut g = Graph::new(gpu.clone());
                let xi = g.pinned("x", x.len());
                let y = conv2d(&mut g, "conv", xi, geom, &l).unwrap();
                g.pin(y);
                let dy = g.pinned("dy", cy.len());
                let dx = g.pinned("dx", e.len());
                if backward {
                    conv2d_backward(&mut g, "conv", xi, dy, geom, &l, &grad, Some(dx)).unwrap();
                }
                let plan = g.compile().unwrap();
                plan.write(xi, x).unwrap();
                plan.write(dy, &cy).unwrap();
                plan.write(dx, &e).unwrap();
                plan.run().unwrap();
                let yv = plan.read(y).unwrap();
                let l_val = yv.iter().zip(&cy).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() + x.iter().zip(&e).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
                let np = cout.div_ceil(4) * 4;
                let grads = if backward { vec![plan.read(dx).unwrap(), gpu.read(&grad.w, 0, cin * k * k * np).unwrap(), gpu.read(&grad.b, 0, np).unwrap()] } else { vec![] };
                (l_val, grads)
            };
            let (_, gr) = run(&x, &wt, true);
            let np = cout.div_ceil(4) * 4;
            // f64 reference by the definition of the convolution.
            let mut wdx: Vec<f64> = e.iter().map(|&v| v as f64).collect();
            let mut wdw = vec![0f64; cin * k * k * np];
            let mut wdb = vec![0f64; np];
            for bi in 0..batch {
                for oy in 0..oh {
                    for ox in 0..ow {
                        for o in 0..cout {
                            let gy = cy[((bi * oh + oy) * ow + ox) * cout + o] as f64;
                            wdb[o] += gy;
                            for ci in 0..cin {
                                for ky in 0..k {
                                    for kx in 0..k {
                                        let iy = (oy * s + ky) as isize - p as isize;
                                        let ix = (ox * s + kx) as isize - p as isize;
                                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                            continue;
                                        }
                                        let t = bi * tokens + cls + iy as usize * w + ix as usize;
                                        wdx[t * cin + ci] += gy * wt[((o * cin + ci) * k + ky) * k + kx] as f64;
                                        wdw[((ky * k + kx) * cin + ci) * np + o] += gy * x[t * cin + ci] as f64;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            let what = format!("{geom:?}");
            assert_close(&format!("conv dx {what}"), &gr[0], &wdx, 1e-4, 1e-4);
            assert_close(&format!("conv dW {what}"), &gr[1], &wdw, 1e-4, 1e-4);
            assert_close(&format!("conv db {what}"), &gr[2], &wdb, 1e-4, 1e-4);
            for i in [0, x.len() / 2, x.len() - 1] {
                close(&format!("conv dx[{i}]"), fd(&x, i, 1e-2, &|q| run(q, &wt, false).0), gr[0][i] as f64, 5e-3);
            }
            for i in [0, wt.len() / 2, wt.len() - 1] {
                // PyTorch [cout, cin, k, k] index -> stored [(ky*k+kx)*cin+ci, np].
                let (o, ci, ky, kx) = (i / (cin * k * k), (i / (k * k)) % cin, (i / k) % k, i % k);
                close(&format!("conv dW[{i}]"), fd(&wt, i, 1e-2, &|q| run(&x, q, false).0), gr[1][((ky * k + kx) * cin + ci) * np + o] as f64, 5e-3);
            }
        }
    }
}

use cvt_gpu::ops::optim::{adamw_step, AdamW, Hyper, Moments};
use std::sync::Arc;

/// Parameters after 3 AdamW steps equal torch.optim.AdamW's (fixture from
/// make_fixtures.py), with and without weight decay.
#[test]
fn adamw_matches_torch() {
    let gpu = gpu();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels-tests/reference/fixtures/optim/adamw.json");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let vecf = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<f32>>();
    let p0 = vecf(&j["p0"]);
    let grads: Vec<Vec<f32>> = j["grads"].as_array().unwrap().iter().map(vecf).collect();
    let o = AdamW { lr: j["lr"].as_f64().unwrap() as f32, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: j["weight_decay"].as_f64().unwrap() as f32 };
    // AdamW is elementwise, so the first 12 values are a 12-value tensor's
    // result: 13 takes the scalar kernel, 12 the vec4 one.
    for (decay, key, n) in [(true, "decay", 13), (false, "no_decay", 13), (true, "decay", 12), (false, "no_decay", 12)] {
        let grads: Vec<Vec<f32>> = grads.iter().map(|g| g[..n].to_vec()).collect();
        for (step, got) in run_adamw(&gpu, &p0[..n], &grads, &o, decay, 1.0).iter().enumerate() {
            let want: Vec<f64> = j[key][step].as_array().unwrap().iter().take(n).map(|x| x.as_f64().unwrap()).collect();
            // Both sides are f32; torch's and our operation order differ slightly.
            assert_close(&format!("adamw {key} n{n} step {}", step + 1), got, &want, 1e-6, 1e-5);
        }
    }
}

/// The parameter after each AdamW step, one step per gradient in `grads`.
fn run_adamw(gpu: &Arc<cvt_gpu::gpu::Gpu>, p0: &[f32], grads: &[Vec<f32>], o: &AdamW, decay: bool, grad_scale: f32) -> Vec<Vec<f32>> {
    let param = Arc::new(gpu.upload("p", p0).unwrap());
    let grad = Arc::new(gpu.upload("g", &grads[0]).unwrap());
    let state = Moments::zeros(gpu, "p", p0.len()).unwrap();
    let hyper = Hyper::new(gpu).unwrap();
    let mut g = Graph::new(gpu.clone());
    adamw_step(&mut g, "adamw", &param, &grad, &state, &hyper, decay).unwrap();
    let plan = g.compile().unwrap();
    let mut out = vec![];
    for (step, gr) in grads.iter().enumerate() {
        gpu.queue.write_buffer(&grad, 0, bytemuck::cast_slice(gr));
        hyper.set(gpu, o, o.lr, step as u64 + 1, grad_scale);
        plan.run().unwrap();
        out.push(gpu.read(&param, 0, p0.len()).unwrap());
    }
    out
}

/// AdamW on a tensor large enough for the texture path (`adamw4_tex`, inputs read
/// from linear textures in 2 MiB chunks: this one crosses a chunk boundary) and
/// through the buffer kernel, both against the update computed on the CPU in f64.
#[test]
fn adamw_large_tensors_match_cpu_on_both_paths() {
    let n = 4 * (131_072 + 1_000);
    let p0 = randn(n, 31);
    let grads = [randn(n, 32), randn(n, 33)];
    let o = AdamW { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 };
    // The reference, step by step (optim.wgsl's formula; grad scale 0.5).
    let (mut w, mut m, mut v): (Vec<f64>, Vec<f64>, Vec<f64>) = (p0.iter().map(|&x| x as f64).collect(), vec![0.0; n], vec![0.0; n]);
    let mut want = vec![];
    for (step, gr) in grads.iter().enumerate() {
        let t = step as i32 + 1;
        let (bc1, bc2) = (1.0 - 0.9f64.powi(t), 1.0 - 0.999f64.powi(t));
        for i in 0..n {
            let g = gr[i] as f64 * 0.5;
            w[i] *= 1.0 - 0.01 * 0.05;
            m[i] = 0.9 * m[i] + 0.1 * g;
            v[i] = 0.999 * v[i] + 0.001 * g * g;
            w[i] -= (0.01 / bc1) * m[i] / (v[i].sqrt() / bc2.sqrt() + 1e-8);
        }
        want.push(w.clone());
    }
    for (which, gpu) in [("textures", gpu_texture_variants()), ("buffers", gpu_buffer_variants())] {
        for (step, got) in run_adamw(&gpu, &p0, &grads, &o, true, 0.5).iter().enumerate() {
            assert_close(&format!("adamw ({which}) step {}", step + 1), got, &want[step], 1e-6, 1e-5);
        }
    }
}

/// Σ grad² for clipping's global norm: each tensor's partial sums (one workgroup
/// for a bias, up to 64 for a large weight) in consecutive slots after another
/// tensor's, against f64.
#[test]
fn sumsq_partials_match_f64() {
    use cvt_gpu::ops::optim::{sumsq, sumsq_slots};
    let gpu = gpu();
    let lens = [1usize, 63, 1025, 70_001, 4_000_003];
    let total: usize = lens.iter().map(|&n| sumsq_slots(n)).sum();
    assert!(sumsq_slots(4_000_003) == 64 && sumsq_slots(1) == 1, "slots {total}");
    let norms = Arc::new(gpu.storage("norms", (total * 4) as u64).unwrap());
    let mut g = Graph::new(gpu.clone());
    let mut want = vec![];
    let mut slot = 0;
    for (i, &n) in lens.iter().enumerate() {
        let v = randn(n, 70 + i as u64);
        want.push(v.iter().map(|&x| x as f64 * x as f64).sum::<f64>());
        let buf = Arc::new(gpu.upload("grad", &v).unwrap());
        sumsq(&mut g, &format!("t{i}"), &buf, n, &norms, slot).unwrap();
        slot += sumsq_slots(n);
    }
    g.compile().unwrap().run().unwrap();
    let got = gpu.read(&norms, 0, total).unwrap();
    let mut slot = 0;
    for (i, &n) in lens.iter().enumerate() {
        let k = sumsq_slots(n);
        let s: f64 = got[slot..slot + k].iter().map(|&x| x as f64).sum();
        close(&format!("sumsq of {n}"), s, want[i], 1e-5);
        slot += k;
    }
}

use cvt_gpu::ops::dwconv::{conv_proj_train, conv_proj_train_backward, kv_hw, BatchNorm, ConvProjGrad, ConvProjTrain};

/// Convolutional projection with train-mode BatchNorm: forward against f64
/// (batch statistics, running-statistics update with the unbiased variance), and
/// gradients of x, the depthwise weights, γ and β against finite differences of
/// the engine's train-mode forward; L = Σ c·(q, k, v) + Σ e·x.
#[test]
fn conv_projection_train_bn() {
    // Texture variants read x, the gradients and the weights as texels (c = 64: copied
    // rows; else packed); buffer variants read buffers. c = 72: 18 channel groups,
    // more than one 16-lane workgroup of the CPU drivers' BatchNorm kernels (CPL).
    // 3x7x9: 189 rows over 48 partials of 3 or 4 rows in the GPU set's statistics.
    for gpu in [gpu_texture_variants(), gpu_buffer_variants()] {
        for &(batch, h, w, c, cls) in &[(2, 4, 5, 4, 1), (1, 3, 3, 8, 0), (2, 3, 2, 64, 1), (1, 3, 2, 72, 1), (3, 7, 9, 8, 1)] {
            let tq = cls + h * w;
            let (hk, wk) = kv_hw(h, w);
            let tk = cls + hk * wk;
            let x = randn(batch * tq * c, 1);
            let convs: Vec<Vec<f32>> = (0..3).map(|i| randn(9 * c, 10 + i)).collect();
            let gam: Vec<Vec<f32>> = (0..3).map(|i| randn(c, 20 + i).iter().map(|v| 1.0 + 0.3 * v).collect()).collect();
            let bet: Vec<Vec<f32>> = (0..3).map(|i| randn(c, 30 + i)).collect();
            let rm: Vec<f32> = randn(c, 40);
            let rv: Vec<f32> = randn(c, 41).iter().map(|v| 0.5 + v.abs()).collect();
            let cs: Vec<Vec<f32>> = [tq, tk, tk].iter().enumerate().map(|(i, &t)| randn(batch * t * c, 50 + i as u64)).collect();
            let e = randn(x.len(), 60);
            // Runs the train forward (and backward); returns L, the maps, running stats and grads.
            let run = |x: &[f32], convs: &[Vec<f32>], gam: &[Vec<f32>], bet: &[Vec<f32>], backward: bool| {
                let bn = |i: usize| BatchNorm { weight: &gam[i], bias: &bet[i], mean: &rm, var: &rv };
                let p = ConvProjTrain::new(&gpu, "p", [&convs[0], &convs[1], &convs[2]], [bn(0), bn(1), bn(2)], c).unwrap();
                let grad = ConvProjGrad::new(&gpu, "p", c).unwrap();
                let mut g = Graph::new(gpu.clone());
                let xi = g.pinned("x", x.len());
                let ((q, k, v), saved) = conv_proj_train(&mut g, "proj", xi, batch, h, w, cls, &p).unwrap();
                for t in [q, k, v] {
                    g.pin(t);
                }
                let d: Vec<_> = cs.iter().enumerate().map(|(i, cv)| g.pinned(format!("d{i}"), cv.len())).collect();
                let mut dx = None;
                if backward {
                    let t = conv_proj_train_backward(&mut g, "proj", xi, &saved, (d[0], d[1], d[2]), batch, h, w, cls, &p, &grad).unwrap();
                    g.pin(t);
                    dx = Some(t);
                }
                let plan = g.compile().unwrap();
                plan.write(xi, x).unwrap();
                for (i, cv) in cs.iter().enumerate() {
                    plan.write(d[i], cv).unwrap();
                }
                plan.run().unwrap();
                let maps: Vec<Vec<f32>> = [q, k, v].iter().map(|&t| plan.read(t).unwrap()).collect();
                let l: f64 = maps.iter().zip(&cs).map(|(m, cv)| m.iter().zip(cv).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()).sum::<f64>()
                    + x.iter().zip(&e).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
                let running: Vec<Vec<f32>> = p.bn.iter().map(|b| gpu.read(&b.running, 0, 2 * c).unwrap()).collect();
                let grads = if backward {
                    let mut gr = vec![plan.read(dx.unwrap()).unwrap(), gpu.read(&grad.w, 0, 27 * c).unwrap()];
                    gr.extend((0..3).map(|m| [gpu.read(&grad.gamma[m], 0, c).unwrap(), gpu.read(&grad.beta[m], 0, c).unwrap()].concat()));
                    gr
                } else {
                    vec![]
                };
                (l, maps, running, grads)
            };
            let (_, maps, running, gr) = run(&x, &convs, &gam, &bet, true);
            // f64 forward reference.
            for (mi, (stride, oh, ow, t)) in [(1, h, w, tq), (2, hk, wk, tk), (2, hk, wk, tk)].into_iter().enumerate() {
                let pre = depthwise_ref(&x, &convs[mi], (batch, h, w, c, cls), stride);
                let n = (batch * oh * ow) as f64;
                let mut want = vec![0f64; batch * t * c];
                for ch in 0..c {
                    let vals: Vec<f64> = (0..batch).flat_map(|bi| (0..oh * ow).map(move |i| (bi, i))).map(|(bi, i)| pre[(bi * t + cls + i) * c + ch]).collect();
                    let mu = vals.iter().sum::<f64>() / n;
                    let var = vals.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / n;
                    for bi in 0..batch {
                        if cls == 1 {
                            want[bi * t * c + ch] = x[bi * tq * c + ch] as f64;
                        }
                        for i in 0..oh * ow {
                            let r = (bi * t + cls + i) * c + ch;
                            want[r] = (pre[r] - mu) / (var + 1e-5).sqrt() * gam[mi][ch] as f64 + bet[mi][ch] as f64;
                        }
                    }
                    let unbiased = if n > 1.0 { var * n / (n - 1.0) } else { var };
                    let (wm, wv) = (0.9 * rm[ch] as f64 + 0.1 * mu, 0.9 * rv[ch] as f64 + 0.1 * unbiased);
                    assert!(
                        (running[mi][ch] as f64 - wm).abs() < 1e-5 && (running[mi][c + ch] as f64 - wv).abs() < 1e-4 * (1.0 + wv),
                        "running stats map {mi} ch {ch}: {:?} vs ({wm}, {wv})",
                        (running[mi][ch], running[mi][c + ch])
                    );
                }
                assert_close(&format!("train BN map {mi}"), &maps[mi], &want, 1e-4, 1e-3);
            }
            // Gradients against finite differences of the train-mode forward.
            let what = format!("b{batch} {h}x{w} c{c} cls{cls}");
            for i in [0, x.len() / 2, x.len() - 1] {
                let num = fd(&x, i, 1e-2, &|p| run(p, &convs, &gam, &bet, false).0);
                close(&format!("{what} dx[{i}]"), num, gr[0][i] as f64 + e[i] as f64, 1e-2);
            }
            for mi in 0..3 {
                // Every tap of channel 0 (each tap has its own accumulator), and the last weight.
                for i in (0..9).chain([9 * c - 1]) {
                    let num = fd(&convs[mi], i, 1e-2, &|p| {
                        let mut cv = convs.clone();
                        cv[mi] = p.to_vec();
                        run(&x, &cv, &gam, &bet, false).0
                    });
                    // PyTorch [C, 1, 3, 3] index i = ch*9 + tap -> stored (m*9 + tap)*C + ch.
                    close(&format!("{what} dW map {mi} [{i}]"), num, gr[1][(mi * 9 + i % 9) * c + i / 9] as f64, 1e-2);
                }
                for ch in [0, c - 1] {
                    let ng = fd(&gam[mi], ch, 1e-2, &|p| {
                        let mut gv = gam.clone();
                        gv[mi] = p.to_vec();
                        run(&x, &convs, &gv, &bet, false).0
                    });
                    close(&format!("{what} dgamma map {mi} [{ch}]"), ng, gr[2 + mi][ch] as f64, 1e-2);
                    let nb = fd(&bet[mi], ch, 1e-2, &|p| {
                        let mut bv = bet.clone();
                        bv[mi] = p.to_vec();
                        run(&x, &convs, &gam, &bv, false).0
                    });
                    close(&format!("{what} dbeta map {mi} [{ch}]"), nb, gr[2 + mi][c + ch] as f64, 1e-2);
                }
            }
        }
    }
}

/// LayerNorm backward through the two mapped uses in CvT: the final norm on the
/// cls rows (gather) and the token-embedding norm writing below the cls slot
/// (scatter); plus the cls parameter's gradient.
#[test]
fn layernorm_backward_gather_scatter_and_cls_grad() {
    // Both kernel families: packed texture GEMMs / row-per-invocation norms, and
    // buffer GEMMs / workgroup-per-row norms.
    for gpu in [gpu_texture_variants(), gpu_buffer_variants()] {
        let (b, t, c) = (3, 5, 6);
        let x: Vec<f32> = randn(b * t * c, 1);
        let (gm, bt) = (randn(c, 2), randn(c, 3));
        let ln = LayerNorm::new(&gpu, "ln", &gm, &bt).unwrap();
        let reference = |xr: &[f64], dy: &[f64]| -> (Vec<f64>, Vec<f64>) {
            let n = xr.len() as f64;
            let mu = xr.iter().sum::<f64>() / n;
            let rstd = 1.0 / (xr.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / n + 1e-5).sqrt();
            let xh: Vec<f64> = xr.iter().map(|v| (v - mu) * rstd).collect();
            let gg: Vec<f64> = dy.iter().zip(&gm).map(|(d, g)| d * *g as f64).collect();
            let (mg, mgx) = (gg.iter().sum::<f64>() / n, gg.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / n);
            ((0..xr.len()).map(|j| rstd * (gg[j] - mg - xh[j] * mgx)).collect(), xh)
        };
        // Gather: rows b*t + 0 of x -> dense [b, c] output (the final norm).
        let gather = RowMap { rows: b, group: 1, in_stride: t, in_off: 0, out_stride: 1, out_off: 0 };
        // Scatter: dense [b*(t-1), c] input -> rows b*t + 1 + i of the output (embedding norm).
        let scatter = RowMap { rows: b * (t - 1), group: t - 1, in_stride: t - 1, in_off: 0, out_stride: t, out_off: 1 };
        for (name, map, in_len, out_len) in [("gather", gather, b * t * c, b * c), ("scatter", scatter, b * (t - 1) * c, b * t * c)] {
            let xin = &x[..in_len];
            let dy = randn(out_len, 4);
            let lg = LayerNormGrad::new(&gpu, "ln", c).unwrap();
            let mut g = Graph::new(gpu.clone());
            let xi = g.pinned("x", in_len);
            let dyi = g.pinned("dy", out_len);
            let dx = g.pinned("dx", in_len);
            layernorm_backward(&mut g, name, xi, dyi, map, &ln, &lg, Some(dx)).unwrap();
            let plan = g.compile().unwrap();
            plan.write(xi, xin).unwrap();
            plan.write(dyi, &dy).unwrap();
            plan.write(dx, &vec![7.0; in_len]).unwrap();
            plan.run().unwrap();
            let mut want_dx = vec![7.0f64; in_len];
            let (mut want_dg, mut want_db) = (vec![0f64; c], vec![0f64; c]);
            for r in 0..map.rows {
                let ib = ((r / map.group) * map.in_stride + map.in_off + r % map.group) * c;
                let ob = ((r / map.group) * map.out_stride + map.out_off + r % map.group) * c;
                let xr: Vec<f64> = xin[ib..ib + c].iter().map(|&v| v as f64).collect();
                let dr: Vec<f64> = dy[ob..ob + c].iter().map(|&v| v as f64).collect();
                let (d, xh) = reference(&xr, &dr);
                want_dx[ib..ib + c].copy_from_slice(&d);
                for j in 0..c {
                    want_dg[j] += dr[j] * xh[j];
                    want_db[j] += dr[j];
                }
            }
            assert_close(&format!("{name} dx"), &plan.read(dx).unwrap(), &want_dx, 1e-4, 1e-3);
            assert_close(&format!("{name} dgamma"), &gpu.read(&lg.gamma, 0, c).unwrap(), &want_dg, 1e-4, 1e-4);
            assert_close(&format!("{name} dbeta"), &gpu.read(&lg.beta, 0, c).unwrap(), &want_db, 1e-4, 1e-4);
        }
        // cls parameter gradient: Σ_b token 0.
        let out = std::sync::Arc::new(gpu.storage("dcls", (c * 4) as u64).unwrap());
        let mut g = Graph::new(gpu.clone());
        let xi = g.pinned("x", b * t * c);
        cvt_gpu::ops::tokens::cls_grad(&mut g, "dcls", xi, b, t, c, &out).unwrap();
        let plan = g.compile().unwrap();
        plan.write(xi, &x).unwrap();
        plan.run().unwrap();
        let want: Vec<f64> = (0..c).map(|j| (0..b).map(|bi| x[bi * t * c + j] as f64).sum()).collect();
        assert_close("cls grad", &gpu.read(&out, 0, c).unwrap(), &want, 1e-5, 1e-5);
    }
}

/// The MLP as training builds it: (z, u) = linear_act(x) (z = x·W1ᵀ + b1 kept, u =
/// act(z)), y = u·W2ᵀ + b2, L = Σ c·y; the backward's dz = (dy·W2) ⊙ act'(z) comes
/// from linear_backward_act. On texture-GEMM adapters both are fused into the GEMM
/// epilogues (SAVE_Z, ACT_GRAD); h not a multiple of 4 takes the separate
/// activation-gradient pass.
#[test]
fn mlp_fused_activation_mid_graph() {
    use cvt_gpu::ops::matmul::{linear_act, linear_backward_act};
    for gpu in [gpu_texture_variants(), gpu_buffer_variants()] {
        for &(m, k, h, n) in &[(5usize, 7usize, 6usize, 3usize), (12, 8, 20, 8), (20, 136, 376, 140)] {
            for act in [Act::Gelu, Act::QuickGelu] {
                let (x, w1, b1, w2, b2, c) = (randn(m * k, 1), randn(h * k, 2), randn(h, 3), randn(n * h, 4), randn(n, 5), randn(m * n, 6));
                // Scaled so the activations see z of order 1 (not saturated).
                let w1: Vec<f32> = w1.iter().map(|v| v / (k as f32).sqrt()).collect();
                let run = |x: &[f32], w1: &[f32], backward: bool| -> (f64, Vec<Vec<f32>>) {
                    let l1 = Linear::with_kind(&gpu, "l1", w1, Some(&b1), h, k, MatmulKind::Buffer).unwrap();
                    let l2 = Linear::with_kind(&gpu, "l2", &w2, Some(&b2), n, h, MatmulKind::Buffer).unwrap();
                    let (g1, g2) = (LinearGrad::new(&gpu, "l1", &l1).unwrap(), LinearGrad::new(&gpu, "l2", &l2).unwrap());
                    let mut g = Graph::new(gpu.clone());
                    let xi = g.pinned("x", m * k);
                    let (z, u) = linear_act(&mut g, "fc1", xi, m, &l1, act).unwrap();
                    g.pin(z);
                    g.pin(u);
                    let y = linear(&mut g, "fc2", u, m, &l2, Act::None, Out::New).unwrap();
                    g.pin(y);
                    let dy = g.pinned("dy", m * n);
                    let mut dx = None;
                    let mut dzt = None;
                    if backward {
                        let dz = linear_backward_act(&mut g, "fc2", u, dy, m, &l2, &g2, (z, act)).unwrap();
                        g.pin(dz);
                        dzt = Some(dz);
                        dx = Some(linear_backward(&mut g, "fc1", xi, dz, m, &l1, &g1, None).unwrap());
                        g.pin(dx.unwrap());
                    }
                    let plan = g.compile().unwrap();
                    plan.write(xi, x).unwrap();
                    plan.write(dy, &c).unwrap();
                    plan.run().unwrap();
                    let loss = plan.read(y).unwrap().iter().zip(&c).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let mut out = vec![plan.read(z).unwrap(), plan.read(u).unwrap()];
                    if backward {
                        let (np1, np2) = (h.div_ceil(4) * 4, n.div_ceil(4) * 4);
                        out.extend([plan.read(dzt.unwrap()).unwrap(), plan.read(dx.unwrap()).unwrap(), gpu.read(&g1.w, 0, k * np1).unwrap(), gpu.read(&g2.w, 0, h * np2).unwrap()]);
                    }
                    (loss, out)
                };
                let (_, got) = run(&x, &w1, true);
                // f64 reference.
                let (xd, w1d, b1d, w2d, cd) = (f64s(&x), f64s(&w1), f64s(&b1), f64s(&w2), f64s(&c));
                let zd = lin(&xd, &w1d, &b1d, m, h, k);
                let ud: Vec<f64> = zd.iter().map(|&z| act64(act, z)).collect();
                let dud: Vec<f64> = (0..m * h).map(|i| (0..n).map(|o| cd[(i / h) * n + o] * w2d[o * h + i % h]).sum()).collect();
                let dzd: Vec<f64> = (0..m * h).map(|i| dud[i] * (act64(act, zd[i] + 1e-6) - act64(act, zd[i] - 1e-6)) / 2e-6).collect();
                let dxd: Vec<f64> = (0..m * k).map(|i| (0..h).map(|j| dzd[(i / k) * h + j] * w1d[j * k + i % k]).sum()).collect();
                let np1 = h.div_ceil(4) * 4;
                let dw1d: Vec<f64> = (0..k * np1).map(|i| if i % np1 >= h { 0.0 } else { (0..m).map(|r| xd[r * k + i / np1] * dzd[r * h + i % np1]).sum() }).collect();
                let np2 = n.div_ceil(4) * 4;
                let dw2d: Vec<f64> = (0..h * np2).map(|i| if i % np2 >= n { 0.0 } else { (0..m).map(|r| ud[r * h + i / np2] * cd[r * n + i % np2]).sum() }).collect();
                let what = format!("{act:?} m{m} k{k} h{h} n{n}");
                assert_close(&format!("{what} z"), &got[0], &zd, 1e-4, 1e-4);
                assert_close(&format!("{what} u"), &got[1], &ud, 1e-4, 1e-4);
                assert_close(&format!("{what} dz"), &got[2], &dzd, 1e-4, 1e-4);
                assert_close(&format!("{what} dx"), &got[3], &dxd, 1e-4, 1e-4);
                assert_close(&format!("{what} dW1"), &got[4], &dw1d, 1e-4, 1e-4);
                assert_close(&format!("{what} dW2"), &got[5], &dw2d, 1e-4, 1e-4);
                // Finite differences of the engine's own forward (small cases: the
                // wide one's f32 loss is too large to resolve a difference; one
                // activation: the f64 references above check both).
                if k <= 8 && act == Act::QuickGelu {
                    for i in [0, m * k / 2, m * k - 1] {
                        close(&format!("{what} dx[{i}]"), fd(&x, i, 1e-2, &|q| run(q, &w1, false).0), got[3][i] as f64, 5e-3);
                    }
                    for i in [0, h * k / 2, h * k - 1] {
                        close(&format!("{what} dW1[{i}]"), fd(&w1, i, 1e-2, &|q| run(&x, q, false).0), got[4][(i % k) * np1 + i / k] as f64, 5e-3);
                    }
                }
            }
        }
    }
}
