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
// A_MODE 0: A is a dense row-major matrix, row stride a_stride (= K).
// A_MODE 1: A is the im2col view of an NHWC token map, so a convolution is this
//           same GEMM with no materialised im2col buffer (implicit GEMM). Row m is
//           output pixel (b, oy, ox); column k is tap (ky, kx) and input channel ci,
//           k = (ky * kw + kx) * cin + ci, matching how the host lays out conv weights.
// A_MODE 2: A is the transpose of a row-major [K, a_stride] matrix (backward: Xᵀ).
//
// B_MODE 0: B is a weight, [K, NP] rows of b_stride = NP scalars (vec4 loads).
// B_MODE 1: B is the transpose of a weight stored [N, b_stride] (backward: dY·Wᵀ).
// B_MODE 2: B is a row-major [K, b_stride] activation with b_stride = N, any N
//           (backward: the output gradient dY); columns past N read as zero.

override A_MODE: u32 = 0u;
override B_MODE: u32 = 0u;
override HAS_BIAS: bool = true;
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
    kw: u32, stride: u32, pad: u32,
    // First output row of this dispatch (the texture variant splits tall A).
    out_row_off: u32,
    a_stride: u32, b_stride: u32,
    // Texture GEMM: the first vec4 of A's and of B's linear texture (`main_tex`).
    a_off: u32, b_off: u32,
    // Split-K (`main_tiled` with SPLIT, `splitk_sum`): K per split (a multiple of
    // TBK) and the number of splits.
    k_chunk: u32, splits: u32,
    // The texture GEMM: log2 of its invocations along column blocks.
    col_lanes_log2: u32, _pad: u32,
}

@group(0) @binding(0) var<storage, read> a: array<act>;
@group(0) @binding(1) var<storage, read> b: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> bias: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> c: array<act>;
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

// d act(z) / dz.
fn activate_grad(z: f32) -> f32 {
    if (ACT == 1u) {
        // Φ(z) + z φ(z)
        return 0.5 * (1.0 + erf_approx(z * 0.70710678118654752)) + z * 0.3989422804014327 * exp(-0.5 * z * z);
    } else if (ACT == 2u) {
        let s = 1.0 / (1.0 + exp(-1.702 * z));
        return s + 1.702 * z * s * (1.0 - s);
    }
    return 1.0;
}

fn activate4(z: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(activate(z.x), activate(z.y), activate(z.z), activate(z.w));
}

fn activate_grad4(z: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(activate_grad(z.x), activate_grad(z.y), activate_grad(z.z), activate_grad(z.w));
}

// The activation alone, out of place: c[i] = act(a[i]) (training keeps the
// pre-activation for the backward).
@compute @workgroup_size(WG_X, WG_Y, 1)
fn act_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG_X;
    if (i >= p.M) {
        return;
    }
    c[i] = act(activate(f32(a[i])));
}

// Backward of the fused activation, in place: c[i] = c[i] * act'(a[i]), with a the
// saved pre-activation z and c the incoming gradient (M elements).
@compute @workgroup_size(WG_X, WG_Y, 1)
fn act_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG_X;
    if (i >= p.M) {
        return;
    }
    c[i] = act(f32(c[i]) * activate_grad(f32(a[i])));
}

// Stores y into C[i], or adds it there (ACCUMULATE: the residual add).
fn put(i: u32, y: f32) {
    if (ACCUMULATE) {
        c[i] = act(f32(c[i]) + y);
    } else {
        c[i] = act(y);
    }
}

// Epilogue for one vec4 of C (bias added): activation, optional residual add;
// columns past N and rows past M are dropped.
fn store_vec(row: u32, c4: u32, v: vec4<f32>) {
    let col = c4 * 4u;
    if (row >= p.M || col >= p.N) {
        return;
    }
    let base = (p.out_row_off + row) * p.N + col;
    for (var e = 0u; e < 4u; e++) {
        if (col + e < p.N) {
            put(base + e, activate(v[e]));
        }
    }
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
    } else if (A_MODE == 2u) {
        r.base = row;
    } else {
        r.base = row * p.a_stride;
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
        return f32(a[(r.base + u32(iy) * p.in_w + u32(ix)) * p.cin + ci]);
    } else if (A_MODE == 2u) {
        return f32(a[k * p.a_stride + r.base]);
    }
    return f32(a[r.base + k]);
}

// `main` reads binding 1 as raw words (`bw`; the other entry points see it as
// `b`), so the same GEMM reads f32 weights or, with B_F16, weights stored as f16
// pairs (unpack2x16float is core WGSL: no shader-f16 feature needed). Half the
// weight memory and bandwidth; the arithmetic stays f32.
@group(0) @binding(1) var<storage, read> bw: array<vec4<u32>>;
override B_F16: bool = false;

fn b_scalar(idx: u32) -> f32 {
    return bitcast<f32>(bw[idx / 4u][idx % 4u]);
}

// Four consecutive output columns (vec4 column c4) of B's row k (B modes 0 and
// 2; main_tiled reads B_MODE 1 along k itself, `tile_b`).
fn load_b(k: u32, c4: u32) -> vec4<f32> {
    if (B_MODE == 2u) {
        var v = vec4<f32>(0.0);
        for (var e = 0u; e < 4u; e++) {
            let n = c4 * 4u + e;
            if (n < p.b_stride) {
                v[e] = b_scalar(k * p.b_stride + n);
            }
        }
        return v;
    }
    let i = k * p.NP4 + c4;
    if (B_F16) {
        // Vec4 i of halves is words 2i, 2i + 1: one half of raw vec4 i / 2.
        let w = bw[i / 2u];
        let h = select(w.xy, w.zw, (i & 1u) == 1u);
        return vec4<f32>(unpack2x16float(h.x), unpack2x16float(h.y));
    }
    return bitcast<vec4<f32>>(bw[i]);
}

@compute @workgroup_size(WG_X, WG_Y, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let col4 = gid.x * RN4;
    let row0 = gid.y * RM;
    // Output vec4 columns (forward: NP4, the weight's padded width).
    let nc4 = (p.N + 3u) / 4u;
    if (col4 >= nc4 || row0 >= p.M) {
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
        cols[j] = min(col4 + j, nc4 - 1u);
    }
    var acc: array<array<vec4<f32>, RN4>, RM>;
    let k4 = p.K / 4u;
    for (var kk = 0u; kk < k4; kk++) {
        let k = kk * 4u;
        var bv: array<array<vec4<f32>, RN4>, 4>;
        for (var t = 0u; t < 4u; t++) {
            for (var j = 0u; j < RN4; j++) {
                bv[t][j] = load_b(k + t, cols[j]);
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
                acc[i][j] += av * load_b(k, cols[j]);
            }
        }
    }
    for (var j = 0u; j < RN4; j++) {
        var bj = vec4<f32>();
        if (HAS_BIAS && col4 + j < nc4) {
            bj = bias[col4 + j];
        }
        for (var i = 0u; i < RM; i++) {
            store_vec(row0 + i, col4 + j, acc[i][j] + bj);
        }
    }
}

// main_tiled: the GEMM of the GPU kernel set (`profile::KernelSet::Gpu`), same
// operand modes, bindings and epilogue as `main`, shaped for GPUs with many
// compute units and fast workgroup memory:
// - a TBM x TBN output tile per workgroup of 256 invocations (16 x 16), each
//   owning TM rows x one vec4 column: TM = 4 (64 x 64 tiles, 16 accumulators)
//   or TM = 8 (128 x 64, 32 accumulators, twice the multiply-adds per value
//   staged), chosen per shape by the host (`ops::matmul::tiled_shape`);
// - K in steps of TBK = 16: the A and B tiles are staged in workgroup memory,
//   k-major, rows padded by one vec4 (so the staging stores do not all hit one
//   bank); at most 12.5 KiB, far under NVIDIA's 48 KiB;
// - the next K step's operands are loaded into registers while the current one
//   is multiplied (one barrier pair per step);
// - global loads coalesced in every mode: 16 consecutive invocations read 16
//   consecutive scalars of one row (A modes 0, 1, B mode 1), 64 consecutive rows
//   of one k (A mode 2, the transposed activation of dW), one vec4 each (B mode
//   0) or four consecutive scalars each (B mode 2);
// - the implicit im2col (A_MODE 1) has no division per element: each invocation
//   keeps its rows' views and one (ky, kx, ci) position, stepped by TBK;
// - split-K: workgroup z multiplies K range [z·k_chunk, (z+1)·k_chunk); with
//   SPLIT it stores raw partial products at z·M·N + row·N + col and `splitk_sum`
//   adds the splits in a fixed order (deterministic) and applies the epilogue.
// Every barrier is in uniform control flow: the step count depends only on the
// uniforms and the workgroup id (kernels-tests/uniformity.rs checks).
override TM: u32 = 4u;
const TM_MAX: u32 = 8u;
const TBN: u32 = 64u;
const TBK: u32 = 16u;
override SPLIT: bool = false;
// Tiles sized for TM_MAX; the A tile's row stride in vec4 is TBM / 4 + 1.
var<workgroup> As: array<vec4<f32>, 528>;
var<workgroup> Bs: array<vec4<f32>, 272>;

