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
//
// Every kernel here is depthwise (channels never mix), so each invocation works
// on four adjacent channels at once: T is vec4<f32>, and the host passes C and
// all element counts in units of four channels (C is a multiple of 4: heads have
// widths that are). One vec4 load instead of four scalar ones per access: 4x
// fewer loads where a driver runs each load as its own loop (lavapipe).
alias T = vec4<f32>;

override WG: u32 = 64u;

// b_off: first image of this dispatch (the texture variant splits the batch).
// b_off: first image of this dispatch; accumulate: dw_sum_partials adds into dw
// (every dispatch after the first); parts: partial sums per channel group
// (bn_part, bn_finish).
struct Params { B: u32, H: u32, W: u32, C: u32, cls: u32, Hk: u32, Wk: u32, total: u32, b_off: u32, accumulate: u32, parts: u32, _pad: u32 }

@group(0) @binding(0) var<storage, read> x: array<vec4<act>>;
@group(0) @binding(1) var<storage, read> w: array<T>;
@group(0) @binding(2) var<storage, read> bias: array<T>;
@group(0) @binding(3) var<storage, read_write> q: array<vec4<act>>;
@group(0) @binding(4) var<storage, read_write> k: array<vec4<act>>;
@group(0) @binding(5) var<storage, read_write> v: array<vec4<act>>;
@group(0) @binding(6) var<uniform> p: Params;

// (channel, token, image) of element n of a [B, cls + H*W, C] map.
fn element(n: u32) -> vec3<u32> {
    let tq = p.cls + p.H * p.W;
    return vec3<u32>(n % p.C, (n / p.C) % tq, n / (p.C * tq));
}

// One source for both variants: `main` reads the token map, folded weights and
// bias from buffers (the GPU set); main_tex, derived below, from textures (the
// CPU set: a texel fetch is vectorised across lanes on CPU drivers, a storage
// load is not), where the map's texture holds the images [b_off, b_off + B) of
// this dispatch only, one row per token. The outputs are the whole batch's
// buffers in both.
// derive main_tex from main: cls_value( -> cls_value_tex( ; tap( -> tap_tex( ; bias_of( -> bias_tex( ; conv9( -> conv9_tex(
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
    let e = element(n);
    let c = e.x;
    let t = e.y;
    // Image bl of this dispatch, image bi of the batch.
    let bl = e.z;
    let bi = p.b_off + bl;
    if (t < p.cls) {
        let val = cls_value(bl * tq, c);
        q[bi * tq * C + c] = vec4<act>(val);
        k[bi * tk * C + c] = vec4<act>(val);
        v[bi * tk * C + c] = vec4<act>(val);
        return;
    }
    let pix = t - p.cls;
    let y = i32(pix / p.W);
    let xx = i32(pix % p.W);
    let row0 = bl * tq + p.cls;
    // The 3x3 window in nine named values, not an array: CPU drivers put private
    // arrays in memory (lavapipe: scratch loads and stores per element).
    let x0 = tap(row0, y - 1, xx - 1, c);
    let x1 = tap(row0, y - 1, xx, c);
    let x2 = tap(row0, y - 1, xx + 1, c);
    let x3 = tap(row0, y, xx - 1, c);
    let x4 = tap(row0, y, xx, c);
    let x5 = tap(row0, y, xx + 1, c);
    let x6 = tap(row0, y + 1, xx - 1, c);
    let x7 = tap(row0, y + 1, xx, c);
    let x8 = tap(row0, y + 1, xx + 1, c);
    q[(bi * tq + t) * C + c] = vec4<act>(bias_of(c) + conv9(0u, c, x0, x1, x2, x3, x4, x5, x6, x7, x8));
    if ((y & 1) == 0 && (xx & 1) == 0) {
        let kidx = (bi * tk + p.cls + u32(y / 2) * p.Wk + u32(xx / 2)) * C + c;
        k[kidx] = vec4<act>(bias_of(C + c) + conv9(9u, c, x0, x1, x2, x3, x4, x5, x6, x7, x8));
        v[kidx] = vec4<act>(bias_of(2u * C + c) + conv9(18u, c, x0, x1, x2, x3, x4, x5, x6, x7, x8));
    }
}

// The map's value at row `row` (a cls token), channel group c.
fn cls_value(row: u32, c: u32) -> T {
    return vec4<f32>(x[row * p.C + c]);
}

// Input pixel (iy, ix) of the map whose first spatial row is `row0`, zero outside.
fn tap(row0: u32, iy: i32, ix: i32, c: u32) -> T {
    if (iy >= 0 && ix >= 0 && iy < i32(p.H) && ix < i32(p.W)) {
        return vec4<f32>(x[(row0 + u32(iy) * p.W + u32(ix)) * p.C + c]);
    }
    return T(0.0);
}

