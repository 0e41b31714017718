//! How long recording and submitting a CvT-13 training step takes on the CPU,
//! against the whole step: `cargo run --release --example record_time`.
fn main() -> anyhow::Result<()> {
    let gpu = cvt_gpu::gpu::Gpu::new(&cvt_gpu::gpu::AdapterRequest::default())?;
    let cfg = cvt_gpu::models::cvt::CvtConfig::by_name("cvt-13")?;
    let tensors = cvt_gpu::models::cvt::weights::random_tensors(&cfg, 1);
    let model = cvt_gpu::models::cvt::train::TrainModel::new(gpu.clone(), cfg.clone(), &tensors, cvt_gpu::ops::Act::QuickGelu)?;
    let step = model.step_plan(64, 64, 64)?;
    let img = vec![0.1f32; 64 * 3 * 64 * 64];
    let targets: Vec<f32> = (0..64 * cfg.num_classes).map(|i| (i % cfg.num_classes == 0) as u8 as f32).collect();
    step.run(&img, &targets)?;
    let (n_disp, n_other) = step.plan.counts();
    for _ in 0..4 {
        let t0 = std::time::Instant::now();
        step.plan.run()?;
        let rec = t0.elapsed().as_secs_f64() * 1e3;
        gpu.sync()?;
        let all = t0.elapsed().as_secs_f64() * 1e3;
        println!("{n_disp} dispatches, {n_other} copies/clears: record+submit {rec:.1} ms, whole {all:.1} ms");
    }
    Ok(())
}
