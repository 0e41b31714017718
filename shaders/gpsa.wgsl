// Gated positional self-attention (ConViT, ../shared/convit-spec.md §2.3, §3.4,
// §11), in the split form: per head h with gate g = σ(λ_h),
//   O = (1 − g)·softmax(S)·V + g·Qpos·V,   Qpos = softmax_j(R),
//   R_hij = W_pos[h]·r_ij + b_pos[h],      r_ij = (δx, δy, δx² + δy²),
// δ = key position − query position on the square grid of N = gs² patches
// (x = column = t % gs, y = row = t / gs). The content term Yc = softmax(S)·V is
// the fused attention kernel's output; this file holds the positional part:
//   pos_softmax            Qpos [H, N, N], once per layer (input-independent);
//   pos_mix / _rows        O = (1 − g)·Yc + g·Qpos·V (and Yp = Qpos·V for training),
//                          or, BACKWARD, dV = dVc + g·Qposᵀ·dO;
//   scale_heads            (1 − g)·dO, the content attention's upstream gradient;
//   pos_dq / _rows         dQpos = Σ_b dO_b·V_bᵀ per head (g applied below);
//   pos_softmax_backward   dR = Q ⊙ (g·dQpos − rowsum), with per-row partials of
//                          dW_pos (Σ dR·r) and db_pos (Σ dR, zero analytically);
//   pos_grad_finish        the rows' partials per head;
//   gate_part, gate_finish dλ = g(1 − g)·Σ dO ⊙ (Yp − Yc) (no N×N reduction).
// V, Yc, O, dO: [B, N, C] with head h at channels [h·D, (h+1)·D), in vec4s.
// Entries with _rows are the CPU-driver forms (an invocation per output row, no
// workgroup memory or barriers); the others stage tiles in workgroup memory.

override WG: u32 = 64u;
// Head width in vec4s.
override D4: u32 = 12u;
const D4_MAX: u32 = 16u;
// Keys (rows of Qpos's other side) per staged tile.
const TK: u32 = 32u;
override BACKWARD: bool = false;
override SAVE_YP: bool = false;

struct Params { B: u32, N: u32, C4: u32, H: u32, gs: u32, parts: u32, _p0: u32, _p1: u32 }

@group(0) @binding(0) var<storage, read> v: array<vec4<act>>;
@group(0) @binding(1) var<storage, read> y: array<vec4<act>>;
@group(0) @binding(2) var<storage, read_write> o: array<vec4<act>>;
@group(0) @binding(3) var<uniform> p: Params;
@group(0) @binding(4) var<storage, read_write> qpos: array<f32>;
@group(0) @binding(5) var<storage, read> wpos: array<f32>;
@group(0) @binding(6) var<storage, read> bpos: array<f32>;
@group(0) @binding(7) var<storage, read> gating: array<f32>;
@group(0) @binding(8) var<storage, read_write> yp: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read> dout: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read_write> dqpos: array<f32>;
@group(0) @binding(11) var<storage, read_write> dwpos: array<f32>;
@group(0) @binding(12) var<storage, read_write> dbpos: array<f32>;
@group(0) @binding(13) var<storage, read_write> dgate: array<f32>;
@group(0) @binding(14) var<storage, read_write> part: array<vec4<f32>>;

fn gate(h: u32) -> f32 {
    return 1.0 / (1.0 + exp(-gating[h]));
}

// r_ij for query i and key j.
fn rel(i: u32, j: u32) -> vec3<f32> {
    let dx = f32(j % p.gs) - f32(i % p.gs);
    let dy = f32(j / p.gs) - f32(i / p.gs);
    return vec3<f32>(dx, dy, dx * dx + dy * dy);
}

fn pos_score(h: u32, i: u32, j: u32) -> f32 {
    return dot(vec3<f32>(wpos[h * 3u], wpos[h * 3u + 1u], wpos[h * 3u + 2u]), rel(i, j)) + bpos[h];
}

// One invocation per row (h, i) of Qpos: H·N rows of N (H·N² values per layer,
// a fraction of a percent of a block's work), in both kernel sets.
@compute @workgroup_size(WG)
fn pos_softmax(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= p.H * p.N) {
        return;
    }
    let h = r / p.N;
    let i = r % p.N;
    var m = -3.0e38;
    for (var j = 0u; j < p.N; j++) {
        m = max(m, pos_score(h, i, j));
    }
    var s = 0.0;
    for (var j = 0u; j < p.N; j++) {
        s += exp(pos_score(h, i, j) - m);
    }
    let inv = 1.0 / s;
    for (var j = 0u; j < p.N; j++) {
        qpos[r * p.N + j] = exp(pos_score(h, i, j) - m) * inv;
    }
}

// Weight of row `i` (a query; BACKWARD: a key, reading Qposᵀ) on column `j`.
fn mix_weight(h: u32, i: u32, j: u32) -> f32 {
    if (BACKWARD) {
        return qpos[(h * p.N + j) * p.N + i];
    }
    return qpos[(h * p.N + i) * p.N + j];
}