fn bias_of(i: u32) -> T {
    return bias[i];
}

// Σ_tap w[o + tap] · x_tap: one 3x3 depthwise output (o = 0, 9, 18 for q, k, v).
fn conv9(o: u32, c: u32, x0: T, x1: T, x2: T, x3: T, x4: T, x5: T, x6: T, x7: T, x8: T) -> T {
    let C = p.C;
    return w[o * C + c] * x0 + w[(o + 1u) * C + c] * x1 + w[(o + 2u) * C + c] * x2
         + w[(o + 3u) * C + c] * x3 + w[(o + 4u) * C + c] * x4 + w[(o + 5u) * C + c] * x5
         + w[(o + 6u) * C + c] * x6 + w[(o + 7u) * C + c] * x7 + w[(o + 8u) * C + c] * x8;
}

// main_tex's operands: the token map, the folded weights as [27 rows (map * 9 +
// tap), C texels] and the bias [3, C] as a linear texture (from a storage buffer
// each load is a loop over the SIMD lanes on CPU drivers, see rownorm.wgsl).
@group(0) @binding(17) var x_tex: Tex;
@group(0) @binding(18) var w_tex: Tex;
@group(0) @binding(19) var bias_t: Tex;

fn cls_value_tex(row: u32, c: u32) -> T {
    return texel(x_tex, vec2<i32>(i32(c), i32(row)));
}

fn tap_tex(row0: u32, iy: i32, ix: i32, c: u32) -> T {
    if (iy >= 0 && ix >= 0 && iy < i32(p.H) && ix < i32(p.W)) {
        return texel(x_tex, vec2<i32>(i32(c), i32(row0) + iy * i32(p.W) + ix));
    }
    return T(0.0);
}

fn bias_tex(i: u32) -> T {
    return lin(bias_t, i);
}

fn conv9_tex(o: u32, c: u32, x0: T, x1: T, x2: T, x3: T, x4: T, x5: T, x6: T, x7: T, x8: T) -> T {
    let ci = i32(c);
    let oi = i32(o);
    return texel(w_tex, vec2<i32>(ci, oi)) * x0 + texel(w_tex, vec2<i32>(ci, oi + 1)) * x1
         + texel(w_tex, vec2<i32>(ci, oi + 2)) * x2 + texel(w_tex, vec2<i32>(ci, oi + 3)) * x3
         + texel(w_tex, vec2<i32>(ci, oi + 4)) * x4 + texel(w_tex, vec2<i32>(ci, oi + 5)) * x5
         + texel(w_tex, vec2<i32>(ci, oi + 6)) * x6 + texel(w_tex, vec2<i32>(ci, oi + 7)) * x7
         + texel(w_tex, vec2<i32>(ci, oi + 8)) * x8;
}

// ---------------------------------------------------------------------------
// Training: the same projection with BatchNorm in train mode. The forward runs
// `main` with the raw (unfolded) weights and zero bias to get the pre-BN maps,
// then `bn_train` per map; the backward runs `bn_backward` per map, then
// `dwconv_backward_w` and `dwconv_backward_x`.
//
// BN kernels work on one map [B, cls + H*W, C] (H, W of that map in p.H, p.W) with
// one invocation per channel: batch statistics over the B*H*W spatial rows (the cls
// row bypasses BN, forward and backward), the biased variance to normalise and
// the unbiased one for the running estimate (momentum 0.1, as PyTorch).

const BN_EPS: f32 = 1e-5;
const BN_MOMENTUM: f32 = 0.1;
// Eval-mode BatchNorm while training other parameters (fine-tuning with frozen
// statistics): normalise by the running statistics, leave them unchanged, and
// backpropagate through a fixed affine map.
override BN_EVAL: bool = false;

@group(0) @binding(7) var<storage, read_write> stats: array<T>;     // [mean C | rstd C]
@group(0) @binding(8) var<storage, read_write> running: array<T>;   // [mean C | var C]
@group(0) @binding(9) var<storage, read> pre: array<T>;
@group(0) @binding(10) var<storage, read_write> post: array<T>;
@group(0) @binding(11) var<storage, read> dpost: array<T>;
@group(0) @binding(12) var<storage, read_write> dpre: array<T>;
@group(0) @binding(13) var<storage, read_write> dgamma: array<T>;
@group(0) @binding(16) var<storage, read_write> dbeta: array<T>;
@group(0) @binding(14) var<storage, read_write> dw: array<T>;       // [3, 9, C]
@group(0) @binding(15) var<storage, read_write> dx: array<T>;

