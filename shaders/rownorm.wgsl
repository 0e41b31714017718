// Row-wise normalisations over the channel axis: LayerNorm and softmax.
// LANES invocations share a row (WG / LANES rows per workgroup), striding over
// it, with a tree reduction in workgroup memory. LANES = WG (one workgroup per
// row) suits GPUs and wide rows; LANES = 1 (a row per invocation, no barriers)
// suits CPU drivers, where a workgroup's invocations are SIMD lanes and every
// barrier is a full spill (measured 30-100x faster on lavapipe for C <= 384:
// docs/perf.md). LayerNorm is two-pass (mean, then the mean of squared
// deviations), as PyTorch computes it, so large means do not cancel.
//
// Rows may be gathered and scattered: row r is (g, i) = (r / group, r % group) and
// reads input row g*in_stride + in_off + i and writes output row
// g*out_stride + out_off + i. This lets the final norm read only the cls token of
// each image and the token-embedding norm write below a cls slot.

override WG: u32 = 64u;
override LANES: u32 = 64u;

struct Params {
    rows: u32, C: u32, group: u32, in_stride: u32,
    in_off: u32, out_stride: u32, out_off: u32, eps: f32,
    // layernorm4 runs over rows [row0, rows) and finds input vec4 i at texel
    // i - tex_off: inference reads a large input through a small texture in chunks
    // of rows (ops::gemm::texture_chunk_rows).
    row0: u32, tex_off: u32,
    // softmax_xent: the gradient's scale (1 / batch for a mean loss).
    scale: f32, _pad: u32,
}

@group(0) @binding(0) var<storage, read> x: array<act>;
@group(0) @binding(1) var<storage, read> gamma: array<f32>;
@group(0) @binding(2) var<storage, read> beta: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<act>;
// Bindings 1 and 2 as the backward and the loss see them: softmax_xent's soft
// targets, layernorm_backward's incoming gradient (f32: training).
@group(0) @binding(1) var<storage, read> targets: array<f32>;
@group(0) @binding(2) var<storage, read> dy_in: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

var<workgroup> red: array<f32, WG>;

// Which row and lane an invocation works on. Rows past the end are clamped to the
// last one (computed, not written) so every invocation reaches the barriers.
struct Row { r: u32, lane: u32, valid: bool }