fn tbm() -> u32 {
    return 16u * TM;
}

// The A_MODE 1 column position of k: tap row, tap column, input channel.
struct ConvK { ky: u32, kx: u32, ci: u32 }

fn conv_k_at(k: u32) -> ConvK {
    let tap = k / p.cin;
    return ConvK(tap / p.kw, tap % p.kw, k % p.cin);
}

// Moves a ConvK forward by n columns (no division: n is TBK, and the loop runs
// at most TBK / cin + 1 times).
fn conv_k_step(c: ConvK, n: u32) -> ConvK {
    var r = c;
    r.ci += n;
    while (r.ci >= p.cin) {
        r.ci -= p.cin;
        r.kx += 1u;
        if (r.kx == p.kw) {
            r.kx = 0u;
            r.ky += 1u;
        }
    }
    return r;
}

fn conv_a(r: RowView, c: ConvK) -> f32 {
    let iy = r.iy0 + i32(c.ky);
    let ix = r.ix0 + i32(c.kx);
    if (iy < 0 || ix < 0 || iy >= i32(p.in_h) || ix >= i32(p.in_w)) {
        return 0.0;
    }
    return f32(a[(r.base + u32(iy) * p.in_w + u32(ix)) * p.cin + c.ci]);
}

// Where staged value e (< TM) of this invocation goes in the A tile: (k, row)
// within the step. Row-wise modes: k = lid % 16, rows lid / 16 + 16 e; A_MODE 2
// (rows contiguous in memory): rows lid % 64 + 64 (e / 4), k = lid / 64 + 4 (e % 4).
fn a_slot(lid: u32, e: u32) -> vec2<u32> {
    if (A_MODE == 2u) {
        return vec2<u32>(lid / 64u + 4u * (e % 4u), lid % 64u + 64u * (e / 4u));
    }
    return vec2<u32>(lid % 16u, lid / 16u + 16u * e);
}

// This invocation's TM values of A for the K step at k0 (zero past M and K).
fn tile_a(k0: u32, k_end: u32, row0: u32, lid: u32, rv: array<RowView, TM_MAX>, ck: ConvK) -> array<f32, TM_MAX> {
    var ar: array<f32, TM_MAX>;
    for (var e = 0u; e < TM; e++) {
        let s = a_slot(lid, e);
        let k = k0 + s.x;
        let r = row0 + s.y;
        var v = 0.0;
        if (k < k_end && r < p.M) {
            if (A_MODE == 2u) {
                v = f32(a[k * p.a_stride + r]);
            } else if (A_MODE == 1u) {
                v = conv_a(rv[e], ck);
            } else {
                v = f32(a[rv[e].base + k]);
            }
        }
        ar[e] = v;
    }
    return ar;
}

// This invocation's B values of the K step at k0: four columns n of one k
// (B_MODE 1, Bᵀ read along k) or one vec4 of a B row.
fn tile_b(k0: u32, k_end: u32, col40: u32, lid: u32) -> vec4<f32> {
    var br = vec4<f32>(0.0);
    if (B_MODE == 1u) {
        let k = k0 + lid % 16u;
        for (var e = 0u; e < 4u; e++) {
            let n = col40 * 4u + lid / 16u + 16u * e;
            if (k < k_end && n < p.N) {
                br[e] = b_scalar(n * p.b_stride + k);
            }
        }
    } else {
        let k = k0 + lid / 16u;
        let c4 = col40 + lid % 16u;
        if (k < k_end && c4 < (p.N + 3u) / 4u) {
            br = load_b(k, c4);
        }
    }
    return br;
}

// The GPU set's stores (main_tiled, splitk_sum): the epilogue of `main`, and
// training's fused activation (the same overrides as main_tex_act's): SAVE_Z
// also keeps the pre-activation z (binding 7), ACT_GRAD stores the product times
// act'(z), z read from binding 12 (fc2's dx, which becomes the gradient of fc1's
// pre-activation). Each saves a pass over the MLP's hidden layer, the widest
// tensor of a block.
@group(0) @binding(12) var<storage, read> zb: array<act>;

fn store_el(i: u32, y: f32) {
    if (SAVE_Z) {
        zc[i] = act(y);
    }
    if (ACT_GRAD) {
        put(i, y * activate_grad(f32(zb[i])));
    } else {
        put(i, activate(y));
    }
}

// derive store_vec_tiled from store_vec: put(base + e, activate(v[e])) -> store_el(base + e, v[e])

// main_tiled4: main_tiled for a dense A (A_MODE 0) whose rows are whole vec4s
// (K and the row stride multiples of 4), reading A through a vec4 view of binding
// 0: one load per four values. Four consecutive invocations read 64 consecutive
// bytes of one row; staged value e of an invocation is row lid / 4 + 64 (e / 4),
// k = 4 (lid % 4) + e % 4.
// derive main_tiled4 from main_tiled: a_slot( -> a_slot4( ; tile_a( -> tile_a4(
@group(0) @binding(0) var<storage, read> a4v: array<vec4<act>>;

fn a_slot4(lid: u32, e: u32) -> vec2<u32> {
    return vec2<u32>(4u * (lid % 4u) + e % 4u, lid / 4u + 64u * (e / 4u));
}

fn tile_a4(k0: u32, k_end: u32, row0: u32, lid: u32, rv: array<RowView, TM_MAX>, ck: ConvK) -> array<f32, TM_MAX> {
    var ar: array<f32, TM_MAX>;
    for (var h = 0u; h < TM / 4u; h++) {
        let s = a_slot4(lid, 4u * h);
        let k = k0 + s.x;
        var v = vec4<f32>(0.0);
        // K ends on a whole vec4 and k_chunk is a multiple of TBK: a vec4 is all
        // in the K range or all out.
        if (k < k_end && row0 + s.y < p.M) {
            v = vec4<f32>(a4v[(rv[4u * h].base + k) / 4u]);
        }
        ar[4u * h] = v.x;
        ar[4u * h + 1u] = v.y;
        ar[4u * h + 2u] = v.z;
        ar[4u * h + 3u] = v.w;
    }
    return ar;
}