fn map_row(bi: u32, pix: u32) -> u32 {
    return (bi * (p.cls + p.H * p.W) + p.cls + pix) * p.C;
}

// A workgroup's sum of one value per invocation, by a tree in workgroup memory
// (bn_finish, dwconv_backward_w). WG = 1 (CPU drivers' one-lane workgroups): the
// invocation already holds the whole sum, and no barrier is compiled.
var<workgroup> red: array<T, WG>;

fn reduce_sum(val: T, lid: u32) -> T {
    if (WG == 1u) {
        return val;
    }
    red[lid] = val;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

// The CPU set's BatchNorm kernels ("channels per lane"): invocation lid of
// workgroup wid takes channel group wid * WG + lid and walks every row itself: a
// workgroup's invocations are SIMD lanes on a CPU driver, and the former shape (a
// one-lane workgroup per channel group) used one lane of eight. The row loop is
// the same in every lane, so each step loads adjacent channel groups. No barrier.
// The GPU set's are bn_part, bn_finish and the element-wise passes below.
fn bn_channel(wid: vec3<u32>, lid: u32) -> u32 {
    return wid.x * WG + lid;
}

// Where the CPU set's loops are in the map, kept by counting instead of
// dividing: an integer division is scalarised lane by lane on a CPU driver, and
// two of them per row (i / hw, i % hw) cost more than the load. .x: map row of
// spatial row i (its image's cls rows skipped), .y: i's pixel within its image.
fn walk_start() -> vec2<u32> {
    return vec2<u32>(p.cls, 0u);
}

fn walk_next(w: vec2<u32>, hw: u32) -> vec2<u32> {
    if (w.y + 1u == hw) {
        return vec2<u32>(w.x + 1u + p.cls, 0u);
    }
    return w + vec2<u32>(1u);
}

// Element offset of the spatial row at walk position w (channel group 0).
fn spatial_row(w: vec2<u32>) -> u32 {
    return w.x * p.C;
}

// Whether the token counted by t (within its image) is a cls row (passed
// through by the BN kernels).
fn is_cls_row(t: u32) -> bool {
    return p.cls == 1u && t == 0u;
}

fn next_token(t: u32, hw: u32) -> u32 {
    return select(t + 1u, 0u, t + 1u == p.cls + hw);
}

// The CPU set's BN kernels read the map (pre) and its gradient (dpost) as
// linear textures (Graph::linear_texture): a texel fetch is a gather on a CPU
// driver, a storage load a loop over the lanes.
@group(0) @binding(23) var pre_t: Tex;
@group(0) @binding(24) var dpost_t: Tex;

fn pre_at(r: u32) -> T {
    return lin(pre_t, r);
}

fn dpost_at(r: u32) -> T {
    return lin(dpost_t, r);
}

// Spatial row i of image (i / hw) in a map of cls + hw tokens per image.
fn flat_row(i: u32, hw: u32) -> u32 {
    return map_row(i / hw, i % hw);
}

// The end of the variance pass, shared by both sets: rstd from the sum of
// squared deviations s2 over n rows, and the running statistics' update
// (unbiased variance, momentum 0.1, as PyTorch).
fn bn_var_finish(c: u32, mean: T, s2: T, n: f32) {
    let var_b = s2 / n;
    stats[p.C + c] = inverseSqrt(var_b + BN_EPS);
    let unbiased = select(var_b, s2 / (n - 1.0), n > 1.0);
    running[c] = (1.0 - BN_MOMENTUM) * running[c] + BN_MOMENTUM * mean;
    running[p.C + c] = (1.0 - BN_MOMENTUM) * running[p.C + c] + BN_MOMENTUM * unbiased;
}

// The BN backward as dpre = a·dy + e·pre + f per channel group c over n rows:
// γ·rstd·(dy − dβ/n − x̂·dγ/n) with x̂ = (pre − μ)·rstd (eval mode: γ·rstd·dy).
fn bn_backward_coefficients(c: u32, n: f32) -> array<T, 3> {
    let mean = stats[c];
    let rstd = stats[p.C + c];
    let a = w[c] * rstd;
    var e = T();
    var f = T();
    if (!BN_EVAL) {
        let b = a * dgamma[c] / n;
        e = -b * rstd;
        f = b * rstd * mean - a * dbeta[c] / n;
    }
    return array<T, 3>(a, e, f);
}

// Train-mode BN runs as three kernels, each with a single pass over the rows:
// bn_mean (μ into stats[c]), bn_var (rstd into stats[C + c], and the running
// update), bn_apply (normalise; the cls row bypasses). One kernel with the passes
// in sequence, as before, made lavapipe 22.3 leak ~150 KB per dispatch (a
// training run grew ~4 MB per step and slowed by a third over four epochs);
// single-pass kernels do not (docs/perf.md). All three statically use the same
// bindings: gamma at w's slot (1), beta at bias's slot (2), p, stats, running,
// pre, post. The CPU set's kernels (see bn_channel).
fn bn_bindings() {
    _ = arrayLength(&w);
    _ = arrayLength(&bias);
    _ = arrayLength(&stats);
    _ = arrayLength(&running);
    _ = arrayLength(&pre);
    _ = arrayLength(&post);
    _ = textureDimensions(pre_t);
}

@compute @workgroup_size(WG)
fn bn_mean(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    bn_bindings();
    let c = bn_channel(wid, lid);
    if (c >= p.C) {
        return;
    }
    let hw = p.H * p.W;
    let total = p.B * hw;
    if (BN_EVAL) {
        stats[c] = running[c];
        return;
    }
    var s = T(0.0);
    var w = walk_start();
    for (var i = 0u; i < total; i++) {
        s += pre_at(spatial_row(w) + c);
        w = walk_next(w, hw);
    }
    stats[c] = s / f32(total);
}

@compute @workgroup_size(WG)
fn bn_var(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    bn_bindings();
    let c = bn_channel(wid, lid);
    if (c >= p.C) {
        return;
    }
    let hw = p.H * p.W;
    let total = p.B * hw;
    if (BN_EVAL) {
        // The statistics are the running ones, left unchanged.
        stats[p.C + c] = inverseSqrt(running[p.C + c] + BN_EPS);
        return;
    }
    let mean = stats[c];
    var s2 = T(0.0);
    var w = walk_start();
    for (var i = 0u; i < total; i++) {
        let d = pre_at(spatial_row(w) + c) - mean;
        s2 += d * d;
        w = walk_next(w, hw);
    }
    bn_var_finish(c, mean, s2, f32(total));
}

@compute @workgroup_size(WG)
fn bn_apply(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    bn_bindings();
    let c = bn_channel(wid, lid);
    if (c >= p.C) {
        return;
    }
    let hw = p.H * p.W;
    let scale = stats[p.C + c] * w[c];
    let shift = bias[c] - stats[c] * scale;
    // One loop over every row, the cls rows (bypassed) included: a second loop
    // for them made lavapipe 22.3 leak ~140 KB per dispatch (docs/perf.md).
    let rows = p.B * (p.cls + hw);
    var t = 0u;
    for (var i = 0u; i < rows; i++) {
        let r = i * p.C + c;
        let v = pre_at(r);
        post[r] = select(v * scale + shift, v, is_cls_row(t));
        t = next_token(t, hw);
    }
}

// BN backward in two single-pass kernels (see above): bn_backward_sums writes
// dβ = Σ dy and dγ = Σ dy·x̂ per channel; bn_backward_apply reads them back for
//   dpre = γ·rstd·(dy − dβ/n − x̂·dγ/n)   (eval mode: γ·rstd·dy).
// Both statically use gamma (1), p, stats, pre, dpost, dpre, dgamma, dbeta.
fn bn_backward_bindings() {
    _ = arrayLength(&w);
    _ = arrayLength(&stats);
    _ = arrayLength(&pre);
    _ = arrayLength(&dpost);
    _ = textureDimensions(pre_t);
    _ = textureDimensions(dpost_t);
    _ = arrayLength(&dpre);
    _ = arrayLength(&dgamma);
    _ = arrayLength(&dbeta);
}

@compute @workgroup_size(WG)
fn bn_backward_sums(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    bn_backward_bindings();
    let c = bn_channel(wid, lid);
    if (c >= p.C) {
        return;
    }
    let hw = p.H * p.W;
    let total = p.B * hw;
    let mean = stats[c];
    let rstd = stats[p.C + c];
    var a = T(0.0);
    var bsum = T(0.0);
    var w = walk_start();
    for (var i = 0u; i < total; i++) {
        let r = spatial_row(w) + c;
        let dy = dpost_at(r);
        a += dy;
        bsum += dy * (pre_at(r) - mean) * rstd;
        w = walk_next(w, hw);
    }
    dgamma[c] = bsum;
    dbeta[c] = a;
}

@compute @workgroup_size(WG)
fn bn_backward_apply(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    bn_backward_bindings();
    let c = bn_channel(wid, lid);
    if (c >= p.C) {
        return;
    }
    let hw = p.H * p.W;
    let k = bn_backward_coefficients(c, f32(p.B * hw));
    // One loop, cls rows (passed through) included: see bn_apply.
    let rows = p.B * (p.cls + hw);
    var t = 0u;
    for (var i = 0u; i < rows; i++) {
        let r = i * p.C + c;
        let dy = dpost_at(r);
        dpre[r] = select(k[0] * dy + k[1] * pre_at(r) + k[2], dy, is_cls_row(t));
        t = next_token(t, hw);
    }
}

// The GPU set's BatchNorm. Statistics and backward sums in two stages over the
// rows, so a map fills a large GPU whatever its channel count (stage 0 has 16
// channel groups, whose rows one workgroup each had walked):
// - bn_part: invocation (j, c) of p.parts x C partials adds spatial rows j,
//   j + parts, ... of channel group c (consecutive invocations: consecutive
//   channel groups of a row);
// - bn_finish: a workgroup per channel group adds its partials by a tree in
//   workgroup memory, in a fixed order.
// STAT picks the sums: 0 the mean and variance (and the running update) in one
// read of the map, 1 Σdy and Σdy·x̂ (dβ, dγ). Eval-mode statistics skip bn_part.
// The apply passes (bn_apply_el, bn_backward_apply_el) run one invocation per
// vec4 of the map.
// STAT 0: each partial j keeps its own mean m_j and M2_j = Σ(x − m_j)², from sums
// shifted by its first value K (Σ(x − K), Σ(x − K)²: no cancellation while K is
// near the data, as one of them is); bn_finish combines them by Chan et al.'s
// formula, μ = Σ n_j·m_j / n, M2 = Σ M2_j + n_j·(m_j − μ)², as stable as a
// two-pass mean then variance, with one read of the map instead of two.
override STAT: u32 = 0u;
@group(0) @binding(26) var<storage, read_write> sums: array<T>;

// Rows of partial j: j, j + parts, ... below `total`.
fn part_rows(j: u32, total: u32) -> u32 {
    return select(0u, (total - j + p.parts - 1u) / p.parts, j < total);
}

@compute @workgroup_size(WG)
fn bn_part(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.parts * p.C) {
        return;
    }
    let c = i % p.C;
    let hw = p.H * p.W;
    let total = p.B * hw;
    let j = i / p.C;
    // STAT 0: the shift K; 1: the mean, for x̂.
    var shift = T();
    var rstd = T();
    if (STAT == 0u && j < total) {
        shift = pre[flat_row(j, hw) + c];
    } else if (STAT == 1u) {
        shift = stats[c];
        rstd = stats[p.C + c];
    }
    var s = T();
    var s2 = T();
    for (var r = j; r < total; r += p.parts) {
        let e = flat_row(r, hw) + c;
        let d = pre[e] - shift;
        if (STAT == 0u) {
            s += d;
            s2 += d * d;
        } else {
            let dy = dpost[e];
            s += dy;
            s2 += dy * d * rstd;
        }
    }
    if (STAT == 0u) {
        // (m_j, M2_j); a partial with no rows holds (0, 0) and counts 0.
        let nj = max(f32(part_rows(j, total)), 1.0);
        s2 -= s * s / nj;
        s = shift + s / nj;
    }
    sums[i] = s;
    sums[p.parts * p.C + i] = s2;
}