// The epilogue of pos_mix: row i of image b, head h, with acc = Σ_j w_ij·v_j.
fn mix_store(b: u32, h: u32, i: u32, acc: ptr<function, array<vec4<f32>, D4_MAX>>) {
    let base = (b * p.N + i) * p.C4 + h * D4;
    let g = gate(h);
    for (var d = 0u; d < D4; d++) {
        let a = (*acc)[d];
        let yv = vec4<f32>(y[base + d]);
        if (BACKWARD) {
            o[base + d] = vec4<act>(yv + g * a);
        } else {
            o[base + d] = vec4<act>((1.0 - g) * yv + g * a);
        }
        if (SAVE_YP) {
            yp[base + d] = a;
        }
    }
}

// V tile [TK, D4] and the weight tile [WG rows, TK columns] (a padded row per
// invocation: its reads in the inner loop hit distinct banks).
var<workgroup> vt: array<vec4<f32>, TK * D4>;
var<workgroup> wt: array<f32, WG * (TK + 1u)>;

// The GPU set: a workgroup per (WG rows, head, image), columns in tiles of TK
// staged with coalesced loads (forward: along Qpos rows; BACKWARD: along its
// columns, which are Qposᵀ's rows).
@compute @workgroup_size(WG)
fn pos_mix(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.y;
    let b = wid.z;
    let r0 = wid.x * WG;
    var acc: array<vec4<f32>, D4_MAX>;
    for (var t0 = 0u; t0 < p.N; t0 += TK) {
        let n = min(TK, p.N - t0);
        for (var e = lid; e < TK * D4; e += WG) {
            let j = e / D4;
            var val = vec4<f32>(0.0);
            if (j < n) {
                val = vec4<f32>(v[(b * p.N + t0 + j) * p.C4 + h * D4 + e % D4]);
            }
            vt[e] = val;
        }
        for (var e = lid; e < WG * TK; e += WG) {
            // Consecutive invocations: consecutive columns (forward) or rows (backward).
            let r = select(e / TK, e % WG, BACKWARD);
            let j = select(e % TK, e / WG, BACKWARD);
            var w = 0.0;
            if (j < n && r0 + r < p.N) {
                w = mix_weight(h, r0 + r, t0 + j);
            }
            wt[r * (TK + 1u) + j] = w;
        }
        workgroupBarrier();
        for (var j = 0u; j < n; j++) {
            let w = wt[lid * (TK + 1u) + j];
            for (var d = 0u; d < D4; d++) {
                acc[d] += w * vt[j * D4 + d];
            }
        }
        workgroupBarrier();
    }
    if (r0 + lid < p.N) {
        mix_store(b, h, r0 + lid, &acc);
    }
}

// The CPU-driver form: an invocation per row, every operand from memory.
@compute @workgroup_size(WG)
fn pos_mix_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let i = gid.x;
    let h = wid.y;
    let b = wid.z;
    if (i >= p.N) {
        return;
    }
    var acc: array<vec4<f32>, D4_MAX>;
    for (var j = 0u; j < p.N; j++) {
        let w = mix_weight(h, i, j);
        let vb = (b * p.N + j) * p.C4 + h * D4;
        for (var d = 0u; d < D4; d++) {
            acc[d] += w * vec4<f32>(v[vb + d]);
        }
    }
    mix_store(b, h, i, &acc);
}

// o = (1 − g_h)·dO per head: the content attention's upstream gradient.
@compute @workgroup_size(WG)
fn scale_heads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = gid.x + gid.y * nwg.x * WG;
    if (e >= p.B * p.N * p.C4) {
        return;
    }
    let h = (e % p.C4) / D4;
    o[e] = vec4<act>((1.0 - gate(h)) * dout[e]);
}

// dQpos[h, i, j] = Σ_b dO[b, i, h]·V[b, j, h] (v holds V). GPU set: a workgroup of
// 16×16 invocations per (16 queries, 16 keys, head), the images' rows staged.
const QT: u32 = 16u;
var<workgroup> dot_i: array<vec4<f32>, QT * D4_MAX>;
var<workgroup> dot_j: array<vec4<f32>, QT * D4_MAX>;

