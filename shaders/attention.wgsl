// Fused multi-head attention: O = softmax(Q·Kᵀ·scale)·V in one pass over the keys
// (online softmax), never materialising the Tq x Tkv score matrix.
//
// Q [B, Tq, C], K and V [B, Tkv, C], O [B, Tq, C]; head h owns channels
// [h*D, (h+1)*D) (CvT's 'b t (h d)' split). Tq != Tkv in CvT (keys and values are
// stride-2 projections), and scale is the stage width C^-0.5 as in the official
// code, not D^-0.5: the host passes it in.
//
// One invocation per query row; a workgroup of WG queries of one head shares each
// tile of TK keys and values through workgroup memory. Per tile the scores go to
// registers first, so the running output is rescaled once per tile, not per key.

override WG: u32 = 64u;
// Head width in vec4s; the private arrays are sized for the largest (D = 64).
override D4: u32 = 16u;
const D4_MAX: u32 = 16u;
const TK: u32 = 16u;

// b_off: first image of this dispatch (the texture variant splits the batch).
struct Params { B: u32, Tq: u32, Tkv: u32, C4: u32, heads: u32, scale: f32, b_off: u32, _p1: u32 }

@group(0) @binding(0) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> o: array<vec4<f32>>;
@group(0) @binding(4) var<uniform> p: Params;

var<workgroup> ks: array<vec4<f32>, 256>; // TK * D4_MAX
var<workgroup> vs: array<vec4<f32>, 256>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let head = wid.y;
    let bi = wid.z;
    let qi = wid.x * WG + lid;
    let qrow = min(qi, p.Tq - 1u);
    let qbase = (bi * p.Tq + qrow) * p.C4 + head * D4;
    var qv: array<vec4<f32>, D4_MAX>;
    var acc: array<vec4<f32>, D4_MAX>;
    for (var d = 0u; d < D4; d++) {
        qv[d] = q[qbase + d] * p.scale;
    }
    var m = -3.0e38;
    var l = 0.0;
    for (var t0 = 0u; t0 < p.Tkv; t0 += TK) {
        let n = min(TK, p.Tkv - t0);
        // Cooperative load; rows past the end are zero so no stale value (or NaN
        // from uninitialised memory) can reach the sums.
        for (var i = lid; i < TK * D4; i += WG) {
            let j = i / D4;
            let d = i % D4;
            var kv = vec4<f32>(0.0);
            var vv = vec4<f32>(0.0);
            if (j < n) {
                let src = (bi * p.Tkv + t0 + j) * p.C4 + head * D4 + d;
                kv = k[src];
                vv = v[src];
            }
            ks[j * D4_MAX + d] = kv;
            vs[j * D4_MAX + d] = vv;
        }
        workgroupBarrier();
        var s: array<f32, TK>;
        var tmax = m;
        for (var j = 0u; j < TK; j++) {
            var dotv = vec4<f32>(0.0);
            for (var d = 0u; d < D4; d++) {
                dotv += qv[d] * ks[j * D4_MAX + d];
            }
            let sj = select(-3.0e38, dotv.x + dotv.y + dotv.z + dotv.w, j < n);
            s[j] = sj;
            tmax = max(tmax, sj);
        }
        let corr = exp(m - tmax);
        l *= corr;
        for (var d = 0u; d < D4; d++) {
            acc[d] *= corr;
        }
        for (var j = 0u; j < TK; j++) {
            let pj = exp(s[j] - tmax);
            l += pj;
            for (var d = 0u; d < D4; d++) {
                acc[d] += pj * vs[j * D4_MAX + d];
            }
        }
        m = tmax;
        workgroupBarrier();
    }
    if (qi < p.Tq) {
        let inv = 1.0 / l;
        for (var d = 0u; d < D4; d++) {
            o[qbase + d] = acc[d] * inv;
        }
    }
}

// ---------------------------------------------------------------------------
// Texture-operand variant, chosen with the matmul's per-adapter variant: q, k and v
// are rgba32float textures [rows = image * T + token, C/4 texels], holding the
// images of this dispatch only. Each invocation fetches keys and values itself;
// every lane of a workgroup fetches the same texel, which texture units (and
// lavapipe's SIMD texel fetch) serve cheaply, with no workgroup memory or barrier.

