//! The model families, one folder each: its configuration (presets and JSON),
//! checkpoint names, parameters and forward. `cvt` (Wu et al. 2021: convolutional
//! token embeddings and projections) and `convit` (d'Ascoli et al. 2021: gated
//! positional self-attention). The op families they are built from live in
//! `ops`; `Family` is what the commands work with.

pub mod convit;
pub mod cvt;
pub mod pth;
pub mod step;
pub mod tensors;

pub use tensors::Tensor;
