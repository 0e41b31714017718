//! Fine-tuning a checkpoint on your own image folders from Rust, through the
//! same entry point as `cvt-gpu train --weights` (a head whose class count
//! differs from the data's is re-initialised):
//!
//!     cargo run --release --example fine_tune -- weights/fmnist/model.safetensors FOLDER runs/ft
//!
//! FOLDER holds train/<class>/*.png and val/<class>/*.png.
use clap::Parser;
use cvt_gpu::gpu::{AdapterRequest, Gpu};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    train: cvt_gpu::trainer::TrainArgs,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [weights, folder, out] = args.as_slice() else { anyhow::bail!("usage: fine_tune WEIGHTS FOLDER OUT_DIR") };
    let cli = Cli::try_parse_from(["fine_tune", "--weights", weights, "--image-folder", folder, "--out", out, "--epochs", "2", "--lr", "1e-4", "--batch", "16"])?;
    cvt_gpu::trainer::train(Gpu::new(&AdapterRequest::default())?, &cli.train, &cvt_gpu::dist::World::single())
}
