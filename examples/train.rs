//! A training loop on the library API, end to end: Fashion-MNIST, the small
//! cvt-fmnist model, AdamW, one epoch, then top-1 with the inference engine.
//! (`cvt-gpu train` is this loop plus schedules, checkpoints and resume.)
//!
//!     cargo run --release --example train -- [/usr/share/datasets/fashion-mnist]
use cvt_gpu::data::loader::{epoch_from, Augment, LoaderConfig};
use cvt_gpu::gpu::{AdapterRequest, Gpu};
use cvt_gpu::models::cvt::train::TrainModel;
use cvt_gpu::models::cvt::weights::init_tensors;
use cvt_gpu::models::cvt::{CvtConfig, Model};
use cvt_gpu::ops::{optim::AdamW, Act};
use std::sync::Arc;

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| cvt_gpu::data::FASHION_MNIST_DIR.into());
    let train = Arc::new(cvt_gpu::data::fashion_mnist(dir.as_ref(), "train")?);
    let test = cvt_gpu::data::fashion_mnist(dir.as_ref(), "t10k")?;
    let gpu = Gpu::new(&AdapterRequest::default())?;
    let cfg = CvtConfig::cvt_fmnist();
    let model = TrainModel::new(gpu.clone(), cfg.clone(), &init_tensors(&cfg, 0), Act::QuickGelu)?;
    let batch = 128;
    let step = model.step_plan(batch, 28, 28)?;
    let mut opt = model.optimizer(AdamW::default())?;
    let loader = LoaderConfig {
        batch,
        seed: 0,
        label_smoothing: 0.1,
        mean: [0.2860, 0.0, 0.0],
        std: [0.3530, 1.0, 1.0],
        augment: Augment { flip: true, min_scale: 0.0, mixup: 0.0, cutmix: 0.0 },
        drop_last: true,
        shuffle: true,
        shard: cvt_gpu::data::loader::Shard::ALL,
    };
    for (i, b) in epoch_from(train.clone(), loader, 0, 0).into_iter().enumerate() {
        let (loss, _logits) = step.run(&b.images, &b.targets)?;
        // Linear warmup over 100 steps to 2e-3.
        opt.update(2e-3 * ((i + 1) as f32 / 100.0).min(1.0))?;
        if i % 50 == 0 {
            println!("step {i}: loss {loss:.3}");
        }
    }
    // The trained weights in the inference engine: top-1 on the test set.
    let eval = cvt_gpu::models::Net::Cvt(Model::new(gpu, cfg, &model.weights()?, Act::QuickGelu)?);
    let spec = cvt_gpu::preprocess::Spec { channels: 1, mean: vec![0.2860], std: vec![0.3530], resize: "plain".into() };
    let r = cvt_gpu::trainer::evaluate(&eval, &test, &spec, None, true)?;
    println!("one epoch: test top-1 {:.2}%", 100.0 * r.top1);
    Ok(())
}