@compute @workgroup_size(WG)
fn bn_finish(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    // A workgroup per channel group: c is uniform, and so is this return.
    let c = wid.x;
    if (c >= p.C) {
        return;
    }
    let total = p.B * p.H * p.W;
    let n = f32(total);
    if (BN_EVAL && STAT == 0u) {
        if (lid == 0u) {
            stats[c] = running[c];
            stats[p.C + c] = inverseSqrt(running[p.C + c] + BN_EPS);
        }
        return;
    }
    // STAT 0: Σ n_j·m_j first (μ), then Σ M2_j + n_j·(m_j − μ)²; STAT 1: the two sums.
    var s = T();
    var s2 = T();
    for (var j = lid; j < p.parts; j += WG) {
        let a = sums[j * p.C + c];
        if (STAT == 0u) {
            s += f32(part_rows(j, total)) * a;
        } else {
            s += a;
            s2 += sums[(p.parts + j) * p.C + c];
        }
    }
    let sum = reduce_sum(s, lid);
    let mean = sum / n;
    if (STAT == 0u) {
        for (var j = lid; j < p.parts; j += WG) {
            let d = sums[j * p.C + c] - mean;
            s2 += sums[(p.parts + j) * p.C + c] + f32(part_rows(j, total)) * d * d;
        }
    }
    let sum2 = reduce_sum(s2, lid);
    if (lid == 0u) {
        if (STAT == 0u) {
            stats[c] = mean;
            bn_var_finish(c, mean, sum2, n);
        } else {
            dgamma[c] = sum2;
            dbeta[c] = sum;
        }
    }
}

