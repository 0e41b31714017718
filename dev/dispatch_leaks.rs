//! Finds dispatches that make the driver's memory grow: builds a training step
//! (cvt-fmnist, batch 128 by default), then replays each recorded dispatch alone
//! N times and prints those after which the process's resident memory grew.
//! This is how the lavapipe 22.3 leak of docs/perf.md was found.
//!
//!     cargo run --release --example dispatch_leaks -- [N] [LABEL-FILTER] [MODEL] [BATCH] [RES]
use cvt_gpu::gpu::{AdapterRequest, Gpu};
use cvt_gpu::models::cvt::{weights::random_tensors, CvtConfig};
use cvt_gpu::ops::Act;

fn rss_kb() -> i64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    s.split_whitespace().nth(1).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0) * 4
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.to_string());
    let n: usize = arg(0, "40").parse()?;
    let filter = arg(1, "");
    let cfg = CvtConfig::by_name(&arg(2, "cvt-fmnist"))?;
    let batch: usize = arg(3, "128").parse()?;
    let res: usize = arg(4, &cfg.image_size.to_string()).parse()?;
    let gpu = Gpu::new(&AdapterRequest::default())?;
    let model = cvt_gpu::models::cvt::train::TrainModel::new(gpu, cfg.clone(), &random_tensors(&cfg, 1), Act::QuickGelu)?;
    let step = model.step_plan(batch, res, res)?;
    if std::env::var_os("FIRST_DISPATCH").is_some() {
        // The first dispatch of each pipeline pays the driver's shader compile.
        let mut t: Vec<(f64, String)> = vec![];
        for (i, s) in step.plan.steps.iter().enumerate() {
            let t0 = std::time::Instant::now();
            step.plan.run_one(i, 1)?;
            t.push((t0.elapsed().as_secs_f64() * 1e3, s.label.clone()));
        }
        let total: f64 = t.iter().map(|x| x.0).sum();
        t.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (ms, l) in t.iter().take(25) {
            println!("{ms:9.1} ms {l}");
        }
        println!("first run, step by step: {total:.0} ms");
        return Ok(());
    }
    // Warm up: the first runs allocate the driver's pools.
    for _ in 0..3 {
        step.plan.run()?;
    }
    let mut grew = 0;
    for (i, s) in step.plan.steps.iter().enumerate() {
        if !s.label.contains(&filter) {
            continue;
        }
        step.plan.run_one(i, 3)?;
        let (r0, t) = (rss_kb(), std::time::Instant::now());
        step.plan.run_one(i, n)?;
        let (kb, ms) = ((rss_kb() - r0) as f64 / n as f64, t.elapsed().as_secs_f64() * 1e3 / n as f64);
        if kb > 0.0 || !filter.is_empty() {
            println!("{i:4} {:48} {kb:8.1} KB/dispatch {ms:7.2} ms", s.label);
            grew += (kb > 0.0) as usize;
        }
    }
    println!("{grew} of {} steps grew the resident memory", step.plan.steps.len());
    Ok(())
}
