//! The texture copies of a CvT-13 forward at 224, batch 1 (random weights), or of a
//! training step at 64, batch 64 (`train`), with GPU times where the adapter allows
//! timestamps between passes, largest first, and grouped by the step they feed.
//!
//!     cargo run --release --example copy_prof [train]
fn main() -> anyhow::Result<()> {
    let gpu = cvt_gpu::gpu::Gpu::new(&cvt_gpu::gpu::AdapterRequest::default())?;
    let cfg = cvt_gpu::models::cvt::CvtConfig::by_name("cvt-13")?;
    let tensors = cvt_gpu::models::cvt::weights::random_tensors(&cfg, 1);
    let train = std::env::args().nth(1).as_deref() == Some("train");
    let steps = if train {
        let model = cvt_gpu::models::cvt::train::TrainModel::new(gpu.clone(), cfg.clone(), &tensors, cvt_gpu::ops::Act::QuickGelu)?;
        let step = model.step_plan(64, 64, 64)?;
        let img = vec![0.1f32; 64 * 3 * 64 * 64];
        let targets: Vec<f32> = (0..64 * cfg.num_classes).map(|i| (i % cfg.num_classes == 0) as u8 as f32).collect();
        step.run(&img, &targets)?;
        step.plan.profile()?;
        step.plan.profile()?.0
    } else {
        let model = cvt_gpu::models::cvt::Model::new_in(gpu.clone(), cfg.clone(), &tensors, cvt_gpu::ops::Act::QuickGelu, Default::default())?;
        let plan = model.plan(1, 224, 224)?;
        plan.forward(&vec![0.1f32; 3 * 224 * 224])?;
        // The first profiled run warms the timestamp path; the second is reported.
        plan.plan.profile()?;
        plan.plan.profile()?.0
    };
    // `CVT_PROF_LIST=stage2.blocks.3.`: every step whose label contains that, in order, with its time.
    if let Ok(m) = std::env::var("CVT_PROF_LIST") {
        let mut last = String::new();
        for (i, s) in steps.iter().enumerate() {
            let next = steps[i..].iter().find(|t| !t.label.contains("copy")).map(|t| t.label.clone()).unwrap_or_default();
            if next.contains(&m) || s.label.contains(&m) {
                let l = if s.label.contains("copy") { format!("  copy ({} B)", s.bytes / 2) } else { s.label.clone() };
                if l != last || true {
                    println!("{:7.3} {l}", s.ms);
                }
                last = l;
            }
        }
        return Ok(());
    }
    // `CVT_PROF_MATCH=pack`: the steps whose labels contain that text, grouped (block indices dropped).
    if let Ok(m) = std::env::var("CVT_PROF_MATCH") {
        let mut groups: Vec<(String, f64, usize)> = vec![];
        for s in steps.iter().filter(|s| s.label.contains(&m)) {
            let key: String = s.label.split('.').filter(|p| p.parse::<usize>().is_err() && *p != "blocks").collect::<Vec<_>>().join(".");
            match groups.iter_mut().find(|g| g.0 == key) {
                Some(g) => {
                    g.1 += s.ms;
                    g.2 += 1
                }
                None => groups.push((key, s.ms, 1)),
            }
        }
        groups.sort_by(|a, b| b.1.total_cmp(&a.1));
        for g in &groups {
            println!("{:8.2} ms {:4} x {}", g.1, g.2, g.0);
        }
        return Ok(());
    }
    let mut rows: Vec<(f64, String, String)> = vec![];
    for (i, s) in steps.iter().enumerate() {
        if s.label.contains("copy") {
            let next = steps[i + 1..].iter().find(|t| !t.label.contains("copy")).map(|t| t.label.clone()).unwrap_or_default();
            rows.push((s.ms, format!("{} -> {next} ({} B)", s.label, s.bytes), next));
        }
    }
    let total: f64 = rows.iter().map(|r| r.0).sum();
    let small: f64 = rows.iter().filter(|r| r.0 < 0.05).map(|r| r.0).sum();
    println!("{} copies, {:.1} ms; under 0.05 ms each: {} copies {:.1} ms", rows.len(), total, rows.iter().filter(|r| r.0 < 0.05).count(), small);
    // Grouped by the kind of step they feed (block indices dropped).
    let mut groups: Vec<(String, f64, usize)> = vec![];
    for r in &rows {
        let key: String = r.2.split('.').filter(|p| p.parse::<usize>().is_err() && *p != "blocks").collect::<Vec<_>>().join(".");
        match groups.iter_mut().find(|g| g.0 == key) {
            Some(g) => {
                g.1 += r.0;
                g.2 += 1
            }
            None => groups.push((key, r.0, 1)),
        }
    }
    groups.sort_by(|a, b| b.1.total_cmp(&a.1));
    for g in groups.iter().take(25) {
        println!("{:8.2} ms {:4} copies before {}", g.1, g.2, g.0);
    }
    // `copy_prof train stage2.blocks.0.act` lists every copy before that step.
    if let Some(f) = std::env::args().nth(2) {
        for r in rows.iter().filter(|r| r.2 == f) {
            println!("{:7.3} {}", r.0, r.1);
        }
    }
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    for r in rows.iter().take(15) {
        println!("{:7.3} {}", r.0, r.1);
    }
    let by_size = |lo: u64, hi: u64| {
        let v: Vec<&(f64, String, String)> = rows.iter().filter(|r| (lo..hi).contains(&r.1.rsplit('(').next().unwrap().trim_end_matches(" B)").parse::<u64>().unwrap())).collect();
        (v.len(), v.iter().map(|r| r.0).sum::<f64>())
    };
    for (lo, hi) in [(0, 65536), (65536, 1 << 20), (1 << 20, 8 << 20), (8 << 20, 1 << 40)] {
        let (n, t) = by_size(lo, hi);
        println!("copies of {lo}..{hi} B: {n}, {t:.1} ms");
    }
    let mut ms: Vec<f64> = rows.iter().map(|r| r.0).collect();
    ms.sort_by(f64::total_cmp);
    println!("median copy {:.3} ms", ms[ms.len() / 2]);
    Ok(())
}
