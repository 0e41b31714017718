// CvT's convolutional projection (paper §3.2): for q, k and v, a depthwise 3x3
// convolution (pad 1) with BatchNorm folded in at load,
//     w' = w * gamma / sqrt(var + eps),  b' = beta - mean * gamma / sqrt(var + eps),
// stride 1 for q and stride 2 for k and v. One read of the token map yields all
// three: the invocation at input pixel (y, x) computes q there and, when y and x
// are even, k and v at (y/2, x/2), whose 3x3 window is the same one.
// The cls token (cls = 1) bypasses conv and BN and becomes token 0 of q, k and v.
//
// x [B, cls + H*W, C]; w [3, 9, C]; bias [3, C];
// q [B, cls + H*W, C]; k, v [B, cls + Hk*Wk, C] with Hk = ceil(H/2), Wk = ceil(W/2).

override WG: u32 = 64u;

struct Params { B: u32, H: u32, W: u32, C: u32, cls: u32, Hk: u32, Wk: u32, total: u32 }

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> q: array<f32>;
@group(0) @binding(4) var<storage, read_write> k: array<f32>;
@group(0) @binding(5) var<storage, read_write> v: array<f32>;
@group(0) @binding(6) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let n = (wid.y * nwg.x + wid.x) * WG + lid;
    if (n >= p.total) {
        return;
    }
    let C = p.C;
    let tq = p.cls + p.H * p.W;
    let tk = p.cls + p.Hk * p.Wk;
    let c = n % C;
    let t = (n / C) % tq;
    let bi = n / (C * tq);
    if (t < p.cls) {
        let val = x[n];
        q[n] = val;
        let kidx = (bi * tk) * C + c;
        k[kidx] = val;
        v[kidx] = val;
        return;
    }
    let pix = t - p.cls;
    let y = i32(pix / p.W);
    let xx = i32(pix % p.W);
    let base = bi * tq + p.cls;
    var win: array<f32, 9>;
    for (var ky = 0; ky < 3; ky++) {
        for (var kx = 0; kx < 3; kx++) {
            let iy = y + ky - 1;
            let ix = xx + kx - 1;
            var val = 0.0;
            if (iy >= 0 && ix >= 0 && iy < i32(p.H) && ix < i32(p.W)) {
                val = x[(base + u32(iy) * p.W + u32(ix)) * C + c];
            }
            win[ky * 3 + kx] = val;
        }
    }
    var sq = bias[c];
    for (var i = 0u; i < 9u; i++) {
        sq += w[i * C + c] * win[i];
    }
    q[n] = sq;
    if ((y & 1) == 0 && (xx & 1) == 0) {
        var sk = bias[C + c];
        var sv = bias[2u * C + c];
        for (var i = 0u; i < 9u; i++) {
            sk += w[(9u + i) * C + c] * win[i];
            sv += w[(18u + i) * C + c] * win[i];
        }
        let kidx = (bi * tk + p.cls + u32(y / 2) * p.Wk + u32(xx / 2)) * C + c;
        k[kidx] = sk;
        v[kidx] = sv;
    }
}
