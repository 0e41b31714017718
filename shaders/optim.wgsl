// Optimizer updates, elementwise over one parameter tensor and its gradient.
//
// adamw: torch.optim.AdamW, decoupled weight decay:
//   p ← p·(1 − lr·wd)            (skipped for norms, biases and the cls token)
//   m ← β1·m + (1 − β1)·g,  v ← β2·v + (1 − β2)·g²
//   p ← p − (lr / bc1) · m / (√v / √bc2 + ε),  bc_i = 1 − β_i^step
// The per-step values live in a small storage buffer the host rewrites each step
// (learning rate schedule, bias corrections, gradient-clipping scale), so the
// recorded dispatches never change.

override WG: u32 = 64u;

struct Params { n: u32, decay: u32, _p0: u32, _p1: u32 }

// hyper: [lr, beta1, beta2, eps, weight_decay, bc1, bc2, grad_scale]
@group(0) @binding(0) var<storage, read_write> param: array<f32>;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> m1: array<f32>;
@group(0) @binding(3) var<storage, read_write> m2: array<f32>;
@group(0) @binding(4) var<storage, read> hyper: array<f32>;
@group(0) @binding(5) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn adamw(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.n) {
        return;
    }
    let lr = hyper[0];
    let b1 = hyper[1];
    let b2 = hyper[2];
    let g = grad[i] * hyper[7];
    var w = param[i];
    if (p.decay != 0u) {
        w *= 1.0 - lr * hyper[4];
    }
    let m = b1 * m1[i] + (1.0 - b1) * g;
    let v = b2 * m2[i] + (1.0 - b2) * g * g;
    m1[i] = m;
    m2[i] = v;
    param[i] = w - (lr / hyper[5]) * m / (sqrt(v) / sqrt(hyper[6]) + hyper[3]);
}

// sumsq: Σ grad² of one parameter tensor into norms[p.decay] (the slot index is
// passed in the `decay` field), one workgroup striding over the tensor, for the
// global gradient norm of clipping. The host sums the slots.
@group(0) @binding(6) var<storage, read_write> norms: array<f32>;
var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn sumsq(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    for (var i = lid; i < p.n; i += WG) {
        let g = grad[i];
        s += g * g;
    }
    red[lid] = s;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if (lid < k) {
            red[lid] += red[lid + k];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        norms[p.decay] = red[0];
    }
}
