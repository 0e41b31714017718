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
// Keys (or, in the dK/dV pass, queries) per tile staged in workgroup memory, TK
// rows of D4 vec4s per operand: 32 (8 KiB per operand at D = 64), or 64 where a
// whole sequence of 33-64 rows then fits one tile (CvT's stage 2: 50 keys at 224):
// one round of loads and barriers, and one rescale of the running output, instead
// of two. The host picks it (`ops::attention::key_tile`).
override TK: u32 = 32u;
const TK_MAX: u32 = 64u;
const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;
// 1: also write the probabilities P [B, heads, Tq, Tkv] (training with saved
// probabilities; see attn_bwd_q_p). The scores go to `probs` as they are computed
// and are normalised in place once the row's log-sum-exp is known, so saving P
// costs a store and a load-store per score, not a second Q·Kᵀ.
override SAVE_P: u32 = 0u;
// The GPU set's training forward with recomputed probabilities: also write each
// query's log-sum-exp (binding 10, .x), so the backward recomputes the scores
// once per pass instead of finding the softmax statistics again.
override SAVE_LSE: bool = false;

// b_off: first image of this dispatch (the texture variant splits the batch).
// p_off: in the saved-P backward on textures, the P and dS textures hold this
// chunk's images only, starting p_off elements into their first texel.
struct Params { B: u32, Tq: u32, Tkv: u32, C4: u32, heads: u32, scale: f32, b_off: u32, p_off: u32 }

@group(0) @binding(0) var<storage, read> q: array<vec4<act>>;
@group(0) @binding(1) var<storage, read> k: array<vec4<act>>;
@group(0) @binding(2) var<storage, read> v: array<vec4<act>>;
@group(0) @binding(3) var<storage, read_write> o: array<vec4<act>>;
@group(0) @binding(4) var<uniform> p: Params;

@group(0) @binding(14) var<storage, read_write> probs: array<f32>;
// Per query (log-sum-exp, D = dO·O): the forward's SAVE_LSE writes .x, the
// backward's per-query pass .y.
@group(0) @binding(10) var<storage, read_write> lse_d: array<vec2<f32>>;
@group(0) @binding(15) var<storage, read_write> dscore: array<f32>;

// Start of query row `qi` of head `head`, image `gb` (whole-batch index) in P and dS.
fn prow(gb: u32, head: u32, qi: u32) -> u32 {
    return ((gb * p.heads + head) * p.Tq + qi) * p.Tkv;
}

// Turns the stored scores of a P row into probabilities.
fn normalise_row(pb: u32, lse: f32) {
    for (var j = 0u; j < p.Tkv; j++) {
        probs[pb + j] = exp(probs[pb + j] - lse);
    }
}

var<workgroup> ks: array<vec4<f32>, TK * D4>;
var<workgroup> vs: array<vec4<f32>, TK * D4>;
// The output's gradient (the backward; a placeholder in the forward, which
// shares stage_tile).
@group(0) @binding(8) var<storage, read> dout: array<vec4<f32>>;

