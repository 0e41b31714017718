//! Typed kernel parameters. Each op family's uniform is a `#[repr(C)]` struct
//! declared with `kernel_params!`, which mirrors the WGSL struct field by field
//! (every field a 4-byte scalar, so field i sits at byte 4i in both) and records
//! the shader, the WGSL struct's name and the field names, so
//! `kernels-tests/shaders.rs` can check every Rust struct against its shader
//! through naga: same fields, same names (case aside), same offsets, same size.
//! Dispatches pass them with `Res::uniform(&params)`.

/// What `kernels-tests/shaders.rs` checks a parameter struct against.
pub trait KernelParams: bytemuck::Pod {
    /// The shader file (`gpu::SHADERS` name) and the WGSL struct.
    const SHADER: &'static str;
    const WGSL_STRUCT: &'static str;
    /// Field names in declaration order.
    const FIELDS: &'static [&'static str];
}

/// Declares a kernel parameter struct (see the module docs):
/// `kernel_params! { /// docs
///     pub struct Name for "shader" "WgslStruct" { pub a: u32, pub b: f32 } }`.
#[macro_export]
macro_rules! kernel_params {
    ($(#[$m:meta])* $vis:vis struct $name:ident for $shader:literal $wgsl:literal { $($(#[$fm:meta])* $fv:vis $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
        $vis struct $name { $($(#[$fm])* $fv $f: $t),* }

        impl $crate::ops::params::KernelParams for $name {
            const SHADER: &'static str = $shader;
            const WGSL_STRUCT: &'static str = $wgsl;
            const FIELDS: &'static [&'static str] = &[$(stringify!($f)),*];
        }
    };
}

/// Every parameter struct: (shader, WGSL struct, field names, size in bytes).
pub fn all() -> Vec<(&'static str, &'static str, &'static [&'static str], usize)> {
    fn entry<T: KernelParams>() -> (&'static str, &'static str, &'static [&'static str], usize) {
        (T::SHADER, T::WGSL_STRUCT, T::FIELDS, std::mem::size_of::<T>())
    }
    vec![
        entry::<super::matmul::MatmulParams>(),
        entry::<super::gemm::PackParams>(),
        entry::<super::dwconv::DwParams>(),
        entry::<super::attention::AttnParams>(),
        entry::<super::rownorm::RowParams>(),
        entry::<super::tokens::TokParams>(),
        entry::<super::tokens::GatherParams>(),
        entry::<super::optim::OptimParams>(),
        entry::<super::gpsa::GpsaParams>(),
    ]
}

/// Declares a kernel family's bindings by name: a module of `usize` constants
/// (`mm::A`, `mm::C`, ...) and `ALL`, each binding with the WGSL variable names
/// that may sit there (entry points of one file view a binding as different
/// types), which `kernels-tests/shaders.rs` checks against the shader through
/// naga. Dispatches list their resources with `crate::graph::bind`.
#[macro_export]
macro_rules! kernel_bindings {
    ($(#[$m:meta])* $vis:vis mod $name:ident for $shader:literal { $($(#[$fm:meta])* $c:ident = $i:literal $names:literal),* $(,)? }) => {
        $(#[$m])*
        $vis mod $name {
            pub const SHADER: &str = $shader;
            $($(#[$fm])* pub const $c: usize = $i;)*
            /// (binding, WGSL names separated by `|`).
            pub const ALL: &[(usize, &str)] = &[$(($i, $names)),*];
        }
    };
}

crate::kernel_bindings! {
    /// `matmul.wgsl`'s bindings.
    pub mod mm for "matmul" {
        /// A (GEMM; `a4v` its vec4 view in main_tiled4), the source of im2col,
        /// col2im, column sums, z of the activations.
        A = 0 "a|a4v",
        /// B (a weight or the output gradient; `bw` as raw words, `a4` as vec4 sources).
        B = 1 "b|bw|a4",
        BIAS = 2 "bias",
        /// The output.
        C = 3 "c",
        PARAMS = 4 "p|pk",
        A_TEX = 5 "a_tex",
        B_TEX = 6 "b_tex",
        /// The saved pre-activation (SAVE_Z), or a pack's output texture.
        ZC = 7 "zc|pack_out",
        /// A vec4 view of an output.
        C4 = 8 "c4",
        BIAS_TEX = 9 "bias_t",
        PACK_SRC = 10 "pack_src",
        Z_TEX = 11 "z_tex",
        /// The pre-activation read by ACT_GRAD in the GPU set.
        ZB = 12 "zb",
    }
}

crate::kernel_bindings! {
    /// `attention.wgsl`'s bindings.
    pub mod at for "attention" {
        Q = 0 "q",
        K = 1 "k",
        V = 2 "v",
        O = 3 "o",
        PARAMS = 4 "p",
        Q_TEX = 5 "q_tex",
        K_TEX = 6 "k_tex",
        V_TEX = 7 "v_tex",
        DOUT = 8 "dout",
        DQ = 9 "dq",
        /// (log-sum-exp, D) per query.
        LSE = 10 "lse_d",
        DK = 11 "dk",
        DV = 12 "dv",
        DOUT_TEX = 13 "dout_tex",
        PROBS = 14 "probs",
        DSCORE = 15 "dscore",
        PROBS_TEX = 16 "probs_tex",
        DSCORE_TEX = 17 "dscore_tex",
    }
}

crate::kernel_bindings! {
    /// `dwconv.wgsl`'s bindings.
    pub mod dw for "dwconv" {
        X = 0 "x",
        /// The folded weights, or a BatchNorm's γ.
        W = 1 "w",
        /// The folded bias, or a BatchNorm's β.
        BIAS = 2 "bias",
        Q = 3 "q",
        K = 4 "k",
        V = 5 "v",
        PARAMS = 6 "p",
        STATS = 7 "stats",
        RUNNING = 8 "running",
        PRE = 9 "pre",
        POST = 10 "post",
        DPOST = 11 "dpost",
        DPRE = 12 "dpre",
        DGAMMA = 13 "dgamma",
        DW = 14 "dw",
        DX = 15 "dx",
        DBETA = 16 "dbeta",
        X_TEX = 17 "x_tex",
        W_TEX = 18 "w_tex",
        /// The forward's bias texture; the backward's dq texture.
        BIAS_TEX = 19 "bias_t|dq_tex",
        DQ_TEX = 19 "bias_t|dq_tex",
        DK_TEX = 20 "dk_tex",
        DV_TEX = 21 "dv_tex",
        PART = 22 "part",
        PRE_TEX = 23 "pre_t",
        DPOST_TEX = 24 "dpost_t",
        PART_TEX = 25 "part_t",
        SUMS = 26 "sums",
    }
}

crate::kernel_bindings! {
    /// `rownorm.wgsl`'s bindings.
    pub mod rn for "rownorm" {
        X = 0 "x",
        GAMMA = 1 "gamma|targets",
        /// softmax_xent's soft targets.
        TARGETS = 1 "gamma|targets",
        BETA = 2 "beta|dy_in",
        /// layernorm_backward's incoming gradient.
        DY = 2 "beta|dy_in",
        Y = 3 "y",
        PARAMS = 4 "p",
        /// The backward's dy·x̂ rows, softmax_xent's per-row loss.
        AUX = 5 "aux",
        Y4 = 9 "y4",
        /// layernorm4's residual sum written back, layernorm_backward4's dy·x̂.
        AUX4 = 10 "aux4",
        X_TEX = 11 "x_t",
        /// dy, or layernorm4's residual branch z.
        DY_TEX = 12 "dy_t",
        GAMMA_TEX = 13 "gamma_t",
        BETA_TEX = 14 "beta_t",
    }
}

crate::kernel_bindings! {
    /// `tokens.wgsl`'s bindings.
    pub mod tk for "tokens" {
        SRC = 0 "src",
        Y = 1 "y",
        PARAMS = 2 "p",
        GATHER_PARAMS = 3 "gp",
        /// The second operand of the adds.
        OTHER = 4 "other",
        /// Drop path's per-sample scales.
        SCALES = 5 "scales",
        A_TEX = 6 "a_tex",
        B_TEX = 7 "b_tex",
        Y4 = 8 "y4",
    }
}

crate::kernel_bindings! {
    /// `optim.wgsl`'s bindings.
    pub mod op for "optim" {
        PARAM = 0 "param",
        GRAD = 1 "grad",
        M1 = 2 "m1",
        M2 = 3 "m2",
        /// The per-step hyper-parameters (`optim::Hyper`).
        HYPER = 4 "hyper",
        PARAMS = 5 "p",
        /// sumsq's partial sums.
        NORMS = 6 "norms",
        PARAM4 = 7 "param4",
        GRAD4 = 8 "grad4",
        M14 = 9 "m14",
        M24 = 10 "m24",
        /// adamw4_tex's inputs as linear textures: the parameter, gradient and moments.
        W_TEX = 11 "w_t",
        G_TEX = 12 "g_t",
        M_TEX = 13 "m_t",
        V_TEX = 14 "v_t",
    }
}

crate::kernel_bindings! {
    /// `gpsa.wgsl`'s bindings.
    pub mod gp for "gpsa" {
        /// V (pos_mix, pos_dq), or dO where pos_mix computes dV.
        V = 0 "v",
        /// Yc (the content attention's output), or its dV in the backward mix.
        Y = 1 "y",
        O = 2 "o",
        PARAMS = 3 "p",
        QPOS = 4 "qpos",
        /// pos_proj.weight [H, 3], pos_proj.bias [H], gating_param [H].
        WPOS = 5 "wpos",
        BPOS = 6 "bpos",
        GATING = 7 "gating",
        /// Yp = Qpos·V, kept by the training forward.
        YP = 8 "yp",
        DOUT = 9 "dout",
        DQPOS = 10 "dqpos",
        DWPOS = 11 "dwpos",
        DBPOS = 12 "dbpos",
        DGATE = 13 "dgate",
        /// Per-row and per-part partial sums of the backward's reductions.
        PART = 14 "part",
    }
}

/// Every declared binding table: (shader, [(binding, names)]).
pub fn all_bindings() -> Vec<(&'static str, &'static [(usize, &'static str)])> {
    vec![(mm::SHADER, mm::ALL), (at::SHADER, at::ALL), (dw::SHADER, dw::ALL), (rn::SHADER, rn::ALL), (tk::SHADER, tk::ALL), (op::SHADER, op::ALL), (gp::SHADER, gp::ALL)]
}
