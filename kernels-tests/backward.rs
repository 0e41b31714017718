//! Backward kernels: analytic gradients against an f64 CPU reference, and a
//! finite-difference check through the engine's own forward with the op in the
//! middle of a graph (its output feeds a second op and the loss directly), so a
//! backward that drops an incoming gradient fails.

mod common;
use common::*;

use cvt_gpu::graph::Graph;
use cvt_gpu::gpu::MatmulKind;
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

/// Loss L = Σ c·y + Σ e·h with h = lin1(x), y = lin2(h), on the GPU in f32.
fn gpu_loss(case: &Case, x: &[f32], w1: &[f32], b1: &[f32], w2: &[f32], b2: &[f32], c: &[f32], e: &[f32]) -> f64 {
    let gpu = gpu();
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
    let gpu = gpu();
    for case in [Case { m: 5, k: 7, h: 6, n: 3 }, Case { m: 33, k: 64, h: 20, n: 10 }, Case { m: 1, k: 1, h: 1, n: 1 }] {
        let Case { m, k, h, n } = case;
        let (x, w1, b1, w2, b2) = (randn(m * k, 1), randn(h * k, 2), randn(h, 3), randn(n * h, 4), randn(n, 5));
        let (c, e) = (randn(m * n, 6), randn(m * h, 7));
        // GPU backward: dy = c; dh = e + dy·W2ᵀ; then through l1.
        let l1 = Linear::with_kind(&gpu, "l1", &w1, Some(&b1), h, k, MatmulKind::Buffer).unwrap();
        let l2 = Linear::with_kind(&gpu, "l2", &w2, Some(&b2), n, h, MatmulKind::Buffer).unwrap();
        let (g1, g2) = (LinearGrad::new(&gpu, "l1", &l1).unwrap(), LinearGrad::new(&gpu, "l2", &l2).unwrap());
        let mut g = Graph::new(gpu.clone());
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
        let what = format!("m{m} k{k} h{h} n{n}");
        assert_close(&format!("{what} dx"), &got_dx, &dxd, 1e-4, 1e-4);
        assert_close(&format!("{what} dW1"), &got_dw1, &dw(&xd, &dhd, k, h, np1), 1e-4, 1e-4);
        assert_close(&format!("{what} db1"), &got_db1, &db(&dhd, h, np1), 1e-4, 1e-4);
        assert_close(&format!("{what} dW2"), &got_dw2, &dw(&hd, &cd, h, n, np2), 1e-4, 1e-4);
        assert_close(&format!("{what} db2"), &got_db2, &db(&cd, n, np2), 1e-4, 1e-4);

        // Finite differences of the engine's own f32 forward, on a few entries of
        // every input. L is linear in each parameter, so central differences are
        // exact up to f32 rounding of L (|L| ~ 10, eps 1e-2: ~1e-4 absolute).
        let eps = 1e-2f32;
        let fd = |which: usize, idx: usize| -> f64 {
            let mut p: Vec<Vec<f32>> = vec![x.clone(), w1.clone(), b1.clone(), w2.clone(), b2.clone()];
            p[which][idx] += eps;
            let lp = gpu_loss(&case, &p[0], &p[1], &p[2], &p[3], &p[4], &c, &e);
            p[which][idx] -= 2.0 * eps;
            let lm = gpu_loss(&case, &p[0], &p[1], &p[2], &p[3], &p[4], &c, &e);
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