@compute @workgroup_size(256, 1, 1)
fn main_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row0 = wid.y * tbm();
    let col40 = wid.x * (TBN / 4u);
    let nc4 = (p.N + 3u) / 4u;
    let ts = tbm() / 4u + 1u;
    // This workgroup's K range (split-K along z).
    let k_begin = wid.z * p.k_chunk;
    let k_end = min(p.K, k_begin + p.k_chunk);
    var steps = 0u;
    if (k_end > k_begin) {
        steps = (k_end - k_begin + TBK - 1u) / TBK;
    }
    // The row views of the rows this invocation stages (row-wise modes).
    var rv: array<RowView, TM_MAX>;
    for (var e = 0u; e < TM; e++) {
        rv[e] = row_view(min(row0 + a_slot(lid, e).y, p.M - 1u));
    }
    var ck = ConvK(0u, 0u, 0u);
    if (A_MODE == 1u) {
        ck = conv_k_at(k_begin + lid % 16u);
    }
    var k0 = k_begin;
    var ar = tile_a(k0, k_end, row0, lid, rv, ck);
    var br = tile_b(k0, k_end, col40, lid);
    let tx = lid % 16u;
    let ty = lid / 16u;
    var acc: array<vec4<f32>, TM_MAX>;
    for (var s = 0u; s < steps; s++) {
        // Stage this step's operands.
        for (var e = 0u; e < TM; e++) {
            let sl = a_slot(lid, e);
            As[sl.x * ts + sl.y / 4u][sl.y % 4u] = ar[e];
        }
        if (B_MODE == 1u) {
            for (var e = 0u; e < 4u; e++) {
                let n = lid / 16u + 16u * e;
                Bs[(lid % 16u) * 17u + n / 4u][n % 4u] = br[e];
            }
        } else {
            Bs[(lid / 16u) * 17u + lid % 16u] = br;
        }
        workgroupBarrier();
        // Prefetch the next step into registers while this one is multiplied.
        if (s + 1u < steps) {
            k0 += TBK;
            if (A_MODE == 1u) {
                ck = conv_k_step(ck, TBK);
            }
            ar = tile_a(k0, k_end, row0, lid, rv, ck);
            br = tile_b(k0, k_end, col40, lid);
        }
        for (var kk = 0u; kk < TBK; kk++) {
            let bv = Bs[kk * 17u + tx];
            for (var q = 0u; q < TM / 4u; q++) {
                let av = As[kk * ts + ty * (TM / 4u) + q];
                acc[4u * q] += av.x * bv;
                acc[4u * q + 1u] += av.y * bv;
                acc[4u * q + 2u] += av.z * bv;
                acc[4u * q + 3u] += av.w * bv;
            }
        }
        workgroupBarrier();
    }
    let c4 = col40 + tx;
    if (c4 >= nc4) {
        return;
    }
    let rbase = row0 + ty * TM;
    if (SPLIT) {
        // Raw partial products; splitk_sum applies the epilogue.
        let col = c4 * 4u;
        for (var i = 0u; i < TM; i++) {
            let row = rbase + i;
            if (row < p.M) {
                let base = wid.z * p.M * p.N + row * p.N + col;
                for (var e = 0u; e < 4u; e++) {
                    if (col + e < p.N) {
                        c[base + e] = act(acc[i][e]);
                    }
                }
            }
        }
        return;
    }
    var bj = vec4<f32>();
    if (HAS_BIAS) {
        bj = bias[c4];
    }
    for (var i = 0u; i < TM; i++) {
        store_vec_tiled(rbase + i, c4, acc[i] + bj);
    }
}

// The second stage of a split-K GEMM: C[i] = epilogue(Σ_z part[z·M·N + i]) for
// the M·N outputs, the splits added in order (deterministic), partials read
// through binding 0.
@compute @workgroup_size(WG_X, WG_Y, 1)
fn splitk_sum(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG_X;
    let mn = p.M * p.N;
    if (i >= mn) {
        return;
    }
    var s = 0.0;
    for (var z = 0u; z < p.splits; z++) {
        s += f32(a[z * mn + i]);
    }
    let col = i % p.N;
    if (HAS_BIAS) {
        s += bias[col / 4u][col % 4u];
    }
    store_el(p.out_row_off * p.N + i, s);
}

// colsum_rows / colsum_tree: column sums of a [p.M rows, p.N] matrix in the GPU
// kernel set (bias gradients, LayerNorm's dγ, dβ), in two stages so that a tall
// matrix fills the GPU: invocation (j, col) of the first adds rows j, j + P,
// j + 2P, ... of a column (P = p.splits; consecutive invocations read
// consecutive columns), the second gives each column a workgroup that adds its
// P partials by a tree in workgroup memory. The order is fixed: deterministic.
@compute @workgroup_size(WG_X, WG_Y, 1)
fn colsum_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG_X;
    if (i >= p.splits * p.N) {
        return;
    }
    let col = i % p.N;
    var s = 0.0;
    for (var r = i / p.N; r < p.M; r += p.splits) {
        s += f32(a[r * p.N + col]);
    }
    c[i] = act(s);
}

const TREE: u32 = 64u;
var<workgroup> tree: array<f32, TREE>;

@compute @workgroup_size(64, 1, 1)
fn colsum_tree(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    // The column is uniform across the workgroup, so the early return is too.
    let col = wid.x + wid.y * nwg.x;
    if (col >= p.N) {
        return;
    }
    var s = 0.0;
    for (var j = lid; j < p.splits; j += TREE) {
        s += f32(a[j * p.N + col]);
    }
    tree[lid] = s;
    workgroupBarrier();
    for (var h = TREE / 2u; h > 0u; h /= 2u) {
        if (lid < h) {
            tree[lid] += tree[lid + h];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        c[col] = act(tree[0]);
    }
}

// im2col: materialises the A_MODE 1 view as a dense [M, K_out] matrix (zero
// columns past K), for the texture variant, which reads A through a texture.
// One invocation per element of the output.
@compute @workgroup_size(WG_X, WG_Y, 1)
fn im2col(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    // p.N holds K_out here; rows are spread over x and y to stay within the grid limit.
    let k = gid.x;
    let row = gid.y + gid.z * nwg.y * WG_Y;
    if (k >= p.N || row >= p.M) {
        return;
    }
    var v = 0.0;
    if (k < p.K) {
        v = load_a(row_view(row), k);
    }
    c[row * p.N + k] = act(v);
}

// col2im: the backward of the im2col view. Given dcols [M, K] (the gradient of
// the im2col matrix, M = batch * out_h * out_w, K = kh * kw * cin), writes the input
// gradient dx [batch, in_tokens, cin] for the spatial tokens (a cls token at
// in_tok_off gets nothing here). Each input element gathers the taps that read it,
// so there are no write conflicts. One invocation per input element.
@compute @workgroup_size(WG_X, WG_Y, 1)
fn col2im(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG_X;
    let hw = p.in_h * p.in_w;
    if (i >= p.M * hw * p.cin) {
        // p.M holds the batch here.
        return;
    }
    let ci = i % p.cin;
    let pix = (i / p.cin) % hw;
    let bi = i / (p.cin * hw);
    let iy = i32(pix / p.in_w);
    let ix = i32(pix % p.in_w);
    var acc = 0.0;
    for (var ky = 0u; ky < p.kh; ky++) {
        let ty = iy + i32(p.pad) - i32(ky);
        if (ty < 0 || ty % i32(p.stride) != 0) {
            continue;
        }
        let oy = u32(ty) / p.stride;
        if (oy >= p.out_h) {
            continue;
        }
        for (var kx = 0u; kx < p.kw; kx++) {
            let tx = ix + i32(p.pad) - i32(kx);
            if (tx < 0 || tx % i32(p.stride) != 0) {
                continue;
            }
            let ox = u32(tx) / p.stride;
            if (ox >= p.out_w) {
                continue;
            }
            let row = (bi * p.out_h + oy) * p.out_w + ox;
            acc += f32(a[row * p.K + (ky * p.kw + kx) * p.cin + ci]);
        }
    }
    let dst = (bi * p.in_tokens + p.in_tok_off + pix) * p.cin + ci;
    if (ACCUMULATE) {
        c[dst] = act(f32(c[dst]) + acc);
    } else {
        c[dst] = act(acc);
    }
}

// im2col4 / col2im4: the same on drivers that prefer texture operands, four
// columns per invocation (im2col4 takes any cin, col2im4 a multiple of 4): the
// token map (im2col) or dcols (col2im) is read as a linear texture through
// binding 5 (a copy; texel fetches are gathers where storage loads are per-lane
// loops), the result stored as vec4 through binding 8. One invocation per output
// vec4, flattened over the grid.
@compute @workgroup_size(WG_X, WG_Y, 1)
fn im2col4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG_X;
    let n4 = p.N / 4u;
    if (i >= p.M * n4) {
        return;
    }
    let row = i / n4;
    let k = (i % n4) * 4u;
    var v = vec4<f32>(0.0);
    let r = row_view(row);
    if (k < p.K && p.cin % 4u == 0u) {
        // Four channels of one tap: one texel.
        let tap = k / p.cin;
        let iy = r.iy0 + i32(tap / p.kw);
        let ix = r.ix0 + i32(tap % p.kw);
        if (iy >= 0 && ix >= 0 && iy < i32(p.in_h) && ix < i32(p.in_w)) {
            v = lin(a_tex, ((r.base + u32(iy) * p.in_w + u32(ix)) * p.cin + k % p.cin) / 4u);
        }
    } else {
        // Other widths (the RGB input): each value from its own texel. The tap
        // (ky, kx) and channel of k are found once and stepped: an integer
        // division runs lane by lane on a CPU driver, and this took four per value.
        var ci = k % p.cin;
        let tap = k / p.cin;
        var ky = tap / p.kw;
        var kx = tap % p.kw;
        for (var e = 0u; e < 4u; e++) {
            let iy = r.iy0 + i32(ky);
            let ix = r.ix0 + i32(kx);
            if (k + e < p.K && iy >= 0 && ix >= 0 && iy < i32(p.in_h) && ix < i32(p.in_w)) {
                let idx = (r.base + u32(iy) * p.in_w + u32(ix)) * p.cin + ci;
                v[e] = lin(a_tex, idx / 4u)[idx % 4u];
            }
            ci += 1u;
            if (ci == p.cin) {
                ci = 0u;
                kx += 1u;
                if (kx == p.kw) {
                    kx = 0u;
                    ky += 1u;
                }
            }
        }
    }
    // A chunk of images (the texture holds those images only): its rows start at
    // output row p.out_row_off.
    c4[p.out_row_off * n4 + i] = vec4<act>(v);
}

