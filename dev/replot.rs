//! Redraws a run directory's curves.png and curves.svg from its metrics.jsonl
//! (after a change to the chart, or for the bundled model):
//!
//!     cargo run --release --example replot -- weights/fmnist "cvt-fmnist on fashion-mnist"
fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(dir), Some(title)) = (args.next(), args.next()) else { anyhow::bail!("usage: replot RUN_DIR TITLE") };
    let dir = std::path::Path::new(&dir);
    cvt_gpu::plot::curves(&dir.join("metrics.jsonl"), dir, &title)
}
