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

// n: values (vec4s in the vec4 entries) of this dispatch; decay: 1 where weight
// decay applies; chunk_off: adamw4_tex's first vec4 of its chunk; slot: sumsq's
// first output slot.
struct Params { n: u32, decay: u32, chunk_off: u32, slot: u32 }

// T is vec4<f32> (adamw4: tensors whose length is a multiple of 4, the usual
// case; p.n counts vec4s) or f32 (adamw); the arithmetic is the same. vec4 means
// a quarter of the storage accesses, each a loop over SIMD lanes on CPU drivers.
// hyper: [lr, beta1, beta2, eps | weight_decay, bc1, bc2, grad_scale], a uniform
// buffer (one scalar load on such drivers, not a per-lane loop).
@group(0) @binding(0) var<storage, read_write> param: array<f32>;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> m1: array<f32>;
@group(0) @binding(3) var<storage, read_write> m2: array<f32>;
@group(0) @binding(4) var<uniform> hyper: array<vec4<f32>, 2>;
@group(0) @binding(5) var<uniform> p: Params;
@group(0) @binding(7) var<storage, read_write> param4: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read> grad4: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read_write> m14: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read_write> m24: array<vec4<f32>>;

struct Upd4 { w: vec4<f32>, m: vec4<f32>, v: vec4<f32> }

// One AdamW update of four values (the scalar entry uses lane x).
fn update(w0: vec4<f32>, g0: vec4<f32>, m0: vec4<f32>, v0: vec4<f32>) -> Upd4 {
    let lr = hyper[0].x;
    let b1 = hyper[0].y;
    let b2 = hyper[0].z;
    let g = g0 * hyper[1].w;
    var w = w0;
    if (p.decay != 0u) {
        w *= 1.0 - lr * hyper[1].x;
    }
    let m = b1 * m0 + (1.0 - b1) * g;
    let v = b2 * v0 + (1.0 - b2) * g * g;
    return Upd4(w - (lr / hyper[1].y) * m / (sqrt(v) / sqrt(hyper[1].z) + hyper[0].w), m, v);
}

@compute @workgroup_size(WG)
fn adamw(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.n) {
        return;
    }
    let u = update(vec4<f32>(param[i]), vec4<f32>(grad[i]), vec4<f32>(m1[i]), vec4<f32>(m2[i]));
    m1[i] = u.m.x;
    m2[i] = u.v.x;
    param[i] = u.w.x;
}

@compute @workgroup_size(WG)
fn adamw4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.n) {
        return;
    }
    let u = update(param4[i], grad4[i], m14[i], m24[i]);
    m14[i] = u.m;
    m24[i] = u.v;
    param4[i] = u.w;
}

// adamw4 for CPU drivers, where every storage-buffer load is a loop over the
// SIMD lanes and a texel fetch one gather: the four inputs come from linear
// textures (memcpys of the buffers, Graph::linear_texture_buf), in chunks of
// p.n vec4s starting at vec4 p.chunk_off of the buffers (texel 0 of the textures).
@group(0) @binding(11) var w_t: Tex;
@group(0) @binding(12) var g_t: Tex;
@group(0) @binding(13) var m_t: Tex;
@group(0) @binding(14) var v_t: Tex;

@compute @workgroup_size(WG)
fn adamw4_tex(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.n) {
        return;
    }
    let u = update(lin(w_t, i), lin(g_t, i), lin(m_t, i), lin(v_t, i));
    let o = p.chunk_off + i;
    m14[o] = u.m;
    m24[o] = u.v;
    param4[o] = u.w;
}

// sumsq: Σ grad² of one parameter tensor, for the global gradient norm of
// clipping: workgroup j strides over the tensor from element j·WG and writes its
// sum into norms[p.slot + j] (as many workgroups as the host gives the tensor:
// a large tensor fills the GPU, a bias takes one). The host adds the slots in
// order.
@group(0) @binding(6) var<storage, read_write> norms: array<f32>;
var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn sumsq(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    for (var i = wid.x * WG + lid; i < p.n; i += nwg.x * WG) {
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
        norms[p.slot + wid.x] = red[0];
    }
}

// accumulate: gradient accumulation over micro-batches, acc = grad (FIRST, the
// first micro-batch of a step) or acc + grad, over p.n values of one parameter;
// the accumulator is bound in m1's slot.
override FIRST: bool = false;

@compute @workgroup_size(WG)
fn accumulate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.n) {
        return;
    }
    if (FIRST) {
        m1[i] = grad[i];
    } else {
        m1[i] = m1[i] + grad[i];
    }
}