// The element (vec4) of a map of B·(cls + hw) rows this invocation takes, or
// none (past the end).
fn el_index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    let i = gid.x + gid.y * nwg.x * WG;
    return select(0xffffffffu, i, i < p.B * (p.cls + p.H * p.W) * p.C);
}

// Element i's channel group, and whether its row is a cls row (passed through).
fn el_channel(i: u32) -> u32 {
    return i % p.C;
}

fn el_is_cls(i: u32, hw: u32) -> bool {
    return p.cls == 1u && (i / p.C) % (1u + hw) == 0u;
}

@compute @workgroup_size(WG)
fn bn_apply_el(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = el_index(gid, nwg);
    if (i == 0xffffffffu) {
        return;
    }
    let hw = p.H * p.W;
    let c = el_channel(i);
    let scale = stats[p.C + c] * w[c];
    let shift = bias[c] - stats[c] * scale;
    let v = pre[i];
    post[i] = select(v * scale + shift, v, el_is_cls(i, hw));
}

@compute @workgroup_size(WG)
fn bn_backward_apply_el(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = el_index(gid, nwg);
    if (i == 0xffffffffu) {
        return;
    }
    let hw = p.H * p.W;
    let k = bn_backward_coefficients(el_channel(i), f32(p.B * hw));
    let dy = dpost[i];
    dpre[i] = select(k[0] * dy + k[1] * pre[i] + k[2], dy, el_is_cls(i, hw));
}