@compute @workgroup_size(WG_X, WG_Y, 1)
fn col2im4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG_X;
    let hw = p.in_h * p.in_w;
    let c4n = p.cin / 4u;
    if (i >= p.M * hw * c4n) {
        return;
    }
    let ci = (i % c4n) * 4u;
    let pix = (i / c4n) % hw;
    let bi = i / (c4n * hw);
    let iy = i32(pix / p.in_w);
    let ix = i32(pix % p.in_w);
    var acc = vec4<f32>(0.0);
    for (var ky = 0u; ky < p.kh; ky++) {
        let ty = iy + i32(p.pad) - i32(ky);
        let oy = u32(ty) / p.stride;
        let ok_y = ty >= 0 && ty % i32(p.stride) == 0 && oy < p.out_h;
        for (var kx = 0u; kx < p.kw; kx++) {
            let tx = ix + i32(p.pad) - i32(kx);
            let ox = u32(tx) / p.stride;
            if (ok_y && tx >= 0 && tx % i32(p.stride) == 0 && ox < p.out_w) {
                let row = (bi * p.out_h + oy) * p.out_w + ox;
                acc += lin(a_tex, (row * p.K + (ky * p.kw + kx) * p.cin + ci) / 4u);
            }
        }
    }
    let dst = ((bi * p.in_tokens + p.in_tok_off + pix) * p.cin + ci) / 4u;
    if (ACCUMULATE) {
        c4[dst] = vec4<act>(vec4<f32>(c4[dst]) + acc);
    } else {
        c4[dst] = vec4<act>(acc);
    }
}

// ---------------------------------------------------------------------------
// Texture-operand variant. A [M, K/4] and B [K, NP4] are rgba32float textures
// (a texel = 4 consecutive K values of A, or 4 consecutive N values of B). Chosen
// per adapter by a timed trial: some drivers vectorise texel fetches but not
// storage-buffer loads (Mesa 22.3's lavapipe runs the latter as a per-lane loop;
// docs/perf.md), and there a bigger block pays because fetches are cheap.
//
// Each invocation owns TRM (8 or 16) rows x 4 vec4 columns. The block is written out by hand
// rather than as loops over arrays: lavapipe does not unroll such nested loops, and
// the array form measured 2.6x slower with 10x the compile time (docs/perf.md).

fn mac(a: vec4<f32>, b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>) -> vec4<f32> {
    return a.x * b0 + a.y * b1 + a.z * b2 + a.w * b3;
}

@group(0) @binding(5) var a_tex: Tex;
@group(0) @binding(6) var b_tex: WTex;
// The bias as a linear texture (Graph::linear_texture_buf): a CPU driver runs a
// storage-buffer load as a loop over the SIMD lanes, and the bias loads from a
// buffer took 14% of the GEMM time at CvT-13's batch-1 shapes (docs/perf.md).
@group(0) @binding(9) var bias_t: Tex;

// Where main_tex finds its operands. Packed (0): a texture of exactly the
// operand, written by `pack`. Linear (TA 1, TB_LIN): a copy of the source buffer
// (or of a chunk of its rows) in a linear texture (Graph::linear_texture; vec4 i at (i & (W-1),
// i >> log2 W)), which a CPU driver fills with a memcpy instead of a pack pass;
// row r of A is vec4s a_off + r*a_stride .. (units of vec4, p.a_off and p.a_stride),
// row k of B likewise from p.b_off and p.b_stride. TA 2: A is the transpose of a
// linear source: one vec4 holds four rows of A at one k, so four of them,
// transposed in registers, give four rows times four k (the weight gradient Xᵀ·dY).
// The modes are override constants: as uniforms (a branch in the FMA loop) the
// kernel ran 2.5x slower on lavapipe (docs/perf.md).
override TA: u32 = 0u;

override TB_LIN: bool = false;
// Rows per invocation, 8 or 16 (Graph::tex_rows). 16 halves the B fetches per
// multiply-add and runs the GEMM 20-40% faster on lavapipe, but its pipelines take
// about three times as long to compile; the guards on this override compile out.
override TRM: u32 = 8u;
// Fetch A once per subgroup (see main_tex); needs subgroup operations.
override A_SHARE: bool = false;

// b_tex has a type of its own (WTex): weights may be stored as f16, and a
// storage-texture read names its format (see texread::prelude in the Rust source).
fn b_lin(i: u32) -> vec4<f32> {
    return wtexel(b_tex, lin_at(textureDimensions(b_tex).x, i));
}

fn a_row(kk: i32, r: i32) -> vec4<f32> {
    if (TA == 1u) {
        return lin(a_tex, (p.out_row_off + u32(r)) * p.a_stride + p.a_off + u32(kk));
    }
    return texel(a_tex, vec2<i32>(kk, r));
}

fn b_at(c: i32, k: i32) -> vec4<f32> {
    if (TB_LIN) {
        return b_lin(p.b_off + u32(k) * p.b_stride + u32(c));
    }
    return wtexel(b_tex, vec2<i32>(c, k));
}

// Training's activation, fused (ops::gemm::Epilogue). SAVE_Z: the forward also
// stores the pre-activation z (binding 7), which the backward needs. ACT_GRAD:
// the product is the activation's output gradient, and is stored times act'(z)
// instead of activated, z read from a linear texture (binding 11, whole vec4
// rows: N a multiple of 4). Either one saves a pass over the widest tensor of a
// block (the MLP's hidden layer) and its texture copies.
override SAVE_Z: bool = false;
override ACT_GRAD: bool = false;
@group(0) @binding(7) var<storage, read_write> zc: array<act>;
@group(0) @binding(11) var z_tex: Tex;

fn store_tex(row: u32, c4: u32, v: vec4<f32>) {
    let col = c4 * 4u;
    if (row >= p.M || col >= p.N) {
        return;
    }
    let base = (p.out_row_off + row) * p.N + col;
    var y: vec4<f32>;
    if (ACT_GRAD) {
        let z = lin(z_tex, (p.out_row_off + row) * (p.N / 4u) + c4);
        y = v * activate_grad4(z);
    } else {
        y = activate4(v);
    }
    for (var e = 0u; e < 4u; e++) {
        if (col + e < p.N) {
            if (SAVE_Z) {
                zc[base + e] = act(v[e]);
            }
            put(base + e, y[e]);
        }
    }
}

