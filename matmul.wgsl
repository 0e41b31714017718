override A_MODE: u32 = 0u;
override ACT: u32 = 0u;
override ACCUMULATE: bool = false;
override WG_X: u32 = 8u;
override WG_Y: u32 = 8u;
struct Params { M: u32, N: u32, K: u32, NP4: u32, in_h: u32, in_w: u32, cin: u32, in_tokens: u32, in_tok_off: u32, out_h: u32, out_w: u32, kh: u32, kw: u32, stride: u32, pad: u32, _pad: u32, }
@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> bias: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;
@compute @workgroup_size(WG_X, WG_Y, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let col4 = gid.x * 2u;
    let row0 = gid.y * 8u;
    if (col4 >= p.NP4 || row0 >= p.M) { return; }
    let c0 = min(col4 + 0u, p.NP4 - 1u);
    let c1 = min(col4 + 1u, p.NP4 - 1u);
    let r0 = min(row0 + 0u, p.M - 1u) * p.K;
    var acc0_0 = vec4<f32>(0.0);
    var acc0_1 = vec4<f32>(0.0);
    let r1 = min(row0 + 1u, p.M - 1u) * p.K;
    var acc1_0 = vec4<f32>(0.0);
    var acc1_1 = vec4<f32>(0.0);
    let r2 = min(row0 + 2u, p.M - 1u) * p.K;
    var acc2_0 = vec4<f32>(0.0);
    var acc2_1 = vec4<f32>(0.0);
    let r3 = min(row0 + 3u, p.M - 1u) * p.K;
    var acc3_0 = vec4<f32>(0.0);
    var acc3_1 = vec4<f32>(0.0);
    let r4 = min(row0 + 4u, p.M - 1u) * p.K;
    var acc4_0 = vec4<f32>(0.0);
    var acc4_1 = vec4<f32>(0.0);
    let r5 = min(row0 + 5u, p.M - 1u) * p.K;
    var acc5_0 = vec4<f32>(0.0);
    var acc5_1 = vec4<f32>(0.0);
    let r6 = min(row0 + 6u, p.M - 1u) * p.K;
    var acc6_0 = vec4<f32>(0.0);
    var acc6_1 = vec4<f32>(0.0);
    let r7 = min(row0 + 7u, p.M - 1u) * p.K;
    var acc7_0 = vec4<f32>(0.0);
    var acc7_1 = vec4<f32>(0.0);
    let k4 = p.K / 4u;
    for (var kk = 0u; kk < k4; kk++) {
        let k = kk * 4u;
        let b00 = b[(k+0u) * p.NP4 + c0];
        let b01 = b[(k+0u) * p.NP4 + c1];
        let b10 = b[(k+1u) * p.NP4 + c0];
        let b11 = b[(k+1u) * p.NP4 + c1];
        let b20 = b[(k+2u) * p.NP4 + c0];
        let b21 = b[(k+2u) * p.NP4 + c1];
        let b30 = b[(k+3u) * p.NP4 + c0];
        let b31 = b[(k+3u) * p.NP4 + c1];
        { let av = vec4<f32>(a[r0+k], a[r0+k+1u], a[r0+k+2u], a[r0+k+3u]);
          acc0_0 += av.x*b00 + av.y*b10 + av.z*b20 + av.w*b30;
          acc0_1 += av.x*b01 + av.y*b11 + av.z*b21 + av.w*b31;
        }
        { let av = vec4<f32>(a[r1+k], a[r1+k+1u], a[r1+k+2u], a[r1+k+3u]);
          acc1_0 += av.x*b00 + av.y*b10 + av.z*b20 + av.w*b30;
          acc1_1 += av.x*b01 + av.y*b11 + av.z*b21 + av.w*b31;
        }
        { let av = vec4<f32>(a[r2+k], a[r2+k+1u], a[r2+k+2u], a[r2+k+3u]);
          acc2_0 += av.x*b00 + av.y*b10 + av.z*b20 + av.w*b30;
          acc2_1 += av.x*b01 + av.y*b11 + av.z*b21 + av.w*b31;
        }
        { let av = vec4<f32>(a[r3+k], a[r3+k+1u], a[r3+k+2u], a[r3+k+3u]);
          acc3_0 += av.x*b00 + av.y*b10 + av.z*b20 + av.w*b30;
          acc3_1 += av.x*b01 + av.y*b11 + av.z*b21 + av.w*b31;
        }
        { let av = vec4<f32>(a[r4+k], a[r4+k+1u], a[r4+k+2u], a[r4+k+3u]);
          acc4_0 += av.x*b00 + av.y*b10 + av.z*b20 + av.w*b30;
          acc4_1 += av.x*b01 + av.y*b11 + av.z*b21 + av.w*b31;
        }
        { let av = vec4<f32>(a[r5+k], a[r5+k+1u], a[r5+k+2u], a[r5+k+3u]);
          acc5_0 += av.x*b00 + av.y*b10 + av.z*b20 + av.w*b30;
          acc5_1 += av.x*b01 + av.y*b11 + av.z*b21 + av.w*b31;
        }
        { let av = vec4<f32>(a[r6+k], a[r6+k+1u], a[r6+k+2u], a[r6+k+3u]);
          acc6_0 += av.x*b00 + av.y*b10 + av.z*b20 + av.w*b30;
          acc6_1 += av.x*b01 + av.y*b11 + av.z*b21 + av.w*b31;
        }
        { let av = vec4<f32>(a[r7+k], a[r7+k+1u], a[r7+k+2u], a[r7+k+3u]);
          acc7_0 += av.x*b00 + av.y*b10 + av.z*b20 + av.w*b30;
          acc7_1 += av.x*b01 + av.y*b11 + av.z*b21 + av.w*b31;
        }
    }
    { let row = row0 + 0u; let col = (col4 + 0u) * 4u; let v = acc0_0 + bias[min(col4 + 0u, p.NP4-1u)];
       if (row < p.M) { for (var e = 0u; e < 4u; e++) { if (col + e < p.N) { c[row * p.N + col + e] = v[e]; } } } }
    { let row = row0 + 0u; let col = (col4 + 1u) * 4u; let v = acc0_1 + bias[min(col4 + 1u, p.NP4-1u)];
       if (row < p.M) { for (var e = 0u; e < 4u; e++) { if (col + e < p.N) { c[row * p.N + col + e] = v[e]; } } } }
    { let row = row0 + 1u; let col = (col4 + 0u) * 4u; let v = acc1_0 + bias[min(col4 + 0u, p.NP4-1u)];
       if (row < p.M) { for (var e = 0u; e < 4u; e++) { if (col + e < p.N) { c[row * p.N + col + e] = v[e]; } } } }
    { let row = row0 + 1u; let col = (col4 + 1u) * 4u; let v = acc1_1 + bias[min(col4 + 1u, p.NP4-1u)];
       if (row < p.M) { for (var e = 0u; e < 4u; e++) { if (col + e < p.N) { c[row * p.N + col + e] = v[e]; } } } }
    { let row = row0 + 2u; let col = (col4 + 0u) * 4u; let v = acc2_0 + bias[min(col4 + 0u, p.NP4-1u)];
       if (row < p.M) { for (var e = 0u; e < 4u; e++) { if (col + e < p.N) { c[row * p.N + col + e] = v[e]; } } } }
    { let row = row0 + 2u; let col = (col4 + 1u) * 4u; let v = acc2_1 + bias[min(col4 + 1u, p.NP4-1u)];
       if (row < p.M) { for (var e = 0u; e < 4u; e++) { if (col + e < p.N) { c[row * p.N + col + e] = v[e]; } } } }
    { let row = row0 + 3u; let col = (col4 + 0u) * 4u; let v = acc3_0 + bias[min(col4 + 0u, p.NP4-1u)];
       if (row < p.M) { for (var e = 0u; e < 4u; e++) { if (col + e < p.N) { c[row * p.N + col + e] = v[e]; } } } }
    { let row = row0 + 3u; let col = (col4 + 1u) * 4u; let v = acc3_1 + bias[min(col4 + 1u, p.NP4-1u)];
       if (row < p.M) { for (var e = 0u; e < 4u; e++) { if (col + e < p.N) { c[row * p.N + col + e] = v[e]; } } } }
    { let row = row0 + 4u; let col = (col4 + 0u) * 4u; let v = acc4_0 + bias[min(col4 + 0u, p.NP4-1u)];
       if (row < p.M) { for (var e = 0u; e < 4u; e++) { if (col + e < p.N) { c[row * p.N + col + e] = v[e]; } } } }
    { let row = row0 + 4u; let col = (col4 + 1u) * 4u; let v = acc4_1 + bias[min(col4 + 1u, p.NP4-1u)];
       if (row < p.M) { for (var e = 0u; e < 4u; e++) { if (col + e < p.N) { c[row * p.N + col + e] = v[e]; } } } }
    { let row = row0 + 5u; let col = (col4 + 0u) * 4u; let v = acc5_0 + bias[min(col4 + 0u, p.NP4-1u)];
       if (row < p.M) { for (var e = 0u; e < 4u; e++) { if (col + e < p.N) { c[row * p.N + col + e] = v[e]; } } } }
    { let row = row0 + 5u; let col = (col4 + 1u) * 4u; let v = acc5_1 + bias[min(col4 + 1u, p.NP4-1u)];
       if (row < p.M) { for (var e = 0u; e < 4u; e++) { if (col + e < p.N) { c[row * p.N + col + e] = v[e]; } } } }
    { let row = row0 + 6u; let col = (col4 + 0u) * 4u; let v = acc6_0 + bias[min(col4 + 0u, p.NP4-1u)];
       if (row < p.M) { for (var e = 0u; e < 4u; e++) { if (col + e < p.N) { c[row * p.N + col + e] = v[e]; } } } }
    { let row = row0 + 6u; let col = (col4 + 1u) * 4u; let v = acc6_1 + bias[min(col4 + 1u, p.NP4-1u)];
       if (row < p.M) { for (var e = 0u; e < 4u; e++) { if (col + e < p.N) { c[row * p.N + col + e] = v[e]; } } } }
    { let row = row0 + 7u; let col = (col4 + 0u) * 4u; let v = acc7_0 + bias[min(col4 + 0u, p.NP4-1u)];
       if (row < p.M) { for (var e = 0u; e < 4u; e++) { if (col + e < p.N) { c[row * p.N + col + e] = v[e]; } } } }
    { let row = row0 + 7u; let col = (col4 + 1u) * 4u; let v = acc7_1 + bias[min(col4 + 1u, p.NP4-1u)];
       if (row < p.M) { for (var e = 0u; e < 4u; e++) { if (col + e < p.N) { c[row * p.N + col + e] = v[e]; } } } }
}