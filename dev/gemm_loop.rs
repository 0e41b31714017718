//! Runs the engine's 1024³ GEMM repeatedly, for profiling the driver's code.
//!
//!     cargo run --release --example gemm_loop -- 200
fn main() -> anyhow::Result<()> {
    let iters: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(50);
    let gpu = cvt_gpu::gpu::Gpu::new(&cvt_gpu::gpu::AdapterRequest::default())?;
    let r = cvt_gpu::bench::gemm(&gpu, 1024, 1024, 1024, iters)?;
    println!("{:.1} ms, {:.1} GFLOP/s", r.median_ms, r.gflops_per_s);
    Ok(())
}