// derive main_tex_act from main_tex: store_vec( -> store_tex(
// main_tex_act, training's fused-activation GEMM, is main_tex with store_tex as
// its store, made from this text when the module is built (gpu::derive_entries):
// one source, while each pipeline compiles only its own entry point. Written as
// one entry point, main_tex's pipeline took 3-5x longer to create on lavapipe;
// with a shared tile function (a returned struct or private variables), its JIT
// took 20-45% longer (docs/perf.md).
@compute @workgroup_size(WG_X, WG_Y, 1)
fn main_tex(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    // The WG_X invocations of a workgroup cover 2^p.col_lanes_log2 column blocks and
    // the rest row blocks (ops::matmul::tex_grid): a narrow output keeps every
    // lane busy, with one pipeline for every shape.
    let lx = p.col_lanes_log2;
    let wx = 1u << lx;
    let col4 = (wid.x * wx + (lid & (wx - 1u))) * 4u;
    let row0 = (wid.y * (WG_X >> lx) + (lid >> lx)) * TRM;
    // A_SHARE: the host sets it where every lane of a subgroup has the same
    // rows (all 16 lanes split column blocks, or 8 do and the subgroups are those
    // runs of 8: ops::matmul::tex_block) and subgroups have 8 lanes or more. Lane i of a subgroup then fetches rows row0 + i and
    // row0 + 8 + i and takes the others from its neighbours by broadcast: 2 fetches
    // a lane instead of TRM. A fetch is ~47 instructions of JIT code on lavapipe,
    // a broadcast a few (docs/perf.md). Subgroup operations need every lane, so
    // no lane returns early for its columns: past the last one they compute
    // clamped columns and store nothing. (A runtime choice, a branch in the k
    // loop, ran the GEMM 0.82x.)
    let lane = sg_lane();
    if (row0 >= p.M || (col4 >= p.NP4 && !A_SHARE)) {
        return;
    }
    let ra = i32(min(row0 + lane, p.M - 1u));
    let rb = i32(min(row0 + 8u + lane, p.M - 1u));
    // Rows and columns past the end are clamped (computed, never stored).
    let c0 = i32(min(col4, p.NP4 - 1u));
    let c1 = i32(min(col4 + 1u, p.NP4 - 1u));
    let c2 = i32(min(col4 + 2u, p.NP4 - 1u));
    let c3 = i32(min(col4 + 3u, p.NP4 - 1u));
    let r0 = i32(min(row0 + 0u, p.M - 1u));
    let r1 = i32(min(row0 + 1u, p.M - 1u));
    let r2 = i32(min(row0 + 2u, p.M - 1u));
    let r3 = i32(min(row0 + 3u, p.M - 1u));
    let r4 = i32(min(row0 + 4u, p.M - 1u));
    let r5 = i32(min(row0 + 5u, p.M - 1u));
    let r6 = i32(min(row0 + 6u, p.M - 1u));
    let r7 = i32(min(row0 + 7u, p.M - 1u));
    let r8 = i32(min(row0 + 8u, p.M - 1u));
    let r9 = i32(min(row0 + 9u, p.M - 1u));
    let r10 = i32(min(row0 + 10u, p.M - 1u));
    let r11 = i32(min(row0 + 11u, p.M - 1u));
    let r12 = i32(min(row0 + 12u, p.M - 1u));
    let r13 = i32(min(row0 + 13u, p.M - 1u));
    let r14 = i32(min(row0 + 14u, p.M - 1u));
    let r15 = i32(min(row0 + 15u, p.M - 1u));
    var a0_0 = vec4<f32>(); var a0_1 = vec4<f32>(); var a0_2 = vec4<f32>(); var a0_3 = vec4<f32>();
    var a1_0 = vec4<f32>(); var a1_1 = vec4<f32>(); var a1_2 = vec4<f32>(); var a1_3 = vec4<f32>();
    var a2_0 = vec4<f32>(); var a2_1 = vec4<f32>(); var a2_2 = vec4<f32>(); var a2_3 = vec4<f32>();
    var a3_0 = vec4<f32>(); var a3_1 = vec4<f32>(); var a3_2 = vec4<f32>(); var a3_3 = vec4<f32>();
    var a4_0 = vec4<f32>(); var a4_1 = vec4<f32>(); var a4_2 = vec4<f32>(); var a4_3 = vec4<f32>();
    var a5_0 = vec4<f32>(); var a5_1 = vec4<f32>(); var a5_2 = vec4<f32>(); var a5_3 = vec4<f32>();
    var a6_0 = vec4<f32>(); var a6_1 = vec4<f32>(); var a6_2 = vec4<f32>(); var a6_3 = vec4<f32>();
    var a7_0 = vec4<f32>(); var a7_1 = vec4<f32>(); var a7_2 = vec4<f32>(); var a7_3 = vec4<f32>();
    var a8_0 = vec4<f32>(); var a8_1 = vec4<f32>(); var a8_2 = vec4<f32>(); var a8_3 = vec4<f32>();
    var a9_0 = vec4<f32>(); var a9_1 = vec4<f32>(); var a9_2 = vec4<f32>(); var a9_3 = vec4<f32>();
    var a10_0 = vec4<f32>(); var a10_1 = vec4<f32>(); var a10_2 = vec4<f32>(); var a10_3 = vec4<f32>();
    var a11_0 = vec4<f32>(); var a11_1 = vec4<f32>(); var a11_2 = vec4<f32>(); var a11_3 = vec4<f32>();
    var a12_0 = vec4<f32>(); var a12_1 = vec4<f32>(); var a12_2 = vec4<f32>(); var a12_3 = vec4<f32>();
    var a13_0 = vec4<f32>(); var a13_1 = vec4<f32>(); var a13_2 = vec4<f32>(); var a13_3 = vec4<f32>();
    var a14_0 = vec4<f32>(); var a14_1 = vec4<f32>(); var a14_2 = vec4<f32>(); var a14_3 = vec4<f32>();
    var a15_0 = vec4<f32>(); var a15_1 = vec4<f32>(); var a15_2 = vec4<f32>(); var a15_3 = vec4<f32>();
    // TA 2: the vec4 columns of the transposed source holding rows row0..+3,
    // row0+4..+7, ... (M is a multiple of 4 there, or the source's rows end in
    // zeros up to one: gemm::View::zero_pad; past the end, rows clamp to the last
    // group and are never stored).
    let last_g = max((p.M + 3u) / 4u, 1u) * 4u - 4u;
    let g0 = (p.out_row_off + row0) / 4u;
    let g1 = (p.out_row_off + min(row0 + 4u, last_g)) / 4u;
    let g2 = (p.out_row_off + min(row0 + 8u, last_g)) / 4u;
    let g3 = (p.out_row_off + min(row0 + 12u, last_g)) / 4u;
    for (var kk = 0; kk < i32(p.K / 4u); kk++) {
        let k = kk * 4;
        let b00 = b_at(c0, k + 0);
        let b01 = b_at(c1, k + 0);
        let b02 = b_at(c2, k + 0);
        let b03 = b_at(c3, k + 0);
        let b10 = b_at(c0, k + 1);
        let b11 = b_at(c1, k + 1);
        let b12 = b_at(c2, k + 1);
        let b13 = b_at(c3, k + 1);
        let b20 = b_at(c0, k + 2);
        let b21 = b_at(c1, k + 2);
        let b22 = b_at(c2, k + 2);
        let b23 = b_at(c3, k + 2);
        let b30 = b_at(c0, k + 3);
        let b31 = b_at(c1, k + 3);
        let b32 = b_at(c2, k + 3);
        let b33 = b_at(c3, k + 3);
        var x0: vec4<f32>;
        var x1: vec4<f32>;
        var x2: vec4<f32>;
        var x3: vec4<f32>;
        var x4: vec4<f32>;
        var x5: vec4<f32>;
        var x6: vec4<f32>;
        var x7: vec4<f32>;
        var x8: vec4<f32>;
        var x9: vec4<f32>;
        var x10: vec4<f32>;
        var x11: vec4<f32>;
        var x12: vec4<f32>;
        var x13: vec4<f32>;
        var x14: vec4<f32>;
        var x15: vec4<f32>;
        if (TA == 2u && A_SHARE) {
            // Shared, transposed: the 4·TRM/4 texels (four k rows of each 4-row
            // group) split over the subgroup's lanes, then transposed as below
            // (transpose() of the four k rows: a register renaming, no arithmetic).
            let base = p.a_off + u32(k) * p.a_stride;
            let sa = lin(a_tex, base + (lane % 4u) * p.a_stride + select(g0, g1, lane % 8u >= 4u));
            let m0 = transpose(mat4x4<f32>(bc0(sa), bc1(sa), bc2(sa), bc3(sa)));
            let m1 = transpose(mat4x4<f32>(bc4(sa), bc5(sa), bc6(sa), bc7(sa)));
            x0 = m0[0]; x1 = m0[1]; x2 = m0[2]; x3 = m0[3];
            x4 = m1[0]; x5 = m1[1]; x6 = m1[2]; x7 = m1[3];
            if (TRM > 8u) {
                let sb = lin(a_tex, base + (lane % 4u) * p.a_stride + select(g2, g3, lane % 8u >= 4u));
                let m2 = transpose(mat4x4<f32>(bc0(sb), bc1(sb), bc2(sb), bc3(sb)));
                let m3 = transpose(mat4x4<f32>(bc4(sb), bc5(sb), bc6(sb), bc7(sb)));
                x8 = m2[0]; x9 = m2[1]; x10 = m2[2]; x11 = m2[3];
                x12 = m3[0]; x13 = m3[1]; x14 = m3[2]; x15 = m3[3];
            }
        } else if (TA == 2u) {
            let base = p.a_off + u32(k) * p.a_stride;
            { let t0 = lin(a_tex, base + g0); let t1 = lin(a_tex, base + p.a_stride + g0);
              let t2 = lin(a_tex, base + 2u * p.a_stride + g0); let t3 = lin(a_tex, base + 3u * p.a_stride + g0);
              x0 = vec4<f32>(t0.x, t1.x, t2.x, t3.x);
              x1 = vec4<f32>(t0.y, t1.y, t2.y, t3.y);
              x2 = vec4<f32>(t0.z, t1.z, t2.z, t3.z);
              x3 = vec4<f32>(t0.w, t1.w, t2.w, t3.w);
            }
            { let t0 = lin(a_tex, base + g1); let t1 = lin(a_tex, base + p.a_stride + g1);
              let t2 = lin(a_tex, base + 2u * p.a_stride + g1); let t3 = lin(a_tex, base + 3u * p.a_stride + g1);
              x4 = vec4<f32>(t0.x, t1.x, t2.x, t3.x);
              x5 = vec4<f32>(t0.y, t1.y, t2.y, t3.y);
              x6 = vec4<f32>(t0.z, t1.z, t2.z, t3.z);
              x7 = vec4<f32>(t0.w, t1.w, t2.w, t3.w);
            }
            if (TRM > 8u) {
            { let t0 = lin(a_tex, base + g2); let t1 = lin(a_tex, base + p.a_stride + g2);
              let t2 = lin(a_tex, base + 2u * p.a_stride + g2); let t3 = lin(a_tex, base + 3u * p.a_stride + g2);
              x8 = vec4<f32>(t0.x, t1.x, t2.x, t3.x);
              x9 = vec4<f32>(t0.y, t1.y, t2.y, t3.y);
              x10 = vec4<f32>(t0.z, t1.z, t2.z, t3.z);
              x11 = vec4<f32>(t0.w, t1.w, t2.w, t3.w);
            }
            { let t0 = lin(a_tex, base + g3); let t1 = lin(a_tex, base + p.a_stride + g3);
              let t2 = lin(a_tex, base + 2u * p.a_stride + g3); let t3 = lin(a_tex, base + 3u * p.a_stride + g3);
              x12 = vec4<f32>(t0.x, t1.x, t2.x, t3.x);
              x13 = vec4<f32>(t0.y, t1.y, t2.y, t3.y);
              x14 = vec4<f32>(t0.z, t1.z, t2.z, t3.z);
              x15 = vec4<f32>(t0.w, t1.w, t2.w, t3.w);
            }
            }
        } else if (A_SHARE) {
            // Lane i holds rows i (sa) and 8 + i (sb); bcN(v) is lane N's v.
            let sa = a_row(kk, ra);
            x0 = bc0(sa); x1 = bc1(sa); x2 = bc2(sa); x3 = bc3(sa);
            x4 = bc4(sa); x5 = bc5(sa); x6 = bc6(sa); x7 = bc7(sa);
            if (TRM > 8u) {
                let sb = a_row(kk, rb);
                x8 = bc0(sb); x9 = bc1(sb); x10 = bc2(sb); x11 = bc3(sb);
                x12 = bc4(sb); x13 = bc5(sb); x14 = bc6(sb); x15 = bc7(sb);
            }
        } else {
            x0 = a_row(kk, r0);
            x1 = a_row(kk, r1);
            x2 = a_row(kk, r2);
            x3 = a_row(kk, r3);
            x4 = a_row(kk, r4);
            x5 = a_row(kk, r5);
            x6 = a_row(kk, r6);
            x7 = a_row(kk, r7);
            if (TRM > 8u) {
                x8 = a_row(kk, r8);
                x9 = a_row(kk, r9);
                x10 = a_row(kk, r10);
                x11 = a_row(kk, r11);
                x12 = a_row(kk, r12);
                x13 = a_row(kk, r13);
                x14 = a_row(kk, r14);
                x15 = a_row(kk, r15);
            }
        }
        a0_0 += mac(x0, b00, b10, b20, b30); a0_1 += mac(x0, b01, b11, b21, b31); a0_2 += mac(x0, b02, b12, b22, b32); a0_3 += mac(x0, b03, b13, b23, b33);
        a1_0 += mac(x1, b00, b10, b20, b30); a1_1 += mac(x1, b01, b11, b21, b31); a1_2 += mac(x1, b02, b12, b22, b32); a1_3 += mac(x1, b03, b13, b23, b33);
        a2_0 += mac(x2, b00, b10, b20, b30); a2_1 += mac(x2, b01, b11, b21, b31); a2_2 += mac(x2, b02, b12, b22, b32); a2_3 += mac(x2, b03, b13, b23, b33);
        a3_0 += mac(x3, b00, b10, b20, b30); a3_1 += mac(x3, b01, b11, b21, b31); a3_2 += mac(x3, b02, b12, b22, b32); a3_3 += mac(x3, b03, b13, b23, b33);
        a4_0 += mac(x4, b00, b10, b20, b30); a4_1 += mac(x4, b01, b11, b21, b31); a4_2 += mac(x4, b02, b12, b22, b32); a4_3 += mac(x4, b03, b13, b23, b33);
        a5_0 += mac(x5, b00, b10, b20, b30); a5_1 += mac(x5, b01, b11, b21, b31); a5_2 += mac(x5, b02, b12, b22, b32); a5_3 += mac(x5, b03, b13, b23, b33);
        a6_0 += mac(x6, b00, b10, b20, b30); a6_1 += mac(x6, b01, b11, b21, b31); a6_2 += mac(x6, b02, b12, b22, b32); a6_3 += mac(x6, b03, b13, b23, b33);
        a7_0 += mac(x7, b00, b10, b20, b30); a7_1 += mac(x7, b01, b11, b21, b31); a7_2 += mac(x7, b02, b12, b22, b32); a7_3 += mac(x7, b03, b13, b23, b33);
        if (TRM > 8u) {
            a8_0 += mac(x8, b00, b10, b20, b30); a8_1 += mac(x8, b01, b11, b21, b31); a8_2 += mac(x8, b02, b12, b22, b32); a8_3 += mac(x8, b03, b13, b23, b33);
            a9_0 += mac(x9, b00, b10, b20, b30); a9_1 += mac(x9, b01, b11, b21, b31); a9_2 += mac(x9, b02, b12, b22, b32); a9_3 += mac(x9, b03, b13, b23, b33);
            a10_0 += mac(x10, b00, b10, b20, b30); a10_1 += mac(x10, b01, b11, b21, b31); a10_2 += mac(x10, b02, b12, b22, b32); a10_3 += mac(x10, b03, b13, b23, b33);
            a11_0 += mac(x11, b00, b10, b20, b30); a11_1 += mac(x11, b01, b11, b21, b31); a11_2 += mac(x11, b02, b12, b22, b32); a11_3 += mac(x11, b03, b13, b23, b33);
            a12_0 += mac(x12, b00, b10, b20, b30); a12_1 += mac(x12, b01, b11, b21, b31); a12_2 += mac(x12, b02, b12, b22, b32); a12_3 += mac(x12, b03, b13, b23, b33);
            a13_0 += mac(x13, b00, b10, b20, b30); a13_1 += mac(x13, b01, b11, b21, b31); a13_2 += mac(x13, b02, b12, b22, b32); a13_3 += mac(x13, b03, b13, b23, b33);
            a14_0 += mac(x14, b00, b10, b20, b30); a14_1 += mac(x14, b01, b11, b21, b31); a14_2 += mac(x14, b02, b12, b22, b32); a14_3 += mac(x14, b03, b13, b23, b33);
            a15_0 += mac(x15, b00, b10, b20, b30); a15_1 += mac(x15, b01, b11, b21, b31); a15_2 += mac(x15, b02, b12, b22, b32); a15_3 += mac(x15, b03, b13, b23, b33);
        }
    }
    var bb0 = vec4<f32>(); var bb1 = vec4<f32>(); var bb2 = vec4<f32>(); var bb3 = vec4<f32>();
    if (HAS_BIAS) {
        bb0 = lin(bias_t, u32(c0)); bb1 = lin(bias_t, u32(c1)); bb2 = lin(bias_t, u32(c2)); bb3 = lin(bias_t, u32(c3));
    }
    store_vec(row0 + 0u, col4, a0_0 + bb0); store_vec(row0 + 0u, col4 + 1u, a0_1 + bb1); store_vec(row0 + 0u, col4 + 2u, a0_2 + bb2); store_vec(row0 + 0u, col4 + 3u, a0_3 + bb3);
    store_vec(row0 + 1u, col4, a1_0 + bb0); store_vec(row0 + 1u, col4 + 1u, a1_1 + bb1); store_vec(row0 + 1u, col4 + 2u, a1_2 + bb2); store_vec(row0 + 1u, col4 + 3u, a1_3 + bb3);
    store_vec(row0 + 2u, col4, a2_0 + bb0); store_vec(row0 + 2u, col4 + 1u, a2_1 + bb1); store_vec(row0 + 2u, col4 + 2u, a2_2 + bb2); store_vec(row0 + 2u, col4 + 3u, a2_3 + bb3);
    store_vec(row0 + 3u, col4, a3_0 + bb0); store_vec(row0 + 3u, col4 + 1u, a3_1 + bb1); store_vec(row0 + 3u, col4 + 2u, a3_2 + bb2); store_vec(row0 + 3u, col4 + 3u, a3_3 + bb3);
    store_vec(row0 + 4u, col4, a4_0 + bb0); store_vec(row0 + 4u, col4 + 1u, a4_1 + bb1); store_vec(row0 + 4u, col4 + 2u, a4_2 + bb2); store_vec(row0 + 4u, col4 + 3u, a4_3 + bb3);
    store_vec(row0 + 5u, col4, a5_0 + bb0); store_vec(row0 + 5u, col4 + 1u, a5_1 + bb1); store_vec(row0 + 5u, col4 + 2u, a5_2 + bb2); store_vec(row0 + 5u, col4 + 3u, a5_3 + bb3);
    store_vec(row0 + 6u, col4, a6_0 + bb0); store_vec(row0 + 6u, col4 + 1u, a6_1 + bb1); store_vec(row0 + 6u, col4 + 2u, a6_2 + bb2); store_vec(row0 + 6u, col4 + 3u, a6_3 + bb3);
    store_vec(row0 + 7u, col4, a7_0 + bb0); store_vec(row0 + 7u, col4 + 1u, a7_1 + bb1); store_vec(row0 + 7u, col4 + 2u, a7_2 + bb2); store_vec(row0 + 7u, col4 + 3u, a7_3 + bb3);
    if (TRM > 8u) {
        store_vec(row0 + 8u, col4, a8_0 + bb0); store_vec(row0 + 8u, col4 + 1u, a8_1 + bb1); store_vec(row0 + 8u, col4 + 2u, a8_2 + bb2); store_vec(row0 + 8u, col4 + 3u, a8_3 + bb3);
        store_vec(row0 + 9u, col4, a9_0 + bb0); store_vec(row0 + 9u, col4 + 1u, a9_1 + bb1); store_vec(row0 + 9u, col4 + 2u, a9_2 + bb2); store_vec(row0 + 9u, col4 + 3u, a9_3 + bb3);
        store_vec(row0 + 10u, col4, a10_0 + bb0); store_vec(row0 + 10u, col4 + 1u, a10_1 + bb1); store_vec(row0 + 10u, col4 + 2u, a10_2 + bb2); store_vec(row0 + 10u, col4 + 3u, a10_3 + bb3);
        store_vec(row0 + 11u, col4, a11_0 + bb0); store_vec(row0 + 11u, col4 + 1u, a11_1 + bb1); store_vec(row0 + 11u, col4 + 2u, a11_2 + bb2); store_vec(row0 + 11u, col4 + 3u, a11_3 + bb3);
        store_vec(row0 + 12u, col4, a12_0 + bb0); store_vec(row0 + 12u, col4 + 1u, a12_1 + bb1); store_vec(row0 + 12u, col4 + 2u, a12_2 + bb2); store_vec(row0 + 12u, col4 + 3u, a12_3 + bb3);
        store_vec(row0 + 13u, col4, a13_0 + bb0); store_vec(row0 + 13u, col4 + 1u, a13_1 + bb1); store_vec(row0 + 13u, col4 + 2u, a13_2 + bb2); store_vec(row0 + 13u, col4 + 3u, a13_3 + bb3);
        store_vec(row0 + 14u, col4, a14_0 + bb0); store_vec(row0 + 14u, col4 + 1u, a14_1 + bb1); store_vec(row0 + 14u, col4 + 2u, a14_2 + bb2); store_vec(row0 + 14u, col4 + 3u, a14_3 + bb3);
        store_vec(row0 + 15u, col4, a15_0 + bb0); store_vec(row0 + 15u, col4 + 1u, a15_1 + bb1); store_vec(row0 + 15u, col4 + 2u, a15_2 + bb2); store_vec(row0 + 15u, col4 + 3u, a15_3 + bb3);
    }
}