// Weight gradient of the three depthwise convs: one workgroup per (map m, channel
// group c), its invocations striding over output rows (image, oy); each output
// position's gradient is loaded once and multiplied into all nine taps, held in
// named accumulators (no private array), and the row loop needs no per-element
// division. q, k, v hold the pre-BN gradients here; p.H, p.W is the input grid,
// p.Hk, p.Wk the k/v grid; dw is [3, 9, C].
@compute @workgroup_size(WG)
fn dwconv_backward_w(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = wid.x % p.C;
    let m = wid.x / p.C;
    let stride = select(2, 1, m == 0u);
    let oh = select(p.Hk, p.H, m == 0u);
    let ow = select(p.Wk, p.W, m == 0u);
    let tq = p.cls + p.H * p.W;
    let to = p.cls + oh * ow;
    var a0 = T(0.0);
    var a1 = T(0.0);
    var a2 = T(0.0);
    var a3 = T(0.0);
    var a4 = T(0.0);
    var a5 = T(0.0);
    var a6 = T(0.0);
    var a7 = T(0.0);
    var a8 = T(0.0);
    for (var r = lid; r < p.B * oh; r += WG) {
        let bi = r / oh;
        let oy = r % oh;
        let base = bi * tq + p.cls;
        let y = i32(oy) * stride;
        let grow = bi * to + p.cls + oy * ow;
        for (var ox = 0u; ox < ow; ox++) {
            let g = dgrad(m, grow + ox, c);
            let xx = i32(ox) * stride;
            a0 += g * tap(base, y - 1, xx - 1, c);
            a1 += g * tap(base, y - 1, xx, c);
            a2 += g * tap(base, y - 1, xx + 1, c);
            a3 += g * tap(base, y, xx - 1, c);
            a4 += g * tap(base, y, xx, c);
            a5 += g * tap(base, y, xx + 1, c);
            a6 += g * tap(base, y + 1, xx - 1, c);
            a7 += g * tap(base, y + 1, xx, c);
            a8 += g * tap(base, y + 1, xx + 1, c);
        }
    }
    store_taps(m, c, lid, a0, a1, a2, a3, a4, a5, a6, a7, a8);
}

// Row `row` of map m's gradient (q, k or v), channel group c.
fn dgrad(m: u32, row: u32, c: u32) -> T {
    let o = row * p.C + c;
    if (m == 0u) {
        return vec4<f32>(q[o]);
    } else if (m == 1u) {
        return vec4<f32>(k[o]);
    }
    return vec4<f32>(v[o]);
}

// The workgroup's sums of the tap accumulators into dw.
fn store_taps(m: u32, c: u32, lid: u32, a0: T, a1: T, a2: T, a3: T, a4: T, a5: T, a6: T, a7: T, a8: T) {
    store_dw(m * 9u * p.C + c, lid, false, a0, a1, a2, a3, a4, a5, a6, a7, a8);
}