@group(0) @binding(5) var q_tex: texture_2d<f32>;
@group(0) @binding(6) var k_tex: texture_2d<f32>;
@group(0) @binding(7) var v_tex: texture_2d<f32>;

@compute @workgroup_size(WG)
fn main_tex(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let head = wid.y;
    let bi = wid.z;
    let qi = gid.x;
    if (qi >= p.Tq) {
        return;
    }
    let hc = i32(head * D4);
    let qrow = i32(bi * p.Tq + qi);
    var qv: array<vec4<f32>, D4_MAX>;
    var acc: array<vec4<f32>, D4_MAX>;
    for (var d = 0u; d < D4; d++) {
        qv[d] = textureLoad(q_tex, vec2<i32>(hc + i32(d), qrow), 0) * p.scale;
    }
    var m = -3.0e38;
    var l = 0.0;
    for (var t0 = 0u; t0 < p.Tkv; t0 += TK) {
        let n = min(TK, p.Tkv - t0);
        var s: array<f32, TK>;
        var tmax = m;
        for (var j = 0u; j < TK; j++) {
            var sj = -3.0e38;
            if (j < n) {
                let krow = i32(bi * p.Tkv + t0 + j);
                var dotv = vec4<f32>(0.0);
                for (var d = 0u; d < D4; d++) {
                    dotv += qv[d] * textureLoad(k_tex, vec2<i32>(hc + i32(d), krow), 0);
                }
                sj = dotv.x + dotv.y + dotv.z + dotv.w;
            }
            s[j] = sj;
            tmax = max(tmax, sj);
        }
        let corr = exp(m - tmax);
        l *= corr;
        for (var d = 0u; d < D4; d++) {
            acc[d] *= corr;
        }
        for (var j = 0u; j < n; j++) {
            let pj = exp(s[j] - tmax);
            l += pj;
            let vrow = i32(bi * p.Tkv + t0 + j);
            for (var d = 0u; d < D4; d++) {
                acc[d] += pj * textureLoad(v_tex, vec2<i32>(hc + i32(d), vrow), 0);
            }
        }
        m = tmax;
    }
    let obase = ((p.b_off + bi) * p.Tq + qi) * p.C4 + head * D4;
    let inv = 1.0 / l;
    for (var d = 0u; d < D4; d++) {
        o[obase + d] = acc[d] * inv;
    }
}

// ---------------------------------------------------------------------------
// Backward (buffer operands), recomputing the probabilities instead of storing the
// Tq x Tkv matrix. With S = Q·Kᵀ·scale, P = softmax(S), O = P·V, per head:
//   D_i = dO_i · O_i,   dS = P ⊙ (dO·Vᵀ − D),
//   dQ = dS·K·scale,    dK = dSᵀ·Q·scale,    dV = Pᵀ·dO.
// attn_bwd_q: one invocation per query; writes dQ and (logsumexp, D) per query.
// attn_bwd_kv: one invocation per key; reads those and writes dK and dV.

@group(0) @binding(8) var<storage, read> dout: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read_write> dq: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read_write> lse_d: array<vec2<f32>>;
@group(0) @binding(11) var<storage, read_write> dk: array<vec4<f32>>;
@group(0) @binding(12) var<storage, read_write> dv: array<vec4<f32>>;

fn dot_row(x: ptr<function, array<vec4<f32>, D4_MAX>>, base: u32, which: u32) -> f32 {
    var acc = vec4<f32>(0.0);
    for (var d = 0u; d < D4; d++) {
        var other: vec4<f32>;
        if (which == 0u) {
            other = k[base + d];
        } else if (which == 1u) {
            other = v[base + d];
        } else if (which == 2u) {
            other = q[base + d];
        } else {
            other = dout[base + d];
        }
        acc += (*x)[d] * other;
    }
    return acc.x + acc.y + acc.z + acc.w;
}