// subgroup_probe: 1 in c[lid] where this invocation's subgroup holds 8 lanes and
// all of them have the same lid / 8, i.e. the subgroups of a 16-invocation
// workgroup are its two runs of 8 (ops::matmul::subgroups_of_8). main_tex shares
// A across 8-lane halves of a workgroup only where every lane says 1.
@compute @workgroup_size(WG_X, WG_Y, 1)
fn subgroup_probe(@builtin(local_invocation_index) lid: u32) {
    // Both subgroup operations in every invocation (no short-circuit `&&`
    // between them, which would run the second under a varying condition).
    let same = sg_same(lid >> 3u);
    let n = sg_count();
    c[lid] = act(select(0.0, 1.0, same && n == 8u));
}

// ---------------------------------------------------------------------------
// pack: writes a logical matrix L [R, C] into an rgba32float texture of
// ceil(C/4) x R texels (texel (x, y) = L[y][4x .. 4x+4]) for main_tex, from a
// storage buffer in either orientation:
//   normal:     L[r][c] = src[off + r * stride + c]
//   transposed: L[r][c] = src[off + c * stride + r]
// Entries past (r_real, c_real) are written as zero, so a GEMM's K can be padded
// to the texture's multiple of 4 and its N to whole texels. This is how training
// (and layers whose K is not a multiple of 64) use the texture GEMM: dX = dY·Wᵀ
// packs W transposed, dW = Xᵀ·dY packs X transposed, with no copies of the
// buffers themselves. Their parameters are `PackParams` (`pk`, binding 4 seen
// with another type; `ops::gemm::PackParams` on the host).
struct PackParams {
    // The texture's size in texels, the logical matrix's real rows and columns.
    height: u32, width: u32, rows_real: u32, cols_real: u32,
    // The source view: first element, row stride, 1 if transposed.
    off: u32, stride: u32, transposed: u32, _pad: u32,
}
@group(0) @binding(4) var<uniform> pk: PackParams;
@group(0) @binding(7) var pack_out: OTex;
// The packed source as whole vec4s (pack4, pack4t): binding 1 seen as
// activations, f16 in an f16 plan. Inference packs only activations there (its
// weights are textures made at load); training, which packs weights, is f32.
@group(0) @binding(1) var<storage, read> a4: array<vec4<act>>;
// PACK_TEX: the source read from a linear-texture copy of its buffer instead
// (binding 10; Graph::linear_texture): on CPU drivers a storage load is a loop
// over the SIMD lanes and a texel fetch one gather (training's transposed weight
// packs, docs/perf.md). Both bindings are statically used: the other gets a
// placeholder.
override PACK_TEX: bool = false;
@group(0) @binding(10) var pack_src: Tex;

