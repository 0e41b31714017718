//! Where the first forward's time goes: each dispatch's GPU time on the first
//! run (driver JIT included, on drivers that compile at first dispatch) minus its
//! time on the second run, summed per pipeline.
//!
//!     MESA_SHADER_CACHE_DISABLE=true cargo run --release --example first_call -- cvt-13 1
use cvt_gpu::gpu::{AdapterRequest, Gpu};
use cvt_gpu::models::cvt::{config::CvtConfig, infer::Model};
use cvt_gpu::ops::matmul::Act;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().map(String::as_str).unwrap_or("cvt-13");
    let batch: usize = args.get(1).map(|b| b.parse()).transpose()?.unwrap_or(1);
    let gpu = Gpu::new(&AdapterRequest::default())?;
    let cfg = CvtConfig::by_name(name)?;
    let model = Model::new(gpu.clone(), cfg.clone(), &cvt_gpu::models::cvt::weights::random_tensors(&cfg, 1), Act::QuickGelu)?;
    let t = std::time::Instant::now();
    let plan = model.plan(batch, cfg.image_size, cfg.image_size)?;
    let plan_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = std::time::Instant::now();
    let (cold, _) = plan.plan.profile()?;
    let cold_ms = t.elapsed().as_secs_f64() * 1e3;
    let (warm, _) = plan.plan.profile()?;
    let mut rows: Vec<(String, f64, f64)> = cold.iter().zip(&warm).map(|(c, w)| (c.label.clone(), c.ms, c.ms - w.ms)).collect();
    rows.sort_by(|a, b| b.2.total_cmp(&a.2));
    println!("plan {plan_ms:.0} ms, first run {cold_ms:.0} ms; dispatches whose first run took longest beyond the second:");
    for (label, ms, extra) in rows.iter().take(40) {
        println!("{extra:9.1} ms extra ({ms:9.1} first)  {label}");
    }
    println!("sum of extras {:.0} ms", rows.iter().map(|r| r.2).sum::<f64>());
    Ok(())
}