// Sums the nine tap accumulators over the workgroup and writes (or, `add`, adds)
// them to dw[d + tap * C].
fn store_dw(d: u32, lid: u32, add: bool, a0: T, a1: T, a2: T, a3: T, a4: T, a5: T, a6: T, a7: T, a8: T) {
    let r0 = reduce_sum(a0, lid);
    let r1 = reduce_sum(a1, lid);
    let r2 = reduce_sum(a2, lid);
    let r3 = reduce_sum(a3, lid);
    let r4 = reduce_sum(a4, lid);
    let r5 = reduce_sum(a5, lid);
    let r6 = reduce_sum(a6, lid);
    let r7 = reduce_sum(a7, lid);
    let r8 = reduce_sum(a8, lid);
    if (lid == 0u) {
        dw[d] = select(r0, dw[d] + r0, add);
        dw[d + p.C] = select(r1, dw[d + p.C] + r1, add);
        dw[d + 2u * p.C] = select(r2, dw[d + 2u * p.C] + r2, add);
        dw[d + 3u * p.C] = select(r3, dw[d + 3u * p.C] + r3, add);
        dw[d + 4u * p.C] = select(r4, dw[d + 4u * p.C] + r4, add);
        dw[d + 5u * p.C] = select(r5, dw[d + 5u * p.C] + r5, add);
        dw[d + 6u * p.C] = select(r6, dw[d + 6u * p.C] + r6, add);
        dw[d + 7u * p.C] = select(r7, dw[d + 7u * p.C] + r7, add);
        dw[d + 8u * p.C] = select(r8, dw[d + 8u * p.C] + r8, add);
    }
}

// Input gradient: one invocation per input element, gathering from the q map
// (stride 1) and the k, v maps (stride 2) through the raw weights w [3, 9, C]. The
// cls token's gradient is the sum of token 0 of dq, dk, dv (it bypassed the convs).
@compute @workgroup_size(WG)
fn dwconv_backward_x(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let n = (wid.y * nwg.x + wid.x) * WG + lid;
    if (n >= p.total) {
        return;
    }
    let C = p.C;
    let tq = p.cls + p.H * p.W;
    let tk = p.cls + p.Hk * p.Wk;
    let e = element(n);
    let c = e.x;
    let t = e.y;
    let bi = e.z;
    if (t < p.cls) {
        dx[n] = vec4<f32>(q[n]) + vec4<f32>(k[bi * tk * C + c]) + vec4<f32>(v[bi * tk * C + c]);
        return;
    }
    let pix = t - p.cls;
    let iy = i32(pix / p.W);
    let ix = i32(pix % p.W);
    var acc = T(0.0);
    for (var ky = 0; ky < 3; ky++) {
        for (var kx = 0; kx < 3; kx++) {
            let tap = u32(ky * 3 + kx);
            // q: oy = iy - ky + 1.
            let qy = iy - ky + 1;
            let qx = ix - kx + 1;
            if (qy >= 0 && qx >= 0 && qy < i32(p.H) && qx < i32(p.W)) {
                acc += vec4<f32>(q[(bi * tq + p.cls + u32(qy) * p.W + u32(qx)) * C + c]) * w[tap * C + c];
            }
            // k, v: 2·oy = iy - ky + 1.
            let ty = iy - ky + 1;
            let tx = ix - kx + 1;
            if (ty >= 0 && tx >= 0 && ty % 2 == 0 && tx % 2 == 0) {
                let oy = u32(ty / 2);
                let ox = u32(tx / 2);
                if (oy < p.Hk && ox < p.Wk) {
                    let o = (bi * tk + p.cls + oy * p.Wk + ox) * C + c;
                    acc += vec4<f32>(k[o]) * w[(9u + tap) * C + c] + vec4<f32>(v[o]) * w[(18u + tap) * C + c];
                }
            }
        }
    }
    dx[n] = acc;
}

// Texture variant of dwconv_backward_x: the pre-BN gradients of q, k, v and the
// raw weights w [27, C] are read as texels. The textures hold the images
// [b_off, b_off + B) of this dispatch (rows: image * tokens + token); dx is the
// whole batch's buffer.
@group(0) @binding(19) var dq_tex: Tex;
@group(0) @binding(20) var dk_tex: Tex;
@group(0) @binding(21) var dv_tex: Tex;