fn pack_src4(i: u32) -> vec4<f32> {
    if (PACK_TEX) {
        return lin(pack_src, i);
    }
    return vec4<f32>(a4[i]);
}

@compute @workgroup_size(WG_X, WG_Y, 1)
fn pack(@builtin(global_invocation_id) gid: vec3<u32>) {
    let x = gid.x;
    let y = gid.y;
    if (x >= pk.width || y >= pk.height) {
        return;
    }
    var v = vec4<f32>(0.0);
    if (y < pk.rows_real) {
        for (var e = 0u; e < 4u; e++) {
            let col = x * 4u + e;
            if (col < pk.cols_real) {
                if (pk.transposed != 0u) {
                    v[e] = f32(a[pk.off + col * pk.stride + y]);
                } else {
                    v[e] = f32(a[pk.off + y * pk.stride + col]);
                }
            }
        }
    }
    textureStore(pack_out, vec2<i32>(i32(x), i32(y)), v);
}

// pack4: the normal orientation when the view's start, row stride and column
// count are multiples of 4, reading whole vec4s (through binding 1, the same
// buffer viewed as vec4): a quarter of the loads of `pack`, which matters on
// drivers that run every storage load as its own loop (lavapipe).
@compute @workgroup_size(WG_X, WG_Y, 1)
fn pack4(@builtin(global_invocation_id) gid: vec3<u32>) {
    let x = gid.x;
    let y = gid.y;
    if (x >= pk.width || y >= pk.height) {
        return;
    }
    var v = vec4<f32>(0.0);
    if (y < pk.rows_real && x * 4u < pk.cols_real) {
        v = pack_src4((pk.off + y * pk.stride) / 4u + x);
    }
    textureStore(pack_out, vec2<i32>(i32(x), i32(y)), v);
}

