//! The CPU set's texture GEMM block and grid: rows per invocation, how a
//! workgroup's invocations split between column and row blocks, and where A is
//! fetched once per subgroup.

use super::*;

/// The texture variant's block (`TRN4` vec4 columns; rows per invocation are the
/// graph's `tex_rows`, the shader's `TRM`) and workgroup.
pub(crate) const TRN4: usize = 4;
pub const TWG_X: usize = 16;

/// The grid of a texture GEMM with `n4` vec4 output columns, `rows` rows and
/// block `b`: 2^b.lx of its TWG_X invocations along column blocks, the rest
/// along row blocks.
pub(crate) fn tex_grid(n4: usize, rows: usize, b: &TexBlock) -> [u32; 3] {
    let wx = 1usize << b.lx;
    [n4.div_ceil(TRN4).div_ceil(wx) as u32, rows.div_ceil(b.trm).div_ceil(TWG_X / wx) as u32, 1]
}

/// Whether this graph's texture GEMMs may fetch A once per subgroup
/// (`matmul.wgsl`'s `A_SHARE`): subgroup operations, subgroups of 8 lanes or more.
fn can_share_a(g: &Graph) -> bool {
    g.profile.a_share && g.gpu.subgroups && g.gpu.info.subgroup_min_size >= 8
}

/// How a texture GEMM works: rows per invocation (the shader's `TRM`), whether
/// A is fetched once per subgroup (`A_SHARE`), and log2 of the invocations along
/// column blocks (`p.col_lanes_log2`).
pub(crate) struct TexBlock {
    pub trm: usize,
    pub share: bool,
    pub lx: u32,
}

/// The block of a texture GEMM with `n4` vec4 output columns.
///
/// Lanes go along the column blocks as far as there are (up to TWG_X), the rest
/// along row blocks: a narrow output (N = 32: two column blocks) would otherwise
/// leave 14 of 16 invocations idle, which on a CPU driver are SIMD lanes
/// computed anyway. A is shared where all TWG_X lanes split column blocks
/// (outputs over 128 wide), so every lane has the same rows whatever the
/// driver's subgroup layout: 1024^3 1.18x, CvT-13 training 1.11x
/// (docs/perf.md); or where 8 lanes do and the adapter's subgroups are runs of 8
/// consecutive invocations (`subgroups_of_8`), when that idles fewer lanes of
/// the last workgroup: N = 384 has 24 column blocks, which 16-lane rows cover
/// with 8 idle lanes. Shared GEMMs take `tex_rows`; the others `narrow_rows`, by
/// default 8 where A can be shared (they need a pipeline of their own then, and
/// the 8-row one compiles in half the time: first call 0.7-1.5 s shorter,
/// CvT-13's stage 0 GEMMs 1.16x faster), else `tex_rows` (one pipeline for all).
pub(crate) fn tex_block(g: &Graph, n4: usize) -> TexBlock {
    let cb = n4.div_ceil(TRN4);
    let wx = cb.next_power_of_two().min(TWG_X);
    if can_share_a(g) && wx == TWG_X {
        let idle = |w: usize| cb.div_ceil(w) * w - cb;
        let lx = if idle(8) < idle(16) && g.profile.subgroups_of_8 { 3 } else { 4 };
        TexBlock { trm: g.profile.tex_rows, share: true, lx }
    } else {
        TexBlock { trm: g.profile.narrow_rows.unwrap_or(if can_share_a(g) { 8 } else { g.profile.tex_rows }), share: false, lx: wx.trailing_zeros() }
    }
}