fn row_of(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> Row {
    let rr = (wid.y * nwg.x + wid.x) * (WG / LANES) + lid / LANES;
    return Row(min(rr, p.rows - 1u), lid % LANES, rr < p.rows);
}

// SG_REDUCE (the host sets it where the adapter has subgroup operations and a
// workgroup is one row, LANES == WG): each subgroup reduces its lanes, its first
// active lane stores the result, and every lane combines the WG slots in order
// (the others hold the identity): two barriers instead of a tree's 2 + log2(WG),
// for any subgroup size or layout. Without it, the tree in workgroup memory.
override SG_REDUCE: bool = false;

fn subgroup_reduce(val: f32, lid: u32, is_max: bool) -> f32 {
    let s = select(sg_sum(val), sg_max(val), is_max);
    let none = select(0.0, -3.0e38, is_max);
    red[lid] = select(none, s, sg_lane() == 0u);
    workgroupBarrier();
    var t = none;
    for (var i = 0u; i < WG; i++) {
        t = select(t + red[i], max(t, red[i]), is_max);
    }
    workgroupBarrier();
    return t;
}

fn reduce_sum(val: f32, lid: u32) -> f32 {
    if (LANES == 1u) {
        return val;
    }
    if (SG_REDUCE) {
        return subgroup_reduce(val, lid, false);
    }
    let lane = lid % LANES;
    red[lid] = val;
    workgroupBarrier();
    for (var s = LANES / 2u; s > 0u; s >>= 1u) {
        if (lane < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let r = red[lid - lane];
    workgroupBarrier();
    return r;
}

fn reduce_max(val: f32, lid: u32) -> f32 {
    if (LANES == 1u) {
        return val;
    }
    if (SG_REDUCE) {
        return subgroup_reduce(val, lid, true);
    }
    let lane = lid % LANES;
    red[lid] = val;
    workgroupBarrier();
    for (var s = LANES / 2u; s > 0u; s >>= 1u) {
        if (lane < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    let r = red[lid - lane];
    workgroupBarrier();
    return r;
}

// PER > 0 (the host sets it where a row of C values is at most MAX_PER per lane):
// each lane keeps its values of the row, c = lane + i*LANES for i < PER, in
// registers (`rx`, and `rd` for the backward's dy), so the row is read from memory
// once instead of once per pass. PER = 0 streams every pass from memory. Loops
// over a lane's values run `for i < row_trips()` and break at c >= C: with PER
// set the bound is a constant the driver unrolls, so `rx[i]` stays in registers.
const MAX_PER: u32 = 16u;
override PER: u32 = 0u;
var<private> rx: array<f32, MAX_PER>;
var<private> rd: array<f32, MAX_PER>;

fn row_trips() -> u32 {
    return select(0xffffffffu, PER, PER > 0u);
}

// Value i of this lane's part of the row at x[base..] (c = lane + i*LANES):
// from registers where `load_row` filled them.
fn xv(base: u32, c: u32, i: u32) -> f32 {
    if (PER > 0u) {
        return rx[i];
    }
    return f32(x[base + c]);
}

// With PER: this lane's part of the row at x[base..] into `rx`.
fn load_row(base: u32, lane: u32) {
    if (PER > 0u) {
        for (var i = 0u; i < PER; i++) {
            let c = lane + i * LANES;
            rx[i] = select(0.0, f32(x[base + min(c, p.C - 1u)]), c < p.C);
        }
    }
}

// (mean, 1/sqrt(var + eps)) of the row of C values at x[base..], two-pass
// (after `load_row`).
fn row_stats(base: u32, lid: u32) -> vec2<f32> {
    let lane = lid % LANES;
    var s = 0.0;
    for (var i = 0u; i < row_trips(); i++) {
        let c = lane + i * LANES;
        if (c >= p.C) {
            break;
        }
        s += xv(base, c, i);
    }
    let mean = reduce_sum(s, lid) / f32(p.C);
    var s2 = 0.0;
    for (var i = 0u; i < row_trips(); i++) {
        let c = lane + i * LANES;
        if (c >= p.C) {
            break;
        }
        let d = xv(base, c, i) - mean;
        s2 += d * d;
    }
    return vec2<f32>(mean, inverseSqrt(reduce_sum(s2, lid) / f32(p.C) + p.eps));
}

fn in_base(r: u32) -> u32 {
    return ((r / p.group) * p.in_stride + p.in_off + r % p.group) * p.C;
}

fn out_base(r: u32) -> u32 {
    return ((r / p.group) * p.out_stride + p.out_off + r % p.group) * p.C;
}

@compute @workgroup_size(WG)
fn layernorm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let row = row_of(wid, nwg, lid);
    let r = row.r;
    let ib = in_base(r);
    let ob = out_base(r);
    load_row(ib, row.lane);
    let st = row_stats(ib, lid);
    let mean = st.x;
    let rstd = st.y;
    for (var i = 0u; i < row_trips() && row.valid; i++) {
        let c = row.lane + i * LANES;
        if (c >= p.C) {
            break;
        }
        y[ob + c] = act((xv(ib, c, i) - mean) * rstd * gamma[c] + beta[c]);
    }
}

// log Σ exp over row r of x (max-shifted), shared by softmax and its cross-entropy
// (after `load_row`).
fn row_logsumexp(b: u32, lid: u32) -> f32 {
    let lane = lid % LANES;
    var m = -3.0e38;
    for (var i = 0u; i < row_trips(); i++) {
        let c = lane + i * LANES;
        if (c >= p.C) {
            break;
        }
        m = max(m, xv(b, c, i));
    }
    let mx = reduce_max(m, lid);
    var s = 0.0;
    for (var i = 0u; i < row_trips(); i++) {
        let c = lane + i * LANES;
        if (c >= p.C) {
            break;
        }
        s += exp(xv(b, c, i) - mx);
    }
    return mx + log(reduce_sum(s, lid));
}

// softmax uses x, y and p of the same bind group (gamma and beta unbound).
@compute @workgroup_size(WG)
fn softmax(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let row = row_of(wid, nwg, lid);
    let r = row.r;
    let b = r * p.C;
    load_row(b, row.lane);
    let lse = row_logsumexp(b, lid);
    for (var i = 0u; i < row_trips() && row.valid; i++) {
        let c = row.lane + i * LANES;
        if (c >= p.C) {
            break;
        }
        y[b + c] = act(exp(xv(b, c, i) - lse));
    }
}

// LayerNorm backward, one workgroup per row, with the forward's row map: x and dx
// at the input rows, dy at the output rows. With x̂ = (x - μ)·rstd, g = dy·γ:
//   dx = rstd · (g - mean(g) - x̂ · mean(g·x̂)).
// Also writes t = dy·x̂ densely into `aux` (row r), whose column sums are dγ; dβ is
// the column sum of dy. Rows of dx outside the map are not written.
// Bindings: x (0) the forward input, gamma (1), dy (2, in beta's slot), dx (3), aux (5).
@group(0) @binding(5) var<storage, read_write> aux: array<f32>;

@compute @workgroup_size(WG)
fn layernorm_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let row = row_of(wid, nwg, lid);
    let r = row.r;
    let base = in_base(r);
    let ob = out_base(r);
    let tb = r * p.C;
    load_row(base, row.lane);
    let st = row_stats(base, lid);
    let mean = st.x;
    let rstd = st.y;
    var sg = 0.0;
    var sgx = 0.0;
    for (var i = 0u; i < row_trips(); i++) {
        let c = row.lane + i * LANES;
        if (c >= p.C) {
            break;
        }
        let xh = (xv(base, c, i) - mean) * rstd;
        let dy = dy_in[ob + c];
        if (PER > 0u) {
            rd[i] = dy;
        }
        let g = dy * gamma[c];
        sg += g;
        sgx += g * xh;
    }
    let mg = reduce_sum(sg, lid) / f32(p.C);
    let mgx = reduce_sum(sgx, lid) / f32(p.C);
    for (var i = 0u; i < row_trips() && row.valid; i++) {
        let c = row.lane + i * LANES;
        if (c >= p.C) {
            break;
        }
        let xh = (xv(base, c, i) - mean) * rstd;
        var dy = rd[min(i, MAX_PER - 1u)];
        if (PER == 0u) {
            dy = dy_in[ob + c];
        }
        y[base + c] = act(rstd * (dy * gamma[c] - mg - xh * mgx));
        aux[tb + c] = dy * xh;
    }
}

// Softmax cross-entropy against soft targets (label smoothing, mixup and cutmix
// all become a target distribution), one workgroup per row. x holds the logits,
// gamma the targets (gamma's slot); writes dlogits = (softmax(x) - t) * scale into y
// and the row's loss -Σ t·log softmax(x) into aux[row].
@compute @workgroup_size(WG)
fn softmax_xent(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let row = row_of(wid, nwg, lid);
    let r = row.r;
    let b = r * p.C;
    load_row(b, row.lane);
    let lse = row_logsumexp(b, lid);
    var l = 0.0;
    for (var i = 0u; i < row_trips() && row.valid; i++) {
        let c = row.lane + i * LANES;
        if (c >= p.C) {
            break;
        }
        let t = targets[b + c];
        let xc = xv(b, c, i);
        y[b + c] = act((exp(xc - lse) - t) * p.scale);
        l += t * (lse - xc);
    }
    let loss = reduce_sum(l, lid);
    if (row.lane == 0u && row.valid) {
        aux[r] = loss;
    }
}

// ---------------------------------------------------------------------------
// vec4 LayerNorm for the row-per-invocation path (LANES = 1) when C is a multiple
// of 4: the same math over vec4 views, a quarter of the loads. Bindings 9-14 are
// y (dx), aux, and the textures of x, dy, gamma and beta.
@group(0) @binding(9) var<storage, read_write> y4: array<vec4<act>>;
@group(0) @binding(10) var<storage, read_write> aux4: array<vec4<act>>;
// The vec4 kernels serve CPU drivers, where a storage-buffer load is a loop over
// the SIMD lanes and a texel fetch one gather: they read x (and dy) from linear
// textures (Graph::linear_texture: vec4 i at (i & (W-1), i >> log2 W)).
@group(0) @binding(11) var x_t: Tex;
@group(0) @binding(12) var dy_t: Tex;
// gamma and beta as linear textures too: loaded from storage buffers (gamma4,
// beta4, the per-lane loop) they took 55-70% of these kernels' time on lavapipe.
@group(0) @binding(13) var gamma_t: Tex;
@group(0) @binding(14) var beta_t: Tex;

fn hsum(v: vec4<f32>) -> f32 {
    return v.x + v.y + v.z + v.w;
}

// layernorm4 with RESIDUAL normalises x + z, the residual stream plus a branch
// output (z in dy_t), and writes that sum back over x (aux4): the residual add of
// a transformer block and the next LayerNorm in one pass, for when the GEMM's
// epilogue does not add it (Graph::fused_epilogue). Rows are dense there.
override RESIDUAL: bool = false;

// Input vec4 i of the row kernels: x, or x + z with RESIDUAL.
fn x4(i: u32) -> vec4<f32> {
    if (RESIDUAL) {
        return lin(x_t, i) + lin(dy_t, i);
    }
    return lin(x_t, i);
}

// row_stats over the row of C/4 vec4 at x_t[b4..].
fn row_stats4(b4: u32) -> vec2<f32> {
    let c4 = p.C / 4u;
    var s = vec4<f32>(0.0);
    for (var c = 0u; c < c4; c++) {
        s += x4(b4 + c);
    }
    let mean = hsum(s) / f32(p.C);
    var s2 = vec4<f32>(0.0);
    for (var c = 0u; c < c4; c++) {
        let d = x4(b4 + c) - mean;
        s2 += d * d;
    }
    return vec2<f32>(mean, inverseSqrt(hsum(s2) / f32(p.C) + p.eps));
}

@compute @workgroup_size(WG)
fn layernorm4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let r = p.row0 + (wid.y * nwg.x + wid.x) * WG + lid;
    if (r >= p.rows) {
        return;
    }
    let ib = in_base(r) / 4u;
    let tb = ib - p.tex_off;
    let ob = out_base(r) / 4u;
    let st = row_stats4(tb);
    for (var c = 0u; c < p.C / 4u; c++) {
        let v = x4(tb + c);
        y4[ob + c] = vec4<act>((v - st.x) * st.y * lin(gamma_t, c) + lin(beta_t, c));
        if (RESIDUAL) {
            aux4[ib + c] = vec4<act>(v);
        }
    }
}

@compute @workgroup_size(WG)
fn layernorm_backward4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let r = (wid.y * nwg.x + wid.x) * WG + lid;
    if (r >= p.rows) {
        return;
    }
    let c4 = p.C / 4u;
    let base = in_base(r) / 4u;
    let ob = out_base(r) / 4u;
    let tb = r * c4;
    let st = row_stats4(base);
    let mean = st.x;
    let rstd = st.y;
    var sg = vec4<f32>(0.0);
    var sgx = vec4<f32>(0.0);
    for (var c = 0u; c < c4; c++) {
        let xh = (lin(x_t, base + c) - mean) * rstd;
        let g = lin(dy_t, ob + c) * lin(gamma_t, c);
        sg += g;
        sgx += g * xh;
    }
    let mg = hsum(sg) / f32(p.C);
    let mgx = hsum(sgx) / f32(p.C);
    for (var c = 0u; c < c4; c++) {
        let xh = (lin(x_t, base + c) - mean) * rstd;
        let dy = lin(dy_t, ob + c);
        y4[base + c] = vec4<act>(rstd * (dy * lin(gamma_t, c) - mg - xh * mgx));
        aux4[tb + c] = vec4<act>(dy * xh);
    }
}