// act_forward4 / act_backward4: the elementwise entries four values at a time
// when the length is a multiple of 4 (z through binding 1 as vec4, the output
// through binding 8); p.M counts vec4s.
@group(0) @binding(8) var<storage, read_write> c4: array<vec4<act>>;


@compute @workgroup_size(WG_X, WG_Y, 1)
fn act_forward4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG_X;
    if (i >= p.M) {
        return;
    }
    c4[i] = vec4<act>(activate4(b[i]));
}

// colsum_part / colsum_finish: column sums of a [p.M rows, p.N] matrix (p.N a
// multiple of 4) read as a linear texture (binding 6) on drivers that prefer
// texture operands (the CPU set): the bias gradient db, and LayerNorm's dγ, dβ.
// Invocation (j, c4) of the first pass sums rows j, j + P, j + 2P, ... (P = p.splits
// partial sums per column, no barrier) into part (binding 8); the second adds a
// column's P partials and stores its four values into c (binding 3).
@compute @workgroup_size(WG_X, WG_Y, 1)
fn colsum_part(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG_X;
    let n4 = p.N / 4u;
    if (i >= p.splits * n4) {
        return;
    }
    let c = i % n4;
    var s = vec4<f32>(0.0);
    for (var r = i / n4; r < p.M; r += p.splits) {
        s += b_lin(r * n4 + c);
    }
    c4[i] = vec4<act>(s);
}

@compute @workgroup_size(WG_X, WG_Y, 1)
fn colsum_finish(@builtin(global_invocation_id) gid: vec3<u32>) {
    let col = gid.x;
    let n4 = p.N / 4u;
    if (col >= n4) {
        return;
    }
    var s = vec4<f32>(0.0);
    for (var j = 0u; j < p.splits; j++) {
        s += vec4<f32>(c4[j * n4 + col]);
    }
    c[col * 4u] = act(s.x);
    c[col * 4u + 1u] = act(s.y);
    c[col * 4u + 2u] = act(s.z);
    c[col * 4u + 3u] = act(s.w);
}

// The same two on drivers that prefer texture operands: z (and dy) read from
// linear textures through bindings 5 and 6.
@compute @workgroup_size(WG_X, WG_Y, 1)
fn act_forward4_tex(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG_X;
    if (i >= p.M) {
        return;
    }
    // Inference reads z in chunks: texel i is vec4 out_row_off + i.
    c4[p.out_row_off + i] = vec4<act>(activate4(lin(a_tex, i)));
}

@compute @workgroup_size(WG_X, WG_Y, 1)
fn act_backward4_tex(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG_X;
    if (i >= p.M) {
        return;
    }
    let z = lin(a_tex, i);
    c4[p.out_row_off + i] = vec4<act>(b_lin(i) * activate_grad4(z));
}

@compute @workgroup_size(WG_X, WG_Y, 1)
fn act_backward4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG_X;
    if (i >= p.M) {
        return;
    }
    let z = b[i];
    c4[i] = vec4<act>(vec4<f32>(c4[i]) * activate_grad4(z));
}

// pack4t: the transposed orientation with aligned start and row stride, a 4x4
// block per invocation: four vec4 loads (four source rows, four consecutive
// columns) transposed in registers into four texels, instead of sixteen scalar
// loads. Invocation (x, by) writes texels (x, 4·by .. 4·by + 3).
@compute @workgroup_size(WG_X, WG_Y, 1)
fn pack4t(@builtin(global_invocation_id) gid: vec3<u32>) {
    let x = gid.x;
    let y0 = gid.y * 4u;
    if (x >= pk.width || y0 >= pk.height) {
        return;
    }
    // Written out (no private arrays): lavapipe keeps arrays in scratch memory.
    let base = (pk.off + x * 4u * pk.stride + y0) / 4u;
    let s4 = pk.stride / 4u;
    let ok = y0 < pk.rows_real;
    let c = x * 4u;
    let r0 = select(vec4<f32>(0.0), pack_src4(base), ok && c < pk.cols_real);
    let r1 = select(vec4<f32>(0.0), pack_src4(base + s4), ok && c + 1u < pk.cols_real);
    let r2 = select(vec4<f32>(0.0), pack_src4(base + 2u * s4), ok && c + 2u < pk.cols_real);
    let r3 = select(vec4<f32>(0.0), pack_src4(base + 3u * s4), ok && c + 3u < pk.cols_real);
    let xi = i32(x);
    let yi = i32(y0);
    // Rows past r_real (pk.rows_real) are zero; rows past the texture (pk.height) are not written.
    if (y0 < pk.height) {
        textureStore(pack_out, vec2<i32>(xi, yi), select(vec4<f32>(0.0), vec4<f32>(r0.x, r1.x, r2.x, r3.x), y0 < pk.rows_real));
    }
    if (y0 + 1u < pk.height) {
        textureStore(pack_out, vec2<i32>(xi, yi + 1), select(vec4<f32>(0.0), vec4<f32>(r0.y, r1.y, r2.y, r3.y), y0 + 1u < pk.rows_real));
    }
    if (y0 + 2u < pk.height) {
        textureStore(pack_out, vec2<i32>(xi, yi + 2), select(vec4<f32>(0.0), vec4<f32>(r0.z, r1.z, r2.z, r3.z), y0 + 2u < pk.rows_real));
    }
    if (y0 + 3u < pk.height) {
        textureStore(pack_out, vec2<i32>(xi, yi + 3), select(vec4<f32>(0.0), vec4<f32>(r0.w, r1.w, r2.w, r3.w), y0 + 3u < pk.rows_real));
    }
}
