//! ConViT's gated positional self-attention (`ops::gpsa`), in both kernel sets:
//! the forward against an f64 reference written as timm computes it (both
//! softmaxes, the blend, the row renormalisation: not the engine's split form),
//! and the backward against f64 central differences of that reference and
//! against finite differences through the engine's own forward, with GPSA in the
//! middle of a graph (q from a linear layer whose input also feeds the loss).

mod common;
use common::*;

use cvt_gpu::graph::Graph;
use cvt_gpu::ops::attention::AttnGrad;
use cvt_gpu::ops::gpsa::{gpsa, gpsa_backward, gpsa_train, Gpsa, GpsaGrad, GpsaShape};
use cvt_gpu::ops::matmul::{linear, linear_backward, LinearGrad, Out};
use cvt_gpu::ops::{Act, Linear};

/// The layer's positional parameters: pos_proj [H, 3], its bias [H], λ [H].
#[derive(Clone)]
struct Pos {
    w: Vec<f32>,
    b: Vec<f32>,
    gate: Vec<f32>,
}

/// GPSA as timm computes it (convit-spec §2.3), in f64: q, k, v [B, N, C].
fn gpsa_ref(s: &GpsaShape, q: &[f64], k: &[f64], v: &[f64], pos: &Pos) -> Vec<f64> {
    let (n, c, h) = (s.n, s.c, s.heads);
    let d = c / h;
    let gs = (n as f64).sqrt() as usize;
    let scale = (d as f64).powf(-0.5);
    let softmax = |r: &mut Vec<f64>| {
        let m = r.iter().cloned().fold(f64::MIN, f64::max);
        r.iter_mut().for_each(|x| *x = (*x - m).exp());
        let z: f64 = r.iter().sum();
        r.iter_mut().for_each(|x| *x /= z);
    };
    let mut o = vec![0f64; s.batch * n * c];
    for b in 0..s.batch {
        for hh in 0..h {
            let g = 1.0 / (1.0 + (-(pos.gate[hh] as f64)).exp());
            for i in 0..n {
                let mut p: Vec<f64> = (0..n).map(|j| (0..d).map(|e| q[(b * n + i) * c + hh * d + e] * k[(b * n + j) * c + hh * d + e]).sum::<f64>() * scale).collect();
                softmax(&mut p);
                let mut r: Vec<f64> = (0..n)
                    .map(|j| {
                        let dx = (j % gs) as f64 - (i % gs) as f64;
                        let dy = (j / gs) as f64 - (i / gs) as f64;
                        let w = &pos.w[hh * 3..hh * 3 + 3];
                        w[0] as f64 * dx + w[1] as f64 * dy + w[2] as f64 * (dx * dx + dy * dy) + pos.b[hh] as f64
                    })
                    .collect();
                softmax(&mut r);
                let a: Vec<f64> = (0..n).map(|j| (1.0 - g) * p[j] + g * r[j]).collect();
                let z: f64 = a.iter().sum();
                for e in 0..d {
                    o[(b * n + i) * c + hh * d + e] = (0..n).map(|j| a[j] / z * v[(b * n + j) * c + hh * d + e]).sum();
                }
            }
        }
    }
    o
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Positional parameters off their initial values (gates apart from 1, a
/// non-zero bias, centres away from 0) for `h` heads.
fn pos_params(h: usize, seed: u64) -> Pos {
    let w: Vec<f32> = randn(3 * h, seed).iter().enumerate().map(|(i, v)| if i % 3 == 2 { -0.3 - 0.2 * v.abs() } else { *v }).collect();
    Pos { w, b: randn(h, seed + 1).iter().map(|v| 0.5 * v).collect(), gate: randn(h, seed + 2) }
}

/// (batch, n, c, heads): d = 8, 48 and 16; n = 9 (one tile), 49 (two key tiles),
/// 81 (two row blocks of the mix, six 16-wide tiles of dQpos, three key tiles).
const SHAPES: &[(usize, usize, usize, usize)] = &[(2, 9, 16, 2), (1, 16, 48, 1), (2, 49, 32, 2), (1, 81, 64, 4)];

#[test]
fn gpsa_forward_matches_f64_in_both_kernel_sets() {
    for (set, gpu) in [("gpu set", gpu_buffer_variants()), ("cpu set", gpu_texture_variants())] {
        for &(batch, n, c, heads) in SHAPES {
            let s = GpsaShape { batch, n, c, heads };
            let (q, k, v) = (randn(batch * n * c, 1), randn(batch * n * c, 2), randn(batch * n * c, 3));
            let pos = pos_params(heads, 10);
            let layer = Gpsa::new(&gpu, "gpsa", &pos.w, &pos.b, &pos.gate).unwrap();
            let mut g = Graph::new(gpu.clone());
            let (qi, ki, vi) = (g.pinned("q", q.len()), g.pinned("k", k.len()), g.pinned("v", v.len()));
            let kind = g.profile.matmul();
            let o = gpsa(&mut g, "gpsa", (qi, ki, vi), s, &layer, kind).unwrap();
            let plan = g.compile().unwrap();
            plan.write(qi, &q).unwrap();
            plan.write(ki, &k).unwrap();
            plan.write(vi, &v).unwrap();
            plan.run().unwrap();
            let want = gpsa_ref(&s, &f64s(&q), &f64s(&k), &f64s(&v), &pos);
            assert_close(&format!("{set} gpsa b{batch} n{n} c{c} h{heads}"), &plan.read(o).unwrap(), &want, 1e-5, 1e-4);
        }
    }
}

/// The gradients the engine's backward gives: [dx, dk, dv, dpos_w, dpos_b, dgate].
type Grads = Vec<Vec<f32>>;

/// q = x·Wqᵀ; o = GPSA(q, k, v); L = Σ co·o + Σ e·x.
#[test]
fn gpsa_backward_mid_graph() {
    for (set, gpu) in [("gpu set", gpu_buffer_variants()), ("cpu set", gpu_texture_variants())] {
        // All shapes: (1, 81, 64, 4) runs the tiled mix backward over two row
        // blocks at head width 64 (D4 = 16).
        for &(batch, n, c, heads) in SHAPES {
            let s = GpsaShape { batch, n, c, heads };
            let m = batch * n;
            let (x, wq, k, v) = (randn(m * c, 1), randn(c * c, 2).iter().map(|w| w * 0.3).collect::<Vec<_>>(), randn(m * c, 3), randn(m * c, 4));
            let (co, e) = (randn(m * c, 5), randn(m * c, 6));
            let pos = pos_params(heads, 20);
            let run = |x: &[f32], k: &[f32], v: &[f32], pos: &Pos, backward: bool| -> (f64, Grads) {
                let lq = Linear::with_kind(&gpu, "wq", &wq, None, c, c, cvt_gpu::gpu::MatmulKind::Buffer).unwrap();
                let lg = LinearGrad::new(&gpu, "wq", &lq).unwrap();
                let layer = Gpsa::new(&gpu, "gpsa", &pos.w, &pos.b, &pos.gate).unwrap();
                let pg = GpsaGrad::new(&gpu, "gpsa", heads).unwrap();
                let mut g = Graph::new(gpu.clone());
                let (xi, ki, vi) = (g.pinned("x", x.len()), g.pinned("k", k.len()), g.pinned("v", v.len()));
                let qi = g.pinned("q", m * c);
                linear(&mut g, "wq", xi, m, &lq, Act::None, Out::Into(qi)).unwrap();
                let kind = g.profile.matmul();
                let grad = if kind == cvt_gpu::gpu::MatmulKind::Buffer { AttnGrad::Recompute } else { AttnGrad::Saved };
                let (o, saved) = gpsa_train(&mut g, "gpsa", (qi, ki, vi), s, &layer, grad, kind).unwrap();
                g.pin(o);
                let dout = g.pinned("dout", m * c);
                let mut outs = vec![];
                if backward {
                    let (dq, dk, dv) = gpsa_backward(&mut g, "gpsa", (qi, ki, vi), saved, dout, s, &layer, &pg).unwrap();
                    let dx = g.pinned("dx", m * c);
                    linear_backward(&mut g, "wq", xi, dq, m, &lq, &lg, Some(dx)).unwrap();
                    outs = vec![dx, dk, dv];
                    outs.iter().for_each(|&t| g.pin(t));
                }
                let plan = g.compile().unwrap();
                plan.write(xi, x).unwrap();
                plan.write(ki, k).unwrap();
                plan.write(vi, v).unwrap();
                plan.write(dout, &co).unwrap();
                plan.run().unwrap();
                let ov = plan.read(o).unwrap();
                let l = ov.iter().zip(&co).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() + x.iter().zip(&e).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
                let mut grads: Grads = outs.iter().map(|&t| plan.read(t).unwrap()).collect();
                if backward {
                    // dx from the engine is the linear's part only: add e.
                    grads[0].iter_mut().zip(&e).for_each(|(d, e)| *d += e);
                    for (b, len) in [(&pg.pos_w, 3 * heads), (&pg.pos_b, heads), (&pg.gate, heads)] {
                        grads.push(gpu.read(b, 0, len).unwrap());
                    }
                }
                (l, grads)
            };
            let (_, gr) = run(&x, &k, &v, &pos, true);
            // f64 reference gradients: central differences of the f64 loss.
            let loss64 = |x: &[f64], k: &[f64], v: &[f64], pos: &Pos| -> f64 {
                let q: Vec<f64> = (0..m * c).map(|r| (0..c).map(|j| x[(r / c) * c + j] * wq[(r % c) * c + j] as f64).sum()).collect();
                let o = gpsa_ref(&s, &q, k, v, pos);
                o.iter().zip(&co).map(|(a, b)| a * *b as f64).sum::<f64>() + x.iter().zip(&e).map(|(a, b)| a * *b as f64).sum::<f64>()
            };
            let (x64, k64, v64) = (f64s(&x), f64s(&k), f64s(&v));
            let h = 1e-5;
            let cd = |f: &dyn Fn(f64) -> f64| (f(h) - f(-h)) / (2.0 * h);
            let what = format!("{set} b{batch} n{n} c{c} h{heads}");
            for (name, idx, t64) in [("dx", 0, &x64), ("dk", 1, &k64), ("dv", 2, &v64)] {
                // Every entry of small tensors; a spread of 97 of large ones (each is
                // two f64 forwards).
                let at: Vec<usize> = if t64.len() <= 4000 { (0..t64.len()).collect() } else { (0..t64.len()).step_by(t64.len() / 97).collect() };
                let want: Vec<f64> = at
                    .iter()
                    .map(|&i| {
                        cd(&|dh| {
                            let mut t = t64.clone();
                            t[i] += dh;
                            match idx {
                                0 => loss64(&t, &k64, &v64, &pos),
                                1 => loss64(&x64, &t, &v64, &pos),
                                _ => loss64(&x64, &k64, &t, &pos),
                            }
                        })
                    })
                    .collect();
                let got: Vec<f32> = at.iter().map(|&i| gr[idx][i]).collect();
                assert_close(&format!("{what} {name}"), &got, &want, 1e-4, 1e-3);
            }
            // Parameters are f32: difference them on an f32-representable step.
            let pos_fd = |which: usize, i: usize| -> f64 {
                let base = [&pos.w, &pos.b, &pos.gate][which][i];
                let step = 1e-3f32;
                let mut lp = pos.clone();
                [&mut lp.w, &mut lp.b, &mut lp.gate][which][i] = base + step;
                let mut lm = pos.clone();
                [&mut lm.w, &mut lm.b, &mut lm.gate][which][i] = base - step;
                let dstep = (base + step) as f64 - (base - step) as f64;
                (loss64(&x64, &k64, &v64, &lp) - loss64(&x64, &k64, &v64, &lm)) / dstep
            };
            let want_w: Vec<f64> = (0..3 * heads).map(|i| pos_fd(0, i)).collect();
            assert_close(&format!("{what} dpos_proj.weight"), &gr[3], &want_w, 1e-4, 2e-3);
            let want_gate: Vec<f64> = (0..heads).map(|i| pos_fd(2, i)).collect();
            assert_close(&format!("{what} dgating_param"), &gr[5], &want_gate, 1e-4, 2e-3);
            // pos_proj.bias: analytically zero (softmax shift invariance), absolute.
            for (i, &db) in gr[4].iter().enumerate() {
                assert!(db.abs() < 1e-4 && pos_fd(1, i).abs() < 1e-6, "{what} dpos_proj.bias[{i}] = {db}, reference {}", pos_fd(1, i));
            }
            // Finite differences through the engine's forward, mid-graph.
            let fd32 = |t: &[f32], i: usize, f: &dyn Fn(&[f32]) -> f64| {
                let (mut a, mut b) = (t.to_vec(), t.to_vec());
                a[i] += 1e-2;
                b[i] -= 1e-2;
                (f(&a) - f(&b)) / 2e-2
            };
            for i in [0, m * c / 2, m * c - 1] {
                close(&format!("{what} engine dx[{i}]"), fd32(&x, i, &|t| run(t, &k, &v, &pos, false).0), gr[0][i] as f64, 1e-2);
                close(&format!("{what} engine dk[{i}]"), fd32(&k, i, &|t| run(&x, t, &v, &pos, false).0), gr[1][i] as f64, 1e-2);
                close(&format!("{what} engine dv[{i}]"), fd32(&v, i, &|t| run(&x, &k, t, &pos, false).0), gr[2][i] as f64, 1e-2);
            }
            for i in 0..heads {
                let f = |t: &[f32]| run(&x, &k, &v, &Pos { gate: t.to_vec(), ..pos.clone() }, false).0;
                close(&format!("{what} engine dgate[{i}]"), fd32(&pos.gate, i, &f), gr[5][i] as f64, 1e-2);
                let f = |t: &[f32]| run(&x, &k, &v, &Pos { w: t.to_vec(), ..pos.clone() }, false).0;
                close(&format!("{what} engine dpos_w[{}]", 3 * i + 2), fd32(&pos.w, 3 * i + 2, &f), gr[3][3 * i + 2] as f64, 1e-2);
            }
        }
    }
}

fn close(what: &str, num: f64, ana: f64, tol: f64) {
    assert!((num - ana).abs() <= tol * (1.0 + ana.abs()), "{what}: finite difference {num} vs analytic {ana}");
}