@compute @workgroup_size(WG)
fn dwconv_backward_x_tex(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let n = (wid.y * nwg.x + wid.x) * WG + lid;
    if (n >= p.total) {
        return;
    }
    let C = p.C;
    let tq = p.cls + p.H * p.W;
    let tk = p.cls + p.Hk * p.Wk;
    let e = element(n);
    let c = e.x;
    let ci = i32(c);
    let t = e.y;
    let bl = e.z;
    let out = ((p.b_off + bl) * tq + t) * C + c;
    let qrow = i32(bl * tq + p.cls);
    let krow = i32(bl * tk + p.cls);
    if (t < p.cls) {
        dx[out] = texel(dq_tex, vec2<i32>(ci, qrow - 1)) + texel(dk_tex, vec2<i32>(ci, krow - 1))
                + texel(dv_tex, vec2<i32>(ci, krow - 1));
        return;
    }
    let pix = t - p.cls;
    let iy = i32(pix / p.W);
    let ix = i32(pix % p.W);
    var acc = T(0.0);
    for (var ky = 0; ky < 3; ky++) {
        for (var kx = 0; kx < 3; kx++) {
            let tap = ky * 3 + kx;
            // q: oy = iy - ky + 1.
            let qy = iy - ky + 1;
            let qx = ix - kx + 1;
            if (qy >= 0 && qx >= 0 && qy < i32(p.H) && qx < i32(p.W)) {
                acc += texel(dq_tex, vec2<i32>(ci, qrow + qy * i32(p.W) + qx)) * texel(w_tex, vec2<i32>(ci, tap));
            }
            // k, v: 2·oy = iy - ky + 1.
            if (qy >= 0 && qx >= 0 && qy % 2 == 0 && qx % 2 == 0 && qy / 2 < i32(p.Hk) && qx / 2 < i32(p.Wk)) {
                let at = vec2<i32>(ci, krow + (qy / 2) * i32(p.Wk) + qx / 2);
                acc += texel(dk_tex, at) * texel(w_tex, vec2<i32>(ci, 9 + tap))
                     + texel(dv_tex, at) * texel(w_tex, vec2<i32>(ci, 18 + tap));
            }
        }
    }
    dx[out] = acc;
}

// Texture variant of dwconv_backward_w: the token map x (binding 17) and the
// pre-BN gradients (19-21) as texels, images [b_off, b_off + B) of this dispatch.
// Each of the WG invocations keeps its own nine partial sums and stores them in
// `part` (binding 22): no barrier, and every SIMD lane of a CPU driver busy (one
// invocation per workgroup, as the barrier-free reduction was before, left seven
// of eight lanes idle). dw_sum_partials then adds the WG partials into dw; a
// dispatch after the first (p.accumulate = 1) adds to dw instead of overwriting it.
@group(0) @binding(22) var<storage, read_write> part: array<T>;   // [3, C, 9, WG]
// dw_sum_partials reads the partials as a linear texture (a copy of `part`): its
// WG loads per entry from the storage buffer each ran as a loop over the SIMD
// lanes on lavapipe (the sum took 2.7 ms per stage-2 block at 64x64, batch 64).
@group(0) @binding(25) var part_t: Tex;

@compute @workgroup_size(WG)
fn dw_sum_partials(@builtin(global_invocation_id) gid: vec3<u32>) {
    // One invocation per dw entry (m, tap, c): dw is [3, 9, C].
    let i = gid.x;
    if (i >= 27u * p.C) {
        return;
    }
    let c = i % p.C;
    let t = (i / p.C) % 9u;
    let m = i / (9u * p.C);
    let base = ((m * p.C + c) * 9u + t) * WG;
    var s = T(0.0);
    for (var j = 0u; j < WG; j++) {
        s += lin(part_t, base + j);
    }
    dw[i] = select(s, dw[i] + s, p.accumulate == 1u);
}

// derive dwconv_backward_w_tex from dwconv_backward_w: dgrad( -> dgrad_tex( ; tap( -> tap_tex( ; store_taps( -> store_taps_part(

fn dgrad_tex(m: u32, row: u32, c: u32) -> T {
    let at = vec2<i32>(i32(c), i32(row));
    if (m == 0u) {
        return texel(dq_tex, at);
    } else if (m == 1u) {
        return texel(dk_tex, at);
    }
    return texel(dv_tex, at);
}

// Each invocation's accumulators into `part` [3, C, 9, WG] (no barrier: CPU
// drivers), added up by dw_sum_partials.
fn store_taps_part(m: u32, c: u32, lid: u32, a0: T, a1: T, a2: T, a3: T, a4: T, a5: T, a6: T, a7: T, a8: T) {
    let o = (m * p.C + c) * 9u * WG + lid;
    part[o] = a0;
    part[o + WG] = a1;
    part[o + 2u * WG] = a2;
    part[o + 3u * WG] = a3;
    part[o + 4u * WG] = a4;
    part[o + 5u * WG] = a5;
    part[o + 6u * WG] = a6;
    part[o + 7u * WG] = a7;
    part[o + 8u * WG] = a8;
}
