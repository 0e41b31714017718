//! Host side of each WGSL op family: weight layout, parameters and dispatch
//! geometry. One module per op family; a backward pass goes beside its forward.

pub mod attention;
pub mod dwconv;
pub mod gemm;
pub mod gpsa;
pub mod matmul;
pub mod optim;
pub mod params;
pub mod rownorm;
pub mod tokens;

pub use matmul::{Act, ConvGeom, Linear};
