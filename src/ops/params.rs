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
    vec![entry::<super::matmul::MatmulParams>(), entry::<super::gemm::PackParams>(), entry::<super::dwconv::DwParams>(), entry::<super::attention::AttnParams>(), entry::<super::rownorm::RowParams>()]
}