@compute @workgroup_size(WG)
fn attn_bwd_q(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let head = wid.y;
    let bi = wid.z;
    let qi = gid.x;
    if (qi >= p.Tq) {
        return;
    }
    let qbase = (bi * p.Tq + qi) * p.C4 + head * D4;
    var qv: array<vec4<f32>, D4_MAX>;
    var gv: array<vec4<f32>, D4_MAX>;
    var acc: array<vec4<f32>, D4_MAX>;
    var dd = vec4<f32>(0.0);
    for (var d = 0u; d < D4; d++) {
        qv[d] = q[qbase + d] * p.scale;
        gv[d] = dout[qbase + d];
        dd += gv[d] * o[qbase + d];
    }
    let big_d = dd.x + dd.y + dd.z + dd.w;
    var m = -3.0e38;
    for (var j = 0u; j < p.Tkv; j++) {
        m = max(m, dot_row(&qv, (bi * p.Tkv + j) * p.C4 + head * D4, 0u));
    }
    var l = 0.0;
    for (var j = 0u; j < p.Tkv; j++) {
        l += exp(dot_row(&qv, (bi * p.Tkv + j) * p.C4 + head * D4, 0u) - m);
    }
    let lse = m + log(l);
    for (var j = 0u; j < p.Tkv; j++) {
        let kb = (bi * p.Tkv + j) * p.C4 + head * D4;
        let pij = exp(dot_row(&qv, kb, 0u) - lse);
        let ds = pij * (dot_row(&gv, kb, 1u) - big_d);
        for (var d = 0u; d < D4; d++) {
            acc[d] += ds * k[kb + d];
        }
    }
    for (var d = 0u; d < D4; d++) {
        dq[qbase + d] = acc[d] * p.scale;
    }
    lse_d[(bi * p.heads + head) * p.Tq + qi] = vec2<f32>(lse, big_d);
}

@compute @workgroup_size(WG)
fn attn_bwd_kv(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let head = wid.y;
    let bi = wid.z;
    let kj = gid.x;
    if (kj >= p.Tkv) {
        return;
    }
    let kb = (bi * p.Tkv + kj) * p.C4 + head * D4;
    var kv: array<vec4<f32>, D4_MAX>;
    var vv: array<vec4<f32>, D4_MAX>;
    var gk: array<vec4<f32>, D4_MAX>;
    var gvv: array<vec4<f32>, D4_MAX>;
    for (var d = 0u; d < D4; d++) {
        kv[d] = k[kb + d] * p.scale;
        vv[d] = v[kb + d];
    }
    for (var i = 0u; i < p.Tq; i++) {
        let qb = (bi * p.Tq + i) * p.C4 + head * D4;
        let ld = lse_d[(bi * p.heads + head) * p.Tq + i];
        let pij = exp(dot_row(&kv, qb, 2u) - ld.x);
        let ds = pij * (dot_row(&vv, qb, 3u) - ld.y);
        for (var d = 0u; d < D4; d++) {
            gvv[d] += pij * dout[qb + d];
            gk[d] += ds * q[qb + d];
        }
    }
    for (var d = 0u; d < D4; d++) {
        dk[kb + d] = gk[d] * p.scale;
        dv[kb + d] = gvv[d];
    }
}

// ---------------------------------------------------------------------------
// Backward with texture operands: the rows every lane of a workgroup reads at the
// same time (K and V in attn_bwd_q_tex, whose lanes are queries; Q and dO in
// attn_bwd_kv_tex, whose lanes are keys) come from textures, as in main_tex; each
// lane's own rows still come from buffers. Texture rows are the images of this
// dispatch only (b_off splits the batch); buffers hold the whole batch. The
// softmax statistics take one online pass (running max and rescaled sum), so Q·Kᵀ
// is computed twice per pair, not three times as in attn_bwd_q.

@group(0) @binding(13) var dout_tex: texture_2d<f32>;

// x · (row of K or V), for attn_bwd_q_tex; x · (row of Q or dO), for
// attn_bwd_kv_tex. Two functions so each entry point binds only its own textures.
fn dot_kv_tex(x: ptr<function, array<vec4<f32>, D4_MAX>>, value: bool, hc: i32, row: i32) -> f32 {
    var acc = vec4<f32>(0.0);
    for (var d = 0u; d < D4; d++) {
        let at = vec2<i32>(hc + i32(d), row);
        var other: vec4<f32>;
        if (value) {
            other = textureLoad(v_tex, at, 0);
        } else {
            other = textureLoad(k_tex, at, 0);
        }
        acc += (*x)[d] * other;
    }
    return acc.x + acc.y + acc.z + acc.w;
}

