//! The texture copies of a CvT-13 forward at 224, batch 1 (random weights), with
//! GPU times where the adapter allows timestamps between passes, largest first.
//!
//!     cargo run --release --example copy_prof
fn main() -> anyhow::Result<()> {
    let gpu = cvt_gpu::gpu::Gpu::new(&cvt_gpu::gpu::AdapterRequest::default())?;
    let cfg = cvt_gpu::model::CvtConfig::by_name("cvt-13")?;
    let tensors = cvt_gpu::model::weights::random_tensors(&cfg, 1);
    let model = cvt_gpu::model::Model::new_in(gpu.clone(), cfg.clone(), &tensors, cvt_gpu::ops::Act::QuickGelu, Default::default())?;
    let plan = model.plan(1, 224, 224)?;
    let img = vec![0.1f32; 3 * 224 * 224];
    plan.forward(&img)?;
    // The first profiled run warms the timestamp path; the second is reported.
    plan.plan.profile()?;
    let (steps, _) = plan.plan.profile()?;
    let mut rows: Vec<(f64, String)> = vec![];
    for (i, s) in steps.iter().enumerate() {
        if s.label.contains("copy") {
            let next = steps[i + 1..].iter().find(|t| !t.label.contains("copy")).map(|t| t.label.clone()).unwrap_or_default();
            rows.push((s.ms, format!("{} -> {next} ({} B)", s.label, s.bytes)));
        }
    }
    let total: f64 = rows.iter().map(|r| r.0).sum();
    let small: f64 = rows.iter().filter(|r| r.0 < 0.05).map(|r| r.0).sum();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!("{} copies, {:.1} ms; under 0.05 ms each: {} copies {:.1} ms", rows.len(), total, rows.iter().filter(|r| r.0 < 0.05).count(), small);
    for r in rows.iter().take(15) {
        println!("{:7.3} {}", r.0, r.1);
    }
    let mut ms: Vec<f64> = rows.iter().map(|r| r.0).collect();
    ms.sort_by(f64::total_cmp);
    println!("median copy {:.3} ms", ms[ms.len() / 2]);
    Ok(())
}
