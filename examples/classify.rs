//! Classify images with a CvT checkpoint in a few lines of Rust.
//!
//!     cargo run --release --example classify -- cvt-13.safetensors cat.png
use cvt_gpu::gpu::{AdapterRequest, Gpu};
use cvt_gpu::models::cvt as model;
use cvt_gpu::{labels, preprocess};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (weights, images) = args.split_first().ok_or_else(|| anyhow::anyhow!("usage: classify WEIGHTS IMAGE..."))?;
    let gpu = Gpu::new(&AdapterRequest::default())?;
    let loaded = model::load(gpu, weights.as_ref(), &Default::default())?;
    let res = loaded.model.cfg.image_size;
    let names = labels::for_head(loaded.model.cfg.num_classes, None, loaded.labels.clone())?;
    let plan = loaded.model.plan(1, res, res)?;
    for path in images {
        let input = preprocess::load_image(path.as_ref(), res, preprocess::Resize::Eval)?;
        let (_logits, probs) = plan.forward(&input)?;
        let best = (0..probs.len()).max_by(|&a, &b| probs[a].total_cmp(&probs[b])).unwrap();
        println!("{path}: {} ({:.1}%)", names[best], 100.0 * probs[best]);
    }
    Ok(())
}