fn dot_qg_tex(x: ptr<function, array<vec4<f32>, D4_MAX>>, grad: bool, hc: i32, row: i32) -> f32 {
    var acc = vec4<f32>(0.0);
    for (var d = 0u; d < D4; d++) {
        let at = vec2<i32>(hc + i32(d), row);
        var other: vec4<f32>;
        if (grad) {
            other = textureLoad(dout_tex, at, 0);
        } else {
            other = textureLoad(q_tex, at, 0);
        }
        acc += (*x)[d] * other;
    }
    return acc.x + acc.y + acc.z + acc.w;
}

@compute @workgroup_size(WG)
fn attn_bwd_q_tex(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let head = wid.y;
    let bi = wid.z;
    let qi = gid.x;
    if (qi >= p.Tq) {
        return;
    }
    let gb = p.b_off + bi;
    let hc = i32(head * D4);
    let qbase = (gb * p.Tq + qi) * p.C4 + head * D4;
    var qv: array<vec4<f32>, D4_MAX>;
    var gv: array<vec4<f32>, D4_MAX>;
    var acc: array<vec4<f32>, D4_MAX>;
    var dd = vec4<f32>(0.0);
    for (var d = 0u; d < D4; d++) {
        qv[d] = q[qbase + d] * p.scale;
        gv[d] = dout[qbase + d];
        dd += gv[d] * o[qbase + d];
    }
    let big_d = dd.x + dd.y + dd.z + dd.w;
    var m = -3.0e38;
    var l = 0.0;
    for (var j = 0u; j < p.Tkv; j++) {
        let s = dot_kv_tex(&qv, false, hc, i32(bi * p.Tkv + j));
        let mn = max(m, s);
        l = l * exp(m - mn) + exp(s - mn);
        m = mn;
    }
    let lse = m + log(l);
    for (var j = 0u; j < p.Tkv; j++) {
        let row = i32(bi * p.Tkv + j);
        let pij = exp(dot_kv_tex(&qv, false, hc, row) - lse);
        let ds = pij * (dot_kv_tex(&gv, true, hc, row) - big_d);
        for (var d = 0u; d < D4; d++) {
            acc[d] += ds * textureLoad(k_tex, vec2<i32>(hc + i32(d), row), 0);
        }
    }
    for (var d = 0u; d < D4; d++) {
        dq[qbase + d] = acc[d] * p.scale;
    }
    lse_d[(gb * p.heads + head) * p.Tq + qi] = vec2<f32>(lse, big_d);
}

@compute @workgroup_size(WG)
fn attn_bwd_kv_tex(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let head = wid.y;
    let bi = wid.z;
    let kj = gid.x;
    if (kj >= p.Tkv) {
        return;
    }
    let gb = p.b_off + bi;
    let hc = i32(head * D4);
    let kb = (gb * p.Tkv + kj) * p.C4 + head * D4;
    var kv: array<vec4<f32>, D4_MAX>;
    var vv: array<vec4<f32>, D4_MAX>;
    var gk: array<vec4<f32>, D4_MAX>;
    var gvv: array<vec4<f32>, D4_MAX>;
    for (var d = 0u; d < D4; d++) {
        kv[d] = k[kb + d] * p.scale;
        vv[d] = v[kb + d];
    }
    for (var i = 0u; i < p.Tq; i++) {
        let row = i32(bi * p.Tq + i);
        let ld = lse_d[(gb * p.heads + head) * p.Tq + i];
        let pij = exp(dot_qg_tex(&kv, false, hc, row) - ld.x);
        let ds = pij * (dot_qg_tex(&vv, true, hc, row) - ld.y);
        for (var d = 0u; d < D4; d++) {
            let at = vec2<i32>(hc + i32(d), row);
            gvv[d] += pij * textureLoad(dout_tex, at, 0);
            gk[d] += ds * textureLoad(q_tex, at, 0);
        }
    }
    for (var d = 0u; d < D4; d++) {
        dk[kb + d] = gk[d] * p.scale;
        dv[kb + d] = gvv[d];
    }
}