// Stages rows t0 .. t0 + n of one head into the tiles, a workgroup's WG
// invocations together: K and V rows (which 0: the forward, the dQ pass) or Q and
// dO rows (which 1: the dK/dV pass) into ks and vs. Rows past n are zero, so no
// stale value (or NaN from uninitialised memory) can reach the sums.
fn stage_tile(which: u32, bi: u32, head: u32, t0: u32, n: u32, lid: u32) {
    let rows = select(p.Tkv, p.Tq, which == 1u);
    for (var i = lid; i < TK * D4; i += WG) {
        let j = i / D4;
        let d = i % D4;
        var a0 = vec4<f32>(0.0);
        var a1 = vec4<f32>(0.0);
        if (j < n) {
            let src = (bi * rows + t0 + j) * p.C4 + head * D4 + d;
            if (which == 0u) {
                a0 = vec4<f32>(k[src]);
                a1 = vec4<f32>(v[src]);
            } else {
                a0 = vec4<f32>(q[src]);
                a1 = dout[src];
            }
        }
        ks[j * D4 + d] = a0;
        vs[j * D4 + d] = a1;
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let head = wid.y;
    let bi = wid.z;
    let qi = wid.x * WG + lid;
    let qrow = min(qi, p.Tq - 1u);
    let qbase = (bi * p.Tq + qrow) * p.C4 + head * D4;
    var qv: array<vec4<f32>, D4_MAX>;
    var acc: array<vec4<f32>, D4_MAX>;
    // Scores in base 2 (the scale times log2 e folded into q): the online softmax
    // runs on exp2, one instruction on GPUs where exp is two.
    for (var d = 0u; d < D4; d++) {
        qv[d] = vec4<f32>(q[qbase + d]) * (p.scale * LOG2E);
    }
    var m = -3.0e38;
    var l = 0.0;
    for (var t0 = 0u; t0 < p.Tkv; t0 += TK) {
        let n = min(TK, p.Tkv - t0);
        stage_tile(0u, bi, head, t0, n, lid);
        workgroupBarrier();
        var s: array<f32, TK_MAX>;
        var tmax = m;
        for (var j = 0u; j < n; j++) {
            var dotv = vec4<f32>(0.0);
            for (var d = 0u; d < D4; d++) {
                dotv += qv[d] * ks[j * D4 + d];
            }
            let sj = dotv.x + dotv.y + dotv.z + dotv.w;
            s[j] = sj;
            if (SAVE_P != 0u && qi < p.Tq) {
                // Natural-log scores, normalised in place at the end.
                probs[prow(bi, head, qi) + t0 + j] = sj * LN2;
            }
            tmax = max(tmax, sj);
        }
        let corr = exp2(m - tmax);
        l *= corr;
        for (var d = 0u; d < D4; d++) {
            acc[d] *= corr;
        }
        for (var j = 0u; j < n; j++) {
            let pj = exp2(s[j] - tmax);
            l += pj;
            for (var d = 0u; d < D4; d++) {
                acc[d] += pj * vs[j * D4 + d];
            }
        }
        m = tmax;
        workgroupBarrier();
    }
    if (qi < p.Tq) {
        let inv = 1.0 / l;
        for (var d = 0u; d < D4; d++) {
            o[qbase + d] = vec4<act>(acc[d] * inv);
        }
        // The natural log-sum-exp.
        let lse = (m + log2(l)) * LN2;
        if (SAVE_P != 0u) {
            normalise_row(prow(bi, head, qi), lse);
        }
        if (SAVE_LSE) {
            lse_d[(bi * p.heads + head) * p.Tq + qi] = vec2<f32>(lse, 0.0);
        }
    }
}

// ---------------------------------------------------------------------------
// Texture-operand variant, chosen with the matmul's per-adapter variant: q, k and v
// are rgba32float textures [rows = image * T + token, C/4 texels], holding the
// images of this dispatch only. Each invocation fetches keys and values itself;
// every lane of a workgroup fetches the same texel, which texture units (and
// lavapipe's SIMD texel fetch) serve cheaply, with no workgroup memory or barrier.

@group(0) @binding(5) var q_tex: Tex;
@group(0) @binding(6) var k_tex: Tex;
@group(0) @binding(7) var v_tex: Tex;

// A head's row of up to 16 vec4 (D <= 64) in named struct fields: CPU drivers keep
// a private array in memory (lavapipe: a scratch load or store per element), while
// struct fields stay in registers. Fields past D4 are never touched: the guards are
// on an override constant, so each pipeline compiles only its own D4 fields.
struct Row {
    r0: vec4<f32>,
    r1: vec4<f32>,
    r2: vec4<f32>,
    r3: vec4<f32>,
    r4: vec4<f32>,
    r5: vec4<f32>,
    r6: vec4<f32>,
    r7: vec4<f32>,
    r8: vec4<f32>,
    r9: vec4<f32>,
    r10: vec4<f32>,
    r11: vec4<f32>,
    r12: vec4<f32>,
    r13: vec4<f32>,
    r14: vec4<f32>,
    r15: vec4<f32>,
}

// Row `row` of texture t from texel column col: a head's D4 texels.
fn tex_row(t: Tex, col: i32, row: i32) -> Row {
    var r: Row;
    r.r0 = texel(t, vec2<i32>(col, row));
    if (D4 > 1u) { r.r1 = texel(t, vec2<i32>(col + 1, row)); }
    if (D4 > 2u) { r.r2 = texel(t, vec2<i32>(col + 2, row)); }
    if (D4 > 3u) { r.r3 = texel(t, vec2<i32>(col + 3, row)); }
    if (D4 > 4u) { r.r4 = texel(t, vec2<i32>(col + 4, row)); }
    if (D4 > 5u) { r.r5 = texel(t, vec2<i32>(col + 5, row)); }
    if (D4 > 6u) { r.r6 = texel(t, vec2<i32>(col + 6, row)); }
    if (D4 > 7u) { r.r7 = texel(t, vec2<i32>(col + 7, row)); }
    if (D4 > 8u) { r.r8 = texel(t, vec2<i32>(col + 8, row)); }
    if (D4 > 9u) { r.r9 = texel(t, vec2<i32>(col + 9, row)); }
    if (D4 > 10u) { r.r10 = texel(t, vec2<i32>(col + 10, row)); }
    if (D4 > 11u) { r.r11 = texel(t, vec2<i32>(col + 11, row)); }
    if (D4 > 12u) { r.r12 = texel(t, vec2<i32>(col + 12, row)); }
    if (D4 > 13u) { r.r13 = texel(t, vec2<i32>(col + 13, row)); }
    if (D4 > 14u) { r.r14 = texel(t, vec2<i32>(col + 14, row)); }
    if (D4 > 15u) { r.r15 = texel(t, vec2<i32>(col + 15, row)); }
    return r;
}

fn k_row(col: i32, row: i32) -> Row {
    return tex_row(k_tex, col, row);
}

fn v_row(col: i32, row: i32) -> Row {
    return tex_row(v_tex, col, row);
}

fn q_row(col: i32, row: i32, scale: f32) -> Row {
    let r = tex_row(q_tex, col, row);
    return row_axpy(r, scale, 0.0, r);
}

fn row_dot(a: Row, b: Row) -> f32 {
    var s = vec4<f32>(0.0);
    s += a.r0 * b.r0;
    if (D4 > 1u) { s += a.r1 * b.r1; }
    if (D4 > 2u) { s += a.r2 * b.r2; }
    if (D4 > 3u) { s += a.r3 * b.r3; }
    if (D4 > 4u) { s += a.r4 * b.r4; }
    if (D4 > 5u) { s += a.r5 * b.r5; }
    if (D4 > 6u) { s += a.r6 * b.r6; }
    if (D4 > 7u) { s += a.r7 * b.r7; }
    if (D4 > 8u) { s += a.r8 * b.r8; }
    if (D4 > 9u) { s += a.r9 * b.r9; }
    if (D4 > 10u) { s += a.r10 * b.r10; }
    if (D4 > 11u) { s += a.r11 * b.r11; }
    if (D4 > 12u) { s += a.r12 * b.r12; }
    if (D4 > 13u) { s += a.r13 * b.r13; }
    if (D4 > 14u) { s += a.r14 * b.r14; }
    if (D4 > 15u) { s += a.r15 * b.r15; }
    return s.x + s.y + s.z + s.w;
}

// r * c + p * b, per field.
fn row_axpy(r0: Row, c: f32, p: f32, b: Row) -> Row {
    var r = r0;
    r.r0 = r.r0 * c + p * b.r0;
    if (D4 > 1u) { r.r1 = r.r1 * c + p * b.r1; }
    if (D4 > 2u) { r.r2 = r.r2 * c + p * b.r2; }
    if (D4 > 3u) { r.r3 = r.r3 * c + p * b.r3; }
    if (D4 > 4u) { r.r4 = r.r4 * c + p * b.r4; }
    if (D4 > 5u) { r.r5 = r.r5 * c + p * b.r5; }
    if (D4 > 6u) { r.r6 = r.r6 * c + p * b.r6; }
    if (D4 > 7u) { r.r7 = r.r7 * c + p * b.r7; }
    if (D4 > 8u) { r.r8 = r.r8 * c + p * b.r8; }
    if (D4 > 9u) { r.r9 = r.r9 * c + p * b.r9; }
    if (D4 > 10u) { r.r10 = r.r10 * c + p * b.r10; }
    if (D4 > 11u) { r.r11 = r.r11 * c + p * b.r11; }
    if (D4 > 12u) { r.r12 = r.r12 * c + p * b.r12; }
    if (D4 > 13u) { r.r13 = r.r13 * c + p * b.r13; }
    if (D4 > 14u) { r.r14 = r.r14 * c + p * b.r14; }
    if (D4 > 15u) { r.r15 = r.r15 * c + p * b.r15; }
    return r;
}

fn row_store(base: u32, a: Row, inv: f32) {
    o[base + 0u] = vec4<act>(a.r0 * inv);
    if (D4 > 1u) { o[base + 1u] = vec4<act>(a.r1 * inv); }
    if (D4 > 2u) { o[base + 2u] = vec4<act>(a.r2 * inv); }
    if (D4 > 3u) { o[base + 3u] = vec4<act>(a.r3 * inv); }
    if (D4 > 4u) { o[base + 4u] = vec4<act>(a.r4 * inv); }
    if (D4 > 5u) { o[base + 5u] = vec4<act>(a.r5 * inv); }
    if (D4 > 6u) { o[base + 6u] = vec4<act>(a.r6 * inv); }
    if (D4 > 7u) { o[base + 7u] = vec4<act>(a.r7 * inv); }
    if (D4 > 8u) { o[base + 8u] = vec4<act>(a.r8 * inv); }
    if (D4 > 9u) { o[base + 9u] = vec4<act>(a.r9 * inv); }
    if (D4 > 10u) { o[base + 10u] = vec4<act>(a.r10 * inv); }
    if (D4 > 11u) { o[base + 11u] = vec4<act>(a.r11 * inv); }
    if (D4 > 12u) { o[base + 12u] = vec4<act>(a.r12 * inv); }
    if (D4 > 13u) { o[base + 13u] = vec4<act>(a.r13 * inv); }
    if (D4 > 14u) { o[base + 14u] = vec4<act>(a.r14 * inv); }
    if (D4 > 15u) { o[base + 15u] = vec4<act>(a.r15 * inv); }
}

// Queries per invocation of main_tex, 1, 2 or 4: every K and V row fetched feeds
// QPI queries (texel fetches, not arithmetic, bound this kernel on CPU drivers).
override QPI: u32 = 2u;

// One query's online-softmax state: running max, sum and output row.
struct QState { m: f32, l: f32, acc: Row }

// Folds key score s with value row vr into the state; the running output is
// rescaled by exp(m_old - m_new) (a scalar per field), which keeps the scores out
// of an array.
fn online(st0: QState, s: f32, vr: Row) -> QState {
    var st = st0;
    let mn = max(st.m, s);
    let corr = exp(st.m - mn);
    let pj = exp(s - mn);
    st.l = st.l * corr + pj;
    st.acc = row_axpy(st.acc, corr, pj, vr);
    st.m = mn;
    return st;
}

// Stores a finished query (and normalises its saved P row).
fn finish(st: QState, bi: u32, head: u32, qi: u32) {
    row_store(((p.b_off + bi) * p.Tq + qi) * p.C4 + head * D4, st.acc, 1.0 / st.l);
    if (SAVE_P != 0u) {
        normalise_row(prow(p.b_off + bi, head, qi), st.m + log(st.l));
    }
}

@compute @workgroup_size(WG)
fn main_tex(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let head = wid.y;
    let bi = wid.z;
    let q0 = gid.x * QPI;
    if (q0 >= p.Tq) {
        return;
    }
    // Queries past the end clamp to the last (computed, then not stored).
    let q1 = min(q0 + 1u, p.Tq - 1u);
    let q2 = min(q0 + 2u, p.Tq - 1u);
    let q3 = min(q0 + 3u, p.Tq - 1u);
    let hc = i32(head * D4);
    let qr0 = q_row(hc, i32(bi * p.Tq + q0), p.scale);
    var qr1: Row;
    var qr2: Row;
    var qr3: Row;
    if (QPI > 1u) {
        qr1 = q_row(hc, i32(bi * p.Tq + q1), p.scale);
    }
    if (QPI > 2u) {
        qr2 = q_row(hc, i32(bi * p.Tq + q2), p.scale);
        qr3 = q_row(hc, i32(bi * p.Tq + q3), p.scale);
    }
    // The P rows of the four queries (a clamped query's row is the last query's).
    let pr0 = prow(p.b_off + bi, head, q0);
    let pr1 = prow(p.b_off + bi, head, q1);
    let pr2 = prow(p.b_off + bi, head, q2);
    let pr3 = prow(p.b_off + bi, head, q3);
    var empty: Row;
    var st0 = QState(-3.0e38, 0.0, empty);
    var st1 = st0;
    var st2 = st0;
    var st3 = st0;
    for (var j = 0u; j < p.Tkv; j++) {
        let row = i32(bi * p.Tkv + j);
        let kr = k_row(hc, row);
        let vr = v_row(hc, row);
        let s0 = row_dot(qr0, kr);
        if (SAVE_P != 0u) {
            probs[pr0 + j] = s0;
        }
        st0 = online(st0, s0, vr);
        if (QPI > 1u) {
            let s1 = row_dot(qr1, kr);
            if (SAVE_P != 0u) {
                // A clamped query writes the last row's own score again: harmless.
                probs[pr1 + j] = s1;
            }
            st1 = online(st1, s1, vr);
        }
        if (QPI > 2u) {
            let s2 = row_dot(qr2, kr);
            let s3 = row_dot(qr3, kr);
            if (SAVE_P != 0u) {
                probs[pr2 + j] = s2;
                probs[pr3 + j] = s3;
            }
            st2 = online(st2, s2, vr);
            st3 = online(st3, s3, vr);
        }
    }
    finish(st0, bi, head, q0);
    if (QPI > 1u && q0 + 1u < p.Tq) {
        finish(st1, bi, head, q1);
    }
    if (QPI > 2u && q0 + 2u < p.Tq) {
        finish(st2, bi, head, q2);
    }
    if (QPI > 3u && q0 + 3u < p.Tq) {
        finish(st3, bi, head, q3);
    }
}

// ---------------------------------------------------------------------------
// Backward of the GPU kernel set, recomputing the probabilities instead of
// storing the Tq x Tkv matrix, as FlashAttention-2 does. With S = Q·Kᵀ·scale,
// P = softmax(S) = exp(S − lse), O = P·V, per head:
//   D_i = dO_i · O_i,   dS = P ⊙ (dO·Vᵀ − D),
//   dQ = dS·K·scale,    dK = dSᵀ·Q·scale,    dV = Pᵀ·dO.
// The forward kept lse (SAVE_LSE), so each pass computes each score once.
// attn_bwd_q: query-parallel, a workgroup of WG queries of one head, keys and
// values in tiles of TK staged in workgroup memory; D in its prologue; writes dQ
// and (lse, D) per query. attn_bwd_kv: key-parallel, a workgroup of WG keys,
// queries, dO and (lse, D) in tiles of TK; writes dK and dV. No atomics: each
// output row has one writer.

@group(0) @binding(9) var<storage, read_write> dq: array<vec4<f32>>;
@group(0) @binding(11) var<storage, read_write> dk: array<vec4<f32>>;
@group(0) @binding(12) var<storage, read_write> dv: array<vec4<f32>>;

// A tile's per-query (lse, D) in attn_bwd_kv.
var<workgroup> lds: array<vec2<f32>, TK>;

@compute @workgroup_size(WG)
fn attn_bwd_q(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let head = wid.y;
    let bi = wid.z;
    let qi = wid.x * WG + lid;
    // Queries past the end compute a clamped row (every lane takes part in the
    // tile loads and barriers) and store nothing.
    let qrow = min(qi, p.Tq - 1u);
    let qbase = (bi * p.Tq + qrow) * p.C4 + head * D4;
    let row = (bi * p.heads + head) * p.Tq + qrow;
    var qv: array<vec4<f32>, D4_MAX>;
    var gv: array<vec4<f32>, D4_MAX>;
    var acc: array<vec4<f32>, D4_MAX>;
    var dd = vec4<f32>(0.0);
    for (var d = 0u; d < D4; d++) {
        qv[d] = vec4<f32>(q[qbase + d]) * p.scale;
        gv[d] = dout[qbase + d];
        dd += gv[d] * vec4<f32>(o[qbase + d]);
    }
    let big_d = dd.x + dd.y + dd.z + dd.w;
    let lse = lse_d[row].x;
    for (var t0 = 0u; t0 < p.Tkv; t0 += TK) {
        let n = min(TK, p.Tkv - t0);
        stage_tile(0u, bi, head, t0, n, lid);
        workgroupBarrier();
        for (var j = 0u; j < n; j++) {
            var sv = vec4<f32>(0.0);
            var pv = vec4<f32>(0.0);
            for (var d = 0u; d < D4; d++) {
                sv += qv[d] * ks[j * D4 + d];
                pv += gv[d] * vs[j * D4 + d];
            }
            let pij = exp(sv.x + sv.y + sv.z + sv.w - lse);
            let ds = pij * (pv.x + pv.y + pv.z + pv.w - big_d);
            for (var d = 0u; d < D4; d++) {
                acc[d] += ds * ks[j * D4 + d];
            }
        }
        workgroupBarrier();
    }
    if (qi < p.Tq) {
        for (var d = 0u; d < D4; d++) {
            dq[qbase + d] = acc[d] * p.scale;
        }
        // Only D: lanes past the last query read this row's lse (clamped).
        lse_d[row].y = big_d;
    }
}

@compute @workgroup_size(WG)
fn attn_bwd_kv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let head = wid.y;
    let bi = wid.z;
    let kj = wid.x * WG + lid;
    let krow = min(kj, p.Tkv - 1u);
    let kb = (bi * p.Tkv + krow) * p.C4 + head * D4;
    var kv: array<vec4<f32>, D4_MAX>;
    var vv: array<vec4<f32>, D4_MAX>;
    var gk: array<vec4<f32>, D4_MAX>;
    var gvv: array<vec4<f32>, D4_MAX>;
    for (var d = 0u; d < D4; d++) {
        kv[d] = vec4<f32>(k[kb + d]) * p.scale;
        vv[d] = vec4<f32>(v[kb + d]);
    }
    // Query tiles: Q rows in ks, dO rows in vs, (lse, D) in lds.
    for (var t0 = 0u; t0 < p.Tq; t0 += TK) {
        let n = min(TK, p.Tq - t0);
        stage_tile(1u, bi, head, t0, n, lid);
        for (var j = lid; j < TK; j += WG) {
            lds[j] = select(vec2<f32>(0.0), lse_d[(bi * p.heads + head) * p.Tq + t0 + min(j, n - 1u)], j < n);
        }
        workgroupBarrier();
        for (var j = 0u; j < n; j++) {
            var sv = vec4<f32>(0.0);
            var pv = vec4<f32>(0.0);
            for (var d = 0u; d < D4; d++) {
                sv += kv[d] * ks[j * D4 + d];
                pv += vv[d] * vs[j * D4 + d];
            }
            let ld = lds[j];
            let pij = exp(sv.x + sv.y + sv.z + sv.w - ld.x);
            let ds = pij * (pv.x + pv.y + pv.z + pv.w - ld.y);
            for (var d = 0u; d < D4; d++) {
                gvv[d] += pij * vs[j * D4 + d];
                gk[d] += ds * ks[j * D4 + d];
            }
        }
        workgroupBarrier();
    }
    if (kj < p.Tkv) {
        for (var d = 0u; d < D4; d++) {
            dk[kb + d] = gk[d] * p.scale;
            dv[kb + d] = gvv[d];
        }
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

@group(0) @binding(13) var dout_tex: Tex;

// Rows of the backward's buffers and the dO texture (see Row).
// derive k_buf from q_buf: q[ -> k[
// derive v_buf from q_buf: q[ -> v[
// derive o_buf from q_buf: q[ -> o[
// derive dout_buf from q_buf: q[ -> dout[
fn q_buf(base: u32, scale: f32) -> Row {
    var r: Row;
    r.r0 = vec4<f32>(q[base + 0u]) * scale;
    if (D4 > 1u) { r.r1 = vec4<f32>(q[base + 1u]) * scale; }
    if (D4 > 2u) { r.r2 = vec4<f32>(q[base + 2u]) * scale; }
    if (D4 > 3u) { r.r3 = vec4<f32>(q[base + 3u]) * scale; }
    if (D4 > 4u) { r.r4 = vec4<f32>(q[base + 4u]) * scale; }
    if (D4 > 5u) { r.r5 = vec4<f32>(q[base + 5u]) * scale; }
    if (D4 > 6u) { r.r6 = vec4<f32>(q[base + 6u]) * scale; }
    if (D4 > 7u) { r.r7 = vec4<f32>(q[base + 7u]) * scale; }
    if (D4 > 8u) { r.r8 = vec4<f32>(q[base + 8u]) * scale; }
    if (D4 > 9u) { r.r9 = vec4<f32>(q[base + 9u]) * scale; }
    if (D4 > 10u) { r.r10 = vec4<f32>(q[base + 10u]) * scale; }
    if (D4 > 11u) { r.r11 = vec4<f32>(q[base + 11u]) * scale; }
    if (D4 > 12u) { r.r12 = vec4<f32>(q[base + 12u]) * scale; }
    if (D4 > 13u) { r.r13 = vec4<f32>(q[base + 13u]) * scale; }
    if (D4 > 14u) { r.r14 = vec4<f32>(q[base + 14u]) * scale; }
    if (D4 > 15u) { r.r15 = vec4<f32>(q[base + 15u]) * scale; }
    return r;
}

// derive dk_store from dq_store: dq[ -> dk[
// derive dv_store from dq_store: dq[ -> dv[
fn dq_store(base: u32, a: Row, scale: f32) {
    dq[base + 0u] = a.r0 * scale;
    if (D4 > 1u) { dq[base + 1u] = a.r1 * scale; }
    if (D4 > 2u) { dq[base + 2u] = a.r2 * scale; }
    if (D4 > 3u) { dq[base + 3u] = a.r3 * scale; }
    if (D4 > 4u) { dq[base + 4u] = a.r4 * scale; }
    if (D4 > 5u) { dq[base + 5u] = a.r5 * scale; }
    if (D4 > 6u) { dq[base + 6u] = a.r6 * scale; }
    if (D4 > 7u) { dq[base + 7u] = a.r7 * scale; }
    if (D4 > 8u) { dq[base + 8u] = a.r8 * scale; }
    if (D4 > 9u) { dq[base + 9u] = a.r9 * scale; }
    if (D4 > 10u) { dq[base + 10u] = a.r10 * scale; }
    if (D4 > 11u) { dq[base + 11u] = a.r11 * scale; }
    if (D4 > 12u) { dq[base + 12u] = a.r12 * scale; }
    if (D4 > 13u) { dq[base + 13u] = a.r13 * scale; }
    if (D4 > 14u) { dq[base + 14u] = a.r14 * scale; }
    if (D4 > 15u) { dq[base + 15u] = a.r15 * scale; }
}

fn dout_row(col: i32, row: i32) -> Row {
    return tex_row(dout_tex, col, row);
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
    // dO (and Q) from textures like K and V: a storage-buffer load runs as a loop
    // over the SIMD lanes on CPU drivers. O stays a buffer read: a kernel reads at
    // most MAX_TEXTURES_PER_KERNEL textures (texread.rs).
    let qrow = i32(bi * p.Tq + qi);
    let qv = q_row(hc, qrow, p.scale);
    let gv = dout_row(hc, qrow);
    let big_d = row_dot(gv, o_buf(qbase, 1.0));
    var m = -3.0e38;
    var l = 0.0;
    for (var j = 0u; j < p.Tkv; j++) {
        let s = row_dot(qv, k_row(hc, i32(bi * p.Tkv + j)));
        let mn = max(m, s);
        l = l * exp(m - mn) + exp(s - mn);
        m = mn;
    }
    let lse = m + log(l);
    var acc: Row;
    for (var j = 0u; j < p.Tkv; j++) {
        let row = i32(bi * p.Tkv + j);
        let kr = k_row(hc, row);
        let pij = exp(row_dot(qv, kr) - lse);
        let ds = pij * (row_dot(gv, v_row(hc, row)) - big_d);
        acc = row_axpy(acc, 1.0, ds, kr);
    }
    dq_store(qbase, acc, p.scale);
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
    let kv = k_buf(kb, p.scale);
    let vv = v_buf(kb, 1.0);
    var gk: Row;
    var gvv: Row;
    for (var i = 0u; i < p.Tq; i++) {
        let row = i32(bi * p.Tq + i);
        let ld = lse_d[(gb * p.heads + head) * p.Tq + i];
        let qr = q_row(hc, row, 1.0);
        let gr = dout_row(hc, row);
        let pij = exp(row_dot(kv, qr) - ld.x);
        let ds = pij * (row_dot(vv, gr) - ld.y);
        gvv = row_axpy(gvv, 1.0, pij, gr);
        gk = row_axpy(gk, 1.0, ds, qr);
    }
    dk_store(kb, gk, p.scale);
    dv_store(kb, gvv, 1.0);
}

// ---------------------------------------------------------------------------
// Backward with saved probabilities (P written by the forward with SAVE_P):
// no Q·Kᵀ is recomputed. Per (query, key) pair the per-query pass does one dot
// (dO·V) and one multiply-add row (dS·K) and stores dS; the per-key pass does two
// multiply-add rows (Pᵀ·dO, dSᵀ·Q), where the recomputing kernels do four and
// four. The cost is P and dS in memory: B·heads·Tq·Tkv floats each.
// Buffer operands (attn_bwd_q_p, attn_bwd_kv_p) or, as attn_bwd_*_tex, the rows
// all lanes share from textures (attn_bwd_q_p_tex, attn_bwd_kv_p_tex).

// dq for query `qi` of image gb (whole batch) from its row of P; stores that row of dS.
@compute @workgroup_size(WG)
fn attn_bwd_q_p(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let head = wid.y;
    let gb = wid.z;
    let qi = gid.x;
    if (qi >= p.Tq) {
        return;
    }
    let qbase = (gb * p.Tq + qi) * p.C4 + head * D4;
    let gv = dout_buf(qbase, 1.0);
    let big_d = row_dot(gv, o_buf(qbase, 1.0));
    let pb = prow(gb, head, qi);
    var acc: Row;
    for (var j = 0u; j < p.Tkv; j++) {
        let kb = (gb * p.Tkv + j) * p.C4 + head * D4;
        let ds = probs[pb + j] * (row_dot(gv, v_buf(kb, 1.0)) - big_d);
        dscore[pb + j] = ds;
        acc = row_axpy(acc, 1.0, ds, k_buf(kb, 1.0));
    }
    dq_store(qbase, acc, p.scale);
}

@compute @workgroup_size(WG)
fn attn_bwd_kv_p(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let head = wid.y;
    let gb = wid.z;
    let kj = gid.x;
    if (kj >= p.Tkv) {
        return;
    }
    var gk: Row;
    var gvv: Row;
    for (var i = 0u; i < p.Tq; i++) {
        let qb = (gb * p.Tq + i) * p.C4 + head * D4;
        let pi = prow(gb, head, i) + kj;
        gvv = row_axpy(gvv, 1.0, probs[pi], dout_buf(qb, 1.0));
        gk = row_axpy(gk, 1.0, dscore[pi], q_buf(qb, 1.0));
    }
    let kb = (gb * p.Tkv + kj) * p.C4 + head * D4;
    dk_store(kb, gk, p.scale);
    dv_store(kb, gvv, 1.0);
}

// P and dS as linear textures (Graph::linear_texture: value n at texel n / 4 of a
// 2^k-wide texture), so the lanes' differing elements come as one gather.
@group(0) @binding(16) var probs_tex: Tex;
@group(0) @binding(17) var dscore_tex: Tex;

fn lin1(t: Tex, n: u32) -> f32 {
    let s = countTrailingZeros(textureDimensions(t).x);
    let i = n >> 2u;
    return texel(t, vec2<i32>(vec2<u32>(i & ((1u << s) - 1u), i >> s)))[n & 3u];
}

@compute @workgroup_size(WG)
fn attn_bwd_q_p_tex(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let head = wid.y;
    let bi = wid.z;
    let qi = gid.x;
    if (qi >= p.Tq) {
        return;
    }
    let gb = p.b_off + bi;
    let hc = i32(head * D4);
    let qbase = (gb * p.Tq + qi) * p.C4 + head * D4;
    let qrow = i32(bi * p.Tq + qi);
    let gv = dout_row(hc, qrow);
    let big_d = row_dot(gv, o_buf(qbase, 1.0));
    let pb = prow(gb, head, qi);
    var acc: Row;
    for (var j = 0u; j < p.Tkv; j++) {
        let row = i32(bi * p.Tkv + j);
        let ds = lin1(probs_tex, p.p_off + prow(bi, head, qi) + j) * (row_dot(gv, v_row(hc, row)) - big_d);
        dscore[pb + j] = ds;
        acc = row_axpy(acc, 1.0, ds, k_row(hc, row));
    }
    dq_store(qbase, acc, p.scale);
}

@compute @workgroup_size(WG)
fn attn_bwd_kv_p_tex(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let head = wid.y;
    let bi = wid.z;
    let kj = gid.x;
    if (kj >= p.Tkv) {
        return;
    }
    let gb = p.b_off + bi;
    let hc = i32(head * D4);
    var gk: Row;
    var gvv: Row;
    for (var i = 0u; i < p.Tq; i++) {
        let row = i32(bi * p.Tq + i);
        // P and dS of this chunk's images (local image bi).
        let pi = p.p_off + prow(bi, head, i) + kj;
        gvv = row_axpy(gvv, 1.0, lin1(probs_tex, pi), dout_row(hc, row));
        gk = row_axpy(gk, 1.0, lin1(dscore_tex, pi), q_row(hc, row, 1.0));
    }
    let kb = (gb * p.Tkv + kj) * p.C4 + head * D4;
    dk_store(kb, gk, p.scale);
    dv_store(kb, gvv, 1.0);
}
