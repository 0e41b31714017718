//! cvt-gpu: vision transformers with convolutional inductive biases (CvT, ConViT) on any GPU wgpu reaches, with hand-written
//! WGSL kernels and no ML framework.
//!
//! ```no_run
//! use cvt_gpu::{gpu::{Gpu, AdapterRequest}, models::cvt as model, preprocess};
//! let gpu = Gpu::new(&AdapterRequest::default())?;
//! let loaded = model::load(gpu, "cvt13.safetensors".as_ref(), &Default::default())?;
//! let img = preprocess::load_image("cat.png".as_ref(), 224, preprocess::Resize::Eval)?;
//! let plan = loaded.model.plan(1, 224, 224)?;
//! let (_logits, probs) = plan.forward(&img)?;
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod bench;
pub mod checkpoint;
pub mod convert;
pub mod data;
pub mod dist;
pub mod gpu;
pub mod graph;
pub mod labels;
pub mod models;
pub mod ops;
pub mod plot;
pub mod preprocess;
pub mod profile;
pub mod rundir;
pub mod texread;
pub mod trainer;
pub mod util;
