// Register-blocked matmul with a fused epilogue:
//     C[M, N] (+)= act(A[M, K] · B[K, N] + bias[N])
//
// B and bias are weights. They are laid out once at load as [K, NP] with NP = N
// rounded up to a multiple of 4 (zero-padded columns), so every B row is made of
// whole vec4s and the inner loop needs no column bounds checks.
//
// Each invocation owns an RM x (4*RN4) block of C held in registers and streams
// K four at a time: per step it reads 4*RN4 vec4 of B and 4*RM scalars of A and does
// 4*RM*RN4 vec4 FMAs. No workgroup memory: on CPU drivers (lavapipe) the
// invocations of a workgroup are SIMD lanes and the caches do the sharing, and the
// measured rate of this shape is ~7x a 64x64 shared-memory tile there.
//
// A_MODE 0: A is a dense row-major [M, K] matrix.
// A_MODE 1: A is the im2col view of an NHWC token map, so a convolution is this
//           same GEMM with no materialised im2col buffer (implicit GEMM). Row m is
//           output pixel (b, oy, ox); column k is tap (ky, kx) and input channel ci,
//           k = (ky * kw + kx) * cin + ci, matching how the host lays out conv weights.

override A_MODE: u32 = 0u;
// 0 none, 1 exact (erf) GELU, 2 QuickGELU x*sigmoid(1.702x).
override ACT: u32 = 0u;
// C += result instead of C = result: the residual add of a transformer block.
override ACCUMULATE: bool = false;
override WG_X: u32 = 8u;
override WG_Y: u32 = 8u;

const RM: u32 = 8u;
const RN4: u32 = 2u;

struct Params {
    M: u32, N: u32, K: u32, NP4: u32,
    in_h: u32, in_w: u32, cin: u32, in_tokens: u32,
    in_tok_off: u32, out_h: u32, out_w: u32, kh: u32,
    kw: u32, stride: u32, pad: u32, _pad: u32,
}

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> bias: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

// erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), which is below f32
// rounding of GELU's output for all |x| that matter.
fn erf_approx(x: f32) -> f32 {
    let s = sign(x);
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.3275911 * z);
    let y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * exp(-z * z);
    return s * y;
}

fn activate(x: f32) -> f32 {
    if (ACT == 1u) {
        return 0.5 * x * (1.0 + erf_approx(x * 0.70710678118654752));
    } else if (ACT == 2u) {
        return x / (1.0 + exp(-1.702 * x));
    }
    return x;
}

// Per-row state of the conv view: base token index and top-left input corner.
struct RowView { base: u32, iy0: i32, ix0: i32 }

fn row_view(row: u32) -> RowView {
    var r: RowView;
    if (A_MODE == 1u) {
        let hw = p.out_h * p.out_w;
        let bi = row / hw;
        let pix = row % hw;
        r.base = bi * p.in_tokens + p.in_tok_off;
        r.iy0 = i32((pix / p.out_w) * p.stride) - i32(p.pad);
        r.ix0 = i32((pix % p.out_w) * p.stride) - i32(p.pad);
    } else {
        r.base = row * p.K;
    }
    return r;
}

fn load_a(r: RowView, k: u32) -> f32 {
    if (A_MODE == 1u) {
        let tap = k / p.cin;
        let ci = k % p.cin;
        let iy = r.iy0 + i32(tap / p.kw);
        let ix = r.ix0 + i32(tap % p.kw);
        if (iy < 0 || ix < 0 || iy >= i32(p.in_h) || ix >= i32(p.in_w)) {
            return 0.0;
        }
        return a[(r.base + u32(iy) * p.in_w + u32(ix)) * p.cin + ci];
    }
    return a[r.base + k];
}

@compute @workgroup_size(WG_X, WG_Y, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let col4 = gid.x * RN4;
    let row0 = gid.y * RM;
    if (col4 >= p.NP4 || row0 >= p.M) {
        return;
    }
    // Rows past M are clamped to the last row (computed, never written) so the
    // inner loop has no row branches.
    var rv: array<RowView, RM>;
    for (var i = 0u; i < RM; i++) {
        rv[i] = row_view(min(row0 + i, p.M - 1u));
    }
    var cols: array<u32, RN4>;
    for (var j = 0u; j < RN4; j++) {
        cols[j] = min(col4 + j, p.NP4 - 1u);
    }
    var acc: array<array<vec4<f32>, RN4>, RM>;
    let k4 = p.K / 4u;
    for (var kk = 0u; kk < k4; kk++) {
        let k = kk * 4u;
        var bv: array<array<vec4<f32>, RN4>, 4>;
        for (var t = 0u; t < 4u; t++) {
            for (var j = 0u; j < RN4; j++) {
                bv[t][j] = b[(k + t) * p.NP4 + cols[j]];
            }
        }
        for (var i = 0u; i < RM; i++) {
            let av = vec4<f32>(load_a(rv[i], k), load_a(rv[i], k + 1u), load_a(rv[i], k + 2u), load_a(rv[i], k + 3u));
            for (var j = 0u; j < RN4; j++) {
                acc[i][j] += av.x * bv[0][j] + av.y * bv[1][j] + av.z * bv[2][j] + av.w * bv[3][j];
            }
        }
    }
    for (var k = k4 * 4u; k < p.K; k++) {
        for (var i = 0u; i < RM; i++) {
            let av = load_a(rv[i], k);
            for (var j = 0u; j < RN4; j++) {
                acc[i][j] += av * b[k * p.NP4 + cols[j]];
            }
        }
    }
    for (var i = 0u; i < RM; i++) {
        let row = row0 + i;
        if (row >= p.M) {
            break;
        }
        for (var j = 0u; j < RN4; j++) {
            let col = (col4 + j) * 4u;
            if (col >= p.N) {
                break;
            }
            let v = acc[i][j] + bias[col4 + j];
            for (var e = 0u; e < 4u; e++) {
                if (col + e < p.N) {
                    let idx = row * p.N + col + e;
                    let y = activate(v[e]);
                    if (ACCUMULATE) {
                        c[idx] = c[idx] + y;
                    } else {
                        c[idx] = y;
                    }
                }
            }
        }
    }
}
