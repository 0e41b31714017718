// Token bookkeeping.
// cls_fill: writes the stage's learned cls token (src [C]) into token 0 of every
//   image of y [B, T, C] (the other tokens are written by the token-embedding
//   LayerNorm, which scatters its rows to tokens 1..T).
// mean_tokens: y [B, C] = mean over the T tokens of src [B, T, C] (the head input
//   of a model without a cls token).

override WG: u32 = 64u;

// B, T, C: the map's shape (cls_fill, mean_tokens, cls_grad). n: elements (vec4s
// in add4_tex) of an element-wise pass; chunk_off: add4_tex's first vec4 of its
// chunk; per_sample, scale_off: drop path's elements per sample and the index of
// the dispatch's first sample in `scales`.
struct Params { B: u32, T: u32, C: u32, n: u32, chunk_off: u32, per_sample: u32, scale_off: u32, _pad: u32 }

@group(0) @binding(0) var<storage, read> src: array<act>;
@group(0) @binding(1) var<storage, read_write> y: array<act>;
@group(0) @binding(2) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn cls_fill(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = gid.x;
    if (n >= p.B * p.C) {
        return;
    }
    let bi = n / p.C;
    let c = n % p.C;
    y[bi * p.T * p.C + c] = act(f32(src[c]));
}

@compute @workgroup_size(WG)
fn mean_tokens(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = gid.x;
    if (n >= p.B * p.C) {
        return;
    }
    let bi = n / p.C;
    let c = n % p.C;
    var s = 0.0;
    for (var t = 0u; t < p.T; t++) {
        s += f32(src[(bi * p.T + t) * p.C + c]);
    }
    y[n] = act(s / f32(p.T));
}

// gather_rows: y [rows, C] = src rows (r / group) * stride + off + r % group,
// the dense copy of a mapped set of rows (used by the LayerNorm backward); with
// SCATTER the inverse, src [rows, C] densely into those rows of y (ConViT's
// patch tokens below the class token's row).
override SCATTER: bool = false;
struct GatherParams { rows: u32, C: u32, group: u32, stride: u32, off: u32, _p0: u32, _p1: u32, _p2: u32 }
@group(0) @binding(3) var<uniform> gp: GatherParams;

@compute @workgroup_size(WG)
fn gather_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = gid.x + gid.y * nwg.x * WG;
    if (n >= gp.rows * gp.C) {
        return;
    }
    let r = n / gp.C;
    let mapped = ((r / gp.group) * gp.stride + gp.off + r % gp.group) * gp.C + n % gp.C;
    if (SCATTER) {
        y[mapped] = src[n];
    } else {
        y[n] = src[mapped];
    }
}

// cls_grad: y [C] = Σ_b src[b, 0, :] over the B images of a [B, T, C] map (the
// gradient of the cls parameter, which every image's token 0 copied).
@compute @workgroup_size(WG)
fn cls_grad(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if (c >= p.C) {
        return;
    }
    var s = 0.0;
    for (var bi = 0u; bi < p.B; bi++) {
        s += f32(src[bi * p.T * p.C + c]);
    }
    y[c] = act(s);
}

// add: y = src + other, elementwise over p.n elements.
@group(0) @binding(4) var<storage, read> other: array<act>;

@compute @workgroup_size(WG)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = gid.x + gid.y * nwg.x * WG;
    if (n >= p.n) {
        return;
    }
    y[n] = act(f32(src[n]) + f32(other[n]));
}

// add4_tex: the same four values at a time on drivers that prefer texture
// operands, both inputs read as linear textures (texel gathers instead of
// per-lane storage loads; Graph::linear_texture); p.n counts vec4s.
@group(0) @binding(6) var a_tex: Tex;
@group(0) @binding(7) var b_tex: Tex;
@group(0) @binding(8) var<storage, read_write> y4: array<vec4<act>>;

@compute @workgroup_size(WG)
fn add4_tex(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = gid.x + gid.y * nwg.x * WG;
    if (n >= p.n) {
        return;
    }
    // Inputs read in chunks: texel n is vec4 p.chunk_off + n of the tensors.
    y4[p.chunk_off + n] = vec4<act>(lin(a_tex, n) + lin(b_tex, n));
}

// act_forward lives with the matmul epilogue (matmul.wgsl::act_forward).

// Stochastic depth (drop path), per sample: scales[p.scale_off + sample] is 0 for a
// dropped residual branch and 1/(1 - rate) for a kept one (host-drawn each step).
// add_scaled: y = src + other * scale(sample); scale_rows: y = src * scale(sample),
// the branch's backward, over p.n elements of p.per_sample per sample.
@group(0) @binding(5) var<storage, read> scales: array<f32>;

@compute @workgroup_size(WG)
fn add_scaled(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = gid.x + gid.y * nwg.x * WG;
    if (n >= p.n) {
        return;
    }
    y[n] = act(f32(src[n]) + f32(other[n]) * scales[p.scale_off + n / p.per_sample]);
}

@compute @workgroup_size(WG)
fn scale_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = gid.x + gid.y * nwg.x * WG;
    if (n >= p.n) {
        return;
    }
    y[n] = act(f32(src[n]) * scales[p.scale_off + n / p.per_sample]);
}

// add_pos: y [B, T, C] = src + other[t, c], a per-token table (ConViT's position
// embedding) added to every image; p.n = B·T·C elements, p.per_sample = T·C.
@compute @workgroup_size(WG)
fn add_pos(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = gid.x + gid.y * nwg.x * WG;
    if (n >= p.n) {
        return;
    }
    y[n] = act(f32(src[n]) + f32(other[n % p.per_sample]));
}

// batch_sum: y [T·C] = Σ_b src[b, :], the gradient of add_pos's table; an
// invocation per element, p.per_sample elements per image, p.B images.
@compute @workgroup_size(WG)
fn batch_sum(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = gid.x + gid.y * nwg.x * WG;
    if (n >= p.per_sample) {
        return;
    }
    var s = 0.0;
    for (var b = 0u; b < p.B; b++) {
        s += f32(src[b * p.per_sample + n]);
    }
    y[n] = act(s);
}
