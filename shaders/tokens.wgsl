// Token bookkeeping.
// cls_fill: writes the stage's learned cls token (src [C]) into token 0 of every
//   image of y [B, T, C] (the other tokens are written by the token-embedding
//   LayerNorm, which scatters its rows to tokens 1..T).
// mean_tokens: y [B, C] = mean over the T tokens of src [B, T, C] (the head input
//   of a model without a cls token).

override WG: u32 = 64u;

struct Params { B: u32, T: u32, C: u32, _p: u32 }

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn cls_fill(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = gid.x;
    if (n >= p.B * p.C) {
        return;
    }
    let bi = n / p.C;
    let c = n % p.C;
    y[bi * p.T * p.C + c] = src[c];
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
        s += src[(bi * p.T + t) * p.C + c];
    }
    y[n] = s / f32(p.T);
}