@compute @workgroup_size(16, 16)
fn pos_dq(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.z;
    let i0 = wid.y * QT;
    let j0 = wid.x * QT;
    var s = 0.0;
    for (var b = 0u; b < p.B; b++) {
        for (var e = lid; e < 2u * QT * D4; e += QT * QT) {
            let side = e / (QT * D4);
            let t = (e % (QT * D4)) / D4;
            let d = e % D4;
            let row = select(i0, j0, side == 1u) + t;
            var val = vec4<f32>(0.0);
            if (row < p.N) {
                let at = (b * p.N + row) * p.C4 + h * D4 + d;
                if (side == 0u) {
                    val = dout[at];
                } else {
                    val = vec4<f32>(v[at]);
                }
            }
            if (side == 0u) {
                dot_i[t * D4_MAX + d] = val;
            } else {
                dot_j[t * D4_MAX + d] = val;
            }
        }
        workgroupBarrier();
        var acc = vec4<f32>(0.0);
        for (var d = 0u; d < D4; d++) {
            acc += dot_i[l.y * D4_MAX + d] * dot_j[l.x * D4_MAX + d];
        }
        s += acc.x + acc.y + acc.z + acc.w;
        workgroupBarrier();
    }
    let i = i0 + l.y;
    let j = j0 + l.x;
    if (i < p.N && j < p.N) {
        dqpos[(h * p.N + i) * p.N + j] = s;
    }
}

// The CPU-driver form: an invocation per (h, i, j).
@compute @workgroup_size(WG)
fn pos_dq_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = gid.x + gid.y * nwg.x * WG;
    if (e >= p.H * p.N * p.N) {
        return;
    }
    let h = e / (p.N * p.N);
    let i = (e / p.N) % p.N;
    let j = e % p.N;
    var acc = vec4<f32>(0.0);
    for (var b = 0u; b < p.B; b++) {
        let ib = (b * p.N + i) * p.C4 + h * D4;
        let jb = (b * p.N + j) * p.C4 + h * D4;
        for (var d = 0u; d < D4; d++) {
            acc += dout[ib + d] * vec4<f32>(v[jb + d]);
        }
    }
    dqpos[e] = acc.x + acc.y + acc.z + acc.w;
}

// Row (h, i): with dQ = g·dQpos, dR_j = Q_j·(dQ_j − Σ_k dQ_k·Q_k); writes the row's
// (Σ dR·δx, Σ dR·δy, Σ dR·‖δ‖², Σ dR) into part[h·N + i].
@compute @workgroup_size(WG)
fn pos_softmax_backward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= p.H * p.N) {
        return;
    }
    let h = r / p.N;
    let i = r % p.N;
    let g = gate(h);
    var s = 0.0;
    for (var j = 0u; j < p.N; j++) {
        s += g * dqpos[r * p.N + j] * qpos[r * p.N + j];
    }
    var acc = vec4<f32>(0.0);
    for (var j = 0u; j < p.N; j++) {
        let dr = qpos[r * p.N + j] * (g * dqpos[r * p.N + j] - s);
        acc += dr * vec4<f32>(rel(i, j), 1.0);
    }
    part[r] = acc;
}

var<workgroup> red: array<vec4<f32>, WG>;

// Σ over WG lanes' values, in a fixed order (a tree in workgroup memory).
fn wg_sum(val: vec4<f32>, lid: u32) -> vec4<f32> {
    red[lid] = val;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if (lid < k) {
            red[lid] += red[lid + k];
        }
        workgroupBarrier();
    }
    let t = red[0];
    workgroupBarrier();
    return t;
}

// A workgroup per head: dW_pos[h] and db_pos[h] from the N rows' partials.
@compute @workgroup_size(WG)
fn pos_grad_finish(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    var acc = vec4<f32>(0.0);
    for (var i = lid; i < p.N; i += WG) {
        acc += part[h * p.N + i];
    }
    let t = wg_sum(acc, lid);
    if (lid == 0u) {
        dwpos[h * 3u] = t.x;
        dwpos[h * 3u + 1u] = t.y;
        dwpos[h * 3u + 2u] = t.z;
        dbpos[h] = t.w;
    }
}

// dλ partials: invocation (k, h) of parts × H adds dO·(Yp − Yc) over head h of
// rows k, k + parts, ... of the B·N rows (y holds Yc) into part[k·H + h].x.
@compute @workgroup_size(WG)
fn gate_part(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = gid.x + gid.y * nwg.x * WG;
    if (e >= p.parts * p.H) {
        return;
    }
    let k = e / p.H;
    let h = e % p.H;
    var acc = vec4<f32>(0.0);
    for (var r = k; r < p.B * p.N; r += p.parts) {
        let base = r * p.C4 + h * D4;
        for (var d = 0u; d < D4; d++) {
            acc += dout[base + d] * (yp[base + d] - vec4<f32>(y[base + d]));
        }
    }
    part[e] = vec4<f32>(acc.x + acc.y + acc.z + acc.w, 0.0, 0.0, 0.0);
}

// A workgroup per head: dλ_h = g(1 − g)·Σ of its partials.
@compute @workgroup_size(WG)
fn gate_finish(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    var acc = vec4<f32>(0.0);
    for (var k = lid; k < p.parts; k += WG) {
        acc += part[k * p.H + h];
    }
    let t = wg_sum(acc, lid);
    if (lid == 0u) {
        let g = gate(h);
        dgate[h] = g * (1.0 - g) * t.x;
    }
}
